//! Taking leases: all or nothing, idempotent, de-duplicated by inode (design §2-§3).
//!
//! Why an undo log: a VM with sixteen disks whose ninth is busy must not keep the first eight
//! locked (another host would then find them busy for no reason). Every step that changes the
//! tables records how to take it back, and a failure replays the log backwards, leaving leases
//! the owner held before the request untouched.
//!
//! Exclusive leases are taken before shared ones, so a request naming one image twice (once
//! writable, once read-only) locks it exclusively and the shared entry then finds it held.

use super::Failure;
use super::lease::{Lease, LeaseKey};
use super::lock;
use super::lockfile::{self, OpenError, Opened};
use super::pidfd::comm;
use super::release;
use super::state::State;
use super::text::{esc, mode_word, now_secs, subject, utc, what};
use crate::protocol::{
    ErrorKind, ErrorReply, FailureAction, Holder, LeaseMode, LeaseSpec, Owner, ResourceKind,
};
use log::{debug, error, info};
use nix::errno::Errno;
use nix::sys::statfs::{NFS_SUPER_MAGIC, fstatfs};
use std::collections::BTreeMap;
use std::os::fd::AsFd;

/// How often a lock file replaced under us (virtlockd deleting it) is reopened.
const VERIFY_RETRIES: usize = 8;

/// How to take back one step of a request.
enum Undo {
    /// The owner joined an existing shared lease.
    Joined(LeaseKey),
    /// A new lease was created; `created_file`: this request created its lock file.
    Created { key: LeaseKey, created_file: bool },
}

fn reply(kind: ErrorKind, spec: &LeaseSpec, message: String, holder: Option<Holder>) -> Failure {
    Box::new(ErrorReply {
        kind,
        message,
        resource: Some(spec.name.clone()),
        holder,
    })
}

/// Take every lease in `specs` for `owner`, or none of the new ones.
pub fn acquire(
    state: &mut State,
    owner: &Owner,
    specs: &[LeaseSpec],
    action: FailureAction,
) -> Result<(), Failure> {
    for spec in specs {
        lockfile::validate(spec).map_err(|m| reply(ErrorKind::Invalid, spec, m, None))?;
    }
    if state.terminating(owner.pid) {
        return Err(Box::new(ErrorReply {
            kind: ErrorKind::Invalid,
            message: format!(
                "VM '{}' (pid {}) is being terminated because its lifetime handle closed while \
                 it held leases; it cannot take new ones",
                esc(&owner.name),
                owner.pid
            ),
            resource: None,
            holder: None,
        }));
    }
    let entry = state
        .owners
        .ensure(owner)
        .map_err(|e| not_running(owner, e))?;
    entry.action = action;
    let mut undo = Vec::new();
    let exclusive = specs.iter().filter(|s| s.mode == LeaseMode::Exclusive);
    let shared = specs.iter().filter(|s| s.mode == LeaseMode::Shared);
    for spec in exclusive.chain(shared) {
        if let Err(e) = take(state, owner, spec, &mut undo) {
            info!(
                "refused {} {:?} ({}) for VM {:?} (pid {}): {}",
                what(spec.kind),
                spec.name,
                mode_word(spec.mode),
                owner.name,
                owner.pid,
                e.message
            );
            rollback(state, owner.pid, undo);
            state.owners.prune(owner.pid);
            return Err(e);
        }
    }
    // Only once the keeper holds the new leases may the client hear they are taken: a crash
    // before this point drops them with our descriptors, and nobody was told they were held.
    let keys: Vec<LeaseKey> = undo
        .iter()
        .map(|u| match u {
            Undo::Joined(k) | Undo::Created { key: k, .. } => *k,
        })
        .collect();
    if let Err(e) = state.protect(&keys) {
        error!(
            "cannot hand the leases of VM {:?} (pid {}) to the keeper: {e}",
            owner.name, owner.pid
        );
        rollback(state, owner.pid, undo);
        state.owners.prune(owner.pid);
        return Err(Box::new(ErrorReply {
            kind: ErrorKind::Internal,
            message: format!(
                "lockwardend cannot protect the leases of VM '{}' against its own crash ({});                  nothing was locked; check lockwardend's log (descriptor limit? /run full?) and                  retry",
                esc(&owner.name),
                esc(&e)
            ),
            resource: None,
            holder: None,
        }));
    }
    Ok(())
}

/// An Acquire for a pid that does not exist cannot be honoured: nothing would ever release it.
fn not_running(owner: &Owner, e: Errno) -> Failure {
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
    Box::new(ErrorReply {
        kind,
        message,
        resource: None,
        holder: None,
    })
}

fn rollback(state: &mut State, pid: u32, undo: Vec<Undo>) {
    for step in undo.into_iter().rev() {
        match step {
            Undo::Joined(key) => release::leave(state, key, pid, false, "rolled back"),
            Undo::Created { key, created_file } => {
                release::leave(state, key, pid, created_file, "rolled back")
            }
        }
    }
}

/// Take one lease.
fn take(
    state: &mut State,
    owner: &Owner,
    spec: &LeaseSpec,
    undo: &mut Vec<Undo>,
) -> Result<(), Failure> {
    for _ in 0..VERIFY_RETRIES {
        let opened = lockfile::open_target(spec).map_err(|e| match e {
            OpenError::Invalid(m) => reply(ErrorKind::Invalid, spec, m, None),
            OpenError::Io(m) => reply(ErrorKind::Io, spec, m, None),
        })?;
        let key = opened.key;
        if state.leases.get(&key).is_some() {
            // Closing our extra descriptor leaves the existing lease's OFD lock alone.
            drop(opened);
            return join(state, owner, spec, key, undo);
        }
        if let Err(e) = lock::try_lock(opened.fd.as_fd(), spec.mode) {
            return Err(if lock::is_conflict(e) {
                kernel_busy(spec, &opened)
            } else {
                let m = format!(
                    "{}: cannot lock it: {}; check that the file system supports POSIX locks \
                     (NFS needs its lock manager, not the 'nolock' mount option)",
                    subject(spec.kind, &spec.name, &opened.lock_path),
                    e.desc()
                );
                reply(ErrorKind::Io, spec, m, None)
            });
        }
        if let Some(dir) = &opened.dir {
            if !lockfile::still_named(dir, key) {
                debug!(
                    "lock file {:?} was replaced or deleted while we locked it; retrying",
                    opened.lock_path
                );
                continue;
            }
        }
        let now = now_secs();
        let Opened {
            fd,
            lock_path,
            dir,
            created,
            ..
        } = opened;
        let delete_when_free = spec.kind == ResourceKind::Disk && dir.is_some();
        state.leases.insert(
            key,
            Lease {
                name: spec.name.clone(),
                kind: spec.kind,
                mode: spec.mode,
                lock_path,
                fd,
                dir,
                delete_when_free,
                owners: BTreeMap::from([(owner.pid, now)]),
                since: now,
            },
        );
        if let Some(e) = state.owners.get_mut(owner.pid) {
            e.leases.insert(key);
        }
        undo.push(Undo::Created {
            key,
            created_file: created,
        });
        info!(
            "{} {:?} locked ({}) for VM {:?} (pid {})",
            what(spec.kind),
            spec.name,
            mode_word(spec.mode),
            owner.name,
            owner.pid
        );
        return Ok(());
    }
    Err(reply(
        ErrorKind::Io,
        spec,
        format!(
            "{}: the lock file was deleted or replaced {VERIFY_RETRIES} times while being locked; \
             another lock manager is racing on it, retry later",
            subject(spec.kind, &spec.name, &lockfile::target_path(&spec.target))
        ),
        None,
    ))
}

/// The inode is already a lease of this daemon: same owner again, another shared owner, or busy.
fn join(
    state: &mut State,
    owner: &Owner,
    spec: &LeaseSpec,
    key: LeaseKey,
    undo: &mut Vec<Undo>,
) -> Result<(), Failure> {
    let pid = owner.pid;
    let Some(lease) = state.leases.get_mut(&key) else {
        return Err(reply(
            ErrorKind::Internal,
            spec,
            "lease table changed unexpectedly".into(),
            None,
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
        return Err(reply(ErrorKind::Invalid, spec, m, None));
    }
    if lease.mode == LeaseMode::Shared && spec.mode == LeaseMode::Shared {
        lease.owners.insert(pid, now_secs());
        let others = lease.owners.len() - 1;
        if let Some(e) = state.owners.get_mut(pid) {
            e.leases.insert(key);
        }
        undo.push(Undo::Joined(key));
        info!(
            "{} {:?} locked (shared) for VM {:?} (pid {pid}), shared with {others} other VM(s)",
            what(spec.kind),
            spec.name,
            owner.name
        );
        return Ok(());
    }
    let Some((&other, &since)) = lease.owners.iter().next() else {
        return Err(reply(
            ErrorKind::Internal,
            spec,
            "a lease without owners".into(),
            None,
        ));
    };
    Err(busy_owner(state, spec, key, other, since))
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
    reply(
        ErrorKind::Busy,
        spec,
        m,
        Some(Holder {
            vm_name: Some(vm),
            vm_uuid: Some(uuid),
            host: Some(state.hostname.clone()),
            pid: i32::try_from(holder_pid).ok(),
            since: Some(since),
            mode: Some(mode),
        }),
    )
}

/// Busy because the kernel refused: another process or host holds byte 0.
fn kernel_busy(spec: &LeaseSpec, opened: &Opened) -> Failure {
    let who = subject(spec.kind, &spec.name, &opened.lock_path);
    let conflict = lock::conflict(opened.fd.as_fd(), spec.mode);
    let nfs = fstatfs(opened.fd.as_fd())
        .map(|s| s.filesystem_type() == NFS_SUPER_MAGIC)
        .unwrap_or(false);
    let pid = conflict.and_then(|c| c.pid);
    let m = match pid {
        Some(p) if nfs => format!(
            "{who} is locked by process {p} on this host or another NFS client (not by this \
             lockwardend); if a VM or lock manager there uses it, stop it there first"
        ),
        Some(p) => format!(
            "{who} is locked by local process {p} ({}), not by this lockwardend; stop that \
             process or make it release the {} first",
            esc(&comm(p).unwrap_or_else(|| "exited".into())),
            what(spec.kind)
        ),
        None => format!(
            "{who} is locked by another process or host (not this lockwardend); if a VM on \
             another host uses it, stop it there first"
        ),
    };
    reply(
        ErrorKind::Busy,
        spec,
        m,
        Some(Holder {
            vm_name: None,
            vm_uuid: None,
            host: None,
            pid,
            since: None,
            mode: conflict.map(|c| c.mode),
        }),
    )
}
