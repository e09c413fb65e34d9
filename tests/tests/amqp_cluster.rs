//! AMQP in a 3-node cluster: a client may use any node, and neither the queue leader's
//! crash nor a move of its leadership loses a confirmed message or delivers one twice to
//! a consumer that acks.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use petrel_api::admin::v1::admin_client::AdminClient;
use petrel_api::admin::v1::{DestinationRef, Kind, TransferLeadershipRequest};
use petrel_tests::Signal;
use petrel_tests::cluster::Cluster;

const TIMEOUT: Duration = Duration::from_secs(30);

async fn channel(url: &str) -> anyhow::Result<(Connection, Channel)> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    Ok((conn, channel))
}

/// The queue's leader as node `port` (internal) knows it, once it knows one other than `not`.
async fn leader(port: u16, queue: &str, not: Option<u64>) -> anyhow::Result<u64> {
    let deadline = Instant::now() + TIMEOUT;
    let mut client = AdminClient::connect(format!("http://127.0.0.1:{port}")).await?;
    loop {
        let d = client
            .get_destination(DestinationRef {
                kind: Kind::Queue.into(),
                name: queue.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        if let Some(l) = d.partitions.first().and_then(|p| p.leader)
            && Some(l) != not
        {
            return Ok(l);
        }
        ensure!(
            Instant::now() < deadline,
            "no leader for {queue} within {TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_on_another_node_gets_every_confirmed_message_once_across_a_leader_crash()
-> anyhow::Result<()> {
    const N: u32 = 2000;
    let mut cluster = Cluster::start(3)?;
    let url = |cluster: &Cluster, i: usize| cluster.nodes[i].amqp_url();
    let (_c, setup) = channel(&url(&cluster, 0)).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    setup
        .queue_declare("ha".into(), durable, FieldTable::default())
        .await?;
    let leader = leader(cluster.ports[0], "ha", None).await?;
    // Publisher and consumer on the two other nodes.
    let others: Vec<usize> = (0..3).filter(|i| *i as u64 + 1 != leader).collect();
    let (publisher_conn, publisher) = channel(&url(&cluster, others[0])).await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut confirms = Vec::new();
    for i in 0..N {
        confirms.push(
            publisher
                .basic_publish(
                    "".into(),
                    "ha".into(),
                    BasicPublishOptions::default(),
                    &i.to_be_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?,
        );
    }
    for c in confirms {
        ensure!(
            matches!(c.await?, Confirmation::Ack(_)),
            "a publish was nacked"
        );
    }
    publisher_conn.close(200, "done".into()).await?;

    let (_conn, consumer_ch) = channel(&url(&cluster, others[1])).await?;
    consumer_ch
        .basic_qos(50, BasicQosOptions::default())
        .await?;
    let mut consumer = consumer_ch
        .basic_consume(
            "ha".into(),
            "survivor".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut seen = HashSet::new();
    let mut killed = false;
    while seen.len() < N as usize {
        let delivery = tokio::time::timeout(TIMEOUT, consumer.next())
            .await
            .with_context(|| {
                let logs: Vec<String> = cluster.nodes.iter().map(|n| n.stdout()).collect();
                format!(
                    "no delivery within {TIMEOUT:?} after {}\n{}",
                    seen.len(),
                    logs.join("\n=====\n")
                )
            })?
            .context("the consumer was cancelled")??;
        let i = u32::from_be_bytes(delivery.data[..4].try_into()?);
        ensure!(
            seen.insert(i),
            "message {i} delivered twice (after {} distinct)",
            seen.len()
        );
        delivery.ack(BasicAckOptions::default()).await?;
        if !killed && seen.len() == N as usize / 2 {
            cluster.nodes[leader as usize - 1].signal(Signal::Kill)?;
            killed = true;
        }
    }
    ensure!(killed);
    // Nothing is left, and nothing more comes.
    let extra = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await;
    ensure!(extra.is_err(), "a delivery after all {N}: {extra:?}");
    let _ = cluster.restart(leader as usize - 1, false)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_on_the_leaders_node_goes_on_unaware_when_the_leadership_moves()
-> anyhow::Result<()> {
    const N: u32 = 1000;
    let cluster = Cluster::start(3)?;
    let (_c, setup) = channel(&cluster.nodes[0].amqp_url()).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    setup
        .queue_declare("moving".into(), durable, FieldTable::default())
        .await?;
    let first = leader(cluster.ports[0], "moving", None).await?;
    let on_leader = cluster.nodes[first as usize - 1].amqp_url();
    let (_p, publisher) = channel(&on_leader).await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for i in 0..N {
        let confirm = publisher
            .basic_publish(
                "".into(),
                "moving".into(),
                BasicPublishOptions::default(),
                &i.to_be_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        if i == N - 1 {
            ensure!(matches!(confirm.await?, Confirmation::Ack(_)), "nacked");
        }
    }

    // The consumer is on the leader's own node: the leadership goes elsewhere mid-stream,
    // with 50 deliveries unacked, and it hears nothing of it (no basic.cancel).
    let (_conn, consumer_ch) = channel(&on_leader).await?;
    consumer_ch
        .basic_qos(50, BasicQosOptions::default())
        .await?;
    let mut consumer = consumer_ch
        .basic_consume(
            "moving".into(),
            "stays".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let to = (1..=3u64).find(|n| *n != first).context("another node")?;
    let mut seen = HashSet::new();
    let mut moved = false;
    while seen.len() < N as usize {
        let delivery = tokio::time::timeout(TIMEOUT, consumer.next())
            .await
            .with_context(|| format!("no delivery within {TIMEOUT:?} after {}", seen.len()))?
            .context("the consumer was cancelled")??;
        let i = u32::from_be_bytes(delivery.data[..4].try_into()?);
        if !seen.insert(i) {
            let logs: Vec<String> = cluster.nodes.iter().map(|n| n.stdout()).collect();
            anyhow::bail!(
                "message {i} delivered twice (after {} distinct)\n{}",
                seen.len(),
                logs.join("\n=====\n")
            );
        }
        delivery.ack(BasicAckOptions::default()).await?;
        if !moved && seen.len() == N as usize / 2 {
            let mut admin =
                AdminClient::connect(format!("http://127.0.0.1:{}", cluster.ports[0])).await?;
            admin
                .transfer_leadership(TransferLeadershipRequest {
                    destination: Some(DestinationRef {
                        kind: Kind::Queue.into(),
                        name: "moving".into(),
                        ..Default::default()
                    }),
                    partition: 0,
                    to_node: to,
                })
                .await?;
            moved = true;
        }
    }
    ensure!(moved);
    ensure!(
        leader(cluster.ports[0], "moving", Some(first)).await? == to,
        "the leadership moved"
    );
    let extra = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await;
    ensure!(extra.is_err(), "a delivery after all {N}: {extra:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_read_on_a_node_that_holds_no_replica_of_it() -> anyhow::Result<()> {
    use lapin::types::AMQPValue;

    const N: u32 = 200;
    // Four nodes: the stream has three replicas, so one node holds none.
    let cluster = Cluster::start(4)?;
    let (_c, setup) = channel(&cluster.nodes[0].amqp_url()).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    setup.queue_declare("events".into(), durable, args).await?;
    let mut admin = AdminClient::connect(format!("http://127.0.0.1:{}", cluster.ports[0])).await?;
    let placed = admin
        .get_destination(DestinationRef {
            kind: Kind::Queue.into(),
            name: "events".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let replicas = placed
        .partitions
        .first()
        .map(|p| p.replicas.clone())
        .unwrap_or_default();
    ensure!(replicas.len() == 3, "replicas: {replicas:?}");
    let outside = (1..=4u64)
        .find(|n| !replicas.contains(n))
        .context("a node without a replica")?;
    let url = cluster.nodes[outside as usize - 1].amqp_url();

    let (_p, publisher) = channel(&url).await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let publish = |i: u32| {
        let publisher = publisher.clone();
        async move {
            let confirm = publisher
                .basic_publish(
                    "".into(),
                    "events".into(),
                    BasicPublishOptions::default(),
                    &i.to_be_bytes(),
                    BasicProperties::default(),
                )
                .await?
                .await?;
            ensure!(matches!(confirm, Confirmation::Ack(_)), "nacked");
            anyhow::Ok(())
        }
    };
    for i in 0..N {
        publish(i).await?;
    }
    let (_r, reader) = channel(&url).await?;
    reader.basic_qos(20, BasicQosOptions::default()).await?;
    let mut offset = FieldTable::default();
    offset.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString("first".into()),
    );
    let mut consumer = reader
        .basic_consume(
            "events".into(),
            "outside".into(),
            BasicConsumeOptions::default(),
            offset,
        )
        .await?;
    let mut got = Vec::new();
    while got.len() < N as usize + 1 {
        if got.len() == N as usize {
            // Caught up: what is published now comes too.
            publish(N).await?;
        }
        let delivery = tokio::time::timeout(TIMEOUT, consumer.next())
            .await
            .with_context(|| format!("no delivery after {}", got.len()))?
            .context("the consumer was cancelled")??;
        got.push(u32::from_be_bytes(delivery.data[..4].try_into()?));
        delivery.ack(BasicAckOptions::default()).await?;
    }
    ensure!(got == (0..=N).collect::<Vec<_>>(), "read {got:?}");
    Ok(())
}
