//! Giving leases up: the Release request and the common "owner leaves a lease" step.
//!
//! Why lenient: libvirt calls Release for pause, unplug and after failures, sometimes twice;
//! releasing a lease that is not held must succeed (docs/interfaces.md §3). The lease is found by the name
//! and path it was taken under when exactly one of the owner's leases has them (no file system
//! access), else by the inode its path names now, else by name or path alone, so a deleted or
//! replaced image can still be released.

use super::Failure;
use super::error::DaemonError;
use super::lease::LeaseKey;
use super::ledger::{Pending, Then};
use super::lockfile;
use super::owner::ConnId;
use super::state::State;
use crate::protocol::{LeaseSpec, Owner, Response};
use crate::text::what;
use log::{debug, info, warn};
use std::collections::BTreeSet;
use std::time::Instant;

/// Release `specs` for `owner` (connection `conn`). Only malformed input is an error. The
/// locks are dropped on the storage threads of their mounts; the answer is returned at once
/// when there is nothing to wait for, else it comes through `state.finished` when every lock is
/// dropped (or a Timeout error after `storage_timeout_ms`, naming the disk and its mount).
pub fn start(
    state: &mut State,
    conn: ConnId,
    owner: &Owner,
    specs: &[LeaseSpec],
) -> Result<Option<Response>, Failure> {
    let jobs = release(state, owner, specs)?;
    if jobs.is_empty() {
        return Ok(Some(Response::Ok {
            // Acquire/Release answers carry no lease list (docs/protocol.md).
            leases: Vec::new(),
        }));
    }
    let group = state.new_group(conn);
    state.track(group, jobs);
    let deadline = Instant::now() + state.storage_timeout;
    state.settle(
        group,
        Then::Released {
            pid: owner.pid,
            vm: owner.name.clone(),
        },
        deadline,
    );
    Ok(None)
}

/// Release `specs` for `owner`; returns the storage jobs dropping the locks.
pub fn release(
    state: &mut State,
    owner: &Owner,
    specs: &[LeaseSpec],
) -> Result<Vec<Pending>, Failure> {
    for spec in specs {
        lockfile::validate(spec)
            .map_err(|message| Box::new(DaemonError::invalid(message).about(&spec.name.clone())))?;
    }
    let pid = owner.pid;
    let Some(entry) = state.owners.get(pid) else {
        debug!(
            "release for VM {:?} (pid {pid}), which holds nothing here: nothing to do",
            owner.name
        );
        return Ok(Vec::new());
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
                .is_some_and(|l| *l.name == *spec.name && *l.lock_path == *path)
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
                        .is_some_and(|l| *l.lock_path == *path || *l.name == *spec.name)
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
    let names = names_of(state, &leases);
    let left = leave_many(state, pid, &leases, "");
    if left.count > 0 {
        state.metrics.releases += left.count as u64;
        released_event(
            owner,
            &names,
            format_args!(
                "VM {:?} (pid {pid}) released {} of {} lease(s) named",
                owner.name,
                left.count,
                specs.len()
            ),
        );
    }
    state.owners.prune(pid);
    Ok(left.jobs)
}

/// The names of `leases` (journal events).
pub fn names_of(state: &State, leases: &[(LeaseKey, bool)]) -> Vec<String> {
    leases
        .iter()
        .filter_map(|(k, _)| state.leases.get(k).map(|l| l.name.to_string()))
        .collect()
}

/// Log `args` as the `released` journal event (docs/operators.md §11), one `DISK` per lease.
pub fn released_event(owner: &Owner, disks: &[String], args: std::fmt::Arguments<'_>) {
    let mut f = vec![
        ("VM_NAME", owner.name.as_str()),
        ("VM_UUID", owner.uuid.as_str()),
    ];
    f.extend(disks.iter().map(|d| ("DISK", d.as_str())));
    super::logging::event(log::Level::Info, super::logging::Event::Released, &f, args);
}

/// What `leave_many` did.
#[derive(Debug, Default)]
pub struct Left {
    /// How many leases the owner left.
    pub count: usize,
    /// The storage jobs rewriting records of shared leases and dropping freed ones.
    pub jobs: Vec<Pending>,
}

/// Owner `pid` leaves every lease in `leases` (key, and whether this request created its
/// lock file). Leases other VMs still share are handed to the keeper again with their new
/// owners (and their records rewritten); the keeper is told to let go of the others in one
/// batch before their locks are dropped — on the storage threads of their mounts,
/// which withdraw the record, delete a lockd-style disk lock file (or one created by this
/// request), unlock and close. `why` is appended to the log lines.
pub fn leave_many(state: &mut State, pid: u32, leases: &[(LeaseKey, bool)], why: &str) -> Left {
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
    let mut left = Left {
        count: shared.len() + freed.len(),
        jobs: Vec::new(),
    };
    if !shared.is_empty() {
        if let Err(e) = state.protect(&shared) {
            warn!("{e}; the keeper may list a VM that left a shared lease");
        }
        for key in &shared {
            left.jobs.extend(state.publish_holder(*key));
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
        return left;
    }
    // The keeper lets go first: a crash after this point drops the locks with our descriptors.
    let keys: Vec<LeaseKey> = freed.iter().map(|(k, _)| *k).collect();
    state.unprotect(&keys);
    let why = format!(" by VM {vm:?} (pid {pid}){why}");
    for (key, created_now) in &freed {
        left.jobs.extend(state.dispose(*key, *created_now, &why));
    }
    left
}

/// Release every lease of `pid`; returns how many it held, and their names.
fn release_all(state: &mut State, pid: u32, why: &str) -> (usize, Vec<String>) {
    let keys: Vec<LeaseKey> = match state.owners.get(pid) {
        Some(e) => e.leases.iter().copied().collect(),
        None => return (0, Vec::new()),
    };
    let leases: Vec<(LeaseKey, bool)> = keys.iter().map(|k| (*k, false)).collect();
    let names = names_of(state, &leases);
    leave_many(state, pid, &leases, why);
    state.metrics.releases += keys.len() as u64;
    (keys.len(), names)
}

/// Connection `conn`, a lifetime handle of `pid`, closed. When it was the last one: the
/// owner's pidfd, parked while the handle was open, is opened again (checked against the start
/// time: owner.rs); an owner that is gone (or held nothing) loses its leases at once; one that
/// still runs while holding leases is terminated and keeps them until it is gone.
pub fn handle_closed(state: &mut State, pid: u32, conn: ConnId, now: Instant) {
    let Some(entry) = state.owners.get_mut(pid) else {
        return;
    };
    entry.handles.retain(|c| *c != conn);
    if !entry.handles.is_empty() {
        return;
    }
    // Only ESRCH is "gone"; another error keeps the owner, watched by its plain pid and start
    // time until the pidfd can be opened (owner.rs).
    let gone = state.owners.unpark(pid) == Err(nix::errno::Errno::ESRCH);
    let Some(entry) = state.owners.get(pid) else {
        return;
    };
    let vm = entry.owner.name.clone();
    let held = entry.leases.len();
    if held == 0 {
        info!("lifetime handle of VM {vm:?} (pid {pid}) closed; it held no leases");
        if gone {
            owner_exited(state, pid);
        } else {
            state.owners.prune(pid);
        }
        return;
    }
    if gone || entry.proc.exited() {
        let owner = entry.owner.clone();
        let (released, names) = release_all(state, pid, "lifetime handle closed");
        state.owners.remove(pid);
        released_event(
            &owner,
            &names,
            format_args!(
                "lifetime handle of VM {vm:?} (pid {pid}) closed; released {released} lease(s)"
            ),
        );
        return;
    }
    if !state.kills.terminating(pid) {
        info!("lifetime handle of VM {vm:?} (pid {pid}) closed while it holds {held} lease(s)");
        state.kills.start(pid, vm, held, now);
    }
}

/// The owner process `pid` exited: free its leases and forget it. Returns the connections
/// that were its lifetime handles, which must no longer point at this pid.
pub fn owner_exited(state: &mut State, pid: u32) -> Vec<ConnId> {
    let ending = state.kills.end(pid).unwrap_or("exited");
    let (held, names) = release_all(state, pid, "VM exited");
    let Some(entry) = state.owners.remove(pid) else {
        return Vec::new();
    };
    if held > 0 {
        released_event(
            &entry.owner,
            &names,
            format_args!(
                "VM {:?} (pid {pid}) {ending}; released {held} lease(s)",
                entry.owner.name
            ),
        );
    } else {
        debug!("VM {:?} (pid {pid}) {ending}", entry.owner.name);
    }
    entry.handles
}
