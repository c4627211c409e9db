//! Leases and owners written down: what the keeper stores next to each lease's descriptor and
//! what a live re-exec hands to the new image.
//!
//! Why one versioned record: both paths must rebuild the same tables from text, and both may be
//! read by a newer binary than the one that wrote them (a re-exec into an upgrade, a restart
//! after an upgrade while the old keeper still runs). So every field has a default, unknown
//! fields are ignored, and `v` says which layout wrote it (1 = this one). Only additions are
//! allowed; a field's meaning never changes.

use super::lease::{Lease, LeaseKey};
use super::owner::{OwnerEntry, Owners};
use crate::protocol::{FailureAction, LeaseMode, Owner, ResourceKind};
use serde::{Deserialize, Serialize};

/// Layout version of [`LeaseRecord`] written by this binary.
pub const RECORD_VERSION: u32 = 1;

/// One owner of a lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    pub owner: Owner,
    /// When this owner joined the lease (seconds since the epoch).
    #[serde(default)]
    pub since: u64,
    /// Process start time (clock ticks since boot), to recognise a reused pid.
    #[serde(default)]
    pub start: Option<u64>,
    #[serde(default)]
    pub action: FailureAction,
}

/// Everything about a lease except its descriptors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    #[serde(default)]
    pub v: u32,
    pub name: String,
    pub kind: ResourceKind,
    pub mode: LeaseMode,
    pub lock_path: String,
    /// Lockspace leases: the lock file's name inside the directory whose descriptor travels
    /// with the lease. (Defaulted fields are left out when they have their default: the keeper
    /// keeps one record per lease, and every reader fills them in.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir_file: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub delete_when_free: bool,
    #[serde(default)]
    pub since: u64,
    #[serde(default)]
    pub owners: Vec<OwnerRecord>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl LeaseRecord {
    /// The record of `lease` as the tables describe it now.
    pub fn of(owners: &Owners, lease: &Lease) -> LeaseRecord {
        let owners = lease
            .owners
            .iter()
            .map(|(pid, since)| owner_record(owners.get(*pid), *pid, *since))
            .collect();
        LeaseRecord {
            v: RECORD_VERSION,
            name: lease.name.to_string(),
            kind: lease.kind,
            mode: lease.mode,
            lock_path: lease.lock_path.to_string(),
            dir_file: lease.dir.as_ref().map(|d| d.file.clone()),
            delete_when_free: lease.delete_when_free,
            since: lease.since,
            owners,
        }
    }
}

fn owner_record(entry: Option<&OwnerEntry>, pid: u32, since: u64) -> OwnerRecord {
    match entry {
        Some(e) => OwnerRecord {
            owner: e.owner.clone(),
            since,
            start: e.proc.start,
            action: e.action,
        },
        None => OwnerRecord {
            owner: Owner {
                uuid: String::new(),
                name: String::new(),
                id: 0,
                pid,
            },
            since,
            start: None,
            action: FailureAction::Default,
        },
    }
}

/// A lease key as the keeper protocol carries it.
pub fn key_id(key: LeaseKey) -> [u64; 2] {
    [key.dev, key.ino]
}

pub fn id_key(id: [u64; 2]) -> LeaseKey {
    let [dev, ino] = id;
    LeaseKey { dev, ino }
}
