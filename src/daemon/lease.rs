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
use std::sync::{Arc, RwLock};

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
/// costs nothing per lease held.
pub type HeldKeys = Arc<RwLock<HashSet<LeaseKey>>>;

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
        if let Ok(mut k) = self.keys.write() {
            if present {
                k.insert(key);
            } else {
                k.remove(&key);
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

    pub fn take(&mut self, key: &LeaseKey) -> Option<Lease> {
        let l = self.map.remove(key);
        if l.is_some() {
            self.set_key(*key, false);
        }
        l
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
/// unlock and close the descriptor.
pub fn dispose(key: LeaseKey, lease: Lease, delete: bool) -> Disposal {
    let mut outcome = Disposal::Closed;
    if let (true, Some(dir)) = (delete, &lease.dir) {
        let exclusive = lease.mode == LeaseMode::Exclusive
            || lock::try_lock(lease.fd.as_fd(), LeaseMode::Exclusive).is_ok();
        if !exclusive {
            outcome = Disposal::KeptInUse;
        } else if let Ok(true) = lockfile::unlink_if_named(dir, key) {
            outcome = Disposal::Deleted;
        }
    }
    // Unlock explicitly: closing our descriptor alone would not drop the lock if the keeper
    // still held a duplicate of this open file description.
    let _ = lock::unlock(lease.fd.as_fd());
    drop(lease);
    outcome
}
