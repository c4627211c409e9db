//! Running `lvs` / `scsi_id` to name LVM and SCSI lockspace leases, as lockd does.
//!
//! Part of [`crate::naming`]: the plugin, `lockwarden who` and `audit` run it. In the plugin it
//! runs in `drvAddResource`, which during a domain start executes in the forked child of a
//! multithreaded libvirtd, so it uses `posix_spawn` (no Rust `Command`, which takes std's
//! environment lock), an explicit environment (no `std::env` reads), a pipe read with `poll`
//! against a deadline, and `waitpid` on the one child it started. A tool that hangs is killed
//! when the deadline passes.

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{Pid, pipe2, read};
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// At most this much output is kept (an LV UUID or a WWID is far shorter).
const MAX_OUTPUT: usize = 4096;

/// What running a tool gave.
#[derive(Debug, PartialEq, Eq)]
pub enum ToolOutcome {
    /// Exit status 0 with this standard output.
    Success(Vec<u8>),
    /// The tool ran but did not succeed (non-zero exit or killed by a signal).
    Failed(String),
}

/// Why a tool could not be run at all.
#[derive(Debug, PartialEq, Eq)]
pub enum ToolError {
    /// posix_spawn failed (e.g. the program does not exist).
    Spawn(Errno),
    /// The tool did not finish within the timeout; it was killed.
    Timeout,
    /// Some other system call failed.
    Sys(&'static str, Errno),
}

impl std::fmt::Display for ToolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ToolError::Spawn(e) => write!(f, "cannot run it: {}", e.desc()),
            ToolError::Timeout => write!(f, "it did not finish in time and was killed"),
            ToolError::Sys(what, e) => write!(f, "{what} failed: {}", e.desc()),
        }
    }
}

fn cstring(s: &str) -> Result<CString, ToolError> {
    CString::new(s).map_err(|_| ToolError::Sys("building the argument list", Errno::EINVAL))
}

/// Run `program` with `args` (argv[0] is `program`), stdin and stderr on /dev/null, and collect
/// its standard output, giving up after `timeout`.
pub fn run(program: &str, args: &[&str], timeout: Duration) -> Result<ToolOutcome, ToolError> {
    let deadline = Instant::now() + timeout;
    let prog = cstring(program)?;
    let mut argv = vec![prog.clone()];
    for a in args {
        argv.push(cstring(a)?);
    }
    let envp = [
        cstring("PATH=/usr/sbin:/usr/bin:/sbin:/bin")?,
        cstring("LC_ALL=C")?,
    ];

    let devnull = nix::fcntl::open(
        "/dev/null",
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| ToolError::Sys("opening /dev/null", e))?;
    let (rd, wr) = pipe2(OFlag::O_CLOEXEC).map_err(|e| ToolError::Sys("pipe", e))?;

    let mut actions =
        PosixSpawnFileActions::init().map_err(|e| ToolError::Sys("spawn setup", e))?;
    for (fd, target) in [
        (devnull.as_raw_fd(), 0),
        (wr.as_raw_fd(), 1),
        (devnull.as_raw_fd(), 2),
    ] {
        actions
            .add_dup2(fd, target)
            .map_err(|e| ToolError::Sys("spawn setup", e))?;
    }
    let mut attr = PosixSpawnAttr::init().map_err(|e| ToolError::Sys("spawn setup", e))?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
    )
    .map_err(|e| ToolError::Sys("spawn setup", e))?;
    attr.set_sigmask(&SigSet::empty())
        .map_err(|e| ToolError::Sys("spawn setup", e))?;
    attr.set_sigdefault(&SigSet::all())
        .map_err(|e| ToolError::Sys("spawn setup", e))?;

    let pid =
        posix_spawn(prog.as_c_str(), &actions, &attr, &argv, &envp).map_err(ToolError::Spawn)?;
    drop(wr);
    drop(devnull);

    let output = collect(&rd, deadline);
    drop(rd);
    let output = match output {
        Ok(o) => o,
        Err(e) => {
            // Best effort: the child may already be gone.
            let _ = kill(pid, Signal::SIGKILL);
            let _ = reap(pid);
            return Err(e);
        }
    };
    match reap_until(pid, deadline)? {
        WaitStatus::Exited(_, 0) => Ok(ToolOutcome::Success(output)),
        WaitStatus::Exited(_, code) => Ok(ToolOutcome::Failed(format!("exit status {code}"))),
        WaitStatus::Signaled(_, sig, _) => Ok(ToolOutcome::Failed(format!("killed by {sig}"))),
        other => Ok(ToolOutcome::Failed(format!("ended as {other:?}"))),
    }
}

/// Read the pipe until EOF or the deadline.
fn collect(rd: &OwnedFd, deadline: Instant) -> Result<Vec<u8>, ToolError> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ToolError::Timeout);
        }
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(rd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(ToolError::Sys("poll", e)),
        }
        match read(rd, &mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => {
                let room = MAX_OUTPUT.saturating_sub(out.len());
                out.extend_from_slice(buf.get(..n.min(room)).unwrap_or_default());
            }
            Err(Errno::EINTR | Errno::EAGAIN) => continue,
            Err(e) => return Err(ToolError::Sys("read", e)),
        }
    }
}

/// Wait for `pid`, but not past the deadline (then kill it).
fn reap_until(pid: Pid, deadline: Instant) -> Result<WaitStatus, ToolError> {
    loop {
        match waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(status) => return Ok(status),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(ToolError::Sys("waitpid", e)),
        }
        if Instant::now() >= deadline {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = reap(pid);
            return Err(ToolError::Timeout);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn reap(pid: Pid) -> Result<WaitStatus, Errno> {
    loop {
        match waitpid(pid, None) {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_status() {
        let t = Duration::from_secs(10);
        assert_eq!(
            run("/bin/sh", &["-c", "echo '  abc'"], t).unwrap(),
            ToolOutcome::Success(b"  abc\n".to_vec())
        );
        assert!(matches!(
            run("/bin/sh", &["-c", "echo x; exit 5"], t).unwrap(),
            ToolOutcome::Failed(m) if m == "exit status 5"
        ));
        // The environment is ours, not the caller's.
        assert_eq!(
            run("/bin/sh", &["-c", "echo $LC_ALL"], t).unwrap(),
            ToolOutcome::Success(b"C\n".to_vec())
        );
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        assert_eq!(
            run("/nonexistent/lvs", &[], Duration::from_secs(5)),
            Err(ToolError::Spawn(Errno::ENOENT))
        );
    }

    #[test]
    fn hung_tool_is_killed() {
        let start = Instant::now();
        assert_eq!(
            run("/bin/sleep", &["30"], Duration::from_millis(200)),
            Err(ToolError::Timeout)
        );
        assert!(start.elapsed() < Duration::from_secs(5));
        // A tool that closes stdout but keeps running is killed too.
        assert_eq!(
            run(
                "/bin/sh",
                &["-c", "exec >&-; sleep 30"],
                Duration::from_millis(200)
            ),
            Err(ToolError::Timeout)
        );
    }
}
