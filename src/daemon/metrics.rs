//! What lockwardend counts for `lockwarden metrics` (issue 18, docs/operators.md §11), and the
//! clock they are kept in (the snapshot a `metrics` request is answered with: `State::metrics_snapshot`).
//!
//! Why counters live in `State` as one plain struct: the live re-exec writes them into its
//! state document with everything else (reexec.rs), so a reload keeps counting; a restart or a
//! crash starts from 0, which Prometheus' `rate()` and `increase()` expect of counters.

use crate::metrics::Counters;
use crate::protocol::ErrorKind;
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

pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Milliseconds of `CLOCK_BOOTTIME` now.
pub fn boot_ms() -> u64 {
    micros(super::beat::boot_now()) / 1000
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
