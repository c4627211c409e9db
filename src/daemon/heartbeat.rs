//! Storage liveness per mount (docs/storage.md, "Partitions"): a heartbeat that must reach the
//! storage server, every `heartbeat_interval_ms`, for every mount on which this host holds
//! leases; fence.rs stops the VMs of a mount not confirmed for `fence_after_ms`.
//!
//! Why: an NFSv4 server keeps a client's locks only while the client renews its lease (90 s
//! on Linux servers). A host cut off from its storage for longer loses its locks on the server,
//! another host takes them and starts the VM, and the cut-off host's QEMU — still running, its
//! writes queued in the kernel — writes to a disk another VM now owns once the network heals.
//! The lost-lock probe (lost.rs) cannot help: a probe that hangs tells nothing until it returns.
//!
//! The beat: `<dir>/.lockwarden/heartbeat@<host>` next to one of the mount's leased files
//! (the same directory rules as holder side files, docs/holders.md) gets a fixed-size line
//! with a new sequence number written at offset 0 and is then `fsync`ed. The new content makes
//! the page dirty, and `fsync` on NFS returns only when the server acknowledged the WRITE and
//! the COMMIT (an NFSv4 WRITE also renews the client's lease): the client's page or attribute
//! cache cannot answer it. Where no such file can be kept (the directory is unsafe, read-only,
//! squashed), the beat tests the lock of one of the mount's leases on its descriptor
//! (`F_OFD_GETLK`): our own lock does not conflict with its own open file description, so
//! nothing local answers, and the NFS client asks the server (NLM TEST, NFSv4 LOCKT) unless
//! the mount uses `local_lock`. A test changes nothing on the server.
//!
//! Timing: the beats of a mount run on a storage thread of their own (pool key
//! "<mount> (heartbeat)", one thread), so a mount that is merely busy (its 32 threads waiting
//! on slow acquires) does not delay them; one beat is in flight per mount at a time. A beat
//! that succeeds confirms the mount as of the moment it was *sent* (`CLOCK_BOOTTIME`, a
//! monotonic clock that also runs while the host is suspended, as the server's does): the server
//! saw it after that. The event loop's timer compares that time with `fence_after_ms`; nothing
//! waits for a hung beat to return.

use super::fence;
use super::lease::LeaseKey;
use super::state::{JobFor, State};
use super::storage::{JobId, Work};
use crate::protocol::LeaseMode;
use log::{error, info, warn};
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of a heartbeat record (fixed, so every beat rewrites the same block).
const BEAT_LEN: usize = 160;

/// One beat, run on a storage thread (`Work::Heartbeat`).
#[derive(Debug)]
pub struct Beat {
    pub mount: PathBuf,
    /// The heartbeat file, once opened by an earlier beat (moved to the job and back, so it
    /// is only ever closed on a storage thread: a close on NFS can block).
    pub file: Option<OwnedFd>,
    /// A lease on this mount: where the heartbeat file goes (next to it), and the lock the
    /// fallback beat tests.
    pub lease: Arc<OwnedFd>,
    pub mode: LeaseMode,
    pub host: String,
    pub seq: u64,
}

/// What a beat found.
#[derive(Debug)]
pub struct Beaten {
    pub mount: PathBuf,
    /// The heartbeat file to keep for the next beats (None: none could be kept).
    pub file: Option<OwnedFd>,
    /// Why the heartbeat file could not be used (the lock was re-requested instead).
    pub no_file: Option<String>,
    /// Ok: the server answered.
    pub result: Result<(), String>,
}

/// Run one beat (on a storage thread).
pub fn beat(b: Beat) -> Beaten {
    let Beat {
        mount,
        file,
        lease,
        mode,
        host,
        seq,
    } = b;
    let opened = match file {
        Some(f) => Ok(f),
        None => open_file(&lease, &host),
    };
    let (file, no_file) = match opened {
        Ok(f) => match write(&f, &host, seq) {
            Ok(()) => {
                return Beaten {
                    mount,
                    file: Some(f),
                    no_file: None,
                    result: Ok(()),
                };
            }
            Err(e) => (None, Some(e)),
        },
        Err(e) => (None, Some(e)),
    };
    // A lock test goes to the server too (NLM TEST, NFSv4 LOCKT: the client's own locks do
    // not conflict with the lease's own descriptor, so nothing local answers it), and changes
    // nothing: unlike a lock request it cannot take a lock back on a lease being released.
    let mut fl = libc::flock {
        l_type: match mode {
            LeaseMode::Exclusive => libc::F_WRLCK,
            LeaseMode::Shared => libc::F_RDLCK,
        } as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    };
    let result = match nix::fcntl::fcntl(lease.as_fd(), nix::fcntl::FcntlArg::F_OFD_GETLK(&mut fl))
    {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("testing a lease's lock failed: {} ({e})", e.desc())),
    };
    Beaten {
        mount,
        file,
        no_file,
        result,
    }
}

/// Open (create) `heartbeat@<host>` in the `.lockwarden` directory next to the file `lease`.
fn open_file(lease: &OwnedFd, host: &str) -> Result<OwnedFd, String> {
    let side = super::holder::side_files(lease.as_fd())?
        .ok_or_else(|| "the leased file is not a regular file with a name".to_string())?;
    let dir = super::holder::open_publish_dir(&side.dir)?;
    let name = format!("heartbeat@{}", super::holder::host_label(host));
    let (fd, st, _) = crate::untrusted::open_regular_at(
        Some(dir.as_fd()),
        &name,
        crate::untrusted::Access::ReadWrite,
        Some(0o644),
    )
    .map_err(|e| format!("cannot open {}/{name}: {}", side.dir, e.describe()))?;
    crate::untrusted::check_writable(&st, BEAT_LEN as u64)
        .map_err(|e| format!("{}/{name} is not written: {e}", side.dir))?;
    Ok(fd)
}

/// Write beat `seq` at offset 0 and fsync (the write rule is checked again right before).
fn write(f: &OwnedFd, host: &str, seq: u64) -> Result<(), String> {
    let st = nix::sys::stat::fstat(f.as_fd())
        .map_err(|e| format!("cannot examine the heartbeat file: {}", e.desc()))?;
    crate::untrusted::check_writable(&st, BEAT_LEN as u64)
        .map_err(|e| format!("the heartbeat file is not written: {e}"))?;
    let wall = crate::text::now_secs();
    let mut line = format!(
        "lockwarden heartbeat host={} boot={} pid={} seq={seq} time={wall}",
        super::holder::host_label(host),
        super::holder::boot_id(),
        std::process::id()
    );
    line.truncate(BEAT_LEN - 1);
    while line.len() < BEAT_LEN - 1 {
        line.push(' ');
    }
    line.push('\n');
    let n = nix::sys::uio::pwrite(f.as_fd(), line.as_bytes(), 0)
        .map_err(|e| format!("writing the heartbeat file failed: {} ({e})", e.desc()))?;
    if n != line.len() {
        return Err(format!(
            "writing the heartbeat file stopped after {n} of {} bytes",
            line.len()
        ));
    }
    nix::unistd::fsync(f.as_fd())
        .map_err(|e| format!("fsync of the heartbeat file failed: {} ({e})", e.desc()))
}

/// Heartbeat state of every mount with leases.
#[derive(Debug, Default)]
pub struct Heartbeats {
    /// `heartbeat_interval_ms` (None: no heartbeats, no fencing).
    pub interval: Option<Duration>,
    /// `fence_after_ms`.
    pub fence_after: Duration,
    mounts: HashMap<PathBuf, Mount>,
    /// Leases fenced (their VMs stopped) and what became of them (fence.rs).
    pub fenced: HashMap<LeaseKey, fence::Fenced>,
    seq: u64,
    /// When the lease table is next scanned for mounts.
    next_scan: Option<Instant>,
    /// The previous scan: a mount first seen now got its first lease after it.
    last_scan: Option<Duration>,
}

/// Time since boot, suspend included (`CLOCK_BOOTTIME`): monotonic like `Instant`, but it keeps
/// running while the host is suspended or frozen, as the storage server's lease clock does, so
/// a host that wakes up after the server's lease ran out fences at once instead of
/// `fence_after_ms` later. Falls back to `CLOCK_MONOTONIC`.
pub fn boot_now() -> Duration {
    let read = |clock: libc::clockid_t| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
        let r = unsafe { libc::clock_gettime(clock, &mut ts) };
        (r == 0).then(|| {
            Duration::new(
                u64::try_from(ts.tv_sec).unwrap_or(0),
                u32::try_from(ts.tv_nsec).unwrap_or(0),
            )
        })
    };
    read(libc::CLOCK_BOOTTIME)
        .or_else(|| read(libc::CLOCK_MONOTONIC))
        .unwrap_or_default()
}

#[derive(Debug)]
struct Mount {
    /// Send time (`boot_now`) of the last beat the server answered (or when tracking began).
    confirmed: Duration,
    in_flight: Option<(JobId, Duration)>,
    next_beat: Instant,
    file: Option<OwnedFd>,
    /// The VMs of this mount were fenced for the current outage.
    fenced: bool,
    /// The outage was reported (warning at half of fence_after).
    warned: bool,
    /// The last beat error logged (each distinct one once per outage).
    error: Option<String>,
    /// Why no heartbeat file is kept (logged once).
    no_file: Option<String>,
    /// A lease of the mount (for the beat's file place and the fallback lock test).
    lease: LeaseKey,
}

impl Heartbeats {
    /// Apply the settings; tracking starts at `now`.
    pub fn configure(&mut self, interval: Option<Duration>, fence_after: Duration, now: Instant) {
        self.interval = interval;
        self.fence_after = fence_after;
        self.next_scan = interval.map(|_| now);
        self.last_scan = Some(boot_now());
        if let Some(i) = interval {
            if fence_after <= i * 2 {
                warn!(
                    "fence_after_ms ({} ms) is not more than twice heartbeat_interval_ms ({} ms): \
                     a single slow heartbeat can stop VMs; set fence_after_ms to several \
                     intervals (docs/storage.md, \"Partitions\")",
                    fence_after.as_millis(),
                    i.as_millis()
                );
            }
        }
    }

    /// The next time `tick` has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.interval?;
        let fence_after = self.fence_after;
        let (now, boot) = (Instant::now(), boot_now());
        let at = |t: Duration| now + t.saturating_sub(boot);
        self.mounts
            .values()
            .flat_map(|m| {
                let beat = m.in_flight.is_none().then_some(m.next_beat);
                let fence = (!m.fenced).then(|| at(m.confirmed + fence_after));
                let warn = (!m.warned).then(|| at(m.confirmed + fence_after / 2));
                [beat, fence, warn]
            })
            .flatten()
            .chain(self.next_scan)
            .min()
    }

    /// Every mount with leases: time since its storage last confirmed a heartbeat, and whether
    /// its VMs are fenced (metrics).
    pub fn mount_health(&self) -> Vec<(PathBuf, Duration, bool)> {
        let boot = boot_now();
        self.mounts
            .iter()
            .map(|(p, m)| (p.clone(), boot.saturating_sub(m.confirmed), m.fenced))
            .collect()
    }

    /// How long ago mount `mount` was last confirmed (for messages).
    fn age(&self, mount: &PathBuf, boot: Duration) -> Option<Duration> {
        self.mounts
            .get(mount)
            .map(|m| boot.saturating_sub(m.confirmed))
    }
}

/// Is `mount` fenced for an outage that has not ended (no beat confirmed since)?
pub fn silent(hb: &Heartbeats, mount: &Path) -> bool {
    hb.mounts.get(mount).is_some_and(|m| m.fenced)
}

/// How long `mount` has been silent, when that is `fence_after_ms` or more (its VMs had to be
/// stopped); None for a mount confirmed recently, not tracked, or with heartbeats off.
pub fn silent_for(hb: &Heartbeats, mount: &Path, boot: Duration) -> Option<Duration> {
    hb.interval?;
    let age = boot.saturating_sub(hb.mounts.get(mount)?.confirmed);
    (age >= hb.fence_after).then_some(age)
}

/// The mount key of lease `key` at `lock_path` for heartbeats, or None when it lives on
/// host-local storage (nothing to partition from).
pub fn mount_of(state: &State, key: &LeaseKey, lock_path: &str) -> Option<PathBuf> {
    match state.mounts.of_dev(key.dev) {
        Some((_, true)) => None,
        Some((m, false)) => Some(m.clone()),
        // Devices mountinfo does not list are btrfs subvolumes and overlayfs layers (local);
        // a network file system's device is always listed.
        None if state.mounts.text_is_local(lock_path) => None,
        None => Some(state.mounts.of(lock_path)),
    }
}

/// The event loop's timer: scan for mounts with leases, send beats that are due, warn, fence.
pub fn tick(state: &mut State, now: Instant) {
    let Some(interval) = state.heartbeat.interval else {
        return;
    };
    let boot = boot_now();
    if state.heartbeat.next_scan.is_some_and(|t| t <= now) {
        scan(state, now, boot);
        state.heartbeat.next_scan = Some(now + interval);
        state.heartbeat.last_scan = Some(boot);
    }
    let fence_after = state.heartbeat.fence_after;
    let mut due = Vec::new();
    let mut stale = Vec::new();
    let stalls = &mut state.metrics.heartbeat_stalls;
    for (path, m) in &mut state.heartbeat.mounts {
        if m.in_flight.is_none() && m.next_beat <= now {
            due.push(path.clone());
        }
        let age = boot.saturating_sub(m.confirmed);
        if !m.warned && age >= fence_after / 2 {
            // metrics (issue 18): one heartbeat stall per outage of the mount.
            *stalls.entry(super::metrics::mount_label(path)).or_default() += 1;
        }
        if !m.warned && age >= fence_after / 2 && age < fence_after {
            m.warned = true;
            warn!(
                "the storage behind mount {path:?} has not confirmed a heartbeat for {} ms; \
                 the VMs holding leases there are stopped if it stays silent for {} ms \
                 (fence_after_ms); check the storage server and the network to it",
                age.as_millis(),
                fence_after.as_millis()
            );
        }
        if !m.fenced && age >= fence_after {
            m.fenced = true;
            m.warned = true;
            stale.push((path.clone(), age));
        }
    }
    for path in due {
        send(state, &path, now);
    }
    for (path, age) in stale {
        fence::fence_mount(state, &path, age);
    }
}

/// Bring the set of tracked mounts in line with the lease table.
fn scan(state: &mut State, now: Instant, boot: Duration) {
    state.mounts.refresh();
    let mut seen: HashMap<PathBuf, LeaseKey> = HashMap::new();
    for (k, l) in state.leases.iter() {
        if let Some(m) = mount_of(state, k, &l.lock_path) {
            seen.entry(m).or_insert(*k);
        }
    }
    let hb = &mut state.heartbeat;
    let mut files = Vec::new();
    hb.mounts.retain(|m, t| {
        let keep = seen.contains_key(m);
        if !keep {
            files.extend(t.file.take().map(|f| (m.clone(), f)));
        }
        keep
    });
    let leases = &state.leases;
    let since = hb.last_scan.unwrap_or(boot);
    for (path, lease) in seen {
        match hb.mounts.get_mut(&path) {
            Some(m) => {
                // Keep a lease that is still held for the next beats.
                if leases.get(&m.lease).is_none() {
                    m.lease = lease;
                }
            }
            None => {
                // Its first lease was taken after the previous scan: the storage answered
                // that lock request after `since`.
                hb.mounts.insert(
                    path,
                    Mount {
                        confirmed: since,
                        in_flight: None,
                        next_beat: now,
                        file: None,
                        fenced: false,
                        warned: false,
                        error: None,
                        no_file: None,
                        lease,
                    },
                );
            }
        }
    }
    state
        .heartbeat
        .fenced
        .retain(|k, _| leases.get(k).is_some());
    // Heartbeat files of mounts without leases any more: closed on their heartbeat thread.
    for (m, f) in files {
        let job = state
            .storage
            .submit(&pool_of(&m), 1, false, Work::Close(vec![f]));
        state.jobs.insert(job, JobFor::Other);
    }
}

/// Send mount `path`'s next beat on its heartbeat thread.
fn send(state: &mut State, path: &PathBuf, now: Instant) {
    let interval = state.heartbeat.interval.unwrap_or(Duration::from_secs(1));
    state.heartbeat.seq += 1;
    let seq = state.heartbeat.seq;
    let host = state.hostname.clone();
    let Some(m) = state.heartbeat.mounts.get_mut(path) else {
        return;
    };
    let Some(l) = state.leases.get(&m.lease) else {
        // That lease is gone: the next scan (now) picks another one, or drops the mount.
        state.heartbeat.next_scan = Some(now);
        return;
    };
    let work = Work::Heartbeat(Box::new(Beat {
        mount: path.clone(),
        file: m.file.take(),
        lease: Arc::clone(&l.fd),
        mode: l.mode,
        host,
        seq,
    }));
    let job = state.storage.submit(&pool_of(path), 1, false, work);
    m.in_flight = Some((job, boot_now()));
    m.next_beat = now + interval;
    state.jobs.insert(job, JobFor::Heartbeat);
}

/// The storage pool key of `mount`'s heartbeat thread.
fn pool_of(mount: &Path) -> PathBuf {
    PathBuf::from(format!("{} (heartbeat)", mount.display()))
}

/// A beat came back.
pub fn on_beat(state: &mut State, job: JobId, b: Beaten) {
    let now = Instant::now();
    let boot = boot_now();
    let age = state.heartbeat.age(&b.mount, boot);
    let mine = state
        .heartbeat
        .mounts
        .get(&b.mount)
        .and_then(|m| m.in_flight)
        .is_some_and(|(id, _)| id == job);
    let Some(m) = state.heartbeat.mounts.get_mut(&b.mount).filter(|_| mine) else {
        // The mount has no leases any more: close its file on its heartbeat thread.
        if let Some(f) = b.file {
            let job = state
                .storage
                .submit(&pool_of(&b.mount), 1, false, Work::Close(vec![f]));
            state.jobs.insert(job, JobFor::Other);
        }
        return;
    };
    let Some((_, sent)) = m.in_flight.take() else {
        return;
    };
    m.file = b.file;
    if let Some(why) = b.no_file {
        if m.no_file.as_deref() != Some(why.as_str()) {
            warn!(
                "no heartbeat file on mount {:?}: {why}; its heartbeat tests a lease's lock \
                 instead (that also reaches the server)",
                b.mount
            );
            m.no_file = Some(why);
        }
    }
    match b.result {
        Ok(()) => {
            if sent > m.confirmed {
                m.confirmed = sent;
            }
            m.error = None;
            if boot.saturating_sub(m.confirmed) >= state.heartbeat.fence_after {
                // A beat sent before or during the outage that got through only now confirms
                // nothing recent: send a fresh one at once, and heal only when it is back.
                m.next_beat = now;
                return;
            }
            let was_fenced = m.fenced;
            let was_warned = m.warned;
            m.fenced = false;
            m.warned = false;
            if was_fenced {
                info!(
                    "the storage behind mount {:?} answers again (silent for {} ms); re-checking \
                     the locks of the VMs stopped for it",
                    b.mount,
                    age.unwrap_or_default().as_millis()
                );
            } else if was_warned {
                info!(
                    "the storage behind mount {:?} answers again after {} ms; nothing was done \
                     to its VMs",
                    b.mount,
                    age.unwrap_or_default().as_millis()
                );
            }
            // Fenced leases of this mount not re-checked yet (or whose re-check was not
            // conclusive): re-check them now.
            if !state.heartbeat.fenced.is_empty() {
                fence::healed(state, &b.mount);
            }
        }
        Err(e) => {
            if m.error.as_deref() != Some(e.as_str()) {
                error!(
                    "heartbeat on mount {:?} failed: {e}; the mount counts as unconfirmed since \
                     {} ms ago (its VMs are stopped after {} ms); check the storage behind it",
                    b.mount,
                    age.unwrap_or_default().as_millis(),
                    state.heartbeat.fence_after.as_millis()
                );
                if let Some(m) = state.heartbeat.mounts.get_mut(&b.mount) {
                    m.error = Some(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn lease_fd(p: &Path) -> Arc<OwnedFd> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap();
        Arc::new(OwnedFd::from(f))
    }

    fn one(lease: &Arc<OwnedFd>, file: Option<OwnedFd>, seq: u64) -> Beaten {
        beat(Beat {
            mount: PathBuf::from("/m"),
            file,
            lease: Arc::clone(lease),
            mode: LeaseMode::Exclusive,
            host: "host a/b".into(),
            seq,
        })
    }

    #[test]
    fn a_beat_rewrites_one_fixed_size_record_and_never_writes_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, vec![7u8; 8192]).unwrap();
        let lease = lease_fd(&disk);
        let b = one(&lease, None, 1);
        assert!(b.result.is_ok() && b.no_file.is_none(), "{b:?}");
        let hb = dir.path().join(".lockwarden/heartbeat@host_a_b");
        let text = std::fs::read_to_string(&hb).unwrap();
        assert_eq!(text.len(), BEAT_LEN);
        assert!(
            text.starts_with("lockwarden heartbeat host=host_a_b "),
            "{text:?}"
        );
        assert!(text.contains(" seq=1 "), "{text:?}");
        // The kept file is rewritten in place by the next beat.
        let b = one(&lease, b.file, 2);
        assert!(b.result.is_ok() && b.file.is_some());
        let text = std::fs::read_to_string(&hb).unwrap();
        assert_eq!(text.len(), BEAT_LEN);
        assert!(text.contains(" seq=2 "), "{text:?}");
        // The heartbeat file replaced by a hard link to the image: never written (the image is
        // intact), the beat falls back to testing the lease's lock.
        std::fs::remove_file(&hb).unwrap();
        std::fs::hard_link(&disk, &hb).unwrap();
        let b = one(&lease, b.file, 3);
        assert!(b.result.is_ok(), "{b:?}");
        let b = one(&lease, None, 4);
        assert!(b.result.is_ok(), "{b:?}");
        assert!(b.file.is_none());
        assert!(
            b.no_file
                .as_deref()
                .is_some_and(|w| w.contains("hard link")),
            "{b:?}"
        );
        assert_eq!(std::fs::read(&disk).unwrap(), vec![7u8; 8192]);
    }
}
