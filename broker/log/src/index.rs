//! The sparse indexes of one segment: offset → file position, and timestamp → offset.
//!
//! Both are kept in memory for every segment (one entry per `index_interval_bytes`, so a
//! few hundred KiB per GiB stored) and written beside a segment when it is sealed. They
//! are hints: a missing or corrupt index file is rebuilt by scanning its segment.

use std::path::Path;

use crate::error::Result;
use crate::fsutil::{le_u32, le_u64};

const OFFSET_MAGIC: u32 = 0x5844_4950; // "PIDX"
const TIME_MAGIC: u32 = 0x5849_5450; // "PTIX"
const FILE_VERSION: u32 = 1;

/// One sparse index point: a batch start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexPoint {
    /// Offset of the batch relative to the segment base.
    pub rel_offset: u32,
    /// Byte position of the batch in the segment file.
    pub position: u32,
    /// Largest timestamp of all batches before this point (`i64::MIN` for none).
    pub max_ts_before: i64,
}

/// The in-memory index of a segment.
#[derive(Debug, Clone)]
pub(crate) struct SegmentIndex {
    points: Vec<IndexPoint>,
    interval: u32,
    bytes_since_point: u32,
    /// Largest timestamp in the segment.
    pub max_ts: i64,
}

impl SegmentIndex {
    pub fn new(interval: u32) -> Self {
        Self {
            points: Vec::new(),
            interval,
            bytes_since_point: 0,
            max_ts: i64::MIN,
        }
    }

    /// Records a batch appended at `position`.
    pub fn on_append(&mut self, rel_offset: u32, position: u32, len: u32, batch_max_ts: i64) {
        if self.points.is_empty() || self.bytes_since_point >= self.interval {
            self.points.push(IndexPoint {
                rel_offset,
                position,
                max_ts_before: self.max_ts,
            });
            self.bytes_since_point = 0;
        }
        self.bytes_since_point = self.bytes_since_point.saturating_add(len);
        self.max_ts = self.max_ts.max(batch_max_ts);
    }

    /// The position to scan from to find `rel_offset`.
    pub fn position_for_offset(&self, rel_offset: u32) -> u32 {
        let i = self.points.partition_point(|p| p.rel_offset <= rel_offset);
        if i == 0 {
            0
        } else {
            self.points[i - 1].position
        }
    }

    /// The position to scan from to find the first record with timestamp ≥ `ts`:
    /// every batch before it has only smaller timestamps.
    pub fn position_for_time(&self, ts: i64) -> u32 {
        let i = self.points.partition_point(|p| p.max_ts_before < ts);
        if i == 0 {
            0
        } else {
            self.points[i - 1].position
        }
    }

    /// Writes the offset and time index files for a sealed segment (no sync: they are rebuildable).
    pub fn write_files(&self, offset_path: &Path, time_path: &Path) -> Result<()> {
        let mut off = Vec::with_capacity(16 + self.points.len() * 8);
        off.extend_from_slice(&OFFSET_MAGIC.to_le_bytes());
        off.extend_from_slice(&FILE_VERSION.to_le_bytes());
        off.extend_from_slice(&(self.points.len() as u32).to_le_bytes());
        for p in &self.points {
            off.extend_from_slice(&p.rel_offset.to_le_bytes());
            off.extend_from_slice(&p.position.to_le_bytes());
        }
        let crc = crc32c::crc32c(&off);
        off.extend_from_slice(&crc.to_le_bytes());

        let mut time = Vec::with_capacity(24 + self.points.len() * 12);
        time.extend_from_slice(&TIME_MAGIC.to_le_bytes());
        time.extend_from_slice(&FILE_VERSION.to_le_bytes());
        time.extend_from_slice(&(self.points.len() as u32).to_le_bytes());
        time.extend_from_slice(&self.max_ts.to_le_bytes());
        for p in &self.points {
            time.extend_from_slice(&p.max_ts_before.to_le_bytes());
            time.extend_from_slice(&p.rel_offset.to_le_bytes());
        }
        let crc = crc32c::crc32c(&time);
        time.extend_from_slice(&crc.to_le_bytes());

        std::fs::write(offset_path, off).map_err(|e| crate::Error::io("write", offset_path, e))?;
        std::fs::write(time_path, time).map_err(|e| crate::Error::io("write", time_path, e))
    }

    /// Loads both index files; `None` when either is missing, corrupt, or does not fit a
    /// segment of `segment_len` bytes (the caller then rebuilds).
    pub fn read_files(
        offset_path: &Path,
        time_path: &Path,
        interval: u32,
        segment_len: u64,
    ) -> Option<Self> {
        let off = std::fs::read(offset_path).ok()?;
        let time = std::fs::read(time_path).ok()?;
        let count = checked_body(&off, OFFSET_MAGIC, 12, 8)?;
        if checked_body(&time, TIME_MAGIC, 20, 12)? != count {
            return None;
        }
        let mut points = Vec::with_capacity(count);
        for i in 0..count {
            let (o, t) = (12 + i * 8, 20 + i * 12);
            let p = IndexPoint {
                rel_offset: le_u32(&off, o),
                position: le_u32(&off, o + 4),
                max_ts_before: le_u64(&time, t) as i64,
            };
            if le_u32(&time, t + 8) != p.rel_offset || u64::from(p.position) >= segment_len.max(1) {
                return None;
            }
            if let Some(prev) = points.last() {
                let prev: &IndexPoint = prev;
                if p.rel_offset <= prev.rel_offset
                    || p.position <= prev.position
                    || p.max_ts_before < prev.max_ts_before
                {
                    return None;
                }
            }
            points.push(p);
        }
        Some(Self {
            points,
            interval,
            bytes_since_point: interval,
            max_ts: le_u64(&time, 12) as i64,
        })
    }
}

/// Validates magic, version, length and trailing CRC; returns the entry count.
fn checked_body(b: &[u8], magic: u32, header: usize, entry: usize) -> Option<usize> {
    if b.len() < header + 4 || le_u32(b, 0) != magic || le_u32(b, 4) != FILE_VERSION {
        return None;
    }
    let count = le_u32(b, 8) as usize;
    if b.len() != header + count.checked_mul(entry)? + 4 {
        return None;
    }
    let body = &b[..b.len() - 4];
    (crc32c::crc32c(body) == le_u32(b, b.len() - 4)).then_some(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> SegmentIndex {
        let mut ix = SegmentIndex::new(100);
        // Batches of 60 bytes, two records each, timestamps 10, 20, ...
        for i in 0..10u32 {
            ix.on_append(i * 2, i * 60, 60, i64::from(i + 1) * 10);
        }
        ix
    }

    #[test]
    fn lookups_land_on_or_before_the_target() {
        let ix = index();
        assert_eq!(ix.position_for_offset(0), 0);
        assert_eq!(ix.position_for_offset(5), 120);
        assert_eq!(ix.position_for_offset(19), 480);
        assert_eq!(ix.position_for_time(5), 0);
        assert_eq!(ix.position_for_time(35), 120);
        assert_eq!(ix.position_for_time(1000), 480);
    }

    #[test]
    fn index_files_round_trip_and_corruption_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (o, t) = (dir.path().join("a.index"), dir.path().join("a.timeindex"));
        let ix = index();
        ix.write_files(&o, &t).expect("write");
        let back = SegmentIndex::read_files(&o, &t, 100, 600).expect("valid");
        assert_eq!(back.points, ix.points);
        assert_eq!(back.max_ts, 100);
        assert!(
            SegmentIndex::read_files(&o, &t, 100, 300).is_none(),
            "positions beyond the segment"
        );
        let mut bytes = std::fs::read(&o).expect("read");
        bytes[13] ^= 1;
        std::fs::write(&o, bytes).expect("write");
        assert!(SegmentIndex::read_files(&o, &t, 100, 600).is_none());
        std::fs::remove_file(&t).expect("rm");
        assert!(SegmentIndex::read_files(&o, &t, 100, 600).is_none());
    }
}
