//! `drvAddResource`: turning a libvirt `<disk>` or `<lease>` into a [`LeaseSpec`].
//!
//! Which file locks a disk or lease, and every check of its name, is [`crate::naming`] (shared
//! with `lockwarden who` and `audit`, so they compute the same lock file); this module adds the
//! result to the operation's [`Manager`] and decodes a lease's parameters (`path`, `offset`,
//! `lockspace`, docs/interfaces.md §1-§2). The resource type and flags arrive decoded by
//! [`super::ffi`].

use super::error::{Code, PluginError};
use super::manager::Manager;
use super::params::{Param, Value, lookup, show, wrong_type};
use crate::naming::{self, Fault, NameError};
use crate::plugin_conf::Settings;

/// What libvirt asks to lock (`virLockManagerResourceType`, decoded by `ffi.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceType {
    /// A `<disk>`: its name is the source path.
    Disk,
    /// A `<lease>`: its name is the key, its parameters say where the lease file is.
    Lease,
}

/// `virLockManagerResourceFlags`, decoded by `ffi.rs` (unknown bits are refused there).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResourceFlags {
    /// `VIR_LOCK_MANAGER_RESOURCE_READONLY`: a `<readonly/>` disk.
    pub readonly: bool,
    /// `VIR_LOCK_MANAGER_RESOURCE_SHARED`: a `<shareable/>` disk.
    pub shared: bool,
}

impl From<NameError> for PluginError {
    fn from(e: NameError) -> PluginError {
        let code = match e.fault {
            Fault::Invalid => Code::Invalid,
            Fault::Config => Code::Config,
            Fault::Internal => Code::Internal,
        };
        PluginError::new(code, e.message)
    }
}

/// Add one resource to `manager`. On error `manager` is unchanged.
pub fn add(
    settings: &Settings,
    manager: &mut Manager,
    rtype: ResourceType,
    name: Option<&[u8]>,
    params: &[Param],
    flags: ResourceFlags,
) -> Result<(), PluginError> {
    let vm = manager.vm_label();
    match rtype {
        ResourceType::Disk => {
            let disk = naming::disk(settings, &vm, name, flags.readonly, flags.shared)?;
            if disk.rw_exclusive {
                manager.rw_disks += 1;
            }
            manager.leases.extend(disk.lease);
            Ok(())
        }
        ResourceType::Lease => add_lease(manager, &vm, name, params, flags),
    }
}

fn add_lease(
    manager: &mut Manager,
    vm: &str,
    name: Option<&[u8]>,
    params: &[Param],
    flags: ResourceFlags,
) -> Result<(), PluginError> {
    let key = naming::lease_key(vm, name)?;
    let ctx = format!("drvAddResource for VM {vm}, lease {}", show(key.as_bytes()));
    let path = match lookup(params, "path", &ctx)? {
        None => return Err(naming::lease_without_path(vm, &key).into()),
        Some(Value::Str(p) | Value::CStr(p)) => {
            naming::check_path(vm, "lease directory", p.as_deref())?
        }
        Some(other) => return Err(wrong_type(&ctx, "path", other, "STRING")),
    };
    match lookup(params, "offset", &ctx)? {
        None => {}
        Some(Value::ULong(n)) => naming::lease_offset(vm, &key, *n)?,
        Some(other) => return Err(wrong_type(&ctx, "offset", other, "ULONG")),
    }
    let lockspace = match lookup(params, "lockspace", &ctx)? {
        None | Some(Value::Str(None) | Value::CStr(None)) => None,
        Some(Value::Str(Some(b)) | Value::CStr(Some(b))) => {
            Some(naming::lease_lockspace(vm, &key, b)?)
        }
        Some(other) => return Err(wrong_type(&ctx, "lockspace", other, "STRING")),
    };
    let mode = naming::mode(flags.readonly, flags.shared);
    manager
        .leases
        .push(naming::lease_spec(key, &path, lockspace.as_deref(), mode));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::naming::{PATH_MAX, sha256_hex};
    use crate::plugin_conf::ReadonlyDisks;
    use crate::protocol::{LeaseMode, LeaseSpec, LockTarget, Owner, ResourceKind};

    const DISK: ResourceType = ResourceType::Disk;
    const LEASE: ResourceType = ResourceType::Lease;
    const NONE: ResourceFlags = ResourceFlags {
        readonly: false,
        shared: false,
    };
    const READONLY: ResourceFlags = ResourceFlags {
        readonly: true,
        shared: false,
    };
    const SHARED: ResourceFlags = ResourceFlags {
        readonly: false,
        shared: true,
    };
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
        add(&s, &mut m, DISK, Some(b"/img/a b\n.qcow2"), &[], NONE).unwrap();
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
        add(&s, &mut m, DISK, Some(b"/img/rw.qcow2"), &[], NONE).unwrap();
        add(&s, &mut m, DISK, Some(b"/img/sh.qcow2"), &[], SHARED).unwrap();
        assert!(m.leases.is_empty());
        assert_eq!(m.rw_disks, 1);
    }

    #[test]
    fn lockspace_dir_uses_sha256_of_path() {
        let mut s = settings();
        s.file_lockspace_dir = Some("/var/lib/libvirt/lockd/files".into());
        let mut m = manager();
        add(&s, &mut m, DISK, Some(b"/img/a.qcow2"), &[], NONE).unwrap();
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
    // in tests/safety_claims.rs (lvm_* and scsi_*); the naming rules in crate::naming.

    #[test]
    fn bad_disks() {
        let s = settings();
        let mut m = manager();
        let long = format!("/{}", "a".repeat(5000));
        // Unknown resource types and flags are refused in ffi.rs (decode_resource).
        for (name, want) in [
            (None, "NULL pointer"),
            (Some(&b""[..]), "path is empty"),
            (Some(&b"img/a.qcow2"[..]), "relative"),
            (Some(long.as_bytes()), "PATH_MAX"),
            (Some(&b"/img/\xff"[..]), "UTF-8"),
        ] {
            let e = add(&s, &mut m, DISK, name, &[], NONE).unwrap_err();
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
        add(&s, &mut m, DISK, Some(longest.as_bytes()), &[], NONE).unwrap();
        let too_long = format!("{longest}b");
        let e = add(&s, &mut m, DISK, Some(too_long.as_bytes()), &[], NONE).unwrap_err();
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
            NONE,
        )
        .unwrap();
        let mut p = lease_params("/var/lib/leases", 0, None);
        p.truncate(1); // offset is optional
        add(&s, &mut m, LEASE, Some(b"key2"), &p, NONE).unwrap();
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
            let e = add(&s, &mut m, LEASE, key, &params, NONE).unwrap_err();
            assert!(e.message.contains(want), "{} vs {want}", e.message);
        }
        assert!(m.leases.is_empty());
        // Unknown params are ignored.
        let mut p = ok.clone();
        p.push(Param::new("future", Value::Double(2.0)));
        add(&s, &mut m, LEASE, Some(b"k"), &p, NONE).unwrap();
        assert_eq!(m.leases.len(), 1);
    }
}
