//! Opening the file a lease locks, without ever blocking, creating images or following a
//! planted symlink.
//!
//! Direct mode (`LockTarget::File`) opens the image itself: first with `O_PATH`, which opens
//! nothing, so a directory, FIFO, character device or socket is refused before any real `open`
//! (opening a FIFO can block, opening a device runs its driver: a watchdog arms); only a regular
//! file or a block device is reopened through `/proc/self/fd`, read-write for an exclusive lease
//! (F_WRLCK needs it), read-only for a shared one, with `O_NOCTTY`; never `O_CREAT`, never
//! `O_TRUNC`, and the daemon never writes a byte.
//!
//! Lockspace mode (`LockTarget::Lockspace`) opens a lock file inside a directory through a
//! directory descriptor with `crate::untrusted::open_regular_at` (no symbolic link followed, no
//! device or FIFO ever opened), creating it 0600 when missing (lockd's naming, so a virtlockd
//! host and a lockwarden host lock the same file). A lock file with more than one name is
//! refused: its other name may be a disk image, and the holder record would be written into it.
//! The directory descriptor is kept with the lease so that "does the name still point at the
//! inode we locked" and "unlink it" act on the same directory even if a path component is
//! renamed meanwhile. `<lease>` lock files (whose directory comes from domain XML) are only made
//! under `lease_dir` (lockwardend.conf), as lockd only takes leases in a configured lockspace.
//!
//! A lockspace directory must be safe to create lock files in (docs/hardening.md): owned by
//! lockwardend's user or root, and not writable by everybody unless sticky (`/tmp`-style, where
//! nobody can remove or replace another user's file). Otherwise anybody could swap a lock file
//! for their own between two hosts' opens and make two hosts "hold" the same disk. The check is
//! made on the opened directory descriptor, so it judges the directory actually used.

use super::lease::{LeaseKey, LockDir};
use super::lock;
use crate::protocol::{LeaseMode, LeaseSpec, LockTarget, ResourceKind};
use crate::text::{esc, subject, what};
use crate::untrusted::{self, Access, OpenFailure};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, open};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, lstat, stat};
use nix::unistd::{UnlinkatFlags, unlinkat};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::sync::OnceLock;

/// Longest path the kernel accepts, without its terminating NUL.
const PATH_MAX: usize = libc::PATH_MAX as usize - 1;
/// Longest file name in a directory.
const NAME_MAX: usize = 255;
/// How often a lock file is recreated under our feet before we give up.
const CREATE_RETRIES: usize = 16;

/// A freshly opened lock target.
#[derive(Debug)]
pub struct Opened {
    pub fd: OwnedFd,
    pub key: LeaseKey,
    /// The file actually locked, for messages and `LeaseInfo::lock_path`.
    pub lock_path: String,
    pub dir: Option<LockDir>,
    /// This open created the lock file.
    pub created: bool,
    /// A regular file (not a block device), from the `fstat` right after opening.
    pub regular: bool,
}

/// Why a target could not be opened; the text names the disk and says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// The request names something that cannot be locked (libvirt: configuration problem).
    Invalid(String),
    /// The file system refused.
    Io(String),
}

/// Reject malformed names and paths before any file system access.
pub fn validate(spec: &LeaseSpec) -> Result<(), String> {
    let w = what(spec.kind);
    if spec.name.is_empty() {
        return Err(format!(
            "a {w} has an empty name; this is a bug in the client"
        ));
    }
    if spec.name.contains('\0') || spec.name.len() > PATH_MAX {
        return Err(format!(
            "{w} name {:?} contains a NUL byte or is longer than {PATH_MAX} bytes",
            esc(prefix(&spec.name))
        ));
    }
    let n = esc(&spec.name);
    match &spec.target {
        LockTarget::File { path } => check_abs(path).map_err(|why| format!("{w} {n}: {why}")),
        LockTarget::Lockspace { dir, file, .. } => {
            check_abs(dir).map_err(|why| format!("{w} {n}: lockspace directory {why}"))?;
            if file.is_empty()
                || file == "."
                || file == ".."
                || file.contains('/')
                || file.contains('\0')
                || file.len() > NAME_MAX
            {
                return Err(format!(
                    "{w} {n}: lock file name {:?} must be a plain file name (no '/', not '.' or \
                     '..', at most {NAME_MAX} bytes)",
                    esc(prefix(file))
                ));
            }
            Ok(())
        }
    }
}

fn prefix(s: &str) -> &str {
    let mut end = s.len().min(80);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

fn check_abs(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("path is empty".into());
    }
    if path.contains('\0') {
        return Err(format!("path {:?} contains a NUL byte", esc(prefix(path))));
    }
    if path.len() > PATH_MAX {
        return Err(format!(
            "path {:?}... is longer than {PATH_MAX} bytes",
            esc(prefix(path))
        ));
    }
    if !path.starts_with('/') {
        return Err(format!("path {} is not absolute", esc(path)));
    }
    Ok(())
}

/// The file a target locks, as text.
pub fn target_path(target: &LockTarget) -> String {
    match target {
        LockTarget::File { path } => path.clone(),
        LockTarget::Lockspace { dir, file, .. } => join(dir, file),
    }
}

fn join(dir: &str, file: &str) -> String {
    format!("{}/{file}", dir.trim_end_matches('/'))
}

pub fn key_of(st: &FileStat) -> LeaseKey {
    LeaseKey {
        dev: st.st_dev,
        ino: st.st_ino,
    }
}

/// Open what `spec` locks (validate it first).
pub fn open_target(spec: &LeaseSpec) -> Result<Opened, OpenError> {
    match &spec.target {
        LockTarget::File { path } => open_direct(spec, path),
        LockTarget::Lockspace {
            dir,
            file,
            create_dir,
        } => open_lockspace(spec, dir, file, *create_dir),
    }
}

/// Why a file of this type cannot carry a lease, or None for regular files and block devices.
fn bad_type(mode: libc::mode_t) -> Option<&'static str> {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG | SFlag::S_IFBLK => None,
        SFlag::S_IFDIR => Some("a directory"),
        SFlag::S_IFCHR => Some("a character device"),
        SFlag::S_IFIFO => Some("a FIFO"),
        SFlag::S_IFSOCK => Some("a socket"),
        SFlag::S_IFLNK => Some("a symbolic link"),
        _ => Some("not a regular file or block device"),
    }
}

fn open_direct(spec: &LeaseSpec, path: &str) -> Result<Opened, OpenError> {
    let who = subject(spec.kind, &spec.name, path);
    let check = |st: &FileStat| match bad_type(st.st_mode) {
        None => Ok(()),
        Some(kind) => Err(OpenError::Invalid(format!(
            "{who} is {kind}; only regular files and block devices can be locked, check the {}'s \
             source",
            what(spec.kind)
        ))),
    };
    // O_PATH resolves the name (symbolic links to images are fine) without opening the file
    // itself: no driver open for a device node, no wait for a FIFO's writer. Its type is judged
    // on that descriptor, and only a regular file or a block device is reopened for I/O through
    // /proc/self/fd, which reaches exactly the inode judged (docs/hardening.md).
    let handle = open(path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| stat_error(&who, e))?;
    let st = fstat(handle.as_fd())
        .map_err(|e| OpenError::Io(format!("{who}: fstat failed: {}", e.desc())))?;
    check(&st)?;
    let access = match spec.mode {
        LeaseMode::Exclusive => OFlag::O_RDWR,
        LeaseMode::Shared => OFlag::O_RDONLY,
    };
    let flags = access | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK;
    let proc_path = format!("/proc/self/fd/{}", handle.as_raw_fd());
    let fd =
        open(proc_path.as_str(), flags, Mode::empty()).map_err(|e| open_error(&who, spec, e))?;
    let again =
        fstat(&fd).map_err(|e| OpenError::Io(format!("{who}: fstat failed: {}", e.desc())))?;
    if key_of(&again) != key_of(&st) {
        return Err(OpenError::Io(format!(
            "{who}: /proc/self/fd reopened another file than the one examined; lockwardend needs \
             the real procfs mounted on /proc"
        )));
    }
    check(&again)?;
    Ok(Opened {
        fd,
        key: key_of(&again),
        lock_path: path.to_string(),
        dir: None,
        created: false,
        regular: is_regular(&again),
    })
}

fn is_regular(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG
}

fn stat_error(who: &str, e: Errno) -> OpenError {
    match e {
        Errno::ENOENT | Errno::ENOTDIR => OpenError::Invalid(format!(
            "{who} does not exist; check the path, or create the image before starting the VM"
        )),
        Errno::ELOOP => OpenError::Invalid(format!("{who} is a symbolic link loop; fix the link")),
        e => OpenError::Io(format!(
            "{who}: cannot look it up: {}; check the storage and its permissions",
            e.desc()
        )),
    }
}

fn open_error(who: &str, spec: &LeaseSpec, e: Errno) -> OpenError {
    let how = match spec.mode {
        LeaseMode::Exclusive => "read-write",
        LeaseMode::Shared => "read-only",
    };
    let advice = match e {
        Errno::EACCES | Errno::EPERM => {
            "give lockwardend access to the image (root-squashed NFS refuses root), or set \
             file_lockspace_dir so a separate lock file is locked instead"
        }
        Errno::EROFS => {
            "the file system is read-only: attach the disk read-only, or set file_lockspace_dir"
        }
        Errno::ENOENT => "the image vanished while being opened; check the path",
        _ => "check the storage",
    };
    let msg = format!(
        "{who}: cannot open it {how} to lock it: {}; {advice}",
        e.desc()
    );
    if e == Errno::ENOENT {
        OpenError::Invalid(msg)
    } else {
        OpenError::Io(msg)
    }
}

fn open_lockspace(
    spec: &LeaseSpec,
    dir: &str,
    file: &str,
    create_dir: bool,
) -> Result<Opened, OpenError> {
    let lock_path = join(dir, file);
    let who = subject(spec.kind, &spec.name, &lock_path);
    if spec.kind == ResourceKind::Lease {
        check_lease_dir(&who, dir)?;
    }
    let dflags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
    let dirfd = match open(dir, dflags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) if create_dir => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    OpenError::Io(format!(
                        "{who}: cannot create the lockspace directory {}: {e}",
                        esc(dir)
                    ))
                })?;
            open(dir, dflags, Mode::empty()).map_err(|e| dir_error(&who, dir, e))?
        }
        Err(e) => return Err(dir_error(&who, dir, e)),
    };
    check_dir(&who, dir, &dirfd, nix::unistd::geteuid().as_raw())?;
    if spec.kind == ResourceKind::Lease {
        check_lease_dir_opened(&who, dir, &dirfd)?;
    }
    for _ in 0..CREATE_RETRIES {
        // Never a device open, never through a symbolic link; created 0600 when missing.
        let (fd, st, created) = match untrusted::open_regular_at(
            Some(dirfd.as_fd()),
            file,
            Access::ReadWrite,
            Some(0o600),
        ) {
            Ok(opened) => opened,
            // Deleted between our calls (another host released it): try again.
            Err(OpenFailure::Sys(Errno::ENOENT)) => continue,
            Err(OpenFailure::Sys(e)) => return Err(lock_file_error(&who, e)),
            Err(OpenFailure::NotRegular(kind)) => {
                return Err(OpenError::Invalid(format!(
                    "{who}: the lock file is {kind}, not a regular file; lockwardend never \
                         opens such a file in a lockspace (a symbolic link is never followed, a \
                         device or FIFO never opened); remove {} so lockwardend can create the \
                         lock file",
                    esc(&lock_path)
                )));
            }
        };
        // A second name means the lock file may be a disk image (or anything else) linked into
        // the lockspace: a record written into it would land in that file. Refuse the lease.
        if st.st_nlink != 1 {
            return Err(OpenError::Invalid(format!(
                "{who}: the lock file has {} hard links, but a lock file has exactly one name \
                 (another name may be a disk image, which lockwardend never writes to); find the \
                 other names (find / -samefile {}), then remove the lock file's name in the \
                 lockspace so lockwardend can create a fresh one",
                st.st_nlink,
                esc(&lock_path)
            )));
        }
        return Ok(Opened {
            fd,
            key: key_of(&st),
            lock_path,
            dir: Some(LockDir {
                fd: dirfd,
                file: file.to_string(),
            }),
            created,
            regular: is_regular(&st),
        });
    }
    Err(OpenError::Io(format!(
        "{who}: the lock file kept appearing and vanishing; another program is racing on {}",
        esc(&lock_path)
    )))
}

/// The directory `<lease>` lock files must live in (`lease_dir` in lockwardend.conf), set once
/// at start-up; None (unset) refuses every `<lease>`.
static LEASE_DIR: OnceLock<LeaseDirSetting> = OnceLock::new();

#[derive(Debug)]
struct LeaseDirSetting {
    dir: Option<String>,
    config_file: String,
}

/// Set where `<lease>` lock files may live (once, at start-up; later calls are ignored).
pub fn set_lease_dir(dir: Option<String>, config_file: &str) {
    let _ = LEASE_DIR.set(LeaseDirSetting {
        dir: dir.map(|d| normalize(&d)),
        config_file: config_file.to_string(),
    });
}

/// `path` with empty components (`//`, a trailing `/`) removed.
fn normalize(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    format!("/{}", parts.join("/"))
}

/// Is `dir` the directory `root` or below it, by its text (both absolute, normalized)?
fn within(dir: &str, root: &str) -> bool {
    root == "/"
        || dir == root
        || dir
            .strip_prefix(root)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Why a `<lease>` in directory `dir` is refused by its text alone, before anything is opened
/// (lockd likewise only takes leases in a lockspace it was configured with): `lease_dir` unset,
/// `dir` outside it, or `.`/`..` components that could lead out of it.
fn lease_dir_problem(dir: &str, setting: Option<&LeaseDirSetting>) -> Option<String> {
    let config = setting.map_or("lockwardend.conf", |s| s.config_file.as_str());
    let Some(root) = setting.and_then(|s| s.dir.as_deref()) else {
        return Some(format!(
            "leases are refused because lease_dir is not set in {config}; set lease_dir to the \
             directory that holds <lease> lock files (its subdirectories are allowed too), and \
             point the lease's <target path> (and <lockspace>) there",
            config = esc(config)
        ));
    };
    if dir.split('/').any(|c| c == "." || c == "..") {
        return Some(format!(
            "its directory {} contains '.' or '..'; give the lease's <target path> as a plain \
             absolute path inside {} (lease_dir in {})",
            esc(dir),
            esc(root),
            esc(config)
        ));
    }
    if !within(&normalize(dir), root) {
        return Some(format!(
            "its directory {} is outside {}, the only directory (lease_dir in {}) where \
             lockwardend creates and locks <lease> files; move the lease's <target path> there, \
             or change lease_dir",
            esc(dir),
            esc(root),
            esc(config)
        ));
    }
    None
}

fn check_lease_dir(who: &str, dir: &str) -> Result<(), OpenError> {
    match lease_dir_problem(dir, LEASE_DIR.get()) {
        None => Ok(()),
        Some(why) => Err(OpenError::Invalid(format!("{who}: {why}"))),
    }
}

/// The opened lease directory must really be inside `lease_dir`: its text may pass through a
/// symbolic link that leads elsewhere. Judged on the descriptor, against `lease_dir` resolved now.
fn check_lease_dir_opened(who: &str, dir: &str, dirfd: &OwnedFd) -> Result<(), OpenError> {
    let Some(setting) = LEASE_DIR.get() else {
        return check_lease_dir(who, dir);
    };
    let Some(root) = setting.dir.as_deref() else {
        return check_lease_dir(who, dir);
    };
    let real = nix::fcntl::readlink(format!("/proc/self/fd/{}", dirfd.as_raw_fd()).as_str())
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|e| {
            OpenError::Io(format!(
                "{who}: cannot resolve the lease directory {}: {}",
                esc(dir),
                e.desc()
            ))
        })?;
    let real_root = std::fs::canonicalize(root)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| root.to_string());
    if within(&real, &real_root) {
        return Ok(());
    }
    Err(OpenError::Invalid(format!(
        "{who}: the lease directory {} is really {}, outside {} (lease_dir in {}): a symbolic \
         link leads out of it; give the lease's <target path> as a real directory inside it",
        esc(dir),
        esc(&real),
        esc(root),
        esc(&setting.config_file)
    )))
}

/// Refuse a lockspace directory that others could tamper with: world-writable without the
/// sticky bit, or owned by a user other than `euid` and root.
fn check_dir(who: &str, dir: &str, dirfd: &OwnedFd, euid: u32) -> Result<(), OpenError> {
    let st = fstat(dirfd).map_err(|e| {
        OpenError::Io(format!(
            "{who}: cannot examine the lockspace directory {}: {}",
            esc(dir),
            e.desc()
        ))
    })?;
    dir_problem(st.st_mode, st.st_uid, euid)
        .map(|fix| OpenError::Invalid(format!("{who}: the lockspace directory {} {fix}", esc(dir))))
        .map_or(Ok(()), Err)
}

/// What is wrong with a lockspace directory of this mode and owner, and how to fix it.
fn dir_problem(mode: libc::mode_t, uid: u32, euid: u32) -> Option<String> {
    let world_writable = mode & libc::S_IWOTH != 0;
    let sticky = mode & libc::S_ISVTX != 0;
    if world_writable && !sticky {
        return Some(format!(
            "is writable by every user (mode {:04o}), so anybody could replace its lock files; \
             make it private (chmod 0700, or 0755) or at least sticky (chmod +t)",
            mode & 0o7777
        ));
    }
    if uid != euid && uid != 0 {
        return Some(format!(
            "is owned by uid {uid}, not by lockwardend's user (uid {euid}) or root, so that user \
             could replace its lock files; chown it to uid {euid} (or root)"
        ));
    }
    None
}

fn dir_error(who: &str, dir: &str, e: Errno) -> OpenError {
    match e {
        Errno::ENOENT => OpenError::Invalid(format!(
            "{who}: the lockspace directory {} does not exist; create it or fix the path",
            esc(dir)
        )),
        Errno::ENOTDIR => OpenError::Invalid(format!(
            "{who}: {} is not a directory; fix the lockspace path",
            esc(dir)
        )),
        e => OpenError::Io(format!(
            "{who}: cannot open the lockspace directory {}: {}",
            esc(dir),
            e.desc()
        )),
    }
}

fn lock_file_error(who: &str, e: Errno) -> OpenError {
    match e {
        Errno::ELOOP => OpenError::Invalid(format!(
            "{who}: the lock file is a symbolic link, which lockwardend never follows in a \
             lockspace; remove the link"
        )),
        e => OpenError::Io(format!(
            "{who}: cannot open or create the lock file: {}; check the directory's permissions \
             and free space",
            e.desc()
        )),
    }
}

/// Does the lock file's name still point at the inode `key` (not replaced, not deleted)?
pub fn still_named(dir: &LockDir, key: LeaseKey) -> bool {
    fstatat(&dir.fd, dir.file.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
        .map(|st| key_of(&st) == key)
        .unwrap_or(false)
}

/// Unlink the lock file if its name still points at `key` and it is a lock file: a regular file
/// no larger than a holder record (a larger one was not made by a lock manager, and removing
/// its last name would destroy it). Call only under an exclusive lock.
pub fn unlink_if_named(dir: &LockDir, key: LeaseKey) -> Result<bool, Errno> {
    let Ok(st) = fstatat(&dir.fd, dir.file.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else {
        return Ok(false);
    };
    let size = u64::try_from(st.st_size).unwrap_or(u64::MAX);
    if key_of(&st) != key || !is_regular(&st) || size > super::holder::MAX_RECORD as u64 {
        return Ok(false);
    }
    unlinkat(&dir.fd, dir.file.as_str(), UnlinkatFlags::NoRemoveDir).map(|()| true)
}

/// The key a target names now, without opening it (for Release).
pub fn peek_key(target: &LockTarget) -> Option<LeaseKey> {
    match target {
        LockTarget::File { path } => stat(path.as_str()).ok().map(|st| key_of(&st)),
        LockTarget::Lockspace { dir, file, .. } => {
            lstat(join(dir, file).as_str()).ok().map(|st| key_of(&st))
        }
    }
}

/// What happened to a lock file when its lease was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposal {
    /// Lock dropped; no file to delete (direct image, lease key file, or kept on purpose).
    Closed,
    /// Lock dropped and the lock file deleted.
    Deleted,
    /// The lock file was kept because another host still holds a lock on it.
    KeptInUse,
}

/// Drop a lease whose last owner left: delete its lock file when `delete` (only under an
/// exclusive lock and only if the name still points at our inode, as virtlockd does), then
/// unlock the descriptor (the caller closes it). Runs on the lease's mount's storage thread.
pub fn dispose(
    key: LeaseKey,
    fd: &OwnedFd,
    dir: Option<&LockDir>,
    mode: LeaseMode,
    delete: bool,
) -> Disposal {
    let mut outcome = Disposal::Closed;
    if let (true, Some(dir)) = (delete, dir) {
        let exclusive = mode == LeaseMode::Exclusive
            || lock::try_lock(fd.as_fd(), LeaseMode::Exclusive).is_ok();
        if !exclusive {
            outcome = Disposal::KeptInUse;
        } else if let Ok(true) = unlink_if_named(dir, key) {
            outcome = Disposal::Deleted;
        }
    }
    // Unlock explicitly: closing our descriptor alone would not drop the lock if the keeper
    // (or a lost-lock probe) still held a duplicate of this open file description.
    let _ = lock::unlock(fd.as_fd());
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_directories_are_named() {
        let d = libc::S_IFDIR;
        assert_eq!(dir_problem(d | 0o700, 0, 0), None);
        assert_eq!(dir_problem(d | 0o755, 1000, 1000), None);
        // Root-owned directories are fine for any daemon user; sticky world-writable too.
        assert_eq!(dir_problem(d | 0o755, 0, 1000), None);
        assert_eq!(dir_problem(d | 0o1777, 0, 0), None);
        let ww = dir_problem(d | 0o777, 0, 0).unwrap();
        assert!(ww.contains("0777") && ww.contains("chmod"), "{ww}");
        let other = dir_problem(d | 0o700, 1000, 0).unwrap();
        assert!(
            other.contains("uid 1000") && other.contains("chown"),
            "{other}"
        );
        // Another user's sticky directory is still another user's.
        assert!(dir_problem(d | 0o1777, 1000, 0).is_some());
    }

    #[test]
    fn leases_only_under_lease_dir() {
        let set = |dir: Option<&str>| LeaseDirSetting {
            dir: dir.map(normalize),
            config_file: "/etc/libvirt/lockwardend.conf".into(),
        };
        let leases = set(Some("/srv/leases/"));
        assert_eq!(lease_dir_problem("/srv/leases", Some(&leases)), None);
        assert_eq!(lease_dir_problem("/srv/leases//LS/", Some(&leases)), None);
        for outside in ["/etc", "/srv/leases-other", "/srv", "/srv/leases/../../etc"] {
            let why = lease_dir_problem(outside, Some(&leases)).unwrap();
            assert!(
                why.contains("lease_dir") && why.contains(outside),
                "{outside}: {why}"
            );
        }
        let why = lease_dir_problem("/srv/leases", Some(&set(None))).unwrap();
        assert!(why.contains("lease_dir is not set"), "{why}");
        assert!(lease_dir_problem("/srv/leases", None).is_some());
        assert_eq!(lease_dir_problem("/anything", Some(&set(Some("/")))), None);
    }
}
