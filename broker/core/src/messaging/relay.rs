//! A relay: how a node serves consumers of a queue partition led elsewhere. Its channels'
//! operations go up one stream to the dispatcher on the leader (`service`), and the feed
//! comes down to their connections.
//!
//! The relay keeps what makes a leader change invisible to its consumers: their credit,
//! what each channel holds (given to the next leader's dispatcher to adopt, not to
//! deliver again), and the offsets settled lately (a settle the old leader had not
//! committed is made again instead of delivering the message twice).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::dispatch::{Delivery, Feed, Op, Sink, Stats};
use super::message::Message;
use crate::cluster::ClusterNode;
use crate::meta::Kind;
use crate::transport::proto::queue_feed::Item;
use crate::transport::proto::queue_op::Op as Up;
use crate::transport::proto::request::Kind as Ask;
use crate::transport::proto::{
    Answer, Credit, Get, Held, Offsets, QueueFeed, QueueOp, RemoteDelivery, Request, Subscribe,
};

/// Pause before looking for the leader again.
const RETRY: Duration = Duration::from_millis(100);
/// Settled offsets remembered, to settle again what a new leader would deliver twice.
pub(super) const RECENT: usize = 1 << 16;

/// A consumer served through a relay.
pub(super) struct Consumer {
    pub owner: u64,
    pub sink: Sink,
    pub auto_ack: bool,
    /// Credit granted and not used yet: granted again to a new leader.
    pub credit: u32,
}

/// What a dispatcher that lost its leadership hands to the relay that takes its place on
/// its node, so that its consumers go on with the next leader unaware.
#[derive(Default)]
pub(crate) struct Handover {
    /// Consumers by id, with the credit they have left.
    pub consumers: Vec<(u64, Consumer)>,
    /// Delivered and not settled: offset and the channel holding it.
    pub held: Vec<(u64, u64)>,
    /// Settled lately, perhaps not yet committed: settled again, not delivered again.
    pub recent: Vec<u64>,
}

/// What waits for an answer.
enum Waiting {
    Stats(oneshot::Sender<Stats>),
    Purge(oneshot::Sender<u64>),
    Get {
        owner: u64,
        no_ack: bool,
        reply: oneshot::Sender<Option<(Delivery, u64)>>,
    },
}

pub(crate) struct Relay {
    node: Arc<ClusterNode>,
    group: u64,
    queue: String,
    consumers: HashMap<u64, Consumer>,
    /// Delivered through this relay, not settled: offset → channel.
    held: BTreeMap<u64, u64>,
    recent: HashSet<u64>,
    recent_order: VecDeque<u64>,
    waiting: HashMap<u64, Waiting>,
    next_request: u64,
}

/// Operations up to the leader; unbounded, so that the relay never stops reading the
/// feed while the leader waits for it to read (they are bounded by the consumers' credit).
type UpStream = mpsc::UnboundedSender<QueueOp>;

impl Relay {
    /// Starts relaying `queue` (its partition `group`); runs while the queue exists and
    /// some handle is left.
    pub(crate) fn spawn(
        node: Arc<ClusterNode>,
        group: u64,
        queue: String,
    ) -> mpsc::UnboundedSender<Op> {
        let (ops, rx) = mpsc::unbounded_channel();
        Relay::take_over(node, group, queue, Handover::default(), rx);
        ops
    }

    /// Starts relaying `queue` for what `handover` holds, reading `ops` (the channel its
    /// consumers' connections already send to).
    pub(crate) fn take_over(
        node: Arc<ClusterNode>,
        group: u64,
        queue: String,
        handover: Handover,
        ops: mpsc::UnboundedReceiver<Op>,
    ) {
        let mut relay = Relay {
            node,
            group,
            queue,
            consumers: handover.consumers.into_iter().collect(),
            held: handover.held.into_iter().collect(),
            recent: HashSet::new(),
            recent_order: VecDeque::new(),
            waiting: HashMap::new(),
            next_request: 1,
        };
        for offset in handover.recent {
            relay.remember(offset);
        }
        tokio::spawn(relay.run(ops));
    }

    async fn run(mut self, mut ops: mpsc::UnboundedReceiver<Op>) {
        loop {
            let placed = self.node.partition(Kind::Queue, &self.queue, 0);
            if placed.map(|p| p.group).ok() != Some(self.group) {
                // The queue is gone.
                break;
            }
            let Some((up, mut feed)) = self.connect().await else {
                // No leader yet: operations wait in the channel meanwhile.
                tokio::time::sleep(RETRY).await;
                continue;
            };
            self.resume(&up);
            loop {
                tokio::select! {
                    op = ops.recv() => match op {
                        Some(op) => self.up(op, &up),
                        None => return,
                    },
                    item = feed.message() => match item {
                        Ok(Some(QueueFeed { item: Some(item) })) => self.down(item, &up),
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    },
                }
            }
            // The leader went: questions asked of it go unanswered (their askers see none).
            self.waiting.clear();
            tracing::info!(group = self.group, queue = %self.queue, "relayed queue lost its leader; finding the next");
        }
        for (id, c) in self.consumers.drain() {
            let _ = c.sink.send(Feed::Cancelled { consumer: id });
        }
    }

    /// A stream to the dispatcher on the queue's leader, trying the leader this node
    /// knows of first, then every replica.
    async fn connect(&self) -> Option<(UpStream, tonic::Streaming<QueueFeed>)> {
        let placed = self.node.partition(Kind::Queue, &self.queue, 0).ok()?;
        let mut candidates: Vec<u64> = self.node.leader(self.group).into_iter().collect();
        for r in placed.replicas {
            if !candidates.contains(&r) {
                candidates.push(r);
            }
        }
        for id in candidates {
            let Some(addr) = self.node.addr_of(id) else {
                continue;
            };
            let Ok(mut client) = self.node.peers().queues(&addr) else {
                continue;
            };
            let (up, rx) = mpsc::unbounded_channel();
            let first = QueueOp {
                group: self.group,
                op: None,
            };
            if up.send(first).is_err() {
                continue;
            }
            match client.consume(UnboundedReceiverStream::new(rx)).await {
                Ok(response) => {
                    tracing::info!(group = self.group, queue = %self.queue, leader = id, "relaying the queue's consumers to its leader");
                    return Some((up, response.into_inner()));
                }
                Err(status) => {
                    tracing::debug!(group = self.group, addr, %status, "not the queue's leader");
                }
            }
        }
        None
    }

    /// Tells a new leader what this relay's consumers hold and want.
    fn resume(&mut self, up: &UpStream) {
        let mut by_owner: HashMap<u64, Vec<u64>> = HashMap::new();
        for (offset, owner) in &self.held {
            by_owner.entry(*owner).or_default().push(*offset);
        }
        for (owner, offsets) in by_owner {
            send(up, self.group, Up::Adopt(Held { owner, offsets }));
        }
        for (id, c) in &self.consumers {
            let subscribe = Subscribe {
                consumer: *id,
                owner: c.owner,
                auto_ack: c.auto_ack,
            };
            send(up, self.group, Up::Subscribe(subscribe));
            if c.credit > 0 {
                let credit = Credit {
                    consumer: *id,
                    n: c.credit,
                };
                send(up, self.group, Up::Credit(credit));
            }
        }
    }

    fn up(&mut self, op: Op, up: &UpStream) {
        let op = match op {
            Op::Subscribe {
                consumer,
                owner,
                sink,
                auto_ack,
            } => {
                self.consumers.insert(
                    consumer,
                    Consumer {
                        owner,
                        sink,
                        auto_ack,
                        credit: 0,
                    },
                );
                Up::Subscribe(Subscribe {
                    consumer,
                    owner,
                    auto_ack,
                })
            }
            Op::Credit { consumer, n } => {
                if let Some(c) = self.consumers.get_mut(&consumer) {
                    c.credit = c.credit.saturating_add(n);
                }
                Up::Credit(Credit { consumer, n })
            }
            Op::Cancel { consumer } => {
                self.consumers.remove(&consumer);
                Up::Cancel(consumer)
            }
            Op::Settle { offsets } => {
                for o in &offsets {
                    self.held.remove(o);
                    self.remember(*o);
                }
                Up::Settle(Offsets { offsets })
            }
            Op::Requeue { offsets } => {
                for o in &offsets {
                    self.held.remove(o);
                }
                Up::Requeue(Offsets { offsets })
            }
            Op::Reject { offsets } => {
                for o in &offsets {
                    self.held.remove(o);
                    self.remember(*o);
                }
                Up::Reject(Offsets { offsets })
            }
            Op::Release { owner } => {
                self.held.retain(|_, o| *o != owner);
                Up::Release(owner)
            }
            Op::Adopt { owner, offsets } => Up::Adopt(Held { owner, offsets }),
            Op::Touch => Up::Touch(true),
            // The leader's own dispatcher commits what this relay sent it.
            Op::Drain(done) => {
                let _ = done.send(());
                return;
            }
            Op::Stats(reply) => self.ask(Waiting::Stats(reply), Ask::Stats(true)),
            Op::Purge(reply) => self.ask(Waiting::Purge(reply), Ask::Purge(true)),
            Op::Get {
                owner,
                no_ack,
                reply,
            } => self.ask(
                Waiting::Get {
                    owner,
                    no_ack,
                    reply,
                },
                Ask::Get(Get { owner, no_ack }),
            ),
        };
        send(up, self.group, op);
    }

    fn ask(&mut self, waiting: Waiting, kind: Ask) -> Up {
        let id = self.next_request;
        self.next_request += 1;
        self.waiting.insert(id, waiting);
        Up::Request(Request {
            id,
            kind: Some(kind),
        })
    }

    fn remember(&mut self, offset: u64) {
        if self.recent.insert(offset) {
            self.recent_order.push_back(offset);
            if self.recent_order.len() > RECENT
                && let Some(old) = self.recent_order.pop_front()
            {
                self.recent.remove(&old);
            }
        }
    }

    fn down(&mut self, item: Item, up: &UpStream) {
        match item {
            Item::Delivery(d) => self.deliver(d, up),
            Item::Cancelled(consumer) => {
                // The dispatcher stopped: its queue went, or its leader moved (the stream
                // then ends too, and the consumer resumes on the next leader).
                let gone = self.node.partition(Kind::Queue, &self.queue, 0).is_err();
                if gone && let Some(c) = self.consumers.remove(&consumer) {
                    let _ = c.sink.send(Feed::Cancelled { consumer });
                }
            }
            Item::Answer(answer) => self.answered(answer),
            Item::TimedOut(t) => {
                // The dispatcher gave back what the channel held and dropped its consumers.
                let sink = self
                    .consumers
                    .values()
                    .find(|c| c.owner == t.owner)
                    .map(|c| c.sink.clone());
                self.consumers.retain(|_, c| c.owner != t.owner);
                self.held.retain(|_, o| *o != t.owner);
                if let Some(sink) = sink {
                    let _ = sink.send(Feed::TimedOut {
                        owner: t.owner,
                        timeout_ms: t.timeout_ms,
                    });
                }
            }
        }
    }

    fn deliver(&mut self, d: RemoteDelivery, up: &UpStream) {
        let Some(c) = self.consumers.get_mut(&d.consumer) else {
            // Cancelled here meanwhile.
            send(
                up,
                self.group,
                Up::Requeue(Offsets {
                    offsets: vec![d.offset],
                }),
            );
            return;
        };
        c.credit = c.credit.saturating_sub(1);
        if self.recent.contains(&d.offset) {
            // Settled here before; the settle had not reached the old leader's log.
            let settle = Up::Settle(Offsets {
                offsets: vec![d.offset],
            });
            send(up, self.group, settle);
            c.credit += 1;
            let credit = Credit {
                consumer: d.consumer,
                n: 1,
            };
            send(up, self.group, Up::Credit(credit));
            return;
        }
        let message = match Message::from_batch(d.message) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "a relayed message that does not decode");
                return;
            }
        };
        let (owner, auto_ack, sink) = (c.owner, c.auto_ack, c.sink.clone());
        if auto_ack {
            self.remember(d.offset);
        } else {
            self.held.insert(d.offset, owner);
        }
        let delivery = Delivery {
            consumer: d.consumer,
            offset: d.offset,
            redelivered: d.redelivered,
            message,
        };
        if sink.send(Feed::Delivery(delivery)).is_err() {
            // The connection went: its consumers and what it holds go back.
            self.consumers.retain(|_, c| c.owner != owner);
            self.held.retain(|_, o| *o != owner);
            send(up, self.group, Up::Release(owner));
        }
    }

    fn answered(&mut self, answer: Answer) {
        let Some(waiting) = self.waiting.remove(&answer.id) else {
            return;
        };
        match waiting {
            Waiting::Stats(reply) => {
                let _ = reply.send(Stats {
                    ready: answer.ready,
                    unacked: answer.unacked,
                    consumers: answer.consumers,
                });
            }
            Waiting::Purge(reply) => {
                let _ = reply.send(answer.purged);
            }
            Waiting::Get {
                owner,
                no_ack,
                reply,
            } => {
                let got = answer.got.and_then(|d| {
                    let message = Message::from_batch(d.message).ok()?;
                    if no_ack {
                        self.remember(d.offset);
                    } else {
                        self.held.insert(d.offset, owner);
                    }
                    Some((
                        Delivery {
                            consumer: 0,
                            offset: d.offset,
                            redelivered: d.redelivered,
                            message,
                        },
                        answer.ready,
                    ))
                });
                let _ = reply.send(got);
            }
        }
    }
}

fn send(up: &UpStream, group: u64, op: Up) {
    // A closed stream is noticed by the feed side, which reconnects.
    let _ = up.send(QueueOp {
        group,
        op: Some(op),
    });
}
