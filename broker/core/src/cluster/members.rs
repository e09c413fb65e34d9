//! Keeps the metadata group's membership in step with the cluster's nodes, on the node
//! leading it: every node the metadata lists follows it (a new one as a learner first,
//! catching up), at most [`MAX_VOTERS`] active nodes vote, and a node that left is
//! dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use openraft::{BasicNode, ChangeMembers};

use super::partitions::{RECONCILE_EVERY, members};
use super::{ClusterError, ClusterNode, MAX_VOTERS, raft_error};
use crate::meta::{METADATA_GROUP, Node, NodeState};
use crate::raft::NodeId;

/// Follows the metadata until the node stops.
pub(super) async fn follow(node: Arc<ClusterNode>) {
    let mut view = node.view.clone();
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    loop {
        let nodes = view.borrow_and_update().nodes.clone();
        if let Err(e) = align(&node, &nodes).await {
            tracing::debug!(error = %e, "aligning the metadata group's members; will retry");
        }
        tokio::select! {
            changed = view.changed() => if changed.is_err() {
                return;
            },
            _ = tick.tick() => {}
        }
    }
}

/// How many entries a learner may be behind the leader and still be made a voter.
const CATCH_UP_SLACK: u64 = 16;

/// The voters the metadata group should have: the active nodes, those voting already
/// first, then learners that have caught up, up to [`MAX_VOTERS`]; the current voters
/// if no node is active. A voter the node list does not name yet keeps its vote: the
/// voters of a new cluster join the list one by one (a node leaves the list only once
/// drained, and a draining node already lost its vote).
fn voters(
    nodes: &BTreeMap<NodeId, Node>,
    current: &BTreeSet<NodeId>,
    caught_up: &BTreeSet<NodeId>,
) -> BTreeSet<NodeId> {
    let active = |id: &NodeId| nodes.get(id).is_some_and(|n| n.state == NodeState::Active);
    let wanted: BTreeSet<NodeId> = current
        .iter()
        .copied()
        .filter(|id| active(id) || !nodes.contains_key(id))
        .chain(
            caught_up
                .iter()
                .copied()
                .filter(|id| active(id) && !current.contains(id)),
        )
        .take(MAX_VOTERS)
        .collect();
    if wanted.is_empty() {
        current.clone()
    } else {
        wanted
    }
}

async fn align(node: &ClusterNode, nodes: &BTreeMap<NodeId, Node>) -> Result<(), ClusterError> {
    let raft = &node.metadata;
    if raft.metrics().borrow().current_leader != Some(node.id) || nodes.is_empty() {
        return Ok(());
    }
    let (current, all) = members(raft);
    let error = |e| raft_error(METADATA_GROUP, e);
    for (id, n) in nodes.iter().filter(|(id, _)| !all.contains(id)) {
        // Not blocking: a node registered before it runs must not hold up the others;
        // it votes once it has caught up.
        raft.add_learner(*id, BasicNode::new(&n.addr), false)
            .await
            .map_err(error)?;
        tracing::info!(node = id, "node follows the metadata");
    }
    let wanted = voters(nodes, &current, &caught_up(raft));
    if wanted != current {
        raft.change_membership(ChangeMembers::ReplaceAllVoters(wanted.clone()), true)
            .await
            .map_err(error)?;
        tracing::info!(voters = ?wanted, "metadata voters changed");
    }
    let gone: BTreeSet<NodeId> = all
        .into_iter()
        .filter(|id| !nodes.contains_key(id) && !wanted.contains(id))
        .collect();
    if !gone.is_empty() {
        raft.change_membership(ChangeMembers::RemoveNodes(gone.clone()), false)
            .await
            .map_err(error)?;
        tracing::info!(nodes = ?gone, "nodes no longer follow the metadata");
    }
    Ok(())
}

/// The members whose log is within [`CATCH_UP_SLACK`] entries of the leader's.
fn caught_up(raft: &openraft::Raft<crate::raft::PartitionRaft>) -> BTreeSet<NodeId> {
    let metrics = raft.metrics();
    let metrics = metrics.borrow();
    let last = metrics.last_log_index.unwrap_or(0);
    metrics
        .replication
        .iter()
        .flatten()
        .filter(|(_, matched)| matched.map_or(0, |m| m.index) + CATCH_UP_SLACK >= last)
        .map(|(id, _)| *id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(active: &[NodeId], draining: &[NodeId]) -> BTreeMap<NodeId, Node> {
        let node = |state| Node {
            addr: "127.0.0.1:1".into(),
            state,
        };
        active
            .iter()
            .map(|id| (*id, node(NodeState::Active)))
            .chain(draining.iter().map(|id| (*id, node(NodeState::Draining))))
            .collect()
    }

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn at_most_five_active_nodes_vote_and_voters_keep_their_vote() {
        let seven = nodes(&[1, 2, 3, 4, 5, 6, 7], &[]);
        let all = set(&[1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(
            voters(&seven, &set(&[1, 2, 3]), &all),
            set(&[1, 2, 3, 4, 5])
        );
        assert_eq!(
            voters(&seven, &set(&[3, 5, 6, 7]), &all),
            set(&[1, 3, 5, 6, 7])
        );
        // Only learners that caught up are given a vote.
        assert_eq!(
            voters(&seven, &set(&[1, 2, 3]), &set(&[1, 2, 3, 6])),
            set(&[1, 2, 3, 6])
        );
        // A draining node hands its vote to an active one.
        let draining = nodes(&[1, 2, 4], &[3]);
        assert_eq!(
            voters(&draining, &set(&[1, 2, 3]), &set(&[1, 2, 3, 4])),
            set(&[1, 2, 4])
        );
        // Nothing active: the voters stay.
        assert_eq!(voters(&nodes(&[], &[1]), &set(&[1]), &set(&[1])), set(&[1]));
        // A new cluster's voters keep their votes while they join one by one.
        assert_eq!(
            voters(&nodes(&[1], &[]), &set(&[1, 2, 3]), &set(&[1, 2, 3])),
            set(&[1, 2, 3])
        );
    }
}
