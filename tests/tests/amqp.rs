//! AMQP 0-9-1 against `petrel serve` with lapin, as a RabbitMQ user relies on it:
//! durable queues surviving a restart, large volumes in order, a large message, acks,
//! nacks and rejects, exchange-to-exchange bindings, and the errors RabbitMQ gives for
//! redeclaring and for exclusive queues, and a node that stops closing its connections
//! as RabbitMQ does, after confirming what it took in.

use std::time::Duration;

use anyhow::{Context, ensure};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions, ExchangeBindOptions,
    ExchangeDeclareOptions, ExchangeUnbindOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, ExchangeKind};
use petrel_tests::amqp;
use petrel_tests::{PetrelProcess, Serve, Signal};

const TIMEOUT: Duration = Duration::from_secs(30);

fn petrel() -> anyhow::Result<PetrelProcess> {
    let mut p = Serve::new()?.start()?;
    p.wait_ready(TIMEOUT)?;
    Ok(p)
}

async fn durable(channel: &Channel, name: &str) -> anyhow::Result<()> {
    amqp::declare_durable(channel, name, FieldTable::default()).await
}

/// Publishes `bodies` persistent to `queue` with confirms, a window at a time; every
/// one must be acked.
async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    bodies: impl Iterator<Item = Vec<u8>>,
    window: usize,
) -> anyhow::Result<()> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut pending = Vec::with_capacity(window);
    let persistent = BasicProperties::default().with_delivery_mode(2);
    for body in bodies {
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                persistent.clone(),
            )
            .await?;
        pending.push(confirm);
        if pending.len() == window {
            for c in pending.drain(..) {
                ensure!(
                    matches!(c.await?, Confirmation::Ack(_)),
                    "a publish was nacked"
                );
            }
        }
    }
    for c in pending {
        ensure!(
            matches!(c.await?, Confirmation::Ack(_)),
            "a publish was nacked"
        );
    }
    Ok(())
}

/// Takes every message ready in `queue` with basic.get, acking each.
async fn drain(channel: &Channel, queue: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut got = Vec::new();
    while let Some(m) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await?
    {
        m.delivery.ack(BasicAckOptions::default()).await?;
        got.push(m.delivery.data);
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_messages_in_a_durable_queue_survive_a_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut first = Serve::on_data_dir(dir.path())?.start()?;
    first.wait_ready(TIMEOUT)?;
    let (conn, ch) = amqp::channel(&first.amqp_url()).await?;
    durable(&ch, "orders").await?;
    publish_confirmed(
        &ch,
        "orders",
        (0..100u32).map(|i| i.to_be_bytes().to_vec()),
        20,
    )
    .await?;
    // The first ten are acked before the restart; the rest must all be there after it.
    for _ in 0..10 {
        let m = ch
            .basic_get("orders".into(), BasicGetOptions::default())
            .await?
            .context("a message")?;
        m.delivery.ack(BasicAckOptions::default()).await?;
    }
    // An ack has no answer: a declare-ok after it says the broker has read it.
    durable(&ch, "orders").await?;
    conn.close(200, "bye".into()).await?;
    first.signal(Signal::Term)?;
    first.wait_exit(TIMEOUT)?;

    let mut second = Serve::on_data_dir(dir.path())?.start()?;
    second.wait_ready(TIMEOUT)?;
    let (_conn, ch) = amqp::channel(&second.amqp_url()).await?;
    let got = drain(&ch, "orders").await?;
    let want: Vec<Vec<u8>> = (10..100u32).map(|i| i.to_be_bytes().to_vec()).collect();
    assert_eq!(got, want, "exactly the unacked messages, in order");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_messages_arrive_complete_and_in_order() -> anyhow::Result<()> {
    const N: u32 = 100_000;
    let petrel = petrel()?;
    let (_p, publisher) = amqp::channel(&petrel.amqp_url()).await?;
    let (_c, consumer_ch) = amqp::channel(&petrel.amqp_url()).await?;
    durable(&publisher, "bulk").await?;
    consumer_ch
        .basic_qos(500, BasicQosOptions::default())
        .await?;
    let mut consumer = consumer_ch
        .basic_consume(
            "bulk".into(),
            "bulk-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let bodies = (0..N).map(|i| {
        let mut body = vec![0u8; 1024];
        body[..4].copy_from_slice(&i.to_be_bytes());
        body
    });
    let publishing =
        tokio::spawn(async move { publish_confirmed(&publisher, "bulk", bodies, 1000).await });
    let mut next = 0u32;
    while next < N {
        let delivery = tokio::time::timeout(TIMEOUT, consumer.next())
            .await
            .with_context(|| format!("no delivery within {TIMEOUT:?} after {next}"))?
            .context("the consumer ended")??;
        let seq = u32::from_be_bytes(delivery.data[..4].try_into()?);
        ensure!(seq == next, "message {seq} arrived where {next} was due");
        ensure!(
            delivery.data.len() == 1024,
            "message {seq} is {} bytes",
            delivery.data.len()
        );
        next += 1;
        if next.is_multiple_of(100) {
            delivery.ack(BasicAckOptions { multiple: true }).await?;
        }
    }
    publishing.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_16_mib_message_round_trips() -> anyhow::Result<()> {
    let petrel = petrel()?;
    let (_conn, ch) = amqp::channel(&petrel.amqp_url()).await?;
    durable(&ch, "big").await?;
    let body: Vec<u8> = (0..16 << 20).map(|i: u32| (i % 251) as u8).collect();
    publish_confirmed(&ch, "big", std::iter::once(body.clone()), 1).await?;
    let got = drain(&ch, "big").await?;
    ensure!(got.len() == 1, "one message, got {}", got.len());
    ensure!(
        got[0] == body,
        "the body came back changed ({} bytes)",
        got[0].len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacked_and_unacked_messages_come_back_redelivered_and_rejected_ones_go()
-> anyhow::Result<()> {
    let petrel = petrel()?;
    let (_conn, ch) = amqp::channel(&petrel.amqp_url()).await?;
    durable(&ch, "work").await?;
    publish_confirmed(
        &ch,
        "work",
        [b"a", b"b", b"c"].iter().map(|b| b.to_vec()),
        3,
    )
    .await?;

    let a = ch
        .basic_get("work".into(), BasicGetOptions::default())
        .await?
        .context("a")?;
    ensure!(a.delivery.data == b"a" && !a.delivery.redelivered);
    a.delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await?;
    let a = ch
        .basic_get("work".into(), BasicGetOptions::default())
        .await?
        .context("a again")?;
    ensure!(
        a.delivery.data == b"a" && a.delivery.redelivered,
        "a nacked message comes back first, redelivered"
    );
    a.delivery
        .reject(BasicRejectOptions { requeue: false })
        .await?;

    // A consumer's channel closes with "b" unacked: another consumer gets it, redelivered.
    let (_conn2, other) = amqp::channel(&petrel.amqp_url()).await?;
    let b = other
        .basic_get("work".into(), BasicGetOptions::default())
        .await?
        .context("b")?;
    ensure!(b.delivery.data == b"b");
    other.close(200, "bye".into()).await?;
    let got: Vec<(Vec<u8>, bool)> = {
        let mut got = Vec::new();
        while let Some(m) = ch
            .basic_get("work".into(), BasicGetOptions::default())
            .await?
        {
            m.delivery.ack(BasicAckOptions::default()).await?;
            got.push((m.delivery.data, m.delivery.redelivered));
        }
        got
    };
    assert_eq!(
        got,
        vec![(b"b".to_vec(), true), (b"c".to_vec(), false)],
        "the rejected 'a' is gone"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeclaring_differently_is_406_and_an_exclusive_queue_is_405_to_others()
-> anyhow::Result<()> {
    let petrel = petrel()?;
    let (_conn, ch) = amqp::channel(&petrel.amqp_url()).await?;
    let mut ttl = FieldTable::default();
    ttl.insert("x-message-ttl".into(), AMQPValue::LongInt(60_000));
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("q".into(), options, ttl.clone()).await?;
    ch.queue_declare("q".into(), options, ttl)
        .await
        .context("the same again is fine")?;
    let err = ch
        .queue_declare("q".into(), options, FieldTable::default())
        .await
        .expect_err("other arguments");
    ensure!(
        err.to_string().contains("406") || format!("{err:?}").contains("PRECONDITION_FAILED"),
        "{err:?}"
    );

    let (_conn, owner) = amqp::channel(&petrel.amqp_url()).await?;
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    let q = owner
        .queue_declare("".into(), exclusive, FieldTable::default())
        .await?;
    ensure!(
        q.name().as_str().starts_with("amq.gen-"),
        "server-named: {}",
        q.name()
    );
    let (_conn, intruder) = amqp::channel(&petrel.amqp_url()).await?;
    let err = intruder
        .basic_consume(
            q.name().clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("another connection's exclusive queue");
    ensure!(
        format!("{err:?}").contains("RESOURCE_LOCKED") || format!("{err:?}").contains("405"),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_applies_publishes_and_acks_on_commit_and_forgets_them_on_rollback()
-> anyhow::Result<()> {
    let petrel = petrel()?;
    let (_conn, tx) = amqp::channel(&petrel.amqp_url()).await?;
    let (_conn2, other) = amqp::channel(&petrel.amqp_url()).await?;
    durable(&tx, "ledger").await?;
    let get = |ch: &Channel| {
        let ch = ch.clone();
        async move {
            anyhow::Ok(
                ch.basic_get("ledger".into(), BasicGetOptions { no_ack: true })
                    .await?
                    .map(|m| m.delivery.data),
            )
        }
    };
    tx.tx_select().await?;
    let publish = |body: &'static [u8]| {
        tx.basic_publish(
            "".into(),
            "ledger".into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
    };
    publish(b"a").await?;
    ensure!(get(&other).await?.is_none(), "nothing before the commit");
    tx.tx_commit().await?;
    ensure!(
        get(&other).await? == Some(b"a".to_vec()),
        "a after the commit"
    );
    publish(b"b").await?;
    tx.tx_rollback().await?;
    tx.tx_commit().await?;
    ensure!(get(&other).await?.is_none(), "b was rolled back");

    // An ack in a rolled-back transaction is forgotten: the message stays unacked, and
    // comes back when the channel closes.
    publish(b"c").await?;
    tx.tx_commit().await?;
    let c = tx
        .basic_get("ledger".into(), BasicGetOptions::default())
        .await?
        .context("c")?;
    c.delivery.ack(BasicAckOptions::default()).await?;
    tx.tx_rollback().await?;
    tx.close(200, "bye".into()).await?;
    ensure!(get(&other).await? == Some(b"c".to_vec()), "c came back");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_bound_to_exchanges_route_on_each_message_once_even_in_a_cycle()
-> anyhow::Result<()> {
    let petrel = petrel()?;
    let (_c, ch) = amqp::channel(&petrel.amqp_url()).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    for (name, kind) in [
        ("edge", ExchangeKind::Topic),
        ("inner", ExchangeKind::Fanout),
    ] {
        ch.exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    durable(&ch, "sink").await?;
    ch.queue_bind(
        "sink".into(),
        "inner".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let bind = |destination: &'static str, source: &'static str, key: &'static str| {
        ch.exchange_bind(
            destination.into(),
            source.into(),
            key.into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
    };
    bind("inner", "edge", "orders.*").await?;
    // A cycle back: each exchange routes a message once.
    bind("edge", "inner", "").await?;
    let send = |key: &'static str, body: &'static [u8]| {
        let ch = ch.clone();
        async move { amqp::publish_confirmed(&ch, "edge", key, body, BasicProperties::default()).await }
    };
    send("orders.new", b"routed").await?;
    send("payments.new", b"not routed").await?;
    assert_eq!(drain(&ch, "sink").await?, vec![b"routed".to_vec()]);

    ch.exchange_unbind(
        "inner".into(),
        "edge".into(),
        "orders.*".into(),
        ExchangeUnbindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    send("orders.new", b"after the unbind").await?;
    ensure!(
        drain(&ch, "sink").await?.is_empty(),
        "routed after the unbind"
    );

    // Binding to an exchange that does not exist is 404; the channel closes.
    let missing = bind("nowhere", "edge", "").await;
    ensure!(
        missing
            .as_ref()
            .is_err_and(|e| format!("{e:?}").contains("NOT_FOUND")),
        "{missing:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_node_confirms_what_it_took_in_then_closes_with_connection_forced()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut first = Serve::on_data_dir(dir.path())?.start()?;
    first.wait_ready(TIMEOUT)?;
    let (conn, ch) = amqp::channel(&first.amqp_url()).await?;
    let mut events = conn.events_listener();
    durable(&ch, "stopping").await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;

    // A publisher that keeps a window of unconfirmed publishes until the node goes.
    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(0usize);
    let publisher = tokio::spawn(async move {
        let persistent = BasicProperties::default().with_delivery_mode(2);
        let mut window = std::collections::VecDeque::new();
        let (mut acked, mut nacked) = (Vec::new(), 0usize);
        let mut settle = |i: u32, c: lapin::Result<Confirmation>| match c {
            Ok(Confirmation::Ack(_)) => {
                acked.push(i);
                acked_tx.send_replace(acked.len());
                Ok(())
            }
            Ok(_) => {
                nacked += 1;
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        };
        let mut ended = None;
        for i in 0u32.. {
            let published = ch
                .basic_publish(
                    "".into(),
                    "stopping".into(),
                    BasicPublishOptions::default(),
                    &i.to_be_bytes(),
                    persistent.clone(),
                )
                .await;
            match published {
                Ok(confirm) => window.push_back((i, confirm)),
                Err(e) => {
                    ended = Some(e.to_string());
                    break;
                }
            }
            if window.len() >= 50
                && let Some((i, c)) = window.pop_front()
                && let Err(e) = settle(i, c.await)
            {
                ended = Some(e);
                break;
            }
        }
        // Those still out are confirmed, or unanswered when the connection closed.
        for (i, c) in window {
            let _ = settle(i, c.await);
        }
        (acked, nacked, ended)
    });

    tokio::time::timeout(TIMEOUT, acked_rx.wait_for(|n| *n >= 500))
        .await
        .context("500 publishes were not confirmed in time")??;
    first.signal(Signal::Term)?;
    let exited = first.wait_exit(TIMEOUT)?;
    ensure!(exited.status.success(), "unclean stop: {}", exited.stderr);
    let (acked, nacked, ended) = tokio::time::timeout(TIMEOUT, publisher).await??;
    ensure!(
        nacked == 0,
        "{nacked} publishes were nacked while the node stopped"
    );
    ensure!(
        ended.is_some(),
        "the publisher was never told the node went"
    );
    let closed = tokio::time::timeout(TIMEOUT, async {
        while let Some(event) = events.next().await {
            if let lapin::Event::Error(e) = event {
                return e.to_string();
            }
        }
        String::new()
    })
    .await?;
    ensure!(
        closed.contains("CONNECTION_FORCED"),
        "the connection ended with {closed:?}"
    );

    let mut second = Serve::on_data_dir(dir.path())?.start()?;
    second.wait_ready(TIMEOUT)?;
    let (_conn, ch) = amqp::channel(&second.amqp_url()).await?;
    let kept: std::collections::HashSet<u32> = drain(&ch, "stopping")
        .await?
        .iter()
        .filter_map(|b| Some(u32::from_be_bytes(b.as_slice().try_into().ok()?)))
        .collect();
    let lost: Vec<&u32> = acked.iter().filter(|i| !kept.contains(i)).collect();
    ensure!(
        lost.is_empty(),
        "{} of {} confirmed publishes were lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    Ok(())
}
