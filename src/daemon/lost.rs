//! Lost-lock detection (docs/storage.md, docs/hardening.md): every `lease_check_interval_ms`
//! each held lease is probed on its mount's storage thread, and a lease found lost triggers its
//! owners' `on_lockfailure` action.
//!
//! The probe re-issues the lease's own OFD lock (same type, byte 0) on its descriptor. For a
//! lock we still hold this is a no-op on a local file system; on NFS it travels to the server
//! (NLM or an NFSv4 LOCK). What the answer means ([`classify`]):
//! - a **definitive loss**, acted on at once: a conflict (EAGAIN/EACCES: the server handed the
//!   byte to somebody else), or EIO/ENOLCK (an NFSv4 client that lost its lease and its locks
//!   with it, `nfs.recover_lost_locks=0`, answers EIO; NLM answers ENOLCK), ESTALE (the file is
//!   gone on the server) or EBADF;
//! - a **transient error** (ETIMEDOUT from a `softerr` mount, EINTR, ENOMEM, ENOBUFS, network
//!   errors, and any errno not listed above): the lock may well still be ours, so the VM is
//!   left alone and the lease probed again at the next round; only [`TRANSIENT_LIMIT`]
//!   transient errors in a row (no good probe between them) count as a loss, because a lock
//!   that cannot be confirmed for that long may have expired on the server (an NFSv4 lease is
//!   90 s by default; 3 probes at the default 10 s interval stay well inside it).
//!
//! A probe that does not come back (hung storage) is not a loss: it is simply not sent again
//! until it returns.
//!
//! Actions: `poweroff` and `restart` (a lock manager cannot restart a domain; libvirt itself
//! only honours `restart` for a few events) SIGKILL the QEMU process; `default` does the same,
//! erring on the side of the data. `pause` sends SIGSTOP: every vCPU and I/O thread stops, so
//! the guest cannot write another byte; libvirt sees the monitor stop answering (commands time
//! out) until an operator resumes the process with SIGCONT after fixing the storage, or
//! destroys the domain. `ignore` only logs.
//!
//! A lost lease stays in the probe rounds: each probe of it also tries to take the lock back.
//! The first re-check after the action, every one whose answer differs from the last (EIO, then
//! a conflict), and every [`STILL_LOST_EVERY`]th one report that the lock is still lost (and
//! whether somebody else holds it); a probe that succeeds
//! reports that the lock is held again, so the operator of a paused VM knows when resuming it
//! is safe again. lockwardend never resumes a VM by itself: whether somebody wrote to the disk
//! meanwhile is for the operator to check.

use super::health::{Verdict, classify};
use super::lease::LeaseKey;
use super::ledger::JobFor;
use super::state::State;
use super::storage::{JobId, Work};
use crate::protocol::{FailureAction, LeaseInfo, Owner};
use crate::text::now_secs;
use log::{error, info, warn};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

/// Transient probe errors in a row that count as a loss (docs/hardening.md).
pub const TRANSIENT_LIMIT: u32 = 3;

/// A lost lease's re-checks: the first one and every this many after it are reported.
pub const STILL_LOST_EVERY: u32 = 30;

/// Start a round of probes when it is time.
pub fn tick(state: &mut State, now: Instant) {
    if state.health.round_due(now) {
        state.mounts.refresh();
        let leases = &state.leases;
        state.health.retain(|k| leases.get(k).is_some());
        // Lost leases too: a paused (or ignoring) VM's lock is re-checked and taken back.
        state
            .health
            .begin_round(state.leases.iter().map(|(k, _)| *k));
    }
    // A turn of the round per loop round (health.rs `PROBES_PER_TURN`).
    for key in state.health.next_turn() {
        if state.health.is_probing(&key) {
            continue;
        }
        if probe(state, key, JobFor::Probe).is_some() {
            state.health.start_probe(key);
        }
    }
}

/// Re-issue lease `key`'s own lock on its descriptor, as a job on its mount's storage threads
/// (inline only on a proven host-local mount), its result routed by `for_`: the lost-lock
/// probe, a fence's re-check after the storage answers, and `thaw`'s re-verification all ask
/// the storage the same question. `None`: no such lease.
pub fn probe(state: &mut State, key: LeaseKey, for_: JobFor) -> Option<JobId> {
    let l = state.leases.get(&key)?;
    let (fd, mode) = (Arc::clone(&l.fd), l.mode);
    let mount = state.mounts.of(&l.lock_path);
    Some(state.submit(&mount, Work::Probe { key, fd, mode }, for_))
}

/// A probe came back.
pub fn on_probe(state: &mut State, key: LeaseKey, fd: &Arc<OwnedFd>, result: Result<(), Errno>) {
    state.health.probe_back(&key);
    let verdict = classify(result);
    let Some(l) = state.leases.get_mut(&key) else {
        state.health.forget(&key);
        return;
    };
    if !Arc::ptr_eq(&l.fd, fd) {
        return;
    }
    if l.lost {
        recheck(state, key, verdict, result);
        return;
    }
    let (name, lock_path) = (l.name.clone(), l.lock_path.clone());
    let err = match (verdict, result) {
        (Verdict::Held, _) | (_, Ok(())) => {
            // The common case: a good probe of a lease with no history costs no allocation.
            if let Some(t) = state.health.forget(&key) {
                if t.transient > 0 {
                    let vms = owner_names(state, key);
                    info!(
                        "lock on {name:?} ({lock_path:?}) of {vms} confirmed again after {} \
                         transient probe error(s); nothing was done to the VM",
                        t.transient
                    );
                }
            }
            return;
        }
        (_, Err(e)) => e,
    };
    let why = match verdict {
        Verdict::Transient => {
            let t = state.health.track(key);
            t.transient += 1;
            if t.transient < TRANSIENT_LIMIT {
                let n = t.transient;
                let vms = owner_names(state, key);
                warn!(
                    "cannot confirm the lock on {name:?} ({lock_path:?}) of {vms}: {} ({err}); \
                     a transient error ({} of {TRANSIENT_LIMIT} in a row before it counts as \
                     lost): nothing is done to the VM, the next probe tries again; check the \
                     storage and the network to it",
                    err.desc(),
                    n
                );
                return;
            }
            format!(
                "{TRANSIENT_LIMIT} probes in a row could not confirm it (last error: {} ({err})), \
                 so it may have expired on the server",
                err.desc()
            )
        }
        Verdict::Conflict => format!("somebody else holds it now ({}, {err})", err.desc()),
        _ => format!("the storage no longer grants it ({}, {err})", err.desc()),
    };
    declare_lost(state, key, &why);
}

/// `VM "a" (pid 1), VM "b" (pid 2)` for the owners of lease `key`.
fn owner_names(state: &State, key: LeaseKey) -> String {
    let Some(l) = state.leases.get(&key) else {
        return "no VM".into();
    };
    let names: Vec<String> = l
        .owners
        .keys()
        .map(|pid| match state.owners.get(*pid) {
            Some(e) => format!("VM {:?} (pid {pid})", e.owner.name),
            None => format!("pid {pid}"),
        })
        .collect();
    if names.is_empty() {
        "no VM".into()
    } else {
        names.join(", ")
    }
}

/// The lock of lease `key` is lost: act on every owner, record the detection.
fn declare_lost(state: &mut State, key: LeaseKey, why: &str) {
    let Some(l) = state.leases.get_mut(&key) else {
        return;
    };
    l.lost = true;
    let t = state.health.track(key);
    t.transient = 0;
    t.rechecks = 0;
    t.last = None;
    let (name, lock_path) = (l.name.clone(), l.lock_path.clone());
    let pids: Vec<u32> = l.owners.keys().copied().collect();
    for pid in pids {
        let Some(e) = state.owners.get(pid) else {
            continue;
        };
        let vm = e.owner.name.clone();
        let uuid = e.owner.uuid.clone();
        let (sig, what) = match e.action {
            FailureAction::Ignore => (None, "on_lockfailure=ignore: leaving it running"),
            FailureAction::Pause => (
                Some(Signal::SIGSTOP),
                "on_lockfailure=pause: stopping its process (SIGSTOP) so the guest cannot write; \
                 the lock keeps being re-checked",
            ),
            FailureAction::Poweroff | FailureAction::Restart | FailureAction::Default => (
                Some(Signal::SIGKILL),
                "on_lockfailure=poweroff/restart/default: killing its process (SIGKILL)",
            ),
        };
        super::logging::event(
            log::Level::Error,
            super::logging::Event::Lost,
            &[("VM_NAME", &vm), ("VM_UUID", &uuid), ("DISK", &name)],
            format_args!(
                "lock on {name:?} ({lock_path:?}) of VM {vm:?} (pid {pid}) is LOST: {why}; \
                 another host may now write to it; {what}"
            ),
        );
        if let Some(sig) = sig {
            if let Err(e2) = e.proc.signal(sig) {
                warn!(
                    "cannot send {sig} to VM {vm:?} (pid {pid}): {}; stop it by hand",
                    e2.desc()
                );
            }
        }
    }
    record(state, key);
}

/// Mark lease `key` lost and record the detection for `Request::Lost` (its owners were acted
/// on by the caller: `declare_lost`, or fence.rs after a partition).
pub fn record(state: &mut State, key: LeaseKey) {
    let Some(l) = state.leases.get_mut(&key) else {
        return;
    };
    l.lost = true;
    let (name, lock_path, kind, mode) = (l.name.clone(), l.lock_path.clone(), l.kind, l.mode);
    let owners: Vec<Owner> = l
        .owners
        .keys()
        .filter_map(|pid| state.owners.get(*pid).map(|e| e.owner.clone()))
        .collect();
    state.metrics.lost += 1;
    state.health.detected(LeaseInfo {
        name: name.to_string(),
        kind,
        mode,
        lock_path: lock_path.to_string(),
        owners,
        since: now_secs(),
        fence: None,
    });
}

/// A lease already found lost was probed again (the probe also tried to take the lock back).
fn recheck(state: &mut State, key: LeaseKey, verdict: Verdict, result: Result<(), Errno>) {
    let vms = owner_names(state, key);
    let Some(l) = state.leases.get_mut(&key) else {
        return;
    };
    let (name, lock_path) = (l.name.clone(), l.lock_path.clone());
    let t = state.health.track(key);
    if verdict == Verdict::Held {
        l.lost = false;
        let checks = t.rechecks + 1;
        state.health.forget(&key);
        warn!(
            "lock on {name:?} ({lock_path:?}) of {vms} is held again (taken back after {checks} \
             re-check(s) of the lost lock); a VM paused for it stays paused: check that no other \
             host wrote to the disk meanwhile, then resume it with SIGCONT to its process \
             (virsh resume refuses: libvirt did not pause it and considers it running; \
             docs/operators.md, section 10)"
        );
        return;
    }
    t.rechecks += 1;
    let changed = std::mem::replace(&mut t.last, result.err()) != result.err();
    if changed || t.rechecks == 1 || t.rechecks % STILL_LOST_EVERY == 0 {
        let how = match (verdict, result) {
            (Verdict::Conflict, Err(e)) => format!("somebody else holds it ({})", e.desc()),
            (_, Err(e)) => format!("{} ({e})", e.desc()),
            (_, Ok(())) => "unknown".into(),
        };
        error!(
            "lock on {name:?} ({lock_path:?}) of {vms} is still LOST at re-check {}: {how}; the \
             VM must not run on this disk until the lock is back (re-checked every round; \
             reported when the answer changes and every {STILL_LOST_EVERY} re-checks)",
            t.rechecks
        );
    }
}
