//! Taking leases: all or nothing, idempotent, de-duplicated by inode (docs/interfaces.md §2-§3).
//!
//! Why an undo log: a VM with sixteen disks whose ninth is busy must not keep the first eight
//! locked (another host would then find them busy for no reason). Every step that changes the
//! tables records how to take it back, and a failure replays the log backwards, leaving leases
//! the owner held before the request untouched.
//!
//! Exclusive leases are taken before shared ones, so a request naming one image twice (once
//! writable, once read-only) locks it exclusively and the shared entry then finds it held.

use super::Failure;
use super::error::DaemonError;
use super::holder;
use super::lease::{Lease, LeaseKey, LeaseOwners};
use super::ledger::{AcquireOp, Finished, JobFor, OpId, Pending, Then, Undo, Wait};
use super::lockfile::{self, Opened};
use super::owner::ConnId;
use super::release;
use super::state::State;
use super::storage::{Busy, Disposing, JobId, Taken, Work};
use crate::protocol::{
    ErrorKind, FailureAction, Holder, LeaseMode, LeaseSpec, Owner, ResourceKind, Response,
};
use crate::text::{esc, mode_word, now_secs, subject, utc, what};
use log::{debug, error, info};
use nix::errno::Errno;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// How often one disk's job is started again because the table changed under it.
const RESUBMITS: usize = 8;

/// The journal fields of an acquire's event: the VM, then one `DISK` per lease named.
fn fields<'a>(
    owner: &'a Owner,
    disks: impl Iterator<Item = &'a str>,
) -> Vec<(&'static str, &'a str)> {
    let mut f = vec![
        ("VM_NAME", owner.name.as_str()),
        ("VM_UUID", owner.uuid.as_str()),
    ];
    f.extend(disks.map(|d| ("DISK", d)));
    f
}

/// Log a refusal as the `refused` journal event (docs/operators.md §11): the VM, every disk
/// of the request (or the one refused, when the refusal names it) and the holder's host.
pub fn refused_event(owner: &Owner, specs: &[LeaseSpec], e: &DaemonError) {
    refused_log(owner, specs.iter().map(|s| s.name.as_str()), e);
}

fn refused_log<'a>(owner: &'a Owner, disks: impl Iterator<Item = &'a str>, e: &'a DaemonError) {
    let mut f = match e.resource() {
        Some(r) => fields(owner, std::iter::once(r)),
        None => fields(owner, disks),
    };
    if let Some(h) = e.holder().and_then(|h| h.host.as_deref()) {
        f.push(("HOLDER_HOST", h));
    }
    if let Some(vm) = e.holder().and_then(|h| h.vm_name.as_deref()) {
        f.push(("HOLDER_VM_NAME", vm));
    }
    f.push(("REASON", super::metrics::reason(e.kind())));
    super::logging::event(
        log::Level::Info,
        super::logging::Event::Refused,
        &f,
        format_args!(
            "refused acquire for VM {:?} (pid {}): {}",
            owner.name,
            owner.pid,
            e.message()
        ),
    );
}

/// Start taking every lease in `specs` for `owner`, or none of the new ones. The answer comes
/// later through `state.finished`.
pub fn start(
    state: &mut State,
    conn: ConnId,
    owner: &Owner,
    specs: &[LeaseSpec],
    action: FailureAction,
    restrict: bool,
) -> Result<(), Failure> {
    for spec in specs {
        lockfile::validate(spec).map_err(|m| DaemonError::on(ErrorKind::Invalid, spec, m))?;
    }
    if state.terminating(owner.pid) {
        return Err(Box::new(DaemonError::invalid(format!(
            "VM '{}' (pid {}) is being terminated because its lifetime handle closed while \
                 it held leases; it cannot take new ones",
            esc(&owner.name),
            owner.pid
        ))));
    }
    let entry = state
        .owners
        .ensure(owner)
        .map_err(|e| Box::new(owner_unwatchable(owner, e)))?;
    entry.action = action;
    let exclusive: Vec<LeaseSpec> = specs
        .iter()
        .filter(|s| s.mode == LeaseMode::Exclusive)
        .cloned()
        .collect();
    let shared: Vec<LeaseSpec> = specs
        .iter()
        .filter(|s| s.mode == LeaseMode::Shared)
        .cloned()
        .collect();
    let now = Instant::now();
    let op = Box::new(AcquireOp {
        conn,
        owner: owner.clone(),
        restrict,
        phases: VecDeque::from([exclusive, shared]),
        inflight: HashMap::new(),
        conflicts: Vec::new(),
        undo: Vec::new(),
        failure: None,
        deadline: now + state.storage_timeout,
        started: now,
        requested: specs.len(),
        disks: specs.iter().map(|s| s.name.clone()).collect(),
        since: now_secs(),
        group: None,
    });
    let id = state.ledger.next_id();
    advance(state, id, op);
    Ok(())
}

/// Queue the jobs of one file.
fn submit(state: &mut State, id: OpId, op: &mut AcquireOp, spec: LeaseSpec, tries: usize) {
    let lock_path = lockfile::target_path(&spec.target);
    // Inline only when the path is proven to stay on a host-local file system (never from
    // its text alone: a symlink may lead to NFS); anything else is resolved on a worker.
    let (mount, inline) = state.mounts.place(&lock_path);
    let held = state.leases.held_keys();
    // An exclusive lease's record is written by the job that locks it (in parallel across
    // files, before the answer). A shared one may be joined by another request meanwhile, so
    // its record is written once it is in the table (`commit`).
    let record = (spec.mode == LeaseMode::Exclusive).then(|| {
        holder::Record::new(
            &state.hostname,
            spec.kind,
            &spec.name,
            spec.mode,
            &lock_path,
            op.since,
            vec![holder::Vm::of(&op.owner, op.since)],
        )
    });
    let threads = state.mounts.threads(&mount);
    let work = Work::Take {
        spec: spec.clone(),
        held,
        record,
        defer: inline,
    };
    let job = state.submit_to(&mount, threads, inline, work, JobFor::Take(id));
    op.inflight.insert(job, (spec, mount, tries));
}

/// Move `op` on: judge a finished phase, start the next, or answer.
fn advance(state: &mut State, id: OpId, mut op: Box<AcquireOp>) {
    loop {
        if !op.inflight.is_empty() {
            state.ledger.park(id, Wait::Acquire(op));
            return;
        }
        for (spec, key, busy) in std::mem::take(&mut op.conflicts) {
            if op.failure.is_some() {
                break;
            }
            if state.leases.get(&key).is_some() {
                if let Err(e) = join(state, &mut op, &spec, key) {
                    op.failure = Some(e);
                }
            } else {
                op.failure = Some(busy);
            }
        }
        if let Some(f) = op.failure.take() {
            fail(state, op, *f);
            return;
        }
        match op.phases.pop_front() {
            Some(specs) => {
                if !specs.is_empty() {
                    state.mounts.refresh();
                }
                for spec in specs {
                    submit(state, id, &mut op, spec, 0);
                }
            }
            None => {
                succeed(state, op);
                return;
            }
        }
    }
}

/// A Take job of `id` came back.
pub fn on_take(state: &mut State, id: OpId, job: JobId, result: Result<Taken, Failure>) {
    let Some(mut op) = state.ledger.take_acquire(id) else {
        orphan(state, job, result);
        return;
    };
    let Some((spec, mount, tries)) = op.inflight.remove(&job) else {
        state.ledger.park(id, Wait::Acquire(op));
        orphan(state, job, result);
        return;
    };
    note(state, &result, Some(&mount));
    match result {
        Err(f) => {
            op.failure.get_or_insert(f);
        }
        Ok(Taken::Conflict {
            key,
            busy: Busy::Told(busy),
        }) => op.conflicts.push((spec, key, busy)),
        Ok(Taken::Conflict {
            key,
            busy: Busy::Unread(opened),
        }) => {
            if op.failure.is_none() && state.leases.get(&key).is_some() {
                // Our own lease: judged from the tables when the phase ends (no record to
                // read). Should it be gone by then, the file was busy a moment ago only.
                let m = holder::describe_refusal(
                    spec.kind,
                    &spec.name,
                    Some(&opened.lock_path),
                    &[],
                    None,
                );
                close(state, &mount, *opened, None);
                let busy = DaemonError::on(ErrorKind::Busy, &spec, m);
                op.conflicts.push((spec, key, busy));
            } else if op.failure.is_none() {
                // Other hosts' records are read on a worker, never on the event loop: a
                // directory of hostile records, or a hung mount where they live, must not
                // stall the daemon. Its answer comes back here as `Busy::Told`.
                describe(state, id, &mut op, spec, *opened, &mount, tries);
            } else {
                close(state, &mount, *opened, None);
            }
        }
        Ok(Taken::Held(opened)) => {
            let key = opened.key;
            close(state, &mount, opened, None);
            if op.failure.is_none() {
                if state.leases.get(&key).is_some() {
                    if let Err(e) = join(state, &mut op, &spec, key) {
                        op.failure = Some(e);
                    }
                } else if tries < RESUBMITS {
                    // Released meanwhile: take it afresh.
                    submit(state, id, &mut op, spec, tries + 1);
                } else {
                    op.failure = Some(DaemonError::on(
                        ErrorKind::Internal,
                        &spec,
                        "its lease kept changing while being taken; retry".into(),
                    ));
                }
            }
        }
        Ok(Taken::Locked(opened, published)) => {
            let published = match published {
                Some(Ok(p)) => Some(p),
                Some(Err(e)) => {
                    log::warn!(
                        "cannot publish the holder record for {:?} (the lease itself is held; \
                        other hosts will only see that it is locked): {e}",
                        spec.name
                    );
                    None
                }
                None => None,
            };
            if op.failure.is_some() {
                close(state, &mount, opened, published);
            } else if let Err(e) = commit(state, &mut op, &spec, opened, published, &mount) {
                op.failure = Some(e);
            }
        }
    }
    advance(state, id, op);
}

/// Remember on which mount the file a Take opened really is, so work on its descriptor runs
/// inline only when that is a host-local file system: `mount`, when the Take ran inline (its
/// path was proven to stay on that local mount), else by the `st_dev` of what was opened.
fn note(state: &mut State, result: &Result<Taken, Failure>, mount: Option<&std::path::Path>) {
    let proven = mount.filter(|m| state.mounts.is_local(m));
    let opened = match result {
        Ok(Taken::Locked(o, _) | Taken::Held(o)) => o,
        Ok(Taken::Conflict {
            busy: Busy::Unread(o),
            ..
        }) => &**o,
        _ => return,
    };
    state.mounts.note(&opened.lock_path, opened.key.dev, proven);
}

/// Queue a `Work::Describe` for a file an inline Take found busy, on a worker of its own pool
/// (so a hung place where records live only stalls refusals).
fn describe(
    state: &mut State,
    id: OpId,
    op: &mut AcquireOp,
    spec: LeaseSpec,
    opened: Opened,
    mount: &std::path::Path,
    tries: usize,
) {
    let pool = PathBuf::from(format!("{} (holder records)", mount.display()));
    let work = Work::Describe {
        spec: spec.clone(),
        opened: Box::new(opened),
    };
    let job = state.submit_to(&pool, DESCRIBE_THREADS, false, work, JobFor::Take(id));
    op.inflight.insert(job, (spec, pool, tries));
}

/// Most threads reading holder records for refusals of one mount.
const DESCRIBE_THREADS: usize = 8;

/// A job whose request is gone (timed out, client left): drop whatever it took.
pub fn orphan(state: &mut State, job: JobId, result: Result<Taken, Failure>) {
    note(state, &result, None);
    let (opened, published) = match result {
        Ok(Taken::Locked(opened, published)) => (opened, published.and_then(Result::ok)),
        Ok(Taken::Held(opened)) => (opened, None),
        Ok(Taken::Conflict {
            busy: Busy::Unread(opened),
            ..
        }) => (*opened, None),
        _ => return,
    };
    let mount = state.mounts.of(&opened.lock_path);
    info!(
        "storage answered late (job {job}): dropping the lock on {:?} that nobody waits for any \
         more",
        opened.lock_path
    );
    close(state, &mount, opened, published);
}

/// Close an opened file on its mount's threads (closing can block on dead storage too); with
/// a record published for it, withdraw that and unlock first.
fn close(
    state: &mut State,
    mount: &std::path::Path,
    opened: Opened,
    published: Option<holder::Published>,
) {
    let work = match published {
        Some(p) => Work::Dispose(Box::new(Disposing {
            key: opened.key,
            fd: Arc::new(opened.fd),
            dir: opened.dir,
            mode: LeaseMode::Exclusive,
            delete: false,
            slot: Some(Arc::new(Mutex::new(p))),
            held: None,
            label: format!("unused lock on {:?}", opened.lock_path),
        })),
        None => {
            let mut fds = vec![opened.fd];
            if let Some(d) = opened.dir {
                fds.push(d.fd);
            }
            Work::Close(fds)
        }
    };
    state.submit(mount, work, JobFor::Other);
}

/// The answer of `op` also waits for these jobs.
fn track(state: &mut State, op: &mut AcquireOp, pending: Vec<Pending>) {
    if pending.is_empty() {
        return;
    }
    let group = match op.group {
        Some(g) => g,
        None => {
            let g = state.new_group(op.conn);
            op.group = Some(g);
            g
        }
    };
    state.track(group, pending);
}

/// Request `id`, whose storage did not answer in time (route.rs), gets a Timeout answer; what it
/// took is rolled back and what is still running is cleaned up when it comes back.
pub fn expired(state: &mut State, id: OpId, mut op: Box<AcquireOp>, now: Instant) {
    let waiting = op.inflight.len();
    let mut stuck: Vec<(LeaseSpec, PathBuf)> = Vec::new();
    for (job, (spec, mount, _)) in op.inflight.drain() {
        state.ledger.reassign(job, JobFor::Orphan);
        stuck.push((spec, mount));
    }
    stuck.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    let Some((spec, mount)) = stuck.first() else {
        // Nothing outstanding: the deadline passed between two steps; finish normally.
        advance(state, id, op);
        return;
    };
    let ms = now.saturating_duration_since(op.started).as_millis();
    let message = format!(
        "storage holding {} {} (mount {}) is not answering: no reply within {ms} ms ({waiting} \
         file(s) of this request still waiting); nothing was locked for VM '{}'; check the \
         storage (NFS server, network) behind {} and retry; lockwardend keeps serving other \
         storage",
        what(spec.kind),
        esc(&spec.name),
        esc(&mount.to_string_lossy()),
        esc(&op.owner.name),
        esc(&mount.to_string_lossy()),
    );
    error!(
        "acquire for VM {:?} (pid {}) timed out: {} {:?} on mount {:?} is not answering after \
         {ms} ms",
        op.owner.name,
        op.owner.pid,
        what(spec.kind),
        spec.name,
        mount
    );
    let failure = DaemonError::on(ErrorKind::Timeout, spec, message);
    super::metrics::stalled(&mut state.metrics, stuck.iter().map(|(_, m)| m.as_path()));
    fail(state, op, *failure);
}

/// A live re-exec cannot wait any longer (route.rs): fail the request (rolled back, answered).
pub fn interrupted(state: &mut State, mut op: Box<AcquireOp>) {
    for (job, _) in op.inflight.drain() {
        state.ledger.reassign(job, JobFor::Orphan);
    }
    let f = Box::new(DaemonError::timeout(format!(
        "lockwardend is re-executing (live upgrade) while storage for VM '{}' had not \
             answered; nothing was locked; retry",
        esc(&op.owner.name)
    )));
    fail(state, op, *f);
}

/// The client of the request went away (route.rs): roll it back without an answer.
pub fn cancelled(state: &mut State, mut op: Box<AcquireOp>) {
    for (job, _) in op.inflight.drain() {
        state.ledger.reassign(job, JobFor::Orphan);
    }
    info!(
        "client of the acquire for VM {:?} (pid {}) went away before storage answered; \
         rolling it back",
        op.owner.name, op.owner.pid
    );
    let pid = op.owner.pid;
    rollback(state, pid, std::mem::take(&mut op.undo));
    state.owners.prune(pid);
}

fn fail(state: &mut State, mut op: Box<AcquireOp>, e: DaemonError) {
    refused_log(&op.owner, op.disks.iter().map(String::as_str), &e);
    super::metrics::refused(&mut state.metrics, e.kind(), Some(op.started.elapsed()));
    let pid = op.owner.pid;
    let jobs = rollback(state, pid, std::mem::take(&mut op.undo));
    state.owners.prune(pid);
    // The refusal waits for the roll-back (all or nothing: "refused" means nothing is locked),
    // but never beyond the request's deadline.
    track(state, &mut op, jobs);
    match op.group {
        Some(g) => state.settle(g, Then::Respond(e.into_response()), op.deadline),
        None => state.ledger.answer(Finished {
            conn: op.conn,
            response: e.into_response(),
            restrict: false,
        }),
    }
}

fn succeed(state: &mut State, mut op: Box<AcquireOp>) {
    // Only once the new leases are in the keeper's socket may the client hear they are taken: a crash
    // before this point drops them with our descriptors, and nobody was told they were held.
    let keys: Vec<LeaseKey> = op
        .undo
        .iter()
        .map(|u| match u {
            Undo::Joined(k) | Undo::Created { key: k, .. } => *k,
        })
        .collect();
    let owner = op.owner.clone();
    if let Err(e) = state.protect(&keys) {
        error!(
            "cannot hand the leases of VM {:?} (pid {}) to the keeper: {e}",
            owner.name, owner.pid
        );
        let f = Box::new(DaemonError::internal(format!(
            "lockwardend cannot protect the leases of VM '{}' against its own crash ({}); \
                 nothing was locked; check lockwardend's log (descriptor limit? /run full?) and \
                 retry",
            esc(&owner.name),
            esc(&e)
        )));
        op.failure = None;
        fail(state, op, *f);
        return;
    }
    let (new, joined) = op.undo.iter().fold((0, 0), |(n, j), u| match u {
        Undo::Created { .. } => (n + 1, j),
        Undo::Joined(_) => (n, j + 1),
    });
    let took = op.started.elapsed();
    super::metrics::acquired(&mut state.metrics, took);
    super::logging::event(
        log::Level::Info,
        super::logging::Event::Acquired,
        &fields(&owner, op.disks.iter().map(String::as_str)),
        format_args!(
            "VM {:?} (pid {}) acquired {} lease(s) ({new} new, {joined} joined shared, {} \
             already held) in {} us",
            owner.name,
            owner.pid,
            op.requested,
            op.requested.saturating_sub(new + joined),
            took.as_micros()
        ),
    );
    match op.group {
        Some(g) => state.settle(
            g,
            Then::Acquired {
                pid: owner.pid,
                restrict: op.restrict,
            },
            op.deadline,
        ),
        None => state.ledger.answer(Finished {
            conn: op.conn,
            response: Response::Ok {
                // Acquire/Release answers carry no lease list (docs/protocol.md).
                leases: Vec::new(),
            },
            restrict: op.restrict,
        }),
    }
}

/// A request for a pid that does not exist (or cannot be watched) cannot be honoured: nothing
/// would ever release what it takes. Shared by Acquire and Register.
pub(super) fn owner_unwatchable(owner: &Owner, e: Errno) -> DaemonError {
    let (kind, message) = match e {
        Errno::ESRCH => (
            ErrorKind::Invalid,
            format!(
                "VM '{}' (pid {}) is not running, so it cannot hold leases; start it first",
                esc(&owner.name),
                owner.pid
            ),
        ),
        e => (
            ErrorKind::Internal,
            format!(
                "cannot watch the process of VM '{}' (pid {}): {}",
                esc(&owner.name),
                owner.pid,
                e.desc()
            ),
        ),
    };
    DaemonError::of(kind, message)
}

fn rollback(state: &mut State, pid: u32, undo: Vec<Undo>) -> Vec<Pending> {
    let leases: Vec<(LeaseKey, bool)> = undo
        .into_iter()
        .rev()
        .map(|step| match step {
            Undo::Joined(key) => (key, false),
            Undo::Created { key, created_file } => (key, created_file),
        })
        .collect();
    release::leave_many(state, pid, &leases, "rolled back").jobs
}

/// Put a freshly locked file into the tables for `op`'s owner.
fn commit(
    state: &mut State,
    op: &mut AcquireOp,
    spec: &LeaseSpec,
    opened: Opened,
    published: Option<holder::Published>,
    mount: &std::path::Path,
) -> Result<(), Failure> {
    let owner = op.owner.clone();
    let key = opened.key;
    if state.owners.get(owner.pid).is_none() {
        close(state, mount, opened, published);
        return Err(exited(&owner, spec));
    }
    if state.leases.get(&key).is_some() {
        // Taken shared by another request meanwhile: our second description goes.
        close(state, mount, opened, published);
        return join(state, op, spec, key);
    }
    let now = op.since;
    let Opened {
        fd,
        lock_path,
        dir,
        created,
        ..
    } = opened;
    let delete_when_free = spec.kind == ResourceKind::Disk && dir.is_some();
    let (name, lock_path) = Lease::paths(&spec.name, &lock_path);
    state.leases.insert(
        key,
        Lease {
            name,
            kind: spec.kind,
            mode: spec.mode,
            lock_path,
            fd: Arc::new(fd),
            dir: dir.map(Box::new),
            delete_when_free,
            owners: LeaseOwners::one(owner.pid, now),
            since: now,
            lost: false,
        },
    );
    if let Some(e) = state.owners.get_mut(owner.pid) {
        e.leases.insert(key);
    }
    if spec.mode == LeaseMode::Exclusive {
        // Written (or failed, logged) by the job that locked it.
        state.adopt_record(key, published.unwrap_or_else(holder::Published::nowhere));
    } else {
        let job = state.publish_holder(key);
        track(state, op, job.into_iter().collect());
    }
    op.undo.push(Undo::Created {
        key,
        created_file: created,
    });
    debug!(
        "{} {:?} locked ({}) for VM {:?} (pid {})",
        what(spec.kind),
        spec.name,
        mode_word(spec.mode),
        owner.name,
        owner.pid
    );
    Ok(())
}

/// The inode is already a lease of this daemon: same owner again, another shared owner, or busy.
fn join(
    state: &mut State,
    op: &mut AcquireOp,
    spec: &LeaseSpec,
    key: LeaseKey,
) -> Result<(), Failure> {
    let owner = &op.owner;
    let pid = owner.pid;
    if state.owners.get(pid).is_none() {
        // Its exit was handled while this request waited on storage: joining now would leave
        // its pid among the lease's owners with nobody left to remove it (the lock would stay
        // held after every other owner left).
        return Err(exited(owner, spec));
    }
    let Some(lease) = state.leases.get_mut(&key) else {
        return Err(DaemonError::on(
            ErrorKind::Internal,
            spec,
            "lease table changed unexpectedly".into(),
        ));
    };
    if lease.owners.contains_key(&pid) {
        if lease.mode == LeaseMode::Exclusive || spec.mode == LeaseMode::Shared {
            debug!(
                "{} {:?} already held ({}) by VM {:?} (pid {pid})",
                what(spec.kind),
                spec.name,
                mode_word(lease.mode),
                owner.name
            );
            return Ok(());
        }
        // Held shared, wanted exclusive.
        if let Some((&other, &since)) = lease.owners.iter().find(|(p, _)| **p != pid) {
            return Err(busy_owner(state, spec, key, other, since));
        }
        let m = format!(
            "{} is already attached to VM '{}' in shared mode; it cannot also be attached \
             writable — detach it first",
            subject(spec.kind, &spec.name, &lease.lock_path),
            esc(&owner.name)
        );
        return Err(DaemonError::on(ErrorKind::Invalid, spec, m));
    }
    if lease.mode == LeaseMode::Shared && spec.mode == LeaseMode::Shared {
        lease.owners.insert(pid, now_secs());
        let others = lease.owners.len() - 1;
        if let Some(e) = state.owners.get_mut(pid) {
            e.leases.insert(key);
        }
        debug!(
            "{} {:?} locked (shared) for VM {:?} (pid {pid}), shared with {others} other VM(s)",
            what(spec.kind),
            spec.name,
            owner.name
        );
        op.undo.push(Undo::Joined(key));
        let job = state.publish_holder(key);
        track(state, op, job.into_iter().collect());
        return Ok(());
    }
    let Some((&other, &since)) = lease.owners.iter().next() else {
        return Err(DaemonError::on(
            ErrorKind::Internal,
            spec,
            "a lease without owners".into(),
        ));
    };
    Err(busy_owner(state, spec, key, other, since))
}

/// The owner's process exited (its exit was handled) while its request waited on storage.
fn exited(owner: &Owner, spec: &LeaseSpec) -> Failure {
    DaemonError::on(
        ErrorKind::Invalid,
        spec,
        format!(
            "VM '{}' (pid {}) exited while its disks were being locked",
            esc(&owner.name),
            owner.pid
        ),
    )
}

/// Busy because another owner of this daemon holds the lease: say who, where and since when.
fn busy_owner(
    state: &State,
    spec: &LeaseSpec,
    key: LeaseKey,
    holder_pid: u32,
    since: u64,
) -> Failure {
    let mode = state
        .leases
        .get(&key)
        .map_or(LeaseMode::Exclusive, |l| l.mode);
    let (vm, uuid) = state
        .owners
        .get(holder_pid)
        .map(|e| (e.owner.name.clone(), e.owner.uuid.clone()))
        .unwrap_or_default();
    let m = format!(
        "{} {} is in use by VM '{}' (uuid {}) on host {} since {} ({}); shut that VM down or \
         detach the {} from it first",
        what(spec.kind),
        esc(&spec.name),
        esc(&vm),
        esc(&uuid),
        esc(&state.hostname),
        utc(since),
        mode_word(mode),
        what(spec.kind)
    );
    let holder = Holder {
        vm_name: Some(vm),
        vm_uuid: Some(uuid),
        host: Some(state.hostname.clone()),
        pid: i32::try_from(holder_pid).ok(),
        since: Some(since),
        mode: Some(mode),
    };
    Box::new(DaemonError::busy(m, Some(holder)).about(&spec.name))
}
