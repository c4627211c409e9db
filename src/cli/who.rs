//! `lockwarden who PATH`: who holds this disk, on any host sharing the storage.
//!
//! Why it works without the daemon: the answer lives on the shared storage. The disk's lock
//! target is computed exactly as the plugin computes it (same settings file, same
//! `crate::naming`), then the holder records next to it are read and judged by
//! `holder_record::read` (believed only while the locks they describe are held), and the
//! kernel's own view of byte 0 (`F_OFD_GETLK`) covers holders that publish nothing (virtlockd,
//! other tools). When this host's lockwardend answers, its own leases on that file are added
//! too, so a lease whose record could not be written is still named.
//!
//! Exit codes: 0 the disk is held (holders printed), 1 the disk is free, 2 usage, 3 the disk
//! could not be examined. Output: an aligned table, or `--json` (schema: docs/holders.md).

use super::{Cli, EXIT_DAEMON, EXIT_OK, EXIT_PROBLEM, fetch_leases, print_json, table};
use crate::holder_record::{self as holder, Found, KernelLock, Record, Target, Vm};
use crate::naming;
use crate::plugin_conf::Settings;
use crate::protocol::{LeaseInfo, LeaseMode, LockTarget, ResourceKind};
use crate::untrusted::{Access, OpenFailure, escape};
use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sys::stat::{Mode, SFlag, fstat};
use serde_json::{Value, json};
use std::os::fd::{AsFd, OwnedFd};

/// How `who`'s messages name the VM it asks for (the plugin's "'name' (uuid)" form).
const WHO_VM: &str = "'lockwarden-who' (00000000-0000-0000-0000-000000000000)";

/// Where a disk's lock lives, as the plugin would lock it (a writable disk).
pub fn lock_target(settings: &Settings, disk: &str) -> Result<LockTarget, String> {
    let d = naming::disk(settings, WHO_VM, Some(disk.as_bytes()), false, false)
        .map_err(|e| e.message)?;
    d.lease.map(|l| l.target).ok_or_else(|| {
        format!(
            "{} sets auto_disk_leases = 0, so lockwarden does not lock disks by path; only \
             <lease> elements are locked",
            settings.source_display()
        )
    })
}

/// One holder as `who` reports it.
struct Row {
    record: Record,
    source: &'static str,
    path: Option<String>,
}

/// Everything `who` found out.
struct Report {
    disk: String,
    lock_path: String,
    lockspace: bool,
    found: Found,
    rows: Vec<Row>,
}

pub fn run(cli: &Cli) -> u8 {
    let Some(disk) = cli.operands.first() else {
        eprintln!("lockwarden: who needs a disk path");
        return super::EXIT_USAGE;
    };
    match examine(cli, disk) {
        Ok(report) => {
            let held = report.found.lock.is_some() || !report.rows.is_empty();
            if cli.json {
                print_json(&to_json(&report, held));
            } else {
                print_human(&report, held);
            }
            if held { EXIT_OK } else { EXIT_PROBLEM }
        }
        Err(e) => {
            if cli.json {
                print_json(&json!({ "disk": disk, "error": e }));
            } else {
                eprintln!("lockwarden: {e}");
            }
            EXIT_DAEMON
        }
    }
}

fn absolute(disk: &str) -> Result<String, String> {
    if disk.starts_with('/') {
        return Ok(disk.to_string());
    }
    let cwd = std::env::current_dir()
        .map_err(|e| format!("cannot make {disk:?} absolute: the current directory: {e}"))?;
    Ok(cwd.join(disk).to_string_lossy().into_owned())
}

fn examine(cli: &Cli, disk: &str) -> Result<Report, String> {
    let disk = absolute(disk)?;
    let settings = Settings::load(Some(&cli.plugin_conf), crate::paths::default_socket())
        .map_err(|e| e.message)?;
    let target = lock_target(&settings, &disk)?;
    let lock_path = naming::lock_path(&target);
    let lockspace = matches!(target, LockTarget::Lockspace { .. });
    let mut report = Report {
        disk: disk.clone(),
        lock_path: lock_path.clone(),
        lockspace,
        found: Found::default(),
        rows: Vec::new(),
    };
    if let Some(fd) = open_lock(&target, &disk, &lock_path)? {
        report.found = holder::read(Target {
            fd: fd.as_fd(),
            kind: ResourceKind::Disk,
            lock_path: &lock_path,
            lockspace,
        });
    }
    report.rows = report
        .found
        .believed
        .iter()
        .map(|s| Row {
            record: s.record.clone(),
            source: "record",
            path: Some(s.source.clone()),
        })
        .collect();
    if let Ok(leases) = fetch_leases(cli) {
        add_local(&mut report, &leases);
    }
    Ok(report)
}

/// Open the lock target read-only without creating anything; None when a lockspace lock file
/// does not exist (nobody holds it: lock files are created before they are locked).
pub(super) fn open_lock(
    target: &LockTarget,
    disk: &str,
    lock_path: &str,
) -> Result<Option<OwnedFd>, String> {
    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let fd = match target {
        LockTarget::File { path } => {
            let meta = std::fs::metadata(path).map_err(|e| {
                format!("disk {disk:?}: {e}; give the path as written in the domain XML")
            })?;
            let ft = meta.file_type();
            use std::os::unix::fs::FileTypeExt;
            if !(ft.is_file() || ft.is_block_device()) {
                return Err(format!(
                    "disk {disk:?} is not a regular file or block device, so it is never locked"
                ));
            }
            open(path.as_str(), flags, Mode::empty())
                .map_err(|e| format!("cannot open disk {disk:?} read-only: {}", e.desc()))?
        }
        LockTarget::Lockspace { dir, .. } => {
            if let Err(e) = std::fs::metadata(dir) {
                return Err(format!(
                    "disk {disk:?} is locked through the lockspace directory {dir:?}, which \
                     cannot be read on this host: {e}; mount the shared lockspace here"
                ));
            }
            // A lock file on shared storage: never a device open, never through a link.
            match crate::untrusted::open_regular_at(None, lock_path, Access::Read, None) {
                Ok((fd, _, _)) => fd,
                Err(OpenFailure::Sys(Errno::ENOENT)) => return Ok(None),
                Err(e) => {
                    return Err(format!(
                        "disk {disk:?}: cannot open its lock file {lock_path:?}: {}; remove it \
                         if it is not lockwarden's or lockd's lock file",
                        e.describe()
                    ));
                }
            }
        }
    };
    let st = fstat(&fd).map_err(|e| format!("fstat {lock_path:?}: {}", e.desc()))?;
    let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
    if kind != SFlag::S_IFREG && kind != SFlag::S_IFBLK {
        return Err(format!(
            "{lock_path:?} is not a regular file or block device"
        ));
    }
    Ok(Some(fd))
}

/// Add this host's daemon's leases on the same file that no believed record already names.
fn add_local(report: &mut Report, leases: &[LeaseInfo]) {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into());
    for l in leases
        .iter()
        .filter(|l| l.lock_path == report.lock_path || l.name == report.disk)
    {
        let vms: Vec<Vm> = l
            .owners
            .iter()
            .filter(|o| {
                !report
                    .rows
                    .iter()
                    .any(|r| r.record.vms.iter().any(|v| v.uuid == o.uuid))
            })
            .map(|o| Vm::of(o, l.since))
            .collect();
        if vms.is_empty() {
            continue;
        }
        let mut record = Record::new(&host, l.kind, &l.name, l.mode, &l.lock_path, l.since, vms);
        record.generation = 0;
        report.rows.push(Row {
            record,
            source: "daemon",
            path: None,
        });
    }
}

fn mode_word(m: LeaseMode) -> &'static str {
    match m {
        LeaseMode::Exclusive => "exclusive",
        LeaseMode::Shared => "shared",
    }
}

fn message(report: &Report, held: bool) -> String {
    if !held {
        return format!("disk {} is free", report.disk.escape_debug());
    }
    let records: Vec<Record> = report.rows.iter().map(|r| r.record.clone()).collect();
    let mut m = holder::describe_refusal(
        ResourceKind::Disk,
        &report.disk,
        None,
        &records,
        report.found.lock.as_ref(),
    );
    // Dead-host visibility (holder_record/seen.rs).
    for seen in &report.found.seen {
        m.push_str(&format!(" ({})", seen.sentence()));
    }
    m
}

fn lock_json(lock: Option<&KernelLock>) -> Value {
    match lock {
        None => Value::Null,
        Some(l) => json!({
            "mode": mode_word(l.mode),
            "pid": l.pid,
            "comm": l.comm,
            "nfs": l.nfs,
        }),
    }
}

fn to_json(report: &Report, held: bool) -> Value {
    let holders: Vec<Value> = report
        .rows
        .iter()
        .flat_map(|row| {
            let r = &row.record;
            r.vms.iter().map(move |v| {
                json!({
                    "host": r.host,
                    "boot_id": (!r.boot_id.is_empty()).then_some(&r.boot_id),
                    "vm_name": v.name,
                    "vm_uuid": v.uuid,
                    "pid": v.pid,
                    "mode": mode_word(r.mode),
                    "since": v.since,
                    "since_utc": table::utc(v.since),
                    "generation": (row.source == "record").then_some(r.generation),
                    "version": r.version,
                    "source": row.source,
                    "record": row.path,
                })
            })
        })
        .collect();
    json!({
        "disk": report.disk,
        "lock_path": report.lock_path,
        "lock_target": if report.lockspace { "lockspace" } else { "file" },
        "held": held,
        "lock": lock_json(report.found.lock.as_ref()),
        "holders": holders,
        "ignored": report.found.ignored,
        "last_seen": report.found.seen,
        "message": message(report, held),
    })
}

fn print_human(report: &Report, held: bool) {
    let disk = report.disk.escape_debug().to_string();
    let mut rows: Vec<Vec<String>> = Vec::new();
    for row in &report.rows {
        let r = &row.record;
        for v in &r.vms {
            rows.push(vec![
                disk.clone(),
                r.host.escape_debug().to_string(),
                v.name.escape_debug().to_string(),
                v.uuid.escape_debug().to_string(),
                v.pid.to_string(),
                mode_word(r.mode).into(),
                table::utc(v.since),
            ]);
        }
    }
    if rows.is_empty() {
        if let Some(l) = &report.found.lock {
            let (host, pid) = match (l.pid, l.nfs) {
                (Some(p), false) => ("(this host)".to_string(), p.to_string()),
                (Some(p), true) => ("?".to_string(), p.to_string()),
                (None, _) => ("?".to_string(), "-".to_string()),
            };
            let vm = match &l.comm {
                Some(c) => format!("(not lockwarden: {})", c.escape_debug()),
                None => "(not lockwarden)".into(),
            };
            rows.push(vec![
                disk.clone(),
                host,
                vm,
                "-".into(),
                pid,
                mode_word(l.mode).into(),
                "-".into(),
            ]);
        }
    }
    if held {
        print!(
            "{}",
            table::render(
                &["DISK", "HOST", "VM", "UUID", "PID", "MODE", "SINCE"],
                &rows
            )
        );
        if report.rows.is_empty() {
            println!("{}", escape(&message(report, held)));
        }
        // Dead-host visibility (holder_record/seen.rs).
        for seen in &report.found.seen {
            println!("{}", escape(&seen.sentence()));
        }
    } else {
        println!("{}", escape(&message(report, held)));
    }
    for i in &report.found.ignored {
        eprintln!(
            "lockwarden: ignored holder record \"{}\"{}: {}",
            escape(&i.source),
            i.host
                .as_ref()
                .map(|h| format!(" (host {})", escape(h)))
                .unwrap_or_default(),
            escape(&i.reason)
        );
    }
}
