//! Requests to responses: who may ask what, and which module answers.
//!
//! Rules (docs/interfaces.md §3, lockd's dispatch rules): a restricted connection may do nothing
//! more; the admin socket serves only Status, List, Lost, Thaw and Metrics; Register, or an
//! Acquire with restrict, from the owner's own pid makes the connection the owner's lifetime
//! handle; Acquire/Release/Inquire act for the owner named in the request (libvirtd acting for
//! QEMU), not for the peer.

use super::Failure;
use super::acquire;
use super::error::DaemonError;
use super::owner::ConnId;
use super::release;
use super::state::State;
use crate::protocol::{ErrorKind, Owner, Request, Response};
use crate::text::esc;
use log::{debug, info};

/// What the daemon knows about one connection, apart from its buffers.
#[derive(Debug)]
pub struct Session {
    pub id: ConnId,
    /// Accepted on the admin socket.
    pub admin: bool,
    /// SO_PEERCRED pid at accept time (its uid was checked then).
    pub peer_pid: i32,
    /// Every further request is refused.
    pub restricted: bool,
    /// This connection is the lifetime handle of the owner with this pid.
    pub handle_of: Option<u32>,
}

fn op_name(req: &Request) -> &'static str {
    match req {
        Request::Register { .. } => "register",
        Request::Acquire { .. } => "acquire",
        Request::Release { .. } => "release",
        Request::Inquire { .. } => "inquire",
        Request::Status => "status",
        Request::List => "list",
        Request::Lost => "lost",
        Request::Thaw { .. } => "thaw",
        Request::Metrics => "metrics",
    }
}

/// Answer one request; `None`: the answer comes later (it waits on storage, `state.finished`).
pub fn handle(
    state: &mut State,
    s: &mut Session,
    req: Request,
    clients: usize,
) -> Option<Response> {
    // Limits and owner identity (docs/hardening.md); restricted and admin connections are
    // refused below whatever they ask.
    if !s.restricted && !s.admin {
        if let Err(e) = super::limits::admit(&state.owners, &req, super::limits::get()) {
            debug!("client {}: {}", s.id, e.message());
            if matches!(req, Request::Acquire { .. }) {
                super::metrics::refused(&mut state.metrics, e.kind(), None);
            }
            return Some(e.into_response());
        }
    }
    match req {
        Request::Acquire {
            owner,
            leases,
            action,
            restrict,
        } if !s.restricted && !s.admin => {
            // libvirt's not-paused start: the forked child acquires the disks itself, with
            // RESTRICT and no Register before, and keeps the connection as QEMU's lifetime
            // handle. Bind it as Register would, before the acquire (lockd's client registers
            // first on every connection), so closing it ends the VM's hold on its disks.
            let started = check_owner(&owner).and_then(|()| {
                if restrict && is_own_peer(s, &owner) && s.handle_of.is_none() {
                    bind_handle(state, s, &owner)?;
                }
                acquire::start(state, s.id, &owner, &leases, action, restrict)
            });
            match started {
                Ok(()) => None,
                Err(e) => {
                    acquire::refused_event(&owner, &leases, &e);
                    super::metrics::refused(&mut state.metrics, e.kind(), None);
                    Some(e.into_response())
                }
            }
        }
        // Waits for the storage threads that drop the locks.
        Request::Release { owner, leases } if !s.restricted && !s.admin => {
            if let Err(e) = check_owner(&owner) {
                return Some(e.into_response());
            }
            match release::start(state, s.id, &owner, &leases) {
                Ok(answer) => answer,
                Err(e) => Some(e.into_response()),
            }
        }
        // Admin socket only; waits for the storage to re-verify the VM's locks (thaw.rs).
        Request::Thaw { vm } if !s.restricted && s.admin => {
            super::thaw::start(state, s.id, &vm).err().map(|r| *r)
        }
        req => Some(answer(state, s, req, clients)),
    }
}

fn answer(state: &mut State, s: &mut Session, req: Request, clients: usize) -> Response {
    if matches!(req, Request::Acquire { .. }) {
        // Refused below: on a restricted connection or the admin socket.
        super::metrics::refused(&mut state.metrics, ErrorKind::Denied, None);
    }
    if s.restricted {
        let vm = s
            .handle_of
            .and_then(|pid| state.owners.get(pid))
            .map(|e| format!(" (lifetime handle of VM '{}')", esc(&e.owner.name)))
            .unwrap_or_default();
        return DaemonError::denied(format!(
            "lock manager connection has been restricted{vm}: it accepts no further requests \
                 ('{}' refused); open a new connection",
            op_name(&req)
        ))
        .into_response();
    }
    match req {
        Request::Status => Response::Status(state.status(clients)),
        Request::Lost => Response::Ok {
            leases: state.health.recent().cloned().collect(),
        },
        Request::List => Response::Ok {
            leases: state.all_infos(),
        },
        Request::Thaw { .. } => DaemonError::denied(
            "'thaw' requests are accepted on the admin socket only (lockwarden thaw VM)"
                .to_string(),
        )
        .into_response(),
        // metrics (issue 18)
        Request::Metrics => Response::Metrics(Box::new(state.metrics_snapshot())),
        req if s.admin => DaemonError::denied(format!(
            "'{}' requests are not accepted on the admin socket; lock requests go to the \
                 main socket",
            op_name(&req)
        ))
        .into_response(),
        Request::Register { owner, restrict } => register(state, s, &owner, restrict),
        // Handled by `handle` (it waits on storage).
        Request::Acquire { .. } => Response::error(
            ErrorKind::Internal,
            "acquire reached the synchronous dispatcher; this is a bug in lockwardend",
        ),
        // Handled by `handle` (it waits on storage).
        Request::Release { .. } => Response::error(
            ErrorKind::Internal,
            "release reached the synchronous dispatcher; this is a bug in lockwardend",
        ),
        Request::Inquire { owner } => match check_owner(&owner) {
            Ok(()) => Response::Ok {
                leases: state.infos_of(owner.pid),
            },
            Err(e) => e.into_response(),
        },
    }
}

/// The owner description must be usable: every message names the VM and the pid is the key.
pub(super) fn check_owner(owner: &Owner) -> Result<(), Failure> {
    let problem = if owner.pid == 0 || i32::try_from(owner.pid).is_err() {
        format!("owner pid {} is not a valid process id", owner.pid)
    } else if owner.name.is_empty() {
        "the owner has an empty VM name".to_string()
    } else if owner.uuid.is_empty() {
        format!("VM '{}' has an empty uuid", esc(&owner.name))
    } else {
        return Ok(());
    };
    Err(Box::new(DaemonError::invalid(format!(
        "{problem}; this is a bug in the client"
    ))))
}

fn register(state: &mut State, s: &mut Session, owner: &Owner, restrict: bool) -> Response {
    if let Err(e) = check_owner(owner) {
        return e.into_response();
    }
    if is_own_peer(s, owner) && s.handle_of.is_none() {
        if let Err(e) = bind_handle(state, s, owner) {
            return e.into_response();
        }
    } else {
        match state.owners.ensure(owner) {
            Ok(_) => debug!(
                "VM {:?} (uuid {}, pid {}) registered by pid {}",
                owner.name, owner.uuid, owner.pid, s.peer_pid
            ),
            Err(e) => return super::acquire::owner_unwatchable(owner, e).into_response(),
        }
    }
    state.owners.prune(owner.pid);
    s.restricted |= restrict;
    Response::Ok { leases: Vec::new() }
}

/// Is the peer the owner itself (the forked child that becomes QEMU), rather than libvirtd
/// acting for it? Only such a connection can be the owner's lifetime handle: it is inherited
/// by the QEMU process and closes when that process exits.
fn is_own_peer(s: &Session, owner: &Owner) -> bool {
    u32::try_from(s.peer_pid).ok() == Some(owner.pid)
}

/// Make this connection the lifetime handle of `owner` (docs/interfaces.md §3): when it closes
/// while the process still runs, the process is terminated before its leases are released
/// (kill.rs).
fn bind_handle(state: &mut State, s: &mut Session, owner: &Owner) -> Result<(), Failure> {
    state
        .owners
        .ensure(owner)
        .map_err(|e| Box::new(super::acquire::owner_unwatchable(owner, e)))?;
    // While it is open its close is the exit signal: the owner's pidfd is parked (owner.rs).
    state.owners.add_handle(owner.pid, s.id);
    s.handle_of = Some(owner.pid);
    info!(
        "VM {:?} (uuid {}, pid {}) registered; connection {} is its lifetime handle",
        owner.name, owner.uuid, owner.pid, s.id
    );
    Ok(())
}
