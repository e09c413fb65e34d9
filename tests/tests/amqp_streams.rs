//! Streams (`x-queue-type: stream`) as RabbitMQ's AMQP clients use them, with lapin: a
//! log each consumer reads from an offset of its own (`x-stream-offset`: first, last,
//! next, an offset, a timestamp, an interval), messages kept however often they are read.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, ensure};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use petrel_tests::amqp::{confirming_channel, publish_confirmed};
use petrel_tests::{PetrelProcess, Serve};

const TIMEOUT: Duration = Duration::from_secs(20);

async fn setup() -> anyhow::Result<(PetrelProcess, Connection, Channel)> {
    let mut petrel = Serve::new()?.start()?;
    petrel.wait_ready(TIMEOUT)?;
    let (conn, ch) = confirming_channel(&petrel.amqp_url()).await?;
    Ok((petrel, conn, ch))
}

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn stream_type() -> (&'static str, AMQPValue) {
    ("x-queue-type", AMQPValue::LongString("stream".into()))
}

async fn declare_stream(
    ch: &Channel,
    name: &str,
    extra: &[(&str, AMQPValue)],
) -> anyhow::Result<()> {
    let mut args = vec![stream_type()];
    args.extend_from_slice(extra);
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(name.into(), options, table(&args)).await?;
    Ok(())
}

async fn publish(ch: &Channel, queue: &str, body: &[u8]) -> anyhow::Result<()> {
    let props = BasicProperties::default();
    ensure!(
        publish_confirmed(ch, "", queue, body, props).await?,
        "nacked"
    );
    Ok(())
}

/// A consumer of `stream` from `offset` on a channel of its own, prefetch 10.
async fn consume(conn: &Connection, stream: &str, offset: AMQPValue) -> anyhow::Result<Consumer> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(10, BasicQosOptions::default()).await?;
    let consumer = ch
        .basic_consume(
            stream.into(),
            "".into(),
            BasicConsumeOptions::default(),
            table(&[("x-stream-offset", offset)]),
        )
        .await?;
    Ok(consumer)
}

/// The next `n` messages of `consumer`, acked: their bodies and stream offsets.
async fn take(consumer: &mut Consumer, n: usize) -> anyhow::Result<Vec<(Vec<u8>, i64)>> {
    let mut got = Vec::new();
    while got.len() < n {
        let delivery = tokio::time::timeout(TIMEOUT, consumer.next())
            .await
            .with_context(|| format!("{} of {n} messages: {got:?}", got.len()))?
            .context("the consumer ended")??;
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let offset = match headers.inner().get("x-stream-offset") {
            Some(AMQPValue::LongLongInt(o)) => *o,
            other => anyhow::bail!("x-stream-offset header: {other:?}"),
        };
        got.push((delivery.data.clone(), offset));
        delivery.ack(BasicAckOptions::default()).await?;
    }
    Ok(got)
}

/// That `consumer` gets nothing more within a short while.
async fn nothing_more(consumer: &mut Consumer) -> anyhow::Result<()> {
    let more = tokio::time::timeout(Duration::from_millis(300), consumer.next()).await;
    ensure!(more.is_err(), "an extra delivery: {more:?}");
    Ok(())
}

fn bodies(got: &[(Vec<u8>, i64)]) -> Vec<Vec<u8>> {
    got.iter().map(|(b, _)| b.clone()).collect()
}

fn numbered(range: std::ops::Range<u8>) -> Vec<Vec<u8>> {
    range.map(|i| vec![i]).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_consumer_reads_the_stream_from_the_offset_it_asks_for() -> anyhow::Result<()> {
    let (_p, conn, ch) = setup().await?;
    declare_stream(&ch, "events", &[]).await?;
    for i in 0..10u8 {
        publish(&ch, "events", &[i]).await?;
    }

    // From the first: all ten, in order, with rising offsets.
    let mut first = consume(&conn, "events", AMQPValue::LongString("first".into())).await?;
    let all = take(&mut first, 10).await?;
    assert_eq!(bodies(&all), numbered(0..10));
    ensure!(all.windows(2).all(|w| w[0].1 < w[1].1), "offsets: {all:?}");

    // Read again by another consumer, from the sixth message's offset: the last five.
    let sixth = AMQPValue::LongLongInt(all[5].1);
    let mut from_sixth = consume(&conn, "events", sixth).await?;
    assert_eq!(bodies(&take(&mut from_sixth, 5).await?), numbered(5..10));

    // "next" (the default) gets only what comes after it started; "last" the last batch.
    let mut next = consume(&conn, "events", AMQPValue::LongString("next".into())).await?;
    let mut last = consume(&conn, "events", AMQPValue::LongString("last".into())).await?;
    assert_eq!(bodies(&take(&mut last, 1).await?), numbered(9..10));
    nothing_more(&mut next).await?;
    publish(&ch, "events", &[10]).await?;
    assert_eq!(bodies(&take(&mut next, 1).await?), numbered(10..11));
    // Every consumer goes on with what comes: nothing is shared out or used up.
    for consumer in [&mut first, &mut from_sixth, &mut last] {
        assert_eq!(bodies(&take(consumer, 1).await?), numbered(10..11));
    }

    // By time: a timestamp before the first message reads all; an interval back from
    // now (as RabbitMQ writes one) too; a timestamp in the future reads only new ones.
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let mut since_epoch = consume(&conn, "events", AMQPValue::Timestamp(now - 3600)).await?;
    assert_eq!(bodies(&take(&mut since_epoch, 11).await?), numbered(0..11));
    let mut last_hour = consume(&conn, "events", AMQPValue::LongString("1h".into())).await?;
    assert_eq!(bodies(&take(&mut last_hour, 11).await?), numbered(0..11));
    let mut later = consume(&conn, "events", AMQPValue::Timestamp(now + 3600)).await?;
    nothing_more(&mut later).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_keeps_messages_by_retention_and_refuses_what_it_does_not_do() -> anyhow::Result<()>
{
    let (petrel, conn, ch) = setup().await?;
    declare_stream(
        &ch,
        "kept",
        &[
            ("x-max-age", AMQPValue::LongString("7D".into())),
            ("x-max-length-bytes", AMQPValue::LongLongInt(1 << 30)),
        ],
    )
    .await?;
    // Its retention is the stream's, as `petrel queue describe` shows.
    let described = petrel.cli(&["queue", "describe", "kept", "-o", "json"])?;
    let described: serde_json::Value = serde_json::from_slice(&described.stdout)?;
    assert_eq!(described["retention_ms"], 7 * 24 * 3600 * 1000);
    assert_eq!(described["retention_bytes"], 1 << 30);

    // What RabbitMQ refuses of a stream is refused with 406, each on a channel of its own.
    let refused = |text: String| text.contains("PRECONDITION_FAILED");
    let ch2 = conn.create_channel().await?;
    let ttl = declare_stream(&ch2, "ttl", &[("x-message-ttl", AMQPValue::LongInt(5))]).await;
    ensure!(
        ttl.as_ref().is_err_and(|e| refused(format!("{e:?}"))),
        "{ttl:?}"
    );
    let ch3 = conn.create_channel().await?;
    let got = ch3
        .basic_get("kept".into(), BasicGetOptions::default())
        .await;
    ensure!(
        got.as_ref().is_err_and(|e| refused(format!("{e:?}"))),
        "{got:?}"
    );
    let ch4 = conn.create_channel().await?;
    let no_ack = ch4
        .basic_consume(
            "kept".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    ensure!(
        no_ack.as_ref().is_err_and(|e| refused(format!("{e:?}"))),
        "{no_ack:?}"
    );
    let ch5 = conn.create_channel().await?;
    ch5.basic_qos(1, BasicQosOptions::default()).await?;
    let bad_offset = ch5
        .basic_consume(
            "kept".into(),
            "".into(),
            BasicConsumeOptions::default(),
            table(&[("x-stream-offset", AMQPValue::LongString("sideways".into()))]),
        )
        .await;
    ensure!(
        bad_offset
            .as_ref()
            .is_err_and(|e| refused(format!("{e:?}"))),
        "{bad_offset:?}"
    );

    // The first channel and the stream are fine.
    publish(&ch, "kept", b"still").await?;
    let mut reader = consume(&conn, "kept", AMQPValue::LongString("first".into())).await?;
    assert_eq!(
        bodies(&take(&mut reader, 1).await?),
        vec![b"still".to_vec()]
    );
    Ok(())
}
