//! `Broker`: a cluster of Petrel broker pods (a StatefulSet, its Services, ConfigMap and
//! PodDisruptionBudget, and monitoring objects when asked for).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The broker image when the spec names none.
pub const DEFAULT_IMAGE: &str = "petrel:latest";

/// A cluster of Petrel broker pods.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "petrel.io",
    version = "v1alpha1",
    kind = "Broker",
    namespaced,
    status = "BrokerStatus",
    shortname = "pb",
    cel,
    scale = r#"{"specReplicasPath":".spec.replicas","statusReplicasPath":".status.replicas"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Ready Replicas","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".status.version"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BrokerSpec {
    /// Broker pods: 1 to 99.
    #[serde(default = "three_replicas")]
    #[schemars(range(min = 1, max = 99))]
    pub replicas: i32,
    /// The broker image.
    #[serde(default = "default_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// CPU and memory of each broker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Each pod's volume; it cannot change once created.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("storage cannot change"))]
    pub storage: Storage,
    /// The protocol listeners.
    #[serde(default)]
    pub listeners: Listeners,
    /// Broker settings (`petrel serve` keys), overriding the defaults.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// TLS for the listeners, from a Secret with `tls.crt` and `tls.key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    /// Monitoring objects for the Prometheus operator and Grafana.
    #[serde(default)]
    pub monitoring: Monitoring,
    /// How many broker pods a voluntary disruption may take at once.
    #[serde(default)]
    pub pod_disruption_budget: PodDisruptionBudgetSpec,
    /// Scheduling constraints of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Taints the pods tolerate.
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    /// How the pods spread over zones and nodes.
    #[serde(default)]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// Seconds a stopping pod is given to hand its leadership over and drain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub termination_grace_period_seconds: Option<i64>,
}

fn three_replicas() -> i32 {
    3
}

fn default_image() -> String {
    DEFAULT_IMAGE.to_owned()
}

/// Each pod's volume.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    /// Its size, such as `10Gi`; more than zero.
    #[serde(default = "default_size")]
    #[x_kube(validation = Rule::new("quantity(string(self)).isGreaterThan(quantity('0'))").message("storage size must be more than zero"))]
    pub size: Quantity,
    /// The StorageClass; the cluster's default if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            size: default_size(),
            storage_class_name: None,
        }
    }
}

fn default_size() -> Quantity {
    Quantity("10Gi".to_owned())
}

/// The protocol listeners.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Listeners {
    /// AMQP 0-9-1 (on by default, 5672).
    #[serde(default = "amqp")]
    pub amqp: Listener,
    /// MQTT 3.1.1 and 5 (off by default, 1883).
    #[serde(default = "mqtt")]
    pub mqtt: Listener,
    /// STOMP 1.2 (off by default, 61613).
    #[serde(default = "stomp")]
    pub stomp: Listener,
    /// Kafka (off by default, 9092).
    #[serde(default = "kafka")]
    pub kafka: Listener,
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners {
            amqp: amqp(),
            mqtt: mqtt(),
            stomp: stomp(),
            kafka: kafka(),
        }
    }
}

fn amqp() -> Listener {
    Listener::new(true, 5672)
}

fn mqtt() -> Listener {
    Listener::new(false, 1883)
}

fn stomp() -> Listener {
    Listener::new(false, 61613)
}

fn kafka() -> Listener {
    Listener::new(false, 9092)
}

/// One protocol listener.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// Whether the pods listen.
    pub enabled: bool,
    /// The port, in the pods and on the client Service.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

impl Listener {
    fn new(enabled: bool, port: i32) -> Self {
        Listener { enabled, port }
    }
}

/// TLS for the listeners.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tls {
    /// The Secret holding `tls.crt` and `tls.key`.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

/// Monitoring objects, each on or off.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Monitoring {
    /// A ServiceMonitor for the Prometheus operator.
    #[serde(default)]
    pub service_monitor: bool,
    /// A PrometheusRule with the broker's alerts.
    #[serde(default)]
    pub prometheus_rule: bool,
    /// A ConfigMap with the Grafana dashboard.
    #[serde(default)]
    pub grafana_dashboard: bool,
}

/// The PodDisruptionBudget of the broker pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodDisruptionBudgetSpec {
    /// Whether there is one.
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// Pods a voluntary disruption may take at once.
    #[serde(default = "one_pod")]
    #[schemars(range(min = 1))]
    pub max_unavailable: i32,
}

impl Default for PodDisruptionBudgetSpec {
    fn default() -> Self {
        PodDisruptionBudgetSpec {
            enabled: true,
            max_unavailable: 1,
        }
    }
}

fn enabled() -> bool {
    true
}

fn one_pod() -> i32 {
    1
}

/// What the operator last saw of the broker cluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerStatus {
    /// `Ready`, `Progressing` (with a scale or roll's progress), `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Broker pods.
    #[serde(default)]
    pub replicas: i32,
    /// Broker pods ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// The cluster's members as the brokers report them.
    #[serde(default)]
    pub members: Vec<Member>,
    /// The broker version running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The Secret holding the default user's credentials (username, password, host,
    /// port, uri).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_user_secret: Option<String>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One member of the broker cluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    /// Its node id (the pod's ordinal + 1).
    pub node_id: u64,
    /// Whether it serves clients.
    pub ready: bool,
    /// Partitions it leads.
    pub partitions_led: u32,
}
