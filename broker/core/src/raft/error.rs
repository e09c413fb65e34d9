//! Errors of a partition's Raft storage before openraft sees them.

use std::path::PathBuf;

use super::entry::EntryError;

/// Why the Raft storage could not open or read a partition.
#[derive(Debug, thiserror::Error)]
pub enum RaftStoreError {
    /// A small file beside the log (vote, purge point, snapshot) could not be used.
    #[error("{op} {path}: {source}")]
    File {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The partition's log failed.
    #[error(transparent)]
    Log(#[from] petrel_log::Error),
    /// The log has no batch where its offsets say one is.
    #[error("no batch at offset {0}")]
    Missing(u64),
    /// A stored batch is not a Raft entry.
    #[error(transparent)]
    Entry(#[from] EntryError),
    /// A replicated entry's offsets differ from this log's: the replicas diverged.
    #[error("entry {index} sits at offset {leader} on its leader but would sit at {here} here")]
    Diverged { index: u64, leader: u64, here: u64 },
    /// The group stopped: its log is closed.
    #[error("the group stopped")]
    Stopped,
    /// A snapshot's state does not decode.
    #[error("snapshot state: {0}")]
    Snapshot(#[from] serde_json::Error),
}

impl RaftStoreError {
    pub(crate) fn file(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::File {
            op,
            path: path.into(),
            source,
        }
    }
}
