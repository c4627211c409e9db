//! Storage isolation: every file system call on a lease's file runs on a worker thread of the
//! file system (mount) it lives on, never on the event loop (docs/storage.md).
//!
//! Why: on a hard NFS mount whose server went away, `open`, `stat`, `fcntl` and even `close`
//! block until the server answers — for minutes or forever. virtlockd makes these calls on its
//! single thread, so one dead mount freezes every VM start on the host. Here the event loop only
//! hands jobs to per-mount pools and reads their results from a channel (woken through a pipe
//! it polls), so a stuck mount stalls only the requests that touch it; Status, List and every
//! other mount keep being served, and a request that waits too long is answered with a Timeout
//! error by the loop's own timer.
//!
//! Mounts are found by the longest mount point in /proc/self/mountinfo that is a prefix of the
//! path's text: computed without touching the file system (a `stat` to learn `st_dev` would
//! itself hang on a dead mount). A symlink that leads to another mount is accounted to the mount
//! of its text; that only costs isolation for that path, never correctness.
//!
//! Each mount has a small pool (grown on demand up to [`MAX_THREADS`]) sharing one job queue, so
//! the disks of one acquire are opened and locked concurrently. Threads are never killed: a
//! thread stuck in the kernel stays stuck until the storage answers, and its job's result is then
//! cleaned up by the loop (a lock nobody waits for any more is dropped again).

use super::Failure;
use super::lease::{HeldKeys, LeaseKey};
use super::lock;
use super::lockfile::{self, OpenError, Opened};
use crate::protocol::{ErrorKind, ErrorReply, LeaseMode, LeaseSpec};
use log::{debug, warn};
use nix::errno::Errno;
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex};

/// Most threads one mount gets: enough to lock a 16-disk VM's disks at once and then some.
pub const MAX_THREADS: usize = 32;
/// How often a lock file replaced under us (virtlockd deleting it) is reopened.
const VERIFY_RETRIES: usize = 8;

/// Identifies a job.
pub type JobId = u64;

/// What a worker does.
pub enum Work {
    /// Open `spec`'s file and lock it, unless its inode is in `held` (then only open it).
    Take { spec: LeaseSpec, held: HeldKeys },
    /// Is the lock on `fd` still ours? Re-issues the same OFD lock on byte 0.
    Probe {
        key: LeaseKey,
        fd: Arc<OwnedFd>,
        mode: LeaseMode,
    },
    /// Close descriptors (closing can block on a dead mount too).
    Close(Vec<OwnedFd>),
}

/// What a `Take` found.
#[derive(Debug)]
pub enum Taken {
    /// Opened and locked.
    Locked(Opened),
    /// Opened, not locked: the inode was already one of our leases when the job started.
    Held(Opened),
    /// Somebody holds a conflicting lock; `busy` says who as far as the kernel can tell.
    Conflict { key: LeaseKey, busy: Failure },
}

/// A finished job.
pub enum Outcome {
    Take(Result<Taken, Failure>),
    Probe {
        key: LeaseKey,
        fd: Arc<OwnedFd>,
        result: Result<(), Errno>,
    },
    Closed,
}

pub struct Done {
    pub id: JobId,
    pub outcome: Outcome,
}

struct Job {
    id: JobId,
    work: Work,
}

struct Pool {
    tx: Sender<Job>,
    rx: Arc<Mutex<Receiver<Job>>>,
    threads: usize,
    /// Jobs queued or running.
    busy: Arc<AtomicUsize>,
}

/// The per-mount pools and the channel their results come back on.
pub struct Storage {
    pools: HashMap<PathBuf, Pool>,
    done_tx: Sender<Done>,
    done_rx: Receiver<Done>,
    wake_r: OwnedFd,
    wake_w: Arc<OwnedFd>,
    next_id: JobId,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("mounts", &self.pools.len())
            .finish()
    }
}

impl Storage {
    pub fn new() -> Result<Storage, String> {
        let (r, w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(|e| format!("cannot create the storage wake-up pipe: {}", e.desc()))?;
        let (done_tx, done_rx) = channel();
        Ok(Storage {
            pools: HashMap::new(),
            done_tx,
            done_rx,
            wake_r: r,
            wake_w: Arc::new(w),
            next_id: 1,
        })
    }

    /// The descriptor the event loop polls: readable when results are waiting.
    pub fn raw_fd(&self) -> RawFd {
        self.wake_r.as_raw_fd()
    }

    /// Queue `work` on the pool of `mount`; returns the job's id.
    pub fn submit(&mut self, mount: &Path, work: Work) -> JobId {
        let id = self.next_id;
        self.next_id += 1;
        let pool = self.pools.entry(mount.to_path_buf()).or_insert_with(|| {
            let (tx, rx) = channel();
            Pool {
                tx,
                rx: Arc::new(Mutex::new(rx)),
                threads: 0,
                busy: Arc::new(AtomicUsize::new(0)),
            }
        });
        let busy = pool.busy.fetch_add(1, Ordering::SeqCst) + 1;
        if busy > pool.threads && pool.threads < MAX_THREADS {
            let rx = Arc::clone(&pool.rx);
            let done = self.done_tx.clone();
            let wake = Arc::clone(&self.wake_w);
            let counter = Arc::clone(&pool.busy);
            let spawned = std::thread::Builder::new()
                .name("lockwardend-io".into())
                .spawn(move || worker(rx, done, wake, counter));
            match spawned {
                Ok(_) => pool.threads += 1,
                Err(e) => warn!("cannot start a storage thread for mount {mount:?}: {e}"),
            }
        }
        if pool.tx.send(Job { id, work }).is_err() {
            warn!("the storage threads of mount {mount:?} are gone; job {id} is lost");
        }
        id
    }

    /// Every result that arrived (drains the wake-up pipe too).
    pub fn collect(&mut self) -> Vec<Done> {
        let mut buf = [0u8; 256];
        while matches!(nix::unistd::read(&self.wake_r, &mut buf), Ok(n) if n > 0) {}
        let mut out = Vec::new();
        loop {
            match self.done_rx.try_recv() {
                Ok(d) => out.push(d),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return out,
            }
        }
    }
}

fn worker(
    rx: Arc<Mutex<Receiver<Job>>>,
    done: Sender<Done>,
    wake: Arc<OwnedFd>,
    busy: Arc<AtomicUsize>,
) {
    loop {
        let job = {
            let Ok(guard) = rx.lock() else { return };
            match guard.recv() {
                Ok(j) => j,
                Err(_) => return,
            }
        };
        let outcome = run(job.work);
        busy.fetch_sub(1, Ordering::SeqCst);
        let sent = done.send(Done {
            id: job.id,
            outcome,
        });
        if sent.is_err() {
            return;
        }
        let _ = nix::unistd::write(wake.as_fd(), b"x");
    }
}

fn run(work: Work) -> Outcome {
    match work {
        Work::Take { spec, held } => Outcome::Take(take(&spec, &held)),
        Work::Probe { key, fd, mode } => {
            let result = lock::try_lock(fd.as_fd(), mode);
            Outcome::Probe { key, fd, result }
        }
        Work::Close(fds) => {
            drop(fds);
            Outcome::Closed
        }
    }
}

fn reply(kind: ErrorKind, spec: &LeaseSpec, message: String) -> Failure {
    Box::new(ErrorReply {
        kind,
        message,
        resource: Some(spec.name.clone()),
        holder: None,
    })
}

/// Open and lock one target (on a worker thread).
fn take(spec: &LeaseSpec, held: &HeldKeys) -> Result<Taken, Failure> {
    use super::text::subject;
    for _ in 0..VERIFY_RETRIES {
        let opened = lockfile::open_target(spec).map_err(|e| match e {
            OpenError::Invalid(m) => reply(ErrorKind::Invalid, spec, m),
            OpenError::Io(m) => reply(ErrorKind::Io, spec, m),
        })?;
        if held.read().is_ok_and(|h| h.contains(&opened.key)) {
            return Ok(Taken::Held(opened));
        }
        if let Err(e) = lock::try_lock(opened.fd.as_fd(), spec.mode) {
            if lock::is_conflict(e) {
                let key = opened.key;
                let busy = super::acquire::kernel_busy(spec, &opened);
                return Ok(Taken::Conflict { key, busy });
            }
            let m = format!(
                "{}: cannot lock it: {}; check that the file system supports POSIX locks \
                 (NFS needs its lock manager, not the 'nolock' mount option)",
                subject(spec.kind, &spec.name, &opened.lock_path),
                e.desc()
            );
            return Err(reply(ErrorKind::Io, spec, m));
        }
        if let Some(dir) = &opened.dir {
            if !lockfile::still_named(dir, opened.key) {
                debug!(
                    "lock file {:?} was replaced or deleted while we locked it; retrying",
                    opened.lock_path
                );
                continue;
            }
        }
        return Ok(Taken::Locked(opened));
    }
    Err(reply(
        ErrorKind::Io,
        spec,
        format!(
            "{}: the lock file was deleted or replaced {VERIFY_RETRIES} times while being locked; \
             another lock manager is racing on it, retry later",
            subject(spec.kind, &spec.name, &lockfile::target_path(&spec.target))
        ),
    ))
}

/// The mount table, read from /proc/self/mountinfo (no file system access).
#[derive(Debug, Default)]
pub struct Mounts {
    points: Vec<PathBuf>,
}

impl Mounts {
    pub fn load() -> Mounts {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        Mounts::parse(&text)
    }

    pub fn parse(text: &str) -> Mounts {
        let mut points: Vec<PathBuf> = text
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|p| PathBuf::from(unescape(p)))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        points.dedup();
        Mounts { points }
    }

    /// The mount point `path` (absolute, as text) lives under: the longest matching prefix.
    pub fn of(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        self.points
            .iter()
            .find(|m| p.starts_with(m))
            .cloned()
            .unwrap_or_else(|| PathBuf::from("/"))
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'\\' {
            if let Some(oct) = b.get(i + 1..i + 4) {
                if oct.iter().all(|d| (b'0'..=b'7').contains(d)) {
                    let v = oct
                        .iter()
                        .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                    out.push(v as u8);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(c);
        i += 1;
    }
    std::ffi::OsString::from_vec(out)
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_and_escapes() {
        let m = Mounts::parse(
            "22 1 0:21 / / rw - ext4 /dev/x rw\n\
             30 22 0:40 / /srv/nfs rw - nfs4 h:/e rw\n\
             31 30 0:41 / /srv/nfs/a\\040b rw - nfs4 h:/f rw\n",
        );
        assert_eq!(m.of("/srv/nfs/x.img"), PathBuf::from("/srv/nfs"));
        assert_eq!(m.of("/srv/nfs/a b/x.img"), PathBuf::from("/srv/nfs/a b"));
        assert_eq!(m.of("/srv/nfsx/y"), PathBuf::from("/"));
        assert_eq!(m.of("/var/lib/x"), PathBuf::from("/"));
    }
}
