//! A cluster of `petrel serve` processes on loopback: they form from a static peer list,
//! and a node killed with SIGKILL comes back on its data and is a member again.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use petrel_tests::cluster::{Cluster, EXIT, FORM, READY, members, node};
use petrel_tests::{Serve, Signal, free_port_other_than};

#[test]
fn three_processes_form_a_cluster_and_a_killed_node_comes_back_a_member() -> anyhow::Result<()> {
    let mut cluster = three_nodes()?;

    // Node 3 crashes; the other two keep the cluster and report it unreachable; it
    // restarts on its data, and is healthy again.
    cluster.nodes[2].signal(Signal::Kill)?;
    health_becomes(cluster.ports[0], &["ok", "ok", "unreachable"])?;
    let _crashed = cluster.restart(2, false)?;
    cluster.joined()?;
    health_becomes(cluster.ports[0], &["ok", "ok", "ok"])?;
    for node in &cluster.nodes {
        node.signal(Signal::Term)?;
    }
    for node in &mut cluster.nodes {
        let exited = node.wait_exit(EXIT)?;
        ensure!(exited.status.success(), "unclean stop: {}", exited.stderr);
    }
    Ok(())
}

/// Waits until `petrel cluster status` through `port` reports each node's health as
/// `expected` (by node id).
fn health_becomes(port: u16, expected: &[&str]) -> anyhow::Result<()> {
    let deadline = Instant::now() + FORM;
    loop {
        let status: serde_json::Value =
            serde_json::from_slice(&petrel(port, &["cluster", "status", "-o", "json"])?.stdout)?;
        let health: Vec<&str> = status["nodes"]
            .as_array()
            .context("nodes")?
            .iter()
            .filter_map(|n| n["health"].as_str())
            .collect();
        if health == expected {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "expected {expected:?}: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_peer_list_without_this_node_is_refused() -> anyhow::Result<()> {
    let port = free_port_other_than(&[])?;
    let (serve, _) = node(1, &format!("2=127.0.0.1:{port}"), port, None)?;
    let exited = serve.run_to_exit(EXIT)?;
    ensure!(exited.status.code() == Some(1), "{exited:?}");
    ensure!(
        exited
            .stderr
            .contains("does not list this node (node_id 1)"),
        "{}",
        exited.stderr
    );
    Ok(())
}

#[test]
fn an_internal_port_in_use_fails_naming_the_address() -> anyhow::Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port();
    let (serve, _) = node(1, &format!("1=127.0.0.1:{port}"), port, None)?;
    let exited = serve.run_to_exit(EXIT)?;
    ensure!(exited.status.code() == Some(1), "{exited:?}");
    let expected = format!("cannot listen for peers on 127.0.0.1:{port}");
    ensure!(exited.stderr.contains(&expected), "{}", exited.stderr);
    Ok(())
}

#[test]
fn a_node_is_not_ready_for_clients_until_it_has_joined_its_cluster() -> anyhow::Result<()> {
    let mut ports = Vec::new();
    for _ in 0..2 {
        ports.push(free_port_other_than(&ports)?);
    }
    let peers = format!("1=127.0.0.1:{},2=127.0.0.1:{}", ports[0], ports[1]);
    // Node 2 alone: it serves HTTP, but cannot join while node 1 (which initialises the
    // cluster) is not there, and says so.
    let (serve, _) = node(2, &peers, ports[1], None)?;
    let mut second = serve.start()?;
    let deadline = Instant::now() + FORM;
    while second.get("/healthz").map(|r| r.status).ok() != Some(200) {
        ensure!(Instant::now() < deadline, "node 2 never served HTTP");
        std::thread::sleep(Duration::from_millis(50));
    }
    let watched = Instant::now() + Duration::from_secs(1);
    while Instant::now() < watched {
        let ready = second.get("/readyz")?;
        ensure!(
            ready.status == 503 && ready.body.contains("starting"),
            "ready before joining: {} {}",
            ready.status,
            ready.body
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Node 1 comes: both join, and node 2 turns ready.
    let (serve, _) = node(1, &peers, ports[0], None)?;
    let mut first = serve.start()?;
    first.wait_ready(READY)?;
    second.wait_ready(READY)?;
    Ok(())
}

/// Waits until the writers' `count` of acknowledged appends reaches `n`.
fn acked_at_least(count: &std::sync::atomic::AtomicUsize, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY;
    while count.load(std::sync::atomic::Ordering::Relaxed) < n {
        ensure!(Instant::now() < deadline, "the writers stalled below {n}");
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Three running nodes of one cluster.
fn three_nodes() -> anyhow::Result<Cluster> {
    Cluster::start(3)
}

#[test]
fn the_admin_api_manages_topics_through_any_node_with_clear_errors() -> anyhow::Result<()> {
    use petrel_api::admin::v1::admin_client::AdminClient;
    use petrel_api::admin::v1::{
        CreateDestinationRequest, DestinationRef, DestinationSpec, GetClusterStatusRequest, Kind,
        ListDestinationsRequest,
    };

    let Cluster {
        nodes: _nodes,
        ports,
        ..
    } = three_nodes()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let connect = |port: u16| AdminClient::connect(format!("http://127.0.0.1:{port}"));
        let (mut one, mut two, mut three) = (
            connect(ports[0]).await?,
            connect(ports[1]).await?,
            connect(ports[2]).await?,
        );
        let status = three
            .get_cluster_status(GetClusterStatusRequest {})
            .await?
            .into_inner();
        ensure!(
            status.nodes.len() == 3 && status.answered_by == 3,
            "{status:?}"
        );

        let spec = |name: &str, partitions, rf| DestinationSpec {
            kind: Kind::Topic.into(),
            name: name.to_owned(),
            partitions,
            replication_factor: rf,
            ..DestinationSpec::default()
        };
        let create = |spec| CreateDestinationRequest { spec: Some(spec) };
        let orders = two
            .create_destination(create(spec("orders", 3, 3)))
            .await?
            .into_inner();
        ensure!(orders.partitions.len() == 3, "{orders:?}");
        ensure!(
            orders.partitions.iter().all(|p| p.replicas.len() == 3),
            "{orders:?}"
        );

        let again = one.create_destination(create(spec("orders", 1, 1))).await;
        ensure!(
            again
                .as_ref()
                .is_err_and(|s| s.code() == tonic::Code::AlreadyExists),
            "{again:?}"
        );
        let wide = one.create_destination(create(spec("wide", 1, 4))).await;
        ensure!(
            wide.as_ref()
                .is_err_and(|s| s.code() == tonic::Code::InvalidArgument
                    && s.message().contains("replication factor 4")),
            "{wide:?}"
        );
        let empty = one
            .create_destination(CreateDestinationRequest { spec: None })
            .await;
        ensure!(
            empty
                .as_ref()
                .is_err_and(|s| s.code() == tonic::Code::InvalidArgument),
            "{empty:?}"
        );
        let no_kind = one
            .get_destination(DestinationRef {
                kind: 0,
                name: "orders".into(),
                ..Default::default()
            })
            .await;
        ensure!(
            no_kind
                .as_ref()
                .is_err_and(|s| s.code() == tonic::Code::InvalidArgument),
            "{no_kind:?}"
        );

        // Every node knows it (reads come from each node's copy of the metadata).
        let orders_ref = || DestinationRef {
            kind: Kind::Topic.into(),
            name: "orders".into(),
            ..Default::default()
        };
        let deadline = Instant::now() + FORM;
        loop {
            let listed = three
                .list_destinations(ListDestinationsRequest {
                    kind: Kind::Topic.into(),
                })
                .await?
                .into_inner();
            if listed
                .destinations
                .iter()
                .any(|d| d.spec.as_ref().is_some_and(|s| s.name == "orders"))
            {
                break;
            }
            ensure!(Instant::now() < deadline, "node 3 never listed the topic");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seen = three.get_destination(orders_ref()).await?.into_inner();
        let groups = |d: &petrel_api::admin::v1::Destination| {
            d.partitions.iter().map(|p| p.group).collect::<Vec<_>>()
        };
        ensure!(groups(&seen) == groups(&orders), "{seen:?} vs {orders:?}");

        one.delete_destination(orders_ref()).await?;
        let gone = one.get_destination(orders_ref()).await;
        ensure!(
            gone.as_ref()
                .is_err_and(|s| s.code() == tonic::Code::NotFound),
            "{gone:?}"
        );
        let twice = two.delete_destination(orders_ref()).await;
        ensure!(
            twice
                .as_ref()
                .is_err_and(|s| s.code() == tonic::Code::NotFound),
            "{twice:?}"
        );
        anyhow::Ok(())
    })
}

/// Runs `petrel <args> --server 127.0.0.1:<port>`.
fn petrel(port: u16, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(petrel_tests::petrel_command()?
        .args(args)
        .args(["--server", &format!("127.0.0.1:{port}")])
        .output()?)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_cli_manages_topics_and_queues_as_tables_or_json() -> anyhow::Result<()> {
    let Cluster {
        nodes: _nodes,
        ports,
        ..
    } = three_nodes()?;
    let created = petrel(
        ports[0],
        &[
            "topic",
            "create",
            "orders",
            "--partitions",
            "3",
            "--replication-factor",
            "3",
        ],
    )?;
    ensure!(created.status.success(), "{}", text(&created.stderr));
    let table = text(&created.stdout);
    ensure!(
        table.starts_with("NAME") && table.contains("orders"),
        "{table}"
    );

    // Another node lists it, as JSON, once its copy of the metadata has it.
    let deadline = Instant::now() + FORM;
    let listed: serde_json::Value = loop {
        let out = petrel(ports[2], &["topic", "list", "-o", "json"])?;
        ensure!(out.status.success(), "{}", text(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        if json.as_array().is_some_and(|a| !a.is_empty()) {
            break json;
        }
        ensure!(Instant::now() < deadline, "node 3 never listed the topic");
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(
        listed[0]["name"] == "orders" && listed[0]["partitions"] == 3,
        "{listed}"
    );
    ensure!(
        listed[0]["placement"].as_array().map(Vec::len) == Some(3),
        "{listed}"
    );

    let described = petrel(ports[1], &["topic", "describe", "orders"])?;
    let table = text(&described.stdout);
    ensure!(
        table.contains("PARTITION") && table.lines().count() == 2 + 1 + 1 + 3,
        "{table}"
    );

    let duplicate = petrel(ports[1], &["topic", "create", "orders"])?;
    ensure!(duplicate.status.code() == Some(1));
    ensure!(
        text(&duplicate.stderr).trim() == "petrel: error: topic \"orders\" already exists",
        "{}",
        text(&duplicate.stderr)
    );
    let wide = petrel(
        ports[0],
        &["queue", "create", "jobs", "--replication-factor", "4"],
    )?;
    ensure!(wide.status.code() == Some(1) && text(&wide.stderr).contains("replication factor 4"));

    let queue = petrel(
        ports[0],
        &["queue", "create", "jobs", "--durability", "never"],
    )?;
    ensure!(queue.status.success(), "{}", text(&queue.stderr));
    let queues: serde_json::Value =
        serde_json::from_slice(&petrel(ports[0], &["queue", "list", "-o", "json"])?.stdout)?;
    ensure!(
        queues[0]["name"] == "jobs" && queues[0]["durability"] == "never",
        "{queues}"
    );
    let topics: serde_json::Value =
        serde_json::from_slice(&petrel(ports[0], &["topic", "list", "-o", "json"])?.stdout)?;
    ensure!(
        topics.as_array().map(Vec::len) == Some(1),
        "queues are not topics: {topics}"
    );

    let status: serde_json::Value =
        serde_json::from_slice(&petrel(ports[2], &["cluster", "status", "-o", "json"])?.stdout)?;
    ensure!(
        status["nodes"].as_array().map(Vec::len) == Some(3),
        "{status}"
    );

    let deleted = petrel(ports[0], &["topic", "delete", "orders"])?;
    ensure!(deleted.status.success(), "{}", text(&deleted.stderr));
    let gone = petrel(ports[0], &["topic", "describe", "orders"])?;
    ensure!(gone.status.code() == Some(1) && text(&gone.stderr).contains("not found"));

    let unreachable = petrel(1, &["cluster", "status"])?;
    ensure!(unreachable.status.code() == Some(1));
    ensure!(
        text(&unreachable.stderr).contains("cannot reach the admin API at 127.0.0.1:1"),
        "{}",
        text(&unreachable.stderr)
    );
    Ok(())
}

#[test]
fn in_kubernetes_mode_pods_find_their_id_and_peers_and_are_told_apart_by_address()
-> anyhow::Result<()> {
    // Three "pods" on one host: each its own loopback address (127.0.0.10 to .12) and
    // the same internal port, its id taken from its hostname.
    let port = free_port_other_than(&[])?;
    let mut nodes = Vec::new();
    for ordinal in 0..3 {
        let serve = Serve::bare()?;
        let http = serve.http_port().to_string();
        let data = serve.data_dir();
        let node = serve
            .env("HOSTNAME", format!("petrel-{ordinal}"))
            .args(["--bind", "127.0.0.1", "--http-port", &http])
            .args([
                "--peer-pattern",
                &format!("127.0.0.1{{}}:{port}"),
                "--replicas",
                "3",
            ])
            .args(["--internal-bind", &format!("127.0.0.1{ordinal}")])
            .args(["--internal-port", &port.to_string()])
            .arg("--data-dir")
            .arg(data)
            .start()?;
        nodes.push(node);
    }
    for node in &mut nodes {
        node.wait_ready(READY)?;
    }
    members(&nodes.iter().collect::<Vec<_>>(), 3.0)?;
    // The CLI reaches node 0 at its own address.
    let status = petrel_tests::petrel_command()?
        .args(["cluster", "status", "-o", "json", "--server"])
        .arg(format!("127.0.0.10:{port}"))
        .output()?;
    let json: serde_json::Value = serde_json::from_slice(&status.stdout)?;
    let ids: Vec<u64> = json["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .filter_map(|n| n["id"].as_u64())
        .collect();
    ensure!(ids == [0, 1, 2], "{json}");
    Ok(())
}

mod failover {
    use std::time::{Duration, Instant};

    use anyhow::{Context, ensure};
    use petrel_api::admin::v1::admin_client::AdminClient;
    use petrel_api::admin::v1::{CreateDestinationRequest, DestinationRef, DestinationSpec, Kind};
    use petrel_core::transport::proto::data_client::DataClient;
    use petrel_core::transport::proto::{FetchRequest, ProduceRequest, Record, Target};
    use petrel_tests::Signal;
    use tonic::transport::Channel;

    use super::{Cluster, EXIT, READY, acked_at_least, three_nodes};

    /// How long the survivors may take to elect a new leader (the bound).
    const FAILOVER: Duration = Duration::from_secs(5);

    fn target() -> Option<Target> {
        Some(Target {
            kind: "topic".into(),
            name: "ledger".into(),
            partition: 0,
        })
    }

    async fn admin(port: u16) -> anyhow::Result<AdminClient<Channel>> {
        Ok(AdminClient::connect(format!("http://127.0.0.1:{port}")).await?)
    }

    async fn data(port: u16) -> anyhow::Result<DataClient<Channel>> {
        Ok(DataClient::connect(format!("http://127.0.0.1:{port}")).await?)
    }

    /// The partition's leader as node `port` knows it, once it knows one other than `not`.
    async fn leader(port: u16, not: Option<u64>, within: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + within;
        let mut client = admin(port).await?;
        loop {
            let d = client
                .get_destination(DestinationRef {
                    kind: Kind::Topic.into(),
                    name: "ledger".into(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            if let Some(l) = d.partitions.first().and_then(|p| p.leader)
                && Some(l) != not
            {
                return Ok(l);
            }
            ensure!(Instant::now() < deadline, "no new leader within {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Produces `n` one-record appends through `port`; returns the acknowledged values.
    async fn produce(port: u16, tag: &str, n: usize) -> anyhow::Result<Vec<String>> {
        let mut client = data(port).await?;
        let mut acked = Vec::new();
        for i in 0..n {
            let value = format!("{tag}-{i}");
            let request = ProduceRequest {
                target: target(),
                records: vec![Record {
                    key: None,
                    value: value.clone().into(),
                }],
            };
            client.produce(request).await?;
            acked.push(value);
        }
        Ok(acked)
    }

    /// Every committed value on node `port`'s replica, once it has at least `want`.
    async fn replica_values(port: u16, want: usize) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + READY;
        let mut client = data(port).await?;
        loop {
            let mut values = Vec::new();
            let mut offset = 0;
            loop {
                let fetched = match client
                    .fetch(FetchRequest {
                        target: target(),
                        offset,
                        max_bytes: 64 << 10,
                    })
                    .await
                {
                    Ok(f) => f.into_inner(),
                    // A restarted node learns the topic, and starts its replica, from the
                    // metadata as it catches up.
                    Err(s)
                        if matches!(
                            s.code(),
                            tonic::Code::NotFound | tonic::Code::FailedPrecondition
                        ) =>
                    {
                        break;
                    }
                    Err(s) => return Err(s.into()),
                };
                let Some(last) = fetched.records.last() else {
                    break;
                };
                offset = last.offset + 1;
                values.extend(
                    fetched
                        .records
                        .iter()
                        .map(|r| String::from_utf8_lossy(&r.value).into_owned()),
                );
            }
            if values.len() >= want {
                return Ok(values);
            }
            ensure!(
                Instant::now() < deadline,
                "node at {port} has {} of {want} records",
                values.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[test]
    fn a_killed_partition_leader_is_replaced_within_5_s_and_nothing_acknowledged_is_lost()
    -> anyhow::Result<()> {
        let mut cluster = three_nodes()?;
        let ports = cluster.ports.clone();
        let runtime = tokio::runtime::Runtime::new()?;
        let (old, mut acked) = runtime.block_on(async {
            let old = ledger(&ports).await?;
            // Through a node that is not the leader: forwarded.
            let via = ports[usize::from(old == 1)];
            anyhow::Ok((old, produce(via, "before", 20).await?))
        })?;

        let index = usize::try_from(old - 1)?;
        cluster.nodes[index].signal(Signal::Kill)?;
        let killed_at = Instant::now();
        let survivor = ports[(index + 1) % 3];
        let new = runtime.block_on(leader(survivor, Some(old), FAILOVER))?;
        let failover = killed_at.elapsed();
        eprintln!("failover: node {old} killed, node {new} leads after {failover:?}");
        ensure!(failover < FAILOVER, "failover took {failover:?}");
        acked.extend(runtime.block_on(produce(survivor, "after", 10))?);

        // The killed node comes back on its data and catches up.
        let _crashed = cluster.restart(index, false)?;
        for port in &ports {
            let values = runtime
                .block_on(replica_values(*port, acked.len()))
                .with_context(|| format!("reading node at {port}"))?;
            ensure!(
                values == acked,
                "node at {port} holds {values:?}, acknowledged {acked:?}"
            );
        }

        // Its preferred leader back and caught up, the partition is handed back to it.
        let deadline = Instant::now() + Duration::from_secs(40);
        while runtime.block_on(leader(survivor, None, READY))? != old {
            ensure!(
                Instant::now() < deadline,
                "node {old} was not given its partition back"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        acked.extend(runtime.block_on(produce(survivor, "back", 5))?);
        let values = runtime.block_on(replica_values(ports[index], acked.len()))?;
        ensure!(values == acked, "after the handback: {values:?}");
        Ok(())
    }

    /// The leader hands a proposal to Raft while the previous one commits, and
    /// replicates entries before its own disk sync: a kill -9 lands with appends in
    /// flight, some of them unsynced on the leader. What was acknowledged survives, each
    /// producer's records keep their order, and all replicas end up with the same log.
    #[test]
    fn a_leader_killed_with_appends_in_flight_loses_nothing_acknowledged() -> anyhow::Result<()> {
        const WRITERS: usize = 8;
        let mut cluster = three_nodes()?;
        let ports = cluster.ports.clone();
        let runtime = tokio::runtime::Runtime::new()?;
        let old = runtime.block_on(ledger(&ports))?;
        let index = usize::try_from(old - 1)?;
        let on_leader = ports[index];
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // Writers on the leader's node, each until its first failed append.
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let count = count.clone();
                runtime.spawn(async move {
                    let mut client = data(on_leader).await?;
                    let mut acked = Vec::new();
                    for i in 0.. {
                        let value = format!("w{w}-{i}");
                        let request = ProduceRequest {
                            target: target(),
                            records: vec![Record {
                                key: None,
                                value: value.clone().into(),
                            }],
                        };
                        if client.produce(request).await.is_err() {
                            break;
                        }
                        acked.push(value);
                        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    anyhow::Ok(acked)
                })
            })
            .collect();
        acked_at_least(&count, 300)?;
        cluster.nodes[index].signal(Signal::Kill)?;
        let mut acked = Vec::new();
        for writer in writers {
            acked.push(runtime.block_on(writer)??);
        }
        let survivor = ports[(index + 1) % 3];
        runtime.block_on(leader(survivor, Some(old), FAILOVER))?;
        let total: usize = acked.iter().map(Vec::len).sum();
        eprintln!("{total} appends acknowledged before the kill");

        let _crashed = cluster.restart(index, false)?;
        let mut logs = Vec::new();
        for port in &ports {
            let values = runtime
                .block_on(replica_values(*port, total))
                .with_context(|| format!("reading node at {port}"))?;
            for (w, mine) in acked.iter().enumerate() {
                let prefix = format!("w{w}-");
                let held: Vec<_> = values.iter().filter(|v| v.starts_with(&prefix)).collect();
                // Unacknowledged appends may have been committed too (after the last
                // acknowledged one); every acknowledged one is there once, in order.
                ensure!(
                    held.len() >= mine.len() && held.iter().zip(mine).all(|(h, m)| *h == m),
                    "node at {port}: writer {w} acknowledged {mine:?}, the log holds {held:?}"
                );
            }
            logs.push(values);
        }
        // A replica may still be catching up: each is a prefix of the longest.
        let full = logs
            .iter()
            .max_by_key(|l| l.len())
            .cloned()
            .unwrap_or_default();
        for (port, log) in ports.iter().zip(&logs) {
            ensure!(
                full.starts_with(log),
                "node at {port} diverged from the others"
            );
        }
        Ok(())
    }

    /// Creates the one-partition topic `ledger` (RF 3) and returns its leader.
    async fn ledger(ports: &[u16]) -> anyhow::Result<u64> {
        let spec = DestinationSpec {
            kind: Kind::Topic.into(),
            name: "ledger".into(),
            partitions: 1,
            replication_factor: 3,
            ..DestinationSpec::default()
        };
        admin(ports[0])
            .await?
            .create_destination(CreateDestinationRequest { spec: Some(spec) })
            .await?;
        leader(ports[0], None, READY).await
    }

    #[test]
    fn leadership_is_handed_to_another_replica_on_request_losing_nothing() -> anyhow::Result<()> {
        let Cluster {
            nodes: _n, ports, ..
        } = three_nodes()?;
        let runtime = tokio::runtime::Runtime::new()?;
        let old = runtime.block_on(ledger(&ports))?;
        let to = old % 3 + 1;
        let via = ports[usize::try_from(to - 1)?];
        let mut acked = runtime.block_on(produce(via, "before", 10))?;

        // Writes go on while the leadership moves: a writer on its own thread.
        let writer = std::thread::spawn(move || -> anyhow::Result<Vec<String>> {
            tokio::runtime::Runtime::new()?.block_on(produce(via, "during", 300))
        });
        let transfer = |to: &str| {
            let args = ["topic", "transfer-leader", "ledger", "--partition", "0"];
            super::petrel(via, &[&args[..], &["--to", to, "-o", "json"]].concat())
        };
        let moved = transfer(&to.to_string())?;
        ensure!(moved.status.success(), "{}", super::text(&moved.stderr));
        let shown: serde_json::Value = serde_json::from_slice(&moved.stdout)?;
        ensure!(shown["placement"][0]["leader"] == to, "{shown}");
        ensure!(runtime.block_on(leader(ports[0], None, READY))? == to);
        acked.extend(
            writer
                .join()
                .map_err(|_| anyhow::anyhow!("the writer panicked"))??,
        );
        acked.extend(runtime.block_on(produce(ports[0], "after", 10))?);
        for port in &ports {
            let values = runtime.block_on(replica_values(*port, acked.len()))?;
            ensure!(
                values == acked,
                "node at {port} differs from what was acknowledged"
            );
        }
        // The new leader tells how far behind each replica is: soon none, all caught up.
        let deadline = Instant::now() + READY;
        loop {
            let described =
                super::petrel(ports[0], &["topic", "describe", "ledger", "-o", "json"])?;
            let shown: serde_json::Value = serde_json::from_slice(&described.stdout)?;
            let lag = &shown["placement"][0]["lag"];
            if lag
                .as_object()
                .is_some_and(|l| l.len() == 3 && l.values().all(|n| n == 0))
            {
                break;
            }
            ensure!(Instant::now() < deadline, "{shown}");
            std::thread::sleep(Duration::from_millis(50));
        }

        // Only a replica can lead it.
        let refused = transfer("9")?;
        ensure!(!refused.status.success());
        let message = super::text(&refused.stderr);
        ensure!(message.contains("node 9 holds no replica"), "{message}");
        Ok(())
    }

    #[test]
    fn writes_go_on_while_a_follower_is_paused_and_it_catches_up_after() -> anyhow::Result<()> {
        let Cluster { nodes, ports, .. } = three_nodes()?;
        let runtime = tokio::runtime::Runtime::new()?;
        let leader = runtime.block_on(ledger(&ports))?;
        let follower = usize::try_from(leader % 3)?; // the next node: not the leader
        let via = ports[usize::try_from(leader - 1)?];
        let mut acked = runtime.block_on(produce(via, "before", 5))?;

        nodes[follower].signal(Signal::Stop)?;
        let paused = Instant::now();
        // Writes go on with the two others for as long as it is paused (10 s).
        while paused.elapsed() < Duration::from_secs(10) {
            acked.extend(runtime.block_on(produce(via, "paused", 10))?);
        }
        nodes[follower].signal(Signal::Cont)?;
        acked.extend(runtime.block_on(produce(via, "after", 5))?);
        for port in &ports {
            let values = runtime.block_on(replica_values(*port, acked.len()))?;
            ensure!(
                values == acked,
                "node at {port} differs from what was acknowledged"
            );
        }
        Ok(())
    }

    #[test]
    fn a_node_restarted_with_a_wiped_data_directory_is_refilled_from_its_peers()
    -> anyhow::Result<()> {
        let mut cluster = three_nodes()?;
        let runtime = tokio::runtime::Runtime::new()?;
        let leader = runtime.block_on(ledger(&cluster.ports))?;
        let via = cluster.ports[usize::try_from(leader - 1)?];
        let acked = runtime.block_on(produce(via, "kept", 30))?;

        // Node 3 (never the one that initialises the cluster) loses everything.
        cluster.nodes[2].signal(Signal::Kill)?;
        let _wiped = cluster.restart(2, true)?;
        cluster.joined()?;
        let values = runtime.block_on(replica_values(cluster.ports[2], acked.len()))?;
        ensure!(
            values == acked,
            "the wiped node was refilled with {values:?}"
        );
        Ok(())
    }

    #[test]
    fn a_node_decommissioned_under_write_load_hands_over_and_stops_losing_nothing()
    -> anyhow::Result<()> {
        let Cluster {
            mut nodes, ports, ..
        } = Cluster::start(4)?;
        let runtime = tokio::runtime::Runtime::new()?;
        let leader = runtime.block_on(ledger(&ports))?;
        // The leader goes: its replica moves and its leadership is handed over.
        let leaving = leader;
        let survivor = ports[usize::try_from(leaving % 4)?];

        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let writer = {
            let (stop, count) = (stop.clone(), count.clone());
            std::thread::spawn(move || -> anyhow::Result<Vec<String>> {
                let runtime = tokio::runtime::Runtime::new()?;
                runtime.block_on(async {
                    let mut client = data(survivor).await?;
                    let mut acked = Vec::new();
                    let mut i = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let value = format!("load-{i}");
                        i += 1;
                        let request = ProduceRequest {
                            target: target(),
                            records: vec![Record {
                                key: None,
                                value: value.clone().into(),
                            }],
                        };
                        // A refusal while leadership moves is not acknowledged: not counted.
                        if client.produce(request).await.is_ok() {
                            acked.push(value);
                            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    anyhow::Ok(acked)
                })
            })
        };

        // Under load: acknowledged writes before, during and after the drain.
        acked_at_least(&count, 20)?;
        let drained = super::petrel(
            survivor,
            &[
                "node",
                "decommission",
                &leaving.to_string(),
                "--wait",
                "--timeout",
                "60",
                "-o",
                "json",
            ],
        )?;
        ensure!(drained.status.success(), "{}", super::text(&drained.stderr));
        let progress: serde_json::Value = serde_json::from_slice(&drained.stdout)?;
        ensure!(
            progress["done"] == true && progress["partitions_remaining"] == 0,
            "{progress}"
        );

        // Only now does it stop; writes go on.
        let index = usize::try_from(leaving - 1)?;
        nodes[index].signal(Signal::Term)?;
        ensure!(nodes[index].wait_exit(EXIT)?.status.success());
        acked_at_least(
            &count,
            count.load(std::sync::atomic::Ordering::Relaxed) + 20,
        )?;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let acked = writer
            .join()
            .map_err(|_| anyhow::anyhow!("the writer panicked"))??;

        let placed = runtime.block_on(async {
            admin(survivor)
                .await?
                .get_destination(DestinationRef {
                    kind: Kind::Topic.into(),
                    name: "ledger".into(),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner())
                .map_err(anyhow::Error::from)
        })?;
        let replicas = &placed.partitions[0].replicas;
        ensure!(
            replicas.len() == 3 && !replicas.contains(&leaving),
            "{placed:?}"
        );
        for id in replicas {
            let port = ports[usize::try_from(id - 1)?];
            let values = runtime.block_on(replica_values(port, acked.len()))?;
            let mut held = values.iter();
            ensure!(
                acked.iter().all(|a| held.any(|v| v == a)),
                "node {id} lost acknowledged records (or holds them out of order)"
            );
        }
        Ok(())
    }
}

mod growth {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use super::acked_at_least;
    use anyhow::ensure;
    use petrel_api::admin::v1::admin_client::AdminClient;
    use petrel_api::admin::v1::{
        CreateDestinationRequest, DestinationRef, DestinationSpec, GetClusterStatusRequest, Kind,
    };
    use petrel_core::transport::proto::data_client::DataClient;
    use petrel_core::transport::proto::{FetchRequest, ProduceRequest, Record, Target};
    use petrel_tests::cluster::{Cluster, READY};

    /// The topic's partitions.
    const PARTITIONS: usize = 3;

    fn target(partition: u32) -> Option<Target> {
        Some(Target {
            kind: "topic".into(),
            name: "spread".into(),
            partition,
        })
    }

    /// The values of `partition` on the replica at `port`, once it has `want` of them.
    async fn values(port: u16, partition: u32, want: usize) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + READY;
        let mut client = DataClient::connect(format!("http://127.0.0.1:{port}")).await?;
        loop {
            let request = FetchRequest {
                target: target(partition),
                offset: 0,
                max_bytes: 1 << 20,
            };
            // Until the replica starts there, the node answers FAILED_PRECONDITION.
            if let Ok(fetched) = client.fetch(request).await {
                let values: Vec<String> = fetched
                    .into_inner()
                    .records
                    .iter()
                    .map(|r| String::from_utf8_lossy(&r.value).into_owned())
                    .collect();
                if values.len() >= want {
                    return Ok(values);
                }
            }
            ensure!(
                Instant::now() < deadline,
                "partition {partition} at {port} never held {want} records"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Writes one record at a time, round robin over the partitions, through `port` until
    /// `stop`; returns what was acknowledged, by partition.
    fn write_until(
        port: u16,
        stop: Arc<AtomicBool>,
        count: Arc<AtomicUsize>,
    ) -> std::thread::JoinHandle<anyhow::Result<Vec<Vec<String>>>> {
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new()?.block_on(async {
                let mut data = DataClient::connect(format!("http://127.0.0.1:{port}")).await?;
                let mut acked = vec![Vec::new(); PARTITIONS];
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let partition = i % PARTITIONS;
                    let value = format!("{partition}-load-{i}");
                    i += 1;
                    let request = ProduceRequest {
                        target: target(u32::try_from(partition)?),
                        records: vec![Record {
                            key: None,
                            value: value.clone().into(),
                        }],
                    };
                    // A refusal while a replica moves is not acknowledged: not counted.
                    if data.produce(request).await.is_ok() {
                        acked[partition].push(value);
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
                anyhow::Ok(acked)
            })
        })
    }

    /// The topic's placement as node `port` knows it.
    async fn placement(port: u16) -> anyhow::Result<Vec<Vec<u64>>> {
        let mut admin = AdminClient::connect(format!("http://127.0.0.1:{port}")).await?;
        let d = admin
            .get_destination(DestinationRef {
                kind: Kind::Topic.into(),
                name: "spread".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(d.partitions.into_iter().map(|p| p.replicas).collect())
    }

    #[test]
    fn a_node_added_to_a_running_cluster_takes_a_share_of_the_replicas_and_gives_them_back_drained()
    -> anyhow::Result<()> {
        let mut cluster = Cluster::start(3)?;
        let runtime = tokio::runtime::Runtime::new()?;
        let first = cluster.ports[0];
        let written = runtime.block_on(async {
            let spec = DestinationSpec {
                kind: Kind::Topic.into(),
                name: "spread".into(),
                partitions: 3,
                replication_factor: 3,
                ..DestinationSpec::default()
            };
            let mut admin = AdminClient::connect(format!("http://127.0.0.1:{first}")).await?;
            admin
                .create_destination(CreateDestinationRequest { spec: Some(spec) })
                .await?;
            let mut data = DataClient::connect(format!("http://127.0.0.1:{first}")).await?;
            let mut written = Vec::new();
            for partition in 0..3 {
                let values: Vec<String> = (0..10).map(|i| format!("{partition}-{i}")).collect();
                let records = values
                    .iter()
                    .map(|v| Record {
                        key: None,
                        value: v.clone().into(),
                    })
                    .collect();
                // The partition's leader may still be being elected: the node waits for it.
                data.produce(ProduceRequest {
                    target: target(partition),
                    records,
                })
                .await?;
                written.push(values);
            }
            anyhow::Ok(written)
        })?;

        // Node 4 joins through the others: 9 replicas over 4 nodes, so it takes 2.
        cluster.add_node()?;
        let added = cluster.ports[3];
        runtime.block_on(async {
            let mut admin = AdminClient::connect(format!("http://127.0.0.1:{added}")).await?;
            let status = admin
                .get_cluster_status(GetClusterStatusRequest {})
                .await?
                .into_inner();
            ensure!(status.nodes.len() == 4, "{status:?}");
            let deadline = Instant::now() + READY;
            let placed = loop {
                let on_new: Vec<u32> = placement(added)
                    .await?
                    .iter()
                    .zip(0..)
                    .filter(|(replicas, _)| replicas.contains(&4))
                    .map(|(_, number)| number)
                    .collect();
                if on_new.len() >= 2 {
                    break on_new;
                }
                ensure!(Instant::now() < deadline, "node 4 was given {on_new:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            for partition in placed {
                let expected = &written[usize::try_from(partition)?];
                let held = values(added, partition, expected.len()).await?;
                ensure!(
                    &held == expected,
                    "partition {partition} on node 4: {held:?}"
                );
            }
            anyhow::Ok(())
        })?;

        // Drained under write load, node 4 hands its replicas back to nodes that deleted
        // theirs when it took them: they are refilled, and nothing acknowledged is lost.
        let (stop, count) = (Arc::new(AtomicBool::new(false)), Arc::default());
        let writer = write_until(first, stop.clone(), Arc::clone(&count));
        acked_at_least(&count, 30)?;
        let drained = super::petrel(
            first,
            &["node", "decommission", "4", "--wait", "--timeout", "60"],
        )?;
        ensure!(drained.status.success(), "{}", super::text(&drained.stderr));
        acked_at_least(&count, count.load(Ordering::Relaxed) + 30)?;
        stop.store(true, Ordering::Relaxed);
        let acked = writer
            .join()
            .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
        let placed = runtime.block_on(placement(first))?;
        ensure!(
            placed.iter().all(|r| r.len() == 3 && !r.contains(&4)),
            "{placed:?}"
        );
        for (partition, replicas) in placed.iter().enumerate() {
            let mut expected = written[partition].clone();
            expected.extend(acked[partition].iter().cloned());
            for id in replicas {
                let port = cluster.ports[usize::try_from(id - 1)?];
                let number = u32::try_from(partition)?;
                let held = runtime.block_on(values(port, number, expected.len()))?;
                let mut held = held.iter();
                ensure!(
                    expected.iter().all(|a| held.any(|v| v == a)),
                    "node {id} lost acknowledged records of partition {partition} (or holds \
                     them out of order)"
                );
            }
        }
        Ok(())
    }
}
