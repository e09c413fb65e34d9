//! The Broker controller against a real API server (etcd + kube-apiserver, no pods): the
//! objects that run a Broker are applied, owned and put back when changed, the status
//! tells the story — and scaling down drains nodes through the admin API (of a real
//! cluster of `petrel` processes standing for the pods) before the StatefulSet shrinks.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use petrel_api::admin::v1::{self as api, admin_client::AdminClient};
use petrel_operator::conditions::PROGRESSING;
use petrel_operator::crd::Broker;
use petrel_tests::cluster::Cluster;
use serde_json::{Value, json};
use support::{ControlPlane, run_operator, wait_for};

const TIMEOUT: Duration = Duration::from_secs(30);
const NS: &str = "default";

fn broker(name: &str, spec: Value, admin_url: Option<&str>) -> anyhow::Result<Broker> {
    let mut object = json!({
        "apiVersion": "petrel.io/v1alpha1", "kind": "Broker",
        "metadata": {"name": name}, "spec": spec,
    });
    if let Some(url) = admin_url {
        object["metadata"]["annotations"] = json!({"petrel.io/admin-url": url});
    }
    Ok(serde_json::from_value(object)?)
}

fn condition(b: &Broker, type_: &str) -> Option<(String, String, String)> {
    b.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The StatefulSet's replicas once it exists.
async fn replicas(client: &Client, name: &str) -> anyhow::Result<Option<i32>> {
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    Ok(sets.get_opt(name).await?.and_then(|s| s.spec?.replicas))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_becomes_its_objects_owned_kept_and_described() -> anyhow::Result<()> {
    let (_plane, client) = ControlPlane::installed().await?;
    let operator = run_operator(&client)?;
    let brokers: Api<Broker> = Api::namespaced(client.clone(), NS);
    // No admin API answers (there are no pods): what it shows comes from Kubernetes.
    let nowhere = format!("http://127.0.0.1:{}", petrel_tests::free_port()?);
    brokers
        .create(
            &PostParams::default(),
            &broker(
                "petrel",
                json!({"replicas": 3, "image": "localhost/petrel:dev",
                       "config": {"segment_bytes": "1048576"},
                       "listeners": {"mqtt": {"enabled": true, "port": 1883}}}),
                Some(&nowhere),
            )?,
        )
        .await?;
    let described = wait_for(&brokers, "petrel", TIMEOUT, "described", |b| {
        b.is_some_and(|b| condition(b, PROGRESSING).is_some())
    })
    .await?
    .context("gone")?;
    let uid = described.uid().context("uid")?;

    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let set = sets.get("petrel").await?;
    let owner = &set.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("Broker", uid.as_str())
    );
    assert_eq!(set.spec.as_ref().and_then(|s| s.replicas), Some(3));
    Api::<Service>::namespaced(client.clone(), NS)
        .get("petrel")
        .await?;
    Api::<Service>::namespaced(client.clone(), NS)
        .get("petrel-headless")
        .await?;
    Api::<ServiceAccount>::namespaced(client.clone(), NS)
        .get("petrel")
        .await?;
    Api::<PodDisruptionBudget>::namespaced(client.clone(), NS)
        .get("petrel")
        .await?;
    let config = Api::<ConfigMap>::namespaced(client.clone(), NS)
        .get("petrel-config")
        .await?;
    let file = &config.data.context("no data")?["petrel.yaml"];
    ensure!(file.contains("segment_bytes: 1048576"), "{file}");

    let (ready, reason, message) = condition(&described, "Ready").context("no Ready")?;
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("False", "PodsNotReady"),
        "{message}"
    );
    let (_, _, progress) = condition(&described, PROGRESSING).context("no Progressing")?;
    ensure!(progress.contains("0 of 3"), "{progress}");
    let (degraded, _, unserved) = condition(&described, "Degraded").context("no Degraded")?;
    ensure!(
        degraded == "True" && unserved.contains("mqtt"),
        "{unserved}"
    );

    // Drift: a deleted Service comes back, a changed image is put back.
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    services.delete("petrel", &DeleteParams::default()).await?;
    wait_for(&services, "petrel", TIMEOUT, "recreated", |s| {
        s.is_some_and(|s| s.metadata.deletion_timestamp.is_none())
    })
    .await?;
    let tampered = json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
        "spec": {"template": {"spec": {"containers": [{"name": "broker", "image": "other:1"}]}}}});
    sets.patch(
        "petrel",
        &PatchParams::apply("someone-else").force(),
        &Patch::Apply(&tampered),
    )
    .await?;
    let image = |s: &StatefulSet| {
        s.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers[0].image.clone())
    };
    wait_for(&sets, "petrel", TIMEOUT, "image restored", |s| {
        s.and_then(image).as_deref() == Some("localhost/petrel:dev")
    })
    .await?;

    // A config change changes the pod template (the pods will roll); scaling does not.
    let digest = |s: &StatefulSet| {
        s.spec
            .as_ref()?
            .template
            .metadata
            .as_ref()?
            .annotations
            .as_ref()?
            .get("petrel.io/config-digest")
            .cloned()
    };
    let before = digest(&sets.get("petrel").await?).context("no digest")?;
    brokers
        .patch(
            "petrel",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"config": {"segment_bytes": "2097152"}}})),
        )
        .await?;
    wait_for(&sets, "petrel", TIMEOUT, "a new digest", |s| {
        s.and_then(digest).is_some_and(|d| d != before)
    })
    .await?;

    // Deleting the Broker leaves nothing of it behind a finalizer.
    brokers.delete("petrel", &DeleteParams::default()).await?;
    wait_for(&brokers, "petrel", TIMEOUT, "deleted", |b| b.is_none()).await?;
    operator.abort();
    Ok(())
}

/// The node's state in the cluster, as node 1 reports it; `None` if not a member.
async fn node_state(
    admin: &mut AdminClient<tonic::transport::Channel>,
    id: u64,
) -> anyhow::Result<Option<String>> {
    let status = admin
        .get_cluster_status(api::GetClusterStatusRequest {})
        .await?
        .into_inner();
    Ok(status
        .nodes
        .into_iter()
        .find(|n| n.id == id)
        .map(|n| n.state))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_down_drains_first_and_growing_again_cancels_the_drain() -> anyhow::Result<()> {
    // Nodes 1 to 3 stand for the pods of ordinals 1 to 3 (there is no pod 0 here).
    let mut cluster = Cluster::start(3)?;
    let url = format!("http://127.0.0.1:{}", cluster.ports[0]);
    let mut admin = AdminClient::connect(url.clone()).await?;
    // Three replicas of each partition: with three nodes, node 3 cannot be drained.
    admin
        .create_destination(api::CreateDestinationRequest {
            spec: Some(api::DestinationSpec {
                kind: api::Kind::Topic.into(),
                name: "t".into(),
                partitions: 2,
                replication_factor: 3,
                ..api::DestinationSpec::default()
            }),
        })
        .await?;

    let (_plane, client) = ControlPlane::installed().await?;
    let operator = run_operator(&client)?;
    let brokers: Api<Broker> = Api::namespaced(client.clone(), NS);
    brokers
        .create(
            &PostParams::default(),
            &broker("petrel", json!({"replicas": 4}), Some(&url))?,
        )
        .await?;
    let deadline = Instant::now() + TIMEOUT;
    while replicas(&client, "petrel").await? != Some(4) {
        ensure!(Instant::now() < deadline, "no StatefulSet of 4");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let scale = |n: i32| Patch::Merge(json!({"spec": {"replicas": n}}));

    // 4 → 3: node 3 drains, and cannot; the StatefulSet keeps 4 meanwhile.
    brokers
        .patch("petrel", &PatchParams::default(), &scale(3))
        .await?;
    let waiting = wait_for(&brokers, "petrel", TIMEOUT, "draining", |b| {
        b.and_then(|b| condition(b, PROGRESSING))
            .is_some_and(|(_, _, m)| m.contains("draining node 3"))
    })
    .await?
    .context("gone")?;
    eprintln!("{:?}", condition(&waiting, PROGRESSING));
    assert_eq!(
        node_state(&mut admin, 3).await?.as_deref(),
        Some("draining")
    );
    assert_eq!(
        replicas(&client, "petrel").await?,
        Some(4),
        "shrunk before the drain"
    );

    // Back to 4 mid-drain: the drain is cancelled.
    brokers
        .patch("petrel", &PatchParams::default(), &scale(4))
        .await?;
    let deadline = Instant::now() + TIMEOUT;
    while node_state(&mut admin, 3).await?.as_deref() != Some("active") {
        ensure!(Instant::now() < deadline, "node 3 still draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // With a fourth node, 5 → 4 drains node 4 onto the others, then shrinks, then the
    // drained node leaves the cluster.
    cluster.add_node()?;
    brokers
        .patch("petrel", &PatchParams::default(), &scale(5))
        .await?;
    let deadline = Instant::now() + TIMEOUT;
    while replicas(&client, "petrel").await? != Some(5) {
        ensure!(Instant::now() < deadline, "no StatefulSet of 5");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    brokers
        .patch("petrel", &PatchParams::default(), &scale(4))
        .await?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let shrunk = replicas(&client, "petrel").await? == Some(4);
        let progress = admin
            .get_decommission_progress(api::NodeRef { node_id: 4 })
            .await;
        match progress {
            Ok(p) => ensure!(
                !shrunk || p.get_ref().done,
                "the StatefulSet shrank while node 4 held {} replicas",
                p.get_ref().partitions_remaining
            ),
            // Forgotten: it was drained, and its pod is gone.
            Err(s) if s.code() == tonic::Code::NotFound => {
                let shrunk = replicas(&client, "petrel").await? == Some(4);
                ensure!(shrunk, "node 4 left before the StatefulSet shrank");
                break;
            }
            Err(s) => return Err(s.into()),
        }
        ensure!(Instant::now() < deadline, "node 4 never left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = admin
        .get_cluster_status(api::GetClusterStatusRequest {})
        .await?
        .into_inner();
    assert_eq!(status.nodes.len(), 3);
    operator.abort();
    Ok(())
}

/// The default user's credentials in `secret`: username and password.
fn credentials(secret: &Secret) -> anyhow::Result<(String, String)> {
    let data = secret.data.as_ref().context("no data")?;
    let text = |key: &str| -> anyhow::Result<String> {
        let ByteString(bytes) = data.get(key).with_context(|| format!("no {key}"))?;
        Ok(String::from_utf8(bytes.clone())?)
    };
    let uri = text("uri")?;
    let (user, password) = (text("username")?, text("password")?);
    ensure!(
        uri == format!("amqp://{user}:{password}@petrel.{NS}.svc:5672/%2f"),
        "{uri}"
    );
    Ok((user, password))
}

/// Waits until the broker at `admin` has `user` and lets it open the default vhost.
async fn user_made(
    admin: &mut AdminClient<tonic::transport::Channel>,
    user: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let users = admin
            .list_users(api::ListUsersRequest {})
            .await?
            .into_inner()
            .users;
        if users
            .iter()
            .any(|u| u.name == user && u.vhosts.iter().any(|v| v == "/"))
        {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "no user {user}: {users:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_gets_a_default_user_whose_secret_lets_an_amqp_client_in() -> anyhow::Result<()> {
    // One node stands for the Broker's single pod.
    let cluster = Cluster::start(1)?;
    let url = format!("http://127.0.0.1:{}", cluster.ports[0]);
    let (_plane, client) = ControlPlane::installed().await?;
    let operator = run_operator(&client)?;
    let brokers: Api<Broker> = Api::namespaced(client.clone(), NS);
    brokers
        .create(
            &PostParams::default(),
            &broker(
                "petrel",
                json!({"replicas": 1, "image": "localhost/petrel:dev"}),
                Some(&url),
            )?,
        )
        .await?;

    // The Secret, owned by the Broker, and named in its status.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let secret = wait_for(&secrets, "petrel-default-user", TIMEOUT, "made", |s| {
        s.is_some()
    })
    .await?
    .context("gone")?;
    let (user, password) = credentials(&secret)?;
    ensure!(password.len() >= 32, "a short password: {password}");
    let owner = brokers.get("petrel").await?.uid().context("uid")?;
    ensure!(secret.owner_references().iter().any(|o| o.uid == owner));
    wait_for(&brokers, "petrel", TIMEOUT, "naming its Secret", |b| {
        b.and_then(|b| b.status.as_ref())
            .and_then(|s| s.default_user_secret.as_deref())
            == Some("petrel-default-user")
    })
    .await?;

    // The user is made on the broker, and a client logs in with the Secret's credentials.
    let mut admin = AdminClient::connect(url.clone()).await?;
    user_made(&mut admin, &user).await?;
    let amqp = cluster.nodes[0].amqp_addr();
    let login = format!("amqp://{user}:{password}@{amqp}/%2f");
    let (conn, _channel) = petrel_tests::amqp::confirming_channel(&login).await?;
    conn.close(200, "bye".into()).await?;

    // Deleted on the broker, it is made again, with the password the Secret still holds.
    admin
        .delete_user(api::UserRef { name: user.clone() })
        .await?;
    user_made(&mut admin, &user).await?;
    let again = secrets.get("petrel-default-user").await?;
    ensure!(credentials(&again)? == (user.clone(), password.clone()));
    let (conn, _channel) = petrel_tests::amqp::confirming_channel(&login).await?;
    conn.close(200, "bye".into()).await?;

    // The Secret deleted by hand: a new one, with a new password, which the brokers take.
    secrets
        .delete("petrel-default-user", &DeleteParams::default())
        .await?;
    let rotated = wait_for(&secrets, "petrel-default-user", TIMEOUT, "unmarked", |s| {
        s.is_some_and(|s| {
            s.metadata.uid != secret.metadata.uid
                && !s.annotations().contains_key("petrel.io/password-pending")
        })
    })
    .await?
    .context("gone")?;
    let (_, new_password) = credentials(&rotated)?;
    ensure!(new_password != password, "the password did not change");
    let new_login = format!("amqp://{user}:{new_password}@{amqp}/%2f");
    let (conn, _channel) = petrel_tests::amqp::confirming_channel(&new_login)
        .await
        .context("the new password")?;
    conn.close(200, "bye".into()).await?;
    ensure!(
        petrel_tests::amqp::confirming_channel(&login)
            .await
            .is_err(),
        "the old password still lets a client in"
    );
    operator.abort();
    Ok(())
}
