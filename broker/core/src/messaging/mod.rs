//! Messaging: what the protocol front-ends call (DESIGN.md §1, §2). Queues declared,
//! messages published (routed through exchanges into queues), and consumers fed by each
//! queue partition's dispatcher on its leader.
//!
//! * [`message`]: the protocol-neutral message and how it is stored as a record.
//! * [`cursor`]: what a queue's consumers have settled, kept in its Raft state machine.
//! * `dispatch`: the per-partition task, on its leader, that delivers against credit and
//!   settles.
//! * `manage`: what an administrator does to queues with no connection of its own.
//! * `relay` and `service`: consumers on other nodes reach that task through a relay on
//!   their node, over one internal stream per queue partition, which survives a change of
//!   leader without delivering a settled message again.

pub mod cursor;
mod dispatch;
mod manage;
pub mod message;
mod policy;
mod relay;
mod service;
mod stream;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

pub use dispatch::{Delivery, Feed, Sink, Stats};
pub use manage::{LedQueue, QueueArguments, QueueBinding};
pub use message::{Message, Properties, Table, Value};
pub use service::{MessagingSlot, QueuesService};

use crate::cluster::{ClusterError, ClusterNode, NewRecord, now_ms};
use crate::meta;
pub use crate::meta::ExchangeKind;
use crate::meta::{
    Arguments, Binding, Command, Declared, Durability, Exchange, Kind, MetaError, Named, Spec,
    Target, scoped, unscoped,
};
use crate::raft::{NodeId, Proposal};
use cursor::Limits;
use dispatch::{Dispatcher, Op, QueueRules};
use policy::Policy;

/// How long a new queue's leader may take to be elected.
const LEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the queues whose rules apply without consumers are looked for.
const WATCH_QUEUES: Duration = Duration::from_secs(1);
/// How long a queue's counts may take to come from its dispatcher.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);
/// How often to look whether a new queue's group has started here.
const GROUP_START_POLL: Duration = Duration::from_millis(20);
/// Replicas of a declared queue at most (as RabbitMQ's quorum queues).
const QUEUE_REPLICAS: u32 = 3;

/// Why a messaging request failed; each maps onto a protocol's own error.
#[derive(Debug, thiserror::Error)]
pub enum MessagingError {
    /// No queue of that name.
    #[error("no queue {}", Named(.0))]
    QueueNotFound(String),
    /// No exchange of that name.
    #[error("no exchange {}", Named(.0))]
    ExchangeNotFound(String),
    /// The request contradicts what exists (e.g. redeclared differently).
    #[error("{0}")]
    PreconditionFailed(String),
    /// Not permitted: a reserved name, a built-in exchange.
    #[error("{0}")]
    AccessRefused(String),
    /// An exclusive queue of another connection.
    #[error("cannot obtain exclusive access to locked queue {}", Named(.0))]
    Locked(String),
    /// The queue is led by another node; consuming there is not yet forwarded.
    #[error("queue '{queue}' is led by node {leader:?}; connect to that node to consume")]
    NotLeader {
        /// The queue.
        queue: String,
        /// Its leader, if known.
        leader: Option<NodeId>,
    },
    /// A queue at its length limit refused the message (`x-overflow` `reject-publish`).
    #[error("queue {} is full: the message was refused", Named(.0))]
    Refused(String),
    /// The cluster could not do it.
    #[error(transparent)]
    Cluster(ClusterError),
}

impl From<ClusterError> for MessagingError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Meta(MetaError::NotFound {
                kind: Kind::Queue,
                name,
            }) => MessagingError::QueueNotFound(name),
            ClusterError::Meta(MetaError::ExchangeNotFound(name)) => {
                MessagingError::ExchangeNotFound(name)
            }
            ClusterError::Meta(MetaError::PreconditionFailed(text)) => {
                MessagingError::PreconditionFailed(text)
            }
            ClusterError::Meta(MetaError::AccessRefused(text)) => {
                MessagingError::AccessRefused(text)
            }
            other => MessagingError::Cluster(other),
        }
    }
}

/// How a queue is declared (AMQP's queue.declare).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueOptions {
    /// Only check that it exists.
    pub passive: bool,
    /// Survives a restart (every queue does so far: they are replicated logs).
    pub durable: bool,
    /// Used by the declaring connection only, and deleted when it closes.
    pub exclusive: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// `x-…` arguments.
    pub arguments: Table,
}

/// How an exchange is declared (AMQP's exchange.declare).
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeOptions {
    /// Its kind.
    pub kind: ExchangeKind,
    /// Only check that it exists.
    pub passive: bool,
    /// Survives a restart (every exchange does).
    pub durable: bool,
    /// Deleted when its last binding goes.
    pub auto_delete: bool,
    /// Takes no publishes from clients.
    pub internal: bool,
    /// `x-…` arguments.
    pub arguments: Table,
}

/// A queue as declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    /// Its name.
    pub name: String,
    /// Messages ready for delivery.
    pub messages: u64,
    /// Consumers attached.
    pub consumers: u32,
}

/// Where a published message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// Stored in this many queues.
    Queues(u32),
    /// No queue matched.
    Unroutable,
}

/// A publish on its way to storage: completes once stored.
pub type Publishing =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Routed, MessagingError>> + Send>>;

/// A queue partition's dispatcher, as the channels that consume from it hold it.
#[derive(Debug, Clone)]
pub struct QueueHandle {
    group: u64,
    ops: mpsc::UnboundedSender<Op>,
}

impl QueueHandle {
    /// Identifies the queue partition (its Raft group).
    pub fn id(&self) -> u64 {
        self.group
    }

    pub(crate) fn send(&self, op: Op) {
        // A stopped dispatcher (leadership moved) gives everything back by itself.
        let _ = self.ops.send(op);
    }

    /// More deliveries `consumer` may take.
    pub fn credit(&self, consumer: u64, n: u32) {
        self.send(Op::Credit { consumer, n });
    }

    /// No more deliveries for `consumer`; what it holds stays in flight.
    pub fn cancel(&self, consumer: u64) {
        self.send(Op::Cancel { consumer });
    }

    /// Messages done with for good (acked, or rejected without requeue).
    pub fn settle(&self, offsets: Vec<u64>) {
        self.send(Op::Settle { offsets });
    }

    /// Messages to deliver again.
    pub fn requeue(&self, offsets: Vec<u64>) {
        self.send(Op::Requeue { offsets });
    }

    /// Messages rejected without requeue: dead-lettered, or dropped.
    pub fn reject(&self, offsets: Vec<u64>) {
        self.send(Op::Reject { offsets });
    }

    /// Everything `owner` (a channel) holds, to deliver again: the channel closed.
    pub fn release(&self, owner: u64) {
        self.send(Op::Release { owner });
    }

    pub(crate) async fn ask<T>(&self, op: impl FnOnce(oneshot::Sender<T>) -> Op) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.send(op(tx));
        rx.await.ok()
    }
}

/// The messaging front door of a node.
pub struct Messaging {
    node: Arc<ClusterNode>,
    /// Itself, for the dispatchers (which dead-letter through it) and its own tasks.
    me: Weak<Messaging>,
    /// The dispatchers of queue partitions this node leads, by group.
    dispatchers: Mutex<HashMap<u64, mpsc::UnboundedSender<Op>>>,
    /// Relays to the dispatchers of queue partitions led elsewhere, by group.
    relays: Mutex<HashMap<u64, mpsc::UnboundedSender<Op>>>,
    /// Exclusive queues declared through this node, by the connection that owns each.
    exclusive: Mutex<HashMap<String, u64>>,
    ids: AtomicU64,
    /// Why publishers are held back (low disk space, memory over its limit), if they are.
    alarm: watch::Sender<Option<String>>,
}

impl Messaging {
    /// Messaging over `node`.
    pub fn new(node: Arc<ClusterNode>) -> Arc<Self> {
        let messaging = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            node,
            dispatchers: Mutex::new(HashMap::new()),
            relays: Mutex::new(HashMap::new()),
            exclusive: Mutex::new(HashMap::new()),
            ids: AtomicU64::new(1),
            alarm: watch::channel(None).0,
        });
        tokio::spawn(watch_queues(Arc::downgrade(&messaging)));
        messaging
    }

    /// Holds publishers back for `reason` (AMQP's connection.blocked), or lets them go
    /// with `None`.
    pub fn set_alarm(&self, reason: Option<String>) {
        self.alarm.send_if_modified(|current| {
            let changed = *current != reason;
            *current = reason;
            changed
        });
    }

    /// Why publishers are held back, if they are, as it changes.
    pub fn alarm(&self) -> watch::Receiver<Option<String>> {
        self.alarm.subscribe()
    }

    /// Waits (at most `timeout`) until every queue led here has committed what its
    /// consumers settled: a node that stops cleanly delivers no acked message again.
    pub async fn drain(&self, timeout: Duration) {
        let dispatchers: Vec<_> = lock(&self.dispatchers).values().cloned().collect();
        let mut waiting = Vec::new();
        for ops in dispatchers {
            let (done, wait) = oneshot::channel();
            if ops.send(Op::Drain(done)).is_ok() {
                waiting.push(wait);
            }
        }
        let all = async {
            for wait in waiting {
                let _ = wait.await;
            }
        };
        if tokio::time::timeout(timeout, all).await.is_err() {
            tracing::warn!(?timeout, "queues still settling when the node stopped");
        }
    }

    /// A fresh id for a connection, channel or consumer, unique on this node.
    pub fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Refuses `queue` to any connection but its exclusive owner.
    fn check_exclusive(&self, queue: &str, connection: u64) -> Result<(), MessagingError> {
        match lock(&self.exclusive).get(queue) {
            Some(owner) if *owner != connection => Err(MessagingError::Locked(queue.to_owned())),
            _ => Ok(()),
        }
    }

    /// Declares a queue for `connection`: creates it (replicated on up to three nodes;
    /// an exclusive one on one) unless it exists, in which case it must have been
    /// declared alike.
    pub async fn declare_queue(
        &self,
        vhost: &str,
        name: &str,
        options: QueueOptions,
        connection: u64,
    ) -> Result<QueueInfo, MessagingError> {
        let local = name;
        let name = &queue_name(vhost, name)?;
        self.check_exclusive(name, connection)?;
        let declared = Declared {
            durable: options.durable,
            exclusive: options.exclusive,
            auto_delete: options.auto_delete,
            arguments: arguments(&options.arguments),
        };
        let policy = if options.passive {
            None
        } else {
            let policy = Policy::from_arguments(name, &declared.arguments)
                .map_err(MessagingError::PreconditionFailed)?;
            if policy.stream && (options.exclusive || options.auto_delete) {
                return Err(MessagingError::PreconditionFailed(format!(
                    "invalid property 'exclusive' or 'auto-delete' for stream queue {}",
                    Named(name)
                )));
            }
            Some(policy)
        };
        let existing = self
            .node
            .metadata()
            .borrow()
            .destination(Kind::Queue, name)
            .map(|d| d.spec.declared.clone());
        match existing {
            Some(current) if !options.passive => equivalent(name, &current, &declared)?,
            Some(_) => {}
            None if options.passive => return Err(MessagingError::QueueNotFound(name.to_owned())),
            None => {
                let nodes = self.node.metadata().borrow().nodes.len();
                let replicas = if options.exclusive { 1 } else { QUEUE_REPLICAS };
                let spec = Spec {
                    kind: Kind::Queue,
                    name: name.to_owned(),
                    partitions: 1,
                    replication_factor: replicas.min(u32::try_from(nodes).unwrap_or(1).max(1)),
                    durability: Durability::Always,
                    retention: policy.as_ref().map(|p| p.retention).unwrap_or_default(),
                    declared: declared.clone(),
                };
                match self.node.command(&Command::Create(spec)).await {
                    Ok(_) => {}
                    // Declared meanwhile by someone else: it must be alike.
                    Err(ClusterError::Meta(MetaError::AlreadyExists { .. })) => {
                        let current = self
                            .node
                            .metadata()
                            .borrow()
                            .destination(Kind::Queue, name)
                            .map(|d| d.spec.declared.clone())
                            .unwrap_or_default();
                        equivalent(name, &current, &declared)?;
                    }
                    Err(e) => return Err(e.into()),
                }
                if options.exclusive {
                    lock(&self.exclusive).insert(name.to_owned(), connection);
                }
            }
        }
        if let Some(limits) = policy.and_then(|p| p.limits()) {
            self.set_limits(name, limits).await?;
        }
        if let Some(ops) = self.group(name).ok().and_then(|g| self.running(g)) {
            let _ = ops.send(Op::Touch);
        }
        let stats = self.stats(name).await?;
        Ok(QueueInfo {
            name: local.to_owned(),
            messages: stats.ready,
            consumers: stats.consumers,
        })
    }

    /// Has the state machine of `queue` count `limits`, unless this node's replica of it
    /// shows it does already: before the queue is declared, so that no publish after
    /// that goes beyond them.
    async fn set_limits(&self, queue: &str, limits: Limits) -> Result<(), MessagingError> {
        let group = self.group(queue)?;
        if self.node.limits(group) == Some(Some(limits)) {
            return Ok(());
        }
        let proposal = serde_json::to_vec(&limits)
            .map_err(|e| e.to_string())
            .and_then(|json| Proposal::command(cursor::LIMITS, &json).map_err(|e| e.to_string()))
            .map_err(|message| ClusterError::Raft { group, message })?;
        self.node.write(group, proposal).await?;
        Ok(())
    }

    /// A queue's counts: from its dispatcher where it runs here, else from this node's
    /// replica (everything unsettled counted ready).
    async fn stats(&self, queue: &str) -> Result<dispatch::Stats, MessagingError> {
        let group = self.group(queue)?;
        if let Some(ops) = self.running(group) {
            let handle = QueueHandle { group, ops };
            // A relay between leaders answers later; the local replica's count does then.
            if let Ok(Some(stats)) =
                tokio::time::timeout(STATS_TIMEOUT, handle.ask(Op::Stats)).await
            {
                return Ok(stats);
            }
        }
        Ok(self.replica_stats(group))
    }

    /// A queue partition's counts as this node's replica knows them: everything
    /// unsettled counted ready (only a dispatcher tells ready from unacked).
    fn replica_stats(&self, group: u64) -> dispatch::Stats {
        dispatch::Stats {
            ready: self.node.settled(group).map_or(0, |s| s.unsettled()),
            ..dispatch::Stats::default()
        }
    }

    /// Deletes a queue (its messages and bindings); with `if_unused` / `if_empty` only
    /// if it has no consumers / no messages. Answers how many messages it held.
    pub async fn delete_queue(
        &self,
        vhost: &str,
        name: &str,
        if_unused: bool,
        if_empty: bool,
        connection: u64,
    ) -> Result<u64, MessagingError> {
        let name = &queue_name(vhost, name)?;
        self.delete_stored_queue(name, if_unused, if_empty, connection)
            .await
    }

    async fn delete_stored_queue(
        &self,
        name: &str,
        if_unused: bool,
        if_empty: bool,
        connection: u64,
    ) -> Result<u64, MessagingError> {
        self.check_exclusive(name, connection)?;
        let stats = match self.stats(name).await {
            Ok(stats) => stats,
            // Deleting a queue that is not there succeeds, as in RabbitMQ.
            Err(MessagingError::QueueNotFound(_)) => return Ok(0),
            Err(e) => return Err(e),
        };
        if if_unused && stats.consumers > 0 {
            return Err(MessagingError::PreconditionFailed(format!(
                "queue {} in use",
                Named(name)
            )));
        }
        let messages = stats.ready + stats.unacked;
        if if_empty && messages > 0 {
            return Err(MessagingError::PreconditionFailed(format!(
                "queue {} is not empty",
                Named(name)
            )));
        }
        let command = Command::Delete {
            kind: Kind::Queue,
            name: name.to_owned(),
        };
        match self.node.command(&command).await {
            Ok(_) | Err(ClusterError::Meta(MetaError::NotFound { .. })) => {}
            Err(e) => return Err(e.into()),
        }
        lock(&self.exclusive).remove(name);
        Ok(messages)
    }

    /// Removes every ready message of a queue; answers how many.
    pub async fn purge_queue(
        &self,
        vhost: &str,
        name: &str,
        connection: u64,
    ) -> Result<u64, MessagingError> {
        let name = &queue_name(vhost, name)?;
        self.check_exclusive(name, connection)?;
        self.not_a_stream(name, "queue.purge")?;
        let handle = self.queue(name).await?;
        Ok(handle.ask(Op::Purge).await.unwrap_or(0))
    }

    /// One message of `queue` for channel `owner`, if any is ready, with the number
    /// still ready after it.
    pub async fn get(
        &self,
        vhost: &str,
        queue: &str,
        owner: u64,
        no_ack: bool,
        connection: u64,
    ) -> Result<Option<(Delivery, QueueHandle, u64)>, MessagingError> {
        let queue = &queue_name(vhost, queue)?;
        self.check_exclusive(queue, connection)?;
        self.not_a_stream(queue, "basic.get")?;
        let handle = self.queue(queue).await?;
        let got = handle
            .ask(|reply| Op::Get {
                owner,
                no_ack,
                reply,
            })
            .await
            .flatten();
        Ok(got.map(|(delivery, left)| (delivery, handle, left)))
    }

    /// The exclusive queues of `connection` go with it.
    pub fn connection_closed(self: &Arc<Self>, connection: u64) {
        let owned: Vec<String> = {
            let mut exclusive = lock(&self.exclusive);
            let owned = exclusive
                .iter()
                .filter(|(_, c)| **c == connection)
                .map(|(q, _)| q.clone())
                .collect::<Vec<_>>();
            for q in &owned {
                exclusive.remove(q);
            }
            owned
        };
        for queue in owned {
            let this = self.clone();
            tokio::spawn(async move {
                let deleted = this
                    .delete_stored_queue(&queue, false, false, connection)
                    .await;
                if let Err(e) = deleted {
                    tracing::warn!(queue, error = %e, "deleting an exclusive queue");
                }
            });
        }
    }

    /// Declares an exchange, or checks that it exists (as declared).
    pub async fn declare_exchange(
        &self,
        vhost: &str,
        name: &str,
        options: ExchangeOptions,
    ) -> Result<(), MessagingError> {
        let local = name;
        let name: &str = &exchange_name(vhost, name)?;
        let existing = self.node.metadata().borrow().exchanges.get(name);
        if options.passive {
            return match existing {
                Some(_) => Ok(()),
                None => Err(MessagingError::ExchangeNotFound(name.to_owned())),
            };
        }
        if existing.is_none() && local.starts_with("amq.") {
            return Err(MessagingError::AccessRefused(format!(
                "exchange name '{local}' contains reserved prefix 'amq.*'"
            )));
        }
        let exchange = Exchange {
            kind: options.kind,
            durable: options.durable,
            auto_delete: options.auto_delete,
            internal: options.internal,
            arguments: arguments(&options.arguments),
        };
        self.node
            .command(&Command::DeclareExchange {
                name: name.to_owned(),
                exchange,
            })
            .await?;
        Ok(())
    }

    /// Deletes an exchange and its bindings.
    pub async fn delete_exchange(
        &self,
        vhost: &str,
        name: &str,
        if_unused: bool,
    ) -> Result<(), MessagingError> {
        let command = Command::DeleteExchange {
            name: exchange_name(vhost, name)?.into_owned(),
            if_unused,
        };
        self.node.command(&command).await?;
        Ok(())
    }

    /// Binds `queue` to `exchange` with `routing_key` (or unbinds it).
    #[allow(clippy::too_many_arguments)]
    pub async fn bind(
        &self,
        vhost: &str,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        args: &Table,
        bind: bool,
        connection: u64,
    ) -> Result<(), MessagingError> {
        let queue = queue_name(vhost, queue)?;
        self.check_exclusive(&queue, connection)?;
        let binding = Binding {
            exchange: exchange_name(vhost, exchange)?.into_owned(),
            destination: queue,
            target: Target::Queue,
            routing_key: routing_key.to_owned(),
            arguments: arguments(args),
        };
        self.change_binding(binding, bind).await
    }

    /// Binds exchange `destination` to exchange `source` with `routing_key` (or unbinds
    /// it): what `source` routes there, `destination` routes on.
    pub async fn bind_exchange(
        &self,
        vhost: &str,
        destination: &str,
        source: &str,
        routing_key: &str,
        args: &Table,
        bind: bool,
    ) -> Result<(), MessagingError> {
        let binding = Binding {
            exchange: exchange_name(vhost, source)?.into_owned(),
            destination: exchange_name(vhost, destination)?.into_owned(),
            target: Target::Exchange,
            routing_key: routing_key.to_owned(),
            arguments: arguments(args),
        };
        self.change_binding(binding, bind).await
    }

    async fn change_binding(&self, binding: Binding, bind: bool) -> Result<(), MessagingError> {
        let command = if bind {
            Command::Bind(binding)
        } else {
            Command::Unbind(binding)
        };
        self.node.command(&command).await?;
        Ok(())
    }

    /// Publishes `message` through its exchange: routed and queued for storage before
    /// this returns (so one publisher's messages keep their order); the returned future
    /// completes once stored (committed on a majority of each queue's replicas).
    pub fn publish(
        self: &Arc<Self>,
        vhost: &str,
        message: &Message,
    ) -> Result<Publishing, MessagingError> {
        let exchange = exchange_name(vhost, &message.exchange)?;
        // Each queue, and whether it dead-letters what it refuses when full.
        let targets: Vec<(String, bool)> = {
            let view = self.node.metadata();
            let view = view.borrow();
            let headers = || {
                message
                    .properties
                    .headers
                    .as_ref()
                    .map(arguments)
                    .unwrap_or_default()
            };
            let queues = view
                .exchanges
                .route(&exchange, &message.routing_key, &headers)
                .ok_or_else(|| MessagingError::ExchangeNotFound(exchange.into_owned()))?;
            // Consumers read a queue's first partition (AMQP declares queues with one), so
            // that is where its messages go until consumers read them all.
            queues
                .into_iter()
                .filter_map(|q| {
                    let overflow = view
                        .destination(Kind::Queue, &q)?
                        .spec
                        .declared
                        .arguments
                        .get("x-overflow")
                        .and_then(crate::meta::argument_text);
                    Some((q, overflow.as_deref() == Some("reject-publish-dlx")))
                })
                .collect()
        };
        if targets.is_empty() {
            return Ok(Box::pin(async { Ok(Routed::Unroutable) }));
        }
        let encoded = message::Encoded::new(message);
        let mut scratch = Vec::new();
        let record: NewRecord<'_> = encoded.record(now_ms(), &mut scratch);
        let mut stored = Vec::with_capacity(targets.len());
        for (queue, dlx) in targets {
            let s = self
                .node
                .enqueue(Kind::Queue, &queue, 0, std::slice::from_ref(&record))?;
            stored.push((queue, dlx, s));
        }
        let queues = u32::try_from(stored.len()).unwrap_or(u32::MAX);
        // Kept only to dead-letter it should a full queue refuse it.
        let refusable = stored
            .iter()
            .any(|(_, dlx, _)| *dlx)
            .then(|| (self.clone(), message.clone()));
        Ok(Box::pin(async move {
            let mut refused = None;
            for (queue, dlx, s) in stored {
                match s.await {
                    Ok(_) => {}
                    Err(ClusterError::Shared(e)) if matches!(*e, ClusterError::Full { .. }) => {
                        if let (true, Some((me, message))) = (dlx, &refusable) {
                            me.dead_letter_refused(message, &queue).await;
                        }
                        refused = Some(queue);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            // Stored in the other queues, but its publisher is told (`basic.nack`).
            match refused {
                Some(queue) => Err(MessagingError::Refused(queue)),
                None => Ok(Routed::Queues(queues)),
            }
        }))
    }

    /// Dead-letters `message`, which `queue` refused when full (`reject-publish-dlx`).
    async fn dead_letter_refused(self: &Arc<Self>, message: &Message, queue: &str) {
        let policy = self
            .node
            .metadata()
            .borrow()
            .destination(Kind::Queue, queue)
            .and_then(|d| Policy::from_arguments(queue, &d.spec.declared.arguments).ok());
        let Some(to) = policy.and_then(|p| p.dead_letter) else {
            return;
        };
        let (vhost, local) = unscoped(queue);
        let dead = policy::dead_lettered(message, local, "maxlen", &to, now_ms());
        let stored = match self.publish(vhost, &dead) {
            Ok(stored) => stored.await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = stored {
            tracing::warn!(queue, error = %e, "dead-lettering a refused message: dropped");
        }
    }

    /// Attaches consumer `consumer` of channel `owner` (on `connection`) to `queue`:
    /// deliveries go to `sink` once the returned handle grants credit.
    #[allow(clippy::too_many_arguments)]
    pub async fn consume(
        &self,
        vhost: &str,
        queue: &str,
        consumer: u64,
        owner: u64,
        connection: u64,
        sink: Sink,
        auto_ack: bool,
        arguments: &Table,
    ) -> Result<QueueHandle, MessagingError> {
        let queue = &queue_name(vhost, queue)?;
        self.check_exclusive(queue, connection)?;
        if self.is_stream(queue)? {
            if auto_ack {
                return Err(MessagingError::PreconditionFailed(format!(
                    "stream queue {} needs consumers that acknowledge (no_ack false)",
                    Named(queue)
                )));
            }
            let start = stream::StartAt::from_arguments(arguments, now_ms())
                .map_err(MessagingError::PreconditionFailed)?;
            let group = self.group(queue)?;
            let ops = stream::spawn(
                self.node.clone(),
                group,
                queue.clone(),
                consumer,
                owner,
                sink,
                start,
            );
            return Ok(QueueHandle { group, ops });
        }
        let handle = self.queue(queue).await?;
        handle.send(Op::Subscribe {
            consumer,
            owner,
            sink,
            auto_ack,
        });
        Ok(handle)
    }

    /// Whether virtual host `vhost` exists.
    pub fn has_vhost(&self, vhost: &str) -> bool {
        self.node.metadata().borrow().has_vhost(vhost)
    }

    /// Whether `user` may log in with `password`: a stored user by its hash (checked off
    /// the async threads: it is slow on purpose), else the built-in `guest` by its
    /// well-known password. Where a user may log in from is the protocol's concern.
    pub async fn login(&self, user: &str, password: Vec<u8>) -> bool {
        let stored = self
            .node
            .metadata()
            .borrow()
            .users
            .get(user)
            .map(|u| u.password_hash.clone());
        match stored {
            Some(hash) => {
                tokio::task::spawn_blocking(move || meta::verify_password(&hash, &password))
                    .await
                    .unwrap_or(false)
            }
            None => user == meta::GUEST && password == meta::GUEST.as_bytes(),
        }
    }

    /// Whether `user` may open `vhost`.
    pub fn may_open(&self, user: &str, vhost: &str) -> bool {
        self.node.metadata().borrow().may_open(user, vhost)
    }

    /// Whether `queue` (a stored name) is a stream.
    fn is_stream(&self, queue: &str) -> Result<bool, MessagingError> {
        self.node
            .metadata()
            .borrow()
            .destination(Kind::Queue, queue)
            .map(|d| d.spec.declared.is_stream())
            .ok_or_else(|| MessagingError::QueueNotFound(queue.to_owned()))
    }

    /// Refuses what a stream does not do (`basic.get`, purge), as RabbitMQ does.
    fn not_a_stream(&self, queue: &str, what: &str) -> Result<(), MessagingError> {
        if self.is_stream(queue)? {
            return Err(MessagingError::PreconditionFailed(format!(
                "{what} is not supported by stream queue {}; consume it with x-stream-offset",
                Named(queue)
            )));
        }
        Ok(())
    }

    fn group(&self, queue: &str) -> Result<u64, MessagingError> {
        Ok(self.node.partition(Kind::Queue, queue, 0)?.group)
    }

    /// The dispatcher of `queue` (its one partition so far): started here if this node
    /// leads it, else reached through a relay to its leader.
    async fn queue(&self, queue: &str) -> Result<QueueHandle, MessagingError> {
        let group = self.group(queue)?;
        if let Some(ops) = self.running(group) {
            return Ok(QueueHandle { group, ops });
        }
        let placed = self.node.partition(Kind::Queue, queue, 0)?;
        let leader = if placed.replicas.contains(&self.node.id()) {
            self.await_leader(group).await
        } else {
            None
        };
        if leader == Some(self.node.id()) {
            return self.local(group).await;
        }
        let mut relays = lock(&self.relays);
        relays.retain(|_, ops| dispatch::running(ops));
        let ops = relays
            .entry(group)
            .or_insert_with(|| relay::Relay::spawn(self.node.clone(), group, queue.to_owned()))
            .clone();
        Ok(QueueHandle { group, ops })
    }

    /// The dispatcher of partition `group`, which this node must lead; started if need be.
    pub(crate) async fn local(&self, group: u64) -> Result<QueueHandle, MessagingError> {
        let rules = {
            let view = self.node.metadata();
            let view = view.borrow();
            let found = view.destinations.get(&Kind::Queue).and_then(|queues| {
                queues
                    .values()
                    .find(|d| d.partitions.iter().any(|p| p.group == group))
            });
            match found {
                Some(d) => QueueRules {
                    name: d.spec.name.clone(),
                    auto_delete: d.spec.declared.auto_delete,
                    // Checked when declared; a queue created otherwise has none.
                    policy: Policy::from_arguments(&d.spec.name, &d.spec.declared.arguments)
                        .unwrap_or_default(),
                },
                None => return Err(MessagingError::QueueNotFound(format!("(group {group})"))),
            }
        };
        let queue = rules.name.clone();
        let leader = self.await_leader(group).await;
        if leader != Some(self.node.id()) || !dispatch::caught_up(&self.node, group).await {
            return Err(MessagingError::NotLeader { queue, leader });
        }
        let mut dispatchers = lock(&self.dispatchers);
        // Stopped dispatchers (leadership moved, queue deleted) are forgotten here.
        dispatchers.retain(|_, ops| dispatch::running(ops));
        if let Some(ops) = dispatchers.get(&group) {
            return Ok(QueueHandle {
                group,
                ops: ops.clone(),
            });
        }
        let settled = self.node.settled(group).unwrap_or_default();
        let ops = Dispatcher::spawn(self.node.clone(), self.me.clone(), group, rules, settled);
        dispatchers.insert(group, ops.clone());
        Ok(QueueHandle { group, ops })
    }

    /// The dispatcher of `group` here, which lost its leadership, goes on as a relay on
    /// the same channel `ops`: new consumers here use it too.
    pub(crate) fn became_relay(&self, group: u64, ops: mpsc::UnboundedSender<Op>) {
        {
            let mut dispatchers = lock(&self.dispatchers);
            if dispatchers
                .get(&group)
                .is_some_and(|d| d.same_channel(&ops))
            {
                dispatchers.remove(&group);
            }
        }
        let mut relays = lock(&self.relays);
        if relays.get(&group).is_none_or(|r| !dispatch::running(r)) {
            relays.insert(group, ops);
        }
    }

    /// The running dispatcher of `group` here, else its running relay.
    fn running(&self, group: u64) -> Option<mpsc::UnboundedSender<Op>> {
        [&self.dispatchers, &self.relays]
            .into_iter()
            .find_map(|map| {
                lock(map)
                    .get(&group)
                    .filter(|ops| dispatch::running(ops))
                    .cloned()
            })
    }

    /// The leader of `group` once one is known here (a new queue elects one first);
    /// `None` in time means none, or that this node holds no replica.
    async fn await_leader(&self, group: u64) -> Option<NodeId> {
        let deadline = Instant::now() + LEADER_TIMEOUT;
        loop {
            if let Some(leader) = self.node.leader(group) {
                return Some(leader);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.node.group(group) {
                Some(raft) => {
                    let _ = raft
                        .wait(Some(left))
                        .metrics(|m| m.current_leader.is_some(), "a leader")
                        .await;
                }
                // A queue just created: its group starts here in a moment.
                None => tokio::time::sleep(GROUP_START_POLL.min(left)).await,
            }
        }
    }
}

/// Starts the dispatchers of the queues this node leads whose rules apply without a
/// consumer (a TTL, a length limit), so that they apply from the start; until the
/// messaging is dropped.
async fn watch_queues(messaging: Weak<Messaging>) {
    let Some(mut view) = messaging.upgrade().map(|m| m.node.metadata()) else {
        return;
    };
    let mut tick = tokio::time::interval(WATCH_QUEUES);
    // The partitions of queues whose rules apply without consumers: their arguments
    // change only with the metadata, so they are read again only then.
    let mut watched: Vec<u64> = Vec::new();
    let mut read = false;
    loop {
        tick.tick().await;
        let Some(messaging) = messaging.upgrade() else {
            return;
        };
        if !read || view.has_changed().unwrap_or(false) {
            read = true;
            let view = view.borrow_and_update();
            watched = view
                .destinations
                .get(&Kind::Queue)
                .into_iter()
                .flat_map(|queues| queues.values())
                .filter(|d| {
                    Policy::from_arguments(&d.spec.name, &d.spec.declared.arguments)
                        .is_ok_and(|p| p.watches())
                })
                .flat_map(|d| d.partitions.iter().map(|p| p.group))
                .collect();
        }
        let me = messaging.node.id();
        for group in &watched {
            if messaging.node.leader(*group) == Some(me)
                && lock(&messaging.dispatchers)
                    .get(group)
                    .is_none_or(|ops| !dispatch::running(ops))
            {
                let _ = messaging.local(*group).await;
            }
        }
    }
}

/// The stored name of queue `name` in `vhost`.
fn queue_name(vhost: &str, name: &str) -> Result<String, MessagingError> {
    scoped(vhost, name)
        .map(Cow::into_owned)
        .ok_or_else(|| MessagingError::QueueNotFound(name.to_owned()))
}

/// The stored name of exchange `name` in `vhost` (`""`, the default exchange, too),
/// borrowed in the default vhost (as every publish names one).
fn exchange_name<'a>(vhost: &str, name: &'a str) -> Result<Cow<'a, str>, MessagingError> {
    scoped(vhost, name).ok_or_else(|| MessagingError::ExchangeNotFound(name.to_owned()))
}

/// A redeclaration must match the declaration, as RabbitMQ requires.
fn equivalent(name: &str, current: &Declared, asked: &Declared) -> Result<(), MessagingError> {
    let differs = |what: &str, received: String, current: String| {
        Err(MessagingError::PreconditionFailed(format!(
            "inequivalent arg '{what}' for queue {}: received '{received}' but current is '{current}'",
            Named(name)
        )))
    };
    if current.durable != asked.durable {
        return differs(
            "durable",
            asked.durable.to_string(),
            current.durable.to_string(),
        );
    }
    if current.exclusive != asked.exclusive {
        return differs(
            "exclusive",
            asked.exclusive.to_string(),
            current.exclusive.to_string(),
        );
    }
    if current.auto_delete != asked.auto_delete {
        return differs(
            "auto_delete",
            asked.auto_delete.to_string(),
            current.auto_delete.to_string(),
        );
    }
    let keys: std::collections::BTreeSet<&String> = current
        .arguments
        .keys()
        .chain(asked.arguments.keys())
        .collect();
    for key in keys {
        let (a, c) = (asked.arguments.get(key), current.arguments.get(key));
        if !alike(a, c) {
            let show = |v: Option<&serde_json::Value>| match v {
                None => "none".to_owned(),
                Some(v) => policy::integer(v)
                    .map(|n| n.to_string())
                    .or_else(|| meta::argument_text(v))
                    .unwrap_or_else(|| v.to_string()),
            };
            return differs(key, show(a), show(c));
        }
    }
    Ok(())
}

/// Whether two argument values are the same: integers whatever their width, and text
/// whether short or long (a queue made through the admin API holds 64-bit integers and
/// short strings; clients send what their language has), as in RabbitMQ.
fn alike(a: Option<&serde_json::Value>, b: Option<&serde_json::Value>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) if a != b => {
            let integers = policy::integer(a).zip(policy::integer(b));
            let texts = meta::argument_text(a).zip(meta::argument_text(b));
            integers.is_some_and(|(a, b)| a == b) || texts.is_some_and(|(a, b)| a == b)
        }
        (a, b) => a == b,
    }
}

/// A neutral table as stored arguments.
fn arguments(table: &Table) -> Arguments {
    table
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), serde_json::to_value(v).ok()?)))
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
