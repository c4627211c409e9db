//! Operating fenced VMs (issue 15; docs/storage.md "Partitions", docs/operators.md "Storage
//! outages"): `lockwarden thaw VM`, fenced leases in `status`, `list` and `--json`, and
//! `lockwarden doctor`'s partition check. Real `lockwardend` and the real CLI on the FUSE
//! stand-in (tests/fusefs/testfs.rs), where `hang 1` partitions a mount and `lost NAME` makes
//! the "server" drop a lock. Needs root and /dev/fuse.

mod common;

use common::daemon::{Opts, TestDaemon};
use common::fuse::Fs;
use common::proto::{Client, Vm, excl, proc_state, vm};
use lockwarden::protocol::{ErrorKind, FailureAction, Request, Response};
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Heartbeats every 50 ms, fence after 500 ms of silence: the whole file runs in seconds.
const INTERVAL_MS: u64 = 50;
const FENCE_AFTER_MS: u64 = 500;
/// Generous bound for polls on a shared 2-core machine (not a measured claim).
const BOUND: Duration = Duration::from_secs(15);

fn prerequisites() {
    common::fuse::prerequisites("tests/fence_ops.rs");
}

fn daemon() -> TestDaemon {
    TestDaemon::verbose(&format!(
        "heartbeat_interval_ms = {INTERVAL_MS}\nfence_after_ms = {FENCE_AFTER_MS}\n\
         lease_check_interval_ms = 0\nstorage_timeout_ms = 2000\n"
    ))
}

fn mount() -> Fs {
    Fs::mount("lw-fops", Duration::from_secs(20))
}

fn acquire(d: &TestDaemon, v: &Vm, p: &Path, action: FailureAction) {
    let r = Client::connect(&d.socket).call(&Request::Acquire {
        owner: v.owner.clone(),
        leases: vec![excl(p)],
        action,
        restrict: false,
    });
    assert!(matches!(r, Response::Ok { .. }), "acquire {p:?}: {r:?}");
}

/// Run the real CLI against `d`'s admin socket: (exit code, stdout, stderr).
fn cli(d: &TestDaemon, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lockwarden"))
        .args(args)
        .arg("--admin-socket")
        .arg(&d.admin)
        .env_remove("LOCKWARDEN_MOUNTS_FILE")
        .output()
        .expect("running lockwarden");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The fence stage `list --json` reports for disk `p` (None: not fenced).
fn json_stage(d: &TestDaemon, p: &Path) -> Option<String> {
    let (code, out, err) = cli(d, &["list", "--json"]);
    assert_eq!(code, 0, "list --json: {out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("list --json is JSON");
    let lease = v["leases"]
        .as_array()
        .expect("leases")
        .iter()
        .find(|l| l["name"] == p.to_string_lossy().as_ref())
        .unwrap_or_else(|| panic!("{p:?} not listed: {out}"))
        .clone();
    let f = lease.get("fence")?;
    assert_matches_schema(f, "fence");
    Some(f["stage"].as_str().expect("stage").to_string())
}

/// `v` has exactly the fields docs/holders.schema.json lists for `definition` (the schema
/// `list --json` and `who --json` are documented with), and its enums' values.
fn assert_matches_schema(v: &serde_json::Value, definition: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/holders.schema.json");
    let schema: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    let def = &schema["definitions"][definition];
    let props = def["properties"].as_object().expect("properties");
    let mut have: Vec<&String> = v.as_object().expect("object").keys().collect();
    let mut want: Vec<&String> = props.keys().collect();
    have.sort();
    want.sort();
    assert_eq!(have, want, "{definition}: {v}");
    for (k, p) in props {
        if let Some(e) = p.get("enum").and_then(|e| e.as_array()) {
            assert!(
                e.contains(&v[k]),
                "{definition}.{k} = {} not in {e:?}",
                v[k]
            );
        }
    }
}

fn thaw(d: &TestDaemon, name: &str) -> Response {
    Client::connect(&d.admin).call(&Request::Thaw { vm: name.into() })
}

fn refused(r: Response, kind: ErrorKind) -> String {
    match r {
        Response::Error(e) if e.kind == kind => e.message,
        other => panic!("expected a {kind:?} refusal, got {other:?}"),
    }
}

/// Partition `x` until the paused VM `v` is stopped; returns when it is.
fn fence(d: &TestDaemon, x: &Fs, v: &Vm) {
    x.set("hang 1\n");
    d.wait_for("the paused VM stopped", || {
        proc_state(v.proc.pid()) == Some('T')
    });
}

/// [`fence`], then the storage answers again: the re-check finds the lock of `p` still ours and
/// the lease waits for a thaw.
fn fence_and_heal(d: &TestDaemon, x: &Fs, v: &Vm, p: &Path) {
    fence(d, x, v);
    x.set("");
    d.wait_for("held-awaiting-thaw", || {
        json_stage(d, p).as_deref() == Some("held-awaiting-thaw")
    });
}

/// The whole cycle: fenced while partitioned (thaw refused, nothing changes), re-checked after
/// the heal (held-awaiting-thaw in list, --json and status), thawed by name (the process runs
/// again, the stage is gone, status is clean). Each event is logged once. (Old code: `thaw`
/// is an unknown op and the CLI an unknown command; list shows no fence at all.)
#[test]
fn thaw_after_heal_resumes_the_vm_and_status_shows_the_fence_until_then() {
    prerequisites();
    let d = daemon();
    let x = mount();
    let v = vm("vm-thaw");
    let (p, p2) = (x.image("thaw.img"), x.image("thaw-2.img"));
    let r = Client::connect(&d.socket).call(&Request::Acquire {
        owner: v.owner.clone(),
        leases: vec![excl(&p), excl(&p2)],
        action: FailureAction::Pause,
        restrict: false,
    });
    assert!(matches!(r, Response::Ok { .. }), "{r:?}");
    assert_eq!(json_stage(&d, &p), None);
    let (code, out, _) = cli(&d, &["status"]);
    assert_eq!(code, 0, "{out}");

    fence(&d, &x, &v);
    // While the storage is silent: fenced, and thaw is refused without touching anything.
    assert_eq!(json_stage(&d, &p).as_deref(), Some("fenced"));
    let msg = refused(thaw(&d, "vm-thaw"), ErrorKind::Busy);
    assert!(
        msg.contains("stopped answering") && msg.contains("nothing was changed"),
        "{msg}"
    );
    assert!(
        msg.contains(&*x.mnt.to_string_lossy()),
        "names the mount: {msg}"
    );
    let (code, _, err) = cli(&d, &["thaw", "vm-thaw"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("stopped answering"), "{err}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(proc_state(v.proc.pid()), Some('T'), "thaw changed nothing");
    assert_eq!(json_stage(&d, &p).as_deref(), Some("fenced"));

    // Heal: the lock is re-checked and still ours; the VM stays stopped, awaiting thaw.
    x.set("");
    d.wait_for("held-awaiting-thaw", || {
        json_stage(&d, &p).as_deref() == Some("held-awaiting-thaw")
            && json_stage(&d, &p2).as_deref() == Some("held-awaiting-thaw")
    });
    assert_eq!(proc_state(v.proc.pid()), Some('T'));
    let (code, out, _) = cli(&d, &["list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("held-awaiting-thaw") && out.contains("SIGSTOP (on_lockfailure=pause)"),
        "{out}"
    );
    let (code, out, _) = cli(&d, &["status"]);
    assert_eq!(code, 1, "status exits 1 while a lease is fenced: {out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("fenced leases") && l.trim_end().ends_with(" 2")),
        "{out}"
    );
    assert!(out.contains("held-awaiting-thaw"), "{out}");
    let (_, out, _) = cli(&d, &["status", "--json"]);
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        s["fenced"][0]["fence"]["stage"], "held-awaiting-thaw",
        "{s}"
    );

    // Thaw (by UUID through the protocol would do too; by name through the CLI here).
    let (code, out, err) = cli(&d, &["thaw", "vm-thaw"]);
    assert_eq!(code, 0, "{out}{err}\n{}", d.log());
    assert!(out.contains("thawed"), "{out}");
    d.wait_for("the VM runs again", || {
        matches!(proc_state(v.proc.pid()), Some('S' | 'R'))
    });
    assert_eq!(json_stage(&d, &p), None, "the fence is cleared");
    assert_eq!(json_stage(&d, &p2), None, "the fence is cleared");
    let (code, out, _) = cli(&d, &["status"]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("held-awaiting-thaw"), "{out}");
    // A second thaw: the VM is not fenced any more.
    let msg = refused(thaw(&d, &v.owner.uuid), ErrorKind::Invalid);
    assert!(msg.contains("is not fenced"), "{msg}");

    // Each event once: one FENCE line for the VM (naming both disks), one re-check line per
    // lease, one thaw line.
    let text = d.log();
    assert_eq!(text.matches("FENCE:").count(), 1, "{text}");
    let fence = text.lines().find(|l| l.contains("FENCE:")).unwrap();
    assert!(
        fence.contains("thaw.img") && fence.contains("thaw-2.img"),
        "{fence}"
    );
    assert_eq!(
        text.matches("is still held after the storage behind mount")
            .count(),
        2,
        "{text}"
    );
    assert_eq!(text.matches("thaw: VM").count(), 1, "{text}");
}

/// Thaw of a VM the daemon does not know, and of one that holds leases but was never fenced:
/// refused, nothing changed.
#[test]
fn thaw_of_an_unknown_or_unfenced_vm_is_refused() {
    prerequisites();
    let d = daemon();
    let x = mount();
    let v = vm("vm-healthy");
    let p = x.image("healthy.img");
    acquire(&d, &v, &p, FailureAction::Pause);
    let msg = refused(thaw(&d, "no-such-vm"), ErrorKind::Invalid);
    assert!(msg.contains("no VM named 'no-such-vm'"), "{msg}");
    let (code, _, err) = cli(&d, &["thaw", "no-such-vm"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no VM named"), "{err}");
    let msg = refused(thaw(&d, "vm-healthy"), ErrorKind::Invalid);
    assert!(msg.contains("is not fenced"), "{msg}");
    assert!(matches!(proc_state(v.proc.pid()), Some('S' | 'R')));
    // On the main socket thaw is denied.
    let r = Client::connect(&d.socket).call(&Request::Thaw {
        vm: "vm-healthy".into(),
    });
    let msg = refused(r, ErrorKind::Denied);
    assert!(msg.contains("admin socket only"), "{msg}");
    let (code, _, err) = cli(&d, &["thaw"]);
    assert_eq!(code, 2, "{err}");
}

/// The lock was found still ours after the heal, but the storage lost it before the operator
/// ran thaw: thaw's own re-verification sees it, refuses, and the VM is killed (fence.rs's
/// rule: another host may have written to the disk), recorded as lost.
#[test]
fn thaw_after_the_lock_was_lost_refuses_and_kills_the_vm() {
    prerequisites();
    let d = daemon();
    let x = mount();
    let mut v = vm("vm-lost-later");
    let p = x.image("later.img");
    acquire(&d, &v, &p, FailureAction::Pause);
    fence_and_heal(&d, &x, &v, &p);
    x.set("lost later.img\n");
    let msg = refused(thaw(&d, "vm-lost-later"), ErrorKind::Io);
    assert!(
        msg.contains("is LOST") && msg.contains("killed") && msg.contains("later.img"),
        "{msg}"
    );
    let st = v.proc.wait_for(BOUND).expect("the VM was killed");
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{st:?}");
    let lost = common::proto::ok(Client::connect(&d.admin).call(&Request::Lost));
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert!(!d.log().contains("thaw: VM"), "{}", d.log());
}

/// `lockwarden doctor` checks each NFS mount against the running daemon's settings: with
/// `fence_after_ms` too large for an NFSv4 server's default 90 s lease it warns and says what to
/// set; with the defaults it is satisfied; for NFSv3 it says the server keeps a dead client's
/// locks. The mount table is doctor's `--mounts` file (no NFS client on these machines).
/// (Old code: no `partition` check at all.)
#[test]
fn doctor_warns_when_fence_after_ms_cannot_beat_the_storage_lease() {
    let table = tempfile::NamedTempFile::new().unwrap();
    fs::write(
        table.path(),
        "nas1:/vm /srv/vm nfs4 rw,relatime,vers=4.2,hard,timeo=600,retrans=2 0 0\n\
         nas2:/old /srv/old nfs rw,vers=3,hard,timeo=600,retrans=2 0 0\n\
         /dev/vda1 / ext4 rw 0 0\n",
    )
    .unwrap();
    let doctor = |d: &TestDaemon| {
        let mounts = table.path().to_string_lossy().into_owned();
        let (_, out, err) = cli(
            d,
            &[
                "doctor",
                "--mounts",
                &mounts,
                "--no-publish",
                "--config",
                "/nonexistent/qemu-lockwarden.conf",
                "--qemu-conf",
                "/nonexistent/qemu.conf",
            ],
        );
        let lines: Vec<String> = out
            .lines()
            .filter(|l| l.contains("partition"))
            .map(str::to_string)
            .collect();
        assert_eq!(
            lines.len(),
            2,
            "one partition line per NFS mount:\n{out}{err}"
        );
        lines
    };
    let d = TestDaemon::verbose("heartbeat_interval_ms = 5000\nfence_after_ms = 85000\n");
    let lines = doctor(&d);
    assert!(
        lines[0].starts_with("WARN") && lines[0].contains("/srv/vm"),
        "{lines:?}"
    );
    assert!(
        lines[0].contains("fence_after_ms 85000")
            && lines[0].contains("90000 ms")
            && lines[0].contains("set fence_after_ms below 80000")
            && lines[0].contains("timeo=600"),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("OK") && lines[1].contains("until that host reboots"),
        "{lines:?}"
    );
    drop(d);
    let d = TestDaemon::verbose("heartbeat_interval_ms = 5000\nfence_after_ms = 60000\n");
    let lines = doctor(&d);
    assert!(
        lines[0].starts_with("OK") && lines[0].contains("70000 ms < the server's lease"),
        "{lines:?}"
    );
}

/// Another client's mount of the export `backing` (another host's view of the same storage).
struct Second {
    // Declared first: unmounted before the directory holding the mount point is removed.
    _tfs: common::fuse::Testfs,
    _dir: tempfile::TempDir,
    mnt: std::path::PathBuf,
}

fn second_mount(backing: &Path) -> Second {
    let dir = tempfile::Builder::new()
        .prefix("lw-fops-b")
        .tempdir()
        .unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let tfs = common::fuse::Testfs::mount(
        backing,
        &mnt,
        &dir.path().join("control"),
        &dir.path().join("events"),
        Duration::from_secs(20),
    );
    Second {
        _tfs: tfs,
        _dir: dir,
        mnt,
    }
}

/// A `lockwardend` in a UTS namespace of its own, so its host name (in its holder records and
/// its heartbeat file) is `host`: another host as far as the shared storage can tell.
fn daemon_named(host: &'static str, config: &str) -> TestDaemon {
    TestDaemon::with(Opts {
        config,
        hostname: Some(host),
        ..Opts::default()
    })
}

/// Host "node-a" holds a disk and beats next to it; its storage goes silent (its VM is
/// fenced, its lock stays on the "server"), and its heartbeat file is 12 minutes old when this
/// host asks: the refusal and `lockwarden who` name the host and when it was last seen.
/// (Old code: the refusal names host node-a and nothing more.)
#[test]
fn a_refusal_and_who_say_when_the_holders_host_was_last_seen() {
    prerequisites();
    let cfg = format!(
        "heartbeat_interval_ms = {INTERVAL_MS}\nfence_after_ms = {FENCE_AFTER_MS}\n\
         lease_check_interval_ms = 0\nstorage_timeout_ms = 2000\n"
    );
    let la = daemon_named("node-a", &cfg);
    let xa = mount();
    let backing = xa.backing.clone();
    let img_a = xa.image("shared.img");
    let va = vm("vm-on-a");
    let r = Client::connect(&la.socket).call(&Request::Acquire {
        owner: va.owner.clone(),
        leases: vec![excl(&img_a)],
        action: FailureAction::Pause,
        restrict: false,
    });
    assert!(matches!(r, Response::Ok { .. }), "{r:?}");
    let beat = backing.join(".lockwarden/heartbeat@node-a");
    // Created empty, then written: wait for the first record, not for the name.
    la.wait_for(
        &format!("node-a writes its first record to {beat:?}"),
        || fs::read_to_string(&beat).is_ok_and(|t| t.starts_with("lockwarden heartbeat ")),
    );
    // node-a's storage goes silent: no more beats; its VM is fenced, its lock stays held.
    xa.set("hang 1\n");
    la.wait_for("node-a's VM is fenced", || {
        proc_state(va.proc.pid()) == Some('T')
    });
    // The "server" 12 minutes later: the file's content time and mtime are that old.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let old = now - 12 * 60 - 5;
    let text = fs::read_to_string(&beat).unwrap();
    assert!(
        text.starts_with("lockwarden heartbeat host=node-a "),
        "{text:?}"
    );
    let text: String = text
        .split(' ')
        .map(|w| {
            if w.starts_with("time=") {
                format!("time={old}")
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    fs::write(&beat, text).unwrap();
    let st = Command::new("touch")
        .args(["-m", "-d", &format!("@{old}")])
        .arg(&beat)
        .status()
        .unwrap();
    assert!(st.success());

    // This host, through its own mount of the same export.
    let xb = second_mount(&backing);
    let img_b = xb.mnt.join("shared.img");
    let d = daemon();
    let vb = vm("vm-on-b");
    let r = Client::connect(&d.socket).call(&Request::Acquire {
        owner: vb.owner.clone(),
        leases: vec![excl(&img_b)],
        action: FailureAction::Pause,
        restrict: false,
    });
    let msg = refused(r, ErrorKind::Busy);
    assert!(
        msg.contains("VM 'vm-on-a'")
            && msg.contains("host node-a, last seen 12 min ago")
            && msg.contains("clocks of the hosts"),
        "{msg}"
    );
    let (code, out, err) = cli(
        &d,
        &[
            "who",
            &img_b.to_string_lossy(),
            "--config",
            "/nonexistent/qemu-lockwarden.conf",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("node-a") && out.contains("host node-a, last seen 12 min ago"),
        "{out}{err}"
    );
    let (_, out, _) = cli(
        &d,
        &[
            "who",
            &img_b.to_string_lossy(),
            "--json",
            "--config",
            "/nonexistent/qemu-lockwarden.conf",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["last_seen"][0]["host"], "node-a", "{v}");
    assert_matches_schema(&v["last_seen"][0], "last_seen");
    assert!(
        v["last_seen"][0]["age_secs"].as_u64().unwrap() >= 12 * 60,
        "{v}"
    );
    xa.set("");
}

/// The storage answers heartbeats but the re-verification of the lock does not come back
/// within `storage_timeout_ms` (testfs delays lock calls): thaw is refused with `timeout`, the
/// VM stays stopped and fenced; once lock calls are quick again, thaw works.
#[test]
fn thaw_whose_reverification_times_out_changes_nothing() {
    prerequisites();
    let d = daemon();
    let x = mount();
    let v = vm("vm-slow");
    let p = x.image("slow.img");
    acquire(&d, &v, &p, FailureAction::Pause);
    fence_and_heal(&d, &x, &v, &p);
    x.set("delay_ms 3000\n");
    let t0 = Instant::now();
    let msg = refused(thaw(&d, "vm-slow"), ErrorKind::Timeout);
    let took = t0.elapsed();
    assert!(
        msg.contains("did not answer the re-verification") && msg.contains("slow.img"),
        "{msg}"
    );
    assert!(
        took >= Duration::from_millis(1900),
        "answered after {took:?}"
    );
    assert_eq!(proc_state(v.proc.pid()), Some('T'));
    assert_eq!(json_stage(&d, &p).as_deref(), Some("held-awaiting-thaw"));
    x.set("");
    let r = thaw(&d, "vm-slow");
    assert!(matches!(r, Response::Ok { .. }), "{r:?}\n{}", d.log());
    d.wait_for("the VM runs again", || {
        matches!(proc_state(v.proc.pid()), Some('S' | 'R'))
    });
}
