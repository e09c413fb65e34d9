//! A Topic resource as admin API requests, and the broker's answer as the Topic's
//! status: pure functions, tested without a cluster.

use kube::ResourceExt;
use petrel_api::admin::v1 as api;

use crate::crd::{self, CleanupPolicy, Compression, Topic, TopicPartitionStatus};
use crate::error::Error;

/// The topic's name on the broker: `spec.name`, else the resource's.
pub fn name(topic: &Topic) -> String {
    topic.spec.name.clone().unwrap_or_else(|| topic.name_any())
}

/// How the admin API names the topic.
pub fn reference(topic: &Topic) -> api::DestinationRef {
    api::DestinationRef {
        kind: api::Kind::Topic.into(),
        name: name(topic),
        vhost: String::new(),
    }
}

/// Retention as the admin API takes it: milliseconds and bytes, each unset to keep all.
fn retention(topic: &Topic) -> Result<(Option<u64>, Option<u64>), Error> {
    let Some(retention) = &topic.spec.retention else {
        return Ok((None, None));
    };
    let ms = retention
        .time
        .as_deref()
        .map(|t| {
            crd::duration_ms(t).ok_or_else(|| {
                Error::InvalidSpec(format!("retention.time {t:?} is not a duration"))
            })
        })
        .transpose()?;
    let bytes = retention
        .bytes
        .map(|b| {
            u64::try_from(b)
                .map_err(|_| Error::InvalidSpec("retention.bytes must be positive".to_owned()))
        })
        .transpose()?;
    Ok((ms, bytes))
}

/// The topic as the admin API creates it.
pub fn spec(topic: &Topic) -> Result<api::DestinationSpec, Error> {
    let (retention_ms, retention_bytes) = retention(topic)?;
    Ok(api::DestinationSpec {
        kind: api::Kind::Topic.into(),
        name: name(topic),
        partitions: topic.spec.partitions,
        replication_factor: topic.spec.replication_factor,
        durability: api::Durability::Always.into(),
        retention_ms,
        retention_bytes,
        ..api::DestinationSpec::default()
    })
}

/// What to change on a topic that exists: more partitions, other retention; `None` if
/// it is in step.
pub fn update(
    topic: &Topic,
    current: &api::DestinationSpec,
) -> Result<Option<api::UpdateDestinationRequest>, Error> {
    let (retention_ms, retention_bytes) = retention(topic)?;
    let grow = topic.spec.partitions > current.partitions;
    let retain = (retention_ms, retention_bytes) != (current.retention_ms, current.retention_bytes)
        && (retention_ms.is_some() || retention_bytes.is_some());
    Ok((grow || retain).then(|| api::UpdateDestinationRequest {
        destination: Some(reference(topic)),
        partitions: grow.then_some(topic.spec.partitions),
        retention_ms: retention_ms.filter(|_| retain),
        retention_bytes: retention_bytes.filter(|_| retain),
        ..api::UpdateDestinationRequest::default()
    }))
}

/// What the topic asks for that this broker version does not serve yet, and how it
/// differs from the topic on the broker where the operator cannot change it.
pub fn mismatches(topic: &Topic, current: &api::DestinationSpec) -> Vec<String> {
    let mut found = Vec::new();
    if topic.spec.cleanup_policy == CleanupPolicy::Compact {
        found.push("cleanupPolicy compact is not served by this broker version".to_owned());
    }
    if topic.spec.compression != Compression::None {
        found.push("per-topic compression is not served by this broker version".to_owned());
    }
    if !topic.spec.subscriptions.is_empty() {
        found.push("topic subscriptions are not served by this broker version".to_owned());
    }
    if topic.spec.replication_factor != current.replication_factor {
        found.push(format!(
            "its replication factor on the broker is {}, not {}",
            current.replication_factor, topic.spec.replication_factor
        ));
    }
    found
}

/// The status fields the broker's answer gives.
pub fn observed(destination: &api::Destination) -> serde_json::Value {
    let partitions: Vec<TopicPartitionStatus> = destination
        .partitions
        .iter()
        .map(|p| TopicPartitionStatus {
            id: p.number,
            leader: p.leader,
            end_offset: p.end_offset.unwrap_or(0),
        })
        .collect();
    serde_json::json!({ "partitions": partitions })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::TopicSpec;
    use serde_json::json;

    fn topic(spec: serde_json::Value) -> Topic {
        let mut spec = spec;
        spec["brokerRef"] = json!({"name": "petrel"});
        let spec: TopicSpec = serde_json::from_value(spec).unwrap();
        Topic::new("events", spec)
    }

    #[test]
    fn a_topic_resource_becomes_a_create_request() {
        let t = topic(json!({"partitions": 6, "retention": {"time": "7d", "bytes": 1024}}));
        let spec = spec(&t).unwrap();
        assert_eq!(
            (spec.name.as_str(), spec.partitions, spec.replication_factor),
            ("events", 6, 3)
        );
        assert_eq!(spec.retention_ms, Some(7 * 86_400_000));
        assert_eq!(spec.retention_bytes, Some(1024));
        assert!(update(&t, &spec).unwrap().is_none());
        assert!(mismatches(&t, &spec).is_empty());
    }

    #[test]
    fn growth_and_retention_are_updated() {
        let t = topic(json!({"partitions": 6, "retention": {"time": "1h"}}));
        let mut current = spec(&t).unwrap();
        current.partitions = 3;
        current.retention_ms = None;
        let update = update(&t, &current).unwrap().unwrap();
        assert_eq!(update.partitions, Some(6));
        assert_eq!(update.retention_ms, Some(3_600_000));
    }

    #[test]
    fn what_the_broker_does_not_serve_is_reported() {
        let t = topic(json!({"cleanupPolicy": "compact", "subscriptions": [{"name": "s"}]}));
        let current = spec(&t).unwrap();
        assert_eq!(mismatches(&t, &current).len(), 2);
    }
}
