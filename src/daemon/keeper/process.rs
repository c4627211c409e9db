//! The keeper process: started by the daemon, holds every lease's descriptors.

use super::vault::Vault;
use super::*;
use crate::daemon::keptmeta::{KeptMeta, Tails};
use crate::daemon::pidfd::Proc;
use crate::daemon::sys;
use log::{error, info, warn};
use nix::errno::Errno;
use nix::sys::socket::{Backlog, UnixAddr, bind, getsockopt, listen, sockopt};
use nix::sys::stat::{Mode, umask};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::CString;
use std::fs;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
/// Start a keeper at `path` and return a connection to it.
pub(super) fn spawn(path: &Path) -> Result<OwnedFd, String> {
    remove_stale(path)?;
    let listener = seqpacket()?;
    let addr = UnixAddr::new(path).map_err(|e| format!("keeper socket {path:?}: {}", e.desc()))?;
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = bind(listener.as_raw_fd(), &addr);
    umask(old);
    bound.map_err(|e| format!("cannot bind the keeper socket {path:?}: {}", e.desc()))?;
    let ident = fs::symlink_metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .map_err(|e| format!("cannot stat the keeper socket {path:?}: {e}"))?;
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| format!("cannot create a pipe: {}", e.desc()))?;
    // Everything the child needs is built here, before the fork: the daemon has threads (the
    // storage workers, closers), so between fork and execve the child may only make
    // async-signal-safe calls — no allocation, no lock, no logging (another thread may have
    // held the allocator's or the log's lock at the moment of the fork).
    let plan = ExecPlan::new(&listener, &ready_w, path, ident)?;
    // SAFETY: after the fork the child runs only async-signal-safe code (`ExecPlan::exec`:
    // setsid, fork, fcntl, execve, _exit) on memory prepared before the fork.
    match unsafe { nix::unistd::fork() } {
        Err(e) => {
            let _ = fs::remove_file(path);
            return Err(format!("cannot fork the keeper: {}", e.desc()));
        }
        Ok(nix::unistd::ForkResult::Child) => plan.exec(),
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(ready_w);
            drop(listener);
            let _ = nix::sys::wait::waitpid(child, None);
            let mut b = [0u8; 1];
            let mut fds = [nix::poll::PollFd::new(
                ready_r.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let ms = u16::try_from(IO_TIMEOUT.as_millis()).unwrap_or(u16::MAX);
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
            match nix::unistd::read(&ready_r, &mut b) {
                Ok(1) => {}
                _ => return Err(format!("the keeper at {path:?} did not start")),
            }
        }
    }
    connect_to(path).map_err(|e| format!("cannot connect to the new keeper at {path:?}: {e}"))
}

/// The hidden first argument with which `lockwardend` runs as the keeper. The keeper is a
/// fresh image of the daemon's own binary (`/proc/self/exe`), started by [`spawn`] with
/// fork + exec, so it never inherits another thread's locks (docs/reliability.md).
pub const KEEPER_ARG: &str = "--internal-keeper";

/// Its process name (`comm`), which tests, benchmarks and operators look for.
const KEEPER_COMM: &std::ffi::CStr = c"lockwardend-kpr";

/// The exec of a keeper, prepared in the daemon before it forks.
struct ExecPlan {
    exe: CString,
    /// Kept alive for the pointers in `argv_ptrs`.
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
    keep: [RawFd; 2],
}

impl ExecPlan {
    fn new(
        listener: &OwnedFd,
        ready: &OwnedFd,
        path: &Path,
        ident: (u64, u64),
    ) -> Result<ExecPlan, String> {
        use std::os::unix::ffi::OsStrExt;
        let c = |b: &[u8]| {
            CString::new(b).map_err(|_| format!("the keeper socket path {path:?} contains a NUL"))
        };
        let level = log::max_level().to_string().to_lowercase();
        let argv: Vec<CString> = [
            b"lockwardend".as_slice(),
            KEEPER_ARG.as_bytes(),
            listener.as_raw_fd().to_string().as_bytes(),
            ready.as_raw_fd().to_string().as_bytes(),
            path.as_os_str().as_bytes(),
            ident.0.to_string().as_bytes(),
            ident.1.to_string().as_bytes(),
            level.as_bytes(),
        ]
        .into_iter()
        .map(c)
        .collect::<Result<_, _>>()?;
        // The daemon's environment without what belongs to the daemon alone: systemd's socket
        // activation and notification variables and the re-exec state descriptor.
        let envp: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| {
                !matches!(
                    k.as_bytes(),
                    b"LISTEN_FDS"
                        | b"LISTEN_PID"
                        | b"LISTEN_FDNAMES"
                        | b"NOTIFY_SOCKET"
                        | b"WATCHDOG_PID"
                        | b"WATCHDOG_USEC"
                        | b"LOCKWARDEND_STATE_FD"
                )
            })
            .filter_map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv).ok()
            })
            .collect();
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        Ok(ExecPlan {
            exe: c(b"/proc/self/exe")?,
            argv_ptrs: ptrs(&argv),
            envp_ptrs: ptrs(&envp),
            _argv: argv,
            _envp: envp,
            keep: [listener.as_raw_fd(), ready.as_raw_fd()],
        })
    }

    /// In the forked child: a new session, a second fork (the keeper is re-parented to init,
    /// never a zombie of the daemon), then exec of the keeper. Only async-signal-safe calls.
    fn exec(&self) -> ! {
        // SAFETY: setsid, fork, fcntl, execve and _exit are async-signal-safe; every pointer
        // passed was built before the fork and stays valid (self lives until exec or _exit).
        unsafe {
            libc::setsid();
            if libc::fork() == 0 {
                for fd in self.keep {
                    libc::fcntl(fd, libc::F_SETFD, 0);
                }
                libc::execve(
                    self.exe.as_ptr(),
                    self.argv_ptrs.as_ptr(),
                    self.envp_ptrs.as_ptr(),
                );
                libc::_exit(127);
            }
            libc::_exit(0)
        }
    }
}

/// When this process was started by [`spawn`] as a keeper (`lockwardend --internal-keeper ...`),
/// become the keeper and never return; otherwise return at once so the daemon starts.
pub fn become_keeper_if_asked() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_none_or(|a| a != KEEPER_ARG) {
        return;
    }
    match keeper_args(args.get(2..).unwrap_or_default()) {
        Ok((listener, ready, path, ident, level)) => {
            // Every inherited descriptor but these two is closed before the logger starts:
            // the journal logger opens a socket of its own, which must not be closed under it
            // (its number would be reused by the daemon link, and log entries sent there).
            close_all_but(&[listener, ready]);
            crate::daemon::logging::init(level, crate::daemon::logging::under_systemd());
            // SAFETY: the daemon's spawn passed these two descriptors to this fresh process
            // for it to own; nothing else in it takes them over.
            let adopted = unsafe {
                (
                    sys::adopt(listener, "the keeper's listening socket"),
                    sys::adopt(ready, "the keeper's ready pipe"),
                )
            };
            let (Ok(listener), Ok(ready)) = adopted else {
                eprintln!("lockwardend: {KEEPER_ARG}: inherited descriptors are not open");
                std::process::exit(2)
            };
            keeper_main(listener, ready, path, ident)
        }
        Err(e) => {
            eprintln!(
                "lockwardend: {KEEPER_ARG} is for lockwardend's own use (it starts its keeper \
                 that way): {e}"
            );
            std::process::exit(2)
        }
    }
}

/// A lease handed over: id, owner pids, record text, descriptors.
pub(super) type NewLease = ([u64; 2], Vec<Watch>, String, Vec<OwnedFd>);

type KeeperArgs = (RawFd, RawFd, PathBuf, (u64, u64), log::LevelFilter);

fn keeper_args(a: &[std::ffi::OsString]) -> Result<KeeperArgs, String> {
    let [listener, ready, path, dev, ino, level] = a else {
        return Err(format!("expected 6 arguments, got {}", a.len()));
    };
    let num = |s: &std::ffi::OsString| {
        s.to_str()
            .and_then(|t| t.parse::<u64>().ok())
            .ok_or_else(|| format!("{s:?} is not a number"))
    };
    let fd = |s: &std::ffi::OsString| -> Result<RawFd, String> {
        let n = RawFd::try_from(num(s)?).map_err(|_| format!("{s:?} is not a descriptor"))?;
        if !sys::is_open(n) {
            return Err(format!("descriptor {n} is not open"));
        }
        Ok(n)
    };
    let level = level
        .to_str()
        .and_then(|l| l.parse::<log::LevelFilter>().ok())
        .ok_or_else(|| format!("{level:?} is not a log level"))?;
    let (listener, ready) = (fd(listener)?, fd(ready)?);
    if listener == ready {
        return Err(format!("descriptor {listener} given twice"));
    }
    Ok((
        listener,
        ready,
        PathBuf::from(path),
        (num(dev)?, num(ino)?),
        level,
    ))
}

/// A keeper socket file nobody listens on is removed; a live one is an error (we only get
/// here when connecting to it failed).
fn remove_stale(path: &Path) -> Result<(), String> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => fs::remove_file(path)
            .map_err(|e| format!("cannot remove the stale keeper socket {path:?}: {e}")),
        Ok(_) => Err(format!(
            "{path:?} exists and is not a socket; remove it (lockwardend's keeper needs that path)"
        )),
        Err(_) => Ok(()),
    }
}

/// One held lease, kept small (the keeper holds every lease of the host): the record is the
/// JSON text the daemon sent (kept compactly, given back verbatim: keptmeta.rs). Its
/// descriptors are in the vault (vault.rs), not here.
pub(super) struct Held {
    pub(super) pids: Box<[Watch]>,
    pub(super) meta: KeptMeta,
}

/// A watched owner pid: its pidfd (none on kernels without pidfds, and none while a daemon is
/// connected: see [`KeeperProc::parked`]), its start time, and how many held leases name it,
/// so that holding or dropping a lease costs nothing per other lease.
/// A pid no lease names any more stays watched (idle, up to [`IDLE_WATCHES`]) until it exits:
/// a paused VM resumes, and opening a pidfd and reading /proc/PID/stat again for every
/// acquire was most of the keeper's work in a steady acquire/release loop.
pub(super) struct Watched {
    pub(super) fd: Option<OwnedFd>,
    pub(super) start: Option<u64>,
    pub(super) refs: usize,
    /// No pidfd because opening one failed for a reason that may pass (EMFILE, ENFILE,
    /// ENOMEM): not an exit (issue 19); tried again every [`REWATCH_EVERY`].
    pub(super) retry: bool,
}

impl Watched {
    /// An owner the connected daemon watches: its pid's start time only (read from
    /// /proc/PID/stat when the daemon did not know it). None: no such process.
    fn parked(pid: u32, start: Option<u64>) -> Option<Watched> {
        let start = match start {
            Some(s) => Some(s),
            None => match crate::daemon::pidfd::read_start(pid) {
                Ok(s) => Some(s),
                Err(Errno::ESRCH) => return None,
                Err(_) => None,
            },
        };
        Some(Watched {
            fd: None,
            start,
            refs: 0,
            retry: false,
        })
    }
}

/// How often the keeper tries again to watch an owner whose pidfd could not be opened.
const REWATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Idle watched pids kept beyond those that hold leases.
const IDLE_WATCHES: usize = 256;

pub(super) struct KeeperProc {
    pub(super) listener: OwnedFd,
    pub(super) path: PathBuf,
    pub(super) ident: (u64, u64),
    pub(super) conn: Option<OwnedFd>,
    pub(super) held: BTreeMap<[u64; 2], Held>,
    pub(super) watched: HashMap<u32, Watched>,
    /// Owners found gone while holding: their leases are dropped after the current message.
    pub(super) dead: Vec<u32>,
    pub(super) rx: Receiver,
    pub(super) euid: u32,
    /// A daemon said hello at least once.
    pub(super) greeted: bool,
    /// Copies the daemon let go of during the current message: closed after the answer, on
    /// the closer thread (a close can block on a hung mount — FUSE and NFS flush on close —
    /// and must not stop the keeper from answering; the daemon's explicit unlock, not this
    /// close, is what drops the lock).
    /// Per device (`st_dev`), so one hung mount's closes never delay another's.
    pub(super) closing: Vec<(u64, Vec<OwnedFd>)>,
    pub(super) closers: HashMap<u64, std::sync::mpsc::Sender<Vec<Vec<OwnedFd>>>>,
    /// The leases' descriptors.
    pub(super) vault: Vault,
    /// The record tails the held leases share.
    pub(super) tails: Tails,
    /// The connected daemon said hello: it watches the owners itself (pidfds, lifetime
    /// connections), so the keeper keeps only each owner's pid and start time, no pidfd. When
    /// the daemon's connection goes away the keeper opens a pidfd for each, checked against
    /// the start time (an owner that exited meanwhile is found gone), and watches them until a
    /// daemon says hello again (docs/reliability.md §3).
    pub(super) parked: bool,
}

fn close_all_but(keep: &[RawFd]) {
    let mut keep: Vec<RawFd> = keep.to_vec();
    keep.sort_unstable();
    let mut from: RawFd = 3;
    for k in keep.into_iter().chain(std::iter::once(RawFd::MAX)) {
        if k > from {
            // SAFETY: close_range(from, k - 1, 0) closes descriptors; no memory is involved.
            // Nothing in this freshly exec'd keeper (one thread so far) uses them.
            unsafe { libc::syscall(libc::SYS_close_range, from as u32, (k - 1) as u32, 0) };
        }
        from = k.saturating_add(1);
    }
}

fn keeper_main(listener: OwnedFd, ready: OwnedFd, path: PathBuf, ident: (u64, u64)) -> ! {
    crate::daemon::logging::forget_pid();
    if let Ok(null) = fs::File::options().read(true).write(true).open("/dev/null") {
        // SAFETY: dup2 onto stdin and stdout; stderr stays for the log.
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
    let _ = std::env::set_current_dir("/");
    // The daemon blocked its signals for its signalfd: the keeper wants SIGTERM to work.
    let _ = nix::sys::signal::SigSet::empty().thread_set_mask();
    // SAFETY: SIG_IGN installs no handler code.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGHUP,
            nix::sys::signal::SigHandler::SigIgn,
        );
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::SigHandler::SigIgn,
        );
    }
    // SAFETY: PR_SET_NAME with a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, KEEPER_COMM.as_ptr(), 0, 0, 0) };
    if let Err(e) = listen(&listener, Backlog::new(16).unwrap_or(Backlog::MAXCONN)) {
        error!("keeper: cannot listen on {path:?}: {}", e.desc());
        // SAFETY: _exit without destructors, in the keeper before it serves anything.
        unsafe { libc::_exit(1) };
    }
    let _ = nix::unistd::write(&ready, b"1");
    drop(ready);
    let mut k = KeeperProc {
        listener,
        path,
        ident,
        conn: None,
        held: BTreeMap::new(),
        watched: HashMap::new(),
        dead: Vec::new(),
        rx: Receiver::new(),
        euid: nix::unistd::geteuid().as_raw(),
        greeted: false,
        closing: Vec::new(),
        closers: HashMap::new(),
        tails: Tails::default(),
        vault: Vault::default(),
        parked: false,
    };
    k.run()
}

#[derive(Clone, Copy)]
enum Tok {
    Listener,
    Conn,
    Pid(u32),
}

impl KeeperProc {
    fn me(&self) -> u32 {
        std::process::id()
    }

    /// The keeper's loop: poll(2) over its link (or its listener) and the pidfds of the owners
    /// it watches, the set rebuilt each round (`sys::poll_set`). It stays on poll rather than
    /// the daemon's epoll `Poller` (daemon/sys.rs) because its rounds are off every request's
    /// path and few: the daemon sends holds and drops as quiet batches it does not wait for
    /// (mod.rs), and a round drains up to [`DRAIN_MAX`] messages and then sleeps
    /// [`QUIET_WINDOW`], so the rebuild (one entry per watched owner, not per lease) is paid at
    /// most a few hundred times a second under load, and never while a client waits.
    fn run(&mut self) -> ! {
        let mut pfds: Vec<libc::pollfd> = Vec::new();
        let mut toks: Vec<Tok> = Vec::new();
        let mut ready: Vec<Tok> = Vec::new();
        // A new keeper waits (boundedly) for the daemon that started it to say hello; a
        // connection that never does (a probe) does not count.
        loop {
            let first = !self.greeted;
            if self.parked && self.conn.is_none() {
                self.unpark();
            }
            if self.conn.is_none() && self.held.is_empty() && !first {
                self.exit("holds no lease and no lockwardend is connected");
            }
            pfds.clear();
            toks.clear();
            let (fd, tok) = match &self.conn {
                Some(c) => (c.as_raw_fd(), Tok::Conn),
                None => (self.listener.as_raw_fd(), Tok::Listener),
            };
            pfds.push(pollfd(fd));
            toks.push(tok);
            let mut rewatch = false;
            for (pid, w) in &self.watched {
                rewatch |= w.retry;
                if let Some(fd) = &w.fd {
                    pfds.push(pollfd(fd.as_raw_fd()));
                    toks.push(Tok::Pid(*pid));
                }
            }
            let timeout = if first {
                IO_TIMEOUT.as_millis() as libc::c_int
            } else if rewatch {
                REWATCH_EVERY.as_millis() as libc::c_int
            } else {
                -1
            };
            let n = match sys::poll_set(&mut pfds, timeout) {
                Ok(n) => n as i64,
                Err(_) => -1,
            };
            if n == 0 && first {
                self.exit("was started but no lockwardend connected");
            }
            if rewatch {
                self.rewatch();
            }
            if n < 0 {
                continue;
            }
            ready.clear();
            ready.extend(
                pfds.iter()
                    .zip(toks.iter())
                    .filter(|(p, _)| p.revents != 0)
                    .map(|(_, t)| *t),
            );
            for t in &ready {
                match *t {
                    Tok::Listener => self.accept(),
                    Tok::Conn => self.serve_burst(),
                    Tok::Pid(pid) => self.owner_gone(pid),
                }
            }
        }
    }

    fn accept(&mut self) {
        let Ok(fd) = sys::accept(&self.listener, false) else {
            return;
        };
        match getsockopt(&fd, sockopt::PeerCredentials) {
            Ok(c) if c.uid() == self.euid => {
                info!(
                    "keeper (pid {}): lockwardend pid {} connected; {} lease(s) held (in {} \
                     vault slot(s))",
                    self.me(),
                    c.pid(),
                    self.held.len(),
                    self.vault.slots()
                );
                self.conn = Some(fd);
            }
            Ok(c) => warn!(
                "keeper (pid {}): refusing pid {} with uid {}",
                self.me(),
                c.pid(),
                c.uid()
            ),
            Err(_) => {}
        }
    }

    /// Read what the daemon sent: every message already queued (up to [`DRAIN_MAX`]), and
    /// after quiet batches sleep [`QUIET_WINDOW`] so that the next ones queue up meanwhile
    /// instead of waking the keeper one by one. Answers are never delayed: a message that
    /// wants one is answered at once, and the daemon sends nothing else while it waits.
    fn serve_burst(&mut self) {
        let mut quiet = false;
        for _ in 0..DRAIN_MAX {
            quiet |= self.serve();
            let Some(fd) = self.conn.as_ref().map(AsRawFd::as_raw_fd) else {
                return;
            };
            if sys::poll_one(fd, libc::POLLIN, 0).unwrap_or(0) == 0 {
                break;
            }
        }
        if quiet {
            std::thread::sleep(QUIET_WINDOW);
        }
    }

    /// Read and handle one message. Returns whether it was a quiet batch.
    pub(super) fn serve(&mut self) -> bool {
        let Some(fd) = self.conn.as_ref().map(AsRawFd::as_raw_fd) else {
            return false;
        };
        let parsed = match self.rx.recv(fd) {
            Ok(Some((bytes, fds))) => (serde_json::from_slice::<Incoming>(bytes), fds),
            Ok(None) | Err(_) => {
                self.conn = None;
                if !self.held.is_empty() {
                    warn!(
                        "keeper (pid {}): lockwardend disconnected; holding {} lease(s) of \
                         {} VM(s) until a restarted lockwardend takes them back or the VMs exit",
                        self.me(),
                        self.held.len(),
                        self.pids().len()
                    );
                }
                return false;
            }
        };
        let quiet = matches!(&parsed.0, Ok(m) if m.quiet);
        let reply = match parsed {
            (Ok(msg), fds) => self.handle(fd, msg, fds),
            (Err(e), _) => self.refuse(format!("bad message: {e}")),
        };
        // Owners found gone while taking this message's leases: drop what they held alone.
        for pid in std::mem::take(&mut self.dead) {
            self.owner_gone(pid);
        }
        if quiet && !reply.ok {
            // Nobody waits for this answer: hanging up is how a quiet batch fails. The daemon
            // notices at once, reconnects and hands every lease over again.
            error!(
                "keeper (pid {}): {}; hanging up so that lockwardend hands every lease over \
                 again",
                self.me(),
                reply.error.as_deref().unwrap_or("a quiet batch failed")
            );
            self.conn = None;
        } else if !quiet && send_msg(fd, &reply, &[]).is_err() {
            self.conn = None;
        }
        self.close_deferred();
        quiet
    }

    /// Close what was let go of, off the keeper's own thread: one closer thread per device,
    /// started on first use.
    fn close_deferred(&mut self) {
        if self.closing.is_empty() {
            return;
        }
        let mut by_dev: HashMap<u64, Vec<Vec<OwnedFd>>> = HashMap::new();
        for (dev, h) in std::mem::take(&mut self.closing) {
            by_dev.entry(dev).or_default().push(h);
        }
        for (dev, batch) in by_dev {
            if let std::collections::hash_map::Entry::Vacant(slot) = self.closers.entry(dev) {
                let (tx, rx) = std::sync::mpsc::channel::<Vec<Vec<OwnedFd>>>();
                let spawned = std::thread::Builder::new()
                    .name("lockwardend-kpc".into())
                    .spawn(move || rx.into_iter().for_each(drop));
                if spawned.is_ok() {
                    slot.insert(tx);
                }
            }
            match self.closers.get(&dev) {
                Some(tx) => {
                    if let Err(back) = tx.send(batch) {
                        self.closers.remove(&dev);
                        drop(back.0);
                    }
                }
                None => drop(batch),
            }
        }
    }

    fn ok(&self) -> Ack {
        Ack {
            ok: true,
            pid: self.me(),
            held: self.held.len(),
            version: KEEPER_PROTOCOL,
            ..Ack::default()
        }
    }

    fn refuse(&self, why: String) -> Ack {
        Ack {
            error: Some(format!("keeper protocol {KEEPER_PROTOCOL}: {why}")),
            pid: self.me(),
            version: KEEPER_PROTOCOL,
            ..Ack::default()
        }
    }

    fn handle(&mut self, fd: RawFd, msg: Incoming, fds: Vec<OwnedFd>) -> Ack {
        match msg.op.as_str() {
            "hello" => {
                self.greeted = true;
                self.park();
                self.ok()
            }
            "hold" => {
                let Some(id) = msg.id else {
                    return self.refuse("hold without an id".into());
                };
                let mut fds = fds.into_iter();
                let Some(lock) = fds.next() else {
                    return self.refuse("hold without a descriptor".into());
                };
                let meta = msg.meta.map(|m| m.to_string()).unwrap_or_default();
                let mut fds_of = vec![lock];
                fds_of.extend(fds.next());
                self.put_batch(vec![(id, msg.pids, meta, fds_of)]);
                self.ok()
            }
            "hold_batch" => {
                let want: usize = msg.entries.iter().map(|e| usize::from(e.fds)).sum();
                if want != fds.len() || msg.entries.iter().any(|e| e.fds == 0 || e.fds > 2) {
                    return self.refuse(format!(
                        "hold_batch names {want} descriptor(s) but {} arrived",
                        fds.len()
                    ));
                }
                let mut fds = fds.into_iter();
                let batch = msg
                    .entries
                    .into_iter()
                    .map(|e| {
                        let of: Vec<OwnedFd> = fds.by_ref().take(usize::from(e.fds)).collect();
                        (e.id, e.pids, e.meta, of)
                    })
                    .collect();
                self.put_batch(batch);
                self.ok()
            }
            "drop" => {
                if let Some(id) = msg.id {
                    self.take_batch(&[id]);
                }
                self.ok()
            }
            "drop_batch" => {
                self.take_batch(&msg.ids);
                self.ok()
            }
            "reset" => {
                let all: Vec<[u64; 2]> = self.held.keys().copied().collect();
                self.held.clear();
                let fds = self.vault.take(&all);
                self.closing
                    .extend(fds.into_iter().map(|(id, f)| (id[0], f)));
                self.watched.clear();
                self.ok()
            }
            "dump" => {
                let held = &self.held;
                self.vault.visit(|id, fds| {
                    let Some(h) = held.get(&id) else {
                        return true;
                    };
                    let ack = Ack {
                        ok: true,
                        entry: Some(DumpEntry {
                            id,
                            pids: h.pids.to_vec(),
                            meta: serde_json::from_str(&h.meta.text())
                                .unwrap_or(serde_json::Value::Null),
                        }),
                        ..Ack::default()
                    };
                    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
                    send_msg(fd, &ack, &raw).is_ok()
                });
                Ack {
                    end: true,
                    ..self.ok()
                }
            }
            "quit" => {
                let ack = self.ok();
                if self.held.is_empty() {
                    let _ = send_msg(fd, &ack, &[]);
                    self.exit("lockwardend stopped with no lease held");
                }
                warn!(
                    "keeper (pid {}): lockwardend stops while {} lease(s) are held; keeping them",
                    self.me(),
                    self.held.len()
                );
                ack
            }
            other => self.refuse(format!("unknown message {other:?}")),
        }
    }

    /// Hold (or replace) lease `id`; its owner pids are watched from now on.
    #[cfg(test)]
    pub(super) fn put(
        &mut self,
        id: [u64; 2],
        pids: Vec<Watch>,
        meta: String,
        fd: OwnedFd,
        dir: Option<OwnedFd>,
    ) {
        let mut fds = vec![fd];
        fds.extend(dir);
        self.put_batch(vec![(id, pids, meta, fds)]);
    }

    /// Hold (or replace) every lease of `batch` (id, owner pids, record, descriptors); their
    /// owner pids are watched from now on, their descriptors go to the vault together.
    pub(super) fn put_batch(&mut self, batch: Vec<NewLease>) {
        let mut fds = Vec::with_capacity(batch.len());
        for (id, pids, meta, of) in batch {
            for w in &pids {
                self.watch(*w);
            }
            let held = Held {
                pids: pids.into_boxed_slice(),
                meta: KeptMeta::new(meta, &mut self.tails),
            };
            if let Some(old) = self.held.insert(id, held) {
                self.unwatch(&old.pids);
            }
            fds.push((id, of));
        }
        let replaced = self.vault.put(fds);
        self.closing
            .extend(replaced.into_iter().map(|(id, f)| (id[0], f)));
    }

    /// Close the keeper's copies of lease `id`.
    #[cfg(test)]
    pub(super) fn take(&mut self, id: &[u64; 2]) {
        self.take_batch(&[*id]);
    }

    /// Close the keeper's copies of `ids` (those it holds).
    pub(super) fn take_batch(&mut self, ids: &[[u64; 2]]) {
        for id in ids {
            if let Some(old) = self.held.remove(id) {
                self.unwatch(&old.pids);
            }
        }
        let fds = self.vault.take(ids);
        self.closing
            .extend(fds.into_iter().map(|(id, f)| (id[0], f)));
    }

    fn pids(&self) -> HashSet<u32> {
        self.held
            .values()
            .flat_map(|h| h.pids.iter().map(|w| w.pid))
            .collect()
    }

    /// One more held lease names `w.pid`: watch it (a pidfd checked against its start time;
    /// only its pid and start time while a daemon is connected: [`KeeperProc::parked`]).
    /// A pid that is already gone is noted in `dead`.
    pub(super) fn watch(&mut self, w: Watch) {
        if let Some(e) = self.watched.get_mut(&w.pid) {
            // The same process (or one of unknown start time): count it. Another process with
            // a reused pid: watch it afresh (its exit is reported through the new pidfd).
            if w.start.is_none() || e.start.is_none() || e.start == w.start {
                e.refs += 1;
                return;
            }
            self.watched.remove(&w.pid);
        }
        let found = if self.parked {
            Watched::parked(w.pid, w.start)
        } else {
            self.open_watch(w.pid, w.start)
        };
        match found {
            Some(mut e) => {
                e.refs = 1;
                self.watched.insert(w.pid, e);
            }
            None => self.dead.push(w.pid),
        }
    }

    /// Open the pidfd of owner `pid`, checked against `start`. None: the owner is gone (or its
    /// pid names another process now). A pidfd that cannot be opened for want of descriptors
    /// or memory says nothing about the owner (issue 19): it comes back unwatched, `retry` set,
    /// and is tried again every [`REWATCH_EVERY`]. Its `refs` is 0, for the caller to set.
    fn open_watch(&self, pid: u32, start: Option<u64>) -> Option<Watched> {
        match Proc::reopen(pid, start) {
            // Without pidfds (old kernels) only a restarted daemon notices the death.
            Ok(p) => {
                let start = p.start;
                Some(Watched {
                    fd: p.into_fd(),
                    start,
                    refs: 0,
                    retry: false,
                })
            }
            Err(Errno::ESRCH) => None,
            // Short of descriptors or memory: that says nothing about the owner (issue 19).
            // Its copy is kept and the watch retried; only a pid that is gone (or names a
            // process with another start time) is an exit.
            Err(e) if !Proc::unwatched(pid, start).exited() => {
                warn!(
                    "keeper (pid {}): cannot watch owner pid {} for its exit: {} ({e}); this \
                     does not mean it exited: its leases stay held and the keeper tries again \
                     every {} s; if this persists, raise the open-file limit (LimitNOFILE=)",
                    self.me(),
                    pid,
                    e.desc(),
                    REWATCH_EVERY.as_secs()
                );
                Some(Watched {
                    fd: None,
                    start,
                    refs: 0,
                    retry: true,
                })
            }
            Err(_) => None,
        }
    }

    /// A daemon said hello: it watches the owners from now on. Close every pidfd (their pids
    /// and start times stay) and forget the idle ones.
    pub(super) fn park(&mut self) {
        self.parked = true;
        self.watched.retain(|_, w| w.refs > 0);
        for w in self.watched.values_mut() {
            w.fd = None;
            w.retry = false;
        }
    }

    /// No daemon is connected any more: watch every owner a held lease names again, each
    /// pidfd checked against the recorded start time, so an owner that exited (or whose pid
    /// was reused) since the daemon went away is found gone and its leases dropped now.
    pub(super) fn unpark(&mut self) {
        self.parked = false;
        self.watched.retain(|_, w| w.refs > 0);
        let todo: Vec<(u32, Option<u64>)> = self
            .watched
            .iter()
            .filter(|(_, w)| w.fd.is_none() && !w.retry)
            .map(|(pid, w)| (*pid, w.start))
            .collect();
        let mut gone = Vec::new();
        for (pid, start) in todo {
            match self.open_watch(pid, start) {
                Some(found) => {
                    if let Some(w) = self.watched.get_mut(&pid) {
                        w.fd = found.fd;
                        w.start = found.start;
                        w.retry = found.retry;
                    }
                }
                None => gone.push(pid),
            }
        }
        if !self.watched.is_empty() {
            info!(
                "keeper (pid {}): no lockwardend is connected; watching {} owner pid(s) \
                 itself, {} found gone",
                self.me(),
                self.watched.len(),
                gone.len()
            );
        }
        for pid in gone {
            self.owner_gone(pid);
        }
    }

    /// Try again to watch the owners whose pidfd could not be opened; drop the leases of
    /// those found gone meanwhile.
    fn rewatch(&mut self) {
        let me = self.me();
        // One no held lease names any more needs no watching.
        self.watched.retain(|_, w| !(w.retry && w.refs == 0));
        let mut gone = Vec::new();
        for (pid, w) in self.watched.iter_mut().filter(|(_, w)| w.retry) {
            let mut p = Proc::unwatched(*pid, w.start);
            match p.rewatch() {
                Ok(watched) => {
                    if watched {
                        info!("keeper (pid {me}): owner pid {pid} is watched for its exit again");
                    }
                    w.start = w.start.or(p.start);
                    w.fd = p.into_fd();
                    w.retry = false;
                }
                Err(Errno::ESRCH) => gone.push(*pid),
                Err(_) => {}
            }
        }
        for pid in gone {
            self.owner_gone(pid);
        }
    }

    /// A held lease naming these pids is gone: pids no lease names any more become idle (see
    /// [`Watched`]); past [`IDLE_WATCHES`] idle ones, they are all forgotten.
    pub(super) fn unwatch(&mut self, pids: &[Watch]) {
        let mut idled = false;
        for w in pids {
            if let Some(e) = self.watched.get_mut(&w.pid) {
                e.refs = e.refs.saturating_sub(1);
                if e.refs == 0 && self.parked {
                    // Nothing to keep open for it: a pid and a start time cost as much to
                    // learn again as to keep, and an idle one could not see its pid reused.
                    self.watched.remove(&w.pid);
                } else {
                    idled |= e.refs == 0;
                }
            }
        }
        if idled && self.watched.len() > IDLE_WATCHES {
            let idle = self.watched.values().filter(|e| e.refs == 0).count();
            if idle > IDLE_WATCHES {
                self.watched.retain(|_, e| e.refs > 0);
            }
        }
    }

    /// Owner `pid` exited: leases it was the last owner of are closed (their locks drop).
    pub(super) fn owner_gone(&mut self, pid: u32) {
        self.watched.remove(&pid);
        let me = self.me();
        let gone: Vec<[u64; 2]> = self
            .held
            .iter_mut()
            .filter(|(_, h)| h.pids.iter().any(|w| w.pid == pid))
            .filter_map(|(id, h)| {
                h.pids = h.pids.iter().filter(|w| w.pid != pid).copied().collect();
                h.pids.is_empty().then_some(*id)
            })
            .collect();
        for id in &gone {
            let Some(h) = self.held.remove(id) else {
                continue;
            };
            let name = serde_json::from_str::<serde_json::Value>(&h.meta.text())
                .ok()
                .and_then(|m| m.get("name").and_then(|n| n.as_str()).map(String::from))
                .unwrap_or_else(|| "?".into());
            info!("keeper (pid {me}): owner pid {pid} exited; dropped its lease {name:?}");
        }
        // Closing is what drops the lock here; it may block on a hung mount, so it too
        // happens on that device's closer thread.
        let fds = self.vault.take(&gone);
        self.closing
            .extend(fds.into_iter().map(|(id, f)| (id[0], f)));
        self.close_deferred();
    }

    fn exit(&mut self, why: &str) -> ! {
        if let Ok(m) = fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.ident {
                let _ = fs::remove_file(&self.path);
            }
        }
        info!("keeper (pid {}) exits: it {why}", self.me());
        // SAFETY: _exit ends the keeper without running destructors of the daemon's frames
        // it was forked from.
        unsafe { libc::_exit(0) }
    }
}

pub(super) fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}
