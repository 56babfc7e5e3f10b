//! dmatx-vfio: the Linux VFIO platform of dmatx — real PCI devices driven from user space.
//!
//! (crate documentation to be written)
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
