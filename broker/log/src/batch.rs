//! Record batches: the unit the log stores, replicates and serves.
//!
//! A batch is one contiguous byte string, validated once and then passed around as
//! `bytes::Bytes` without copying. Layout (little-endian; see `FORMAT.md`):
//!
//! ```text
//!  0 u32 length of the whole batch      28 ..
//!  4 u32 CRC32C of bytes [8, length)     16 u64 base offset
//!  8 u8  version (1)                     24 u64 Raft term
//!  9 u8  attributes (bits 0-2: codec)    32 u64 Raft index slot
//! 10 u16 reserved (0)                    40 i64 first timestamp (ms)
//! 12 u32 record count                    48 i64 max timestamp (ms)
//! 56 records (compressed: u32 raw length, then the codec's block)
//! ```
//!
//! A record: varint body length, then zigzag varint timestamp delta, key (varint length + 1,
//! 0 for none), value (varint length), header count and (key, value) pairs.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::BatchError;
use crate::fsutil::{le_u32 as u32_at, le_u64 as u64_at};

/// Bytes of the fixed batch header.
pub const HEADER_LEN: usize = 56;
/// The batch format version this build writes and reads.
pub const VERSION: u8 = 1;
/// Upper bound of any batch's length, whatever the configuration.
pub const MAX_BATCH_BYTES: u32 = 1 << 30;
/// Attribute bit of a control batch: the log's own entries (Raft blanks and membership
/// changes), which consumers skip.
const CONTROL: u8 = 0x08;

/// How a batch's records section is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Compression {
    /// Stored as is.
    #[default]
    None,
    /// LZ4 block.
    Lz4,
    /// Zstandard frame.
    Zstd,
}

impl Compression {
    fn id(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 1,
            Compression::Zstd => 2,
        }
    }

    fn from_id(id: u8) -> Result<Self, BatchError> {
        match id {
            0 => Ok(Compression::None),
            1 => Ok(Compression::Lz4),
            2 => Ok(Compression::Zstd),
            other => Err(BatchError::UnknownCodec(other)),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// One record as stored: key, value, headers and timestamp, sliced from its batch without copying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record's offset in its partition.
    pub offset: u64,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// Optional key (compaction, routing).
    pub key: Option<Bytes>,
    /// The payload.
    pub value: Bytes,
    /// Application headers, in order.
    pub headers: Vec<(Bytes, Bytes)>,
}

/// A validated record batch.
#[derive(Clone, PartialEq, Eq)]
pub struct RecordBatch {
    bytes: Bytes,
}

impl std::fmt::Debug for RecordBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordBatch")
            .field("base_offset", &self.base_offset())
            .field("records", &self.record_count())
            .field("len", &self.len())
            .field("term", &self.term())
            .finish()
    }
}

/// The length a batch starting at `buf` claims, if its length field is there.
pub(crate) fn peek_len(buf: &[u8]) -> Option<u32> {
    (buf.len() >= 4).then(|| u32_at(buf, 0))
}

impl RecordBatch {
    /// Validates `bytes` as exactly one batch: length, version, codec, checksum.
    pub fn from_bytes(bytes: Bytes) -> Result<Self, BatchError> {
        if bytes.len() < HEADER_LEN {
            return Err(BatchError::Truncated {
                needed: HEADER_LEN,
                available: bytes.len(),
            });
        }
        let len = u32_at(&bytes, 0);
        if (len as usize) < HEADER_LEN || len > MAX_BATCH_BYTES {
            return Err(BatchError::BadLength { len });
        }
        if bytes.len() != len as usize {
            return Err(BatchError::Truncated {
                needed: len as usize,
                available: bytes.len(),
            });
        }
        let stored = u32_at(&bytes, 4);
        let computed = crc32c::crc32c(&bytes[8..]);
        if stored != computed {
            return Err(BatchError::ChecksumMismatch { stored, computed });
        }
        if bytes[8] != VERSION {
            return Err(BatchError::UnsupportedVersion(bytes[8]));
        }
        Compression::from_id(bytes[9] & 0x07)?;
        if u32_at(&bytes, 12) == 0 {
            return Err(BatchError::Empty);
        }
        if u64_at(&bytes, 16)
            .checked_add(u64::from(u32_at(&bytes, 12)))
            .is_none()
        {
            return Err(BatchError::MalformedRecords("offsets run past u64::MAX"));
        }
        Ok(Self { bytes })
    }

    /// Whether this is a control batch (the log's own entry, not messages).
    pub fn is_control(&self) -> bool {
        self.bytes[9] & CONTROL != 0
    }

    /// This batch with its base offset, Raft term and index set and its checksum
    /// recomputed: in place when this is the only handle on its bytes, else in a copy.
    pub fn placed(self, base_offset: u64, term: u64, raft_index: u64) -> Result<Self, BatchError> {
        if (self.base_offset(), self.term(), self.raft_index()) == (base_offset, term, raft_index) {
            return Ok(self);
        }
        if base_offset
            .checked_add(u64::from(self.record_count()))
            .is_none()
        {
            return Err(BatchError::MalformedRecords("offsets run past u64::MAX"));
        }
        let mut buf = self
            .bytes
            .try_into_mut()
            .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
        buf[16..24].copy_from_slice(&base_offset.to_le_bytes());
        buf[24..32].copy_from_slice(&term.to_le_bytes());
        buf[32..40].copy_from_slice(&raft_index.to_le_bytes());
        let crc = crc32c::crc32c(&buf[8..]);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        Ok(Self {
            bytes: buf.freeze(),
        })
    }

    /// Validates the batch at the start of `buf` and returns it with the bytes it spans.
    pub(crate) fn from_prefix(buf: &Bytes) -> Result<Self, BatchError> {
        let len = peek_len(buf).ok_or(BatchError::Truncated {
            needed: 4,
            available: buf.len(),
        })?;
        if (len as usize) < HEADER_LEN || len > MAX_BATCH_BYTES {
            return Err(BatchError::BadLength { len });
        }
        if buf.len() < len as usize {
            return Err(BatchError::Truncated {
                needed: len as usize,
                available: buf.len(),
            });
        }
        Self::from_bytes(buf.slice(..len as usize))
    }

    /// The encoded batch, as stored and sent.
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Bytes of the encoded batch.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never true: a batch has at least a header and one record.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Offset of the first record.
    pub fn base_offset(&self) -> u64 {
        u64_at(&self.bytes, 16)
    }

    /// Number of records.
    pub fn record_count(&self) -> u32 {
        u32_at(&self.bytes, 12)
    }

    /// Offset of the last record.
    pub fn last_offset(&self) -> u64 {
        self.base_offset() + u64::from(self.record_count()) - 1
    }

    /// The offset after this batch.
    pub fn next_offset(&self) -> u64 {
        self.base_offset() + u64::from(self.record_count())
    }

    /// The Raft term that wrote the batch.
    pub fn term(&self) -> u64 {
        u64_at(&self.bytes, 24)
    }

    /// The Raft log index slot of the batch.
    pub fn raft_index(&self) -> u64 {
        u64_at(&self.bytes, 32)
    }

    /// Timestamp of the first record (ms).
    pub fn first_timestamp(&self) -> i64 {
        u64_at(&self.bytes, 40) as i64
    }

    /// Largest record timestamp (ms).
    pub fn max_timestamp(&self) -> i64 {
        u64_at(&self.bytes, 48) as i64
    }

    /// The codec of the records section.
    pub fn compression(&self) -> Compression {
        // Validated in `from_bytes`.
        Compression::from_id(self.bytes[9] & 0x07).unwrap_or_default()
    }

    /// Decodes the records; keys, values and headers slice the batch (or its decompressed copy).
    pub fn records(&self) -> Result<Vec<Record>, BatchError> {
        let section = self.bytes.slice(HEADER_LEN..);
        let raw = match self.compression() {
            Compression::None => section,
            codec => decompress(codec, &section)?,
        };
        decode_records(
            raw,
            self.record_count(),
            self.base_offset(),
            self.first_timestamp(),
        )
    }
}

fn decompress(codec: Compression, section: &[u8]) -> Result<Bytes, BatchError> {
    let err = BatchError::Decompress {
        codec: codec.name(),
    };
    if section.len() < 4 {
        return Err(err);
    }
    let raw_len = u32_at(section, 0);
    if raw_len > MAX_BATCH_BYTES {
        return Err(err);
    }
    let body = &section[4..];
    let out = match codec {
        Compression::None => body.to_vec(),
        Compression::Lz4 => {
            lz4_flex::block::decompress(body, raw_len as usize).map_err(|_| err.clone())?
        }
        Compression::Zstd => {
            zstd::bulk::decompress(body, raw_len as usize).map_err(|_| err.clone())?
        }
    };
    if out.len() != raw_len as usize {
        return Err(err);
    }
    Ok(Bytes::from(out))
}

fn decode_records(
    mut raw: Bytes,
    count: u32,
    base_offset: u64,
    first_ts: i64,
) -> Result<Vec<Record>, BatchError> {
    let mut out = Vec::with_capacity(count.min(4096) as usize);
    for i in 0..count {
        let body_len = varint::take(&mut raw)?;
        let mut body = varint::split(&mut raw, body_len)?;
        let delta = varint::unzigzag(varint::take(&mut body)?);
        let key_len = varint::take(&mut body)?;
        let key = if key_len == 0 {
            None
        } else {
            Some(varint::split(&mut body, key_len - 1)?)
        };
        let value_len = varint::take(&mut body)?;
        let value = varint::split(&mut body, value_len)?;
        let header_count = varint::take(&mut body)?;
        let mut headers = Vec::with_capacity(header_count.min(64) as usize);
        for _ in 0..header_count {
            let k_len = varint::take(&mut body)?;
            let k = varint::split(&mut body, k_len)?;
            let v_len = varint::take(&mut body)?;
            let v = varint::split(&mut body, v_len)?;
            headers.push((k, v));
        }
        if !body.is_empty() {
            return Err(BatchError::MalformedRecords("trailing bytes in a record"));
        }
        out.push(Record {
            offset: base_offset + u64::from(i),
            timestamp: first_ts.wrapping_add(delta),
            key,
            value,
            headers,
        });
    }
    if !raw.is_empty() {
        return Err(BatchError::MalformedRecords(
            "trailing bytes after the last record",
        ));
    }
    Ok(out)
}

/// Builds a batch from records; encoding happens once, here.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    compression: Compression,
    control: bool,
    records: Vec<u8>,
    count: u32,
    first_ts: i64,
    max_ts: i64,
}

impl BatchBuilder {
    /// An empty builder writing uncompressed batches.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the codec of the records section.
    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// Marks the batch as a control batch (the log's own entry, skipped by consumers).
    pub fn control(mut self) -> Self {
        self.control = true;
        self
    }

    /// Number of records pushed so far.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// True before the first push.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends a record.
    pub fn push(
        &mut self,
        timestamp: i64,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&[u8], &[u8])],
    ) {
        if self.count == 0 {
            self.first_ts = timestamp;
            self.max_ts = timestamp;
        }
        self.max_ts = self.max_ts.max(timestamp);
        // Written straight into the records buffer: the body's length prefix comes first,
        // so it is summed up front rather than by encoding into a scratch buffer.
        let delta = varint::zigzag(timestamp.wrapping_sub(self.first_ts));
        let key_tag = key.map_or(0, |k| k.len() as u64 + 1);
        let body_len = varint::len(delta)
            + varint::len(key_tag)
            + key.map_or(0, <[u8]>::len)
            + varint::len(value.len() as u64)
            + value.len()
            + varint::len(headers.len() as u64)
            + headers
                .iter()
                .map(|(k, v)| {
                    varint::len(k.len() as u64) + k.len() + varint::len(v.len() as u64) + v.len()
                })
                .sum::<usize>();
        let out = &mut self.records;
        out.reserve(varint::len(body_len as u64) + body_len);
        varint::put(out, body_len as u64);
        varint::put(out, delta);
        varint::put(out, key_tag);
        if let Some(k) = key {
            out.extend_from_slice(k);
        }
        varint::put(out, value.len() as u64);
        out.extend_from_slice(value);
        varint::put(out, headers.len() as u64);
        for (k, v) in headers {
            varint::put(out, k.len() as u64);
            out.extend_from_slice(k);
            varint::put(out, v.len() as u64);
            out.extend_from_slice(v);
        }
        self.count += 1;
    }

    /// Encodes the batch with its offsets and Raft slot.
    pub fn build(
        &self,
        base_offset: u64,
        term: u64,
        raft_index: u64,
    ) -> Result<RecordBatch, BatchError> {
        if self.count == 0 {
            return Err(BatchError::Empty);
        }
        let section: std::borrow::Cow<'_, [u8]> = match self.compression {
            Compression::None => self.records.as_slice().into(),
            Compression::Lz4 => {
                with_raw_len(&self.records, lz4_flex::block::compress(&self.records)).into()
            }
            Compression::Zstd => {
                let packed = zstd::bulk::compress(&self.records, 3)
                    .map_err(|_| BatchError::Decompress { codec: "zstd" })?;
                with_raw_len(&self.records, packed).into()
            }
        };
        let len = HEADER_LEN + section.len();
        if len > MAX_BATCH_BYTES as usize {
            return Err(BatchError::BadLength {
                len: u32::try_from(len).unwrap_or(u32::MAX),
            });
        }
        let mut buf = BytesMut::with_capacity(len);
        buf.put_u32_le(len as u32);
        buf.put_u32_le(0);
        buf.put_u8(VERSION);
        buf.put_u8(self.compression.id() | if self.control { CONTROL } else { 0 });
        buf.put_u16_le(0);
        buf.put_u32_le(self.count);
        buf.put_u64_le(base_offset);
        buf.put_u64_le(term);
        buf.put_u64_le(raft_index);
        buf.put_i64_le(self.first_ts);
        buf.put_i64_le(self.max_ts);
        buf.put_slice(&section);
        let crc = crc32c::crc32c(&buf[8..]);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        Ok(RecordBatch {
            bytes: buf.freeze(),
        })
    }
}

fn with_raw_len(raw: &[u8], packed: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + packed.len());
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    out.extend_from_slice(&packed);
    out
}

/// LEB128 varints, as in protobuf; small enough not to warrant a dependency.
mod varint {
    use bytes::{Buf, Bytes};

    use crate::error::BatchError;

    pub fn put(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// Bytes `put` writes for `v`.
    pub fn len(v: u64) -> usize {
        (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
    }

    pub fn take(buf: &mut Bytes) -> Result<u64, BatchError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            if !buf.has_remaining() {
                return Err(BatchError::MalformedRecords("varint runs past the end"));
            }
            let b = buf.get_u8();
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(BatchError::MalformedRecords("varint longer than 10 bytes"))
    }

    pub fn split(buf: &mut Bytes, len: u64) -> Result<Bytes, BatchError> {
        if len > buf.len() as u64 {
            return Err(BatchError::MalformedRecords("length runs past the end"));
        }
        Ok(buf.split_to(len as usize))
    }

    pub fn zigzag(v: i64) -> u64 {
        ((v << 1) ^ (v >> 63)) as u64
    }

    pub fn unzigzag(v: u64) -> i64 {
        ((v >> 1) as i64) ^ -((v & 1) as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(compression: Compression) -> RecordBatch {
        let mut b = BatchBuilder::new().compression(compression);
        b.push(1_000, Some(b"k1"), b"hello", &[(b"h", b"v")]);
        b.push(990, None, b"", &[]);
        b.push(1_500, Some(b""), &[7u8; 3000], &[]);
        b.build(42, 3, 17).expect("build")
    }

    #[test]
    fn batches_round_trip_with_every_codec() {
        for codec in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let batch = sample(codec);
            let again = RecordBatch::from_bytes(batch.as_bytes().clone()).expect("valid");
            assert_eq!(again.base_offset(), 42);
            assert_eq!(again.next_offset(), 45);
            assert_eq!((again.term(), again.raft_index()), (3, 17));
            assert_eq!(
                (again.first_timestamp(), again.max_timestamp()),
                (1_000, 1_500)
            );
            assert_eq!(again.compression(), codec);
            let records = again.records().expect("records");
            assert_eq!(records.len(), 3);
            assert_eq!(records[0].key.as_deref(), Some(&b"k1"[..]));
            assert_eq!(
                records[0].headers,
                vec![(Bytes::from_static(b"h"), Bytes::from_static(b"v"))]
            );
            assert_eq!(records[1].key, None);
            assert_eq!(records[1].timestamp, 990);
            assert_eq!(records[2].key.as_deref(), Some(&b""[..]));
            assert_eq!(records[2].offset, 44);
            assert_eq!(records[2].value.len(), 3000);
        }
    }

    #[test]
    fn a_placed_batch_carries_its_new_position_and_a_valid_checksum() {
        let batch = sample(Compression::Lz4);
        let kept = batch.clone();
        // Shared: placed in a copy, the original untouched.
        let placed = batch.placed(1_000, 9, 77).expect("placed");
        assert_eq!(kept.base_offset(), 42);
        let again = RecordBatch::from_bytes(placed.as_bytes().clone()).expect("valid");
        assert_eq!((again.base_offset(), again.next_offset()), (1_000, 1_003));
        assert_eq!((again.term(), again.raft_index()), (9, 77));
        assert_eq!(again.records().expect("records")[2].offset, 1_002);
        // The only handle: placed in place.
        let alone = sample(Compression::None);
        let at = alone.as_bytes().as_ptr();
        let placed = alone.placed(5, 1, 2).expect("placed");
        assert_eq!(placed.as_bytes().as_ptr(), at, "no copy for a sole owner");
        assert!(RecordBatch::from_bytes(placed.as_bytes().clone()).is_ok());
        assert!(
            sample(Compression::None)
                .placed(u64::MAX - 1, 1, 1)
                .is_err()
        );
    }

    #[test]
    fn a_control_batch_says_so_and_a_message_batch_does_not() {
        let mut b = BatchBuilder::new().control();
        b.push(1, None, b"membership", &[]);
        let control = b.build(0, 1, 1).expect("build");
        let again = RecordBatch::from_bytes(control.as_bytes().clone()).expect("valid");
        assert!(again.is_control());
        assert_eq!(again.compression(), Compression::None);
        assert!(!sample(Compression::Zstd).is_control());
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let batch = sample(Compression::None);
        let bytes = batch.as_bytes().to_vec();
        for byte in 0..bytes.len() {
            for bit in 0..8 {
                let mut flipped = bytes.clone();
                flipped[byte] ^= 1 << bit;
                assert!(
                    RecordBatch::from_bytes(Bytes::from(flipped)).is_err(),
                    "flip at byte {byte} bit {bit} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn varint_lengths_match_what_put_writes() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            varint::put(&mut out, v);
            assert_eq!(varint::len(v), out.len(), "{v}");
        }
    }

    #[test]
    fn an_empty_batch_cannot_be_built() {
        assert_eq!(BatchBuilder::new().build(0, 0, 0), Err(BatchError::Empty));
    }

    #[test]
    fn oversized_length_fields_are_rejected_without_allocating() {
        let mut bytes = sample(Compression::None).as_bytes().to_vec();
        bytes[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            RecordBatch::from_bytes(Bytes::from(bytes)),
            Err(BatchError::BadLength { len: u32::MAX })
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = RecordBatch::from_bytes(Bytes::from(data.clone()));
            let _ = decode_records(Bytes::from(data), 3, 0, 0);
        }

        #[test]
        fn records_round_trip(
            records in proptest::collection::vec(
                (any::<i64>(), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
                 proptest::collection::vec(any::<u8>(), 0..200)), 1..20),
            codec in prop_oneof![Just(Compression::None), Just(Compression::Lz4), Just(Compression::Zstd)],
        ) {
            let mut b = BatchBuilder::new().compression(codec);
            for (ts, key, value) in &records {
                b.push(*ts, key.as_deref(), value, &[(b"x", value.as_slice())]);
            }
            let batch = b.build(7, 1, 1).expect("build");
            let decoded = batch.records().expect("decode");
            prop_assert_eq!(decoded.len(), records.len());
            for (d, (ts, key, value)) in decoded.iter().zip(&records) {
                prop_assert_eq!(d.timestamp, *ts);
                prop_assert_eq!(d.key.as_deref(), key.as_deref());
                prop_assert_eq!(&d.value[..], &value[..]);
            }
        }
    }
}
