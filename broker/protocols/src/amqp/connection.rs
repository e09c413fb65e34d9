//! One AMQP connection: the handshake, then channels, publishes, consumers and acks,
//! on one task that owns the socket. Publishes are queued for storage in arrival order
//! and confirmed, in order, by a companion task once committed.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, ProtocolVersion};
use amq_protocol::protocol::{
    AMQPClass, BasicProperties, basic, channel, confirm, connection, exchange, queue, tx,
};
use amq_protocol::types::parsing::parse_field_table;
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use bytes::{Bytes, BytesMut};
use petrel_core::messaging::{
    Delivery, ExchangeKind, ExchangeOptions, Feed, Message, Messaging, MessagingError, Publishing,
    QueueHandle, QueueOptions, Routed,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Settings;
use super::convert;
use super::error::{Closing, Scope, code};
use super::frame::{self, FrameError, Inbound, PROTOCOL_HEADER};

/// Publishes queued for storage per connection before it stops reading its socket.
const PUBLISH_WINDOW: usize = 4096;
/// Deliveries in flight to an unlimited consumer (prefetch 0, or no-ack).
const UNLIMITED_WINDOW: u32 = 1000;
/// How long the handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to answer our connection.close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// A publish on its way to storage, for the confirmer.
struct Pending {
    channel: u16,
    /// Its confirm tag, if the channel is in confirm mode.
    tag: Option<u64>,
    /// The message, kept to return it if it turns out unroutable.
    mandatory: Option<Message>,
    stored: Publishing,
}

/// A publish stored (or not).
struct Stored {
    channel: u16,
    tag: Option<u64>,
    mandatory: Option<Message>,
    result: Result<Routed, MessagingError>,
}

/// Awaits publishes in order and reports each: one task per connection.
async fn confirmer(mut pending: mpsc::Receiver<Pending>, stored: mpsc::UnboundedSender<Stored>) {
    while let Some(p) = pending.recv().await {
        let result = p.stored.await;
        let report = Stored {
            channel: p.channel,
            tag: p.tag,
            mandatory: p.mandatory,
            result,
        };
        if stored.send(report).is_err() {
            return;
        }
    }
}

/// A message being received: its method, then header, then body frames.
struct Incoming {
    exchange: String,
    routing_key: String,
    mandatory: bool,
    properties: Option<BasicProperties>,
    size: u64,
    body: Vec<Bytes>,
    received: u64,
}

/// A consumer on a channel.
struct Consumer {
    tag: ShortString,
    queue: QueueHandle,
    no_ack: bool,
    /// Prefetch; 0 for a window the connection refills as it writes.
    prefetch: u16,
    cancelled: bool,
}

/// A delivery not yet acked.
struct Unacked {
    queue: QueueHandle,
    offset: u64,
    consumer: u64,
}

#[derive(Default)]
struct Channel {
    /// Identifies the channel to the dispatchers (owner of its unacked messages).
    owner: u64,
    /// A close was sent; everything but close-ok is ignored.
    closing: bool,
    incoming: Option<Incoming>,
    confirm: bool,
    next_publish_tag: u64,
    next_delivery_tag: u64,
    prefetch: u16,
    unacked: BTreeMap<u64, Unacked>,
    consumers: HashMap<u64, Consumer>,
    /// Confirms to send, coalesced: the last tag acked in order.
    confirm_upto: Option<u64>,
    /// The queue declared last: what an empty queue name means.
    last_queue: Option<String>,
    /// In tx mode: what waits for tx.commit.
    tx: Option<Transaction>,
}

/// Publishes and acknowledgements of a channel in tx mode, until commit or rollback.
#[derive(Default)]
struct Transaction {
    /// Messages, and whether each is mandatory.
    publishes: Vec<(Message, bool)>,
    /// Delivery tag, multiple, and how.
    settles: Vec<(u64, bool, Settle)>,
}

/// Where the handshake is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    StartOk,
    TuneOk,
    Open,
    Running,
    /// connection.close sent; waiting for close-ok.
    Closing,
}

/// Serves one client connection until it closes.
pub async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    messaging: Arc<Messaging>,
    settings: Settings,
) {
    let _ = stream.set_nodelay(true);
    let (deliveries_tx, deliveries) = mpsc::unbounded_channel();
    let (pending_tx, pending) = mpsc::channel(PUBLISH_WINDOW);
    let (stored_tx, stored) = mpsc::unbounded_channel();
    let confirmer = tokio::spawn(confirmer(pending, stored_tx));
    let mut conn = Connection {
        id: messaging.next_id(),
        messaging,
        peer,
        settings,
        stage: Stage::StartOk,
        frame_max: settings.frame_max as usize,
        heartbeat: 0,
        out: Vec::with_capacity(64 * 1024),
        channels: HashMap::new(),
        consumers: HashMap::new(),
        deliveries_tx,
        pending_tx,
        blocked_capable: false,
        published: false,
    };
    match conn.serve(stream, deliveries, stored).await {
        Ok(()) => tracing::debug!(%peer, "AMQP connection closed"),
        Err(e) => tracing::info!(%peer, error = %e, "AMQP connection ended"),
    }
    conn.release_all();
    conn.messaging.connection_closed(conn.id);
    confirmer.abort();
}

struct Connection {
    /// Identifies the connection to the core (owner of its exclusive queues).
    id: u64,
    messaging: Arc<Messaging>,
    peer: SocketAddr,
    settings: Settings,
    stage: Stage,
    frame_max: usize,
    heartbeat: u16,
    out: Vec<u8>,
    channels: HashMap<u16, Channel>,
    /// Consumer id to its channel.
    consumers: HashMap<u64, u16>,
    deliveries_tx: mpsc::UnboundedSender<Feed>,
    pending_tx: mpsc::Sender<Pending>,
    /// The client understands connection.blocked.
    blocked_capable: bool,
    /// The client has published: a resource alarm holds it back.
    published: bool,
}

/// Why the connection ended without a clean close.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("wrong protocol header {0:?}")]
    Header(Vec<u8>),
    #[error("no heartbeat from the client for {0:?}")]
    Silent(Duration),
    #[error("handshake or close not completed within {0:?}")]
    Timeout(Duration),
    #[error("closed with {code}: {text}")]
    Closed { code: u16, text: String },
}

impl Connection {
    async fn serve(
        &mut self,
        stream: TcpStream,
        mut deliveries: mpsc::UnboundedReceiver<Feed>,
        mut stored: mpsc::UnboundedReceiver<Stored>,
    ) -> Result<(), Ended> {
        let (mut rd, mut wr) = stream.into_split();
        let mut inbuf = BytesMut::with_capacity(64 * 1024);
        // The protocol header first; anything else is answered with ours, then closed.
        while inbuf.len() < PROTOCOL_HEADER.len() {
            let read = tokio::time::timeout(HANDSHAKE_TIMEOUT, rd.read_buf(&mut inbuf))
                .await
                .map_err(|_| Ended::Timeout(HANDSHAKE_TIMEOUT))??;
            if read == 0 || !PROTOCOL_HEADER.starts_with(&inbuf[..inbuf.len().min(8)]) {
                wr.write_all(PROTOCOL_HEADER).await?;
                return Err(Ended::Header(inbuf.to_vec()));
            }
        }
        let _ = inbuf.split_to(PROTOCOL_HEADER.len());
        self.send_start();
        wr.write_all(&self.out).await?;
        self.out.clear();

        let mut deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let mut last_read = Instant::now();
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        let mut wrote_since_tick = false;
        let mut closing = false;
        let mut alarm = self.messaging.alarm();
        loop {
            // Under a resource alarm a connection that publishes is not read (RabbitMQ's
            // blocking): its client waits instead of the node running out.
            let held = self.published && alarm.borrow().is_some();
            if held {
                last_read = Instant::now();
            }
            tokio::select! {
                changed = alarm.changed() => {
                    if changed.is_ok() {
                        let reason = alarm.borrow().clone();
                        self.tell_blocked(reason);
                    }
                }
                read = rd.read_buf(&mut inbuf), if !held => {
                    if read? == 0 {
                        return Ok(());
                    }
                    last_read = Instant::now();
                    loop {
                        let inbound = match self.next_frame(&mut inbuf) {
                            Ok(Some(inbound)) => inbound,
                            Ok(None) => break,
                            Err(e) => {
                                wr.write_all(&self.out).await?;
                                return Err(e);
                            }
                        };
                        if let Some(end) = self.on_frame(inbound).await {
                            wr.write_all(&self.out).await?;
                            return end;
                        }
                    }
                }
                Some(feed) = deliveries.recv() => {
                    self.on_feed(feed);
                    while let Ok(feed) = deliveries.try_recv() {
                        self.on_feed(feed);
                    }
                }
                Some(s) = stored.recv() => {
                    self.on_stored(s);
                    while let Ok(s) = stored.try_recv() {
                        self.on_stored(s);
                    }
                    self.flush_confirms();
                }
                _ = ticker.tick() => {
                    if self.stage != Stage::Running && Instant::now() > deadline {
                        return Err(Ended::Timeout(if closing { CLOSE_TIMEOUT } else { HANDSHAKE_TIMEOUT }));
                    }
                    if self.heartbeat > 0 {
                        let every = Duration::from_secs(u64::from(self.heartbeat));
                        if last_read.elapsed() > every * 2 {
                            return Err(Ended::Silent(every * 2));
                        }
                        if !wrote_since_tick {
                            self.write(&AMQPFrame::Heartbeat);
                        }
                    }
                    wrote_since_tick = false;
                }
            }
            // After a close of ours the client has a moment to answer it.
            if self.stage == Stage::Closing && !closing {
                closing = true;
                deadline = Instant::now() + CLOSE_TIMEOUT;
            }
            if !self.out.is_empty() {
                wr.write_all(&self.out).await?;
                self.out.clear();
                wrote_since_tick = true;
            }
        }
    }

    /// The next frame, or the close its bytes call for.
    fn next_frame(&mut self, inbuf: &mut BytesMut) -> Result<Option<Inbound>, Ended> {
        match frame::read(inbuf, self.frame_max) {
            Ok(f) => Ok(f),
            Err(e) => {
                let code = match e {
                    FrameError::Malformed(_) => code::SYNTAX_ERROR,
                    _ => code::FRAME_ERROR,
                };
                // Nothing after a broken frame can be read: close at once.
                self.close_connection(&Closing::connection(code, e.to_string()));
                Err(Ended::Closed {
                    code,
                    text: e.to_string(),
                })
            }
        }
    }

    fn write(&mut self, frame: &AMQPFrame) {
        if let Err(e) = frame::write(&mut self.out, frame) {
            tracing::error!(error = ?e, "encoding an AMQP frame");
        }
    }

    fn method(&mut self, channel: u16, method: AMQPClass) {
        self.write(&AMQPFrame::Method(channel, method));
    }

    fn send_start(&mut self) {
        let mut capabilities = FieldTable::default();
        for name in [
            "publisher_confirms",
            "basic.nack",
            "consumer_cancel_notify",
            "connection.blocked",
            "authentication_failure_close",
            "per_consumer_qos",
        ] {
            capabilities.insert(name.into(), AMQPValue::Boolean(true));
        }
        let mut props = FieldTable::default();
        props.insert("product".into(), AMQPValue::LongString("Petrel".into()));
        props.insert(
            "version".into(),
            AMQPValue::LongString(env!("CARGO_PKG_VERSION").into()),
        );
        props.insert("platform".into(), AMQPValue::LongString("Rust".into()));
        props.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
        let version = ProtocolVersion::amqp_0_9_1();
        self.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
                version_major: version.major,
                version_minor: version.minor,
                server_properties: props,
                mechanisms: "PLAIN AMQPLAIN".into(),
                locales: "en_US".into(),
            })),
        );
    }

    /// Handles one frame; `Some` ends the connection.
    async fn on_frame(&mut self, inbound: Inbound) -> Option<Result<(), Ended>> {
        let (ch, result) = match inbound {
            Inbound::Body(ch, body) => (ch, self.on_body(ch, body).await),
            Inbound::Frame(AMQPFrame::Heartbeat) => (0, Ok(())),
            Inbound::Frame(AMQPFrame::Method(0, method)) => match self.on_connection(&method) {
                Ok(end) => return end,
                Err(c) => (0, Err(c.on(&method))),
            },
            Inbound::Frame(AMQPFrame::Method(ch, method)) => (
                ch,
                self.on_channel(ch, &method)
                    .await
                    .map_err(|c| c.on(&method)),
            ),
            Inbound::Frame(AMQPFrame::Header(ch, header)) => (ch, self.on_header(ch, header).await),
            Inbound::Frame(other) => (
                0,
                Err(Closing::connection(
                    code::UNEXPECTED_FRAME,
                    format!("UNEXPECTED_FRAME - {other}"),
                )),
            ),
        };
        match result {
            Ok(()) => {}
            Err(c) if c.scope == Scope::Channel => self.close_channel(ch, &c),
            Err(c) => self.close_connection(&c),
        }
        None
    }

    /// Tells a client that understands it (capability `connection.blocked`) that
    /// publishers are held back for `reason`, or no longer.
    fn tell_blocked(&mut self, reason: Option<String>) {
        if !self.blocked_capable || self.stage != Stage::Running {
            return;
        }
        let method = match reason {
            Some(reason) => connection::AMQPMethod::Blocked(connection::Blocked {
                reason: reason.as_str().into(),
            }),
            None => connection::AMQPMethod::Unblocked(connection::Unblocked {}),
        };
        self.method(0, AMQPClass::Connection(method));
    }

    /// A method on channel 0; `Ok(Some)` ends the connection.
    fn on_connection(&mut self, method: &AMQPClass) -> Result<Option<Result<(), Ended>>, Closing> {
        use connection::AMQPMethod as M;
        let AMQPClass::Connection(m) = method else {
            return Err(Closing::connection(
                code::COMMAND_INVALID,
                "COMMAND_INVALID - only connection methods may use channel 0",
            ));
        };
        match (self.stage, m) {
            (_, M::Close(close)) => {
                // Clients close with 200, or 0 (lapin): either way a normal close.
                tracing::debug!(peer = %self.peer, code = close.reply_code, text = %close.reply_text, "the client closes");
                self.method(0, AMQPClass::Connection(M::CloseOk(connection::CloseOk {})));
                self.release_all();
                return Ok(Some(Ok(())));
            }
            (Stage::Closing, M::CloseOk(_)) => return Ok(Some(Ok(()))),
            (Stage::Closing, _) => {}
            (Stage::StartOk, M::StartOk(start)) => {
                self.authenticate(start)?;
                self.blocked_capable = matches!(
                    start.client_properties.inner().get("capabilities"),
                    Some(AMQPValue::FieldTable(c))
                        if c.inner().get("connection.blocked") == Some(&AMQPValue::Boolean(true))
                );
                self.method(
                    0,
                    AMQPClass::Connection(M::Tune(connection::Tune {
                        channel_max: self.settings.channel_max,
                        frame_max: self.settings.frame_max,
                        heartbeat: self.settings.heartbeat,
                    })),
                );
                self.stage = Stage::TuneOk;
            }
            (Stage::TuneOk, M::TuneOk(tune)) => {
                let ours = self.settings.frame_max;
                let frame_max = if tune.frame_max == 0 {
                    ours
                } else {
                    tune.frame_max.min(ours)
                };
                if frame_max < frame::MIN_FRAME_MAX as u32 {
                    return Err(Closing::connection(
                        code::NOT_ALLOWED,
                        format!("NOT_ALLOWED - frame_max {frame_max} is below the minimum 4096"),
                    ));
                }
                self.frame_max = frame_max as usize;
                if tune.channel_max != 0 {
                    self.settings.channel_max = tune.channel_max.min(self.settings.channel_max);
                }
                self.heartbeat = tune.heartbeat;
                self.stage = Stage::Open;
            }
            (Stage::Open, M::Open(open)) => {
                if open.virtual_host.as_str() != "/" {
                    return Err(Closing::connection(
                        code::NOT_ALLOWED,
                        format!("NOT_ALLOWED - vhost '{}' not found", open.virtual_host),
                    ));
                }
                self.method(0, AMQPClass::Connection(M::OpenOk(connection::OpenOk {})));
                self.stage = Stage::Running;
                // An alarm raised before the connection opened is told now.
                let alarm = self.messaging.alarm().borrow().clone();
                if alarm.is_some() {
                    self.tell_blocked(alarm);
                }
            }
            (Stage::Running, M::Blocked(_) | M::Unblocked(_)) => {}
            (_, other) => {
                return Err(Closing::connection(
                    code::COMMAND_INVALID,
                    format!("COMMAND_INVALID - connection method {other:?} not expected now"),
                ));
            }
        }
        Ok(None)
    }

    /// Checks the client's credentials: so far the user `guest`, from loopback only (as
    /// RabbitMQ has it).
    fn authenticate(&self, start: &connection::StartOk) -> Result<(), Closing> {
        let mechanism = start.mechanism.as_str();
        let credentials = match mechanism {
            "PLAIN" => {
                let mut parts = start.response.as_bytes().split(|b| *b == 0).skip(1);
                match (parts.next(), parts.next()) {
                    (Some(user), Some(pass)) => Some((user.to_vec(), pass.to_vec())),
                    _ => None,
                }
            }
            "AMQPLAIN" => amqplain(start.response.as_bytes()),
            _ => None,
        };
        let refused = || {
            Closing::connection(
                code::ACCESS_REFUSED,
                format!(
                    "ACCESS_REFUSED - Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
                ),
            )
        };
        let Some((user, pass)) = credentials else {
            tracing::info!(peer = %self.peer, mechanism, "AMQP login refused: unsupported mechanism or malformed response");
            return Err(refused());
        };
        if user != b"guest" || pass != b"guest" {
            tracing::info!(peer = %self.peer, user = %String::from_utf8_lossy(&user), "AMQP login refused: unknown user or wrong password");
            return Err(refused());
        }
        if !self.peer.ip().is_loopback() {
            tracing::info!(peer = %self.peer, "AMQP login refused: user 'guest' may only connect from loopback");
            return Err(refused());
        }
        Ok(())
    }

    /// A method on channel `ch`.
    async fn on_channel(&mut self, ch: u16, method: &AMQPClass) -> Result<(), Closing> {
        if self.stage == Stage::Closing {
            return Ok(());
        }
        if self.stage != Stage::Running {
            return Err(Closing::connection(
                code::COMMAND_INVALID,
                "COMMAND_INVALID - the connection is not open yet",
            ));
        }
        if ch > self.settings.channel_max {
            return Err(Closing::connection(
                code::CHANNEL_ERROR,
                format!(
                    "CHANNEL_ERROR - channel {ch} is above channel_max {}",
                    self.settings.channel_max
                ),
            ));
        }
        if let AMQPClass::Channel(channel::AMQPMethod::Open(_)) = method {
            if self.channels.contains_key(&ch) {
                return Err(Closing::connection(
                    code::CHANNEL_ERROR,
                    format!("CHANNEL_ERROR - second 'channel.open' seen on channel {ch}"),
                ));
            }
            let channel = Channel {
                owner: self.messaging.next_id(),
                next_publish_tag: 1,
                next_delivery_tag: 1,
                ..Channel::default()
            };
            self.channels.insert(ch, channel);
            self.method(
                ch,
                AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
            );
            return Ok(());
        }
        let Some(chan) = self.channels.get_mut(&ch) else {
            return Err(Closing::connection(
                code::CHANNEL_ERROR,
                format!("CHANNEL_ERROR - expected 'channel.open' on channel {ch}"),
            ));
        };
        if chan.closing {
            match method {
                AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
                    self.channels.remove(&ch);
                }
                AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                    self.channels.remove(&ch);
                    self.method(
                        ch,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    );
                }
                _ => {}
            }
            return Ok(());
        }
        if chan.incoming.is_some() {
            return Err(Closing::connection(
                code::UNEXPECTED_FRAME,
                format!(
                    "UNEXPECTED_FRAME - a method on channel {ch} while receiving a message's content"
                ),
            ));
        }
        match method {
            AMQPClass::Channel(m) => self.on_channel_class(ch, m),
            AMQPClass::Queue(m) => self.on_queue(ch, m).await,
            AMQPClass::Exchange(m) => self.on_exchange(ch, m).await,
            AMQPClass::Basic(m) => self.on_basic(ch, m).await,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(select)) => {
                if let Some(chan) = self.channels.get_mut(&ch) {
                    if chan.tx.is_some() {
                        return Err(Closing::channel(
                            code::PRECONDITION_FAILED,
                            "PRECONDITION_FAILED - cannot switch from tx to confirm mode",
                        ));
                    }
                    chan.confirm = true;
                }
                if !select.nowait {
                    self.method(
                        ch,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
                Ok(())
            }
            AMQPClass::Tx(m) => self.on_tx(ch, m).await,
            other => Err(Closing::connection(
                code::NOT_IMPLEMENTED,
                format!(
                    "NOT_IMPLEMENTED - {}.{} is not supported yet",
                    other.get_amqp_class_id(),
                    other.get_amqp_method_id()
                ),
            )),
        }
    }

    fn on_channel_class(&mut self, ch: u16, m: &channel::AMQPMethod) -> Result<(), Closing> {
        use channel::AMQPMethod as M;
        match m {
            M::Close(_) => {
                if let Some(chan) = self.channels.remove(&ch) {
                    self.release(&chan);
                }
                self.method(ch, AMQPClass::Channel(M::CloseOk(channel::CloseOk {})));
            }
            M::CloseOk(_) => {}
            M::Flow(flow) => self.method(
                ch,
                AMQPClass::Channel(M::FlowOk(channel::FlowOk {
                    active: flow.active,
                })),
            ),
            other => {
                return Err(Closing::connection(
                    code::COMMAND_INVALID,
                    format!("COMMAND_INVALID - channel method {other:?} not expected"),
                ));
            }
        }
        Ok(())
    }

    async fn on_queue(&mut self, ch: u16, m: &queue::AMQPMethod) -> Result<(), Closing> {
        use queue::AMQPMethod as M;
        match m {
            M::Declare(d) => self.declare_queue(ch, d).await,
            M::Bind(b) => {
                self.bind(
                    ch,
                    &b.queue,
                    &b.exchange,
                    &b.routing_key,
                    &b.arguments,
                    true,
                )
                .await?;
                if !b.nowait {
                    self.method(ch, AMQPClass::Queue(M::BindOk(queue::BindOk {})));
                }
                Ok(())
            }
            M::Unbind(b) => {
                self.bind(
                    ch,
                    &b.queue,
                    &b.exchange,
                    &b.routing_key,
                    &b.arguments,
                    false,
                )
                .await?;
                self.method(ch, AMQPClass::Queue(M::UnbindOk(queue::UnbindOk {})));
                Ok(())
            }
            M::Purge(p) => {
                let queue = self.queue_name(ch, &p.queue)?;
                let purged = self
                    .messaging
                    .purge_queue(&queue, self.id)
                    .await
                    .map_err(channel_error)?;
                if !p.nowait {
                    self.method(
                        ch,
                        AMQPClass::Queue(M::PurgeOk(queue::PurgeOk {
                            message_count: u32::try_from(purged).unwrap_or(u32::MAX),
                        })),
                    );
                }
                Ok(())
            }
            M::Delete(d) => {
                let queue = self.queue_name(ch, &d.queue)?;
                let messages = self
                    .messaging
                    .delete_queue(&queue, d.if_unused, d.if_empty, self.id)
                    .await
                    .map_err(channel_error)?;
                if !d.nowait {
                    self.method(
                        ch,
                        AMQPClass::Queue(M::DeleteOk(queue::DeleteOk {
                            message_count: u32::try_from(messages).unwrap_or(u32::MAX),
                        })),
                    );
                }
                Ok(())
            }
            other => Err(Closing::connection(
                code::COMMAND_INVALID,
                format!("COMMAND_INVALID - queue method {other:?} not expected from a client"),
            )),
        }
    }

    /// Binds (or unbinds) a queue to an exchange.
    async fn bind(
        &mut self,
        ch: u16,
        queue: &ShortString,
        exchange: &ShortString,
        routing_key: &ShortString,
        arguments: &FieldTable,
        bind: bool,
    ) -> Result<(), Closing> {
        let queue = self.queue_name(ch, queue)?;
        let args = convert::table(arguments);
        self.messaging
            .bind(
                &queue,
                exchange.as_str(),
                routing_key.as_str(),
                &args,
                bind,
                self.id,
            )
            .await
            .map_err(channel_error)
    }

    /// The queue a method names; an empty name is the channel's last declared queue.
    fn queue_name(&self, ch: u16, name: &ShortString) -> Result<String, Closing> {
        if !name.as_str().is_empty() {
            return Ok(name.to_string());
        }
        self.channels
            .get(&ch)
            .and_then(|c| c.last_queue.clone())
            .ok_or_else(|| {
                Closing::channel(code::NOT_FOUND, "NOT_FOUND - no previously declared queue")
            })
    }

    async fn on_exchange(&mut self, ch: u16, m: &exchange::AMQPMethod) -> Result<(), Closing> {
        use exchange::AMQPMethod as M;
        match m {
            M::Declare(d) => {
                let kind = match ExchangeKind::parse(d.kind.as_str()) {
                    Some(kind) => kind,
                    None if d.passive => ExchangeKind::Direct,
                    None => {
                        return Err(Closing::connection(
                            code::COMMAND_INVALID,
                            format!("COMMAND_INVALID - invalid exchange type '{}'", d.kind),
                        ));
                    }
                };
                let options = ExchangeOptions {
                    kind,
                    passive: d.passive,
                    durable: d.durable,
                    auto_delete: d.auto_delete,
                    internal: d.internal,
                    arguments: convert::table(&d.arguments),
                };
                self.messaging
                    .declare_exchange(d.exchange.as_str(), options)
                    .await
                    .map_err(channel_error)?;
                if !d.nowait {
                    self.method(
                        ch,
                        AMQPClass::Exchange(M::DeclareOk(exchange::DeclareOk {})),
                    );
                }
                Ok(())
            }
            M::Delete(d) => {
                self.messaging
                    .delete_exchange(d.exchange.as_str(), d.if_unused)
                    .await
                    .map_err(channel_error)?;
                if !d.nowait {
                    self.method(ch, AMQPClass::Exchange(M::DeleteOk(exchange::DeleteOk {})));
                }
                Ok(())
            }
            other => Err(Closing::connection(
                code::NOT_IMPLEMENTED,
                format!("NOT_IMPLEMENTED - exchange method {other:?} is not supported yet"),
            )),
        }
    }

    async fn declare_queue(&mut self, ch: u16, d: &queue::Declare) -> Result<(), Closing> {
        let name = if d.queue.as_str().is_empty() {
            server_named("amq.gen", self.messaging.next_id())
        } else {
            d.queue.to_string()
        };
        if name.starts_with("amq.") && !d.passive && !d.queue.as_str().is_empty() {
            return Err(Closing::channel(
                code::ACCESS_REFUSED,
                format!("ACCESS_REFUSED - queue name '{name}' contains reserved prefix 'amq.*'"),
            ));
        }
        let options = QueueOptions {
            passive: d.passive,
            durable: d.durable,
            exclusive: d.exclusive,
            auto_delete: d.auto_delete,
            arguments: convert::table(&d.arguments),
        };
        let info = self
            .messaging
            .declare_queue(&name, options, self.id)
            .await
            .map_err(channel_error)?;
        if let Some(chan) = self.channels.get_mut(&ch) {
            chan.last_queue = Some(info.name.clone());
        }
        if !d.nowait {
            self.method(
                ch,
                AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                    queue: info.name.as_str().into(),
                    message_count: u32::try_from(info.messages).unwrap_or(u32::MAX),
                    consumer_count: info.consumers,
                })),
            );
        }
        Ok(())
    }

    async fn on_basic(&mut self, ch: u16, m: &basic::AMQPMethod) -> Result<(), Closing> {
        use basic::AMQPMethod as M;
        match m {
            M::Publish(p) => {
                self.published = true;
                if let Some(chan) = self.channels.get_mut(&ch) {
                    chan.incoming = Some(Incoming {
                        exchange: p.exchange.to_string(),
                        routing_key: p.routing_key.to_string(),
                        mandatory: p.mandatory,
                        properties: None,
                        size: 0,
                        body: Vec::new(),
                        received: 0,
                    });
                }
                Ok(())
            }
            M::Qos(q) => {
                if let Some(chan) = self.channels.get_mut(&ch) {
                    chan.prefetch = q.prefetch_count;
                }
                self.method(ch, AMQPClass::Basic(M::QosOk(basic::QosOk {})));
                Ok(())
            }
            M::Consume(c) => self.consume(ch, c).await,
            M::Cancel(c) => {
                if let Some(chan) = self.channels.get_mut(&ch)
                    && let Some((id, consumer)) = chan
                        .consumers
                        .iter_mut()
                        .find(|(_, k)| k.tag == c.consumer_tag && !k.cancelled)
                {
                    consumer.cancelled = true;
                    consumer.queue.cancel(*id);
                }
                if !c.nowait {
                    self.method(
                        ch,
                        AMQPClass::Basic(M::CancelOk(basic::CancelOk {
                            consumer_tag: c.consumer_tag.clone(),
                        })),
                    );
                }
                Ok(())
            }
            M::Get(g) => self.get(ch, g).await,
            M::Recover(r) => {
                self.recover(ch, r.requeue);
                self.method(ch, AMQPClass::Basic(M::RecoverOk(basic::RecoverOk {})));
                Ok(())
            }
            M::RecoverAsync(r) => {
                self.recover(ch, r.requeue);
                Ok(())
            }
            M::Ack(a) => self.acknowledge(ch, a.delivery_tag, a.multiple, Settle::Ack),
            M::Nack(n) => {
                self.acknowledge(ch, n.delivery_tag, n.multiple, Settle::reject(n.requeue))
            }
            M::Reject(r) => self.acknowledge(ch, r.delivery_tag, false, Settle::reject(r.requeue)),
            other => Err(Closing::connection(
                code::NOT_IMPLEMENTED,
                format!("NOT_IMPLEMENTED - basic method {other:?} is not supported yet"),
            )),
        }
    }

    async fn consume(&mut self, ch: u16, c: &basic::Consume) -> Result<(), Closing> {
        let id = self.messaging.next_id();
        let tag: ShortString = if c.consumer_tag.as_str().is_empty() {
            server_named("amq.ctag", id).into()
        } else {
            c.consumer_tag.clone()
        };
        let (owner, prefetch) = match self.channels.get(&ch) {
            Some(chan) => {
                if chan
                    .consumers
                    .values()
                    .any(|k| k.tag == tag && !k.cancelled)
                {
                    return Err(Closing::connection(
                        code::NOT_ALLOWED,
                        format!("NOT_ALLOWED - attempt to reuse consumer tag '{tag}'"),
                    ));
                }
                (chan.owner, if c.no_ack { 0 } else { chan.prefetch })
            }
            None => return Ok(()),
        };
        let name = self.queue_name(ch, &c.queue)?;
        let queue = self
            .messaging
            .consume(
                &name,
                id,
                owner,
                self.id,
                self.deliveries_tx.clone(),
                c.no_ack,
            )
            .await
            .map_err(channel_error)?;
        if !c.nowait {
            self.method(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: tag.clone(),
                })),
            );
        }
        queue.credit(
            id,
            if prefetch == 0 {
                UNLIMITED_WINDOW
            } else {
                u32::from(prefetch)
            },
        );
        if let Some(chan) = self.channels.get_mut(&ch) {
            chan.consumers.insert(
                id,
                Consumer {
                    tag,
                    queue,
                    no_ack: c.no_ack,
                    prefetch,
                    cancelled: false,
                },
            );
            self.consumers.insert(id, ch);
        }
        Ok(())
    }

    async fn get(&mut self, ch: u16, g: &basic::Get) -> Result<(), Closing> {
        let Some(owner) = self.channels.get(&ch).map(|c| c.owner) else {
            return Ok(());
        };
        let queue = self.queue_name(ch, &g.queue)?;
        let got = self
            .messaging
            .get(&queue, owner, g.no_ack, self.id)
            .await
            .map_err(channel_error)?;
        let Some((d, handle, left)) = got else {
            self.method(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
            );
            return Ok(());
        };
        let Some(chan) = self.channels.get_mut(&ch) else {
            return Ok(());
        };
        let tag = chan.next_delivery_tag;
        chan.next_delivery_tag += 1;
        if !g.no_ack {
            chan.unacked.insert(
                tag,
                Unacked {
                    queue: handle,
                    offset: d.offset,
                    consumer: 0,
                },
            );
        }
        self.method(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                delivery_tag: tag,
                redelivered: d.redelivered,
                exchange: d.message.exchange.as_str().into(),
                routing_key: d.message.routing_key.as_str().into(),
                message_count: u32::try_from(left).unwrap_or(u32::MAX),
            })),
        );
        self.content(ch, &d.message);
        Ok(())
    }

    /// basic.recover: everything unacked on the channel is delivered again (RabbitMQ
    /// requeues it whatever `requeue` says).
    fn recover(&mut self, ch: u16, _requeue: bool) {
        let _ = self.settle(ch, 0, true, Settle::Requeue);
    }

    /// An ack, nack or reject: applied now, or at tx.commit in tx mode.
    fn acknowledge(
        &mut self,
        ch: u16,
        tag: u64,
        multiple: bool,
        how: Settle,
    ) -> Result<(), Closing> {
        if let Some(tx) = self.channels.get_mut(&ch).and_then(|c| c.tx.as_mut()) {
            tx.settles.push((tag, multiple, how));
            return Ok(());
        }
        self.settle(ch, tag, multiple, how)
    }

    /// The tx class: publishes and acknowledgements wait for commit, which stores every
    /// publish before it answers; rollback forgets them.
    async fn on_tx(&mut self, ch: u16, m: &tx::AMQPMethod) -> Result<(), Closing> {
        use tx::AMQPMethod as M;
        let not_transactional = || {
            Closing::channel(
                code::PRECONDITION_FAILED,
                "PRECONDITION_FAILED - channel is not transactional",
            )
        };
        let Some(chan) = self.channels.get_mut(&ch) else {
            return Ok(());
        };
        match m {
            M::Select(_) => {
                if chan.confirm {
                    return Err(Closing::channel(
                        code::PRECONDITION_FAILED,
                        "PRECONDITION_FAILED - cannot switch from confirm to tx mode",
                    ));
                }
                chan.tx.get_or_insert_with(Transaction::default);
                self.method(ch, AMQPClass::Tx(M::SelectOk(tx::SelectOk {})));
            }
            M::Rollback(_) => {
                let tx = chan.tx.as_mut().ok_or_else(not_transactional)?;
                *tx = Transaction::default();
                self.method(ch, AMQPClass::Tx(M::RollbackOk(tx::RollbackOk {})));
            }
            M::Commit(_) => {
                let tx = chan.tx.as_mut().ok_or_else(not_transactional)?;
                let Transaction { publishes, settles } = std::mem::take(tx);
                let mut stored = Vec::with_capacity(publishes.len());
                for (message, mandatory) in publishes {
                    let publishing = self.messaging.publish(&message).map_err(channel_error)?;
                    stored.push((publishing, mandatory.then_some(message)));
                }
                for (publishing, mandatory) in stored {
                    let result = publishing.await;
                    if let Err(e) = &result {
                        return Err(Closing::channel(
                            code::INTERNAL_ERROR,
                            format!("INTERNAL_ERROR - a publish of the transaction failed: {e}"),
                        ));
                    }
                    let report = Stored {
                        channel: ch,
                        tag: None,
                        mandatory,
                        result,
                    };
                    self.on_stored(report);
                }
                for (tag, multiple, how) in settles {
                    self.settle(ch, tag, multiple, how)?;
                }
                self.method(ch, AMQPClass::Tx(M::CommitOk(tx::CommitOk {})));
            }
            other => {
                return Err(Closing::connection(
                    code::COMMAND_INVALID,
                    format!("COMMAND_INVALID - tx method {other:?} not expected from a client"),
                ));
            }
        }
        Ok(())
    }

    /// Acks, nacks or rejects deliveries up to `tag` (all of them: tag 0, multiple).
    fn settle(&mut self, ch: u16, tag: u64, multiple: bool, how: Settle) -> Result<(), Closing> {
        let Some(chan) = self.channels.get_mut(&ch) else {
            return Ok(());
        };
        let tags: Vec<u64> = if multiple {
            let upto = if tag == 0 { u64::MAX } else { tag };
            chan.unacked.range(..=upto).map(|(t, _)| *t).collect()
        } else if chan.unacked.contains_key(&tag) {
            vec![tag]
        } else {
            Vec::new()
        };
        if tags.is_empty() && !(multiple && tag == 0) {
            return Err(Closing::channel(
                code::PRECONDITION_FAILED,
                format!("PRECONDITION_FAILED - unknown delivery tag {tag}"),
            ));
        }
        let mut by_queue: HashMap<u64, (QueueHandle, Vec<u64>)> = HashMap::new();
        let mut credits: HashMap<u64, u32> = HashMap::new();
        for t in tags {
            if let Some(u) = chan.unacked.remove(&t) {
                *credits.entry(u.consumer).or_default() += 1;
                by_queue
                    .entry(u.queue.id())
                    .or_insert_with(|| (u.queue.clone(), Vec::new()))
                    .1
                    .push(u.offset);
            }
        }
        for (queue, offsets) in by_queue.into_values() {
            match how {
                Settle::Ack => queue.settle(offsets),
                Settle::Requeue => queue.requeue(offsets),
                Settle::Drop => queue.reject(offsets),
            }
        }
        for (id, n) in credits {
            if let Some(consumer) = chan.consumers.get(&id)
                && !consumer.cancelled
                && consumer.prefetch > 0
            {
                consumer.queue.credit(id, n);
            }
        }
        Ok(())
    }

    async fn on_header(&mut self, ch: u16, header: AMQPContentHeader) -> Result<(), Closing> {
        let incoming = self
            .channels
            .get_mut(&ch)
            .filter(|c| !c.closing)
            .and_then(|c| c.incoming.as_mut());
        match incoming {
            Some(incoming) if incoming.properties.is_none() => {
                incoming.properties = Some(header.properties);
                incoming.size = header.body_size;
            }
            _ => {
                if self.channels.get(&ch).is_some_and(|c| c.closing) {
                    return Ok(());
                }
                return Err(Closing::connection(
                    code::UNEXPECTED_FRAME,
                    format!(
                        "UNEXPECTED_FRAME - content header on channel {ch} without a 'basic.publish'"
                    ),
                ));
            }
        }
        self.complete_if_received(ch).await
    }

    async fn on_body(&mut self, ch: u16, body: Bytes) -> Result<(), Closing> {
        let incoming = self
            .channels
            .get_mut(&ch)
            .filter(|c| !c.closing)
            .and_then(|c| c.incoming.as_mut())
            .filter(|i| i.properties.is_some());
        match incoming {
            Some(incoming) => {
                incoming.received += body.len() as u64;
                if incoming.received > incoming.size {
                    return Err(Closing::connection(
                        code::FRAME_ERROR,
                        format!(
                            "FRAME_ERROR - body of {} bytes exceeds the {} its header announced",
                            incoming.received, incoming.size
                        ),
                    ));
                }
                incoming.body.push(body);
            }
            None => {
                if self.channels.get(&ch).is_some_and(|c| c.closing) {
                    return Ok(());
                }
                return Err(Closing::connection(
                    code::UNEXPECTED_FRAME,
                    format!("UNEXPECTED_FRAME - content body on channel {ch} without a header"),
                ));
            }
        }
        self.complete_if_received(ch).await
    }

    /// Publishes the channel's incoming message once its body is complete.
    async fn complete_if_received(&mut self, ch: u16) -> Result<(), Closing> {
        let Some(chan) = self.channels.get_mut(&ch) else {
            return Ok(());
        };
        let complete = chan
            .incoming
            .as_ref()
            .is_some_and(|i| i.properties.is_some() && i.received == i.size);
        if !complete {
            return Ok(());
        }
        let Some(incoming) = chan.incoming.take() else {
            return Ok(());
        };
        let body = match incoming.body.len() {
            0 => Bytes::new(),
            1 => incoming.body.into_iter().next().unwrap_or_default(),
            _ => {
                let mut all = BytesMut::with_capacity(usize::try_from(incoming.size).unwrap_or(0));
                for part in &incoming.body {
                    all.extend_from_slice(part);
                }
                all.freeze()
            }
        };
        let message = Message {
            exchange: incoming.exchange,
            routing_key: incoming.routing_key,
            properties: incoming
                .properties
                .as_ref()
                .map(convert::properties)
                .unwrap_or_default(),
            body,
            published_ms: 0,
        };
        if let Err(text) = message.properties.ttl_ms() {
            return Err(Closing::channel(
                code::PRECONDITION_FAILED,
                format!("PRECONDITION_FAILED - {text}"),
            ));
        }
        if let Some(tx) = chan.tx.as_mut() {
            tx.publishes.push((message, incoming.mandatory));
            return Ok(());
        }
        let tag = chan.confirm.then(|| {
            let tag = chan.next_publish_tag;
            chan.next_publish_tag += 1;
            tag
        });
        let stored = match self.messaging.publish(&message) {
            Ok(stored) => stored,
            Err(MessagingError::ExchangeNotFound(x)) => {
                return Err(Closing::channel(
                    code::NOT_FOUND,
                    format!("NOT_FOUND - no exchange '{x}' in vhost '/'"),
                ));
            }
            Err(e) => {
                let report = Stored {
                    channel: ch,
                    tag,
                    mandatory: None,
                    result: Err(e),
                };
                self.on_stored(report);
                return Ok(());
            }
        };
        let pending = Pending {
            channel: ch,
            tag,
            mandatory: incoming.mandatory.then_some(message),
            stored,
        };
        // A full window holds this connection (and its socket) until storage catches up.
        if self.pending_tx.send(pending).await.is_err() {
            return Err(Closing::connection(
                code::INTERNAL_ERROR,
                "INTERNAL_ERROR - the publish confirmer stopped",
            ));
        }
        Ok(())
    }

    /// Reports a stored publish: returned if unroutable and mandatory, confirmed.
    fn on_stored(&mut self, s: Stored) {
        let Some(chan) = self.channels.get(&s.channel).filter(|c| !c.closing) else {
            return;
        };
        let confirm = chan.confirm;
        match &s.result {
            Ok(Routed::Unroutable) => {
                if let Some(message) = &s.mandatory {
                    self.method(
                        s.channel,
                        AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                            reply_code: code::NO_ROUTE,
                            reply_text: "NO_ROUTE".into(),
                            exchange: message.exchange.as_str().into(),
                            routing_key: message.routing_key.as_str().into(),
                        })),
                    );
                    self.content(s.channel, message);
                }
            }
            Ok(Routed::Queues(_)) => {}
            Err(e) => tracing::warn!(peer = %self.peer, error = %e, "a publish was not stored"),
        }
        let Some(tag) = s.tag.filter(|_| confirm) else {
            return;
        };
        if s.result.is_ok() {
            if let Some(chan) = self.channels.get_mut(&s.channel) {
                chan.confirm_upto = Some(tag);
            }
        } else {
            self.flush_confirm(s.channel);
            self.method(
                s.channel,
                AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                    delivery_tag: tag,
                    multiple: false,
                    requeue: false,
                })),
            );
        }
    }

    fn flush_confirms(&mut self) {
        let channels: Vec<u16> = self
            .channels
            .iter()
            .filter(|(_, c)| c.confirm_upto.is_some())
            .map(|(ch, _)| *ch)
            .collect();
        for ch in channels {
            self.flush_confirm(ch);
        }
    }

    /// Acks every publish of `ch` confirmed so far in one `multiple` ack: confirms come
    /// in publish order, and every earlier one was acked or nacked already.
    fn flush_confirm(&mut self, ch: u16) {
        let Some(tag) = self
            .channels
            .get_mut(&ch)
            .and_then(|c| c.confirm_upto.take())
        else {
            return;
        };
        self.method(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: tag,
                multiple: true,
            })),
        );
    }

    fn on_feed(&mut self, feed: Feed) {
        match feed {
            Feed::Delivery(d) => self.deliver(d),
            Feed::Cancelled { consumer } => self.cancelled(consumer),
            Feed::TimedOut { owner, timeout_ms } => {
                // The queue gave back what the channel held; it is closed as RabbitMQ does.
                let ch = self
                    .channels
                    .iter()
                    .find(|(_, c)| c.owner == owner && !c.closing)
                    .map(|(ch, _)| *ch);
                if let Some(ch) = ch {
                    let text = format!(
                        "PRECONDITION_FAILED - delivery acknowledgement on channel {ch} timed out. Timeout value used: {timeout_ms} ms. This timeout value can be configured, see consumers doc guide to learn more"
                    );
                    self.close_channel(ch, &Closing::channel(code::PRECONDITION_FAILED, text));
                }
            }
        }
    }

    /// The broker cancelled a consumer: the client hears basic.cancel.
    fn cancelled(&mut self, consumer: u64) {
        let Some(ch) = self.consumers.remove(&consumer) else {
            return;
        };
        let Some(chan) = self.channels.get_mut(&ch).filter(|c| !c.closing) else {
            return;
        };
        let Some(c) = chan.consumers.get_mut(&consumer).filter(|c| !c.cancelled) else {
            return;
        };
        c.cancelled = true;
        let tag = c.tag.clone();
        self.method(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                consumer_tag: tag,
                nowait: true,
            })),
        );
    }

    /// Writes a delivery to its consumer's channel.
    fn deliver(&mut self, d: Delivery) {
        let Some(ch) = self.consumers.get(&d.consumer).copied() else {
            return;
        };
        // The channel is gone: what it held was given back when it closed.
        let Some(chan) = self.channels.get_mut(&ch).filter(|c| !c.closing) else {
            return;
        };
        let Some(consumer) = chan.consumers.get(&d.consumer) else {
            return;
        };
        if consumer.cancelled {
            if !consumer.no_ack {
                consumer.queue.requeue(vec![d.offset]);
            }
            return;
        }
        let tag = chan.next_delivery_tag;
        chan.next_delivery_tag += 1;
        let consumer_tag = consumer.tag.clone();
        if consumer.prefetch == 0 {
            consumer.queue.credit(d.consumer, 1);
        }
        if !consumer.no_ack {
            let queue = consumer.queue.clone();
            chan.unacked.insert(
                tag,
                Unacked {
                    queue,
                    offset: d.offset,
                    consumer: d.consumer,
                },
            );
        }
        self.method(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag,
                delivery_tag: tag,
                redelivered: d.redelivered,
                exchange: d.message.exchange.as_str().into(),
                routing_key: d.message.routing_key.as_str().into(),
            })),
        );
        self.content(ch, &d.message);
    }

    /// A message's content header and body frames.
    fn content(&mut self, ch: u16, message: &Message) {
        self.write(&AMQPFrame::Header(
            ch,
            AMQPContentHeader {
                class_id: 60,
                body_size: message.body.len() as u64,
                properties: convert::basic_properties(&message.properties),
            },
        ));
        frame::write_body(&mut self.out, ch, &message.body, self.frame_max);
    }

    /// Closes channel `ch` for an error: what it holds goes back to its queues.
    fn close_channel(&mut self, ch: u16, c: &Closing) {
        tracing::debug!(peer = %self.peer, channel = ch, code = c.code, text = %c.text, "closing an AMQP channel");
        let Some(chan) = self.channels.get_mut(&ch) else {
            return;
        };
        chan.closing = true;
        chan.incoming = None;
        let consumers = std::mem::take(&mut chan.consumers);
        let unacked = std::mem::take(&mut chan.unacked);
        let owner = chan.owner;
        self.give_back(owner, consumers, unacked);
        self.method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: c.code,
                reply_text: c.text.as_str().into(),
                class_id: c.class_id,
                method_id: c.method_id,
            })),
        );
    }

    /// Closes the connection for an error; waits for the client's close-ok.
    fn close_connection(&mut self, c: &Closing) {
        if self.stage == Stage::Closing {
            return;
        }
        tracing::info!(peer = %self.peer, code = c.code, text = %c.text, "closing an AMQP connection");
        self.release_all();
        self.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: c.code,
                reply_text: c.text.as_str().into(),
                class_id: c.class_id,
                method_id: c.method_id,
            })),
        );
        self.stage = Stage::Closing;
    }

    fn release(&mut self, chan: &Channel) {
        for id in chan.consumers.keys() {
            self.consumers.remove(id);
        }
        let mut queues: HashMap<u64, &QueueHandle> = HashMap::new();
        for (id, consumer) in &chan.consumers {
            consumer.queue.cancel(*id);
            queues.insert(consumer.queue.id(), &consumer.queue);
        }
        for u in chan.unacked.values() {
            queues.insert(u.queue.id(), &u.queue);
        }
        for queue in queues.into_values() {
            queue.release(chan.owner);
        }
    }

    fn give_back(
        &mut self,
        owner: u64,
        consumers: HashMap<u64, Consumer>,
        unacked: BTreeMap<u64, Unacked>,
    ) {
        let chan = Channel {
            owner,
            consumers,
            unacked,
            ..Channel::default()
        };
        self.release(&chan);
    }

    /// Gives back everything every channel holds.
    fn release_all(&mut self) {
        let channels: Vec<Channel> = self.channels.drain().map(|(_, c)| c).collect();
        for chan in &channels {
            self.release(chan);
        }
    }
}

/// How deliveries are settled.
#[derive(Debug, Clone, Copy)]
enum Settle {
    Ack,
    Requeue,
    /// Rejected without requeue: dead-lettered, or dropped.
    Drop,
}

impl Settle {
    fn reject(requeue: bool) -> Self {
        if requeue {
            Settle::Requeue
        } else {
            Settle::Drop
        }
    }
}

/// A messaging error as the channel close RabbitMQ sends for it.
fn channel_error(e: MessagingError) -> Closing {
    match e {
        MessagingError::QueueNotFound(q) => Closing::channel(
            code::NOT_FOUND,
            format!("NOT_FOUND - no queue '{q}' in vhost '/'"),
        ),
        MessagingError::ExchangeNotFound(x) => Closing::channel(
            code::NOT_FOUND,
            format!("NOT_FOUND - no exchange '{x}' in vhost '/'"),
        ),
        MessagingError::PreconditionFailed(text) => Closing::channel(
            code::PRECONDITION_FAILED,
            format!("PRECONDITION_FAILED - {text}"),
        ),
        MessagingError::AccessRefused(text) => {
            Closing::channel(code::ACCESS_REFUSED, format!("ACCESS_REFUSED - {text}"))
        }
        e @ MessagingError::Locked(_) => {
            Closing::channel(code::RESOURCE_LOCKED, format!("RESOURCE_LOCKED - {e}"))
        }
        other => Closing::channel(code::INTERNAL_ERROR, format!("INTERNAL_ERROR - {other}")),
    }
}

/// A server-chosen name: `prefix-` and a value unique to this node and moment.
fn server_named(prefix: &str, id: u64) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}-{nanos:x}{id:x}")
}

/// LOGIN and PASSWORD of an AMQPLAIN response: a field table without its length.
fn amqplain(response: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut table = (response.len() as u32).to_be_bytes().to_vec();
    table.extend_from_slice(response);
    let (_, table) = parse_field_table(&table[..]).ok()?;
    let text = |v: &AMQPValue| match v {
        AMQPValue::LongString(s) => Some(s.as_bytes().to_vec()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes().to_vec()),
        _ => None,
    };
    let get = |k: &str| {
        table
            .inner()
            .iter()
            .find(|(n, _)| n.as_str() == k)
            .and_then(|(_, v)| text(v))
    };
    Some((get("LOGIN")?, get("PASSWORD")?))
}

#[cfg(test)]
mod tests {
    use amq_protocol::types::LongString;

    use super::*;

    #[test]
    fn amqplain_credentials_are_read() {
        let creds =
            amq_protocol::auth::Credentials::new(LongString::from("u"), LongString::from("p"));
        let response = creds.sasl_auth_string(amq_protocol::auth::SASLMechanism::AMQPlain);
        assert_eq!(
            amqplain(response.as_bytes()),
            Some((b"u".to_vec(), b"p".to_vec()))
        );
        assert_eq!(amqplain(b"\x01garbage"), None);
    }
}
