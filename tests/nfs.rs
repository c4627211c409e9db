//! NFS failure modes, reproduced with the FUSE test file system (tests/fusefs/testfs.rs, built
//! as the example `testfs`): hung mounts stay isolated, 16 disks lock concurrently, lost locks
//! are detected and acted on (docs/storage.md). Needs root and /dev/fuse; fails loudly without.

mod common;

use common::wait::{poll, wait_until, wait_until_or};

use common::daemon::TestDaemon;
use common::fuse::Fs;
use common::locks::hold_byte0;
use common::proto::{Proc, byte0, sleeper};
use lockwarden::protocol::{
    self, ErrorKind, FailureAction, LeaseMode, LeaseSpec, LockTarget, Owner, Request, ResourceKind,
    Response,
};
use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn prerequisites() {
    common::fuse::prerequisites("tests/nfs.rs");
}

/// One mounted test file system; unmounted (and un-hung) on drop.
fn mount() -> Fs {
    Fs::mount("lw-nfs", Duration::from_secs(20))
}

fn owner(name: &str, q: &Proc) -> Owner {
    Owner {
        uuid: format!("00000000-0000-4000-8000-{:012x}", q.pid()),
        name: name.into(),
        id: 1,
        pid: q.pid(),
    }
}

fn disk(p: &Path) -> LeaseSpec {
    let path = p.to_string_lossy().into_owned();
    LeaseSpec {
        name: path.clone(),
        kind: ResourceKind::Disk,
        mode: LeaseMode::Exclusive,
        target: LockTarget::File { path },
    }
}

fn call(sock: &Path, req: &Request) -> Response {
    let mut s = UnixStream::connect(sock).expect("connect to lockwardend");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    protocol::write_message(&mut s, req).expect("send");
    protocol::read_message(&mut s).expect("answer")
}

fn acquire(d: &TestDaemon, o: &Owner, disks: &[PathBuf], action: FailureAction) -> Response {
    call(
        &d.socket,
        &Request::Acquire {
            owner: o.clone(),
            leases: disks.iter().map(|p| disk(p)).collect(),
            action,
            restrict: false,
        },
    )
}

fn release(d: &TestDaemon, o: &Owner, disks: &[PathBuf]) {
    let r = call(
        &d.socket,
        &Request::Release {
            owner: o.clone(),
            leases: disks.iter().map(|p| disk(p)).collect(),
        },
    );
    assert!(matches!(r, Response::Ok { .. }), "release: {r:?}");
}

/// The leases the daemon reports lost (`Request::Lost`).
fn lost(d: &TestDaemon) -> Vec<lockwarden::protocol::LeaseInfo> {
    match call(&d.admin, &Request::Lost) {
        Response::Ok { leases } => leases,
        other => panic!("lost: {other:?}"),
    }
}

/// Is byte 0 of the backing file locked by anybody (OFD GETLK from this process)?
fn locked(backing_file: &Path) -> bool {
    byte0(backing_file) != libc::F_UNLCK
}

fn leases(d: &TestDaemon) -> Vec<String> {
    match call(&d.admin, &Request::List) {
        Response::Ok { leases } => leases.into_iter().map(|l| l.name).collect(),
        other => panic!("list: {other:?}"),
    }
}

/// `r`, answered after `waited`, is the Timeout refusal of `what` on the hung mount `mnt`: it
/// says the storage is not answering, names the disk and the mount, and came no earlier than
/// storage_timeout_ms (2 s).
fn assert_storage_timeout(what: &str, r: Response, waited: Duration, disk: &Path, mnt: &Path) {
    match r {
        Response::Error(e) => {
            assert_eq!(e.kind, ErrorKind::Timeout, "{what}: {e:?}");
            assert!(e.message.contains("not answering"), "{}", e.message);
            assert!(
                e.message.contains(&*disk.to_string_lossy()),
                "{}",
                e.message
            );
            assert!(
                e.message.contains(&*mnt.to_string_lossy()),
                "names the mount: {}",
                e.message
            );
        }
        other => panic!("{what}: expected Timeout, got {other:?}"),
    }
    assert!(
        waited >= Duration::from_millis(1900),
        "{what}: answered too early: {waited:?}"
    );
}

#[test]
fn hung_mount_stalls_only_its_own_disks() {
    prerequisites();
    let d = TestDaemon::verbose("storage_timeout_ms = 2000\nlease_check_interval_ms = 0\n");
    let (good, bad) = (mount(), mount());
    let a = good.image("a.img");
    let b = bad.image("b.img");
    let (qa, qb) = (sleeper(), sleeper());
    let (oa, ob) = (owner("vm-good", &qa), owner("vm-hung", &qb));
    bad.set("hang 1\n");
    let sock = d.socket.clone();
    let ob2 = ob.clone();
    let b2 = b.clone();
    let t0 = Instant::now();
    let hung = std::thread::spawn(move || {
        let r = call(
            &sock,
            &Request::Acquire {
                owner: ob2,
                leases: vec![disk(&b2)],
                action: FailureAction::Default,
                restrict: false,
            },
        );
        (r, t0.elapsed())
    });
    std::thread::sleep(Duration::from_millis(200));
    // Meanwhile: the other mount, Status and Storage are served at once.
    let t1 = Instant::now();
    let r = acquire(&d, &oa, std::slice::from_ref(&a), FailureAction::Default);
    let good_latency = t1.elapsed();
    assert!(matches!(r, Response::Ok { .. }), "healthy mount: {r:?}");
    assert!(
        !hung.is_finished(),
        "the hung acquire was answered before the healthy one ({good_latency:?})"
    );
    let st = call(&d.admin, &Request::Status);
    assert!(matches!(st, Response::Status(_)), "{st:?}");
    assert!(lost(&d).is_empty());
    assert!(!hung.is_finished(), "status came after the hung answer");
    let (r, waited) = hung.join().unwrap();
    eprintln!(
        "healthy-mount acquire while another mount hangs: {good_latency:?}; hung one answered after {waited:?}"
    );
    assert_storage_timeout("hung mount", r, waited, &b, &bad.mnt);
    // Storage comes back: the late lock is dropped again, nothing is left behind.
    bad.set("");
    wait_until(
        "b.img is unlocked after the storage came back",
        Duration::from_secs(10),
        || !locked(&bad.backing.join("b.img")),
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(!locked(&bad.backing.join("b.img")));
    let held = leases(&d);
    assert_eq!(
        held,
        vec![a.to_string_lossy().into_owned()],
        "only the healthy disk is held"
    );
    // And the disk can be taken now.
    let r = acquire(&d, &ob, std::slice::from_ref(&b), FailureAction::Default);
    assert!(matches!(r, Response::Ok { .. }), "after recovery: {r:?}");
    assert!(locked(&good.backing.join("a.img")));
}

/// A release and a VM exit whose disks live on a hung mount are disposed of on that mount's
/// storage threads: the event loop keeps answering Status and acquires on other mounts, the
/// release is answered with a Timeout naming the disk and the mount, and the locks go once the
/// storage answers.
#[test]
fn release_and_vm_exit_on_a_hung_mount_do_not_block_others() {
    prerequisites();
    let d = TestDaemon::verbose("storage_timeout_ms = 2000\nlease_check_interval_ms = 0\n");
    let (good, bad) = (mount(), mount());
    let a = good.image("a.img");
    let b = bad.image("b.img");
    let c = bad.image("c.img");
    let (qa, qb, qc) = (sleeper(), sleeper(), sleeper());
    let (oa, ob, oc) = (
        owner("vm-good", &qa),
        owner("vm-release", &qb),
        owner("vm-exit", &qc),
    );
    for (o, p) in [(&ob, &b), (&oc, &c)] {
        let r = acquire(&d, o, std::slice::from_ref(p), FailureAction::Default);
        assert!(matches!(r, Response::Ok { .. }), "{r:?}");
    }
    bad.set("hang 1\n");
    // A release of b and the exit of c's VM, both stuck on the hung mount.
    let sock = d.socket.clone();
    let (ob2, b2) = (ob.clone(), b.clone());
    let t0 = Instant::now();
    let releasing = std::thread::spawn(move || {
        let r = call(
            &sock,
            &Request::Release {
                owner: ob2,
                leases: vec![disk(&b2)],
            },
        );
        (r, t0.elapsed())
    });
    drop(qc);
    std::thread::sleep(Duration::from_millis(300));
    // Meanwhile everything else is answered.
    let t1 = Instant::now();
    let st = call(&d.admin, &Request::Status);
    assert!(matches!(st, Response::Status(_)), "{st:?}");
    let r = acquire(&d, &oa, std::slice::from_ref(&a), FailureAction::Default);
    let served = t1.elapsed();
    assert!(matches!(r, Response::Ok { .. }), "healthy mount: {r:?}");
    assert!(
        !releasing.is_finished(),
        "the release on the hung mount was answered before the others ({served:?})"
    );
    assert!(
        served < Duration::from_millis(1500),
        "status + healthy acquire took {served:?} while a release hung"
    );
    let held = leases(&d);
    assert_eq!(
        held,
        vec![a.to_string_lossy().into_owned()],
        "released and exited leases are out of the table at once"
    );
    let (r, waited) = releasing.join().unwrap();
    eprintln!(
        "status + healthy-mount acquire while a release and a VM exit hang: {served:?}; the \
         release was answered after {waited:?}"
    );
    assert_storage_timeout("release on a hung mount", r, waited, &b, &bad.mnt);
    assert!(
        locked(&bad.backing.join("b.img")),
        "still locked while hung"
    );
    // Storage comes back: both locks go, and the disks can be taken again.
    bad.set("");
    wait_until(
        "b.img and c.img are unlocked after the storage came back",
        Duration::from_secs(10),
        || {
            ["b.img", "c.img"]
                .iter()
                .all(|n| !locked(&bad.backing.join(n)))
        },
    );
    let r = acquire(&d, &oa, &[b.clone(), c.clone()], FailureAction::Default);
    assert!(matches!(r, Response::Ok { .. }), "after recovery: {r:?}");
    release(&d, &oa, &[a.clone(), b.clone(), c.clone()]);
    assert!(leases(&d).is_empty());
}

/// The largest number of lock calls in flight at one instant.
fn max_overlap(intervals: &[(u128, u128)]) -> usize {
    let mut ev: Vec<(u128, i32)> = Vec::new();
    for (s, e) in intervals {
        ev.push((*s, 1));
        ev.push((*e, -1));
    }
    ev.sort();
    let (mut cur, mut best) = (0i32, 0i32);
    for (_, d) in ev {
        cur += d;
        best = best.max(cur);
    }
    best as usize
}

#[test]
fn sixteen_disks_on_slow_storage_lock_concurrently() {
    prerequisites();
    let d = TestDaemon::verbose("lease_check_interval_ms = 0\n");
    let f = mount();
    let disks: Vec<PathBuf> = (0..16).map(|i| f.image(&format!("d{i:02}.img"))).collect();
    f.set("delay_ms 2\n");
    let q = sleeper();
    let o = owner("vm16", &q);
    let rounds = 5;
    let mut one = Duration::ZERO;
    let mut all = Duration::ZERO;
    for _ in 0..rounds {
        let t = Instant::now();
        let r = acquire(&d, &o, &disks[..1], FailureAction::Default);
        one += t.elapsed();
        assert!(matches!(r, Response::Ok { .. }), "{r:?}");
        release(&d, &o, &disks[..1]);
    }
    fs::write(&f.tfs.events, "").unwrap();
    for round in 0..rounds {
        let t = Instant::now();
        let r = acquire(&d, &o, &disks, FailureAction::Default);
        all += t.elapsed();
        assert!(matches!(r, Response::Ok { .. }), "{r:?}");
        if round + 1 < rounds {
            release(&d, &o, &disks);
        }
    }
    eprintln!(
        "2 ms-delayed mount: 1-disk acquire {:?}, 16-disk acquire {:?} (mean of {rounds})",
        one / rounds,
        all / rounds
    );
    // Overlap proof from the file system's own record of the last round's lock calls.
    let events = f.events();
    let mut per_round: Vec<Vec<(u128, u128)>> = vec![Vec::new()];
    for line in events.lines() {
        let w: Vec<&str> = line.split(' ').collect();
        if w.len() == 6 && w[0] == "setlk" && w[2] == libc::F_WRLCK.to_string() && w[5] == "0" {
            let cur = per_round.last_mut().unwrap();
            cur.push((w[3].parse().unwrap(), w[4].parse().unwrap()));
            if cur.len() == 16 {
                per_round.push(Vec::new());
            }
        }
    }
    let best = per_round.iter().map(|r| max_overlap(r)).max().unwrap_or(0);
    eprintln!("most lock calls in flight at once: {best} of 16");
    assert_eq!(
        best, 16,
        "the 16 locks were not all in flight together: {events}"
    );
    for p in &disks {
        let name = p.file_name().unwrap();
        assert!(locked(&f.backing.join(name)), "{p:?} not locked");
    }
}

#[test]
fn all_or_nothing_across_mounts() {
    prerequisites();
    let d = TestDaemon::verbose("lease_check_interval_ms = 0\n");
    let (m1, m2) = (mount(), mount());
    let a = m1.image("a.img");
    let b = m2.image("b.img");
    // Somebody else (another host, say) holds b.
    let _other = hold_byte0(&b);
    let q = sleeper();
    let r = acquire(
        &d,
        &owner("vm-aon", &q),
        &[a.clone(), b.clone()],
        FailureAction::Default,
    );
    match r {
        Response::Error(e) => assert_eq!(e.kind, ErrorKind::Busy, "{e:?}"),
        other => panic!("expected busy: {other:?}"),
    }
    assert!(
        !locked(&m1.backing.join("a.img")),
        "a.img stayed locked after a refused acquire"
    );
    assert!(leases(&d).is_empty());
}

fn lost_case(action: FailureAction, label: &str) {
    let interval = 500u64;
    let d = TestDaemon::verbose(&format!("lease_check_interval_ms = {interval}\n"));
    let f = mount();
    let img = f.image(&format!("{label}.img"));
    let q = sleeper();
    let o = owner(label, &q);
    let r = acquire(&d, &o, std::slice::from_ref(&img), action);
    assert!(matches!(r, Response::Ok { .. }), "{r:?}");
    // A couple of healthy checks find nothing.
    std::thread::sleep(Duration::from_millis(interval * 2 + 100));
    assert!(lost(&d).is_empty(), "healthy checks found a lost lock");
    f.set(&format!("lost {label}.img\n"));
    let bound = Duration::from_millis(interval * 2 + 1000);
    let detected = wait_until("the lost lock is detected", bound, || !lost(&d).is_empty());
    eprintln!("{label}: lost lock detected after {detected:?} (interval {interval} ms)");
    let info = lost(&d);
    let l = info.last().unwrap();
    assert_eq!(l.name, img.to_string_lossy());
    assert_eq!(l.owners[0].name, label);
    let log = fs::read_to_string(&d.log).unwrap();
    assert!(log.contains("is LOST") && log.contains(label), "{log}");
    let mut q = q;
    match action {
        FailureAction::Pause => {
            wait_until_or(
                "the VM is stopped",
                Duration::from_secs(5),
                || format!("state {:?}", q.state()),
                || q.state() == Some('T'),
            );
        }
        FailureAction::Ignore => {
            std::thread::sleep(Duration::from_millis(interval * 2));
            assert_eq!(
                q.0.try_wait().unwrap(),
                None,
                "ignore must leave the VM running"
            );
            assert_ne!(q.state(), Some('T'));
            assert_eq!(lost(&d).len(), 1, "counted once");
        }
        _ => {
            let (st, _) = poll(Duration::from_secs(5), || q.0.try_wait().unwrap())
                .unwrap_or_else(|| panic!("VM still runs"));
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(st.signal(), Some(libc::SIGKILL), "{st:?}");
            // Its lease goes with it.
            wait_until(
                "the lease goes after poweroff",
                Duration::from_secs(5),
                || leases(&d).is_empty(),
            );
        }
    }
}

#[test]
fn lost_lock_poweroff_kills_the_vm() {
    prerequisites();
    lost_case(FailureAction::Poweroff, "lost-poweroff");
}

#[test]
fn lost_lock_default_kills_the_vm() {
    prerequisites();
    lost_case(FailureAction::Default, "lost-default");
}

#[test]
fn lost_lock_pause_stops_the_vm() {
    prerequisites();
    lost_case(FailureAction::Pause, "lost-pause");
}

#[test]
fn lost_lock_ignore_only_logs() {
    prerequisites();
    lost_case(FailureAction::Ignore, "lost-ignore");
}
