//! The keeper: a small process that holds a duplicate of every lease's descriptor, so that no
//! crash, SIGKILL or stop of lockwardend ever drops a lock of a running VM.
//!
//! Why it works: an OFD lock belongs to the open file description, not to a process. The
//! daemon sends each lease's descriptor (and its lockspace directory's) to the keeper over a
//! `SOCK_SEQPACKET` socket with `SCM_RIGHTS`; while the keeper holds that duplicate, the
//! description — and the lock on it — survives whatever happens to the daemon. The keeper
//! keeps its duplicates queued in sockets of its own, not in its descriptor table (vault.rs),
//! so together the two processes use about one descriptor per lease. A restarted
//! daemon connects to the keeper's well-known socket, gets every descriptor back with the
//! lease's record (owners, names, mode), rebuilds its tables and carries on.
//!
//! Ordering (see docs/reliability.md): a lease is reported to the client only after its
//! descriptors are in the keeper's socket (`sendmsg` returned: from then on the kernel keeps
//! the open file descriptions alive for the keeper, whatever happens to the daemon); a lease is
//! dropped from the keeper before the daemon unlocks and closes its own descriptor. The keeper
//! reads its one connection in order and drains it to the end before it serves a restarted
//! daemon, so a crash at any point leaves either a lease the keeper holds (and the restarted
//! daemon knows) or no lock at all, never an orphan.
//!
//! Batches (protocol version 2): all leases of one request travel in one `hold_batch` message
//! (every descriptor by `SCM_RIGHTS`, split only past `SCM_MAX_FD` descriptors or ~192 KiB of
//! records) and are acknowledged once; releases are one `drop_batch`. A daemon that finds an
//! older keeper (version 1, still running after a live upgrade) falls back to one `hold` or
//! `drop` per lease, which every keeper understands.
//!
//! Quiet batches (protocol version 3): the daemon marks batches `quiet` and does not wait for
//! an answer — a round trip to another process per request was a third of a 1-disk acquire.
//! The keeper answers a quiet batch only by hanging up when it cannot take it (the daemon
//! then starts over and hands every lease over again), and after a quiet batch it sleeps a
//! few milliseconds before reading on, so a busy daemon's batches are taken a handful at a
//! time instead of waking the keeper for every one.
//!
//! While no daemon is connected the keeper watches the owners' pids itself (pidfds, checked
//! against their start times when the daemon's link closes): when every owner of a lease has
//! exited it closes the lease's descriptors, so a VM that dies during an outage frees its
//! disks. While a daemon is connected (it said `hello`) the daemon watches and the keeper holds
//! no pidfd, only each pid and start time (docs/reliability.md §3). It exits when it holds
//! nothing and no daemon is connected.
//!
//! Process: started by the daemon with fork + exec of its own binary
//! (`lockwardend --internal-keeper ...`, the child only makes async-signal-safe calls before the
//! exec, because the daemon has threads), in its own session, every inherited descriptor
//! closed except its socket and stderr; one main thread plus a closer thread per device. Its wire protocol is only ever
//! extended compatibly (new message types, announced by the version in `hello`'s answer),
//! because after a live upgrade of the daemon the old keeper keeps running.

use super::lease::LeaseKey;
use serde::{Deserialize, Serialize};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

// link: the daemon's side; process: the keeper itself; wire: socket and messages.
mod link;
mod process;
// recording: a link that records what it is told, for the core's unit tests.
#[cfg(test)]
pub mod recording;
// vault: where the keeper keeps its references to the leases' descriptions.
mod vault;
mod wire;

pub use link::Keeper;
pub use process::become_keeper_if_asked;
use process::spawn;
use wire::{Receiver, connect_to, send_msg, seqpacket};

/// Version of the daemon-keeper protocol this binary speaks. 1: hello, hold, drop, reset,
/// dump, quit. 2: adds hold_batch and drop_batch. 3: batches may be `quiet` (unanswered).
pub const KEEPER_PROTOCOL: u32 = 3;
/// First version that understands batches.
const BATCH_VERSION: u32 = 2;
/// First version that understands quiet batches.
const QUIET_VERSION: u32 = 3;
/// How long the keeper sleeps after a quiet batch before it reads the next message: the
/// descriptors stay alive in its socket meanwhile, and the daemon never waits for it.
const QUIET_WINDOW: Duration = Duration::from_millis(3);
/// Messages the keeper reads in one go after waking, before it looks at owner pids again.
const DRAIN_MAX: usize = 256;
/// The daemon's send buffer on the keeper link: room for the quiet batches of a busy burst
/// while the keeper sleeps (a full buffer only makes `sendmsg` wait for the keeper).
const SEND_BUFFER: usize = 1 << 20;
/// Largest message either side sends or receives (version 1 keepers accept no more).
const MAX_MSG: usize = 256 * 1024;
/// A batch is split before its records reach this size, leaving room for the envelope.
const BATCH_BYTES: usize = 192 * 1024;
/// Descriptors per message: the kernel's SCM_MAX_FD. (Version 1 messages carry 1-2.)
const MAX_FDS: usize = 253;
/// Lease ids per drop_batch message (~45 bytes each).
const DROP_CHUNK: usize = 2048;
/// A keeper that does not answer within this time is considered gone.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// An owner pid the keeper watches, with its start time to recognise pid reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watch {
    pub pid: u32,
    #[serde(default)]
    pub start: Option<u64>,
}

/// A message to the keeper, as the daemon writes it (`op` tags the kind; the keeper reads
/// it through the flat [`Incoming`] so that no intermediate tree is built).
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum ToKeeper<'a> {
    Hello {
        version: u32,
    },
    /// Version 1: hold (or replace) lease `id`; the message carries its descriptors.
    Hold {
        id: [u64; 2],
        pids: &'a [Watch],
        meta: serde_json::Value,
    },
    Drop {
        id: [u64; 2],
    },
    /// Version 2: hold (or replace) every lease in `entries`; the message carries their
    /// descriptors in order, `fds` of them per entry. One acknowledgement for all, none when
    /// `quiet` (version 3).
    HoldBatch {
        entries: Vec<BatchEntry<'a>>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        quiet: bool,
    },
    /// Version 2: drop every lease in `ids`; one acknowledgement, none when `quiet`.
    DropBatch {
        ids: &'a [[u64; 2]],
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        quiet: bool,
    },
    /// Drop every lease (the daemon re-sends what it holds).
    Reset,
    /// Send every lease back (descriptors included), then `End`.
    Dump,
    /// The daemon stops: exit if nothing is held.
    Quit,
}

/// One lease of a `hold_batch`: `meta` is the lease record as JSON text (kept verbatim).
#[derive(Debug, Serialize)]
struct BatchEntry<'a> {
    id: [u64; 2],
    pids: &'a [Watch],
    meta: &'a str,
    fds: u8,
}

/// What the keeper reads: every field of every message kind, flat (same wire format as the
/// tagged `ToKeeper`, decoded without serde's buffering of internally tagged enums).
#[derive(Debug, Default, Deserialize)]
struct Incoming {
    op: String,
    #[serde(default)]
    id: Option<[u64; 2]>,
    #[serde(default)]
    pids: Vec<Watch>,
    #[serde(default)]
    meta: Option<serde_json::Value>,
    #[serde(default)]
    entries: Vec<IncomingEntry>,
    #[serde(default)]
    ids: Vec<[u64; 2]>,
    /// Version 3: answer only by hanging up on failure.
    #[serde(default)]
    quiet: bool,
}

#[derive(Debug, Deserialize)]
struct IncomingEntry {
    id: [u64; 2],
    #[serde(default)]
    pids: Vec<Watch>,
    meta: String,
    fds: u8,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Ack {
    #[serde(default)]
    ok: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    pid: u32,
    #[serde(default)]
    held: usize,
    #[serde(default)]
    version: u32,
    /// Dump: one lease per message, `end` on the last one.
    #[serde(default)]
    entry: Option<DumpEntry>,
    #[serde(default)]
    end: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct DumpEntry {
    id: [u64; 2],
    pids: Vec<Watch>,
    meta: serde_json::Value,
}

/// A lease handed back by the keeper.
#[derive(Debug)]
pub struct Entry {
    pub key: LeaseKey,
    pub meta: serde_json::Value,
    pub fds: Vec<OwnedFd>,
}

/// One lease to hand to the keeper; `meta` is its record as JSON text.
pub struct Hold<'a> {
    pub key: LeaseKey,
    pub pids: Vec<Watch>,
    pub meta: String,
    pub fds: Vec<BorrowedFd<'a>>,
}

/// `<dir>/<stem>-keeper.sock` for the main socket `<dir>/<stem>.sock`: the default main socket
/// gives `lockwardend-keeper.sock`, and two daemons with different sockets get two keepers.
pub fn path_for(main_socket: &Path) -> PathBuf {
    let name = main_socket
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "lockwardend.sock".into());
    let stem = name.strip_suffix(".sock").unwrap_or(&name);
    main_socket.with_file_name(format!("{stem}-keeper.sock"))
}

#[cfg(test)]
mod tests {
    use super::process::*;
    use crate::daemon::keptmeta::Tails;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType};
    use std::collections::{BTreeMap, HashMap};
    use std::fs;
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};
    use std::path::PathBuf;

    use super::*;
    use nix::sys::socket::socketpair;

    /// A keeper in this process serving `conn` (no fork, no listener in use).
    fn test_keeper(conn: OwnedFd) -> KeeperProc {
        KeeperProc {
            listener: seqpacket().unwrap(),
            path: PathBuf::from("/nonexistent/lockwarden-test-keeper.sock"),
            ident: (0, 0),
            conn: Some(conn),
            held: BTreeMap::new(),
            watched: HashMap::new(),
            dead: Vec::new(),
            rx: Receiver::new(),
            euid: 0,
            greeted: false,
            closing: Vec::new(),
            closers: HashMap::new(),
            tails: Tails::default(),
            vault: Default::default(),
            parked: false,
        }
    }

    /// A keeper serving one end of a socket pair on a thread (no fork, no listener in use);
    /// returns how many messages it read and how many leases it held at the end.
    fn serve_on_thread(conn: OwnedFd) -> std::thread::JoinHandle<(usize, usize)> {
        std::thread::spawn(move || {
            let mut k = test_keeper(conn);
            let mut messages = 0;
            while k.conn.is_some() {
                k.serve();
                messages += 1;
            }
            // The last read was the end of file.
            (messages - 1, k.held.len())
        })
    }

    fn link(version: u32) -> (Keeper, std::thread::JoinHandle<(usize, usize)>) {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let server = serve_on_thread(b);
        let k = Keeper {
            path: PathBuf::new(),
            conn: Some(a),
            pid: 0,
            version,
            rx: Receiver::new(),
            broke: false,
            started_new: false,
            recording: None,
        };
        (k, server)
    }

    fn held_now(k: &mut Keeper) -> usize {
        k.call(&ToKeeper::Hello {
            version: KEEPER_PROTOCOL,
        })
        .unwrap()
        .held
    }

    fn holds<'a>(files: &'a [fs::File], dir: &'a fs::File) -> Vec<Hold<'a>> {
        let pid = std::process::id();
        files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let mut fds = vec![f.as_fd()];
                if i % 2 == 1 {
                    fds.push(dir.as_fd());
                }
                Hold {
                    key: LeaseKey {
                        dev: 1,
                        ino: i as u64,
                    },
                    pids: vec![Watch { pid, start: None }],
                    meta: format!("{{\"name\":\"disk{i}\",\"text\":\"a \\\"quoted\\\" name\"}}"),
                    fds,
                }
            })
            .collect()
    }

    #[test]
    fn a_request_is_one_batch_message_chunked_past_scm_max_fd() {
        let files: Vec<fs::File> = (0..300).map(|_| tempfile::tempfile().unwrap()).collect();
        let dir = fs::File::open("/").unwrap();
        let (mut k, server) = link(KEEPER_PROTOCOL);
        // 300 leases with 450 descriptors: two messages of at most 253 descriptors.
        k.hold(&holds(&files, &dir)).unwrap();
        assert_eq!(held_now(&mut k), 300);
        let keys: Vec<LeaseKey> = (0..300).map(|i| LeaseKey { dev: 1, ino: i }).collect();
        k.release(&keys).unwrap();
        assert_eq!(held_now(&mut k), 0);
        // The records come back verbatim.
        k.hold(&holds(&files[..2], &dir)).unwrap();
        let entries = k.dump().unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].fds.len(), 2);
        assert_eq!(entries[1].meta["text"], "a \"quoted\" name");
        drop(k);
        let (messages, held) = server.join().unwrap();
        // hold (2 chunks) + hello + drop_batch + hello + hold + dump
        assert_eq!(messages, 7);
        assert_eq!(held, 2);
    }

    #[test]
    fn an_old_keeper_gets_one_message_per_lease() {
        let files: Vec<fs::File> = (0..3).map(|_| tempfile::tempfile().unwrap()).collect();
        let dir = fs::File::open("/").unwrap();
        // A daemon that found a version 1 keeper (after a live upgrade) only sends what
        // version 1 understands: hold and drop, one lease each.
        let (mut k, server) = link(1);
        k.hold(&holds(&files, &dir)).unwrap();
        assert_eq!(held_now(&mut k), 3);
        k.release(&[LeaseKey { dev: 1, ino: 0 }, LeaseKey { dev: 1, ino: 2 }])
            .unwrap();
        assert_eq!(held_now(&mut k), 1);
        drop(k);
        let (messages, held) = server.join().unwrap();
        assert_eq!(messages, 3 + 1 + 2 + 1);
        assert_eq!(held, 1);
    }

    #[test]
    fn a_version_2_keeper_acknowledges_every_batch() {
        let files: Vec<fs::File> = (0..3).map(|_| tempfile::tempfile().unwrap()).collect();
        let dir = fs::File::open("/").unwrap();
        let (mut k, server) = link(2);
        k.hold(&holds(&files, &dir)).unwrap();
        k.release(&[LeaseKey { dev: 1, ino: 1 }]).unwrap();
        // Both answers were read: the next call gets its own answer, not a stale one.
        assert_eq!(held_now(&mut k), 2);
        drop(k);
        assert_eq!(server.join().unwrap(), (3, 2));
    }

    #[test]
    fn a_quiet_batch_is_not_answered_and_a_failed_one_hangs_up() {
        let files: Vec<fs::File> = (0..2).map(|_| tempfile::tempfile().unwrap()).collect();
        let dir = fs::File::open("/").unwrap();
        let (mut k, server) = link(KEEPER_PROTOCOL);
        k.hold(&holds(&files, &dir)).unwrap();
        k.release(&[LeaseKey { dev: 1, ino: 0 }]).unwrap();
        // Nothing is waiting in our socket: the quiet batches were not answered.
        let fd = k.raw_fd().unwrap();
        assert_eq!(
            crate::daemon::sys::poll_one(fd, libc::POLLIN, 0).unwrap(),
            0
        );
        assert_eq!(held_now(&mut k), 1);
        // A quiet batch that names more descriptors than it carries: the keeper hangs up.
        let bad = ToKeeper::HoldBatch {
            entries: vec![BatchEntry {
                id: [1, 9],
                pids: &[],
                meta: "{}",
                fds: 2,
            }],
            quiet: true,
        };
        k.send(&bad, &[files[0].as_raw_fd()]).unwrap();
        let end = k.recv().unwrap_err();
        assert!(end.contains("closed the connection"), "{end}");
        let (messages, held) = server.join().unwrap();
        // hold + drop + hello + the bad batch, minus the end of file `serve_on_thread`
        // expects last (the keeper hung up instead).
        assert_eq!((messages, held), (3, 1));
    }

    /// A keeper in this process and the daemon's end of its link.
    fn linked_keeper() -> (OwnedFd, KeeperProc) {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        (a, test_keeper(b))
    }

    #[test]
    fn a_dead_owner_frees_its_leases_and_watches_are_counted() {
        let files: Vec<fs::File> = (0..2).map(|_| tempfile::tempfile().unwrap()).collect();
        let (a, mut k) = linked_keeper();
        drop(a);
        let me = Watch {
            pid: std::process::id(),
            start: None,
        };
        let fd = |i: usize| files[i].try_clone().unwrap().into();
        k.put([1, 1], vec![me], "{}".into(), fd(0), None);
        k.put([1, 2], vec![me], "{}".into(), fd(1), None);
        assert_eq!(k.watched[&me.pid].refs, 2);
        // Replacing a lease does not count its owner twice.
        k.put([1, 2], vec![me], "{}".into(), fd(1), None);
        assert_eq!(k.watched[&me.pid].refs, 2);
        k.take(&[1, 1]);
        assert_eq!(k.watched[&me.pid].refs, 1);
        k.take(&[1, 2]);
        // Still watched, idle: the next lease of this owner needs no new pidfd.
        assert_eq!(k.watched[&me.pid].refs, 0);
        k.put([1, 4], vec![me], "{}".into(), fd(0), None);
        assert_eq!(k.watched[&me.pid].refs, 1);
        k.take(&[1, 4]);
        // A reused pid (another start time) is watched afresh, not counted on the old entry.
        let reused = Watch {
            pid: me.pid,
            start: k.watched[&me.pid].start.map(|s| s + 1),
        };
        k.watch(reused);
        assert!(k.dead.contains(&me.pid), "no such process: noted as gone");
        assert!(!k.watched.contains_key(&me.pid));
        k.dead.clear();
        // An owner that is gone: its lease is dropped after the message.
        let gone = Watch {
            pid: u32::MAX - 1,
            start: None,
        };
        k.put([1, 3], vec![gone], "{}".into(), fd(0), None);
        assert_eq!(k.dead, vec![gone.pid]);
        k.owner_gone(gone.pid);
        assert!(k.held.is_empty());
    }

    /// While a daemon is connected (it said hello) the keeper holds no pidfd, only each
    /// owner's pid and start time; when the daemon goes away it watches them again, and an
    /// owner that exited meanwhile has its leases dropped then.
    #[test]
    fn a_connected_daemon_parks_the_watches_and_its_loss_resumes_them() {
        let files: Vec<fs::File> = (0..2).map(|_| tempfile::tempfile().unwrap()).collect();
        let (a, mut k) = linked_keeper();
        let spawn = || {
            std::process::Command::new("sleep")
                .arg("100")
                .spawn()
                .unwrap()
        };
        let (mut live, mut dies) = (spawn(), spawn());
        let w = |c: &std::process::Child| Watch {
            pid: c.id(),
            start: None,
        };
        let fd = |i: usize| files[i].try_clone().unwrap().into();
        // What `hello` does.
        k.park();
        k.put([1, 1], vec![w(&live)], "{}".into(), fd(0), None);
        k.put([1, 2], vec![w(&dies)], "{}".into(), fd(1), None);
        assert!(k.dead.is_empty());
        for c in [&live, &dies] {
            let e = &k.watched[&c.id()];
            assert!(e.fd.is_none() && !e.retry && e.refs == 1);
            assert_eq!(e.start, crate::daemon::pidfd::start_time(c.id()));
        }
        // An owner whose last lease goes is forgotten while parked.
        k.put([1, 3], vec![w(&live)], "{}".into(), fd(0), None);
        k.take(&[1, 3]);
        assert_eq!(k.watched[&live.id()].refs, 1);
        // The daemon goes away; one owner exited in the gap.
        dies.kill().unwrap();
        let _ = dies.wait();
        drop(a);
        k.conn = None;
        k.unpark();
        assert!(!k.parked);
        assert!(k.watched[&live.id()].fd.is_some());
        assert!(!k.watched.contains_key(&dies.id()));
        assert!(k.held.contains_key(&[1, 1]) && !k.held.contains_key(&[1, 2]));
        // A daemon says hello again: the pidfd is closed again.
        k.park();
        assert!(k.watched[&live.id()].fd.is_none());
        let _ = live.kill();
        let _ = live.wait();
    }
}
