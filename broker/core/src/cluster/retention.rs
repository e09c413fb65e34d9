//! Retention of topics: every replica purges its log of the sealed segments its topic's
//! retention lets go (by record time and by size, whole segments), through its Raft, which
//! purges only what a snapshot covers. Raft purges partition logs for nothing else, so a
//! topic without retention keeps everything; queues keep what is not acknowledged (their
//! cursors come with the messaging core).

use std::sync::Arc;
use std::time::Duration;

use super::ClusterNode;
use crate::meta::{Kind, Retention};

/// How often retention is looked at: the check is a walk over a few segments in memory.
const EVERY: Duration = Duration::from_secs(1);

/// Applies retention until the node stops.
pub(super) async fn enforce(node: Arc<ClusterNode>) {
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tick.tick().await;
        let now_ms = super::now_ms();
        let kept: Vec<(u64, Retention)> = {
            let view = node.view.borrow();
            view.destinations
                .get(&Kind::Topic)
                .into_iter()
                .flat_map(|topics| topics.values())
                .filter(|d| d.spec.retention.ms.is_some() || d.spec.retention.bytes.is_some())
                .flat_map(|d| d.partitions.iter().map(|p| (p.group, d.spec.retention)))
                .collect()
        };
        for (group, retention) in kept {
            let release = node
                .replicas
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&group)
                .map(|r| {
                    r.reader
                        .release_index(now_ms, retention.ms, retention.bytes)
                });
            let (Some(Ok(Some(index))), Some(raft)) = (release, node.group(group)) else {
                continue;
            };
            let purged = raft.metrics().borrow().purged.map(|p| p.index);
            if purged.is_some_and(|p| p >= index) {
                continue;
            }
            if let Err(e) = raft.trigger().purge_log(index).await {
                tracing::warn!(group, error = %e, "purging by retention");
            }
        }
    }
}
