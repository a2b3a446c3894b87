//! The two ciphers of Queryable Encryption (FLE2 protocol version 2), as libmongocrypt computes
//! them (`src/mongocrypt-crypto.c`: `KEY_FORMAT_FLE2v2AEAD`, `MAC_FORMAT_FLE2v2AEAD`,
//! `DECLARE_ALGORITHM(FLE2v2AEAD, CBC, SHA_256)` and `(FLE2, CTR, NONE)`; `src/mc-tokens.c`):
//!
//! ```text
//! data key (96 bytes)  = Ke (32) || Km (32) || TokenKey (32)      (not FLE1's Km || Ke || Kiv)
//!
//! AEAD_AES_256_CBC_HMAC_SHA_256, the client layer:
//!   C = IV || AES-256-CBC(Ke, IV, PKCS#7(P)) || HMAC-SHA-256(Km, AD || IV || S)   (32-byte tag,
//!       no AD length block, unlike FLE1)
//!
//! AES-256-CTR without MAC, the server layer of indexed values:
//!   ServerDataEncryptionLevel1Token = HMAC-SHA-256(TokenKey, 3 as uint64 little-endian)
//!   C = IV || AES-256-CTR(ServerDataEncryptionLevel1Token, IV, P)  (128-bit big-endian counter)
//! ```
//!
//! Opening the AEAD checks the tag (constant time) before decrypting and reports every failure
//! after the length check, bad padding included, as the one opaque [`Error::Decrypt`]. The CTR
//! layer authenticates nothing: what it hides is authenticated one layer down (see `payload.rs`).

use core::fmt;

use aes::cipher::{InnerIvInit, KeyInit, StreamCipher};
use aes::Aes256;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::csfle::aead::{cbc_decrypt, cbc_encrypt, split_sealed};
use crate::error::{Error, Result};

/// Length of a QE data key: the same 96-byte key-vault keys as FLE1, split differently.
pub(crate) const KEY_LEN: usize = 96;
// The IV (CBC and CTR alike; also the AES block size), the tag (HMAC-SHA-256 untruncated, as
// long as FLE1's truncated SHA-512) and the shortest AEAD output (IV, one padding block, tag):
// FLE1's, whose CBC halves this AEAD shares.
#[cfg(test)]
use crate::csfle::aead::TAG_LEN;
pub(crate) use crate::csfle::aead::{IV_LEN, MIN_SEALED_LEN};
#[cfg(test)]
const BLOCK_LEN: usize = 16;
const SUBKEY_LEN: usize = 32;
/// The shortest CTR output libmongocrypt accepts: IV and one byte.
pub(crate) const MIN_CTR_LEN: usize = IV_LEN + 1;
/// The `3` of `ServerDataEncryptionLevel1Token = HMAC(TokenKey, 3)`.
const SERVER_DATA_ENCRYPTION_LEVEL1: u64 = 3;

/// One QE data key, ready to use: the AES-256 schedule of `Ke`, the keyed HMAC-SHA-256 state of
/// `Km`, and the AES-256 schedule of the key's `ServerDataEncryptionLevel1Token` (the CTR key of
/// the server layer of indexed values, whose `S_KeyId` names this key). All three wipe
/// themselves on drop (`aes` and `sha2` feature `zeroize`).
pub(crate) struct QeKey {
    aes: Aes256,
    mac: Hmac<Sha256>,
    server: Aes256,
}

impl QeKey {
    /// Splits 96 bytes of key material as FLE2 does: `Ke`, `Km`, `TokenKey`.
    pub(crate) fn new(material: &[u8; KEY_LEN]) -> Self {
        // KEY_LEN is three subkeys exactly.
        let ([enc_key, mac_key, token_key], []) = material.as_chunks::<SUBKEY_LEN>() else {
            unreachable!("KEY_LEN == 3 * SUBKEY_LEN")
        };
        let mut token = keyed_hmac(token_key);
        token.update(&SERVER_DATA_ENCRYPTION_LEVEL1.to_le_bytes());
        let token = Zeroizing::new(<[u8; 32]>::from(token.finalize().into_bytes()));
        QeKey {
            aes: Aes256::new(enc_key.into()),
            mac: keyed_hmac(mac_key),
            server: Aes256::new((&*token).into()),
        }
    }

    /// Encrypts and authenticates `plaintext` under associated data `ad` with the given IV,
    /// appending `IV || S || T` to `out`.
    pub(crate) fn seal(&self, iv: &[u8; IV_LEN], ad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        cbc_encrypt(&self.aes, iv, plaintext, out);
        let mut mac = self.mac.clone();
        mac.update(ad);
        mac.update(&out[start..]);
        out.extend_from_slice(&mac.finalize().into_bytes());
    }

    /// Checks and decrypts `IV || S || T` under associated data `ad`, appending the plaintext to
    /// `out`. On failure `out` is left as it was (any partial plaintext is wiped first).
    pub(crate) fn open(&self, ad: &[u8], sealed: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let (signed, tag) = split_sealed(
            sealed,
            "QE ciphertext length is not IV + whole AES blocks + tag",
        )?;
        let mut mac = self.mac.clone();
        mac.update(ad);
        mac.update(signed);
        // Constant-time comparison of the whole 32-byte tag.
        mac.verify_slice(tag).map_err(|_| Error::Decrypt)?;
        cbc_decrypt(&self.aes, signed, out)
    }

    /// Decrypts the server layer `IV || AES-256-CTR(ServerDataEncryptionLevel1Token, IV, P)`
    /// into a new buffer. Not authenticated: any bytes of the right length "decrypt".
    pub(crate) fn open_server_layer(&self, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let Some((iv, ct)) = sealed
            .split_first_chunk::<IV_LEN>()
            .filter(|_| sealed.len() >= MIN_CTR_LEN)
        else {
            return Err(Error::MalformedCiphertext(
                "QE server-encrypted value is shorter than IV + 1 byte",
            ));
        };
        let mut plain = Zeroizing::new(ct.to_vec());
        server_ctr(&self.server, iv).apply_keystream(&mut plain);
        Ok(plain)
    }

    /// The inverse of [`QeKey::open_server_layer`] (tests build indexed values with it).
    #[cfg(test)]
    pub(crate) fn seal_server_layer(&self, iv: &[u8; IV_LEN], plaintext: &[u8]) -> Vec<u8> {
        let mut out = iv.to_vec();
        out.extend_from_slice(plaintext);
        server_ctr(&self.server, iv).apply_keystream(&mut out[IV_LEN..]);
        out
    }
}

impl fmt::Debug for QeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QeKey").finish_non_exhaustive()
    }
}

/// AES-256-CTR with a 128-bit big-endian counter (OpenSSL's `EVP_aes_256_ctr`) over a shared
/// key schedule.
fn server_ctr<'k>(aes: &'k Aes256, iv: &[u8; IV_LEN]) -> ctr::Ctr128BE<&'k Aes256> {
    ctr::Ctr128BE::from_core(ctr::CtrCore::inner_iv_init(aes, iv.into()))
}

/// HMAC-SHA-256 keyed with a 32-byte key.
fn keyed_hmac(key: &[u8]) -> Hmac<Sha256> {
    // HMAC zero-pads keys shorter than the hash block (RFC 2104 §2): padding here gives the same
    // MAC and spares a fallible constructor.
    let mut block = Zeroizing::new([0u8; 64]);
    block[..key.len()].copy_from_slice(key);
    <Hmac<Sha256> as hmac::digest::KeyInit>::new((&*block).into())
}

#[cfg(test)]
mod tests {
    use aes::cipher::block_padding::Pkcs7;
    use aes::cipher::BlockModeDecrypt;

    use super::*;

    fn key(b: u8) -> QeKey {
        QeKey::new(&[b; KEY_LEN])
    }

    #[test]
    fn hmac_key_padding_matches_short_key() {
        let k = [9u8; 32];
        let mut a = keyed_hmac(&k);
        let mut b = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&k).unwrap();
        a.update(b"x");
        b.update(b"x");
        assert_eq!(a.finalize().into_bytes(), b.finalize().into_bytes());
    }

    /// The layout of `fle2v2_aead_encrypt` in libmongocrypt's `etc/fle2_crypto.py`, recomputed
    /// from the primitives: Ke first, Km second, tag over AD || IV || S without a length block.
    #[test]
    fn seal_is_cbc_then_hmac_sha256_over_ad_iv_s() {
        let mut material = [0u8; KEY_LEN];
        for (i, b) in material.iter_mut().enumerate() {
            *b = u8::try_from(i).unwrap();
        }
        let k = QeKey::new(&material);
        let iv = [0x42; IV_LEN];
        let mut out = Vec::new();
        k.seal(&iv, b"ad", b"hello", &mut out);
        assert_eq!(out.len(), IV_LEN + BLOCK_LEN + TAG_LEN);
        let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&material[32..64]).unwrap();
        mac.update(b"ad");
        mac.update(&out[..IV_LEN + BLOCK_LEN]);
        assert_eq!(&out[IV_LEN + BLOCK_LEN..], &mac.finalize().into_bytes()[..]);
        let mut block = out[IV_LEN..IV_LEN + BLOCK_LEN].to_vec();
        use aes::cipher::KeyIvInit;
        let ke: [u8; 32] = material[..32].try_into().unwrap();
        let n = cbc::Decryptor::<Aes256>::new((&ke).into(), (&iv).into())
            .decrypt_padded::<Pkcs7>(&mut block)
            .unwrap()
            .len();
        assert_eq!(&block[..n], b"hello");
    }

    #[test]
    fn round_trip_and_fail_on_any_change() {
        let k = key(1);
        for len in [0usize, 1, 15, 16, 17, 100] {
            let p = vec![7u8; len];
            let mut sealed = Vec::new();
            k.seal(&[3; IV_LEN], b"header", &p, &mut sealed);
            let mut out = vec![1];
            k.open(b"header", &sealed, &mut out).unwrap();
            assert_eq!(&out[1..], &p[..]);
            assert!(matches!(
                k.open(b"headeR", &sealed, &mut out),
                Err(Error::Decrypt)
            ));
            assert!(matches!(
                key(2).open(b"header", &sealed, &mut out),
                Err(Error::Decrypt)
            ));
            for i in 0..sealed.len() {
                let mut t = sealed.clone();
                t[i] ^= 0x80;
                let mut o = Vec::new();
                assert!(matches!(k.open(b"header", &t, &mut o), Err(Error::Decrypt)));
                assert!(o.is_empty());
            }
            for cut in 0..sealed.len() {
                assert!(k.open(b"header", &sealed[..cut], &mut Vec::new()).is_err());
            }
        }
    }

    #[test]
    fn server_layer_round_trips_and_fails_short() {
        let k = key(5);
        let sealed = k.seal_server_layer(&[9; IV_LEN], b"K_KeyId and more");
        assert_eq!(
            &k.open_server_layer(&sealed).unwrap()[..],
            b"K_KeyId and more"
        );
        assert_ne!(
            &key(6).open_server_layer(&sealed).unwrap()[..],
            b"K_KeyId and more"
        );
        for cut in 0..MIN_CTR_LEN {
            assert!(matches!(
                k.open_server_layer(&sealed[..cut]),
                Err(Error::MalformedCiphertext(_))
            ));
        }
    }
}
