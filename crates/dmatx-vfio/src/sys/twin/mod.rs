//! The test twin of `sys`: the same signatures over an in-process model of the kernel.

mod mem;
mod vfio;

pub(crate) use mem::*;
pub(crate) use vfio::*;
