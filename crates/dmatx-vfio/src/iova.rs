//! The IOVA allocator: which I/O virtual addresses of the IOMMU domain are free.
//!
//! In IOMMU mode dmatx chooses the device addresses itself (spec §3.2: a map register is one
//! page of device-visible address space). The platform owns one [`IovaAllocator`] over a
//! configured window; each adapter takes one contiguous range of it for its map registers, and
//! each common buffer takes one for its pages. Devices see only addresses they can drive, so
//! every allocation names the highest address it may use.
//!
//! The allocator is a bitmap of pages with first-fit search, sized when it is made: allocating
//! and freeing never allocate memory.

use crate::error::{ErrorKind, VfioError, VfioResult};

const PAGE: u64 = 4096;

/// A page-granular first-fit allocator of the IOVA range `[base, base + size)`.
///
/// ```
/// use dmatx_vfio::IovaAllocator;
///
/// let mut iova = IovaAllocator::new(0x10_0000, 16 * 4096)?;
/// let a = iova.allocate(4, u64::MAX).unwrap();
/// assert_eq!(a, 0x10_0000);
/// // Only addresses up to 0x10_7fff: pages 4..8 are the last that fit.
/// assert_eq!(iova.allocate(4, 0x10_7fff), Some(0x10_4000));
/// assert_eq!(iova.allocate(1, 0x10_7fff), None);
/// assert!(iova.free(a, 4));
/// assert_eq!(iova.free_pages(), 12);
/// # Ok::<(), dmatx_vfio::VfioError>(())
/// ```
#[derive(Clone, Debug)]
pub struct IovaAllocator {
    base: u64,
    pages: u64,
    /// Bit set: the page is in use (allocated, or outside the usable ranges).
    used: Vec<u64>,
    /// Bit set: the page lies outside the usable ranges ([`IovaAllocator::retain_ranges`]).
    outside: Vec<u64>,
    /// Pages that can never be allocated.
    excluded: u64,
    free: u64,
}

impl IovaAllocator {
    /// An allocator of the `size` bytes of IOVA space from `base`, all free.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] if `base` or `size` is not page-aligned, `size` is zero,
    /// or the range runs past the end of the 64-bit space.
    pub fn new(base: u64, size: u64) -> VfioResult<Self> {
        let invalid = |why: &str| {
            VfioError::new(
                ErrorKind::InvalidArgument,
                "IOVA window",
                format!("[{base:#x}, +{size:#x}) {why}"),
            )
        };
        if !base.is_multiple_of(PAGE) || !size.is_multiple_of(PAGE) {
            return Err(invalid("is not page-aligned"));
        }
        if size == 0 {
            return Err(invalid("is empty"));
        }
        if base.checked_add(size - 1).is_none() {
            return Err(invalid("runs past the end of the address space"));
        }
        let pages = size / PAGE;
        let words =
            usize::try_from(pages.div_ceil(64)).map_err(|_| invalid("is too large to track"))?;
        let mut used = Vec::new();
        used.try_reserve_exact(words)
            .map_err(|_| invalid("is too large to track"))?;
        used.resize(words, 0);
        let mut outside = Vec::new();
        outside
            .try_reserve_exact(words)
            .map_err(|_| invalid("is too large to track"))?;
        outside.resize(words, 0);
        let mut a = Self {
            base,
            pages,
            used,
            outside,
            excluded: 0,
            free: pages,
        };
        // The bits past the last page of the last word are never free.
        let tail = pages % 64;
        if tail != 0
            && let Some(last) = a.used.last_mut()
        {
            *last = !0 << tail;
        }
        Ok(a)
    }

    /// Take every page that lies outside `ranges` (inclusive `(first, last)` address pairs, as
    /// the kernel reports the domain's valid IOVA ranges) out of use for good. Pages in use
    /// now are not touched. Returns the pages removed.
    pub fn retain_ranges(&mut self, ranges: &[(u64, u64)]) -> u64 {
        let mut removed = 0;
        for page in 0..self.pages {
            let start = self.base + page * PAGE;
            let end = start + (PAGE - 1);
            let inside = ranges.iter().any(|&(lo, hi)| lo <= start && end <= hi);
            if !inside && !self.is_used(page) {
                self.set(page, true);
                self.outside[(page / 64) as usize] |= 1 << (page % 64);
                self.free -= 1;
                self.excluded += 1;
                removed += 1;
            }
        }
        removed
    }

    /// The first address of the window.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Pages that can be allocated when nothing is in use (the window less the pages
    /// [`IovaAllocator::retain_ranges`] removed).
    pub fn total_pages(&self) -> u64 {
        self.pages - self.excluded
    }

    /// Pages free now.
    pub fn free_pages(&self) -> u64 {
        self.free
    }

    /// The lowest `pages` consecutive free pages whose last byte is at most `limit`
    /// (inclusive), marked in use; `None` if there is no such run (or `pages` is 0).
    pub fn allocate(&mut self, pages: u64, limit: u64) -> Option<u64> {
        if pages == 0 || pages > self.free {
            return None;
        }
        // Pages whose last byte is at most `limit`: those with index < usable.
        let usable = if limit < self.base {
            0
        } else {
            ((limit - self.base).saturating_add(1) / PAGE).min(self.pages)
        };
        let mut page = 0;
        let mut run = 0;
        while page < usable {
            let word = self.used[(page / 64) as usize];
            if page % 64 == 0 && word == !0 {
                run = 0;
                page += 64;
                continue;
            }
            if page % 64 == 0 && word == 0 && run + 64 < pages {
                run += 64;
                page += 64;
                continue;
            }
            if word & (1 << (page % 64)) == 0 {
                run += 1;
                if run == pages {
                    let first = page + 1 - pages;
                    for p in first..=page {
                        self.set(p, true);
                    }
                    self.free -= pages;
                    return Some(self.base + first * PAGE);
                }
            } else {
                run = 0;
            }
            page += 1;
        }
        None
    }

    /// Return `pages` pages from `iova`. Returns `false`, changing nothing, if the range is not
    /// wholly inside the window and in use (a double free, or a range never allocated).
    #[must_use = "false means the range was not allocated"]
    pub fn free(&mut self, iova: u64, pages: u64) -> bool {
        let Some(offset) = iova.checked_sub(self.base) else {
            return false;
        };
        if !offset.is_multiple_of(PAGE) || pages == 0 {
            return false;
        }
        let first = offset / PAGE;
        if first.checked_add(pages).is_none_or(|end| end > self.pages) {
            return false;
        }
        let outside = |p: u64| self.outside[(p / 64) as usize] & (1 << (p % 64)) != 0;
        if !(first..first + pages).all(|p| self.is_used(p) && !outside(p)) {
            return false;
        }
        for p in first..first + pages {
            self.set(p, false);
        }
        self.free += pages;
        true
    }

    fn is_used(&self, page: u64) -> bool {
        self.used[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    fn set(&mut self, page: u64, used: bool) {
        let word = &mut self.used[(page / 64) as usize];
        if used {
            *word |= 1 << (page % 64);
        } else {
            *word &= !(1 << (page % 64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_windows() {
        assert!(IovaAllocator::new(0x1001, 0x1000).is_err());
        assert!(IovaAllocator::new(0x1000, 0x1001).is_err());
        assert!(IovaAllocator::new(0x1000, 0).is_err());
        assert!(IovaAllocator::new(u64::MAX - 0xFFF, 0x2000).is_err());
        let top = IovaAllocator::new(u64::MAX - 0xFFF, 0x1000).unwrap();
        assert_eq!(top.total_pages(), 1);
    }

    #[test]
    fn first_fit_below_the_limit() {
        let mut a = IovaAllocator::new(0x10_0000, 200 * PAGE).unwrap();
        assert_eq!(a.total_pages(), 200);
        let x = a.allocate(3, u64::MAX).unwrap();
        let y = a.allocate(130, u64::MAX).unwrap();
        assert_eq!((x, y), (0x10_0000, 0x10_3000));
        assert!(a.free(x, 3));
        assert!(!a.free(x, 3), "double free");
        assert!(!a.free(y + PAGE, 200), "past the window");
        assert!(!a.free(0x1000, 1), "below the window");
        // The hole of three pages is found first.
        assert_eq!(a.allocate(2, u64::MAX), Some(0x10_0000));
        // 67 pages left above y's run; a limit inside it cuts the usable part.
        let limit = 0x10_0000 + 140 * PAGE - 1;
        assert_eq!(a.allocate(10, limit), None);
        assert_eq!(a.allocate(7, limit), Some(0x10_0000 + 133 * PAGE));
        assert_eq!(a.allocate(1, 0xF_FFFF), None, "limit below the window");
        assert_eq!(a.allocate(0, u64::MAX), None);
        assert_eq!(a.free_pages(), 200 - 2 - 130 - 7);
        assert!(a.free(0x10_0000, 2));
        assert!(a.free(y, 130));
        assert!(a.free(0x10_0000 + 133 * PAGE, 7));
        assert_eq!(a.free_pages(), 200);
        assert_eq!(a.allocate(200, u64::MAX), Some(0x10_0000));
        assert_eq!(a.allocate(1, u64::MAX), None);
    }

    #[test]
    fn valid_ranges_remove_pages() {
        let mut a = IovaAllocator::new(0, 16 * PAGE).unwrap();
        // Pages 2..=5 and 10..=15 are valid.
        let removed = a.retain_ranges(&[(2 * PAGE, 6 * PAGE - 1), (10 * PAGE, u64::MAX)]);
        assert_eq!(removed, 6);
        assert_eq!((a.total_pages(), a.free_pages()), (10, 10));
        assert_eq!(a.allocate(5, u64::MAX), Some(10 * PAGE));
        assert_eq!(a.allocate(4, u64::MAX), Some(2 * PAGE));
        assert_eq!(a.allocate(1, u64::MAX), Some(15 * PAGE));
        assert_eq!(a.allocate(1, u64::MAX), None);
        assert!(!a.free(0, 1), "an excluded page was never allocated");
    }

    /// Against a plain reference model: a vector of booleans searched page by page.
    #[test]
    fn agrees_with_a_reference_model() {
        let pages = 300u64;
        let mut a = IovaAllocator::new(0x4000_0000, pages * PAGE).unwrap();
        let mut model = vec![false; pages as usize];
        let mut live: Vec<(u64, u64)> = Vec::new();
        let mut rng = 0x1234_5678_9abc_def1u64;
        for _ in 0..5000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if !rng.is_multiple_of(3) || live.is_empty() {
                let n = 1 + rng % 70;
                let limit = 0x4000_0000 + (rng >> 20) % (pages * PAGE + PAGE);
                let want = (0..pages).find(|&p| {
                    p + n <= pages
                        && 0x4000_0000 + (p + n) * PAGE - 1 <= limit
                        && (p..p + n).all(|q| !model[q as usize])
                });
                let got = a.allocate(n, limit);
                assert_eq!(got, want.map(|p| 0x4000_0000 + p * PAGE));
                if let Some(p) = want {
                    for q in p..p + n {
                        model[q as usize] = true;
                    }
                    live.push((0x4000_0000 + p * PAGE, n));
                }
            } else {
                let (iova, n) = live.swap_remove((rng >> 32) as usize % live.len());
                assert!(a.free(iova, n));
                let p = (iova - 0x4000_0000) / PAGE;
                for q in p..p + n {
                    model[q as usize] = false;
                }
            }
            assert_eq!(a.free_pages(), model.iter().filter(|u| !**u).count() as u64);
        }
    }
}
