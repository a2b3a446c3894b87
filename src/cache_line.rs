//! A value alone on its cache lines, for state that threads write often: its writes then do
//! not evict what lies beside it from other cores' caches (false sharing).

/// `T`, aligned to 128 bytes and so alone on a 128-byte line: two 64-byte cache lines, as
/// x86's adjacent-line prefetchers fetch pairs.
#[derive(Default)]
#[repr(align(128))]
pub(crate) struct OwnLine<T>(pub T);

impl<T> core::ops::Deref for OwnLine<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbours_are_a_line_apart() {
        let two = [OwnLine(0u8), OwnLine(1u8)];
        let (a, b) = (&raw const two[0] as usize, &raw const two[1] as usize);
        assert_eq!(b - a, 128);
        assert_eq!(a % 128, 0);
    }
}
