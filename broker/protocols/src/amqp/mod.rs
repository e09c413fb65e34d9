//! AMQP 0-9-1, as RabbitMQ speaks it, so that its clients work unchanged (DESIGN.md §2).
//!
//! * `frame`: frames off and onto the wire (amq-protocol's codec; bodies sliced, not copied).
//! * `connection`: one task per connection: handshake (SASL PLAIN and AMQPLAIN, tuning,
//!   vhost), heartbeats and resource alarms; its `channels` part (channel, queue and
//!   exchange methods), its `publish` part (publishes stored through the core and
//!   confirmed after the Raft commit, transactions) and its `consume` part (consumers
//!   with prefetch, basic.get, acks, nacks and rejects, deliveries).
//! * `convert`: properties and field tables to the core's neutral form and back.
//! * `error`: reply codes, and which errors close a channel or the connection.
//!
//! What is not there yet is listed in the README's AMQP section.

mod connection;
mod convert;
mod error;
mod frame;

use std::sync::Arc;
use std::time::Duration;

use petrel_core::messaging::Messaging;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::Metrics;

pub use error::code;

/// The AMQP listener's limits, offered to clients in connection.tune.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Largest frame, in bytes (RabbitMQ's default).
    pub frame_max: u32,
    /// Highest channel number.
    pub channel_max: u16,
    /// Heartbeat interval offered, in seconds (0: none).
    pub heartbeat: u16,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat: 60,
        }
    }
}

/// Accepts AMQP connections on `listener` until `stop` turns true; each is served on a
/// task of its own, counted in `metrics`. Then every connection is closed (after
/// confirming what it took in) before this returns, so that no publish reaches a node
/// that is leaving.
pub async fn serve(
    listener: TcpListener,
    messaging: Arc<Messaging>,
    settings: Settings,
    metrics: Metrics,
    stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    let mut stopped = stop.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let run = connection::run(
                        stream,
                        peer,
                        messaging.clone(),
                        settings,
                        metrics.clone(),
                        stop.clone(),
                    );
                    connections.spawn(run);
                }
                // Out of file descriptors and the like: the listener itself goes on.
                Err(e) => tracing::warn!(error = %e, "accepting an AMQP connection"),
            },
            Some(_) = connections.join_next() => {}
            _ = stopped.wait_for(|s| *s) => break,
        }
    }
    drop(listener);
    let bound = connection::STOP_CONFIRM_TIMEOUT + connection::CLOSE_TIMEOUT + CLOSE_SLACK;
    let all_closed = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(bound, all_closed).await.is_err() {
        let open = connections.len();
        tracing::warn!(
            open,
            "AMQP connections still open when the listener stopped"
        );
    }
}

/// Beyond a connection's own limits, for its task to end.
const CLOSE_SLACK: Duration = Duration::from_secs(1);
