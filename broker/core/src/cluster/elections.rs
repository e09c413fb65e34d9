//! Breaks split votes. openraft 0.9 checks election timeouts on a tick (every 1.5
//! heartbeat intervals) that starts with the group; the replicas of a partition start
//! together (they apply its creation at the same moment), so their ticks are in phase,
//! and two of them whose timeouts round to the same tick campaign at the same instant,
//! split the vote, and do it again every round: the partition never gets a leader.
//!
//! So a node that finds one of its groups still campaigning in the same term on two
//! looks in a row campaigns again at a random moment, off the tick: the other
//! candidates grant its higher term. At most once every [`KICK_AT_MOST_EVERY`] per
//! group: a candidate whose log is behind (a follower back from a pause) can never win,
//! and openraft makes it wait longer after it learned of a longer log; campaigning it
//! again and again would raise the term over and over and keep the up-to-date nodes
//! from electing one of them.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;

use super::ClusterNode;

/// How often the groups are looked at; an election takes a round trip, far less.
const LOOK_EVERY: Duration = Duration::from_millis(200);
/// The least time between two extra campaigns of one group: above openraft's wait after
/// a longer log was seen (twice the longest election timeout, 2 s), so a stale candidate
/// campaigns not much more often than it would anyway, and short enough that a kick
/// spent while the leader lease still held (right after a leader died) leaves time for
/// one more within the 5 s a failover may take.
const KICK_AT_MOST_EVERY: Duration = Duration::from_millis(2500);

/// Watches this node's groups until the node stops.
pub(super) async fn break_ties(node: Arc<ClusterNode>) {
    let mut tick = tokio::time::interval(LOOK_EVERY);
    // Groups campaigning at the last look, with their term.
    let mut campaigning: HashMap<u64, u64> = HashMap::new();
    // When each group was last made to campaign again.
    let mut kicked: HashMap<u64, Instant> = HashMap::new();
    loop {
        tick.tick().await;
        let groups: Vec<_> = node
            .groups
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(g, r)| (*g, r.clone()))
            .collect();
        let mut now = HashMap::new();
        for (group, raft) in groups {
            let (state, term) = {
                let metrics = raft.metrics();
                let metrics = metrics.borrow();
                (metrics.state, metrics.current_term)
            };
            if state != ServerState::Candidate {
                continue;
            }
            now.insert(group, term);
            if campaigning.get(&group) != Some(&term)
                || kicked
                    .get(&group)
                    .is_some_and(|at| at.elapsed() < KICK_AT_MOST_EVERY)
            {
                continue;
            }
            kicked.insert(group, Instant::now());
            let delay = random_below(LOOK_EVERY, (group, node.id));
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let stuck = {
                    let metrics = raft.metrics();
                    let metrics = metrics.borrow();
                    metrics.state == ServerState::Candidate && metrics.current_term == term
                };
                if stuck {
                    tracing::info!(group, term, "split vote: campaigning again");
                    let _ = raft.trigger().elect().await;
                }
            });
        }
        campaigning = now;
        kicked.retain(|_, at| at.elapsed() < KICK_AT_MOST_EVERY);
    }
}

/// A duration below `limit`, different on every call and node.
fn random_below(limit: Duration, salt: (u64, u64)) -> Duration {
    let seed = std::time::Instant::now();
    // RandomState is seeded from the OS once per process, then varied per instance.
    let random = std::collections::hash_map::RandomState::new().hash_one((salt, seed));
    let millis = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(random % millis)
}
