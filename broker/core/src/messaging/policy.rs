//! A queue's arguments (`x-…`, as RabbitMQ names them) as the rules its dispatcher
//! applies: message TTL, length limit, dead-lettering, delivery limit. Checked when the
//! queue is declared, so a queue never holds arguments it cannot apply.

use super::cursor::Limits;
use super::message::{Message, Table, Value};
use crate::meta::{Arguments, Named, Retention, argument_text as text};

/// Where dead-lettered messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeadLetter {
    pub exchange: String,
    /// The routing key they get; their own if `None`.
    pub routing_key: Option<String>,
}

/// What a queue at its length limit does with one more message (`x-overflow`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Overflow {
    /// The oldest ready messages are dropped (or dead-lettered): RabbitMQ's default.
    #[default]
    DropHead,
    /// The new one is refused: its publisher gets a `basic.nack`.
    RejectPublish,
    /// Refused, and dead-lettered.
    RejectPublishDlx,
}

/// The rules of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Policy {
    /// Milliseconds a message may wait in the queue.
    pub message_ttl: Option<u64>,
    /// Messages kept at most (`x-max-length`): ready ones with `drop-head`, unsettled
    /// ones with `reject-publish`.
    pub max_length: Option<u64>,
    /// Body bytes kept at most (`x-max-length-bytes`), counted like `max_length`.
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    pub dead_letter: Option<DeadLetter>,
    /// Milliseconds a delivery may stay unacknowledged before its channel is closed and
    /// what it holds is delivered again (`x-consumer-timeout`; RabbitMQ's default, 30
    /// minutes, without it).
    pub consumer_timeout: u64,
    /// Milliseconds the queue may go unused (no consumer, no basic.get, no redeclare)
    /// before it is deleted (`x-expires`).
    pub expires: Option<u64>,
    /// Times a message may be returned (nacked, rejected with requeue, or left unacked by
    /// a closing channel) before it is dead-lettered.
    pub delivery_limit: Option<u64>,
    /// A stream (`x-queue-type: stream`): kept by `retention`, read from an offset.
    pub stream: bool,
    /// What a stream keeps (`x-max-age`, `x-max-length-bytes`).
    pub retention: Retention,
}

/// RabbitMQ's default consumer timeout: 30 minutes.
pub(crate) const CONSUMER_TIMEOUT_MS: u64 = 30 * 60 * 1000;

impl Default for Policy {
    fn default() -> Self {
        Policy {
            message_ttl: None,
            max_length: None,
            max_length_bytes: None,
            overflow: Overflow::DropHead,
            dead_letter: None,
            consumer_timeout: CONSUMER_TIMEOUT_MS,
            expires: None,
            delivery_limit: None,
            stream: false,
            retention: Retention::default(),
        }
    }
}

impl Policy {
    /// The rules `arguments` ask for, or why they are invalid (as RabbitMQ words it).
    pub(crate) fn from_arguments(queue: &str, arguments: &Arguments) -> Result<Policy, String> {
        let invalid =
            |key: &str, why: &str| format!("invalid arg '{key}' for queue {}: {why}", Named(queue));
        let count = |key: &str| -> Result<Option<u64>, String> {
            match arguments.get(key) {
                None => Ok(None),
                Some(v) => match integer(v) {
                    Some(n) if n >= 0 => Ok(Some(n.unsigned_abs())),
                    Some(n) => Err(invalid(key, &format!("{{value_negative,{n}}}"))),
                    None => Err(invalid(key, &format!("{{unacceptable_type,{v}}}"))),
                },
            }
        };
        let string = |key: &str| -> Result<Option<String>, String> {
            match arguments.get(key) {
                None => Ok(None),
                Some(v) => text(v)
                    .map(Some)
                    .ok_or_else(|| invalid(key, &format!("{{unacceptable_type,{v}}}"))),
            }
        };
        let stream = match string("x-queue-type")?.as_deref() {
            None | Some("classic" | "quorum") => false,
            Some("stream") => true,
            Some(other) => {
                return Err(invalid(
                    "x-queue-type",
                    &format!("{other:?} is not supported (classic, quorum and stream are)"),
                ));
            }
        };
        if stream {
            return Self::stream(arguments, &invalid, &count, &string);
        }
        let overflow = match string("x-overflow")?.as_deref() {
            None | Some("drop-head") => Overflow::DropHead,
            Some("reject-publish") => Overflow::RejectPublish,
            Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
            Some(other) => {
                return Err(invalid(
                    "x-overflow",
                    &format!(
                        "{{unacceptable_value,<<\"{other}\">>}} (drop-head, reject-publish \
                         and reject-publish-dlx are)"
                    ),
                ));
            }
        };
        let dead_letter = string("x-dead-letter-exchange")?.map(|exchange| DeadLetter {
            exchange,
            routing_key: None,
        });
        let routing_key = string("x-dead-letter-routing-key")?;
        let dead_letter = match (dead_letter, routing_key) {
            (Some(d), routing_key) => Some(DeadLetter { routing_key, ..d }),
            (None, Some(_)) => {
                return Err(invalid(
                    "x-dead-letter-routing-key",
                    "x-dead-letter-exchange is not set",
                ));
            }
            (None, None) => None,
        };
        Ok(Policy {
            message_ttl: count("x-message-ttl")?,
            max_length: count("x-max-length")?,
            max_length_bytes: count("x-max-length-bytes")?,
            overflow,
            dead_letter,
            delivery_limit: count("x-delivery-limit")?,
            consumer_timeout: count("x-consumer-timeout")?.unwrap_or(CONSUMER_TIMEOUT_MS),
            expires: match count("x-expires")? {
                Some(0) => return Err(invalid("x-expires", "{value_zero,0}")),
                other => other,
            },
            stream: false,
            retention: Retention::default(),
        })
    }

    /// The rules of a stream: what it keeps; the arguments of queues whose messages go
    /// once consumed make no sense for it, and are refused.
    fn stream(
        arguments: &Arguments,
        invalid: &dyn Fn(&str, &str) -> String,
        count: &dyn Fn(&str) -> Result<Option<u64>, String>,
        string: &dyn Fn(&str) -> Result<Option<String>, String>,
    ) -> Result<Policy, String> {
        for key in [
            "x-message-ttl",
            "x-max-length",
            "x-overflow",
            "x-dead-letter-exchange",
            "x-dead-letter-routing-key",
            "x-delivery-limit",
            "x-expires",
        ] {
            if arguments.contains_key(key) {
                return Err(invalid(key, "not supported by stream queues"));
            }
        }
        let max_age = match string("x-max-age")? {
            None => None,
            Some(age) => Some(age_ms(&age).ok_or_else(|| {
                invalid(
                    "x-max-age",
                    &format!("{age:?} is not an age such as 7D, 12h, 30m or 10s"),
                )
            })?),
        };
        Ok(Policy {
            stream: true,
            retention: Retention {
                ms: max_age,
                bytes: count("x-max-length-bytes")?,
            },
            ..Policy::default()
        })
    }

    /// Whether the dispatcher must watch the queue even without consumers: its TTL,
    /// length limit and expiry apply as time passes and messages arrive, and a queue that
    /// dead-letters is how RabbitMQ users delay messages (each with its own expiration).
    pub(crate) fn watches(&self) -> bool {
        self.message_ttl.is_some()
            || self.drops_head()
            || self.dead_letter.is_some()
            || self.expires.is_some()
    }

    /// Whether the oldest messages go when the queue is over a length limit.
    pub(crate) fn drops_head(&self) -> bool {
        self.overflow == Overflow::DropHead
            && (self.max_length.is_some() || self.max_length_bytes.is_some())
    }

    /// The limits the queue's state machine counts, if any: byte counts, and any limit
    /// that refuses publishes.
    pub(crate) fn limits(&self) -> Option<Limits> {
        let reject = self.overflow != Overflow::DropHead;
        let limited = self.max_length.is_some() || self.max_length_bytes.is_some();
        (self.max_length_bytes.is_some() || (reject && limited)).then_some(Limits {
            max_length: self.max_length.filter(|_| reject),
            max_bytes: self.max_length_bytes,
            reject,
        })
    }
}

/// `message` as it is dead-lettered from `queue` for `reason` (`rejected`, `expired`,
/// `maxlen`, `delivery_limit`): to the dead-letter exchange, with RabbitMQ's `x-death`
/// history (one entry per queue and reason, counted, the latest first) and
/// `x-first-death-*` headers; an expired message loses its `expiration`.
pub(crate) fn dead_lettered(
    message: &Message,
    queue: &str,
    reason: &str,
    to: &DeadLetter,
    now_ms: i64,
) -> Message {
    let long = |s: &str| Value::Long(s.as_bytes().to_vec());
    let mut dead = message.clone();
    dead.exchange.clone_from(&to.exchange);
    if let Some(key) = &to.routing_key {
        dead.routing_key.clone_from(key);
    }
    if reason == "expired" {
        dead.properties.expiration = None;
    }
    let headers = dead.properties.headers.get_or_insert_with(Table::new);
    // Its deliveries from this queue do not count in the next one.
    headers.remove("x-delivery-count");
    let same = |entry: &Value| match entry {
        Value::Table(t) => {
            t.get("queue") == Some(&long(queue)) && t.get("reason") == Some(&long(reason))
        }
        _ => false,
    };
    let mut deaths = match headers.remove("x-death") {
        Some(Value::Array(entries)) => entries,
        _ => Vec::new(),
    };
    let count = match deaths.iter().position(same).map(|i| deaths.remove(i)) {
        Some(Value::Table(t)) => match t.get("count") {
            Some(Value::I64(n)) => n + 1,
            _ => 1,
        },
        _ => 1,
    };
    let mut entry = Table::new();
    entry.insert("count".into(), Value::I64(count));
    entry.insert("reason".into(), long(reason));
    entry.insert("queue".into(), long(queue));
    entry.insert(
        "time".into(),
        Value::Timestamp(u64::try_from(now_ms / 1000).unwrap_or(0)),
    );
    entry.insert("exchange".into(), long(&message.exchange));
    entry.insert(
        "routing-keys".into(),
        Value::Array(vec![long(&message.routing_key)]),
    );
    if let Some(expiration) = &message.properties.expiration {
        entry.insert("original-expiration".into(), long(expiration));
    }
    deaths.insert(0, Value::Table(entry));
    headers.insert("x-death".into(), Value::Array(deaths));
    for (key, value) in [
        ("x-first-death-reason", reason),
        ("x-first-death-queue", queue),
        ("x-first-death-exchange", message.exchange.as_str()),
    ] {
        headers.entry(key.into()).or_insert_with(|| long(value));
    }
    dead
}

/// Milliseconds in an age as RabbitMQ writes `x-max-age`: a number and a unit, `Y`
/// (years of 365 days), `M` (months of 30 days), `D`, `h`, `m` or `s`.
pub(crate) fn age_ms(age: &str) -> Option<u64> {
    let unit = age.chars().last()?;
    let n: u64 = age[..age.len() - unit.len_utf8()].parse().ok()?;
    let second = 1000;
    let day = 24 * 3600 * second;
    let per = match unit {
        'Y' => 365 * day,
        'M' => 30 * day,
        'D' => day,
        'h' => 3600 * second,
        'm' => 60 * second,
        's' => second,
        _ => return None,
    };
    n.checked_mul(per)
}

/// An integer argument in neutral JSON form (`{"i32": 5}` and the like).
/// An integer argument's value, whatever its width.
pub(super) fn integer(v: &serde_json::Value) -> Option<i64> {
    let (kind, inner) = v.as_object()?.iter().next()?;
    match kind.as_str() {
        "i8" | "u8" | "i16" | "u16" | "i32" | "u32" | "i64" => inner.as_i64(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn args(pairs: &[(&str, serde_json::Value)]) -> Arguments {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn rabbitmq_arguments_become_rules() {
        let policy = Policy::from_arguments(
            "q",
            &args(&[
                ("x-message-ttl", json!({"i32": 500})),
                ("x-max-length", json!({"i64": 2})),
                ("x-dead-letter-exchange", json!({"long": [100, 108, 120]})),
                ("x-dead-letter-routing-key", json!({"short": "dead"})),
                ("x-delivery-limit", json!({"u8": 3})),
                (
                    "x-queue-type",
                    json!({"long": [113, 117, 111, 114, 117, 109]}),
                ),
                ("x-unknown", json!({"bool": true})),
            ]),
        )
        .expect("valid");
        assert_eq!(policy.message_ttl, Some(500));
        assert_eq!(policy.max_length, Some(2));
        assert_eq!(policy.delivery_limit, Some(3));
        assert_eq!(
            policy.dead_letter,
            Some(DeadLetter {
                exchange: "dlx".into(),
                routing_key: Some("dead".into())
            })
        );
    }

    #[test]
    fn a_dead_lettered_message_carries_its_history() {
        let to = DeadLetter {
            exchange: "dlx".into(),
            routing_key: None,
        };
        let mut message = Message {
            exchange: "in".into(),
            routing_key: "k".into(),
            ..Message::default()
        };
        message.properties.expiration = Some("100".into());
        message.properties.headers = Some(Table::from([(
            "x-delivery-count".to_owned(),
            Value::I64(3),
        )]));
        let once = dead_lettered(&message, "q", "expired", &to, 5_000);
        assert_eq!(
            (once.exchange.as_str(), once.routing_key.as_str()),
            ("dlx", "k")
        );
        assert_eq!(once.properties.expiration, None);
        assert!(
            !once
                .properties
                .headers
                .as_ref()
                .is_some_and(|h| h.contains_key("x-delivery-count")),
            "a dead-lettered message counts its deliveries afresh"
        );
        let twice = dead_lettered(&once, "q", "expired", &to, 6_000);
        let headers = twice.properties.headers.expect("headers");
        let Some(Value::Array(deaths)) = headers.get("x-death") else {
            panic!("x-death: {headers:?}");
        };
        assert_eq!(deaths.len(), 1, "one entry per queue and reason");
        let Value::Table(entry) = &deaths[0] else {
            panic!("an entry is a table");
        };
        assert_eq!(entry.get("count"), Some(&Value::I64(2)));
        assert_eq!(
            headers.get("x-first-death-reason"),
            Some(&Value::Long(b"expired".to_vec()))
        );
    }

    #[test]
    fn invalid_arguments_are_refused_with_rabbitmqs_words() {
        let refuse = |pairs: &[(&str, serde_json::Value)]| {
            Policy::from_arguments("q", &args(pairs)).expect_err("invalid")
        };
        assert!(refuse(&[("x-message-ttl", json!({"i32": -1}))]).contains("value_negative"));
        assert!(refuse(&[("x-max-length", json!({"short": "ten"}))]).contains("unacceptable_type"));
        assert!(refuse(&[("x-overflow", json!({"short": "sideways"}))]).contains("x-overflow"));
        assert!(refuse(&[("x-queue-type", json!({"short": "lifo"}))]).contains("x-queue-type"));
        assert!(
            refuse(&[("x-dead-letter-routing-key", json!({"short": "k"}))]).contains("not set")
        );
    }

    #[test]
    fn a_stream_keeps_messages_by_age_and_size_and_refuses_queue_only_arguments() {
        let stream = ("x-queue-type", json!({"short": "stream"}));
        let policy = Policy::from_arguments(
            "s",
            &args(&[
                stream.clone(),
                ("x-max-age", json!({"short": "7D"})),
                ("x-max-length-bytes", json!({"i64": 1_000_000})),
            ]),
        )
        .expect("valid");
        assert!(policy.stream && !policy.watches() && policy.limits().is_none());
        assert_eq!(
            policy.retention,
            Retention {
                ms: Some(7 * 24 * 3600 * 1000),
                bytes: Some(1_000_000)
            }
        );
        let refused = |pair: (&str, serde_json::Value)| {
            Policy::from_arguments("s", &args(&[stream.clone(), pair])).expect_err("invalid")
        };
        assert!(refused(("x-message-ttl", json!({"i32": 5}))).contains("stream"));
        assert!(refused(("x-max-age", json!({"short": "soon"}))).contains("x-max-age"));
    }

    #[test]
    fn ages_read_as_rabbitmq_writes_them() {
        assert_eq!(age_ms("10s"), Some(10_000));
        assert_eq!(age_ms("30m"), Some(1_800_000));
        assert_eq!(age_ms("1Y"), Some(365 * 24 * 3600 * 1000));
        for bad in ["", "D", "7", "7d", "-1h", "99999999999999999999Y"] {
            assert_eq!(age_ms(bad), None, "{bad}");
        }
    }
}
