//! Address newtypes, one per address space.

/// The page size every dmatx computation uses (spec §0: `PAGE_SIZE` = 4096).
pub const PAGE_SIZE: u64 = 4096;

/// Number of pages touched by `len` bytes starting at byte `page_offset` of a page.
///
/// `len == 0` spans no page. `page_offset` may exceed a page; only its offset within a page
/// counts.
///
/// ```
/// use dmatx_types::pages_spanned;
/// assert_eq!(pages_spanned(0, 4096), 1);
/// assert_eq!(pages_spanned(0x100, 8192), 3);
/// assert_eq!(pages_spanned(4095, 2), 2);
/// assert_eq!(pages_spanned(7, 0), 0);
/// ```
#[inline]
pub const fn pages_spanned(page_offset: u64, len: u64) -> u64 {
    if len == 0 {
        return 0;
    }
    let first = page_offset % PAGE_SIZE;
    // Written to avoid overflow for lengths near u64::MAX.
    let whole = len / PAGE_SIZE;
    let rest = len % PAGE_SIZE;
    whole + (first + rest).div_ceil(PAGE_SIZE)
}

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// The address `raw`.
            #[inline]
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }

            /// The raw address value.
            #[inline]
            pub const fn get(self) -> u64 {
                self.0
            }

            /// Offset of this address within its page.
            #[inline]
            pub const fn page_offset(self) -> u64 {
                self.0 % PAGE_SIZE
            }

            /// This address rounded down to its page.
            #[inline]
            pub const fn page_base(self) -> Self {
                Self(self.0 - self.0 % PAGE_SIZE)
            }

            /// `self + bytes`, or `None` on overflow.
            #[inline]
            pub const fn checked_add(self, bytes: u64) -> Option<Self> {
                match self.0.checked_add(bytes) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            /// Bytes from `base` up to `self`, or `None` if `self` lies below `base`.
            #[inline]
            pub const fn offset_from(self, base: Self) -> Option<u64> {
                self.0.checked_sub(base.0)
            }

            /// Whether the address is a multiple of `mask + 1` (`mask` is an alignment mask).
            #[inline]
            pub const fn is_aligned(self, mask: u64) -> bool {
                self.0 & mask == 0
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(f, "{}:{:#x}", stringify!($name), self.0)
            }
        }
    };
}

address_type!(
    /// A CPU physical address (a page frame plus offset): what the memory controller sees.
    PhysAddr
);
address_type!(
    /// A device-visible (bus, KMDF "logical") address: what a device is programmed with. Equal
    /// to the physical address only when the adapter maps directly.
    BusAddr
);
address_type!(
    /// A CPU virtual address of a buffer as its memory descriptor records it. dmatx never
    /// dereferences it; it locates a byte within the descriptor and gives page offsets.
    VirtAddr
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_spanned_matches_naive_count() {
        for off in [0u64, 1, 0x100, 4095] {
            for len in [0u64, 1, 4095, 4096, 4097, 8192, 12289] {
                let naive = if len == 0 {
                    0
                } else {
                    (off + len).div_ceil(PAGE_SIZE)
                };
                assert_eq!(pages_spanned(off, len), naive, "off {off} len {len}");
            }
        }
        // u64::MAX = 4096 × (2^52 − 1) + 4095, so 4095 + that spans 2^52 + 1 pages.
        assert_eq!(pages_spanned(4095, u64::MAX), (1 << 52) + 1);
    }

    #[test]
    fn address_helpers() {
        let a = PhysAddr::new(0x1_2345);
        assert_eq!(a.page_base(), PhysAddr::new(0x1_2000));
        assert_eq!(a.page_offset(), 0x345);
        assert_eq!(a.checked_add(u64::MAX), None);
        assert_eq!(a.offset_from(PhysAddr::new(0x1_0000)), Some(0x2345));
        assert_eq!(PhysAddr::new(1).offset_from(a), None);
        assert!(BusAddr::new(0x40).is_aligned(0xf));
        assert!(!BusAddr::new(0x41).is_aligned(0xf));
    }
}
