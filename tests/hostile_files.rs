//! Hostile files on shared storage against the real lockwardend (issue 13, findings 1, 4, 10).
//!
//! Another host on the share (or a buggy tool) may plant anything where lockwardend looks:
//! a side file or a lockspace lock file that is a hard link to a VM image, a FIFO or a device
//! node where a side file or lock file belongs, a `<lease>` pointing anywhere. These tests plant
//! each one and check that no byte of the victim changes, that no planted node is ever opened
//! for I/O (an inotify watch sees every real open; an `O_PATH` look-up makes no event), that the
//! lease outcome is the designed one, and that `<lease>` files are only made under `lease_dir`.

mod common;

use common::daemon::{Lockwardend, TestDaemon};
use common::image;
use common::proto::{Proc, err, hostname, ok, owner_for, sleeper};
use lockwarden::holder_record::host_label;
use lockwarden::naming::sha256_hex;
use lockwarden::protocol::{ErrorKind, LeaseMode, LeaseSpec, LockTarget, Owner, ResourceKind};
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

struct Vm {
    owner: Owner,
    _proc: Proc,
}

fn vm(name: &str) -> Vm {
    let proc = sleeper();
    Vm {
        owner: owner_for(proc.pid(), name),
        _proc: proc,
    }
}

fn excl(path: &Path) -> LeaseSpec {
    let p = path.to_str().expect("utf-8 path").to_string();
    LeaseSpec {
        name: p.clone(),
        kind: ResourceKind::Disk,
        mode: LeaseMode::Exclusive,
        target: LockTarget::File { path: p },
    }
}

fn in_lockspace(name: &str, dir: &Path, file: &str, kind: ResourceKind) -> LeaseSpec {
    LeaseSpec {
        name: name.to_string(),
        kind,
        mode: LeaseMode::Exclusive,
        target: LockTarget::Lockspace {
            dir: dir.to_str().expect("utf-8 path").to_string(),
            file: file.to_string(),
            create_dir: kind == ResourceKind::Disk,
        },
    }
}

/// A 4 MiB "image" full of non-space bytes, and its content.
fn victim(dir: &Path, name: &str) -> (PathBuf, Vec<u8>) {
    let p = dir.join(name);
    let bytes: Vec<u8> = (0..4 * 1024 * 1024u32)
        .map(|i| (i % 251) as u8 ^ 0x5a)
        .collect();
    fs::write(&p, &bytes).expect("write victim");
    (p, bytes)
}

fn assert_intact(path: &Path, want: &[u8], when: &str) {
    let got = fs::read(path).unwrap_or_else(|e| panic!("reading {path:?} {when}: {e}"));
    assert!(
        got.len() == want.len() && got == want,
        "{} changed {when}: {} bytes now, {} before",
        path.display(),
        got.len(),
        want.len()
    );
}

fn side_name(image: &str) -> String {
    format!("{image}@{}.json", host_label(&hostname()))
}

fn mkdir(p: &Path, mode: u32) {
    fs::create_dir_all(p).expect("mkdir");
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn mknod(path: &Path, kind: libc::mode_t, dev: libc::dev_t) {
    let c = CString::new(path.as_os_str().as_bytes()).expect("path");
    // SAFETY: mknod with a valid NUL-terminated path; it only creates a node.
    let r = unsafe { libc::mknod(c.as_ptr(), kind | 0o600, dev) };
    assert_eq!(r, 0, "mknod {path:?}: {}", std::io::Error::last_os_error());
}

fn fifo(path: &Path) {
    mknod(path, libc::S_IFIFO, 0);
}

/// `c 1 3`, the null device's numbers, planted as a file of its own.
fn char_device(path: &Path) {
    mknod(path, libc::S_IFCHR, libc::makedev(1, 3));
}

/// An inotify watch on a directory: it records every real open, read or write of a file in
/// it, while an `O_PATH` look-up (which opens nothing) makes no event.
struct Watch(std::os::fd::OwnedFd);

impl Watch {
    fn on(dir: &Path) -> Watch {
        use std::os::fd::FromRawFd;
        // SAFETY: inotify_init1 has no pointer arguments; a non-negative result is a new fd.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(
            fd >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let c = CString::new(dir.as_os_str().as_bytes()).expect("path");
        let mask = libc::IN_OPEN | libc::IN_ACCESS | libc::IN_MODIFY;
        // SAFETY: a valid inotify fd and a NUL-terminated path.
        let w = unsafe {
            libc::inotify_add_watch(std::os::fd::AsRawFd::as_raw_fd(&fd), c.as_ptr(), mask)
        };
        assert!(
            w >= 0,
            "inotify_add_watch: {}",
            std::io::Error::last_os_error()
        );
        Watch(fd)
    }

    /// Names of the files opened, read or written since the last call (events are queued
    /// during the system call itself, so everything the daemon did before answering is here).
    fn touched(&self) -> Vec<String> {
        let mut names = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: reading into a live buffer of the given length.
            let n = unsafe {
                libc::read(
                    std::os::fd::AsRawFd::as_raw_fd(&self.0),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n <= 0 {
                return names;
            }
            let mut off = 0usize;
            let n = n as usize;
            while off + 16 <= n {
                let len = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap()) as usize;
                let name = &buf[off + 16..off + 16 + len];
                let name = name.split(|b| *b == 0).next().unwrap_or_default();
                names.push(String::from_utf8_lossy(name).into_owned());
                off += 16 + len;
            }
        }
    }
}

// 1 -------------------------------------------------------------------------------------------

/// Direct mode: this host's side file planted as a hard link to another image. The lease is
/// taken, no record is written anywhere (a WARN names the file), and the victim keeps every
/// byte through acquire and release. Then the same with a side file replaced by a link while
/// it sat blank between leases (every publish opens it afresh and checks it again).
#[test]
fn hard_linked_side_file_in_direct_mode_leaves_the_victim_intact() {
    let d = TestDaemon::start("");
    let images = tempfile::tempdir().unwrap();
    let img = image(images.path(), "web1.img");
    let (vic, bytes) = victim(images.path(), "base-backing.qcow2");
    let records = images.path().join(".lockwarden");
    mkdir(&records, 0o700);
    let side = records.join(side_name("web1.img"));
    fs::hard_link(&vic, &side).unwrap();
    let a = vm("linked");

    ok(d.acquire(&a.owner, vec![excl(&img)]));
    assert_eq!(
        common::proto::byte0(&img),
        libc::F_WRLCK,
        "the lease is held"
    );
    assert_intact(&vic, &bytes, "while the lease is held");
    ok(d.release(&a.owner, vec![excl(&img)]));
    assert_intact(&vic, &bytes, "after release");
    assert_eq!(fs::metadata(&vic).unwrap().nlink(), 2);
    assert!(
        d.warned(&[&side_name("web1.img"), "hard links"]),
        "a WARN line names the side file and why:\n{}",
        d.log()
    );

    // A side file this daemon made and left blank after the lease, swapped for a link meanwhile.
    let img2 = image(images.path(), "web2.img");
    let side2 = records.join(side_name("web2.img"));
    ok(d.acquire(&a.owner, vec![excl(&img2)]));
    assert!(
        fs::read_to_string(&side2)
            .unwrap()
            .contains("lockwarden_holder"),
        "a clean side file gets the record"
    );
    ok(d.release(&a.owner, vec![excl(&img2)]));
    fs::remove_file(&side2).unwrap();
    fs::hard_link(&vic, &side2).unwrap();
    ok(d.acquire(&a.owner, vec![excl(&img2)]));
    assert_intact(
        &vic,
        &bytes,
        "after the blank side file was swapped for a link",
    );
    ok(d.release(&a.owner, vec![excl(&img2)]));
    assert_intact(&vic, &bytes, "after release of the swapped side file");
    assert!(d.list().is_empty());
}

/// Lockspace mode: `<lockspace>/<sha256 of the disk path>` planted as a hard link to an image
/// is refused (the error names the lock file and says what to do); a large foreign file moved
/// there under that name is locked but never written, truncated or removed.
#[test]
fn hard_linked_or_foreign_lockspace_lock_file_leaves_the_victim_intact() {
    let d = TestDaemon::start("");
    let base = tempfile::tempdir().unwrap();
    let locks = base.path().join("lockspace");
    mkdir(&locks, 0o700);
    let (vic, bytes) = victim(base.path(), "db.qcow2");
    let disk = "/images/web1.img";
    let hash = sha256_hex(disk);
    let lock = locks.join(&hash);
    fs::hard_link(&vic, &lock).unwrap();
    let a = vm("ls-linked");
    let spec = in_lockspace(disk, &locks, &hash, ResourceKind::Disk);

    let e = err(d.acquire(&a.owner, vec![spec.clone()]), ErrorKind::Invalid);
    assert!(
        e.message.contains("hard links") && e.message.contains(lock.to_str().unwrap()),
        "the refusal names the lock file and the reason: {}",
        e.message
    );
    assert_eq!(common::proto::byte0(&vic), libc::F_UNLCK);
    ok(d.release(&a.owner, vec![spec.clone()]));
    assert_intact(&vic, &bytes, "after a refused acquire and a release");
    assert_eq!(fs::metadata(&vic).unwrap().nlink(), 2);

    // The only name of a large file, in the lockspace: locked, never written or removed.
    fs::remove_file(&lock).unwrap();
    fs::rename(&vic, &lock).unwrap();
    ok(d.acquire(&a.owner, vec![spec.clone()]));
    assert_eq!(
        common::proto::byte0(&lock),
        libc::F_WRLCK,
        "the lease is held"
    );
    assert_intact(&lock, &bytes, "while held");
    ok(d.release(&a.owner, vec![spec]));
    assert_intact(
        &lock,
        &bytes,
        "after release (neither truncated nor removed)",
    );
    assert!(
        d.warned(&[&hash, "is not written"]),
        "a WARN line names the lock file:\n{}",
        d.log()
    );
}

// 4 -------------------------------------------------------------------------------------------

/// FIFOs and character devices planted as this host's side file or as a lockspace lock file
/// (and as the disk itself) are never opened: no open event on them, no descriptor of the
/// daemon on them, every call answers. Side files: the lease is taken without a record.
/// Lock files: the lease is refused with an error naming the file.
#[test]
fn planted_fifos_and_device_nodes_are_never_opened() {
    let d = TestDaemon::start("");
    let base = tempfile::tempdir().unwrap();
    let images = base.path().join("images");
    mkdir(&images, 0o700);
    let records = images.join(".lockwarden");
    mkdir(&records, 0o700);
    let locks = base.path().join("lockspace");
    mkdir(&locks, 0o700);
    let a = vm("nodes");
    let (rec_watch, lock_watch, img_watch) =
        (Watch::on(&records), Watch::on(&locks), Watch::on(&images));

    for (image_name, plant) in [
        ("fifo.img", fifo as fn(&Path)),
        ("dev.img", char_device as fn(&Path)),
    ] {
        let img = image(&images, image_name);
        let side = records.join(side_name(image_name));
        plant(&side);
        ok(d.acquire(&a.owner, vec![excl(&img)]));
        assert_eq!(
            common::proto::byte0(&img),
            libc::F_WRLCK,
            "the lease is held"
        );
        assert!(d.fds_on(&side).is_empty(), "no descriptor on {side:?}");
        ok(d.release(&a.owner, vec![excl(&img)]));
        let touched = rec_watch.touched();
        assert!(
            !touched.contains(&side_name(image_name)),
            "the planted {image_name} side file was opened: {touched:?}"
        );
        assert!(
            d.warned(&[&side_name(image_name), "not a regular file"]),
            "a WARN line names {side:?}:\n{}",
            d.log()
        );

        let disk = format!("/images/{image_name}");
        let hash = sha256_hex(&disk);
        let lock = locks.join(&hash);
        plant(&lock);
        let spec = in_lockspace(&disk, &locks, &hash, ResourceKind::Disk);
        let e = err(d.acquire(&a.owner, vec![spec.clone()]), ErrorKind::Invalid);
        assert!(
            e.message.contains(lock.to_str().unwrap()) && e.message.contains("not a regular file"),
            "the refusal names the lock file: {}",
            e.message
        );
        ok(d.release(&a.owner, vec![spec]));
        let touched = lock_watch.touched();
        assert!(
            !touched.contains(&hash),
            "the planted {image_name} lock file was opened: {touched:?}"
        );

        // The disk itself: refused before any open (as before this change, now by O_PATH).
        let node = images.join(format!("node-{image_name}"));
        plant(&node);
        err(d.acquire(&a.owner, vec![excl(&node)]), ErrorKind::Invalid);
        let touched = img_watch.touched();
        assert!(
            !touched.contains(&format!("node-{image_name}")),
            "the planted {image_name} disk was opened: {touched:?}"
        );
    }
    assert!(d.list().is_empty());
}

// 10 ------------------------------------------------------------------------------------------

fn lease(key: &str, dir: &Path) -> LeaseSpec {
    in_lockspace(key, dir, key, ResourceKind::Lease)
}

/// `<lease>` lock files only under `lease_dir`: a lease elsewhere (directly, through `..`, or
/// through a symbolic link inside `lease_dir`) is refused naming the path and the key, and no
/// file is created there; without `lease_dir` every lease is refused.
#[test]
fn leases_outside_lease_dir_are_refused_and_create_nothing() {
    let base = tempfile::tempdir().unwrap();
    let leases = base.path().join("leases");
    let elsewhere = base.path().join("etc");
    mkdir(&leases, 0o700);
    mkdir(&leases.join("LS"), 0o700);
    mkdir(&elsewhere, 0o755);
    let escape = leases.join("escape");
    std::os::unix::fs::symlink(&elsewhere, &escape).unwrap();
    // Without lease_dir, no lease at all (lockd, too, only takes leases in a configured
    // lockspace).
    let unset = TestDaemon::start("");
    let b = vm("leaser-2");
    let e = err(
        unset.acquire(&b.owner, vec![lease("KEY3", &leases)]),
        ErrorKind::Invalid,
    );
    assert!(e.message.contains("lease_dir"), "{}", e.message);
    assert!(!leases.join("KEY3").exists());
    drop(unset);

    let d = TestDaemon::start(&format!("lease_dir = \"{}\"\n", leases.display()));
    let a = vm("leaser");

    ok(d.acquire(&a.owner, vec![lease("KEY1", &leases)]));
    ok(d.acquire(&a.owner, vec![lease("KEY2", &leases.join("LS"))]));
    assert!(leases.join("KEY1").is_file() && leases.join("LS/KEY2").is_file());

    for dir in [elsewhere.clone(), leases.join("../etc"), escape.clone()] {
        let e = err(
            d.acquire(&a.owner, vec![lease("nologin", &dir)]),
            ErrorKind::Invalid,
        );
        assert!(
            e.message.contains("lease_dir") && e.message.contains(dir.to_str().unwrap()),
            "the refusal names the directory and lease_dir: {}",
            e.message
        );
        assert!(
            !elsewhere.join("nologin").exists(),
            "no file is created outside lease_dir ({dir:?})"
        );
    }
}

/// Side files are only created next to a disk whose directory nobody else can write: a
/// directory writable by everybody (no sticky bit) or owned by another user gets no
/// `.lockwarden`; the lease is taken all the same.
#[test]
fn no_side_files_next_to_disks_in_unsafe_directories() {
    let d = TestDaemon::start("");
    let base = tempfile::tempdir().unwrap();
    let open_dir = base.path().join("world");
    mkdir(&open_dir, 0o777);
    let foreign = base.path().join("foreign");
    mkdir(&foreign, 0o755);
    std::os::unix::fs::chown(&foreign, Some(1000), Some(1000)).unwrap();
    let safe = base.path().join("safe");
    mkdir(&safe, 0o755);
    let a = vm("dirs");
    for dir in [&open_dir, &foreign] {
        let img = image(dir, "disk.img");
        ok(d.acquire(&a.owner, vec![excl(&img)]));
        assert_eq!(
            common::proto::byte0(&img),
            libc::F_WRLCK,
            "the lease is held"
        );
        assert!(
            !dir.join(".lockwarden").exists(),
            "no side-file directory next to {img:?}"
        );
        ok(d.release(&a.owner, vec![excl(&img)]));
    }
    assert!(
        d.warned(&["sticky"]) && d.warned(&["uid 1000"]),
        "{}",
        d.log()
    );
    let img = image(&safe, "disk.img");
    ok(d.acquire(&a.owner, vec![excl(&img)]));
    assert!(
        safe.join(".lockwarden")
            .join(side_name("disk.img"))
            .is_file()
    );
    ok(d.release(&a.owner, vec![excl(&img)]));
}
