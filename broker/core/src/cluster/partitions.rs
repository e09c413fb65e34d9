//! Keeps this node's partition groups in step with the metadata: starts the groups of
//! partitions placed here, stops and deletes the ones no longer here.

use std::collections::BTreeMap;
use std::sync::Arc;

use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, Raft};
use petrel_log::{PartitionConfig, SyncPolicy};

use super::{ClusterError, ClusterNode, Replica, raft_dir, raft_error};
use crate::meta::{Destination, Durability, METADATA_GROUP, Metadata, Partition};
use crate::raft;

/// Follows the metadata until the node stops.
pub(super) async fn reconcile(node: Arc<ClusterNode>) {
    let mut view = node.view.clone();
    loop {
        let metadata = view.borrow_and_update().clone();
        apply(&node, &metadata).await;
        if view.changed().await.is_err() {
            return;
        }
    }
}

/// Starts and stops groups to match `metadata`; one group's failure does not hold up
/// the others (it is tried again at the next change).
async fn apply(node: &ClusterNode, metadata: &Metadata) {
    let here: BTreeMap<u64, (&Destination, &Partition)> = metadata
        .destinations
        .values()
        .flat_map(|d| d.values())
        .flat_map(|d| d.partitions.iter().map(move |p| (p.group, (d, p))))
        .filter(|(_, (_, p))| p.replicas.contains(&node.id))
        .collect();
    for (group, (destination, partition)) in &here {
        if node.group(*group).is_none()
            && let Err(e) = start(node, metadata, destination, partition).await
        {
            tracing::warn!(group, error = %e, "starting a partition group");
        }
    }
    let gone: Vec<u64> = node
        .groups
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .keys()
        .copied()
        .filter(|g| *g != METADATA_GROUP && !here.contains_key(g))
        .collect();
    for group in gone {
        if let Err(e) = stop(node, group).await {
            tracing::warn!(group, error = %e, "stopping a partition group");
        }
    }
}

fn partition_config(destination: &Destination) -> PartitionConfig {
    PartitionConfig {
        sync_policy: match destination.spec.durability {
            Durability::Always => SyncPolicy::Always,
            Durability::Interval => SyncPolicy::Interval,
            Durability::Never => SyncPolicy::Never,
        },
        ..PartitionConfig::default()
    }
}

/// Starts the local replica of `partition`; its preferred leader initialises a new group.
async fn start(
    node: &ClusterNode,
    metadata: &Metadata,
    destination: &Destination,
    partition: &Partition,
) -> Result<(), ClusterError> {
    let group = partition.group;
    let config = partition_config(destination);
    let fresh = !node.storage.partitions().contains(&group);
    let log = if fresh {
        node.storage.create_partition(group, config)?
    } else {
        node.storage.open_partition(group, config)?
    };
    let (mut store, machine) = raft::open(log, &raft_dir(&node.root, group))?;
    let replica = Replica {
        reader: openraft::storage::RaftLogStorage::get_log_reader(&mut store).await,
        high_watermark: machine.high_watermark(),
    };
    let raft = Raft::new(
        node.id,
        node.raft_config.clone(),
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
    if fresh && partition.replicas.first() == Some(&node.id) {
        let members: BTreeMap<_, _> = partition
            .replicas
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

/// Stops the local replica of `group` and deletes its data.
async fn stop(node: &ClusterNode, group: u64) -> Result<(), ClusterError> {
    let raft = node
        .groups
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(&group);
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
