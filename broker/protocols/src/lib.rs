//! Petrel's protocol front-ends: bytes from a client socket in, core commands out.
//!
//! Nothing lives here yet. What this crate will hold (DESIGN.md §2):
//!
//! * one module per protocol: AMQP 0-9-1, MQTT 3.1.1 and 5, STOMP 1.2, later Kafka;
//!   each a codec (bytes ⇄ frames, "not enough bytes yet" is not an error) and a pure
//!   session state machine (frames in, core commands and frames out);
//! * the mapping of each protocol onto exchanges, queues and topics of `petrel-core`,
//!   and of protocol errors onto the wire's own codes at the edge.
//!
//! A connection never touches storage: it talks to `petrel-core` only. Listeners and
//! sockets are owned by `petrel-server`.
