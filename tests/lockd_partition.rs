//! A REPORT, not a check (issue 15: "the same simulated partition against lockd.so + virtlockd
//! goes in the report (expect a violation), not into a failing test"): Debian's lockd.so +
//! virtlockd on the simulated lease server of tests/partition.rs. Ignored by default; run it
//! with
//!
//!     cargo test --test lockd_partition -- --ignored --nocapture
//!
//! (root, /dev/fuse, Debian's libvirt lock driver and virtlockd). Two virtlockd daemons are
//! host A and host B, each in its own mount namespace (the benchmark's harness,
//! benches/lockcycle/procs.rs), each driven through lockd.so by the C test host
//! (tests/c/host.c); their disks are one image on two mounts of one backing directory
//! (tests/fusefs/testfs.rs), A's mount a client with a `lease_ms` lease. A starts a VM and
//! takes its disk, A's mount is partitioned, and B tries to take the disk every 50 ms. The
//! test prints whether and when B got it while A's VM process was still runnable, and passes
//! either way: what it reports is lockd's behaviour, documented in docs/storage.md.

#[allow(dead_code)]
#[path = "../benches/lockcycle/procs.rs"]
mod procs;

mod common;

use common::fuse::Testfs;
use procs::{Artefacts, Daemon, Host, Side, Vm, disk_token};
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const LEASE_MS: u64 = 1000;
const PARTITION_MS: u64 = 3000;

/// Runnable: present, neither stopped nor a zombie.
fn runnable(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim().chars().next()))
        .flatten()
        .is_some_and(|c| !matches!(c, 'T' | 't' | 'Z' | 'X'))
}

#[test]
#[ignore = "a report on lockd.so + virtlockd (issue 15), not a check of lockwarden: run with --ignored"]
fn lockd_under_a_simulated_partition_report() {
    common::fuse::prerequisites("tests/lockd_partition.rs");
    let root = tempfile::Builder::new()
        .prefix("lw-lockd-part")
        .tempdir()
        .unwrap();
    let a = Artefacts::find(root.path()).unwrap_or_else(|e| panic!("{e}"));
    let backing = root.path().join("export");
    fs::create_dir(&backing).unwrap();
    fs::write(backing.join("disk.img"), vec![0u8; 4096]).unwrap();
    let mount = |name: &str| -> (Testfs, PathBuf) {
        let d = root.path().join(name);
        fs::create_dir(&d).unwrap();
        let mnt = d.join("mnt");
        fs::create_dir(&mnt).unwrap();
        let t = Testfs::mount(
            &backing,
            &mnt,
            &d.join("control"),
            &d.join("events"),
            Duration::from_secs(20),
        );
        (t, mnt)
    };
    let (fa, mnt_a) = mount("host-a");
    let (fb, mnt_b) = mount("host-b");
    let lease = format!("lease_ms {LEASE_MS}\n");
    fa.set(&lease);
    // The daemons and hosts are started after the mounts, so their namespaces have them.
    let da = Daemon::virtlockd(&root.path().join("virtlockd-a")).unwrap_or_else(|e| panic!("{e}"));
    let db = Daemon::virtlockd(&root.path().join("virtlockd-b")).unwrap_or_else(|e| panic!("{e}"));
    let mut ha = Host::spawn(&a, &da, &root.path().join("host-a.log")).unwrap();
    let mut hb = Host::spawn(&a, &db, &root.path().join("host-b.log")).unwrap();
    let (disk_a, disk_b) = (
        disk_token(&mnt_a.join("disk.img")),
        disk_token(&mnt_b.join("disk.img")),
    );

    // Host A runs the VM with the disk; host B is refused while A holds it.
    let vm_a = Vm::new(Side::Lockd, "part-a");
    let pid_a = ha.start(&vm_a, "").unwrap();
    ha.acquire(&vm_a, pid_a, &disk_a)
        .unwrap_or_else(|e| panic!("host A cannot take its disk: {e}"));
    let vm_b = Vm::new(Side::Lockd, "part-b");
    let pid_b = hb.start(&vm_b, "").unwrap();
    let before = hb.acquire(&vm_b, pid_b, &disk_b);
    assert!(
        before.is_err(),
        "host B got the disk while A held it and nothing was partitioned: the setup is wrong"
    );
    eprintln!(
        "before the partition: host B refused: {}",
        before.unwrap_err()
    );

    // Partition host A's mount; B keeps trying.
    fa.set(&format!("{lease}hang 1\n"));
    let t0 = Instant::now();
    let mut got: Option<(Duration, bool)> = None;
    let mut tries = 0;
    while t0.elapsed() < Duration::from_millis(PARTITION_MS) {
        tries += 1;
        if hb.acquire(&vm_b, pid_b, &disk_b).is_ok() {
            got = Some((t0.elapsed(), runnable(pid_a)));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let a_runs_in_partition = runnable(pid_a);
    fa.set(&lease);
    std::thread::sleep(Duration::from_millis(500));
    let a_runs_after_heal = runnable(pid_a);
    let expired = fa
        .events()
        .lines()
        .find(|l| l.starts_with("expire ") && !l.starts_with("expire 0 "))
        .map(str::to_string);
    match got {
        Some((at, a_runs)) => eprintln!(
            "RESULT lockd.so + virtlockd: host B was GRANTED the disk {} ms after host A's mount \
             was partitioned (simulated lease {LEASE_MS} ms, {tries} tries); host A's VM (pid \
             {pid_a}) was {} at that moment, {} at the end of the partition and {} 500 ms after \
             the heal; {} — {}",
            at.as_millis(),
            if a_runs { "RUNNABLE" } else { "stopped" },
            if a_runs_in_partition {
                "runnable"
            } else {
                "stopped"
            },
            if a_runs_after_heal {
                "runnable"
            } else {
                "stopped"
            },
            expired.as_deref().unwrap_or("no lease expiry logged"),
            if a_runs {
                "a VIOLATION of \"B never holds a disk while A's VM on it is runnable\""
            } else {
                "no violation"
            }
        ),
        None => eprintln!(
            "RESULT lockd.so + virtlockd: host B did not get the disk within {PARTITION_MS} ms \
             of the partition ({tries} tries); host A's VM runnable: {a_runs_in_partition}"
        ),
    }
    drop(ha);
    drop(hb);
    drop(da);
    drop(db);
    drop(fa);
    drop(fb);
}
