//! `Topic`: a partitioned log on a Broker, kept by retention, with named subscriptions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{BrokerRef, DURATION, DeadLetter, DeletionPolicy, one, three};

/// A topic on a Broker: messages kept by retention, read by any number of subscriptions.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "petrel.io",
    version = "v1alpha1",
    kind = "Topic",
    namespaced,
    status = "TopicStatus",
    shortname = "pt",
    cel,
    printcolumn = r#"{"name":"Broker","type":"string","jsonPath":".spec.brokerRef.name"}"#,
    printcolumn = r#"{"name":"Partitions","type":"integer","jsonPath":".spec.partitions"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TopicSpec {
    /// The topic's name on the broker; the resource's name if unset. It cannot change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("name cannot change"))]
    pub name: Option<String>,
    /// The Broker holding the topic; it cannot change.
    #[x_kube(validation = Rule::new("self == oldSelf").message("brokerRef cannot change"))]
    pub broker_ref: BrokerRef,
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
    /// How long and how much each partition keeps; unset keeps everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// What retention does with old messages.
    #[serde(default)]
    pub cleanup_policy: CleanupPolicy,
    /// How batches are compressed on disk.
    #[serde(default)]
    pub compression: Compression,
    /// Named subscriptions, each with its own cursor; names are unique (a list map the
    /// API server keys by name).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"], "maxItems" = 1000))]
    pub subscriptions: Vec<Subscription>,
    /// What deleting this resource does to the topic on the broker.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// What a topic keeps.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    /// Longest a message is kept, such as `7d` or `12h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION))]
    pub time: Option<String>,
    /// Most bytes a partition keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub bytes: Option<i64>,
}

/// What retention does with old messages.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CleanupPolicy {
    /// Whole old segments are deleted.
    #[default]
    Delete,
    /// Only the latest message of each key is kept.
    Compact,
}

/// How batches are compressed on disk.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Not compressed.
    #[default]
    None,
    /// LZ4.
    Lz4,
    /// Snappy.
    Snappy,
    /// Zstandard.
    Zstd,
}

/// A named subscription to a topic.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Subscription {
    /// Its name, unique in the topic.
    #[schemars(length(min = 1, max = 255))]
    pub name: String,
    /// How its consumers share the messages.
    #[serde(default)]
    pub mode: SubscriptionMode,
    /// How long a delivery may go unacknowledged, such as `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION))]
    pub ack_deadline: Option<String>,
    /// Deliveries of a message that may be returned before it is dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub delivery_limit: Option<i64>,
    /// Where rejected and expired messages go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetter>,
}

/// How a subscription's consumers share the messages.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SubscriptionMode {
    /// Each message to one consumer, acknowledged one by one (a queue over the topic).
    #[default]
    Shared,
    /// Each partition to one consumer at a time, in order (Kafka's consumer groups).
    Ordered,
}

/// What the operator last saw of the topic.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicStatus {
    /// `Ready`, `Progressing`, `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Each partition's leader and end offset.
    #[serde(default)]
    pub partitions: Vec<TopicPartitionStatus>,
    /// How far behind each subscription is.
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionLag>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One partition of a topic as the broker reports it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicPartitionStatus {
    /// The partition's number.
    pub id: u32,
    /// The node leading it, if one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<u64>,
    /// The offset after its last message.
    #[serde(default)]
    pub end_offset: u64,
}

/// How far behind one subscription is.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionLag {
    /// The subscription.
    pub name: String,
    /// Messages not yet consumed, over all partitions.
    pub lag: u64,
}
