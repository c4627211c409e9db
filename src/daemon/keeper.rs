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
//! Ordering (see docs/reliability.md): a lease is reported to the client only after its
//! descriptors are in the keeper's socket (`sendmsg` returned: from then on the kernel keeps
//! the open file descriptions alive for the keeper, whatever happens to the daemon); a lease is
//! dropped from the keeper before the daemon unlocks and closes its own descriptor. The keeper
//! reads its one connection in order and drains it to the end before it serves a restarted
//! daemon, so a crash at any point leaves either a lease the keeper holds (and the restarted
//! daemon knows) or no lock at all, never an orphan.
//!
//! Batches (protocol version 2): all leases of one request travel in one `hold_batch` message
//! (every descriptor by `SCM_RIGHTS`, split only past `SCM_MAX_FD` descriptors or ~192 KiB of
//! records) and are acknowledged once; releases are one `drop_batch`. A daemon that finds an
//! older keeper (version 1, still running after a live upgrade) falls back to one `hold` or
//! `drop` per lease, which every keeper understands.
//!
//! Quiet batches (protocol version 3): the daemon marks batches `quiet` and does not wait for
//! an answer — a round trip to another process per request was a third of a 1-disk acquire.
//! The keeper answers a quiet batch only by hanging up when it cannot take it (the daemon
//! then starts over and hands every lease over again), and after a quiet batch it sleeps a
//! few milliseconds before reading on, so a busy daemon's batches are taken a handful at a
//! time instead of waking the keeper for every one.
//!
//! The keeper watches the owners' pids itself (pidfds): when every owner of a lease has exited
//! it closes the lease's descriptors, even while no daemon runs, so a VM that dies during an
//! outage frees its disks. It exits when it holds nothing and no daemon is connected.
//!
//! Process: double-forked from the daemon (no exec), in its own session, every inherited
//! descriptor closed except its socket and stderr, no threads. Its wire protocol is only ever
//! extended compatibly (new message types, announced by the version in `hello`'s answer),
//! because after a live upgrade of the daemon the old keeper keeps running.

use super::keptmeta::{KeptMeta, Tails};
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

/// Version of the daemon-keeper protocol this binary speaks. 1: hello, hold, drop, reset,
/// dump, quit. 2: adds hold_batch and drop_batch. 3: batches may be `quiet` (unanswered).
pub const KEEPER_PROTOCOL: u32 = 3;
/// First version that understands batches.
const BATCH_VERSION: u32 = 2;
/// First version that understands quiet batches.
const QUIET_VERSION: u32 = 3;
/// How long the keeper sleeps after a quiet batch before it reads the next message: the
/// descriptors stay alive in its socket meanwhile, and the daemon never waits for it.
const QUIET_WINDOW: Duration = Duration::from_millis(3);
/// Messages the keeper reads in one go after waking, before it looks at owner pids again.
const DRAIN_MAX: usize = 256;
/// The daemon's send buffer on the keeper link: room for the quiet batches of a busy burst
/// while the keeper sleeps (a full buffer only makes `sendmsg` wait for the keeper).
const SEND_BUFFER: usize = 1 << 20;
/// Largest message either side sends or receives (version 1 keepers accept no more).
const MAX_MSG: usize = 256 * 1024;
/// A batch is split before its records reach this size, leaving room for the envelope.
const BATCH_BYTES: usize = 192 * 1024;
/// Descriptors per message: the kernel's SCM_MAX_FD. (Version 1 messages carry 1-2.)
const MAX_FDS: usize = 253;
/// Lease ids per drop_batch message (~45 bytes each).
const DROP_CHUNK: usize = 2048;
/// A keeper that does not answer within this time is considered gone.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// An owner pid the keeper watches, with its start time to recognise pid reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watch {
    pub pid: u32,
    #[serde(default)]
    pub start: Option<u64>,
}

/// A message to the keeper, as the daemon writes it (`op` tags the kind; the keeper reads
/// it through the flat [`Incoming`] so that no intermediate tree is built).
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum ToKeeper<'a> {
    Hello {
        version: u32,
    },
    /// Version 1: hold (or replace) lease `id`; the message carries its descriptors.
    Hold {
        id: [u64; 2],
        pids: &'a [Watch],
        meta: serde_json::Value,
    },
    Drop {
        id: [u64; 2],
    },
    /// Version 2: hold (or replace) every lease in `entries`; the message carries their
    /// descriptors in order, `fds` of them per entry. One acknowledgement for all, none when
    /// `quiet` (version 3).
    HoldBatch {
        entries: Vec<BatchEntry<'a>>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        quiet: bool,
    },
    /// Version 2: drop every lease in `ids`; one acknowledgement, none when `quiet`.
    DropBatch {
        ids: &'a [[u64; 2]],
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        quiet: bool,
    },
    /// Drop every lease (the daemon re-sends what it holds).
    Reset,
    /// Send every lease back (descriptors included), then `End`.
    Dump,
    /// The daemon stops: exit if nothing is held.
    Quit,
}

/// One lease of a `hold_batch`: `meta` is the lease record as JSON text (kept verbatim).
#[derive(Debug, Serialize)]
struct BatchEntry<'a> {
    id: [u64; 2],
    pids: &'a [Watch],
    meta: &'a str,
    fds: u8,
}

/// What the keeper reads: every field of every message kind, flat (same wire format as the
/// tagged `ToKeeper`, decoded without serde's buffering of internally tagged enums).
#[derive(Debug, Default, Deserialize)]
struct Incoming {
    op: String,
    #[serde(default)]
    id: Option<[u64; 2]>,
    #[serde(default)]
    pids: Vec<Watch>,
    #[serde(default)]
    meta: Option<serde_json::Value>,
    #[serde(default)]
    entries: Vec<IncomingEntry>,
    #[serde(default)]
    ids: Vec<[u64; 2]>,
    /// Version 3: answer only by hanging up on failure.
    #[serde(default)]
    quiet: bool,
}

#[derive(Debug, Deserialize)]
struct IncomingEntry {
    id: [u64; 2],
    #[serde(default)]
    pids: Vec<Watch>,
    meta: String,
    fds: u8,
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

/// One lease to hand to the keeper; `meta` is its record as JSON text.
pub struct Hold<'a> {
    pub key: LeaseKey,
    pub pids: Vec<Watch>,
    pub meta: String,
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
    /// The protocol version the keeper announced (1 for keepers that predate batches).
    pub version: u32,
    rx: Receiver,
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
            version: 1,
            rx: Receiver::new(),
        };
        let held = k.hello()?;
        let entries = if existing && held > 0 {
            k.dump()?
        } else {
            Vec::new()
        };
        if existing {
            info!(
                "reconnected to the keeper (pid {}, protocol {}) at {:?}; it holds {} lease(s)",
                k.pid, k.version, k.path, held
            );
        } else {
            info!("started the keeper (pid {}) at {:?}", k.pid, k.path);
        }
        Ok((k, entries))
    }

    /// Say hello: learn the keeper's pid and protocol version. Returns how many leases it holds.
    fn hello(&mut self) -> Result<usize, String> {
        let ack = self.call(&ToKeeper::Hello {
            version: KEEPER_PROTOCOL,
        })?;
        self.pid = ack.pid;
        // Version 1 keepers answer with their version too; 0 would be a keeper that never
        // said, which only version 1 could be.
        self.version = ack.version.max(1);
        Ok(ack.held)
    }

    /// No link yet (filled in by a live re-exec's state, or by `ensure`).
    pub fn detached(path: PathBuf) -> Keeper {
        Keeper {
            path,
            conn: None,
            pid: 0,
            version: 1,
            rx: Receiver::new(),
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

    /// A link carried over a live re-exec. The keeper may be older than this binary (it is
    /// not re-executed), so ask it again which protocol it speaks; a link that does not
    /// answer is dropped and the next request reconnects.
    pub fn restored(path: PathBuf, fd: OwnedFd, pid: u32) -> Keeper {
        let mut k = Keeper {
            path,
            conn: Some(fd),
            pid,
            version: 1,
            rx: Receiver::new(),
        };
        if let Err(e) = k.hello() {
            warn!("{e}; the next lock request reconnects and re-sends every lease");
        }
        k
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

    /// Hand leases to the keeper: one quiet message per batch (version 3: done once sent, see
    /// the module doc), one message and one acknowledgement per batch (version 2), or one of
    /// each per lease for a version 1 keeper.
    pub fn hold(&mut self, holds: &[Hold<'_>]) -> Result<(), String> {
        if holds.is_empty() {
            return Ok(());
        }
        if self.version < BATCH_VERSION {
            return self.hold_one_by_one(holds);
        }
        let quiet = self.version >= QUIET_VERSION;
        let mut sent = 0;
        let mut rest = holds;
        while !rest.is_empty() {
            let (mut n, mut fds, mut bytes) = (0, 0, 0);
            for h in rest {
                let more_fds = fds + h.fds.len();
                let more_bytes = bytes + h.meta.len() + 64 + 24 * h.pids.len();
                if n > 0 && (more_fds > MAX_FDS || more_bytes > BATCH_BYTES) {
                    break;
                }
                (n, fds, bytes) = (n + 1, more_fds, more_bytes);
            }
            let (chunk, tail) = rest.split_at(n.min(rest.len()));
            rest = tail;
            let entries = chunk
                .iter()
                .map(|h| BatchEntry {
                    id: key_id(h.key),
                    pids: &h.pids,
                    meta: &h.meta,
                    fds: h.fds.len() as u8,
                })
                .collect();
            let raw: Vec<RawFd> = chunk
                .iter()
                .flat_map(|h| h.fds.iter().map(AsRawFd::as_raw_fd))
                .collect();
            self.send(&ToKeeper::HoldBatch { entries, quiet }, &raw)?;
            sent += 1;
        }
        // Pipelined: every chunk is acknowledged on its own, in order (unless quiet).
        self.acks(sent, quiet)
    }

    fn hold_one_by_one(&mut self, holds: &[Hold<'_>]) -> Result<(), String> {
        for h in holds {
            let meta = serde_json::from_str(&h.meta)
                .map_err(|e| format!("cannot encode a lease record: {e}"))?;
            let msg = ToKeeper::Hold {
                id: key_id(h.key),
                pids: &h.pids,
                meta,
            };
            let raw: Vec<RawFd> = h.fds.iter().map(AsRawFd::as_raw_fd).collect();
            self.send(&msg, &raw)?;
        }
        for _ in holds {
            self.ack()?;
        }
        Ok(())
    }

    /// Tell the keeper to close its copies of `keys` (and, before version 3, wait until it
    /// did; the daemon's own explicit unlock is what drops the lock either way).
    pub fn release(&mut self, keys: &[LeaseKey]) -> Result<(), String> {
        if self.conn.is_none() || keys.is_empty() {
            return Ok(());
        }
        let ids: Vec<[u64; 2]> = keys.iter().map(|k| key_id(*k)).collect();
        if self.version < BATCH_VERSION {
            for id in &ids {
                self.send(&ToKeeper::Drop { id: *id }, &[])?;
            }
            for _ in &ids {
                self.ack()?;
            }
            return Ok(());
        }
        let quiet = self.version >= QUIET_VERSION;
        let mut sent = 0;
        for chunk in ids.chunks(DROP_CHUNK) {
            self.send(&ToKeeper::DropBatch { ids: chunk, quiet }, &[])?;
            sent += 1;
        }
        self.acks(sent, quiet)
    }

    /// Wait for the answers of `sent` batches, unless they were quiet.
    fn acks(&mut self, sent: usize, quiet: bool) -> Result<(), String> {
        if !quiet {
            for _ in 0..sent {
                self.ack_or_break()?;
            }
        }
        Ok(())
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

    fn call(&mut self, msg: &ToKeeper<'_>) -> Result<Ack, String> {
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

    /// A refused batch drops the link: the next request reconnects and re-sends everything,
    /// so no later answer can be mistaken for this one's.
    fn ack_or_break(&mut self) -> Result<Ack, String> {
        self.ack().map_err(|e| self.broken(e))
    }

    fn send(&mut self, msg: &ToKeeper<'_>, fds: &[RawFd]) -> Result<(), String> {
        let Some(fd) = &self.conn else {
            return Err("no keeper is connected".into());
        };
        let r = send_msg(fd.as_raw_fd(), msg, fds);
        r.map_err(|e| self.broken(e))
    }

    fn recv(&mut self) -> Result<(Ack, Vec<OwnedFd>), String> {
        let Some(fd) = self.conn.as_ref().map(AsRawFd::as_raw_fd) else {
            return Err("no keeper is connected".into());
        };
        let r = match self.rx.recv(fd) {
            Ok(None) => Err("the keeper closed the connection".to_string()),
            Ok(Some((bytes, fds))) => serde_json::from_slice::<Ack>(bytes)
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
    // Root may exceed net.core.wmem_max; others get what the limit allows.
    if nix::sys::socket::setsockopt(fd, sockopt::SndBufForce, &SEND_BUFFER).is_err() {
        let _ = nix::sys::socket::setsockopt(fd, sockopt::SndBuf, &SEND_BUFFER);
    }
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

/// One message's bytes (in the receiver's buffer) and the descriptors that came with it.
type Message<'a> = (&'a [u8], Vec<OwnedFd>);

/// One receive buffer (and control buffer) per side, allocated once: a message is received
/// into it and parsed from the bytes that arrived, so nothing is zero-filled per message and
/// only the pages the largest message touched are ever resident.
struct Receiver {
    buf: Vec<u8>,
    cmsg: Vec<u8>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Receiver")
    }
}

impl Receiver {
    fn new() -> Receiver {
        Receiver {
            buf: Vec::new(),
            cmsg: nix::cmsg_space!([RawFd; MAX_FDS]),
        }
    }

    /// One message: its bytes and the descriptors that came with it; None at end of file.
    fn recv(&mut self, fd: RawFd) -> Result<Option<Message<'_>>, String> {
        if self.buf.len() < MAX_MSG {
            // calloc'd once: untouched pages cost nothing.
            self.buf = vec![0u8; MAX_MSG];
        }
        loop {
            let mut iov = [IoSliceMut::new(&mut self.buf)];
            let msg = match recvmsg::<()>(
                fd,
                &mut iov,
                Some(&mut self.cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(format!("receive failed: {}", e.desc())),
            };
            let mut fds = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for r in raw {
                            // SAFETY: the kernel just installed this descriptor for us
                            // (SCM_RIGHTS); nobody else owns it.
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
            return Ok(self.buf.get(..n).map(|b| (b, fds)));
        }
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

/// One held lease, kept small (the keeper holds every lease of the host): the record is the
/// JSON text the daemon sent (kept compactly, given back verbatim: keptmeta.rs), and the
/// descriptors are inline.
struct Held {
    pids: Box<[Watch]>,
    meta: KeptMeta,
    fd: OwnedFd,
    dir: Option<OwnedFd>,
}

/// A watched owner pid: its pidfd (none on kernels without pidfds), its start time, and how
/// many held leases name it, so that holding or dropping a lease costs nothing per other lease.
/// A pid no lease names any more stays watched (idle, up to [`IDLE_WATCHES`]) until it exits:
/// a paused VM resumes, and opening a pidfd and reading /proc/PID/stat again for every
/// acquire was most of the keeper's work in a steady acquire/release loop.
struct Watched {
    fd: Option<OwnedFd>,
    start: Option<u64>,
    refs: usize,
}

/// Idle watched pids kept beyond those that hold leases.
const IDLE_WATCHES: usize = 256;

struct KeeperProc {
    listener: OwnedFd,
    path: PathBuf,
    ident: (u64, u64),
    conn: Option<OwnedFd>,
    held: BTreeMap<[u64; 2], Held>,
    watched: HashMap<u32, Watched>,
    /// Owners found gone while holding: their leases are dropped after the current message.
    dead: Vec<u32>,
    rx: Receiver,
    euid: u32,
    /// A daemon said hello at least once.
    greeted: bool,
    /// Copies the daemon let go of during the current message: closed after the answer, on
    /// the closer thread (a close can block on a hung mount — FUSE and NFS flush on close —
    /// and must not stop the keeper from answering; the daemon's explicit unlock, not this
    /// close, is what drops the lock).
    /// Per device (`st_dev`), so one hung mount's closes never delay another's.
    closing: Vec<(u64, Held)>,
    closers: HashMap<u64, std::sync::mpsc::Sender<Vec<Held>>>,
    /// The record tails the held leases share.
    tails: Tails,
}

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
    super::logging::forget_pid();
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
        dead: Vec::new(),
        rx: Receiver::new(),
        euid: nix::unistd::geteuid().as_raw(),
        greeted: false,
        closing: Vec::new(),
        closers: HashMap::new(),
        tails: Tails::default(),
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
        let mut ready: Vec<Tok> = Vec::new();
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
            for (pid, w) in &self.watched {
                if let Some(fd) = &w.fd {
                    pfds.push(pollfd(fd.as_raw_fd()));
                    toks.push(Tok::Pid(*pid));
                }
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
            let mut p = [pollfd(fd)];
            // SAFETY: a valid, exclusively borrowed pollfd array of length 1; timeout 0.
            if unsafe { libc::poll(p.as_mut_ptr(), 1, 0) } <= 0 {
                break;
            }
        }
        if quiet {
            std::thread::sleep(QUIET_WINDOW);
        }
    }

    /// Read and handle one message. Returns whether it was a quiet batch.
    fn serve(&mut self) -> bool {
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
        let mut by_dev: HashMap<u64, Vec<Held>> = HashMap::new();
        for (dev, h) in std::mem::take(&mut self.closing) {
            by_dev.entry(dev).or_default().push(h);
        }
        for (dev, batch) in by_dev {
            if let std::collections::hash_map::Entry::Vacant(slot) = self.closers.entry(dev) {
                let (tx, rx) = std::sync::mpsc::channel::<Vec<Held>>();
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
                self.put(id, msg.pids, meta, lock, fds.next());
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
                for e in msg.entries {
                    let (Some(lock), dir) = (fds.next(), (e.fds == 2).then(|| fds.next())) else {
                        break;
                    };
                    self.put(e.id, e.pids, e.meta, lock, dir.flatten());
                }
                self.ok()
            }
            "drop" => {
                if let Some(id) = msg.id {
                    self.take(&id);
                }
                self.ok()
            }
            "drop_batch" => {
                for id in &msg.ids {
                    self.take(id);
                }
                self.ok()
            }
            "reset" => {
                let all = std::mem::take(&mut self.held);
                self.closing
                    .extend(all.into_iter().map(|(id, h)| (id[0], h)));
                self.watched.clear();
                self.ok()
            }
            "dump" => {
                for (id, h) in &self.held {
                    let ack = Ack {
                        ok: true,
                        entry: Some(DumpEntry {
                            id: *id,
                            pids: h.pids.to_vec(),
                            meta: serde_json::from_str(&h.meta.text())
                                .unwrap_or(serde_json::Value::Null),
                        }),
                        ..Ack::default()
                    };
                    let mut raw = vec![h.fd.as_raw_fd()];
                    raw.extend(h.dir.as_ref().map(AsRawFd::as_raw_fd));
                    if send_msg(fd, &ack, &raw).is_err() {
                        break;
                    }
                }
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
    fn put(
        &mut self,
        id: [u64; 2],
        pids: Vec<Watch>,
        meta: String,
        fd: OwnedFd,
        dir: Option<OwnedFd>,
    ) {
        for w in &pids {
            self.watch(*w);
        }
        let held = Held {
            pids: pids.into_boxed_slice(),
            meta: KeptMeta::new(meta, &mut self.tails),
            fd,
            dir,
        };
        if let Some(old) = self.held.insert(id, held) {
            self.unwatch(&old.pids);
            self.closing.push((id[0], old));
        }
    }

    /// Close the keeper's copies of lease `id`.
    fn take(&mut self, id: &[u64; 2]) {
        if let Some(old) = self.held.remove(id) {
            self.unwatch(&old.pids);
            self.closing.push((id[0], old));
        }
    }

    fn pids(&self) -> HashSet<u32> {
        self.held
            .values()
            .flat_map(|h| h.pids.iter().map(|w| w.pid))
            .collect()
    }

    /// One more held lease names `w.pid`: watch it (a pidfd checked against its start time).
    /// A pid that is already gone is noted in `dead`.
    fn watch(&mut self, w: Watch) {
        if let Some(e) = self.watched.get_mut(&w.pid) {
            // The same process (or one of unknown start time): count it. Another process with
            // a reused pid: watch it afresh (its exit is reported through the new pidfd).
            if w.start.is_none() || e.start.is_none() || e.start == w.start {
                e.refs += 1;
                return;
            }
            self.watched.remove(&w.pid);
        }
        match super::pidfd::Proc::reopen(w.pid, w.start) {
            // Without pidfds (old kernels) only a restarted daemon notices the death.
            Ok(p) => {
                let start = p.start;
                self.watched.insert(
                    w.pid,
                    Watched {
                        fd: p.into_fd(),
                        start,
                        refs: 1,
                    },
                );
            }
            Err(_) => self.dead.push(w.pid),
        }
    }

    /// A held lease naming these pids is gone: pids no lease names any more become idle (see
    /// [`Watched`]); past [`IDLE_WATCHES`] idle ones, they are all forgotten.
    fn unwatch(&mut self, pids: &[Watch]) {
        let mut idled = false;
        for w in pids {
            if let Some(e) = self.watched.get_mut(&w.pid) {
                e.refs = e.refs.saturating_sub(1);
                idled |= e.refs == 0;
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
    fn owner_gone(&mut self, pid: u32) {
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
        for id in gone {
            let Some(h) = self.held.remove(&id) else {
                continue;
            };
            let name = serde_json::from_str::<serde_json::Value>(&h.meta.text())
                .ok()
                .and_then(|m| m.get("name").and_then(|n| n.as_str()).map(String::from))
                .unwrap_or_else(|| "?".into());
            info!("keeper (pid {me}): owner pid {pid} exited; dropped its lease {name:?}");
            // Closing is what drops the lock here; it may block on a hung mount, so it too
            // happens on that device's closer thread.
            self.closing.push((id[0], h));
        }
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

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::socketpair;

    /// A keeper in this process serving `conn` (no fork, no listener in use).
    fn test_keeper(conn: OwnedFd) -> KeeperProc {
        KeeperProc {
            listener: seqpacket().unwrap(),
            path: PathBuf::from("/nonexistent/lockwarden-test-keeper.sock"),
            ident: (0, 0),
            conn: Some(conn),
            held: BTreeMap::new(),
            watched: HashMap::new(),
            dead: Vec::new(),
            rx: Receiver::new(),
            euid: 0,
            greeted: false,
            closing: Vec::new(),
            closers: HashMap::new(),
            tails: Tails::default(),
        }
    }

    /// A keeper serving one end of a socket pair on a thread (no fork, no listener in use);
    /// returns how many messages it read and how many leases it held at the end.
    fn serve_on_thread(conn: OwnedFd) -> std::thread::JoinHandle<(usize, usize)> {
        std::thread::spawn(move || {
            let mut k = test_keeper(conn);
            let mut messages = 0;
            while k.conn.is_some() {
                k.serve();
                messages += 1;
            }
            // The last read was the end of file.
            (messages - 1, k.held.len())
        })
    }

    fn link(version: u32) -> (Keeper, std::thread::JoinHandle<(usize, usize)>) {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let server = serve_on_thread(b);
        let k = Keeper {
            path: PathBuf::new(),
            conn: Some(a),
            pid: 0,
            version,
            rx: Receiver::new(),
        };
        (k, server)
    }

    fn held_now(k: &mut Keeper) -> usize {
        k.call(&ToKeeper::Hello {
            version: KEEPER_PROTOCOL,
        })
        .unwrap()
        .held
    }

    fn holds<'a>(files: &'a [fs::File], dir: &'a fs::File) -> Vec<Hold<'a>> {
        let pid = std::process::id();
        files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let mut fds = vec![f.as_fd()];
                if i % 2 == 1 {
                    fds.push(dir.as_fd());
                }
                Hold {
                    key: LeaseKey {
                        dev: 1,
                        ino: i as u64,
                    },
                    pids: vec![Watch { pid, start: None }],
                    meta: format!("{{\"name\":\"disk{i}\",\"text\":\"a \\\"quoted\\\" name\"}}"),
                    fds,
                }
            })
            .collect()
    }

    #[test]
    fn a_request_is_one_batch_message_chunked_past_scm_max_fd() {
        let files: Vec<fs::File> = (0..300).map(|_| tempfile::tempfile().unwrap()).collect();
        let dir = fs::File::open("/").unwrap();
        let (mut k, server) = link(KEEPER_PROTOCOL);
        // 300 leases with 450 descriptors: two messages of at most 253 descriptors.
        k.hold(&holds(&files, &dir)).unwrap();
        assert_eq!(held_now(&mut k), 300);
        let keys: Vec<LeaseKey> = (0..300).map(|i| LeaseKey { dev: 1, ino: i }).collect();
        k.release(&keys).unwrap();
        assert_eq!(held_now(&mut k), 0);
        // The records come back verbatim.
        k.hold(&holds(&files[..2], &dir)).unwrap();
        let entries = k.dump().unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].fds.len(), 2);
        assert_eq!(entries[1].meta["text"], "a \"quoted\" name");
        drop(k);
        let (messages, held) = server.join().unwrap();
        // hold (2 chunks) + hello + drop_batch + hello + hold + dump
        assert_eq!(messages, 7);
        assert_eq!(held, 2);
    }

    #[test]
    fn an_old_keeper_gets_one_message_per_lease() {
        let files: Vec<fs::File> = (0..3).map(|_| tempfile::tempfile().unwrap()).collect();
        let dir = fs::File::open("/").unwrap();
        // A daemon that found a version 1 keeper (after a live upgrade) only sends what
        // version 1 understands: hold and drop, one lease each.
        let (mut k, server) = link(1);
        k.hold(&holds(&files, &dir)).unwrap();
        assert_eq!(held_now(&mut k), 3);
        k.release(&[LeaseKey { dev: 1, ino: 0 }, LeaseKey { dev: 1, ino: 2 }])
            .unwrap();
        assert_eq!(held_now(&mut k), 1);
        drop(k);
        let (messages, held) = server.join().unwrap();
        assert_eq!(messages, 3 + 1 + 2 + 1);
        assert_eq!(held, 1);
    }

    #[test]
    fn a_version_2_keeper_acknowledges_every_batch() {
        let files: Vec<fs::File> = (0..3).map(|_| tempfile::tempfile().unwrap()).collect();
        let dir = fs::File::open("/").unwrap();
        let (mut k, server) = link(2);
        k.hold(&holds(&files, &dir)).unwrap();
        k.release(&[LeaseKey { dev: 1, ino: 1 }]).unwrap();
        // Both answers were read: the next call gets its own answer, not a stale one.
        assert_eq!(held_now(&mut k), 2);
        drop(k);
        assert_eq!(server.join().unwrap(), (3, 2));
    }

    #[test]
    fn a_quiet_batch_is_not_answered_and_a_failed_one_hangs_up() {
        let files: Vec<fs::File> = (0..2).map(|_| tempfile::tempfile().unwrap()).collect();
        let dir = fs::File::open("/").unwrap();
        let (mut k, server) = link(KEEPER_PROTOCOL);
        k.hold(&holds(&files, &dir)).unwrap();
        k.release(&[LeaseKey { dev: 1, ino: 0 }]).unwrap();
        // Nothing is waiting in our socket: the quiet batches were not answered.
        let fd = k.raw_fd().unwrap();
        let mut p = [pollfd(fd)];
        // SAFETY: a valid pollfd array of length 1.
        assert_eq!(unsafe { libc::poll(p.as_mut_ptr(), 1, 0) }, 0);
        assert_eq!(held_now(&mut k), 1);
        // A quiet batch that names more descriptors than it carries: the keeper hangs up.
        let bad = ToKeeper::HoldBatch {
            entries: vec![BatchEntry {
                id: [1, 9],
                pids: &[],
                meta: "{}",
                fds: 2,
            }],
            quiet: true,
        };
        k.send(&bad, &[files[0].as_raw_fd()]).unwrap();
        let end = k.recv().unwrap_err();
        assert!(end.contains("closed the connection"), "{end}");
        let (messages, held) = server.join().unwrap();
        // hold + drop + hello + the bad batch, minus the end of file `serve_on_thread`
        // expects last (the keeper hung up instead).
        assert_eq!((messages, held), (3, 1));
    }

    #[test]
    fn a_dead_owner_frees_its_leases_and_watches_are_counted() {
        let files: Vec<fs::File> = (0..2).map(|_| tempfile::tempfile().unwrap()).collect();
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let mut k = test_keeper(b);
        drop(a);
        let me = Watch {
            pid: std::process::id(),
            start: None,
        };
        let fd = |i: usize| files[i].try_clone().unwrap().into();
        k.put([1, 1], vec![me], "{}".into(), fd(0), None);
        k.put([1, 2], vec![me], "{}".into(), fd(1), None);
        assert_eq!(k.watched[&me.pid].refs, 2);
        // Replacing a lease does not count its owner twice.
        k.put([1, 2], vec![me], "{}".into(), fd(1), None);
        assert_eq!(k.watched[&me.pid].refs, 2);
        k.take(&[1, 1]);
        assert_eq!(k.watched[&me.pid].refs, 1);
        k.take(&[1, 2]);
        // Still watched, idle: the next lease of this owner needs no new pidfd.
        assert_eq!(k.watched[&me.pid].refs, 0);
        k.put([1, 4], vec![me], "{}".into(), fd(0), None);
        assert_eq!(k.watched[&me.pid].refs, 1);
        k.take(&[1, 4]);
        // A reused pid (another start time) is watched afresh, not counted on the old entry.
        let reused = Watch {
            pid: me.pid,
            start: k.watched[&me.pid].start.map(|s| s + 1),
        };
        k.watch(reused);
        assert!(k.dead.contains(&me.pid), "no such process: noted as gone");
        assert!(!k.watched.contains_key(&me.pid));
        k.dead.clear();
        // An owner that is gone: its lease is dropped after the message.
        let gone = Watch {
            pid: u32::MAX - 1,
            start: None,
        };
        k.put([1, 3], vec![gone], "{}".into(), fd(0), None);
        assert_eq!(k.dead, vec![gone.pid]);
        k.owner_gone(gone.pid);
        assert!(k.held.is_empty());
    }
}
