//! Live upgrade: on SIGHUP or SIGUSR1, exec the binary at lockwardend's path again, keeping
//! every lock, every client connection and all owner state.
//!
//! Why exec in place (like virtlockd): the pid stays, so systemd's MAINPID, the pid file and
//! the keeper link stay valid, and every descriptor simply stays open — listening sockets,
//! client connections (the VMs' lifetime handles among them), lease files, lockspace
//! directories, owner pidfds, the keeper link and the locked pid file. Their close-on-exec flag
//! is cleared, and a versioned JSON document in a memfd (its number in `LOCKWARDEND_STATE_FD`)
//! says what each number is. The loop is single-threaded and re-execs between requests, so no
//! request is half-done; bytes of a partial request and of an unsent response travel in the
//! document. If `execve` fails the old image restores the flags and keeps serving.
//!
//! Compatibility: `version` is the document layout; a binary reads every version up to its
//! own (fields added later have defaults) and refuses newer ones, so a downgrade by re-exec
//! fails loudly at start (the keeper still holds every lease; a restart recovers them).

use super::conn::Conn;
use super::dispatch::Session;
use super::keeper::Keeper;
use super::listen::{Listener, Role};
use super::notify;
use super::owner::{ConnId, OwnerEntry};
use super::pidfd::Proc;
use super::pidfile::PidFile;
use super::record::{LeaseRecord, id_key, key_id};
use super::recover;
use super::state::State;
use super::watchdog::Watchdog;
use crate::protocol::{FailureAction, Owner};
use log::{error, info, warn};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Environment variable naming the state document's descriptor in the new image.
pub const STATE_ENV: &str = "LOCKWARDEND_STATE_FD";
/// Layout version of the document this binary writes (and the newest it reads).
pub const STATE_VERSION: u32 = 1;
/// Variables that must not reach the new image: systemd's activation variables would make it
/// adopt descriptor numbers that now mean something else.
const DROP_ENV: [&str; 4] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", STATE_ENV];

#[derive(Debug, Serialize, Deserialize)]
pub struct Doc {
    pub version: u32,
    /// The pid that wrote it: a document is only used by the same process (like virtlockd's
    /// `magic`), never by an unrelated start that inherited the variable.
    pub pid: u32,
    #[serde(default)]
    pub generation: u64,
    #[serde(default)]
    pub started: u64,
    #[serde(default)]
    pub pid_file: Option<FdPath>,
    #[serde(default)]
    pub keeper: Option<KeeperDoc>,
    #[serde(default)]
    pub listeners: Vec<ListenerDoc>,
    #[serde(default)]
    pub next_conn_id: ConnId,
    #[serde(default)]
    pub conns: Vec<ConnDoc>,
    #[serde(default)]
    pub owners: Vec<OwnerDoc>,
    #[serde(default)]
    pub leases: Vec<LeaseDoc>,
    #[serde(default)]
    pub kills: Vec<super::kill::KillDoc>,
    /// The open `watchdog_device` (watchdog.rs), fed right before the exec.
    #[serde(default)]
    pub watchdog: Option<super::watchdog::WatchdogDoc>,
    /// What `lockwarden metrics` counts (issue 18): a reload keeps counting.
    #[serde(default)]
    pub metrics: Option<crate::metrics::Counters>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FdPath {
    pub fd: RawFd,
    pub path: PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct KeeperDoc {
    pub fd: Option<RawFd>,
    pub path: PathBuf,
    #[serde(default)]
    pub pid: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ListenerDoc {
    pub fd: RawFd,
    /// "main" or "admin".
    pub role: String,
    pub path: PathBuf,
    #[serde(default)]
    pub bound: Option<(u64, u64)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ConnDoc {
    pub fd: RawFd,
    pub id: ConnId,
    #[serde(default)]
    pub admin: bool,
    #[serde(default)]
    pub peer_pid: i32,
    #[serde(default)]
    pub restricted: bool,
    #[serde(default)]
    pub handle_of: Option<u32>,
    /// Bytes received but not yet processed (a partial request).
    #[serde(default)]
    pub input: Vec<u8>,
    /// Bytes of responses not yet sent.
    #[serde(default)]
    pub output: Vec<u8>,
    #[serde(default)]
    pub closing: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct OwnerDoc {
    pub owner: Owner,
    #[serde(default)]
    pub action: FailureAction,
    #[serde(default)]
    pub handles: Vec<ConnId>,
    #[serde(default)]
    pub pidfd: Option<RawFd>,
    #[serde(default)]
    pub start: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LeaseDoc {
    pub id: [u64; 2],
    pub fd: RawFd,
    #[serde(default)]
    pub dir_fd: Option<RawFd>,
    pub record: LeaseRecord,
}

/// The parts of the event loop (server.rs) that travel across a live re-exec: what [`reexec`]
/// writes down and [`restore`] fills in. The loop lends them; this module knows nothing else
/// of it.
pub struct Parts<'a> {
    pub state: &'a mut State,
    pub listeners: &'a mut Vec<Listener>,
    pub conns: &'a mut HashMap<ConnId, Conn>,
    pub next_id: &'a mut ConnId,
    pub pid_file: &'a mut Option<PidFile>,
    pub generation: &'a mut u64,
    pub exe: &'a Path,
}

/// Write the server down: the document and every descriptor it names.
fn export(server: &Parts<'_>, generation: u64) -> (Doc, Vec<RawFd>) {
    let mut keep = Vec::new();
    let mut fd = |raw: RawFd| {
        keep.push(raw);
        raw
    };
    let state = &*server.state;
    let now = Instant::now();
    let pid_file = server.pid_file.as_ref().map(|p| FdPath {
        fd: fd(p.raw_fd()),
        path: p.path().to_path_buf(),
    });
    let keeper = Some(KeeperDoc {
        fd: state.keeper.raw_fd().map(&mut fd),
        path: state.keeper.path().to_path_buf(),
        pid: state.keeper.pid,
    });
    let listeners = server
        .listeners
        .iter()
        .map(|l| ListenerDoc {
            fd: fd(l.socket.as_raw_fd()),
            role: match l.role {
                Role::Main => "main".into(),
                Role::Admin => "admin".into(),
            },
            path: l.path.clone(),
            bound: l.bound,
        })
        .collect();
    // Refused connections (a deadline) are simply closed by the exec.
    let conns = server
        .conns
        .values()
        .filter(|c| c.refusal.is_none() && c.deadline.is_none())
        .map(|c| {
            let (input, output) = c.pending();
            ConnDoc {
                fd: fd(c.stream.as_raw_fd()),
                id: c.session.id,
                admin: c.session.admin,
                peer_pid: c.session.peer_pid,
                restricted: c.session.restricted,
                handle_of: c.session.handle_of,
                input: input.to_vec(),
                output: output.to_vec(),
                closing: c.closing(),
            }
        })
        .collect();
    let owners = state
        .owners
        .iter()
        .map(|(_, e)| OwnerDoc {
            owner: e.owner.clone(),
            action: e.action,
            handles: e.handles.clone(),
            pidfd: e.proc.poll_fd().map(&mut fd),
            start: e.proc.start,
        })
        .collect();
    let leases = state
        .leases
        .iter()
        .map(|(k, l)| LeaseDoc {
            id: key_id(*k),
            fd: fd(l.fd.as_raw_fd()),
            dir_fd: l.dir.as_ref().map(|d| fd(d.fd.as_raw_fd())),
            record: LeaseRecord::of(&state.owners, l),
        })
        .collect();
    let kills = state.kills.save(now);
    let watchdog = state.watchdog.as_ref().map(|w| {
        fd(w.raw_fd());
        w.save()
    });
    let doc = Doc {
        version: STATE_VERSION,
        pid: std::process::id(),
        generation,
        started: state.started,
        pid_file,
        keeper,
        listeners,
        next_conn_id: *server.next_id,
        conns,
        owners,
        leases,
        kills,
        watchdog,
        metrics: Some(state.metrics.clone()),
    };
    (doc, keep)
}

fn set_cloexec(fds: &[RawFd], on: bool) -> Result<(), String> {
    for raw in fds {
        super::sys::set_cloexec(*raw, on)
            .map_err(|e| format!("cannot change close-on-exec of fd {raw}: {e}"))?;
    }
    Ok(())
}

fn cstring(bytes: &[u8]) -> Result<CString, String> {
    CString::new(bytes).map_err(|_| "an argument or variable contains a NUL byte".to_string())
}

/// Re-exec now. Returns only when the exec failed (the server then keeps serving).
pub fn reexec(server: Parts<'_>) {
    let generation = *server.generation + 1;
    let exe = server.exe.to_path_buf();
    info!(
        "live re-exec #{generation} of {:?}: {} lease(s), {} owner(s), {} connection(s)",
        exe,
        server.state.leases.len(),
        server.state.owners.len(),
        server.conns.len()
    );
    // Fed right before the exec (when allowed): the new image feeds it again as soon as it
    // has restored the state, so the gap is the exec and the restore (docs/storage.md).
    super::keepalive::feed_now(server.state);
    let (doc, keep) = export(&server, generation);
    let err = match try_exec(&exe, &doc, &keep) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    if let Err(e) = set_cloexec(&keep, true) {
        warn!("{e}");
    }
    error!(
        "live re-exec of {exe:?} failed: {err}; this lockwardend (pid {}) keeps serving with every \
         lock and connection; fix the binary and send SIGHUP again",
        std::process::id()
    );
    if let Err(e) = notify::notify("READY=1") {
        warn!("cannot notify systemd (NOTIFY_SOCKET): {e}");
    }
}

fn try_exec(
    exe: &std::path::Path,
    doc: &Doc,
    keep: &[RawFd],
) -> Result<std::convert::Infallible, String> {
    let text = serde_json::to_vec(doc).map_err(|e| format!("cannot write the state: {e}"))?;
    let memfd =
        nix::sys::memfd::memfd_create(c"lockwardend-state", nix::sys::memfd::MFdFlags::empty())
            .map_err(|e| format!("memfd_create failed: {}", e.desc()))?;
    let mut file = File::from(memfd);
    file.write_all(&text)
        .and_then(|()| file.seek(SeekFrom::Start(0)).map(drop))
        .map_err(|e| format!("cannot write the state document: {e}"))?;
    let state_fd = file.as_raw_fd();
    let argv: Vec<CString> = std::env::args_os()
        .map(|a| cstring(a.as_bytes()))
        .collect::<Result<_, _>>()?;
    let mut envp: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !DROP_ENV.iter().any(|d| k.as_bytes() == d.as_bytes()))
        .map(|(k, v)| {
            let mut b = k.as_bytes().to_vec();
            b.push(b'=');
            b.extend_from_slice(v.as_bytes());
            cstring(&b)
        })
        .collect::<Result<_, _>>()?;
    envp.push(cstring(format!("{STATE_ENV}={state_fd}").as_bytes())?);
    let path = cstring(exe.as_os_str().as_bytes())?;
    set_cloexec(keep, false)?;
    if let Err(e) = notify::notify("RELOADING=1") {
        warn!("cannot notify systemd (NOTIFY_SOCKET): {e}");
    }
    let e = match nix::unistd::execve(&path, &argv, &envp) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    drop(file);
    Err(format!("execve: {}", e.desc()))
}

/// The state document handed over by the previous image of this process, if any.
pub fn take() -> Result<Option<Doc>, String> {
    let Some(v) = std::env::var_os(STATE_ENV) else {
        return Ok(None);
    };
    let Some(fd) = v.to_str().and_then(|s| s.parse::<RawFd>().ok()) else {
        return Err(format!("{STATE_ENV}={v:?} is not a descriptor number"));
    };
    // SAFETY: the previous image left this memfd open for us and nothing else uses it.
    let mut file = match unsafe { super::sys::adopt(fd, STATE_ENV) } {
        Ok(fd) => File::from(fd),
        Err(e) => {
            warn!("{e}; starting fresh");
            return Ok(None);
        }
    };
    let mut text = Vec::new();
    file.read_to_end(&mut text)
        .map_err(|e| format!("cannot read the re-exec state (fd {fd}): {e}"))?;
    drop(file);
    let probe: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| format!("the re-exec state is not JSON: {e}"))?;
    let version = probe.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    let pid = probe.get("pid").and_then(|v| v.as_u64()).unwrap_or(0);
    if pid != u64::from(std::process::id()) {
        warn!("ignoring a re-exec state written by pid {pid}, not by this process");
        return Ok(None);
    }
    if version > u64::from(STATE_VERSION) {
        return Err(format!(
            "the re-exec state has layout version {version}, newer than this binary's \
             {STATE_VERSION} (a downgrade by reload?); every lease stays with the keeper: restart \
             lockwardend to take them back"
        ));
    }
    serde_json::from_value(probe)
        .map(Some)
        .map_err(|e| format!("cannot read the re-exec state: {e}"))
}

/// Every descriptor the document names, taken over once (each number at most once) before
/// anything uses one.
struct Adopted(HashMap<RawFd, OwnedFd>);

impl Adopted {
    fn all(doc: &Doc) -> Result<Adopted, String> {
        let mut numbers: Vec<RawFd> = Vec::new();
        numbers.extend(doc.watchdog.as_ref().map(|w| w.fd));
        numbers.extend(doc.pid_file.as_ref().map(|p| p.fd));
        numbers.extend(doc.keeper.as_ref().and_then(|k| k.fd));
        numbers.extend(doc.listeners.iter().map(|l| l.fd));
        numbers.extend(doc.owners.iter().filter_map(|o| o.pidfd));
        for l in &doc.leases {
            numbers.push(l.fd);
            numbers.extend(l.dir_fd);
        }
        numbers.extend(doc.conns.iter().map(|c| c.fd));
        let mut map = HashMap::with_capacity(numbers.len());
        for n in numbers {
            if map.contains_key(&n) {
                return Err(format!("the re-exec state names descriptor {n} twice"));
            }
            // SAFETY: the numbers come from the document our previous image wrote for exactly
            // this purpose (it left each open, close-on-exec cleared); each is taken over once
            // (checked just above), here, before anything else in this process runs.
            let fd = unsafe { super::sys::adopt(n, "the re-exec state") }?;
            map.insert(n, fd);
        }
        Ok(Adopted(map))
    }

    fn take(&mut self, n: RawFd) -> Result<OwnedFd, String> {
        self.0
            .remove(&n)
            .ok_or_else(|| format!("the re-exec state names descriptor {n} twice"))
    }
}

/// Rebuild the server the previous image wrote down. `server` is built from the new settings
/// with no listeners, connections or state; the document fills it. `heartbeat` is the new
/// `heartbeat_interval_ms` (the watchdog's keep-alive interval follows it).
pub fn restore(doc: Doc, server: Parts<'_>, heartbeat: Option<Duration>) -> Result<(), String> {
    let now = Instant::now();
    let mut fds = Adopted::all(&doc)?;
    if let Some(w) = doc.watchdog {
        let fd = fds.take(w.fd)?;
        let mut wd = Watchdog::load(w, fd, heartbeat);
        // Fed at once: the rule is checked once the tables are back, below.
        wd.feed();
        server.state.watchdog = Some(wd);
    }
    if let Some(p) = doc.pid_file {
        *server.pid_file = Some(PidFile::adopt(p.path, File::from(fds.take(p.fd)?)));
    }
    if let Some(k) = doc.keeper {
        if let Some(fd) = k.fd {
            server.state.keeper = Keeper::restored(k.path, fds.take(fd)?, k.pid);
        }
    }
    for l in doc.listeners {
        let socket = UnixListener::from(fds.take(l.fd)?);
        let role = if l.role == "admin" {
            Role::Admin
        } else {
            Role::Main
        };
        server.listeners.push(Listener {
            socket,
            role,
            path: l.path,
            bound: l.bound,
        });
    }
    let state = &mut *server.state;
    state.started = doc.started;
    if let Some(m) = doc.metrics {
        state.metrics = m;
    }
    state.metrics.reexecs = doc.generation;
    for o in doc.owners {
        let pid = o.owner.pid;
        let fd = o.pidfd.map(|fd| fds.take(fd)).transpose()?;
        state.owners.insert(OwnerEntry {
            owner: o.owner,
            action: o.action,
            leases: BTreeSet::new(),
            handles: o.handles,
            proc: Proc::from_parts(pid, fd, o.start),
        });
    }
    let mut dead = BTreeMap::new();
    for l in doc.leases {
        let fd = fds.take(l.fd)?;
        let dir = l.dir_fd.map(|d| fds.take(d)).transpose()?;
        recover::insert_lease(state, id_key(l.id), l.record, fd, dir, &mut dead);
    }
    state.kills.load(doc.kills, now);
    for c in doc.conns {
        let stream = UnixStream::from(fds.take(c.fd)?);
        let session = Session {
            id: c.id,
            admin: c.admin,
            peer_pid: c.peer_pid,
            restricted: c.restricted,
            handle_of: c.handle_of,
        };
        let conn = Conn::restored(stream, session, c.input, c.output, c.closing);
        server.conns.insert(c.id, conn);
    }
    *server.next_id = doc.next_conn_id.max(1);
    *server.generation = doc.generation;
    recover::release_dead(server.state, dead);
    server.state.publish_all_holders();
    let generation = server.generation.to_string();
    super::logging::event(
        log::Level::Info,
        super::logging::Event::Reexec,
        &[("REEXEC_GENERATION", &generation)],
        format_args!(
            "live re-exec #{} complete: restored {} lease(s), {} owner(s), {} connection(s)",
            *server.generation,
            server.state.leases.len(),
            server.state.owners.len(),
            server.conns.len()
        ),
    );
    Ok(())
}
