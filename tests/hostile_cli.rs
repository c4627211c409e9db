//! The admin CLI against hostile shared storage (issue 13, finding 6; issue 19's `status` exit
//! code is in src/cli/mod.rs's unit tests).
//!
//! Another host on the share, or a buggy tool there, writes the holder records `who` reads and
//! the host configs `doctor` compares. What it writes must never reach the operator's terminal
//! as control sequences, and a FIFO, a device node or a link to an endless file planted there
//! must never block `doctor` or make it read without bound. Each test runs the real
//! `lockwarden` binary and checks the bytes it printed.

mod common;

use common::wait::poll;

use common::image;
use common::locks::ofd_lock;
use lockwarden::daemon::holder::{self, Record, Target, Vm};
use lockwarden::protocol::{LeaseMode, ResourceKind};
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const CLI: &str = env!("CARGO_BIN_EXE_lockwarden");
/// Bound for a command that must not block (not a performance assertion: far above its cost).
const BOUND: Duration = Duration::from_secs(20);
/// A host name as a hostile host would write it: set the terminal title, clear the screen, and
/// colour a fake host name; plus a right-to-left override that reorders what follows.
const EVIL_HOST: &str = "\u{1b}]0;OWNED\u{7}\u{1b}[2J\u{1b}[31mnode-b\u{1b}[0m\u{202e}kcab";

/// Run the CLI with a bound: a command that blocks is killed and reported, not waited for.
fn cli(args: &[&str]) -> Output {
    let mut child = Command::new(CLI)
        .args(args)
        .env_remove("LOCKWARDEN_MOUNTS_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running lockwarden");
    if poll(BOUND, || child.try_wait().unwrap()).is_none() {
        child.kill().unwrap();
        let out = child.wait_with_output().unwrap();
        panic!(
            "lockwarden {args:?} blocked for {BOUND:?}; stderr so far: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    child.wait_with_output().unwrap()
}

/// No byte that starts a terminal control sequence, and no bidi override, in `bytes`.
fn assert_inert(what: &str, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    assert!(
        !bytes.iter().any(|b| *b == 0x1b || *b == 0x07),
        "{what} carries raw control bytes: {text:?}"
    );
    assert!(
        !text.contains('\u{202e}'),
        "{what} carries a raw bidi override: {text:?}"
    );
}

fn evil_record(path: &str) -> Record {
    Record::new(
        EVIL_HOST,
        ResourceKind::Disk,
        path,
        LeaseMode::Exclusive,
        path,
        1_795_687_445,
        vec![Vm {
            name: format!("db\u{1b}[8m{EVIL_HOST}"),
            uuid: "c7a5fdbd-cdaf-9455-926a-\u{1b}[1m0000".into(),
            pid: 4242,
            since: 1_795_687_445,
        }],
    )
}

fn who(disk: &Path, dir: &Path) -> Output {
    let conf = dir.join("qemu-lockwarden.conf");
    fs::write(&conf, "").unwrap();
    cli(&[
        "who",
        disk.to_str().unwrap(),
        "--config",
        conf.to_str().unwrap(),
        "--admin-socket",
        "/nonexistent/lockwarden-admin.sock",
        "--timeout-ms",
        "200",
    ])
}

#[test]
fn who_escapes_a_believed_record_from_another_host() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "web1.img");
    let p = img.to_str().unwrap();
    // "Another host" holds the disk and published a record with hostile names.
    let lease = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    ofd_lock(&lease, libc::F_WRLCK, 0);
    let _published = holder::publish(
        Target {
            fd: lease.as_fd(),
            kind: ResourceKind::Disk,
            lock_path: p,
            lockspace: false,
        },
        evil_record(p),
    )
    .expect("publishing the other host's record");
    let out = who(&img, dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "who: {stdout} {:?}", out.stderr);
    assert_inert("who's stdout", &out.stdout);
    assert_inert("who's stderr", &out.stderr);
    // The names are still shown, escaped, so the operator sees what the record claims.
    assert!(stdout.contains("\\u{1b}[31mnode-b"), "{stdout}");
    assert!(stdout.contains("\\u{202e}kcab"), "{stdout}");
}

#[test]
fn who_escapes_an_ignored_stale_record() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "web2.img");
    let p = img.to_str().unwrap();
    // A record nobody holds (stale): who reports it as ignored on stderr, naming its host.
    let side_dir = dir.path().join(".lockwarden");
    fs::create_dir(&side_dir).unwrap();
    let mut rec = evil_record(p);
    rec.lock_ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&img).unwrap());
    fs::write(
        side_dir.join("web2.img@node-b.json"),
        serde_json::to_vec(&rec).unwrap(),
    )
    .unwrap();
    let out = who(&img, dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ignored holder record"), "{stderr}");
    assert!(stderr.contains("\\u{1b}]0;OWNED"), "{stderr}");
    assert_inert("who's stdout", &out.stdout);
    assert_inert("who's stderr", &out.stderr);
}

/// `doctor` in lockspace mode with `planted` (name, kind) in `<lockspace>/.lockwarden/config/`.
fn doctor_with(plant: impl FnOnce(&Path)) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let ls = dir.path().join("lockspace");
    let cdir = ls.join(".lockwarden/config");
    fs::create_dir_all(&cdir).unwrap();
    plant(&cdir);
    let conf = dir.path().join("qemu-lockwarden.conf");
    fs::write(
        &conf,
        format!("file_lockspace_dir = \"{}\"\n", ls.display()),
    )
    .unwrap();
    let qemu = dir.path().join("qemu.conf");
    fs::write(&qemu, "lock_manager = \"lockwarden\"\n").unwrap();
    let mounts = dir.path().join("mounts");
    fs::write(&mounts, "").unwrap();
    cli(&[
        "doctor",
        "--config",
        conf.to_str().unwrap(),
        "--qemu-conf",
        qemu.to_str().unwrap(),
        "--mounts",
        mounts.to_str().unwrap(),
        "--admin-socket",
        "/nonexistent/lockwarden-admin.sock",
        "--timeout-ms",
        "200",
    ])
}

#[test]
fn doctor_escapes_another_hosts_published_config() {
    let out = doctor_with(|cdir| {
        let evil = serde_json::json!({
            "lockwarden_config": 1,
            "host": EVIL_HOST,
            "published": 0,
            "version": "0.1.0\u{1b}[5m",
            "key": "file_lockspace_dir",
            "dir": "/x\u{1b}[2J",
            "fs_type": "nfs\u{1b}[2J",
            "auto_disk_leases": true,
            "require_lease_for_disks": false,
            "readonly_disks": "ignore\u{1b}[1m",
            "file_lockspace": true,
            "lvm_lockspace": false,
            "scsi_lockspace": false,
        });
        fs::write(cdir.join("node-b.json"), serde_json::to_vec(&evil).unwrap()).unwrap();
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The record was parsed and compared: the difference names the (escaped) host.
    assert!(
        stdout.contains("published by host \\u{1b}]0;OWNED"),
        "{stdout}"
    );
    assert_inert("doctor's stdout", &out.stdout);
    assert_inert("doctor's stderr", &out.stderr);
}

#[test]
fn doctor_never_opens_a_planted_fifo_device_or_endless_file() {
    let out = doctor_with(|cdir| {
        // A FIFO without a writer blocks an open for reading; a device node and a link to an
        // endless file would be read without bound.
        nix::unistd::mkfifo(
            &cdir.join("stuck.json"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        nix::sys::stat::mknod(
            &cdir.join("zero.json"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(1, 5),
        )
        .unwrap();
        std::os::unix::fs::symlink("/dev/zero", cdir.join("link.json")).unwrap();
        // A regular file larger than any config: refused by size, not read whole.
        let big = File::create(cdir.join("big.json")).unwrap();
        big.set_len(64 << 20).unwrap();
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Each planted file is reported as unreadable, with what it is.
    common::assert_mentions(
        &stdout,
        &[
            "stuck.json: it is a FIFO",
            "zero.json: it is a character device",
            "link.json: it is a symbolic link",
            "big.json: larger than",
        ],
    );
}
