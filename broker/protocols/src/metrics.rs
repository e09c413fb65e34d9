//! The protocol front-ends' counters: plain Prometheus handles, bumped on the hot path
//! with one atomic add each; `petrel-server` registers them in the node's registry.

use prometheus::{IntCounter, IntGauge, Registry};

/// Connections and message counts of this node's clients, over every protocol.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// AMQP connections open (handshake completed).
    pub(crate) amqp_connections: IntGauge,
    /// AMQP connections whose handshake completed (connection.open-ok sent).
    pub(crate) amqp_connections_opened: IntCounter,
    /// Messages received whole from publishers.
    pub(crate) published: IntCounter,
    /// Publishes stored (a confirm-mode channel acks them).
    pub(crate) confirmed: IntCounter,
    /// Publishes not stored (a confirm-mode channel nacks them).
    pub(crate) refused: IntCounter,
    /// Messages delivered to consumers and answered to basic.get.
    pub(crate) delivered: IntCounter,
    /// Deliveries flagged redelivered.
    pub(crate) redelivered: IntCounter,
    /// Deliveries acknowledged by their consumers.
    pub(crate) acknowledged: IntCounter,
}

impl Metrics {
    /// Fresh handles, all zero, in no registry yet.
    pub fn new() -> Result<Self, prometheus::Error> {
        Ok(Self {
            amqp_connections: IntGauge::new(
                "petrel_amqp_connections",
                "AMQP connections open on this node.",
            )?,
            amqp_connections_opened: IntCounter::new(
                "petrel_amqp_connections_opened_total",
                "AMQP connections accepted (handshake completed) by this node.",
            )?,
            published: IntCounter::new(
                "petrel_messages_published_total",
                "Messages received whole from publishers connected to this node.",
            )?,
            confirmed: IntCounter::new(
                "petrel_messages_confirmed_total",
                "Publishes of this node's clients stored (acked to confirm-mode channels).",
            )?,
            refused: IntCounter::new(
                "petrel_messages_refused_total",
                "Publishes of this node's clients not stored (nacked to confirm-mode channels).",
            )?,
            delivered: IntCounter::new(
                "petrel_messages_delivered_total",
                "Messages delivered to this node's consumers and basic.get answers.",
            )?,
            redelivered: IntCounter::new(
                "petrel_messages_redelivered_total",
                "Deliveries by this node flagged redelivered.",
            )?,
            acknowledged: IntCounter::new(
                "petrel_messages_acknowledged_total",
                "Deliveries acknowledged by this node's consumers.",
            )?,
        })
    }

    /// Registers every handle in `registry`.
    pub fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.amqp_connections.clone()))?;
        for counter in [
            &self.amqp_connections_opened,
            &self.published,
            &self.confirmed,
            &self.refused,
            &self.delivered,
            &self.redelivered,
            &self.acknowledged,
        ] {
            registry.register(Box::new(counter.clone()))?;
        }
        Ok(())
    }
}

/// One open connection in `petrel_amqp_connections`: counted while it lives, however
/// its task ends.
#[derive(Debug)]
pub(crate) struct Open(IntGauge);

impl Open {
    /// Counts a connection that completed its handshake.
    pub(crate) fn new(metrics: &Metrics) -> Self {
        metrics.amqp_connections_opened.inc();
        metrics.amqp_connections.inc();
        Open(metrics.amqp_connections.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}
