//! Three cluster nodes in one process, each with its own storage and internal listener
//! on loopback: they form the metadata group from a static peer list, join it, start the
//! partition groups the metadata places on them, and take writes through any node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use petrel_core::cluster::{ClusterError, ClusterNode, NodeConfig};
use petrel_core::meta::{
    Command, Destination, Durability, Kind, MetaError, Outcome, Retention, Spec,
};
use petrel_core::raft::{NodeId, Proposal};
use petrel_log::{BatchBuilder, Storage, StorageConfig};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(15);

async fn cluster(dir: &std::path::Path, n: u64) -> BTreeMap<NodeId, Arc<ClusterNode>> {
    let mut listeners = BTreeMap::new();
    for id in 1..=n {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listeners.insert(id, listener);
    }
    let peers: BTreeMap<NodeId, String> = listeners
        .iter()
        .map(|(id, l)| (*id, l.local_addr().expect("addr").to_string()))
        .collect();
    let mut nodes = BTreeMap::new();
    for (id, listener) in listeners {
        let data_dir = dir.join(id.to_string());
        let storage = Storage::open(StorageConfig::new(&data_dir)).expect("storage");
        let config = NodeConfig {
            id,
            data_dir,
            peers: peers.clone(),
            raft: openraft::Config {
                heartbeat_interval: 100,
                election_timeout_min: 400,
                election_timeout_max: 800,
                ..openraft::Config::default()
            },
            partition_defaults: petrel_log::PartitionConfig {
                // Small segments, so that retention has whole ones to drop.
                segment_bytes: 4096,
                ..petrel_log::PartitionConfig::default()
            },
        };
        let node = ClusterNode::start(config, storage, listener, Default::default())
            .await
            .expect("start");
        nodes.insert(id, node);
    }
    // Every node has joined the metadata before a test uses the cluster.
    for node in nodes.values() {
        let mut view = node.metadata();
        tokio::time::timeout(WAIT, view.wait_for(|m| m.nodes.len() == nodes.len()))
            .await
            .expect("every node joined in time")
            .expect("metadata");
    }
    nodes
}

/// Waits until `check` holds, looking again every few milliseconds.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn spec(name: &str, partitions: u32, rf: u32) -> Spec {
    Spec {
        kind: Kind::Topic,
        name: name.to_owned(),
        partitions,
        replication_factor: rf,
        durability: Durability::Always,
        retention: Retention::default(),
        declared: Default::default(),
    }
}

async fn create(node: &ClusterNode, spec: Spec) -> Result<Destination, ClusterError> {
    match node.command(&Command::Create(spec)).await? {
        Outcome::Destination(d) => Ok(d),
        other => panic!("unexpected outcome {other:?}"),
    }
}

/// A one-partition topic `bounded` (replication factor 3) keeping `bytes` per partition.
fn bounded(bytes: u64) -> Spec {
    Spec {
        retention: Retention {
            ms: None,
            bytes: Some(bytes),
        },
        ..spec("bounded", 1, 3)
    }
}

/// Produces `n` records of 200 bytes to partition 0 of `topic` through `node`, one at a
/// time (an entry each); returns the offset of the first and the offset after the last.
async fn fill(node: &Arc<ClusterNode>, topic: &str, n: usize) -> (u64, u64) {
    let value = vec![b'v'; 200];
    let record = [petrel_core::cluster::NewRecord {
        timestamp: 1,
        key: None,
        value: &value,
        headers: &[],
    }];
    let mut taken = Vec::new();
    for _ in 0..n {
        taken.push(
            node.produce(Kind::Topic, topic, 0, &record)
                .await
                .expect("produce"),
        );
    }
    (taken[0].0, taken[taken.len() - 1].1)
}

fn proposal(value: &str) -> Proposal {
    let mut b = BatchBuilder::new();
    b.push(1, None, value.as_bytes(), &[]);
    Proposal(b.build(0, 0, 0).expect("build"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_form_a_cluster_place_topics_and_take_writes_through_any_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = cluster(dir.path(), 3).await;

    // Any node takes a metadata command: it goes to the metadata group's leader.
    let orders = create(&nodes[&3], spec("orders", 3, 3))
        .await
        .expect("create");
    let duplicate = create(&nodes[&2], spec("orders", 1, 1)).await;
    assert!(
        matches!(
            duplicate,
            Err(ClusterError::Meta(MetaError::AlreadyExists { .. }))
        ),
        "{duplicate:?}"
    );
    let too_wide = create(&nodes[&1], spec("wide", 1, 4)).await;
    assert!(
        matches!(&too_wide, Err(ClusterError::Meta(MetaError::InvalidArgument(m))) if m.contains("replication factor 4")),
        "{too_wide:?}"
    );
    let leaders: Vec<NodeId> = orders.partitions.iter().map(|p| p.replicas[0]).collect();
    assert_eq!(leaders.len(), 3);
    assert!(
        leaders
            .iter()
            .all(|l| leaders.iter().filter(|m| *m == l).count() == 1),
        "preferred leaders spread: {leaders:?}"
    );

    // Every node runs a replica of every partition, and each group elects a leader.
    for p in &orders.partitions {
        for node in nodes.values() {
            eventually("the partition group to start", || {
                node.group(p.group).is_some()
            })
            .await;
            let raft = node.group(p.group).expect("group");
            raft.wait(Some(WAIT))
                .metrics(|m| m.current_leader.is_some(), "a partition leader")
                .await
                .expect("leader");
        }
    }

    // A write through any node is committed and applied on every replica.
    for (i, p) in orders.partitions.iter().enumerate() {
        let via = &nodes[&(1 + (i as u64 + 1) % 3)];
        let reply = via
            .write(p.group, proposal(&format!("order-{i}")))
            .await
            .expect("write");
        // Raft's own entries (the first membership, each leader's blank) came first.
        assert!(reply.data.base_offset >= 2, "{:?}", reply.data);
        assert_eq!(reply.data.next_offset, reply.data.base_offset + 1);
        for node in nodes.values() {
            node.group(p.group)
                .expect("group")
                .wait(Some(WAIT))
                .applied_index_at_least(Some(reply.log_id.index), "applied on every replica")
                .await
                .expect("applied");
        }
    }

    // A partition on one node only is reached from the others by forwarding.
    let single = create(&nodes[&1], spec("single", 1, 1))
        .await
        .expect("create");
    let holder = single.partitions[0].replicas[0];
    let other = nodes
        .keys()
        .copied()
        .find(|id| *id != holder)
        .expect("another node");
    let group = single.partitions[0].group;
    eventually("the single replica to start", || {
        nodes[&holder].group(group).is_some()
    })
    .await;
    assert!(nodes[&other].group(group).is_none());
    // The other node learns where the partition is from its own copy of the metadata.
    let mut view = nodes[&other].metadata();
    tokio::time::timeout(
        WAIT,
        view.wait_for(|m| m.destination(Kind::Topic, "single").is_some()),
    )
    .await
    .expect("the metadata reached the other node in time")
    .expect("metadata");
    let reply = nodes[&other]
        .write(group, proposal("forwarded"))
        .await
        .expect("forwarded write");
    nodes[&holder]
        .group(group)
        .expect("group")
        .wait(Some(WAIT))
        .applied_index_at_least(Some(reply.log_id.index), "applied on the holder")
        .await
        .expect("applied");

    // Deleting the topic stops and deletes its groups everywhere.
    nodes[&2]
        .command(&Command::Delete {
            kind: Kind::Topic,
            name: "orders".into(),
        })
        .await
        .expect("delete");
    for p in &orders.partitions {
        for node in nodes.values() {
            eventually("the partition group to stop", || {
                node.group(p.group).is_none()
            })
            .await;
        }
    }
    for node in nodes.into_values() {
        node.close().await.expect("close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decommissioned_node_hands_its_replicas_over_before_it_lets_them_go() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = cluster(dir.path(), 4).await;
    let topic = create(&nodes[&1], spec("moving", 2, 3))
        .await
        .expect("create");
    for p in &topic.partitions {
        for id in &p.replicas {
            eventually("the replica to start", || {
                nodes[id].group(p.group).is_some()
            })
            .await;
        }
        let first = nodes[&p.replicas[0]].group(p.group).expect("group");
        first
            .wait(Some(WAIT))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .expect("leader");
    }
    let mut written = Vec::new();
    for (i, p) in topic.partitions.iter().enumerate() {
        let reply = nodes[&1]
            .write(p.group, proposal(&format!("kept-{i}")))
            .await
            .expect("write");
        written.push((p.group, reply.data.base_offset));
    }

    // The node holding the most replicas goes.
    let leaving = *nodes
        .keys()
        .max_by_key(|id| {
            topic
                .partitions
                .iter()
                .filter(|p| p.replicas.contains(id))
                .count()
        })
        .expect("a node");
    nodes[&2]
        .command(&Command::DecommissionNode { id: leaving })
        .await
        .expect("decommission");
    let moved = nodes[&2]
        .metadata()
        .borrow()
        .destination(Kind::Topic, "moving")
        .cloned()
        .expect("topic");
    for p in &moved.partitions {
        assert!(!p.replicas.contains(&leaving), "{p:?}");
        let wanted: std::collections::BTreeSet<NodeId> = p.replicas.iter().copied().collect();
        for id in &p.replicas {
            eventually("the new membership on every replica", || {
                nodes[id].group(p.group).is_some_and(|raft| {
                    let metrics = raft.metrics();
                    let metrics = metrics.borrow();
                    let membership = metrics.membership_config.membership();
                    membership
                        .voter_ids()
                        .collect::<std::collections::BTreeSet<_>>()
                        == wanted
                        && membership.learner_ids().next().is_none()
                })
            })
            .await;
        }
        eventually("the old replica to let go", || {
            nodes[&leaving].group(p.group).is_none()
        })
        .await;
        // Every new replica holds what was written before the move.
        let (_, offset) = written
            .iter()
            .find(|(g, _)| *g == p.group)
            .expect("written");
        for id in &p.replicas {
            eventually("the write on every replica", || {
                nodes[id]
                    .fetch(
                        Kind::Topic,
                        "moving",
                        moved
                            .partitions
                            .iter()
                            .position(|q| q.group == p.group)
                            .expect("index") as u32,
                        0,
                        1 << 20,
                    )
                    .is_ok_and(|(batches, _)| batches.iter().any(|b| b.base_offset() == *offset))
            })
            .await;
        }
    }
    nodes[&3]
        .command(&Command::RemoveNode { id: leaving })
        .await
        .expect("a drained node may leave");
    for node in nodes.into_values() {
        node.close().await.expect("close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_five_nodes_the_others_follow_the_metadata_as_learners() {
    let dir = tempfile::tempdir().expect("tempdir");
    // `cluster` returns once every node, the sixth too, has the full node list.
    let nodes = cluster(dir.path(), 6).await;
    eventually("five voters and one learner", || {
        nodes.values().any(|n| {
            let metrics = n.metadata_raft().metrics();
            let metrics = metrics.borrow();
            let membership = metrics.membership_config.membership();
            metrics.current_leader == Some(n.id())
                && membership.voter_ids().count() == 5
                && membership.learner_ids().count() == 1
        })
    })
    .await;
    // The learner serves requests like any node: forwarded to the metadata leader.
    create(&nodes[&6], spec("t", 1, 3))
        .await
        .expect("create through the learner");
    for node in nodes.values() {
        let mut view = node.metadata();
        tokio::time::timeout(
            WAIT,
            view.wait_for(|m| m.destination(Kind::Topic, "t").is_some()),
        )
        .await
        .expect("every node applies the creation")
        .expect("metadata");
    }
    for node in nodes.into_values() {
        node.close().await.expect("close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_purges_old_segments_everywhere_and_a_topic_without_it_keeps_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = cluster(dir.path(), 3).await;
    let first = &nodes[&1];
    create(first, bounded(16 << 10))
        .await
        .expect("create bounded");
    create(first, spec("kept", 1, 3))
        .await
        .expect("create kept");
    // Entries enough for Raft's own purging (a snapshot every 1000, then all but the last
    // 1000 of those it covers) to have reached records, were it on: only retention may.
    fill(first, "bounded", 2100).await;
    // The first offsets went to Raft's own entries.
    let (first_kept, written) = fill(first, "kept", 2100).await;
    let first_offset = |node: &ClusterNode, topic: &str| {
        node.fetch(Kind::Topic, topic, 0, 0, 1)
            .ok()
            .and_then(|(batches, hw)| Some((batches.first()?.base_offset(), hw)))
    };
    for node in nodes.values() {
        // Kept: the newest 16 KiB in whole 4 KiB segments, and what the last snapshot
        // (every 1000 entries) does not cover yet; far from the 2100 written.
        eventually("retention purged the bounded topic on every node", || {
            first_offset(node, "bounded")
                .is_some_and(|(start, hw)| written - start < 400 && hw == written)
        })
        .await;
        let kept = || first_offset(node, "kept");
        eventually("every record of the kept topic on every node", || {
            kept() == Some((first_kept, written))
        })
        .await;
    }
    for node in nodes.into_values() {
        node.close().await.expect("close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_placed_after_retention_purged_is_backfilled_with_what_the_leader_keeps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = cluster(dir.path(), 4).await;
    let first = &nodes[&1];
    // Retention keeps about 200 KiB: behind the last snapshot, so the purge point and the
    // snapshot a new replica gets are apart.
    let placed = create(first, bounded(200 << 10))
        .await
        .expect("create")
        .partitions[0]
        .clone();
    let (_, written) = fill(first, "bounded", 2100).await;
    let start = |node: &ClusterNode| {
        node.fetch(Kind::Topic, "bounded", 0, 0, 1)
            .ok()
            .and_then(|(batches, hw)| Some((batches.first()?.base_offset(), hw)))
    };
    let group = placed.group;
    let leader = nodes[&placed.replicas[0]].leader(group).expect("a leader");
    eventually("the leader purged by retention", || {
        start(&nodes[&leader]).is_some_and(|(s, hw)| s > 100 && hw == written)
    })
    .await;

    // A follower leaves; its replica goes to the fourth node, which catches up from a
    // snapshot and must then hold everything the leader keeps.
    let leaving = *placed
        .replicas
        .iter()
        .find(|r| **r != leader)
        .expect("a follower");
    let newcomer = *nodes
        .keys()
        .find(|n| !placed.replicas.contains(n))
        .expect("a fourth node");
    first
        .command(&Command::DecommissionNode { id: leaving })
        .await
        .expect("decommission");
    eventually("the new replica caught up", || {
        start(&nodes[&newcomer]).is_some_and(|(_, hw)| hw == written)
    })
    .await;
    // The snapshot it caught up from covers the first 2000 entries; retention keeps about
    // 200 KiB (some 750 records), so the records below the snapshot came by backfill.
    // (Exact starts differ: each replica applies retention on its own tick.)
    let (from, _) = start(&nodes[&newcomer]).expect("new replica");
    assert!(
        from + 500 < written,
        "the new replica starts at {from} of {written}: nothing below its snapshot"
    );
    // In one read (its own retention may purge meanwhile): every record from its first.
    let (batches, _) = nodes[&newcomer]
        .fetch(Kind::Topic, "bounded", 0, 0, 4 << 20)
        .expect("fetch");
    let begin = batches.first().expect("batches").base_offset();
    let records: u64 = batches.iter().map(|b| u64::from(b.record_count())).sum();
    assert_eq!(records, written - begin, "no gap on the new replica");
    for node in nodes.into_values() {
        node.close().await.expect("close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_log_lets_go_of_what_its_consumers_settled_and_keeps_the_rest() {
    use petrel_core::messaging::{Message, Messaging, QueueOptions};

    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = cluster(dir.path(), 3).await;
    let messaging = Messaging::new(nodes[&1].clone());
    let durable = QueueOptions {
        durable: true,
        ..QueueOptions::default()
    };
    messaging
        .declare_queue("/", "work", durable, 1)
        .await
        .expect("declare");
    // An entry each, enough for snapshots (every 1000 entries) to cover most of them.
    for i in 0..2100 {
        let message = Message {
            routing_key: "work".into(),
            body: format!("{i:0200}").into_bytes().into(),
            ..Message::default()
        };
        messaging
            .publish("/", &message)
            .expect("routed")
            .await
            .expect("stored");
    }
    let group = nodes[&1]
        .partition(Kind::Queue, "work", 0)
        .expect("placed")
        .group;
    let get = || async {
        messaging
            .get("/", "work", 7, false, 1)
            .await
            .expect("get")
            .expect("a message")
    };
    // Message 100 stays unacked; every other one is acked.
    let mut held = None;
    for i in 0..2100 {
        let (d, queue, _) = get().await;
        if i == 100 {
            held = Some((d.offset, queue));
        } else {
            queue.settle(vec![d.offset]);
        }
    }
    let (held, queue) = held.expect("held");
    let start = |node: &ClusterNode| {
        node.fetch(Kind::Queue, "work", 0, 0, 1)
            .ok()
            .and_then(|(batches, _)| Some(batches.first()?.base_offset()))
    };
    for node in nodes.values() {
        eventually(
            "every replica let go of the settled messages before the held one",
            || {
                node.settled(group).is_some_and(|s| s.count == 2099)
                    && start(node).is_some_and(|s| s > held.saturating_sub(200))
            },
        )
        .await;
        let s = start(node).expect("readable");
        assert!(
            s <= held,
            "the unacked message at {held} was purged (the log starts at {s})"
        );
    }
    // Given back far behind the end of the log, the held message moves to its end: it
    // comes again, counted, and the log below it is let go.
    queue.requeue(vec![held]);
    let deadline = tokio::time::Instant::now() + WAIT;
    let (again, queue, _) = loop {
        // The copy is readable once stored.
        let got = messaging.get("/", "work", 7, false, 1).await.expect("get");
        if let Some(got) = got {
            break got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the held message never came again"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(again.message.body, format!("{:0200}", 100).into_bytes());
    assert!(again.redelivered && again.offset > held);
    assert_eq!(
        again
            .message
            .properties
            .headers
            .as_ref()
            .and_then(|h| h.get("x-delivery-count")),
        Some(&petrel_core::messaging::Value::I64(1))
    );
    queue.settle(vec![again.offset]);
    for node in nodes.values() {
        eventually(
            "every replica let go of the log below the moved message",
            || {
                node.settled(group)
                    .is_some_and(|s| s.count == s.appended && s.appended == 2101)
                    && start(node).is_none_or(|s| s > held)
            },
        )
        .await;
    }
    for node in nodes.into_values() {
        node.close().await.expect("close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_published_to_a_queue_of_several_partitions_all_reach_its_consumers() {
    use petrel_core::messaging::{Message, Messaging};

    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = cluster(dir.path(), 3).await;
    create(
        &nodes[&1],
        Spec {
            kind: Kind::Queue,
            ..spec("wide", 3, 3)
        },
    )
    .await
    .expect("create");
    let messaging = Messaging::new(nodes[&1].clone());
    for i in 0..10 {
        let message = Message {
            routing_key: "wide".into(),
            body: vec![i].into(),
            ..Message::default()
        };
        messaging
            .publish("/", &message)
            .expect("routed")
            .await
            .expect("stored");
    }
    let mut got = Vec::new();
    while let Some((d, _, _)) = messaging.get("/", "wide", 1, true, 1).await.expect("get") {
        got.push(d.message.body[0]);
    }
    assert_eq!(got, (0..10).collect::<Vec<u8>>());
    for node in nodes.into_values() {
        node.close().await.expect("close");
    }
}
