//! `lockwarden doctor`: the checks that catch real outages before a VM start does.
//!
//! Each check yields a line `OK|WARN|FAIL  name  detail`; any FAIL makes the exit code 1.
//! The checks: the daemon answers; libvirt's qemu.conf selects lockwarden; the plugin config
//! parses; each configured lockspace directory exists and is a directory; NFS mounts with
//! `nolock` or `local_lock=` (which silently turn cross-host locks into host-local ones).

use super::{Cli, EXIT_OK, EXIT_PROBLEM, fetch_status, print_json, table};
use crate::config::ConfFile;
use serde::Serialize;
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
    let dirs = match lockspace_dirs(&cli.plugin_conf) {
        Ok(dirs) => {
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
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    checks.extend(nfs_mounts(&mounts));

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

/// The lockspace directories the plugin config names, as (key, dir).
fn lockspace_dirs(conf: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let s = crate::plugin::settings::Settings::load(Some(conf), crate::paths::default_socket())
        .map_err(|e| e.to_string())?;
    let dirs = [
        ("file_lockspace_dir", s.file_lockspace_dir),
        ("lvm_lockspace_dir", s.lvm_lockspace_dir),
        ("scsi_lockspace_dir", s.scsi_lockspace_dir),
    ];
    Ok(dirs
        .into_iter()
        .filter_map(|(k, d)| d.map(|d| (k.to_string(), PathBuf::from(d))))
        .collect())
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
            out.push(check(
                "nfs",
                Verdict::Ok,
                format!("{target} ({src}, {fstype}) forwards locks to the server"),
            ));
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

#[cfg(test)]
mod tests {
    use super::*;

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
