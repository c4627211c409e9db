//! When each connection's timer runs out, kept in order, so that a loop round finds the next
//! deadline and the expired connections without looking at every connection.
//!
//! Why: the loop used to ask every connection for its deadline twice a round (the epoll timeout
//! and the timer check). With a lifetime handle per VM that is thousands of connections, and
//! the scan — a cache miss per connection — grew every request's latency with the number of VMs
//! (docs/benchmarks.md, issue 17). Here a deadline is recorded when it may have changed (the
//! loop re-records a connection whenever it touches it) and found again in O(log n).
//!
//! Entries are never updated in place: a new deadline is pushed and the old entry goes stale
//! (it no longer matches the recorded deadline) and is skipped when it comes up; the heap is
//! rebuilt when stale entries outnumber live ones.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::Hash;
use std::time::Instant;

/// Deadlines by key, earliest first.
#[derive(Debug)]
pub struct Clocks<K: Copy + Ord + Hash> {
    heap: BinaryHeap<Reverse<(Instant, K)>>,
    at: HashMap<K, Instant>,
}

impl<K: Copy + Ord + Hash> Default for Clocks<K> {
    fn default() -> Self {
        Clocks {
            heap: BinaryHeap::new(),
            at: HashMap::new(),
        }
    }
}

impl<K: Copy + Ord + Hash> Clocks<K> {
    /// Record `k`'s deadline now (None: it has no running clock).
    pub fn set(&mut self, k: K, t: Option<Instant>) {
        match t {
            None => {
                self.at.remove(&k);
            }
            Some(t) => {
                if self.at.insert(k, t) != Some(t) {
                    self.heap.push(Reverse((t, k)));
                }
            }
        }
        if self.heap.len() > 2 * self.at.len() + 64 {
            self.heap = self.at.iter().map(|(k, t)| Reverse((*t, *k))).collect();
        }
    }

    /// The earliest recorded deadline.
    pub fn next(&mut self) -> Option<Instant> {
        while let Some(Reverse((t, k))) = self.heap.peek().copied() {
            if self.at.get(&k) == Some(&t) {
                return Some(t);
            }
            self.heap.pop();
        }
        None
    }

    /// The keys whose deadline is at or before `now`; their deadlines are forgotten (record
    /// them again after looking at them).
    pub fn due(&mut self, now: Instant) -> Vec<K> {
        let mut out = Vec::new();
        while let Some(Reverse((t, k))) = self.heap.peek().copied() {
            if t > now {
                break;
            }
            self.heap.pop();
            if self.at.get(&k) == Some(&t) {
                self.at.remove(&k);
                out.push(k);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn deadlines_come_due_in_order_and_moved_ones_count_only_where_they_are_now() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut c: Clocks<u64> = Clocks::default();
        c.set(1, Some(at(30)));
        c.set(2, Some(at(10)));
        c.set(3, Some(at(20)));
        assert_eq!(c.next(), Some(at(10)));
        // 2 was active again: its deadline moves later; 3 stops its clock.
        c.set(2, Some(at(50)));
        c.set(3, None);
        assert_eq!(c.next(), Some(at(30)));
        assert_eq!(c.due(at(29)), Vec::<u64>::new());
        assert_eq!(c.due(at(40)), vec![1]);
        assert_eq!(c.next(), Some(at(50)));
        // Moved earlier (a refusal's deadline) counts at once.
        c.set(2, Some(at(5)));
        assert_eq!(c.due(at(6)), vec![2]);
        assert_eq!(c.next(), None);
        // Many moves of one key do not pile up.
        for i in 0..10_000 {
            c.set(7, Some(at(100 + i)));
        }
        assert!(c.heap.len() <= 2 * c.at.len() + 65, "{}", c.heap.len());
        assert_eq!(c.due(at(20_000)), vec![7]);
    }
}
