//! The keeper's vault: where it keeps its references to the leases' open file descriptions —
//! queued in sockets of its own instead of in its descriptor table.
//!
//! Why: an OFD lock lives as long as *some* reference to its open file description does, and a
//! descriptor sent with SCM_RIGHTS and not yet received is such a reference (the kernel holds
//! it in the socket's queue). The keeper exists only to hold a reference; it never uses the
//! descriptor. Holding them as descriptors cost one slot of its table per lease, on top of the
//! daemon's own, so lockwardend + keeper used two descriptors per lease and the host ran out
//! (EMFILE) at half the leases virtlockd holds (issue 17, docs/benchmarks.md). In the vault they
//! cost the keeper two descriptors per [`SLOT_FDS`] (64) leases, and both guarantees stay: a daemon
//! crash leaves the vault's reference (the lock stays), a keeper crash leaves the daemon's own
//! descriptor (the lock stays, and a new keeper is handed every lease again).
//!
//! How: a slot is a connected pair of datagram sockets with at most one datagram queued,
//! carrying up to [`SLOT_FDS`] descriptors; the slot remembers which lease's descriptors they
//! are, in order. Adding to or removing from a slot takes its datagram out (the descriptors are
//! in the keeper's table for that moment), changes the list and queues it again, so a change
//! costs at most [`SLOT_FDS`] descriptors of room, never one per lease held. New leases go to
//! the current slot; a slot that falls below a quarter full is merged into it, so slots stay
//! at most about four times the minimum.
//!
//! A datagram that cannot be queued again (the kernel refused: memory, or the in-flight limit
//! an unprivileged keeper's `RLIMIT_NOFILE` sets) leaves the slot's descriptors in the table,
//! where they hold the locks just as well; the next change of that slot tries again.

use super::wire::{datagram_pair, recv_fds, send_fds};
use log::warn;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// Descriptors per slot (at most the kernel's SCM_MAX_FD, 253, what one datagram carries).
/// Every change of a slot takes all its descriptors out and queues them again, so this is the
/// keeper's work per hold or drop; 64 keeps it small (about 20 us) at two descriptors per 64
/// leases (docs/reliability.md).
pub(super) const SLOT_FDS: usize = 64;
/// A slot with fewer descriptors than this (and not the current one) is merged.
const MERGE_BELOW: usize = SLOT_FDS / 4;

type Id = [u64; 2];

/// One socket pair and the leases whose descriptors sit in its queue.
struct Slot {
    /// Sending and receiving end; none when no socket pair could be made (the descriptors
    /// then stay in `table`).
    pair: Option<(OwnedFd, OwnedFd)>,
    /// Lease ids and how many descriptors each has, in the datagram's order.
    ids: Vec<(Id, u8)>,
    /// The descriptors when they are not queued (being changed, or the kernel refused them).
    table: Option<Vec<OwnedFd>>,
}

impl Slot {
    fn fds(&self) -> usize {
        self.ids.iter().map(|(_, n)| usize::from(*n)).sum()
    }

    /// The slot's descriptors, out of the queue (or the table).
    fn open(&mut self) -> Result<Vec<OwnedFd>, String> {
        if let Some(t) = self.table.take() {
            return Ok(t);
        }
        let Some((_, rx)) = &self.pair else {
            return Ok(Vec::new());
        };
        if self.ids.is_empty() {
            return Ok(Vec::new());
        }
        let fds = recv_fds(rx)?;
        if fds.len() != self.fds() {
            return Err(format!(
                "a vault slot gave back {} descriptor(s) instead of {}",
                fds.len(),
                self.fds()
            ));
        }
        Ok(fds)
    }

    /// [`Slot::open`], or None with an error logged (its leases stay queued, held; `doing`
    /// says what was given up).
    fn open_or_log(&mut self, doing: &str) -> Option<Vec<OwnedFd>> {
        self.open()
            .map_err(|e| {
                log::error!(
                    "keeper (pid {}): vault slot of {} lease(s): {e}; {doing}",
                    std::process::id(),
                    self.ids.len()
                )
            })
            .ok()
    }

    /// Put `fds` (the descriptors of `self.ids`, in order) back in the queue; when the kernel
    /// refuses, keep them in the table.
    fn close(&mut self, fds: Vec<OwnedFd>) {
        if fds.is_empty() {
            return;
        }
        let Some((tx, _)) = &self.pair else {
            self.table = Some(fds);
            return;
        };
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        match send_fds(tx, &raw) {
            // Queued: the datagram holds its own references; ours are closed now.
            Ok(()) => drop(fds),
            Err(e) => {
                warn!(
                    "keeper (pid {}): cannot queue {} descriptor(s) in its vault ({}); \
                     keeping them open instead (their locks are held either way)",
                    std::process::id(),
                    fds.len(),
                    e.desc()
                );
                self.table = Some(fds);
            }
        }
    }
}

/// Every lease's descriptors the keeper holds.
#[derive(Default)]
pub(super) struct Vault {
    slots: Vec<Option<Slot>>,
    /// Which slot holds a lease's descriptors.
    place: HashMap<Id, usize>,
    /// Where new leases go.
    current: Option<usize>,
}

impl Vault {
    /// Hold `entries` (a lease id and its 1-2 descriptors each). An id already held is
    /// replaced: its old descriptors are returned, to be closed by the caller. Never loses a
    /// descriptor: what cannot be queued stays open in the keeper's table.
    pub(super) fn put(&mut self, entries: Vec<(Id, Vec<OwnedFd>)>) -> Vec<(Id, Vec<OwnedFd>)> {
        let replaced: Vec<Id> = entries
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| self.place.contains_key(id))
            .collect();
        let out = self.take(&replaced);
        let mut rest = entries.into_iter().peekable();
        while rest.peek().is_some() {
            let s = self.room();
            let Some(slot) = self.slots.get_mut(s).and_then(Option::as_mut) else {
                break;
            };
            let Some(mut fds) = slot.open_or_log("new leases go to another slot") else {
                self.current = None;
                continue;
            };
            while let Some((id, new)) = rest.next_if(|(_, f)| fds.len() + f.len() <= SLOT_FDS) {
                slot.ids.push((id, new.len() as u8));
                fds.extend(new);
                self.place.insert(id, s);
            }
            slot.close(fds);
            if rest.peek().is_some() {
                // Full: the next one starts a new slot.
                self.current = None;
            }
        }
        out
    }

    /// The current slot, or a new one when it is full or there is none.
    fn room(&mut self) -> usize {
        if let Some(c) = self.current {
            if self.slot(c).is_some_and(|s| s.fds() < SLOT_FDS) {
                return c;
            }
        }
        let pair = datagram_pair()
            .map_err(|e| {
                warn!(
                    "keeper (pid {}): {e}; keeping the next descriptors open instead",
                    std::process::id()
                )
            })
            .ok();
        let slot = Slot {
            pair,
            ids: Vec::new(),
            table: None,
        };
        let i = match self.slots.iter().position(Option::is_none) {
            Some(i) => {
                self.set(i, Some(slot));
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        self.current = Some(i);
        i
    }

    /// Stop holding `ids`: their descriptors are returned (closing them is the caller's). Ids
    /// not held are skipped. A slot whose datagram cannot be taken out keeps its leases (an
    /// error is logged; they are tried again with the next change).
    pub(super) fn take(&mut self, ids: &[Id]) -> Vec<(Id, Vec<OwnedFd>)> {
        let mut by_slot: HashMap<usize, Vec<Id>> = HashMap::new();
        for id in ids {
            if let Some(s) = self.place.get(id) {
                by_slot.entry(*s).or_default().push(*id);
            }
        }
        let mut out = Vec::new();
        for (s, gone) in by_slot {
            let Some(slot) = self.slots.get_mut(s).and_then(Option::as_mut) else {
                continue;
            };
            let Some(fds) = slot.open_or_log("its leases stay held until the next change") else {
                continue;
            };
            let mut fds = fds.into_iter();
            let mut keep_ids = Vec::with_capacity(slot.ids.len());
            let mut keep = Vec::with_capacity(fds.len());
            for (id, n) in std::mem::take(&mut slot.ids) {
                let mine: Vec<OwnedFd> = fds.by_ref().take(usize::from(n)).collect();
                if gone.contains(&id) {
                    self.place.remove(&id);
                    out.push((id, mine));
                } else {
                    keep_ids.push((id, n));
                    keep.extend(mine);
                }
            }
            slot.ids = keep_ids;
            slot.close(keep);
            self.tidy(s);
        }
        out
    }

    /// After slot `s` shrank: free it when empty, merge it into the current slot when small
    /// and the current one has room (or make it the current one when that is nearly full).
    fn tidy(&mut self, s: usize) {
        let n = self.slot(s).map_or(0, Slot::fds);
        if n == 0 {
            self.set(s, None);
            if self.current == Some(s) {
                self.current = None;
            }
            return;
        }
        if n >= MERGE_BELOW || self.current == Some(s) {
            return;
        }
        let Some(c) = self
            .current
            .filter(|c| self.slot(*c).is_some_and(|cur| cur.fds() + n <= SLOT_FDS))
        else {
            self.current = Some(s);
            return;
        };
        let Some(mut small) = self.slots.get_mut(s).and_then(Option::take) else {
            return;
        };
        let Some(cur) = self.slots.get_mut(c).and_then(Option::as_mut) else {
            self.set(s, Some(small));
            return;
        };
        let moved = match (small.open(), cur.open()) {
            (Ok(a), Ok(mut b)) => {
                b.extend(a);
                b
            }
            (a, b) => {
                // Put back whatever came out; the slots stay as they were.
                if let Ok(a) = a {
                    small.close(a);
                }
                if let Ok(b) = b {
                    cur.close(b);
                }
                self.set(s, Some(small));
                return;
            }
        };
        for (id, _) in &small.ids {
            self.place.insert(*id, c);
        }
        cur.ids.append(&mut small.ids);
        cur.close(moved);
    }

    /// Visit every lease with its descriptors (for a dump), slot by slot; each slot's
    /// descriptors are queued again afterwards.
    pub(super) fn visit(&mut self, mut f: impl FnMut(Id, &[OwnedFd]) -> bool) {
        for slot in self.slots.iter_mut().flatten() {
            // Those leases stay held here, but the daemon does not hear of them.
            let Some(fds) = slot.open_or_log("left out of the hand-back") else {
                continue;
            };
            let mut at = 0;
            let mut go = true;
            for (id, n) in &slot.ids {
                let n = usize::from(*n);
                if go {
                    go = f(*id, fds.get(at..at + n).unwrap_or_default());
                }
                at += n;
            }
            slot.close(fds);
            if !go {
                return;
            }
        }
    }

    fn slot(&self, i: usize) -> Option<&Slot> {
        self.slots.get(i).and_then(Option::as_ref)
    }

    fn set(&mut self, i: usize, slot: Option<Slot>) {
        if let Some(s) = self.slots.get_mut(i) {
            *s = slot;
        }
    }

    /// Socket pairs in use (two descriptors each).
    pub(super) fn slots(&self) -> usize {
        self.slots.iter().flatten().count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::lock;
    use crate::protocol::LeaseMode;
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;

    /// `n` locked files: their paths (to look again through a fresh description) and the
    /// locked descriptors.
    fn locked(dir: &std::path::Path, n: usize) -> Vec<(std::path::PathBuf, OwnedFd)> {
        (0..n)
            .map(|i| {
                let p = dir.join(format!("img{i}"));
                let f = std::fs::File::create(&p).unwrap();
                lock::try_lock(f.as_fd(), LeaseMode::Exclusive).unwrap();
                (p, OwnedFd::from(f))
            })
            .collect()
    }

    /// Is byte 0 of `p` locked (seen from a description of its own)?
    fn is_locked(p: &std::path::Path) -> bool {
        let f = std::fs::File::open(p).unwrap();
        crate::holder_record::kernel_lock(f.as_fd()).is_some()
    }

    /// Is byte 0 of `p` unlocked within a second? Other tests of this process fork children,
    /// and a child holds a copy of every descriptor (ours too) until its exec closes them: a
    /// lock whose last descriptor we closed may outlive the close by that long.
    fn unlocked_soon(p: &std::path::Path) -> bool {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while is_locked(p) {
            if std::time::Instant::now() > end {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        true
    }

    #[test]
    fn the_vault_holds_locks_without_descriptors_and_gives_back_the_right_ones() {
        let dir = tempfile::tempdir().unwrap();
        let files = locked(dir.path(), 600);
        let mut v = Vault::default();
        let entries: Vec<(Id, Vec<OwnedFd>)> = files
            .iter()
            .enumerate()
            .map(|(i, (_, fd))| ([1, i as u64], vec![fd.try_clone().unwrap()]))
            .collect();
        // Our own descriptors go: only the vault's references keep the locks.
        let paths: Vec<_> = files.into_iter().map(|(p, _)| p).collect();
        assert!(v.put(entries).is_empty());
        assert_eq!(
            v.slots(),
            600_usize.div_ceil(SLOT_FDS),
            "slots of {SLOT_FDS}"
        );
        assert!(paths.iter().all(|p| is_locked(p)));
        // Taking some back: exactly those, with their own descriptors (same inode).
        let gone: Vec<Id> = (0..600).step_by(2).map(|i| [1, i]).collect();
        let back = v.take(&gone);
        assert_eq!(back.len(), 300);
        for (id, fds) in &back {
            assert_eq!(fds.len(), 1);
            let ino = std::fs::metadata(&paths[id[1] as usize]).unwrap().ino();
            let st = nix::sys::stat::fstat(&fds[0]).unwrap();
            assert_eq!(st.st_ino, ino, "lease {id:?} got another file's descriptor");
        }
        drop(back);
        for (i, p) in paths.iter().enumerate() {
            if i % 2 == 1 {
                assert!(is_locked(p), "{p:?}");
            } else {
                assert!(unlocked_soon(p), "{p:?}");
            }
        }
        // A dump sees every remaining lease once, with its own file.
        let mut seen = 0;
        v.visit(|id, fds| {
            let ino = std::fs::metadata(&paths[id[1] as usize]).unwrap().ino();
            assert_eq!(nix::sys::stat::fstat(&fds[0]).unwrap().st_ino, ino);
            seen += 1;
            true
        });
        assert_eq!(seen, 300);
        // Nearly emptied slots are merged: the 20 left fit in 2 slots.
        let more: Vec<Id> = (1..560).step_by(2).map(|i| [1, i]).collect();
        drop(v.take(&more));
        assert!(v.slots() <= 2, "{} slots for 20 leases", v.slots());
        for (i, p) in paths.iter().enumerate() {
            let held = i >= 561 && i % 2 == 1;
            assert!(if held { is_locked(p) } else { unlocked_soon(p) }, "{i}");
        }
        // Replacing a lease returns its old descriptor.
        let f = std::fs::File::open(&paths[0]).unwrap();
        let old = v.put(vec![([1, 561], vec![OwnedFd::from(f)])]);
        assert_eq!(old.len(), 1);
        assert_eq!(old[0].0, [1, 561]);
        let rest: Vec<Id> = (0..600).map(|i| [1, i]).collect();
        drop(v.take(&rest));
        assert_eq!(v.slots(), 0);
        drop(old);
        assert!(paths.iter().all(|p| unlocked_soon(p)));
    }

    #[test]
    fn descriptors_the_kernel_will_not_queue_stay_open_and_keep_their_locks() {
        let dir = tempfile::tempdir().unwrap();
        let files = locked(dir.path(), 10);
        let mut v = Vault::default();
        // A slot whose receiving end is gone: every send to it fails (ECONNREFUSED).
        let s = v.room();
        let slot = v.slots[s].as_mut().unwrap();
        let (tx, rx) = slot.pair.take().unwrap();
        drop(rx);
        let (_, stand_in) = datagram_pair().unwrap();
        slot.pair = Some((tx, stand_in));
        let entries: Vec<(Id, Vec<OwnedFd>)> = files
            .iter()
            .enumerate()
            .map(|(i, (_, fd))| ([2, i as u64], vec![fd.try_clone().unwrap()]))
            .collect();
        let paths: Vec<_> = files.into_iter().map(|(p, _)| p).collect();
        assert!(v.put(entries).is_empty());
        assert!(v.slots[s].as_ref().unwrap().table.is_some(), "kept open");
        assert!(paths.iter().all(|p| is_locked(p)));
        // The next change of that slot tries again (and keeps them open again).
        let back = v.take(&[[2, 3]]);
        assert_eq!(back.len(), 1);
        drop(back);
        assert!(unlocked_soon(&paths[3]));
        assert!(v.slots[s].as_ref().unwrap().table.is_some());
        for (i, p) in paths.iter().enumerate() {
            assert!(i == 3 || is_locked(p), "{p:?}");
        }
    }
}
