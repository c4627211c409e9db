//! What lockwardend counts for `lockwarden metrics` (issue 18, docs/operators.md §11), and the
//! snapshot a `metrics` request is answered with.
//!
//! Why counters live in `State` as one plain struct: the live re-exec writes them into its
//! state document with everything else (reexec.rs), so a reload keeps counting; a restart or a
//! crash starts from 0, which Prometheus' `rate()` and `increase()` expect of counters.

use super::state::State;
use crate::metrics::{Counters, LeaseCount, MountHealth, Snapshot};
use crate::protocol::{ErrorKind, LeaseMode, PROTOCOL_VERSION};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// Suffixes storage.rs adds to a mount point to name a pool of storage threads; a label shows
/// the mount point alone.
const POOL_SUFFIXES: [&str; 3] = [
    " (or wherever symlinks or .. in the path lead)",
    " (holder records)",
    " (heartbeat)",
];

/// The mount point a storage pool key stands for, as label text (invalid UTF-8 replaced).
pub fn mount_label(pool: &Path) -> String {
    let mut s = pool.to_string_lossy().into_owned();
    for suffix in POOL_SUFFIXES {
        if let Some(stripped) = s.strip_suffix(suffix) {
            s = stripped.to_string();
        }
    }
    s
}

/// The protocol's word for an error kind (docs/protocol.md), the `reason` label.
pub fn reason(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Busy => "busy",
        ErrorKind::Invalid => "invalid",
        ErrorKind::Denied => "denied",
        ErrorKind::Io => "io",
        ErrorKind::Timeout => "timeout",
        ErrorKind::Version => "version",
        ErrorKind::Internal => "internal",
    }
}

/// An acquire was refused with `kind`; `took`: how long it waited (None: refused before any
/// work, not in the latency histogram).
pub fn refused(c: &mut Counters, kind: ErrorKind, took: Option<Duration>) {
    *c.refusals.entry(reason(kind).to_string()).or_default() += 1;
    if let Some(t) = took {
        c.acquire_latency.observe(micros(t));
    }
}

/// An acquire succeeded after `took`.
pub fn acquired(c: &mut Counters, took: Duration) {
    c.acquires += 1;
    c.acquire_latency.observe(micros(took));
}

/// A request timed out on the storage behind pool `pool`.
pub fn stalled(c: &mut Counters, pool: &Path) {
    *c.request_stalls.entry(mount_label(pool)).or_default() += 1;
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Milliseconds of `CLOCK_BOOTTIME` now.
pub fn boot_ms() -> u64 {
    micros(super::heartbeat::boot_now()) / 1000
}

/// The answer to a `metrics` request.
pub fn snapshot(state: &State) -> Snapshot {
    let mut leases: BTreeMap<(String, bool), u64> = BTreeMap::new();
    for (k, l) in state.leases.iter() {
        let mount = match state.mounts.of_dev(k.dev) {
            Some((m, _)) => m.to_string_lossy().into_owned(),
            None => mount_label(&state.mounts.of(&l.lock_path)),
        };
        *leases
            .entry((mount, l.mode == LeaseMode::Shared))
            .or_default() += 1;
    }
    let leases = leases
        .into_iter()
        .map(|((mount, shared), count)| LeaseCount {
            mount,
            mode: if shared {
                LeaseMode::Shared
            } else {
                LeaseMode::Exclusive
            },
            count,
        })
        .collect();
    let mut fenced_pids = std::collections::BTreeSet::new();
    for key in state.heartbeat.fenced.keys() {
        if let Some(l) = state.leases.get(key) {
            fenced_pids.extend(l.owners.keys().copied());
        }
    }
    let mounts = state
        .heartbeat
        .mount_health()
        .into_iter()
        .map(|(m, age, fenced)| MountHealth {
            mount: m.to_string_lossy().into_owned(),
            heartbeat_age_ms: micros(age) / 1000,
            fenced,
        })
        .collect();
    let c = &state.metrics;
    Snapshot {
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: PROTOCOL_VERSION,
        pid: std::process::id(),
        started: state.started,
        uptime_ms: boot_ms().saturating_sub(c.started_boot_ms),
        owners: state.owners.len() as u64,
        leases,
        fenced_vms: fenced_pids.len() as u64,
        mounts,
        heartbeat_interval_ms: state.heartbeat.interval.map(|i| micros(i) / 1000),
        fence_after_ms: micros(state.heartbeat.fence_after) / 1000,
        keeper_up: state.keeper.connected(),
        keeper_pid: state.keeper.pid,
        counters: c.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_keys_become_mount_points() {
        assert_eq!(mount_label(Path::new("/srv/nfs")), "/srv/nfs");
        assert_eq!(mount_label(Path::new("/srv/nfs (heartbeat)")), "/srv/nfs");
        assert_eq!(
            mount_label(Path::new("/ (or wherever symlinks or .. in the path lead)")),
            "/"
        );
        assert_eq!(mount_label(Path::new("/m (holder records)")), "/m");
    }
}
