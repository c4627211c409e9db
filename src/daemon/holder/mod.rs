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
//! What is written (docs/hardening.md): lockwardend writes to or truncates a side file or a lock
//! file only when it is a regular file with exactly one name, owned by lockwardend's user and no
//! larger than a record ([`crate::untrusted::check_writable`]), checked after opening and again
//! right before every write and truncate (a hard link can be added at any time). A lock file is
//! written only when it is empty or holds a lockwarden record (a lockd lock file is empty, and is
//! emptied again when the record is withdrawn). Side files are opened without any device open
//! (`crate::untrusted::open_regular_at`) and only in a `.lockwarden` directory that, like the
//! locked file's directory, is owned by root or lockwardend's user and writable by nobody else
//! (or sticky). Anything else: no record, a WARN line naming the file and why; the lease stays.
//!
//! Failure to publish never fails an acquire: callers log and continue.

use crate::protocol::{LeaseMode, Owner, ResourceKind};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use serde::{Deserialize, Serialize};
use std::os::fd::BorrowedFd;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

// publish: writing and withdrawing; idle: side files kept open between leases; place: where
// side files live; read: reading and believing records; refusal: the busy message.
mod idle;
mod place;
mod publish;
mod read;
mod refusal;
// seen: when another host last wrote its heartbeat (issue 15).
mod seen;

pub use idle::{expire_idle, idle_deadline};
pub use place::{SideFiles, side_files, stem};
use place::{side_file_host, side_files_for_publish};
pub(crate) use publish::open_publish_dir;
pub use publish::{
    Ident, Published, Records, Slot, claim_known, publish, publish_known, republish, withdraw,
    withdraw_in_place, write_pending,
};
use publish::{is_regular, open_record_dir};
pub use read::{Found, Ignored, KernelLock, Seen, kernel_lock, parse_record, read};
pub use refusal::{Refusal, describe_refusal, holder_of, read_for_refusal};
pub use seen::{LastSeen, ago};

pub use crate::holder_record::{FORMAT, RECORD_DIR, host_label};
/// Records larger than this are not lockwarden records.
pub(crate) const MAX_RECORD: usize = 64 * 1024;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_grow() {
        let a = next_generation();
        let b = next_generation();
        assert!(b > a);
    }
}
