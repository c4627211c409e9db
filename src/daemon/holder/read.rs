//! Reading records and judging whether to believe them.

use super::*;
use crate::daemon::lock::{self, Conflict};
use crate::daemon::pidfd::comm;
use crate::daemon::text::mode_word;
use crate::protocol::LeaseMode;
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, fstat};
use nix::sys::statfs::{NFS_SUPER_MAGIC, fstatfs};
use nix::sys::uio::pread;
use serde::Serialize;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

/// What holds byte 0 of the locked file, as the kernel reports it to this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KernelLock {
    pub mode: LeaseMode,
    /// Pid of a POSIX lock holder (OFD holders, like lockwardend, report none). On NFS this
    /// may be a process of another client.
    pub pid: Option<i32>,
    /// `/proc/<pid>/comm` of that pid, when it is a local process.
    pub comm: Option<String>,
    /// The file is on NFS (a pid may then belong to another host).
    pub nfs: bool,
}

/// A record that was read and believed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub record: Record,
    /// Where it was read: the side file's path, or the lock file's path for in-file records.
    pub source: String,
}

/// A record that was read and not believed, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ignored {
    pub source: String,
    pub host: Option<String>,
    pub reason: String,
}

/// Everything known about who holds a locked file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// The lock on byte 0, if any.
    pub lock: Option<KernelLock>,
    pub believed: Vec<Seen>,
    pub ignored: Vec<Ignored>,
}

impl Found {
    pub fn records(&self) -> Vec<Record> {
        self.believed.iter().map(|s| s.record.clone()).collect()
    }
}

/// What the kernel says holds byte 0 of `fd` (which must not hold a lock itself).
pub fn kernel_lock(fd: BorrowedFd<'_>) -> Option<KernelLock> {
    let Conflict { pid, mode } = lock::conflict(fd, LeaseMode::Exclusive)?;
    let nfs = fstatfs(fd)
        .map(|s| s.filesystem_type() == NFS_SUPER_MAGIC)
        .unwrap_or(false);
    Some(KernelLock {
        mode,
        pid,
        comm: pid.filter(|_| !nfs).and_then(comm),
        nfs,
    })
}

/// Read and judge every record about the file open as `target.fd`. Never writes or deletes.
pub fn read(target: Target<'_>) -> Found {
    let lock = kernel_lock(target.fd);
    let ino = fstat(target.fd).map(|s| s.st_ino).ok();
    let mut found = Found {
        lock,
        ..Found::default()
    };
    let mut candidates: Vec<(String, Result<Record, String>, bool)> = Vec::new();
    if target.in_file_possible() {
        if let Some(r) = read_in_file(target.fd) {
            let live = ofd_held(target.fd, LIVENESS_BYTE);
            candidates.push((target.lock_path.to_string(), r, live));
        }
    }
    match side_files(target.fd) {
        Ok(Some(side)) => read_side(&side, &mut candidates, &mut found.ignored),
        Ok(None) => {}
        Err(e) => found.ignored.push(Ignored {
            source: target.lock_path.to_string(),
            host: None,
            reason: e,
        }),
    }
    for (source, parsed, live) in candidates {
        let record = match parsed {
            Ok(r) => r,
            Err(reason) => {
                found.ignored.push(Ignored {
                    source,
                    host: None,
                    reason,
                });
                continue;
            }
        };
        match judge(&record, live, ino, found.lock.as_ref()) {
            Ok(()) => found.believed.push(Seen { record, source }),
            Err(reason) => found.ignored.push(Ignored {
                source,
                host: Some(record.host),
                reason,
            }),
        }
    }
    found
        .believed
        .sort_by(|a, b| (a.record.since, &a.record.host).cmp(&(b.record.since, &b.record.host)));
    found
}

fn judge(
    record: &Record,
    live: bool,
    ino: Option<u64>,
    lock: Option<&KernelLock>,
) -> Result<(), String> {
    if record.lockwarden_holder != FORMAT {
        return Err(format!(
            "unknown record format {} (this lockwarden reads {FORMAT})",
            record.lockwarden_holder
        ));
    }
    if !live {
        return Err(
            "stale: its publisher no longer holds the record (lease released, or lockwardend \
             stopped or crashed)"
                .into(),
        );
    }
    if let Some(ino) = ino {
        if record.lock_ino != ino {
            return Err(format!(
                "stale: it describes inode {}, the file is now inode {ino}",
                record.lock_ino
            ));
        }
    }
    match lock {
        None => Err("stale: nothing holds byte 0".into()),
        Some(l) if l.mode != record.mode => Err(format!(
            "stale: byte 0 is held {}, the record says {}",
            mode_word(l.mode),
            mode_word(record.mode)
        )),
        Some(_) => Ok(()),
    }
}

fn parse(bytes: &[u8]) -> Result<Record, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    serde_json::from_str(text.trim_end_matches(['\n', '\0', ' ']))
        .map_err(|e| format!("not a lockwarden holder record: {e}"))
}

/// The record inside a lock file; None when the file is empty (no record).
fn read_in_file(fd: BorrowedFd<'_>) -> Option<Result<Record, String>> {
    let mut last = None;
    for attempt in 0..READ_TRIES {
        let mut buf = vec![0u8; MAX_RECORD];
        let n = match pread(fd, &mut buf, 0) {
            Ok(n) => n,
            Err(e) => return Some(Err(format!("cannot read the lock file: {}", e.desc()))),
        };
        buf.truncate(n);
        if buf.iter().all(|b| *b == 0 || b.is_ascii_whitespace()) {
            return None;
        }
        match parse(&buf) {
            Ok(r) => return Some(Ok(r)),
            Err(e) => last = Some(Err(e)),
        }
        // Perhaps caught mid-rewrite: look again shortly.
        if attempt + 1 < READ_TRIES {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    last
}

fn read_side(
    side: &SideFiles,
    out: &mut Vec<(String, Result<Record, String>, bool)>,
    ignored: &mut Vec<Ignored>,
) {
    let dir = match open_record_dir(&side.dir, false) {
        Ok(Some(d)) => d,
        Ok(None) => return,
        Err(e) => {
            ignored.push(Ignored {
                source: side.dir.clone(),
                host: None,
                reason: format!("cannot open the record directory: {}", e.desc()),
            });
            return;
        }
    };
    let entries = match std::fs::read_dir(&side.dir) {
        Ok(e) => e,
        Err(e) => {
            ignored.push(Ignored {
                source: side.dir.clone(),
                host: None,
                reason: format!("cannot list the record directory: {e}"),
            });
            return;
        }
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| side_file_host(n, &side.stem).is_some())
        .collect();
    names.sort();
    for name in names {
        let source = format!("{}/{name}", side.dir);
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
        let fd = match openat(&dir, name.as_str(), flags, Mode::empty()) {
            Ok(fd) => fd,
            // Withdrawn between listing and opening.
            Err(Errno::ENOENT) => continue,
            Err(e) => {
                out.push((source, Err(format!("cannot open: {}", e.desc())), false));
                continue;
            }
        };
        let (parsed, live) = read_side_file(fd.as_fd());
        if parsed.as_ref().is_err_and(|e| e.starts_with(EMPTY)) && !live {
            // A withdrawn record: its file stays for reuse.
            continue;
        }
        out.push((source, parsed, live));
    }
}

/// One side file's record and whether its publisher holds it. Side files are rewritten in
/// place, so a reader can catch one empty (just created) or torn (a rewrite in progress): when
/// the content is not a record but the publisher holds the file, read again shortly; what is
/// still not a record after that is ignored with the reason, never believed.
fn read_side_file(fd: BorrowedFd<'_>) -> (Result<Record, String>, bool) {
    let mut buf = vec![0u8; MAX_RECORD];
    let mut attempt = 0;
    loop {
        attempt += 1;
        let parsed = match pread(fd, &mut buf, 0) {
            Ok(n) => {
                let bytes = buf.get(..n).unwrap_or_default();
                if bytes.iter().all(|b| *b == 0 || b.is_ascii_whitespace()) {
                    Err(format!("{EMPTY}: being written or withdrawn"))
                } else {
                    parse(bytes)
                }
            }
            Err(e) => return (Err(format!("cannot read: {}", e.desc())), ofd_held(fd, 0)),
        };
        let live = ofd_held(fd, 0);
        if parsed.is_ok() || !live || attempt >= READ_TRIES {
            return (parsed, live);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
