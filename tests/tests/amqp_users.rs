//! Users, as a RabbitMQ operator manages them (`rabbitmqctl add_user`, `set_permissions`):
//! created with the CLI, logged in with PLAIN by pika and lapin, let into the vhosts they
//! are given and no others.

use std::time::Duration;

use anyhow::ensure;
use lapin::{Connection, ConnectionProperties};
use petrel_tests::{PetrelProcess, Serve};

const TIMEOUT: Duration = Duration::from_secs(20);

/// How a connection as `user`:`password` to `vhost` ends: `Ok` if it opened, else the
/// error lapin reports.
async fn connect(
    petrel: &PetrelProcess,
    user: &str,
    password: &str,
    vhost: &str,
) -> Result<Connection, String> {
    let url = format!("amqp://{user}:{password}@{}/{vhost}", petrel.amqp_addr());
    Connection::connect(&url, ConnectionProperties::default())
        .await
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_logs_in_with_its_password_and_opens_only_the_vhosts_it_is_given()
-> anyhow::Result<()> {
    let mut petrel = Serve::new()?.start()?;
    petrel.wait_ready(TIMEOUT)?;
    petrel.cli_ok(&["vhost", "create", "shop"])?;
    petrel.cli_ok(&[
        "user",
        "add",
        "alice",
        "--password",
        "wonder",
        "--tag",
        "monitoring",
    ])?;
    petrel.cli_ok(&["user", "permit", "alice", "--vhost", "shop"])?;
    let listed: serde_json::Value =
        serde_json::from_str(&petrel.cli_ok(&["user", "list", "-o", "json"])?)?;
    assert_eq!(
        listed,
        serde_json::json!([{"name": "alice", "tags": ["monitoring"], "vhosts": ["shop"]}])
    );

    // Her vhost opens; "/" is not hers (530); a wrong password is refused (403).
    let conn = connect(&petrel, "alice", "wonder", "shop")
        .await
        .map_err(anyhow::Error::msg)?;
    conn.create_channel().await?;
    let not_hers = connect(&petrel, "alice", "wonder", "%2f").await.err();
    ensure!(
        not_hers
            .as_ref()
            .is_some_and(|e| e.contains("NOT_ALLOWED") && e.contains("alice")),
        "{not_hers:?}"
    );
    let wrong = connect(&petrel, "alice", "guess", "shop").await.err();
    ensure!(
        wrong.as_ref().is_some_and(|e| e.contains("ACCESS_REFUSED")),
        "{wrong:?}"
    );
    // guest still opens any vhost from loopback.
    connect(&petrel, "guest", "guest", "shop")
        .await
        .map_err(anyhow::Error::msg)?;

    // A new password replaces the old; forbidding and deleting take effect at once.
    petrel.cli_ok(&["user", "add", "alice", "--password", "land"])?;
    ensure!(connect(&petrel, "alice", "wonder", "shop").await.is_err());
    connect(&petrel, "alice", "land", "shop")
        .await
        .map_err(anyhow::Error::msg)?;
    petrel.cli_ok(&["user", "forbid", "alice", "--vhost", "shop"])?;
    ensure!(connect(&petrel, "alice", "land", "shop").await.is_err());
    petrel.cli_ok(&["user", "delete", "alice"])?;
    let gone = connect(&petrel, "alice", "land", "shop").await.err();
    ensure!(
        gone.as_ref().is_some_and(|e| e.contains("ACCESS_REFUSED")),
        "{gone:?}"
    );

    // Bad requests get clear errors.
    for (args, expected) in [
        (&["user", "delete", "nobody"][..], "not found"),
        (
            &["user", "permit", "nobody", "--vhost", "shop"][..],
            "not found",
        ),
        (
            &["user", "add", "bob", "--password", ""][..],
            "needs a password",
        ),
    ] {
        let out = petrel.cli(args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains(expected),
            "petrel {args:?}: {stderr}"
        );
    }
    Ok(())
}
