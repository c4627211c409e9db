//! Holder records: who holds a lease, readable by every host that shares the storage.
//!
//! Why: the kernel only says *that* byte 0 is locked, and on NFS not even by whom. lockwardend
//! therefore publishes, next to each lock, a small JSON record naming the host (and its boot
//! id), the VM (name, UUID, QEMU pid), the lease mode, since when, a generation number and the
//! lockwarden version. A refused acquire and `lockwarden who` read these records from the
//! shared storage, so host B can say "in use by VM 'web1' on host node-a since ...".
//!
//! Where (the full rules, with the reasons, are in docs/holders.md):
//! - an **exclusive disk lease in lockspace-dir mode**: inside the lock file itself, from byte
//!   0 of its *content* (the lock is a byte-range lock on byte 0 and is independent of the
//!   content; virtlockd ignores content). The publisher also holds an OFD lock on byte 1 of the
//!   lock file: the record's *liveness lock*.
//! - everything else (shared leases, which several hosts hold at once; direct mode, which must
//!   never write into a disk image; `<lease>` key files, which belong to the user): a per-host
//!   side file `<dir>/.lockwarden/<name>@<host>.json` next to the locked file (mode 0600). The
//!   publisher keeps it open for the lease's lifetime and holds an OFD write lock on its byte
//!   0 (the side file's liveness lock); records are written in place (pwrite, padded with
//!   spaces over a longer old record; withdrawing overwrites it with spaces), and readers
//!   retry a record caught half-written under a held liveness lock.
//! - block devices get no record (their locks are host-local anyway).
//!
//! When a record is believed: only while (1) its liveness lock is held, so a crashed or
//! stopped daemon's records die with its descriptors, (2) byte 0 of the locked file carries a
//! lock of the mode the record states, and (3) the record names the inode that is locked now.
//! Anything else is ignored (and reported as ignored, with the reason).
//!
//! Failure to publish never fails an acquire: callers log and continue.

use super::lock::{self, Conflict};
use super::pidfd::comm;
use super::text::{esc, mode_word, subject, utc, what};
use crate::protocol::{Holder, LeaseMode, Owner, ResourceKind};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl, openat, readlink};
use nix::sys::stat::{Mode, SFlag, fstat, mkdirat};
use nix::sys::statfs::{NFS_SUPER_MAGIC, fstatfs};
use nix::sys::uio::{pread, pwrite};
use nix::unistd::{fdatasync, ftruncate};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Value of the `lockwarden_holder` field: the record format version.
pub const FORMAT: u32 = 1;
/// The hidden directory holding side files, next to the locked file.
pub const RECORD_DIR: &str = ".lockwarden";
/// Records larger than this are not lockwarden records.
const MAX_RECORD: usize = 64 * 1024;
/// Byte of an in-file record's lock file that carries the publisher's liveness lock.
const LIVENESS_BYTE: libc::off_t = 1;
/// File names longer than this (the image's base name) are replaced by their SHA-256 in side
/// file names, so `<name>@<host>.json` always fits NAME_MAX (host names are at most 64 bytes).
const MAX_STEM: usize = 128;
/// Tries to read a record that is being rewritten at that moment.
const READ_TRIES: usize = 3;
/// How an empty side file is described (a withdrawn record, or one being written).
const EMPTY: &str = "empty";

/// One VM holding the lease on the publishing host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub name: String,
    pub uuid: String,
    /// QEMU's pid, on the publishing host.
    pub pid: u32,
    /// When this VM joined the lease (seconds since the epoch).
    pub since: u64,
}

impl Vm {
    pub fn of(owner: &Owner, since: u64) -> Vm {
        Vm {
            name: owner.name.clone(),
            uuid: owner.uuid.clone(),
            pid: owner.pid,
            since,
        }
    }
}

/// What one host publishes about one lease (schema in docs/holders.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Record format version, [`FORMAT`].
    pub lockwarden_holder: u32,
    pub host: String,
    /// `/proc/sys/kernel/random/boot_id` of the publishing host.
    pub boot_id: String,
    pub daemon_pid: u32,
    /// lockwarden version of the publisher.
    pub version: String,
    /// Grows with every write by any publisher on the host (microseconds-based).
    pub generation: u64,
    /// What libvirt called the resource (disk path or lease key).
    pub name: String,
    pub kind: ResourceKind,
    pub mode: LeaseMode,
    /// The file actually locked, as the publisher named it.
    pub lock_path: String,
    /// Its inode number: a record naming another inode describes another file.
    pub lock_ino: u64,
    /// When the lease was taken on this host.
    pub since: u64,
    /// The VMs of this host holding it (one for an exclusive lease).
    pub vms: Vec<Vm>,
}

impl Record {
    /// A record for this process (boot id, pid and version filled in); `publish` fills in
    /// `lock_ino` and `generation`.
    pub fn new(
        host: &str,
        kind: ResourceKind,
        name: &str,
        mode: LeaseMode,
        lock_path: &str,
        since: u64,
        vms: Vec<Vm>,
    ) -> Record {
        Record {
            lockwarden_holder: FORMAT,
            host: host.to_string(),
            boot_id: boot_id(),
            daemon_pid: own_pid(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            generation: 0,
            name: name.to_string(),
            kind,
            mode,
            lock_path: lock_path.to_string(),
            lock_ino: 0,
            since,
            vms,
        }
    }
}

/// The locked file a record is about: its open descriptor and how it was named.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    /// An open descriptor of the locked file (the lease's own descriptor when publishing).
    pub fd: BorrowedFd<'a>,
    pub kind: ResourceKind,
    /// The locked file's path (image, or lock file in a lockspace).
    pub lock_path: &'a str,
    /// True for a lock file in a lockspace directory (`LockTarget::Lockspace`).
    pub lockspace: bool,
}

impl Target<'_> {
    /// Exclusive lockspace disk leases keep their record inside the lock file.
    fn in_file(&self, mode: LeaseMode) -> bool {
        self.in_file_possible() && mode == LeaseMode::Exclusive
    }

    fn in_file_possible(&self) -> bool {
        self.lockspace && self.kind == ResourceKind::Disk
    }
}

/// `/proc/sys/kernel/random/boot_id`, or "" when unreadable (read once per process: it only
/// changes with a reboot, and reading it per record was a file read on the event loop).
pub fn boot_id() -> String {
    static BOOT_ID: LazyLock<String> = LazyLock::new(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    });
    BOOT_ID.clone()
}

/// This process's pid (a live re-exec keeps it), without a system call per record.
fn own_pid() -> u32 {
    static PID: LazyLock<u32> = LazyLock::new(std::process::id);
    *PID
}

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// A number larger than every earlier one from this process and, clocks permitting, from
/// earlier processes on this host (it starts from the time in microseconds).
pub fn next_generation() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let mut cur = GENERATION.load(Ordering::Relaxed);
    loop {
        let next = now.max(cur.saturating_add(1));
        match GENERATION.compare_exchange(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => cur = seen,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Byte-range helpers (OFD)

fn flock(l_type: libc::c_int, start: libc::off_t) -> libc::flock {
    libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: 1,
        l_pid: 0,
    }
}

fn ofd_set(fd: BorrowedFd<'_>, l_type: libc::c_int, start: libc::off_t) -> Result<(), Errno> {
    fcntl(fd, FcntlArg::F_OFD_SETLK(&flock(l_type, start))).map(drop)
}

/// Does anybody (other than this descriptor) hold a lock on byte `start`?
fn ofd_held(fd: BorrowedFd<'_>, start: libc::off_t) -> bool {
    let mut fl = flock(libc::F_WRLCK, start);
    fcntl(fd, FcntlArg::F_OFD_GETLK(&mut fl)).is_ok() && i32::from(fl.l_type) != libc::F_UNLCK
}

// ---------------------------------------------------------------------------------------------
// Where side files live

/// Where the side files of a locked file live: `dir` (the `.lockwarden` directory) and the
/// stem `<name>` of `<name>@<host>.json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SideFiles {
    pub dir: String,
    pub stem: String,
}

/// The side-file place of the file open as `fd`: next to the file it really is (symlinks
/// resolved through /proc/self/fd). None for block devices and deleted files.
pub fn side_files(fd: BorrowedFd<'_>) -> Result<Option<SideFiles>, String> {
    let st = fstat(fd).map_err(|e| format!("fstat failed: {}", e.desc()))?;
    side_files_of(fd, is_regular(&st))
}

/// [`side_files`] for a descriptor whose type the caller already knows.
fn side_files_of(fd: BorrowedFd<'_>, regular: bool) -> Result<Option<SideFiles>, String> {
    use std::os::fd::AsRawFd;
    if !regular {
        return Ok(None);
    }
    let real = readlink(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str())
        .map_err(|e| format!("cannot resolve the file's path: {}", e.desc()))?;
    let real = real.to_string_lossy().into_owned();
    if real.ends_with(" (deleted)") || !real.starts_with('/') {
        return Ok(None);
    }
    let (parent, base) = match real.rsplit_once('/') {
        Some((p, b)) if !b.is_empty() => (if p.is_empty() { "/" } else { p }, b),
        _ => return Ok(None),
    };
    Ok(Some(SideFiles {
        dir: format!("{}/{RECORD_DIR}", parent.trim_end_matches('/')),
        stem: stem(base),
    }))
}

/// A side-file place resolved recently for a publish: the same inode opened through the same
/// path again (the VM's next acquire or resume) reuses it instead of resolving the path again
/// (`readlink` of /proc/self/fd was the most expensive call of a record, ~9% of the daemon's CPU
/// in a 16-disk acquire). Kept at most [`RESOLVED_TTL`], at most [`RESOLVED_MAX`] of them. If a
/// directory on the way was moved meanwhile, the record may be written to the old place for
/// that long: readers then find no record for the lock (never a wrong one — a record names its
/// inode, and readers check it).
struct Resolved {
    lock_path: Box<str>,
    side: SideFiles,
    at: std::time::Instant,
}

static RESOLVED: LazyLock<Mutex<HashMap<(u64, u64), Resolved>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));
const RESOLVED_MAX: usize = 256;
const RESOLVED_TTL: Duration = Duration::from_secs(30);

/// [`side_files_of`] through the [`RESOLVED`] cache, for a publish of `lock_path`.
fn side_files_for_publish(
    fd: BorrowedFd<'_>,
    id: Ident,
    lock_path: &str,
) -> Result<Option<SideFiles>, String> {
    let key = (id.dev, id.ino);
    if let Ok(map) = RESOLVED.lock() {
        if let Some(r) = map.get(&key) {
            if &*r.lock_path == lock_path && r.at.elapsed() < RESOLVED_TTL {
                return Ok(Some(r.side.clone()));
            }
        }
    }
    let side = side_files_of(fd, id.regular)?;
    if let (Some(s), Ok(mut map)) = (&side, RESOLVED.lock()) {
        if map.len() >= RESOLVED_MAX {
            map.retain(|_, r| r.at.elapsed() < RESOLVED_TTL);
            if map.len() >= RESOLVED_MAX {
                map.clear();
            }
        }
        map.insert(
            key,
            Resolved {
                lock_path: lock_path.into(),
                side: s.clone(),
                at: std::time::Instant::now(),
            },
        );
    }
    Ok(side)
}

/// `<name>` part of a side file for a locked file of base name `base`.
pub fn stem(base: &str) -> String {
    if base.len() <= MAX_STEM {
        base.to_string()
    } else {
        format!("sha256-{}", crate::plugin::resources::sha256_hex(base))
    }
}

/// A host name as it may appear in a file name: `[A-Za-z0-9._-]`, at most 64 bytes.
pub fn host_label(host: &str) -> String {
    let label: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if label.is_empty() || label == "." || label == ".." {
        "unknown".into()
    } else {
        label
    }
}

/// The host part of side file `file_name` when it is a side file of `stem`.
fn side_file_host<'n>(file_name: &'n str, stem: &str) -> Option<&'n str> {
    let rest = file_name.strip_suffix(".json")?;
    let (s, host) = rest.rsplit_once('@')?;
    (s == stem && !host.is_empty()).then_some(host)
}

// ---------------------------------------------------------------------------------------------
// Publishing

/// A published record; keep it as long as the lease, hand it to [`withdraw`] when the lease
/// goes. Dropping it (daemon exit) closes the side file, which drops its liveness lock, which
/// makes the record stale everywhere at once.
#[derive(Debug)]
pub struct Published {
    place: PublishedPlace,
    pub generation: u64,
    /// Withdrawn: later (older) rewrites that arrive from another storage thread are ignored.
    withdrawn: bool,
    /// Claimed but not written yet (see [`claim_known`]): the record to write.
    pending: Option<Box<[u8]>>,
}

/// A record being kept current by storage threads (the daemon's per-lease handle). Only
/// storage threads lock it (they may block on the storage while holding it); the event loop
/// only passes it around.
pub type Slot = Arc<Mutex<Published>>;

/// A `.lockwarden` directory held open while records in it are published, and whether records
/// written there are flushed (NFS and unknown file systems).
#[derive(Debug)]
struct RecordDir {
    fd: OwnedFd,
    flush: bool,
    /// Its path (the key of [`RECORD_DIRS`] and of idle side files).
    path: String,
}

#[derive(Debug)]
enum PublishedPlace {
    InFile,
    Side {
        dir: Arc<RecordDir>,
        name: String,
        /// The side file, open for the lease's lifetime: it carries the liveness lock and is
        /// rewritten in place.
        file: File,
        /// Length of the record written last (a shorter rewrite truncates the rest).
        len: u64,
    },
    /// Nothing written (block device, or not published yet / publishing failed).
    Nowhere,
}

impl Published {
    /// No record yet; [`republish`] writes one.
    pub fn nowhere() -> Published {
        Published {
            place: PublishedPlace::Nowhere,
            generation: 0,
            withdrawn: false,
            pending: None,
        }
    }

    /// Claimed, record still to be written with [`write_pending`].
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Where the record is, for log lines.
    pub fn describe(&self) -> String {
        match &self.place {
            PublishedPlace::InFile => "inside the lock file".into(),
            PublishedPlace::Side { name, .. } => format!("side file {name:?}"),
            PublishedPlace::Nowhere => "nowhere".into(),
        }
    }
}

/// Open `.lockwarden` directories by path, shared by every record published in them: the
/// directory is opened (and created) once, not per record, and closed when its last record is
/// withdrawn (so no idle mount is kept busy).
static RECORD_DIRS: LazyLock<Mutex<HashMap<String, Weak<RecordDir>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// `.lockwarden` directories that could not be opened or created recently, and why: not tried
/// again for [`RECORD_DIR_RETRY`] (a read-only directory, or a file system without mkdir, would
/// otherwise cost every lease in it the same failing calls).
static RECORD_DIR_FAILED: LazyLock<Mutex<HashMap<String, (std::time::Instant, String)>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));
const RECORD_DIR_RETRY: Duration = Duration::from_secs(10);

fn record_dir(path: &str) -> Result<Arc<RecordDir>, String> {
    if let Ok(dirs) = RECORD_DIRS.lock() {
        if let Some(d) = dirs.get(path).and_then(Weak::upgrade) {
            return Ok(d);
        }
    }
    if let Ok(mut failed) = RECORD_DIR_FAILED.lock() {
        match failed.get(path) {
            Some((at, why)) if at.elapsed() < RECORD_DIR_RETRY => return Err(why.clone()),
            Some(_) => {
                failed.remove(path);
            }
            None => {}
        }
    }
    let opened = open_record_dir(path, true)
        .map_err(|e| format!("cannot open or create {path:?}: {}", e.desc()))
        .and_then(|d| d.ok_or_else(|| format!("{path:?} vanished")));
    let fd = match opened {
        Ok(fd) => fd,
        Err(why) => {
            if let Ok(mut failed) = RECORD_DIR_FAILED.lock() {
                if failed.len() >= 256 {
                    failed.retain(|_, (at, _)| at.elapsed() < RECORD_DIR_RETRY);
                }
                failed.insert(path.to_string(), (std::time::Instant::now(), why.clone()));
            }
            return Err(why);
        }
    };
    let flush = !host_local(fd.as_fd());
    let d = Arc::new(RecordDir {
        fd,
        flush,
        path: path.to_string(),
    });
    if let Ok(mut dirs) = RECORD_DIRS.lock() {
        if dirs.len() >= 256 {
            dirs.retain(|_, w| w.strong_count() > 0);
        }
        dirs.insert(path.to_string(), Arc::downgrade(&d));
    }
    Ok(d)
}

fn forget_record_dir(path: &str) {
    if let Ok(mut dirs) = RECORD_DIRS.lock() {
        dirs.remove(path);
    }
}

/// Publish `record` for the lease open as `target.fd` (which must hold the lease's lock on byte
/// 0), opening (or reusing) the side file. To change a published record, use [`republish`] on
/// it: a second publish of the same side file is refused while the first one holds it.
pub fn publish(target: Target<'_>, record: Record) -> Result<Published, String> {
    let st = fstat(target.fd).map_err(|e| format!("fstat failed: {}", e.desc()))?;
    publish_known(target, record, Ident::of(&st))
}

/// What an `fstat` of the locked file says that a record needs.
#[derive(Clone, Copy, Debug)]
pub struct Ident {
    pub dev: u64,
    pub ino: u64,
    /// A regular file (block devices get no record).
    pub regular: bool,
}

impl Ident {
    fn of(st: &nix::sys::stat::FileStat) -> Ident {
        Ident {
            dev: st.st_dev,
            ino: st.st_ino,
            regular: is_regular(st),
        }
    }
}

fn is_regular(st: &nix::sys::stat::FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG
}

/// [`publish`] for a target the caller took `fstat` of right after opening it.
pub fn publish_known(
    target: Target<'_>,
    mut record: Record,
    id: Ident,
) -> Result<Published, String> {
    record.lock_ino = id.ino;
    if record.generation == 0 {
        record.generation = next_generation();
    }
    let bytes = encode(&record)?;
    if target.in_file(record.mode) {
        publish_in_file(target.fd, &bytes)?;
        return Ok(Published {
            place: PublishedPlace::InFile,
            generation: record.generation,
            withdrawn: false,
            pending: None,
        });
    }
    let Some(side) = side_files_for_publish(target.fd, id, target.lock_path)? else {
        return Ok(Published {
            place: PublishedPlace::Nowhere,
            generation: record.generation,
            withdrawn: false,
            pending: None,
        });
    };
    let place = publish_side(&side, &record.host, &bytes)?;
    Ok(Published {
        place,
        generation: record.generation,
        withdrawn: false,
        pending: None,
    })
}

/// [`publish_known`], but when the record goes into an idle side file (host-local, see
/// [`Idle`]) only *claim* it: take its liveness lock now and leave the record in the result for
/// [`write_pending`], which the daemon calls right after answering. A reader that comes in
/// between finds the liveness lock held over a blank file and reads again 5 ms later (see
/// `read_side_file`), so a refusal still names the VM; the acquire's answer no longer waits for
/// a write per disk. Anything else is published at once.
pub fn claim_known(target: Target<'_>, mut record: Record, id: Ident) -> Result<Published, String> {
    if target.in_file(record.mode) {
        return publish_known(target, record, id);
    }
    let Some(side) = side_files_for_publish(target.fd, id, target.lock_path)? else {
        return publish_known(target, record, id);
    };
    let name = format!("{}@{}.json", side.stem, host_label(&record.host));
    let Some(idle) = unpark(&side.dir, &name) else {
        return publish_known(target, record, id);
    };
    if ofd_set(idle.file.as_fd(), libc::F_WRLCK, 0).is_err() {
        drop(idle);
        return publish_known(target, record, id);
    }
    record.lock_ino = id.ino;
    if record.generation == 0 {
        record.generation = next_generation();
    }
    let bytes = encode(&record)?;
    Ok(Published {
        place: PublishedPlace::Side {
            dir: idle.dir,
            name,
            file: idle.file,
            len: idle.len,
        },
        generation: record.generation,
        withdrawn: false,
        pending: Some(bytes.into_boxed_slice()),
    })
}

/// Write the record [`claim_known`] left pending (nothing when there is none, or the record was
/// withdrawn or rewritten meanwhile). A side file removed while it was idle is replaced by a
/// new one.
pub fn write_pending(p: &mut Published) -> Result<(), String> {
    let Some(bytes) = p.pending.take() else {
        return Ok(());
    };
    if p.withdrawn {
        return Ok(());
    }
    let PublishedPlace::Side {
        dir,
        name,
        file,
        len,
    } = &mut p.place
    else {
        return Ok(());
    };
    let linked = fstat(file.as_fd()).is_ok_and(|st| st.st_nlink > 0);
    if linked {
        *len = write_record(file.as_fd(), &bytes, *len, Tail::Pad, dir.flush)
            .map_err(|e| format!("writing side file {name:?}: {e}"))?;
        return Ok(());
    }
    let (path, name) = (dir.path.clone(), name.clone());
    // Its liveness lock goes with it; the new file gets its own.
    p.place = PublishedPlace::Nowhere;
    p.place = publish_side_named(&path, name, &bytes)?;
    Ok(())
}

/// Rewrite the record `p` in place (same side file, same liveness lock) with `record`, unless
/// `p` was withdrawn or already carries a newer generation (rewrites of one lease may finish on
/// different storage threads in any order). A `p` with no record yet is published afresh.
/// `record.generation` 0 means "now".
pub fn republish(p: &mut Published, target: Target<'_>, mut record: Record) -> Result<(), String> {
    if record.generation == 0 {
        record.generation = next_generation();
    }
    if p.withdrawn || record.generation <= p.generation {
        return Ok(());
    }
    // This record supersedes one still waiting to be written.
    p.pending = None;
    match &mut p.place {
        PublishedPlace::Nowhere => {
            *p = publish(target, record)?;
            Ok(())
        }
        PublishedPlace::InFile => {
            let st = fstat(target.fd).map_err(|e| format!("fstat failed: {}", e.desc()))?;
            record.lock_ino = st.st_ino;
            publish_in_file(target.fd, &encode(&record)?)?;
            p.generation = record.generation;
            Ok(())
        }
        PublishedPlace::Side {
            dir,
            name,
            file,
            len,
            ..
        } => {
            let st = fstat(target.fd).map_err(|e| format!("fstat failed: {}", e.desc()))?;
            record.lock_ino = st.st_ino;
            let bytes = encode(&record)?;
            *len = write_record(file.as_fd(), &bytes, *len, Tail::Pad, dir.flush)
                .map_err(|e| format!("rewriting side file {name:?} failed: {e}"))?;
            p.generation = record.generation;
            Ok(())
        }
    }
}

fn encode(record: &Record) -> Result<Vec<u8>, String> {
    let mut bytes = serde_json::to_vec(record).map_err(|e| e.to_string())?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Is the file open as `fd` on a file system only this host can mount (ext2/3/4, XFS, Btrfs,
/// F2FS, tmpfs, overlayfs)? There every reader sees the page cache, so a record needs no flush
/// to be visible (a flush only serves other NFS clients; durability is not wanted: a record is
/// only believed while its publisher's liveness lock is held). Unknown file systems are flushed.
fn host_local(fd: BorrowedFd<'_>) -> bool {
    use nix::sys::statfs::{
        BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, F2FS_SUPER_MAGIC, OVERLAYFS_SUPER_MAGIC, TMPFS_MAGIC,
        XFS_SUPER_MAGIC,
    };
    fstatfs(fd).is_ok_and(|s| {
        [
            EXT4_SUPER_MAGIC,
            XFS_SUPER_MAGIC,
            BTRFS_SUPER_MAGIC,
            F2FS_SUPER_MAGIC,
            TMPFS_MAGIC,
            OVERLAYFS_SUPER_MAGIC,
        ]
        .contains(&s.filesystem_type())
    })
}

/// What a rewrite does with the rest of a longer earlier record.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tail {
    /// `ftruncate` it away (records inside lock files).
    Cut,
    /// Overwrite it with spaces, which readers skip (side files). Cheaper than truncating: on
    /// ext4 a truncate frees the block and goes through the orphan list and the journal, and
    /// the next record allocates a block again; an overwrite of the same bytes does neither.
    Pad,
}

/// Write `bytes` at offset 0 of `fd`, cut or blank what is left of a longer earlier record
/// (`old_len`), and flush when asked (NFS: other clients see it now, not at close). Returns
/// the length of the file's content now.
fn write_record(
    fd: BorrowedFd<'_>,
    bytes: &[u8],
    old_len: u64,
    tail: Tail,
    flush: bool,
) -> Result<u64, String> {
    let padded;
    let bytes = match usize::try_from(old_len) {
        Ok(old) if tail == Tail::Pad && old > bytes.len() && old <= MAX_RECORD => {
            let mut v = Vec::with_capacity(old);
            v.extend_from_slice(bytes);
            v.resize(old, b' ');
            padded = v;
            &padded[..]
        }
        _ => bytes,
    };
    write_all_at0(fd, bytes)?;
    if old_len > bytes.len() as u64 {
        let len = libc::off_t::try_from(bytes.len()).unwrap_or(0);
        ftruncate(fd, len).map_err(|e| format!("truncating failed: {}", e.desc()))?;
    }
    if flush {
        fdatasync(fd).map_err(|e| format!("flushing failed: {}", e.desc()))?;
    }
    Ok(bytes.len() as u64)
}

/// `pwrite` all of `bytes` at offset 0.
fn write_all_at0(fd: BorrowedFd<'_>, bytes: &[u8]) -> Result<(), String> {
    let mut done = 0;
    while let Some(rest) = bytes.get(done..).filter(|r| !r.is_empty()) {
        let off = libc::off_t::try_from(done).unwrap_or(0);
        match pwrite(fd, rest, off) {
            Ok(0) => return Err("the file accepted no bytes".into()),
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(format!("writing failed: {}", e.desc())),
        }
    }
    Ok(())
}

fn publish_in_file(fd: BorrowedFd<'_>, bytes: &[u8]) -> Result<(), String> {
    ofd_set(fd, libc::F_WRLCK, LIVENESS_BYTE).map_err(|e| {
        format!(
            "cannot take the record's liveness lock on byte {LIVENESS_BYTE}: {}",
            e.desc()
        )
    })?;
    // The lock file may hold an older, longer record (ours or a previous holder's): always cut.
    write_record(fd, bytes, u64::MAX, Tail::Cut, !host_local(fd))
        .map(drop)
        .map_err(|e| format!("the lock file: {e}"))
}

fn open_record_dir(dir: &str, create: bool) -> Result<Option<OwnedFd>, Errno> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    match nix::fcntl::open(dir, flags, Mode::empty()) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::ENOENT) if create => {
            let (parent, name) = dir.rsplit_once('/').unwrap_or(("/", dir));
            let parent = if parent.is_empty() { "/" } else { parent };
            let pfd = nix::fcntl::open(
                parent,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            match mkdirat(&pfd, name, Mode::from_bits_truncate(0o700)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(e),
            }
            openat(&pfd, name, flags, Mode::empty()).map(Some)
        }
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Open this host's side file, creating it only when missing: withdrawn records leave their
/// (empty) file behind, so the next lease of the same file reuses it without touching the
/// directory (creating and deleting a file per lease serialises on the directory's lock and,
/// on ext4, costs an inode allocation that scans for recently deleted inodes).
fn open_side(dir: &RecordDir, name: &str) -> Result<OwnedFd, Errno> {
    let flags = OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    match openat(&dir.fd, name, flags, Mode::empty()) {
        Err(Errno::ENOENT) => openat(
            &dir.fd,
            name,
            flags | OFlag::O_CREAT,
            Mode::from_bits_truncate(0o600),
        ),
        r => r,
    }
}

/// Open (or create) this host's side file, take its liveness lock, write the record in place.
/// No temporary name and no rename: a reader that catches the file empty or half-written sees
/// invalid JSON under a held liveness lock and reads again (see `read_side`).
fn publish_side(side: &SideFiles, host: &str, bytes: &[u8]) -> Result<PublishedPlace, String> {
    let name = format!("{}@{}.json", side.stem, host_label(host));
    if let Some(idle) = unpark(&side.dir, &name) {
        if let Ok(place) = reuse(idle, name.clone(), bytes) {
            return Ok(place);
        }
    }
    publish_side_named(&side.dir, name, bytes)
}

/// [`publish_side`] into side file `name` of record directory `dir_path`, opened afresh.
fn publish_side_named(
    dir_path: &str,
    name: String,
    bytes: &[u8],
) -> Result<PublishedPlace, String> {
    let mut dir = record_dir(dir_path)?;
    let fd = match open_side(&dir, &name) {
        // The cached directory was removed (by hand): open or create it again.
        Err(Errno::ENOENT) => {
            forget_record_dir(dir_path);
            dir = record_dir(dir_path)?;
            open_side(&dir, &name)
        }
        r => r,
    }
    .map_err(|e| format!("cannot open {name:?} in {:?}: {}", dir_path, e.desc()))?;
    let st = fstat(&fd).map_err(|e| format!("fstat of {name:?} failed: {}", e.desc()))?;
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
        return Err(format!(
            "{name:?} in {:?} is not a regular file; remove it",
            dir_path
        ));
    }
    ofd_set(fd.as_fd(), libc::F_WRLCK, 0).map_err(|e| {
        if lock::is_conflict(e) {
            format!(
                "side file {name:?} in {:?} is held by another publisher on this host (two \
                 lockwardend instances with one host name?)",
                dir_path
            )
        } else {
            format!("cannot lock {name:?} in {:?}: {}", dir_path, e.desc())
        }
    })?;
    let old_len = u64::try_from(st.st_size).unwrap_or(u64::MAX);
    let len = write_record(fd.as_fd(), bytes, old_len, Tail::Pad, dir.flush)
        .map_err(|e| format!("writing {name:?} in {:?}: {e}", dir_path))?;
    Ok(PublishedPlace::Side {
        dir,
        name,
        file: File::from(fd),
        len,
    })
}

/// Take the record back (before the lease's lock is dropped): empty the lock file's content and
/// release the liveness byte, or blank the side file (spaces) and close it (which drops its
/// liveness lock). The blank side file stays for the next lease of that file on this host;
/// readers skip blank side files nobody holds.
pub fn withdraw(fd: BorrowedFd<'_>, mut published: Published) -> Result<(), String> {
    withdraw_in_place(fd, &mut published)
}

/// [`withdraw`] through a shared handle: the record stays withdrawn (later rewrites of it are
/// ignored) and its side file is closed.
pub fn withdraw_in_place(fd: BorrowedFd<'_>, published: &mut Published) -> Result<(), String> {
    published.withdrawn = true;
    published.pending = None;
    match std::mem::replace(&mut published.place, PublishedPlace::Nowhere) {
        PublishedPlace::InFile => {
            let r = ftruncate(fd, 0)
                .map_err(|e| format!("emptying the lock file failed: {}", e.desc()));
            let _ = ofd_set(fd, libc::F_UNLCK, LIVENESS_BYTE);
            r
        }
        PublishedPlace::Side {
            dir,
            name,
            file,
            len,
        } => {
            // Blank it before closing (which drops the liveness lock): a reader then finds
            // either our record, or only spaces (read as empty), or a file whose publisher
            // is gone. Spaces rather than a truncate: see `Tail::Pad`.
            let blank = vec![b' '; usize::try_from(len).unwrap_or(0).min(MAX_RECORD)];
            let r = write_all_at0(file.as_fd(), &blank)
                .map_err(|e| format!("cannot blank side file {name:?}: {e}"));
            // On a host-local file system, keep it open for the next lease (see `Idle`); its
            // liveness lock goes now either way.
            if r.is_ok() && !dir.flush && ofd_set(file.as_fd(), libc::F_UNLCK, 0).is_ok() {
                park(dir, name, file, len);
                return r;
            }
            drop(file);
            drop(dir);
            r
        }
        PublishedPlace::Nowhere => Ok(()),
    }
}

/// A withdrawn record's side file on a host-local file system, kept open (blank, its liveness
/// lock released) for [`IDLE_TTL`] so that the file's next lease on this host — a paused VM
/// resuming, a VM restarting — writes its record without opening the file again (`openat`,
/// `fstat` and `close` were a third of a record's cost). Never on NFS or unknown file systems:
/// an open file there keeps the mount busy, and closing can block. After [`IDLE_TTL`] the
/// server's timer closes it, so an unmount finds nothing open for long.
struct Idle {
    dir: Arc<RecordDir>,
    file: File,
    len: u64,
    since: std::time::Instant,
}

/// Idle side files by (record directory, side file name).
static IDLE: LazyLock<Mutex<HashMap<(String, String), Idle>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));
const IDLE_TTL: Duration = Duration::from_secs(10);
const IDLE_MAX: usize = 256;

fn park(dir: Arc<RecordDir>, name: String, file: File, len: u64) {
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

fn unpark(dir: &str, name: &str) -> Option<Idle> {
    IDLE.lock()
        .ok()?
        .remove(&(dir.to_string(), name.to_string()))
}

/// Publish into an idle side file: still linked, liveness lock taken, record written.
fn reuse(idle: Idle, name: String, bytes: &[u8]) -> Result<PublishedPlace, String> {
    let st = fstat(&idle.file).map_err(|e| e.desc().to_string())?;
    if st.st_nlink == 0 {
        return Err("removed meanwhile".into());
    }
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

/// Published records of one daemon, by lease identity (st_dev, st_ino). A convenience for
/// callers that publish synchronously: failures are logged, never returned.
#[derive(Debug, Default)]
pub struct Records {
    map: HashMap<(u64, u64), Published>,
}

impl Records {
    /// Publish (or rewrite in place) the record of lease `id`. Logs and continues on failure.
    pub fn publish(&mut self, id: (u64, u64), target: Target<'_>, record: Record) {
        let name = record.name.clone();
        let result = match self.map.get_mut(&id) {
            Some(p) => republish(p, target, record),
            None => publish(target, record).map(|p| {
                self.map.insert(id, p);
            }),
        };
        match result {
            Ok(()) => log::debug!("holder record for {name:?} published"),
            Err(e) => log::warn!(
                "cannot publish the holder record for {name:?} (the lease itself is held; \
                 other hosts will only see that it is locked): {e}"
            ),
        }
    }

    /// Withdraw the record of lease `id`, whose descriptor is `fd`. Logs on failure.
    pub fn withdraw(&mut self, id: (u64, u64), fd: BorrowedFd<'_>) {
        if let Some(p) = self.map.remove(&id) {
            if let Err(e) = withdraw(fd, p) {
                log::warn!("cannot withdraw a holder record: {e}");
            }
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
// ---------------------------------------------------------------------------------------------
// Reading

/// What holds byte 0 of the locked file, as the kernel reports it to this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KernelLock {
    pub mode: LeaseMode,
    /// Pid of a POSIX lock holder (OFD holders, like lockwardend, report none). On NFS this
    /// may be a process of another client.
    pub pid: Option<i32>,
    /// `/proc/<pid>/comm` of that pid, when it is a local process.
    pub comm: Option<String>,
    /// The file is on NFS (a pid may then belong to another host).
    pub nfs: bool,
}

/// A record that was read and believed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub record: Record,
    /// Where it was read: the side file's path, or the lock file's path for in-file records.
    pub source: String,
}

/// A record that was read and not believed, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ignored {
    pub source: String,
    pub host: Option<String>,
    pub reason: String,
}

/// Everything known about who holds a locked file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// The lock on byte 0, if any.
    pub lock: Option<KernelLock>,
    pub believed: Vec<Seen>,
    pub ignored: Vec<Ignored>,
}

impl Found {
    pub fn records(&self) -> Vec<Record> {
        self.believed.iter().map(|s| s.record.clone()).collect()
    }
}

/// What the kernel says holds byte 0 of `fd` (which must not hold a lock itself).
pub fn kernel_lock(fd: BorrowedFd<'_>) -> Option<KernelLock> {
    let Conflict { pid, mode } = lock::conflict(fd, LeaseMode::Exclusive)?;
    let nfs = fstatfs(fd)
        .map(|s| s.filesystem_type() == NFS_SUPER_MAGIC)
        .unwrap_or(false);
    Some(KernelLock {
        mode,
        pid,
        comm: pid.filter(|_| !nfs).and_then(comm),
        nfs,
    })
}

/// Read and judge every record about the file open as `target.fd`. Never writes or deletes.
pub fn read(target: Target<'_>) -> Found {
    let lock = kernel_lock(target.fd);
    let ino = fstat(target.fd).map(|s| s.st_ino).ok();
    let mut found = Found {
        lock,
        ..Found::default()
    };
    let mut candidates: Vec<(String, Result<Record, String>, bool)> = Vec::new();
    if target.in_file_possible() {
        if let Some(r) = read_in_file(target.fd) {
            let live = ofd_held(target.fd, LIVENESS_BYTE);
            candidates.push((target.lock_path.to_string(), r, live));
        }
    }
    match side_files(target.fd) {
        Ok(Some(side)) => read_side(&side, &mut candidates, &mut found.ignored),
        Ok(None) => {}
        Err(e) => found.ignored.push(Ignored {
            source: target.lock_path.to_string(),
            host: None,
            reason: e,
        }),
    }
    for (source, parsed, live) in candidates {
        let record = match parsed {
            Ok(r) => r,
            Err(reason) => {
                found.ignored.push(Ignored {
                    source,
                    host: None,
                    reason,
                });
                continue;
            }
        };
        match judge(&record, live, ino, found.lock.as_ref()) {
            Ok(()) => found.believed.push(Seen { record, source }),
            Err(reason) => found.ignored.push(Ignored {
                source,
                host: Some(record.host),
                reason,
            }),
        }
    }
    found
        .believed
        .sort_by(|a, b| (a.record.since, &a.record.host).cmp(&(b.record.since, &b.record.host)));
    found
}

fn judge(
    record: &Record,
    live: bool,
    ino: Option<u64>,
    lock: Option<&KernelLock>,
) -> Result<(), String> {
    if record.lockwarden_holder != FORMAT {
        return Err(format!(
            "unknown record format {} (this lockwarden reads {FORMAT})",
            record.lockwarden_holder
        ));
    }
    if !live {
        return Err(
            "stale: its publisher no longer holds the record (lease released, or lockwardend \
             stopped or crashed)"
                .into(),
        );
    }
    if let Some(ino) = ino {
        if record.lock_ino != ino {
            return Err(format!(
                "stale: it describes inode {}, the file is now inode {ino}",
                record.lock_ino
            ));
        }
    }
    match lock {
        None => Err("stale: nothing holds byte 0".into()),
        Some(l) if l.mode != record.mode => Err(format!(
            "stale: byte 0 is held {}, the record says {}",
            mode_word(l.mode),
            mode_word(record.mode)
        )),
        Some(_) => Ok(()),
    }
}

fn parse(bytes: &[u8]) -> Result<Record, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    serde_json::from_str(text.trim_end_matches(['\n', '\0', ' ']))
        .map_err(|e| format!("not a lockwarden holder record: {e}"))
}

/// The record inside a lock file; None when the file is empty (no record).
fn read_in_file(fd: BorrowedFd<'_>) -> Option<Result<Record, String>> {
    let mut last = None;
    for attempt in 0..READ_TRIES {
        let mut buf = vec![0u8; MAX_RECORD];
        let n = match pread(fd, &mut buf, 0) {
            Ok(n) => n,
            Err(e) => return Some(Err(format!("cannot read the lock file: {}", e.desc()))),
        };
        buf.truncate(n);
        if buf.iter().all(|b| *b == 0 || b.is_ascii_whitespace()) {
            return None;
        }
        match parse(&buf) {
            Ok(r) => return Some(Ok(r)),
            Err(e) => last = Some(Err(e)),
        }
        // Perhaps caught mid-rewrite: look again shortly.
        if attempt + 1 < READ_TRIES {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    last
}

fn read_side(
    side: &SideFiles,
    out: &mut Vec<(String, Result<Record, String>, bool)>,
    ignored: &mut Vec<Ignored>,
) {
    let dir = match open_record_dir(&side.dir, false) {
        Ok(Some(d)) => d,
        Ok(None) => return,
        Err(e) => {
            ignored.push(Ignored {
                source: side.dir.clone(),
                host: None,
                reason: format!("cannot open the record directory: {}", e.desc()),
            });
            return;
        }
    };
    let entries = match std::fs::read_dir(&side.dir) {
        Ok(e) => e,
        Err(e) => {
            ignored.push(Ignored {
                source: side.dir.clone(),
                host: None,
                reason: format!("cannot list the record directory: {e}"),
            });
            return;
        }
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| side_file_host(n, &side.stem).is_some())
        .collect();
    names.sort();
    for name in names {
        let source = format!("{}/{name}", side.dir);
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
        let fd = match openat(&dir, name.as_str(), flags, Mode::empty()) {
            Ok(fd) => fd,
            // Withdrawn between listing and opening.
            Err(Errno::ENOENT) => continue,
            Err(e) => {
                out.push((source, Err(format!("cannot open: {}", e.desc())), false));
                continue;
            }
        };
        let (parsed, live) = read_side_file(fd.as_fd());
        if parsed.as_ref().is_err_and(|e| e.starts_with(EMPTY)) && !live {
            // A withdrawn record: its file stays for reuse.
            continue;
        }
        out.push((source, parsed, live));
    }
}

/// One side file's record and whether its publisher holds it. Side files are rewritten in
/// place, so a reader can catch one empty (just created) or torn (a rewrite in progress): when
/// the content is not a record but the publisher holds the file, read again shortly; what is
/// still not a record after that is ignored with the reason, never believed.
fn read_side_file(fd: BorrowedFd<'_>) -> (Result<Record, String>, bool) {
    let mut buf = vec![0u8; MAX_RECORD];
    let mut attempt = 0;
    loop {
        attempt += 1;
        let parsed = match pread(fd, &mut buf, 0) {
            Ok(n) => {
                let bytes = buf.get(..n).unwrap_or_default();
                if bytes.iter().all(|b| *b == 0 || b.is_ascii_whitespace()) {
                    Err(format!("{EMPTY}: being written or withdrawn"))
                } else {
                    parse(bytes)
                }
            }
            Err(e) => return (Err(format!("cannot read: {}", e.desc())), ofd_held(fd, 0)),
        };
        let live = ofd_held(fd, 0);
        if parsed.is_ok() || !live || attempt >= READ_TRIES {
            return (parsed, live);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------------
// Refusals

/// The busy message and holder for a refused acquire of `name`, whose lock target is open as
/// `target.fd` (not locked by this descriptor): reads the records and the kernel's view.
pub struct Refusal {
    pub message: String,
    pub holder: Holder,
    pub found: Found,
}

/// Call when `F_OFD_SETLK` on `target.fd` failed with EAGAIN/EACCES.
pub fn read_for_refusal(target: Target<'_>, name: &str) -> Refusal {
    let found = read(target);
    let records = found.records();
    let message = describe_refusal(
        target.kind,
        name,
        Some(target.lock_path),
        &records,
        found.lock.as_ref(),
    );
    let holder = holder_of(&records, found.lock.as_ref());
    Refusal {
        message,
        holder,
        found,
    }
}

/// The protocol `Holder` for the first believed record (or the kernel's lock alone).
pub fn holder_of(records: &[Record], lock: Option<&KernelLock>) -> Holder {
    let here = boot_id();
    let first = records.iter().find_map(|r| r.vms.first().map(|v| (r, v)));
    match first {
        Some((r, v)) => Holder {
            vm_name: Some(v.name.clone()),
            vm_uuid: Some(v.uuid.clone()),
            host: Some(r.host.clone()),
            pid: (!here.is_empty() && r.boot_id == here)
                .then(|| i32::try_from(v.pid).ok())
                .flatten(),
            since: Some(v.since),
            mode: Some(r.mode),
        },
        None => Holder {
            vm_name: None,
            vm_uuid: None,
            host: None,
            pid: lock.and_then(|l| l.pid),
            since: None,
            mode: lock.map(|l| l.mode),
        },
    }
}

/// How many holders a refusal names before "and N more".
const NAMED: usize = 4;

/// The sentence a refused acquire carries: who holds `name` according to the believed
/// `records`, or, when none, what the kernel says (`lock`). `lock_path`: the locked file, named
/// as "(lock file ...)" when it is not the disk itself (lockspace mode).
pub fn describe_refusal(
    kind: ResourceKind,
    name: &str,
    lock_path: Option<&str>,
    records: &[Record],
    lock: Option<&KernelLock>,
) -> String {
    let w = what(kind);
    let subject = subject(kind, name, lock_path.unwrap_or(name));
    let holders: Vec<(&Record, &Vm)> = records
        .iter()
        .flat_map(|r| r.vms.iter().map(move |v| (r, v)))
        .collect();
    if !holders.is_empty() {
        let mut parts: Vec<String> = holders
            .iter()
            .take(NAMED)
            .map(|(r, v)| {
                format!(
                    "VM '{}' (uuid {}) on host {} since {} ({})",
                    esc(&v.name),
                    esc(&v.uuid),
                    esc(&r.host),
                    utc(v.since),
                    mode_word(r.mode)
                )
            })
            .collect();
        if holders.len() > NAMED {
            parts.push(format!("{} more", holders.len() - NAMED));
        }
        let (them, it) = if holders.len() == 1 {
            ("that VM", "it")
        } else {
            ("those VMs", "them")
        };
        return format!(
            "{subject} is in use by {}; shut {them} down or detach the {w} from {it} first",
            parts.join(", and by ")
        );
    }
    let foreign = "a process that is not lockwarden (virtlockd or another tool)";
    match lock {
        Some(KernelLock {
            pid: Some(p),
            nfs: false,
            comm,
            mode,
        }) => format!(
            "{subject} is locked ({}) by {foreign}: local process {p} ({}); stop that process \
             or make it release the {w} first",
            mode_word(*mode),
            esc(comm.as_deref().unwrap_or("exited"))
        ),
        Some(KernelLock {
            pid: Some(p),
            nfs: true,
            mode,
            ..
        }) => format!(
            "{subject} is locked ({}) by {foreign}: process {p} on this host or another NFS \
             client; if a VM or lock manager there uses it, stop it there first",
            mode_word(*mode)
        ),
        Some(KernelLock { mode, .. }) => format!(
            "{subject} is locked ({}) by another process or host and no lockwarden holder \
             record describes it: {foreign}, or a lockwarden host that published no record; if \
             a VM on another host uses it, stop it there first",
            mode_word(*mode)
        ),
        None => format!(
            "{subject} was locked by another process or host a moment ago and is free now; \
             retry"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn side_file_names() {
        assert_eq!(
            side_file_host("a.qcow2@node-b.json", "a.qcow2"),
            Some("node-b")
        );
        assert_eq!(side_file_host("a@b@node.json", "a@b"), Some("node"));
        assert_eq!(side_file_host("a@b@node.json", "a"), None);
        assert_eq!(side_file_host("a.qcow2@node.json.tmp1.2", "a.qcow2"), None);
        assert_eq!(host_label("node b/../x@y"), "node_b_.._x_y");
        assert_eq!(host_label(""), "unknown");
        let long = "x".repeat(200);
        assert!(stem(&long).starts_with("sha256-"));
        assert_eq!(stem("web1.qcow2"), "web1.qcow2");
    }

    #[test]
    fn a_resolved_place_is_reused_only_for_the_same_path() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        let b = dir.path().join("b.img");
        fs::write(&a, b"").unwrap();
        fs::hard_link(&a, &b).unwrap();
        let place = |p: &std::path::Path| {
            let f = File::open(p).unwrap();
            let id = Ident::of(&fstat(&f).unwrap());
            side_files_for_publish(f.as_fd(), id, p.to_str().unwrap())
                .unwrap()
                .unwrap()
        };
        let first = place(&a);
        assert_eq!(first.stem, "a.img");
        assert_eq!(place(&a), first);
        // The same inode through its other name: resolved again, its own place.
        assert_eq!(place(&b).stem, "b.img");
        assert_eq!(place(&a).stem, "a.img");
    }

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

    #[test]
    fn generations_grow() {
        let a = next_generation();
        let b = next_generation();
        assert!(b > a);
    }
}
