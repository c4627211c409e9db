//! Owners: the VMs leases are held for, keyed by pid.
//!
//! Why by pid: libvirtd acts for a QEMU process (the owner pid in every request), while the
//! QEMU process itself only holds the lifetime handle. The pid is what ties the two together.
//! While an owner has a lifetime handle open, the handle's close is the exit signal and the
//! owner's pidfd is parked (closed; pid and start time kept): a VM costs one descriptor, its
//! connection. When the last handle closes the pidfd is opened again, checked against the
//! start time, to see the process exit or to terminate it (kill.rs); an owner without a
//! handle (registered by libvirtd for it, or taken back after a restart) keeps its pidfd
//! (docs/reliability.md §3).

use super::lease::LeaseKey;
use super::pidfd::Proc;
use crate::protocol::{FailureAction, Owner};
use crate::text::esc;
use log::{info, warn};
use nix::errno::Errno;
use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// How often an owner whose pidfd could not be opened (EMFILE, ENFILE, ENOMEM) is tried again.
pub const REWATCH_EVERY: Duration = Duration::from_secs(1);

/// Identifies a client connection inside the server.
pub type ConnId = u64;

/// One known owner.
#[derive(Debug)]
pub struct OwnerEntry {
    /// The latest description libvirt sent (a second Register overwrites names).
    pub owner: Owner,
    /// The domain's `<on_lockfailure>` policy from its last Acquire.
    pub action: FailureAction,
    pub leases: BTreeSet<LeaseKey>,
    /// Connections that are this owner's lifetime handle (registered from the owner's pid).
    pub handles: Vec<ConnId>,
    /// The owner process: watched for exit by its pidfd, which is parked while `handles` is
    /// not empty ([`Owners::add_handle`], [`Owners::unpark`]).
    pub proc: Proc,
}

impl OwnerEntry {
    /// Can this entry be forgotten? Only when nothing refers to it and we could not notice the
    /// owner's death anyway (no pidfd); with a pidfd (or one being retried) the entry lives
    /// until the process exits. One with a handle is never idle: its pidfd is only parked.
    pub fn idle(&self) -> bool {
        self.leases.is_empty()
            && self.handles.is_empty()
            && self.proc.poll_fd().is_none()
            && !self.proc.retry
    }
}

/// The owner table.
#[derive(Debug, Default)]
pub struct Owners {
    map: HashMap<u32, OwnerEntry>,
    /// When owners without the pidfd they should have are tried again ([`Owners::rewatch`]).
    next_rewatch: Option<Instant>,
    /// Pids whose entry was added, removed or given a pidfd since [`Owners::take_changed`]
    /// was last called: the event loop (re)registers their pidfds from it (server.rs).
    changed: Vec<u32>,
}

impl Owners {
    /// The entry for `owner.pid`, created (with a pidfd) when new, names refreshed otherwise.
    /// `Err(ESRCH)`: no such process.
    pub fn ensure(&mut self, owner: &Owner) -> Result<&mut OwnerEntry, Errno> {
        match self.map.entry(owner.pid) {
            Entry::Occupied(e) => {
                let e = e.into_mut();
                if e.owner != *owner {
                    e.owner.clone_from(owner);
                }
                Ok(e)
            }
            Entry::Vacant(v) => {
                let proc = Proc::open(owner.pid)?;
                if proc.exited() {
                    // A zombie: it would be forgotten again on the next loop round.
                    return Err(Errno::ESRCH);
                }
                self.changed.push(owner.pid);
                Ok(v.insert(OwnerEntry {
                    owner: owner.clone(),
                    action: FailureAction::Default,
                    leases: BTreeSet::new(),
                    handles: Vec::new(),
                    proc,
                }))
            }
        }
    }

    /// Is `owner` the owner registered for its pid (if any)? The UUID is the identity; the
    /// name may change (a domain can be renamed, and [`Owners::ensure`] then updates it).
    /// A request naming a registered pid with another UUID is either a confused client or one
    /// trying to act on somebody else's leases.
    pub fn check_identity(&self, owner: &Owner) -> Result<(), String> {
        match self.map.get(&owner.pid) {
            // An empty uuid: rebuilt from a record that lacked it; the request fills it in.
            Some(e) if !e.owner.uuid.is_empty() && e.owner.uuid != owner.uuid => Err(format!(
                "pid {} is registered for VM '{}' (uuid {}); this request names uuid {} (VM \
                 '{}'); a process can be the owner of one VM only",
                owner.pid,
                e.owner.name,
                esc(&e.owner.uuid),
                esc(&owner.uuid),
                esc(&owner.name)
            )),
            _ => Ok(()),
        }
    }

    /// Is there room for `owner` (already known, or fewer than `max` owners)?
    pub fn check_room(&self, owner: &Owner, max: usize, config_file: &str) -> Result<(), String> {
        if self.map.contains_key(&owner.pid) || self.map.len() < max {
            return Ok(());
        }
        Err(format!(
            "lockwardend already tracks its maximum of {max} VMs (max_owners); VM '{}' (pid {}) \
             cannot be added; raise max_owners in {config_file}",
            esc(&owner.name),
            owner.pid
        ))
    }

    /// Add an entry rebuilt after a restart or a live re-exec. One whose pidfd could not be
    /// opened yet ([`Proc::unwatched`]) is tried again every [`REWATCH_EVERY`]; one with a
    /// lifetime handle (carried over a live re-exec) has its pidfd parked.
    pub fn insert(&mut self, mut entry: OwnerEntry) {
        if !entry.handles.is_empty() {
            entry.proc.park();
        }
        if entry.proc.retry && self.next_rewatch.is_none() {
            self.next_rewatch = Some(Instant::now() + REWATCH_EVERY);
        }
        self.changed.push(entry.owner.pid);
        self.map.insert(entry.owner.pid, entry);
    }

    /// Connection `conn` is a lifetime handle of the known owner `pid`: while one is open its
    /// close is the exit signal, so the owner's pidfd is parked (closed, and its epoll
    /// registration forgotten).
    pub fn add_handle(&mut self, pid: u32, conn: ConnId) {
        if let Some(e) = self.map.get_mut(&pid) {
            e.handles.push(conn);
            if e.proc.poll_fd().is_some() || e.proc.retry {
                e.proc.park();
                self.changed.push(pid);
            }
        }
    }

    /// The last lifetime handle of `pid` closed: open its pidfd again, checked against the
    /// start time. `Err(ESRCH)`: the owner is gone (or its pid names another process now).
    /// Any other error says nothing about the owner: it is reported, kept, and tried again
    /// every [`REWATCH_EVERY`] (its plain pid and start time meanwhile).
    pub fn unpark(&mut self, pid: u32) -> Result<(), Errno> {
        let Some(e) = self.map.get_mut(&pid) else {
            return Ok(());
        };
        if !e.proc.parked() {
            return Ok(());
        }
        match e.proc.unpark() {
            Ok(()) => {
                self.changed.push(pid);
                Ok(())
            }
            Err(Errno::ESRCH) => Err(Errno::ESRCH),
            Err(why) => {
                Owners::report_unwatched(&e.owner, why);
                if self.next_rewatch.is_none() {
                    self.next_rewatch = Some(Instant::now() + REWATCH_EVERY);
                }
                Err(why)
            }
        }
    }

    /// The pids whose entry or pidfd changed since the last call (each maybe more than once).
    pub fn take_changed(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.changed)
    }

    /// When [`Owners::rewatch`] wants to run next (None: every owner is watched).
    pub fn next_rewatch(&self) -> Option<Instant> {
        self.next_rewatch
    }

    /// Try again to open the pidfds that could not be opened (issue 19: only ESRCH or a
    /// start-time mismatch means the owner is gone). Returns the owners found gone meanwhile;
    /// the caller releases their leases.
    pub fn rewatch(&mut self, now: Instant) -> Vec<u32> {
        match self.next_rewatch {
            Some(t) if t <= now => {}
            _ => return Vec::new(),
        }
        let mut gone = Vec::new();
        let mut waiting = false;
        for (pid, e) in self.map.iter_mut().filter(|(_, e)| e.proc.retry) {
            match e.proc.rewatch() {
                Ok(false) => {}
                Ok(true) => {
                    self.changed.push(*pid);
                    info!(
                        "VM {:?} (pid {pid}) is watched for its exit again (pidfd opened); its {} \
                         lease(s) were kept meanwhile",
                        e.owner.name,
                        e.leases.len()
                    )
                }
                Err(Errno::ESRCH) => gone.push(*pid),
                Err(err) => {
                    waiting = true;
                    log::debug!(
                        "VM {:?} (pid {pid}): still cannot open a pidfd: {}",
                        e.owner.name,
                        err.desc()
                    );
                }
            }
        }
        self.next_rewatch = waiting.then(|| now + REWATCH_EVERY);
        gone
    }

    /// An owner whose pidfd could not be opened: kept (its leases stay held), reported, and
    /// tried again by [`Owners::rewatch`].
    pub fn report_unwatched(owner: &Owner, why: Errno) {
        warn!(
            "cannot watch VM {:?} (pid {}) for its exit: pidfd_open or reading /proc/{}/stat \
             failed: {} ({why}); this does not mean it exited: its leases stay held \
             and lockwardend tries again every {} s; if this persists, raise lockwardend's \
             open-file limit (LimitNOFILE=) or free memory",
            owner.name,
            owner.pid,
            owner.pid,
            why.desc(),
            REWATCH_EVERY.as_secs()
        );
    }

    pub fn get(&self, pid: u32) -> Option<&OwnerEntry> {
        self.map.get(&pid)
    }

    pub fn get_mut(&mut self, pid: u32) -> Option<&mut OwnerEntry> {
        self.map.get_mut(&pid)
    }

    pub fn remove(&mut self, pid: u32) -> Option<OwnerEntry> {
        let e = self.map.remove(&pid);
        if e.is_some() {
            self.changed.push(pid);
        }
        e
    }

    /// Forget `pid` if its entry is idle.
    pub fn prune(&mut self, pid: u32) {
        if self.map.get(&pid).is_some_and(OwnerEntry::idle) {
            self.map.remove(&pid);
            self.changed.push(pid);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u32, &OwnerEntry)> {
        self.map.iter()
    }
}
