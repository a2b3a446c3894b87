//! Raw BSON plumbing for the hot path: elements as byte slices, and a writer that builds
//! documents byte by byte. Iteration and validation come from the `bson` crate's `RawIter`;
//! this module only adds the byte offsets it does not expose.

use bson::RawDocument;

use crate::envelope::RawValue;
use crate::error::{Error, Result};

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
#[derive(Clone, Copy, Debug)]
pub(crate) struct Element<'a> {
    pub key: &'a str,
    pub ty: u8,
    /// The value's own bytes.
    pub value: &'a [u8],
    /// The whole element: type byte, key, value.
    pub raw: &'a [u8],
}

impl<'a> Element<'a> {
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
pub(crate) fn elements(doc: &RawDocument) -> impl Iterator<Item = Result<Element<'_>>> {
    let bytes = doc.as_bytes();
    let mut offset = 4usize;
    doc.iter_elements().map(move |item| {
        let e = item?;
        let key = e.key();
        let value_at = offset + 1 + key.len() + 1;
        let end = value_at
            .checked_add(e.len())
            .filter(|&end| end < bytes.len())
            .ok_or_else(|| Error::bson("element overruns its document"))?;
        let el = Element {
            key,
            ty: bytes[offset],
            value: &bytes[value_at..end],
            raw: &bytes[offset..end],
        };
        offset = end;
        Ok(el)
    })
}

/// Finds a top-level element by key.
pub(crate) fn find<'a>(doc: &'a RawDocument, key: &str) -> Result<Option<Element<'a>>> {
    for e in elements(doc) {
        let e = e?;
        if e.key == key {
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
        ty::DOCUMENT | ty::ARRAY => document_is_well_formed(b),
        ty::CODE_WITH_SCOPE => {
            le_i32(b).is_some_and(|n| n == b.len())
                && b.len() >= 14
                && le_i32(&b[4..]).is_some_and(|sl| {
                    sl + 8 <= b.len()
                        && is_string(&b[4..8 + sl])
                        && document_is_well_formed(&b[8 + sl..])
                })
        }
        _ => false,
    }
}

fn document_is_well_formed(b: &[u8]) -> bool {
    let Ok(doc) = RawDocument::from_bytes(b) else {
        return false;
    };
    for e in elements(doc) {
        match e {
            Ok(e) if value_is_well_formed(e.ty, e.value) => {}
            _ => return false,
        }
    }
    true
}

/// Appends an element header: type byte and key.
pub(crate) fn put_key(out: &mut Vec<u8>, t: u8, key: &str) {
    out.push(t);
    out.extend_from_slice(key.as_bytes());
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

    #[test]
    fn elements_expose_exact_slices() {
        let doc = rawdoc! { "a": 1i32, "s": "hi", "d": { "x": true }, "b": bson::Binary { subtype: bson::spec::BinarySubtype::UserDefined(0x8F), bytes: vec![1,2,3] } };
        let els: Vec<_> = elements(&doc).collect::<Result<_>>().unwrap();
        assert_eq!(els.len(), 4);
        assert_eq!(els[0].value, 1i32.to_le_bytes());
        assert_eq!(els[1].value, b"\x03\x00\x00\x00hi\x00");
        assert_eq!(els[3].binary(), Some((0x8F, &[1u8, 2, 3][..])));
        for e in &els {
            assert!(value_is_well_formed(e.ty, e.value), "{}", e.key);
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

    #[test]
    fn fail_malformed_values() {
        assert!(!value_is_well_formed(ty::INT32, &[1, 2, 3]));
        assert!(!value_is_well_formed(ty::STRING, b"\x05\x00\x00\x00hi\x00"));
        assert!(!value_is_well_formed(ty::BOOLEAN, &[2]));
        assert!(!value_is_well_formed(ty::DOCUMENT, &[5, 0, 0, 0, 1]));
        assert!(!value_is_well_formed(0x42, &[]));
    }
}
