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
use lapin::{BasicProperties, Confirmation};
use petrel_api::admin::v1::admin_client::AdminClient;
use petrel_api::admin::v1::{DestinationRef, Kind, TransferLeadershipRequest};
use petrel_tests::Signal;
use petrel_tests::amqp::channel;
use petrel_tests::cluster::Cluster;

const TIMEOUT: Duration = Duration::from_secs(30);

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
            transfer(cluster.ports[0], "moving", to).await?;
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

/// Hands the leadership of `queue` to node `to` through node `port`'s admin API.
async fn transfer(port: u16, queue: &str, to: u64) -> anyhow::Result<()> {
    let mut admin = AdminClient::connect(format!("http://127.0.0.1:{port}")).await?;
    admin
        .transfer_leadership(TransferLeadershipRequest {
            destination: Some(DestinationRef {
                kind: Kind::Queue.into(),
                name: queue.into(),
                ..Default::default()
            }),
            partition: 0,
            to_node: to,
        })
        .await?;
    Ok(())
}

/// Waits (within [`TIMEOUT`]) until the publisher has `n` confirms.
async fn confirmed(
    acked: &mut tokio::sync::watch::Receiver<usize>,
    n: usize,
) -> anyhow::Result<()> {
    tokio::time::timeout(TIMEOUT, acked.wait_for(|a| *a >= n))
        .await
        .with_context(|| format!("{n} publishes were not confirmed in time"))??;
    Ok(())
}

/// Moves the leadership of `queue` off node `from` (to the next node), if it leads.
async fn lead_elsewhere(port: u16, queue: &str, from: u64, nodes: u64) -> anyhow::Result<()> {
    if leader(port, queue, None).await? != from {
        return Ok(());
    }
    let to = from % nodes + 1;
    transfer(port, queue, to).await?;
    ensure!(
        leader(port, queue, Some(from)).await? == to,
        "the leadership moved"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_a_node_that_stays_up_go_on_while_the_others_restart_one_by_one()
-> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let mut cluster = Cluster::start(3)?;
    let url = cluster.nodes[0].amqp_url();
    let (_c, setup) = channel(&url).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    setup
        .queue_declare("rolling".into(), durable, FieldTable::default())
        .await?;

    // Publisher and consumer both on node 1, which stays up; nodes 3 and 2 restart as
    // the operator rolls them: leadership moved off first, then a clean stop.
    let stop = Arc::new(AtomicBool::new(false));
    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(0usize);
    let (_p, publisher) = channel(&url).await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let publishing = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut acked, mut nacked) = (Vec::new(), 0usize);
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let mut window = Vec::new();
                for _ in 0..20 {
                    let confirm = publisher
                        .basic_publish(
                            "".into(),
                            "rolling".into(),
                            BasicPublishOptions::default(),
                            &i.to_be_bytes(),
                            BasicProperties::default().with_delivery_mode(2),
                        )
                        .await?;
                    window.push((i, confirm));
                    i += 1;
                }
                for (i, confirm) in window {
                    match confirm.await? {
                        Confirmation::Ack(_) => acked.push(i),
                        _ => nacked += 1,
                    }
                }
                acked_tx.send_replace(acked.len());
            }
            anyhow::Ok((acked, nacked))
        })
    };
    let (_conn, consumer_ch) = channel(&url).await?;
    consumer_ch
        .basic_qos(50, BasicQosOptions::default())
        .await?;
    let mut consumer = consumer_ch
        .basic_consume(
            "rolling".into(),
            "stays".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (seen_tx, seen_rx) = tokio::sync::watch::channel(HashSet::<u32>::new());
    let consuming = tokio::spawn(async move {
        while let Some(delivery) = consumer.next().await {
            let delivery = delivery?;
            let i = u32::from_be_bytes(delivery.data[..4].try_into()?);
            delivery.ack(BasicAckOptions::default()).await?;
            seen_tx.send_modify(|seen| {
                seen.insert(i);
            });
        }
        anyhow::Ok(())
    });

    let mut acked_before = 0;
    for index in [2usize, 1] {
        let id = index as u64 + 1;
        confirmed(&mut acked_rx, acked_before + 200).await?;
        lead_elsewhere(cluster.ports[0], "rolling", id, 3).await?;
        cluster.nodes[index].signal(Signal::Term)?;
        let _stopped = cluster.restart(index, false)?;
        cluster.joined()?;
        acked_before = *acked_rx.borrow();
    }
    confirmed(&mut acked_rx, acked_before + 200).await?;
    stop.store(true, Ordering::Relaxed);
    let (acked, nacked) = tokio::time::timeout(TIMEOUT, publishing).await???;
    ensure!(nacked == 0, "{nacked} publishes were nacked");

    let mut seen_rx = seen_rx;
    let all = tokio::time::timeout(TIMEOUT, async {
        seen_rx
            .wait_for(|seen| acked.iter().all(|i| seen.contains(i)))
            .await
            .is_ok()
    })
    .await;
    if all != Ok(true) {
        let seen = seen_rx.borrow().clone();
        let missing = acked.iter().filter(|i| !seen.contains(i)).count();
        let logs: Vec<String> = cluster.nodes.iter().map(|n| n.stdout()).collect();
        anyhow::bail!(
            "{missing} of {} confirmed messages never reached the consumer\n{}",
            acked.len(),
            logs.join("\n=====\n")
        );
    }
    consuming.abort();
    Ok(())
}
