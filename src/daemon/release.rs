//! Giving leases up: the Release request and the common "owner leaves a lease" step.
//!
//! Why lenient: libvirt calls Release for pause, unplug and after failures, sometimes twice;
//! releasing a lease that is not held must succeed (design §3). The lease is found by the inode
//! its path names now, or, when the file vanished or was replaced, by the name and path it was
//! taken under, so a deleted image can still be released.

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
        let by_inode = lockfile::peek_key(&spec.target).filter(|k| entry.leases.contains(k));
        let found = by_inode.or_else(|| {
            let path = lockfile::target_path(&spec.target);
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
    for key in keys {
        leave(state, key, pid, false, "");
    }
    state.owners.prune(pid);
    Ok(())
}

/// Owner `pid` leaves lease `key`; when it was the last owner the lock is dropped (and a
/// lockd-style disk lock file, or one this request created when `created_now`, deleted).
/// `why` is appended to the log line.
pub fn leave(state: &mut State, key: LeaseKey, pid: u32, created_now: bool, why: &str) {
    let vm = state
        .owners
        .get_mut(pid)
        .map(|e| {
            e.leases.remove(&key);
            e.owner.name.clone()
        })
        .unwrap_or_default();
    let Some(l) = state.leases.get_mut(&key) else {
        return;
    };
    l.owners.remove(&pid);
    let why = if why.is_empty() {
        String::new()
    } else {
        format!(" ({why})")
    };
    if !l.owners.is_empty() {
        if let Err(e) = state.protect(&[key]) {
            warn!("{e}; the keeper may list a VM that left this shared lease");
        }
        state.publish_holder(key);
        let Some(l) = state.leases.get(&key) else {
            return;
        };
        info!(
            "{} {:?} released by VM {vm:?} (pid {pid}){why}; {} other VM(s) still share it",
            what(l.kind),
            l.name,
            l.owners.len()
        );
        return;
    }
    // The keeper lets go first: a crash after this point drops the lock with our descriptor.
    state.unprotect(key);
    let Some(l) = state.leases.take(&key) else {
        return;
    };
    let (kind, name, lock_path) = (l.kind, l.name.clone(), l.lock_path.clone());
    let delete = l.delete_when_free || created_now;
    state.records.withdraw((key.dev, key.ino), l.fd.as_fd());
    match lease::dispose(key, l, delete) {
        Disposal::Closed => info!(
            "{} {name:?} released by VM {vm:?} (pid {pid}){why}",
            what(kind)
        ),
        Disposal::Deleted => info!(
            "{} {name:?} released by VM {vm:?} (pid {pid}){why}; lock file {lock_path:?} deleted",
            what(kind)
        ),
        Disposal::KeptInUse => info!(
            "{} {name:?} released by VM {vm:?} (pid {pid}){why}; lock file {lock_path:?} kept, \
             another host still holds a shared lock on it",
            what(kind)
        ),
    }
}
