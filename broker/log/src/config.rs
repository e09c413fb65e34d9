//! Settings: node-wide (`StorageConfig`) and per partition (`PartitionConfig`).

use std::path::PathBuf;
use std::time::Duration;

/// When an append counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum SyncPolicy {
    /// Resolve an append only after an `fdatasync` of the write-ahead log covered it.
    #[default]
    Always,
    /// Resolve an append at the next periodic sync (at most `StorageConfig::sync_interval` away).
    Interval,
    /// Resolve an append at once; the data reaches disk with other partitions' syncs or the
    /// periodic one. Weaker: a machine crash can lose acknowledged data.
    Never,
}

impl std::str::FromStr for SyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(Self::Always),
            "interval" => Ok(Self::Interval),
            "never" => Ok(Self::Never),
            other => Err(format!(
                "unknown sync policy {other:?} (expected always, interval or never)"
            )),
        }
    }
}

impl std::fmt::Display for SyncPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Always => "always",
            Self::Interval => "interval",
            Self::Never => "never",
        })
    }
}

/// Node-wide storage settings.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// Root directory of the node's data.
    pub dir: PathBuf,
    /// The write-ahead log rolls to a new file, and a checkpoint retires the old one, past this size.
    pub wal_max_bytes: u64,
    /// The longest an `Interval` append waits for its sync.
    pub sync_interval: Duration,
    /// Bytes of recent batches kept in memory across all partitions.
    pub cache_bytes: usize,
    /// The largest batch an append accepts.
    pub max_batch_bytes: usize,
    /// One sparse index entry per this many bytes of batches.
    pub index_interval_bytes: u32,
    /// Zero-fill a new WAL file to `wal_max_bytes` when no retired one can be reused, so
    /// syncs never have to grow it. Off for file systems where zeros cost nothing and
    /// growing is free (tmpfs) or space is tight.
    pub wal_preallocate: bool,
    /// Bytes of small appends the partitions may hold in memory, together, before writing
    /// them to their segments (they are in the WAL meanwhile); 0 writes every append through.
    pub write_buffer_bytes: usize,
}

impl StorageConfig {
    /// Defaults for a data directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            wal_max_bytes: 256 << 20,
            sync_interval: Duration::from_millis(100),
            cache_bytes: 64 << 20,
            max_batch_bytes: 64 << 20,
            index_interval_bytes: 64 << 10,
            wal_preallocate: true,
            write_buffer_bytes: 16 << 20,
        }
    }

    pub(crate) fn validate(&self) -> crate::Result<()> {
        if self.wal_max_bytes < 4096 {
            return Err(crate::Error::Config("wal_max_bytes must be at least 4096"));
        }
        if self.sync_interval.is_zero() {
            return Err(crate::Error::Config("sync_interval must be positive"));
        }
        if self.index_interval_bytes == 0 {
            return Err(crate::Error::Config(
                "index_interval_bytes must be positive",
            ));
        }
        if self.max_batch_bytes > crate::batch::MAX_BATCH_BYTES as usize {
            return Err(crate::Error::Config(
                "max_batch_bytes is above the format limit (1 GiB)",
            ));
        }
        Ok(())
    }
}

/// Settings of one partition; given on every open, not stored by the engine.
#[derive(Debug, Clone)]
pub struct PartitionConfig {
    /// Durability of this partition's appends.
    pub sync_policy: SyncPolicy,
    /// A segment rolls once it holds this many bytes.
    pub segment_bytes: u64,
    /// A segment rolls once its first batch is this old.
    pub segment_age: Option<Duration>,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        Self {
            sync_policy: SyncPolicy::Always,
            segment_bytes: 128 << 20,
            segment_age: Some(Duration::from_secs(7 * 24 * 3600)),
        }
    }
}

impl PartitionConfig {
    pub(crate) fn validate(&self) -> crate::Result<()> {
        if !(4096..=(1 << 30)).contains(&self.segment_bytes) {
            return Err(crate::Error::Config(
                "segment_bytes must be within 4 KiB ..= 1 GiB",
            ));
        }
        Ok(())
    }
}
