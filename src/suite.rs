//! The closed set of cipher suites, and the per-key cipher states built from a root key.
//!
//! Callers never see a nonce: [`SuiteKeys::seal`] draws it from a thread-local CSPRNG (seeded
//! from the OS, reseeded periodically, no system call per value) and writes it into the
//! envelope itself.
//!
//! Each suite gets its own subkey, derived from the 32-byte root key with HKDF-SHA-256 and a
//! suite-specific label, so one root key never feeds two algorithms directly.
//!
//! The AEADs are RustCrypto's. With the cargo feature `aead-aws-lc`, AES-256-GCM and
//! ChaCha20-Poly1305 are aws-lc-rs's instead (same subkeys, same wire format, same test
//! vectors); [`Suite::backend`] tells which library serves a suite in this build.

#[cfg(feature = "aead-aws-lc")]
mod aws_lc;
mod material;

use core::fmt;
use std::sync::OnceLock;

use aes_gcm::aead::array::{Array, ArraySize};
use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit};
use aes_siv::siv::Aes256Siv;
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305};
use hkdf::Hkdf;
use hmac::Hmac;
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroizing;

pub use material::KeyMaterial;

use crate::error::{ArgumentError, Error, Result};

/// Encryptions allowed per key for suites with random 96-bit nonces (AES-256-GCM,
/// ChaCha20-Poly1305): 2^32, NIST SP 800-38D §8.3's bound for randomly generated IVs, which
/// keeps the chance of a nonce collision below 2^-32.
pub const RANDOM_NONCE_LIMIT: u64 = 1 << 32;

/// Length of every suite's authentication tag (or synthetic IV), in bytes.
pub const TAG_LEN: usize = 16;

/// A cipher suite. The set is closed: the envelope stores [`Suite::id`], and an unknown id is
/// a malformed envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Suite {
    /// AES-256-GCM with a random 96-bit nonce. Fastest with AES hardware; at most
    /// [`RANDOM_NONCE_LIMIT`] encryptions per key.
    Aes256Gcm,
    /// ChaCha20-Poly1305 (RFC 8439) with a random 96-bit nonce; same per-key limit as AES-GCM.
    ChaCha20Poly1305,
    /// XChaCha20-Poly1305 with a random 192-bit nonce: no practical per-key message limit.
    XChaCha20Poly1305,
    /// AES-256-SIV (RFC 5297), used as a *deterministic* AEAD: equal plaintexts under the same
    /// key and binding give equal ciphertexts, which is what makes equality queries possible and
    /// is also exactly what it leaks (equality and frequency). Never a default.
    Aes256SivDeterministic,
}

impl Suite {
    /// Every suite, in id order.
    pub const ALL: [Suite; 4] = [
        Suite::Aes256Gcm,
        Suite::ChaCha20Poly1305,
        Suite::XChaCha20Poly1305,
        Suite::Aes256SivDeterministic,
    ];

    /// The suite's id byte in the envelope header.
    #[must_use]
    pub const fn id(self) -> u8 {
        match self {
            Suite::Aes256Gcm => 1,
            Suite::ChaCha20Poly1305 => 2,
            Suite::XChaCha20Poly1305 => 3,
            Suite::Aes256SivDeterministic => 4,
        }
    }

    /// The suite with this id byte.
    ///
    /// # Errors
    /// [`Error::MalformedCiphertext`] for an unknown id.
    pub const fn from_id(id: u8) -> Result<Self> {
        Ok(match id {
            1 => Suite::Aes256Gcm,
            2 => Suite::ChaCha20Poly1305,
            3 => Suite::XChaCha20Poly1305,
            4 => Suite::Aes256SivDeterministic,
            _ => return Err(Error::MalformedCiphertext("unknown suite id")),
        })
    }

    /// The suite's name, as written in schema files.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Suite::Aes256Gcm => "AES-256-GCM",
            Suite::ChaCha20Poly1305 => "ChaCha20-Poly1305",
            Suite::XChaCha20Poly1305 => "XChaCha20-Poly1305",
            Suite::Aes256SivDeterministic => "AES-256-SIV-deterministic",
        }
    }

    /// Bytes stored before the ciphertext: the nonce, or for AES-SIV the synthetic IV (which is
    /// also its authentication tag).
    #[must_use]
    pub const fn nonce_len(self) -> usize {
        match self {
            Suite::Aes256Gcm | Suite::ChaCha20Poly1305 => 12,
            Suite::XChaCha20Poly1305 => 24,
            Suite::Aes256SivDeterministic => TAG_LEN,
        }
    }

    /// Bytes stored after the ciphertext (the tag); zero for AES-SIV, whose tag is its IV.
    #[must_use]
    pub const fn tag_len(self) -> usize {
        match self {
            Suite::Aes256SivDeterministic => 0,
            _ => TAG_LEN,
        }
    }

    /// Whether equal inputs give equal ciphertexts.
    #[must_use]
    pub const fn is_deterministic(self) -> bool {
        matches!(self, Suite::Aes256SivDeterministic)
    }

    /// How many encryptions one key may make with this suite, when limited by nonce collisions.
    #[must_use]
    pub const fn usage_limit(self) -> Option<u64> {
        match self {
            Suite::Aes256Gcm | Suite::ChaCha20Poly1305 => Some(RANDOM_NONCE_LIMIT),
            Suite::XChaCha20Poly1305 | Suite::Aes256SivDeterministic => None,
        }
    }

    /// The library that implements this suite in this build: `"RustCrypto"`, or for
    /// AES-256-GCM and ChaCha20-Poly1305 with the cargo feature `aead-aws-lc`
    /// `"aws-lc-rs (AWS-LC <version>)"`, with the version of the AWS-LC that is linked in.
    /// XChaCha20-Poly1305 and AES-SIV are always RustCrypto's (AWS-LC has neither).
    #[must_use]
    pub fn backend(self) -> &'static str {
        match self {
            #[cfg(feature = "aead-aws-lc")]
            Suite::Aes256Gcm | Suite::ChaCha20Poly1305 => aws_lc::name(),
            _ => RUSTCRYPTO,
        }
    }

    const fn hkdf_label(self) -> &'static [u8] {
        match self {
            Suite::Aes256Gcm => b"fieldcrypt/v1/suite/AES-256-GCM",
            Suite::ChaCha20Poly1305 => b"fieldcrypt/v1/suite/ChaCha20-Poly1305",
            Suite::XChaCha20Poly1305 => b"fieldcrypt/v1/suite/XChaCha20-Poly1305",
            Suite::Aes256SivDeterministic => b"fieldcrypt/v1/suite/AES-256-SIV",
        }
    }
}

impl fmt::Display for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl core::str::FromStr for Suite {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Suite::ALL
            .into_iter()
            .find(|suite| suite.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::from(ArgumentError::UnknownSuite(s.to_owned())))
    }
}

const BLIND_INDEX_LABEL: &[u8] = b"fieldcrypt/v1/blind-index/HMAC-SHA-256";

/// [`Suite::backend`] for the suites RustCrypto serves.
const RUSTCRYPTO: &str = "RustCrypto";

/// The AES-256-GCM and ChaCha20-Poly1305 states: RustCrypto's, or aws-lc-rs's with the feature.
#[cfg(not(feature = "aead-aws-lc"))]
type GcmState = Aes256Gcm;
#[cfg(not(feature = "aead-aws-lc"))]
type ChaChaState = ChaCha20Poly1305;
#[cfg(feature = "aead-aws-lc")]
type GcmState = aws_lc::Key;
#[cfg(feature = "aead-aws-lc")]
type ChaChaState = aws_lc::Key;

#[cfg(not(feature = "aead-aws-lc"))]
fn gcm_state(k: &[u8; 32]) -> GcmState {
    Aes256Gcm::new(k.into())
}
#[cfg(not(feature = "aead-aws-lc"))]
fn chacha_state(k: &[u8; 32]) -> ChaChaState {
    ChaCha20Poly1305::new(k.into())
}
#[cfg(feature = "aead-aws-lc")]
fn gcm_state(k: &[u8; 32]) -> GcmState {
    aws_lc::Key::aes_256_gcm(k)
}
#[cfg(feature = "aead-aws-lc")]
fn chacha_state(k: &[u8; 32]) -> ChaChaState {
    aws_lc::Key::chacha20_poly1305(k)
}

/// A nonce-based AEAD whose 16-byte tag is stored apart from the ciphertext, as the envelope
/// stores it. The nonce is the caller's: no implementation draws one.
trait DetachedAead {
    /// Encrypts `buf` in place under `nonce` and writes the tag into `tag`.
    fn seal_detached(&self, nonce: &[u8], aad: &[u8], buf: &mut [u8], tag: &mut [u8])
        -> Result<()>;
    /// Checks `tag` and decrypts `buf` in place; on failure `buf` holds no plaintext.
    fn open_detached(&self, nonce: &[u8], aad: &[u8], buf: &mut [u8], tag: &[u8]) -> Result<()>;
}

/// The RustCrypto AEADs with nonces (every one but AES-SIV).
macro_rules! rustcrypto_detached {
    ($($t:ty),*) => {$(
        impl DetachedAead for $t {
            #[inline]
            fn seal_detached(
                &self,
                nonce: &[u8],
                aad: &[u8],
                buf: &mut [u8],
                tag: &mut [u8],
            ) -> Result<()> {
                let tag = sized_mut(tag)?;
                // The aead crates fail only on inputs beyond their length limits (~64 GiB).
                *tag = self
                    .encrypt_inout_detached(sized(nonce)?, aad, buf.into())
                    .map_err(|_| Error::TooLong("value"))?;
                Ok(())
            }

            #[inline]
            fn open_detached(
                &self,
                nonce: &[u8],
                aad: &[u8],
                buf: &mut [u8],
                tag: &[u8],
            ) -> Result<()> {
                self.decrypt_inout_detached(sized(nonce)?, aad, buf.into(), sized(tag)?)
                    .map_err(|_| Error::Decrypt)
            }
        }
    )*};
}
rustcrypto_detached!(Aes256Gcm, ChaCha20Poly1305, XChaCha20Poly1305);

/// Derives `N` bytes for `label` from a root key.
fn derive<const N: usize>(root: &KeyMaterial, label: &[u8]) -> Zeroizing<[u8; N]> {
    let mut out = Zeroizing::new([0u8; N]);
    Hkdf::<Sha256>::new(None, root.expose_secret())
        .expand(label, out.as_mut())
        .expect("N is far below HKDF-SHA-256's 8160-byte limit"); // allowed: N ≤ 64 here
    out
}

/// The cipher states of one root key, each built on first use and kept until the key drops.
/// The RustCrypto types wipe their expanded keys on drop (`zeroize` features); so do the
/// aws-lc-rs keys of feature `aead-aws-lc` (AWS-LC cleanses the context it frees).
#[derive(Default)]
pub(crate) struct SuiteKeys {
    gcm: OnceLock<GcmState>,
    chacha: OnceLock<ChaChaState>,
    xchacha: OnceLock<XChaCha20Poly1305>,
    // aes-siv's `Siv` needs `&mut self`, so the subkey is kept and a `Siv` made per call.
    siv: OnceLock<Zeroizing<[u8; 64]>>,
    blind_index: OnceLock<Hmac<Sha256>>,
}

impl SuiteKeys {
    fn gcm(&self, root: &KeyMaterial) -> &GcmState {
        self.gcm.get_or_init(|| {
            let k = derive::<32>(root, Suite::Aes256Gcm.hkdf_label());
            gcm_state(&k)
        })
    }

    fn chacha(&self, root: &KeyMaterial) -> &ChaChaState {
        self.chacha.get_or_init(|| {
            let k = derive::<32>(root, Suite::ChaCha20Poly1305.hkdf_label());
            chacha_state(&k)
        })
    }

    fn xchacha(&self, root: &KeyMaterial) -> &XChaCha20Poly1305 {
        self.xchacha.get_or_init(|| {
            let k = derive::<32>(root, Suite::XChaCha20Poly1305.hkdf_label());
            XChaCha20Poly1305::new((&*k).into())
        })
    }

    fn siv(&self, root: &KeyMaterial) -> Aes256Siv {
        let k = self
            .siv
            .get_or_init(|| derive::<64>(root, Suite::Aes256SivDeterministic.hkdf_label()));
        Aes256Siv::new((&**k).into())
    }

    /// The keyed HMAC-SHA-256 state for blind indexes; clone it per value.
    pub(crate) fn blind_index(&self, root: &KeyMaterial) -> &Hmac<Sha256> {
        self.blind_index.get_or_init(|| {
            let k = derive::<32>(root, BLIND_INDEX_LABEL);
            <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(k.as_ref())
                .expect("HMAC takes keys of any length") // allowed: infallible for HMAC
        })
    }

    /// Encrypts `buf` in place. Fills `nonce` (length [`Suite::nonce_len`]) and `tag` (length
    /// [`Suite::tag_len`]).
    pub(crate) fn seal(
        &self,
        suite: Suite,
        root: &KeyMaterial,
        aad: &[u8],
        nonce: &mut [u8],
        buf: &mut [u8],
        tag: &mut [u8],
    ) -> Result<()> {
        // The nonce is drawn here, for every backend: no AEAD library chooses it.
        match suite {
            Suite::Aes256Gcm => {
                rand::thread_rng().fill_bytes(nonce);
                self.gcm(root).seal_detached(nonce, aad, buf, tag)
            }
            Suite::ChaCha20Poly1305 => {
                rand::thread_rng().fill_bytes(nonce);
                self.chacha(root).seal_detached(nonce, aad, buf, tag)
            }
            Suite::XChaCha20Poly1305 => {
                rand::thread_rng().fill_bytes(nonce);
                self.xchacha(root).seal_detached(nonce, aad, buf, tag)
            }
            Suite::Aes256SivDeterministic => {
                let iv = sized_mut(nonce)?;
                // aes-siv fails only on inputs beyond its length limits.
                *iv = self
                    .siv(root)
                    .encrypt_inout_detached([aad], buf.into())
                    .map_err(|_| Error::TooLong("value"))?;
                Ok(())
            }
        }
    }

    /// Decrypts `buf` in place after checking the tag. On failure `buf` holds no plaintext.
    pub(crate) fn open(
        &self,
        suite: Suite,
        root: &KeyMaterial,
        aad: &[u8],
        nonce: &[u8],
        buf: &mut [u8],
        tag: &[u8],
    ) -> Result<()> {
        match suite {
            Suite::Aes256Gcm => self.gcm(root).open_detached(nonce, aad, buf, tag),
            Suite::ChaCha20Poly1305 => self.chacha(root).open_detached(nonce, aad, buf, tag),
            Suite::XChaCha20Poly1305 => self.xchacha(root).open_detached(nonce, aad, buf, tag),
            Suite::Aes256SivDeterministic => self
                .siv(root)
                .decrypt_inout_detached([aad], buf.into(), sized(nonce)?)
                .map_err(|_| Error::Decrypt),
        }
    }
}

/// `b` as the fixed-size array an AEAD takes. Envelopes are parsed and built with each suite's
/// lengths, so a mismatch is a malformed input, never a reason to panic.
fn sized<N: ArraySize>(b: &[u8]) -> Result<&Array<u8, N>> {
    b.try_into().map_err(|_| wrong_length())
}

/// [`sized`] for an output (the tag, or AES-SIV's synthetic IV).
fn sized_mut<N: ArraySize>(b: &mut [u8]) -> Result<&mut Array<u8, N>> {
    b.try_into().map_err(|_| wrong_length())
}

fn wrong_length() -> Error {
    Error::MalformedCiphertext("nonce or tag of the wrong length for its suite")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_are_distinct() {
        for s in Suite::ALL {
            assert_eq!(Suite::from_id(s.id()).unwrap(), s);
            assert_eq!(s.name().parse::<Suite>().unwrap(), s);
        }
        assert!(Suite::from_id(0).is_err());
        assert!(Suite::from_id(5).is_err());
    }

    #[test]
    fn seal_open_round_trip_every_suite() {
        let root = KeyMaterial::generate(32);
        let keys = SuiteKeys::default();
        for suite in Suite::ALL {
            for len in [0usize, 1, 15, 16, 17, 100] {
                let pt: Vec<u8> = (0..=255u8).cycle().take(len).collect();
                let mut buf = pt.clone();
                let mut nonce = vec![0u8; suite.nonce_len()];
                let mut tag = vec![0u8; suite.tag_len()];
                keys.seal(suite, &root, b"ad", &mut nonce, &mut buf, &mut tag)
                    .unwrap();
                // A 1-byte ciphertext equals its plaintext once in 256 runs; 15 bytes, never.
                if len >= 15 {
                    assert_ne!(buf, pt, "{suite}");
                }
                let mut bad = buf.clone();
                assert!(keys
                    .open(suite, &root, b"other", &nonce, &mut bad, &tag)
                    .is_err());
                keys.open(suite, &root, b"ad", &nonce, &mut buf, &tag)
                    .unwrap();
                assert_eq!(buf, pt, "{suite}");
            }
        }
    }

    /// Every cipher state a key keeps wipes itself when the key drops (the RustCrypto types'
    /// `zeroize` features; `aes-gcm` declares it for its GHASH key too, which 0.10 left
    /// behind). This stops compiling if one of those features goes. (POLYVAL and Poly1305
    /// wipe themselves in `Drop` without declaring it, so they cannot be named here.)
    #[test]
    fn cipher_states_wipe_themselves_on_drop() {
        fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        wiped_on_drop::<Aes256Gcm>();
        wiped_on_drop::<ChaCha20Poly1305>();
        wiped_on_drop::<XChaCha20Poly1305>();
        wiped_on_drop::<Aes256Siv>();
        wiped_on_drop::<cmac::block_api::CmacCore<aes::Aes256>>();
        wiped_on_drop::<aes::Aes256>();
    }

    #[test]
    fn backend_is_rustcrypto_except_with_the_aws_lc_feature() {
        for suite in Suite::ALL {
            let aws_lc = cfg!(feature = "aead-aws-lc")
                && matches!(suite, Suite::Aes256Gcm | Suite::ChaCha20Poly1305);
            assert_eq!(suite.backend() == "RustCrypto", !aws_lc, "{suite}");
        }
    }

    /// A nonce, tag or synthetic-IV buffer of the wrong length is a malformed input for every
    /// suite, in `seal` as in `open`: never a panic.
    #[test]
    fn wrong_lengths_are_errors_not_panics() {
        let root = KeyMaterial::generate(32);
        let keys = SuiteKeys::default();
        for suite in Suite::ALL {
            let (n, t) = (suite.nonce_len(), suite.tag_len());
            for (nonce_len, tag_len) in [(n + 1, t), (n - 1, t), (n, t + 1), (0, 0)] {
                if (nonce_len, tag_len) == (n, t) {
                    continue;
                }
                let mut nonce = vec![0u8; nonce_len];
                let mut tag = vec![0u8; tag_len];
                let mut buf = b"value".to_vec();
                let sealed = keys.seal(suite, &root, b"ad", &mut nonce, &mut buf, &mut tag);
                // AES-SIV has no tag buffer to check, so only its IV length can be wrong.
                if suite != Suite::Aes256SivDeterministic || nonce_len != n {
                    assert!(
                        matches!(sealed, Err(Error::MalformedCiphertext(_))),
                        "{suite} seal ({nonce_len}, {tag_len}): {sealed:?}"
                    );
                }
                let opened = keys.open(suite, &root, b"ad", &nonce, &mut buf, &tag);
                if suite != Suite::Aes256SivDeterministic || nonce_len != n {
                    assert!(
                        matches!(opened, Err(Error::MalformedCiphertext(_))),
                        "{suite} open ({nonce_len}, {tag_len}): {opened:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn deterministic_suite_is_deterministic_and_others_are_not() {
        let root = KeyMaterial::generate(32);
        let keys = SuiteKeys::default();
        for suite in Suite::ALL {
            let run = || {
                let mut buf = b"same value".to_vec();
                let mut nonce = vec![0u8; suite.nonce_len()];
                let mut tag = vec![0u8; suite.tag_len()];
                keys.seal(suite, &root, b"ad", &mut nonce, &mut buf, &mut tag)
                    .unwrap();
                (nonce, buf, tag)
            };
            assert_eq!(run() == run(), suite.is_deterministic(), "{suite}");
        }
    }
}
