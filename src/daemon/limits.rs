//! The daemon's bounded resources (issue 9, docs/hardening.md).
//!
//! Why bounds: lockwardend runs as root next to every VM, and any process of its uid can
//! connect. Whatever a peer controls — how many connections, how many bytes before a frame is
//! complete, how many disks in one request, how many owners it names — is capped, and each cap
//! that is reached gets an error naming the limit and the lockwardend.conf key that raises it.
//!
//! Fairness lives here too: per poll round a connection gets at most [`FRAMES_PER_ROUND`] frames
//! answered and [`READ_PER_ROUND`] bytes read, and a listener at most [`ACCEPTS_PER_ROUND`] new
//! connections ([`ACCEPTS_PER_ROUND_BUSY`] while requests are waiting to be read), so neither a
//! client pipelining requests nor a storm of connects can starve anybody else.
//!
//! The values come from lockwardend.conf once at start-up ([`install`]); they are process-wide
//! because every connection and every request reads them and nothing changes them later (a
//! live re-exec starts a new process that reads the configuration again).

use super::error::DaemonError;
use super::owner::Owners;
use crate::protocol::{Owner, Request};
use log::{info, warn};
use std::sync::OnceLock;
use std::time::Duration;

/// Frames answered per connection per poll round; the rest wait for the next round (which then
/// polls with a zero timeout).
pub const FRAMES_PER_ROUND: usize = 16;
/// Bytes read per connection per poll round.
pub const READ_PER_ROUND: usize = 64 * 1024;
/// Connections accepted per listener per poll round.
pub const ACCEPTS_PER_ROUND: usize = 64;
/// The same while connections have requests waiting to be read or answered.
pub const ACCEPTS_PER_ROUND_BUSY: usize = 8;

/// `max_owners` default.
pub const DEFAULT_MAX_OWNERS: usize = 4096;
/// `max_leases_per_request` default (libvirt sends one lease per disk of a domain).
pub const DEFAULT_MAX_LEASES_PER_REQUEST: usize = 1024;
/// `request_read_timeout_ms` default.
pub const DEFAULT_REQUEST_READ_TIMEOUT_MS: u64 = 10_000;
/// `idle_timeout_ms` default (0 disables).
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 300_000;

/// For the descriptor estimate: disks a VM is assumed to hold on average.
pub const FD_ESTIMATE_LEASES_PER_OWNER: u64 = 4;
/// For the descriptor estimate: a lease can take two descriptors (the lock file and, in a
/// lockspace, its directory).
pub const FD_ESTIMATE_PER_LEASE: u64 = 2;
/// For the descriptor estimate: listeners, signalfd, storage notification, keeper socket, pid
/// file, logs, /proc reads, worker pools.
pub const FD_ESTIMATE_RESERVE: u64 = 64;

/// The configured limits (lockwardend.conf).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_owners: usize,
    pub max_leases_per_request: usize,
    /// A frame must be complete this long after its first byte arrived.
    pub request_read_timeout: Duration,
    /// A connection that is not a lifetime handle and has nothing in flight is closed after
    /// this long without traffic (None: never).
    pub idle_timeout: Option<Duration>,
    /// The configuration file, for messages saying where to raise a limit.
    pub config_file: String,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_owners: DEFAULT_MAX_OWNERS,
            max_leases_per_request: DEFAULT_MAX_LEASES_PER_REQUEST,
            request_read_timeout: Duration::from_millis(DEFAULT_REQUEST_READ_TIMEOUT_MS),
            idle_timeout: Some(Duration::from_millis(DEFAULT_IDLE_TIMEOUT_MS)),
            config_file: "lockwardend.conf".to_string(),
        }
    }
}

static LIMITS: OnceLock<Limits> = OnceLock::new();

/// Set the limits for this process (once, at start-up; later calls are ignored).
pub fn install(limits: Limits) {
    if LIMITS.set(limits).is_err() {
        warn!("the limits were already set; keeping the first ones");
    }
}

/// The limits in force (the defaults until [`install`]).
pub fn get() -> &'static Limits {
    LIMITS.get_or_init(Limits::default)
}

fn invalid(message: String) -> Box<DaemonError> {
    Box::new(DaemonError::invalid(message))
}

/// Check a lock request against the limits and the owner table before anything is done for it:
/// how many leases it names, whether the owner it names is the owner registered for that pid,
/// and whether a new owner still fits.
pub fn admit(owners: &Owners, req: &Request, limits: &Limits) -> Result<(), Box<DaemonError>> {
    let (owner, leases, creates, op): (&Owner, usize, bool, &str) = match req {
        Request::Acquire { owner, leases, .. } => (owner, leases.len(), true, "acquire"),
        Request::Release { owner, leases } => (owner, leases.len(), false, "release"),
        Request::Register { owner, .. } => (owner, 0, true, "register"),
        Request::Inquire { owner } => (owner, 0, false, "inquire"),
        Request::Status
        | Request::List
        | Request::Lost
        | Request::Thaw { .. }
        | Request::Metrics => return Ok(()),
    };
    if leases > limits.max_leases_per_request {
        return Err(invalid(format!(
            "the {op} request for VM '{}' (pid {}) names {leases} leases, more than the \
             limit of {} per request; raise max_leases_per_request in {} or give the VM fewer \
             disks",
            crate::text::esc(&owner.name),
            owner.pid,
            limits.max_leases_per_request,
            limits.config_file
        )));
    }
    owners.check_identity(owner).map_err(invalid)?;
    if creates {
        owners
            .check_room(owner, limits.max_owners, &limits.config_file)
            .map_err(|m| Box::new(DaemonError::internal(m)))?;
    }
    Ok(())
}

/// Descriptors the configured maximums may need (docs/hardening.md):
/// `max_clients + max_owners × (1 + 4 × 2) + 64` — one per connection; per owner one pidfd and
/// an assumed 4 leases of up to 2 descriptors each (lock file, lockspace directory); 64 for the
/// daemon's own (listeners, signalfd, storage workers, keeper socket, pid file, logs).
pub fn fds_needed(max_clients: usize, max_owners: usize) -> u64 {
    let per_owner = 1 + FD_ESTIMATE_LEASES_PER_OWNER * FD_ESTIMATE_PER_LEASE;
    (max_clients as u64)
        .saturating_add((max_owners as u64).saturating_mul(per_owner))
        .saturating_add(FD_ESTIMATE_RESERVE)
}

/// Raise the soft RLIMIT_NOFILE to the hard limit, then warn when it is still below what the
/// configured maximums may need. Returns (soft limit now, estimate).
pub fn check_fd_limit(max_clients: usize, max_owners: usize) -> Option<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let need = fds_needed(max_clients, max_owners);
    let (mut soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            warn!(
                "cannot read the open-file limit (RLIMIT_NOFILE): {}",
                e.desc()
            );
            return None;
        }
    };
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => soft = hard,
            Err(e) => warn!("cannot raise the open-file limit to {hard}: {}", e.desc()),
        }
    }
    if soft < need {
        warn!(
            "the open-file limit (RLIMIT_NOFILE) is {soft}, below the {need} descriptors that \
             max_clients = {max_clients} and max_owners = {max_owners} may need (one per \
             connection, per VM at most one pidfd, and up to {} per disk lease); raise LimitNOFILE= in \
             the service unit (or ulimit -n), or lower max_clients / max_owners in {}",
            FD_ESTIMATE_PER_LEASE,
            get().config_file
        );
    } else {
        info!("open-file limit {soft} (the configured maximums may need about {need})");
    }
    Some((soft, need))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{
        ErrorKind, FailureAction, LeaseMode, LeaseSpec, LockTarget, ResourceKind,
    };

    fn owner(pid: u32, uuid: &str) -> Owner {
        Owner {
            uuid: uuid.into(),
            name: "vm".into(),
            id: 1,
            pid,
        }
    }

    fn spec(i: usize) -> LeaseSpec {
        LeaseSpec {
            name: format!("/d{i}"),
            kind: ResourceKind::Disk,
            mode: LeaseMode::Exclusive,
            target: LockTarget::File {
                path: format!("/d{i}"),
            },
        }
    }

    #[test]
    fn too_many_leases_names_the_key() {
        let limits = Limits {
            max_leases_per_request: 2,
            ..Limits::default()
        };
        let o = owner(std::process::id(), "u");
        let req = |n: usize| Request::Acquire {
            owner: o.clone(),
            leases: (0..n).map(spec).collect(),
            action: FailureAction::Default,
            restrict: false,
        };
        let owners = Owners::default();
        assert!(admit(&owners, &req(2), &limits).is_ok());
        let e = admit(&owners, &req(3), &limits).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert!(
            e.message().contains("max_leases_per_request"),
            "{}",
            e.message()
        );
        assert!(e.message().contains("3 leases"), "{}", e.message());
        let rel = Request::Release {
            owner: o,
            leases: (0..3).map(spec).collect(),
        };
        assert!(admit(&owners, &rel, &limits).is_err());
    }

    #[test]
    fn uuid_mismatch_and_full_table() {
        let limits = Limits {
            max_owners: 1,
            ..Limits::default()
        };
        let me = std::process::id();
        let mut owners = Owners::default();
        owners.ensure(&owner(me, "uuid-a")).unwrap();
        let reg = |o: Owner| Request::Register {
            owner: o,
            restrict: false,
        };
        // Same uuid, new name: fine (domains can be renamed).
        let mut renamed = owner(me, "uuid-a");
        renamed.name = "renamed".into();
        assert!(admit(&owners, &reg(renamed), &limits).is_ok());
        let e = admit(&owners, &reg(owner(me, "uuid-b")), &limits).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert!(e.message().contains("uuid-a") && e.message().contains("uuid-b"));
        let inq = Request::Inquire {
            owner: owner(me, "uuid-b"),
        };
        assert!(admit(&owners, &inq, &limits).is_err());
        // A second owner does not fit; naming the first one still works.
        let e = admit(&owners, &reg(owner(me + 1_000_000, "c")), &limits).unwrap_err();
        assert!(e.message().contains("max_owners"), "{}", e.message());
        assert!(admit(&owners, &reg(owner(me, "uuid-a")), &limits).is_ok());
    }

    #[test]
    fn fd_estimate() {
        assert_eq!(fds_needed(10, 2), 10 + 2 * 9 + 64);
        assert_eq!(fds_needed(usize::MAX, usize::MAX), u64::MAX);
    }
}
