//! How a transaction is cut into transfers: page and register arithmetic over a buffer chain
//! (spec §3.2).
//!
//! Everything here is pure arithmetic over a [`MemoryDescriptor`]'s segment lengths and page
//! offsets; nothing touches memory or the platform, so it is tested directly against a naive
//! model.

use dmatx_hal::{MemoryDescriptor, PAGE_SIZE, Segment};
use dmatx_types::pages_spanned;

/// The part of one segment that a chain range covers.
struct Piece<'a> {
    segment: Segment<'a>,
    /// Offset of the first covered byte inside the segment.
    start: u64,
    /// Bytes covered in this segment.
    length: u64,
}

impl Piece<'_> {
    /// Offset of the first covered byte within its page.
    fn page_offset(&self) -> u64 {
        self.segment.va.page_offset() + self.start
    }

    /// Pages (map registers) the covered bytes span.
    fn pages(&self) -> u64 {
        pages_spanned(self.page_offset(), self.length)
    }
}

/// The pieces of the segments that `length` bytes from chain offset `offset` cover, in order.
/// Bytes past the end of the chain are not covered.
fn pieces<D: MemoryDescriptor + ?Sized>(
    buffer: &D,
    offset: u64,
    length: u64,
) -> impl Iterator<Item = Piece<'_>> {
    let mut skip = offset;
    let mut left = length;
    let mut index = 0;
    core::iter::from_fn(move || {
        while left > 0 && index < buffer.segment_count() {
            let segment = buffer.segment(index);
            index += 1;
            if skip >= segment.length {
                skip -= segment.length;
                continue;
            }
            let piece = Piece {
                segment,
                start: skip,
                length: (segment.length - skip).min(left),
            };
            left -= piece.length;
            skip = 0;
            return Some(piece);
        }
        None
    })
}

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
    pieces(buffer, offset, length).map(|p| p.pages()).sum()
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
    let mut bytes = 0;
    let mut pages = 0;
    for piece in pieces(buffer, offset, length) {
        let need = piece.pages();
        if pages + need <= budget {
            pages += need;
            bytes += piece.length;
            continue;
        }
        // Take as many whole pages of this segment as the budget allows.
        let room = budget - pages;
        if room > 0 {
            let fit = room * PAGE_SIZE - piece.page_offset() % PAGE_SIZE;
            bytes += fit.min(piece.length);
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
    let mut runs = 0;
    for piece in pieces(buffer, offset, length) {
        let frames = piece.segment.frames;
        let first = (piece.page_offset() / PAGE_SIZE) as usize;
        let last = first + piece.pages() as usize;
        runs += 1;
        for p in first + 1..last.min(frames.len()) {
            let contiguous = frames[p - 1].page_base().get().checked_add(PAGE_SIZE)
                == Some(frames[p].page_base().get());
            if !contiguous {
                runs += 1;
            }
        }
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

    #[expect(unsafe_code, reason = "a test descriptor implements the unsafe trait")]
    // SAFETY: test-only descriptor; its frames are made-up numbers that no device touches.
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
    #[cfg_attr(
        miri,
        ignore = "a byte-by-byte model: slow under Miri and no memory to check"
    )]
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
    fn physical_runs_break_at_segments_and_frame_gaps() {
        // The test chain's frames are consecutive inside a segment and far apart across them.
        let c = Chain::new(&[(0x100, 5000), (0, 4096), (4000, 300)]);
        assert_eq!(physical_runs(&c, 0, c.total_length()), 3);
        assert_eq!(physical_runs(&c, 0, 100), 1);
        assert_eq!(physical_runs(&c, 4999, 2), 2);
        let mut gappy = Chain::new(&[(0, 3 * 4096)]);
        gappy.segs[0].2[2] = PhysAddr::new(0x9999_0000);
        assert_eq!(physical_runs(&gappy, 0, 3 * 4096), 2);
        assert_eq!(physical_runs(&gappy, 0, 2 * 4096), 1);
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
