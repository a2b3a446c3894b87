//! A key's usage lease in memory: what this process has reserved of the key's budget of
//! random-nonce encryptions, and when to ask for more. No I/O: the reservations themselves are
//! made by `usage.rs`, which updates the [`LeaseCell`] shared by the key's cache entries.

use std::sync::atomic::{AtomicU64, Ordering};

/// The first lease of a key in a process.
pub(super) const MIN_LEASE: u64 = 4096;

/// A lease, shared by every snapshot of one unwrapped key: the lease itself (changed only by
/// one reservation at a time), and what the synchronous lookups read of it without waiting.
pub(super) struct LeaseCell {
    pub(super) lease: tokio::sync::Mutex<Lease>,
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

    pub(super) fn publish(&self, lease: &Lease) {
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
    pub(super) closed: bool,
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
    pub(super) fn wanted(&self, counter: u64) -> u64 {
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

    pub(super) fn reserved_to(&self) -> u64 {
        self.base.saturating_add(self.granted)
    }

    pub(super) fn grant(&mut self, n: u64) {
        self.granted = self.granted.saturating_add(n);
        self.last = n;
        self.next = self.next.saturating_mul(2).min(self.max);
    }
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
