//! Simulated physical memory (spec §0: pages of `PAGE_SIZE` bytes).
//!
//! One arena of host memory, allocated once, is cut into 4 KiB page frames and laid out over
//! one or more physical regions, so the simulated physical addresses need not start at zero and
//! may lie above 4 GiB while the arena stays only as large as its page count. A frame allocator
//! hands out frames by [`Placement`].
//!
//! This module holds all of the crate's `unsafe` code. The arena's bytes are reached only by
//! raw-pointer copies made under one lock: no Rust reference to them ever exists (a device may
//! be writing them), and no two copies race, so the model stays Miri-clean.

use std::sync::{Mutex, MutexGuard, PoisonError};

use dmatx_hal::{Error, PAGE_SIZE, PhysAddr, Result};

/// Bytes per page frame, as a `usize`.
pub(crate) const PAGE: usize = PAGE_SIZE as usize;

/// Lock a mutex, ignoring poisoning: every critical section of this crate leaves its data
/// consistent before it can panic, and a test that panicked must not wedge the others.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A range of simulated physical addresses backed by the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Physical address of the region's first byte (page aligned).
    pub base: PhysAddr,
    /// Size in bytes (a non-zero multiple of the page size).
    pub bytes: u64,
}

impl MemoryRegion {
    /// A region of `bytes` bytes at `base`.
    pub const fn new(base: PhysAddr, bytes: u64) -> Self {
        Self { base, bytes }
    }
}

/// Where the frame allocator takes the frames of a buffer from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Free frames in a pseudo-random order determined by `seed` (and how many allocations
    /// came before), avoiding physically consecutive neighbours where it can: every page
    /// boundary is a physical discontinuity, as on a fragmented machine.
    Scatter {
        /// Seed of the pseudo-random order.
        seed: u64,
    },
    /// Physically consecutive frames (first fit, lowest addresses first).
    Contiguous,
    /// Only frames at or above the address, lowest free ones first (to force bouncing for a
    /// device whose address limit lies below it).
    Above(PhysAddr),
    /// Only frames lying wholly below the address, lowest free ones first.
    Below(PhysAddr),
}

/// What a frame is used for; the allocator counts frames per use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FrameUse {
    /// Behind a [`crate::SimBuffer`].
    Buffer = 1,
    /// An adapter's bounce page.
    Bounce = 2,
    /// Behind a common buffer.
    Common = 3,
}

/// The order in which eligible frames are taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Order {
    Scatter(u64),
    Ascending,
    Contiguous,
}

/// A request for frames: how many, in which order, and the physical window they must lie in.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FrameRequest {
    pub pages: usize,
    pub order: Order,
    /// Lowest allowed frame base.
    pub min: u64,
    /// Highest allowed byte address (inclusive).
    pub max: u64,
}

impl FrameRequest {
    /// The request a buffer placement makes for `pages` frames.
    pub(crate) fn placed(pages: usize, placement: Placement) -> Self {
        let (order, min, max) = match placement {
            Placement::Scatter { seed } => (Order::Scatter(seed), 0, u64::MAX),
            Placement::Contiguous => (Order::Contiguous, 0, u64::MAX),
            Placement::Above(a) => (Order::Ascending, a.get(), u64::MAX),
            Placement::Below(a) => (Order::Ascending, 0, a.get().saturating_sub(1)),
        };
        Self {
            pages,
            order,
            min,
            max,
        }
    }
}

/// SplitMix64: a tiny, good-enough generator for scattering pages.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix(u64);

impl SplitMix {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// The host bytes behind the simulated memory: allocated once, reached only through the raw
/// pointer.
struct Arena {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the arena is a plain heap allocation owned by this value; its bytes are only read or
// written through `Memory`'s copy methods, which hold `Memory::copy` for the whole copy, so
// sharing the pointer between threads cannot cause a data race.
unsafe impl Send for Arena {}
// SAFETY: as for `Send`: all access to the bytes is serialized by `Memory::copy`.
unsafe impl Sync for Arena {}

impl Arena {
    fn new(len: usize) -> Self {
        let bytes: Box<[u8]> = vec![0u8; len].into_boxed_slice();
        let len = bytes.len();
        let ptr = Box::into_raw(bytes).cast::<u8>();
        Self { ptr, len }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        let slice = std::ptr::slice_from_raw_parts_mut(self.ptr, self.len);
        // SAFETY: `ptr` and `len` come from `Box::into_raw` of a `Box<[u8]>` of `len` bytes in
        // `Arena::new`, and this is the only place that turns it back, once.
        drop(unsafe { Box::from_raw(slice) });
    }
}

#[derive(Clone, Copy, Debug)]
struct RegionInfo {
    base: u64,
    first_frame: usize,
    frames: usize,
}

/// Frame ownership and allocation knobs.
struct FrameBook {
    /// Per frame: 0 when free, else the [`FrameUse`] discriminant.
    owner: Vec<u8>,
    free: usize,
    in_use: [usize; 4],
    fail_next: u64,
    serial: u64,
    bad_frees: u64,
}

/// Counters of the frame allocator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Frames in all regions.
    pub total_pages: usize,
    /// Frames not allocated.
    pub free_pages: usize,
    /// Frames behind live [`crate::SimBuffer`]s (including leaked ones).
    pub buffer_pages: usize,
    /// Frames used as adapters' bounce pages.
    pub bounce_pages: usize,
    /// Frames behind live common buffers.
    pub common_pages: usize,
    /// Frees of frames that were not allocated for that use (a bug in the sim or its caller).
    pub bad_frees: u64,
}

/// Simulated physical memory: the arena, its region layout and the frame allocator.
pub(crate) struct Memory {
    arena: Arena,
    regions: Vec<RegionInfo>,
    book: Mutex<FrameBook>,
    /// Held for every copy into or out of the arena.
    copy: Mutex<()>,
}

impl Memory {
    /// Memory laid out over `regions`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if there is no region, a region is empty, not page aligned,
    /// wraps around, or regions overlap.
    pub(crate) fn new(regions: &[MemoryRegion]) -> Result<Self> {
        if regions.is_empty() {
            return Err(Error::InvalidParameter);
        }
        let mut infos = Vec::with_capacity(regions.len());
        let mut frames = 0usize;
        for r in regions {
            let base = r.base.get();
            if r.bytes == 0 || r.bytes % PAGE_SIZE != 0 || base % PAGE_SIZE != 0 {
                return Err(Error::InvalidParameter);
            }
            base.checked_add(r.bytes).ok_or(Error::InvalidParameter)?;
            let n = usize::try_from(r.bytes / PAGE_SIZE).map_err(|_| Error::InvalidParameter)?;
            infos.push(RegionInfo {
                base,
                first_frame: frames,
                frames: n,
            });
            frames = frames.checked_add(n).ok_or(Error::InvalidParameter)?;
        }
        for (i, a) in infos.iter().enumerate() {
            for b in &infos[i + 1..] {
                let a_end = a.base + (a.frames as u64) * PAGE_SIZE;
                let b_end = b.base + (b.frames as u64) * PAGE_SIZE;
                if a.base < b_end && b.base < a_end {
                    return Err(Error::InvalidParameter);
                }
            }
        }
        let bytes = frames.checked_mul(PAGE).ok_or(Error::InvalidParameter)?;
        Ok(Self {
            arena: Arena::new(bytes),
            regions: infos,
            book: Mutex::new(FrameBook {
                owner: vec![0; frames],
                free: frames,
                in_use: [0; 4],
                fail_next: 0,
                serial: 0,
                bad_frees: 0,
            }),
            copy: Mutex::new(()),
        })
    }

    /// Physical address of frame `index`.
    fn frame_phys(&self, index: usize) -> u64 {
        for r in &self.regions {
            if index < r.first_frame + r.frames {
                return r.base + ((index - r.first_frame) as u64) * PAGE_SIZE;
            }
        }
        u64::MAX
    }

    /// Frame index of the frame holding `phys`.
    fn frame_index(&self, phys: u64) -> Option<usize> {
        self.regions.iter().find_map(|r| {
            let off = phys.checked_sub(r.base)?;
            let frame = usize::try_from(off / PAGE_SIZE).ok()?;
            (frame < r.frames).then_some(r.first_frame + frame)
        })
    }

    /// Arena offset of `phys .. phys + len`, if that range lies inside one region.
    fn arena_offset(&self, phys: u64, len: usize) -> Option<usize> {
        self.regions.iter().find_map(|r| {
            let off = phys.checked_sub(r.base)?;
            let size = (r.frames as u64) * PAGE_SIZE;
            let end = off.checked_add(len as u64)?;
            (end <= size).then(|| r.first_frame * PAGE + off as usize)
        })
    }

    /// Whether `phys .. phys + len` is backed by the arena (inside one region).
    pub(crate) fn contains(&self, phys: u64, len: usize) -> bool {
        self.arena_offset(phys, len).is_some()
    }

    /// A fresh serial number (for virtual address regions and scatter seeds).
    pub(crate) fn next_serial(&self) -> u64 {
        let mut b = lock(&self.book);
        b.serial = b.serial.wrapping_add(1);
        b.serial
    }

    /// Copy `out.len()` bytes at physical address `phys` into `out`. Returns `false` (copying
    /// nothing) if the range is not inside one region.
    pub(crate) fn read(&self, phys: u64, out: &mut [u8]) -> bool {
        let Some(off) = self.arena_offset(phys, out.len()) else {
            return false;
        };
        let _g = lock(&self.copy);
        // SAFETY: `arena_offset` checked `off + out.len() <= arena.len` (regions lie inside the
        // arena), so the source is in bounds of the live allocation; `out` is a distinct Rust
        // buffer, so the ranges do not overlap; the copy lock excludes concurrent writers.
        unsafe {
            std::ptr::copy_nonoverlapping(self.arena.ptr.add(off), out.as_mut_ptr(), out.len());
        }
        true
    }

    /// Copy `data` to physical address `phys`. Returns `false` (copying nothing) if the range
    /// is not inside one region.
    pub(crate) fn write(&self, phys: u64, data: &[u8]) -> bool {
        let Some(off) = self.arena_offset(phys, data.len()) else {
            return false;
        };
        let _g = lock(&self.copy);
        // SAFETY: `arena_offset` checked the destination lies in bounds of the arena; `data` is
        // a distinct Rust buffer, so the ranges do not overlap; the copy lock excludes any
        // concurrent access to the arena.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.arena.ptr.add(off), data.len());
        }
        true
    }

    /// Several copies of `(src, dst, len)` under one take of the copy lock (bounce pages of one
    /// transfer). Returns `false` if any range is not inside one region; that copy is skipped.
    pub(crate) fn copy_batch(&self, copies: impl IntoIterator<Item = (u64, u64, usize)>) -> bool {
        let mut copies = copies.into_iter().peekable();
        if copies.peek().is_none() {
            // Nothing bounced: do not touch the machine-wide lock.
            return true;
        }
        let _g = lock(&self.copy);
        let mut all = true;
        for (src, dst, len) in copies {
            let (Some(s), Some(d)) = (self.arena_offset(src, len), self.arena_offset(dst, len))
            else {
                all = false;
                continue;
            };
            // SAFETY: both ranges were checked to lie in bounds of the arena; `ptr::copy` allows
            // overlap; the copy lock excludes any concurrent access to the arena.
            unsafe {
                std::ptr::copy(self.arena.ptr.add(s), self.arena.ptr.add(d), len);
            }
        }
        all
    }

    /// Set `len` bytes at physical `phys` to `byte`. Returns `false` if the range is not
    /// inside one region.
    pub(crate) fn fill(&self, phys: u64, byte: u8, len: usize) -> bool {
        let Some(off) = self.arena_offset(phys, len) else {
            return false;
        };
        let _g = lock(&self.copy);
        // SAFETY: the range was checked to lie in bounds of the arena; the copy lock excludes
        // any concurrent access to it.
        unsafe {
            std::ptr::write_bytes(self.arena.ptr.add(off), byte, len);
        }
        true
    }

    /// Make the next `n` frame allocations fail with [`Error::InsufficientResources`].
    pub(crate) fn fail_next(&self, n: u64) {
        lock(&self.book).fail_next = n;
    }

    /// Allocate frames for `request`, zero them and return their physical addresses in order.
    ///
    /// # Errors
    /// [`Error::InsufficientResources`] if not enough eligible frames are free (or the failure
    /// knob is armed).
    pub(crate) fn allocate(&self, request: FrameRequest, usage: FrameUse) -> Result<Vec<PhysAddr>> {
        let frames = {
            let mut book = lock(&self.book);
            if book.fail_next > 0 {
                book.fail_next -= 1;
                return Err(Error::InsufficientResources);
            }
            if request.pages == 0 {
                return Ok(Vec::new());
            }
            if request.pages > book.free {
                return Err(Error::InsufficientResources);
            }
            let picked = self
                .pick(&book, request)
                .ok_or(Error::InsufficientResources)?;
            for &i in &picked {
                book.owner[i] = usage as u8;
            }
            book.free -= picked.len();
            book.in_use[usage as usize] += picked.len();
            picked
        };
        let phys: Vec<PhysAddr> = frames
            .iter()
            .map(|&i| PhysAddr::new(self.frame_phys(i)))
            .collect();
        for p in &phys {
            self.fill(p.get(), 0, PAGE);
        }
        Ok(phys)
    }

    fn eligible(&self, book: &FrameBook, index: usize, request: &FrameRequest) -> bool {
        let phys = self.frame_phys(index);
        book.owner[index] == 0 && phys >= request.min && phys + (PAGE_SIZE - 1) <= request.max
    }

    fn pick(&self, book: &FrameBook, request: FrameRequest) -> Option<Vec<usize>> {
        let n = book.owner.len();
        let want = request.pages;
        match request.order {
            Order::Ascending => {
                let picked: Vec<usize> = (0..n)
                    .filter(|&i| self.eligible(book, i, &request))
                    .take(want)
                    .collect();
                (picked.len() == want).then_some(picked)
            }
            Order::Contiguous => {
                let mut start = 0;
                let mut run = 0;
                for i in 0..n {
                    let joins = run > 0 && self.frame_phys(i) == self.frame_phys(i - 1) + PAGE_SIZE;
                    if !self.eligible(book, i, &request) {
                        run = 0;
                        continue;
                    }
                    if !joins {
                        start = i;
                        run = 0;
                    }
                    run += 1;
                    if run == want {
                        return Some((start..start + want).collect());
                    }
                }
                None
            }
            Order::Scatter(seed) => {
                let mut cands: Vec<usize> = (0..n)
                    .filter(|&i| self.eligible(book, i, &request))
                    .collect();
                if cands.len() < want {
                    return None;
                }
                let mut rng = SplitMix::new(seed ^ book.serial.wrapping_mul(0xA24B_AED4_963E_E407));
                let k = cands.len();
                for i in 0..want {
                    let mut j = i + rng.below(k - i);
                    // Avoid a frame right after the previous one; give up after a few tries
                    // (then the pool has nothing better to offer).
                    for _ in 0..8 {
                        let adjacent = i > 0
                            && self.frame_phys(cands[j])
                                == self.frame_phys(cands[i - 1]) + PAGE_SIZE;
                        if !adjacent {
                            break;
                        }
                        j = i + rng.below(k - i);
                    }
                    cands.swap(i, j);
                }
                cands.truncate(want);
                Some(cands)
            }
        }
    }

    /// Return frames allocated for `usage`. A frame not allocated for that use is left alone
    /// and counted as a bad free.
    pub(crate) fn free(&self, frames: &[PhysAddr], usage: FrameUse) {
        let mut book = lock(&self.book);
        for p in frames {
            match self.frame_index(p.get()) {
                Some(i) if book.owner[i] == usage as u8 => {
                    book.owner[i] = 0;
                    book.free += 1;
                    book.in_use[usage as usize] -= 1;
                }
                _ => book.bad_frees += 1,
            }
        }
    }

    /// Allocator counters.
    pub(crate) fn stats(&self) -> MemoryStats {
        let book = lock(&self.book);
        MemoryStats {
            total_pages: book.owner.len(),
            free_pages: book.free,
            buffer_pages: book.in_use[FrameUse::Buffer as usize],
            bounce_pages: book.in_use[FrameUse::Bounce as usize],
            common_pages: book.in_use[FrameUse::Common as usize],
            bad_frees: book.bad_frees,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(pages: u64) -> Memory {
        Memory::new(&[MemoryRegion::new(
            PhysAddr::new(0x1000_0000),
            pages * PAGE_SIZE,
        )])
        .unwrap()
    }

    #[test]
    fn layout_is_validated() {
        assert!(Memory::new(&[]).is_err());
        assert!(Memory::new(&[MemoryRegion::new(PhysAddr::new(0x1001), 4096)]).is_err());
        assert!(Memory::new(&[MemoryRegion::new(PhysAddr::new(0x1000), 100)]).is_err());
        let overlap = [
            MemoryRegion::new(PhysAddr::new(0x10000), 0x4000),
            MemoryRegion::new(PhysAddr::new(0x12000), 0x4000),
        ];
        assert!(Memory::new(&overlap).is_err());
    }

    #[test]
    fn scatter_is_not_contiguous() {
        let m = mem(256);
        let f = m
            .allocate(
                FrameRequest::placed(32, Placement::Scatter { seed: 7 }),
                FrameUse::Buffer,
            )
            .unwrap();
        assert_eq!(f.len(), 32);
        let adjacent = f
            .windows(2)
            .filter(|w| w[1].get() == w[0].get() + PAGE_SIZE)
            .count();
        assert_eq!(adjacent, 0, "{f:x?}");
        let mut sorted: Vec<u64> = f.iter().map(|p| p.get()).collect();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 32, "frames are distinct");
        assert_eq!(m.stats().buffer_pages, 32);
        m.free(&f, FrameUse::Buffer);
        assert_eq!(m.stats().free_pages, 256);
    }

    #[test]
    fn contiguous_and_windows() {
        let m = mem(64);
        let c = m
            .allocate(
                FrameRequest::placed(8, Placement::Contiguous),
                FrameUse::Buffer,
            )
            .unwrap();
        assert!(c.windows(2).all(|w| w[1].get() == w[0].get() + PAGE_SIZE));
        let limit = PhysAddr::new(0x1000_0000 + 32 * PAGE_SIZE);
        let a = m
            .allocate(
                FrameRequest::placed(4, Placement::Above(limit)),
                FrameUse::Buffer,
            )
            .unwrap();
        assert!(a.iter().all(|p| *p >= limit));
        let b = m
            .allocate(
                FrameRequest::placed(4, Placement::Below(limit)),
                FrameUse::Buffer,
            )
            .unwrap();
        assert!(b.iter().all(|p| p.get() + PAGE_SIZE <= limit.get()));
        // Not enough frames above the limit.
        assert_eq!(
            m.allocate(
                FrameRequest::placed(40, Placement::Above(limit)),
                FrameUse::Buffer
            ),
            Err(Error::InsufficientResources)
        );
    }

    #[test]
    fn high_region_and_copies() {
        let m = Memory::new(&[
            MemoryRegion::new(PhysAddr::new(0x10_0000), 4 * PAGE_SIZE),
            MemoryRegion::new(PhysAddr::new(0x1_0000_0000), 4 * PAGE_SIZE),
        ])
        .unwrap();
        let hi = m
            .allocate(
                FrameRequest::placed(4, Placement::Above(PhysAddr::new(0x1_0000_0000))),
                FrameUse::Buffer,
            )
            .unwrap();
        assert!(hi.iter().all(|p| p.get() >= 0x1_0000_0000));
        assert!(m.write(hi[0].get() + 10, b"hello"));
        let mut out = [0u8; 5];
        assert!(m.read(hi[0].get() + 10, &mut out));
        assert_eq!(&out, b"hello");
        assert!(m.copy_batch([(hi[0].get() + 10, 0x10_0000, 5)]));
        assert!(m.read(0x10_0000, &mut out));
        assert_eq!(&out, b"hello");
        // Crossing the end of a region or outside memory is refused.
        assert!(!m.read(0x10_0000 + 4 * PAGE_SIZE - 2, &mut out));
        assert!(!m.write(0x5000_0000, b"x"));
        assert!(m.fail_next_and_check());
    }

    impl Memory {
        fn fail_next_and_check(&self) -> bool {
            self.fail_next(1);
            let r = self.allocate(
                FrameRequest::placed(1, Placement::Contiguous),
                FrameUse::Common,
            );
            r == Err(Error::InsufficientResources)
                && self
                    .allocate(
                        FrameRequest::placed(0, Placement::Contiguous),
                        FrameUse::Common,
                    )
                    .is_ok()
        }
    }

    #[test]
    fn bad_free_is_counted() {
        let m = mem(4);
        m.free(&[PhysAddr::new(0x1000_0000)], FrameUse::Buffer);
        assert_eq!(m.stats().bad_frees, 1);
    }
}
