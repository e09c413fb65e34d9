//! The RabbitMQ tutorials in Rust with lapin, against `petrel serve`: each tutorial
//! program (after the rust-lapin port of the tutorials, with the steps every other port
//! has: persistent tasks and prefetch 1 in tutorial 2) is an async fn, run as a tokio
//! task with its own connection as a separate program would be. What a program prints
//! goes to the test's [`Transcript`], which the test waits on.
//!
//! As the published tutorials do, tutorials 1, 2 and 6 declare their queues durable with
//! `x-queue-type: quorum`, so that Python and Rust programs can share them. Each test
//! starts its own broker, so the tutorials' fixed queue and exchange names do not collide.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties, Consumer, ExchangeKind};
use petrel_tests::amqp::TestBroker;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Generous for a debug build on two busy cores; every wait ends on a condition.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Tutorial 2's workers sleep a second per '.' of a task: 15 seconds of work in all.
const WORK_TIMEOUT: Duration = Duration::from_secs(60);

/// A fresh `petrel serve`, or the broker `PETREL_TEST_AMQP_PORT` names.
fn broker() -> anyhow::Result<TestBroker> {
    TestBroker::start(TIMEOUT)
}

/// The tutorials' queues (`hello`, `task_queue`, `rpc_queue`) are durable quorum queues.
fn quorum_queue() -> (QueueDeclareOptions, FieldTable) {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    (options, arguments)
}

/// A server-named exclusive queue, as the log receivers and the RPC client declare.
fn exclusive_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        exclusive: true,
        ..QueueDeclareOptions::default()
    }
}

// ---- Tutorial 1, "Hello World!" --------------------------------------------------------

/// send: one message to queue `hello` through the default exchange.
async fn send(url: &str, out: Out) -> anyhow::Result<()> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let (options, arguments) = quorum_queue();
    channel
        .queue_declare("hello".into(), options, arguments)
        .await?;
    channel
        .basic_publish(
            "".into(),
            "hello".into(),
            BasicPublishOptions::default(),
            b"Hello World!",
            BasicProperties::default(),
        )
        .await?;
    out.println(" [x] Sent 'Hello World!'");
    conn.close(0, "".into()).await?;
    Ok(())
}

/// receive: consumes queue `hello` and prints each message.
async fn receive(url: &str, out: Out) -> anyhow::Result<()> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let (options, arguments) = quorum_queue();
    channel
        .queue_declare("hello".into(), options, arguments)
        .await?;
    let mut consumer = channel
        .basic_consume(
            "hello".into(),
            "consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    out.println(" [*] Waiting for messages. To exit press CTRL+C");
    while let Some(delivery) = next_delivery(&mut consumer, &out).await {
        let delivery = delivery?;
        out.println(format!(
            " [x] Received {}",
            std::str::from_utf8(&delivery.data)?
        ));
        delivery.ack(BasicAckOptions::default()).await?;
    }
    conn.close(0, "".into()).await?;
    Ok(())
}

// ---- Tutorial 2, "Work Queues" ---------------------------------------------------------

/// new_task: the arguments, joined, as one persistent message to the durable queue
/// `task_queue`.
async fn new_task(url: &str, args: &[&str], out: Out) -> anyhow::Result<()> {
    let message = match args.len() {
        0 => "Hello World!".to_owned(),
        _ => args.join(" "),
    };
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let (options, arguments) = quorum_queue();
    channel
        .queue_declare("task_queue".into(), options, arguments)
        .await?;
    channel
        .basic_publish(
            "".into(),
            "task_queue".into(),
            BasicPublishOptions::default(),
            message.as_bytes(),
            // delivery_mode 2: persistent.
            BasicProperties::default().with_delivery_mode(2),
        )
        .await?;
    out.println(format!(" [x] Sent {message}"));
    conn.close(0, "".into()).await?;
    Ok(())
}

/// worker: takes one task at a time (prefetch 1), "works" a second per dot, then acks.
async fn worker(url: &str, out: Out) -> anyhow::Result<()> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let (options, arguments) = quorum_queue();
    channel
        .queue_declare("task_queue".into(), options, arguments)
        .await?;
    channel.basic_qos(1, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            "task_queue".into(),
            "consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    out.println(" [*] Waiting for messages. To exit press CTRL+C");
    while let Some(delivery) = next_delivery(&mut consumer, &out).await {
        let delivery = delivery?;
        let body = std::str::from_utf8(&delivery.data)?;
        out.println(format!(" [x] Received {body}"));
        // The tutorial's simulated work, not a synchronisation.
        let dots = body.matches('.').count() as u64;
        tokio::time::sleep(Duration::from_secs(dots)).await;
        out.println(" [x] Done");
        delivery.ack(BasicAckOptions::default()).await?;
    }
    conn.close(0, "".into()).await?;
    Ok(())
}

// ---- Tutorial 3, "Publish/Subscribe" ---------------------------------------------------

/// emit_log: the arguments, joined, to the fanout exchange `logs`.
async fn emit_log(url: &str, args: &[&str], out: Out) -> anyhow::Result<()> {
    let message = match args.len() {
        0 => "info: Hello World!".to_owned(),
        _ => args.join(" "),
    };
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .exchange_declare(
            "logs".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_publish(
            "logs".into(),
            "".into(),
            BasicPublishOptions::default(),
            message.as_bytes(),
            BasicProperties::default(),
        )
        .await?;
    out.println(format!(" [x] Sent {message}"));
    conn.close(0, "".into()).await?;
    Ok(())
}

/// receive_logs: a server-named exclusive queue bound to `logs`, consumed with auto-ack.
async fn receive_logs(url: &str, out: Out) -> anyhow::Result<()> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .exchange_declare(
            "logs".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let queue = channel
        .queue_declare("".into(), exclusive_queue(), FieldTable::default())
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            "logs".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "consumer".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    out.println(" [*] Waiting for logs. To exit press CTRL+C");
    while let Some(delivery) = next_delivery(&mut consumer, &out).await {
        let delivery = delivery?;
        out.println(format!(" [x] {}", std::str::from_utf8(&delivery.data)?));
    }
    conn.close(0, "".into()).await?;
    Ok(())
}

// ---- Tutorial 4, "Routing" -------------------------------------------------------------

/// emit_log_direct: `<severity> <message…>` to the direct exchange `direct_logs`.
async fn emit_log_direct(url: &str, args: &[&str], out: Out) -> anyhow::Result<()> {
    let severity = if args.len() > 1 { args[0] } else { "info" };
    let message = match args.len() {
        0 | 1 => "Hello World!".to_owned(),
        _ => args[1..].join(" "),
    };
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .exchange_declare(
            "direct_logs".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_publish(
            "direct_logs".into(),
            severity.into(),
            BasicPublishOptions::default(),
            message.as_bytes(),
            BasicProperties::default(),
        )
        .await?;
    out.println(format!(" [x] Sent {severity}:{message}"));
    conn.close(0, "".into()).await?;
    Ok(())
}

/// receive_logs_direct: an exclusive queue bound to `direct_logs` once per severity.
async fn receive_logs_direct(url: &str, severities: &[&str], out: Out) -> anyhow::Result<()> {
    receive_logs_bound(url, "direct_logs", ExchangeKind::Direct, severities, out).await
}

// ---- Tutorial 5, "Topics" --------------------------------------------------------------

/// emit_log_topic: `<routing key> <message…>` to the topic exchange `topic_logs`.
async fn emit_log_topic(url: &str, args: &[&str], out: Out) -> anyhow::Result<()> {
    let routing_key = if args.len() > 1 {
        args[0]
    } else {
        "anonymous.info"
    };
    let message = match args.len() {
        0 | 1 => "Hello World!".to_owned(),
        _ => args[1..].join(" "),
    };
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .exchange_declare(
            "topic_logs".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_publish(
            "topic_logs".into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            message.as_bytes(),
            BasicProperties::default(),
        )
        .await?;
    out.println(format!(" [x] Sent {routing_key}:{message}"));
    conn.close(0, "".into()).await?;
    Ok(())
}

/// receive_logs_topic: an exclusive queue bound to `topic_logs` once per binding key.
async fn receive_logs_topic(url: &str, binding_keys: &[&str], out: Out) -> anyhow::Result<()> {
    receive_logs_bound(url, "topic_logs", ExchangeKind::Topic, binding_keys, out).await
}

/// The body of receive_logs_direct and receive_logs_topic, which differ only in exchange.
async fn receive_logs_bound(
    url: &str,
    exchange: &str,
    kind: ExchangeKind,
    binding_keys: &[&str],
    out: Out,
) -> anyhow::Result<()> {
    ensure!(
        !binding_keys.is_empty(),
        "Usage: {exchange} [binding_key]..."
    );
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .exchange_declare(
            exchange.into(),
            kind,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let queue = channel
        .queue_declare("".into(), exclusive_queue(), FieldTable::default())
        .await?;
    for binding_key in binding_keys {
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.into(),
                (*binding_key).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "consumer".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    out.println(" [*] Waiting for logs. To exit press CTRL+C");
    while let Some(delivery) = next_delivery(&mut consumer, &out).await {
        let delivery = delivery?;
        out.println(format!(
            " [x] {}:{}",
            delivery.routing_key,
            std::str::from_utf8(&delivery.data)?
        ));
    }
    conn.close(0, "".into()).await?;
    Ok(())
}

// ---- Tutorial 6, "RPC" -----------------------------------------------------------------

/// The tutorial's Fibonacci, iterative.
fn fib(n: u64) -> u64 {
    let (mut a, mut b) = (0u64, 1u64);
    for _ in 0..n {
        (a, b) = (b, a + b);
    }
    a
}

/// rpc_server: answers each request on `rpc_queue` (prefetch 1) to its `reply_to` queue
/// with its `correlation_id`, then acks it.
async fn rpc_server(url: &str, out: Out) -> anyhow::Result<()> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let (options, arguments) = quorum_queue();
    channel
        .queue_declare("rpc_queue".into(), options, arguments)
        .await?;
    channel.basic_qos(1, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            "rpc_queue".into(),
            "rpc_server".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    out.println(" [x] Awaiting RPC requests");
    while let Some(delivery) = next_delivery(&mut consumer, &out).await {
        let delivery = delivery?;
        // The number travels as UTF-8 text, as in the other ports.
        let n: u64 = std::str::from_utf8(&delivery.data)?.trim().parse()?;
        out.println(format!(" [.] fib({n})"));
        let response = fib(n).to_string();
        let reply_to = delivery
            .properties
            .reply_to()
            .clone()
            .context("missing 'reply to' property")?;
        let correlation_id = delivery
            .properties
            .correlation_id()
            .clone()
            .context("missing 'correlation id' property")?;
        channel
            .basic_publish(
                "".into(),
                reply_to,
                BasicPublishOptions::default(),
                response.as_bytes(),
                BasicProperties::default().with_correlation_id(correlation_id),
            )
            .await?;
        channel
            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await?;
    }
    conn.close(0, "".into()).await?;
    Ok(())
}

/// rpc_client: asks for fib(30) and waits for the reply that carries its correlation id.
async fn rpc_client(url: &str, out: Out) -> anyhow::Result<()> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let callback_queue = channel
        .queue_declare("".into(), exclusive_queue(), FieldTable::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            callback_queue.name().clone(),
            "rpc_client".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    // Unique per call, as the tutorial's uuid4 (without a uuid dependency).
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let correlation_id: ShortString = format!("{}-{nanos}", std::process::id()).into();

    out.println(" [x] Requesting fib(30)");
    channel
        .basic_publish(
            "".into(),
            "rpc_queue".into(),
            BasicPublishOptions::default(),
            b"30",
            BasicProperties::default()
                .with_reply_to(callback_queue.name().clone())
                .with_correlation_id(correlation_id.clone()),
        )
        .await?;
    let mut response = None;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        if delivery.properties.correlation_id().as_ref() == Some(&correlation_id) {
            response = Some(std::str::from_utf8(&delivery.data)?.trim().parse::<u64>()?);
            break;
        }
    }
    let response = response.context("no reply arrived")?;
    out.println(format!(" [.] Got {response}"));
    conn.close(0, "".into()).await?;
    Ok(())
}

// ---- The harness -----------------------------------------------------------------------

/// One line a program printed, or how it ended.
struct Line {
    program: String,
    text: String,
    /// The program ended with an error (`text` says which): waits fail at once.
    failed: bool,
}

/// Everything the programs of one test printed, in order, with a notification on each
/// new line so that a wait wakes exactly when its condition may have changed.
#[derive(Clone, Default)]
struct Transcript {
    inner: Arc<Inner>,
}

/// The shared part of a [`Transcript`].
struct Inner {
    lines: Mutex<Vec<Line>>,
    /// Notified on every new line.
    changed: Notify,
    /// Ctrl+C for every program: set by [`Transcript::stop`].
    interrupt: watch::Sender<bool>,
    /// The programs that stay up until interrupted.
    running: Mutex<Vec<JoinHandle<()>>>,
}

impl Default for Inner {
    fn default() -> Inner {
        Inner {
            lines: Mutex::default(),
            changed: Notify::new(),
            interrupt: watch::Sender::new(false),
            running: Mutex::default(),
        }
    }
}

impl Transcript {
    /// The printer of one program.
    fn out(&self, program: &str) -> Out {
        Out {
            transcript: self.clone(),
            program: program.to_owned(),
        }
    }

    fn lines(&self) -> MutexGuard<'_, Vec<Line>> {
        lock(&self.inner.lines)
    }

    fn record(&self, program: &str, text: String, failed: bool) {
        // Echoed, so that a failing test's captured output shows the whole exchange.
        println!("{program}: {text}");
        self.lines().push(Line {
            program: program.to_owned(),
            text,
            failed,
        });
        self.inner.changed.notify_waiters();
    }

    /// What `program` printed so far.
    fn of(&self, program: &str) -> Vec<String> {
        self.lines()
            .iter()
            .filter(|line| line.program == program)
            .map(|line| line.text.clone())
            .collect()
    }

    /// How many lines of `program` are exactly `text`.
    fn count(&self, program: &str, text: &str) -> usize {
        self.lines()
            .iter()
            .filter(|line| line.program == program && line.text == text)
            .count()
    }

    /// What `program` printed of its messages: the lines that start with " [x]".
    fn received(&self, program: &str) -> Vec<String> {
        self.of(program)
            .into_iter()
            .filter(|line| line.starts_with(" [x]"))
            .collect()
    }

    /// Waits until `program` has printed `text`.
    async fn wait_for(&self, program: &str, text: &str, timeout: Duration) -> anyhow::Result<()> {
        self.wait_until(&format!("{program} printed {text:?}"), timeout, |t| {
            t.count(program, text) > 0
        })
        .await
    }

    /// Waits until `condition` holds; fails at once if a program has failed.
    async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        condition: impl Fn(&Transcript) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            // Registered before the check, so that a line recorded in between still wakes us.
            let mut changed = std::pin::pin!(self.inner.changed.notified());
            changed.as_mut().enable();
            if let Some(failure) = self.failure() {
                bail!("{failure} while waiting until {what}\n{}", self.dump());
            }
            if condition(self) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                bail!(
                    "timed out after {timeout:?} waiting until {what}\n{}",
                    self.dump()
                );
            }
        }
    }

    /// Runs a program that stays up (a consumer) as a task, until [`Transcript::stop`];
    /// its end is recorded, as a failure if it came before.
    fn spawn<F>(&self, program: &str, run: impl FnOnce(Out) -> F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let transcript = self.clone();
        let name = program.to_owned();
        let future = run(self.out(program));
        let task = tokio::spawn(async move {
            let result = future.await;
            let interrupted = *transcript.inner.interrupt.borrow();
            let (text, failed) = match result {
                Ok(()) if interrupted => ("exited".to_owned(), false),
                Ok(()) => ("exited before the test ended".to_owned(), true),
                Err(error) => (format!("error: {error:#}"), true),
            };
            transcript.record(&name, text, failed);
        });
        lock(&self.inner.running).push(task);
    }

    /// Interrupts the programs that stay up (Ctrl+C) and waits for them to exit cleanly,
    /// so that their last acks reach the broker and nothing is left unacked (and
    /// redelivered to the next test, on a broker shared through PETREL_TEST_AMQP_PORT).
    async fn stop(&self) -> anyhow::Result<()> {
        self.inner.interrupt.send_replace(true);
        let running = std::mem::take(&mut *lock(&self.inner.running));
        for task in running {
            tokio::time::timeout(TIMEOUT, task)
                .await
                .with_context(|| format!("a program ignored Ctrl+C\n{}", self.dump()))??;
        }
        if let Some(failure) = self.failure() {
            bail!("{failure}\n{}", self.dump());
        }
        Ok(())
    }

    /// Runs a program to its end, within [`TIMEOUT`].
    async fn run<F>(&self, program: &str, run: impl FnOnce(Out) -> F) -> anyhow::Result<()>
    where
        F: Future<Output = anyhow::Result<()>>,
    {
        tokio::time::timeout(TIMEOUT, run(self.out(program)))
            .await
            .with_context(|| format!("{program} still running after {TIMEOUT:?}\n{}", self.dump()))?
            .with_context(|| format!("{program} failed\n{}", self.dump()))
    }

    /// "<program>: <how it ended>" for the first program that failed, if one has.
    fn failure(&self) -> Option<String> {
        self.lines()
            .iter()
            .find(|line| line.failed)
            .map(|line| format!("{}: {}", line.program, line.text))
    }

    /// Every line so far, for error messages.
    fn dump(&self) -> String {
        let lines = self.lines();
        let mut text = String::from("--- transcript ---\n");
        for line in lines.iter() {
            text.push_str(&format!("{}: {}\n", line.program, line.text));
        }
        text
    }
}

/// A program's stdout: its lines go to the test's transcript.
struct Out {
    transcript: Transcript,
    program: String,
}

impl Out {
    /// Prints one line.
    fn println(&self, text: impl Into<String>) {
        self.transcript.record(&self.program, text.into(), false);
    }

    /// Returns once the program is interrupted (Ctrl+C).
    async fn interrupted(&self) {
        let mut interrupt = self.transcript.inner.interrupt.subscribe();
        // Err only if the sender is gone, which the transcript we hold prevents.
        let _ = interrupt.wait_for(|interrupted| *interrupted).await;
    }
}

/// The next delivery; `None` once the consumer is cancelled or the program interrupted.
async fn next_delivery(consumer: &mut Consumer, out: &Out) -> Option<lapin::Result<Delivery>> {
    tokio::select! {
        delivery = consumer.next() => delivery,
        () = out.interrupted() => None,
    }
}

/// Locks, ignoring poisoning: a panicked test leaves nothing half-written that matters.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---- The tests -------------------------------------------------------------------------

/// Tutorial 1, "Hello World!": send puts one message on queue `hello`, receive gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_1_hello_world() -> anyhow::Result<()> {
    let broker = tokio::task::spawn_blocking(broker).await??;
    let url = broker.url();
    let t = Transcript::default();

    let u = url.clone();
    t.spawn("receive", |out| async move { receive(&u, out).await });
    // Printed once its consumer is registered.
    t.wait_for(
        "receive",
        " [*] Waiting for messages. To exit press CTRL+C",
        TIMEOUT,
    )
    .await?;

    t.run("send", |out| send(&url, out)).await?;
    t.wait_for("receive", " [x] Received Hello World!", TIMEOUT)
        .await?;
    ensure!(t.of("send") == [" [x] Sent 'Hello World!'"], "{}", t.dump());
    t.stop().await
}

/// Tutorial 2, "Work Queues": new_task publishes persistent tasks to the durable queue
/// `task_queue`; two workers (prefetch 1, manual ack) share them, each task done once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_2_work_queues() -> anyhow::Result<()> {
    let broker = tokio::task::spawn_blocking(broker).await??;
    let url = broker.url();
    let t = Transcript::default();

    let workers = ["worker 1", "worker 2"];
    for name in workers {
        let u = url.clone();
        t.spawn(name, |out| async move { worker(&u, out).await });
    }
    for name in workers {
        // Printed once its consumer is registered.
        t.wait_for(
            name,
            " [*] Waiting for messages. To exit press CTRL+C",
            TIMEOUT,
        )
        .await?;
    }

    // The tutorial's own tasks: a worker sleeps one second per dot.
    let tasks = [
        "First message.",
        "Second message..",
        "Third message...",
        "Fourth message....",
        "Fifth message.....",
    ];
    for task in tasks {
        let args: Vec<&str> = task.split(' ').collect();
        t.run("new_task", |out| new_task(&url, &args, out)).await?;
    }

    let received = |t: &Transcript, name: &str| -> Vec<String> {
        t.of(name)
            .iter()
            .filter_map(|line| line.strip_prefix(" [x] Received "))
            .map(str::to_owned)
            .collect()
    };
    // Done: every task received, and each worker as often done as it received one.
    t.wait_until("every task is done", WORK_TIMEOUT, |t| {
        tasks.iter().all(|task| {
            workers
                .iter()
                .any(|w| received(t, w).iter().any(|r| r == task))
        }) && workers
            .iter()
            .all(|w| received(t, w).len() == t.count(w, " [x] Done"))
    })
    .await?;

    let mut all_received: Vec<String> = workers.iter().flat_map(|w| received(&t, w)).collect();
    all_received.sort();
    let mut expected: Vec<String> = tasks.iter().map(|task| (*task).to_owned()).collect();
    expected.sort();
    // Each task exactly once, and nothing else (a broker shared by
    // PETREL_TEST_AMQP_PORT may hold leftovers of a failed run).
    ensure!(
        all_received == expected,
        "the workers received {all_received:?}, not each task once\n{}",
        t.dump()
    );
    for name in workers {
        // Fair dispatch: with prefetch 1 a busy worker gets no second task, so the other
        // one (already consuming) gets some of the 15 s of work.
        ensure!(
            !received(&t, name).is_empty(),
            "{name} did no work\n{}",
            t.dump()
        );
    }
    let sent: Vec<String> = tasks
        .iter()
        .map(|task| format!(" [x] Sent {task}"))
        .collect();
    ensure!(t.of("new_task") == sent, "{}", t.dump());
    t.stop().await
}

/// Tutorial 3, "Publish/Subscribe": emit_log publishes to the fanout exchange `logs`;
/// every receive_logs (an exclusive queue bound to it) gets every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_3_publish_subscribe() -> anyhow::Result<()> {
    let broker = tokio::task::spawn_blocking(broker).await??;
    let url = broker.url();
    let t = Transcript::default();

    let receivers = ["receive_logs 1", "receive_logs 2"];
    for name in receivers {
        let u = url.clone();
        t.spawn(name, |out| async move { receive_logs(&u, out).await });
    }
    for name in receivers {
        t.wait_for(name, " [*] Waiting for logs. To exit press CTRL+C", TIMEOUT)
            .await?;
    }

    t.run("emit_log", |out| emit_log(&url, &[], out)).await?;
    let args = ["warning:", "Run.", "Run.", "Or", "it", "will", "explode."];
    t.run("emit_log", |out| emit_log(&url, &args, out)).await?;

    let last = " [x] warning: Run. Run. Or it will explode.";
    for name in receivers {
        t.wait_for(name, last, TIMEOUT).await?;
        ensure!(
            t.received(name) == [" [x] info: Hello World!", last],
            "{}",
            t.dump()
        );
    }
    t.stop().await
}

/// Tutorial 4, "Routing": emit_log_direct publishes to the direct exchange `direct_logs`
/// with the severity as routing key; each receiver gets the severities it bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_4_routing() -> anyhow::Result<()> {
    let broker = tokio::task::spawn_blocking(broker).await??;
    let url = broker.url();
    let t = Transcript::default();

    // The tutorial's two receivers: problems only (to a file), and everything (on screen).
    let receivers: [(&str, &[&str]); 2] = [
        ("problems", &["warning", "error"]),
        ("all", &["info", "warning", "error"]),
    ];
    for (name, severities) in receivers {
        let u = url.clone();
        t.spawn(name, |out| async move {
            receive_logs_direct(&u, severities, out).await
        });
    }
    for (name, _) in receivers {
        t.wait_for(name, " [*] Waiting for logs. To exit press CTRL+C", TIMEOUT)
            .await?;
    }

    let logs: [&[&str]; 3] = [
        &["error", "Run.", "Run.", "Or", "it", "will", "explode."],
        &["info", "All", "is", "well."],
        &["warning", "Last", "one."],
    ];
    for args in logs {
        t.run("emit_log_direct", |out| emit_log_direct(&url, args, out))
            .await?;
    }

    // The last message reaches both, after the ones published before it.
    for (name, _) in receivers {
        t.wait_for(name, " [x] warning:Last one.", TIMEOUT).await?;
    }
    ensure!(
        t.received("problems")
            == [
                " [x] error:Run. Run. Or it will explode.",
                " [x] warning:Last one."
            ],
        "{}",
        t.dump()
    );
    ensure!(
        t.received("all")
            == [
                " [x] error:Run. Run. Or it will explode.",
                " [x] info:All is well.",
                " [x] warning:Last one."
            ],
        "{}",
        t.dump()
    );
    t.stop().await
}

/// Tutorial 5, "Topics": emit_log_topic publishes to the topic exchange `topic_logs`;
/// each receiver gets what matches its binding keys (`*` one word, `#` any).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_5_topics() -> anyhow::Result<()> {
    let broker = tokio::task::spawn_blocking(broker).await??;
    let url = broker.url();
    let t = Transcript::default();

    let receivers: [(&str, &[&str]); 4] = [
        ("everything", &["#"]),
        ("kern", &["kern.*"]),
        ("critical", &["*.critical"]),
        ("both", &["kern.*", "*.critical"]),
    ];
    for (name, keys) in receivers {
        let u = url.clone();
        t.spawn(name, |out| async move {
            receive_logs_topic(&u, keys, out).await
        });
    }
    for (name, _) in receivers {
        t.wait_for(name, " [*] Waiting for logs. To exit press CTRL+C", TIMEOUT)
            .await?;
    }

    let logs: [&[&str]; 5] = [
        &["kern.critical", "A", "critical", "kernel", "error"],
        &["kern.info", "A", "kernel", "note"],
        &["app.critical", "An", "app", "is", "down"],
        // No arguments: the tutorial's default key and message, anonymous.info.
        &[],
        &["kern.critical", "The", "last", "one"],
    ];
    for args in logs {
        t.run("emit_log_topic", |out| emit_log_topic(&url, args, out))
            .await?;
    }

    // The last message matches every binding, and comes after the others.
    let last = " [x] kern.critical:The last one";
    for (name, _) in receivers {
        t.wait_for(name, last, TIMEOUT).await?;
    }
    let critical_error = " [x] kern.critical:A critical kernel error";
    let kernel_note = " [x] kern.info:A kernel note";
    let app_down = " [x] app.critical:An app is down";
    let anonymous = " [x] anonymous.info:Hello World!";
    let expected: [(&str, Vec<&str>); 4] = [
        (
            "everything",
            vec![critical_error, kernel_note, app_down, anonymous, last],
        ),
        ("kern", vec![critical_error, kernel_note, last]),
        ("critical", vec![critical_error, app_down, last]),
        // Matching both bindings, kern.critical is still delivered once.
        ("both", vec![critical_error, kernel_note, app_down, last]),
    ];
    for (name, lines) in expected {
        ensure!(t.received(name) == lines, "{name}\n{}", t.dump());
    }
    t.stop().await
}

/// Tutorial 6, "RPC": rpc_client sends a request to `rpc_queue` with `reply_to` (its
/// exclusive, server-named queue) and a `correlation_id`; rpc_server (prefetch 1)
/// publishes the answer there through the default exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_6_rpc() -> anyhow::Result<()> {
    let broker = tokio::task::spawn_blocking(broker).await??;
    let url = broker.url();
    let t = Transcript::default();

    let u = url.clone();
    t.spawn("rpc_server", |out| async move { rpc_server(&u, out).await });
    t.wait_for("rpc_server", " [x] Awaiting RPC requests", TIMEOUT)
        .await?;

    t.run("rpc_client", |out| rpc_client(&url, out)).await?;
    ensure!(
        t.of("rpc_client") == [" [x] Requesting fib(30)", " [.] Got 832040"],
        "{}",
        t.dump()
    );
    ensure!(t.count("rpc_server", " [.] fib(30)") == 1, "{}", t.dump());
    t.stop().await
}
