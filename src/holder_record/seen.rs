//! When another host was last seen (docs/operators.md, section 10): the heartbeat file
//! `.lockwarden/heartbeat@<host>` that host's lockwardend rewrites every
//! `heartbeat_interval_ms` on each mount where it holds leases (daemon/heartbeat.rs), read by a
//! refusal and by `lockwarden who` for the hosts their holder records name.
//!
//! The file is on shared storage and untrusted: opened only as a regular file without
//! following links (`open_regular_at`), at most [`MAX_BEAT_BYTES`] read, at most
//! [`MAX_HOSTS`] hosts per look, and everything from it escaped before it is printed.
//!
//! Which time: the later of the file's modification time and the `time=` its content carries.
//! The modification time is set by the storage server when it handled the write (NFS), the
//! content time by the writing host's clock; both are compared with this host's clock, so skew
//! between the hosts and the server shifts the age either way. Taking the later one means a
//! skewed clock can make a host look more recently alive than it was, never longer dead: the
//! age is a hint for an operator, never a reason for lockwarden to act.

use super::{host_label, open_record_dir};
use crate::text::{esc, now_secs};
use crate::untrusted::{Access, open_regular_at, read_bounded};
use serde::Serialize;
use std::os::fd::{AsFd, BorrowedFd};

/// Bytes read of a heartbeat file (the daemon writes 160).
const MAX_BEAT_BYTES: usize = 512;
/// Hosts looked up per refusal or `who`.
pub const MAX_HOSTS: usize = 4;

/// When one host last wrote its heartbeat file next to a disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LastSeen {
    pub host: String,
    /// Seconds from the later of the two times below to now (0 when that is in the future).
    pub age_secs: u64,
    /// The file's modification time (storage server's clock), seconds since the epoch.
    pub mtime: i64,
    /// The `time=` of its content (the writing host's clock), when present.
    pub content_time: Option<u64>,
}

impl LastSeen {
    /// "host X, last seen N min ago (...)".
    pub fn sentence(&self) -> String {
        format!(
            "host {}, last seen {} ago (its heartbeat file on the storage; clocks of the hosts \
             and the storage server may differ)",
            esc(&self.host),
            ago(self.age_secs)
        )
    }
}

/// "42 s", "12 min", "3 h 5 min", "2 d 4 h".
pub fn ago(s: u64) -> String {
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h {} min", s / 3600, (s % 3600) / 60),
        _ => format!("{} d {} h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// When each of `hosts` last wrote its heartbeat in the record directory `dir` (a
/// `.lockwarden` directory), at most [`MAX_HOSTS`] of them; the directory is opened once.
pub fn hosts_last_seen(dir: &str, hosts: &[&str]) -> Vec<LastSeen> {
    let Ok(Some(dfd)) = open_record_dir(dir) else {
        return Vec::new();
    };
    hosts
        .iter()
        .take(MAX_HOSTS)
        .filter_map(|h| last_seen(dfd.as_fd(), h))
        .collect()
}

/// The heartbeat of `host` in the record directory open as `dir`, if any.
fn last_seen(dir: BorrowedFd<'_>, host: &str) -> Option<LastSeen> {
    let name = format!("heartbeat@{}", host_label(host));
    let (fd, st, _) = open_regular_at(Some(dir), &name, Access::Read, None).ok()?;
    let bytes = read_bounded(fd.as_fd(), MAX_BEAT_BYTES)
        .ok()?
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let content_time = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("time="))
        .and_then(|t| t.parse::<u64>().ok());
    let mtime = st.st_mtime;
    let latest = u64::try_from(mtime)
        .unwrap_or(0)
        .max(content_time.unwrap_or(0));
    Some(LastSeen {
        host: host.to_string(),
        age_secs: now_secs().saturating_sub(latest),
        mtime,
        content_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn ages_read_like_a_person_would_say_them() {
        assert_eq!(ago(42), "42 s");
        assert_eq!(ago(120), "2 min");
        assert_eq!(ago(7200 + 300), "2 h 5 min");
        assert_eq!(ago(2 * 86_400 + 4 * 3600), "2 d 4 h");
    }

    #[test]
    fn a_heartbeat_is_read_by_host_label_and_later_time_wins() {
        let dir = tempfile::tempdir().unwrap();
        let now = now_secs();
        fs::write(
            dir.path().join("heartbeat@node_b"),
            format!("host=node-b time={}\n", now + 1000),
        )
        .unwrap();
        fs::write(dir.path().join("heartbeat@node-c"), b"garbage").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("heartbeat@node-d")).unwrap();
        let d = dir.path().to_str().unwrap();
        let seen = hosts_last_seen(d, &["node b", "node-c", "node-d", "node-e"]);
        // "node b" is stored under its label node_b; a content time in the future is age 0.
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[0].host, "node b");
        assert_eq!(seen[0].content_time, Some(now + 1000));
        assert_eq!(seen[0].age_secs, 0);
        // No time= in the content: the file's modification time alone.
        assert_eq!(seen[1].host, "node-c");
        assert_eq!(seen[1].content_time, None);
        assert!(seen[1].age_secs < 60);
        assert!(seen[1].sentence().starts_with("host node-c, last seen "));
        // A link is never followed; a missing directory is nothing seen.
        assert!(hosts_last_seen("/nonexistent/.lockwarden", &["node-b"]).is_empty());
        // At most MAX_HOSTS hosts are looked up.
        let many: Vec<String> = (0..10).map(|i| format!("h{i}")).collect();
        for h in &many {
            fs::write(dir.path().join(format!("heartbeat@{h}")), b"time=1").unwrap();
        }
        let names: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(hosts_last_seen(d, &names).len(), MAX_HOSTS);
    }
}
