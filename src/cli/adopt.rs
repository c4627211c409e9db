//! `lockwarden adopt [VM...|--all] [--dry-run]`: protect VMs that were already running.
//!
//! For each chosen running VM that is not fully protected, the leases the plugin would take
//! (as [`super::audit`] computes them) are requested from lockwardend in ONE Acquire on the
//! main socket, on behalf of the VM's QEMU pid, with the VM's `<on_lockfailure>` action: all
//! or nothing per VM, exactly what libvirt's resume would ask. Already-held leases of the VM
//! are taken again idempotently; a lease held by anyone else refuses that VM's adoption and
//! lockwardend's refusal names the holder (host, VM, or "a process that is not lockwarden").
//!
//! What differs from a VM libvirt started under lockwarden (docs/migration.md): there is no
//! lifetime connection inherited by QEMU; lockwardend ties the leases to the QEMU process with
//! a pidfd and releases them when it exits, which is also how leases survive a lockwardend
//! restart. The CLI's own connection is not the owner's (its peer pid is not QEMU's), so
//! closing it releases nothing.
//!
//! Exit codes: 0 every chosen VM is protected now (or paused, or was already protected),
//! 1 at least one was refused or could not be adopted, 2 usage (no VM named, unknown VM),
//! 3 lockwardend or the status files could not be reached.

use super::audit::{self, Holding, VmReport};
use super::running;
use super::{Cli, EXIT_DAEMON, EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, print_json};
use crate::client::Client;
use crate::protocol::{LeaseMode, Request};
use crate::untrusted::escape;
use serde_json::{Value, json};

/// What happened to one VM.
struct Outcome {
    name: String,
    pid: u32,
    before: &'static str,
    /// adopted, already-protected, paused, refused, would-adopt, would-be-refused, error
    result: &'static str,
    message: String,
    leases: Vec<String>,
}

fn lease_list(r: &VmReport) -> Vec<String> {
    r.specs()
        .iter()
        .map(|s| {
            let mode = match s.mode {
                LeaseMode::Exclusive => "exclusive",
                LeaseMode::Shared => "shared",
            };
            format!("{} ({mode})", s.name)
        })
        .collect()
}

fn adopt_one(cli: &Cli, ctx: &audit::Context, r: &VmReport) -> Outcome {
    let d = &r.domain;
    let mut out = Outcome {
        name: d.owner.name.clone(),
        pid: d.owner.pid,
        before: r.verdict(),
        result: "error",
        message: String::new(),
        leases: lease_list(r),
    };
    let action = d.action.word();
    match r.verdict() {
        "paused" => {
            out.result = "paused";
            out.message = "paused: libvirt holds no leases for a paused VM and takes them when \
                           it resumes; nothing to adopt"
                .into();
            return out;
        }
        "protected" => {
            out.result = "already-protected";
            out.message = "already protected".into();
            return out;
        }
        "error" => {
            let why: Vec<String> = r
                .problem
                .iter()
                .cloned()
                .chain(r.items.iter().filter_map(|i| match &i.holding {
                    Holding::Error(e) => Some(format!("{}: {e}", i.name)),
                    _ => None,
                }))
                .collect();
            out.message = format!("not adopted: {}", why.join("; "));
            return out;
        }
        _ => {}
    }
    let specs = r.specs();
    if specs.is_empty() {
        out.result = "already-protected";
        out.message = "nothing to lock (no disk or lease the plugin would lock)".into();
        return out;
    }
    let elsewhere: Vec<String> = r
        .items
        .iter()
        .filter(|i| i.holding.elsewhere())
        .map(|i| {
            format!(
                "{}: {}",
                i.name,
                match &i.holding {
                    Holding::OtherVm(m) | Holding::NotLockwarden(m) => m.clone(),
                    _ => String::new(),
                }
            )
        })
        .collect();
    if cli.dry_run {
        let joinable = r.items.iter().all(|i| match &i.holding {
            Holding::OtherVm(m) => m.contains("adopt can join it"),
            Holding::NotLockwarden(_) => false,
            _ => true,
        });
        if elsewhere.is_empty() || joinable {
            out.result = "would-adopt";
            out.message = format!(
                "would take {} lease(s) for QEMU pid {} (on_lockfailure: {action}): {}",
                specs.len(),
                d.owner.pid,
                out.leases.join(", ")
            );
        } else {
            out.result = "would-be-refused";
            out.message = format!("would be refused: {}", elsewhere.join("; "));
        }
        return out;
    }
    // The pid was checked when the status file was read; check again right before acting.
    if let Err(e) = running::is_qemu_of(d.owner.pid, &d.owner.name) {
        out.message = format!("not adopted: {e}");
        return out;
    }
    let context = || {
        format!(
            "lockwarden adopt: VM '{}' (pid {})",
            escape(&d.owner.name),
            d.owner.pid
        )
    };
    let result = Client::connect(
        &ctx.settings.daemon_socket,
        ctx.settings.request_timeout_ms,
        &context,
    )
    .and_then(|mut c| {
        c.call(&Request::Acquire {
            owner: d.owner.clone(),
            leases: specs.clone(),
            action: d.action,
            restrict: false,
        })
    });
    match result {
        Ok(_) => {
            out.result = "adopted";
            out.message = format!(
                "adopted: lockwardend holds {} lease(s) for QEMU pid {} (on_lockfailure: \
                 {action}) and releases them when that process exits",
                specs.len(),
                d.owner.pid
            );
        }
        Err(e) => {
            out.result = "refused";
            out.message = format!("NOT adopted, nothing taken: {}", e.message);
        }
    }
    out
}

fn outcome_json(o: &Outcome) -> Value {
    json!({
        "name": o.name,
        "pid": o.pid,
        "before": o.before,
        "result": o.result,
        "message": o.message,
        "leases": o.leases,
    })
}

pub fn run(cli: &Cli) -> u8 {
    if cli.all != cli.operands.is_empty() {
        eprintln!(
            "lockwarden: adopt needs either VM names or --all (not both); `lockwarden audit` \
             lists the running VMs"
        );
        return EXIT_USAGE;
    }
    let (ctx, reports, errors) = match audit::collect(cli) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("lockwarden: {e}");
            return EXIT_DAEMON;
        }
    };
    if let Err(e) = &ctx.leases {
        eprintln!("lockwarden: {e}; adopt needs lockwardend");
        return EXIT_DAEMON;
    }
    for e in &errors {
        eprintln!("lockwarden: {}", escape(e));
    }
    let mut unknown = Vec::new();
    let chosen: Vec<&VmReport> = if cli.all {
        reports.iter().collect()
    } else {
        let mut v = Vec::new();
        for name in &cli.operands {
            match reports.iter().find(|r| r.domain.owner.name == *name) {
                Some(r) => v.push(r),
                None => unknown.push(name.clone()),
            }
        }
        v
    };
    if !unknown.is_empty() {
        eprintln!(
            "lockwarden: no running domain named {} on this host (no status file in {}); \
             `lockwarden audit` lists them",
            unknown
                .iter()
                .map(|n| format!("'{}'", escape(n)))
                .collect::<Vec<_>>()
                .join(", "),
            cli.status_dir.display()
        );
        return EXIT_USAGE;
    }
    let outcomes: Vec<Outcome> = chosen.iter().map(|r| adopt_one(cli, &ctx, r)).collect();
    if cli.json {
        print_json(&json!({
            "host": ctx.host,
            "dry_run": cli.dry_run,
            "vms": outcomes.iter().map(outcome_json).collect::<Vec<_>>(),
            "status_file_errors": errors,
        }));
    } else {
        if outcomes.is_empty() {
            println!("no QEMU domain runs on this host");
        }
        for o in &outcomes {
            println!("{}: {}", escape(&o.name), escape(&o.message));
        }
    }
    let ok = outcomes.iter().all(|o| {
        matches!(
            o.result,
            "adopted" | "already-protected" | "paused" | "would-adopt"
        )
    });
    if !errors.is_empty() {
        EXIT_DAEMON
    } else if ok {
        EXIT_OK
    } else {
        EXIT_PROBLEM
    }
}
