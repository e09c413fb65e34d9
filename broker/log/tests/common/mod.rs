//! Shared fixtures of the engine-level tests: self-verifying batches, a wait for the
//! durability callback, configurations small enough that segments roll, the write-ahead
//! log rolls and checkpoints run every few appends, and a few readers of the on-disk
//! formats (`FORMAT.md`) for the tests that cut and flip bytes.
//!
//! Each test file compiles this module on its own and uses a different part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use petrel_log::{
    BatchBuilder, Compression, Log, OnDurable, PartitionConfig, PartitionId, RecordBatch, Storage,
    StorageConfig, SyncPolicy,
};

/// The longest any test waits for a condition before it fails.
pub const WAIT: Duration = Duration::from_secs(60);

/// Timestamp of the record at `offset`: rising by 10 ms per offset, except that every
/// fifth record is 25 ms older than the one before it, so timestamps are not monotonic.
pub fn timestamp(offset: u64) -> i64 {
    let t = 1_700_000_000_000 + 10 * offset as i64;
    if offset % 5 == 3 { t - 35 } else { t }
}

/// A deterministic batch: every byte follows from `(base, records, value_len, term)`,
/// and `value_len` and `term` are stored in the batch header (`raft_index` and `term`),
/// so [`verify`] can check any batch read back without knowing how it was written.
pub fn batch(base: u64, records: u32, value_len: usize, term: u64) -> RecordBatch {
    let codec = match base % 3 {
        0 => Compression::None,
        1 => Compression::Lz4,
        _ => Compression::Zstd,
    };
    let mut b = BatchBuilder::new().compression(codec);
    for i in 0..u64::from(records) {
        let offset = base + i;
        let key = format!("key-{offset}");
        let value = value(offset, term, value_len);
        let term_bytes = term.to_le_bytes();
        let headers: [(&[u8], &[u8]); 1] = [(b"term", &term_bytes)];
        b.push(
            timestamp(offset),
            offset.is_multiple_of(2).then_some(key.as_bytes()),
            &value,
            &headers,
        );
    }
    b.build(base, term, value_len as u64)
        .expect("build a test batch")
}

/// Record values: partly pseudo-random, partly repetitive, so every codec has work to do.
fn value(offset: u64, term: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(offset.wrapping_mul(0x9E37_79B9) ^ term);
    (0..len)
        .map(|j| {
            if j.is_multiple_of(3) {
                rng.next() as u8
            } else {
                (offset as u8).wrapping_add(j as u8)
            }
        })
        .collect()
}

/// Asserts that `b` is exactly the batch [`batch`] generates for its header fields.
pub fn verify(b: &RecordBatch) {
    let expected = batch(
        b.base_offset(),
        b.record_count(),
        b.raft_index() as usize,
        b.term(),
    );
    assert!(
        b.as_bytes() == expected.as_bytes(),
        "batch at offset {} (term {}) does not match what was written",
        b.base_offset(),
        b.term()
    );
    let records = b.records().expect("records decode");
    assert_eq!(records.len(), b.record_count() as usize);
}

/// A tiny deterministic generator (SplitMix64) for tests that pick positions and counts.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `range`.
    pub fn range(&mut self, range: std::ops::Range<u64>) -> u64 {
        assert!(!range.is_empty(), "empty range");
        range.start + self.next() % (range.end - range.start)
    }
}

/// A durability callback and the channel its result arrives on.
pub fn durable() -> (OnDurable, mpsc::Receiver<petrel_log::Result<()>>) {
    let (tx, rx) = mpsc::channel();
    let done: OnDurable = Box::new(move |r| {
        let _ = tx.send(r);
    });
    (done, rx)
}

/// Waits for a durability callback; fails the test if it never comes.
pub fn wait(rx: &mpsc::Receiver<petrel_log::Result<()>>) -> petrel_log::Result<()> {
    rx.recv_timeout(WAIT)
        .expect("the durability callback was never called")
}

/// Holds the WAL writer thread (which runs the durability callbacks) inside one until
/// dropped, so that appends and barriers queue up meanwhile and the writer takes them all
/// in its next turn, as it would after a slow sync.
pub struct Stall {
    _release: mpsc::Sender<()>,
}

/// Stalls the WAL writer with an append of one small batch to `log`; returns once the
/// writer is held.
pub fn stall_writer(log: &mut Log) -> Stall {
    let (stalled_tx, stalled_rx) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    let done: OnDurable = Box::new(move |r| {
        let _ = stalled_tx.send(r);
        // Returns once the `Stall` is dropped (the channel disconnects).
        let _ = released.recv_timeout(WAIT);
    });
    log.append(vec![batch(log.next_offset(), 1, 8, 0)], done)
        .expect("append the stalling batch");
    stalled_rx
        .recv_timeout(WAIT)
        .expect("the writer never ran the stalling callback")
        .expect("the stalling append failed");
    Stall { _release: release }
}

/// Appends and waits until the append is durable (or failed).
pub fn append_durably(log: &mut Log, batches: Vec<RecordBatch>) -> petrel_log::Result<()> {
    let (done, rx) = durable();
    log.append(batches, done)?;
    wait(&rx)
}

/// Storage settings with everything tiny: the write-ahead log rolls (and a checkpoint
/// runs) every 4 KiB, the cache holds a few batches, and every 512 bytes get an index point.
pub fn storage_config(dir: &Path) -> StorageConfig {
    let mut c = StorageConfig::new(dir);
    c.wal_max_bytes = 4096;
    c.sync_interval = Duration::from_millis(5);
    c.cache_bytes = 8 << 10;
    c.max_batch_bytes = 16 << 10;
    c.index_interval_bytes = 512;
    c
}

/// Partition settings with the smallest segments the engine allows.
pub fn partition_config() -> PartitionConfig {
    PartitionConfig {
        sync_policy: SyncPolicy::Always,
        segment_bytes: 4096,
        segment_age: None,
    }
}

/// Settings of a partition taking large appends: several batches to a segment, so one
/// append fills and seals a few segments.
pub fn large_partition_config() -> PartitionConfig {
    PartitionConfig {
        segment_bytes: 24 << 10,
        ..partition_config()
    }
}

/// Batches from offset `base` holding at least `bytes` together, each of 4 to 12 records
/// of 500 to 1200 bytes (2 to 15 KiB, under the test limit of 16 KiB a batch): one append
/// of them at `petrel_log::DIRECT_BYTES` or more goes to its segments directly.
pub fn large_append(base: u64, term: u64, bytes: usize, rng: &mut Rng) -> Vec<RecordBatch> {
    let mut out: Vec<RecordBatch> = Vec::new();
    let mut total = 0;
    let mut at = base;
    while total < bytes {
        let b = batch(
            at,
            rng.range(4..13) as u32,
            rng.range(500..1200) as usize,
            term,
        );
        total += b.len();
        at = b.next_offset();
        out.push(b);
    }
    out
}

pub fn open(dir: &Path) -> Storage {
    Storage::open(storage_config(dir)).expect("open storage")
}

/// Opens a partition, creating it if it does not exist.
pub fn open_or_create(storage: &Storage, id: PartitionId) -> Log {
    open_or_create_with(storage, id, partition_config())
}

/// Opens a partition with the given settings, creating it if it does not exist.
pub fn open_or_create_with(storage: &Storage, id: PartitionId, config: PartitionConfig) -> Log {
    if storage.partitions().contains(&id) {
        storage.open_partition(id, config).expect("open partition")
    } else {
        storage
            .create_partition(id, config)
            .expect("create partition")
    }
}

/// Every readable batch, read from the start in pieces of `piece` bytes; each is verified
/// against the generator and the offsets must be contiguous up to the log end.
pub fn read_all(log: &Log, piece: usize) -> Vec<RecordBatch> {
    let mut out: Vec<RecordBatch> = Vec::new();
    let mut at = log.start_offset();
    while at < log.next_offset() {
        let got = log.read(at, piece, u64::MAX).expect("read");
        assert!(
            !got.is_empty(),
            "read at {at} returned nothing below the log end {}",
            log.next_offset()
        );
        for b in got {
            verify(&b);
            match out.last() {
                Some(prev) => assert_eq!(b.base_offset(), prev.next_offset(), "offset gap"),
                None => assert!(
                    b.base_offset() <= at && at < b.next_offset(),
                    "the first batch does not hold the start offset {at}"
                ),
            }
            at = b.next_offset();
            out.push(b);
        }
    }
    assert_eq!(at, log.next_offset(), "batches run past the log end");
    out
}

/// Copies a directory tree (the data directory of a stopped storage).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create copy");
    for entry in std::fs::read_dir(from).expect("list") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// Files in `dir` ending with `ext`, sorted by name.
pub fn files_with(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    files.sort();
    files
}

/// A partition's directory under the data directory.
pub fn partition_dir(root: &Path, id: PartitionId) -> PathBuf {
    root.join("partitions").join(id.to_string())
}

/// Flips one bit of a file.
pub fn flip_bit(path: &Path, byte: u64, bit: u8) {
    let mut bytes = std::fs::read(path).expect("read");
    bytes[byte as usize] ^= 1 << bit;
    std::fs::write(path, bytes).expect("write");
}

/// Shortens a file to `len` bytes.
pub fn cut(path: &Path, len: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.set_len(len).expect("truncate");
}

/// The base offset a segment file is named after.
pub fn segment_base(path: &Path) -> u64 {
    path.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("a segment file name")
}

/// One batch as it sits in a segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentEntry {
    pub position: u64,
    pub len: u64,
    pub base: u64,
    pub next: u64,
}

/// The batches of a segment file, from its batch headers (length at 0, record count at
/// 12, base offset at 16); stops at the first one that does not fit.
pub fn segment_entries(path: &Path) -> Vec<SegmentEntry> {
    let bytes = std::fs::read(path).expect("read segment");
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + 24 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let count = u32::from_le_bytes(bytes[pos + 12..pos + 16].try_into().expect("4 bytes"));
        let base = u64::from_le_bytes(bytes[pos + 16..pos + 24].try_into().expect("8 bytes"));
        if len < 56 || pos + len > bytes.len() {
            break;
        }
        out.push(SegmentEntry {
            position: pos as u64,
            len: len as u64,
            base,
            next: base + u64::from(count),
        });
        pos += len;
    }
    out
}

/// One chunk of a write-ahead log file: the `(partition, base, next)` of the batches
/// copied into it, and the `(partition, next)` of the direct syncs it records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalChunk {
    pub position: u64,
    pub len: u64,
    pub batches: Vec<(PartitionId, u64, u64)>,
    pub marks: Vec<(PartitionId, u64)>,
}

/// The chunks of a write-ahead log file: a 16-byte file header, then chunks of a 28-byte
/// header (magic, body length, file sequence, position synced when written, CRC32C of those
/// two and the body) and a body of
/// records: `u8 kind`, `u64 partition`, then a batch (kind 0) or a `u64` offset synced
/// directly (kind 1). The log ends at zeros (a preallocated file), at a chunk of an
/// earlier sequence (a reused one), or at a chunk that is not whole and valid (torn by a
/// kill).
pub fn wal_chunks(path: &Path) -> Vec<WalChunk> {
    let bytes = std::fs::read(path).expect("read wal");
    let mut out = Vec::new();
    if bytes.len() < 16 {
        return out;
    }
    let seq = &bytes[8..16];
    let mut pos = 16usize;
    while pos + 28 <= bytes.len() && &bytes[pos + 8..pos + 16] == seq {
        let body_len =
            u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[pos + 24..pos + 28].try_into().expect("4 bytes"));
        let Some(body) = bytes.get(pos + 28..pos + 28 + body_len) else {
            break;
        };
        if crc32c::crc32c_append(crc32c::crc32c(&bytes[pos + 8..pos + 24]), body) != crc {
            break;
        }
        let mut batches = Vec::new();
        let mut marks = Vec::new();
        let mut at = 0usize;
        while at < body.len() {
            let kind = body[at];
            let partition = u64::from_le_bytes(body[at + 1..at + 9].try_into().expect("8 bytes"));
            if kind == 1 {
                let next = u64::from_le_bytes(body[at + 9..at + 17].try_into().expect("8 bytes"));
                marks.push((partition, next));
                at += 17;
                continue;
            }
            let b = &body[at + 9..];
            let len = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")) as usize;
            let count = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
            let base = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"));
            batches.push((partition, base, base + u64::from(count)));
            at += 9 + len;
        }
        out.push(WalChunk {
            position: pos as u64,
            len: 28 + body_len as u64,
            batches,
            marks,
        });
        pos += 28 + body_len;
    }
    out
}
