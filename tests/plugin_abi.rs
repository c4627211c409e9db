//! The plugin at its ABI: the real `target/debug/liblockwarden.so`, loaded by the C test host
//! (`tests/c/host.c`) exactly as libvirt's loader loads it, talking to a real `lockwardend`.
//!
//! What is checked here is the plugin's side of the contract: the exported symbol and layout,
//! every bad input refused with a libvirt error (code, domain 42, message) and without side
//! effects, the panic boundary, configuration handling, the connection to the daemon (missing
//! daemon, silent daemon, other protocol version, daemon errors passed verbatim) and the
//! call sequences libvirt really makes. Lock semantics across hosts are `tests/scenarios.rs`'s.

mod common;

use common::daemon::{Opts, TestDaemon};
use common::host::{Host, HostOpts, parse_err};
use common::wait::{poll_every, wait_until};
use common::{Vm, disk, esc, plugin_path};
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use lockwarden::protocol::{self, ErrorKind, Request, Response};

const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

// ---- the C host (tests/common/host.rs) -------------------------------------------------

/// A host with the plugin config argument `conf` as given (a path that need not exist, or
/// `@null`), `env` and maybe `--no-init`; returns whatever its first line was.
fn spawn_host(conf: &OsStr, env: &[(&str, &str)], no_init: bool) -> Host {
    Host::launch(
        "",
        HostOpts {
            conf_arg: Some(conf),
            env,
            no_init,
            reply_timeout: Some(REPLY_TIMEOUT),
            ..HostOpts::default()
        },
    )
}

/// A host with the plugin config at `conf` (need not exist); panics unless READY.
fn new_host(conf: &Path) -> Host {
    let h = spawn_host(conf.as_os_str(), &[], false);
    assert_eq!(
        h.ready_line,
        "READY",
        "host did not come up; stderr: {}",
        h.stderr_text()
    );
    h
}

// ---- VMs ----------------------------------------------------------------------------------

/// A VM named exactly `name` (with a UUID and id unique in this binary).
fn vm(name: &str) -> Vm {
    Vm {
        name: name.to_string(),
        ..Vm::new(name)
    }
}

// ---- a real daemon ------------------------------------------------------------------------

/// A daemon whose `<lease>` files may live under `dir` (lease_dir, docs/hardening.md).
fn start_daemon(dir: &Path) -> TestDaemon {
    TestDaemon::with(Opts {
        config: &format!("lease_dir = \"{}\"\n", dir.display()),
        verbose: true,
        ..Opts::default()
    })
}

/// A plugin config file in `dir` pointing at `d`, plus `extra` lines.
fn plugin_conf(d: &TestDaemon, dir: &Path, extra: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let p = dir.join(format!(
        "qemu-lockwarden-{}.conf",
        N.fetch_add(1, Ordering::Relaxed)
    ));
    fs::write(
        &p,
        format!("daemon_socket = \"{}\"\n{extra}", d.socket.display()),
    )
    .expect("plugin config");
    p
}

/// `acquire` of `res` for `vm` as owner `pid` succeeds (else panics with the daemon log).
#[track_caller]
fn acquired(h: &mut Host, d: &TestDaemon, vm: &Vm, pid: i32, res: &[String]) {
    assert_eq!(h.acquire_as(vm, pid, res), "OK", "log:\n{}", d.log());
}

/// `DIR/plugin.conf` naming a daemon socket where no daemon listens (`DIR/none.sock`).
fn conf_without_daemon(dir: &Path) -> PathBuf {
    let conf = dir.join("plugin.conf");
    fs::write(
        &conf,
        format!("daemon_socket = \"{}\"\n", dir.join("none.sock").display()),
    )
    .unwrap();
    conf
}

/// A directory, a daemon whose lease files may live in it, and a host configured for it.
fn daemon_and_host() -> (tempfile::TempDir, TestDaemon, Host) {
    let dir = tempdir();
    let d = start_daemon(dir.path());
    let h = new_host(&plugin_conf(&d, dir.path(), ""));
    (dir, d, h)
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lw-abi")
        .tempdir()
        .expect("tempdir")
}

fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, vec![0u8; 4096]).expect("image");
    p
}

/// Another owner can take `disk` and give it back: proof that nothing stayed locked.
#[track_caller]
fn assert_free(h: &mut Host, res: &str) {
    let other = vm("bystander");
    let pid = h.start_owner(&other, &[]);
    let r = h.acquire_as(&other, pid, &[res.to_string()]);
    assert_eq!(r, "OK", "{res} should be free for another owner: {r}");
    let r = h.release_as(&other, pid, &[res.to_string()]);
    assert_eq!(r, "OK", "release by the bystander: {r}");
}

// ---- the shared object --------------------------------------------------------------------

#[test]
fn exports_only_the_driver_table() {
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(plugin_path())
        .output()
        .expect("nm (binutils) is needed for this test");
    assert!(out.status.success(), "nm failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let symbols: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(symbols.len(), 1, "exported symbols: {symbols:#?}");
    let fields: Vec<&str> = symbols[0].split_whitespace().collect();
    assert_eq!(&fields[1..], ["D", "virLockDriverImpl"], "{symbols:?}");
}

#[test]
fn linked_nodelete() {
    let out = Command::new("readelf")
        .arg("-d")
        .arg(plugin_path())
        .output()
        .expect("readelf (binutils) is needed for this test");
    assert!(out.status.success(), "readelf failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let flags = text
        .lines()
        .find(|l| l.contains("FLAGS_1"))
        .unwrap_or_else(|| panic!("no FLAGS_1 entry:\n{text}"));
    assert!(flags.contains("NODELETE"), "{flags}");
}

#[test]
fn driver_table_layout_seen_by_the_loader() {
    let dir = tempdir();
    let mut h = new_host(&dir.path().join("absent.conf"));
    // st_size of the exported object, version, flags, and all eight function pointers set.
    assert_eq!(h.ok("layout"), "size=72 version=1000000 flags=0 fns=8");
    assert_eq!(h.ok("deinit"), "0");
}

// ---- configuration ------------------------------------------------------------------------

#[test]
fn bad_config_makes_init_fail_naming_file_line_and_key() {
    let dir = tempdir();
    for (text, line, key, needle) in [
        (
            "auto_disk_leases = 1\n\nbogus_key = 1\n",
            3,
            "bogus_key",
            "unknown key",
        ),
        (
            "request_timeout_ms = 0\n",
            1,
            "request_timeout_ms",
            "out of range",
        ),
        (
            "# c\nreadonly_disks = \"sometimes\"\n",
            2,
            "readonly_disks",
            "\"sometimes\"",
        ),
        (
            "file_lockspace_dir = \"relative\"\n",
            1,
            "file_lockspace_dir",
            "absolute",
        ),
        (
            "auto_disk_leases = 1\nauto_disk_leases = 0\n",
            2,
            "auto_disk_leases",
            "set twice",
        ),
    ] {
        let conf = dir.path().join("qemu-lockwarden.conf");
        fs::write(&conf, text).unwrap();
        let mut h = spawn_host(conf.as_os_str(), &[], false);
        let e = parse_err(&h.ready_line)
            .unwrap_or_else(|| panic!("Init should fail for {text:?}, got {}", h.ready_line));
        e.expect(
            67,
            &[&format!("{}:{line}: key '{key}'", conf.display()), needle],
        );
        let st = h.wait_exit();
        assert_eq!(st.code(), Some(1), "the host exits 1 after a failed Init");
    }
}

#[test]
fn missing_or_null_config_means_defaults() {
    let dir = tempdir();
    let default_socket = lockwarden::paths::default_socket();
    let absent = dir.path().join("absent.conf");
    for conf in [absent.as_os_str(), OsStr::new("@null")] {
        let mut h = spawn_host(conf, &[], false);
        assert_eq!(
            h.ready_line,
            "READY",
            "defaults for {conf:?}: {}",
            h.stderr_text()
        );
        let a = vm("defaults");
        let img = dir.path().join("nonexistent.img");
        let r = h.acquire_as(&a, std::process::id() as i32, &[disk(&img)]);
        if default_socket.exists() {
            // A daemon runs at the default socket on this machine: the request reached it.
            assert!(!r.contains("cannot connect"), "{r}");
        } else {
            parse_err(&r)
                .expect("acquire without a daemon fails")
                .expect(
                    1,
                    &[&format!(
                        "cannot connect to lockwardend at {:?}",
                        default_socket
                    )],
                );
        }
    }
}

#[test]
fn second_init_keeps_the_first_config() {
    let dir = tempdir();
    let first = dir.path().join("first.conf");
    let second = dir.path().join("second.conf");
    let bad = dir.path().join("bad.conf");
    fs::write(&first, "daemon_socket = \"/nonexistent/first.sock\"\n").unwrap();
    fs::write(&second, "daemon_socket = \"/nonexistent/second.sock\"\n").unwrap();
    fs::write(&bad, "no_such_key = 1\n").unwrap();
    let mut h = new_host(&first);
    // libvirt calls drvInit once per driver (qemu, libxl); lockd keeps the first config.
    h.ok(&format!(
        "raw-init 1000000 0 {}",
        esc(second.to_str().unwrap())
    ));
    h.ok(&format!(
        "raw-init 1000000 0 {}",
        esc(bad.to_str().unwrap())
    ));
    h.ok("raw-init 1000000 0 @null");
    let a = vm("twice");
    let e = h.err(&format!("acquire {} 1 disk:/img/a", a.head()));
    e.expect(1, &["/nonexistent/first.sock"]);
    // Flags and version are still checked on every call.
    h.err("raw-init 1000000 1 @null")
        .expect(55, &["drvInit: unsupported flags 0x1"]);
    h.err("raw-init 2000000 0 @null")
        .expect(55, &["version 2000000"]);
}

#[test]
fn failed_first_init_leaves_nothing_and_a_later_init_works() {
    let dir = tempdir();
    let bad = dir.path().join("bad.conf");
    let good = dir.path().join("good.conf");
    fs::write(&bad, "daemon_socket = 42\n").unwrap();
    fs::write(&good, "daemon_socket = \"/nonexistent/good.sock\"\n").unwrap();
    let mut h = spawn_host(OsStr::new("@null"), &[], true);
    assert_eq!(h.ready_line, "READY");
    // Entry points before a successful Init fail cleanly. virReportErrorHelper is looked up
    // in drvInit, so this is also the path where it is unknown: the error goes to fd 2 as one
    // line, and the host sees -1 without a libvirt error.
    let r = h.raw("raw-new 0 0 uuid:uuid:11111111-2222-3333-4444-555555555555 name:string:x");
    assert_eq!(
        r,
        "ERR 0 0 host: drvNew returned -1 without raising a libvirt error"
    );
    assert!(
        h.stderr_text().contains(
            "lockwarden: drvNew error 1: the lockwarden plugin was used before drvInit succeeded"
        ),
        "fallback line on fd 2: {:?}",
        h.stderr_text()
    );
    h.err(&format!(
        "raw-init 1000000 0 {}",
        esc(bad.to_str().unwrap())
    ))
    .expect(67, &[&format!("{}:1: key 'daemon_socket'", bad.display())]);
    h.ok(&format!(
        "raw-init 1000000 0 {}",
        esc(good.to_str().unwrap())
    ));
    let a = vm("late");
    h.err(&format!("acquire {} 1 disk:/img/a", a.head()))
        .expect(1, &["/nonexistent/good.sock"]);
}

// ---- bad input at the ABI (no daemon needed: all refused before any round trip) ----------

const UUID: &str = "c7a5fdbd-cdaf-9455-926a-d65c16db1809";

#[test]
fn bad_input_is_refused_with_a_libvirt_error() {
    let (dir, _d, mut h) = daemon_and_host();
    // A real image and a real owner: an input that slipped through would reach the daemon
    // and succeed (or lock the image), which the checks below would notice.
    let img = image(dir.path(), "a.qcow2");
    let img_tok = esc(img.to_str().unwrap());
    let web1 = vm("web1");
    let pid = h.start_owner(&web1, &[]);
    let good = format!(
        "uuid:uuid:{} name:string:web1 id:uint:{} pid:uint:{pid}",
        web1.uuid, web1.id
    );
    let long = format!("/{}", "x".repeat(5000));

    // drvNew
    for (cmd, code, needles) in [
        (
            "raw-new 0 0 name:string:web1 id:uint:1".to_string(),
            55,
            vec!["'uuid' is missing"],
        ),
        (
            format!("raw-new 0 0 uuid:uuid:{UUID} id:uint:1"),
            55,
            vec!["'name' is missing"],
        ),
        (
            format!("raw-new 0 0 uuid:uuid:{UUID} name:string:@null"),
            55,
            vec!["'name' is a NULL string"],
        ),
        (
            format!("raw-new 0 0 uuid:uuid:{UUID} name:string:"),
            55,
            vec!["'name' is empty"],
        ),
        (
            "raw-new 0 0 uuid:uuid:00000000-0000-0000-0000-000000000000 name:string:web1".into(),
            55,
            vec!["all bytes are equal"],
        ),
        (
            "raw-new 0 0 uuid:string:x name:string:web1".into(),
            55,
            vec!["'uuid' has type STRING, expected UUID"],
        ),
        (
            format!("raw-new 0 0 uuid:uuid:{UUID} name:uint:3"),
            55,
            vec!["'name' has type UINT"],
        ),
        (
            format!("raw-new 0 0 uuid:uuid:{UUID} name:string:web1 id:string:one"),
            55,
            vec!["VM 'web1'", "'id' has type STRING"],
        ),
        (
            format!("raw-new 0 0 uuid:uuid:{UUID} name:string:web1 pid:int:-5"),
            55,
            vec!["'pid' is -5"],
        ),
        (
            format!("raw-new 0 0 uuid:uuid:{UUID} name:string:web1 pid:99:"),
            55,
            vec!["'pid' has type unknown type 99"],
        ),
        (
            format!("raw-new 0 0 uuid:uuid:{UUID} name:string:web1 uri:uint:1"),
            55,
            vec!["'uri' has type UINT"],
        ),
        (
            format!("raw-new 0 0 {good} name:string:again"),
            55,
            vec!["'name' is given more than once"],
        ),
        (
            format!("raw-new 0 0 {good} @null:uint:1"),
            55,
            vec!["parameter #4 has a NULL key"],
        ),
        (
            "raw-new 0 0 @nullparams:5".into(),
            55,
            vec!["5 parameter(s) announced but the parameter array is NULL"],
        ),
        (
            format!("raw-new 1 0 {good}"),
            55,
            vec!["unknown lock manager object type 1"],
        ),
        (
            format!("raw-new 0 2 {good}"),
            55,
            vec!["drvNew: unsupported flags 0x2"],
        ),
        (
            "raw-null-man new".into(),
            55,
            vec!["drvNew: the lock manager pointer is NULL"],
        ),
    ] {
        h.err(&cmd).expect(code, &needles);
    }
    // Unknown keys (any type) are ignored for forward compatibility; a NULL uri is fine.
    h.ok(&format!(
        "raw-new 0 1 {good} uri:cstring:@null future:string:x weird:99: d:double:1.5"
    ));

    // drvAddResource, on a good manager; every failure leaves it as it was.
    let bad_adds = [
        (
            "raw-add 0 0 @null".to_string(),
            55,
            vec!["disk path is a NULL pointer"],
        ),
        // %00 ends the C string right away: an empty name.
        ("raw-add 0 0 %00".to_string(), 67, vec!["the path is empty"]),
        (
            "raw-add 0 0 images/vm.qcow2".into(),
            67,
            vec!["'images/vm.qcow2'", "VM 'web1'", "relative"],
        ),
        (
            format!("raw-add 0 0 {long}"),
            67,
            vec!["5001 bytes long", "PATH_MAX"],
        ),
        (
            format!("raw-add 0 4 {img_tok}"),
            55,
            vec!["unsupported flags 0x4 for a disk"],
        ),
        (
            format!("raw-add 2 0 {img_tok}"),
            55,
            vec!["unknown resource type 2"],
        ),
        (
            format!("raw-add 0 0 {img_tok} @nullparams:2"),
            55,
            vec!["2 parameter(s) announced but the parameter array is NULL"],
        ),
        (
            "raw-add 1 0 key path:uint:1 offset:ulong:0".into(),
            55,
            vec!["lease 'key'", "'path' has type UINT"],
        ),
        (
            "raw-add 1 0 key path:string:/l offset:int:0".into(),
            55,
            vec!["'offset' has type INT, expected ULONG"],
        ),
        (
            "raw-add 1 0 key path:string:/l offset:ulong:4096".into(),
            67,
            vec!["offset 4096 is not supported"],
        ),
        (
            "raw-add 1 0 key offset:ulong:0".into(),
            67,
            vec!["lease 'key'", "no target path"],
        ),
        (
            "raw-add 1 0 a/b path:string:/l".into(),
            67,
            vec!["plain file name"],
        ),
        (
            "raw-add 1 0 key path:string:/l lockspace:string:..".into(),
            67,
            vec!["lockspace '..'"],
        ),
        (
            "raw-add 1 0 @null path:string:/l".into(),
            55,
            vec!["lease key is a NULL pointer"],
        ),
        (
            "raw-null-man add".into(),
            55,
            vec!["drvAddResource: the lock manager pointer is NULL"],
        ),
    ];
    for (cmd, code, needles) in &bad_adds {
        h.err(cmd).expect(*code, needles);
    }
    // drvAcquire / drvRelease / drvInquire flags and pointers.
    h.err("raw-acquire 4 0 @null fd")
        .expect(55, &["drvAcquire for VM 'web1'", "unsupported flags 0x4"]);
    h.err("raw-acquire 0 5 @null nofd")
        .expect(55, &["unknown on_lockfailure action 5"]);
    h.err("raw-release 1 state")
        .expect(55, &["drvRelease for VM 'web1'", "unsupported flags 0x1"]);
    h.err("raw-inquire 2 state")
        .expect(55, &["drvInquire for VM 'web1'", "unsupported flags 0x2"]);
    h.err("raw-inquire 0 nostate")
        .expect(55, &["the state pointer is NULL"]);
    // The failed AddResource calls recorded nothing: Inquire works, and drvFree after them is
    // fine.
    h.ok("raw-inquire 0 state");
    h.ok("raw-free");
    // No manager context at all (drvNew never called) and NULL managers.
    h.err("raw-acquire 0 0 @null nofd")
        .expect(55, &["no lockwarden context"]);
    h.err("raw-release 0 nostate")
        .expect(55, &["no lockwarden context"]);
    h.err(&format!("raw-add 0 0 {img_tok}"))
        .expect(55, &["no lockwarden context"]);
    for op in ["acquire", "release", "inquire"] {
        h.err(&format!("raw-null-man {op}"))
            .expect(55, &["the lock manager pointer is NULL"]);
    }
    h.ok("raw-null-man free");
    h.ok("raw-free");
    // The high-level sequences (drvFree after a failed AddResource, as libvirt does).
    let a = &web1;
    h.err(&format!(
        "acquire {} {pid} {} disk:relative.qcow2",
        a.head(),
        disk(&img)
    ))
    .expect(67, &["'relative.qcow2'", "VM 'web1'"]);
    h.err(&format!("start {} disk-null", a.head()))
        .expect(55, &["NULL pointer"]);
    h.err(&format!("release {} 1 res:9:0:/x", a.head()))
        .expect(55, &["unknown resource type 9"]);
    // Nothing of all this locked anything: another owner can take the image ...
    assert_free(&mut h, &disk(&img));
    // ... which this test can see: a good sequence on the same manager API does lock it.
    h.ok(&format!("raw-new 0 0 {good}"));
    h.ok(&format!("raw-add 0 0 {img_tok}"));
    h.ok("raw-acquire 0 0 @null nofd");
    let other = vm("other");
    let po = h.start_owner(&other, &[]);
    parse_err(&h.acquire_as(&other, po, &[disk(&img)]))
        .expect("the image is held by web1")
        .expect(87, &["a.qcow2"]);
    h.ok("raw-release 0 state");
    h.ok("raw-free");
    assert_free(&mut h, &disk(&img));
    h.assert_alive();
}

#[test]
fn acquire_failure_closes_the_connection_and_leaves_fd_minus_one() {
    let dir = tempdir();
    let conf = conf_without_daemon(dir.path());
    let mut h = new_host(&conf);
    let before = h.ok("fdcount");
    h.ok(&format!(
        "raw-new 0 1 uuid:uuid:{UUID} name:string:web1 id:uint:1 pid:uint:1"
    ));
    // The host checks *fd == -1 after the failure (it replies "host: ... left *fd" otherwise).
    for _ in 0..5 {
        h.err("raw-acquire 3 0 @null fd").expect(
            1,
            &[
                "cannot register VM 'web1'",
                "cannot connect to lockwardend at",
                "none.sock",
                "systemctl start lockwardend.socket",
            ],
        );
    }
    h.ok("raw-free");
    assert_eq!(
        h.ok("fdcount"),
        before,
        "descriptors leaked by failed Acquire calls"
    );
}

#[test]
fn missing_daemon_gives_the_connect_error_naming_the_socket() {
    let dir = tempdir();
    let sock = dir.path().join("lockwardend.sock");
    let conf = dir.path().join("plugin.conf");
    fs::write(&conf, format!("daemon_socket = \"{}\"\n", sock.display())).unwrap();
    let mut h = new_host(&conf);
    let a = vm("nodaemon");
    let img = image(dir.path(), "a.img");
    let want = format!(
        "cannot connect to lockwardend at {:?}: No such file or directory; start it with \
         `systemctl start lockwardend.socket`",
        sock
    );
    // Domain start (forked child) and CPU start / hot-plug.
    h.err(&format!("start {} {}", a.head(), disk(&img)))
        .expect(1, &["cannot register VM 'nodaemon'", &want]);
    h.err(&format!("acquire {} 1 {}", a.head(), disk(&img)))
        .expect(
            1,
            &[
                "cannot acquire the 1 lease(s) of VM 'nodaemon'",
                "a.img",
                &want,
            ],
        );
    h.err(&format!("release {} 1 {}", a.head(), disk(&img)))
        .expect(1, &["cannot release", &want]);
    // A socket file nobody listens on: connection refused.
    let l = UnixListener::bind(&sock).unwrap();
    drop(l);
    h.err(&format!("acquire {} 1 {}", a.head(), disk(&img)))
        .expect(
            1,
            &["Connection refused", "systemctl start lockwardend.socket"],
        );
    // Inquire needs no daemon.
    h.ok(&format!("inquire {} 1 {}", a.head(), disk(&img)));
}

// ---- talking to something that is not a good daemon --------------------------------------

/// The raw bytes a fake daemon sends back for a request.
type Answer = Box<dyn FnOnce(Request) -> Vec<u8> + Send>;

/// A fake daemon: for each answer, accepts one connection, reads one request and sends the
/// answer's bytes. Returns the requests it saw.
fn fake_daemon(sock: &Path, answers: Vec<Answer>) -> std::thread::JoinHandle<Vec<Request>> {
    let l = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for answer in answers {
            let (mut s, _) = l.accept().unwrap();
            let req: Request = protocol::read_message(&mut s).unwrap();
            seen.push(req.clone());
            s.write_all(&answer(req)).unwrap();
        }
        seen
    })
}

#[test]
fn silent_daemon_times_out_after_request_timeout_ms() {
    let dir = tempdir();
    let sock = dir.path().join("silent.sock");
    let _l = UnixListener::bind(&sock).unwrap(); // accepts into the backlog, never answers
    let conf = dir.path().join("plugin.conf");
    fs::write(
        &conf,
        format!(
            "daemon_socket = \"{}\"\nrequest_timeout_ms = 400\n",
            sock.display()
        ),
    )
    .unwrap();
    let mut h = new_host(&conf);
    let a = vm("slow");
    for cmd in [
        format!("acquire {} 1 disk:/img/a", a.head()),
        format!("start {} disk:/img/a", a.head()),
        format!("release {} 1 disk:/img/a", a.head()),
    ] {
        let t = Instant::now();
        h.err(&cmd).expect(
            1,
            &[
                &format!("lockwardend at {:?} did not answer within 400 ms", sock),
                "VM 'slow'",
            ],
        );
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(390) && took < Duration::from_secs(5),
            "{cmd}: took {took:?}"
        );
    }
}

#[test]
fn daemon_errors_pass_verbatim_and_version_mismatch_is_clear() {
    let dir = tempdir();
    let sock = dir.path().join("fake.sock");
    let conf = dir.path().join("plugin.conf");
    fs::write(&conf, format!("daemon_socket = \"{}\"\n", sock.display())).unwrap();
    let reply = |kind: ErrorKind, msg: &'static str| -> Answer {
        Box::new(move |_| protocol::encode(&Response::error(kind, msg)).unwrap())
    };
    let server = fake_daemon(
        &sock,
        vec![
            reply(ErrorKind::Busy, "disk '/img/a' is held by VM 'other'"),
            reply(ErrorKind::Denied, "restricted connection"),
            reply(ErrorKind::Invalid, "'/img/a' is a directory"),
            reply(ErrorKind::Timeout, "storage of '/img/a' hung"),
            Box::new(|_| {
                let mut f = protocol::encode(&Response::Ok { leases: vec![] }).unwrap();
                f[4..6].copy_from_slice(&99u16.to_be_bytes());
                f
            }),
            Box::new(|_| b"HTTP/1.0 400 Bad Request\r\n\r\n".to_vec()),
            Box::new(|_| Vec::new()), // closes without an answer
            Box::new(|_| {
                protocol::encode(&Response::Status(protocol::StatusInfo {
                    version: "x".into(),
                    protocol: 1,
                    pid: 1,
                    watchdog_device: None,
                    owners: 0,
                    leases: 0,
                    clients: 0,
                    started: 0,
                    heartbeat_interval_ms: None,
                    fence_after_ms: None,
                }))
                .unwrap()
            }),
            Box::new(|_| protocol::encode(&Response::Ok { leases: vec![] }).unwrap()),
        ],
    );
    let mut h = new_host(&conf);
    let a = vm("verbatim");
    let acq = format!("acquire-action pause {} 77 disk-shared:/img/a", a.head());
    h.err(&acq)
        .expect(87, &["disk '/img/a' is held by VM 'other'"]);
    assert_eq!(h.err(&acq).msg, "restricted connection");
    h.err(&acq).expect(55, &["'/img/a' is a directory"]);
    h.err(&acq).expect(1, &["storage of '/img/a' hung"]);
    h.err(&acq).expect(
        1,
        &[
            "speaks lockwarden protocol version 99",
            "this plugin speaks version 1",
        ],
    );
    h.err(&acq).expect(1, &["is not a lockwardend socket"]);
    h.err(&acq)
        .expect(1, &["closed the connection without answering"]);
    h.err(&acq)
        .expect(1, &["an answer that does not fit the request"]);
    h.ok(&acq);
    let seen = server.join().unwrap();
    // One request per call, carrying what libvirt passed.
    assert_eq!(seen.len(), 9);
    match &seen[8] {
        Request::Acquire {
            owner,
            leases,
            action,
            restrict,
        } => {
            assert_eq!(owner.name, "verbatim");
            assert_eq!(owner.uuid, a.uuid);
            assert_eq!(owner.id, a.id);
            assert_eq!(owner.pid, 77);
            assert_eq!(*action, protocol::FailureAction::Pause);
            assert!(!restrict);
            assert_eq!(leases.len(), 1);
            assert_eq!(leases[0].name, "/img/a");
            assert_eq!(leases[0].mode, protocol::LeaseMode::Shared);
        }
        other => panic!("expected Acquire, got {other:?}"),
    }
}

#[test]
fn start_registers_restricted_from_the_child_and_keeps_the_handle() {
    let dir = tempdir();
    let sock = dir.path().join("fake.sock");
    let conf = dir.path().join("plugin.conf");
    fs::write(&conf, format!("daemon_socket = \"{}\"\n", sock.display())).unwrap();
    let (tx, rx) = channel();
    let l = UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let cred =
            nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials).unwrap();
        let req: Request = protocol::read_message(&mut s).unwrap();
        protocol::write_message(&mut s, &Response::Ok { leases: vec![] }).unwrap();
        tx.send((req, cred.pid(), s.try_clone().unwrap())).unwrap();
        // The handle stays open as long as the "QEMU" lives: EOF only after it is killed.
        let mut buf = [0u8; 1];
        std::io::Read::read(&mut s, &mut buf).unwrap_or(0)
    });
    let mut h = new_host(&conf);
    let a = vm("handle");
    let pid = h.start_owner(&a, &["disk:/img/a".into(), "disk-ro:/img/b".into()]);
    let (req, peer_pid, handle) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    match req {
        Request::Register { owner, restrict } => {
            assert!(restrict);
            assert_eq!(owner.pid, pid as u32, "owner pid is the child's getpid()");
            assert_eq!(owner.name, "handle");
        }
        other => panic!("start must only register: {other:?}"),
    }
    assert_eq!(peer_pid, pid, "the child itself connected");
    // Once the child has exec'd its "QEMU" (/bin/sleep), every close-on-exec descriptor is
    // gone: the kernel reports a hang-up on our end at once if the handle was among them.
    let exe = format!("/proc/{pid}/exe");
    wait_until("the child exec'd sleep", Duration::from_secs(10), || {
        fs::read_link(&exe).is_ok_and(|p| p.ends_with("sleep"))
    });
    let mut pfd = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&handle),
        nix::poll::PollFlags::POLLIN,
    )];
    let ready = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::ZERO).unwrap();
    assert_eq!(
        ready,
        0,
        "lifetime handle closed while the child lives: {:?}",
        pfd[0].revents()
    );
    assert_eq!(h.ok(&format!("alive {pid}")), "1");
    h.ok(&format!("kill {pid} KILL"));
    assert_eq!(h.ok(&format!("wait {pid}")), "9");
    assert_eq!(server.join().unwrap(), 0, "EOF once the child is gone");
}

// ---- panics -------------------------------------------------------------------------------

#[test]
fn a_panic_in_any_entry_point_becomes_an_error() {
    let dir = tempdir();
    let conf = conf_without_daemon(dir.path());
    let a = vm("panicky");
    let head = a.head();
    for (point, func, cmd) in [
        ("new", "drvNew", format!("acquire {head} 1 disk:/img/a")),
        (
            "add_resource",
            "drvAddResource",
            format!("acquire {head} 1 disk:/img/a"),
        ),
        (
            "acquire",
            "drvAcquire",
            format!("acquire {head} 1 disk:/img/a"),
        ),
        ("acquire", "drvAcquire", format!("start {head} disk:/img/a")),
        (
            "release",
            "drvRelease",
            format!("release {head} 1 disk:/img/a"),
        ),
        (
            "inquire",
            "drvInquire",
            format!("inquire {head} 1 disk:/img/a"),
        ),
        ("free", "drvFree", format!("inquire {head} 1 disk:/img/a")),
        ("deinit", "drvDeinit", "deinit".to_string()),
    ] {
        let mut h = spawn_host(conf.as_os_str(), &[("LOCKWARDEN_TEST_PANIC", point)], false);
        assert_eq!(h.ready_line, "READY", "{point}: {}", h.stderr_text());
        let r = h.raw(&cmd);
        if point == "deinit" {
            // drvDeinit's return value is the error signal; the host prints the raised error.
            parse_err(&r)
                .unwrap_or_else(|| panic!("deinit should report the panic: {r}"))
                .expect(1, &["panic", func]);
        } else {
            parse_err(&r)
                .unwrap_or_else(|| panic!("{point}: `{cmd}` should fail: {r}"))
                .expect(
                    1,
                    &[
                        &format!("internal error in lockwarden {func}: panic: deliberate panic"),
                        "bug in lockwarden",
                    ],
                );
        }
        h.assert_alive();
        assert!(
            h.stderr_text()
                .contains("lockwarden: internal error: panic at"),
            "the panic hook writes one line to fd 2: {}",
            h.stderr_text()
        );
    }
    // In drvInit itself: the host prints the error and exits normally (no abort).
    let mut h = spawn_host(
        conf.as_os_str(),
        &[("LOCKWARDEN_TEST_PANIC", "init")],
        false,
    );
    parse_err(&h.ready_line)
        .unwrap_or_else(|| panic!("init panic: {}", h.ready_line))
        .expect(1, &["drvInit: panic"]);
    assert_eq!(h.wait_exit().code(), Some(1));
    // A misspelt hook name is refused, not ignored.
    let mut h = spawn_host(
        conf.as_os_str(),
        &[("LOCKWARDEN_TEST_PANIC", "acquier")],
        false,
    );
    parse_err(&h.ready_line)
        .unwrap_or_else(|| panic!("bad hook name: {}", h.ready_line))
        .expect(55, &["names no entry point"]);
    assert_eq!(h.wait_exit().code(), Some(1));
}

// ---- with a real daemon -------------------------------------------------------------------

#[test]
fn a_vm_without_disks_acquires_and_releases() {
    let (_dir, d, mut h) = daemon_and_host();
    let a = vm("diskless");
    let pid = h.start_owner(&a, &[]);
    acquired(&mut h, &d, &a, pid, &[]);
    assert_eq!(h.release_as(&a, pid, &[]), "OK");
    assert_eq!(h.ok(&format!("inquire {} {pid}", a.head())), "");
    assert_eq!(h.ok(&format!("release-nostate {} {pid}", a.head())), "");
}

#[test]
fn release_twice_and_acquire_twice_are_fine() {
    let (dir, d, mut h) = daemon_and_host();
    let img = image(dir.path(), "a.img");
    let a = vm("twice");
    let pid = h.start_owner(&a, &[disk(&img)]);
    acquired(&mut h, &d, &a, pid, &[disk(&img)]);
    assert_eq!(
        h.acquire_as(&a, pid, &[disk(&img)]),
        "OK",
        "acquire again (resume after hot-plug)"
    );
    assert_eq!(h.release_as(&a, pid, &[disk(&img)]), "OK");
    assert_eq!(
        h.release_as(&a, pid, &[disk(&img)]),
        "OK",
        "second release is a no-op"
    );
    assert_free(&mut h, &disk(&img));
}

#[test]
fn bad_resources_refused_by_the_daemon_change_nothing() {
    let dir = tempdir();
    let d = start_daemon(dir.path());
    let conf = plugin_conf(&d, dir.path(), "request_timeout_ms = 20000\n");
    let mut h = new_host(&conf);
    let good = image(dir.path(), "good.img");
    let fifo = dir.path().join("a fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    assert!(fs::metadata(&fifo).unwrap().file_type().is_fifo());
    let subdir = dir.path().join("a dir");
    fs::create_dir(&subdir).unwrap();
    let missing = dir.path().join("missing.img");
    let a = vm("badres");
    let pid = h.start_owner(&a, &[]);
    for bad in [&fifo, &subdir, &missing, Path::new("/dev/null")] {
        let t = Instant::now();
        let r = h.acquire_as(&a, pid, &[disk(&good), disk(bad)]);
        let took = t.elapsed();
        let e = parse_err(&r).unwrap_or_else(|| panic!("{bad:?} must be refused: {r}"));
        assert_eq!(e.domain, 42, "{e:?}");
        assert_ne!(e.code, 0, "{e:?}");
        assert!(
            !e.msg.contains("did not answer"),
            "{bad:?} blocked the daemon: {e:?}"
        );
        let file_name = bad.file_name().unwrap().to_str().unwrap();
        assert!(e.msg.contains(file_name), "{file_name} not named in {e:?}");
        assert!(took < Duration::from_secs(5), "{bad:?} took {took:?}");
        // All or nothing: the good disk of the same request is not held.
        assert_free(&mut h, &disk(&good));
    }
    // Errors that never reach the daemon change nothing either.
    let long = format!("disk:/{}", "y".repeat(4200));
    for (res, code) in [
        ("disk-null".to_string(), 55),
        ("disk:".to_string(), 67),
        ("disk:relative.img".to_string(), 67),
        (long, 67),
        ("res:5:0:/x".to_string(), 55),
        ("res:0:16:/x".to_string(), 55),
        ("lease:k:/l:512".to_string(), 67),
    ] {
        let e = parse_err(&h.acquire_as(&a, pid, &[disk(&good), res.clone()]))
            .unwrap_or_else(|| panic!("{res} must be refused"));
        assert_eq!((e.code, e.domain), (code, 42), "{res}: {e:?}");
        assert_free(&mut h, &disk(&good));
    }
    // And the owner itself is still fine.
    assert_eq!(h.acquire_as(&a, pid, &[disk(&good)]), "OK");
}

#[test]
fn paths_with_spaces_and_newlines_work() {
    let (dir, d, mut h) = daemon_and_host();
    let img = image(dir.path(), "my disk\nimage %1:x.img");
    let a = vm("spaces");
    let b = vm("other vm");
    let pa = h.start_owner(&a, &[disk(&img)]);
    let pb = h.start_owner(&b, &[disk(&img)]);
    acquired(&mut h, &d, &a, pa, &[disk(&img)]);
    let e = parse_err(&h.acquire_as(&b, pb, &[disk(&img)])).expect("second owner refused");
    e.expect(87, &["my disk"]);
    assert_eq!(h.release_as(&a, pa, &[disk(&img)]), "OK");
    assert_eq!(h.acquire_as(&b, pb, &[disk(&img)]), "OK");
    // No log line of the daemon contains the raw newline of the path.
    assert!(
        !d.log().contains("my disk\nimage"),
        "raw newline in the daemon log"
    );
}

#[test]
fn hotplug_acquire_for_an_owner_that_holds_other_disks() {
    let (dir, d, mut h) = daemon_and_host();
    let d1 = image(dir.path(), "d1.img");
    let d2 = image(dir.path(), "d2.img");
    let d3 = image(dir.path(), "d3.img");
    let a = vm("hotplug");
    let pid = h.start_owner(&a, &[disk(&d1), disk(&d2)]);
    acquired(&mut h, &d, &a, pid, &[disk(&d1), disk(&d2)]);
    // virDomainLockImageAttach: a fresh manager with only the new disk.
    assert_eq!(h.acquire_as(&a, pid, &[disk(&d3)]), "OK");
    let b = vm("intruder");
    let pb = h.start_owner(&b, &[]);
    for img in [&d1, &d2, &d3] {
        parse_err(&h.acquire_as(&b, pb, &[disk(img)]))
            .unwrap_or_else(|| panic!("{img:?} must be held by hotplug"))
            .expect(87, &[img.file_name().unwrap().to_str().unwrap()]);
    }
    // Unplug (virDomainLockImageDetach: Release with a NULL state pointer) frees only d3.
    assert_eq!(
        h.ok(&format!("release-nostate {} {pid} {}", a.head(), disk(&d3))),
        ""
    );
    assert_eq!(h.acquire_as(&b, pb, &[disk(&d3)]), "OK");
    parse_err(&h.acquire_as(&b, pb, &[disk(&d1)]))
        .expect("d1 still held")
        .expect(87, &["d1.img"]);
}

#[test]
fn lifetime_handle_from_start_releases_on_exit() {
    let (dir, d, mut h) = daemon_and_host();
    let img = image(dir.path(), "life.img");
    let a = vm("life");
    let pid = h.start_owner(&a, &[disk(&img)]);
    acquired(&mut h, &d, &a, pid, &[disk(&img)]);
    let b = vm("waiting");
    let pb = h.start_owner(&b, &[]);
    parse_err(&h.acquire_as(&b, pb, &[disk(&img)]))
        .expect("held while the owner lives")
        .expect(87, &["life.img"]);
    h.ok(&format!("kill {pid} KILL"));
    h.ok(&format!("wait {pid}"));
    poll_every(Duration::from_millis(50), Duration::from_secs(10), || {
        (h.acquire_as(&b, pb, &[disk(&img)]) == "OK").then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "lease not freed 10 s after the owner died; log:\n{}",
            d.log()
        )
    });
}

#[test]
fn raw_acquire_with_fd_returns_an_inheritable_handle() {
    let (_dir, _d, mut h) = daemon_and_host();
    let before = h.ok("fdcount");
    let a = vm("rawfd");
    let pid = h.start_owner(&a, &[]);
    let r = h.ok(&format!(
        "raw-new 0 0 uuid:uuid:{} name:string:rawfd id:uint:{} pid:uint:{pid}",
        a.uuid, a.id
    ));
    assert_eq!(r, "");
    let r = h.ok("raw-acquire 0 0 @null fd");
    let fd: i32 = r
        .strip_prefix("fd=")
        .and_then(|s| s.strip_suffix(" cloexec=0"))
        .unwrap_or_else(|| panic!("expected `fd=N cloexec=0`, got {r}"))
        .parse()
        .unwrap();
    assert!(fd > 2);
    h.ok(&format!("close {fd}"));
    h.ok("raw-free");
    assert_eq!(h.ok("fdcount"), before);
}

#[test]
fn leases_and_lockspace_directories() {
    let dir = tempdir();
    let d = start_daemon(dir.path());
    let lockspace = dir.path().join("lockspace");
    let conf = plugin_conf(
        &d,
        dir.path(),
        &format!("file_lockspace_dir = \"{}\"\n", lockspace.display()),
    );
    let mut h = new_host(&conf);
    let leases = dir.path().join("leases");
    fs::create_dir_all(leases.join("ls1")).unwrap();
    let img = image(dir.path(), "ls.img");
    let a = vm("leaser");
    let pa = h.start_owner(&a, &[]);
    let lease = format!("lease:key1:{}:0:ls1", esc(leases.to_str().unwrap()));
    let plain = format!("lease:key2:{}:0", esc(leases.to_str().unwrap()));
    acquired(
        &mut h,
        &d,
        &a,
        pa,
        &[lease.clone(), plain.clone(), disk(&img)],
    );
    assert!(
        leases.join("ls1/key1").exists(),
        "lease file <path>/<lockspace>/<key>"
    );
    assert!(leases.join("key2").exists(), "lease file <path>/<key>");
    let sha = lockwarden::naming::sha256_hex(img.to_str().unwrap());
    assert!(
        lockspace.join(&sha).exists(),
        "lock file named by the SHA-256 of the path in file_lockspace_dir"
    );
    let b = vm("leaser2");
    let pb = h.start_owner(&b, &[]);
    for res in [&lease, &plain, &disk(&img)] {
        let e = parse_err(&h.acquire_as(&b, pb, std::slice::from_ref(res)))
            .unwrap_or_else(|| panic!("{res} must be held"));
        assert_eq!((e.code, e.domain), (87, 42), "{res}: {e:?}");
    }
    // A lease whose directory does not exist: a clear error naming it.
    let nodir = dir.path().join("no such dir");
    let e = parse_err(&h.acquire_as(
        &b,
        pb,
        &[format!("lease:k:{}:0", esc(nodir.to_str().unwrap()))],
    ))
    .expect("missing lease directory refused");
    assert_eq!(e.domain, 42);
    assert!(e.msg.contains("no such dir"), "{e:?}");
}

#[test]
fn require_lease_for_disks_without_auto_leases() {
    let dir = tempdir();
    let d = start_daemon(dir.path());
    let conf = plugin_conf(&d, dir.path(), "auto_disk_leases = 0\n");
    let mut h = new_host(&conf);
    let img = image(dir.path(), "rw.img");
    let a = vm("strict");
    // Start only registers.
    let pid = h.start_owner(&a, &[disk(&img)]);
    h.err(&format!("acquire {} {pid} {}", a.head(), disk(&img)))
        .expect(
            67,
            &[
                "Read/write, exclusive access, disks were present, but no leases specified",
                "VM 'strict'",
                "require_lease_for_disks",
            ],
        );
    // Read-only and shared disks do not count; with no r/w disk the acquire goes through.
    assert_eq!(
        h.acquire_as(
            &a,
            pid,
            &["disk-ro:/img/cd.iso".into(), "disk-shared:/img/s".into()]
        ),
        "OK"
    );
    // A lease satisfies the requirement; the disk itself is not locked.
    fs::create_dir_all(dir.path().join("leases")).unwrap();
    let lease = format!(
        "lease:vmkey:{}:0",
        esc(dir.path().join("leases").to_str().unwrap())
    );
    acquired(&mut h, &d, &a, pid, &[lease, disk(&img)]);
    // The disk itself was not locked: a host with automatic disk leases can take it.
    let mut auto = new_host(&plugin_conf(&d, dir.path(), ""));
    assert_free(&mut auto, &disk(&img));
}
