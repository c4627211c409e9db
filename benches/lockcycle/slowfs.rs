//! The slow-storage row (issue 8 item 4) mounts the FUSE stand-in for NFS itself
//! (tests/fusefs/testfs.rs, the `testfs` example) with every lock call delayed by 2 ms, before
//! the daemons' private mount namespaces are made so that they see the mount.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A mounted delaying file system; unmounted on drop.
pub struct SlowFs {
    child: Child,
    pub mnt: PathBuf,
}

/// The `testfs` example next to this bench (release or debug build), if built.
fn testfs() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let target = exe.parent()?.parent()?.parent()?;
    ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join("examples/testfs"))
        .find(|p| p.is_file())
}

fn mounted(mnt: &Path) -> bool {
    let want = mnt.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split(' ').nth(1) == Some(want.as_str()))
        })
        .unwrap_or(false)
}

impl SlowFs {
    /// Mount under `root`, with `dirs` made in the backing directory (the test file system has
    /// no mkdir). `Ok(None)` when the example is not built (the row is then reported pending
    /// with the command that builds it).
    pub fn mount(root: &Path, dirs: &[String]) -> Result<Option<SlowFs>, String> {
        let Some(bin) = testfs() else {
            return Ok(None);
        };
        let backing = root.join("slow-export");
        let mnt = root.join("slow-mnt");
        for d in dirs {
            fs::create_dir_all(backing.join(d)).map_err(|e| format!("mkdir {d}: {e}"))?;
        }
        fs::create_dir_all(&mnt).map_err(|e| format!("mkdir {mnt:?}: {e}"))?;
        let ctl = root.join("slow-control");
        fs::write(&ctl, "delay_ms 2\n").map_err(|e| format!("write {ctl:?}: {e}"))?;
        let child = Command::new(&bin)
            .arg(&backing)
            .arg(&mnt)
            .arg(&ctl)
            .arg(root.join("slow-events"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("start {bin:?}: {e}"))?;
        let fs = SlowFs { child, mnt };
        let t0 = Instant::now();
        while !mounted(&fs.mnt) {
            if t0.elapsed() > Duration::from_secs(20) {
                return Err(format!("{bin:?} did not mount {:?} within 20 s", fs.mnt));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Some(fs))
    }
}

impl Drop for SlowFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}
