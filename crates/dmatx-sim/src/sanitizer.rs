//! The DMA sanitizer and the device's view of memory (spec §0: a device reaches memory only
//! through bus addresses its adapter mapped).
//!
//! A device model never touches host memory directly: it reads and writes bus addresses through
//! a [`DeviceView`] of its adapter. The view translates each address as the adapter's mode
//! dictates (identity, IOMMU page table, bounce page) and checks every byte against what is
//! live on that adapter right now: the mappings made by `map` and not yet ended by `flush` or
//! `free` (with their direction), and the allocated common buffers. An access outside them is
//! blocked — no byte moves — and recorded as a [`Violation`] on the platform.

use std::sync::Arc;

use dmatx_hal::BusAddr;

use crate::adapter::AdapterInner;

/// Which way a device access goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// The device reads memory (allowed in write-to-device mappings and common buffers).
    Read,
    /// The device writes memory (allowed in read-from-device mappings and common buffers).
    Write,
}

/// Why a device access was blocked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ViolationKind {
    /// No live mapping or common buffer covers the bytes.
    NotMapped,
    /// A live mapping covers the bytes, but for the other direction (for example a device
    /// write into a write-to-device mapping).
    WrongDirection,
    /// The bytes are mapped but the physical memory behind them does not exist in the sim
    /// (a descriptor naming frames outside simulated memory).
    OutsideMemory,
}

/// A blocked device access, as the sanitizer recorded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Violation {
    /// Id of the adapter whose view the device used ([`crate::SimAdapter::id`]).
    pub adapter: usize,
    /// Read or write.
    pub access: Access,
    /// First bus address of the access.
    pub bus: BusAddr,
    /// Bytes the access asked for.
    pub length: u64,
    /// Why it was blocked.
    pub kind: ViolationKind,
}

impl core::fmt::Display for Violation {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "adapter {}: device {:?} of {} bytes at {} blocked: {:?}",
            self.adapter, self.access, self.length, self.bus, self.kind
        )
    }
}

impl std::error::Error for Violation {}

/// A device's window onto memory through one adapter: every access is translated and checked
/// by the sanitizer. Cheap to clone.
///
/// ```
/// use dmatx_sim::prelude::*;
/// use dmatx_hal::BusAddr;
///
/// let sim = SimPlatform::new();
/// let adapter = sim.adapter(&SimPlatform::description(64)).unwrap();
/// let view = adapter.device_view();
/// // Nothing is mapped: the access is blocked and recorded.
/// let mut byte = [0u8; 1];
/// assert!(view.dma_read(BusAddr::new(0x1000_0000), &mut byte).is_err());
/// assert_eq!(sim.sanitizer_record().len(), 1);
/// sim.clear_sanitizer();
/// ```
#[derive(Clone)]
pub struct DeviceView {
    pub(crate) adapter: Arc<AdapterInner>,
}

impl core::fmt::Debug for DeviceView {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeviceView")
            .field("adapter", &self.adapter.id)
            .finish()
    }
}

impl DeviceView {
    /// The device reads `out.len()` bytes at bus address `bus` (a DMA read of host memory).
    ///
    /// # Errors
    /// The [`Violation`] if any byte is outside the live mappings (of direction
    /// write-to-device) and common buffers; nothing is copied then.
    pub fn dma_read(&self, bus: BusAddr, out: &mut [u8]) -> Result<(), Violation> {
        let memory = &self.adapter.shared.memory;
        self.adapter
            .device_access(bus.get(), out.len(), Access::Read, |phys, at, n| {
                memory.read(phys, &mut out[at..at + n])
            })
    }

    /// The device writes `data` at bus address `bus` (a DMA write into host memory).
    ///
    /// # Errors
    /// The [`Violation`] if any byte is outside the live mappings (of direction
    /// read-from-device) and common buffers; nothing is copied then.
    pub fn dma_write(&self, bus: BusAddr, data: &[u8]) -> Result<(), Violation> {
        let memory = &self.adapter.shared.memory;
        self.adapter
            .device_access(bus.get(), data.len(), Access::Write, |phys, at, n| {
                memory.write(phys, &data[at..at + n])
            })
    }

    /// Id of the adapter this view goes through.
    pub fn adapter_id(&self) -> usize {
        self.adapter.id
    }
}
