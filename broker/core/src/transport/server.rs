//! The receiving side: requests handed to this node's groups.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use openraft::Raft;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use petrel_log::RecordBatch;
use serde::Serialize;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::AppendHeader;
use super::proto::raft_transport_server::{RaftTransport, RaftTransportServer};
use super::proto::{
    AppendBatchReply, AppendBatchRequest, AppendRequest, AppendResult, PingReply, PingRequest,
    RaftReply, RaftRequest,
};
use crate::raft::{NodeId, PartitionRaft, Proposal, entry};

/// The largest request a peer may send: an append of up to `max_payload_entries`
/// batches (see the server's Raft settings) of up to 1 MiB each, with room to spare.
const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// The Raft groups this node runs, by group id.
pub type Groups = Arc<RwLock<HashMap<u64, Raft<PartitionRaft>>>>;

/// How long one append of a batch may take before it is answered as failed.
const BATCHED_BUDGET: std::time::Duration = std::time::Duration::from_millis(100);

/// Groups whose proposals wait: their leadership is being handed over, and a proposal
/// committed meanwhile would keep the voters from electing the new leader.
#[derive(Clone, Debug, Default)]
pub struct Holds(Arc<watch::Sender<BTreeSet<u64>>>);

impl Holds {
    /// Holds the proposals of `group` until the guard is dropped; `None` if they are
    /// held already (one handover of a group at a time).
    pub fn hold(&self, group: u64) -> Option<HoldGuard> {
        self.0
            .send_if_modified(|held| held.insert(group))
            .then(|| HoldGuard {
                holds: self.clone(),
                group,
            })
    }

    /// Returns once proposals to `group` are not held.
    pub async fn pass(&self, group: u64) {
        if !self.0.borrow().contains(&group) {
            return;
        }
        let mut held = self.0.subscribe();
        // The sender lives as long as `self`: waiting cannot fail.
        let _ = held.wait_for(|held| !held.contains(&group)).await;
    }
}

/// Releases a group's proposals when dropped.
#[derive(Debug)]
pub struct HoldGuard {
    holds: Holds,
    group: u64,
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        self.holds.0.send_modify(|held| {
            held.remove(&self.group);
        });
    }
}

/// The internal transport's gRPC service.
#[derive(Clone)]
pub struct RaftService {
    groups: Groups,
    holds: Holds,
}

impl RaftService {
    /// A service handing requests to `groups`, proposals once `holds` lets them pass.
    pub fn new(groups: Groups, holds: Holds) -> Self {
        Self { groups, holds }
    }

    /// The service, ready to add to a tonic server.
    pub fn into_server(self) -> RaftTransportServer<Self> {
        RaftTransportServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn group(&self, id: u64) -> Result<Raft<PartitionRaft>, Status> {
        group(&self.groups, id)
    }
}

fn group(groups: &Groups, id: u64) -> Result<Raft<PartitionRaft>, Status> {
    groups
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&id)
        .cloned()
        .ok_or_else(|| Status::not_found(format!("no Raft group {id} on this node")))
}

fn invalid(what: &str, e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{what}: {e}"))
}

/// Hands an append to its group; returns the Raft result (JSON).
async fn append(groups: &Groups, request: AppendRequest) -> Result<Bytes, Status> {
    let raft = group(groups, request.group)?;
    let header: AppendHeader =
        serde_json::from_slice(&request.header).map_err(|e| invalid("append header", e))?;
    let entries = request
        .entries
        .into_iter()
        .map(|bytes| {
            let batch = RecordBatch::from_bytes(bytes).map_err(|e| invalid("entry", e))?;
            entry::from_batch(batch).map_err(|e| invalid("entry", e))
        })
        .collect::<Result<Vec<_>, Status>>()?;
    let rpc = AppendEntriesRequest::<PartitionRaft> {
        vote: header.vote,
        prev_log_id: header.prev_log_id,
        leader_commit: header.leader_commit,
        entries,
    };
    let result = raft.append_entries(rpc).await;
    serde_json::to_vec(&result)
        .map(Bytes::from)
        .map_err(|e| Status::internal(e.to_string()))
}

/// One append's outcome as a batch reply carries it.
fn outcome(result: Result<Bytes, Status>) -> AppendResult {
    match result {
        Ok(body) => AppendResult {
            body,
            ..AppendResult::default()
        },
        Err(status) => AppendResult {
            body: Bytes::new(),
            code: status.code().into(),
            message: status.message().to_owned(),
        },
    }
}

/// The Raft result as the reply body.
fn reply<T: Serialize, E: Serialize>(result: &Result<T, E>) -> Result<Response<RaftReply>, Status> {
    let body = serde_json::to_vec(result).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftReply { body: body.into() }))
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn append_entries(
        &self,
        request: Request<AppendRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let body = append(&self.groups, request.into_inner()).await?;
        Ok(Response::new(RaftReply { body }))
    }

    async fn append_batch(
        &self,
        request: Request<AppendBatchRequest>,
    ) -> Result<Response<AppendBatchReply>, Status> {
        let mut requests = request.into_inner().requests;
        if requests.len() == 1
            && let Some(request) = requests.pop()
        {
            let results = vec![outcome(append(&self.groups, request).await)];
            return Ok(Response::new(AppendBatchReply { results }));
        }
        // Concurrently, each within a budget: one group's busy Raft must not hold up the
        // answers of the others.
        let mut appends = tokio::task::JoinSet::new();
        let count = requests.len();
        for (i, request) in requests.into_iter().enumerate() {
            let groups = self.groups.clone();
            appends.spawn(async move {
                let appended = tokio::time::timeout(BATCHED_BUDGET, append(&groups, request));
                let result = appended
                    .await
                    .unwrap_or_else(|_| Err(Status::unavailable("the group is busy")));
                (i, result)
            });
        }
        let mut results = vec![AppendResult::default(); count];
        while let Some(done) = appends.join_next().await {
            let (i, result) = done.map_err(|e| Status::internal(e.to_string()))?;
            results[i] = outcome(result);
        }
        Ok(Response::new(AppendBatchReply { results }))
    }

    async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let request = request.into_inner();
        let raft = self.group(request.group)?;
        let rpc: VoteRequest<NodeId> =
            serde_json::from_slice(&request.body).map_err(|e| invalid("vote request", e))?;
        reply(&raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let request = request.into_inner();
        let raft = self.group(request.group)?;
        let rpc: InstallSnapshotRequest<PartitionRaft> =
            serde_json::from_slice(&request.body).map_err(|e| invalid("snapshot request", e))?;
        reply(&raft.install_snapshot(rpc).await)
    }

    async fn ping(&self, _request: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
        Ok(Response::new(PingReply {}))
    }

    async fn propose(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let request = request.into_inner();
        let raft = self.group(request.group)?;
        let batch = RecordBatch::from_bytes(request.body).map_err(|e| invalid("proposal", e))?;
        self.holds.pass(request.group).await;
        reply(&raft.client_write(Proposal(batch)).await)
    }
}
