//! Fenced leases in `status` and `list`, and `lockwarden thaw VM` (docs/storage.md
//! "Partitions", docs/protocol.md "thaw"). A separate module so the fencing additions stay
//! apart from the rest of the CLI.
//!
//! `thaw` exit codes: 0 the VM was resumed, 1 the daemon refused (its message says why, and
//! nothing was changed unless it says the VM was killed), 2 usage, 3 the daemon cannot be
//! reached.

use super::{Cli, EXIT_DAEMON, EXIT_OK, EXIT_PROBLEM, ask_within, fetch_leases, print_json, table};
use crate::protocol::{LeaseInfo, Request, Response};
use std::time::Duration;

/// A thaw waits for the storage to re-verify each lock (at most the daemon's
/// `storage_timeout_ms`): it gets at least this long, whatever `--timeout-ms` says.
const THAW_WAIT: Duration = Duration::from_secs(120);

/// The leases the daemon reports fenced.
pub fn fetch(cli: &Cli) -> Result<Vec<LeaseInfo>, String> {
    Ok(fetch_leases(cli)?
        .into_iter()
        .filter(|l| l.fence.is_some())
        .collect())
}

/// "3 s", "4 min 10 s", "2 h 5 min".
pub fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// The table of fenced leases (nothing when there are none).
pub fn print_section(fenced: &[LeaseInfo]) {
    if fenced.is_empty() {
        return;
    }
    let rows: Vec<Vec<String>> = fenced
        .iter()
        .filter_map(|l| {
            let f = l.fence.as_ref()?;
            let vms: Vec<String> = l.owners.iter().map(|o| o.name.clone()).collect();
            Some(vec![
                l.name.escape_debug().to_string(),
                vms.join(","),
                f.stage.name().to_string(),
                f.mount.clone(),
                format!("{} ago", age(f.age_ms)),
                f.action.clone(),
            ])
        })
        .collect();
    println!(
        "\nleases fenced for a storage outage (docs/storage.md \"Partitions\"; \
         held-awaiting-thaw: run `lockwarden thaw VM`):"
    );
    print!(
        "{}",
        table::render(&["DISK", "VM", "STAGE", "MOUNT", "FENCED", "ACTION"], &rows)
    );
}

/// `lockwarden thaw VM`.
pub fn thaw(cli: &Cli) -> u8 {
    let Some(vm) = cli.operands.first() else {
        eprintln!("lockwarden: thaw needs a VM name or UUID");
        return super::EXIT_USAGE;
    };
    match ask_within(
        cli,
        &Request::Thaw { vm: vm.clone() },
        cli.timeout.max(THAW_WAIT),
    ) {
        Ok(Response::Ok { leases }) => {
            if cli.json {
                print_json(&serde_json::json!({ "thawed": true, "vm": vm, "leases": leases }));
            } else {
                println!(
                    "VM '{}' thawed: its lock(s) were re-verified on the storage and its process \
                     was resumed (SIGCONT); {} lease(s) held",
                    crate::untrusted::escape(vm),
                    leases.len()
                );
            }
            EXIT_OK
        }
        Ok(Response::Error(e)) => {
            if cli.json {
                print_json(&serde_json::json!({ "thawed": false, "vm": vm, "error": e }));
            } else {
                eprintln!("lockwarden: {}", crate::untrusted::escape(&e.message));
            }
            EXIT_PROBLEM
        }
        Ok(other) => {
            eprintln!("lockwarden: unexpected answer to thaw: {other:?}");
            EXIT_DAEMON
        }
        Err(e) => {
            if cli.json {
                print_json(&serde_json::json!({ "thawed": false, "vm": vm, "error": e }));
            } else {
                eprintln!("lockwarden: {e}");
            }
            EXIT_DAEMON
        }
    }
}
