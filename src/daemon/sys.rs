//! The daemon's and the keeper's syscall layer: readiness (epoll for the event loop, poll(2)
//! for one descriptor), descriptors the kernel hands us (accept, pidfd_open), and the one
//! place where a descriptor number received from outside (inherited across exec, named in the
//! environment, passed with SCM_RIGHTS) becomes an owned descriptor. Every `unsafe` block of
//! these patterns lives here, each with the reason it is sound (docs/architecture.md, "The
//! event loop").

use nix::errno::Errno;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Readiness a registration asks for. Hang-ups and errors are reported whatever is asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interest(u32);

impl Interest {
    /// Only hang-ups and errors.
    pub const NONE: Interest = Interest(0);
    pub const READ: Interest = Interest(libc::EPOLLIN as u32);
    pub const WRITE: Interest = Interest(libc::EPOLLOUT as u32);
}

/// One ready registration: its token and what the kernel reported.
#[derive(Clone, Copy, Debug)]
pub struct Ready {
    pub token: u64,
    pub events: u32,
}

impl Ready {
    /// Something to read, or end-of-file, a hang-up or an error (a read tells which).
    pub fn readable(&self) -> bool {
        self.events & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
    }

    /// The data to read, as opposed to a hang-up or an error.
    pub fn input(&self) -> bool {
        self.events & libc::EPOLLIN as u32 != 0
    }

    /// The peer hung up or the descriptor has an error.
    pub fn hangup(&self) -> bool {
        self.events & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
    }
}

/// Most ready registrations taken from the kernel in one wait (more wait for the next round;
/// level-triggered, so nothing is lost).
const MAX_EVENTS: usize = 1024;

/// An epoll instance (close-on-exec: a live re-exec starts with a fresh one), level-triggered
/// like poll(2): a registration stays ready while its condition holds, so a round that leaves
/// input unread (a budget, limits.rs) is told again next round. Registrations are made once
/// and changed only when their interest changes, so a round costs what is ready, not what is
/// registered (issue 17).
///
/// Descriptors are named by number: epoll_ctl(2) and epoll_wait(2) touch no memory of ours
/// through them, and a wrong number fails (EBADF, ENOENT) rather than doing harm. The kernel
/// drops a registration by itself when the last descriptor of its file is closed; remove one
/// before closing its descriptor all the same, since a forked child may share the file for a
/// moment.
#[derive(Debug)]
pub struct Poller {
    epfd: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl Poller {
    pub fn new() -> io::Result<Poller> {
        // SAFETY: epoll_create1 takes a flags word and returns a new descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Poller {
            // SAFETY: the kernel just returned this descriptor; nothing else owns it.
            epfd: unsafe { OwnedFd::from_raw_fd(fd) },
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 64],
        })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: interest.0,
            u64: token,
        };
        // SAFETY: `ev` is a valid epoll_event that lives across the call (the kernel copies
        // it); `fd` is only a number to the kernel.
        let r = unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), op, fd, &mut ev) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Register `fd` under `token`.
    pub fn add(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, interest)
    }

    /// Change the token or interest of a registered `fd`.
    pub fn modify(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, interest)
    }

    /// Register `fd`, or update it when this file is registered already.
    pub fn set(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        match self.add(fd, token, interest) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => self.modify(fd, token, interest),
            r => r,
        }
    }

    /// Drop the registration of `fd` (ENOENT when there is none).
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, Interest::NONE)
    }

    /// Wait up to `timeout_ms` (-1: no limit) for registrations to become ready; `out` (a
    /// buffer the caller reuses from round to round) is cleared and given the ready ones.
    /// `Interrupted` on a signal.
    pub fn wait(&mut self, timeout_ms: libc::c_int, out: &mut Vec<Ready>) -> io::Result<usize> {
        out.clear();
        let cap = libc::c_int::try_from(self.events.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: the buffer holds `cap` initialised epoll_event structs, exclusively
        // borrowed for the call; the kernel writes at most `cap` of them.
        let n = unsafe {
            libc::epoll_wait(
                self.epfd.as_raw_fd(),
                self.events.as_mut_ptr(),
                cap,
                timeout_ms,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        out.extend(self.events.iter().take(n).map(|e| Ready {
            // Copied out: the struct is packed on some targets.
            token: { e.u64 },
            events: { e.events },
        }));
        if n == self.events.len() && n < MAX_EVENTS {
            // A full buffer: more may be ready; take more next time.
            let more = (n * 2).min(MAX_EVENTS);
            self.events
                .resize(more, libc::epoll_event { events: 0, u64: 0 });
        }
        Ok(n)
    }
}

/// poll(2) on one descriptor: the events it reports (0 on timeout). `timeout_ms` -1 waits
/// without limit. A number that names no open descriptor reports `POLLNVAL`.
pub fn poll_one(fd: RawFd, events: libc::c_short, timeout_ms: libc::c_int) -> io::Result<i16> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd, exclusively borrowed for the call.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(p.revents)
    }
}

/// poll(2) over a set rebuilt by the caller (the keeper: its link and a few pidfds); returns
/// how many entries have events.
pub fn poll_set(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> io::Result<usize> {
    // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfd structs,
    // which is all poll(2) reads and writes.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    Errno::result(n)
        .map(|n| n as usize)
        .map_err(io::Error::from)
}

/// accept4(2) on a listening socket: the new connection, close-on-exec, and non-blocking when
/// asked.
pub fn accept(listener: &impl AsFd, nonblock: bool) -> io::Result<OwnedFd> {
    let mut flags = libc::SOCK_CLOEXEC;
    if nonblock {
        flags |= libc::SOCK_NONBLOCK;
    }
    let fd = listener.as_fd().as_raw_fd();
    // SAFETY: NULL address and length pointers ask for no peer address; nothing else is
    // passed but numbers.
    let r = unsafe { libc::accept4(fd, std::ptr::null_mut(), std::ptr::null_mut(), flags) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// pidfd_open(2): a descriptor (close-on-exec) that refers to process `pid`, or the errno.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes a pid and a flags word and returns a new descriptor or -1;
    // no memory is passed.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if ret < 0 {
        return Err(Errno::last());
    }
    let fd = RawFd::try_from(ret).map_err(|_| Errno::EOVERFLOW)?;
    // SAFETY: the kernel just returned this descriptor to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// pidfd_send_signal(2): send `sig` to the process `pidfd` refers to.
pub fn pidfd_send_signal(pidfd: &impl AsFd, sig: libc::c_int) -> Result<(), Errno> {
    // SAFETY: a descriptor number, a signal number, a NULL siginfo (the kernel fills in
    // SI_USER) and no flags; no memory of ours is passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_fd().as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if ret == 0 { Ok(()) } else { Err(Errno::last()) }
}

/// Set or clear the close-on-exec flag of descriptor number `fd` (a live re-exec clears it on
/// the descriptors it hands over, and sets it again when the exec failed).
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let flags = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD takes a descriptor number and an integer; no memory is passed.
    let r = unsafe { libc::fcntl(fd, libc::F_SETFD, flags) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Is `fd` an open descriptor of this process?
pub fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the flags of a descriptor number; no memory is passed.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Take ownership of a descriptor number this process received from outside its own objects:
/// inherited across exec (systemd's LISTEN_FDS, a live re-exec's state document, the keeper's
/// command line) or installed by the kernel with SCM_RIGHTS. Checked once here: a number that
/// names no open descriptor is an error (`what` says whose it was), never an owned handle.
///
/// # Safety
/// Nothing else in this process may own `fd` or take it over later: each number is adopted
/// once, by the code its sender handed it to.
pub unsafe fn adopt(fd: RawFd, what: &str) -> Result<OwnedFd, String> {
    if fd < 0 || !is_open(fd) {
        return Err(format!("{what}: descriptor {fd} is not open"));
    }
    // SAFETY: open (checked above) and owned by nothing else (the caller's promise).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn level_triggered_registrations_report_until_their_condition_ends() {
        let mut p = Poller::new().unwrap();
        let mut r = Vec::new();
        let (mut a, b) = UnixStream::pair().unwrap();
        p.add(b.as_raw_fd(), 7, Interest::READ).unwrap();
        assert_eq!(p.wait(0, &mut r).unwrap(), 0);
        a.write_all(b"x").unwrap();
        for _ in 0..2 {
            assert_eq!(p.wait(0, &mut r).unwrap(), 1);
            assert_eq!(r[0].token, 7);
            assert!(r[0].input());
        }
        // No interest: the unread byte is not reported, a hang-up is.
        p.modify(b.as_raw_fd(), 8, Interest::NONE).unwrap();
        assert_eq!(p.wait(0, &mut r).unwrap(), 0);
        drop(a);
        p.wait(0, &mut r).unwrap();
        assert_eq!((r.len(), r[0].token, r[0].hangup()), (1, 8, true));
        p.remove(b.as_raw_fd()).unwrap();
        assert_eq!(p.wait(0, &mut r).unwrap(), 0);
        assert!(p.remove(b.as_raw_fd()).is_err());
        // `set` adds, then updates.
        p.set(b.as_raw_fd(), 9, Interest::WRITE).unwrap();
        p.set(b.as_raw_fd(), 10, Interest::NONE).unwrap();
        p.wait(0, &mut r).unwrap();
        assert_eq!(r[0].token, 10);
    }

    #[test]
    fn a_full_buffer_grows_and_nothing_is_lost() {
        let mut p = Poller::new().unwrap();
        let pairs: Vec<(UnixStream, UnixStream)> =
            (0..100).map(|_| UnixStream::pair().unwrap()).collect();
        for (i, (a, _)) in pairs.iter().enumerate() {
            p.add(a.as_raw_fd(), i as u64, Interest::WRITE).unwrap();
        }
        let mut r = Vec::new();
        assert_eq!(p.wait(0, &mut r).unwrap(), 64);
        assert_eq!(p.wait(0, &mut r).unwrap(), 100);
        assert_eq!(r.len(), 100);
    }

    #[test]
    fn accepted_connections_are_close_on_exec_and_non_blocking_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let flags = |fd: &OwnedFd| {
            let raw = fd.as_raw_fd();
            // SAFETY: fcntl queries on a descriptor owned by this test; no memory is passed.
            unsafe {
                (
                    libc::fcntl(raw, libc::F_GETFD),
                    libc::fcntl(raw, libc::F_GETFL),
                )
            }
        };
        let _a = UnixStream::connect(&path).unwrap();
        let fd = accept(&l, true).unwrap();
        let (fdf, fl) = flags(&fd);
        assert!(fdf & libc::FD_CLOEXEC != 0 && fl & libc::O_NONBLOCK != 0);
        let _b = UnixStream::connect(&path).unwrap();
        let fd = accept(&l, false).unwrap();
        let (fdf, fl) = flags(&fd);
        assert!(fdf & libc::FD_CLOEXEC != 0 && fl & libc::O_NONBLOCK == 0);
        l.set_nonblocking(true).unwrap();
        let e = accept(&l, true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn poll_one_and_adopt() {
        let (mut a, b) = UnixStream::pair().unwrap();
        assert_eq!(poll_one(b.as_raw_fd(), libc::POLLIN, 0).unwrap(), 0);
        a.write_all(b"x").unwrap();
        assert_eq!(
            poll_one(b.as_raw_fd(), libc::POLLIN, 0).unwrap() & libc::POLLIN,
            libc::POLLIN
        );
        let raw = std::os::fd::IntoRawFd::into_raw_fd(b);
        // SAFETY: `raw` was just released by its owner.
        let owned = unsafe { adopt(raw, "test") }.unwrap();
        drop(owned);
        assert!(!is_open(raw));
        // SAFETY: the number is closed; adopt refuses it.
        let e = unsafe { adopt(raw, "the test's descriptor") }.unwrap_err();
        assert!(e.contains("the test's descriptor: descriptor"), "{e}");
    }
}
