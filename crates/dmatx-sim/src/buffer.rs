//! Buffers in simulated memory, described as KMDF describes them with an MDL chain
//! (spec §0, §2.1: a chain of virtually contiguous segments and the page frames behind each).

use std::sync::Arc;

use dmatx_hal::{Error, MemoryDescriptor, PAGE_SIZE, PhysAddr, Result, Segment, VirtAddr};
use dmatx_types::pages_spanned;

use crate::memory::{FrameRequest, FrameUse, Memory, Placement};

/// Base of the fake virtual address regions of buffers; buffer `n` gets `BASE + n·2³²`.
const VA_BASE: u64 = 0x7000_0000_0000;
/// Size of one buffer's virtual address region.
const VA_REGION: u64 = 1 << 32;
/// Regions before the numbering wraps (keeps addresses below 2⁴⁸).
const VA_REGIONS: u64 = 0x8000;

/// One virtually contiguous segment and its frames.
#[derive(Debug)]
struct BufferSegment {
    va: VirtAddr,
    length: u64,
    frames: Box<[PhysAddr]>,
}

/// A buffer in simulated memory: one segment, or a chain of them ([`SimBuffer::chain`]).
///
/// Its frames are placed by a [`Placement`]; each segment has its own fake virtual address
/// whose page offset is the one asked for. The CPU reaches the bytes only by copying
/// ([`SimBuffer::read`], [`SimBuffer::write`]). The frames go back to the allocator only when
/// the buffer is dropped: a leaked buffer keeps them forever, as
/// [`MemoryDescriptor`] requires.
///
/// ```
/// use dmatx_sim::prelude::*;
///
/// let sim = SimPlatform::new();
/// let mut buf = sim.allocate_buffer(10_000, 0x123).unwrap();
/// assert_eq!(buf.len(), 10_000);
/// assert_eq!(buf.segment(0).va.page_offset(), 0x123);
/// assert_eq!(buf.segment(0).frames.len(), 3);
/// buf.write(9_998, b"hi").unwrap();
/// let mut two = [0u8; 2];
/// buf.read(9_998, &mut two).unwrap();
/// assert_eq!(&two, b"hi");
/// assert!(buf.write(9_999, b"hi").is_err());
/// ```
pub struct SimBuffer {
    memory: Arc<Memory>,
    segments: Vec<BufferSegment>,
    len: u64,
}

impl core::fmt::Debug for SimBuffer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SimBuffer")
            .field("len", &self.len)
            .field("segments", &self.segments)
            .finish()
    }
}

impl SimBuffer {
    /// Allocate a one-segment buffer of `len` bytes starting at byte `page_offset` of its first
    /// page.
    pub(crate) fn allocate(
        memory: &Arc<Memory>,
        len: u64,
        page_offset: u64,
        placement: Placement,
    ) -> Result<Self> {
        if page_offset >= PAGE_SIZE || len > VA_REGION - PAGE_SIZE {
            return Err(Error::InvalidParameter);
        }
        let pages = usize::try_from(pages_spanned(page_offset, len))
            .map_err(|_| Error::InvalidParameter)?;
        let serial = memory.next_serial();
        let frames = memory.allocate(FrameRequest::placed(pages, placement), FrameUse::Buffer)?;
        let va = VirtAddr::new(VA_BASE + (serial % VA_REGIONS) * VA_REGION + page_offset);
        Ok(Self {
            memory: Arc::clone(memory),
            segments: vec![BufferSegment {
                va,
                length: len,
                frames: frames.into_boxed_slice(),
            }],
            len,
        })
    }

    /// Join buffers into one chain (KMDF's MDL chain): the segments of `parts`, in order.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if `parts` is empty or the buffers come from different
    /// platforms (the parts are dropped then).
    ///
    /// ```
    /// use dmatx_sim::prelude::*;
    ///
    /// let sim = SimPlatform::new();
    /// let a = sim.allocate_buffer(100, 4000).unwrap();
    /// let b = sim.allocate_buffer(5000, 0).unwrap();
    /// let chain = SimBuffer::chain(vec![a, b]).unwrap();
    /// assert_eq!(chain.segment_count(), 2);
    /// assert_eq!(chain.len(), 5100);
    /// ```
    pub fn chain(parts: Vec<SimBuffer>) -> Result<SimBuffer> {
        let Some(first) = parts.first() else {
            return Err(Error::InvalidParameter);
        };
        let memory = Arc::clone(&first.memory);
        if parts.iter().any(|p| !Arc::ptr_eq(&p.memory, &memory)) {
            return Err(Error::InvalidParameter);
        }
        let mut segments = Vec::with_capacity(parts.iter().map(|p| p.segments.len()).sum());
        let mut len = 0;
        for mut part in parts {
            len += part.len;
            segments.append(&mut part.segments);
        }
        Ok(SimBuffer {
            memory,
            segments,
            len,
        })
    }

    /// Total bytes in the buffer (all segments).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Physical address of byte `offset` of the chain, or `None` past its end.
    pub fn phys(&self, offset: u64) -> Option<PhysAddr> {
        let (seg, off) = dmatx_hal::locate(self, offset)?;
        self.segment(seg).phys(off)
    }

    /// Walk `offset .. offset + len` of the chain in physically contiguous pieces (at most a
    /// page each), calling `f(phys, position within the range, bytes)`.
    fn walk(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, usize, usize) -> bool,
    ) -> Result<()> {
        let end = offset.checked_add(len).ok_or(Error::InvalidParameter)?;
        if end > self.len {
            return Err(Error::InvalidParameter);
        }
        let mut skip = offset;
        let mut done = 0u64;
        for seg in &self.segments {
            if done == len {
                break;
            }
            if skip >= seg.length {
                skip -= seg.length;
                continue;
            }
            let mut pos = seg.va.page_offset() + skip;
            let mut left = (seg.length - skip).min(len - done);
            skip = 0;
            while left > 0 {
                let in_page = pos % PAGE_SIZE;
                let chunk = (PAGE_SIZE - in_page).min(left);
                let frame = seg.frames[(pos / PAGE_SIZE) as usize];
                if !f(frame.get() + in_page, done as usize, chunk as usize) {
                    return Err(Error::InvalidParameter);
                }
                pos += chunk;
                left -= chunk;
                done += chunk;
            }
        }
        Ok(())
    }

    /// Copy `out.len()` bytes starting at chain offset `offset` into `out`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the range lies outside the buffer.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        let memory = &self.memory;
        self.walk(offset, out.len() as u64, |phys, at, n| {
            memory.read(phys, &mut out[at..at + n])
        })
    }

    /// Copy `data` into the buffer at chain offset `offset`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the range lies outside the buffer.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.store(offset, data)
    }

    /// Copy `data` into the buffer at chain offset `offset` through a shared handle: a CPU
    /// store by code that reaches the buffer only through something sharing it (a driver
    /// filling a request's output buffer). The bytes are simulated memory, not Rust memory, so
    /// this races nothing but a device writing the same bytes — as on a real machine.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the range lies outside the buffer.
    pub fn store(&self, offset: u64, data: &[u8]) -> Result<()> {
        let memory = &self.memory;
        self.walk(offset, data.len() as u64, |phys, at, n| {
            memory.write(phys, &data[at..at + n])
        })
    }

    /// Set every byte of the buffer to `byte`.
    pub fn fill(&mut self, byte: u8) {
        let memory = &self.memory;
        // The whole range is in bounds and every frame is in memory, so this cannot fail.
        let _ = self.walk(0, self.len, |phys, _, n| memory.fill(phys, byte, n));
    }

    /// The buffer's bytes, copied out.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; usize::try_from(self.len).unwrap_or(0)];
        // In bounds by construction; a failure would leave zeros, never panic.
        let _ = self.read(0, &mut v);
        v
    }
}

impl Drop for SimBuffer {
    fn drop(&mut self) {
        for seg in &self.segments {
            self.memory.free(&seg.frames, FrameUse::Buffer);
        }
    }
}

// The frames live in the arena held alive by the `Arc<Memory>`; the segments are built once
// (by `allocate` or `chain`, which moves whole segments) and never changed. Each segment's
// frames are this buffer's alone (owner `Buffer`), returned only by `Drop` (a leaked buffer
// keeps them), and `pages_spanned(page_offset, length)` long.
// SAFETY: frames owned, unchanged and of the contract's count (above); accesses copy through
// the arena and never lend a reference to the bytes.
unsafe impl MemoryDescriptor for SimBuffer {
    fn segment_count(&self) -> usize {
        self.segments.len()
    }

    fn segment(&self, index: usize) -> Segment<'_> {
        let s = &self.segments[index];
        Segment {
            va: s.va,
            length: s.length,
            frames: &s.frames,
        }
    }

    fn total_length(&self) -> u64 {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryRegion;

    fn memory() -> Arc<Memory> {
        Arc::new(
            Memory::new(&[MemoryRegion::new(
                PhysAddr::new(0x1000_0000),
                64 * PAGE_SIZE,
            )])
            .unwrap(),
        )
    }

    #[test]
    fn round_trip_and_bounds() {
        let m = memory();
        let mut b = SimBuffer::allocate(&m, 9000, 4000, Placement::Scatter { seed: 1 }).unwrap();
        assert_eq!(b.segment(0).frames.len(), 4);
        assert_eq!(b.segment(0).va.page_offset(), 4000);
        let data: Vec<u8> = (0..9000u32).map(|i| (i * 7) as u8).collect();
        b.write(0, &data).unwrap();
        assert_eq!(b.to_vec(), data);
        let mut out = [0u8; 100];
        b.read(8900, &mut out).unwrap();
        assert_eq!(&out[..], &data[8900..]);
        assert_eq!(b.read(8901, &mut out), Err(Error::InvalidParameter));
        assert_eq!(b.write(u64::MAX, b"x"), Err(Error::InvalidParameter));
        assert_eq!(b.read(9000, &mut []), Ok(()));
        b.fill(0xAB);
        assert!(b.to_vec().iter().all(|&x| x == 0xAB));
        // Physical address of a byte agrees with the frames.
        let p = b.phys(100).unwrap();
        assert_eq!(
            p,
            b.segment(0).frames[1]
                .checked_add(4000 + 100 - 4096)
                .unwrap()
        );
        assert_eq!(b.phys(9000), None);
    }

    #[test]
    fn bad_layouts_are_refused() {
        let m = memory();
        assert!(SimBuffer::allocate(&m, 10, 4096, Placement::Contiguous).is_err());
        assert_eq!(
            SimBuffer::allocate(&m, 65 * PAGE_SIZE, 0, Placement::Contiguous).unwrap_err(),
            Error::InsufficientResources
        );
        let empty = SimBuffer::allocate(&m, 0, 5, Placement::Contiguous).unwrap();
        assert!(empty.is_empty() && empty.segment(0).frames.is_empty());
        assert!(SimBuffer::chain(Vec::new()).is_err());
        let other = memory();
        let a = SimBuffer::allocate(&m, 10, 0, Placement::Contiguous).unwrap();
        let b = SimBuffer::allocate(&other, 10, 0, Placement::Contiguous).unwrap();
        assert!(SimBuffer::chain(vec![a, b]).is_err());
        assert_eq!(m.stats().buffer_pages, 0, "refused chain dropped its parts");
    }

    #[test]
    fn chain_reads_across_segments_and_frees_on_drop() {
        let m = memory();
        let a = SimBuffer::allocate(&m, 100, 4090, Placement::Contiguous).unwrap();
        let b = SimBuffer::allocate(&m, 5000, 17, Placement::Scatter { seed: 3 }).unwrap();
        let mut c = SimBuffer::chain(vec![a, b]).unwrap();
        assert_eq!((c.len(), c.segment_count()), (5100, 2));
        assert_ne!(c.segment(0).va.page_base(), c.segment(1).va.page_base());
        let data: Vec<u8> = (0..5100u32).map(|i| (i % 251) as u8).collect();
        c.write(0, &data).unwrap();
        assert_eq!(c.to_vec(), data);
        assert_eq!(m.stats().buffer_pages, 2 + 2);
        drop(c);
        assert_eq!(m.stats().buffer_pages, 0);
    }

    #[test]
    #[cfg_attr(miri, ignore = "leaks on purpose")]
    fn leaked_buffer_keeps_its_pages() {
        let m = memory();
        let b = SimBuffer::allocate(&m, 8192, 0, Placement::Contiguous).unwrap();
        std::mem::forget(b);
        assert_eq!(m.stats().buffer_pages, 2);
    }
}
