//! Reading records and judging whether to believe them.

use super::*;
use crate::protocol::LeaseMode;
use crate::text::mode_word;
use crate::untrusted::{Access, OpenFailure, open_regular_at, read_bounded};
use nix::errno::Errno;
use nix::sys::stat::fstat;
use nix::sys::statfs::{NFS_SUPER_MAGIC, fstatfs};
use nix::sys::uio::pread;
use serde::Serialize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

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
    /// Side files that were not read: more than [`MAX_SIDE_FILES`] (or the byte or time budget
    /// of one look) were found; at least 1 when the directory listing itself was cut short.
    pub unread: usize,
    /// Other hosts named by believed records whose heartbeat file is next to the disk, and when
    /// they last wrote it (seen.rs).
    pub seen: Vec<super::LastSeen>,
}

impl Found {
    pub fn records(&self) -> Vec<Record> {
        self.believed.iter().map(|s| s.record.clone()).collect()
    }
}

/// What the kernel says holds byte 0 of `fd` (which must not hold a lock itself).
pub fn kernel_lock(fd: BorrowedFd<'_>) -> Option<KernelLock> {
    let (l_type, pid) = ofd_getlk(fd, 0)?;
    let mode = if l_type == libc::F_RDLCK {
        LeaseMode::Shared
    } else {
        LeaseMode::Exclusive
    };
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

/// `/proc/PID/comm` of a local process (at most 64 bytes read), for messages that name a lock
/// holder.
fn comm(pid: i32) -> Option<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(format!("/proc/{pid}/comm"))
        .ok()?
        .take(64)
        .read_to_end(&mut bytes)
        .ok()?;
    Some(
        String::from_utf8_lossy(&bytes)
            .trim_end_matches('\n')
            .to_string(),
    )
}

/// How a candidate record's liveness is judged (docs/holders.md, section 3).
#[derive(Clone, Debug)]
enum Live {
    /// An in-file record: byte 1 of the lock file, looked at.
    InFile(bool),
    /// A side file named for host label `label`: whether anybody holds byte 0 of the side file
    /// (the rule of records without a `liveness` field), and what lock (if any) is on the
    /// label's liveness byte of the locked file (the `locked-file` rule).
    Side {
        side_lock: bool,
        label: String,
        on_locked_file: Option<libc::c_int>,
    },
}

/// Whether `record`, found as `live` says, is alive by the rule it names; Err when the record
/// cannot be judged at all (an unknown rule, or a host that does not match its file's name).
fn alive(record: &Record, live: &Live) -> Result<bool, String> {
    match live {
        Live::InFile(held) => Ok(*held),
        Live::Side {
            side_lock,
            label,
            on_locked_file,
        } => match record.liveness.as_deref() {
            None => Ok(*side_lock),
            Some(LIVENESS_LOCKED_FILE) => {
                if host_label(&record.host) != *label {
                    return Err(format!(
                        "its host {:?} is not the host its side file is named for ({label:?})",
                        record.host
                    ));
                }
                // An exclusive lease's descriptor is writable and holds a write lock; a shared
                // lease's may be read-only and holds a read lock.
                Ok(match record.mode {
                    LeaseMode::Exclusive => *on_locked_file == Some(libc::F_WRLCK),
                    LeaseMode::Shared => on_locked_file.is_some(),
                })
            }
            Some(other) => Err(format!(
                "unknown liveness rule {other:?} (this lockwarden knows {LIVENESS_LOCKED_FILE:?} \
                 and the side file's own lock)"
            )),
        },
    }
}

/// A record read from a lock file or a side file, not judged yet.
struct Candidate {
    source: String,
    parsed: Result<Record, String>,
    live: Live,
}

/// Read and judge every record about the file open as `target.fd`. Never writes or deletes.
pub fn read(target: Target<'_>) -> Found {
    let lock = kernel_lock(target.fd);
    let ino = fstat(target.fd).map(|s| s.st_ino).ok();
    let mut found = Found {
        lock,
        ..Found::default()
    };
    let mut candidates: Vec<Candidate> = Vec::new();
    if target.in_file_possible() {
        if let Some(r) = read_in_file(target.fd) {
            let live = ofd_held(target.fd, LIVENESS_BYTE);
            candidates.push(Candidate {
                source: target.lock_path.to_string(),
                parsed: r,
                live: Live::InFile(live),
            });
        }
    }
    match side_files(target.fd) {
        Ok(Some(side)) => {
            found.unread = read_side(target.fd, &side, &mut candidates, &mut found.ignored);
        }
        Ok(None) => {}
        Err(e) => found.ignored.push(Ignored {
            source: target.lock_path.to_string(),
            host: None,
            reason: e,
        }),
    }
    for Candidate {
        source,
        parsed,
        live,
    } in candidates
    {
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
        let verdict =
            alive(&record, &live).and_then(|live| judge(&record, live, ino, found.lock.as_ref()));
        match verdict {
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
    found.seen = hosts_seen(target.fd, &found.believed);
    found
}

/// This host's name as records carry it.
fn own_host() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// When the hosts of `believed` records (not this boot of this host) last wrote their
/// heartbeat next to the file open as `fd` (seen.rs), at most `seen::MAX_HOSTS` of them.
fn hosts_seen(fd: BorrowedFd<'_>, believed: &[Seen]) -> Vec<super::LastSeen> {
    let here = boot_id();
    let mut hosts: Vec<&str> = Vec::new();
    for s in believed {
        let r = &s.record;
        // This host itself (same boot, same name) beats anyway; another name on the same kernel
        // is another host as far as the records go (a container, a test).
        let me = !here.is_empty() && r.boot_id == here && r.host == own_host();
        if me || hosts.contains(&r.host.as_str()) {
            continue;
        }
        hosts.push(&r.host);
    }
    if hosts.is_empty() {
        return Vec::new();
    }
    let Ok(Some(side)) = side_files(fd) else {
        return Vec::new();
    };
    super::seen::hosts_last_seen(&side.dir, &hosts)
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

/// A holder record from the bytes of a side file or lock file (another host's, so untrusted):
/// UTF-8 JSON of the documented schema, trailing padding ignored. Public for the fuzz target
/// `holder_record`.
pub fn parse_record(bytes: &[u8]) -> Result<Record, String> {
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
        match parse_record(&buf) {
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

/// Most side files opened and read per look at a locked file: other hosts (or a buggy tool)
/// may plant any number of `<name>@<host>.json` files, and a refusal must stay cheap.
pub const MAX_SIDE_FILES: usize = 16;
/// Most bytes of side files read per look.
const MAX_SIDE_BYTES: usize = 256 * 1024;
/// Most directory entries looked at per look (a directory may hold millions of names).
const MAX_DIR_ENTRIES: usize = 4096;
/// Time budget for reading side files per look (monotonic clock).
const SIDE_BUDGET: Duration = Duration::from_millis(100);

/// Read the side files of `side` (of the locked file open as `locked`) into `out` (at most
/// [`MAX_SIDE_FILES`], within the byte and time budgets); returns how many matching ones were
/// left unread.
fn read_side(
    locked: BorrowedFd<'_>,
    side: &SideFiles,
    out: &mut Vec<Candidate>,
    ignored: &mut Vec<Ignored>,
) -> usize {
    let started = Instant::now();
    let dir = match open_record_dir(&side.dir) {
        Ok(Some(d)) => d,
        Ok(None) => return 0,
        Err(e) => {
            ignored.push(Ignored {
                source: side.dir.clone(),
                host: None,
                reason: format!("cannot open the record directory: {}", e.desc()),
            });
            return 0;
        }
    };
    // Listed through the descriptor just opened (the same directory, whatever its path names
    // by now), at most MAX_DIR_ENTRIES entries.
    let listing = format!("/proc/self/fd/{}", dir.as_raw_fd());
    let entries = match std::fs::read_dir(&listing) {
        Ok(e) => e,
        Err(e) => {
            ignored.push(Ignored {
                source: side.dir.clone(),
                host: None,
                reason: format!("cannot list the record directory: {e}"),
            });
            return 0;
        }
    };
    let mut scanned = 0usize;
    let mut truncated = false;
    let mut names: Vec<String> = Vec::new();
    for e in entries {
        scanned += 1;
        if scanned > MAX_DIR_ENTRIES {
            truncated = true;
            break;
        }
        let Ok(e) = e else { continue };
        let Ok(name) = e.file_name().into_string() else {
            continue;
        };
        if side_file_host(&name, &side.stem).is_none() {
            continue;
        }
        // Not a regular file by the directory entry's type: skipped without any open.
        if e.file_type().is_ok_and(|t| !t.is_file()) {
            if ignored.len() < MAX_SIDE_FILES {
                ignored.push(Ignored {
                    source: format!("{}/{name}", side.dir),
                    host: None,
                    reason: "not a regular file; not opened".into(),
                });
            }
            continue;
        }
        names.push(name);
    }
    names.sort();
    let single = names.len() == 1;
    let mut bytes = 0usize;
    let mut unread = 0usize;
    for (i, name) in names.iter().enumerate() {
        if i >= MAX_SIDE_FILES || bytes >= MAX_SIDE_BYTES || started.elapsed() >= SIDE_BUDGET {
            unread = names.len() - i;
            break;
        }
        let source = format!("{}/{name}", side.dir);
        let label = side_file_host(name, &side.stem)
            .unwrap_or_default()
            .to_string();
        let fd = match open_regular_at(Some(dir.as_fd()), name, Access::Read, None) {
            Ok((fd, _, _)) => fd,
            // Withdrawn between listing and opening.
            Err(OpenFailure::Sys(Errno::ENOENT)) => continue,
            Err(e) => {
                // Not judged (no record was read); how it would have been held does not matter.
                out.push(Candidate {
                    source,
                    parsed: Err(format!("cannot open: {}", e.describe())),
                    live: Live::Side {
                        side_lock: false,
                        label,
                        on_locked_file: None,
                    },
                });
                continue;
            }
        };
        let (parsed, live, n) = read_side_file(fd.as_fd(), locked, &label, single);
        bytes = bytes.saturating_add(n);
        if parsed.as_ref().is_err_and(|e| e.starts_with(EMPTY)) && !live.held() {
            // A withdrawn record: its file stays for reuse.
            continue;
        }
        out.push(Candidate {
            source,
            parsed,
            live,
        });
    }
    if unread > 0 || truncated {
        let more = if truncated {
            format!("{unread} or more")
        } else {
            unread.to_string()
        };
        ignored.push(Ignored {
            source: side.dir.clone(),
            host: None,
            reason: format!(
                "{more} more side files of it were not read (at most {MAX_SIDE_FILES} files, \
                 {MAX_SIDE_BYTES} bytes and {} ms per look; a directory with this many records \
                 was probably filled by a misbehaving host: remove the stale ones)",
                SIDE_BUDGET.as_millis()
            ),
        });
    }
    unread.max(usize::from(truncated))
}

impl Live {
    /// Held by either rule (whichever the record, once readable, will name).
    fn held(&self) -> bool {
        match self {
            Live::InFile(h) => *h,
            Live::Side {
                side_lock,
                on_locked_file,
                ..
            } => *side_lock || on_locked_file.is_some(),
        }
    }
}

/// What holds byte 0 of side file `fd` and the liveness byte of host `label` in the locked
/// file open as `locked`.
fn side_liveness(fd: BorrowedFd<'_>, locked: BorrowedFd<'_>, label: &str) -> Live {
    Live::Side {
        side_lock: ofd_held(fd, 0),
        label: label.to_string(),
        on_locked_file: ofd_getlk(locked, liveness_byte(label)).map(|(t, _)| t),
    }
}

/// One side file's record, whether its publisher holds it (by either rule: the side file's own
/// byte 0, or the liveness byte of the file's host `label` in the locked file open as `locked`),
/// and the bytes read. Side files are rewritten in place, so a reader can catch one empty (just
/// created or claimed) or torn (a rewrite in progress): when the content is not a record but
/// the publisher holds it and it is the `only` candidate, read again shortly (with many
/// candidates a retry per file would let a directory of held garbage stall the reader); what is
/// still not a record after that is ignored with the reason, never believed.
fn read_side_file(
    fd: BorrowedFd<'_>,
    locked: BorrowedFd<'_>,
    label: &str,
    only: bool,
) -> (Result<Record, String>, Live, usize) {
    let tries = if only { READ_TRIES } else { 1 };
    let mut attempt = 0;
    let mut total = 0usize;
    loop {
        attempt += 1;
        let parsed = match read_bounded(fd, MAX_RECORD) {
            Ok(Some(bytes)) => {
                total = total.saturating_add(bytes.len());
                if bytes.iter().all(|b| *b == 0 || b.is_ascii_whitespace()) {
                    Err(format!("{EMPTY}: being written or withdrawn"))
                } else {
                    parse_record(&bytes)
                }
            }
            Ok(None) => {
                total = total.saturating_add(MAX_RECORD);
                Err(format!(
                    "larger than a record can be ({MAX_RECORD} bytes); not a lockwarden record"
                ))
            }
            Err(e) => {
                return (
                    Err(format!("cannot read: {}", e.desc())),
                    side_liveness(fd, locked, label),
                    total,
                );
            }
        };
        let live = side_liveness(fd, locked, label);
        if parsed.is_ok() || !live.held() || attempt >= tries {
            return (parsed, live, total);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, File, OpenOptions};

    fn record(mode: LeaseMode, ino: u64) -> Record {
        let mut r = Record::new(
            "node-a",
            ResourceKind::Disk,
            "/img/a",
            mode,
            "/img/a",
            1,
            Vec::new(),
        );
        r.lock_ino = ino;
        r
    }

    fn lock(mode: LeaseMode) -> KernelLock {
        KernelLock {
            mode,
            pid: None,
            comm: None,
            nfs: false,
        }
    }

    #[test]
    fn a_record_is_believed_only_while_its_locks_say_so() {
        let r = record(LeaseMode::Exclusive, 7);
        let held = lock(LeaseMode::Exclusive);
        assert_eq!(judge(&r, true, Some(7), Some(&held)), Ok(()));
        // The inode is unknown (fstat failed): not held against the record.
        assert_eq!(judge(&r, true, None, Some(&held)), Ok(()));
        let stale = |live, ino, lock: Option<&KernelLock>| judge(&r, live, ino, lock).unwrap_err();
        assert!(stale(false, Some(7), Some(&held)).contains("no longer holds the record"));
        assert!(
            stale(true, Some(8), Some(&held))
                .contains("describes inode 7, the file is now inode 8")
        );
        assert!(stale(true, Some(7), None).contains("nothing holds byte 0"));
        assert!(
            stale(true, Some(7), Some(&lock(LeaseMode::Shared)))
                .contains("byte 0 is held shared, the record says exclusive")
        );
        let mut future = r.clone();
        future.lockwarden_holder = FORMAT + 1;
        assert!(
            judge(&future, true, Some(7), Some(&held))
                .unwrap_err()
                .starts_with("unknown record format 2")
        );
    }

    #[test]
    fn the_kernels_view_of_byte_0() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        fs::write(&p, b"x").unwrap();
        let probe = File::open(&p).unwrap();
        assert_eq!(kernel_lock(probe.as_fd()), None);
        // An OFD lock (lockwardend's kind): a mode, no pid.
        let ofd = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        nix::fcntl::fcntl(
            ofd.as_fd(),
            nix::fcntl::FcntlArg::F_OFD_SETLK(&flock(libc::F_RDLCK, 0)),
        )
        .unwrap();
        assert_eq!(kernel_lock(probe.as_fd()), Some(lock(LeaseMode::Shared)));
        drop(ofd);
        // A POSIX lock (virtlockd's kind) names its process, here this one.
        let posix = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        nix::fcntl::fcntl(
            posix.as_fd(),
            nix::fcntl::FcntlArg::F_SETLK(&flock(libc::F_WRLCK, 0)),
        )
        .unwrap();
        let k = kernel_lock(probe.as_fd()).unwrap();
        assert_eq!(k.mode, LeaseMode::Exclusive);
        assert_eq!(k.pid, Some(std::process::id() as i32));
        assert!(!k.nfs);
        let me = fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(k.comm.as_deref(), Some(me.trim_end()));
    }

    #[test]
    fn records_are_read_from_a_lock_file_and_its_side_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lockfile");
        let real = fs::canonicalize(dir.path()).unwrap();
        fs::write(&p, b"").unwrap();
        let lease = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let ino = fstat(lease.as_fd()).unwrap().st_ino;
        let lp = p.to_str().unwrap();
        let target = |fd| Target {
            fd,
            kind: ResourceKind::Disk,
            lock_path: lp,
            lockspace: true,
        };
        // Nothing locked, nothing written: nothing found.
        let reader = File::open(&p).unwrap();
        assert_eq!(read(target(reader.as_fd())), Found::default());
        // An in-file record under its liveness lock, byte 0 locked exclusive: believed.
        let r = record(LeaseMode::Exclusive, ino);
        fs::write(&p, serde_json::to_vec(&r).unwrap()).unwrap();
        for start in [0, LIVENESS_BYTE] {
            nix::fcntl::fcntl(
                lease.as_fd(),
                nix::fcntl::FcntlArg::F_OFD_SETLK(&flock(libc::F_WRLCK, start)),
            )
            .unwrap();
        }
        let found = read(target(reader.as_fd()));
        assert_eq!(found.records(), vec![r.clone()]);
        assert_eq!(found.believed[0].source, lp);
        // A side file nobody holds, and garbage under a held side file: both ignored, with why.
        let side = real.join(RECORD_DIR);
        fs::create_dir(&side).unwrap();
        let mut other = r.clone();
        other.host = "node-b".into();
        fs::write(
            side.join("lockfile@node-b.json"),
            serde_json::to_vec(&other).unwrap(),
        )
        .unwrap();
        fs::write(side.join("lockfile@node-c.json"), b"{not json").unwrap();
        let held = OpenOptions::new()
            .read(true)
            .write(true)
            .open(side.join("lockfile@node-c.json"))
            .unwrap();
        nix::fcntl::fcntl(
            held.as_fd(),
            nix::fcntl::FcntlArg::F_OFD_SETLK(&flock(libc::F_WRLCK, 0)),
        )
        .unwrap();
        let found = read(target(reader.as_fd()));
        assert_eq!(found.records(), vec![r]);
        let reasons: Vec<(&str, &str)> = found
            .ignored
            .iter()
            .map(|i| (i.source.rsplit('/').next().unwrap(), i.reason.as_str()))
            .collect();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(
            reasons.iter().any(|(s, why)| *s == "lockfile@node-b.json"
                && why.contains("no longer holds the record"))
        );
        assert!(reasons.iter().any(|(s, why)| *s == "lockfile@node-c.json"
            && why.starts_with("not a lockwarden holder record")));
    }
}
