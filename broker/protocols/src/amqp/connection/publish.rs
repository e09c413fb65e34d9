//! Publishing: a message assembled from its frames, stored through the core, confirmed
//! (or returned) once stored; and transactions, which hold publishes and acks until commit.

use super::*;

impl Connection {
    /// The tx class: publishes and acknowledgements wait for commit, which stores every
    /// publish before it answers; rollback forgets them.
    pub(super) async fn on_tx(&mut self, ch: u16, m: &tx::AMQPMethod) -> Result<(), Closing> {
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
                    let publishing = match self.messaging.publish(&self.vhost, &message) {
                        Ok(publishing) => publishing,
                        Err(e) => {
                            self.metrics.refused.inc();
                            return Err(channel_error(e));
                        }
                    };
                    stored.push((publishing, mandatory.then_some(message)));
                }
                for (publishing, mandatory) in stored {
                    let result = publishing.await;
                    // A full queue's refusal is no failure of the transaction: the
                    // message is dropped there, as RabbitMQ's `reject-publish` does.
                    if let Err(e) = &result
                        && !matches!(e, MessagingError::Refused(_))
                    {
                        self.metrics.refused.inc();
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

    pub(super) async fn on_header(
        &mut self,
        ch: u16,
        header: AMQPContentHeader,
    ) -> Result<(), Closing> {
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

    pub(super) async fn on_body(&mut self, ch: u16, body: Bytes) -> Result<(), Closing> {
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
    pub(super) async fn complete_if_received(&mut self, ch: u16) -> Result<(), Closing> {
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
        self.metrics.published.inc();
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
        let stored = match self.messaging.publish(&self.vhost, &message) {
            Ok(stored) => stored,
            Err(e @ MessagingError::ExchangeNotFound(_)) => {
                self.metrics.refused.inc();
                return Err(channel_error(e));
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
        self.in_flight += 1;
        Ok(())
    }

    /// Reports a stored publish: returned if unroutable and mandatory, confirmed.
    pub(super) fn on_stored(&mut self, s: Stored) {
        // Counted whether or not its channel is still there to hear of it.
        match &s.result {
            Ok(_) => self.metrics.confirmed.inc(),
            Err(_) => self.metrics.refused.inc(),
        }
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
            Err(MessagingError::Refused(queue)) => {
                tracing::debug!(peer = %self.peer, queue, "a full queue refused a publish");
            }
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

    pub(super) fn flush_confirms(&mut self) {
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
    pub(super) fn flush_confirm(&mut self, ch: u16) {
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
}
