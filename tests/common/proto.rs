//! Shared harness for the protocol-level suites (daemon, holder, hostile, reliability): owner
//! processes killed on drop, owners, one protocol connection, lease specs and lock probes.
//! Each suite keeps its own `Daemon` (they start lockwardend differently).

use lockwarden::protocol::{
    self, ErrorKind, ErrorReply, LeaseInfo, LeaseMode, LeaseSpec, LockTarget, Owner, Request,
    ResourceKind, Response,
};
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How long any single wait in these helpers may take before the test fails.
pub const BOUND: Duration = Duration::from_secs(30);

/// A child process killed and reaped on drop.
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Wait for the exit (bounded); None if it is still running after `limit`.
    pub fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(st) = self.0.try_wait().unwrap() {
                return Some(st);
            }
            thread::sleep(Duration::from_millis(5));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process that stands for a QEMU: the owner pid of requests.
pub fn sleeper() -> Proc {
    Proc(
        Command::new("sleep")
            .arg("1000")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning sleep"),
    )
}

pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid we own and a valid signal number.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, sig) }, 0);
}

/// Is `pid` a live (not zombie) process?
pub fn running(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rfind(')')
                .and_then(|i| s.get(i + 1..))
                .and_then(|rest| rest.split_whitespace().next().map(str::to_string));
            !matches!(state.as_deref(), Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

static SEQ: AtomicU32 = AtomicU32::new(1);

/// A number unique within the test binary (owner ids, names).
pub fn next_seq() -> u32 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// An owner for process `pid`, with a UUID and id unique within the test binary.
pub fn owner_for(pid: u32, name: &str) -> Owner {
    let n = next_seq();
    Owner {
        uuid: format!(
            "c7a5fdbd-cdaf-9455-926a-{:012x}",
            (u64::from(pid) << 16) | u64::from(n)
        ),
        name: name.to_string(),
        id: n,
        pid,
    }
}

/// A running owner process and how the daemon knows it.
pub struct Vm {
    pub owner: Owner,
    pub proc: Proc,
}

pub fn vm(name: &str) -> Vm {
    let proc = sleeper();
    Vm {
        owner: owner_for(proc.pid(), name),
        proc,
    }
}

/// One connection speaking the protocol.
pub struct Client(pub UnixStream);

impl Client {
    pub fn connect(path: &Path) -> Client {
        let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {path:?}: {e}"));
        s.set_read_timeout(Some(BOUND)).expect("read timeout");
        s.set_write_timeout(Some(BOUND)).expect("write timeout");
        Client(s)
    }

    pub fn call(&mut self, req: &Request) -> Response {
        protocol::write_message(&mut self.0, req).expect("sending a request");
        protocol::read_message(&mut self.0).expect("reading the response")
    }

    /// The leases `owner` holds (Inquire: Acquire/Release answers carry no lease list).
    pub fn held(&mut self, owner: &Owner) -> Vec<LeaseInfo> {
        ok(self.call(&Request::Inquire {
            owner: owner.clone(),
        }))
    }

    /// After the daemon decided to close: the next read sees end of file.
    pub fn assert_closed(&mut self) {
        let mut b = [0u8; 1];
        match self.0.read(&mut b) {
            Ok(0) => {}
            Ok(_) => panic!("unexpected data after the final response"),
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {}
            Err(e) => panic!("expected the daemon to close the connection, got {e}"),
        }
    }
}

/// A direct-mode disk lease on `path`.
pub fn disk(path: &Path, mode: LeaseMode) -> LeaseSpec {
    let p = path.to_str().expect("utf-8 path").to_string();
    LeaseSpec {
        name: p.clone(),
        kind: ResourceKind::Disk,
        mode,
        target: LockTarget::File { path: p },
    }
}

pub fn excl(path: &Path) -> LeaseSpec {
    disk(path, LeaseMode::Exclusive)
}

pub fn shared(path: &Path) -> LeaseSpec {
    disk(path, LeaseMode::Shared)
}

pub fn ok(resp: Response) -> Vec<LeaseInfo> {
    match resp {
        Response::Ok { leases } => leases,
        other => panic!("expected Ok, got {other:?}"),
    }
}

pub fn err(resp: Response, kind: ErrorKind) -> ErrorReply {
    match resp {
        Response::Error(e) if e.kind == kind => e,
        other => panic!("expected an error of kind {kind:?}, got {other:?}"),
    }
}

/// What `F_OFD_GETLK` sees on `[start, start+len)` of `path` for a lock of type `l_type`: the
/// blocking lock's type (F_UNLCK when none) and pid.
pub fn probe_lock(path: &Path, start: i64, len: i64, l_type: libc::c_int) -> (libc::c_int, i32) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {path:?} for probing: {e}"));
    let mut fl = libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: len,
        l_pid: 0,
    };
    // SAFETY: F_OFD_GETLK with a valid descriptor and a pointer to a live flock struct.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert_eq!(r, 0, "F_OFD_GETLK failed");
    (i32::from(fl.l_type), fl.l_pid)
}

/// The lock type others hold on byte 0 of `path` (F_UNLCK when free).
pub fn byte0(path: &Path) -> libc::c_int {
    probe_lock(path, 0, 1, libc::F_WRLCK).0
}

/// Poll `f` until it holds (bounded by [`BOUND`]); returns how long that took.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < BOUND, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}
