//! Channel, queue and exchange methods: opening and closing channels, declaring,
//! binding, purging and deleting, as RabbitMQ answers them.

use super::*;

impl Connection {
    pub(super) fn on_channel_class(
        &mut self,
        ch: u16,
        m: &channel::AMQPMethod,
    ) -> Result<(), Closing> {
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

    pub(super) async fn on_queue(&mut self, ch: u16, m: &queue::AMQPMethod) -> Result<(), Closing> {
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
                    .purge_queue(&self.vhost, &queue, self.id)
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
                    .delete_queue(&self.vhost, &queue, d.if_unused, d.if_empty, self.id)
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
    pub(super) async fn bind(
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
                &self.vhost,
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

    /// Binds (or unbinds) an exchange to an exchange.
    async fn bind_exchange(
        &self,
        destination: &ShortString,
        source: &ShortString,
        routing_key: &ShortString,
        arguments: &FieldTable,
        bind: bool,
    ) -> Result<(), Closing> {
        let args = convert::table(arguments);
        self.messaging
            .bind_exchange(
                &self.vhost,
                destination.as_str(),
                source.as_str(),
                routing_key.as_str(),
                &args,
                bind,
            )
            .await
            .map_err(channel_error)
    }

    /// The queue a method names; an empty name is the channel's last declared queue.
    pub(super) fn queue_name(&self, ch: u16, name: &ShortString) -> Result<String, Closing> {
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

    pub(super) async fn on_exchange(
        &mut self,
        ch: u16,
        m: &exchange::AMQPMethod,
    ) -> Result<(), Closing> {
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
                    .declare_exchange(&self.vhost, d.exchange.as_str(), options)
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
                    .delete_exchange(&self.vhost, d.exchange.as_str(), d.if_unused)
                    .await
                    .map_err(channel_error)?;
                if !d.nowait {
                    self.method(ch, AMQPClass::Exchange(M::DeleteOk(exchange::DeleteOk {})));
                }
                Ok(())
            }
            M::Bind(b) => {
                self.bind_exchange(
                    &b.destination,
                    &b.source,
                    &b.routing_key,
                    &b.arguments,
                    true,
                )
                .await?;
                if !b.nowait {
                    self.method(ch, AMQPClass::Exchange(M::BindOk(exchange::BindOk {})));
                }
                Ok(())
            }
            M::Unbind(u) => {
                self.bind_exchange(
                    &u.destination,
                    &u.source,
                    &u.routing_key,
                    &u.arguments,
                    false,
                )
                .await?;
                if !u.nowait {
                    self.method(ch, AMQPClass::Exchange(M::UnbindOk(exchange::UnbindOk {})));
                }
                Ok(())
            }
            other => Err(Closing::connection(
                code::COMMAND_INVALID,
                format!("COMMAND_INVALID - exchange method {other:?} not expected from a client"),
            )),
        }
    }

    pub(super) async fn declare_queue(
        &mut self,
        ch: u16,
        d: &queue::Declare,
    ) -> Result<(), Closing> {
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
            .declare_queue(&self.vhost, &name, options, self.id)
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
}

/// A messaging error as the channel close RabbitMQ sends for it.
pub(super) fn channel_error(e: MessagingError) -> Closing {
    match e {
        e @ (MessagingError::QueueNotFound(_) | MessagingError::ExchangeNotFound(_)) => {
            Closing::channel(code::NOT_FOUND, format!("NOT_FOUND - {e}"))
        }
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
pub(super) fn server_named(prefix: &str, id: u64) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}-{nanos:x}{id:x}")
}
