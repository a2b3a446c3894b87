//! The envelope: the stored form of one encrypted value (docs/FORMAT.md is the specification).
//!
//! ```text
//! BSON Binary, subtype 0x8F (user-defined):
//!   0   u8     format version (1)
//!   1   u8     suite id
//!   2   u8     flags: 0x01 namespace bound, 0x02 _id bound, 0x04 owner bound, 0x08 padded
//!   3   u8     BSON element type of the original value
//!   4   [16]   key id (UUID)
//!   20  [n]    nonce (AES-SIV: the synthetic IV)
//!   ..  [*]    ciphertext of the value's own BSON bytes (+ padding)
//!   ..  [t]    tag (none for AES-SIV)
//! associated data = header (bytes 0..20) ‖ path ‖ [namespace] ‖ [_id] ‖ [owner]
//! ```

use zeroize::Zeroize;

use crate::error::{Error, Result};
use crate::key::{Key, KeyId};
use crate::rawbson::{self, RawValue};
use crate::suite::Suite;

/// The BSON Binary subtype of a fieldcrypt envelope (user-defined range). Never 6, which
/// MongoDB's servers and drivers reserve for their own encryption payloads.
pub const ENVELOPE_SUBTYPE: u8 = 0x8F;

/// The current (and only) envelope format version.
pub const FORMAT_VERSION: u8 = 1;

/// Length of the authenticated header.
pub const HEADER_LEN: usize = 20;

/// Header flag bits.
pub(crate) mod flags {
    pub const NAMESPACE: u8 = 0x01;
    pub const ID: u8 = 0x02;
    pub const OWNER: u8 = 0x04;
    pub const PADDED: u8 = 0x08;
    pub const ALL: u8 = NAMESPACE | ID | OWNER | PADDED;
}

/// Where a ciphertext lives; all of it goes into the associated data, so a ciphertext moved
/// anywhere else fails to decrypt.
#[derive(Clone, Copy, Default)]
pub(crate) struct Binding<'a> {
    /// The field path with array indexes left out (`addresses.street`).
    pub path: &'a [u8],
    /// `db.collection`, when known.
    pub namespace: Option<&'a str>,
    /// The document's `_id`, when the field is bound to it.
    pub id: Option<RawValue<'a>>,
    /// The owner field's value, when the collection is owner-scoped.
    pub owner: Option<RawValue<'a>>,
}

impl core::fmt::Debug for Binding<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Binding")
            .field("path", &String::from_utf8_lossy(self.path))
            .field("namespace", &self.namespace)
            .field("id", &self.id)
            .field("owner", &self.owner)
            .finish()
    }
}

impl Binding<'_> {
    fn flags(&self) -> u8 {
        let mut f = 0;
        if self.namespace.is_some() {
            f |= flags::NAMESPACE;
        }
        if self.id.is_some() {
            f |= flags::ID;
        }
        if self.owner.is_some() {
            f |= flags::OWNER;
        }
        f
    }

    /// Writes the associated data for `header` into `ad` (cleared first).
    fn write_ad(&self, header: &[u8; HEADER_LEN], ad: &mut Vec<u8>) -> Result<()> {
        ad.clear();
        let f = header[2];
        put_header(ad, header);
        put_bytes(ad, self.path)?;
        if f & flags::NAMESPACE != 0 {
            // Errors built lazily (see lib.rs): this runs once per value sealed or opened.
            let ns = self.namespace.ok_or_else(|| {
                Error::MissingContext(
                    "the value is bound to a namespace; give the collection namespace",
                )
            })?;
            put_bytes(ad, ns.as_bytes())?;
        }
        if f & flags::ID != 0 {
            let id = self.id.ok_or_else(|| {
                Error::MissingContext("the value is bound to the document _id, which is missing")
            })?;
            ad.push(id.ty);
            put_bytes(ad, id.bytes)?;
        }
        if f & flags::OWNER != 0 {
            let owner = self.owner.ok_or_else(|| {
                Error::MissingContext(
                    "the value is bound to an owner; give the owner field and keep it in the document",
                )
            })?;
            ad.push(owner.ty);
            put_bytes(ad, owner.bytes)?;
        }
        Ok(())
    }
}

/// Appends `header` in the two pieces [`seal_with`] writes it in (the first four bytes, then the
/// key id): one 16-byte copy spanning both stores could not be forwarded from the store buffer
/// and would wait for them to reach the cache (a few nanoseconds per value, measured).
fn put_header(v: &mut Vec<u8>, header: &[u8; HEADER_LEN]) {
    v.extend_from_slice(&header[..4]);
    v.extend_from_slice(&header[4..]);
}

fn put_bytes(ad: &mut Vec<u8>, b: &[u8]) -> Result<()> {
    let len = u32::try_from(b.len()).map_err(|_| Error::TooLong("binding value"))?;
    ad.extend_from_slice(&len.to_le_bytes());
    ad.extend_from_slice(b);
    Ok(())
}

/// A parsed (not yet authenticated) envelope, borrowing its bytes. The flags and the BSON type
/// are read from the header where the input holds them, not kept as copies: a copy stored by
/// `parse` byte by byte and read back with a wider load waits for those stores to reach the
/// cache (a stalled store-forward per value opened; docs/BENCHMARKS.md, "Store forwarding").
#[derive(Clone, Copy, Debug)]
pub(crate) struct Envelope<'a> {
    pub header: &'a [u8; HEADER_LEN],
    pub suite: Suite,
    pub key_id: KeyId,
    pub nonce: &'a [u8],
    pub ciphertext: &'a [u8],
    pub tag: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Parses envelope bytes (the Binary's payload). Checks structure only.
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Self> {
        let Some((header, rest)) = bytes.split_first_chunk::<HEADER_LEN>() else {
            return Err(Error::MalformedCiphertext(
                "envelope shorter than its header",
            ));
        };
        if header[0] != FORMAT_VERSION {
            return Err(Error::MalformedCiphertext("unsupported envelope version"));
        }
        let suite = Suite::from_id(header[1])?;
        if header[2] & !flags::ALL != 0 {
            return Err(Error::MalformedCiphertext("unknown envelope flags"));
        }
        if !rawbson::is_value_type(header[3]) {
            return Err(Error::MalformedCiphertext("invalid BSON type in envelope"));
        }
        let mut id = [0; 16];
        id.copy_from_slice(&header[4..]);
        let key_id = KeyId::from_bytes(id);
        let (n, t) = (suite.nonce_len(), suite.tag_len());
        if rest.len() < n + t {
            return Err(Error::MalformedCiphertext("envelope truncated"));
        }
        let (nonce, rest) = rest.split_at(n);
        let (ciphertext, tag) = rest.split_at(rest.len() - t);
        Ok(Envelope {
            header,
            suite,
            key_id,
            nonce,
            ciphertext,
            tag,
        })
    }

    /// Authenticates and decrypts, appending the value's bytes to `out`; returns its BSON type.
    /// On any failure `out` is left as it was.
    pub(crate) fn open_into(
        &self,
        key: &Key,
        binding: &Binding<'_>,
        ad: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<u8> {
        if key.id() != self.key_id {
            return Err(Error::UnknownKey(self.key_id));
        }
        let secret = key.for_decrypt()?;
        if secret.kind() != crate::key::KeyKind::Fieldcrypt {
            return Err(Error::KeyMisuse {
                id: self.key_id,
                reason: "not a fieldcrypt key",
            });
        }
        binding.write_ad(self.header, ad)?;
        let start = out.len();
        out.extend_from_slice(self.ciphertext);
        let opened = secret.suites().open(
            self.suite,
            secret.material(),
            ad,
            self.nonce,
            &mut out[start..],
            self.tag,
        );
        if let Err(e) = opened {
            out[start..].zeroize();
            out.truncate(start);
            return Err(e);
        }
        let mut end = out.len();
        if self.flags() & flags::PADDED != 0 {
            match unpad(&out[start..]) {
                Some(len) => end = start + len,
                None => {
                    out[start..].zeroize();
                    out.truncate(start);
                    return Err(Error::MalformedCiphertext(
                        "bad padding in authenticated plaintext",
                    ));
                }
            }
        }
        out.truncate(end);
        if !rawbson::value_is_well_formed(self.bson_type(), &out[start..]) {
            out[start..].zeroize();
            out.truncate(start);
            return Err(Error::MalformedCiphertext(
                "decrypted value is not well-formed BSON for its type",
            ));
        }
        Ok(self.bson_type())
    }

    /// The binding and padding flags ([`flags`]), checked by `parse`.
    pub(crate) fn flags(&self) -> u8 {
        self.header[2]
    }

    /// The BSON type of the sealed value, checked by `parse`.
    pub(crate) fn bson_type(&self) -> u8 {
        self.header[3]
    }
}

/// A first capacity for an associated-data buffer that is not reused: the 20-byte header and
/// a path, namespace and `_id` of ordinary lengths fit without growing it.
pub(crate) const AD_CAPACITY: usize = 128;

/// How to encrypt one value.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SealParams {
    pub suite: Suite,
    /// Pad the plaintext to a multiple of this many bytes (length hiding).
    pub pad_to: Option<u32>,
}

/// The secret of a primary fieldcrypt key.
pub(crate) fn encrypting_secret(key: &Key) -> Result<&crate::key::KeySecret> {
    let secret = key.for_encrypt()?;
    if secret.kind() != crate::key::KeyKind::Fieldcrypt {
        return Err(Error::KeyMisuse {
            id: key.id(),
            reason: "not a fieldcrypt key",
        });
    }
    Ok(secret)
}

/// Counts one random-nonce encryption with `key` against the suite's usage limit, if it has
/// one (for a value sealed alone; document walks and explicit values lease instead).
pub(crate) fn count_encryption(key: &Key, suite: Suite) -> Result<()> {
    if let Some(limit) = suite.usage_limit() {
        encrypting_secret(key)?
            .reserve_up_to(1, limit)
            .map_err(|limit| Error::KeyUsageLimit {
                key: key.id(),
                limit,
            })?;
    }
    Ok(())
}

/// The envelope bytes of `value` under `key`, in a buffer of exactly their size, for a caller
/// that has counted the encryption against the key's usage limit ([`count_encryption`], or a
/// lease). The common scalars are encoded straight into the envelope and sealed there: no
/// plaintext copy is made beside it.
pub(crate) fn seal_value(
    key: &Key,
    params: SealParams,
    value: &bson::Bson,
    binding: &Binding<'_>,
    ad: &mut Vec<u8>,
) -> Result<Vec<u8>> {
    if let Some(scalar) = rawbson::Scalar::of(value) {
        let plain = Plain {
            ty: scalar.ty,
            len: scalar.len(),
            write: |out: &mut Vec<u8>| scalar.write(out),
        };
        let mut out = Vec::with_capacity(sealed_len(params, plain.len));
        seal_with(key, params, plain, binding, ad, &mut out)?;
        return Ok(out);
    }
    let (ty, bytes) = rawbson::encode_value(value)?;
    let mut out = Vec::with_capacity(sealed_len(params, bytes.len()));
    let value = RawValue { ty, bytes: &bytes };
    seal_reserved_into(key, params, value, binding, ad, &mut out)?;
    Ok(out)
}

/// Appends the envelope of value bytes already encoded to `out`, for a caller that has
/// already counted this encryption against the key's usage limit (a document walk leases for
/// many values at once).
pub(crate) fn seal_reserved_into(
    key: &Key,
    params: SealParams,
    value: RawValue<'_>,
    binding: &Binding<'_>,
    ad: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<()> {
    let plain = Plain {
        ty: value.ty,
        len: value.bytes.len(),
        write: |out: &mut Vec<u8>| out.extend_from_slice(value.bytes),
    };
    seal_with(key, params, plain, binding, ad, out)
}

/// A plaintext as [`seal_with`] takes it: the value's BSON type, its length, and what appends
/// its bytes.
struct Plain<W> {
    ty: u8,
    len: usize,
    write: W,
}

/// Appends an envelope of `plain`, written in place and sealed there. Room for the whole
/// envelope is reserved first: had `out` grown with the plaintext in it, the allocation it
/// left would keep a copy. On an error `out` is as it was, and the plaintext written is wiped.
fn seal_with(
    key: &Key,
    params: SealParams,
    plain: Plain<impl FnOnce(&mut Vec<u8>)>,
    binding: &Binding<'_>,
    ad: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<()> {
    let secret = encrypting_secret(key)?;
    let suite = params.suite;
    let mut fl = binding.flags();
    if params.pad_to.is_some() {
        fl |= flags::PADDED;
    }
    let mut header = [0; HEADER_LEN];
    // One 4-byte store, not four byte stores: see put_header.
    let prefix = u32::from(FORMAT_VERSION)
        | u32::from(suite.id()) << 8
        | u32::from(fl) << 16
        | u32::from(plain.ty) << 24;
    header[..4].copy_from_slice(&prefix.to_le_bytes());
    header[4..].copy_from_slice(key.id().as_bytes());
    binding.write_ad(&header, ad)?;
    let start = out.len();
    out.reserve(sealed_len(params, plain.len));
    put_header(out, &header);
    let nonce_at = out.len();
    out.resize(nonce_at + suite.nonce_len(), 0);
    let pt_at = out.len();
    (plain.write)(out);
    debug_assert_eq!(
        out.len() - pt_at,
        plain.len,
        "the plaintext has the length given"
    );
    if let Some(bucket) = params.pad_to {
        pad(out, pt_at, bucket as usize);
    }
    let tag_at = out.len();
    out.resize(tag_at + suite.tag_len(), 0);
    let (head, tail) = out[nonce_at..].split_at_mut(pt_at - nonce_at);
    let (body, tag) = tail.split_at_mut(tag_at - pt_at);
    let sealed = secret
        .suites()
        .seal(suite, secret.material(), ad, head, body, tag);
    if sealed.is_err() {
        out[start..].zeroize();
        out.truncate(start);
    }
    sealed
}

/// The length of the envelope of a `len`-byte value.
fn sealed_len(params: SealParams, len: usize) -> usize {
    let body = match params.pad_to {
        Some(bucket) => padded_len(len, bucket as usize),
        None => len,
    };
    HEADER_LEN + params.suite.nonce_len() + body + params.suite.tag_len()
}

/// The length of `len` bytes padded by [`pad`] to a multiple of `bucket`.
fn padded_len(len: usize, bucket: usize) -> usize {
    (len + 1).div_ceil(bucket.max(1)) * bucket.max(1)
}

/// ISO/IEC 7816-4 padding: `0x80` then zeros up to a multiple of `bucket` (at least one byte).
fn pad(out: &mut Vec<u8>, pt_at: usize, bucket: usize) {
    let padded = padded_len(out.len() - pt_at, bucket);
    out.push(0x80);
    out.resize(pt_at + padded, 0);
}

/// The unpadded length, or `None` when the padding is malformed.
fn unpad(b: &[u8]) -> Option<usize> {
    let last = b.iter().rposition(|&x| x != 0)?;
    (b[last] == 0x80).then_some(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_unpad() {
        for bucket in [1usize, 16, 32] {
            for len in 0..70 {
                let mut v = vec![0xAAu8; len];
                pad(&mut v, 0, bucket);
                assert_eq!(v.len() % bucket, 0);
                assert!(v.len() > len);
                assert_eq!(unpad(&v), Some(len));
            }
        }
        assert_eq!(unpad(&[1, 2, 0]), None);
        assert_eq!(unpad(&[]), None);
    }
}
