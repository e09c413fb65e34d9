//! The Queue and Topic controllers against a real API server (etcd + kube-apiserver, no
//! pods) and a real `petrel` process standing for the Broker's pods, reached through the
//! Broker's `petrel.io/admin-url` annotation: resources become queues and topics on the
//! broker, status shows what the broker reports, drift is put back, and deletion honours
//! `deletionPolicy` without ever getting stuck.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use petrel_api::admin::v1::{self as api, admin_client::AdminClient};
use petrel_operator::conditions::{self, READY};
use petrel_operator::crd::{Broker, Queue, Topic};
use petrel_tests::amqp::{confirming_channel, publish_confirmed};
use petrel_tests::{PetrelProcess, Serve};
use serde_json::{Value, json};
use support::{ControlPlane, run_operator, wait_for};
use tonic::transport::Channel;

const TIMEOUT: Duration = Duration::from_secs(30);
const NS: &str = "default";

/// A control plane with the definitions, a broker process, and the operator running.
struct Setup {
    _plane: ControlPlane,
    client: Client,
    petrel: PetrelProcess,
    operator: tokio::task::JoinHandle<()>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.operator.abort();
    }
}

impl Setup {
    async fn start() -> anyhow::Result<Setup> {
        let (plane, client) = ControlPlane::installed().await?;
        let mut petrel = Serve::new()?.start()?;
        petrel.wait_ready(TIMEOUT)?;
        let operator = run_operator(&client)?;
        Ok(Setup {
            _plane: plane,
            client,
            petrel,
            operator,
        })
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), NS)
    }

    /// A Broker whose admin API is the test's broker process (`url` to override).
    async fn broker(&self, name: &str, url: Option<String>) -> anyhow::Result<()> {
        let url = match url {
            Some(url) => url,
            None => format!(
                "http://{}",
                self.petrel.internal_addr().context("internal")?
            ),
        };
        let broker: Broker = serde_json::from_value(json!({
            "apiVersion": "petrel.io/v1alpha1", "kind": "Broker",
            // Paused: the Broker controller leaves alone what a process stands for.
            "metadata": {"name": name, "annotations": {"petrel.io/admin-url": url, "petrel.io/paused": "true"}},
            "spec": {"replicas": 1},
        }))?;
        self.api::<Broker>()
            .create(&PostParams::default(), &broker)
            .await?;
        Ok(())
    }

    async fn admin(&self) -> anyhow::Result<AdminClient<Channel>> {
        let addr = self.petrel.internal_addr().context("internal")?;
        Ok(AdminClient::connect(format!("http://{addr}")).await?)
    }

    /// The queue or topic on the broker, if there.
    async fn on_broker(
        &self,
        kind: api::Kind,
        name: &str,
    ) -> anyhow::Result<Option<api::Destination>> {
        let reference = api::DestinationRef {
            kind: kind.into(),
            name: name.to_owned(),
            vhost: String::new(),
        };
        match self.admin().await?.get_destination(reference).await {
            Ok(d) => Ok(Some(d.into_inner())),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(s.into()),
        }
    }

    /// Waits until the broker has (or lacks) `name`.
    async fn until_on_broker(
        &self,
        kind: api::Kind,
        name: &str,
        there: bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        while self.on_broker(kind, name).await?.is_some() != there {
            ensure!(
                Instant::now() < deadline,
                "{name} on the broker: never {there}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    async fn bindings(&self, queue: &str) -> anyhow::Result<Vec<(String, String)>> {
        let listed = api::ListBindingsRequest {
            vhost: String::new(),
            queue: queue.to_owned(),
        };
        let mut found: Vec<_> = self
            .admin()
            .await?
            .list_bindings(listed)
            .await?
            .into_inner()
            .bindings
            .into_iter()
            .map(|b| (b.exchange, b.routing_key))
            .collect();
        found.sort();
        Ok(found)
    }

    /// Waits for an Event with `reason` on the object named `name`.
    async fn until_event(&self, name: &str, reason: &str) -> anyhow::Result<()> {
        support::until_event(&self.api(), name, reason, TIMEOUT).await?;
        Ok(())
    }
}

fn queue(name: &str, spec: Value) -> anyhow::Result<Queue> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "petrel.io/v1alpha1", "kind": "Queue",
        "metadata": {"name": name}, "spec": spec,
    }))?)
}

fn ready<K: kube::Resource>(
    conditions: impl Fn(&K) -> Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>,
) -> impl Fn(Option<&K>) -> bool {
    move |k| {
        k.and_then(&conditions)
            .is_some_and(|c| conditions::holds(&c, READY))
    }
}

fn queue_conditions(
    q: &Queue,
) -> Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>> {
    q.status.as_ref().map(|s| s.conditions.clone())
}

/// The `Ready` condition's reason and message once it is `False` with `reason`.
async fn not_ready(queues: &Api<Queue>, name: &str, reason: &str) -> anyhow::Result<String> {
    let found = wait_for(queues, name, TIMEOUT, reason, |q| {
        q.and_then(queue_conditions).is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == READY && c.status == "False" && c.reason == reason)
        })
    })
    .await?
    .context("gone")?;
    let conditions = queue_conditions(&found).unwrap_or_default();
    Ok(conditions
        .iter()
        .find(|c| c.type_ == READY)
        .map(|c| c.message.clone())
        .unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_resource_is_made_bound_shown_and_kept_in_step() -> anyhow::Result<()> {
    let setup = Setup::start().await?;
    setup.broker("petrel", None).await?;
    let queues: Api<Queue> = setup.api();
    let asked = Instant::now();
    queues
        .create(
            &PostParams::default(),
            &queue(
                "orders",
                json!({"brokerRef": {"name": "petrel"}, "replicationFactor": 1,
                       "maxLength": 10, "overflow": "reject-publish", "messageTTL": "10m",
                       "bindings": [{"exchange": "amq.topic", "routingKey": "orders.#"}]}),
            )?,
        )
        .await?;
    let made = wait_for(&queues, "orders", TIMEOUT, "Ready", ready(queue_conditions))
        .await?
        .context("gone")?;
    eprintln!(
        "Queue Ready {} ms after it was created",
        asked.elapsed().as_millis()
    );
    let status = made.status.context("no status")?;
    assert_eq!(status.partitions.len(), 1);
    assert_eq!(status.partitions[0].leader, Some(1), "{status:?}");
    assert_eq!(status.observed_generation, made.metadata.generation);
    assert!(
        made.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"petrel.io/queue".to_owned())
    );

    let on_broker = setup
        .on_broker(api::Kind::Queue, "orders")
        .await?
        .context("not made")?;
    let arguments = on_broker
        .spec
        .context("spec")?
        .queue_arguments
        .context("args")?;
    assert_eq!(arguments.max_length, Some(10));
    assert_eq!(arguments.message_ttl_ms, Some(600_000));
    assert_eq!(
        setup.bindings("orders").await?,
        vec![("amq.topic".into(), "orders.#".into())]
    );

    // A message published through the binding shows in the status.
    let (_conn, ch) = confirming_channel(&setup.petrel.amqp_url()).await?;
    ensure!(
        publish_confirmed(&ch, "amq.topic", "orders.new", b"o1", Default::default()).await?,
        "nacked"
    );
    wait_for(&queues, "orders", TIMEOUT, "showing 1 ready", |q| {
        q.and_then(|q| q.status.as_ref())
            .and_then(|s| s.messages_ready)
            == Some(1)
    })
    .await?;

    // Bindings follow the spec; one a client made stays.
    let mut admin = setup.admin().await?;
    admin
        .bind(api::Binding {
            vhost: String::new(),
            exchange: "amq.fanout".into(),
            queue: "orders".into(),
            routing_key: String::new(),
        })
        .await?;
    queues
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"bindings": [{"exchange": "amq.direct", "routingKey": "o"}]}}),
            ),
        )
        .await?;
    let wanted = vec![
        ("amq.direct".to_owned(), "o".to_owned()),
        ("amq.fanout".to_owned(), String::new()),
    ];
    let deadline = Instant::now() + TIMEOUT;
    while setup.bindings("orders").await? != wanted {
        ensure!(
            Instant::now() < deadline,
            "bindings: {:?}",
            setup.bindings("orders").await?
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Deleted through the broker's own API: made again.
    admin
        .delete_destination(api::DestinationRef {
            kind: api::Kind::Queue.into(),
            name: "orders".into(),
            vhost: String::new(),
        })
        .await?;
    setup
        .until_on_broker(api::Kind::Queue, "orders", true)
        .await?;

    for reason in ["Created", "Bound", "Unbound"] {
        setup.until_event("orders", reason).await?;
    }

    // Deletion with the default policy takes the queue off the broker.
    queues.delete("orders", &DeleteParams::default()).await?;
    wait_for(&queues, "orders", TIMEOUT, "deleted", |q| q.is_none()).await?;
    setup
        .until_on_broker(api::Kind::Queue, "orders", false)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_queue_stays_on_the_broker_and_a_paused_one_is_left_alone() -> anyhow::Result<()>
{
    let setup = Setup::start().await?;
    setup.broker("petrel", None).await?;
    let queues: Api<Queue> = setup.api();
    let kept = queue(
        "kept",
        json!({"brokerRef": {"name": "petrel"}, "replicationFactor": 1,
               "name": "kept_v1", "deletionPolicy": "retain"}),
    )?;
    queues.create(&PostParams::default(), &kept).await?;
    wait_for(&queues, "kept", TIMEOUT, "Ready", ready(queue_conditions)).await?;
    setup
        .until_on_broker(api::Kind::Queue, "kept_v1", true)
        .await?;
    queues.delete("kept", &DeleteParams::default()).await?;
    wait_for(&queues, "kept", TIMEOUT, "deleted", |q| q.is_none()).await?;
    ensure!(
        setup
            .on_broker(api::Kind::Queue, "kept_v1")
            .await?
            .is_some(),
        "a retained queue was deleted from the broker"
    );

    // Paused: nothing is made until the annotation goes.
    let mut paused = queue(
        "paused",
        json!({"brokerRef": {"name": "petrel"}, "replicationFactor": 1}),
    )?;
    paused.metadata.annotations = Some([("petrel.io/paused".to_owned(), "true".to_owned())].into());
    queues.create(&PostParams::default(), &paused).await?;
    // A queue created after it is made: the controller has seen both by then (it
    // reconciles in the order of the watch, and a paused one at once).
    let witness = queue(
        "witness",
        json!({"brokerRef": {"name": "petrel"}, "replicationFactor": 1}),
    )?;
    queues.create(&PostParams::default(), &witness).await?;
    wait_for(
        &queues,
        "witness",
        TIMEOUT,
        "Ready",
        ready(queue_conditions),
    )
    .await?;
    let untouched = queues.get("paused").await?;
    ensure!(untouched.status.is_none(), "a paused queue got a status");
    ensure!(
        untouched.metadata.finalizers.is_none(),
        "a paused queue got a finalizer"
    );
    ensure!(
        setup.on_broker(api::Kind::Queue, "paused").await?.is_none(),
        "a paused queue was made"
    );
    queues
        .patch(
            "paused",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"petrel.io/paused": null}}})),
        )
        .await?;
    wait_for(&queues, "paused", TIMEOUT, "Ready", ready(queue_conditions)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_show_as_conditions_and_events_and_deletion_never_sticks() -> anyhow::Result<()> {
    let setup = Setup::start().await?;
    let queues: Api<Queue> = setup.api();

    // No such Broker.
    queues
        .create(
            &PostParams::default(),
            &queue("lost", json!({"brokerRef": {"name": "nowhere"}}))?,
        )
        .await?;
    let message = not_ready(&queues, "lost", "BrokerNotFound").await?;
    ensure!(message.contains("nowhere"), "{message}");
    setup.until_event("lost", "BrokerNotFound").await?;
    queues.delete("lost", &DeleteParams::default()).await?;
    wait_for(&queues, "lost", TIMEOUT, "deleted", |q| q.is_none()).await?;

    // A broker that does not answer: shown, and its deletion releases the Queue.
    let closed = petrel_tests::free_port()?;
    setup
        .broker("silent", Some(format!("http://127.0.0.1:{closed}")))
        .await?;
    queues
        .create(
            &PostParams::default(),
            &queue("stuck", json!({"brokerRef": {"name": "silent"}}))?,
        )
        .await?;
    let message = not_ready(&queues, "stuck", "BrokerUnreachable").await?;
    ensure!(message.contains(&closed.to_string()), "{message}");
    setup
        .api::<Broker>()
        .delete("silent", &DeleteParams::default())
        .await?;
    queues.delete("stuck", &DeleteParams::default()).await?;
    wait_for(&queues, "stuck", TIMEOUT, "deleted", |q| q.is_none()).await?;

    // What the broker refuses: a replication factor above its one node.
    setup.broker("petrel", None).await?;
    queues
        .create(
            &PostParams::default(),
            &queue(
                "wide",
                json!({"brokerRef": {"name": "petrel"}, "replicationFactor": 3}),
            )?,
        )
        .await?;
    let message = not_ready(&queues, "wide", "InvalidSpec").await?;
    ensure!(message.contains("replication factor"), "{message}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_resource_is_made_grown_and_shows_its_partitions() -> anyhow::Result<()> {
    let setup = Setup::start().await?;
    setup.broker("petrel", None).await?;
    let topics: Api<Topic> = setup.api();
    let topic: Topic = serde_json::from_value(json!({
        "apiVersion": "petrel.io/v1alpha1", "kind": "Topic", "metadata": {"name": "events"},
        "spec": {"brokerRef": {"name": "petrel"}, "partitions": 2, "replicationFactor": 1,
                 "retention": {"time": "1h"}},
    }))?;
    topics.create(&PostParams::default(), &topic).await?;
    let conditions = |t: &Topic| t.status.as_ref().map(|s| s.conditions.clone());
    let made = wait_for(&topics, "events", TIMEOUT, "Ready", ready(conditions))
        .await?
        .context("gone")?;
    let status = made.status.context("status")?;
    assert_eq!(status.partitions.len(), 2);
    ensure!(
        status.partitions.iter().all(|p| p.leader == Some(1)),
        "{status:?}"
    );
    let on_broker = setup
        .on_broker(api::Kind::Topic, "events")
        .await?
        .context("not made")?;
    assert_eq!(
        on_broker.spec.context("spec")?.retention_ms,
        Some(3_600_000)
    );

    topics
        .patch(
            "events",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"partitions": 3}})),
        )
        .await?;
    wait_for(&topics, "events", TIMEOUT, "grown", |t| {
        t.and_then(|t| t.status.as_ref())
            .is_some_and(|s| s.partitions.len() == 3)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_binary_serves_health_and_metrics_and_logs_json() -> anyhow::Result<()> {
    let (plane, client) = ControlPlane::installed().await?;
    let port = petrel_tests::free_port()?;
    let mut operator = std::process::Command::new(env!("CARGO_BIN_EXE_petrel-operator"))
        .args([
            "--http",
            &format!("127.0.0.1:{port}"),
            "--log-format",
            "json",
        ])
        .env("KUBECONFIG", plane.kubeconfig())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let addr = format!("127.0.0.1:{port}").parse()?;
    let result =
        async {
            let deadline = Instant::now() + TIMEOUT;
            loop {
                let ready = petrel_tests::http_get(addr, "/readyz", Duration::from_secs(1));
                if ready.is_ok_and(|r| r.status == 200) {
                    break;
                }
                ensure!(Instant::now() < deadline, "never ready");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // A Queue whose Broker is missing: one failed reconcile, counted.
            let queues: Api<Queue> = Api::namespaced(client.clone(), NS);
            queues
                .create(
                    &PostParams::default(),
                    &queue("q", json!({"brokerRef": {"name": "none"}}))?,
                )
                .await?;
            let deadline = Instant::now() + TIMEOUT;
            loop {
                let metrics = petrel_tests::http_get(addr, "/metrics", Duration::from_secs(1))?;
                if metrics.body.contains(
                "petrel_operator_reconcile_errors_total{kind=\"Queue\",reason=\"BrokerNotFound\"}",
            ) {
                ensure!(metrics.body.contains("petrel_operator_reconcile_duration_seconds"));
                break;
            }
                ensure!(
                    Instant::now() < deadline,
                    "no error counted:\n{}",
                    metrics.body
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(())
        }
        .await;
    operator.kill()?;
    let output = operator.wait_with_output()?;
    result?;
    let logs = String::from_utf8(output.stdout)?;
    ensure!(!logs.is_empty(), "no logs");
    for line in logs.lines() {
        serde_json::from_str::<Value>(line).with_context(|| format!("not JSON: {line}"))?;
    }
    Ok(())
}
