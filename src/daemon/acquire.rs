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
use super::holder;
use super::lease::{Lease, LeaseKey};
use super::lock;
use super::lockfile::{self, OpenError, Opened};
use super::release;
use super::state::State;
use super::text::{esc, mode_word, now_secs, subject, utc, what};
use crate::protocol::{
    ErrorKind, ErrorReply, FailureAction, Holder, LeaseMode, LeaseSpec, Owner, ResourceKind,
};
use log::{debug, error, info};
use nix::errno::Errno;
use std::collections::BTreeMap;
use std::os::fd::AsFd;

/// How often one disk's job is started again because the table changed under it.
const RESUBMITS: usize = 8;

/// How to take back one step of a request.
#[derive(Debug)]
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

@@ACQ@@
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

@@COMMIT@@
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
        state.publish_holder(key);
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

/// Busy because the kernel refused: another process or host holds byte 0. Name the holder from
/// the holder records on the shared storage, or say what the kernel knows (a local pid).
pub(super) fn kernel_busy(spec: &LeaseSpec, opened: &Opened) -> Failure {
    let target = holder::Target {
        fd: opened.fd.as_fd(),
        kind: spec.kind,
        lock_path: &opened.lock_path,
        lockspace: opened.dir.is_some(),
    };
    let r = holder::read_for_refusal(target, &spec.name);
    reply(ErrorKind::Busy, spec, r.message, Some(r.holder))
}
