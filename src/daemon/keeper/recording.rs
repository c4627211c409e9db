//! Test seam (`cfg(test)` only): a keeper link that starts no process and opens no socket, and
//! records what the daemon told it, so the core's rules ("answered only after the keeper holds
//! the lease", "the keeper lets go before the lock is dropped") are unit-tested against it
//! (src/daemon/core_tests.rs).
//!
//! It behaves like a link to a real keeper as far as the daemon can see: a failed hold breaks
//! the link (the next `ensure` reconnects, with a fresh keeper that must be told everything
//! again), and a release while the link is down sends nothing.

use super::Hold;
use crate::daemon::lease::LeaseKey;
use std::collections::BTreeSet;
use std::os::fd::AsFd;

/// What the link was told, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Told {
    /// `ensure`; `fresh`: the link was down and was made again.
    Ensure { fresh: bool },
    /// A hand-over of these leases that was taken.
    Hold(Vec<Held>),
    /// A hand-over that failed (`fail_holds`); it broke the link.
    HoldFailed(Vec<LeaseKey>),
    /// The keeper was told to close its copies of these leases.
    Release(Vec<LeaseKey>),
    /// The keeper was told to forget everything (before everything is handed over again).
    Reset,
}

/// One lease of a hand-over, as the keeper received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub key: LeaseKey,
    /// The owner pids the keeper was told to watch.
    pub pids: Vec<u32>,
    /// How many descriptors came with it.
    pub fds: usize,
    /// The inode of its first descriptor (`fstat`): the keeper got the lease's own file.
    pub fd_key: Option<LeaseKey>,
}

/// The recording link's state.
#[derive(Debug)]
pub struct Recording {
    /// Everything the link was told, in order.
    pub told: Vec<Told>,
    /// The leases the keeper holds now, as far as it was told.
    pub held: BTreeSet<LeaseKey>,
    /// How many of the next holds fail.
    pub fail_holds: usize,
    /// The link is up (false after a failed hold, until the next `ensure`).
    pub up: bool,
}

impl Default for Recording {
    fn default() -> Recording {
        Recording {
            told: Vec::new(),
            held: BTreeSet::new(),
            fail_holds: 0,
            up: true,
        }
    }
}

impl Recording {
    pub(super) fn ensure(&mut self) -> Result<bool, String> {
        let fresh = !self.up;
        if fresh {
            // A new keeper holds nothing.
            self.held.clear();
            self.up = true;
        }
        self.told.push(Told::Ensure { fresh });
        Ok(fresh)
    }

    pub(super) fn hold(&mut self, holds: &[Hold<'_>]) -> Result<(), String> {
        if holds.is_empty() {
            return Ok(());
        }
        if !self.up {
            return Err("no keeper is connected (recording)".into());
        }
        let keys: Vec<LeaseKey> = holds.iter().map(|h| h.key).collect();
        if self.fail_holds > 0 {
            self.fail_holds -= 1;
            self.up = false;
            self.held.clear();
            self.told.push(Told::HoldFailed(keys));
            return Err("lost the keeper (recording): told to fail this hold".into());
        }
        self.held.extend(keys);
        self.told.push(Told::Hold(
            holds
                .iter()
                .map(|h| Held {
                    key: h.key,
                    pids: h.pids.iter().map(|w| w.pid).collect(),
                    fds: h.fds.len(),
                    fd_key: h.fds.first().and_then(|fd| {
                        nix::sys::stat::fstat(fd.as_fd()).ok().map(|st| LeaseKey {
                            dev: st.st_dev,
                            ino: st.st_ino,
                        })
                    }),
                })
                .collect(),
        ));
        Ok(())
    }

    pub(super) fn release(&mut self, keys: &[LeaseKey]) -> Result<(), String> {
        // As the real link: nothing to send while it is down, or for nothing.
        if !self.up || keys.is_empty() {
            return Ok(());
        }
        for k in keys {
            self.held.remove(k);
        }
        self.told.push(Told::Release(keys.to_vec()));
        Ok(())
    }

    pub(super) fn reset(&mut self) -> Result<(), String> {
        if !self.up {
            return Err("no keeper is connected (recording)".into());
        }
        self.held.clear();
        self.told.push(Told::Reset);
        Ok(())
    }
}
