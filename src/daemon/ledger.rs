//! The ledger of work that waits on storage: every storage job in flight and what it is for,
//! and every request waiting for jobs (an Acquire taking its files, an answer waiting for
//! holder records or a roll-back or a release's disposals, a `thaw` re-verifying its locks).
//!
//! Why one ledger: a job is submitted in one place (`State::submit_to`), its completion is
//! looked up in one place (`Ledger::came_back`), and a request's deadline, its client going
//! away and a live re-exec are found in one place (`due`, `of_conn`, `all`) and handled by
//! route.rs, whatever kind of request it is. The storage threads (storage.rs) only execute jobs
//! and never learn who waits for them (docs/architecture.md, "Storage work").

use super::Failure;
use super::lease::LeaseKey;
use super::owner::ConnId;
use super::storage::JobId;
use crate::protocol::{LeaseSpec, Owner, Response};
use nix::errno::Errno;
use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Identifies a request waiting on storage.
pub type OpId = u64;

/// What a storage job in flight is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobFor {
    /// A file of a waiting Acquire.
    Take(OpId),
    /// A file of an Acquire that was already answered (timeout, client gone): undo on return.
    Orphan,
    /// A lost-lock probe.
    Probe,
    /// Closing or disposing: nobody waits for it.
    Other,
    /// A job a waiting answer depends on (`State::groups`).
    Group(OpId),
    /// A storage heartbeat (heartbeat.rs).
    Heartbeat,
    /// A fenced lease's lock re-checked after its storage came back (fence.rs).
    Fence,
    /// A fenced lease's lock re-verified for a `thaw` request (thaw.rs).
    Thaw(OpId),
}

/// A storage job in flight, as a request sees it: its id, what it is about (for messages) and
/// the mount it runs on.
#[derive(Debug, Clone)]
pub struct Pending {
    pub job: JobId,
    pub what: String,
    pub mount: PathBuf,
}

/// An answer that waits for storage jobs (a Release for its disposals, an Acquire for its
/// holder records or its roll-back).
#[derive(Debug)]
pub struct Group {
    pub conn: ConnId,
    pub jobs: HashMap<JobId, (String, PathBuf)>,
    /// What to answer once the jobs are done; None while the request is still being worked on.
    pub then: Option<Then>,
    pub deadline: Instant,
    pub started: Instant,
}

/// What a group answers when its jobs are done (or its deadline passed).
#[derive(Debug)]
pub enum Then {
    /// Released: Ok with the owner's remaining leases; a Timeout error naming the disk and its
    /// mount when the storage did not finish in time.
    Released { pid: u32, vm: String },
    /// Acquired: Ok with the owner's leases (also after the deadline: records are best effort).
    Acquired { pid: u32, restrict: bool },
    /// A prepared answer (a refusal waiting for its roll-back).
    Respond(Response),
}

/// How to take back one step of a request.
#[derive(Debug)]
pub enum Undo {
    /// The owner joined an existing shared lease.
    Joined(LeaseKey),
    /// A new lease was created; `created_file`: this request created its lock file.
    Created { key: LeaseKey, created_file: bool },
}

/// One Acquire in progress: its files are being opened and locked on storage threads
/// (docs/storage.md). All or nothing still holds: whatever a phase took is rolled back when any
/// file fails, and the client hears "taken" only after the keeper holds every new lease.
#[derive(Debug)]
pub struct AcquireOp {
    pub conn: ConnId,
    pub(super) owner: Owner,
    pub restrict: bool,
    /// Phases still to run: exclusive leases first, then shared ones.
    pub(super) phases: VecDeque<Vec<LeaseSpec>>,
    /// Jobs of the running phase: the spec, its mount and how often it was started again.
    pub(super) inflight: HashMap<JobId, (LeaseSpec, PathBuf, usize)>,
    /// Conflicts of the running phase, judged once every job of the phase is back (another disk
    /// of the same request may be the holder).
    pub(super) conflicts: Vec<(LeaseSpec, LeaseKey, Failure)>,
    pub(super) undo: Vec<Undo>,
    pub(super) failure: Option<Failure>,
    pub deadline: Instant,
    pub(super) started: Instant,
    /// How many leases the request named, and their names (journal events).
    pub(super) requested: usize,
    pub(super) disks: Vec<String>,
    /// When the leases this request creates are taken (seconds since the epoch).
    pub(super) since: u64,
    /// Storage jobs the answer also waits for (holder records of shared leases).
    pub(super) group: Option<OpId>,
}

/// An answer for a client whose request waited on storage.
#[derive(Debug)]
pub struct Finished {
    pub conn: ConnId,
    pub response: Response,
    /// Restrict the connection (an Acquire with `restrict` that succeeded).
    pub restrict: bool,
}

/// A `thaw` waiting for its re-verifications.
#[derive(Debug)]
pub struct ThawOp {
    pub conn: ConnId,
    /// The VM as the operator named it, and its pids.
    pub(super) vm: String,
    pub(super) pids: Vec<u32>,
    /// Re-checks in flight.
    pub(super) jobs: HashMap<JobId, LeaseKey>,
    /// Re-checks back.
    pub(super) results: Vec<(LeaseKey, Arc<OwnedFd>, Result<(), Errno>)>,
    pub deadline: Instant,
    pub(super) started: Instant,
}

/// A request waiting on storage, of any kind.
#[derive(Debug)]
pub enum Wait {
    Acquire(Box<AcquireOp>),
    Group(Group),
    Thaw(ThawOp),
}

impl Wait {
    /// The client the answer goes to.
    pub fn conn(&self) -> ConnId {
        match self {
            Wait::Acquire(op) => op.conn,
            Wait::Group(g) => g.conn,
            Wait::Thaw(t) => t.conn,
        }
    }

    /// When it must be answered at the latest; None for a group whose request is still being
    /// worked on (its Acquire's deadline covers it).
    pub fn deadline(&self) -> Option<Instant> {
        match self {
            Wait::Acquire(op) => Some(op.deadline),
            Wait::Group(g) => g.then.as_ref().map(|_| g.deadline),
            Wait::Thaw(t) => Some(t.deadline),
        }
    }
}

/// Jobs in flight and requests waiting for them; answers ready for their clients.
#[derive(Debug, Default)]
pub struct Ledger {
    jobs: HashMap<JobId, JobFor>,
    waits: HashMap<OpId, Wait>,
    next_op: OpId,
    finished: Vec<Finished>,
}

impl Ledger {
    /// A new id for a request that waits on storage.
    pub fn next_id(&mut self) -> OpId {
        self.next_op += 1;
        self.next_op
    }

    /// Job `job` was submitted for `why` (`State::submit_to`, the one place that submits).
    pub fn submitted(&mut self, job: JobId, why: JobFor) {
        self.jobs.insert(job, why);
    }

    /// Job `job` came back: what it was for (None: nobody knows it, e.g. after a re-exec).
    pub fn came_back(&mut self, job: JobId) -> Option<JobFor> {
        self.jobs.remove(&job)
    }

    /// A job still in flight is now for `why` (its request was answered or went away, or a
    /// group took it over). Returns false when the job already came back.
    pub fn reassign(&mut self, job: JobId, why: JobFor) -> bool {
        match self.jobs.get_mut(&job) {
            Some(w) => {
                *w = why;
                true
            }
            None => false,
        }
    }

    /// Park request `id` until its jobs come back.
    pub fn park(&mut self, id: OpId, wait: Wait) {
        self.waits.insert(id, wait);
    }

    /// Take request `id` out (to advance or answer it).
    pub fn take(&mut self, id: OpId) -> Option<Wait> {
        self.waits.remove(&id)
    }

    /// Take request `id` out when it is an Acquire.
    pub fn take_acquire(&mut self, id: OpId) -> Option<Box<AcquireOp>> {
        match self.waits.remove(&id)? {
            Wait::Acquire(op) => Some(op),
            other => {
                self.waits.insert(id, other);
                None
            }
        }
    }

    pub fn group_mut(&mut self, id: OpId) -> Option<&mut Group> {
        match self.waits.get_mut(&id) {
            Some(Wait::Group(g)) => Some(g),
            _ => None,
        }
    }

    pub fn thaw_mut(&mut self, id: OpId) -> Option<&mut ThawOp> {
        match self.waits.get_mut(&id) {
            Some(Wait::Thaw(t)) => Some(t),
            _ => None,
        }
    }

    /// The thaws in flight.
    pub fn thaws(&self) -> impl Iterator<Item = &ThawOp> {
        self.waits.values().filter_map(|w| match w {
            Wait::Thaw(t) => Some(t),
            _ => None,
        })
    }

    /// Requests whose deadline passed, oldest id first.
    pub fn due(&self, now: Instant) -> Vec<OpId> {
        self.select(|w| w.deadline().is_some_and(|d| d <= now))
    }

    /// Requests of client `conn`.
    pub fn of_conn(&self, conn: ConnId) -> Vec<OpId> {
        self.select(|w| w.conn() == conn)
    }

    /// Every waiting request.
    pub fn all(&self) -> Vec<OpId> {
        self.select(|_| true)
    }

    fn select(&self, pick: impl Fn(&Wait) -> bool) -> Vec<OpId> {
        let mut ids: Vec<OpId> = self
            .waits
            .iter()
            .filter(|(_, w)| pick(w))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Requests waiting on storage.
    pub fn waiting(&self) -> usize {
        self.waits.len()
    }

    /// Storage jobs in flight that change storage (disposals, record writes, closes), as
    /// opposed to Takes and probes.
    pub fn background_jobs(&self) -> usize {
        self.jobs
            .values()
            .filter(|j| matches!(j, JobFor::Other | JobFor::Group(_)))
            .count()
    }

    /// The earliest deadline of a waiting request.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waits.values().filter_map(Wait::deadline).min()
    }

    /// An answer is ready for its client.
    pub fn answer(&mut self, f: Finished) {
        self.finished.push(f);
    }

    /// The answers ready, for the event loop to send.
    pub fn take_finished(&mut self) -> Vec<Finished> {
        std::mem::take(&mut self.finished)
    }

    pub fn has_finished(&self) -> bool {
        !self.finished.is_empty()
    }
}
