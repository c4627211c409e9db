//! Where a locked file's side files live.

use super::*;
use nix::fcntl::readlink;
use nix::sys::stat::fstat;
use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

/// Where the side files of a locked file live: `dir` (the `.lockwarden` directory) and the
/// stem `<name>` of `<name>@<host>.json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SideFiles {
    pub dir: String,
    pub stem: String,
}

/// The side-file place of the file open as `fd`: next to the file it really is (symlinks
/// resolved through /proc/self/fd). None for block devices and deleted files.
pub fn side_files(fd: BorrowedFd<'_>) -> Result<Option<SideFiles>, String> {
    let st = fstat(fd).map_err(|e| format!("fstat failed: {}", e.desc()))?;
    side_files_of(fd, is_regular(&st))
}

/// [`side_files`] for a descriptor whose type the caller already knows.
fn side_files_of(fd: BorrowedFd<'_>, regular: bool) -> Result<Option<SideFiles>, String> {
    use std::os::fd::AsRawFd;
    if !regular {
        return Ok(None);
    }
    let real = readlink(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str())
        .map_err(|e| format!("cannot resolve the file's path: {}", e.desc()))?;
    let real = real.to_string_lossy().into_owned();
    if real.ends_with(" (deleted)") || !real.starts_with('/') {
        return Ok(None);
    }
    let (parent, base) = match real.rsplit_once('/') {
        Some((p, b)) if !b.is_empty() => (if p.is_empty() { "/" } else { p }, b),
        _ => return Ok(None),
    };
    Ok(Some(SideFiles {
        dir: format!("{}/{RECORD_DIR}", parent.trim_end_matches('/')),
        stem: stem(base),
    }))
}

/// A side-file place resolved recently for a publish: the same inode opened through the same
/// path again (the VM's next acquire or resume) reuses it instead of resolving the path again
/// (`readlink` of /proc/self/fd was the most expensive call of a record, ~9% of the daemon's CPU
/// in a 16-disk acquire). Kept at most [`RESOLVED_TTL`], at most [`RESOLVED_MAX`] of them. If a
/// directory on the way was moved meanwhile, the record may be written to the old place for
/// that long: readers then find no record for the lock (never a wrong one — a record names its
/// inode, and readers check it).
struct Resolved {
    lock_path: Box<str>,
    side: SideFiles,
    at: std::time::Instant,
}

static RESOLVED: LazyLock<Mutex<HashMap<(u64, u64), Resolved>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));
const RESOLVED_MAX: usize = 256;
const RESOLVED_TTL: Duration = Duration::from_secs(30);

/// [`side_files_of`] through the [`RESOLVED`] cache, for a publish of `lock_path`.
pub(super) fn side_files_for_publish(
    fd: BorrowedFd<'_>,
    id: Ident,
    lock_path: &str,
) -> Result<Option<SideFiles>, String> {
    let key = (id.dev, id.ino);
    if let Ok(map) = RESOLVED.lock() {
        if let Some(r) = map.get(&key) {
            if &*r.lock_path == lock_path && r.at.elapsed() < RESOLVED_TTL {
                return Ok(Some(r.side.clone()));
            }
        }
    }
    let side = side_files_of(fd, id.regular)?;
    if let (Some(s), Ok(mut map)) = (&side, RESOLVED.lock()) {
        if map.len() >= RESOLVED_MAX {
            map.retain(|_, r| r.at.elapsed() < RESOLVED_TTL);
            if map.len() >= RESOLVED_MAX {
                map.clear();
            }
        }
        map.insert(
            key,
            Resolved {
                lock_path: lock_path.into(),
                side: s.clone(),
                at: std::time::Instant::now(),
            },
        );
    }
    Ok(side)
}

/// `<name>` part of a side file for a locked file of base name `base`.
pub fn stem(base: &str) -> String {
    if base.len() <= MAX_STEM {
        base.to_string()
    } else {
        format!("sha256-{}", crate::naming::sha256_hex(base))
    }
}

/// The host part of side file `file_name` when it is a side file of `stem`.
pub(super) fn side_file_host<'n>(file_name: &'n str, stem: &str) -> Option<&'n str> {
    let rest = file_name.strip_suffix(".json")?;
    let (s, host) = rest.rsplit_once('@')?;
    (s == stem && !host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::holder::Ident;
    use std::fs;
    use std::fs::File;
    use std::os::fd::AsFd;

    #[test]
    fn side_file_names() {
        assert_eq!(
            side_file_host("a.qcow2@node-b.json", "a.qcow2"),
            Some("node-b")
        );
        assert_eq!(side_file_host("a@b@node.json", "a@b"), Some("node"));
        assert_eq!(side_file_host("a@b@node.json", "a"), None);
        assert_eq!(side_file_host("a.qcow2@node.json.tmp1.2", "a.qcow2"), None);
        assert_eq!(host_label("node b/../x@y"), "node_b_.._x_y");
        assert_eq!(host_label(""), "unknown");
        let long = "x".repeat(200);
        assert!(stem(&long).starts_with("sha256-"));
        assert_eq!(stem("web1.qcow2"), "web1.qcow2");
    }

    #[test]
    fn a_resolved_place_is_reused_only_for_the_same_path() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        let b = dir.path().join("b.img");
        fs::write(&a, b"").unwrap();
        fs::hard_link(&a, &b).unwrap();
        let place = |p: &std::path::Path| {
            let f = File::open(p).unwrap();
            let id = Ident::of(&fstat(&f).unwrap());
            side_files_for_publish(f.as_fd(), id, p.to_str().unwrap())
                .unwrap()
                .unwrap()
        };
        let first = place(&a);
        assert_eq!(first.stem, "a.img");
        assert_eq!(place(&a), first);
        // The same inode through its other name: resolved again, its own place.
        assert_eq!(place(&b).stem, "b.img");
        assert_eq!(place(&a).stem, "a.img");
    }
}
