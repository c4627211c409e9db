//! Where a locked file's side files live, cached for publishing (the rule itself, and the
//! side-file names, are `crate::holder_record`).

use super::*;
use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::holder::Ident;
    use nix::sys::stat::fstat;
    use std::fs;
    use std::fs::File;
    use std::os::fd::AsFd;

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
