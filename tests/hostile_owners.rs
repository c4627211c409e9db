//! Owners and lost-lock probes under hostile conditions (issue 13 findings 7 and 8, issue 19
//! lock-safety bug 1), against the real lockwardend:
//! - a transient errno from the storage (ETIMEDOUT from a `softerr` NFS mount, played by the
//!   FUSE test file system) does not kill a VM; only errors that persist do;
//! - a paused VM's lost lock keeps being re-checked and taken back, and each change is reported;
//! - a daemon restarted short of descriptors (pidfd_open fails with EMFILE) keeps the leases of
//!   running VMs and watches them once it can; the keeper keeps its copy likewise.
//!
//! Needs root (FUSE mounts, prlimit on the daemon) and /dev/fuse.

mod common;

use common::daemon::{Lockwardend, Opts, TestDaemon};
use common::wait::wait_until_or;

use common::fuse::Fs;
use common::image;
use common::locks::hold_byte0;
use common::proto::{BOUND, Vm, byte0, ok, owner_for, proc_state, running, sleeper};
use lockwarden::protocol::{FailureAction, LeaseSpec, Request};
use std::fs;
use std::path::Path;

/// Transient probe errors in a row that count as a loss (src/daemon/lost.rs TRANSIENT_LIMIT).
const TRANSIENT_LIMIT: usize = 3;

// ---------------------------------------------------------------------------------------------
// The daemon, restartable on the same sockets (so a restart finds the keeper)

/// Start lockwardend laid out in `dir` (a restart in the same `dir` finds the keeper), with
/// RLIMIT_NOFILE soft = hard = `nofile` when given; returns once it runs (see [`settle`]).
fn spawn(dir: &Path, conf: &str, nofile: Option<u64>) -> TestDaemon {
    TestDaemon::with(Opts {
        config: conf,
        dir: Some(dir),
        nofile: nofile.map(|n| (n, n)),
        verbose: true,
        no_wait: true,
        ..Opts::default()
    })
}

/// Wait until it serves (true) or exits (false).
fn settle(d: &mut TestDaemon) -> bool {
    let log = d.log.clone();
    let read = || fs::read_to_string(&log).unwrap_or_default();
    let proc = &mut d.proc;
    let mut exited = false;
    wait_until_or(
        "lockwardend serves or exits",
        BOUND,
        || format!("daemon log:\n{}", read()),
        || {
            if read().contains(" serving (pid ") {
                return true;
            }
            exited = !matches!(proc.0.try_wait(), Ok(None));
            exited
        },
    );
    !exited
}

/// [`spawn`], serving.
fn started(dir: &Path, conf: &str) -> TestDaemon {
    let mut d = spawn(dir, conf, None);
    assert!(settle(&mut d), "lockwardend did not start:\n{}", d.log());
    d
}

fn acquire(d: &TestDaemon, vm: &Vm, leases: Vec<LeaseSpec>, action: FailureAction) {
    ok(d.client().call(&Request::Acquire {
        owner: vm.owner.clone(),
        leases,
        action,
        restrict: false,
    }));
}

/// The names of the leases the daemon reports lost.
fn lost(d: &TestDaemon) -> Vec<String> {
    ok(d.admin_client().call(&Request::Lost))
        .into_iter()
        .map(|l| l.name)
        .collect()
}

/// The names of the leases the daemon holds.
fn list(d: &TestDaemon) -> Vec<String> {
    Lockwardend::list(d).into_iter().map(|l| l.name).collect()
}

/// Set the soft RLIMIT_NOFILE of `pid`, keeping its hard limit (raising a hard limit would need
/// CAP_SYS_RESOURCE, which test containers may lack).
fn set_soft_nofile(pid: u32, soft: u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit on a pid, reading into a valid rlimit.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    assert_eq!(rc, 0, "prlimit({pid}): {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: prlimit on a pid with a valid rlimit and no old-limit pointer.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit({pid}): {}", std::io::Error::last_os_error());
}

/// The descriptors `pid` holds open for good: files under /proc are left out, because the
/// keeper opens /proc/PID/stat for a moment when it starts to watch an owner, and counting that
/// one would make the calibration below think a lease costs one descriptor more than it does.
fn open_fds(pid: u32) -> Vec<u64> {
    let mut v: Vec<u64> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let target = fs::read_link(e.path()).ok()?;
            if target.starts_with("/proc") {
                return None;
            }
            e.file_name().to_str()?.parse().ok()
        })
        .collect();
    v.sort_unstable();
    v
}

fn vm(name: &str) -> Vm {
    let proc = sleeper();
    Vm {
        owner: owner_for(proc.pid(), name),
        proc,
    }
}

// ---------------------------------------------------------------------------------------------
// The FUSE stand-in for NFS (tests/fusefs/testfs.rs; see tests/nfs.rs)

fn mount_fs() -> Fs {
    common::fuse::prerequisites("tests/hostile_owners.rs");
    Fs::mount("lw-own", BOUND)
}

/// Results of the write-lock calls (`setlk NAME 1 ...`) on `name` in `f`, in order: "0" for a
/// success, "errno110", "EIO", or an errno number.
fn lock_results(f: &Fs, name: &str) -> Vec<String> {
    let wr = libc::F_WRLCK.to_string();
    f.events()
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            (w.len() == 6 && w[0] == "setlk" && w[1] == name && w[2] == wr)
                .then(|| w[5].to_string())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Issue 13 finding 7: transient probe errors are retried; only persistent ones count

/// Two ETIMEDOUT answers in a row (below the limit of 3), then the storage answers again: the
/// VM (on_lockfailure default = SIGKILL) keeps running and nothing is reported lost.
#[test]
fn a_burst_of_transient_probe_errors_does_not_kill_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let d = started(dir.path(), "lease_check_interval_ms = 100\n");
    let f = mount_fs();
    let img = f.image("burst.img");
    let v = vm("burst-vm");
    acquire(
        &d,
        &v,
        vec![common::proto::excl(&img)],
        FailureAction::Default,
    );
    f.set(&format!("errno {} 2 burst.img\n", libc::ETIMEDOUT));
    wait_until_or(
        "two ETIMEDOUT probes and then two good ones",
        BOUND,
        || format!("{:?}\n{}", lock_results(&f, "burst.img"), d.log()),
        || {
            assert!(
                running(v.proc.pid()),
                "the VM was killed for a transient error: {:?}\n{}",
                lock_results(&f, "burst.img"),
                d.log()
            );
            let r = lock_results(&f, "burst.img");
            let failed: Vec<usize> = (0..r.len()).filter(|i| r[*i] != "0").collect();
            failed.len() == 2 && r.len() >= failed[1] + 3
        },
    );
    let r = lock_results(&f, "burst.img");
    assert!(
        r.iter().filter(|x| x.starts_with("errno")).count() == 2,
        "{r:?}"
    );
    assert!(running(v.proc.pid()), "{}", d.log());
    assert!(lost(&d).is_empty(), "reported lost: {:?}", lost(&d));
    let log = d.log();
    assert!(log.contains("transient error (1 of 3"), "{log}");
    assert!(log.contains("confirmed again after 2 transient"), "{log}");
    assert!(!log.contains("is LOST"), "{log}");
}

/// ETIMEDOUT that does not stop: after 3 probes in a row the lock counts as lost and the
/// default action (SIGKILL) is taken; not before.
#[test]
fn transient_probe_errors_that_persist_count_as_lost() {
    let dir = tempfile::tempdir().unwrap();
    let d = started(dir.path(), "lease_check_interval_ms = 100\n");
    let f = mount_fs();
    let img = f.image("persist.img");
    let mut v = vm("persist-vm");
    acquire(
        &d,
        &v,
        vec![common::proto::excl(&img)],
        FailureAction::Default,
    );
    f.set(&format!("errno {} 1000000 persist.img\n", libc::ETIMEDOUT));
    let st = v.proc.wait_for(BOUND).unwrap_or_else(|| {
        panic!(
            "the VM still runs after persistent errors: {:?}\n{}",
            lock_results(&f, "persist.img"),
            d.log()
        )
    });
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{st:?}");
    let failed = lock_results(&f, "persist.img")
        .iter()
        .filter(|r| r.starts_with("errno"))
        .count();
    assert!(
        failed >= TRANSIENT_LIMIT,
        "killed after {failed} transient error(s), before {TRANSIENT_LIMIT} in a row:\n{}",
        d.log()
    );
    let log = d.log();
    assert!(
        log.contains("is LOST: 3 probes in a row could not confirm it"),
        "{log}"
    );
    assert_eq!(lost(&d), vec![img.to_string_lossy().into_owned()]);
}

/// on_lockfailure=pause: the lost lock keeps being probed after the SIGSTOP. Each change is
/// reported (still lost: EIO; still lost: somebody else holds it) and when the storage grants
/// it again the lock is taken back and reported; the VM stays stopped for the operator.
#[test]
fn a_paused_vm_keeps_being_checked_until_its_lock_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = started(dir.path(), "lease_check_interval_ms = 100\n");
    let f = mount_fs();
    let img = f.image("paused.img");
    let v = vm("paused-vm");
    let pid = v.proc.pid();
    acquire(
        &d,
        &v,
        vec![common::proto::excl(&img)],
        FailureAction::Pause,
    );
    f.set("lost paused.img\n");
    wait_until_or(
        "the VM is stopped",
        BOUND,
        || d.log(),
        || proc_state(pid) == Some('T'),
    );
    wait_until_or(
        "the paused VM's lock is re-checked and reported still lost",
        BOUND,
        || d.log(),
        || d.log().contains("is still LOST at re-check 1"),
    );
    // Another host takes the byte while ours is lost; the storage answers again.
    let other = hold_byte0(&f.backing.join("paused.img"));
    f.set("");
    wait_until_or(
        "the conflict is reported",
        BOUND,
        || d.log(),
        || d.log().contains("somebody else holds it"),
    );
    assert_eq!(proc_state(pid), Some('T'), "resumed by lockwardend");
    drop(other);
    wait_until_or(
        "the lock is taken back and reported",
        BOUND,
        || d.log(),
        || d.log().contains("is held again"),
    );
    assert_eq!(byte0(&f.backing.join("paused.img")), libc::F_WRLCK);
    assert_eq!(
        proc_state(pid),
        Some('T'),
        "lockwardend must not resume the VM"
    );
    assert_eq!(lost(&d).len(), 1, "one detection: {:?}", lost(&d));
    assert_eq!(list(&d), vec![img.to_string_lossy().into_owned()]);
}

// ---------------------------------------------------------------------------------------------
// Issue 19 bug 1: a failed pidfd_open is not "the VM exited"

/// A restart short of descriptors: lockwardend is killed (-9) while a VM holds a lease, and
/// started again with RLIMIT_NOFILE lowered one step at a time (from enough, downwards) until
/// the restarted daemon cannot open the VM's pidfd (or read its /proc/PID/stat) while taking
/// the lease back from the keeper. At no step may the lease be released: byte 0 stays locked
/// and the VM's lease is never "released because it exited". The watch is retried, and the
/// lease is released only when the VM really exits.
#[test]
fn a_restart_short_of_descriptors_keeps_the_leases_of_running_vms() {
    let dir = tempfile::tempdir().unwrap();
    let disks = tempfile::tempdir().unwrap();
    let conf = "lease_check_interval_ms = 0\n";
    let mut d1 = started(dir.path(), conf);
    let mut v = vm("short-of-fds");
    let img = image(disks.path(), "short.img");
    acquire(
        &d1,
        &v,
        vec![common::proto::excl(&img)],
        FailureAction::Default,
    );
    assert_eq!(byte0(&img), libc::F_WRLCK);
    let enough = open_fds(d1.pid()).len() as u64 + 8;
    d1.stop(libc::SIGKILL);
    assert_eq!(byte0(&img), libc::F_WRLCK, "the keeper holds the lease");
    let mut short = None;
    for limit in (8..=enough).rev() {
        let mut d = spawn(dir.path(), conf, Some(limit));
        let serving = settle(&mut d);
        let log = d.log();
        assert!(
            !log.contains("exited while lockwardend was not watching"),
            "RLIMIT_NOFILE {limit}: the lease of a running VM was released:\n{log}"
        );
        assert!(running(v.proc.pid()));
        assert_eq!(
            byte0(&img),
            libc::F_WRLCK,
            "RLIMIT_NOFILE {limit}: byte 0 is unlocked:\n{log}"
        );
        assert!(serving, "RLIMIT_NOFILE {limit}: no start:\n{log}");
        if log.contains("cannot watch VM") {
            short = Some((limit, d));
            break;
        }
        assert!(
            log.contains("took back 1 of 1 lease(s)"),
            "RLIMIT_NOFILE {limit}:\n{log}"
        );
        d.stop(libc::SIGKILL);
    }
    let (limit, d) = short.expect("no limit made the restarted daemon fail to watch the VM");
    let log = d.log();
    eprintln!("RLIMIT_NOFILE {limit}: the VM could not be watched at restart; lease kept");
    assert!(log.contains("this does not mean it exited"), "{log}");
    assert!(log.contains("took back 1 of 1 lease(s)"), "{log}");
    // The watch is retried (without descriptors to spare it keeps failing), and the VM's
    // real exit is noticed by the retry: only then is the lease released.
    wait_until_or(
        "the watch is retried",
        BOUND,
        || d.log(),
        || d.log().contains("still cannot open a pidfd"),
    );
    assert_eq!(byte0(&img), libc::F_WRLCK);
    let _ = v.proc.0.kill();
    let _ = v.proc.0.wait();
    wait_until_or(
        "the lease is released after the VM exited",
        BOUND,
        || d.log(),
        || byte0(&img) == libc::F_UNLCK,
    );
    assert!(d.log().contains("released 1 lease(s)"), "{}", d.log());
}

/// The keeper short of descriptors when the daemon crashes: it must then watch the owners
/// itself (while a daemon is connected it holds no pidfd: docs/reliability.md §3) but cannot
/// open their pidfds. Its copy must stay (so the crash does not drop the lock), the watch is
/// retried, and the lease is dropped when the VM really exits.
#[test]
fn the_keeper_short_of_descriptors_keeps_its_copy() {
    let dir = tempfile::tempdir().unwrap();
    let disks = tempfile::tempdir().unwrap();
    let mut d = started(dir.path(), "lease_check_interval_ms = 0\n");
    let log = d.log();
    let keeper: u32 = log
        .split("started the keeper (pid ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no keeper pid in the log:\n{log}"));
    let v1 = vm("keeper-calib");
    let img1 = image(disks.path(), "calib.img");
    acquire(
        &d,
        &v1,
        vec![common::proto::excl(&img1)],
        FailureAction::Default,
    );
    let mut v2 = vm("keeper-short");
    let img2 = image(disks.path(), "short2.img");
    acquire(
        &d,
        &v2,
        vec![common::proto::excl(&img2)],
        FailureAction::Default,
    );
    let pid2 = v2.proc.pid();
    // The holds are quiet batches; the keeper has read both once it has answered the `hello`
    // of a live re-exec (it reads its link in order).
    common::proto::signal(d.pid(), libc::SIGUSR1);
    d.wait_log("complete: restored");
    // No descriptor number below the limit is free: with the daemon's link closed by the
    // crash at most one is, and a watch needs two (the pidfd and /proc/PID/stat to check
    // the start time).
    let open = open_fds(keeper);
    let lowest_free = (0..).find(|n| !open.contains(n)).unwrap();
    set_soft_nofile(keeper, lowest_free);
    // The daemon crashes: only the keeper's copy holds the lock now, and the keeper must
    // watch the VMs itself, without the descriptors to do it.
    d.stop(libc::SIGKILL);
    let gone = format!("owner pid {pid2} exited; dropped");
    let kept = format!("cannot watch owner pid {pid2}");
    wait_until_or(
        "the keeper tried to watch the VM",
        BOUND,
        || d.log(),
        || d.log().contains(&gone) || d.log().contains(&kept),
    );
    assert!(!d.log().contains(&gone), "{}", d.log());
    assert!(running(pid2));
    assert_eq!(
        byte0(&img2),
        libc::F_WRLCK,
        "the keeper dropped the lease of a running VM:\n{}",
        d.log()
    );
    // Descriptors again: the keeper watches the VM and drops the lease when it exits.
    set_soft_nofile(keeper, 1024);
    wait_until_or(
        "the keeper watches the VM again",
        BOUND,
        || d.log(),
        || d.log().contains(&format!("owner pid {pid2} is watched")),
    );
    assert_eq!(byte0(&img2), libc::F_WRLCK);
    let _ = v2.proc.0.kill();
    let _ = v2.proc.0.wait();
    wait_until_or(
        "the keeper dropped the lease of the exited VM",
        BOUND,
        || d.log(),
        || byte0(&img2) == libc::F_UNLCK,
    );
    drop(v1);
    wait_until_or(
        "the calibration lease is dropped",
        BOUND,
        || d.log(),
        || byte0(&img1) == libc::F_UNLCK,
    );
}
