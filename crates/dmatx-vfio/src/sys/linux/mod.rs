//! The real system calls (Linux).

mod mem;
mod vfio;

pub(crate) use mem::*;
pub(crate) use vfio::*;
