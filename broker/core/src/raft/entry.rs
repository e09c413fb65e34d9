//! One Raft entry as one record batch, and back.

use std::time::{SystemTime, UNIX_EPOCH};

use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use petrel_log::{BatchBuilder, BatchError, RecordBatch};

use super::{PartitionRaft, Proposal};

/// Keys of the one record of a control batch.
const BLANK: &[u8] = b"raft.blank";
const MEMBERSHIP: &[u8] = b"raft.membership";

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
    #[error("a proposal cannot be a control batch")]
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
        EntryPayload::Normal(Proposal(batch)) if batch.is_control() => {
            Err(EntryError::ControlProposal)
        }
        EntryPayload::Normal(Proposal(batch)) => Ok(batch),
        EntryPayload::Blank => Ok(control(BLANK, &[], entry.log_id)?),
        EntryPayload::Membership(m) => {
            Ok(control(MEMBERSHIP, &serde_json::to_vec(&m)?, entry.log_id)?)
        }
    }
}

fn control(kind: &[u8], value: &[u8], id: LogId<u64>) -> Result<RecordBatch, BatchError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let mut b = BatchBuilder::new().control();
    b.push(now, Some(kind), value, &[]);
    b.build(0, id.leader_id.term, id.index)
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
                (EntryPayload::Normal(Proposal(a)), EntryPayload::Normal(Proposal(_))) => {
                    assert_eq!(a.records().expect("records").len(), 2);
                    assert!(!a.is_control());
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
