//! Common buffers (KMDF's WDFCOMMONBUFFER): memory the CPU and the device share for the life of
//! the buffer, such as descriptor rings.
//!
//! Spec §1.3 (alignment and the two views of an over-aligned buffer) and §2.7.

use crate::enabler::{Child, Enabler, EnablerShared};
use crate::sync::{Arc, Mutex, Weak};
use dmatx_hal::{Adapter, CommonAllocation, PAGE_SIZE, Platform};
use dmatx_types::{BusAddr, Direction, Error, Result, VirtAddr};

/// Configuration of a common buffer (`WDF_COMMON_BUFFER_CONFIG`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommonBufferConfig {
    /// Alignment as a mask (15 = 16-byte alignment); `None` keeps the enabler's default.
    pub alignment_requirement: Option<u64>,
}

/// `WDF_COMMON_BUFFER_CONFIG` as raw fields; [`CommonBufferConfig::from_raw`] validates it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawCommonBufferConfig {
    /// Must be [`RawCommonBufferConfig::SIZE`].
    pub size: u32,
    /// `AlignmentRequirement` (a mask).
    pub alignment_requirement: u64,
}

impl RawCommonBufferConfig {
    /// The size KMDF expects (`sizeof(WDF_COMMON_BUFFER_CONFIG)` on x64).
    pub const SIZE: u32 = 0x10;
}

impl CommonBufferConfig {
    /// A configuration from raw fields.
    ///
    /// # Errors
    /// [`Error::InfoLengthMismatch`] if `raw.size` is wrong (statement 105).
    pub fn from_raw(raw: &RawCommonBufferConfig) -> Result<Self> {
        if raw.size != RawCommonBufferConfig::SIZE {
            return Err(Error::InfoLengthMismatch);
        }
        Ok(Self {
            alignment_requirement: Some(raw.alignment_requirement),
        })
    }
}

/// A common buffer: physically contiguous memory visible to both CPU and device.
///
/// The CPU reaches its bytes only by copying ([`CommonBuffer::read`], [`CommonBuffer::write`]):
/// the device may access them at any time, so dmatx never hands out a Rust reference to them.
/// Dropping it frees the memory (`WdfObjectDelete`).
///
/// ```
/// use dmatx::{CommonBuffer, CommonBufferConfig, DmaDevice, Enabler, EnablerConfig, Profile};
/// use dmatx_sim::SimPlatform;
///
/// let sim = SimPlatform::new();
/// let enabler = Enabler::create(&DmaDevice::new(sim.clone()),
///                               EnablerConfig::new(Profile::ScatterGather64, 8192))?;
/// let ring = CommonBuffer::create_with_config(&enabler, 1000,
///     CommonBufferConfig { alignment_requirement: Some(0xffff) })?;
/// assert_eq!(ring.length(), 1000);
/// assert!(ring.aligned_logical_address().is_aligned(0xffff));
/// ring.write(0, b"descriptor")?;
/// let mut back = [0u8; 10];
/// ring.read(0, &mut back)?;
/// assert_eq!(&back, b"descriptor");
/// # drop(ring);
/// # sim.check_clean().unwrap();
/// # Ok::<(), dmatx::Error>(())
/// ```
pub struct CommonBuffer<P: Platform> {
    /// Shared with the enabler's child list, so deleting the device frees the memory.
    memory: Arc<CommonMemory<P>>,
    length: u64,
    skew: u64,
    aligned_logical: BusAddr,
    aligned_virtual: VirtAddr,
    raw: RawCommonBuffer,
}

/// The platform's allocation behind a common buffer, as it was made (before alignment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawCommonBuffer {
    /// CPU virtual address of the first allocated byte.
    pub virt: VirtAddr,
    /// Bus address of the first allocated byte.
    pub logical: BusAddr,
    /// Bytes allocated (the length plus any alignment padding).
    pub length: u64,
}

/// The allocation, owned by the buffer until it or its device is deleted.
struct CommonMemory<P: Platform> {
    enabler: Arc<EnablerShared<P>>,
    allocation: Mutex<Option<CommonAllocation>>,
}

impl<P: Platform> CommonMemory<P> {
    fn free(&self) {
        let allocation = self.allocation.lock().take();
        if let (Some(allocation), Some(record)) =
            (allocation, self.enabler.record(Direction::ReadFromDevice))
        {
            record.adapter.free_common_buffer(allocation);
        }
    }
}

impl<P: Platform> Drop for CommonMemory<P> {
    fn drop(&mut self) {
        self.free();
    }
}

impl<P: Platform> Child for CommonMemory<P> {
    fn delete_by_parent(&self) {
        self.free();
    }
}

impl<P: Platform> CommonBuffer<P> {
    /// `WdfCommonBufferCreate`: `length` bytes with the enabler's default alignment.
    ///
    /// # Errors
    /// As [`CommonBuffer::create_with_config`].
    pub fn create(enabler: &Enabler<P>, length: u64) -> Result<Self> {
        Self::create_with_config(enabler, length, CommonBufferConfig::default())
    }

    /// `WdfCommonBufferCreateWithConfig`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for length 0 (statement 101), or if the enabler has no
    /// adapter; [`Error::InsufficientResources`] for a length that does not fit in 32 bits or
    /// memory the platform cannot give; [`Error::IntegerOverflow`] if length plus alignment
    /// overflows.
    pub fn create_with_config(
        enabler: &Enabler<P>,
        length: u64,
        config: CommonBufferConfig,
    ) -> Result<Self> {
        let shared = &enabler.shared;
        if length == 0 {
            return Err(Error::InvalidParameter);
        }
        if length > u64::from(u32::MAX) {
            return Err(Error::InsufficientResources);
        }
        let record = shared
            .record(Direction::ReadFromDevice)
            .ok_or(Error::InvalidParameter)?;
        let mask = config
            .alignment_requirement
            .unwrap_or(shared.common_buffer_alignment);
        if mask.checked_add(1).is_none_or(|a| !a.is_power_of_two()) {
            return Err(Error::InvalidParameter);
        }
        // Platform allocations are page aligned: pad only when the mask asks for more.
        let raw_length = if mask > PAGE_SIZE - 1 {
            length.checked_add(mask).ok_or(Error::IntegerOverflow)?
        } else {
            length
        };
        if shared.is_deleted() {
            return Err(Error::InvalidDeviceState);
        }
        let allocation = record.adapter.allocate_common_buffer(raw_length)?;
        let raw_logical = allocation.logical.get();
        let aligned = (raw_logical
            .checked_add(mask)
            .ok_or(Error::IntegerOverflow)?)
            & !mask;
        let skew = aligned - raw_logical;
        let raw_virtual = allocation.virt.get();
        let aligned_virtual = if mask > PAGE_SIZE - 1 {
            // Both views name the same byte; the virtual address is then not itself aligned.
            raw_virtual + skew
        } else {
            (raw_virtual + mask) & !mask
        };
        let raw = RawCommonBuffer {
            virt: allocation.virt,
            logical: allocation.logical,
            length: allocation.length,
        };
        let memory = Arc::new(CommonMemory {
            enabler: Arc::clone(shared),
            allocation: Mutex::new(Some(allocation)),
        });
        // If the enabler was deleted meanwhile, dropping `memory` frees the allocation.
        shared.adopt(Arc::downgrade(&memory) as Weak<dyn Child>)?;
        Ok(Self {
            memory,
            raw,
            length,
            skew,
            aligned_logical: BusAddr::new(aligned),
            aligned_virtual: VirtAddr::new(aligned_virtual),
        })
    }

    /// `WdfCommonBufferGetLength`: the length asked for, not the padded size (statement 104).
    pub fn length(&self) -> u64 {
        self.length
    }

    /// `WdfCommonBufferGetAlignedLogicalAddress`: the bus address to program the device with.
    pub fn aligned_logical_address(&self) -> BusAddr {
        self.aligned_logical
    }

    /// `WdfCommonBufferGetAlignedVirtualAddress`: the CPU virtual address of the same byte.
    pub fn aligned_virtual_address(&self) -> VirtAddr {
        self.aligned_virtual
    }

    /// The platform's raw allocation (before alignment).
    pub fn raw_allocation(&self) -> RawCommonBuffer {
        self.raw
    }

    /// Whether the buffer's memory was freed because its device was deleted.
    pub fn is_deleted(&self) -> bool {
        self.memory.allocation.lock().is_none()
    }

    /// Copy bytes starting at `offset` (from the aligned start) into `out`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the range runs past [`CommonBuffer::length`];
    /// [`Error::InvalidDeviceState`] once the device was deleted.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        self.access(offset, out.len(), |adapter, allocation, at| {
            adapter.read_common_buffer(allocation, at, out)
        })
    }

    /// Copy `data` into the buffer at `offset` (from the aligned start).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the range runs past [`CommonBuffer::length`];
    /// [`Error::InvalidDeviceState`] once the device was deleted.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.access(offset, data.len(), |adapter, allocation, at| {
            adapter.write_common_buffer(allocation, at, data)
        })
    }

    /// Check `len` bytes at `offset` lie in the buffer and run `copy` with the adapter, the
    /// allocation (held, so a concurrent delete waits) and the allocation offset.
    fn access(
        &self,
        offset: u64,
        len: usize,
        copy: impl FnOnce(&P::Adapter, &CommonAllocation, u64) -> Result<()>,
    ) -> Result<()> {
        let end = offset
            .checked_add(len as u64)
            .ok_or(Error::InvalidParameter)?;
        if end > self.length {
            return Err(Error::InvalidParameter);
        }
        let allocation = self.memory.allocation.lock();
        match (
            allocation.as_ref(),
            self.memory.enabler.record(Direction::ReadFromDevice),
        ) {
            (Some(allocation), Some(record)) => {
                copy(&record.adapter, allocation, self.skew + offset)
            }
            _ => Err(Error::InvalidDeviceState),
        }
    }
}
