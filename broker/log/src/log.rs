//! One partition's log: its segments, appends, reads, truncation and purging.
//!
//! A `Log` is owned by one task (the partition's actor) and takes `&mut self` for
//! changes, so nothing on the append path locks across partitions except the shared
//! write-ahead log queue and the batch cache.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::PartitionId;
use crate::batch::RecordBatch;
use crate::config::PartitionConfig;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::segment::Segment;
use crate::shared::PartitionShared;
use crate::storage::Inner;
use crate::wal::{Cmd, Completion, OnDurable};

/// A partition's segments and offsets; parked in the storage while no `Log` holds it.
#[derive(Debug, Default)]
pub(crate) struct LogState {
    /// Segments by base offset; the last one takes appends.
    pub segments: BTreeMap<u64, Segment>,
    pub start: u64,
    pub next: u64,
}

impl LogState {
    pub fn active(&self) -> Option<&Segment> {
        self.segments.values().next_back()
    }
}

/// One partition's log.
pub struct Log {
    id: PartitionId,
    config: PartitionConfig,
    state: LogState,
    shared: Arc<PartitionShared>,
    storage: Arc<Inner>,
    deleted: bool,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("id", &self.id)
            .field("start", &self.state.start)
            .field("next", &self.state.next)
            .field("segments", &self.state.segments.len())
            .finish()
    }
}

impl Log {
    pub(crate) fn new(
        id: PartitionId,
        config: PartitionConfig,
        state: LogState,
        shared: Arc<PartitionShared>,
        storage: Arc<Inner>,
    ) -> Self {
        Self {
            id,
            config,
            state,
            shared,
            storage,
            deleted: false,
        }
    }

    /// The partition id.
    pub fn id(&self) -> PartitionId {
        self.id
    }

    /// The first offset that can be read.
    pub fn start_offset(&self) -> u64 {
        self.state.start
    }

    /// The offset the next appended record gets.
    pub fn next_offset(&self) -> u64 {
        self.state.next
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.state.segments.len()
    }

    /// This partition's settings.
    pub fn config(&self) -> &PartitionConfig {
        &self.config
    }

    /// Appends batches that continue the log (the first one's base offset is
    /// `next_offset()`). Returns once they are readable (written to the segment, or held
    /// in its write buffer); `done` is called once they are durable under the partition's
    /// sync policy, or with the error that stopped them. On `Err` nothing was appended
    /// and `done` is not called.
    pub fn append(&mut self, batches: Vec<RecordBatch>, done: OnDurable) -> Result<()> {
        self.storage.check_writable()?;
        let mut expected = self.state.next;
        for b in &batches {
            if b.base_offset() != expected {
                return Err(Error::OffsetMismatch {
                    partition: self.id,
                    expected,
                    got: b.base_offset(),
                });
            }
            if b.len() > self.storage.config.max_batch_bytes {
                return Err(Error::BatchTooLarge {
                    size: b.len(),
                    limit: self.storage.config.max_batch_bytes,
                });
            }
            expected = b.next_offset();
        }
        if batches.is_empty() {
            done(Ok(()));
            return Ok(());
        }
        let bytes: usize = batches.iter().map(RecordBatch::len).sum();
        if self.rolls(batches[0].len() as u64, bytes as u64) || self.shared.write_through() {
            self.write_through(&batches)?;
        } else {
            self.buffer(&batches, bytes)?;
        }
        self.storage.cache.insert(self.id, &batches);
        let cmd = Cmd::Append {
            partition: self.id,
            shared: self.shared.clone(),
            batches,
            policy: self.config.sync_policy,
            done: Some(Completion::new(done)),
        };
        // The storage closed meanwhile: the batches stay in the segment as whole valid
        // batches (its final checkpoint may already count them), unacknowledged.
        self.storage.wal.append(cmd)
    }

    /// Writes the batches to the segments at once (a roll seals a file, so nothing of it
    /// may wait in the buffer), after what the buffer holds.
    fn write_through(&mut self, batches: &[RecordBatch]) -> Result<()> {
        self.shared.flush()?;
        let before = self.state.next;
        let written = self.write_segments(batches);
        if written.is_err() {
            self.rollback(before);
        }
        written
    }

    /// Adds the batches to the active segment's write buffer, writing out what it holds
    /// first when that is due: a refusal leaves nothing of this append behind.
    fn buffer(&mut self, batches: &[RecordBatch], bytes: usize) -> Result<()> {
        if self.shared.buffer.due(bytes) {
            self.shared.flush()?;
        }
        let Some(active) = self.state.segments.values_mut().next_back() else {
            return Err(Error::Closed);
        };
        let pos = active.record(batches);
        self.shared
            .buffer
            .push(active.file(), active.path(), pos, batches);
        self.state.next = active.next_offset();
        self.shared.appended(self.state.next);
        Ok(())
    }

    fn write_segments(&mut self, batches: &[RecordBatch]) -> Result<()> {
        let mut from = 0;
        while from < batches.len() {
            self.roll_if_needed(batches[from].len() as u64)?;
            // Take as many batches as fit before the next roll.
            let room = self
                .config
                .segment_bytes
                .saturating_sub(self.state.active().map_or(0, Segment::size));
            let mut to = from + 1;
            let mut bytes = batches[from].len() as u64;
            while to < batches.len() && bytes + batches[to].len() as u64 <= room {
                bytes += batches[to].len() as u64;
                to += 1;
            }
            let Some(active) = self.state.segments.values_mut().next_back() else {
                return Err(Error::Closed);
            };
            active.append(&batches[from..to])?;
            self.state.next = batches[to - 1].next_offset();
            self.shared.appended(self.state.next);
            from = to;
        }
        Ok(())
    }

    /// Whether an append of `total` bytes, starting with a batch of `first` bytes, rolls
    /// the active segment before it or on the way.
    fn rolls(&self, first: u64, total: u64) -> bool {
        self.state.active().is_none_or(|active| {
            self.roll_due(active, first) || active.size() + total > self.config.segment_bytes
        })
    }

    fn roll_due(&self, active: &Segment, incoming: u64) -> bool {
        let full = active.size() > 0 && active.size() + incoming > self.config.segment_bytes;
        let old = self
            .config
            .segment_age
            .is_some_and(|age| active.first_append().is_some_and(|t| t.elapsed() >= age));
        let offsets = self.state.next - active.base >= u64::from(u32::MAX / 2);
        full || old || offsets
    }

    fn roll_if_needed(&mut self, incoming: u64) -> Result<()> {
        let Some(active) = self.state.active() else {
            return Err(Error::Closed);
        };
        if !self.roll_due(active, incoming) {
            return Ok(());
        }
        active.seal()?;
        let old_file = active.file().clone();
        let seg = Segment::create(
            &self.shared.dir,
            self.state.next,
            self.storage.config.index_interval_bytes,
        )?;
        self.shared.rolled(old_file, seg.file().clone());
        self.state.segments.insert(seg.base, seg);
        Ok(())
    }

    /// Undoes a failed append in memory and on disk. If the files cannot be cut back, later
    /// appends would land behind the stale bytes: the storage is poisoned instead.
    fn rollback(&mut self, next: u64) {
        // Under the table lock, so that a checkpoint cannot count the batches being cut.
        let mut table = self.storage.table();
        let mut undo = Ok(());
        while self.state.segments.len() > 1
            && let Some(entry) = self.state.segments.last_entry()
            && *entry.key() > next
        {
            undo = undo.and(entry.remove().delete());
        }
        if let Some(active) = self.state.segments.values_mut().next_back() {
            undo = undo.and(active.truncate_from(next).map(drop));
            self.shared.reactivate(active.file().clone());
        }
        if let Some(entry) = table.entries.get_mut(&self.id)
            && entry.end > next
        {
            entry.end = next;
            undo = undo.and(self.storage.save_checkpoint(&table));
        }
        if let Err(e) = undo {
            self.storage.poison.set_error(&self.shared.dir, e);
        }
        self.state.next = next;
        self.shared.next.store(next, Ordering::Release);
        self.storage.cache.truncate_from(self.id, next);
    }

    /// Reads whole batches from the one containing `offset`: at least one batch if any is
    /// readable, then up to `max_bytes`, and never a batch ending past `high_watermark`
    /// (so readers see only what the caller knows is committed).
    pub fn read(
        &self,
        offset: u64,
        max_bytes: usize,
        high_watermark: u64,
    ) -> Result<Vec<RecordBatch>> {
        if offset < self.state.start || offset > self.state.next {
            return Err(Error::OffsetOutOfRange {
                partition: self.id,
                offset,
                start: self.state.start,
                next: self.state.next,
            });
        }
        let limit = high_watermark.min(self.state.next);
        if offset >= limit {
            return Ok(Vec::new());
        }
        if let Some(hit) = self.storage.cache.read(self.id, offset, max_bytes, limit) {
            return Ok(hit);
        }
        // The active segment's file ends where its write buffer begins.
        let mut buffered = Vec::new();
        let written = self.shared.buffer.read_from(offset, &mut buffered);
        let active = self.state.active().map_or(0, |s| s.base);
        let mut out = Vec::new();
        let mut gathered = 0;
        let mut at = offset;
        let first = self
            .state
            .segments
            .range(..=offset)
            .next_back()
            .map_or(0, |(b, _)| *b);
        for (&base, seg) in self.state.segments.range(first..) {
            if at >= limit || (gathered >= max_bytes && !out.is_empty()) {
                break;
            }
            if seg.next_offset() <= at {
                continue;
            }
            let before = out.len();
            gathered += seg.read(
                at,
                max_bytes.saturating_sub(gathered).max(1),
                limit,
                if base == active { written } else { u64::MAX },
                &mut out,
            )?;
            match out.last() {
                Some(last) if out.len() > before => at = last.next_offset(),
                // The high watermark or the write buffer begins inside this segment.
                _ => break,
            }
        }
        for b in buffered {
            if b.next_offset() > limit || (gathered >= max_bytes && !out.is_empty()) {
                break;
            }
            if b.next_offset() > at {
                at = b.next_offset();
                gathered += b.len();
                out.push(b);
            }
        }
        Ok(out)
    }

    /// The first readable offset whose record timestamp is ≥ `timestamp` (ms), if any.
    pub fn offset_for_timestamp(&self, timestamp: i64) -> Result<Option<u64>> {
        // Rare enough to scan the files only, once they hold everything.
        self.shared.flush()?;
        for seg in self.state.segments.values() {
            if seg.max_timestamp() >= timestamp
                && let Some(o) = seg.offset_for_time(timestamp, self.state.start)?
            {
                return Ok(Some(o));
            }
        }
        Ok(None)
    }

    /// Where retention lets the log start: after the sealed segments wholly older than
    /// `keep_ms` (their newest record before `now_ms - keep_ms`), and after the sealed
    /// segments older than the newest ones that hold at least `keep_bytes`. Whole segments
    /// only, as Kafka does; the active segment always stays. `start_offset` if nothing may
    /// go.
    pub fn retention_point(
        &self,
        now_ms: i64,
        keep_ms: Option<u64>,
        keep_bytes: Option<u64>,
    ) -> u64 {
        let sealed: Vec<&Segment> = {
            let mut all: Vec<&Segment> = self.state.segments.values().collect();
            all.pop(); // the active one
            all
        };
        let mut point = self.state.start;
        if let Some(ms) = keep_ms {
            let oldest = now_ms.saturating_sub(i64::try_from(ms).unwrap_or(i64::MAX));
            if let Some(last_old) = sealed
                .iter()
                .take_while(|s| s.max_timestamp() < oldest)
                .last()
            {
                point = point.max(last_old.next_offset());
            }
        }
        if let Some(bytes) = keep_bytes {
            // The newest segments holding at least `bytes` stay; the older ones go.
            let mut kept: u64 = self.state.active().map_or(0, Segment::size);
            for seg in sealed.iter().rev() {
                if kept >= bytes {
                    point = point.max(seg.next_offset());
                    break;
                }
                kept = kept.saturating_add(seg.size());
            }
        }
        point
    }

    /// Where a log whose records below `offset` are no longer needed (a queue's settled
    /// floor) may start: the start of the segment holding `offset`, so that only whole
    /// segments before it go; `start_offset` if none may.
    pub fn release_point(&self, offset: u64) -> u64 {
        self.state
            .segments
            .range(..=offset)
            .next_back()
            .map_or(self.state.start, |(base, _)| *base)
            .max(self.state.start)
    }

    /// Removes the batch containing `offset` and everything after it (Raft conflict
    /// resolution). Durable when it returns.
    pub fn truncate_from(&mut self, offset: u64) -> Result<()> {
        if offset >= self.state.next {
            return Ok(());
        }
        if offset < self.state.start {
            return Err(Error::OffsetOutOfRange {
                partition: self.id,
                offset,
                start: self.state.start,
                next: self.state.next,
            });
        }
        self.storage.check_writable()?;
        // Everything this log queued is durable in the WAL, at positions before `barrier`.
        let barrier = self.storage.wal.barrier()?;
        let storage = self.storage.clone();
        let mut table = storage.table();
        // The segments then hold it all durably, so replay may start at `barrier`.
        self.shared.sync()?;
        // Record the new end before any file is cut or deleted: a crash in between leaves a
        // checkpoint that recovery cuts the files back to, never one vouching for bytes
        // that are gone.
        let Some(holding) = self
            .state
            .segments
            .range(..=offset)
            .next_back()
            .map(|(_, s)| s)
        else {
            return Err(Error::Closed);
        };
        let (_, next) = holding.batch_containing(offset)?;
        let start = self.state.start.min(next);
        let entry = table
            .entries
            .get_mut(&self.id)
            .ok_or(Error::UnknownPartition(self.id))?;
        entry.end = next;
        entry.start = start;
        entry.replay_from = barrier;
        entry.cut_pending = true;
        self.storage.save_checkpoint(&table)?;
        // The table stays locked until `shared.next` is cut too, so no checkpoint in
        // between records the old end again. Past this point a failure leaves the files
        // and the memory apart: the storage is poisoned (recovery finishes the cut).
        let cut = self.cut_files(offset, next, start);
        let cut = cut.and_then(|()| {
            if let Some(entry) = table.entries.get_mut(&self.id) {
                entry.cut_pending = false;
            }
            self.storage.save_checkpoint(&table)
        });
        if let Err(e) = cut {
            self.storage.poison.set_error(&self.shared.dir, e);
            return self.storage.poison.check();
        }
        Ok(())
    }

    /// The file work of `truncate_from`: cut, sync, and move the in-memory state along.
    fn cut_files(&mut self, offset: u64, next: u64, start: u64) -> Result<()> {
        while self.state.segments.len() > 1
            && let Some(entry) = self.state.segments.last_entry()
            && *entry.key() > offset
        {
            entry.remove().delete()?;
        }
        let Some(active) = self.state.segments.values_mut().next_back() else {
            return Err(Error::Closed);
        };
        active.truncate_from(offset)?;
        for ext in ["index", "timeindex"] {
            let _ = std::fs::remove_file(
                self.shared
                    .dir
                    .join(crate::segment::file_name(active.base, ext)),
            );
        }
        active
            .file()
            .sync_data()
            .map_err(|e| Error::io("sync", active.path(), e))?;
        fsutil::sync_dir(&self.shared.dir)?;
        self.shared.reset(Some(active.file().clone()));
        self.state.next = next;
        self.state.start = start;
        self.shared.next.store(next, Ordering::Release);
        self.storage.cache.truncate_from(self.id, next);
        Ok(())
    }

    /// Makes offsets below `offset` unreadable and deletes the segments wholly below it
    /// (retention, or the release cursor). Durable when it returns.
    pub fn purge_to(&mut self, offset: u64) -> Result<()> {
        let offset = offset.min(self.state.next);
        if offset <= self.state.start {
            return Ok(());
        }
        self.storage.check_writable()?;
        {
            // Sync first so the checkpoint can vouch for everything up to the log end: the
            // segments that held the old `end` may be among those deleted below.
            let mut table = self.storage.table();
            self.shared.sync()?;
            let entry = table
                .entries
                .get_mut(&self.id)
                .ok_or(Error::UnknownPartition(self.id))?;
            entry.start = offset;
            entry.end = self.state.next;
            self.storage.save_checkpoint(&table)?;
        }
        self.state.start = offset;
        // A segment goes once the next one starts at or below the purge point; the active one stays.
        let doomed: Vec<u64> = self
            .state
            .segments
            .keys()
            .zip(self.state.segments.keys().skip(1))
            .take_while(|(_, next_base)| **next_base <= offset)
            .map(|(base, _)| *base)
            .collect();
        for base in doomed {
            if let Some(seg) = self.state.segments.remove(&base) {
                seg.delete()?;
            }
        }
        self.storage.cache.purge_to(self.id, offset);
        Ok(())
    }

    /// Moves an empty log (everything purged) forward, so that its next append starts at
    /// `offset`: a replica that caught up from a snapshot goes on at its leader's offsets.
    /// Durable when it returns.
    pub fn skip_to(&mut self, offset: u64) -> Result<()> {
        let (start, next) = (self.state.start, self.state.next);
        if offset == next {
            return Ok(());
        }
        if start != next || offset < next {
            return Err(Error::OffsetOutOfRange {
                partition: self.id,
                offset,
                start,
                next,
            });
        }
        self.storage.check_writable()?;
        self.shared.flush()?;
        // Earlier WAL records of this partition are all below `offset`: replay skips them.
        let barrier = self.storage.wal.barrier()?;
        let seg = Segment::create(
            &self.shared.dir,
            offset,
            self.storage.config.index_interval_bytes,
        )?;
        fsutil::sync_dir(&self.shared.dir)?;
        // A crash before the checkpoint names `offset` leaves the new segment after a gap,
        // which recovery deletes; after it, the old segments lie wholly below the start,
        // which recovery deletes too.
        let old = {
            let mut table = self.storage.table();
            let entry = table
                .entries
                .get_mut(&self.id)
                .ok_or(Error::UnknownPartition(self.id))?;
            entry.start = offset;
            entry.end = offset;
            entry.replay_from = barrier;
            self.storage.save_checkpoint(&table)?;
            self.shared.reset(Some(seg.file().clone()));
            self.shared.next.store(offset, Ordering::Release);
            self.state.start = offset;
            self.state.next = offset;
            std::mem::replace(&mut self.state.segments, BTreeMap::from([(offset, seg)]))
        };
        self.storage.cache.purge_to(self.id, offset);
        for seg in old.into_values() {
            seg.delete()?;
        }
        Ok(())
    }

    /// Deletes the partition and all its data.
    pub fn delete(mut self) -> Result<()> {
        self.storage.check_open()?;
        self.deleted = true;
        self.storage.delete_partition(self.id, &self.shared.dir)
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        if !self.deleted {
            self.storage.park(self.id, std::mem::take(&mut self.state));
        }
    }
}
