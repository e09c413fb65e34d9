//! Group commit in front of the partition groups: records produced to a group while its
//! previous proposal is being committed are merged into one batch, one Raft entry.
//!
//! openraft 0.9 appends one entry at a time and waits for its flush before the next, so
//! a group proposed to record by record commits about one entry per disk sync. Merging
//! makes an entry carry whatever arrived meanwhile: the more producers, the larger the
//! batches, the same number of syncs. One proposal per group is in flight at a time,
//! which also keeps the records in the order they arrived.

use std::collections::{HashMap, VecDeque};
use std::mem;
use std::sync::{Arc, Mutex};

use petrel_log::BatchBuilder;
use tokio::sync::oneshot;

use super::{ClusterError, ClusterNode};
use crate::raft::{Proposal, Refused};

/// A batch is proposed once it holds this many bytes of records even if more are
/// waiting, bounding entries (and the messages replicating them).
const MAX_BATCH_BYTES: usize = 1 << 20;

/// A record to produce.
#[derive(Debug, Clone, Copy)]
pub struct NewRecord<'a> {
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// The record's key, if it has one.
    pub key: Option<&'a [u8]>,
    /// The payload.
    pub value: &'a [u8],
    /// Header names and values.
    pub headers: &'a [(&'a [u8], &'a [u8])],
}

/// The offsets a produce's records took: `base_offset .. next_offset`.
pub type Offsets = (u64, u64);

type Reply = oneshot::Sender<Result<Offsets, Arc<ClusterError>>>;

/// Records waiting to be proposed together, and who waits for them.
#[derive(Default)]
struct Chunk {
    batch: BatchBuilder,
    bytes: usize,
    /// Each producer's record count, in the order they were pushed.
    waiting: Vec<(u32, Reply)>,
}

/// What waits for one group.
#[derive(Default)]
struct Pending {
    chunks: VecDeque<Chunk>,
    /// A proposal of this group is being committed; its proposer sends the next.
    busy: bool,
}

/// The merging queues of every group this node proposes to.
#[derive(Default)]
pub(super) struct GroupCommit {
    groups: Mutex<HashMap<u64, Pending>>,
}

impl GroupCommit {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `records` for `group` now, in call order, and returns what waits until
    /// they are committed; if no proposal of the group is under way, starts proposing
    /// (on a task of its own, so that a producer that goes away leaves none of the
    /// others waiting).
    pub fn produce(
        node: &Arc<ClusterNode>,
        group: u64,
        records: &[NewRecord<'_>],
    ) -> impl Future<Output = Result<Offsets, Arc<ClusterError>>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let bytes: usize = records
            .iter()
            .map(|r| r.value.len() + r.key.map_or(0, <[u8]>::len))
            .sum();
        let lead = {
            let mut groups = node.commit.lock();
            let pending = groups.entry(group).or_default();
            let full = pending
                .chunks
                .back()
                .is_none_or(|c| !c.waiting.is_empty() && c.bytes + bytes > MAX_BATCH_BYTES);
            if full {
                pending.chunks.push_back(Chunk::default());
            }
            if let Some(chunk) = pending.chunks.back_mut() {
                for r in records {
                    chunk.batch.push(r.timestamp, r.key, r.value, r.headers);
                }
                chunk.bytes += bytes;
                let count = u32::try_from(records.len()).unwrap_or(u32::MAX);
                chunk.waiting.push((count, reply));
            }
            !mem::replace(&mut pending.busy, true)
        };
        if lead {
            let node = node.clone();
            tokio::spawn(async move { node.commit.propose_all(&node, group).await });
        }
        async move {
            answer.await.map_err(|_| {
                Arc::new(ClusterError::Raft {
                    group,
                    message: "the node stopped before the append was committed".into(),
                })
            })?
        }
    }

    /// Proposes what is waiting for `group`, batch after batch, until nothing is.
    async fn propose_all(&self, node: &ClusterNode, group: u64) {
        loop {
            let Some((batch, waiting)) = self.take(group) else {
                return;
            };
            let result = match batch.build(0, 0, 0) {
                Ok(batch) => node.write(group, Proposal(batch)).await.map(|r| {
                    let refused = r
                        .data
                        .reply
                        .and_then(|v| serde_json::from_value::<Refused>(v).ok())
                        .map(|r| r.refused)
                        .unwrap_or_default();
                    (r.data.base_offset, refused)
                }),
                Err(e) => Err(ClusterError::Meta(crate::meta::MetaError::InvalidArgument(
                    e.to_string(),
                ))),
            };
            match result {
                Ok((mut offset, refused)) => {
                    for (count, reply) in waiting {
                        let next = offset + u64::from(count);
                        let answer = if refused.iter().any(|o| (offset..next).contains(o)) {
                            Err(Arc::new(ClusterError::Full { group }))
                        } else {
                            Ok((offset, next))
                        };
                        let _ = reply.send(answer);
                        offset = next;
                    }
                }
                Err(e) => {
                    let e = Arc::new(e);
                    for (_, reply) in waiting {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// The next chunk of `group`, or `None` (and the group no longer busy) if nothing
    /// waits.
    fn take(&self, group: u64) -> Option<(BatchBuilder, Vec<(u32, Reply)>)> {
        let mut groups = self.lock();
        let pending = groups.get_mut(&group)?;
        let Some(chunk) = pending.chunks.pop_front() else {
            groups.remove(&group);
            return None;
        };
        Some((chunk.batch, chunk.waiting))
    }
}
