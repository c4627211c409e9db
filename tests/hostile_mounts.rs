//! Issue 13 finding 5: refusals read other hosts' side files within a bound, never on the event
//! loop, and whether storage work may run inline is decided from what the path really reaches,
//! never from its text (a symlink into a hung mount must not freeze the daemon). Real daemon,
//! real locks; the FUSE test file system (example `testfs`, tests/fusefs/testfs.rs) stands in
//! for a hung NFS server. Needs root and /dev/fuse.
//!
//! "Another host" is this test process: its OFD locks (its own open file descriptions) conflict
//! with the daemon's exactly as another NFS client's would.

mod common;

use common::wait::wait_until;

use common::daemon::TestDaemon;
use common::locks::hold_byte0;
use common::proto::{BOUND, Client, err, excl, ok, vm};
use lockwarden::protocol::{ErrorKind, FailureAction, LeaseSpec, Request, Response};
use std::fs::{self, File};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Send an exclusive acquire of `image` for `owner` from another thread: its answer arrives on
/// the channel; also returns when the request was started.
fn acquire_in_background(
    socket: &Path,
    owner: &lockwarden::protocol::Owner,
    image: &Path,
) -> (mpsc::Receiver<Response>, Instant) {
    let (tx, rx) = mpsc::channel();
    let (sock, owner, spec) = (socket.to_path_buf(), owner.clone(), excl(image));
    let t0 = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(acquire(&sock, &owner, vec![spec]));
    });
    (rx, t0)
}

fn acquire(socket: &Path, owner: &lockwarden::protocol::Owner, leases: Vec<LeaseSpec>) -> Response {
    Client::connect(socket).call(&Request::Acquire {
        owner: owner.clone(),
        leases,
        action: FailureAction::Default,
        restrict: false,
    })
}

/// `status` on the admin socket, answered within `limit` (None when it was not).
fn status_within(admin: &Path, limit: Duration) -> Option<Duration> {
    let (tx, rx) = mpsc::channel();
    let admin = admin.to_path_buf();
    let t0 = Instant::now();
    std::thread::spawn(move || {
        let r = Client::connect(&admin).call(&Request::Status);
        let _ = tx.send(r);
    });
    match rx.recv_timeout(limit) {
        Ok(Response::Status(_)) => Some(t0.elapsed()),
        Ok(other) => panic!("status: {other:?}"),
        Err(_) => None,
    }
}

/// Read syscalls the process `pid` made so far (all its threads), from /proc/<pid>/io.
fn read_calls(pid: u32) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/io")).expect("read /proc/<pid>/io");
    text.lines()
        .find_map(|l| l.strip_prefix("syscr: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("syscr in /proc/<pid>/io")
}

#[test]
fn a_refusal_reads_a_bounded_number_of_planted_side_files() {
    let d = TestDaemon::verbose("");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("web1.img");
    fs::write(&image, vec![0u8; 4096]).unwrap();
    let _held = hold_byte0(&image);
    // 300 side files of "other hosts", each held (so each looks live) and none a record.
    let records = dir.path().join(".lockwarden");
    fs::create_dir(&records).unwrap();
    let planted: Vec<File> = (0..300)
        .map(|i| {
            let p = records.join(format!("web1.img@evil{i:03}.json"));
            fs::write(&p, format!("{{\"garbage\": {i}")).unwrap();
            hold_byte0(&p)
        })
        .collect();
    let v = vm("vm-refused");
    let before = read_calls(d.pid());
    let t0 = Instant::now();
    let e = err(
        acquire(&d.socket, &v.owner, vec![excl(&image)]),
        ErrorKind::Busy,
    );
    let took = t0.elapsed();
    let reads = read_calls(d.pid()) - before;
    println!(
        "refused in {took:?} with {reads} read calls by the daemon; message: {}",
        e.message
    );
    // At most 16 side files are read (a couple of reads each); all 300 were read before.
    assert!(
        reads < 150,
        "the daemon made {reads} read calls for one refusal: side files are not bounded"
    );
    assert!(
        e.message.contains("284 more holder records"),
        "the refusal does not say how many records were left unread: {}",
        e.message
    );
    // The daemon keeps serving.
    let s = status_within(&d.admin, BOUND).expect("status answered");
    println!("status answered in {s:?}");
    drop(planted);
}

// ---------------------------------------------------------------------------------------------
// A hung mount (FUSE test file system)

/// The test file system mounted on `mnt` (backing directory `backing`, control and event files
/// in `scratch`); un-hung, killed and unmounted on drop.
fn mount_testfs(backing: &Path, mnt: &Path, scratch: &Path) -> common::fuse::Testfs {
    common::fuse::prerequisites("tests/hostile_mounts.rs");
    let ctl = scratch.join("control");
    let events = scratch.join("events");
    common::fuse::Testfs::mount(backing, mnt, &ctl, &events, BOUND)
}

/// Wait (bounded) until a thread of process `pid` is blocked in a file system call on the hung
/// mount: the request under test has reached storage (whichever thread the daemon runs it on).
fn wait_stuck_in_storage(pid: u32) {
    let calls = [
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_getdents64,
    ];
    let stuck = || {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.flatten().any(|t| {
            let nr = fs::read_to_string(t.path().join("syscall")).unwrap_or_default();
            nr.split(' ')
                .next()
                .and_then(|n| n.trim().parse::<libc::c_long>().ok())
                .is_some_and(|n| calls.contains(&n))
        })
    };
    // Seen twice in a row, 50 ms apart: blocked there, not passing through.
    wait_until(
        &format!("a thread of lockwardend (pid {pid}) is stuck on the hung mount"),
        BOUND,
        || {
            stuck() && {
                std::thread::sleep(Duration::from_millis(50));
                stuck()
            }
        },
    );
}

/// With a request stuck on the hung mount: the admin socket answers and a disk on local
/// storage can still be locked.
fn daemon_keeps_serving(d: &TestDaemon, scratch: &Path, stuck: &mpsc::Receiver<Response>) {
    wait_stuck_in_storage(d.pid());
    let s = status_within(&d.admin, Duration::from_secs(10));
    assert!(
        stuck.try_recv().is_err(),
        "the request on the hung mount was answered before the check ran"
    );
    let s = s.expect("status was not answered within 10 s: the event loop is blocked");
    println!("status answered in {s:?} while a request waits on the hung mount");
    let local = scratch.join("local.img");
    fs::write(&local, vec![0u8; 4096]).unwrap();
    let other = vm("vm-local");
    let (tx, rx) = mpsc::channel();
    let (sock, owner, spec) = (d.socket.clone(), other.owner.clone(), excl(&local));
    std::thread::spawn(move || {
        let _ = tx.send(acquire(&sock, &owner, vec![spec]));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a local acquire was not answered within 10 s: the event loop is blocked");
    ok(r);
}

#[test]
fn records_on_a_hung_mount_do_not_block_the_daemon() {
    let d = TestDaemon::verbose("storage_timeout_ms = 3000\n");
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("images");
    let backing = scratch.path().join("backing");
    fs::create_dir(&dir).unwrap();
    fs::create_dir(&backing).unwrap();
    let image = dir.join("web1.img");
    fs::write(&image, vec![0u8; 4096]).unwrap();
    // The image is on local storage; its record directory is a (hung) mount of its own.
    fs::write(backing.join("web1.img@node-b.json"), b"{}").unwrap();
    fs::create_dir(dir.join(".lockwarden")).unwrap();
    let fuse = mount_testfs(&backing, &dir.join(".lockwarden"), scratch.path());
    let _held = hold_byte0(&image);
    fuse.set("hang 1\n");
    let v = vm("vm-refused");
    let (rx, t0) = acquire_in_background(&d.socket, &v.owner, &image);
    daemon_keeps_serving(&d, scratch.path(), &rx);
    fuse.set("");
    let r = rx
        .recv_timeout(BOUND)
        .expect("the refused acquire is answered");
    println!("refused acquire answered after {:?}: {r:?}", t0.elapsed());
    assert!(
        matches!(&r, Response::Error(e) if matches!(e.kind, ErrorKind::Busy | ErrorKind::Timeout)),
        "{r:?}"
    );
}

#[test]
fn a_symlink_into_a_hung_mount_does_not_freeze_the_daemon() {
    let d = TestDaemon::verbose("storage_timeout_ms = 3000\n");
    let scratch = tempfile::tempdir().unwrap();
    let backing = scratch.path().join("backing");
    let mnt = scratch.path().join("mnt");
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    fs::write(backing.join("web1.img"), vec![0u8; 4096]).unwrap();
    let fuse = mount_testfs(&backing, &mnt, scratch.path());
    // A local directory whose text names the local mount, leading into the FUSE mount.
    let images = scratch.path().join("images");
    std::os::unix::fs::symlink(&mnt, &images).unwrap();
    let image = images.join("web1.img");
    fuse.set("hang 1\n");
    let v = vm("vm-on-hung-storage");
    let (rx, t0) = acquire_in_background(&d.socket, &v.owner, &image);
    daemon_keeps_serving(&d, scratch.path(), &rx);
    let r = rx.recv_timeout(BOUND).expect("the hung acquire times out");
    println!(
        "acquire through the symlink answered after {:?}: {r:?}",
        t0.elapsed()
    );
    let e = err(r, ErrorKind::Timeout);
    assert!(e.message.contains("not answering"), "{}", e.message);
    fuse.set("");
}
