//! The daemon's state: owners, leases and owners being terminated.
//!
//! Why a plain struct of tables: everything the daemon knows lives here and nowhere else (no
//! closures, no hidden per-connection copies), so a later live re-exec can write it out with
//! the descriptor numbers and read it back. Connections only refer to owners by pid, owners to
//! leases by key, leases to owners by pid.

use super::error::DaemonError;
use super::holder;
use super::keeper::{Hold, Keeper, Watch};
use super::kill::Kills;
use super::lease::{Lease, LeaseKey, Leases};
use super::ledger::{Finished, Group, JobFor, Ledger, OpId, Pending, Then, Wait};
use super::owner::{ConnId, Owners};
use super::record::LeaseRecord;
use super::storage::{Disposing, JobId, Mounts, Storage, Work};
use crate::metrics::{LeaseCount, MountHealth, Snapshot};
use crate::protocol::{LeaseInfo, LeaseMode, PROTOCOL_VERSION, Response, StatusInfo};
use crate::text::esc;
use log::{error, info, warn};
use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct State {
    pub owners: Owners,
    pub leases: Leases,
    /// Owners being terminated (SIGTERM, then SIGKILL after `kill_grace_ms`; kill.rs).
    pub kills: Kills,
    /// This host's name, reported as the holder's host.
    pub hostname: String,
    /// Start time, seconds since the epoch.
    pub started: u64,
    /// The process holding a duplicate of every lease's descriptor (crash safety).
    pub keeper: Keeper,
    /// Holder records of the leases (who holds what, for other hosts; holder/), written and
    /// withdrawn on the storage threads of each lease's mount.
    records: HashMap<LeaseKey, holder::Slot>,
    /// Leases whose record was claimed but not written yet (host-local mounts): written right
    /// after the answers of the loop round went out (`write_unwritten`).
    unwritten: Vec<LeaseKey>,
    /// Per-mount storage threads (docs/storage.md): they only execute jobs.
    pub storage: Storage,
    /// What each storage job in flight is for, and the requests waiting on them (ledger.rs).
    pub ledger: Ledger,
    /// The mount table as last read (for attributing paths to mounts).
    pub mounts: Mounts,
    /// `storage_timeout_ms`: how long a request may wait on storage.
    pub storage_timeout: Duration,
    /// The lost-lock check: its schedule, probes in flight, per-lease history and the latest
    /// detections (health.rs; lost.rs acts on it).
    pub health: super::health::Health,
    /// Storage liveness per mount and the leases fenced for it (heartbeat.rs, fence.rs).
    pub heartbeat: super::liveness::Heartbeats,
    /// `watchdog_device`, open and fed while allowed (watchdog.rs).
    pub watchdog: Option<super::watchdog::Watchdog>,
    /// What `lockwarden metrics` reports (metrics.rs); carried across a live re-exec.
    pub metrics: crate::metrics::Counters,
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
            kills: Kills::new(kill_grace),
            hostname,
            started,
            keeper,
            records: HashMap::new(),
            unwritten: Vec::new(),
            storage,
            ledger: Ledger::default(),
            mounts: Mounts::load(),
            storage_timeout: Duration::from_millis(super::settings::DEFAULT_STORAGE_TIMEOUT_MS),
            health: super::health::Health::default(),
            heartbeat: super::liveness::Heartbeats::default(),
            watchdog: None,
            metrics: crate::metrics::Counters {
                started_boot_ms: super::metrics::boot_ms(),
                ..Default::default()
            },
        }
    }

    /// A state for the core's unit tests (core_tests.rs): `keeper` (a recording link), fresh
    /// storage pools, this host's mount table, a kill grace of one second.
    #[cfg(test)]
    pub fn for_test(keeper: Keeper) -> State {
        let storage = Storage::new().expect("a pipe for the storage wake-ups");
        State::new(
            "test-host".into(),
            0,
            Duration::from_secs(1),
            keeper,
            storage,
        )
    }

    /// Requests waiting on storage.
    pub fn waiting(&self) -> usize {
        self.ledger.waiting()
    }

    /// Storage jobs in flight that change storage (disposals, record writes, closes).
    pub fn background_jobs(&self) -> usize {
        self.ledger.background_jobs()
    }

    /// A new group of jobs an answer for `conn` will wait for.
    pub fn new_group(&mut self, conn: ConnId) -> OpId {
        let id = self.ledger.next_id();
        let now = Instant::now();
        self.ledger.park(
            id,
            Wait::Group(Group {
                conn,
                jobs: HashMap::new(),
                then: None,
                deadline: now + self.storage_timeout,
                started: now,
            }),
        );
        id
    }

    /// Make `group` wait for these jobs too.
    pub fn track(&mut self, group: OpId, pending: Vec<Pending>) {
        if self.ledger.group_mut(group).is_none() {
            return;
        }
        for p in pending {
            // A job that already came back is not waited for.
            if self.ledger.reassign(p.job, JobFor::Group(group)) {
                if let Some(g) = self.ledger.group_mut(group) {
                    g.jobs.insert(p.job, (p.what, p.mount));
                }
            }
        }
    }

    /// The request behind `group` is done: answer `then` once its jobs are (at the latest at
    /// `deadline`).
    pub fn settle(&mut self, group: OpId, then: Then, deadline: Instant) {
        let Some(g) = self.ledger.group_mut(group) else {
            return;
        };
        g.then = Some(then);
        g.deadline = deadline;
        if g.jobs.is_empty() {
            if let Some(Wait::Group(g)) = self.ledger.take(group) {
                self.finish_group(g, false);
            }
        }
    }

    /// A job a group waited for came back.
    pub fn job_done(&mut self, why: JobFor, job: JobId) {
        let JobFor::Group(group) = why else {
            return;
        };
        let Some(g) = self.ledger.group_mut(group) else {
            return;
        };
        g.jobs.remove(&job);
        if g.jobs.is_empty() && g.then.is_some() {
            if let Some(Wait::Group(g)) = self.ledger.take(group) {
                self.finish_group(g, false);
            }
        }
    }

    /// Answer a group: its jobs are done, or (`late`) its deadline passed.
    pub fn finish_group(&mut self, g: Group, late: bool) {
        for job in g.jobs.keys() {
            self.ledger.reassign(*job, JobFor::Other);
        }
        let Some(then) = g.then else {
            return;
        };
        let (response, restrict) = match then {
            Then::Respond(r) => (r, false),
            Then::Acquired { pid, restrict } => {
                if late {
                    warn!(
                        "holder records of pid {pid}'s leases were not written within the \
                        storage timeout; answering the acquire anyway (the leases are held)"
                    );
                }
                (
                    Response::Ok {
                        // Acquire/Release answers carry no lease list (docs/protocol.md).
                        leases: Vec::new(),
                    },
                    restrict,
                )
            }
            Then::Released { pid, vm } if late => {
                let mut stuck: Vec<&(String, PathBuf)> = g.jobs.values().collect();
                stuck.sort();
                let ms = g.started.elapsed().as_millis();
                super::metrics::stalled(&mut self.metrics, stuck.iter().map(|(_, m)| m.as_path()));
                let (what, mount) = stuck
                    .first()
                    .map(|(w, m)| (w.clone(), m.to_string_lossy().into_owned()))
                    .unwrap_or_default();
                error!(
                    "release for VM {vm:?} (pid {pid}) timed out: {what:?} on mount {mount:?} is \
                    not answering after {ms} ms"
                );
                let message = format!(
                    "storage holding {} (mount {}) is not answering: the release was not \
                    finished within {ms} ms ({} file(s) still waiting); VM '{}' no longer holds \
                    the lease and lockwardend drops the lock as soon as the storage answers; \
                    check the storage (NFS server, network) behind {}",
                    esc(&what),
                    esc(&mount),
                    stuck.len(),
                    esc(&vm),
                    esc(&mount)
                );
                (DaemonError::timeout(message).into_response(), false)
            }
            Then::Released { .. } => (
                Response::Ok {
                    // Acquire/Release answers carry no lease list (docs/protocol.md).
                    leases: Vec::new(),
                },
                false,
            ),
        };
        self.ledger.answer(Finished {
            conn: g.conn,
            response,
            restrict,
        });
    }

    /// The record a new exclusive lease's job published (or claimed, to be written after the
    /// answer: `write_unwritten`), kept current from now on.
    pub fn adopt_record(&mut self, key: LeaseKey, published: holder::Published) {
        if published.is_pending() {
            self.unwritten.push(key);
        }
        self.records.insert(key, Arc::new(Mutex::new(published)));
    }

    /// Write the records claimed for this round's acquires (see `holder::claim_known`).
    pub fn write_unwritten(&mut self) {
        for key in std::mem::take(&mut self.unwritten) {
            let (Some(slot), Some(lease)) = (self.records.get(&key), self.leases.get(&key)) else {
                continue;
            };
            let result = match slot.lock() {
                Ok(mut p) => holder::write_pending(lease.fd.as_fd(), &mut p),
                Err(_) => Err("its record handle is poisoned".into()),
            };
            if let Err(e) = result {
                let name = self.leases.get(&key).map(|l| l.name.clone());
                warn!(
                    "cannot write the holder record for {:?} (the lease itself is held; other \
                     hosts will only see that it is locked): {e}",
                    name.unwrap_or_default()
                );
            }
        }
    }

    /// Queue `work` on a storage thread of `mount` (its thread count and whether it runs inline
    /// from the mount table), for `why`.
    pub fn submit(&mut self, mount: &Path, work: Work, why: JobFor) -> JobId {
        let (threads, local) = (self.mounts.threads(mount), self.mounts.is_local(mount));
        self.submit_to(mount, threads, local, work, why)
    }

    /// Queue `work` on pool `pool` (at most `threads` threads; `inline`: run it in the loop,
    /// host-local storage only) and note what it is for: every storage job goes through here.
    pub fn submit_to(
        &mut self,
        pool: &Path,
        threads: usize,
        inline: bool,
        work: Work,
        why: JobFor,
    ) -> JobId {
        let job = self.storage.submit(pool, threads, inline, work);
        self.ledger.submitted(job, why);
        job
    }

    /// The holder record of lease `key` as the tables describe it now (generation: now).
    pub fn holder_record(&self, key: &LeaseKey) -> Option<holder::Record> {
        let l = self.leases.get(key)?;
        let vms = l
            .owners
            .iter()
            .filter_map(|(pid, since)| {
                self.owners
                    .get(*pid)
                    .map(|e| holder::Vm::of(&e.owner, *since))
            })
            .collect();
        let mut record = holder::Record::new(
            &self.hostname,
            l.kind,
            &l.name,
            l.mode,
            &l.lock_path,
            l.since,
            vms,
        );
        record.generation = holder::next_generation();
        Some(record)
    }

    /// (Re)publish who holds lease `key` — when its owners changed, after recovery — on a
    /// storage thread of its mount (a new lease's record is written by the job that locked it).
    /// Never fails: a record that cannot be written is logged, the lease stands. Returns the job
    /// for a request that wants to answer only once the record is written.
    pub fn publish_holder(&mut self, key: LeaseKey) -> Option<Pending> {
        let record = self.holder_record(&key)?;
        let l = self.leases.get(&key)?;
        let slot = Arc::clone(
            self.records
                .entry(key)
                .or_insert_with(|| Arc::new(Mutex::new(holder::Published::nowhere()))),
        );
        let mount = self.mounts.of(&l.lock_path);
        let work = Work::Publish {
            fd: Arc::clone(&l.fd),
            kind: l.kind,
            lock_path: l.lock_path.to_string(),
            lockspace: l.dir.is_some(),
            slot,
            record,
        };
        let what = format!("{} {}", crate::text::what(l.kind), l.name);
        Some(self.submit_other(mount, what, work))
    }

    /// Queue `work` on a storage thread of `mount`, for an answer that waits for it.
    fn submit_other(&mut self, mount: PathBuf, what: String, work: Work) -> Pending {
        let job = self.submit(&mount, work, JobFor::Other);
        Pending { job, what, mount }
    }

    /// Publish every lease's record again (after adopting leases from the keeper or a re-exec:
    /// the previous process's record handles are gone; the adopted descriptions still hold the
    /// records' liveness bytes, docs/holders.md section 3).
    pub fn publish_all_holders(&mut self) {
        self.mounts.refresh();
        // Adopted leases: their mount by the device of what was opened (storage.rs `note`).
        self.leases
            .iter()
            .for_each(|(k, l)| self.mounts.note(&l.lock_path, k.dev, None));
        let keys: Vec<LeaseKey> = self.leases.iter().map(|(k, _)| *k).collect();
        for key in keys {
            self.publish_holder(key);
        }
    }

    /// Dispose of a lease whose last owner left (the keeper already let go) on a storage thread
    /// of its mount: withdraw its record, delete its lock file when `delete`, unlock, close.
    pub fn dispose(&mut self, key: LeaseKey, delete: bool, why: &str) -> Option<Pending> {
        let l = self.leases.take_for_disposal(&key)?;
        let what = format!("{} {}", crate::text::what(l.kind), l.name);
        let label = format!("{} {:?} released{why}", crate::text::what(l.kind), l.name);
        let mount = self.mounts.of(&l.lock_path);
        let work = Work::Dispose(Box::new(Disposing {
            key,
            fd: l.fd,
            dir: l.dir.map(|d| *d),
            mode: l.mode,
            delete: delete || l.delete_when_free,
            slot: self.records.remove(&key),
            held: Some(self.leases.held_keys()),
            label,
        }));
        Some(self.submit_other(mount, what, work))
    }

    /// Hand `keys` to the keeper as the tables describe them now: done when their descriptors
    /// are in its socket (a version 3 keeper) or it acknowledged them (older keepers).
    /// When the link broke, reconnect (or start a new keeper) and tell it everything again.
    pub fn protect(&mut self, keys: &[LeaseKey]) -> Result<(), String> {
        let fresh = self.keeper.ensure()?;
        if fresh && self.keeper.started_new {
            // metrics (issue 18): the previous keeper went away and a new one was started.
            self.metrics.keeper_restarts += 1;
            super::logging::event(
                log::Level::Warn,
                super::logging::Event::KeeperReplaced,
                &[("KEEPER_PID", &self.keeper.pid.to_string())],
                format_args!(
                    "started a new keeper (pid {}) at {:?}: the previous one went away; \
                     handing every lease to it",
                    self.keeper.pid,
                    self.keeper.path()
                ),
            );
        }
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
        // A hand-over cut short leaves the keeper with only some leases: the failed send broke
        // the link, and the event loop starts over (reset, everything) by itself.
        self.send_holds(&all).map_err(|e| {
            format!(
                "{e}; the keeper was reset and may hold only some of the {} lease(s) until \
                 they are handed over again",
                all.len()
            )
        })?;
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

    /// The keeper closes its copies of `keys` (told before we unlock and close ours): one
    /// message for all of them.
    pub fn unprotect(&mut self, keys: &[LeaseKey]) {
        if let Err(e) = self.keeper.release(keys) {
            warn!("{e}; lockwardend reconnects and re-sends every lease by itself");
        }
    }

    fn info(&self, key: &LeaseKey, lease: &Lease) -> LeaseInfo {
        LeaseInfo {
            name: lease.name.to_string(),
            kind: lease.kind,
            mode: lease.mode,
            lock_path: lease.lock_path.to_string(),
            owners: lease
                .owners
                .keys()
                .filter_map(|pid| self.owners.get(*pid).map(|e| e.owner.clone()))
                .collect(),
            since: lease.since,
            fence: self.heartbeat.fenced.get(key).map(|f| f.info()),
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
            .filter_map(|k| self.leases.get(k).map(|l| self.info(k, l)))
            .collect()
    }

    /// Every lease, sorted by the locked path.
    pub fn all_infos(&self) -> Vec<LeaseInfo> {
        let mut all: Vec<LeaseInfo> = self.leases.iter().map(|(k, l)| self.info(k, l)).collect();
        all.sort_by(|a, b| a.lock_path.cmp(&b.lock_path));
        all
    }

    pub fn status(&self, clients: usize) -> StatusInfo {
        StatusInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: PROTOCOL_VERSION,
            pid: std::process::id(),
            watchdog_device: self
                .watchdog
                .as_ref()
                .map(|w| w.path.to_string_lossy().into_owned()),
            owners: self.owners.len(),
            leases: self.leases.len(),
            clients,
            started: self.started,
            heartbeat_interval_ms: Some(
                self.heartbeat
                    .interval
                    .map_or(0, |i| u64::try_from(i.as_millis()).unwrap_or(u64::MAX)),
            ),
            fence_after_ms: u64::try_from(self.heartbeat.fence_after.as_millis()).ok(),
        }
    }

    /// The answer to a `metrics` request.
    pub fn metrics_snapshot(&self) -> Snapshot {
        let mut leases: BTreeMap<(String, bool), u64> = BTreeMap::new();
        for (k, l) in self.leases.iter() {
            let mount = match self.mounts.of_dev(k.dev) {
                Some((m, _)) => m.to_string_lossy().into_owned(),
                None => super::metrics::mount_label(&self.mounts.of(&l.lock_path)),
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
        for key in self.heartbeat.fenced.keys() {
            if let Some(l) = self.leases.get(key) {
                fenced_pids.extend(l.owners.keys().copied());
            }
        }
        let mounts = self
            .heartbeat
            .mount_health()
            .into_iter()
            .map(|(m, age, fenced)| MountHealth {
                mount: m.to_string_lossy().into_owned(),
                heartbeat_age_ms: super::metrics::micros(age) / 1000,
                fenced,
            })
            .collect();
        let c = &self.metrics;
        Snapshot {
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: PROTOCOL_VERSION,
            pid: std::process::id(),
            started: self.started,
            uptime_ms: super::metrics::boot_ms().saturating_sub(c.started_boot_ms),
            owners: self.owners.len() as u64,
            leases,
            fenced_vms: fenced_pids.len() as u64,
            mounts,
            heartbeat_interval_ms: self
                .heartbeat
                .interval
                .map(|i| super::metrics::micros(i) / 1000),
            fence_after_ms: super::metrics::micros(self.heartbeat.fence_after) / 1000,
            keeper_up: self.keeper.connected(),
            keeper_pid: self.keeper.pid,
            counters: c.clone(),
        }
    }

    /// Is `pid` being terminated?
    pub fn terminating(&self, pid: u32) -> bool {
        self.kills.terminating(pid)
    }

    /// Advance the termination sequences whose deadline passed. Returns the owners found gone,
    /// for the caller to pass to `owner_exited`.
    pub fn run_timers(&mut self, now: Instant) -> Vec<u32> {
        let mut gone = self.kills.advance(&self.owners, now);
        // Owners whose pidfd could not be opened (issue 19): watched again, or found gone.
        gone.extend(self.owners.rewatch(now));
        gone
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.kills
            .next_deadline()
            .into_iter()
            .chain(self.ledger.next_deadline())
            .chain(self.health.next_deadline())
            .chain(self.heartbeat.next_deadline())
            .chain(self.watchdog.as_ref().map(|w| w.next_deadline()))
            .chain(self.owners.next_rewatch())
            .min()
    }
}
