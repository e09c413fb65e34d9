//! A partition's Raft group across three nodes in one process, each with its own storage
//! and its own gRPC server on loopback: entries replicate with the same offsets
//! everywhere, and a new leader takes over when the leader stops.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::{BasicNode, Config, Raft, RaftLogReader};
use petrel_core::meta::{self, Command, Kind, MetaError, Metadata, Outcome, Spec};
use petrel_core::raft::{Application, LogReader, NodeId, PartitionApp, PartitionRaft, Proposal};
use petrel_core::transport::{Peers, RaftService};
use petrel_log::{BatchBuilder, PartitionConfig, RecordBatch, Storage, StorageConfig};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

const GROUP: u64 = 7;
const WAIT: Duration = Duration::from_secs(10);

struct Node {
    raft: Raft<PartitionRaft>,
    reader: LogReader,
    addr: String,
    stop: Option<oneshot::Sender<()>>,
    _storage: Storage,
}

/// Starts node `id` of the partition group on its data in `dir` (created if new),
/// listening on `addr` if given.
async fn start(id: NodeId, dir: &std::path::Path, addr: Option<&str>) -> Node {
    start_group::<PartitionApp>(id, dir, addr, GROUP).await.0
}

/// Starts node `id` of `group` with application `A`, whose state it publishes.
async fn start_group<A: Application>(
    id: NodeId,
    dir: &std::path::Path,
    addr: Option<&str>,
    group: u64,
) -> (Node, watch::Receiver<A>) {
    let storage = Storage::open(StorageConfig::new(dir.join("data"))).expect("storage");
    let log = if storage.partitions().contains(&group) {
        storage.open_partition(group, PartitionConfig::default())
    } else {
        storage.create_partition(group, PartitionConfig::default())
    }
    .expect("partition");
    let (publish, published) = watch::channel(A::default());
    let (mut store, machine) =
        petrel_core::raft::open_group(log, &dir.join("raft"), Some(publish)).expect("raft storage");
    let reader = openraft::storage::RaftLogStorage::get_log_reader(&mut store).await;
    let config = Config {
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        // A snapshot lets the log go entirely (the tests trigger them).
        max_in_snapshot_log_to_keep: 0,
        ..Config::default()
    }
    .validate()
    .expect("config");
    let raft = Raft::new(
        id,
        Arc::new(config),
        Peers::new(None).group(group),
        store,
        machine,
    )
    .await
    .expect("raft");
    let groups = Arc::new(RwLock::new(HashMap::from([(group, raft.clone())])));
    let listener = TcpListener::bind(addr.unwrap_or("127.0.0.1:0"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RaftService::new(groups, Default::default()).into_server())
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    let node = Node {
        raft,
        reader,
        addr,
        stop: Some(stop),
        _storage: storage,
    };
    (node, published)
}

fn records(tag: &str, n: u32) -> Proposal {
    let mut b = BatchBuilder::new();
    for i in 0..n {
        b.push(1_000, None, format!("{tag}-{i}").as_bytes(), &[]);
    }
    Proposal(b.build(0, 0, 0).expect("build"))
}

/// The message batches a node's log holds: (index, base offset, next offset, values).
async fn messages(node: &mut Node) -> Vec<(u64, u64, u64, Vec<String>)> {
    let entries = node.reader.try_get_log_entries(..).await.expect("read");
    entries
        .into_iter()
        .filter_map(|e| match e.payload {
            openraft::EntryPayload::Normal(Proposal(b)) => Some(describe(e.log_id.index, &b)),
            _ => None,
        })
        .collect()
}

fn describe(index: u64, b: &RecordBatch) -> (u64, u64, u64, Vec<String>) {
    let values = b
        .records()
        .expect("records")
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect();
    (index, b.base_offset(), b.next_offset(), values)
}

impl Node {
    async fn stop(mut self) {
        self.raft.shutdown().await.expect("shutdown");
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Initialises the group on node 1 with every node as a voter.
async fn initialize(nodes: &BTreeMap<NodeId, Node>) {
    let members: BTreeMap<NodeId, BasicNode> = nodes
        .iter()
        .map(|(id, n)| (*id, BasicNode::new(&n.addr)))
        .collect();
    nodes[&1]
        .raft
        .initialize(members)
        .await
        .expect("initialize");
}

/// Starts three nodes as one group and returns them with its leader.
async fn cluster(dir: &std::path::Path) -> (BTreeMap<NodeId, Node>, NodeId) {
    let mut nodes = BTreeMap::new();
    for id in 1..=3u64 {
        nodes.insert(id, start(id, &dir.join(id.to_string()), None).await);
    }
    initialize(&nodes).await;
    let leader = leader_of(&nodes).await;
    (nodes, leader)
}

/// Writes `n` proposals through the leader; returns the last index.
async fn write(leader: &Node, tag: &str, n: u32) -> u64 {
    let mut last = 0;
    for i in 0..n {
        let reply = leader
            .raft
            .client_write(records(&format!("{tag}{i}"), 1 + i % 3))
            .await
            .expect("write");
        last = reply.log_id.index;
    }
    last
}

async fn stop_all(nodes: BTreeMap<NodeId, Node>) {
    for node in nodes.into_values() {
        node.stop().await;
    }
}

async fn applied(nodes: &BTreeMap<NodeId, Node>, index: u64) {
    for node in nodes.values() {
        node.raft
            .wait(Some(WAIT))
            .applied_index_at_least(Some(index), "applied everywhere")
            .await
            .expect("applied");
    }
}

async fn leader_of(nodes: &BTreeMap<NodeId, Node>) -> NodeId {
    let any = nodes.values().next().expect("a node");
    let metrics = any
        .raft
        .wait(Some(WAIT))
        .metrics(
            |m| m.current_leader.is_some_and(|l| nodes.contains_key(&l)),
            "a leader among the running nodes",
        )
        .await
        .expect("a leader");
    metrics.current_leader.expect("leader")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_replicate_with_the_same_offsets_and_survive_the_leader_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut nodes, leader) = cluster(dir.path()).await;
    // Proposals of 1, 2 and 3 records.
    applied(&nodes, write(&nodes[&leader], "a", 3).await).await;
    let mut logs = Vec::new();
    for node in nodes.values_mut() {
        logs.push(messages(node).await);
    }
    assert_eq!(logs[0].len(), 3);
    assert!(
        logs.iter().all(|l| l == &logs[0]),
        "the same batches at the same offsets: {logs:#?}"
    );
    let values: Vec<String> = logs[0].iter().flat_map(|b| b.3.clone()).collect();
    assert_eq!(values, ["a0-0", "a1-0", "a1-1", "a2-0", "a2-1", "a2-2"]);

    // The leader stops: the other two elect a new one and keep taking writes.
    nodes.remove(&leader).expect("leader").stop().await;
    let started = std::time::Instant::now();
    let new_leader = leader_of(&nodes).await;
    assert_ne!(new_leader, leader);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failover took {:?}",
        started.elapsed()
    );
    applied(&nodes, write(&nodes[&new_leader], "b", 1).await).await;
    let mut after = Vec::new();
    for node in nodes.values_mut() {
        after.push(messages(node).await);
    }
    assert!(after.iter().all(|l| l == &after[0]));
    assert_eq!(
        after[0].len(),
        4,
        "nothing acknowledged before the failover is lost"
    );
    assert_eq!(&after[0][..3], &logs[0][..]);
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transport_answers_garbage_and_strangers_with_clear_errors_and_keeps_serving() {
    use petrel_core::transport::proto::AppendRequest;
    use petrel_core::transport::proto::raft_transport_client::RaftTransportClient;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = start(1, dir.path(), None).await;

    // Not HTTP/2 at all: the connection is dropped, the server is not.
    let mut raw = tokio::net::TcpStream::connect(&node.addr)
        .await
        .expect("connect");
    raw.write_all(b"GET / HTTP/1.0\r\n\r\n\x00\xff garbage")
        .await
        .expect("write");
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(WAIT, raw.read_to_end(&mut sink)).await;

    let mut client = RaftTransportClient::connect(format!("http://{}", node.addr))
        .await
        .expect("connect");
    let append = |group, header: &'static [u8], entries: Vec<&'static [u8]>| AppendRequest {
        group,
        header: bytes::Bytes::from_static(header),
        entries: entries.into_iter().map(bytes::Bytes::from_static).collect(),
    };
    let header = br#"{"vote":{"leader_id":{"term":1,"voted_for":2},"committed":true},"prev_log_id":null,"leader_commit":null}"#;

    let stranger = client.append_entries(append(99, header, vec![])).await;
    let status = stranger.expect_err("an unknown group");
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert!(status.message().contains("no Raft group 99"), "{status:?}");

    let status = client
        .append_entries(append(GROUP, b"{not json", vec![]))
        .await
        .expect_err("a malformed header");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("append header"), "{status:?}");

    let status = client
        .append_entries(append(GROUP, header, vec![b"not a record batch"]))
        .await
        .expect_err("a malformed entry");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("entry"), "{status:?}");

    // Still serving: a well-formed heartbeat gets a Raft answer.
    let reply = client
        .append_entries(append(GROUP, header, vec![]))
        .await
        .expect("a heartbeat is answered");
    let body: serde_json::Value = serde_json::from_slice(&reply.into_inner().body).expect("json");
    assert!(
        body.get("Ok").is_some() || body.get("Err").is_some(),
        "{body}"
    );
    assert!(messages(&mut node).await.is_empty());
    node.raft.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_wiped_behind_a_purged_log_is_refilled_from_a_snapshot_at_the_same_offsets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut nodes, leader) = cluster(dir.path()).await;
    let follower = *nodes.keys().find(|id| **id != leader).expect("a follower");
    applied(&nodes, write(&nodes[&leader], "a", 4).await).await;

    // The follower stops; the others go on, snapshot, and purge their logs entirely.
    let gone = nodes.remove(&follower).expect("follower");
    let addr = gone.addr.clone();
    gone.stop().await;
    let last = write(&nodes[&leader], "b", 4).await;
    applied(&nodes, last).await;
    let raft = &nodes[&leader].raft;
    raft.trigger().snapshot().await.expect("snapshot");
    raft.wait(Some(WAIT))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= last),
            "snapshot taken",
        )
        .await
        .expect("snapshot");
    raft.trigger().purge_log(last).await.expect("purge");
    raft.wait(Some(WAIT))
        .metrics(|m| m.purged.is_some_and(|p| p.index >= last), "log purged")
        .await
        .expect("purged");

    // It comes back with nothing: the snapshot refills it, and new entries land at the
    // leader's offsets.
    let home = dir.path().join(follower.to_string());
    std::fs::remove_dir_all(&home).expect("wipe");
    nodes.insert(follower, start(follower, &home, Some(&addr)).await);
    let more = write(&nodes[&leader], "c", 3).await;
    applied(&nodes, more).await;
    let refilled = messages(nodes.get_mut(&follower).expect("follower")).await;
    let on_leader = messages(nodes.get_mut(&leader).expect("leader")).await;
    assert_eq!(
        refilled.len(),
        3,
        "only what came after the snapshot: {refilled:?}"
    );
    assert_eq!(&on_leader[on_leader.len() - 3..], &refilled[..]);
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metadata_group_applies_the_same_commands_on_every_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes = BTreeMap::new();
    let mut views = Vec::new();
    for id in 1..=3u64 {
        let home = dir.path().join(id.to_string());
        let (node, view) = start_group::<Metadata>(id, &home, None, meta::METADATA_GROUP).await;
        nodes.insert(id, node);
        views.push(view);
    }
    initialize(&nodes).await;
    let leader = &nodes[&leader_of(&nodes).await].raft;
    let run = |command: Command| async move {
        let proposal = meta::proposal(&command).expect("proposal");
        let reply = leader.client_write(proposal).await.expect("write");
        meta::outcome(&reply.data)
    };
    for (id, node) in &nodes {
        let joined = run(Command::AddNode {
            id: *id,
            addr: node.addr.clone(),
        })
        .await;
        assert_eq!(joined, Ok(Outcome::Nodes));
    }
    let spec = Spec {
        kind: Kind::Topic,
        name: "orders".into(),
        partitions: 3,
        replication_factor: 3,
        durability: meta::Durability::Always,
        retention: meta::Retention::default(),
        declared: Default::default(),
    };
    let created = run(Command::Create(spec.clone())).await.expect("created");
    let Outcome::Destination(orders) = created else {
        panic!("{created:?}")
    };
    assert_eq!(orders.partitions.len(), 3);
    assert_eq!(
        run(Command::Create(spec.clone())).await,
        Err(MetaError::AlreadyExists {
            kind: Kind::Topic,
            name: "orders".into()
        })
    );
    let too_many = run(Command::Create(Spec {
        name: "wide".into(),
        replication_factor: 4,
        ..spec
    }))
    .await;
    assert!(
        matches!(too_many, Err(MetaError::InvalidArgument(_))),
        "{too_many:?}"
    );

    // Every node applied the same commands to the same metadata.
    for view in &mut views {
        let seen = tokio::time::timeout(
            WAIT,
            view.wait_for(|m| m.destination(Kind::Topic, "orders").is_some()),
        )
        .await
        .expect("in time")
        .expect("published")
        .clone();
        assert_eq!(seen.destination(Kind::Topic, "orders"), Some(&orders));
        assert_eq!(seen.nodes.len(), 3);
        assert!(seen.destination(Kind::Topic, "wide").is_none());
    }
    stop_all(nodes).await;
}
