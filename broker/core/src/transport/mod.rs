//! The internal transport: every Raft group's messages between nodes over gRPC (tonic),
//! one connection per peer, each request naming its group (DESIGN.md §3).
//!
//! Entries travel as the record batches the log stores (`bytes` fields, sliced from the
//! request, not copied); the small rest of each message (votes, log ids, snapshot chunks,
//! results and Raft errors) as openraft's own serde JSON.
//!
//! * [`Peers`]: the connections to peers, shared by every group; [`Peers::group`] gives
//!   the `RaftNetworkFactory` a group's `Raft` sends through.
//! * `heartbeats`: idle groups' heartbeats to one peer go out together.
//! * [`RaftService`]: the gRPC service handing requests to this node's [`Groups`].

mod client;
mod heartbeats;
mod server;

use openraft::{LogId, Vote};
use serde::{Deserialize, Serialize};

use crate::raft::NodeId;

pub use client::{Connection, Network, Peers, ProposeError};
pub(crate) use client::{KEEP_ALIVE, KEEP_ALIVE_TIMEOUT};
pub use server::{Groups, HoldGuard, Holds, RaftService};

/// The generated `petrel.internal.v1` code (messages, client and server).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("petrel.internal.v1");
}

/// An `AppendEntries` request without its entries.
#[derive(Debug, Serialize, Deserialize)]
struct AppendHeader {
    vote: Vote<NodeId>,
    prev_log_id: Option<LogId<NodeId>>,
    leader_commit: Option<LogId<NodeId>>,
}
