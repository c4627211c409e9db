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
//! The longest mount point in /proc/self/mountinfo that is a prefix of the path's text only
//! picks where to start; it never decides that work may run inline on the event loop (a
//! symlink or `..` can lead from a local directory into NFS). Inline work needs proof that it
//! stays on a host-local file system: before an open by path, `openat2(RESOLVE_NO_XDEV)` from
//! the local mount's root (which fails, without touching the other mount, when the path leaves
//! it); for work on an opened file, the `st_dev` of what was opened. Everything unproven —
//! path resolution included — runs on a worker ([`Mounts`]).
//!
//! Each mount has a small pool (grown on demand up to [`MAX_THREADS`]) sharing one job queue, so
//! the disks of one acquire are opened and locked concurrently. Threads are never killed: a
//! thread stuck in the kernel stays stuck until the storage answers, and its job's result is then
//! cleaned up by the loop (a lock nobody waits for any more is dropped again).

use super::Failure;
use super::error::DaemonError;
use super::holder::{self, Published, Record, Slot};
use super::lease::{HeldKeys, LeaseKey, LockDir, Seen};
use super::lock;
use super::lockfile::{self, Disposal, OpenError, Opened};
use crate::protocol::{ErrorKind, LeaseMode, LeaseSpec, ResourceKind};
use log::{debug, warn};
use nix::errno::Errno;
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex};

/// Most threads one mount gets: enough to lock a 16-disk VM's disks at once and then some.
pub const MAX_THREADS: usize = 32;
/// Most threads a host-local file system (ext4, XFS, Btrfs, F2FS, tmpfs, overlayfs) gets: its
/// calls take microseconds and never wait on a network, so more threads than CPUs only add
/// wake-ups and context switches (measured: a 16-disk acquire on ext4 spent a quarter of its
/// time switching between 16 workers on 2 CPUs).
pub fn local_threads() -> usize {
    // Computed once: available_parallelism reads the cgroup files every time.
    static N: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
        std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4))
    });
    *N
}
/// File system types `local_threads` applies to.
const LOCAL_TYPES: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "tmpfs", "overlay",
];
/// How often a lock file replaced under us (virtlockd deleting it) is reopened.
const VERIFY_RETRIES: usize = 8;

/// Identifies a job.
pub type JobId = u64;

/// How long a worker that opened an inode being disposed of waits for that disposal.
const DISPOSAL_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What a worker does.
pub enum Work {
    /// Open `spec`'s file and lock it, unless its inode is in `held` (then only open it). When
    /// locked and `record` is given, publish the holder record right there (same thread, before
    /// the result goes back), so a refusal right after the answer names the VM.
    Take {
        spec: LeaseSpec,
        held: HeldKeys,
        record: Option<Record>,
        /// Runs inline on the event loop (a path proven host-local): only claim the record
        /// (it is written after the answer, `holder::claim_known`), and on a conflict do not
        /// read other hosts' records here — `Busy::Unread` hands the file back for a
        /// `Work::Describe` on a worker.
        defer: bool,
    },
    /// Read who holds a file a `Take` found locked by somebody else (other hosts' records on
    /// shared storage: never on the event loop).
    Describe {
        spec: LeaseSpec,
        opened: Box<Opened>,
    },
    /// (Re)write a lease's holder record through its slot.
    Publish {
        fd: Arc<OwnedFd>,
        kind: ResourceKind,
        lock_path: String,
        lockspace: bool,
        slot: Slot,
        record: Record,
    },
    /// Give a lease up (its last owner left, the keeper already let go): withdraw its holder
    /// record, delete its lock file when asked, unlock, close.
    Dispose(Box<Disposing>),
    /// Is the lock on `fd` still ours? Re-issues the same OFD lock on byte 0.
    Probe {
        key: LeaseKey,
        fd: Arc<OwnedFd>,
        mode: LeaseMode,
    },
    /// Close descriptors (closing can block on a dead mount too).
    Close(Vec<OwnedFd>),
    /// Prove that the storage server behind a mount answers (heartbeat.rs): write and fsync
    /// the host's heartbeat file there, or re-request a lease's lock when no file can be kept.
    Heartbeat(Box<super::beat::Beat>),
}

/// A lease on its way out (see `Work::Dispose`).
pub struct Disposing {
    pub key: LeaseKey,
    pub fd: Arc<OwnedFd>,
    pub dir: Option<LockDir>,
    pub mode: LeaseMode,
    pub delete: bool,
    pub slot: Option<Slot>,
    /// Told when the disposal is done (workers waiting to open this inode go on).
    pub held: Option<HeldKeys>,
    /// For the log line when it is done.
    pub label: String,
}

/// What a `Take` found.
#[derive(Debug)]
pub enum Taken {
    /// Opened and locked; the holder record's outcome when one was asked for.
    Locked(Opened, Option<Result<Published, String>>),
    /// Opened, not locked: the inode was already one of our leases when the job started.
    Held(Opened),
    /// Somebody holds a conflicting lock; `busy` says who as far as the kernel can tell.
    Conflict { key: LeaseKey, busy: Busy },
}

/// Who holds a file a `Take` could not lock.
#[derive(Debug)]
pub enum Busy {
    /// The refusal, holder named as far as the records and the kernel tell.
    Told(Failure),
    /// Not read yet (the `Take` ran on the event loop): the opened file, for `Work::Describe`.
    Unread(Box<Opened>),
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
    /// A heartbeat came back (`Ok`: the server answered).
    Heartbeat(Box<super::beat::Beaten>),
    Published {
        label: String,
        result: Result<(), String>,
    },
    Disposed {
        label: String,
        disposal: Disposal,
        /// Withdrawing the holder record failed (the lease was still dropped).
        withdraw: Result<(), String>,
    },
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
    /// Results of jobs run inline on the event loop (host-local mounts), handed out by the
    /// next `collect` like a worker's.
    inline: Vec<Done>,
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
            inline: Vec::new(),
        })
    }

    /// The descriptor the event loop polls: readable when results are waiting.
    pub fn raw_fd(&self) -> RawFd {
        self.wake_r.as_raw_fd()
    }

    /// Queue `work` on the pool of `mount` (at most `max_threads` threads); returns the job's id.
    /// With `inline` (a host-local file system, whose calls take microseconds and cannot hang
    /// like NFS or FUSE), the work runs right here on the event loop instead and its result
    /// waits for the next `collect`, exactly as a worker's would: no thread hand-off, no wake-up.
    pub fn submit(&mut self, mount: &Path, max_threads: usize, inline: bool, work: Work) -> JobId {
        let id = self.next_id;
        self.next_id += 1;
        if inline {
            let outcome = run(work);
            self.inline.push(Done { id, outcome });
            return id;
        }
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
        if busy > pool.threads && pool.threads < max_threads.clamp(1, MAX_THREADS) {
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

    /// Whether results of inline jobs wait for `collect` (the event loop hands them out before
    /// it polls again).
    pub fn has_inline(&self) -> bool {
        !self.inline.is_empty()
    }

    /// Every result that arrived (drains the wake-up pipe too).
    pub fn collect(&mut self) -> Vec<Done> {
        let mut out = std::mem::take(&mut self.inline);
        if !out.is_empty() {
            // Inline results only: the workers' come when the wake-up pipe says so.
            return out;
        }
        let mut buf = [0u8; 256];
        while matches!(nix::unistd::read(&self.wake_r, &mut buf), Ok(n) if n > 0) {}
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
        Work::Take {
            spec,
            held,
            record,
            defer,
        } => Outcome::Take(take(&spec, &held, record, defer)),
        Work::Describe { spec, opened } => {
            let busy = kernel_busy(&spec, &opened);
            Outcome::Take(Ok(Taken::Conflict {
                key: opened.key,
                busy: Busy::Told(busy),
            }))
        }
        Work::Publish {
            fd,
            kind,
            lock_path,
            lockspace,
            slot,
            record,
        } => {
            let target = holder::Target {
                fd: fd.as_fd(),
                kind,
                lock_path: &lock_path,
                lockspace,
            };
            let result = match slot.lock() {
                Ok(mut p) => holder::republish(&mut p, target, record),
                Err(_) => Err("its record handle is poisoned".into()),
            };
            Outcome::Published {
                label: lock_path,
                result,
            }
        }
        Work::Dispose(d) => dispose(*d),
        Work::Probe { key, fd, mode } => {
            let result = lock::try_lock(fd.as_fd(), mode);
            Outcome::Probe { key, fd, result }
        }
        Work::Close(fds) => {
            drop(fds);
            Outcome::Closed
        }
        Work::Heartbeat(beat) => Outcome::Heartbeat(Box::new(super::beat::beat(*beat))),
    }
}

/// Busy because the kernel refused: another process or host holds byte 0. Name the holder from
/// the holder records on the shared storage, or say what the kernel knows (a local pid).
fn kernel_busy(spec: &LeaseSpec, opened: &Opened) -> Failure {
    let target = holder::Target {
        fd: opened.fd.as_fd(),
        kind: spec.kind,
        lock_path: &opened.lock_path,
        lockspace: opened.dir.is_some(),
    };
    let r = holder::read_for_refusal(target, &spec.name);
    Box::new(DaemonError::busy(r.message, Some(r.holder)).about(&spec.name))
}

fn dispose(d: Disposing) -> Outcome {
    let Disposing {
        key,
        fd,
        dir,
        mode,
        delete,
        slot,
        held,
        label,
    } = d;
    let withdraw = match slot {
        Some(slot) => match slot.lock() {
            Ok(mut p) => holder::withdraw_in_place(fd.as_fd(), &mut p),
            Err(_) => Err("its record handle is poisoned".into()),
        },
        None => Ok(()),
    };
    let disposal = lockfile::dispose(key, &fd, dir.as_ref(), mode, delete);
    drop(dir);
    drop(fd);
    if let Some(h) = held {
        h.disposed(key);
    }
    Outcome::Disposed {
        label,
        disposal,
        withdraw,
    }
}

/// Open and lock one target (on a worker thread); publish `record` once locked.
fn take(
    spec: &LeaseSpec,
    held: &HeldKeys,
    record: Option<Record>,
    defer: bool,
) -> Result<Taken, Failure> {
    use crate::text::subject;
    for _ in 0..VERIFY_RETRIES {
        let opened = lockfile::open_target(spec).map_err(|e| match e {
            OpenError::Invalid(m) => DaemonError::on(ErrorKind::Invalid, spec, m),
            OpenError::Io(m) => DaemonError::on(ErrorKind::Io, spec, m),
        })?;
        if held.check(&opened.key, DISPOSAL_WAIT) == Seen::Held {
            return Ok(Taken::Held(opened));
        }
        if let Err(e) = lock::try_lock(opened.fd.as_fd(), spec.mode) {
            if lock::is_conflict(e) {
                let key = opened.key;
                let busy = if defer {
                    Busy::Unread(Box::new(opened))
                } else {
                    Busy::Told(kernel_busy(spec, &opened))
                };
                return Ok(Taken::Conflict { key, busy });
            }
            let m = format!(
                "{}: cannot lock it: {}; check that the file system supports POSIX locks \
                 (NFS needs its lock manager, not the 'nolock' mount option)",
                subject(spec.kind, &spec.name, &opened.lock_path),
                e.desc()
            );
            return Err(DaemonError::on(ErrorKind::Io, spec, m));
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
        let published = record.map(|mut r| {
            r.lock_path.clone_from(&opened.lock_path);
            let target = holder::Target {
                fd: opened.fd.as_fd(),
                kind: spec.kind,
                lock_path: &opened.lock_path,
                lockspace: opened.dir.is_some(),
            };
            let id = holder::Ident {
                dev: opened.key.dev,
                ino: opened.key.ino,
                regular: opened.regular,
            };
            if defer {
                holder::claim_known(target, r, id)
            } else {
                holder::publish_known(target, r, id)
            }
        });
        return Ok(Taken::Locked(opened, published));
    }
    Err(DaemonError::on(
        ErrorKind::Io,
        spec,
        format!(
            "{}: the lock file was deleted or replaced {VERIFY_RETRIES} times while being locked; \
             another lock manager is racing on it, retry later",
            subject(spec.kind, &spec.name, &lockfile::target_path(&spec.target))
        ),
    ))
}

/// The mount table, read from /proc/self/mountinfo (no file system access), and what is known
/// about where lease paths really lead.
///
/// Where a path *really* lives is never decided from its text alone: a symlink
/// (`/var/lib/libvirt/images -> /srv/nfs/images`) or a `..` makes the text name another mount
/// than the one the kernel reaches. Storage work runs inline on the event loop only when it is
/// proven to stay on a host-local file system:
/// - before an open by path ([`Mounts::place`]): the path is resolved from the root of the
///   local mount its text names with `openat2(RESOLVE_NO_XDEV)`, which fails instead of
///   entering any other mount (so it never waits on a network file system); only a path that
///   resolves entirely inside that local file system is opened inline;
/// - for work on an opened lease ([`Mounts::of`]): the mount is the one whose device is the
///   `st_dev` of what was opened ([`Mounts::note`]); a path with no such note is "unresolved"
///   and goes to a worker.
#[derive(Debug, Default)]
pub struct Mounts {
    points: Vec<PathBuf>,
    /// Mount points of host-local file system types.
    local: std::collections::HashSet<PathBuf>,
    /// Local mount points whose every ancestor mount is local too: their root can be opened on
    /// the event loop.
    inline_ok: std::collections::HashSet<PathBuf>,
    /// Mount point of each device number (`st_dev`), from mountinfo's major:minor.
    by_dev: HashMap<u64, PathBuf>,
    /// Root descriptors (O_PATH) of `inline_ok` mounts, opened when first needed; None when it
    /// could not be opened or is not a local file system after all (never inline there).
    roots: HashMap<PathBuf, Option<OwnedFd>>,
    /// Where lease paths were found to lead: the mount of the `st_dev` of what was opened.
    /// Kept across re-reads of the table (an open file never changes file system).
    noted: HashMap<String, PathBuf>,
    /// /proc/self/mountinfo kept open: poll(2) reports POLLPRI on it when the mount table
    /// changed, so `refresh` re-reads it only then.
    watch: Option<std::fs::File>,
}

/// Most paths whose real mount is remembered; beyond that the notes start over (a path without
/// a note just goes to a worker).
const MAX_NOTED: usize = 65_536;

/// The pool key of paths whose real mount is not known, under the mount their text names.
fn unresolved(text_mount: &Path) -> PathBuf {
    PathBuf::from(format!(
        "{} (or wherever symlinks or .. in the path lead)",
        text_mount.display()
    ))
}

impl Mounts {
    pub fn load() -> Mounts {
        use std::io::Read;
        let mut watch = std::fs::File::open("/proc/self/mountinfo").ok();
        // Bytes, not a String: a mount point whose name is not UTF-8 (anyone may mount one)
        // made read_to_string fail and left the whole table empty, every path on "/".
        let mut bytes = Vec::new();
        if let Some(f) = watch.as_mut() {
            if f.read_to_end(&mut bytes).is_err() {
                bytes.clear();
                watch = None;
            }
        }
        let mut m = Mounts::parse(&String::from_utf8_lossy(&bytes));
        m.watch = watch;
        m
    }

    /// Re-read the table if it changed since it was read (one `poll` when it did not).
    pub fn refresh(&mut self) {
        let changed = match &self.watch {
            Some(f) => {
                let p = libc::pollfd {
                    fd: f.as_raw_fd(),
                    events: libc::POLLPRI,
                    revents: 0,
                };
                let n = super::sys::poll_one(p.fd, p.events, 0).map_or(-1, i32::from);
                n != 0 || p.revents != 0
            }
            None => true,
        };
        if changed {
            let noted = std::mem::take(&mut self.noted);
            *self = Mounts::load();
            self.noted = noted;
        }
    }

    pub fn parse(text: &str) -> Mounts {
        let mut points: Vec<PathBuf> = Vec::new();
        let mut local = std::collections::HashSet::new();
        let mut by_dev = HashMap::new();
        for l in text.lines() {
            let Some(p) = l.split(' ').nth(4) else {
                continue;
            };
            let p = PathBuf::from(unescape(p));
            // The file system type is the first field after the " - " separator; a later
            // mount on the same point hides an earlier one.
            let fstype = l.split(" - ").nth(1).and_then(|r| r.split(' ').next());
            if fstype.is_some_and(|t| LOCAL_TYPES.contains(&t)) {
                local.insert(p.clone());
            } else {
                local.remove(&p);
            }
            let dev = l
                .split(' ')
                .nth(2)
                .and_then(|d| d.split_once(':'))
                .and_then(|(major, minor)| {
                    Some(nix::sys::stat::makedev(
                        major.parse().ok()?,
                        minor.parse().ok()?,
                    ))
                });
            if let Some(dev) = dev {
                by_dev.insert(dev, p.clone());
            }
            points.push(p);
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        points.dedup();
        let inline_ok = local
            .iter()
            .filter(|m| {
                points
                    .iter()
                    .filter(|a| m.starts_with(a))
                    .all(|a| local.contains(a))
            })
            .cloned()
            .collect();
        Mounts {
            points,
            local,
            inline_ok,
            by_dev,
            roots: HashMap::new(),
            noted: HashMap::new(),
            watch: None,
        }
    }

    /// How many storage threads the pool of mount point `mount` may have.
    pub fn threads(&self, mount: &Path) -> usize {
        if self.local.contains(mount) {
            local_threads()
        } else {
            MAX_THREADS
        }
    }

    /// The mount point of device `dev` (an `st_dev`), when mountinfo lists it, and whether its
    /// file system type is host-local.
    pub fn of_dev(&self, dev: u64) -> Option<(&PathBuf, bool)> {
        self.by_dev.get(&dev).map(|m| (m, self.local.contains(m)))
    }

    /// Whether the mount `path`'s text names is host-local (for devices mountinfo does not
    /// list: btrfs subvolumes, overlayfs layers).
    pub fn text_is_local(&self, path: &str) -> bool {
        self.local.contains(&self.text_mount(path))
    }

    /// Whether mount point `mount` has a host-local file system type (its storage work may run
    /// inline on the event loop). Only keys returned by [`Mounts::of`] or [`Mounts::place`]
    /// for a proven path name a local mount; an unresolved path's key never does.
    pub fn is_local(&self, mount: &Path) -> bool {
        self.local.contains(mount)
    }

    /// The mount a lease's `path` was found on when it was opened ([`Mounts::note`]), for work
    /// on its open descriptor; a path without a note gets an "unresolved" key under the mount
    /// its text names, which is never local.
    pub fn of(&self, path: &str) -> PathBuf {
        if let Some(m) = self.noted.get(path) {
            return m.clone();
        }
        let text = self.text_mount(path);
        if self.local.contains(&text) {
            unresolved(&text)
        } else {
            text
        }
    }

    /// Where to open `path` (by path, before anything of it is open): the mount key, and
    /// whether it may be opened inline on the event loop — only when `path` (or, while it does
    /// not exist yet, its directory) resolves without leaving the host-local file system its
    /// text names. Anything else runs on a worker, path resolution included.
    pub fn place(&mut self, path: &str) -> (PathBuf, bool) {
        let text = self.text_mount(path);
        if self.inline_ok.contains(&text) && self.stays_local(path, &text) {
            return (text, true);
        }
        match self.noted.get(path) {
            Some(m) if !self.local.contains(m) => (m.clone(), false),
            _ if self.local.contains(&text) => (unresolved(&text), false),
            _ => (text, false),
        }
    }

    /// Remember where the file opened as `path` really is: `proven`, the local mount an inline
    /// open was proven to stay on ([`Mounts::place`]), or else the mount of device `dev` (its
    /// `st_dev`; btrfs subvolumes and overlayfs report devices mountinfo does not list, which
    /// leaves the path unresolved: worker threads). Later work on its descriptor goes there. A
    /// path once found on a network mount stays off the event loop while it is remembered (a
    /// lease of the same name may still be open there).
    pub fn note(&mut self, path: &str, dev: u64, proven: Option<&Path>) {
        let mount = match (proven, self.by_dev.get(&dev)) {
            (Some(m), _) => m.to_path_buf(),
            (None, Some(m)) => m.clone(),
            (None, None) => unresolved(&self.text_mount(path)),
        };
        if let Some(old) = self.noted.get(path) {
            let network = !self.local.contains(old) && self.points.contains(old);
            if network || *old == mount {
                return;
            }
        }
        if self.noted.len() >= MAX_NOTED {
            self.noted.clear();
        }
        self.noted.insert(path.to_string(), mount);
    }

    /// Does `path` resolve, from the root of local mount `mount`, without entering any other
    /// mount? (`openat2` with `RESOLVE_NO_XDEV`: crossing into another mount, through a symlink,
    /// `..` or a mount point below, fails with EXDEV before anything of that mount is looked
    /// up.) A missing final name is judged by its directory (the lock file may be created).
    fn stays_local(&mut self, path: &str, mount: &Path) -> bool {
        let Some(root) = self.root(mount) else {
            return false;
        };
        let rel = match mount.to_str() {
            Some(m) if under(path, m) => path
                .get(m.trim_end_matches('/').len()..)
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_string(),
            _ => match Path::new(path).strip_prefix(mount) {
                Ok(r) => r.to_string_lossy().into_owned(),
                Err(_) => return false,
            },
        };
        if rel.is_empty() {
            return false;
        }
        match resolve_beneath(root, &rel, false) {
            Ok(()) => true,
            Err(Errno::ENOENT) => {
                let dir = match rel.rsplit_once('/') {
                    Some((d, _)) if !d.is_empty() => d,
                    _ => ".",
                };
                resolve_beneath(root, dir, true).is_ok()
            }
            Err(_) => false,
        }
    }

    /// The root descriptor of local mount `mount`, opened on first use (its ancestors are local
    /// mounts, so the open cannot wait on a network) and checked with `fstatfs`.
    fn root(&mut self, mount: &Path) -> Option<BorrowedFd<'_>> {
        let fd = self.roots.entry(mount.to_path_buf()).or_insert_with(|| {
            let flags = nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC;
            let fd = nix::fcntl::open(mount, flags, nix::sys::stat::Mode::empty()).ok()?;
            let fs = nix::sys::statfs::fstatfs(&fd).ok()?;
            LOCAL_MAGIC
                .contains(&(fs.filesystem_type().0 as i64))
                .then_some(fd)
        });
        fd.as_ref().map(|f| f.as_fd())
    }

    /// The mount point `path` (absolute, as text) lives under: the longest matching prefix.
    /// A plain path (no `//`, `.` or `..` component) is compared as bytes; `Path::starts_with`
    /// splits both sides into components for every mount point, which was ~3% of the daemon's
    /// CPU in a 16-disk acquire.
    fn text_mount(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        let plain = !(path.contains("//")
            || path.contains("/./")
            || path.contains("/../")
            || path.ends_with("/.")
            || path.ends_with("/.."));
        self.points
            .iter()
            .find(|m| match (plain, m.to_str()) {
                (true, Some(m)) => under(path, m),
                _ => p.starts_with(m),
            })
            .cloned()
            .unwrap_or_else(|| PathBuf::from("/"))
    }
}

/// `statfs` types of [`LOCAL_TYPES`]: ext2/3/4, XFS, Btrfs, F2FS, tmpfs, overlayfs.
const LOCAL_MAGIC: &[i64] = &[
    0xEF53,
    0x5846_5342,
    0x9123_683E,
    0xF2F5_2010,
    0x0102_1994,
    0x794C_7630,
];

/// `openat2(root, rel, O_PATH, RESOLVE_NO_XDEV | RESOLVE_NO_MAGICLINKS)`: Ok when `rel`
/// resolves (symlinks followed) without leaving the mount of `root`. ENOSYS (kernels before
/// 5.6) and every other failure mean "not proven".
fn resolve_beneath(root: BorrowedFd<'_>, rel: &str, dir: bool) -> Result<(), Errno> {
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    const RESOLVE_NO_XDEV: u64 = 0x01;
    const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
    let c = std::ffi::CString::new(rel).map_err(|_| Errno::EINVAL)?;
    let mut flags = libc::O_PATH | libc::O_CLOEXEC;
    if dir {
        flags |= libc::O_DIRECTORY;
    }
    let how = OpenHow {
        flags: u64::try_from(flags).map_err(|_| Errno::EINVAL)?,
        mode: 0,
        resolve: RESOLVE_NO_XDEV | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 reads a NUL-terminated path and an open_how of the given size, both
    // alive for the call; the descriptor it returns is owned right below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    let fd = RawFd::try_from(fd).map_err(|_| Errno::EBADF)?;
    // SAFETY: a descriptor openat2 just returned, owned by nobody else.
    drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    Ok(())
}

/// Is plain absolute `path` the mount point `mount` or below it?
fn under(path: &str, mount: &str) -> bool {
    let mount = mount.trim_end_matches('/');
    mount.is_empty()
        || path
            .strip_prefix(mount)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
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
        assert_eq!(m.text_mount("/srv/nfs/x.img"), PathBuf::from("/srv/nfs"));
        assert_eq!(
            m.text_mount("/srv/nfs/a b/x.img"),
            PathBuf::from("/srv/nfs/a b")
        );
        assert_eq!(m.text_mount("/srv/nfsx/y"), PathBuf::from("/"));
        assert_eq!(m.text_mount("/var/lib/x"), PathBuf::from("/"));
        // Paths that are not plain are compared by components.
        assert_eq!(m.text_mount("/srv//nfs/x.img"), PathBuf::from("/srv/nfs"));
        assert_eq!(m.text_mount("/srv/./nfs/x.img"), PathBuf::from("/srv/nfs"));
        assert_eq!(m.text_mount("/srv/nfs"), PathBuf::from("/srv/nfs"));
        assert_eq!(m.text_mount("/srv/nfs/"), PathBuf::from("/srv/nfs"));
        assert_eq!(m.threads(Path::new("/")), local_threads());
        assert_eq!(m.threads(Path::new("/srv/nfs")), MAX_THREADS);
        // Work on an opened file goes by its device, never by the path's text alone.
        assert!(!m.is_local(&m.of("/var/lib/x")));
        assert_eq!(m.of("/srv/nfs/x.img"), PathBuf::from("/srv/nfs"));
    }

    #[test]
    fn noted_devices_decide_the_mount() {
        let mut m = Mounts::parse(
            "22 1 8:1 / / rw - ext4 /dev/x rw\n\
             30 22 0:40 / /srv/nfs rw - nfs4 h:/e rw\n",
        );
        let nfs = nix::sys::stat::makedev(0, 40);
        let ext4 = nix::sys::stat::makedev(8, 1);
        // A symlink from a local directory into NFS: the text says "/", the device says NFS.
        m.note("/var/lib/images/web.img", nfs, None);
        assert_eq!(m.of("/var/lib/images/web.img"), PathBuf::from("/srv/nfs"));
        assert!(!m.is_local(&m.of("/var/lib/images/web.img")));
        // Once seen on a network mount it stays off the event loop.
        m.note("/var/lib/images/web.img", ext4, None);
        assert!(!m.is_local(&m.of("/var/lib/images/web.img")));
        m.note("/var/lib/images/local.img", ext4, None);
        assert!(m.is_local(&m.of("/var/lib/images/local.img")));
        // A device mountinfo does not list (btrfs subvolume): unresolved, unless the open was
        // proven local.
        m.note("/var/lib/images/sub.img", 12345, None);
        assert!(!m.is_local(&m.of("/var/lib/images/sub.img")));
        m.note("/var/lib/images/sub.img", 12345, Some(Path::new("/")));
        assert!(m.is_local(&m.of("/var/lib/images/sub.img")));
        // Local mounts under a network mount are never opened from the event loop.
        let m = Mounts::parse(
            "22 1 8:1 / / rw - ext4 /dev/x rw\n\
             30 22 0:40 / /srv/nfs rw - nfs4 h:/e rw\n\
             31 30 0:41 / /srv/nfs/t rw - tmpfs t rw\n",
        );
        assert!(m.inline_ok.contains(Path::new("/")));
        assert!(!m.inline_ok.contains(Path::new("/srv/nfs/t")));
    }

    #[test]
    fn only_paths_that_stay_on_the_local_mount_are_inline() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Mounts::load();
        let base = dir.path().to_str().unwrap().to_string();
        let (_, inline) = m.place(&format!("{base}/missing.img"));
        let text = m.text_mount(&base);
        if !m.inline_ok.contains(&text) {
            // The test directory is not on a local file system here: nothing to prove.
            assert!(!inline);
            return;
        }
        assert!(inline, "a missing file in a local directory");
        std::fs::write(dir.path().join("a.img"), b"").unwrap();
        assert!(m.place(&format!("{base}/a.img")).1);
        // A symlink out of the mount (to /proc, another file system): never inline.
        std::os::unix::fs::symlink("/proc/self/status", dir.path().join("out.img")).unwrap();
        let (key, inline) = m.place(&format!("{base}/out.img"));
        assert!(!inline);
        assert!(!m.is_local(&key));
    }
}
