//! The lock itself (docs/interfaces.md §2): an OFD lock on byte 0, length 1.
//!
//! Why OFD and why byte 0: virtlockd takes a POSIX lock on byte 0, so the same byte makes a
//! lockwarden host and a virtlockd host exclude each other; OFD locks belong to the open file
//! description, so closing some other descriptor of the same image (which POSIX locks would
//! punish by dropping the lock) changes nothing. QEMU's own locks live on bytes 100-104 and
//! 200-204; nothing here ever names another byte of an image.

use crate::protocol::LeaseMode;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use std::os::fd::BorrowedFd;

fn flock(l_type: libc::c_int, start: libc::off_t, len: libc::off_t) -> libc::flock {
    libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: len,
        l_pid: 0,
    }
}

fn lock_type(mode: LeaseMode) -> libc::c_int {
    match mode {
        LeaseMode::Exclusive => libc::F_WRLCK,
        LeaseMode::Shared => libc::F_RDLCK,
    }
}

/// Take (or convert to) `mode` on byte 0 without waiting.
pub fn try_lock(fd: BorrowedFd<'_>, mode: LeaseMode) -> Result<(), Errno> {
    fcntl(fd, FcntlArg::F_OFD_SETLK(&flock(lock_type(mode), 0, 1))).map(drop)
}

/// Drop our lock on byte 0. Needed before closing a lease's descriptor: the keeper may still
/// hold a duplicate of the same open file description, which would keep the lock alive.
pub fn unlock(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    fcntl(fd, FcntlArg::F_OFD_SETLK(&flock(libc::F_UNLCK, 0, 1))).map(drop)
}

/// Whether `try_lock` failed because somebody else holds a conflicting lock.
pub fn is_conflict(e: Errno) -> bool {
    matches!(e, Errno::EAGAIN | Errno::EACCES)
}

/// Exclusive OFD lock on the whole file, for the pid file.
pub fn try_lock_whole_file(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    fcntl(fd, FcntlArg::F_OFD_SETLK(&flock(libc::F_WRLCK, 0, 0))).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::fd::AsFd;

    #[test]
    fn byte0_conflicts_between_descriptions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, b"x").unwrap();
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap()
        };
        let (a, b) = (open(), open());
        try_lock(a.as_fd(), LeaseMode::Shared).unwrap();
        try_lock(b.as_fd(), LeaseMode::Shared).unwrap();
        let e = try_lock(b.as_fd(), LeaseMode::Exclusive).unwrap_err();
        assert!(is_conflict(e));
        // What holds byte 0 is reported by crate::holder_record::kernel_lock.
        let held = crate::holder_record::kernel_lock(b.as_fd()).unwrap();
        assert_eq!((held.mode, held.pid), (LeaseMode::Shared, None));
        drop(a);
        let a = open();
        try_lock(b.as_fd(), LeaseMode::Exclusive).unwrap();
        assert_eq!(
            crate::holder_record::kernel_lock(a.as_fd()).map(|k| k.mode),
            Some(LeaseMode::Exclusive)
        );
    }
}
