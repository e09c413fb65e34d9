//! Bad input on the AMQP port: each gets RabbitMQ's answer, the offending channel or
//! connection closes, and the broker and every other client go on.
//!
//! Frames are written by hand with amq-protocol's codec, because real clients refuse to
//! send most of these.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use amq_protocol::frame::{AMQPFrame, WriteContext, gen_frame, parse_frame};
use amq_protocol::protocol::{AMQPClass, basic, channel, connection, queue};
use amq_protocol::types::{AMQPValue, FieldTable};
use anyhow::{Context, bail};
use petrel_tests::{PetrelProcess, Serve};

const TIMEOUT: Duration = Duration::from_secs(20);

fn petrel() -> anyhow::Result<PetrelProcess> {
    let mut p = Serve::new()?.start()?;
    p.wait_ready(TIMEOUT)?;
    Ok(p)
}

/// A raw AMQP client: frames out, frames in.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    fn connect(addr: SocketAddr) -> anyhow::Result<Raw> {
        let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        stream.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(Raw {
            stream,
            buf: Vec::new(),
        })
    }

    /// Connects and completes the handshake as guest, on vhost `/`.
    fn open(addr: SocketAddr) -> anyhow::Result<Raw> {
        Raw::open_with(addr, Default::default())
    }

    /// Connects and completes the handshake, telling the broker `client_properties`.
    fn open_with(addr: SocketAddr, client_properties: FieldTable) -> anyhow::Result<Raw> {
        let mut raw = Raw::connect(addr)?;
        raw.stream.write_all(b"AMQP\x00\x00\x09\x01")?;
        raw.expect(|f| {
            matches!(
                f,
                AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(_)))
            )
        })?;
        raw.send(&AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties,
                mechanism: "PLAIN".into(),
                response: "\0guest\0guest".into(),
                locale: "en_US".into(),
            })),
        ))?;
        raw.expect(|f| {
            matches!(
                f,
                AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Tune(_)))
            )
        })?;
        raw.send(&AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 16,
                frame_max: 4096,
                heartbeat: 0,
            })),
        ))?;
        raw.send(&AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        ))?;
        raw.expect(|f| {
            matches!(
                f,
                AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)))
            )
        })?;
        Ok(raw)
    }

    fn send(&mut self, frame: &AMQPFrame) -> anyhow::Result<()> {
        let ctx = gen_frame(frame)(WriteContext::from(Vec::new()))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        self.stream.write_all(&ctx.write)?;
        Ok(())
    }

    fn method(&mut self, channel: u16, method: AMQPClass) -> anyhow::Result<()> {
        self.send(&AMQPFrame::Method(channel, method))
    }

    /// The next frame, or `None` once the broker closed the socket.
    fn next(&mut self, deadline: Instant) -> anyhow::Result<Option<AMQPFrame>> {
        loop {
            if let Ok((rest, frame)) = parse_frame(&self.buf[..]) {
                let used = self.buf.len() - rest.len();
                self.buf.drain(..used);
                return Ok(Some(frame));
            }
            if Instant::now() > deadline {
                bail!("no frame within {TIMEOUT:?}; have {:?}", self.buf);
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Skips frames until one matches `want`.
    fn expect(&mut self, want: impl Fn(&AMQPFrame) -> bool) -> anyhow::Result<AMQPFrame> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.next(deadline)? {
                Some(f) if want(&f) => return Ok(f),
                Some(_) => {}
                None => bail!("the broker closed the connection first"),
            }
        }
    }

    /// Waits for connection.close; answers close-ok; returns its reply code.
    fn connection_closed(&mut self) -> anyhow::Result<u16> {
        let frame = self.expect(|f| {
            matches!(
                f,
                AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(_)))
            )
        })?;
        let AMQPFrame::Method(_, AMQPClass::Connection(connection::AMQPMethod::Close(close))) =
            frame
        else {
            unreachable!("matched above");
        };
        self.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        )?;
        Ok(close.reply_code)
    }

    /// Waits for channel.close on `ch`; returns its reply code.
    fn channel_closed(&mut self, ch: u16) -> anyhow::Result<u16> {
        let frame = self.expect(|f| matches!(f, AMQPFrame::Method(c, AMQPClass::Channel(channel::AMQPMethod::Close(_))) if *c == ch))?;
        let AMQPFrame::Method(_, AMQPClass::Channel(channel::AMQPMethod::Close(close))) = frame
        else {
            unreachable!("matched above");
        };
        self.method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
        )?;
        Ok(close.reply_code)
    }

    fn open_channel(&mut self, ch: u16) -> anyhow::Result<()> {
        self.method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )?;
        self.expect(|f| matches!(f, AMQPFrame::Method(c, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))) if *c == ch))?;
        Ok(())
    }

    /// The broker still answers on this connection: a queue declare gets its ok.
    fn alive(&mut self, ch: u16) -> anyhow::Result<()> {
        self.method(
            ch,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: "still-alive".into(),
                passive: false,
                durable: true,
                exclusive: false,
                auto_delete: false,
                nowait: false,
                arguments: Default::default(),
            })),
        )?;
        self.expect(|f| matches!(f, AMQPFrame::Method(c, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_))) if *c == ch))?;
        Ok(())
    }
}

/// A new client connects, opens a channel and declares a queue.
fn goes_on(petrel: &PetrelProcess) -> anyhow::Result<()> {
    let mut raw = Raw::open(petrel.amqp_addr())?;
    raw.open_channel(1)?;
    raw.alive(1).context("the broker goes on")
}

#[test]
fn a_wrong_protocol_header_gets_the_amqp_header_back_and_a_close() -> anyhow::Result<()> {
    let petrel = petrel()?;
    let mut raw = Raw::connect(petrel.amqp_addr())?;
    raw.stream.write_all(b"GET / HTTP/1.1\r\n\r\n")?;
    let deadline = Instant::now() + TIMEOUT;
    let mut got = Vec::new();
    while Instant::now() < deadline {
        let mut chunk = [0u8; 64];
        match raw.stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    assert_eq!(
        got, b"AMQP\x00\x00\x09\x01",
        "the broker answers with its protocol header, then closes"
    );
    goes_on(&petrel)
}

#[test]
fn wrong_credentials_are_refused_with_403() -> anyhow::Result<()> {
    let petrel = petrel()?;
    let mut raw = Raw::connect(petrel.amqp_addr())?;
    raw.stream.write_all(b"AMQP\x00\x00\x09\x01")?;
    raw.expect(|f| {
        matches!(
            f,
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(_)))
        )
    })?;
    raw.method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: Default::default(),
            mechanism: "PLAIN".into(),
            response: "\0guest\0wrong".into(),
            locale: "en_US".into(),
        })),
    )?;
    assert_eq!(raw.connection_closed()?, 403);
    Ok(())
}

#[test]
fn an_oversized_frame_closes_the_connection_with_501_and_others_go_on() -> anyhow::Result<()> {
    let petrel = petrel()?;
    let mut bystander = Raw::open(petrel.amqp_addr())?;
    bystander.open_channel(1)?;
    let mut raw = Raw::open(petrel.amqp_addr())?;
    raw.open_channel(1)?;
    // A body frame claiming 1 MiB on a connection tuned to 4096-byte frames.
    let mut frame = vec![3u8, 0, 1];
    frame.extend_from_slice(&(1u32 << 20).to_be_bytes());
    frame.extend_from_slice(&[0u8; 64]);
    raw.stream.write_all(&frame)?;
    assert_eq!(raw.connection_closed()?, 501);
    bystander.alive(1).context("another client goes on")
}

#[test]
fn a_method_on_a_closed_channel_closes_the_connection_with_504() -> anyhow::Result<()> {
    let petrel = petrel()?;
    let mut raw = Raw::open(petrel.amqp_addr())?;
    raw.open_channel(1)?;
    raw.method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        })),
    )?;
    raw.expect(|f| {
        matches!(
            f,
            AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)))
        )
    })?;
    raw.method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: 1,
            global: false,
        })),
    )?;
    assert_eq!(raw.connection_closed()?, 504);
    goes_on(&petrel)
}

#[test]
fn unknown_exchange_and_queue_close_the_channel_with_404_and_the_connection_goes_on()
-> anyhow::Result<()> {
    let petrel = petrel()?;
    let mut raw = Raw::open(petrel.amqp_addr())?;
    raw.open_channel(1)?;
    raw.method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "no-such-exchange".into(),
            routing_key: "k".into(),
            mandatory: false,
            immediate: false,
        })),
    )?;
    raw.send(&AMQPFrame::Header(
        1,
        amq_protocol::frame::AMQPContentHeader {
            class_id: 60,
            body_size: 0,
            properties: Default::default(),
        },
    ))?;
    assert_eq!(raw.channel_closed(1)?, 404);
    raw.open_channel(2)?;
    raw.method(
        2,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "no-such-queue".into(),
            passive: true,
            durable: false,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: Default::default(),
        })),
    )?;
    assert_eq!(raw.channel_closed(2)?, 404);
    raw.open_channel(3)?;
    raw.method(
        3,
        AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: 42,
            multiple: false,
        })),
    )?;
    assert_eq!(raw.channel_closed(3)?, 406, "an unknown delivery tag");
    raw.open_channel(4)?;
    raw.alive(4)
        .context("the connection goes on after channel errors")
}

#[test]
fn under_a_disk_alarm_publishers_are_told_they_are_blocked_and_consumers_go_on()
-> anyhow::Result<()> {
    // A free-space limit no disk meets: the alarm is up from the start.
    let mut petrel = Serve::new()?
        .args(["--disk-free-limit-bytes", &u64::MAX.to_string()])
        .start()?;
    petrel.wait_ready(TIMEOUT)?;
    let mut capabilities = FieldTable::default();
    capabilities.insert("connection.blocked".into(), AMQPValue::Boolean(true));
    let mut props = FieldTable::default();
    props.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    let mut raw = Raw::open_with(petrel.amqp_addr(), props)?;
    let blocked = raw.expect(|f| {
        matches!(
            f,
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Blocked(_)))
        )
    })?;
    let AMQPFrame::Method(_, AMQPClass::Connection(connection::AMQPMethod::Blocked(b))) = blocked
    else {
        unreachable!("matched above");
    };
    assert!(b.reason.as_str().contains("disk"), "{}", b.reason);
    // A connection that has not published is still served.
    raw.open_channel(1)?;
    raw.alive(1)
}
