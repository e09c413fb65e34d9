//! `/metrics` of `petrel serve` after real AMQP traffic (lapin): the message counters,
//! connections, per-queue gauges (exported by the queue's leader only, gone with the
//! queue), partition and resource gauges, on one node and in a 3-node cluster.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use petrel_api::admin::v1::admin_client::AdminClient;
use petrel_api::admin::v1::{DestinationRef, Kind};
use petrel_tests::amqp::{
    channel, confirming_channel, declare_durable as declare, publish_confirmed,
};
use petrel_tests::cluster::Cluster;
use petrel_tests::{PetrelProcess, Serve, Signal};

const READY: Duration = Duration::from_secs(30);
/// How long the metrics may take to show what was done (gauges refresh every 2 s).
const SETTLE: Duration = Duration::from_secs(10);

/// One sample of a scrape: metric name, labels (sorted), value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Every sample of a node's `/metrics`.
fn scrape(node: &PetrelProcess) -> anyhow::Result<Vec<Sample>> {
    let body = tokio::task::block_in_place(|| node.get("/metrics"))?.body;
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(parse)
        .collect()
}

/// `name{a="x",b="y"} value` (label values here hold no quotes or commas).
fn parse(line: &str) -> anyhow::Result<Sample> {
    let (series, value) = line.rsplit_once(' ').context(line.to_owned())?;
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, rest.trim_end_matches('}')),
        None => (series, ""),
    };
    let mut labels: Vec<(String, String)> = labels
        .split(',')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once('=').context(l.to_owned())?;
            Ok((k.to_owned(), v.trim_matches('"').to_owned()))
        })
        .collect::<anyhow::Result<_>>()?;
    labels.sort();
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value: value.parse().context(line.to_owned())?,
    })
}

/// The value of `name` with exactly `labels`, if the scrape has it.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    want.sort();
    samples
        .iter()
        .find(|s| s.name == name && s.labels == want)
        .map(|s| s.value)
}

/// The per-queue gauges.
const QUEUE_GAUGES: [&str; 3] = [
    "petrel_queue_messages_ready",
    "petrel_queue_messages_unacked",
    "petrel_queue_consumers",
];

/// The queues of the cluster test.
const SPREAD: [&str; 3] = ["spread-a", "spread-b", "spread-c"];

/// The value of per-queue `gauge` for `queue` in vhost `/`.
fn queue_value(samples: &[Sample], gauge: &str, queue: &str) -> Option<f64> {
    value(samples, gauge, &[("vhost", "/"), ("queue", queue)])
}

/// Waits until `check` holds on the scrapes of `nodes`; on timeout, fails with what it
/// last said was wrong and the last scrapes.
async fn eventually(
    nodes: &[&PetrelProcess],
    what: &str,
    check: impl Fn(&[Vec<Sample>]) -> Result<(), String>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let scrapes = nodes
            .iter()
            .map(|n| scrape(n))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let last = match check(&scrapes) {
            Ok(()) => return Ok(()),
            Err(last) => last,
        };
        if Instant::now() >= deadline {
            let shown: Vec<String> = scrapes
                .iter()
                .map(|s| {
                    s.iter()
                        .map(|x| format!("{} {:?} {}", x.name, x.labels, x.value))
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .collect();
            bail!(
                "{what}: not so within {SETTLE:?}: {last}\n{}",
                shown.join("\n---\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A metric's name, labels and the value it should have.
type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// Each of `expected` is on the scrape with its value.
fn exactly(samples: &[Sample], expected: &[Expected<'_>]) -> Result<(), String> {
    for (name, labels, want) in expected {
        let got = value(samples, name, labels);
        if got != Some(*want) {
            return Err(format!("{name}{labels:?} is {got:?}, not {want}"));
        }
    }
    Ok(())
}

fn petrel() -> anyhow::Result<PetrelProcess> {
    let mut p = Serve::new()?.start()?;
    p.wait_ready(READY)?;
    Ok(p)
}

/// The consumer's next delivery.
async fn next(deliveries: &mut lapin::Consumer) -> anyhow::Result<lapin::message::Delivery> {
    let delivery = tokio::time::timeout(SETTLE, deliveries.next())
        .await
        .context("no delivery in time")?
        .context("the consumer ended")??;
    Ok(delivery)
}

/// The leader of each of `queues` as the admin API of the node at internal `port`
/// knows it (0 if none yet).
async fn leaders(port: u16, queues: &[&str]) -> anyhow::Result<Vec<u64>> {
    let mut client = AdminClient::connect(format!("http://127.0.0.1:{port}")).await?;
    let mut leaders = Vec::new();
    for queue in queues {
        let d = client
            .get_destination(DestinationRef {
                kind: Kind::Queue.into(),
                name: (*queue).into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        leaders.push(d.partitions.first().and_then(|p| p.leader).unwrap_or(0));
    }
    Ok(leaders)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_deliveries_acks_connections_and_queue_counts_show_on_metrics()
-> anyhow::Result<()> {
    const N: u8 = 10;
    let node = petrel()?;
    let (_publisher, ch) = confirming_channel(&node.amqp_url()).await?;
    declare(&ch, "metered", FieldTable::default()).await?;
    for i in 0..N {
        let acked = publish_confirmed(&ch, "", "metered", &[i], BasicProperties::default()).await?;
        ensure!(acked, "publish {i} was nacked");
    }

    // basic.get: one acked, one nacked with requeue (delivered again, redelivered).
    let got = ch
        .basic_get("metered".into(), BasicGetOptions::default())
        .await?
        .context("a first message")?;
    got.delivery.ack(BasicAckOptions::default()).await?;
    let got = ch
        .basic_get("metered".into(), BasicGetOptions::default())
        .await?
        .context("a second message")?;
    got.delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
        .await?;

    // A consumer with prefetch 2: its first two (the requeued one first) acked with one
    // multiple ack, then it holds the next two unacked.
    let (_consumer_conn, consumer) = channel(&node.amqp_url()).await?;
    consumer.basic_qos(2, BasicQosOptions::default()).await?;
    let mut deliveries = consumer
        .basic_consume(
            "metered".into(),
            "meter".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let first = next(&mut deliveries).await?;
    ensure!(
        first.redelivered,
        "the requeued message comes first, redelivered"
    );
    let second = next(&mut deliveries).await?;
    second.ack(BasicAckOptions { multiple: true }).await?;
    let _held = (next(&mut deliveries).await?, next(&mut deliveries).await?);

    // Delivered: 2 gets + 4 to the consumer; acked: 1 + 2; 2 held; 10 - 3 - 2 ready.
    let n = f64::from(N);
    eventually(&[&node], "counts after traffic", |s| {
        let s = &s[0];
        exactly(
            s,
            &[
                ("petrel_messages_published_total", &[], n),
                ("petrel_messages_confirmed_total", &[], n),
                ("petrel_messages_refused_total", &[], 0.0),
                ("petrel_messages_delivered_total", &[], 6.0),
                ("petrel_messages_acknowledged_total", &[], 3.0),
                ("petrel_amqp_connections", &[], 2.0),
                ("petrel_amqp_connections_opened_total", &[], 2.0),
                ("petrel_partitions_under_replicated", &[], 0.0),
                ("petrel_resource_alarm", &[("resource", "disk")], 0.0),
                ("petrel_resource_alarm", &[("resource", "memory")], 0.0),
            ],
        )?;
        for (gauge, want) in QUEUE_GAUGES.iter().zip([5.0, 2.0, 1.0]) {
            let got = queue_value(s, gauge, "metered");
            if got != Some(want) {
                return Err(format!("{gauge} of metered is {got:?}, not {want}"));
            }
        }
        let at_least_one = |name: &str, min: f64| match value(s, name, &[]) {
            Some(v) if v >= min => Ok(()),
            other => Err(format!("{name} is {other:?}, not at least {min}")),
        };
        at_least_one("petrel_messages_redelivered_total", 1.0)?;
        at_least_one("petrel_partitions_led", 1.0)?;
        at_least_one("petrel_partition_replicas", 1.0)?;
        match value(s, "petrel_disk_free_bytes", &[]) {
            Some(v) if v > 0.0 => Ok(()),
            other => Err(format!("petrel_disk_free_bytes is {other:?}")),
        }
    })
    .await?;

    // A third connection counts while it is open, and no longer once it closed.
    let (third, _) = channel(&node.amqp_url()).await?;
    eventually(&[&node], "a third connection", |s| {
        exactly(
            &s[0],
            &[
                ("petrel_amqp_connections", &[], 3.0),
                ("petrel_amqp_connections_opened_total", &[], 3.0),
            ],
        )
    })
    .await?;
    third.close(200, "bye".into()).await?;
    eventually(&[&node], "the third connection closed", |s| {
        exactly(
            &s[0],
            &[
                ("petrel_amqp_connections", &[], 2.0),
                ("petrel_amqp_connections_opened_total", &[], 3.0),
            ],
        )
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_publish_is_counted_and_a_deleted_queue_leaves_no_series() -> anyhow::Result<()> {
    let node = petrel()?;
    let (_conn, ch) = confirming_channel(&node.amqp_url()).await?;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    declare(&ch, "bounded", args).await?;
    ensure!(publish_confirmed(&ch, "", "bounded", b"kept", BasicProperties::default()).await?);
    ensure!(
        !publish_confirmed(&ch, "", "bounded", b"refused", BasicProperties::default()).await?,
        "a publish to a full queue was acked"
    );
    eventually(&[&node], "one confirmed, one refused", |s| {
        let s = &s[0];
        exactly(
            s,
            &[
                ("petrel_messages_published_total", &[], 2.0),
                ("petrel_messages_confirmed_total", &[], 1.0),
                ("petrel_messages_refused_total", &[], 1.0),
            ],
        )?;
        match queue_value(s, "petrel_queue_messages_ready", "bounded") {
            Some(1.0) => Ok(()),
            other => Err(format!("ready of bounded is {other:?}, not 1")),
        }
    })
    .await?;

    ch.queue_delete("bounded".into(), QueueDeleteOptions::default())
        .await?;
    eventually(
        &[&node],
        "no series of the deleted queue",
        |s| match QUEUE_GAUGES
            .iter()
            .find(|g| queue_value(&s[0], g, "bounded").is_some())
        {
            Some(gauge) => Err(format!("{gauge} of bounded is still exported")),
            None => Ok(()),
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_each_queue_is_exported_by_its_leader_only_and_partitions_add_up()
-> anyhow::Result<()> {
    let cluster = Cluster::start(3)?;
    let (_conn, ch) = confirming_channel(&cluster.nodes[0].amqp_url()).await?;
    for queue in SPREAD {
        declare(&ch, queue, FieldTable::default()).await?;
        ensure!(publish_confirmed(&ch, "", queue, b"m", BasicProperties::default()).await?);
    }
    let nodes: Vec<&PetrelProcess> = cluster.nodes.iter().collect();
    let deadline = Instant::now() + SETTLE;
    loop {
        let leaders = leaders(cluster.ports[0], &SPREAD).await?;
        let scrapes = nodes
            .iter()
            .map(|n| scrape(n))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let last = match spread(&scrapes, &leaders) {
            Ok(()) => break,
            Err(last) => last,
        };
        ensure!(
            Instant::now() < deadline,
            "queues on their leaders, partitions added up: not so within {SETTLE:?}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A node gone: every partition (each has a voter there) is under-replicated, as
    // the survivors that lead them now see it.
    cluster.nodes[2].signal(Signal::Kill)?;
    eventually(&nodes[..2], "partitions under-replicated", |scrapes| {
        let sum = |name: &str| -> f64 {
            scrapes
                .iter()
                .filter_map(|s| value(s, name, &[]))
                .sum::<f64>()
        };
        let (led, under) = (
            sum("petrel_partitions_led"),
            sum("petrel_partitions_under_replicated"),
        );
        let n = SPREAD.len() as f64;
        if (led, under) == (n, n) {
            Ok(())
        } else {
            Err(format!(
                "{led} led and {under} under-replicated, not {n} and {n}"
            ))
        }
    })
    .await
}

/// Each queue of [`SPREAD`] is exported by its leader (of `leaders`, node ids) only,
/// with one message ready; the partitions led add up to one per queue, the replicas to
/// three per queue, and none is under-replicated.
fn spread(scrapes: &[Vec<Sample>], leaders: &[u64]) -> Result<(), String> {
    let sum = |name: &str| -> f64 {
        scrapes
            .iter()
            .filter_map(|s| value(s, name, &[]))
            .sum::<f64>()
    };
    for (queue, leader) in SPREAD.iter().zip(leaders) {
        let exporting: Vec<u64> = (1..)
            .zip(scrapes)
            .filter(|(_, s)| queue_value(s, "petrel_queue_messages_ready", queue).is_some())
            .map(|(id, _)| id)
            .collect();
        if exporting != [*leader] {
            return Err(format!(
                "{queue} is exported by nodes {exporting:?}; its leader is {leader}"
            ));
        }
        let s = &scrapes[usize::try_from(*leader - 1).map_err(|e| e.to_string())?];
        let gauges = QUEUE_GAUGES.map(|g| queue_value(s, g, queue));
        if gauges != [Some(1.0), Some(0.0), Some(0.0)] {
            return Err(format!("{queue}'s gauges on its leader are {gauges:?}"));
        }
    }
    let led = sum("petrel_partitions_led");
    if led != SPREAD.len() as f64 {
        return Err(format!("{led} partitions led, not {}", SPREAD.len()));
    }
    // A declared queue is replicated on three nodes (of three).
    let replicas = sum("petrel_partition_replicas");
    if replicas != 3.0 * SPREAD.len() as f64 {
        return Err(format!("{replicas} replicas, not {}", 3 * SPREAD.len()));
    }
    match sum("petrel_partitions_under_replicated") {
        0.0 => Ok(()),
        n => Err(format!("{n} partitions under-replicated")),
    }
}
