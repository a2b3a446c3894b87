//! Raw BSON plumbing for the hot path: elements as byte slices, and a writer that builds
//! documents byte by byte. Iteration and validation come from the `bson` crate's `RawIter`;
//! this module only adds the byte offsets it does not expose.

use bson::RawDocument;
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Result};

/// A BSON value as its element type and its own bytes (no type byte, no name).
#[derive(Clone, Copy)]
pub(crate) struct RawValue<'a> {
    pub ty: u8,
    pub bytes: &'a [u8],
}

impl core::fmt::Debug for RawValue<'_> {
    /// Prints the type and length only: the bytes may be plaintext.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "RawValue {{ ty: {:#04x}, len: {} }}",
            self.ty,
            self.bytes.len()
        )
    }
}

/// BSON element type bytes used here.
pub(crate) mod ty {
    pub const DOUBLE: u8 = 0x01;
    pub const STRING: u8 = 0x02;
    pub const DOCUMENT: u8 = 0x03;
    pub const ARRAY: u8 = 0x04;
    pub const BINARY: u8 = 0x05;
    pub const UNDEFINED: u8 = 0x06;
    pub const OBJECT_ID: u8 = 0x07;
    pub const BOOLEAN: u8 = 0x08;
    pub const DATETIME: u8 = 0x09;
    pub const NULL: u8 = 0x0A;
    pub const REGEX: u8 = 0x0B;
    pub const DB_POINTER: u8 = 0x0C;
    pub const JAVASCRIPT: u8 = 0x0D;
    pub const SYMBOL: u8 = 0x0E;
    pub const CODE_WITH_SCOPE: u8 = 0x0F;
    pub const INT32: u8 = 0x10;
    pub const TIMESTAMP: u8 = 0x11;
    pub const INT64: u8 = 0x12;
    pub const DECIMAL128: u8 = 0x13;
    pub const MIN_KEY: u8 = 0xFF;
    pub const MAX_KEY: u8 = 0x7F;
}

/// Whether `t` is a BSON element type.
pub(crate) fn is_value_type(t: u8) -> bool {
    matches!(t, 0x01..=0x13 | ty::MIN_KEY | ty::MAX_KEY)
}

/// One element of a document, as slices of the document's bytes.
#[derive(Clone, Copy)]
pub(crate) struct Element<'a> {
    /// The element's name, as stored: UTF-8 (the iterator checks it), kept as bytes because
    /// the hot paths only compare and copy it. [`Element::key`] gives it as a `str`.
    pub name: &'a [u8],
    pub ty: u8,
    /// The value's own bytes.
    pub value: &'a [u8],
    /// The whole element: type byte, key, value.
    pub raw: &'a [u8],
}

impl core::fmt::Debug for Element<'_> {
    /// Prints the key, type and length only: the value may be plaintext.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "Element {{ key: {:?}, ty: {:#04x}, len: {} }}",
            self.key(),
            self.ty,
            self.value.len()
        )
    }
}

impl<'a> Element<'a> {
    /// The element's name as a `str`. [`elements`] makes elements only of UTF-8 names, so
    /// this never falls back to the empty name it would give otherwise.
    pub(crate) fn key(&self) -> &'a str {
        core::str::from_utf8(self.name).unwrap_or_default()
    }

    pub(crate) fn raw_value(&self) -> RawValue<'a> {
        RawValue {
            ty: self.ty,
            bytes: self.value,
        }
    }

    /// For a Binary element: its subtype and payload (old subtype 2 is returned as stored).
    pub(crate) fn binary(&self) -> Option<(u8, &'a [u8])> {
        (self.ty == ty::BINARY && self.value.len() >= 5).then(|| (self.value[4], &self.value[5..]))
    }

    /// For an embedded document or array: the nested document.
    pub(crate) fn document(&self) -> Result<&'a RawDocument> {
        RawDocument::from_bytes(self.value).map_err(Error::from)
    }
}

/// Iterates over a document's elements with their byte slices.
///
/// This is the hot path's scanner: one pass, bounds-checked, no allocation. It checks the
/// structure (types, lengths, terminators) that it needs to slice elements; nested documents
/// are checked when they are entered. (bson's `RawIter` does the same job but wraps every step
/// in error-context handling that cost about a third of W1's decryption time; see
/// docs/BENCHMARKS.md.)
pub(crate) fn elements(doc: &RawDocument) -> Elements<'_> {
    let bytes = doc.as_bytes();
    Elements {
        bytes,
        pos: 4,
        // `RawDocument` guarantees at least 5 bytes and a trailing NUL.
        end: bytes.len() - 1,
        failed: false,
    }
}

/// The iterator of [`elements`].
pub(crate) struct Elements<'a> {
    bytes: &'a [u8],
    pos: usize,
    end: usize,
    failed: bool,
}

impl<'a> Elements<'a> {
    fn fail(&mut self, why: &'static str) -> Option<Result<Element<'a>>> {
        self.failed = true;
        Some(Err(Error::MalformedBson(why.to_owned())))
    }

    fn len_at(&self, at: usize) -> Option<usize> {
        le_i32(self.bytes.get(at..self.end)?)
    }

    /// Where the element name starting at `from` ends (its NUL), and whether every byte before
    /// it is ASCII. Names are read eight bytes at a time: the scan and the ASCII test were,
    /// byte by byte with `str::from_utf8`, a fifth of W2's instructions (docs/BENCHMARKS.md).
    fn name_end(&self, from: usize) -> Option<(usize, bool)> {
        const LOW: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        let mut high = 0u64;
        let mut at = from;
        while let Some(word) = self.bytes.get(at..self.end).and_then(<[u8]>::first_chunk) {
            let w = u64::from_le_bytes(*word);
            // The lowest bit set marks the first NUL byte exactly (borrows only run upwards).
            let zero = w.wrapping_sub(LOW) & !w & HIGH;
            if zero != 0 {
                let n = zero.trailing_zeros() / 8;
                let before = (1u64 << (n * 8)) - 1;
                high |= w & before & HIGH;
                return Some((at + n as usize, high == 0));
            }
            high |= w & HIGH;
            at += 8;
        }
        let end = self.cstring_end(at)?;
        let tail_ascii = self.bytes[at..end].is_ascii();
        Some((end, high == 0 && tail_ascii))
    }

    fn cstring_end(&self, from: usize) -> Option<usize> {
        self.bytes
            .get(from..self.end)?
            .iter()
            .position(|&b| b == 0)
            .map(|i| from + i)
    }
}

impl<'a> Iterator for Elements<'a> {
    type Item = Result<Element<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.end {
            return None;
        }
        let start = self.pos;
        let t = self.bytes[start];
        let Some((key_end, ascii)) = self.name_end(start + 1) else {
            return self.fail("element name is not terminated");
        };
        let name = &self.bytes[start + 1..key_end];
        // ASCII is UTF-8; only other names need the full check.
        if !ascii && core::str::from_utf8(name).is_err() {
            return self.fail("element name is not UTF-8");
        }
        let v = key_end + 1;
        let len = match t {
            ty::DOUBLE | ty::DATETIME | ty::TIMESTAMP | ty::INT64 => Some(8),
            ty::INT32 => Some(4),
            ty::DECIMAL128 => Some(16),
            ty::OBJECT_ID => Some(12),
            ty::BOOLEAN => Some(1),
            ty::NULL | ty::UNDEFINED | ty::MIN_KEY | ty::MAX_KEY => Some(0),
            ty::STRING | ty::JAVASCRIPT | ty::SYMBOL => {
                self.len_at(v).filter(|&n| n >= 1).map(|n| n + 4)
            }
            ty::DOCUMENT | ty::ARRAY | ty::CODE_WITH_SCOPE => self.len_at(v).filter(|&n| n >= 5),
            ty::BINARY => self.len_at(v).map(|n| n + 5),
            ty::DB_POINTER => self.len_at(v).filter(|&n| n >= 1).map(|n| n + 16),
            ty::REGEX => self
                .cstring_end(v)
                .and_then(|p| self.cstring_end(p + 1))
                .map(|o| o + 1 - v),
            _ => return self.fail("unknown element type"),
        };
        let Some(end) = len
            .and_then(|l| v.checked_add(l))
            .filter(|&e| e <= self.end)
        else {
            return self.fail("element overruns its document");
        };
        self.pos = end;
        Some(Ok(Element {
            name,
            ty: t,
            value: &self.bytes[v..end],
            raw: &self.bytes[start..end],
        }))
    }
}

/// Finds a top-level element by key.
pub(crate) fn find<'a>(doc: &'a RawDocument, key: impl AsRef<[u8]>) -> Result<Option<Element<'a>>> {
    let key = key.as_ref();
    for e in elements(doc) {
        let e = e?;
        if e.name == key {
            return Ok(Some(e));
        }
    }
    Ok(None)
}

fn le_i32(b: &[u8]) -> Option<usize> {
    let n = i32::from_le_bytes(b.get(..4)?.try_into().ok()?);
    usize::try_from(n).ok()
}

fn is_cstring(b: &[u8]) -> bool {
    b.last() == Some(&0) && !b[..b.len() - 1].contains(&0)
}

fn is_string(b: &[u8]) -> bool {
    le_i32(b).is_some_and(|n| n >= 1 && n + 4 == b.len() && b[b.len() - 1] == 0)
}

/// Cheap structural check of a value's bytes for its type, so that decryption always yields
/// a well-formed document (nested documents are checked fully).
pub(crate) fn value_is_well_formed(t: u8, b: &[u8]) -> bool {
    well_formed(t, b, 0)
}

/// Nesting limit of the check (MongoDB allows 100 levels).
const MAX_CHECK_DEPTH: u32 = 128;

fn well_formed(t: u8, b: &[u8], depth: u32) -> bool {
    match t {
        ty::DOUBLE | ty::DATETIME | ty::TIMESTAMP | ty::INT64 => b.len() == 8,
        ty::INT32 => b.len() == 4,
        ty::DECIMAL128 => b.len() == 16,
        ty::OBJECT_ID => b.len() == 12,
        ty::BOOLEAN => b.len() == 1 && b[0] <= 1,
        ty::NULL | ty::UNDEFINED | ty::MIN_KEY | ty::MAX_KEY => b.is_empty(),
        ty::STRING | ty::JAVASCRIPT | ty::SYMBOL => is_string(b),
        ty::BINARY => le_i32(b).is_some_and(|n| n + 5 == b.len()),
        ty::DB_POINTER => b.len() >= 12 && is_string(&b[..b.len() - 12]),
        ty::REGEX => match b.iter().position(|&x| x == 0) {
            Some(i) => is_cstring(&b[i + 1..]),
            None => false,
        },
        ty::DOCUMENT | ty::ARRAY => document_is_well_formed(b, depth + 1),
        ty::CODE_WITH_SCOPE => {
            le_i32(b).is_some_and(|n| n == b.len())
                && b.len() >= 14
                && le_i32(&b[4..]).is_some_and(|sl| {
                    sl + 8 <= b.len()
                        && is_string(&b[4..8 + sl])
                        && document_is_well_formed(&b[8 + sl..], depth + 1)
                })
        }
        _ => false,
    }
}

fn document_is_well_formed(b: &[u8], depth: u32) -> bool {
    if depth > MAX_CHECK_DEPTH {
        return false;
    }
    let Ok(doc) = RawDocument::from_bytes(b) else {
        return false;
    };
    for e in elements(doc) {
        match e {
            Ok(e) if well_formed(e.ty, e.value, depth) => {}
            _ => return false,
        }
    }
    true
}

/// Serializes one BSON value: its element type byte and its own bytes (no name). The buffer is
/// wiped on drop since it may hold plaintext; errors never quote the value (bson's would, e.g.
/// for a regex holding a NUL).
pub(crate) fn encode_value(value: &bson::Bson) -> Result<(u8, Zeroizing<Vec<u8>>)> {
    if let Some(encoded) = encode_scalar(value) {
        return Ok(encoded);
    }
    let mut doc = bson::Document::new();
    doc.insert("v", value.clone());
    let mut bytes = Zeroizing::new(Vec::new());
    doc.to_writer(&mut *bytes)
        .map_err(|_| Error::MalformedBson("the value cannot be encoded as BSON".into()))?;
    // Document layout: int32 length | type | "v\0" | value | 0x00.
    match bytes.get(4..bytes.len().saturating_sub(1)) {
        Some([t, b'v', 0, value @ ..]) => Ok((*t, Zeroizing::new(value.to_vec()))),
        _ => Err(Error::MalformedBson(
            "unexpected serialization of a value".into(),
        )),
    }
}

/// The common scalar types written directly, byte for byte as bson serializes them (single
/// values, such as query ciphertexts, skip building a document); `None` for the rest.
fn encode_scalar(value: &bson::Bson) -> Option<(u8, Zeroizing<Vec<u8>>)> {
    let scalar = Scalar::of(value)?;
    // Exactly the room it needs: a `Zeroizing` vector that grew would leave a copy behind.
    let mut bytes = Zeroizing::new(Vec::with_capacity(scalar.len()));
    scalar.write(&mut bytes);
    Some((scalar.ty, bytes))
}

/// The value bytes of one of the common scalars, read from a [`bson::Bson`] without encoding
/// it anywhere: a fixed head (the number, or a string's length) and, for a string, its text
/// (written with its NUL). The head is a copy of the value: wiped on drop.
pub(crate) struct Scalar<'a> {
    pub ty: u8,
    head: [u8; 12],
    head_len: usize,
    text: Option<&'a [u8]>,
}

impl<'a> Scalar<'a> {
    /// `value` as a scalar; `None` for other types (encode those with [`encode_value`]) and for
    /// strings too long for BSON.
    pub(crate) fn of(value: &'a bson::Bson) -> Option<Self> {
        use bson::Bson;
        let mut head = [0; 12];
        let mut put = |b: &[u8]| {
            head[..b.len()].copy_from_slice(b);
            b.len()
        };
        let (ty, head_len, text) = match value {
            Bson::String(s) => {
                let len = i32::try_from(s.len() + 1).ok()?;
                (ty::STRING, put(&len.to_le_bytes()), Some(s.as_bytes()))
            }
            Bson::Int32(i) => (ty::INT32, put(&i.to_le_bytes()), None),
            Bson::Int64(i) => (ty::INT64, put(&i.to_le_bytes()), None),
            Bson::Double(d) => (ty::DOUBLE, put(&d.to_le_bytes()), None),
            Bson::Boolean(b) => (ty::BOOLEAN, put(&[u8::from(*b)]), None),
            Bson::Null => (ty::NULL, 0, None),
            Bson::DateTime(d) => (ty::DATETIME, put(&d.timestamp_millis().to_le_bytes()), None),
            Bson::ObjectId(o) => (ty::OBJECT_ID, put(&o.bytes()), None),
            _ => return None,
        };
        Some(Scalar {
            ty,
            head,
            head_len,
            text,
        })
    }

    /// The length of the value bytes.
    pub(crate) fn len(&self) -> usize {
        self.head_len + self.text.map_or(0, |t| t.len() + 1)
    }

    /// Appends the value bytes.
    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.head[..self.head_len]);
        if let Some(text) = self.text {
            out.extend_from_slice(text);
            out.push(0);
        }
    }
}

impl Drop for Scalar<'_> {
    fn drop(&mut self) {
        self.head.zeroize();
    }
}

/// The scalars of [`encode_scalar`] read back directly; `None` for other types. Malformed
/// bytes are an error, as bson's parser would make them ([`value_is_well_formed`] decides).
fn decode_scalar(t: u8, value: &[u8]) -> Option<Result<bson::Bson>> {
    use bson::Bson;
    if !matches!(
        t,
        ty::STRING
            | ty::INT32
            | ty::INT64
            | ty::DOUBLE
            | ty::BOOLEAN
            | ty::NULL
            | ty::DATETIME
            | ty::OBJECT_ID
    ) {
        return None;
    }
    let bad = || Error::MalformedBson("the value is not valid BSON".into());
    if !value_is_well_formed(t, value) {
        return Some(Err(bad()));
    }
    // The lengths are checked above: only a string's UTF-8 can still be wrong.
    let le8 = || value.first_chunk::<8>().copied();
    let decoded = match t {
        ty::STRING => core::str::from_utf8(&value[4..value.len() - 1])
            .ok()
            .map(|text| Bson::String(text.to_owned())),
        ty::INT32 => value
            .first_chunk::<4>()
            .map(|b| Bson::Int32(i32::from_le_bytes(*b))),
        ty::INT64 => le8().map(|b| Bson::Int64(i64::from_le_bytes(b))),
        ty::DOUBLE => le8().map(|b| Bson::Double(f64::from_le_bytes(b))),
        ty::BOOLEAN => Some(Bson::Boolean(value == [1])),
        ty::NULL => Some(Bson::Null),
        ty::DATETIME => {
            le8().map(|b| Bson::DateTime(bson::DateTime::from_millis(i64::from_le_bytes(b))))
        }
        _ => value
            .first_chunk::<12>()
            .map(|b| Bson::ObjectId(bson::oid::ObjectId::from_bytes(*b))),
    };
    Some(decoded.ok_or_else(bad))
}

/// Parses the bytes of one BSON value of type `t` into a [`bson::Bson`].
pub(crate) fn decode_value(t: u8, value: &[u8]) -> Result<bson::Bson> {
    if let Some(decoded) = decode_scalar(t, value) {
        return decoded;
    }
    let total = value.len() + 8;
    let len = i32::try_from(total).map_err(|_| Error::MalformedBson("value too large".into()))?;
    let mut doc = Zeroizing::new(Vec::with_capacity(total));
    doc.extend_from_slice(&len.to_le_bytes());
    doc.push(t);
    doc.extend_from_slice(b"v\0");
    doc.extend_from_slice(value);
    doc.push(0);
    // Raw parsing and a structural conversion, not serde: serde would turn an embedded
    // document with a key such as `$date` or `$numberLong` into that extended-JSON type.
    let bad = || Error::MalformedBson("the value is not valid BSON".into());
    let raw = bson::RawDocument::from_bytes(&doc[..])
        .map_err(|_| bad())?
        .get("v")
        .map_err(|_| bad())?
        .ok_or_else(|| Error::MalformedBson("value missing after parsing".into()))?;
    bson::Bson::try_from(raw.to_raw_bson()).map_err(|_| bad())
}

/// Appends an element header: type byte and key.
pub(crate) fn put_key(out: &mut Vec<u8>, t: u8, key: &(impl AsRef<[u8]> + ?Sized)) {
    out.push(t);
    out.extend_from_slice(key.as_ref());
    out.push(0);
}

/// Starts a document (or array, or binary payload) whose length is patched by [`end_len`].
pub(crate) fn begin_len(out: &mut Vec<u8>) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    at
}

/// Ends a document: writes the terminating NUL and patches its length.
pub(crate) fn end_doc(out: &mut Vec<u8>, at: usize) -> Result<()> {
    out.push(0);
    let len = out.len() - at;
    patch_len(out, at, len)
}

/// Starts a Binary value of `subtype`; finish with [`end_binary`].
pub(crate) fn begin_binary(out: &mut Vec<u8>, subtype: u8) -> usize {
    let at = begin_len(out);
    out.push(subtype);
    at
}

/// Ends a Binary value: patches its payload length.
pub(crate) fn end_binary(out: &mut [u8], at: usize) -> Result<()> {
    let len = out.len() - at - 5;
    patch_len(out, at, len)
}

fn patch_len(out: &mut [u8], at: usize, len: usize) -> Result<()> {
    let n = i32::try_from(len).map_err(|_| Error::bson("document larger than 2 GiB"))?;
    out[at..at + 4].copy_from_slice(&n.to_le_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::rawdoc;

    /// The scalar fast paths must give bson's bytes exactly: deterministic ciphertexts and
    /// query values depend on them.
    #[test]
    fn scalar_fast_paths_match_bson_byte_for_byte() {
        use bson::Bson;
        let values = [
            Bson::String(String::new()),
            Bson::String("value 0001".into()),
            Bson::String("nul\0inside and ünïcødé ✓".into()),
            Bson::Int32(i32::MIN),
            Bson::Int32(-1),
            Bson::Int64(i64::MAX),
            Bson::Double(-0.0),
            Bson::Double(f64::NAN),
            Bson::Double(1.5e300),
            Bson::Boolean(true),
            Bson::Boolean(false),
            Bson::Null,
            Bson::DateTime(bson::DateTime::from_millis(-5)),
            Bson::ObjectId(bson::oid::ObjectId::from_bytes([7; 12])),
        ];
        for v in values {
            let (t, fast) = encode_scalar(&v).unwrap();
            let mut doc = bson::Document::new();
            doc.insert("v", v.clone());
            let bytes = bson::to_vec(&doc).unwrap();
            assert_eq!(bytes[4], t, "{v:?}");
            assert_eq!(&bytes[7..bytes.len() - 1], &fast[..], "{v:?}");
            let back = decode_value(t, &fast).unwrap();
            // And bson's own parser reads the same value from the same bytes.
            let parsed: bson::Bson = bson::RawDocument::from_bytes(&bytes)
                .unwrap()
                .get("v")
                .unwrap()
                .unwrap()
                .to_raw_bson()
                .try_into()
                .unwrap();
            match (&parsed, &back) {
                (bson::Bson::Double(a), bson::Bson::Double(b)) => {
                    assert_eq!(a.to_bits(), b.to_bits());
                }
                _ => assert_eq!(parsed, back),
            }
            match (&v, &back) {
                (Bson::Double(a), Bson::Double(b)) => assert_eq!(a.to_bits(), b.to_bits()),
                _ => assert_eq!(back, v),
            }
        }
    }

    #[test]
    fn scalar_decoding_refuses_malformed_bytes() {
        for (t, bytes) in [
            (ty::STRING, &b"\x02\0\0\0a"[..]),      // no terminator
            (ty::STRING, &b"\x03\0\0\0a\0"[..]),    // length past the end
            (ty::STRING, &b"\x02\0\0\0\xff\0"[..]), // not UTF-8
            (ty::INT32, &b"\0\0\0"[..]),
            (ty::INT64, &b"\0\0\0\0"[..]),
            (ty::BOOLEAN, &b"\x02"[..]),
            (ty::NULL, &b"\0"[..]),
            (ty::OBJECT_ID, &[0u8; 11][..]),
        ] {
            assert!(decode_value(t, bytes).is_err(), "{t} {bytes:?}");
        }
    }

    #[test]
    fn elements_expose_exact_slices() {
        let doc = rawdoc! { "a": 1i32, "s": "hi", "d": { "x": true }, "b": bson::Binary { subtype: bson::spec::BinarySubtype::UserDefined(0x8F), bytes: vec![1,2,3] } };
        let els: Vec<_> = elements(&doc).collect::<Result<_>>().unwrap();
        assert_eq!(els.len(), 4);
        assert_eq!(els[0].value, 1i32.to_le_bytes());
        assert_eq!(els[1].value, b"\x03\x00\x00\x00hi\x00");
        assert_eq!(els[3].binary(), Some((0x8F, &[1u8, 2, 3][..])));
        for e in &els {
            assert!(value_is_well_formed(e.ty, e.value), "{}", e.key());
        }
        let total: usize = els.iter().map(|e| e.raw.len()).sum();
        assert_eq!(total + 5, doc.as_bytes().len());
    }

    #[test]
    fn writer_builds_valid_documents() {
        let mut out = Vec::new();
        let at = begin_len(&mut out);
        put_key(&mut out, ty::INT32, "n");
        out.extend_from_slice(&7i32.to_le_bytes());
        put_key(&mut out, ty::BINARY, "b");
        let b = begin_binary(&mut out, 0x8F);
        out.extend_from_slice(b"xyz");
        end_binary(&mut out, b).unwrap();
        end_doc(&mut out, at).unwrap();
        let doc = bson::RawDocumentBuf::from_bytes(out).unwrap();
        assert_eq!(doc.get_i32("n").unwrap(), 7);
        assert_eq!(doc.get_binary("b").unwrap().bytes, b"xyz");
    }

    proptest::proptest! {
        /// The scanner agrees with bson's `RawIter` wherever the latter accepts the bytes, and
        /// never panics on mutated documents.
        #[test]
        fn scanner_agrees_with_bson(flips in proptest::collection::vec((0usize..200, proptest::prelude::any::<u8>()), 0..4)) {
            let doc = rawdoc! {
                "s": "str", "i": 1i32, "l": 2i64, "d": 1.5, "b": true, "n": bson::RawBson::Null,
                "o": bson::oid::ObjectId::from_bytes([1; 12]), "doc": { "x": [1, "y"] },
                "bin": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![1, 2] },
                "re": bson::Regex { pattern: "a".into(), options: "i".into() },
                "dt": bson::DateTime::from_millis(5), "ts": bson::Timestamp { time: 1, increment: 2 },
                "dec": bson::Decimal128::from_bytes([3; 16]), "js": bson::RawBson::JavaScriptCode("f".into()),
            };
            let mut bytes = doc.as_bytes().to_vec();
            for (at, v) in flips {
                let at = 4 + at % (bytes.len() - 5);
                bytes[at] = v;
            }
            if let Ok(d) = RawDocument::from_bytes(&bytes) {
                let ours: Vec<_> = elements(d).collect();
                let theirs: Vec<_> = d.iter_elements().collect();
                if theirs.iter().all(|e| e.is_ok()) && ours.iter().all(|e| e.is_ok()) {
                    proptest::prop_assert_eq!(ours.len(), theirs.len());
                    for (o, t) in ours.iter().zip(&theirs) {
                        let (o, t) = (o.as_ref().unwrap(), t.as_ref().unwrap());
                        proptest::prop_assert_eq!(o.key(), t.key());
                        proptest::prop_assert_eq!(o.value.len(), t.len());
                    }
                }
            }
        }
    }

    /// The eight-bytes-at-a-time name scan gives what a byte-by-byte scan and `str::from_utf8`
    /// give, for names of every length up to three words with an ASCII, a multi-byte UTF-8, an
    /// invalid byte or a missing NUL at every offset.
    #[test]
    fn names_of_every_length_are_read_as_byte_by_byte() {
        fn doc_with(name: &[u8], terminated: bool) -> Vec<u8> {
            let mut d = vec![0; 4];
            d.push(ty::INT32);
            d.extend_from_slice(name);
            if terminated {
                d.push(0);
                d.extend_from_slice(&7i32.to_le_bytes());
            }
            d.push(0);
            let n = i32::try_from(d.len()).unwrap();
            d[..4].copy_from_slice(&n.to_le_bytes());
            d
        }
        let mut cases = 0;
        for len in 0..=24 {
            for at in 0..=len {
                for odd in [
                    &b""[..],
                    "é".as_bytes(),
                    "€".as_bytes(),
                    b"\xff",
                    b"\xc3",
                    b"\x80",
                ] {
                    let mut name: Vec<u8> = (b'a'..=b'z').cycle().take(len).collect();
                    name.splice(at..at, odd.iter().copied());
                    for terminated in [true, false] {
                        let bytes = doc_with(&name, terminated);
                        let doc = RawDocument::from_bytes(&bytes).unwrap();
                        let got: Vec<_> = elements(doc).collect();
                        match (terminated, core::str::from_utf8(&name)) {
                            (true, Ok(key)) => {
                                assert_eq!(got.len(), 1, "{name:?}");
                                let e = got[0].as_ref().unwrap();
                                assert_eq!(
                                    (e.name, e.key(), e.value),
                                    (&name[..], key, &7i32.to_le_bytes()[..])
                                );
                            }
                            (true, Err(_)) => {
                                assert!(
                                    matches!(&got[..], [Err(Error::MalformedBson(why))] if why.contains("not UTF-8")),
                                    "{name:?}: {got:?}"
                                );
                            }
                            (false, _) => {
                                assert!(
                                    matches!(&got[..], [Err(Error::MalformedBson(why))] if why.contains("not terminated")),
                                    "{name:?}: {got:?}"
                                );
                            }
                        }
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, (1..=25).sum::<usize>() * 6 * 2);
    }

    #[test]
    fn fail_malformed_values() {
        assert!(!value_is_well_formed(ty::INT32, &[1, 2, 3]));
        assert!(!value_is_well_formed(ty::STRING, b"\x05\x00\x00\x00hi\x00"));
        assert!(!value_is_well_formed(ty::BOOLEAN, &[2]));
        assert!(!value_is_well_formed(ty::DOCUMENT, &[5, 0, 0, 0, 1]));
        assert!(!value_is_well_formed(0x42, &[]));
    }
}
