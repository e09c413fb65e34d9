//! The Broker controller's decisions, as pure functions of what it observed: how far to
//! scale the StatefulSet now (draining nodes through the admin API before any pod goes),
//! and which pod to roll next.

use std::collections::BTreeSet;

/// A cluster member as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// Its node id: its pod's ordinal.
    pub id: u64,
    /// Being decommissioned.
    pub draining: bool,
    /// Partitions still placed on it.
    pub remaining: u32,
}

/// What to do about the Broker's size now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scale {
    /// The StatefulSet's replicas.
    pub replicas: i32,
    /// Nodes to start decommissioning.
    pub decommission: Vec<u64>,
    /// Draining nodes that stay after all (the Broker grew again): cancel their drain.
    pub cancel: Vec<u64>,
    /// Drained nodes whose pods are gone: forget them.
    pub remove: Vec<u64>,
    /// What a drain still waits for, for the `Progressing` condition.
    pub waiting: Option<String>,
}

/// How to go from `current` pods towards `target`: growth at once; shrinking only once
/// every node leaving (the highest ordinals) is drained; a drained node is forgotten
/// once its pod is gone. `pods` are the ordinals that
/// have a pod now.
pub fn scale(target: i32, current: i32, nodes: &[NodeView], pods: &BTreeSet<u64>) -> Scale {
    let keeps = |id: u64| i64::try_from(id).is_ok_and(|id| id < i64::from(target));
    let cancel = nodes
        .iter()
        .filter(|n| n.draining && keeps(n.id))
        .map(|n| n.id)
        .collect();
    let leaving: Vec<&NodeView> = nodes.iter().filter(|n| !keeps(n.id)).collect();
    // Members beyond the target are drained whatever the StatefulSet holds (a pod
    // removed by hand left its node a member).
    let mut plan = Scale {
        replicas: target,
        cancel,
        decommission: leaving
            .iter()
            .filter(|n| !n.draining)
            .map(|n| n.id)
            .collect(),
        ..Scale::default()
    };
    if target < current {
        let remaining: u32 = leaving.iter().map(|n| n.remaining).sum();
        let drained = leaving.iter().all(|n| n.draining && n.remaining == 0);
        if !drained {
            plan.replicas = current;
            let ids: Vec<String> = leaving.iter().map(|n| n.id.to_string()).collect();
            let mut waiting = format!(
                "draining node {} before scaling down to {target}",
                ids.join(", ")
            );
            // A node only just asked to drain has not counted its replicas yet.
            if plan.decommission.is_empty() {
                waiting.push_str(&format!(": {remaining} partition replicas still to move"));
            }
            plan.waiting = Some(waiting);
        }
    }
    // Forgotten only once the StatefulSet no longer has it, and its pod is gone.
    let beyond = |id: u64| i64::try_from(id).is_ok_and(|id| id >= i64::from(current));
    if plan.replicas == target {
        plan.remove = leaving
            .iter()
            .filter(|n| n.draining && n.remaining == 0 && beyond(n.id) && !pods.contains(&n.id))
            .map(|n| n.id)
            .collect();
    }
    plan
}

/// A broker pod as the StatefulSet shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    /// Its ordinal.
    pub ordinal: u64,
    /// Its controller revision.
    pub revision: String,
    /// Ready, by its readiness probe, and not stopping.
    pub ready: bool,
}

/// The pod to roll next onto `revision`: the highest ordinal still on another one, and
/// only while all `replicas` pods are there and ready and the cluster healthy (so one
/// goes at a time: one stopping, or not back yet, holds the next).
pub fn next_to_roll(revision: &str, pods: &[PodView], replicas: i32, healthy: bool) -> Option<u64> {
    let all_there = usize::try_from(replicas).is_ok_and(|n| pods.len() == n);
    if !healthy || !all_there || pods.iter().any(|p| !p.ready) {
        return None;
    }
    pods.iter()
        .filter(|p| p.revision != revision)
        .map(|p| p.ordinal)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, draining: bool, remaining: u32) -> NodeView {
        NodeView {
            id,
            draining,
            remaining,
        }
    }

    fn pods(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    #[test]
    fn growing_is_at_once() {
        let nodes = [node(0, false, 3), node(1, false, 3), node(2, false, 3)];
        let plan = scale(5, 3, &nodes, &pods(&[0, 1, 2]));
        assert_eq!(plan.replicas, 5);
        assert!(plan.decommission.is_empty() && plan.waiting.is_none());
    }

    #[test]
    fn shrinking_drains_the_highest_ordinals_first_and_then_forgets_them() {
        let five = [
            node(0, false, 3),
            node(1, false, 3),
            node(2, false, 3),
            node(3, false, 2),
            node(4, false, 2),
        ];
        let all = pods(&[0, 1, 2, 3, 4]);
        let first = scale(3, 5, &five, &all);
        assert_eq!(first.replicas, 5, "no pod goes before it is drained");
        assert_eq!(first.decommission, vec![3, 4]);
        assert!(first.waiting.unwrap().contains("draining node 3, 4"));

        let draining = [
            five[0].clone(),
            five[1].clone(),
            five[2].clone(),
            node(3, true, 0),
            node(4, true, 1),
        ];
        let meanwhile = scale(3, 5, &draining, &all);
        assert_eq!(meanwhile.replicas, 5);
        assert!(meanwhile.decommission.is_empty(), "asked once");
        assert!(
            meanwhile
                .waiting
                .unwrap()
                .contains("1 partition replicas still to move")
        );

        let drained = [
            five[0].clone(),
            five[1].clone(),
            five[2].clone(),
            node(3, true, 0),
            node(4, true, 0),
        ];
        let shrink = scale(3, 5, &drained, &all);
        assert_eq!(shrink.replicas, 3);
        assert!(shrink.remove.is_empty(), "their pods still run");
        let unlisted = scale(3, 5, &drained, &pods(&[0, 1, 2]));
        assert!(unlisted.remove.is_empty(), "the StatefulSet still has them");
        let gone = scale(3, 3, &drained, &pods(&[0, 1, 2]));
        assert_eq!(gone.remove, vec![3, 4]);
    }

    #[test]
    fn growing_again_mid_drain_cancels_the_drain() {
        let nodes = [node(0, false, 3), node(1, false, 3), node(2, true, 1)];
        let plan = scale(3, 3, &nodes, &pods(&[0, 1, 2]));
        assert_eq!(plan.cancel, vec![2]);
        assert_eq!(plan.replicas, 3);
        assert!(plan.remove.is_empty());
    }

    #[test]
    fn pods_roll_highest_first_one_at_a_time_and_only_when_all_are_ready() {
        let pod = |ordinal, revision: &str, ready| PodView {
            ordinal,
            revision: revision.into(),
            ready,
        };
        let pods = [
            pod(0, "old", true),
            pod(1, "old", true),
            pod(2, "new", true),
        ];
        assert_eq!(next_to_roll("new", &pods, 3, true), Some(1));
        assert_eq!(
            next_to_roll("new", &pods, 3, false),
            None,
            "cluster unhealthy"
        );
        let restarting = [
            pod(0, "old", true),
            pod(1, "new", false),
            pod(2, "new", true),
        ];
        assert_eq!(next_to_roll("new", &restarting, 3, true), None);
        let gone = [pod(0, "old", true), pod(2, "new", true)];
        assert_eq!(
            next_to_roll("new", &gone, 3, true),
            None,
            "pod 1 not back yet"
        );
        let done = [pod(0, "new", true), pod(1, "new", true)];
        assert_eq!(next_to_roll("new", &done, 2, true), None);
    }
}
