//! A Queue resource as admin API requests, and the broker's answer as the Queue's
//! status: pure functions, tested without a cluster.

use std::collections::BTreeSet;

use kube::ResourceExt;
use petrel_api::admin::v1 as api;

use crate::crd::{self, Binding, Durability, Overflow, PartitionStatus, Queue, QueueSpec};
use crate::error::Error;

/// The queue's name on the broker: `spec.name`, else the resource's.
pub fn name(queue: &Queue) -> String {
    queue.spec.name.clone().unwrap_or_else(|| queue.name_any())
}

/// How the admin API names the queue.
pub fn reference(queue: &Queue) -> api::DestinationRef {
    api::DestinationRef {
        kind: api::Kind::Queue.into(),
        name: name(queue),
        vhost: queue.spec.vhost.clone(),
    }
}

/// The queue as the admin API creates it.
pub fn spec(queue: &Queue) -> Result<api::DestinationSpec, Error> {
    let spec = &queue.spec;
    Ok(api::DestinationSpec {
        kind: api::Kind::Queue.into(),
        name: name(queue),
        vhost: spec.vhost.clone(),
        partitions: spec.partitions,
        replication_factor: spec.replication_factor,
        durability: api_durability(spec.durability).into(),
        queue_arguments: Some(arguments(spec)?),
        ..api::DestinationSpec::default()
    })
}

/// The queue's arguments as the admin API types them.
pub fn arguments(spec: &QueueSpec) -> Result<api::QueueArguments, Error> {
    let count = |field: &str, n: Option<i64>| {
        n.map(|n| {
            u64::try_from(n).map_err(|_| Error::InvalidSpec(format!("{field} must be positive")))
        })
        .transpose()
    };
    let message_ttl_ms = spec
        .message_ttl
        .as_deref()
        .map(|ttl| {
            crd::duration_ms(ttl)
                .ok_or_else(|| Error::InvalidSpec(format!("messageTTL {ttl:?} is not a duration")))
        })
        .transpose()?;
    Ok(api::QueueArguments {
        message_ttl_ms,
        max_length: count("maxLength", spec.max_length)?,
        max_length_bytes: count("maxLengthBytes", spec.max_length_bytes)?,
        overflow: spec
            .overflow
            .map(|o| match o {
                Overflow::DropHead => "drop-head",
                Overflow::RejectPublish => "reject-publish",
                Overflow::RejectPublishDlx => "reject-publish-dlx",
            })
            .unwrap_or_default()
            .to_owned(),
        dead_letter_exchange: spec
            .dead_letter
            .as_ref()
            .map(|d| d.exchange.clone())
            .unwrap_or_default(),
        dead_letter_routing_key: spec
            .dead_letter
            .as_ref()
            .and_then(|d| d.routing_key.clone()),
        delivery_limit: count("deliveryLimit", spec.delivery_limit)?,
    })
}

/// A durability as the admin API names it.
fn api_durability(durability: Durability) -> api::Durability {
    match durability {
        Durability::Always => api::Durability::Always,
        Durability::Interval => api::Durability::Interval,
        Durability::Never => api::Durability::Never,
    }
}

/// What to change on a queue that exists: more partitions or another durability (the
/// only changes the broker takes), or `None` if it is in step.
pub fn update(
    queue: &Queue,
    current: &api::DestinationSpec,
) -> Option<api::UpdateDestinationRequest> {
    let durability: i32 = api_durability(queue.spec.durability).into();
    let grow = queue.spec.partitions > current.partitions;
    let redo = durability != current.durability;
    (grow || redo).then(|| api::UpdateDestinationRequest {
        destination: Some(reference(queue)),
        partitions: grow.then_some(queue.spec.partitions),
        durability: if redo { durability } else { 0 },
        ..api::UpdateDestinationRequest::default()
    })
}

/// Why the queue on the broker is not what the resource asks for, in ways the operator
/// cannot change (it was made otherwise, by a client or before): empty if it is.
pub fn mismatches(queue: &Queue, current: &api::DestinationSpec) -> Result<Vec<String>, Error> {
    let mut found = Vec::new();
    let wanted = arguments(&queue.spec)?;
    let present = current.queue_arguments.clone().unwrap_or_default();
    if wanted != present {
        found.push(format!(
            "its arguments on the broker are {present:?}, not {wanted:?}"
        ));
    }
    if queue.spec.replication_factor != current.replication_factor {
        found.push(format!(
            "its replication factor on the broker is {}, not {}",
            current.replication_factor, queue.spec.replication_factor
        ));
    }
    Ok(found)
}

/// What to bind and unbind: the bindings asked for that are missing, and those the
/// operator made before (`applied`) that are no longer asked for and still there. A
/// client's own bindings of the queue are left alone.
pub fn binding_changes(
    queue: &Queue,
    applied: &[Binding],
    present: &[api::Binding],
) -> (Vec<api::Binding>, Vec<api::Binding>) {
    let as_api = |b: &Binding| api::Binding {
        vhost: queue.spec.vhost.clone(),
        exchange: b.exchange.clone(),
        queue: name(queue),
        routing_key: b.routing_key.clone(),
    };
    let key = |b: &api::Binding| (b.exchange.clone(), b.routing_key.clone());
    let present: BTreeSet<_> = present.iter().map(key).collect();
    let wanted: Vec<api::Binding> = queue.spec.bindings.iter().map(as_api).collect();
    let wanted_keys: BTreeSet<_> = wanted.iter().map(key).collect();
    let add = wanted
        .iter()
        .filter(|b| !present.contains(&key(b)))
        .cloned()
        .collect();
    let remove = applied
        .iter()
        .map(as_api)
        .filter(|b| !wanted_keys.contains(&key(b)) && present.contains(&key(b)))
        .collect();
    (add, remove)
}

/// The status fields the broker's answer gives.
pub fn observed(destination: &api::Destination) -> serde_json::Value {
    let stats = destination.queue_stats.unwrap_or_default();
    serde_json::json!({
        "partitions": destination.partitions.iter().map(|p| PartitionStatus {
            id: p.number,
            leader: p.leader,
            replicas: p.replicas.clone(),
        }).collect::<Vec<_>>(),
        "messagesReady": stats.ready,
        "messagesUnacked": stats.unacked,
        "consumers": stats.consumers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::QueueSpec;
    use serde_json::json;

    fn queue(spec: serde_json::Value) -> Queue {
        let mut spec = spec;
        spec["brokerRef"] = json!({"name": "petrel"});
        let spec: QueueSpec = serde_json::from_value(spec).unwrap();
        Queue::new("orders", spec)
    }

    #[test]
    fn a_queue_resource_becomes_a_create_request_with_typed_arguments() {
        let q = queue(json!({
            "messageTTL": "10m", "maxLength": 5, "overflow": "reject-publish-dlx",
            "deadLetter": {"exchange": "dlx", "routingKey": "dead"}, "deliveryLimit": 3,
        }));
        let spec = spec(&q).unwrap();
        assert_eq!(spec.name, "orders");
        assert_eq!(spec.vhost, "/");
        assert_eq!((spec.partitions, spec.replication_factor), (1, 3));
        let args = spec.queue_arguments.unwrap();
        assert_eq!(args.message_ttl_ms, Some(600_000));
        assert_eq!(args.max_length, Some(5));
        assert_eq!(args.overflow, "reject-publish-dlx");
        assert_eq!(args.dead_letter_exchange, "dlx");
        assert_eq!(args.dead_letter_routing_key.as_deref(), Some("dead"));
        assert_eq!(args.delivery_limit, Some(3));
        assert_eq!(args.max_length_bytes, None);
    }

    #[test]
    fn spec_name_names_the_queue_on_the_broker() {
        let q = queue(json!({"name": "orders_v2", "vhost": "shop"}));
        assert_eq!(reference(&q).name, "orders_v2");
        assert_eq!(reference(&q).vhost, "shop");
    }

    #[test]
    fn only_growth_and_durability_are_updated_and_other_differences_are_reported() {
        let q = queue(json!({"partitions": 2, "messageTTL": "1s"}));
        let mut current = spec(&q).unwrap();
        assert!(update(&q, &current).is_none());
        assert!(mismatches(&q, &current).unwrap().is_empty());
        current.partitions = 1;
        assert_eq!(update(&q, &current).unwrap().partitions, Some(2));
        current.replication_factor = 1;
        current.queue_arguments = None;
        let found = mismatches(&q, &current).unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
    }

    #[test]
    fn bindings_are_added_when_missing_and_removed_only_if_the_operator_made_them() {
        let q = queue(json!({"bindings": [
            {"exchange": "amq.topic", "routingKey": "a.#"},
            {"exchange": "amq.direct", "routingKey": "b"},
        ]}));
        let api_binding = |exchange: &str, key: &str| api::Binding {
            vhost: "/".into(),
            exchange: exchange.into(),
            queue: "orders".into(),
            routing_key: key.into(),
        };
        let present = vec![
            api_binding("amq.topic", "a.#"),
            api_binding("amq.topic", "old"),
            api_binding("amq.fanout", ""),
        ];
        let applied = vec![
            Binding {
                exchange: "amq.topic".into(),
                routing_key: "old".into(),
            },
            Binding {
                exchange: "amq.direct".into(),
                routing_key: "gone-already".into(),
            },
        ];
        let (add, remove) = binding_changes(&q, &applied, &present);
        assert_eq!(add, vec![api_binding("amq.direct", "b")]);
        // The client's fanout binding stays; the one already gone is not unbound again.
        assert_eq!(remove, vec![api_binding("amq.topic", "old")]);
    }
}
