//! AMQP properties and field tables to the core's neutral form, and back.

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, DecimalValue, FieldArray, FieldTable, ShortString};
use petrel_core::messaging::{Properties, Table, Value};

/// The neutral form of a message's AMQP properties.
pub fn properties(p: &BasicProperties) -> Properties {
    let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_owned());
    Properties {
        content_type: text(p.content_type()),
        content_encoding: text(p.content_encoding()),
        headers: p.headers().as_ref().map(table),
        delivery_mode: *p.delivery_mode(),
        priority: *p.priority(),
        correlation_id: text(p.correlation_id()),
        reply_to: text(p.reply_to()),
        expiration: text(p.expiration()),
        message_id: text(p.message_id()),
        timestamp: *p.timestamp(),
        kind: text(p.kind()),
        user_id: text(p.user_id()),
        app_id: text(p.app_id()),
        cluster_id: text(p.cluster_id()),
    }
}

/// The AMQP properties of a neutral message.
pub fn basic_properties(p: &Properties) -> BasicProperties {
    let mut out = BasicProperties::default();
    let short = |s: &String| ShortString::from(s.as_str());
    if let Some(v) = &p.content_type {
        out = out.with_content_type(short(v));
    }
    if let Some(v) = &p.content_encoding {
        out = out.with_content_encoding(short(v));
    }
    if let Some(v) = &p.headers {
        out = out.with_headers(field_table(v));
    }
    if let Some(v) = p.delivery_mode {
        out = out.with_delivery_mode(v);
    }
    if let Some(v) = p.priority {
        out = out.with_priority(v);
    }
    if let Some(v) = &p.correlation_id {
        out = out.with_correlation_id(short(v));
    }
    if let Some(v) = &p.reply_to {
        out = out.with_reply_to(short(v));
    }
    if let Some(v) = &p.expiration {
        out = out.with_expiration(short(v));
    }
    if let Some(v) = &p.message_id {
        out = out.with_message_id(short(v));
    }
    if let Some(v) = p.timestamp {
        out = out.with_timestamp(v);
    }
    if let Some(v) = &p.kind {
        out = out.with_type(short(v));
    }
    if let Some(v) = &p.user_id {
        out = out.with_user_id(short(v));
    }
    if let Some(v) = &p.app_id {
        out = out.with_app_id(short(v));
    }
    if let Some(v) = &p.cluster_id {
        out = out.with_cluster_id(short(v));
    }
    out
}

/// A field table in neutral form.
pub fn table(t: &FieldTable) -> Table {
    t.inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), value(v)))
        .collect()
}

fn value(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::I8(*n),
        AMQPValue::ShortShortUInt(n) => Value::U8(*n),
        AMQPValue::ShortInt(n) => Value::I16(*n),
        AMQPValue::ShortUInt(n) => Value::U16(*n),
        AMQPValue::LongInt(n) => Value::I32(*n),
        AMQPValue::LongUInt(n) => Value::U32(*n),
        AMQPValue::LongLongInt(n) => Value::I64(*n),
        AMQPValue::Float(n) => Value::F32(*n),
        AMQPValue::Double(n) => Value::F64(*n),
        AMQPValue::DecimalValue(d) => Value::Decimal {
            scale: d.scale,
            value: d.value,
        },
        AMQPValue::ShortString(s) => Value::Short(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Value::Long(s.as_bytes().to_vec()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value).collect()),
        AMQPValue::Timestamp(t) => Value::Timestamp(*t),
        AMQPValue::FieldTable(t) => Value::Table(table(t)),
        AMQPValue::ByteArray(b) => Value::Bytes(b.as_slice().to_vec()),
        AMQPValue::Void => Value::Void,
    }
}

/// A neutral table as an AMQP field table.
pub fn field_table(t: &Table) -> FieldTable {
    let mut out = FieldTable::default();
    for (k, v) in t {
        out.insert(ShortString::from(k.as_str()), amqp_value(v));
    }
    out
}

fn amqp_value(v: &Value) -> AMQPValue {
    match v {
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::I8(n) => AMQPValue::ShortShortInt(*n),
        Value::U8(n) => AMQPValue::ShortShortUInt(*n),
        Value::I16(n) => AMQPValue::ShortInt(*n),
        Value::U16(n) => AMQPValue::ShortUInt(*n),
        Value::I32(n) => AMQPValue::LongInt(*n),
        Value::U32(n) => AMQPValue::LongUInt(*n),
        Value::I64(n) => AMQPValue::LongLongInt(*n),
        Value::F32(n) => AMQPValue::Float(*n),
        Value::F64(n) => AMQPValue::Double(*n),
        Value::Decimal { scale, value } => AMQPValue::DecimalValue(DecimalValue {
            scale: *scale,
            value: *value,
        }),
        Value::Short(s) => AMQPValue::ShortString(ShortString::from(s.as_str())),
        Value::Long(s) => AMQPValue::LongString(s.clone().into()),
        Value::Array(a) => AMQPValue::FieldArray(FieldArray::from(
            a.iter().map(amqp_value).collect::<Vec<_>>(),
        )),
        Value::Timestamp(t) => AMQPValue::Timestamp(*t),
        Value::Table(t) => AMQPValue::FieldTable(field_table(t)),
        Value::Bytes(b) => AMQPValue::ByteArray(b.clone().into()),
        Value::Void => AMQPValue::Void,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_and_every_kind_of_header_round_trip() {
        let mut headers = FieldTable::default();
        headers.insert("b".into(), AMQPValue::Boolean(true));
        headers.insert("i".into(), AMQPValue::LongInt(-3));
        headers.insert("l".into(), AMQPValue::LongLongInt(1 << 40));
        headers.insert("s".into(), AMQPValue::LongString("x".into()));
        headers.insert(
            "d".into(),
            AMQPValue::DecimalValue(DecimalValue { scale: 1, value: 5 }),
        );
        headers.insert(
            "a".into(),
            AMQPValue::FieldArray(vec![AMQPValue::Double(0.5), AMQPValue::Void].into()),
        );
        let p = BasicProperties::default()
            .with_content_type("text/plain".into())
            .with_delivery_mode(2)
            .with_correlation_id("c1".into())
            .with_reply_to("amq.gen-x".into())
            .with_timestamp(17)
            .with_headers(headers);
        assert_eq!(basic_properties(&properties(&p)), p);
    }
}
