//! The lease table: one entry, one open file, one OFD lock per locked inode.
//!
//! Why keyed by (st_dev, st_ino): two paths to one image (a symlink, a hard link, a bind mount)
//! must be one lease, or the daemon would "lock" the same byte twice and let two VMs in.
//! Several owners share an entry only for shared leases; the kernel lock is taken once.

use super::lock;
use super::lockfile::{self, LockDir};
use crate::protocol::{LeaseMode, ResourceKind};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Identity of a locked file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseKey {
    pub dev: u64,
    pub ino: u64,
}

/// One held lease.
#[derive(Debug)]
pub struct Lease {
    /// What libvirt called it when it was first taken (disk path or lease key).
    pub name: String,
    pub kind: ResourceKind,
    pub mode: LeaseMode,
    /// The file actually locked.
    pub lock_path: String,
    /// The open file description carrying the lock; closing it drops the lock. Shared with a
    /// lost-lock probe running on a storage thread (docs/storage.md).
    pub fd: Arc<OwnedFd>,
    /// Lockspace leases: the directory and file name, to verify and delete the lock file.
    pub dir: Option<LockDir>,
    /// Delete the lock file when the last owner goes (lockd's AUTOCREATE disk lock files).
    pub delete_when_free: bool,
    /// Owner pid to the time (seconds since the epoch) it joined.
    pub owners: BTreeMap<u32, u64>,
    /// When the lease was taken.
    pub since: u64,
    /// A probe found the lock lost (docs/storage.md); the owner's failure action was taken.
    pub lost: bool,
}

/// The keys of every lease, shared with the storage threads: a worker that opens a file whose
/// inode is already one of our leases must not lock it again through a second description
/// (that would conflict with ourselves). Kept up to date with the table, so submitting a job
/// costs nothing per lease held. Also the leases being disposed of on a storage thread (out of
/// the table, lock not yet dropped): a worker that opens one of those waits for the disposal
/// instead of finding it "locked by another process".
pub type HeldKeys = Arc<Held>;

#[derive(Debug, Default)]
pub struct Held {
    sets: Mutex<HeldSets>,
    disposed: Condvar,
}

#[derive(Debug, Default)]
struct HeldSets {
    held: HashSet<LeaseKey>,
    disposing: HashMap<LeaseKey, usize>,
    /// Workers waiting in `check` (a notify without waiters is still a futex call).
    waiters: usize,
}

/// What a worker finds about an inode it opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// One of our leases: do not lock it again.
    Held,
    /// Not ours (or its disposal finished): lock it.
    Free,
}

impl Held {
    /// Is `key` one of our leases? Waits (at most `wait`) while it is being disposed of.
    pub fn check(&self, key: &LeaseKey, wait: Duration) -> Seen {
        let until = Instant::now() + wait;
        let Ok(mut sets) = self.sets.lock() else {
            return Seen::Free;
        };
        loop {
            if sets.held.contains(key) {
                return Seen::Held;
            }
            let now = Instant::now();
            if !sets.disposing.contains_key(key) || now >= until {
                return Seen::Free;
            }
            sets.waiters += 1;
            match self.disposed.wait_timeout(sets, until - now) {
                Ok((s, _)) => {
                    sets = s;
                    sets.waiters -= 1;
                }
                Err(_) => return Seen::Free,
            }
        }
    }

    /// A disposal of `key` finished on a storage thread.
    pub fn disposed(&self, key: LeaseKey) {
        let mut wake = true;
        if let Ok(mut sets) = self.sets.lock() {
            if let Some(n) = sets.disposing.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    sets.disposing.remove(&key);
                }
            }
            wake = sets.waiters > 0;
        }
        if wake {
            self.disposed.notify_all();
        }
    }
}

/// All leases of this daemon.
#[derive(Debug, Default)]
pub struct Leases {
    map: HashMap<LeaseKey, Lease>,
    keys: HeldKeys,
}

impl Leases {
    /// The live set of lease keys, for the storage threads.
    pub fn held_keys(&self) -> HeldKeys {
        Arc::clone(&self.keys)
    }

    fn set_key(&self, key: LeaseKey, present: bool) {
        if let Ok(mut k) = self.keys.sets.lock() {
            if present {
                k.held.insert(key);
            } else {
                k.held.remove(&key);
            }
        }
    }

    pub fn get(&self, key: &LeaseKey) -> Option<&Lease> {
        self.map.get(key)
    }

    pub fn get_mut(&mut self, key: &LeaseKey) -> Option<&mut Lease> {
        self.map.get_mut(key)
    }

    pub fn insert(&mut self, key: LeaseKey, lease: Lease) {
        self.map.insert(key, lease);
        self.set_key(key, true);
    }

    /// Take a lease out of the table to dispose of it on a storage thread: from now until
    /// [`Held::disposed`], workers opening its inode wait for the disposal.
    pub fn take_for_disposal(&mut self, key: &LeaseKey) -> Option<Lease> {
        let l = self.map.remove(key)?;
        if let Ok(mut k) = self.keys.sets.lock() {
            k.held.remove(key);
            *k.disposing.entry(*key).or_insert(0) += 1;
        }
        Some(l)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&LeaseKey, &Lease)> {
        self.map.iter()
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
        } else if let Ok(true) = lockfile::unlink_if_named(dir, key) {
            outcome = Disposal::Deleted;
        }
    }
    // Unlock explicitly: closing our descriptor alone would not drop the lock if the keeper
    // (or a lost-lock probe) still held a duplicate of this open file description.
    let _ = lock::unlock(fd.as_fd());
    outcome
}
