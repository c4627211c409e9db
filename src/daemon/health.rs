//! The lost-lock check's own state (docs/storage.md, "Lost locks"): the meaning of one probe's
//! answer, when the next round of probes is due, which probes are in flight, the history per
//! lease (transient errors in a row, re-checks of a lost lease) that lost.rs acts on, and the
//! detections `lockwarden lost` reports. One owner for the concern, with private fields; held
//! by the lease tables (state.rs) and kept below lost.rs, fence.rs and thaw.rs, which all judge
//! a probe's answer the same way.

use super::lease::LeaseKey;
use crate::protocol::LeaseInfo;
use nix::errno::Errno;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// Detections kept for `Request::Lost`.
const RECENT: usize = 256;
/// Probes a round sends per loop round: a round over every lease is spread over loop rounds
/// so that no client's request waits behind thousands of probes (docs/storage.md, "Lost
/// locks"; on a host-local mount each probe runs inline on the loop).
pub const PROBES_PER_TURN: usize = 256;

/// What a probe's answer means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The lock is ours (the re-lock succeeded).
    Held,
    /// Somebody else holds a conflicting lock.
    Conflict,
    /// The storage says our lock is gone (EIO, ENOLCK, ESTALE, EBADF).
    Lost,
    /// Nothing definite: try again next round.
    Transient,
}

/// Sort a probe's result (see the module documentation).
pub fn classify(result: Result<(), Errno>) -> Verdict {
    match result {
        Ok(()) => Verdict::Held,
        Err(Errno::EAGAIN | Errno::EACCES) => Verdict::Conflict,
        Err(Errno::EIO | Errno::ENOLCK | Errno::ESTALE | Errno::EBADF) => Verdict::Lost,
        Err(_) => Verdict::Transient,
    }
}

/// The lost-lock check: its schedule, probes in flight, per-lease history (only for leases
/// that had a failed probe) and the latest detections.
#[derive(Debug, Default)]
pub struct Health {
    /// `lease_check_interval_ms` (None: lost-lock checks disabled).
    interval: Option<Duration>,
    next_round: Option<Instant>,
    /// Leases of the current round not yet probed (sent [`PROBES_PER_TURN`] per loop round).
    pending: VecDeque<LeaseKey>,
    /// Leases whose probe is in flight (a stuck probe is not sent again).
    probing: HashSet<LeaseKey>,
    tracks: HashMap<LeaseKey, Track>,
    recent: VecDeque<LeaseInfo>,
}

impl Health {
    /// Apply `lease_check_interval_ms`; the first round is one interval after `now`.
    pub fn configure(&mut self, interval: Option<Duration>, now: Instant) {
        self.interval = interval;
        self.next_round = interval.map(|d| now + d);
    }

    /// Is a round of probes due at `now`? If so, the next one is scheduled.
    pub fn round_due(&mut self, now: Instant) -> bool {
        let Some(interval) = self.interval else {
            return false;
        };
        match self.next_round {
            Some(t) if t > now => false,
            _ => {
                self.next_round = Some(now + interval);
                true
            }
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.pending.is_empty() {
            // The rest of the round goes out next loop round, after what is ready.
            return Some(Instant::now());
        }
        self.next_round
    }

    /// Start a round over `keys` (those not already being probed are taken).
    pub fn begin_round(&mut self, keys: impl Iterator<Item = LeaseKey>) {
        self.pending = keys.filter(|k| !self.probing.contains(k)).collect();
    }

    /// The next leases of the round to probe now (at most [`PROBES_PER_TURN`]).
    pub fn next_turn(&mut self) -> Vec<LeaseKey> {
        let n = self.pending.len().min(PROBES_PER_TURN);
        self.pending.drain(..n).collect()
    }

    /// Mark a probe of `key` in flight; false when one already is.
    pub fn start_probe(&mut self, key: LeaseKey) -> bool {
        self.probing.insert(key)
    }

    pub fn is_probing(&self, key: &LeaseKey) -> bool {
        self.probing.contains(key)
    }

    /// The probe of `key` came back.
    pub fn probe_back(&mut self, key: &LeaseKey) {
        self.probing.remove(key);
    }

    /// The history of `key`, started when there is none.
    pub fn track(&mut self, key: LeaseKey) -> &mut Track {
        self.tracks.entry(key).or_default()
    }

    /// Forget the history of `key` (a good probe, or the lease is gone); returns it.
    pub fn forget(&mut self, key: &LeaseKey) -> Option<Track> {
        self.tracks.remove(key)
    }

    /// Keep the history of the leases `held` says are still there.
    pub fn retain(&mut self, held: impl Fn(&LeaseKey) -> bool) {
        self.tracks.retain(|k, _| held(k));
    }

    /// A lease was found lost: kept for `Request::Lost` (the latest [`RECENT`]).
    pub fn detected(&mut self, info: LeaseInfo) {
        self.recent.push_back(info);
        while self.recent.len() > RECENT {
            self.recent.pop_front();
        }
    }

    /// The latest detections, oldest first.
    pub fn recent(&self) -> impl Iterator<Item = &LeaseInfo> {
        self.recent.iter()
    }
}

#[derive(Debug, Default)]
pub(super) struct Track {
    /// Transient errors in a row since the last good probe.
    pub(super) transient: u32,
    /// Re-checks of a lease already found lost.
    pub(super) rechecks: u32,
    /// The error of the last re-check, to report a change (e.g. EIO, then a conflict).
    pub(super) last: Option<Errno>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{LeaseMode, ResourceKind};

    #[test]
    fn a_round_goes_out_a_turn_per_loop_round_and_skips_probes_in_flight() {
        let mut h = Health::default();
        let t0 = Instant::now();
        h.configure(Some(Duration::from_secs(10)), t0);
        let key = |i: u64| LeaseKey { dev: 1, ino: i };
        assert!(h.start_probe(key(3)));
        h.begin_round((0..600).map(key));
        assert!(h.next_deadline().is_some_and(|t| t <= Instant::now()));
        let first = h.next_turn();
        assert_eq!(first.len(), PROBES_PER_TURN);
        assert_eq!(&first[..3], &[key(0), key(1), key(2)]);
        assert!(!first.contains(&key(3)), "already in flight");
        let (second, third) = (h.next_turn(), h.next_turn());
        assert_eq!(first.len() + second.len() + third.len(), 599);
        assert!(h.next_turn().is_empty());
        // Done: the next deadline is the next round again.
        assert_eq!(h.next_deadline(), Some(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn rounds_come_every_interval_and_never_when_disabled() {
        let t0 = Instant::now();
        let mut h = Health::default();
        h.configure(None, t0);
        assert!(!h.round_due(t0 + Duration::from_secs(3600)));
        assert_eq!(h.next_deadline(), None);
        let i = Duration::from_millis(100);
        h.configure(Some(i), t0);
        assert_eq!(h.next_deadline(), Some(t0 + i));
        assert!(!h.round_due(t0 + i / 2));
        assert!(h.round_due(t0 + i));
        // The next one is an interval after the round that ran.
        assert_eq!(h.next_deadline(), Some(t0 + i * 2));
        assert!(!h.round_due(t0 + i + i / 2));
    }

    #[test]
    fn a_probe_in_flight_is_not_started_twice_and_history_is_per_lease() {
        let (a, b) = (LeaseKey { dev: 1, ino: 1 }, LeaseKey { dev: 1, ino: 2 });
        let mut h = Health::default();
        assert!(h.start_probe(a));
        assert!(!h.start_probe(a));
        assert!(h.is_probing(&a) && !h.is_probing(&b));
        h.probe_back(&a);
        assert!(!h.is_probing(&a));
        h.track(a).transient += 2;
        h.track(b).rechecks += 1;
        h.retain(|k| *k == a);
        assert_eq!(h.forget(&b).map(|t| t.rechecks), None);
        assert_eq!(h.forget(&a).map(|t| t.transient), Some(2));
        assert!(h.forget(&a).is_none());
    }

    #[test]
    fn only_the_latest_detections_are_kept() {
        let mut h = Health::default();
        for n in 0..RECENT + 10 {
            h.detected(LeaseInfo {
                name: format!("/vm/{n}.img"),
                kind: ResourceKind::Disk,
                mode: LeaseMode::Exclusive,
                lock_path: format!("/vm/{n}.img"),
                owners: Vec::new(),
                since: 0,
                fence: None,
            });
        }
        let names: Vec<&str> = h.recent().map(|l| l.name.as_str()).collect();
        assert_eq!(names.len(), RECENT);
        assert_eq!(names.first(), Some(&"/vm/10.img"));
        assert_eq!(
            names.last().copied(),
            Some(format!("/vm/{}.img", RECENT + 9).as_str())
        );
    }

    #[test]
    fn only_conflicts_and_lost_state_are_definitive() {
        assert_eq!(classify(Ok(())), Verdict::Held);
        for e in [Errno::EAGAIN, Errno::EACCES] {
            assert_eq!(classify(Err(e)), Verdict::Conflict, "{e}");
        }
        for e in [Errno::EIO, Errno::ENOLCK, Errno::ESTALE, Errno::EBADF] {
            assert_eq!(classify(Err(e)), Verdict::Lost, "{e}");
        }
        for e in [
            Errno::ETIMEDOUT,
            Errno::EINTR,
            Errno::ENOMEM,
            Errno::ENOBUFS,
            Errno::ECONNRESET,
            Errno::EHOSTUNREACH,
        ] {
            assert_eq!(classify(Err(e)), Verdict::Transient, "{e}");
        }
    }
}
