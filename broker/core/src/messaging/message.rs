//! A message in the protocol-neutral form every front-end speaks (DESIGN.md §2): the
//! body as `Bytes`, and the properties AMQP 0-9-1 defines, which MQTT and STOMP map onto.
//!
//! Stored as one log record: the routing key as the record's key, the body as its value,
//! and each property that is set as a header named as below (strings as UTF-8, numbers
//! big-endian, the application headers table as JSON).

use std::borrow::Cow;
use std::collections::BTreeMap;

use bytes::Bytes;
use petrel_log::Record;
use serde::{Deserialize, Serialize};

use crate::cluster::NewRecord;

/// A typed header value, as AMQP field tables carry them (MQTT and STOMP use strings).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Value {
    /// A boolean.
    Bool(bool),
    /// Signed 8-bit.
    I8(i8),
    /// Unsigned 8-bit.
    U8(u8),
    /// Signed 16-bit.
    I16(i16),
    /// Unsigned 16-bit.
    U16(u16),
    /// Signed 32-bit.
    I32(i32),
    /// Unsigned 32-bit.
    U32(u32),
    /// Signed 64-bit.
    I64(i64),
    /// 32-bit float.
    F32(f32),
    /// 64-bit float.
    F64(f64),
    /// A decimal: `value / 10^scale`.
    Decimal {
        /// Digits after the point.
        scale: u8,
        /// The unscaled value.
        value: u32,
    },
    /// A short string (AMQP: at most 255 bytes).
    Short(String),
    /// A long string, which may hold any bytes.
    Long(Vec<u8>),
    /// Seconds since the Unix epoch.
    Timestamp(u64),
    /// A list.
    Array(Vec<Value>),
    /// A nested table.
    Table(Table),
    /// Raw bytes.
    Bytes(Vec<u8>),
    /// No value.
    Void,
}

/// Application headers.
pub type Table = BTreeMap<String, Value>;

/// A message's properties; `None` is unset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Properties {
    /// MIME type of the body.
    pub content_type: Option<String>,
    /// Encoding of the body (e.g. gzip).
    pub content_encoding: Option<String>,
    /// Application headers.
    pub headers: Option<Table>,
    /// 1 transient, 2 persistent.
    pub delivery_mode: Option<u8>,
    /// 0 to 9.
    pub priority: Option<u8>,
    /// Correlates a reply with its request.
    pub correlation_id: Option<String>,
    /// Where replies go.
    pub reply_to: Option<String>,
    /// Time to live in milliseconds, as a string (AMQP's `expiration`).
    pub expiration: Option<String>,
    /// Application message id.
    pub message_id: Option<String>,
    /// Seconds since the Unix epoch.
    pub timestamp: Option<u64>,
    /// Application message type.
    pub kind: Option<String>,
    /// Publishing user, as the client claims it.
    pub user_id: Option<String>,
    /// Publishing application.
    pub app_id: Option<String>,
    /// Deprecated cluster id (AMQP), carried as is.
    pub cluster_id: Option<String>,
}

/// A message as published and delivered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    /// The exchange it was published to (`""` the default exchange).
    pub exchange: String,
    /// Its routing key (MQTT: the topic; STOMP: the destination's key).
    pub routing_key: String,
    /// Its properties.
    pub properties: Properties,
    /// The payload, never copied between the socket buffers and the log.
    pub body: Bytes,
    /// When it was stored, in milliseconds since the Unix epoch (its record's timestamp);
    /// 0 before.
    pub published_ms: i64,
}

const EXCHANGE: &[u8] = b"exchange";
const CONTENT_TYPE: &[u8] = b"content-type";
const CONTENT_ENCODING: &[u8] = b"content-encoding";
const HEADERS: &[u8] = b"headers";
const DELIVERY_MODE: &[u8] = b"delivery-mode";
const PRIORITY: &[u8] = b"priority";
const CORRELATION_ID: &[u8] = b"correlation-id";
const REPLY_TO: &[u8] = b"reply-to";
const EXPIRATION: &[u8] = b"expiration";
const MESSAGE_ID: &[u8] = b"message-id";
const TIMESTAMP: &[u8] = b"timestamp";
const TYPE: &[u8] = b"type";
const USER_ID: &[u8] = b"user-id";
const APP_ID: &[u8] = b"app-id";
const CLUSTER_ID: &[u8] = b"cluster-id";

/// A message's headers encoded for its record; borrowed by [`Encoded::record`].
pub struct Encoded<'a> {
    message: &'a Message,
    /// Strings are borrowed from the message; only numbers and the headers table are
    /// encoded into bytes of their own.
    values: Vec<(&'static [u8], Cow<'a, [u8]>)>,
}

impl<'a> Encoded<'a> {
    /// Encodes `message`'s properties.
    pub fn new(message: &'a Message) -> Self {
        let p = &message.properties;
        let mut values: Vec<(&'static [u8], Cow<'a, [u8]>)> = Vec::new();
        let mut text = |name, value: Option<&'a str>| {
            if let Some(v) = value {
                values.push((name, Cow::Borrowed(v.as_bytes())));
            }
        };
        text(
            EXCHANGE,
            Some(message.exchange.as_str()).filter(|e| !e.is_empty()),
        );
        text(CONTENT_TYPE, p.content_type.as_deref());
        text(CONTENT_ENCODING, p.content_encoding.as_deref());
        text(CORRELATION_ID, p.correlation_id.as_deref());
        text(REPLY_TO, p.reply_to.as_deref());
        text(EXPIRATION, p.expiration.as_deref());
        text(MESSAGE_ID, p.message_id.as_deref());
        text(TYPE, p.kind.as_deref());
        text(USER_ID, p.user_id.as_deref());
        text(APP_ID, p.app_id.as_deref());
        text(CLUSTER_ID, p.cluster_id.as_deref());
        if let Some(m) = p.delivery_mode {
            values.push((DELIVERY_MODE, Cow::Owned(vec![m])));
        }
        if let Some(m) = p.priority {
            values.push((PRIORITY, Cow::Owned(vec![m])));
        }
        if let Some(t) = p.timestamp {
            values.push((TIMESTAMP, Cow::Owned(t.to_be_bytes().to_vec())));
        }
        if let Some(h) = &p.headers {
            // A table of plain values always serializes.
            if let Ok(json) = serde_json::to_vec(h) {
                values.push((HEADERS, Cow::Owned(json)));
            }
        }
        Self { message, values }
    }

    /// The record to append, stamped `timestamp` (ms since the epoch); `headers` is
    /// scratch space it borrows.
    pub fn record<'b>(
        &'b self,
        timestamp: i64,
        headers: &'b mut Vec<(&'b [u8], &'b [u8])>,
    ) -> NewRecord<'b> {
        headers.extend(self.values.iter().map(|(k, v)| (*k, v.as_ref())));
        NewRecord {
            timestamp,
            key: Some(self.message.routing_key.as_bytes()),
            value: &self.message.body,
            headers,
        }
    }
}

impl Properties {
    /// The per-message time to live (`expiration`, milliseconds as a string), if set;
    /// `Err` if it is no such number.
    pub fn ttl_ms(&self) -> Result<Option<u64>, String> {
        match &self.expiration {
            None => Ok(None),
            Some(text) => text
                .parse::<u64>()
                .map(Some)
                .map_err(|_| format!("invalid expiration '{text}' for message")),
        }
    }
}

impl Message {
    /// The message as a one-record batch, to send between nodes.
    pub fn to_batch(&self) -> Result<bytes::Bytes, petrel_log::BatchError> {
        let encoded = Encoded::new(self);
        let mut scratch = Vec::new();
        let r = encoded.record(self.published_ms, &mut scratch);
        let mut b = petrel_log::BatchBuilder::new();
        b.push(r.timestamp, r.key, r.value, r.headers);
        Ok(b.build(0, 0, 0)?.as_bytes().clone())
    }

    /// The message of a batch made by [`Message::to_batch`].
    pub fn from_batch(bytes: bytes::Bytes) -> Result<Message, petrel_log::BatchError> {
        let batch = petrel_log::RecordBatch::from_bytes(bytes)?;
        let record =
            batch
                .records()?
                .into_iter()
                .next()
                .ok_or(petrel_log::BatchError::MalformedRecords(
                    "an empty message batch",
                ))?;
        Ok(Message::from_record(record))
    }

    /// The message a stored record holds; properties that do not decode are dropped.
    pub fn from_record(record: Record) -> Message {
        let mut m = Message {
            routing_key: record
                .key
                .map(|k| String::from_utf8_lossy(&k).into_owned())
                .unwrap_or_default(),
            body: record.value,
            published_ms: record.timestamp,
            ..Message::default()
        };
        let p = &mut m.properties;
        for (name, value) in record.headers {
            let text = || String::from_utf8_lossy(&value).into_owned();
            match &name[..] {
                EXCHANGE => m.exchange = text(),
                CONTENT_TYPE => p.content_type = Some(text()),
                CONTENT_ENCODING => p.content_encoding = Some(text()),
                CORRELATION_ID => p.correlation_id = Some(text()),
                REPLY_TO => p.reply_to = Some(text()),
                EXPIRATION => p.expiration = Some(text()),
                MESSAGE_ID => p.message_id = Some(text()),
                TYPE => p.kind = Some(text()),
                USER_ID => p.user_id = Some(text()),
                APP_ID => p.app_id = Some(text()),
                CLUSTER_ID => p.cluster_id = Some(text()),
                DELIVERY_MODE => p.delivery_mode = value.first().copied(),
                PRIORITY => p.priority = value.first().copied(),
                TIMESTAMP => {
                    p.timestamp = <[u8; 8]>::try_from(&value[..]).ok().map(u64::from_be_bytes)
                }
                HEADERS => p.headers = serde_json::from_slice(&value).ok(),
                _ => {}
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use petrel_log::BatchBuilder;

    use super::*;

    #[test]
    fn every_property_survives_the_trip_through_a_record() {
        let headers = Table::from([
            ("n".to_owned(), Value::I32(-5)),
            ("s".to_owned(), Value::Long(b"\xff\x00".to_vec())),
            (
                "t".to_owned(),
                Value::Table(Table::from([(
                    "d".to_owned(),
                    Value::Decimal {
                        scale: 2,
                        value: 314,
                    },
                )])),
            ),
        ]);
        let message = Message {
            exchange: "logs".into(),
            routing_key: "a.b".into(),
            properties: Properties {
                content_type: Some("text/plain".into()),
                content_encoding: Some("gzip".into()),
                headers: Some(headers),
                delivery_mode: Some(2),
                priority: Some(7),
                correlation_id: Some("c".into()),
                reply_to: Some("amq.gen-1".into()),
                expiration: Some("60000".into()),
                message_id: Some("m".into()),
                timestamp: Some(1_700_000_000),
                kind: Some("t".into()),
                user_id: Some("guest".into()),
                app_id: Some("app".into()),
                cluster_id: Some("x".into()),
            },
            body: Bytes::from_static(b"hello"),
            published_ms: 5,
        };
        let encoded = Encoded::new(&message);
        let mut scratch = Vec::new();
        let r = encoded.record(5, &mut scratch);
        let mut b = BatchBuilder::new();
        b.push(r.timestamp, r.key, r.value, r.headers);
        let batch = b.build(0, 1, 1).expect("build");
        let record = batch.records().expect("records").remove(0);
        assert_eq!(Message::from_record(record), message);
    }
}
