//! Petrel's protocol front-ends: bytes from a client socket in, core commands out.
//!
//! * [`amqp`]: AMQP 0-9-1, as RabbitMQ speaks it.
//! * [`Metrics`]: the front-ends' counters (connections, messages published, confirmed,
//!   delivered, acknowledged), registered by `petrel-server`.
//! * later MQTT 3.1.1 and 5, STOMP 1.2, and Kafka: each a codec (bytes ⇄ frames, "not
//!   enough bytes yet" is not an error) and a session over the same core API.
//!
//! A connection never touches storage: it talks to `petrel_core::messaging` only, and
//! maps the core's errors onto the wire's own codes at the edge. Listeners are bound by
//! `petrel-server`; this crate serves what they accept.

pub mod amqp;
mod metrics;

pub use metrics::Metrics;
