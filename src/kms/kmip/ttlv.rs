//! KMIP's TTLV encoding (Tag, Type, Length, Value; KMIP 1.0 §9.1), for exactly the items
//! fieldcrypt sends and reads.
//!
//! Every item is a 3-byte tag, a 1-byte type, a 4-byte big-endian length and the value, padded
//! with zeros to a multiple of 8 bytes. A structure's value is its items, one after another.
//!
//! [`Writer`] builds requests into a buffer that is wiped on drop (a Register request holds the
//! secret it registers, an Encrypt request the data key). [`parse`] reads a response without
//! copying: byte and text strings borrow from the buffer, which the caller wipes. It checks every
//! length against what is left of its enclosing item, every fixed-size value's length, the
//! nesting depth and UTF-8, so a truncated, oversized or hostile response is an error, never a
//! panic or an out-of-bounds read.

use core::fmt;

use zeroize::Zeroizing;

/// The tags fieldcrypt uses (KMIP 1.0 §9.1.3.1; RandomIV and Data from KMIP 1.2).
pub(crate) mod tag {
    pub(crate) const ATTRIBUTE: u32 = 0x42_0008;
    pub(crate) const ATTRIBUTE_NAME: u32 = 0x42_000A;
    pub(crate) const ATTRIBUTE_VALUE: u32 = 0x42_000B;
    pub(crate) const BATCH_COUNT: u32 = 0x42_000D;
    pub(crate) const BATCH_ITEM: u32 = 0x42_000F;
    pub(crate) const BLOCK_CIPHER_MODE: u32 = 0x42_0011;
    pub(crate) const CRYPTOGRAPHIC_ALGORITHM: u32 = 0x42_0028;
    pub(crate) const CRYPTOGRAPHIC_PARAMETERS: u32 = 0x42_002B;
    pub(crate) const IV_COUNTER_NONCE: u32 = 0x42_003D;
    pub(crate) const KEY_BLOCK: u32 = 0x42_0040;
    pub(crate) const KEY_FORMAT_TYPE: u32 = 0x42_0042;
    pub(crate) const KEY_MATERIAL: u32 = 0x42_0043;
    pub(crate) const KEY_VALUE: u32 = 0x42_0045;
    pub(crate) const OBJECT_TYPE: u32 = 0x42_0057;
    pub(crate) const OPERATION: u32 = 0x42_005C;
    pub(crate) const PADDING_METHOD: u32 = 0x42_005F;
    pub(crate) const PROTOCOL_VERSION: u32 = 0x42_0069;
    pub(crate) const PROTOCOL_VERSION_MAJOR: u32 = 0x42_006A;
    pub(crate) const PROTOCOL_VERSION_MINOR: u32 = 0x42_006B;
    pub(crate) const REQUEST_HEADER: u32 = 0x42_0077;
    pub(crate) const REQUEST_MESSAGE: u32 = 0x42_0078;
    pub(crate) const REQUEST_PAYLOAD: u32 = 0x42_0079;
    pub(crate) const RESPONSE_MESSAGE: u32 = 0x42_007B;
    pub(crate) const RESPONSE_PAYLOAD: u32 = 0x42_007C;
    pub(crate) const RESULT_MESSAGE: u32 = 0x42_007D;
    pub(crate) const RESULT_REASON: u32 = 0x42_007E;
    pub(crate) const RESULT_STATUS: u32 = 0x42_007F;
    pub(crate) const SECRET_DATA: u32 = 0x42_0085;
    pub(crate) const SECRET_DATA_TYPE: u32 = 0x42_0086;
    pub(crate) const TEMPLATE_ATTRIBUTE: u32 = 0x42_0091;
    pub(crate) const UNIQUE_IDENTIFIER: u32 = 0x42_0094;
    pub(crate) const RANDOM_IV: u32 = 0x42_00C5;
    pub(crate) const DATA: u32 = 0x42_00C2;
}

/// Item types (KMIP 1.0 §9.1.1.2).
mod item_type {
    pub(super) const STRUCTURE: u8 = 0x01;
    pub(super) const INTEGER: u8 = 0x02;
    pub(super) const LONG_INTEGER: u8 = 0x03;
    pub(super) const BIG_INTEGER: u8 = 0x04;
    pub(super) const ENUMERATION: u8 = 0x05;
    pub(super) const BOOLEAN: u8 = 0x06;
    pub(super) const TEXT_STRING: u8 = 0x07;
    pub(super) const BYTE_STRING: u8 = 0x08;
    pub(super) const DATE_TIME: u8 = 0x09;
    pub(super) const INTERVAL: u8 = 0x0A;
}

/// The length of an item's header: tag (3), type (1), length (4).
pub(crate) const HEADER_LEN: usize = 8;

/// How deeply structures may nest in a response. A Get response's key material sits at depth 7
/// (message, batch item, payload, secret data, key block, key value, material).
const MAX_DEPTH: usize = 16;

/// What is wrong with a TTLV message. Names positions and tags, never values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TtlvError {
    /// The message ends inside an item.
    Truncated {
        /// Offset of the item that does not fit.
        at: usize,
    },
    /// Bytes after the top-level item.
    Trailing {
        /// How many.
        bytes: usize,
    },
    /// A tag outside KMIP's `0x42xxxx` range.
    Tag {
        /// Offset of the item.
        at: usize,
    },
    /// An unknown item type.
    Type {
        /// Offset of the item.
        at: usize,
        /// The type byte.
        item_type: u8,
    },
    /// A fixed-size value (integer, enumeration, boolean, …) with another length.
    Length {
        /// Offset of the item.
        at: usize,
        /// The length it declares.
        len: u32,
    },
    /// Structures nested deeper than fieldcrypt reads.
    TooDeep,
    /// A text string that is not UTF-8.
    Utf8 {
        /// Offset of the item.
        at: usize,
    },
    /// A value longer than TTLV's 32-bit length can say (a request fieldcrypt was asked to
    /// build, never a response).
    TooLong,
}

impl fmt::Display for TtlvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TtlvError::Truncated { at } => write!(f, "item at byte {at} runs past its end"),
            TtlvError::Trailing { bytes } => write!(f, "{bytes} bytes after the message"),
            TtlvError::Tag { at } => write!(f, "item at byte {at} has a non-KMIP tag"),
            TtlvError::Type { at, item_type } => {
                write!(f, "item at byte {at} has unknown type {item_type:#04x}")
            }
            TtlvError::Length { at, len } => {
                write!(f, "item at byte {at} has length {len}, wrong for its type")
            }
            TtlvError::TooDeep => write!(f, "structures nested more than {MAX_DEPTH} deep"),
            TtlvError::Utf8 { at } => write!(f, "text string at byte {at} is not UTF-8"),
            TtlvError::TooLong => write!(f, "value too long for TTLV"),
        }
    }
}

/// Builds one TTLV message. The buffer is wiped on drop.
pub(crate) struct Writer {
    buf: Zeroizing<Vec<u8>>,
    too_long: bool,
}

impl Writer {
    pub(crate) fn new() -> Self {
        Writer {
            buf: Zeroizing::new(Vec::with_capacity(256)),
            too_long: false,
        }
    }

    fn header(&mut self, tag: u32, item_type: u8, len: usize) {
        let len = u32::try_from(len).unwrap_or_else(|_| {
            self.too_long = true;
            0
        });
        self.buf.extend_from_slice(&tag.to_be_bytes()[1..]);
        self.buf.push(item_type);
        self.buf.extend_from_slice(&len.to_be_bytes());
    }

    /// A structure whose items `items` writes.
    pub(crate) fn structure(&mut self, tag: u32, items: impl FnOnce(&mut Self)) {
        self.header(tag, item_type::STRUCTURE, 0);
        let start = self.buf.len();
        items(self);
        let len = self.buf.len() - start;
        match u32::try_from(len) {
            Ok(len) => self.buf[start - 4..start].copy_from_slice(&len.to_be_bytes()),
            Err(_) => self.too_long = true,
        }
    }

    pub(crate) fn integer(&mut self, tag: u32, value: i32) {
        self.header(tag, item_type::INTEGER, 4);
        self.buf.extend_from_slice(&value.to_be_bytes());
        self.buf.extend_from_slice(&[0; 4]);
    }

    pub(crate) fn enumeration(&mut self, tag: u32, value: u32) {
        self.header(tag, item_type::ENUMERATION, 4);
        self.buf.extend_from_slice(&value.to_be_bytes());
        self.buf.extend_from_slice(&[0; 4]);
    }

    pub(crate) fn boolean(&mut self, tag: u32, value: bool) {
        self.header(tag, item_type::BOOLEAN, 8);
        self.buf.extend_from_slice(&u64::from(value).to_be_bytes());
    }

    pub(crate) fn text(&mut self, tag: u32, value: &str) {
        self.string(tag, item_type::TEXT_STRING, value.as_bytes());
    }

    pub(crate) fn bytes(&mut self, tag: u32, value: &[u8]) {
        self.string(tag, item_type::BYTE_STRING, value);
    }

    fn string(&mut self, tag: u32, item_type: u8, value: &[u8]) {
        self.header(tag, item_type, value.len());
        self.buf.extend_from_slice(value);
        let end = self.buf.len() + padding(value.len());
        self.buf.resize(end, 0);
    }

    /// The message.
    ///
    /// # Errors
    /// [`TtlvError::TooLong`] if a value or structure exceeds 4 GiB.
    pub(crate) fn finish(self) -> Result<Zeroizing<Vec<u8>>, TtlvError> {
        if self.too_long {
            return Err(TtlvError::TooLong);
        }
        Ok(self.buf)
    }
}

/// Zero bytes after a value of `len` bytes, up to the next multiple of 8.
fn padding(len: usize) -> usize {
    (8 - len % 8) % 8
}

/// A decoded item; strings borrow from the message.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Item<'a> {
    pub(crate) tag: u32,
    pub(crate) value: Value<'a>,
}

/// A decoded value.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Value<'a> {
    Structure(Vec<Item<'a>>),
    Integer(i32),
    LongInteger(i64),
    BigInteger(&'a [u8]),
    Enumeration(u32),
    Boolean(bool),
    TextString(&'a str),
    ByteString(&'a [u8]),
    DateTime(i64),
    Interval(u32),
}

// Byte strings can hold key material: Debug names the shape only.
impl fmt::Debug for Item<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#08x}: {:?}", self.tag, self.value)
    }
}

impl fmt::Debug for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Structure(items) => f.debug_list().entries(items).finish(),
            Value::Integer(_) => f.write_str("Integer"),
            Value::LongInteger(_) => f.write_str("LongInteger"),
            Value::BigInteger(b) => write!(f, "BigInteger({} bytes)", b.len()),
            Value::Enumeration(_) => f.write_str("Enumeration"),
            Value::Boolean(_) => f.write_str("Boolean"),
            Value::TextString(s) => write!(f, "TextString({} bytes)", s.len()),
            Value::ByteString(b) => write!(f, "ByteString({} bytes)", b.len()),
            Value::DateTime(_) => f.write_str("DateTime"),
            Value::Interval(_) => f.write_str("Interval"),
        }
    }
}

impl<'a> Item<'a> {
    /// The first item with `tag` among a structure's items (`None` for other types).
    pub(crate) fn find(&self, tag: u32) -> Option<&Item<'a>> {
        match &self.value {
            Value::Structure(items) => items.iter().find(|i| i.tag == tag),
            _ => None,
        }
    }

    pub(crate) fn as_enumeration(&self) -> Option<u32> {
        match self.value {
            Value::Enumeration(v) => Some(v),
            _ => None,
        }
    }

    #[cfg(test)]
    pub(crate) fn as_integer(&self) -> Option<i32> {
        match self.value {
            Value::Integer(v) => Some(v),
            _ => None,
        }
    }

    pub(crate) fn as_text(&self) -> Option<&'a str> {
        match self.value {
            Value::TextString(v) => Some(v),
            _ => None,
        }
    }

    pub(crate) fn as_bytes(&self) -> Option<&'a [u8]> {
        match self.value {
            Value::ByteString(v) => Some(v),
            _ => None,
        }
    }

    pub(crate) fn is_structure(&self) -> bool {
        matches!(self.value, Value::Structure(_))
    }
}

/// The length of the whole message whose first [`HEADER_LEN`] bytes are `header`: what to read
/// from the connection. `None` unless the header is a structure's.
pub(crate) fn message_len(header: &[u8; HEADER_LEN]) -> Option<(u32, usize)> {
    if header[3] != item_type::STRUCTURE {
        return None;
    }
    let tag = u32::from_be_bytes([0, header[0], header[1], header[2]]);
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    // A structure's length is a multiple of 8 (its items are padded).
    let len = usize::try_from(len).ok().filter(|l| l % 8 == 0)?;
    Some((tag, HEADER_LEN.checked_add(len)?))
}

/// Decodes a message: exactly one item, filling `buf`.
///
/// # Errors
/// A [`TtlvError`] for anything but a well-formed item of `buf.len()` bytes.
pub(crate) fn parse(buf: &[u8]) -> Result<Item<'_>, TtlvError> {
    let mut reader = Reader { buf, pos: 0 };
    let item = reader.item(buf.len(), 0)?;
    match buf.len() - reader.pos {
        0 => Ok(item),
        bytes => Err(TtlvError::Trailing { bytes }),
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Takes `n` bytes, none past `end`.
    fn take(&mut self, n: usize, end: usize, at: usize) -> Result<&'a [u8], TtlvError> {
        let stop = self
            .pos
            .checked_add(n)
            .filter(|&s| s <= end)
            .ok_or(TtlvError::Truncated { at })?;
        let bytes = self
            .buf
            .get(self.pos..stop)
            .ok_or(TtlvError::Truncated { at })?;
        self.pos = stop;
        Ok(bytes)
    }

    /// Reads one item that must end by `end`.
    fn item(&mut self, end: usize, depth: usize) -> Result<Item<'a>, TtlvError> {
        let at = self.pos;
        let header = self.take(HEADER_LEN, end, at)?;
        if header[0] != 0x42 {
            return Err(TtlvError::Tag { at });
        }
        let tag = u32::from_be_bytes([0, header[0], header[1], header[2]]);
        let item_type = header[3];
        let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        let n = usize::try_from(len).map_err(|_| TtlvError::Truncated { at })?;
        let fixed = |want: u32| {
            if len == want {
                Ok(())
            } else {
                Err(TtlvError::Length { at, len })
            }
        };
        let value = match item_type {
            item_type::STRUCTURE => {
                if depth >= MAX_DEPTH {
                    return Err(TtlvError::TooDeep);
                }
                if n % 8 != 0 {
                    return Err(TtlvError::Length { at, len });
                }
                let inner_end = self
                    .pos
                    .checked_add(n)
                    .filter(|&e| e <= end)
                    .ok_or(TtlvError::Truncated { at })?;
                let mut items = Vec::new();
                while self.pos < inner_end {
                    items.push(self.item(inner_end, depth + 1)?);
                }
                Value::Structure(items)
            }
            item_type::INTEGER => {
                fixed(4)?;
                let b = self.take(8, end, at)?;
                Value::Integer(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            }
            item_type::ENUMERATION => {
                fixed(4)?;
                let b = self.take(8, end, at)?;
                Value::Enumeration(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            }
            item_type::INTERVAL => {
                fixed(4)?;
                let b = self.take(8, end, at)?;
                Value::Interval(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            }
            item_type::LONG_INTEGER | item_type::DATE_TIME | item_type::BOOLEAN => {
                fixed(8)?;
                let b = self.take(8, end, at)?;
                let v = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                match item_type {
                    // KMIP 1.0 §9.1.1.4: 0 or 1 only.
                    item_type::BOOLEAN => match v {
                        0 => Value::Boolean(false),
                        1 => Value::Boolean(true),
                        _ => return Err(TtlvError::Length { at, len }),
                    },
                    item_type::LONG_INTEGER => Value::LongInteger(i64::from_be_bytes([
                        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
                    ])),
                    _ => Value::DateTime(i64::from_be_bytes([
                        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
                    ])),
                }
            }
            item_type::BIG_INTEGER => {
                if n % 8 != 0 {
                    return Err(TtlvError::Length { at, len });
                }
                Value::BigInteger(self.take(n, end, at)?)
            }
            item_type::TEXT_STRING | item_type::BYTE_STRING => {
                let padded = n
                    .checked_add(padding(n))
                    .ok_or(TtlvError::Truncated { at })?;
                let bytes = self.take(padded, end, at)?;
                let bytes = &bytes[..n];
                if item_type == item_type::TEXT_STRING {
                    Value::TextString(
                        core::str::from_utf8(bytes).map_err(|_| TtlvError::Utf8 { at })?,
                    )
                } else {
                    Value::ByteString(bytes)
                }
            }
            other => {
                return Err(TtlvError::Type {
                    at,
                    item_type: other,
                })
            }
        };
        Ok(Item { tag, value })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        hex::decode(s).unwrap()
    }

    /// libmongocrypt's Get request (`testdata/libmongocrypt.txt`), written and read here.
    #[test]
    fn writes_and_reads_libmongocrypts_get_request() {
        let uid = "7FJYvnV6XkaUCWuY96bCSc6AuhvkPpqI";
        let mut w = Writer::new();
        w.structure(tag::REQUEST_MESSAGE, |w| {
            w.structure(tag::REQUEST_HEADER, |w| {
                w.structure(tag::PROTOCOL_VERSION, |w| {
                    w.integer(tag::PROTOCOL_VERSION_MAJOR, 1);
                    w.integer(tag::PROTOCOL_VERSION_MINOR, 0);
                });
                w.integer(tag::BATCH_COUNT, 1);
            });
            w.structure(tag::BATCH_ITEM, |w| {
                w.enumeration(tag::OPERATION, 0x0A);
                w.structure(tag::REQUEST_PAYLOAD, |w| {
                    w.text(tag::UNIQUE_IDENTIFIER, uid);
                });
            });
        });
        let bytes = w.finish().unwrap();
        assert_eq!(*bytes, super::super::message::tests::vector("get_request"));
        let item = parse(&bytes).unwrap();
        assert_eq!(item.tag, tag::REQUEST_MESSAGE);
        let batch = item.find(tag::BATCH_ITEM).unwrap();
        assert_eq!(
            batch.find(tag::OPERATION).unwrap().as_enumeration(),
            Some(10)
        );
        let id = batch
            .find(tag::REQUEST_PAYLOAD)
            .unwrap()
            .find(tag::UNIQUE_IDENTIFIER);
        assert_eq!(id.unwrap().as_text(), Some(uid));
        // A one-byte identifier is padded to 8.
        let mut w = Writer::new();
        w.text(tag::UNIQUE_IDENTIFIER, "1");
        assert_eq!(
            *w.finish().unwrap(),
            unhex("42009407 00000001 31000000 00000000")
        );
    }

    #[test]
    fn reads_every_type() {
        let mut w = Writer::new();
        w.structure(tag::RESPONSE_MESSAGE, |w| {
            w.integer(tag::BATCH_COUNT, -2);
            w.enumeration(tag::RESULT_STATUS, 7);
            w.boolean(tag::RANDOM_IV, true);
            w.text(tag::RESULT_MESSAGE, "héllo");
            w.bytes(tag::DATA, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
            w.bytes(tag::IV_COUNTER_NONCE, &[]);
        });
        let mut bytes = w.finish().unwrap().to_vec();
        // Long integer, date-time, interval and big integer, which fieldcrypt never writes.
        let extra = unhex(
            "42000103 00000008 ffffffff fffffffe
             42000209 00000008 00000000 5e0be100
             4200030a 00000004 00000e10 00000000
             42000404 00000008 00000000 000000ff",
        );
        bytes.extend_from_slice(&extra);
        let len = u32::try_from(bytes.len() - HEADER_LEN).unwrap();
        bytes[4..8].copy_from_slice(&len.to_be_bytes());
        let item = parse(&bytes).unwrap();
        let Value::Structure(items) = &item.value else {
            panic!("not a structure")
        };
        let values: Vec<_> = items.iter().map(|i| i.value.clone()).collect();
        assert_eq!(
            values,
            vec![
                Value::Integer(-2),
                Value::Enumeration(7),
                Value::Boolean(true),
                Value::TextString("héllo"),
                Value::ByteString(&[1, 2, 3, 4, 5, 6, 7, 8, 9]),
                Value::ByteString(&[]),
                Value::LongInteger(-2),
                Value::DateTime(0x5e0b_e100),
                Value::Interval(3600),
                Value::BigInteger(&[0, 0, 0, 0, 0, 0, 0, 0xff]),
            ]
        );
        let (t, total) = message_len(bytes[..8].try_into().unwrap()).unwrap();
        assert_eq!((t, total), (tag::RESPONSE_MESSAGE, bytes.len()));
    }

    fn sample() -> Vec<u8> {
        let mut w = Writer::new();
        w.structure(tag::RESPONSE_MESSAGE, |w| {
            w.structure(tag::BATCH_ITEM, |w| {
                w.enumeration(tag::OPERATION, 10);
                w.enumeration(tag::RESULT_STATUS, 0);
                w.structure(tag::RESPONSE_PAYLOAD, |w| {
                    w.text(tag::UNIQUE_IDENTIFIER, "42");
                    w.bytes(tag::KEY_MATERIAL, &[7; 96]);
                });
            });
        });
        w.finish().unwrap().to_vec()
    }

    #[test]
    fn fail_every_truncation() {
        let bytes = sample();
        assert!(parse(&bytes).is_ok());
        for n in 0..bytes.len() {
            assert!(parse(&bytes[..n]).is_err(), "truncated to {n}");
        }
    }

    #[test]
    fn fail_trailing_bytes() {
        let mut bytes = sample();
        bytes.extend_from_slice(&[0; 8]);
        assert_eq!(parse(&bytes), Err(TtlvError::Trailing { bytes: 8 }));
    }

    #[test]
    fn fail_oversized_and_odd_lengths_at_every_item() {
        // Every length field set to values that overrun, underrun or break alignment: always an
        // error or a different well-formed message, never a panic.
        let bytes = sample();
        let mut at = 0;
        let mut headers = Vec::new();
        while at + HEADER_LEN <= bytes.len() {
            headers.push(at);
            let len = u32::from_be_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
            at += HEADER_LEN
                + if bytes[at + 3] == 1 {
                    0
                } else {
                    len + padding(len)
                };
        }
        assert!(headers.len() >= 7);
        for &h in &headers {
            for len in [
                0u32,
                1,
                3,
                4,
                7,
                8,
                9,
                95,
                97,
                0x7fff_fff8,
                0xffff_fff8,
                u32::MAX,
            ] {
                let mut b = bytes.clone();
                b[h + 4..h + 8].copy_from_slice(&len.to_be_bytes());
                let _ = parse(&b);
            }
            for t in 0..=0xffu8 {
                let mut b = bytes.clone();
                b[h + 3] = t;
                let _ = parse(&b);
            }
        }
    }

    #[test]
    fn fail_random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let base = sample();
        for _ in 0..20_000 {
            let mut b = base.clone();
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..b.len());
                b[i] = rng.gen();
            }
            let cut = rng.gen_range(0..=b.len());
            let _ = parse(&b[..cut]);
            let _ = parse(&b);
        }
        for len in 0..64 {
            let b: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let _ = parse(&b);
        }
    }

    #[test]
    fn fail_deep_nesting() {
        // 17 nested structures of zero-length innermost.
        let depth = MAX_DEPTH + 1;
        let mut b = Vec::new();
        for d in 0..depth {
            let inner = (depth - d - 1) * HEADER_LEN;
            b.extend_from_slice(&[0x42, 0x00, 0x78, 0x01]);
            b.extend_from_slice(&u32::try_from(inner).unwrap().to_be_bytes());
        }
        assert_eq!(parse(&b), Err(TtlvError::TooDeep));
        assert!(parse(&b[(2 * HEADER_LEN)..]).is_ok());
    }

    #[test]
    fn fail_bad_values() {
        // A boolean of 2, an integer of length 8, a non-KMIP tag, invalid UTF-8.
        for (bad, want) in [
            (
                "42000606 00000008 00000000 00000002",
                TtlvError::Length { at: 8, len: 8 },
            ),
            (
                "42000d02 00000008 00000000 00000001",
                TtlvError::Length { at: 8, len: 8 },
            ),
            (
                "43000d02 00000004 00000000 00000001",
                TtlvError::Tag { at: 8 },
            ),
            (
                "42007d07 00000002 c328 000000000000",
                TtlvError::Utf8 { at: 8 },
            ),
            (
                "42007d0b 00000000",
                TtlvError::Type {
                    at: 8,
                    item_type: 0x0b,
                },
            ),
        ] {
            let inner = unhex(bad);
            let mut b = vec![0x42, 0x00, 0x7b, 0x01];
            b.extend_from_slice(&u32::try_from(inner.len()).unwrap().to_be_bytes());
            b.extend_from_slice(&inner);
            assert_eq!(parse(&b), Err(want), "{bad}");
        }
    }

    #[test]
    fn debug_shows_no_values() {
        let bytes = sample();
        let item = parse(&bytes).unwrap();
        let debug = format!("{item:?}");
        assert!(debug.contains("ByteString(96 bytes)"), "{debug}");
        assert!(!debug.contains("42\""), "{debug}");
        assert!(!debug.contains("7, 7"), "{debug}");
    }
}
