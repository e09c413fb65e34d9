//! A queue partition's dispatcher: the one task, on the partition's leader, that hands
//! its messages to consumers and settles them (DESIGN.md §1, shared subscription).
//!
//! * Consumers get messages only against credit, which their connection grants (AMQP
//!   prefetch, MQTT receive maximum), round-robin among those that have some.
//! * A delivered message stays in flight, owned by the channel it went to, until that
//!   channel settles it (ack) or gives it back (nack/reject with requeue, or closing): it
//!   is then delivered again, flagged redelivered, before anything newer.
//! * Settles are proposed through the partition's Raft group in batches, with the floor
//!   below which everything is settled, so a new leader's dispatcher starts from there.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Weak};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::Messaging;
use super::cursor::{SETTLE, Settle, Settled};
use super::message::{Message, Value};
use super::policy::{Overflow, Policy, dead_lettered};
use super::relay::{Consumer, Handover, RECENT, Relay};
use crate::cluster::{ClusterNode, now_ms};
use crate::meta::{Kind, unscoped};
use crate::raft::{NodeId, Proposal};

/// Bytes read from the log at a time for consumers.
const READ_BYTES: usize = 1 << 20;
/// Bytes read to look at the head of a queue nobody consumes.
const PEEK_BYTES: usize = 64 << 10;

/// A message handed to a consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The consumer it is for.
    pub consumer: u64,
    /// Its offset in the partition: what settles and requeues name.
    pub offset: u64,
    /// Delivered before (and given back).
    pub redelivered: bool,
    /// The message.
    pub message: Message,
}

/// What a consumer's connection hears from a dispatcher.
// Nearly every item is a delivery: boxing it would cost an allocation per message to
// shrink the rare cancellation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Feed {
    /// A message for one of its consumers.
    Delivery(Delivery),
    /// The consumer was cancelled by the broker: its queue was deleted, or its leader
    /// moved (the client consumes again, as RabbitMQ's clients do on basic.cancel).
    Cancelled {
        /// The consumer.
        consumer: u64,
    },
    /// A channel held a delivery unacked past the queue's consumer timeout: what it held
    /// is delivered again, and the channel is to be closed (RabbitMQ's `406`).
    TimedOut {
        /// The channel.
        owner: u64,
        /// The timeout, in milliseconds.
        timeout_ms: u64,
    },
}

/// Where a consumer's feed goes: its connection's, shared by its consumers.
pub type Sink = mpsc::UnboundedSender<Feed>;

/// A queue's counts, as its dispatcher knows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages ready for delivery.
    pub ready: u64,
    /// Delivered, not yet acked.
    pub unacked: u64,
    /// Consumers attached.
    pub consumers: u32,
}

/// What a dispatcher is asked to do.
#[derive(Debug)]
pub(crate) enum Op {
    Subscribe {
        consumer: u64,
        owner: u64,
        sink: Sink,
        auto_ack: bool,
    },
    Credit {
        consumer: u64,
        n: u32,
    },
    Cancel {
        consumer: u64,
    },
    Settle {
        offsets: Vec<u64>,
    },
    Requeue {
        offsets: Vec<u64>,
    },
    /// Rejected without requeue: dead-lettered (or dropped).
    Reject {
        offsets: Vec<u64>,
    },
    Release {
        owner: u64,
    },
    /// Offsets `owner` holds, delivered by a dispatcher before this one (through a relay):
    /// in flight once read, not delivered again.
    Adopt {
        owner: u64,
        offsets: Vec<u64>,
    },
    /// The queue was declared again: it is in use (`x-expires`).
    Touch,
    /// Answers once everything settled so far is committed (the node is stopping).
    Drain(oneshot::Sender<()>),
    Stats(oneshot::Sender<Stats>),
    /// Settles every message not in flight; answers how many.
    Purge(oneshot::Sender<u64>),
    /// One message for `owner` (basic.get), settled at once with `no_ack`; with the
    /// messages left ready.
    Get {
        owner: u64,
        no_ack: bool,
        reply: oneshot::Sender<Option<(Delivery, u64)>>,
    },
}

struct Slot {
    id: u64,
    owner: u64,
    sink: Sink,
    auto_ack: bool,
    credit: u32,
}

/// What a dispatcher is told of its queue.
pub(crate) struct QueueRules {
    /// The queue's name.
    pub name: String,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Its arguments' rules.
    pub policy: Policy,
}

/// Owner of messages being dead-lettered: in flight until their copy is stored.
const DEAD_LETTERING: u64 = 0;
/// Owner of messages being moved to the end of the log: in flight until their copy is
/// stored. (Channel ids count up from 1.)
const MOVING: u64 = u64::MAX;
/// A message given back this many offsets or more behind the end of the log is moved
/// there (copied, then settled where it was), so that a message nobody acks for good
/// does not hold the log below it from being released.
const MOVE_BEHIND: u64 = 1024;

pub(crate) struct Dispatcher {
    node: Arc<ClusterNode>,
    /// Routes dead-lettered messages.
    messaging: Weak<Messaging>,
    /// This dispatcher's own operations, for the tasks it starts.
    me: mpsc::WeakUnboundedSender<Op>,
    group: u64,
    /// The queue, deleted when its last consumer goes if it is auto-delete.
    queue: String,
    auto_delete: bool,
    policy: Policy,
    /// Times each message in flight or given back was returned.
    returned: HashMap<u64, u32>,
    /// When each delivery in flight times out, in delivery order (entries of messages
    /// settled since are skipped when they come up).
    deadlines: VecDeque<(Instant, u64, u64)>,
    /// Had a consumer (an auto-delete queue goes only after its first one left).
    consumed: bool,
    /// Last used: a consumer left or came, a basic.get, a redeclare (`x-expires`).
    used: Instant,
    /// Messages (and body bytes, counted with a byte limit) not settled when this
    /// dispatcher started, and settled since.
    unsettled_at_start: u64,
    appended_at_start: u64,
    settled_here: u64,
    unsettled_bytes_at_start: u64,
    appended_bytes_at_start: u64,
    settled_bytes_here: u64,
    consumers: Vec<Slot>,
    /// Where the round-robin goes on.
    turn: usize,
    /// The next offset to read from the log.
    read_pos: u64,
    /// Read, not yet delivered.
    ready: VecDeque<(u64, Message)>,
    /// Given back: delivered again first, lowest offset first.
    redeliver: BTreeMap<u64, Message>,
    /// Delivered and not settled, with the channel that owns each.
    in_flight: BTreeMap<u64, (u64, Message)>,
    /// Settled when this dispatcher started: skipped when read.
    settled: Settled,
    /// Held by a channel since before this dispatcher (offset → owner): in flight once read.
    adopted: HashMap<u64, u64>,
    /// Settled lately (at most `RECENT`), oldest first: perhaps not committed when the
    /// leadership moves, so the relay taking over settles them again.
    recent: VecDeque<u64>,
    /// Given back here, not yet proposed.
    to_return: Vec<u64>,
    /// Settled here, not yet proposed, and their body bytes.
    to_settle: Vec<u64>,
    to_settle_bytes: u64,
    floor_sent: u64,
    settler: mpsc::UnboundedSender<ToSettle>,
}

impl Dispatcher {
    /// Starts the dispatcher of `group`, which this node leads; it runs until the node
    /// no longer does (or every handle is gone).
    pub(crate) fn spawn(
        node: Arc<ClusterNode>,
        messaging: Weak<Messaging>,
        group: u64,
        rules: QueueRules,
        settled: Settled,
    ) -> mpsc::UnboundedSender<Op> {
        let (ops, rx) = mpsc::unbounded_channel();
        let (settler, settles) = mpsc::unbounded_channel();
        tokio::spawn(propose_settles(node.clone(), group, settles));
        let dispatcher = Dispatcher {
            node,
            messaging,
            me: ops.downgrade(),
            group,
            queue: rules.name,
            auto_delete: rules.auto_delete,
            policy: rules.policy,
            returned: settled.returned.iter().map(|(o, n)| (*o, *n)).collect(),
            deadlines: VecDeque::new(),
            consumed: false,
            used: Instant::now(),
            unsettled_at_start: settled.unsettled(),
            appended_at_start: settled.appended,
            settled_here: 0,
            unsettled_bytes_at_start: settled.unsettled_bytes(),
            appended_bytes_at_start: settled.appended_bytes,
            settled_bytes_here: 0,
            consumers: Vec::new(),
            turn: 0,
            read_pos: settled.floor,
            ready: VecDeque::new(),
            redeliver: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            adopted: HashMap::new(),
            floor_sent: settled.floor,
            settled,
            recent: VecDeque::new(),
            to_return: Vec::new(),
            to_settle: Vec::new(),
            to_settle_bytes: 0,
            settler,
        };
        tokio::spawn(dispatcher.run(rx));
        ops
    }

    async fn run(mut self, mut ops: mpsc::UnboundedReceiver<Op>) {
        let (Some(mut high_watermark), Some(raft)) = (
            self.node.high_watermark(self.group),
            self.node.group(self.group),
        ) else {
            return;
        };
        let mut metrics = raft.metrics();
        let me: NodeId = self.node.id();
        loop {
            self.enforce();
            self.pump();
            self.flush_settles();
            let starved = self.wants_messages() && self.read_pos >= *high_watermark.borrow();
            // A length limit applies as messages arrive, consumers or not.
            let watch = starved || self.policy.drops_head();
            // The head message's expiry, if it has one, wakes the dispatcher.
            let expiry = self.head_expiry();
            let timeout = self.next_timeout();
            let unused = self.unused_until();
            tokio::select! {
                () = sleep_until(unused) => self.expire_queue(),
                () = sleep_until(expiry) => {}
                () = sleep_until(timeout) => self.time_out(),
                op = ops.recv() => match op {
                    Some(op) => {
                        self.handle(op);
                        while let Ok(op) = ops.try_recv() {
                            self.handle(op);
                        }
                    }
                    None => break,
                },
                changed = high_watermark.changed(), if watch => {
                    if changed.is_err() {
                        break;
                    }
                }
                changed = metrics.changed() => {
                    if changed.is_err() || metrics.borrow().current_leader != Some(me) {
                        break;
                    }
                }
            }
        }
        // Not the leader any more, or the queue is gone.
        self.flush_settles();
        let lives = self
            .node
            .partition(Kind::Queue, &self.queue, 0)
            .is_ok_and(|p| p.group == self.group);
        let holds =
            !self.consumers.is_empty() || !self.adopted.is_empty() || !self.in_flight.is_empty();
        if lives
            && holds
            && let (Some(messaging), Some(me)) = (self.messaging.upgrade(), self.me.upgrade())
        {
            // Its consumers go on with the next leader through a relay, which reads the
            // channel their connections already send to: they see no change.
            messaging.became_relay(self.group, me);
            let handover = self.handover();
            Relay::take_over(
                self.node.clone(),
                self.group,
                self.queue.clone(),
                handover,
                ops,
            );
            tracing::info!(
                group = self.group,
                "queue dispatcher handed its consumers to a relay"
            );
            return;
        }
        for slot in &self.consumers {
            let _ = slot.sink.send(Feed::Cancelled { consumer: slot.id });
        }
        tracing::info!(group = self.group, "queue dispatcher stopped");
    }

    /// What a relay needs to go on with this dispatcher's consumers.
    fn handover(&mut self) -> Handover {
        let consumers = self
            .consumers
            .drain(..)
            .map(|s| {
                let consumer = Consumer {
                    owner: s.owner,
                    sink: s.sink,
                    auto_ack: s.auto_ack,
                    credit: s.credit,
                };
                (s.id, consumer)
            })
            .collect();
        let held = self
            .in_flight
            .iter()
            .filter(|(_, (owner, _))| *owner != DEAD_LETTERING && *owner != MOVING)
            .map(|(offset, (owner, _))| (*offset, *owner))
            .chain(self.adopted.iter().map(|(offset, owner)| (*offset, *owner)))
            .collect();
        Handover {
            consumers,
            held,
            recent: self.recent.drain(..).collect(),
        }
    }

    fn handle(&mut self, op: Op) {
        match op {
            Op::Subscribe {
                consumer,
                owner,
                sink,
                auto_ack,
            } => {
                self.consumed = true;
                self.used = Instant::now();
                self.consumers.push(Slot {
                    id: consumer,
                    owner,
                    sink,
                    auto_ack,
                    credit: 0,
                });
            }
            Op::Credit { consumer, n } => {
                if let Some(slot) = self.consumers.iter_mut().find(|s| s.id == consumer) {
                    slot.credit = slot.credit.saturating_add(n);
                }
            }
            Op::Cancel { consumer } => {
                self.consumers.retain(|s| s.id != consumer);
                self.used = Instant::now();
                self.delete_if_unused();
            }
            Op::Settle { offsets } => {
                for offset in offsets {
                    let bytes = match self.in_flight.remove(&offset) {
                        Some((_, message)) => Some(size(&message)),
                        // Settled unread: its size is not known here.
                        None => self.adopted.remove(&offset).map(|_| 0),
                    };
                    if let Some(bytes) = bytes {
                        self.returned.remove(&offset);
                        self.settle(offset, bytes);
                    }
                }
            }
            Op::Adopt { owner, offsets } => {
                for offset in offsets {
                    if self.settled.contains(offset) {
                        continue;
                    }
                    if offset >= self.read_pos {
                        self.adopted.insert(offset, owner);
                    } else if let Some(message) = self.unread(offset) {
                        // Read already (the head is looked at for expiry): in flight now.
                        self.in_flight.insert(offset, (owner, message));
                        self.deadline(offset, owner);
                    }
                }
            }
            Op::Touch => self.used = Instant::now(),
            Op::Drain(done) => {
                self.flush_settles();
                let _ = self.settler.send(ToSettle::Barrier(done));
            }
            Op::Stats(reply) => {
                let _ = reply.send(self.stats());
            }
            Op::Purge(reply) => {
                let _ = reply.send(self.purge());
            }
            Op::Get {
                owner,
                no_ack,
                reply,
            } => {
                self.used = Instant::now();
                let got = self.take().map(|(offset, message, redelivered)| {
                    if no_ack {
                        self.settle(offset, size(&message));
                    } else {
                        self.in_flight.insert(offset, (owner, message.clone()));
                        self.deadline(offset, owner);
                    }
                    let delivery = Delivery {
                        consumer: 0,
                        offset,
                        redelivered,
                        message,
                    };
                    (delivery, self.stats().ready)
                });
                let _ = reply.send(got);
            }
            Op::Requeue { offsets } => {
                for offset in offsets {
                    // An adopted one not read yet is delivered when it is.
                    self.adopted.remove(&offset);
                    if let Some((_, message)) = self.in_flight.remove(&offset) {
                        self.give_back(offset, message);
                    }
                }
            }
            Op::Reject { offsets } => {
                for offset in offsets {
                    match self.in_flight.remove(&offset) {
                        Some((_, message)) => self.dead_letter(offset, message, "rejected"),
                        // Read later: dropped then, as it cannot be dead-lettered unread.
                        None if self.adopted.remove(&offset).is_some() => self.settle(offset, 0),
                        None => {}
                    }
                }
            }
            Op::Release { owner } => self.release(owner),
        }
    }

    /// Takes the message at `offset` out of those read and not delivered, if it is there.
    fn unread(&mut self, offset: u64) -> Option<Message> {
        if let Some(message) = self.redeliver.remove(&offset) {
            return Some(message);
        }
        let at = self.ready.binary_search_by_key(&offset, |(o, _)| *o).ok()?;
        self.ready.remove(at).map(|(_, message)| message)
    }

    /// Gives back everything `owner` holds.
    fn release(&mut self, owner: u64) {
        self.adopted.retain(|_, o| *o != owner);
        let held: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, (o, _))| *o == owner)
            .map(|(offset, _)| *offset)
            .collect();
        for offset in held {
            if let Some((_, message)) = self.in_flight.remove(&offset) {
                self.give_back(offset, message);
            }
        }
    }

    fn wants_messages(&self) -> bool {
        self.ready.is_empty()
            && self.redeliver.is_empty()
            && self.consumers.iter().any(|s| s.credit > 0)
    }

    /// Delivers while some consumer has credit and a message is there.
    fn pump(&mut self) {
        while !self.consumers.is_empty() {
            let Some(at) = self.next_consumer() else {
                return;
            };
            let Some((offset, message, redelivered)) = self.take() else {
                return;
            };
            let slot = &mut self.consumers[at];
            let delivery = Delivery {
                consumer: slot.id,
                offset,
                redelivered,
                message: message.clone(),
            };
            if slot.sink.send(Feed::Delivery(delivery)).is_err() {
                // The connection went away: its consumers go, and what it held comes back.
                let owner = slot.owner;
                self.consumers.retain(|s| s.owner != owner);
                self.redeliver.insert(offset, message);
                self.release(owner);
                self.delete_if_unused();
                continue;
            }
            slot.credit -= 1;
            if slot.auto_ack {
                self.settle(offset, size(&message));
            } else {
                let owner = slot.owner;
                self.in_flight.insert(offset, (owner, message));
                self.deadline(offset, owner);
            }
        }
    }

    /// The next message to hand out, given back ones first, then the log's; expired
    /// ones are dead-lettered on the way. One given back carries how often it was, as
    /// RabbitMQ's quorum queues say it (`x-delivery-count`).
    fn take(&mut self) -> Option<(u64, Message, bool)> {
        loop {
            let (offset, mut message, redelivered) = self.next_message()?;
            if self.expired(&message) {
                self.dead_letter(offset, message, "expired");
                continue;
            }
            if let Some(n) = self.returned.get(&offset) {
                message
                    .properties
                    .headers
                    .get_or_insert_with(Default::default)
                    .insert("x-delivery-count".into(), Value::I64(i64::from(*n)));
            }
            // A copy moved to the end of the log was delivered before.
            let redelivered = redelivered || delivery_count(&message) > 0;
            return Some((offset, message, redelivered));
        }
    }

    fn next_message(&mut self) -> Option<(u64, Message, bool)> {
        loop {
            if let Some((offset, message)) = self.redeliver.pop_first() {
                return Some((offset, message, true));
            }
            if let Some((offset, message)) = self.ready.pop_front() {
                return Some((offset, message, false));
            }
            // Without consumers only the head is looked at (expiry, length limit).
            let bytes = if self.consumers.is_empty() {
                PEEK_BYTES
            } else {
                READ_BYTES
            };
            if !self.fill(bytes) {
                return None;
            }
        }
    }

    /// Puts back a message that `next_message` took.
    fn put_back(&mut self, offset: u64, message: Message, redelivered: bool) {
        if redelivered {
            self.redeliver.insert(offset, message);
        } else {
            self.ready.push_front((offset, message));
        }
    }

    /// A message returned by its consumer: delivered again, unless it was returned more
    /// often than the queue's delivery limit allows.
    fn give_back(&mut self, offset: u64, message: Message) {
        // A message moved to the end of the log brings its count along.
        let returned = self
            .returned
            .entry(offset)
            .or_insert_with(|| delivery_count(&message));
        *returned += 1;
        let returned = *returned;
        self.to_return.push(offset);
        if self
            .policy
            .delivery_limit
            .is_some_and(|limit| u64::from(returned) > limit)
        {
            self.returned.remove(&offset);
            self.dead_letter(offset, message, "delivery_limit");
        } else if self.read_pos.saturating_sub(offset) >= MOVE_BEHIND
            && self.policy.overflow == Overflow::DropHead
        {
            self.move_to_end(offset, message, returned);
        } else {
            self.redeliver.insert(offset, message);
        }
    }

    /// Appends a copy of `message` (returned `returned` times) to the end of the log and
    /// settles it where it was once the copy is stored; until then it is in flight. (Not
    /// for a queue that refuses publishes when full: it could refuse the copy.)
    fn move_to_end(&mut self, offset: u64, mut message: Message, returned: u32) {
        message
            .properties
            .headers
            .get_or_insert_with(Default::default)
            .insert("x-delivery-count".into(), Value::I64(i64::from(returned)));
        let stored = {
            let encoded = super::message::Encoded::new(&message);
            let mut scratch = Vec::new();
            // The copy keeps the time it was published: its TTL runs on.
            let record = encoded.record(message.published_ms, &mut scratch);
            self.node
                .enqueue(Kind::Queue, &self.queue, 0, std::slice::from_ref(&record))
        };
        let stored = match stored {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(queue = %self.queue, error = %e, "moving a message to the end of the log");
                self.redeliver.insert(offset, message);
                return;
            }
        };
        self.returned.remove(&offset);
        self.in_flight.insert(offset, (MOVING, message));
        let me = self.me.clone();
        let queue = self.queue.clone();
        tokio::spawn(async move {
            match stored.await {
                Ok(_) => {
                    if let Some(me) = me.upgrade() {
                        let _ = me.send(Op::Settle {
                            offsets: vec![offset],
                        });
                    }
                }
                // In flight until the next leader delivers it again: at least once.
                Err(e) => {
                    tracing::warn!(queue, error = %e, "moving a message to the end of the log")
                }
            }
        });
    }

    /// When `message` expires (ms since the epoch) by the queue's TTL or its own
    /// `expiration`, if it does.
    fn expires_at(&self, message: &Message) -> Option<i64> {
        let own = message.properties.ttl_ms().ok().flatten();
        let ttl = match (self.policy.message_ttl, own) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(
            message
                .published_ms
                .saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX)),
        )
    }

    fn expired(&self, message: &Message) -> bool {
        self.expires_at(message).is_some_and(|at| at <= now_ms())
    }

    /// When the message at the head (as far as it is read) expires, if it does.
    fn head_expiry(&self) -> Option<Instant> {
        let head = match self.redeliver.first_key_value() {
            Some((_, m)) => m,
            None => &self.ready.front()?.1,
        };
        let wait = self.expires_at(head)?.saturating_sub(now_ms()).max(0);
        Some(Instant::now() + std::time::Duration::from_millis(wait.unsigned_abs()))
    }

    /// The queue's rules that apply without a consumer: expired messages at the head
    /// go, and the oldest ready ones beyond the length limits (`drop-head`).
    fn enforce(&mut self) {
        if self.policy.drops_head() {
            let max = self.policy.max_length.unwrap_or(u64::MAX);
            let max_bytes = self.policy.max_length_bytes;
            let mut ready = self.stats().ready;
            let mut ready_bytes = max_bytes.map_or(0, |_| self.ready_bytes());
            while ready > max || max_bytes.is_some_and(|m| ready_bytes > m) {
                match self.next_message() {
                    Some((offset, message, _)) => {
                        ready -= 1;
                        ready_bytes = ready_bytes.saturating_sub(size(&message));
                        self.dead_letter(offset, message, "maxlen");
                    }
                    None => break,
                }
            }
        }
        while let Some((offset, message, redelivered)) = self.next_message() {
            if !self.expired(&message) {
                self.put_back(offset, message, redelivered);
                break;
            }
            self.dead_letter(offset, message, "expired");
        }
    }

    /// Starts the consumer timeout of a delivery.
    fn deadline(&mut self, offset: u64, owner: u64) {
        let timeout = std::time::Duration::from_millis(self.policy.consumer_timeout);
        self.deadlines
            .push_back((Instant::now() + timeout, offset, owner));
    }

    /// When the oldest delivery still in flight times out; forgets settled ones.
    fn next_timeout(&mut self) -> Option<Instant> {
        while let Some((at, offset, owner)) = self.deadlines.front() {
            if self.in_flight.get(offset).is_some_and(|(o, _)| o == owner) {
                return Some(*at);
            }
            self.deadlines.pop_front();
        }
        None
    }

    /// Gives back what every channel holding a timed-out delivery holds, and tells it.
    fn time_out(&mut self) {
        let now = Instant::now();
        let mut owners = Vec::new();
        while let Some((at, offset, owner)) = self.deadlines.front().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            if self
                .in_flight
                .get(&offset)
                .is_some_and(|(o, _)| *o == owner)
                && !owners.contains(&owner)
            {
                owners.push(owner);
            }
        }
        for owner in owners {
            tracing::info!(queue = %self.queue, owner, timeout_ms = self.policy.consumer_timeout, "a delivery was not acknowledged in time");
            let timed_out = Feed::TimedOut {
                owner,
                timeout_ms: self.policy.consumer_timeout,
            };
            if let Some(slot) = self.consumers.iter().find(|s| s.owner == owner) {
                let _ = slot.sink.send(timed_out);
            }
            self.consumers.retain(|s| s.owner != owner);
            self.release(owner);
        }
    }

    /// Dead-letters `message` (at `offset`) to the queue's dead-letter exchange, settling
    /// it once its copy is stored there (at least once, as RabbitMQ's quorum queues do);
    /// without one, or if it cannot be routed, it is dropped.
    fn dead_letter(&mut self, offset: u64, message: Message, reason: &str) {
        let (Some(to), Some(messaging)) = (&self.policy.dead_letter, self.messaging.upgrade())
        else {
            self.settle(offset, size(&message));
            return;
        };
        let (vhost, queue) = unscoped(&self.queue);
        let dead = dead_lettered(&message, queue, reason, to, now_ms());
        let stored = match messaging.publish(vhost, &dead) {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(queue = %self.queue, error = %e, "dead-lettering: dropped instead");
                self.settle(offset, size(&message));
                return;
            }
        };
        self.in_flight.insert(offset, (DEAD_LETTERING, message));
        let me = self.me.clone();
        let queue = self.queue.clone();
        tokio::spawn(async move {
            if let Err(e) = stored.await {
                tracing::warn!(queue, error = %e, "dead-lettering: dropped instead");
            }
            if let Some(me) = me.upgrade() {
                let _ = me.send(Op::Settle {
                    offsets: vec![offset],
                });
            }
        });
    }

    /// Counts as this dispatcher knows them.
    fn stats(&self) -> Stats {
        let unsettled = self
            .unsettled_at_start
            .saturating_add(self.appended_since_start())
            .saturating_sub(self.settled_here + self.to_settle.len() as u64);
        let unacked = self.in_flight.len() as u64;
        Stats {
            ready: unsettled.saturating_sub(unacked),
            unacked,
            consumers: u32::try_from(self.consumers.len()).unwrap_or(u32::MAX),
        }
    }

    fn appended_since_start(&self) -> u64 {
        let now = self.node.appended(self.group).map_or(0, |(count, _)| count);
        now.saturating_sub(self.appended_at_start)
    }

    /// Body bytes of the ready messages (counted with a byte limit only).
    fn ready_bytes(&self) -> u64 {
        let appended = self.node.appended(self.group).map_or(0, |(_, bytes)| bytes);
        let in_flight: u64 = self.in_flight.values().map(|(_, m)| size(m)).sum();
        (self.unsettled_bytes_at_start + appended.saturating_sub(self.appended_bytes_at_start))
            .saturating_sub(self.settled_bytes_here + self.to_settle_bytes + in_flight)
    }

    /// Settles the message at `offset`, of `bytes` body bytes, with the next proposal.
    fn settle(&mut self, offset: u64, bytes: u64) {
        self.to_settle.push(offset);
        self.to_settle_bytes += bytes;
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(offset);
    }

    /// Settles everything ready (not what is in flight).
    fn purge(&mut self) -> u64 {
        let mut purged = 0;
        while let Some((offset, message, _)) = self.next_message() {
            self.settle(offset, size(&message));
            purged += 1;
        }
        purged
    }

    /// Deletes an auto-delete queue once its last consumer has gone.
    fn delete_if_unused(&mut self) {
        if self.auto_delete && self.consumed && self.consumers.is_empty() {
            self.auto_delete = false;
            self.delete_queue();
        }
    }

    /// When the queue, unused, expires (`x-expires`): never while it has consumers.
    fn unused_until(&self) -> Option<Instant> {
        let expires = self.policy.expires?;
        self.consumers
            .is_empty()
            .then(|| self.used + std::time::Duration::from_millis(expires))
    }

    fn expire_queue(&mut self) {
        if self.unused_until().is_some_and(|at| at <= Instant::now()) {
            tracing::info!(queue = %self.queue, "the queue expired unused");
            self.policy.expires = None;
            self.delete_queue();
        }
    }

    fn delete_queue(&self) {
        let node = self.node.clone();
        let queue = self.queue.clone();
        tokio::spawn(async move {
            let command = crate::meta::Command::Delete {
                kind: crate::meta::Kind::Queue,
                name: queue.clone(),
            };
            if let Err(e) = node.command(&command).await {
                tracing::warn!(queue, error = %e, "deleting an auto-delete queue");
            }
        });
    }

    /// The next consumer with credit, round-robin.
    fn next_consumer(&mut self) -> Option<usize> {
        let n = self.consumers.len();
        let at = (0..n)
            .map(|i| (self.turn + i) % n)
            .find(|&i| self.consumers[i].credit > 0)?;
        self.turn = (at + 1) % n;
        Some(at)
    }

    /// Reads the next messages from the log into `ready`, skipping settled ones; false
    /// if there is nothing more to read.
    fn fill(&mut self, max_bytes: usize) -> bool {
        let Some(read) = self.node.read(self.group, self.read_pos, max_bytes) else {
            return false;
        };
        let (batches, high_watermark) = match read {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(group = self.group, error = %e, "reading a queue partition");
                return false;
            }
        };
        let Some(last) = batches.last() else {
            // Only Raft's own entries and commands up to the high watermark.
            self.read_pos = self.read_pos.max(high_watermark);
            return false;
        };
        let next = last.next_offset();
        // A full queue's state machine settles what it refuses as it appends it.
        let refuses = self.policy.overflow != Overflow::DropHead;
        for batch in batches {
            let records = match batch.records() {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(group = self.group, error = %e, "undecodable batch skipped");
                    continue;
                }
            };
            for record in records {
                if record.offset < self.read_pos
                    || self.settled.contains(record.offset)
                    || (refuses && self.node.is_settled(self.group, record.offset))
                {
                    continue;
                }
                let offset = record.offset;
                let message = Message::from_record(record);
                match self.adopted.remove(&offset) {
                    Some(owner) => {
                        self.in_flight.insert(offset, (owner, message));
                        self.deadline(offset, owner);
                    }
                    None => self.ready.push_back((offset, message)),
                }
            }
        }
        self.read_pos = next;
        true
    }

    /// Everything below it is settled.
    fn floor(&self) -> u64 {
        [
            self.in_flight.keys().next().copied(),
            self.redeliver.keys().next().copied(),
            self.ready.front().map(|(o, _)| *o),
        ]
        .into_iter()
        .flatten()
        .fold(self.read_pos, u64::min)
    }

    fn flush_settles(&mut self) {
        let floor = self.floor();
        if self.to_settle.is_empty() && self.to_return.is_empty() && floor <= self.floor_sent {
            return;
        }
        self.floor_sent = floor;
        let settled = std::mem::take(&mut self.to_settle);
        let bytes = std::mem::take(&mut self.to_settle_bytes);
        let count = settled.len() as u64;
        self.settled_here += count;
        self.settled_bytes_here += bytes;
        let offsets = settled.into_iter().filter(|o| *o >= floor).collect();
        let _ = self.settler.send(ToSettle::Settle(Settle {
            floor,
            offsets,
            count,
            bytes,
            returned: std::mem::take(&mut self.to_return),
        }));
    }
}

/// Times a message was returned, as its `x-delivery-count` header says (0 without one).
fn delivery_count(message: &Message) -> u32 {
    match message
        .properties
        .headers
        .as_ref()
        .and_then(|h| h.get("x-delivery-count"))
    {
        Some(Value::I64(n)) => u32::try_from(*n).unwrap_or(0),
        _ => 0,
    }
}

/// A message's size as length limits count it: its body.
fn size(message: &Message) -> u64 {
    message.body.len() as u64
}

/// Sleeps until `deadline`, or for ever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// What the settling task is given: settles, or someone waiting for them to commit.
enum ToSettle {
    Settle(Settle),
    /// Answered once every settle sent before it is committed (or failed).
    Barrier(oneshot::Sender<()>),
}

/// Proposes settles through the group, merging those that queue up meanwhile.
async fn propose_settles(
    node: Arc<ClusterNode>,
    group: u64,
    mut settles: mpsc::UnboundedReceiver<ToSettle>,
) {
    let mut waiting = Vec::new();
    while let Some(first) = settles.recv().await {
        let mut merged: Option<Settle> = None;
        let mut add = |item: ToSettle, waiting: &mut Vec<oneshot::Sender<()>>| match item {
            ToSettle::Settle(more) => match &mut merged {
                Some(settle) => {
                    settle.floor = settle.floor.max(more.floor);
                    settle.offsets.extend(more.offsets);
                    settle.count += more.count;
                    settle.bytes += more.bytes;
                    settle.returned.extend(more.returned);
                }
                None => merged = Some(more),
            },
            ToSettle::Barrier(done) => waiting.push(done),
        };
        add(first, &mut waiting);
        while let Ok(more) = settles.try_recv() {
            add(more, &mut waiting);
        }
        if let Some(mut settle) = merged {
            let floor = settle.floor;
            settle.offsets.retain(|o| *o >= floor);
            let proposal = serde_json::to_vec(&settle)
                .map_err(|e| e.to_string())
                .and_then(|json| Proposal::command(SETTLE, &json).map_err(|e| e.to_string()));
            let result = match proposal {
                Ok(p) => node
                    .write(group, p)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            // Unsettled messages are delivered again by the next leader: at least once.
            if let Err(e) = result {
                tracing::warn!(group, error = %e, "settling messages");
            }
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

/// The dispatcher's handle, for checks that it still runs.
pub(crate) fn running(ops: &mpsc::UnboundedSender<Op>) -> bool {
    !ops.is_closed()
}

/// Waits until `raft` of `group` has applied everything committed when asked: a new
/// leader's state knows every settle its predecessor committed.
pub(crate) async fn caught_up(node: &ClusterNode, group: u64) -> bool {
    match node.group(group) {
        Some(raft) => raft.ensure_linearizable().await.is_ok(),
        None => false,
    }
}
