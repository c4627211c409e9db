//! `thaw` (admin socket; docs/protocol.md "thaw", docs/storage.md "Partitions"): resume a VM
//! that fence.rs stopped for a storage outage, once its locks are known to be still ours.
//!
//! A fenced lease whose storage answered again is re-checked by fence.rs (stage Held: "still
//! ours"), but that answer may be minutes old when an operator acts. So `thaw VM` re-verifies
//! every fenced lease of the VM *now*: a storage job per lease re-requests its OFD lock on its
//! own descriptor (`F_OFD_SETLK`, which reaches the server; the same probe as lost.rs), never
//! inline on the event loop. Only when every one of them is confirmed still ours is the VM's
//! process sent SIGCONT and its fence entries cleared; otherwise the request is refused and
//! nothing changes — except that a lock found lost follows fence.rs's rule (the VM is killed:
//! another host may have written to the disk meanwhile).
//!
//! Refused at once, changing nothing: an unknown VM, a VM with no fenced lease, a VM fenced with
//! a SIGKILL action (nothing to resume), a fenced lease whose storage has not answered since
//! (stage Fenced or Checking) or whose lock was already found lost.

use super::error::DaemonError;
use super::health::{self, Verdict};
use super::lease::LeaseKey;
use super::ledger::{Finished, JobFor, OpId, ThawOp, Wait};
use super::liveness::{self, Stage};
use super::lost;
use super::owner::ConnId;
use super::state::State;
use super::storage::JobId;
use crate::protocol::{ErrorKind, FailureAction, Response};
use crate::text::esc;
use log::{error, info, warn};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use std::collections::{BTreeSet, HashMap};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

fn refuse(kind: ErrorKind, message: String, resource: Option<String>) -> Response {
    let e = DaemonError::of(kind, message);
    match resource {
        Some(r) => e.about(&r),
        None => e,
    }
    .into_response()
}

/// Start a `thaw` of `vm` (name or UUID). `Err`: the answer, now (nothing was changed).
pub fn start(state: &mut State, conn: ConnId, vm: &str) -> Result<(), Box<Response>> {
    let shown = esc(vm);
    let mut pids: Vec<u32> = state
        .owners
        .iter()
        .filter(|(_, e)| e.owner.name == vm || e.owner.uuid.eq_ignore_ascii_case(vm))
        .map(|(pid, _)| *pid)
        .collect();
    pids.sort_unstable();
    if pids.is_empty() || vm.is_empty() {
        return Err(Box::new(refuse(
            ErrorKind::Invalid,
            format!(
                "no VM named '{shown}' or with that UUID is known to this lockwardend (it holds \
                 no leases here, or it is not running on this host: a VM fenced with a killing \
                 on_lockfailure action is gone once its process exited); `lockwarden list` shows \
                 the VMs holding leases; nothing was changed"
            ),
            None,
        )));
    }
    if state.ledger.thaws().any(|t| t.pids == pids) {
        return Err(Box::new(refuse(
            ErrorKind::Busy,
            format!(
                "a thaw of VM '{shown}' is already in progress (waiting for the storage to \
                 re-verify its locks); wait for its answer"
            ),
            None,
        )));
    }
    let mut keys: BTreeSet<LeaseKey> = BTreeSet::new();
    for pid in &pids {
        if let Some(e) = state.owners.get(*pid) {
            keys.extend(e.leases.iter().copied());
        }
    }
    let mut fenced: Vec<(LeaseKey, String)> = keys
        .iter()
        .filter(|k| state.heartbeat.fenced.contains_key(k))
        .filter_map(|k| state.leases.get(k).map(|l| (*k, l.lock_path.to_string())))
        .collect();
    fenced.sort_by(|a, b| a.1.cmp(&b.1));
    if fenced.is_empty() {
        return Err(Box::new(refuse(
            ErrorKind::Invalid,
            format!(
                "VM '{shown}' is not fenced: none of its {} lease(s) was stopped for a storage \
                 outage, so there is nothing to thaw (a VM paused by libvirt is resumed with \
                 `virsh resume`); nothing was changed",
                keys.len()
            ),
            None,
        )));
    }
    for pid in &pids {
        let Some(e) = state.owners.get(*pid) else {
            continue;
        };
        if matches!(
            e.action,
            FailureAction::Poweroff | FailureAction::Restart | FailureAction::Default
        ) {
            return Err(Box::new(refuse(
                ErrorKind::Invalid,
                format!(
                    "VM '{shown}' (pid {pid}) was fenced with on_lockfailure={}: its process was \
                     killed (SIGKILL), there is nothing to resume; once it is gone, start the VM \
                     again (virsh start) when its storage answers; nothing was changed",
                    e.action.word()
                ),
                None,
            )));
        }
    }
    for (key, _) in &fenced {
        let (Some(f), Some(l)) = (state.heartbeat.fenced.get(key), state.leases.get(key)) else {
            continue;
        };
        let name = esc(&l.name);
        let mount = esc(&f.mount.to_string_lossy());
        let ago = f.at.elapsed().as_secs();
        let silent = liveness::silent(&state.heartbeat, &f.mount);
        match f.state {
            Stage::Fenced | Stage::Checking => {
                let stage = if f.state == Stage::Checking && !silent {
                    "checking: the lock is being re-checked right now"
                } else {
                    "fenced: the storage has not confirmed a heartbeat since"
                };
                return Err(Box::new(refuse(
                    ErrorKind::Busy,
                    format!(
                        "cannot thaw VM '{shown}': disk {name} is on mount {mount}, whose storage \
                         stopped answering {ago} s ago ({stage}); thaw re-verifies the lock on \
                         the storage and can do so only once it answers: fix the storage or the \
                         network to it, wait until lockwardend logs that it answers again \
                         (`lockwarden list` then shows held-awaiting-thaw), then run thaw \
                         again; nothing was changed, the VM stays stopped"
                    ),
                    Some(l.name.to_string()),
                )));
            }
            Stage::Lost => {
                return Err(Box::new(refuse(
                    ErrorKind::Invalid,
                    format!(
                        "cannot thaw VM '{shown}': the lock on disk {name} was LOST while the \
                         storage behind mount {mount} did not answer, and the VM was killed: \
                         another host may have written to the disk, so it must never run on it \
                         again; check who holds it (lockwarden who {name}) before starting the \
                         VM anywhere"
                    ),
                    Some(l.name.to_string()),
                )));
            }
            _ if silent => {
                return Err(Box::new(refuse(
                    ErrorKind::Busy,
                    format!(
                        "cannot thaw VM '{shown}': the storage behind mount {mount} (disk {name}) \
                         stopped answering again; wait until it answers, then run thaw again; \
                         nothing was changed, the VM stays stopped"
                    ),
                    Some(l.name.to_string()),
                )));
            }
            _ => {}
        }
    }
    let op = state.ledger.next_id();
    let now = Instant::now();
    let mut jobs = HashMap::new();
    for (key, _) in &fenced {
        if let Some(job) = lost::probe(state, *key, JobFor::Thaw(op)) {
            jobs.insert(job, *key);
        }
    }
    info!(
        "thaw of VM {vm:?} (pid(s) {pids:?}) requested: re-verifying {} fenced lease(s) on the \
         storage",
        jobs.len()
    );
    state.ledger.park(
        op,
        Wait::Thaw(ThawOp {
            conn,
            vm: vm.to_string(),
            pids,
            jobs,
            results: Vec::new(),
            deadline: now + state.storage_timeout,
            started: now,
        }),
    );
    Ok(())
}

/// A re-verification came back.
pub fn on_verify(
    state: &mut State,
    op: OpId,
    job: JobId,
    key: LeaseKey,
    fd: &Arc<OwnedFd>,
    result: Result<(), Errno>,
) {
    let Some(t) = state.ledger.thaw_mut(op) else {
        return;
    };
    t.jobs.remove(&job);
    t.results.push((key, Arc::clone(fd), result));
    if !t.jobs.is_empty() {
        return;
    }
    if let Some(Wait::Thaw(t)) = state.ledger.take(op) {
        let response = decide(state, &t);
        answer(state, t.conn, response);
    }
}

fn answer(state: &mut State, conn: ConnId, response: Response) {
    state.ledger.answer(Finished {
        conn,
        response,
        restrict: false,
    });
}

/// Every re-check is back: thaw, or refuse (a lost lock kills the VM, fence.rs's rule).
fn decide(state: &mut State, t: &ThawOp) -> Response {
    let shown = esc(&t.vm);
    let mut lost_found: Vec<(LeaseKey, Arc<OwnedFd>, Result<(), Errno>)> = Vec::new();
    let mut refusal: Option<Response> = None;
    for (key, fd, result) in &t.results {
        let Some(l) = state.leases.get(key) else {
            refusal.get_or_insert_with(|| {
                refuse(
                    ErrorKind::Invalid,
                    format!(
                        "cannot thaw VM '{shown}': one of its fenced leases was released while \
                         it was re-verified (did the VM exit?); nothing was changed"
                    ),
                    None,
                )
            });
            continue;
        };
        let name = esc(&l.name);
        let same = Arc::ptr_eq(&l.fd, fd);
        let f = state.heartbeat.fenced.get(key);
        let mount = f
            .map(|f| esc(&f.mount.to_string_lossy()))
            .unwrap_or_default();
        let still_held = f.is_some_and(|f| f.state == Stage::Held)
            && !f.is_some_and(|f| liveness::silent(&state.heartbeat, &f.mount));
        let verdict = health::classify(*result);
        if f.is_none() {
            refusal.get_or_insert_with(|| {
                refuse(
                    ErrorKind::Invalid,
                    format!(
                        "VM '{shown}': the fence of disk {name} was cleared while its lock was \
                         re-verified (the lease was released, or the VM thawed by another \
                         request); nothing more was changed"
                    ),
                    Some(l.name.to_string()),
                )
            });
            continue;
        }
        if same && matches!(verdict, Verdict::Conflict | Verdict::Lost) {
            lost_found.push((*key, Arc::clone(fd), *result));
            continue;
        }
        if !same || !still_held {
            refusal.get_or_insert_with(|| {
                refuse(
                    ErrorKind::Busy,
                    format!(
                        "cannot thaw VM '{shown}': the storage behind mount {mount} (disk \
                         {name}) stopped answering again while the lock was re-verified; wait \
                         until it answers, then run thaw again; nothing was changed, the VM \
                         stays stopped"
                    ),
                    Some(l.name.to_string()),
                )
            });
            continue;
        }
        if verdict == Verdict::Transient {
            let e = result.err().unwrap_or(Errno::EIO);
            refusal.get_or_insert_with(|| {
                refuse(
                    ErrorKind::Io,
                    format!(
                        "cannot thaw VM '{shown}': re-verifying the lock on disk {name} (mount \
                         {mount}) failed: {} ({e}), which does not say whether the lock is \
                         still ours; nothing was changed, the VM stays stopped; check the \
                         storage, then run thaw again",
                        e.desc()
                    ),
                    Some(l.name.to_string()),
                )
            });
        }
    }
    if let Some((key, _, result)) = lost_found.first() {
        let name = state
            .leases
            .get(key)
            .map(|l| l.name.to_string())
            .unwrap_or_default();
        let e = result.err().unwrap_or(Errno::EIO);
        let found = match health::classify(*result) {
            Verdict::Conflict => format!("somebody else holds it now ({}, {e})", e.desc()),
            _ => format!("the storage no longer grants it ({}, {e})", e.desc()),
        };
        let kind = if health::classify(*result) == Verdict::Conflict {
            ErrorKind::Busy
        } else {
            ErrorKind::Io
        };
        // fence.rs's rule: a lock lost while the VM was stopped kills the VM.
        for (key, fd, result) in &lost_found {
            super::fence::on_recheck(state, *key, fd, *result);
        }
        return refuse(
            kind,
            format!(
                "cannot thaw VM '{shown}': the lock on disk {} is LOST: {found}; another host may \
                 have written to the disk, so the VM was killed (SIGKILL) and must never run on \
                 it again; check who holds it (lockwarden who {}) before starting the VM \
                 anywhere",
                esc(&name),
                esc(&name)
            ),
            Some(name),
        );
    }
    if let Some(r) = refusal {
        return r;
    }
    // Every fenced lease is ours: resume the VM, clear its fence entries.
    let keys: Vec<LeaseKey> = t.results.iter().map(|(k, _, _)| *k).collect();
    for pid in &t.pids {
        let Some(e) = state.owners.get(*pid) else {
            continue;
        };
        match e.proc.signal(Signal::SIGCONT) {
            Ok(()) => {}
            Err(err) => warn!(
                "thaw of VM {:?}: cannot send SIGCONT to pid {pid}: {}",
                e.owner.name,
                err.desc()
            ),
        }
    }
    let mut names = Vec::new();
    for key in &keys {
        // A shared lease also held by a VM not thawed here stays fenced for that VM.
        let others = state
            .leases
            .get(key)
            .is_some_and(|l| l.owners.keys().any(|p| !t.pids.contains(p)));
        if !others {
            state.heartbeat.fenced.remove(key);
        }
        if let Some(l) = state.leases.get(key) {
            names.push(format!("{:?}", l.name));
        }
    }
    info!(
        "thaw: VM {:?} (pid(s) {:?}) resumed (SIGCONT): the lock(s) on {} were re-verified on the \
         storage {} ms after the request",
        t.vm,
        t.pids,
        names.join(", "),
        t.started.elapsed().as_millis()
    );
    let mut leases = Vec::new();
    for pid in &t.pids {
        leases.extend(state.infos_of(*pid));
    }
    Response::Ok { leases }
}

/// Answer the thaws whose re-checks did not come back within `storage_timeout_ms`.
pub fn expired(state: &mut State, t: ThawOp) {
    let mut stuck: Vec<String> = Vec::new();
    for (job, key) in &t.jobs {
        state.ledger.reassign(*job, JobFor::Other);
        if let Some(l) = state.leases.get(key) {
            let mount = state
                .heartbeat
                .fenced
                .get(key)
                .map(|f| f.mount.to_string_lossy().into_owned())
                .unwrap_or_default();
            stuck.push(format!("disk {} (mount {})", esc(&l.name), esc(&mount)));
        }
    }
    stuck.sort();
    error!(
        "thaw of VM {:?}: the storage did not answer the re-verification within {} ms",
        t.vm,
        t.started.elapsed().as_millis()
    );
    let message = format!(
        "cannot thaw VM '{}': the storage did not answer the re-verification of {} within \
         {} ms (storage_timeout_ms); nothing was changed, the VM stays stopped; check the \
         storage, then run thaw again",
        esc(&t.vm),
        stuck.join(", "),
        t.started.elapsed().as_millis()
    );
    answer(state, t.conn, refuse(ErrorKind::Timeout, message, None));
}

/// A live re-exec cannot wait: refuse every thaw in flight (nothing was changed).
pub fn interrupted(state: &mut State, t: ThawOp) {
    for job in t.jobs.keys() {
        state.ledger.reassign(*job, JobFor::Other);
    }
    let message = format!(
        "lockwardend is re-executing (live upgrade) while the re-verification for thawing VM \
         '{}' was in flight; nothing was changed; run thaw again",
        esc(&t.vm)
    );
    answer(state, t.conn, refuse(ErrorKind::Timeout, message, None));
}

/// The client went away before the answer: nothing is done (a thaw nobody sees is not applied).
pub fn cancelled(state: &mut State, t: ThawOp) {
    for job in t.jobs.keys() {
        state.ledger.reassign(*job, JobFor::Other);
    }
    info!(
        "the client of the thaw of VM {:?} went away before the storage answered; \
         nothing was changed",
        t.vm
    );
}
