//! libvirt's not-paused domain start (docs/interfaces.md §3): the forked child calls
//! `drvAcquire` with RESTRICT but without REGISTER_ONLY, so it takes the disks itself and keeps
//! the returned connection, which QEMU inherits. That connection must be the VM's lifetime
//! handle exactly as the paused path's Register connection is: when it closes while the process
//! still runs, the process is terminated and only then are its disks released.
//!
//! The real plugin through the C test host (`start-running`), against a real lockwardend.

mod common;

use common::wait::poll;

use common::daemon::TestDaemon;
use common::*;
use std::fs;
use std::time::Instant;

/// A daemon with `config`, its host, and VM `name` started the not-paused way on disk
/// `DIR/NAME.img`, its handle closing once `DIR/gate` is removed.
fn started_running(config: &str, name: &str) -> (TestDaemon, Host, tempfile::TempDir, Vm) {
    let d = TestDaemon::verbose(config);
    let mut h = d.host();
    let dir = tempdir();
    let img = image(dir.path(), &format!("{name}.img"));
    let gate = dir.path().join("gate");
    fs::write(&gate, b"").expect("create the gate file");
    let mut vm = Vm::new(name);
    h.try_start_running(&mut vm, &gate, &[disk(&img)])
        .expect_ok("not-paused start");
    (d, h, dir, vm)
}

/// The forked owner took its disk on the kept connection, and exiting releases it.
#[test]
fn a_not_paused_start_takes_the_disks_in_the_child() {
    let (_d, mut h, dir, vm) = started_running("", "running");
    let (img, gate) = (dir.path().join("running.img"), dir.path().join("gate"));
    assert_eq!(
        probe0(&img),
        Probe::WriteLocked,
        "the child's acquire must lock the disk"
    );
    // A second VM is refused while the first runs.
    let mut other = Vm::new("second");
    let refused = h.try_start_running(&mut other, &gate, &[disk(&img)]);
    let text = refused.expect_busy("second VM on the same disk");
    assert!(
        text.contains(&vm.name),
        "the refusal names the holder: {text}"
    );

    h.kill(vm.pid, libc::SIGKILL);
    assert!(
        h.wait_dead(vm.pid, POLL_BOUND).is_some(),
        "the owner did not die"
    );
    assert!(
        wait_unlocked(&img, POLL_BOUND).is_some(),
        "the disk stayed locked after its VM exited"
    );
}

/// Closing the kept connection while the process runs terminates the process (SIGTERM) and
/// releases the disk only after it is gone. Before the fix the daemon did nothing: the VM kept
/// running, and kept its disk, with no handle.
#[test]
fn closing_the_kept_connection_terminates_the_vm_before_its_disk_is_released() {
    let (d, mut h, dir, vm) = started_running("kill_grace_ms = 2000", "handle");
    let (img, gate) = (dir.path().join("handle.img"), dir.path().join("gate"));
    assert_eq!(probe0(&img), Probe::WriteLocked);
    // The "QEMU" closes its handle and keeps running.
    let t0 = Instant::now();
    fs::remove_file(&gate).expect("remove the gate");
    let mut freed_while_alive = None;
    let died = poll(POLL_BOUND, || {
        let locked = probe0(&img) == Probe::WriteLocked;
        if !h.alive(vm.pid) {
            return Some(t0.elapsed());
        }
        if !locked && freed_while_alive.is_none() {
            freed_while_alive = Some(t0.elapsed());
        }
        None
    });
    let (died, _) = died.unwrap_or_else(|| {
        panic!(
            "VM {} still runs {POLL_BOUND:?} after its lifetime handle closed: the kept \
             connection of a not-paused start is not treated as the lifetime handle",
            vm.name
        )
    });
    assert_eq!(
        freed_while_alive, None,
        "the disk was released while the VM still ran"
    );
    assert!(
        wait_unlocked(&img, POLL_BOUND).is_some(),
        "the disk stayed locked after the VM was terminated"
    );
    eprintln!("MEASURED: VM terminated {died:?} after its kept connection closed");
    let log = fs::read_to_string(&d.log).unwrap_or_default();
    assert!(
        log.contains(&format!(
            "(uuid {}, pid {}) registered; connection",
            vm.uuid, vm.pid
        )) && log.contains("is its lifetime handle"),
        "the log must say the child's acquire connection became the lifetime handle:\n{log}"
    );
}
