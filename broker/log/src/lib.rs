//! `petrel-log`: the partition log storage engine. It knows nothing of Raft or protocols.
//!
//! The shape is RabbitMQ Ra's (DESIGN.md §4): one **write-ahead log per node** shared by
//! every partition, so one `fdatasync` makes every partition's concurrent appends durable
//! at once (group commit, `wal`), and **per-partition segment files** written behind it for
//! reads and long retention (`segment`, with sparse offset and time indexes in `index`).
//! Small appends wait in a per-partition write buffer (`buffer`, Ra's mem table) and reach
//! their segment in one write; segments are synced when a WAL file is retired
//! (`checkpoint`), so a partition costs the commit path nothing more than its bytes. A
//! partition streaming at least `DIRECT_BYTES` per group-commit turn instead has its own
//! segment synced, so large streams are written once rather than twice. `petrel-bench log`
//! measures it: 100 partitions run at 0.8–1.2× the throughput of one at every concurrency
//! it tries (1, 16 and 256 appenders); with 256, where every byte of 100 small partitions
//! goes through the WAL and then into its segment, the disk's bandwidth is shared by both
//! writes (the one-partition case there streams directly).
//!
//! * [`Storage`] opens and recovers a data directory and hands out one [`Log`] per partition.
//! * [`Log`] appends [`RecordBatch`]es (durability reported through a callback, under the
//!   partition's [`SyncPolicy`]), reads by offset up to a caller-given high watermark
//!   (recent batches from a bounded cache, older ones from disk), finds offsets by time,
//!   and supports `truncate_from` (Raft conflicts) and `purge_to` (retention, release cursor).
//! * [`BatchBuilder`] encodes records into a batch once; the bytes are then shared, never copied.
//!
//! On-disk formats are described in `FORMAT.md` beside this crate.

mod batch;
mod buffer;
mod cache;
mod checkpoint;
mod config;
mod error;
mod fsutil;
mod index;
mod log;
mod segment;
mod shared;
mod storage;
mod wal;

pub use batch::{BatchBuilder, Compression, HEADER_LEN, MAX_BATCH_BYTES, Record, RecordBatch};
pub use config::{PartitionConfig, StorageConfig, SyncPolicy};
pub use error::{BatchError, Corruption, Error, Result};
pub use log::Log;
pub use storage::Storage;
pub use wal::{DIRECT_BYTES, OnDurable, WalPosition};

/// Identifies a partition (its Raft group) within a node.
pub type PartitionId = u64;
