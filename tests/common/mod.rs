//! The shared test harness: one daemon builder (`daemon::TestDaemon`), one C-host wrapper
//! driving the real plugin (`host::Host`), one poll-until loop (`wait`), the protocol helpers
//! (`proto`), FUSE file systems (`fuse`), lock probes (`locks`), and a small helper process
//! that speaks the wire protocol directly.
//!
//! Everything spawned here is owned by a guard whose `Drop` kills it, so a failing test leaves no
//! daemon, host or owner process behind. When a test panics, the guards print the logs of what
//! they owned (daemon stderr, host stderr) to make the failure readable.

#![allow(dead_code)]

pub mod daemon;
pub mod fuse;
pub mod host;
pub mod locks;
pub mod proto;
pub mod wait;

#[allow(unused_imports)]
pub use host::Host;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::thread;
use std::time::Duration;

use lockwarden::protocol::{
    self, FailureAction, LeaseMode, LeaseSpec, LockTarget, Owner, Request, ResourceKind, Response,
};

/// Make `cmd` drop its supplementary groups and switch to gid and uid `uid` before exec (a
/// client or helper of another user); the spawn fails when the kernel refuses.
pub fn run_as(cmd: &mut Command, uid: u32) {
    // SAFETY: only async-signal-safe libc calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Assert that `text` mentions every one of `needles` (naming the first one missing).
#[track_caller]
pub fn assert_mentions(text: &str, needles: &[impl AsRef<str>]) {
    for needle in needles {
        let needle = needle.as_ref();
        assert!(text.contains(needle), "{needle:?} missing in {text:?}");
    }
}

/// libvirt's VIR_ERR_RESOURCE_BUSY.
pub const CODE_BUSY: i32 = 87;
/// libvirt's VIR_FROM_LOCKING.
pub const DOMAIN_LOCKING: i32 = 42;

/// How long one host command may take before the harness declares a hang. The plugin's own
/// request timeout defaults to 30 s, so anything beyond that is a bug.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(90);
/// Generous bound for anything we poll for (a lease being freed, a process dying).
pub const POLL_BOUND: Duration = Duration::from_secs(30);

/// The plugin under test: `deps/liblockwarden.so` beside this test binary (`cargo test`
/// refreshes it there but copies it up to `target/debug/` only on `cargo build`), else the
/// copy in `target/debug/`.
pub fn plugin_path() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a parent directory");
    let fresh = deps.join("liblockwarden.so");
    let so = if fresh.exists() {
        fresh
    } else {
        deps.parent()
            .expect("deps has a parent directory")
            .join("liblockwarden.so")
    };
    assert!(
        so.exists(),
        "plugin {} does not exist; build the cdylib (cargo build) before running the scenarios",
        so.display()
    );
    so
}

/// The C test host compiled by build.rs from tests/c/host.c.
pub fn host_path() -> PathBuf {
    let Some(host) = option_env!("LOCKWARDEN_TEST_HOST") else {
        panic!(
            "LOCKWARDEN_TEST_HOST is unset: build.rs compiles the C test host only when \
             tests/c/host.c exists"
        );
    };
    let p = PathBuf::from(host);
    assert!(p.exists(), "C test host {} does not exist", p.display());
    p
}

/// The daemon binary.
pub fn daemon_path() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lockwardend"))
}

static COUNTER: AtomicU32 = AtomicU32::new(1);

/// A domain as libvirt describes it to the plugin. `pid` is filled in by `Host::start`.
#[derive(Clone, Debug)]
pub struct Vm {
    pub name: String,
    pub uuid: String,
    pub id: u32,
    pub pid: i32,
}

impl Vm {
    /// A VM with a unique name, UUID and id (unique within this test process).
    pub fn new(label: &str) -> Vm {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        Vm {
            name: format!("{label}-{n}"),
            uuid: format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), n),
            id: n,
            pid: 0,
        }
    }

    /// "NAME UUID ID" for the host.
    pub fn head(&self) -> String {
        format!("{} {} {}", esc(&self.name), self.uuid, self.id)
    }
}

/// Escape bytes for a host token: everything but printable non-space ASCII (and `%`, `:`) as
/// `%XX`.
pub fn esc_bytes(bytes: &[u8]) -> String {
    let mut s = String::new();
    for &b in bytes {
        if b.is_ascii_graphic() && b != b'%' && b != b':' {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

pub fn esc(s: &str) -> String {
    esc_bytes(s.as_bytes())
}

pub fn esc_path(p: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    esc_bytes(p.as_os_str().as_bytes())
}

/// `disk:PATH` (exclusive).
pub fn disk(p: &Path) -> String {
    format!("disk:{}", esc_path(p))
}
/// `disk-ro:PATH` (READONLY).
pub fn disk_ro(p: &Path) -> String {
    format!("disk-ro:{}", esc_path(p))
}
/// `disk-shared:PATH` (SHARED).
pub fn disk_shared(p: &Path) -> String {
    format!("disk-shared:{}", esc_path(p))
}
/// `lease:KEY:DIR:OFFSET[:LOCKSPACE]`.
pub fn lease(key: &str, dir: &Path, offset: u64, lockspace: Option<&str>) -> String {
    let mut s = format!("lease:{}:{}:{}", esc(key), esc_path(dir), offset);
    if let Some(ls) = lockspace {
        s.push(':');
        s.push_str(&esc(ls));
    }
    s
}

/// One reply line of the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Ok(String),
    Err {
        code: i32,
        domain: i32,
        message: String,
    },
}

impl Reply {
    pub fn parse(line: &str) -> Reply {
        if line == "OK" {
            return Reply::Ok(String::new());
        }
        if let Some(rest) = line.strip_prefix("OK ") {
            return Reply::Ok(rest.to_string());
        }
        if let Some(rest) = line.strip_prefix("ERR ") {
            let mut it = rest.splitn(3, ' ');
            let code = it.next().and_then(|c| c.parse().ok());
            let domain = it.next().and_then(|c| c.parse().ok());
            let message = it.next().unwrap_or("").to_string();
            if let (Some(code), Some(domain)) = (code, domain) {
                return Reply::Err {
                    code,
                    domain,
                    message,
                };
            }
        }
        panic!("host reply is neither `OK ...` nor `ERR <code> <domain> <msg>`: {line:?}");
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, Reply::Ok(_))
    }

    /// The ERR parts, panicking with `what` when the reply is OK.
    pub fn expect_err(&self, what: &str) -> (i32, i32, String) {
        match self {
            Reply::Err {
                code,
                domain,
                message,
            } => (*code, *domain, message.clone()),
            Reply::Ok(x) => panic!("{what}: expected an error, got OK {x:?}"),
        }
    }

    /// Assert a busy error (code 87, domain 42) and return its message.
    pub fn expect_busy(&self, what: &str) -> String {
        let (code, domain, message) = self.expect_err(what);
        assert_eq!(
            (code, domain),
            (CODE_BUSY, DOMAIN_LOCKING),
            "{what}: expected ERR 87 42 (resource busy, locking domain), got ERR {code} {domain} {message}"
        );
        message
    }

    pub fn expect_ok(&self, what: &str) -> &str {
        match self {
            Reply::Ok(x) => x.as_str(),
            Reply::Err {
                code,
                domain,
                message,
            } => panic!("{what}: expected OK, got ERR {code} {domain} {message}"),
        }
    }
}

/// Print a log file (used by guards when the test is panicking).
pub(crate) fn dump_log(what: &str, path: &Path) {
    match fs::read_to_string(path) {
        Ok(s) => eprintln!(
            "----- {what} ({}) -----\n{s}----- end {what} -----",
            path.display()
        ),
        Err(e) => eprintln!("----- {what}: cannot read {}: {e}", path.display()),
    }
}

/// A private, world-traversable temp dir (so a non-root host can reach files when a test wants).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lw-scn-")
        .tempdir()
        .expect("creating a temp dir")
}

/// Make `p` readable/traversable by everybody (for the non-root scenarios).
pub fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {:o} {}: {e}", mode, p.display()));
}

/// Result of an OFD lock probe on a byte range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    Unlocked,
    ReadLocked,
    WriteLocked,
}

/// Ask the kernel (F_OFD_GETLK) whether a write lock on `[start, start+len)` would conflict, and
/// with what. Takes no lock itself, so it never disturbs anybody.
pub fn probe(path: &Path, start: i64, len: i64) -> Probe {
    let f =
        fs::File::open(path).unwrap_or_else(|e| panic!("open {} for probing: {e}", path.display()));
    // SAFETY: flock is plain data; zeroed is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    fl.l_pid = 0;
    // SAFETY: valid fd and a valid flock pointer.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert_eq!(
        rc,
        0,
        "F_OFD_GETLK on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    match fl.l_type as i32 {
        libc::F_UNLCK => Probe::Unlocked,
        libc::F_RDLCK => Probe::ReadLocked,
        libc::F_WRLCK => Probe::WriteLocked,
        other => panic!("F_OFD_GETLK returned l_type {other}"),
    }
}

/// Byte 0 of `path`, the lease byte.
pub fn probe0(path: &Path) -> Probe {
    probe(path, 0, 1)
}

/// Poll until byte 0 of `path` is unlocked; returns the delay.
pub fn wait_unlocked(path: &Path, bound: Duration) -> Option<Duration> {
    wait::poll(bound, || (probe0(path) == Probe::Unlocked).then_some(())).map(|((), took)| took)
}

/// Create an image file with some content.
pub fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, vec![0u8; 4096]).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    p
}

// ---------------------------------------------------------------------------------------------
// The helper process: this very test binary re-executed with LW_SCENARIO_HELPER=1, running the
// ignored test `helper_process` which reads commands on stdin. It is a separate process whose
// pid can be an owner, that can close its lifetime handle while alive, hold POSIX locks, or run
// as another uid — none of which the C host can express.
// ---------------------------------------------------------------------------------------------

pub const HELPER_ENV: &str = "LW_SCENARIO_HELPER";
const HELPER_PREFIX: &str = "@@ ";

pub struct Helper {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pub pid: i32,
}

impl Helper {
    /// A helper that connected to `socket` and registered itself as owner `name` (restricted,
    /// as libvirt's forked child does): the helper and the VM it stands for. With
    /// `ignore_term`, it ignores SIGTERM first.
    pub fn registered(socket: &Path, name: &str, ignore_term: bool) -> (Helper, Vm) {
        let mut h = Helper::spawn(None);
        if ignore_term {
            assert_eq!(h.cmd("ignore-term"), "OK");
        }
        let vm = Vm {
            pid: h.pid,
            ..Vm::new(name)
        };
        assert_eq!(h.cmd(&format!("connect {}", esc_path(socket))), "OK");
        let r = h.cmd(&format!(
            "register {} {} {} 1",
            esc(&vm.name),
            vm.uuid,
            vm.id
        ));
        assert!(r.starts_with("OK"), "helper owner {name} registers: {r}");
        (h, vm)
    }

    pub fn spawn(uid: Option<u32>) -> Helper {
        let exe = std::env::current_exe().expect("current_exe");
        let mut cmd = Command::new(&exe);
        cmd.args([
            "helper_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        if let Some(uid) = uid {
            run_as(&mut cmd, uid);
        }
        let mut child = cmd.spawn().expect("spawning the helper process");
        let stdout = child.stdout.take().expect("helper stdout");
        let stdin = child.stdin.take();
        let (tx, rx) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(l) = line else { break };
                // libtest may print "test helper_process ... " on the same line first.
                if let Some(i) = l.find(HELPER_PREFIX) {
                    let m = &l[i + HELPER_PREFIX.len()..];
                    if tx.send(m.to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        let pid = child.id() as i32;
        let mut h = Helper {
            child: Some(child),
            stdin,
            lines: rx,
            pid,
        };
        let hello = h.cmd("pid");
        assert_eq!(hello, format!("OK {pid}"), "helper handshake");
        h
    }

    pub fn cmd(&mut self, line: &str) -> String {
        let stdin = self.stdin.as_mut().expect("helper stdin");
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("writing {line:?} to the helper: {e}"));
        match self.lines.recv_timeout(CMD_TIMEOUT) {
            Ok(l) => l,
            Err(e) => panic!("helper gave no answer to {line:?}: {e:?}"),
        }
    }

    /// Non-blocking: has the helper exited, and how?
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The helper's command loop (runs inside the re-executed test binary).
pub fn helper_main() {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let mut conn: Option<UnixStream> = None;
    let mut posix: Vec<(String, fs::File)> = Vec::new();
    let me = std::process::id();
    let mut owner = Owner {
        uuid: String::new(),
        name: String::new(),
        id: 0,
        pid: me,
    };
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<String> = line.split(' ').map(unesc).collect();
        let w = |i: usize| words.get(i).cloned().unwrap_or_default();
        let reply = match w(0).as_str() {
            "pid" => format!("OK {me}"),
            "ignore-term" => {
                // SAFETY: installing SIG_IGN for SIGTERM has no preconditions.
                unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
                "OK".to_string()
            }
            "connect" => match UnixStream::connect(w(1)) {
                Ok(s) => {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
                    conn = Some(s);
                    "OK".to_string()
                }
                Err(e) => format!("ERR connect: {e}"),
            },
            "register" => {
                owner.name = w(1);
                owner.uuid = w(2);
                owner.id = w(3).parse().unwrap_or(1);
                let req = Request::Register {
                    owner: owner.clone(),
                    restrict: w(4) == "1",
                };
                roundtrip(&mut conn, &req)
            }
            "acquire-self" => {
                let path = w(1);
                let req = Request::Acquire {
                    owner: owner.clone(),
                    leases: vec![LeaseSpec {
                        name: path.clone(),
                        kind: ResourceKind::Disk,
                        mode: LeaseMode::Exclusive,
                        target: LockTarget::File { path },
                    }],
                    action: FailureAction::Default,
                    restrict: false,
                };
                roundtrip(&mut conn, &req)
            }
            "status" => roundtrip(&mut conn, &Request::Status),
            "list" => roundtrip(&mut conn, &Request::List),
            "inquire" => roundtrip(
                &mut conn,
                &Request::Inquire {
                    owner: owner.clone(),
                },
            ),
            "close" => {
                conn = None;
                "OK".to_string()
            }
            "posix-lock" => {
                let path = w(1);
                match fs::OpenOptions::new().read(true).write(true).open(&path) {
                    Ok(f) => {
                        // SAFETY: zeroed flock is valid plain data.
                        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
                        fl.l_type = libc::F_WRLCK as libc::c_short;
                        fl.l_whence = libc::SEEK_SET as libc::c_short;
                        fl.l_start = 0;
                        fl.l_len = 1;
                        // SAFETY: valid fd, valid flock pointer.
                        let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) };
                        if rc == 0 {
                            posix.push((path, f));
                            "OK".to_string()
                        } else {
                            let e = std::io::Error::last_os_error();
                            format!("ERR {} {e}", e.raw_os_error().unwrap_or(0))
                        }
                    }
                    Err(e) => format!("ERR open: {e}"),
                }
            }
            "posix-unlock" => {
                let path = w(1);
                posix.retain(|(p, _)| *p != path);
                "OK".to_string()
            }
            other => format!("ERR unknown helper command {other:?}"),
        };
        let _ = writeln!(out, "{HELPER_PREFIX}{}", reply.replace('\n', "\\n"));
        let _ = out.flush();
    }
}

fn roundtrip(conn: &mut Option<UnixStream>, req: &Request) -> String {
    let Some(s) = conn.as_mut() else {
        return "ERR not connected".to_string();
    };
    if let Err(e) = protocol::write_message(s, req) {
        return format!("CLOSED write: {e}");
    }
    match protocol::read_message::<_, Response>(s) {
        Ok(Response::Ok { leases }) => format!("OK {}", leases.len()),
        Ok(Response::Status(st)) => format!("OK status pid {}", st.pid),
        Ok(Response::Metrics(m)) => format!("OK metrics pid {}", m.pid),
        Ok(Response::Error(e)) => format!(
            "ERR {} {}",
            serde_json::to_string(&e.kind).unwrap_or_default(),
            e.message
        ),
        Err(protocol::FrameError::Eof) => "CLOSED eof".to_string(),
        Err(e) => format!("CLOSED {e}"),
    }
}

/// Undo `esc`.
fn unesc(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
