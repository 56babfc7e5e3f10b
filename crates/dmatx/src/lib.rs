//! dmatx: the DMA transaction model of Windows KMDF for Rust drivers (`no_std` + `alloc`).
//!
//! A driver describes its device once with an [`Enabler`] (profile, maximum transfer length,
//! DMA version). For each I/O it initializes a [`Transaction`] with a buffer, and executes it.
//! dmatx cuts the transaction into transfers that fit the device and the platform's map
//! registers, maps each one into a scatter/gather list, and calls the driver's program-DMA
//! callback with it. When the device finishes a transfer, the driver reports it with
//! [`Transaction::dma_completed`] (or `…_with_length` for a partial transfer, `…_final` for an
//! underrun or abort); the answer, a [`Completion`], says whether the transaction is finished
//! or the next transfer has been started. [`CommonBuffer`]s hold memory CPU and device share.
//!
//! The platform (a simulated machine, Linux VFIO, or your own) implements the traits of
//! [`dmatx_hal`]; this crate never names one.
//!
//! # The model in one example
//! ```
//! use dmatx::{Completion, Direction, DmaDevice, Enabler, EnablerConfig, Profile, SgElement,
//!             Transaction};
//! use dmatx_sim::{SimBuffer, SimPlatform};
//!
//! type Tx = Transaction<SimPlatform, (), SimBuffer>;
//!
//! // Program-DMA: hand the SG list to the device. (A real driver writes descriptors here.)
//! fn program_dma(t: &Tx, _ctx: &(), _dir: Direction, sg: &[SgElement]) -> bool {
//!     let bytes: u64 = sg.iter().map(|e| u64::from(e.length)).sum();
//!     assert_eq!(bytes, t.current_transfer_length());
//!     true
//! }
//!
//! let sim = SimPlatform::new();
//! let device = DmaDevice::new(sim.clone());
//! // A 64-bit scatter/gather device taking at most 16 KiB per transfer.
//! let enabler = Enabler::create(&device, EnablerConfig::new(Profile::ScatterGather64, 16384))?;
//! let t = Tx::create(&enabler)?;
//!
//! let buffer = sim.allocate_buffer(100_000, 0).unwrap();
//! t.initialize_using_offset(program_dma, Direction::WriteToDevice, buffer, 0, 100_000)
//!     .map_err(|e| e.error)?;
//! t.execute(())?;
//! let mut transfers = 1;
//! // Each time the device interrupts, report the transfer done.
//! while t.dma_completed()? == Completion::MoreProcessingRequired {
//!     transfers += 1;
//! }
//! assert_eq!(transfers, 7); // ceil(100 000 / 16 384)
//! assert_eq!(t.bytes_transferred(), 100_000);
//! let _buffer = t.release()?; // the buffer comes back
//! # drop(_buffer);
//! # sim.check_clean().unwrap();
//! # Ok::<(), dmatx::Error>(())
//! ```
//!
//! # Contracts
//! * **Fidelity.** Each behaviour of KMDF's DMA objects is kept or deliberately changed; the
//!   changes are listed in `docs/quirks.md`, the correspondence in `docs/kmdf-mapping.md`.
//! * **Misuse.** Where KMDF bug-checks, dmatx returns [`Error::Misuse`] naming the call and the
//!   state and leaves the object as it was; in verifier mode (on in debug builds) it also
//!   panics with that diagnostic.
//! * **Buffers.** A transaction owns its buffer from initialize to release and gives it back on
//!   every path; no reference to it exists while the device may access it. Leaking a handle
//!   leaks the buffer with it, so a device never writes into freed memory.
//! * **No allocation after creation.** Initialize, execute, completion and release allocate
//!   nothing.
//! * **No nesting.** A completion issued inside program-DMA never nests the next program-DMA
//!   call, for any kind of transaction.
#![no_std]
#![deny(unsafe_code)]

extern crate alloc;

// First: its macros are used by the modules below.
#[macro_use]
mod trace;

mod binding;
mod common_buffer;
mod device;
mod enabler;
mod split;
mod sync;
mod transaction;

pub use binding::RequestBinding;
pub use common_buffer::{CommonBuffer, CommonBufferConfig, RawCommonBuffer, RawCommonBufferConfig};
pub use device::DmaDevice;
pub use enabler::{
    DmaDescriptor, Enabler, EnablerCallback, EnablerCallbacks, EnablerConfig, RawEnablerConfig,
    SystemProfileConfig, UNLIMITED_FRAGMENTS,
};
pub use transaction::{
    BufferError, Completion, ConfigureChannel, ProgramDma, ReserveDma, SystemStopOutcome,
    Transaction, TransferComplete, TransferInfo,
};

pub use dmatx_hal as hal;
pub use dmatx_types::{
    BusAddr, Call, Direction, DmaVersion, Error, Misuse, ObjectMisuse, PAGE_SIZE, PhysAddr,
    Profile, Result, SgElement, State, TransactionKind, VirtAddr,
};
