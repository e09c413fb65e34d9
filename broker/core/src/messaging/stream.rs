//! A stream's consumer (`x-queue-type: stream`), as RabbitMQ's streams have them: each
//! reads the partition's log from an offset of its own (`x-stream-offset`), against
//! credit, and settles nothing (acks only give credit back); the log is kept by
//! retention. It reads this node's replica, so it runs where one is.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::dispatch::{Delivery, Feed, Op, Sink, Stats};
use super::message::{Message, Table, Value};
use crate::cluster::ClusterNode;

/// Bytes read from the log at a time.
const READ_BYTES: usize = 1 << 20;

/// Where a stream consumer starts (`x-stream-offset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartAt {
    /// The oldest message the stream keeps.
    First,
    /// The last batch of messages stored (RabbitMQ's last chunk).
    Last,
    /// The messages stored from now on: RabbitMQ's default.
    Next,
    /// The message at this offset (or the first after it).
    Offset(u64),
    /// The first message stored at or after this time, in ms since the epoch.
    Time(i64),
}

impl StartAt {
    /// Where the consume arguments say to start; `next` without `x-stream-offset`.
    pub(crate) fn from_arguments(arguments: &Table, now_ms: i64) -> Result<StartAt, String> {
        let Some(value) = arguments.get("x-stream-offset") else {
            return Ok(StartAt::Next);
        };
        let text = match value {
            Value::Short(s) => Some(s.clone()),
            Value::Long(b) => String::from_utf8(b.clone()).ok(),
            _ => None,
        };
        let integer = match value {
            Value::I8(n) => Some(i64::from(*n)),
            Value::U8(n) => Some(i64::from(*n)),
            Value::I16(n) => Some(i64::from(*n)),
            Value::U16(n) => Some(i64::from(*n)),
            Value::I32(n) => Some(i64::from(*n)),
            Value::U32(n) => Some(i64::from(*n)),
            Value::I64(n) => Some(*n),
            _ => None,
        };
        let invalid = || format!("invalid x-stream-offset: {value:?}");
        match (text.as_deref(), integer, value) {
            (Some("first"), _, _) => Ok(StartAt::First),
            (Some("last"), _, _) => Ok(StartAt::Last),
            (Some("next"), _, _) => Ok(StartAt::Next),
            // An interval back from now, as x-max-age writes it ("1h", "7D").
            (Some(age), _, _) => super::policy::age_ms(age)
                .and_then(|ms| i64::try_from(ms).ok())
                .map(|ms| StartAt::Time(now_ms.saturating_sub(ms)))
                .ok_or_else(invalid),
            (None, Some(n), _) => u64::try_from(n).map(StartAt::Offset).map_err(|_| invalid()),
            (None, None, Value::Timestamp(seconds)) => i64::try_from(*seconds)
                .ok()
                .and_then(|s| s.checked_mul(1000))
                .map(StartAt::Time)
                .ok_or_else(invalid),
            _ => Err(invalid()),
        }
    }
}

/// One consumer reading one stream partition.
struct Reader {
    node: Arc<ClusterNode>,
    group: u64,
    consumer: u64,
    owner: u64,
    sink: Sink,
    /// The next offset to read.
    pos: u64,
    /// Records stored before this time are skipped (a start by time).
    not_before: Option<i64>,
    /// Read, not yet delivered (the credit ran out).
    read: VecDeque<(u64, Message)>,
}

/// Starts consumer `consumer` of channel `owner` on stream partition `group` at
/// `start`; `None` if this node holds no replica of it.
pub(crate) fn spawn(
    node: Arc<ClusterNode>,
    group: u64,
    consumer: u64,
    owner: u64,
    sink: Sink,
    start: StartAt,
) -> Option<mpsc::UnboundedSender<Op>> {
    let high_watermark = node.high_watermark(group)?;
    let now = *high_watermark.borrow();
    let mut reader = Reader {
        node,
        group,
        consumer,
        owner,
        sink,
        pos: 0,
        not_before: None,
        read: VecDeque::new(),
    };
    match start {
        StartAt::First => {}
        StartAt::Next => reader.pos = now,
        StartAt::Offset(offset) => reader.pos = offset,
        StartAt::Last => reader.pos = reader.last_batch(now),
        StartAt::Time(ms) => reader.not_before = Some(ms),
    }
    let (ops, rx) = mpsc::unbounded_channel();
    tokio::spawn(reader.run(rx, high_watermark));
    Some(ops)
}

impl Reader {
    async fn run(
        mut self,
        mut ops: mpsc::UnboundedReceiver<Op>,
        mut high_watermark: tokio::sync::watch::Receiver<u64>,
    ) {
        let mut credit: u32 = 0;
        loop {
            while credit > 0 {
                let Some((offset, message)) = self.next() else {
                    break;
                };
                let delivery = Delivery {
                    consumer: self.consumer,
                    offset,
                    redelivered: false,
                    message,
                };
                if self.sink.send(Feed::Delivery(delivery)).is_err() {
                    return;
                }
                credit -= 1;
            }
            let waiting = credit > 0 && self.read.is_empty();
            tokio::select! {
                op = ops.recv() => match op {
                    Some(Op::Credit { n, .. }) => credit = credit.saturating_add(n),
                    Some(Op::Cancel { consumer }) if consumer == self.consumer => return,
                    Some(Op::Release { owner }) if owner == self.owner => return,
                    Some(Op::Drain(done)) => {
                        let _ = done.send(());
                    }
                    Some(Op::Stats(reply)) => {
                        let _ = reply.send(Stats { consumers: 1, ..Stats::default() });
                    }
                    // Acks give credit back through the connection; nothing is settled,
                    // requeued or dead-lettered in a stream.
                    Some(_) => {}
                    None => return,
                },
                changed = high_watermark.changed(), if waiting => {
                    if changed.is_err() {
                        // The replica went away (the stream was deleted, or moved).
                        let _ = self.sink.send(Feed::Cancelled { consumer: self.consumer });
                        return;
                    }
                }
            }
        }
    }

    /// The next message, read from the log as needed; `None` when caught up.
    fn next(&mut self) -> Option<(u64, Message)> {
        while self.read.is_empty() {
            if !self.fill() {
                return None;
            }
        }
        self.read.pop_front()
    }

    /// Reads the next batches into `read` (none of them, if all are older than a start
    /// by time); false if there was nothing more to read.
    fn fill(&mut self) -> bool {
        let Some(Ok((batches, high_watermark))) = self.node.read(self.group, self.pos, READ_BYTES)
        else {
            return false;
        };
        let Some(last) = batches.last() else {
            // Only Raft's own entries and commands up to the high watermark.
            self.pos = self.pos.max(high_watermark);
            return false;
        };
        let next = last.next_offset();
        for batch in batches {
            if self.not_before.is_some_and(|t| batch.max_timestamp() < t) {
                continue;
            }
            let records = match batch.records() {
                Ok(records) => records,
                Err(e) => {
                    tracing::error!(group = self.group, error = %e, "undecodable batch skipped");
                    continue;
                }
            };
            for record in records {
                if record.offset < self.pos || self.not_before.is_some_and(|t| record.timestamp < t)
                {
                    continue;
                }
                self.not_before = None;
                let offset = record.offset;
                let mut message = Message::from_record(record);
                message
                    .properties
                    .headers
                    .get_or_insert_with(Table::new)
                    .insert("x-stream-offset".into(), Value::I64(offset_value(offset)));
                self.read.push_back((offset, message));
            }
        }
        self.pos = next;
        true
    }

    /// Where the last batch of messages below `high_watermark` starts (or
    /// `high_watermark` if there is none): looked for in ever longer stretches back.
    fn last_batch(&self, high_watermark: u64) -> u64 {
        let mut back = 64;
        loop {
            let from = high_watermark.saturating_sub(back);
            let mut at = from;
            let mut last = None;
            while at < high_watermark {
                let Some(Ok((batches, _))) = self.node.read(self.group, at, READ_BYTES) else {
                    return high_watermark;
                };
                let Some(batch) = batches.last() else {
                    break;
                };
                last = Some(batch.base_offset());
                at = batch.next_offset();
            }
            match last {
                Some(offset) => return offset,
                None if from == 0 => return high_watermark,
                None => back = back.saturating_mul(16),
            }
        }
    }
}

/// An offset as the `x-stream-offset` header carries it (a signed long).
fn offset_value(offset: u64) -> i64 {
    i64::try_from(offset).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(value: Value) -> Result<StartAt, String> {
        let mut args = Table::new();
        args.insert("x-stream-offset".into(), value);
        StartAt::from_arguments(&args, 10_000_000)
    }

    #[test]
    fn offsets_are_read_as_rabbitmq_clients_give_them() {
        assert_eq!(StartAt::from_arguments(&Table::new(), 0), Ok(StartAt::Next));
        assert_eq!(start(Value::Long(b"first".to_vec())), Ok(StartAt::First));
        assert_eq!(start(Value::Short("last".into())), Ok(StartAt::Last));
        assert_eq!(start(Value::Long(b"next".to_vec())), Ok(StartAt::Next));
        assert_eq!(start(Value::I64(42)), Ok(StartAt::Offset(42)));
        assert_eq!(start(Value::U8(7)), Ok(StartAt::Offset(7)));
        assert_eq!(start(Value::Timestamp(1_000)), Ok(StartAt::Time(1_000_000)));
        assert_eq!(
            start(Value::Short("10s".into())),
            Ok(StartAt::Time(9_990_000))
        );
        for bad in [
            Value::I64(-1),
            Value::Short("sideways".into()),
            Value::Bool(true),
        ] {
            assert!(start(bad).is_err());
        }
    }
}
