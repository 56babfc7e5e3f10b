//! The platform contract of dmatx (`no_std` + `alloc`): everything the core needs from a backend.
//!
//! KMDF sits on the Windows HAL's DMA adapter (`DMA_OPERATIONS`): it owns map registers, bounce
//! buffers, scatter/gather list construction, queued adapter-channel allocation and common-buffer
//! memory. dmatx names that layer with three traits:
//!
//! * [`Platform`] hands out an [`Adapter`] for a [`DeviceDescription`] (address width, SG
//!   capability, maximum transfer length), as `IoGetDmaAdapter` does.
//! * [`Adapter`] owns a finite pool of map registers. [`Adapter::allocate`] grants registers now,
//!   queues the request and grants it later through an [`AllocationWaiter`], or refuses it
//!   (immediate execution). [`Adapter::map`] maps one transfer into an SG list (it may map fewer
//!   bytes than asked); [`Adapter::flush`] ends the transfer (bounced data is copied back);
//!   [`Adapter::free`] returns the registers; [`Adapter::cancel_allocation`] withdraws a queued
//!   request. Common buffers are allocated and accessed through the adapter too.
//! * [`MemoryDescriptor`] describes a buffer as KMDF's MDL chain does: a chain of virtually
//!   contiguous segments, each with the physical page frames behind it.
//!
//! The core never names a backend; `dmatx-sim` and `dmatx-vfio` implement these traits.
//!
//! # The rules a backend keeps
//! * A waiter is called at most once per queued request, never from inside
//!   [`Adapter::allocate`] (a grant available at once is returned as [`Allocation::Granted`]),
//!   and never while the adapter holds a lock of its own: the waiter runs the driver's
//!   program-DMA callback, which may call back into the adapter.
//! * Queued requests are granted in the order they were queued, as registers return.
//! * `map`, `flush`, `allocate` and `cancel_allocation` never call a waiter (the core may call
//!   them holding its transaction's lock); only `free` and `dispatch_queued` do.
//! * A mapping made by [`Adapter::map`] stays live (the device may use it) until the matching
//!   [`Adapter::flush`]; a backend with a DMA sanitizer blocks device accesses outside live
//!   mappings and common buffers.
//!
//! Spec: `kmdf-dma-spec.md` §0 (HAL), §1.1 (adapter acquisition), §3.2–§3.3 (map registers),
//! §1.3 (common buffers).
#![no_std]

extern crate alloc;

use alloc::sync::{Arc, Weak};
use core::num::NonZeroU32;

pub use dmatx_types::{
    BusAddr, Direction, DmaVersion, Error, PAGE_SIZE, PhysAddr, Result, SgElement, VirtAddr,
};

/// What the core tells the platform about a device when it asks for an adapter
/// (the HAL's `DEVICE_DESCRIPTION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceDescription {
    /// The device masters the bus itself (false for system-mode DMA).
    pub bus_master: bool,
    /// The device takes scatter/gather lists.
    pub scatter_gather: bool,
    /// Number of address bits the device can drive (24..=64).
    pub address_bits: u8,
    /// Largest transfer the device takes, in bytes (the enabler's `MaximumLength`).
    pub maximum_length: u64,
    /// DMA version the enabler selected.
    pub version: DmaVersion,
    /// The direction this adapter serves; simplex enablers ask once, for `ReadFromDevice`.
    pub direction: Direction,
    /// Whether the enabler keeps separate read and write adapters.
    pub duplex: bool,
    /// System-mode DMA: the controller channel to use (`None` for bus-master devices).
    pub system: Option<SystemChannel>,
}

/// The width of one system-DMA access to the device (`DMA_WIDTH`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DmaWidth {
    /// 8 bits.
    Bits8,
    /// 16 bits.
    Bits16,
    /// 32 bits.
    Bits32,
    /// 64 bits.
    Bits64,
}

impl DmaWidth {
    /// Bytes per access.
    pub const fn bytes(self) -> u64 {
        match self {
            DmaWidth::Bits8 => 1,
            DmaWidth::Bits16 => 2,
            DmaWidth::Bits32 => 4,
            DmaWidth::Bits64 => 8,
        }
    }
}

/// A system-mode DMA channel as a driver configures it (`WDF_DMA_SYSTEM_PROFILE_CONFIG` with
/// the channel and request line of its DMA resource descriptor). A shared system DMA
/// controller moves the data between memory and the device's FIFO at `device_address`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SystemChannel {
    /// The controller channel (from the resource descriptor).
    pub channel: u32,
    /// The device's request line (from the resource descriptor).
    pub request_line: u32,
    /// Demand mode: the controller moves data as the device requests it.
    pub demand_mode: bool,
    /// Auto-initialize: the transfer restarts when it ends.
    pub looped_transfer: bool,
    /// Width of each access to the device.
    pub width: DmaWidth,
    /// Bus address of the device's data register (FIFO).
    pub device_address: u64,
}

/// How a system-mode transfer ended, as the controller reports it (`DMA_COMPLETION_STATUS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SystemDmaStatus {
    /// All mapped bytes moved (`DmaComplete`).
    Complete,
    /// The controller failed after moving `moved` bytes (`DmaError`).
    Error {
        /// Bytes moved before the error.
        moved: u64,
    },
    /// The transfer was stopped after moving `moved` bytes (`DmaCancelled`).
    Cancelled {
        /// Bytes moved before the stop.
        moved: u64,
    },
}

/// What [`Adapter::stop_system`] found (`CancelMappedTransfer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SystemStop {
    /// A running transfer was stopped; its completion ([`SystemDmaStatus::Cancelled`]) follows.
    Stopped,
    /// No transfer of this waiter is running on the channel (never mapped, or already done).
    NotRunning,
    /// The running transfer had already been stopped.
    AlreadyStopped,
}

impl DeviceDescription {
    /// Highest bus address the device can reach, inclusive.
    pub const fn address_limit(&self) -> u64 {
        if self.address_bits >= 64 {
            u64::MAX
        } else {
            (1u64 << self.address_bits) - 1
        }
    }
}

/// A backend: the source of DMA adapters (KMDF's HAL).
pub trait Platform: Send + Sync + 'static {
    /// The adapter type this platform hands out.
    type Adapter: Adapter;

    /// An adapter for a device described by `description`, with its own pool of map registers
    /// (`IoGetDmaAdapter`). The adapter reports how many registers it granted through
    /// [`Adapter::map_register_count`].
    ///
    /// # Errors
    /// Any error; the core reports adapter acquisition failures as
    /// [`Error::Unsuccessful`] as KMDF does.
    fn adapter(&self, description: &DeviceDescription) -> Result<Self::Adapter>;
}

/// A device's register window (a memory BAR) as its driver sees it: every access may have the
/// device's side effects — a write that starts an engine, a read that returns live status. The
/// simulated platform's device models and a real backend's mapped BARs implement it, so a
/// driver written against it runs on either.
///
/// Offsets are from the start of the window. An access past its end, or not aligned to its
/// size, has no effect and reads all ones, as a PCI read nobody claims does; backends may
/// record it (the simulator does, for its sanitizer report).
pub trait RegisterWindow: Send + Sync {
    /// The window's size in bytes.
    fn len(&self) -> u64;

    /// Whether the window is empty (never, for a real BAR).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Read the byte at `offset`.
    fn read8(&self, offset: u64) -> u8;

    /// Read the 32-bit little-endian register at `offset`.
    fn read32(&self, offset: u64) -> u32;

    /// Write the byte at `offset`.
    fn write8(&self, offset: u64, value: u8);

    /// Write the 32-bit little-endian register at `offset`.
    fn write32(&self, offset: u64, value: u32);
}

/// Receives a queued map-register grant (the HAL calling KMDF's adapter-control routine).
pub trait AllocationWaiter: Send + Sync {
    /// The registers asked for are now owned by the waiter. Called at most once per queued
    /// request, on whatever thread returned the registers that made the grant possible, with no
    /// adapter lock held.
    fn granted(&self, registers: MapRegisters);

    /// A system-mode transfer mapped by [`Adapter::map_system`] for this waiter ended (the HAL's
    /// `DMA_COMPLETION_ROUTINE`). Called once per such transfer, never from inside
    /// `map_system` or `stop_system`, with no adapter lock held. Bus-master waiters never get
    /// it.
    fn system_transfer_done(&self, status: SystemDmaStatus) {
        let _ = status;
    }
}

/// A strong handle to an [`AllocationWaiter`]: what a backend keeps while a request is queued.
pub type Waiter = Arc<dyn AllocationWaiter>;

/// How the core names its waiter in [`Adapter::allocate`] and [`Adapter::cancel_allocation`]: a
/// weak handle, so that an allocation granted at once costs no reference counting. A backend
/// that queues the request upgrades it to a [`Waiter`] and keeps that until it grants or
/// cancels the request. Its address identifies the request.
pub type WaiterRef = Weak<dyn AllocationWaiter>;

/// The address that identifies a waiter (the data pointer of its `Arc`).
#[inline]
pub fn waiter_id(waiter: &Waiter) -> usize {
    Arc::as_ptr(waiter) as *const () as usize
}

/// The address that identifies a waiter named by a [`WaiterRef`]; equal to [`waiter_id`] of
/// the same waiter's `Arc`.
#[inline]
pub fn waiter_ref_id(waiter: &WaiterRef) -> usize {
    Weak::as_ptr(waiter) as *const () as usize
}

/// A request for map registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocationRequest {
    /// Number of map registers wanted (each covers one page).
    pub count: NonZeroU32,
    /// Immediate execution: grant now or refuse; never queue.
    pub immediate: bool,
}

/// Outcome of [`Adapter::allocate`].
#[derive(Debug)]
#[must_use = "granted registers must be freed, and a queued request waits for its waiter"]
pub enum Allocation {
    /// The registers are owned by the caller now.
    Granted(MapRegisters),
    /// The request waits; the waiter's [`AllocationWaiter::granted`] will be called once.
    Queued,
}

/// A grant of consecutive map registers of one adapter. Not `Clone`: exactly one owner frees it.
///
/// A backend builds it with [`MapRegisters::new`]; the core only passes it back.
#[derive(Debug, PartialEq, Eq)]
pub struct MapRegisters {
    first: u32,
    count: u32,
}

impl MapRegisters {
    /// A grant of `count` registers starting at register index `first`. For backends.
    pub const fn new(first: u32, count: u32) -> Self {
        Self { first, count }
    }

    /// Index of the first register in the adapter's pool.
    pub const fn first(&self) -> u32 {
        self.first
    }

    /// Number of registers granted.
    pub const fn count(&self) -> u32 {
        self.count
    }
}

/// Result of mapping one transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Bytes mapped (≤ the length asked for, ≥ 1 when a non-zero length was asked for).
    pub bytes: u64,
    /// Number of elements written to the output list.
    pub elements: usize,
}

/// A common buffer as the platform allocated it (raw, before dmatx applies alignment).
#[derive(Debug, PartialEq, Eq)]
pub struct CommonAllocation {
    /// CPU virtual address of the first byte.
    pub virt: VirtAddr,
    /// Bus (logical) address of the first byte.
    pub logical: BusAddr,
    /// Bytes allocated.
    pub length: u64,
    /// Backend bookkeeping (e.g. the first page frame).
    pub token: u64,
}

/// One virtually contiguous segment of a buffer and the page frames behind it.
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    /// Virtual address of the segment's first byte (its page offset matters).
    pub va: VirtAddr,
    /// Bytes in the segment (KMDF's `MmGetMdlByteCount`).
    pub length: u64,
    /// Physical page frames, one per page spanned by `va .. va + length`, in order.
    pub frames: &'a [PhysAddr],
}

impl Segment<'_> {
    /// Physical address of byte `offset` of the segment, or `None` past its end.
    pub fn phys(&self, offset: u64) -> Option<PhysAddr> {
        if offset >= self.length {
            return None;
        }
        let pos = self.va.page_offset() + offset;
        let frame = self.frames.get(usize::try_from(pos / PAGE_SIZE).ok()?)?;
        frame.page_base().checked_add(pos % PAGE_SIZE)
    }
}

/// A buffer described as a chain of virtually contiguous segments (KMDF's MDL chain).
///
/// # Safety
/// An implementer promises that, for as long as the value exists and even if it is leaked:
/// * the frames of every segment are the physical pages that hold the segment's bytes, and no
///   other owner will be given those pages (they are never freed or reused while the value
///   exists, and a leaked value keeps them forever);
/// * the segments and frames it reports never change while the value exists (moving the value
///   does not move the bytes);
/// * the segment count and lengths are consistent: `frames.len()` equals the pages spanned by
///   `va .. va + length`;
/// * it never lends Rust references (`&[u8]`, `&mut [u8]`) to the bytes it describes while a
///   device may access them: its own accessors copy through raw pointers. Several values may
///   describe the same bytes (dmatx-runtime's `RequestMemory` shares one request buffer
///   between the issuer and the transactions that use it, as two MDLs may describe the same
///   pages), which is sound only because no reference to the bytes ever exists.
///
/// The core relies on this to hand the frames to a device while it owns the value.
pub unsafe trait MemoryDescriptor: Send + 'static {
    /// Number of segments in the chain (at least one).
    fn segment_count(&self) -> usize;

    /// Segment `index` (`index < segment_count()`).
    fn segment(&self, index: usize) -> Segment<'_>;

    /// Total bytes in the chain.
    fn total_length(&self) -> u64 {
        (0..self.segment_count())
            .map(|i| self.segment(i).length)
            .sum()
    }
}

/// A DMA adapter: one finite pool of map registers and the mapping operations over it.
pub trait Adapter: Send + Sync + 'static {
    /// Map registers this adapter granted to the device (KMDF's N, > 1).
    fn map_register_count(&self) -> u32;

    /// Alignment mask the platform requires of common buffers (`HAL alignment − 1`).
    fn alignment_requirement(&self) -> u64 {
        0
    }

    /// Announce a future waiter so the backend can reserve room in its queue; the core calls it
    /// once per transaction at creation, so queuing later allocates nothing.
    ///
    /// # Errors
    /// [`Error::InsufficientResources`] if the backend cannot take another waiter.
    fn register_waiter(&self) -> Result<()>;

    /// Withdraw an announcement made by [`Adapter::register_waiter`].
    fn unregister_waiter(&self);

    /// Allocate `request.count` consecutive map registers.
    ///
    /// # Errors
    /// [`Error::InsufficientResources`] when `request.immediate` is set and the registers are
    /// not free now, or when more registers are asked for than the adapter has;
    /// [`Error::InvalidParameter`] if the request must queue and `waiter` is gone.
    fn allocate(&self, request: AllocationRequest, waiter: &WaiterRef) -> Result<Allocation>;

    /// Withdraw the queued request of `waiter`. Returns `true` if it was queued (its waiter will
    /// now never be called), `false` if nothing was queued for it. Never calls a waiter: the
    /// core calls [`Adapter::dispatch_queued`] afterwards, with no lock held, because requests
    /// queued behind the withdrawn one may fit now.
    fn cancel_allocation(&self, waiter: &WaiterRef) -> bool;

    /// Grant queued requests that fit in the free registers now, in order, calling their
    /// waiters on this thread with no adapter lock held.
    fn dispatch_queued(&self);

    /// Map `length` bytes of `buffer` starting at chain offset `offset` for one transfer, writing
    /// at most `out.len()` elements. Register `i` of `registers` serves the `i`-th page the
    /// mapped bytes span. May map fewer bytes than asked (element limit, a break in physical
    /// contiguity, the end of a segment); for a write-to-device transfer bounced bytes are
    /// copied in before this returns. The mapping is live until [`Adapter::flush`]. Stopping
    /// because the grant has too few registers maps fewer bytes rather than failing.
    ///
    /// The core asks only for ranges inside the buffer with a grant sized for them, and treats
    /// a failure as the transfer's error; a backend that cannot make a page device-visible
    /// directly must bounce it rather than fail (a failure on a grant delivered through a
    /// waiter has no caller to be reported to).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the range lies outside the buffer, `length` is 0, `out` is
    /// empty or the range needs more registers than granted; backend errors otherwise.
    fn map<D: MemoryDescriptor + ?Sized>(
        &self,
        registers: &MapRegisters,
        buffer: &D,
        offset: u64,
        length: u64,
        direction: Direction,
        out: &mut [SgElement],
    ) -> Result<Mapping>;

    /// End the live mapping of `registers` (made for `buffer`, `offset`, `length`): for a
    /// read-from-device transfer bounced bytes are copied back; the device may no longer use
    /// the mapping. Always ends the mapping, even when it returns an error.
    ///
    /// # Errors
    /// A backend error means the transfer's data cannot be trusted (KMDF's flush failure).
    fn flush<D: MemoryDescriptor + ?Sized>(
        &self,
        registers: &MapRegisters,
        buffer: &D,
        offset: u64,
        length: u64,
        direction: Direction,
    ) -> Result<()>;

    /// Return registers to the pool, ending any live mapping, and grant queued requests that
    /// now fit (calling their waiters on this thread, with no adapter lock held).
    fn free(&self, registers: MapRegisters);

    /// System mode (`MapTransferEx` on a system adapter): map `length` bytes of `buffer` from
    /// chain offset `offset` as [`Adapter::map`] does, and program the adapter's controller
    /// channel to move them between memory and the device address plus `device_offset`
    /// (for a write-to-device transfer, from memory to the device). The registers' grant is the
    /// channel: a system adapter grants one waiter at a time. When the transfer ends —
    /// all bytes moved, a controller error, or a stop — the backend calls `waiter`'s
    /// [`AllocationWaiter::system_transfer_done`] once, later, from its own context (never
    /// from inside this call). The mapping stays live until [`Adapter::flush`].
    ///
    /// # Errors
    /// [`Error::InvalidDeviceRequest`] on an adapter that is not system-mode (the default);
    /// as [`Adapter::map`] otherwise.
    #[allow(clippy::too_many_arguments)]
    fn map_system<D: MemoryDescriptor + ?Sized>(
        &self,
        registers: &MapRegisters,
        buffer: &D,
        offset: u64,
        length: u64,
        direction: Direction,
        device_offset: u64,
        waiter: &WaiterRef,
        out: &mut [SgElement],
    ) -> Result<Mapping> {
        let _ = (
            registers,
            buffer,
            offset,
            length,
            direction,
            device_offset,
            waiter,
            out,
        );
        Err(Error::InvalidDeviceRequest)
    }

    /// System mode (`CancelMappedTransfer`): stop `waiter`'s running transfer. The bytes not
    /// yet moved are not moved, and the transfer's completion reports
    /// [`SystemDmaStatus::Cancelled`]. Never calls a waiter.
    fn stop_system(&self, waiter: &WaiterRef) -> SystemStop {
        let _ = waiter;
        SystemStop::NotRunning
    }

    /// Allocate `length` bytes of physically contiguous, device-visible memory with page
    /// alignment (`AllocateCommonBuffer`).
    ///
    /// # Errors
    /// [`Error::InsufficientResources`] if the memory is not available.
    fn allocate_common_buffer(&self, length: u64) -> Result<CommonAllocation>;

    /// Free a common buffer allocated by this adapter.
    fn free_common_buffer(&self, allocation: CommonAllocation);

    /// Copy bytes of a common buffer into `out`, starting at byte `offset` of the allocation.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the range lies outside the allocation.
    fn read_common_buffer(
        &self,
        allocation: &CommonAllocation,
        offset: u64,
        out: &mut [u8],
    ) -> Result<()>;

    /// Copy `data` into a common buffer at byte `offset` of the allocation.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the range lies outside the allocation.
    fn write_common_buffer(
        &self,
        allocation: &CommonAllocation,
        offset: u64,
        data: &[u8],
    ) -> Result<()>;
}

/// A plan of which attempts fail: the next `n`, or each one with a probability drawn from a
/// seeded generator so runs repeat. The low-memory knobs of the simulated platform (DMA object
/// creations) and of the runtime (its objects' creations) are both one of these.
///
/// ```
/// use dmatx_hal::FailurePlan;
/// let mut plan = FailurePlan::default();
/// plan.fail_next(2);
/// assert_eq!([plan.refuse(), plan.refuse(), plan.refuse()], [true, true, false]);
/// assert_eq!(plan.counts(), (2, 1));
/// ```
#[derive(Clone, Debug, Default)]
pub struct FailurePlan {
    next: u64,
    per_million: u32,
    rng: u64,
    refused: u64,
    allowed: u64,
}

impl FailurePlan {
    /// Make the next `n` attempts fail.
    pub fn fail_next(&mut self, n: u64) {
        self.next = n;
    }

    /// Make each attempt fail with `probability` (clamped to 0..=1; 0 turns it off), drawn from
    /// a generator seeded with `seed`.
    pub fn fail_randomly(&mut self, probability: f64, seed: u64) {
        // Truncation intended: the probability is clamped to 0..=1 first.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let per_million = (probability.clamp(0.0, 1.0) * 1_000_000.0) as u32;
        self.per_million = per_million;
        self.rng = seed | 1;
    }

    /// Whether the attempt being made now fails (and count it).
    pub fn refuse(&mut self) -> bool {
        let refuse = if self.next > 0 {
            self.next -= 1;
            true
        } else if self.per_million > 0 {
            // xorshift64*: deterministic for a seed.
            self.rng ^= self.rng >> 12;
            self.rng ^= self.rng << 25;
            self.rng ^= self.rng >> 27;
            let draw = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32;
            draw % 1_000_000 < u64::from(self.per_million)
        } else {
            false
        };
        if refuse {
            self.refused += 1;
        } else {
            self.allowed += 1;
        }
        refuse
    }

    /// Attempts refused and allowed so far.
    pub const fn counts(&self) -> (u64, u64) {
        (self.refused, self.allowed)
    }
}

/// Locate chain offset `offset` in `buffer`: the segment index and the offset inside it.
///
/// Returns `None` if `offset` is at or past the end of the chain.
pub fn locate<D: MemoryDescriptor + ?Sized>(buffer: &D, mut offset: u64) -> Option<(usize, u64)> {
    for i in 0..buffer.segment_count() {
        let len = buffer.segment(i).length;
        if offset < len {
            return Some((i, offset));
        }
        offset -= len;
    }
    None
}
