//! The operator on a real Kubernetes with real pods, as a user meets it: `helm install`
//! the chart, apply the example Broker, Queue and Topic, publish and consume through the
//! broker's Service with an unchanged AMQP client, have bad YAML refused, scale 3 → 5 → 3
//! and roll a config change while a producer publishes with confirms and a consumer
//! consumes (no confirmed message lost, no publish refused; clients reconnect when their
//! pod stops), keep a retained queue, and delete the Broker leaving nothing stuck.
//! Prints the times the closing notes quote (`cargo test -p petrel-e2e -- --nocapture`).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures_lite::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::await_condition;
use kube::{Api, Client};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use petrel_e2e::{TestCluster, repository, run};
use petrel_operator::conditions::{self, READY};
use petrel_operator::crd::{Broker, Queue, Topic};
use petrel_tests::amqp::{confirming_channel, publish_confirmed};
use serde_json::{Value, json};

const NS: &str = "e2e";
const OPERATOR_NS: &str = "petrel-system";
const WAIT: Duration = Duration::from_secs(180);
/// How long a client may take to connect: a pod that went away may swallow the attempt.
const SETUP: Duration = Duration::from_secs(5);

/// The chart's example `name`, as a JSON object.
fn example(name: &str) -> anyhow::Result<Value> {
    let path = repository().join("charts/petrel/examples").join(name);
    Ok(serde_yaml::from_str(&std::fs::read_to_string(path)?)?)
}

/// Waits until `test` holds for the object `name`; answers how long it took.
async fn until<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    test: impl Fn(Option<&K>) -> bool,
) -> anyhow::Result<Duration>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let started = Instant::now();
    tokio::time::timeout(WAIT, await_condition(api.clone(), name, test))
        .await
        .with_context(|| format!("{name}: not {what} within {WAIT:?}"))??;
    Ok(started.elapsed())
}

fn is_ready<K, F>(conditions: F) -> impl Fn(Option<&K>) -> bool
where
    F: Fn(&K) -> Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>,
{
    move |k| {
        k.and_then(&conditions)
            .is_some_and(|c| conditions::holds(c, READY))
    }
}

fn broker_ready(b: Option<&Broker>) -> bool {
    is_ready(|b: &Broker| b.status.as_ref().map(|s| &s.conditions))(b)
}

/// Everything one messaging run saw: ids confirmed by the broker, ids received.
#[derive(Default)]
struct Traffic {
    confirmed: BTreeSet<u64>,
    nacked: u64,
    received: BTreeSet<u64>,
    reconnects: u64,
    /// Why the consumer last lost its connection, if it did.
    consumer_error: Option<String>,
    stop: bool,
}

/// Publishes ids 0, 1, 2 … with confirms to `queue` until told to stop, connecting
/// again whenever the connection goes (a pod stopped): an id unconfirmed is published
/// again, so every id confirmed is one the queue holds.
async fn produce(url: String, queue: String, traffic: Arc<Mutex<Traffic>>) {
    let mut next = 0u64;
    loop {
        if lock(&traffic).stop {
            return;
        }
        let Ok(Ok((_conn, ch))) = tokio::time::timeout(SETUP, confirming_channel(&url)).await
        else {
            lock(&traffic).reconnects += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        loop {
            if lock(&traffic).stop {
                return;
            }
            let body = next.to_string();
            match publish_confirmed(
                &ch,
                "",
                &queue,
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            {
                Ok(true) => {
                    lock(&traffic).confirmed.insert(next);
                    next += 1;
                }
                Ok(false) => lock(&traffic).nacked += 1,
                Err(_) => {
                    lock(&traffic).reconnects += 1;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Consumes `queue`, acknowledging each message, connecting again whenever the
/// connection goes; records every id received.
async fn consume(url: String, queue: String, traffic: Arc<Mutex<Traffic>>) {
    loop {
        let attempt = async {
            let setup = async {
                let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
                let ch = conn.create_channel().await?;
                ch.basic_qos(100, BasicQosOptions::default()).await?;
                anyhow::Ok((conn, ch))
            };
            let (_conn, ch) = tokio::time::timeout(SETUP, setup).await??;
            let mut deliveries = ch
                .basic_consume(
                    queue.as_str().into(),
                    "e2e".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            while let Some(delivery) = deliveries.next().await {
                let delivery = delivery?;
                if let Some(id) = std::str::from_utf8(&delivery.data)
                    .ok()
                    .and_then(|s| s.parse().ok())
                {
                    lock(&traffic).received.insert(id);
                }
                delivery.ack(BasicAckOptions::default()).await?;
            }
            anyhow::Ok(())
        };
        let ended = match attempt.await {
            Ok(()) => "the deliveries ended".to_owned(),
            Err(e) => e.to_string(),
        };
        {
            let mut t = lock(&traffic);
            t.reconnects += 1;
            t.consumer_error = Some(ended);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn lock(traffic: &Mutex<Traffic>) -> std::sync::MutexGuard<'_, Traffic> {
    traffic
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `change` while a producer publishes to `queue` and a consumer consumes it (both
/// connecting again when their pod goes); then checks that the consumer received every
/// confirmed message and that none was refused (why, as the brokers logged it, if so).
async fn under_traffic<F, Fut>(
    cluster: &TestCluster,
    url: &str,
    queue: &str,
    change: F,
) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let traffic = Arc::new(Mutex::new(Traffic::default()));
    let producer = tokio::spawn(produce(url.to_owned(), queue.to_owned(), traffic.clone()));
    let consumer = tokio::spawn(consume(url.to_owned(), queue.to_owned(), traffic.clone()));
    let started = Instant::now();
    while lock(&traffic).confirmed.len() < 50 {
        ensure!(started.elapsed() < WAIT, "the producer never got going");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let changed = change().await;
    lock(&traffic).stop = true;
    let _ = producer.await;
    let deadline = Instant::now() + WAIT;
    loop {
        let (missing, confirmed) = {
            let t = lock(&traffic);
            (
                t.confirmed.difference(&t.received).count(),
                t.confirmed.len(),
            )
        };
        if missing == 0 {
            let t = lock(&traffic);
            eprintln!(
                "  traffic: {confirmed} confirmed, all received, {} nacked, {} reconnects",
                t.nacked, t.reconnects
            );
            if t.nacked > 0 {
                let logged = cluster.pod_warnings(NS);
                let why: Vec<&str> = logged
                    .lines()
                    .filter(|l| l.contains("not stored"))
                    .take(5)
                    .collect();
                bail!(
                    "{} publishes were refused; the brokers logged:\n{}",
                    t.nacked,
                    why.join("\n")
                );
            }
            break;
        }
        if Instant::now() > deadline {
            consumer.abort();
            let last = lock(&traffic).consumer_error.clone();
            bail!(
                "{missing} of {confirmed} confirmed messages never arrived (the consumer last failed with {last:?})"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    consumer.abort();
    changed
}

/// Applies `yaml` with kubectl, answering its error output if it was refused.
fn apply_refused(cluster: &TestCluster, yaml: &str) -> anyhow::Result<Option<String>> {
    use std::io::Write;
    let mut child = cluster
        .kubectl()
        .args(["apply", "-n", NS, "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(yaml.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok((!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// `petrel ARGS` inside broker pod `pod`.
fn petrel_in(cluster: &TestCluster, pod: &str, args: &[&str]) -> anyhow::Result<String> {
    run(cluster
        .kubectl()
        .args(["exec", "-n", NS, pod, "--", "petrel"])
        .args(args))
}

/// The uids of the broker pods now.
async fn pod_uids(pods: &Api<Pod>) -> anyhow::Result<BTreeSet<String>> {
    let listed = pods
        .list(&ListParams::default().labels("app.kubernetes.io/instance=petrel"))
        .await?;
    Ok(listed
        .items
        .into_iter()
        .filter_map(|p| p.metadata.uid)
        .collect())
}

/// How many broker pods are ready now.
async fn ready_pods(pods: &Api<Pod>) -> anyhow::Result<usize> {
    let listed = pods
        .list(&ListParams::default().labels("app.kubernetes.io/instance=petrel"))
        .await?;
    Ok(listed
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count())
}

async fn statefulset_replicas(client: &Client) -> anyhow::Result<Option<i32>> {
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    Ok(sets.get_opt("petrel").await?.and_then(|s| s.spec?.replicas))
}

/// Scales the Broker to `n` and waits until it is Ready at that size.
async fn scale(brokers: &Api<Broker>, n: i32) -> anyhow::Result<Duration> {
    brokers
        .patch(
            "petrel",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": n}})),
        )
        .await?;
    until(brokers, "petrel", &format!("Ready with {n}"), |b| {
        broker_ready(b)
            && b.and_then(|b| b.status.as_ref())
                .is_some_and(|s| s.ready_replicas == n && s.members.len() == n as usize)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_runs_a_broker_its_queues_and_topics_on_kubernetes() -> anyhow::Result<()> {
    let started = Instant::now();
    let cluster = TestCluster::provision()?;
    eprintln!("cluster up with images in {:?}", started.elapsed());
    let result = acceptance(&cluster, started).await;
    if result.is_err() {
        eprintln!("brokers' warnings:\n{}", cluster.pod_warnings(NS));
        eprintln!(
            "operator's warnings:\n{}",
            cluster.pod_warnings(OPERATOR_NS)
        );
        eprintln!("panics:\n{}", cluster.panics());
    }
    result
}

async fn acceptance(cluster: &TestCluster, started: Instant) -> anyhow::Result<()> {
    let client = cluster.client().await?;

    // helm install: the operator runs in the cluster.
    let (repo, tag) = cluster
        .operator_image
        .rsplit_once(':')
        .context("image tag")?;
    let installing = Instant::now();
    run(cluster
        .helm()
        .args([
            "install",
            "petrel",
            "charts/petrel",
            "--namespace",
            OPERATOR_NS,
            "--create-namespace",
            "--wait",
            "--timeout",
            "180s",
        ])
        .args([
            "--set",
            &format!("image.repository={repo}"),
            "--set",
            &format!("image.tag={tag}"),
        ])
        .args([
            "--set",
            &format!("image.pullPolicy={}", cluster.pull_policy),
            "--set",
            "resyncSeconds=5",
        ])
        .current_dir(repository()))?;
    eprintln!("helm install --wait: {:?}", installing.elapsed());

    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}}))?,
        )
        .await?;

    // The example Broker, with this build's image.
    let mut broker = example("broker.yaml")?;
    broker["spec"]["image"] = json!(cluster.broker_image);
    broker["metadata"]["annotations"] = json!({"petrel.io/image-pull-policy": cluster.pull_policy});
    let brokers: Api<Broker> = Api::namespaced(client.clone(), NS);
    brokers
        .create(&PostParams::default(), &serde_json::from_value(broker)?)
        .await?;
    let broker_ready_in = until(&brokers, "petrel", "Ready", broker_ready).await?;
    eprintln!("Broker (3 replicas) Ready in {broker_ready_in:?}");
    ensure!(
        broker_ready_in < Duration::from_secs(60),
        "the Broker took {broker_ready_in:?}"
    );
    let listed = run(cluster
        .kubectl()
        .args(["get", "brokers,queues,topics", "-n", NS]))?;
    ensure!(listed.contains("petrel"), "{listed}");

    // The example Queue and Topic.
    let queues: Api<Queue> = Api::namespaced(client.clone(), NS);
    let topics: Api<Topic> = Api::namespaced(client.clone(), NS);
    let asked = Instant::now();
    queues
        .create(
            &PostParams::default(),
            &serde_json::from_value(example("queue.yaml")?)?,
        )
        .await?;
    topics
        .create(
            &PostParams::default(),
            &serde_json::from_value(example("topic.yaml")?)?,
        )
        .await?;
    until(
        &queues,
        "orders",
        "Ready",
        is_ready(|q: &Queue| q.status.as_ref().map(|s| &s.conditions)),
    )
    .await?;
    let queue_ready_in = asked.elapsed();
    until(
        &topics,
        "events",
        "Ready",
        is_ready(|t: &Topic| t.status.as_ref().map(|s| &s.conditions)),
    )
    .await?;
    let topic_ready_in = asked.elapsed();
    eprintln!(
        "Queue Ready in {queue_ready_in:?}, Topic Ready in {topic_ready_in:?} after the Broker"
    );
    let topic = topics.get("events").await?;
    let partitions = topic.status.context("topic status")?.partitions;
    ensure!(
        partitions.len() == 6 && partitions.iter().all(|p| p.leader.is_some()),
        "{partitions:?}"
    );
    println!(
        "{}",
        run(cluster
            .kubectl()
            .args(["get", "brokers,queues,topics", "-n", NS]))?
    );

    // An AMQP client through the Service, as the Broker's default user: its credentials
    // are in the Secret the operator made (guest is loopback-only).
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let secret = secrets.get("petrel-default-user").await?;
    let field = |key: &str| -> anyhow::Result<String> {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .with_context(|| format!("no {key} in the Secret"))?;
        Ok(String::from_utf8(bytes.0.clone())?)
    };
    let (user, password) = (field("username")?, field("password")?);
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let ip = services
        .get("petrel")
        .await?
        .spec
        .and_then(|s| s.cluster_ip)
        .context("no ClusterIP")?;
    ensure!(
        cluster.is_local(),
        "reaching the Service from here needs the local cluster (or a port-forward)"
    );
    // Heartbeats every 2 s: a connection to a pod that went away is seen dead at once.
    let url = format!("amqp://{user}:{password}@{ip}:5672/%2f?heartbeat=2");
    // The user is made on the brokers once they form a cluster: at most a resync later.
    let deadline = Instant::now() + WAIT;
    let (_conn, ch) = loop {
        match confirming_channel(&url).await {
            Ok(connected) => break connected,
            Err(e) => {
                ensure!(
                    Instant::now() < deadline,
                    "the default user never got in: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    for i in 0..100u32 {
        ensure!(
            publish_confirmed(
                &ch,
                "amq.topic",
                "orders.created",
                &i.to_be_bytes(),
                BasicProperties::default()
            )
            .await?,
            "nacked"
        );
    }
    until(&queues, "orders", "showing 100 ready", |q| {
        q.and_then(|q| q.status.as_ref())
            .and_then(|s| s.messages_ready)
            == Some(100)
    })
    .await?;

    // Bad YAML is refused by the API server, readably.
    let zero = "apiVersion: petrel.io/v1alpha1\nkind: Queue\nmetadata: {name: bad}\nspec: {brokerRef: {name: petrel}, partitions: 0}\n";
    let refused = apply_refused(cluster, zero)?.context("partitions 0 was taken")?;
    ensure!(refused.contains("spec.partitions"), "{refused}");
    let wide = "apiVersion: petrel.io/v1alpha1\nkind: Queue\nmetadata: {name: wide}\nspec: {brokerRef: {name: petrel}, replicationFactor: 5}\n";
    let refused =
        apply_refused(cluster, wide)?.context("replication factor 5 on 3 replicas was taken")?;
    ensure!(refused.contains("replicationFactor"), "{refused}");
    let fewer = "apiVersion: petrel.io/v1alpha1\nkind: Topic\nmetadata: {name: events}\nspec: {brokerRef: {name: petrel}, partitions: 3, replicationFactor: 3}\n";
    let refused = apply_refused(cluster, fewer)?.context("fewer partitions were taken")?;
    ensure!(refused.contains("partitions can only grow"), "{refused}");

    // What the broker holds of the queue, for a failure's message.
    let describe = || {
        let shown = petrel_in(cluster, "petrel-0", &["queue", "describe", "orders"]);
        format!(
            "the queue on the broker:\n{}",
            shown.unwrap_or_else(|e| e.to_string())
        )
    };

    // Scale 3 → 5 → 3 under traffic: the scale-down drains first; nothing confirmed is
    // lost, nothing refused.
    under_traffic(cluster, &url, "orders", || async {
        let up = scale(&brokers, 5).await?;
        eprintln!("scale 3 → 5 Ready in {up:?}");
        let asked = Instant::now();
        let shrinking = tokio::spawn({
            let client = client.clone();
            async move {
                while statefulset_replicas(&client).await? != Some(3) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                anyhow::Ok(asked.elapsed())
            }
        });
        let down = scale(&brokers, 3).await?;
        let drain = shrinking.await??;
        eprintln!("scale 5 → 3: StatefulSet shrank after {drain:?} of draining, Ready in {down:?}");
        Ok(())
    })
    .await
    .with_context(describe)?;
    let members = brokers
        .get("petrel")
        .await?
        .status
        .context("status")?
        .members;
    ensure!(
        members.iter().map(|m| m.node_id).collect::<Vec<_>>() == vec![0, 1, 2],
        "{members:?}"
    );

    // A config change rolls the pods one at a time; publishes never fail.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let before = pod_uids(&pods).await?;
    under_traffic(cluster, &url, "orders", || async {
        let asked = Instant::now();
        let changed = brokers
            .patch(
                "petrel",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"config": {"log_level": "info,petrel_core=debug"}}})),
            )
            .await?;
        let generation = changed.metadata.generation;
        let mut most_down = 0;
        loop {
            let now = pod_uids(&pods).await?;
            let ready = ready_pods(&pods).await?;
            most_down = most_down.max(3 - ready.min(3));
            let restarted = before.iter().all(|uid| !now.contains(uid));
            let broker = brokers.get("petrel").await?;
            let status = broker.status.context("status")?;
            let settled = status.observed_generation == generation
                && conditions::holds(&status.conditions, READY)
                && !conditions::holds(&status.conditions, conditions::PROGRESSING);
            if restarted && ready == 3 && settled {
                break;
            }
            ensure!(
                asked.elapsed() < WAIT,
                "the roll did not finish: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "config change rolled all 3 pods in {:?}, at most {most_down} down at once",
            asked.elapsed()
        );
        ensure!(most_down <= 1, "{most_down} pods were down at once");
        Ok(())
    })
    .await
    .with_context(describe)?;

    // Everything consumed: the status shows the queue empty, as the broker does.
    until(&queues, "orders", "shown empty", |q| {
        q.and_then(|q| q.status.as_ref())
            .is_some_and(|s| s.messages_ready == Some(0) && s.messages_unacked == Some(0))
    })
    .await?;

    // A Queue with deletionPolicy retain: the broker keeps the queue.
    queues
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"deletionPolicy": "retain"}})),
        )
        .await?;
    until(&queues, "orders", "seen as retained", |q| {
        q.and_then(|q| q.status.as_ref())
            .and_then(|s| s.observed_generation)
            == q.and_then(|q| q.metadata.generation)
    })
    .await?;
    queues.delete("orders", &DeleteParams::default()).await?;
    until(&queues, "orders", "deleted", |q| q.is_none()).await?;
    let kept = petrel_in(cluster, "petrel-0", &["queue", "list"])?;
    ensure!(kept.contains("orders"), "the retained queue went: {kept}");

    // Deleting the Broker takes everything it owns; the Topic still goes at once.
    brokers.delete("petrel", &DeleteParams::default()).await?;
    until(&brokers, "petrel", "deleted", |b| b.is_none()).await?;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    until(&sets, "petrel", "collected", |s| s.is_none()).await?;
    topics.delete("events", &DeleteParams::default()).await?;
    until(&topics, "events", "deleted without its Broker", |t| {
        t.is_none()
    })
    .await?;
    eprintln!("whole run: {:?}", started.elapsed());
    Ok(())
}
