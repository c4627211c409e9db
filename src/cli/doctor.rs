//! `lockwarden doctor`: the checks that catch real outages before a VM start does.
//!
//! Each check yields a line `OK|WARN|FAIL  name  detail`; any FAIL makes the exit code 1.
//! The checks: the daemon answers; libvirt's qemu.conf selects lockwarden; the plugin config
//! parses; each configured lockspace directory exists and is a directory; NFS mounts with
//! `nolock` or `local_lock=` (which silently turn cross-host locks into host-local ones); the
//! plugin config differing from the one other hosts published in a shared lockspace.
//!
//! Cross-host config comparison: doctor writes this host's lock-relevant plugin settings to
//! `<lockspace>/.lockwarden/config/<host>.json` (unless `--no-publish`) and compares them with
//! every other host's file there (format in docs/holders.md). The mount table is read through
//! [`mount_table`] only, so a test can point it at a file (`--mounts`, `LOCKWARDEN_MOUNTS_FILE`).

use super::{Cli, EXIT_OK, EXIT_PROBLEM, fetch_status, print_json, table};
use crate::config::ConfFile;
use crate::plugin_conf::{ReadonlyDisks, Settings};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

/// Outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

/// One check's result.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub verdict: Verdict,
    pub detail: String,
}

fn check(name: &str, verdict: Verdict, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        verdict,
        detail: detail.into(),
    }
}

/// Run every check and print the report.
pub fn run(cli: &Cli) -> u8 {
    let mut checks = vec![daemon(cli), libvirt(&cli.qemu_conf)];
    let mut settings = None;
    let dirs = match load_settings(&cli.plugin_conf) {
        Ok(s) => {
            let dirs = lockspace_dirs(&s);
            settings = Some(s);
            let detail = if cli.plugin_conf.exists() {
                format!("{} parses", cli.plugin_conf.display())
            } else {
                format!(
                    "{} is absent: the plugin uses its defaults",
                    cli.plugin_conf.display()
                )
            };
            checks.push(check("plugin-config", Verdict::Ok, detail));
            dirs
        }
        Err(e) => {
            checks.push(check("plugin-config", Verdict::Fail, e));
            Vec::new()
        }
    };
    for (key, dir) in &dirs {
        checks.push(lockspace(key, dir));
        if let (Some(s), true) = (&settings, dir.is_dir()) {
            let mine = PublishedConfig::of(s, key, dir);
            checks.push(cluster_config(&mine, dir, !cli.no_publish));
        }
    }
    match mount_table(cli) {
        Ok(mounts) => {
            checks.extend(nfs_mounts(&mounts));
            checks.extend(partition_checks(cli, &mounts));
            checks.push(watchdog_check(cli, &mounts));
        }
        Err(e) => checks.push(check("nfs", Verdict::Warn, e)),
    }

    let failed = checks.iter().any(|c| c.verdict == Verdict::Fail);
    if cli.json {
        print_json(&serde_json::json!({ "ok": !failed, "checks": checks }));
    } else {
        let rows: Vec<Vec<String>> = checks
            .iter()
            .map(|c| {
                let v = match c.verdict {
                    Verdict::Ok => "OK",
                    Verdict::Warn => "WARN",
                    Verdict::Fail => "FAIL",
                };
                vec![v.into(), c.name.clone(), c.detail.clone()]
            })
            .collect();
        print!("{}", table::render(&["RESULT", "CHECK", "DETAIL"], &rows));
    }
    if failed { EXIT_PROBLEM } else { EXIT_OK }
}

fn daemon(cli: &Cli) -> Check {
    match fetch_status(cli) {
        Ok(s) => check(
            "daemon",
            Verdict::Ok,
            format!(
                "lockwardend {} (pid {}) answers on {}: {} leases, {} owners",
                s.version,
                s.pid,
                cli.admin_socket.display(),
                s.leases,
                s.owners
            ),
        ),
        Err(e) => check("daemon", Verdict::Fail, e),
    }
}

/// Does qemu.conf select lockwarden?
pub fn libvirt(qemu_conf: &Path) -> Check {
    let text = match std::fs::read_to_string(qemu_conf) {
        Ok(t) => t,
        Err(e) => {
            return check(
                "libvirt",
                Verdict::Fail,
                format!("cannot read {}: {e}", qemu_conf.display()),
            );
        }
    };
    let mut conf = match ConfFile::parse(qemu_conf, &text) {
        Ok(c) => c,
        Err(e) => return check("libvirt", Verdict::Fail, e.to_string()),
    };
    match conf.take_string("lock_manager") {
        Ok(Some(m)) if m == "lockwarden" => check(
            "libvirt",
            Verdict::Ok,
            format!("{} sets lock_manager = \"lockwarden\"", qemu_conf.display()),
        ),
        Ok(Some(m)) => check(
            "libvirt",
            Verdict::Fail,
            format!(
                "{} sets lock_manager = \"{m}\": set it to \"lockwarden\" and restart libvirtd",
                qemu_conf.display()
            ),
        ),
        Ok(None) => check(
            "libvirt",
            Verdict::Fail,
            format!(
                "{} does not set lock_manager, so VMs run unprotected: add lock_manager = \
                 \"lockwarden\" and restart libvirtd",
                qemu_conf.display()
            ),
        ),
        Err(e) => check("libvirt", Verdict::Fail, e.to_string()),
    }
}

fn load_settings(conf: &Path) -> Result<Settings, String> {
    Settings::load(Some(conf), crate::paths::default_socket()).map_err(|e| e.to_string())
}

/// The lockspace directories the plugin config names, as (key, dir).
fn lockspace_dirs(s: &Settings) -> Vec<(String, PathBuf)> {
    let dirs = [
        ("file_lockspace_dir", &s.file_lockspace_dir),
        ("lvm_lockspace_dir", &s.lvm_lockspace_dir),
        ("scsi_lockspace_dir", &s.scsi_lockspace_dir),
    ];
    dirs.into_iter()
        .filter_map(|(k, d)| d.as_ref().map(|d| (k.to_string(), PathBuf::from(d))))
        .collect()
}

/// The mount table doctor checks: `--mounts FILE`, else `$LOCKWARDEN_MOUNTS_FILE`, else
/// `/proc/self/mounts`. The one place the mount table is read.
pub fn mount_table(cli: &Cli) -> Result<String, String> {
    let path = cli
        .mounts
        .clone()
        .or_else(|| std::env::var_os("LOCKWARDEN_MOUNTS_FILE").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/proc/self/mounts"));
    std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read the mount table {}: {e}", path.display()))
}

/// The lock-relevant plugin settings one host published in a lockspace directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedConfig {
    /// Format version, 1.
    pub lockwarden_config: u32,
    pub host: String,
    /// Seconds since the epoch.
    pub published: u64,
    pub version: String,
    /// Which key names this directory on that host (`file_lockspace_dir`, ...).
    pub key: String,
    /// The directory's path on that host (may differ between hosts; informational).
    pub dir: String,
    /// File-system type of the directory on that host.
    pub fs_type: String,
    pub auto_disk_leases: bool,
    pub require_lease_for_disks: bool,
    pub readonly_disks: String,
    pub file_lockspace: bool,
    pub lvm_lockspace: bool,
    pub scsi_lockspace: bool,
}

impl PublishedConfig {
    pub fn of(s: &Settings, key: &str, dir: &Path) -> PublishedConfig {
        PublishedConfig {
            lockwarden_config: 1,
            host: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "localhost".into()),
            published: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            version: env!("CARGO_PKG_VERSION").to_string(),
            key: key.to_string(),
            dir: dir.display().to_string(),
            fs_type: fs_type(dir).unwrap_or_else(|| "unknown".into()),
            auto_disk_leases: s.auto_disk_leases,
            require_lease_for_disks: s.require_lease_for_disks,
            readonly_disks: match s.readonly_disks {
                ReadonlyDisks::Shared => "shared".into(),
                ReadonlyDisks::Ignore => "ignore".into(),
            },
            file_lockspace: s.file_lockspace_dir.is_some(),
            lvm_lockspace: s.lvm_lockspace_dir.is_some(),
            scsi_lockspace: s.scsi_lockspace_dir.is_some(),
        }
    }

    /// The settings that differ, as "key: here X, there Y".
    pub fn differences(&self, other: &PublishedConfig) -> Vec<String> {
        let mut out = Vec::new();
        let mut cmp = |name: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{name}: here {a}, there {b}"));
            }
        };
        cmp("lockspace key", self.key.clone(), other.key.clone());
        cmp(
            "auto_disk_leases",
            self.auto_disk_leases.to_string(),
            other.auto_disk_leases.to_string(),
        );
        cmp(
            "require_lease_for_disks",
            self.require_lease_for_disks.to_string(),
            other.require_lease_for_disks.to_string(),
        );
        cmp(
            "readonly_disks",
            self.readonly_disks.clone(),
            other.readonly_disks.clone(),
        );
        cmp(
            "file_lockspace_dir set",
            self.file_lockspace.to_string(),
            other.file_lockspace.to_string(),
        );
        cmp(
            "lvm_lockspace_dir set",
            self.lvm_lockspace.to_string(),
            other.lvm_lockspace.to_string(),
        );
        cmp(
            "scsi_lockspace_dir set",
            self.scsi_lockspace.to_string(),
            other.scsi_lockspace.to_string(),
        );
        cmp(
            "file system type",
            self.fs_type.clone(),
            other.fs_type.clone(),
        );
        out
    }
}

/// `<dir>/.lockwarden/config`: one `<host>.json` per host (a directory of its own, so no
/// name can collide with a holder side file `<name>@<host>.json`).
fn config_dir(dir: &Path) -> PathBuf {
    dir.join(crate::holder_record::RECORD_DIR).join("config")
}

/// Publish `mine` as `<dir>/.lockwarden/config/<host>.json` (temp + rename, 0644).
fn publish_config(mine: &PublishedConfig, dir: &Path) -> Result<PathBuf, String> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let rdir = config_dir(dir);
    for d in [dir.join(crate::holder_record::RECORD_DIR), rdir.clone()] {
        match std::fs::symlink_metadata(&d) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("{} is not a directory", d.display())),
            Err(_) => std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&d)
                .map_err(|e| format!("cannot create {}: {e}", d.display()))?,
        }
    }
    let name = format!("{}.json", crate::holder_record::host_label(&mine.host));
    let path = rdir.join(&name);
    let tmp = rdir.join(format!("{name}.tmp{}", std::process::id()));
    let body = serde_json::to_vec_pretty(mine).map_err(|e| e.to_string())?;
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&body).and_then(|()| f.sync_data()))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot write {}: {e}", path.display()));
    }
    Ok(path)
}

/// The most host config files doctor reads from one lockspace, and the most bytes of each: the
/// directory is on shared storage, so its content is bounded like any untrusted input.
const MAX_CONFIGS: usize = 1024;
const MAX_CONFIG_BYTES: usize = 64 * 1024;

/// Every other host's published config in `<dir>/.lockwarden/config/`, with its file. The
/// directory is opened without following links and every file through
/// `untrusted::open_regular_at`: a FIFO, a device node or a link to `/dev/zero` planted there
/// is reported as unreadable, never opened for reading.
fn published_configs(dir: &Path, me: &str) -> Vec<(PathBuf, Result<PublishedConfig, String>)> {
    use crate::untrusted::{Access, open_regular_at, read_bounded};
    let rdir = config_dir(dir);
    let mine = format!("{}.json", crate::holder_record::host_label(me));
    let dflags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let Ok(dirfd) = nix::fcntl::open(rdir.as_path(), dflags, Mode::empty()) else {
        return Vec::new();
    };
    // List the directory that was opened, not the path again (it may have been swapped).
    let Ok(listing) = std::fs::read_dir(format!("/proc/self/fd/{}", dirfd.as_raw_fd())) else {
        return Vec::new();
    };
    let mut names: Vec<String> = listing
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".json") && *n != mine)
        .take(MAX_CONFIGS.saturating_mul(4))
        .collect();
    names.sort();
    names.truncate(MAX_CONFIGS);
    names
        .into_iter()
        .map(|n| {
            let parsed = open_regular_at(Some(dirfd.as_fd()), &n, Access::Read, None)
                .map_err(|e| e.describe())
                .and_then(|(fd, _, _)| {
                    read_bounded(fd.as_fd(), MAX_CONFIG_BYTES).map_err(|e| e.desc().to_string())
                })
                .and_then(|b| b.ok_or_else(|| format!("larger than {MAX_CONFIG_BYTES} bytes")))
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()));
            (rdir.join(&n), parsed)
        })
        .collect()
}

/// Compare this host's lock-relevant settings with those other hosts published in `dir`.
pub fn cluster_config(mine: &PublishedConfig, dir: &Path, publish: bool) -> Check {
    let name = format!("cluster-config:{}", mine.key);
    let mut notes = Vec::new();
    if publish {
        if let Err(e) = publish_config(mine, dir) {
            notes.push(format!("could not publish this host's config: {e}"));
        }
    }
    let others = published_configs(dir, &mine.host);
    let mut problems = Vec::new();
    let mut same = Vec::new();
    for (path, parsed) in &others {
        match parsed {
            Ok(other) => {
                let diff = mine.differences(other);
                if diff.is_empty() {
                    same.push(other.host.clone());
                } else {
                    problems.push(format!(
                        "plugin config differs from the one published by host {} ({}, \
                        published {}): {}",
                        other.host,
                        path.display(),
                        table::utc(other.published),
                        diff.join("; ")
                    ));
                }
            }
            Err(e) => notes.push(format!("unreadable {}: {e}", path.display())),
        }
    }
    if !problems.is_empty() {
        return check(
            &name,
            Verdict::Fail,
            format!(
                "{}; make qemu-lockwarden.conf agree on every host sharing {} (delete the file of \
                a host that is gone){}",
                problems.join("; "),
                dir.display(),
                notes.iter().map(|n| format!("; {n}")).collect::<String>()
            ),
        );
    }
    let head = if same.is_empty() {
        format!(
            "no other host has published its plugin config in {} yet (run lockwarden doctor on \
            each host)",
            dir.display()
        )
    } else {
        format!(
            "plugin config matches {} other host(s): {}",
            same.len(),
            same.join(", ")
        )
    };
    let verdict = if notes.is_empty() {
        Verdict::Ok
    } else {
        Verdict::Warn
    };
    check(
        &name,
        verdict,
        format!(
            "{head}{}",
            notes.iter().map(|n| format!("; {n}")).collect::<String>()
        ),
    )
}

fn lockspace(key: &str, dir: &Path) -> Check {
    let name = format!("lockspace:{key}");
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {
            let fs = fs_type(dir).unwrap_or_else(|| "unknown".into());
            check(
                &name,
                Verdict::Ok,
                format!("{} exists ({fs})", dir.display()),
            )
        }
        Ok(_) => check(
            &name,
            Verdict::Fail,
            format!("{} exists but is not a directory", dir.display()),
        ),
        Err(e) => check(
            &name,
            Verdict::Warn,
            format!(
                "{}: {e}; lockwardend creates it on first use, but on a cluster it must be the \
                 shared mount every host sees",
                dir.display()
            ),
        ),
    }
}

/// File-system type of the mount holding `path`, from statfs(2) magic numbers.
fn fs_type(path: &Path) -> Option<String> {
    let st = nix::sys::statfs::statfs(path).ok()?;
    let magic = st.filesystem_type().0 as u64;
    Some(
        match magic {
            0x6969 => "nfs",
            0xEF53 => "ext2/3/4",
            0x5846_5342 => "xfs",
            0x9123_683E => "btrfs",
            0x0102_1994 => "tmpfs",
            0x794C_7630 => "overlayfs",
            0x6573_5546 => "fuse",
            0xFF53_4D42 => "cifs",
            0x0102_1997 => "9p",
            other => return Some(format!("fs magic {other:#x}")),
        }
        .to_string(),
    )
}

/// What is risky, though not fatal for locking, in an NFS mount's options `opts`.
///
/// - `soft` without `softerr`: a request that times out fails with EIO, which is also what the
///   client reports for a lock the server dropped, so lockwardend must treat it as a lost lock
///   and act on the VM (docs/storage.md): a storage hiccup then stops VMs. `hard` (the default)
///   waits, `softerr` reports ETIMEDOUT, which lockwardend retries.
fn nfs_warnings(opts: &str) -> Vec<String> {
    let has = |o: &str| opts.split(',').any(|x| x == o);
    let mut w = Vec::new();
    if has("soft") && !has("softerr") {
        w.push(
            "it is mounted `soft`: a timeout there looks like a lost lock and stops the VMs on \
             it; mount it `hard` (the default) or `softerr`"
                .to_string(),
        );
    }
    w
}

/// NFS mounts whose options disable cross-host locking.
pub fn nfs_mounts(proc_mounts: &str) -> Vec<Check> {
    let mut out = Vec::new();
    for line in proc_mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(src), Some(target), Some(fstype), Some(opts)) =
            (fields.first(), fields.get(1), fields.get(2), fields.get(3))
        else {
            continue;
        };
        if !fstype.starts_with("nfs") {
            continue;
        }
        let bad: Vec<&str> = opts
            .split(',')
            .filter(|o| *o == "nolock" || o.starts_with("local_lock=") && *o != "local_lock=none")
            .collect();
        if bad.is_empty() {
            let warnings = nfs_warnings(opts);
            if warnings.is_empty() {
                out.push(check(
                    "nfs",
                    Verdict::Ok,
                    format!("{target} ({src}, {fstype}) forwards locks to the server"),
                ));
            } else {
                out.push(check(
                    "nfs",
                    Verdict::Warn,
                    format!(
                        "{target} ({src}, {fstype}) forwards locks to the server, but {}",
                        warnings.join("; and ")
                    ),
                ));
            }
        } else {
            out.push(check(
                "nfs",
                Verdict::Fail,
                format!(
                    "{target} ({src}) is mounted with {}: fcntl locks stay on this host, so other \
                     hosts are NOT kept off its disks; remount without it",
                    bad.join(",")
                ),
            ));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Partition safety (issue 15; docs/storage.md "Partitions", "Checking the inequality"): for each
// NFS mount, whether lockwardend's fence can come before the server's lease runs out.

/// Time the fence may take to stop a VM once `fence_after_ms` is over (event loop reaction,
/// signal delivery), as docs/storage.md assumes.
pub const STOP_BOUND_MS: u64 = 5_000;
/// Clock slack between host and server (rates under NTP, the server's own timing).
pub const CLOCK_SLACK_MS: u64 = 5_000;
/// The lease time of a Linux NFSv4 server by default, used when the real one is not readable.
pub const NFS4_DEFAULT_LEASE_S: u64 = 90;

/// A Linux NFS server's current NFSv4 lease time (only readable where the server runs).
const NFSD_LEASE_FILE: &str = "/proc/fs/nfsd/nfsv4leasetime";

/// The NFS version of a mount: `vers=`/`nfsvers=`, else 4 for type nfs4, else unknown.
fn nfs_version(fstype: &str, opts: &str) -> Option<String> {
    opts.split(',')
        .find_map(|o| {
            o.strip_prefix("vers=")
                .or_else(|| o.strip_prefix("nfsvers="))
        })
        .map(str::to_string)
        .or_else(|| (fstype == "nfs4").then(|| "4".to_string()))
}

/// Is the server of `source` (`host:/path`) this host? Then its lease file is readable here.
fn server_is_local(source: &str) -> bool {
    let host = source
        .rsplit_once(":/")
        .map(|(h, _)| h)
        .unwrap_or(source)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let me = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    host == "localhost"
        || host.starts_with("127.")
        || host == "::1"
        || (!me.is_empty() && host == me)
}

/// The storage's lease time in seconds and where it came from.
fn lease_time(source: &str) -> (u64, String) {
    if server_is_local(source) {
        if let Some(s) = std::fs::read_to_string(NFSD_LEASE_FILE)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
        {
            return (s, format!("read from this host's {NFSD_LEASE_FILE}"));
        }
    }
    (
        NFS4_DEFAULT_LEASE_S,
        "assumed: the Linux NFSv4 default; the server's own is not readable from here".into(),
    )
}

/// The daemon's `heartbeat_interval_ms` and `fence_after_ms`, from its status.
fn fence_settings(cli: &Cli) -> Result<(u64, u64), String> {
    let s = fetch_status(cli)?;
    match (s.heartbeat_interval_ms, s.fence_after_ms) {
        (Some(i), Some(f)) => Ok((i, f)),
        _ => Err(format!(
            "lockwardend {} does not report heartbeat_interval_ms and fence_after_ms (it \
             predates partition fencing)",
            s.version
        )),
    }
}

/// One `partition` check per NFS mount in `proc_mounts` (the table doctor reads).
pub fn partition_checks(cli: &Cli, proc_mounts: &str) -> Vec<Check> {
    let mut settings = None;
    let mut out = Vec::new();
    for line in proc_mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(src), Some(target), Some(fstype), Some(opts)) =
            (f.first(), f.get(1), f.get(2), f.get(3))
        else {
            continue;
        };
        if !fstype.starts_with("nfs") {
            continue;
        }
        let settings = settings.get_or_insert_with(|| fence_settings(cli));
        out.push(partition_check(src, target, fstype, opts, settings));
    }
    out
}

/// The partition check of one NFS mount, given the daemon's (interval, fence_after) in ms.
pub fn partition_check(
    src: &str,
    target: &str,
    fstype: &str,
    opts: &str,
    settings: &Result<(u64, u64), String>,
) -> Check {
    let opt = |k: &str| {
        opts.split(',')
            .find_map(|o| o.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
    };
    let has = |k: &str| opts.split(',').any(|o| o == k);
    let vers = nfs_version(fstype, opts);
    let mut facts = vec![format!("vers={}", vers.as_deref().unwrap_or("unknown"))];
    facts.push(if has("soft") { "soft" } else { "hard" }.to_string());
    for k in ["timeo", "retrans", "local_lock"] {
        if let Some(v) = opt(k) {
            facts.push(format!("{k}={v}"));
        }
    }
    let head = format!("{target} ({src}: {})", facts.join(", "));
    if vers
        .as_deref()
        .is_some_and(|v| v.starts_with('2') || v.starts_with('3'))
    {
        return check(
            "partition",
            Verdict::Ok,
            format!(
                "{head}: NFSv3 locks (NLM) have no client lease: the server keeps the locks of a \
                 host that died or is cut off until that host reboots or an administrator clears \
                 them (docs/operators.md, section 10), so no other host gets its disks meanwhile \
                 and fencing is not needed for safety here"
            ),
        );
    }
    let (interval, fence_after) = match settings {
        Ok(s) => *s,
        Err(e) => {
            return check(
                "partition",
                Verdict::Warn,
                format!(
                    "{head}: cannot learn lockwardend's heartbeat_interval_ms and fence_after_ms \
                     ({e}), so whether its VMs are stopped before the server's lease runs out is \
                     not checked"
                ),
            );
        }
    };
    let (lease_s, lease_from) = lease_time(src);
    let lease_ms = lease_s.saturating_mul(1000);
    if interval == 0 {
        return check(
            "partition",
            Verdict::Warn,
            format!(
                "{head}: heartbeat_interval_ms = 0 turns partition fencing off: if this host is \
                 cut off from the server for longer than its lease ({lease_s} s, {lease_from}), \
                 another host can take the disks while the VMs here still run; set \
                 heartbeat_interval_ms (docs/storage.md, \"Partitions\")"
            ),
        );
    }
    let need = fence_after
        .saturating_add(STOP_BOUND_MS)
        .saturating_add(CLOCK_SLACK_MS);
    let sum = format!(
        "fence_after_ms {fence_after} + time to stop {STOP_BOUND_MS} ms + clock slack \
         {CLOCK_SLACK_MS} ms = {need} ms"
    );
    if need >= lease_ms {
        return check(
            "partition",
            Verdict::Warn,
            format!(
                "{head}: {sum} is not below the server's lease of {lease_ms} ms ({lease_from}): \
                 a host cut off from the server may lose its locks to another host before its \
                 VMs are stopped; set fence_after_ms below {} (docs/storage.md, \"Partitions\")",
                lease_ms.saturating_sub(STOP_BOUND_MS + CLOCK_SLACK_MS)
            ),
        );
    }
    check(
        "partition",
        Verdict::Ok,
        format!(
            "{head}: {sum} < the server's lease of {lease_ms} ms ({lease_from}); heartbeat every \
             {interval} ms"
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// Watchdog (issue 15 item 3; docs/storage.md, "Watchdog"): without `watchdog_device`, a VM that
// cannot be stopped during a partition keeps running.

/// File system types lockwardend treats as host-local (no heartbeat, nothing to partition
/// from: docs/storage.md, "Partitions"); every other type holding a lease counts as network.
const LOCAL_FS: [&str; 8] = [
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "tmpfs", "overlay",
];

/// Undo the octal escapes of /proc/self/mounts (`\040` for a space).
fn unescape_mount_field(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut rest = s.as_bytes();
    while let Some((&c, tail)) = rest.split_first() {
        let octal = match tail {
            [a, b, d, ..] if c == b'\\' && [a, b, d].iter().all(|x| (b'0'..=b'7').contains(x)) => {
                let v = u32::from(a - b'0') * 64 + u32::from(b - b'0') * 8 + u32::from(d - b'0');
                u8::try_from(v).ok()
            }
            _ => None,
        };
        match octal {
            Some(v) => {
                out.push(v);
                rest = tail.get(3..).unwrap_or_default();
            }
            None => {
                out.push(c);
                rest = tail;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The type of the mount holding `path` in `proc_mounts` (the longest mount point that is a
/// prefix of it, on path-component boundaries).
fn fs_type_in(proc_mounts: &str, path: &str) -> Option<String> {
    let mut best: Option<(usize, String)> = None;
    for line in proc_mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(target), Some(fstype)) = (f.get(1), f.get(2)) else {
            continue;
        };
        let t = unescape_mount_field(target);
        let under = t == "/"
            || path == t
            || path
                .strip_prefix(t.as_str())
                .is_some_and(|r| r.starts_with('/'));
        if under && best.as_ref().is_none_or(|(n, _)| t.len() >= *n) {
            best = Some((t.len(), fstype.to_string()));
        }
    }
    best.map(|(_, t)| t)
}

/// One `watchdog` check: is a VM that cannot be stopped during a partition covered?
pub fn watchdog_check(cli: &Cli, proc_mounts: &str) -> Check {
    let status = match fetch_status(cli) {
        Ok(s) => s,
        Err(e) => {
            return check(
                "watchdog",
                Verdict::Warn,
                format!("cannot ask lockwardend whether it holds a watchdog: {e}"),
            );
        }
    };
    if let Some(dev) = status.watchdog_device {
        return check(
            "watchdog",
            Verdict::Ok,
            format!(
                "lockwardend feeds {} only while every VM it had to stop for a silent storage is                  stopped: a VM that cannot be stopped resets this host",
                crate::untrusted::escape(&dev)
            ),
        );
    }
    let leases = match super::fetch_leases(cli) {
        Ok(l) => l,
        Err(e) => {
            return check(
                "watchdog",
                Verdict::Warn,
                format!("no watchdog_device, and the leases cannot be listed: {e}"),
            );
        }
    };
    let mut network: Vec<String> = Vec::new();
    for l in &leases {
        let ty = fs_type_in(proc_mounts, &l.lock_path).unwrap_or_else(|| "unknown".into());
        if !LOCAL_FS.contains(&ty.as_str()) {
            let m = format!("{} ({ty})", crate::untrusted::escape(&l.lock_path));
            if !network.contains(&m) {
                network.push(m);
            }
        }
    }
    if network.is_empty() {
        return check(
            "watchdog",
            Verdict::Ok,
            "no watchdog_device; no lease is on network storage, so none can be cut off",
        );
    }
    let shown: Vec<&str> = network.iter().take(3).map(String::as_str).collect();
    check(
        "watchdog",
        Verdict::Warn,
        format!(
            "no watchdog_device, and {} lease(s) are on network storage ({}{}): a VM that \
             cannot be killed during a partition is not stopped; set watchdog_device \
             (docs/storage.md, \"Watchdog\")",
            network.len(),
            shown.join(", "),
            if network.len() > 3 { ", ..." } else { "" }
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_path_is_matched_to_its_mount() {
        let t = "/dev/sda1 / ext4 rw 0 0\nsrv:/e /var/lib/libvirt/images nfs4 rw 0 0\n\
                 srv:/f /mnt/with\\040space nfs rw 0 0\n";
        assert_eq!(
            fs_type_in(t, "/var/lib/libvirt/images/a.img").as_deref(),
            Some("nfs4")
        );
        assert_eq!(
            fs_type_in(t, "/var/lib/libvirt/imagesX/a").as_deref(),
            Some("ext4")
        );
        assert_eq!(fs_type_in(t, "/mnt/with space/d").as_deref(), Some("nfs"));
        assert_eq!(fs_type_in("", "/x"), None);
    }
    #[test]
    fn partition_check_reads_the_mount_and_the_inequality() {
        let s: Result<(u64, u64), String> = Ok((5000, 60000));
        let c = partition_check(
            "srv:/e",
            "/m",
            "nfs4",
            "rw,vers=4.2,hard,timeo=600,retrans=2",
            &s,
        );
        assert_eq!(c.verdict, Verdict::Ok, "{}", c.detail);
        assert!(c.detail.contains("timeo=600") && c.detail.contains("90000 ms"));
        let big: Result<(u64, u64), String> = Ok((5000, 85000));
        let c = partition_check("srv:/e", "/m", "nfs4", "rw,vers=4.2", &big);
        assert_eq!(c.verdict, Verdict::Warn, "{}", c.detail);
        assert!(
            c.detail.contains("set fence_after_ms below 80000"),
            "{}",
            c.detail
        );
        let c = partition_check("srv:/e", "/m", "nfs", "rw,vers=3", &big);
        assert_eq!(c.verdict, Verdict::Ok);
        assert!(c.detail.contains("until that host reboots"), "{}", c.detail);
        let off: Result<(u64, u64), String> = Ok((0, 60000));
        let c = partition_check("srv:/e", "/m", "nfs4", "rw", &off);
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(server_is_local("localhost:/x") && !server_is_local("nas1:/x"));
    }

    #[test]
    fn soft_nfs_mounts_are_warned_about() {
        let c = nfs_mounts("f:/a /a nfs4 rw,soft,nodev,vers=4.2 0 0\n");
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].verdict, Verdict::Warn);
        assert!(c[0].detail.contains("mounted `soft`"), "{}", c[0].detail);
        let c = nfs_mounts("f:/a /a nfs4 rw,soft,softerr 0 0\nf:/b /b nfs rw,hard 0 0\n");
        assert_eq!(c[0].verdict, Verdict::Ok, "{}", c[0].detail);
        assert_eq!(c[1].verdict, Verdict::Ok, "{}", c[1].detail);
    }

    #[test]
    fn nolock_and_local_lock_fail() {
        let mounts = "srv:/img /var/lib/libvirt/images nfs4 rw,vers=4.2,local_lock=none 0 0\n\
                      srv:/a /mnt/a nfs rw,vers=3,nolock 0 0\n\
                      srv:/b /mnt/b nfs rw,vers=3,local_lock=posix 0 0\n\
                      /dev/vda / ext4 rw 0 0\n";
        let checks = nfs_mounts(mounts);
        let verdicts: Vec<Verdict> = checks.iter().map(|c| c.verdict).collect();
        assert_eq!(verdicts, vec![Verdict::Ok, Verdict::Fail, Verdict::Fail]);
        assert!(checks[1].detail.contains("nolock"));
        assert!(checks[2].detail.contains("local_lock=posix"));
    }

    #[test]
    fn libvirt_check_reads_lock_manager() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qemu.conf");
        std::fs::write(&p, "user = \"root\"\nlock_manager = \"lockd\"\n").unwrap();
        let c = libvirt(&p);
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.detail.contains("\"lockd\""));
        std::fs::write(&p, "lock_manager = \"lockwarden\"\n").unwrap();
        assert_eq!(libvirt(&p).verdict, Verdict::Ok);
    }
}
