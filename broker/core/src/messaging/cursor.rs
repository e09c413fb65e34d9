//! A queue partition's cursor: which messages are settled (acknowledged, or dropped) for
//! good. It lives in the partition's Raft state machine, so every replica knows it and a
//! new leader delivers exactly what is left.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Name of the command that settles messages.
pub(crate) const SETTLE: &str = "settle";

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
    /// Messages appended in all.
    #[serde(default)]
    pub appended: u64,
}

impl Settled {
    /// Applies a settle command; the floor never goes back.
    pub(crate) fn apply(&mut self, settle: &Settle) {
        self.count = (self.count + settle.count).min(self.appended);
        self.floor = self.floor.max(settle.floor);
        self.above
            .extend(settle.offsets.iter().filter(|o| **o >= self.floor));
        self.above = self.above.split_off(&self.floor);
        // Acks in order move the floor on by themselves.
        while self.above.remove(&self.floor) {
            self.floor += 1;
        }
    }

    /// Messages appended and not settled (ready, or delivered and not yet acked).
    pub fn unsettled(&self) -> u64 {
        self.appended - self.count
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
        }
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
