//! A queue partition's cursor: which messages are settled (acknowledged, or dropped) for
//! good, and the length limits that refuse new ones. It lives in the partition's Raft
//! state machine, so every replica knows it and a new leader delivers exactly what is
//! left; a publish is refused by the same rule on every replica.

use std::collections::{BTreeMap, BTreeSet};

use petrel_log::RecordBatch;
use serde::{Deserialize, Serialize};

/// Name of the command that settles messages.
pub(crate) const SETTLE: &str = "settle";
/// Name of the command that sets a queue partition's [`Limits`].
pub(crate) const LIMITS: &str = "limits";

/// What a queue may hold, counted by its state machine (`x-max-length-bytes`, and with
/// `x-overflow` `reject-publish`, `x-max-length` too).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Unsettled messages at most.
    pub max_length: Option<u64>,
    /// Unsettled body bytes at most.
    pub max_bytes: Option<u64>,
    /// A message beyond a limit is refused (`reject-publish`), not the oldest dropped.
    pub reject: bool,
}

/// Settled messages, as proposed by the partition's dispatcher.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settle {
    /// Every offset below this is settled (or no message: Raft's own entries, commands).
    pub floor: u64,
    /// Offsets at or above the floor settled out of order.
    pub offsets: Vec<u64>,
    /// Messages this settles that no earlier settle did (they may lie below the floor).
    #[serde(default)]
    pub count: u64,
    /// Body bytes of the messages this settles that no earlier settle did.
    #[serde(default)]
    pub bytes: u64,
    /// Offsets given back once more each (nacked, rejected with requeue, left unacked by
    /// a closing channel): their delivery counts survive a change of leader.
    #[serde(default)]
    pub returned: Vec<u64>,
}

/// What a queue partition's consumers have settled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settled {
    /// Every offset below it is settled.
    pub floor: u64,
    /// Offsets at or above the floor settled out of order.
    pub above: BTreeSet<u64>,
    /// Messages settled in all.
    #[serde(default)]
    pub count: u64,
    /// Messages appended in all (refused ones not counted).
    #[serde(default)]
    pub appended: u64,
    /// Body bytes settled in all: counted only while the queue has a byte limit.
    #[serde(default)]
    pub bytes: u64,
    /// Body bytes appended in all: counted only while the queue has a byte limit.
    #[serde(default)]
    pub appended_bytes: u64,
    /// Times each unsettled message was given back, for the ones that were.
    #[serde(default)]
    pub returned: BTreeMap<u64, u32>,
}

impl Settled {
    /// Applies a settle command; the floor never goes back.
    pub(crate) fn apply(&mut self, settle: &Settle) {
        self.count = (self.count + settle.count).min(self.appended);
        self.bytes = (self.bytes + settle.bytes).min(self.appended_bytes);
        // Bytes of messages settled unread (after a failover) are not known: an empty
        // queue makes the count exact again.
        if self.count == self.appended {
            self.bytes = self.appended_bytes;
        }
        self.floor = self.floor.max(settle.floor);
        self.above
            .extend(settle.offsets.iter().filter(|o| **o >= self.floor));
        self.above = self.above.split_off(&self.floor);
        // Acks in order move the floor on by themselves.
        while self.above.remove(&self.floor) {
            self.floor += 1;
        }
        for offset in &settle.returned {
            if !self.contains(*offset) {
                *self.returned.entry(*offset).or_default() += 1;
            }
        }
        for offset in &settle.offsets {
            self.returned.remove(offset);
        }
        self.returned = self.returned.split_off(&self.floor);
    }

    /// Messages appended and not settled (ready, or delivered and not yet acked).
    pub fn unsettled(&self) -> u64 {
        self.appended - self.count
    }

    /// Body bytes appended and not settled (counted while the queue has a byte limit).
    pub fn unsettled_bytes(&self) -> u64 {
        self.appended_bytes.saturating_sub(self.bytes)
    }

    /// Counts an appended batch; with `limits` that refuse, the messages that would go
    /// beyond one are settled at once, unread, and their offsets returned.
    pub(crate) fn append(&mut self, batch: &RecordBatch, limits: Option<&Limits>) -> Vec<u64> {
        let Some(limits) = limits.filter(|l| l.reject || l.max_bytes.is_some()) else {
            self.appended += u64::from(batch.record_count());
            return Vec::new();
        };
        let records = match batch.records() {
            Ok(records) => records,
            Err(e) => {
                // Validated when it was proposed; alike on every replica if not.
                tracing::warn!(error = %e, "undecodable batch counted without its bytes");
                self.appended += u64::from(batch.record_count());
                return Vec::new();
            }
        };
        let mut refused = Vec::new();
        for record in records {
            let size = record.value.len() as u64;
            let over = limits.max_length.is_some_and(|max| self.unsettled() >= max)
                || limits
                    .max_bytes
                    .is_some_and(|max| self.unsettled_bytes() + size > max);
            if limits.reject && over {
                self.above.insert(record.offset);
                refused.push(record.offset);
            } else {
                self.appended += 1;
                if limits.max_bytes.is_some() {
                    self.appended_bytes += size;
                }
            }
        }
        refused
    }

    /// Whether the message at `offset` is settled.
    pub fn contains(&self, offset: u64) -> bool {
        offset < self.floor || self.above.contains(&offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settle(floor: u64, offsets: &[u64]) -> Settle {
        Settle {
            floor,
            offsets: offsets.to_vec(),
            count: offsets.len() as u64,
            ..Settle::default()
        }
    }

    #[test]
    fn delivery_counts_are_kept_until_their_messages_are_settled() {
        let mut s = Settled {
            appended: 10,
            ..Settled::default()
        };
        let returned = |offsets: &[u64]| Settle {
            returned: offsets.to_vec(),
            ..Settle::default()
        };
        s.apply(&returned(&[3, 5, 5]));
        assert_eq!(s.returned, BTreeMap::from([(3, 1), (5, 2)]));
        s.apply(&settle(0, &[5]));
        s.apply(&settle(4, &[]));
        assert!(s.returned.is_empty(), "{:?}", s.returned);
    }

    /// A batch of messages with these body sizes, placed at `base`.
    fn batch(base: u64, sizes: &[usize]) -> RecordBatch {
        let mut b = petrel_log::BatchBuilder::new();
        for size in sizes {
            b.push(0, None, &vec![0; *size], &[]);
        }
        b.build(base, 1, 1).expect("a batch")
    }

    #[test]
    fn reject_publish_refuses_messages_beyond_the_length_until_some_are_settled() {
        let limits = Limits {
            max_length: Some(2),
            max_bytes: None,
            reject: true,
        };
        let mut s = Settled::default();
        assert_eq!(s.append(&batch(0, &[1, 1, 1]), Some(&limits)), vec![2]);
        assert_eq!((s.appended, s.unsettled()), (2, 2));
        // The refused one is settled, so the floor passes it once the others are.
        s.apply(&settle(0, &[0]));
        assert_eq!(s.append(&batch(3, &[1, 1]), Some(&limits)), vec![4]);
        s.apply(&settle(0, &[1, 3]));
        assert_eq!(s.floor, 5);
    }

    #[test]
    fn reject_publish_refuses_a_message_that_would_pass_the_byte_limit() {
        let limits = Limits {
            max_length: None,
            max_bytes: Some(10),
            reject: true,
        };
        let mut s = Settled::default();
        assert_eq!(s.append(&batch(0, &[6, 5, 4]), Some(&limits)), vec![1]);
        assert_eq!(s.unsettled_bytes(), 10);
        s.apply(&Settle {
            floor: 1,
            count: 1,
            bytes: 6,
            ..Settle::default()
        });
        assert_eq!(s.unsettled_bytes(), 4);
    }

    #[test]
    fn byte_counts_are_exact_again_once_the_queue_is_empty() {
        let limits = Limits {
            max_length: None,
            max_bytes: Some(100),
            reject: false,
        };
        let mut s = Settled::default();
        assert!(s.append(&batch(0, &[30, 30]), Some(&limits)).is_empty());
        // Settled unread after a failover: the count is known, the bytes are not.
        s.apply(&settle(2, &[]));
        s.apply(&Settle {
            floor: 2,
            count: 2,
            ..Settle::default()
        });
        assert_eq!(s.unsettled_bytes(), 0);
    }

    #[test]
    fn acks_out_of_order_are_kept_until_the_floor_passes_them() {
        let mut s = Settled::default();
        s.apply(&settle(2, &[5, 7]));
        assert!(s.contains(1) && !s.contains(2) && s.contains(5) && !s.contains(6));
        s.apply(&settle(6, &[]));
        assert_eq!(
            (s.floor, s.above.iter().copied().collect::<Vec<_>>()),
            (6, vec![7])
        );
        s.apply(&settle(6, &[6]));
        assert_eq!((s.floor, s.above.len()), (8, 0));
    }

    #[test]
    fn the_floor_never_goes_back() {
        let mut s = Settled::default();
        s.apply(&settle(10, &[]));
        s.apply(&settle(4, &[3, 12]));
        assert_eq!(s.floor, 10);
        assert!(s.contains(3) && s.contains(12) && !s.contains(11));
    }
}
