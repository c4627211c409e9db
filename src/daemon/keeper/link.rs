//! The daemon's side of the keeper link.

use super::wire::ConnectError;
use super::*;
use crate::daemon::lease::LeaseKey;
use crate::daemon::record::{id_key, key_id};
use log::{error, info, warn};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

/// The daemon's link to its keeper.
#[derive(Debug)]
pub struct Keeper {
    pub(super) path: PathBuf,
    pub(super) conn: Option<OwnedFd>,
    /// The keeper's pid, for log lines.
    pub pid: u32,
    /// The protocol version the keeper announced (1 for keepers that predate batches).
    pub version: u32,
    pub(super) rx: Receiver,
    /// The link broke on our side (a send or receive failed) since the last `take_broken`:
    /// the event loop hands every lease over again by itself (docs/reliability.md).
    pub(super) broke: bool,
    /// This link's keeper was started by this process (not found running): after a lost
    /// link, a keeper replaced (metrics, journal event).
    pub started_new: bool,
    /// Test seam: a link that only records what it is told (recording.rs).
    #[cfg(test)]
    pub(super) recording: Option<Box<super::recording::Recording>>,
}

impl Keeper {
    /// Connect to the keeper at `path`, starting one when none runs. Returns the link and
    /// what a previous daemon left with the keeper (empty for a new keeper).
    pub fn attach(path: &Path) -> Result<(Keeper, Vec<Entry>), String> {
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            crate::daemon::listen::check_private_dir(dir, "the keeper socket")?;
        }
        let (conn, existing) = match connect_to(path) {
            Ok(c) => (c, true),
            Err(ConnectError::Absent(_)) => (spawn(path)?, false),
            Err(ConnectError::Impostor(why)) => {
                error!(
                    "{why}; removing that socket and starting lockwardend's own keeper at \
                     {path:?} (find out who created it: the directory must stay private)"
                );
                (spawn(path)?, false)
            }
        };
        let peer = peer_pid(&conn);
        let mut k = Keeper {
            path: path.to_path_buf(),
            conn: Some(conn),
            pid: 0,
            version: 1,
            rx: Receiver::new(),
            broke: false,
            started_new: false,
            #[cfg(test)]
            recording: None,
        };
        let held = k.hello()?;
        if peer.is_some_and(|p| p != k.pid) {
            return Err(format!(
                "the keeper at {path:?} says it is pid {} but the socket's listener is pid {}; \
                 refusing it (is another program using that path?)",
                k.pid,
                peer.unwrap_or(0)
            ));
        }
        k.started_new = !existing;
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
            broke: false,
            started_new: false,
            #[cfg(test)]
            recording: None,
        }
    }

    /// Test seam: a link to no process that records what it is told (recording.rs).
    #[cfg(test)]
    pub fn recording() -> Keeper {
        let mut k = Keeper::detached(PathBuf::from("(recording keeper)"));
        k.version = KEEPER_PROTOCOL;
        k.recording = Some(Box::default());
        k
    }

    /// What a recording link was told (None for a real one).
    #[cfg(test)]
    pub fn recorded(&self) -> Option<&super::recording::Recording> {
        self.recording.as_deref()
    }

    /// The recording link's state, to make it fail (None for a real one).
    #[cfg(test)]
    pub fn recorded_mut(&mut self) -> Option<&mut super::recording::Recording> {
        self.recording.as_deref_mut()
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
    /// answer is dropped and the event loop reconnects by itself.
    pub fn restored(path: PathBuf, fd: OwnedFd, pid: u32) -> Keeper {
        let mut k = Keeper {
            path,
            conn: Some(fd),
            pid,
            version: 1,
            rx: Receiver::new(),
            broke: false,
            started_new: false,
            #[cfg(test)]
            recording: None,
        };
        if let Err(e) = k.hello() {
            warn!("{e}; lockwardend reconnects and re-sends every lease by itself");
        }
        k
    }

    /// Did the link break on our side since the last call? (Clears the mark.)
    pub fn take_broken(&mut self) -> bool {
        std::mem::take(&mut self.broke)
    }

    /// Is a keeper connected?
    pub fn connected(&self) -> bool {
        #[cfg(test)]
        if let Some(r) = &self.recording {
            return r.up;
        }
        self.conn.is_some()
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
        #[cfg(test)]
        if let Some(r) = self.recording.as_mut() {
            return r.ensure();
        }
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
        #[cfg(test)]
        if let Some(r) = self.recording.as_mut() {
            let sent = r.hold(holds);
            self.broke |= sent.is_err();
            return sent;
        }
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
        #[cfg(test)]
        if let Some(r) = self.recording.as_mut() {
            return r.release(keys);
        }
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
        #[cfg(test)]
        if let Some(r) = self.recording.as_mut() {
            return r.reset();
        }
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

    pub(super) fn dump(&mut self) -> Result<Vec<Entry>, String> {
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

    pub(super) fn call(&mut self, msg: &ToKeeper<'_>) -> Result<Ack, String> {
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

    /// A refused batch drops the link: the event loop reconnects and re-sends everything,
    /// so no later answer can be mistaken for this one's.
    fn ack_or_break(&mut self) -> Result<Ack, String> {
        self.ack().map_err(|e| self.broken(e))
    }

    pub(super) fn send(&mut self, msg: &ToKeeper<'_>, fds: &[RawFd]) -> Result<(), String> {
        let Some(fd) = &self.conn else {
            return Err("no keeper is connected".into());
        };
        let r = send_msg(fd.as_raw_fd(), msg, fds);
        r.map_err(|e| self.broken(e))
    }

    pub(super) fn recv(&mut self) -> Result<(Ack, Vec<OwnedFd>), String> {
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
        self.broke = true;
        if self.pid == 0 {
            // Before its hello: no pid is known yet.
            return format!("lost the keeper at {:?}: {why}", self.path);
        }
        format!(
            "lost the keeper (pid {}) at {:?}: {why}",
            self.pid, self.path
        )
    }
}

/// The pid of the process that listens at the other end of `conn` (SO_PEERCRED).
fn peer_pid(conn: &OwnedFd) -> Option<u32> {
    nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .and_then(|c| u32::try_from(c.pid()).ok())
}
