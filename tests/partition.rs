//! Partition safety (issue 15, docs/storage.md "Partitions"): a host cut off from its storage
//! stops its VMs before the storage could give their disks to another host. Real `lockwardend`
//! daemons on the FUSE stand-in (tests/fusefs/testfs.rs, the example `testfs`), where `hang 1`
//! makes every request of one mount wait, like a hard NFS mount whose server is unreachable.
//! Needs root and /dev/fuse.

mod common;

use common::Daemon;
use lockwarden::protocol::{
    self, FailureAction, LeaseMode, LeaseSpec, LockTarget, Owner, Request, ResourceKind, Response,
};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Settings of the daemons under test: beats every 100 ms, fence after 1.2 s of silence.
const INTERVAL_MS: u64 = 100;
const FENCE_AFTER_MS: u64 = 1200;
/// How long past `fence_after_ms` a fence may take here (2-core CI shared with other jobs):
/// a generous bound for the polls, not a measured claim.
const BOUND: Duration = Duration::from_secs(10);

fn prerequisites() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "tests/partition.rs mounts FUSE file systems and must run as root"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: load the fuse module (modprobe fuse) to run tests/partition.rs"
    );
}

fn testfs_path() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let p = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("examples/testfs");
    assert!(
        p.exists(),
        "{} is missing: `cargo test` builds it; alone, run `cargo build --example testfs`",
        p.display()
    );
    p
}

fn mounted(mnt: &Path) -> bool {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let m = mnt.to_string_lossy();
    text.lines().any(|l| l.split(' ').nth(4) == Some(&*m))
}

/// One mounted test file system over `backing`; unmounted (and un-hung) on drop.
struct Fs {
    _dir: tempfile::TempDir,
    backing: PathBuf,
    mnt: PathBuf,
    ctl: PathBuf,
    child: Child,
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

    fn mount_over(dir: tempfile::TempDir, backing: PathBuf) -> Fs {
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let ctl = dir.path().join("control");
        let log = dir.path().join("events");
        let child = Command::new(testfs_path())
            .args([&backing, &mnt, &ctl, &log])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn testfs");
        let mut f = Fs {
            _dir: dir,
            backing,
            mnt,
            ctl,
            child,
        };
        let t0 = Instant::now();
        while !mounted(&f.mnt) {
            if let Ok(Some(st)) = f.child.try_wait() {
                panic!("testfs exited before mounting {}: {st}", f.mnt.display());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "testfs did not mount"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        f
    }

    fn set(&self, text: &str) {
        let tmp = self.ctl.with_extension("tmp");
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, &self.ctl).unwrap();
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

impl Drop for Fs {
    fn drop(&mut self) {
        self.set("");
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// A process standing in for QEMU.
struct Qemu(Child);

impl Qemu {
    fn spawn() -> Qemu {
        Qemu(
            Command::new("sleep")
                .arg("1000")
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn sleep"),
        )
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
    /// The state letter of /proc/PID/stat (R, S, T, Z...), None once reaped.
    fn state(&self) -> Option<char> {
        let s = fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        s.rsplit_once(')')?.1.trim().chars().next()
    }
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().unwrap()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn owner(name: &str, q: &Qemu) -> Owner {
    Owner {
        uuid: format!("00000000-0000-4000-8000-{:012x}", q.pid()),
        name: name.into(),
        id: 1,
        pid: q.pid(),
    }
}

fn disk(p: &Path) -> LeaseSpec {
    let path = p.to_string_lossy().into_owned();
    LeaseSpec {
        name: path.clone(),
        kind: ResourceKind::Disk,
        mode: LeaseMode::Exclusive,
        target: LockTarget::File { path },
    }
}

fn call(sock: &Path, req: &Request) -> Response {
    let mut s = UnixStream::connect(sock).expect("connect to lockwardend");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    protocol::write_message(&mut s, req).expect("send");
    protocol::read_message(&mut s).expect("answer")
}

fn acquire(d: &Daemon, o: &Owner, p: &Path, action: FailureAction) {
    let r = call(
        &d.socket,
        &Request::Acquire {
            owner: o.clone(),
            leases: vec![disk(p)],
            action,
            restrict: false,
        },
    );
    assert!(matches!(r, Response::Ok { .. }), "acquire {p:?}: {r:?}");
}

fn list(d: &Daemon) -> Vec<String> {
    match call(&d.admin_socket, &Request::List) {
        Response::Ok { leases } => leases.into_iter().map(|l| l.name).collect(),
        other => panic!("list: {other:?}"),
    }
}

fn lost(d: &Daemon) -> Vec<String> {
    match call(&d.admin_socket, &Request::Lost) {
        Response::Ok { leases } => leases.into_iter().map(|l| l.name).collect(),
        other => panic!("lost: {other:?}"),
    }
}

fn log(d: &Daemon) -> String {
    fs::read_to_string(&d.log).unwrap_or_default()
}

/// Poll `cond` until it holds, at most `bound`; panics with `what` and the daemon log.
fn wait_for(d: &Daemon, bound: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        if cond() {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < bound,
            "{what}: not within {bound:?}; daemon log:\n{}",
            log(d)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn daemon() -> Daemon {
    Daemon::start_with(&format!(
        "heartbeat_interval_ms = {INTERVAL_MS}\nfence_after_ms = {FENCE_AFTER_MS}\n\
         lease_check_interval_ms = 0\nstorage_timeout_ms = 2000\n"
    ))
}

/// Wait until the "server" has seen `n` more beats of this host on `f` than `from`.
fn beats_reach(d: &Daemon, f: &Fs, from: u64, n: u64) {
    wait_for(d, BOUND, "heartbeats reaching the storage", || {
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
    let (qp, mut qk, mut qi, mut qo) = (Qemu::spawn(), Qemu::spawn(), Qemu::spawn(), Qemu::spawn());
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
    wait_for(&d, bound, "the paused VM stopped", || {
        qp.state() == Some('T')
    });
    let stopped = t0.elapsed();
    let st = loop {
        if let Some(st) = qk.exited() {
            break st;
        }
        assert!(
            t0.elapsed() < bound,
            "the default VM still runs:\n{}",
            log(&d)
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let killed = t0.elapsed();
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{st:?}");
    eprintln!(
        "partition to fence: paused VM stopped after {stopped:?}, default VM killed after \
         {killed:?} (fence_after_ms {FENCE_AFTER_MS}, heartbeat_interval_ms {INTERVAL_MS})"
    );
    // Not before its time: the last beat the server saw was sent at most one interval (plus
    // its own round trip) before the partition.
    assert!(
        stopped + Duration::from_millis(INTERVAL_MS + 100) >= Duration::from_millis(FENCE_AFTER_MS),
        "fenced too early: {stopped:?}"
    );
    // No beat got through during the partition.
    assert_eq!(x.beat_seq(), Some(seq_at_partition));
    let text = log(&d);
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
        !log(&d)
            .lines()
            .any(|l| l.contains("FENCE:") && l.contains(&y_mnt)),
        "the healthy mount was fenced:\n{}",
        log(&d)
    );
    let held = list(&d);
    assert!(held.contains(&o.to_string_lossy().into_owned()), "{held:?}");
    // Each VM is fenced once.
    let fences = log(&d).matches("FENCE:").count();
    assert_eq!(fences, 3, "one FENCE line per VM:\n{}", log(&d));

    // Heal: the paused VM's lock is still ours; it stays stopped until an operator acts.
    x.set("");
    wait_for(&d, BOUND, "the re-check after the heal", || {
        log(&d).contains("is still held after the storage behind mount")
    });
    assert!(log(&d).contains("answers again"), "{}", log(&d));
    assert_eq!(
        qp.state(),
        Some('T'),
        "the paused VM was resumed by lockwardend"
    );
    beats_reach(&d, &x, seq_at_partition, 2);
    assert_eq!(qp.state(), Some('T'));
    assert!(lost(&d).is_empty(), "nothing was lost: {:?}", lost(&d));
    assert_eq!(log(&d).matches("FENCE:").count(), 3, "no second fence");
    drop(qi);
}

/// A lock lost while the storage did not answer: the paused VM is killed once the storage
/// answers again (another host may have written to the disk), and the loss is recorded.
#[test]
fn a_lock_lost_during_the_partition_kills_the_paused_vm() {
    prerequisites();
    let d = daemon();
    let x = Fs::mount();
    let mut q = Qemu::spawn();
    let o = owner("vm-paused-lost", &q);
    let p = x.image("lost.img");
    acquire(&d, &o, &p, FailureAction::Pause);
    beats_reach(&d, &x, 0, 1);
    x.set("hang 1\n");
    let t0 = Instant::now();
    wait_for(
        &d,
        Duration::from_millis(FENCE_AFTER_MS) + BOUND,
        "the paused VM stopped",
        || q.state() == Some('T'),
    );
    // The storage lost the lock meanwhile, then answers again.
    x.set("hang 1\nlost lost.img\n");
    x.set("lost lost.img\n");
    let st = loop {
        if let Some(st) = q.exited() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", log(&d));
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{st:?}");
    let text = log(&d);
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
    let q = Qemu::spawn();
    let o = owner("vm-fallback", &q);
    let p = x.image("fallback.img");
    acquire(&d, &o, &p, FailureAction::Pause);
    wait_for(&d, BOUND, "the fallback beat", || {
        log(&d).contains("no heartbeat file on mount")
    });
    assert!(
        x.heartbeat().is_none(),
        "a heartbeat file in a 0777 directory"
    );
    assert_eq!(
        log(&d).matches("no heartbeat file on mount").count(),
        1,
        "logged once"
    );
    x.set("hang 1\n");
    let t0 = Instant::now();
    wait_for(
        &d,
        Duration::from_millis(FENCE_AFTER_MS) + BOUND,
        "the paused VM stopped",
        || q.state() == Some('T'),
    );
    eprintln!("fallback beat: partition to SIGSTOP {:?}", t0.elapsed());
    x.set("");
    wait_for(&d, BOUND, "the re-check after the heal", || {
        log(&d).contains("is still held after the storage behind mount")
    });
    assert_eq!(q.state(), Some('T'));
    assert!(lost(&d).is_empty());
    assert_eq!(list(&d), vec![p.to_string_lossy().into_owned()]);
}
