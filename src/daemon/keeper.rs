//! The keeper: a small process that holds a duplicate of every lease's descriptor, so that no
//! crash, SIGKILL or stop of lockwardend ever drops a lock of a running VM.
//!
//! Why it works: an OFD lock belongs to the open file description, not to a process. The
//! daemon sends each lease's descriptor (and its lockspace directory's) to the keeper over a
//! `SOCK_SEQPACKET` socket with `SCM_RIGHTS`; while the keeper holds that duplicate, the
//! description — and the lock on it — survives whatever happens to the daemon. A restarted
//! daemon connects to the keeper's well-known socket, gets every descriptor back with the
//! lease's record (owners, names, mode), rebuilds its tables and carries on.
//!
//! Ordering (see docs/reliability.md): a lease is reported to the client only after the keeper
//! acknowledged holding it; a lease is dropped from the keeper (acknowledged) before the daemon
//! unlocks and closes its own descriptor. So a crash at any point leaves either a lease the
//! keeper holds (and the restarted daemon knows) or no lock at all, never an orphan.
//!
//! The keeper watches the owners' pids itself (pidfds): when every owner of a lease has exited
//! it closes the lease's descriptors, even while no daemon runs, so a VM that dies during an
//! outage frees its disks. It exits when it holds nothing and no daemon is connected.
//!
//! Process: double-forked from the daemon (no exec), in its own session, every inherited
//! descriptor closed except its socket and stderr, no threads. Its wire protocol is frozen at
//! version 1 and only ever extended compatibly, because after a live upgrade of the daemon the
//! old keeper keeps running.

use super::lease::LeaseKey;
use super::record::{id_key, key_id};
use log::{error, info, warn};
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, accept4, bind, connect, getsockopt, listen, recvmsg, sendmsg, socket, sockopt,
};
use nix::sys::stat::{Mode, umask};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Version of the daemon-keeper protocol.
pub const KEEPER_PROTOCOL: u32 = 1;
/// Largest message either side sends (a lease record with its owners).
const MAX_MSG: usize = 256 * 1024;
/// Descriptors per message: the lock file and, for lockspace leases, its directory.
const MAX_FDS: usize = 2;
/// A keeper that does not answer within this time is considered gone.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// An owner pid the keeper watches, with its start time to recognise pid reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watch {
    pub pid: u32,
    #[serde(default)]
    pub start: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum ToKeeper {
    Hello {
        version: u32,
    },
    /// Hold (or replace) lease `id`: the message carries its descriptors.
    Hold {
        id: [u64; 2],
        pids: Vec<Watch>,
        meta: serde_json::Value,
    },
    Drop {
        id: [u64; 2],
    },
    /// Drop every lease (the daemon re-sends what it holds).
    Reset,
    /// Send every lease back (descriptors included), then `End`.
    Dump,
    /// The daemon stops: exit if nothing is held.
    Quit,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Ack {
    #[serde(default)]
    ok: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    pid: u32,
    #[serde(default)]
    held: usize,
    #[serde(default)]
    version: u32,
    /// Dump: one lease per message, `end` on the last one.
    #[serde(default)]
    entry: Option<DumpEntry>,
    #[serde(default)]
    end: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct DumpEntry {
    id: [u64; 2],
    pids: Vec<Watch>,
    meta: serde_json::Value,
}

/// A lease handed back by the keeper.
#[derive(Debug)]
pub struct Entry {
    pub key: LeaseKey,
    pub meta: serde_json::Value,
    pub fds: Vec<OwnedFd>,
}

/// One lease to hand to the keeper.
pub struct Hold<'a> {
    pub key: LeaseKey,
    pub pids: Vec<Watch>,
    pub meta: serde_json::Value,
    pub fds: Vec<BorrowedFd<'a>>,
}

/// `<dir>/<stem>-keeper.sock` for the main socket `<dir>/<stem>.sock`: the default main socket
/// gives `lockwardend-keeper.sock`, and two daemons with different sockets get two keepers.
pub fn path_for(main_socket: &Path) -> PathBuf {
    let name = main_socket
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "lockwardend.sock".into());
    let stem = name.strip_suffix(".sock").unwrap_or(&name);
    main_socket.with_file_name(format!("{stem}-keeper.sock"))
}

// ---------------------------------------------------------------------------------------------
// The daemon's side

/// The daemon's link to its keeper.
#[derive(Debug)]
pub struct Keeper {
    path: PathBuf,
    conn: Option<OwnedFd>,
    /// The keeper's pid, for log lines.
    pub pid: u32,
}

impl Keeper {
    /// Connect to the keeper at `path`, starting one when none runs. Returns the link and
    /// what a previous daemon left with the keeper (empty for a new keeper).
    pub fn attach(path: &Path) -> Result<(Keeper, Vec<Entry>), String> {
        let (conn, existing) = match connect_to(path) {
            Ok(c) => (c, true),
            Err(_) => (spawn(path)?, false),
        };
        let mut k = Keeper {
            path: path.to_path_buf(),
            conn: Some(conn),
            pid: 0,
        };
        let ack = k.call(&ToKeeper::Hello {
            version: KEEPER_PROTOCOL,
        })?;
        k.pid = ack.pid;
        let entries = if existing && ack.held > 0 {
            k.dump()?
        } else {
            Vec::new()
        };
        if existing {
            info!(
                "reconnected to the keeper (pid {}) at {:?}; it holds {} lease(s)",
                k.pid, k.path, ack.held
            );
        } else {
            info!("started the keeper (pid {}) at {:?}", k.pid, k.path);
        }
        Ok((k, entries))
    }

    /// No link yet (filled in by a live re-exec's state, or by `ensure`).
    pub fn detached(path: PathBuf) -> Keeper {
        Keeper {
            path,
            conn: None,
            pid: 0,
        }
    }

    /// Forget a link that failed (the peer hung up); the next `ensure` reconnects.
    pub fn disconnect(&mut self) {
        if self.conn.take().is_some() {
            warn!(
                "the keeper (pid {}) at {:?} went away; starting a new one",
                self.pid, self.path
            );
        }
    }

    /// A link carried over a live re-exec.
    pub fn restored(path: PathBuf, fd: OwnedFd, pid: u32) -> Keeper {
        Keeper {
            path,
            conn: Some(fd),
            pid,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn raw_fd(&self) -> Option<RawFd> {
        self.conn.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Reconnect (or start a new keeper) after the link broke. Ok(true): the link is new and
    /// the keeper must be told everything again.
    pub fn ensure(&mut self) -> Result<bool, String> {
        if self.conn.is_some() {
            return Ok(false);
        }
        let (k, _) = Keeper::attach(&self.path)?;
        *self = k;
        Ok(true)
    }

    /// Hand leases to the keeper and wait until it holds all of them.
    pub fn hold(&mut self, holds: &[Hold<'_>]) -> Result<(), String> {
        for h in holds {
            let msg = ToKeeper::Hold {
                id: key_id(h.key),
                pids: h.pids.clone(),
                meta: h.meta.clone(),
            };
            let raw: Vec<RawFd> = h.fds.iter().map(AsRawFd::as_raw_fd).collect();
            self.send(&msg, &raw)?;
        }
        for _ in holds {
            self.ack()?;
        }
        Ok(())
    }

    /// Tell the keeper to close its copy of lease `key`, and wait until it did.
    pub fn release(&mut self, key: LeaseKey) -> Result<(), String> {
        if self.conn.is_none() {
            return Ok(());
        }
        self.call(&ToKeeper::Drop { id: key_id(key) }).map(drop)
    }

    pub fn reset(&mut self) -> Result<(), String> {
        self.call(&ToKeeper::Reset).map(drop)
    }

    /// The daemon stops. Returns how many leases the keeper keeps holding.
    pub fn quit(&mut self) -> Result<usize, String> {
        let ack = self.call(&ToKeeper::Quit)?;
        if ack.held == 0 {
            // Wait for the keeper to close the link: it has removed its socket and exits.
            let mut buf = [0u8; 64];
            if let Some(fd) = &self.conn {
                let _ = nix::unistd::read(fd, &mut buf);
            }
        }
        self.conn = None;
        Ok(ack.held)
    }

    fn dump(&mut self) -> Result<Vec<Entry>, String> {
        self.send(&ToKeeper::Dump, &[])?;
        let mut out = Vec::new();
        loop {
            let (ack, fds) = self.recv()?;
            if ack.end {
                return Ok(out);
            }
            let Some(e) = ack.entry else {
                return Err(self.broken("the keeper sent a malformed lease".into()));
            };
            out.push(Entry {
                key: id_key(e.id),
                meta: e.meta,
                fds,
            });
        }
    }

    fn call(&mut self, msg: &ToKeeper) -> Result<Ack, String> {
        self.send(msg, &[])?;
        self.ack()
    }

    fn ack(&mut self) -> Result<Ack, String> {
        let (ack, _) = self.recv()?;
        if ack.ok {
            Ok(ack)
        } else {
            Err(format!(
                "the keeper refused: {}",
                ack.error.unwrap_or_default()
            ))
        }
    }

    fn send(&mut self, msg: &ToKeeper, fds: &[RawFd]) -> Result<(), String> {
        let Some(fd) = &self.conn else {
            return Err("no keeper is connected".into());
        };
        let r = send_msg(fd.as_raw_fd(), msg, fds);
        r.map_err(|e| self.broken(e))
    }

    fn recv(&mut self) -> Result<(Ack, Vec<OwnedFd>), String> {
        let Some(fd) = &self.conn else {
            return Err("no keeper is connected".into());
        };
        let r = match recv_msg(fd.as_raw_fd()) {
            Ok(None) => Err("the keeper closed the connection".to_string()),
            Ok(Some((bytes, fds))) => serde_json::from_slice::<Ack>(&bytes)
                .map(|a| (a, fds))
                .map_err(|e| format!("the keeper sent a malformed answer: {e}")),
            Err(e) => Err(e),
        };
        r.map_err(|e| self.broken(e))
    }

    fn broken(&mut self, why: String) -> String {
        self.conn = None;
        format!(
            "lost the keeper (pid {}) at {:?}: {why}",
            self.pid, self.path
        )
    }
}

fn seqpacket() -> Result<OwnedFd, String> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("cannot create a socket for the keeper: {}", e.desc()))
}

fn connect_to(path: &Path) -> Result<OwnedFd, String> {
    let fd = seqpacket()?;
    let addr = UnixAddr::new(path).map_err(|e| format!("keeper socket {path:?}: {}", e.desc()))?;
    connect(fd.as_raw_fd(), &addr).map_err(|e| e.desc().to_string())?;
    set_timeouts(&fd);
    Ok(fd)
}

fn set_timeouts(fd: &OwnedFd) {
    let tv = nix::sys::time::TimeVal::new(IO_TIMEOUT.as_secs() as _, 0);
    let _ = nix::sys::socket::setsockopt(fd, sockopt::ReceiveTimeout, &tv);
    let _ = nix::sys::socket::setsockopt(fd, sockopt::SendTimeout, &tv);
}

fn send_msg<T: Serialize>(fd: RawFd, msg: &T, fds: &[RawFd]) -> Result<(), String> {
    let bytes = serde_json::to_vec(msg).map_err(|e| format!("cannot encode: {e}"))?;
    if bytes.len() > MAX_MSG {
        return Err(format!(
            "a keeper message of {} bytes exceeds the {MAX_MSG}-byte limit",
            bytes.len()
        ));
    }
    let iov = [IoSlice::new(&bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    loop {
        match sendmsg::<()>(fd, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(format!("send failed: {}", e.desc())),
        }
    }
}

/// One message's bytes and the descriptors that came with it.
type Message = (Vec<u8>, Vec<OwnedFd>);

/// One message; None at end of file.
fn recv_msg(fd: RawFd) -> Result<Option<Message>, String> {
    let mut buf = vec![0u8; MAX_MSG];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(format!("receive failed: {}", e.desc())),
        };
        let mut fds = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    for r in raw {
                        // SAFETY: the kernel just installed this descriptor for us (SCM_RIGHTS);
                        // nobody else owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                    }
                }
            }
        }
        let (n, flags) = (msg.bytes, msg.flags);
        if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
            return Err("a message or its descriptors were truncated".into());
        }
        if n == 0 && fds.is_empty() {
            return Ok(None);
        }
        buf.truncate(n);
        return Ok(Some((buf, fds)));
    }
}

/// Start a keeper at `path` and return a connection to it.
fn spawn(path: &Path) -> Result<OwnedFd, String> {
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
    // SAFETY: lockwardend is single-threaded, so the child may run any code; the intermediate
    // child only calls setsid, fork and _exit.
    match unsafe { nix::unistd::fork() } {
        Err(e) => {
            let _ = fs::remove_file(path);
            return Err(format!("cannot fork the keeper: {}", e.desc()));
        }
        Ok(nix::unistd::ForkResult::Child) => {
            let _ = nix::unistd::setsid();
            // SAFETY: as above; the grandchild becomes the keeper, re-parented to init.
            match unsafe { nix::unistd::fork() } {
                Ok(nix::unistd::ForkResult::Child) => {
                    drop(ready_r);
                    keeper_main(listener, ready_w, path.to_path_buf(), ident)
                }
                // SAFETY: _exit ends the intermediate child without running any destructor.
                _ => unsafe { libc::_exit(0) },
            }
        }
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

// ---------------------------------------------------------------------------------------------
// The keeper process

struct Held {
    pids: Vec<Watch>,
    meta: serde_json::Value,
    fds: Vec<OwnedFd>,
}

struct KeeperProc {
    listener: OwnedFd,
    path: PathBuf,
    ident: (u64, u64),
    conn: Option<OwnedFd>,
    held: BTreeMap<[u64; 2], Held>,
    watched: HashMap<u32, OwnedFd>,
    euid: u32,
    /// A daemon said hello at least once.
    greeted: bool,
}

/// Close every descriptor but stdin/stdout/stderr and `keep`.
fn close_all_but(keep: &[RawFd]) {
    let mut keep: Vec<RawFd> = keep.to_vec();
    keep.sort_unstable();
    let mut from: RawFd = 3;
    for k in keep.into_iter().chain(std::iter::once(RawFd::MAX)) {
        if k > from {
            // SAFETY: close_range(from, k - 1, 0) closes descriptors; no memory is involved.
            // Nothing in this freshly forked single-threaded process uses them any more.
            unsafe { libc::syscall(libc::SYS_close_range, from as u32, (k - 1) as u32, 0) };
        }
        from = k.saturating_add(1);
    }
}

fn keeper_main(listener: OwnedFd, ready: OwnedFd, path: PathBuf, ident: (u64, u64)) -> ! {
    close_all_but(&[listener.as_raw_fd(), ready.as_raw_fd()]);
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
    unsafe { libc::prctl(libc::PR_SET_NAME, c"lockwardend-kpr".as_ptr(), 0, 0, 0) };
    if let Err(e) = listen(&listener, Backlog::new(16).unwrap_or(Backlog::MAXCONN)) {
        error!("keeper: cannot listen on {path:?}: {}", e.desc());
        // SAFETY: _exit without destructors, in the forked keeper.
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
        euid: nix::unistd::geteuid().as_raw(),
        greeted: false,
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

    fn run(&mut self) -> ! {
        let mut pfds: Vec<libc::pollfd> = Vec::new();
        let mut toks: Vec<Tok> = Vec::new();
        // A new keeper waits (boundedly) for the daemon that started it to say hello; a
        // connection that never does (a probe) does not count.
        loop {
            let first = !self.greeted;
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
            for (pid, fd) in &self.watched {
                pfds.push(pollfd(fd.as_raw_fd()));
                toks.push(Tok::Pid(*pid));
            }
            let timeout = if first {
                IO_TIMEOUT.as_millis() as libc::c_int
            } else {
                -1
            };
            // SAFETY: a valid, exclusively borrowed pollfd array of the given length.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
            if n == 0 && first {
                self.exit("was started but no lockwardend connected");
            }
            if n < 0 {
                continue;
            }
            let ready: Vec<Tok> = pfds
                .iter()
                .zip(toks.iter())
                .filter(|(p, _)| p.revents != 0)
                .map(|(_, t)| *t)
                .collect();
            for t in ready {
                match t {
                    Tok::Listener => self.accept(),
                    Tok::Conn => self.serve(),
                    Tok::Pid(pid) => self.owner_gone(pid),
                }
            }
        }
    }

    fn accept(&mut self) {
        let fd = match accept4(self.listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            // SAFETY: accept4 returned a new descriptor that nobody else owns.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
            Err(_) => return,
        };
        match getsockopt(&fd, sockopt::PeerCredentials) {
            Ok(c) if c.uid() == self.euid => {
                info!(
                    "keeper (pid {}): lockwardend pid {} connected; {} lease(s) held",
                    self.me(),
                    c.pid(),
                    self.held.len()
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

    fn serve(&mut self) {
        let Some(fd) = self.conn.as_ref().map(AsRawFd::as_raw_fd) else {
            return;
        };
        let (bytes, fds) = match recv_msg(fd) {
            Ok(Some(m)) => m,
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
                return;
            }
        };
        let reply = match serde_json::from_slice::<ToKeeper>(&bytes) {
            Ok(msg) => self.handle(fd, msg, fds),
            Err(e) => Ack {
                error: Some(format!(
                    "keeper protocol {KEEPER_PROTOCOL}: bad message: {e}"
                )),
                ..Ack::default()
            },
        };
        if send_msg(fd, &reply, &[]).is_err() {
            self.conn = None;
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

    fn handle(&mut self, fd: RawFd, msg: ToKeeper, fds: Vec<OwnedFd>) -> Ack {
        match msg {
            ToKeeper::Hello { .. } => {
                self.greeted = true;
                self.ok()
            }
            ToKeeper::Hold { id, pids, meta } => {
                if fds.is_empty() {
                    return Ack {
                        error: Some("hold without a descriptor".into()),
                        ..Ack::default()
                    };
                }
                self.held.insert(id, Held { pids, meta, fds });
                self.watch();
                self.ok()
            }
            ToKeeper::Drop { id } => {
                self.held.remove(&id);
                self.watch();
                self.ok()
            }
            ToKeeper::Reset => {
                self.held.clear();
                self.watch();
                self.ok()
            }
            ToKeeper::Dump => {
                for (id, h) in &self.held {
                    let ack = Ack {
                        ok: true,
                        entry: Some(DumpEntry {
                            id: *id,
                            pids: h.pids.clone(),
                            meta: h.meta.clone(),
                        }),
                        ..Ack::default()
                    };
                    let raw: Vec<RawFd> = h.fds.iter().map(AsRawFd::as_raw_fd).collect();
                    if send_msg(fd, &ack, &raw).is_err() {
                        break;
                    }
                }
                Ack {
                    end: true,
                    ..self.ok()
                }
            }
            ToKeeper::Quit => {
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
        }
    }

    fn pids(&self) -> HashSet<u32> {
        self.held
            .values()
            .flat_map(|h| h.pids.iter().map(|w| w.pid))
            .collect()
    }

    /// Watch every owner pid of a held lease; forget pids no lease names any more.
    fn watch(&mut self) {
        let wanted: HashMap<u32, Option<u64>> = self
            .held
            .values()
            .flat_map(|h| h.pids.iter().map(|w| (w.pid, w.start)))
            .collect();
        self.watched.retain(|pid, _| wanted.contains_key(pid));
        let mut dead = Vec::new();
        for (pid, start) in wanted {
            if self.watched.contains_key(&pid) {
                continue;
            }
            match super::pidfd::Proc::reopen(pid, start) {
                // Without pidfds (old kernels) only a restarted daemon notices the death.
                Ok(p) => {
                    if let Some(fd) = p.into_fd() {
                        self.watched.insert(pid, fd);
                    }
                }
                Err(_) => dead.push(pid),
            }
        }
        for pid in dead {
            self.owner_gone(pid);
        }
    }

    /// Owner `pid` exited: leases it was the last owner of are closed (their locks drop).
    fn owner_gone(&mut self, pid: u32) {
        self.watched.remove(&pid);
        let me = self.me();
        self.held.retain(|_, h| {
            h.pids.retain(|w| w.pid != pid);
            if h.pids.is_empty() {
                let name = h.meta.get("name").and_then(|n| n.as_str()).unwrap_or("?");
                info!("keeper (pid {me}): owner pid {pid} exited; dropped its lease {name:?}");
                false
            } else {
                true
            }
        });
        self.watch();
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

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}
