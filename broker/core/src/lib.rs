//! Petrel's broker core: everything between a decoded protocol command and the log.
//!
//! What this crate holds, and will hold (DESIGN.md §1 and §3):
//!
//! * **partitions** ([`raft`], so far its storage): each an append-only log of message
//!   batches replicated by its own Raft group (openraft), the Raft log being the message
//!   log stored by `petrel-log`; one task per partition, reached through a bounded channel.
//! * **messaging** ([`messaging`]): what the protocol front-ends call: the neutral
//!   message, publishing through exchanges, and each queue partition's dispatcher
//!   (consumers against credit, acks replicated as settles in its state machine). Topics'
//!   `ordered` subscriptions come later.
//! * **routing** ([`meta`]'s exchanges): exchanges (direct, fanout, topic, headers) and
//!   bindings that send a published message to queues, for every protocol alike.
//! * **metadata** ([`meta`], so far destinations, placement and nodes): the node-wide
//!   metadata Raft group (vhosts, exchanges, bindings, destinations, placement, users),
//!   and forwarding to partition leaders.
//!
//! Arrows point one way: `petrel-protocols` calls this crate, this crate calls
//! `petrel-log`; it knows no wire protocol and opens no socket of its own except the
//! internal Raft transport.

pub mod cluster;
pub mod messaging;
pub mod meta;
pub mod raft;
pub mod transport;
