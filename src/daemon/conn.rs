//! One client connection: a non-blocking socket with its read and write buffers.
//!
//! Why buffers: the event loop must never wait for one client, so partial frames are kept
//! until complete and responses the socket cannot take yet are kept until it can. A response
//! is serialised straight into the write buffer (no per-request frame allocation once the
//! buffer has grown), and buffers that grew for a big frame shrink back afterwards.
//!
//! Bounds (docs/hardening.md): the read buffer grows only as bytes arrive (a header announcing
//! 1 MiB reserves nothing), by fallible allocation, to at most one maximal frame; at most
//! [`READ_PER_ROUND`] bytes are read per poll round, and nothing more is read while a complete
//! frame waits to be answered, so a pipelining client is held back by its own socket buffer.
//! A frame must be complete `request_read_timeout_ms` after its first byte, and a connection
//! with nothing in flight that is not a lifetime handle is closed after `idle_timeout_ms`.

use super::dispatch::Session;
use super::limits::{Limits, READ_PER_ROUND};
use super::sys::Interest;
use crate::protocol::{
    self, ErrorKind, FrameError, HEADER_LEN, MAX_BODY, PROTOCOL_VERSION, Response,
};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Buffers above this capacity are shrunk when they empty.
const KEEP_CAPACITY: usize = 64 * 1024;

/// Why a connection is closed by a timer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expired {
    /// A refused connection did not send its first frame in time.
    Refused,
    /// A frame stayed incomplete too long (`request_read_timeout_ms`).
    Stalled { bytes: usize, waited: Duration },
    /// The peer did not read its answers for `request_read_timeout_ms`.
    Unread { bytes: usize, waited: Duration },
    /// Nothing happened on it for `idle_timeout_ms`.
    Idle { waited: Duration },
}

impl Expired {
    /// How loudly to log it: a stalled or deaf peer is worth a warning, the rest is routine.
    pub fn level(&self) -> log::Level {
        match self {
            Expired::Stalled { .. } | Expired::Unread { .. } => log::Level::Warn,
            Expired::Refused | Expired::Idle { .. } => log::Level::Debug,
        }
    }
}

impl std::fmt::Display for Expired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expired::Refused => write!(f, "it was refused and sent nothing in time"),
            Expired::Stalled { bytes, waited } => write!(
                f,
                "it sent {bytes} bytes of a request and then nothing for {} ms \
                 (request_read_timeout_ms)",
                waited.as_millis()
            ),
            Expired::Unread { bytes, waited } => write!(
                f,
                "it left {bytes} bytes of answers unread for {} ms (request_read_timeout_ms)",
                waited.as_millis()
            ),
            Expired::Idle { waited } => write!(
                f,
                "idle for {} ms (idle_timeout_ms); it is not a VM's lifetime handle",
                waited.as_millis()
            ),
        }
    }
}

/// Which clock runs on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clock {
    Refused,
    Unread,
    Stalled,
    Idle,
}

/// Where a connection is in its life. Requests are read and answered while `Open`; one whose
/// answer waits on storage stops the reading (`Waiting`) until it is answered; end-of-file
/// from the peer leaves what is buffered to be answered (`Draining`); `Closing` sends what is
/// queued and closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Open,
    /// A request waits on storage; `eof`: the peer had sent end-of-file before.
    Waiting {
        eof: bool,
    },
    Draining,
    Closing,
}

/// Result of reading from the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    Open,
    Eof,
}

/// What the read buffer holds.
#[derive(Debug)]
pub enum Next {
    /// Not even a whole header yet.
    Incomplete,
    /// A valid header: the sender's version and the body length (the body may still be
    /// arriving).
    Header { version: u16, len: usize },
    /// Garbage or an oversized frame.
    Bad(FrameError),
}

#[derive(Debug)]
pub struct Conn {
    pub stream: UnixStream,
    pub session: Session,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    /// Answer the first frame with this and close (peer not allowed, too many clients).
    pub refusal: Option<Response>,
    /// Close at this time whatever happens (refused connections only).
    pub deadline: Option<Instant>,
    phase: Phase,
    /// When the first byte of the incomplete data at the end of the read buffer arrived.
    partial_since: Option<Instant>,
    /// Last time bytes moved either way (or a request was in flight).
    last_active: Instant,
    /// The poll round that last served this connection (one budget per round).
    pub served: u64,
    /// What the event loop's epoll registration of this connection asks for (None: not
    /// registered yet); changed only when the wanted readiness changes (server.rs).
    pub interest: Option<Interest>,
}

impl Conn {
    pub fn new(stream: UnixStream, session: Session) -> Conn {
        Conn {
            stream,
            session,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            refusal: None,
            deadline: None,
            phase: Phase::Open,
            partial_since: None,
            last_active: Instant::now(),
            served: 0,
            interest: None,
        }
    }

    /// A connection carried over a live re-exec, with the bytes it had not yet processed and
    /// not yet sent.
    pub fn restored(
        stream: UnixStream,
        session: Session,
        rbuf: Vec<u8>,
        wbuf: Vec<u8>,
        closing: bool,
    ) -> Conn {
        let mut c = Conn {
            rbuf,
            wbuf,
            ..Conn::new(stream, session)
        };
        if closing {
            c.phase = Phase::Closing;
        }
        if !c.rbuf.is_empty() {
            c.partial_since = Some(c.last_active);
        }
        c
    }

    /// A request of this connection waits on storage: read nothing more until it is answered.
    pub fn waiting(&self) -> bool {
        matches!(self.phase, Phase::Waiting { .. })
    }

    /// The peer sent end-of-file: answer what is buffered, then close.
    pub fn eof(&self) -> bool {
        matches!(self.phase, Phase::Draining | Phase::Waiting { eof: true })
    }

    /// Close once the write buffer is flushed; read nothing more.
    pub fn closing(&self) -> bool {
        self.phase == Phase::Closing
    }

    /// The request just read waits on storage.
    pub fn wait(&mut self) {
        let eof = self.eof();
        if !self.closing() {
            self.phase = Phase::Waiting { eof };
        }
    }

    /// The request that waited on storage is answered.
    pub fn answered(&mut self) {
        if let Phase::Waiting { eof } = self.phase {
            self.phase = if eof { Phase::Draining } else { Phase::Open };
        }
    }

    /// The peer sent end-of-file.
    pub fn end_of_file(&mut self) {
        match self.phase {
            Phase::Open => self.phase = Phase::Draining,
            Phase::Waiting { .. } => self.phase = Phase::Waiting { eof: true },
            Phase::Draining | Phase::Closing => {}
        }
    }

    /// Send what is queued, then close; read nothing more.
    pub fn close_after_flush(&mut self) {
        self.phase = Phase::Closing;
    }

    /// Unprocessed input and unsent output, for a live re-exec.
    pub fn pending(&self) -> (&[u8], &[u8]) {
        (&self.rbuf, self.wbuf.get(self.wpos..).unwrap_or_default())
    }

    /// Read what the socket has (at most [`READ_PER_ROUND`] bytes this round), into `scratch`
    /// and then the read buffer. Stops early once a maximal frame is buffered, so a flood
    /// cannot make us buffer more than one frame, and reads nothing while a complete frame
    /// waits (call [`Conn::actionable`] first).
    pub fn fill(&mut self, scratch: &mut [u8], now: Instant) -> io::Result<Fill> {
        let mut budget = READ_PER_ROUND;
        loop {
            let room = (HEADER_LEN + MAX_BODY).saturating_sub(self.rbuf.len());
            let want = room.min(budget).min(scratch.len());
            if want == 0 {
                return Ok(Fill::Open);
            }
            let buf = scratch.get_mut(..want).unwrap_or_default();
            match self.stream.read(buf) {
                Ok(0) => return Ok(Fill::Eof),
                Ok(n) => {
                    let got = buf.get(..n).unwrap_or_default();
                    // The peer decides how much we hold: never abort on allocation failure.
                    self.rbuf.try_reserve(n).map_err(|e| {
                        io::Error::new(
                            io::ErrorKind::OutOfMemory,
                            format!("cannot buffer {n} more bytes: {e}"),
                        )
                    })?;
                    if self.rbuf.is_empty() {
                        self.partial_since = Some(now);
                    }
                    self.rbuf.extend_from_slice(got);
                    self.last_active = now;
                    budget -= n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Fill::Open),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Can the buffered input be acted upon without reading more: a complete frame, or a
    /// header that gets the connection closed (garbage, wrong version, a refused client)?
    pub fn actionable(&self) -> bool {
        let Some(h) = self.rbuf.get(..HEADER_LEN) else {
            return false;
        };
        if self.refusal.is_some() {
            return true;
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(h);
        match protocol::parse_header(&header) {
            Ok((version, len)) => {
                version != PROTOCOL_VERSION || self.rbuf.len() >= HEADER_LEN + len
            }
            Err(_) => true,
        }
    }

    /// Frames are buffered and may be served now (nothing in flight, nothing unsent).
    pub fn backlog(&self) -> bool {
        matches!(self.phase, Phase::Open | Phase::Draining)
            && !self.wants_write()
            && self.actionable()
    }

    /// After serving: a peer that sent end-of-file is closed once nothing is left to answer.
    pub fn settle_eof(&mut self) {
        if self.phase == Phase::Draining && !self.actionable() {
            self.phase = Phase::Closing;
        }
    }

    /// The clock that may close this connection, and when it runs out. A lifetime handle is
    /// never closed by a timer (closing it ends its VM's leases), nor is a connection whose
    /// request waits on storage.
    fn clock(&self, limits: &Limits) -> Option<(Instant, Clock)> {
        if let Some(d) = self.deadline {
            return Some((d, Clock::Refused));
        }
        if self.waiting() || self.session.handle_of.is_some() {
            return None;
        }
        if self.wants_write() {
            return Some((
                self.last_active + limits.request_read_timeout,
                Clock::Unread,
            ));
        }
        if self.closing() || self.actionable() {
            // Closed or served within this round.
            return None;
        }
        if self.rbuf.is_empty() {
            return limits
                .idle_timeout
                .map(|t| (self.last_active + t, Clock::Idle));
        }
        self.partial_since
            .map(|since| (since + limits.request_read_timeout, Clock::Stalled))
    }

    /// The next time a timer may close this connection.
    pub fn next_deadline(&self, limits: &Limits) -> Option<Instant> {
        self.clock(limits).map(|(t, _)| t)
    }

    /// Is it time to close this connection, and why? While a request waits on storage the
    /// clocks stand still (nothing is read meanwhile).
    pub fn expired(&mut self, now: Instant, limits: &Limits) -> Option<Expired> {
        if self.waiting() {
            self.last_active = now;
            if self.partial_since.is_some() {
                self.partial_since = Some(now);
            }
            return None;
        }
        let (due, clock) = self.clock(limits)?;
        if due > now {
            return None;
        }
        let since = |t: Instant| now.saturating_duration_since(t);
        Some(match clock {
            Clock::Refused => Expired::Refused,
            Clock::Unread => Expired::Unread {
                bytes: self.wbuf.len().saturating_sub(self.wpos),
                waited: since(self.last_active),
            },
            Clock::Idle => Expired::Idle {
                waited: since(self.last_active),
            },
            Clock::Stalled => Expired::Stalled {
                bytes: self.rbuf.len(),
                waited: self.partial_since.map_or(Duration::ZERO, since),
            },
        })
    }

    /// Inspect the next frame's header.
    pub fn next(&mut self) -> Next {
        let Some(h) = self.rbuf.get(..HEADER_LEN) else {
            return Next::Incomplete;
        };
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(h);
        match protocol::parse_header(&header) {
            // No reservation for the announced body: it grows as bytes arrive (`fill`).
            Ok((version, len)) => Next::Header { version, len },
            Err(e) => Next::Bad(e),
        }
    }

    /// The body of the current frame, when it has fully arrived.
    pub fn body(&self, len: usize) -> Option<&[u8]> {
        self.rbuf.get(HEADER_LEN..HEADER_LEN + len)
    }

    /// Drop the current frame (header and `len` body bytes).
    pub fn consume(&mut self, len: usize) {
        let n = (HEADER_LEN + len).min(self.rbuf.len());
        self.rbuf.drain(..n);
        if self.rbuf.is_empty() {
            self.partial_since = None;
            if self.rbuf.capacity() > KEEP_CAPACITY {
                self.rbuf = Vec::new();
            }
        } else {
            // Pipelined bytes: the next frame's clock starts now that it is next in line.
            self.partial_since = Some(Instant::now());
        }
        self.last_active = Instant::now();
    }

    /// Queue one response frame.
    pub fn queue(&mut self, resp: &Response) {
        // An answer is progress: the clocks for unread answers and for the next (pipelined)
        // frame start now, not when the request began (it may have waited on storage).
        let now = Instant::now();
        self.last_active = now;
        if self.partial_since.is_some() {
            self.partial_since = Some(now);
        }
        let start = self.wbuf.len();
        self.wbuf.extend_from_slice(&[0u8; HEADER_LEN]);
        let encoded = serde_json::to_writer(&mut self.wbuf, resp);
        let len = self.wbuf.len() - start - HEADER_LEN;
        match (encoded, protocol::header(len)) {
            (Ok(()), Ok(h)) => {
                if let Some(slot) = self.wbuf.get_mut(start..start + HEADER_LEN) {
                    slot.copy_from_slice(&h);
                }
            }
            (encoded, _) => {
                self.wbuf.truncate(start);
                let why = match encoded {
                    Err(e) => format!("cannot encode the response: {e}"),
                    Ok(()) => format!(
                        "the response ({len} bytes) exceeds the protocol's {MAX_BODY}-byte frame \
                         limit; ask for less (e.g. inquire one VM instead of listing all)"
                    ),
                };
                let fallback = Response::error(ErrorKind::Internal, why);
                if let Ok(frame) = protocol::encode(&fallback) {
                    self.wbuf.extend_from_slice(&frame);
                }
            }
        }
    }

    /// Is a response waiting for the socket?
    pub fn wants_write(&self) -> bool {
        self.wpos < self.wbuf.len()
    }

    /// Write what the socket takes. Ok(true) when everything queued is written.
    pub fn flush(&mut self) -> io::Result<bool> {
        while self.wpos < self.wbuf.len() {
            let pending = self.wbuf.get(self.wpos..).unwrap_or_default();
            match self.stream.write(pending) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.wpos += n;
                    self.last_active = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        if self.wbuf.capacity() > KEEP_CAPACITY {
            self.wbuf = Vec::new();
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Conn {
        let (a, _b) = UnixStream::pair().unwrap();
        let session = Session {
            id: 1,
            admin: false,
            peer_pid: 1,
            restricted: false,
            handle_of: None,
        };
        Conn::new(a, session)
    }

    #[test]
    fn end_of_file_while_a_request_waits_drains_once_it_is_answered() {
        let mut c = conn();
        c.wait();
        assert!(c.waiting() && !c.eof());
        c.end_of_file();
        assert!(c.waiting() && c.eof());
        c.answered();
        assert_eq!(c.phase, Phase::Draining);
        // Nothing buffered: closed once settled.
        c.settle_eof();
        assert!(c.closing());
        // Closing is final.
        c.wait();
        c.end_of_file();
        c.answered();
        assert!(c.closing());
    }

    #[test]
    fn an_answered_request_reopens_reading() {
        let mut c = conn();
        c.wait();
        c.answered();
        assert_eq!(c.phase, Phase::Open);
        c.settle_eof();
        assert_eq!(c.phase, Phase::Open);
    }
}
