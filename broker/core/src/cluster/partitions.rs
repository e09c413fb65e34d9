//! Keeps this node's partition groups in step with the metadata: starts the groups of
//! partitions placed here; where it leads a group whose placement changed, moves the
//! group's membership to the new replicas (new ones join as learners and catch up
//! first); and stops and deletes a replica once its group no longer counts it (or the
//! destination is gone), so that a partition never loses a copy before the new one
//! holds it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, Raft};
use petrel_log::{PartitionConfig, SyncPolicy};

use super::{ClusterError, ClusterNode, Replica, raft_dir, raft_error};
use crate::meta::{Command, Destination, Durability, METADATA_GROUP, Metadata, Partition};
use crate::raft;

/// How often the groups are compared with the metadata even when it did not change
/// (leadership and membership change on their own).
pub(super) const RECONCILE_EVERY: Duration = Duration::from_millis(500);

/// Follows the metadata until the node stops.
pub(super) async fn reconcile(node: Arc<ClusterNode>) {
    let mut view = node.view.clone();
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    loop {
        let metadata = view.borrow_and_update().clone();
        apply(&node, &metadata).await;
        tokio::select! {
            changed = view.changed() => if changed.is_err() {
                return;
            },
            _ = tick.tick() => {}
        }
    }
}

/// The voters and learners of a group as its replica here knows them.
pub(super) fn members(raft: &Raft<raft::PartitionRaft>) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let metrics = raft.metrics();
    let metrics = metrics.borrow();
    let membership = metrics.membership_config.membership();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let all: BTreeSet<u64> = membership.nodes().map(|(id, _)| *id).collect();
    (voters, all)
}

/// Starts and stops groups to match `metadata`; one group's failure does not hold up
/// the others (it is tried again at the next change).
async fn apply(node: &Arc<ClusterNode>, metadata: &Metadata) {
    let here: BTreeMap<u64, (&Destination, &Partition)> = metadata
        .destinations
        .values()
        .flat_map(|d| d.values())
        .flat_map(|d| d.partitions.iter().map(move |p| (p.group, (d, p))))
        .filter(|(_, (_, p))| p.replicas.contains(&node.id))
        .collect();
    drop_failed(node).await;
    for (group, (destination, partition)) in &here {
        if node.group(*group).is_none()
            && let Err(e) = start(node, metadata, destination, partition).await
        {
            tracing::warn!(group, error = %e, "starting a partition group");
        }
    }
    // Every group held here, placed here or moving away: its leader moves it.
    for partition in metadata.partitions() {
        if let Some(raft) = node.group(partition.group) {
            move_membership(node, metadata, &raft, partition);
            super::leadership::prefer(node, &raft, partition);
        }
    }
    let leaving = |metadata: &Metadata| -> Vec<u64> {
        let (placed, moving) = placed_here_or_moving(metadata, node.id);
        node.groups
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .copied()
            // Moved elsewhere: keep serving until the group's leader settled the move (a
            // removed replica is never told it was removed).
            .filter(|g| *g != METADATA_GROUP && !placed.contains(g) && !moving.contains(g))
            .collect()
    };
    if leaving(metadata).is_empty() {
        return;
    }
    // The placement may have come back here since this copy of the metadata: once the
    // group's leader re-added this node, deleting its replica would lose entries the
    // leader counts on. So read the metadata as of now first, then detach at once.
    if let Err(e) = node.command(&Command::Barrier).await {
        tracing::warn!(error = %e, "reading the metadata before stopping groups; will retry");
        return;
    }
    let now = node.view.borrow().clone();
    for group in leaving(&now) {
        let raft = node
            .groups
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&group);
        if let Err(e) = stop(node, group, raft).await {
            tracing::warn!(group, error = %e, "stopping a partition group");
        }
    }
}

/// Takes out the partition groups whose Raft core stopped on a fault (storage failed,
/// or a bug in it panicked), so that they start again from their data instead of
/// refusing every proposal until the node restarts.
async fn drop_failed(node: &ClusterNode) {
    let failed: Vec<(u64, Raft<raft::PartitionRaft>)> = node
        .groups
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter(|(g, raft)| **g != METADATA_GROUP && raft.metrics().borrow().running_state.is_err())
        .map(|(g, raft)| (*g, raft.clone()))
        .collect();
    for (group, raft) in failed {
        let fault = raft.metrics().borrow().running_state.clone();
        tracing::error!(
            group,
            ?fault,
            "a partition group failed; starting it again from its data"
        );
        node.groups
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&group);
        node.replicas
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&group);
        let _ = raft.shutdown().await;
    }
}

/// The groups placed on `id`, and the groups still moving anywhere.
fn placed_here_or_moving(metadata: &Metadata, id: u64) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let mut placed = BTreeSet::new();
    let mut moving = BTreeSet::new();
    for p in metadata.partitions() {
        if p.replicas.contains(&id) {
            placed.insert(p.group);
        }
        if p.moving {
            moving.insert(p.group);
        }
    }
    (placed, moving)
}

/// Where this node leads a group whose members differ from its placement, moves them
/// there (one move at a time per group): new replicas join as learners and catch up,
/// then the voters become the placement, and the move is reported settled. A leader
/// that leaves hands the group to a voter that stays once the learners caught up, and
/// that one finishes the move: no election, and no proposal refused meanwhile.
fn move_membership(
    node: &Arc<ClusterNode>,
    metadata: &Metadata,
    raft: &Raft<raft::PartitionRaft>,
    partition: &Partition,
) {
    let group = partition.group;
    let wanted: BTreeSet<u64> = partition.replicas.iter().copied().collect();
    let (voters, all) = members(raft);
    // A leader that already removed itself only waits to step down.
    if raft.metrics().borrow().current_leader != Some(node.id) || !voters.contains(&node.id) {
        return;
    }
    if voters == wanted && !partition.moving {
        return;
    }
    let mut moving = node
        .moving
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !moving.insert(group) {
        return;
    }
    drop(moving);
    let joining: Vec<(u64, String)> = wanted
        .difference(&all)
        .filter_map(|id| Some((*id, metadata.nodes.get(id)?.addr.clone())))
        .collect();
    // The placement's first voter that stays, preferred leader first.
    let successor = partition
        .replicas
        .iter()
        .copied()
        .find(|id| *id != node.id && voters.contains(id));
    let (raft, node) = (raft.clone(), node.clone());
    tokio::spawn(async move {
        let result = async {
            if voters != wanted {
                for (id, addr) in joining {
                    raft.add_learner(id, BasicNode::new(&addr), true)
                        .await
                        .map_err(|e| raft_error(group, e))?;
                }
                if !wanted.contains(&node.id)
                    && let Some(to) = successor
                {
                    node.hand_over(group, to).await?;
                    return Ok(false);
                }
                raft.change_membership(wanted.clone(), false)
                    .await
                    .map_err(|e| raft_error(group, e))?;
            }
            let replicas = Some(wanted.into_iter().collect());
            node.command(&Command::Settled { group, replicas }).await?;
            Ok::<_, ClusterError>(true)
        }
        .await;
        match result {
            Ok(true) => tracing::info!(group, "partition group moved to its new replicas"),
            Ok(false) => {
                tracing::info!(group, "partition group handed to a staying replica to move")
            }
            Err(e) => tracing::warn!(group, error = %e, "moving a partition group; will retry"),
        }
        node.moving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&group);
    });
}

fn partition_config(defaults: &PartitionConfig, destination: &Destination) -> PartitionConfig {
    PartitionConfig {
        sync_policy: match destination.spec.durability {
            Durability::Always => SyncPolicy::Always,
            Durability::Interval => SyncPolicy::Interval,
            Durability::Never => SyncPolicy::Never,
        },
        ..defaults.clone()
    }
}

/// Starts the local replica of `partition`; its preferred leader initialises a new group.
async fn start(
    node: &Arc<ClusterNode>,
    metadata: &Metadata,
    destination: &Destination,
    partition: &Partition,
) -> Result<(), ClusterError> {
    let group = partition.group;
    let config = partition_config(&node.partition_defaults, destination);
    let fresh = !node.storage.partitions().contains(&group);
    let log = if fresh {
        node.storage.create_partition(group, config)?
    } else {
        node.storage.open_partition(group, config)?
    };
    let (app, app_rx) = tokio::sync::watch::channel(raft::PartitionApp::default());
    let (store, machine) = raft::open_group(log, &raft_dir(&node.root, group), Some(app))?;
    // A replica that catches up from a snapshot fetches what its leader keeps below it.
    let weak = Arc::downgrade(node);
    let backfill: raft::Backfill = Arc::new(move |upto| {
        let weak = weak.clone();
        Box::pin(async move {
            match weak.upgrade() {
                Some(node) => node.backfill(group, upto).await,
                None => Vec::new(),
            }
        })
    });
    let mut store = store.with_backfill(backfill);
    let replica = Replica {
        reader: openraft::storage::RaftLogStorage::get_log_reader(&mut store).await,
        high_watermark: machine.high_watermark(),
        app: app_rx,
    };
    let raft = Raft::new(
        node.id,
        node.partition_raft.clone(),
        node.peers.group(group),
        store,
        machine,
    )
    .await
    .map_err(|e| raft_error(group, e))?;
    node.groups
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(group, raft.clone());
    node.replicas
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(group, replica);
    if fresh && partition.initial.first() == Some(&node.id) {
        let members: BTreeMap<_, _> = partition
            .initial
            .iter()
            .filter_map(|id| {
                let n = metadata.nodes.get(id)?;
                Some((*id, BasicNode::new(&n.addr)))
            })
            .collect();
        match raft.initialize(members).await {
            Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
            Err(e) => return Err(raft_error(group, e)),
        }
    }
    tracing::info!(group, replicas = ?partition.replicas, "partition group started");
    Ok(())
}

/// Stops the local replica of `group`, already taken out of the node's groups, and
/// deletes its data.
async fn stop(
    node: &ClusterNode,
    group: u64,
    raft: Option<Raft<raft::PartitionRaft>>,
) -> Result<(), ClusterError> {
    node.replicas
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(&group);
    if let Some(raft) = raft {
        raft.shutdown().await.map_err(|e| raft_error(group, e))?;
    }
    // The log went back to the storage when the group's store was dropped.
    if node.storage.partitions().contains(&group) {
        node.storage
            .open_partition(group, PartitionConfig::default())?
            .delete()?;
    }
    let dir = raft_dir(&node.root, group);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "removing a stopped group's raft state")
        }
    }
    tracing::info!(group, "partition group stopped and deleted");
    Ok(())
}
