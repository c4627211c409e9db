//! Storage liveness per mount (docs/storage.md, "Partitions"): a heartbeat that must reach the
//! storage server, every `heartbeat_interval_ms`, for every mount on which this host holds
//! leases; fence.rs stops the VMs of a mount not confirmed for `fence_after_ms`.
//!
//! Why: an NFSv4 server keeps a client's locks only while the client renews its lease (90 s
//! on Linux servers). A host cut off from its storage for longer loses its locks on the server,
//! another host takes them and starts the VM, and the cut-off host's QEMU — still running, its
//! writes queued in the kernel — writes to a disk another VM now owns once the network heals.
//! The lost-lock probe (lost.rs) cannot help: a probe that hangs tells nothing until it returns.
//!
//! The beat: `<dir>/.lockwarden/heartbeat@<host>` next to one of the mount's leased files
//! (the same directory rules as holder side files, docs/holders.md) gets a fixed-size line
//! with a new sequence number written at offset 0 and is then `fsync`ed. The new content makes
//! the page dirty, and `fsync` on NFS returns only when the server acknowledged the WRITE and
//! the COMMIT (an NFSv4 WRITE also renews the client's lease): the client's page or attribute
//! cache cannot answer it. Where no such file can be kept (the directory is unsafe, read-only,
//! squashed), the beat tests the lock of one of the mount's leases on its descriptor
//! (`F_OFD_GETLK`): our own lock does not conflict with its own open file description, so
//! nothing local answers, and the NFS client asks the server (NLM TEST, NFSv4 LOCKT) unless
//! the mount uses `local_lock`. A test changes nothing on the server.
//!
//! Timing: the beats of a mount run on a storage thread of their own (pool key
//! "<mount> (heartbeat)", one thread), so a mount that is merely busy (its 32 threads waiting
//! on slow acquires) does not delay them; one beat is in flight per mount at a time. A beat
//! that succeeds confirms the mount as of the moment it was *sent* (`CLOCK_BOOTTIME`, a
//! monotonic clock that also runs while the host is suspended, as the server's does): the server
//! saw it after that. The event loop's timer compares that time with `fence_after_ms`; nothing
//! waits for a hung beat to return.

use super::beat::{Beat, Beaten, boot_now};
use super::fence;
use super::lease::LeaseKey;
use super::ledger::JobFor;
use super::liveness::{Mount, mount_of};
use super::state::State;
use super::storage::{JobId, Work};
use log::{error, info, warn};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The event loop's timer: scan for mounts with leases, send beats that are due, warn, fence.
pub fn tick(state: &mut State, now: Instant) {
    let Some(interval) = state.heartbeat.interval else {
        return;
    };
    let boot = boot_now();
    if state.heartbeat.next_scan.is_some_and(|t| t <= now) {
        scan(state, now, boot);
        state.heartbeat.next_scan = Some(now + interval);
        state.heartbeat.last_scan = Some(boot);
    }
    let fence_after = state.heartbeat.fence_after;
    let mut due = Vec::new();
    let mut stale = Vec::new();
    let stalls = &mut state.metrics.heartbeat_stalls;
    for (path, m) in &mut state.heartbeat.mounts {
        if m.in_flight.is_none() && m.next_beat <= now {
            due.push(path.clone());
        }
        let age = boot.saturating_sub(m.confirmed);
        if !m.warned && age >= fence_after / 2 {
            // metrics (issue 18): one heartbeat stall per outage of the mount.
            *stalls.entry(super::metrics::mount_label(path)).or_default() += 1;
        }
        if !m.warned && age >= fence_after / 2 && age < fence_after {
            m.warned = true;
            warn!(
                "the storage behind mount {path:?} has not confirmed a heartbeat for {} ms; \
                 the VMs holding leases there are stopped if it stays silent for {} ms \
                 (fence_after_ms); check the storage server and the network to it",
                age.as_millis(),
                fence_after.as_millis()
            );
        }
        if !m.fenced && age >= fence_after {
            m.fenced = true;
            m.warned = true;
            stale.push((path.clone(), age));
        }
    }
    for path in due {
        send(state, &path, now);
    }
    for (path, age) in stale {
        fence::fence_mount(state, &path, age);
    }
}

/// Bring the set of tracked mounts in line with the lease table.
fn scan(state: &mut State, now: Instant, boot: Duration) {
    state.mounts.refresh();
    let mut seen: HashMap<PathBuf, LeaseKey> = HashMap::new();
    for (k, l) in state.leases.iter() {
        if let Some(m) = mount_of(&state.mounts, k, &l.lock_path) {
            seen.entry(m).or_insert(*k);
        }
    }
    let hb = &mut state.heartbeat;
    let mut files = Vec::new();
    hb.mounts.retain(|m, t| {
        let keep = seen.contains_key(m);
        if !keep {
            files.extend(t.file.take().map(|f| (m.clone(), f)));
        }
        keep
    });
    let leases = &state.leases;
    let since = hb.last_scan.unwrap_or(boot);
    for (path, lease) in seen {
        match hb.mounts.get_mut(&path) {
            Some(m) => {
                // Keep a lease that is still held for the next beats.
                if leases.get(&m.lease).is_none() {
                    m.lease = lease;
                }
            }
            None => {
                // Its first lease was taken after the previous scan: the storage answered
                // that lock request after `since`.
                hb.mounts.insert(
                    path,
                    Mount {
                        confirmed: since,
                        in_flight: None,
                        next_beat: now,
                        file: None,
                        fenced: false,
                        warned: false,
                        error: None,
                        no_file: None,
                        lease,
                    },
                );
            }
        }
    }
    state
        .heartbeat
        .fenced
        .retain(|k, _| leases.get(k).is_some());
    // Heartbeat files of mounts without leases any more: closed on their heartbeat thread.
    for (m, f) in files {
        state.submit_to(&pool_of(&m), 1, false, Work::Close(vec![f]), JobFor::Other);
    }
}

/// Send mount `path`'s next beat on its heartbeat thread.
fn send(state: &mut State, path: &PathBuf, now: Instant) {
    let interval = state.heartbeat.interval.unwrap_or(Duration::from_secs(1));
    state.heartbeat.seq += 1;
    let seq = state.heartbeat.seq;
    let host = state.hostname.clone();
    let Some(m) = state.heartbeat.mounts.get_mut(path) else {
        return;
    };
    let Some(l) = state.leases.get(&m.lease) else {
        // That lease is gone: the next scan (now) picks another one, or drops the mount.
        state.heartbeat.next_scan = Some(now);
        return;
    };
    let work = Work::Heartbeat(Box::new(Beat {
        mount: path.clone(),
        file: m.file.take(),
        lease: Arc::clone(&l.fd),
        mode: l.mode,
        host,
        seq,
    }));
    let job = state.submit_to(&pool_of(path), 1, false, work, JobFor::Heartbeat);
    if let Some(m) = state.heartbeat.mounts.get_mut(path) {
        m.in_flight = Some((job, boot_now()));
        m.next_beat = now + interval;
    }
}

/// The storage pool key of `mount`'s heartbeat thread.
fn pool_of(mount: &Path) -> PathBuf {
    PathBuf::from(format!("{} (heartbeat)", mount.display()))
}

/// A beat came back.
pub fn on_beat(state: &mut State, job: JobId, b: Beaten) {
    let now = Instant::now();
    let boot = boot_now();
    let age = state.heartbeat.age(&b.mount, boot);
    let mine = state
        .heartbeat
        .mounts
        .get(&b.mount)
        .and_then(|m| m.in_flight)
        .is_some_and(|(id, _)| id == job);
    let Some(m) = state.heartbeat.mounts.get_mut(&b.mount).filter(|_| mine) else {
        // The mount has no leases any more: close its file on its heartbeat thread.
        if let Some(f) = b.file {
            let pool = pool_of(&b.mount);
            state.submit_to(&pool, 1, false, Work::Close(vec![f]), JobFor::Other);
        }
        return;
    };
    let Some((_, sent)) = m.in_flight.take() else {
        return;
    };
    m.file = b.file;
    if let Some(why) = b.no_file {
        if m.no_file.as_deref() != Some(why.as_str()) {
            warn!(
                "no heartbeat file on mount {:?}: {why}; its heartbeat tests a lease's lock \
                 instead (that also reaches the server)",
                b.mount
            );
            m.no_file = Some(why);
        }
    }
    match b.result {
        Ok(()) => {
            if sent > m.confirmed {
                m.confirmed = sent;
            }
            m.error = None;
            if boot.saturating_sub(m.confirmed) >= state.heartbeat.fence_after {
                // A beat sent before or during the outage that got through only now confirms
                // nothing recent: send a fresh one at once, and heal only when it is back.
                m.next_beat = now;
                return;
            }
            let was_fenced = m.fenced;
            let was_warned = m.warned;
            m.fenced = false;
            m.warned = false;
            if was_fenced {
                info!(
                    "the storage behind mount {:?} answers again (silent for {} ms); re-checking \
                     the locks of the VMs stopped for it",
                    b.mount,
                    age.unwrap_or_default().as_millis()
                );
            } else if was_warned {
                info!(
                    "the storage behind mount {:?} answers again after {} ms; nothing was done \
                     to its VMs",
                    b.mount,
                    age.unwrap_or_default().as_millis()
                );
            }
            // Fenced leases of this mount not re-checked yet (or whose re-check was not
            // conclusive): re-check them now.
            if !state.heartbeat.fenced.is_empty() {
                fence::healed(state, &b.mount);
            }
        }
        Err(e) => {
            if m.error.as_deref() != Some(e.as_str()) {
                error!(
                    "heartbeat on mount {:?} failed: {e}; the mount counts as unconfirmed since \
                     {} ms ago (its VMs are stopped after {} ms); check the storage behind it",
                    b.mount,
                    age.unwrap_or_default().as_millis(),
                    state.heartbeat.fence_after.as_millis()
                );
                if let Some(m) = state.heartbeat.mounts.get_mut(&b.mount) {
                    m.error = Some(e);
                }
            }
        }
    }
}
