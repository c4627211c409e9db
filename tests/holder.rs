//! Holder records and `lockwarden who` / `doctor` (issue 5), with real locks, real files, the
//! real daemon binary and the real CLI binary.
//!
//! The daemon does not publish records yet (its hooks are wired separately), so where a test
//! needs "host A's daemon holds the disk and published who holds it", the daemon takes the real
//! lock and the test publishes the record through `holder::publish` exactly as the daemon will,
//! holding the record's liveness lock itself. Every process started here is killed on drop.

mod common;

use common::wait::{poll, wait_until_or};

use common::daemon::{Lockwardend, Opts, TestDaemon};
use common::image;
use common::locks::ofd_lock;
use common::proto::{Proc, hostname, ok, owner_for, probe_lock, sleeper};
use lockwarden::daemon::holder::{self, Published, Record, Records, Target, Vm};
use lockwarden::protocol::{self, LeaseMode, LeaseSpec, LockTarget, Owner, ResourceKind, Response};
use serde_json::Value;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const CLI: &str = env!("CARGO_BIN_EXE_lockwarden");
const BOUND: Duration = Duration::from_secs(20);
/// 2026-11-26 10:04:05 UTC.
const SINCE: u64 = 1_795_687_445;

// ---------------------------------------------------------------------------------------------
// Daemons

// ---------------------------------------------------------------------------------------------
// Files and locks

fn open_rw(p: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(p).unwrap()
}

/// A withdrawn side file: spaces only (withdrawing overwrites the record instead of truncating).
fn blank(content: &[u8]) -> bool {
    content.iter().all(|b| *b == b' ')
}

/// The lock type others hold on byte `start` of `path` (F_UNLCK when none).
fn probe(path: &Path, start: i64) -> libc::c_int {
    probe_lock(path, start, 1, libc::F_WRLCK).0
}

fn vm(name: &str, pid: u32) -> Vm {
    Vm {
        name: name.into(),
        uuid: format!("c7a5fdbd-cdaf-9455-926a-{:012x}", pid),
        pid,
        since: SINCE,
    }
}

fn record(host: &str, path: &str, mode: LeaseMode, vms: Vec<Vm>) -> Record {
    Record::new(host, ResourceKind::Disk, path, mode, path, SINCE, vms)
}

fn target<'a>(f: &'a File, path: &'a str, lockspace: bool) -> Target<'a> {
    Target {
        fd: f.as_fd(),
        kind: ResourceKind::Disk,
        lock_path: path,
        lockspace,
    }
}

/// `holder::read` until `done` says the expected state is reached (bounded). Needed after
/// dropping a descriptor: a process that another test forks at that moment inherits it and
/// keeps its open file description (and so its OFD locks) alive until it execs.
fn read_until(t: Target<'_>, done: impl Fn(&holder::Found) -> bool) -> holder::Found {
    // After BOUND, the caller's assertion on what is returned says what went wrong.
    poll(BOUND, || Some(holder::read(t)).filter(&done))
        .map_or_else(|| holder::read(t), |(found, _)| found)
}

fn mode_of(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// A process (not lockwarden) holding a POSIX lock on byte 0, like virtlockd does.
struct PosixHolder {
    proc: Proc,
    pid: i32,
}

fn posix_holder(path: &Path, exclusive: bool) -> PosixHolder {
    let op = if exclusive { "LOCK_EX" } else { "LOCK_SH" };
    let mode = if exclusive { "r+b" } else { "rb" };
    let script = format!(
        "import fcntl, os, sys, time\n\
         f = open(sys.argv[1], '{mode}')\n\
         fcntl.lockf(f, fcntl.{op} | fcntl.LOCK_NB, 1, 0)\n\
         print(os.getpid(), flush=True)\n\
         time.sleep(1000)\n"
    );
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is needed to stand for virtlockd (a POSIX lock holder)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid: i32 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("python3 did not take the lock: {line:?}"));
    PosixHolder {
        proc: Proc(child),
        pid,
    }
}

// ---------------------------------------------------------------------------------------------
// A small JSON-schema checker for docs/holders.schema.json (type, enum, required, properties,
// additionalProperties: false, items, minimum, $ref to #/definitions/...).

fn schema() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/holders.schema.json");
    serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap()
}

fn type_ok(v: &Value, t: &str) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "number" => v.is_number(),
        other => panic!("schema uses unknown type {other}"),
    }
}

fn validate(root: &Value, s: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let name = r.strip_prefix("#/definitions/").expect("local $ref");
        let def = &root["definitions"][name];
        assert!(!def.is_null(), "unknown definition {name}");
        return validate(root, def, v, at, errs);
    }
    if let Some(t) = s.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().map(|x| x.as_str().unwrap()).collect(),
            _ => panic!("bad type in schema"),
        };
        if !types.iter().any(|t| type_ok(v, t)) {
            errs.push(format!("{at}: {v} is not of type {types:?}"));
            return;
        }
    }
    if v.is_null() {
        return;
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            errs.push(format!("{at}: {v} not in {e:?}"));
        }
    }
    if let (Some(m), Some(n)) = (s.get("minimum").and_then(Value::as_i64), v.as_i64()) {
        if n < m {
            errs.push(format!("{at}: {n} < minimum {m}"));
        }
    }
    if let Some(obj) = v.as_object() {
        for r in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().unwrap();
            if !obj.contains_key(r) {
                errs.push(format!("{at}: missing required field {r:?}"));
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => validate(root, ps, val, &format!("{at}.{k}"), errs),
                None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    errs.push(format!("{at}: field {k:?} is not in the schema"))
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(arr)) = (s.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            validate(root, items, x, &format!("{at}[{i}]"), errs);
        }
    }
}

fn assert_schema(def: &str, v: &Value) {
    let root = schema();
    let mut errs = Vec::new();
    // An unknown name would index to Null, and validating against Null checks nothing.
    let Some(definition) = root["definitions"].get(def) else {
        panic!("docs/holders.schema.json has no definition {def:?}: fix the test or the schema");
    };
    validate(&root, definition, v, def, &mut errs);
    assert!(
        errs.is_empty(),
        "{def} output does not match docs/holders.schema.json: {errs:#?}\n{v:#}"
    );
}

#[test]
#[should_panic(expected = "has no definition \"no_such_definition\"")]
fn the_schema_checker_refuses_an_unknown_definition() {
    assert_schema("no_such_definition", &serde_json::json!({}));
}

#[test]
fn the_schema_checker_rejects_what_it_should() {
    let root = schema();
    let mut errs = Vec::new();
    let bad = serde_json::json!({"leases": [{"name": 1, "kind": "disk", "mode": "weird",
        "lock_path": "/x", "owners": [], "since": -1, "extra": true}]});
    validate(&root, &root["definitions"]["list"], &bad, "list", &mut errs);
    let text = errs.join("\n");
    common::assert_mentions(&text, &["name", "weird", "minimum", "extra"]);
}

// ---------------------------------------------------------------------------------------------
// CLI

fn cli(args: &[&str]) -> Output {
    Command::new(CLI)
        .args(args)
        .env_remove("LOCKWARDEN_MOUNTS_FILE")
        .stdin(Stdio::null())
        .output()
        .expect("running lockwarden")
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): stdout {:?} stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn who(disk: &Path, conf: &Path, admin: &Path, json: bool) -> Output {
    let mut args = vec![
        "who",
        disk.to_str().unwrap(),
        "--config",
        conf.to_str().unwrap(),
        "--admin-socket",
        admin.to_str().unwrap(),
    ];
    if json {
        args.push("--json");
    }
    cli(&args)
}

// ---------------------------------------------------------------------------------------------
// Records

#[test]
fn direct_mode_record_is_a_side_file_and_is_believed_only_while_locked() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "web1.qcow2");
    let p = img.to_str().unwrap();
    // "Host node-a" holds the disk: byte 0 write-locked and its record published.
    let lease = open_rw(&img);
    ofd_lock(&lease, libc::F_WRLCK, 0);
    let published = holder::publish(
        target(&lease, p, false),
        record("node-a", p, LeaseMode::Exclusive, vec![vm("web1", 4242)]),
    )
    .unwrap();
    let side = dir.path().join(".lockwarden/web1.qcow2@node-a.json");
    assert!(side.is_file(), "side file {side:?} missing");
    assert_eq!(mode_of(&side), 0o600);
    assert_eq!(mode_of(&dir.path().join(".lockwarden")), 0o700);
    assert_eq!(
        fs::read(&img).unwrap(),
        vec![0u8; 4096],
        "never write into an image"
    );
    assert_eq!(probe(&img, 100), libc::F_UNLCK, "QEMU's bytes untouched");
    assert_eq!(
        probe(&img, holder::liveness_byte("node-a")),
        libc::F_WRLCK,
        "the lease's description carries node-a's liveness byte of the image"
    );
    assert_eq!(
        probe(&side, 0),
        libc::F_UNLCK,
        "the side file is not locked"
    );
    let on_disk: Value = serde_json::from_slice(&fs::read(&side).unwrap()).unwrap();
    assert_schema("record", &on_disk);
    assert_eq!(on_disk["generation"].as_u64(), Some(published.generation));
    assert_eq!(on_disk["liveness"], "locked-file");

    // Another host (another open file description) reads it.
    let reader = File::open(&img).unwrap();
    let found = holder::read(target(&reader, p, false));
    assert_eq!(found.believed.len(), 1, "{found:?}");
    let r = &found.believed[0].record;
    assert_eq!(
        (r.host.as_str(), r.vms[0].name.as_str()),
        ("node-a", "web1")
    );
    assert_eq!(
        r.lock_ino,
        fs::metadata(&img)
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.ino()
            })
            .unwrap()
    );
    let lock = found.lock.as_ref().expect("byte 0 is locked");
    assert_eq!((lock.mode, lock.pid), (LeaseMode::Exclusive, None));
    let msg = holder::describe_refusal(
        ResourceKind::Disk,
        p,
        None,
        &found.records(),
        found.lock.as_ref(),
    );
    assert_eq!(
        msg,
        format!(
            "disk {p} is in use by VM 'web1' (uuid c7a5fdbd-cdaf-9455-926a-000000001092) on host \
             node-a since 2026-11-26 10:04:05 UTC (exclusive); shut that VM down or detach the \
             disk from it first"
        )
    );
    let refusal = holder::read_for_refusal(target(&reader, p, false), p);
    assert_eq!(refusal.message, msg);
    assert_eq!(refusal.holder.vm_name.as_deref(), Some("web1"));
    assert_eq!(refusal.holder.host.as_deref(), Some("node-a"));
    assert_eq!(refusal.holder.mode, Some(LeaseMode::Exclusive));
    assert_eq!(refusal.holder.since, Some(SINCE));

    // Byte 0 goes while the description still holds the liveness byte (a keeper that let go of
    // the lease while a copy of the description lingers): nothing holds byte 0, so the record
    // is stale.
    ofd_lock(&lease, libc::F_UNLCK, 0);
    let found = read_until(target(&reader, p, false), |f| f.lock.is_none());
    assert!(found.believed.is_empty(), "{found:?}");
    assert!(found.lock.is_none());
    assert!(
        found
            .ignored
            .iter()
            .any(|i| i.reason.contains("nothing holds byte 0")
                && i.host.as_deref() == Some("node-a")),
        "{found:?}"
    );

    // The publisher is gone (daemon and keeper: the lease's description closed, and its
    // liveness byte with it) and somebody else locks byte 0: the record is stale for that
    // reason, and the refusal says who the kernel sees instead.
    drop(lease);
    drop(published);
    let other = open_rw(&img);
    ofd_lock(&other, libc::F_WRLCK, 0);
    assert!(side.exists(), "a crashed publisher leaves its file behind");
    let found = read_until(target(&reader, p, false), |f| f.believed.is_empty());
    assert!(found.believed.is_empty(), "{found:?}");
    assert!(
        found
            .ignored
            .iter()
            .any(|i| i.reason.contains("no longer holds")),
        "{found:?}"
    );
    let msg = holder::describe_refusal(
        ResourceKind::Disk,
        p,
        None,
        &found.records(),
        found.lock.as_ref(),
    );
    assert!(msg.contains("not lockwarden"), "{msg}");
    assert!(msg.contains("another process or host"), "{msg}");
    assert!(msg.contains("stop it there first"), "{msg}");

    // A fresh publish rewrites the stale file in place; withdraw empties it (the file stays
    // for this host's next lease) and readers skip it silently.
    let p2 = holder::publish(
        target(&other, p, false),
        record("node-a", p, LeaseMode::Exclusive, vec![vm("web1b", 4343)]),
    )
    .unwrap();
    let found = holder::read(target(&reader, p, false));
    assert_eq!(found.believed.len(), 1, "{found:?}");
    assert_eq!(found.believed[0].record.vms[0].name, "web1b");
    holder::withdraw(other.as_fd(), p2).unwrap();
    assert!(
        blank(&fs::read(&side).unwrap()),
        "withdraw blanks the side file"
    );
    let found = holder::read(target(&reader, p, false));
    assert!(found.believed.is_empty(), "{found:?}");
    assert!(
        found.ignored.is_empty(),
        "an empty side file is not listed: {found:?}"
    );
}

#[test]
fn lockspace_exclusive_record_lives_in_the_lock_file() {
    let dir = tempfile::tempdir().unwrap();
    let disk = "/images/web1.qcow2";
    let lockfile = dir.path().join(lockwarden::naming::sha256_hex(disk));
    fs::write(&lockfile, b"").unwrap();
    fs::set_permissions(&lockfile, fs::Permissions::from_mode(0o600)).unwrap();
    let lp = lockfile.to_str().unwrap();
    let lease = open_rw(&lockfile);
    ofd_lock(&lease, libc::F_WRLCK, 0);
    let rec = Record::new(
        "node-b",
        ResourceKind::Disk,
        disk,
        LeaseMode::Exclusive,
        lp,
        SINCE,
        vec![vm("web1", 77)],
    );
    let published = holder::publish(target(&lease, lp, true), rec).unwrap();
    assert!(
        !dir.path().join(".lockwarden").exists(),
        "an exclusive lockspace record needs no side file"
    );
    let content: Value = serde_json::from_slice(&fs::read(&lockfile).unwrap()).unwrap();
    assert_schema("record", &content);
    assert_eq!(content["host"], "node-b");
    assert_eq!(
        probe(&lockfile, 0),
        libc::F_WRLCK,
        "byte 0 is still the lock"
    );
    assert_eq!(
        probe(&lockfile, 1),
        libc::F_WRLCK,
        "byte 1 is the record's liveness lock"
    );

    let reader = File::open(&lockfile).unwrap();
    let r = holder::read_for_refusal(target(&reader, lp, true), disk);
    assert_eq!(
        r.message,
        format!(
            "disk /images/web1.qcow2 (lock file {lp}) is in use by VM 'web1' (uuid \
             c7a5fdbd-cdaf-9455-926a-00000000004d) on host node-b since 2026-11-26 10:04:05 UTC \
             (exclusive); shut that VM down or detach the disk from it first"
        )
    );
    assert_eq!(r.found.believed[0].source, lp);

    // Withdraw empties the file and frees byte 1; byte 0 stays locked until the lease goes.
    holder::withdraw(lease.as_fd(), published).unwrap();
    assert_eq!(fs::metadata(&lockfile).unwrap().len(), 0);
    assert_eq!(probe(&lockfile, 1), libc::F_UNLCK);
    assert_eq!(probe(&lockfile, 0), libc::F_WRLCK);
    let found = holder::read(target(&reader, lp, true));
    assert!(
        found.believed.is_empty() && found.ignored.is_empty(),
        "{found:?}"
    );

    // Crash with a record in the file: the content stays, the liveness lock does not, and a
    // virtlockd-style POSIX holder that takes the file over is named by pid, not by the record.
    let published = holder::publish(
        target(&lease, lp, true),
        Record::new(
            "node-b",
            ResourceKind::Disk,
            disk,
            LeaseMode::Exclusive,
            lp,
            SINCE,
            vec![vm("web1", 77)],
        ),
    )
    .unwrap();
    // Unlock explicitly before closing: a child another test forks right now could inherit
    // the descriptor and keep the locks alive for a moment.
    ofd_lock(&lease, libc::F_UNLCK, 0);
    ofd_lock(&lease, libc::F_UNLCK, 1);
    drop(published);
    drop(lease);
    assert!(fs::metadata(&lockfile).unwrap().len() > 0);
    let virtlockd = posix_holder(&lockfile, true);
    let found = read_until(target(&reader, lp, true), |f| f.believed.is_empty());
    assert!(found.believed.is_empty(), "{found:?}");
    assert!(
        found
            .ignored
            .iter()
            .any(|i| i.reason.contains("no longer holds")),
        "{found:?}"
    );
    let lock = found.lock.clone().expect("locked by the POSIX holder");
    assert_eq!(lock.pid, Some(virtlockd.pid));
    let comm = fs::read_to_string(format!("/proc/{}/comm", virtlockd.pid)).unwrap();
    let msg = holder::describe_refusal(
        ResourceKind::Disk,
        disk,
        Some(lp),
        &found.records(),
        Some(&lock),
    );
    assert_eq!(
        msg,
        format!(
            "disk /images/web1.qcow2 (lock file {lp}) is locked (exclusive) by a process that is \
             not lockwarden (virtlockd or another tool): local process {} ({}); stop that \
             process or make it release the disk first",
            virtlockd.pid,
            comm.trim()
        )
    );
    drop(virtlockd.proc);
}

#[test]
fn shared_holders_on_two_hosts_are_all_named() {
    let dir = tempfile::tempdir().unwrap();
    let iso = image(dir.path(), "install.iso");
    let p = iso.to_str().unwrap();
    let a_fd = File::open(&iso).unwrap();
    let b_fd = File::open(&iso).unwrap();
    ofd_lock(&a_fd, libc::F_RDLCK, 0);
    ofd_lock(&b_fd, libc::F_RDLCK, 0);
    let pa = holder::publish(
        target(&a_fd, p, false),
        record("node-a", p, LeaseMode::Shared, vec![vm("a1", 1)]),
    )
    .unwrap();
    // node-b: two VMs share it; the daemon republishes as VMs join and leave.
    let mut records_b = Records::default();
    let id = (1, 2);
    records_b.publish(
        id,
        target(&b_fd, p, false),
        record("node-b", p, LeaseMode::Shared, vec![vm("b1", 2)]),
    );
    records_b.publish(
        id,
        target(&b_fd, p, false),
        record(
            "node-b",
            p,
            LeaseMode::Shared,
            vec![vm("b1", 2), vm("b2", 3)],
        ),
    );
    assert_eq!(records_b.len(), 1);
    let side_b = dir.path().join(".lockwarden/install.iso@node-b.json");
    let (live_a, live_b) = (
        holder::liveness_byte("node-a"),
        holder::liveness_byte("node-b"),
    );
    assert_ne!(live_a, live_b, "each host has its own liveness byte");
    assert_eq!(
        probe(&iso, live_b),
        libc::F_RDLCK,
        "node-b's (read-only) lease description holds its liveness byte"
    );
    assert_eq!(probe(&iso, live_a), libc::F_RDLCK);
    assert_eq!(probe(&side_b, 0), libc::F_UNLCK, "side files carry no lock");

    let reader = File::open(&iso).unwrap();
    let found = holder::read(target(&reader, p, false));
    assert_eq!(found.believed.len(), 2, "{found:?}");
    let msg = holder::describe_refusal(
        ResourceKind::Disk,
        p,
        None,
        &found.records(),
        found.lock.as_ref(),
    );
    common::assert_mentions(
        &msg,
        &[
            format!("disk {p} is in use by VM 'a1'"),
            "on host node-a since 2026-11-26 10:04:05 UTC (shared)".to_string(),
            ", and by VM 'b1'".to_string(),
            ", and by VM 'b2' (uuid c7a5fdbd-cdaf-9455-926a-000000000003) on host node-b"
                .to_string(),
            "shut those VMs down or detach the disk from them first".to_string(),
        ],
    );
    assert_eq!(found.lock.as_ref().map(|l| l.mode), Some(LeaseMode::Shared));

    // node-a crashes (its lease description closes, with its liveness byte): only node-b is
    // named, although node-b's read lock on byte 0 still matches node-a's shared record.
    drop(pa);
    drop(a_fd);
    let found = read_until(target(&reader, p, false), |f| f.believed.len() == 1);
    assert_eq!(found.believed.len(), 1, "{found:?}");
    assert_eq!(found.believed[0].record.host, "node-b");
    assert!(
        found
            .ignored
            .iter()
            .any(|i| i.host.as_deref() == Some("node-a"))
    );

    // node-b leaves cleanly: its side file is emptied and released.
    records_b.withdraw(id, b_fd.as_fd());
    assert!(blank(&fs::read(&side_b).unwrap()));
    assert_eq!(probe(&iso, live_b), libc::F_UNLCK);
    assert_eq!(
        probe(&iso, 0),
        libc::F_RDLCK,
        "the lease itself is the caller's"
    );
    assert!(records_b.is_empty());
}

#[test]
fn a_non_lockwarden_posix_holder_is_named_by_pid() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "db.raw");
    let p = img.to_str().unwrap();
    let h = posix_holder(&img, false);
    let reader = File::open(&img).unwrap();
    let r = holder::read_for_refusal(target(&reader, p, false), p);
    let comm = fs::read_to_string(format!("/proc/{}/comm", h.pid)).unwrap();
    assert!(r.found.believed.is_empty());
    assert_eq!(r.holder.pid, Some(h.pid));
    assert_eq!(r.holder.mode, Some(LeaseMode::Shared));
    assert!(r.holder.vm_name.is_none());
    common::assert_mentions(
        &r.message,
        &[
            format!("disk {p} is locked (shared) by a process that is not lockwarden"),
            format!("local process {} ({})", h.pid, comm.trim()),
        ],
    );
    // `who` says the same, and exits 0 (the disk is held).
    let conf = dir.path().join("qemu-lockwarden.conf");
    fs::write(&conf, "").unwrap();
    let out = who(&img, &conf, &dir.path().join("no-daemon.sock"), true);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v = json_of(&out);
    assert_schema("who", &v);
    assert_eq!(v["held"], true);
    assert_eq!(v["lock"]["pid"], h.pid);
    assert_eq!(v["holders"].as_array().map(Vec::len), Some(0));
    assert!(v["message"].as_str().unwrap().contains("not lockwarden"));
    let out = who(&img, &conf, &dir.path().join("no-daemon.sock"), false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("DISK"), "{text}");
    assert!(
        text.contains(&format!("(not lockwarden: {})", comm.trim())),
        "{text}"
    );
    assert!(text.contains(&h.pid.to_string()), "{text}");
}

// ---------------------------------------------------------------------------------------------
// `lockwarden who` against real daemons standing for two hosts

struct Setup {
    _dir: tempfile::TempDir,
    img: PathBuf,
    conf: PathBuf,
    /// The lease as the plugin would request it.
    spec: LeaseSpec,
    lockspace: Option<PathBuf>,
}

fn setup(lockspace: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    fs::create_dir(&images).unwrap();
    let img = image(&images, "web1.qcow2");
    let p = img.to_str().unwrap().to_string();
    let conf = dir.path().join("qemu-lockwarden.conf");
    let (target, ls) = if lockspace {
        let ls = dir.path().join("lockspace");
        fs::create_dir(&ls).unwrap();
        fs::write(
            &conf,
            format!("file_lockspace_dir = \"{}\"\n", ls.display()),
        )
        .unwrap();
        (
            LockTarget::Lockspace {
                dir: ls.to_str().unwrap().into(),
                file: lockwarden::naming::sha256_hex(&p),
                create_dir: true,
            },
            Some(ls),
        )
    } else {
        fs::write(&conf, "# direct mode\n").unwrap();
        (LockTarget::File { path: p.clone() }, None)
    };
    Setup {
        spec: LeaseSpec {
            name: p,
            kind: ResourceKind::Disk,
            mode: LeaseMode::Exclusive,
            target,
        },
        _dir: dir,
        img,
        conf,
        lockspace: ls,
    }
}

/// The record of the lease a daemon holds on `s`, for host `host`: when the daemon already
/// published one (its holder hooks are wired) that one is used and its host (this machine's
/// name) returned; otherwise the test publishes it exactly as the daemon will, holding the
/// record's liveness lock itself.
fn ensure_record(s: &Setup, host: &str, owner: &Owner) -> (String, Option<(File, Published)>) {
    let (path, lockspace) = match &s.spec.target {
        LockTarget::File { path } => (PathBuf::from(path), false),
        LockTarget::Lockspace { dir, file, .. } => (Path::new(dir).join(file), true),
    };
    let lp = path.to_str().unwrap().to_string();
    let probe = File::open(&path).unwrap();
    let found = holder::read(target(&probe, &lp, lockspace));
    if let Some(seen) = found.believed.first() {
        assert_eq!(seen.record.vms[0].uuid, owner.uuid, "{found:?}");
        assert_eq!(seen.record.host, hostname());
        return (hostname(), None);
    }
    let f = open_rw(&path);
    let rec = Record::new(
        host,
        ResourceKind::Disk,
        &s.spec.name,
        LeaseMode::Exclusive,
        &lp,
        SINCE,
        vec![Vm::of(owner, SINCE)],
    );
    let p = holder::publish(target(&f, &lp, lockspace), rec).unwrap();
    (host.to_string(), Some((f, p)))
}

fn who_across_two_daemons(lockspace: bool) {
    let s = setup(lockspace);
    let (a, b) = (TestDaemon::start(""), TestDaemon::start(""));
    let (qa, qb) = (sleeper(), sleeper());
    let (web1, web2) = (owner_for(qa.pid(), "web1"), owner_for(qb.pid(), "web2"));
    ok(a.acquire(&web1, vec![s.spec.clone()]));
    let (host_a, published) = ensure_record(&s, "node-a", &web1);

    // Host B's daemon is refused by the kernel (B does not know A's VM).
    match b.acquire(&web2, vec![s.spec.clone()]) {
        Response::Error(e) => assert_eq!(e.kind, protocol::ErrorKind::Busy, "{e:?}"),
        other => panic!("host B must be refused, got {other:?}"),
    }

    // `lockwarden who` on host B names host A's VM, from the shared storage alone.
    let out = who(&s.img, &s.conf, &b.admin, true);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v = json_of(&out);
    assert_schema("who", &v);
    assert_eq!(v["held"], true);
    assert_eq!(
        v["lock_target"],
        if lockspace { "lockspace" } else { "file" }
    );
    assert_eq!(v["lock"]["mode"], "exclusive");
    let holders = v["holders"].as_array().unwrap();
    assert_eq!(holders.len(), 1, "{v:#}");
    assert_eq!(holders[0]["host"], host_a.as_str());
    assert_eq!(holders[0]["vm_name"], "web1");
    assert_eq!(holders[0]["vm_uuid"], web1.uuid.as_str());
    assert_eq!(holders[0]["pid"], web1.pid);
    assert_eq!(holders[0]["source"], "record");
    assert!(
        holders[0]["since_utc"].as_str().unwrap().ends_with(" UTC"),
        "{v:#}"
    );
    assert!(
        v["message"].as_str().unwrap().starts_with(&format!(
            "disk {} is in use by VM 'web1' (uuid {}) on host {host_a} since ",
            s.img.display(),
            web1.uuid
        )) && v["message"].as_str().unwrap().contains(" UTC (exclusive)"),
        "{v:#}"
    );
    // Human output: an aligned table.
    let out = who(&s.img, &s.conf, &b.admin, false);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("DISK"), "{text}");
    let at = |name: &str| lines[0].find(name).unwrap();
    assert!(
        lines[1][at("HOST")..].starts_with(&format!("{host_a} ")),
        "{text}"
    );
    assert!(lines[1][at(" VM ") + 1..].starts_with("web1 "), "{text}");
    assert!(lines[1][at("UUID")..].starts_with(&web1.uuid), "{text}");
    assert!(
        lines[1].contains(&web1.uuid) && lines[1].contains("exclusive"),
        "{text}"
    );

    // Asking on host A merges A's daemon's own view: still one holder (same VM).
    let v = json_of(&who(&s.img, &s.conf, &a.admin, true));
    assert_schema("who", &v);
    assert_eq!(v["holders"].as_array().unwrap().len(), 1, "{v:#}");

    // `list --json` on host A, validated against the schema.
    let out = cli(&[
        "list",
        "--json",
        "--admin-socket",
        a.admin.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    let list = json_of(&out);
    assert_schema("list", &list);
    assert_eq!(list["leases"][0]["owners"][0]["name"], "web1");

    if lockspace {
        // A releases: the lock file goes (lockd semantics), so the disk is free.
        ok(a.release(&web1, vec![s.spec.clone()]));
        let LockTarget::Lockspace { file, .. } = &s.spec.target else {
            unreachable!()
        };
        assert!(
            !s.lockspace.as_ref().unwrap().join(file).exists(),
            "the lock file is deleted on release"
        );
    } else {
        // VM web1 dies: host A's lockwardend (or its keeper) frees the disk. The record this
        // test published (still open here) is then stale; a daemon-published one is withdrawn.
        drop(qa);
    }
    wait_until_or(
        "the disk is free",
        BOUND,
        || a.log(),
        || who(&s.img, &s.conf, &b.admin, true).status.code() == Some(1),
    );
    let out = who(&s.img, &s.conf, &b.admin, true);
    assert_eq!(out.status.code(), Some(1), "free disk exits 1: {out:?}");
    let v = json_of(&out);
    assert_schema("who", &v);
    assert_eq!(v["held"], false);
    assert!(v["lock"].is_null());
    assert_eq!(v["holders"].as_array().unwrap().len(), 0);
    if !lockspace && published.is_some() {
        assert!(
            v["ignored"][0]["reason"]
                .as_str()
                .unwrap()
                .starts_with("stale: "),
            "{v:#}"
        );
    }
    assert_eq!(v["message"], format!("disk {} is free", s.img.display()));
    // ... and host B can take it now.
    ok(b.acquire(&web2, vec![s.spec.clone()]));
}

#[test]
fn who_on_host_b_names_host_a_vm_direct_mode() {
    who_across_two_daemons(false);
}

#[test]
fn who_on_host_b_names_host_a_vm_lockspace_mode() {
    who_across_two_daemons(true);
}

#[test]
fn who_errors_exit_3_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("q.conf");
    fs::write(&conf, "").unwrap();
    let missing = dir.path().join("missing.qcow2");
    let out = who(&missing, &conf, &dir.path().join("x.sock"), true);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let v = json_of(&out);
    assert_schema("who_error", &v);
    assert!(
        v["error"].as_str().unwrap().contains("missing.qcow2"),
        "{v}"
    );
    fs::write(&conf, "bogus_key = 1\n").unwrap();
    let out = who(&missing, &conf, &dir.path().join("x.sock"), false);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bogus_key"),
        "{out:?}"
    );
    let out = cli(&["who"]);
    assert_eq!(out.status.code(), Some(2));
}

// ---------------------------------------------------------------------------------------------
// doctor

fn doctor(conf: &Path, extra: &[&str]) -> (i32, Value) {
    let dir = conf.parent().unwrap();
    let qemu = dir.join("qemu.conf");
    fs::write(&qemu, "lock_manager = \"lockwarden\"\n").unwrap();
    let mut args = vec![
        "doctor",
        "--json",
        "--config",
        conf.to_str().unwrap(),
        "--qemu-conf",
        qemu.to_str().unwrap(),
        "--admin-socket",
        "/nonexistent/lockwarden-admin.sock",
        "--timeout-ms",
        "200",
    ];
    args.extend_from_slice(extra);
    let out = cli(&args);
    (out.status.code().unwrap(), json_of(&out))
}

fn find_check<'a>(v: &'a Value, name: &str, detail: &str) -> Option<&'a Value> {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name && c["detail"].as_str().is_some_and(|d| d.contains(detail)))
}

#[test]
fn doctor_finds_a_nolock_nfs_mount_in_a_fake_mount_table() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("qemu-lockwarden.conf");
    fs::write(&conf, "").unwrap();
    let mounts = dir.path().join("mounts");
    fs::write(
        &mounts,
        "/dev/vda1 / ext4 rw,relatime 0 0\n\
         filer:/vm /var/lib/libvirt/images nfs rw,vers=3,nolock,addr=10.0.0.5 0 0\n\
         filer:/ls /var/lib/libvirt/lockd nfs4 rw,vers=4.2,local_lock=none 0 0\n",
    )
    .unwrap();
    let (code, v) = doctor(
        &conf,
        &["--mounts", mounts.to_str().unwrap(), "--no-publish"],
    );
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(v["ok"], false);
    let bad = find_check(&v, "nfs", "/var/lib/libvirt/images").expect("nolock mount reported");
    assert_eq!(bad["verdict"], "fail");
    assert!(bad["detail"].as_str().unwrap().contains("nolock"));
    let good = find_check(&v, "nfs", "/var/lib/libvirt/lockd").unwrap();
    assert_eq!(good["verdict"], "ok");

    // The same through the environment variable.
    let qemu = dir.path().join("qemu.conf");
    let out = Command::new(CLI)
        .args(["doctor", "--json", "--no-publish", "--timeout-ms", "200"])
        .arg("--config")
        .arg(&conf)
        .arg("--qemu-conf")
        .arg(&qemu)
        .args(["--admin-socket", "/nonexistent/a.sock"])
        .env("LOCKWARDEN_MOUNTS_FILE", &mounts)
        .output()
        .unwrap();
    let v = json_of(&out);
    assert_eq!(find_check(&v, "nfs", "nolock").unwrap()["verdict"], "fail");
}

#[test]
fn doctor_compares_the_plugin_config_other_hosts_published() {
    let dir = tempfile::tempdir().unwrap();
    let ls = dir.path().join("lockspace");
    fs::create_dir(&ls).unwrap();
    let conf = dir.path().join("qemu-lockwarden.conf");
    fs::write(
        &conf,
        format!("file_lockspace_dir = \"{}\"\n", ls.display()),
    )
    .unwrap();
    let mounts = dir.path().join("mounts");
    fs::write(&mounts, "").unwrap();
    let m = ["--mounts", mounts.to_str().unwrap()];

    // First run publishes this host's config; nobody else has published yet.
    let (_, v) = doctor(&conf, &m);
    let c = find_check(&v, "cluster-config:file_lockspace_dir", "no other host")
        .unwrap_or_else(|| panic!("{v:#}"));
    assert_eq!(c["verdict"], "ok");
    let cdir = ls.join(".lockwarden/config");
    let mine: Vec<PathBuf> = fs::read_dir(&cdir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(mine.len(), 1, "{mine:?}");
    let mut other: Value = serde_json::from_slice(&fs::read(&mine[0]).unwrap()).unwrap();

    // Host node-b published a config that ignores read-only disks: FAIL, naming the difference.
    other["host"] = "node-b".into();
    other["readonly_disks"] = "ignore".into();
    fs::write(
        cdir.join("node-b.json"),
        serde_json::to_vec(&other).unwrap(),
    )
    .unwrap();
    let (code, v) = doctor(&conf, &m);
    assert_eq!(code, 1);
    let c = find_check(&v, "cluster-config:file_lockspace_dir", "node-b")
        .unwrap_or_else(|| panic!("{v:#}"));
    assert_eq!(c["verdict"], "fail");
    let d = c["detail"].as_str().unwrap();
    assert!(
        d.contains("plugin config differs from the one published by host node-b"),
        "{d}"
    );
    assert!(
        d.contains("readonly_disks: here shared, there ignore"),
        "{d}"
    );

    // Once node-b agrees, the check passes and names it.
    other["readonly_disks"] = "shared".into();
    fs::write(
        cdir.join("node-b.json"),
        serde_json::to_vec(&other).unwrap(),
    )
    .unwrap();
    let (_, v) = doctor(&conf, &m);
    let c = find_check(
        &v,
        "cluster-config:file_lockspace_dir",
        "matches 1 other host(s): node-b",
    )
    .unwrap_or_else(|| panic!("{v:#}"));
    assert_eq!(c["verdict"], "ok");
}

#[test]
fn side_files_are_rewritten_in_place_and_torn_records_are_ignored() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "db.qcow2");
    let p = img.to_str().unwrap();
    let lease = File::open(&img).unwrap();
    ofd_lock(&lease, libc::F_RDLCK, 0);
    // Rewrites (VMs joining and leaving a shared lease) go into the same file, in place: same
    // inode, liveness lock kept, a shorter record cuts the longer one's tail.
    let mut records = Records::default();
    let id = (7, 7);
    let long = vec![vm("a-rather-long-vm-name", 1), vm("another-vm", 2)];
    records.publish(
        id,
        target(&lease, p, false),
        record("node-a", p, LeaseMode::Shared, long),
    );
    let side = dir.path().join(".lockwarden/db.qcow2@node-a.json");
    let ino = fs::metadata(&side).unwrap().ino();
    records.publish(
        id,
        target(&lease, p, false),
        record("node-a", p, LeaseMode::Shared, vec![vm("b", 3)]),
    );
    assert_eq!(
        fs::metadata(&side).unwrap().ino(),
        ino,
        "rewritten in place"
    );
    let live = holder::liveness_byte("node-a");
    assert_eq!(probe(&img, live), libc::F_RDLCK, "liveness lock kept");
    let on_disk: Value = serde_json::from_slice(&fs::read(&side).unwrap()).unwrap();
    assert_schema("record", &on_disk);
    assert_eq!(on_disk["vms"].as_array().unwrap().len(), 1);
    assert_eq!(on_disk["vms"][0]["name"], "b");
    let leftovers: Vec<String> = fs::read_dir(dir.path().join(".lockwarden"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, vec!["db.qcow2@node-a.json".to_string()]);

    // Records caught empty or half-written by a reader (their publisher holds them) are
    // ignored with the reason, never believed, and the reader does not hang on them.
    let torn = dir.path().join(".lockwarden/db.qcow2@node-t.json");
    fs::write(&torn, &fs::read(&side).unwrap()[..40]).unwrap();
    let empty = dir.path().join(".lockwarden/db.qcow2@node-e.json");
    fs::write(&empty, b"").unwrap();
    // node-t holds its liveness byte of the image (this version's rule), node-e its side file
    // (an older host's rule): both count as held while the content is not a record yet.
    let torn_f = File::open(&img).unwrap();
    ofd_lock(&torn_f, libc::F_RDLCK, holder::liveness_byte("node-t"));
    let empty_f = open_rw(&empty);
    ofd_lock(&empty_f, libc::F_WRLCK, 0);
    let reader = File::open(&img).unwrap();
    let t0 = Instant::now();
    let found = holder::read(target(&reader, p, false));
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(found.believed.len(), 1, "{found:?}");
    assert_eq!(found.believed[0].record.host, "node-a");
    let reason = |name: &str| {
        found
            .ignored
            .iter()
            .find(|i| i.source.ends_with(name))
            .map(|i| i.reason.clone())
            .unwrap_or_else(|| panic!("{name} not listed as ignored: {found:?}"))
    };
    assert!(
        reason("@node-t.json").contains("not a lockwarden holder record"),
        "{found:?}"
    );
    assert!(reason("@node-e.json").contains("empty"), "{found:?}");

    records.withdraw(id, lease.as_fd());
    assert!(
        blank(&fs::read(&side).unwrap()),
        "withdraw blanks the side file"
    );
    // Bounded poll, not an immediate check: a child another test forks right now inherits the
    // closed descriptor's open file description (and its OFD lock) until it execs.
    let _ = poll(BOUND, || (probe(&img, live) == libc::F_UNLCK).then_some(()));
    assert_eq!(
        probe(&img, live),
        libc::F_UNLCK,
        "and drops its liveness lock"
    );
    // The next publish reuses the file (no create, same inode).
    let again = File::open(&img).unwrap();
    ofd_lock(&again, libc::F_RDLCK, 0);
    let p2 = holder::publish(
        target(&again, p, false),
        record("node-a", p, LeaseMode::Shared, vec![vm("c", 4)]),
    )
    .unwrap();
    assert_eq!(fs::metadata(&side).unwrap().ino(), ino, "reused");
    holder::withdraw(again.as_fd(), p2).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The liveness byte on the locked file, with real daemons standing for hosts (UTS namespaces of
// their own: each daemon's host name is what its records carry)

fn host_daemon(host: &'static str) -> TestDaemon {
    TestDaemon::with(Opts {
        hostname: Some(host),
        ..Opts::default()
    })
}

fn direct(path: &Path, mode: LeaseMode) -> LeaseSpec {
    let p = path.to_str().unwrap().to_string();
    LeaseSpec {
        name: p.clone(),
        kind: ResourceKind::Disk,
        mode,
        target: LockTarget::File { path: p },
    }
}

fn busy_message(r: Response) -> String {
    match r {
        Response::Error(e) => {
            assert_eq!(e.kind, protocol::ErrorKind::Busy, "{e:?}");
            e.message
        }
        other => panic!("must be refused, got {other:?}"),
    }
}

/// Wait until the daemon's keeper is attached (its start is logged) and track it (killed on
/// drop if it is still a keeper).
fn track_keeper(d: &mut TestDaemon) -> u32 {
    d.wait_for("the keeper is started", || d.logged_keeper_pid().is_some());
    let k = d.logged_keeper_pid().unwrap();
    d.track_keeper(k);
    k
}

/// docs/holders.md §2: the `.lockwarden` directory is one descriptor per directory, shared by
/// its records, and closed when its last record is withdrawn.
#[test]
fn the_record_directory_is_one_descriptor_shared_by_its_records_and_closed_after_the_last() {
    let images = tempfile::tempdir().unwrap();
    let imgs: Vec<PathBuf> = (0..3)
        .map(|i| image(images.path(), &format!("d{i}.qcow2")))
        .collect();
    let records = images.path().join(".lockwarden");
    let a = host_daemon("dir-a");
    let q = sleeper();
    let vm = owner_for(q.pid(), "dir-vm");
    let specs = || {
        imgs.iter()
            .map(|i| direct(i, LeaseMode::Exclusive))
            .collect::<Vec<_>>()
    };
    ok(a.acquire(&vm, specs()));
    for i in &imgs {
        let name = format!("{}@dir-a.json", i.file_name().unwrap().to_string_lossy());
        assert!(records.join(name).exists());
    }
    assert_eq!(
        a.fds_on(&records).len(),
        1,
        "one descriptor for three records"
    );
    ok(a.release(&vm, specs()));
    a.wait_for("the record directory is closed", || {
        a.fds_on(&records).is_empty()
    });
}

#[test]
fn a_held_direct_mode_lease_keeps_no_side_file_open_and_survives_a_daemon_kill() {
    let images = tempfile::tempdir().unwrap();
    let img = image(images.path(), "live.qcow2");
    let side = images.path().join(".lockwarden/live.qcow2@live-a.json");
    let mut a = host_daemon("live-a");
    let b = host_daemon("live-b");
    track_keeper(&mut a);
    let q = sleeper();
    let web1 = owner_for(q.pid(), "live-web1");
    ok(a.acquire(&web1, vec![direct(&img, LeaseMode::Exclusive)]));
    // The record is there, names this rule, and the daemon holds no descriptor on it.
    let on_disk: Value = serde_json::from_slice(&fs::read(&side).unwrap()).unwrap();
    assert_schema("record", &on_disk);
    assert_eq!(on_disk["liveness"], "locked-file");
    assert_eq!(on_disk["host"], "live-a");
    assert_eq!(
        a.fds_on(&side),
        Vec::<String>::new(),
        "no descriptor on {side:?}"
    );
    assert_eq!(
        a.fds_on(&img).len(),
        1,
        "one descriptor on the image: the lease"
    );
    assert_eq!(
        probe(&img, holder::liveness_byte("live-a")),
        libc::F_WRLCK,
        "live-a's liveness byte of the image is locked"
    );
    // Host B is refused, naming the VM from the record.
    let b1 = sleeper();
    let web2 = owner_for(b1.pid(), "live-web2");
    let m = busy_message(b.acquire(&web2, vec![direct(&img, LeaseMode::Exclusive)]));
    assert!(
        m.contains("is in use by VM 'live-web1'") && m.contains("on host live-a"),
        "{m}"
    );

    // The daemon is killed: its keeper keeps the lease, and with the lease's description the
    // liveness byte, so the record is still believed (the VM still runs and holds the disk).
    a.stop(libc::SIGKILL);
    assert_eq!(probe(&img, 0), libc::F_WRLCK, "the keeper holds the lease");
    let reader = File::open(&img).unwrap();
    let p = img.to_str().unwrap();
    let found = holder::read(target(&reader, p, false));
    assert_eq!(found.believed.len(), 1, "{found:?}");
    assert_eq!(found.believed[0].record.vms[0].name, "live-web1");
    let m = busy_message(b.acquire(&web2, vec![direct(&img, LeaseMode::Exclusive)]));
    assert!(m.contains("is in use by VM 'live-web1'"), "{m}");
    let out = who(&img, &images.path().join("none.conf"), &b.admin, true);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(json_of(&out)["holders"][0]["vm_name"], "live-web1");

    // The daemon comes back: it takes the lease back from the keeper and writes the record
    // again (its own pid now), still without keeping the side file open.
    a.respawn();
    a.wait_for("the lease is adopted", || a.list().len() == 1);
    let pid = a.pid();
    a.wait_for("the record is rewritten by the new daemon", || {
        fs::read(&side)
            .ok()
            .and_then(|b| holder::parse_record(&b).ok())
            .is_some_and(|r| r.daemon_pid == pid)
    });
    assert!(a.fds_on(&side).is_empty(), "no descriptor on {side:?}");
    let found = holder::read(target(&reader, p, false));
    assert_eq!(found.believed.len(), 1, "{found:?}");

    // The host dies as a whole (keeper too): the description closes, the record is stale.
    a.stop(libc::SIGKILL);
    let keepers: Vec<u32> = a
        .keepers
        .iter()
        .copied()
        .chain(a.logged_keeper_pid())
        .collect();
    for k in keepers {
        // SAFETY: kill(2) of a pid this test tracks as the daemon's keeper.
        unsafe { libc::kill(k as libc::pid_t, libc::SIGKILL) };
    }
    let found = read_until(target(&reader, p, false), |f| f.believed.is_empty());
    assert!(found.believed.is_empty(), "{found:?}");
    ok(b.acquire(&web2, vec![direct(&img, LeaseMode::Exclusive)]));
}

#[test]
fn a_crashed_hosts_shared_record_is_not_kept_alive_by_another_hosts_lock() {
    let images = tempfile::tempdir().unwrap();
    let iso = image(images.path(), "shared.iso");
    let p = iso.to_str().unwrap();
    let mut a = host_daemon("share-a");
    let b = host_daemon("share-b");
    track_keeper(&mut a);
    let (qa, qb) = (sleeper(), sleeper());
    let (va, vb) = (
        owner_for(qa.pid(), "share-va"),
        owner_for(qb.pid(), "share-vb"),
    );
    ok(a.acquire(&va, vec![direct(&iso, LeaseMode::Shared)]));
    ok(b.acquire(&vb, vec![direct(&iso, LeaseMode::Shared)]));
    for (d, host) in [(&a, "share-a"), (&b, "share-b")] {
        let side = images
            .path()
            .join(format!(".lockwarden/shared.iso@{host}.json"));
        assert!(d.fds_on(&side).is_empty(), "no descriptor on {side:?}");
    }
    let reader = File::open(&iso).unwrap();
    let found = holder::read(target(&reader, p, false));
    let mut hosts: Vec<&str> = found
        .believed
        .iter()
        .map(|s| s.record.host.as_str())
        .collect();
    hosts.sort_unstable();
    assert_eq!(hosts, ["share-a", "share-b"], "{found:?}");

    // Host A crashes (daemon and keeper): its record stays on the storage, byte 0 still carries
    // B's read lock of the record's mode, but A's own liveness byte is free: not believed.
    a.stop(libc::SIGKILL);
    for k in a.keepers.clone() {
        common::proto::signal(k, libc::SIGKILL);
    }
    let found = read_until(target(&reader, p, false), |f| f.believed.len() == 1);
    assert_eq!(found.believed.len(), 1, "{found:?}");
    assert_eq!(found.believed[0].record.host, "share-b");
    assert_eq!(found.lock.as_ref().map(|l| l.mode), Some(LeaseMode::Shared));
    assert!(
        found
            .ignored
            .iter()
            .any(|i| i.host.as_deref() == Some("share-a")
                && i.reason.contains("no longer holds the record")),
        "{found:?}"
    );
    // A refusal on a third host names B's VM only.
    let c = host_daemon("share-c");
    let qc = sleeper();
    let vc = owner_for(qc.pid(), "share-vc");
    let m = busy_message(c.acquire(&vc, vec![direct(&iso, LeaseMode::Exclusive)]));
    assert!(
        m.contains("VM 'share-vb'") && !m.contains("share-va"),
        "{m}"
    );
}

#[test]
fn a_twin_host_name_gets_no_record_and_a_warning_but_keeps_its_lease() {
    let images = tempfile::tempdir().unwrap();
    let iso = image(images.path(), "twin.iso");
    let side = images.path().join(".lockwarden/twin.iso@twin.json");
    let (a, b) = (host_daemon("twin"), host_daemon("twin"));
    let (qa, qb) = (sleeper(), sleeper());
    let (va, vb) = (
        owner_for(qa.pid(), "twin-va"),
        owner_for(qb.pid(), "twin-vb"),
    );
    ok(a.acquire(&va, vec![direct(&iso, LeaseMode::Shared)]));
    ok(b.acquire(&vb, vec![direct(&iso, LeaseMode::Shared)]));
    // B found "twin"'s liveness byte held by A: it says so, names the file and the host, and
    // writes nothing (A's record is intact); its lease is held all the same.
    b.wait_for("the WARN about the liveness byte", || {
        b.warned(&["liveness byte", iso.to_str().unwrap(), "\"twin\""])
    });
    let text = fs::read_to_string(&side).unwrap();
    assert!(
        text.contains("twin-va") && !text.contains("twin-vb"),
        "{text}"
    );
    assert_eq!(b.list().len(), 1, "B's lease stands");
    assert!(!a.warned(&["liveness byte"]), "{}", a.log());
}

#[test]
fn an_older_hosts_record_is_judged_by_its_side_files_own_lock() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "old.qcow2");
    let p = img.to_str().unwrap();
    let lease = open_rw(&img);
    ofd_lock(&lease, libc::F_WRLCK, 0);
    let ino = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&img).unwrap().ino()
    };
    let records = dir.path().join(".lockwarden");
    fs::create_dir(&records).unwrap();
    // What a host of the previous version wrote: no `liveness` field; it holds byte 0 of its
    // side file for as long as the lease.
    let mut old = record("node-old", p, LeaseMode::Exclusive, vec![vm("old-vm", 9)]);
    old.lock_ino = ino;
    let text = serde_json::to_string(&old).unwrap();
    assert!(!text.contains("liveness"), "{text}");
    let side = records.join("old.qcow2@node-old.json");
    fs::write(&side, &text).unwrap();
    let side_f = open_rw(&side);
    let reader = File::open(&img).unwrap();
    ofd_lock(&side_f, libc::F_WRLCK, 0);
    let found = holder::read(target(&reader, p, false));
    assert_eq!(
        found.believed.len(),
        1,
        "held side file: believed: {found:?}"
    );
    assert_eq!(found.believed[0].record.vms[0].name, "old-vm");
    // Its side-file lock gone: stale, even if something held node-old's byte of the image.
    ofd_lock(&side_f, libc::F_UNLCK, 0);
    ofd_lock(&lease, libc::F_WRLCK, holder::liveness_byte("node-old"));
    let found = holder::read(target(&reader, p, false));
    assert!(found.believed.is_empty(), "{found:?}");
    assert!(
        found.ignored[0]
            .reason
            .contains("no longer holds the record"),
        "{found:?}"
    );

    // The same record naming this version's rule: judged by the image's byte, never by a lock
    // on the side file.
    let mut new = old.clone();
    new.liveness = Some(holder::LIVENESS_LOCKED_FILE.into());
    fs::write(&side, serde_json::to_string(&new).unwrap()).unwrap();
    let found = holder::read(target(&reader, p, false));
    assert_eq!(found.believed.len(), 1, "{found:?}");
    ofd_lock(&lease, libc::F_UNLCK, holder::liveness_byte("node-old"));
    ofd_lock(&side_f, libc::F_WRLCK, 0);
    let found = holder::read(target(&reader, p, false));
    assert!(found.believed.is_empty(), "{found:?}");
    // A read lock on the byte does not keep an exclusive record alive.
    let ro = File::open(&img).unwrap();
    ofd_lock(&ro, libc::F_RDLCK, holder::liveness_byte("node-old"));
    assert!(holder::read(target(&reader, p, false)).believed.is_empty());
    drop(ro);
    // A record in another host's side file is not believed whatever that host's byte says.
    let mut moved = new.clone();
    moved.host = "node-x".into();
    fs::write(&side, serde_json::to_string(&moved).unwrap()).unwrap();
    ofd_lock(&lease, libc::F_WRLCK, holder::liveness_byte("node-x"));
    ofd_lock(&lease, libc::F_WRLCK, holder::liveness_byte("node-old"));
    let found = holder::read(target(&reader, p, false));
    assert!(found.believed.is_empty(), "{found:?}");
    assert!(
        found.ignored[0]
            .reason
            .contains("not the host its side file is named for"),
        "{found:?}"
    );
    // An unknown rule is not guessed at.
    let mut future = new.clone();
    future.liveness = Some("quorum".into());
    fs::write(&side, serde_json::to_string(&future).unwrap()).unwrap();
    let found = holder::read(target(&reader, p, false));
    assert!(found.believed.is_empty(), "{found:?}");
    assert!(
        found.ignored[0].reason.contains("unknown liveness rule"),
        "{found:?}"
    );
}
