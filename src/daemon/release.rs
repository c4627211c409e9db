//! Giving leases up: the Release request and the common "owner leaves a lease" step.
//!
//! Why lenient: libvirt calls Release for pause, unplug and after failures, sometimes twice;
//! releasing a lease that is not held must succeed (design §3). The lease is found by the name
//! and path it was taken under when exactly one of the owner's leases has them (no file system
//! access), else by the inode its path names now, else by name or path alone, so a deleted or
//! replaced image can still be released.

use super::Failure;
use super::lease::{self, Disposal, LeaseKey};
use super::lockfile;
use super::state::State;
use super::text::what;
use crate::protocol::{ErrorKind, ErrorReply, LeaseSpec, Owner};
use log::{debug, info, warn};
use std::collections::BTreeSet;
use std::os::fd::AsFd;

/// Release `specs` for `owner`. Only malformed input is an error.
pub fn release(state: &mut State, owner: &Owner, specs: &[LeaseSpec]) -> Result<(), Failure> {
    for spec in specs {
        lockfile::validate(spec).map_err(|message| {
            Box::new(ErrorReply {
                kind: ErrorKind::Invalid,
                message,
                resource: Some(spec.name.clone()),
                holder: None,
            })
        })?;
    }
    let pid = owner.pid;
    let Some(entry) = state.owners.get(pid) else {
        debug!(
            "release for VM {:?} (pid {pid}), which holds nothing here: nothing to do",
            owner.name
        );
        return Ok(());
    };
    let mut keys = BTreeSet::new();
    for spec in specs {
        // By the name and path it was taken under, when exactly one of the owner's leases
        // matches (no file system call: the event loop must not stat a path on a hung mount,
        // and it saves a system call per disk); otherwise by the inode the path names now.
        let path = lockfile::target_path(&spec.target);
        let mut named = entry.leases.iter().copied().filter(|k| {
            state
                .leases
                .get(k)
                .is_some_and(|l| l.name == spec.name && l.lock_path == path)
        });
        let unique = match (named.next(), named.next()) {
            (Some(k), None) => Some(k),
            _ => None,
        };
        let found = unique
            .or_else(|| lockfile::peek_key(&spec.target).filter(|k| entry.leases.contains(k)))
            .or_else(|| {
                entry.leases.iter().copied().find(|k| {
                    state
                        .leases
                        .get(k)
                        .is_some_and(|l| l.lock_path == path || l.name == spec.name)
                })
            });
        match found {
            Some(k) => {
                keys.insert(k);
            }
            None => debug!(
                "{} {:?} is not held by VM {:?} (pid {pid}): nothing to release",
                what(spec.kind),
                spec.name,
                owner.name
            ),
        }
    }
    let leases: Vec<(LeaseKey, bool)> = keys.into_iter().map(|k| (k, false)).collect();
    let n = leave_many(state, pid, &leases, "");
    if n > 0 {
        info!(
            "VM {:?} (pid {pid}) released {n} of {} lease(s) named",
            owner.name,
            specs.len()
        );
    }
    state.owners.prune(pid);
    Ok(())
}

/// Owner `pid` leaves every lease in `leases` (key, and whether this request created its
/// lock file). Leases other VMs still share are handed to the keeper again with their new
/// owners; the keeper lets go of the others in one batch (acknowledged) before their locks
/// are dropped here (and a lockd-style disk lock file, or one created by this request,
/// deleted). `why` is appended to the log lines. Returns how many leases the owner left.
pub fn leave_many(state: &mut State, pid: u32, leases: &[(LeaseKey, bool)], why: &str) -> usize {
    let mut vm = String::new();
    if let Some(e) = state.owners.get_mut(pid) {
        for (key, _) in leases {
            e.leases.remove(key);
        }
        vm.clone_from(&e.owner.name);
    }
    let mut shared = Vec::new();
    let mut freed = Vec::new();
    for &(key, created_now) in leases {
        let Some(l) = state.leases.get_mut(&key) else {
            continue;
        };
        l.owners.remove(&pid);
        if l.owners.is_empty() {
            freed.push((key, created_now));
        } else {
            shared.push(key);
        }
    }
    let why = if why.is_empty() {
        String::new()
    } else {
        format!(" ({why})")
    };
    if !shared.is_empty() {
        if let Err(e) = state.protect(&shared) {
            warn!("{e}; the keeper may list a VM that left a shared lease");
        }
        for key in &shared {
            state.publish_holder(*key);
            if let Some(l) = state.leases.get(key) {
                debug!(
                    "{} {:?} released by VM {vm:?} (pid {pid}){why}; {} other VM(s) still share it",
                    what(l.kind),
                    l.name,
                    l.owners.len()
                );
            }
        }
    }
    if freed.is_empty() {
        return shared.len();
    }
    // The keeper lets go first: a crash after this point drops the locks with our descriptors.
    let keys: Vec<LeaseKey> = freed.iter().map(|(k, _)| *k).collect();
    state.unprotect(&keys);
    for (key, created_now) in &freed {
        let Some(l) = state.leases.take(key) else {
            continue;
        };
        let (kind, name, lock_path) = (l.kind, l.name.clone(), l.lock_path.clone());
        let delete = l.delete_when_free || *created_now;
        state.records.withdraw((key.dev, key.ino), l.fd.as_fd());
        match lease::dispose(*key, l, delete) {
            Disposal::Closed => debug!(
                "{} {name:?} released by VM {vm:?} (pid {pid}){why}",
                what(kind)
            ),
            Disposal::Deleted => debug!(
                "{} {name:?} released by VM {vm:?} (pid {pid}){why}; lock file {lock_path:?} \
                 deleted",
                what(kind)
            ),
            Disposal::KeptInUse => info!(
                "{} {name:?} released by VM {vm:?} (pid {pid}){why}; lock file {lock_path:?} \
                 kept, another host still holds a shared lock on it",
                what(kind)
            ),
        }
    }
    shared.len() + freed.len()
}
