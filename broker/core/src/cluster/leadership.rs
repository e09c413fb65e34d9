//! Handing a partition's leadership to another of its voters.
//!
//! openraft 0.9 has no leadership transfer, and a voter grants no vote while it hears
//! from its leader (its lease is the longest election timeout). So the leader goes
//! quiet: its proposals are held and it sends no heartbeats; the voters other than the
//! target hold their elections; the target campaigns until the others' leases ran out
//! and it is elected. Then everything resumes, and held proposals go to the new leader.
//! The partition takes no writes for about one election timeout.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use openraft::Raft;
use petrel_log::RecordBatch;
use tonic::{Request, Response, Status};

use super::partitions::members;
use super::{ClusterError, ClusterNode, Started};
use crate::meta::{Kind, MetaError, Partition};
use crate::raft::{NodeId, PartitionRaft};
use crate::transport::proto::leadership_server::{Leadership, LeadershipServer};
use crate::transport::proto::{
    HandoverReply, HandoverRequest, HandoverStep, LagReply, LagRequest, ReadLogReply,
    ReadLogRequest,
};

/// How long a handover may take, and the longest a voter holds its elections for one.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the target campaigns again while the others' leases run out.
const CAMPAIGN_EVERY: Duration = Duration::from_millis(250);
/// The most bytes a replica backfills from its leader after a snapshot.
const BACKFILL_AT_MOST: usize = 1 << 30;
/// How long a node leads a partition preferring another replica before handing it back.
const PREFERRED_AFTER: Duration = Duration::from_secs(10);
/// How long a voter may take to hold or resume its elections.
const STEP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a campaign, or a handover asked of another node, may take.
const LEAD_TIMEOUT: Duration = Duration::from_secs(7);
/// How often a condition of the handover is looked at again.
const POLL: Duration = Duration::from_millis(10);
/// Entries a replica may be behind its leader and still count as caught up: one in
/// flight under load is normal, a replica this far behind is not.
const UNDER_REPLICATED_LAG: u64 = 1000;
/// How long a peer may take to answer the ping that tells whether it is reachable.
const REACHABLE_TIMEOUT: Duration = Duration::from_millis(500);

/// How far a partition's replicas are, as its leader sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Node id to entries (batches) that replica is behind the leader's log.
    pub lag: HashMap<NodeId, u64>,
    /// The leader's high watermark: the offset its next record gets.
    pub end_offset: u64,
}

/// This node's share of the partitions' Raft groups (queues and topics; not the
/// metadata group), for its metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replication {
    /// Partition replicas held here.
    pub replicas: u64,
    /// Partitions led here.
    pub led: u64,
    /// Partitions led here with a voter that is unreachable, has matched nothing yet, or
    /// is more than [`UNDER_REPLICATED_LAG`] entries behind.
    pub under_replicated: u64,
}

impl ClusterNode {
    /// How many partition replicas this node holds and leads, and how many of those it
    /// leads lack a caught-up voter; peers are pinged only if some led group has one.
    pub async fn replication(&self) -> Replication {
        let groups: Vec<(u64, Raft<PartitionRaft>)> = self
            .groups
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|(group, _)| **group != crate::meta::METADATA_GROUP)
            .map(|(group, raft)| (*group, raft.clone()))
            .collect();
        let mut counts = Replication {
            replicas: groups.len() as u64,
            ..Replication::default()
        };
        // The voters other than this node of each group led here, with whether each
        // is caught up as far as the leader's replication metrics tell.
        let mut led: Vec<Vec<(NodeId, bool)>> = Vec::new();
        for (_, raft) in &groups {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            if metrics.current_leader != Some(self.id) {
                continue;
            }
            let last = metrics.last_log_index.unwrap_or(0);
            let matched = metrics.replication.as_ref();
            let voters = metrics
                .membership_config
                .membership()
                .voter_ids()
                .filter(|id| *id != self.id)
                .map(|id| {
                    let caught_up = matched
                        .and_then(|r| r.get(&id).copied().flatten())
                        .is_some_and(|m| last.saturating_sub(m.index) <= UNDER_REPLICATED_LAG);
                    (id, caught_up)
                })
                .collect();
            led.push(voters);
        }
        counts.led = led.len() as u64;
        let reachable = if led.iter().any(|voters| !voters.is_empty()) {
            self.reachable(REACHABLE_TIMEOUT).await
        } else {
            std::collections::BTreeSet::new()
        };
        counts.under_replicated = led
            .iter()
            .filter(|voters| {
                voters
                    .iter()
                    .any(|(id, caught_up)| !caught_up || !reachable.contains(id))
            })
            .count() as u64;
        counts
    }

    /// Hands the leadership of a partition to `to`, one of its replicas; returns once
    /// `to` leads it.
    pub async fn transfer_leadership(
        self: &Arc<Self>,
        kind: Kind,
        name: &str,
        partition: u32,
        to: NodeId,
    ) -> Result<(), ClusterError> {
        let placed = self.partition(kind, name, partition)?;
        if !placed.replicas.contains(&to) {
            return Err(MetaError::InvalidArgument(format!(
                "node {to} holds no replica of {kind} {name:?} partition {partition}; its replicas are on nodes {:?}",
                placed.replicas
            ))
            .into());
        }
        self.lead_to(placed.group, to, &placed.replicas, false)
            .await
    }

    /// Hands `group` to `to` if this node leads it, else asks its leader to (a forwarded
    /// request must find the leader here).
    async fn lead_to(
        self: &Arc<Self>,
        group: u64,
        to: NodeId,
        replicas: &[NodeId],
        forwarded: bool,
    ) -> Result<(), ClusterError> {
        let deadline = Instant::now() + HANDOVER_TIMEOUT;
        loop {
            let leader = self.leader(group);
            if leader == Some(self.id) {
                return self.hand_over(group, to).await;
            }
            if !forwarded {
                // The leader as this node knows it, else a replica that may know.
                let ask = leader.or_else(|| replicas.first().copied());
                if let Some(addr) = ask.and_then(|id| self.address(id)) {
                    let forward = leader.is_some();
                    match self
                        .peers
                        .handover(&addr, group, to, HandoverStep::Lead, forward, LEAD_TIMEOUT)
                        .await
                    {
                        Ok(()) => return Ok(()),
                        // Leadership moved meanwhile: look again.
                        Err(s) if s.code() == tonic::Code::FailedPrecondition => {}
                        Err(s) => return Err(handover_failed(group, &s)),
                    }
                }
            } else if leader.is_some() {
                return Err(ClusterError::Raft {
                    group,
                    message: format!("node {} no longer leads it", self.id),
                });
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::NoLeader {
                    group,
                    timeout: HANDOVER_TIMEOUT,
                    last: "no leader to hand over from".into(),
                });
            }
            tokio::time::sleep(POLL * 5).await;
        }
    }

    /// How many entries each replica of a partition is behind its leader, and the
    /// leader's end offset (asked of the leader if that is another node); `None` if no
    /// leader is known.
    pub async fn progress(
        &self,
        kind: Kind,
        name: &str,
        partition: u32,
    ) -> Result<Option<Progress>, ClusterError> {
        let group = self.partition(kind, name, partition)?.group;
        Ok(self.group_progress(group).await)
    }

    /// How many entries each member of the metadata group is behind its leader; `None`
    /// if no leader is known.
    pub async fn metadata_lag(&self) -> Option<HashMap<NodeId, u64>> {
        self.group_progress(crate::meta::METADATA_GROUP)
            .await
            .map(|p| p.lag)
    }

    /// The nodes of the metadata that answer a ping within `timeout` (this one does).
    pub async fn reachable(&self, timeout: Duration) -> std::collections::BTreeSet<NodeId> {
        let nodes: Vec<(NodeId, String)> = self
            .view
            .borrow()
            .nodes
            .iter()
            .filter(|(id, _)| **id != self.id)
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect();
        let mut pings = tokio::task::JoinSet::new();
        for (id, addr) in nodes {
            let peers = self.peers.clone();
            pings.spawn(async move { (id, peers.ping(&addr, timeout).await) });
        }
        let mut up = std::collections::BTreeSet::from([self.id]);
        while let Some(Ok((id, answered))) = pings.join_next().await {
            if answered {
                up.insert(id);
            }
        }
        up
    }

    /// The progress of `group`'s replicas, asked of the leader if that is another node.
    async fn group_progress(&self, group: u64) -> Option<Progress> {
        if let Some(progress) = self.local_progress(group) {
            return Some(progress);
        }
        let addr = self.leader(group).and_then(|id| self.address(id))?;
        // An error: it stopped leading meanwhile, or is down; not known now.
        self.peers.lag(&addr, group).await.ok()
    }

    /// The progress of `group`'s replicas if this node leads it.
    fn local_progress(&self, group: u64) -> Option<Progress> {
        let lag = self.local_lag(group)?;
        let end_offset = self.high_watermark(group).map_or(0, |hw| *hw.borrow());
        Some(Progress { lag, end_offset })
    }

    /// Lag of the replicas of `group` if this node leads it.
    fn local_lag(&self, group: u64) -> Option<HashMap<NodeId, u64>> {
        let raft = self.group(group)?;
        let metrics = raft.metrics();
        let metrics = metrics.borrow();
        if metrics.current_leader != Some(self.id) {
            return None;
        }
        let last = metrics.last_log_index.unwrap_or(0);
        Some(
            metrics
                .replication
                .iter()
                .flatten()
                .filter_map(|(id, matched)| {
                    let behind = match matched {
                        Some(m) => last.saturating_sub(m.index),
                        None if *id == self.id => 0,
                        None => return None,
                    };
                    Some((*id, behind))
                })
                .collect(),
        )
    }

    /// The batches `group`'s leader keeps below offset `upto`, for this node's replica
    /// that caught up from a snapshot; none if the leader cannot be asked, or they come
    /// to more than [`BACKFILL_AT_MOST`] (the replica then lacks them, as it would
    /// without a backfill).
    pub(super) async fn backfill(&self, group: u64, upto: u64) -> Vec<RecordBatch> {
        let leader = self.leader(group).filter(|l| *l != self.id);
        let Some(addr) = leader.and_then(|id| self.address(id)) else {
            tracing::warn!(group, "no leader to backfill from");
            return Vec::new();
        };
        let (mut batches, mut bytes, mut offset) = (Vec::new(), 0, 0);
        while offset < upto {
            let page = match self.peers.read_log(&addr, group, offset, upto).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(group, error = %e, "backfilling from the leader");
                    return Vec::new();
                }
            };
            if page.is_empty() {
                break;
            }
            let before = offset;
            for raw in page {
                bytes += raw.len();
                match RecordBatch::from_bytes(raw) {
                    Ok(b) => {
                        offset = b.next_offset();
                        batches.push(b);
                    }
                    Err(e) => {
                        tracing::warn!(group, error = %e, "a backfilled batch does not decode");
                        return Vec::new();
                    }
                }
            }
            if bytes > BACKFILL_AT_MOST || offset <= before {
                tracing::warn!(group, bytes, "backfill too large or not advancing; skipped");
                return Vec::new();
            }
        }
        batches
    }

    /// The address of node `id` as the metadata knows it.
    fn address(&self, id: NodeId) -> Option<String> {
        self.view.borrow().nodes.get(&id).map(|n| n.addr.clone())
    }

    /// On the leader of `group`: hands it to the voter `to`. On a task of its own, so that
    /// a caller that goes away cannot leave heartbeats off or proposals held.
    pub(super) async fn hand_over(
        self: &Arc<Self>,
        group: u64,
        to: NodeId,
    ) -> Result<(), ClusterError> {
        let node = self.clone();
        tokio::spawn(async move { node.hand_over_here(group, to).await })
            .await
            .map_err(|e| ClusterError::Raft {
                group,
                message: format!("the handover stopped: {e}"),
            })?
    }

    async fn hand_over_here(&self, group: u64, to: NodeId) -> Result<(), ClusterError> {
        let raft = self.group(group).ok_or(ClusterError::NoGroup(group))?;
        let (voters, _) = members(&raft);
        if to == self.id {
            return Ok(());
        }
        if !voters.contains(&to) {
            return Err(MetaError::InvalidArgument(format!(
                "node {to} is not a voter of raft group {group} (its voters are {voters:?})"
            ))
            .into());
        }
        let deadline = Instant::now() + HANDOVER_TIMEOUT;
        let Some(_held) = self.holds.hold(group) else {
            return Err(ClusterError::Raft {
                group,
                message: "a handover of its leadership is under way".into(),
            });
        };
        caught_up(&raft, to, deadline)
            .await
            .map_err(|last| ClusterError::Raft {
                group,
                message: format!("node {to} did not catch up to hand over to it: {last}"),
            })?;
        let addrs: Vec<(NodeId, String)> = voters
            .iter()
            .filter(|id| **id != self.id)
            .filter_map(|id| Some((*id, self.address(*id)?)))
            .collect();
        raft.runtime_config().heartbeat(false);
        for (_, addr) in addrs.iter().filter(|(id, _)| *id != to) {
            // A voter that cannot be told cannot campaign either: it is down.
            let _ = self
                .peers
                .handover(addr, group, to, HandoverStep::Hold, false, STEP_TIMEOUT)
                .await;
        }
        let elected = match addrs.iter().find(|(id, _)| *id == to) {
            Some((_, addr)) => self
                .peers
                .handover(addr, group, to, HandoverStep::Elect, false, LEAD_TIMEOUT)
                .await
                .map_err(|s| handover_failed(group, &s)),
            None => Err(ClusterError::Raft {
                group,
                message: format!("node {to} has no known address"),
            }),
        };
        raft.runtime_config().heartbeat(true);
        for (_, addr) in addrs.iter().filter(|(id, _)| *id != to) {
            let _ = self
                .peers
                .handover(addr, group, to, HandoverStep::Resume, false, STEP_TIMEOUT)
                .await;
        }
        elected?;
        // This node learns of its successor from its first append.
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = raft
            .wait(Some(left))
            .metrics(|m| m.current_leader == Some(to), "the new leader")
            .await;
        tracing::info!(group, to, "leadership handed over");
        Ok(())
    }
}

/// Hands a partition back to its preferred leader (the first of its replicas, the one
/// placement spread leaderships with) where this node has led it for
/// [`PREFERRED_AFTER`] instead and the preferred one is caught up: after a failover,
/// leadership spreads again once the failed node is back. One handover at a time per node.
pub(super) fn prefer(node: &Arc<ClusterNode>, raft: &Raft<PartitionRaft>, partition: &Partition) {
    let group = partition.group;
    let leading = raft.metrics().borrow().current_leader == Some(node.id);
    let mut since = node
        .led_since
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !leading {
        since.remove(&group);
        return;
    }
    let led_since = *since.entry(group).or_insert_with(Instant::now);
    drop(since);
    let Some(&preferred) = partition.replicas.first() else {
        return;
    };
    if preferred == node.id
        || partition.moving
        || led_since.elapsed() < PREFERRED_AFTER
        || node
            .local_lag(group)
            .and_then(|l| l.get(&preferred).copied())
            != Some(0)
        || node.handing_over.swap(true, Ordering::AcqRel)
    {
        return;
    }
    let node = node.clone();
    tokio::spawn(async move {
        match node.hand_over(group, preferred).await {
            Ok(()) => tracing::info!(
                group,
                to = preferred,
                "leadership back to the preferred replica"
            ),
            Err(e) => tracing::info!(group, error = %e, "leadership not handed back; will retry"),
        }
        node.led_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&group);
        node.handing_over.store(false, Ordering::Release);
    });
}

/// Waits until `to` holds everything the leader's log holds.
async fn caught_up(
    raft: &Raft<PartitionRaft>,
    to: NodeId,
    deadline: Instant,
) -> Result<(), String> {
    loop {
        let (last, matched) = {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            let matched = metrics
                .replication
                .as_ref()
                .and_then(|r| r.get(&to).copied().flatten())
                .map(|m| m.index);
            (metrics.last_log_index, matched)
        };
        if last.is_none() || matched >= last {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("it has {matched:?} of {last:?}"));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Campaigns for `group` on this node until elected, or fails at the deadline.
async fn campaign(raft: &Raft<PartitionRaft>, id: NodeId) -> Result<(), Status> {
    let deadline = Instant::now() + HANDOVER_TIMEOUT;
    loop {
        raft.trigger()
            .elect()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let elected = raft
            .wait(Some(CAMPAIGN_EVERY))
            .metrics(|m| m.current_leader == Some(id), "elected")
            .await
            .is_ok();
        if elected {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Status::unavailable(format!(
                "node {id} was not elected within {HANDOVER_TIMEOUT:?}"
            )));
        }
    }
}

fn handover_failed(group: u64, status: &Status) -> ClusterError {
    ClusterError::NoLeader {
        group,
        timeout: HANDOVER_TIMEOUT,
        last: format!("handing over leadership: {}", status.message()),
    }
}

/// The `Leadership` service: the steps of a handover, as its nodes take them.
#[derive(Clone)]
pub(super) struct LeadershipService {
    node: Started,
}

impl LeadershipService {
    pub fn server(node: Started) -> LeadershipServer<Self> {
        LeadershipServer::new(Self { node })
    }
}

#[tonic::async_trait]
impl Leadership for LeadershipService {
    async fn handover(
        &self,
        request: Request<HandoverRequest>,
    ) -> Result<Response<HandoverReply>, Status> {
        let request = request.into_inner();
        let node: Arc<ClusterNode> = self.node.get()?;
        let (group, to) = (request.group, request.to);
        let raft = || {
            node.group(group)
                .ok_or_else(|| Status::not_found(format!("no raft group {group} on this node")))
        };
        match HandoverStep::try_from(request.step) {
            Ok(HandoverStep::Lead) => {
                if request.forwarded && node.leader(group) != Some(node.id) {
                    return Err(Status::failed_precondition(format!(
                        "node {} does not lead raft group {group}",
                        node.id
                    )));
                }
                node.lead_to(group, to, &[], request.forwarded)
                    .await
                    .map_err(Status::from)?;
            }
            Ok(HandoverStep::Hold) => {
                let raft = raft()?;
                raft.runtime_config().elect(false);
                // Elections resume even if the leader never says so (it may have died).
                tokio::spawn(async move {
                    tokio::time::sleep(HANDOVER_TIMEOUT).await;
                    raft.runtime_config().elect(true);
                });
            }
            Ok(HandoverStep::Resume) => raft()?.runtime_config().elect(true),
            Ok(HandoverStep::Elect) => campaign(&raft()?, node.id).await?,
            Ok(HandoverStep::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown handover step {}",
                    request.step
                )));
            }
        }
        Ok(Response::new(HandoverReply {}))
    }

    async fn read_log(
        &self,
        request: Request<ReadLogRequest>,
    ) -> Result<Response<ReadLogReply>, Status> {
        let request = request.into_inner();
        let node = self.node.get()?;
        let reader = node
            .replicas
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&request.group)
            .map(|r| r.reader.clone())
            .ok_or_else(|| {
                Status::not_found(format!("no replica of raft group {} here", request.group))
            })?;
        let max_bytes = usize::try_from(request.max_bytes.max(1)).unwrap_or(usize::MAX);
        let batches = reader
            .read_raw(request.offset, request.upto, max_bytes)
            .map_err(|e| Status::internal(e.to_string()))?
            .into_iter()
            .map(|b| b.as_bytes().clone())
            .collect();
        Ok(Response::new(ReadLogReply { batches }))
    }

    async fn lag(&self, request: Request<LagRequest>) -> Result<Response<LagReply>, Status> {
        let group = request.into_inner().group;
        let node = self.node.get()?;
        let progress = node.local_progress(group).ok_or_else(|| {
            Status::failed_precondition(format!(
                "node {} does not lead raft group {group}",
                node.id
            ))
        })?;
        Ok(Response::new(LagReply {
            entries_behind: progress.lag,
            end_offset: progress.end_offset,
        }))
    }
}
