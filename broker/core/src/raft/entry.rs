//! One Raft entry as one record batch, and back.

use bytes::Bytes;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use petrel_log::{BatchBuilder, BatchError, RecordBatch};

use super::{PartitionRaft, Proposal};
use crate::cluster::now_ms;

/// Keys of the one record of a control batch.
const BLANK: &[u8] = b"raft.blank";
const MEMBERSHIP: &[u8] = b"raft.membership";
/// Key prefix of the one record of an application's command (a queue's settled
/// messages): proposed like messages, applied by the group's application, skipped by
/// consumers like Raft's own entries.
pub(crate) const COMMAND: &[u8] = b"app.";

/// Why an entry and a batch do not convert.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// The batch itself is invalid.
    #[error(transparent)]
    Batch(#[from] BatchError),
    /// A membership record that does not decode.
    #[error("membership record: {0}")]
    Membership(#[from] serde_json::Error),
    /// A proposal may not pass for one of Raft's own entries.
    #[error("a proposal cannot be a control batch other than a command")]
    ControlProposal,
    /// A control batch that is not one of Raft's own entries.
    #[error("malformed control batch: {0}")]
    Malformed(&'static str),
}

/// The batch storing `entry`, with its records from `base_offset` on.
pub(crate) fn to_batch(
    entry: Entry<PartitionRaft>,
    base_offset: u64,
) -> Result<RecordBatch, EntryError> {
    let (term, index) = (entry.log_id.leader_id.term, entry.log_id.index);
    Ok(encode(entry)?.placed(base_offset, term, index)?)
}

/// The batch carrying `entry` (between nodes): a proposal's batch as it is, Raft's own
/// entries as control batches (placed by the log that stores them).
pub(crate) fn encode(entry: Entry<PartitionRaft>) -> Result<RecordBatch, EntryError> {
    match entry.payload {
        EntryPayload::Normal(Proposal(batch)) if batch.is_control() => match command(&batch)? {
            Some(_) => Ok(batch),
            None => Err(EntryError::ControlProposal),
        },
        EntryPayload::Normal(Proposal(batch)) => Ok(batch),
        EntryPayload::Blank => Ok(control(BLANK, &[], entry.log_id)?),
        EntryPayload::Membership(m) => {
            Ok(control(MEMBERSHIP, &serde_json::to_vec(&m)?, entry.log_id)?)
        }
    }
}

fn control(kind: &[u8], value: &[u8], id: LogId<u64>) -> Result<RecordBatch, BatchError> {
    let mut b = BatchBuilder::new().control();
    b.push(now_ms(), Some(kind), value, &[]);
    b.build(0, id.leader_id.term, id.index)
}

/// The command a control batch carries (its key without the prefix, and its value);
/// `None` for one of Raft's own entries.
pub(crate) fn command(batch: &RecordBatch) -> Result<Option<(Bytes, Bytes)>, EntryError> {
    let records = batch.records()?;
    let [record] = records.as_slice() else {
        return Err(EntryError::Malformed("a control batch holds one record"));
    };
    Ok(match &record.key {
        Some(key) if key.starts_with(COMMAND) => {
            Some((key.slice(COMMAND.len()..), record.value.clone()))
        }
        _ => None,
    })
}

/// A command batch for the group's application: `name` with `value`.
pub(crate) fn command_batch(name: &str, value: &[u8]) -> Result<RecordBatch, BatchError> {
    let mut key = COMMAND.to_vec();
    key.extend_from_slice(name.as_bytes());
    let mut b = BatchBuilder::new().control();
    b.push(now_ms(), Some(&key), value, &[]);
    b.build(0, 0, 0)
}

/// The log id a stored batch carries.
pub(crate) fn log_id(batch: &RecordBatch) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(batch.term(), 0), batch.raft_index())
}

/// The entry a stored batch holds.
pub(crate) fn from_batch(batch: RecordBatch) -> Result<Entry<PartitionRaft>, EntryError> {
    let log_id = log_id(&batch);
    if !batch.is_control() {
        return Ok(Entry {
            log_id,
            payload: EntryPayload::Normal(Proposal(batch)),
        });
    }
    let records = batch.records()?;
    let [record] = records.as_slice() else {
        return Err(EntryError::Malformed("a control batch holds one record"));
    };
    let payload = match record.key.as_deref() {
        Some(key) if key.starts_with(COMMAND) => EntryPayload::Normal(Proposal(batch.clone())),
        Some(BLANK) => EntryPayload::Blank,
        Some(MEMBERSHIP) => EntryPayload::Membership(serde_json::from_slice(&record.value)?),
        _ => return Err(EntryError::Malformed("unknown control record")),
    };
    Ok(Entry { log_id, payload })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use openraft::Membership;

    use super::*;

    fn id(term: u64, index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(term, 0), index)
    }

    fn message() -> RecordBatch {
        let mut b = BatchBuilder::new();
        b.push(5, Some(b"k"), b"v", &[]);
        b.push(6, None, b"w", &[]);
        b.build(0, 0, 0).expect("build")
    }

    #[test]
    fn every_kind_of_entry_survives_the_trip_through_a_batch() {
        let members = Membership::new(vec![BTreeSet::from([1, 2, 3])], None);
        let entries = [
            EntryPayload::Blank,
            EntryPayload::Membership(members),
            EntryPayload::Normal(Proposal(message())),
            EntryPayload::Normal(Proposal(command_batch("settle", b"{}").expect("build"))),
        ];
        for (i, payload) in entries.into_iter().enumerate() {
            let entry = Entry {
                log_id: id(3, 10 + i as u64),
                payload,
            };
            let batch = to_batch(entry.clone(), 100).expect("to batch");
            assert_eq!(batch.base_offset(), 100);
            assert_eq!((batch.term(), batch.raft_index()), (3, 10 + i as u64));
            let back = from_batch(batch).expect("from batch");
            assert_eq!(back.log_id, entry.log_id);
            match (back.payload, entry.payload) {
                (EntryPayload::Normal(Proposal(a)), EntryPayload::Normal(Proposal(_)))
                    if a.is_control() =>
                {
                    let (name, value) = command(&a).expect("valid").expect("a command");
                    assert_eq!((&name[..], &value[..]), (&b"settle"[..], &b"{}"[..]));
                }
                (EntryPayload::Normal(Proposal(a)), EntryPayload::Normal(Proposal(_))) => {
                    assert_eq!(a.records().expect("records").len(), 2);
                }
                (a, b) => assert_eq!(format!("{a:?}"), format!("{b:?}")),
            }
        }
    }

    #[test]
    fn a_proposal_cannot_pass_for_a_raft_entry() {
        let forged = control(BLANK, &[], id(1, 1)).expect("control");
        let entry = Entry {
            log_id: id(1, 1),
            payload: EntryPayload::Normal(Proposal(forged)),
        };
        assert!(matches!(
            to_batch(entry, 0),
            Err(EntryError::ControlProposal)
        ));
    }
}
