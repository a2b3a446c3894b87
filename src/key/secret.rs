//! The per-key state built from a key's material: cipher states and the usage counter.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use super::{KeyKind, CSFLE_KEY_LEN};
use crate::cache_line::OwnLine;
use crate::csfle::CsfleKey;
use crate::qe::QeKey;
use crate::suite::{KeyMaterial, SuiteKeys};

/// How many leases a key must have left beyond its count for [`KeySecret::reserve_lease`] to
/// grant a whole lease.
pub(crate) const LEASE_HEADROOM: u64 = 1024;

/// A key's secret plus everything expanded from it: the cipher states of each suite (built
/// once, on first use, and wiped on drop by the RustCrypto types), and the counter of
/// random-nonce encryptions.
pub(crate) struct KeySecret {
    material: KeyMaterial,
    kind: KeyKind,
    /// Written by every document a walk encrypts, from every thread: on a cache line of its
    /// own, so that those writes do not evict the cipher states beside it from the other
    /// cores' caches (false sharing).
    encryptions: OwnLine<AtomicU64>,
    /// Set when the key may make no more random-nonce encryptions anywhere (the key vault said
    /// its budget is spent): refuses every reservation, whatever the counter says after walks
    /// give back what they reserved.
    exhausted: AtomicBool,
    suites: SuiteKeys,
    csfle: OnceLock<Option<CsfleKey>>,
    qe: OnceLock<Option<QeKey>>,
}

impl KeySecret {
    pub(crate) fn new(material: KeyMaterial, kind: KeyKind, encryptions: u64) -> Self {
        KeySecret {
            material,
            kind,
            encryptions: OwnLine(AtomicU64::new(encryptions)),
            exhausted: AtomicBool::new(false),
            suites: SuiteKeys::default(),
            csfle: OnceLock::new(),
            qe: OnceLock::new(),
        }
    }

    pub(crate) fn material(&self) -> &KeyMaterial {
        &self.material
    }

    pub(crate) fn kind(&self) -> KeyKind {
        self.kind
    }

    pub(crate) fn suites(&self) -> &SuiteKeys {
        &self.suites
    }

    /// The precomputed CSFLE cipher state of a 96-byte CSFLE key (`None` for other kinds).
    pub(crate) fn csfle(&self) -> Option<&CsfleKey> {
        self.csfle
            .get_or_init(|| {
                let bytes: &[u8; CSFLE_KEY_LEN] = self.material.expose_secret().try_into().ok()?;
                (self.kind == KeyKind::Csfle).then(|| CsfleKey::new(bytes))
            })
            .as_ref()
    }

    /// The precomputed Queryable Encryption cipher state of the same 96-byte key (MongoDB uses
    /// one data key for both formats); `None` for other kinds.
    pub(crate) fn qe(&self) -> Option<&QeKey> {
        self.qe
            .get_or_init(|| {
                let bytes: &[u8; CSFLE_KEY_LEN] = self.material.expose_secret().try_into().ok()?;
                (self.kind == KeyKind::Csfle).then(|| QeKey::new(bytes))
            })
            .as_ref()
    }

    pub(crate) fn encryptions(&self) -> u64 {
        self.encryptions.load(Ordering::Relaxed)
    }

    /// Counts up to `n` (at least 1) random-nonce encryptions against `limit`: as many as are
    /// left, refusing only when none is.
    pub(crate) fn reserve_up_to(&self, n: u64, limit: u64) -> Result<u64, u64> {
        // A lease of one reservation's size is exactly that.
        self.reserve_lease(n, n, limit)
    }

    /// [`KeySecret::reserve_up_to`] for a thread's lease: `lease` encryptions (at least `n`)
    /// while the key has plenty left (at least [`LEASE_HEADROOM`] leases beyond the count),
    /// otherwise up to `n`, as `reserve_up_to` gives them. Near the limit, then, no thread holds more than one
    /// document's worth that other threads could have used.
    pub(crate) fn reserve_lease(&self, n: u64, lease: u64, limit: u64) -> Result<u64, u64> {
        if self.exhausted.load(Ordering::Acquire) {
            return Err(limit);
        }
        let n = n.max(1);
        let grant = move |c: u64| {
            let left = limit - c;
            if left / LEASE_HEADROOM >= lease {
                lease.max(n)
            } else {
                n.min(left)
            }
        };
        self.encryptions
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                (c < limit).then(|| c + grant(c))
            })
            .map(grant)
            .map_err(|_| limit)
    }

    /// Whether the key vault has said this key may make no more random-nonce encryptions.
    pub(crate) fn is_exhausted(&self) -> bool {
        self.exhausted.load(Ordering::Acquire)
    }

    /// Gives back `n` encryptions reserved with [`KeySecret::reserve_up_to`] and not made.
    /// After [`KeySecret::exhaust`] the count stays where it is.
    pub(crate) fn release(&self, n: u64) {
        if !self.exhausted.load(Ordering::Acquire) {
            self.encryptions.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// No more random-nonce encryptions with this key, in this process, for good: the counter
    /// goes to `limit` and reservations are refused even if walks in flight give back theirs.
    /// (Called when the key vault reports the budget spent.)
    #[cfg(any(test, feature = "mongodb"))]
    pub(crate) fn exhaust(&self, limit: u64) {
        self.exhausted.store(true, Ordering::Release);
        self.encryptions.fetch_max(limit, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(used: u64) -> KeySecret {
        KeySecret::new(KeyMaterial::generate(32), KeyKind::Fieldcrypt, used)
    }

    #[test]
    fn reserve_up_to_grants_what_is_left_and_release_gives_it_back() {
        let s = secret(95);
        assert_eq!(s.reserve_up_to(3, 100), Ok(3));
        assert_eq!(s.encryptions(), 98);
        assert_eq!(s.reserve_up_to(3, 100), Ok(2), "only two left");
        assert_eq!(s.reserve_up_to(3, 100), Err(100));
        assert_eq!(s.reserve_up_to(1, 100), Err(100));
        s.release(2);
        assert_eq!(s.encryptions(), 98);
        assert_eq!(s.reserve_up_to(0, 100), Ok(1), "asks for at least one");
    }

    #[test]
    fn leases_are_whole_while_plenty_is_left_and_a_document_near_the_limit() {
        let limit = 100 * LEASE_HEADROOM;
        let s = secret(0);
        assert_eq!(s.reserve_lease(3, 60, limit), Ok(60));
        assert_eq!(s.encryptions(), 60);
        assert_eq!(
            s.reserve_lease(80, 60, limit),
            Ok(80),
            "never less than a document"
        );
        // Fewer than LEASE_HEADROOM leases left: one document's worth, then what is left.
        let s = secret(limit - 60 * LEASE_HEADROOM + 1);
        assert_eq!(s.reserve_lease(3, 60, limit), Ok(3));
        let s = secret(limit - 2);
        assert_eq!(s.reserve_lease(3, 60, limit), Ok(2));
        assert_eq!(s.reserve_lease(3, 60, limit), Err(limit));
        s.release(2);
        assert_eq!(s.encryptions(), limit - 2);
        s.exhaust(limit);
        assert_eq!(s.reserve_lease(1, 1, limit), Err(limit));
        assert!(s.is_exhausted());
    }

    #[test]
    fn exhausted_stays_exhausted_when_reservations_are_given_back() {
        let s = secret(10);
        assert_eq!(s.reserve_up_to(8, 100), Ok(8)); // a walk in flight
        s.exhaust(100); // the key vault says the budget is spent
        s.release(8); // the walk ends
        assert!(s.encryptions() >= 100);
        assert_eq!(s.reserve_up_to(1, 100), Err(100));
        assert_eq!(s.reserve_up_to(1, 100), Err(100));
    }
}
