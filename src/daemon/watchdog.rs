//! Watchdog escalation (docs/storage.md, "Partitions", "Watchdog"; docs/hardening.md §10): with
//! `watchdog_device` set, lockwardend keeps a watchdog alive only while no VM that had to be
//! stopped for a silent storage is still able to run, so a VM that cannot be stopped (SIGKILLed
//! but stuck in uninterruptible I/O, or a SIGSTOP that cannot take effect while it waits) ends
//! with a host reset before the storage's lock lease runs out.
//!
//! The rule, checked at every keep-alive: for every lease whose mount has not confirmed a
//! heartbeat for `fence_after_ms` (or whose lock was found lost and not taken back), every VM
//! holding it must be seen stopped or gone: every thread of its process in state `T`/`t`
//! (stopped), `Z`/`X` (exiting), or the process absent. VMs with `on_lockfailure=ignore` are
//! exempt (the operator chose to leave them running; the fence logs them UNPROTECTED). Anything
//! else — a thread still `R`, `S` or `D` — withholds the keep-alive, re-checked every
//! [`RECHECK`]: a VM that stops resumes the keep-alives, one that does not lets the watchdog's
//! own timeout run out. The timeout is therefore the bound on the time a fenced VM has to stop.
//!
//! What is accepted: a character device that answers `WDIOC_GETSUPPORT` (a Linux watchdog
//! driver; its `WDIOC_GETTIMEOUT` sets the keep-alive interval), or a FIFO with a reader (a
//! stand-in for tests, or a relay to another watchdog; a warning at start says a FIFO resets
//! nothing by itself). Anything else stops the start. A keep-alive is one byte `.`, never
//! `V`: a `V` arms the driver's magic close, and a crash right after would disarm the watchdog.
//! A clean stop writes `V` and closes (disarms the watchdog unless the driver has `nowayout`).
//!
//! Only lockwardend holds the device: not the keeper (it closes every inherited descriptor,
//! keeper/process.rs), because it cannot tell a silent storage from a healthy one, so a keeper
//! that fed the watchdog would protect nothing. A crash closes the device without the magic
//! close: the watchdog stays armed and the restarted lockwardend (systemd `Restart=on-failure`,
//! 1 s) opens it again and feeds it; a lockwardend that does not come back within the timeout
//! resets the host, as it must (nobody would fence). A live re-exec hands the descriptor over
//! (reexec.rs) and feeds it right before `execve` and right after the new image restored its
//! state.

use log::{error, info, warn};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// While keep-alives are withheld, the rule is checked again this often, so a VM that stops
/// resumes them at once (not one interval later).
pub const RECHECK: Duration = Duration::from_millis(50);
/// A withheld keep-alive is logged once it has been withheld this long (a VM being killed is
/// normally gone within milliseconds: that is not worth an error).
pub const LOG_AFTER: Duration = Duration::from_secs(1);
/// The storage lease the start-up check assumes (NFSv4 on Linux) and the slack it keeps.
const NFS4_LEASE: Duration = Duration::from_secs(90);
const SLACK: Duration = Duration::from_secs(5);

/// `_IOR('W', 0, struct watchdog_info)` and `_IOR('W', 7, int)` (linux/watchdog.h).
const WDIOC_GETSUPPORT: libc::c_ulong = 0x8028_5700;
const WDIOC_GETTIMEOUT: libc::c_ulong = 0x8004_5707;

/// `struct watchdog_info`.
#[repr(C)]
struct WatchdogInfo {
    options: u32,
    firmware_version: u32,
    identity: [u8; 32],
}

/// What the device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A watchdog driver, with its timeout when it reports one.
    Device { timeout: Option<Duration> },
    /// A FIFO (stand-in or relay).
    Fifo,
}

#[derive(Debug)]
pub struct Watchdog {
    file: File,
    pub path: PathBuf,
    pub kind: Kind,
    pub interval: Duration,
    pub(super) next: Instant,
    /// Since when, and why, keep-alives are withheld.
    pub(super) withheld: Option<(Instant, String)>,
    pub(super) logged: bool,
    /// The last write error (logged once until a write succeeds).
    write_error: Option<String>,
}

/// The open device as a live re-exec writes it down (reexec.rs's state document): its
/// descriptor number, kept open across the exec, and what it is.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct WatchdogDoc {
    pub fd: RawFd,
    pub path: PathBuf,
    #[serde(default)]
    pub fifo: bool,
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// The keep-alive interval: `heartbeat_interval_ms`, at most half the watchdog's timeout.
fn interval_for(kind: Kind, heartbeat: Duration) -> Duration {
    match kind {
        Kind::Device { timeout: Some(t) } => heartbeat.min(t / 2).max(Duration::from_millis(10)),
        _ => heartbeat,
    }
}

impl Watchdog {
    /// Open `path` at start. Refuses what is neither a watchdog driver nor a FIFO with a reader,
    /// and a watchdog without heartbeats (nothing would decide when to stop feeding it).
    pub fn open(
        path: &Path,
        heartbeat: Option<Duration>,
        fence_after: Duration,
    ) -> Result<Watchdog, String> {
        let fix = "fix watchdog_device in the configuration (docs/storage.md, \"Watchdog\")";
        let Some(hb) = heartbeat else {
            return Err(format!(
                "watchdog_device = {path:?} is set but heartbeat_interval_ms = 0: without \
                 heartbeats nothing decides when the watchdog must stop being fed; set \
                 heartbeat_interval_ms or unset watchdog_device"
            ));
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| {
                let why = match e.raw_os_error() {
                    Some(libc::ENXIO) => {
                        " (a FIFO nobody reads: start its reader first)".to_string()
                    }
                    Some(libc::EBUSY) => " (another process has the watchdog open: a \
                        watchdog daemon, or systemd's RuntimeWatchdogSec=; only one may feed it)"
                        .to_string(),
                    _ => String::new(),
                };
                format!("cannot open watchdog_device {path:?}: {e}{why}; {fix}")
            })?;
        let ft = file
            .metadata()
            .map_err(|e| format!("cannot examine watchdog_device {path:?}: {e}; {fix}"))?
            .file_type();
        let kind = if ft.is_char_device() {
            let mut info = WatchdogInfo {
                options: 0,
                firmware_version: 0,
                identity: [0; 32],
            };
            // SAFETY: WDIOC_GETSUPPORT writes one `struct watchdog_info` (same layout as
            // `WatchdogInfo`) into the exclusively borrowed `info`.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), WDIOC_GETSUPPORT as _, &mut info) };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                return Err(format!(
                    "watchdog_device {path:?} is a character device but not a watchdog \
                     (WDIOC_GETSUPPORT: {e}); {fix}"
                ));
            }
            let mut secs: libc::c_int = 0;
            // SAFETY: WDIOC_GETTIMEOUT writes one int into the exclusively borrowed `secs`.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), WDIOC_GETTIMEOUT as _, &mut secs) };
            let timeout = (r == 0 && secs > 0).then(|| Duration::from_secs(secs as u64));
            let ident = String::from_utf8_lossy(
                info.identity.split(|b| *b == 0).next().unwrap_or_default(),
            )
            .into_owned();
            info!(
                "watchdog_device {path:?} ({}) opened and armed, timeout {}",
                crate::untrusted::escape(&ident),
                timeout.map_or("unknown".into(), |t| format!("{} s", t.as_secs()))
            );
            Kind::Device { timeout }
        } else if ft.is_fifo() {
            warn!(
                "watchdog_device {path:?} is a FIFO, not a watchdog driver: its keep-alives go to \
                 whatever reads it, and nothing resets this host by itself (a test stand-in, or \
                 a relay to a real watchdog)"
            );
            Kind::Fifo
        } else {
            return Err(format!(
                "watchdog_device {path:?} is neither a character device nor a FIFO; {fix}"
            ));
        };
        let wd = Watchdog::from_parts(file, path.to_path_buf(), kind, hb);
        wd.check_inequality(fence_after);
        Ok(wd)
    }

    fn from_parts(file: File, path: PathBuf, kind: Kind, heartbeat: Duration) -> Watchdog {
        Watchdog {
            file,
            path,
            kind,
            interval: interval_for(kind, heartbeat),
            next: Instant::now(),
            withheld: None,
            logged: false,
            write_error: None,
        }
    }

    /// Warn when the host would reset later than NFSv4's lease allows (the inequality of
    /// docs/storage.md, "Watchdog").
    fn check_inequality(&self, fence_after: Duration) {
        if let Kind::Device { timeout: Some(t) } = self.kind {
            let reset = fence_after + self.interval + t + SLACK;
            if reset >= NFS4_LEASE {
                warn!(
                    "watchdog_device {:?}: fence_after_ms ({} ms) + one keep-alive interval ({} \
                     ms) + the watchdog timeout ({} s) + 5 s of slack is not below NFSv4's 90 s \
                     lease: a host with a VM that cannot be stopped would reset after the storage \
                     could give its disk away; shorten the watchdog timeout (softdog: \
                     soft_margin) or fence_after_ms (docs/storage.md, \"Watchdog\")",
                    self.path,
                    fence_after.as_millis(),
                    self.interval.as_millis(),
                    t.as_secs()
                );
            }
        }
    }

    /// The descriptor, for a live re-exec.
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The device as a live re-exec writes it down.
    pub fn save(&self) -> WatchdogDoc {
        WatchdogDoc {
            fd: self.raw_fd(),
            path: self.path.clone(),
            fifo: self.kind == Kind::Fifo,
            timeout_s: match self.kind {
                Kind::Device { timeout } => timeout.map(|t| t.as_secs()),
                Kind::Fifo => None,
            },
        }
    }

    /// Take over the device a previous image wrote down, its descriptor `owned` (adopted by
    /// reexec.rs from the number in `doc`).
    pub fn load(doc: WatchdogDoc, owned: OwnedFd, heartbeat: Option<Duration>) -> Watchdog {
        let kind = if doc.fifo {
            Kind::Fifo
        } else {
            Kind::Device {
                timeout: doc.timeout_s.map(Duration::from_secs),
            }
        };
        Self::adopt(owned, doc.path, kind, heartbeat)
    }

    /// Take over a descriptor handed over by a previous image.
    fn adopt(owned: OwnedFd, path: PathBuf, kind: Kind, heartbeat: Option<Duration>) -> Watchdog {
        if let Err(e) = nix::fcntl::fcntl(
            &owned,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        ) {
            warn!(
                "cannot set close-on-exec on the watchdog descriptor: {}",
                e.desc()
            );
        }
        let hb = heartbeat.unwrap_or(Duration::from_secs(1));
        Watchdog::from_parts(File::from(owned), path, kind, hb)
    }

    pub fn next_deadline(&self) -> Instant {
        self.next
    }

    /// Write one keep-alive byte now (never `V`).
    pub fn feed(&mut self) {
        match (&self.file).write(b".") {
            Ok(1) => self.write_error = None,
            Ok(_) => {}
            Err(e) => {
                let e = e.to_string();
                if self.write_error.as_deref() != Some(e.as_str()) {
                    error!(
                        "cannot feed watchdog_device {:?}: {e}; the watchdog may reset this host \
                         (a FIFO: is its reader still there?)",
                        self.path
                    );
                    self.write_error = Some(e);
                }
            }
        }
    }

    /// Clean stop: the magic close (`V`, then close) disarms the watchdog unless its driver was
    /// loaded with `nowayout`.
    pub fn magic_close(self) {
        let path = self.path.clone();
        match (&self.file).write(b"V") {
            Ok(_) => info!(
                "watchdog_device {path:?}: magic close written; the watchdog is disarmed (unless \
                 its driver has nowayout set)"
            ),
            Err(e) => error!(
                "watchdog_device {path:?}: cannot write the magic close ({e}); the watchdog stays \
                 armed and resets this host unless lockwardend is started again in time"
            ),
        }
        drop(self.file);
    }
}

/// Is every thread of process `pid` stopped or exiting (or the process gone)? Err: the state
/// letter of a thread that can still run.
pub fn stopped(pid: u32) -> Result<(), char> {
    let dir = match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(d) => d,
        Err(_) => return Ok(()),
    };
    for t in dir.flatten() {
        let Ok(s) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let c = s
            .rsplit_once(')')
            .and_then(|(_, r)| r.trim().chars().next())
            .unwrap_or('?');
        if !matches!(c, 'T' | 't' | 'Z' | 'X' | 'x') {
            return Err(c);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_is_at_most_half_the_timeout() {
        let hb = Duration::from_secs(5);
        let d = |t| Kind::Device {
            timeout: Some(Duration::from_secs(t)),
        };
        assert_eq!(interval_for(d(60), hb), hb);
        assert_eq!(interval_for(d(6), hb), Duration::from_secs(3));
        assert_eq!(interval_for(Kind::Fifo, hb), hb);
        assert_eq!(interval_for(Kind::Device { timeout: None }, hb), hb);
    }

    #[test]
    fn a_regular_file_and_a_non_watchdog_device_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("wd");
        std::fs::write(&f, b"").unwrap();
        let hb = Some(Duration::from_millis(100));
        let e = Watchdog::open(&f, hb, Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("neither a character device nor a FIFO"), "{e}");
        let e = Watchdog::open(Path::new("/dev/null"), hb, Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("not a watchdog"), "{e}");
        let e = Watchdog::open(Path::new("/dev/null"), None, Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("heartbeat_interval_ms = 0"), "{e}");
        // Nothing was written to the regular file.
        assert_eq!(std::fs::read(&f).unwrap(), b"");
    }

    #[test]
    fn this_process_is_not_stopped() {
        assert!(stopped(std::process::id()).is_err());
        assert_eq!(stopped(u32::MAX - 1), Ok(()));
    }
}
