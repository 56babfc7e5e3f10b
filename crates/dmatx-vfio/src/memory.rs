//! Memory a device may reach: locked process memory, the registry of what the platform
//! allocated, and [`DmaBuffer`], the platform's [`MemoryDescriptor`] (spec §0, §2.1: a buffer
//! described as an MDL is, with the page frames behind it).
//!
//! Every byte a device may reach on this platform is memory the platform allocated itself:
//! anonymous memory, populated and locked (`mmap(MAP_POPULATE)` + `mlock`) so its pages stay
//! resident. Each allocation a caller can name — a [`DmaBuffer`]'s pages, a common buffer — is
//! entered in the platform's *registry* of live allocations (process address ranges, with the
//! frames of their pages). An adapter maps only memory it finds there: a descriptor from
//! another backend (a simulated buffer's made-up addresses, a slice of the stack) is refused
//! before anything reaches `VFIO_IOMMU_MAP_DMA`. The registry's room is fixed when the
//! platform is made ([`crate::PlatformConfig::max_buffers`]), so looking up and entering
//! allocations never allocates.
//!
//! What a *frame* is depends on how the device reaches memory (see [`IommuMode`]): in IOMMU
//! mode the IOMMU maps process addresses, so a page's frame is its process address; in
//! no-IOMMU mode the device uses physical addresses, so a page's frame is its physical address
//! read from `/proc/self/pagemap` when the memory was allocated.
//!
//! Bytes are copied through raw pointers only: no Rust reference to memory a device may reach
//! is ever made.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use dmatx_hal::{Error, MemoryDescriptor, PAGE_SIZE, PhysAddr, Segment, VirtAddr};
use dmatx_types::pages_spanned;

use crate::error::{ErrorKind, VfioError, VfioResult};
use crate::iommu::IommuMode;
use crate::sys;

/// Lock a mutex, taking its data even if a thread panicked holding it (every critical section
/// here leaves its data consistent before anything that can panic).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Copy `len` bytes from process address `src` to process address `dst`.
///
/// # Safety
/// Both ranges must be process memory valid for the access (live allocations of this platform
/// or a caller's slice), with no Rust reference to the bytes at `dst` anywhere; the copy may
/// race a device's accesses, which the caller accepts as DMA does.
pub(crate) unsafe fn copy_bytes(src: usize, dst: usize, len: usize) {
    let src: *const u8 = std::ptr::with_exposed_provenance(src);
    let dst: *mut u8 = std::ptr::with_exposed_provenance_mut(dst);
    // SAFETY: the caller promises both ranges are valid; `copy` allows overlap.
    unsafe { std::ptr::copy(src, dst, len) };
}

/// One live allocation in the registry.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    /// First process address (page-aligned).
    pub(crate) start: usize,
    /// One past the last byte.
    pub(crate) end: usize,
    /// The frame of each page (see the module documentation for what a frame is here).
    pub(crate) frames: Arc<[PhysAddr]>,
}

impl Entry {
    /// The frame of the page holding process address `va` (inside the entry).
    pub(crate) fn frame_of(&self, va: u64) -> Option<u64> {
        let index = usize::try_from(va.checked_sub(self.start as u64)? / PAGE_SIZE).ok()?;
        self.frames.get(index).map(|f| f.get())
    }
}

/// What the platform's memory layer shares: the registry of live allocations and the counts of
/// locked memory.
pub(crate) struct Memory {
    mode: IommuMode,
    /// Live allocations, sorted by start address; capacity fixed at creation.
    registry: Mutex<Vec<Entry>>,
    locked_pages: AtomicU64,
    live_buffers: AtomicUsize,
    /// Failures to release memory (reported by the platform's check).
    issues: Mutex<Vec<String>>,
}

impl Memory {
    /// A memory layer for `mode` whose registry holds up to `max_allocations` allocations.
    pub(crate) fn new(mode: IommuMode, max_allocations: usize) -> VfioResult<Self> {
        let mut registry = Vec::new();
        registry.try_reserve_exact(max_allocations).map_err(|_| {
            VfioError::new(
                ErrorKind::Memory,
                "platform",
                format!("cannot make room to track {max_allocations} allocations"),
            )
        })?;
        Ok(Self {
            mode,
            registry: Mutex::new(registry),
            locked_pages: AtomicU64::new(0),
            live_buffers: AtomicUsize::new(0),
            issues: Mutex::new(Vec::new()),
        })
    }

    /// How devices reach this memory.
    pub(crate) fn mode(&self) -> IommuMode {
        self.mode
    }

    /// Pages locked now (buffers, common buffers, bounce pages).
    pub(crate) fn locked_pages(&self) -> u64 {
        // ORDERING: Relaxed: a statistic.
        self.locked_pages.load(Relaxed)
    }

    /// [`DmaBuffer`]s alive now.
    pub(crate) fn live_buffers(&self) -> usize {
        // ORDERING: Relaxed: a statistic.
        self.live_buffers.load(Relaxed)
    }

    /// Allocations in the registry now.
    #[cfg(test)]
    pub(crate) fn registered(&self) -> usize {
        lock(&self.registry).len()
    }

    /// Record a failure to give memory back.
    pub(crate) fn note(&self, issue: String) {
        lock(&self.issues).push(issue);
    }

    /// Failures recorded so far.
    pub(crate) fn issues(&self) -> Vec<String> {
        lock(&self.issues).clone()
    }

    /// The frames of the `pages` pages from `addr`, as this mode defines them.
    pub(crate) fn frames_of(&self, addr: usize, pages: usize) -> VfioResult<Arc<[PhysAddr]>> {
        let mut raw = vec![0u64; pages];
        match self.mode {
            IommuMode::Iommu => {
                for (i, f) in raw.iter_mut().enumerate() {
                    *f = (addr + i * PAGE_SIZE as usize) as u64;
                }
            }
            IommuMode::NoIommu => sys::physical_addresses(addr, &mut raw)?,
        }
        Ok(raw.into_iter().map(PhysAddr::new).collect())
    }

    /// Enter a live allocation in the registry.
    ///
    /// # Errors
    /// [`ErrorKind::Memory`] if the registry is full.
    pub(crate) fn register(&self, entry: Entry) -> VfioResult<()> {
        let mut reg = lock(&self.registry);
        if reg.len() == reg.capacity() {
            return Err(VfioError::new(
                ErrorKind::Memory,
                "platform",
                format!(
                    "{} allocations are live, the most the platform was configured to track \
                     (PlatformConfig::max_buffers)",
                    reg.len()
                ),
            ));
        }
        let at = reg.partition_point(|e| e.start < entry.start);
        reg.insert(at, entry);
        Ok(())
    }

    /// Remove the allocation starting at `start` from the registry.
    pub(crate) fn unregister(&self, start: usize) {
        let removed = {
            let mut reg = lock(&self.registry);
            let at = reg.partition_point(|e| e.start < start);
            (reg.get(at).is_some_and(|e| e.start == start)).then(|| reg.remove(at))
        };
        if removed.is_none() {
            self.note(format!(
                "allocation at {start:#x} was not in the registry when freed"
            ));
        }
    }

    /// The live allocation holding all of `va .. va + len`, if there is one.
    pub(crate) fn lookup(&self, va: u64, len: u64) -> Option<Entry> {
        let start = usize::try_from(va).ok()?;
        let end = usize::try_from(va.checked_add(len)?).ok()?;
        let reg = lock(&self.registry);
        let at = reg.partition_point(|e| e.start <= start);
        let e = reg.get(at.checked_sub(1)?)?;
        (end <= e.end).then(|| e.clone())
    }
}

/// Locked process memory owned by the platform: `pages` pages from `addr`, unlocked and
/// unmapped when dropped.
pub(crate) struct LockedRegion {
    memory: Arc<Memory>,
    addr: usize,
    pages: usize,
}

impl std::fmt::Debug for LockedRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockedRegion")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("pages", &self.pages)
            .finish()
    }
}

impl LockedRegion {
    /// `pages` pages of locked memory, zeroed.
    pub(crate) fn new(memory: &Arc<Memory>, pages: usize) -> VfioResult<Self> {
        let bytes = pages
            .checked_mul(PAGE_SIZE as usize)
            .filter(|b| *b > 0)
            .ok_or_else(|| {
                VfioError::new(
                    ErrorKind::InvalidArgument,
                    "memory",
                    format!("{pages} pages cannot be allocated"),
                )
            })?;
        let addr = sys::alloc_locked(bytes)?;
        // ORDERING: Relaxed: a statistic.
        memory.locked_pages.fetch_add(pages as u64, Relaxed);
        Ok(Self {
            memory: Arc::clone(memory),
            addr,
            pages,
        })
    }

    /// Process address of the first byte.
    pub(crate) fn addr(&self) -> usize {
        self.addr
    }

    /// Pages in the region.
    pub(crate) fn pages(&self) -> usize {
        self.pages
    }

    /// Bytes in the region.
    pub(crate) fn bytes(&self) -> usize {
        self.pages * PAGE_SIZE as usize
    }
}

impl Drop for LockedRegion {
    fn drop(&mut self) {
        // SAFETY: `addr`/`bytes` are the allocation `new` made, freed only here; whoever held
        // the region (a buffer, a common buffer, an adapter's bounce pages) has ended every
        // device mapping of it and made no reference to its bytes.
        if let Err(e) = unsafe { sys::free_locked(self.addr, self.bytes()) } {
            self.memory
                .note(format!("{} pages at {:#x}: {e}", self.pages, self.addr));
            return;
        }
        // ORDERING: Relaxed: a statistic.
        self.memory
            .locked_pages
            .fetch_sub(self.pages as u64, Relaxed);
    }
}

/// A buffer of locked process memory that a device may reach: what drivers on the VFIO
/// platform hand to transactions.
///
/// Made by [`crate::VfioPlatform::allocate_buffer`]: `len` bytes starting `page_offset` bytes
/// into its first page, zeroed. The CPU reaches the bytes only by copying
/// ([`DmaBuffer::load`], [`DmaBuffer::store`]), never through a reference, because a device
/// may write them at any time while a transfer is mapped.
///
/// Dropping it unlocks and unmaps its pages and removes it from the platform's registry; it may
/// outlive the [`crate::VfioPlatform`] value that made it. A leaked buffer keeps its pages
/// locked for the life of the process, which is what [`MemoryDescriptor`] asks of a leak.
pub struct DmaBuffer {
    region: LockedRegion,
    frames: Arc<[PhysAddr]>,
    page_offset: u64,
    length: u64,
}

impl std::fmt::Debug for DmaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaBuffer")
            .field("va", &format_args!("{:#x}", self.va()))
            .field("len", &self.length)
            .finish()
    }
}

impl DmaBuffer {
    /// `length` bytes from `page_offset` bytes into the first page of fresh locked memory,
    /// entered in `memory`'s registry.
    pub(crate) fn allocate(
        memory: &Arc<Memory>,
        length: u64,
        page_offset: u64,
    ) -> VfioResult<Self> {
        if length == 0 || page_offset >= PAGE_SIZE {
            return Err(VfioError::new(
                ErrorKind::InvalidArgument,
                "buffer",
                format!(
                    "{length} bytes at page offset {page_offset} (need length > 0, offset < 4096)"
                ),
            ));
        }
        let pages = usize::try_from(pages_spanned(page_offset, length)).map_err(|_| {
            VfioError::new(
                ErrorKind::InvalidArgument,
                "buffer",
                format!("{length} bytes is too large"),
            )
        })?;
        let region = LockedRegion::new(memory, pages)?;
        let frames = memory.frames_of(region.addr(), pages)?;
        memory.register(Entry {
            start: region.addr(),
            end: region.addr() + region.bytes(),
            frames: Arc::clone(&frames),
        })?;
        // ORDERING: Relaxed: a statistic.
        memory.live_buffers.fetch_add(1, Relaxed);
        Ok(Self {
            region,
            frames,
            page_offset,
            length,
        })
    }

    /// Bytes in the buffer.
    pub fn len(&self) -> u64 {
        self.length
    }

    /// Whether the buffer is empty (never: buffers have at least one byte).
    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// Process address of the first byte.
    pub fn va(&self) -> u64 {
        self.region.addr() as u64 + self.page_offset
    }

    /// Process address of byte `offset`, checking that `len` bytes from it lie in the buffer.
    fn at(&self, offset: u64, len: usize) -> dmatx_hal::Result<usize> {
        let end = offset
            .checked_add(len as u64)
            .ok_or(Error::InvalidParameter)?;
        if end > self.length {
            return Err(Error::InvalidParameter);
        }
        // In range: the region holds `page_offset + length` bytes.
        Ok(self.region.addr() + (self.page_offset + offset) as usize)
    }

    /// Copy `out.len()` bytes from byte `offset` of the buffer into `out`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the range runs past the end of the buffer.
    pub fn load(&self, offset: u64, out: &mut [u8]) -> dmatx_hal::Result<()> {
        let src = self.at(offset, out.len())?;
        // SAFETY: `at` checked the range lies in the region, which lives as long as `self`;
        // `out` is the caller's exclusive slice, not device memory.
        unsafe { copy_bytes(src, out.as_mut_ptr().expose_provenance(), out.len()) };
        Ok(())
    }

    /// Copy `data` into the buffer from byte `offset`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the range runs past the end of the buffer.
    pub fn store(&mut self, offset: u64, data: &[u8]) -> dmatx_hal::Result<()> {
        let dst = self.at(offset, data.len())?;
        // SAFETY: `at` checked the range lies in the region, which lives as long as `self`;
        // no reference to the region's bytes exists (`&mut self` excludes other copies).
        unsafe { copy_bytes(data.as_ptr().expose_provenance(), dst, data.len()) };
        Ok(())
    }

    /// Set every byte of the buffer to `byte`.
    pub fn fill(&mut self, byte: u8) {
        let Ok(dst) = self.at(0, self.length as usize) else {
            return;
        };
        let dst: *mut u8 = std::ptr::with_exposed_provenance_mut(dst);
        // SAFETY: the whole buffer lies in the region (checked by `at`); no reference to its
        // bytes exists.
        unsafe { std::ptr::write_bytes(dst, byte, self.length as usize) };
    }

    /// The buffer's bytes, copied into a vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.length as usize];
        // In range by construction; a failure would leave zeros, never panic.
        let _ = self.load(0, &mut v);
        v
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        // Out of the registry before the region is freed (when the fields drop), so no adapter
        // can find the pages after they are gone.
        self.region.memory.unregister(self.region.addr());
        // ORDERING: Relaxed: a statistic.
        self.region.memory.live_buffers.fetch_sub(1, Relaxed);
    }
}

// On this platform a frame is what a device reaches a page by: in IOMMU mode the page's
// process address (which `VFIO_IOMMU_MAP_DMA` maps from; the adapter never hands it to a
// device), in no-IOMMU mode the page's physical address, read from pagemap when the buffer
// was allocated.
// SAFETY: the pages are the buffer's own locked allocation (`LockedRegion`), freed only by
// `Drop`, so a leaked buffer keeps them for good. The one segment and its frames are made in
// `allocate` and never change; there is one frame per page of `page_offset .. + length`
// (`pages_spanned`). Accessors copy through raw pointers and never lend a reference to the
// bytes. (In no-IOMMU mode, mlocked pages are resident but the kernel may still migrate them
// — compaction of unevictable pages — which is one of the hazards no-IOMMU mode accepts.)
unsafe impl MemoryDescriptor for DmaBuffer {
    fn segment_count(&self) -> usize {
        1
    }

    fn segment(&self, _index: usize) -> Segment<'_> {
        Segment {
            va: VirtAddr::new(self.va()),
            length: self.length,
            frames: &self.frames,
        }
    }

    fn total_length(&self) -> u64 {
        self.length
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn buffer_round_trip_bounds_and_registry() {
        let memory = Arc::new(Memory::new(IommuMode::Iommu, 2).unwrap());
        let before = sys::locked_pages();
        let mut b = DmaBuffer::allocate(&memory, 9000, 4000).unwrap();
        assert_eq!(b.segment(0).frames.len(), 4);
        assert_eq!(b.segment(0).va.page_offset(), 4000);
        assert_eq!(b.segment(0).frames[1].get(), b.va() - 4000 + 4096);
        assert_eq!((memory.locked_pages(), memory.live_buffers()), (4, 1));
        assert_eq!(sys::locked_pages(), before + 4);
        let data: Vec<u8> = (0..9000u32).map(|i| (i * 7) as u8).collect();
        b.store(0, &data).unwrap();
        assert_eq!(b.to_vec(), data);
        let mut out = [0u8; 100];
        b.load(8900, &mut out).unwrap();
        assert_eq!(&out[..], &data[8900..]);
        assert_eq!(b.load(8901, &mut out), Err(Error::InvalidParameter));
        assert_eq!(b.store(u64::MAX, b"x"), Err(Error::InvalidParameter));
        b.fill(0xAB);
        assert!(b.to_vec().iter().all(|&x| x == 0xAB));
        assert!(memory.lookup(b.va(), 9000).is_some());
        assert!(memory.lookup(b.va() - 4000, 4 * 4096).is_some());
        assert!(
            memory.lookup(b.va(), 4 * 4096).is_none(),
            "runs past the end"
        );
        assert!(memory.lookup(0x1000, 1).is_none());

        // The registry holds two; a third is refused and leaves nothing behind.
        let c = DmaBuffer::allocate(&memory, 1, 0).unwrap();
        let e = DmaBuffer::allocate(&memory, 1, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Memory);
        drop((b, c));
        assert_eq!((memory.locked_pages(), memory.live_buffers()), (0, 0));
        assert_eq!(memory.registered(), 0);
        assert_eq!(sys::locked_pages(), before);
        assert!(memory.issues().is_empty());
    }

    #[test]
    fn bad_sizes_and_failed_allocations_leave_nothing() {
        let memory = Arc::new(Memory::new(IommuMode::NoIommu, 8).unwrap());
        let before = sys::locked_pages();
        assert!(DmaBuffer::allocate(&memory, 0, 0).is_err());
        assert!(DmaBuffer::allocate(&memory, 1, 4096).is_err());
        sys::fail_next_mlock(1);
        assert_eq!(
            DmaBuffer::allocate(&memory, 10, 0).unwrap_err().kind(),
            ErrorKind::Memory
        );
        sys::fail_next_pagemap(1);
        let e = DmaBuffer::allocate(&memory, 10, 0).unwrap_err();
        assert!(e.message().contains("CAP_SYS_ADMIN"), "{e}");
        assert_eq!(memory.locked_pages(), 0);
        assert_eq!(memory.registered(), 0);
        assert_eq!(sys::locked_pages(), before);
    }

    #[test]
    fn no_iommu_frames_are_physical_addresses() {
        let memory = Arc::new(Memory::new(IommuMode::NoIommu, 8).unwrap());
        sys::set_physical(Some(Rc::new(|va| 0x8000_0000 + (va as u64 & 0xFFF_FFFF))));
        let b = DmaBuffer::allocate(&memory, 5000, 0x10).unwrap();
        sys::set_physical(None);
        let seg = b.segment(0);
        assert_eq!(seg.frames.len(), 2);
        assert_eq!(
            seg.frames[0].get(),
            0x8000_0000 + ((b.va() - 0x10) & 0xFFF_FFFF)
        );
    }
}
