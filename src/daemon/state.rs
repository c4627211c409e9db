//! The daemon's state: owners, leases and owners being terminated.
//!
//! Why a plain struct of tables: everything the daemon knows lives here and nowhere else (no
//! closures, no hidden per-connection copies), so a later live re-exec can write it out with
//! the descriptor numbers and read it back. Connections only refer to owners by pid, owners to
//! leases by key, leases to owners by pid.

use super::acquire::{self, AcquireOp, Finished};
use super::holder;
use super::keeper::{Hold, Keeper, Watch};
use super::kill::{Kill, Step};
use super::lease::{Lease, LeaseKey, Leases};
use super::lost;
use super::owner::{ConnId, Owners};
use super::record::LeaseRecord;
use super::release;
use super::storage::{JobId, Mounts, Outcome, Storage};
use crate::protocol::{LeaseInfo, PROTOCOL_VERSION, StatusInfo};
use log::{debug, info, warn};
use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct State {
    pub owners: Owners,
    pub leases: Leases,
    pub kills: Vec<Kill>,
    /// This host's name, reported as the holder's host.
    pub hostname: String,
    /// Start time, seconds since the epoch.
    pub started: u64,
    pub kill_grace: Duration,
    /// The process holding a duplicate of every lease's descriptor (crash safety).
    pub keeper: Keeper,
    /// Holder records published for the leases (who holds what, for other hosts; holder.rs).
    pub records: holder::Records,
    /// Per-mount storage threads (docs/storage.md) and what each job in flight is for.
    pub storage: Storage,
    pub jobs: HashMap<JobId, JobFor>,
    /// The mount table as last read (for attributing paths to mounts).
    pub mounts: Mounts,
    /// Acquires waiting on storage, and answers ready for their clients.
    pub acquires: HashMap<OpId, AcquireOp>,
    pub finished: Vec<Finished>,
    next_op: OpId,
    /// `storage_timeout_ms`: how long a request may wait on storage.
    pub storage_timeout: Duration,
    /// `lease_check_interval_ms` (None: lost-lock checks disabled) and the next check.
    pub check_interval: Option<Duration>,
    pub next_check: Option<Instant>,
    /// Leases whose probe is in flight (a stuck probe is not sent again).
    pub probing: HashSet<LeaseKey>,
    /// Lost leases found since start, and the latest ones.
    pub lost_total: u64,
    pub recent_lost: VecDeque<LeaseInfo>,
}

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
}

impl State {
    pub fn new(
        hostname: String,
        started: u64,
        kill_grace: Duration,
        keeper: Keeper,
        storage: Storage,
    ) -> State {
        State {
            owners: Owners::default(),
            leases: Leases::default(),
            kills: Vec::new(),
            hostname,
            started,
            kill_grace,
            keeper,
            records: holder::Records::default(),
            storage,
            jobs: HashMap::new(),
            mounts: Mounts::load(),
            acquires: HashMap::new(),
            finished: Vec::new(),
            next_op: 0,
            storage_timeout: Duration::from_millis(super::settings::DEFAULT_STORAGE_TIMEOUT_MS),
            check_interval: None,
            next_check: None,
            probing: HashSet::new(),
            lost_total: 0,
            recent_lost: VecDeque::new(),
        }
    }

    /// A new id for a request that waits on storage.
    pub fn next_op_id(&mut self) -> OpId {
        self.next_op += 1;
        self.next_op
    }

    /// Requests waiting on storage.
    pub fn waiting(&self) -> usize {
        self.acquires.len()
    }

    /// Handle every storage result that arrived.
    pub fn storage_results(&mut self) {
        for done in self.storage.collect() {
            let Some(why) = self.jobs.remove(&done.id) else {
                continue;
            };
            match (why, done.outcome) {
                (JobFor::Take(op), Outcome::Take(r)) => acquire::on_take(self, op, done.id, r),
                (JobFor::Orphan, Outcome::Take(r)) => acquire::orphan(self, done.id, r),
                (JobFor::Probe, Outcome::Probe { key, fd, result }) => {
                    lost::on_probe(self, key, &fd, result)
                }
                _ => {}
            }
        }
    }

    /// (Re)publish who holds lease `key`: after it was taken, when its owners changed, after
    /// recovery. Never fails: a record that cannot be written is logged, the lease stands.
    pub fn publish_holder(&mut self, key: LeaseKey) {
        let Some(l) = self.leases.get(&key) else {
            return;
        };
        let vms = l
            .owners
            .iter()
            .filter_map(|(pid, since)| {
                self.owners
                    .get(*pid)
                    .map(|e| holder::Vm::of(&e.owner, *since))
            })
            .collect();
        let record = holder::Record::new(
            &self.hostname,
            l.kind,
            &l.name,
            l.mode,
            &l.lock_path,
            l.since,
            vms,
        );
        let target = holder::Target {
            fd: l.fd.as_fd(),
            kind: l.kind,
            lock_path: &l.lock_path,
            lockspace: l.dir.is_some(),
        };
        self.records.publish((key.dev, key.ino), target, record);
    }

    /// Publish every lease's record again (after adopting leases from the keeper or a re-exec:
    /// side-file records died with the previous process's descriptors).
    pub fn publish_all_holders(&mut self) {
        let keys: Vec<LeaseKey> = self.leases.iter().map(|(k, _)| *k).collect();
        for key in keys {
            self.publish_holder(key);
        }
    }

    /// Make the keeper hold `keys` as the tables describe them now, and wait until it does.
    /// When the link broke, reconnect (or start a new keeper) and tell it everything again.
    pub fn protect(&mut self, keys: &[LeaseKey]) -> Result<(), String> {
        let fresh = self.keeper.ensure()?;
        if !fresh {
            match self.send_holds(keys) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    warn!("{e}; reconnecting and handing every lease over again");
                    self.keeper.ensure()?;
                }
            }
        }
        self.keeper.reset()?;
        let all: Vec<LeaseKey> = self.leases.iter().map(|(k, _)| *k).collect();
        self.send_holds(&all)?;
        info!(
            "the keeper (pid {}) holds all {} lease(s) again",
            self.keeper.pid,
            all.len()
        );
        Ok(())
    }

    fn send_holds(&mut self, keys: &[LeaseKey]) -> Result<(), String> {
        let holds: Vec<Hold<'_>> = keys
            .iter()
            .filter_map(|k| {
                let lease = self.leases.get(k)?;
                let record = LeaseRecord::of(&self.owners, lease);
                let pids = record
                    .owners
                    .iter()
                    .map(|o| Watch {
                        pid: o.owner.pid,
                        start: o.start,
                    })
                    .collect();
                let mut fds = vec![lease.fd.as_fd()];
                if let Some(d) = &lease.dir {
                    fds.push(d.fd.as_fd());
                }
                Some(Hold {
                    key: *k,
                    pids,
                    meta: serde_json::to_string(&record).unwrap_or_default(),
                    fds,
                })
            })
            .collect();
        self.keeper.hold(&holds)
    }

    /// The keeper closes its copies of `keys` (before we unlock and close ours): one message
    /// and one acknowledgement for all of them.
    pub fn unprotect(&mut self, keys: &[LeaseKey]) {
        if let Err(e) = self.keeper.release(keys) {
            warn!("{e}; the next lock request reconnects and re-sends every lease");
        }
    }

    fn info(&self, lease: &Lease) -> LeaseInfo {
        LeaseInfo {
            name: lease.name.clone(),
            kind: lease.kind,
            mode: lease.mode,
            lock_path: lease.lock_path.clone(),
            owners: lease
                .owners
                .keys()
                .filter_map(|pid| self.owners.get(*pid).map(|e| e.owner.clone()))
                .collect(),
            since: lease.since,
        }
    }

    /// The leases `pid` holds.
    pub fn infos_of(&self, pid: u32) -> Vec<LeaseInfo> {
        let Some(entry) = self.owners.get(pid) else {
            return Vec::new();
        };
        entry
            .leases
            .iter()
            .filter_map(|k| self.leases.get(k))
            .map(|l| self.info(l))
            .collect()
    }

    /// Every lease, sorted by the locked path.
    pub fn all_infos(&self) -> Vec<LeaseInfo> {
        let mut all: Vec<LeaseInfo> = self.leases.iter().map(|(_, l)| self.info(l)).collect();
        all.sort_by(|a, b| a.lock_path.cmp(&b.lock_path));
        all
    }

    pub fn status(&self, clients: usize) -> StatusInfo {
        StatusInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: PROTOCOL_VERSION,
            pid: std::process::id(),
            owners: self.owners.len(),
            leases: self.leases.len(),
            clients,
            started: self.started,
        }
    }

    /// Release every lease of `pid`; returns how many it held.
    fn release_all(&mut self, pid: u32, why: &str) -> usize {
        let keys: Vec<LeaseKey> = match self.owners.get(pid) {
            Some(e) => e.leases.iter().copied().collect(),
            None => return 0,
        };
        let leases: Vec<(LeaseKey, bool)> = keys.iter().map(|k| (*k, false)).collect();
        release::leave_many(self, pid, &leases, why);
        keys.len()
    }

    /// Connection `conn`, a lifetime handle of `pid`, closed. When it was the last one: an
    /// owner that is gone (or held nothing) loses its leases at once; one that still runs while
    /// holding leases is terminated and keeps them until it is gone.
    pub fn handle_closed(&mut self, pid: u32, conn: ConnId, now: Instant) {
        let Some(entry) = self.owners.get_mut(pid) else {
            return;
        };
        entry.handles.retain(|c| *c != conn);
        if !entry.handles.is_empty() {
            return;
        }
        let vm = entry.owner.name.clone();
        let held = entry.leases.len();
        if held == 0 {
            info!("lifetime handle of VM {vm:?} (pid {pid}) closed; it held no leases");
            self.owners.prune(pid);
            return;
        }
        if entry.proc.exited() {
            let released = self.release_all(pid, "lifetime handle closed");
            self.owners.remove(pid);
            info!("lifetime handle of VM {vm:?} (pid {pid}) closed; released {released} lease(s)");
            return;
        }
        if !self.kills.iter().any(|k| k.pid == pid) {
            info!("lifetime handle of VM {vm:?} (pid {pid}) closed while it holds {held} lease(s)");
            self.kills.push(Kill::start(pid, vm, held, now));
        }
    }

    /// The owner process `pid` exited: free its leases and forget it. Returns the connections
    /// that were its lifetime handles, which must no longer point at this pid.
    pub fn owner_exited(&mut self, pid: u32) -> Vec<ConnId> {
        let ending = match self.kills.iter().position(|k| k.pid == pid) {
            Some(i) => self.kills.swap_remove(i).ending(),
            None => "exited",
        };
        let held = self.release_all(pid, "VM exited");
        let Some(entry) = self.owners.remove(pid) else {
            return Vec::new();
        };
        if held > 0 {
            info!(
                "VM {:?} (pid {pid}) {ending}; released {held} lease(s)",
                entry.owner.name
            );
        } else {
            debug!("VM {:?} (pid {pid}) {ending}", entry.owner.name);
        }
        entry.handles
    }

    /// Is `pid` being terminated?
    pub fn terminating(&self, pid: u32) -> bool {
        self.kills.iter().any(|k| k.pid == pid)
    }

    /// Advance the termination sequences whose deadline passed. Returns the owners found gone,
    /// for the caller to pass to `owner_exited`.
    pub fn run_timers(&mut self, now: Instant) -> Vec<u32> {
        let mut gone = Vec::new();
        let grace = self.kill_grace;
        let owners = &self.owners;
        self.kills.retain_mut(|k| {
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
        self.kills
            .iter()
            .map(|k| k.deadline)
            .chain(self.acquires.values().map(|a| a.deadline))
            .chain(self.next_check)
            .min()
    }
}
