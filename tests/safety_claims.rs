//! Safety claims of the documentation that no other test held (issue 19, "Safety claims that
//! need a test"). Each test drives the real `lockwardend` (and, where the claim is about the
//! plugin, the real `liblockwarden.so` through the C test host), and each names the claim it
//! holds. Absence is proven with an event or a bounded poll on a condition, never a sleep.
//!
//! Run as root: the LVM/SCSI naming tests give the plugin fake `lvs` / `scsi_id` in a private
//! mount namespace (the plugin runs them from fixed paths), and the uid tests switch uid.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Root is needed for the mount namespace and for switching uid; say so instead of skipping.
fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "tests/safety_claims.rs must run as root (mount namespaces, other uids)"
    );
}

fn write_script(path: &Path, body: &str) {
    fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("write fake tool");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod fake tool");
}

/// Directories to bind over `/usr/sbin` (where `/sbin/lvs` lives: /sbin is usr/sbin on merged
/// /usr systems, and a real directory otherwise) and over `/lib/udev` (scsi_id). Each gets
/// only the fake tools the test puts there, so the machine's own tools (if any) are hidden.
struct FakeTools {
    _dir: tempfile::TempDir,
    sbin: PathBuf,
    udev: PathBuf,
}

impl FakeTools {
    fn new() -> FakeTools {
        let dir = tempdir();
        let sbin = dir.path().join("sbin");
        let udev = dir.path().join("udev");
        fs::create_dir(&sbin).expect("mkdir fake sbin");
        fs::create_dir(&udev).expect("mkdir fake udev");
        chmod(dir.path(), 0o755);
        FakeTools {
            _dir: dir,
            sbin,
            udev,
        }
    }

    /// `lvs --noheadings --unbuffered --nosuffix --options uuid DEVICE` as a case on DEVICE.
    fn lvs(&self, cases: &str) {
        write_script(
            &self.sbin.join("lvs"),
            &format!(
                "[ \"$1 $2 $3 $4 $5\" = '--noheadings --unbuffered --nosuffix --options uuid' ] \
                 || exit 3\ncase \"$6\" in\n{cases}\n*) exit 5 ;;\nesac"
            ),
        );
    }

    /// `scsi_id --replace-whitespace --whitelisted --device DEVICE` as a case on DEVICE.
    fn scsi_id(&self, cases: &str) {
        write_script(
            &self.udev.join("scsi_id"),
            &format!(
                "[ \"$1 $2 $3\" = '--replace-whitespace --whitelisted --device' ] || exit 3\n\
                 case \"$4\" in\n{cases}\n*) exit 1 ;;\nesac"
            ),
        );
    }

    fn host(&self, d: &Daemon, extra: &str) -> Host {
        let sbin = resolve("/sbin");
        let udev = resolve("/lib/udev");
        Host::spawn_with_binds(
            &d.plugin_conf(extra),
            &[(&self.sbin, &sbin), (&self.udev, &udev)],
        )
    }
}

/// The real directory behind a path the plugin uses (/sbin may be a symlink to usr/sbin).
fn resolve(p: &str) -> PathBuf {
    fs::canonicalize(p).unwrap_or_else(|e| {
        panic!("{p} does not exist ({e}): the fake tools are bind-mounted over it")
    })
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// S12: LVM and SCSI lock files are named by LV UUID and WWID, so two hosts agree on the file
// (README "lvm_lockspace_dir / scsi_lockspace_dir", qemu-lockwarden.conf(5)).

/// Two hosts reach the same LV under different device paths (a /dev/VG/LV link on one, the
/// /dev/mapper name on the other): the fake lvs names both by the same UUID, so both lock the
/// same file and the second host is refused. Had the plugin named the file by path (or ignored
/// lvs), the two hosts would lock different files and both would "hold" the disk.
#[test]
fn lvm_lock_files_are_named_by_lv_uuid_so_two_hosts_agree() {
    require_root();
    let tools = FakeTools::new();
    tools.lvs(
        "/dev/lwvg/data|/dev/mapper/lwvg-data) echo '  Lw0Uid-aaaa-bbbb-cccc-dddd-eeee-ffff00' ;;",
    );
    let shared_storage = tempdir();
    let lvm = shared_storage.path().join("lvmvolumes");
    let files = shared_storage.path().join("files");
    let extra = format!(
        "lvm_lockspace_dir = \"{}\"\nfile_lockspace_dir = \"{}\"",
        lvm.display(),
        files.display()
    );
    let d1 = Daemon::start();
    let d2 = Daemon::start();
    let mut h1 = tools.host(&d1, &extra);
    let mut h2 = tools.host(&d2, &extra);

    let a = h1.start("lvm-a");
    h1.acquire(&a, &[format!("disk:{}", "/dev/lwvg/data")])
        .expect_ok("host 1 locks the LV by its UUID");
    let lockfile = lvm.join("Lw0Uid-aaaa-bbbb-cccc-dddd-eeee-ffff00");
    assert_eq!(
        names_in(&lvm),
        vec!["Lw0Uid-aaaa-bbbb-cccc-dddd-eeee-ffff00".to_string()],
        "the lock file is named by the LV UUID lvs printed (leading blanks trimmed)"
    );
    assert_eq!(probe0(&lockfile), Probe::WriteLocked);
    assert!(
        names_in(&files).is_empty(),
        "an LV named by lvs must not fall through to file_lockspace_dir"
    );

    let b = h2.start("lvm-b");
    let msg = h2
        .acquire(&b, &[format!("disk:{}", "/dev/mapper/lwvg-data")])
        .expect_busy("host 2 reaches the same LV by another path");
    eprintln!("second host refused: {msg}");

    h1.release(&a, &[format!("disk:{}", "/dev/lwvg/data")])
        .expect_ok("host 1 releases");
    h2.acquire(&b, &[format!("disk:{}", "/dev/mapper/lwvg-data")])
        .expect_ok("host 2 takes the LV once host 1 released it");
    assert_eq!(probe0(&lockfile), Probe::WriteLocked);
}

/// The same for SCSI: scsi_id's WWID names the file, so /dev/sdX on one host and another
/// name on the other agree.
#[test]
fn scsi_lock_files_are_named_by_wwid_so_two_hosts_agree() {
    require_root();
    let tools = FakeTools::new();
    tools.scsi_id("/dev/sdlw|/dev/disk/by-id/lw-lun0) echo '36001405lockwarden0000000000000001' ;;");
    let shared_storage = tempdir();
    let scsi = shared_storage.path().join("scsivolumes");
    let extra = format!("scsi_lockspace_dir = \"{}\"", scsi.display());
    let d1 = Daemon::start();
    let d2 = Daemon::start();
    let mut h1 = tools.host(&d1, &extra);
    let mut h2 = tools.host(&d2, &extra);

    let a = h1.start("scsi-a");
    h1.acquire(&a, &["disk:/dev/sdlw".to_string()])
        .expect_ok("host 1 locks the LUN by its WWID");
    assert_eq!(
        names_in(&scsi),
        vec!["36001405lockwarden0000000000000001".to_string()]
    );
    assert_eq!(
        probe0(&scsi.join("36001405lockwarden0000000000000001")),
        Probe::WriteLocked
    );
    let b = h2.start("scsi-b");
    h2.acquire(&b, &["disk:/dev/disk/by-id/lw-lun0".to_string()])
        .expect_busy("host 2 reaches the same LUN by another path");
}

/// lvs runs but does not know the device (exit status 5): the disk falls through to
/// file_lockspace_dir (named by the SHA-256 of the path). Deterministic, unlike the unit test
/// it replaces, which checked one thing or another depending on whether /sbin/lvs existed.
#[test]
fn lvm_dir_set_but_lvs_fails_falls_through_to_the_file_lockspace() {
    require_root();
    let tools = FakeTools::new();
    tools.lvs("/dev/lwvg/known) echo KNOWNUUID ;;");
    let shared_storage = tempdir();
    let lvm = shared_storage.path().join("lvmvolumes");
    let files = shared_storage.path().join("files");
    let extra = format!(
        "lvm_lockspace_dir = \"{}\"\nfile_lockspace_dir = \"{}\"",
        lvm.display(),
        files.display()
    );
    let d = Daemon::start();
    let mut h = tools.host(&d, &extra);
    let a = h.start("lvm-fallthrough");
    h.acquire(&a, &["disk:/dev/null".to_string()])
        .expect_ok("a device lvs does not know falls through");
    let want = {
        use sha2::{Digest, Sha256};
        Sha256::digest(b"/dev/null")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    assert_eq!(names_in(&files), vec![want]);
    assert!(
        names_in(&lvm).is_empty(),
        "nothing named by a failed lvs: {:?}",
        names_in(&lvm)
    );
}

/// lvm_lockspace_dir is set but there is no /sbin/lvs at all: the acquire is refused, and the
/// message names the tool and the key (never a silent fall-through to path naming, which
/// would make this host disagree with hosts that have lvs).
#[test]
fn lvm_dir_set_without_lvs_is_refused_naming_the_tool_and_the_key() {
    require_root();
    let tools = FakeTools::new(); // empty: no lvs, no scsi_id
    let shared_storage = tempdir();
    let lvm = shared_storage.path().join("lvmvolumes");
    let files = shared_storage.path().join("files");
    let extra = format!(
        "lvm_lockspace_dir = \"{}\"\nfile_lockspace_dir = \"{}\"",
        lvm.display(),
        files.display()
    );
    let d = Daemon::start();
    let mut h = tools.host(&d, &extra);
    let a = h.start("lvm-missing");
    let (_, _, msg) = h
        .acquire(&a, &["disk:/dev/null".to_string()])
        .expect_err("no lvs installed");
    assert!(
        msg.contains("/sbin/lvs") && msg.contains("lvm_lockspace_dir"),
        "{msg}"
    );
    assert!(names_in(&files).is_empty() && names_in(&lvm).is_empty());
}
