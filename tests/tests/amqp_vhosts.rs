//! Virtual hosts, as a RabbitMQ user runs them: created with the CLI (`petrel vhost`, as
//! `rabbitmqctl add_vhost`), opened by the client's URL, each a namespace of its own.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use petrel_tests::amqp::{confirming_channel, publish_confirmed};
use petrel_tests::{PetrelProcess, Serve};

const TIMEOUT: Duration = Duration::from_secs(20);

async fn open(petrel: &PetrelProcess, vhost: &str) -> anyhow::Result<(Connection, Channel)> {
    confirming_channel(&format!(
        "amqp://guest:guest@{}/{vhost}",
        petrel.amqp_addr()
    ))
    .await
}

async fn declare(ch: &Channel, queue: &str) -> anyhow::Result<()> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8]) -> anyhow::Result<()> {
    let props = BasicProperties::default();
    ensure!(
        publish_confirmed(ch, exchange, key, body, props).await?,
        "nacked"
    );
    Ok(())
}

/// The bodies `queue` holds, taken until it yields none.
async fn drain(ch: &Channel, queue: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await?
    {
        got.push(m.delivery.data.clone());
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_and_exchanges_of_one_vhost_are_apart_from_another() -> anyhow::Result<()> {
    let mut petrel = Serve::new()?.start()?;
    petrel.wait_ready(TIMEOUT)?;
    petrel.cli_ok(&["vhost", "create", "shop"])?;
    let listed = petrel.cli_ok(&["vhost", "list"])?;
    ensure!(
        listed.contains("shop") && listed.contains('/'),
        "vhost list: {listed}"
    );

    let (_c1, default) = open(&petrel, "%2f").await?;
    let (_c2, shop) = open(&petrel, "shop").await?;
    // The same names in both: two queues, two exchanges.
    for ch in [&default, &shop] {
        declare(ch, "orders").await?;
        ch.exchange_declare(
            "events".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            "orders".into(),
            "events".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    publish(&default, "", "orders", b"to / directly").await?;
    publish(&shop, "", "orders", b"to shop directly").await?;
    publish(&shop, "events", "", b"to shop by fanout").await?;
    assert_eq!(
        drain(&default, "orders").await?,
        vec![b"to / directly".to_vec()]
    );
    assert_eq!(
        drain(&shop, "orders").await?,
        vec![b"to shop directly".to_vec(), b"to shop by fanout".to_vec()]
    );

    // The CLI shows each vhost's queues.
    let queues = petrel.cli_ok(&["queue", "list", "--vhost", "shop", "-o", "json"])?;
    let queues: serde_json::Value = serde_json::from_str(&queues)?;
    let names: Vec<(&str, &str)> = queues
        .as_array()
        .context("a list")?
        .iter()
        .filter_map(|q| Some((q["name"].as_str()?, q["vhost"].as_str()?)))
        .collect();
    assert_eq!(names, vec![("orders", "shop")]);

    // Deleting the vhost takes its queues with it, and nothing of "/".
    petrel.cli_ok(&["vhost", "delete", "shop"])?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = petrel.cli_ok(&["queue", "list", "--vhost", "shop", "-o", "json"])?;
        if left.trim() == "[]" {
            break;
        }
        ensure!(Instant::now() < deadline, "shop's queues stayed: {left}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publish(&default, "", "orders", b"still here").await?;
    assert_eq!(
        drain(&default, "orders").await?,
        vec![b"still here".to_vec()]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vhost_that_does_not_exist_is_refused_with_530_and_bad_requests_clearly()
-> anyhow::Result<()> {
    let mut petrel = Serve::new()?.start()?;
    petrel.wait_ready(TIMEOUT)?;
    let err = open(&petrel, "nowhere")
        .await
        .err()
        .context("opened a vhost that does not exist")?;
    let text = format!("{err:?}");
    ensure!(
        text.contains("NOT_ALLOWED") && text.contains("nowhere"),
        "{text}"
    );

    // The CLI: the default vhost cannot go, an unknown one is not found, a name with a
    // control character is refused.
    for (args, expected) in [
        (&["vhost", "delete", "/"][..], "cannot be deleted"),
        (&["vhost", "delete", "nowhere"][..], "not found"),
        (
            &["vhost", "create", "bad\u{1f}name"][..],
            "control characters",
        ),
    ] {
        let out = petrel.cli(args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains(expected),
            "petrel {args:?}: {stderr}"
        );
    }

    // A queue in a vhost is not reachable from another by a crafted name.
    let (_c, ch) = open(&petrel, "%2f").await?;
    let crafted = "shop\u{1f}orders";
    let refused = ch
        .queue_declare(
            crafted.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    ensure!(refused.is_err(), "declared {crafted:?}");
    Ok(())
}
