//! Partitions as Raft groups: openraft's log storage and state machine on `petrel-log`.
//!
//! Every Raft entry is one record batch in the partition's log, so the Raft log *is* the
//! message log and a payload is stored once (DESIGN.md §1, §4). The batch header carries
//! the entry's term and index; the log gives each batch its record offsets, the same on
//! every replica because every replica appends the same entries. Raft's own entries
//! (blanks, membership changes) are control batches, which consumers skip.
//!
//! * [`LogStore`]: `RaftLogStorage` over a `petrel_log::Log`; an append's `LogFlushed`
//!   callback completes from the storage's group commit.
//! * [`PartitionMachine`]: the state machine (applied position, membership, the high
//!   watermark); its snapshots hold that state only, never messages.
//! * `files`: the small files beside the log (vote, purge point, snapshot), each
//!   replaced atomically.
//!
//! A replica that catches up from a snapshot has its log emptied; its next entry must
//! land at the offset it has on the leader. The state machine counts every entry's
//! offsets (Raft's own entries take one each), so an installed state says where the log
//! goes on, and the store moves the emptied log there (`Log::skip_to`); a replicated
//! message entry carries its leader's offsets too, and a store that would place it
//! elsewhere refuses it as diverged.

pub(crate) mod entry;
mod error;
mod files;
mod log_store;
mod state_machine;

use std::io::Cursor;

use petrel_log::RecordBatch;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use entry::EntryError;
pub use error::RaftStoreError;
pub use log_store::{Backfill, LogReader, LogStore};
pub use state_machine::{
    Application, GroupState, Machine, PartitionApp, PartitionMachine, Refused,
};

/// Opens a partition's Raft storage: its log store over `log`, and its state machine,
/// with the vote, purge point and snapshot kept in `dir`.
pub fn open(
    log: petrel_log::Log,
    dir: &std::path::Path,
) -> Result<(LogStore, PartitionMachine), RaftStoreError> {
    open_group(log, dir, None)
}

/// Opens a group's Raft storage for application `A`, publishing its state to `publish`.
pub fn open_group<A: Application>(
    log: petrel_log::Log,
    dir: &std::path::Path,
    publish: Option<tokio::sync::watch::Sender<A>>,
) -> Result<(LogStore, Machine<A>), RaftStoreError> {
    // The state machine tells the store where an emptied log goes on.
    let resume = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let machine = Machine::open(dir, resume.clone(), publish)?;
    let store = LogStore::open(log, dir, resume)?;
    Ok((store, machine))
}

/// Identifies a node of the cluster.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The Raft types of a partition's group.
    pub PartitionRaft:
        D = Proposal,
        R = Applied,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<PartitionRaft>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A proposed append: one batch of records, placed (offsets, term, index) by the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal(pub RecordBatch);

impl Proposal {
    /// A command for the group's application (`Application::command`), e.g. a queue's
    /// settled messages: stored in the log like Raft's own entries, read by no consumer.
    pub fn command(name: &str, value: &[u8]) -> Result<Proposal, petrel_log::BatchError> {
        entry::command_batch(name, value).map(Proposal)
    }
}

impl Serialize for Proposal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0.as_bytes())
    }
}

impl<'de> Deserialize<'de> for Proposal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes: Vec<u8> = serde::de::Deserialize::deserialize(d)?;
        RecordBatch::from_bytes(bytes.into())
            .map(Proposal)
            .map_err(serde::de::Error::custom)
    }
}

/// What applying an entry did: the offsets its records took (none for Raft's own
/// entries), and the application's answer to the proposer, if it has one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Offset of the entry's first record.
    pub base_offset: u64,
    /// Offset after its last record: the group's high watermark once applied.
    pub next_offset: u64,
    /// The application's answer (the metadata group's command results), as JSON.
    pub reply: Option<serde_json::Value>,
}

/// A storage error as openraft reports it.
pub type StorageError = openraft::StorageError<NodeId>;
