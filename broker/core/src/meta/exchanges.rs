//! Exchanges and bindings, AMQP 0-9-1's and shared by every protocol (DESIGN.md §1, §2):
//! kept in the metadata group, and the pure routing of a message through them.
//!
//! The default exchange `""` and the `amq.*` set always exist. The default exchange
//! routes to the queue named by the routing key; it takes no bindings.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::state::MetaError;
use super::vhosts::{Named, in_vhost, scoped, unscoped};

/// Declared arguments (`x-…`), in the neutral value form serialized as JSON, so that they
/// compare and persist exactly.
pub type Arguments = BTreeMap<String, serde_json::Value>;

/// How an exchange routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    /// To bindings whose key equals the routing key.
    Direct,
    /// To every binding.
    Fanout,
    /// To bindings whose pattern (`*` one word, `#` any words) matches the routing key.
    Topic,
    /// To bindings whose headers match the message's (`x-match` all or any).
    Headers,
}

impl ExchangeKind {
    /// The kind named `name` as AMQP names it.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "direct" => Self::Direct,
            "fanout" => Self::Fanout,
            "topic" => Self::Topic,
            "headers" => Self::Headers,
            _ => return None,
        })
    }

    /// Its AMQP name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
            Self::Headers => "headers",
        }
    }
}

/// An exchange as declared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exchange {
    /// How it routes.
    pub kind: ExchangeKind,
    /// Survives a restart (every exchange does; kept to compare redeclarations).
    pub durable: bool,
    /// Deleted when its last binding goes.
    pub auto_delete: bool,
    /// Takes no publishes from clients.
    pub internal: bool,
    /// Declared arguments.
    pub arguments: Arguments,
}

impl Exchange {
    fn builtin(kind: ExchangeKind) -> Self {
        Exchange {
            kind,
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: Arguments::new(),
        }
    }
}

/// The exchanges that always exist, and their kinds.
pub const BUILTIN: [(&str, ExchangeKind); 6] = [
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
];

/// What a binding leads to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// A queue.
    #[default]
    Queue,
    /// Another exchange, which routes the message on (RabbitMQ's exchange-to-exchange
    /// bindings).
    Exchange,
}

/// A binding from an exchange to a queue or to another exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// The source exchange.
    pub exchange: String,
    /// The destination: a queue, or an exchange.
    #[serde(alias = "queue")]
    pub destination: String,
    /// Which of them the destination is.
    #[serde(default)]
    pub target: Target,
    /// The key (direct), pattern (topic) or nothing (fanout, headers).
    pub routing_key: String,
    /// Binding arguments (headers exchanges match on them).
    pub arguments: Arguments,
}

/// The declared exchanges and every binding.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exchanges {
    declared: BTreeMap<String, Exchange>,
    /// Bindings by source exchange.
    bindings: BTreeMap<String, Vec<Binding>>,
}

fn precondition(text: String) -> MetaError {
    MetaError::PreconditionFailed(text)
}

impl Exchanges {
    /// The exchange named `name`, built in (in every vhost) or declared.
    pub fn get(&self, name: &str) -> Option<Exchange> {
        let (_, local) = unscoped(name);
        match BUILTIN.iter().find(|(n, _)| *n == local) {
            Some((_, kind)) => Some(Exchange::builtin(*kind)),
            None => self.declared.get(name).cloned(),
        }
    }

    /// How the exchange named `name` routes, if it exists (without copying it).
    fn kind(&self, name: &str) -> Option<ExchangeKind> {
        let (_, local) = unscoped(name);
        match BUILTIN.iter().find(|(n, _)| *n == local) {
            Some((_, kind)) => Some(*kind),
            None => self.declared.get(name).map(|e| e.kind),
        }
    }

    /// Declared exchanges by name (the built-in ones not included).
    pub fn declared(&self) -> &BTreeMap<String, Exchange> {
        &self.declared
    }

    /// Every binding, by source exchange.
    pub fn all_bindings(&self) -> impl Iterator<Item = &Binding> {
        self.bindings.values().flatten()
    }

    /// Bindings whose source is `exchange`.
    pub fn bindings(&self, exchange: &str) -> &[Binding] {
        self.bindings.get(exchange).map_or(&[], Vec::as_slice)
    }

    /// Declares `name`, or checks that it exists as declared.
    pub fn declare(&mut self, name: &str, exchange: Exchange) -> Result<(), MetaError> {
        match self.get(name) {
            Some(current) => {
                let differs = |what: &str, received: String, current: String| {
                    precondition(format!(
                        "inequivalent arg '{what}' for exchange {}: received '{received}' but current is '{current}'",
                        Named(name)
                    ))
                };
                if current.kind != exchange.kind {
                    return Err(differs(
                        "type",
                        exchange.kind.name().into(),
                        current.kind.name().into(),
                    ));
                }
                if current.durable != exchange.durable {
                    return Err(differs(
                        "durable",
                        exchange.durable.to_string(),
                        current.durable.to_string(),
                    ));
                }
                if current.auto_delete != exchange.auto_delete {
                    return Err(differs(
                        "auto_delete",
                        exchange.auto_delete.to_string(),
                        current.auto_delete.to_string(),
                    ));
                }
                Ok(())
            }
            None => {
                self.declared.insert(name.to_owned(), exchange);
                Ok(())
            }
        }
    }

    /// Deletes `name` and its bindings; with `if_unused`, only if it has none.
    pub fn delete(&mut self, name: &str, if_unused: bool) -> Result<(), MetaError> {
        let (_, local) = unscoped(name);
        if BUILTIN.iter().any(|(n, _)| *n == local) {
            return Err(MetaError::AccessRefused(format!(
                "operation not permitted on the built-in exchange '{local}'"
            )));
        }
        if if_unused && !self.bindings(name).is_empty() {
            return Err(precondition(format!("exchange {} in use", Named(name))));
        }
        self.declared.remove(name);
        self.bindings.remove(name);
        self.forget(Target::Exchange, name);
        Ok(())
    }

    /// Adds `binding` (once) from an existing exchange.
    pub fn bind(&mut self, binding: Binding) -> Result<(), MetaError> {
        if unscoped(&binding.exchange).1.is_empty() {
            return Err(MetaError::AccessRefused(
                "operation not permitted on the default exchange".into(),
            ));
        }
        if self.get(&binding.exchange).is_none() {
            return Err(MetaError::ExchangeNotFound(binding.exchange));
        }
        let bindings = self.bindings.entry(binding.exchange.clone()).or_default();
        if !bindings.contains(&binding) {
            bindings.push(binding);
        }
        Ok(())
    }

    /// Removes `binding`; an auto-delete exchange left without bindings goes too.
    pub fn unbind(&mut self, binding: &Binding) -> Result<(), MetaError> {
        if unscoped(&binding.exchange).1.is_empty() {
            return Err(MetaError::AccessRefused(
                "operation not permitted on the default exchange".into(),
            ));
        }
        if let Some(bindings) = self.bindings.get_mut(&binding.exchange) {
            bindings.retain(|b| b != binding);
        }
        self.collect(&binding.exchange);
        Ok(())
    }

    /// Removes every exchange of `vhost`, and their bindings (it was deleted).
    pub fn forget_vhost(&mut self, vhost: &str) {
        self.declared.retain(|name, _| !in_vhost(name, vhost));
        self.bindings.retain(|name, _| !in_vhost(name, vhost));
    }

    /// Removes every binding to `queue` (it was deleted).
    pub fn forget_queue(&mut self, queue: &str) {
        self.forget(Target::Queue, queue);
    }

    /// Removes every binding to the queue or exchange `destination` (it was deleted);
    /// an auto-delete exchange left without bindings goes too.
    fn forget(&mut self, target: Target, destination: &str) {
        let mut emptied = Vec::new();
        for (exchange, bindings) in &mut self.bindings {
            let before = bindings.len();
            bindings.retain(|b| b.target != target || b.destination != destination);
            if bindings.len() < before {
                emptied.push(exchange.clone());
            }
        }
        for exchange in emptied {
            self.collect(&exchange);
        }
    }

    /// Deletes `exchange` if it is auto-delete and has no binding left.
    fn collect(&mut self, exchange: &str) {
        if self.bindings.get(exchange).is_some_and(Vec::is_empty) {
            self.bindings.remove(exchange);
        }
        let unused = self.bindings(exchange).is_empty();
        if unused && self.declared.get(exchange).is_some_and(|e| e.auto_delete) {
            self.declared.remove(exchange);
        }
    }

    /// The queues a message published to `exchange` with `routing_key` (and `headers`,
    /// for headers exchanges) goes to, through the exchanges it is bound to as well (each
    /// once, so that bindings in a cycle end); `None` if the exchange does not exist. The
    /// default exchange's queue is the routing key, in the exchange's vhost (the caller
    /// checks that it exists).
    pub fn route(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: &dyn Fn() -> Arguments,
    ) -> Option<Vec<String>> {
        let (vhost, local) = unscoped(exchange);
        if local.is_empty() {
            return Some(
                scoped(vhost, routing_key)
                    .map(Cow::into_owned)
                    .into_iter()
                    .collect(),
            );
        }
        self.kind(exchange)?;
        let mut headers_read: Option<Arguments> = None;
        let mut matches = |kind: ExchangeKind, b: &Binding| match kind {
            ExchangeKind::Direct => b.routing_key == routing_key,
            ExchangeKind::Fanout => true,
            ExchangeKind::Topic => topic_matches(&b.routing_key, routing_key),
            ExchangeKind::Headers => {
                headers_match(&b.arguments, headers_read.get_or_insert_with(headers))
            }
        };
        let mut queues = Vec::new();
        // Exchanges reached through exchange bindings (allocated only if there are some).
        let mut through: Vec<&str> = Vec::new();
        let mut source = exchange;
        let mut at = 0;
        loop {
            if let Some(kind) = self.kind(source) {
                for b in self.bindings(source).iter().filter(|b| matches(kind, b)) {
                    match b.target {
                        Target::Queue => queues.push(b.destination.clone()),
                        Target::Exchange => {
                            let to = b.destination.as_str();
                            if to != exchange && !through.contains(&to) {
                                through.push(to);
                            }
                        }
                    }
                }
            }
            match through.get(at) {
                Some(to) => {
                    source = to;
                    at += 1;
                }
                None => break,
            }
        }
        queues.sort();
        queues.dedup();
        Some(queues)
    }
}

/// Whether topic `pattern` (words split by `.`; `*` one word, `#` zero or more) matches
/// `key`.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|skip| go(rest, &k[skip..])),
            Some((&w, rest)) => match k.split_first() {
                Some((&kw, krest)) => (w == "*" || w == kw) && go(rest, krest),
                None => false,
            },
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    };
    go(&p, &k)
}

/// Whether a headers binding's arguments match a message's headers: `x-match` `all`
/// (the default) or `any`; arguments starting `x-` are not matched, unless `all-with-x`
/// / `any-with-x`. An argument whose value is void matches on presence alone.
pub fn headers_match(binding: &Arguments, headers: &Arguments) -> bool {
    let mode = binding
        .get("x-match")
        .and_then(text)
        .unwrap_or_else(|| "all".into());
    let with_x = mode.ends_with("-with-x");
    let mut wanted = binding
        .iter()
        .filter(|(k, _)| k.as_str() != "x-match" && (with_x || !k.starts_with("x-")))
        .peekable();
    if wanted.peek().is_none() {
        return mode.starts_with("all");
    }
    let matches = |(k, v): (&String, &serde_json::Value)| {
        headers.get(k).is_some_and(|h| {
            *v == serde_json::json!("void") || h == v || text(h).is_some_and(|t| text(v) == Some(t))
        })
    };
    if mode.starts_with("any") {
        wanted.any(matches)
    } else {
        wanted.all(matches)
    }
}

/// The text of a string argument in neutral JSON form (`{"short": "…"}`, or `{"long":
/// [bytes]}`), so that a short and a long string of the same text compare equal.
pub(crate) fn text(v: &serde_json::Value) -> Option<String> {
    let (kind, inner) = v.as_object()?.iter().next()?;
    match kind.as_str() {
        "short" => inner.as_str().map(str::to_owned),
        "long" | "bytes" => {
            let bytes: Option<Vec<u8>> = inner
                .as_array()?
                .iter()
                .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect();
            String::from_utf8(bytes?).ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn topic_patterns_match_as_rabbitmq_tutorial_five_says() {
        assert!(topic_matches("*.orange.*", "quick.orange.rabbit"));
        assert!(topic_matches("*.*.rabbit", "quick.orange.rabbit"));
        assert!(topic_matches("lazy.#", "lazy.orange.male.rabbit"));
        assert!(topic_matches("lazy.#", "lazy"));
        assert!(topic_matches("#", ""));
        assert!(topic_matches("#.b.#", "a.b"));
        assert!(!topic_matches("*.orange.*", "quick.orange.male.rabbit"));
        assert!(!topic_matches("*.*.rabbit", "orange"));
        assert!(!topic_matches("*", ""));
        assert!(!topic_matches("a.*", "a"));
    }

    fn binding(exchange: &str, queue: &str, key: &str) -> Binding {
        Binding {
            exchange: exchange.into(),
            destination: queue.into(),
            target: Target::Queue,
            routing_key: key.into(),
            arguments: Arguments::new(),
        }
    }

    fn declared(kind: ExchangeKind, auto_delete: bool) -> Exchange {
        Exchange {
            kind,
            durable: true,
            auto_delete,
            internal: false,
            arguments: Arguments::new(),
        }
    }

    #[test]
    fn each_kind_routes_to_its_bindings() {
        let none = || Arguments::new();
        let mut x = Exchanges::default();
        x.declare("logs", declared(ExchangeKind::Fanout, false))
            .expect("new");
        x.declare("direct_logs", declared(ExchangeKind::Direct, false))
            .expect("new");
        for (e, q, k) in [
            ("logs", "a", ""),
            ("logs", "b", ""),
            ("direct_logs", "a", "error"),
            ("direct_logs", "b", "info"),
            ("direct_logs", "b", "error"),
            ("amq.topic", "t", "*.orange.*"),
        ] {
            x.bind(binding(e, q, k)).expect("bind");
        }
        assert_eq!(
            x.route("logs", "x", &none),
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            x.route("direct_logs", "error", &none),
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            x.route("direct_logs", "info", &none),
            Some(vec!["b".into()])
        );
        assert_eq!(x.route("direct_logs", "debug", &none), Some(vec![]));
        assert_eq!(
            x.route("amq.topic", "quick.orange.fox", &none),
            Some(vec!["t".into()])
        );
        assert_eq!(x.route("", "q", &none), Some(vec!["q".into()]));
        assert_eq!(x.route("nope", "q", &none), None);
    }

    #[test]
    fn redeclaring_differently_is_refused_and_builtins_stay() {
        let mut x = Exchanges::default();
        x.declare("logs", declared(ExchangeKind::Fanout, false))
            .expect("new");
        x.declare("logs", declared(ExchangeKind::Fanout, false))
            .expect("same again");
        let e = x
            .declare("logs", declared(ExchangeKind::Direct, false))
            .expect_err("differs");
        assert!(e.to_string().contains("inequivalent arg 'type'"), "{e}");
        assert!(
            x.declare("amq.topic", declared(ExchangeKind::Direct, false))
                .is_err()
        );
        assert!(matches!(
            x.delete("amq.topic", false),
            Err(MetaError::AccessRefused(_))
        ));
        assert!(matches!(
            x.bind(binding("nope", "q", "")),
            Err(MetaError::ExchangeNotFound(_))
        ));
    }

    #[test]
    fn an_auto_delete_exchange_goes_with_its_last_binding_and_a_queue_takes_its_bindings() {
        let mut x = Exchanges::default();
        x.declare("tmp", declared(ExchangeKind::Fanout, true))
            .expect("new");
        x.bind(binding("tmp", "q1", "")).expect("bind");
        x.bind(binding("tmp", "q2", "")).expect("bind");
        x.unbind(&binding("tmp", "q1", "")).expect("unbind");
        assert!(x.get("tmp").is_some());
        x.forget_queue("q2");
        assert!(x.get("tmp").is_none());
        x.declare("used", declared(ExchangeKind::Fanout, false))
            .expect("new");
        x.bind(binding("used", "q", "")).expect("bind");
        assert!(matches!(
            x.delete("used", true),
            Err(MetaError::PreconditionFailed(_))
        ));
        x.delete("used", false).expect("delete");
        assert!(x.bindings("used").is_empty());
    }

    #[test]
    fn headers_match_all_or_any() {
        let args = |pairs: &[(&str, serde_json::Value)]| -> Arguments {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect()
        };
        let all = args(&[
            ("format", json!({"long": [112, 100, 102]})),
            ("type", json!({"long": [114]})),
        ]);
        let any = {
            let mut a = all.clone();
            a.insert("x-match".into(), json!({"long": [97, 110, 121]}));
            a
        };
        let msg = args(&[("format", json!({"short": "pdf"}))]);
        assert!(!headers_match(&all, &msg));
        assert!(headers_match(&any, &msg));
        let both = args(&[
            ("format", json!({"long": [112, 100, 102]})),
            ("type", json!({"long": [114]})),
        ]);
        assert!(headers_match(&all, &both));
    }

    #[test]
    fn exchange_bindings_route_on_once_and_go_with_either_exchange() {
        let none = || Arguments::new();
        let mut x = Exchanges::default();
        x.declare("edge", declared(ExchangeKind::Topic, false))
            .expect("new");
        x.declare("inner", declared(ExchangeKind::Fanout, true))
            .expect("new");
        let to_exchange = |source: &str, destination: &str, key: &str| Binding {
            target: Target::Exchange,
            ..binding(source, destination, key)
        };
        x.bind(binding("inner", "q", "")).expect("bound");
        x.bind(to_exchange("edge", "inner", "a.*")).expect("bound");
        x.bind(to_exchange("inner", "edge", "")).expect("bound");
        x.bind(binding("edge", "q", "#")).expect("bound");
        assert_eq!(x.route("edge", "a.b", &none), Some(vec!["q".to_owned()]));
        assert_eq!(x.route("inner", "z", &none), Some(vec!["q".to_owned()]));
        // Deleting the destination exchange takes the bindings to it.
        x.delete("inner", false).expect("deleted");
        assert_eq!(x.bindings("edge"), [binding("edge", "q", "#")]);
    }
}
