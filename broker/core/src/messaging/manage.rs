//! What an administrator does to queues, with no connection of its own (the admin API,
//! and so the operator): create a queue with its partitions and replication chosen,
//! read its counts, bind it and list its bindings. The same rules apply as to a client's
//! `queue.declare` and `queue.bind`.

use super::policy::integer;
use tokio::sync::oneshot;

use super::{
    Messaging, MessagingError, Op, Policy, STATS_TIMEOUT, Stats, Table, Value, dispatch, lock,
};
use crate::meta::{self, Command, Kind, Outcome, Spec, Target, unscoped};

/// A queue's arguments as typed fields, for those who do not speak AMQP field tables;
/// stored as the `x-…` arguments a client would declare.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueArguments {
    /// `x-message-ttl`, in milliseconds.
    pub message_ttl_ms: Option<u64>,
    /// `x-max-length`.
    pub max_length: Option<u64>,
    /// `x-max-length-bytes`.
    pub max_length_bytes: Option<u64>,
    /// `x-overflow`: `drop-head`, `reject-publish` or `reject-publish-dlx`.
    pub overflow: Option<String>,
    /// `x-dead-letter-exchange`.
    pub dead_letter_exchange: Option<String>,
    /// `x-dead-letter-routing-key`.
    pub dead_letter_routing_key: Option<String>,
    /// `x-delivery-limit`.
    pub delivery_limit: Option<u64>,
}

const TTL: &str = "x-message-ttl";
const MAX_LENGTH: &str = "x-max-length";
const MAX_LENGTH_BYTES: &str = "x-max-length-bytes";
const OVERFLOW: &str = "x-overflow";
const DLX: &str = "x-dead-letter-exchange";
const DLX_KEY: &str = "x-dead-letter-routing-key";
const DELIVERY_LIMIT: &str = "x-delivery-limit";

impl QueueArguments {
    /// The arguments as stored: 64-bit integers and short strings.
    pub fn to_arguments(&self) -> meta::Arguments {
        let mut stored = meta::Arguments::new();
        let mut put = |key: &str, value: Option<Value>| {
            if let Some(json) = value.and_then(|v| serde_json::to_value(v).ok()) {
                stored.insert(key.to_owned(), json);
            }
        };
        let integer = |n: Option<u64>| n.map(|n| Value::I64(i64::try_from(n).unwrap_or(i64::MAX)));
        let short = |s: &Option<String>| s.clone().map(Value::Short);
        put(TTL, integer(self.message_ttl_ms));
        put(MAX_LENGTH, integer(self.max_length));
        put(MAX_LENGTH_BYTES, integer(self.max_length_bytes));
        put(OVERFLOW, short(&self.overflow));
        put(DLX, short(&self.dead_letter_exchange));
        put(DLX_KEY, short(&self.dead_letter_routing_key));
        put(DELIVERY_LIMIT, integer(self.delivery_limit));
        stored
    }

    /// The typed fields of stored `arguments` (however a client declared them); other
    /// arguments are left out.
    pub fn from_arguments(arguments: &meta::Arguments) -> Self {
        let integer = |key: &str| {
            arguments
                .get(key)
                .and_then(integer)
                .and_then(|n| u64::try_from(n).ok())
        };
        let text = |key: &str| arguments.get(key).and_then(meta::argument_text);
        QueueArguments {
            message_ttl_ms: integer(TTL),
            max_length: integer(MAX_LENGTH),
            max_length_bytes: integer(MAX_LENGTH_BYTES),
            overflow: text(OVERFLOW),
            dead_letter_exchange: text(DLX),
            dead_letter_routing_key: text(DLX_KEY),
            delivery_limit: integer(DELIVERY_LIMIT),
        }
    }
}

/// The counts of a queue whose partition this node leads, by its name in its vhost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedQueue {
    /// Its vhost.
    pub vhost: String,
    /// Its name as clients see it (without the vhost).
    pub name: String,
    /// Its counts.
    pub stats: Stats,
}

/// A queue bound to an exchange, by their names in their vhost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueBinding {
    /// The vhost of both.
    pub vhost: String,
    /// The source exchange.
    pub exchange: String,
    /// The bound queue.
    pub queue: String,
    /// The key (direct), pattern (topic) or nothing (fanout, headers).
    pub routing_key: String,
}

impl Messaging {
    /// Creates the queue `spec` asks for (its name stored, with its vhost): its arguments
    /// are checked as `queue.declare` checks them, and its length limits hold before
    /// this returns.
    pub async fn create_queue(&self, mut spec: Spec) -> Result<meta::Destination, MessagingError> {
        let policy = Policy::from_arguments(&spec.name, &spec.declared.arguments)
            .map_err(MessagingError::PreconditionFailed)?;
        if policy.stream && spec.retention == meta::Retention::default() {
            spec.retention = policy.retention;
        }
        let name = spec.name.clone();
        let created = match self.node.command(&Command::Create(spec)).await? {
            Outcome::Destination(d) => d,
            _ => return Err(MessagingError::QueueNotFound(name)),
        };
        if let Some(limits) = policy.limits() {
            self.set_limits(&name, limits).await?;
        }
        Ok(created)
    }

    /// The counts of queue `stored` (a stored name), from its dispatcher (reached through
    /// a relay if it runs elsewhere), else from this node's replica.
    pub async fn queue_stats(&self, stored: &str) -> Result<Stats, MessagingError> {
        if !self.is_stream(stored)?
            && let Ok(handle) = self.queue(stored).await
            && let Ok(Some(stats)) =
                tokio::time::timeout(STATS_TIMEOUT, handle.ask(Op::Stats)).await
        {
            return Ok(stats);
        }
        self.stats(stored).await
    }

    /// The counts of every queue whose partition (the one consumers read) this node
    /// leads: from its dispatcher where one runs here, else from this node's replica
    /// (everything unsettled counted ready). The dispatchers are asked all at once, and
    /// one that does not answer within `timeout` is counted from the replica.
    pub async fn led_queues(&self, timeout: std::time::Duration) -> Vec<LedQueue> {
        let me = self.node.id();
        let led: Vec<(String, u64)> = {
            let view = self.node.metadata();
            let view = view.borrow();
            view.destinations
                .get(&Kind::Queue)
                .into_iter()
                .flat_map(|queues| queues.values())
                .filter_map(|d| Some((d.spec.name.clone(), d.partitions.first()?.group)))
                .filter(|(_, group)| self.node.leader(*group) == Some(me))
                .collect()
        };
        let asked: Vec<_> = led
            .into_iter()
            .map(|(name, group)| {
                let ops = lock(&self.dispatchers)
                    .get(&group)
                    .filter(|ops| dispatch::running(ops))
                    .cloned();
                let answer = ops.map(|ops| {
                    let (reply, answer) = oneshot::channel();
                    let _ = ops.send(Op::Stats(reply));
                    answer
                });
                (name, group, answer)
            })
            .collect();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut queues = Vec::with_capacity(asked.len());
        for (stored, group, answer) in asked {
            let answered = match answer {
                Some(answer) => tokio::time::timeout_at(deadline, answer)
                    .await
                    .ok()
                    .and_then(Result::ok),
                None => None,
            };
            let stats = answered.unwrap_or_else(|| self.replica_stats(group));
            let (vhost, name) = unscoped(&stored);
            queues.push(LedQueue {
                vhost: vhost.to_owned(),
                name: name.to_owned(),
                stats,
            });
        }
        queues
    }

    /// Binds `queue` to `exchange` in `vhost` with `routing_key`, or unbinds it; an
    /// exclusive queue is refused (it belongs to its connection).
    pub async fn bind_queue(
        &self,
        vhost: &str,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        bind: bool,
    ) -> Result<(), MessagingError> {
        // A fresh connection id owns no exclusive queue.
        let connection = self.next_id();
        self.bind(
            vhost,
            queue,
            exchange,
            routing_key,
            &Table::new(),
            bind,
            connection,
        )
        .await
    }

    /// The bindings of queues to exchanges in `vhost`, of `queue` only if given.
    pub fn queue_bindings(&self, vhost: &str, queue: Option<&str>) -> Vec<QueueBinding> {
        let view = self.node.metadata();
        let view = view.borrow();
        view.exchanges
            .all_bindings()
            .filter(|b| b.target == Target::Queue)
            .filter_map(|b| {
                let (in_vhost, local) = unscoped(&b.destination);
                let wanted = in_vhost == vhost && queue.is_none_or(|q| q == local);
                wanted.then(|| QueueBinding {
                    vhost: vhost.to_owned(),
                    exchange: unscoped(&b.exchange).1.to_owned(),
                    queue: local.to_owned(),
                    routing_key: b.routing_key.clone(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_arguments_are_stored_as_a_client_declares_them_and_read_back() {
        let typed = QueueArguments {
            message_ttl_ms: Some(30_000),
            max_length: Some(10),
            overflow: Some("reject-publish".into()),
            dead_letter_exchange: Some("dlx".into()),
            delivery_limit: Some(5),
            ..QueueArguments::default()
        };
        let stored = typed.to_arguments();
        assert_eq!(stored.len(), 5);
        assert_eq!(stored[TTL], serde_json::json!({"i64": 30_000}));
        assert_eq!(QueueArguments::from_arguments(&stored), typed);
        let policy = Policy::from_arguments("q", &stored).unwrap();
        assert_eq!(policy.message_ttl, Some(30_000));
        assert_eq!(policy.max_length, Some(10));
    }

    #[test]
    fn arguments_a_client_declared_in_other_types_read_back_typed() {
        let stored: meta::Arguments = [
            (TTL.to_owned(), serde_json::json!({"u16": 500})),
            (
                DLX.to_owned(),
                serde_json::json!({"long": b"dead".to_vec()}),
            ),
            (
                "x-queue-mode".to_owned(),
                serde_json::json!({"short": "lazy"}),
            ),
        ]
        .into();
        let typed = QueueArguments::from_arguments(&stored);
        assert_eq!(typed.message_ttl_ms, Some(500));
        assert_eq!(typed.dead_letter_exchange.as_deref(), Some("dead"));
        assert_eq!(typed.max_length, None);
    }
}
