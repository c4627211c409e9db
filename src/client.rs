//! One connection to lockwardend's plugin socket, one request, one response (used by the plugin
//! and by `lockwarden adopt`, which asks as the plugin would).
//!
//! Fork-safe by construction (it runs in the forked child during a domain start): a socket made
//! with raw system calls inside the call (so it gets the VM's SELinux socket label, which libvirt
//! sets just before `drvAcquire`), no global state, no threads. Every read and write is bounded
//! by one deadline, `request_timeout_ms` after the connect began, through `SO_SNDTIMEO` /
//! `SO_RCVTIMEO` set to the time left before each system call, so a plugin call never holds
//! libvirt longer than that. Writes use `MSG_NOSIGNAL`: a daemon that went away must not kill
//! the caller with SIGPIPE.

use crate::protocol::{self, ErrorKind, FrameError, Request, Response};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr, connect, recv, send, setsockopt, sockopt,
};
use nix::sys::time::TimeVal;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A failed exchange with lockwardend: the daemon's error kind when it answered with an error
/// (`None` when connecting, sending or reading failed, or the answer did not fit), and one
/// sentence for the operator. The plugin turns it into a libvirt error (`plugin::error`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientError {
    pub kind: Option<ErrorKind>,
    pub message: String,
}

impl ClientError {
    fn internal(message: String) -> Self {
        ClientError {
            kind: None,
            message,
        }
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ClientError {}

/// An open connection to the daemon.
pub struct Client<'a> {
    fd: OwnedFd,
    socket: PathBuf,
    timeout_ms: u32,
    deadline: Instant,
    /// What the call is for ("cannot acquire the leases of VM 'web1' (uuid)"), prefixed to
    /// every transport error. Daemon errors are passed through verbatim. Built only when an
    /// error is reported: formatting it on every call cost more than the syscalls.
    context: &'a dyn Fn() -> String,
}

fn connect_hint() -> &'static str {
    "start it with `systemctl start lockwardend.socket`"
}

impl<'a> Client<'a> {
    /// Connect to the daemon at `socket`; the whole exchange must finish within `timeout_ms`.
    /// `context` says what the call is for; it starts every transport error message.
    pub fn connect(
        socket: &Path,
        timeout_ms: u32,
        context: &'a dyn Fn() -> String,
    ) -> Result<Client<'a>, ClientError> {
        let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
        let cannot = |e: Errno| {
            ClientError::internal(format!(
                "{}: cannot connect to lockwardend at {:?}: {}; {}",
                context(),
                socket,
                e.desc(),
                connect_hint()
            ))
        };
        let fd = nix::sys::socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(cannot)?;
        let addr = UnixAddr::new(socket).map_err(cannot)?;
        let client = Client {
            fd,
            socket: socket.to_path_buf(),
            timeout_ms,
            deadline,
            context,
        };
        client.arm(true).map_err(|e| client.io_error(e))?;
        loop {
            match connect(client.fd.as_raw_fd(), &addr) {
                Ok(()) => return Ok(client),
                Err(Errno::EINTR) => continue,
                // A full listen backlog: the daemon is alive but not accepting in time.
                Err(Errno::EAGAIN) => return Err(client.timeout_error()),
                Err(e) => return Err(cannot(e)),
            }
        }
    }

    /// Set the socket timeouts to the time left; `Err(TimedOut)` when none is left.
    fn arm(&self, send_side: bool) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        // At least 1 ms: a zero timeout would mean "block forever".
        let left = left.max(Duration::from_millis(1));
        let tv = TimeVal::new(
            i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            i64::from(left.subsec_micros()),
        );
        let r = if send_side {
            setsockopt(&self.fd, sockopt::SendTimeout, &tv)
        } else {
            setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv)
        };
        r.map_err(io::Error::from)
    }

    fn timeout_error(&self) -> ClientError {
        ClientError::internal(format!(
            "{}: lockwardend at {:?} did not answer within {} ms (request_timeout_ms); check \
             `systemctl status lockwardend` and the storage holding the disks (a hung NFS mount \
             stalls the leases on it)",
            (self.context)(),
            self.socket,
            self.timeout_ms
        ))
    }

    fn io_error(&self, e: io::Error) -> ClientError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => self.timeout_error(),
            _ => ClientError::internal(format!(
                "{}: talking to lockwardend at {:?} failed: {e}; check `systemctl status \
                 lockwardend`",
                (self.context)(),
                self.socket
            )),
        }
    }

    fn frame_error(&self, e: FrameError) -> ClientError {
        match e {
            FrameError::Io(e) => self.io_error(e),
            FrameError::Eof => ClientError::internal(format!(
                "{}: lockwardend at {:?} closed the connection without answering; check \
                 `journalctl -u lockwardend` for the reason",
                (self.context)(),
                self.socket
            )),
            FrameError::Version(v) => ClientError::internal(format!(
                "{}: lockwardend at {:?} speaks lockwarden protocol version {v}, this plugin \
                 speaks version {}; install matching versions of lockwarden.so and lockwardend \
                 and restart both",
                (self.context)(),
                self.socket,
                protocol::PROTOCOL_VERSION
            )),
            FrameError::BadMagic(_) => ClientError::internal(format!(
                "{}: {:?} is not a lockwardend socket (the answer is not a lockwarden frame); \
                 fix daemon_socket in the plugin configuration",
                (self.context)(),
                self.socket
            )),
            other => ClientError::internal(format!(
                "{}: bad answer from lockwardend at {:?}: {other}",
                (self.context)(),
                self.socket
            )),
        }
    }

    /// Send `req` and read the answer. A daemon error comes back as a `ClientError` carrying the
    /// daemon's message verbatim and its kind.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let frame = protocol::encode(req).map_err(|e| {
            ClientError::internal(format!(
                "{}: cannot encode the request for lockwardend: {e}",
                (self.context)()
            ))
        })?;
        self.send_all(&frame).map_err(|e| self.io_error(e))?;
        let resp: Response = {
            let mut reader = DeadlineReader { client: self };
            protocol::read_message(&mut reader)
        }
        .map_err(|e| self.frame_error(e))?;
        match resp {
            Response::Error(err) => Err(ClientError {
                kind: Some(err.kind),
                message: err.message,
            }),
            ok @ Response::Ok { .. } => Ok(ok),
            other => Err(ClientError::internal(format!(
                "{}: lockwardend at {:?} gave an answer that does not fit the request \
                 ({other:?}); install matching versions of lockwarden.so and lockwardend",
                (self.context)(),
                self.socket
            ))),
        }
    }

    fn send_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            self.arm(true)?;
            match send(self.fd.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e)),
            }
        }
        Ok(())
    }

    /// Keep the connection as a lifetime handle: clear `FD_CLOEXEC` so it survives `exec` into
    /// QEMU, and give up ownership of the descriptor.
    pub fn into_inheritable_fd(self) -> Result<OwnedFd, ClientError> {
        fcntl(&self.fd, FcntlArg::F_SETFD(FdFlag::empty())).map_err(|e| {
            ClientError::internal(format!(
                "{}: cannot make the lockwardend connection inheritable: {}",
                (self.context)(),
                e.desc()
            ))
        })?;
        Ok(self.fd)
    }
}

/// `Read` over the client's socket, each `recv` bounded by the time left.
struct DeadlineReader<'a, 'c> {
    client: &'a Client<'c>,
}

impl io::Read for DeadlineReader<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.client.arm(false)?;
            match recv(self.client.fd.as_raw_fd(), buf, MsgFlags::empty()) {
                Ok(n) => return Ok(n),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ErrorKind, Owner};
    use std::os::unix::net::UnixListener;

    fn owner() -> Owner {
        crate::protocol::sample_owner(1)
    }

    #[test]
    fn missing_socket_names_path_and_fix() {
        let e = Client::connect(Path::new("/nonexistent/lockwardend.sock"), 1000, &|| {
            "ctx".to_string()
        })
        .err()
        .unwrap();
        assert!(e.message.contains(
            "ctx: cannot connect to lockwardend at \"/nonexistent/lockwardend.sock\": No such file"
        ));
        assert!(e.message.contains("systemctl start lockwardend.socket"));
    }

    #[test]
    fn silent_daemon_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let _l = UnixListener::bind(&sock).unwrap();
        let start = Instant::now();
        let mut c = Client::connect(&sock, 300, &|| "ctx".to_string()).unwrap();
        let e = c
            .call(&Request::Register {
                owner: owner(),
                restrict: false,
            })
            .unwrap_err();
        let took = start.elapsed();
        assert!(e.message.contains("did not answer within 300 ms"), "{e}");
        assert!(took >= Duration::from_millis(290) && took < Duration::from_secs(3));
    }

    #[test]
    fn daemon_error_passed_verbatim_and_version_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let l = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let _: Request = protocol::read_message(&mut s).unwrap();
            protocol::write_message(
                &mut s,
                &Response::error(ErrorKind::Busy, "disk '/x' is held by VM 'other'"),
            )
            .unwrap();
            let (mut s, _) = l.accept().unwrap();
            let _: Request = protocol::read_message(&mut s).unwrap();
            let mut frame = protocol::encode(&Response::Ok { leases: vec![] }).unwrap();
            frame[5] = 7;
            io::Write::write_all(&mut s, &frame).unwrap();
        });
        let req = Request::Inquire { owner: owner() };
        let e = Client::connect(&sock, 2000, &|| "ctx".to_string())
            .unwrap()
            .call(&req)
            .unwrap_err();
        assert_eq!(e.kind, Some(ErrorKind::Busy));
        assert_eq!(e.message, "disk '/x' is held by VM 'other'");
        let e = Client::connect(&sock, 2000, &|| "ctx".to_string())
            .unwrap()
            .call(&req)
            .unwrap_err();
        assert!(e.message.contains("protocol version 7"), "{e}");
        t.join().unwrap();
    }
}
