//! A handle on a process that survives pid reuse: a pidfd.
//!
//! Why: owners are QEMU processes that are not our children, so there is no SIGCHLD. A pidfd
//! polls readable the moment its process exits, which lets the event loop free a dead VM's
//! leases at once, and `pidfd_send_signal` can never hit an unrelated process that inherited
//! the pid. On kernels without pidfds (before 5.3, or a seccomp profile answering EPERM) we fall
//! back to plain pids, and then the recorded start time (field 22 of `/proc/PID/stat`) is
//! compared again before every signal and in [`Proc::exited`], so a reused pid is never
//! signalled and never taken for the owner (docs/hardening.md).
//!
//! Only ESRCH (or a start-time mismatch) means "gone": any other `pidfd_open` error (EMFILE,
//! ENFILE, ENOMEM) is returned as is, and callers keep the owner's leases and retry
//! ([`Proc::unwatched`], [`Proc::rewatch`]).
//!
//! A handle can be *parked* ([`Proc::park`]): its pidfd closed, its pid and start time kept.
//! The daemon parks the handle of an owner while that owner's lifetime connection is open
//! (its close is the exit signal) and opens the pidfd again when the connection closes
//! ([`Proc::unpark`]), so a VM costs no pidfd beyond its connection (docs/reliability.md §3).

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

/// A process we watch and may signal.
#[derive(Debug)]
pub struct Proc {
    pid: i32,
    fd: Option<OwnedFd>,
    /// Start time of the process (field 22 of `/proc/PID/stat`, clock ticks since boot), so a
    /// pid reused by another process is never mistaken for the owner after a restart.
    pub start: Option<u64>,
    /// No pidfd because opening one failed for a reason that may pass (EMFILE, ENFILE,
    /// ENOMEM): [`Proc::rewatch`] tries again. False on kernels without pidfds.
    pub retry: bool,
    /// No pidfd on purpose ([`Proc::park`]): something else tells us of the exit (the owner's
    /// lifetime connection); [`Proc::unpark`] opens it again, checked against `start`.
    parked: bool,
}

/// `pidfd_open(2)`: a descriptor that refers to process `pid`, or the errno.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    super::sys::pidfd_open(pid)
}

impl Proc {
    /// Watch `pid`. `Err(ESRCH)` when no such process exists; any other error (EMFILE, ENFILE,
    /// ENOMEM) says nothing about the process and must not be taken for its exit.
    pub fn open(pid: u32) -> Result<Proc, Errno> {
        let pid = i32::try_from(pid).map_err(|_| Errno::ESRCH)?;
        if pid <= 0 {
            return Err(Errno::ESRCH);
        }
        match pidfd_open(pid) {
            Ok(fd) => {
                let start = start_time(pid as u32);
                Ok(Proc {
                    pid,
                    fd: Some(fd),
                    start,
                    retry: false,
                    parked: false,
                })
            }
            Err(Errno::ENOSYS | Errno::EPERM) => {
                kill(Pid::from_raw(pid), None)?;
                let start = start_time(pid as u32);
                Ok(Proc {
                    pid,
                    fd: None,
                    start,
                    retry: false,
                    parked: false,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// A process handle carried over a live re-exec (its pidfd kept open across `exec`). One
    /// without a pidfd is tried again ([`Proc::rewatch`]): it may have been an owner whose
    /// pidfd could not be opened; on a kernel without pidfds the first retry settles it.
    pub fn from_parts(pid: u32, fd: Option<OwnedFd>, start: Option<u64>) -> Proc {
        Proc {
            pid: i32::try_from(pid).unwrap_or(i32::MAX),
            retry: fd.is_none(),
            fd,
            start,
            parked: false,
        }
    }

    /// A process that could not be watched yet (its pidfd could not be opened for a reason
    /// that may pass): a plain pid checked against `start`, retried by [`Proc::rewatch`].
    pub fn unwatched(pid: u32, start: Option<u64>) -> Proc {
        Proc::from_parts(pid, None, start)
    }

    /// Watch `pid` only if it still is the process that started at `start` (when known).
    /// `Err(ESRCH)`: gone, or the pid now names another process. Any other error: the process
    /// could not be checked (no descriptor for a pidfd or for `/proc/PID/stat`); it may well
    /// still run.
    pub fn reopen(pid: u32, start: Option<u64>) -> Result<Proc, Errno> {
        let mut p = Proc::open(pid)?;
        if p.exited() {
            return Err(Errno::ESRCH);
        }
        if let Some(want) = start {
            // Read again: `open` keeps None when /proc could not be read, which is not "gone".
            let now = match p.start {
                Some(s) => s,
                None => read_start(pid)?,
            };
            if now != want {
                return Err(Errno::ESRCH);
            }
            // The pidfd was opened before the start time was read: a process that is still
            // alive (checked after the read) is the one the start time belongs to.
            if p.exited() {
                return Err(Errno::ESRCH);
            }
            p.start = Some(now);
        }
        Ok(p)
    }

    /// For a handle made by [`Proc::unwatched`]: try to open the pidfd again. `Ok(true)`: it is
    /// watched now; `Ok(false)`: no retry is needed any more, but the kernel has no pidfds (a
    /// plain pid checked against its start time); `Err(ESRCH)`: the process is gone (or the
    /// pid names another process now); any other error: still not watched, try again later.
    pub fn rewatch(&mut self) -> Result<bool, Errno> {
        if !self.retry {
            return Ok(self.fd.is_some());
        }
        let pid = u32::try_from(self.pid).map_err(|_| Errno::ESRCH)?;
        match Proc::reopen(pid, self.start) {
            Ok(p) => {
                self.fd = p.fd;
                self.start = self.start.or(p.start);
                self.retry = false;
                Ok(self.fd.is_some())
            }
            Err(Errno::ESRCH) => Err(Errno::ESRCH),
            Err(e) => {
                if self.exited() {
                    return Err(Errno::ESRCH);
                }
                Err(e)
            }
        }
    }

    /// Close the pidfd (or stop retrying to open one) while something else reports the exit;
    /// the pid and start time stay, so [`Proc::exited`] and [`Proc::signal`] still tell the
    /// process apart from one that reused its pid. Nothing changes on a kernel without pidfds.
    pub fn park(&mut self) {
        if self.fd.take().is_some() || self.retry {
            self.retry = false;
            self.parked = true;
        }
    }

    /// Is the pidfd closed on purpose ([`Proc::park`])?
    pub fn parked(&self) -> bool {
        self.parked
    }

    /// Open the pidfd of a parked handle again, checked against the recorded start time.
    /// `Ok(())`: watched (or not parked); `Err(ESRCH)`: the process is gone, or the pid names
    /// another process now; any other error: not watched yet, and [`Proc::rewatch`] tries
    /// again (`retry`), exactly like a handle made by [`Proc::unwatched`].
    pub fn unpark(&mut self) -> Result<(), Errno> {
        if !std::mem::take(&mut self.parked) {
            return Ok(());
        }
        self.retry = true;
        self.rewatch().map(|_| ())
    }

    /// The pidfd itself, when the kernel gave us one.
    pub fn into_fd(self) -> Option<OwnedFd> {
        self.fd
    }

    /// The descriptor to poll for exit, when the kernel gave us one.
    pub fn poll_fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Has the process exited (a zombie counts as exited)? Without a pidfd: the pid is gone,
    /// or it now names a process with another start time (pid reuse). A start time that
    /// cannot be read while the pid exists is not taken for an exit.
    pub fn exited(&self) -> bool {
        match &self.fd {
            Some(fd) => {
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
            }
            None => {
                if kill(Pid::from_raw(self.pid), None) == Err(Errno::ESRCH) {
                    return true;
                }
                match (self.start, read_start(self.pid as u32)) {
                    (Some(want), Ok(now)) => now != want,
                    (Some(_), Err(Errno::ESRCH)) => true,
                    _ => false,
                }
            }
        }
    }

    /// Send `sig`. `Err(ESRCH)` when the process is gone. Without a pidfd the pid is signalled
    /// only after its start time was found equal to the recorded one: `Err(ESRCH)` when it
    /// differs (the pid was reused), the read's error (EMFILE, say) when it cannot be checked.
    pub fn signal(&self, sig: Signal) -> Result<(), Errno> {
        match &self.fd {
            Some(fd) => super::sys::pidfd_send_signal(fd, sig as libc::c_int),
            None => {
                // Parked (or not openable before): a pidfd checked against the start time for
                // this one signal, so a reused pid is never hit; the plain pid below only on a
                // kernel without pidfds, or when none can be opened now.
                match Proc::reopen(self.pid as u32, self.start) {
                    Ok(Proc { fd: Some(fd), .. }) => {
                        return super::sys::pidfd_send_signal(&fd, sig as libc::c_int);
                    }
                    Err(Errno::ESRCH) => return Err(Errno::ESRCH),
                    _ => {}
                }
                if let Some(want) = self.start {
                    if read_start(self.pid as u32)? != want {
                        return Err(Errno::ESRCH);
                    }
                }
                kill(Pid::from_raw(self.pid), sig)
            }
        }
    }
}

/// Start time of `pid` in clock ticks since boot (`/proc/PID/stat` field 22).
pub fn start_time(pid: u32) -> Option<u64> {
    read_start(pid).ok()
}

/// [`start_time`] with the reason it failed: ESRCH when there is no such process, the errno of
/// the read otherwise (EMFILE when no descriptor is left), EINVAL for an unparsable line.
pub fn read_start(pid: u32) -> Result<u64, Errno> {
    let s = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(e) => {
            return Err(match e.raw_os_error() {
                Some(libc::ENOENT | libc::ESRCH) => Errno::ESRCH,
                Some(n) => Errno::from_raw(n),
                None => Errno::EIO,
            });
        }
    };
    parse_start(&s).ok_or(Errno::EINVAL)
}

fn parse_start(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may contain anything: skip past its end.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    // Fields from 3 (state) on; starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
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
        let me = start_time(std::process::id()).unwrap();
        assert_eq!(Proc::open(std::process::id()).unwrap().start, Some(me));
        assert!(Proc::reopen(std::process::id(), Some(me + 1)).is_err());
    }

    /// Without a pidfd (old kernel, seccomp), a pid whose start time is not the recorded one
    /// is another process: never signalled, and the owner counts as gone (issue 13 finding 8).
    #[test]
    fn a_plain_pid_with_another_start_time_is_never_signalled() {
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let pid = child.id();
        let real = start_time(pid).unwrap();
        // The owner we recorded started at another time: this pid was reused.
        let stale = Proc::from_parts(pid, None, Some(real + 1));
        assert_eq!(stale.signal(Signal::SIGKILL), Err(Errno::ESRCH));
        assert!(
            stale.exited(),
            "a reused pid must count as the owner's exit"
        );
        assert_eq!(
            child.try_wait().unwrap(),
            None,
            "the unrelated process was hit"
        );
        // The same pid with the right start time is the owner: signalled, then gone.
        let owner = Proc::from_parts(pid, None, Some(real));
        assert!(!owner.exited());
        owner.signal(Signal::SIGKILL).unwrap();
        let _ = child.wait();
        assert!(owner.exited());
        assert!(stale.exited());
    }

    /// A handle that could not be watched is retried, and an exit found meanwhile is ESRCH.
    #[test]
    fn an_unwatched_process_is_watched_again_or_found_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut p = Proc::unwatched(pid, start_time(pid));
        assert!(p.poll_fd().is_none() && p.retry);
        assert_eq!(p.rewatch(), Ok(true));
        assert!(p.poll_fd().is_some() && !p.retry);
        let mut q = Proc::unwatched(pid, start_time(pid));
        child.kill().unwrap();
        let _ = child.wait();
        assert_eq!(q.rewatch(), Err(Errno::ESRCH));
        assert!(p.exited());
    }

    /// A parked handle holds no descriptor, still tells its process from a reused pid, and is
    /// watched again (or found gone) when unparked.
    #[test]
    fn a_parked_process_holds_no_pidfd_and_is_checked_when_unparked() {
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut p = Proc::open(pid).unwrap();
        p.park();
        assert!(p.parked() && p.poll_fd().is_none() && !p.retry);
        assert!(!p.exited());
        assert_eq!(p.unpark(), Ok(()));
        assert!(!p.parked() && p.poll_fd().is_some());
        // Parked with another start time: the pid names another process now.
        let mut stale = Proc::open(pid).unwrap();
        stale.park();
        stale.start = stale.start.map(|s| s + 1);
        assert!(stale.exited());
        assert_eq!(stale.signal(Signal::SIGTERM), Err(Errno::ESRCH));
        assert_eq!(stale.unpark(), Err(Errno::ESRCH));
        assert_eq!(
            child.try_wait().unwrap(),
            None,
            "the unrelated process was hit"
        );
        // Parked, then signalled: the signal goes through a pidfd opened for it.
        let mut q = Proc::open(pid).unwrap();
        q.park();
        q.signal(Signal::SIGKILL).unwrap();
        let _ = child.wait();
        assert!(q.exited() && p.exited());
        assert_eq!(q.unpark(), Err(Errno::ESRCH));
    }

    #[test]
    fn parses_the_start_time_past_a_hostile_command_name() {
        let line = "42 (a) b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 777 20";
        assert_eq!(parse_start(line), Some(777));
        assert_eq!(parse_start("42 (x"), None);
    }
}
