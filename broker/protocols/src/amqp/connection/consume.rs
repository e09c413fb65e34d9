//! Consuming: the basic class apart from publishing (consumers, basic.get, acks, nacks
//! and rejects) and the deliveries written to the client.

use super::*;

impl Connection {
    pub(super) async fn on_basic(&mut self, ch: u16, m: &basic::AMQPMethod) -> Result<(), Closing> {
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

    pub(super) async fn consume(&mut self, ch: u16, c: &basic::Consume) -> Result<(), Closing> {
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
                &self.vhost,
                &name,
                id,
                owner,
                self.id,
                self.deliveries_tx.clone(),
                c.no_ack,
                &convert::table(&c.arguments),
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

    pub(super) async fn get(&mut self, ch: u16, g: &basic::Get) -> Result<(), Closing> {
        let Some(owner) = self.channels.get(&ch).map(|c| c.owner) else {
            return Ok(());
        };
        let queue = self.queue_name(ch, &g.queue)?;
        let got = self
            .messaging
            .get(&self.vhost, &queue, owner, g.no_ack, self.id)
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
        self.metrics.delivered.inc();
        if d.redelivered {
            self.metrics.redelivered.inc();
        }
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
    pub(super) fn recover(&mut self, ch: u16, _requeue: bool) {
        let _ = self.settle(ch, 0, true, Settle::Requeue);
    }

    /// An ack, nack or reject: applied now, or at tx.commit in tx mode.
    pub(super) fn acknowledge(
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

    /// Acks, nacks or rejects deliveries up to `tag` (all of them: tag 0, multiple).
    pub(super) fn settle(
        &mut self,
        ch: u16,
        tag: u64,
        multiple: bool,
        how: Settle,
    ) -> Result<(), Closing> {
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
        if matches!(how, Settle::Ack) {
            self.metrics.acknowledged.inc_by(tags.len() as u64);
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

    pub(super) fn on_feed(&mut self, feed: Feed) {
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
    pub(super) fn cancelled(&mut self, consumer: u64) {
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
    pub(super) fn deliver(&mut self, d: Delivery) {
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
        self.metrics.delivered.inc();
        if d.redelivered {
            self.metrics.redelivered.inc();
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
    pub(super) fn content(&mut self, ch: u16, message: &Message) {
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
}

/// How deliveries are settled.
#[derive(Debug, Clone, Copy)]
pub(super) enum Settle {
    Ack,
    Requeue,
    /// Rejected without requeue: dead-lettered, or dropped.
    Drop,
}

impl Settle {
    pub(super) fn reject(requeue: bool) -> Self {
        if requeue {
            Settle::Requeue
        } else {
            Settle::Drop
        }
    }
}
