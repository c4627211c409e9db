//! One storage heartbeat, as a storage thread runs it: the fixed-size record written and
//! `fsync`ed next to one of the mount's leased files, or the lock test where no file can be
//! kept. Why and when beats are sent: heartbeat.rs; the whole scheme: docs/storage.md,
//! "Partitions". Below the event loop's modules: storage.rs runs it and imports nothing above.

use crate::protocol::LeaseMode;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Bytes of a heartbeat record (fixed, so every beat rewrites the same block).
const BEAT_LEN: usize = 160;

/// One beat, run on a storage thread (`Work::Heartbeat`).
#[derive(Debug)]
pub struct Beat {
    pub mount: PathBuf,
    /// The heartbeat file, once opened by an earlier beat (moved to the job and back, so it
    /// is only ever closed on a storage thread: a close on NFS can block).
    pub file: Option<OwnedFd>,
    /// A lease on this mount: where the heartbeat file goes (next to it), and the lock the
    /// fallback beat tests.
    pub lease: Arc<OwnedFd>,
    pub mode: LeaseMode,
    pub host: String,
    pub seq: u64,
}

/// What a beat found.
#[derive(Debug)]
pub struct Beaten {
    pub mount: PathBuf,
    /// The heartbeat file to keep for the next beats (None: none could be kept).
    pub file: Option<OwnedFd>,
    /// Why the heartbeat file could not be used (the lock was re-requested instead).
    pub no_file: Option<String>,
    /// Ok: the server answered.
    pub result: Result<(), String>,
}

/// Run one beat (on a storage thread).
pub fn beat(b: Beat) -> Beaten {
    let Beat {
        mount,
        file,
        lease,
        mode,
        host,
        seq,
    } = b;
    let opened = match file {
        Some(f) => Ok(f),
        None => open_file(&lease, &host),
    };
    let (file, no_file) = match opened {
        Ok(f) => match write(&f, &host, seq) {
            Ok(()) => {
                return Beaten {
                    mount,
                    file: Some(f),
                    no_file: None,
                    result: Ok(()),
                };
            }
            Err(e) => (None, Some(e)),
        },
        Err(e) => (None, Some(e)),
    };
    // A lock test goes to the server too (NLM TEST, NFSv4 LOCKT: the client's own locks do
    // not conflict with the lease's own descriptor, so nothing local answers it), and changes
    // nothing: unlike a lock request it cannot take a lock back on a lease being released.
    let mut fl = libc::flock {
        l_type: match mode {
            LeaseMode::Exclusive => libc::F_WRLCK,
            LeaseMode::Shared => libc::F_RDLCK,
        } as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    };
    let result = match nix::fcntl::fcntl(lease.as_fd(), nix::fcntl::FcntlArg::F_OFD_GETLK(&mut fl))
    {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("testing a lease's lock failed: {} ({e})", e.desc())),
    };
    Beaten {
        mount,
        file,
        no_file,
        result,
    }
}

/// Open (create) `heartbeat@<host>` in the `.lockwarden` directory next to the file `lease`.
fn open_file(lease: &OwnedFd, host: &str) -> Result<OwnedFd, String> {
    let side = super::holder::side_files(lease.as_fd())?
        .ok_or_else(|| "the leased file is not a regular file with a name".to_string())?;
    let dir = super::holder::open_publish_dir(&side.dir)?;
    let name = format!("heartbeat@{}", super::holder::host_label(host));
    let (fd, st, _) = crate::untrusted::open_regular_at(
        Some(dir.as_fd()),
        &name,
        crate::untrusted::Access::ReadWrite,
        Some(0o644),
    )
    .map_err(|e| format!("cannot open {}/{name}: {}", side.dir, e.describe()))?;
    crate::untrusted::check_writable(&st, BEAT_LEN as u64)
        .map_err(|e| format!("{}/{name} is not written: {e}", side.dir))?;
    Ok(fd)
}

/// Write beat `seq` at offset 0 and fsync (the write rule is checked again right before).
fn write(f: &OwnedFd, host: &str, seq: u64) -> Result<(), String> {
    let st = nix::sys::stat::fstat(f.as_fd())
        .map_err(|e| format!("cannot examine the heartbeat file: {}", e.desc()))?;
    crate::untrusted::check_writable(&st, BEAT_LEN as u64)
        .map_err(|e| format!("the heartbeat file is not written: {e}"))?;
    let wall = crate::text::now_secs();
    let mut line = format!(
        "lockwarden heartbeat host={} boot={} pid={} seq={seq} time={wall}",
        super::holder::host_label(host),
        super::holder::boot_id(),
        std::process::id()
    );
    line.truncate(BEAT_LEN - 1);
    while line.len() < BEAT_LEN - 1 {
        line.push(' ');
    }
    line.push('\n');
    let n = nix::sys::uio::pwrite(f.as_fd(), line.as_bytes(), 0)
        .map_err(|e| format!("writing the heartbeat file failed: {} ({e})", e.desc()))?;
    if n != line.len() {
        return Err(format!(
            "writing the heartbeat file stopped after {n} of {} bytes",
            line.len()
        ));
    }
    nix::unistd::fsync(f.as_fd())
        .map_err(|e| format!("fsync of the heartbeat file failed: {} ({e})", e.desc()))
}

/// Time since boot, suspend included (`CLOCK_BOOTTIME`): monotonic like `Instant`, but it keeps
/// running while the host is suspended or frozen, as the storage server's lease clock does, so
/// a host that wakes up after the server's lease ran out fences at once instead of
/// `fence_after_ms` later. Falls back to `CLOCK_MONOTONIC`.
pub fn boot_now() -> Duration {
    let read = |clock: libc::clockid_t| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
        let r = unsafe { libc::clock_gettime(clock, &mut ts) };
        (r == 0).then(|| {
            Duration::new(
                u64::try_from(ts.tv_sec).unwrap_or(0),
                u32::try_from(ts.tv_nsec).unwrap_or(0),
            )
        })
    };
    read(libc::CLOCK_BOOTTIME)
        .or_else(|| read(libc::CLOCK_MONOTONIC))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    fn lease_fd(p: &Path) -> Arc<OwnedFd> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap();
        Arc::new(OwnedFd::from(f))
    }

    fn one(lease: &Arc<OwnedFd>, file: Option<OwnedFd>, seq: u64) -> Beaten {
        beat(Beat {
            mount: PathBuf::from("/m"),
            file,
            lease: Arc::clone(lease),
            mode: LeaseMode::Exclusive,
            host: "host a/b".into(),
            seq,
        })
    }

    #[test]
    fn a_beat_rewrites_one_fixed_size_record_and_never_writes_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, vec![7u8; 8192]).unwrap();
        let lease = lease_fd(&disk);
        let b = one(&lease, None, 1);
        assert!(b.result.is_ok() && b.no_file.is_none(), "{b:?}");
        let hb = dir.path().join(".lockwarden/heartbeat@host_a_b");
        let text = std::fs::read_to_string(&hb).unwrap();
        assert_eq!(text.len(), BEAT_LEN);
        assert!(
            text.starts_with("lockwarden heartbeat host=host_a_b "),
            "{text:?}"
        );
        assert!(text.contains(" seq=1 "), "{text:?}");
        // The kept file is rewritten in place by the next beat.
        let b = one(&lease, b.file, 2);
        assert!(b.result.is_ok() && b.file.is_some());
        let text = std::fs::read_to_string(&hb).unwrap();
        assert_eq!(text.len(), BEAT_LEN);
        assert!(text.contains(" seq=2 "), "{text:?}");
        // The heartbeat file replaced by a hard link to the image: never written (the image is
        // intact), the beat falls back to testing the lease's lock.
        std::fs::remove_file(&hb).unwrap();
        std::fs::hard_link(&disk, &hb).unwrap();
        let b = one(&lease, b.file, 3);
        assert!(b.result.is_ok(), "{b:?}");
        let b = one(&lease, None, 4);
        assert!(b.result.is_ok(), "{b:?}");
        assert!(b.file.is_none());
        assert!(
            b.no_file
                .as_deref()
                .is_some_and(|w| w.contains("hard link")),
            "{b:?}"
        );
        assert_eq!(std::fs::read(&disk).unwrap(), vec![7u8; 8192]);
    }
}
