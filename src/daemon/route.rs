//! Where storage completions and request deadlines are routed: a job that came back goes to
//! the request or check it was for (ledger.rs says which), and a deadline, a client going
//! away or a live re-exec reaches every kind of waiting request through one function each.
//!
//! Why its own module: the tables (state.rs) and the ledger know nothing of acquire, thaw or
//! the heartbeats, so they can be tested alone and nothing calls back up into them; this module
//! is the one place above all of them that knows every kind of job (docs/architecture.md).

use super::acquire;
use super::fence;
use super::heartbeat;
use super::ledger::{JobFor, Wait};
use super::lockfile::Disposal;
use super::lost;
use super::owner::ConnId;
use super::state::State;
use super::storage::Outcome;
use super::thaw;
use log::{debug, info, warn};
use std::time::Instant;

/// Handle the results of storage work that ran inline (host-local mounts), including that of
/// work those results started.
pub fn inline_results(state: &mut State) {
    while state.storage.has_inline() {
        storage_results(state);
    }
}

/// Handle every storage result that arrived.
pub fn storage_results(state: &mut State) {
    for done in state.storage.collect() {
        let Some(why) = state.ledger.came_back(done.id) else {
            continue;
        };
        match (why, done.outcome) {
            (JobFor::Take(op), Outcome::Take(r)) => acquire::on_take(state, op, done.id, r),
            (JobFor::Orphan, Outcome::Take(r)) => acquire::orphan(state, done.id, r),
            (JobFor::Probe, Outcome::Probe { key, fd, result }) => {
                lost::on_probe(state, key, &fd, result)
            }
            (JobFor::Heartbeat, Outcome::Heartbeat(b)) => heartbeat::on_beat(state, done.id, *b),
            (JobFor::Fence, Outcome::Probe { key, fd, result }) => {
                fence::on_recheck(state, key, &fd, result)
            }
            (JobFor::Thaw(op), Outcome::Probe { key, fd, result }) => {
                thaw::on_verify(state, op, done.id, key, &fd, result)
            }
            (why, Outcome::Published { label, result }) => {
                if let Err(e) = result {
                    warn!(
                        "cannot publish the holder record for {label:?} (the lease itself \
                        is held; other hosts will only see that it is locked): {e}"
                    );
                }
                state.job_done(why, done.id);
            }
            (
                why,
                Outcome::Disposed {
                    label,
                    disposal,
                    withdraw,
                },
            ) => {
                if let Err(e) = withdraw {
                    warn!("cannot withdraw the holder record of {label}: {e}");
                }
                match disposal {
                    Disposal::Closed => debug!("{label}: lock dropped"),
                    Disposal::Deleted => debug!("{label}: lock dropped, lock file deleted"),
                    Disposal::KeptInUse => info!(
                        "{label}: lock dropped; lock file kept, another host still holds a \
                        shared lock on it"
                    ),
                }
                state.job_done(why, done.id);
            }
            _ => {}
        }
    }
}

/// Answer the requests whose deadline passed: a Timeout naming the storage that did not
/// answer; what they took is rolled back.
pub fn expire(state: &mut State, now: Instant) {
    // A refused Acquire may leave a group waiting for its roll-back with the same (passed)
    // deadline: answered in this round too.
    while let Some(id) = state.ledger.due(now).first().copied() {
        match state.ledger.take(id) {
            Some(Wait::Acquire(op)) => acquire::expired(state, id, op, now),
            Some(Wait::Group(g)) => state.finish_group(g, true),
            Some(Wait::Thaw(t)) => thaw::expired(state, t),
            None => {}
        }
    }
}

/// A live re-exec cannot wait any longer: answer every waiting request now.
pub fn interrupt(state: &mut State) {
    // Failing an Acquire may park a group for its roll-back: answered in this call too.
    while let Some(id) = state.ledger.all().first().copied() {
        match state.ledger.take(id) {
            Some(Wait::Acquire(op)) => acquire::interrupted(state, op),
            Some(Wait::Group(g)) => state.finish_group(g, true),
            Some(Wait::Thaw(t)) => thaw::interrupted(state, t),
            None => {}
        }
    }
}

/// The client `conn` went away: nobody to answer; what its requests took is rolled back.
pub fn cancel(state: &mut State, conn: ConnId) {
    for id in state.ledger.of_conn(conn) {
        match state.ledger.take(id) {
            Some(Wait::Acquire(op)) => acquire::cancelled(state, op),
            Some(Wait::Group(g)) => {
                for job in g.jobs.keys() {
                    state.ledger.reassign(*job, JobFor::Other);
                }
            }
            Some(Wait::Thaw(t)) => thaw::cancelled(state, t),
            None => {}
        }
    }
}
