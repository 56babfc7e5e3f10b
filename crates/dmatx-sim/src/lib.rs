//! dmatx-sim: a simulated machine for dmatx — physical memory, DMA adapters with map
//! registers, bounce pages and an IOMMU, a DMA sanitizer, and device models.
//!
//! It implements the platform contract of [`dmatx_hal`], so the dmatx core (and any driver
//! written against it) runs here exactly as on a real backend, while tests can see and bend
//! everything the platform does: how pages are placed, how many map registers there are, when
//! they run out, whether a device touches memory it was not given.
//!
//! # A tour
//!
//! A [`SimPlatform`] is the machine. Its memory is an arena of host memory cut into 4 KiB page
//! frames at simulated physical addresses (by default 64 MiB at `0x1000_0000`); buffers get
//! their frames by a [`Placement`] — scattered (the default), contiguous, or above/below an
//! address.
//!
//! ```
//! use dmatx_sim::prelude::*;
//! use dmatx_hal::{Adapter, Allocation, AllocationRequest, AllocationWaiter, BusAddr,
//!                 Direction, MapRegisters, MemoryDescriptor, Platform, SgElement, Waiter};
//! use std::sync::Arc;
//!
//! let sim = SimPlatform::new();
//! // A 3-page buffer starting 0x80 bytes into its first page; its frames are scattered.
//! let mut buffer = sim.allocate_buffer(8192, 0x80).unwrap();
//! buffer.write(0, b"hello, device").unwrap();
//! assert_eq!(buffer.segment(0).frames.len(), 3);
//!
//! // An adapter for a 64-bit device, with N = 32 map registers (the default).
//! let adapter = sim.adapter(&SimPlatform::description(64)).unwrap();
//! assert_eq!(adapter.map_register_count(), 32);
//!
//! // Allocate registers for the transfer (this waiter is never called: we ask for an
//! // immediate grant).
//! struct Waiting;
//! impl AllocationWaiter for Waiting { fn granted(&self, _: MapRegisters) {} }
//! let waiter: Waiter = Arc::new(Waiting);
//! let request = AllocationRequest { count: 3.try_into().unwrap(), immediate: true };
//! let Ok(Allocation::Granted(registers)) = adapter.allocate(request, &Arc::downgrade(&waiter)) else {
//!     panic!("32 registers are free")
//! };
//!
//! // Map it: scattered pages give one SG element per page.
//! let mut sg = [SgElement::default(); 8];
//! let m = adapter.map(&registers, &buffer, 0, 8192, Direction::WriteToDevice, &mut sg).unwrap();
//! assert_eq!((m.bytes, m.elements), (8192, 3));
//!
//! // A device reads through the adapter's view; the sanitizer checks every byte.
//! let view = adapter.device_view();
//! let mut seen = [0u8; 5];
//! view.dma_read(sg[0].address, &mut seen).unwrap();
//! assert_eq!(&seen, b"hello");
//! // Writing into a write-to-device mapping is blocked and recorded.
//! assert!(view.dma_write(sg[0].address, b"x").is_err());
//! assert_eq!(sim.sanitizer_record().len(), 1);
//! sim.clear_sanitizer();
//!
//! // End the transfer and give the registers back; the machine is idle again.
//! adapter.flush(&registers, &buffer, 0, 8192, Direction::WriteToDevice).unwrap();
//! assert!(view.dma_read(sg[0].address, &mut seen).is_err(), "no longer mapped");
//! sim.clear_sanitizer();
//! adapter.free(registers);
//! sim.check_clean().unwrap();
//! ```
//!
//! # What it models
//! * **Memory** ([`SimPlatform::allocate_buffer`], [`SimBuffer`]): buffers and MDL-style chains
//!   of them ([`SimBuffer::chain`]), each segment with its own fake virtual address and page
//!   offset. The CPU reaches their bytes only by copying.
//! * **Adapters** ([`SimAdapter`]): N map registers, granted first-fit and consecutively,
//!   with a strict FIFO queue of waiters called with no lock held. Three mapping modes
//!   ([`AdapterMode`]): direct, IOMMU, and bounce pages for devices that cannot reach a page.
//!   Knobs for tests: [`SimAdapter::exhaust`], [`SimAdapter::fail_next_flush`], a queue of
//!   per-adapter configurations ([`SimPlatform::push_adapter_config`]).
//! * **The sanitizer** ([`DeviceView`]): device accesses outside live mappings and common
//!   buffers are blocked and recorded; [`SimPlatform::check_clean`] ends every test.
//! * **Devices** ([`SimDmaDevice`]): a bus-master DMA engine with storage, completion modes
//!   (immediate, deferred by virtual time, manual) and a fault plan per transfer.
//! * **System DMA** ([`SimSystemDma`], [`SystemDmaConfig`], [`SimFifo`]): a controller with
//!   channels reached by request lines; a system adapter's grant is its channel (one owner at a
//!   time, FIFO queue); `map_system` starts a transfer between memory and a FIFO endpoint at
//!   a device address, completed by deferred or manual stepping, stoppable, with fault plans
//!   per channel.
//! * **PLX PCI9656** ([`SimPlx9656`], [`Plx9656Config`]): the bridge the PLX9x5x sample drives —
//!   a register file implementing [`dmatx_hal::RegisterWindow`], 128 KiB of SRAM, two
//!   scatter/gather channels walking descriptor chains in host memory, an interrupt line with a
//!   listener, fault plans per channel start, counters and an event trace.
//! * **QEMU's edu** ([`SimEdu`], [`SimEduConfig`]): the teaching device of the guest tier — a
//!   1 MiB register BAR, the liveness and factorial registers, an interrupt status with raise
//!   and acknowledge, and one DMA engine with a 4 KiB buffer completing on a worker thread,
//!   with QEMU's 28-bit address mask and (as a knob) QEMU 7.2's end-of-buffer erratum.
//!
//! The steady-state paths — `allocate`, `map`, `flush`, `free`, and a device transfer in
//! immediate mode — allocate nothing on the heap.
//!
//! Spec: `kmdf-dma-spec.md` §0 (HAL), §1.3 (common buffers), §3.2–§3.3 (map registers),
//! §2.5, §3.5 and §3.10 (system-mode DMA).

mod adapter;
mod buffer;
mod device;
mod edu;
mod memory;
mod platform;
mod plx9656;
mod sanitizer;
mod system;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod system_tests;

#[cfg(test)]
mod plx9656_tests;

#[cfg(test)]
mod edu_tests;

pub use adapter::{
    AdapterConfig, AdapterMode, AdapterStats, DEFAULT_IOVA_BASE, DEFAULT_MAP_REGISTERS, SimAdapter,
};
pub use buffer::SimBuffer;
pub use device::{
    CompletionHandler, CompletionMode, DeviceCompletion, DeviceConfig, DeviceFault, DeviceStats,
    SimDmaDevice,
};
pub use edu::{
    EDU_BAR0_SIZE, EDU_DMA_BUFFER, EDU_DMA_BUFFER_SIZE, EDU_DMA_MASK, EDU_ID, SimEdu, SimEduBar,
    SimEduConfig, SimEduStats, edu_reg,
};
pub use memory::{MemoryRegion, MemoryStats, Placement};
pub use platform::{
    DEFAULT_MEMORY_BASE, DEFAULT_MEMORY_BYTES, DEFAULT_PLACEMENT, SimConfig, SimPlatform, SimStats,
};
pub use plx9656::{
    PLX9656_BAR0_SIZE, PLX9656_SRAM_SIZE, Plx9656ChannelState, Plx9656ChannelStats, Plx9656Config,
    Plx9656Event, Plx9656EventKind, Plx9656Fault, Plx9656Mode, Plx9656Outcome, Plx9656Registers,
    Plx9656Sram, Plx9656Stats, SimPlx9656,
};
pub use sanitizer::{Access, DeviceView, Violation, ViolationKind};
pub use system::{
    ChannelStats, SimFifo, SimSystemDma, SystemCompletion, SystemDmaConfig, SystemFault,
};

/// The main types, and the [`dmatx_hal`] traits their methods come from.
pub mod prelude {
    pub use crate::{
        AdapterConfig, AdapterMode, CompletionMode, DeviceCompletion, DeviceConfig, DeviceFault,
        DeviceView, Placement, SimAdapter, SimBuffer, SimConfig, SimDmaDevice, SimFifo,
        SimPlatform, SimSystemDma, SystemCompletion, SystemDmaConfig, SystemFault, Violation,
    };
    pub use dmatx_hal::{Adapter as _, MemoryDescriptor as _, Platform as _};
}
