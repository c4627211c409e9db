//! Small text helpers shared by every message the daemon, the plugin and the CLI write.
//!
//! Why here: the error texts reach a person through libvirt ("error: Failed to start domain"),
//! so the wording rules (name the disk, say what to do, show times in UTC) live in one place.
//! Dates are formatted by hand because one civil-from-days function is less than a date crate.

use crate::protocol::{LeaseMode, ResourceKind};
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `2026-11-26 10:04:05 UTC` for `secs` since the epoch.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Proleptic Gregorian (year, month, day) of day `z` after 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m as u32, d as u32)
}

/// A name as it may appear inside a user-facing sentence: control characters (a newline in a
/// path) and the invisible characters that reorder text are escaped so a message stays one
/// honest line (the rule lives in `untrusted::escape`), everything else is kept as written.
pub fn esc(s: &str) -> String {
    crate::untrusted::escape(s)
}

/// Show a byte string for a message: escaped (a newline cannot forge a log line), quoted, and
/// shortened when very long.
pub fn show(bytes: &[u8]) -> String {
    const MAX: usize = 256;
    let (head, more) = match bytes.get(..MAX) {
        Some(h) if bytes.len() > MAX => (h, true),
        _ => (bytes, false),
    };
    let text = match std::str::from_utf8(head) {
        Ok(s) => s.escape_debug().to_string(),
        Err(_) => head.escape_ascii().to_string(),
    };
    if more {
        format!("'{text}...' ({} bytes)", bytes.len())
    } else {
        format!("'{text}'")
    }
}

/// "disk" or "lease", the word libvirt users know for a resource.
pub fn what(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::Disk => "disk",
        ResourceKind::Lease => "lease",
    }
}

/// "disk X", or "disk X (lock file P)" when the locked file is not the disk itself.
pub fn subject(kind: ResourceKind, name: &str, lock_path: &str) -> String {
    if name == lock_path {
        format!("{} {}", what(kind), esc(name))
    } else {
        format!(
            "{} {} (lock file {})",
            what(kind),
            esc(name),
            esc(lock_path)
        )
    }
}

/// "exclusive" or "shared".
pub fn mode_word(mode: LeaseMode) -> &'static str {
    match mode {
        LeaseMode::Exclusive => "exclusive",
        LeaseMode::Shared => "shared",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_known_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_795_687_445), "2026-11-26 10:04:05 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(951_868_799), "2000-02-29 23:59:59 UTC");
        assert_eq!(utc(4_107_542_400), "2100-03-01 00:00:00 UTC");
    }

    #[test]
    fn esc_keeps_plain_text_and_escapes_controls() {
        assert_eq!(esc("/images/a b.qcow2"), "/images/a b.qcow2");
        assert_eq!(esc("/images/a\nb"), "/images/a\\nb");
        assert_eq!(esc("/é/ü"), "/é/ü");
    }
}
