//! A partition's Raft group across three nodes in one process, each with its own storage
//! and its own gRPC server on loopback: entries replicate with the same offsets
//! everywhere, and a new leader takes over when the leader stops.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::{BasicNode, Config, Raft, RaftLogReader};
use petrel_core::raft::{LogReader, LogStore, NodeId, PartitionMachine, PartitionRaft, Proposal};
use petrel_core::transport::{Peers, RaftService};
use petrel_log::{BatchBuilder, PartitionConfig, RecordBatch, Storage, StorageConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const GROUP: u64 = 7;
const WAIT: Duration = Duration::from_secs(10);

struct Node {
    raft: Raft<PartitionRaft>,
    reader: LogReader,
    addr: String,
    stop: Option<oneshot::Sender<()>>,
    _storage: Storage,
}

async fn start(id: NodeId, dir: &std::path::Path) -> Node {
    let storage = Storage::open(StorageConfig::new(dir.join("data"))).expect("storage");
    let log = storage
        .create_partition(GROUP, PartitionConfig::default())
        .expect("partition");
    let mut store = LogStore::open(log, dir.join("raft")).expect("log store");
    let reader = openraft::storage::RaftLogStorage::get_log_reader(&mut store).await;
    let machine = PartitionMachine::open(dir.join("raft")).expect("state machine");
    let config = Config {
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        ..Config::default()
    }
    .validate()
    .expect("config");
    let raft = Raft::new(
        id,
        Arc::new(config),
        Peers::new(None).group(GROUP),
        store,
        machine,
    )
    .await
    .expect("raft");
    let groups = Arc::new(RwLock::new(HashMap::from([(GROUP, raft.clone())])));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RaftService::new(groups).into_server())
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    Node {
        raft,
        reader,
        addr,
        stop: Some(stop),
        _storage: storage,
    }
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
    let mut nodes = BTreeMap::new();
    for id in 1..=3u64 {
        nodes.insert(id, start(id, &dir.path().join(id.to_string())).await);
    }
    let members: BTreeMap<NodeId, BasicNode> = nodes
        .iter()
        .map(|(id, n)| (*id, BasicNode::new(&n.addr)))
        .collect();
    nodes[&1]
        .raft
        .initialize(members)
        .await
        .expect("initialize");

    let leader = leader_of(&nodes).await;
    let mut written = Vec::new();
    for (i, n) in [3u32, 1, 2].into_iter().enumerate() {
        let reply = nodes[&leader]
            .raft
            .client_write(records(&format!("a{i}"), n))
            .await
            .expect("write");
        written.push(reply.log_id.index);
    }
    let last = *written.last().expect("written");
    for node in nodes.values() {
        node.raft
            .wait(Some(WAIT))
            .applied_index_at_least(Some(last), "applied everywhere")
            .await
            .expect("applied");
    }
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
    assert_eq!(values, ["a0-0", "a0-1", "a0-2", "a1-0", "a2-0", "a2-1"]);

    // The leader stops: the other two elect a new one and keep taking writes.
    let mut old = nodes.remove(&leader).expect("leader");
    old.raft.shutdown().await.expect("shutdown");
    if let Some(stop) = old.stop.take() {
        let _ = stop.send(());
    }
    let started = std::time::Instant::now();
    let new_leader = leader_of(&nodes).await;
    assert_ne!(new_leader, leader);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failover took {:?}",
        started.elapsed()
    );
    let reply = nodes[&new_leader]
        .raft
        .client_write(records("b", 2))
        .await
        .expect("write after failover");
    for node in nodes.values() {
        node.raft
            .wait(Some(WAIT))
            .applied_index_at_least(Some(reply.log_id.index), "applied after failover")
            .await
            .expect("applied");
    }
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
    for node in nodes.values() {
        node.raft.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transport_answers_garbage_and_strangers_with_clear_errors_and_keeps_serving() {
    use petrel_core::transport::proto::AppendRequest;
    use petrel_core::transport::proto::raft_transport_client::RaftTransportClient;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = start(1, dir.path()).await;

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
