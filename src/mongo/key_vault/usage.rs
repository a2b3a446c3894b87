//! Usage leases: how processes share one key's budget of random-nonce encryptions.
//!
//! AES-256-GCM and ChaCha20-Poly1305 allow [`RANDOM_NONCE_LIMIT`] encryptions per key. Each
//! process counts its own in memory (the key's counter, checked on every encryption by the
//! core); the vault's `fieldcrypt.encryptions` counts what all processes have *reserved*. A
//! process reserves a block (a lease) with `$inc` before it encrypts, in
//! `KeySource::prefetch_aliases`, and renews it once less than half of the last block is left:
//! at the next prefetch, or at once, in the background, when a synchronous lookup of the
//! alias's primary sees the counter cross that point (see [`LeaseCell::renewal_due`]). So the
//! stored count runs ahead of real use. A lease is refused when it would take the stored count
//! past the limit; the key is then worn out in this process too.
//!
//! Leases start at [`MIN_LEASE`] and double with each renewal up to the vault's configured
//! maximum, so a process that encrypts little wastes little when it exits (its unused lease is
//! lost: the count stays conservative).
//!
//! The remaining gap: the core's counter cannot be capped at the lease, so encryptions made
//! between the counter crossing the renewal point and the renewal landing (one round trip, or
//! until the next prefetch without a Tokio runtime) may run past the reservation if they use
//! more than half a block; the renewal then reserves the difference too. See
//! `docs/KEY_VAULT.md`, "Usage leases".
//!
//! The stored count is not authenticated (anyone who can write the key vault can lower it).
//! A process never lowers its own counter for a reason read from the vault, and when it sees
//! the stored count below what it knows was reserved, it raises it back with `$max` and logs
//! a warning (see `KeyCache::observe_stored`).

use std::sync::atomic::{AtomicU64, Ordering};

use bson::{doc, Bson, Document};
use mongodb::options::ReturnDocument;
use mongodb::Collection;

use super::cache::{KeyCache, KeyEntry};
use super::document::{ENCRYPTIONS, FIELDCRYPT, ID, KEY_MATERIAL};
use crate::error::Result;
use crate::key::{KeyId, KeyKind, KeyState};
use crate::suite::RANDOM_NONCE_LIMIT;

/// The first lease of a key in a process.
pub(super) const MIN_LEASE: u64 = 4096;

/// A lease, shared by every snapshot of one unwrapped key: the lease itself (changed only by
/// one reservation at a time), and what the synchronous lookups read of it without waiting.
pub(super) struct LeaseCell {
    lease: tokio::sync::Mutex<Lease>,
    /// The counter value from which [`Lease::wanted`] asks for a renewal (`u64::MAX`: none).
    renew_at: AtomicU64,
    /// `base + granted`: the stored count the vault must have reached, at least.
    reserved_to: AtomicU64,
}

impl LeaseCell {
    pub(super) fn new(base: u64, max: u64) -> Self {
        let lease = Lease::new(base, max);
        LeaseCell {
            renew_at: AtomicU64::new(lease.renew_at()),
            reserved_to: AtomicU64::new(lease.reserved_to()),
            lease: tokio::sync::Mutex::new(lease),
        }
    }

    /// Whether a key whose counter is `counter` needs a renewal now (what the next prefetch
    /// would reserve). One atomic load: the synchronous `primary` lookup asks on every call.
    pub(super) fn renewal_due(&self, counter: u64) -> bool {
        counter >= self.renew_at.load(Ordering::Relaxed)
    }

    /// The stored count this process knows the vault reached: the count when the key was
    /// loaded here plus every reservation made here since.
    pub(super) fn reserved_to(&self) -> u64 {
        self.reserved_to.load(Ordering::Relaxed)
    }

    fn publish(&self, lease: &Lease) {
        self.reserved_to
            .store(lease.reserved_to(), Ordering::Relaxed);
        self.renew_at.store(lease.renew_at(), Ordering::Relaxed);
    }
}

/// What this process has reserved for one unwrapped key.
pub(super) struct Lease {
    /// The stored count the key's lease started from (what was reserved before).
    base: u64,
    /// Encryptions reserved in the vault by this process for this key.
    granted: u64,
    /// The size of the last lease, and of the next.
    last: u64,
    next: u64,
    max: u64,
    /// No more reservations: the budget is spent, or the key is gone from the vault.
    closed: bool,
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
            closed: false,
        }
    }

    /// How many encryptions to reserve now, given the key's counter: none while at least half
    /// of the last lease is left; otherwise a lease, plus whatever was used beyond the
    /// reservation.
    fn wanted(&self, counter: u64) -> u64 {
        if self.closed {
            return 0;
        }
        let used = counter.saturating_sub(self.base);
        if self.granted == 0 {
            return self.next.saturating_add(used);
        }
        let remaining = self.granted.saturating_sub(used);
        let deficit = used.saturating_sub(self.granted);
        if deficit == 0 && remaining >= self.last / 2 {
            0
        } else {
            self.next.saturating_add(deficit)
        }
    }

    /// The smallest counter for which [`Lease::wanted`] is not zero.
    fn renew_at(&self) -> u64 {
        if self.closed {
            u64::MAX
        } else if self.granted == 0 {
            0
        } else {
            // wanted > 0  ⇔  granted - used < last / 2  ⇔  used ≥ granted - last / 2 + 1.
            self.base
                .saturating_add(self.granted - self.last / 2)
                .saturating_add(1)
        }
    }

    fn reserved_to(&self) -> u64 {
        self.base.saturating_add(self.granted)
    }

    fn grant(&mut self, n: u64) {
        self.granted = self.granted.saturating_add(n);
        self.last = n;
        self.next = self.next.saturating_mul(2).min(self.max);
    }
}

/// Makes sure this process holds a lease for `entry`'s key before it encrypts with it (called
/// by the prefetches, and by the background task when a lookup saw a renewal due).
pub(super) async fn ensure_lease(
    coll: &Collection<Document>,
    cache: &KeyCache,
    entry: &KeyEntry,
) -> Result<()> {
    let key = &entry.key;
    if key.kind() != KeyKind::Fieldcrypt || key.state() != KeyState::Primary {
        return Ok(());
    }
    // Held across the round trip: concurrent prefetches wait and then find the lease renewed.
    let mut lease = entry.lease.lease.lock().await;
    let amount = lease.wanted(key.encryptions());
    if amount == 0 {
        return Ok(());
    }
    let outcome = reserve(coll, key.id(), amount).await;
    match outcome? {
        Reservation::Granted { n, stored } => {
            lease.grant(n);
            tracing::debug!(key = %key.id(), reserved = n, "usage lease");
            // The count after our own `$inc` cannot be below what we know was reserved,
            // unless something other than fieldcrypt lowered it meanwhile.
            let floor = cache
                .observe_stored(key.id(), stored)
                .max(lease.reserved_to());
            if stored < floor {
                restore_count(coll, key.id(), stored, floor).await?;
                cache.observe_stored(key.id(), floor);
            }
        }
        Reservation::Exhausted => {
            lease.closed = true;
            // Nothing more may be encrypted with this key anywhere: use up the in-memory budget
            // so the core refuses with `KeyUsageLimit` (rotate the alias).
            if let Ok(secret) = key.for_encrypt() {
                secret.exhaust(RANDOM_NONCE_LIMIT);
            }
            tracing::warn!(key = %key.id(), "key has used up its random-nonce encryptions; rotate its alias");
        }
        // Destroyed or deleted meanwhile: the next reload notices; stop asking until then.
        Reservation::Gone => lease.closed = true,
    }
    entry.lease.publish(&lease);
    Ok(())
}

/// Raises a key's stored count back to `floor` (`$max`, so never lowers it) after it was read
/// as `stored`, below what this process knows was reserved. Logs a warning if the count was
/// really lower (not merely read before a reservation of this process landed): something other
/// than fieldcrypt (or a restored backup) lowered it.
pub(super) async fn restore_count(
    coll: &Collection<Document>,
    id: KeyId,
    stored: u64,
    floor: u64,
) -> Result<()> {
    let floor_i = i64::try_from(floor).unwrap_or(i64::MAX);
    let r = coll
        .update_one(
            doc! {
                ID: id.to_binary(),
                KEY_MATERIAL: { "$exists": true },
                "$or": [
                    { ENCRYPTIONS: { "$lt": floor_i } },
                    { ENCRYPTIONS: { "$exists": false } },
                ],
            },
            doc! { "$max": { ENCRYPTIONS: floor_i } },
        )
        .await?;
    if r.modified_count > 0 {
        tracing::warn!(
            key = %id,
            stored,
            reserved = floor,
            "fieldcrypt.encryptions in the key vault was lower than this process knows was \
             reserved (written by something other than fieldcrypt, or a restored backup): raised \
             it back"
        );
    }
    Ok(())
}

enum Reservation {
    /// `n` encryptions reserved; the stored count is now `stored`.
    Granted {
        n: u64,
        stored: u64,
    },
    Exhausted,
    /// The key was destroyed or deleted meanwhile; the next reload notices.
    Gone,
}

fn stored_count(doc: &Document) -> i64 {
    doc.get_document(FIELDCRYPT)
        .ok()
        .and_then(|f| f.get("encryptions"))
        .and_then(|v| match *v {
            Bson::Int64(n) => Some(n),
            Bson::Int32(n) => Some(i64::from(n)),
            _ => None,
        })
        .unwrap_or(0)
}

/// Adds `amount` to the key's stored count unless that passes the limit, in which case it
/// reserves what is left. Atomic per document, so concurrent processes never over-reserve.
async fn reserve(coll: &Collection<Document>, id: KeyId, amount: u64) -> Result<Reservation> {
    let limit = i64::try_from(RANDOM_NONCE_LIMIT).unwrap_or(i64::MAX);
    let amount_i = i64::try_from(amount).unwrap_or(i64::MAX).min(limit);
    let id = id.to_binary();
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
    if let Some(after) = granted {
        return Ok(Reservation::Granted {
            n: u64::try_from(amount_i).unwrap_or(0),
            stored: u64::try_from(stored_count(&after)).unwrap_or(0),
        });
    }
    // Near the limit (or gone): take exactly what is left, compare-and-set on the count.
    for _ in 0..8 {
        let Some(doc) = coll
            .find_one(doc! { ID: id.clone(), KEY_MATERIAL: { "$exists": true } })
            .await?
        else {
            return Ok(Reservation::Gone);
        };
        let current = stored_count(&doc);
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
            return Ok(Reservation::Granted {
                n: u64::try_from(limit - current).unwrap_or(0),
                stored: RANDOM_NONCE_LIMIT,
            });
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
        l.closed = true;
        assert_eq!(l.wanted(1 << 30), 0);
        assert_eq!(l.renew_at(), u64::MAX);
    }

    #[test]
    fn renew_at_is_where_wanted_starts() {
        for (base, max, grants) in [(0, 1 << 20, 0), (100, 1 << 20, 1), (7, 5000, 3), (0, 1, 4)] {
            let mut l = Lease::new(base, max);
            for _ in 0..grants {
                let n = l.next;
                l.grant(n);
            }
            let at = l.renew_at();
            assert!(at == 0 || l.wanted(at - 1) == 0, "{base} {max} {grants}");
            assert!(l.wanted(at) > 0, "{base} {max} {grants}");
            assert!(l.wanted(at + 1) > 0);
            assert_eq!(l.reserved_to(), base + l.granted);
        }
    }
}
