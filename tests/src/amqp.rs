//! The AMQP broker a test talks to: a fresh `petrel serve`, or (to check the tests
//! themselves) an existing broker such as RabbitMQ.

use std::time::Duration;

use anyhow::Context;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use crate::{PetrelProcess, Serve};

/// Names an AMQP broker already listening on 127.0.0.1:<port> for the tests to use
/// instead of starting `petrel serve` (e.g. RabbitMQ); unset by default. Such a broker is
/// shared by every test: tests in one binary use distinct queue and exchange names, but
/// leftovers of a failed run stay in its queues.
pub const EXTERNAL_BROKER_ENV: &str = "PETREL_TEST_AMQP_PORT";

/// The broker one test talks to.
pub struct TestBroker {
    /// The `petrel serve` started for this test; `None` with [`EXTERNAL_BROKER_ENV`].
    pub petrel: Option<PetrelProcess>,
    /// Its AMQP port on 127.0.0.1.
    pub port: u16,
}

impl TestBroker {
    /// A fresh `petrel serve`, ready within `timeout`, or the broker that
    /// [`EXTERNAL_BROKER_ENV`] names.
    pub fn start(timeout: Duration) -> anyhow::Result<TestBroker> {
        if let Ok(port) = std::env::var(EXTERNAL_BROKER_ENV) {
            let port = port
                .parse()
                .with_context(|| format!("{EXTERNAL_BROKER_ENV}={port:?} is no port"))?;
            return Ok(TestBroker { petrel: None, port });
        }
        let mut petrel = Serve::new()?.start()?;
        petrel.wait_ready(timeout)?;
        let port = petrel.amqp_addr().port();
        Ok(TestBroker {
            petrel: Some(petrel),
            port,
        })
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

/// Declares the durable queue `name` with `arguments`.
pub async fn declare_durable(
    ch: &Channel,
    name: &str,
    arguments: FieldTable,
) -> anyhow::Result<()> {
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(name.into(), options, arguments).await?;
    Ok(())
}

/// A connection to `url` and a channel on it in confirm mode.
pub async fn confirming_channel(url: &str) -> anyhow::Result<(Connection, Channel)> {
    let (conn, ch) = channel(url).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok((conn, ch))
}

/// A connection to `url` and a channel on it.
pub async fn channel(url: &str) -> anyhow::Result<(Connection, Channel)> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    Ok((conn, ch))
}

/// Publishes `body` through `exchange` with `routing_key` on a confirming channel, and
/// answers whether the broker confirmed it (`false`: nacked).
pub async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> anyhow::Result<bool> {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await?
        .await?;
    Ok(matches!(confirm, Confirmation::Ack(_)))
}
