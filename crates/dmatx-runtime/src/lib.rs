//! dmatx-runtime: a thin WDF-like driver runtime for dmatx (`std`).
//!
//! TUTORIAL
#![deny(unsafe_code)]

mod device;
pub mod dma;
mod interrupt;
mod ioctl;
mod queue;
mod request;
mod sync;
mod timer;

pub use device::{Device, DeviceConfig, PnpPowerCallback, PnpPowerCallbacks, PowerState};
pub use interrupt::{Dpc, Interrupt, InterruptConfig, InterruptLockGuard, InterruptStats, Isr};
pub use ioctl::{IoctlCode, TransferMethod};
pub use queue::{Dispatch, IoHandler, IoctlHandler, Queue, QueueConfig};
pub use request::{
    CancelCallback, Completed, Request, RequestHandle, RequestKind, RequestMemory, RequestSpec,
};
pub use timer::{Timer, TimerCallback, TimerConfig};
