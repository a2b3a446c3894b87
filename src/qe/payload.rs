//! The stored forms of Queryable Encryption values (BSON binary subtype 6, blob subtypes 14, 15,
//! 16 and 17), their type rules, and decryption in two layers.
//!
//! Layouts, from libmongocrypt `src/mc-fle2-payload-uev-v2-private.h` and
//! `src/mc-fle2-payload-iev-private-v2.h` (integers little-endian):
//!
//! ```text
//! FLE2UnindexedEncryptedValueV2 (16):
//!   u8 blob_subtype = 16 | u8 key_uuid[16] | u8 original_bson_type
//!   | AEAD_AES_256_CBC_HMAC_SHA_256(K, value, AD = blob_subtype || key_uuid || original_bson_type)
//!
//! FLE2IndexedEqualityEncryptedValueV2 (14), …RangeEncryptedValueV2 (15), …TextEncryptedValue (17):
//!   u8 blob_subtype | u8 S_KeyId[16] | u8 original_bson_type
//!   | range: u8 edge_count (≥ 1)
//!   | text:  u32 edge_count, u32 substr_tag_count, u32 suffix_tag_count
//!            (edge_count ≥ substr + suffix + 1)
//!   | ServerEncryptedValue (≥ 17 bytes)
//!   | metadata: 96 bytes × (equality: 1, range and text: edge_count)
//!
//! ServerEncryptedValue = IV || AES-256-CTR(ServerDataEncryptionLevel1Token(S_Key), K_KeyId || CEV)
//! CEV (ClientEncryptedValue) = AEAD_AES_256_CBC_HMAC_SHA_256(K_Key, value, AD = K_KeyId)
//! ```
//!
//! The plaintext is the BSON value's own bytes (no type byte, no name), as in FLE1.
//!
//! What is authenticated: in an unindexed value, everything (the header is the associated
//! data). In an indexed value only `K_KeyId` and the value: the header (blob subtype, `S_KeyId`,
//! the type byte, the counts), the CTR layer and the metadata blocks carry no MAC. Changing
//! `S_KeyId` or the CTR bytes changes the `K_KeyId` that comes out (an unknown key, or a tag
//! that fails) or the CEV (a tag that fails); changing the type byte is not detected by the
//! cryptography, so fieldcrypt accepts only the types each kind can hold (libmongocrypt's
//! `mc_FLE2IndexedEncryptedValueV2_validate`) and checks that the decrypted bytes are a
//! well-formed value of that type — an int64 relabelled as a date still passes both.

use rand::RngCore;
use zeroize::Zeroize;

use super::aead::{QeKey, IV_LEN, MIN_CTR_LEN, MIN_SEALED_LEN};
use super::QeValueKind;
use crate::csfle::type_name;
use crate::error::{Error, Result};
use crate::key::id::KeyId;
use crate::rawbson::value_is_well_formed;

/// Length of the header common to all four forms: blob subtype, key id, original BSON type.
pub(crate) const HEADER_LEN: usize = 18;
/// Length of one metadata block (`FLE2TagAndEncryptedMetadataBlock`).
pub(crate) const METADATA_LEN: usize = 96;
const KEY_ID_LEN: usize = 16;

/// A parsed QE value, borrowing the binary's bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QePayload<'a> {
    /// Which of the four stored forms.
    pub(crate) kind: QeValueKind,
    /// Unindexed: the data key's id. Indexed: `S_KeyId`, the key of the server layer.
    pub(crate) key_id: KeyId,
    /// The original BSON element type byte.
    pub(crate) bson_type: u8,
    /// The 18-byte header (the associated data of an unindexed value).
    header: &'a [u8],
    /// Unindexed: `IV || S || T`. Indexed: `ServerEncryptedValue`.
    body: &'a [u8],
    /// The number of 96-byte metadata blocks (0 for unindexed values).
    #[allow(dead_code)] // read by the tests: the layout's counts, checked against the vectors
    pub(crate) metadata_blocks: u32,
}

/// Parses the bytes of a subtype-6 binary as a stored QE value. Cheap: no allocation, no crypto.
///
/// # Errors
/// [`Error::MalformedCiphertext`] when the bytes are not one of the four stored forms (another
/// blob subtype, too short, impossible counts, a type byte the form never holds);
/// [`Error::UnsupportedType`] when an unindexed value names a value-less type.
pub(crate) fn parse_payload(bytes: &[u8]) -> Result<QePayload<'_>> {
    let Some(kind) = bytes
        .first()
        .copied()
        .and_then(QeValueKind::from_blob_subtype)
    else {
        return Err(Error::MalformedCiphertext(
            "blob subtype is not a stored Queryable Encryption value (14, 15, 16 or 17)",
        ));
    };
    if bytes.len() < HEADER_LEN {
        return Err(Error::MalformedCiphertext(
            "QE value is shorter than its header",
        ));
    }
    let (header, rest) = bytes.split_at(HEADER_LEN);
    let key_id = KeyId::from_slice(&header[1..=KEY_ID_LEN])?;
    let bson_type = header[HEADER_LEN - 1];
    check_stored_type(kind, bson_type)?;
    let (blocks, rest) = match kind {
        QeValueKind::Unindexed => (0u32, rest),
        QeValueKind::Equality => (1, rest),
        QeValueKind::Range => match rest.split_first() {
            Some((0, _)) => {
                return Err(Error::MalformedCiphertext("QE range value has no edges"));
            }
            Some((&n, rest)) => (u32::from(n), rest),
            None => return Err(Error::MalformedCiphertext("QE range value is truncated")),
        },
        QeValueKind::Text => {
            let (counts, rest) = rest
                .split_first_chunk::<12>()
                .ok_or(Error::MalformedCiphertext("QE text value is truncated"))?;
            let [edges, substr, suffix] = [0, 4, 8].map(|i| {
                u32::from_le_bytes([counts[i], counts[i + 1], counts[i + 2], counts[i + 3]])
            });
            if u64::from(edges) < u64::from(substr) + u64::from(suffix) + 1 {
                return Err(Error::MalformedCiphertext(
                    "QE text value has fewer edges than its substring and suffix tags + 1",
                ));
            }
            (edges, rest)
        }
    };
    let body = if kind == QeValueKind::Unindexed {
        if rest.len() < MIN_SEALED_LEN {
            return Err(Error::MalformedCiphertext(
                "QE unindexed value is too short",
            ));
        }
        rest
    } else {
        // A block count whose metadata would not fit in memory cannot be followed by it.
        let sev_len = usize::try_from(blocks)
            .ok()
            .and_then(|b| b.checked_mul(METADATA_LEN))
            .and_then(|metadata| rest.len().checked_sub(metadata))
            .filter(|&l| l >= MIN_CTR_LEN)
            .ok_or(Error::MalformedCiphertext(
                "QE indexed value is shorter than its metadata blocks + 17 bytes",
            ))?;
        &rest[..sev_len]
    };
    Ok(QePayload {
        kind,
        key_id,
        bson_type,
        header,
        body,
        metadata_blocks: blocks,
    })
}

/// The types each stored form can hold: libmongocrypt's `is_fle2_*_supported_type` and
/// `mc_FLE2IndexedEncryptedValueV2_validate`; unindexed values hold any type with a value.
fn check_stored_type(kind: QeValueKind, t: u8) -> Result<()> {
    let Some(name) = type_name(t) else {
        return Err(Error::MalformedCiphertext(
            "QE value names an unknown BSON type",
        ));
    };
    let allowed = match kind {
        QeValueKind::Unindexed => {
            if is_valueless(t) {
                return Err(Error::UnsupportedType {
                    type_name: name,
                    algorithm: QeValueKind::Unindexed.algorithm(),
                });
            }
            true
        }
        // binData, javascript, regex, string, int, long, bool, timestamp, date, objectId,
        // symbol, dbPointer.
        QeValueKind::Equality => matches!(
            t,
            0x05 | 0x0D | 0x0B | 0x02 | 0x10 | 0x12 | 0x08 | 0x11 | 0x09 | 0x07 | 0x0E | 0x0C
        ),
        // int, long, date, double, decimal.
        QeValueKind::Range => matches!(t, 0x10 | 0x12 | 0x09 | 0x01 | 0x13),
        QeValueKind::Text => t == 0x02,
    };
    if allowed {
        Ok(())
    } else {
        Err(Error::MalformedCiphertext(match kind {
            QeValueKind::Equality => "QE equality value names a type equality indexes never hold",
            QeValueKind::Range => "QE range value names a type range indexes never hold",
            _ => "QE text value names a type other than string",
        }))
    }
}

fn is_valueless(t: u8) -> bool {
    matches!(t, 0x06 | 0x0A | 0x7F | 0xFF)
}

/// What the server layer of an indexed value hides: `K_KeyId || CEV`.
pub(crate) struct ServerValue {
    /// `K_KeyId`: the key of the client layer (often the same key as `S_KeyId`).
    pub(crate) key_id: KeyId,
    /// `K_KeyId || ClientEncryptedValue` (wiped on drop, though it is still ciphertext).
    inner: zeroize::Zeroizing<Vec<u8>>,
}

/// Removes the server (CTR) layer of an indexed value with the key `S_KeyId` names.
///
/// # Errors
/// [`Error::MalformedCiphertext`] for an unindexed value or when what comes out is too short
/// to hold `K_KeyId` and a ciphertext.
pub(crate) fn open_server_layer(s_key: &QeKey, p: &QePayload<'_>) -> Result<ServerValue> {
    if p.kind == QeValueKind::Unindexed {
        return Err(Error::MalformedCiphertext(
            "a QE unindexed value has no server layer",
        ));
    }
    let inner = s_key.open_server_layer(p.body)?;
    if inner.len() <= KEY_ID_LEN {
        return Err(Error::MalformedCiphertext(
            "QE server-encrypted value is too short for a key id and a ciphertext",
        ));
    }
    let key_id = KeyId::from_slice(&inner[..KEY_ID_LEN])?;
    Ok(ServerValue { key_id, inner })
}

/// Decrypts the client layer of an indexed value with the key `K_KeyId` names, appending the
/// value's bytes to `out`.
///
/// # Errors
/// As [`open_unindexed`].
pub(crate) fn open_client_value(
    k_key: &QeKey,
    p: &QePayload<'_>,
    sv: &ServerValue,
    out: &mut Vec<u8>,
) -> Result<()> {
    let (k_key_id, cev) = sv.inner.split_at(KEY_ID_LEN);
    let start = out.len();
    k_key.open(k_key_id, cev, out)?;
    check_plaintext(p, out, start)
}

/// Decrypts an unindexed value, appending the value's bytes to `out`. The tag is verified
/// before anything is decrypted; on error `out` is unchanged.
///
/// # Errors
/// [`Error::Decrypt`] when the value does not authenticate under `key` (wrong key, tampering);
/// [`Error::MalformedCiphertext`] for impossible lengths; [`Error::MalformedBson`] when the
/// authenticated plaintext is not a value of the payload's type.
pub(crate) fn open_unindexed(key: &QeKey, p: &QePayload<'_>, out: &mut Vec<u8>) -> Result<()> {
    if p.kind != QeValueKind::Unindexed {
        return Err(Error::MalformedCiphertext(
            "a QE indexed value needs its server layer removed first",
        ));
    }
    let start = out.len();
    key.open(p.header, p.body, out)?;
    check_plaintext(p, out, start)
}

fn check_plaintext(p: &QePayload<'_>, out: &mut Vec<u8>, start: usize) -> Result<()> {
    if value_is_well_formed(p.bson_type, &out[start..]) {
        return Ok(());
    }
    out[start..].zeroize();
    out.truncate(start);
    Err(Error::MalformedBson(format!(
        "decrypted QE value is not a well-formed BSON {}",
        type_name(p.bson_type).unwrap_or("value"),
    )))
}

/// Decrypts any stored QE value, looking keys up by id with `key` (once for an unindexed value
/// or when `S_KeyId` and `K_KeyId` are the same key, twice otherwise) and taking each key's QE
/// cipher with `cipher`. Appends the value's bytes to `out`.
///
/// # Errors
/// What `key` and `cipher` return (unknown, disabled or destroyed keys), and as
/// [`open_unindexed`] and [`open_server_layer`].
pub(crate) fn decrypt_into<K>(
    p: &QePayload<'_>,
    mut key: impl FnMut(KeyId) -> Result<K>,
    cipher: impl Fn(&K) -> Result<&QeKey>,
    out: &mut Vec<u8>,
) -> Result<()> {
    let first = key(p.key_id)?;
    let first_cipher = cipher(&first)?;
    if p.kind == QeValueKind::Unindexed {
        return open_unindexed(first_cipher, p, out);
    }
    let sv = open_server_layer(first_cipher, p)?;
    if sv.key_id == p.key_id {
        return open_client_value(first_cipher, p, &sv, out);
    }
    let second = key(sv.key_id)?;
    open_client_value(cipher(&second)?, p, &sv, out)
}

/// Whether an unindexed value of `bson_type` may be written (`value` is needed for binData's
/// subtype): libmongocrypt refuses null, undefined, minKey, maxKey and binData subtype 6
/// (already encrypted), and nothing else (`tests/fixtures/qe/refused.jsonl`).
///
/// # Errors
/// [`Error::UnsupportedType`] naming the type; [`Error::MalformedBson`] for a type byte that is
/// not a BSON type.
pub(crate) fn check_unindexed_type(bson_type: u8, value: &[u8]) -> Result<()> {
    let Some(name) = type_name(bson_type) else {
        return Err(Error::MalformedBson("unknown BSON element type".into()));
    };
    let algorithm = QeValueKind::Unindexed.algorithm();
    if is_valueless(bson_type) {
        return Err(Error::UnsupportedType {
            type_name: name,
            algorithm,
        });
    }
    if bson_type == 0x05 && value.get(4) == Some(&0x06) {
        return Err(Error::UnsupportedType {
            type_name: "binData subtype 6 (encrypted)",
            algorithm,
        });
    }
    Ok(())
}

/// Encrypts one BSON value (`value` = its bytes without type byte and name) as an unindexed QE
/// value, appending the whole subtype-6 payload to `out`. The IV comes from the thread-local
/// CSPRNG, as libmongocrypt's comes from its own.
///
/// # Errors
/// [`Error::UnsupportedType`] (see [`check_unindexed_type`]), [`Error::MalformedBson`] when
/// `value` is not a value of `bson_type`.
pub(crate) fn encrypt_unindexed(
    key: &QeKey,
    key_id: KeyId,
    bson_type: u8,
    value: &[u8],
    out: &mut Vec<u8>,
) -> Result<()> {
    check_unindexed_type(bson_type, value)?;
    if !value_is_well_formed(bson_type, value) {
        return Err(Error::MalformedBson(format!(
            "value is not a well-formed BSON {}",
            type_name(bson_type).unwrap_or("value")
        )));
    }
    let mut header = [0u8; HEADER_LEN];
    header[0] = QeValueKind::Unindexed.blob_subtype();
    header[1..=KEY_ID_LEN].copy_from_slice(key_id.as_bytes());
    header[HEADER_LEN - 1] = bson_type;
    let mut iv = [0u8; IV_LEN];
    rand::thread_rng().fill_bytes(&mut iv);
    out.extend_from_slice(&header);
    key.seal(&iv, &header, value, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qe::aead::KEY_LEN;
    use crate::rawbson::encode_value;
    use bson::Bson;

    fn key(b: u8) -> QeKey {
        QeKey::new(&[b; KEY_LEN])
    }

    /// An indexed value of `kind` built from the layout: server layer under `s`, client layer
    /// under `k` (whose id is `k_id`), `blocks` zeroed metadata blocks.
    fn indexed(kind: QeValueKind, s: &QeKey, k: &QeKey, k_id: KeyId, t: u8, v: &[u8]) -> Vec<u8> {
        let mut out = vec![kind.blob_subtype()];
        out.extend_from_slice(&[0x12; 16]);
        out.push(t);
        let blocks = match kind {
            QeValueKind::Range => {
                out.push(2);
                2
            }
            QeValueKind::Text => {
                for n in [3u32, 1, 1] {
                    out.extend_from_slice(&n.to_le_bytes());
                }
                3
            }
            _ => 1,
        };
        let mut inner = k_id.as_bytes().to_vec();
        k.seal(&[7; IV_LEN], k_id.as_bytes(), v, &mut inner);
        out.extend_from_slice(&s.seal_server_layer(&[8; IV_LEN], &inner));
        out.resize(out.len() + blocks * METADATA_LEN, 0xAB);
        out
    }

    #[test]
    fn indexed_values_decrypt_through_both_layers() {
        let (s, k) = (key(1), key(2));
        let s_id = KeyId::from_bytes([0x12; 16]);
        let k_id = KeyId::from_bytes([0x34; 16]);
        let (t, v) = encode_value(&Bson::Int32(-7)).unwrap();
        for kind in [QeValueKind::Equality, QeValueKind::Range] {
            let bytes = indexed(kind, &s, &k, k_id, t, &v);
            let p = parse_payload(&bytes).unwrap();
            assert_eq!((p.kind, p.key_id, p.bson_type), (kind, s_id, t));
            let mut asked = Vec::new();
            let mut out = Vec::new();
            decrypt_into(
                &p,
                |id| {
                    asked.push(id);
                    Ok(if id == s_id { &s } else { &k })
                },
                |c| Ok(*c),
                &mut out,
            )
            .unwrap();
            assert_eq!(out[..], v[..]);
            assert_eq!(asked, [s_id, k_id]);
        }
        let (t, v) = encode_value(&Bson::String("text".into())).unwrap();
        let bytes = indexed(QeValueKind::Text, &s, &k, k_id, t, &v);
        let p = parse_payload(&bytes).unwrap();
        assert_eq!(p.metadata_blocks, 3);
        let sv = open_server_layer(&s, &p).unwrap();
        assert_eq!(sv.key_id, k_id);
        let mut out = Vec::new();
        open_client_value(&k, &p, &sv, &mut out).unwrap();
        assert_eq!(out[..], v[..]);
        // The wrong client key: opaque failure, nothing written.
        let mut out = vec![1];
        assert!(matches!(
            open_client_value(&s, &p, &sv, &mut out),
            Err(Error::Decrypt)
        ));
        assert_eq!(out, [1]);
    }

    #[test]
    fn unindexed_round_trips_and_refuses_what_libmongocrypt_refuses() {
        let k = key(3);
        let id = KeyId::from_bytes([5; 16]);
        let (t, v) = encode_value(&Bson::String("hé".into())).unwrap();
        let mut ct = Vec::new();
        encrypt_unindexed(&k, id, t, &v, &mut ct).unwrap();
        let p = parse_payload(&ct).unwrap();
        assert_eq!(
            (p.kind, p.key_id, p.bson_type),
            (QeValueKind::Unindexed, id, t)
        );
        let mut out = Vec::new();
        open_unindexed(&k, &p, &mut out).unwrap();
        assert_eq!(out[..], v[..]);
        assert!(matches!(
            open_server_layer(&k, &p),
            Err(Error::MalformedCiphertext(_))
        ));
        for t in [0x06u8, 0x0A, 0x7F, 0xFF] {
            assert!(matches!(
                encrypt_unindexed(&k, id, t, &[], &mut Vec::new()),
                Err(Error::UnsupportedType { .. })
            ));
        }
        assert!(matches!(
            check_unindexed_type(0x05, &[1, 0, 0, 0, 6, 0]),
            Err(Error::UnsupportedType { .. })
        ));
        assert!(matches!(
            encrypt_unindexed(&k, id, 0x10, &[1, 2], &mut Vec::new()),
            Err(Error::MalformedBson(_))
        ));
    }

    #[test]
    fn fail_parse() {
        let (s, k) = (key(1), key(2));
        let (t, v) = encode_value(&Bson::Int64(9)).unwrap();
        let k_id = KeyId::from_bytes([1; 16]);
        let ok = indexed(QeValueKind::Range, &s, &k, k_id, t, &v);
        let open = |b: &[u8]| {
            let p = parse_payload(b)?;
            let keys = |id: KeyId| Ok(if id == k_id { &k } else { &s });
            decrypt_into(&p, keys, |c| Ok(*c), &mut Vec::new())
        };
        open(&ok).unwrap();
        // A cut in the metadata shortens the server-encrypted value (the layout has no length
        // for it), which then fails; every other cut fails to parse.
        for len in 0..ok.len() {
            assert!(open(&ok[..len]).is_err(), "{len}");
        }
        let mut zero_edges = ok.clone();
        zero_edges[18] = 0;
        assert!(matches!(
            parse_payload(&zero_edges),
            Err(Error::MalformedCiphertext(_))
        ));
        for (kind, bad_type) in [
            (QeValueKind::Range, 0x02u8),
            (QeValueKind::Equality, 0x01),
            (QeValueKind::Text, 0x10),
        ] {
            let mut b = indexed(kind, &s, &k, KeyId::from_bytes([1; 16]), t, &v);
            b[17] = bad_type;
            assert!(matches!(
                parse_payload(&b),
                Err(Error::MalformedCiphertext(_))
            ));
        }
        let mut text = indexed(QeValueKind::Text, &s, &k, KeyId::from_bytes([1; 16]), 2, &v);
        text[22..26].copy_from_slice(&3u32.to_le_bytes()); // substr 3 + suffix 1 + 1 > 3 edges
        assert!(matches!(
            parse_payload(&text),
            Err(Error::MalformedCiphertext(_))
        ));
        text[18..22].copy_from_slice(&u32::MAX.to_le_bytes()); // more blocks than bytes
        assert!(matches!(
            parse_payload(&text),
            Err(Error::MalformedCiphertext(_))
        ));
        for b in [0u8, 1, 2, 11, 13, 18] {
            let mut x = ok.clone();
            x[0] = b;
            assert!(matches!(
                parse_payload(&x),
                Err(Error::MalformedCiphertext(_))
            ));
        }
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use crate::qe::aead::KEY_LEN;
    use proptest::prelude::*;

    proptest! {
        /// Untrusted bytes never panic the parser or either layer, and never decrypt.
        #[test]
        fn arbitrary_bytes_are_rejected_without_panic(
            sub in prop::sample::select(vec![14u8, 15, 16, 17]),
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
        ) {
            let key = QeKey::new(&[0x33; KEY_LEN]);
            let mut b = vec![sub];
            b.extend_from_slice(&bytes);
            if let Ok(p) = parse_payload(&b) {
                let mut out = Vec::new();
                prop_assert!(decrypt_into(&p, |_| Ok(&key), |k| Ok(*k), &mut out).is_err());
                prop_assert!(out.is_empty());
            }
        }
    }
}
