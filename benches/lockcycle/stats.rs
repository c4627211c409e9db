//! Sample statistics (median with p10/p90) and the raw-syscall floor measurements.

use serde_json::{Value, json};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Instant;

/// Median and spread of a sample set, in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub n: usize,
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
}

impl Stats {
    /// Nearest-rank percentiles of `samples` (microseconds).
    pub fn of(samples: &[f64]) -> Stats {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Stats::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let i = (q * (v.len() - 1) as f64).round() as usize;
            v.get(i).copied().unwrap_or(f64::NAN)
        };
        Stats {
            n: v.len(),
            median: at(0.5),
            p10: at(0.1),
            p90: at(0.9),
        }
    }

    pub fn json(&self) -> Value {
        json!({ "n": self.n, "median_us": r1(self.median), "p10_us": r1(self.p10),
                "p90_us": r1(self.p90) })
    }

    /// `median [p10-p90]` for the table.
    pub fn cell(&self) -> String {
        format!(
            "{} [{}-{}]",
            fmt_us(self.median),
            fmt_us(self.p10),
            fmt_us(self.p90)
        )
    }
}

/// Round to one decimal for the JSON file.
pub fn r1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Microseconds for humans: `812us`, `3.41ms`.
pub fn fmt_us(us: f64) -> String {
    if !us.is_finite() {
        "-".to_string()
    } else if us >= 10_000.0 {
        format!("{:.1}ms", us / 1000.0)
    } else if us >= 1000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{us:.0}us")
    }
}

/// Elapsed microseconds since `t`.
pub fn us_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e6
}

/// Take an exclusive OFD lock on byte 0 of `f` (what lockwardend does per disk).
pub fn ofd_lock(f: &File) -> Result<(), String> {
    let fl = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    };
    // SAFETY: a valid open descriptor and a valid, initialised flock for the call's duration.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("F_OFD_SETLK: {}", std::io::Error::last_os_error()))
    }
}

/// Whether anybody (POSIX or OFD lock, any process) holds a lock on byte 0 of `f`.
pub fn byte0_locked(f: &File) -> Result<bool, String> {
    let mut fl = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    };
    // SAFETY: a valid open descriptor and a valid flock the kernel fills in.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if rc != 0 {
        return Err(format!("F_OFD_GETLK: {}", std::io::Error::last_os_error()));
    }
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

/// open(O_RDWR|O_CLOEXEC) + OFD lock + close: one disk's worth of kernel work.
pub fn lock_once(p: &Path) -> Result<(), String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(p)
        .map_err(|e| format!("open {p:?}: {e}"))?;
    ofd_lock(&f)
}

/// A trivial echo server on a Unix socket (a thread of this process): reads one 12-byte header
/// plus body per connection and writes back a frame of `reply_len` bytes, then closes.
pub struct Echo {
    pub path: PathBuf,
}

impl Echo {
    pub fn start(path: PathBuf, reply_len: usize) -> Result<Echo, String> {
        let l = UnixListener::bind(&path).map_err(|e| format!("bind {path:?}: {e}"))?;
        thread::spawn(move || {
            let reply = vec![b'x'; reply_len];
            for conn in l.incoming() {
                let Ok(mut c) = conn else { break };
                let mut hdr = [0u8; 12];
                if c.read_exact(&mut hdr).is_err() {
                    continue;
                }
                let len = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
                let mut body = vec![0u8; len];
                if c.read_exact(&mut body).is_err() {
                    continue;
                }
                let _ = c.write_all(&reply);
            }
        });
        Ok(Echo { path })
    }

    /// connect + send `req` + read `reply_len` bytes + close.
    pub fn roundtrip(&self, req: &[u8], reply_len: usize) -> Result<(), String> {
        let mut s = UnixStream::connect(&self.path).map_err(|e| format!("connect echo: {e}"))?;
        s.write_all(req).map_err(|e| format!("write echo: {e}"))?;
        let mut buf = vec![0u8; reply_len];
        s.read_exact(&mut buf)
            .map_err(|e| format!("read echo: {e}"))?;
        Ok(())
    }
}
