//! The keeper link against hostile neighbours and its own failures (issue 13, findings 3 and 9),
//! with the real lockwardend:
//! - the socket and pid-file directories must be private: one writable by group or others, or
//!   owned by another user, stops the start with a message naming the directory;
//! - a process of another uid listening on the keeper's path is never handed a descriptor: the
//!   daemon checks SO_PEERCRED on every connect and starts its own keeper instead;
//! - a keeper link that broke on the daemon's side (a keeper that stopped reading, so a send
//!   timed out) is re-established by the daemon itself, without a new request, and a stop
//!   afterwards leaves every VM's disk locked.

mod common;

use common::daemon::{Opts, TestDaemon};
use common::proto::{BOUND, Client, Proc, byte0, eventually, excl, ok, owner_for, sleeper};
use lockwarden::protocol::{self, FailureAction, LeaseSpec, Request, Response};
use std::ffi::CString;
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

/// The uid of the hostile neighbour.
const NOBODY: u32 = 65534;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "these tests run as root");
}

/// A lockwardend laid out in `top` (config, log) whose sockets live in `run` and whose pid file
/// is `pid_file`; returns once it runs, without waiting for it to serve.
fn spawn(top: &Path, run: &Path, pid_file: &Path) -> TestDaemon {
    TestDaemon::with(Opts {
        dir: Some(top),
        run: Some(run),
        pid_file: Some(pid_file),
        no_wait: true,
        ..Opts::default()
    })
}

/// A lockwardend laid out in `top` with its sockets and pid file in `run`, serving.
fn start(top: &Path, run: &Path) -> TestDaemon {
    TestDaemon::with(Opts {
        dir: Some(top),
        run: Some(run),
        ..Opts::default()
    })
}

/// A client that waits long enough for a daemon stuck on a stopped keeper (two 10 s socket
/// timeouts in a row).
fn slow_client(d: &TestDaemon) -> Client {
    let c = Client::connect(&d.socket);
    c.0.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("read timeout");
    c
}

/// The pid in the last "keeper (pid N)" start line of the log (waiting until there is one).
fn keeper_pid(d: &TestDaemon) -> u32 {
    let mut pid = None;
    eventually("the daemon names its keeper", || {
        pid = d.logged_keeper_pid();
        pid.is_some()
    });
    pid.unwrap_or(0)
}

fn chown(p: &Path, uid: u32) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: chown(2) with a NUL-terminated path that outlives the call.
    assert_eq!(
        unsafe { libc::chown(c.as_ptr(), uid, uid) },
        0,
        "chown {p:?}"
    );
}

fn mkdir(p: &Path, mode: u32, uid: u32) {
    fs::create_dir_all(p).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    chown(p, uid);
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a pid this test started (directly or through the daemon).
    assert_eq!(
        unsafe { libc::kill(pid as libc::pid_t, sig) },
        0,
        "kill {pid}"
    );
}

/// Start a daemon that must refuse to start; returns its log.
fn refused(top: &Path, run: &Path, pid_file: &Path) -> String {
    let mut d = spawn(top, run, pid_file);
    let st = d.proc.wait_for(BOUND).expect("lockwardend did not exit");
    assert!(!st.success(), "lockwardend started:\n{}", d.log());
    d.log()
}

// ---------------------------------------------------------------------------------------------
// Finding 3: private directories

#[test]
fn a_socket_directory_others_can_write_or_own_is_refused() {
    require_root();
    for (mode, uid, why) in [
        (0o777, 0, "writable by others"),
        (0o1777, 0, "writable by others"),
        (0o770, 0, "writable by its group"),
        (0o700, NOBODY, "owned by uid 65534"),
    ] {
        let top = tempfile::tempdir().unwrap();
        let run = top.path().join("run");
        mkdir(&run, mode, uid);
        let log = refused(top.path(), &run, &top.path().join("lockwardend.pid"));
        assert!(
            log.contains("refusing to use") && log.contains(&format!("{run:?}")),
            "mode {mode:o} uid {uid}: the refusal names the directory:\n{log}"
        );
        assert!(log.contains(why), "mode {mode:o} uid {uid}: {why}:\n{log}");
        assert!(log.contains("chmod 0700"), "says what to do:\n{log}");
        assert!(
            !run.join("lockwardend.sock").exists() && !run.join("lockwardend-keeper.sock").exists(),
            "nothing was bound in {run:?}"
        );
    }
}

/// As root, a new top directory with a private (0700, root-owned) `run` directory in it.
fn fresh_run() -> (tempfile::TempDir, PathBuf) {
    require_root();
    let top = tempfile::tempdir().unwrap();
    let run = top.path().join("run");
    mkdir(&run, 0o700, 0);
    (top, run)
}

#[test]
fn a_pid_file_in_a_shared_directory_or_a_planted_link_is_refused() {
    let (top, run) = fresh_run();
    let shared = top.path().join("shared");
    mkdir(&shared, 0o1777, 0);
    let log = refused(top.path(), &run, &shared.join("lockwardend.pid"));
    assert!(
        log.contains("the pid file") && log.contains(&format!("{shared:?}")),
        "{log}"
    );
    // A pid file that is a hard link to another file is never truncated.
    let victim = top.path().join("victim");
    fs::write(&victim, "precious bytes").unwrap();
    let pid_file = run.join("lockwardend.pid");
    fs::hard_link(&victim, &pid_file).unwrap();
    let log = refused(top.path(), &run, &pid_file);
    assert!(log.contains("hard links"), "{log}");
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious bytes");
    fs::remove_file(&pid_file).unwrap();
    // The private directory itself is fine.
    let d = start(top.path(), &run);
    assert!(
        fs::read_to_string(&pid_file)
            .unwrap()
            .contains(&d.proc.pid().to_string())
    );
}

// ---------------------------------------------------------------------------------------------
// Finding 3: a listener of another uid on the keeper's path

/// A process killed and reaped on drop (forked by this test, not spawned).
struct Forked(libc::pid_t);

impl Drop for Forked {
    fn drop(&mut self) {
        // SAFETY: kill and waitpid on our own child.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            libc::waitpid(self.0, std::ptr::null_mut(), 0);
        }
    }
}

/// A fake keeper: bound at `path` as root (then chown'ed), listening as uid 65534, answering
/// every message like a version 2 keeper. It writes `L` to the returned pipe once it listens
/// and `F` whenever a message carried descriptors.
fn fake_keeper(path: &Path) -> (Forked, File) {
    let addr = common::proto::sockaddr(path);
    let cpath = CString::new(path.as_os_str().as_bytes()).unwrap();
    let ack = br#"{"ok":true,"pid":4242,"held":0,"version":2}"#.to_vec();
    let mut buf = vec![0u8; 512 * 1024];
    let mut cmsg = vec![0u64; 1024];
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two-element array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let [r, w] = fds;
    // SAFETY: the child makes only raw, async-signal-safe syscalls on buffers allocated before
    // the fork, and ends with _exit (or is killed).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: as above.
        unsafe {
            libc::close(r);
            let s = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if s < 0 || libc::bind(s, (&addr as *const libc::sockaddr_un).cast(), len) != 0 {
                libc::_exit(1);
            }
            libc::chown(cpath.as_ptr(), NOBODY, NOBODY);
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
                || libc::listen(s, 16) != 0
            {
                libc::_exit(2);
            }
            libc::write(w, b"L".as_ptr().cast(), 1);
            loop {
                let c = libc::accept(s, std::ptr::null_mut(), std::ptr::null_mut());
                if c < 0 {
                    continue;
                }
                loop {
                    let mut iov = libc::iovec {
                        iov_base: buf.as_mut_ptr().cast(),
                        iov_len: buf.len(),
                    };
                    let mut msg: libc::msghdr = std::mem::zeroed();
                    msg.msg_iov = &mut iov;
                    msg.msg_iovlen = 1;
                    msg.msg_control = cmsg.as_mut_ptr().cast();
                    msg.msg_controllen = cmsg.len() * 8;
                    let n = libc::recvmsg(c, &mut msg, 0);
                    if n < 0 {
                        break;
                    }
                    if msg.msg_controllen > 0 {
                        libc::write(w, b"F".as_ptr().cast(), 1);
                    }
                    if n == 0 && msg.msg_controllen == 0 {
                        break;
                    }
                    libc::send(c, ack.as_ptr().cast(), ack.len(), libc::MSG_NOSIGNAL);
                }
                libc::close(c);
            }
        }
    }
    let child = Forked(pid);
    // SAFETY: `w` is our copy of the write end; `r` is ours to own.
    let mut out = unsafe {
        libc::close(w);
        <File as std::os::fd::FromRawFd>::from_raw_fd(r)
    };
    let mut b = [0u8; 1];
    out.read_exact(&mut b).expect("the fake keeper listens");
    assert_eq!(&b, b"L");
    // From now on, reads must not wait: "nothing arrived" is an answer.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(out.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    (child, out)
}

/// Reports of the fake keeper so far.
fn reports(out: &mut File) -> String {
    let mut b = [0u8; 64];
    match out.read(&mut b) {
        Ok(n) => String::from_utf8_lossy(&b[..n]).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => String::new(),
        Err(e) => panic!("reading the fake keeper's reports: {e}"),
    }
}

#[test]
fn a_keeper_path_bound_by_another_uid_is_never_handed_a_descriptor() {
    let (top, run) = fresh_run();
    let keeper = run.join("lockwardend-keeper.sock");
    let (_fake, mut out) = fake_keeper(&keeper);
    let d = start(top.path(), &run);
    let img = top.path().join("vm.img");
    fs::write(&img, vec![0u8; 4096]).unwrap();
    let vm = sleeper();
    let owner = owner_for(vm.pid(), "victim-of-a-fake-keeper");
    ok(slow_client(&d).call(&Request::Acquire {
        owner: owner.clone(),
        leases: vec![excl(&img)],
        action: FailureAction::Default,
        restrict: false,
    }));
    // Whatever reached the fake, it got no descriptor (an old daemon sent the image's).
    assert_eq!(
        reports(&mut out),
        "",
        "the fake keeper received descriptors"
    );
    let log = d.log();
    assert!(
        log.contains("runs as uid 65534") && log.contains("handed nothing"),
        "the refusal is logged:\n{log}"
    );
    // The daemon runs its own keeper there now, and that one holds the lease: a SIGKILL of
    // the daemon leaves the disk locked.
    let meta = fs::symlink_metadata(&keeper).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 0);
    let keeper_pid = keeper_pid(&d);
    let mut d = d;
    signal(d.proc.pid(), libc::SIGKILL);
    d.proc.wait_for(BOUND).expect("the daemon died");
    assert_eq!(
        byte0(&img),
        libc::F_WRLCK,
        "the daemon's own keeper holds it"
    );
    signal(keeper_pid, libc::SIGKILL);
    eventually("the keeper's lock drops", || byte0(&img) == libc::F_UNLCK);
}

// ---------------------------------------------------------------------------------------------
// Finding 9: a link broken on the daemon's side

/// Kills a process when the test fails while it lives.
struct KillOnPanic(u32);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if thread::panicking() {
            // SAFETY: kill(2) on a pid this test stopped; no memory involved.
            unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// `n` disk images with long paths (their records make large keeper messages).
fn fillers(top: &Path, n: usize) -> Vec<PathBuf> {
    let mut dir = top.join("fill");
    for c in ['a', 'b', 'c'] {
        dir = dir.join(c.to_string().repeat(200));
    }
    fs::create_dir_all(&dir).unwrap();
    (0..n)
        .map(|i| {
            let p = dir.join(format!("{i:04}-{}.img", "x".repeat(120)));
            fs::write(&p, b"").unwrap();
            p
        })
        .collect()
}

/// Stop the keeper and churn leases until a send to it times out on the daemon's side (the
/// daemon logs "lost the keeper"). Returns the keeper's pid (stopped).
fn break_the_link(d: &TestDaemon, top: &Path) -> u32 {
    let keeper = keeper_pid(d);
    signal(keeper, libc::SIGSTOP);
    // A stopped keeper would outlive a failing test (it waits for its VMs): kill it then.
    let _guard = KillOnPanic(keeper);
    let files = fillers(top, 256);
    let specs: Vec<LeaseSpec> = files.iter().map(|f| excl(f)).collect();
    let filler = sleeper();
    let owner = owner_for(filler.pid(), "filler");
    // The daemon's send buffer is 2 MiB; each round sends ~250 KiB of records.
    for _ in 0..400 {
        if d.log().contains("lost the keeper") {
            // The filler exits: its leases go, only the VM's stays.
            drop(filler);
            return keeper;
        }
        for req in [
            Request::Acquire {
                owner: owner.clone(),
                leases: specs.clone(),
                action: FailureAction::Default,
                restrict: false,
            },
            Request::Release {
                owner: owner.clone(),
                leases: specs.clone(),
            },
        ] {
            if d.log().contains("lost the keeper") {
                drop(filler);
                return keeper;
            }
            let mut c = slow_client(d);
            let answered = protocol::write_message(&mut c.0, &req)
                .map_err(|e| format!("{e:?}"))
                .and_then(|()| {
                    protocol::read_message::<_, Response>(&mut c.0).map_err(|e| format!("{e:?}"))
                });
            if let Err(e) = answered {
                panic!("a filler request failed: {e}\n{}", d.log());
            }
        }
    }
    panic!("the keeper link never broke:\n{}", d.log());
}

fn vm_with_disk(d: &TestDaemon, top: &Path) -> (Proc, PathBuf) {
    let img = top.join("vm.img");
    fs::write(&img, vec![0u8; 4096]).unwrap();
    let vm = sleeper();
    ok(slow_client(d).call(&Request::Acquire {
        owner: owner_for(vm.pid(), "vm"),
        leases: vec![excl(&img)],
        action: FailureAction::Default,
        restrict: false,
    }));
    assert_eq!(byte0(&img), libc::F_WRLCK);
    (vm, img)
}

#[test]
fn a_keeper_link_broken_on_the_daemon_side_is_re_established_by_itself() {
    let (top, run) = fresh_run();
    let mut d = start(top.path(), &run);
    let (_vm, img) = vm_with_disk(&d, top.path());
    let old = break_the_link(&d, top.path());
    // The stopped keeper dies: only the daemon's own descriptor still locks the VM's disk.
    signal(old, libc::SIGKILL);
    // No request from here on: the daemon starts a keeper and hands it every lease by itself.
    let before = d.log().matches("holds all").count();
    eventually(
        "the daemon hands every lease to a new keeper by itself",
        || d.log().matches("holds all").count() > before,
    );
    let new = keeper_pid(&d);
    assert_ne!(new, old, "{}", d.log());
    // A stop now leaves the VM's disk locked: the new keeper holds it.
    signal(d.proc.pid(), libc::SIGTERM);
    let st = d.proc.wait_for(BOUND).expect("the daemon stops");
    assert!(st.success(), "{}", d.log());
    assert_eq!(
        byte0(&img),
        libc::F_WRLCK,
        "the VM's disk stays locked after the stop:\n{}",
        d.log()
    );
    signal(new, libc::SIGKILL);
}

#[test]
fn a_stop_right_after_the_link_broke_still_leaves_every_lease_with_a_keeper() {
    let (top, run) = fresh_run();
    let mut d = start(top.path(), &run);
    let (_vm, img) = vm_with_disk(&d, top.path());
    let old = break_the_link(&d, top.path());
    signal(old, libc::SIGKILL);
    // Stop at once, whether or not the daemon re-established the link yet.
    signal(d.proc.pid(), libc::SIGTERM);
    let st = d
        .proc
        .wait_for(Duration::from_secs(90))
        .expect("the daemon stops");
    assert!(st.success(), "{}", d.log());
    assert_eq!(
        byte0(&img),
        libc::F_WRLCK,
        "the VM's disk stays locked after the stop:\n{}",
        d.log()
    );
    let new = keeper_pid(&d);
    assert_ne!(new, old);
    signal(new, libc::SIGKILL);
}
