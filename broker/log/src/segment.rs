//! One segment file of a partition: batches back to back, named by the base offset.
//!
//! Appends go to the page cache; durability comes from the write-ahead log, from the WAL
//! writer syncing the segment directly (a large stream), or from the checkpointer, which
//! syncs segments before it retires the WAL that covers them.

use std::fs::{File, OpenOptions};
use std::io::IoSlice;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::batch::{self, HEADER_LEN, RecordBatch};
use crate::error::{BatchError, Corruption, Error, Result};
use crate::fsutil;
use crate::index::SegmentIndex;

/// How much a scan or a cold read fetches per system call.
const READ_CHUNK: usize = 256 << 10;

/// File name of the segment holding offsets from `base`.
pub(crate) fn file_name(base: u64, ext: &str) -> String {
    format!("{base:020}.{ext}")
}

/// Parses a segment file name back into its base offset.
pub(crate) fn parse_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".log")?;
    (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit())).then(|| stem.parse().ok())?
}

/// Deletes the files of segment `base` without opening it.
pub(crate) fn remove_files(dir: &Path, base: u64) -> Result<()> {
    for ext in ["index", "timeindex"] {
        let _ = std::fs::remove_file(dir.join(file_name(base, ext)));
    }
    let path = dir.join(file_name(base, "log"));
    std::fs::remove_file(&path).map_err(|e| Error::io("delete", &path, e))
}

/// Where a scan of a segment stopped.
#[derive(Debug)]
pub(crate) struct ScanEnd {
    /// Byte position after the last valid batch.
    pub position: u64,
    /// Offset after the last valid batch.
    pub next_offset: u64,
    /// Why the scan stopped before the end of the file, if it did.
    pub invalid: Option<Corruption>,
}

/// An open segment.
#[derive(Debug)]
pub(crate) struct Segment {
    /// First offset this segment holds.
    pub base: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Bytes of valid batches; the file ends here.
    size: u64,
    /// Offset after the last batch (the base when empty).
    next: u64,
    index: SegmentIndex,
    index_interval: u32,
    first_append: Option<Instant>,
}

impl Segment {
    fn new(base: u64, path: PathBuf, file: File, size: u64, index_interval: u32) -> Self {
        Self {
            base,
            path,
            file: Arc::new(file),
            size,
            next: base,
            index: SegmentIndex::new(index_interval),
            index_interval,
            first_append: None,
        }
    }

    /// Creates an empty segment (replacing any leftover files of that name).
    pub fn create(dir: &Path, base: u64, index_interval: u32) -> Result<Self> {
        let path = dir.join(file_name(base, "log"));
        let file = open_rw(&path, true)?;
        for ext in ["index", "timeindex"] {
            let _ = std::fs::remove_file(dir.join(file_name(base, ext)));
        }
        Ok(Self::new(base, path, file, 0, index_interval))
    }

    /// Opens a sealed segment whose successor starts at `next`: trusts its index files if
    /// they are valid, else rebuilds them by scanning (which validates every batch).
    pub fn open_sealed(dir: &Path, base: u64, next: u64, index_interval: u32) -> Result<Self> {
        let path = dir.join(file_name(base, "log"));
        let file = open_rw(&path, false)?;
        let size = file
            .metadata()
            .map_err(|e| Error::io("stat", &path, e))?
            .len();
        let mut seg = Self::new(base, path, file, size, index_interval);
        let (op, tp) = (
            dir.join(file_name(base, "index")),
            dir.join(file_name(base, "timeindex")),
        );
        if let Some(index) = SegmentIndex::read_files(&op, &tp, index_interval, size) {
            seg.index = index;
            seg.next = next;
            return Ok(seg);
        }
        tracing::info!(segment = %seg.path.display(), "rebuilding segment index");
        let end = seg.rescan(size)?;
        if let Some(reason) = end.invalid {
            return Err(Error::corrupt(&seg.path, end.position, reason));
        }
        if end.next_offset != next {
            let gap = Corruption::OffsetGap {
                expected: next,
                found: end.next_offset,
            };
            return Err(Error::corrupt(&seg.path, end.position, gap));
        }
        seg.index.write_files(&op, &tp)?;
        Ok(seg)
    }

    /// Opens a segment by scanning it whole; returns it sized to its last valid batch and
    /// where the scan stopped. The caller decides whether an early stop is corruption.
    pub fn open_scan(dir: &Path, base: u64, index_interval: u32) -> Result<(Self, ScanEnd)> {
        let path = dir.join(file_name(base, "log"));
        let file = open_rw(&path, false)?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat", &path, e))?
            .len();
        let mut seg = Self::new(base, path, file, len, index_interval);
        let end = seg.rescan(len)?;
        seg.size = end.position;
        Ok((seg, end))
    }

    /// Rebuilds the in-memory index from the first `len` bytes; `next` becomes where it stops.
    fn rescan(&mut self, len: u64) -> Result<ScanEnd> {
        let mut index = SegmentIndex::new(self.index_interval);
        let base = self.base;
        let end = scan(&self.file, &self.path, base, len, |pos, b| {
            index.on_append(
                rel(base, b.base_offset()),
                pos as u32,
                b.len() as u32,
                b.max_timestamp(),
            );
        })?;
        self.index = index;
        self.next = end.next_offset;
        Ok(end)
    }

    /// The segment file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle the checkpointer syncs.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Bytes of valid batches.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Offset after the last batch.
    pub fn next_offset(&self) -> u64 {
        self.next
    }

    /// Largest record timestamp in the segment (`i64::MIN` if empty).
    pub fn max_timestamp(&self) -> i64 {
        self.index.max_ts
    }

    /// When the first append since this segment was opened happened (age-based rolling).
    pub fn first_append(&self) -> Option<Instant> {
        self.first_append
    }

    /// Appends batches, which must continue this segment's offsets, writing them at once.
    /// On failure the file is cut back so nothing partial stays.
    pub fn append(&mut self, batches: &[RecordBatch]) -> Result<()> {
        let mut slices: Vec<IoSlice<'_>> =
            batches.iter().map(|b| IoSlice::new(b.as_bytes())).collect();
        if let Err(e) = fsutil::append_all(&self.file, &mut slices) {
            // Best effort: if this fails too, recovery cuts the file back to the checkpoint.
            let _ = self.file.set_len(self.size);
            return Err(Error::io("append to", &self.path, e));
        }
        self.record(batches);
        Ok(())
    }

    /// Counts batches that continue this segment's offsets and are written to the file
    /// later (from the partition's write buffer); returns their file position.
    pub fn record(&mut self, batches: &[RecordBatch]) -> u64 {
        let pos = self.size;
        self.first_append.get_or_insert_with(Instant::now);
        for b in batches {
            self.index.on_append(
                rel(self.base, b.base_offset()),
                self.size as u32,
                b.len() as u32,
                b.max_timestamp(),
            );
            self.size += b.len() as u64;
            self.next = b.next_offset();
        }
        pos
    }

    /// Reads whole batches from the one containing `offset`, stopping before any batch that
    /// reaches past `limit`, once `max_bytes` are gathered (at least one batch), and at
    /// byte `written`, where the file ends while later batches wait in the write buffer.
    pub fn read(
        &self,
        offset: u64,
        max_bytes: usize,
        limit: u64,
        written: u64,
        out: &mut Vec<RecordBatch>,
    ) -> Result<usize> {
        let mut pos = u64::from(self.index.position_for_offset(rel(self.base, offset)));
        let mut reader = self.reader(max_bytes);
        let mut gathered = 0usize;
        let mut reached = self.base;
        let end = self.size.min(written);
        while pos < end {
            let b = reader
                .batch_at(pos)?
                .map_err(|e| Error::corrupt(&self.path, pos, e))?;
            if b.next_offset() > limit {
                return Ok(gathered);
            }
            pos += b.len() as u64;
            reached = b.next_offset();
            if b.next_offset() > offset {
                gathered += b.len();
                out.push(b);
                if gathered >= max_bytes {
                    return Ok(gathered);
                }
            }
        }
        // The bytes ran out. A sealed segment opened from its index is trusted to reach its
        // successor's base; if it does not, batches are missing, and skipping them would
        // hand readers a gap.
        if reached < self.next && end == self.size {
            let missing = Corruption::Missing {
                expected: self.next,
                found: reached,
            };
            return Err(Error::corrupt(&self.path, pos, missing));
        }
        Ok(gathered)
    }

    /// The first offset at or after `from` whose record timestamp is ≥ `ts`, if this
    /// segment has one. Timestamps need not rise with offsets, so records before `from`
    /// (purged ones) are skipped rather than clamped to it.
    pub fn offset_for_time(&self, ts: i64, from: u64) -> Result<Option<u64>> {
        if self.index.max_ts < ts {
            return Ok(None);
        }
        let mut pos = u64::from(self.index.position_for_time(ts));
        let mut reader = self.reader(READ_CHUNK);
        while pos < self.size {
            let b = reader
                .batch_at(pos)?
                .map_err(|e| Error::corrupt(&self.path, pos, e))?;
            if b.max_timestamp() >= ts && b.next_offset() > from {
                let records = b
                    .records()
                    .map_err(|e| Error::corrupt(&self.path, pos, e))?;
                if let Some(r) = records
                    .iter()
                    .find(|r| r.offset >= from && r.timestamp >= ts)
                {
                    return Ok(Some(r.offset));
                }
            }
            pos += b.len() as u64;
        }
        Ok(None)
    }

    /// Byte position and base offset of the batch containing `offset`; the segment's size
    /// and next offset if no batch here reaches past it.
    pub fn batch_containing(&self, offset: u64) -> Result<(u64, u64)> {
        let mut pos = u64::from(self.index.position_for_offset(rel(self.base, offset)));
        let mut reader = self.reader(READ_CHUNK);
        while pos < self.size {
            let b = reader
                .batch_at(pos)?
                .map_err(|e| Error::corrupt(&self.path, pos, e))?;
            if b.next_offset() > offset {
                return Ok((pos, b.base_offset()));
            }
            pos += b.len() as u64;
        }
        Ok((self.size, self.next))
    }

    /// Cuts the segment before the batch containing `offset`; returns the new next offset.
    pub fn truncate_from(&mut self, offset: u64) -> Result<u64> {
        let (pos, _) = self.batch_containing(offset)?;
        self.file
            .set_len(pos)
            .map_err(|e| Error::io("truncate", &self.path, e))?;
        self.size = pos;
        let end = self.rescan(pos)?;
        if let Some(reason) = end.invalid {
            return Err(Error::corrupt(&self.path, end.position, reason));
        }
        Ok(self.next)
    }

    /// Cuts the file to its valid batches (after `open_scan` stopped at damage).
    pub fn discard_tail(&self) -> Result<()> {
        let len = self
            .file
            .metadata()
            .map_err(|e| Error::io("stat", &self.path, e))?
            .len();
        if len > self.size {
            tracing::warn!(segment = %self.path.display(), position = self.size, "cutting an unsynced or torn segment tail");
            self.file
                .set_len(self.size)
                .map_err(|e| Error::io("truncate", &self.path, e))?;
        }
        Ok(())
    }

    /// Writes the index files of a segment that takes no more appends.
    pub fn seal(&self) -> Result<()> {
        let dir = self.dir();
        self.index.write_files(
            &dir.join(file_name(self.base, "index")),
            &dir.join(file_name(self.base, "timeindex")),
        )
    }

    /// Deletes the segment's files.
    pub fn delete(self) -> Result<()> {
        let dir = self.dir().to_path_buf();
        for ext in ["index", "timeindex"] {
            let _ = std::fs::remove_file(dir.join(file_name(self.base, ext)));
        }
        std::fs::remove_file(&self.path).map_err(|e| Error::io("delete", &self.path, e))
    }

    fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    fn reader(&self, hint: usize) -> Reader<'_> {
        Reader {
            file: &self.file,
            path: &self.path,
            end: self.size,
            chunk: hint.clamp(64 << 10, READ_CHUNK),
            window: Bytes::new(),
            window_pos: 0,
        }
    }
}

/// Offsets inside a segment are stored relative to its base; segments roll long before
/// that stops fitting in 32 bits.
fn rel(base: u64, offset: u64) -> u32 {
    u32::try_from(offset.saturating_sub(base)).unwrap_or(u32::MAX)
}

fn open_rw(path: &Path, create: bool) -> Result<File> {
    let op = if create { "create" } else { "open" };
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(create)
        .open(path)
        .map_err(|e| Error::io(op, path, e))?;
    if create {
        // Append mode cannot be combined with O_TRUNC: empty a leftover file explicitly.
        file.set_len(0).map_err(|e| Error::io(op, path, e))?;
    }
    Ok(file)
}

/// Reads batches from a file through a window of a chunk at a time.
struct Reader<'a> {
    file: &'a File,
    path: &'a Path,
    end: u64,
    chunk: usize,
    window: Bytes,
    window_pos: u64,
}

impl Reader<'_> {
    /// The batch at `pos`: an I/O error, or the batch or why those bytes are not one.
    fn batch_at(&mut self, pos: u64) -> Result<std::result::Result<RecordBatch, BatchError>> {
        let available = self.end.saturating_sub(pos);
        if available < 4 {
            return Ok(Err(BatchError::Truncated {
                needed: 4,
                available: available as usize,
            }));
        }
        self.cover(pos, 4)?;
        let claimed =
            batch::peek_len(&self.window[(pos - self.window_pos) as usize..]).unwrap_or(0);
        if (claimed as usize) < HEADER_LEN || claimed > batch::MAX_BATCH_BYTES {
            return Ok(Err(BatchError::BadLength { len: claimed }));
        }
        if u64::from(claimed) > available {
            return Ok(Err(BatchError::Truncated {
                needed: claimed as usize,
                available: available as usize,
            }));
        }
        self.cover(pos, claimed as usize)?;
        Ok(RecordBatch::from_prefix(
            &self.window.slice((pos - self.window_pos) as usize..),
        ))
    }

    /// Makes the window hold bytes `[pos, pos + len)`.
    fn cover(&mut self, pos: u64, len: usize) -> Result<()> {
        let start = self.window_pos;
        if pos >= start && pos + len as u64 <= start + self.window.len() as u64 {
            return Ok(());
        }
        let want = len.max(self.chunk).min((self.end - pos) as usize);
        let mut buf = BytesMut::zeroed(want);
        let n = fsutil::read_at_most(self.file, &mut buf, pos)
            .map_err(|e| Error::io("read", self.path, e))?;
        buf.truncate(n);
        self.window = buf.freeze();
        self.window_pos = pos;
        if n < len {
            // The file is shorter than its recorded size: treat like a torn batch.
            return Err(Error::corrupt(
                self.path,
                pos,
                Corruption::Batch(BatchError::Truncated {
                    needed: len,
                    available: n,
                }),
            ));
        }
        Ok(())
    }
}

/// Validates batches from the start of a segment up to `len`, calling `on_batch` for each;
/// stops at the first invalid or torn batch or an offset that does not continue the last.
pub(crate) fn scan(
    file: &File,
    path: &Path,
    base: u64,
    len: u64,
    mut on_batch: impl FnMut(u64, &RecordBatch),
) -> Result<ScanEnd> {
    let mut reader = Reader {
        file,
        path,
        end: len,
        chunk: READ_CHUNK,
        window: Bytes::new(),
        window_pos: 0,
    };
    let (mut pos, mut next) = (0u64, base);
    while pos < len {
        let b = match reader.batch_at(pos)? {
            Ok(b) => b,
            Err(e) => {
                return Ok(ScanEnd {
                    position: pos,
                    next_offset: next,
                    invalid: Some(e.into()),
                });
            }
        };
        if b.base_offset() != next {
            let gap = Corruption::OffsetGap {
                expected: next,
                found: b.base_offset(),
            };
            return Ok(ScanEnd {
                position: pos,
                next_offset: next,
                invalid: Some(gap),
            });
        }
        on_batch(pos, &b);
        next = b.next_offset();
        pos += b.len() as u64;
    }
    Ok(ScanEnd {
        position: pos,
        next_offset: next,
        invalid: None,
    })
}
