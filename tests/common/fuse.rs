//! The FUSE test file system (tests/fusefs/testfs.rs, built as the example `testfs`): storage
//! that hangs, loses a lock or fails lock calls on demand, driven through a control file.
//! Needs root and /dev/fuse.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Assert what mounting a FUSE file system needs: root and /dev/fuse. `who` names the test file
/// for the message.
pub fn prerequisites(who: &str) {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "{who} mounts FUSE file systems and must run as root"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: load the fuse module (modprobe fuse) to run {who}"
    );
}

/// The `testfs` example next to this test binary (target/<profile>/examples/testfs).
pub fn testfs_path() -> PathBuf {
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

/// Whether `mnt` is a mount point (field 5 of /proc/self/mountinfo, where the kernel writes
/// space, tab, newline and backslash as octal escapes).
pub fn mounted(mnt: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let text = fs::read("/proc/self/mountinfo").unwrap_or_default();
    let mut m = Vec::new();
    for &b in mnt.as_os_str().as_bytes() {
        match b {
            b' ' | b'\t' | b'\n' | b'\\' => m.extend_from_slice(format!("\\{b:03o}").as_bytes()),
            b => m.push(b),
        }
    }
    text.split(|b| *b == b'\n')
        .any(|l| l.split(|b| *b == b' ').nth(4) == Some(&m[..]))
}

/// A running `testfs` mounted on `mnt`, controlled through `ctl`, logging to `events`; un-hung
/// (empty control), killed and lazily unmounted on drop. Declare it before any TempDir holding
/// the mount point so it drops first.
pub struct Testfs {
    pub mnt: PathBuf,
    pub ctl: PathBuf,
    pub events: PathBuf,
    child: Child,
}

impl Testfs {
    /// Start `testfs` serving `backing` on `mnt` and wait (bounded by `bound`) until mounted.
    pub fn mount(backing: &Path, mnt: &Path, ctl: &Path, events: &Path, bound: Duration) -> Testfs {
        let child = Command::new(testfs_path())
            .args([backing, mnt, ctl, events])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn testfs");
        let mut t = Testfs {
            mnt: mnt.to_path_buf(),
            ctl: ctl.to_path_buf(),
            events: events.to_path_buf(),
            child,
        };
        super::wait::wait_until("testfs mounts", bound, || {
            if let Ok(Some(st)) = t.child.try_wait() {
                panic!("testfs exited before mounting {}: {st}", t.mnt.display());
            }
            mounted(&t.mnt)
        });
        t
    }

    /// Replace the control file atomically (testfs re-reads it on every call).
    pub fn set(&self, text: &str) {
        let tmp = self.ctl.with_extension("tmp");
        fs::write(&tmp, text).expect("write control");
        fs::rename(&tmp, &self.ctl).expect("install control");
    }

    /// The process id of the running `testfs`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The event log so far (empty if none yet).
    pub fn events(&self) -> String {
        fs::read_to_string(&self.events).unwrap_or_default()
    }
}

impl Drop for Testfs {
    fn drop(&mut self) {
        self.set("");
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// A [`Testfs`] in a fresh temporary directory: `backing` (the export) mounted on `mnt`, with
/// its control and event files beside them. Unmounted before the directory is removed.
pub struct Fs {
    // Declared first: unmounted before the directory holding the mount point is removed.
    pub tfs: Testfs,
    _dir: tempfile::TempDir,
    pub backing: PathBuf,
    pub mnt: PathBuf,
}

impl Fs {
    /// Mount in a new temporary directory named `prefix…`, waiting up to `bound`.
    pub fn mount(prefix: &str, bound: Duration) -> Fs {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("tempdir");
        let backing = dir.path().join("export");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&backing).expect("mkdir export");
        fs::create_dir(&mnt).expect("mkdir mnt");
        let ctl = dir.path().join("control");
        let events = dir.path().join("events");
        let tfs = Testfs::mount(&backing, &mnt, &ctl, &events, bound);
        Fs {
            tfs,
            _dir: dir,
            backing,
            mnt,
        }
    }

    pub fn set(&self, text: &str) {
        self.tfs.set(text);
    }

    pub fn events(&self) -> String {
        self.tfs.events()
    }

    /// A 4 KiB image created through the backing directory, named through the mount.
    pub fn image(&self, name: &str) -> PathBuf {
        fs::write(self.backing.join(name), vec![0u8; 4096]).expect("write image");
        self.mnt.join(name)
    }
}
