//! Shared harness for the protocol-level suites (daemon, holder, hostile, reliability): owner
//! processes killed on drop, owners, one protocol connection, lease specs and lock probes.
//! Daemons are started with `super::daemon::TestDaemon`.

use lockwarden::protocol::{
    self, ErrorKind, ErrorReply, HEADER_LEN, LeaseInfo, LeaseMode, LeaseSpec, LockTarget, Owner,
    Request, ResourceKind, Response,
};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

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
        super::wait::poll(limit, || self.0.try_wait().unwrap()).map(|(st, _)| st)
    }
}

impl Proc {
    /// The state letter of the process (see [`proc_state`]).
    pub fn state(&self) -> Option<char> {
        proc_state(self.pid())
    }

    /// Its exit status once it has exited (reaping it), None while it runs.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.0.try_wait().unwrap()
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

/// The state letter of /proc/PID/stat (R, S, T, Z...), None once the process is gone.
pub fn proc_state(pid: u32) -> Option<char> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')?.1.trim().chars().next()
}

/// Is `pid` a live (not zombie) process?
pub fn running(pid: u32) -> bool {
    !matches!(proc_state(pid), Some('Z') | Some('X') | None)
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

/// An Acquire of `leases` for `owner` (default failure action, unrestricted).
pub fn acquire_request(owner: &Owner, leases: Vec<LeaseSpec>) -> Request {
    Request::Acquire {
        owner: owner.clone(),
        leases,
        action: protocol::FailureAction::Default,
        restrict: false,
    }
}

/// A Release of `leases` for `owner`.
pub fn release_request(owner: &Owner, leases: Vec<LeaseSpec>) -> Request {
    Request::Release {
        owner: owner.clone(),
        leases,
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
pub fn eventually(what: &str, f: impl FnMut() -> bool) -> Duration {
    super::wait::wait_until(what, BOUND, f)
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

// ---------------------------------------------------------------------------------------------
// Raw syscalls for forked children (only async-signal-safe calls after fork, no allocation)

pub fn sockaddr(path: &Path) -> libc::sockaddr_un {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    assert!(bytes.len() < addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    addr
}

/// In a forked child: connect to `addr`, send `frame`, copy the whole response frame to
/// stdout, and return the connected descriptor.
///
/// # Safety
/// Call only between fork and exec; uses raw syscalls only.
pub unsafe fn child_roundtrip(
    addr: &libc::sockaddr_un,
    frame: &[u8],
    buf: &mut [u8],
) -> std::io::Result<libc::c_int> {
    let last = std::io::Error::last_os_error;
    // SAFETY (whole block): plain syscalls on descriptors this child owns and on buffers that
    // outlive the calls.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Err(last());
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        if libc::connect(fd, (addr as *const libc::sockaddr_un).cast(), len) != 0 {
            return Err(last());
        }
        let mut off = 0;
        while off < frame.len() {
            let n = libc::write(fd, frame[off..].as_ptr().cast(), frame.len() - off);
            if n <= 0 {
                return Err(last());
            }
            off += n as usize;
        }
        // Read the 12-byte header, then the body it announces.
        let mut got = 0;
        let mut want = HEADER_LEN;
        while got < want {
            let n = libc::read(fd, buf[got..].as_mut_ptr().cast(), want - got);
            if n <= 0 {
                return Err(last());
            }
            got += n as usize;
            if got == HEADER_LEN && want == HEADER_LEN {
                let len = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
                want = (HEADER_LEN + len).min(buf.len());
            }
        }
        libc::write(1, buf.as_ptr().cast(), got);
        Ok(fd)
    }
}

/// Send `req` to `socket` from a child running as uid and gid `uid` (no supplementary groups)
/// and return the daemon's answer; the child must exit cleanly.
pub fn call_as(uid: u32, socket: &Path, req: &Request) -> Response {
    let frame = protocol::encode(req).expect("encode");
    let addr = sockaddr(socket);
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmd = Command::new("true");
    cmd.stdout(Stdio::piped());
    super::run_as(&mut cmd, uid);
    // SAFETY: raw, async-signal-safe syscalls only (socket, connect, read, write, close)
    // between fork and exec, after run_as's hook, on buffers allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = child_roundtrip(&addr, &frame, &mut buf)?;
            libc::close(fd);
            Ok(())
        });
    }
    let mut child = Proc(
        cmd.spawn()
            .unwrap_or_else(|e| panic!("spawning the uid {uid} client: {e}")),
    );
    let resp = protocol::read_message(child.0.stdout.as_mut().expect("stdout"))
        .unwrap_or_else(|e| panic!("the answer to the uid {uid} client: {e}"));
    let st = child.wait_for(BOUND).expect("the uid {uid} client exits");
    assert!(st.success(), "the uid {uid} client: {st}");
    resp
}

/// `sh -c SCRIPT` that, before exec, registers itself with the daemon as owner `name`
/// (Register with restrict, from its own pid: its lifetime handle) and keeps the connection
/// as fd 9 — exactly what libvirt's forked child does before it becomes QEMU.
/// The script reads commands from stdin.
pub fn spawn_registered(socket: &Path, name: &str, script: &str) -> (Proc, Owner, Response) {
    let n = next_seq();
    let uuid = format!("0ddba11e-0000-4000-8000-{n:012x}");
    const SLOT: &str = "PPPPPPPPPP";
    let body = format!(
        r#"{{"op":"register","owner":{{"uuid":"{uuid}","name":"{name}","id":{n},"pid":{SLOT}}},"restrict":true}}"#
    );
    let slot_end = HEADER_LEN + body.find(SLOT).unwrap() + SLOT.len();
    let mut frame = protocol::header(body.len()).unwrap().to_vec();
    frame.extend_from_slice(body.as_bytes());
    let addr = sockaddr(socket);
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    // SAFETY: the closure only formats digits into a pre-allocated buffer and makes raw
    // syscalls (getpid, socket, connect, read, write, dup2, close): async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let mut pid = libc::getpid() as u32;
            let mut i = slot_end;
            for _ in 0..SLOT.len() {
                i -= 1;
                frame[i] = if pid > 0 || i == slot_end - 1 {
                    let d = b'0' + (pid % 10) as u8;
                    pid /= 10;
                    d
                } else {
                    b' '
                };
            }
            let fd = child_roundtrip(&addr, &frame, &mut buf)?;
            if fd != 9 {
                if libc::dup2(fd, 9) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawning a registering owner");
    let pid = child.id();
    let resp: Response = protocol::read_message(child.stdout.as_mut().unwrap()).unwrap();
    let owner = Owner {
        uuid,
        name: name.to_string(),
        id: n,
        pid,
    };
    (Proc(child), owner, resp)
}

pub fn tell(p: &mut Proc, line: &str) {
    let stdin = p.0.stdin.as_mut().unwrap();
    stdin.write_all(line.as_bytes()).unwrap();
    stdin.write_all(b"\n").unwrap();
    stdin.flush().unwrap();
}

/// An event that comes after every kill sequence the daemon started before this call has sent
/// its SIGTERM: a witness owner takes a lease on `img` and closes its lifetime handle, and
/// this returns once the daemon logged SIGTERM for it. Every sequence waits the same settle
/// time before its SIGTERM, so one started earlier has logged its SIGTERM by then. A test can
/// then check that an owner was *not* signalled without sleeping for a guessed time.
pub fn after_pending_kills(socket: &Path, img: &Path, log: impl Fn() -> String) {
    let (mut p, owner, resp) = spawn_registered(
        socket,
        "kill-witness",
        "read cmd; exec 9>&-; exec sleep 1000",
    );
    ok(resp);
    ok(Client::connect(socket).call(&Request::Acquire {
        owner: owner.clone(),
        leases: vec![excl(img)],
        action: protocol::FailureAction::Default,
        restrict: false,
    }));
    tell(&mut p, "close");
    let needle = format!(
        "(pid {}) still runs after its lifetime handle closed; sending SIGTERM",
        owner.pid
    );
    eventually("the witness owner is sent SIGTERM", || {
        log().contains(&needle)
    });
    assert!(
        p.wait_for(BOUND).is_some(),
        "the witness owner survived SIGTERM"
    );
}
