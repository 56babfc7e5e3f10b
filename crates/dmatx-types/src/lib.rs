//! The vocabulary every dmatx layer shares (`no_std`).
//!
//! This crate names the things of KMDF's DMA model that cross layer boundaries: the transfer
//! [`Direction`], the eight enabler [`Profile`]s, the [`DmaVersion`], one address newtype per
//! address space ([`PhysAddr`], [`BusAddr`], [`VirtAddr`]) so they cannot be mixed, the
//! scatter/gather element [`SgElement`], the transaction [`State`], and the [`Error`] type whose
//! variants keep KMDF's status names (`WdfTooFragmented`, `WdfBusy`, …) so a KMDF driver writer
//! recognises them.
//!
//! Spec: `kmdf-dma-spec.md` §0 (statuses), §1.1 (profiles), §3.1 (states).
//!
//! ```
//! use dmatx_types::{BusAddr, Direction, Profile};
//!
//! let p = Profile::from_raw(4).unwrap();
//! assert_eq!(p, Profile::ScatterGather64);
//! assert!(p.is_scatter_gather() && p.address_bits() == Some(64));
//! assert!(Profile::from_raw(0).is_err());
//! assert_eq!(Direction::WriteToDevice.index(), 1);
//! let a = BusAddr::new(0x1234);
//! assert_eq!(a.page_offset(), 0x234);
//! ```
#![no_std]

mod address;
mod error;
mod profile;

pub use address::{BusAddr, PAGE_SIZE, PhysAddr, VirtAddr, pages_spanned};
pub use error::{Call, Error, Misuse, ObjectMisuse, Result};
pub use profile::{Direction, DmaVersion, Profile, TransactionKind};

/// One element of a scatter/gather list: a run of device-visible (bus/logical) addresses.
///
/// KMDF's `SCATTER_GATHER_ELEMENT`. A packet transfer always has exactly one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SgElement {
    /// Bus (logical) address of the first byte, as the device must be programmed.
    pub address: BusAddr,
    /// Number of bytes in this element.
    pub length: u32,
}

impl SgElement {
    /// An element of `length` bytes at `address`.
    pub const fn new(address: BusAddr, length: u32) -> Self {
        Self { address, length }
    }
}

/// State of a DMA transaction (spec §3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// Created, never initialized.
    Created,
    /// Holds (or is waiting for) reserved map registers and has no buffer description.
    Reserved,
    /// Initialized with a buffer; ready to execute.
    Initialized,
    /// Executing: a transfer is queued, being programmed or running on the device.
    Transfer,
    /// Finished successfully; the buffer may be reclaimed by releasing.
    TransferCompleted,
    /// Finished with an error (or cancelled); the buffer may be reclaimed by releasing.
    TransferFailed,
    /// Released: may be initialized again.
    Released,
    /// Deleted (only observed in diagnostics).
    Deleted,
}

impl core::fmt::Display for State {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(self, f)
    }
}
