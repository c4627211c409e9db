//! What the lost-lock probes found, per lease: the meaning of one probe's answer, and the
//! history (transient errors in a row, re-checks of a lost lease) that lost.rs acts on
//! (docs/storage.md, "Lost locks"). Plain data, held by the lease tables (state.rs); kept below
//! lost.rs, fence.rs and thaw.rs, which all judge a probe's answer the same way.

use super::lease::LeaseKey;
use nix::errno::Errno;
use std::collections::HashMap;

/// What a probe's answer means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The lock is ours (the re-lock succeeded).
    Held,
    /// Somebody else holds a conflicting lock.
    Conflict,
    /// The storage says our lock is gone (EIO, ENOLCK, ESTALE, EBADF).
    Lost,
    /// Nothing definite: try again next round.
    Transient,
}

/// Sort a probe's result (see the module documentation).
pub fn classify(result: Result<(), Errno>) -> Verdict {
    match result {
        Ok(()) => Verdict::Held,
        Err(Errno::EAGAIN | Errno::EACCES) => Verdict::Conflict,
        Err(Errno::EIO | Errno::ENOLCK | Errno::ESTALE | Errno::EBADF) => Verdict::Lost,
        Err(_) => Verdict::Transient,
    }
}

/// Per-lease probe history, for leases that had a failed probe.
#[derive(Debug, Default)]
pub struct Health {
    pub(super) map: HashMap<LeaseKey, Track>,
}

#[derive(Debug, Default)]
pub(super) struct Track {
    /// Transient errors in a row since the last good probe.
    pub(super) transient: u32,
    /// Re-checks of a lease already found lost.
    pub(super) rechecks: u32,
    /// The error of the last re-check, to report a change (e.g. EIO, then a conflict).
    pub(super) last: Option<Errno>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_conflicts_and_lost_state_are_definitive() {
        assert_eq!(classify(Ok(())), Verdict::Held);
        for e in [Errno::EAGAIN, Errno::EACCES] {
            assert_eq!(classify(Err(e)), Verdict::Conflict, "{e}");
        }
        for e in [Errno::EIO, Errno::ENOLCK, Errno::ESTALE, Errno::EBADF] {
            assert_eq!(classify(Err(e)), Verdict::Lost, "{e}");
        }
        for e in [
            Errno::ETIMEDOUT,
            Errno::EINTR,
            Errno::ENOMEM,
            Errno::ENOBUFS,
            Errno::ECONNRESET,
            Errno::EHOSTUNREACH,
        ] {
            assert_eq!(classify(Err(e)), Verdict::Transient, "{e}");
        }
    }
}
