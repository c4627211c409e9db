//! The libvirt-syntax parser (`ConfFile::parse`) with the keys of both users: the plugin's
//! `Settings::from_conf` (qemu-lockwarden.conf) and the daemon's lockwardend.conf keys, taken
//! with the same getters and ranges as `src/daemon/settings.rs` (whose `resolve` is private to
//! the daemon module).
//!
//! Invariants: no panic; every error names the file and, when it gives a line, a line that
//! exists; accepted plugin settings are within their documented ranges.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockwarden::config::{ConfFile, ConfigError};
use lockwarden::plugin_conf::{MAX_TIMEOUT_MS, Settings};
use std::path::{Path, PathBuf};

const PLUGIN_CONF: &str = "/etc/libvirt/qemu-lockwarden.conf";
const DAEMON_CONF: &str = "/etc/libvirt/lockwardend.conf";

fn check_error(e: &ConfigError, file: &str, text: &str) {
    let shown = e.to_string();
    assert!(
        shown.starts_with(file),
        "error does not name the file: {shown}"
    );
    if let Some(line) = e.line {
        let lines = text.matches('\n').count() + 1;
        assert!(
            (1..=lines).contains(&line),
            "error names line {line} of a {lines}-line file: {shown}"
        );
    }
}

fn plugin(text: &str) {
    let conf = match ConfFile::parse(Path::new(PLUGIN_CONF), text) {
        Ok(c) => c,
        Err(e) => return check_error(&e, PLUGIN_CONF, text),
    };
    match Settings::from_conf(conf, PathBuf::from("/run/lockwarden/lockwardend.sock")) {
        Ok(s) => {
            assert!((1..=MAX_TIMEOUT_MS).contains(&s.request_timeout_ms));
            assert!(s.daemon_socket.is_absolute());
            assert!(s.daemon_socket.as_os_str().len() <= 107);
            for dir in [
                &s.file_lockspace_dir,
                &s.lvm_lockspace_dir,
                &s.scsi_lockspace_dir,
            ]
            .into_iter()
            .flatten()
            {
                assert!(
                    dir.starts_with('/'),
                    "relative lockspace dir {dir:?} accepted"
                );
            }
            let _ = s.source_display();
        }
        Err(e) => check_error(&e, PLUGIN_CONF, text),
    }
}

fn daemon(text: &str) -> Result<(), ConfigError> {
    let mut conf = ConfFile::parse(Path::new(DAEMON_CONF), text)?;
    for key in [
        "socket",
        "admin_socket",
        "pid_file",
        "lease_dir",
        "watchdog_device",
    ] {
        if let Some(p) = conf.take_abs_path(key)? {
            assert!(p.is_absolute());
        }
    }
    if let Some(n) = conf.take_int("max_clients", 1, 1_000_000)? {
        assert!((1..=1_000_000).contains(&n));
    }
    if let Some(n) = conf.take_int("kill_grace_ms", 0, 600_000)? {
        assert!((0..=600_000).contains(&n));
    }
    if let Some(n) = conf.take_int("heartbeat_interval_ms", 0, 600_000)? {
        assert!((0..=600_000).contains(&n));
    }
    if let Some(n) = conf.take_int("fence_after_ms", 100, 3_600_000)? {
        assert!((100..=3_600_000).contains(&n));
    }
    let _ = conf.take_choice("log_level", &["error", "warn", "info", "debug"])?;
    let _ = conf.take_bool("unused_bool")?;
    let _ = conf.take_string("unused_string")?;
    conf.finish()
}

fuzz_target!(|data: &[u8]| {
    // ConfFile::load refuses non-UTF-8 files before parsing, so only text reaches the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    plugin(text);
    if let Err(e) = daemon(text) {
        check_error(&e, DAEMON_CONF, text);
    }
});
