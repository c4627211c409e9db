//! One client connection: a non-blocking socket with its read and write buffers.
//!
//! Why buffers: the event loop must never wait for one client, so partial frames are kept
//! until complete and responses the socket cannot take yet are kept until it can. A response
//! is serialised straight into the write buffer (no per-request frame allocation once the
//! buffer has grown), and buffers that grew for a big frame shrink back afterwards.

use super::dispatch::Session;
use crate::protocol::{self, ErrorKind, FrameError, HEADER_LEN, MAX_BODY, Response};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// Buffers above this capacity are shrunk when they empty.
const KEEP_CAPACITY: usize = 64 * 1024;

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
    /// Close once the write buffer is flushed; read nothing more.
    pub closing: bool,
    /// Close at this time whatever happens (refused connections only).
    pub deadline: Option<Instant>,
    /// A request of this connection waits on storage: read nothing more until it is answered.
    pub waiting: bool,
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
            closing: false,
            deadline: None,
            waiting: false,
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
        Conn {
            rbuf,
            wbuf,
            closing,
            ..Conn::new(stream, session)
        }
    }

    /// Unprocessed input and unsent output, for a live re-exec.
    pub fn pending(&self) -> (&[u8], &[u8]) {
        (&self.rbuf, self.wbuf.get(self.wpos..).unwrap_or_default())
    }

    /// Read what the socket has, into `scratch` and then the read buffer. Stops early once a
    /// maximal frame is buffered, so a flood cannot make us buffer more than one frame.
    pub fn fill(&mut self, scratch: &mut [u8]) -> io::Result<Fill> {
        loop {
            if self.rbuf.len() >= HEADER_LEN + MAX_BODY {
                return Ok(Fill::Open);
            }
            match self.stream.read(scratch) {
                Ok(0) => return Ok(Fill::Eof),
                Ok(n) => self
                    .rbuf
                    .extend_from_slice(scratch.get(..n).unwrap_or_default()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Fill::Open),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Inspect the next frame's header.
    pub fn next(&mut self) -> Next {
        let Some(h) = self.rbuf.get(..HEADER_LEN) else {
            return Next::Incomplete;
        };
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(h);
        match protocol::parse_header(&header) {
            Ok((version, len)) => {
                let want = HEADER_LEN + len;
                if self.rbuf.len() < want {
                    self.rbuf.reserve(want - self.rbuf.len());
                }
                Next::Header { version, len }
            }
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
        if self.rbuf.is_empty() && self.rbuf.capacity() > KEEP_CAPACITY {
            self.rbuf = Vec::new();
        }
    }

    /// Queue one response frame.
    pub fn queue(&mut self, resp: &Response) {
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
                Ok(n) => self.wpos += n,
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
