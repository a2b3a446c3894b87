//! AES-256-GCM and ChaCha20-Poly1305 through aws-lc-rs (feature `aead-aws-lc`).
//!
//! The wire format is the one the RustCrypto states write: the caller draws the 96-bit nonce
//! (aws-lc-rs never chooses it), the ciphertext replaces the plaintext in place, and the 16-byte
//! tag is stored apart from it. For the same key, nonce, AAD and plaintext both backends give
//! the same bytes (the tests below check it).
//!
//! An aws-lc-rs `LessSafeKey` owns one `EVP_AEAD_CTX` that AWS-LC allocated with
//! `OPENSSL_malloc` and that holds the expanded key inline; dropping the key calls
//! `EVP_AEAD_CTX_free`, whose `OPENSSL_free` wipes the whole allocation with `OPENSSL_cleanse`
//! before freeing it. SECURITY.md ("AEAD backends") cites the source lines.

use std::sync::OnceLock;

use aws_lc_rs::aead::{Aad, Algorithm, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};

use super::{wrong_length, DetachedAead, TAG_LEN};
use crate::error::{Error, Result};

/// [`super::Suite::backend`] for the suites this module serves: `aws-lc-rs (AWS-LC <version>)`,
/// with the version of the AWS-LC library that is linked in.
pub(super) fn name() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| format!("aws-lc-rs (AWS-LC {})", aws_lc_rs::awslc_version()))
}

/// One AES-256-GCM or ChaCha20-Poly1305 key, wiped by AWS-LC when it drops.
pub(super) struct Key(LessSafeKey);

impl Key {
    /// An AES-256-GCM key.
    pub(super) fn aes_256_gcm(key: &[u8; 32]) -> Self {
        Key::new(&aws_lc_rs::aead::AES_256_GCM, key)
    }

    /// A ChaCha20-Poly1305 key.
    pub(super) fn chacha20_poly1305(key: &[u8; 32]) -> Self {
        Key::new(&aws_lc_rs::aead::CHACHA20_POLY1305, key)
    }

    fn new(algorithm: &'static Algorithm, key: &[u8; 32]) -> Self {
        // Both algorithms take 32-byte keys, so this cannot fail short of AWS-LC failing to
        // allocate its context (which aborts in Rust's allocator too).
        let unbound =
            UnboundKey::new(algorithm, key).expect("a 32-byte key for a 32-byte-key AEAD"); // allowed: lengths fixed by the types
        Key(LessSafeKey::new(unbound))
    }
}

impl DetachedAead for Key {
    /// Encrypts `buf` in place under `nonce` (which the caller drew) and writes the tag.
    /// Errors: [`Error::MalformedCiphertext`] for a nonce or tag buffer of the wrong length,
    /// [`Error::TooLong`] when AWS-LC refuses the input (beyond its per-nonce length limit).
    #[inline]
    fn seal_detached(
        &self,
        nonce: &[u8],
        aad: &[u8],
        buf: &mut [u8],
        tag: &mut [u8],
    ) -> Result<()> {
        let nonce = nonce_of(nonce)?;
        let tag: &mut [u8; TAG_LEN] = tag.try_into().map_err(|_| wrong_length())?;
        let t = self
            .0
            .seal_in_place_separate_tag(nonce, Aad::from(aad), buf)
            .map_err(|_| Error::TooLong("value"))?;
        // Both algorithms' tags are 16 bytes (checked by the tests below).
        *tag = t.as_ref().try_into().map_err(|_| wrong_length())?;
        Ok(())
    }

    /// Checks the tag and decrypts `buf` in place. On failure AWS-LC has zeroed `buf`
    /// (`EVP_AEAD_CTX_open_gather` clears its output on every error), so it holds no
    /// plaintext. Errors: [`Error::MalformedCiphertext`] for a nonce or tag of the wrong
    /// length, [`Error::Decrypt`] when the tag does not verify.
    #[inline]
    fn open_detached(&self, nonce: &[u8], aad: &[u8], buf: &mut [u8], tag: &[u8]) -> Result<()> {
        let nonce = nonce_of(nonce)?;
        if tag.len() != TAG_LEN {
            return Err(wrong_length());
        }
        self.0
            .open_in_place_separate_tag(nonce, Aad::from(aad), tag, buf)
            .map(|_| ())
            .map_err(|_| Error::Decrypt)
    }
}

fn nonce_of(nonce: &[u8]) -> Result<Nonce> {
    let n: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| wrong_length())?;
    Ok(Nonce::assume_unique_for_key(n))
}

#[cfg(test)]
mod tests {
    use aes_gcm::aead::array::Array;
    use aes_gcm::aead::AeadInOut;
    use aes_gcm::{Aes256Gcm, KeyInit};
    use chacha20poly1305::ChaCha20Poly1305;
    use rand::RngCore;

    use super::*;
    use crate::suite::{derive, KeyMaterial, Suite, SuiteKeys};

    /// The AADs every length is tried with: none, a short one, one longer than a block, and
    /// one as long as fieldcrypt's largest bindings (key id, path, suite).
    fn aads() -> [Vec<u8>; 4] {
        [
            Vec::new(),
            b"ad".to_vec(),
            (0..17u8).collect(),
            (0..=255u8).cycle().take(300).collect(),
        ]
    }

    fn random<const N: usize>() -> [u8; N] {
        let mut b = [0u8; N];
        rand::thread_rng().fill_bytes(&mut b);
        b
    }

    /// Runs `check` with an aws-lc-rs key and the RustCrypto key of the same bytes, for both
    /// suites this module serves.
    fn for_both_suites(check: impl Fn(&Key, &dyn DetachedAead, &str)) {
        let k = random::<32>();
        check(
            &Key::aes_256_gcm(&k),
            &Aes256Gcm::new((&k).into()),
            "AES-256-GCM",
        );
        check(
            &Key::chacha20_poly1305(&k),
            &ChaCha20Poly1305::new((&k).into()),
            "ChaCha20-Poly1305",
        );
    }

    #[test]
    fn same_bytes_as_rustcrypto_and_each_opens_the_other() {
        for_both_suites(|aws, rc, name| {
            for aad in aads() {
                for len in 0..=100usize {
                    let pt: Vec<u8> = (0..=255u8).cycle().skip(len).step_by(7).take(len).collect();
                    let nonce = random::<12>();

                    let (mut a, mut a_tag) = (pt.clone(), [0u8; TAG_LEN]);
                    aws.seal_detached(&nonce, &aad, &mut a, &mut a_tag).unwrap();
                    let (mut r, mut r_tag) = (pt.clone(), [0u8; TAG_LEN]);
                    rc.seal_detached(&nonce, &aad, &mut r, &mut r_tag).unwrap();
                    assert_eq!((&a, a_tag), (&r, r_tag), "{name}, {len} bytes");
                    if len >= 15 {
                        assert_ne!(a, pt, "{name}");
                    }

                    // aws-lc-rs's ciphertext opens with RustCrypto and vice versa.
                    rc.open_detached(&nonce, &aad, &mut a, &a_tag).unwrap();
                    assert_eq!(a, pt, "{name}, {len} bytes");
                    aws.open_detached(&nonce, &aad, &mut r, &r_tag).unwrap();
                    assert_eq!(r, pt, "{name}, {len} bytes");
                }
            }
        });
    }

    #[test]
    fn tampering_fails_with_decrypt_and_leaves_no_plaintext() {
        for_both_suites(|aws, _, name| {
            for aad in aads() {
                for len in [0usize, 1, 16, 17, 100] {
                    let pt = vec![0xa5u8; len];
                    let nonce = random::<12>();
                    let (mut ct, mut tag) = (pt.clone(), [0u8; TAG_LEN]);
                    aws.seal_detached(&nonce, &aad, &mut ct, &mut tag).unwrap();

                    let fails = |nonce: &[u8], aad: &[u8], ct: &[u8], tag: &[u8]| {
                        let mut buf = ct.to_vec();
                        let r = aws.open_detached(nonce, aad, &mut buf, tag);
                        assert!(matches!(r, Err(Error::Decrypt)), "{name}, {len}: {r:?}");
                        assert!(buf.iter().all(|&b| b == 0), "{name}: plaintext left");
                    };
                    let mut bad_tag = tag;
                    bad_tag[15] ^= 1;
                    fails(&nonce, &aad, &ct, &bad_tag);
                    let mut bad_nonce = nonce;
                    bad_nonce[0] ^= 0x80;
                    fails(&bad_nonce, &aad, &ct, &tag);
                    let mut bad_aad = aad.clone();
                    bad_aad.push(0);
                    fails(&nonce, &bad_aad, &ct, &tag);
                    if len > 0 {
                        let mut bad_ct = ct.clone();
                        bad_ct[len - 1] ^= 1;
                        fails(&nonce, &aad, &bad_ct, &tag);
                        fails(&nonce, &aad, &ct[..len - 1], &tag);
                    }
                    let mut longer = ct.clone();
                    longer.push(0);
                    fails(&nonce, &aad, &longer, &tag);
                }
            }
        });
    }

    #[test]
    fn wrong_nonce_or_tag_lengths_are_malformed_not_a_panic() {
        for_both_suites(|aws, rc, name| {
            for (nonce_len, tag_len) in [
                (0, 16),
                (11, 16),
                (13, 16),
                (24, 16),
                (12, 0),
                (12, 15),
                (12, 17),
            ] {
                let nonce = vec![0u8; nonce_len];
                let mut buf = b"value".to_vec();
                let mut tag = vec![0u8; tag_len];
                for aead in [aws as &dyn DetachedAead, rc] {
                    let sealed = aead.seal_detached(&nonce, b"ad", &mut buf, &mut tag);
                    assert!(
                        matches!(sealed, Err(Error::MalformedCiphertext(_))),
                        "{name} seal ({nonce_len}, {tag_len}): {sealed:?}"
                    );
                    let opened = aead.open_detached(&nonce, b"ad", &mut buf, &tag);
                    assert!(
                        matches!(opened, Err(Error::MalformedCiphertext(_))),
                        "{name} open ({nonce_len}, {tag_len}): {opened:?}"
                    );
                }
            }
        });
    }

    /// `SuiteKeys` (aws-lc-rs for these two suites in this build) derives the same subkeys as
    /// before: what it seals opens with a RustCrypto state built from the HKDF label, and what
    /// that state seals opens with `SuiteKeys`.
    #[test]
    fn suite_keys_interoperate_with_rustcrypto_under_the_same_subkeys() {
        let root = KeyMaterial::generate(32);
        let keys = SuiteKeys::default();
        for suite in [Suite::Aes256Gcm, Suite::ChaCha20Poly1305] {
            let sub = derive::<32>(&root, suite.hkdf_label());
            let rc: Box<dyn DetachedAead> = match suite {
                Suite::Aes256Gcm => Box::new(Aes256Gcm::new((&*sub).into())),
                _ => Box::new(ChaCha20Poly1305::new((&*sub).into())),
            };
            for aad in aads() {
                for len in 0..=100usize {
                    let pt: Vec<u8> = (0..=255u8).cycle().map(|b| b ^ 0x3c).take(len).collect();
                    let (mut buf, mut nonce, mut tag) = (pt.clone(), [0u8; 12], [0u8; TAG_LEN]);
                    keys.seal(suite, &root, &aad, &mut nonce, &mut buf, &mut tag)
                        .unwrap();
                    rc.open_detached(&nonce, &aad, &mut buf, &tag).unwrap();
                    assert_eq!(buf, pt, "{suite}, {len}");

                    let nonce = random::<12>();
                    rc.seal_detached(&nonce, &aad, &mut buf, &mut tag).unwrap();
                    keys.open(suite, &root, &aad, &nonce, &mut buf, &tag)
                        .unwrap();
                    assert_eq!(buf, pt, "{suite}, {len}");
                }
            }
        }
    }

    /// RustCrypto's own API on the same key and nonce, once, so the comparison above does not
    /// only compare this crate's two wrappers with each other.
    #[test]
    fn rustcrypto_wrapper_is_the_plain_api() {
        let k = random::<32>();
        let nonce = random::<12>();
        let mut a = b"plain".to_vec();
        let mut tag = [0u8; TAG_LEN];
        Key::aes_256_gcm(&k)
            .seal_detached(&nonce, b"ad", &mut a, &mut tag)
            .unwrap();
        let mut r = b"plain".to_vec();
        let t = Aes256Gcm::new((&k).into())
            .encrypt_inout_detached(&Array::from(nonce), b"ad", r.as_mut_slice().into())
            .unwrap();
        assert_eq!((a, tag.as_slice()), (r, t.as_slice()));
    }

    /// Many keys built, used and dropped: AWS-LC frees (and cleanses) each context. No leak
    /// check, but a double free or a use after free would crash here.
    #[test]
    fn many_keys_build_and_drop() {
        for i in 0..2000u32 {
            let k = random::<32>();
            let key = if i % 2 == 0 {
                Key::aes_256_gcm(&k)
            } else {
                Key::chacha20_poly1305(&k)
            };
            let (mut buf, mut tag) = (i.to_le_bytes().to_vec(), [0u8; TAG_LEN]);
            key.seal_detached(&[0u8; 12], b"", &mut buf, &mut tag)
                .unwrap();
            drop(key);
        }
    }

    #[test]
    fn backend_names_the_linked_aws_lc() {
        for suite in Suite::ALL {
            let b = suite.backend();
            match suite {
                Suite::Aes256Gcm | Suite::ChaCha20Poly1305 => {
                    assert!(b.starts_with("aws-lc-rs (AWS-LC "), "{b}");
                    assert!(b.contains(aws_lc_rs::awslc_version()), "{b}");
                }
                _ => assert_eq!(b, "RustCrypto"),
            }
        }
    }
}
