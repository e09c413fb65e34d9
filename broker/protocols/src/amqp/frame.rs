//! Frames off and onto the wire. Methods and content headers are parsed and written by
//! amq-protocol; a body frame's payload is sliced from the read buffer without a copy.

use amq_protocol::frame::{AMQPFrame, GenError, WriteContext, gen_frame, parse_frame};
use amq_protocol::protocol::constants::{FRAME_BODY, FRAME_END};
use bytes::{Buf, Bytes, BytesMut};

/// The protocol header of AMQP 0-9-1, which a client sends first.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// The smallest frame_max a client may ask for.
pub const MIN_FRAME_MAX: usize = 4096;
/// Type, channel and size.
const HEADER_LEN: usize = 7;

/// A frame as read.
// Returned by value from the read loop, never stored: boxing the frame would add an
// allocation per method frame.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Inbound {
    /// A method, content header or heartbeat frame.
    Frame(AMQPFrame),
    /// A body frame: its channel and payload.
    Body(u16, Bytes),
}

/// Why the bytes are no frame (a connection error, 501 or 502).
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Longer than the negotiated frame-max.
    #[error("frame of {size} bytes is larger than frame_max {max}")]
    TooLarge { size: usize, max: usize },
    /// Not closed by the frame-end octet.
    #[error("frame does not end with 0xCE")]
    BadEnd,
    /// A method or header that does not decode.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Takes the next whole frame off `buf`; `None` until one is there.
pub fn read(buf: &mut BytesMut, frame_max: usize) -> Result<Option<Inbound>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    // frame_max counts the whole frame, header and end octet included.
    if size + HEADER_LEN + 1 > frame_max {
        return Err(FrameError::TooLarge {
            size: size + HEADER_LEN + 1,
            max: frame_max,
        });
    }
    if buf.len() < HEADER_LEN + size + 1 {
        buf.reserve(HEADER_LEN + size + 1 - buf.len());
        return Ok(None);
    }
    if buf[HEADER_LEN + size] != FRAME_END {
        return Err(FrameError::BadEnd);
    }
    if buf[0] == FRAME_BODY {
        let channel = u16::from_be_bytes([buf[1], buf[2]]);
        let mut frame = buf.split_to(HEADER_LEN + size + 1).freeze();
        frame.advance(HEADER_LEN);
        frame.truncate(size);
        return Ok(Some(Inbound::Body(channel, frame)));
    }
    let frame = buf.split_to(HEADER_LEN + size + 1);
    match parse_frame(&frame[..]) {
        Ok((_, frame)) => Ok(Some(Inbound::Frame(frame))),
        Err(e) => Err(FrameError::Malformed(format!("{e:?}"))),
    }
}

/// Appends `frame` to `out`.
pub fn write(out: &mut Vec<u8>, frame: &AMQPFrame) -> Result<(), GenError> {
    let taken = std::mem::take(out);
    let ctx = gen_frame(frame)(WriteContext::from(taken))?;
    *out = ctx.write;
    Ok(())
}

/// Appends `body` to `out` as body frames of at most `frame_max` bytes each.
pub fn write_body(out: &mut Vec<u8>, channel: u16, body: &[u8], frame_max: usize) {
    let room = frame_max.saturating_sub(HEADER_LEN + 1).max(1);
    for chunk in body.chunks(room) {
        out.push(FRAME_BODY);
        out.extend_from_slice(&channel.to_be_bytes());
        out.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
        out.extend_from_slice(chunk);
        out.push(FRAME_END);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_frame_is_sliced_and_split_at_frame_max() {
        let mut out = Vec::new();
        write_body(&mut out, 3, &[7u8; 10], 12);
        let mut buf = BytesMut::from(&out[..]);
        let mut got = Vec::new();
        while let Some(Inbound::Body(ch, b)) = read(&mut buf, 12).expect("valid") {
            assert_eq!(ch, 3);
            got.extend_from_slice(&b);
        }
        assert_eq!(got, vec![7u8; 10]);
    }

    #[test]
    fn oversized_and_unterminated_frames_are_refused() {
        let mut out = Vec::new();
        write_body(&mut out, 1, &[0u8; 100], 4096);
        let mut buf = BytesMut::from(&out[..]);
        assert!(matches!(
            read(&mut buf, 50),
            Err(FrameError::TooLarge { .. })
        ));
        let last = out.len() - 1;
        out[last] = 0;
        let mut buf = BytesMut::from(&out[..]);
        assert!(matches!(read(&mut buf, 4096), Err(FrameError::BadEnd)));
    }

    #[test]
    fn a_partial_frame_waits_for_more() {
        let mut out = Vec::new();
        write_body(&mut out, 1, b"abc", 4096);
        let mut buf = BytesMut::from(&out[..5]);
        assert!(read(&mut buf, 4096).expect("valid").is_none());
    }
}
