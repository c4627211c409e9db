//! `lockwarden audit` and `lockwarden adopt` against the real lockwardend (issue 20), without
//! libvirt: a status directory written like libvirt's, and a stand-in "QEMU" process whose
//! command line carries `-name guest=NAME` as libvirt's QEMU does. The real-libvirt version is
//! scenarios 15 and 16 of tests/e2e.

mod common;

use common::daemon::TestDaemon;
use common::locks::hold_byte0;
use common::{Probe, image, probe0, tempdir, wait_unlocked};
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

fn status_xml(name: &str, pid: u32, disk: &Path, shared: &Path) -> String {
    format!(
        "<!--\nWARNING: THIS IS AN AUTO-GENERATED FILE.\n-->\n\
         <domstatus state='running' reason='booted' pid='{pid}'>\n\
         <devices><device alias='virtio-disk0'/></devices>\n\
         <domain type='qemu' id='3'>\n\
         <name>{name}</name>\n\
         <uuid>c7a5fdbd-cdaf-9455-926a-d65c16db1809</uuid>\n\
         <on_lockfailure>poweroff</on_lockfailure>\n\
         <devices>\n\
         <disk type='file' device='disk'><source file='{}' index='1'/>\
         <backingStore type='file'><source file='/nonexistent/base.qcow2'/></backingStore>\
         <target dev='vda'/></disk>\n\
         <disk type='file' device='disk'><source file='{}'/><shareable/></disk>\n\
         <disk type='network' device='disk'><source protocol='rbd' name='p/i'/></disk>\n\
         </devices>\n</domain>\n</domstatus>\n",
        disk.display(),
        shared.display()
    )
}

/// A process that looks like libvirt's QEMU for `name` (its argv has `-name guest=NAME`).
/// It waits in the shell's own `read` on a pipe the `Child` holds, so it starts no process
/// of its own: killing it (or dropping the `Child`) leaves nothing behind, and no orphan keeps
/// the test's stdout open.
fn fake_qemu(name: &str) -> Child {
    Command::new("sh")
        .args(["-c", "read x; :", "-name"])
        .arg(format!("guest={name},debug-threads=on"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning the stand-in QEMU")
}

struct Bed {
    daemon: TestDaemon,
    conf: std::path::PathBuf,
    status: std::path::PathBuf,
}

impl Bed {
    /// A daemon, a plugin config for it in `dir`, and a libvirt status directory
    /// (`dir/status`) holding domain `domain`, running as `pid`, with `disk` and `shared`.
    fn new(dir: &Path, domain: &str, pid: u32, disk: &Path, shared: &Path) -> Bed {
        let daemon = TestDaemon::verbose("");
        let conf = dir.join("qemu-lockwarden.conf");
        fs::write(&conf, daemon.plugin_conf("")).unwrap();
        let status = dir.join("status");
        fs::create_dir(&status).unwrap();
        fs::write(
            status.join(format!("{domain}.xml")),
            status_xml(domain, pid, disk, shared),
        )
        .unwrap();
        Bed {
            daemon,
            conf,
            status,
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_lockwarden"))
            .arg("--admin-socket")
            .arg(&self.daemon.admin)
            .arg("--config")
            .arg(&self.conf)
            .arg("--status-dir")
            .arg(&self.status)
            .args(args)
            .output()
            .expect("running lockwarden")
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn audit_then_adopt_protects_a_running_vm_until_its_qemu_exits() {
    let dir = tempdir();
    let (disk, shared) = (
        image(dir.path(), "vm1 disk.img"),
        image(dir.path(), "shared.img"),
    );
    let mut qemu = fake_qemu("vm1");
    let bed = Bed::new(dir.path(), "vm1", qemu.id(), &disk, &shared);

    // Before: exposed, exit 1.
    let o = bed.cli(&["audit"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("vm1: UNPROTECTED (0 of 2 held)"),
        "{}",
        text(&o)
    );
    let o = bed.cli(&["audit", "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["vms"][0]["verdict"], "unprotected");
    assert_eq!(j["vms"][0]["on_lockfailure"], "poweroff");
    assert_eq!(j["vms"][0]["resources"][1]["mode"], "shared");
    assert_eq!(j["vms"][0]["resources"].as_array().unwrap().len(), 2);

    // A disk held by something that is not lockwarden refuses the whole VM: nothing is taken.
    let foreign = hold_byte0(&shared);
    let o = bed.cli(&["adopt", "--all"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("vm1: NOT adopted, nothing taken"),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("not lockwarden"), "{}", text(&o));
    assert_eq!(probe0(&disk), Probe::Unlocked, "all or nothing");
    drop(foreign);

    // Dry run: says what it would take, takes nothing.
    let o = bed.cli(&["adopt", "vm1", "--dry-run"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("would take 2 lease(s)"), "{}", text(&o));
    assert_eq!(probe0(&disk), Probe::Unlocked);

    // Unknown VM: usage error.
    let o = bed.cli(&["adopt", "nosuchvm"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    // Adopt: both disks locked in the plugin's modes, for the QEMU pid.
    let o = bed.cli(&["adopt", "vm1"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("vm1: adopted"), "{}", text(&o));
    assert_eq!(probe0(&disk), Probe::WriteLocked);
    assert_eq!(probe0(&shared), Probe::ReadLocked);
    let o = bed.cli(&["audit"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("vm1: protected (2 of 2 held)"),
        "{}",
        text(&o)
    );
    // Adopting again changes nothing.
    let o = bed.cli(&["adopt", "--all"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("already protected"), "{}", text(&o));

    // The VM's exit frees its disks (pidfd; there is no lifetime connection).
    qemu.kill().unwrap();
    qemu.wait().unwrap();
    assert!(
        wait_unlocked(&disk, Duration::from_secs(10)).is_some(),
        "the adopted disk stayed locked after its QEMU exited"
    );
    assert!(wait_unlocked(&shared, Duration::from_secs(10)).is_some());
    // A status file left behind by a dead QEMU is reported, never adopted.
    let o = bed.cli(&["adopt", "vm1"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("is not running"), "{}", text(&o));
    assert_eq!(probe0(&disk), Probe::Unlocked);
}

#[test]
fn a_pid_that_is_not_the_vms_qemu_is_not_adopted() {
    let dir = tempdir();
    let (disk, shared) = (image(dir.path(), "a.img"), image(dir.path(), "s.img"));
    let mut other = fake_qemu("another-vm");
    let bed = Bed::new(dir.path(), "vm2", other.id(), &disk, &shared);
    let o = bed.cli(&["adopt", "--all"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("is not the QEMU of this domain"),
        "{}",
        text(&o)
    );
    assert_eq!(probe0(&disk), Probe::Unlocked);
    other.kill().unwrap();
    other.wait().unwrap();
}
