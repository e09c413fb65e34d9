//! Group commit in front of the partition groups: records produced to a group while its
//! proposals are being committed are merged into one batch, one Raft entry.
//!
//! Each entry costs a disk sync on the leader and on a quorum of followers, so a group
//! proposed to record by record would commit about one entry per sync. Merging makes an
//! entry carry whatever arrived meanwhile: the more producers, the larger the batches,
//! the same number of syncs. While this node leads the group, a second proposal is
//! handed to Raft while the first commits (the leader appends it while the followers
//! sync the first); elsewhere one goes to the leader at a time. Proposals are handed
//! over in the order their records arrived, so records keep that order.

use std::collections::{HashMap, VecDeque};
use std::mem;
use std::sync::{Arc, Mutex};

use openraft::error::ClientWriteError;
use openraft::raft::ClientWriteResponse;
use petrel_log::BatchBuilder;
use tokio::sync::{Notify, oneshot};

use super::{ClusterError, ClusterNode, Committing, Written};
use crate::raft::{PartitionRaft, Proposal, Refused};

/// A batch is proposed once it holds this many bytes of records even if more are
/// waiting, bounding entries (and the messages replicating them).
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Proposals of a group handed to its local leader and not yet committed, at most.
const IN_FLIGHT: usize = 2;

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

/// Each producer's record count and reply, in the order they were pushed.
type Waiting = Vec<(u32, Reply)>;

/// Records waiting to be proposed together, and who waits for them.
#[derive(Default)]
struct Chunk {
    batch: BatchBuilder,
    bytes: usize,
    waiting: Waiting,
}

/// What waits for one group.
#[derive(Default)]
struct Pending {
    chunks: VecDeque<Chunk>,
    /// A proposer of this group is at work; it sends what arrives.
    busy: bool,
    /// Wakes the busy proposer when records arrive.
    arrived: Arc<Notify>,
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
            let busy = mem::replace(&mut pending.busy, true);
            if busy {
                pending.arrived.notify_one();
            }
            !busy
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
        let Some(arrived) = self.lock().get(&group).map(|p| p.arrived.clone()) else {
            return;
        };
        // Handed to the local leader, oldest first.
        let mut in_flight: VecDeque<(Committing, Proposal, Waiting)> = VecDeque::new();
        loop {
            if in_flight.len() < IN_FLIGHT {
                if let Some((batch, waiting)) = self.take(group, in_flight.is_empty()) {
                    let proposal = match batch.build(0, 0, 0) {
                        Ok(batch) => Proposal(batch),
                        Err(e) => {
                            let e = crate::meta::MetaError::InvalidArgument(e.to_string());
                            answer(group, waiting, Err(ClusterError::Meta(e)));
                            continue;
                        }
                    };
                    match node.submit(group, &proposal).await {
                        Some(committing) => in_flight.push_back((committing, proposal, waiting)),
                        None => {
                            // Not led here: what was handed over is answered first, then
                            // this goes to the leader alone (forwarded proposals could
                            // overtake each other).
                            while let Some((committing, proposal, waiting)) = in_flight.pop_front()
                            {
                                let result = committed(node, group, committing.await, proposal);
                                answer(group, waiting, result.await);
                            }
                            answer(group, waiting, node.write(group, proposal).await);
                        }
                    }
                    continue;
                }
                if in_flight.is_empty() {
                    return;
                }
            }
            let room = in_flight.len() < IN_FLIGHT;
            let Some((committing, _, _)) = in_flight.front_mut() else {
                continue;
            };
            tokio::select! {
                result = committing => {
                    if let Some((_, proposal, waiting)) = in_flight.pop_front() {
                        answer(group, waiting, committed(node, group, result, proposal).await);
                    }
                }
                () = arrived.notified(), if room => {}
            }
        }
    }

    /// The next chunk of `group`, or `None` if nothing waits (and then, if `idle`, the
    /// group is no longer busy: the next produce starts a proposer).
    fn take(&self, group: u64, idle: bool) -> Option<(BatchBuilder, Waiting)> {
        let mut groups = self.lock();
        let pending = groups.get_mut(&group)?;
        let Some(chunk) = pending.chunks.pop_front() else {
            if idle {
                groups.remove(&group);
            }
            return None;
        };
        Some((chunk.batch, chunk.waiting))
    }
}

/// What became of a proposal handed to the local leader: a leader that lost its place
/// before the commit answers `ForwardToLeader` (or nothing, if its group stopped), and
/// the proposal goes to the group's leader, wherever it is now.
async fn committed(
    node: &ClusterNode,
    group: u64,
    result: Result<Written, oneshot::error::RecvError>,
    proposal: Proposal,
) -> Result<ClientWriteResponse<PartitionRaft>, ClusterError> {
    match result {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(ClientWriteError::ForwardToLeader(_))) | Err(_) => node.write(group, proposal).await,
        Ok(Err(e)) => Err(ClusterError::Raft {
            group,
            message: e.to_string(),
        }),
    }
}

/// Answers each producer of a batch with the offsets its records took, or why not.
fn answer(
    group: u64,
    waiting: Waiting,
    result: Result<ClientWriteResponse<PartitionRaft>, ClusterError>,
) {
    match result {
        Ok(response) => {
            let refused = response
                .data
                .reply
                .and_then(|v| serde_json::from_value::<Refused>(v).ok())
                .map(|r| r.refused)
                .unwrap_or_default();
            let mut offset = response.data.base_offset;
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
