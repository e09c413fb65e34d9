//! A stream's consumer (`x-queue-type: stream`), as RabbitMQ's streams have them: each
//! reads the partition's log from an offset of its own (`x-stream-offset`), against
//! credit, and settles nothing (acks only give credit back); the log is kept by
//! retention. It reads this node's replica, or a replica elsewhere where the node holds
//! none.

use std::collections::VecDeque;
use std::sync::Arc;

use petrel_log::RecordBatch;
use tokio::sync::{mpsc, watch};

use super::dispatch::{Delivery, Feed, Op, Sink, Stats};
use super::message::{Message, Table, Value};
use crate::cluster::ClusterNode;
use crate::meta::Kind;
use crate::transport::proto::ReadStreamRequest;

/// Bytes read from the log at a time.
const READ_BYTES: usize = 1 << 20;
/// How long a read from a replica elsewhere waits there for new messages.
const WAIT_MS: u32 = 1_000;
/// Pause before reading again when no replica answered.
const RETRY: std::time::Duration = std::time::Duration::from_millis(100);

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

/// One consumer reading one stream partition: from this node's replica, or, on a node
/// that holds none, from a replica elsewhere over the internal `ReadStream` call.
struct Reader {
    node: Arc<ClusterNode>,
    group: u64,
    /// The stream's stored name, to find its replicas.
    queue: String,
    consumer: u64,
    owner: u64,
    sink: Sink,
    /// This node holds no replica: reads go to one that does.
    remote: bool,
    /// The next offset to read.
    pos: u64,
    /// Records stored before this time are skipped (a start by time).
    not_before: Option<i64>,
    /// Read, not yet delivered (the credit ran out).
    read: VecDeque<(u64, Message)>,
}

/// Starts consumer `consumer` of channel `owner` on partition `group` of stream `queue`
/// (its stored name) at `start`.
pub(crate) fn spawn(
    node: Arc<ClusterNode>,
    group: u64,
    queue: String,
    consumer: u64,
    owner: u64,
    sink: Sink,
    start: StartAt,
) -> mpsc::UnboundedSender<Op> {
    let high_watermark = node.high_watermark(group);
    let reader = Reader {
        node,
        group,
        queue,
        consumer,
        owner,
        sink,
        remote: high_watermark.is_none(),
        pos: 0,
        not_before: None,
        read: VecDeque::new(),
    };
    let (ops, rx) = mpsc::unbounded_channel();
    tokio::spawn(reader.run(rx, high_watermark, start));
    ops
}

impl Reader {
    async fn run(
        mut self,
        mut ops: mpsc::UnboundedReceiver<Op>,
        mut high_watermark: Option<watch::Receiver<u64>>,
        start: StartAt,
    ) {
        match start {
            StartAt::First => {}
            StartAt::Next => self.pos = self.end().await,
            StartAt::Offset(offset) => self.pos = offset,
            StartAt::Last => {
                let end = self.end().await;
                self.pos = self.last_batch(end).await;
            }
            StartAt::Time(ms) => self.not_before = Some(ms),
        }
        let mut credit: u32 = 0;
        loop {
            while credit > 0 {
                if self.read.is_empty() && !self.fill(0).await {
                    break;
                }
                let Some((offset, message)) = self.read.pop_front() else {
                    continue;
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
                grew = grown(&mut high_watermark), if waiting && !self.remote => {
                    if !grew {
                        self.gone();
                        return;
                    }
                }
                _ = self.fill(WAIT_MS), if waiting && self.remote => {
                    if self.node.partition(Kind::Queue, &self.queue, 0).is_err() {
                        self.gone();
                        return;
                    }
                }
            }
        }
    }

    /// The stream went away (deleted, or its replica moved off this node).
    fn gone(&self) {
        let _ = self.sink.send(Feed::Cancelled {
            consumer: self.consumer,
        });
    }

    /// Committed message batches from `offset` (about `READ_BYTES`) and the high
    /// watermark, from this node's replica or from a replica elsewhere (waiting up to
    /// `wait_ms` there for new ones); `None` if no replica answered.
    async fn read_at(&self, offset: u64, wait_ms: u32) -> Option<(Vec<RecordBatch>, u64)> {
        if !self.remote {
            return self.node.read(self.group, offset, READ_BYTES)?.ok();
        }
        let replicas = self
            .node
            .partition(Kind::Queue, &self.queue, 0)
            .map(|p| p.replicas)
            .unwrap_or_default();
        for id in replicas {
            let Some(addr) = self.node.addr_of(id) else {
                continue;
            };
            let Ok(mut client) = self.node.peers().queues(&addr) else {
                continue;
            };
            let request = ReadStreamRequest {
                group: self.group,
                offset,
                max_bytes: u32::try_from(READ_BYTES).unwrap_or(u32::MAX),
                wait_ms,
            };
            match client.read_stream(request).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    let batches = reply
                        .batches
                        .into_iter()
                        .filter_map(|b| RecordBatch::from_bytes(b).ok())
                        .collect();
                    return Some((batches, reply.high_watermark));
                }
                Err(status) => {
                    tracing::debug!(group = self.group, addr, %status, "reading a stream")
                }
            }
        }
        // No replica answered: not again at once.
        tokio::time::sleep(RETRY).await;
        None
    }

    /// The stream's high watermark: where `next` starts.
    async fn end(&self) -> u64 {
        self.read_at(u64::MAX, 0).await.map_or(0, |(_, end)| end)
    }

    /// Reads the next batches into `read` (none of them, if all are older than a start
    /// by time); false if there was nothing more to read.
    async fn fill(&mut self, wait_ms: u32) -> bool {
        let Some((batches, high_watermark)) = self.read_at(self.pos, wait_ms).await else {
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
    async fn last_batch(&self, high_watermark: u64) -> u64 {
        let mut back = 64;
        loop {
            let from = high_watermark.saturating_sub(back);
            let mut at = from;
            let mut last = None;
            while at < high_watermark {
                let Some((batches, _)) = self.read_at(at, 0).await else {
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

/// Whether the high watermark moved (false: the replica went away); never, without one.
async fn grown(high_watermark: &mut Option<watch::Receiver<u64>>) -> bool {
    match high_watermark {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
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
