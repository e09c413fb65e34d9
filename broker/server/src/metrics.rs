//! The node's Prometheus registry: the one place metrics are registered. The server's
//! own gauges live here; the protocol front-ends' counters are made by
//! `petrel_protocols::Metrics` and registered here; what the core knows (partitions led,
//! queue counts) is read through its API by a periodic task.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use petrel_core::cluster::ClusterNode;
use petrel_core::messaging::Messaging;
use prometheus::{Encoder, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::resources;

/// How often the partition and queue gauges are refreshed.
const REFRESH_EVERY: Duration = Duration::from_secs(2);
/// How long the queues' dispatchers may take to report their counts in one refresh.
const QUEUE_STATS_TIMEOUT: Duration = Duration::from_secs(1);
/// The labels of the per-queue gauges.
const QUEUE_LABELS: [&str; 2] = ["vhost", "queue"];

/// The node's metrics registry and the gauges the server itself owns.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    up: IntGauge,
    cluster_nodes: IntGauge,
    destinations: IntGauge,
    protocols: petrel_protocols::Metrics,
    resources: resources::Gauges,
    partitions_led: IntGauge,
    partition_replicas: IntGauge,
    partitions_under_replicated: IntGauge,
    queue_ready: IntGaugeVec,
    queue_unacked: IntGaugeVec,
    queue_consumers: IntGaugeVec,
}

impl Metrics {
    /// A registry holding `petrel_build_info{version}` (always 1) and `petrel_up`
    /// (1 while the node is ready, else 0).
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let build_info = IntGaugeVec::new(
            Opts::new(
                "petrel_build_info",
                "Always 1; the labels describe the running petrel build.",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry.register(Box::new(build_info))?;
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let gauge = IntGauge::new(name, help)?;
            registry.register(Box::new(gauge.clone()))?;
            Ok(gauge)
        };
        let up = gauge(
            "petrel_up",
            "1 while the node is ready (storage open, listeners bound), else 0.",
        )?;
        let cluster_nodes = gauge(
            "petrel_cluster_nodes",
            "Nodes in the cluster's metadata, as this node last applied it.",
        )?;
        let destinations = gauge(
            "petrel_destinations",
            "Queues and topics in the cluster's metadata, as this node last applied it.",
        )?;
        let protocols = petrel_protocols::Metrics::new()?;
        protocols.register(&registry)?;
        let alarm = IntGaugeVec::new(
            Opts::new(
                "petrel_resource_alarm",
                "1 while the resource's alarm holds publishers back, else 0.",
            ),
            &["resource"],
        )?;
        registry.register(Box::new(alarm.clone()))?;
        let resources = resources::Gauges {
            disk_alarm: alarm.with_label_values(&["disk"]),
            memory_alarm: alarm.with_label_values(&["memory"]),
            disk_free: gauge(
                "petrel_disk_free_bytes",
                "Free bytes on the data directory's file system, as last measured.",
            )?,
        };
        let partitions_led = gauge(
            "petrel_partitions_led",
            "Partition Raft groups (queues and topics) this node leads.",
        )?;
        let partition_replicas = gauge(
            "petrel_partition_replicas",
            "Partition replicas (queues and topics) this node holds.",
        )?;
        let partitions_under_replicated = gauge(
            "petrel_partitions_under_replicated",
            "Partitions this node leads with a voter unreachable, unmatched or over 1000 entries behind.",
        )?;
        let queue_gauge = |name: &str, help: &str| -> Result<IntGaugeVec, prometheus::Error> {
            let gauge = IntGaugeVec::new(Opts::new(name, help), &QUEUE_LABELS)?;
            registry.register(Box::new(gauge.clone()))?;
            Ok(gauge)
        };
        let queue_ready = queue_gauge(
            "petrel_queue_messages_ready",
            "Messages ready for delivery in a queue this node leads.",
        )?;
        let queue_unacked = queue_gauge(
            "petrel_queue_messages_unacked",
            "Messages delivered and not yet acknowledged in a queue this node leads.",
        )?;
        let queue_consumers = queue_gauge(
            "petrel_queue_consumers",
            "Consumers of a queue this node leads.",
        )?;
        Ok(Metrics {
            registry,
            up,
            cluster_nodes,
            destinations,
            protocols,
            resources,
            partitions_led,
            partition_replicas,
            partitions_under_replicated,
            queue_ready,
            queue_unacked,
            queue_consumers,
        })
    }

    /// The protocol front-ends' counters, for their listeners.
    pub(crate) fn protocols(&self) -> petrel_protocols::Metrics {
        self.protocols.clone()
    }

    /// The resource gauges, for the resource watcher.
    pub(crate) fn resources(&self) -> resources::Gauges {
        self.resources.clone()
    }

    /// Keeps the partition and per-queue gauges up to date with what this node holds and
    /// leads, every [`REFRESH_EVERY`], until the task is aborted.
    pub(crate) fn watch_node(
        &self,
        node: Arc<ClusterNode>,
        messaging: Arc<Messaging>,
    ) -> tokio::task::JoinHandle<()> {
        let metrics = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The queues exported at the last refresh: those not led here now go.
            let mut exported: HashSet<[String; 2]> = HashSet::new();
            loop {
                tick.tick().await;
                let replication = node.replication().await;
                metrics.partitions_led.set(gauge_value(replication.led));
                metrics
                    .partition_replicas
                    .set(gauge_value(replication.replicas));
                metrics
                    .partitions_under_replicated
                    .set(gauge_value(replication.under_replicated));
                let queues = messaging.led_queues(QUEUE_STATS_TIMEOUT).await;
                let mut now = HashSet::with_capacity(queues.len());
                for queue in queues {
                    let labels = [queue.vhost, queue.name];
                    let values = [labels[0].as_str(), labels[1].as_str()];
                    metrics
                        .queue_ready
                        .with_label_values(&values)
                        .set(gauge_value(queue.stats.ready));
                    metrics
                        .queue_unacked
                        .with_label_values(&values)
                        .set(gauge_value(queue.stats.unacked));
                    metrics
                        .queue_consumers
                        .with_label_values(&values)
                        .set(i64::from(queue.stats.consumers));
                    exported.remove(&labels);
                    now.insert(labels);
                }
                for gone in std::mem::replace(&mut exported, now) {
                    let values = [gone[0].as_str(), gone[1].as_str()];
                    for gauge in [
                        &metrics.queue_ready,
                        &metrics.queue_unacked,
                        &metrics.queue_consumers,
                    ] {
                        // Absent already is fine: nothing stale is left either way.
                        let _ = gauge.remove_label_values(&values);
                    }
                }
            }
        })
    }

    /// Keeps the cluster gauges up to date with the metadata until the task is aborted.
    pub(crate) fn watch_cluster(
        &self,
        mut metadata: tokio::sync::watch::Receiver<petrel_core::meta::Metadata>,
    ) -> tokio::task::JoinHandle<()> {
        let (nodes, destinations) = (self.cluster_nodes.clone(), self.destinations.clone());
        tokio::spawn(async move {
            loop {
                {
                    let m = metadata.borrow_and_update();
                    nodes.set(i64::try_from(m.nodes.len()).unwrap_or(i64::MAX));
                    let count: usize = m.destinations.values().map(|d| d.len()).sum();
                    destinations.set(i64::try_from(count).unwrap_or(i64::MAX));
                }
                if metadata.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    /// The registry, for subsystems that add their own metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Sets `petrel_up`.
    pub(crate) fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }

    /// Every metric in the Prometheus text exposition format.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let encoder = TextEncoder::new();
        let mut buffer = Vec::new();
        encoder.encode(&self.registry.gather(), &mut buffer)?;
        String::from_utf8(buffer).map_err(|err| prometheus::Error::Msg(err.to_string()))
    }
}

/// A count as a gauge's value.
pub(crate) fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_build_info_up_and_the_gauges_present_from_the_start() -> Result<(), prometheus::Error>
    {
        let metrics = Metrics::new()?;
        let text = metrics.render()?;
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!("petrel_build_info{{version=\"{version}\"}} 1")),
            "{text}"
        );
        assert!(text.contains("petrel_up 0"), "{text}");
        for always in [
            "petrel_amqp_connections 0",
            "petrel_messages_published_total 0",
            "petrel_resource_alarm{resource=\"disk\"} 0",
            "petrel_resource_alarm{resource=\"memory\"} 0",
            "petrel_partitions_led 0",
        ] {
            assert!(text.contains(always), "{always} in {text}");
        }
        metrics.set_up(true);
        assert!(metrics.render()?.contains("petrel_up 1"));
        Ok(())
    }
}
