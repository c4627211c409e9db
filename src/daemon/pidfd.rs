//! A handle on a process that survives pid reuse: a pidfd.
//!
//! Why: owners are QEMU processes that are not our children, so there is no SIGCHLD. A pidfd
//! polls readable the moment its process exits, which lets the event loop free a dead VM's
//! leases at once, and `pidfd_send_signal` can never hit an unrelated process that inherited
//! the pid. On kernels without pidfds (before 5.3) we fall back to plain pids and probing.

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A process we watch and may signal.
#[derive(Debug)]
pub struct Proc {
    pid: i32,
    fd: Option<OwnedFd>,
    /// Start time of the process (field 22 of `/proc/PID/stat`, clock ticks since boot), so a
    /// pid reused by another process is never mistaken for the owner after a restart.
    pub start: Option<u64>,
}

impl Proc {
    /// Watch `pid`. `Err(ESRCH)` when no such process exists.
    pub fn open(pid: u32) -> Result<Proc, Errno> {
        let pid = i32::try_from(pid).map_err(|_| Errno::ESRCH)?;
        if pid <= 0 {
            return Err(Errno::ESRCH);
        }
        // SAFETY: pidfd_open takes a pid and a flags word and returns a new descriptor or -1;
        // no memory is passed.
        let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if ret >= 0 {
            // SAFETY: the kernel just returned this descriptor to us; nobody else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(ret as RawFd) };
            let start = start_time(pid as u32);
            return Ok(Proc {
                pid,
                fd: Some(fd),
                start,
            });
        }
        match Errno::last() {
            Errno::ENOSYS | Errno::EPERM => {
                kill(Pid::from_raw(pid), None)?;
                let start = start_time(pid as u32);
                Ok(Proc {
                    pid,
                    fd: None,
                    start,
                })
            }
            e => Err(e),
        }
    }

    /// A process handle carried over a live re-exec (its pidfd kept open across `exec`).
    pub fn from_parts(pid: u32, fd: Option<OwnedFd>, start: Option<u64>) -> Proc {
        Proc {
            pid: i32::try_from(pid).unwrap_or(i32::MAX),
            fd,
            start,
        }
    }

    /// Watch `pid` only if it still is the process that started at `start` (when known).
    /// `Err(ESRCH)`: gone, or the pid now names another process.
    pub fn reopen(pid: u32, start: Option<u64>) -> Result<Proc, Errno> {
        let p = Proc::open(pid)?;
        if p.exited() || (start.is_some() && p.start != start) {
            return Err(Errno::ESRCH);
        }
        Ok(p)
    }

    /// The pidfd itself, when the kernel gave us one.
    pub fn into_fd(self) -> Option<OwnedFd> {
        self.fd
    }

    /// The descriptor to poll for exit, when the kernel gave us one.
    pub fn poll_fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Has the process exited (a zombie counts as exited)?
    pub fn exited(&self) -> bool {
        match &self.fd {
            Some(fd) => {
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
            }
            None => kill(Pid::from_raw(self.pid), None) == Err(Errno::ESRCH),
        }
    }

    /// Send `sig`. `Err(ESRCH)` when the process is gone.
    pub fn signal(&self, sig: Signal) -> Result<(), Errno> {
        match &self.fd {
            Some(fd) => {
                // SAFETY: pidfd_send_signal(pidfd, sig, NULL, 0): a valid descriptor we own, a
                // signal number, a NULL siginfo (the kernel fills in SI_USER) and no flags.
                let ret = unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.as_raw_fd(),
                        sig as libc::c_int,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
                if ret == 0 { Ok(()) } else { Err(Errno::last()) }
            }
            None => kill(Pid::from_raw(self.pid), sig),
        }
    }
}

/// Start time of `pid` in clock ticks since boot (`/proc/PID/stat` field 22).
pub fn start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything: skip past its end.
    let rest = s.get(s.rfind(')')? + 1..)?;
    // Fields from 3 (state) on; starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// `/proc/PID/comm` of a local process, for messages that name a lock holder.
pub fn comm(pid: i32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(s.trim_end_matches('\n').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watches_a_child_until_it_exits() {
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let p = Proc::open(child.id()).unwrap();
        assert!(!p.exited());
        p.signal(Signal::SIGKILL).unwrap();
        let _ = child.wait();
        assert!(p.exited());
        assert_eq!(Proc::open(0).unwrap_err(), Errno::ESRCH);
        assert!(comm(std::process::id() as i32).is_some());
        let me = start_time(std::process::id()).unwrap();
        assert_eq!(Proc::open(std::process::id()).unwrap().start, Some(me));
        assert!(Proc::reopen(std::process::id(), Some(me + 1)).is_err());
    }
}
