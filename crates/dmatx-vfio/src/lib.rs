//! dmatx-vfio: the Linux VFIO platform of dmatx — real PCI devices driven from user space.
//!
//! It implements the platform contract of [`dmatx_hal`] over the kernel's VFIO interface, so
//! the dmatx core, its runtime and a driver written against them (`dmatx-edu`, say) run on a
//! real device exactly as on the simulated machine.
//!
//! # A tour
//!
//! A [`VfioContainer`] is an IOMMU domain (`/dev/vfio/vfio`); a [`VfioDevice`] is a PCI
//! function bound to `vfio-pci`, opened through its IOMMU group. The device gives its BARs
//! ([`Bar`], a [`dmatx_hal::RegisterWindow`]), its configuration space, and its interrupts as
//! eventfds served by one thread ([`Interrupts`]), which calls a handler — typically the
//! runtime's `Interrupt::raise`, which runs the driver's ISR. A [`VfioPlatform`] over the
//! container is the DMA side: locked memory ([`DmaBuffer`]), adapters whose map registers are
//! IOVA pages below the device's address limit, bounce pages, and common buffers.
//!
//! ```no_run
//! use std::sync::Arc;
//! use dmatx::{DmaDevice, Enabler, EnablerConfig, Profile};
//! use dmatx_vfio::{IommuMode, IrqKind, PlatformConfig, VfioContainer, VfioDevice, VfioPlatform};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let container = VfioContainer::open(IommuMode::Iommu)?;
//! // Bound to vfio-pci beforehand (docs/VFIO.md): every step names the device if it fails.
//! let device = VfioDevice::open(&container, "0000:00:01.0")?;
//! device.enable_bus_master()?;
//! let bar0 = Arc::new(device.map_bar(0, None)?);
//! // After the first device is open: the platform learns the IOMMU's valid IOVA ranges.
//! let platform = VfioPlatform::new(&container, PlatformConfig::default())?;
//! let enabler = Enabler::create(
//!     &DmaDevice::new(platform.clone()),
//!     EnablerConfig::new(Profile::Packet, 4096),
//! )?;
//! let interrupts = device.enable_interrupts(IrqKind::Msi, 1, Arc::new(|vector| {
//!     // a driver's ISR runs here (dmatx_runtime::Interrupt::raise)
//!     let _ = vector;
//! }))?;
//! let mut buffer = platform.allocate_buffer(8192, 0x80)?;
//! buffer.store(0, b"to the device")?;
//! // ... transactions over `buffer` through `enabler`, registers through `bar0` ...
//! # let _ = (bar0, enabler);
//! interrupts.disable()?;
//! drop(buffer);
//! platform.check_clean()?; // every IOVA page back, nothing mapped, nothing locked
//! # Ok(())
//! # }
//! ```
//!
//! # Layers
//! * `sys` — every system call (VFIO ioctls through `vfio-bindings` and `rustix`, sysfs,
//!   `mmap`/`mlock`, eventfds, pagemap). Test builds swap it for a twin with the same
//!   signatures over an in-process model of the kernel, so everything above is unit-tested
//!   without `/dev/vfio`, with every step made to fail in turn.
//! * [`VfioContainer`], [`VfioDevice`], [`Bar`], [`Interrupts`] — the device side.
//! * [`VfioPlatform`], [`VfioAdapter`], [`DmaBuffer`], [`IovaAllocator`] — the DMA side.
//!
//! # Modes
//! [`IommuMode::Iommu`] (type1v2, the default and the realistic one) or
//! [`IommuMode::NoIommu`] (kernels built with `CONFIG_VFIO_NOIOMMU` and loaded with
//! `enable_unsafe_noiommu_mode=1`; physical addresses from `/proc/self/pagemap`). Opening a
//! mode the kernel cannot give fails with [`ErrorKind::NoIommuUnsupported`] or
//! [`ErrorKind::Unsupported`] and says why.
//!
//! # Rules
//! * One [`VfioPlatform`] per container: it owns the container's IOVA space.
//! * Memory a device may reach is never lent as a Rust reference: [`DmaBuffer`] and common
//!   buffers copy through raw pointers, and BAR accesses are volatile.
//! * Every object closes what it opened on every path, including failed constructions; a
//!   leaked object only keeps its resources (pages stay locked and mapped), it never lets the
//!   device reach memory that was given back.
//!
//! How to bind a device, permissions, and the guest tier: `docs/VFIO.md`.
#![warn(missing_docs)]

mod bar;
mod container;
mod device;
mod error;
mod iommu;
mod iova;
mod irq;
mod memory;
mod platform;
mod sys;

pub use bar::*;
pub use container::*;
pub use device::*;
pub use error::*;
pub use iommu::IommuMode;
pub use iova::*;
pub use irq::*;
pub use memory::*;
pub use platform::*;
