//! Usage leases: how processes share one key's budget of random-nonce encryptions.
//!
//! AES-256-GCM and ChaCha20-Poly1305 allow [`RANDOM_NONCE_LIMIT`] encryptions per key. Each
//! process counts its own in memory (the key's counter, checked on every encryption by the
//! core); the vault's `fieldcrypt.encryptions` counts what all processes have *reserved*. A
//! process reserves a block (a lease) with `$inc` before it encrypts, in
//! `KeySource::prefetch_aliases`, and renews it there when less than half is left, so the
//! stored count runs ahead of real use. A lease is refused when it would take the stored count
//! past the limit; the key is then worn out in this process too.
//!
//! Leases start at [`MIN_LEASE`] and double with each renewal up to the vault's configured
//! maximum, so a process that encrypts little wastes little when it exits (its unused lease is
//! lost: the count stays conservative).
//!
//! The trade-off: the core's counter cannot be capped at the lease, so a single batch that
//! encrypts more than half a lease after a prefetch runs past the reservation until the next
//! prefetch, which then reserves the difference too. Keep the maximum lease above your largest
//! batch (the default, 2^20, covers batches of half a million values).

use bson::{doc, Document};
use mongodb::options::ReturnDocument;
use mongodb::Collection;

use super::cache::KeyEntry;
use super::document::{ENCRYPTIONS, ID, KEY_MATERIAL};
use crate::error::Result;
use crate::key::{KeyKind, KeyState};
use crate::suite::RANDOM_NONCE_LIMIT;

/// The first lease of a key in a process.
pub(super) const MIN_LEASE: u64 = 4096;

/// A lease, shared by every snapshot of one unwrapped key.
pub(super) type LeaseCell = tokio::sync::Mutex<Lease>;

/// What this process has reserved for one unwrapped key.
pub(super) struct Lease {
    /// The key's counter when it was unwrapped here.
    base: u64,
    /// Encryptions reserved in the vault by this process for this key.
    granted: u64,
    /// The size of the last lease, and of the next.
    last: u64,
    next: u64,
    max: u64,
    exhausted: bool,
}

impl Lease {
    pub(super) fn new(base: u64, max: u64) -> Self {
        let max = max.max(1);
        Lease {
            base,
            granted: 0,
            last: 0,
            next: MIN_LEASE.min(max),
            max,
            exhausted: false,
        }
    }

    /// How many encryptions to reserve now, given the key's counter: none while at least half
    /// of the last lease is left; otherwise a lease, plus whatever was used beyond the
    /// reservation.
    fn wanted(&self, counter: u64) -> u64 {
        if self.exhausted {
            return 0;
        }
        let used = counter.saturating_sub(self.base);
        if self.granted == 0 {
            return self.next + used;
        }
        let remaining = self.granted.saturating_sub(used);
        let deficit = used.saturating_sub(self.granted);
        if deficit == 0 && remaining >= self.last / 2 {
            0
        } else {
            self.next + deficit
        }
    }

    fn grant(&mut self, n: u64) {
        self.granted = self.granted.saturating_add(n);
        self.last = n;
        self.next = self.next.saturating_mul(2).min(self.max);
    }
}

/// Makes sure this process holds a lease for `entry`'s key before it encrypts with it.
pub(super) async fn ensure_lease(coll: &Collection<Document>, entry: &KeyEntry) -> Result<()> {
    let key = &entry.key;
    if key.kind() != KeyKind::Fieldcrypt || key.state() != KeyState::Primary {
        return Ok(());
    }
    // Held across the round trip: concurrent prefetches wait and then find the lease renewed.
    let mut lease = entry.lease.lock().await;
    let amount = lease.wanted(key.encryptions());
    if amount == 0 {
        return Ok(());
    }
    match reserve(coll, key, amount).await? {
        Reservation::Granted(n) => {
            lease.grant(n);
            tracing::debug!(key = %key.id(), reserved = n, "usage lease");
        }
        Reservation::Exhausted => {
            lease.exhausted = true;
            // Nothing more may be encrypted with this key anywhere: use up the in-memory budget
            // so the core refuses with `KeyUsageLimit` (rotate the alias).
            if let Ok(secret) = key.for_encrypt() {
                while secret.encryptions() < RANDOM_NONCE_LIMIT {
                    let rest = RANDOM_NONCE_LIMIT - secret.encryptions();
                    if secret.reserve(rest, RANDOM_NONCE_LIMIT).is_ok() {
                        break;
                    }
                }
            }
            tracing::warn!(key = %key.id(), "key has used up its random-nonce encryptions; rotate its alias");
        }
        Reservation::Gone => {}
    }
    Ok(())
}

enum Reservation {
    Granted(u64),
    Exhausted,
    /// The key was destroyed or deleted meanwhile; the next reload notices.
    Gone,
}

/// Adds `amount` to the key's stored count unless that passes the limit, in which case it
/// reserves what is left. Atomic per document, so concurrent processes never over-reserve.
async fn reserve(
    coll: &Collection<Document>,
    key: &crate::key::Key,
    amount: u64,
) -> Result<Reservation> {
    let limit = i64::try_from(RANDOM_NONCE_LIMIT).unwrap_or(i64::MAX);
    let amount_i = i64::try_from(amount).unwrap_or(i64::MAX).min(limit);
    let id = key.id().to_binary();
    let granted = coll
        .find_one_and_update(
            doc! {
                ID: id.clone(),
                KEY_MATERIAL: { "$exists": true },
                "$or": [
                    { ENCRYPTIONS: { "$exists": false } },
                    { ENCRYPTIONS: { "$lte": limit - amount_i } },
                ],
            },
            doc! { "$inc": { ENCRYPTIONS: amount_i } },
        )
        .return_document(ReturnDocument::After)
        .await?;
    if granted.is_some() {
        return Ok(Reservation::Granted(amount));
    }
    // Near the limit (or gone): take exactly what is left, compare-and-set on the count.
    for _ in 0..8 {
        let Some(doc) = coll
            .find_one(doc! { ID: id.clone(), KEY_MATERIAL: { "$exists": true } })
            .await?
        else {
            return Ok(Reservation::Gone);
        };
        let current = doc
            .get_document("fieldcrypt")
            .ok()
            .and_then(|f| f.get("encryptions"))
            .and_then(|v| match *v {
                bson::Bson::Int64(n) => Some(n),
                bson::Bson::Int32(n) => Some(i64::from(n)),
                _ => None,
            })
            .unwrap_or(0);
        if current >= limit {
            return Ok(Reservation::Exhausted);
        }
        let set = coll
            .update_one(
                doc! { ID: id.clone(), ENCRYPTIONS: current },
                doc! { "$set": { ENCRYPTIONS: limit } },
            )
            .await?;
        if set.modified_count == 1 {
            return Ok(Reservation::Granted(
                u64::try_from(limit - current).unwrap_or(0),
            ));
        }
    }
    // Lost the race eight times to other processes taking the last encryptions.
    Ok(Reservation::Exhausted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_grow_and_renew_at_half() {
        let mut l = Lease::new(100, 1 << 20);
        assert_eq!(l.wanted(100), MIN_LEASE);
        l.grant(MIN_LEASE);
        assert_eq!(l.wanted(100 + MIN_LEASE / 2 - 1), 0);
        assert_eq!(l.wanted(100 + MIN_LEASE / 2 + 1), 2 * MIN_LEASE);
        l.grant(2 * MIN_LEASE);
        // Overshoot: the deficit is reserved on top of the next lease.
        assert_eq!(l.wanted(100 + 3 * MIN_LEASE + 10), 4 * MIN_LEASE + 10);
    }

    #[test]
    fn leases_are_capped() {
        let mut l = Lease::new(0, 5000);
        assert_eq!(l.wanted(0), MIN_LEASE);
        l.grant(MIN_LEASE);
        l.grant(5000);
        assert_eq!(l.next, 5000);
        l.exhausted = true;
        assert_eq!(l.wanted(1 << 30), 0);
    }
}
