//! `drvAddResource`: turning a libvirt `<disk>` or `<lease>` into a [`LeaseSpec`].
//!
//! Disks (docs/interfaces.md §1-§2 and §6), in lockd's order:
//! 1. a `/dev` path with `lvm_lockspace_dir` set: the LV UUID from `lvs` names a lock file there;
//! 2. a `/dev` path with `scsi_lockspace_dir` set: the WWID from `scsi_id` does;
//!    (for both, a tool that runs but fails falls through to the next rule; a tool that cannot
//!    be run at all is an error);
//! 3. `file_lockspace_dir` set: the lower-case hex SHA-256 of the exact path bytes;
//! 4. otherwise the image itself is locked (direct mode).
//!
//! Read-only disks take a shared lease (`readonly_disks = "shared"`, default) or are skipped
//! (`"ignore"`, lockd's behaviour); `<shareable/>` disks take a shared lease. With
//! `auto_disk_leases = 0` no disk is recorded, but read/write exclusive ones are counted for
//! `require_lease_for_disks`.
//!
//! Leases (`<lease>`): key = the resource name, params `path` (required), `offset` (must be 0),
//! `lockspace` (optional). The lock file is `<path>/<lockspace>/<key>` (lockd's naming) or
//! `<path>/<key>`; its directory must already exist.

use super::error::PluginError;
use super::manager::Manager;
use super::params::{Param, Value, lookup, show, wrong_type};
use super::tool::{self, ToolOutcome};
use crate::abi;
use crate::naming::sha256_hex;
use crate::plugin_conf::{ReadonlyDisks, Settings};
use crate::protocol::{LeaseMode, LeaseSpec, LockTarget, ResourceKind};
use std::time::Duration;

/// Linux `PATH_MAX`, including the terminating NUL: a path of this many bytes or more cannot be
/// opened.
pub const PATH_MAX: usize = 4096;

/// `lvs`, as lockd runs it.
pub const LVS: &str = "/sbin/lvs";
/// `scsi_id`, as lockd runs it.
pub const SCSI_ID: &str = "/lib/udev/scsi_id";

const DISK: u32 = abi::virLockManagerResourceType_VIR_LOCK_MANAGER_RESOURCE_TYPE_DISK;
const LEASE: u32 = abi::virLockManagerResourceType_VIR_LOCK_MANAGER_RESOURCE_TYPE_LEASE;
const READONLY: u32 = abi::virLockManagerResourceFlags_VIR_LOCK_MANAGER_RESOURCE_READONLY;
const SHARED: u32 = abi::virLockManagerResourceFlags_VIR_LOCK_MANAGER_RESOURCE_SHARED;

/// Add one resource to `manager`. On error `manager` is unchanged.
pub fn add(
    settings: &Settings,
    manager: &mut Manager,
    rtype: u32,
    name: Option<&[u8]>,
    params: &[Param],
    flags: u32,
) -> Result<(), PluginError> {
    let vm = manager.vm_label();
    match rtype {
        DISK => add_disk(settings, manager, &vm, name, flags),
        LEASE => add_lease(manager, &vm, name, params, flags),
        other => Err(PluginError::invalid(format!(
            "drvAddResource for VM {vm}: unknown resource type {other} (this plugin knows disk = \
             {DISK} and lease = {LEASE}); upgrade lockwarden to match libvirt"
        ))),
    }
}

fn check_flags(vm: &str, what: &str, flags: u32) -> Result<(), PluginError> {
    let unknown = flags & !(READONLY | SHARED);
    if unknown != 0 {
        return Err(PluginError::invalid(format!(
            "drvAddResource for VM {vm}: unsupported flags 0x{unknown:x} for {what}; upgrade \
             lockwarden to match libvirt"
        )));
    }
    Ok(())
}

/// Check a path libvirt gave us: present, non-empty, absolute, shorter than PATH_MAX, UTF-8.
pub fn check_path(vm: &str, what: &str, path: Option<&[u8]>) -> Result<String, PluginError> {
    let Some(bytes) = path else {
        return Err(PluginError::invalid(format!(
            "drvAddResource for VM {vm}: the {what} path is a NULL pointer"
        )));
    };
    let fail = |why: String| {
        Err(PluginError::config(format!(
            "cannot lock the {what} {} of VM {vm}: {why}",
            show(bytes)
        )))
    };
    if bytes.is_empty() {
        return Err(PluginError::config(format!(
            "cannot lock a {what} of VM {vm}: the path is empty; give the {what} a source path \
             in the domain XML"
        )));
    }
    if bytes.len() >= PATH_MAX {
        return fail(format!(
            "the path is {} bytes long, more than PATH_MAX ({PATH_MAX}) allows; use a shorter \
             path",
            bytes.len()
        ));
    }
    if bytes.first() != Some(&b'/') {
        return fail("the path is relative; use an absolute path in the domain XML".into());
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.to_string()),
        Err(_) => fail(
            "the path is not valid UTF-8, which lockwarden cannot pass to lockwardend; rename \
             the image"
                .into(),
        ),
    }
}

fn mode_for(flags: u32) -> LeaseMode {
    if flags & (READONLY | SHARED) != 0 {
        LeaseMode::Shared
    } else {
        LeaseMode::Exclusive
    }
}

fn add_disk(
    settings: &Settings,
    manager: &mut Manager,
    vm: &str,
    name: Option<&[u8]>,
    flags: u32,
) -> Result<(), PluginError> {
    check_flags(vm, "a disk", flags)?;
    let path = check_path(vm, "disk", name)?;
    let readonly = flags & READONLY != 0;
    if readonly && settings.readonly_disks == ReadonlyDisks::Ignore {
        return Ok(());
    }
    let mode = mode_for(flags);
    let rw_exclusive = mode == LeaseMode::Exclusive;
    if !settings.auto_disk_leases {
        if rw_exclusive {
            manager.rw_disks += 1;
        }
        return Ok(());
    }
    let target = disk_target(settings, vm, &path)?;
    if rw_exclusive {
        manager.rw_disks += 1;
    }
    manager.leases.push(LeaseSpec {
        name: path,
        kind: ResourceKind::Disk,
        mode,
        target,
    });
    Ok(())
}

/// Which file locks the disk at `path`.
fn disk_target(settings: &Settings, vm: &str, path: &str) -> Result<LockTarget, PluginError> {
    let timeout = Duration::from_millis(u64::from(settings.request_timeout_ms));
    if path.starts_with("/dev") {
        if let Some(dir) = &settings.lvm_lockspace_dir {
            let args = [
                "--noheadings",
                "--unbuffered",
                "--nosuffix",
                "--options",
                "uuid",
                path,
            ];
            if let Some(uuid) = tool_name(vm, path, LVS, &args, timeout, "lvm_lockspace_dir")? {
                return Ok(LockTarget::Lockspace {
                    dir: dir.clone(),
                    file: uuid,
                    create_dir: true,
                });
            }
        }
        if let Some(dir) = &settings.scsi_lockspace_dir {
            let args = ["--replace-whitespace", "--whitelisted", "--device", path];
            if let Some(wwid) = tool_name(vm, path, SCSI_ID, &args, timeout, "scsi_lockspace_dir")?
            {
                return Ok(LockTarget::Lockspace {
                    dir: dir.clone(),
                    file: wwid,
                    create_dir: true,
                });
            }
        }
    }
    if let Some(dir) = &settings.file_lockspace_dir {
        return Ok(LockTarget::Lockspace {
            dir: dir.clone(),
            file: sha256_hex(path),
            create_dir: true,
        });
    }
    Ok(LockTarget::File {
        path: path.to_string(),
    })
}

/// Run a naming tool: `Some(name)` on success with usable output, `None` to fall through.
fn tool_name(
    vm: &str,
    path: &str,
    program: &str,
    args: &[&str],
    timeout: Duration,
    key: &str,
) -> Result<Option<String>, PluginError> {
    match tool::run(program, args, timeout) {
        Ok(ToolOutcome::Success(out)) => Ok(lock_name_from_output(&out)),
        Ok(ToolOutcome::Failed(_)) => Ok(None),
        Err(e) => Err(PluginError::internal(format!(
            "cannot lock the disk {} of VM {vm}: {key} is set, so lockwarden runs {program} to \
             name the lock, but {e}; install the tool or unset {key}",
            show(path.as_bytes())
        ))),
    }
}

/// Trim the tool's output the way lockd does (leading blanks, the line end) and accept it only
/// when it is one usable file name.
pub fn lock_name_from_output(out: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(out).ok()?;
    let name = text.trim_start_matches([' ', '\t']);
    let name = name.split('\n').next().unwrap_or_default().trim_end();
    if valid_file_name(name) {
        Some(name.to_string())
    } else {
        None
    }
}

/// One path component: non-empty, no '/', not "." or "..".
fn valid_file_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')
}

fn add_lease(
    manager: &mut Manager,
    vm: &str,
    name: Option<&[u8]>,
    params: &[Param],
    flags: u32,
) -> Result<(), PluginError> {
    check_flags(vm, "a lease", flags)?;
    let ctx = format!("drvAddResource for VM {vm}");
    let Some(key_bytes) = name else {
        return Err(PluginError::invalid(format!(
            "{ctx}: the lease key is a NULL pointer"
        )));
    };
    let key = match std::str::from_utf8(key_bytes) {
        Ok(k) if valid_file_name(k) => k.to_string(),
        _ => {
            return Err(PluginError::config(format!(
                "cannot lock the lease {} of VM {vm}: a lease key must be a plain file name (not \
                 empty, no '/', not '.' or '..', UTF-8); fix <key> in the domain XML",
                show(key_bytes)
            )));
        }
    };
    let what = format!("lease {}", show(key.as_bytes()));
    let ctx = format!("{ctx}, {what}");

    let path = match lookup(params, "path", &ctx)? {
        None => {
            return Err(PluginError::config(format!(
                "cannot lock the {what} of VM {vm}: it has no target path; add <target \
                 path='...'/> to the lease in the domain XML"
            )));
        }
        Some(Value::Str(p) | Value::CStr(p)) => check_path(vm, "lease directory", p.as_deref())?,
        Some(other) => return Err(wrong_type(&ctx, "path", other, "STRING")),
    };
    match lookup(params, "offset", &ctx)? {
        None | Some(Value::ULong(0)) => {}
        Some(Value::ULong(n)) => {
            return Err(PluginError::config(format!(
                "cannot lock the {what} of VM {vm}: offset {n} is not supported, lockwarden \
                 locks byte 0 of the lease file; remove offset='{n}' from the lease's <target> in \
                 the domain XML"
            )));
        }
        Some(other) => return Err(wrong_type(&ctx, "offset", other, "ULONG")),
    }
    let lockspace = match lookup(params, "lockspace", &ctx)? {
        None | Some(Value::Str(None) | Value::CStr(None)) => None,
        Some(Value::Str(Some(b)) | Value::CStr(Some(b))) => match std::str::from_utf8(b) {
            Ok(s) if valid_file_name(s) => Some(s.to_string()),
            _ => {
                return Err(PluginError::config(format!(
                    "cannot lock the {what} of VM {vm}: the lockspace {} must be a plain \
                     directory name (not empty, no '/', not '.' or '..'); fix <lockspace> in \
                     the domain XML",
                    show(b)
                )));
            }
        },
        Some(other) => return Err(wrong_type(&ctx, "lockspace", other, "STRING")),
    };
    let base = path.trim_end_matches('/');
    let dir = match lockspace {
        Some(ls) => format!("{base}/{ls}"),
        None if base.is_empty() => "/".to_string(),
        None => base.to_string(),
    };
    manager.leases.push(LeaseSpec {
        name: key.clone(),
        kind: ResourceKind::Lease,
        mode: mode_for(flags),
        target: LockTarget::Lockspace {
            dir,
            file: key,
            create_dir: false,
        },
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Owner;
    use std::path::PathBuf;

    fn settings() -> Settings {
        Settings::defaults(PathBuf::from("/run/lockwarden/lockwardend.sock"))
    }

    fn manager() -> Manager {
        Manager::new(Owner {
            uuid: "c7a5fdbd-cdaf-9455-926a-d65c16db1809".into(),
            name: "web1".into(),
            id: 1,
            pid: 42,
        })
    }

    fn lease_params(path: &str, offset: u64, ls: Option<&str>) -> Vec<Param> {
        let mut p = vec![
            Param::new("path", Value::Str(Some(path.as_bytes().to_vec()))),
            Param::new("offset", Value::ULong(offset)),
        ];
        if let Some(ls) = ls {
            p.push(Param::new(
                "lockspace",
                Value::Str(Some(ls.as_bytes().to_vec())),
            ));
        }
        p
    }

    #[test]
    fn direct_disk_modes() {
        let s = settings();
        let mut m = manager();
        add(&s, &mut m, DISK, Some(b"/img/a b\n.qcow2"), &[], 0).unwrap();
        add(&s, &mut m, DISK, Some(b"/img/ro.iso"), &[], READONLY).unwrap();
        add(&s, &mut m, DISK, Some(b"/img/sh.raw"), &[], SHARED).unwrap();
        assert_eq!(m.leases.len(), 3);
        assert_eq!(m.rw_disks, 1);
        assert_eq!(m.leases[0].mode, LeaseMode::Exclusive);
        assert_eq!(
            m.leases[0].target,
            LockTarget::File {
                path: "/img/a b\n.qcow2".into()
            }
        );
        assert_eq!(m.leases[0].kind, ResourceKind::Disk);
        assert_eq!(m.leases[1].mode, LeaseMode::Shared);
        assert_eq!(m.leases[2].mode, LeaseMode::Shared);
    }

    #[test]
    fn readonly_ignore_and_auto_off() {
        let mut s = settings();
        s.readonly_disks = ReadonlyDisks::Ignore;
        let mut m = manager();
        add(&s, &mut m, DISK, Some(b"/img/ro.iso"), &[], READONLY).unwrap();
        assert!(m.leases.is_empty());
        s.auto_disk_leases = false;
        add(&s, &mut m, DISK, Some(b"/img/rw.qcow2"), &[], 0).unwrap();
        add(&s, &mut m, DISK, Some(b"/img/sh.qcow2"), &[], SHARED).unwrap();
        assert!(m.leases.is_empty());
        assert_eq!(m.rw_disks, 1);
    }

    #[test]
    fn lockspace_dir_uses_sha256_of_path() {
        let mut s = settings();
        s.file_lockspace_dir = Some("/var/lib/libvirt/lockd/files".into());
        let mut m = manager();
        add(&s, &mut m, DISK, Some(b"/img/a.qcow2"), &[], 0).unwrap();
        assert_eq!(
            m.leases[0].target,
            LockTarget::Lockspace {
                dir: "/var/lib/libvirt/lockd/files".into(),
                file: sha256_hex("/img/a.qcow2"),
                create_dir: true,
            }
        );
        // Known vector: sha256("abc").
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    // What happens when lvs / scsi_id succeed, fail or are missing is tested with fake tools
    // in tests/safety_claims.rs (lvm_* and scsi_*), deterministically: a unit test here could
    // only check whatever /sbin/lvs this machine happens to have.

    #[test]
    fn tool_output_parsing() {
        assert_eq!(
            lock_name_from_output(b"  06UgP5-2rhb-aaaa\n").as_deref(),
            Some("06UgP5-2rhb-aaaa")
        );
        assert_eq!(lock_name_from_output(b"\n"), None);
        assert_eq!(lock_name_from_output(b"../x\n"), None);
        assert_eq!(lock_name_from_output(b".."), None);
    }

    #[test]
    fn bad_disks() {
        let s = settings();
        let mut m = manager();
        let long = format!("/{}", "a".repeat(5000));
        for (name, flags, rtype, want) in [
            (None, 0, DISK, "NULL pointer"),
            (Some(&b""[..]), 0, DISK, "path is empty"),
            (Some(&b"img/a.qcow2"[..]), 0, DISK, "relative"),
            (Some(long.as_bytes()), 0, DISK, "PATH_MAX"),
            (Some(&b"/img/\xff"[..]), 0, DISK, "UTF-8"),
            (Some(&b"/img/a"[..]), 4, DISK, "unsupported flags 0x4"),
            (Some(&b"/img/a"[..]), 0, 7, "unknown resource type 7"),
        ] {
            let e = add(&s, &mut m, rtype, name, &[], flags).unwrap_err();
            assert!(e.message.contains(want), "{} vs {want}", e.message);
            assert!(e.message.contains("'web1'"), "{}", e.message);
        }
        assert!(m.leases.is_empty());
        assert_eq!(m.rw_disks, 0);
    }

    #[test]
    fn path_max_boundary() {
        let s = settings();
        let mut m = manager();
        let longest = format!("/{}", "a".repeat(PATH_MAX - 2));
        assert_eq!(longest.len(), PATH_MAX - 1);
        add(&s, &mut m, DISK, Some(longest.as_bytes()), &[], 0).unwrap();
        let too_long = format!("{longest}b");
        let e = add(&s, &mut m, DISK, Some(too_long.as_bytes()), &[], 0).unwrap_err();
        assert!(e.message.contains("4096 bytes long"), "{e}");
        assert_eq!(m.leases.len(), 1);
    }

    #[test]
    fn leases() {
        let s = settings();
        let mut m = manager();
        add(
            &s,
            &mut m,
            LEASE,
            Some(b"key1"),
            &lease_params("/var/lib/leases/", 0, Some("ls")),
            0,
        )
        .unwrap();
        let mut p = lease_params("/var/lib/leases", 0, None);
        p.truncate(1); // offset is optional
        add(&s, &mut m, LEASE, Some(b"key2"), &p, 0).unwrap();
        assert_eq!(
            m.leases[0],
            LeaseSpec {
                name: "key1".into(),
                kind: ResourceKind::Lease,
                mode: LeaseMode::Exclusive,
                target: LockTarget::Lockspace {
                    dir: "/var/lib/leases/ls".into(),
                    file: "key1".into(),
                    create_dir: false
                }
            }
        );
        assert_eq!(
            m.leases[1].target,
            LockTarget::Lockspace {
                dir: "/var/lib/leases".into(),
                file: "key2".into(),
                create_dir: false
            }
        );
        assert_eq!(m.rw_disks, 0);
    }

    #[test]
    fn bad_leases() {
        let s = settings();
        let mut m = manager();
        let ok = lease_params("/l", 0, Some("ls"));
        type Case<'a> = (Option<&'a [u8]>, Vec<Param>, &'a str);
        let cases: Vec<Case> = vec![
            (None, ok.clone(), "NULL pointer"),
            (Some(b"a/b"), ok.clone(), "plain file name"),
            (Some(b".."), ok.clone(), "plain file name"),
            (Some(b""), ok.clone(), "plain file name"),
            (Some(b"k"), vec![], "no target path"),
            (Some(b"k"), lease_params("/l", 512, None), "offset 512"),
            (Some(b"k"), lease_params("rel", 0, None), "relative"),
            (Some(b"k"), lease_params("/l", 0, Some("../x")), "lockspace"),
            (
                Some(b"k"),
                vec![Param::new("path", Value::UInt(3))],
                "'path' has type UINT",
            ),
            (
                Some(b"k"),
                vec![
                    Param::new("path", Value::Str(Some(b"/l".to_vec()))),
                    Param::new("offset", Value::Int(0)),
                ],
                "'offset' has type INT",
            ),
            (
                Some(b"k"),
                vec![Param::new("path", Value::Str(None))],
                "NULL pointer",
            ),
        ];
        for (key, params, want) in cases {
            let e = add(&s, &mut m, LEASE, key, &params, 0).unwrap_err();
            assert!(e.message.contains(want), "{} vs {want}", e.message);
        }
        assert!(m.leases.is_empty());
        // Unknown params are ignored.
        let mut p = ok.clone();
        p.push(Param::new("future", Value::Double(2.0)));
        add(&s, &mut m, LEASE, Some(b"k"), &p, 0).unwrap();
        assert_eq!(m.leases.len(), 1);
    }
}
