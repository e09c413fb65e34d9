//! The storage engine's errors. Paths and positions are fields, never baked into strings.

use std::path::PathBuf;
use std::sync::Arc;

use crate::PartitionId;

/// Why a batch's bytes are not a valid batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// Fewer bytes than the batch header or its length field claims.
    #[error("truncated batch: need {needed} bytes, have {available}")]
    Truncated { needed: usize, available: usize },
    /// The length field is below the header size or above the format's maximum.
    #[error("batch length {len} out of range")]
    BadLength { len: u32 },
    /// A format version this build does not read.
    #[error("unsupported batch version {0}")]
    UnsupportedVersion(u8),
    /// The stored CRC32C does not match the bytes.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch { stored: u32, computed: u32 },
    /// A compression codec id this build does not know.
    #[error("unknown compression codec {0}")]
    UnknownCodec(u8),
    /// The records section does not decode into the header's record count.
    #[error("malformed records: {0}")]
    MalformedRecords(&'static str),
    /// The records section failed to decompress.
    #[error("decompression failed ({codec})")]
    Decompress { codec: &'static str },
    /// A batch must hold at least one record.
    #[error("empty batch")]
    Empty,
}

/// Errors of the storage engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation on a named path failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The device is full: the append was refused and nothing of it is kept.
    #[error("no space left on device while writing {}", path.display())]
    DiskFull {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A write or sync of the write-ahead log failed earlier; the storage refuses writes until it is reopened.
    #[error("storage is read-only after a failed write to {}: {source}", path.display())]
    Poisoned {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Stored bytes failed validation somewhere other than a torn tail.
    #[error("corruption in {} at byte {position}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: Corruption,
    },
    /// The directory holds files but is not a Petrel data directory.
    #[error("{} is not a Petrel data directory (no PETREL marker, but not empty)", path.display())]
    NotADataDir { path: PathBuf },
    /// Another process holds the data directory.
    #[error("{} is locked by another process", path.display())]
    Locked { path: PathBuf },
    /// The data directory was written by an unknown format version.
    #[error("{} has format version {found}, this build reads {supported}", path.display())]
    UnsupportedFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// The partition is not known to this storage.
    #[error("partition {0} does not exist")]
    UnknownPartition(PartitionId),
    /// The partition already exists (or is already open).
    #[error("partition {0} already exists")]
    PartitionExists(PartitionId),
    /// The partition is already handed out to another owner.
    #[error("partition {0} is already open")]
    PartitionOpen(PartitionId),
    /// An append's base offset is not the log's next offset.
    #[error("partition {partition}: batch base offset {got}, expected {expected}")]
    OffsetMismatch {
        partition: PartitionId,
        expected: u64,
        got: u64,
    },
    /// A read below the log start or a truncation below it.
    #[error("partition {partition}: offset {offset} is outside [{start}, {next}]")]
    OffsetOutOfRange {
        partition: PartitionId,
        offset: u64,
        start: u64,
        next: u64,
    },
    /// A batch above the configured maximum size.
    #[error("batch of {size} bytes exceeds the limit of {limit}")]
    BatchTooLarge { size: usize, limit: usize },
    /// An invalid batch was handed to the engine.
    #[error("invalid batch: {0}")]
    InvalidBatch(#[from] BatchError),
    /// An invalid setting.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    /// The storage was closed.
    #[error("storage is closed")]
    Closed,
}

/// What failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Corruption {
    /// A record batch did not validate.
    #[error("{0}")]
    Batch(#[from] BatchError),
    /// A file header has the wrong magic number.
    #[error("bad magic number {found:#010x}")]
    BadMagic { found: u32 },
    /// A write-ahead log chunk failed its checksum and valid data follows it.
    #[error("write-ahead log chunk checksum mismatch with valid chunks after it")]
    WalChunk,
    /// Offsets do not continue where the previous batch ended.
    #[error("offset gap: expected {expected}, found {found}")]
    OffsetGap { expected: u64, found: u64 },
    /// Data the checkpoint says was durable is missing.
    #[error("durable data missing: the log should reach offset {expected}, found {found}")]
    Missing { expected: u64, found: u64 },
    /// The checkpoint file failed its checksum or is malformed.
    #[error("checkpoint is malformed")]
    Checkpoint,
}

impl Error {
    /// Wraps an I/O error, classifying "no space left" so callers can tell it apart.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            Error::DiskFull { path, source }
        } else {
            Error::Io { op, path, source }
        }
    }

    /// A corruption error at a position in a file.
    pub(crate) fn corrupt(
        path: impl Into<PathBuf>,
        position: u64,
        reason: impl Into<Corruption>,
    ) -> Self {
        Error::Corrupt {
            path: path.into(),
            position,
            reason: reason.into(),
        }
    }

    /// A short, fixed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::DiskFull { .. } => "disk_full",
            Error::Poisoned { .. } => "poisoned",
            Error::Corrupt { .. } => "corrupt",
            Error::NotADataDir { .. } => "not_a_data_dir",
            Error::Locked { .. } => "locked",
            Error::UnsupportedFormat { .. } => "unsupported_format",
            Error::UnknownPartition(_) => "unknown_partition",
            Error::PartitionExists(_) => "partition_exists",
            Error::PartitionOpen(_) => "partition_open",
            Error::OffsetMismatch { .. } => "offset_mismatch",
            Error::OffsetOutOfRange { .. } => "offset_out_of_range",
            Error::BatchTooLarge { .. } => "batch_too_large",
            Error::InvalidBatch(_) => "invalid_batch",
            Error::Config(_) => "config",
            Error::Closed => "closed",
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
