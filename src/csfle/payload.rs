//! The FLE1 ciphertext payload (BSON binary subtype 6, blob subtypes 1 and 2) and the BSON type
//! rules of each algorithm.
//!
//! Layout, from the spec `source/bson-binary-encrypted/binary-encrypted.md` ("Types 1 and 2:
//! Ciphertext") and libmongocrypt `src/mongocrypt-ciphertext.c`:
//!
//! ```text
//! uint8  blob_subtype;         // 1 = deterministic, 2 = random
//! uint8  key_uuid[16];         // _id of the data key
//! uint8  original_bson_type;   // the BSON element type byte of the plaintext
//! uint8  ciphertext[];         // IV || AES-256-CBC(value bytes) || tag
//! ```
//!
//! The associated data of the AEAD is the 18-byte header itself (blob subtype || key UUID ||
//! original BSON type, `_mongocrypt_ciphertext_serialize_associated_data`), so the type, key id
//! and algorithm are authenticated. The plaintext is the BSON value's own bytes, as they appear
//! in a BSON element after the type byte and the name (`_mongocrypt_buffer_from_iter`).

use zeroize::Zeroize;

use super::aead::{CsfleKey, MIN_SEALED_LEN};
use super::CsfleAlgorithm;
use crate::error::{Error, Result};
// One structural check of decrypted values for both formats.
use crate::key::id::KeyId;
pub(crate) use crate::rawbson::{
    decode_value as value_from_bytes, encode_value as value_to_bytes, value_is_well_formed,
};

/// Length of the header (= associated data): blob subtype, key UUID, original BSON type.
pub(crate) const HEADER_LEN: usize = 18;

/// A parsed FLE1 payload, borrowing the binary's bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CsflePayload<'a> {
    /// Deterministic (blob subtype 1) or random (2).
    #[allow(dead_code)] // read by the document transform and the tests
    pub(crate) algorithm: CsfleAlgorithm,
    /// The data key's `_id`.
    pub(crate) key_id: KeyId,
    /// The original BSON element type byte.
    pub(crate) bson_type: u8,
    /// The 18-byte header, which is the AEAD's associated data.
    pub(crate) header: &'a [u8],
    /// `IV || C || T`.
    pub(crate) sealed: &'a [u8],
}

/// Parses the bytes of a subtype-6 binary as an FLE1 ciphertext. Cheap: no allocation, no crypto.
///
/// # Errors
/// [`Error::MalformedCiphertext`] when the bytes are not an FLE1 ciphertext (another blob
/// subtype, too short, impossible length, invalid type byte), [`Error::UnsupportedType`] when
/// the type byte names a value-less type (null, undefined, minKey, maxKey), which FLE1 never
/// encrypts.
pub(crate) fn parse_payload(bytes: &[u8]) -> Result<CsflePayload<'_>> {
    let Some((&blob_subtype, _)) = bytes.split_first() else {
        return Err(Error::MalformedCiphertext("empty CSFLE payload"));
    };
    let algorithm =
        CsfleAlgorithm::from_blob_subtype(blob_subtype).ok_or(Error::MalformedCiphertext(
            "blob subtype is not FLE1 deterministic (1) or random (2) ciphertext",
        ))?;
    if bytes.len() < HEADER_LEN + MIN_SEALED_LEN {
        return Err(Error::MalformedCiphertext("CSFLE payload is too short"));
    }
    let (header, sealed) = bytes.split_at(HEADER_LEN);
    let key_id = KeyId::from_slice(&header[1..17])?;
    let bson_type = header[17];
    let Some(name) = type_name(bson_type) else {
        return Err(Error::MalformedCiphertext(
            "CSFLE payload names an unknown BSON type",
        ));
    };
    if is_valueless(bson_type) {
        return Err(Error::UnsupportedType {
            type_name: name,
            algorithm: algorithm.name(),
        });
    }
    Ok(CsflePayload {
        algorithm,
        key_id,
        bson_type,
        header,
        sealed,
    })
}

/// Decrypts `payload` with `key`, appending the BSON value's bytes (no type byte, no name) to
/// `out`. The MAC is verified before anything is decrypted.
///
/// # Errors
/// [`Error::Decrypt`] when the ciphertext does not authenticate under `key` (wrong key,
/// tampering); [`Error::MalformedCiphertext`] for impossible lengths; [`Error::MalformedBson`]
/// when the authenticated plaintext is not a value of the payload's type. On error `out` is
/// unchanged.
pub(crate) fn decrypt_into(
    key: &CsfleKey,
    payload: &CsflePayload<'_>,
    out: &mut Vec<u8>,
) -> Result<()> {
    let start = out.len();
    key.open(payload.header, payload.sealed, out)?;
    if !value_is_well_formed(payload.bson_type, &out[start..]) {
        out[start..].zeroize();
        out.truncate(start);
        return Err(Error::MalformedBson(format!(
            "decrypted CSFLE value is not a well-formed BSON {}",
            type_name(payload.bson_type).unwrap_or("value"),
        )));
    }
    Ok(())
}

/// Encrypts one BSON value (`value` = its bytes without type byte and name) and appends the whole
/// subtype-6 payload (header || IV || C || T) to `out`. Deterministic IVs are computed as
/// libmongocrypt does, so the output is byte-identical to libmongocrypt's for the same key;
/// random IVs come from the thread-local CSPRNG.
///
/// # Errors
/// [`Error::UnsupportedType`] for types the algorithm refuses (see [`check_type`]),
/// [`Error::MalformedBson`] when `value` is not a value of `bson_type`.
pub(crate) fn encrypt(
    key: &CsfleKey,
    algorithm: CsfleAlgorithm,
    key_id: KeyId,
    bson_type: u8,
    value: &[u8],
    out: &mut Vec<u8>,
) -> Result<()> {
    check_type(algorithm, bson_type, value)?;
    if !value_is_well_formed(bson_type, value) {
        return Err(Error::MalformedBson(format!(
            "value is not a well-formed BSON {}",
            type_name(bson_type).unwrap_or("value")
        )));
    }
    let mut header = [0u8; HEADER_LEN];
    header[0] = algorithm.blob_subtype();
    header[1..17].copy_from_slice(key_id.as_bytes());
    header[17] = bson_type;
    let iv = match algorithm {
        CsfleAlgorithm::Deterministic => key.deterministic_iv(&header, value),
        CsfleAlgorithm::Random => CsfleKey::random_iv(),
    };
    out.extend_from_slice(&header);
    key.seal(&iv, &header, value, out);
    Ok(())
}

/// Whether `algorithm` may encrypt a value of `bson_type` (`value` is needed for binData's
/// subtype). The rules of libmongocrypt's `_permitted_for_encryption`
/// (`src/mongocrypt-ctx-encrypt.c`) and mongocryptd's `isTypeLegalForFle1Algorithm`:
///
/// - never: null, undefined, minKey, maxKey (they carry nothing but their type, which is not
///   hidden), and binData subtype 6 (already encrypted);
/// - not deterministic: double, decimal128 (equal numbers have several encodings), object,
///   array, javascriptWithScope (not compared byte-wise), bool (two ciphertexts only).
///
/// # Errors
/// [`Error::UnsupportedType`] naming the type and the algorithm; [`Error::MalformedBson`] for
/// a type byte that is not a BSON type.
pub(crate) fn check_type(algorithm: CsfleAlgorithm, bson_type: u8, value: &[u8]) -> Result<()> {
    let Some(name) = type_name(bson_type) else {
        return Err(Error::MalformedBson("unknown BSON element type".into()));
    };
    let refused = |type_name| Error::UnsupportedType {
        type_name,
        algorithm: algorithm.name(),
    };
    if is_valueless(bson_type) {
        return Err(refused(name));
    }
    if bson_type == 0x05 && value.get(4) == Some(&0x06) {
        return Err(refused("binData subtype 6 (encrypted)"));
    }
    if algorithm == CsfleAlgorithm::Deterministic
        && matches!(bson_type, 0x01 | 0x03 | 0x04 | 0x08 | 0x0F | 0x13)
    {
        return Err(refused(name));
    }
    Ok(())
}

fn is_valueless(bson_type: u8) -> bool {
    matches!(bson_type, 0x06 | 0x0A | 0x7F | 0xFF)
}

/// The BSON type's name as MongoDB's `$type` aliases spell it, or `None` if the byte is not a
/// BSON element type.
pub(crate) fn type_name(bson_type: u8) -> Option<&'static str> {
    Some(match bson_type {
        0x01 => "double",
        0x02 => "string",
        0x03 => "object",
        0x04 => "array",
        0x05 => "binData",
        0x06 => "undefined",
        0x07 => "objectId",
        0x08 => "bool",
        0x09 => "date",
        0x0A => "null",
        0x0B => "regex",
        0x0C => "dbPointer",
        0x0D => "javascript",
        0x0E => "symbol",
        0x0F => "javascriptWithScope",
        0x10 => "int",
        0x11 => "timestamp",
        0x12 => "long",
        0x13 => "decimal",
        0x7F => "maxKey",
        0xFF => "minKey",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csfle::aead::KEY_LEN;
    use bson::spec::BinarySubtype;
    use bson::{
        doc, oid::ObjectId, Binary, Bson, DbPointer, JavaScriptCodeWithScope, Regex, Timestamp,
    };

    fn key() -> CsfleKey {
        CsfleKey::new(&[0x11; KEY_LEN])
    }

    fn samples() -> Vec<Bson> {
        vec![
            Bson::Double(2.5),
            Bson::String("hé".into()),
            Bson::Document(doc! {"a": 1, "b": [true]}),
            Bson::Array(vec![Bson::Int32(1)]),
            Bson::Binary(Binary {
                subtype: BinarySubtype::Generic,
                bytes: vec![1, 2],
            }),
            Bson::ObjectId(ObjectId::from_bytes([7; 12])),
            Bson::Boolean(true),
            Bson::DateTime(bson::DateTime::from_millis(-5)),
            Bson::RegularExpression(Regex {
                pattern: "a.c".into(),
                options: "i".into(),
            }),
            Bson::JavaScriptCode("f()".into()),
            Bson::Symbol("sym".into()),
            Bson::JavaScriptCodeWithScope(JavaScriptCodeWithScope {
                code: "x".into(),
                scope: doc! {"x": 1},
            }),
            Bson::Int32(-3),
            Bson::Timestamp(Timestamp {
                time: 5,
                increment: 6,
            }),
            Bson::Int64(1 << 50),
            Bson::Decimal128(bson::Decimal128::from_bytes([3; 16])),
        ]
    }

    fn db_pointer() -> Bson {
        // bson has no public constructor for DbPointer; go through extended JSON.
        let v = serde_json::json!({"$dbPointer": {"$ref": "c", "$id": {"$oid": "5f1c2b3a4d5e6f7081920a1b"}}});
        let b = Bson::try_from(v).unwrap();
        assert!(matches!(b, Bson::DbPointer(DbPointer { .. })));
        b
    }

    #[test]
    fn every_allowed_type_round_trips_both_algorithms() {
        let key = key();
        let id = KeyId::from_bytes([9; 16]);
        let mut all = samples();
        all.push(db_pointer());
        for value in all {
            let (t, bytes) = value_to_bytes(&value).unwrap();
            assert!(value_is_well_formed(t, &bytes), "{t:#x}");
            for alg in [CsfleAlgorithm::Deterministic, CsfleAlgorithm::Random] {
                let mut ct = Vec::new();
                match encrypt(&key, alg, id, t, &bytes, &mut ct) {
                    Ok(()) => {}
                    Err(Error::UnsupportedType { .. }) if alg == CsfleAlgorithm::Deterministic => {
                        continue
                    }
                    Err(e) => panic!("{t:#x} {alg}: {e}"),
                }
                let p = parse_payload(&ct).unwrap();
                assert_eq!((p.algorithm, p.key_id, p.bson_type), (alg, id, t));
                let mut out = Vec::new();
                decrypt_into(&key, &p, &mut out).unwrap();
                assert_eq!(&out[..], &bytes[..]);
                let back = value_from_bytes(t, &out).unwrap();
                assert_eq!(back, value);
            }
        }
    }

    #[test]
    fn deterministic_is_deterministic_random_is_not() {
        let key = key();
        let id = KeyId::from_bytes([9; 16]);
        let (t, v) = value_to_bytes(&Bson::String("same".into())).unwrap();
        let enc = |alg| {
            let mut ct = Vec::new();
            encrypt(&key, alg, id, t, &v, &mut ct).unwrap();
            ct
        };
        assert_eq!(
            enc(CsfleAlgorithm::Deterministic),
            enc(CsfleAlgorithm::Deterministic)
        );
        assert_ne!(enc(CsfleAlgorithm::Random), enc(CsfleAlgorithm::Random));
    }

    #[test]
    fn fail_types_refused() {
        let det = CsfleAlgorithm::Deterministic;
        let rnd = CsfleAlgorithm::Random;
        for t in [0x06, 0x0A, 0x7F, 0xFF] {
            for alg in [det, rnd] {
                assert!(matches!(
                    check_type(alg, t, &[]),
                    Err(Error::UnsupportedType { .. })
                ));
            }
        }
        for t in [0x01, 0x03, 0x04, 0x08, 0x0F, 0x13] {
            assert!(matches!(
                check_type(det, t, &[0; 8]),
                Err(Error::UnsupportedType { .. })
            ));
            assert!(check_type(rnd, t, &[0; 8]).is_ok());
        }
        let encrypted_bin = [1, 0, 0, 0, 6, 0];
        for alg in [det, rnd] {
            assert!(matches!(
                check_type(alg, 0x05, &encrypted_bin),
                Err(Error::UnsupportedType { .. })
            ));
            assert!(matches!(
                check_type(alg, 0x00, &[]),
                Err(Error::MalformedBson(_))
            ));
            assert!(matches!(
                check_type(alg, 0x14, &[]),
                Err(Error::MalformedBson(_))
            ));
        }
    }

    #[test]
    fn fail_encrypt_malformed_value() {
        let key = key();
        let id = KeyId::from_bytes([9; 16]);
        let mut out = Vec::new();
        for (t, v) in [
            (0x10u8, &[1u8, 2, 3][..]),
            (0x02, &[5, 0, 0, 0, b'a', 0][..]),
            (0x02, &[0, 0, 0, 0][..]),
            (0x02, &[0xff, 0xff, 0xff, 0xff][..]),
            (0x05, &[1, 0, 0, 0, 0][..]),
            (0x0B, &[b'a', 0][..]),
            (0x0F, &[4, 0, 0, 0][..]),
            (0x08, &[2][..]),
        ] {
            assert!(
                matches!(
                    encrypt(&key, CsfleAlgorithm::Random, id, t, v, &mut out),
                    Err(Error::MalformedBson(_))
                ),
                "{t:#x} {v:?}"
            );
            assert!(out.is_empty());
        }
    }

    #[test]
    fn fail_decrypt_authenticated_but_malformed_value() {
        // A key holder wrote an int32 payload whose plaintext is 3 bytes: rejected, not spliced.
        let key = key();
        let mut header = [0u8; HEADER_LEN];
        header[0] = 2;
        header[17] = 0x10;
        let mut ct = header.to_vec();
        key.seal(&CsfleKey::random_iv(), &header, &[1, 2, 3], &mut ct);
        let p = parse_payload(&ct).unwrap();
        let mut out = vec![7];
        assert!(matches!(
            decrypt_into(&key, &p, &mut out),
            Err(Error::MalformedBson(_))
        ));
        assert_eq!(out, [7]);
    }

    #[test]
    fn fail_parse() {
        assert!(matches!(
            parse_payload(&[]),
            Err(Error::MalformedCiphertext(_))
        ));
        let mut ok = vec![1u8];
        ok.extend_from_slice(&[0; 16]);
        ok.push(0x02);
        ok.extend_from_slice(&[0; 64]);
        assert!(parse_payload(&ok).is_ok());
        for sub in [0u8, 3, 6, 7, 16, 255] {
            let mut b = ok.clone();
            b[0] = sub;
            assert!(matches!(
                parse_payload(&b),
                Err(Error::MalformedCiphertext(_))
            ));
        }
        for t in [0x00u8, 0x14, 0x80, 0xfe] {
            let mut b = ok.clone();
            b[17] = t;
            assert!(matches!(
                parse_payload(&b),
                Err(Error::MalformedCiphertext(_))
            ));
        }
        for t in [0x06u8, 0x0A, 0x7F, 0xFF] {
            let mut b = ok.clone();
            b[17] = t;
            assert!(matches!(
                parse_payload(&b),
                Err(Error::UnsupportedType { .. })
            ));
        }
        for len in 0..ok.len() {
            assert!(parse_payload(&ok[..len]).is_err());
        }
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use crate::csfle::aead::KEY_LEN;
    use bson::Bson;
    use proptest::prelude::*;

    proptest! {
        /// Untrusted bytes never panic the parser or the decryptor, and never decrypt.
        #[test]
        fn arbitrary_bytes_are_rejected_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let key = CsfleKey::new(&[0x33; KEY_LEN]);
            if let Ok(p) = parse_payload(&bytes) {
                let mut out = Vec::new();
                prop_assert!(decrypt_into(&key, &p, &mut out).is_err());
                prop_assert!(out.is_empty());
            }
        }

        /// Strings of every length round-trip under both algorithms, and any single-bit flip of
        /// the result fails.
        #[test]
        fn strings_round_trip_and_resist_flips(s in ".{0,70}", flip in any::<prop::sample::Index>(), det in any::<bool>()) {
            let key = CsfleKey::new(&[0x44; KEY_LEN]);
            let alg = if det { CsfleAlgorithm::Deterministic } else { CsfleAlgorithm::Random };
            let (t, v) = value_to_bytes(&Bson::String(s)).unwrap();
            let mut ct = Vec::new();
            encrypt(&key, alg, KeyId::from_bytes([1; 16]), t, &v, &mut ct).unwrap();
            let mut out = Vec::new();
            decrypt_into(&key, &parse_payload(&ct).unwrap(), &mut out).unwrap();
            prop_assert_eq!(&out[..], &v[..]);
            let bit = flip.index(ct.len() * 8);
            ct[bit / 8] ^= 1 << (bit % 8);
            out.clear();
            let r = parse_payload(&ct).and_then(|p| decrypt_into(&key, &p, &mut out));
            prop_assert!(r.is_err());
            prop_assert!(out.is_empty());
        }
    }
}
