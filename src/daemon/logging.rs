//! Log setup: `env_logger` to stderr, in a form journald understands.
//!
//! Why the `<N>` prefixes: under systemd stderr goes to the journal, which reads a leading
//! `<3>`..`<7>` as the syslog priority (sd-daemon(3)), so `journalctl -p warning` shows exactly
//! our warnings. The journal stamps time and pid itself, so those are left out there; outside
//! systemd each line carries its own UTC timestamp and level.

use log::{Level, LevelFilter};
use std::io::Write;
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
pub fn init(level: LevelFilter, journal: bool) {
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
