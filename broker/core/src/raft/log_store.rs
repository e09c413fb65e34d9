//! `RaftLogStorage` over a partition's `petrel_log::Log`.
//!
//! Raft indexes and record offsets both rise along the log, one entry per batch, so the
//! batch holding an index is found by bisecting the offsets (recent batches come from the
//! log's cache); each reader remembers where its last read ended, so the sequential reads
//! of replication and apply find their next batch at once.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, LogState, RaftLogReader, StorageIOError, Vote,
};
use petrel_log::{Log, RecordBatch};

use super::{NodeId, PartitionRaft, Proposal, RaftStoreError, StorageError, entry, files};

/// Bytes a reader asks the log for at a time.
const READ_BYTES: usize = 1 << 20;

/// A partition's Raft log: its `Log`, plus the vote and purge point in small files.
pub struct LogStore {
    log: Arc<RwLock<Log>>,
    dir: PathBuf,
    vote: Option<Vote<NodeId>>,
    purged: Option<LogId<NodeId>>,
    last: Option<LogId<NodeId>>,
    reader: LogReader,
    /// Where the log goes on once emptied: the offset after the last entry of the state
    /// the state machine holds (set when it installs a snapshot).
    resume: Arc<AtomicU64>,
    /// Where an emptied log gets the batches its leader still keeps below `resume`.
    backfill: Option<Backfill>,
}

/// Fetches from a group's leader the batches its log keeps below an offset (all of them,
/// Raft's own entries too, in order), for a replica that caught up from a snapshot:
/// a snapshot holds state only, and the messages retention still keeps below it must
/// not be missing on the new replica. An empty answer means none could be had.
pub type Backfill = Arc<
    dyn Fn(u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<RecordBatch>> + Send>>
        + Send
        + Sync,
>;

/// Reads a partition's Raft log while its `LogStore` appends. It does not keep the log:
/// once the store is dropped (the group stopped), reads fail and the log returns to the
/// storage.
#[derive(Clone)]
pub struct LogReader {
    log: Weak<RwLock<Log>>,
    /// Where the last read ended: the next index and the offset of its batch.
    hint: Option<(u64, u64)>,
}

impl LogStore {
    /// Opens the Raft log kept in `log`, with its vote and purge point in `dir`.
    pub(super) fn open(
        log: Log,
        dir: impl Into<PathBuf>,
        resume: Arc<AtomicU64>,
    ) -> Result<Self, RaftStoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| RaftStoreError::file("create", &dir, e))?;
        let vote = files::read(&dir.join("vote"))?;
        let purged = files::read(&dir.join("purged"))?;
        let last = last_log_id(&log)?;
        let log = Arc::new(RwLock::new(log));
        let reader = LogReader {
            log: Arc::downgrade(&log),
            hint: None,
        };
        Ok(Self {
            log,
            dir,
            vote,
            purged,
            last,
            reader,
            resume,
            backfill: None,
        })
    }

    /// Fills an emptied log from `backfill` before it goes on after a snapshot.
    pub fn with_backfill(mut self, backfill: Backfill) -> Self {
        self.backfill = Some(backfill);
        self
    }

    /// The batches below `resume` to write first into this emptied log: fetched, and
    /// kept only if they are contiguous and end exactly at `resume`.
    async fn backfilled(&self, resume: u64) -> Vec<RecordBatch> {
        let Some(backfill) = &self.backfill else {
            return Vec::new();
        };
        let batches = backfill(resume).await;
        let contiguous = batches
            .windows(2)
            .all(|w| w[0].next_offset() == w[1].base_offset());
        let ends = batches.last().map(RecordBatch::next_offset);
        if !contiguous || ends != Some(resume) {
            if !batches.is_empty() {
                tracing::warn!(
                    resume,
                    "backfill does not end where the snapshot does; skipped"
                );
            }
            return Vec::new();
        }
        batches
    }
}

// The guards take the field, not `self`, so the other fields stay free to update.
fn write(log: &RwLock<Log>) -> RwLockWriteGuard<'_, Log> {
    log.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read(log: &RwLock<Log>) -> RwLockReadGuard<'_, Log> {
    log.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read_err(e: &(impl std::error::Error + 'static)) -> StorageError {
    StorageIOError::read_logs(AnyError::new(e)).into()
}

fn write_err(e: &(impl std::error::Error + 'static)) -> StorageError {
    StorageIOError::write_logs(AnyError::new(e)).into()
}

/// The batch holding `offset`.
fn batch_at(log: &Log, offset: u64) -> Result<RecordBatch, RaftStoreError> {
    log.read(offset, 1, u64::MAX)?
        .into_iter()
        .next()
        .ok_or(RaftStoreError::Missing(offset))
}

/// The first batch whose Raft index is at least `index`, if any; `hint` is a guess at
/// where it starts (index, offset).
fn seek(
    log: &Log,
    index: u64,
    hint: Option<(u64, u64)>,
) -> Result<Option<RecordBatch>, RaftStoreError> {
    let (mut lo, mut hi) = (log.start_offset(), log.next_offset());
    if let Some((at, offset)) = hint
        && at == index
        && (lo..hi).contains(&offset)
    {
        let b = batch_at(log, offset)?;
        if b.raft_index() == index {
            return Ok(Some(b));
        }
    }
    let mut found = None;
    while lo < hi {
        let b = batch_at(log, lo + (hi - lo) / 2)?;
        if b.raft_index() >= index {
            hi = b.base_offset();
            found = Some(b);
        } else {
            lo = b.next_offset();
        }
    }
    Ok(found)
}

fn last_log_id(log: &Log) -> Result<Option<LogId<NodeId>>, RaftStoreError> {
    if log.next_offset() <= log.start_offset() {
        return Ok(None);
    }
    Ok(Some(entry::log_id(&batch_at(log, log.next_offset() - 1)?)))
}

/// Where a replicated message entry sits in its leader's log (a new proposal is not
/// placed yet: its header holds no Raft index).
fn placed_at(e: &Entry<PartitionRaft>) -> Option<u64> {
    match &e.payload {
        EntryPayload::Normal(Proposal(b))
            if b.raft_index() == e.log_id.index && b.raft_index() != 0 =>
        {
            Some(b.base_offset())
        }
        _ => None,
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&i) => i,
        Bound::Excluded(&i) => i.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&i) => i.saturating_add(1),
        Bound::Excluded(&i) => i,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl LogReader {
    /// The last Raft index a purge may remove: the entries before the start of the
    /// sealed segments retention lets go (by record time `keep_ms` before `now_ms`, and by
    /// size `keep_bytes`), or — with `settled_below` — those wholly below a queue's settled
    /// floor; `None` if nothing may go.
    pub fn release_index(
        &self,
        now_ms: i64,
        retention: (Option<u64>, Option<u64>),
        settled_below: Option<u64>,
    ) -> Result<Option<u64>, RaftStoreError> {
        let log = self.log.upgrade().ok_or(RaftStoreError::Stopped)?;
        let log = read(&log);
        let (keep_ms, keep_bytes) = retention;
        let point = match settled_below {
            Some(floor) => log.release_point(floor),
            None => log.retention_point(now_ms, keep_ms, keep_bytes),
        };
        if point <= log.start_offset() || point >= log.next_offset() {
            return Ok(None);
        }
        Ok(batch_at(&log, point)?.raft_index().checked_sub(1))
    }

    /// Every batch, Raft's own entries too, from the one at `offset` (or the log's start,
    /// if later) up to `upto`: about `max_bytes` of them, at least one if any.
    pub fn read_raw(
        &self,
        offset: u64,
        upto: u64,
        max_bytes: usize,
    ) -> Result<Vec<RecordBatch>, RaftStoreError> {
        let log = self.log.upgrade().ok_or(RaftStoreError::Stopped)?;
        let log = read(&log);
        let at = offset.max(log.start_offset());
        if at >= upto.min(log.next_offset()) {
            return Ok(Vec::new());
        }
        Ok(log.read(at, max_bytes, upto)?)
    }

    /// Message batches from the one holding `offset` on, up to about `max_bytes` (at least
    /// one batch if any), none reaching past `high_watermark`; Raft's own entries skipped.
    pub fn read_messages(
        &self,
        offset: u64,
        max_bytes: usize,
        high_watermark: u64,
    ) -> Result<Vec<RecordBatch>, RaftStoreError> {
        let log = self.log.upgrade().ok_or(RaftStoreError::Stopped)?;
        let log = read(&log);
        let mut out = Vec::new();
        let mut at = offset.max(log.start_offset());
        let mut gathered = 0;
        while at < high_watermark && (out.is_empty() || gathered < max_bytes) {
            let batches = log.read(
                at,
                max_bytes.saturating_sub(gathered).max(1),
                high_watermark,
            )?;
            let Some(last) = batches.last() else {
                break;
            };
            at = last.next_offset();
            for b in batches.into_iter().filter(|b| !b.is_control()) {
                gathered += b.len();
                out.push(b);
            }
        }
        Ok(out)
    }
}

impl RaftLogReader<PartitionRaft> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<PartitionRaft>>, StorageError> {
        let (start, end) = bounds(&range);
        let mut out = Vec::new();
        if start >= end {
            return Ok(out);
        }
        let Some(log) = self.log.upgrade() else {
            return Err(read_err(&RaftStoreError::Stopped));
        };
        let log = read(&log);
        let Some(first) = seek(&log, start, self.hint).map_err(|e| read_err(&e))? else {
            return Ok(out);
        };
        let mut offset = first.base_offset();
        'read: while offset < log.next_offset() {
            let batches = log
                .read(offset, READ_BYTES, u64::MAX)
                .map_err(|e| read_err(&e))?;
            if batches.is_empty() {
                break;
            }
            for b in batches {
                if b.raft_index() >= end {
                    break 'read;
                }
                offset = b.next_offset();
                self.hint = Some((b.raft_index() + 1, offset));
                out.push(entry::from_batch(b).map_err(|e| read_err(&e))?);
            }
        }
        Ok(out)
    }
}

impl RaftLogReader<PartitionRaft> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<PartitionRaft>>, StorageError> {
        self.reader.try_get_log_entries(range).await
    }
}

impl RaftLogStorage<PartitionRaft> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<PartitionRaft>, StorageError> {
        Ok(LogState {
            last_purged_log_id: self.purged,
            last_log_id: self.last.max(self.purged),
        })
    }

    async fn get_log_reader(&mut self) -> LogReader {
        LogReader {
            log: Arc::downgrade(&self.log),
            hint: None,
        }
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        files::write(&self.dir.join("vote"), vote).map_err(|e| StorageIOError::write_vote(&e))?;
        self.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        Ok(self.vote)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<PartitionRaft>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<PartitionRaft>> + Send,
        I::IntoIter: Send,
    {
        let mut entries = entries.into_iter().peekable();
        let resume = entries
            .peek()
            .and_then(placed_at)
            .unwrap_or(self.resume.load(Ordering::Acquire));
        // Only an emptied log that goes on above its end is backfilled (a replica that
        // caught up from a snapshot): one cheap look on every other append.
        let gap = |log: &Log| log.start_offset() == log.next_offset() && log.next_offset() < resume;
        let mut batches = Vec::new();
        if self.backfill.is_some() && entries.peek().is_some() && gap(&read(&self.log)) {
            batches = self.backfilled(resume).await;
        }
        let mut log = write(&self.log);
        match batches.first() {
            Some(first) if gap(&log) && first.base_offset() >= log.next_offset() => {
                log.skip_to(first.base_offset())
                    .map_err(|e| write_err(&e))?;
                tracing::info!(
                    from = first.base_offset(),
                    to = resume,
                    "backfilled the messages the leader keeps below its snapshot"
                );
            }
            _ => batches.clear(),
        }
        let mut last = None;
        for e in entries {
            let placed = placed_at(&e);
            if batches.is_empty() && log.start_offset() == log.next_offset() {
                // An emptied log (a snapshot replaced it) goes on at its leader's offsets.
                let resume = placed.unwrap_or(self.resume.load(Ordering::Acquire));
                if resume > log.next_offset() {
                    log.skip_to(resume).map_err(|e| write_err(&e))?;
                }
            }
            let next = batches
                .last()
                .map_or(log.next_offset(), RecordBatch::next_offset);
            if let Some(at) = placed
                && at != next
            {
                let e = RaftStoreError::Diverged {
                    index: e.log_id.index,
                    leader: at,
                    here: next,
                };
                return Err(write_err(&e));
            }
            last = Some(e.log_id);
            batches.push(entry::to_batch(e, next).map_err(|e| write_err(&e))?);
        }
        if batches.is_empty() {
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        // Completed by the storage's group commit, on its writer thread.
        let done = Box::new(move |r: petrel_log::Result<()>| {
            callback.log_io_completed(r.map_err(std::io::Error::other));
        });
        log.append(batches, done).map_err(|e| write_err(&e))?;
        self.last = last;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let mut log = write(&self.log);
        if let Some(b) = seek(&log, log_id.index, None).map_err(|e| read_err(&e))? {
            log.truncate_from(b.base_offset())
                .map_err(|e| write_err(&e))?;
        }
        self.last = last_log_id(&log).map_err(|e| read_err(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        // Recorded first: a crash before the log is purged leaves entries Raft no longer
        // asks for, never a purge point behind what is gone.
        files::write(&self.dir.join("purged"), &log_id).map_err(|e| write_err(&e))?;
        self.purged = Some(log_id);
        let mut log = write(&self.log);
        let upto =
            match seek(&log, log_id.index.saturating_add(1), None).map_err(|e| read_err(&e))? {
                Some(b) => b.base_offset(),
                None => log.next_offset(),
            };
        log.purge_to(upto).map_err(|e| write_err(&e))
    }
}
