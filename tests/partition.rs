//! Partition safety (issue 15, docs/storage.md "Partitions"): a host cut off from its storage
//! stops its VMs before the storage could give their disks to another host. Real `lockwardend`
//! daemons on the FUSE stand-in (tests/fusefs/testfs.rs, the example `testfs`), where `hang 1`
//! makes every request of one mount wait, like a hard NFS mount whose server is unreachable.
//! Needs root and /dev/fuse.

mod common;

use common::wait::poll;

use common::daemon::TestDaemon;
use common::fuse::Testfs;
use common::proto::{Proc, excl, sleeper};
use lockwarden::protocol::{self, FailureAction, Owner, Request, Response};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Settings of the daemons under test: beats every 100 ms, fence after 2 s of silence.
const INTERVAL_MS: u64 = 100;
const FENCE_AFTER_MS: u64 = 2000;
/// How long past `fence_after_ms` a fence may take here (2-core CI shared with other jobs):
/// a generous bound for the polls, not a measured claim.
const BOUND: Duration = Duration::from_secs(10);

fn prerequisites() {
    common::fuse::prerequisites("tests/partition.rs");
}

/// One mounted test file system over `backing` (common::fuse::Testfs), with this suite's view
/// of the heartbeat file the "server" (the backing directory) received.
struct Fs {
    // Declared first: unmounted before the directory holding the mount point is removed.
    tfs: Testfs,
    _dir: tempfile::TempDir,
    backing: PathBuf,
    mnt: PathBuf,
    events: PathBuf,
}

impl Fs {
    fn mount() -> Fs {
        let dir = tempfile::Builder::new()
            .prefix("lw-part")
            .tempdir()
            .expect("tempdir");
        let backing = dir.path().join("export");
        fs::create_dir(&backing).unwrap();
        Fs::mount_over(dir, backing)
    }

    /// Mount `backing` (possibly shared with another mount: another client host) in `dir`.
    fn mount_over(dir: tempfile::TempDir, backing: PathBuf) -> Fs {
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let events = dir.path().join("events");
        let ctl = dir.path().join("control");
        let tfs = Testfs::mount(&backing, &mnt, &ctl, &events, Duration::from_secs(20));
        Fs {
            tfs,
            _dir: dir,
            backing,
            mnt,
            events,
        }
    }

    fn set(&self, text: &str) {
        self.tfs.set(text);
    }

    /// An image created through the backing directory, named through the mount.
    fn image(&self, name: &str) -> PathBuf {
        fs::write(self.backing.join(name), vec![0u8; 4096]).unwrap();
        self.mnt.join(name)
    }

    /// The heartbeat file this host keeps on the mount, as the "server" (backing dir) sees it.
    fn heartbeat(&self) -> Option<String> {
        let dir = self.backing.join(".lockwarden");
        let e = fs::read_dir(dir)
            .ok()?
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with("heartbeat@"))?;
        fs::read_to_string(e.path()).ok()
    }

    /// The sequence number of the last beat the "server" received.
    fn beat_seq(&self) -> Option<u64> {
        let text = self.heartbeat()?;
        text.split_whitespace()
            .find_map(|w| w.strip_prefix("seq="))
            .and_then(|n| n.parse().ok())
    }
}

fn owner(name: &str, q: &Proc) -> Owner {
    Owner {
        uuid: format!("00000000-0000-4000-8000-{:012x}", q.pid()),
        name: name.into(),
        id: 1,
        pid: q.pid(),
    }
}

fn call(sock: &Path, req: &Request) -> Response {
    let mut s = UnixStream::connect(sock).expect("connect to lockwardend");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    protocol::write_message(&mut s, req).expect("send");
    protocol::read_message(&mut s).expect("answer")
}

fn acquire(d: &TestDaemon, o: &Owner, p: &Path, action: FailureAction) {
    let r = call(
        &d.socket,
        &Request::Acquire {
            owner: o.clone(),
            leases: vec![excl(p)],
            action,
            restrict: false,
        },
    );
    assert!(matches!(r, Response::Ok { .. }), "acquire {p:?}: {r:?}");
}

fn list(d: &TestDaemon) -> Vec<String> {
    match call(&d.admin, &Request::List) {
        Response::Ok { leases } => leases.into_iter().map(|l| l.name).collect(),
        other => panic!("list: {other:?}"),
    }
}

fn lost(d: &TestDaemon) -> Vec<String> {
    match call(&d.admin, &Request::Lost) {
        Response::Ok { leases } => leases.into_iter().map(|l| l.name).collect(),
        other => panic!("lost: {other:?}"),
    }
}

fn daemon() -> TestDaemon {
    TestDaemon::verbose(&format!(
        "heartbeat_interval_ms = {INTERVAL_MS}\nfence_after_ms = {FENCE_AFTER_MS}\n\
         lease_check_interval_ms = 0\nstorage_timeout_ms = 2000\n"
    ))
}

/// Wait until the "server" has seen `n` more beats of this host on `f` than `from`.
fn beats_reach(d: &TestDaemon, f: &Fs, from: u64, n: u64) {
    d.wait_for_within(BOUND, "heartbeats reaching the storage", || {
        f.beat_seq().is_some_and(|s| s >= from + n)
    });
}

/// A mount whose storage stops answering gets its VMs fenced after `fence_after_ms`: the
/// paused VM is stopped (SIGSTOP), the default one killed (SIGKILL), the ignoring one left
/// running with an UNPROTECTED error; a VM on another mount is untouched, and that mount's
/// beats keep arriving. When the storage answers again, the paused VM's lock is re-checked:
/// still ours, so it stays stopped for the operator. (Old code: no heartbeat at all, so the
/// daemon refuses `heartbeat_interval_ms` as an unknown key; without that key it never stops
/// a VM on a hung mount: its probes simply do not return.)
#[test]
fn a_partitioned_mount_fences_its_vms_and_leaves_others_alone() {
    prerequisites();
    let d = daemon();
    let (x, y) = (Fs::mount(), Fs::mount());
    let (qp, mut qk, mut qi, mut qo) = (sleeper(), sleeper(), sleeper(), sleeper());
    let (op, ok, oi, oo) = (
        owner("vm-pause", &qp),
        owner("vm-default", &qk),
        owner("vm-ignore", &qi),
        owner("vm-other-mount", &qo),
    );
    let (p, k, i, o) = (
        x.image("p.img"),
        x.image("k.img"),
        x.image("i.img"),
        y.image("o.img"),
    );
    acquire(&d, &op, &p, FailureAction::Pause);
    acquire(&d, &ok, &k, FailureAction::Default);
    acquire(&d, &oi, &i, FailureAction::Ignore);
    acquire(&d, &oo, &o, FailureAction::Default);
    // The beats reach both "servers": written and fsync'ed through the mounts.
    beats_reach(&d, &x, 0, 2);
    beats_reach(&d, &y, 0, 2);
    let text = x.heartbeat().unwrap();
    assert!(text.starts_with("lockwarden heartbeat host="), "{text:?}");

    // Partition mount x.
    x.set("hang 1\n");
    let t0 = Instant::now();
    let seq_at_partition = x.beat_seq().unwrap();
    let bound = Duration::from_millis(FENCE_AFTER_MS) + BOUND;
    d.wait_for_within(bound, "the paused VM stopped", || qp.state() == Some('T'));
    let stopped = t0.elapsed();
    let (st, _) = poll(bound.saturating_sub(t0.elapsed()), || qk.exited())
        .unwrap_or_else(|| panic!("the default VM still runs:\n{}", d.log()));
    let killed = t0.elapsed();
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{st:?}");
    eprintln!(
        "partition to fence: paused VM stopped after {stopped:?}, default VM killed after \
         {killed:?} (fence_after_ms {FENCE_AFTER_MS}, heartbeat_interval_ms {INTERVAL_MS})"
    );
    // No beat got through during the partition.
    assert_eq!(x.beat_seq(), Some(seq_at_partition));
    let text = d.log();
    assert!(
        text.contains("FENCE:") && text.contains("vm-pause"),
        "{text}"
    );
    assert!(
        text.contains("UNPROTECTED") && text.contains("vm-ignore"),
        "the ignoring VM is reported unprotected: {text}"
    );
    // The ignoring VM and the VM on the healthy mount keep running; mount y keeps beating.
    let y_seq = y.beat_seq().unwrap();
    beats_reach(&d, &y, y_seq, 3);
    assert_eq!(qi.exited(), None);
    assert_ne!(qi.state(), Some('T'));
    assert_eq!(qo.exited(), None, "the VM on the healthy mount was killed");
    assert_ne!(
        qo.state(),
        Some('T'),
        "the VM on the healthy mount was stopped"
    );
    let y_mnt = y.mnt.to_string_lossy().into_owned();
    assert!(
        !d.log()
            .lines()
            .any(|l| l.contains("FENCE:") && l.contains(&y_mnt)),
        "the healthy mount was fenced:\n{}",
        d.log()
    );
    let held = list(&d);
    assert!(held.contains(&o.to_string_lossy().into_owned()), "{held:?}");
    // Each VM is fenced once.
    let fences = d.log().matches("FENCE:").count();
    assert_eq!(fences, 3, "one FENCE line per VM:\n{}", d.log());

    // Heal: the paused VM's lock is still ours; it stays stopped until an operator acts.
    x.set("");
    d.wait_for_within(BOUND, "the re-check after the heal", || {
        d.log()
            .contains("is still held after the storage behind mount")
    });
    assert!(d.log().contains("answers again"), "{}", d.log());
    assert_eq!(
        qp.state(),
        Some('T'),
        "the paused VM was resumed by lockwardend"
    );
    beats_reach(&d, &x, seq_at_partition, 2);
    assert_eq!(qp.state(), Some('T'));
    assert!(lost(&d).is_empty(), "nothing was lost: {:?}", lost(&d));
    assert_eq!(d.log().matches("FENCE:").count(), 3, "no second fence");
    drop(qi);
}

/// A lock lost while the storage did not answer: the paused VM is killed once the storage
/// answers again (another host may have written to the disk), and the loss is recorded.
#[test]
fn a_lock_lost_during_the_partition_kills_the_paused_vm() {
    prerequisites();
    let d = daemon();
    let x = Fs::mount();
    let mut q = sleeper();
    let o = owner("vm-paused-lost", &q);
    let p = x.image("lost.img");
    acquire(&d, &o, &p, FailureAction::Pause);
    beats_reach(&d, &x, 0, 1);
    x.set("hang 1\n");
    let t0 = Instant::now();
    d.wait_for_within(
        Duration::from_millis(FENCE_AFTER_MS) + BOUND,
        "the paused VM stopped",
        || q.state() == Some('T'),
    );
    // The storage lost the lock meanwhile, then answers again.
    x.set("hang 1\nlost lost.img\n");
    x.set("lost lost.img\n");
    let (st, _) = poll(Duration::from_secs(30).saturating_sub(t0.elapsed()), || {
        q.exited()
    })
    .unwrap_or_else(|| panic!("the VM still runs:\n{}", d.log()));
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{st:?}");
    let text = d.log();
    assert!(
        text.contains("was LOST while the storage behind mount"),
        "{text}"
    );
    assert_eq!(text.matches("was LOST while").count(), 1, "logged once");
    assert_eq!(lost(&d), vec![p.to_string_lossy().into_owned()]);
}

/// The disk's directory is writable by everybody, so no heartbeat file is kept there: the
/// beat falls back to testing the lease's lock (F_OFD_GETLK, which an NFS client sends to the
/// server), and a partition is still fenced, then re-checked once the storage answers.
#[test]
fn without_a_heartbeat_file_the_beat_tests_the_lock() {
    prerequisites();
    let d = daemon();
    let x = Fs::mount();
    fs::set_permissions(&x.backing, fs::Permissions::from_mode(0o777)).unwrap();
    let q = sleeper();
    let o = owner("vm-fallback", &q);
    let p = x.image("fallback.img");
    acquire(&d, &o, &p, FailureAction::Pause);
    d.wait_for_within(BOUND, "the fallback beat", || {
        d.log().contains("no heartbeat file on mount")
    });
    assert!(
        x.heartbeat().is_none(),
        "a heartbeat file in a 0777 directory"
    );
    assert_eq!(
        d.log().matches("no heartbeat file on mount").count(),
        1,
        "logged once"
    );
    x.set("hang 1\n");
    let t0 = Instant::now();
    d.wait_for_within(
        Duration::from_millis(FENCE_AFTER_MS) + BOUND,
        "the paused VM stopped",
        || q.state() == Some('T'),
    );
    eprintln!("fallback beat: partition to SIGSTOP {:?}", t0.elapsed());
    x.set("");
    d.wait_for_within(BOUND, "the re-check after the heal", || {
        d.log()
            .contains("is still held after the storage behind mount")
    });
    assert_eq!(q.state(), Some('T'));
    assert!(lost(&d).is_empty());
    assert_eq!(list(&d), vec![p.to_string_lossy().into_owned()]);
}

/// After a live re-exec (SIGUSR1) the new image tracks the adopted leases' mounts again and
/// still fences a partition (the heartbeat state itself is not carried: its clock starts over).
#[test]
fn fencing_works_after_a_live_reexec() {
    prerequisites();
    let d = daemon();
    let x = Fs::mount();
    let q = sleeper();
    let o = owner("vm-reexec", &q);
    let p = x.image("reexec.img");
    acquire(&d, &o, &p, FailureAction::Pause);
    beats_reach(&d, &x, 0, 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    d.wait_for_within(BOUND, "the re-exec", || {
        d.log().matches("serving (pid").count() >= 2
    });
    // The new image beats too (sequence numbers start over: the file changes again).
    let before = x.heartbeat();
    d.wait_for_within(BOUND, "a beat from the new image", || {
        x.heartbeat() != before
    });
    x.set("hang 1\n");
    d.wait_for_within(
        Duration::from_millis(FENCE_AFTER_MS) + BOUND,
        "the paused VM stopped after the re-exec",
        || q.state() == Some('T'),
    );
    assert_eq!(list(&d), vec![p.to_string_lossy().into_owned()]);
}

/// xorshift64*: reproducible randomness from a seed printed with every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn wall_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Is process `pid` runnable (it exists and is neither stopped nor a zombie)?
fn runnable(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !matches!(
            s.rsplit_once(')')
                .and_then(|(_, r)| r.trim().chars().next()),
            Some('T' | 't' | 'Z' | 'X') | None
        ),
        Err(_) => false,
    }
}

/// Percentile `p` (0..=100) of sorted `v`.
fn pct(v: &[u128], p: usize) -> u128 {
    if v.is_empty() {
        return 0;
    }
    v[(v.len() - 1) * p / 100]
}

/// The simulated lease server (tests/fusefs/testfs.rs `lease_ms`): host A and host B are two
/// daemons on two mounts of one backing directory; A's mount is a client whose lease expires
/// `LEASE_MS` after its last served request, and then loses every lock it held (the strict
/// server, earlier than a courteous one), so B can take them. Each round starts 1 to
/// `LW_PARTITION_MAX_VMS` VMs on A (pause or default action), partitions A's mount for a
/// random time around the lease (the first two rounds just below and just above
/// `fence_after_ms`), sometimes with an acquire in flight, while B keeps trying to take every
/// disk. A monitor records, with wall-clock timestamps, when each of A's VM processes stopped
/// being runnable (from /proc); B's file system records when each lock was granted. The
/// invariant: **B never holds a disk while A's VM on it is runnable**, i.e. every grant to B
/// started after A's VM was seen stopped or gone (the 1 ms polling makes the observed stop
/// later than the real one: the check errs against us). `LW_PARTITION_ROUNDS` (default 20,
/// ~1 minute on the 2-core CI machine), `LW_PARTITION_SEED` to replay a run.
#[test]
fn randomized_partitions_never_let_b_hold_a_disk_while_as_vm_runs() {
    prerequisites();
    const LEASE_MS: u64 = 1000;
    const A_INTERVAL_MS: u64 = 40;
    const A_FENCE_MS: u64 = 300;
    // The edges. Below: the silence the daemon sees is the partition plus up to one interval
    // before it (the clock runs from the last confirmed beat's send) plus the round trips of
    // the held beat and the fresh one after the heal; 80 ms are left for those and for
    // scheduling on a loaded machine. Above: the fence is due at most `fence_after_ms` after
    // the partition starts, 100 ms before the heal.
    const EDGE_BELOW_MS: u64 = A_FENCE_MS - A_INTERVAL_MS - 80;
    const EDGE_ABOVE_MS: u64 = A_FENCE_MS + 100;
    let rounds = env_u64("LW_PARTITION_ROUNDS", 20);
    let max_vms = env_u64("LW_PARTITION_MAX_VMS", 20).max(1);
    let seed = env_u64("LW_PARTITION_SEED", (wall_ns() as u64) | 1);
    eprintln!("seed {seed} (LW_PARTITION_SEED), {rounds} rounds, up to {max_vms} VMs");
    let mut rng = Rng(seed);
    let conf = format!(
        "heartbeat_interval_ms = {A_INTERVAL_MS}\nfence_after_ms = {A_FENCE_MS}\n\
         lease_check_interval_ms = 0\nstorage_timeout_ms = 3000\n"
    );
    // LW_PARTITION_NO_FENCE=1: host A without heartbeats, as before issue 15 (the checker
    // must then find violations: a control run for the report, not for CI).
    let a_conf = match std::env::var("LW_PARTITION_NO_FENCE") {
        Ok(v) if v == "1" => conf.replace(
            &format!("heartbeat_interval_ms = {A_INTERVAL_MS}"),
            "heartbeat_interval_ms = 0",
        ),
        _ => conf.clone(),
    };
    let (a, b) = (TestDaemon::verbose(&a_conf), TestDaemon::verbose(&conf));
    let shared = tempfile::Builder::new()
        .prefix("lw-lease")
        .tempdir()
        .unwrap();
    let backing = shared.path().join("export");
    fs::create_dir(&backing).unwrap();
    let tmp = || {
        tempfile::Builder::new()
            .prefix("lw-host")
            .tempdir()
            .unwrap()
    };
    let ma = Fs::mount_over(tmp(), backing.clone());
    let mb = Fs::mount_over(tmp(), backing.clone());
    let lease_line = format!("lease_ms {LEASE_MS}\n");
    ma.set(&lease_line);
    let mut violations = Vec::new();
    let mut fence_ms: Vec<u128> = Vec::new();
    let mut margins_ms: Vec<i128> = Vec::new();
    let (mut grants_total, mut expiries, mut releases) = (0usize, 0usize, 0usize);
    for round in 0..rounds {
        let n = 1 + rng.below(max_vms) as usize;
        let len_ms = match round {
            0 => EDGE_BELOW_MS,
            1 => EDGE_ABOVE_MS,
            _ => LEASE_MS * 3 / 10 + rng.below(LEASE_MS * 15 / 10),
        };
        let fences_before = a.log().matches("FENCE:").count();
        // A's VMs: disk name -> (VM process, action).
        let mut vms: Vec<(String, Proc, FailureAction)> = Vec::new();
        for j in 0..n {
            let name = format!("r{round}-{j}.img");
            fs::write(backing.join(&name), vec![0u8; 4096]).unwrap();
            let q = sleeper();
            let action = if rng.below(2) == 0 {
                FailureAction::Pause
            } else {
                FailureAction::Default
            };
            acquire(
                &a,
                &owner(&format!("a-{name}"), &q),
                &ma.mnt.join(&name),
                action,
            );
            vms.push((name, q, action));
        }
        // Sometimes a release is issued while the mount is partitioned: A's first VM holds a
        // second disk it gives up (a hot-unplug) right after the partition starts. The disk
        // it keeps must still be fenced; the released one may go to B (the VM stopped using
        // it), so it is outside the invariant; the release is answered within its deadline.
        let releasing = (round >= 2 && rng.below(3) == 0).then(|| {
            let name = format!("r{round}-0-unplugged.img");
            fs::write(backing.join(&name), vec![0u8; 4096]).unwrap();
            let (_, q, action) = &vms[0];
            let o = owner(&format!("a-r{round}-0.img"), q);
            acquire(&a, &o, &ma.mnt.join(&name), *action);
            (name, o)
        });
        // Sometimes an acquire is in flight when the partition starts.
        let in_flight = (rng.below(3) == 0).then(|| {
            let name = format!("r{round}-late.img");
            fs::write(backing.join(&name), vec![0u8; 4096]).unwrap();
            let q = sleeper();
            let (sock, o, path) = (
                a.socket.clone(),
                owner(&format!("a-{name}"), &q),
                ma.mnt.join(&name),
            );
            let t = std::thread::spawn(move || {
                call(
                    &sock,
                    &Request::Acquire {
                        owner: o,
                        leases: vec![excl(&path)],
                        action: FailureAction::Pause,
                        restrict: false,
                    },
                )
            });
            (name, q, t)
        });
        // The monitor: when each of A's VMs was first seen not runnable (wall ns).
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watched: Vec<(String, u32)> =
            vms.iter().map(|(d, q, _)| (d.clone(), q.pid())).collect();
        let monitor = {
            let stop = std::sync::Arc::clone(&stop);
            let mut watched = watched.clone();
            if let Some((d, q, _)) = &in_flight {
                watched.push((d.clone(), q.pid()));
            }
            std::thread::spawn(move || {
                let mut seen: std::collections::HashMap<String, u128> = Default::default();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    for (d, pid) in &watched {
                        if !seen.contains_key(d) && !runnable(*pid) {
                            seen.insert(d.clone(), wall_ns());
                        }
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                seen
            })
        };
        let events_from = fs::metadata(&mb.events).map(|m| m.len()).unwrap_or(0) as usize;
        let a_events_from = fs::metadata(&ma.events).map(|m| m.len()).unwrap_or(0) as usize;
        // Partition A; B tries every disk meanwhile and until things settle after the heal.
        let t_p = wall_ns();
        ma.set(&format!("{lease_line}hang 1\n"));
        let t0 = Instant::now();
        let release = releasing.as_ref().map(|(name, o)| {
            let (sock, o, path) = (a.socket.clone(), o.clone(), ma.mnt.join(name));
            std::thread::spawn(move || {
                let t = Instant::now();
                let r = call(
                    &sock,
                    &Request::Release {
                        owner: o,
                        leases: vec![excl(&path)],
                    },
                );
                (r, t.elapsed())
            })
        });
        let mut b_owners: Vec<Proc> = Vec::new();
        let mut b_held: std::collections::HashSet<String> = Default::default();
        let mut healed = false;
        let settle = Duration::from_millis(len_ms + 1500);
        while t0.elapsed() < settle {
            if !healed && t0.elapsed() >= Duration::from_millis(len_ms) {
                ma.set(&lease_line);
                healed = true;
            }
            let unplugged = releasing.iter().map(|(d, _)| d);
            for d in vms.iter().map(|(d, _, _)| d).chain(unplugged) {
                if b_held.contains(d) {
                    continue;
                }
                let q = sleeper();
                let r = call(
                    &b.socket,
                    &Request::Acquire {
                        owner: owner(&format!("b-{d}"), &q),
                        leases: vec![excl(&mb.mnt.join(d))],
                        action: FailureAction::Default,
                        restrict: false,
                    },
                );
                if matches!(r, Response::Ok { .. }) {
                    b_held.insert(d.clone());
                    b_owners.push(q);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(t) = release {
            let (r, took) = t.join().unwrap();
            releases += 1;
            match r {
                Response::Ok { .. } => {}
                Response::Error(e) if e.kind == protocol::ErrorKind::Timeout => {}
                other => violations.push(format!("round {round}: the release answered {other:?}")),
            }
            assert!(
                took < Duration::from_millis(3000) + BOUND,
                "round {round}: the release took {took:?}"
            );
        }
        if let Some((d, q, t)) = in_flight {
            let r = t.join().unwrap();
            if matches!(r, Response::Ok { .. }) {
                vms.push((d, q, FailureAction::Pause));
            }
        }
        // Every VM of A whose disk B got must be stopped or gone now, and stay so.
        for (d, q, _) in &vms {
            if b_held.contains(d) && runnable(q.pid()) {
                violations.push(format!(
                    "round {round}: {d}: A's VM runs at the end while B holds it"
                ));
            }
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let seen = monitor.join().unwrap();
        // Grants to B, from B's file system.
        let events = fs::read_to_string(&mb.events).unwrap_or_default();
        for line in events.get(events_from..).unwrap_or_default().lines() {
            let w: Vec<&str> = line.split(' ').collect();
            if w.len() != 6 || w[0] != "setlk" || w[2] != "1" || w[5] != "0" {
                continue;
            }
            if !vms.iter().any(|(d, _, _)| d == w[1]) {
                continue;
            }
            grants_total += 1;
            let start: u128 = w[3].parse().unwrap();
            match seen.get(w[1]) {
                Some(stopped) if *stopped <= start => {}
                Some(stopped) => violations.push(format!(
                    "round {round}: B was granted {} {} ms before A's VM was seen stopped",
                    w[1],
                    (stopped - start) / 1_000_000
                )),
                None => violations.push(format!(
                    "round {round}: B was granted {} while A's VM never stopped",
                    w[1]
                )),
            }
        }
        // Partition to fence, and the margin to the simulated lease expiry.
        let last_stop = watched
            .iter()
            .filter_map(|(d, _)| seen.get(d))
            .max()
            .copied();
        if len_ms >= A_FENCE_MS + 50 {
            if let Some(s) = last_stop {
                fence_ms.push((s - t_p) / 1_000_000);
            }
        }
        let a_events = fs::read_to_string(&ma.events).unwrap_or_default();
        if let Some(exp) = a_events
            .get(a_events_from..)
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("expire ") && !l.starts_with("expire 0 "))
            .and_then(|l| l.split(' ').nth(3))
            .and_then(|n| n.parse::<u128>().ok())
        {
            expiries += 1;
            if let Some(s) = last_stop {
                margins_ms.push((exp as i128 - s as i128) / 1_000_000);
            }
        }
        // The edges: just below `fence_after_ms` nothing is fenced, just above everything is.
        let fences = a.log().matches("FENCE:").count() - fences_before;
        let initial: Vec<&String> = watched.iter().take(n).map(|(d, _)| d).collect();
        if round == 0 {
            assert!(
                fences == 0 && initial.iter().all(|d| !seen.contains_key(*d)),
                "a {len_ms} ms partition (fence_after_ms {A_FENCE_MS}) fenced {fences} VM(s):\n{}",
                a.log()
            );
        }
        if round == 1 {
            assert!(
                fences >= n && initial.iter().all(|d| seen.contains_key(*d)),
                "a {len_ms} ms partition (fence_after_ms {A_FENCE_MS}) fenced {fences} of {n} \
                 VM(s):\n{}",
                a.log()
            );
        }
        eprintln!(
            "round {round}: {n} VM(s), partition {len_ms} ms{}, B got {} disk(s), stopped {}",
            if releasing.is_some() {
                ", a release during it"
            } else {
                ""
            },
            b_held.len(),
            watched.iter().filter(|(d, _)| seen.contains_key(d)).count()
        );
        // Clean up: every VM goes, both hosts let go.
        drop(vms);
        drop(b_owners);
        a.wait_for_within(BOUND, "host A released everything", || list(&a).is_empty());
        b.wait_for_within(BOUND, "host B released everything", || list(&b).is_empty());
    }
    fence_ms.sort();
    let mut m: Vec<u128> = margins_ms.iter().map(|m| (*m).max(0) as u128).collect();
    m.sort();
    eprintln!(
        "RESULT {rounds} rounds: {grants_total} grants to B, {expiries} lease expiries, \
         {releases} releases during a partition, {} violation(s); partition to last VM stopped \
         p50 {} ms, p99 {} ms (fence_after_ms {A_FENCE_MS}, heartbeat {A_INTERVAL_MS} ms); \
         margin before the simulated lease expired ({LEASE_MS} ms lease) min {} ms, p50 {} ms; \
         edges {EDGE_BELOW_MS} ms (no fence) and {EDGE_ABOVE_MS} ms (fence) held",
        violations.len(),
        pct(&fence_ms, 50),
        pct(&fence_ms, 99),
        margins_ms.iter().min().copied().unwrap_or(0),
        pct(&m, 50),
    );
    assert!(violations.is_empty(), "{violations:#?}\n{}", a.log());
    assert!(
        margins_ms.iter().all(|m| *m > 0),
        "a VM was stopped after its lease expired: {margins_ms:?}"
    );
}
