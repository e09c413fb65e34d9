//! `Queue`: a queue on a Broker, as an AMQP user declares one (arguments and bindings),
//! kept in step with the broker through its admin API.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{BrokerRef, DURATION, DeletionPolicy, PartitionStatus, one, three};

/// A queue on a Broker: messages kept until acknowledged.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "petrel.io",
    version = "v1alpha1",
    kind = "Queue",
    namespaced,
    status = "QueueStatus",
    shortname = "pq",
    cel,
    printcolumn = r#"{"name":"Broker","type":"string","jsonPath":".spec.brokerRef.name"}"#,
    printcolumn = r#"{"name":"Partitions","type":"integer","jsonPath":".spec.partitions"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Messages","type":"integer","jsonPath":".status.messagesReady"}"#,
    printcolumn = r#"{"name":"Consumers","type":"integer","jsonPath":".status.consumers"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(ARGUMENTS_FIXED).message("queue arguments (messageTTL, maxLength, maxLengthBytes, overflow, deadLetter, deliveryLimit) cannot change once the queue exists, as in RabbitMQ: delete the Queue and create it again"))]
pub struct QueueSpec {
    /// The queue's name on the broker (any AMQP queue name); the resource's name if
    /// unset. It cannot change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("name cannot change"))]
    pub name: Option<String>,
    /// The Broker holding the queue; it cannot change.
    #[x_kube(validation = Rule::new("self == oldSelf").message("brokerRef cannot change"))]
    pub broker_ref: BrokerRef,
    /// The AMQP virtual host; it cannot change.
    #[serde(default = "default_vhost")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("vhost cannot change"))]
    pub vhost: String,
    /// Partitions: 1 to 10000, and they can only grow.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 10000))]
    #[x_kube(validation = Rule::new("self >= oldSelf").message("partitions can only grow"))]
    pub partitions: u32,
    /// Replicas of each partition (at most the Broker's replicas); it cannot change.
    #[serde(default = "three")]
    #[schemars(range(min = 1, max = 99))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("replicationFactor cannot change"))]
    pub replication_factor: u32,
    /// When a publish is confirmed.
    #[serde(default)]
    pub durability: Durability,
    /// How long a message may wait (`x-message-ttl`), such as `30s` or `10m`.
    #[serde(
        default,
        rename = "messageTTL",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(regex(pattern = DURATION))]
    pub message_ttl: Option<String>,
    /// Messages kept at most (`x-max-length`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_length: Option<i64>,
    /// Body bytes kept at most (`x-max-length-bytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_length_bytes: Option<i64>,
    /// What a full queue does with one more message (`x-overflow`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overflow: Option<Overflow>,
    /// Where rejected, expired and dropped messages go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetter>,
    /// Deliveries of a message that may be returned before it is dead-lettered
    /// (`x-delivery-limit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub delivery_limit: Option<i64>,
    /// Exchanges the queue is bound to.
    #[serde(default)]
    pub bindings: Vec<Binding>,
    /// What deleting this resource does to the queue on the broker.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// CEL: every queue argument is as it was (set alike, or unset in both).
const ARGUMENTS_FIXED: &str = "[\
    has(self.messageTTL) == has(oldSelf.messageTTL) && (!has(self.messageTTL) || self.messageTTL == oldSelf.messageTTL), \
    has(self.maxLength) == has(oldSelf.maxLength) && (!has(self.maxLength) || self.maxLength == oldSelf.maxLength), \
    has(self.maxLengthBytes) == has(oldSelf.maxLengthBytes) && (!has(self.maxLengthBytes) || self.maxLengthBytes == oldSelf.maxLengthBytes), \
    has(self.overflow) == has(oldSelf.overflow) && (!has(self.overflow) || self.overflow == oldSelf.overflow), \
    has(self.deadLetter) == has(oldSelf.deadLetter) && (!has(self.deadLetter) || self.deadLetter == oldSelf.deadLetter), \
    has(self.deliveryLimit) == has(oldSelf.deliveryLimit) && (!has(self.deliveryLimit) || self.deliveryLimit == oldSelf.deliveryLimit)\
    ].all(same, same)";

fn default_vhost() -> String {
    "/".to_owned()
}

/// When a publish is confirmed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Once on disk (fsync) on a majority of replicas.
    #[default]
    Always,
    /// At the next periodic sync.
    Interval,
    /// Once in memory on a majority, relying on replication.
    Never,
}

/// What a full queue does with one more message, as RabbitMQ's `x-overflow` says it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    /// The oldest ready messages go.
    DropHead,
    /// The new one is refused (its publisher gets a nack).
    RejectPublish,
    /// Refused, and dead-lettered.
    RejectPublishDlx,
}

/// Where dead-lettered messages go.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// The exchange (in the queue's vhost).
    #[schemars(length(min = 1, max = 255))]
    pub exchange: String,
    /// The routing key they get; their own if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_key: Option<String>,
}

/// A binding of the queue to an exchange.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Binding {
    /// The exchange (in the queue's vhost).
    #[schemars(length(min = 1, max = 255))]
    pub exchange: String,
    /// The binding key.
    #[serde(default)]
    pub routing_key: String,
}

/// What the operator last saw of the queue.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    /// `Ready`, `Progressing`, `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Each partition's leader and replicas.
    #[serde(default)]
    pub partitions: Vec<PartitionStatus>,
    /// Messages ready for delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_ready: Option<u64>,
    /// Messages delivered and not yet acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_unacked: Option<u64>,
    /// Consumers attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumers: Option<u32>,
    /// The bindings the operator made, so that it removes only those (a client's own
    /// bindings of the queue stay).
    #[serde(default)]
    pub bindings: Vec<Binding>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
