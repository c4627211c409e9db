//! Safety claims of the documentation that no other test held (issue 19, "Safety claims that
//! need a test"). Each test drives the real `lockwardend` (and, where the claim is about the
//! plugin, the real `liblockwarden.so` through the C test host), and each names the claim it
//! holds. Absence is proven with an event or a bounded poll on a condition, never a sleep.
//!
//! Run as root: the LVM/SCSI naming tests give the plugin fake `lvs` / `scsi_id` in a private
//! mount namespace (the plugin runs them from fixed paths), and the uid tests switch uid.

mod common;

use common::daemon::Lockwardend;
use common::daemon::{Opts, TestDaemon};
use common::fuse::Fs;
use common::wait::{poll_every, wait_until_or};
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

    fn host(&self, d: &TestDaemon, extra: &str) -> Host {
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
    let (_shared_storage, lvm, files, extra) = lockspace_dirs();
    let d1 = TestDaemon::verbose("");
    let d2 = TestDaemon::verbose("");
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
    tools
        .scsi_id("/dev/sdlw|/dev/disk/by-id/lw-lun0) echo '36001405lockwarden0000000000000001' ;;");
    let shared_storage = tempdir();
    let scsi = shared_storage.path().join("scsivolumes");
    let extra = format!("scsi_lockspace_dir = \"{}\"", scsi.display());
    let d1 = TestDaemon::verbose("");
    let d2 = TestDaemon::verbose("");
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

/// A shared-storage stand-in with an LVM and a file lockspace directory: (the directory, keep
/// it alive; lvm_lockspace_dir; file_lockspace_dir; the plugin config lines naming both).
fn lockspace_dirs() -> (tempfile::TempDir, PathBuf, PathBuf, String) {
    let shared_storage = tempdir();
    let lvm = shared_storage.path().join("lvmvolumes");
    let files = shared_storage.path().join("files");
    let extra = format!(
        "lvm_lockspace_dir = \"{}\"\nfile_lockspace_dir = \"{}\"",
        lvm.display(),
        files.display()
    );
    (shared_storage, lvm, files, extra)
}

/// lvs runs but does not know the device (exit status 5): the disk falls through to
/// file_lockspace_dir (named by the SHA-256 of the path). Deterministic, unlike the unit test
/// it replaces, which checked one thing or another depending on whether /sbin/lvs existed.
#[test]
fn lvm_dir_set_but_lvs_fails_falls_through_to_the_file_lockspace() {
    require_root();
    let tools = FakeTools::new();
    tools.lvs("/dev/lwvg/known) echo KNOWNUUID ;;");
    let (_shared_storage, lvm, files, extra) = lockspace_dirs();
    let d = TestDaemon::verbose("");
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
    let (_shared_storage, lvm, files, extra) = lockspace_dirs();
    let d = TestDaemon::verbose("");
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

// ---------------------------------------------------------------------------------------------
// Protocol-level daemons (each test starts its own; killed on drop)

use common::proto::{
    Client, Proc, byte0, err, eventually, excl, ok, probe_lock, proc_state, shared, signal,
    spawn_registered, tell, vm,
};
use lockwarden::protocol::{
    ErrorKind, FailureAction, LeaseMode, LeaseSpec, LockTarget, Request, ResourceKind, Response,
};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Bound for anything asynchronous on a busy machine (never a performance assertion).
const BOUND: Duration = Duration::from_secs(30);

/// The pid of the keeper this daemon last started (from its log, so that nothing connects to
/// the keeper: a connection of the daemon's uid would replace the daemon's own link).
fn keeper_pid(d: &TestDaemon) -> u32 {
    d.logged_keeper_pid()
        .unwrap_or_else(|| panic!("no keeper start in the log:\n{}", d.log()))
}

fn lockspace_spec(name: &str, dir: &Path, file: &str, mode: LeaseMode) -> LeaseSpec {
    LeaseSpec {
        name: name.to_string(),
        kind: ResourceKind::Disk,
        mode,
        target: LockTarget::Lockspace {
            dir: dir.to_str().expect("utf-8 dir").to_string(),
            file: file.to_string(),
            create_dir: true,
        },
    }
}

// ---------------------------------------------------------------------------------------------
// S10: a shared→exclusive upgrade by the sole owner is refused as `invalid`
// (docs/protocol.md "Acquire"): an owner holding a disk read-only/shared cannot silently make it
// writable, even when nobody else shares it.

#[test]
fn a_shared_to_exclusive_upgrade_by_the_sole_owner_is_refused_as_invalid() {
    let d = TestDaemon::verbose("");
    let images = tempdir();
    let img = image(images.path(), "upgrade.img");
    let a = vm("sole-sharer");
    assert!(ok(d.acquire(&a.owner, vec![shared(&img)])).is_empty());
    let e = err(d.acquire(&a.owner, vec![excl(&img)]), ErrorKind::Invalid);
    assert!(
        e.message.contains("in shared mode") && e.message.contains("detach it first"),
        "{}",
        e.message
    );
    // Still held, still shared, still one owner.
    assert_eq!(byte0(&img), libc::F_RDLCK);
    let held = d.held(&a.owner);
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].mode, LeaseMode::Shared);
}

// ---------------------------------------------------------------------------------------------
// S2: a lockspace file another host still holds shared is kept at release; it is deleted only
// by the last holder, under an exclusive lock (docs/protocol.md "Release").

#[test]
fn a_lockspace_file_another_host_holds_shared_is_kept_at_release() {
    let (d1, d2) = (TestDaemon::verbose(""), TestDaemon::verbose(""));
    let base = tempdir();
    let locks = base.path().join("lockspace");
    let spec = lockspace_spec(
        "/images/shared.iso",
        &locks,
        "shared-iso",
        LeaseMode::Shared,
    );
    let (a, x) = (vm("host1-reader"), vm("host2-reader"));
    ok(d1.acquire(&a.owner, vec![spec.clone()]));
    ok(d2.acquire(&x.owner, vec![spec.clone()]));
    let file = locks.join("shared-iso");
    let ino = fs::metadata(&file).expect("lock file").ino();
    assert_eq!(byte0(&file), libc::F_RDLCK);

    // Host 1's last reader leaves: host 2 still holds the file shared, so it stays.
    ok(d1.release(&a.owner, vec![spec.clone()]));
    d1.wait_log("lock file kept, another host still holds a shared lock on it");
    let now = fs::metadata(&file).unwrap_or_else(|e| {
        panic!("host 2's lock file was deleted under it at host 1's release: {e}")
    });
    assert_eq!(now.ino(), ino, "the lock file was replaced");
    assert_eq!(
        probe_lock(&file, 0, 1, libc::F_WRLCK).0,
        libc::F_RDLCK,
        "host 2 still holds it"
    );
    assert!(d1.list().is_empty());

    // Host 2, the last holder, releases: now the file goes.
    ok(d2.release(&x.owner, vec![spec]));
    eventually("the last holder's release deletes the lock file", || {
        !file.exists()
    });
}

// ---------------------------------------------------------------------------------------------
// S1: the keeper cannot be reached, even after starting a new one → the acquire is refused
// and rolled back (docs/reliability.md "The keeper"): the daemon never answers "acquired"
// for a lease that would not survive its crash.

#[test]
fn an_unreachable_keeper_refuses_and_rolls_back_the_acquire() {
    let d = TestDaemon::verbose("");
    let images = tempdir();
    let (img1, img2) = (
        image(images.path(), "k1.img"),
        image(images.path(), "k2.img"),
    );
    let (a, b) = (vm("before"), vm("after"));
    ok(d.acquire(&a.owner, vec![excl(&img1)]));
    let keeper = keeper_pid(&d);
    // Make a replacement keeper impossible: its socket path becomes a directory (the daemon
    // refuses to remove anything there but a socket). The live keeper keeps its listener.
    let ks = d.keeper_socket();
    fs::rename(&ks, ks.with_extension("moved")).expect("move the keeper socket away");
    fs::create_dir(&ks).expect("obstacle at the keeper socket path");
    signal(keeper, libc::SIGKILL);
    // The daemon noticed and could not start another keeper.
    d.wait_log("exists and is not a socket");

    let e = err(d.acquire(&b.owner, vec![excl(&img2)]), ErrorKind::Internal);
    assert!(
        e.message.contains("cannot protect the leases") && e.message.contains("nothing was locked"),
        "{}",
        e.message
    );
    // Rolled back: not locked, not listed, not held.
    eventually("the refused lease is unlocked", || {
        byte0(&img2) == libc::F_UNLCK
    });
    assert!(d.held(&b.owner).is_empty());
    assert!(
        d.list()
            .iter()
            .all(|l| l.lock_path != img2.to_str().unwrap()),
        "{:?}",
        d.list()
    );
    // The lease granted before is still held by the daemon itself.
    assert_eq!(byte0(&img1), libc::F_WRLCK);

    // Once a keeper can start again, the same acquire succeeds and both leases are handed over.
    fs::remove_dir(&ks).expect("remove the obstacle");
    ok(d.acquire(&b.owner, vec![excl(&img2)]));
    assert_eq!(byte0(&img2), libc::F_WRLCK);
    d.wait_log("holds all 2 lease(s) again");
    assert_ne!(keeper_pid(&d), keeper);
}

// ---------------------------------------------------------------------------------------------
// S8: the keeper accepts only peers of its own uid (docs/reliability.md "The keeper"). The
// socket is 0600 as well; this test opens the mode to reach the uid check behind it: a peer
// that got in could dump every lease descriptor or reset them all.

const PROBE_ENV: &str = "LW_KEEPER_PROBE";

/// Not a test: the body of the keeper probe process (run with another uid by the test below).
/// Connects to the keeper socket named in LW_KEEPER_PROBE, says hello, and prints what came
/// back: `PROBE ANSWER <json>` or `PROBE EOF` (refused) or `PROBE ERROR <why>`.
#[test]
#[ignore = "helper process for a_keeper_refuses_a_peer_of_another_uid"]
fn keeper_probe_process() {
    let Some(path) = std::env::var_os(PROBE_ENV) else {
        return;
    };
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let out = (|| -> Result<String, String> {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| format!("socket: {e}"))?;
        let addr = UnixAddr::new(Path::new(&path)).map_err(|e| format!("address: {e}"))?;
        connect(fd.as_raw_fd(), &addr).map_err(|e| format!("connect: {e}"))?;
        let tv = nix::sys::time::TimeVal::new(20, 0);
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
            .map_err(|e| format!("timeout: {e}"))?;
        let hello = br#"{"op":"hello","version":1}"#;
        match nix::unistd::write(&fd, hello) {
            Ok(_) => {}
            // Closed before we could even send: refused as well.
            Err(nix::errno::Errno::EPIPE) | Err(nix::errno::Errno::ECONNRESET) => {
                return Ok("EOF".into());
            }
            Err(e) => return Err(format!("send: {e}")),
        }
        let mut buf = vec![0u8; 65536];
        match nix::unistd::read(&fd, &mut buf) {
            Ok(0) | Err(nix::errno::Errno::ECONNRESET) => Ok("EOF".into()),
            Ok(n) => Ok(format!("ANSWER {}", String::from_utf8_lossy(&buf[..n]))),
            Err(e) => Err(format!("recv: {e}")),
        }
    })();
    match out {
        Ok(s) => println!("PROBE {s}"),
        Err(e) => println!("PROBE ERROR {e}"),
    }
}

/// Run the probe against `keeper_socket` as `uid` (None: as this process); returns its line.
fn probe_keeper(keeper_socket: &Path, uid: Option<u32>) -> String {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args([
        "--ignored",
        "--exact",
        "keeper_probe_process",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(PROBE_ENV, keeper_socket)
    .stdin(Stdio::null())
    .stderr(Stdio::null());
    if let Some(uid) = uid {
        run_as(&mut cmd, uid);
    }
    let out = cmd.output().expect("running the keeper probe");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| {
            l.find("PROBE ")
                .map(|i| l[i + "PROBE ".len()..].to_string())
        })
        .unwrap_or_else(|| panic!("the keeper probe printed no result:\n{text}"))
}

#[test]
fn a_keeper_refuses_a_peer_of_another_uid() {
    require_root();
    let mut d = TestDaemon::verbose("");
    let images = tempdir();
    let img = image(images.path(), "kept.img");
    let a = vm("kept");
    ok(d.acquire(&a.owner, vec![excl(&img)]));
    let keeper = keeper_pid(&d);
    let ks = d.keeper_socket();
    // The keeper accepts a connection only while no lockwardend is connected: the window is a
    // stopped daemon, when the keeper alone holds every lease.
    signal(d.proc.pid(), libc::SIGTERM);
    d.proc
        .wait_for(BOUND)
        .unwrap_or_else(|| panic!("lockwardend ignored SIGTERM:\n{}", d.log()));
    assert!(d.log().contains("keeps holding 1 lease(s)"), "{}", d.log());
    assert_eq!(byte0(&img), libc::F_WRLCK, "the keeper holds the lease");
    // Let uid 65534 reach the socket: only the keeper's own check stands in its way now.
    chmod(&d.dir, 0o755);
    chmod(ks.parent().expect("run dir"), 0o755);
    chmod(&ks, 0o666);

    let got = probe_keeper(&ks, Some(65534));
    assert_eq!(got, "EOF", "a peer of uid 65534 was answered by the keeper");
    d.wait_log("refusing pid");
    assert!(d.log().contains("with uid 65534"), "{}", d.log());
    assert_eq!(
        byte0(&img),
        libc::F_WRLCK,
        "the keeper still holds the lease"
    );

    // Control: the same probe as the keeper's own uid is answered, so the EOF above really is
    // the uid check and not a keeper that answers nobody.
    let got = probe_keeper(&ks, None);
    assert!(
        got.starts_with("ANSWER ") && got.contains(&format!("{keeper}")),
        "the probe as root was not answered: {got}"
    );
    // The keeper exits once the owner is gone and nobody is connected.
    drop(a);
    eventually("the keeper drops the lease of the dead owner", || {
        byte0(&img) == libc::F_UNLCK
    });
}

// ---------------------------------------------------------------------------------------------
// S7: a live re-exec scrubs LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES from the new image's
// environment and tells systemd RELOADING=1 (then READY=1) (docs/reliability.md "Live
// upgrade"). If LISTEN_* reached the new image (same pid, so LISTEN_PID still matches), it would
// adopt descriptors 3.. that by then mean something else.

/// A notify socket the test reads (what systemd's NOTIFY_SOCKET is: a datagram socket).
struct Notify {
    _dir: tempfile::TempDir,
    path: PathBuf,
    sock: UnixDatagram,
}

impl Notify {
    fn new() -> Notify {
        let dir = tempdir();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        sock.set_read_timeout(Some(BOUND)).expect("timeout");
        Notify {
            _dir: dir,
            path,
            sock,
        }
    }

    /// The next datagram (bounded wait).
    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self
            .sock
            .recv(&mut buf)
            .expect("no notification from lockwardend in time");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

fn environ_of(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/environ"))
        .expect("read /proc/PID/environ")
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

#[test]
fn a_live_reexec_scrubs_listen_variables_and_notifies_reloading() {
    let dir = tempdir();
    let main_path = dir.path().join("act.sock");
    let admin_path = dir.path().join("act-admin.sock");
    let main = UnixListener::bind(&main_path).expect("bind main");
    let admin = UnixListener::bind(&admin_path).expect("bind admin");
    let (mfd, afd) = (main.as_raw_fd(), admin.as_raw_fd());
    let notify = Notify::new();
    let log = dir.path().join("log");
    let mut cmd = common::daemon::socket_activated(dir.path(), afd, mfd);
    cmd.env("NOTIFY_SOCKET", &notify.path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).expect("log"));
    let mut p = Proc(cmd.spawn().expect("spawn lockwardend"));
    let show = || fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(notify.next(), "READY=1", "{}", show());
    let env = environ_of(p.pid());
    assert!(
        env.iter().any(|v| v.starts_with("LISTEN_FDS=")),
        "the first image was socket-activated: {env:?}"
    );
    let images = tempdir();
    let img = image(images.path(), "reexec.img");
    let a = vm("through-reexec");
    ok(Client::connect(&main_path).call(&Request::Acquire {
        owner: a.owner.clone(),
        leases: vec![excl(&img)],
        action: FailureAction::Default,
        restrict: false,
    }));

    signal(p.pid(), libc::SIGUSR1);
    assert_eq!(notify.next(), "RELOADING=1", "{}", show());
    assert_eq!(notify.next(), "READY=1", "{}", show());
    let listen: Vec<String> = environ_of(p.pid())
        .into_iter()
        .filter(|v| v.starts_with("LISTEN_"))
        .collect();
    assert!(
        listen.is_empty(),
        "the re-executed image still has systemd's activation variables: {listen:?}"
    );
    assert!(p.0.try_wait().expect("try_wait").is_none(), "{}", show());
    // Same sockets, same lease, same roles (the admin socket still refuses main requests).
    assert_eq!(
        ok(Client::connect(&main_path).call(&Request::Inquire {
            owner: a.owner.clone()
        }))
        .len(),
        1
    );
    err(
        Client::connect(&admin_path).call(&Request::Inquire {
            owner: a.owner.clone(),
        }),
        ErrorKind::Denied,
    );
    assert_eq!(byte0(&img), libc::F_WRLCK);
    assert!(
        !dir.path().join("unused.sock").exists(),
        "the new image bound its own socket instead of keeping systemd's"
    );
    signal(p.pid(), libc::SIGTERM);
    assert_eq!(p.wait_for(BOUND).map(|s| s.code()), Some(Some(0)));
    drop((main, admin));
}

// ---------------------------------------------------------------------------------------------
// S9: a termination in progress (SIGTERM sent, SIGKILL due after kill_grace_ms) survives a live
// re-exec (docs/reliability.md "Live upgrade": "termination sequences (phase, time left)"). Lost,
// the VM that lost its handle would keep running, and nothing would ever end it.

#[test]
fn a_sigterm_to_sigkill_sequence_in_progress_survives_a_live_reexec() {
    let notify = Notify::new();
    let d = TestDaemon::with(Opts {
        config: "kill_grace_ms = 3000\n",
        env: vec![("NOTIFY_SOCKET", notify.path.clone().into_os_string())],
        verbose: true,
        ..Opts::default()
    });
    assert_eq!(notify.next(), "READY=1");
    let images = tempdir();
    let img = image(images.path(), "stubborn.img");
    let (mut p, owner, resp) = spawn_registered(
        &d.socket,
        "stubborn",
        "trap '' TERM; read cmd; exec 9>&-; exec sleep 1000",
    );
    ok(resp);
    ok(d.acquire(&owner, vec![excl(&img)]));
    tell(&mut p, "close");
    // The sequence starts: SIGTERM now, SIGKILL after the grace period.
    d.wait_log("sending SIGTERM");
    signal(d.proc.pid(), libc::SIGUSR1);
    assert_eq!(notify.next(), "RELOADING=1", "{}", d.log());
    assert_eq!(notify.next(), "READY=1", "{}", d.log());
    // The premise: the new image took over while the owner still ran (3 s of grace left less
    // the time since SIGTERM; a re-exec takes milliseconds).
    assert!(
        p.0.try_wait().expect("try_wait").is_none(),
        "the owner died before the re-exec finished; the test proves nothing:\n{}",
        d.log()
    );
    assert_eq!(byte0(&img), libc::F_WRLCK, "held while the owner runs");
    // The new image finishes the sequence.
    let st = p.wait_for(BOUND).unwrap_or_else(|| {
        panic!(
            "the re-executed daemon never killed the owner:\n{}",
            d.log()
        )
    });
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{st}");
    eventually("the killed owner's lease is released", || {
        d.list().is_empty()
    });
    assert_eq!(byte0(&img), libc::F_UNLCK);
}

// ---------------------------------------------------------------------------------------------
// The FUSE test file system (tests/fusefs/testfs.rs, the example `testfs`): storage that loses
// a lock or serves lock calls late, on demand. Needs /dev/fuse.

/// One mounted test file system; unmounted on drop.
fn mount_fs() -> Fs {
    require_root();
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: load the fuse module (modprobe fuse)"
    );
    Fs::mount("lw-safety", BOUND)
}

// ---------------------------------------------------------------------------------------------
// S6: on_lockfailure=restart, through the plugin: a lost lock SIGKILLs the VM (libvirt then
// starts it again, and the new start must win the lock anew) (docs/storage.md "Lost locks").

#[test]
fn on_lockfailure_restart_sigkills_the_vm_whose_lock_was_lost() {
    let f = mount_fs();
    let d = TestDaemon::verbose("lease_check_interval_ms = 200\n");
    let mut h = d.host();
    let img = f.mnt.join("restart.img");
    fs::write(f.backing.join("restart.img"), vec![0u8; 4096]).expect("image");
    let vm = h.start("lost-restart");
    h.acquire_action("restart", &vm, &[disk(&img)])
        .expect_ok("acquire with on_lockfailure=restart");
    // Healthy checks run first and leave it alone: proven by the checks' own events (each
    // check sets the lock again on the mount; the first setlk was the acquire), not by a sleep.
    wait_until_or(
        "a lease check ran",
        BOUND,
        || f.events(),
        || f.events().matches("setlk restart.img").count() >= 3,
    );
    assert!(h.alive(vm.pid), "a healthy lease check touched the VM");

    f.set("lost restart.img\n");
    wait_until_or(
        "the VM whose lock was lost is dead",
        BOUND,
        || format!("state {:?}", proc_state(vm.pid as u32)),
        || proc_state(vm.pid as u32) == Some('Z'),
    );
    let status = h.cmd(&format!("wait {}", vm.pid));
    let st: i32 = status
        .expect_ok("wait for the killed VM")
        .trim()
        .parse()
        .expect("wait status");
    assert!(
        libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL,
        "the VM ended with wait status {st}, not by SIGKILL"
    );
    let log = fs::read_to_string(&d.log).unwrap_or_default();
    assert!(
        log.contains("is LOST") && log.contains("killing its process (SIGKILL)"),
        "{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// S3: a lock file deleted or replaced underneath while the daemon locks it (virtlockd deletes
// its lock file on release; another host may create a new one) is opened again, and the lock
// ends up on the file the name points at (docs/protocol.md "Lock files").
//
// Deterministic: the test file system serves lock calls 2 s late (`delay_ms`), so the daemon is
// held between its open and its "is the name still ours?" check; the test sees the open (the
// file system's descriptor for the file appears), deletes the file then, and checks afterwards
// that the deletion really came before the lock call was answered (else it says the premise
// failed instead of passing).

/// Does process `pid` have `path` open?
fn has_open(pid: u32, path: &Path) -> bool {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    dir.flatten()
        .any(|e| fs::read_link(e.path()).is_ok_and(|t| t == path))
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos()
}

#[test]
fn a_lock_file_deleted_while_it_is_being_locked_is_opened_again() {
    let f = mount_fs();
    let d = TestDaemon::verbose("lease_check_interval_ms = 0\n");
    // testfs has no mkdir: the lockspace directory exists on the "server" already.
    let backing_dir = f.backing.join("locks");
    fs::create_dir(&backing_dir).expect("mkdir locks");
    chmod(&backing_dir, 0o700);
    let backing_file = backing_dir.join("vm-disk");
    fs::write(&backing_file, b"").expect("the other host's lock file");
    chmod(&backing_file, 0o600);
    let spec = lockspace_spec(
        "/images/replaced.qcow2",
        &f.mnt.join("locks"),
        "vm-disk",
        LeaseMode::Exclusive,
    );
    let a = vm("replaced");
    f.set("delay_ms 2000\n");
    let (socket, owner, s2) = (d.socket.clone(), a.owner.clone(), spec.clone());
    let acquiring = std::thread::spawn(move || {
        Client::connect(&socket).call(&Request::Acquire {
            owner,
            leases: vec![s2],
            action: FailureAction::Default,
            restrict: false,
        })
    });
    // The daemon opened the lock file (testfs has the backing file open) and its lock call is
    // held back by the file system (testfs logged it): virtlockd's release deletes the file now.
    poll_every(Duration::from_millis(1), BOUND, || {
        (has_open(f.tfs.pid(), &backing_file)
            && f.events()
                .lines()
                .any(|l| l.starts_with("setlk-delayed vm-disk ")))
        .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the daemon never opened and locked the lock file:\n{}",
            f.events()
        )
    });
    fs::remove_file(&backing_file).expect("delete the lock file underneath");
    let deleted_at = now_ns();
    f.set("");
    let answer = acquiring.join().expect("acquire thread");
    assert!(matches!(answer, Response::Ok { .. }), "{answer:?}");
    // The premise: the first lock call was answered after the deletion.
    let first_setlk_end: u128 = f
        .events()
        .lines()
        .find(|l| l.starts_with("setlk vm-disk "))
        .and_then(|l| l.split(' ').nth(4))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no lock call on the file system:\n{}", f.events()));
    assert!(
        deleted_at < first_setlk_end,
        "premise failed: the file was deleted only after the lock call returned; the test \
         proves nothing this run (machine too slow for the 2 s window?)"
    );
    // The lock is on the file the name points at now: a new file (had the daemon kept the
    // deleted inode, nothing would be at the name), locked.
    assert!(
        backing_file.exists(),
        "no lock file at the name: the lease is on the deleted inode"
    );
    assert_eq!(
        probe_lock(&backing_file, 0, 1, libc::F_WRLCK).0,
        libc::F_WRLCK,
        "the file at the lock file's name is not locked: the lease is on the deleted inode"
    );
    d.wait_log("was replaced or deleted while we locked it; retrying");
}

// ---------------------------------------------------------------------------------------------
// S11: direct mode judges what it actually opened, not what stat saw (docs/hardening.md
// "Direct mode"): a path swapped to a FIFO between the daemon's stat and open must not end up
// "locked" (a lease on the FIFO would leave the real image unlocked).
//
// The window is inside one daemon worker between two system calls, with no file system call
// in between that a test could stall (testfs delays lock calls only, which come after both),
// so it cannot be forced. This test makes it likely instead: a thread swaps the image and a
// FIFO atomically (renameat2 RENAME_EXCHANGE) without pause while the test acquires again and
// again. Every acquire must either be refused naming the FIFO, or hold the real image's inode.
// With the check after open removed, runs of 2000 acquires failed 3 times out of 4 (at rounds
// 583, 1023 and 1119): 5000 rounds (a few seconds) make a miss unlikely, never a false failure.

#[test]
fn direct_mode_judges_what_it_opened_when_the_path_is_swapped() {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let d = TestDaemon::verbose("lease_check_interval_ms = 0\n");
    let images = tempdir();
    let img = image(images.path(), "swapped.img");
    let keep = images.path().join("swapped.keep");
    fs::hard_link(&img, &keep).expect("a second name for the image inode");
    let fifo = images.path().join("swapped.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let (c_img, c_fifo) = (
        CString::new(img.as_os_str().as_bytes()).expect("path"),
        CString::new(fifo.as_os_str().as_bytes()).expect("path"),
    );
    let exchange = move || {
        // SAFETY: renameat2 on two NUL-terminated paths that outlive the call.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                c_img.as_ptr(),
                libc::AT_FDCWD,
                c_fifo.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        assert_eq!(r, 0, "renameat2: {}", std::io::Error::last_os_error());
    };
    let gate = Arc::new(Mutex::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (gate, stop, exchange) = (gate.clone(), stop.clone(), exchange.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // A poisoned gate: the test failed and is unwinding.
                let Ok(_g) = gate.lock() else { break };
                exchange();
                n += 1;
            }
            n
        })
    };
    let a = vm("swapped");
    let (mut held, mut refused) = (0u32, 0u32);
    for round in 0..5000 {
        match d.acquire(&a.owner, vec![excl(&img)]) {
            Response::Ok { .. } => {
                held += 1;
                // Pause the swapping, put the image back at its name, check and release.
                let _g = gate.lock().expect("gate");
                if fs::symlink_metadata(&img)
                    .expect("stat")
                    .file_type()
                    .is_fifo()
                {
                    exchange();
                }
                assert_eq!(
                    probe_lock(&keep, 0, 1, libc::F_WRLCK).0,
                    libc::F_WRLCK,
                    "round {round}: the acquire succeeded, but the image is not locked (the \
                     daemon locked what was swapped in)"
                );
                ok(d.release(&a.owner, vec![excl(&img)]));
                assert!(d.held(&a.owner).is_empty(), "round {round}");
            }
            Response::Error(e) if e.kind == ErrorKind::Invalid && e.message.contains("a FIFO") => {
                refused += 1;
            }
            other => panic!("round {round}: {other:?}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().expect("swapper");
    eprintln!("{held} acquires held the image, {refused} refused a FIFO, {swaps} swaps");
    assert!(
        held > 0 && refused > 0,
        "the swapping did not race the acquires ({held} held, {refused} refused)"
    );
    assert!(d.list().is_empty());
}

/// S3, second half: two hosts creating the same lock file at once. Whoever loses the O_EXCL
/// create (EEXIST) opens the winner's file (docs/protocol.md "Lock files"); with shared leases
/// both must then hold it. The window (between the daemon's plain open finding nothing and its
/// exclusive create) lies between two system calls and cannot be forced, so the two daemons
/// race for a fresh file many times; every round must end with both holding the same file.
#[test]
fn two_hosts_creating_one_lock_file_at_once_both_get_it() {
    use std::sync::{Arc, Barrier};
    let (d1, d2) = (
        TestDaemon::verbose("lease_check_interval_ms = 0\n"),
        TestDaemon::verbose("lease_check_interval_ms = 0\n"),
    );
    let base = tempdir();
    let locks = base.path().join("locks");
    let spec = lockspace_spec("/images/race.iso", &locks, "race", LeaseMode::Shared);
    let (a, b) = (vm("race-host1"), vm("race-host2"));
    let file = locks.join("race");
    for round in 0..300 {
        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<_> = [(&d1, &a), (&d2, &b)]
            .into_iter()
            .map(|(d, v)| {
                let (socket, owner, spec, barrier) = (
                    d.socket.clone(),
                    v.owner.clone(),
                    spec.clone(),
                    barrier.clone(),
                );
                std::thread::spawn(move || {
                    let mut c = Client::connect(&socket);
                    barrier.wait();
                    c.call(&Request::Acquire {
                        owner,
                        leases: vec![spec],
                        action: FailureAction::Default,
                        restrict: false,
                    })
                })
            })
            .collect();
        for r in racers {
            let answer = r.join().expect("racer");
            assert!(
                matches!(answer, Response::Ok { .. }),
                "round {round}: a host lost the race for the lock file: {answer:?}"
            );
        }
        // One file, held shared by both (the kernel shows a read lock to a writer).
        assert_eq!(
            probe_lock(&file, 0, 1, libc::F_WRLCK).0,
            libc::F_RDLCK,
            "round {round}"
        );
        ok(d1.release(&a.owner, vec![spec.clone()]));
        ok(d2.release(&b.owner, vec![spec.clone()]));
        eventually("the last release deletes the lock file", || !file.exists());
    }
}
