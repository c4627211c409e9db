//! When the watchdog may be fed (docs/storage.md, "Watchdog"): the rule of watchdog.rs applied
//! to the lease tables at every keep-alive. For every lease whose mount has not confirmed a
//! heartbeat for `fence_after_ms`, or whose lock was found lost and not taken back, every VM
//! holding it (`on_lockfailure` other than `ignore`) must be seen stopped or gone; otherwise the
//! keep-alive is withheld and re-checked, and the watchdog's own timeout bounds the time a
//! fenced VM has to stop.
//!
//! Why apart from watchdog.rs: that module is the device (open, feed, hand over, magic close)
//! and is held by the lease tables (state.rs); this one reads those tables, so it sits above.

use super::liveness;
use super::state::State;
use super::watchdog::{Kind, LOG_AFTER, RECHECK, stopped};
use crate::protocol::FailureAction;
use log::{error, info};
use std::time::Instant;

/// Why a keep-alive must be withheld now, if it must.
pub fn unprotected(state: &State) -> Option<String> {
    let boot = super::beat::boot_now();
    for (k, l) in state.leases.iter() {
        let mount = liveness::mount_of(&state.mounts, k, &l.lock_path);
        let silent = mount
            .as_ref()
            .and_then(|m| liveness::silent_for(&state.heartbeat, m, boot));
        // Lost: found by a lost-lock probe (lost.rs) or by a fence's re-check, and not held
        // again since (lost.rs clears the mark when a re-check takes the lock back).
        let lost = l.lost
            || state
                .heartbeat
                .fenced
                .get(k)
                .is_some_and(|f| f.state == liveness::Stage::Lost);
        if silent.is_none() && !lost {
            continue;
        }
        for pid in l.owners.keys() {
            let Some(e) = state.owners.get(*pid) else {
                continue;
            };
            if e.action == FailureAction::Ignore {
                continue;
            }
            if let Err(c) = stopped(*pid) {
                let why = match (silent, &mount) {
                    (Some(age), Some(m)) => format!(
                        "the storage behind mount {m:?} has been silent for {} ms",
                        age.as_millis()
                    ),
                    _ => "its lock was lost and has not been taken back".into(),
                };
                return Some(format!(
                    "VM {:?} (pid {pid}) holds {:?} and must be stopped ({why}), but its process \
                     is still in state {c}",
                    e.owner.name, l.lock_path
                ));
            }
        }
    }
    None
}

/// The event loop's timer: feed the watchdog when due and allowed.
pub fn tick(state: &mut State, now: Instant) {
    let Some(wd) = state.watchdog.as_ref() else {
        return;
    };
    if wd.next > now {
        return;
    }
    let why = unprotected(state);
    let Some(wd) = state.watchdog.as_mut() else {
        return;
    };
    match why {
        None => {
            if let Some((since, _)) = wd.withheld.take() {
                if wd.logged {
                    info!(
                        "watchdog keep-alives resume after {} ms: every VM that had to be \
                         stopped is stopped or gone",
                        since.elapsed().as_millis()
                    );
                }
            }
            wd.logged = false;
            wd.feed();
            wd.next = now + wd.interval;
        }
        Some(why) => {
            let since = match &wd.withheld {
                Some((t, _)) => *t,
                None => now,
            };
            wd.withheld = Some((since, why.clone()));
            if !wd.logged && now.duration_since(since) >= LOG_AFTER {
                wd.logged = true;
                let timeout = match wd.kind {
                    Kind::Device { timeout: Some(t) } => format!("{} s", t.as_secs()),
                    _ => "its timeout".into(),
                };
                error!(
                    "WATCHDOG: keep-alives to {:?} stopped {} ms ago: {why}; unless it stops, \
                     the watchdog resets this host within {timeout} of the last keep-alive, \
                     before the storage can give its disk to another host",
                    wd.path,
                    now.duration_since(since).as_millis()
                );
            }
            wd.next = now + RECHECK.min(wd.interval);
        }
    }
}

/// Feed the watchdog now if allowed (right before and after a live re-exec).
pub fn feed_now(state: &mut State) {
    if let Some(wd) = state.watchdog.as_mut() {
        wd.next = Instant::now();
    }
    tick(state, Instant::now());
}
