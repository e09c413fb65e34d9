//! `petrel-bench cluster`: durable append throughput and latency of `petrel` processes on
//! loopback, replication factor 1 against 3 in the same run; CPU of idle partitions; and
//! the time a partition takes to fail over when its leader is killed.
//!
//! Producers append one record per request through the internal produce API and wait
//! for its commit (policy `always`) before the next one, each over its own connection
//! to the node leading its partition, as a client that knows the leaders would.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use hdrhistogram::Histogram;
use petrel_api::admin::v1::admin_client::AdminClient;
use petrel_api::admin::v1::{
    CreateDestinationRequest, Destination, DestinationRef, DestinationSpec, Durability, Kind,
};
use petrel_core::transport::proto::data_client::DataClient;
use petrel_core::transport::proto::{FetchRequest, ProduceRequest, Record, Target};
use petrel_tests::Signal;
use petrel_tests::cluster::Cluster;
use serde_json::json;
use tonic::transport::Channel;

use crate::stats;

#[derive(clap::Args)]
pub struct Args {
    /// Seconds each case runs.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Concurrent producers, comma-separated: each waits for its append to commit.
    #[arg(long, value_delimiter = ',', default_values_t = vec![16, 256])]
    producers: Vec<usize>,
    /// Partition counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 12])]
    partitions: Vec<u32>,
    /// Bytes per record.
    #[arg(long, default_value_t = 1024)]
    record_bytes: usize,
    /// Idle partitions (replication factor 3) whose CPU cost is measured (0 skips it).
    #[arg(long, default_value_t = 1000)]
    idle_partitions: u32,
    /// Seconds the idle CPU is measured for.
    #[arg(long, default_value_t = 10.0)]
    idle_seconds: f64,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

/// A cluster shape: how many nodes, and the replication factor of its topics.
#[derive(Clone, Copy)]
struct Shape {
    nodes: usize,
    replication_factor: u32,
}

/// The shapes compared: the same writes unreplicated and replicated three ways.
const SHAPES: [Shape; 3] = [
    Shape {
        nodes: 1,
        replication_factor: 1,
    },
    Shape {
        nodes: 3,
        replication_factor: 1,
    },
    Shape {
        nodes: 3,
        replication_factor: 3,
    },
];

struct Case {
    shape: Shape,
    partitions: u32,
    producers: usize,
    msgs_per_s: f64,
    mb_s: f64,
    p50: u64,
    p99: u64,
    p999: u64,
    errors: u64,
    /// CPU seconds of every node over the case.
    cpu_s: f64,
}

/// What the replicated cluster showed besides throughput.
#[derive(Default)]
struct Extras {
    /// CPU cores the nodes used together while `idle_partitions` sat idle.
    idle_cpu_cores: Option<f64>,
    failover_ms: f64,
    /// Records acknowledged around the failover and missing afterwards.
    failover_lost: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    ensure!(
        !args.producers.contains(&0),
        "--producers must be at least 1"
    );
    ensure!(
        !args.partitions.contains(&0),
        "--partitions must be at least 1"
    );
    let runtime = tokio::runtime::Runtime::new()?;
    let value = Bytes::from(vec![b'x'; args.record_bytes]);
    let mut cases = Vec::new();
    let mut extras = Extras::default();
    for shape in SHAPES {
        let mut cluster = Cluster::start_with(shape.nodes, ["--log-level", "warn"])
            .with_context(|| format!("starting {} nodes", shape.nodes))?;
        for &partitions in &args.partitions {
            let topic = format!("bench-{partitions}");
            runtime.block_on(create(
                cluster.ports[0],
                &topic,
                partitions,
                shape.replication_factor,
            ))?;
            for &producers in &args.producers {
                let case = runtime.block_on(throughput(
                    &cluster, shape, &topic, partitions, producers, &args, &value,
                ))?;
                print_case(&case);
                cases.push(case);
            }
        }
        if shape.replication_factor == 3 {
            if args.idle_partitions > 0 {
                let cores = runtime.block_on(idle_cpu(&cluster, &args))?;
                eprintln!(
                    "idle: {} partitions (replication factor 3) on 3 nodes use {cores:.3} cores",
                    args.idle_partitions
                );
                extras.idle_cpu_cores = Some(cores);
            }
            let (ms, lost) = failover(&mut cluster, &runtime)?;
            eprintln!(
                "failover: a killed leader's partition took writes again after {ms:.0} ms; {lost} acknowledged records lost"
            );
            extras.failover_ms = ms;
            extras.failover_lost = lost;
        }
    }
    report(&cases, &extras, &args);
    Ok(())
}

fn print_case(case: &Case) {
    eprintln!(
        "nodes {} rf {} partitions {:>3} producers {:>3}: {:>8.0} msgs/s {:>6.1} MB/s p50 {} µs p99 {} µs p99.9 {} µs, cpu {:.1} s, errors {}",
        case.shape.nodes,
        case.shape.replication_factor,
        case.partitions,
        case.producers,
        case.msgs_per_s,
        case.mb_s,
        case.p50,
        case.p99,
        case.p999,
        case.cpu_s,
        case.errors
    );
}

/// Throughput against replication factor 1 on one node with as many partitions and
/// producers.
fn ratio_to_single(cases: &[Case], case: &Case) -> Option<f64> {
    let single = cases.iter().find(|c| {
        c.shape.nodes == 1 && c.partitions == case.partitions && c.producers == case.producers
    })?;
    Some(case.msgs_per_s / single.msgs_per_s)
}

/// The most a shape took over the producer counts tried: its throughput at saturation.
fn peak(cases: &[Case], nodes: usize, replication_factor: u32, partitions: u32) -> Option<f64> {
    cases
        .iter()
        .filter(|c| {
            c.shape.nodes == nodes
                && c.shape.replication_factor == replication_factor
                && c.partitions == partitions
        })
        .map(|c| c.msgs_per_s)
        .reduce(f64::max)
}

/// One partition count's peak throughput in each shape.
struct Peak {
    partitions: u32,
    rf1_one_node: f64,
    rf1_three_nodes: f64,
    rf3: f64,
}

impl Peak {
    /// Replication factor 3 against 1 on the same 3 nodes.
    fn vs_three_nodes(&self) -> f64 {
        self.rf3 / self.rf1_three_nodes
    }

    /// Replication factor 3 against 1 on one node.
    fn vs_one_node(&self) -> f64 {
        self.rf3 / self.rf1_one_node
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "partitions": self.partitions,
            "rf1_1_node_msgs_per_s": self.rf1_one_node,
            "rf1_3_nodes_msgs_per_s": self.rf1_three_nodes,
            "rf3_3_nodes_msgs_per_s": self.rf3,
            "rf3_vs_rf1_3_nodes": self.vs_three_nodes(),
            "rf3_vs_rf1_1_node": self.vs_one_node(),
        })
    }
}

/// Per partition count, the peak of each shape.
fn peaks(cases: &[Case], args: &Args) -> Vec<Peak> {
    args.partitions
        .iter()
        .filter_map(|&partitions| {
            Some(Peak {
                partitions,
                rf1_one_node: peak(cases, 1, 1, partitions)?,
                rf1_three_nodes: peak(cases, 3, 1, partitions)?,
                rf3: peak(cases, 3, 3, partitions)?,
            })
        })
        .collect()
}

fn report(cases: &[Case], extras: &Extras, args: &Args) {
    println!(
        "{:>5} {:>3} {:>10} {:>9} {:>10} {:>8} {:>8} {:>8} {:>9} {:>7} {:>6} {:>9}",
        "nodes",
        "rf",
        "partitions",
        "producers",
        "msgs/s",
        "MB/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "CPU s",
        "errors",
        "vs 1 node"
    );
    for c in cases {
        println!(
            "{:>5} {:>3} {:>10} {:>9} {:>10.0} {:>8.1} {:>8} {:>8} {:>9} {:>7.1} {:>6} {:>9.2}",
            c.shape.nodes,
            c.shape.replication_factor,
            c.partitions,
            c.producers,
            c.msgs_per_s,
            c.mb_s,
            c.p50,
            c.p99,
            c.p999,
            c.cpu_s,
            c.errors,
            ratio_to_single(cases, c).unwrap_or(f64::NAN)
        );
    }
    let peaks = peaks(cases, args);
    for p in &peaks {
        println!(
            "peak of {:?} producers, {} partitions: rf1 {:.0} msgs/s on 1 node, {:.0} on 3 nodes; rf3 {:.0}, {:.2} of rf1 on 3 nodes, {:.2} of rf1 on 1 node",
            args.producers,
            p.partitions,
            p.rf1_one_node,
            p.rf1_three_nodes,
            p.rf3,
            p.vs_three_nodes(),
            p.vs_one_node(),
        );
    }
    if let Some(cores) = extras.idle_cpu_cores {
        println!(
            "idle: {} partitions, replication factor 3, on 3 nodes: {cores:.3} CPU cores",
            args.idle_partitions
        );
    }
    println!(
        "failover: {:.0} ms from kill -9 of the leader to the next acknowledged write; {} acknowledged records lost",
        extras.failover_ms, extras.failover_lost
    );
    if args.json {
        let results: Vec<_> = cases
            .iter()
            .map(|c| {
                json!({
                    "replication_factor": c.shape.replication_factor,
                    "partitions": c.partitions,
                    "nodes": c.shape.nodes,
                    "producers": c.producers,
                    "msgs_per_s": c.msgs_per_s,
                    "mb_s": c.mb_s,
                    "p50_us": c.p50,
                    "p99_us": c.p99,
                    "p999_us": c.p999,
                    "errors": c.errors,
                    "cpu_s": c.cpu_s,
                    "ratio_to_one_node": ratio_to_single(cases, c),
                })
            })
            .collect();
        println!(
            "{}",
            json!({
                "record_bytes": args.record_bytes,
                "seconds": args.seconds,
                "results": results,
                "peaks": peaks.iter().map(Peak::json).collect::<Vec<_>>(),
                "idle_partitions": args.idle_partitions,
                "idle_cpu_cores": extras.idle_cpu_cores,
                "failover_ms": extras.failover_ms,
                "failover_lost": extras.failover_lost,
            })
        );
    }
}

fn target(topic: &str, partition: u32) -> Option<Target> {
    Some(Target {
        kind: "topic".into(),
        name: topic.into(),
        partition,
    })
}

async fn admin(port: u16) -> anyhow::Result<AdminClient<Channel>> {
    Ok(AdminClient::connect(format!("http://127.0.0.1:{port}")).await?)
}

async fn data(port: u16) -> anyhow::Result<DataClient<Channel>> {
    Ok(DataClient::connect(format!("http://127.0.0.1:{port}")).await?)
}

/// Creates a topic, durable on every append.
async fn create(port: u16, name: &str, partitions: u32, rf: u32) -> anyhow::Result<()> {
    let spec = DestinationSpec {
        kind: Kind::Topic.into(),
        name: name.into(),
        partitions,
        replication_factor: rf,
        durability: Durability::Always.into(),
        ..DestinationSpec::default()
    };
    admin(port)
        .await?
        .create_destination(CreateDestinationRequest { spec: Some(spec) })
        .await?;
    Ok(())
}

/// The leader of every partition of `topic` (by number), once each has one; a node
/// answers for the partitions it holds, so every node is asked.
async fn leaders(
    ports: &[u16],
    topic: &str,
    within: Duration,
) -> anyhow::Result<BTreeMap<u32, u64>> {
    let deadline = Instant::now() + within;
    let mut clients = Vec::new();
    for port in ports {
        clients.push(admin(*port).await?);
    }
    loop {
        let mut found = BTreeMap::new();
        let mut total = 0;
        for client in &mut clients {
            let d: Destination = match client
                .get_destination(DestinationRef {
                    kind: Kind::Topic.into(),
                    name: topic.into(),
                    ..Default::default()
                })
                .await
            {
                Ok(d) => d.into_inner(),
                // A node that has not applied the creation yet.
                Err(s) if s.code() == tonic::Code::NotFound => continue,
                Err(s) => return Err(s.into()),
            };
            total = d.partitions.len();
            for p in d.partitions {
                if let Some(l) = p.leader {
                    found.insert(p.number, l);
                }
            }
        }
        if total > 0 && found.len() == total {
            return Ok(found);
        }
        ensure!(
            Instant::now() < deadline,
            "{topic}: {} of {total} partitions have a leader after {within:?}",
            found.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn cpu_seconds(cluster: &Cluster) -> anyhow::Result<f64> {
    cluster.nodes.iter().map(|n| n.cpu_seconds()).sum()
}

/// One case: `producers` spread over the `partitions` of `topic` for `args.seconds`.
async fn throughput(
    cluster: &Cluster,
    shape: Shape,
    topic: &str,
    partitions: u32,
    producers: usize,
    args: &Args,
    value: &Bytes,
) -> anyhow::Result<Case> {
    let leaders = leaders(&cluster.ports, topic, Duration::from_secs(60)).await?;
    let mut clients = Vec::new();
    for i in 0..producers {
        let partition = u32::try_from(i)? % partitions;
        let leader = leaders[&partition];
        let port = cluster.ports[usize::try_from(leader)? - 1];
        clients.push((partition, data(port).await?));
    }
    // A moment of load first, so the case measures a warm cluster.
    let warm = Duration::from_secs_f64((args.seconds / 5.0).min(1.0));
    drive(topic, &mut clients, value, warm).await?;
    let cpu = cpu_seconds(cluster)?;
    let run = Duration::from_secs_f64(args.seconds);
    let (count, errors, latency) = drive(topic, &mut clients, value, run).await?;
    let cpu_s = cpu_seconds(cluster)? - cpu;
    let (p50, p99, p999) = stats::percentiles(&latency);
    let msgs_per_s = count as f64 / run.as_secs_f64();
    Ok(Case {
        shape,
        partitions,
        producers,
        msgs_per_s,
        mb_s: msgs_per_s * args.record_bytes as f64 / 1e6,
        p50,
        p99,
        p999,
        errors,
        cpu_s,
    })
}

/// Every client produces one record at a time for `run`; returns the appends
/// acknowledged, the errors, and the latency of the acknowledged ones.
async fn drive(
    topic: &str,
    clients: &mut [(u32, DataClient<Channel>)],
    value: &Bytes,
    run: Duration,
) -> anyhow::Result<(u64, u64, Histogram<u64>)> {
    let until = Instant::now() + run;
    let mut tasks = Vec::new();
    for (partition, client) in clients.iter() {
        let (mut client, partition) = (client.clone(), *partition);
        let (topic, value) = (topic.to_owned(), value.clone());
        tasks.push(tokio::spawn(async move {
            let mut latency = stats::histogram()?;
            let (mut count, mut errors) = (0u64, 0u64);
            while Instant::now() < until {
                let request = ProduceRequest {
                    target: target(&topic, partition),
                    records: vec![Record {
                        key: None,
                        value: value.clone(),
                    }],
                };
                let started = Instant::now();
                match client.produce(request).await {
                    Ok(_) => {
                        count += 1;
                        latency.record(started.elapsed().as_micros().try_into()?)?;
                    }
                    Err(_) => errors += 1,
                }
            }
            anyhow::Ok((count, errors, latency))
        }));
    }
    let mut total = (0, 0, stats::histogram()?);
    for task in tasks {
        let (count, errors, latency) = task.await??;
        total.0 += count;
        total.1 += errors;
        total.2.add(&latency)?;
    }
    Ok(total)
}

/// CPU cores the nodes use while `args.idle_partitions` partitions (replication factor
/// 3) have leaders and no traffic.
async fn idle_cpu(cluster: &Cluster, args: &Args) -> anyhow::Result<f64> {
    create(cluster.ports[0], "idle", args.idle_partitions, 3).await?;
    leaders(&cluster.ports, "idle", Duration::from_secs(300)).await?;
    let cpu = cpu_seconds(cluster)?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.idle_seconds)).await;
    Ok((cpu_seconds(cluster)? - cpu) / started.elapsed().as_secs_f64())
}

/// Kills the leader of a one-partition topic under writes; returns the milliseconds
/// until a write through a survivor is acknowledged, and how many acknowledged records
/// the survivors miss.
fn failover(
    cluster: &mut Cluster,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<(f64, usize)> {
    let ports = cluster.ports.clone();
    let (leader, survivor, mut acked) = runtime.block_on(async {
        create(ports[0], "failover", 1, 3).await?;
        let leader = leaders(&ports, "failover", Duration::from_secs(30)).await?[&0];
        let survivor = ports[usize::try_from(leader % 3)?];
        let acked = produce_numbered(survivor, 0, 100).await?;
        anyhow::Ok((leader, survivor, acked))
    })?;
    cluster.nodes[usize::try_from(leader - 1)?].signal(Signal::Kill)?;
    let killed = Instant::now();
    let first = acked.len();
    acked.extend(runtime.block_on(produce_numbered(survivor, first, 1))?);
    let ms = killed.elapsed().as_secs_f64() * 1e3;
    let next = acked.len();
    acked.extend(runtime.block_on(produce_numbered(survivor, next, 100))?);
    let lost = runtime.block_on(missing(survivor, &acked))?;
    Ok((ms, lost))
}

/// Appends `n` records numbered from `from` to the failover topic through `port`, one
/// at a time; returns them once all are acknowledged.
async fn produce_numbered(port: u16, from: usize, n: usize) -> anyhow::Result<Vec<Bytes>> {
    let mut client = data(port).await?;
    let mut acked = Vec::new();
    for i in from..from + n {
        let value = Bytes::from(i.to_string());
        let request = ProduceRequest {
            target: target("failover", 0),
            records: vec![Record {
                key: None,
                value: value.clone(),
            }],
        };
        // The first write after a kill waits inside the node for the new leader.
        if let Err(e) = client.produce(request).await {
            bail!("record {i} refused: {e}");
        }
        acked.push(value);
    }
    Ok(acked)
}

/// How many of `acked` the replica at `port` lacks, once it has them all or (if it
/// never does) after 10 s: a follower applies the last commits a moment after the leader.
async fn missing(port: u16, acked: &[Bytes]) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = data(port).await?;
    let mut held = std::collections::HashSet::new();
    let mut offset = 0;
    loop {
        let fetched = client
            .fetch(FetchRequest {
                target: target("failover", 0),
                offset,
                max_bytes: 1 << 20,
            })
            .await?
            .into_inner();
        if let Some(last) = fetched.records.last() {
            offset = last.offset + 1;
            held.extend(fetched.records.into_iter().map(|r| r.value));
            continue;
        }
        let lost = acked.iter().filter(|v| !held.contains(*v)).count();
        if lost == 0 || Instant::now() >= deadline {
            return Ok(lost);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
