//! OFD lock helpers standing in for another host or for QEMU: take a lock on a byte of a file
//! through a file description of our own. (Probing is `proto::probe_lock` / `proto::byte0`.)

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

/// Set an OFD lock of type `l_type` (F_RDLCK, F_WRLCK or F_UNLCK) on byte `start` of `f`;
/// panics when refused.
pub fn ofd_lock(f: &File, l_type: libc::c_int, start: i64) {
    let fl = libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: 1,
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK with a valid descriptor and a live flock struct.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    assert_eq!(
        r,
        0,
        "F_OFD_SETLK failed: {}",
        std::io::Error::last_os_error()
    );
}

/// Hold an OFD write lock on byte 0 of `path` (another host, say) until the file is dropped;
/// panics when `path` cannot be opened read-write or the lock is refused.
pub fn hold_byte0(path: &Path) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    ofd_lock(&f, libc::F_WRLCK, 0);
    f
}
