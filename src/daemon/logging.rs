//! Log setup: the systemd journal's native protocol when stderr is connected to the journal,
//! else `env_logger` to stderr.
//!
//! Journal (issue 18): when `JOURNAL_STREAM` names our stderr (systemd's own test, made by
//! `systemd_journal_logger::connected_to_journal`) and the journal socket answers, every line
//! goes to the journal as an entry with its priority (error 3, warning 4, info 6, debug 7),
//! and the events operators alert on ([`Event`]) carry a fixed `MESSAGE_ID` plus `VM_NAME`,
//! `VM_UUID`, `DISK` (once per disk), `HOLDER_HOST` and the like as fields of their own
//! (docs/operators.md §11), so `journalctl MESSAGE_ID=<id>` lists them. The framing is the
//! crate's, not ours.
//!
//! Fallback: stderr lines as before. Why the `<N>` prefixes: under systemd without a usable
//! journal socket, stderr still goes to the journal, which reads a leading `<3>`..`<7>` as the
//! syslog priority (sd-daemon(3)), so `journalctl -p warning` shows exactly our warnings. The
//! journal stamps time and pid itself, so those are left out there; outside systemd each line
//! carries its own UTC timestamp and level. Event fields are not printed on stderr.

use log::{Level, LevelFilter};
use std::io::Write;

/// Events with a journal `MESSAGE_ID` of their own (docs/operators.md §11, lockwardend(8)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A VM acquired its leases.
    Acquired,
    /// An acquire was refused.
    Refused,
    /// A VM gave up leases (release, VM exit).
    Released,
    /// The storage dropped a lease's lock.
    Lost,
    /// A VM was fenced: its storage stopped confirming heartbeats.
    Fenced,
    /// A new keeper replaced one that went away.
    KeeperReplaced,
    /// A live re-exec finished.
    Reexec,
}

// ALL and name: the documentation check below (every event listed with its id).
#[cfg_attr(not(test), allow(dead_code))]
impl Event {
    pub const ALL: [Event; 7] = [
        Event::Acquired,
        Event::Refused,
        Event::Released,
        Event::Lost,
        Event::Fenced,
        Event::KeeperReplaced,
        Event::Reexec,
    ];

    /// The fixed 128-bit id of this kind of event (`journalctl --new-id128` once, never
    /// changed: monitoring matches on it).
    pub fn message_id(self) -> &'static str {
        match self {
            Event::Acquired => "7e1efc46dd434ecbabb3cd01ba8211db",
            Event::Refused => "123b73ac354b4bc2b4534b8d732fb4ab",
            Event::Released => "98d74ba609b94605a258481c2c7c849a",
            Event::Lost => "822021a2df9748ea868d150bd08e04bb",
            Event::Fenced => "48e1d9d84c0045319ede067445bae728",
            Event::KeeperReplaced => "5f2544093e2c492e8cb0f80109ca14a8",
            Event::Reexec => "f65eafcdcf5d4d458f64fe8b8c2e52aa",
        }
    }

    /// The event's name in the documentation.
    pub fn name(self) -> &'static str {
        match self {
            Event::Acquired => "acquired",
            Event::Refused => "refused",
            Event::Released => "released",
            Event::Lost => "lost",
            Event::Fenced => "fenced",
            Event::KeeperReplaced => "keeper replaced",
            Event::Reexec => "re-exec",
        }
    }
}

/// Log `args` at `level` as event `ev` with `fields` (journal field names: upper case letters,
/// digits, `_`; a name may repeat, e.g. one `DISK` per disk). On stderr only the text shows.
pub fn event(level: Level, ev: Event, fields: &[(&str, &str)], args: std::fmt::Arguments<'_>) {
    if level > log::max_level() {
        return;
    }
    let mut kvs: Vec<(&str, &str)> = Vec::with_capacity(fields.len() + 1);
    kvs.push(("MESSAGE_ID", ev.message_id()));
    kvs.extend_from_slice(fields);
    log::logger().log(
        &log::Record::builder()
            .level(level)
            .target(module_path!())
            .module_path_static(Some(module_path!()))
            .args(args)
            .key_values(&kvs)
            .build(),
    );
}

/// The journal's native protocol, when stderr is connected to the journal and its socket
/// answers; None otherwise.
fn journal() -> Option<Journal> {
    if !systemd_journal_logger::connected_to_journal() {
        return None;
    }
    systemd_journal_logger::JournalLog::new()
        .ok()
        .map(|j| Journal(j.with_syslog_identifier("lockwardend".to_string())))
}

/// The journal logger with the priorities lockwardend has always used (info 6, debug 7, as
/// the `<N>` prefixes said): the crate writes info as notice (5) and debug as info (6), so
/// each record goes to it one level lower (info as debug → 6, debug as trace → 7).
struct Journal(systemd_journal_logger::JournalLog);

impl log::Log for Journal {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        let level = match record.level() {
            Level::Info => Level::Debug,
            Level::Debug | Level::Trace => Level::Trace,
            l => l,
        };
        let shifted = log::Record::builder()
            .level(level)
            .target(record.target())
            .args(*record.args())
            .module_path(record.module_path())
            .file(record.file())
            .line(record.line())
            .key_values(record.key_values())
            .build();
        // A journal that does not take the entry has nowhere to report that either.
        let _ = self.0.journal_send(&shifted);
    }

    fn flush(&self) {}
}
use std::sync::atomic::{AtomicU32, Ordering};

/// This process's pid for log lines, looked up once (getpid is a system call per line
/// otherwise); 0 = not yet known.
static PID: AtomicU32 = AtomicU32::new(0);

fn pid() -> u32 {
    match PID.load(Ordering::Relaxed) {
        0 => {
            let p = std::process::id();
            PID.store(p, Ordering::Relaxed);
            p
        }
        p => p,
    }
}

/// A forked child (the keeper) must not log under its parent's pid.
pub fn forget_pid() {
    PID.store(0, Ordering::Relaxed);
}

/// True when stderr most likely ends in the journal (systemd sets these for its services).
pub fn under_systemd() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some()
}

/// The syslog priority journald should record for `level`.
pub fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// Install the logger. Safe to call once; a second call is ignored.
pub fn init(level: LevelFilter, under_systemd: bool) {
    if let Some(j) = journal() {
        if log::set_boxed_logger(Box::new(j)).is_ok() {
            log::set_max_level(level);
        }
        return;
    }
    let journal = under_systemd;
    let mut builder = env_logger::Builder::new();
    builder
        .filter_level(level)
        .target(env_logger::Target::Stderr);
    if journal {
        builder
            .format(|buf, record| writeln!(buf, "<{}>{}", priority(record.level()), record.args()));
    } else {
        builder.format(|buf, record| {
            writeln!(
                buf,
                "{} lockwardend[{}]: {}: {}",
                buf.timestamp_seconds(),
                pid(),
                record.level(),
                record.args()
            )
        });
    }
    // A logger already set (only possible in tests) keeps working; nothing to report.
    let _ = builder.try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/operators.md §11 and lockwardend(8) list every event with its MESSAGE_ID, on one
    /// line each, and no id twice.
    #[test]
    fn every_event_id_is_documented_and_unique() {
        let root = env!("CARGO_MANIFEST_DIR");
        let docs = [
            std::fs::read_to_string(format!("{root}/docs/operators.md")).unwrap(),
            std::fs::read_to_string(format!("{root}/meson-install/man/lockwardend.8.in")).unwrap(),
        ];
        let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
        assert!(
            readme.contains(&format!(
                "MESSAGE_ID={}` lists refusals",
                Event::Refused.message_id()
            )),
            "README: the refused id"
        );
        let mut ids: Vec<&str> = Event::ALL.iter().map(|e| e.message_id()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), Event::ALL.len());
        for e in Event::ALL {
            assert_eq!(e.message_id().len(), 32);
            assert!(e.message_id().chars().all(|c| c.is_ascii_hexdigit()));
            for d in &docs {
                assert!(
                    d.lines()
                        .any(|l| l.contains(e.message_id()) && l.contains(e.name())),
                    "{} ({}) is not documented",
                    e.name(),
                    e.message_id()
                );
            }
        }
    }
}
