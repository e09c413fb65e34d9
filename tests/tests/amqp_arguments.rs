//! Queue arguments as RabbitMQ applies them, with lapin: message TTL (per queue and per
//! message), dead-lettering with `x-death`, length and byte limits (dropping the oldest,
//! or refusing publishes), a delivery limit, and the refusal of arguments that make no
//! sense.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicGetOptions, BasicNackOptions, BasicPublishOptions, BasicRejectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use petrel_tests::amqp::{confirming_channel, declare_durable as declare, publish_confirmed};
use petrel_tests::{PetrelProcess, Serve};

const TIMEOUT: Duration = Duration::from_secs(20);

async fn setup() -> anyhow::Result<(PetrelProcess, Connection, Channel)> {
    let mut petrel = Serve::new()?.start()?;
    petrel.wait_ready(TIMEOUT)?;
    let (conn, ch) = confirming_channel(&petrel.amqp_url()).await?;
    // Every test dead-letters to queue `dead` through the fanout exchange `dlx`.
    ch.exchange_declare(
        "dlx".into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    declare(&ch, "dead", FieldTable::default()).await?;
    ch.queue_bind(
        "dead".into(),
        "dlx".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok((petrel, conn, ch))
}

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn dead_lettered() -> (&'static str, AMQPValue) {
    (
        "x-dead-letter-exchange",
        AMQPValue::LongString("dlx".into()),
    )
}

async fn publish(
    ch: &Channel,
    queue: &str,
    body: &[u8],
    props: BasicProperties,
) -> anyhow::Result<()> {
    ensure!(confirmed(ch, queue, body, props).await?, "nacked");
    Ok(())
}

/// Publishes `body` to `queue` and answers whether it was confirmed (else nacked).
async fn confirmed(
    ch: &Channel,
    queue: &str,
    body: &[u8],
    props: BasicProperties,
) -> anyhow::Result<bool> {
    publish_confirmed(ch, "", queue, body, props).await
}

async fn get(ch: &Channel, queue: &str) -> anyhow::Result<Option<BasicGetMessage>> {
    Ok(ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await?)
}

/// Waits until `queue` yields `n` messages (auto-acked); returns their bodies and
/// x-death reasons.
async fn collect(ch: &Channel, queue: &str, n: usize) -> anyhow::Result<Vec<(Vec<u8>, String)>> {
    let deadline = Instant::now() + TIMEOUT;
    let mut got = Vec::new();
    while got.len() < n {
        match get(ch, queue).await? {
            Some(m) => got.push((m.delivery.data.clone(), death_reason(&m))),
            None => {
                ensure!(
                    Instant::now() < deadline,
                    "{queue} gave {} of {n}: {got:?}",
                    got.len()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    Ok(got)
}

/// The reason of the first `x-death` entry, or "".
fn death_reason(m: &BasicGetMessage) -> String {
    let headers = m.delivery.properties.headers().clone().unwrap_or_default();
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        return String::new();
    };
    match deaths.as_slice().first() {
        Some(AMQPValue::FieldTable(t)) => match t.inner().get("reason") {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            _ => String::new(),
        },
        _ => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_dead_lettered_by_queue_ttl_and_by_their_own() -> anyhow::Result<()> {
    let (_p, _c, ch) = setup().await?;
    declare(
        &ch,
        "short",
        args(&[("x-message-ttl", AMQPValue::LongInt(300)), dead_lettered()]),
    )
    .await?;
    declare(&ch, "plain", args(&[dead_lettered()])).await?;
    for body in [b"a", b"b"] {
        publish(&ch, "short", body, BasicProperties::default()).await?;
    }
    let quick = BasicProperties::default().with_expiration("100".into());
    publish(&ch, "plain", b"c", quick).await?;
    publish(&ch, "plain", b"d", BasicProperties::default()).await?;
    let mut dead = collect(&ch, "dead", 3).await?;
    dead.sort();
    let expired = |b: &[u8]| (b.to_vec(), "expired".to_owned());
    assert_eq!(dead, vec![expired(b"a"), expired(b"b"), expired(b"c")]);
    let d = get(&ch, "plain").await?.context("d has no expiration")?;
    ensure!(d.delivery.data == b"d");
    ensure!(get(&ch, "short").await?.is_none(), "nothing left in short");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_message_is_dead_lettered_and_one_over_the_delivery_limit_too()
-> anyhow::Result<()> {
    let (_p, _c, ch) = setup().await?;
    declare(
        &ch,
        "work",
        args(&[("x-delivery-limit", AMQPValue::LongInt(1)), dead_lettered()]),
    )
    .await?;
    publish(&ch, "work", b"bad", BasicProperties::default()).await?;
    publish(&ch, "work", b"flaky", BasicProperties::default()).await?;
    let acked = BasicGetOptions { no_ack: false };
    let bad = ch.basic_get("work".into(), acked).await?.context("bad")?;
    bad.delivery
        .reject(BasicRejectOptions { requeue: false })
        .await?;
    ensure!(collect(&ch, "dead", 1).await? == vec![(b"bad".to_vec(), "rejected".to_owned())]);

    let requeue = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    let first = ch.basic_get("work".into(), acked).await?.context("flaky")?;
    first.delivery.nack(requeue).await?;
    let again = ch
        .basic_get("work".into(), acked)
        .await?
        .context("flaky again")?;
    ensure!(again.delivery.redelivered, "redelivered");
    let count = again
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default()
        .inner()
        .get("x-delivery-count")
        .cloned();
    ensure!(
        count == Some(AMQPValue::LongLongInt(1)),
        "x-delivery-count: {count:?}"
    );
    // Returned a second time: over the limit of one.
    again.delivery.nack(requeue).await?;
    ensure!(
        collect(&ch, "dead", 1).await? == vec![(b"flaky".to_vec(), "delivery_limit".to_owned())]
    );
    ensure!(get(&ch, "work").await?.is_none(), "nothing left in work");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_length_limit_drops_the_oldest_ready_messages() -> anyhow::Result<()> {
    let (_p, _c, ch) = setup().await?;
    declare(
        &ch,
        "capped",
        args(&[("x-max-length", AMQPValue::LongInt(2)), dead_lettered()]),
    )
    .await?;
    for i in 0..5u8 {
        publish(&ch, "capped", &[i], BasicProperties::default()).await?;
    }
    let mut dead = collect(&ch, "dead", 3).await?;
    dead.sort();
    let maxlen = |i: u8| (vec![i], "maxlen".to_owned());
    assert_eq!(dead, vec![maxlen(0), maxlen(1), maxlen(2)]);
    let kept = collect(&ch, "capped", 2).await?;
    assert_eq!(
        kept,
        vec![(vec![3], String::new()), (vec![4], String::new())]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_limit_drops_the_oldest_ready_messages() -> anyhow::Result<()> {
    let (_p, _c, ch) = setup().await?;
    declare(
        &ch,
        "capped",
        args(&[
            ("x-max-length-bytes", AMQPValue::LongInt(10)),
            dead_lettered(),
        ]),
    )
    .await?;
    // 4 + 4 + 4 bytes: the first goes once the third is in.
    for i in 0..3u8 {
        publish(&ch, "capped", &[i; 4], BasicProperties::default()).await?;
    }
    assert_eq!(
        collect(&ch, "dead", 1).await?,
        vec![(vec![0; 4], "maxlen".into())]
    );
    let kept = collect(&ch, "capped", 2).await?;
    assert_eq!(
        kept,
        vec![(vec![1; 4], String::new()), (vec![2; 4], String::new())]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_that_rejects_publishes_nacks_them_until_it_has_room_again()
-> anyhow::Result<()> {
    let (_p, _c, ch) = setup().await?;
    let overflow = ("x-overflow", AMQPValue::LongString("reject-publish".into()));
    declare(
        &ch,
        "by-count",
        args(&[("x-max-length", AMQPValue::LongInt(2)), overflow.clone()]),
    )
    .await?;
    let mut answers = Vec::new();
    for i in 0..4u8 {
        answers.push(confirmed(&ch, "by-count", &[i], BasicProperties::default()).await?);
    }
    assert_eq!(answers, vec![true, true, false, false]);
    // One taken (and acked) makes room for one more.
    assert_eq!(
        collect(&ch, "by-count", 1).await?,
        vec![(vec![0], String::new())]
    );
    let deadline = Instant::now() + TIMEOUT;
    while !confirmed(&ch, "by-count", &[4], BasicProperties::default()).await? {
        ensure!(Instant::now() < deadline, "still full after an ack");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kept = collect(&ch, "by-count", 2).await?;
    assert_eq!(
        kept,
        vec![(vec![1], String::new()), (vec![4], String::new())]
    );
    ensure!(
        get(&ch, "by-count").await?.is_none(),
        "a refused message was kept"
    );

    declare(
        &ch,
        "by-bytes",
        args(&[("x-max-length-bytes", AMQPValue::LongInt(10)), overflow]),
    )
    .await?;
    let mut answers = Vec::new();
    for size in [6, 5, 4] {
        answers.push(confirmed(&ch, "by-bytes", &vec![7; size], BasicProperties::default()).await?);
    }
    assert_eq!(answers, vec![true, false, true]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_that_rejects_publishes_with_dlx_dead_letters_what_it_refuses()
-> anyhow::Result<()> {
    let (_p, _c, ch) = setup().await?;
    declare(
        &ch,
        "refusing",
        args(&[
            ("x-max-length", AMQPValue::LongInt(1)),
            (
                "x-overflow",
                AMQPValue::LongString("reject-publish-dlx".into()),
            ),
            dead_lettered(),
        ]),
    )
    .await?;
    assert!(confirmed(&ch, "refusing", b"kept", BasicProperties::default()).await?);
    assert!(!confirmed(&ch, "refusing", b"refused", BasicProperties::default()).await?);
    assert_eq!(
        collect(&ch, "dead", 1).await?,
        vec![(b"refused".to_vec(), "maxlen".into())]
    );
    assert_eq!(
        collect(&ch, "refusing", 1).await?,
        vec![(b"kept".to_vec(), String::new())]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arguments_and_expirations_that_make_no_sense_are_refused_with_406() -> anyhow::Result<()> {
    let (petrel, _c, ch) = setup().await?;
    let err = declare(
        &ch,
        "bad",
        args(&[("x-message-ttl", AMQPValue::LongInt(-1))]),
    )
    .await
    .expect_err("a negative TTL");
    ensure!(
        format!("{err:?}").contains("PRECONDITION_FAILED"),
        "{err:?}"
    );
    let conn = Connection::connect(&petrel.amqp_url(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    declare(&ch, "fine", FieldTable::default()).await?;
    let odd = BasicProperties::default().with_expiration("soon".into());
    ch.basic_publish(
        "".into(),
        "fine".into(),
        BasicPublishOptions::default(),
        b"x",
        odd,
    )
    .await?;
    // The broker closes the channel (406); a method sent meanwhile fails with the close
    // reason, one sent after it with the channel's closed state.
    let err = ch
        .queue_declare(
            "fine".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("the channel was closed");
    let text = format!("{err:?}");
    ensure!(
        text.contains("PRECONDITION_FAILED")
            || text.contains("invalid expiration")
            || (text.contains("InvalidChannelState") && !ch.status().connected()),
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_left_unacked_past_the_consumer_timeout_closes_its_channel_and_comes_back()
-> anyhow::Result<()> {
    use futures_lite::StreamExt;
    use lapin::options::BasicConsumeOptions;

    let (petrel, _c, ch) = setup().await?;
    declare(
        &ch,
        "slow",
        args(&[("x-consumer-timeout", AMQPValue::LongInt(500))]),
    )
    .await?;
    publish(&ch, "slow", b"job", BasicProperties::default()).await?;
    let conn = Connection::connect(&petrel.amqp_url(), ConnectionProperties::default()).await?;
    let sleepy = conn.create_channel().await?;
    let mut consumer = sleepy
        .basic_consume(
            "slow".into(),
            "sleepy".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let first = tokio::time::timeout(TIMEOUT, consumer.next())
        .await?
        .context("a delivery")??;
    ensure!(first.data == b"job");
    // Never acked: the broker closes the channel with 406 and the consumer ends.
    let ended = tokio::time::timeout(TIMEOUT, consumer.next()).await?;
    ensure!(
        matches!(ended, None | Some(Err(_))),
        "the consumer ends with its channel: {ended:?}"
    );
    let status = format!("{:?}", sleepy.status());
    ensure!(
        !sleepy.status().connected(),
        "the channel is closed: {status}"
    );
    let again = collect_unacked(&ch, "slow").await?;
    ensure!(
        again == (b"job".to_vec(), true),
        "delivered again, redelivered: {again:?}"
    );
    Ok(())
}

/// The next message of `queue`, waiting for one; its body and redelivered flag.
async fn collect_unacked(ch: &Channel, queue: &str) -> anyhow::Result<(Vec<u8>, bool)> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(m) = get(ch, queue).await? {
            return Ok((m.delivery.data.clone(), m.delivery.redelivered));
        }
        ensure!(Instant::now() < deadline, "nothing in {queue}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_unused_for_its_expiry_is_deleted() -> anyhow::Result<()> {
    let (_p, _c, ch) = setup().await?;
    declare(&ch, "temp", args(&[("x-expires", AMQPValue::LongInt(500))])).await?;
    let deadline = Instant::now() + TIMEOUT;
    // Publishing is no use of a queue: a mandatory publish comes back once it is gone.
    loop {
        let mandatory = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirm = ch
            .basic_publish(
                "".into(),
                "temp".into(),
                mandatory,
                b"x",
                BasicProperties::default(),
            )
            .await?
            .await?;
        if confirm.take_message().is_some() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "temp still exists after {TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
