//! The DMA transaction (KMDF's WDFDMATRANSACTION): one logical job cut into transfers.
//!
//! Spec §1.2 (state), §2.2–§2.5 (methods), §3.1 (state machine), §3.2 (splitting), §3.3
//! (starting), §3.4 (completion), §3.5 (staging/completion races), §3.6 (cancel), §3.11 (reuse).
//!
//! # How the races are kept apart
//! One small lock per transaction guards its state. Driver callbacks never run under it, nor
//! do `tracing` subscribers (what happens under it is recorded, and emitted once it is
//! released: `crate::trace`). A transfer is *prepared* (its length computed, its map registers
//! obtained: the steps that can fail, done by the caller who can be told) and then *staged*
//! (mapped and handed to the driver's program-DMA callback, which cannot fail). Only one thread stages at a time, the
//! *stager*: a completion that prepares the next transfer while a stager is inside program-DMA —
//! from inside the callback or from another thread — leaves it `ready` for the stager, which
//! maps and programs it after the callback returns. So program-DMA never nests, for every kind
//! (KMDF nests for scatter/gather; `docs/quirks.md`).

use crate::binding::RequestBinding;
use crate::enabler::{Child, Enabler, EnablerShared};
use crate::split;
use crate::sync::{Arc, Mutex, Weak};
use crate::trace;
use alloc::vec::Vec;
use core::fmt;
use core::num::NonZeroU32;
use dmatx_hal::{
    Adapter, Allocation, AllocationRequest, AllocationWaiter, MapRegisters, MemoryDescriptor,
    Platform, SystemDmaStatus, SystemStop, WaiterRef,
};
use dmatx_types::{
    Call, Direction, DmaVersion, Error, Misuse, Result, SgElement, State, TransactionKind, VirtAddr,
};

/// The driver's program-DMA callback (`EvtProgramDma`): program the device with one transfer.
///
/// Arguments: the transaction, the context given to [`Transaction::execute`], the direction,
/// and the transfer's scatter/gather list (exactly one element for packet transactions). The
/// list is lent for the call only. The return value is ignored, as in KMDF: to abort, call
/// [`Transaction::dma_completed_final`].
///
/// The callback may call any method of the transaction, including completing the transfer it
/// was just given; the next transfer is then programmed after this call returns, on this thread.
pub type ProgramDma<P, C, B> = fn(&Transaction<P, C, B>, &C, Direction, &[SgElement]) -> bool;

/// The driver's reserve callback (`EvtReserveDma`): the map registers asked for by
/// [`Transaction::allocate_resources`] are now owned by the transaction. Arguments: the
/// transaction (Reserved, unless the driver already initialized it while the reservation was
/// queued) and the context given to `allocate_resources`. The driver
/// typically initializes and executes the transaction from here, and may do so again and again
/// while the reservation lasts.
pub type ReserveDma<P, C, B> = fn(&Transaction<P, C, B>, &C);

/// System mode: the driver's channel-configuration callback
/// (`EvtDmaTransactionConfigureDmaChannel`), called once per transfer after the channel is
/// owned and before the transfer is mapped. Arguments: the transaction, the execute context,
/// the transfer's byte offset in the buffer chain, and its length. Returning `false` means the
/// driver has finished or aborted the transaction itself (normally with
/// [`Transaction::dma_completed_final`] from inside the callback): the transfer is neither
/// mapped nor programmed (statement 91). During the call the transfer counts as programmed but
/// unmapped, so completing it from inside moves no data.
pub type ConfigureChannel<P, C, B> = fn(&Transaction<P, C, B>, &C, u64, u64) -> bool;

/// System mode: the driver's transfer-complete callback
/// (`EvtDmaTransactionDmaTransferComplete`), called once per transfer when the controller
/// finishes it, with the controller's status (dmatx adds the bytes moved to
/// `DmaError`/`DmaCancelled`). Never before, or during, that transfer's program-DMA
/// (statement 90). The driver normally reports the transfer with a `dma_completed*` call from
/// here, or defers that to a DPC or timer.
pub type TransferComplete<P, C, B> = fn(&Transaction<P, C, B>, &C, Direction, SystemDmaStatus);

/// What [`Transaction::stop_system_transfer`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SystemStopOutcome {
    /// A transfer was running: the controller stops it, and its transfer-complete callback
    /// reports [`SystemDmaStatus::Cancelled`] with the bytes it had moved.
    Stopping,
    /// No transfer was running. A transfer not yet mapped will not be: a registered
    /// transfer-complete callback gets `Cancelled` for it (statement 89), and without one the
    /// call that would stage it fails with [`Error::Cancelled`]. A transfer the controller had
    /// already finished is reported as it ended (and a completion that needs another transfer
    /// then finishes with `Cancelled`); a transaction that is not executing is only marked.
    NotRunning,
    /// The transaction was still waiting for its channel: the request is withdrawn and the
    /// transaction is TransferFailed now; complete the request and release it.
    Withdrawn,
}

/// Map registers reserved by [`Transaction::allocate_resources`] (spec §3.9).
struct Reservation {
    /// R: the number reserved.
    count: u32,
    /// The registers, once granted (`None` while the request is queued).
    registers: Option<MapRegisters>,
}

/// The answer of a `dma_completed*` call.
#[must_use = "Finished means the transaction is over and the driver completes its request; \
              MoreProcessingRequired means it must not touch the transaction"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// KMDF's `TRUE`: the transaction is over, successfully or with the error given. Its bytes
    /// are in [`Transaction::bytes_transferred`]; release it to get the buffer back.
    Finished(Result<()>),
    /// KMDF's `FALSE` with `STATUS_MORE_PROCESSING_REQUIRED`: the next transfer has been
    /// programmed, queued for map registers, or left to the thread already inside program-DMA.
    /// Do not touch the transaction: program-DMA may already have run.
    MoreProcessingRequired,
}

impl Completion {
    /// Whether the transaction is over.
    pub fn is_finished(&self) -> bool {
        matches!(self, Completion::Finished(_))
    }

    /// The NTSTATUS KMDF would report with this answer.
    pub fn nt_status(&self) -> u32 {
        match self {
            Completion::Finished(Ok(())) => 0,
            Completion::Finished(Err(e)) => e.nt_status(),
            Completion::MoreProcessingRequired => 0xC000_0016,
        }
    }
}

/// An error that hands the caller's buffer back: an initialize that fails returns the buffer it
/// was given, so nothing is lost.
pub struct BufferError<B> {
    /// What went wrong.
    pub error: Error,
    /// The buffer, unchanged.
    pub buffer: B,
}

impl<B> fmt::Debug for BufferError<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferError")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<B> fmt::Display for BufferError<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl<B> core::error::Error for BufferError<B> {}

/// What a transaction would need to run in one transfer (`WdfDmaTransactionGetTransferInfo`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransferInfo {
    /// Map registers the whole transaction spans (pages, counted per segment).
    pub map_registers: u64,
    /// Scatter/gather elements in the worst case (the same page count, as KMDF v2 counts).
    pub sg_elements: u64,
}

/// How a transfer was reported done.
#[derive(Clone, Copy)]
enum Done {
    Full,
    WithLength(u64),
    Final(u64),
}

impl Done {
    fn call(self) -> Call {
        match self {
            Done::Full => Call::DmaCompleted,
            Done::WithLength(_) => Call::DmaCompletedWithLength,
            Done::Final(_) => Call::DmaCompletedFinal,
        }
    }
}

/// What the system-mode checks before mapping decided.
enum BeforeMap<'a, P: Platform, C, B> {
    /// Map and program the transfer.
    Map(TxGuard<'a, P, C, B>),
    /// Do not map it (suppressed by the configuration callback, reported stopped, or already
    /// completed by the driver); the staging succeeded.
    Skip(TxGuard<'a, P, C, B>),
    /// The transaction finished with this error (stopped, no callback to report it).
    Failed(Error),
}

/// Outcome of preparing a transfer.
enum Prepared {
    /// Registers are held: the transfer is ready to be staged.
    Ready,
    /// The registers were asked for and the request is queued.
    Queued,
}

/// Cleans up after a program-DMA callback that unwinds instead of returning: clears the stager
/// record (so the next completion can stage) and turns a transfer prepared meanwhile, which no
/// one will stage now, into a failure the driver can release. Disarmed on a normal return.
struct StagerGuard<'a, P: Platform, C, B> {
    transaction: &'a Transaction<P, C, B>,
    armed: bool,
}

impl<P: Platform, C, B> StagerGuard<'_, P, C, B> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl<P: Platform, C, B> Drop for StagerGuard<'_, P, C, B> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut g = self.transaction.lock();
        g.staging = false;
        if g.ready {
            // Its registers stay in the transaction; release returns them.
            g.ready = false;
            self.transaction.set_state(&mut g, State::TransferFailed);
        }
    }
}

/// State guarded by the transaction's lock.
struct Inner<P: Platform, C, B> {
    state: State,
    direction: Direction,
    buffer: Option<B>,
    program_dma: Option<ProgramDma<P, C, B>>,
    context: Option<C>,
    /// Chain offset of the first byte.
    offset: u64,
    /// Total bytes.
    length: u64,
    /// Bytes reported done so far.
    transferred: u64,
    /// Length of the transfer programmed now (0 when none).
    current: u64,
    /// Length of the prepared transfer waiting to be staged.
    next: u64,
    /// F: this transaction's largest transfer.
    max_transfer: u64,
    single_transfer: bool,
    immediate: bool,
    /// Packet: the run's registers (Execute → final completion). SG: the current transfer's.
    registers: Option<MapRegisters>,
    /// A register request of this transaction is queued in the adapter.
    queued: bool,
    /// A prepared transfer holds its registers and waits for the stager.
    ready: bool,
    /// A transfer is mapped and handed to the driver; its completion is due.
    programmed: bool,
    /// A thread is running the staging loop.
    staging: bool,
    /// This transaction holds its device's v2 packet slot.
    holds_packet_slot: bool,
    /// The request bound by `initialize_with_request`, until release.
    request: Option<Arc<dyn RequestBinding>>,
    /// The request was told the transaction holds it (execute → finish).
    request_held: bool,
    /// Registers reserved by allocate_resources, kept across runs until free_resources.
    reservation: Option<Reservation>,
    /// The programmed transfer has a live mapping (false for a system transfer being
    /// configured, suppressed, or reported stopped before it was mapped).
    mapped: bool,
    /// System: StopSystemTransfer was called (KMDF's cancelled flag); cleared by initialize.
    stopped: bool,
    /// System: the controller reported the mapped transfer's end.
    reported: bool,
    /// System: the device-register offset for every transfer (reset by initialize).
    device_offset: u64,
    /// System: the driver's callbacks (they survive release, statement 79).
    configure_channel: Option<ConfigureChannel<P, C, B>>,
    transfer_complete: Option<TransferComplete<P, C, B>>,
    /// System: a controller completion that arrived while the stager was busy with its
    /// transfer, delivered when program-DMA returns (statement 90).
    deferred_done: Option<SystemDmaStatus>,
    /// The reserve callback and its context, until it is called.
    reserve_callback: Option<(ReserveDma<P, C, B>, C)>,
    /// Transfers handed to program-DMA since the last initialize (the `tx.program_dma` span's
    /// `transfer`).
    #[cfg(feature = "tracing")]
    transfers: u64,
}

/// The transaction's lock held (with the `tracing` feature, a guard that emits the events
/// recorded under the lock once it is released).
type TxGuard<'a, P, C, B> = trace::Guard<'a, Inner<P, C, B>>;

/// Where transaction ids come from: a process-wide counter, starting at 1. A plain `core`
/// atomic even under loom: ids are not part of the protocol the loom models explore.
#[cfg(target_has_atomic = "64")]
static NEXT_ID: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(1);
#[cfg(not(target_has_atomic = "64"))]
static NEXT_ID: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(1);

/// A new transaction id.
fn next_id() -> u64 {
    // ORDERING: a counter; only uniqueness matters, which the read-modify-write gives under
    // any ordering.
    let id = NEXT_ID.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    #[cfg(not(target_has_atomic = "64"))]
    let id = id as u64;
    id
}

/// Resources taken out of a transaction under its lock, to be returned after the lock is
/// dropped (returning registers can run other transactions' callbacks; dropping a context can
/// run driver code).
struct Leftovers<C> {
    direction: Direction,
    registers: Option<MapRegisters>,
    context: Option<C>,
    packet_slot: bool,
    request: Option<Arc<dyn RequestBinding>>,
}

/// A DMA transaction (KMDF's WDFDMATRANSACTION).
///
/// Created with [`Transaction::create`], which returns an `Arc`: the handle is shared with the
/// platform while a register request is queued and with the thread staging a transfer. Dropping
/// the last `Arc` deletes it (`WdfObjectDelete`).
///
/// `P` is the platform, `C` the execute context handed to every program-DMA call (cloned for
/// each call, so make it cheap to clone: an `Arc`, a reference or a small value), and `B` the
/// buffer type, which the transaction owns from initialize until it is released. `C`'s
/// `Clone` runs while dmatx holds the transaction's lock, so it must not call into the
/// transaction (an `Arc` clone never does).
///
/// # Example
/// ```
/// use dmatx::{Completion, Direction, DmaDevice, Enabler, EnablerConfig, Profile, SgElement,
///             Transaction};
/// use dmatx_sim::{SimBuffer, SimPlatform};
///
/// let sim = SimPlatform::new();
/// let device = DmaDevice::new(sim.clone());
/// let enabler = Enabler::create(&device, EnablerConfig::new(Profile::ScatterGather64, 16384))?;
/// let t: std::sync::Arc<Transaction<SimPlatform, (), SimBuffer>> = Transaction::create(&enabler)?;
///
/// // The program-DMA callback would write the SG list to the device; here it just looks.
/// fn program(t: &Transaction<SimPlatform, (), SimBuffer>, _: &(), _: Direction,
///            sg: &[SgElement]) -> bool {
///     assert!(!sg.is_empty());
///     true
/// }
///
/// let buffer = sim.allocate_buffer(40_000, 0x80).unwrap();
/// t.initialize_using_offset(program, Direction::WriteToDevice, buffer, 0, 40_000)
///     .map_err(|e| e.error)?;
/// t.execute(())?;
/// // The "device" finishes each transfer at once.
/// while t.dma_completed()? == Completion::MoreProcessingRequired {}
/// assert_eq!(t.bytes_transferred(), 40_000);
/// let buffer = t.release()?.expect("the buffer comes back");
/// assert_eq!(buffer.len(), 40_000);
/// # drop(buffer);
/// # sim.check_clean().unwrap();
/// # Ok::<(), dmatx::Error>(())
/// ```
pub struct Transaction<P: Platform, C, B> {
    /// [`Transaction::id`].
    id: u64,
    enabler: Arc<EnablerShared<P>>,
    kind: TransactionKind,
    /// This transaction as the platform's waiter (weak: no reference counting unless a request
    /// actually queues).
    waiter: WaiterRef,
    inner: Mutex<Inner<P, C, B>>,
    /// SG storage of the transfer being staged, preallocated at creation. Locked only by the
    /// stager, while it maps and while program-DMA reads the list.
    staging_area: Mutex<Vec<SgElement>>,
    /// Events recorded under `inner`'s lock, emitted once it is released (`crate::trace`).
    #[cfg(feature = "tracing")]
    trace: trace::Outbox,
}

impl<P, C, B> Transaction<P, C, B>
where
    P: Platform,
    C: Clone + Send + Sync + 'static,
    B: MemoryDescriptor,
{
    /// Create a transaction of the kind the enabler's profile implies
    /// (`WdfDmaTransactionCreate`). Its SG storage is allocated now, sized for the adapter's
    /// map registers, so nothing later allocates.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceRequest`] for a system-mode enabler (system-mode transactions are
    /// not available yet); [`Error::InsufficientResources`] if the platform cannot take another
    /// queued request.
    pub fn create(enabler: &Enabler<P>) -> Result<Arc<Self>> {
        let shared = &enabler.shared;
        let kind = shared.profile.transaction_kind();
        if !shared.is_configured() {
            // A system enabler before configure_system_profile has no channel to work with.
            return Err(Error::InvalidDeviceState);
        }
        if shared.is_deleted() {
            return Err(Error::InvalidDeviceState);
        }
        let records: Vec<_> = shared.configured_records().collect();
        for (done, record) in records.iter().enumerate() {
            if let Err(e) = record.adapter.register_waiter() {
                for earlier in &records[..done] {
                    earlier.adapter.unregister_waiter();
                }
                return Err(e);
            }
        }
        let capacity = match kind {
            TransactionKind::ScatterGather | TransactionKind::System => records
                .iter()
                .map(|r| r.map_registers as usize)
                .max()
                .unwrap_or(1),
            // Packet transfers map onto the stager's stack.
            _ => 0,
        };
        let mut area = Vec::with_capacity(capacity);
        area.resize(capacity, SgElement::default());
        let single_transfer = shared.require_single_transfer;
        let transaction = Arc::new_cyclic(|this: &Weak<Self>| Self {
            id: next_id(),
            enabler: Arc::clone(shared),
            kind,
            waiter: this.clone() as WaiterRef,
            inner: Mutex::new(Inner {
                state: State::Created,
                direction: Direction::ReadFromDevice,
                buffer: None,
                program_dma: None,
                context: None,
                offset: 0,
                length: 0,
                transferred: 0,
                current: 0,
                next: 0,
                max_transfer: 0,
                single_transfer,
                immediate: false,
                registers: None,
                queued: false,
                ready: false,
                programmed: false,
                staging: false,
                holds_packet_slot: false,
                request: None,
                request_held: false,
                reservation: None,
                reserve_callback: None,
                mapped: false,
                stopped: false,
                reported: false,
                device_offset: 0,
                configure_channel: None,
                transfer_complete: None,
                deferred_done: None,
                #[cfg(feature = "tracing")]
                transfers: 0,
            }),
            staging_area: Mutex::new(area),
            #[cfg(feature = "tracing")]
            trace: trace::Outbox::default(),
        });
        let child: Weak<dyn Child> = Arc::downgrade(&transaction) as Weak<dyn Child>;
        shared.adopt(child)?;
        Ok(transaction)
    }

    // ---------------------------------------------------------------------------------------
    // Initialize (spec §2.2)

    /// Initialize with a buffer, the virtual address of its first byte to transfer, and a
    /// length (`WdfDmaTransactionInitialize`). `va` must lie in the buffer's first segment.
    ///
    /// # Errors
    /// As [`Transaction::initialize_using_offset`]; [`Error::InvalidParameter`] when `va` lies
    /// outside the first segment (statement 19). The buffer comes back in the error.
    pub fn initialize(
        &self,
        program_dma: ProgramDma<P, C, B>,
        direction: Direction,
        buffer: B,
        va: VirtAddr,
        length: u64,
    ) -> Result<(), BufferError<B>> {
        if buffer.segment_count() == 0 {
            return Err(BufferError {
                error: Error::InvalidParameter,
                buffer,
            });
        }
        let first = buffer.segment(0);
        let offset = match va.offset_from(first.va) {
            Some(o) if o < first.length => o,
            _ => {
                return Err(BufferError {
                    error: Error::InvalidParameter,
                    buffer,
                });
            }
        };
        self.initialize_using_offset(program_dma, direction, buffer, offset, length)
    }

    /// Initialize with a buffer, a byte offset into it and a length
    /// (`WdfDmaTransactionInitializeUsingOffset`). The transaction owns the buffer until
    /// [`Transaction::release`] gives it back; on error it comes back at once.
    ///
    /// # Errors
    /// Checked before the state, leaving the transaction as it was: [`Error::InvalidParameter`]
    /// for a zero length (statement 18), a length of 4 GiB or more, an offset outside the first
    /// segment (20), or, on a v2 packet enabler, a range running past the first segment (21);
    /// [`Error::BufferTooSmall`] if the range runs past the end of the buffer. Then
    /// [`Error::Misuse`] if the state is not Created, Reserved or Released (27, 28). Then,
    /// leaving the transaction Released (29): [`Error::WdfTooFragmented`] if a transfer would
    /// need more SG elements than allowed (30, 31); for single-transfer transactions
    /// [`Error::WdfTooManyTransfers`] (33), [`Error::WdfNotEnoughMapRegisters`] (34),
    /// [`Error::WdfTooFragmented`] (35).
    pub fn initialize_using_offset(
        &self,
        program_dma: ProgramDma<P, C, B>,
        direction: Direction,
        buffer: B,
        offset: u64,
        length: u64,
    ) -> Result<(), BufferError<B>> {
        let result = self.initialize_inner(program_dma, direction, buffer, offset, length, None);
        if let Err(e) = &result {
            self.verify(&e.error);
        }
        result
    }

    /// Initialize as [`Transaction::initialize_using_offset`] and bind `request` to the
    /// transaction (the core of `WdfDmaTransactionInitializeUsingRequest`; a driver runtime
    /// derives the buffer, offset and length from its request and calls this).
    ///
    /// The transaction keeps the binding until release ([`Transaction::request`] returns it),
    /// and tells the request it holds it ([`RequestBinding::set_dma_active`]) from a successful
    /// execute until the transaction finishes, fails to start or is cancelled, so the runtime
    /// can refuse to complete the request meanwhile (statement 55).
    ///
    /// # Errors
    /// As [`Transaction::initialize_using_offset`]; on error nothing is bound.
    pub fn initialize_with_request(
        &self,
        program_dma: ProgramDma<P, C, B>,
        direction: Direction,
        buffer: B,
        offset: u64,
        length: u64,
        request: Arc<dyn RequestBinding>,
    ) -> Result<(), BufferError<B>> {
        let result = self.initialize_inner(
            program_dma,
            direction,
            buffer,
            offset,
            length,
            Some(request),
        );
        if let Err(e) = &result {
            self.verify(&e.error);
        }
        result
    }

    fn initialize_inner(
        &self,
        program_dma: ProgramDma<P, C, B>,
        direction: Direction,
        buffer: B,
        offset: u64,
        length: u64,
        request: Option<Arc<dyn RequestBinding>>,
    ) -> Result<(), BufferError<B>> {
        let refuse = |error, buffer| Err(BufferError { error, buffer });
        if length == 0 || length > u64::from(u32::MAX) || buffer.segment_count() == 0 {
            return refuse(Error::InvalidParameter, buffer);
        }
        let first_length = buffer.segment(0).length;
        if offset >= first_length {
            return refuse(Error::InvalidParameter, buffer);
        }
        let end = offset.checked_add(length);
        if end.is_none_or(|end| end > buffer.total_length()) {
            return refuse(Error::BufferTooSmall, buffer);
        }
        let v2_packet =
            self.kind == TransactionKind::Packet && self.enabler.version == DmaVersion::V2;
        if v2_packet && end.is_some_and(|end| end > first_length) {
            return refuse(Error::InvalidParameter, buffer);
        }
        let Some(record) = self.enabler.record(direction) else {
            return refuse(Error::InvalidDeviceRequest, buffer);
        };

        let mut g = self.lock();
        if !matches!(g.state, State::Created | State::Reserved | State::Released) {
            let error = self.misuse(Call::Initialize, g.state, INIT_STATE);
            return refuse(error, buffer);
        }
        if self.enabler.is_deleted() {
            // Its device is being deleted (this transaction's turn has not come yet).
            return refuse(Error::InvalidDeviceState, buffer);
        }
        let max_sg = u64::from(self.enabler.max_sg_elements());
        let mut max_transfer = record.fragment_length;
        let checked = if g.single_transfer {
            max_transfer = self.enabler.maximum_length;
            let pages = split::pages_in_range(&buffer, offset, length);
            let elements = split::physical_runs(&buffer, offset, length);
            if length > max_transfer {
                Err(Error::WdfTooManyTransfers)
            } else if pages
                > u64::from(
                    g.reservation
                        .as_ref()
                        .map_or(record.map_registers, |r| r.count),
                )
            {
                Err(Error::WdfNotEnoughMapRegisters)
            } else if elements > max_sg || (self.kind == TransactionKind::Packet && elements > 1) {
                Err(Error::WdfTooFragmented)
            } else {
                Ok(())
            }
        } else if self.kind == TransactionKind::ScatterGather
            && split::first_too_fragmented(&buffer, offset, length, max_transfer, max_sg).is_some()
        {
            Err(Error::WdfTooFragmented)
        } else {
            Ok(())
        };
        if let Err(error) = checked {
            let leftovers = self.reset(&mut g);
            drop(g);
            self.dispose(leftovers);
            return refuse(error, buffer);
        }
        trace_record!(self.trace, Initialize { direction, length });
        traced! {
            g.transfers = 0;
        }
        self.set_state(&mut g, State::Initialized);
        g.direction = direction;
        g.buffer = Some(buffer);
        g.program_dma = Some(program_dma);
        g.offset = offset;
        g.length = length;
        g.transferred = 0;
        g.current = 0;
        g.next = 0;
        g.max_transfer = max_transfer;
        g.stopped = false;
        g.device_offset = 0;
        g.deferred_done = None;
        let previous = core::mem::replace(&mut g.request, request);
        drop(g);
        drop(previous);
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Execute (spec §2.2, §3.3)

    /// Start the transaction (`WdfDmaTransactionExecute`): `context` is handed to every
    /// program-DMA call of this run. On success the first transfer has been programmed, its
    /// map registers are queued, or (when execute is called from inside program-DMA) it is
    /// ready for the thread already staging, which programs it when its callback returns;
    /// program-DMA may already have run, and the transaction may even have finished, before
    /// this returns.
    ///
    /// # Errors
    /// [`Error::Misuse`] unless Initialized (statements 38, 39); [`Error::WdfBusy`] if another v2
    /// packet transaction of the device is active (47); [`Error::InsufficientResources`] under
    /// immediate execution when the registers are not free (51);
    /// [`Error::WdfTooFragmented`] if the first SG transfer is too fragmented. After an error
    /// other than misuse the transaction is TransferFailed and must be released (54).
    pub fn execute(&self, context: C) -> Result<()> {
        self.verified(self.execute_inner(context))
    }

    fn execute_inner(&self, context: C) -> Result<()> {
        let mut g = self.lock();
        if g.state != State::Initialized {
            return Err(self.misuse(Call::Execute, g.state, EXECUTE_STATE));
        }
        if g.reservation
            .as_ref()
            .is_some_and(|r| r.registers.is_none())
        {
            return Err(self.misuse(Call::Execute, g.state, EXECUTE_UNGRANTED));
        }
        if self.enabler.is_deleted() {
            // The device is being deleted: starting now would take registers other
            // transactions are returning to the pool.
            return Err(Error::InvalidDeviceState);
        }
        trace_record!(self.trace, Execute);
        if self.kind == TransactionKind::Packet && self.enabler.version == DmaVersion::V2 {
            if !self.enabler.device.try_take_packet_slot() {
                self.set_state(&mut g, State::TransferFailed);
                return Err(Error::WdfBusy);
            }
            g.holds_packet_slot = true;
        }
        self.set_state(&mut g, State::Transfer);
        g.context = Some(context);
        if let Some(request) = &g.request {
            request.set_dma_active(true);
            g.request_held = true;
        }
        let prepared = match self.kind {
            TransactionKind::ScatterGather => self.prepare_sg(&mut g),
            _ => self.prepare_packet_run(&mut g),
        };
        match prepared {
            Err(e) => {
                let leftovers = self.finish(&mut g, State::TransferFailed);
                drop(g);
                self.dispose(leftovers);
                Err(e)
            }
            Ok(Prepared::Queued) => Ok(()),
            Ok(Prepared::Ready) if g.staging => Ok(()),
            Ok(Prepared::Ready) => match self.stage(g) {
                Some(e) => Err(e),
                None => Ok(()),
            },
        }
    }

    /// Packet run: the first transfer's length and the registers for the whole run (§3.2.1).
    /// A reservation supplies the registers without asking the platform (§3.3).
    fn prepare_packet_run(&self, g: &mut Inner<P, C, B>) -> Result<Prepared> {
        let buffer = g.buffer.as_ref().ok_or(Error::InvalidDeviceState)?;
        g.next = self.packet_next_length(g);
        if g.reservation.is_some() {
            g.ready = true;
            return Ok(Prepared::Ready);
        }
        let count = match self.kind {
            // The channel with all its registers, held until release (spec §3.2.1, §3.3).
            TransactionKind::System => self
                .enabler
                .record(g.direction)
                .map_or(0, |r| u64::from(r.map_registers)),
            _ => split::packet_run_registers(buffer, g.offset, g.length, g.max_transfer),
        };
        self.allocate(g, count)
    }

    /// The next packet transfer's length: what is left, at most F, and — under a reservation of
    /// R registers, unless single-transfer — no more than R registers can map from the current
    /// position (§3.2.1 step 2).
    fn packet_next_length(&self, g: &Inner<P, C, B>) -> u64 {
        let position = g.offset + g.transferred;
        let length = (g.length - g.transferred).min(g.max_transfer);
        match (&g.reservation, g.buffer.as_ref()) {
            // Within one segment this is KMDF's PAGE_SIZE × (R − 1) + the rest of the first
            // page; across a chain it also cuts where a segment's pages would not fit.
            (Some(reservation), Some(buffer)) if !g.single_transfer => {
                split::fit_to_registers(buffer, position, length, u64::from(reservation.count)).0
            }
            _ => length,
        }
    }

    /// Scatter/gather: the next transfer's length, fitted to the map registers and checked
    /// against the SG element limit, and its registers (§3.2.3).
    fn prepare_sg(&self, g: &mut Inner<P, C, B>) -> Result<Prepared> {
        let record = self
            .enabler
            .record(g.direction)
            .ok_or(Error::InvalidDeviceState)?;
        let buffer = g.buffer.as_ref().ok_or(Error::InvalidDeviceState)?;
        let position = g.offset + g.transferred;
        let left = g.length - g.transferred;
        let want = left.min(g.max_transfer);
        let (bytes, pages) = if g.single_transfer {
            (want, split::pages_in_range(buffer, position, want))
        } else {
            split::fit_to_registers(buffer, position, want, u64::from(record.map_registers))
        };
        // A single-transfer transaction had its elements checked at Initialize (as physical
        // runs); pages would be a stricter, different measure.
        if !g.single_transfer && pages > u64::from(self.enabler.max_sg_elements()) {
            return Err(Error::WdfTooFragmented);
        }
        g.next = bytes;
        self.allocate(g, pages)
    }

    /// Ask the direction's adapter for `count` registers.
    fn allocate(&self, g: &mut Inner<P, C, B>, count: u64) -> Result<Prepared> {
        let record = self
            .enabler
            .record(g.direction)
            .ok_or(Error::InvalidDeviceState)?;
        let count = u32::try_from(count)
            .ok()
            .and_then(NonZeroU32::new)
            .ok_or(Error::InsufficientResources)?;
        let request = AllocationRequest {
            count,
            immediate: g.immediate,
        };
        let answer = record.adapter.allocate(request, &self.waiter);
        trace_record!(
            self.trace,
            Allocate {
                registers: count.get(),
                outcome: trace::outcome(&answer)
            }
        );
        match answer? {
            Allocation::Granted(registers) => {
                g.registers = Some(registers);
                g.ready = true;
                Ok(Prepared::Ready)
            }
            Allocation::Queued => {
                g.queued = true;
                Ok(Prepared::Queued)
            }
        }
    }

    /// Become the stager and stage ready transfers until none is left. Returns an error only if
    /// the platform failed to map a transfer, which finished the transaction.
    fn stage<'a>(&'a self, mut g: TxGuard<'a, P, C, B>) -> Option<Error> {
        // The object outlives the loop even if the driver drops its handle from inside
        // program-DMA (statement 72): whoever called in (execute, a completion, or the
        // platform granting a queued request) holds an `Arc` until it returns.
        g.staging = true;
        loop {
            g.ready = false;
            if self.kind == TransactionKind::System {
                match self.before_system_map(g) {
                    BeforeMap::Map(guard) => g = guard,
                    BeforeMap::Skip(guard) => {
                        g = guard;
                        if g.ready {
                            continue;
                        }
                        g.staging = false;
                        return None;
                    }
                    BeforeMap::Failed(e) => return Some(e),
                }
            }
            // A packet transfer's one element lives on this stack, as KMDF's does; an SG or
            // system list in the preallocated staging area, locked only by the stager.
            let mut one = [SgElement::default()];
            let mut area = match self.kind {
                TransactionKind::Packet => None,
                _ => Some(self.staging_area.lock()),
            };
            let out: &mut [SgElement] = match area.as_mut() {
                Some(area) => {
                    let limit = area.len().min(self.enabler.max_sg_elements() as usize);
                    &mut area[..limit]
                }
                None => &mut one,
            };
            // A ready transfer always has its callback and context; take them before mapping
            // so that nothing can fail between the mapping and the call. (`C::clone` runs
            // under the lock; its drop on the error path does not.)
            let callback = g.program_dma.zip(g.context.clone());
            let mapped = match callback {
                Some(_) => self.map_next(&g, out),
                None => Err(Error::InvalidDeviceState),
            };
            let (elements, (program_dma, context)) = match (mapped, callback) {
                // A backend that maps nothing would make the transaction spin: not trusted.
                (Ok(m), Some(callback)) if m.bytes > 0 => {
                    // The platform may map fewer bytes than asked; the rest stays to do. (A
                    // backend reporting more than asked or than fits is clamped, not trusted.)
                    g.current = m.bytes.min(g.next);
                    g.programmed = true;
                    g.mapped = true;
                    g.reported = false;
                    let elements = m.elements.min(out.len());
                    trace_record!(
                        self.trace,
                        Map {
                            bytes: g.current,
                            elements
                        }
                    );
                    (elements, callback)
                }
                (result, callback) => {
                    let e = result.err().unwrap_or(Error::InvalidDeviceState);
                    drop(area);
                    let leftovers = self.finish(&mut g, State::TransferFailed);
                    g.staging = false;
                    drop(g);
                    self.dispose(leftovers);
                    drop(callback);
                    return Some(e);
                }
            };
            let direction = g.direction;
            traced! {
                let transfer = g.transfers;
                g.transfers += 1;
                let (offset, length) = (g.transferred, g.current);
            }
            drop(g);
            // If program-DMA panics (a driver bug, or a verifier panic inside it), the guard
            // leaves the transaction unstuck: no stager recorded, a deferred transfer turned
            // into a failure the driver can release.
            let unwinding = StagerGuard {
                transaction: self,
                armed: true,
            };
            {
                trace_enter!(
                    _span,
                    "tx.program_dma",
                    tx = self.id,
                    transfer,
                    offset,
                    length,
                    elements = elements as u64
                );
                program_dma(self, &context, direction, &out[..elements]);
            }
            unwinding.disarm();
            drop(area);
            drop(context);
            g = self.lock();
            // A controller completion that arrived meanwhile is delivered now, after
            // program-DMA returned (statement 90), still as the stager: a completion the
            // driver reports from it leaves the next transfer to this loop.
            if let Some(status) = g.deferred_done.take() {
                g = self.deliver_done(g, status);
            }
            if !g.ready {
                g.staging = false;
                return None;
            }
        }
    }

    /// System mode, before mapping a transfer: a stop (statement 89) and the
    /// channel-configuration callback (statement 91).
    fn before_system_map<'a>(&'a self, mut g: TxGuard<'a, P, C, B>) -> BeforeMap<'a, P, C, B> {
        if !g.stopped
            && let (Some(configure), Some(context)) = (g.configure_channel, g.context.clone())
        {
            let (offset, length) = (g.offset + g.transferred, g.next);
            // While the driver configures, the transfer counts as programmed and unmapped, so
            // a completion from inside the callback is accepted and moves nothing.
            g.programmed = true;
            g.mapped = false;
            g.current = length;
            drop(g);
            let go = configure(self, &context, offset, length);
            drop(context);
            g = self.lock();
            if !go || !g.programmed || g.state != State::Transfer {
                // Suppressed, or the driver reported the transfer from inside: no mapping,
                // no program-DMA, and the staging succeeded.
                return BeforeMap::Skip(g);
            }
            g.programmed = false;
            g.current = 0;
        }
        if !g.stopped {
            return BeforeMap::Map(g);
        }
        if let (Some(done), Some(context)) = (g.transfer_complete, g.context.clone()) {
            // Statement 89: the transfer is reported cancelled without being mapped or
            // programmed. It stands as a programmed transfer of 0 bytes, so the driver reports
            // it as it would any other (a completion that needs more returns Cancelled).
            g.programmed = true;
            g.mapped = false;
            g.current = 0;
            let direction = g.direction;
            drop(g);
            done(
                self,
                &context,
                direction,
                SystemDmaStatus::Cancelled { moved: 0 },
            );
            drop(context);
            return BeforeMap::Skip(self.lock());
        }
        // KMDF leaves the transaction in Transfer forever here (the failure is invisible
        // without a transfer-complete callback); dmatx finishes it and the call that staged
        // it reports the cancel (docs/quirks.md).
        let leftovers = self.finish(&mut g, State::TransferFailed);
        g.staging = false;
        drop(g);
        self.dispose(leftovers);
        BeforeMap::Failed(Error::Cancelled)
    }

    /// Call the driver's transfer-complete callback with `status` (lock dropped around it).
    fn deliver_done<'a>(
        &'a self,
        mut g: TxGuard<'a, P, C, B>,
        status: SystemDmaStatus,
    ) -> TxGuard<'a, P, C, B> {
        if let (Some(done), Some(context)) = (g.transfer_complete, g.context.clone()) {
            let direction = g.direction;
            drop(g);
            done(self, &context, direction, status);
            drop(context);
            g = self.lock();
        }
        g
    }

    fn map_next(&self, g: &Inner<P, C, B>, out: &mut [SgElement]) -> Result<dmatx_hal::Mapping> {
        let (adapter, registers, buffer) = self.transfer_parts(g)?;
        let position = g.offset + g.transferred;
        match self.kind {
            TransactionKind::System => adapter.map_system(
                registers,
                buffer,
                position,
                g.next,
                g.direction,
                g.device_offset,
                &self.waiter,
                out,
            ),
            _ => adapter.map(registers, buffer, position, g.next, g.direction, out),
        }
    }

    /// The adapter, registers and buffer of the transfer at hand.
    fn transfer_parts<'g>(
        &'g self,
        g: &'g Inner<P, C, B>,
    ) -> Result<(&'g P::Adapter, &'g MapRegisters, &'g B)> {
        let record = self.enabler.record(g.direction);
        let registers = g
            .registers
            .as_ref()
            .or_else(|| g.reservation.as_ref().and_then(|r| r.registers.as_ref()));
        match (record, registers, g.buffer.as_ref()) {
            (Some(record), Some(registers), Some(buffer)) => {
                Ok((&record.adapter, registers, buffer))
            }
            _ => Err(Error::InvalidDeviceState),
        }
    }

    // ---------------------------------------------------------------------------------------
    // Completion (spec §2.3, §3.4)

    /// The whole current transfer is done (`WdfDmaTransactionDmaCompleted`).
    ///
    /// # Errors
    /// [`Error::Misuse`] if the transaction is not executing or no transfer is programmed
    /// (completion before execute, twice for one transfer, or after the transaction finished:
    /// statements 56, 57). DMA outcomes come in [`Completion::Finished`].
    pub fn dma_completed(&self) -> Result<Completion> {
        self.complete(Done::Full)
    }

    /// `length` bytes of the current transfer are done; the rest is transferred again
    /// (`WdfDmaTransactionDmaCompletedWithLength`). A length larger than the transfer finishes
    /// the transaction with [`Error::InvalidParameter`] (statement 58); 0 re-issues the same
    /// bytes (61).
    ///
    /// # Errors
    /// As [`Transaction::dma_completed`].
    pub fn dma_completed_with_length(&self, length: u64) -> Result<Completion> {
        self.complete(Done::WithLength(length))
    }

    /// `length` bytes of the current transfer are done and no more transfers are wanted
    /// (`WdfDmaTransactionDmaCompletedFinal`, an underrun or an abort). Finishes the
    /// transaction: successfully, or with [`Error::InvalidParameter`] if `length` exceeds the
    /// transfer (statement 59), or [`Error::WdfTooManyTransfers`] on a single-transfer
    /// transaction with bytes left (65).
    ///
    /// # Errors
    /// As [`Transaction::dma_completed`].
    pub fn dma_completed_final(&self, length: u64) -> Result<Completion> {
        self.complete(Done::Final(length))
    }

    fn complete(&self, done: Done) -> Result<Completion> {
        self.verified(self.complete_inner(done))
    }

    fn complete_inner(&self, done: Done) -> Result<Completion> {
        let mut g = self.lock();
        if g.state != State::Transfer {
            return Err(self.misuse(done.call(), g.state, COMPLETE_STATE));
        }
        if !g.programmed {
            return Err(self.misuse(done.call(), g.state, COMPLETE_UNPROGRAMMED));
        }
        if self.kind == TransactionKind::System
            && g.mapped
            && !g.reported
            && g.transfer_complete.is_some()
        {
            // KMDF asserts this (§3.5): the controller still runs the transfer.
            return Err(self.misuse(done.call(), g.state, COMPLETE_UNREPORTED));
        }
        g.programmed = false;
        let current = g.current;
        let (bytes, is_final) = match done {
            Done::Full => (current, false),
            Done::WithLength(n) => (n, false),
            Done::Final(n) => (n, true),
        };
        // Per-transfer teardown. KMDF skips it when the length is invalid; dmatx always ends
        // the mapping so no register or mapping is lost (docs/quirks.md).
        let flushed = if g.mapped {
            trace_record!(self.trace, Flush { bytes: current });
            self.flush_current(&g)
        } else {
            Ok(())
        };
        g.mapped = false;
        g.current = 0;
        let transfer_registers = match self.kind {
            TransactionKind::ScatterGather => g.registers.take(),
            _ => None,
        };
        let mut status = if bytes > current {
            Err(Error::InvalidParameter)
        } else {
            g.transferred += bytes;
            flushed
        };
        let left = g.length - g.transferred;
        if status.is_ok() && g.single_transfer && left > 0 {
            status = Err(Error::WdfTooManyTransfers);
        }
        if status.is_ok() && g.stopped && left > 0 && !is_final {
            // After StopSystemTransfer, a completion that needs another transfer (statement 87).
            status = Err(Error::Cancelled);
        }
        if status.is_err() || left == 0 || is_final {
            let state = if status.is_ok() {
                State::TransferCompleted
            } else {
                State::TransferFailed
            };
            trace_record!(
                self.trace,
                Completed {
                    length: bytes,
                    finished: true,
                    status
                }
            );
            let mut leftovers = self.finish(&mut g, state);
            leftovers.registers = leftovers.registers.or(transfer_registers);
            drop(g);
            self.dispose(leftovers);
            return Ok(Completion::Finished(status));
        }

        // More to do: prepare the next transfer.
        let prepared = match self.kind {
            TransactionKind::Packet | TransactionKind::System => {
                g.next = self.packet_next_length(&g);
                g.ready = true;
                Ok(Prepared::Ready)
            }
            _ => {
                // Return this transfer's registers before asking for the next one's, as KMDF
                // puts the list back before building the next: a transfer may need them all.
                let direction = g.direction;
                drop(g);
                if let Some(registers) = transfer_registers {
                    self.return_registers(registers, direction);
                }
                g = self.lock();
                self.prepare_sg(&mut g)
            }
        };
        trace_record!(
            self.trace,
            Completed {
                length: bytes,
                finished: prepared.is_err(),
                status: prepared.as_ref().map(|_| ()).map_err(|e| *e)
            }
        );
        match prepared {
            Err(e) => {
                let leftovers = self.finish(&mut g, State::TransferFailed);
                drop(g);
                self.dispose(leftovers);
                Ok(Completion::Finished(Err(e)))
            }
            Ok(Prepared::Queued) => Ok(Completion::MoreProcessingRequired),
            Ok(Prepared::Ready) if g.staging => Ok(Completion::MoreProcessingRequired),
            Ok(Prepared::Ready) => match self.stage(g) {
                Some(e) => Ok(Completion::Finished(Err(e))),
                None => Ok(Completion::MoreProcessingRequired),
            },
        }
    }

    /// End the current transfer's mapping (bounced data is copied back).
    fn flush_current(&self, g: &Inner<P, C, B>) -> Result<()> {
        let (adapter, registers, buffer) = self.transfer_parts(g)?;
        let position = g.offset + g.transferred;
        adapter.flush(registers, buffer, position, g.current, g.direction)
    }

    /// Withdraw this transaction's queued register request, if there is one. Whoever withdraws
    /// calls `dispatch_queued` on the direction's adapter once the lock is dropped: requests
    /// queued behind it may fit now.
    fn withdraw_queued(&self, g: &mut Inner<P, C, B>) -> bool {
        let withdrawn = g.queued
            && self
                .enabler
                .record(g.direction)
                .is_some_and(|r| r.adapter.cancel_allocation(&self.waiter));
        if withdrawn {
            g.queued = false;
        }
        withdrawn
    }

    /// Let requests queued on `direction`'s adapter behind a withdrawn one run.
    fn dispatch_queued(&self, direction: Direction) {
        if let Some(record) = self.enabler.record(direction) {
            record.adapter.dispatch_queued();
        }
    }

    // ---------------------------------------------------------------------------------------
    // Release, cancel (spec §2.2, §2.5, §3.6, §3.11)

    /// Release the transaction for reuse (`WdfDmaTransactionRelease`) and get its buffer back.
    /// Releasing a Released transaction does nothing and returns `None` (statement 74).
    ///
    /// # Errors
    /// [`Error::Misuse`] while executing (75): the device may still be using the buffer.
    pub fn release(&self) -> Result<Option<B>> {
        self.verified(self.release_inner())
    }

    fn release_inner(&self) -> Result<Option<B>> {
        let mut g = self.lock();
        match g.state {
            State::Released => Ok(None),
            State::Transfer => Err(self.misuse(Call::Release, g.state, RELEASE_STATE)),
            State::Deleted => Err(self.misuse(Call::Release, g.state, DELETED)),
            _ if g.queued => Err(self.misuse(Call::Release, g.state, RELEASE_QUEUED)),
            _ => {
                let buffer = g.buffer.take();
                let leftovers = self.reset(&mut g);
                drop(g);
                self.dispose(leftovers);
                Ok(buffer)
            }
        }
    }

    /// Reset every per-initialization field (Release, or a failed Initialize).
    fn reset(&self, g: &mut Inner<P, C, B>) -> Leftovers<C> {
        let mut leftovers = self.finish(g, State::Released);
        leftovers.request = g.request.take();
        leftovers.registers = leftovers.registers.or(g.registers.take());
        g.program_dma = None;
        g.offset = 0;
        g.length = 0;
        g.transferred = 0;
        g.max_transfer = 0;
        g.immediate = false;
        g.single_transfer = self.enabler.require_single_transfer;
        trace_record!(self.trace, Release);
        leftovers
    }

    /// Cancel a queued start (`WdfDmaTransactionCancel`, v3). `Ok(true)`: the register request
    /// was queued and is withdrawn, program-DMA will not run, the transaction is TransferFailed
    /// (statement 82); the caller completes the request and releases. `Ok(false)`: nothing was
    /// queued (81, 83), or the enabler is v2 (84).
    ///
    /// # Errors
    /// [`Error::Misuse`] in Created or Released on a v3 enabler (84).
    pub fn cancel(&self) -> Result<bool> {
        let result = self.cancel_inner();
        traced! {
            if let Ok(cancelled) = result {
                trace_event!("tx.cancel", tx = self.id, cancelled);
            }
        }
        self.verified(result)
    }

    fn cancel_inner(&self) -> Result<bool> {
        if self.enabler.version == DmaVersion::V2 {
            return Ok(false);
        }
        let mut g = self.lock();
        if matches!(g.state, State::Created | State::Released | State::Deleted) {
            return Err(self.misuse(Call::Cancel, g.state, CANCEL_STATE));
        }
        if !self.withdraw_queued(&mut g) {
            return Ok(false);
        }
        // A withdrawn reservation is cleared, so the transaction can reserve again (KMDF keeps
        // the count with no registers behind it: docs/quirks.md).
        let withdrawn = if g
            .reservation
            .as_ref()
            .is_some_and(|r| r.registers.is_none())
        {
            g.reservation = None;
            g.reserve_callback.take()
        } else {
            None
        };
        let direction = g.direction;
        let leftovers = self.finish(&mut g, State::TransferFailed);
        drop(g);
        self.dispose(leftovers);
        drop(withdrawn);
        self.dispatch_queued(direction);
        Ok(true)
    }

    // ---------------------------------------------------------------------------------------
    // Reserved resources (spec §2.5, §3.9)

    /// Reserve `count` map registers for this transaction
    /// (`WdfDmaTransactionAllocateResources`, packet profiles, v3). When they are owned,
    /// `reserve_dma` is called once with `context` — before this returns if they are free (or
    /// under immediate execution), later from the thread that frees them otherwise. `count` 0
    /// derives the count from the initialized buffer (every page it spans).
    ///
    /// The buffer description is discarded: the transaction is Reserved and the driver
    /// initializes it again, normally inside `reserve_dma` (statement 96). While the
    /// reservation lasts, execute takes no registers from the platform and transfers are cut
    /// to fit R registers (97); completion and release keep the reservation (98);
    /// [`Transaction::free_resources`] or deleting the transaction returns it (99, 100).
    ///
    /// On success the buffer of the discarded description, if any, comes back. If the platform
    /// refuses the registers, the transaction is TransferFailed, the reservation is not held,
    /// and the buffer stays with the transaction for release to hand back.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceRequest`] on a v2 enabler or a scatter/gather profile (statement
    /// 92); [`Error::InsufficientResources`] if the adapter has fewer than `count` registers or
    /// immediate execution cannot be satisfied; [`Error::Misuse`] if registers are already
    /// reserved (94), `count` is 0 and the transaction is not Initialized (93), or the
    /// transaction is executing or finished.
    pub fn allocate_resources(
        &self,
        direction: Direction,
        count: u32,
        reserve_dma: ReserveDma<P, C, B>,
        context: C,
    ) -> Result<Option<B>> {
        self.verified(self.allocate_resources_inner(direction, count, reserve_dma, context))
    }

    fn allocate_resources_inner(
        &self,
        direction: Direction,
        count: u32,
        reserve_dma: ReserveDma<P, C, B>,
        context: C,
    ) -> Result<Option<B>> {
        if self.enabler.version != DmaVersion::V3 || self.kind == TransactionKind::ScatterGather {
            return Err(Error::InvalidDeviceRequest);
        }
        let record = self
            .enabler
            .record(direction)
            .ok_or(Error::InvalidParameter)?;
        let mut g = self.lock();
        if g.reservation.is_some() {
            return Err(self.misuse(Call::AllocateResources, g.state, RESERVE_TWICE));
        }
        if self.enabler.is_deleted() {
            return Err(Error::InvalidDeviceState);
        }
        let count = if count == 0 {
            match (g.state, g.buffer.as_ref()) {
                (State::Initialized, Some(_)) if self.kind == TransactionKind::System => {
                    record.map_registers
                }
                (State::Initialized, Some(buffer)) => {
                    let pages = split::pages_in_range(buffer, g.offset, g.length);
                    u32::try_from(pages).unwrap_or(u32::MAX)
                }
                (state, _) => {
                    return Err(self.misuse(Call::AllocateResources, state, RESERVE_DERIVED_STATE));
                }
            }
        } else if matches!(
            g.state,
            State::Created | State::Initialized | State::Released
        ) {
            count
        } else {
            return Err(self.misuse(Call::AllocateResources, g.state, RESERVE_STATE));
        };
        // Discard the buffer description (KMDF wipes MDL and length).
        let buffer = g.buffer.take();
        let request = g.request.take();
        g.program_dma = None;
        g.offset = 0;
        g.length = 0;
        g.transferred = 0;
        g.max_transfer = 0;
        g.direction = direction;
        self.set_state(&mut g, State::Reserved);
        let outcome = match NonZeroU32::new(count).filter(|n| n.get() <= record.map_registers) {
            None => Err(Error::InsufficientResources),
            Some(n) => {
                let answer = record.adapter.allocate(
                    AllocationRequest {
                        count: n,
                        immediate: g.immediate,
                    },
                    &self.waiter,
                );
                trace_record!(
                    self.trace,
                    Allocate {
                        registers: n.get(),
                        outcome: trace::outcome(&answer)
                    }
                );
                answer
            }
        };
        match outcome {
            Ok(Allocation::Granted(registers)) => {
                g.reservation = Some(Reservation {
                    count,
                    registers: Some(registers),
                });
                drop(g);
                drop(request);
                reserve_dma(self, &context);
                Ok(buffer)
            }
            Ok(Allocation::Queued) => {
                g.reservation = Some(Reservation {
                    count,
                    registers: None,
                });
                g.reserve_callback = Some((reserve_dma, context));
                g.queued = true;
                drop(g);
                drop(request);
                Ok(buffer)
            }
            Err(e) => {
                // The description is gone (as in KMDF), but the buffer and the binding stay
                // for release to hand back.
                self.set_state(&mut g, State::TransferFailed);
                g.buffer = buffer;
                g.request = request;
                drop(g);
                drop(context);
                Err(e)
            }
        }
    }

    /// Return reserved map registers and release the transaction
    /// (`WdfDmaTransactionFreeResources`): the state becomes Released and the buffer, if any,
    /// comes back, as with [`Transaction::release`]. A reservation still queued is withdrawn.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceRequest`], with no effect, on a v2 enabler or a scatter/gather
    /// profile; [`Error::Misuse`] in Created (statement 99) or while executing;
    /// [`Error::InvalidDeviceState`] if the reserved registers are being granted at this very
    /// moment (the reserve callback is about to run; free them from it or after it).
    pub fn free_resources(&self) -> Result<Option<B>> {
        self.verified(self.free_resources_inner())
    }

    fn free_resources_inner(&self) -> Result<Option<B>> {
        if self.enabler.version != DmaVersion::V3 || self.kind == TransactionKind::ScatterGather {
            return Err(Error::InvalidDeviceRequest);
        }
        let mut g = self.lock();
        if matches!(g.state, State::Created | State::Transfer | State::Deleted) {
            return Err(self.misuse(Call::FreeResources, g.state, FREE_STATE));
        }
        let withdrew = self.withdraw_queued(&mut g);
        if g.queued {
            // Being granted at this very moment: the reserve callback is about to run.
            return Err(Error::InvalidDeviceState);
        }
        let reserved = g.reservation.take().and_then(|r| r.registers);
        let callback = g.reserve_callback.take();
        let direction = g.direction;
        let buffer = g.buffer.take();
        let leftovers = self.reset(&mut g);
        drop(g);
        self.dispose(leftovers);
        drop(callback);
        if let Some(registers) = reserved {
            self.return_registers(registers, direction);
        }
        if withdrew {
            self.dispatch_queued(direction);
        }
        Ok(buffer)
    }

    /// The number of map registers reserved (R), 0 when none are.
    pub fn reserved_map_registers(&self) -> u32 {
        self.inner
            .lock()
            .reservation
            .as_ref()
            .map_or(0, |r| r.count)
    }

    // ---------------------------------------------------------------------------------------
    // System mode (spec §2.4, §2.5, §3.10)

    /// Stop the transaction's system transfer (`WdfDmaTransactionStopSystemTransfer`): a
    /// running transfer is stopped by the controller and reports
    /// [`SystemDmaStatus::Cancelled`] to the transfer-complete callback; a transfer not yet
    /// mapped will not be; afterwards a completion that needs another transfer finishes the
    /// transaction with [`Error::Cancelled`] (statements 86, 87, 89). A transaction still
    /// waiting for its channel is finished at once ([`SystemStopOutcome::Withdrawn`]).
    /// Initialize clears the stop.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceRequest`], with no effect, on a transaction that is not
    /// system-mode (statement 85); [`Error::Misuse`] if the controller reports the running
    /// transfer already stopped (88).
    pub fn stop_system_transfer(&self) -> Result<SystemStopOutcome> {
        self.verified(self.stop_system_inner())
    }

    fn stop_system_inner(&self) -> Result<SystemStopOutcome> {
        if self.kind != TransactionKind::System {
            return Err(Error::InvalidDeviceRequest);
        }
        let mut g = self.lock();
        g.stopped = true;
        let Some(record) = self.enabler.record(g.direction) else {
            return Ok(SystemStopOutcome::NotRunning);
        };
        // Waiting for the channel: withdraw and finish now. (If the grant is under way, the
        // withdraw fails and the staging finds the stop.)
        if g.state == State::Transfer && g.reservation.is_none() && self.withdraw_queued(&mut g) {
            let direction = g.direction;
            let leftovers = self.finish(&mut g, State::TransferFailed);
            drop(g);
            self.dispose(leftovers);
            self.dispatch_queued(direction);
            return Ok(SystemStopOutcome::Withdrawn);
        }
        if !(g.state == State::Transfer && g.programmed && g.mapped) {
            return Ok(SystemStopOutcome::NotRunning);
        }
        match record.adapter.stop_system(&self.waiter) {
            SystemStop::Stopped => Ok(SystemStopOutcome::Stopping),
            SystemStop::NotRunning => Ok(SystemStopOutcome::NotRunning),
            SystemStop::AlreadyStopped => {
                Err(self.misuse(Call::StopSystemTransfer, g.state, STOP_TWICE))
            }
        }
    }

    /// `WdfDmaTransactionSetChannelConfigurationCallback`: set (or with `None` clear) the
    /// channel-configuration callback. It survives release (statement 79).
    ///
    /// # Errors
    /// [`Error::InvalidDeviceRequest`], with no effect, on a transaction that is not
    /// system-mode.
    pub fn set_channel_configuration_callback(
        &self,
        callback: Option<ConfigureChannel<P, C, B>>,
    ) -> Result<()> {
        if self.kind != TransactionKind::System {
            return Err(Error::InvalidDeviceRequest);
        }
        self.lock().configure_channel = callback;
        Ok(())
    }

    /// `WdfDmaTransactionSetTransferCompleteCallback`: set (or with `None` clear) the
    /// transfer-complete callback. It survives release (statement 79).
    ///
    /// # Errors
    /// [`Error::InvalidDeviceRequest`], with no effect, on a transaction that is not
    /// system-mode.
    pub fn set_transfer_complete_callback(
        &self,
        callback: Option<TransferComplete<P, C, B>>,
    ) -> Result<()> {
        if self.kind != TransactionKind::System {
            return Err(Error::InvalidDeviceRequest);
        }
        self.lock().transfer_complete = callback;
        Ok(())
    }

    /// `WdfDmaTransactionSetDeviceAddressOffset`: the offset from the channel's device address
    /// that every later transfer of this initialization uses (statement 80).
    ///
    /// # Errors
    /// [`Error::InvalidDeviceRequest`], with no effect, on a transaction that is not
    /// system-mode, or unless Initialized or executing: initialize resets the offset, so one
    /// set before it would be lost (KMDF loses it silently; `docs/quirks.md`).
    pub fn set_device_address_offset(&self, offset: u64) -> Result<()> {
        if self.kind != TransactionKind::System {
            return Err(Error::InvalidDeviceRequest);
        }
        let mut g = self.lock();
        if !matches!(g.state, State::Initialized | State::Transfer) {
            return Err(Error::InvalidDeviceRequest);
        }
        g.device_offset = offset;
        Ok(())
    }

    /// The device-address offset in use (0 unless set after initialize).
    pub fn device_address_offset(&self) -> u64 {
        self.lock().device_offset
    }

    // ---------------------------------------------------------------------------------------
    // Queries and tuning (spec §2.4)

    /// The transaction's state.
    pub fn state(&self) -> State {
        self.lock().state
    }

    /// The kind of transaction (from the enabler's profile).
    pub fn kind(&self) -> TransactionKind {
        self.kind
    }

    /// The direction of the current initialization.
    pub fn direction(&self) -> Direction {
        self.lock().direction
    }

    /// `WdfDmaTransactionGetBytesTransferred`: bytes reported done so far; kept after the
    /// transaction finishes, 0 after release (statements 42, 69, 77).
    pub fn bytes_transferred(&self) -> u64 {
        self.lock().transferred
    }

    /// `WdfDmaTransactionGetCurrentDmaTransferLength`: the programmed transfer's length; 0 when
    /// none is programmed (69).
    pub fn current_transfer_length(&self) -> u64 {
        self.lock().current
    }

    /// `WdfDmaTransactionGetRequest`: the request bound by
    /// [`Transaction::initialize_with_request`], until release; `None` after a plain initialize
    /// (statement 26).
    pub fn request(&self) -> Option<Arc<dyn RequestBinding>> {
        self.lock().request.clone()
    }

    /// The total length of the current initialization.
    pub fn length(&self) -> u64 {
        self.lock().length
    }

    /// The largest transfer this transaction will program (F).
    pub fn maximum_transfer_length(&self) -> u64 {
        self.lock().max_transfer
    }

    /// `WdfDmaTransactionSetMaximumLength`: lower the largest transfer. Applies only if
    /// `length` is below the direction's fragment length (statement 46); returns whether it
    /// applied. Does not re-run the SG pre-check (32).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for 0; [`Error::InvalidDeviceRequest`] unless Initialized
    /// (before Initialize it would be overwritten; see `docs/quirks.md`).
    pub fn set_maximum_length(&self, length: u64) -> Result<bool> {
        if length == 0 {
            return Err(Error::InvalidParameter);
        }
        let mut g = self.lock();
        if g.state != State::Initialized {
            return Err(Error::InvalidDeviceRequest);
        }
        let fragment = self
            .enabler
            .record(g.direction)
            .map_or(0, |r| r.fragment_length);
        if length < fragment {
            g.max_transfer = length;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// `WdfDmaTransactionSetSingleTransferRequirement` (v3): the next initialization must fit
    /// in one transfer. Reset to the enabler's default by release (37).
    ///
    /// # Errors
    /// [`Error::InvalidDeviceRequest`], with no effect, on a v2 enabler or unless Created,
    /// Reserved or Released (36).
    pub fn set_single_transfer_requirement(&self, required: bool) -> Result<()> {
        if self.enabler.version != DmaVersion::V3 {
            return Err(Error::InvalidDeviceRequest);
        }
        let mut g = self.lock();
        if !matches!(g.state, State::Created | State::Reserved | State::Released) {
            return Err(Error::InvalidDeviceRequest);
        }
        g.single_transfer = required;
        Ok(())
    }

    /// Whether the transaction must complete in a single transfer.
    pub fn single_transfer_requirement(&self) -> bool {
        self.lock().single_transfer
    }

    /// `WdfDmaTransactionSetImmediateExecution` (v3): execute gets its map registers at once
    /// or fails with [`Error::InsufficientResources`], never queues. Cleared by release.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceRequest`], with no effect, on a v2 enabler (statement 53) or unless
    /// Created, Reserved, Initialized or Released.
    pub fn set_immediate_execution(&self, immediate: bool) -> Result<()> {
        if self.enabler.version != DmaVersion::V3 {
            return Err(Error::InvalidDeviceRequest);
        }
        let mut g = self.lock();
        if !matches!(
            g.state,
            State::Created | State::Reserved | State::Initialized | State::Released
        ) {
            return Err(Error::InvalidDeviceRequest);
        }
        g.immediate = immediate;
        Ok(())
    }

    /// Whether immediate execution is on.
    pub fn immediate_execution(&self) -> bool {
        self.lock().immediate
    }

    /// `WdfDmaTransactionGetTransferInfo`: registers and worst-case SG elements the whole
    /// initialized range spans.
    ///
    /// # Errors
    /// [`Error::Misuse`] unless Initialized.
    pub fn transfer_info(&self) -> Result<TransferInfo> {
        let result = {
            let g = self.lock();
            match (g.state, g.buffer.as_ref()) {
                (State::Initialized, Some(buffer)) => {
                    let pages = split::pages_in_range(buffer, g.offset, g.length);
                    Ok(TransferInfo {
                        map_registers: pages,
                        sg_elements: pages,
                    })
                }
                (state, _) => Err(self.misuse(Call::GetTransferInfo, state, INFO_STATE)),
            }
        };
        self.verified(result)
    }

    /// The enabler this transaction belongs to.
    pub fn enabler(&self) -> Enabler<P> {
        Enabler {
            shared: Arc::clone(&self.enabler),
        }
    }

    // ---------------------------------------------------------------------------------------
    // Misuse reporting

    fn misuse(&self, call: Call, state: State, reason: &'static str) -> Error {
        Error::Misuse(Misuse {
            call,
            state,
            reason,
        })
    }

    /// `result`, after [`Transaction::verify`] has seen its error.
    fn verified<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            self.verify(e);
        }
        result
    }

    /// Verifier mode: a misuse panics with its diagnostic (after every lock is dropped).
    fn verify(&self, error: &Error) {
        if let (true, Some(m)) = (self.enabler.verifier, error.misuse()) {
            panic!("{m}");
        }
    }
}

const INIT_STATE: &str =
    "initialize needs a Created, Reserved or Released transaction; release it first";
const EXECUTE_STATE: &str = "execute needs an Initialized transaction";
const COMPLETE_STATE: &str = "the transaction is not executing";
const COMPLETE_UNPROGRAMMED: &str =
    "no transfer is mapped: completion before the transfer was staged, or twice for one transfer";
const RELEASE_STATE: &str = "the device may still be using the buffer; complete the transfer first";
const CANCEL_STATE: &str = "cancel needs an initialized or executing transaction";
const INFO_STATE: &str = "transfer info needs an Initialized transaction";
const DELETED: &str = "the transaction was deleted with its enabler's device";
const STOP_TWICE: &str = "the running system transfer was already stopped";
const COMPLETE_UNREPORTED: &str = "the controller has not reported this system transfer's end: \
     completed twice from the transfer-complete callback, or before the controller finished";
const EXECUTE_UNGRANTED: &str =
    "the reserved map registers are not granted yet; execute from the reserve callback";
const RELEASE_QUEUED: &str =
    "a reservation request is still queued; cancel it (or free resources) first";
const RESERVE_TWICE: &str = "map registers are already reserved; free resources first";
const RESERVE_DERIVED_STATE: &str =
    "allocate resources with a count of 0 derives the count from the buffer: initialize first";
const RESERVE_STATE: &str =
    "allocate resources needs a Created, Initialized or Released transaction";
const FREE_STATE: &str = "free resources needs a transaction that is not Created or executing";

impl<P, C, B> AllocationWaiter for Transaction<P, C, B>
where
    P: Platform,
    C: Clone + Send + Sync + 'static,
    B: MemoryDescriptor,
{
    /// The controller finished the mapped system transfer: call the transfer-complete callback
    /// now, or — while program-DMA for that transfer has not returned — when it does
    /// (statement 90). Without a callback the driver learns from its own device.
    fn system_transfer_done(&self, status: SystemDmaStatus) {
        let mut g = self.lock();
        if g.state != State::Transfer || !g.programmed || !g.mapped {
            return;
        }
        g.reported = true;
        if g.transfer_complete.is_none() {
            return;
        }
        if g.staging {
            g.deferred_done = Some(status);
            return;
        }
        let g = self.deliver_done(g, status);
        drop(g);
    }

    fn granted(&self, registers: MapRegisters) {
        let mut g = self.lock();
        if g.queued
            && let Some(reservation) = g.reservation.as_mut().filter(|r| r.registers.is_none())
        {
            // The reservation's registers: now call the reserve callback (slot cleared
            // first, as KMDF does), outside the lock.
            reservation.registers = Some(registers);
            g.queued = false;
            let callback = g.reserve_callback.take();
            drop(g);
            if let Some((reserve_dma, context)) = callback {
                reserve_dma(self, &context);
            }
            return;
        }
        if !g.queued || g.state != State::Transfer {
            // Not waiting (cannot happen with a backend that keeps the contract): give the
            // registers straight back rather than lose them.
            let direction = g.direction;
            drop(g);
            self.return_registers(registers, direction);
            return;
        }
        g.queued = false;
        g.registers = Some(registers);
        g.ready = true;
        if g.staging {
            return;
        }
        // A map failure here has no caller to report to; the transaction is left
        // TransferFailed (see the platform contract: a backend bounces what it cannot map).
        let _ = self.stage(g);
    }
}

impl<P, C, B> Child for Transaction<P, C, B>
where
    P: Platform,
    C: Clone + Send + Sync + 'static,
    B: MemoryDescriptor,
{
    /// Deleted with its device (statement 17): a queued register request is withdrawn; unless a
    /// transfer is in flight, the buffer is dropped and registers, reservation and v2 slot are
    /// returned; the state becomes Deleted.
    fn withdraw(&self) {
        // The enabler lets the queue move on after its children are deleted.
        self.withdraw_queued(&mut self.lock());
    }

    fn delete_by_parent(&self) {
        let g = self.lock();
        if g.state != State::Deleted {
            self.tear_down(g);
        }
    }
}

impl<P: Platform, C, B> Transaction<P, C, B> {
    /// The transaction's number, unique in the process for this transaction object: it stays
    /// the same across release and reuse, and no other transaction created in the process has
    /// it (on targets without 64-bit atomics, until 2³² transactions have been created). The
    /// `tracing` events name the transaction by it (`docs/TRACING.md`).
    ///
    /// # Examples
    /// ```
    /// use dmatx::{DmaDevice, Enabler, EnablerConfig, Profile, Transaction};
    /// use dmatx_sim::{SimBuffer, SimPlatform};
    ///
    /// let sim = SimPlatform::new();
    /// let device = DmaDevice::new(sim.clone());
    /// let enabler = Enabler::create(&device, EnablerConfig::new(Profile::Packet64, 4096))?;
    /// let a = Transaction::<SimPlatform, (), SimBuffer>::create(&enabler)?;
    /// let b = Transaction::<SimPlatform, (), SimBuffer>::create(&enabler)?;
    /// assert_ne!(a.id(), b.id());
    /// # Ok::<(), dmatx::Error>(())
    /// ```
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Lock the transaction's state. Every lock goes through here, so that with the `tracing`
    /// feature what is recorded under it is emitted once it is released.
    #[cfg(feature = "tracing")]
    fn lock(&self) -> TxGuard<'_, P, C, B> {
        trace::lock(&self.inner, &self.trace, self.id)
    }

    /// Lock the transaction's state.
    #[cfg(not(feature = "tracing"))]
    fn lock(&self) -> TxGuard<'_, P, C, B> {
        self.inner.lock()
    }

    /// The one place the state changes (recorded for the `tx.state` event).
    fn set_state(&self, g: &mut Inner<P, C, B>, to: State) {
        trace_record!(self.trace, State { from: g.state, to });
        g.state = to;
    }

    /// Finish the run: set the final state and take out the per-run resources.
    fn finish(&self, g: &mut Inner<P, C, B>, state: State) -> Leftovers<C> {
        self.set_state(g, state);
        g.current = 0;
        g.next = 0;
        g.ready = false;
        g.programmed = false;
        let packet_slot = core::mem::take(&mut g.holds_packet_slot);
        if core::mem::take(&mut g.request_held)
            && let Some(request) = &g.request
        {
            request.set_dma_active(false);
        }
        g.mapped = false;
        g.deferred_done = None;
        // A system transaction keeps its channel (and registers) until release (spec §3.3).
        let registers = match self.kind {
            TransactionKind::System => None,
            _ => g.registers.take(),
        };
        Leftovers {
            direction: g.direction,
            registers,
            context: g.context.take(),
            packet_slot,
            request: None,
        }
    }

    /// Return what [`Transaction::finish`] or [`Transaction::reset`] took out. Call with no
    /// lock held.
    fn dispose(&self, leftovers: Leftovers<C>) {
        if let Some(registers) = leftovers.registers {
            self.return_registers(registers, leftovers.direction);
        }
        if leftovers.packet_slot {
            self.enabler.device.give_back_packet_slot();
        }
        drop(leftovers.context);
        drop(leftovers.request);
    }

    fn return_registers(&self, registers: MapRegisters, direction: Direction) {
        if let Some(record) = self.enabler.record(direction) {
            // Before the call: `free` may grant queued requests, running other transactions'
            // program-DMA on this thread.
            trace_event!("hal.free", tx = self.id, registers = registers.count());
            record.adapter.free(registers);
        }
    }

    /// Delete the transaction (dropped, or deleted with its device): if a transfer may be in
    /// flight, keep its buffer, registers, reservation, v2 packet slot and request hold forever
    /// (the device may still use them); otherwise give everything back. A request still queued
    /// (a withdraw that lost a race with its grant) is not in flight: the grant finds the
    /// transaction Deleted and returns the registers.
    fn tear_down(&self, mut g: TxGuard<'_, P, C, B>) {
        let in_flight = g.state == State::Transfer && (g.programmed || g.ready);
        if in_flight {
            // KMDF: fatal with the verifier. The leak shows in the platform's pool
            // (docs/quirks.md 31); `holds_packet_slot` and `request_held` stay set, so later v2
            // executes on the device get WdfBusy and the request cannot complete.
            self.set_state(&mut g, State::Deleted);
            core::mem::forget(g.buffer.take());
            let _never_freed = (g.registers.take(), g.reservation.take());
            return;
        }
        let direction = g.direction;
        let buffer = g.buffer.take();
        let reserved = g.reservation.take().and_then(|r| r.registers);
        let callback = g.reserve_callback.take();
        let mut leftovers = self.finish(&mut g, State::Deleted);
        leftovers.request = g.request.take();
        leftovers.registers = leftovers.registers.or(g.registers.take());
        g.program_dma = None;
        g.length = 0;
        g.transferred = 0;
        drop(g);
        self.dispose(leftovers);
        // Deleting a transaction returns its reservation too (statement 100).
        if let Some(registers) = reserved {
            self.return_registers(registers, direction);
        }
        drop(callback);
        drop(buffer);
    }
}

impl<P: Platform, C, B> Drop for Transaction<P, C, B> {
    fn drop(&mut self) {
        let g = self.lock();
        if g.state != State::Deleted {
            self.tear_down(g);
        } else {
            drop(g);
        }
        for record in self.enabler.configured_records() {
            record.adapter.unregister_waiter();
        }
    }
}

impl<P: Platform, C, B> fmt::Debug for Transaction<P, C, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.lock();
        f.debug_struct("Transaction")
            .field("kind", &self.kind)
            .field("state", &g.state)
            .field("direction", &g.direction)
            .field("length", &g.length)
            .field("transferred", &g.transferred)
            .field("current", &g.current)
            .finish_non_exhaustive()
    }
}
