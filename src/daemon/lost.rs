//! Lost-lock detection (docs/storage.md): every `lease_check_interval_ms` each held lease is
//! probed on its mount's storage thread, and a lease found lost triggers its owners'
//! `on_lockfailure` action.
//!
//! The probe re-issues the lease's own OFD lock (same type, byte 0) on its descriptor. For a
//! lock we still hold this is a no-op on a local file system; on NFS it travels to the server
//! (NLM or an NFSv4 LOCK), so a client that marked the lock lost after a lease expiry answers
//! EIO (or ENOLCK), and a server that handed the byte to somebody else answers EAGAIN. Any error
//! but EINTR counts as lost. A probe that does not come back (hung storage) is not a loss: it is
//! simply not sent again until it returns, and is logged when it returns late.
//!
//! Actions: `poweroff` and `restart` (a lock manager cannot restart a domain; libvirt itself
//! only honours `restart` for a few events) SIGKILL the QEMU process; `default` does the same,
//! erring on the side of the data. `pause` sends SIGSTOP: every vCPU and I/O thread stops, so
//! the guest cannot write another byte; libvirt sees the monitor stop answering (commands time
//! out) until an operator resumes the process with SIGCONT after fixing the storage, or
//! destroys the domain. `ignore` only logs.

use super::lease::LeaseKey;
use super::state::{JobFor, State};
use super::storage::Work;
use super::text::now_secs;
use crate::protocol::{FailureAction, LeaseInfo, LeaseMode, Owner};
use log::{error, warn};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

/// Detections kept for `Request::Lost`.
const RECENT: usize = 256;

/// Start a round of probes when it is time.
pub fn tick(state: &mut State, now: Instant) {
    let Some(interval) = state.check_interval else {
        return;
    };
    match state.next_check {
        Some(t) if t > now => return,
        _ => state.next_check = Some(now + interval),
    }
    state.mounts.refresh();
    let todo: Vec<(LeaseKey, Arc<OwnedFd>, LeaseMode, Arc<str>)> = state
        .leases
        .iter()
        .filter(|(k, l)| !l.lost && !state.probing.contains(k))
        .map(|(k, l)| (*k, Arc::clone(&l.fd), l.mode, l.lock_path.clone()))
        .collect();
    for (key, fd, mode, path) in todo {
        let mount = state.mounts.of(&path);
        let job = state.storage.submit(
            &mount,
            state.mounts.threads(&mount),
            state.mounts.is_local(&mount),
            Work::Probe { key, fd, mode },
        );
        state.jobs.insert(job, JobFor::Probe);
        state.probing.insert(key);
    }
}

/// A probe came back.
pub fn on_probe(state: &mut State, key: LeaseKey, fd: &Arc<OwnedFd>, result: Result<(), Errno>) {
    state.probing.remove(&key);
    let err = match result {
        Ok(()) | Err(Errno::EINTR) => return,
        Err(e) => e,
    };
    let Some(l) = state.leases.get_mut(&key) else {
        return;
    };
    if !Arc::ptr_eq(&l.fd, fd) || l.lost {
        return;
    }
    l.lost = true;
    let (name, lock_path, kind, mode) = (l.name.clone(), l.lock_path.clone(), l.kind, l.mode);
    let pids: Vec<u32> = l.owners.keys().copied().collect();
    let mut owners: Vec<Owner> = Vec::new();
    for pid in pids {
        let Some(e) = state.owners.get(pid) else {
            continue;
        };
        owners.push(e.owner.clone());
        let vm = e.owner.name.clone();
        let (sig, what) = match e.action {
            FailureAction::Ignore => (None, "on_lockfailure=ignore: leaving it running"),
            FailureAction::Pause => (
                Some(Signal::SIGSTOP),
                "on_lockfailure=pause: stopping its process (SIGSTOP) so the guest cannot write",
            ),
            FailureAction::Poweroff | FailureAction::Restart | FailureAction::Default => (
                Some(Signal::SIGKILL),
                "on_lockfailure=poweroff/restart/default: killing its process (SIGKILL)",
            ),
        };
        error!(
            "lock on {name:?} ({lock_path:?}) of VM {vm:?} (pid {pid}) is LOST: {} (the storage \
             no longer grants it; another host may now write to it); {what}",
            err.desc()
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
    state.lost_total += 1;
    state.recent_lost.push_back(LeaseInfo {
        name: name.to_string(),
        kind,
        mode,
        lock_path: lock_path.to_string(),
        owners,
        since: now_secs(),
    });
    while state.recent_lost.len() > RECENT {
        state.recent_lost.pop_front();
    }
}
