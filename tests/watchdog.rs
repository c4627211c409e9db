//! Watchdog escalation (issue 15 item 3; docs/storage.md, "Watchdog"): with `watchdog_device`
//! set, lockwardend feeds the watchdog only while every VM that had to be stopped for a silent
//! storage is stopped or gone. Real `lockwardend` daemons; the watchdog is a stand-in, never a
//! real one: a FIFO this test reads (lockwardend accepts a FIFO as documented, with a warning
//! that it resets nothing by itself), each keep-alive one byte, the magic close a `V`.
//!
//! The VM that cannot be stopped is real, not simulated: a process blocked in an `open` on the
//! partitioned FUSE stand-in (tests/fusefs/testfs.rs, `hang 1`). testfs has read that request
//! and holds it, so the kernel waits for its answer uninterruptibly (fs/fuse/dev.c,
//! `request_wait_answer`: once a request is in the file system's hands, even a fatal signal
//! only waits it out): SIGKILL leaves the process present in state D, and SIGSTOP cannot take
//! effect either, until the file system answers — as QEMU blocked on a hard-mounted NFS server
//! that went away. Needs root and /dev/fuse.

mod common;

use common::daemon::{Opts, TestDaemon};
use common::fuse::Fs;
use common::proto::{Client, excl, owner_for};
use lockwarden::protocol::{FailureAction, Owner, Request, Response};
use std::ffi::CString;
use std::fs;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const INTERVAL_MS: u64 = 100;
const FENCE_AFTER_MS: u64 = 1000;
/// A generous bound for polls on a shared 2-core machine (not a measured claim).
const BOUND: Duration = Duration::from_secs(15);

/// The stand-in watchdog: a FIFO and a thread reading it, recording when each byte came.
struct Fifo {
    _dir: tempfile::TempDir,
    path: PathBuf,
    bytes: Arc<Mutex<Vec<(Instant, u8)>>>,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Fifo {
    fn new() -> Fifo {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("watchdog");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let c = CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: open(2) on a NUL-terminated path; the descriptor is owned at once.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK) };
        assert!(fd >= 0, "open fifo: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just opened and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (bytes, stop) = (Arc::clone(&bytes), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::SeqCst) {
                    match nix::unistd::read(&fd, &mut buf) {
                        Ok(n) if n > 0 => {
                            let now = Instant::now();
                            bytes
                                .lock()
                                .unwrap()
                                .extend(buf[..n].iter().map(|b| (now, *b)));
                        }
                        _ => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        Fifo {
            _dir: dir,
            path,
            bytes,
            stop,
            reader: Some(reader),
        }
    }

    fn all(&self) -> Vec<(Instant, u8)> {
        self.bytes.lock().unwrap().clone()
    }

    /// Keep-alive bytes that came after `t`.
    fn since(&self, t: Instant) -> Vec<(Instant, u8)> {
        self.all().into_iter().filter(|(at, _)| *at > t).collect()
    }

    /// The longest silence between `from` and `to` (both ends count as bytes).
    fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        let mut times: Vec<Instant> = self
            .all()
            .into_iter()
            .map(|(t, _)| t)
            .filter(|t| *t >= from && *t <= to)
            .collect();
        times.insert(0, from);
        times.push(to);
        times
            .windows(2)
            .map(|w| w[1].duration_since(w[0]))
            .max()
            .unwrap_or_default()
    }
}

impl Drop for Fifo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn conf(fifo: &Path) -> String {
    format!(
        "heartbeat_interval_ms = {INTERVAL_MS}\nfence_after_ms = {FENCE_AFTER_MS}\n\
         lease_check_interval_ms = 0\nstorage_timeout_ms = 2000\nwatchdog_device = \"{}\"\n",
        fifo.display()
    )
}

fn acquire(d: &TestDaemon, o: &Owner, p: &Path, action: FailureAction) {
    let r = Client::connect(&d.socket).call(&Request::Acquire {
        owner: o.clone(),
        leases: vec![excl(p)],
        action,
        restrict: false,
    });
    assert!(matches!(r, Response::Ok { .. }), "acquire {p:?}: {r:?}");
}

/// The state letter of every thread of `pid` (empty once it is gone).
fn states(pid: u32) -> Vec<char> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("stat")).ok())
        .filter_map(|s| s.rsplit_once(')')?.1.trim().chars().next())
        .collect()
}

/// A child process standing in for QEMU doing I/O: it opens and reads `path` every 20 ms,
/// so once the mount is partitioned it sits in an open that testfs holds.
struct Io {
    pid: libc::pid_t,
}

impl Io {
    fn spawn(path: &Path) -> Io {
        let c = CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: the child only calls open, read, close and nanosleep (async-signal-safe) on
        // memory prepared before the fork, and never returns.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let mut buf = [0u8; 512];
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 20_000_000,
            };
            loop {
                // SAFETY: see above; `c` and `buf` outlive the loop.
                unsafe {
                    let fd = libc::open(c.as_ptr(), libc::O_RDONLY);
                    if fd >= 0 {
                        libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                        libc::close(fd);
                    }
                    libc::nanosleep(&ts, std::ptr::null_mut());
                }
            }
        }
        Io { pid }
    }

    fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Reaped: Some(signal) once it was killed.
    fn reaped(&self) -> Option<libc::c_int> {
        let mut st = 0;
        // SAFETY: waitpid on our own child, WNOHANG.
        let r = unsafe { libc::waitpid(self.pid, &mut st, libc::WNOHANG) };
        (r == self.pid).then(|| libc::WTERMSIG(st))
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        // SAFETY: kill and waitpid on our own child.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// Keep-alives flow while healthy (with a lease on a FUSE mount confirmed by its heartbeats),
/// are never a `V`, survive a live re-exec with a short gap, the keeper never holds the
/// device, and a clean stop ends with the magic close `V`.
#[test]
fn keepalives_flow_while_healthy_survive_a_reexec_and_end_with_the_magic_close() {
    common::fuse::prerequisites("tests/watchdog.rs");
    let fifo = Fifo::new();
    let d = TestDaemon::verbose(&conf(&fifo.path));
    let x = Fs::mount("lw-wd", BOUND);
    let q = common::proto::sleeper();
    let o = owner_for(q.pid(), "vm-healthy");
    acquire(&d, &o, &x.image("h.img"), FailureAction::Pause);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let got = fifo.since(t0);
    assert!(
        got.len() >= 8,
        "{} keep-alives in 1.5 s at {INTERVAL_MS} ms:\n{}",
        got.len(),
        d.log()
    );
    assert!(got.iter().all(|(_, b)| *b == b'.'), "{got:?}");
    let gap = fifo.longest_gap(t0, Instant::now());
    assert!(
        gap < Duration::from_millis(600),
        "a {gap:?} gap while healthy"
    );
    assert!(
        d.log().contains("is a FIFO, not a watchdog driver"),
        "{}",
        d.log()
    );
    // The keeper does not hold the device (it closes what it inherits).
    let keeper = d
        .log()
        .lines()
        .find_map(|l| l.split("keeper pid ").nth(1))
        .and_then(|r| r.trim_end_matches(')').trim().parse::<u32>().ok())
        .expect("keeper pid in the log");
    let holds = |pid: u32| {
        fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .any(|e| fs::read_link(e.path()).is_ok_and(|t| t == fifo.path))
    };
    assert!(holds(d.pid()), "lockwardend holds the device");
    assert!(
        !holds(keeper),
        "the keeper (pid {keeper}) holds the watchdog device"
    );

    // Live re-exec: the descriptor is handed over; the gap in keep-alives stays short.
    let t1 = Instant::now();
    common::proto::signal(d.pid(), libc::SIGUSR1);
    d.wait_for("the re-exec", || {
        d.log().contains("live re-exec #1 complete")
    });
    std::thread::sleep(Duration::from_millis(500));
    let gap = fifo.longest_gap(t1, Instant::now());
    eprintln!("longest gap between keep-alives across a live re-exec: {gap:?}");
    assert!(
        gap < Duration::from_millis(1000),
        "a {gap:?} gap across the re-exec:\n{}",
        d.log()
    );
    assert!(holds(d.pid()));
    assert!(fifo.all().iter().all(|(_, b)| *b == b'.'));

    // A clean stop: the last byte is the magic close.
    drop(q);
    d.wait_for("the VM's lease released", || {
        common::daemon::Lockwardend::list(&d).is_empty()
    });
    common::proto::signal(d.pid(), libc::SIGTERM);
    d.wait_for("the clean stop", || d.log().contains("lockwardend stopped"));
    std::thread::sleep(Duration::from_millis(100));
    let all = fifo.all();
    assert_eq!(all.last().map(|(_, b)| *b), Some(b'V'), "{all:?}");
    assert_eq!(all.iter().filter(|(_, b)| *b == b'V').count(), 1);
    let text = d.log();
    assert!(text.contains("magic close written"), "{text}");
}

/// A partition fences two VMs whose processes are blocked in I/O on the silent mount: the
/// SIGKILLed one stays present (state D) and the SIGSTOPped one cannot stop, so keep-alives
/// stop and an error says why. When the storage answers, the killed VM goes, the paused one
/// stops, and keep-alives resume.
#[test]
fn keepalives_stop_while_a_fenced_vm_cannot_be_stopped_and_resume_once_it_is() {
    common::fuse::prerequisites("tests/watchdog.rs");
    let fifo = Fifo::new();
    let d = TestDaemon::verbose(&conf(&fifo.path));
    let x = Fs::mount("lw-wd", BOUND);
    let (pk, pp) = (x.image("kill.img"), x.image("pause.img"));
    let (vk, vp) = (Io::spawn(&pk), Io::spawn(&pp));
    acquire(
        &d,
        &owner_for(vk.pid(), "vm-unkillable"),
        &pk,
        FailureAction::Default,
    );
    acquire(
        &d,
        &owner_for(vp.pid(), "vm-unpausable"),
        &pp,
        FailureAction::Pause,
    );
    std::thread::sleep(Duration::from_millis(500));
    x.set("hang 1\n");
    let t0 = Instant::now();
    d.wait_for("the fence", || d.log().matches("FENCE:").count() >= 2);
    let fenced = t0.elapsed();
    // Both are still there, blocked in the file system: neither killed nor stopped.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vk.reaped(), None, "the blocked VM died despite the hang");
    let (sk, sp) = (states(vk.pid()), states(vp.pid()));
    assert!(sk.contains(&'D'), "SIGKILLed VM: {sk:?}");
    assert!(
        sp.contains(&'D') && !sp.contains(&'T'),
        "SIGSTOPped VM: {sp:?}"
    );
    // No keep-alive since shortly after the fence, and the error says why.
    let t_fence = t0 + fenced;
    d.wait_for("the WATCHDOG error", || {
        d.log().contains("WATCHDOG: keep-alives")
    });
    let text = d.log();
    assert!(
        text.contains("vm-unkillable") || text.contains("vm-unpausable"),
        "{text}"
    );
    let late = fifo.since(t_fence + Duration::from_millis(200));
    assert!(late.is_empty(), "keep-alives after the fence: {late:?}");
    std::thread::sleep(Duration::from_millis(1000));
    let late = fifo.since(t_fence + Duration::from_millis(200));
    assert!(late.is_empty(), "keep-alives while a VM runs: {late:?}");
    eprintln!(
        "fence after {fenced:?} of silence; no keep-alive for {:?} since",
        t_fence.elapsed()
    );

    // The storage answers: the open returns, the kill and the stop take effect, and the
    // keep-alives resume.
    let healed = Instant::now();
    x.set("");
    d.wait_for("the killed VM gone", || vk.reaped().is_some());
    d.wait_for("the paused VM stopped", || {
        states(vp.pid()).iter().all(|c| *c == 'T')
    });
    let resumed = d.wait_for("keep-alives again", || !fifo.since(healed).is_empty());
    assert!(
        d.log().contains("watchdog keep-alives resume"),
        "{}",
        d.log()
    );
    eprintln!("keep-alives resumed {resumed:?} after the storage answered");
    // SIGCONT leaves the paused VM to us (Io's drop kills it).
    drop(vp);
}

/// A fenced VM that stops at once does not interrupt the keep-alives for more than a moment,
/// and a VM with `on_lockfailure=ignore` (left running, logged UNPROTECTED) does not withhold
/// them.
#[test]
fn a_fenced_vm_that_stops_keeps_the_watchdog_fed() {
    common::fuse::prerequisites("tests/watchdog.rs");
    let fifo = Fifo::new();
    let d = TestDaemon::verbose(&conf(&fifo.path));
    let x = Fs::mount("lw-wd", BOUND);
    let q = common::proto::sleeper();
    acquire(
        &d,
        &owner_for(q.pid(), "vm-stops"),
        &x.image("s.img"),
        FailureAction::Pause,
    );
    let qi = common::proto::sleeper();
    let oi = owner_for(qi.pid(), "vm-ignores");
    acquire(&d, &oi, &x.image("i.img"), FailureAction::Ignore);
    std::thread::sleep(Duration::from_millis(300));
    x.set("hang 1\n");
    let t0 = Instant::now();
    d.wait_for("the fence", || d.log().contains("FENCE:"));
    std::thread::sleep(Duration::from_millis(1000));
    let gap = fifo.longest_gap(t0, Instant::now());
    eprintln!("longest gap between keep-alives across a fence whose VM stopped: {gap:?}");
    assert!(gap < Duration::from_millis(600), "{gap:?}:\n{}", d.log());
    assert!(!d.log().contains("WATCHDOG:"), "{}", d.log());
    assert!(d.log().contains("UNPROTECTED"), "{}", d.log());
    assert!(
        states(qi.pid()).iter().all(|c| *c != 'T'),
        "the ignoring VM runs on"
    );
    x.set("");
}

/// What lockwardend refuses to start with, and says so.
#[test]
fn lockwardend_refuses_a_watchdog_device_that_is_not_one() {
    let dir = tempfile::tempdir().unwrap();
    let regular = dir.path().join("file");
    fs::write(&regular, b"").unwrap();
    let lonely = dir.path().join("fifo");
    nix::unistd::mkfifo(&lonely, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let cases = [
        (
            format!("watchdog_device = \"{}\"\n", regular.display()),
            "neither a character device nor a FIFO",
        ),
        (
            format!("watchdog_device = \"{}\"\n", lonely.display()),
            "a FIFO nobody reads",
        ),
        (
            "watchdog_device = \"/dev/null\"\n".to_string(),
            "not a watchdog (WDIOC_GETSUPPORT",
        ),
        (
            "watchdog_device = \"/dev/null\"\nheartbeat_interval_ms = 0\n".to_string(),
            "heartbeat_interval_ms = 0",
        ),
        (
            format!("watchdog_device = \"{}/none\"\n", dir.path().display()),
            "cannot open watchdog_device",
        ),
        (
            "watchdog_device = \"relative\"\n".to_string(),
            "watchdog_device",
        ),
    ];
    for (conf, needle) in cases {
        let mut d = TestDaemon::with(Opts {
            config: &conf,
            no_wait: true,
            ..Opts::default()
        });
        let st = d.wait_exit();
        let text = d.log();
        assert_eq!(st.code(), Some(1), "{conf}: {text}");
        assert!(
            text.contains(needle),
            "{conf}: wanted {needle:?} in:\n{text}"
        );
        assert!(!d.socket.exists(), "{conf}: it served");
    }
    assert_eq!(
        fs::read(&regular).unwrap(),
        b"",
        "nothing written to the file"
    );
}

/// `lockwarden doctor`'s watchdog line, from `lockwarden --admin-socket ... doctor` with a
/// mount table (`--mounts`) that puts `dir` on NFS.
fn doctor_watchdog_line(d: &TestDaemon, dir: &Path) -> String {
    let mounts = dir.join("mounts");
    fs::write(
        &mounts,
        format!(
            "/dev/root / ext4 rw 0 0\nsrv:/export {} nfs4 rw,vers=4.2,hard 0 0\n",
            dir.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lockwarden"))
        .arg("--admin-socket")
        .arg(&d.admin)
        .arg("doctor")
        .arg("--mounts")
        .arg(&mounts)
        .arg("--config")
        .arg(dir.join("none.conf"))
        .arg("--qemu-conf")
        .arg(dir.join("none-qemu.conf"))
        .arg("--no-publish")
        .output()
        .expect("run lockwarden doctor");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.contains("watchdog"))
        .unwrap_or_else(|| panic!("no watchdog line in:\n{text}"))
        .to_string()
}

/// doctor: without `watchdog_device`, leases on network storage are reported unprotected
/// against a VM that cannot be stopped; with one, it says the host resets instead.
#[test]
fn doctor_says_what_is_unprotected_without_a_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    fs::write(&img, vec![0u8; 4096]).unwrap();
    let d = TestDaemon::verbose("heartbeat_interval_ms = 1000\n");
    let line = doctor_watchdog_line(&d, dir.path());
    assert!(
        line.starts_with("OK") && line.contains("no lease is on network storage"),
        "{line}"
    );
    let q = common::proto::sleeper();
    acquire(
        &d,
        &owner_for(q.pid(), "vm-nfs"),
        &img,
        FailureAction::Default,
    );
    let line = doctor_watchdog_line(&d, dir.path());
    assert!(line.starts_with("WARN"), "{line}");
    assert!(
        line.contains(
            "a VM that cannot be killed during a partition is not stopped; set watchdog_device"
        ) && line.contains("(nfs4)"),
        "{line}"
    );
    drop(d);
    let fifo = Fifo::new();
    let d = TestDaemon::verbose(&conf(&fifo.path));
    let line = doctor_watchdog_line(&d, dir.path());
    assert!(
        line.starts_with("OK") && line.contains(&fifo.path.display().to_string()),
        "{line}"
    );
    drop(q);
}

/// A crash (SIGKILL) closes the device without the magic close, so a real watchdog stays
/// armed; a restarted lockwardend opens it again and feeds it.
#[test]
fn a_crash_leaves_the_watchdog_armed_and_a_restarted_daemon_feeds_it() {
    let fifo = Fifo::new();
    let d = TestDaemon::verbose(&conf(&fifo.path));
    let t0 = Instant::now();
    d.wait_for("keep-alives", || fifo.since(t0).len() >= 3);
    common::proto::signal(d.pid(), libc::SIGKILL);
    let killed = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        fifo.all().iter().all(|(_, b)| *b == b'.'),
        "a magic close after a crash"
    );
    let d2 = TestDaemon::verbose(&conf(&fifo.path));
    d2.wait_for("keep-alives from the restarted daemon", || {
        fifo.since(killed + Duration::from_millis(300)).len() >= 3
    });
    eprintln!(
        "crash to the restarted daemon's first keep-alive (restart 300 ms after the crash): {:?}",
        fifo.since(killed)
            .first()
            .map(|(t, _)| t.duration_since(killed))
    );
    drop(d);
}

/// A live re-exec whose configuration no longer names the device disarms it (magic close).
#[test]
fn a_reexec_without_watchdog_device_disarms_it() {
    let fifo = Fifo::new();
    let d = TestDaemon::verbose(&conf(&fifo.path));
    let t0 = Instant::now();
    d.wait_for("keep-alives", || fifo.since(t0).len() >= 2);
    fs::write(
        d.dir.join("lockwardend.conf"),
        format!("heartbeat_interval_ms = {INTERVAL_MS}\nfence_after_ms = {FENCE_AFTER_MS}\n"),
    )
    .unwrap();
    common::proto::signal(d.pid(), libc::SIGUSR1);
    d.wait_for("the re-exec", || {
        d.log().contains("live re-exec #1 complete")
    });
    d.wait_for("the magic close", || {
        fifo.all().last().is_some_and(|(_, b)| *b == b'V')
    });
    let after = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    assert!(fifo.since(after).is_empty(), "fed after the magic close");
    assert!(
        d.log()
            .contains("after the re-exec: closing watchdog_device")
    );
}

/// A lock the lost-lock probe found lost (not through a partition): the paused VM is stopped,
/// so keep-alives go on; resumed by hand while the lock is still lost, it withholds them.
#[test]
fn a_vm_resumed_on_a_lost_lock_withholds_the_keepalives() {
    common::fuse::prerequisites("tests/watchdog.rs");
    let fifo = Fifo::new();
    let d = TestDaemon::verbose(&format!(
        "{}lease_check_interval_ms = 200\n",
        conf(&fifo.path).replace("lease_check_interval_ms = 0\n", "")
    ));
    let x = Fs::mount("lw-wd", BOUND);
    let q = common::proto::sleeper();
    acquire(
        &d,
        &owner_for(q.pid(), "vm-lost"),
        &x.image("l.img"),
        FailureAction::Pause,
    );
    x.set("lost l.img\n");
    d.wait_for("the loss", || d.log().contains("is LOST"));
    d.wait_for("the VM stopped", || {
        states(q.pid()).iter().all(|c| *c == 'T')
    });
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        fifo.since(t0).len() >= 2,
        "keep-alives stopped although the VM is stopped:\n{}",
        d.log()
    );
    // The operator resumes it while the lock is still lost.
    common::proto::signal(q.pid(), libc::SIGCONT);
    let resumed = Instant::now();
    d.wait_for("the WATCHDOG error", || {
        d.log().contains("WATCHDOG: keep-alives")
    });
    let late = fifo.since(resumed + Duration::from_millis(200));
    assert!(
        late.is_empty(),
        "fed while a VM runs on a lost lock: {late:?}"
    );
    assert!(
        d.log()
            .contains("its lock was lost and has not been taken back"),
        "{}",
        d.log()
    );
}
