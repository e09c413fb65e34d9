//! A Broker as the Kubernetes objects that run it — ServiceAccount, ConfigMap, headless
//! and client Services, StatefulSet, PodDisruptionBudget — as pure functions of the
//! Broker (and the seed size of its cluster), each owned by the Broker so that deleting
//! it deletes them.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::admin::{ADMIN_PORT, headless_service};
use crate::crd::Broker;
use crate::error::Error;

/// The brokers' HTTP port: `/healthz`, `/readyz`, `/metrics`.
pub const HTTP_PORT: u16 = 9464;
/// Where each pod's volume is mounted: the broker's data directory.
pub const DATA_DIR: &str = "/var/lib/petrel";
/// Where the ConfigMap is mounted.
const CONFIG_DIR: &str = "/etc/petrel";
/// The ConfigMap's key holding the broker's settings file.
pub const CONFIG_FILE: &str = "petrel.yaml";
/// Pod template annotation: a digest of the settings, so that a change rolls the pods.
pub const CONFIG_DIGEST: &str = "petrel.io/config-digest";
/// The environment variable holding the seed size of the cluster.
pub const SEED_ENV: &str = "PETREL_REPLICAS";
/// Seconds a stopping pod is given by default.
const GRACE_SECONDS: i64 = 60;

/// Settings the operator sets itself (as environment variables, which win over the
/// settings file): `spec.config` may not set them.
const OWNED_SETTINGS: &[&str] = &[
    "data_dir",
    "peers",
    "peer_pattern",
    "replicas",
    "node_id",
    "internal_port",
    "http_port",
    "amqp_port",
    "config",
];

/// The label selector of everything the operator makes.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by=petrel-operator";

/// The labels of everything a Broker owns.
pub fn labels(broker: &Broker) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "petrel".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), broker.name_any()),
        (
            "app.kubernetes.io/component".to_owned(),
            "broker".to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "petrel-operator".to_owned(),
        ),
    ])
}

/// The pod selector: the labels that never change.
fn selector(broker: &Broker) -> Value {
    json!({
        "app.kubernetes.io/name": "petrel",
        "app.kubernetes.io/instance": broker.name_any(),
    })
}

/// Every object of `broker`, in the order they are applied, with `seed` the cluster's
/// first size (kept once the cluster exists: pods that come later join it).
pub fn objects(broker: &Broker, seed: i32) -> Result<Objects, Error> {
    Ok(Objects {
        service_account: service_account(broker)?,
        config: config_map(broker)?,
        headless: headless(broker)?,
        client: client_service(broker)?,
        stateful_set: stateful_set(broker, seed)?,
        disruption_budget: if broker.spec.pod_disruption_budget.enabled {
            Some(disruption_budget(broker)?)
        } else {
            None
        },
    })
}

/// What runs a Broker.
#[derive(Debug, Clone)]
pub struct Objects {
    /// The pods' identity (with no API access: brokers do not call Kubernetes).
    pub service_account: ServiceAccount,
    /// The broker settings file.
    pub config: ConfigMap,
    /// Stable pod names for peers, and the admin API.
    pub headless: Service,
    /// Where clients connect.
    pub client: Service,
    /// The broker pods.
    pub stateful_set: StatefulSet,
    /// How many pods a voluntary disruption may take, unless turned off.
    pub disruption_budget: Option<PodDisruptionBudget>,
}

/// `body` with the common metadata (name, namespace, labels, owner) as object `K`.
pub(super) fn object<K: DeserializeOwned>(
    broker: &Broker,
    name: &str,
    mut body: Value,
) -> Result<K, Error> {
    let owner = broker
        .controller_owner_ref(&())
        .ok_or_else(|| Error::InvalidSpec("the Broker has no uid yet".to_owned()))?;
    body["metadata"] = json!({
        "name": name,
        "namespace": broker.namespace(),
        "labels": labels(broker),
        "ownerReferences": [owner],
    });
    serde_json::from_value(body).map_err(|e| Error::InvalidSpec(format!("building {name}: {e}")))
}

fn service_account(broker: &Broker) -> Result<ServiceAccount, Error> {
    object(
        broker,
        &broker.name_any(),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "automountServiceAccountToken": false}),
    )
}

/// The settings file: `spec.config`, each value read as YAML (so `9464` is a number and
/// `true` a boolean), without the settings the operator owns.
pub fn settings_file(broker: &Broker) -> Result<String, Error> {
    let mut settings = serde_yaml::Mapping::new();
    for (key, value) in &broker.spec.config {
        if OWNED_SETTINGS.contains(&key.as_str()) {
            return Err(Error::InvalidSpec(format!(
                "config key {key:?} is set by the operator and cannot be overridden"
            )));
        }
        let parsed = serde_yaml::from_str::<serde_yaml::Value>(value)
            .ok()
            .filter(|v| !v.is_mapping() && !v.is_sequence() && !v.is_null())
            .unwrap_or_else(|| serde_yaml::Value::String(value.clone()));
        settings.insert(serde_yaml::Value::String(key.clone()), parsed);
    }
    if settings.is_empty() {
        return Ok("{}\n".to_owned());
    }
    serde_yaml::to_string(&settings).map_err(|e| Error::InvalidSpec(e.to_string()))
}

fn config_map(broker: &Broker) -> Result<ConfigMap, Error> {
    object(
        broker,
        &config_name(broker),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {CONFIG_FILE: settings_file(broker)?}}),
    )
}

fn config_name(broker: &Broker) -> String {
    format!("{}-config", broker.name_any())
}

/// The ports a broker pod serves: internal (Raft, admin API), HTTP, and each enabled
/// protocol listener this broker version serves.
fn ports(broker: &Broker) -> Vec<Value> {
    let mut ports = vec![
        json!({"name": "internal", "port": ADMIN_PORT}),
        json!({"name": "http", "port": HTTP_PORT}),
    ];
    if broker.spec.listeners.amqp.enabled {
        ports.push(json!({"name": "amqp", "port": broker.spec.listeners.amqp.port}));
    }
    ports
}

fn headless(broker: &Broker) -> Result<Service, Error> {
    // Peers find each other before they are ready: a new cluster forms only once they
    // talk, so not-ready addresses are published.
    let mut service: Service = object(
        broker,
        &headless_service(&broker.name_any()),
        json!({"apiVersion": "v1", "kind": "Service", "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": true,
            "selector": selector(broker),
            "ports": ports(broker),
        }}),
    )?;
    // Scraped by a ServiceMonitor: every pod once, ready or not.
    service.labels_mut().insert(
        super::monitoring::SCRAPED_LABEL.to_owned(),
        "true".to_owned(),
    );
    Ok(service)
}

fn client_service(broker: &Broker) -> Result<Service, Error> {
    let ports: Vec<Value> = ports(broker)
        .into_iter()
        .filter(|p| p["name"] != "internal")
        .collect();
    object(
        broker,
        &broker.name_any(),
        json!({"apiVersion": "v1", "kind": "Service", "spec": {
            "type": "ClusterIP",
            "selector": selector(broker),
            "ports": ports,
        }}),
    )
}

/// A digest of what the pods read from the ConfigMap, so that a change rolls them
/// (stable across operator versions, so an upgrade alone rolls nothing).
fn digest(text: &str) -> String {
    format!("{:08x}", crc32c::crc32c(text.as_bytes()))
}

fn stateful_set(broker: &Broker, seed: i32) -> Result<StatefulSet, Error> {
    let spec = &broker.spec;
    let name = broker.name_any();
    let namespace = broker.namespace().unwrap_or_else(|| "default".to_owned());
    let peers = format!(
        "{name}-{{}}.{}.{namespace}.svc.cluster.local:{ADMIN_PORT}",
        headless_service(&name)
    );
    let mut env = vec![
        json!({"name": "PETREL_PEER_PATTERN", "value": peers}),
        json!({"name": SEED_ENV, "value": seed.to_string()}),
        json!({"name": "PETREL_DATA_DIR", "value": DATA_DIR}),
        json!({"name": "PETREL_CONFIG", "value": format!("{CONFIG_DIR}/{CONFIG_FILE}")}),
        json!({"name": "PETREL_INTERNAL_PORT", "value": ADMIN_PORT.to_string()}),
        json!({"name": "PETREL_HTTP_PORT", "value": HTTP_PORT.to_string()}),
        json!({"name": "PETREL_LOG_FORMAT", "value": "json"}),
    ];
    if spec.listeners.amqp.enabled {
        env.push(
            json!({"name": "PETREL_AMQP_PORT", "value": spec.listeners.amqp.port.to_string()}),
        );
    }
    let container_ports: Vec<Value> = ports(broker)
        .into_iter()
        .map(|p| json!({"name": p["name"], "containerPort": p["port"]}))
        .collect();
    let probe = |path: &str, period: u32| json!({"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": 3});
    let mut template_labels = labels(broker);
    template_labels.extend(
        broker
            .labels()
            .iter()
            .filter(|(k, _)| !k.starts_with("app.kubernetes.io/"))
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    let mut pod = json!({
        "serviceAccountName": name,
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds.unwrap_or(GRACE_SECONDS),
        "containers": [{
            "name": "broker",
            "image": spec.image,
            "imagePullPolicy": "IfNotPresent",
            "args": ["serve"],
            "env": env,
            "ports": container_ports,
            "readinessProbe": probe("/readyz", 2),
            "livenessProbe": probe("/healthz", 10),
            "volumeMounts": [
                {"name": "data", "mountPath": DATA_DIR},
                {"name": "config", "mountPath": CONFIG_DIR, "readOnly": true},
            ],
        }],
        "volumes": [{"name": "config", "configMap": {"name": config_name(broker)}}],
        "tolerations": spec.tolerations,
        "topologySpreadConstraints": spec.topology_spread_constraints,
    });
    if let Some(resources) = &spec.resources {
        pod["containers"][0]["resources"] = json!(resources);
    }
    if let Some(affinity) = &spec.affinity {
        pod["affinity"] = json!(affinity);
    }
    if let Some(pull) = broker.annotations().get(IMAGE_PULL_POLICY_ANNOTATION) {
        pod["containers"][0]["imagePullPolicy"] = json!(pull);
    }
    let mut claim = json!({
        "metadata": {"name": "data", "labels": selector(broker)},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": spec.storage.size}},
        },
    });
    if let Some(class) = &spec.storage.storage_class_name {
        claim["spec"]["storageClassName"] = json!(class);
    }
    object(
        broker,
        &name,
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "spec": {
            "serviceName": headless_service(&name),
            "replicas": spec.replicas,
            // Pods start together (a new cluster forms once its seed pods talk); the
            // operator rolls them one at a time itself, after moving leadership off.
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "OnDelete"},
            "persistentVolumeClaimRetentionPolicy": {"whenScaled": "Delete", "whenDeleted": "Retain"},
            "selector": {"matchLabels": selector(broker)},
            "template": {
                "metadata": {
                    "labels": template_labels,
                    "annotations": {CONFIG_DIGEST: digest(&settings_file(broker)?)},
                },
                "spec": pod,
            },
            "volumeClaimTemplates": [claim],
        }}),
    )
}

/// Annotation on a Broker setting its pods' `imagePullPolicy` (`Never` for images
/// imported into the nodes by hand, as on a cluster with no registry).
pub const IMAGE_PULL_POLICY_ANNOTATION: &str = "petrel.io/image-pull-policy";

fn disruption_budget(broker: &Broker) -> Result<PodDisruptionBudget, Error> {
    object(
        broker,
        &broker.name_any(),
        json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "spec": {
            "maxUnavailable": broker.spec.pod_disruption_budget.max_unavailable,
            "selector": {"matchLabels": selector(broker)},
        }}),
    )
}

/// The seed size written in an existing StatefulSet, if any.
pub fn seed_of(stateful_set: &StatefulSet) -> Option<i32> {
    stateful_set
        .spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .first()?
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == SEED_ENV)?
        .value
        .as_ref()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::BrokerSpec;

    fn broker(spec: Value) -> Broker {
        let spec: BrokerSpec = serde_json::from_value(spec).unwrap();
        let mut broker = Broker::new("petrel", spec);
        broker.metadata.namespace = Some("ns".into());
        broker.metadata.uid = Some("uid-1".into());
        broker
    }

    #[test]
    fn every_object_is_owned_by_the_broker_and_labelled() {
        let b = broker(json!({"replicas": 3}));
        let all = objects(&b, 3).unwrap();
        let metas = [
            all.service_account.meta(),
            all.config.meta(),
            all.headless.meta(),
            all.client.meta(),
            all.stateful_set.meta(),
            all.disruption_budget.as_ref().unwrap().meta(),
        ];
        for meta in metas {
            let owner = &meta.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.uid.as_str()),
                ("Broker", "uid-1")
            );
            assert_eq!(owner.controller, Some(true));
            assert_eq!(meta.namespace.as_deref(), Some("ns"));
            assert_eq!(
                meta.labels.as_ref().unwrap()["app.kubernetes.io/instance"],
                "petrel"
            );
        }
        assert_eq!(
            all.headless.metadata.name.as_deref(),
            Some("petrel-headless")
        );
    }

    #[test]
    fn the_stateful_set_runs_the_pods_in_kubernetes_mode() {
        let b = broker(json!({"replicas": 5, "image": "localhost/petrel:dev",
                              "storage": {"size": "2Gi", "storageClassName": "fast"}}));
        let sts = stateful_set(&b, 3).unwrap();
        assert_eq!(seed_of(&sts), Some(3), "the seed, not the replicas");
        let spec = sts.spec.unwrap();
        assert_eq!(spec.replicas, Some(5));
        assert_eq!(spec.service_name.as_deref(), Some("petrel-headless"));
        let container = &spec.template.spec.as_ref().unwrap().containers[0];
        assert_eq!(container.image.as_deref(), Some("localhost/petrel:dev"));
        let env: BTreeMap<_, _> = container
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.as_str(), e.value.clone().unwrap_or_default()))
            .collect();
        assert_eq!(
            env["PETREL_PEER_PATTERN"],
            "petrel-{}.petrel-headless.ns.svc.cluster.local:9470"
        );
        assert_eq!(env["PETREL_AMQP_PORT"], "5672");
        let claim = &spec.volume_claim_templates.unwrap()[0];
        let claim_spec = claim.spec.as_ref().unwrap();
        assert_eq!(claim_spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(
            claim_spec
                .resources
                .as_ref()
                .unwrap()
                .requests
                .as_ref()
                .unwrap()["storage"]
                .0,
            "2Gi"
        );
    }

    #[test]
    fn a_config_change_changes_the_pod_template_and_owned_keys_are_refused() {
        let digest_of = |b: &Broker| {
            stateful_set(b, 3)
                .unwrap()
                .spec
                .unwrap()
                .template
                .metadata
                .unwrap()
                .annotations
                .unwrap()[CONFIG_DIGEST]
                .clone()
        };
        let plain = broker(json!({}));
        let tuned = broker(json!({"config": {"segment_bytes": "1048576", "log_level": "debug"}}));
        assert_ne!(digest_of(&plain), digest_of(&tuned));
        let file = settings_file(&tuned).unwrap();
        assert!(file.contains("segment_bytes: 1048576"), "{file}");
        assert!(file.contains("log_level: debug"), "{file}");
        // Replicas alone do not touch the template (no roll on scale).
        let scaled = broker(json!({"replicas": 7}));
        assert_eq!(
            stateful_set(&plain, 3).unwrap().spec.unwrap().template,
            stateful_set(&scaled, 3).unwrap().spec.unwrap().template
        );
        let owned = broker(json!({"config": {"data_dir": "/tmp"}}));
        assert!(
            objects(&owned, 3)
                .unwrap_err()
                .to_string()
                .contains("data_dir")
        );
    }

    #[test]
    fn no_disruption_budget_when_turned_off_and_services_follow_the_listeners() {
        let b = broker(json!({"podDisruptionBudget": {"enabled": false},
                              "listeners": {"amqp": {"enabled": true, "port": 5673}}}));
        let all = objects(&b, 1).unwrap();
        assert!(all.disruption_budget.is_none());
        let ports: Vec<(String, i32)> = all
            .client
            .spec
            .unwrap()
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.name.unwrap_or_default(), p.port))
            .collect();
        assert_eq!(ports, vec![("http".into(), 9464), ("amqp".into(), 5673)]);
    }
}
