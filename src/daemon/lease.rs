//! The lease table: one entry, one open file, one OFD lock per locked inode.
//!
//! Why keyed by (st_dev, st_ino): two paths to one image (a symlink, a hard link, a bind mount)
//! must be one lease, or the daemon would "lock" the same byte twice and let two VMs in.
//! Several owners share an entry only for shared leases; the kernel lock is taken once.

use crate::protocol::{LeaseMode, ResourceKind};
use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Identity of a locked file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseKey {
    pub dev: u64,
    pub ino: u64,
}

/// A lockspace directory held open, and the lock file's name in it (made by lockfile.rs).
#[derive(Debug)]
pub struct LockDir {
    pub fd: OwnedFd,
    pub file: String,
}

/// One held lease. Kept small: a host may hold thousands (the name and the lock path are one
/// shared string when they are the same file, as in direct mode).
#[derive(Debug)]
pub struct Lease {
    /// What libvirt called it when it was first taken (disk path or lease key).
    pub name: Arc<str>,
    pub kind: ResourceKind,
    pub mode: LeaseMode,
    /// The file actually locked.
    pub lock_path: Arc<str>,
    /// The open file description carrying the lock; closing it drops the lock. Shared with a
    /// lost-lock probe running on a storage thread (docs/storage.md).
    pub fd: Arc<OwnedFd>,
    /// Lockspace leases: the directory and file name, to verify and delete the lock file.
    pub dir: Option<Box<LockDir>>,
    /// Delete the lock file when the last owner goes (lockd's AUTOCREATE disk lock files).
    pub delete_when_free: bool,
    /// Owner pid to the time (seconds since the epoch) it joined.
    pub owners: LeaseOwners,
    /// When the lease was taken.
    pub since: u64,
    /// A probe found the lock lost (docs/storage.md); the owner's failure action was taken.
    pub lost: bool,
}

impl Lease {
    /// The name and lock path as the table keeps them: one string when they are equal.
    pub fn paths(name: &str, lock_path: &str) -> (Arc<str>, Arc<str>) {
        let name: Arc<str> = Arc::from(name);
        let lock_path = if *name == *lock_path {
            Arc::clone(&name)
        } else {
            Arc::from(lock_path)
        };
        (name, lock_path)
    }
}

/// The owners of one lease (pid to the time it joined, seconds since the epoch), in pid order.
/// Almost every lease has exactly one owner, kept inline (no allocation); shared leases with
/// several owners keep them in one boxed slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOwners {
    One([(u32, u64); 1]),
    Many(Box<[(u32, u64)]>),
}

impl Default for LeaseOwners {
    fn default() -> Self {
        LeaseOwners::Many(Box::default())
    }
}

impl LeaseOwners {
    /// A lease with one owner.
    pub fn one(pid: u32, since: u64) -> LeaseOwners {
        LeaseOwners::One([(pid, since)])
    }

    fn as_slice(&self) -> &[(u32, u64)] {
        match self {
            LeaseOwners::One(one) => one,
            LeaseOwners::Many(many) => many,
        }
    }

    fn set(&mut self, v: Vec<(u32, u64)>) {
        *self = match v.as_slice() {
            [one] => LeaseOwners::One([*one]),
            _ => LeaseOwners::Many(v.into_boxed_slice()),
        };
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    pub fn contains_key(&self, pid: &u32) -> bool {
        self.as_slice().iter().any(|(p, _)| p == pid)
    }

    /// Owners in pid order. (Concrete iterator types: a caller may keep one across a use of
    /// another part of the state, as with the map this replaced.)
    pub fn iter(&self) -> OwnersIter<'_> {
        self.as_slice().iter().map(|(p, s)| (p, s))
    }

    pub fn keys(&self) -> OwnerPids<'_> {
        self.as_slice().iter().map(|(p, _)| p)
    }

    /// Add `pid` (or set its time); the previous time if it was an owner.
    pub fn insert(&mut self, pid: u32, since: u64) -> Option<u64> {
        let mut v = self.as_slice().to_vec();
        let old = match v.binary_search_by_key(&pid, |(p, _)| *p) {
            Ok(i) => v.get_mut(i).map(|e| std::mem::replace(&mut e.1, since)),
            Err(i) => {
                v.insert(i, (pid, since));
                None
            }
        };
        self.set(v);
        old
    }

    /// Remove `pid`; its time if it was an owner.
    pub fn remove(&mut self, pid: &u32) -> Option<u64> {
        let mut v = self.as_slice().to_vec();
        let i = v.iter().position(|(p, _)| p == pid)?;
        let (_, since) = v.remove(i);
        self.set(v);
        Some(since)
    }
}

pub type OwnersIter<'a> =
    std::iter::Map<std::slice::Iter<'a, (u32, u64)>, fn(&'a (u32, u64)) -> (&'a u32, &'a u64)>;
pub type OwnerPids<'a> =
    std::iter::Map<std::slice::Iter<'a, (u32, u64)>, fn(&'a (u32, u64)) -> &'a u32>;

impl FromIterator<(u32, u64)> for LeaseOwners {
    fn from_iter<I: IntoIterator<Item = (u32, u64)>>(iter: I) -> Self {
        let mut v: Vec<(u32, u64)> = Vec::new();
        for (pid, since) in iter {
            match v.binary_search_by_key(&pid, |(p, _)| *p) {
                Ok(i) => {
                    if let Some(e) = v.get_mut(i) {
                        e.1 = since;
                    }
                }
                Err(i) => v.insert(i, (pid, since)),
            }
        }
        let mut o = LeaseOwners::default();
        o.set(v);
        o
    }
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
    /// Boxed: the table's buckets (about 1.6 per lease) then cost a pointer, not a lease.
    map: HashMap<LeaseKey, Box<Lease>>,
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
        self.map.get(key).map(|l| &**l)
    }

    pub fn get_mut(&mut self, key: &LeaseKey) -> Option<&mut Lease> {
        self.map.get_mut(key).map(|l| &mut **l)
    }

    pub fn insert(&mut self, key: LeaseKey, lease: Lease) {
        self.map.insert(key, Box::new(lease));
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
        Some(*l)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&LeaseKey, &Lease)> {
        self.map.iter().map(|(k, l)| (k, &**l))
    }
}
