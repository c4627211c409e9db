//! Publishing, rewriting and withdrawing records.

use super::*;
use crate::daemon::lock;
use crate::protocol::LeaseMode;
use crate::untrusted::{self, Access, OpenFailure};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, fstat, fstatat, mkdirat};
use nix::sys::statfs::fstatfs;
use nix::sys::uio::pwrite;
use nix::unistd::{fdatasync, ftruncate};
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

/// A published record; keep it as long as the lease, hand it to [`withdraw`] (with the lease's
/// descriptor) when the lease goes. It holds no descriptor of its own but the shared
/// `.lockwarden` directory: a side-file record is alive while the lease's open file description
/// holds the liveness byte of this host in the locked file (docs/holders.md, section 3), so it
/// lives and dies with the lease itself (and survives a daemon crash with the keeper's
/// duplicate of that description, like the lease).
#[derive(Debug)]
pub struct Published {
    pub(super) place: PublishedPlace,
    pub generation: u64,
    /// Withdrawn: later (older) rewrites that arrive from another storage thread are ignored.
    pub(super) withdrawn: bool,
    /// Claimed but not written yet (see [`claim_known`]): the record to write.
    pub(super) pending: Option<Box<[u8]>>,
}

/// A record being kept current by storage threads (the daemon's per-lease handle). Only
/// storage threads lock it (they may block on the storage while holding it); the event loop
/// only passes it around.
pub type Slot = Arc<Mutex<Published>>;

/// A `.lockwarden` directory held open while records in it are published, and whether records
/// written there are flushed (NFS and unknown file systems).
#[derive(Debug)]
pub(super) struct RecordDir {
    pub(super) fd: OwnedFd,
    pub(super) flush: bool,
    /// Its path (the key of [`RECORD_DIRS`]).
    pub(super) path: String,
}

#[derive(Debug)]
pub(super) enum PublishedPlace {
    InFile,
    Side {
        /// The directory (one descriptor per directory, shared by its records).
        dir: Arc<RecordDir>,
        /// The side file's name in it; the file itself is open only while being written.
        name: String,
        /// The byte of the locked file whose lock (held through the lease's descriptor) keeps
        /// the record alive.
        live: libc::off_t,
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
    let fd = match open_publish_dir(path) {
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
/// 0). To change a published record, use [`republish`] on it.
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
    pub(super) fn of(st: &nix::sys::stat::FileStat) -> Ident {
        Ident {
            dev: st.st_dev,
            ino: st.st_ino,
            regular: is_regular(st),
        }
    }
}

/// The record as bytes, for where it goes: side-file records name the liveness rule they are
/// judged by (the `locked-file` rule), in-file records keep the lock file's byte 1 and name
/// none.
fn prepare(record: &mut Record, id: Ident, side: bool) -> Result<Vec<u8>, String> {
    record.lock_ino = id.ino;
    if record.generation == 0 {
        record.generation = next_generation();
    }
    record.liveness = side.then(|| LIVENESS_LOCKED_FILE.to_string());
    encode(record)
}

/// [`publish`] for a target the caller took `fstat` of right after opening it.
pub fn publish_known(
    target: Target<'_>,
    mut record: Record,
    id: Ident,
) -> Result<Published, String> {
    if target.in_file(record.mode) {
        let bytes = prepare(&mut record, id, false)?;
        publish_in_file(target.fd, target.lock_path, &bytes, true)?;
        return Ok(Published {
            place: PublishedPlace::InFile,
            generation: record.generation,
            withdrawn: false,
            pending: None,
        });
    }
    let Some(side) = side_files_for_publish(target.fd, id, target.lock_path)? else {
        if record.generation == 0 {
            record.generation = next_generation();
        }
        return Ok(Published {
            place: PublishedPlace::Nowhere,
            generation: record.generation,
            withdrawn: false,
            pending: None,
        });
    };
    let bytes = prepare(&mut record, id, true)?;
    let mut dir = record_dir(&side.dir)?;
    let name = side_name(&side, &record.host);
    // Written now: no longer a blank file to claim.
    take_blanked(&side.dir, &name);
    let live = take_liveness(target, &record.host, record.mode)?;
    if let Err(e) = write_side(&mut dir, &name, &bytes) {
        // Without its record the lock would keep alive whatever the file held before.
        drop_liveness(target.fd, live);
        return Err(e);
    }
    Ok(Published {
        place: PublishedPlace::Side { dir, name, live },
        generation: record.generation,
        withdrawn: false,
        pending: None,
    })
}

/// Side files this process blanked itself (withdrawn records), by (directory, name): only over
/// one of these may a record be claimed before it is written ([`claim_known`]) — a file left
/// with an old record of this host in it (a crash) would otherwise be believed, naming the old
/// VM, between the claim and the write. Memory only, no descriptors; bounded by
/// [`BLANKED_MAX`] (when full it starts over: those leases are then published before the
/// answer).
static BLANKED: LazyLock<Mutex<HashSet<(String, String)>>> =
    LazyLock::new(|| Mutex::new(HashSet::new()));
const BLANKED_MAX: usize = 1024;

fn note_blanked(dir: &str, name: &str) {
    if let Ok(mut set) = BLANKED.lock() {
        if set.len() >= BLANKED_MAX {
            set.clear();
        }
        set.insert((dir.to_string(), name.to_string()));
    }
}

/// Was side file `name` of `dir` blanked by this process (and not written since)? Forgets it.
fn take_blanked(dir: &str, name: &str) -> bool {
    BLANKED
        .lock()
        .is_ok_and(|mut set| set.remove(&(dir.to_string(), name.to_string())))
}

/// [`publish_known`], but when the record goes into a side file this process blanked itself
/// (withdrawing an earlier lease of the file) only *claim* it: take its liveness lock now and
/// leave the record in the result for [`write_pending`], which the daemon calls right after
/// answering. A reader that comes in between finds the liveness lock held over a blank
/// file and reads again 5 ms later (see `read_side_file`), so a refusal still names the VM; the
/// acquire's answer does not wait for a write per disk. Anything else is published at once.
pub fn claim_known(target: Target<'_>, mut record: Record, id: Ident) -> Result<Published, String> {
    if target.in_file(record.mode) {
        return publish_known(target, record, id);
    }
    let Some(side) = side_files_for_publish(target.fd, id, target.lock_path)? else {
        return publish_known(target, record, id);
    };
    let name = side_name(&side, &record.host);
    if !take_blanked(&side.dir, &name) {
        return publish_known(target, record, id);
    }
    let Ok(dir) = record_dir(&side.dir) else {
        return publish_known(target, record, id);
    };
    // Only over a file still there: a reader must find the file (blank, held) until the record
    // is in it.
    let exists = fstatat(&dir.fd, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
        .is_ok_and(|st| is_regular(&st));
    if !exists {
        return publish_known(target, record, id);
    }
    let bytes = prepare(&mut record, id, true)?;
    let live = take_liveness(target, &record.host, record.mode)?;
    Ok(Published {
        place: PublishedPlace::Side { dir, name, live },
        generation: record.generation,
        withdrawn: false,
        pending: Some(bytes.into_boxed_slice()),
    })
}

/// Write the record [`claim_known`] left pending (nothing when there is none, or the record was
/// withdrawn or rewritten meanwhile). `fd` is the lease's descriptor: when the record cannot be
/// written, the liveness lock taken for it is dropped again.
pub fn write_pending(fd: BorrowedFd<'_>, p: &mut Published) -> Result<(), String> {
    let Some(bytes) = p.pending.take() else {
        return Ok(());
    };
    if p.withdrawn {
        return Ok(());
    }
    let PublishedPlace::Side { dir, name, live } = &mut p.place else {
        return Ok(());
    };
    if let Err(e) = write_side(dir, name, &bytes) {
        drop_liveness(fd, *live);
        p.place = PublishedPlace::Nowhere;
        return Err(e);
    }
    Ok(())
}

/// Rewrite the record `p` (same side file, same liveness lock) with `record`, unless `p` was
/// withdrawn or already carries a newer generation (rewrites of one lease may finish on
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
            let bytes = prepare(&mut record, Ident::of(&st), false)?;
            publish_in_file(target.fd, target.lock_path, &bytes, false)?;
            p.generation = record.generation;
            Ok(())
        }
        PublishedPlace::Side { dir, name, .. } => {
            let st = fstat(target.fd).map_err(|e| format!("fstat failed: {}", e.desc()))?;
            let bytes = prepare(&mut record, Ident::of(&st), true)?;
            write_side(dir, name, &bytes)?;
            p.generation = record.generation;
            Ok(())
        }
    }
}

/// `<stem>@<host label>.json`.
fn side_name(side: &SideFiles, host: &str) -> String {
    format!("{}@{}.json", side.stem, host_label(host))
}

/// Take this host's liveness lock on the locked file, through the lease's own descriptor (the
/// open file description that carries the lease's lock on byte 0): a write lock for an
/// exclusive lease, a read lock for a shared one (whose descriptor may be read-only). Refused
/// when another open file description holds a lock on that byte — another lockwardend with the
/// same host name, or a host whose name hashes to the same byte: a record kept alive by a lock
/// that is not only ours would outlive its lease, so none is written (docs/holders.md, §3).
fn take_liveness(target: Target<'_>, host: &str, mode: LeaseMode) -> Result<libc::off_t, String> {
    let byte = liveness_byte(host);
    let collision = || {
        format!(
            "the liveness byte {byte} of {:?} for host {:?} is locked by another open file \
             (another lockwardend with the same host name, or a host whose name hashes to the \
             same byte); no holder record is written (the lease is held); give every host its \
             own name",
            untrusted::escape(target.lock_path),
            untrusted::escape(host)
        )
    };
    // Read locks do not conflict with each other: look first for a shared lease.
    if mode == LeaseMode::Shared && ofd_held(target.fd, byte) {
        return Err(collision());
    }
    let l_type = match mode {
        LeaseMode::Exclusive => libc::F_WRLCK,
        LeaseMode::Shared => libc::F_RDLCK,
    };
    ofd_set(target.fd, l_type, byte).map_err(|e| {
        if lock::is_conflict(e) {
            collision()
        } else {
            format!(
                "cannot take the record's liveness lock on byte {byte} of {:?}: {}; no holder \
                 record is written (the lease is held)",
                untrusted::escape(target.lock_path),
                e.desc()
            )
        }
    })?;
    Ok(byte)
}

/// Release the liveness lock on `byte` of the lease open as `fd`.
fn drop_liveness(fd: BorrowedFd<'_>, byte: libc::off_t) {
    let _ = ofd_set(fd, libc::F_UNLCK, byte);
}

/// Open (or create) this host's side file `name` in `dir`, write `bytes` in place (padded with
/// spaces over a longer old record), close it. No temporary name and no rename: a reader that
/// catches the file empty or half-written sees invalid JSON under a held liveness lock and
/// reads again (see `read_side_file`). A cached directory removed meanwhile is opened afresh.
fn write_side(dir: &mut Arc<RecordDir>, name: &str, bytes: &[u8]) -> Result<(), String> {
    let (fd, st) = match open_side(dir, name, true) {
        // The cached directory was removed (by hand): open or create it again.
        Err(OpenFailure::Sys(Errno::ENOENT)) => {
            let path = dir.path.clone();
            forget_record_dir(&path);
            *dir = record_dir(&path)?;
            open_side(dir, name, true)
        }
        r => r,
    }
    .map_err(|e| {
        format!(
            "side file {name:?} in {:?}: {}; it was not opened for I/O and no record is \
             published there (the lease is held); remove it",
            dir.path,
            e.describe()
        )
    })?;
    untrusted::check_writable(&st, MAX_RECORD as u64).map_err(|why| {
        format!(
            "side file {name:?} in {:?} is not written: {why}; the holder record is \
             published nowhere (the lease is held); remove that file so lockwardend can create \
             its own",
            dir.path
        )
    })?;
    // Checked on the `fstat` of the open that came right before (no second `fstat`); a file
    // that passed is at most a record long, so padding to its length never needs a truncate.
    // Padding with spaces (which readers skip) rather than truncating: on ext4 a truncate frees
    // the block through the orphan list and the journal, and the next record allocates a block
    // again; an overwrite of the same bytes does neither.
    let old_len = usize::try_from(st.st_size).unwrap_or(0).min(MAX_RECORD);
    let padded;
    let bytes = if old_len > bytes.len() {
        let mut v = Vec::with_capacity(old_len);
        v.extend_from_slice(bytes);
        v.resize(old_len, b' ');
        padded = v;
        &padded[..]
    } else {
        bytes
    };
    let written = write_all_at0(fd.as_fd(), bytes).and_then(|()| {
        if dir.flush {
            fdatasync(fd.as_fd()).map_err(|e| format!("flushing failed: {}", e.desc()))
        } else {
            Ok(())
        }
    });
    written.map_err(|e| format!("writing {name:?} in {:?}: {e}", dir.path))
}

/// Overwrite this host's side file `name` in `dir` with spaces (it stays, blank, for this
/// host's next lease of the file) and close it. A file that is gone needs nothing.
fn blank_side(dir: &RecordDir, name: &str) -> Result<(), String> {
    let (fd, st) = match open_side(dir, name, false) {
        Err(OpenFailure::Sys(Errno::ENOENT)) => return Ok(()),
        r => r.map_err(|e| format!("side file {name:?} is not blanked: {}", e.describe()))?,
    };
    untrusted::check_writable(&st, MAX_RECORD as u64)
        .map_err(|why| format!("side file {name:?} is not blanked: {why}"))?;
    let len = usize::try_from(st.st_size).unwrap_or(0).min(MAX_RECORD);
    let blank = vec![b' '; len];
    write_all_at0(fd.as_fd(), &blank).map_err(|e| format!("cannot blank side file {name:?}: {e}"))
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

/// Write `bytes` at offset 0 of a lock file open as `fd` (an in-file record), cut what is left
/// of a longer earlier record (`old_len`), and flush when asked (NFS: other clients see it now,
/// not at close). Each write and the truncate only while the file may be written
/// ([`writable_now`]).
fn write_record(fd: BorrowedFd<'_>, bytes: &[u8], old_len: u64, flush: bool) -> Result<(), String> {
    writable_now(fd).map_err(|why| format!("not written: {why}"))?;
    write_all_at0(fd, bytes)?;
    if old_len > bytes.len() as u64 {
        writable_now(fd).map_err(|why| format!("not truncated: {why}"))?;
        let len = libc::off_t::try_from(bytes.len()).unwrap_or(0);
        ftruncate(fd, len).map_err(|e| format!("truncating failed: {}", e.desc()))?;
    }
    if flush {
        fdatasync(fd).map_err(|e| format!("flushing failed: {}", e.desc()))?;
    }
    Ok(())
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

fn publish_in_file(
    fd: BorrowedFd<'_>,
    lock_path: &str,
    bytes: &[u8],
    first: bool,
) -> Result<(), String> {
    // Only a lock file that holds nothing or a lockwarden record is ever written: a lockd lock
    // file is empty, and anything else (a file linked or moved into the lockspace) is not ours.
    let refuse = |why: String| {
        format!(
            "the lock file {lock_path:?} is not written: {why}; the holder record is published \
             nowhere (the lease is held); if the file is not a lock file, move it out of the \
             lockspace"
        )
    };
    writable_now(fd).map_err(refuse)?;
    if first {
        let content = untrusted::read_bounded(fd, MAX_RECORD)
            .map_err(|e| refuse(format!("reading it failed: {}", e.desc())))?
            .unwrap_or_default();
        if !is_record_or_blank(&content) {
            return Err(refuse(
                "it holds data that is not a lockwarden holder record".into(),
            ));
        }
    }
    ofd_set(fd, libc::F_WRLCK, LIVENESS_BYTE).map_err(|e| {
        format!(
            "cannot take the record's liveness lock on byte {LIVENESS_BYTE}: {}",
            e.desc()
        )
    })?;
    // The lock file may hold an older, longer record (ours or a previous holder's): always cut.
    write_record(fd, bytes, u64::MAX, !host_local(fd))
        .map_err(|e| format!("the lock file {lock_path:?}: {e}"))
}

/// Empty (or blanks only), or a lockwarden holder record: what a lock file may hold before
/// lockwardend writes its record into it.
fn is_record_or_blank(content: &[u8]) -> bool {
    let start = content
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(content.len());
    let rest = content.get(start..).unwrap_or_default();
    rest.is_empty() || rest.starts_with(b"{\"lockwarden_holder\"")
}

/// Open (creating it 0700 when missing) the `.lockwarden` directory `dir` for publishing, only
/// when neither it nor the directory of the locked file could let someone else swap files in
/// it: each must be owned by root or lockwardend's user and not writable by group or others
/// unless sticky. Otherwise no side file is created there at all (a disk in a directory anybody
/// can write is no place for files root writes; docs/hardening.md).
pub(crate) fn open_publish_dir(dir: &str) -> Result<OwnedFd, String> {
    let (parent, name) = dir.rsplit_once('/').unwrap_or(("/", dir));
    let parent = if parent.is_empty() { "/" } else { parent };
    let euid = nix::unistd::geteuid().as_raw();
    let judge = |fd: &OwnedFd, what: &str| -> Result<(), String> {
        let st = fstat(fd).map_err(|e| format!("cannot examine {what}: {}", e.desc()))?;
        match side_dir_problem(st.st_mode, st.st_uid, euid) {
            None => Ok(()),
            Some(why) => Err(format!(
                "{what} {why}, so no side file is written there; fix its owner or mode to publish \
                 holder records"
            )),
        }
    };
    let dflags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
    let pfd = nix::fcntl::open(parent, dflags, Mode::empty())
        .map_err(|e| format!("cannot open the directory {parent:?}: {}", e.desc()))?;
    judge(
        &pfd,
        &format!("the directory {parent:?} of the locked file"),
    )?;
    let flags = dflags | OFlag::O_NOFOLLOW;
    let fd = match openat(&pfd, name, flags, Mode::empty()) {
        Err(Errno::ENOENT) => {
            match mkdirat(&pfd, name, Mode::from_bits_truncate(0o700)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(format!("cannot create {dir:?}: {}", e.desc())),
            }
            openat(&pfd, name, flags, Mode::empty())
        }
        r => r,
    }
    .map_err(|e| format!("cannot open {dir:?}: {}", e.desc()))?;
    judge(&fd, &format!("the record directory {dir:?}"))?;
    Ok(fd)
}

/// What makes a directory unfit to hold side files: another owner than root or `euid`, or
/// write access for group or others without the sticky bit.
pub(super) fn side_dir_problem(mode: u32, uid: u32, euid: u32) -> Option<String> {
    if uid != euid && uid != 0 {
        return Some(format!(
            "is owned by uid {uid}, not by root or lockwardend's user (uid {euid})"
        ));
    }
    if mode & (libc::S_IWGRP | libc::S_IWOTH) != 0 && mode & libc::S_ISVTX == 0 {
        return Some(format!(
            "is writable by its group or by everybody (mode {:04o}) without the sticky bit",
            mode & 0o7777
        ));
    }
    None
}

/// May lockwardend write to or truncate the record file open as `fd` right now? Checked after
/// opening and again right before every write and truncate: a hard link can be added at any
/// time, and a write through it would land in the other file (docs/hardening.md).
pub(super) fn writable_now(fd: BorrowedFd<'_>) -> Result<(), String> {
    let st = fstat(fd).map_err(|e| format!("fstat failed: {}", e.desc()))?;
    untrusted::check_writable(&st, MAX_RECORD as u64)
}

/// Open this host's side file, creating it (when `create`) only when missing: withdrawn records
/// leave their (blank) file behind, so the next lease of the same file reuses it without
/// touching the directory (creating and deleting a file per lease serialises on the
/// directory's lock and, on ext4, costs an inode allocation that scans for recently deleted
/// inodes).
fn open_side(
    dir: &RecordDir,
    name: &str,
    create: bool,
) -> Result<(OwnedFd, nix::sys::stat::FileStat), OpenFailure> {
    // Never a device open, a FIFO wait or a symbolic link: O_PATH first, reopen if regular.
    untrusted::open_regular_at(
        Some(dir.fd.as_fd()),
        name,
        Access::ReadWrite,
        create.then_some(0o600),
    )
    .map(|(fd, st, _)| (fd, st))
}

/// Take the record back (before the lease's lock is dropped), `fd` being the lease's
/// descriptor: empty the lock file's content and release its byte 1, or blank the side file
/// (spaces; open, write, close) and then release this host's liveness byte of the locked file.
/// The blank side file stays for the next lease of that file on this host; readers skip blank
/// side files nobody holds.
pub fn withdraw(fd: BorrowedFd<'_>, mut published: Published) -> Result<(), String> {
    withdraw_in_place(fd, &mut published)
}

/// [`withdraw`] through a shared handle: the record stays withdrawn (later rewrites of it are
/// ignored).
pub fn withdraw_in_place(fd: BorrowedFd<'_>, published: &mut Published) -> Result<(), String> {
    published.withdrawn = true;
    let unwritten = published.pending.take().is_some();
    match std::mem::replace(&mut published.place, PublishedPlace::Nowhere) {
        PublishedPlace::InFile => {
            // Emptied only while still a single-name file of record size (a link added since
            // the record was written must not make this cut another file).
            let r = writable_now(fd)
                .map_err(|why| format!("the lock file is not emptied: {why}"))
                .and_then(|()| {
                    ftruncate(fd, 0)
                        .map_err(|e| format!("emptying the lock file failed: {}", e.desc()))
                });
            let _ = ofd_set(fd, libc::F_UNLCK, LIVENESS_BYTE);
            r
        }
        PublishedPlace::Side { dir, name, live } => {
            // Blank first, then drop the liveness lock: a reader finds either our record, or
            // only spaces (read as empty), or a record whose liveness byte is free. Spaces
            // rather than a truncate: see `write_side`. A claim never written left the file as
            // it was (blank).
            let r = if unwritten {
                Ok(())
            } else {
                blank_side(&dir, &name)
            };
            if r.is_ok() {
                note_blanked(&dir.path, &name);
            }
            drop_liveness(fd, live);
            r
        }
        PublishedPlace::Nowhere => Ok(()),
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

#[cfg(test)]
mod tests {
    use super::*;

    use crate::protocol::ResourceKind;
    use std::fs::{self, File};

    /// Another open file description's view of byte `start` of `path`.
    fn held_by_others(path: &std::path::Path, start: libc::off_t) -> Option<libc::c_int> {
        let probe = File::open(path).unwrap();
        crate::holder_record::ofd_getlk(probe.as_fd(), start).map(|(t, _)| t)
    }

    fn image() -> (tempfile::TempDir, std::path::PathBuf, String) {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("pub.img");
        fs::write(&img, b"").unwrap();
        let p = img.to_str().unwrap().to_string();
        (dir, img, p)
    }

    fn rec(host: &str, path: &str, mode: LeaseMode) -> Record {
        let vm = Vm {
            name: "pub-vm".into(),
            uuid: "u".into(),
            pid: 1,
            since: 1,
        };
        Record::new(host, ResourceKind::Disk, path, mode, path, 1, vec![vm])
    }

    fn target<'a>(f: &'a File, path: &'a str) -> Target<'a> {
        Target {
            fd: f.as_fd(),
            kind: ResourceKind::Disk,
            lock_path: path,
            lockspace: false,
        }
    }

    #[test]
    fn a_side_file_record_lives_on_a_byte_of_the_locked_file_and_keeps_no_descriptor() {
        let (dir, img, p) = image();
        let lease = File::options().read(true).write(true).open(&img).unwrap();
        ofd_set(lease.as_fd(), libc::F_WRLCK, 0).unwrap();
        let published =
            publish(target(&lease, &p), rec("node-a", &p, LeaseMode::Exclusive)).unwrap();
        let side = dir.path().join(".lockwarden/pub.img@node-a.json");
        let text = fs::read_to_string(&side).unwrap();
        assert!(text.contains("\"liveness\":\"locked-file\""), "{text}");
        let byte = liveness_byte("node-a");
        assert_eq!(held_by_others(&img, byte), Some(libc::F_WRLCK));
        assert_eq!(
            held_by_others(&side, 0),
            None,
            "the side file is not locked"
        );
        // No descriptor of this process is on the side file.
        let canon = fs::canonicalize(&side).unwrap();
        let open_on_side = fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| fs::read_link(e.path()).is_ok_and(|t| t == canon))
            .count();
        assert_eq!(open_on_side, 0);
        let reader = File::open(&img).unwrap();
        assert_eq!(read(target(&reader, &p)).believed.len(), 1);
        // Another host's byte is another byte.
        assert_eq!(held_by_others(&img, liveness_byte("node-b")), None);
        withdraw(lease.as_fd(), published).unwrap();
        assert!(fs::read(&side).unwrap().iter().all(|b| *b == b' '));
        assert_eq!(
            held_by_others(&img, byte),
            None,
            "withdraw drops the liveness byte"
        );
        assert_eq!(
            held_by_others(&img, 0),
            Some(libc::F_WRLCK),
            "not the lease"
        );
        // A shared lease's descriptor may be read-only: its liveness lock is a read lock.
        let ro = File::open(&img).unwrap();
        ofd_set(lease.as_fd(), libc::F_UNLCK, 0).unwrap();
        ofd_set(ro.as_fd(), libc::F_RDLCK, 0).unwrap();
        let shared = publish(target(&ro, &p), rec("node-a", &p, LeaseMode::Shared)).unwrap();
        assert_eq!(held_by_others(&img, byte), Some(libc::F_RDLCK));
        assert_eq!(read(target(&reader, &p)).believed.len(), 1);
        withdraw(ro.as_fd(), shared).unwrap();
        assert_eq!(held_by_others(&img, byte), None);
    }

    #[test]
    fn a_liveness_byte_held_by_another_open_file_means_no_record() {
        let (dir, img, p) = image();
        let side = dir.path().join(".lockwarden/pub.img@node-a.json");
        let byte = liveness_byte("node-a");
        // Somebody else (a colliding host, a twin daemon) holds node-a's byte.
        let other = File::open(&img).unwrap();
        ofd_set(other.as_fd(), libc::F_RDLCK, byte).unwrap();
        for mode in [LeaseMode::Exclusive, LeaseMode::Shared] {
            let lease = File::options().read(true).write(true).open(&img).unwrap();
            let t = if mode == LeaseMode::Exclusive {
                libc::F_WRLCK
            } else {
                libc::F_RDLCK
            };
            ofd_set(lease.as_fd(), t, 0).unwrap();
            let e = publish(target(&lease, &p), rec("node-a", &p, mode)).unwrap_err();
            assert!(e.contains(&format!("liveness byte {byte}")), "{e}");
            assert!(e.contains(&p) && e.contains("\"node-a\""), "{e}");
            assert!(
                e.contains("no holder record is written (the lease is held)"),
                "{e}"
            );
            let written = fs::read(&side).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&written).contains("pub-vm"),
                "{mode:?}"
            );
            // The lease took no lock on the byte: with `other` unlocked, nobody holds it.
            ofd_set(other.as_fd(), libc::F_UNLCK, byte).unwrap();
            assert_eq!(held_by_others(&img, byte), None, "{mode:?}");
            ofd_set(other.as_fd(), libc::F_RDLCK, byte).unwrap();
            ofd_set(lease.as_fd(), libc::F_UNLCK, 0).unwrap();
        }
    }

    #[test]
    fn a_claim_takes_the_liveness_byte_now_and_writes_after() {
        let (dir, img, p) = image();
        let lease = File::options().read(true).write(true).open(&img).unwrap();
        ofd_set(lease.as_fd(), libc::F_WRLCK, 0).unwrap();
        let side = dir.path().join(".lockwarden/pub.img@node-a.json");
        let id = || Ident::of(&fstat(&lease).unwrap());
        let byte = liveness_byte("node-a");
        // No side file yet: published at once (a reader must find a file to wait on).
        let p0 = claim_known(
            target(&lease, &p),
            rec("node-a", &p, LeaseMode::Exclusive),
            id(),
        )
        .unwrap();
        assert!(!p0.is_pending());
        assert!(fs::read_to_string(&side).unwrap().contains("pub-vm"));
        withdraw(lease.as_fd(), p0).unwrap();
        // Its blank file exists now: claimed (byte held over the blank file), written after.
        let mut p1 = claim_known(
            target(&lease, &p),
            rec("node-a", &p, LeaseMode::Exclusive),
            id(),
        )
        .unwrap();
        assert!(p1.is_pending());
        assert_eq!(held_by_others(&img, byte), Some(libc::F_WRLCK));
        assert!(fs::read(&side).unwrap().iter().all(|b| *b == b' '));
        write_pending(lease.as_fd(), &mut p1).unwrap();
        assert!(!p1.is_pending());
        assert!(fs::read_to_string(&side).unwrap().contains("pub-vm"));
        withdraw(lease.as_fd(), p1).unwrap();
        assert_eq!(held_by_others(&img, byte), None);
        // Claimed, then the side file becomes a hard link before the write: nothing is
        // written into it and the liveness byte goes again.
        let mut p2 = claim_known(
            target(&lease, &p),
            rec("node-a", &p, LeaseMode::Exclusive),
            id(),
        )
        .unwrap();
        assert!(p2.is_pending());
        let link = dir.path().join("other-name");
        fs::hard_link(&side, &link).unwrap();
        let e = write_pending(lease.as_fd(), &mut p2).unwrap_err();
        assert!(e.contains("hard links"), "{e}");
        assert_eq!(held_by_others(&img, byte), None);
        assert!(!fs::read_to_string(&side).unwrap().contains("pub-vm"));
        withdraw(lease.as_fd(), p2).unwrap();
        // A side file this process did not blank (an old record of this host left by a crash)
        // is never claimed: the old record would be believed until the write.
        fs::remove_file(&link).unwrap();
        fs::write(
            &side,
            rec("node-a", &p, LeaseMode::Exclusive).vms[0]
                .name
                .repeat(3),
        )
        .unwrap();
        let p3 = claim_known(
            target(&lease, &p),
            rec("node-a", &p, LeaseMode::Exclusive),
            id(),
        )
        .unwrap();
        assert!(!p3.is_pending(), "published at once");
        assert!(
            fs::read_to_string(&side)
                .unwrap()
                .contains("lockwarden_holder")
        );
        withdraw(lease.as_fd(), p3).unwrap();
    }

    #[test]
    fn only_blank_or_record_lock_files_are_written() {
        assert!(is_record_or_blank(b""));
        assert!(is_record_or_blank(b"   \n"));
        assert!(is_record_or_blank(
            b"{\"lockwarden_holder\":1,\"host\":\"a\"}\n"
        ));
        assert!(!is_record_or_blank(b"QFI\xfb\0\0\0\x03"));
        assert!(!is_record_or_blank(b"{\"other\":1}"));
    }

    #[test]
    fn side_file_directories_nobody_else_can_write() {
        let d = libc::S_IFDIR;
        assert_eq!(side_dir_problem(d | 0o755, 0, 0), None);
        assert_eq!(side_dir_problem(d | 0o700, 1000, 1000), None);
        assert_eq!(side_dir_problem(d | 0o1777, 0, 0), None);
        assert!(
            side_dir_problem(d | 0o777, 0, 0)
                .unwrap()
                .contains("sticky")
        );
        assert!(side_dir_problem(d | 0o775, 0, 0).unwrap().contains("0775"));
        assert!(
            side_dir_problem(d | 0o755, 1000, 0)
                .unwrap()
                .contains("uid 1000")
        );
    }
}
