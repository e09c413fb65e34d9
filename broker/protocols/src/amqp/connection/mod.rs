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
use petrel_core::meta::GUEST;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

mod channels;
mod consume;
mod publish;

use channels::{channel_error, server_named};
use consume::Settle;

use super::Settings;
use super::convert;
use super::error::{Closing, Scope, code};
use super::frame::{self, FrameError, Inbound, PROTOCOL_HEADER};
use crate::Metrics;
use crate::metrics::Open;

/// Publishes queued for storage per connection before it stops reading its socket.
const PUBLISH_WINDOW: usize = 4096;
/// Deliveries in flight to an unlimited consumer (prefetch 0, or no-ack).
const UNLIMITED_WINDOW: u32 = 1000;
/// How long the handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to answer our connection.close.
pub(super) const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long publishes already taken in may take to be confirmed when the node stops.
pub(super) const STOP_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Serves one client connection until it closes, or until `stop`: then it stops
/// reading, confirms what it took in, and closes with CONNECTION_FORCED as RabbitMQ
/// does when it shuts down (clients reconnect elsewhere; nothing is nacked).
pub async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    messaging: Arc<Messaging>,
    settings: Settings,
    metrics: Metrics,
    stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let (deliveries_tx, deliveries) = mpsc::unbounded_channel();
    let (pending_tx, pending) = mpsc::channel(PUBLISH_WINDOW);
    let (stored_tx, stored) = mpsc::unbounded_channel();
    let confirmer = tokio::spawn(confirmer(pending, stored_tx));
    let mut conn = Connection {
        id: messaging.next_id(),
        messaging,
        user: String::new(),
        vhost: String::new(),
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
        in_flight: 0,
        metrics,
        open: None,
    };
    match conn.serve(stream, deliveries, stored, stop).await {
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
    /// The user logged in.
    user: String,
    /// The virtual host opened: every name the client uses lies in it.
    vhost: String,
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
    /// Publishes handed to the confirmer and not reported back yet.
    in_flight: usize,
    /// The node's counters.
    metrics: Metrics,
    /// Counts this connection as open from its open-ok until it is dropped.
    open: Option<Open>,
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
        mut stop: watch::Receiver<bool>,
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
        // When the node began to stop: nothing more is read until our close is sent.
        let mut stopping: Option<Instant> = None;
        loop {
            // Under a resource alarm a connection that publishes is not read (RabbitMQ's
            // blocking): its client waits instead of the node running out.
            let held = (self.published && alarm.borrow().is_some())
                || (stopping.is_some() && self.stage != Stage::Closing);
            if held {
                last_read = Instant::now();
            }
            tokio::select! {
                // (The guard `wait_for` returns must not live across the loop's awaits.)
                () = async { let _ = stop.wait_for(|s| *s).await; }, if stopping.is_none() => {
                    if self.stage != Stage::Running {
                        return Ok(());
                    }
                    stopping = Some(Instant::now());
                }
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
                    self.in_flight = self.in_flight.saturating_sub(1);
                    self.on_stored(s);
                    while let Ok(s) = stored.try_recv() {
                        self.in_flight = self.in_flight.saturating_sub(1);
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
            // Stopping: once what was taken in is confirmed (or could not be in time),
            // the client is told to go.
            if let Some(since) = stopping
                && self.stage == Stage::Running
                && (self.in_flight == 0 || since.elapsed() > STOP_CONFIRM_TIMEOUT)
            {
                self.close_connection(&Closing::connection(
                    code::CONNECTION_FORCED,
                    "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'",
                ));
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
            Inbound::Frame(AMQPFrame::Method(0, method)) => match self.on_connection(&method).await
            {
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
    async fn on_connection(
        &mut self,
        method: &AMQPClass,
    ) -> Result<Option<Result<(), Ended>>, Closing> {
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
                self.user = self.authenticate(start).await?;
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
                let vhost = open.virtual_host.as_str();
                if !self.messaging.has_vhost(vhost) {
                    return Err(Closing::connection(
                        code::NOT_ALLOWED,
                        format!("NOT_ALLOWED - vhost '{vhost}' not found"),
                    ));
                }
                if !self.messaging.may_open(&self.user, vhost) {
                    return Err(Closing::connection(
                        code::NOT_ALLOWED,
                        format!(
                            "NOT_ALLOWED - access to vhost '{vhost}' refused for user '{}'",
                            self.user
                        ),
                    ));
                }
                self.vhost = vhost.to_owned();
                self.method(0, AMQPClass::Connection(M::OpenOk(connection::OpenOk {})));
                self.stage = Stage::Running;
                self.open = Some(Open::new(&self.metrics));
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

    /// Checks the client's credentials against the cluster's users; `guest` may log in
    /// from loopback only (as RabbitMQ has it). Answers the user's name.
    async fn authenticate(&self, start: &connection::StartOk) -> Result<String, Closing> {
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
        let Ok(user) = String::from_utf8(user) else {
            tracing::info!(peer = %self.peer, "AMQP login refused: a user name that is not UTF-8");
            return Err(refused());
        };
        if !self.messaging.login(&user, pass).await {
            tracing::info!(peer = %self.peer, user, "AMQP login refused: unknown user or wrong password");
            return Err(refused());
        }
        if user == GUEST && !self.peer.ip().is_loopback() {
            tracing::info!(peer = %self.peer, "AMQP login refused: user 'guest' may only connect from loopback");
            return Err(refused());
        }
        Ok(user)
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
