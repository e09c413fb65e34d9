//! What the WAL writer and the checkpointer need of a partition while its owner keeps
//! appending: its next offset, its write buffer, and the segment files that await a sync.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::buffer::{Budget, WriteBuffer};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::log::LogState;

/// What the checkpointer needs of a partition while its owner keeps appending.
#[derive(Debug)]
pub(crate) struct PartitionShared {
    pub dir: PathBuf,
    /// The log's next offset: every offset below it is in a segment file.
    pub next: AtomicU64,
    /// Appended batches not yet written to the active segment's file.
    pub buffer: WriteBuffer,
    /// Set after every write to the segments; a sync clears it before it syncs.
    dirty: AtomicBool,
    files: Mutex<SyncSet>,
    /// The partition was deleted: there is nothing left to make durable.
    deleted: AtomicBool,
}

#[derive(Debug, Default)]
struct SyncSet {
    active: Option<Arc<File>>,
    sealed: Vec<Arc<File>>,
    dir_dirty: bool,
}

impl PartitionShared {
    pub fn new(dir: PathBuf, state: &LogState, budget: Arc<Budget>) -> Self {
        Self {
            dir,
            next: AtomicU64::new(state.next),
            buffer: WriteBuffer::new(budget),
            dirty: AtomicBool::new(true),
            deleted: AtomicBool::new(false),
            files: Mutex::new(SyncSet {
                active: state.active().map(|s| s.file().clone()),
                sealed: Vec::new(),
                dir_dirty: true,
            }),
        }
    }

    fn files(&self) -> std::sync::MutexGuard<'_, SyncSet> {
        self.files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn rolled(&self, old: Arc<File>, new: Arc<File>) {
        let mut f = self.files();
        f.sealed.push(old);
        f.active = Some(new);
        f.dir_dirty = true;
    }

    /// Points the sync at a new active segment after a failed append was rolled back,
    /// keeping the sealed segments that still await their sync.
    pub fn reactivate(&self, active: Arc<File>) {
        let mut f = self.files();
        f.active = Some(active);
        f.dir_dirty = true;
    }

    /// Forgets pending syncs: only after `sync` made everything durable.
    pub fn reset(&self, active: Option<Arc<File>>) {
        let mut f = self.files();
        *f = SyncSet {
            active,
            sealed: Vec::new(),
            dir_dirty: false,
        };
    }

    /// Makes every batch appended to this partition so far durable in its segments.
    pub fn sync(&self) -> Result<()> {
        self.unless_deleted(
            self.buffer
                .flush(&self.dirty)
                .and_then(|()| self.sync_files()),
        )
    }

    /// Makes every byte written to this partition's segment files so far durable.
    pub fn sync_written(&self) -> Result<()> {
        self.unless_deleted(self.sync_files())
    }

    /// Writes the buffered batches to the segment file, without a sync.
    pub fn flush(&self) -> Result<()> {
        self.unless_deleted(self.buffer.flush(&self.dirty))
    }

    /// Buffering is off: appends write through to the segment at once.
    pub fn write_through(&self) -> bool {
        self.buffer.write_through()
    }

    /// Work queued before the partition was deleted finds its files gone.
    fn unless_deleted(&self, r: Result<()>) -> Result<()> {
        match r {
            Err(_) if self.deleted.load(Ordering::Acquire) => Ok(()),
            other => other,
        }
    }

    /// The lock is held across the syncs: a second caller (the WAL writer's direct sync and
    /// the checkpointer) waits for a sync in flight instead of taking its cleared flag as done.
    fn sync_files(&self) -> Result<()> {
        let mut f = self.files();
        let dirty = self.dirty.swap(false, Ordering::AcqRel);
        if self.deleted.load(Ordering::Acquire) || (!dirty && f.sealed.is_empty() && !f.dir_dirty) {
            return Ok(());
        }
        for file in f.sealed.iter().chain(f.active.iter()) {
            file.sync_data()
                .map_err(|e| Error::io("sync segment in", &self.dir, e))?;
        }
        f.sealed.clear();
        if std::mem::take(&mut f.dir_dirty) {
            fsutil::sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// The partition is being deleted.
    pub fn mark_deleted(&self) {
        self.deleted.store(true, Ordering::Release);
        self.buffer.discard();
    }

    /// Records an append to the segments: the data up to `next` is written, not yet synced.
    pub fn appended(&self, next: u64) {
        self.dirty.store(true, Ordering::Relaxed);
        self.next.store(next, Ordering::Release);
    }
}
