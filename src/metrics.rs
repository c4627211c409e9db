//! Metrics (issue 18, docs/operators.md §11): the snapshot lockwardend answers a `metrics`
//! request with, and its rendering as text for Prometheus.
//!
//! Why the daemon sends data and the CLI writes the text: the wire stays JSON like every other
//! answer, and the same snapshot is written in two dialects — the OpenMetrics text format
//! (`lockwarden metrics`, what a Prometheus server scrapes when it asks for
//! `application/openmetrics-text; version=1.0.0`) and the Prometheus text format 0.0.4 that
//! node_exporter's textfile collector reads (`--format prometheus`, the default of
//! `--textfile`). They differ in three places: OpenMetrics names a counter's family without
//! `_total` (its sample has it) where 0.0.4 names both with it, OpenMetrics has `# UNIT` lines,
//! and it ends with `# EOF`.
//!
//! Label values are mount points, which may hold any byte: they arrive here as valid UTF-8
//! (the daemon replaces invalid sequences with U+FFFD), are shown the way every other lockwarden
//! output shows untrusted names (`untrusted::escape`: control and invisible characters as
//! `\u{..}` text, so no terminal escape reaches an operator's screen), and are then escaped as
//! both formats require (backslash, double quote, newline).

use crate::protocol::LeaseMode;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Upper bounds (seconds) of the acquire latency histogram's buckets, `+Inf` not included:
/// from a lock on a local file system (well under a millisecond) to a request that waited for
/// the storage timeout (25 s by default).
pub const ACQUIRE_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Refusal reasons, as the error kinds of the protocol name them (docs/protocol.md): every one
/// is written, with 0 until it happens, so `increase()` sees its first refusal.
pub const REFUSAL_REASONS: [&str; 7] = [
    "busy", "invalid", "denied", "io", "timeout", "version", "internal",
];

/// A histogram: counts per bucket of [`ACQUIRE_BUCKETS`] plus one for `+Inf` (not cumulative),
/// and the sum of the observations in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram {
    #[serde(default)]
    pub counts: Vec<u64>,
    #[serde(default)]
    pub sum_us: u64,
}

impl Histogram {
    /// Record one observation of `us` microseconds.
    pub fn observe(&mut self, us: u64) {
        if self.counts.len() != ACQUIRE_BUCKETS.len() + 1 {
            self.counts.resize(ACQUIRE_BUCKETS.len() + 1, 0);
        }
        let secs = us as f64 / 1e6;
        let i = ACQUIRE_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(ACQUIRE_BUCKETS.len());
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum_us = self.sum_us.saturating_add(us);
    }

    /// How many observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// What lockwardend counts. It travels across a live re-exec in the state document (re-exec
/// keeps counting); a restart or a crash starts again from 0 (docs/operators.md §11).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Acquire requests answered "every lease held".
    #[serde(default)]
    pub acquires: u64,
    /// Acquire requests refused, by error kind.
    #[serde(default)]
    pub refusals: BTreeMap<String, u64>,
    /// Time from an acquire request to its answer (taken or refused).
    #[serde(default)]
    pub acquire_latency: Histogram,
    /// Leases given up by their VM (a release, the VM's exit); roll-backs not counted.
    #[serde(default)]
    pub releases: u64,
    /// Leases found lost (lost-lock probes, and re-checks after a partition).
    #[serde(default)]
    pub lost: u64,
    /// VMs fenced: on_lockfailure applied because their storage went silent (once per VM and
    /// outage of a mount).
    #[serde(default)]
    pub fences: u64,
    /// New keepers started because the previous one went away.
    #[serde(default)]
    pub keeper_restarts: u64,
    /// Live re-execs of this process.
    #[serde(default)]
    pub reexecs: u64,
    /// Per mount: requests answered with a timeout because its storage did not answer.
    #[serde(default)]
    pub request_stalls: BTreeMap<String, u64>,
    /// Per mount: heartbeat outages that reached half of `fence_after_ms`.
    #[serde(default)]
    pub heartbeat_stalls: BTreeMap<String, u64>,
    /// `CLOCK_BOOTTIME` at the first start of this process, in milliseconds (uptime).
    #[serde(default)]
    pub started_boot_ms: u64,
}

/// Leases held now on one mount in one mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseCount {
    pub mount: String,
    pub mode: LeaseMode,
    pub count: u64,
}

/// Storage liveness of one mount with leases (heartbeats on).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountHealth {
    pub mount: String,
    /// Time since the last heartbeat the storage confirmed, in milliseconds.
    pub heartbeat_age_ms: u64,
    /// The VMs holding leases there were fenced and the storage has not answered since.
    pub fenced: bool,
}

/// The answer to a `metrics` request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: String,
    pub protocol: u16,
    pub pid: u32,
    /// Start time, seconds since the epoch (kept across a live re-exec).
    pub started: u64,
    pub uptime_ms: u64,
    /// VMs (owners) known to the daemon.
    pub owners: u64,
    pub leases: Vec<LeaseCount>,
    /// VMs holding a lease that is fenced now (stopped, or waiting for an operator).
    pub fenced_vms: u64,
    pub mounts: Vec<MountHealth>,
    /// `heartbeat_interval_ms` (None: heartbeats and fencing are off) and `fence_after_ms`.
    pub heartbeat_interval_ms: Option<u64>,
    pub fence_after_ms: u64,
    /// A keeper is connected, and its pid.
    pub keeper_up: bool,
    pub keeper_pid: u32,
    pub counters: Counters,
}

/// Which text format to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 (`application/openmetrics-text; version=1.0.0; charset=utf-8`).
    OpenMetrics,
    /// Prometheus text format 0.0.4 (`text/plain; version=0.0.4`), as node_exporter's textfile
    /// collector reads it.
    Prometheus,
}

impl Format {
    /// The HTTP content type of this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A text being written in one format.
struct Out {
    text: String,
    format: Format,
}

/// A label value as both formats require it: backslash, double quote and newline escaped
/// (after `untrusted::escape` made every control character visible text).
pub fn escape_label(value: &str) -> String {
    let shown = crate::untrusted::escape(value);
    let mut out = String::with_capacity(shown.len() + 2);
    for c in shown.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A float the way both formats read it, always with a decimal point or exponent.
fn float(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else {
        format!("{v:?}")
    }
}

impl Out {
    /// The `# TYPE`, `# UNIT` and `# HELP` lines of family `name` (a counter's name without
    /// `_total`; `unit`, when given, is the name's last part). `help` has no backslash,
    /// double quote or newline (constant texts).
    fn family(&mut self, name: &str, kind: Kind, unit: Option<&str>, help: &str) {
        let kind_word = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let shown = match (self.format, kind) {
            (Format::Prometheus, Kind::Counter) => format!("{name}_total"),
            _ => name.to_string(),
        };
        let _ = writeln!(self.text, "# TYPE {shown} {kind_word}");
        if let (Format::OpenMetrics, Some(u)) = (self.format, unit) {
            let _ = writeln!(self.text, "# UNIT {shown} {u}");
        }
        let _ = writeln!(self.text, "# HELP {shown} {help}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: &str) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape_label(v));
            }
            self.text.push('}');
        }
        self.text.push(' ');
        self.text.push_str(value);
        self.text.push('\n');
    }

    fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], v: u64) {
        self.family(name, Kind::Counter, None, help);
        self.sample(&format!("{name}_total"), labels, &v.to_string());
    }

    fn gauge(&mut self, name: &str, unit: Option<&str>, help: &str, v: &str) {
        self.family(name, Kind::Gauge, unit, help);
        self.sample(name, &[], v);
    }
}

fn mode_word(m: LeaseMode) -> &'static str {
    match m {
        LeaseMode::Exclusive => "exclusive",
        LeaseMode::Shared => "shared",
    }
}

/// `s` as text in `format`. Every family is written even when it has nothing to count yet
/// (its labelled series appear with their first value).
pub fn render(s: &Snapshot, format: Format) -> String {
    let mut o = Out {
        text: String::with_capacity(4096),
        format,
    };
    let c = &s.counters;
    o.gauge(
        "lockwarden_up",
        None,
        "Whether lockwardend answered this scrape (0: lockwarden metrics could not reach it).",
        "1",
    );
    o.family(
        "lockwarden_build_info",
        Kind::Gauge,
        None,
        "lockwardend's version and wire protocol version; always 1.",
    );
    let protocol = s.protocol.to_string();
    o.sample(
        "lockwarden_build_info",
        &[("version", &s.version), ("protocol", &protocol)],
        "1",
    );
    o.gauge(
        "lockwarden_start_time_seconds",
        Some("seconds"),
        "When lockwardend started, in seconds since the Unix epoch (kept across a live re-exec).",
        &s.started.to_string(),
    );
    o.gauge(
        "lockwarden_uptime_seconds",
        Some("seconds"),
        "Seconds since lockwardend started (kept across a live re-exec).",
        &float(s.uptime_ms as f64 / 1000.0),
    );
    o.counter(
        "lockwarden_reexecs",
        "Live re-execs (SIGHUP, systemctl reload) of this lockwardend since it started.",
        &[],
        c.reexecs,
    );
    o.gauge(
        "lockwarden_owners",
        None,
        "VMs (lease owners) lockwardend knows now.",
        &s.owners.to_string(),
    );
    o.family(
        "lockwarden_leases",
        Kind::Gauge,
        None,
        "Leases held now, by mode and by the mount point of the locked file.",
    );
    let mut leases = s.leases.clone();
    leases.sort_by(|a, b| (&a.mount, mode_word(a.mode)).cmp(&(&b.mount, mode_word(b.mode))));
    for l in &leases {
        o.sample(
            "lockwarden_leases",
            &[("mode", mode_word(l.mode)), ("mount", &l.mount)],
            &l.count.to_string(),
        );
    }
    o.counter(
        "lockwarden_acquires",
        "Acquire requests answered with every lease held.",
        &[],
        c.acquires,
    );
    o.family(
        "lockwarden_refusals",
        Kind::Counter,
        None,
        "Acquire requests refused, by reason (the protocol's error kind: busy = somebody holds a disk).",
    );
    for reason in REFUSAL_REASONS {
        let n = c.refusals.get(reason).copied().unwrap_or(0);
        o.sample(
            "lockwarden_refusals_total",
            &[("reason", reason)],
            &n.to_string(),
        );
    }
    let other: u64 = c
        .refusals
        .iter()
        .filter(|(k, _)| !REFUSAL_REASONS.contains(&k.as_str()))
        .map(|(_, v)| *v)
        .sum();
    if other > 0 {
        o.sample(
            "lockwarden_refusals_total",
            &[("reason", "other")],
            &other.to_string(),
        );
    }
    o.family(
        "lockwarden_acquire_duration_seconds",
        Kind::Histogram,
        Some("seconds"),
        "Time from an acquire request to its answer (taken or refused), in seconds.",
    );
    let h = &c.acquire_latency;
    let mut cumulative = 0u64;
    for (i, bound) in ACQUIRE_BUCKETS
        .iter()
        .copied()
        .chain([f64::INFINITY])
        .enumerate()
    {
        cumulative += h.counts.get(i).copied().unwrap_or(0);
        let le = float(bound);
        o.sample(
            "lockwarden_acquire_duration_seconds_bucket",
            &[("le", &le)],
            &cumulative.to_string(),
        );
    }
    o.sample(
        "lockwarden_acquire_duration_seconds_sum",
        &[],
        &float(h.sum_us as f64 / 1e6),
    );
    o.sample(
        "lockwarden_acquire_duration_seconds_count",
        &[],
        &cumulative.to_string(),
    );
    o.counter(
        "lockwarden_releases",
        "Leases given up by their VM (release requests, VM exits); roll-backs of refused acquires not counted.",
        &[],
        c.releases,
    );
    o.counter(
        "lockwarden_leases_lost",
        "Leases whose lock the storage dropped under a VM (docs/storage.md).",
        &[],
        c.lost,
    );
    o.counter(
        "lockwarden_fences",
        "VMs fenced (on_lockfailure applied) because their storage stopped confirming heartbeats.",
        &[],
        c.fences,
    );
    o.gauge(
        "lockwarden_fenced_vms",
        None,
        "VMs holding a fenced lease now (stopped, or waiting for an operator).",
        &s.fenced_vms.to_string(),
    );
    o.family(
        "lockwarden_storage_stalls",
        Kind::Counter,
        None,
        "Storage that did not answer in time, by mount: kind=request (a request timed out) or kind=heartbeat (no confirmed heartbeat for half of fence_after_ms).",
    );
    let mut stalls: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for (m, n) in &c.request_stalls {
        stalls.insert((m, "request"), *n);
    }
    for (m, n) in &c.heartbeat_stalls {
        stalls.insert((m, "heartbeat"), *n);
    }
    for ((mount, kind), n) in stalls {
        o.sample(
            "lockwarden_storage_stalls_total",
            &[("kind", kind), ("mount", mount)],
            &n.to_string(),
        );
    }
    if let Some(i) = s.heartbeat_interval_ms {
        o.gauge(
            "lockwarden_heartbeat_interval_seconds",
            Some("seconds"),
            "heartbeat_interval_ms of lockwardend.conf, in seconds.",
            &float(i as f64 / 1000.0),
        );
        o.gauge(
            "lockwarden_fence_after_seconds",
            Some("seconds"),
            "fence_after_ms of lockwardend.conf, in seconds: a mount silent this long gets its VMs fenced.",
            &float(s.fence_after_ms as f64 / 1000.0),
        );
    }
    o.family(
        "lockwarden_heartbeat_age_seconds",
        Kind::Gauge,
        Some("seconds"),
        "Seconds since the storage behind a mount with leases last confirmed a heartbeat.",
    );
    let mut mounts = s.mounts.clone();
    mounts.sort_by(|a, b| a.mount.cmp(&b.mount));
    for m in &mounts {
        o.sample(
            "lockwarden_heartbeat_age_seconds",
            &[("mount", &m.mount)],
            &float(m.heartbeat_age_ms as f64 / 1000.0),
        );
    }
    o.family(
        "lockwarden_mount_fenced",
        Kind::Gauge,
        None,
        "1 while the VMs of a mount are fenced and its storage has not answered since.",
    );
    for m in &mounts {
        o.sample(
            "lockwarden_mount_fenced",
            &[("mount", &m.mount)],
            if m.fenced { "1" } else { "0" },
        );
    }
    o.gauge(
        "lockwarden_keeper_up",
        None,
        "1 while a keeper process holds duplicates of every lease (a crash of lockwardend drops no lock).",
        if s.keeper_up { "1" } else { "0" },
    );
    o.counter(
        "lockwarden_keeper_restarts",
        "New keepers started because the previous one went away.",
        &[],
        c.keeper_restarts,
    );
    finish(o)
}

fn finish(mut o: Out) -> String {
    if o.format == Format::OpenMetrics {
        o.text.push_str("# EOF\n");
    }
    o.text
}

/// The text written when lockwardend cannot be reached: only `lockwarden_up 0`, so an alert
/// on it fires while the textfile stays fresh.
pub fn render_down(format: Format) -> String {
    let mut o = Out {
        text: String::new(),
        format,
    };
    o.gauge(
        "lockwarden_up",
        None,
        "Whether lockwardend answered this scrape (0: lockwarden metrics could not reach it).",
        "0",
    );
    finish(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let mut counters = Counters::default();
        counters.acquire_latency.observe(300);
        counters.acquire_latency.observe(2_000_000);
        counters.acquire_latency.observe(99_000_000);
        counters.refusals.insert("busy".into(), 2);
        counters
            .request_stalls
            .insert("/mnt/a\"b\\c\nd\u{1b}[2J\u{fffd}".into(), 1);
        Snapshot {
            version: "0.1.0".into(),
            protocol: 1,
            pid: 1,
            started: 1_700_000_000,
            uptime_ms: 1500,
            owners: 2,
            leases: vec![LeaseCount {
                mount: "/".into(),
                mode: LeaseMode::Exclusive,
                count: 3,
            }],
            fenced_vms: 0,
            mounts: vec![],
            heartbeat_interval_ms: Some(5000),
            fence_after_ms: 60000,
            keeper_up: true,
            keeper_pid: 9,
            counters,
        }
    }

    #[test]
    fn label_values_are_escaped_and_visible() {
        assert_eq!(escape_label("/srv/nfs"), "/srv/nfs");
        assert_eq!(escape_label("a\"b\\c"), "a\\\"b\\\\c");
        // untrusted::escape first turns the newline into the two characters `\n`, whose
        // backslash is then escaped: no raw newline, no raw escape character.
        assert_eq!(escape_label("a\nb"), "a\\\\nb");
        assert_eq!(escape_label("x\u{1b}[2J"), "x\\\\u{1b}[2J");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_inf() {
        let text = render(&snapshot(), Format::OpenMetrics);
        assert!(text.contains("lockwarden_acquire_duration_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(text.contains("lockwarden_acquire_duration_seconds_bucket{le=\"2.5\"} 2\n"));
        assert!(text.contains("lockwarden_acquire_duration_seconds_bucket{le=\"30.0\"} 2\n"));
        assert!(text.contains("lockwarden_acquire_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("lockwarden_acquire_duration_seconds_count 3\n"));
        assert!(text.contains("lockwarden_acquire_duration_seconds_sum 101.0003\n"));
    }

    #[test]
    fn the_two_formats_differ_only_where_the_specs_do() {
        let om = render(&snapshot(), Format::OpenMetrics);
        let prom = render(&snapshot(), Format::Prometheus);
        assert!(om.ends_with("# EOF\n") && !prom.contains("# EOF"));
        assert!(om.contains("# TYPE lockwarden_acquires counter\n"));
        assert!(prom.contains("# TYPE lockwarden_acquires_total counter\n"));
        assert!(om.contains("# UNIT lockwarden_uptime_seconds seconds\n"));
        assert!(!prom.contains("# UNIT"));
        for text in [&om, &prom] {
            assert!(text.contains("lockwarden_acquires_total 0\n"));
            assert!(text.contains("lockwarden_refusals_total{reason=\"busy\"} 2\n"));
            assert!(text.contains("lockwarden_build_info{version=\"0.1.0\",protocol=\"1\"} 1\n"));
            // One line per sample: the hostile mount name stayed on its line.
            assert!(text.contains(
                "lockwarden_storage_stalls_total{kind=\"request\",mount=\"/mnt/a\\\"b\\\\c\\\\nd\\\\u{1b}[2J\u{fffd}\"} 1\n"
            ));
            assert!(!text.contains('\u{1b}'));
        }
        assert_eq!(
            render_down(Format::Prometheus),
            "# TYPE lockwarden_up gauge\n# HELP lockwarden_up Whether lockwardend answered this \
             scrape (0: lockwarden metrics could not reach it).\nlockwarden_up 0\n"
        );
    }
}
