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
//!   side file `<dir>/.lockwarden/<name>@<host>.json` next to the locked file (mode 0600),
//!   opened only to be written (open, pwrite, close; padded with spaces over a longer old
//!   record; withdrawing overwrites it with spaces). Its liveness lock is on the *locked file*:
//!   the lease's own open file description holds a lock on byte `liveness_byte(host)` (1 TiB
//!   plus a hash of the host's name), so no descriptor per lease is kept for the record, and
//!   the lock lives exactly as long as the lease's description (with the keeper's duplicate it
//!   survives a daemon crash, like the lease). Readers retry a record caught half-written under
//!   a held liveness lock. Records of older versions (no `liveness` field) are judged by a lock
//!   on byte 0 of their side file, as they were written.
//! - block devices get no record (their locks are host-local anyway).
//!
//! When a record is believed: only while (1) its liveness lock is held, so a crashed or
//! stopped daemon's records die with its descriptors, (2) byte 0 of the locked file carries a
//! lock of the mode the record states, and (3) the record names the inode that is locked now.
//! Anything else is ignored (and reported as ignored, with the reason).
//!
//! What is written (docs/hardening.md): lockwardend writes to or truncates a side file or a lock
//! file only when it is a regular file with exactly one name, owned by lockwardend's user and no
//! larger than a record ([`crate::untrusted::check_writable`]): a side file on the `fstat` of the
//! open that comes right before each of its writes (it is opened afresh for every one), a lock
//! file after opening and again right before every write and truncate (a hard link can be added
//! at any time). A lock file is
//! written only when it is empty or holds a lockwarden record (a lockd lock file is empty, and is
//! emptied again when the record is withdrawn). Side files are opened without any device open
//! (`crate::untrusted::open_regular_at`) and only in a `.lockwarden` directory that, like the
//! locked file's directory, is owned by root or lockwardend's user and writable by nobody else
//! (or sticky). Anything else: no record, a WARN line naming the file and why; the lease stays.
//!
//! Failure to publish never fails an acquire: callers log and continue.

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

// publish: writing and withdrawing; place: where side files live (cached for publishing). The record format, reading and judging records, the
// refusal message and other hosts' heartbeats are `crate::holder_record` (below the daemon,
// shared with the CLI), re-exported here.
mod place;
mod publish;

use place::side_files_for_publish;
pub(crate) use publish::open_publish_dir;
pub use publish::{
    Ident, Published, Records, Slot, claim_known, publish, publish_known, republish, withdraw,
    withdraw_in_place, write_pending,
};

pub use crate::holder_record::{
    FORMAT, Found, Ignored, KernelLock, LIVENESS_BASE, LIVENESS_LOCKED_FILE, LastSeen, MAX_RECORD,
    RECORD_DIR, Record, Refusal, Seen, SideFiles, Target, Vm, ago, boot_id, describe_refusal,
    holder_of, host_label, kernel_lock, liveness_byte, parse_record, read, read_for_refusal,
    side_files, stem,
};
use crate::holder_record::{LIVENESS_BYTE, flock, is_regular, ofd_held, side_files_of};

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

fn ofd_set(fd: BorrowedFd<'_>, l_type: libc::c_int, start: libc::off_t) -> Result<(), Errno> {
    fcntl(fd, FcntlArg::F_OFD_SETLK(&flock(l_type, start))).map(drop)
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
