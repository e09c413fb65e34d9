//! The checkpoint: per partition, what its segments durably hold and where in the
//! write-ahead log its replay starts. One small file, replaced atomically.
//!
//! Invariant: for every partition, segments hold offsets `[start, end)` durably, and every
//! later batch of the partition is either in the segments (synced directly by the WAL
//! writer, or written and not yet synced) or in the write-ahead log at or after
//! `replay_from`.

use std::collections::BTreeMap;
use std::path::Path;

use crate::PartitionId;
use crate::error::{Corruption, Error, Result};
use crate::fsutil::{self, le_u32, le_u64};
use crate::wal::WalPosition;

const MAGIC: u32 = 0x504B_4350; // "PCKP"
const VERSION: u32 = 1;
const ENTRY_LEN: usize = 48;
/// Entry flag: a truncation recorded its new end but may not have cut the files yet.
const CUT_PENDING: u64 = 1;

/// One partition's durable state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    /// First offset readers may see (the purge point).
    pub start: u64,
    /// Offset after the last batch the segments hold durably.
    pub end: u64,
    /// Replay this partition's write-ahead log records from here.
    pub replay_from: WalPosition,
    /// A truncation to `end` is under way: at recovery, everything after `end` is cut.
    /// (Otherwise whole valid batches after `end` are kept: they were written later.)
    pub cut_pending: bool,
}

/// Every partition's entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    pub entries: BTreeMap<PartitionId, Entry>,
}

impl Checkpoint {
    /// Reads the checkpoint; `None` if there is none yet.
    pub fn load(path: &Path) -> Result<Option<Self>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", path, e)),
        };
        let bad = || Error::corrupt(path, 0, Corruption::Checkpoint);
        if bytes.len() < 16 {
            return Err(bad());
        }
        fsutil::check_file_header(&bytes, path, MAGIC, VERSION)?;
        let count = le_u32(&bytes, 8) as usize;
        if bytes.len() != 12 + count * ENTRY_LEN + 4 {
            return Err(bad());
        }
        let body = &bytes[..bytes.len() - 4];
        if crc32c::crc32c(body) != le_u32(&bytes, bytes.len() - 4) {
            return Err(bad());
        }
        let mut entries = BTreeMap::new();
        for i in 0..count {
            let at = 12 + i * ENTRY_LEN;
            let e = Entry {
                start: le_u64(body, at + 8),
                end: le_u64(body, at + 16),
                replay_from: WalPosition {
                    seq: le_u64(body, at + 24),
                    pos: le_u64(body, at + 32),
                },
                cut_pending: le_u64(body, at + 40) & CUT_PENDING != 0,
            };
            if e.start > e.end {
                return Err(bad());
            }
            entries.insert(le_u64(body, at), e);
        }
        Ok(Some(Self { entries }))
    }

    /// Replaces the checkpoint file durably.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut b = Vec::with_capacity(16 + self.entries.len() * ENTRY_LEN);
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for (id, e) in &self.entries {
            let flags = if e.cut_pending { CUT_PENDING } else { 0 };
            for v in [
                *id,
                e.start,
                e.end,
                e.replay_from.seq,
                e.replay_from.pos,
                flags,
            ] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        fsutil::write_atomic(path, &b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trips_and_a_flipped_bit_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("checkpoint");
        assert_eq!(Checkpoint::load(&path).expect("load"), None);
        let mut c = Checkpoint::default();
        let replay_from = WalPosition { seq: 3, pos: 4096 };
        c.entries.insert(
            7,
            Entry {
                start: 1,
                end: 99,
                replay_from,
                cut_pending: true,
            },
        );
        c.save(&path).expect("save");
        assert_eq!(Checkpoint::load(&path).expect("load"), Some(c));
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[20] ^= 4;
        std::fs::write(&path, bytes).expect("write");
        assert!(matches!(
            Checkpoint::load(&path),
            Err(Error::Corrupt { .. })
        ));
    }
}
