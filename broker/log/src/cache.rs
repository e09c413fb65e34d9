//! The node-wide cache of recent batches: readers of the tail are served from memory,
//! and memory stays within one budget however much is stored.
//!
//! Each partition keeps its cached batches contiguous up to its log end; eviction is
//! first-in first-out across all partitions.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::PartitionId;
use crate::batch::RecordBatch;

struct Cached {
    seq: u64,
    batch: RecordBatch,
}

#[derive(Default)]
struct Inner {
    partitions: HashMap<PartitionId, VecDeque<Cached>>,
    /// Insertion order for eviction; entries already dropped by truncation are skipped.
    fifo: VecDeque<(PartitionId, u64)>,
    bytes: usize,
    /// Entries held; `fifo` is compacted when its stale entries outnumber them.
    live: usize,
    next_seq: u64,
}

/// A bounded, shared cache of recent batches.
pub(crate) struct Cache {
    inner: Mutex<Inner>,
    budget: usize,
}

impl Cache {
    pub fn new(budget: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps inconsistent in a way that
        // matters: at worst the byte count is off. Keep serving.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds batches that were just appended (contiguous with what is cached).
    pub fn insert(&self, partition: PartitionId, batches: &[RecordBatch]) {
        if self.budget == 0 {
            return;
        }
        let mut g = self.lock();
        let inner = &mut *g;
        let part = inner.partitions.entry(partition).or_default();
        if part.back().is_some_and(|c| {
            c.batch.next_offset() != batches.first().map_or(0, RecordBatch::base_offset)
        }) {
            // Not contiguous (should not happen): start over for this partition.
            inner.bytes -= part.iter().map(|c| c.batch.len()).sum::<usize>();
            inner.live -= part.len();
            part.clear();
        }
        for b in batches {
            let seq = inner.next_seq;
            inner.next_seq += 1;
            inner.bytes += b.len();
            inner.live += 1;
            part.push_back(Cached {
                seq,
                batch: b.clone(),
            });
            inner.fifo.push_back((partition, seq));
        }
        while inner.bytes > self.budget {
            let Some((pid, seq)) = inner.fifo.pop_front() else {
                break;
            };
            if let Some(p) = inner.partitions.get_mut(&pid)
                && p.front().is_some_and(|c| c.seq == seq)
                && let Some(c) = p.pop_front()
            {
                inner.bytes -= c.batch.len();
                inner.live -= 1;
            }
        }
        // Truncations and purges leave stale entries behind; drop them before they pile up.
        if inner.fifo.len() > 2 * inner.live + 1024 {
            let Inner {
                fifo, partitions, ..
            } = inner;
            fifo.retain(|(pid, seq)| {
                partitions
                    .get(pid)
                    .is_some_and(|p| p.binary_search_by_key(seq, |c| c.seq).is_ok())
            });
        }
    }

    /// Batches from the one containing `offset`, if it is cached, up to `max_bytes`
    /// (at least one) and not past `limit`.
    pub fn read(
        &self,
        partition: PartitionId,
        offset: u64,
        max_bytes: usize,
        limit: u64,
    ) -> Option<Vec<RecordBatch>> {
        let g = self.lock();
        let part = g.partitions.get(&partition)?;
        let i = part.partition_point(|c| c.batch.next_offset() <= offset);
        if part.get(i)?.batch.base_offset() > offset {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for c in part.range(i..) {
            if c.batch.next_offset() > limit || (bytes >= max_bytes && !out.is_empty()) {
                break;
            }
            bytes += c.batch.len();
            out.push(c.batch.clone());
        }
        Some(out)
    }

    /// Drops batches ending after `offset` (the log was truncated there).
    pub fn truncate_from(&self, partition: PartitionId, offset: u64) {
        let mut g = self.lock();
        let inner = &mut *g;
        if let Some(p) = inner.partitions.get_mut(&partition) {
            while p.back().is_some_and(|c| c.batch.next_offset() > offset) {
                if let Some(c) = p.pop_back() {
                    inner.bytes -= c.batch.len();
                    inner.live -= 1;
                }
            }
        }
    }

    /// Drops batches wholly before `offset`.
    pub fn purge_to(&self, partition: PartitionId, offset: u64) {
        let mut g = self.lock();
        let inner = &mut *g;
        if let Some(p) = inner.partitions.get_mut(&partition) {
            while p.front().is_some_and(|c| c.batch.next_offset() <= offset) {
                if let Some(c) = p.pop_front() {
                    inner.bytes -= c.batch.len();
                    inner.live -= 1;
                }
            }
        }
    }

    /// Forgets a partition.
    pub fn remove(&self, partition: PartitionId) {
        let mut g = self.lock();
        if let Some(p) = g.partitions.remove(&partition) {
            g.bytes -= p.iter().map(|c| c.batch.len()).sum::<usize>();
            g.live -= p.len();
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::BatchBuilder;

    fn batch(base: u64) -> RecordBatch {
        let mut b = BatchBuilder::new();
        b.push(0, None, &[0u8; 100], &[]);
        b.build(base, 1, base).expect("build")
    }

    #[test]
    fn the_budget_holds_and_the_oldest_go_first() {
        let one = batch(0).len();
        let cache = Cache::new(one * 3);
        for i in 0..5 {
            cache.insert(1, &[batch(i)]);
        }
        assert!(cache.bytes() <= one * 3);
        assert!(cache.read(1, 0, usize::MAX, u64::MAX).is_none(), "evicted");
        let got = cache.read(1, 3, usize::MAX, u64::MAX).expect("cached");
        assert_eq!(
            got.iter().map(RecordBatch::base_offset).collect::<Vec<_>>(),
            vec![3, 4]
        );
        let limited = cache.read(1, 2, 1, 4).expect("cached");
        assert_eq!(limited.len(), 1, "at least one batch, then the byte limit");
        assert!(
            cache.read(1, 2, usize::MAX, 3).expect("cached").len() == 1,
            "never past the limit"
        );
    }

    #[test]
    fn stale_entries_left_by_purges_do_not_pile_up_under_the_budget() {
        let cache = Cache::new(usize::MAX);
        for i in 0..10_000 {
            cache.insert(1, &[batch(i)]);
            cache.purge_to(1, i + 1);
        }
        let inner = cache.lock();
        assert!(inner.fifo.len() <= 2 * inner.live + 1024);
        drop(inner);
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn truncation_drops_the_tail_and_eviction_skips_stale_entries() {
        let one = batch(0).len();
        let cache = Cache::new(one * 3);
        cache.insert(1, &[batch(0), batch(1), batch(2)]);
        cache.truncate_from(1, 1);
        assert_eq!(cache.bytes(), one);
        cache.insert(1, &[batch(1), batch(2), batch(3)]);
        assert!(cache.bytes() <= one * 3);
        let got = cache.read(1, 1, usize::MAX, u64::MAX).expect("cached");
        assert_eq!(got.len(), 3);
    }
}
