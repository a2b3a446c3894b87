//! Usage leases: how processes share one key's budget of random-nonce encryptions. The
//! round trips to the vault live here; the in-memory lease they update is in `lease.rs`.
//!
//! AES-256-GCM and ChaCha20-Poly1305 allow [`RANDOM_NONCE_LIMIT`] encryptions per key. Each
//! process counts its own in memory (the key's counter, checked on every encryption by the
//! core); the vault's `fieldcrypt.encryptions` counts what all processes have *reserved*. A
//! process reserves a block (a lease) with `$inc` before it encrypts, in
//! `KeySource::prefetch_aliases`, and renews it once less than half of the last block is left:
//! at the next prefetch, or at once, in the background, when a synchronous lookup of the
//! alias's primary sees the counter cross that point (see `LeaseCell::renewal_due` in
//! `lease.rs`). So the stored count runs ahead of real use. A lease is refused when it would
//! take the stored count past the limit; the key is then worn out in this process too.
//!
//! Leases start at `MIN_LEASE` and double with each renewal up to the vault's configured
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

use bson::{doc, Bson, Document};
use mongodb::options::ReturnDocument;
use mongodb::Collection;

use super::cache::{KeyCache, KeyEntry};
use super::document::{ENCRYPTIONS, FIELDCRYPT, ID, KEY_MATERIAL};
use crate::error::Result;
use crate::key::{KeyId, KeyKind, KeyState};
use crate::suite::RANDOM_NONCE_LIMIT;

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
