//! lockwardend, driven over its socket with the real binary and real owner processes.
//!
//! Every test starts its own daemon(s) in a temporary directory and speaks the wire protocol
//! directly through `lockwarden::protocol`. Owners are real processes (`sleep`, or `sh` that
//! registered itself the way libvirt's forked child does). Drop guards kill every process a
//! test started, whatever happens.

mod common;

use common::daemon::{Lockwardend, Opts, TestDaemon};
use common::image;
use common::proto::{
    Client, Proc, after_pending_kills, byte0, call_as, err, eventually, excl, hostname, next_seq,
    ok, owner_for, probe_lock, shared, signal, sleeper, spawn_registered, tell, vm,
};
use lockwarden::protocol::{
    self, ErrorKind, FailureAction, LeaseInfo, LeaseMode, LeaseSpec, LockTarget, MAX_BODY, Owner,
    PROTOCOL_VERSION, Request, ResourceKind, Response,
};
use std::ffi::{CString, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const DAEMON: &str = env!("CARGO_BIN_EXE_lockwardend");
/// Generous bound for anything asynchronous (process exit, pidfd, signals) on a busy machine.
const BOUND: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Daemons

/// Every daemon of this suite logs at debug level (some tests look for debug lines).
fn start() -> TestDaemon {
    start_with(Opts::default())
}

fn start_with(opts: Opts<'_>) -> TestDaemon {
    TestDaemon::with(Opts {
        verbose: true,
        ..opts
    })
}

/// This suite's checks on top of the common requests.
trait Checks: Lockwardend {
    /// Acquire, check the answer is Ok with an empty lease list, and return what `owner`
    /// holds afterwards.
    fn acquired(&self, owner: &Owner, leases: Vec<LeaseSpec>) -> Vec<LeaseInfo> {
        let answer = ok(self.acquire(owner, leases));
        assert!(
            answer.is_empty(),
            "acquire answers carry no leases: {answer:?}"
        );
        self.held(owner)
    }

    /// Release, check the answer is Ok with an empty lease list, and return what `owner`
    /// still holds.
    fn released(&self, owner: &Owner, leases: Vec<LeaseSpec>) -> Vec<LeaseInfo> {
        let answer = ok(self.release(owner, leases));
        assert!(
            answer.is_empty(),
            "release answers carry no leases: {answer:?}"
        );
        self.held(owner)
    }
}

impl Checks for TestDaemon {}

/// SIGTERM the daemon and wait for its exit.
fn sigterm(d: &mut TestDaemon) -> ExitStatus {
    signal(d.proc.pid(), libc::SIGTERM);
    d.proc
        .wait_for(BOUND)
        .unwrap_or_else(|| panic!("lockwardend ignored SIGTERM:\n{}", d.log()))
}

// ---------------------------------------------------------------------------------------------
// Requests and checks

fn sha256_hex(s: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (it runs a client as uid 65534); run the suite as root"
    );
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn register_acquire_inquire_release() {
    let d = start();
    let images = tempfile::tempdir().unwrap();
    let img = image(images.path(), "web1.qcow2");
    let web1 = vm("web1");

    // Register from a connection that is not the owner: no lifetime handle, just the names.
    ok(d.client().call(&Request::Register {
        owner: web1.owner.clone(),
        restrict: false,
    }));
    let held = d.acquired(&web1.owner, vec![excl(&img)]);
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].lock_path, img.to_str().unwrap());
    assert_eq!(held[0].mode, LeaseMode::Exclusive);
    assert_eq!(held[0].owners, vec![web1.owner.clone()]);
    assert_eq!(byte0(&img), libc::F_WRLCK, "byte 0 must carry a write lock");
    // QEMU's own byte ranges stay untouched.
    assert_eq!(probe_lock(&img, 100, 5, libc::F_WRLCK).0, libc::F_UNLCK);
    assert_eq!(probe_lock(&img, 200, 5, libc::F_WRLCK).0, libc::F_UNLCK);

    // Idempotent acquire; inquire; admin views.
    assert_eq!(d.acquired(&web1.owner, vec![excl(&img)]).len(), 1);
    let inq = ok(d.client().call(&Request::Inquire {
        owner: web1.owner.clone(),
    }));
    assert_eq!(inq.len(), 1);
    assert_eq!(d.list().len(), 1);
    let st = d.status();
    assert_eq!(
        (st.leases, st.owners, st.protocol),
        (1, 1, PROTOCOL_VERSION)
    );
    assert_eq!(st.pid, d.proc.pid());

    // Release, twice: the second is a no-op.
    assert!(d.released(&web1.owner, vec![excl(&img)]).is_empty());
    assert!(d.released(&web1.owner, vec![excl(&img)]).is_empty());
    assert_eq!(byte0(&img), libc::F_UNLCK);
    assert!(d.list().is_empty());
    // The daemon never writes to an image.
    assert_eq!(fs::read(&img).unwrap(), vec![0u8; 4096]);
    assert!(d.log().contains("web1"), "lease log lines name the VM");
}

#[test]
fn a_record_written_after_the_answer_still_names_the_vm_in_a_refusal_at_once() {
    // From the second acquire of an image on, its (blank) side file exists: the acquire only
    // claims it — takes the liveness byte of the image — and writes the record right after
    // answering (holder::claim_known): another daemon refused at that very moment must still
    // name the VM (it reads again while the liveness lock is held over a blank file).
    let (d1, d2) = (start(), start());
    let images = tempfile::tempdir().unwrap();
    let img = image(images.path(), "fast.raw");
    let (a, b) = (vm("fast-1"), vm("fast-2"));
    for round in 0..20 {
        d1.acquired(&a.owner, vec![excl(&img)]);
        let e = err(d2.acquire(&b.owner, vec![excl(&img)]), ErrorKind::Busy);
        assert!(
            e.message.contains("is in use by VM 'fast-1'"),
            "round {round}: {}",
            e.message
        );
        d1.released(&a.owner, vec![excl(&img)]);
    }
}

#[test]
fn busy_between_two_owners_of_one_daemon() {
    let d = start();
    let images = tempfile::tempdir().unwrap();
    let img = image(images.path(), "web1.qcow2");
    let (a, b) = (vm("web1"), vm("web2"));
    d.acquired(&a.owner, vec![excl(&img)]);
    let e = err(d.acquire(&b.owner, vec![excl(&img)]), ErrorKind::Busy);
    let p = img.to_str().unwrap();
    assert_eq!(e.resource.as_deref(), Some(p));
    common::assert_mentions(
        &e.message,
        &[
            p,
            "VM 'web1'",
            a.owner.uuid.as_str(),
            hostname().as_str(),
            " UTC",
            "(exclusive)",
        ],
    );
    let h = e.holder.expect("holder");
    assert_eq!(h.vm_name.as_deref(), Some("web1"));
    assert_eq!(h.vm_uuid.as_deref(), Some(a.owner.uuid.as_str()));
    assert_eq!(h.host, Some(hostname()));
    assert_eq!(h.pid, Some(a.proc.pid() as i32));
    assert_eq!(h.mode, Some(LeaseMode::Exclusive));
    assert!(h.since.is_some());
    // A shared request against an exclusive holder is just as busy.
    err(d.acquire(&b.owner, vec![shared(&img)]), ErrorKind::Busy);
    // The refusal changed nothing for the holder.
    assert_eq!(d.list()[0].owners, vec![a.owner.clone()]);
}

#[test]
fn busy_between_two_daemons_sharing_an_image_dir() {
    let (d1, d2) = (start(), start());
    let images = tempfile::tempdir().unwrap();
    let img = image(images.path(), "db.raw");
    let (a, b) = (vm("db-host1"), vm("db-host2"));
    d1.acquired(&a.owner, vec![excl(&img)]);
    let e = err(d2.acquire(&b.owner, vec![excl(&img)]), ErrorKind::Busy);
    // Host 1 published who holds it (holder record beside the image): host 2 names the VM.
    common::assert_mentions(
        &e.message,
        &[
            img.to_str().unwrap(),
            "is in use by VM 'db-host1'",
            a.owner.uuid.as_str(),
            hostname().as_str(),
            "(exclusive)",
        ],
    );
    let h = e.holder.expect("holder");
    assert_eq!(h.vm_name.as_deref(), Some("db-host1"));
    assert_eq!(h.mode, Some(LeaseMode::Exclusive));
    let side = images
        .path()
        .join(format!(".lockwarden/db.raw@{}.json", hostname()));
    assert!(side.is_file(), "holder record {side:?}");
    assert!(d2.list().is_empty(), "the refused daemon holds nothing");
    d1.released(&a.owner, vec![excl(&img)]);
    // Withdrawn: blanked with spaces (the file stays for this host's next lease of the
    // image) and no longer held by its publisher.
    // A missing or unreadable file is a failure here, not "withdrawn".
    let left = fs::read(&side)
        .unwrap_or_else(|e| panic!("the holder record {side:?} must stay after release: {e}"));
    assert!(
        !left.is_empty() && left.iter().all(|b| *b == b' '),
        "release withdraws the holder record: {:?}",
        String::from_utf8_lossy(&left)
    );
    d2.acquired(&b.owner, vec![excl(&img)]);
    let e = err(d1.acquire(&a.owner, vec![shared(&img)]), ErrorKind::Busy);
    assert!(
        e.message.contains("is in use by VM 'db-host2'"),
        "{}",
        e.message
    );
}

#[test]
fn shared_with_shared_is_allowed_shared_with_exclusive_is_not() {
    let (d1, d2) = (start(), start());
    let images = tempfile::tempdir().unwrap();
    let iso = image(images.path(), "install.iso");
    let (a, b, c, x) = (vm("a"), vm("b"), vm("c"), vm("x"));
    d1.acquired(&a.owner, vec![shared(&iso)]);
    d1.acquired(&b.owner, vec![shared(&iso)]);
    let l = d1.list();
    assert_eq!(l.len(), 1, "one file, one lease");
    assert_eq!(l[0].owners.len(), 2);
    // Another host may share it too, but nobody may write.
    d2.acquired(&x.owner, vec![shared(&iso)]);
    let e = err(d1.acquire(&c.owner, vec![excl(&iso)]), ErrorKind::Busy);
    assert!(e.message.contains("(shared)"), "{}", e.message);
    err(d2.acquire(&c.owner, vec![excl(&iso)]), ErrorKind::Busy);
    // An owner holding it shared cannot silently turn writable while others share it.
    err(d1.acquire(&a.owner, vec![excl(&iso)]), ErrorKind::Busy);
    // One shared owner leaving keeps the lock for the other.
    d1.released(&a.owner, vec![shared(&iso)]);
    assert_eq!(byte0(&iso), libc::F_RDLCK);
    assert_eq!(d1.list()[0].owners, vec![b.owner.clone()]);
    d1.released(&b.owner, vec![shared(&iso)]);
    d2.released(&x.owner, vec![shared(&iso)]);
    assert_eq!(byte0(&iso), libc::F_UNLCK);
    // Same image once writable and once read-only in one request: one exclusive lease.
    let l = d1.acquired(&c.owner, vec![shared(&iso), excl(&iso)]);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].mode, LeaseMode::Exclusive);
}

#[test]
fn sixteen_disks_all_or_nothing() {
    let (d1, d2) = (start(), start());
    let images = tempfile::tempdir().unwrap();
    let disks: Vec<PathBuf> = (1..=16)
        .map(|i| image(images.path(), &format!("disk{i:02}.img")))
        .collect();
    let other = image(images.path(), "already-mine.img");
    let (big, blocker) = (vm("big"), vm("blocker"));
    // The big VM already holds one unrelated disk: it must survive the failed request.
    d1.acquired(&big.owner, vec![excl(&other)]);
    d2.acquired(&blocker.owner, vec![excl(&disks[8])]);
    let specs: Vec<LeaseSpec> = disks.iter().map(|p| excl(p)).collect();
    let e = err(d1.acquire(&big.owner, specs.clone()), ErrorKind::Busy);
    assert_eq!(e.resource.as_deref(), disks[8].to_str(), "{}", e.message);
    let still = d1.list();
    assert_eq!(
        still.len(),
        1,
        "only the previously held disk stays: {still:?}"
    );
    assert_eq!(still[0].lock_path, other.to_str().unwrap());
    for (i, p) in disks.iter().enumerate() {
        let want = if i == 8 { libc::F_WRLCK } else { libc::F_UNLCK };
        assert_eq!(byte0(p), want, "disk {}", i + 1);
    }
    // Checked from the other daemon: all sixteen can be taken there now.
    let l = d2.acquired(&blocker.owner, specs);
    assert_eq!(l.len(), 16);
}

#[test]
fn lifetime_handle_closing_with_the_owner_releases_its_leases() {
    let d = start();
    let images = tempfile::tempdir().unwrap();
    let img = image(images.path(), "h.img");
    let (mut p, owner, resp) = spawn_registered(&d.socket, "handle-exit", "read cmd; exit 0");
    ok(resp);
    d.acquired(&owner, vec![excl(&img)]);
    assert_eq!(d.status().owners, 1);
    tell(&mut p, "exit");
    let st = p.wait_for(BOUND).expect("owner exits");
    assert!(st.success(), "{st}");
    let took = eventually("the lease is released", || d.list().is_empty());
    eprintln!("handle close -> lease released in {took:?}");
    assert_eq!(byte0(&img), libc::F_UNLCK);
    eventually("the owner is forgotten", || d.status().owners == 0);
}

#[test]
fn sigkilled_owner_frees_its_leases() {
    let (d1, d2) = (start(), start());
    let images = tempfile::tempdir().unwrap();
    let img = image(images.path(), "k.img");
    let mut victim = vm("victim");
    let other = vm("other");
    // No lifetime handle at all (like an owner acquired for after a daemon restart): the
    // pidfd alone must notice the death.
    d1.acquired(&victim.owner, vec![excl(&img)]);
    err(d2.acquire(&other.owner, vec![excl(&img)]), ErrorKind::Busy);
    let t0 = Instant::now();
    signal(victim.proc.pid(), libc::SIGKILL);
    let took = eventually("the other daemon can take the disk", || {
        matches!(
            d2.acquire(&other.owner, vec![excl(&img)]),
            Response::Ok { .. }
        )
    });
    eprintln!(
        "SIGKILL -> disk free for another daemon after {:?} (poll loop {took:?})",
        t0.elapsed()
    );
    assert!(victim.proc.wait_for(BOUND).is_some());
    assert!(d1.list().is_empty());
}

#[test]
fn owner_closing_its_handle_while_holding_is_terminated() {
    let d = start();
    let images = tempfile::tempdir().unwrap();
    let img = image(images.path(), "t.img");
    let (mut p, owner, resp) =
        spawn_registered(&d.socket, "rogue", "read cmd; exec 9>&-; exec sleep 1000");
    ok(resp);
    d.acquired(&owner, vec![excl(&img)]);
    tell(&mut p, "close");
    let st = p
        .wait_for(BOUND)
        .unwrap_or_else(|| panic!("owner not terminated:\n{}", d.log()));
    assert_eq!(st.signal(), Some(libc::SIGTERM), "{st}");
    eventually("the dead owner's lease is released", || d.list().is_empty());
    assert_eq!(byte0(&img), libc::F_UNLCK);
    assert!(d.log().contains("sending SIGTERM"), "{}", d.log());
}

#[test]
fn owner_ignoring_sigterm_is_killed_after_the_grace_period() {
    let d = start_with(Opts {
        config: "kill_grace_ms = 300\n",
        ..Opts::default()
    });
    let images = tempfile::tempdir().unwrap();
    let img = image(images.path(), "t.img");
    let (mut p, owner, resp) = spawn_registered(
        &d.socket,
        "stubborn",
        "trap '' TERM; read cmd; exec 9>&-; exec sleep 1000",
    );
    ok(resp);
    d.acquired(&owner, vec![excl(&img)]);
    let t0 = Instant::now();
    tell(&mut p, "close");
    // Design §3: a VM never runs on a disk it no longer holds, so while the owner survives
    // SIGTERM its lease stays held (another host must not start the VM meanwhile). The
    // SIGTERM is logged as it is sent; SIGKILL comes kill_grace_ms later.
    eventually("the daemon sends SIGTERM", || {
        d.log().contains("sending SIGTERM")
    });
    assert!(
        p.0.try_wait().unwrap().is_none(),
        "SIGTERM is ignored by this owner"
    );
    assert_eq!(
        byte0(&img),
        libc::F_WRLCK,
        "lease kept while the owner runs"
    );
    assert_eq!(d.list().len(), 1);
    let fresh = image(images.path(), "new.img");
    err(d.acquire(&owner, vec![excl(&fresh)]), ErrorKind::Invalid);
    let st = p
        .wait_for(BOUND)
        .unwrap_or_else(|| panic!("owner not killed:\n{}", d.log()));
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{st}");
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "grace period honoured"
    );
    eventually("the killed owner's lease is released", || {
        d.list().is_empty()
    });
    assert_eq!(byte0(&img), libc::F_UNLCK);
    // A handle whose owner held nothing closes quietly: nobody is killed.
    let (mut q, idle, resp) =
        spawn_registered(&d.socket, "idle", "read cmd; exec 9>&-; exec sleep 1000");
    ok(resp);
    tell(&mut q, "close");
    // The daemon decides when it sees the handle close, and logs the decision: after that
    // line (not after a sleep), the owner must still run and must not be in a kill sequence.
    let decided = format!(
        "lifetime handle of VM \"idle\" (pid {}) closed; it held no leases",
        idle.pid
    );
    eventually("the daemon handles the idle owner's closed handle", || {
        d.log().contains(&decided)
    });
    // A kill sequence sends SIGTERM only after a settle time: a later sequence reaching its
    // SIGTERM proves one for the idle owner would have by then.
    after_pending_kills(&d.socket, &image(images.path(), "witness.img"), || d.log());
    assert!(
        q.0.try_wait().unwrap().is_none(),
        "an owner without leases is left alone"
    );
    assert!(
        !d.log().contains(&format!("(pid {}) still runs", idle.pid)),
        "the idle owner was put in a kill sequence:\n{}",
        d.log()
    );
}

#[test]
fn restricted_connections_refuse_everything() {
    let d = start();
    let images = tempfile::tempdir().unwrap();
    let img = image(images.path(), "r.img");
    let a = vm("restricted");
    let mut c = d.client();
    ok(c.call(&Request::Register {
        owner: a.owner.clone(),
        restrict: true,
    }));
    for req in [
        Request::Status,
        Request::List,
        Request::Inquire {
            owner: a.owner.clone(),
        },
        Request::Acquire {
            owner: a.owner.clone(),
            leases: vec![excl(&img)],
            action: FailureAction::Default,
            restrict: false,
        },
    ] {
        let e = err(c.call(&req), ErrorKind::Denied);
        assert!(
            e.message
                .contains("lock manager connection has been restricted"),
            "{}",
            e.message
        );
    }
    assert_eq!(byte0(&img), libc::F_UNLCK, "nothing was locked");
    // Acquire with restrict: succeeds, then the connection is closed for business.
    let mut c = d.client();
    ok(c.call(&Request::Acquire {
        owner: a.owner.clone(),
        leases: vec![excl(&img)],
        action: FailureAction::Poweroff,
        restrict: true,
    }));
    err(c.call(&Request::Status), ErrorKind::Denied);
    // The admin socket serves status and list only.
    let e = err(
        d.admin_client().call(&Request::Release {
            owner: a.owner.clone(),
            leases: vec![excl(&img)],
        }),
        ErrorKind::Denied,
    );
    assert!(e.message.contains("admin socket"), "{}", e.message);
    assert_eq!(d.list().len(), 1);
}

#[test]
fn non_root_peer_is_refused() {
    require_root();
    let d = start();
    // Let uid 65534 reach the socket, so the daemon's own SO_PEERCRED check is what refuses.
    d.open_to_others();
    let e = err(
        call_as(65534, &d.socket, &Request::Status),
        ErrorKind::Denied,
    );
    assert!(e.message.contains("uid 65534"), "{}", e.message);
    // Root clients are still served.
    assert_eq!(d.status().leases, 0);
    assert!(d.log().contains("refusing client"), "{}", d.log());
}

#[test]
fn protocol_version_mismatch_is_an_error_not_a_hang() {
    let d = start();
    let mut c = d.client();
    let mut frame = protocol::encode(&Request::Status).unwrap();
    frame[4..6].copy_from_slice(&(PROTOCOL_VERSION + 1).to_be_bytes());
    c.0.write_all(&frame).unwrap();
    let e = err(
        protocol::read_message(&mut c.0).unwrap(),
        ErrorKind::Version,
    );
    assert!(
        e.message
            .contains(&format!("version {}", PROTOCOL_VERSION + 1)),
        "{}",
        e.message
    );
    c.assert_closed();
    assert_eq!(d.status().leases, 0, "the daemon still serves");
}

#[test]
fn oversized_or_garbage_frames_close_only_that_connection() {
    let d = start();
    // A client stuck mid-frame must not hold up anybody.
    let mut slow = d.client();
    slow.0.write_all(&protocol::MAGIC).unwrap();
    let mut big = d.client();
    let mut h = protocol::header(0).unwrap();
    h[8..12].copy_from_slice(&((MAX_BODY as u32) + 1).to_be_bytes());
    big.0.write_all(&h).unwrap();
    let e = err(
        protocol::read_message(&mut big.0).unwrap(),
        ErrorKind::Invalid,
    );
    assert!(e.message.contains("exceeds"), "{}", e.message);
    big.assert_closed();
    let mut junk = d.client();
    junk.0.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    err(
        protocol::read_message(&mut junk.0).unwrap(),
        ErrorKind::Invalid,
    );
    junk.assert_closed();
    // Malformed JSON in a well-formed frame: an error, and the connection stays usable.
    let mut bad = d.client();
    let body = br#"{"op":"acquire","owner":42}"#;
    bad.0
        .write_all(&protocol::header(body.len()).unwrap())
        .unwrap();
    bad.0.write_all(body).unwrap();
    err(
        protocol::read_message(&mut bad.0).unwrap(),
        ErrorKind::Invalid,
    );
    assert!(matches!(bad.call(&Request::Status), Response::Status(_)));
    // A full-size frame is read completely and answered.
    let mut max = d.client();
    let filler = "x".repeat(MAX_BODY - 64);
    let body = format!(r#"{{"op":"status","pad":"{filler}"}}"#);
    max.0
        .write_all(&protocol::header(body.len()).unwrap())
        .unwrap();
    max.0.write_all(body.as_bytes()).unwrap();
    assert!(matches!(
        protocol::read_message::<_, Response>(&mut max.0).unwrap(),
        Response::Status(_)
    ));
    assert_eq!(
        d.status().clients,
        4,
        "slow, bad, max and this status client remain"
    );
    drop(slow);
}

#[test]
fn two_paths_to_one_image_are_one_lease() {
    let d = start();
    let images = tempfile::tempdir().unwrap();
    let img = image(images.path(), "real.qcow2");
    let sym = images.path().join("alias.qcow2");
    std::os::unix::fs::symlink(&img, &sym).unwrap();
    let hard = images.path().join("hard.qcow2");
    fs::hard_link(&img, &hard).unwrap();
    let (a, b) = (vm("first"), vm("second"));
    let l = d.acquired(&a.owner, vec![excl(&img), excl(&sym)]);
    assert_eq!(l.len(), 1, "{l:?}");
    assert_eq!(d.acquired(&a.owner, vec![excl(&hard)]).len(), 1);
    let e = err(d.acquire(&b.owner, vec![excl(&hard)]), ErrorKind::Busy);
    assert_eq!(
        e.holder.and_then(|h| h.vm_name).as_deref(),
        Some("first"),
        "the holder is known by name, not a kernel conflict: {}",
        e.message
    );
    assert!(e.message.contains(hard.to_str().unwrap()));
    // Releasing through another path releases the one lease.
    d.released(&a.owner, vec![excl(&sym)]);
    assert!(d.list().is_empty());
    assert_eq!(byte0(&img), libc::F_UNLCK);
    // Release works even after the image was deleted.
    d.acquired(&b.owner, vec![excl(&hard)]);
    fs::remove_file(&hard).unwrap();
    d.released(&b.owner, vec![excl(&hard)]);
    assert!(d.list().is_empty());
}

fn lockspace(
    name: &str,
    dir: &Path,
    file: &str,
    kind: ResourceKind,
    create_dir: bool,
) -> LeaseSpec {
    LeaseSpec {
        name: name.to_string(),
        kind,
        mode: LeaseMode::Exclusive,
        target: LockTarget::Lockspace {
            dir: dir.to_str().unwrap().to_string(),
            file: file.to_string(),
            create_dir,
        },
    }
}

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn lockspace_files_are_created_0600_and_links_never_followed() {
    let base = tempfile::tempdir().unwrap();
    // <lease> files may only live under lease_dir (docs/hardening.md).
    let config = format!("lease_dir = \"{}\"\n", base.path().display());
    let d1 = start_with(Opts {
        config: &config,
        ..Opts::default()
    });
    let d2 = start();
    let locks = base.path().join("lockd/files");
    let disk_path = "/var/lib/libvirt/images/web1.qcow2";
    let hash = sha256_hex(disk_path);
    let spec = lockspace(disk_path, &locks, &hash, ResourceKind::Disk, true);
    let (a, b) = (vm("ls-a"), vm("ls-b"));
    let l = d1.acquired(&a.owner, vec![spec.clone()]);
    let lock_file = locks.join(&hash);
    assert_eq!(l[0].lock_path, lock_file.to_str().unwrap());
    assert_eq!(l[0].name, disk_path);
    assert_eq!(mode_of(&lock_file), 0o600);
    assert_eq!(mode_of(&locks), 0o700);
    assert_eq!(byte0(&lock_file), libc::F_WRLCK);
    let e = err(d2.acquire(&b.owner, vec![spec.clone()]), ErrorKind::Busy);
    assert!(
        e.message.contains(disk_path) && e.message.contains(&hash),
        "{}",
        e.message
    );
    // Releasing the last owner deletes lockd's disk lock file, as virtlockd does.
    d1.released(&a.owner, vec![spec.clone()]);
    assert!(!lock_file.exists(), "disk lock file removed on release");
    d2.acquired(&b.owner, vec![spec.clone()]);
    assert!(lock_file.exists());
    d2.released(&b.owner, vec![spec]);

    // A symlink planted at the lock file's name is not followed, whether it dangles or not.
    let victim = base.path().join("victim");
    let planted = sha256_hex("/images/planted.img");
    std::os::unix::fs::symlink(&victim, locks.join(&planted)).unwrap();
    let spec = lockspace(
        "/images/planted.img",
        &locks,
        &planted,
        ResourceKind::Disk,
        true,
    );
    let e = err(d1.acquire(&a.owner, vec![spec.clone()]), ErrorKind::Invalid);
    assert!(e.message.contains("symbolic link"), "{}", e.message);
    assert!(!victim.exists(), "the link target must not be created");
    fs::write(&victim, b"precious").unwrap();
    err(d1.acquire(&a.owner, vec![spec]), ErrorKind::Invalid);
    assert_eq!(byte0(&victim), libc::F_UNLCK);
    assert_eq!(fs::read(&victim).unwrap(), b"precious");

    // <lease> keys: the directory must exist; the key file is created and kept.
    let missing = base.path().join("no-such-lockspace");
    let e = err(
        d1.acquire(
            &a.owner,
            vec![lockspace(
                "mykey",
                &missing,
                "mykey",
                ResourceKind::Lease,
                false,
            )],
        ),
        ErrorKind::Invalid,
    );
    assert!(
        e.message.contains(missing.to_str().unwrap()),
        "{}",
        e.message
    );
    assert!(!missing.exists());
    let key = lockspace("mykey", base.path(), "mykey", ResourceKind::Lease, false);
    d1.acquired(&a.owner, vec![key.clone()]);
    assert_eq!(mode_of(&base.path().join("mykey")), 0o600);
    d1.released(&a.owner, vec![key]);
    assert!(
        base.path().join("mykey").exists(),
        "lease key files are never deleted"
    );
    // Bad lock file names are refused before touching anything.
    for bad in ["..", "a/b", ""] {
        err(
            d1.acquire(
                &a.owner,
                vec![lockspace("k", base.path(), bad, ResourceKind::Lease, false)],
            ),
            ErrorKind::Invalid,
        );
    }
}

#[test]
fn posix_lock_holders_and_lockwarden_exclude_each_other() {
    let d = start();
    let images = tempfile::tempdir().unwrap();
    let img = image(images.path(), "interop.img");
    let a = vm("interop");
    // A process holding a classic POSIX F_WRLCK on byte 0, as virtlockd does.
    let cpath = CString::new(img.as_os_str().as_bytes()).unwrap();
    let mut cmd = Command::new("sleep");
    cmd.arg("1000");
    // SAFETY: open and fcntl only, on a pre-built C string: async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(cpath.as_ptr(), libc::O_RDWR);
            let fl = libc::flock {
                l_type: libc::F_WRLCK as libc::c_short,
                l_whence: libc::SEEK_SET as libc::c_short,
                l_start: 0,
                l_len: 1,
                l_pid: 0,
            };
            if fd < 0 || libc::fcntl(fd, libc::F_SETLK, &fl) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let holder = Proc(cmd.spawn().expect("spawning the POSIX lock holder"));
    eventually("the POSIX lock is visible", || {
        probe_lock(&img, 0, 1, libc::F_WRLCK).1 == holder.pid() as i32
    });
    let e = err(d.acquire(&a.owner, vec![shared(&img)]), ErrorKind::Busy);
    let want = format!("local process {} (sleep)", holder.pid());
    assert!(e.message.contains(&want), "{want:?} not in {:?}", e.message);
    assert_eq!(e.holder.unwrap().pid, Some(holder.pid() as i32));
    drop(holder);
    d.acquired(&a.owner, vec![excl(&img)]);
    // And our lease makes a POSIX F_SETLK (what virtlockd does) fail.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    for l_type in [libc::F_WRLCK, libc::F_RDLCK] {
        let fl = libc::flock {
            l_type: l_type as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 1,
            l_pid: 0,
        };
        // SAFETY: F_SETLK with a valid descriptor and a live flock struct.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) };
        let errno = std::io::Error::last_os_error().raw_os_error();
        assert_eq!(r, -1, "POSIX lock type {l_type} must be refused");
        assert!(
            matches!(errno, Some(libc::EAGAIN | libc::EACCES)),
            "{errno:?}"
        );
    }
}

#[test]
fn unlockable_targets_are_refused_at_once() {
    let d = start();
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo");
    let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    assert!(fs::metadata(&fifo).unwrap().file_type().is_fifo());
    let a = vm("bad-input");
    let long = format!("/{}", "x".repeat(5000));
    let cases: Vec<(String, &str)> = vec![
        (tmp.path().to_str().unwrap().to_string(), "directory"),
        (fifo.to_str().unwrap().to_string(), "FIFO"),
        ("/dev/null".to_string(), "character device"),
        ("images/relative.img".to_string(), "not absolute"),
        (
            tmp.path().join("missing.img").to_str().unwrap().to_string(),
            "does not exist",
        ),
        (String::new(), "empty"),
        ("/images/nul\0byte".to_string(), "NUL"),
        (long, "longer than"),
    ];
    let t0 = Instant::now();
    for (path, why) in &cases {
        let spec = LeaseSpec {
            name: if path.is_empty() {
                "empty".into()
            } else {
                path.clone()
            },
            kind: ResourceKind::Disk,
            mode: LeaseMode::Exclusive,
            target: LockTarget::File { path: path.clone() },
        };
        let e = err(d.acquire(&a.owner, vec![spec]), ErrorKind::Invalid);
        assert!(e.message.contains(why), "{why:?} not in {:?}", e.message);
        if !path.is_empty() && path.len() < 200 && !path.contains('\0') {
            assert!(
                e.message.contains(path.as_str()),
                "{:?} names the disk",
                e.message
            );
        }
    }
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "refusals never block"
    );
    assert!(d.list().is_empty());
    // A dead or bogus owner pid cannot hold leases (nothing would ever release them).
    let dead = {
        let mut p = sleeper();
        let pid = p.pid();
        p.0.kill().unwrap();
        p.0.wait().unwrap();
        pid
    };
    let img = image(tmp.path(), "ok.img");
    let e = err(
        d.acquire(&owner_for(dead, "ghost"), vec![excl(&img)]),
        ErrorKind::Invalid,
    );
    assert!(e.message.contains("not running"), "{}", e.message);
    err(
        d.acquire(&owner_for(0, "zero"), vec![excl(&img)]),
        ErrorKind::Invalid,
    );
    assert_eq!(byte0(&img), libc::F_UNLCK);
}

#[test]
fn sigterm_exits_zero_and_removes_its_sockets() {
    let mut d = start();
    let images = tempfile::tempdir().unwrap();
    let img = image(images.path(), "s.img");
    let a = vm("term");
    d.acquired(&a.owner, vec![excl(&img)]);
    assert_eq!(
        fs::read_to_string(&d.pid_file).unwrap().trim(),
        d.proc.pid().to_string()
    );
    assert_eq!(mode_of(&d.socket), 0o600);
    assert_eq!(mode_of(&d.admin), 0o600);
    let keeper_sock = d.socket.with_file_name("lockwardend-keeper.sock");
    assert_eq!(mode_of(&keeper_sock), 0o600);
    let st = sigterm(&mut d);
    assert_eq!(st.code(), Some(0), "{st}\n{}", d.log());
    assert!(!d.socket.exists() && !d.admin.exists(), "sockets removed");
    assert!(!d.pid_file.exists(), "pid file removed");
    assert!(d.log().contains("SIGTERM"));
    // The VM still runs: its lease stays held (by the keeper) after the daemon stopped...
    assert!(d.log().contains("keeps holding 1 lease(s)"), "{}", d.log());
    assert_eq!(
        byte0(&img),
        libc::F_WRLCK,
        "a stop must not unprotect a running VM"
    );
    // ...until the VM exits; then the keeper lets go and exits too.
    drop(a);
    eventually("the keeper drops the dead VM's lock", || {
        byte0(&img) == libc::F_UNLCK
    });
    eventually("the keeper exits and removes its socket", || {
        !keeper_sock.exists()
    });
}

#[test]
fn sighup_and_sigusr1_keep_it_running_with_its_locks() {
    let d = start();
    let images = tempfile::tempdir().unwrap();
    let img = image(images.path(), "u.img");
    let a = vm("upgrade");
    let mut c = d.client();
    ok(c.call(&Request::Acquire {
        owner: a.owner.clone(),
        leases: vec![excl(&img)],
        action: FailureAction::Default,
        restrict: false,
    }));
    signal(d.proc.pid(), libc::SIGHUP);
    eventually("the first re-exec completes", || {
        d.log().contains("live re-exec #1 complete")
    });
    signal(d.proc.pid(), libc::SIGUSR1);
    eventually("the second re-exec completes", || {
        d.log().contains("live re-exec #2 complete")
    });
    assert_eq!(d.status().pid, d.proc.pid(), "same process");
    assert_eq!(d.list().len(), 1);
    assert_eq!(byte0(&img), libc::F_WRLCK);
    // The connection opened before both re-execs still works.
    assert_eq!(
        ok(c.call(&Request::Inquire {
            owner: a.owner.clone()
        }))
        .len(),
        1
    );
}

/// The event loop watches owners through epoll registrations made when an owner appears
/// (docs/architecture.md §6): an owner carried over a live re-exec (its pidfd restored) and one
/// that appears after it are both seen to exit, and their leases go.
#[test]
fn owners_restored_by_a_reexec_and_added_after_it_are_seen_to_exit() {
    let d = start();
    let images = tempfile::tempdir().unwrap();
    let before_img = image(images.path(), "before.img");
    let after_img = image(images.path(), "after.img");
    let before = vm("before");
    let mut c = d.client();
    ok(c.call(&Request::Acquire {
        owner: before.owner.clone(),
        leases: vec![excl(&before_img)],
        action: FailureAction::Default,
        restrict: false,
    }));
    signal(d.proc.pid(), libc::SIGHUP);
    eventually("the re-exec completes", || {
        d.log().contains("live re-exec #1 complete")
    });
    let after = vm("after");
    ok(c.call(&Request::Acquire {
        owner: after.owner.clone(),
        leases: vec![excl(&after_img)],
        action: FailureAction::Default,
        restrict: false,
    }));
    assert_eq!(d.list().len(), 2);
    drop(before);
    eventually("the restored owner's exit frees its lease", || {
        d.list().len() == 1
    });
    drop(after);
    eventually("the new owner's exit frees its lease", || {
        d.list().is_empty()
    });
    assert_eq!(d.status().pid, d.proc.pid(), "same process");
}

#[test]
fn bad_configuration_stops_the_start_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("lockwardend.conf");
    fs::write(&conf, "max_clients = 10\nsokcet = \"/x\"\n").unwrap();
    let out = Command::new(DAEMON)
        .arg("--config")
        .arg(&conf)
        .arg("--socket")
        .arg(dir.path().join("s"))
        .arg("--admin-socket")
        .arg(dir.path().join("a"))
        .arg("--pid-file")
        .arg(dir.path().join("p"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = format!("{}:2: key 'sokcet'", conf.display());
    assert!(stderr.contains(&want), "{want:?} not in {stderr:?}");
    assert!(!dir.path().join("s").exists(), "nothing was bound");
    // Usage errors and --help / --version.
    let out = Command::new(DAEMON).arg("--bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("'--bogus'"));
    let out = Command::new(DAEMON).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--pid-file"));
    let out = Command::new(DAEMON).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("lockwardend "));
}

#[test]
fn second_daemon_on_the_same_pid_file_or_socket_refuses() {
    let d = start();
    let other = tempfile::tempdir().unwrap();
    let run = |socket: &Path, pid_file: &Path| {
        Command::new(DAEMON)
            .arg("--config")
            .arg(other.path().join("none.conf"))
            .arg("--socket")
            .arg(socket)
            .arg("--admin-socket")
            .arg(other.path().join("admin.sock"))
            .arg("--pid-file")
            .arg(pid_file)
            .output()
            .unwrap()
    };
    let out = run(&other.path().join("main.sock"), &d.pid_file);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("another lockwardend (pid {})", d.proc.pid())),
        "{stderr}"
    );
    assert!(!other.path().join("main.sock").exists());
    let out = run(&d.socket, &other.path().join("p.pid"));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already serving"), "{stderr}");
    // The first daemon is unharmed.
    assert!(d.socket.exists());
    assert_eq!(d.status().pid, d.proc.pid());
}

#[test]
fn stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("stale.sock");
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let mut cmd = Command::new(DAEMON);
    cmd.arg("--config")
        .arg(dir.path().join("none.conf"))
        .arg("--socket")
        .arg(&sock)
        .arg("--admin-socket")
        .arg(dir.path().join("admin.sock"))
        .arg("--pid-file")
        .arg(dir.path().join("p.pid"))
        .stderr(Stdio::null());
    let mut p = Proc(cmd.spawn().unwrap());
    eventually("the daemon serves on the formerly stale socket", || {
        UnixStream::connect(&sock).is_ok()
    });
    let mut c = Client::connect(&sock);
    assert!(matches!(c.call(&Request::Status), Response::Status(_)));
    assert!(p.0.try_wait().unwrap().is_none());
}

#[test]
fn notify_socket_gets_ready_and_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    // A path socket and an abstract one ("@name").
    let path = tmp.path().join("notify");
    let by_path = UnixDatagram::bind(&path).unwrap();
    let abstract_name = format!("lockwarden-test-{}-{}", std::process::id(), next_seq());
    let by_name = {
        use std::os::linux::net::SocketAddrExt;
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes()).unwrap();
        UnixDatagram::bind_addr(&addr).unwrap()
    };
    for (sock, target) in [
        (&by_path, path.as_os_str().to_os_string()),
        (&by_name, OsString::from(format!("@{abstract_name}"))),
    ] {
        sock.set_read_timeout(Some(BOUND)).unwrap();
        let mut d = start_with(Opts {
            env: vec![("NOTIFY_SOCKET", target)],
            ..Opts::default()
        });
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert_eq!(sigterm(&mut d).code(), Some(0));
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}

#[test]
fn systemd_socket_activation_is_used_and_its_sockets_kept() {
    let dir = tempfile::tempdir().unwrap();
    let main_path = dir.path().join("act.sock");
    let admin_path = dir.path().join("act-admin.sock");
    let main = UnixListener::bind(&main_path).unwrap();
    let admin = UnixListener::bind(&admin_path).unwrap();
    let (mfd, afd) = (main.as_raw_fd(), admin.as_raw_fd());
    let mut cmd = common::daemon::socket_activated(dir.path(), afd, mfd);
    cmd.stderr(File::create(dir.path().join("log")).unwrap());
    let mut p = Proc(cmd.spawn().unwrap());
    let images = tempfile::tempdir().unwrap();
    let img = image(images.path(), "act.img");
    let a = vm("activated");
    let mut c = Client::connect(&main_path);
    ok(c.call(&Request::Acquire {
        owner: a.owner.clone(),
        leases: vec![excl(&img)],
        action: FailureAction::Default,
        restrict: false,
    }));
    // The fd named lockwardend-admin.socket really is the admin socket.
    let mut adm = Client::connect(&admin_path);
    err(
        adm.call(&Request::Inquire {
            owner: a.owner.clone(),
        }),
        ErrorKind::Denied,
    );
    match adm.call(&Request::List) {
        Response::Ok { leases } => assert_eq!(leases.len(), 1),
        other => panic!("{other:?}"),
    }
    assert!(
        !dir.path().join("unused.sock").exists(),
        "nothing bound by the daemon"
    );
    signal(p.pid(), libc::SIGTERM);
    assert_eq!(p.wait_for(BOUND).unwrap().code(), Some(0));
    assert!(
        main_path.exists() && admin_path.exists(),
        "sockets owned by systemd are not removed"
    );
    drop((main, admin));
}

/// Many acquire/release cycles of 1 and 16 disks over one connection leave nothing behind.
/// (How fast they are is measured by `cargo bench --bench lockcycle`, not asserted here.)
#[test]
fn repeated_lock_cycles_leave_nothing_behind() {
    let d = start();
    let images = tempfile::tempdir().unwrap();
    let disks: Vec<PathBuf> = (0..16)
        .map(|i| image(images.path(), &format!("lat{i}.img")))
        .collect();
    let a = vm("cycles");
    let mut c = d.client();
    let mut cycle = |specs: &[LeaseSpec]| {
        ok(c.call(&Request::Acquire {
            owner: a.owner.clone(),
            leases: specs.to_vec(),
            action: FailureAction::Default,
            restrict: false,
        }));
        ok(c.call(&Request::Release {
            owner: a.owner.clone(),
            leases: specs.to_vec(),
        }));
    };
    let one = vec![excl(&disks[0])];
    let all: Vec<LeaseSpec> = disks.iter().map(|p| excl(p)).collect();
    for _ in 0..200 {
        cycle(&one);
        cycle(&all);
    }
    assert!(d.list().is_empty());
    for disk in &disks {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(disk)
            .unwrap();
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as i16;
        fl.l_len = 1;
        // SAFETY: F_OFD_GETLK on a valid fd with a properly initialised flock.
        assert_eq!(
            unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) },
            0
        );
        assert_eq!(
            fl.l_type,
            libc::F_UNLCK as i16,
            "{} still locked",
            disk.display()
        );
    }
}

#[test]
fn protocol_doc_examples_parse() {
    let doc = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md"))
        .expect("docs/protocol.md");
    let (mut requests, mut responses) = (0, 0);
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let kind = match line.trim() {
            "```json request" => "request",
            "```json response" => "response",
            _ => continue,
        };
        let block: String = lines
            .by_ref()
            .take_while(|l| l.trim() != "```")
            .collect::<Vec<_>>()
            .join("\n");
        if kind == "request" {
            serde_json::from_str::<Request>(&block)
                .unwrap_or_else(|e| panic!("request example does not parse ({e}):\n{block}"));
            requests += 1;
        } else {
            serde_json::from_str::<Response>(&block)
                .unwrap_or_else(|e| panic!("response example does not parse ({e}):\n{block}"));
            responses += 1;
        }
    }
    assert!(
        requests >= 6 && responses >= 4,
        "{requests} requests, {responses} responses"
    );
}
