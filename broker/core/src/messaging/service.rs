//! The `Queues` service on a queue's leader: one stream per relaying node and queue
//! partition, bridged onto the local dispatcher (`relay` is the other end).
//!
//! Consumer and channel ids are the relaying node's own, so each stream maps them onto
//! ids of this node; when the stream ends, its consumers are cancelled and what its
//! channels held is delivered again.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::dispatch::{Feed, Op};
use super::{Messaging, MessagingError, QueueHandle};
use crate::transport::proto::queue_feed::Item;
use crate::transport::proto::queue_op::Op as Up;
use crate::transport::proto::queues_server::{Queues, QueuesServer};
use crate::transport::proto::request::Kind as Ask;
use crate::transport::proto::{
    Answer, QueueFeed, QueueOp, ReadStreamReply, ReadStreamRequest, RemoteDelivery, TimedOut,
};

/// The longest a stream read waits for new messages.
const MAX_STREAM_WAIT_MS: u32 = 5_000;

/// Feed items buffered towards a relaying node before deliveries wait.
const FEED_BUFFER: usize = 1024;

/// Where the service finds this node's messaging, once it exists (the internal server
/// starts before it).
#[derive(Clone, Default)]
pub struct MessagingSlot(Arc<OnceLock<Weak<Messaging>>>);

impl MessagingSlot {
    /// Fills the slot.
    pub fn set(&self, messaging: &Arc<Messaging>) {
        let _ = self.0.set(Arc::downgrade(messaging));
    }

    /// The gRPC service over this slot, for the node's internal server.
    pub fn server(&self) -> QueuesServer<QueuesService> {
        QueuesServer::new(QueuesService { slot: self.clone() }).max_decoding_message_size(256 << 20)
    }

    fn get(&self) -> Result<Arc<Messaging>, Status> {
        self.0
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| Status::unavailable("the node is starting or stopping"))
    }
}

/// The `Queues` service.
pub struct QueuesService {
    slot: MessagingSlot,
}

#[tonic::async_trait]
impl Queues for QueuesService {
    type ConsumeStream = ReceiverStream<Result<QueueFeed, Status>>;

    async fn read_stream(
        &self,
        request: Request<ReadStreamRequest>,
    ) -> Result<Response<ReadStreamReply>, Status> {
        let request = request.into_inner();
        let node = self.slot.get()?.node.clone();
        let group = request.group;
        let not_here = || Status::not_found(format!("no replica of raft group {group} here"));
        let mut high_watermark = node.high_watermark(group).ok_or_else(not_here)?;
        let wait =
            std::time::Duration::from_millis(u64::from(request.wait_ms.min(MAX_STREAM_WAIT_MS)));
        // Nothing new yet: wait (a while) for the high watermark to pass the offset.
        let _ = tokio::time::timeout(wait, high_watermark.wait_for(|h| *h > request.offset)).await;
        let max_bytes = usize::try_from(request.max_bytes.max(1)).unwrap_or(usize::MAX);
        let (batches, high_watermark) = node
            .read(group, request.offset, max_bytes)
            .ok_or_else(not_here)?
            .map_err(Status::from)?;
        Ok(Response::new(ReadStreamReply {
            batches: batches.into_iter().map(|b| b.as_bytes().clone()).collect(),
            high_watermark,
        }))
    }

    async fn consume(
        &self,
        request: Request<Streaming<QueueOp>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        let messaging = self.slot.get()?;
        let mut ops = request.into_inner();
        let first = ops
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream names no queue partition"))?;
        let queue = messaging.local(first.group).await.map_err(|e| match e {
            MessagingError::NotLeader { .. } => Status::failed_precondition(e.to_string()),
            MessagingError::QueueNotFound(_) => Status::not_found(e.to_string()),
            other => Status::unavailable(other.to_string()),
        })?;
        let (out, rx) = mpsc::channel(FEED_BUFFER);
        let (sink, feed) = mpsc::unbounded_channel();
        let bridge = Bridge {
            messaging,
            queue,
            sink,
            out,
            owners: HashMap::new(),
            consumers: HashMap::new(),
            remote: HashMap::new(),
        };
        tokio::spawn(bridge.run(first, ops, feed));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// One relaying node's stream for one queue partition.
struct Bridge {
    messaging: Arc<Messaging>,
    queue: QueueHandle,
    sink: mpsc::UnboundedSender<Feed>,
    out: mpsc::Sender<Result<QueueFeed, Status>>,
    /// The relaying node's channel ids → ours.
    owners: HashMap<u64, u64>,
    /// The relaying node's consumer ids → ours, and back.
    consumers: HashMap<u64, u64>,
    remote: HashMap<u64, u64>,
}

impl Bridge {
    async fn run(
        mut self,
        first: QueueOp,
        mut ops: Streaming<QueueOp>,
        mut feed: mpsc::UnboundedReceiver<Feed>,
    ) {
        if let Some(op) = first.op {
            self.up(op).await;
        }
        loop {
            tokio::select! {
                op = ops.message() => match op {
                    Ok(Some(QueueOp { op: Some(op), .. })) => self.up(op).await,
                    Ok(Some(_)) => {}
                    // The relaying node went, or its stream did.
                    Ok(None) | Err(_) => break,
                },
                Some(item) = feed.recv() => {
                    if !self.down(item).await {
                        break;
                    }
                }
            }
        }
        for consumer in self.consumers.values() {
            self.queue.cancel(*consumer);
        }
        for owner in self.owners.values() {
            self.queue.release(*owner);
        }
    }

    fn owner(&mut self, remote: u64) -> u64 {
        let messaging = &self.messaging;
        *self
            .owners
            .entry(remote)
            .or_insert_with(|| messaging.next_id())
    }

    async fn up(&mut self, op: Up) {
        match op {
            Up::Subscribe(s) => {
                let owner = self.owner(s.owner);
                let consumer = self.messaging.next_id();
                self.consumers.insert(s.consumer, consumer);
                self.remote.insert(consumer, s.consumer);
                self.queue.send(Op::Subscribe {
                    consumer,
                    owner,
                    sink: self.sink.clone(),
                    auto_ack: s.auto_ack,
                });
            }
            Up::Credit(c) => {
                if let Some(consumer) = self.consumers.get(&c.consumer) {
                    self.queue.credit(*consumer, c.n);
                }
            }
            Up::Cancel(remote) => {
                if let Some(consumer) = self.consumers.remove(&remote) {
                    self.remote.remove(&consumer);
                    self.queue.cancel(consumer);
                }
            }
            Up::Settle(o) => self.queue.settle(o.offsets),
            Up::Requeue(o) => self.queue.requeue(o.offsets),
            Up::Reject(o) => self.queue.reject(o.offsets),
            Up::Touch(_) => self.queue.send(Op::Touch),
            Up::Release(remote) => {
                if let Some(owner) = self.owners.remove(&remote) {
                    self.queue.release(owner);
                }
            }
            Up::Adopt(held) => {
                let owner = self.owner(held.owner);
                self.queue.send(Op::Adopt {
                    owner,
                    offsets: held.offsets,
                });
            }
            Up::Request(request) => {
                let answer = self.answer(request.kind).await;
                let item = Item::Answer(Answer {
                    id: request.id,
                    ..answer
                });
                let _ = self.out.send(Ok(QueueFeed { item: Some(item) })).await;
            }
        }
    }

    async fn answer(&mut self, kind: Option<Ask>) -> Answer {
        match kind {
            Some(Ask::Stats(_)) | None => {
                let stats = self.queue.ask(Op::Stats).await.unwrap_or_default();
                Answer {
                    ready: stats.ready,
                    unacked: stats.unacked,
                    consumers: stats.consumers,
                    ..Answer::default()
                }
            }
            Some(Ask::Purge(_)) => Answer {
                purged: self.queue.ask(Op::Purge).await.unwrap_or(0),
                ..Answer::default()
            },
            Some(Ask::Get(get)) => {
                let owner = self.owner(get.owner);
                let got = self
                    .queue
                    .ask(|reply| Op::Get {
                        owner,
                        no_ack: get.no_ack,
                        reply,
                    })
                    .await
                    .flatten();
                match got {
                    Some((d, left)) => Answer {
                        ready: left,
                        got: d.message.to_batch().ok().map(|message| RemoteDelivery {
                            consumer: 0,
                            offset: d.offset,
                            redelivered: d.redelivered,
                            message,
                        }),
                        ..Answer::default()
                    },
                    None => Answer::default(),
                }
            }
        }
    }

    /// Sends a feed item down; false once the relaying node is gone.
    async fn down(&mut self, item: Feed) -> bool {
        let item = match item {
            Feed::Delivery(d) => {
                let Some(consumer) = self.remote.get(&d.consumer).copied() else {
                    // Cancelled meanwhile: back to the queue.
                    self.queue.requeue(vec![d.offset]);
                    return true;
                };
                match d.message.to_batch() {
                    Ok(message) => Item::Delivery(RemoteDelivery {
                        consumer,
                        offset: d.offset,
                        redelivered: d.redelivered,
                        message,
                    }),
                    Err(e) => {
                        tracing::error!(error = %e, "a message that does not encode");
                        return true;
                    }
                }
            }
            Feed::TimedOut { owner, timeout_ms } => {
                let remote = self
                    .owners
                    .iter()
                    .find(|(_, local)| **local == owner)
                    .map(|(remote, _)| *remote);
                match remote {
                    Some(owner) => Item::TimedOut(TimedOut { owner, timeout_ms }),
                    None => return true,
                }
            }
            Feed::Cancelled { consumer } => match self.remote.remove(&consumer) {
                Some(remote) => {
                    self.consumers.remove(&remote);
                    Item::Cancelled(remote)
                }
                None => return true,
            },
        };
        self.out
            .send(Ok(QueueFeed { item: Some(item) }))
            .await
            .is_ok()
    }
}
