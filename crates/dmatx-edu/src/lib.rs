//! dmatx-edu: a driver for QEMU's `edu` PCI device on dmatx and its runtime.
#![deny(unsafe_code)]

pub mod driver;
pub mod hw;

pub use driver::{
    Completion, Edu, EduBuffer, EduConfig, EduContext, EduStats, IOCTL_EDU_LOOPBACK, PrepareError,
    edu_device_add,
};
pub mod sim;
