//! What the daemon knows about each mount's liveness: when its storage last confirmed a
//! heartbeat, the beat in flight, and which leases are fenced for an outage and how far their
//! re-check got. Plain data with the questions asked of it; heartbeat.rs sends the beats and
//! fence.rs stops and resumes VMs (docs/storage.md, "Partitions"). Kept apart from both so
//! the lease tables (state.rs) can hold it without importing the modules that act on it.

use super::beat::boot_now;
use super::lease::LeaseKey;
use super::storage::{JobId, Mounts};
use log::warn;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A fenced lease.
#[derive(Debug)]
pub struct Fenced {
    pub mount: PathBuf,
    pub at: Instant,
    pub state: Stage,
    /// Seconds since the epoch of the fence, and what was done to each VM (for `list`).
    pub wall: u64,
    pub action: String,
}

impl Fenced {
    /// What `list` reports about it.
    pub fn info(&self) -> crate::protocol::FenceInfo {
        use crate::protocol::FenceStage;
        crate::protocol::FenceInfo {
            stage: match self.state {
                Stage::Fenced => FenceStage::Fenced,
                Stage::Checking => FenceStage::Checking,
                Stage::Held => FenceStage::HeldAwaitingThaw,
                Stage::Lost => FenceStage::Lost,
            },
            mount: self.mount.to_string_lossy().into_owned(),
            since: self.wall,
            age_ms: u64::try_from(self.at.elapsed().as_millis()).unwrap_or(u64::MAX),
            action: self.action.clone(),
        }
    }
}

/// Where a fenced lease stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Its VMs were stopped; the storage has not answered yet.
    Fenced,
    /// The storage answers; the lock is being re-checked (job in flight).
    Checking,
    /// The lock was found still ours: its VMs stay as they are until an operator acts.
    Held,
    /// The lock was lost: its VMs were killed.
    Lost,
}

/// Heartbeat state of every mount with leases.
#[derive(Debug, Default)]
pub struct Heartbeats {
    /// `heartbeat_interval_ms` (None: no heartbeats, no fencing).
    pub interval: Option<Duration>,
    /// `fence_after_ms`.
    pub fence_after: Duration,
    pub(super) mounts: HashMap<PathBuf, Mount>,
    /// Leases fenced (their VMs stopped) and what became of them (fence.rs).
    pub fenced: HashMap<LeaseKey, Fenced>,
    pub(super) seq: u64,
    /// When the lease table is next scanned for mounts.
    pub(super) next_scan: Option<Instant>,
    /// The previous scan: a mount first seen now got its first lease after it.
    pub(super) last_scan: Option<Duration>,
}

#[derive(Debug)]
pub(super) struct Mount {
    /// Send time (`boot_now`) of the last beat the server answered (or when tracking began).
    pub(super) confirmed: Duration,
    pub(super) in_flight: Option<(JobId, Duration)>,
    pub(super) next_beat: Instant,
    pub(super) file: Option<OwnedFd>,
    /// The VMs of this mount were fenced for the current outage.
    pub(super) fenced: bool,
    /// The outage was reported (warning at half of fence_after).
    pub(super) warned: bool,
    /// The last beat error logged (each distinct one once per outage).
    pub(super) error: Option<String>,
    /// Why no heartbeat file is kept (logged once).
    pub(super) no_file: Option<String>,
    /// A lease of the mount (for the beat's file place and the fallback lock test).
    pub(super) lease: LeaseKey,
}

impl Heartbeats {
    /// Apply the settings; tracking starts at `now`.
    pub fn configure(&mut self, interval: Option<Duration>, fence_after: Duration, now: Instant) {
        self.interval = interval;
        self.fence_after = fence_after;
        self.next_scan = interval.map(|_| now);
        self.last_scan = Some(boot_now());
        if let Some(i) = interval {
            if fence_after <= i * 2 {
                warn!(
                    "fence_after_ms ({} ms) is not more than twice heartbeat_interval_ms ({} ms): \
                     a single slow heartbeat can stop VMs; set fence_after_ms to several \
                     intervals (docs/storage.md, \"Partitions\")",
                    fence_after.as_millis(),
                    i.as_millis()
                );
            }
        }
    }

    /// The next time `tick` has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.interval?;
        let fence_after = self.fence_after;
        let (now, boot) = (Instant::now(), boot_now());
        let at = |t: Duration| now + t.saturating_sub(boot);
        self.mounts
            .values()
            .flat_map(|m| {
                let beat = m.in_flight.is_none().then_some(m.next_beat);
                let fence = (!m.fenced).then(|| at(m.confirmed + fence_after));
                let warn = (!m.warned).then(|| at(m.confirmed + fence_after / 2));
                [beat, fence, warn]
            })
            .flatten()
            .chain(self.next_scan)
            .min()
    }

    /// Every mount with leases: time since its storage last confirmed a heartbeat, and whether
    /// its VMs are fenced (metrics).
    pub fn mount_health(&self) -> Vec<(PathBuf, Duration, bool)> {
        let boot = boot_now();
        self.mounts
            .iter()
            .map(|(p, m)| (p.clone(), boot.saturating_sub(m.confirmed), m.fenced))
            .collect()
    }

    /// How long ago mount `mount` was last confirmed (for messages).
    pub fn age(&self, mount: &PathBuf, boot: Duration) -> Option<Duration> {
        self.mounts
            .get(mount)
            .map(|m| boot.saturating_sub(m.confirmed))
    }
}

/// Is `mount` fenced for an outage that has not ended (no beat confirmed since)?
pub fn silent(hb: &Heartbeats, mount: &Path) -> bool {
    hb.mounts.get(mount).is_some_and(|m| m.fenced)
}

/// How long `mount` has been silent, when that is `fence_after_ms` or more (its VMs had to be
/// stopped); None for a mount confirmed recently, not tracked, or with heartbeats off.
pub fn silent_for(hb: &Heartbeats, mount: &Path, boot: Duration) -> Option<Duration> {
    hb.interval?;
    let age = boot.saturating_sub(hb.mounts.get(mount)?.confirmed);
    (age >= hb.fence_after).then_some(age)
}

/// The mount key of lease `key` at `lock_path` for heartbeats, or None when it lives on
/// host-local storage (nothing to partition from).
pub fn mount_of(mounts: &Mounts, key: &LeaseKey, lock_path: &str) -> Option<PathBuf> {
    match mounts.of_dev(key.dev) {
        Some((_, true)) => None,
        Some((m, false)) => Some(m.clone()),
        // Devices mountinfo does not list are btrfs subvolumes and overlayfs layers (local);
        // a network file system's device is always listed.
        None if mounts.text_is_local(lock_path) => None,
        None => Some(mounts.of(lock_path)),
    }
}
