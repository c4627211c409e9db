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
