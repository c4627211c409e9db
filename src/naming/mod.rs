//! Lock-target naming shared by the plugin, the daemon and the CLI: which file locks a disk or
//! a `<lease>`, with the names lockd gives lock files, so one disk maps to the same file
//! whichever part computes it (the plugin's `drvAddResource`, `lockwarden who` and `audit`).
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
//! Leases (`<lease>`): key = the resource name, `path` (required), `offset` (must be 0),
//! `lockspace` (optional). The lock file is `<path>/<lockspace>/<key>` (lockd's naming) or
//! `<path>/<key>`; its directory must already exist.
//!
//! Errors say which VM and which disk; [`Fault`] tells the plugin which libvirt error code to
//! raise, the CLI only prints the message.

pub mod tool;

use crate::plugin_conf::{ReadonlyDisks, Settings};
use crate::protocol::{LeaseMode, LeaseSpec, LockTarget, ResourceKind};
use crate::text::show;
use sha2::{Digest, Sha256};
use std::time::Duration;
use tool::ToolOutcome;

/// Linux `PATH_MAX`, including the terminating NUL: a path of this many bytes or more cannot be
/// opened.
pub const PATH_MAX: usize = 4096;

/// `lvs`, as lockd runs it.
pub const LVS: &str = "/sbin/lvs";
/// `scsi_id`, as lockd runs it.
pub const SCSI_ID: &str = "/lib/udev/scsi_id";

/// The lower-case hex SHA-256 of the exact path bytes (lockd's lock file name).
pub fn sha256_hex(path: &str) -> String {
    let digest = Sha256::digest(path.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// What kind of mistake a naming error is (the plugin maps it to a libvirt error code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Bad arguments from the caller (a NULL name).
    Invalid,
    /// The domain XML or the settings cannot be served (relative path, bad lease key, ...).
    Config,
    /// Something on this host failed (a naming tool could not be run).
    Internal,
}

/// Why a disk or lease has no lock target: a complete sentence naming the VM and the resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameError {
    pub fault: Fault,
    pub message: String,
}

impl NameError {
    fn new(fault: Fault, message: String) -> NameError {
        NameError { fault, message }
    }
}

impl std::fmt::Display for NameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The lease mode of a disk or lease: read-only and shareable ones are shared.
pub fn mode(readonly: bool, shared: bool) -> LeaseMode {
    if readonly || shared {
        LeaseMode::Shared
    } else {
        LeaseMode::Exclusive
    }
}

/// Check a path libvirt gave us: present, non-empty, absolute, shorter than PATH_MAX, UTF-8.
/// `vm` is the VM's label for messages, `what` "disk" or "lease directory".
pub fn check_path(vm: &str, what: &str, path: Option<&[u8]>) -> Result<String, NameError> {
    let Some(bytes) = path else {
        return Err(NameError::new(
            Fault::Invalid,
            format!("drvAddResource for VM {vm}: the {what} path is a NULL pointer"),
        ));
    };
    let fail = |why: String| {
        Err(NameError::new(
            Fault::Config,
            format!("cannot lock the {what} {} of VM {vm}: {why}", show(bytes)),
        ))
    };
    if bytes.is_empty() {
        return Err(NameError::new(
            Fault::Config,
            format!(
                "cannot lock a {what} of VM {vm}: the path is empty; give the {what} a source \
                 path in the domain XML"
            ),
        ));
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

/// What the plugin does with one disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// The lease to take; None when the disk is not locked by path (read-only disks with
    /// `readonly_disks = "ignore"`, every disk with `auto_disk_leases = 0`).
    pub lease: Option<LeaseSpec>,
    /// A read/write exclusive disk, counted for `require_lease_for_disks`.
    pub rw_exclusive: bool,
}

/// The lease for the disk at `path` (libvirt's bytes) of VM `vm` (its label for messages).
pub fn disk(
    settings: &Settings,
    vm: &str,
    path: Option<&[u8]>,
    readonly: bool,
    shared: bool,
) -> Result<Disk, NameError> {
    let path = check_path(vm, "disk", path)?;
    if readonly && settings.readonly_disks == ReadonlyDisks::Ignore {
        return Ok(Disk {
            lease: None,
            rw_exclusive: false,
        });
    }
    let mode = mode(readonly, shared);
    let rw_exclusive = mode == LeaseMode::Exclusive;
    if !settings.auto_disk_leases {
        return Ok(Disk {
            lease: None,
            rw_exclusive,
        });
    }
    let target = disk_target(settings, vm, &path)?;
    Ok(Disk {
        lease: Some(LeaseSpec {
            name: path,
            kind: ResourceKind::Disk,
            mode,
            target,
        }),
        rw_exclusive,
    })
}

/// Which file locks the disk at `path` (already checked with [`check_path`]).
pub fn disk_target(settings: &Settings, vm: &str, path: &str) -> Result<LockTarget, NameError> {
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
) -> Result<Option<String>, NameError> {
    match tool::run(program, args, timeout) {
        Ok(ToolOutcome::Success(out)) => Ok(lock_name_from_output(&out)),
        Ok(ToolOutcome::Failed(_)) => Ok(None),
        Err(e) => Err(NameError::new(
            Fault::Internal,
            format!(
                "cannot lock the disk {} of VM {vm}: {key} is set, so lockwarden runs {program} \
                 to name the lock, but {e}; install the tool or unset {key}",
                show(path.as_bytes())
            ),
        )),
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
pub fn valid_file_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')
}

/// A `<lease>`'s key (libvirt's resource name): it names the lock file, so it must be a plain
/// file name.
pub fn lease_key(vm: &str, key: Option<&[u8]>) -> Result<String, NameError> {
    let Some(key_bytes) = key else {
        return Err(NameError::new(
            Fault::Invalid,
            format!("drvAddResource for VM {vm}: the lease key is a NULL pointer"),
        ));
    };
    match std::str::from_utf8(key_bytes) {
        Ok(k) if valid_file_name(k) => Ok(k.to_string()),
        _ => Err(NameError::new(
            Fault::Config,
            format!(
                "cannot lock the lease {} of VM {vm}: a lease key must be a plain file name \
                 (not empty, no '/', not '.' or '..', UTF-8); fix <key> in the domain XML",
                show(key_bytes)
            ),
        )),
    }
}

/// The error for a lease without a target path.
pub fn lease_without_path(vm: &str, key: &str) -> NameError {
    NameError::new(
        Fault::Config,
        format!(
            "cannot lock the lease {} of VM {vm}: it has no target path; add <target \
             path='...'/> to the lease in the domain XML",
            show(key.as_bytes())
        ),
    )
}

/// A lease's offset: lockwarden locks byte 0 of the lease file, so only 0 is served.
pub fn lease_offset(vm: &str, key: &str, offset: u64) -> Result<(), NameError> {
    if offset == 0 {
        return Ok(());
    }
    Err(NameError::new(
        Fault::Config,
        format!(
            "cannot lock the lease {} of VM {vm}: offset {offset} is not supported, lockwarden \
             locks byte 0 of the lease file; remove offset='{offset}' from the lease's <target> \
             in the domain XML",
            show(key.as_bytes())
        ),
    ))
}

/// A lease's lockspace: a plain directory name below its path.
pub fn lease_lockspace(vm: &str, key: &str, lockspace: &[u8]) -> Result<String, NameError> {
    match std::str::from_utf8(lockspace) {
        Ok(s) if valid_file_name(s) => Ok(s.to_string()),
        _ => Err(NameError::new(
            Fault::Config,
            format!(
                "cannot lock the lease {} of VM {vm}: the lockspace {} must be a plain directory \
                 name (not empty, no '/', not '.' or '..'); fix <lockspace> in the domain XML",
                show(key.as_bytes()),
                show(lockspace)
            ),
        )),
    }
}

/// The lease spec of a checked `<lease>`: lock file `<path>/<lockspace>/<key>` or
/// `<path>/<key>` (lockd's naming), its directory never created.
pub fn lease_spec(key: String, path: &str, lockspace: Option<&str>, mode: LeaseMode) -> LeaseSpec {
    let base = path.trim_end_matches('/');
    let dir = match lockspace {
        Some(ls) => format!("{base}/{ls}"),
        None if base.is_empty() => "/".to_string(),
        None => base.to_string(),
    };
    LeaseSpec {
        name: key.clone(),
        kind: ResourceKind::Lease,
        mode,
        target: LockTarget::Lockspace {
            dir,
            file: key,
            create_dir: false,
        },
    }
}

/// The lease spec of a `<lease>` from plain values, checked in the plugin's order (key, path,
/// offset, lockspace): what `lockwarden audit` computes for a lease in libvirt's status file.
pub fn lease(
    vm: &str,
    key: &[u8],
    path: Option<&[u8]>,
    offset: u64,
    lockspace: Option<&[u8]>,
    mode: LeaseMode,
) -> Result<LeaseSpec, NameError> {
    let key = lease_key(vm, Some(key))?;
    let Some(path) = path else {
        return Err(lease_without_path(vm, &key));
    };
    let path = check_path(vm, "lease directory", Some(path))?;
    lease_offset(vm, &key, offset)?;
    let lockspace = lockspace
        .map(|ls| lease_lockspace(vm, &key, ls))
        .transpose()?;
    Ok(lease_spec(key, &path, lockspace.as_deref(), mode))
}

/// The path of the file a lock target locks (a lockspace's lock file, or the disk itself).
pub fn lock_path(target: &LockTarget) -> String {
    match target {
        LockTarget::File { path } => path.clone(),
        LockTarget::Lockspace { dir, file, .. } => format!("{}/{file}", dir.trim_end_matches('/')),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const VM: &str = "'web1' (c7a5fdbd-cdaf-9455-926a-d65c16db1809)";

    fn settings() -> Settings {
        Settings::defaults(PathBuf::from("/run/lockwarden/lockwardend.sock"))
    }

    #[test]
    fn sha256_is_lockds_file_name() {
        // Known vectors: sha256("abc") and of a path with a space and a newline.
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(sha256_hex("/img/a b\n.qcow2").len(), 64);
        assert_ne!(sha256_hex("/img/a"), sha256_hex("/img/a/"));
    }

    #[test]
    fn disk_targets_by_setting() {
        let mut s = settings();
        let d = disk(&s, VM, Some(b"/img/a.qcow2"), false, false).unwrap();
        let l = d.lease.unwrap();
        assert!(d.rw_exclusive);
        assert_eq!(l.mode, LeaseMode::Exclusive);
        assert_eq!(
            l.target,
            LockTarget::File {
                path: "/img/a.qcow2".into()
            }
        );
        assert_eq!(lock_path(&l.target), "/img/a.qcow2");
        s.file_lockspace_dir = Some("/var/lib/libvirt/lockd/files/".into());
        let l = disk(&s, VM, Some(b"/img/a.qcow2"), false, true)
            .unwrap()
            .lease
            .unwrap();
        assert_eq!(l.mode, LeaseMode::Shared);
        assert_eq!(
            l.target,
            LockTarget::Lockspace {
                dir: "/var/lib/libvirt/lockd/files/".into(),
                file: sha256_hex("/img/a.qcow2"),
                create_dir: true,
            }
        );
        assert_eq!(
            lock_path(&l.target),
            format!(
                "/var/lib/libvirt/lockd/files/{}",
                sha256_hex("/img/a.qcow2")
            )
        );
    }

    #[test]
    fn readonly_and_auto_off() {
        let mut s = settings();
        let ro = disk(&s, VM, Some(b"/img/ro.iso"), true, false).unwrap();
        assert_eq!(ro.lease.unwrap().mode, LeaseMode::Shared);
        assert!(!ro.rw_exclusive);
        s.readonly_disks = ReadonlyDisks::Ignore;
        let ro = disk(&s, VM, Some(b"/img/ro.iso"), true, false).unwrap();
        assert_eq!(
            ro,
            Disk {
                lease: None,
                rw_exclusive: false
            }
        );
        s.auto_disk_leases = false;
        let rw = disk(&s, VM, Some(b"/img/rw.qcow2"), false, false).unwrap();
        assert_eq!(
            rw,
            Disk {
                lease: None,
                rw_exclusive: true
            }
        );
        // Checked even when not locked.
        let e = disk(&s, VM, Some(b"rel.qcow2"), false, false).unwrap_err();
        assert_eq!(e.fault, Fault::Config);
    }

    #[test]
    fn missing_naming_tool_is_an_internal_error() {
        // `lvm_lockspace_dir` names LVs through /sbin/lvs; a /dev path that is no LV makes lvs
        // fail (fall through) or be absent (error): either way never a wrong lock file.
        let mut s = settings();
        s.lvm_lockspace_dir = Some("/var/lib/libvirt/lockd/lvmvolumes".into());
        match disk_target(&s, VM, "/dev/lockwarden-no-such-lv") {
            Ok(t) => assert_eq!(
                t,
                LockTarget::File {
                    path: "/dev/lockwarden-no-such-lv".into()
                }
            ),
            Err(e) => {
                assert_eq!(e.fault, Fault::Internal);
                assert!(
                    e.message
                        .contains("install the tool or unset lvm_lockspace_dir")
                );
            }
        }
        // Not under /dev: no tool runs.
        assert_eq!(
            disk_target(&s, VM, "/img/a").unwrap(),
            LockTarget::File {
                path: "/img/a".into()
            }
        );
    }

    #[test]
    fn paths_are_checked() {
        let long = format!("/{}", "a".repeat(PATH_MAX - 1));
        for (p, fault, want) in [
            (None, Fault::Invalid, "NULL pointer"),
            (Some(&b""[..]), Fault::Config, "path is empty"),
            (Some(&b"img/a"[..]), Fault::Config, "relative"),
            (Some(long.as_bytes()), Fault::Config, "PATH_MAX"),
            (Some(&b"/img/\xff"[..]), Fault::Config, "UTF-8"),
        ] {
            let e = check_path(VM, "disk", p).unwrap_err();
            assert_eq!(e.fault, fault, "{e}");
            assert!(e.message.contains(want), "{e} vs {want}");
            assert!(e.message.contains("'web1'"), "{e}");
        }
        let longest = &long[..PATH_MAX - 1];
        assert_eq!(
            check_path(VM, "disk", Some(longest.as_bytes())).unwrap(),
            longest
        );
    }

    #[test]
    fn tool_output_parsing() {
        assert_eq!(
            lock_name_from_output(b"  06UgP5-2rhb-aaaa\n").as_deref(),
            Some("06UgP5-2rhb-aaaa")
        );
        assert_eq!(lock_name_from_output(b"\n"), None);
        assert_eq!(lock_name_from_output(b"../x\n"), None);
        assert_eq!(lock_name_from_output(b".."), None);
        assert_eq!(lock_name_from_output(b"\xff\n"), None);
    }

    #[test]
    fn leases_are_named_like_lockd() {
        let l = lease(
            VM,
            b"key1",
            Some(b"/l/"),
            0,
            Some(b"ls"),
            LeaseMode::Exclusive,
        )
        .unwrap();
        assert_eq!(
            l.target,
            LockTarget::Lockspace {
                dir: "/l/ls".into(),
                file: "key1".into(),
                create_dir: false
            }
        );
        assert_eq!(lock_path(&l.target), "/l/ls/key1");
        let l = lease(VM, b"k", Some(b"/"), 0, None, LeaseMode::Shared).unwrap();
        assert_eq!(lock_path(&l.target), "/k");
        assert_eq!(l.mode, LeaseMode::Shared);
        for (key, path, offset, ls, want) in [
            (&b"a/b"[..], Some(&b"/l"[..]), 0, None, "plain file name"),
            (&b".."[..], Some(&b"/l"[..]), 0, None, "plain file name"),
            (&b"k"[..], None, 0, None, "no target path"),
            (&b"k"[..], Some(&b"rel"[..]), 0, None, "relative"),
            (&b"k"[..], Some(&b"/l"[..]), 512, None, "offset 512"),
            (
                &b"k"[..],
                Some(&b"/l"[..]),
                0,
                Some(&b"../x"[..]),
                "lockspace",
            ),
        ] {
            let e = lease(VM, key, path, offset, ls, LeaseMode::Exclusive).unwrap_err();
            assert_eq!(e.fault, Fault::Config);
            assert!(e.message.contains(want), "{e} vs {want}");
        }
        assert_eq!(lease_key(VM, None).unwrap_err().fault, Fault::Invalid);
    }
}
