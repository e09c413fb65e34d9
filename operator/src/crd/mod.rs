//! The custom resources (DESIGN.md §6): `Broker`, `Queue` and `Topic` in `petrel.io/v1alpha1`.
//! Their schemas are derived from these types, with the rules the API server enforces
//! (ranges, enums, CEL `x-kubernetes-validations` such as "partitions can only grow"), and
//! written to `crds/` by the `crdgen` binary.
//!
//! * `broker`: a cluster of broker pods (StatefulSet and what goes with it).
//! * `queue`: a queue on a Broker, with its AMQP arguments and bindings.
//! * `topic`: a topic on a Broker, with retention and subscriptions.

mod broker;
mod queue;
mod topic;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use broker::{
    Broker, BrokerSpec, BrokerStatus, Listener, Listeners, Member, Monitoring,
    PodDisruptionBudgetSpec, Storage, Tls,
};
pub use queue::{Binding, DeadLetter, Durability, Overflow, Queue, QueueSpec, QueueStatus};
pub use topic::{
    CleanupPolicy, Compression, Retention, Subscription, SubscriptionLag, SubscriptionMode, Topic,
    TopicPartitionStatus, TopicSpec, TopicStatus,
};

/// The Broker a Queue or Topic lives on, in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct BrokerRef {
    /// The Broker's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// What deleting the resource does to what it stands for on the broker.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeletionPolicy {
    /// The queue or topic is deleted from the broker, with its messages.
    #[default]
    Delete,
    /// The queue or topic stays on the broker.
    Retain,
}

/// One partition of a queue or topic as the broker reports it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartitionStatus {
    /// The partition's number.
    pub id: u32,
    /// The node leading it, if one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<u64>,
    /// The nodes holding a replica.
    #[serde(default)]
    pub replicas: Vec<u64>,
}

/// Every custom resource definition, in the order `crds/` holds them.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![Broker::crd(), Queue::crd(), Topic::crd()]
}

/// A definition as the YAML file `crds/<kind>.yaml` holds it.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(crd)
}

/// The file name of a definition in `crds/`: its kind, lower case.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.spec.names.kind.to_lowercase())
}

/// A duration as the resources write one: a whole number and a unit, `ms`, `s`, `m`, `h`
/// or `d` (`30s`, `7d`).
const DURATION: &str = r"^[0-9]+(ms|s|m|h|d)$";

/// Milliseconds in a [`DURATION`] such as `30s`; `None` if it is not one (or too long).
pub fn duration_ms(text: &str) -> Option<u64> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(unit_ms)
}

/// Serde default: one.
fn one() -> u32 {
    1
}

/// Serde default: three (replicas, replication factor).
fn three() -> u32 {
    3
}

#[cfg(test)]
mod tests {
    use super::duration_ms;

    #[test]
    fn durations_are_read_as_the_schema_writes_them() {
        assert_eq!(duration_ms("30s"), Some(30_000));
        assert_eq!(duration_ms("250ms"), Some(250));
        assert_eq!(duration_ms("7d"), Some(604_800_000));
        assert_eq!(duration_ms("10m"), Some(600_000));
        for bad in ["", "s", "10", "1.5h", "10x", "99999999999999999999d"] {
            assert_eq!(duration_ms(bad), None, "{bad}");
        }
    }
}
