//! Terminating an owner that lost its lifetime handle while holding leases (docs/interfaces.md §3).
//!
//! Why: the handle closing means libvirt's side of the VM is gone, yet the process may still
//! run and write to its disks. It is terminated like virtlockd does (SIGTERM, then SIGKILL after
//! `kill_grace_ms`), but — unlike virtlockd — its leases stay held until the process is really
//! gone: "a VM must never run on a disk it no longer holds", so another host cannot start the
//! same VM while the old one still writes. The owner's pidfd (watched through the owner table)
//! ends the sequence and releases the leases the moment the process exits.
//!
//! Nothing here blocks: each step is a deadline the event loop checks. The first step is a short
//! settle delay, because a QEMU that is exiting closes its descriptors a moment before it
//! becomes a zombie and must not be reported as "still running".

use super::owner::Owners;
use super::pidfd::Proc;
use log::{error, warn};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

/// Wait this long after the handle closed before deciding the owner still runs.
const SETTLE: Duration = Duration::from_millis(50);
/// How long to watch for the exit after SIGKILL before reporting failure.
const AFTER_KILL: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Settle,
    Termed,
    Killed,
}

/// One owner being terminated; its process handle stays in the owner table.
#[derive(Debug)]
pub struct Kill {
    pub pid: u32,
    pub vm: String,
    pub leases: usize,
    pub phase: Phase,
    pub deadline: Instant,
}

/// What a step found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Keep the sequence (a signal was sent, wait for the next deadline).
    Continue,
    /// The owner is gone: release its leases.
    Exited,
    /// Nothing more can be done; the owner keeps its leases until it dies.
    GaveUp,
}

impl Kill {
    pub fn start(pid: u32, vm: String, leases: usize, now: Instant) -> Kill {
        Kill {
            pid,
            vm,
            leases,
            phase: Phase::Settle,
            deadline: now + SETTLE,
        }
    }

    /// Take the next step at the deadline.
    pub fn step(&mut self, proc: &Proc, now: Instant, grace: Duration) -> Step {
        let pid = self.pid;
        if proc.exited() {
            return Step::Exited;
        }
        let (sig, next, wait) = match self.phase {
            Phase::Settle => {
                warn!(
                    "VM {:?} (pid {pid}) still runs after its lifetime handle closed; sending \
                     SIGTERM (its {} lease(s) stay held until it is gone)",
                    self.vm, self.leases
                );
                (Signal::SIGTERM, Phase::Termed, grace)
            }
            Phase::Termed => {
                warn!(
                    "VM {:?} (pid {pid}) did not exit {} ms after SIGTERM; sending SIGKILL",
                    self.vm,
                    grace.as_millis()
                );
                (Signal::SIGKILL, Phase::Killed, AFTER_KILL)
            }
            Phase::Killed => {
                error!(
                    "VM {:?} (pid {pid}) still exists {} s after SIGKILL; its {} lease(s) stay \
                     held until it is gone; check the process (uninterruptible I/O?)",
                    self.vm,
                    AFTER_KILL.as_secs(),
                    self.leases
                );
                return Step::GaveUp;
            }
        };
        match proc.signal(sig) {
            Ok(()) => {}
            Err(Errno::ESRCH) => return Step::Exited,
            Err(e) => {
                error!(
                    "cannot send {sig} to VM {:?} (pid {pid}): {}; its leases stay held until \
                     it is gone; stop it by hand",
                    self.vm,
                    e.desc()
                );
                return Step::GaveUp;
            }
        }
        self.phase = next;
        self.deadline = now + wait;
        Step::Continue
    }

    /// How the owner ended, for the log.
    pub fn ending(&self) -> &'static str {
        match self.phase {
            Phase::Settle => "exited",
            Phase::Termed => "exited after SIGTERM",
            Phase::Killed => "was killed",
        }
    }
}

/// A termination sequence as a live re-exec writes it down (reexec.rs's state document).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct KillDoc {
    pub pid: u32,
    pub vm: String,
    pub leases: usize,
    pub phase: Phase,
    /// Milliseconds until its next step.
    pub remaining_ms: u64,
}

/// Every owner being terminated, and `kill_grace_ms`: the one owner of the termination
/// sequences (private, so a sequence is only started, advanced, ended or carried over a live
/// re-exec through these methods).
#[derive(Debug)]
pub struct Kills {
    grace: Duration,
    list: Vec<Kill>,
}

impl Kills {
    pub fn new(grace: Duration) -> Kills {
        Kills {
            grace,
            list: Vec::new(),
        }
    }

    /// Is `pid` being terminated?
    pub fn terminating(&self, pid: u32) -> bool {
        self.list.iter().any(|k| k.pid == pid)
    }

    /// Start terminating `pid` (VM `vm`, holding `leases`) unless that already runs; false when
    /// it did.
    pub fn start(&mut self, pid: u32, vm: String, leases: usize, now: Instant) -> bool {
        if self.terminating(pid) {
            return false;
        }
        self.list.push(Kill::start(pid, vm, leases, now));
        true
    }

    /// `pid` is gone: its sequence ends. Returns how it ended, for the log.
    pub fn end(&mut self, pid: u32) -> Option<&'static str> {
        let i = self.list.iter().position(|k| k.pid == pid)?;
        Some(self.list.swap_remove(i).ending())
    }

    /// Advance the sequences whose deadline passed. Returns the owners found gone.
    pub fn advance(&mut self, owners: &Owners, now: Instant) -> Vec<u32> {
        let mut gone = Vec::new();
        let grace = self.grace;
        self.list.retain_mut(|k| {
            if k.deadline > now {
                return true;
            }
            let Some(entry) = owners.get(k.pid) else {
                return false;
            };
            match k.step(&entry.proc, now, grace) {
                Step::Continue => true,
                Step::Exited => {
                    gone.push(k.pid);
                    true
                }
                Step::GaveUp => false,
            }
        });
        gone
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.list.iter().map(|k| k.deadline).min()
    }

    /// The sequences as a live re-exec writes them down: each step's deadline as the time
    /// left after `now`.
    pub fn save(&self, now: Instant) -> Vec<KillDoc> {
        self.list
            .iter()
            .map(|k| KillDoc {
                pid: k.pid,
                vm: k.vm.clone(),
                leases: k.leases,
                phase: k.phase,
                remaining_ms: k.deadline.saturating_duration_since(now).as_millis() as u64,
            })
            .collect()
    }

    /// The sequences a live re-exec carried over, their clocks resumed at `now`.
    pub fn load(&mut self, docs: Vec<KillDoc>, now: Instant) {
        self.list.extend(docs.into_iter().map(|k| Kill {
            pid: k.pid,
            vm: k.vm,
            leases: k.leases,
            phase: k.phase,
            deadline: now + Duration::from_millis(k.remaining_ms),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_sequence_per_owner_ended_once() {
        let t0 = Instant::now();
        let mut k = Kills::new(Duration::from_secs(3));
        assert_eq!(k.next_deadline(), None);
        assert!(k.start(7, "vm".into(), 2, t0));
        assert!(
            !k.start(7, "vm".into(), 2, t0),
            "a second sequence for the same owner"
        );
        assert!(k.terminating(7) && !k.terminating(8));
        assert_eq!(k.next_deadline(), Some(t0 + SETTLE));
        assert_eq!(k.end(7), Some("exited"));
        assert_eq!(k.end(7), None);
        assert!(!k.terminating(7));
    }

    #[test]
    fn a_reexec_carries_each_sequence_with_the_time_left_to_its_step() {
        let t0 = Instant::now();
        let mut k = Kills::new(Duration::from_secs(3));
        k.start(7, "vm-a".into(), 2, t0);
        let saved = k.save(t0);
        assert_eq!(saved.len(), 1);
        assert_eq!(saved[0].remaining_ms, SETTLE.as_millis() as u64);
        let text = serde_json::to_string(&saved).unwrap();
        let mut again = Kills::new(Duration::from_secs(3));
        let later = t0 + Duration::from_secs(10);
        again.load(serde_json::from_str(&text).unwrap(), later);
        assert!(again.terminating(7));
        assert_eq!(again.next_deadline(), Some(later + SETTLE));
        assert_eq!(again.end(7), Some("exited"));
    }
}
