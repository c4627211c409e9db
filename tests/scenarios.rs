//! End-to-end scenarios of issue 2 ("Tests that must exist"), driving the real `liblockwarden.so`
//! through the C test host (which loads it as libvirt does) against real `lockwardend` daemons.
//! A second daemon with other sockets over the same image directory stands for a second host.
//!
//! Every wait is a poll with a generous bound; measured delays are printed with `eprintln!`
//! (run with `--nocapture` to see them).

mod common;

use common::daemon::TestDaemon;
use common::wait::{poll, poll_every, wait_until};
use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Not a test: the body of the helper process (see `common::Helper`). Does nothing unless this
/// binary was re-executed by the harness with `LW_SCENARIO_HELPER=1`.
#[test]
#[ignore = "helper process for the scenarios, started by the harness"]
fn helper_process() {
    if std::env::var_os(HELPER_ENV).is_some() {
        helper_main();
    }
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Two hosts sharing storage: two daemons, a C host (the plugin) on each, and a directory
/// for the images both see.
fn two_hosts() -> (TestDaemon, TestDaemon, Host, Host, tempfile::TempDir) {
    let d1 = TestDaemon::verbose("");
    let d2 = TestDaemon::verbose("");
    let h1 = d1.host();
    let h2 = d2.host();
    (d1, d2, h1, h2, tempdir())
}

// 1 ------------------------------------------------------------------------------------------

#[test]
fn exclusive_disk_refused_on_same_and_second_daemon() {
    let (_d1, _d2, mut h1, mut h2, images) = two_hosts();
    let img = image(images.path(), "exclusive.img");

    let a = h1.start("holder");
    h1.acquire(&a, &[disk(&img)])
        .expect_ok("owner A acquires the disk");
    assert_eq!(
        probe0(&img),
        Probe::WriteLocked,
        "an exclusive lease must be an F_WRLCK on byte 0 of {}",
        img.display()
    );

    // Same daemon.
    let b = h1.start("intruder");
    let r = h1.acquire(&b, &[disk(&img)]);
    let msg = r.expect_busy("second owner on the same daemon");
    assert!(
        msg.contains(&img.display().to_string()),
        "the refusal must name the disk {}: {msg}",
        img.display()
    );
    assert!(
        msg.contains(&a.name),
        "on the same daemon the refusal must name the holder VM {}: {msg}",
        a.name
    );
    eprintln!("same-daemon refusal: {msg}");

    // Second daemon ("another host").
    let c = h2.start("remote");
    let r = h2.acquire(&c, &[disk(&img)]);
    let msg = r.expect_busy("owner on a second daemon");
    assert!(
        msg.contains(&img.display().to_string()),
        "the refusal from the second daemon must name the disk {}: {msg}",
        img.display()
    );
    eprintln!("second-daemon refusal: {msg}");

    // A release by owners that do not hold the disk succeeds and frees nothing.
    h1.release(&b, &[disk(&img)])
        .expect_ok("release by a non-holder on the same daemon");
    h2.release(&c, &[disk(&img)])
        .expect_ok("release by a non-holder on the other daemon");
    assert_eq!(
        probe0(&img),
        Probe::WriteLocked,
        "a release by a VM that does not hold the disk must not free the holder's lease"
    );
    h2.acquire(&c, &[disk(&img)])
        .expect_busy("still held by A after foreign releases");

    // The refused owners hold nothing: once A releases, C gets it.
    h1.release(&a, &[disk(&img)]).expect_ok("A releases");
    assert_eq!(
        probe0(&img),
        Probe::Unlocked,
        "released disk must be unlocked"
    );
    h2.acquire(&c, &[disk(&img)])
        .expect_ok("C acquires after A released");
}

// 2 ------------------------------------------------------------------------------------------

#[test]
fn shared_readonly_and_exclusive_modes() {
    let (d1, _d2, mut h1, mut h2, images) = two_hosts();

    // shared + shared on both daemons.
    let sh = image(images.path(), "shared.img");
    let a = h1.start("sh-a");
    let b = h2.start("sh-b");
    let c = h1.start("sh-c");
    h1.acquire(&a, &[disk_shared(&sh)])
        .expect_ok("first shared owner (daemon 1)");
    assert_eq!(
        probe0(&sh),
        Probe::ReadLocked,
        "shared lease = F_RDLCK byte 0"
    );
    h2.acquire(&b, &[disk_shared(&sh)])
        .expect_ok("second shared owner on daemon 2");
    h1.acquire(&c, &[disk_shared(&sh)])
        .expect_ok("third shared owner on daemon 1");

    // The shared lock stays while any local shared owner holds it.
    h1.release(&a, &[disk_shared(&sh)])
        .expect_ok("one shared owner releases");
    assert_eq!(
        probe0(&sh),
        Probe::ReadLocked,
        "the shared lock must stay while another owner of the same daemon still shares the disk"
    );
    h1.acquire(&a, &[disk_shared(&sh)])
        .expect_ok("shared again");

    // exclusive vs shared refused (both daemons).
    let x1 = h1.start("ex-1");
    let x2 = h2.start("ex-2");
    h1.acquire(&x1, &[disk(&sh)])
        .expect_busy("exclusive under shared holders (same daemon)");
    h2.acquire(&x2, &[disk(&sh)])
        .expect_busy("exclusive under shared holders (other daemon)");

    // shared vs exclusive refused.
    let ex = image(images.path(), "exclusive.img");
    h1.acquire(&x1, &[disk(&ex)]).expect_ok("exclusive owner");
    h2.acquire(&b, &[disk_shared(&ex)])
        .expect_busy("shared under an exclusive holder (other daemon)");
    h1.acquire(&a, &[disk_shared(&ex)])
        .expect_busy("shared under an exclusive holder (same daemon)");

    // read-only vs writer, default readonly_disks = "shared".
    let ro = image(images.path(), "readonly.img");
    h1.acquire(&a, &[disk_ro(&ro)]).expect_ok("read-only owner");
    assert_eq!(
        probe0(&ro),
        Probe::ReadLocked,
        "with readonly_disks=shared a read-only disk takes F_RDLCK on byte 0"
    );
    h2.acquire(&x2, &[disk(&ro)])
        .expect_busy("writer under a read-only holder (other daemon)");
    h1.acquire(&x1, &[disk(&ro)])
        .expect_busy("writer under a read-only holder (same daemon)");
    h2.acquire(&b, &[disk_ro(&ro)])
        .expect_ok("two read-only owners coexist");
    // ...and the other way round: read-only under a writer.
    let w = image(images.path(), "written.img");
    h2.acquire(&x2, &[disk(&w)]).expect_ok("writer");
    h1.acquire(&a, &[disk_ro(&w)])
        .expect_busy("read-only under a writer (other daemon)");

    // readonly_disks = "ignore": a read-only disk takes no lock at all.
    let mut hi = d1.host_with("readonly_disks = \"ignore\"");
    let ign = image(images.path(), "ignored.img");
    let r = hi.start("ro-ignored");
    hi.acquire(&r, &[disk_ro(&ign)])
        .expect_ok("read-only owner with readonly_disks=ignore");
    assert_eq!(
        probe0(&ign),
        Probe::Unlocked,
        "with readonly_disks=ignore a read-only disk must take no lock"
    );
    h2.acquire(&x2, &[disk(&ign)])
        .expect_ok("a writer may start beside an ignored read-only disk");
}

// 3 ------------------------------------------------------------------------------------------

#[test]
fn sixteen_disks_all_or_nothing() {
    let (_d1, _d2, mut h1, mut h2, images) = two_hosts();
    let disks: Vec<_> = (0..16)
        .map(|i| image(images.path(), &format!("disk{i:02}.img")))
        .collect();
    let res: Vec<String> = disks.iter().map(|p| disk(p)).collect();
    let ninth = &disks[8];

    let x = h2.start("holds-9th");
    h2.acquire(&x, &[disk(ninth)])
        .expect_ok("the 9th disk is held on daemon 2");

    let y = h1.start("sixteen");
    let msg = h1.acquire(&y, &res).expect_busy("16-disk owner");
    assert!(
        msg.contains(&ninth.display().to_string()),
        "the refusal must name the busy 9th disk {}: {msg}",
        ninth.display()
    );
    for (i, p) in disks.iter().enumerate() {
        if i != 8 {
            assert_eq!(
                probe0(p),
                Probe::Unlocked,
                "disk {i} ({}) stayed locked after a refused all-or-nothing acquire",
                p.display()
            );
        }
    }

    // The same with the 9th disk held by another owner of the same daemon.
    let nine = h1.start("holds-9th-locally");
    h2.release(&x, &[disk(ninth)])
        .expect_ok("release 9th on daemon 2");
    h1.acquire(&nine, &[disk(ninth)])
        .expect_ok("the 9th disk is held on daemon 1");
    h1.acquire(&y, &res)
        .expect_busy("16-disk owner, 9th held on the same daemon");
    for (i, p) in disks.iter().enumerate() {
        if i != 8 {
            assert_eq!(
                probe0(p),
                Probe::Unlocked,
                "disk {i} ({}) stayed locked after a refused all-or-nothing acquire (same daemon)",
                p.display()
            );
        }
    }
    h1.release(&nine, &[disk(ninth)])
        .expect_ok("release 9th on daemon 1");
    h2.acquire(&x, &[disk(ninth)])
        .expect_ok("9th back on daemon 2");

    // From the other daemon: once the 9th is released, a third owner gets all 16.
    h2.release(&x, &[disk(ninth)]).expect_ok("release 9th");
    let z = h2.start("third");
    h2.acquire(&z, &res)
        .expect_ok("a third owner on daemon 2 acquires all 16 disks: nothing stayed locked");
    // And the refused owner is not registered as holding anything on daemon 1: it is now refused
    // because of z, not of itself.
    h1.acquire(&y, &res)
        .expect_busy("16-disk owner while daemon 2 holds all 16");
}

// 4 ------------------------------------------------------------------------------------------

#[test]
fn sigkilled_owner_frees_its_leases() {
    let (_d1, _d2, mut h1, mut h2, images) = two_hosts();
    let img = image(images.path(), "victim.img");
    let img2 = image(images.path(), "victim2.img");

    let a = h1.start("doomed");
    h1.acquire(&a, &[disk(&img), disk(&img2)])
        .expect_ok("owner acquires");
    let b = h2.start("successor");
    h2.acquire(&b, &[disk(&img)])
        .expect_busy("held before the kill");

    // A shared lease of the doomed owner that another local owner also holds must survive.
    let sh = image(images.path(), "victim-shared.img");
    let keeper = h1.start("keeper");
    h1.acquire(&a, &[disk_shared(&sh)])
        .expect_ok("shared (doomed)");
    h1.acquire(&keeper, &[disk_shared(&sh)])
        .expect_ok("shared (keeper)");

    let t0 = Instant::now();
    h1.kill(a.pid, 9);
    wait_until(
        "the leases of a SIGKILLed owner are free for daemon 2",
        POLL_BOUND,
        || h2.acquire(&b, &[disk(&img), disk(&img2)]).is_ok(),
    );
    let delay = t0.elapsed();
    eprintln!("MEASURED: SIGKILL of owner -> its leases acquired on daemon 2 after {delay:?}");
    assert!(!h1.alive(a.pid), "the killed owner is dead");
    assert_eq!(
        probe0(&sh),
        Probe::ReadLocked,
        "the shared lease of the surviving owner must stay after the other sharer died"
    );
    h2.acquire(&b, &[disk(&sh)])
        .expect_busy("exclusive while the keeper still shares the disk");
}

// 5 ------------------------------------------------------------------------------------------

#[test]
fn owner_closing_handle_while_holding_is_terminated() {
    let d1 = TestDaemon::verbose("");
    let mut h1 = d1.host();
    let images = tempdir();
    let img = image(images.path(), "handle.img");

    // An owner with leases that closes its lifetime handle while alive.
    let (mut owner, vm) = Helper::registered(&d1.socket, "closer", false);
    h1.acquire(&vm, &[disk(&img)])
        .expect_ok("leases for the helper owner");
    assert_eq!(probe0(&img), Probe::WriteLocked, "lease taken");

    // A control owner without leases that also closes its handle: must survive.
    let (mut idle, idle_vm) = Helper::registered(&d1.socket, "idle", false);

    let t0 = Instant::now();
    assert_eq!(owner.cmd("close"), "OK");
    assert_eq!(idle.cmd("close"), "OK");
    let status = poll(POLL_BOUND, || owner.try_wait().map(|st| (st, t0.elapsed())));
    let ((st, delay), _) = status.unwrap_or_else(|| {
        panic!(
            "an owner that closed its lifetime handle while holding a lease still runs after {POLL_BOUND:?}"
        )
    });
    eprintln!("MEASURED: handle closed -> holding owner terminated after {delay:?} ({st})");
    assert!(
        matches!(st.signal(), Some(libc::SIGTERM) | Some(libc::SIGKILL)),
        "the owner must be terminated by SIGTERM/SIGKILL, got {st}"
    );
    let freed = wait_unlocked(&img, POLL_BOUND).expect("the lease is released");
    eprintln!(
        "MEASURED: lease free {freed:?} after the owner was reaped (whether it stayed held until \
         then is checked by lease_outlives_its_owner_process)"
    );

    // The idle owner held nothing; it must not have been killed. The daemon logs its decision
    // when it sees the handle close (a kill would be decided in that same step): after that
    // line, the owner still runs and answers a command.
    d1.wait_log(&format!(
        "lifetime handle of VM {:?} (pid {}) closed; it held no leases",
        idle_vm.name, idle_vm.pid
    ));
    // A kill sequence would SIGTERM only after a settle time: a later sequence reaching its
    // SIGTERM proves one for the idle owner would have by then.
    common::proto::after_pending_kills(&d1.socket, &image(images.path(), "witness.img"), || {
        fs::read_to_string(&d1.log).unwrap_or_default()
    });
    assert!(
        !fs::read_to_string(&d1.log)
            .unwrap_or_default()
            .contains(&format!("(pid {}) still runs", idle_vm.pid)),
        "the idle owner was put in a kill sequence"
    );
    assert!(
        idle.try_wait().is_none(),
        "an owner that held no lease must not be killed when its handle closes"
    );
    assert!(
        idle.cmd("pid").starts_with("OK"),
        "idle owner still answers"
    );
}

/// A daemon with kill_grace_ms = 700, its host, and a helper owner that ignores SIGTERM and
/// holds `stubborn.img` (in the returned directory).
fn stubborn_owner_with_a_lease() -> (TestDaemon, Host, tempfile::TempDir, Helper) {
    let d1 = TestDaemon::verbose("kill_grace_ms = 700");
    let mut h1 = d1.host();
    let images = tempdir();
    let img = image(images.path(), "stubborn.img");

    let (owner, vm) = Helper::registered(&d1.socket, "stubborn", true);
    h1.acquire(&vm, &[disk(&img)])
        .expect_ok("lease for the owner");
    (d1, h1, images, owner)
}

#[test]
fn owner_ignoring_sigterm_is_sigkilled_after_grace() {
    let (_d1, _h1, images, mut owner) = stubborn_owner_with_a_lease();
    let img = images.path().join("stubborn.img");

    let t0 = Instant::now();
    assert_eq!(owner.cmd("close"), "OK");
    let mut freed_while_alive: Option<Duration> = None;
    let status = poll_every(Duration::from_millis(2), POLL_BOUND, || {
        let free = probe0(&img) == Probe::Unlocked;
        let st = owner.try_wait();
        if st.is_none() && free && freed_while_alive.is_none() {
            freed_while_alive = Some(t0.elapsed());
        }
        st.map(|st| (st, t0.elapsed()))
    });
    let ((st, delay), _) = status.unwrap_or_else(|| {
        panic!("an owner ignoring SIGTERM still runs {POLL_BOUND:?} after its handle closed")
    });
    eprintln!(
        "MEASURED: SIGTERM-ignoring owner died after {delay:?} ({st}), kill_grace_ms = 700; \
         its lease was free while it still ran from {freed_while_alive:?} on"
    );
    assert_eq!(
        st.signal(),
        Some(libc::SIGKILL),
        "an owner ignoring SIGTERM must be SIGKILLed, got {st}"
    );
    assert!(
        delay >= Duration::from_millis(600),
        "SIGKILL came before the grace period: {delay:?}"
    );
}

/// Design §3: "a VM must never run on a disk it no longer holds". An owner whose handle closed
/// while it still runs (here: ignoring SIGTERM for the grace period) must keep its leases until
/// it is dead; otherwise another host can start the same VM while the old one still writes.
#[test]
fn lease_outlives_its_owner_process() {
    let (_d1, _h1, images, mut owner) = stubborn_owner_with_a_lease();
    let img = images.path().join("stubborn.img");

    let t0 = Instant::now();
    assert_eq!(owner.cmd("close"), "OK");
    // Whichever comes first: the owner dies (Ok) or its lease is free while it runs (Err).
    let first = poll_every(Duration::from_millis(2), POLL_BOUND, || {
        let free = probe0(&img) == Probe::Unlocked;
        if owner.try_wait().is_some() {
            Some(Ok(t0.elapsed()))
        } else {
            free.then(|| Err(t0.elapsed()))
        }
    })
    .map(|(first, _)| first);
    let died = first.and_then(Result::ok);
    let freed_while_alive = first.and_then(Result::err);
    assert!(
        freed_while_alive.is_none(),
        "docs/interfaces.md §3: a VM must never run on a disk it no longer holds, but the lease on {} was \
         free {:?} after the handle closed while the owner still ran",
        img.display(),
        freed_while_alive
    );
    assert!(died.is_some(), "the owner died within {POLL_BOUND:?}");
    let freed = wait_unlocked(&img, POLL_BOUND).expect("lease freed once the owner died");
    eprintln!("MEASURED: owner died {died:?} after its handle closed; lease free {freed:?} later");
}

// 6 ------------------------------------------------------------------------------------------

#[test]
fn two_paths_to_one_image_are_one_lease() {
    let (_d1, _d2, mut h1, mut h2, images) = two_hosts();
    let img = image(images.path(), "real.img");
    let sym = images.path().join("symlink.img");
    std::os::unix::fs::symlink(&img, &sym).expect("symlink");
    let hard = images.path().join("hardlink.img");
    fs::hard_link(&img, &hard).expect("hard link");

    let a = h1.start("path-a");
    h1.acquire(&a, &[disk(&img)])
        .expect_ok("A via the real path");
    let b = h1.start("path-b");
    h1.acquire(&b, &[disk(&sym)])
        .expect_busy("B via the symlink on the same daemon");
    h1.acquire(&b, &[disk(&hard)])
        .expect_busy("B via the hard link on the same daemon");
    let c = h2.start("path-c");
    h2.acquire(&c, &[disk(&sym)])
        .expect_busy("C via the symlink on another daemon");
    h2.acquire(&c, &[disk(&hard)])
        .expect_busy("C via the hard link on another daemon");

    // The holder may name the same image by every path.
    h1.acquire(&a, &[disk(&sym)])
        .expect_ok("A again via the symlink");
    h1.acquire(&a, &[disk(&hard)])
        .expect_ok("A again via the hard link");
    h1.acquire(&a, &[disk(&img), disk(&sym), disk(&hard)])
        .expect_ok("A with all three paths in one call");

    // One lease: releasing it under another path than the one it was taken by frees it.
    h1.release(&a, &[disk(&sym)])
        .expect_ok("A releases via the symlink");
    assert_eq!(
        probe0(&img),
        Probe::Unlocked,
        "releasing the image via the symlink must free the one lease it is"
    );
    h2.acquire(&c, &[disk(&hard)])
        .expect_ok("C via the hard link once A released");

    // A fresh owner naming one image by two paths in one call is fine too.
    let other = image(images.path(), "other.img");
    let other_sym = images.path().join("other-link.img");
    std::os::unix::fs::symlink(&other, &other_sym).expect("symlink");
    let e = h2.start("path-e");
    h2.acquire(&e, &[disk(&other), disk(&other_sym)])
        .expect_ok("one owner, two paths of one image, one call");
}

// 7 ------------------------------------------------------------------------------------------

#[test]
fn lockspace_dir_naming_mode_and_symlink_refusal() {
    let d1 = TestDaemon::verbose("");
    let d2 = TestDaemon::verbose("");
    let images = tempdir();
    let lockspace = images.path().join("lockspace");
    fs::create_dir(&lockspace).expect("mkdir lockspace");
    let extra = format!("file_lockspace_dir = \"{}\"", lockspace.display());
    let mut h1 = d1.host_with(&extra);
    let mut h2 = d2.host_with(&extra);

    let img = image(images.path(), "indirect.img");
    let name = sha256_hex(&img.display().to_string());
    let lockfile = lockspace.join(&name);

    let a = h1.start("ls-a");
    h1.acquire(&a, &[disk(&img)])
        .expect_ok("acquire in lockspace mode");
    assert!(
        lockfile.is_file(),
        "lock file {} (sha256 of {:?}) must exist; lockspace holds {:?}",
        lockfile.display(),
        img,
        fs::read_dir(&lockspace)
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
            .unwrap_or_default()
    );
    assert_eq!(mode_of(&lockfile), 0o600, "lock file mode must be 0600");
    assert_eq!(
        probe0(&lockfile),
        Probe::WriteLocked,
        "the lock file is write-locked on byte 0"
    );
    assert_eq!(
        probe0(&img),
        Probe::Unlocked,
        "in lockspace mode the image itself is not locked"
    );
    let b = h2.start("ls-b");
    let msg = h2
        .acquire(&b, &[disk(&img)])
        .expect_busy("lockspace mode across daemons");
    assert!(
        msg.contains(&img.display().to_string()),
        "refusal names the disk: {msg}"
    );

    // A symlink planted at the lock file name is never followed: dangling target.
    let outside = tempdir();
    let img2 = image(images.path(), "planted.img");
    let planted = lockspace.join(sha256_hex(&img2.display().to_string()));
    let target = outside.path().join("should-not-exist");
    std::os::unix::fs::symlink(&target, &planted).expect("plant symlink");
    let r = h1.acquire(&a, &[disk(&img2)]);
    let (code, domain, msg) = r.expect_err("acquire through a planted dangling symlink");
    eprintln!("planted dangling symlink refused: ERR {code} {domain} {msg}");
    assert!(
        !target.exists(),
        "the planted symlink was followed: {} was created",
        target.display()
    );

    // ... and an existing target: not locked, not modified.
    let img3 = image(images.path(), "planted2.img");
    let planted3 = lockspace.join(sha256_hex(&img3.display().to_string()));
    let target3 = outside.path().join("victim");
    fs::write(&target3, b"precious").expect("write victim");
    chmod(&target3, 0o644);
    std::os::unix::fs::symlink(&target3, &planted3).expect("plant symlink");
    let r = h1.acquire(&a, &[disk(&img3)]);
    let (code, domain, msg) = r.expect_err("acquire through a planted symlink to a file");
    eprintln!("planted symlink refused: ERR {code} {domain} {msg}");
    assert_eq!(
        probe0(&target3),
        Probe::Unlocked,
        "the symlink target must not be locked"
    );
    assert_eq!(fs::read(&target3).expect("read victim"), b"precious");
    assert_eq!(mode_of(&target3), 0o644, "symlink target mode unchanged");
    assert!(
        fs::symlink_metadata(&planted3)
            .expect("planted symlink still there")
            .file_type()
            .is_symlink(),
        "the planted symlink is left as it is"
    );
    // The refused call leaves A's other lease intact.
    assert_eq!(probe0(&lockfile), Probe::WriteLocked, "A's lease survives");
}

// 8 ------------------------------------------------------------------------------------------

#[test]
fn posix_lock_interop_and_qemu_bytes_untouched() {
    let d1 = TestDaemon::verbose("");
    let mut h1 = d1.host();
    let images = tempdir();
    let img = image(images.path(), "interop.img");

    // A foreign process (stands for virtlockd on another host) holds POSIX F_WRLCK on byte 0.
    let mut foreign = Helper::spawn(None);
    assert_eq!(
        foreign.cmd(&format!("posix-lock {}", esc_path(&img))),
        "OK",
        "foreign POSIX lock"
    );
    let a = h1.start("interop");
    let msg = h1
        .acquire(&a, &[disk(&img)])
        .expect_busy("acquire under a foreign POSIX lock");
    assert!(
        msg.contains(&img.display().to_string()),
        "refusal names the disk: {msg}"
    );
    eprintln!("refusal under a foreign POSIX lock: {msg}");
    assert_eq!(
        foreign.cmd(&format!("posix-unlock {}", esc_path(&img))),
        "OK"
    );
    h1.acquire(&a, &[disk(&img)])
        .expect_ok("acquire once the foreign lock is gone");

    // Now the lease blocks a foreign F_SETLK.
    let r = foreign.cmd(&format!("posix-lock {}", esc_path(&img)));
    assert!(
        r.starts_with(&format!("ERR {} ", libc::EAGAIN))
            || r.starts_with(&format!("ERR {} ", libc::EACCES)),
        "a POSIX F_SETLK F_WRLCK on byte 0 under a lease must fail with EAGAIN/EACCES, got {r}"
    );

    // QEMU's own byte ranges are never touched, for exclusive and shared leases alike.
    for (start, len) in [(100, 5), (200, 5), (1, 99)] {
        assert_eq!(
            probe(&img, start, len),
            Probe::Unlocked,
            "an exclusive lease touched bytes {start}..{}",
            start + len
        );
    }
    let sh = image(images.path(), "interop-shared.img");
    h1.acquire(&a, &[disk_shared(&sh)])
        .expect_ok("shared lease");
    for (start, len) in [(100, 5), (200, 5)] {
        assert_eq!(
            probe(&sh, start, len),
            Probe::Unlocked,
            "a shared lease touched bytes {start}..{}",
            start + len
        );
    }
    assert_eq!(probe0(&sh), Probe::ReadLocked);
}

// 9 ------------------------------------------------------------------------------------------

#[test]
fn libvirt_call_patterns() {
    let images = tempdir();
    // <lease> files may only live under lease_dir (docs/hardening.md).
    let lease_dir = format!("lease_dir = \"{}\"", images.path().display());
    let d1 = TestDaemon::verbose(&lease_dir);
    let d2 = TestDaemon::verbose(&lease_dir);
    let mut h1 = d1.host();
    let mut h2 = d2.host();

    // A VM without disks.
    let empty = h1.start("no-disks");
    h1.acquire(&empty, &[])
        .expect_ok("acquire with no resources");
    h1.release(&empty, &[])
        .expect_ok("release with no resources");
    h1.inquire(&empty, &[])
        .expect_ok("inquire with no resources");

    // Release twice.
    let d = image(images.path(), "twice.img");
    let vm = h1.start("twice");
    h1.acquire(&vm, &[disk(&d)]).expect_ok("acquire");
    h1.release(&vm, &[disk(&d)]).expect_ok("first release");
    assert_eq!(probe0(&d), Probe::Unlocked, "released");
    h1.release(&vm, &[disk(&d)])
        .expect_ok("second release is a no-op");
    // Acquire twice is fine too.
    h1.acquire(&vm, &[disk(&d)]).expect_ok("acquire");
    h1.acquire(&vm, &[disk(&d)])
        .expect_ok("acquire of a held lease again");

    // Hot-plug one disk for an owner holding others, then unplug it.
    let base: Vec<_> = (0..3)
        .map(|i| image(images.path(), &format!("base{i}.img")))
        .collect();
    let hot = image(images.path(), "hotplug.img");
    let run = h1.start("hotplug");
    h1.acquire(&run, &base.iter().map(|p| disk(p)).collect::<Vec<_>>())
        .expect_ok("CPU start with 3 disks");
    h1.acquire(&run, &[disk(&hot)]).expect_ok("hot-plug");
    for p in base.iter().chain([&hot]) {
        assert_eq!(probe0(p), Probe::WriteLocked, "{} held", p.display());
    }
    // A refused hot-plug keeps what the owner already held and takes nothing new.
    let busy = image(images.path(), "hot-busy.img");
    let fresh = image(images.path(), "hot-fresh.img");
    let blocker = h2.start("hot-blocker");
    h2.acquire(&blocker, &[disk(&busy)]).expect_ok("blocker");
    h1.acquire(&run, &[disk(&fresh), disk(&busy)])
        .expect_busy("hot-plug of a busy disk");
    assert_eq!(
        probe0(&fresh),
        Probe::Unlocked,
        "a refused hot-plug must not keep the free disk of the same call"
    );
    for p in base.iter().chain([&hot]) {
        assert_eq!(
            probe0(p),
            Probe::WriteLocked,
            "a refused hot-plug must keep the owner's earlier disk {}",
            p.display()
        );
    }
    h1.release(&run, &[disk(&hot)]).expect_ok("unplug");
    assert_eq!(probe0(&hot), Probe::Unlocked, "unplugged disk freed");
    for p in &base {
        assert_eq!(
            probe0(p),
            Probe::WriteLocked,
            "unplugging one disk must keep {} locked",
            p.display()
        );
    }
    let other = h2.start("hot-other");
    h2.acquire(&other, &[disk(&hot)])
        .expect_ok("unplugged disk usable from another daemon");
    h2.release(&other, &[disk(&hot)]).expect_ok("release");

    // Paths with spaces and newlines.
    let weird_dir = images.path().join("dir with space");
    fs::create_dir(&weird_dir).expect("mkdir");
    let weird = image(&weird_dir, "new\nline image.img");
    let w = h1.start("weird");
    h1.acquire(&w, &[disk(&weird)])
        .expect_ok("path with space and newline");
    assert_eq!(probe0(&weird), Probe::WriteLocked, "weird path locked");
    let w2 = h2.start("weird-2");
    let msg = h2
        .acquire(&w2, &[disk(&weird)])
        .expect_busy("weird path from the other daemon");
    eprintln!("refusal for a path with a newline: {msg}");
    h1.release(&w, &[disk(&weird)]).expect_ok("release weird");
    assert_eq!(probe0(&weird), Probe::Unlocked, "weird path unlocked");
    // No log line may be forged by the newline in the path: nothing starts with its tail.
    let mut escaped_mentions = 0;
    for (what, log) in [
        ("daemon 1", &d1.log),
        ("daemon 2", &d2.log),
        ("host 1", &h1.log),
        ("host 2", &h2.log),
    ] {
        let text = fs::read_to_string(log).unwrap_or_default();
        for line in text.lines() {
            assert!(
                !line.starts_with("line image.img"),
                "{what} log wrote the newline of a path raw, forging a line: {line:?}"
            );
        }
        escaped_mentions += text.matches("new\\nline image.img").count();
    }
    eprintln!("log lines mentioning the newline path (escaped): {escaped_mentions}");
    assert!(
        escaped_mentions > 0,
        "the --verbose daemon logs should mention the acquired disk (escaped) at least once"
    );

    // Pause (release) then resume (acquire).
    let p = image(images.path(), "pause.img");
    let pv = h1.start("pauser");
    h1.acquire(&pv, &[disk(&p)]).expect_ok("CPU start");
    h1.release(&pv, &[disk(&p)]).expect_ok("pause");
    assert_eq!(probe0(&p), Probe::Unlocked, "paused VM holds nothing");
    h1.acquire(&pv, &[disk(&p)]).expect_ok("resume");
    assert_eq!(probe0(&p), Probe::WriteLocked, "resumed VM holds its disk");

    // <lease> resources.
    let leases = images.path().join("leases");
    fs::create_dir_all(leases.join("LS")).expect("mkdir leases/LS");
    let l = h1.start("leaser");
    h1.acquire(&l, &[lease("KEY1", &leases, 0, None)])
        .expect_ok("lease without lockspace");
    let key1 = leases.join("KEY1");
    assert!(key1.is_file(), "{} created", key1.display());
    assert_eq!(mode_of(&key1), 0o600, "lease file mode 0600");
    assert_eq!(probe0(&key1), Probe::WriteLocked, "lease locked at byte 0");
    h1.acquire(&l, &[lease("KEY2", &leases, 0, Some("LS"))])
        .expect_ok("lease with lockspace");
    let key2 = leases.join("LS").join("KEY2");
    assert!(key2.is_file(), "{} created", key2.display());
    assert_eq!(mode_of(&key2), 0o600, "lease file mode 0600");
    assert_eq!(probe0(&key2), Probe::WriteLocked, "lockspace lease locked");
    let l2 = h2.start("leaser-2");
    h2.acquire(&l2, &[lease("KEY1", &leases, 0, None)])
        .expect_busy("same lease from the other daemon");
    h2.acquire(&l2, &[lease("KEY2", &leases, 0, Some("LS"))])
        .expect_busy("same lockspace lease from the other daemon");
    h2.acquire(&l2, &[lease("KEY2", &leases, 0, None)])
        .expect_ok("KEY2 without the lockspace is another file");

    let (_, _, msg) = h1
        .acquire(&l, &[lease("OFF", &leases, 512, None)])
        .expect_err("lease with a non-zero offset");
    assert!(
        msg.to_lowercase().contains("offset"),
        "refusal of a non-zero offset says so: {msg}"
    );
    assert!(
        !leases.join("OFF").exists(),
        "a refused lease creates no file"
    );
    let missing = images.path().join("no-such-dir");
    let (_, _, msg) = h1
        .acquire(&l, &[lease("K", &missing, 0, None)])
        .expect_err("lease in a missing directory");
    assert!(
        msg.contains(&missing.display().to_string()),
        "refusal names the missing directory {}: {msg}",
        missing.display()
    );
    assert!(
        !missing.exists(),
        "the missing lease directory is not created"
    );
}

// 10 -----------------------------------------------------------------------------------------

const NOBODY: u32 = 65534;

#[test]
fn non_root_peer_refused() {
    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "this scenario needs root: the daemon must refuse a non-root peer"
    );
    let d1 = TestDaemon::verbose("");
    let images = tempdir();
    chmod(images.path(), 0o755);
    let img = image(images.path(), "root-only.img");
    chmod(&img, 0o666);
    let mut root_host = d1.host();
    let vm = root_host.start("root-owner");

    // (a) Default socket permissions: the non-root host gets an error, not a hang.
    let mut h = Host::spawn_as(&d1.plugin_conf(""), Some(NOBODY));
    if h.ready_line == "READY" {
        let mut v = Vm::new("nobody-a");
        let t0 = Instant::now();
        let r = h.try_start(&mut v, &[disk(&img)]);
        let (code, domain, msg) = r.expect_err("start as uid 65534 (socket 0600)");
        eprintln!(
            "non-root start refused in {:?}: ERR {code} {domain} {msg}",
            t0.elapsed()
        );
        let r = h.acquire(&vm, &[disk(&img)]);
        let (code, domain, msg) = r.expect_err("acquire as uid 65534 (socket 0600)");
        eprintln!("non-root acquire refused: ERR {code} {domain} {msg}");
    } else {
        eprintln!("non-root host refused at drvInit: {}", h.ready_line);
        assert!(h.ready_line.starts_with("ERR "), "{}", h.ready_line);
    }
    drop(h);

    // (b) Socket opened to everybody: the daemon's SO_PEERCRED check must refuse.
    d1.open_to_others();
    let mut h = Host::spawn_as(&d1.plugin_conf(""), Some(NOBODY));
    assert_eq!(h.ready_line, "READY", "non-root host loads the plugin");
    let mut v = Vm::new("nobody-b");
    let t0 = Instant::now();
    let r = h.try_start(&mut v, &[disk(&img)]);
    let (code, domain, msg) = r.expect_err("start as uid 65534 (socket 0777)");
    eprintln!(
        "SO_PEERCRED refusal of start in {:?}: ERR {code} {domain} {msg}",
        t0.elapsed()
    );
    let r = h.acquire(&vm, &[disk(&img)]);
    let (code, domain, msg) = r.expect_err("acquire as uid 65534 for a root owner");
    eprintln!("SO_PEERCRED refusal of acquire: ERR {code} {domain} {msg}");
    assert_eq!(
        probe0(&img),
        Probe::Unlocked,
        "nothing locked for a non-root peer"
    );

    // Same at protocol level: any request from uid 65534 is refused.
    let mut nob = Helper::spawn(Some(NOBODY));
    assert_eq!(nob.cmd(&format!("connect {}", esc_path(&d1.socket))), "OK");
    let r = nob.cmd("register nobody 00000000-0000-4000-8000-0000000000aa 7 0");
    assert!(
        !r.starts_with("OK"),
        "register from uid 65534 must be refused: {r}"
    );
    eprintln!("protocol-level non-root register: {r}");
    let _ = nob.cmd(&format!("connect {}", esc_path(&d1.socket)));
    let r = nob.cmd(&format!("acquire-self {}", esc_path(&img)));
    assert!(
        !r.starts_with("OK"),
        "acquire from uid 65534 must be refused: {r}"
    );
    assert_eq!(
        probe0(&img),
        Probe::Unlocked,
        "nothing locked for a non-root peer"
    );

    // The root owner is still fine.
    root_host
        .acquire(&vm, &[disk(&img)])
        .expect_ok("root owner unaffected");
}

#[test]
fn restricted_connection_refuses_every_request() {
    let d1 = TestDaemon::verbose("");
    let images = tempdir();
    let img = image(images.path(), "restricted.img");
    let (mut owner, vm) = Helper::registered(&d1.socket, "restricted", false);

    let r = owner.cmd(&format!("acquire-self {}", esc_path(&img)));
    assert!(
        r.starts_with("ERR \"denied\""),
        "acquire on a restricted connection must be refused (denied): {r}"
    );
    assert_eq!(
        probe0(&img),
        Probe::Unlocked,
        "nothing locked via a restricted connection"
    );
    for req in ["status", "list", "inquire"] {
        let r = owner.cmd(req);
        assert!(
            r.starts_with("ERR \"denied\""),
            "{req} on a restricted connection must be refused (denied): {r}"
        );
    }
    let r = owner.cmd(&format!(
        "register {} {} {} 0",
        esc(&vm.name),
        vm.uuid,
        vm.id
    ));
    assert!(
        r.starts_with("ERR \"denied\""),
        "re-register on a restricted connection must be refused (denied): {r}"
    );
    // The refusals did not end the owner's registration: libvirt's acquire still works.
    let mut h1 = d1.host();
    h1.acquire(&vm, &[disk(&img)])
        .expect_ok("libvirtd acquires for the restricted owner");
    assert_eq!(probe0(&img), Probe::WriteLocked);
}
