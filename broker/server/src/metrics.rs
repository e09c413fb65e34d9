//! The node's Prometheus registry. Later subsystems register their metrics here.

use prometheus::{Encoder, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

/// The node's metrics registry and the gauges the server itself owns.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    up: IntGauge,
    cluster_nodes: IntGauge,
    destinations: IntGauge,
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
        let up = IntGauge::new(
            "petrel_up",
            "1 while the node is ready (storage open, listeners bound), else 0.",
        )?;
        registry.register(Box::new(up.clone()))?;
        let cluster_nodes = IntGauge::new(
            "petrel_cluster_nodes",
            "Nodes in the cluster's metadata, as this node last applied it.",
        )?;
        registry.register(Box::new(cluster_nodes.clone()))?;
        let destinations = IntGauge::new(
            "petrel_destinations",
            "Queues and topics in the cluster's metadata, as this node last applied it.",
        )?;
        registry.register(Box::new(destinations.clone()))?;
        Ok(Metrics {
            registry,
            up,
            cluster_nodes,
            destinations,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_build_info_and_up() -> Result<(), prometheus::Error> {
        let metrics = Metrics::new()?;
        let text = metrics.render()?;
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!("petrel_build_info{{version=\"{version}\"}} 1")),
            "{text}"
        );
        assert!(text.contains("petrel_up 0"), "{text}");
        metrics.set_up(true);
        assert!(metrics.render()?.contains("petrel_up 1"));
        Ok(())
    }
}
