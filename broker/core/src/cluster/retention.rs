//! What each replica lets go of its log, through its Raft (which purges only what a
//! snapshot covers); Raft purges partition logs for nothing else.
//!
//! * Topics: the sealed segments their retention lets go (by record time and by size,
//!   whole segments); a topic without retention keeps everything.
//! * Queues: the segments wholly below the settled floor that the queue's Raft state
//!   machine holds (DESIGN.md §4, compaction by release cursor): acknowledged messages
//!   leave the disk, and everything not yet settled stays. Streams are kept by retention,
//!   as topics are: their consumers read from offsets and settle nothing.

use std::sync::Arc;
use std::time::Duration;

use super::ClusterNode;
use crate::meta::{Kind, Retention};

/// How often retention is looked at: the check is a walk over a few segments in memory.
const EVERY: Duration = Duration::from_secs(1);

/// What one partition keeps.
#[derive(Debug, Clone, Copy)]
enum Keep {
    /// A topic's retention.
    Retained(Retention),
    /// A queue's unsettled messages.
    Unsettled,
}

/// Applies retention until the node stops.
pub(super) async fn enforce(node: Arc<ClusterNode>) {
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tick.tick().await;
        let now_ms = super::now_ms();
        let kept: Vec<(u64, Keep)> = {
            let view = node.view.borrow();
            let topics = view
                .destinations
                .get(&Kind::Topic)
                .into_iter()
                .flat_map(|topics| topics.values())
                .filter(|d| d.spec.retention.ms.is_some() || d.spec.retention.bytes.is_some())
                .flat_map(|d| {
                    let keep = Keep::Retained(d.spec.retention);
                    d.partitions.iter().map(move |p| (p.group, keep))
                });
            let queues = view
                .destinations
                .get(&Kind::Queue)
                .into_iter()
                .flat_map(|queues| queues.values())
                .filter(|d| {
                    !d.spec.declared.is_stream() || d.spec.retention != Retention::default()
                })
                .flat_map(|d| {
                    let keep = if d.spec.declared.is_stream() {
                        Keep::Retained(d.spec.retention)
                    } else {
                        Keep::Unsettled
                    };
                    d.partitions.iter().map(move |p| (p.group, keep))
                });
            topics.chain(queues).collect()
        };
        for (group, keep) in kept {
            let release = node.replica(group, |r| match keep {
                Keep::Retained(retention) => {
                    r.reader
                        .release_index(now_ms, (retention.ms, retention.bytes), None)
                }
                Keep::Unsettled => {
                    let floor = r.app.borrow().settled.floor;
                    r.reader.release_index(now_ms, (None, None), Some(floor))
                }
            });
            let (Some(Ok(Some(index))), Some(raft)) = (release, node.group(group)) else {
                continue;
            };
            let purged = raft.metrics().borrow().purged.map(|p| p.index);
            if purged.is_some_and(|p| p >= index) {
                continue;
            }
            if let Err(e) = raft.trigger().purge_log(index).await {
                tracing::warn!(group, error = %e, "purging what the log no longer needs");
            }
        }
    }
}
