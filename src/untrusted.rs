//! Files and text that come from shared storage, which other hosts also write.
//!
//! Threat model (docs/hardening.md): any other host on the share, or a buggy tool there, may
//! plant anything where lockwarden looks — a hard link to a VM image, a device node, a FIFO,
//! a symbolic link, a huge file, bytes that are terminal escape sequences. None of it may make
//! this host destroy data, arm a device, hang, run out of memory, or mislead its operator.
//! Every open of a file on storage that lockwarden did not just create goes through
//! [`open_regular_at`], every write goes to a file [`check_writable`] accepts, every read is
//! bounded by [`read_bounded`], and every byte printed goes through [`escape`].

use nix::errno::Errno;
use nix::fcntl::{OFlag, open, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat};
use nix::unistd::geteuid;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// How a file on storage is to be opened once it is known to be a regular file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    ReadWrite,
}

/// Why [`open_regular_at`] did not open a file.
#[derive(Debug, PartialEq, Eq)]
pub enum OpenFailure {
    /// The system call failed (ENOENT when the name is missing).
    Sys(Errno),
    /// The name is not a regular file (the text says what it is); it was never opened for I/O.
    NotRegular(&'static str),
}

impl OpenFailure {
    /// A short description for a message ("is a FIFO", "No such file or directory").
    pub fn describe(&self) -> String {
        match self {
            OpenFailure::Sys(e) => e.desc().to_string(),
            OpenFailure::NotRegular(kind) => format!("it is {kind}, not a regular file"),
        }
    }
}

/// What a file of type `mode` is, in words, when it is not a regular file.
pub fn non_regular_kind(mode: u32) -> Option<&'static str> {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => None,
        SFlag::S_IFDIR => Some("a directory"),
        SFlag::S_IFCHR => Some("a character device"),
        SFlag::S_IFBLK => Some("a block device"),
        SFlag::S_IFIFO => Some("a FIFO"),
        SFlag::S_IFSOCK => Some("a socket"),
        SFlag::S_IFLNK => Some("a symbolic link"),
        _ => Some("of an unknown file type"),
    }
}

/// Open `name` in directory `dir` (or relative to the working directory when `dir` is `None`)
/// only if it is a regular file, without ever performing a device open on it.
///
/// Why two steps: `open(2)` on a device node runs the driver's open (opening a watchdog arms
/// it; a tty becomes the controlling terminal without `O_NOCTTY`), and a FIFO can block. So the
/// name is first resolved with `O_PATH | O_NOFOLLOW`, which opens nothing, its type is checked
/// on that descriptor, and only a regular file is reopened for I/O through `/proc/self/fd`,
/// which reaches exactly the inode checked (no window for a swap of the name). The reopen
/// carries `O_NOCTTY | O_NONBLOCK | O_CLOEXEC`. A symbolic link is refused as not regular.
///
/// With `create` set, a missing name is created (`O_CREAT | O_EXCL`, never an existing file)
/// with that mode; the boolean says whether this call created it.
pub fn open_regular_at(
    dir: Option<BorrowedFd<'_>>,
    name: &str,
    access: Access,
    create: Option<u32>,
) -> Result<(OwnedFd, FileStat, bool), OpenFailure> {
    let io = match access {
        Access::Read => OFlag::O_RDONLY,
        Access::ReadWrite => OFlag::O_RDWR,
    } | OFlag::O_NOCTTY
        | OFlag::O_NONBLOCK
        | OFlag::O_CLOEXEC;
    let at = |flags: OFlag, mode: Mode| match dir {
        Some(d) => openat(d, name, flags, mode),
        None => open(name, flags, mode),
    };
    let path = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let handle = match at(path, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) if create.is_some() => {
            let mode = Mode::from_bits_truncate(create.unwrap_or(0o600));
            let flags = io | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW;
            return match at(flags, mode) {
                Ok(fd) => {
                    let st = fstat(fd.as_fd()).map_err(OpenFailure::Sys)?;
                    Ok((fd, st, true))
                }
                // Another creator won the race: open theirs, with the same checks.
                Err(Errno::EEXIST) => {
                    open_regular_at(dir, name, access, None).map(|(fd, st, _)| (fd, st, false))
                }
                Err(e) => Err(OpenFailure::Sys(e)),
            };
        }
        Err(e) => return Err(OpenFailure::Sys(e)),
    };
    let st = fstat(handle.as_fd()).map_err(OpenFailure::Sys)?;
    if let Some(kind) = non_regular_kind(st.st_mode) {
        return Err(OpenFailure::NotRegular(kind));
    }
    let proc_path = format!("/proc/self/fd/{}", handle.as_raw_fd());
    let fd = open(proc_path.as_str(), io, Mode::empty()).map_err(OpenFailure::Sys)?;
    let again = fstat(fd.as_fd()).map_err(OpenFailure::Sys)?;
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
        // /proc is not the real procfs (a chroot, a planted mount): trust nothing it gave.
        return Err(OpenFailure::Sys(Errno::EXDEV));
    }
    Ok((fd, again, false))
}

/// Whether lockwardend may write to or truncate the file described by `st`: a regular file
/// with exactly one name (a hard link to an image would make a record write land in the
/// image), owned by this process's user, and no larger than `max_len` (a record; anything
/// bigger was not written by us). The error says which rule failed.
pub fn check_writable(st: &FileStat, max_len: u64) -> Result<(), String> {
    if let Some(kind) = non_regular_kind(st.st_mode) {
        return Err(format!("it is {kind}, not a regular file"));
    }
    if st.st_nlink != 1 {
        return Err(format!(
            "it has {} hard links (a record file has exactly one; another link may be a disk \
             image)",
            st.st_nlink
        ));
    }
    let euid = geteuid().as_raw();
    if st.st_uid != euid {
        return Err(format!(
            "it is owned by uid {}, not by lockwardend's uid {euid}",
            st.st_uid
        ));
    }
    let size = u64::try_from(st.st_size).unwrap_or(u64::MAX);
    if size > max_len {
        return Err(format!(
            "it holds {size} bytes, more than a record ({max_len} bytes) can be"
        ));
    }
    Ok(())
}

/// Read at most `max` bytes from the start of `fd` (with `pread`, so the offset is untouched).
/// `Ok(None)` when the file holds more than `max` bytes: a caller never parses a cut record.
pub fn read_bounded(fd: BorrowedFd<'_>, max: usize) -> Result<Option<Vec<u8>>, Errno> {
    let mut buf = vec![0u8; max.saturating_add(1)];
    let mut got = 0usize;
    while got < buf.len() {
        let Some(rest) = buf.get_mut(got..) else {
            break;
        };
        let off = i64::try_from(got).map_err(|_| Errno::EOVERFLOW)?;
        match nix::sys::uio::pread(fd, rest, off) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    if got > max {
        return Ok(None);
    }
    buf.truncate(got);
    Ok(Some(buf))
}

/// Whether `c` must not reach a terminal or a log line as itself: control characters (escape
/// sequences, newlines that forge log lines) and the invisible format characters that reorder
/// or hide text (bidirectional overrides and isolates, zero-width characters, the BOM).
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00AD}' | '\u{061C}' | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2069}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}')
}

/// `s` as it may be shown to a person: every character [`needs_escape`] names is written as a
/// `\u{..}` escape (or `\n`, `\t`, ...), everything else as written.
pub fn escape(s: &str) -> String {
    if !s.chars().any(needs_escape) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn dir() -> (tempfile::TempDir, OwnedFd) {
        let d = tempfile::tempdir().unwrap();
        let fd = open(
            d.path(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        (d, fd)
    }

    #[test]
    fn refuses_fifo_symlink_and_device_without_opening_them() {
        let (d, fd) = dir();
        nix::unistd::mkfifo(&d.path().join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        symlink("/etc/passwd", d.path().join("link")).unwrap();
        // A FIFO opened for reading without a writer would block: O_PATH never does.
        let r = open_regular_at(Some(fd.as_fd()), "fifo", Access::Read, None);
        assert_eq!(r.err(), Some(OpenFailure::NotRegular("a FIFO")));
        let r = open_regular_at(Some(fd.as_fd()), "link", Access::Read, None);
        assert_eq!(r.err(), Some(OpenFailure::NotRegular("a symbolic link")));
        let r = open_regular_at(None, "/dev/null", Access::ReadWrite, None);
        assert_eq!(r.err(), Some(OpenFailure::NotRegular("a character device")));
    }

    #[test]
    fn opens_and_creates_regular_files() {
        let (d, fd) = dir();
        std::fs::write(d.path().join("f"), b"abc").unwrap();
        let (f, st, created) = open_regular_at(Some(fd.as_fd()), "f", Access::Read, None).unwrap();
        assert!(!created);
        assert_eq!(st.st_size, 3);
        assert_eq!(
            read_bounded(f.as_fd(), 3).unwrap().as_deref(),
            Some(&b"abc"[..])
        );
        assert_eq!(read_bounded(f.as_fd(), 2).unwrap(), None);
        let (_, _, created) =
            open_regular_at(Some(fd.as_fd()), "new", Access::ReadWrite, Some(0o600)).unwrap();
        assert!(created);
    }

    #[test]
    fn writable_only_with_one_link_and_record_size() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let st = nix::sys::stat::stat(&f).unwrap();
        assert_eq!(check_writable(&st, 10), Ok(()));
        assert!(
            check_writable(&st, 0)
                .unwrap_err()
                .contains("more than a record")
        );
        std::fs::hard_link(&f, d.path().join("g")).unwrap();
        let st = nix::sys::stat::stat(&f).unwrap();
        assert!(
            check_writable(&st, 10)
                .unwrap_err()
                .contains("2 hard links")
        );
    }

    #[test]
    fn escapes_controls_and_bidi() {
        assert_eq!(escape("node-b"), "node-b");
        assert_eq!(escape("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(escape("x\u{202E}y"), "x\\u{202e}y");
        assert_eq!(escape("l1\nl2"), "l1\\nl2");
    }
}
