//! A group's state machine: where its log has been applied to, its membership, its high
//! watermark, and what its application (a partition's cursors, the cluster's metadata)
//! builds from the messages. Snapshots hold this state only; the messages stay in the log.

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageIOError, StoredMembership,
};
use petrel_log::RecordBatch;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::messaging::cursor::{LIMITS, Limits, SETTLE, Settle, Settled};

use super::{Applied, NodeId, PartitionRaft, Proposal, RaftStoreError, StorageError, files};

/// What a group does with its message entries, beyond counting them.
pub trait Application:
    std::fmt::Debug + Clone + Default + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// Applies one message batch; returns the answer for whoever proposed it.
    fn apply(&mut self, batch: &RecordBatch) -> Option<serde_json::Value>;

    /// Applies a command proposed with [`super::Proposal::command`].
    fn command(&mut self, _name: &[u8], _value: &[u8]) -> Option<serde_json::Value> {
        None
    }
}

/// A partition's application: what its consumers have settled, and what it may hold
/// (queues).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionApp {
    /// Messages acknowledged (or dropped) for good.
    #[serde(default)]
    pub settled: Settled,
    /// The queue's length limits, if its state machine counts them.
    #[serde(default)]
    pub limits: Option<Limits>,
}

/// The answer to an append some of whose messages a full queue refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// Offsets of the refused messages.
    pub refused: Vec<u64>,
}

impl Application for PartitionApp {
    fn apply(&mut self, batch: &RecordBatch) -> Option<serde_json::Value> {
        let refused = self.settled.append(batch, self.limits.as_ref());
        if refused.is_empty() {
            return None;
        }
        serde_json::to_value(Refused { refused }).ok()
    }

    fn command(&mut self, name: &[u8], value: &[u8]) -> Option<serde_json::Value> {
        // Proposed by this version of the code only; an undecodable command is logged and
        // skipped alike on every replica.
        match name {
            name if name == SETTLE.as_bytes() => match serde_json::from_slice::<Settle>(value) {
                Ok(settle) => self.settled.apply(&settle),
                Err(e) => tracing::warn!(error = %e, "undecodable settle command skipped"),
            },
            name if name == LIMITS.as_bytes() => match serde_json::from_slice(value) {
                Ok(limits) => self.limits = limits,
                Err(e) => tracing::warn!(error = %e, "undecodable limits command skipped"),
            },
            other => {
                tracing::warn!(command = %String::from_utf8_lossy(other), "unknown command skipped")
            }
        }
        None
    }
}

/// The state a group's entries build up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState<A> {
    /// The last entry applied.
    pub applied: Option<LogId<NodeId>>,
    /// The last membership applied.
    pub membership: StoredMembership<NodeId, BasicNode>,
    /// The high watermark: the offset after the last message applied.
    pub next_offset: u64,
    /// The offset after the last entry applied, Raft's own entries (one record each)
    /// included: where a replica that installs this state goes on appending.
    pub log_next: u64,
    /// What the application built.
    pub app: A,
}

/// A snapshot as kept: its metadata and the serialized state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

impl Stored {
    fn to_snapshot(&self) -> Snapshot<PartitionRaft> {
        Snapshot {
            meta: self.meta.clone(),
            snapshot: Box::new(Cursor::new(self.data.clone())),
        }
    }
}

/// The current snapshot, shared with the builders, and where it is kept.
#[derive(Debug, Clone)]
struct Snapshots {
    current: Arc<Mutex<Option<Stored>>>,
    path: PathBuf,
}

impl Snapshots {
    /// Keeps `stored` as the current snapshot, on disk first.
    fn keep(&self, stored: Stored) -> Result<(), RaftStoreError> {
        files::write(&self.path, &stored)
            .map_err(|e| RaftStoreError::file("write", &self.path, e))?;
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(stored);
        Ok(())
    }

    fn current(&self) -> Option<Stored> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// A group's state machine.
#[derive(Debug)]
pub struct Machine<A> {
    state: GroupState<A>,
    snapshots: Snapshots,
    /// Tells the log store where an emptied log goes on: the installed state's `log_next`.
    resume: Arc<AtomicU64>,
    /// Where the application's state is published after each change, if anyone watches.
    publish: Option<watch::Sender<A>>,
    /// The high watermark, published after each change: readers see nothing past it.
    high_watermark: watch::Sender<u64>,
}

/// A partition's state machine.
pub type PartitionMachine = Machine<PartitionApp>;

impl<A: Application> Machine<A> {
    /// Opens the state machine kept in `dir`: the state of its last snapshot, if any
    /// (Raft applies the log after it again).
    pub(super) fn open(
        dir: impl Into<PathBuf>,
        resume: Arc<AtomicU64>,
        publish: Option<watch::Sender<A>>,
    ) -> Result<Self, RaftStoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| RaftStoreError::file("create", &dir, e))?;
        let path = dir.join("snapshot");
        let stored: Option<Stored> = files::read(&path)?;
        let state: GroupState<A> = match &stored {
            Some(s) => serde_json::from_slice(&s.data)?,
            None => GroupState::default(),
        };
        resume.store(state.log_next, Ordering::Release);
        if let Some(p) = &publish {
            p.send_replace(state.app.clone());
        }
        let (high_watermark, _) = watch::channel(state.next_offset);
        Ok(Self {
            resume,
            publish,
            high_watermark,
            state,
            snapshots: Snapshots {
                current: Arc::new(Mutex::new(stored)),
                path,
            },
        })
    }

    /// The state applied so far.
    pub fn state(&self) -> &GroupState<A> {
        &self.state
    }

    /// The high watermark as it moves: the offset after the last message applied.
    pub fn high_watermark(&self) -> watch::Receiver<u64> {
        self.high_watermark.subscribe()
    }

    fn published(&self) {
        if let Some(p) = &self.publish {
            p.send_replace(self.state.app.clone());
        }
        self.high_watermark.send_replace(self.state.next_offset);
    }
}

/// Builds a snapshot of the state as it was when the builder was taken.
pub struct SnapshotBuilder<A> {
    state: GroupState<A>,
    snapshots: Snapshots,
}

impl<A: Application> RaftSnapshotBuilder<PartitionRaft> for SnapshotBuilder<A> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<PartitionRaft>, StorageError> {
        let data = serde_json::to_vec(&self.state)
            .map_err(|e| StorageIOError::write_snapshot(None, AnyError::new(&e)))?;
        let index = self.state.applied.map_or(0, |l| l.index);
        let stored = Stored {
            meta: SnapshotMeta {
                last_log_id: self.state.applied,
                last_membership: self.state.membership.clone(),
                snapshot_id: format!("{index}-{}", self.state.next_offset),
            },
            data,
        };
        let signature = stored.meta.signature();
        self.snapshots
            .keep(stored.clone())
            .map_err(|e| StorageIOError::write_snapshot(Some(signature), AnyError::new(&e)))?;
        Ok(stored.to_snapshot())
    }
}

impl<A: Application> RaftStateMachine<PartitionRaft> for Machine<A> {
    type SnapshotBuilder = SnapshotBuilder<A>;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError> {
        Ok((self.state.applied, self.state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry<PartitionRaft>> + Send,
        I::IntoIter: Send,
    {
        let mut replies = Vec::new();
        for e in entries {
            let s = &mut self.state;
            s.applied = Some(e.log_id);
            // Raft's own entries take an offset each too, but hold nothing a reader sees.
            let mut base_offset = s.next_offset;
            let mut reply = None;
            match e.payload {
                EntryPayload::Blank => s.log_next += 1,
                // A command takes an offset too, but is no message.
                EntryPayload::Normal(Proposal(batch)) if batch.is_control() => {
                    s.log_next = batch.next_offset();
                    if let Ok(Some((name, value))) = super::entry::command(&batch) {
                        reply = s.app.command(&name, &value);
                    }
                }
                EntryPayload::Normal(Proposal(batch)) => {
                    base_offset = batch.base_offset();
                    s.next_offset = batch.next_offset();
                    s.log_next = batch.next_offset();
                    reply = s.app.apply(&batch);
                }
                EntryPayload::Membership(m) => {
                    s.membership = StoredMembership::new(Some(e.log_id), m);
                    s.log_next += 1;
                }
            }
            replies.push(Applied {
                base_offset,
                next_offset: s.next_offset,
                reply,
            });
        }
        self.published();
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder<A> {
        SnapshotBuilder {
            state: self.state.clone(),
            snapshots: self.snapshots.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let state: GroupState<A> = serde_json::from_slice(&data).map_err(|e| {
            StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        let stored = Stored {
            meta: meta.clone(),
            data,
        };
        self.snapshots.keep(stored).map_err(|e| {
            StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        self.resume.store(state.log_next, Ordering::Release);
        self.state = state;
        self.published();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<PartitionRaft>>, StorageError> {
        Ok(self.snapshots.current().map(|s| s.to_snapshot()))
    }
}
