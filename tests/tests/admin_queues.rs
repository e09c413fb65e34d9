//! Queues as an administrator (and so the operator) makes them through the admin API:
//! with typed arguments that apply as a client's `x-…` would, bound to exchanges, and
//! read back with their counts — then used by an unchanged AMQP client.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use petrel_api::admin::v1::{self as api, admin_client::AdminClient};
use petrel_tests::amqp::{confirming_channel, publish_confirmed};
use petrel_tests::{PetrelProcess, Serve};
use tonic::Code;
use tonic::transport::Channel as Grpc;

const TIMEOUT: Duration = Duration::from_secs(20);

async fn admin(petrel: &PetrelProcess) -> anyhow::Result<AdminClient<Grpc>> {
    let addr = petrel.internal_addr().context("no internal listener")?;
    Ok(AdminClient::connect(format!("http://{addr}")).await?)
}

fn queue_spec(name: &str, arguments: api::QueueArguments) -> api::CreateDestinationRequest {
    api::CreateDestinationRequest {
        spec: Some(api::DestinationSpec {
            kind: api::Kind::Queue.into(),
            name: name.to_owned(),
            partitions: 1,
            replication_factor: 1,
            queue_arguments: Some(arguments),
            ..api::DestinationSpec::default()
        }),
    }
}

fn queue_ref(name: &str) -> api::DestinationRef {
    api::DestinationRef {
        kind: api::Kind::Queue.into(),
        name: name.to_owned(),
        vhost: String::new(),
    }
}

fn binding(exchange: &str, queue: &str, key: &str) -> api::Binding {
    api::Binding {
        vhost: "/".to_owned(),
        exchange: exchange.to_owned(),
        queue: queue.to_owned(),
        routing_key: key.to_owned(),
    }
}

async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8]) -> anyhow::Result<bool> {
    publish_confirmed(ch, exchange, key, body, BasicProperties::default()).await
}

/// The queue's counts once `done` holds, or an error naming the last ones.
async fn stats_until(
    client: &mut AdminClient<Grpc>,
    queue: &str,
    done: impl Fn(&api::QueueStats) -> bool,
) -> anyhow::Result<api::QueueStats> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let shown = client.get_destination(queue_ref(queue)).await?.into_inner();
        let stats = shown.queue_stats.context("no queue stats")?;
        if done(&stats) {
            return Ok(stats);
        }
        ensure!(
            Instant::now() < deadline,
            "queue {queue} stayed at {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_made_with_typed_arguments_applies_them_to_amqp_clients() -> anyhow::Result<()> {
    let mut petrel = Serve::new()?.start()?;
    petrel.wait_ready(TIMEOUT)?;
    let mut client = admin(&petrel).await?;
    let arguments = api::QueueArguments {
        max_length: Some(2),
        overflow: "reject-publish".into(),
        message_ttl_ms: Some(600_000),
        ..api::QueueArguments::default()
    };
    let created = client
        .create_destination(queue_spec("orders", arguments.clone()))
        .await?
        .into_inner();
    let spec = created.spec.context("no spec")?;
    assert_eq!(spec.queue_arguments, Some(arguments));

    // A client declaring it with the same arguments, in its own integer widths, may;
    // with other ones it gets RabbitMQ's 406.
    let (_conn, ch) = confirming_channel(&petrel.amqp_url()).await?;
    let mut same = FieldTable::default();
    same.insert("x-max-length".into(), AMQPValue::ShortInt(2));
    same.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    same.insert("x-message-ttl".into(), AMQPValue::LongInt(600_000));
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare("orders".into(), durable, same).await?;
    let mut other = FieldTable::default();
    other.insert("x-max-length".into(), AMQPValue::ShortInt(3));
    let refused = ch
        .queue_declare("orders".into(), durable, other)
        .await
        .expect_err("a redeclare with another length limit must fail");
    ensure!(
        refused.to_string().contains("PRECONDITION_FAILED"),
        "{refused}"
    );

    // The length limit holds: the third publish is nacked.
    let (_conn, ch) = confirming_channel(&petrel.amqp_url()).await?;
    for body in [b"1", b"2"] {
        ensure!(
            publish(&ch, "", "orders", body).await?,
            "nacked below the limit"
        );
    }
    ensure!(
        !publish(&ch, "", "orders", b"3").await?,
        "a publish beyond x-max-length was confirmed"
    );
    let stats = stats_until(&mut client, "orders", |s| s.ready == 2).await?;
    assert_eq!(stats.consumers, 0);
    let shown = client
        .get_destination(queue_ref("orders"))
        .await?
        .into_inner();
    let end = shown.partitions[0].end_offset.context("no end offset")?;
    ensure!(end >= 2, "end offset {end} below the messages stored");

    // A consumer shows in the counts.
    let _consumer = ch
        .basic_consume(
            "orders".into(),
            "watcher".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    stats_until(&mut client, "orders", |s| {
        s.consumers == 1 && s.unacked == 2
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bindings_made_through_the_admin_api_route_and_are_listed() -> anyhow::Result<()> {
    let mut petrel = Serve::new()?.start()?;
    petrel.wait_ready(TIMEOUT)?;
    let mut client = admin(&petrel).await?;
    for name in ["audit", "other"] {
        client
            .create_destination(queue_spec(name, api::QueueArguments::default()))
            .await?;
    }
    client
        .bind(binding("amq.topic", "audit", "orders.#"))
        .await?;
    // Binding again changes nothing.
    client
        .bind(binding("amq.topic", "audit", "orders.#"))
        .await?;
    client.bind(binding("amq.direct", "other", "x")).await?;

    let listed = |queue: &str| api::ListBindingsRequest {
        vhost: String::new(),
        queue: queue.to_owned(),
    };
    let audit = client.list_bindings(listed("audit")).await?.into_inner();
    assert_eq!(
        audit.bindings,
        vec![binding("amq.topic", "audit", "orders.#")]
    );
    let all = client.list_bindings(listed("")).await?.into_inner();
    assert_eq!(all.bindings.len(), 2);

    let (_conn, ch) = confirming_channel(&petrel.amqp_url()).await?;
    ensure!(publish(&ch, "amq.topic", "orders.created", b"a").await?);
    stats_until(&mut client, "audit", |s| s.ready == 1).await?;

    client
        .unbind(binding("amq.topic", "audit", "orders.#"))
        .await?;
    // Unbinding what is not bound is no error, as in RabbitMQ.
    client
        .unbind(binding("amq.topic", "audit", "orders.#"))
        .await?;
    let audit = client.list_bindings(listed("audit")).await?.into_inner();
    ensure!(audit.bindings.is_empty(), "{audit:?}");
    ensure!(publish(&ch, "amq.topic", "orders.created", b"b").await?);
    let stats = stats_until(&mut client, "audit", |_| true).await?;
    assert_eq!(stats.ready, 1, "an unbound queue got a message");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queue_requests_get_clear_errors() -> anyhow::Result<()> {
    let mut petrel = Serve::new()?.start()?;
    petrel.wait_ready(TIMEOUT)?;
    let mut client = admin(&petrel).await?;

    let bad_overflow = api::QueueArguments {
        overflow: "drop-tail".into(),
        ..api::QueueArguments::default()
    };
    let refused = client
        .create_destination(queue_spec("q", bad_overflow))
        .await
        .expect_err("an unknown overflow must be refused");
    assert_eq!(refused.code(), Code::InvalidArgument);
    ensure!(
        refused.message().contains("x-overflow"),
        "{}",
        refused.message()
    );

    let mut topic = queue_spec("t", api::QueueArguments::default());
    if let Some(spec) = topic.spec.as_mut() {
        spec.kind = api::Kind::Topic.into();
    }
    let refused = client
        .create_destination(topic)
        .await
        .expect_err("topic args");
    assert_eq!(refused.code(), Code::InvalidArgument);

    client
        .create_destination(queue_spec("q", api::QueueArguments::default()))
        .await?;
    let refused = client
        .create_destination(queue_spec("q", api::QueueArguments::default()))
        .await
        .expect_err("a duplicate must be refused");
    assert_eq!(refused.code(), Code::AlreadyExists);

    let refused = client
        .bind(binding("no-such-exchange", "q", "k"))
        .await
        .expect_err("a missing exchange");
    assert_eq!(refused.code(), Code::NotFound);
    ensure!(
        refused.message().contains("no-such-exchange"),
        "{}",
        refused.message()
    );
    let refused = client
        .bind(binding("amq.direct", "no-such-queue", "k"))
        .await
        .expect_err("a missing queue");
    assert_eq!(refused.code(), Code::NotFound);
    let refused = client
        .bind(binding("", "q", "k"))
        .await
        .expect_err("the default exchange");
    assert_eq!(refused.code(), Code::InvalidArgument);

    // The node goes on serving.
    client.get_destination(queue_ref("q")).await?;
    Ok(())
}
