//! Fencing (docs/storage.md, "Partitions"): when the storage behind a mount has not confirmed
//! a heartbeat (heartbeat.rs) for `fence_after_ms`, every VM holding a lease there gets its
//! `on_lockfailure` action *before* the storage's own lease can run out and give the disk to
//! another host: `pause` → SIGSTOP, `poweroff`/`restart`/default → SIGKILL, `ignore` → an error
//! in the log saying the VM is now unprotected.
//!
//! When the storage answers again, each fenced lease's lock is re-requested on its descriptor
//! (`F_OFD_SETLK`, which reaches the server): still ours → a paused VM stays stopped until an
//! operator resumes it (it is safe to, as far as the lock goes; the log says so); lost, or held
//! by somebody else → the VM is killed whatever its action, because another host may have
//! written to the disk meanwhile and the VM must never run on it again. Every event is logged
//! once per lease.

use super::health::{self, Verdict};
use super::lease::LeaseKey;
use super::ledger::JobFor;
use super::liveness::{self, Fenced, Stage};
use super::lost;
use super::state::State;
use crate::protocol::FailureAction;
use crate::text::esc;
use log::{error, warn};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Apply the `on_lockfailure` action to every VM holding a lease on `mount`, silent for `age`.
pub fn fence_mount(state: &mut State, mount: &Path, age: Duration) {
    let now = Instant::now();
    let fence_after = state.heartbeat.fence_after;
    let keys: Vec<LeaseKey> = state
        .leases
        .iter()
        .filter(|(k, l)| {
            liveness::mount_of(&state.mounts, k, &l.lock_path).as_deref() == Some(mount)
                && state
                    .heartbeat
                    .fenced
                    .get(k)
                    .is_none_or(|f| f.state != Stage::Fenced)
        })
        .map(|(k, _)| *k)
        .collect();
    // The disks of each VM fenced now: one FENCE line and one signal per VM, whatever the
    // number of its leases on this mount.
    let mut per_vm: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for key in keys {
        let Some(l) = state.leases.get(&key) else {
            continue;
        };
        let disk = if l.name == l.lock_path {
            format!("{:?}", l.name)
        } else {
            format!("{:?} ({:?})", l.name, l.lock_path)
        };
        let pids: Vec<u32> = l.owners.keys().copied().collect();
        let applied: Vec<String> = pids
            .iter()
            .filter_map(|pid| state.owners.get(*pid))
            .map(|e| {
                let (sig, act) = match e.action {
                    FailureAction::Ignore => ("nothing (UNPROTECTED)", "ignore"),
                    FailureAction::Pause => ("SIGSTOP", "pause"),
                    FailureAction::Poweroff => ("SIGKILL", "poweroff"),
                    FailureAction::Restart => ("SIGKILL", "restart"),
                    FailureAction::Default => ("SIGKILL", "default"),
                };
                format!("VM '{}': {sig} (on_lockfailure={act})", esc(&e.owner.name))
            })
            .collect();
        state.heartbeat.fenced.insert(
            key,
            Fenced {
                mount: mount.to_path_buf(),
                at: now,
                state: Stage::Fenced,
                wall: crate::text::now_secs(),
                action: applied.join(", "),
            },
        );
        for pid in pids {
            per_vm.entry(pid).or_default().push(disk.clone());
        }
    }
    for (pid, disks) in per_vm {
        let Some(e) = state.owners.get(pid) else {
            continue;
        };
        let vm = e.owner.name.clone();
        let (sig, what) = match e.action {
            FailureAction::Ignore => (
                None,
                "on_lockfailure=ignore: the VM keeps running and is now UNPROTECTED: if the \
                 storage gives its lock to another host, two VMs may write this disk",
            ),
            FailureAction::Pause => (
                Some(Signal::SIGSTOP),
                "on_lockfailure=pause: stopping its process (SIGSTOP) so the guest issues no \
                 new write (a write already queued in the kernel may still reach the storage \
                 when it answers: docs/storage.md, \"Limits\"; only watchdog_device covers \
                 that); the lock is re-checked when the storage answers",
            ),
            FailureAction::Poweroff | FailureAction::Restart | FailureAction::Default => (
                Some(Signal::SIGKILL),
                "on_lockfailure=poweroff/restart/default: killing its process (SIGKILL)",
            ),
        };
        let uuid = e.owner.uuid.clone();
        let mount_text = mount.to_string_lossy();
        let disk_list = disks.join(", ");
        super::logging::event(
            log::Level::Error,
            super::logging::Event::Fenced,
            &[
                ("VM_NAME", &vm),
                ("VM_UUID", &uuid),
                ("DISK", &disk_list),
                ("MOUNT", &mount_text),
            ],
            format_args!(
                "FENCE: the storage behind mount {mount:?} has not confirmed a heartbeat for {} \
                 ms (fence_after_ms = {}): VM {vm:?} (pid {pid}) holds {disk_list} there, and \
                 the storage may give that lock to another host once its own lease expires; \
                 {what}",
                age.as_millis(),
                fence_after.as_millis(),
            ),
        );
        if let Some(sig) = sig {
            signal(e, pid, &vm, sig);
        }
        state.metrics.fences += 1;
    }
}

fn signal(e: &super::owner::OwnerEntry, pid: u32, vm: &str, sig: Signal) {
    match e.proc.signal(sig) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(err) => error!(
            "cannot send {sig} to VM {vm:?} (pid {pid}): {}; stop it by hand (virsh destroy) \
             before the storage's lease expires",
            err.desc()
        ),
    }
}

/// The storage behind `mount` answers again: re-check every lease fenced for it.
pub fn healed(state: &mut State, mount: &Path) {
    let todo: Vec<LeaseKey> = state
        .heartbeat
        .fenced
        .iter()
        .filter(|(_, f)| f.mount == mount && f.state == Stage::Fenced)
        .map(|(k, _)| *k)
        .collect();
    for key in todo {
        if lost::probe(state, key, JobFor::Fence).is_none() {
            continue;
        }
        if let Some(f) = state.heartbeat.fenced.get_mut(&key) {
            f.state = Stage::Checking;
        }
    }
}

/// A fenced lease's re-check came back.
pub fn on_recheck(state: &mut State, key: LeaseKey, fd: &Arc<OwnedFd>, result: Result<(), Errno>) {
    let Some(l) = state.leases.get(&key) else {
        state.heartbeat.fenced.remove(&key);
        return;
    };
    if !Arc::ptr_eq(&l.fd, fd) {
        return;
    }
    let (name, lock_path) = (l.name.clone(), l.lock_path.clone());
    let pids: Vec<u32> = l.owners.keys().copied().collect();
    let Some(f) = state.heartbeat.fenced.get_mut(&key) else {
        return;
    };
    let silent = f.at.elapsed();
    let mount = f.mount.clone();
    let verdict = health::classify(result);
    if liveness::silent(&state.heartbeat, &mount)
        && !matches!(verdict, Verdict::Conflict | Verdict::Lost)
    {
        // The storage went silent again meanwhile (this lease was fenced again): an answer
        // from before says nothing now; checked again after the next confirmed heartbeat.
        if let Some(f) = state.heartbeat.fenced.get_mut(&key) {
            f.state = Stage::Fenced;
        }
        return;
    }
    let Some(f) = state.heartbeat.fenced.get_mut(&key) else {
        return;
    };
    match verdict {
        Verdict::Held => {
            f.state = Stage::Held;
            for pid in pids {
                let Some(e) = state.owners.get(pid) else {
                    continue;
                };
                let vm = &e.owner.name;
                let advice = match e.action {
                    FailureAction::Pause => {
                        "it stays stopped: check that no other host used the disk meanwhile, then \
                         resume it with `lockwarden thaw VM` (which re-verifies the lock first; \
                         virsh resume cannot resume a process lockwardend stopped) or destroy it \
                         (virsh destroy)"
                    }
                    FailureAction::Ignore => "it kept running; it is protected again",
                    _ => "it was killed; its lease goes when its process is gone",
                };
                warn!(
                    "the lock on {name:?} ({lock_path:?}) of VM {vm:?} (pid {pid}) is still held \
                     after the storage behind mount {mount:?} came back ({} ms after the fence); \
                     {advice}",
                    silent.as_millis()
                );
            }
        }
        Verdict::Transient => {
            // Tried again at the next confirmed heartbeat.
            f.state = Stage::Fenced;
            let e = result.err().unwrap_or(Errno::EIO);
            warn!(
                "cannot re-check the lock on {name:?} ({lock_path:?}) after the storage behind \
                 mount {mount:?} came back: {} ({e}); its VMs stay stopped, the next heartbeat \
                 tries again",
                e.desc()
            );
        }
        Verdict::Conflict | Verdict::Lost => {
            f.state = Stage::Lost;
            let e = result.err().unwrap_or(Errno::EIO);
            for pid in pids {
                let Some(o) = state.owners.get(pid) else {
                    continue;
                };
                let vm = o.owner.name.clone();
                super::logging::event(
                    log::Level::Error,
                    super::logging::Event::Lost,
                    &[
                        ("VM_NAME", &vm),
                        ("VM_UUID", &o.owner.uuid),
                        ("DISK", &name),
                    ],
                    format_args!(
                        "the lock on {name:?} ({lock_path:?}) of VM {vm:?} (pid {pid}) was LOST \
                         while the storage behind mount {mount:?} did not answer ({}, {e}): \
                         another host may have used the disk; killing the VM (SIGKILL) whatever \
                         its on_lockfailure, it must never run on this disk again",
                        e.desc()
                    ),
                );
                signal(o, pid, &vm, Signal::SIGKILL);
            }
            lost::record(state, key);
        }
    }
}
