//! Rebuilding the tables from lease records: after a crash or stop (records and descriptors
//! from the keeper) and after a live re-exec (from the state document).
//!
//! Why re-lock: the record says the lease is held, but the lock is what protects the disk. Each
//! descriptor is locked again in its lease's mode — a no-op on a description that still holds
//! it — so a table entry never claims a lock the kernel does not have. Owners are watched by
//! pidfd again, checked against their recorded start time; leases of owners that exited while
//! lockwardend was down are released at once.

use super::keeper::Entry;
use super::lease::LockDir;
use super::lease::{Lease, LeaseKey, LeaseOwners};
use super::lock;
use super::owner::{OwnerEntry, Owners};
use super::pidfd::Proc;
use super::record::LeaseRecord;
use super::release;
use super::state::State;
use log::{error, info};
use nix::errno::Errno;
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, OwnedFd};

/// Put one lease back into the tables. Owners not yet known are looked up by pid; those that
/// are gone are added to `dead`. Returns false when the lease could not be kept.
pub fn insert_lease(
    state: &mut State,
    key: LeaseKey,
    record: LeaseRecord,
    fd: OwnedFd,
    dir_fd: Option<OwnedFd>,
    dead: &mut BTreeMap<u32, String>,
) -> bool {
    if let Err(e) = lock::try_lock(fd.as_fd(), record.mode) {
        error!(
            "lease {:?} ({:?}) came back without its lock and cannot be locked again ({}); \
             dropping it: check who holds {:?} now",
            record.name,
            record.lock_path,
            e.desc(),
            record.lock_path
        );
        return false;
    }
    let owners: LeaseOwners = record
        .owners
        .iter()
        .map(|o| (o.owner.pid, o.since))
        .collect();
    for o in &record.owners {
        let pid = o.owner.pid;
        if state.owners.get(pid).is_some() || dead.contains_key(&pid) {
            continue;
        }
        // Only ESRCH (gone, or the pid names another process now) means the owner exited; a
        // pidfd or /proc read that failed for want of descriptors or memory says nothing about
        // it: its leases are kept and the watch is retried (issue 19).
        let proc = match Proc::reopen(pid, o.start) {
            Ok(proc) => proc,
            Err(Errno::ESRCH) => {
                dead.insert(pid, o.owner.name.clone());
                continue;
            }
            Err(e) => {
                let proc = Proc::unwatched(pid, o.start);
                if proc.exited() {
                    dead.insert(pid, o.owner.name.clone());
                    continue;
                }
                Owners::report_unwatched(&o.owner, e);
                proc
            }
        };
        state.owners.insert(OwnerEntry {
            owner: o.owner.clone(),
            action: o.action,
            leases: BTreeSet::new(),
            handles: Vec::new(),
            proc,
        });
    }
    for pid in owners.keys() {
        if let Some(e) = state.owners.get_mut(*pid) {
            e.leases.insert(key);
        }
    }
    let dir = match (dir_fd, record.dir_file) {
        (Some(fd), Some(file)) => Some(Box::new(LockDir { fd, file })),
        _ => None,
    };
    let (name, lock_path) = Lease::paths(&record.name, &record.lock_path);
    state.leases.insert(
        key,
        Lease {
            name,
            kind: record.kind,
            mode: record.mode,
            lock_path,
            fd: std::sync::Arc::new(fd),
            dir,
            delete_when_free: record.delete_when_free,
            owners,
            since: record.since,
            lost: false,
        },
    );
    true
}

/// Release every lease of owners that exited while lockwardend was not watching.
pub fn release_dead(state: &mut State, dead: BTreeMap<u32, String>) {
    for (pid, name) in dead {
        let keys: Vec<LeaseKey> = state
            .leases
            .iter()
            .filter(|(_, l)| l.owners.contains_key(&pid))
            .map(|(k, _)| *k)
            .collect();
        let leases: Vec<(LeaseKey, bool)> = keys.iter().map(|k| (*k, false)).collect();
        release::leave_many(state, pid, &leases, "VM exited while lockwardend was down");
        info!(
            "VM {name:?} (pid {pid}) exited while lockwardend was not watching; released its {} \
             lease(s)",
            keys.len()
        );
    }
}

/// Take back what the keeper held for a previous lockwardend.
pub fn adopt(state: &mut State, entries: Vec<Entry>) {
    if entries.is_empty() {
        return;
    }
    let total = entries.len();
    let mut dead = BTreeMap::new();
    let mut kept = 0;
    for e in entries {
        let record: LeaseRecord = match serde_json::from_value(e.meta) {
            Ok(r) => r,
            Err(err) => {
                error!(
                    "the keeper holds a lease (dev {} ino {}) whose record cannot be read \
                     ({err}); dropping it",
                    e.key.dev, e.key.ino
                );
                state.unprotect(&[e.key]);
                continue;
            }
        };
        let mut fds = e.fds.into_iter();
        let Some(fd) = fds.next() else {
            continue;
        };
        if insert_lease(state, e.key, record, fd, fds.next(), &mut dead) {
            kept += 1;
        } else {
            state.unprotect(&[e.key]);
        }
    }
    info!(
        "took back {kept} of {total} lease(s) from the keeper; {} VM(s) hold leases",
        state.owners.len()
    );
    release_dead(state, dead);
    state.publish_all_holders();
}
