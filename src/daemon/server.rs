//! The event loop: one thread, one epoll instance over listeners, clients, owner pidfds, the
//! keeper link, the storage completions and the signalfd, and timers.
//!
//! Registrations are made once and changed only when they change (docs/architecture.md, "The
//! event loop"): listeners and the fixed descriptors at start, a connection when it is admitted
//! (its interest moved between read, write and nothing as it needs) and removed before it is
//! closed, an owner's pidfd when the owner table reports the pid changed
//! ([`super::owner::Owners::take_changed`]), so a round costs what is ready, not what is open.
//!
//! Why single-threaded: every decision about a lease depends on the whole table, and a single
//! thread makes each request atomic without a lock in sight. Nothing in the loop waits for a
//! client: sockets are non-blocking, partial frames wait in buffers, and owner termination is a
//! sequence of deadlines, and nothing waits on storage: file system calls on network, FUSE
//! or unknown mounts run on that mount's worker threads (storage.rs, docs/storage.md).

use super::clocks::Clocks;
use super::conn::{Conn, Fill, Next};
use super::dispatch::{self, Session};
use super::listen::{Listener, Role};
use super::owner::ConnId;
use super::pidfile::PidFile;
use super::reexec::{self, Doc};
use super::signals::Signals;
use super::state::State;
use super::sys::{self, Interest, Poller, Ready};
use crate::protocol::{self, ErrorKind, FrameError, PROTOCOL_VERSION, Request, Response};
use log::{debug, error, info, warn};
use nix::sys::signal::Signal;
use nix::sys::socket::{getsockopt, sockopt};
use std::collections::{HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A refused client gets this long to send its first frame and read why it was refused.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Beyond `max_clients`, this many more are accepted only to be told why they are refused.
const REFUSAL_SLACK: usize = 64;
/// Every connection's clock is recorded again this often, whether or not it was touched: a
/// safety net under [`Server::clocks`] for a change no path marked (O(connections) once a
/// second instead of every round).
const CLOCK_SWEEP: Duration = Duration::from_secs(1);
/// Pause accepting this long when the process is out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(200);
/// A live re-exec waits this long for requests waiting on storage before failing them.
const REEXEC_WAIT: Duration = Duration::from_secs(1);
/// Size of the shared read buffer.
const SCRATCH: usize = 64 * 1024;
/// A keeper link lost again within this time after a full hand-over is not retried at once.
const KEEPER_RETRY: Duration = Duration::from_secs(1);

/// How many times a stopping daemon tries to leave every lease with a keeper, and the pause
/// between tries.
const EXIT_TRIES: usize = 5;
const EXIT_RETRY: Duration = Duration::from_millis(200);

/// What an epoll registration stands for. An owner's carries the serial of its registration,
/// so a report left over from an earlier pidfd of the same pid is told apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    Signal,
    Listener(usize),
    Conn(ConnId),
    Owner { pid: u32, serial: u32 },
    Keeper,
    Storage,
}

/// The kind sits in the token's top byte, the value below it.
const KIND_SHIFT: u32 = 56;
const VALUE_MASK: u64 = (1 << KIND_SHIFT) - 1;

impl Token {
    fn encode(self) -> u64 {
        let (kind, value) = match self {
            Token::Signal => (0, 0),
            Token::Listener(n) => (1, n as u64),
            Token::Conn(id) => (2, id),
            Token::Owner { pid, serial } => {
                (3, (u64::from(serial & 0xff_ffff) << 32) | u64::from(pid))
            }
            Token::Keeper => (4, 0),
            Token::Storage => (5, 0),
        };
        (kind << KIND_SHIFT) | (value & VALUE_MASK)
    }

    fn decode(t: u64) -> Option<Token> {
        let value = t & VALUE_MASK;
        Some(match t >> KIND_SHIFT {
            0 => Token::Signal,
            1 => Token::Listener(usize::try_from(value).ok()?),
            2 => Token::Conn(value),
            3 => Token::Owner {
                pid: value as u32,
                serial: (value >> 32) as u32,
            },
            4 => Token::Keeper,
            5 => Token::Storage,
            _ => return None,
        })
    }

    /// The order the old poll set had, kept so that what is handled first in a round (a
    /// handle's hang-up before its owner's exit, say) does not depend on epoll's order.
    fn rank(self) -> u8 {
        match self {
            Token::Signal => 0,
            Token::Listener(_) => 1,
            Token::Storage => 2,
            Token::Conn(_) => 3,
            Token::Owner { .. } => 4,
            Token::Keeper => 5,
        }
    }
}

/// Where a live re-exec (SIGHUP, SIGUSR1) stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reexec {
    /// Serving; no re-exec asked for.
    Idle,
    /// Asked for: the exec waits, between rounds, for requests waiting on storage and for
    /// background storage jobs; `since` is when it first had to wait (the grace,
    /// [`REEXEC_WAIT`], runs from there).
    Requested { since: Option<Instant> },
}

impl Reexec {
    fn requested(self) -> bool {
        matches!(self, Reexec::Requested { .. })
    }

    /// When the grace for the requests in flight runs out, once it started.
    fn deadline(self) -> Option<Instant> {
        match self {
            Reexec::Requested { since: Some(t) } => Some(t + REEXEC_WAIT),
            _ => None,
        }
    }
}

/// Why the loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Signal(Signal),
}

pub struct Server {
    pub state: State,
    pub listeners: Vec<Listener>,
    conns: HashMap<ConnId, Conn>,
    next_id: ConnId,
    /// The locked pid file (kept open across a live re-exec).
    pub pid_file: Option<PidFile>,
    /// The binary to exec on SIGHUP/SIGUSR1: this binary's path as found at start.
    pub exe: PathBuf,
    /// How many live re-execs this process went through.
    pub generation: u64,
    reexec: Reexec,
    signals: Signals,
    max_clients: usize,
    euid: u32,
    config_file: String,
    accept_paused_until: Option<Instant>,
    /// When the keeper link was last lost and everything handed over again: a keeper that hangs
    /// up again within [`KEEPER_RETRY`] (it cannot take the leases) is retried at
    /// `keeper_retry_at` (or by an earlier lock request) instead of in a loop.
    keeper_lost_at: Option<Instant>,
    keeper_retry_at: Option<Instant>,
    poller: Poller,
    /// The ready registrations of the round (a buffer reused from round to round).
    events: Vec<Ready>,
    /// Whether the listeners' registrations ask for connections (None: not registered yet).
    listening: Option<bool>,
    /// Owner pids whose pidfd is registered, with the serial in their token.
    owner_regs: HashMap<u32, u32>,
    owner_serial: u32,
    /// Connections served, answered or admitted since their registration was last brought up
    /// to date.
    touched: Vec<ConnId>,
    /// Connections with buffered frames to serve next round (limits.rs), kept up to date with
    /// the registrations.
    backlog: HashSet<ConnId>,
    /// Each connection's next timer deadline (clocks.rs), recorded when it is touched.
    clocks: Clocks<ConnId>,
    /// When every connection's clock is recorded again ([`CLOCK_SWEEP`]).
    next_sweep: Instant,
    scratch: Vec<u8>,
    exit: Option<Exit>,
    /// Poll rounds so far (each connection gets one budget per round, limits.rs).
    round: u64,
}

impl Server {
    pub fn new(
        state: State,
        listeners: Vec<Listener>,
        signals: Signals,
        max_clients: usize,
        config_file: String,
        exe: PathBuf,
    ) -> Result<Server, String> {
        let poller = Poller::new().map_err(|e| {
            format!("cannot create the event loop's epoll instance: {e}; raise the descriptor limit (LimitNOFILE=)")
        })?;
        let server = Server {
            state,
            listeners,
            conns: HashMap::new(),
            next_id: 1,
            pid_file: None,
            exe,
            generation: 0,
            reexec: Reexec::Idle,
            signals,
            max_clients,
            euid: nix::unistd::geteuid().as_raw(),
            config_file,
            accept_paused_until: None,
            keeper_lost_at: None,
            keeper_retry_at: None,
            poller,
            events: Vec::new(),
            listening: None,
            owner_regs: HashMap::new(),
            owner_serial: 0,
            touched: Vec::new(),
            backlog: HashSet::new(),
            clocks: Clocks::default(),
            next_sweep: Instant::now(),
            scratch: vec![0u8; SCRATCH],
            exit: None,
            round: 0,
        };
        let fixed = [
            (server.signals.raw_fd(), Token::Signal),
            (server.state.storage.raw_fd(), Token::Storage),
        ];
        for (fd, token) in fixed {
            server
                .poller
                .add(fd, token.encode(), Interest::READ)
                .map_err(|e| format!("cannot register fd {fd} with epoll: {e}"))?;
        }
        Ok(server)
    }

    /// What a live re-exec writes down and a restore fills in (reexec.rs).
    fn parts(&mut self) -> reexec::Parts<'_> {
        reexec::Parts {
            state: &mut self.state,
            listeners: &mut self.listeners,
            conns: &mut self.conns,
            next_id: &mut self.next_id,
            pid_file: &mut self.pid_file,
            generation: &mut self.generation,
            exe: &self.exe,
        }
    }

    /// Rebuild what the previous image wrote down (`heartbeat`: the new
    /// `heartbeat_interval_ms`); its connections are registered when the loop starts.
    pub fn restore(&mut self, doc: Doc, heartbeat: Option<Duration>) -> Result<(), String> {
        reexec::restore(doc, self.parts(), heartbeat)
    }

    /// Serve until SIGTERM or SIGINT.
    pub fn run(&mut self) -> Result<Exit, String> {
        // Connections carried over a live re-exec are registered in the first round.
        self.touched.extend(self.conns.keys().copied());
        loop {
            if let Some(exit) = self.exit {
                return Ok(exit);
            }
            // Not while a client waits on storage (its answer would be lost with the threads);
            // storage that does not answer within REEXEC_WAIT gets its requests failed first.
            if self.reexec.requested()
                && self.state.waiting() > 0
                && self.reexec_since().elapsed() >= REEXEC_WAIT
            {
                super::route::interrupt(&mut self.state);
                self.deliver();
                for id in self.conns.keys().copied().collect::<Vec<_>>() {
                    if let Some(c) = self.conns.get_mut(&id) {
                        let _ = c.flush();
                        self.touched.push(id);
                    }
                }
            }
            // Disposals and record writes nobody waits for (a VM exit's) get the same grace:
            // cut off by the exec, their lock still drops (close-on-exec) but a side file or a
            // lockd-style lock file would stay behind.
            let settling = self.reexec.requested()
                && self.state.waiting() == 0
                && self.state.background_jobs() > 0
                && self.reexec_since().elapsed() < REEXEC_WAIT;
            if self.reexec.requested() && self.state.waiting() == 0 && !settling {
                self.set_reexec(Reexec::Idle);
                // Between requests: nothing is half-done. Returns only if the exec failed.
                reexec::reexec(self.parts());
            }
            let now = Instant::now();
            self.register(now);
            // Connections with buffered frames left over from the budget of the last round are
            // served this round whether or not poll reports them (limits.rs).
            self.round += 1;
            let ready = self.ready();
            let timeout = if ready.is_empty() && !self.state.storage.has_inline() {
                self.timeout_ms(now)
            } else {
                0
            };
            let mut events = std::mem::take(&mut self.events);
            match self.poller.wait(timeout, &mut events) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                    self.events = events;
                    continue;
                }
                Err(e) => return Err(format!("epoll_wait failed: {e}")),
            }
            let now = Instant::now();
            events.sort_unstable_by_key(|e| Token::decode(e.token).map_or(u8::MAX, Token::rank));
            let accepts = self.accept_budget(!ready.is_empty(), &events);
            for ev in &events {
                let Some(token) = Token::decode(ev.token) else {
                    continue;
                };
                match token {
                    Token::Signal => self.on_signal(),
                    Token::Listener(n) => self.on_accept(n, now, accepts),
                    Token::Conn(id) => self.on_conn(id, ev.events, now),
                    Token::Owner { pid, serial } => {
                        // A report for an earlier registration of this pid (its pidfd closed
                        // while a forked child still shared it) is not this owner's exit.
                        if self.owner_regs.get(&pid) == Some(&serial) {
                            self.owner_gone(pid)
                        }
                    }
                    Token::Keeper => self.keeper_lost(),
                    Token::Storage => super::route::storage_results(&mut self.state),
                }
            }
            self.events = events;
            for id in ready {
                if self.conns.get(&id).is_some_and(|c| c.served != self.round) {
                    self.on_conn(id, 0, now);
                }
            }
            // Work run inline for host-local mounts: its results are handled in this round.
            super::route::inline_results(&mut self.state);
            self.timers(Instant::now());
            self.rearm_keeper();
            super::route::inline_results(&mut self.state);
            self.deliver();
            // Records claimed for the acquires just answered (host-local mounts).
            self.state.write_unwritten();
        }
    }

    /// When the re-exec first had to wait (now, if it has not yet).
    fn reexec_since(&mut self) -> Instant {
        match self.reexec {
            Reexec::Requested { since: Some(t) } => t,
            _ => {
                let now = Instant::now();
                self.reexec = Reexec::Requested { since: Some(now) };
                now
            }
        }
    }

    /// Move the re-exec along; every connection's registration depends on whether one waits.
    fn set_reexec(&mut self, to: Reexec) {
        if self.reexec.requested() != to.requested() {
            self.touched.extend(self.conns.keys().copied());
        }
        self.reexec = to;
    }

    /// Bring the registrations up to date for this round: the listeners (paused or not), the
    /// keeper link, the owners whose pidfd changed, and the connections touched since.
    fn register(&mut self, now: Instant) {
        if self.accept_paused_until.is_some_and(|t| t <= now) {
            self.accept_paused_until = None;
        }
        let accepting = self.accept_paused_until.is_none()
            && self.conns.len() < self.max_clients.saturating_add(REFUSAL_SLACK);
        if self.listening != Some(accepting) {
            let interest = if accepting {
                Interest::READ
            } else {
                Interest::NONE
            };
            for (i, l) in self.listeners.iter().enumerate() {
                let token = Token::Listener(i).encode();
                if let Err(e) = self.poller.set(l.socket.as_raw_fd(), token, interest) {
                    error!(
                        "cannot register the listening socket {:?} with epoll: {e}",
                        l.path
                    );
                }
            }
            self.listening = Some(accepting);
        }
        // The keeper never speaks unasked: anything readable here means it hung up. One call
        // a round: the link may have been replaced by one with the same number, whose
        // registration went with the old socket.
        if let Some(fd) = self.state.keeper.raw_fd() {
            let token = Token::Keeper.encode();
            let r = match self.poller.modify(fd, token, Interest::READ) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    self.poller.add(fd, token, Interest::READ)
                }
                r => r,
            };
            if let Err(e) = r {
                error!(
                    "cannot register the keeper link with epoll: {e}; it is watched again next round"
                );
            }
        }
        for pid in self.state.owners.take_changed() {
            self.register_owner(pid);
        }
        let touched = std::mem::take(&mut self.touched);
        for id in &touched {
            self.register_conn(*id);
        }
        self.touched = touched;
        self.touched.clear();
    }

    /// An owner was added or removed, or its pidfd opened: register its pidfd under a new
    /// serial, or forget it (a closed descriptor's registration went with it).
    fn register_owner(&mut self, pid: u32) {
        let Some(fd) = self.state.owners.get(pid).and_then(|e| e.proc.poll_fd()) else {
            self.owner_regs.remove(&pid);
            return;
        };
        self.owner_serial = self.owner_serial.wrapping_add(1) & 0xff_ffff;
        let serial = self.owner_serial;
        match self
            .poller
            .set(fd, Token::Owner { pid, serial }.encode(), Interest::READ)
        {
            Ok(()) => {
                self.owner_regs.insert(pid, serial);
            }
            Err(e) => {
                // Like a pidfd that could not be opened: the owner's leases stay held.
                error!("cannot watch owner pid {pid} for its exit: epoll_ctl failed: {e}");
                self.owner_regs.remove(&pid);
            }
        }
    }

    /// Ask epoll for what a connection waits for now: to write its answers, to read the next
    /// request, or nothing but a hang-up (its request waits on storage, a re-exec waits for
    /// the requests in flight, it sent end-of-file, or its buffered frames are answered
    /// first); and note whether it has frames to serve next round.
    fn register_conn(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else {
            self.backlog.remove(&id);
            return;
        };
        let want = if c.wants_write() {
            Interest::WRITE
        } else if c.waiting() || c.closing() || self.reexec.requested() || c.eof() || c.actionable()
        {
            Interest::NONE
        } else {
            Interest::READ
        };
        if c.interest != Some(want) {
            let fd = c.stream.as_raw_fd();
            let token = Token::Conn(id).encode();
            let r = match c.interest {
                None => self.poller.add(fd, token, want),
                Some(_) => self.poller.modify(fd, token, want),
            };
            match r {
                Ok(()) => c.interest = Some(want),
                Err(e) => {
                    warn!("closing client {id}: cannot register it with epoll: {e}");
                    self.close(id, Instant::now());
                    return;
                }
            }
        }
        if c.backlog() {
            self.backlog.insert(id);
        } else {
            self.backlog.remove(&id);
        }
        self.clocks.set(id, c.next_deadline(super::limits::get()));
    }

    /// The keeper died (or was killed): our own descriptors still hold every lock, so start a
    /// new keeper and hand it everything before a crash of ours could matter.
    fn keeper_lost(&mut self) {
        self.state.keeper.disconnect();
        let now = Instant::now();
        if let Some(t) = self
            .keeper_lost_at
            .filter(|t| now.saturating_duration_since(*t) < KEEPER_RETRY)
        {
            error!(
                "the keeper hung up again right after taking every lease; lockwardend holds its \
                 leases itself but a crash of it would drop them; retrying in {} ms (check the \
                 keeper's log lines and its descriptor limit)",
                KEEPER_RETRY.as_millis()
            );
            self.keeper_retry_at = Some(t + KEEPER_RETRY);
            return;
        }
        self.rehand(now);
    }

    /// A link that broke on our side (a send or receive failed: a keeper that stopped reading,
    /// a refused batch) is re-established by itself, like one the keeper hung up, with the same
    /// rate limit — never left for the next lock request, since a stop or a crash meanwhile
    /// would drop every lease the keeper does not hold.
    fn rearm_keeper(&mut self) {
        let broke = self.state.keeper.take_broken();
        if broke || (!self.state.keeper.connected() && self.keeper_retry_at.is_none()) {
            warn!(
                "the link to the keeper at {:?} is down; reconnecting and handing every lease \
                 over again",
                self.state.keeper.path()
            );
            self.keeper_lost();
        }
    }

    /// Before exiting: a keeper is connected, holds every lease and is told we stop. Tries
    /// [`EXIT_TRIES`] times (reconnecting or starting a new keeper and handing every lease
    /// over again); returns how many leases the keeper keeps, or why it could not be made to.
    pub fn quit_keeper(&mut self) -> Result<usize, String> {
        let leases = self.state.leases.len();
        if leases == 0 && !self.state.keeper.connected() {
            // Nothing to leave behind: no keeper needs starting just to be told to stop.
            return Ok(0);
        }
        let mut last = String::new();
        let mut full = false;
        for attempt in 0..EXIT_TRIES {
            if attempt > 0 {
                std::thread::sleep(EXIT_RETRY);
            }
            let broke = self.state.keeper.take_broken();
            if broke || full || !self.state.keeper.connected() || self.keeper_retry_at.is_some() {
                // Not connected (or told to stop already): reconnect (or start a new keeper),
                // reset it and hand every lease over.
                if let Err(e) = self.state.protect(&[]) {
                    warn!(
                        "before stopping: {e}; retrying ({}/{EXIT_TRIES})",
                        attempt + 1
                    );
                    last = e;
                    continue;
                }
                self.keeper_retry_at = None;
            }
            match self.state.keeper.quit() {
                Ok(held) if held < leases && !full => {
                    warn!(
                        "before stopping: the keeper holds {held} of {leases} lease(s); handing \
                         every lease over again"
                    );
                    full = true;
                }
                Ok(held) => return Ok(held),
                Err(e) => {
                    warn!(
                        "before stopping: {e}; retrying ({}/{EXIT_TRIES})",
                        attempt + 1
                    );
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Hand every lease to a (new) keeper.
    fn rehand(&mut self, now: Instant) {
        self.keeper_lost_at = Some(now);
        self.keeper_retry_at = None;
        if let Err(e) = self.state.protect(&[]) {
            error!(
                "{e}; lockwardend holds its leases itself but a crash of it would drop them; \
                retrying in {} ms and at every lock request",
                KEEPER_RETRY.as_millis()
            );
            self.keeper_retry_at = Some(now + KEEPER_RETRY);
        }
    }

    /// Milliseconds until the next deadline (rounded up), or -1 for none.
    fn timeout_ms(&mut self, now: Instant) -> libc::c_int {
        let reexec = self.reexec.deadline();
        let next = self
            .state
            .next_deadline()
            .into_iter()
            .chain(reexec)
            .chain(self.keeper_retry_at)
            .chain(self.clocks.next())
            .chain((!self.conns.is_empty()).then_some(self.next_sweep))
            .chain(self.accept_paused_until)
            .min();
        match next {
            None => -1,
            Some(t) => {
                let d = t.saturating_duration_since(now);
                let ms = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 != 0);
                libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
            }
        }
    }

    /// An owner process exited: its leases go, its handles (if any) stop being handles.
    fn owner_gone(&mut self, pid: u32) {
        for id in super::release::owner_exited(&mut self.state, pid) {
            if let Some(c) = self.conns.get_mut(&id) {
                c.session.handle_of = None;
                // No longer a lifetime handle: its idle clock runs from now on.
                self.touched.push(id);
            }
        }
    }

    /// Hand answers that waited on storage to their connections, and serve what those
    /// connections sent meanwhile.
    fn deliver(&mut self) {
        let clients = self.conns.len();
        let mut failed = Vec::new();
        for f in self.state.ledger.take_finished() {
            let Some(conn) = self.conns.get_mut(&f.conn) else {
                continue;
            };
            conn.answered();
            self.touched.push(f.conn);
            if f.restrict && matches!(f.response, Response::Ok { .. }) {
                conn.session.restricted = true;
            }
            conn.queue(&f.response);
            serve(&mut self.state, conn, clients);
            // Send now rather than after another poll round: the client is waiting for it.
            match conn.flush() {
                Ok(true) if conn.closing() => failed.push(f.conn),
                Ok(_) => {}
                Err(e) => {
                    debug!("client {}: write failed: {e}", f.conn);
                    failed.push(f.conn);
                }
            }
        }
        let now = Instant::now();
        for id in failed {
            self.close(id, now);
        }
        if self.state.ledger.has_finished() {
            self.deliver();
        }
    }

    fn timers(&mut self, now: Instant) {
        if self.keeper_retry_at.is_some_and(|t| t <= now) {
            self.rehand(now);
        }
        super::route::expire(&mut self.state, now);
        super::lost::tick(&mut self.state, now);
        super::heartbeat::tick(&mut self.state, now);
        super::keepalive::tick(&mut self.state, now);
        for pid in self.state.run_timers(now) {
            self.owner_gone(pid);
        }
        // Refused, stalled (half a frame), deaf (answers unread) and idle connections
        // (limits.rs, conn.rs); never a lifetime handle.
        let limits = super::limits::get();
        if now >= self.next_sweep {
            self.next_sweep = now + CLOCK_SWEEP;
            for (id, c) in &self.conns {
                self.clocks.set(*id, c.next_deadline(limits));
            }
        }
        let mut expired = Vec::new();
        for id in self.clocks.due(now) {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            match c.expired(now, limits) {
                Some(why) => expired.push((id, c.session.peer_pid, why)),
                None => self.clocks.set(id, c.next_deadline(limits)),
            }
        }
        for (id, pid, why) in expired {
            log::log!(why.level(), "closing client {id} (pid {pid}): {why}");
            self.close(id, now);
        }
    }

    /// Connections whose buffered frames can be answered now (limits.rs: the rest of a
    /// pipelined batch); none while a re-exec waits for the requests in flight.
    fn ready(&self) -> Vec<ConnId> {
        if self.reexec.requested() {
            return Vec::new();
        }
        self.backlog.iter().copied().collect()
    }

    /// Connections a listener may accept this round: fewer while clients have requests to be
    /// read or answered, so a connect storm cannot crowd out their requests.
    fn accept_budget(&self, backlog: bool, events: &[Ready]) -> usize {
        let reading = events
            .iter()
            .any(|e| matches!(Token::decode(e.token), Some(Token::Conn(_))) && e.input());
        if backlog || reading {
            super::limits::ACCEPTS_PER_ROUND_BUSY
        } else {
            super::limits::ACCEPTS_PER_ROUND
        }
    }

    fn on_signal(&mut self) {
        while let Some(sig) = self.signals.pending() {
            match sig {
                Signal::SIGTERM | Signal::SIGINT => {
                    info!("received {sig}; shutting down");
                    self.exit = Some(Exit::Signal(sig));
                }
                Signal::SIGHUP | Signal::SIGUSR1 => {
                    info!("received {sig}; re-executing {:?} (live upgrade)", self.exe);
                    if !self.reexec.requested() {
                        self.set_reexec(Reexec::Requested { since: None });
                    }
                }
                other => debug!("ignoring {other}"),
            }
        }
    }

    fn on_accept(&mut self, n: usize, now: Instant, budget: usize) {
        for _ in 0..budget {
            let Some(l) = self.listeners.get(n) else {
                return;
            };
            let admin = l.role == Role::Admin;
            // Non-blocking from the start (no separate FIONBIO per client).
            match sys::accept(&l.socket, true) {
                Ok(fd) => self.admit(UnixStream::from(fd), admin, now),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                    if fds {
                        error!(
                            "cannot accept a client: {e}; raise the descriptor limit \
                             (LimitNOFILE=) or lower max_clients"
                        );
                    } else {
                        warn!("cannot accept a client: {e}");
                    }
                    self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    /// Take a new client (accepted non-blocking): check its uid and the client limit.
    fn admit(&mut self, stream: UnixStream, admin: bool, now: Instant) {
        let cred = match getsockopt(&stream, sockopt::PeerCredentials) {
            Ok(c) => c,
            Err(e) => {
                warn!("dropping a client: SO_PEERCRED failed: {}", e.desc());
                return;
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let session = Session {
            id,
            admin,
            peer_pid: cred.pid(),
            restricted: false,
            handle_of: None,
        };
        let mut conn = Conn::new(stream, session);
        if cred.uid() != self.euid {
            warn!(
                "refusing client pid {} with uid {}: only uid {} may talk to this lockwardend",
                cred.pid(),
                cred.uid(),
                self.euid
            );
            conn.refusal = Some(Response::error(
                ErrorKind::Denied,
                format!(
                    "lockwardend accepts only clients running as uid {} (its own user); this \
                     client (pid {}) runs as uid {}; run it as uid {}",
                    self.euid,
                    cred.pid(),
                    cred.uid(),
                    self.euid
                ),
            ));
            conn.deadline = Some(now + REFUSAL_TIMEOUT);
        } else if self.conns.len() >= self.max_clients {
            warn!(
                "refusing client pid {}: {} clients connected (max_clients)",
                cred.pid(),
                self.conns.len()
            );
            conn.refusal = Some(Response::error(
                ErrorKind::Internal,
                format!(
                    "lockwardend already serves its maximum of {} clients; raise max_clients in \
                     {} (each running VM keeps one connection)",
                    self.max_clients, self.config_file
                ),
            ));
            conn.deadline = Some(now + REFUSAL_TIMEOUT);
        } else {
            debug!(
                "client {id} connected: pid {} uid {}{}",
                cred.pid(),
                cred.uid(),
                if admin { " (admin socket)" } else { "" }
            );
        }
        self.conns.insert(id, conn);
        self.touched.push(id);
    }

    /// Serve a connection: `events` as epoll reported them (0 for one served from its
    /// backlog).
    fn on_conn(&mut self, id: ConnId, events: u32, now: Instant) {
        let clients = self.conns.len();
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        self.touched.push(id);
        let ev = Ready { token: 0, events };
        let readable = ev.readable();
        let mut close = false;
        if conn.waiting() {
            if ev.hangup() {
                debug!("client {id} hung up while its request waited on storage");
                self.close(id, now);
            }
            return;
        }
        conn.served = self.round;
        if !conn.closing() && !conn.wants_write() {
            // Read only when the buffered frames are answered (limits.rs); serve within the
            // round's budget, whether or not anything new arrived.
            if readable && !conn.eof() && !conn.actionable() {
                match conn.fill(&mut self.scratch, now) {
                    Ok(Fill::Eof) => conn.end_of_file(),
                    Ok(Fill::Open) => {}
                    Err(e) => {
                        debug!("client {id}: read failed: {e}");
                        close = true;
                    }
                }
            }
            if !close {
                serve(&mut self.state, conn, clients);
            }
        }
        if !close {
            match conn.flush() {
                Ok(true) => close = conn.closing(),
                Ok(false) => {}
                Err(e) => {
                    debug!("client {id}: write failed: {e}");
                    close = true;
                }
            }
        }
        if close {
            self.close(id, now);
        }
    }

    fn close(&mut self, id: ConnId, now: Instant) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        self.backlog.remove(&id);
        self.clocks.set(id, None);
        if conn.interest.is_some() {
            // Before the descriptor closes (a forked child may share it for a moment).
            if let Err(e) = self.poller.remove(conn.stream.as_raw_fd()) {
                debug!("client {id}: epoll_ctl(DEL) failed: {e}");
            }
        }
        debug!("client {id} disconnected");
        if conn.waiting() {
            super::route::cancel(&mut self.state, id);
        }
        if let Some(pid) = conn.session.handle_of {
            super::release::handle_closed(&mut self.state, pid, id, now);
        }
    }

    /// The VMs that hold leases, for a log line: `"name" (pid N), ...`.
    pub fn vms_holding(&self) -> String {
        let mut vms: Vec<String> = self
            .state
            .owners
            .iter()
            .filter(|(_, e)| !e.leases.is_empty())
            .map(|(pid, e)| format!("{:?} (pid {pid})", e.owner.name))
            .collect();
        vms.sort();
        vms.join(", ")
    }

    /// How many leases and owners are held, for the shutdown message.
    pub fn held(&self) -> (usize, usize) {
        (self.state.leases.len(), self.state.owners.len())
    }
}

/// Answer the complete frames in the read buffer, at most `FRAMES_PER_ROUND` (limits.rs); a
/// peer that sent end-of-file is closed once nothing is left.
fn serve(state: &mut State, conn: &mut Conn, clients: usize) {
    serve_frames(state, conn, clients);
    conn.settle_eof();
}

fn serve_frames(state: &mut State, conn: &mut Conn, clients: usize) {
    for _ in 0..super::limits::FRAMES_PER_ROUND {
        if conn.closing() || conn.waiting() {
            return;
        }
        let next = conn.next();
        if matches!(next, Next::Incomplete) {
            return;
        }
        if let Some(refusal) = conn.refusal.take() {
            conn.queue(&refusal);
            conn.close_after_flush();
            return;
        }
        let (version, len) = match next {
            Next::Incomplete => return,
            Next::Bad(e) => {
                debug!("client {}: {e}", conn.session.id);
                conn.queue(&Response::error(
                    ErrorKind::Invalid,
                    format!("{e}; closing the connection"),
                ));
                conn.close_after_flush();
                return;
            }
            Next::Header { version, len } => (version, len),
        };
        if version != PROTOCOL_VERSION {
            warn!(
                "client {} (pid {}) speaks protocol version {version}; closing it",
                conn.session.id, conn.session.peer_pid
            );
            conn.queue(&Response::error(
                ErrorKind::Version,
                FrameError::Version(version).to_string(),
            ));
            conn.close_after_flush();
            return;
        }
        let Some(body) = conn.body(len) else {
            return;
        };
        let parsed = protocol::decode::<Request>(body);
        conn.consume(len);
        let resp = match parsed {
            Ok(req) => match dispatch::handle(state, &mut conn.session, req, clients) {
                Some(r) => r,
                None => {
                    conn.wait();
                    return;
                }
            },
            Err(e) => Response::error(
                ErrorKind::Invalid,
                format!(
                    "{e}; the request was ignored (is the client the same lockwarden version?)"
                ),
            ),
        };
        conn.queue(&resp);
    }
}
