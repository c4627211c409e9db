//! Signals as events of the loop, through a signalfd.
//!
//! Why a signalfd: the handlers' work (stop serving, later re-exec) must run in the event loop
//! between two requests, never in the middle of one; blocked signals read from a descriptor
//! give exactly that with no async-signal-safety puzzles. SIGPIPE is ignored so a client that
//! vanishes mid-response costs an EPIPE, not the daemon.

use nix::sys::signal::{SigHandler, SigSet, Signal, signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::os::fd::{AsRawFd, RawFd};

/// The signals the loop handles.
const HANDLED: [Signal; 4] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGUSR1,
];

#[derive(Debug)]
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Block the handled signals, route them to a descriptor, ignore SIGPIPE.
    pub fn install() -> nix::Result<Signals> {
        // SAFETY: SIG_IGN installs no handler code, so no async-signal-safety rule applies.
        unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) }?;
        let mut mask = SigSet::empty();
        for s in HANDLED {
            mask.add(s);
        }
        mask.thread_block()?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Signals { fd })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The next pending signal, if any.
    pub fn pending(&self) -> Option<Signal> {
        loop {
            match self.fd.read_signal() {
                Ok(Some(info)) => match Signal::try_from(info.ssi_signo as i32) {
                    Ok(s) => return Some(s),
                    Err(_) => continue,
                },
                Ok(None) | Err(_) => return None,
            }
        }
    }
}
