//! The custom resource definitions: `crds/` is what `crdgen` writes, the chart's examples
//! are valid, and the rules the API server enforces refuse what they should — CEL rules
//! evaluated here as the API server would, the structural ones read from the schema.

use std::path::Path;

use anyhow::{Context, ensure};
use kube::CustomResourceExt;
use petrel_operator::crd::{self, Broker, Queue, Topic};
use serde_json::{Value, json};

fn repository() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn the_crds_in_the_repository_are_what_crdgen_writes() -> anyhow::Result<()> {
    for definition in crd::all() {
        let name = crd::file_name(&definition);
        let path = repository().join("crds").join(&name);
        let stored = std::fs::read_to_string(&path)
            .with_context(|| format!("{} is missing", path.display()))?;
        ensure!(
            stored == crd::to_yaml(&definition)?,
            "crds/{name} is stale: run `cargo run -p petrel-operator --bin crdgen`"
        );
    }
    Ok(())
}

/// An example from the chart, as the API server would take it.
fn example(name: &str) -> anyhow::Result<Value> {
    let path = repository().join("charts/petrel/examples").join(name);
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    Ok(serde_yaml::from_str(&text)?)
}

#[test]
fn the_chart_examples_are_valid_resources() -> anyhow::Result<()> {
    let broker: Broker = serde_json::from_value(example("broker.yaml")?)?;
    assert_eq!(broker.spec.replicas, 3);
    broker.validate_cel()?;
    let queue: Queue = serde_json::from_value(example("queue.yaml")?)?;
    assert_eq!(queue.spec.vhost, "/", "the default vhost");
    assert_eq!(queue.spec.partitions, 1, "one partition by default");
    queue.validate_cel()?;
    let topic: Topic = serde_json::from_value(example("topic.yaml")?)?;
    assert_eq!(topic.spec.partitions, 6);
    topic.validate_cel()?;
    Ok(())
}

/// `base` with `change` merged into its spec.
fn with_spec(base: &Value, change: Value) -> Value {
    let mut changed = base.clone();
    if let (Some(spec), Some(change)) = (changed["spec"].as_object_mut(), change.as_object()) {
        for (k, v) in change {
            spec.insert(k.clone(), v.clone());
        }
    }
    changed
}

/// The messages of the CEL rules that refuse `new` (replacing `old`, if given).
fn refusals<K>(new: &Value, old: Option<&Value>) -> anyhow::Result<String>
where
    K: CustomResourceExt + serde::de::DeserializeOwned + serde::Serialize,
{
    let new: K = serde_json::from_value(new.clone())?;
    let result = match old {
        Some(old) => {
            kube::core::cel::validate_cel_update(&new, &serde_json::from_value::<K>(old.clone())?)
        }
        None => kube::core::cel::validate_cel(&new),
    };
    Ok(result.err().map(|e| e.to_string()).unwrap_or_default())
}

#[test]
fn transition_rules_refuse_fewer_partitions_and_a_new_broker_or_vhost() -> anyhow::Result<()> {
    let queue = example("queue.yaml")?;
    let grown = with_spec(&queue, json!({"partitions": 4}));
    assert_eq!(refusals::<Queue>(&grown, Some(&queue))?, "");
    let shrunk = with_spec(&grown, json!({"partitions": 2}));
    assert!(refusals::<Queue>(&shrunk, Some(&grown))?.contains("partitions can only grow"));
    let moved = with_spec(&queue, json!({"brokerRef": {"name": "other"}}));
    assert!(refusals::<Queue>(&moved, Some(&queue))?.contains("brokerRef cannot change"));
    let elsewhere = with_spec(&queue, json!({"vhost": "shop"}));
    assert!(refusals::<Queue>(&elsewhere, Some(&queue))?.contains("vhost cannot change"));

    let other_rf = with_spec(&queue, json!({"replicationFactor": 1}));
    assert!(
        refusals::<Queue>(&other_rf, Some(&queue))?.contains("replicationFactor cannot change")
    );
    let renamed = with_spec(&queue, json!({"name": "orders.v2"}));
    let renamed_again = with_spec(&queue, json!({"name": "orders.v3"}));
    assert!(refusals::<Queue>(&renamed_again, Some(&renamed))?.contains("name cannot change"));

    let topic = example("topic.yaml")?;
    let shrunk = with_spec(&topic, json!({"partitions": 3}));
    assert!(refusals::<Topic>(&shrunk, Some(&topic))?.contains("partitions can only grow"));

    let broker = example("broker.yaml")?;
    let resized = with_spec(&broker, json!({"storage": {"size": "2Gi"}}));
    assert!(refusals::<Broker>(&resized, Some(&broker))?.contains("storage cannot change"));
    let scaled = with_spec(&broker, json!({"replicas": 5}));
    assert_eq!(refusals::<Broker>(&scaled, Some(&broker))?, "");
    Ok(())
}

#[test]
fn queue_arguments_cannot_change_once_set_or_unset() -> anyhow::Result<()> {
    let queue = example("queue.yaml")?;
    let fixed = "queue arguments";
    for change in [
        json!({"messageTTL": "1h"}),
        json!({"maxLength": 5}),
        json!({"maxLengthBytes": 1024}),
        json!({"overflow": "drop-head"}),
        json!({"deadLetter": {"exchange": "elsewhere"}}),
        json!({"deliveryLimit": 3}),
    ] {
        let changed = with_spec(&queue, change.clone());
        let refused = refusals::<Queue>(&changed, Some(&queue))?;
        assert!(
            refused.contains(fixed),
            "{change} was let through: {refused:?}"
        );
    }
    let mut unset = queue.clone();
    if let Some(spec) = unset["spec"].as_object_mut() {
        spec.remove("messageTTL");
    }
    assert!(refusals::<Queue>(&unset, Some(&queue))?.contains(fixed));
    assert!(refusals::<Queue>(&queue, Some(&unset))?.contains(fixed));
    // What may change does: bindings, partitions, the deletion policy.
    let free = with_spec(
        &queue,
        json!({"bindings": [], "partitions": 2, "deletionPolicy": "retain"}),
    );
    assert_eq!(refusals::<Queue>(&free, Some(&queue))?, "");
    Ok(())
}

#[test]
fn creation_rules_refuse_an_empty_volume() -> anyhow::Result<()> {
    let broker = example("broker.yaml")?;
    let empty = with_spec(&broker, json!({"storage": {"size": "0"}}));
    assert!(refusals::<Broker>(&empty, None)?.contains("more than zero"));
    Ok(())
}

/// The schema of `spec.<path>` (dot-separated) in a definition.
fn spec_field(crd: &Value, path: &str) -> Value {
    let mut at = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    for part in path.split('.') {
        at = &at["properties"][part];
    }
    at.clone()
}

#[test]
fn the_schema_refuses_zero_sizes_and_unknown_values_at_the_api_server() -> anyhow::Result<()> {
    let queue = serde_json::to_value(Queue::crd())?;
    assert_eq!(
        spec_field(&queue, "partitions")["minimum"].as_f64(),
        Some(1.0)
    );
    assert_eq!(
        spec_field(&queue, "replicationFactor")["minimum"].as_f64(),
        Some(1.0)
    );
    assert_eq!(
        spec_field(&queue, "maxLength")["minimum"].as_f64(),
        Some(1.0)
    );
    assert_eq!(
        spec_field(&queue, "maxLengthBytes")["minimum"].as_f64(),
        Some(1.0)
    );
    assert_eq!(
        spec_field(&queue, "overflow")["enum"],
        json!(["drop-head", "reject-publish", "reject-publish-dlx"])
    );
    assert_eq!(
        spec_field(&queue, "deletionPolicy")["enum"],
        json!(["delete", "retain"])
    );
    assert!(
        spec_field(&queue, "messageTTL")["pattern"]
            .as_str()
            .is_some_and(|p| p.contains("ms|s|m|h|d"))
    );
    let broker = serde_json::to_value(Broker::crd())?;
    assert_eq!(
        spec_field(&broker, "replicas")["minimum"].as_f64(),
        Some(1.0)
    );
    assert_eq!(
        spec_field(&broker, "listeners.amqp")["properties"]["port"]["maximum"].as_f64(),
        Some(65535.0)
    );
    let topic = serde_json::to_value(Topic::crd())?;
    // Subscription names are unique: the API server keys the list by them.
    let subscriptions = spec_field(&topic, "subscriptions");
    assert_eq!(subscriptions["x-kubernetes-list-type"], "map");
    assert_eq!(subscriptions["x-kubernetes-list-map-keys"], json!(["name"]));
    assert_eq!(
        spec_field(&topic, "compression")["enum"],
        json!(["none", "lz4", "snappy", "zstd"])
    );
    Ok(())
}

#[test]
fn kubectl_get_shows_the_story_through_printer_columns_and_short_names() -> anyhow::Result<()> {
    for (definition, short, columns) in [
        (
            Broker::crd(),
            "pb",
            &["Replicas", "Ready Replicas", "Ready", "Version", "Age"][..],
        ),
        (
            Queue::crd(),
            "pq",
            &[
                "Broker",
                "Partitions",
                "Ready",
                "Messages",
                "Consumers",
                "Age",
            ][..],
        ),
        (
            Topic::crd(),
            "pt",
            &["Broker", "Partitions", "Ready", "Age"][..],
        ),
    ] {
        assert_eq!(definition.spec.group, petrel_operator::API_GROUP);
        assert_eq!(
            definition.spec.names.short_names.as_deref(),
            Some(&[short.to_owned()][..])
        );
        let version = &definition.spec.versions[0];
        assert_eq!(version.name, petrel_operator::API_VERSION);
        assert!(
            version
                .subresources
                .as_ref()
                .is_some_and(|s| s.status.is_some())
        );
        let shown: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(shown, columns);
    }
    Ok(())
}
