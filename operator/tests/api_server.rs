//! The custom resources on a real Kubernetes API server (etcd + kube-apiserver built by
//! `e2e/k8s/build`, started by `e2e/k8s/apiserver`): the definitions install, and the API
//! server refuses bad objects with readable messages, as `kubectl apply` shows them.

mod support;

use std::path::Path;

use anyhow::{Context, ensure};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use petrel_operator::crd::Queue;
use serde_json::{Value, json};
use support::ControlPlane;

/// The API server's answer to creating `object`: `Ok` or its message.
async fn create<K>(api: &Api<K>, object: Value) -> anyhow::Result<Result<(), String>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(object)?;
    Ok(api
        .create(&PostParams::default(), &object)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string()))
}

fn queue(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "petrel.io/v1alpha1", "kind": "Queue",
           "metadata": {"name": name}, "spec": spec})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_takes_the_definitions_and_refuses_bad_objects_readably()
-> anyhow::Result<()> {
    let (_plane, client) = ControlPlane::installed().await?;
    let queues: Api<Queue> = Api::namespaced(client.clone(), "default");

    let zero = queue(
        "zero",
        json!({"brokerRef": {"name": "petrel"}, "partitions": 0}),
    );
    let refused = create(&queues, zero).await?;
    ensure!(
        refused.as_ref().is_err_and(
            |e| e.contains("spec.partitions") && e.contains("greater than or equal to 1")
        ),
        "{refused:?}"
    );

    let work = queue(
        "work",
        json!({"brokerRef": {"name": "petrel"}, "partitions": 2}),
    );
    create(&queues, work).await?.map_err(anyhow::Error::msg)?;
    let patch = |spec: Value| Patch::Merge(json!({"spec": spec}));
    let fewer = queues
        .patch(
            "work",
            &PatchParams::default(),
            &patch(json!({"partitions": 1})),
        )
        .await;
    ensure!(
        fewer
            .as_ref()
            .is_err_and(|e| e.to_string().contains("partitions can only grow")),
        "{fewer:?}"
    );
    let moved = queues
        .patch(
            "work",
            &PatchParams::default(),
            &patch(json!({"brokerRef": {"name": "other"}})),
        )
        .await;
    ensure!(
        moved
            .as_ref()
            .is_err_and(|e| e.to_string().contains("brokerRef cannot change")),
        "{moved:?}"
    );
    let more = queues
        .patch(
            "work",
            &PatchParams::default(),
            &patch(json!({"partitions": 3})),
        )
        .await?;
    assert_eq!(more.spec.partitions, 3);

    // Unknown enum values, duplicate subscriptions and an empty Broker, in the API
    // server's words (raw objects: the typed client would refuse them first).
    let raw = |kind: &str, plural: &str| {
        let resource = kube::api::ApiResource {
            group: "petrel.io".into(),
            version: "v1alpha1".into(),
            api_version: "petrel.io/v1alpha1".into(),
            kind: kind.into(),
            plural: plural.into(),
        };
        Api::<kube::api::DynamicObject>::namespaced_with(client.clone(), "default", &resource)
    };
    let cases = [
        (
            raw("Queue", "queues"),
            queue(
                "odd",
                json!({"brokerRef": {"name": "petrel"}, "overflow": "sideways"}),
            ),
            "supported values",
        ),
        (
            raw("Topic", "topics"),
            json!({"apiVersion": "petrel.io/v1alpha1", "kind": "Topic", "metadata": {"name": "t"},
                   "spec": {"brokerRef": {"name": "petrel"},
                            "subscriptions": [{"name": "a"}, {"name": "a"}]}}),
            "Duplicate value",
        ),
        (
            raw("Broker", "brokers"),
            json!({"apiVersion": "petrel.io/v1alpha1", "kind": "Broker", "metadata": {"name": "b"},
                   "spec": {"replicas": 0}}),
            "greater than or equal to 1",
        ),
        (
            raw("Broker", "brokers"),
            json!({"apiVersion": "petrel.io/v1alpha1", "kind": "Broker", "metadata": {"name": "c"},
                   "spec": {"storage": {"size": "0"}}}),
            "storage size must be more than zero",
        ),
    ];
    for (api, object, expected) in cases {
        let refused = create(&api, object).await?;
        ensure!(
            refused.as_ref().is_err_and(|e| e.contains(expected)),
            "expected {expected:?}: {refused:?}"
        );
    }
    // The chart's examples are taken as written.
    for (name, kind, plural) in [
        ("broker.yaml", "Broker", "brokers"),
        ("queue.yaml", "Queue", "queues"),
        ("topic.yaml", "Topic", "topics"),
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../charts/petrel/examples")
            .join(name);
        let object: Value = serde_yaml::from_str(&std::fs::read_to_string(&path)?)?;
        create(&raw(kind, plural), object)
            .await?
            .map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_admission_policy_refuses_a_replication_factor_above_the_brokers_replicas()
-> anyhow::Result<()> {
    let (_plane, client) = ControlPlane::installed().await?;
    // The policy and its binding, as the chart installs them.
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/petrel/templates/validation.yaml");
    let text = std::fs::read_to_string(&path)?;
    for document in serde_yaml::Deserializer::from_str(&text) {
        let object: kube::api::DynamicObject = serde::Deserialize::deserialize(document)?;
        let types = object.types.clone().context("apiVersion and kind")?;
        let (group, version) = types.api_version.split_once('/').context("group")?;
        let gvk = kube::api::GroupVersionKind::gvk(group, version, &types.kind);
        let (resource, _) = kube::discovery::pinned_kind(&client, &gvk).await?;
        let api: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), &resource);
        api.create(&PostParams::default(), &object).await?;
    }
    let brokers: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &kube::api::ApiResource::erase::<petrel_operator::crd::Broker>(&()),
    );
    create(
        &brokers,
        json!({"apiVersion": "petrel.io/v1alpha1", "kind": "Broker",
        "metadata": {"name": "petrel"}, "spec": {"replicas": 3}}),
    )
    .await?
    .map_err(anyhow::Error::msg)?;
    let queues: Api<Queue> = Api::namespaced(client.clone(), "default");
    // The policy takes effect within moments of being made: retry until it refuses.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let refused = loop {
        let wide = queue(
            "wide",
            json!({"brokerRef": {"name": "petrel"}, "replicationFactor": 5}),
        );
        match create(&queues, wide).await? {
            Err(message) => break message,
            Ok(()) => {
                queues.delete("wide", &Default::default()).await?;
                ensure!(std::time::Instant::now() < deadline, "never refused");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    };
    ensure!(
        refused.contains("spec.replicationFactor: 5 is above the 3 replicas of Broker petrel"),
        "{refused}"
    );
    let fits = queue(
        "fits",
        json!({"brokerRef": {"name": "petrel"}, "replicationFactor": 3}),
    );
    create(&queues, fits).await?.map_err(anyhow::Error::msg)?;
    let elsewhere = queue(
        "elsewhere",
        json!({"brokerRef": {"name": "other"}, "replicationFactor": 5}),
    );
    create(&queues, elsewhere)
        .await?
        .map_err(anyhow::Error::msg)?;
    Ok(())
}
