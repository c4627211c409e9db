//! `lockwarden audit`: is every running VM on this host protected?
//!
//! libvirt asks the lock manager for a VM's disks only when it starts or resumes the VM, so a
//! VM that was running before lockwarden was enabled (or under lockd) holds nothing from
//! lockwardend. For every domain in libvirt's status directory ([`super::running`]) this lists
//! its disks and `<lease>`s exactly as the plugin would lock them (`crate::naming`, the code
//! the plugin's `drvAddResource` runs, with the plugin's settings file, as `lockwarden who`
//! does) and says who
//! holds each: lockwardend for this VM's QEMU pid (`protected`), another VM (this host's
//! lockwardend, or a holder record on the storage: `held-by-vm`), a lock no lockwarden record
//! describes (virtlockd, another host: `held-not-lockwarden`, seen with `F_OFD_GETLK`), or
//! nobody (`free`).
//!
//! Exit codes: 0 every running VM is fully protected (paused VMs hold nothing by libvirt's
//! design and count as fine), 1 at least one is exposed, 3 lockwardend or libvirt's status
//! files could not be read (nothing can be claimed then).

use super::running::{self, Domain, Resource};
use super::who;
use super::{Cli, EXIT_DAEMON, EXIT_OK, EXIT_PROBLEM, fetch_leases, print_json, table};
use crate::holder_record::{self as holder, Target};
use crate::naming;
use crate::plugin_conf::{ReadonlyDisks, Settings};
use crate::protocol::{LeaseInfo, LeaseMode, LeaseSpec, LockTarget, ResourceKind};
use crate::untrusted::escape;
use serde_json::{Value as Json, json};
use std::os::fd::AsFd;

/// Who holds one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holding {
    /// lockwardend holds it for this VM's QEMU pid.
    Protected,
    /// Another VM holds it (this host's lockwardend or a lockwarden record on the storage).
    OtherVm(String),
    /// A lock no lockwarden record describes: virtlockd, another tool, another host.
    NotLockwarden(String),
    /// Nobody holds it.
    Free,
    /// The plugin would not lock it (the reason says why).
    NotLocked(String),
    /// It could not be examined.
    Error(String),
}

impl Holding {
    pub fn word(&self) -> &'static str {
        match self {
            Holding::Protected => "protected",
            Holding::OtherVm(_) => "held-by-vm",
            Holding::NotLockwarden(_) => "held-not-lockwarden",
            Holding::Free => "free",
            Holding::NotLocked(_) => "not-locked",
            Holding::Error(_) => "error",
        }
    }
    fn detail(&self) -> String {
        match self {
            Holding::Protected => "held by lockwardend for this VM's QEMU".into(),
            Holding::Free => "nobody holds it".into(),
            Holding::OtherVm(m)
            | Holding::NotLockwarden(m)
            | Holding::NotLocked(m)
            | Holding::Error(m) => m.clone(),
        }
    }
    /// Held by somebody other than this VM.
    pub fn elsewhere(&self) -> bool {
        matches!(self, Holding::OtherVm(_) | Holding::NotLockwarden(_))
    }
}

/// One disk or lease of a VM.
#[derive(Debug, Clone)]
pub struct Item {
    pub kind: ResourceKind,
    /// Disk path or lease key.
    pub name: String,
    /// "writable", "shareable", "read-only" or "lease".
    pub access: &'static str,
    /// What the plugin would ask lockwardend for (None: not locked).
    pub spec: Option<LeaseSpec>,
    pub lock_path: Option<String>,
    pub holding: Holding,
}

/// Everything audit found out about one VM.
#[derive(Debug, Clone)]
pub struct VmReport {
    pub domain: Domain,
    pub items: Vec<Item>,
    /// Why this VM cannot be judged or adopted at all (stale status file, plugin refusal).
    pub problem: Option<String>,
}

impl VmReport {
    /// "protected", "paused", "unprotected", "partly-protected", "held-elsewhere", "error".
    pub fn verdict(&self) -> &'static str {
        if self.problem.is_some() {
            return "error";
        }
        if !self.domain.running() {
            return "paused";
        }
        let lockable: Vec<&Item> = self.items.iter().filter(|i| i.spec.is_some()).collect();
        if self
            .items
            .iter()
            .any(|i| matches!(i.holding, Holding::Error(_)))
        {
            "error"
        } else if lockable.iter().any(|i| i.holding.elsewhere()) {
            "held-elsewhere"
        } else if lockable.iter().all(|i| i.holding == Holding::Protected) {
            "protected"
        } else if lockable.iter().any(|i| i.holding == Holding::Protected) {
            "partly-protected"
        } else {
            "unprotected"
        }
    }
    pub fn fine(&self) -> bool {
        matches!(self.verdict(), "protected" | "paused")
    }
    /// The leases the plugin would take for this VM, in its order.
    pub fn specs(&self) -> Vec<LeaseSpec> {
        self.items.iter().filter_map(|i| i.spec.clone()).collect()
    }
}

/// What audit and adopt share: settings, this host's name, lockwardend's leases.
pub struct Context {
    pub settings: Settings,
    pub host: String,
    /// lockwardend's leases, or why they could not be listed.
    pub leases: Result<Vec<LeaseInfo>, String>,
}

impl Context {
    pub fn load(cli: &Cli) -> Result<Context, String> {
        let settings = Settings::load(Some(&cli.plugin_conf), crate::paths::default_socket())
            .map_err(|e| e.message)?;
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Context {
            settings,
            host,
            leases: fetch_leases(cli),
        })
    }
}

fn access(res: &Resource) -> &'static str {
    match res {
        Resource::Disk { readonly: true, .. } => "read-only",
        Resource::Disk { shared: true, .. } => "shareable",
        Resource::Disk { .. } | Resource::Unresolved { .. } => "writable",
        Resource::Lease { .. } => "lease",
    }
}

/// Turn one resource into the lease the plugin would request (through the plugin's own naming,
/// `crate::naming`). `vm` labels the VM in messages; `rw_disks` counts read/write exclusive
/// disks for `require_lease_for_disks`, as the plugin does.
fn plan(settings: &Settings, vm: &str, rw_disks: &mut usize, res: &Resource) -> Item {
    let (kind, name, result) = match res {
        Resource::Disk {
            path,
            readonly,
            shared,
        } => {
            let r =
                naming::disk(settings, vm, Some(path.as_bytes()), *readonly, *shared).map(|d| {
                    if d.rw_exclusive {
                        *rw_disks += 1;
                    }
                    d.lease
                });
            (ResourceKind::Disk, path.clone(), r)
        }
        Resource::Lease {
            key,
            path,
            offset,
            lockspace,
        } => {
            let r = naming::lease(
                vm,
                key.as_bytes(),
                path.as_deref().map(str::as_bytes),
                offset.unwrap_or(0),
                lockspace.as_deref().map(str::as_bytes),
                LeaseMode::Exclusive,
            )
            .map(Some);
            (ResourceKind::Lease, key.clone(), r)
        }
        Resource::Unresolved { what } => {
            return Item {
                kind: ResourceKind::Disk,
                name: what.clone(),
                access: access(res),
                spec: None,
                lock_path: None,
                holding: Holding::Error(format!(
                    "libvirt resolves {what} to a path the status file does not show; find it \
                     with `virsh vol-path` and check it with `lockwarden who PATH`"
                )),
            };
        }
    };
    let mut item = Item {
        kind,
        name,
        access: access(res),
        spec: None,
        lock_path: None,
        holding: Holding::Free,
    };
    match result {
        Err(e) => item.holding = Holding::Error(e.message),
        Ok(Some(spec)) => {
            item.lock_path = Some(naming::lock_path(&spec.target));
            item.spec = Some(spec);
        }
        Ok(None) => {
            item.holding = Holding::NotLocked(
                if matches!(res, Resource::Disk { readonly: true, .. })
                    && settings.readonly_disks == ReadonlyDisks::Ignore
                {
                    format!(
                        "read-only disks are not locked (readonly_disks = \"ignore\" in {})",
                        settings.source_display()
                    )
                } else {
                    format!(
                        "disks are not locked by path (auto_disk_leases = 0 in {})",
                        settings.source_display()
                    )
                },
            )
        }
    }
    item
}

/// Who holds `item`'s lock, as seen from here.
fn holding(ctx: &Context, dom: &Domain, item: &Item) -> Holding {
    let (Some(spec), Some(path)) = (&item.spec, &item.lock_path) else {
        return item.holding.clone();
    };
    let pid = dom.owner.pid;
    if let Ok(leases) = &ctx.leases {
        if let Some(l) = leases.iter().find(|l| {
            // A lease key is only unique within its directory: match leases by lock file.
            l.kind == spec.kind
                && (l.lock_path == *path
                    || (spec.kind == ResourceKind::Disk && l.name == spec.name))
        }) {
            if l.owners.iter().any(|o| o.pid == pid) {
                return Holding::Protected;
            }
            let names: Vec<String> = l
                .owners
                .iter()
                .map(|o| format!("VM '{}' (pid {})", escape(&o.name), o.pid))
                .collect();
            let shared = if l.mode == LeaseMode::Shared && spec.mode == LeaseMode::Shared {
                " (shared: adopt can join it)"
            } else {
                ""
            };
            return Holding::OtherVm(format!("held by {} on this host{shared}", names.join(", ")));
        }
    }
    let fd = match who::open_lock(&spec.target, &spec.name, path) {
        Ok(Some(fd)) => fd,
        Ok(None) => return Holding::Free,
        Err(e) => return Holding::Error(e),
    };
    let found = holder::read(Target {
        fd: fd.as_fd(),
        kind: spec.kind,
        lock_path: path,
        lockspace: matches!(spec.target, LockTarget::Lockspace { .. }),
    });
    let records = found.records();
    if records.is_empty() {
        return match &found.lock {
            None => Holding::Free,
            Some(_) => Holding::NotLockwarden(holder::describe_refusal(
                spec.kind,
                &spec.name,
                Some(path),
                &[],
                found.lock.as_ref(),
            )),
        };
    }
    // lockwardend unreachable: its own records still say whom it holds the lock for.
    let mine = records
        .iter()
        .any(|r| r.host == ctx.host && r.vms.iter().any(|v| v.pid == pid));
    if mine && ctx.leases.is_err() {
        return Holding::Protected;
    }
    Holding::OtherVm(holder::describe_refusal(
        spec.kind,
        &spec.name,
        Some(path),
        &records,
        found.lock.as_ref(),
    ))
}

/// Audit one domain.
pub fn examine(ctx: &Context, dom: &Domain) -> VmReport {
    // The VM as the plugin's messages name it: "'name' (uuid)".
    let vm = format!(
        "{} ({})",
        crate::text::show(dom.owner.name.as_bytes()),
        dom.owner.uuid
    );
    let mut rw_disks = 0;
    let mut items: Vec<Item> = dom
        .resources
        .iter()
        .map(|r| plan(&ctx.settings, &vm, &mut rw_disks, r))
        .collect();
    let mut problem = running::is_qemu_of(dom.owner.pid, &dom.owner.name)
        .err()
        .map(|e| format!("libvirt's status file {}: {e}", dom.status_file.display()));
    if problem.is_none()
        && ctx.settings.require_lease_for_disks
        && items.iter().all(|i| i.spec.is_none())
        && rw_disks > 0
    {
        problem = Some(format!(
            "the plugin would refuse this VM: it has {} read/write disk(s) and no lease, and {} \
             sets require_lease_for_disks",
            rw_disks,
            ctx.settings.source_display()
        ));
    }
    if dom.running() {
        for item in &mut items {
            item.holding = holding(ctx, dom, item);
        }
    }
    VmReport {
        domain: dom.clone(),
        items,
        problem,
    }
}

fn mode_word(spec: Option<&LeaseSpec>) -> &'static str {
    match spec.map(|s| s.mode) {
        Some(LeaseMode::Exclusive) => "exclusive",
        Some(LeaseMode::Shared) => "shared",
        None => "-",
    }
}

pub fn vm_json(r: &VmReport) -> Json {
    let d = &r.domain;
    json!({
        "name": d.owner.name,
        "uuid": d.owner.uuid,
        "id": d.owner.id,
        "pid": d.owner.pid,
        "state": d.state,
        "on_lockfailure": d.action.word(),
        "status_file": d.status_file.display().to_string(),
        "verdict": r.verdict(),
        "problem": r.problem,
        "resources": r.items.iter().map(|i| json!({
            "kind": match i.kind { ResourceKind::Disk => "disk", ResourceKind::Lease => "lease" },
            "name": i.name,
            "access": i.access,
            "mode": mode_word(i.spec.as_ref()),
            "lock_path": i.lock_path,
            "status": i.holding.word(),
            "detail": i.holding.detail(),
        })).collect::<Vec<_>>(),
    })
}

/// The aligned per-resource table both commands print.
pub fn print_table(reports: &[VmReport]) {
    let mut rows = Vec::new();
    for r in reports {
        let d = &r.domain;
        if r.items.is_empty() {
            rows.push(vec![
                d.owner.name.clone(),
                d.owner.pid.to_string(),
                d.state.clone(),
                "-".into(),
                "-".into(),
                "(no disk or lease to lock)".into(),
                "-".into(),
            ]);
        }
        for i in &r.items {
            let status = if d.running() {
                i.holding.word().to_string()
            } else {
                "paused".to_string()
            };
            rows.push(vec![
                d.owner.name.clone(),
                d.owner.pid.to_string(),
                d.state.clone(),
                i.access.into(),
                mode_word(i.spec.as_ref()).into(),
                i.name.clone(),
                status,
            ]);
        }
    }
    print!(
        "{}",
        table::render(
            &["VM", "PID", "STATE", "ACCESS", "MODE", "RESOURCE", "STATUS"],
            &rows
        )
    );
}

/// One line per VM: the verdict, and per resource held elsewhere or failing, why.
pub fn print_verdicts(reports: &[VmReport]) {
    for r in reports {
        let name = escape(&r.domain.owner.name);
        let held = r
            .items
            .iter()
            .filter(|i| i.holding == Holding::Protected)
            .count();
        let lockable = r.items.iter().filter(|i| i.spec.is_some()).count();
        let line = match r.verdict() {
            "protected" => format!("{name}: protected ({held} of {lockable} held)"),
            "paused" => format!(
                "{name}: paused (libvirt holds no leases for a paused VM; resuming it takes them)"
            ),
            "unprotected" => format!(
                "{name}: UNPROTECTED (0 of {lockable} held); protect it with `lockwarden adopt \
                 {name}`"
            ),
            "partly-protected" => format!(
                "{name}: PARTLY PROTECTED ({held} of {lockable} held); protect it with \
                 `lockwarden adopt {name}`"
            ),
            "held-elsewhere" => format!(
                "{name}: HELD ELSEWHERE: another VM or lock manager holds a disk this running \
                 VM uses; find out who writes to it before anything else"
            ),
            _ => format!("{name}: ERROR: this VM could not be checked"),
        };
        println!("{line}");
        if let Some(p) = &r.problem {
            println!("  {}", escape(p));
        }
        for i in &r.items {
            if i.holding.elsewhere() || matches!(i.holding, Holding::Error(_)) {
                println!("  {}: {}", escape(&i.name), escape(&i.holding.detail()));
            }
        }
    }
}

/// Read the status files and audit every domain.
pub fn collect(cli: &Cli) -> Result<(Context, Vec<VmReport>, Vec<String>), String> {
    let ctx = Context::load(cli)?;
    let (domains, errors) = running::domains(&cli.status_dir)?;
    let reports = domains.iter().map(|d| examine(&ctx, d)).collect();
    Ok((ctx, reports, errors))
}

pub fn run(cli: &Cli) -> u8 {
    let (ctx, reports, errors) = match collect(cli) {
        Ok(x) => x,
        Err(e) => {
            if cli.json {
                print_json(&json!({ "error": e }));
            } else {
                eprintln!("lockwarden: {e}");
            }
            return EXIT_DAEMON;
        }
    };
    let all_fine = reports.iter().all(VmReport::fine);
    let daemon_error = ctx.leases.as_ref().err().map(|e| {
        format!(
            "{e}; without lockwardend's lease list only holder records on the storage were \
             consulted"
        )
    });
    if cli.json {
        print_json(&json!({
            "host": ctx.host,
            "status_dir": cli.status_dir.display().to_string(),
            "protected": all_fine && errors.is_empty() && daemon_error.is_none(),
            "daemon_error": daemon_error,
            "status_file_errors": errors,
            "vms": reports.iter().map(vm_json).collect::<Vec<_>>(),
        }));
    } else {
        if reports.is_empty() {
            println!(
                "no QEMU domain runs on this host (no status file in {})",
                cli.status_dir.display()
            );
        } else {
            print_table(&reports);
            println!();
            print_verdicts(&reports);
        }
        for e in &errors {
            eprintln!("lockwarden: {}", escape(e));
        }
        if let Some(e) = &daemon_error {
            eprintln!("lockwarden: {}", escape(e));
        }
    }
    if daemon_error.is_some() || !errors.is_empty() {
        EXIT_DAEMON
    } else if all_fine {
        EXIT_OK
    } else {
        EXIT_PROBLEM
    }
}
