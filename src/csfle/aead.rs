//! AEAD_AES_256_CBC_HMAC_SHA_512, exactly as MongoDB's FLE1 (libmongocrypt) computes it.
//!
//! The construction is draft-mcgrew-aead-aes-cbc-hmac-sha2-05 §2.7 (AES-256-CBC, PKCS#7 padding,
//! HMAC-SHA-512 truncated to 256 bits) with a third 32-byte key for deterministic IVs. From
//! libmongocrypt `src/mongocrypt-crypto.c` (`KEY_FORMAT_FLE1`, `MAC_FORMAT_FLE1`,
//! `_mongocrypt_calculate_deterministic_iv`):
//!
//! ```text
//! key (96 bytes) = MAC key (32) || encryption key (32) || IV key (32)
//! AL             = bit length of AD as a 64-bit big-endian integer
//! C              = AES-256-CBC(encryption key, IV, PKCS#7(P))
//! T              = HMAC-SHA-512(MAC key, AD || IV || C || AL)[..32]
//! output         = IV || C || T
//! deterministic IV = HMAC-SHA-512(IV key, AD || AL || P)[..16]
//! ```
//!
//! Opening checks the tag (in constant time) before any decryption, and reports every failure
//! after the length check, bad padding included, as the one opaque [`Error::Decrypt`].

use core::fmt;

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockModeDecrypt, BlockModeEncrypt, InnerIvInit, KeyInit};
use aes::Aes256;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha512;
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Result};

/// Length of FLE1 key material (data keys and the local master key alike).
pub(crate) const KEY_LEN: usize = 96;
/// Length of the IV, which is also the AES block size.
pub(crate) const IV_LEN: usize = 16;
/// Length of the truncated HMAC-SHA-512 tag.
pub(crate) const TAG_LEN: usize = 32;
const BLOCK_LEN: usize = 16;
const SUBKEY_LEN: usize = 32;
/// The shortest sealed output: IV, one (padding) block, tag.
pub(crate) const MIN_SEALED_LEN: usize = IV_LEN + BLOCK_LEN + TAG_LEN;

/// One FLE1 key, ready to use: the two keyed HMAC-SHA-512 states and the AES-256 key schedule
/// are computed once, so that sealing or opening a small value costs one short HMAC (two
/// SHA-512 compressions for values up to ~50 bytes) plus its AES blocks.
///
/// Both wipe themselves on drop: the AES key schedule (`aes` feature `zeroize`) and the HMAC
/// states, SHA-512 states after absorbing key ⊕ ipad/opad (`sha2` feature `zeroize`; so are
/// the per-value clones that `CsfleKey::mac` makes).
pub(crate) struct CsfleKey {
    mac: Hmac<Sha512>,
    iv_mac: Hmac<Sha512>,
    aes: Aes256,
}

impl CsfleKey {
    /// Splits 96 bytes of key material as FLE1 does: MAC key, encryption key, IV key.
    pub(crate) fn new(material: &[u8; KEY_LEN]) -> Self {
        // KEY_LEN is three subkeys exactly, so the chunks are those three and no remainder.
        let ([mac_key, enc_key, iv_key], []) = material.as_chunks::<SUBKEY_LEN>() else {
            unreachable!("KEY_LEN == 3 * SUBKEY_LEN")
        };
        CsfleKey {
            mac: keyed_hmac(mac_key),
            iv_mac: keyed_hmac(iv_key),
            aes: Aes256::new(enc_key.into()),
        }
    }

    /// The deterministic IV for `plaintext` under associated data `ad`.
    pub(crate) fn deterministic_iv(&self, ad: &[u8], plaintext: &[u8]) -> [u8; IV_LEN] {
        let mut mac = self.iv_mac.clone();
        mac.update(ad);
        mac.update(&bit_length(ad));
        mac.update(plaintext);
        let full = mac.finalize().into_bytes();
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&full[..IV_LEN]);
        iv
    }

    /// A random IV from the thread-local CSPRNG (ChaCha, seeded from the OS).
    pub(crate) fn random_iv() -> [u8; IV_LEN] {
        let mut iv = [0u8; IV_LEN];
        rand::thread_rng().fill_bytes(&mut iv);
        iv
    }

    /// Encrypts and authenticates `plaintext`, appending `IV || C || T` to `out`.
    pub(crate) fn seal(&self, iv: &[u8; IV_LEN], ad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        cbc_encrypt(&self.aes, iv, plaintext, out);
        let tag = self.tag(ad, &out[start..]);
        out.extend_from_slice(&tag[..TAG_LEN]);
    }

    /// Checks and decrypts `IV || C || T`, appending the plaintext to `out`.
    ///
    /// On failure `out` is left as it was (any partial plaintext is wiped first).
    pub(crate) fn open(&self, ad: &[u8], sealed: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let (signed, tag) = split_sealed(
            sealed,
            "CSFLE ciphertext length is not IV + whole AES blocks + tag",
        )?;
        // Constant-time comparison with the leftmost TAG_LEN bytes (`digest`'s own; with
        // `hmac` 0.13 cheaper than finalizing and comparing separately).
        self.mac(ad, signed)
            .verify_truncated_left(tag)
            .map_err(|_| Error::Decrypt)?;
        cbc_decrypt(&self.aes, signed, out)
    }

    fn tag(&self, ad: &[u8], iv_and_ct: &[u8]) -> hmac::digest::Output<Hmac<Sha512>> {
        self.mac(ad, iv_and_ct).finalize().into_bytes()
    }

    /// The MAC state after `AD || IV || C || AL`, ready to finalize or verify.
    fn mac(&self, ad: &[u8], iv_and_ct: &[u8]) -> Hmac<Sha512> {
        let mut mac = self.mac.clone();
        mac.update(ad);
        mac.update(iv_and_ct);
        mac.update(&bit_length(ad));
        mac
    }
}

impl fmt::Debug for CsfleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CsfleKey").finish_non_exhaustive()
    }
}

/// Appends `IV || AES-256-CBC(aes, IV, PKCS#7(plaintext))` to `out`, with room for the tag:
/// the encryption half of both CBC + HMAC AEADs, FLE1's (here) and QE's (`qe::aead`).
pub(crate) fn cbc_encrypt(aes: &Aes256, iv: &[u8; IV_LEN], plaintext: &[u8], out: &mut Vec<u8>) {
    let pad = BLOCK_LEN - plaintext.len() % BLOCK_LEN;
    out.reserve(IV_LEN + plaintext.len() + pad + TAG_LEN);
    out.extend_from_slice(iv);
    let ct_start = out.len();
    out.extend_from_slice(plaintext);
    out.resize(ct_start + plaintext.len() + pad, pkcs7_byte(pad));
    // CBC encryption is sequential whatever the backend, so block by block costs nothing.
    let mut cbc = cbc::Encryptor::<&Aes256>::inner_iv_init(aes, iv.into());
    // Padded to whole blocks just above.
    for block in out[ct_start..].as_chunks_mut::<BLOCK_LEN>().0 {
        cbc.encrypt_block(block.into());
    }
}

/// Splits a sealed `IV || C || T` into what the tag covers (`IV || C`) and the tag, after the
/// length check both AEADs make before anything else (`malformed`: the error's text).
pub(crate) fn split_sealed<'s>(
    sealed: &'s [u8],
    malformed: &'static str,
) -> Result<(&'s [u8], &'s [u8])> {
    if sealed.len() < MIN_SEALED_LEN || !(sealed.len() - IV_LEN - TAG_LEN).is_multiple_of(BLOCK_LEN)
    {
        return Err(Error::MalformedCiphertext(malformed));
    }
    Ok(sealed.split_at(sealed.len() - TAG_LEN))
}

/// Decrypts the `IV || C` of a ciphertext whose tag was checked, appending the unpadded
/// plaintext to `out`; on failure `out` is left as it was (any partial plaintext wiped).
pub(crate) fn cbc_decrypt(aes: &Aes256, signed: &[u8], out: &mut Vec<u8>) -> Result<()> {
    // `split_sealed` made `signed` at least an IV and a block long.
    let (iv, ct) = signed
        .split_first_chunk::<IV_LEN>()
        .ok_or_else(|| Error::MalformedCiphertext("ciphertext shorter than its IV"))?;
    let start = out.len();
    out.extend_from_slice(ct);
    let unpadded = cbc::Decryptor::<&Aes256>::inner_iv_init(aes, iv.into())
        .decrypt_padded::<Pkcs7>(&mut out[start..])
        .map(<[u8]>::len);
    match unpadded {
        Ok(len) => {
            // The padding bytes are not secret, but wiping them keeps `out`'s spare
            // capacity clean of anything this function wrote.
            out[start + len..].zeroize();
            out.truncate(start + len);
            Ok(())
        }
        Err(_) => {
            // Only reachable with a valid tag, i.e. a key holder wrote bad padding. Still
            // the same opaque error: no padding oracle, whatever the caller does with it.
            out[start..].zeroize();
            out.truncate(start);
            Err(Error::Decrypt)
        }
    }
}

/// HMAC-SHA-512 keyed with a 32-byte key.
fn keyed_hmac(key: &[u8]) -> Hmac<Sha512> {
    // HMAC zero-pads keys shorter than the hash block (RFC 2104 §2), so padding here gives the
    // same MAC and spares a fallible constructor.
    let mut block = Zeroizing::new([0u8; 128]);
    block[..key.len()].copy_from_slice(key);
    <Hmac<Sha512> as hmac::digest::KeyInit>::new((&*block).into())
}

/// AL: the length of the associated data in bits, as a 64-bit big-endian integer.
fn bit_length(ad: &[u8]) -> [u8; 8] {
    (ad.len() as u64).wrapping_mul(8).to_be_bytes()
}

#[allow(clippy::cast_possible_truncation)] // `pad` is in 1..=16
fn pkcs7_byte(pad: usize) -> u8 {
    debug_assert!((1..=BLOCK_LEN).contains(&pad));
    pad as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// An HMAC key lives on in the two hash states it was absorbed into (`HmacCore` holds them
    /// and every tag clones them): those states must wipe themselves. This stops compiling if
    /// `sha2`'s `zeroize` feature goes.
    #[test]
    fn hmac_states_wipe_themselves_on_drop() {
        use hmac::digest::block_api::CoreProxy;
        fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        wiped_on_drop::<<Sha512 as CoreProxy>::Core>();
        wiped_on_drop::<<sha2::Sha256 as CoreProxy>::Core>();
    }

    // draft-mcgrew-aead-aes-cbc-hmac-sha2-05 §5.4 (AEAD_AES_256_CBC_HMAC_SHA_512), as libmongocrypt
    // runs it in `test/data/roundtrip/mcgrew.json`: 64 key bytes (MAC || ENC) plus an IV key
    // that random-IV sealing does not use.
    const MCGREW_KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
        202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f\
        0000000000000000000000000000000000000000000000000000000000000000";
    const MCGREW_AD: &str =
        "546865207365636f6e64207072696e6369706c65206f662041756775737465204b6572636b686f666673";
    const MCGREW_IV: &str = "1af38c2dc2b96ffdd86694092341bc04";
    const MCGREW_P: &str =
        "41206369706865722073797374656d206d757374206e6f742062652072657175697265642074\
        6f206265207365637265742c20616e64206974206d7573742062652061626c6520746f2066616c6c20696e746f\
        207468652068616e6473206f662074686520656e656d7920776974686f757420696e636f6e76656e69656e6365";
    const MCGREW_C: &str =
        "1af38c2dc2b96ffdd86694092341bc044affaaadb78c31c5da4b1b590d10ffbd3dd8d5d3\
        02423526912da037ecbcc7bd822c301dd67c373bccb584ad3e9279c2e6d12a1374b77f077553df829410446b\
        36ebd97066296ae6427ea75c2e0846a11a09ccf5370dc80bfecbad28c73f09b3a3b75e662a2594410ae496b2\
        e2e6609e31e6e02cc837f053d21f37ff4f51950bbe2638d09dd7a4930930806d0703b1f64dd3b4c088a7f45c\
        216839645b2012bf2e6269a8c56a816dbc1b267761955bc5";

    fn mcgrew_key() -> CsfleKey {
        CsfleKey::new(&unhex(MCGREW_KEY).try_into().unwrap())
    }

    #[test]
    fn known_answer_mcgrew_seal() {
        let key = mcgrew_key();
        let iv: [u8; 16] = unhex(MCGREW_IV).try_into().unwrap();
        let mut out = b"prefix".to_vec();
        key.seal(&iv, &unhex(MCGREW_AD), &unhex(MCGREW_P), &mut out);
        assert_eq!(&out[..6], b"prefix");
        assert_eq!(hex::encode(&out[6..]), MCGREW_C);
    }

    #[test]
    fn known_answer_mcgrew_open() {
        let key = mcgrew_key();
        let mut out = Vec::new();
        key.open(&unhex(MCGREW_AD), &unhex(MCGREW_C), &mut out)
            .unwrap();
        assert_eq!(out, unhex(MCGREW_P));
    }

    #[test]
    fn hmac_key_padding_matches_short_key() {
        let key = [7u8; 32];
        let mut a = keyed_hmac(&key);
        let mut b = <Hmac<Sha512> as hmac::KeyInit>::new_from_slice(&key).unwrap();
        a.update(b"x");
        b.update(b"x");
        assert_eq!(a.finalize().into_bytes(), b.finalize().into_bytes());
    }

    #[test]
    fn round_trip_all_lengths() {
        let key = CsfleKey::new(&[0x42; KEY_LEN]);
        let ad = [1u8; 18];
        for len in 0..80 {
            let p: Vec<u8> = (0..len).map(|i| u8::try_from(i).unwrap()).collect();
            let iv = key.deterministic_iv(&ad, &p);
            let mut sealed = Vec::new();
            key.seal(&iv, &ad, &p, &mut sealed);
            assert_eq!(sealed.len(), IV_LEN + (len / 16 + 1) * 16 + TAG_LEN);
            let mut out = vec![9];
            key.open(&ad, &sealed, &mut out).unwrap();
            assert_eq!(&out[1..], &p[..]);
        }
    }

    #[test]
    fn deterministic_iv_depends_on_ad_and_plaintext() {
        let key = CsfleKey::new(&[3; KEY_LEN]);
        let a = key.deterministic_iv(b"ad", b"p");
        assert_eq!(a, key.deterministic_iv(b"ad", b"p"));
        assert_ne!(a, key.deterministic_iv(b"ad", b"q"));
        assert_ne!(a, key.deterministic_iv(b"ae", b"p"));
        // AL sits between AD and P, so moving a byte across the boundary changes the IV.
        assert_ne!(
            key.deterministic_iv(b"a", b"dp"),
            key.deterministic_iv(b"ad", b"p")
        );
    }

    #[test]
    fn fail_open_wrong_ad_or_key() {
        let key = CsfleKey::new(&[1; KEY_LEN]);
        let mut sealed = Vec::new();
        key.seal(&CsfleKey::random_iv(), b"ad", b"secret", &mut sealed);
        let mut out = Vec::new();
        assert!(matches!(
            key.open(b"ae", &sealed, &mut out),
            Err(Error::Decrypt)
        ));
        let other = CsfleKey::new(&[2; KEY_LEN]);
        assert!(matches!(
            other.open(b"ad", &sealed, &mut out),
            Err(Error::Decrypt)
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn fail_open_bad_padding_is_opaque() {
        // A ciphertext whose tag is valid but whose padding is not (only a key holder can make
        // one): must be the same opaque error as a bad tag, and leave nothing behind.
        let key = CsfleKey::new(&[5; KEY_LEN]);
        let iv = [0u8; IV_LEN];
        for last in [0u8, 17, 0xff] {
            let mut block = [0u8; 16];
            block[15] = last;
            let mut enc = cbc::Encryptor::<&Aes256>::inner_iv_init(&key.aes, (&iv).into());
            let mut b = aes::cipher::Block::<Aes256>::from(block);
            enc.encrypt_block(&mut b);
            let mut sealed = iv.to_vec();
            sealed.extend_from_slice(&b);
            let tag = key.tag(b"", &sealed);
            sealed.extend_from_slice(&tag[..TAG_LEN]);
            let mut out = vec![1, 2, 3];
            assert!(matches!(
                key.open(b"", &sealed, &mut out),
                Err(Error::Decrypt)
            ));
            assert_eq!(out, [1, 2, 3]);
        }
    }

    #[test]
    fn fail_open_every_short_or_misaligned_length() {
        let key = CsfleKey::new(&[1; KEY_LEN]);
        let mut out = Vec::new();
        for len in 0..200 {
            let junk = vec![0xa5u8; len];
            assert!(key.open(b"", &junk, &mut out).is_err());
            assert!(out.is_empty());
        }
    }

    #[test]
    fn debug_prints_no_material() {
        assert_eq!(
            format!("{:?}", CsfleKey::new(&[0xab; KEY_LEN])),
            "CsfleKey { .. }"
        );
    }
}
