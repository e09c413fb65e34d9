//! Reading the WAL back at recovery: chunk by chunk, cutting a torn tail, refusing
//! damage anywhere else.

use std::fs::{File, OpenOptions};
use std::path::Path;

use bytes::{Bytes, BytesMut};

use super::{
    CHUNK_HEADER, CHUNK_MAGIC, FILE_HEADER, FILE_MAGIC, FILE_VERSION, MAX_CHUNK, RECORD_BATCH,
    RECORD_SYNCED, WalPosition, file_path, list,
};
use crate::PartitionId;
use crate::batch::RecordBatch;
use crate::error::{BatchError, Corruption, Error, Result};
use crate::fsutil::{self, le_u32, le_u64};

/// One record of a chunk.
#[derive(Debug)]
pub(crate) enum WalRecord {
    /// A batch copied into the WAL.
    Batch(RecordBatch),
    /// The partition's segments were synced up to this offset (a direct sync).
    Synced(u64),
}

/// Reads every record of the WAL files in `dir` in order, calling `apply` with the
/// position of its chunk. A torn tail of the last file is cut off; damage anywhere else
/// is an error naming the file and position.
pub(crate) fn replay(
    dir: &Path,
    mut apply: impl FnMut(WalPosition, PartitionId, WalRecord) -> Result<()>,
) -> Result<Vec<u64>> {
    let seqs = list(dir)?;
    for (i, &seq) in seqs.iter().enumerate() {
        let last = i + 1 == seqs.len();
        replay_file(&file_path(dir, seq), seq, last, &mut apply)?;
    }
    Ok(seqs)
}

fn replay_file(
    path: &Path,
    seq: u64,
    last: bool,
    apply: &mut impl FnMut(WalPosition, PartitionId, WalRecord) -> Result<()>,
) -> Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .len();
    let mut header = [0u8; FILE_HEADER as usize];
    let n = fsutil::read_at_most(&file, &mut header, 0).map_err(|e| Error::io("read", path, e))?;
    if n < FILE_HEADER as usize {
        if last {
            // Crashed while creating it: nothing was acknowledged from this file.
            tracing::warn!(file = %path.display(), "WAL file with a torn header; discarding it");
            return Ok(());
        }
        return Err(Error::corrupt(
            path,
            0,
            Corruption::Batch(BatchError::Truncated {
                needed: 16,
                available: n,
            }),
        ));
    }
    fsutil::check_file_header(&header, path, FILE_MAGIC, FILE_VERSION)?;
    let header_seq = le_u64(&header, 8);
    if header_seq < seq {
        // A spare renamed for reuse before its new header was written: nothing was
        // written to it (`new_file` syncs the header before the file is used).
        tracing::warn!(file = %path.display(), "WAL file still carries a reused file's header; it is empty");
        return Ok(());
    }
    if header_seq != seq {
        let wrong = Corruption::OffsetGap {
            expected: seq,
            found: header_seq,
        };
        return Err(Error::corrupt(path, 8, wrong));
    }
    let mut pos = FILE_HEADER;
    while pos < len {
        let body = match read_chunk(&file, path, seq, pos, len)? {
            Chunk::Valid { body, .. } => body,
            // Zeros of a preallocated file, or a chunk from a reused file's earlier life.
            Chunk::End => break,
            Chunk::Invalid => {
                if !last || valid_chunk_after(&file, path, seq, pos, len)? {
                    return Err(Error::corrupt(path, pos, Corruption::WalChunk));
                }
                tracing::warn!(file = %path.display(), position = pos, "cutting a torn WAL tail");
                file.set_len(pos)
                    .map_err(|e| Error::io("truncate", path, e))?;
                file.sync_data().map_err(|e| Error::io("sync", path, e))?;
                break;
            }
        };
        let chunk_at = WalPosition { seq, pos };
        let body_len = body.len() as u64;
        let mut at = 0usize;
        while at < body.len() {
            let record_at = pos + (CHUNK_HEADER + at) as u64;
            let rest = body.slice(at..);
            if rest.len() < 9 {
                let short = BatchError::Truncated {
                    needed: 9,
                    available: rest.len(),
                };
                return Err(Error::corrupt(path, record_at, Corruption::Batch(short)));
            }
            let partition = le_u64(&rest, 1);
            let (record, len) = match rest[0] {
                RECORD_BATCH => {
                    let batch = RecordBatch::from_prefix(&rest.slice(9..))
                        .map_err(|e| Error::corrupt(path, record_at, e))?;
                    let len = 9 + batch.len();
                    (WalRecord::Batch(batch), len)
                }
                RECORD_SYNCED if rest.len() >= 17 => (WalRecord::Synced(le_u64(&rest, 9)), 17),
                _ => {
                    let bad = BatchError::MalformedRecords("unknown WAL record");
                    return Err(Error::corrupt(path, record_at, Corruption::Batch(bad)));
                }
            };
            at += len;
            apply(chunk_at, partition, record)?;
        }
        pos += CHUNK_HEADER as u64 + body_len;
    }
    Ok(())
}

/// What lies at a chunk position.
enum Chunk {
    /// A chunk, and the position its writer knew to be durable.
    Valid { body: Bytes, durable: u64 },
    /// The end of the log: zeros, or a chunk of an earlier file sequence.
    End,
    /// Bytes that are not a valid chunk.
    Invalid,
}

/// Reads the chunk of file `seq` at `pos`.
fn read_chunk(file: &File, path: &Path, seq: u64, pos: u64, len: u64) -> Result<Chunk> {
    let mut head = [0u8; CHUNK_HEADER];
    let n = fsutil::read_at_most(file, &mut head, pos).map_err(|e| Error::io("read", path, e))?;
    if head[..n].iter().all(|b| *b == 0) {
        return Ok(Chunk::End);
    }
    let body_len = le_u32(&head, 4);
    if n < CHUNK_HEADER
        || le_u32(&head, 0) != CHUNK_MAGIC
        || body_len > MAX_CHUNK
        || pos + CHUNK_HEADER as u64 + u64::from(body_len) > len
    {
        return Ok(Chunk::Invalid);
    }
    let chunk_seq = le_u64(&head, 8);
    if chunk_seq < seq {
        return Ok(Chunk::End);
    }
    let mut body = BytesMut::zeroed(body_len as usize);
    let n = fsutil::read_at_most(file, &mut body, pos + CHUNK_HEADER as u64)
        .map_err(|e| Error::io("read", path, e))?;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head[8..24]), &body);
    if chunk_seq != seq || n != body.len() || crc != le_u32(&head, 24) {
        return Ok(Chunk::Invalid);
    }
    Ok(Chunk::Valid {
        body: body.freeze(),
        durable: le_u64(&head, 16),
    })
}

/// Whether the damage at `pos` is corruption rather than a torn tail: some later valid
/// chunk of this file was written when the file was already synced past `pos`. (Unsynced
/// chunks may survive a crash in any order; what was synced may not go missing.) Reads
/// the rest a window at a time.
fn valid_chunk_after(file: &File, path: &Path, seq: u64, pos: u64, len: u64) -> Result<bool> {
    const WINDOW: usize = 1 << 20;
    let magic = CHUNK_MAGIC.to_le_bytes();
    let mut window = vec![0u8; WINDOW];
    let mut at = pos + 1;
    while at < len {
        let n =
            fsutil::read_at_most(file, &mut window, at).map_err(|e| Error::io("read", path, e))?;
        if n < magic.len() {
            break;
        }
        for (i, w) in window[..n].windows(magic.len()).enumerate() {
            if w == magic
                && let Chunk::Valid { durable, .. } =
                    read_chunk(file, path, seq, at + i as u64, len)?
                && durable > pos
            {
                return Ok(true);
            }
        }
        // Overlap windows by the magic's length less one, so no match is split.
        at += (n - (magic.len() - 1)) as u64;
    }
    Ok(false)
}
