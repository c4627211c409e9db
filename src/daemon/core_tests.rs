//! Unit tests of the daemon core (acquire, release, owner exit, handle close, group answers)
//! against a recording keeper link (keeper/recording.rs): no daemon process, no socket, but
//! real files in a temporary directory, real OFD locks and real owner processes (`sleep`,
//! watched by pidfd). The temporary directory is host-local, so storage work runs inline and
//! `route::inline_results` routes it, as the event loop does (docs/architecture.md).

use super::dispatch::{self, Session};
use super::keeper::Keeper;
use super::keeper::recording::{Held, Told};
use super::lease::LeaseKey;
use super::ledger::{Finished, JobFor, Pending, Then};
use super::owner::ConnId;
use super::state::State;
use super::{acquire, release, route};
use crate::protocol::{
    ErrorKind, ErrorReply, FailureAction, LeaseMode, LeaseSpec, LockTarget, Owner, Request,
    ResourceKind, Response,
};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A VM for the tables: a real process (`sleep`) so that its pidfd can be opened and watched.
struct Vm {
    child: Child,
    owner: Owner,
}

impl Vm {
    fn start(name: &str) -> Vm {
        let child = Command::new("sleep")
            .arg("1000")
            .spawn()
            .expect("cannot start `sleep` (coreutils) as a stand-in VM process");
        let pid = child.id();
        Vm {
            child,
            owner: Owner {
                uuid: format!("00000000-0000-4000-8000-{pid:012}"),
                name: name.into(),
                id: 1,
                pid,
            },
        }
    }

    fn pid(&self) -> u32 {
        self.owner.pid
    }

    /// Kill the process and reap it.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A temporary directory of disk images.
struct Disks {
    dir: tempfile::TempDir,
}

impl Disks {
    fn new() -> Disks {
        let dir = tempfile::Builder::new()
            .prefix("lockwarden-core-")
            .tempdir_in(std::env::temp_dir())
            .expect("a temporary directory");
        Disks { dir }
    }

    /// A new image `name` (a few bytes, never written by the daemon).
    fn image(&self, name: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, b"image").unwrap();
        p.to_str().unwrap().to_string()
    }
}

/// A writable disk (an exclusive lease on the image itself).
fn excl(path: &str) -> LeaseSpec {
    spec(path, LeaseMode::Exclusive)
}

fn spec(path: &str, mode: LeaseMode) -> LeaseSpec {
    LeaseSpec {
        name: path.to_string(),
        kind: ResourceKind::Disk,
        mode,
        target: LockTarget::File {
            path: path.to_string(),
        },
    }
}

fn key_of(path: &str) -> LeaseKey {
    let m = std::fs::metadata(path).unwrap();
    LeaseKey {
        dev: m.dev(),
        ino: m.ino(),
    }
}

/// What a separate open file description (another host, another lock manager) gets when it
/// asks for `l_type` on byte 0 of `path`: Ok (then dropped again) or the errno.
fn try_lock_from_outside(path: &str, l_type: libc::c_int) -> Result<(), Errno> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let fl = |t: libc::c_int| libc::flock {
        l_type: t as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    };
    fcntl(f.as_fd(), FcntlArg::F_OFD_SETLK(&fl(l_type)))?;
    fcntl(f.as_fd(), FcntlArg::F_OFD_SETLK(&fl(libc::F_UNLCK))).unwrap();
    Ok(())
}

fn assert_locked(path: &str) {
    assert_eq!(
        try_lock_from_outside(path, libc::F_WRLCK),
        Err(Errno::EAGAIN),
        "{path} should be locked by the daemon"
    );
}

/// The lock on `path` is gone. Retried for a moment: a descriptor closed without an explicit
/// unlock keeps its lock while a sibling test's `fork` (spawning its `sleep`) holds a copy
/// until that child's `exec` closes it.
fn assert_unlocked(path: &str) {
    let until = Instant::now() + Duration::from_secs(2);
    loop {
        match try_lock_from_outside(path, libc::F_WRLCK) {
            Ok(()) => return,
            Err(e) if Instant::now() >= until => {
                panic!("{path} should not be locked any more: {}", e.desc())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn state() -> State {
    let mut s = State::for_test(Keeper::recording());
    let probe = std::env::temp_dir().join("lockwarden-probe.img");
    assert!(
        s.mounts.place(&probe.to_string_lossy()).1,
        "{:?} is not on a host-local file system (ext4, xfs, tmpfs...): these tests need \
         storage work to run inline; set TMPDIR to a local directory",
        std::env::temp_dir()
    );
    s
}

/// What the keeper link was told so far.
fn told(state: &State) -> Vec<Told> {
    state.keeper.recorded().unwrap().told.clone()
}

/// Route storage results (inline ones, and those of worker threads) until no request waits
/// and no background job is in flight, as the event loop would.
fn drive(state: &mut State) {
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        route::inline_results(state);
        if state.waiting() == 0 && state.background_jobs() == 0 {
            return;
        }
        assert!(
            Instant::now() < until,
            "storage work did not finish within 3 s ({} request(s) waiting, {} job(s))",
            state.waiting(),
            state.background_jobs()
        );
        let mut p = libc::pollfd {
            fd: state.storage.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the storage wake-up pipe, which `state` keeps open.
        unsafe { libc::poll(&mut p, 1, 50) };
        route::storage_results(state);
    }
}

/// Start an acquire (not restricted, default failure action) without routing its storage work.
fn start(state: &mut State, conn: ConnId, vm: &Vm, specs: &[LeaseSpec]) {
    acquire::start(state, conn, &vm.owner, specs, FailureAction::Default, false)
        .unwrap_or_else(|e| panic!("acquire refused at once: {}", e.message()));
}

/// Start an acquire, route its storage work and return the one answer it got.
fn acquire(state: &mut State, conn: ConnId, vm: &Vm, specs: &[LeaseSpec]) -> Finished {
    start(state, conn, vm, specs);
    drive(state);
    one_answer(state, conn)
}

fn one_answer(state: &mut State, conn: ConnId) -> Finished {
    let mut answers = state.ledger.take_finished();
    assert_eq!(answers.len(), 1, "one answer expected: {answers:?}");
    let a = answers.remove(0);
    assert_eq!(a.conn, conn);
    a
}

fn ok(f: &Finished) {
    assert!(
        matches!(&f.response, Response::Ok { leases } if leases.is_empty()),
        "expected Ok, got {:?}",
        f.response
    );
}

fn error(f: Finished) -> ErrorReply {
    match f.response {
        Response::Error(e) => e,
        r => panic!("expected an error, got {r:?}"),
    }
}

/// Release `specs` for `vm`, routing the storage work; the answer, at once or later.
fn release(state: &mut State, conn: ConnId, vm: &Vm, specs: &[LeaseSpec]) -> Response {
    let now = release::start(state, conn, &vm.owner, specs)
        .unwrap_or_else(|e| panic!("release refused: {}", e.message()));
    drive(state);
    match now {
        Some(r) => {
            assert!(state.ledger.take_finished().is_empty());
            r
        }
        None => one_answer(state, conn).response,
    }
}

/// The keys of every hand-over the keeper took, in order.
fn holds(state: &State) -> Vec<Vec<Held>> {
    told(state)
        .into_iter()
        .filter_map(|t| match t {
            Told::Hold(h) => Some(h),
            _ => None,
        })
        .collect()
}

fn held_by(state: &State, key: &LeaseKey) -> Vec<u32> {
    let mut pids: Vec<u32> = state
        .leases
        .get(key)
        .map(|l| l.owners.keys().copied().collect())
        .unwrap_or_default();
    pids.sort_unstable();
    pids
}

#[test]
fn exclusive_acquire_is_answered_only_after_the_keeper_holds_the_lease() {
    let disks = Disks::new();
    let d1 = disks.image("d1.img");
    let vm = Vm::start("vm-a");
    let mut s = state();
    acquire::start(
        &mut s,
        1,
        &vm.owner,
        &[excl(&d1)],
        FailureAction::Default,
        true,
    )
    .unwrap();
    // Nothing answered and nothing handed over before the storage result is routed.
    assert!(!s.ledger.has_finished());
    assert!(told(&s).is_empty(), "{:?}", told(&s));
    drive(&mut s);
    let answer = one_answer(&mut s, 1);
    ok(&answer);
    assert!(
        answer.restrict,
        "an acquire with restrict restricts its connection"
    );
    let key = key_of(&d1);
    assert_eq!(
        told(&s),
        vec![
            Told::Ensure { fresh: false },
            Told::Hold(vec![Held {
                key,
                pids: vec![vm.pid()],
                fds: 1,
                fd_key: Some(key),
            }])
        ],
        "the keeper gets the lease's own descriptor and its owner's pid"
    );
    assert!(s.keeper.recorded().unwrap().held.contains(&key));
    assert_eq!(held_by(&s, &key), vec![vm.pid()]);
    assert!(s.owners.get(vm.pid()).unwrap().leases.contains(&key));
    let infos = s.infos_of(vm.pid());
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].lock_path, d1);
    assert_eq!(infos[0].mode, LeaseMode::Exclusive);
    assert_locked(&d1);
    // Asking again is idempotent: Ok, still one lease, no second descriptor.
    ok(&acquire(&mut s, 2, &vm, &[excl(&d1)]));
    assert_eq!(s.leases.len(), 1);
}

#[test]
fn a_second_vm_is_refused_busy_and_told_who_holds_the_disk() {
    let disks = Disks::new();
    let d1 = disks.image("d1.img");
    let (a, b) = (Vm::start("vm-a"), Vm::start("vm-b"));
    let mut s = state();
    ok(&acquire(&mut s, 1, &a, &[excl(&d1)]));
    let before = told(&s);
    let e = error(acquire(&mut s, 2, &b, &[excl(&d1)]));
    assert_eq!(e.kind, ErrorKind::Busy, "{}", e.message);
    assert_eq!(e.resource.as_deref(), Some(d1.as_str()));
    assert!(e.message.contains("'vm-a'"), "{}", e.message);
    assert!(e.message.contains("test-host"), "{}", e.message);
    let h = e.holder.expect("the refusal names the holder");
    assert_eq!(h.vm_name.as_deref(), Some("vm-a"));
    assert_eq!(h.vm_uuid.as_deref(), Some(a.owner.uuid.as_str()));
    assert_eq!(h.pid, i32::try_from(a.pid()).ok());
    // Nothing changed: the holder keeps its lease, the keeper was told nothing.
    assert_eq!(told(&s), before);
    assert_eq!(held_by(&s, &key_of(&d1)), vec![a.pid()]);
    assert!(s.infos_of(b.pid()).is_empty());
    assert_locked(&d1);
    // A shared request for an exclusively held disk is refused too.
    let e = error(acquire(&mut s, 3, &b, &[spec(&d1, LeaseMode::Shared)]));
    assert_eq!(e.kind, ErrorKind::Busy, "{}", e.message);
}

#[test]
fn all_or_nothing_a_busy_disk_leaves_the_free_one_unlocked() {
    let disks = Disks::new();
    let (free, busy) = (disks.image("free.img"), disks.image("busy.img"));
    let (a, b) = (Vm::start("vm-a"), Vm::start("vm-b"));
    let mut s = state();
    ok(&acquire(&mut s, 1, &a, &[excl(&busy)]));
    let e = error(acquire(&mut s, 2, &b, &[excl(&free), excl(&busy)]));
    assert_eq!(e.kind, ErrorKind::Busy, "{}", e.message);
    assert_eq!(e.resource.as_deref(), Some(busy.as_str()));
    // Refused means nothing is locked (the answer waited for the roll-back).
    assert_unlocked(&free);
    assert!(s.leases.get(&key_of(&free)).is_none());
    assert!(s.infos_of(b.pid()).is_empty());
    assert!(
        holds(&s).iter().flatten().all(|h| h.key != key_of(&free)),
        "the free disk was never handed to the keeper: {:?}",
        told(&s)
    );
    assert!(!s.keeper.recorded().unwrap().held.contains(&key_of(&free)));
    // The first VM keeps its disk.
    assert_eq!(held_by(&s, &key_of(&busy)), vec![a.pid()]);
    assert_locked(&busy);
}

#[test]
fn all_or_nothing_a_disk_locked_outside_the_daemon_leaves_the_free_one_unlocked() {
    let disks = Disks::new();
    let (free, busy) = (disks.image("free.img"), disks.image("busy.img"));
    let vm = Vm::start("vm-a");
    let mut s = state();
    // Another host (or lockd) holds byte 0 of `busy` on its own open file description.
    let outside = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&busy)
        .unwrap();
    super::lock::try_lock(outside.as_fd(), LeaseMode::Exclusive).unwrap();
    // The busy disk's holder is described on a worker thread (never on the event loop).
    let e = error(acquire(&mut s, 1, &vm, &[excl(&free), excl(&busy)]));
    assert_eq!(e.kind, ErrorKind::Busy, "{}", e.message);
    assert_eq!(e.resource.as_deref(), Some(busy.as_str()));
    assert_unlocked(&free);
    assert_eq!(s.leases.len(), 0);
    assert!(holds(&s).is_empty(), "{:?}", told(&s));
    drop(outside);
    // (Its lock may outlive the close for a moment: see `assert_unlocked`.)
    assert_unlocked(&busy);
    // Once the other holder is gone, the same request succeeds.
    ok(&acquire(&mut s, 2, &vm, &[excl(&free), excl(&busy)]));
    assert_eq!(s.leases.len(), 2);
    assert_locked(&free);
    assert_locked(&busy);
}

#[test]
fn a_shared_lease_is_kept_until_its_last_owner_releases_it() {
    let disks = Disks::new();
    let d = disks.image("shared.img");
    let (a, b) = (Vm::start("vm-a"), Vm::start("vm-b"));
    let mut s = state();
    let key = key_of(&d);
    ok(&acquire(&mut s, 1, &a, &[spec(&d, LeaseMode::Shared)]));
    ok(&acquire(&mut s, 2, &b, &[spec(&d, LeaseMode::Shared)]));
    assert_eq!(s.leases.len(), 1, "two owners share one lease");
    let mut both = vec![a.pid(), b.pid()];
    both.sort_unstable();
    assert_eq!(held_by(&s, &key), both);
    // The keeper was told the second owner too (it watches both pids).
    let last = holds(&s).last().cloned().unwrap();
    let mut pids = last[0].pids.clone();
    pids.sort_unstable();
    assert_eq!((last[0].key, pids), (key, both.clone()));
    // Readers may join, a writer may not.
    assert_eq!(try_lock_from_outside(&d, libc::F_RDLCK), Ok(()));
    assert_locked(&d);

    // One owner leaves: the lease stays, handed over again with the remaining owner.
    ok_response(release(&mut s, 3, &a, &[spec(&d, LeaseMode::Shared)]));
    assert_eq!(held_by(&s, &key), vec![b.pid()]);
    assert_eq!(holds(&s).last().unwrap()[0].pids, vec![b.pid()]);
    assert!(s.keeper.recorded().unwrap().held.contains(&key));
    assert!(!told(&s).iter().any(|t| matches!(t, Told::Release(_))));
    assert_locked(&d);

    // The last owner leaves: the keeper lets go, the lease and the lock are gone.
    ok_response(release(&mut s, 4, &b, &[spec(&d, LeaseMode::Shared)]));
    assert_eq!(told(&s).last(), Some(&Told::Release(vec![key])));
    assert!(s.keeper.recorded().unwrap().held.is_empty());
    assert!(s.leases.get(&key).is_none());
    assert_unlocked(&d);
}

fn ok_response(r: Response) {
    assert!(
        matches!(&r, Response::Ok { leases } if leases.is_empty()),
        "expected Ok, got {r:?}"
    );
}

#[test]
fn releasing_what_is_not_held_succeeds_and_changes_nothing() {
    let disks = Disks::new();
    let (d1, d2) = (disks.image("d1.img"), disks.image("d2.img"));
    let (a, stranger) = (Vm::start("vm-a"), Vm::start("vm-x"));
    let mut s = state();
    ok(&acquire(&mut s, 1, &a, &[excl(&d1)]));
    let before = told(&s);
    // A disk the owner does not hold: lenient (docs/interfaces.md §3), answered at once.
    let now = release::start(&mut s, 2, &a.owner, &[excl(&d2)]).unwrap();
    assert!(matches!(now, Some(Response::Ok { .. })), "{now:?}");
    // An owner that holds nothing, naming somebody else's disk.
    let now = release::start(&mut s, 3, &stranger.owner, &[excl(&d1)]).unwrap();
    assert!(matches!(now, Some(Response::Ok { .. })), "{now:?}");
    drive(&mut s);
    assert!(s.ledger.take_finished().is_empty());
    assert_eq!(told(&s), before);
    assert_eq!(held_by(&s, &key_of(&d1)), vec![a.pid()]);
    assert_locked(&d1);
    // Only malformed input is an error.
    let e = release::start(
        &mut s,
        4,
        &a.owner,
        &[spec("relative.img", LeaseMode::Exclusive)],
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{}", e.message());
    assert_eq!(held_by(&s, &key_of(&d1)), vec![a.pid()]);
}

#[test]
fn owner_exit_frees_everything_it_held_and_returns_its_handles() {
    let disks = Disks::new();
    let (d1, d2) = (disks.image("d1.img"), disks.image("d2.img"));
    let (mut a, b) = (Vm::start("vm-a"), Vm::start("vm-b"));
    let mut s = state();
    ok(&acquire(
        &mut s,
        1,
        &a,
        &[excl(&d1), spec(&d2, LeaseMode::Shared)],
    ));
    // Another VM shares d2: it keeps it.
    ok(&acquire(&mut s, 2, &b, &[spec(&d2, LeaseMode::Shared)]));
    s.owners.get_mut(a.pid()).unwrap().handles.extend([7, 9]);
    a.kill();
    let mut handles = release::owner_exited(&mut s, a.pid());
    handles.sort_unstable();
    assert_eq!(handles, vec![7, 9]);
    drive(&mut s);
    assert!(s.owners.get(a.pid()).is_none());
    assert!(s.leases.get(&key_of(&d1)).is_none());
    assert_eq!(held_by(&s, &key_of(&d2)), vec![b.pid()]);
    assert!(told(&s).contains(&Told::Release(vec![key_of(&d1)])));
    let kept = &s.keeper.recorded().unwrap().held;
    assert!(!kept.contains(&key_of(&d1)) && kept.contains(&key_of(&d2)));
    assert_unlocked(&d1);
    assert_locked(&d2);
    // Exiting twice (pidfd and handle close both noticed it) changes nothing more.
    assert!(release::owner_exited(&mut s, a.pid()).is_empty());
    assert_eq!(held_by(&s, &key_of(&d2)), vec![b.pid()]);
}

#[test]
fn closing_the_handle_of_a_running_vm_terminates_it_before_its_leases_go() {
    let disks = Disks::new();
    let d1 = disks.image("d1.img");
    let mut vm = Vm::start("vm-a");
    let mut s = state();
    // libvirt's not-paused start: the forked child (the owner's own pid) acquires with
    // restrict; that connection becomes the lifetime handle (dispatch.rs).
    let mut session = Session {
        id: 5,
        admin: false,
        peer_pid: i32::try_from(vm.pid()).unwrap(),
        restricted: false,
        handle_of: None,
    };
    let req = Request::Acquire {
        owner: vm.owner.clone(),
        leases: vec![excl(&d1)],
        action: FailureAction::Default,
        restrict: true,
    };
    assert!(dispatch::handle(&mut s, &mut session, req, 1).is_none());
    drive(&mut s);
    let answer = one_answer(&mut s, 5);
    ok(&answer);
    assert!(answer.restrict);
    assert_eq!(session.handle_of, Some(vm.pid()));
    assert_eq!(s.owners.get(vm.pid()).unwrap().handles, vec![5]);
    // While the handle is open its close is the exit signal: no pidfd (owner.rs).
    assert!(s.owners.get(vm.pid()).unwrap().proc.poll_fd().is_none());

    let t0 = Instant::now();
    let before = told(&s);
    release::handle_closed(&mut s, vm.pid(), 5, t0);
    assert!(s.terminating(vm.pid()));
    // The pidfd is open again: it sees the exit and carries the signals.
    assert!(s.owners.get(vm.pid()).unwrap().proc.poll_fd().is_some());
    // The VM still runs: it keeps its lease until it is gone.
    assert_eq!(held_by(&s, &key_of(&d1)), vec![vm.pid()]);
    assert_eq!(told(&s), before);
    assert_locked(&d1);
    // And it cannot take new ones meanwhile.
    let d2 = disks.image("d2.img");
    let e = acquire::start(
        &mut s,
        6,
        &vm.owner,
        &[excl(&d2)],
        FailureAction::Default,
        false,
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{}", e.message());
    assert!(e.message().contains("being terminated"), "{}", e.message());

    // After the settle delay the daemon sends SIGTERM; `sleep` dies of it.
    assert!(s.run_timers(t0 + Duration::from_millis(100)).is_empty());
    let status = vm.child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
    // At the next deadline it is found gone, and only then are its leases released.
    let gone = s.run_timers(t0 + Duration::from_secs(5));
    assert_eq!(gone, vec![vm.pid()]);
    // Its handle already closed: no handle left to unbind.
    assert!(release::owner_exited(&mut s, vm.pid()).is_empty());
    drive(&mut s);
    assert!(!s.terminating(vm.pid()));
    assert!(s.leases.get(&key_of(&d1)).is_none());
    assert_eq!(told(&s).last(), Some(&Told::Release(vec![key_of(&d1)])));
    assert_unlocked(&d1);
}

#[test]
fn closing_the_handle_of_an_exited_vm_releases_at_once() {
    let disks = Disks::new();
    let d1 = disks.image("d1.img");
    let mut vm = Vm::start("vm-a");
    let mut s = state();
    ok(&acquire(&mut s, 1, &vm, &[excl(&d1)]));
    s.owners.get_mut(vm.pid()).unwrap().handles.extend([5, 6]);
    vm.kill();
    // Another lifetime handle is still open: nothing happens yet.
    release::handle_closed(&mut s, vm.pid(), 5, Instant::now());
    assert_eq!(held_by(&s, &key_of(&d1)), vec![vm.pid()]);
    assert_locked(&d1);
    release::handle_closed(&mut s, vm.pid(), 6, Instant::now());
    drive(&mut s);
    assert!(!s.terminating(vm.pid()));
    assert!(s.owners.get(vm.pid()).is_none());
    assert_eq!(s.leases.len(), 0);
    assert_unlocked(&d1);
}

/// An owner with a lifetime handle holds no pidfd; when the handle closes after the owner
/// exited, the pidfd opened again (checked against the start time) finds it gone and its
/// leases go at once. A pid that names another process by then (another start time) counts
/// as gone too, and that process is never signalled.
#[test]
fn a_handle_owner_holds_no_pidfd_and_its_exit_is_found_when_the_handle_closes() {
    let disks = Disks::new();
    let (d1, d2) = (disks.image("d1.img"), disks.image("d2.img"));
    let (mut a, mut b) = (Vm::start("vm-a"), Vm::start("vm-b"));
    let mut s = state();
    ok(&acquire(&mut s, 1, &a, &[excl(&d1)]));
    ok(&acquire(&mut s, 2, &b, &[excl(&d2)]));
    assert!(s.owners.get(a.pid()).unwrap().proc.poll_fd().is_some());
    s.owners.add_handle(a.pid(), 5);
    s.owners.add_handle(b.pid(), 6);
    for vm in [&a, &b] {
        let e = s.owners.get(vm.pid()).unwrap();
        assert!(e.proc.poll_fd().is_none() && e.proc.parked() && !e.idle());
    }
    // A second register of the same owner changes nothing.
    s.owners.ensure(&a.owner).unwrap();
    assert!(s.owners.get(a.pid()).unwrap().proc.poll_fd().is_none());
    a.kill();
    release::handle_closed(&mut s, a.pid(), 5, Instant::now());
    drive(&mut s);
    assert!(!s.terminating(a.pid()));
    assert!(s.owners.get(a.pid()).is_none());
    assert!(s.leases.get(&key_of(&d1)).is_none());
    assert_unlocked(&d1);
    // b's pid "reused": the recorded start time is not the running process's.
    let e = s.owners.get_mut(b.pid()).unwrap();
    e.proc.start = e.proc.start.map(|t| t + 1);
    release::handle_closed(&mut s, b.pid(), 6, Instant::now());
    drive(&mut s);
    assert!(!s.terminating(b.pid()));
    assert!(s.owners.get(b.pid()).is_none());
    assert_unlocked(&d2);
    assert_eq!(
        b.child.try_wait().unwrap(),
        None,
        "an unrelated process was hit"
    );
    b.kill();
}

#[test]
fn a_failed_keeper_hand_over_refuses_the_acquire_and_rolls_it_back() {
    let disks = Disks::new();
    let d1 = disks.image("d1.img");
    let vm = Vm::start("vm-a");
    let mut s = state();
    // The hand-over fails, and so does the one on a new link.
    s.keeper.recorded_mut().unwrap().fail_holds = 2;
    let e = error(acquire(&mut s, 1, &vm, &[excl(&d1)]));
    assert_eq!(e.kind, ErrorKind::Internal, "{}", e.message);
    assert!(e.message.contains("cannot protect"), "{}", e.message);
    assert!(e.message.contains("nothing was locked"), "{}", e.message);
    let key = key_of(&d1);
    assert_eq!(
        told(&s),
        vec![
            Told::Ensure { fresh: false },
            Told::HoldFailed(vec![key]),
            Told::Ensure { fresh: true },
            Told::Reset,
            Told::HoldFailed(vec![key]),
        ]
    );
    assert!(
        s.keeper.take_broken(),
        "the event loop learns the link broke"
    );
    assert!(s.leases.get(&key).is_none());
    assert!(s.infos_of(vm.pid()).is_empty());
    assert_unlocked(&d1);
}

#[test]
fn one_failed_hand_over_is_repeated_with_every_lease_on_a_new_link() {
    let disks = Disks::new();
    let (d0, d1) = (disks.image("d0.img"), disks.image("d1.img"));
    let vm = Vm::start("vm-a");
    let mut s = state();
    ok(&acquire(&mut s, 1, &vm, &[excl(&d0)]));
    s.keeper.recorded_mut().unwrap().fail_holds = 1;
    ok(&acquire(&mut s, 2, &vm, &[excl(&d1)]));
    let (k0, k1) = (key_of(&d0), key_of(&d1));
    let t = told(&s);
    assert_eq!(
        t[2..5],
        [
            Told::Ensure { fresh: false },
            Told::HoldFailed(vec![k1]),
            Told::Ensure { fresh: true },
        ]
    );
    assert_eq!(t[5], Told::Reset);
    // The new keeper holds nothing: it is told every lease, the old one included.
    let Told::Hold(all) = &t[6] else {
        panic!("{t:?}")
    };
    let mut keys: Vec<LeaseKey> = all.iter().map(|h| h.key).collect();
    keys.sort_unstable();
    let mut want = vec![k0, k1];
    want.sort_unstable();
    assert_eq!(keys, want);
    assert_eq!(t.len(), 7);
    assert_eq!(
        s.keeper
            .recorded()
            .unwrap()
            .held
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        want
    );
    assert_locked(&d0);
    assert_locked(&d1);
}

#[test]
fn an_acquire_past_its_deadline_is_refused_naming_the_disk_and_its_late_lock_dropped() {
    let disks = Disks::new();
    let d1 = disks.image("d1.img");
    let vm = Vm::start("vm-a");
    let mut s = state();
    s.storage_timeout = Duration::ZERO;
    start(&mut s, 1, &vm, &[excl(&d1)]);
    // The deadline passes before the storage result is routed.
    route::expire(&mut s, Instant::now() + Duration::from_millis(1));
    let e = error(one_answer(&mut s, 1));
    assert_eq!(e.kind, ErrorKind::Timeout, "{}", e.message);
    assert_eq!(e.resource.as_deref(), Some(d1.as_str()));
    assert!(e.message.contains(&d1), "{}", e.message);
    assert!(e.message.contains("mount /"), "{}", e.message);
    assert!(e.message.contains("nothing was locked"), "{}", e.message);
    // The storage answers late: nobody waits for that lock, it is dropped.
    drive(&mut s);
    assert!(s.ledger.take_finished().is_empty(), "answered once only");
    assert_eq!(s.leases.len(), 0);
    assert!(holds(&s).is_empty());
    assert_unlocked(&d1);
}

#[test]
fn a_client_gone_before_storage_answered_leaves_nothing_locked() {
    let disks = Disks::new();
    let d1 = disks.image("d1.img");
    let vm = Vm::start("vm-a");
    let mut s = state();
    start(&mut s, 1, &vm, &[excl(&d1)]);
    route::cancel(&mut s, 1);
    drive(&mut s);
    assert!(s.ledger.take_finished().is_empty(), "nobody to answer");
    assert_eq!(s.leases.len(), 0);
    assert_unlocked(&d1);
}

#[test]
fn a_live_reexec_answers_a_waiting_acquire_and_rolls_it_back() {
    let disks = Disks::new();
    let d1 = disks.image("d1.img");
    let vm = Vm::start("vm-a");
    let mut s = state();
    start(&mut s, 1, &vm, &[excl(&d1)]);
    route::interrupt(&mut s);
    let e = error(one_answer(&mut s, 1));
    assert_eq!(e.kind, ErrorKind::Timeout, "{}", e.message);
    assert!(e.message.contains("re-executing"), "{}", e.message);
    assert_eq!(s.waiting(), 0);
    drive(&mut s);
    assert_unlocked(&d1);
}

/// Jobs the ledger believes in flight (no storage work behind them).
fn fake_jobs(s: &mut State, ids: &[u64]) -> Vec<Pending> {
    ids.iter()
        .map(|&job| {
            s.ledger.submitted(job, JobFor::Other);
            Pending {
                job,
                what: format!("disk /images/d{job}.img"),
                mount: PathBuf::from(format!("/srv/nfs{job}")),
            }
        })
        .collect()
}

fn released(vm: &str) -> Then {
    Then::Released {
        pid: 42,
        vm: vm.into(),
    }
}

#[test]
fn a_group_is_answered_when_its_last_job_is_back() {
    let mut s = State::for_test(Keeper::recording());
    let g = s.new_group(3);
    let jobs = fake_jobs(&mut s, &[1001, 1002]);
    s.track(g, jobs);
    // Not settled yet (the request is still being worked on): no deadline, no answer.
    assert_eq!(s.ledger.next_deadline(), None);
    let deadline = Instant::now() + Duration::from_secs(60);
    s.settle(g, released("vm-a"), deadline);
    assert_eq!(s.ledger.next_deadline(), Some(deadline));
    assert_eq!(s.ledger.came_back(1001), Some(JobFor::Group(g)));
    s.job_done(JobFor::Group(g), 1001);
    assert!(!s.ledger.has_finished(), "one job still out");
    assert_eq!(s.ledger.came_back(1002), Some(JobFor::Group(g)));
    s.job_done(JobFor::Group(g), 1002);
    let a = one_answer(&mut s, 3);
    ok(&a);
    assert!(!a.restrict);
    assert_eq!(s.waiting(), 0);
}

#[test]
fn a_group_past_its_deadline_is_answered_with_a_timeout_naming_disk_and_mount() {
    let mut s = State::for_test(Keeper::recording());
    let g = s.new_group(3);
    let jobs = fake_jobs(&mut s, &[2001, 2002]);
    s.track(g, jobs);
    let t0 = Instant::now();
    s.settle(g, released("vm-a"), t0 + Duration::from_millis(10));
    assert_eq!(s.ledger.came_back(2002), Some(JobFor::Group(g)));
    s.job_done(JobFor::Group(g), 2002);
    // Not yet due.
    route::expire(&mut s, t0);
    assert!(!s.ledger.has_finished());
    route::expire(&mut s, t0 + Duration::from_millis(10));
    let e = error(one_answer(&mut s, 3));
    assert_eq!(e.kind, ErrorKind::Timeout);
    assert!(e.message.contains("/images/d2001.img"), "{}", e.message);
    assert!(e.message.contains("mount /srv/nfs2001"), "{}", e.message);
    assert!(e.message.contains("VM 'vm-a'"), "{}", e.message);
    assert!(
        e.message.contains("1 file(s) still waiting"),
        "{}",
        e.message
    );
    assert_eq!(s.waiting(), 0);
    // The late job is nobody's any more: its return answers nothing.
    assert_eq!(s.ledger.came_back(2001), Some(JobFor::Other));
    s.job_done(JobFor::Other, 2001);
    assert!(!s.ledger.has_finished());
}

#[test]
fn an_acquire_waiting_for_records_is_answered_ok_even_past_its_deadline() {
    let mut s = State::for_test(Keeper::recording());
    let g = s.new_group(4);
    let jobs = fake_jobs(&mut s, &[3001]);
    s.track(g, jobs);
    let t0 = Instant::now();
    s.settle(
        g,
        Then::Acquired {
            pid: 42,
            restrict: true,
        },
        t0,
    );
    assert!(!s.ledger.has_finished());
    route::expire(&mut s, t0);
    let a = one_answer(&mut s, 4);
    ok(&a);
    assert!(
        a.restrict,
        "the restrict of the acquire survives a late answer"
    );
}

#[test]
fn a_job_already_back_is_not_waited_for() {
    let mut s = State::for_test(Keeper::recording());
    let g = s.new_group(5);
    let jobs = fake_jobs(&mut s, &[4001]);
    assert_eq!(s.ledger.came_back(4001), Some(JobFor::Other));
    s.track(g, jobs);
    s.settle(
        g,
        Then::Respond(Response::error(ErrorKind::Busy, "refused")),
        Instant::now() + Duration::from_secs(60),
    );
    let e = error(one_answer(&mut s, 5));
    assert_eq!(e.message, "refused");
    // A client gone before its group was answered: nothing answered, its jobs nobody's.
    let g = s.new_group(6);
    let jobs = fake_jobs(&mut s, &[4002]);
    s.track(g, jobs);
    s.settle(
        g,
        released("vm-b"),
        Instant::now() + Duration::from_secs(60),
    );
    route::cancel(&mut s, 6);
    assert_eq!(s.waiting(), 0);
    assert_eq!(s.ledger.came_back(4002), Some(JobFor::Other));
    assert!(!s.ledger.has_finished());
}

#[test]
fn one_image_named_writable_and_read_only_in_one_request_is_one_exclusive_lease() {
    let disks = Disks::new();
    let d = disks.image("d.img");
    let vm = Vm::start("vm-a");
    let mut s = state();
    // Shared entry first: exclusive leases are still taken first.
    ok(&acquire(
        &mut s,
        1,
        &vm,
        &[spec(&d, LeaseMode::Shared), excl(&d)],
    ));
    assert_eq!(s.leases.len(), 1);
    assert_eq!(
        s.leases.get(&key_of(&d)).unwrap().mode,
        LeaseMode::Exclusive
    );
    assert_eq!(holds(&s).concat().len(), 1, "{:?}", told(&s));
    assert_eq!(
        try_lock_from_outside(&d, libc::F_RDLCK),
        Err(Errno::EAGAIN),
        "readers are shut out too"
    );
}

#[test]
fn a_vm_holding_a_disk_shared_cannot_also_take_it_writable() {
    let disks = Disks::new();
    let d = disks.image("d.img");
    let vm = Vm::start("vm-a");
    let mut s = state();
    ok(&acquire(&mut s, 1, &vm, &[spec(&d, LeaseMode::Shared)]));
    let e = error(acquire(&mut s, 2, &vm, &[excl(&d)]));
    assert_eq!(e.kind, ErrorKind::Invalid, "{}", e.message);
    assert!(e.message.contains("shared mode"), "{}", e.message);
    // The shared lease it had before the refused request stays.
    assert_eq!(s.leases.get(&key_of(&d)).unwrap().mode, LeaseMode::Shared);
    assert_eq!(held_by(&s, &key_of(&d)), vec![vm.pid()]);
    assert_eq!(try_lock_from_outside(&d, libc::F_RDLCK), Ok(()));
    assert_locked(&d);
}

#[test]
fn two_paths_to_one_image_are_one_lease_released_by_either() {
    let disks = Disks::new();
    let d = disks.image("d.img");
    let link = disks.dir.path().join("link.img");
    std::os::unix::fs::symlink(&d, &link).unwrap();
    let link = link.to_str().unwrap().to_string();
    let (a, b) = (Vm::start("vm-a"), Vm::start("vm-b"));
    let mut s = state();
    ok(&acquire(&mut s, 1, &a, &[excl(&d), excl(&link)]));
    assert_eq!(s.leases.len(), 1);
    let e = error(acquire(&mut s, 2, &b, &[excl(&link)]));
    assert_eq!(e.kind, ErrorKind::Busy, "{}", e.message);
    ok_response(release(&mut s, 3, &a, &[excl(&link)]));
    assert_eq!(s.leases.len(), 0);
    assert_unlocked(&d);
}

#[test]
fn a_deleted_image_can_still_be_released() {
    let disks = Disks::new();
    let d = disks.image("d.img");
    let vm = Vm::start("vm-a");
    let mut s = state();
    ok(&acquire(&mut s, 1, &vm, &[excl(&d)]));
    let key = key_of(&d);
    std::fs::remove_file(&d).unwrap();
    ok_response(release(&mut s, 2, &vm, &[excl(&d)]));
    assert!(s.leases.get(&key).is_none());
    assert_eq!(told(&s).last(), Some(&Told::Release(vec![key])));
}

#[test]
fn a_lockspace_lock_file_is_gone_when_its_disk_is_free_or_its_acquire_refused() {
    let disks = Disks::new();
    let busy = disks.image("busy.img");
    let locks = disks.dir.path().join("locks");
    let locks = locks.to_str().unwrap().to_string();
    let lockspace = |file: &str| LeaseSpec {
        name: format!("/images/{file}.img"),
        kind: ResourceKind::Disk,
        mode: LeaseMode::Exclusive,
        target: LockTarget::Lockspace {
            dir: locks.clone(),
            file: file.into(),
            create_dir: true,
        },
    };
    let (a, b) = (Vm::start("vm-a"), Vm::start("vm-b"));
    let mut s = state();
    ok(&acquire(&mut s, 1, &a, &[lockspace("0a1b"), excl(&busy)]));
    let lock_file = format!("{locks}/0a1b");
    assert_locked(&lock_file);
    assert_eq!(
        s.leases.get(&key_of(&lock_file)).unwrap().name.as_ref(),
        "/images/0a1b.img"
    );
    ok_response(release(&mut s, 2, &a, &[lockspace("0a1b")]));
    assert!(
        !Path::new(&lock_file).exists(),
        "a lockd-style disk lock file is deleted when its disk is free"
    );
    // A refused acquire does not leave the lock file it created behind.
    let e = error(acquire(&mut s, 3, &b, &[lockspace("2c3d"), excl(&busy)]));
    assert_eq!(e.kind, ErrorKind::Busy, "{}", e.message);
    assert!(!Path::new(&format!("{locks}/2c3d")).exists());
    assert_locked(&busy);
}

#[test]
fn a_deadline_in_the_second_phase_rolls_back_the_first() {
    let disks = Disks::new();
    let (d1, d2) = (disks.image("d1.img"), disks.image("d2.img"));
    let vm = Vm::start("vm-a");
    let mut s = state();
    s.storage_timeout = Duration::ZERO;
    acquire::start(
        &mut s,
        1,
        &vm.owner,
        &[excl(&d1), spec(&d2, LeaseMode::Shared)],
        FailureAction::Default,
        false,
    )
    .unwrap();
    // One round: the exclusive phase is judged (d1 goes into the table) and the shared one
    // starts; then the deadline passes.
    route::storage_results(&mut s);
    assert_eq!(s.leases.len(), 1, "d1 taken in the first phase");
    route::expire(&mut s, Instant::now() + Duration::from_millis(1));
    let e = error(one_answer(&mut s, 1));
    assert_eq!(e.kind, ErrorKind::Timeout, "{}", e.message);
    assert_eq!(e.resource.as_deref(), Some(d2.as_str()));
    drive(&mut s);
    assert!(s.ledger.take_finished().is_empty());
    assert_eq!(s.leases.len(), 0);
    assert!(holds(&s).is_empty());
    assert_unlocked(&d1);
    assert_unlocked(&d2);
}

#[test]
fn a_vm_that_exits_while_joining_a_shared_lease_does_not_keep_it() {
    let disks = Disks::new();
    let d = disks.image("shared.img");
    let (a, mut b) = (Vm::start("vm-a"), Vm::start("vm-b"));
    let mut s = state();
    ok(&acquire(&mut s, 1, &a, &[spec(&d, LeaseMode::Shared)]));
    start(&mut s, 2, &b, &[spec(&d, LeaseMode::Shared)]);
    // B exits while its Take is out (the event loop sees its pidfd before the result).
    b.kill();
    assert!(release::owner_exited(&mut s, b.pid()).is_empty());
    drive(&mut s);
    // An owner that exited cannot be told it holds a lease.
    let e = error(one_answer(&mut s, 2));
    assert_eq!(e.kind, ErrorKind::Invalid, "{}", e.message);
    assert!(e.message.contains("exited while"), "{}", e.message);
    assert!(
        holds(&s)
            .iter()
            .flatten()
            .all(|h| !h.pids.contains(&b.pid())),
        "the keeper was never told to watch the exited VM for this lease: {:?}",
        told(&s)
    );
    assert_eq!(held_by(&s, &key_of(&d)), vec![a.pid()]);
    // A leaves: nobody holds the disk any more.
    ok_response(release(&mut s, 3, &a, &[spec(&d, LeaseMode::Shared)]));
    assert_eq!(s.leases.len(), 0, "a lease kept for an exited VM");
    assert_unlocked(&d);
}

#[test]
fn a_timed_out_release_counts_one_stall_per_mount() {
    let mut s = State::for_test(Keeper::recording());
    let g = s.new_group(3);
    // Disks in name order alternate between two mounts.
    let jobs = [("a", "/srv/m1"), ("b", "/srv/m2"), ("c", "/srv/m1")]
        .iter()
        .enumerate()
        .map(|(i, (disk, mount))| {
            let job = 5001 + i as u64;
            s.ledger.submitted(job, JobFor::Other);
            Pending {
                job,
                what: format!("disk /images/{disk}.img"),
                mount: PathBuf::from(mount),
            }
        })
        .collect();
    s.track(g, jobs);
    let t0 = Instant::now();
    s.settle(g, released("vm-a"), t0);
    route::expire(&mut s, t0);
    let e = error(one_answer(&mut s, 3));
    assert!(
        e.message.contains("3 file(s) still waiting"),
        "{}",
        e.message
    );
    let stalls = &s.metrics.request_stalls;
    assert_eq!(
        (stalls.get("/srv/m1"), stalls.get("/srv/m2")),
        (Some(&1), Some(&1)),
        "one request timed out on each mount: {stalls:?}"
    );
}
