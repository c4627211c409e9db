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

// ---------------------------------------------------------------------------------------------
// Protocol-level daemons (each test starts its own; killed on drop)

use common::proto::{
    Client, Proc, byte0, err, eventually, excl, ok, probe_lock, shared, signal, spawn_registered,
    tell, vm,
};
use lockwarden::protocol::{
    ErrorKind, FailureAction, LeaseInfo, LeaseMode, LeaseSpec, LockTarget, Owner, Request,
    ResourceKind, Response,
};
use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DAEMON: &str = env!("CARGO_BIN_EXE_lockwardend");
/// Bound for anything asynchronous on a busy machine (never a performance assertion).
const BOUND: Duration = Duration::from_secs(30);

struct Lw {
    proc: Proc,
    dir: tempfile::TempDir,
    socket: PathBuf,
    admin: PathBuf,
    log: PathBuf,
}

impl Lw {
    fn start() -> Lw {
        Lw::start_with("", &[])
    }

    fn start_with(config: &str, env: &[(&str, OsString)]) -> Lw {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("run/lockwardend.sock");
        let admin = dir.path().join("run/lockwardend-admin.sock");
        let conf = dir.path().join("lockwardend.conf");
        fs::write(&conf, config).expect("write lockwardend.conf");
        let log = dir.path().join("daemon.log");
        let mut cmd = Command::new(DAEMON);
        cmd.arg("--config")
            .arg(&conf)
            .arg("--socket")
            .arg(&socket)
            .arg("--admin-socket")
            .arg(&admin)
            .arg("--pid-file")
            .arg(dir.path().join("run/lockwardend.pid"))
            .arg("--verbose")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("daemon log"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let proc = Proc(cmd.spawn().expect("spawning lockwardend"));
        let mut d = Lw {
            proc,
            dir,
            socket,
            admin,
            log,
        };
        let t0 = Instant::now();
        while UnixStream::connect(&d.socket).is_err() || UnixStream::connect(&d.admin).is_err() {
            if let Some(st) = d.proc.0.try_wait().expect("try_wait") {
                panic!("lockwardend exited during start ({st}):\n{}", d.log());
            }
            assert!(t0.elapsed() < BOUND, "lockwardend did not serve:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(5));
        }
        d
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait (bounded) until the log holds `needle` at least `count` times.
    fn wait_log(&self, needle: &str, count: usize) {
        let t0 = Instant::now();
        while self.log().matches(needle).count() < count {
            assert!(
                t0.elapsed() < BOUND,
                "the daemon never logged {needle:?} ({count}x):\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn client(&self) -> Client {
        Client::connect(&self.socket)
    }

    fn list(&self) -> Vec<LeaseInfo> {
        ok(Client::connect(&self.admin).call(&Request::List))
    }

    fn acquire(&self, owner: &Owner, leases: Vec<LeaseSpec>) -> Response {
        self.client().call(&Request::Acquire {
            owner: owner.clone(),
            leases,
            action: FailureAction::Default,
            restrict: false,
        })
    }

    fn release(&self, owner: &Owner, leases: Vec<LeaseSpec>) -> Response {
        self.client().call(&Request::Release {
            owner: owner.clone(),
            leases,
        })
    }

    fn held(&self, owner: &Owner) -> Vec<LeaseInfo> {
        self.client().held(owner)
    }

    fn keeper_socket(&self) -> PathBuf {
        self.socket.with_file_name("lockwardend-keeper.sock")
    }

    /// The pid of the keeper this daemon last started (from its log, so that nothing connects
    /// to the keeper: a connection of the daemon's uid would replace the daemon's own link).
    fn keeper_pid(&self) -> u32 {
        let log = self.log();
        let at = log
            .rfind("started the keeper (pid ")
            .unwrap_or_else(|| panic!("no keeper start in the log:\n{log}"));
        let rest = &log[at + "started the keeper (pid ".len()..];
        rest[..rest.find(')').expect("pid end")]
            .parse()
            .expect("keeper pid")
    }
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
    let d = Lw::start();
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
    let (d1, d2) = (Lw::start(), Lw::start());
    let base = tempdir();
    let locks = base.path().join("lockspace");
    let spec = lockspace_spec("/images/shared.iso", &locks, "shared-iso", LeaseMode::Shared);
    let (a, x) = (vm("host1-reader"), vm("host2-reader"));
    ok(d1.acquire(&a.owner, vec![spec.clone()]));
    ok(d2.acquire(&x.owner, vec![spec.clone()]));
    let file = locks.join("shared-iso");
    let ino = fs::metadata(&file).expect("lock file").ino();
    assert_eq!(byte0(&file), libc::F_RDLCK);

    // Host 1's last reader leaves: host 2 still holds the file shared, so it stays.
    ok(d1.release(&a.owner, vec![spec.clone()]));
    d1.wait_log("lock file kept, another host still holds a shared lock on it", 1);
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
    let d = Lw::start();
    let images = tempdir();
    let (img1, img2) = (image(images.path(), "k1.img"), image(images.path(), "k2.img"));
    let (a, b) = (vm("before"), vm("after"));
    ok(d.acquire(&a.owner, vec![excl(&img1)]));
    let keeper = d.keeper_pid();
    // Make a replacement keeper impossible: its socket path becomes a directory (the daemon
    // refuses to remove anything there but a socket). The live keeper keeps its listener.
    let ks = d.keeper_socket();
    fs::rename(&ks, ks.with_extension("moved")).expect("move the keeper socket away");
    fs::create_dir(&ks).expect("obstacle at the keeper socket path");
    signal(keeper, libc::SIGKILL);
    // The daemon noticed and could not start another keeper.
    d.wait_log("exists and is not a socket", 1);

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
        d.list().iter().all(|l| l.lock_path != img2.to_str().unwrap()),
        "{:?}",
        d.list()
    );
    // The lease granted before is still held by the daemon itself.
    assert_eq!(byte0(&img1), libc::F_WRLCK);

    // Once a keeper can start again, the same acquire succeeds and both leases are handed over.
    fs::remove_dir(&ks).expect("remove the obstacle");
    ok(d.acquire(&b.owner, vec![excl(&img2)]));
    assert_eq!(byte0(&img2), libc::F_WRLCK);
    d.wait_log("holds all 2 lease(s) again", 1);
    assert_ne!(d.keeper_pid(), keeper);
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
        // SAFETY: only async-signal-safe libc calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = cmd.output().expect("running the keeper probe");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.find("PROBE ").map(|i| l[i + "PROBE ".len()..].to_string()))
        .unwrap_or_else(|| panic!("the keeper probe printed no result:\n{text}"))
}

#[test]
fn a_keeper_refuses_a_peer_of_another_uid() {
    require_root();
    let mut d = Lw::start();
    let images = tempdir();
    let img = image(images.path(), "kept.img");
    let a = vm("kept");
    ok(d.acquire(&a.owner, vec![excl(&img)]));
    let keeper = d.keeper_pid();
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
    chmod(d.dir.path(), 0o755);
    chmod(ks.parent().expect("run dir"), 0o755);
    chmod(&ks, 0o666);

    let got = probe_keeper(&ks, Some(65534));
    assert_eq!(got, "EOF", "a peer of uid 65534 was answered by the keeper");
    d.wait_log("refusing pid", 1);
    assert!(d.log().contains("with uid 65534"), "{}", d.log());
    assert_eq!(byte0(&img), libc::F_WRLCK, "the keeper still holds the lease");

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
