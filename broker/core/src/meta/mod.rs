//! The cluster's metadata (DESIGN.md §3): queues and topics, where their partitions
//! live, and the member nodes. One Raft group on every node holds it
//! ([`METADATA_GROUP`]); its log is a partition log like any other, each entry one
//! [`Command`] as JSON, and every node applies it to the same [`Metadata`].
//!
//! * `state`: the metadata and the commands, a pure state machine (placement spreads
//!   replicas and preferred leaders evenly; refusals change nothing).
//! * `exchanges`: exchanges and bindings, and the pure routing through them.
//! * `vhosts`: how names of separate virtual hosts share one namespace.
//! * `users`: who may connect, with which password, to which vhosts.
//! * [`proposal`] and [`outcome`]: a command into a proposal for the group, and its
//!   result out of what applying it answered.

mod exchanges;
mod state;
mod users;
mod vhosts;

use petrel_log::{BatchBuilder, BatchError, RecordBatch};

use crate::raft::{Application, Applied, Proposal};

pub(crate) use exchanges::text as argument_text;
pub use exchanges::{
    Arguments, BUILTIN as BUILTIN_EXCHANGES, Binding, Exchange, ExchangeKind, Exchanges, Target,
    headers_match, topic_matches,
};
pub use state::{
    Command, Declared, Destination, Durability, Kind, MAX_NAME_BYTES, MAX_PARTITIONS, MetaError,
    Metadata, Node, NodeState, Outcome, Partition, Retention, Spec,
};
pub use users::{GUEST, HashError, User, hash_password, verify_password};
pub use vhosts::{DEFAULT_VHOST, Named, in_vhost, scoped, unscoped};

/// The metadata group's id; partition groups count from 1.
pub const METADATA_GROUP: u64 = 0;

impl Application for Metadata {
    fn apply(&mut self, batch: &RecordBatch) -> Option<serde_json::Value> {
        let result = batch
            .records()
            .map_err(|e| MetaError::InvalidArgument(format!("unreadable command batch: {e}")))
            .and_then(|records| {
                let [record] = records.as_slice() else {
                    return Err(MetaError::InvalidArgument(
                        "a command batch holds one command".into(),
                    ));
                };
                serde_json::from_slice::<Command>(&record.value)
                    .map_err(|e| MetaError::InvalidArgument(format!("not a command: {e}")))
            })
            .and_then(|command| self.execute(command));
        serde_json::to_value(result).ok()
    }
}

/// The proposal that carries `command` to the metadata group.
pub fn proposal(command: &Command) -> Result<Proposal, BatchError> {
    let json = serde_json::to_vec(command)
        .map_err(|_| BatchError::MalformedRecords("a command that does not serialize"))?;
    let mut b = BatchBuilder::new();
    b.push(0, None, &json, &[]);
    Ok(Proposal(b.build(0, 0, 0)?))
}

/// The result of a command, from what applying its proposal answered.
pub fn outcome(applied: &Applied) -> Result<Outcome, MetaError> {
    let reply = applied
        .reply
        .clone()
        .ok_or_else(|| MetaError::InvalidArgument("the entry was not a command".into()))?;
    serde_json::from_value::<Result<Outcome, MetaError>>(reply)
        .map_err(|e| MetaError::InvalidArgument(format!("unreadable command result: {e}")))?
}
