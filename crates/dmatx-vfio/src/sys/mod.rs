//! Every system call dmatx-vfio makes, in one place: the VFIO ioctls, sysfs, region access,
//! `mmap`/`mlock`, eventfds and `/proc/self/pagemap`.
//!
//! In test builds the module is replaced by its twin (`sys/twin`), with the same signatures
//! over an in-process model of the kernel (devices, groups, an IOMMU table, locked memory), so
//! the layers above are unit-tested without `/dev/vfio` and can be made to fail at every step.

#[cfg(not(test))]
mod linux;
#[cfg(not(test))]
pub(crate) use linux::*;

#[cfg(test)]
pub(crate) mod twin;
#[cfg(test)]
pub(crate) use twin::*;
