//! How a transaction is cut into transfers: page and register arithmetic over a buffer chain
//! (spec §3.2).
//!
//! Everything here is pure arithmetic over a [`MemoryDescriptor`]'s segment lengths and page
//! offsets; nothing touches memory or the platform, so it is tested directly against a naive
//! model.

use dmatx_hal::{MemoryDescriptor, PAGE_SIZE};
use dmatx_types::pages_spanned;

/// Pages spanned by `length` bytes of `buffer` from chain offset `offset`, counted per segment
/// (each segment's first and last pages count even when they share a frame with a neighbour):
/// the number of map registers, and the worst-case SG elements, those bytes need.
///
/// Bytes past the end of the chain are not counted.
pub(crate) fn pages_in_range<D: MemoryDescriptor + ?Sized>(
    buffer: &D,
    offset: u64,
    length: u64,
) -> u64 {
    let mut skip = offset;
    let mut left = length;
    let mut pages = 0;
    for i in 0..buffer.segment_count() {
        if left == 0 {
            break;
        }
        let seg = buffer.segment(i);
        if skip >= seg.length {
            skip -= seg.length;
            continue;
        }
        let take = (seg.length - skip).min(left);
        pages += pages_spanned(seg.va.page_offset() + skip, take);
        left -= take;
        skip = 0;
    }
    pages
}

/// The longest prefix (≤ `length` bytes) of the range at `offset` whose pages fit in `budget`
/// map registers, and the pages it spans. Cuts inside a segment at a page boundary when a whole
/// segment does not fit. Returns `(0, 0)` only if `budget` is 0 or the range is empty.
pub(crate) fn fit_to_registers<D: MemoryDescriptor + ?Sized>(
    buffer: &D,
    offset: u64,
    length: u64,
    budget: u64,
) -> (u64, u64) {
    let mut skip = offset;
    let mut left = length;
    let mut bytes = 0;
    let mut pages = 0;
    for i in 0..buffer.segment_count() {
        if left == 0 {
            break;
        }
        let seg = buffer.segment(i);
        if skip >= seg.length {
            skip -= seg.length;
            continue;
        }
        let start = seg.va.page_offset() + skip;
        let take = (seg.length - skip).min(left);
        let need = pages_spanned(start, take);
        if pages + need <= budget {
            pages += need;
            bytes += take;
            left -= take;
            skip = 0;
            continue;
        }
        // Take as many whole pages of this segment as the budget allows.
        let room = budget - pages;
        if room > 0 {
            let first = start % PAGE_SIZE;
            let fit = room * PAGE_SIZE - first;
            bytes += fit.min(take);
            pages += room;
        }
        break;
    }
    (bytes, pages)
}

/// The first chunk at which the SG pre-check of Initialize fails: walks the range in chunks of
/// `min(remaining, fragment)` and returns the first chunk needing more than `max_elements`
/// pages (spec §3.2.2; the page count stands in for SG elements even where pages are physically
/// contiguous, statement 31).
pub(crate) fn first_too_fragmented<D: MemoryDescriptor + ?Sized>(
    buffer: &D,
    offset: u64,
    length: u64,
    fragment: u64,
    max_elements: u64,
) -> Option<u64> {
    let mut done = 0;
    while done < length {
        let chunk = (length - done).min(fragment);
        if pages_in_range(buffer, offset + done, chunk) > max_elements {
            return Some(offset + done);
        }
        done += chunk;
    }
    None
}

/// Map registers a packet run holds from Execute to its final completion (spec §3.2.1): the
/// pages of the whole transaction if the first transfer covers it, otherwise the worst case for
/// a transfer of the first transfer's length starting at the last byte of a page, so that any
/// later transfer (moved by partial completions) still fits.
pub(crate) fn packet_run_registers<D: MemoryDescriptor + ?Sized>(
    buffer: &D,
    offset: u64,
    length: u64,
    fragment: u64,
) -> u64 {
    let first = length.min(fragment);
    let worst = pages_spanned(PAGE_SIZE - 1, first);
    if first == length {
        // A chained buffer can span more pages than the worst case of one segment, but a
        // packet transfer never crosses a break in its bus addresses, so the worst case of a
        // single run still bounds what any transfer maps.
        pages_in_range(buffer, offset, length).min(worst)
    } else {
        worst
    }
}

/// Elements a direct mapping of the range would need: runs of physically consecutive bytes,
/// never joined across segments. Used by the single-transfer checks (spec §3.2.4), where KMDF
/// asks the HAL; it is exact for direct mapping and an upper bound behind an IOMMU.
pub(crate) fn physical_runs<D: MemoryDescriptor + ?Sized>(
    buffer: &D,
    offset: u64,
    length: u64,
) -> u64 {
    let mut skip = offset;
    let mut left = length;
    let mut runs = 0;
    for i in 0..buffer.segment_count() {
        if left == 0 {
            break;
        }
        let seg = buffer.segment(i);
        if skip >= seg.length {
            skip -= seg.length;
            continue;
        }
        let take = (seg.length - skip).min(left);
        let first_page = (seg.va.page_offset() + skip) / PAGE_SIZE;
        let pages = pages_spanned(seg.va.page_offset() + skip, take);
        runs += 1;
        for p in first_page + 1..first_page + pages {
            let (Some(prev), Some(this)) =
                (seg.frames.get(p as usize - 1), seg.frames.get(p as usize))
            else {
                break;
            };
            if prev.page_base().get().checked_add(PAGE_SIZE) != Some(this.page_base().get()) {
                runs += 1;
            }
        }
        left -= take;
        skip = 0;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use dmatx_hal::{PhysAddr, Segment, VirtAddr};

    /// A chain of (page offset, length) segments with made-up frames.
    struct Chain {
        segs: Vec<(u64, u64, Vec<PhysAddr>)>,
    }

    impl Chain {
        fn new(parts: &[(u64, u64)]) -> Self {
            let segs = parts
                .iter()
                .enumerate()
                .map(|(i, &(off, len))| {
                    let pages = pages_spanned(off, len) as usize;
                    let frames = (0..pages)
                        .map(|p| PhysAddr::new(((i * 100 + p) as u64) * PAGE_SIZE))
                        .collect();
                    ((i as u64) << 32 | off, len, frames)
                })
                .collect();
            Self { segs }
        }
    }

    // SAFETY: test-only descriptor; its frames are made-up numbers that no device touches.
    #[expect(unsafe_code, reason = "a test descriptor implements the unsafe trait")]
    unsafe impl MemoryDescriptor for Chain {
        fn segment_count(&self) -> usize {
            self.segs.len()
        }
        fn segment(&self, index: usize) -> Segment<'_> {
            let (va, len, ref frames) = self.segs[index];
            Segment {
                va: VirtAddr::new(va),
                length: len,
                frames,
            }
        }
    }

    /// Naive model: walk byte by byte, counting (segment, page) pairs.
    fn naive_pages(c: &Chain, offset: u64, length: u64) -> u64 {
        let mut seen: Vec<(usize, u64)> = Vec::new();
        let mut pos = 0;
        for (i, (va, len, _)) in c.segs.iter().enumerate() {
            for b in 0..*len {
                if pos >= offset && pos < offset + length {
                    let page = ((va % PAGE_SIZE) + b) / PAGE_SIZE;
                    if !seen.contains(&(i, page)) {
                        seen.push((i, page));
                    }
                }
                pos += 1;
            }
        }
        seen.len() as u64
    }

    #[test]
    fn pages_in_range_matches_naive_model() {
        let c = Chain::new(&[(0x100, 5000), (0, 4096), (4000, 300), (17, 9000)]);
        let total = c.total_length();
        for offset in [0, 1, 3995, 3996, 5000, 9096, 9396, total - 1] {
            for length in [1, 95, 4096, 4097, 10_000, total] {
                let length = length.min(total - offset);
                assert_eq!(
                    pages_in_range(&c, offset, length),
                    naive_pages(&c, offset, length),
                    "offset {offset} length {length}"
                );
            }
        }
    }

    #[test]
    fn fit_to_registers_never_exceeds_budget_and_is_maximal() {
        let c = Chain::new(&[(0x100, 5000), (0, 4096), (4000, 300), (17, 9000)]);
        let total = c.total_length();
        for offset in [0, 7, 4999, 5000, 9100] {
            for budget in 1..8 {
                let (bytes, pages) = fit_to_registers(&c, offset, total - offset, budget);
                assert!(bytes > 0, "budget {budget} must make progress");
                assert!(pages <= budget);
                assert_eq!(pages, pages_in_range(&c, offset, bytes));
                if offset + bytes < total {
                    assert!(
                        pages_in_range(&c, offset, bytes + 1) > budget,
                        "offset {offset} budget {budget}: one more byte would still fit"
                    );
                }
            }
        }
    }

    #[test]
    fn sg_precheck_counts_pages_not_elements() {
        // Statement 30: 8 KiB at page offset 0x100 spans 3 pages.
        let c = Chain::new(&[(0x100, 8192)]);
        assert_eq!(first_too_fragmented(&c, 0, 8192, 8192, 2), Some(0));
        let aligned = Chain::new(&[(0, 8192)]);
        assert_eq!(first_too_fragmented(&aligned, 0, 8192, 8192, 2), None);
        // Smaller fragments make each chunk fit.
        assert_eq!(first_too_fragmented(&c, 0, 8192, 4096, 2), None);
    }

    #[test]
    fn packet_run_registers_worst_case() {
        let c = Chain::new(&[(0x100, 64 * 1024)]);
        // Whole transaction in one transfer: its own pages.
        assert_eq!(packet_run_registers(&c, 0, 4096, 8192), 2);
        // Several transfers of 8 KiB: worst case 3 pages.
        assert_eq!(packet_run_registers(&c, 0, 64 * 1024, 8192), 3);
    }
}
