//! A memory BAR mapped into the process: the device's register window
//! ([`dmatx_hal::RegisterWindow`]) over a VFIO region `mmap`.
//!
//! Every access is one volatile load or store of its width through a raw pointer, so the
//! device sees exactly the accesses the driver makes; no Rust reference to device memory ever
//! exists. As the window contract says, an access past the end or not aligned to its size
//! reads all ones and writes nothing.

use std::fmt;
use std::sync::Arc;

use dmatx_hal::RegisterWindow;

use crate::device::DeviceInner;
use crate::sys;

/// A mapped BAR (see [`VfioDevice::map_bar`](crate::VfioDevice::map_bar)); unmapped on drop.
/// Keeps the device open on its own.
pub struct Bar {
    // Field order matters: the mapping goes before the device reference, because a mapped
    // region keeps the device busy.
    map: sys::RegionMap,
    index: u32,
    device: Arc<DeviceInner>,
}

impl fmt::Debug for Bar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bar")
            .field("device", &self.device.address)
            .field("index", &self.index)
            .field("len", &self.map.len())
            .finish_non_exhaustive()
    }
}

impl Bar {
    pub(crate) fn new(map: sys::RegionMap, index: u32, device: Arc<DeviceInner>) -> Self {
        Self { map, index, device }
    }

    /// The BAR's index (0..=5).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The PCI address of the device the BAR belongs to.
    pub fn address(&self) -> &str {
        &self.device.address
    }

    /// The register of type `T` at `offset`, if it lies inside the window and is aligned to
    /// its size.
    fn register<T>(&self, offset: u64) -> Option<*mut T> {
        let size = std::mem::size_of::<T>();
        let offset = usize::try_from(offset).ok()?;
        if !offset.is_multiple_of(size) || offset.checked_add(size)? > self.map.len() {
            return None;
        }
        // SAFETY: `offset + size <= len` (checked above), so the result points inside the
        // mapping `map` owns. The mapping is page-aligned and `offset` a multiple of `size`, so
        // the pointer is aligned for `T` (a primitive integer whose alignment is its size).
        Some(unsafe { self.map.as_ptr().add(offset) }.cast::<T>())
    }

    /// Read the 16-bit little-endian register at `offset` (all ones outside the window or
    /// misaligned).
    pub fn read16(&self, offset: u64) -> u16 {
        self.register::<u16>(offset).map_or(u16::MAX, |register| {
            // SAFETY: `register` checked the pointer is inside the live mapping and aligned;
            // a volatile access makes exactly one device read and creates no reference.
            u16::from_le(unsafe { register.read_volatile() })
        })
    }

    /// Write the 16-bit little-endian register at `offset` (nothing outside the window or
    /// misaligned).
    pub fn write16(&self, offset: u64, value: u16) {
        if let Some(register) = self.register::<u16>(offset) {
            // SAFETY: as in `read16`.
            unsafe { register.write_volatile(value.to_le()) }
        }
    }

    /// Read the 64-bit little-endian register at `offset` with one 64-bit access (all ones
    /// outside the window or misaligned).
    pub fn read64(&self, offset: u64) -> u64 {
        self.register::<u64>(offset).map_or(u64::MAX, |register| {
            // SAFETY: as in `read16`.
            u64::from_le(unsafe { register.read_volatile() })
        })
    }

    /// Write the 64-bit little-endian register at `offset` with one 64-bit access (nothing
    /// outside the window or misaligned).
    pub fn write64(&self, offset: u64, value: u64) {
        if let Some(register) = self.register::<u64>(offset) {
            // SAFETY: as in `read16`.
            unsafe { register.write_volatile(value.to_le()) }
        }
    }
}

impl RegisterWindow for Bar {
    fn len(&self) -> u64 {
        self.map.len() as u64
    }

    fn read8(&self, offset: u64) -> u8 {
        self.register::<u8>(offset).map_or(u8::MAX, |register| {
            // SAFETY: as in `read16`.
            unsafe { register.read_volatile() }
        })
    }

    fn read32(&self, offset: u64) -> u32 {
        self.register::<u32>(offset).map_or(u32::MAX, |register| {
            // SAFETY: as in `read16`.
            u32::from_le(unsafe { register.read_volatile() })
        })
    }

    fn write8(&self, offset: u64, value: u8) {
        if let Some(register) = self.register::<u8>(offset) {
            // SAFETY: as in `read16`.
            unsafe { register.write_volatile(value) }
        }
    }

    fn write32(&self, offset: u64, value: u32) {
        if let Some(register) = self.register::<u32>(offset) {
            // SAFETY: as in `read16`.
            unsafe { register.write_volatile(value.to_le()) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::tests::{EDU, setup};
    use crate::sys::DeviceSpec;

    #[test]
    fn reads_and_writes_registers() {
        let (twin, container, device) = setup(DeviceSpec::new(EDU, 3));
        let bar = device.map_bar(0, None).expect("BAR0 maps");
        assert_eq!((bar.index(), bar.len(), bar.address()), (0, 0x1000, EDU));
        assert_eq!(twin.live_mmaps(), 1);

        bar.write32(0x04, 0x1234_5678);
        assert_eq!(twin.bar_read32(EDU, 0, 0x04), Some(0x1234_5678));
        twin.bar_write32(EDU, 0, 0x24, 0x100);
        assert_eq!(bar.read32(0x24), 0x100);
        assert_eq!(bar.read8(0x25), 0x01);
        bar.write8(0x27, 0xab);
        assert_eq!(bar.read32(0x24), 0xab00_0100);
        bar.write16(0x80, 0xbeef);
        assert_eq!(bar.read16(0x80), 0xbeef);
        bar.write64(0x88, 0x0102_0304_0506_0708);
        assert_eq!(bar.read64(0x88), 0x0102_0304_0506_0708);
        assert_eq!(twin.bar_read32(EDU, 0, 0x8c), Some(0x0102_0304));
        drop((bar, device, container));
        twin.assert_clean();
    }

    #[test]
    fn accesses_outside_or_misaligned_read_ones_and_write_nothing() {
        let (twin, container, device) = setup(DeviceSpec::new(EDU, 3));
        let bar = device.map_bar(0, Some(0x100)).expect("part of BAR0 maps");
        assert_eq!(bar.len(), 0x100);
        for offset in [0x100, 0xfe, u64::MAX - 1, 0x1000] {
            bar.write32(offset, 0);
            assert_eq!(bar.read32(offset), u32::MAX, "offset {offset:#x}");
        }
        assert_eq!(bar.read8(0x100), u8::MAX);
        assert_eq!(bar.read64(0xfc), u64::MAX);
        bar.write32(0xfc, 7);
        // Misaligned: no effect, all ones.
        bar.write32(0xfa, 0xffff_ffff);
        bar.write64(0xf4, u64::MAX);
        bar.write16(0xfd, 0xffff);
        assert_eq!(bar.read32(0xfc), 7);
        assert_eq!(bar.read32(0x02), u32::MAX);
        assert_eq!(bar.read16(0x01), u16::MAX);
        assert_eq!(bar.read64(0x04), u64::MAX);
        // Nothing was written past the window either.
        assert_eq!(twin.bar_read32(EDU, 0, 0x100), Some(0));
        drop((bar, device, container));
        twin.assert_clean();
    }
}
