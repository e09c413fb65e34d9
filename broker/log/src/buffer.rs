//! A partition's write buffer: batches already counted in its active segment but not yet
//! written to the file.
//!
//! Small appends are durable through the WAL; writing each to its segment at once would
//! cost the appender a system call (and the file system its per-write work) per append.
//! They gather here and go to the file in one write once [`FLUSH_BYTES`] have come, when
//! the node's buffers together pass their budget, before the segment rolls, and before
//! anything syncs or scans the file (RabbitMQ Ra's mem table, flushed by size). The
//! batches are shared with the cache, not copied.

use std::fs::File;
use std::io::IoSlice;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::batch::RecordBatch;
use crate::error::{Error, Result};
use crate::fsutil;

/// A partition's buffer is written out once it holds this many bytes.
pub(crate) const FLUSH_BYTES: usize = 128 << 10;

/// Bytes buffered across the node, against a budget.
#[derive(Debug)]
pub(crate) struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// Buffering is off: every append writes through.
    pub fn write_through(&self) -> bool {
        self.limit == 0
    }

    /// Bytes buffered across the node.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
pub(crate) struct WriteBuffer {
    pending: Mutex<Pending>,
    budget: Arc<Budget>,
}

#[derive(Debug, Default)]
struct Pending {
    /// The file the batches go to and its path (for errors); set while any are buffered.
    file: Option<(Arc<File>, PathBuf)>,
    /// File position of the first buffered batch.
    pos: u64,
    batches: Vec<RecordBatch>,
    bytes: usize,
}

impl WriteBuffer {
    pub fn new(budget: Arc<Budget>) -> Self {
        Self {
            pending: Mutex::new(Pending::default()),
            budget,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Buffering is off: every append writes through.
    pub fn write_through(&self) -> bool {
        self.budget.write_through()
    }

    /// Whether the buffer should be written out before `incoming` more bytes join it.
    pub fn due(&self, incoming: usize) -> bool {
        let bytes = self.lock().bytes;
        bytes > 0
            && (bytes + incoming >= FLUSH_BYTES
                || self.budget.used() + incoming > self.budget.limit)
    }

    /// Buffers batches that continue the file at `pos`.
    pub fn push(&self, file: &Arc<File>, path: &Path, pos: u64, batches: &[RecordBatch]) {
        let mut p = self.lock();
        if p.file.is_none() {
            p.file = Some((file.clone(), path.to_path_buf()));
            p.pos = pos;
        }
        debug_assert!(p.file.as_ref().is_some_and(|(f, _)| Arc::ptr_eq(f, file)));
        debug_assert_eq!(p.pos + p.bytes as u64, pos);
        let bytes: usize = batches.iter().map(RecordBatch::len).sum();
        p.batches.extend_from_slice(batches);
        p.bytes += bytes;
        self.budget.used.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Writes everything buffered to its file and sets `dirty` (before another flush can
    /// find the buffer empty and go on to sync). On failure the file is cut back to where it
    /// was and the batches stay buffered (they are durable in the WAL meanwhile).
    pub fn flush(&self, dirty: &AtomicBool) -> Result<()> {
        let mut p = self.lock();
        let Some((file, path)) = &p.file else {
            return Ok(());
        };
        let mut slices: Vec<IoSlice<'_>> = p
            .batches
            .iter()
            .map(|b| IoSlice::new(b.as_bytes()))
            .collect();
        if let Err(e) = fsutil::append_all(file, &mut slices) {
            // Best effort: if this fails too, recovery cuts the file back to the checkpoint.
            let _ = file.set_len(p.pos);
            return Err(Error::io("write to", path, e));
        }
        dirty.store(true, Ordering::Release);
        self.clear(&mut p);
        Ok(())
    }

    /// Drops what is buffered (the partition is being deleted).
    pub fn discard(&self) {
        let mut p = self.lock();
        self.clear(&mut p);
    }

    fn clear(&self, p: &mut Pending) {
        self.budget.used.fetch_sub(p.bytes, Ordering::Relaxed);
        p.file = None;
        p.batches.clear();
        p.bytes = 0;
    }

    /// For a read from `offset`: the file position where the file's data ends (the first
    /// buffered byte, or `u64::MAX` if nothing is buffered), with the buffered batches
    /// that reach past `offset` added to `out`.
    pub fn read_from(&self, offset: u64, out: &mut Vec<RecordBatch>) -> u64 {
        let p = self.lock();
        if p.file.is_none() {
            return u64::MAX;
        }
        out.extend(
            p.batches
                .iter()
                .filter(|b| b.next_offset() > offset)
                .cloned(),
        );
        p.pos
    }
}
