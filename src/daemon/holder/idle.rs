//! Idle side files: a withdrawn record's side file on a host-local file system stays open for
//! the file's next lease on this host.

use super::publish::{PublishedPlace, RecordDir, Tail, writable_now, write_record};
use super::*;
use nix::sys::stat::fstat;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

/// A withdrawn record's side file on a host-local file system, kept open (blank, its liveness
/// lock released) for [`IDLE_TTL`] so that the file's next lease on this host — a paused VM
/// resuming, a VM restarting — writes its record without opening the file again (`openat`,
/// `fstat` and `close` were a third of a record's cost). Never on NFS or unknown file systems:
/// an open file there keeps the mount busy, and closing can block. After [`IDLE_TTL`] the
/// server's timer closes it, so an unmount finds nothing open for long.
pub(super) struct Idle {
    pub(super) dir: Arc<RecordDir>,
    pub(super) file: File,
    pub(super) len: u64,
    since: std::time::Instant,
}

/// Idle side files by (record directory, side file name).
static IDLE: LazyLock<Mutex<HashMap<(String, String), Idle>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));
const IDLE_TTL: Duration = Duration::from_secs(10);
const IDLE_MAX: usize = 256;

pub(super) fn park(dir: Arc<RecordDir>, name: String, file: File, len: u64) {
    let Ok(mut idle) = IDLE.lock() else {
        return;
    };
    if idle.len() >= IDLE_MAX {
        // The oldest goes.
        if let Some(k) = idle
            .iter()
            .min_by_key(|(_, i)| i.since)
            .map(|(k, _)| k.clone())
        {
            idle.remove(&k);
        }
    }
    let key = (dir.path.clone(), name);
    idle.insert(
        key,
        Idle {
            dir,
            file,
            len,
            since: std::time::Instant::now(),
        },
    );
}

pub(super) fn unpark(dir: &str, name: &str) -> Option<Idle> {
    IDLE.lock()
        .ok()?
        .remove(&(dir.to_string(), name.to_string()))
}

/// Publish into an idle side file: still linked, liveness lock taken, record written.
pub(super) fn reuse(idle: Idle, name: String, bytes: &[u8]) -> Result<PublishedPlace, String> {
    let st = fstat(&idle.file).map_err(|e| e.desc().to_string())?;
    if st.st_nlink == 0 {
        return Err("removed meanwhile".into());
    }
    // Still a file lockwardend may write (a hard link may have been added while it was idle);
    // `write_record` checks again right before writing.
    writable_now(idle.file.as_fd())?;
    ofd_set(idle.file.as_fd(), libc::F_WRLCK, 0).map_err(|e| e.desc().to_string())?;
    let len = write_record(
        idle.file.as_fd(),
        bytes,
        idle.len,
        Tail::Pad,
        idle.dir.flush,
    )?;
    Ok(PublishedPlace::Side {
        dir: idle.dir,
        name,
        file: idle.file,
        len,
    })
}

/// When the oldest idle side file is due to be closed.
pub fn idle_deadline() -> Option<std::time::Instant> {
    IDLE.lock().ok()?.values().map(|i| i.since + IDLE_TTL).min()
}

/// Close the idle side files that have been idle for [`IDLE_TTL`] by `now`.
pub fn expire_idle(now: std::time::Instant) {
    if let Ok(mut idle) = IDLE.lock() {
        idle.retain(|_, i| i.since + IDLE_TTL > now);
    }
}

#[cfg(test)]
mod tests {
    use super::super::publish::Published;
    use super::*;
    use crate::holder_record::ofd_held;
    use crate::protocol::{LeaseMode, ResourceKind};
    use std::fs;

    #[test]
    fn a_withdrawn_side_file_stays_open_idle_and_is_reused_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("idle.img");
        fs::write(&img, b"").unwrap();
        let path = img.to_str().unwrap();
        let lease = File::options().read(true).write(true).open(&img).unwrap();
        ofd_set(lease.as_fd(), libc::F_WRLCK, 0).unwrap();
        let target = || Target {
            fd: lease.as_fd(),
            kind: ResourceKind::Disk,
            lock_path: path,
            lockspace: false,
        };
        let rec = || {
            let vm = Vm {
                name: "idle-vm".into(),
                uuid: "u".into(),
                pid: 1,
                since: 1,
            };
            Record::new(
                "idle-host",
                ResourceKind::Disk,
                path,
                LeaseMode::Exclusive,
                path,
                1,
                vec![vm],
            )
        };
        let side_ino = |p: &Published| match &p.place {
            PublishedPlace::Side { file, .. } => fstat(file).unwrap().st_ino,
            other => panic!("{other:?}"),
        };
        let key = (
            format!("{}/{RECORD_DIR}", dir.path().to_str().unwrap()),
            "idle.img@idle-host.json".to_string(),
        );
        let parked = || IDLE.lock().unwrap().contains_key(&key);
        let probe_new = |p: &std::path::Path| File::open(p).unwrap();
        let p1 = publish(target(), rec()).unwrap();
        let ino = side_ino(&p1);
        withdraw(lease.as_fd(), p1).unwrap();
        // tmpfs and ext4 (where tests run) are host-local: kept open, unlocked.
        assert!(parked());
        let side = dir.path().join(".lockwarden/idle.img@idle-host.json");
        let probe = File::open(&side).unwrap();
        assert!(
            !ofd_held(probe.as_fd(), 0),
            "an idle side file holds no liveness lock"
        );
        let p2 = publish(target(), rec()).unwrap();
        assert!(!parked());
        assert_eq!(side_ino(&p2), ino);
        assert!(ofd_held(probe.as_fd(), 0));
        withdraw(lease.as_fd(), p2).unwrap();
        // Removed while idle: not written into, a new file is made.
        fs::remove_file(&side).unwrap();
        let p3 = publish(target(), rec()).unwrap();
        let text = fs::read_to_string(&side).unwrap();
        assert!(
            text.contains("idle-vm"),
            "the record is in the new file: {text:?}"
        );
        withdraw(lease.as_fd(), p3).unwrap();
        // Claimed (liveness lock now, record after the answer): blank until written.
        let mut p4 = claim_known(target(), rec(), Ident::of(&fstat(&lease).unwrap())).unwrap();
        assert!(p4.is_pending());
        assert!(ofd_held(probe_new(&side).as_fd(), 0));
        assert!(fs::read(&side).unwrap().iter().all(|b| *b == b' '));
        write_pending(&mut p4).unwrap();
        assert!(!p4.is_pending());
        assert!(fs::read_to_string(&side).unwrap().contains("idle-vm"));
        withdraw(lease.as_fd(), p4).unwrap();
        // Claimed, then the idle file is removed before the write: a new file gets the record.
        let mut p5 = claim_known(target(), rec(), Ident::of(&fstat(&lease).unwrap())).unwrap();
        assert!(p5.is_pending());
        fs::remove_file(&side).unwrap();
        write_pending(&mut p5).unwrap();
        assert!(fs::read_to_string(&side).unwrap().contains("idle-vm"));
        assert!(ofd_held(probe_new(&side).as_fd(), 0));
        withdraw(lease.as_fd(), p5).unwrap();
        // The timer closes it after IDLE_TTL.
        assert!(idle_deadline().is_some());
        expire_idle(std::time::Instant::now() + IDLE_TTL);
        assert!(!parked());
    }
}
