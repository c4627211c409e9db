//! Holder records below the plugin, the daemon and the CLI: the record format, where records
//! live, and reading and judging them. lockwardend writes records (`daemon::holder`, which
//! re-exports this module); a refused acquire, `lockwarden who`, `audit` and `doctor` read them
//! through [`read`]. What a record is and when it is believed: docs/holders.md and the module
//! documentation of `daemon::holder`.
//!
//! Records come from other hosts on shared storage and are untrusted: side files are opened
//! without following links and without device opens (`crate::untrusted::open_regular_at`),
//! every read is bounded ([`MAX_RECORD`], and per look at most [`read::MAX_SIDE_FILES`] files
//! within a byte and time budget), and every text from them is escaped before it is printed.

use crate::protocol::{LeaseMode, Owner, ResourceKind};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl, readlink};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat};
use serde::{Deserialize, Serialize};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::LazyLock;

// read: reading and believing records; refusal: the busy message; seen: when another host last
// wrote its heartbeat (issue 15).
mod read;
mod refusal;
mod seen;

pub use read::{Found, Ignored, KernelLock, MAX_SIDE_FILES, Seen, kernel_lock, parse_record, read};
pub use refusal::{Refusal, describe_refusal, holder_of, read_for_refusal};
pub use seen::{LastSeen, MAX_HOSTS, ago, hosts_last_seen};

/// Value of the `lockwarden_holder` field: the record format version.
pub const FORMAT: u32 = 1;
/// The hidden directory holding side files, next to the locked file.
pub const RECORD_DIR: &str = ".lockwarden";
/// Records larger than this are not lockwarden records.
pub const MAX_RECORD: usize = 64 * 1024;
/// Byte of an in-file record's lock file that carries the publisher's liveness lock.
pub const LIVENESS_BYTE: libc::off_t = 1;
/// Where the per-host liveness bytes of side-file records start in the *locked* file
/// (docs/holders.md, section 3): 1 TiB, far above every byte anybody else locks (virtlockd byte
/// 0, QEMU bytes 100-104 and 200-204, our in-file liveness byte 1) and above any image size
/// that matters (a byte-range lock does not need the file to be that long).
pub const LIVENESS_BASE: libc::off_t = 1 << 40;
/// Value of a record's `liveness` field: the record is alive while its publisher holds a lock
/// on byte [`liveness_byte`]`(host)` of the locked file (see docs/holders.md, section 3).
pub const LIVENESS_LOCKED_FILE: &str = "locked-file";
/// File names longer than this (the image's base name) are replaced by their SHA-256 in side
/// file names, so `<name>@<host>.json` always fits NAME_MAX (host names are at most 64 bytes).
pub const MAX_STEM: usize = 128;
/// Tries to read a record that is being rewritten at that moment.
pub const READ_TRIES: usize = 3;
/// How an empty side file is described (a withdrawn record, or one being written).
pub const EMPTY: &str = "empty";

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
    /// Which liveness rule applies: [`LIVENESS_LOCKED_FILE`] (a lock on byte
    /// [`liveness_byte`]`(host)` of the locked file) in side-file records of this version;
    /// absent in in-file records (byte 1 of the lock file) and in side-file records of older
    /// versions (byte 0 of the side file itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<String>,
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
            liveness: None,
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
    pub fn in_file(&self, mode: LeaseMode) -> bool {
        self.in_file_possible() && mode == LeaseMode::Exclusive
    }

    pub fn in_file_possible(&self) -> bool {
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
pub fn own_pid() -> u32 {
    static PID: LazyLock<u32> = LazyLock::new(std::process::id);
    *PID
}

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
pub fn side_files_of(fd: BorrowedFd<'_>, regular: bool) -> Result<Option<SideFiles>, String> {
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

/// `<name>` part of a side file for a locked file of base name `base`.
pub fn stem(base: &str) -> String {
    if base.len() <= MAX_STEM {
        base.to_string()
    } else {
        format!("sha256-{}", crate::naming::sha256_hex(base))
    }
}

/// The host part of side file `file_name` when it is a side file of `stem`.
pub fn side_file_host<'n>(file_name: &'n str, stem: &str) -> Option<&'n str> {
    let rest = file_name.strip_suffix(".json")?;
    let (s, host) = rest.rsplit_once('@')?;
    (s == stem && !host.is_empty()).then_some(host)
}

/// A regular file, by its `fstat`.
pub fn is_regular(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG
}

/// Open the record directory `dir` for reading (never through a symbolic link); None when it
/// does not exist.
pub fn open_record_dir(dir: &str) -> Result<Option<OwnedFd>, Errno> {
    match nix::fcntl::open(dir, record_dir_flags(), Mode::empty()) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// How a record directory is opened.
pub fn record_dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY
}

// ---------------------------------------------------------------------------------------------
// Byte-range helpers (OFD)

/// A one-byte `struct flock` at `start`.
pub fn flock(l_type: libc::c_int, start: libc::off_t) -> libc::flock {
    libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: 1,
        l_pid: 0,
    }
}

/// What `F_OFD_GETLK` reports for a write lock on byte `start`: the conflicting lock's type
/// (`F_WRLCK` or `F_RDLCK`) and its pid (POSIX locks only), or None when nothing conflicts.
pub fn ofd_getlk(fd: BorrowedFd<'_>, start: libc::off_t) -> Option<(libc::c_int, Option<i32>)> {
    let mut fl = flock(libc::F_WRLCK, start);
    fcntl(fd, FcntlArg::F_OFD_GETLK(&mut fl)).ok()?;
    let t = i32::from(fl.l_type);
    (t != libc::F_UNLCK).then_some((t, (fl.l_pid > 0).then_some(fl.l_pid)))
}

/// Does anybody (other than this descriptor) hold a lock on byte `start`?
pub fn ofd_held(fd: BorrowedFd<'_>, start: libc::off_t) -> bool {
    ofd_getlk(fd, start).is_some()
}

/// The byte of a locked file whose lock keeps alive the side-file record of host `host`:
/// [`LIVENESS_BASE`] plus the first 4 bytes (big-endian) of the SHA-256 of the host's label
/// ([`host_label`], the name as it appears in side-file names). Per host, so that hosts sharing
/// a lease each hold their own byte (a crashed host's record is not kept alive by another
/// host's lock); of the label rather than the raw name, so a reader finds the byte from a side
/// file's name alone while the record in it is being written.
pub fn liveness_byte(host: &str) -> libc::off_t {
    let hex = crate::naming::sha256_hex(&host_label(host));
    let h = hex
        .get(..8)
        .and_then(|p| u32::from_str_radix(p, 16).ok())
        .unwrap_or(0);
    LIVENESS_BASE + libc::off_t::from(h)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, File, OpenOptions};
    use std::os::fd::AsFd;

    #[test]
    fn side_file_names() {
        assert_eq!(
            side_file_host("a.qcow2@node-b.json", "a.qcow2"),
            Some("node-b")
        );
        assert_eq!(side_file_host("a@b@node.json", "a@b"), Some("node"));
        assert_eq!(side_file_host("a@b@node.json", "a"), None);
        assert_eq!(side_file_host("a.qcow2@node.json.tmp1.2", "a.qcow2"), None);
        assert_eq!(side_file_host("a.qcow2@.json", "a.qcow2"), None);
        assert_eq!(host_label("node b/../x@y"), "node_b_.._x_y");
        assert_eq!(host_label(""), "unknown");
        assert_eq!(host_label(".."), "unknown");
        assert_eq!(host_label(&"h".repeat(100)).len(), 64);
        let long = "x".repeat(200);
        assert_eq!(
            stem(&long),
            format!("sha256-{}", crate::naming::sha256_hex(&long))
        );
        assert_eq!(stem(&"y".repeat(MAX_STEM)), "y".repeat(MAX_STEM));
        assert_eq!(stem("web1.qcow2"), "web1.qcow2");
    }

    #[test]
    fn side_files_live_next_to_the_real_file() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.img");
        fs::write(&real, b"").unwrap();
        let link = dir.path().join("link.img");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let f = File::open(&link).unwrap();
        let side = side_files(f.as_fd()).unwrap().unwrap();
        let canon = fs::canonicalize(dir.path()).unwrap();
        assert_eq!(side.dir, format!("{}/{RECORD_DIR}", canon.display()));
        assert_eq!(side.stem, "real.img");
        // A directory (or a device) has no side files.
        let d = File::open(dir.path()).unwrap();
        assert_eq!(side_files(d.as_fd()).unwrap(), None);
        // Nor has a deleted file.
        fs::remove_file(&real).unwrap();
        assert_eq!(side_files(f.as_fd()).unwrap(), None);
    }

    #[test]
    fn record_dirs_are_opened_without_links() {
        let dir = tempfile::tempdir().unwrap();
        let rd = dir.path().join(RECORD_DIR);
        assert!(open_record_dir(rd.to_str().unwrap()).unwrap().is_none());
        fs::create_dir(&rd).unwrap();
        assert!(open_record_dir(rd.to_str().unwrap()).unwrap().is_some());
        let link = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&rd, &link).unwrap();
        // O_NOFOLLOW | O_DIRECTORY on a symbolic link fails (ENOTDIR on Linux).
        assert!(open_record_dir(link.to_str().unwrap()).is_err());
    }

    #[test]
    fn byte_locks_are_seen_from_another_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        fs::write(&p, b"").unwrap();
        let holder = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let probe = File::open(&p).unwrap();
        assert!(!ofd_held(probe.as_fd(), LIVENESS_BYTE));
        fcntl(
            holder.as_fd(),
            FcntlArg::F_OFD_SETLK(&flock(libc::F_RDLCK, LIVENESS_BYTE)),
        )
        .unwrap();
        assert!(ofd_held(probe.as_fd(), LIVENESS_BYTE));
        assert_eq!(
            ofd_getlk(probe.as_fd(), LIVENESS_BYTE),
            Some((libc::F_RDLCK, None))
        );
        assert!(!ofd_held(probe.as_fd(), 0));
    }

    #[test]
    fn records_parse_and_refuse_garbage() {
        let r = Record {
            lockwarden_holder: FORMAT,
            host: "node-a".into(),
            boot_id: "b".into(),
            daemon_pid: 7,
            version: "0.1.0".into(),
            generation: 9,
            name: "/img/a".into(),
            kind: ResourceKind::Disk,
            mode: LeaseMode::Exclusive,
            lock_path: "/img/a".into(),
            lock_ino: 12,
            since: 1_700_000_000,
            vms: vec![Vm {
                name: "web1".into(),
                uuid: "u".into(),
                pid: 42,
                since: 1_700_000_000,
            }],
            liveness: None,
        };
        let mut bytes = serde_json::to_vec(&r).unwrap();
        assert_eq!(parse_record(&bytes).unwrap(), r);
        // Padding left by a shorter rewrite in place is ignored.
        bytes.extend_from_slice(b"\n    \0\0");
        assert_eq!(parse_record(&bytes).unwrap(), r);
        assert_eq!(parse_record(b"\xff{").unwrap_err(), "not UTF-8");
        assert!(
            parse_record(b"{\"lockwarden_holder\": 1}")
                .unwrap_err()
                .starts_with("not a lockwarden holder record")
        );
        assert!(parse_record(b"").is_err());
        // The liveness field is written only when set, and read back.
        assert!(
            !String::from_utf8(serde_json::to_vec(&r).unwrap())
                .unwrap()
                .contains("liveness")
        );
        let mut lf = r.clone();
        lf.liveness = Some(LIVENESS_LOCKED_FILE.into());
        let text = serde_json::to_string(&lf).unwrap();
        assert!(text.contains("\"liveness\":\"locked-file\""), "{text}");
        assert_eq!(parse_record(text.as_bytes()).unwrap(), lf);
    }

    #[test]
    fn liveness_bytes_stay_clear_of_every_byte_others_lock() {
        // virtlockd byte 0, our in-file byte 1, QEMU 100-104 and 200-204: all below 1024.
        let mut seen = std::collections::HashSet::new();
        for host in [
            "",
            "node-a",
            "node-b",
            "x",
            "a b",
            "a_b",
            "\u{1b}[2J",
            &"h".repeat(300),
        ] {
            let b = liveness_byte(host);
            assert!(!(0..=1023).contains(&b), "{host:?} -> {b}");
            assert!((LIVENESS_BASE..LIVENESS_BASE + (1 << 32)).contains(&b));
            seen.insert(b);
        }
        for i in 0..10_000u32 {
            let b = liveness_byte(&format!("host-{i}"));
            assert!((LIVENESS_BASE..LIVENESS_BASE + (1 << 32)).contains(&b) && b > 1023);
        }
        // Per host, and of the host's label (what side-file names carry).
        assert_ne!(liveness_byte("node-a"), liveness_byte("node-b"));
        assert_eq!(liveness_byte("a b"), liveness_byte("a_b"));
        assert_eq!(
            liveness_byte("node-a"),
            liveness_byte(&host_label("node-a"))
        );
        // Stable across versions: readers on other hosts compute the same byte.
        let hex = crate::naming::sha256_hex("node-a");
        assert_eq!(
            liveness_byte("node-a"),
            LIVENESS_BASE + i64::from(u32::from_str_radix(&hex[..8], 16).unwrap())
        );
    }

    #[test]
    fn a_new_record_names_this_process() {
        let owner = Owner {
            uuid: "u".into(),
            name: "web1".into(),
            id: 1,
            pid: 42,
        };
        let r = Record::new(
            "node-a",
            ResourceKind::Disk,
            "/img/a",
            LeaseMode::Shared,
            "/img/a",
            5,
            vec![Vm::of(&owner, 5)],
        );
        assert_eq!(r.lockwarden_holder, FORMAT);
        assert_eq!(r.daemon_pid, std::process::id());
        assert_eq!(r.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(r.vms[0].pid, 42);
        assert_eq!(r.boot_id, boot_id());
    }
}
