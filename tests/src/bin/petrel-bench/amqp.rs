//! `petrel-bench amqp`: an AMQP 0-9-1 load generator on lapin that measures any broker
//! alike (Petrel, RabbitMQ): confirmed throughput, end-to-end latency, lost and
//! duplicated messages, and the broker's CPU seconds per message.
//!
//! Each producer has its own connection and publishes to one fresh durable queue with
//! publisher confirms, keeping at most `--confirm-window` messages unconfirmed; each
//! consumer has its own connection, a `--prefetch` credit, and acks with `multiple`.
//! A body starts with the producer's id, its sequence number and the send time, so the
//! consumers measure latency and keep a ledger: after publishing stops they drain the
//! queue (for at most `--timeout-seconds`), and every confirmed message must then have
//! been consumed exactly once.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures_lite::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    PublisherConfirm,
};
use serde_json::json;
use tokio::sync::{Notify, watch};

use crate::stats;

/// Bytes at the start of every body: producer id (4), sequence number (8), send time (8).
const HEADER: usize = 20;
/// Longest wait for a connection, a channel or a declaration.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// A consumer acks what it holds once no delivery came for this long, so a slow trickle
/// (the fixed-rate cases) is not held unacked.
const ACK_IDLE: Duration = Duration::from_millis(20);

/// The kind of queue declared.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum QueueType {
    /// RabbitMQ's classic durable queue (a plain durable declaration).
    Classic,
    /// RabbitMQ's quorum queue (`x-queue-type: quorum`).
    Quorum,
    /// A Petrel queue (a plain durable declaration).
    Petrel,
}

impl QueueType {
    /// The name used on the command line and in the report.
    fn name(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
            QueueType::Petrel => "petrel",
        }
    }
}

/// The command line of `petrel-bench amqp`.
#[derive(clap::Args)]
pub struct Args {
    /// The broker, e.g. amqp://guest:guest@127.0.0.1:5672/%2f.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    /// The broker's process id, whose CPU seconds are read from /proc (RabbitMQ: the
    /// beam.smp process); without it no CPU figures are reported.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// The queue declared: `quorum` adds `x-queue-type: quorum`; the others are plain
    /// durable queues.
    #[arg(long, value_enum, default_value_t = QueueType::Petrel)]
    queue_type: QueueType,
    /// Producers, each on its own connection.
    #[arg(long, default_value_t = 4)]
    producers: u32,
    /// Consumers, each on its own connection.
    #[arg(long, default_value_t = 4)]
    consumers: u32,
    /// Bytes per message body (at least 20: id, sequence number and send time).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Unconfirmed messages a producer may have outstanding.
    #[arg(long, default_value_t = 256)]
    confirm_window: usize,
    /// Publish with delivery mode 2 (persistent).
    #[arg(long)]
    persistent: bool,
    /// basic.qos prefetch count of each consumer.
    #[arg(long, default_value_t = 256)]
    prefetch: u16,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Aggregate publish rate in messages per second, shared by the producers (for
    /// latency at a fixed load); 0 publishes as fast as confirms allow.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Longest wait for a confirm, and for the queue to drain after publishing stops.
    #[arg(long, default_value_t = 30.0)]
    timeout_seconds: f64,
    /// Name of this case in the report (default: the queue type).
    #[arg(long)]
    label: Option<String>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

/// What one delivery of (producer, sequence number) saw.
#[derive(Clone, Copy, Default)]
struct Mark {
    confirmed: bool,
    deliveries: u32,
}

/// Every message's fate, shared by producers and consumers.
#[derive(Default)]
struct Ledger {
    /// Per producer, indexed by sequence number.
    marks: Vec<Vec<Mark>>,
    confirmed: u64,
    /// Distinct messages delivered.
    consumed: u64,
    /// Deliveries of a message already delivered.
    duplicates: u64,
    /// Confirmed messages not delivered yet.
    outstanding: u64,
    /// Deliveries whose body this run did not write.
    foreign: u64,
}

impl Ledger {
    fn mark(&mut self, producer: u32, seq: u64) -> Option<&mut Mark> {
        let marks = self.marks.get_mut(usize::try_from(producer).ok()?)?;
        let i = usize::try_from(seq).ok()?;
        if marks.len() <= i {
            marks.resize(i + 1, Mark::default());
        }
        marks.get_mut(i)
    }

    fn confirm(&mut self, producer: u32, seq: u64) {
        let Some(mark) = self.mark(producer, seq) else {
            return;
        };
        let first = !mark.confirmed;
        let undelivered = mark.deliveries == 0;
        mark.confirmed = true;
        if first {
            self.confirmed += 1;
            if undelivered {
                self.outstanding += 1;
            }
        }
    }

    /// Records a delivery; true if it was the last confirmed message outstanding.
    fn deliver(&mut self, producer: u32, seq: u64) -> bool {
        let Some(mark) = self.mark(producer, seq) else {
            self.foreign += 1;
            return false;
        };
        mark.deliveries += 1;
        let (first, confirmed) = (mark.deliveries == 1, mark.confirmed);
        if !first {
            self.duplicates += 1;
            return false;
        }
        self.consumed += 1;
        if confirmed {
            self.outstanding -= 1;
            return self.outstanding == 0;
        }
        false
    }
}

/// State shared by every task of one run.
struct Shared {
    ledger: Mutex<Ledger>,
    /// Signalled when no confirmed message is outstanding.
    drained: Notify,
    /// The clock origin of the send times written into bodies.
    epoch: Instant,
}

impl Shared {
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// What one producer did.
#[derive(Default)]
struct Produced {
    published: u64,
    confirmed: u64,
    nacked: u64,
    /// When its last confirm arrived.
    last_confirm: Option<Instant>,
}

/// The figures of one run.
struct Outcome {
    label: String,
    queue_type: QueueType,
    msgs_per_s: f64,
    mb_s: f64,
    p50: u64,
    p99: u64,
    p999: u64,
    published: u64,
    confirmed: u64,
    nacked: u64,
    consumed: u64,
    lost: u64,
    duplicates: u64,
    foreign: u64,
    /// Seconds from the end of publishing until every confirmed message was delivered.
    drain_s: f64,
    cpu_s: Option<f64>,
    client_cpu_s: f64,
}

/// Runs one case against the broker at `args.url` and prints its table (and JSON line).
pub fn run(args: Args) -> anyhow::Result<()> {
    ensure!(args.producers > 0, "--producers must be at least 1");
    ensure!(args.consumers > 0, "--consumers must be at least 1");
    ensure!(
        args.size >= HEADER,
        "--size must be at least {HEADER} bytes"
    );
    ensure!(
        args.confirm_window > 0,
        "--confirm-window must be at least 1"
    );
    ensure!(args.prefetch > 0, "--prefetch must be at least 1");
    ensure!(
        args.seconds > 0.0 && args.seconds.is_finite(),
        "--seconds must be positive"
    );
    ensure!(
        args.rate >= 0.0 && args.rate.is_finite(),
        "--rate must be 0 or positive"
    );
    ensure!(
        args.timeout_seconds > 0.0 && args.timeout_seconds.is_finite(),
        "--timeout-seconds must be positive"
    );
    let runtime = tokio::runtime::Runtime::new()?;
    let outcome = runtime.block_on(bench(&args))?;
    report(&outcome, &args);
    Ok(())
}

/// A connection to `url` and a channel on it.
async fn connect(url: &str) -> anyhow::Result<(Connection, Channel)> {
    let connection = tokio::time::timeout(
        SETUP_TIMEOUT,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .with_context(|| format!("no connection to {url} within {SETUP_TIMEOUT:?}"))?
    .with_context(|| format!("cannot connect to {url}"))?;
    let channel = within(connection.create_channel()).await?;
    Ok((connection, channel))
}

/// `future`, or an error once [`SETUP_TIMEOUT`] passed.
async fn within<T>(future: impl Future<Output = lapin::Result<T>>) -> anyhow::Result<T> {
    Ok(tokio::time::timeout(SETUP_TIMEOUT, future)
        .await
        .with_context(|| format!("no answer from the broker within {SETUP_TIMEOUT:?}"))??)
}

/// Declares a fresh queue, runs the case on it, and deletes it whatever happened.
async fn bench(args: &Args) -> anyhow::Result<Outcome> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let queue = format!("petrel-bench-{}-{nanos}", std::process::id());
    let (connection, channel) = connect(&args.url).await?;
    let mut arguments = FieldTable::default();
    if args.queue_type == QueueType::Quorum {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    within(channel.queue_declare(queue.as_str().into(), options, arguments))
        .await
        .with_context(|| format!("cannot declare queue {queue}"))?;
    let outcome = measure(args, &queue).await;
    let deleted =
        within(channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()))
            .await
            .with_context(|| format!("cannot delete queue {queue}"));
    let _ = tokio::time::timeout(SETUP_TIMEOUT, connection.close(200, "bye".into())).await;
    let outcome = outcome?;
    deleted?;
    Ok(outcome)
}

/// Starts the consumers, then the producers; publishes for `args.seconds`, drains, and
/// reads the ledger.
async fn measure(args: &Args, queue: &str) -> anyhow::Result<Outcome> {
    let shared = Arc::new(Shared {
        ledger: Mutex::new(Ledger {
            marks: vec![Vec::new(); usize::try_from(args.producers)?],
            ..Ledger::default()
        }),
        drained: Notify::new(),
        epoch: Instant::now(),
    });
    let (stop, stopped) = watch::channel(false);
    let mut consumers = Vec::new();
    for i in 0..args.consumers {
        let (connection, channel) = connect(&args.url).await?;
        within(channel.basic_qos(args.prefetch, BasicQosOptions::default())).await?;
        let consumer = within(channel.basic_consume(
            queue.into(),
            format!("petrel-bench-{i}").into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ))
        .await?;
        let ack_every = u64::from(args.prefetch / 4).max(1);
        consumers.push(tokio::spawn(consume(
            connection,
            channel,
            consumer,
            ack_every,
            Arc::clone(&shared),
            stopped.clone(),
        )));
    }
    let mut channels = Vec::new();
    for _ in 0..args.producers {
        let (connection, channel) = connect(&args.url).await?;
        within(channel.confirm_select(ConfirmSelectOptions::default())).await?;
        channels.push((connection, channel));
    }

    let broker_cpu = args
        .broker_pid
        .map(petrel_tests::cpu_seconds_of)
        .transpose()?;
    let client_cpu = petrel_tests::cpu_seconds_of(std::process::id())?;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.seconds);
    let plan = Plan {
        queue: queue.to_owned(),
        size: args.size,
        window: args.confirm_window,
        persistent: args.persistent,
        // Each producer's share of the aggregate rate, as a gap between its messages.
        gap: (args.rate > 0.0)
            .then(|| Duration::from_secs_f64(f64::from(args.producers) / args.rate)),
        start,
        end,
        confirm_timeout: Duration::from_secs_f64(args.timeout_seconds),
    };
    let plan = Arc::new(plan);
    let producers: Vec<_> = channels
        .into_iter()
        .zip(0..)
        .map(|((connection, channel), id)| {
            tokio::spawn(produce(
                id,
                connection,
                channel,
                Arc::clone(&plan),
                Arc::clone(&shared),
            ))
        })
        .collect();
    let mut produced = Produced::default();
    for producer in producers {
        let p = producer.await??;
        produced.published += p.published;
        produced.confirmed += p.confirmed;
        produced.nacked += p.nacked;
        produced.last_confirm = produced.last_confirm.max(p.last_confirm);
    }
    let published = Instant::now();
    eprintln!(
        "published {} in {:.1} s; draining",
        produced.published,
        published.duration_since(start).as_secs_f64()
    );

    // Every confirmed message is delivered, or the drain gives up at the deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(args.timeout_seconds);
    while shared.ledger().outstanding > 0 {
        if tokio::time::timeout_at(deadline, shared.drained.notified())
            .await
            .is_err()
        {
            eprintln!(
                "drain: {} confirmed messages still undelivered after {:.0} s",
                shared.ledger().outstanding,
                args.timeout_seconds
            );
            break;
        }
    }
    let drain_s = published.elapsed().as_secs_f64();
    let cpu_s = match (args.broker_pid, broker_cpu) {
        (Some(pid), Some(before)) => Some(petrel_tests::cpu_seconds_of(pid)? - before),
        _ => None,
    };
    let client_cpu_s = petrel_tests::cpu_seconds_of(std::process::id())? - client_cpu;

    // A send error only means every consumer has already ended.
    let _ = stop.send(true);
    let mut latency = stats::histogram()?;
    for consumer in consumers {
        latency.add(consumer.await??)?;
    }
    let ledger = shared.ledger();
    let (p50, p99, p999) = stats::percentiles(&latency);
    // Confirmed messages over the time from the first publish to the last confirm: the
    // confirms of the last window arrive after publishing stops.
    let confirming = produced.last_confirm.map_or(args.seconds, |last| {
        last.duration_since(start).as_secs_f64()
    });
    let msgs_per_s = produced.confirmed as f64 / confirming;
    Ok(Outcome {
        label: args
            .label
            .clone()
            .unwrap_or_else(|| args.queue_type.name().to_owned()),
        queue_type: args.queue_type,
        msgs_per_s,
        mb_s: msgs_per_s * args.size as f64 / 1e6,
        p50,
        p99,
        p999,
        published: produced.published,
        confirmed: ledger.confirmed,
        nacked: produced.nacked,
        consumed: ledger.consumed,
        lost: ledger.outstanding,
        duplicates: ledger.duplicates,
        foreign: ledger.foreign,
        drain_s,
        cpu_s,
        client_cpu_s,
    })
}

/// What every producer of a run does.
struct Plan {
    queue: String,
    size: usize,
    window: usize,
    persistent: bool,
    /// Time between two messages of one producer at a fixed rate; `None` publishes as
    /// fast as the confirm window allows.
    gap: Option<Duration>,
    start: Instant,
    end: Instant,
    confirm_timeout: Duration,
}

/// Publishes numbered messages until `plan.end`, then waits for the last confirms.
///
/// As fast as confirms allow, every free slot of the window is filled at once: lapin
/// completes a publish only once its frames are written, so one at a time would cost a
/// hand-off to its I/O thread and a write per message, and the client, not the broker,
/// would set the pace.
async fn produce(
    id: u32,
    connection: Connection,
    channel: Channel,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
) -> anyhow::Result<Produced> {
    let mut template = vec![b'x'; plan.size];
    template[..4].copy_from_slice(&id.to_be_bytes());
    let batch = if plan.gap.is_some() { 1 } else { plan.window };
    let mut bodies = vec![template; batch];
    let mut properties = BasicProperties::default();
    if plan.persistent {
        properties = properties.with_delivery_mode(2);
    }
    let mut produced = Produced::default();
    let mut pending: VecDeque<(u64, PublisherConfirm)> = VecDeque::with_capacity(plan.window);
    let mut seq = 0u64;
    loop {
        // Room in the window: the oldest confirm if it is full, then all that are in.
        if pending.len() >= plan.window
            && let Some((s, confirm)) = pending.pop_front()
        {
            let confirmation = tokio::time::timeout(plan.confirm_timeout, confirm)
                .await
                .with_context(|| {
                    format!(
                        "producer {id}: no confirm for message {s} within {:?}",
                        plan.confirm_timeout
                    )
                })?;
            settle(id, s, confirmation, &shared, &mut produced)?;
        }
        while let Some((s, confirm)) = pending.front_mut() {
            let s = *s;
            let Some(confirmation) = futures_lite::future::poll_once(confirm).await else {
                break;
            };
            pending.pop_front();
            settle(id, s, confirmation, &shared, &mut produced)?;
        }
        // At a fixed rate the clock starts when a message is due, not when the window
        // lets it go: waiting for the broker counts as latency.
        let (count, sent) = match plan.gap {
            Some(gap) => {
                let due = plan.start + gap.mul_f64(seq as f64);
                if due >= plan.end {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                (1, due)
            }
            None => {
                let now = Instant::now();
                if now >= plan.end {
                    break;
                }
                (plan.window - pending.len(), now)
            }
        };
        let stamp = shared.nanos(sent).to_be_bytes();
        for (i, body) in (seq..).zip(&mut bodies[..count]) {
            body[4..12].copy_from_slice(&i.to_be_bytes());
            body[12..20].copy_from_slice(&stamp);
        }
        let publishes = bodies[..count]
            .iter()
            .map(|body| {
                channel.basic_publish(
                    "".into(),
                    plan.queue.as_str().into(),
                    BasicPublishOptions::default(),
                    body,
                    properties.clone(),
                )
            })
            .collect();
        for confirm in join_all(publishes).await {
            let confirm =
                confirm.with_context(|| format!("producer {id}: publishing message {seq}"))?;
            pending.push_back((seq, confirm));
            produced.published += 1;
            seq += 1;
        }
    }
    let deadline = tokio::time::Instant::now() + plan.confirm_timeout;
    for (s, confirm) in pending {
        let confirmation = tokio::time::timeout_at(deadline, confirm)
            .await
            .with_context(|| {
                format!(
                    "producer {id}: no confirm for message {s} within {:?} of the end",
                    plan.confirm_timeout
                )
            })?;
        settle(id, s, confirmation, &shared, &mut produced)?;
    }
    let _ = tokio::time::timeout(SETUP_TIMEOUT, connection.close(200, "bye".into())).await;
    Ok(produced)
}

/// Runs `futures` together until all are done, and returns their outputs in order. The
/// first poll reaches each in order, so publishes go out (and get their confirm tags) in
/// order.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (future, output) in futures.iter_mut().zip(&mut outputs) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => done = false,
                }
            }
        }
        if done { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// Enters one confirm in the ledger.
fn settle(
    id: u32,
    seq: u64,
    confirmation: lapin::Result<Confirmation>,
    shared: &Shared,
    produced: &mut Produced,
) -> anyhow::Result<()> {
    match confirmation.with_context(|| format!("producer {id}: message {seq}"))? {
        Confirmation::Ack(_) => {
            produced.confirmed += 1;
            produced.last_confirm = Some(Instant::now());
            shared.ledger().confirm(id, seq);
        }
        Confirmation::Nack(_) => produced.nacked += 1,
        Confirmation::NotRequested => bail!("producer {id}: confirms are not enabled"),
    }
    Ok(())
}

/// Consumes until told to stop: records each delivery's latency and enters it in the
/// ledger; acks with `multiple` every `ack_every` deliveries, or when deliveries pause.
async fn consume(
    connection: Connection,
    channel: Channel,
    mut consumer: Consumer,
    ack_every: u64,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Histogram<u64>> {
    let mut latency = stats::histogram()?;
    let mut unacked: Option<u64> = None;
    let mut held = 0u64;
    loop {
        let next = tokio::select! {
            // Stop requested (or the sender gone: the run is over either way).
            _ = stop.changed() => break,
            next = tokio::time::timeout(ACK_IDLE, consumer.next()) => next,
        };
        let delivery = match next {
            Err(_) => {
                if let Some(tag) = unacked.take() {
                    channel
                        .basic_ack(tag, BasicAckOptions { multiple: true })
                        .await?;
                    held = 0;
                }
                continue;
            }
            Ok(None) => bail!("the broker ended a consumer (basic.cancel or channel closed)"),
            Ok(Some(delivery)) => delivery.context("consuming")?,
        };
        let arrived = shared.nanos(Instant::now());
        let body = &delivery.data;
        let drained = if body.len() >= HEADER {
            let producer = u32::from_be_bytes(body[..4].try_into()?);
            let seq = u64::from_be_bytes(body[4..12].try_into()?);
            let sent = u64::from_be_bytes(body[12..20].try_into()?);
            latency.saturating_record((arrived.saturating_sub(sent) / 1000).max(1));
            shared.ledger().deliver(producer, seq)
        } else {
            shared.ledger().foreign += 1;
            false
        };
        if drained {
            shared.drained.notify_one();
        }
        unacked = Some(delivery.delivery_tag);
        held += 1;
        if held >= ack_every {
            channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                .await?;
            unacked = None;
            held = 0;
        }
    }
    if let Some(tag) = unacked {
        let _ = within(channel.basic_ack(tag, BasicAckOptions { multiple: true })).await;
    }
    let _ = tokio::time::timeout(SETUP_TIMEOUT, connection.close(200, "bye".into())).await;
    Ok(latency)
}

/// Messages per broker CPU-second, when the CPU was measured.
fn per_cpu_second(o: &Outcome) -> Option<f64> {
    o.cpu_s.filter(|&s| s > 0.0).map(|s| o.confirmed as f64 / s)
}

fn report(o: &Outcome, args: &Args) {
    println!(
        "{:<12} {:<7} {:>5} {:>5} {:>6} {:>10} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>5} {:>5} {:>7} {:>11}",
        "label",
        "queue",
        "prod",
        "cons",
        "rate",
        "msgs/s",
        "MB/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "confirmed",
        "consumed",
        "lost",
        "dups",
        "CPU s",
        "msgs/CPU-s"
    );
    println!(
        "{:<12} {:<7} {:>5} {:>5} {:>6} {:>10.0} {:>7.1} {:>8} {:>8} {:>9} {:>9} {:>9} {:>5} {:>5} {:>7} {:>11}",
        o.label,
        o.queue_type.name(),
        args.producers,
        args.consumers,
        if args.rate > 0.0 {
            format!("{:.0}", args.rate)
        } else {
            "max".to_owned()
        },
        o.msgs_per_s,
        o.mb_s,
        o.p50,
        o.p99,
        o.p999,
        o.confirmed,
        o.consumed,
        o.lost,
        o.duplicates,
        o.cpu_s.map_or("-".to_owned(), |s| format!("{s:.1}")),
        per_cpu_second(o).map_or("-".to_owned(), |m| format!("{m:.0}")),
    );
    eprintln!(
        "published {}, nacked {}, foreign deliveries {}, drain {:.2} s, client CPU {:.1} s",
        o.published, o.nacked, o.foreign, o.drain_s, o.client_cpu_s
    );
    if args.json {
        println!(
            "{}",
            json!({
                "label": o.label,
                "queue_type": o.queue_type.name(),
                "producers": args.producers,
                "consumers": args.consumers,
                "size": args.size,
                "confirm_window": args.confirm_window,
                "persistent": args.persistent,
                "prefetch": args.prefetch,
                "seconds": args.seconds,
                "rate": args.rate,
                "msgs_per_s": o.msgs_per_s,
                "mb_s": o.mb_s,
                "p50_us": o.p50,
                "p99_us": o.p99,
                "p999_us": o.p999,
                "published": o.published,
                "confirmed": o.confirmed,
                "nacked": o.nacked,
                "consumed": o.consumed,
                "lost": o.lost,
                "duplicates": o.duplicates,
                "foreign": o.foreign,
                "drain_s": o.drain_s,
                "cpu_s": o.cpu_s,
                "msgs_per_cpu_s": per_cpu_second(o),
                "client_cpu_s": o.client_cpu_s,
            })
        );
    }
}
