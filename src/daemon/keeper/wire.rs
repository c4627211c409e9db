//! The keeper link's socket and messages: one JSON object per packet, descriptors by
//! SCM_RIGHTS.

use super::*;
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
    connect, recvmsg, sendmsg, socket, sockopt,
};
use serde::Serialize;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
pub(super) fn seqpacket() -> Result<OwnedFd, String> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("cannot create a socket for the keeper: {}", e.desc()))
}

/// Why connecting to the keeper's path failed.
#[derive(Debug)]
pub(super) enum ConnectError {
    /// Nothing (usable) listens there: a new keeper may be started at that path.
    Absent(String),
    /// Something listens there that is not ours: it must never be handed a descriptor.
    Impostor(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Absent(s) | ConnectError::Impostor(s) => f.write_str(s),
        }
    }
}

/// Connect to the keeper listening at `path`, and make sure it is ours: its SO_PEERCRED
/// (the credentials of the process that called listen(2)) must carry this daemon's effective
/// uid. Every lease's read-write descriptor goes over this link, so a listener of any other
/// user is refused before a single byte is sent to it (docs/hardening.md).
pub(super) fn connect_to(path: &Path) -> Result<OwnedFd, ConnectError> {
    let fd = seqpacket().map_err(ConnectError::Absent)?;
    let addr = UnixAddr::new(path)
        .map_err(|e| ConnectError::Absent(format!("keeper socket {path:?}: {}", e.desc())))?;
    connect(fd.as_raw_fd(), &addr).map_err(|e| ConnectError::Absent(e.desc().to_string()))?;
    let euid = nix::unistd::geteuid().as_raw();
    match nix::sys::socket::getsockopt(&fd, sockopt::PeerCredentials) {
        Ok(c) if c.uid() == euid => {}
        Ok(c) => {
            return Err(ConnectError::Impostor(format!(
                "the process listening on the keeper socket {path:?} (pid {}) runs as uid {}, \
                 not as lockwardend's uid {euid}; it is not lockwardend's keeper and is handed \
                 nothing",
                c.pid(),
                c.uid()
            )));
        }
        Err(e) => {
            return Err(ConnectError::Impostor(format!(
                "cannot tell who listens on the keeper socket {path:?} (SO_PEERCRED: {}); it is \
                 handed nothing",
                e.desc()
            )));
        }
    }
    set_timeouts(&fd);
    Ok(fd)
}

pub(super) fn set_timeouts(fd: &OwnedFd) {
    let tv = nix::sys::time::TimeVal::new(IO_TIMEOUT.as_secs() as _, 0);
    let _ = nix::sys::socket::setsockopt(fd, sockopt::ReceiveTimeout, &tv);
    let _ = nix::sys::socket::setsockopt(fd, sockopt::SendTimeout, &tv);
    // Root may exceed net.core.wmem_max; others get what the limit allows.
    if nix::sys::socket::setsockopt(fd, sockopt::SndBufForce, &SEND_BUFFER).is_err() {
        let _ = nix::sys::socket::setsockopt(fd, sockopt::SndBuf, &SEND_BUFFER);
    }
}

pub(super) fn send_msg<T: Serialize>(fd: RawFd, msg: &T, fds: &[RawFd]) -> Result<(), String> {
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
pub(super) type Message<'a> = (&'a [u8], Vec<OwnedFd>);

/// One receive buffer (and control buffer) per side, allocated once: a message is received
/// into it and parsed from the bytes that arrived, so nothing is zero-filled per message and
/// only the pages the largest message touched are ever resident.
pub(super) struct Receiver {
    buf: Vec<u8>,
    cmsg: Vec<u8>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Receiver")
    }
}

impl Receiver {
    pub(super) fn new() -> Receiver {
        Receiver {
            buf: Vec::new(),
            cmsg: nix::cmsg_space!([RawFd; MAX_FDS]),
        }
    }

    /// One message: its bytes and the descriptors that came with it; None at end of file.
    pub(super) fn recv(&mut self, fd: RawFd) -> Result<Option<Message<'_>>, String> {
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
                        adopt_received(&raw, &mut fds)?;
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

/// Take ownership of descriptors the kernel just installed for us (SCM_RIGHTS), appending
/// them to `fds`. Every number is taken before an error is returned: a `?` in the loop would
/// leave the rest of the batch open and unowned (a lock nobody can ever drop).
fn adopt_received(raw: &[RawFd], fds: &mut Vec<OwnedFd>) -> Result<(), String> {
    let mut bad = None;
    for &r in raw {
        // SAFETY: the kernel just installed this descriptor for us (SCM_RIGHTS); nobody else
        // owns it, and each number of a control message is adopted once, here.
        match unsafe { crate::daemon::sys::adopt(r, "a received lease") } {
            Ok(fd) => fds.push(fd),
            Err(e) => {
                bad.get_or_insert(e);
            }
        }
    }
    bad.map_or(Ok(()), Err)
}

/// A connected pair of datagram sockets: a vault slot (vault.rs).
pub(super) fn datagram_pair() -> Result<(OwnedFd, OwnedFd), String> {
    nix::sys::socket::socketpair(
        AddressFamily::Unix,
        SockType::Datagram,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| {
        format!(
            "cannot create a socket pair for the keeper's vault: {}",
            e.desc()
        )
    })
}

/// Queue `fds` on `fd` as one datagram of one byte, without waiting.
pub(super) fn send_fds(fd: &OwnedFd, fds: &[RawFd]) -> Result<(), Errno> {
    let iov = [IoSlice::new(b"v")];
    let cmsg = [ControlMessage::ScmRights(fds)];
    loop {
        match sendmsg::<()>(
            fd.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Take the one datagram queued on `fd` (sent by [`send_fds`]) and its descriptors, without
/// waiting. A truncated control message is an error: the kernel closed what did not fit.
pub(super) fn recv_fds(fd: &OwnedFd) -> Result<Vec<OwnedFd>, String> {
    let mut byte = [0u8; 1];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    loop {
        let mut iov = [IoSliceMut::new(&mut byte)];
        let msg = match recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(format!("receive failed: {}", e.desc())),
        };
        let mut fds = Vec::new();
        let mut adopted = Ok(());
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    adopted = adopted.and(adopt_received(&raw, &mut fds));
                }
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(format!(
                "descriptors were truncated ({} arrived): the kernel closed the rest",
                fds.len()
            ));
        }
        adopted?;
        return Ok(fds);
    }
}
