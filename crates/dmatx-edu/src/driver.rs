//! The edu driver, generic over the platform `P` and the request buffers `M`: device add,
//! hardware preparation, the I/O callbacks, program-DMA, the ISR and DPC, the polling and
//! watchdog timers, and removal.
//!
//! # How requests reach the one DMA engine
//! The queue is parallel; each request becomes an *I/O* that runs one or more *phases*, each
//! phase one run of a DMA transaction (spec §3.2.1: a packet transaction cut into transfers
//! of at most the enabler's maximum length). A write or a read is one phase, initialized from
//! the request (`WdfDmaTransactionInitializeUsingRequest`); a loopback is two phases per chunk
//! (input chunk → device buffer, device buffer → output chunk) on one transaction, released
//! and initialized again between phases.
//!
//! The edu has one engine and one buffer, so the driver never lets two requests' transfers
//! interleave, whatever the platform's map registers allow:
//! * **Admission.** The driver owns two transactions. The next request is admitted (its
//!   transaction initialized and executed) only once every admitted request has programmed
//!   its last transfer. So at most one request is ahead of the one on the engine, and a
//!   loopback's write and read-back of a chunk are never separated by another request.
//! * **v3 queuing.** The admitted request's execute asks for map registers while the running
//!   one still holds its own. A platform that grants one transfer's worth (the VFIO default,
//!   N = max_length / 4096 + 1) queues the request (spec §3.3), and grants it when the running
//!   transaction finishes; cancelling the request meanwhile withdraws it (§2.5, §3.6): it
//!   completes with [`Error::Cancelled`] and its buffer untouched.
//! * **The engine.** Program-DMA hands its transfer to the engine, which starts it at once if
//!   idle and otherwise keeps it until the running transfer ends (a platform with many map
//!   registers grants the admitted request while the engine is still busy).
//!
//! Each transfer programs source, destination, count and command (0x80, 0x88, 0x90, 0x98):
//! the device side is always the start of the buffer (0x40000), the RAM side the single
//! scatter/gather element the packet profile gives (spec §2.6). So a write longer than the
//! buffer leaves its last transfer's bytes in the buffer, and a read longer than the buffer
//! gets the buffer's first bytes once per transfer.
//!
//! # Completion
//! [`Completion::Interrupt`]: the command asks for interrupt 0x100; the ISR reads the
//! interrupt status, acknowledges it and queues the DPC; the DPC reports the transfer with
//! `dma_completed` and, when a phase is over, starts the next or completes the request.
//! [`Completion::Polled`]: no interrupt; a timer reads the command's busy bit and drives the
//! same path. In both, a watchdog timer ends a transfer the device has not finished after
//! [`EduConfig::timeout`] with `dma_completed_final` and fails its request with
//! [`Error::IoTimeout`]. (The edu cannot abort a DMA: a device that finishes later would write
//! memory that is no longer mapped; the sanitizer of the simulated machine shows it.)

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use dmatx::hal::{MemoryDescriptor, Platform, RegisterWindow};
use dmatx::{
    Completion as DmaCompletion, Direction, DmaDevice, DmaVersion, Enabler, EnablerConfig, Error,
    Profile, Result, SgElement, Transaction,
};
use dmatx_runtime::{
    Device, DeviceConfig, Dispatch, Interrupt, InterruptConfig, InterruptStats, IoctlCode,
    PnpPowerCallbacks, PowerState, Queue, QueueConfig, Request, RequestHandle, RequestMemory,
    RequestSpec, Timer, TimerConfig, TransferMethod,
};

use crate::hw::{self, cmd, irq, reg, status};

/// `IOCTL_EDU_LOOPBACK` (`METHOD_OUT_DIRECT`): the input buffer goes to the device and comes
/// back into the output buffer, one buffer-sized chunk at a time.
pub const IOCTL_EDU_LOOPBACK: IoctlCode =
    IoctlCode::new(0x8000, 0x800, TransferMethod::OutDirect, 0);

/// Transactions the driver owns: one on the engine, one being prepared.
const TRANSACTIONS: usize = 2;

/// Buffers the driver takes: any memory descriptor a platform can map.
pub trait EduBuffer: MemoryDescriptor + Send + Sync + 'static {}

impl<M: MemoryDescriptor + Send + Sync + 'static> EduBuffer for M {}

/// How transfers are seen to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Completion {
    /// The device raises interrupt 0x100 (ISR, then DPC).
    Interrupt,
    /// A timer reads the command register's busy bit every `interval`; no interrupt is asked.
    Polled {
        /// Time between two reads.
        interval: Duration,
    },
}

/// How the driver is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EduConfig {
    /// The enabler's maximum transfer length: 4096 (the whole buffer), or
    /// [`hw::ERRATUM_MAX_TRANSFER`] (4095) for QEMU before 10.0.2, whose range check aborts on
    /// a DMA ending at the end of the buffer. Clamped to 1..=4096.
    pub max_transfer: u64,
    /// Interrupt or polled completion.
    pub completion: Completion,
    /// How long a transfer may run before the watchdog fails its request; also the bound of
    /// the factorial's wait.
    pub timeout: Duration,
    /// Verifier mode of the device's objects and the enabler (`None`: on in debug builds).
    pub verifier: Option<bool>,
}

impl Default for EduConfig {
    fn default() -> Self {
        Self {
            max_transfer: hw::DMA_BUFFER_SIZE,
            completion: Completion::Interrupt,
            timeout: Duration::from_secs(1),
            verifier: None,
        }
    }
}

impl EduConfig {
    /// The maximum transfer in use (the configured one, clamped to 1..=4096).
    pub fn transfer_length(&self) -> u64 {
        self.max_transfer.clamp(1, hw::DMA_BUFFER_SIZE)
    }
}

/// Why hardware preparation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrepareError {
    /// The identification register does not read `0x010000ed`: not an edu device.
    WrongId {
        /// What it read.
        found: u32,
    },
    /// BAR0 is smaller than the registers the driver uses.
    BarTooSmall {
        /// Its length.
        length: u64,
    },
    /// The hardware was already prepared.
    AlreadyPrepared,
}

impl PrepareError {
    /// The status KMDF's `EvtDevicePrepareHardware` would return
    /// (`STATUS_DEVICE_CONFIGURATION_ERROR`, which dmatx names `InvalidDeviceState`).
    pub fn status(&self) -> Error {
        Error::InvalidDeviceState
    }
}

impl fmt::Display for PrepareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WrongId { found } => write!(
                f,
                "not an edu device: ID register reads {found:#010x}, expected {:#010x}",
                hw::ID
            ),
            Self::BarTooSmall { length } => write!(
                f,
                "BAR0 of {length:#x} bytes is smaller than the {:#x} the registers need",
                hw::BAR0_MIN
            ),
            Self::AlreadyPrepared => f.write_str("the hardware was already prepared"),
        }
    }
}

impl std::error::Error for PrepareError {}

/// Counters of the driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EduStats {
    /// Requests delivered to the driver.
    pub requests: u64,
    /// Requests completed by the driver (any status).
    pub completed: u64,
    /// Requests completed with [`Error::Cancelled`].
    pub cancelled: u64,
    /// Requests failed by the watchdog ([`Error::IoTimeout`]).
    pub timeouts: u64,
    /// Transfers programmed into the device, RAM → device.
    pub transfers_to_device: u64,
    /// Transfers programmed into the device, device → RAM.
    pub transfers_to_ram: u64,
    /// Transfers that waited for the engine after program-DMA (another was running).
    pub engine_waits: u64,
    /// Bytes of finished transfers, RAM → device.
    pub bytes_to_device: u64,
    /// Bytes of finished transfers, device → RAM.
    pub bytes_to_ram: u64,
    /// ISR calls that claimed the interrupt.
    pub interrupts_claimed: u64,
    /// Busy-bit reads of the polling timer.
    pub polls: u64,
}

impl EduStats {
    /// Transfers programmed, both directions.
    pub fn transfers(&self) -> u64 {
        self.transfers_to_device + self.transfers_to_ram
    }
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
    timeouts: AtomicU64,
    transfers: [AtomicU64; 2],
    engine_waits: AtomicU64,
    bytes: [AtomicU64; 2],
    interrupts_claimed: AtomicU64,
    polls: AtomicU64,
}

fn bump(c: &AtomicU64) {
    add(c, 1);
}

fn add(c: &AtomicU64, n: u64) {
    // ORDERING: statistics; nothing is published through them.
    c.fetch_add(n, Ordering::Relaxed);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere leaves the driver's plain data consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn index(direction: Direction) -> usize {
    match direction {
        Direction::WriteToDevice => 0,
        Direction::ReadFromDevice => 1,
    }
}

/// The driver's transactions: program-DMA gets the I/O they serve.
type Tx<P, M> = Transaction<P, Arc<Io<P, M>>, RequestMemory<M>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Write,
    Read,
    Loopback,
}

#[derive(Default)]
struct IoState<P: Platform, M: EduBuffer> {
    /// Set (once) by whoever completes the request.
    done: bool,
    /// The transaction, from admission to completion. Under this lock it is never Created
    /// or Released (so cancelling it is always allowed).
    transaction: Option<Arc<Tx<P, M>>>,
    phase: usize,
    /// The request is marked cancelable.
    cancelable: bool,
    /// Program-DMA has run for the first time.
    programmed: bool,
    /// Loopback: bytes read back so far.
    looped: u64,
}

/// One request in the driver.
struct Io<P: Platform, M: EduBuffer> {
    id: u64,
    kind: Kind,
    length: u64,
    chunk: u64,
    request: Request<M>,
    shared: Weak<Shared<P, M>>,
    st: Mutex<IoState<P, M>>,
}

impl<P: Platform, M: EduBuffer> Io<P, M> {
    fn phases(&self) -> usize {
        match self.kind {
            Kind::Write | Kind::Read => 1,
            Kind::Loopback => 2 * self.length.div_ceil(self.chunk) as usize,
        }
    }

    fn is_done(&self) -> bool {
        lock(&self.st).done
    }

    /// Initialize `t` for phase `k`.
    fn init_phase(&self, t: &Tx<P, M>, k: usize) -> Result<()> {
        match self.kind {
            Kind::Write => dmatx_runtime::dma::initialize_using_request(
                t,
                &self.request,
                program_dma::<P, M>,
                Direction::WriteToDevice,
            ),
            Kind::Read => dmatx_runtime::dma::initialize_using_request(
                t,
                &self.request,
                program_dma::<P, M>,
                Direction::ReadFromDevice,
            ),
            Kind::Loopback => {
                let offset = (k / 2) as u64 * self.chunk;
                let length = self.chunk.min(self.length - offset);
                let (direction, memory) = if k.is_multiple_of(2) {
                    (Direction::WriteToDevice, self.request.input_memory())
                } else {
                    (Direction::ReadFromDevice, self.request.output_memory())
                };
                let memory = memory.ok_or(Error::InvalidDeviceRequest)?;
                t.initialize_using_offset(program_dma::<P, M>, direction, memory, offset, length)
                    .map_err(|e| e.error)
            }
        }
    }
}

/// What the cancel callback, which gets only the request, reaches its I/O through.
trait CancelTarget: Send + Sync {
    fn cancel(&self);
}

/// Requests the drivers hold, by request id (unique in the process), for the cancel callback
/// (a WDF driver keeps this in the request's context).
static CANCEL: LazyLock<Mutex<HashMap<u64, Weak<dyn CancelTarget>>>> =
    LazyLock::new(Mutex::default);

/// `EvtRequestCancel`.
fn on_cancel<M: EduBuffer>(request: &Request<M>) {
    let target = lock(&CANCEL).get(&request.id()).and_then(Weak::upgrade);
    if let Some(target) = target {
        target.cancel();
    }
}

impl<P: Platform, M: EduBuffer> CancelTarget for Io<P, M> {
    /// Withdraw the request if it has not reached the device: still waiting for admission, or
    /// its transaction waiting for map registers. Once program-DMA has run, the request
    /// finishes its transfer (or program-DMA sees the cancellation first and aborts it).
    fn cancel(&self) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let st = lock(&self.st);
        if st.done {
            return;
        }
        let withdrawn = match &st.transaction {
            None => true,
            Some(t) => t.cancel() == Ok(true),
        };
        if !withdrawn {
            return;
        }
        drop(st);
        if let Some(io) = shared.find(self.id) {
            shared.finish(&io, Err(Error::Cancelled));
        }
    }
}

/// A transfer handed to the engine.
struct Transfer<P: Platform, M: EduBuffer> {
    io: Arc<Io<P, M>>,
    direction: Direction,
    address: u64,
    length: u64,
}

struct Running<P: Platform, M: EduBuffer> {
    transfer: Transfer<P, M>,
    started: Instant,
}

struct Engine<P: Platform, M: EduBuffer> {
    running: Option<Running<P, M>>,
    waiting: VecDeque<Transfer<P, M>>,
    /// Since when a transfer has been waiting for a DMA the watchdog gave up on: edu cannot
    /// abort a DMA, so the engine stays busy until the device ends it.
    wedged_since: Option<Instant>,
}

struct Sched<P: Platform, M: EduBuffer> {
    /// Requests delivered and not yet admitted.
    backlog: VecDeque<Arc<Io<P, M>>>,
    /// Requests admitted and not completed.
    active: Vec<Arc<Io<P, M>>>,
    /// Free transactions.
    pool: Vec<Arc<Tx<P, M>>>,
    /// The admitted request that has not programmed its last transfer yet.
    ahead: Option<u64>,
    admitting: bool,
    rerun: bool,
    /// Power-down in progress: nothing new is admitted.
    stopping: bool,
}

/// What the driver's callbacks share.
struct Shared<P: Platform, M: EduBuffer> {
    config: EduConfig,
    enabler: Enabler<P>,
    regs: OnceLock<Arc<dyn RegisterWindow>>,
    sched: Mutex<Sched<P, M>>,
    engine: Mutex<Engine<P, M>>,
    /// Interrupt status bits the ISR acknowledged and the DPC has not handled.
    saved_irq: Mutex<u32>,
    /// The watchdog and polling timers: handles of objects that hold the device, dropped by
    /// the cleanup callback (no reference cycle outlives deletion).
    timers: Mutex<Option<Timers<P, M>>>,
    /// Serialises the liveness and factorial register sequences.
    registers: Mutex<()>,
    counters: Counters,
    this: Weak<Shared<P, M>>,
}

/// A request picked for admission, with its transaction.
type Admitted<P, M> = (Arc<Io<P, M>>, Arc<Tx<P, M>>);

struct Timers<P: Platform, M: EduBuffer> {
    watchdog: Timer<EduContext<P, M>>,
    poll: Option<Timer<EduContext<P, M>>>,
}

impl<P: Platform, M: EduBuffer> Shared<P, M> {
    fn regs(&self) -> Option<&Arc<dyn RegisterWindow>> {
        self.regs.get()
    }

    fn find(&self, id: u64) -> Option<Arc<Io<P, M>>> {
        let s = lock(&self.sched);
        s.active
            .iter()
            .chain(s.backlog.iter())
            .find(|io| io.id == id)
            .cloned()
    }

    fn timers(&self) -> Option<Timers<P, M>> {
        lock(&self.timers).as_ref().map(|t| Timers {
            watchdog: t.watchdog.clone(),
            poll: t.poll.clone(),
        })
    }

    /// A new request: into the backlog, then admit what can be.
    fn submit(&self, request: Request<M>, kind: Kind, length: u64) {
        bump(&self.counters.requests);
        let io = Arc::new(Io {
            id: request.id(),
            kind,
            length,
            chunk: self.config.transfer_length(),
            request,
            shared: self.this.clone(),
            st: Mutex::new(IoState {
                done: false,
                transaction: None,
                phase: 0,
                cancelable: false,
                programmed: false,
                looped: 0,
            }),
        });
        let target: Arc<dyn CancelTarget> = io.clone();
        lock(&CANCEL).insert(io.id, Arc::downgrade(&target));
        lock(&self.sched).backlog.push_back(Arc::clone(&io));
        {
            let mut st = lock(&io.st);
            match io.request.mark_cancelable(on_cancel::<M>) {
                Ok(()) => st.cancelable = true,
                Err(_) => {
                    drop(st);
                    self.finish(&io, Err(Error::Cancelled));
                    return;
                }
            }
        }
        self.admit();
    }

    /// Admit requests while the gate is open (no admitted request ahead of the engine) and a
    /// transaction is free. One thread admits at a time; a call made meanwhile (from a
    /// program-DMA nested in an execute, or another thread) makes it look again.
    fn admit(&self) {
        {
            let mut s = lock(&self.sched);
            if s.admitting {
                s.rerun = true;
                return;
            }
            s.admitting = true;
        }
        loop {
            let next = {
                let mut s = lock(&self.sched);
                s.rerun = false;
                Self::pick(&mut s)
            };
            match next {
                Some((io, t)) => self.start_io(&io, t),
                None => {
                    let mut s = lock(&self.sched);
                    if !s.rerun {
                        s.admitting = false;
                        return;
                    }
                }
            }
        }
    }

    fn pick(s: &mut Sched<P, M>) -> Option<Admitted<P, M>> {
        if s.stopping || s.ahead.is_some() || s.pool.is_empty() {
            return None;
        }
        let io = loop {
            let io = s.backlog.pop_front()?;
            if !io.is_done() {
                break io;
            }
        };
        let t = s.pool.pop()?;
        s.ahead = Some(io.id);
        s.active.push(Arc::clone(&io));
        Some((io, t))
    }

    fn start_io(&self, io: &Arc<Io<P, M>>, t: Arc<Tx<P, M>>) {
        let init = {
            let mut st = lock(&io.st);
            if st.done {
                None
            } else {
                let init = io.init_phase(&t, 0);
                if init.is_ok() {
                    st.transaction = Some(Arc::clone(&t));
                }
                Some(init)
            }
        };
        match init {
            None => {
                // Cancelled between its pick and now: nothing started.
                let mut s = lock(&self.sched);
                s.pool.push(t);
                s.active.retain(|a| a.id != io.id);
                if s.ahead == Some(io.id) {
                    s.ahead = None;
                }
            }
            Some(Err(e)) => {
                let _ = t.release();
                lock(&self.sched).pool.push(t);
                self.finish(io, Err(e));
            }
            Some(Ok(())) => self.execute(io, &t),
        }
    }

    fn execute(&self, io: &Arc<Io<P, M>>, t: &Arc<Tx<P, M>>) {
        if let Err(e) = t.execute(Arc::clone(io)) {
            self.finish(io, Err(e));
        }
    }

    /// The request's last transfer is with the engine: let the next request in.
    fn last_programmed(&self, id: u64) {
        let opened = {
            let mut s = lock(&self.sched);
            if s.ahead == Some(id) {
                s.ahead = None;
                true
            } else {
                false
            }
        };
        if opened {
            self.admit();
        }
    }

    /// Complete `io` with `status`, exactly once: release its transaction (its buffer goes
    /// back to the request), give the transaction back, let the next request in.
    fn finish(&self, io: &Arc<Io<P, M>>, status: Result<()>) {
        let (t, cancelable, looped) = {
            let mut st = lock(&io.st);
            if st.done {
                return;
            }
            st.done = true;
            (st.transaction.take(), st.cancelable, st.looped)
        };
        let information = match (io.kind, &t) {
            (Kind::Loopback, _) => looped,
            (_, Some(t)) => t.bytes_transferred(),
            (_, None) => 0,
        };
        if let Some(t) = &t {
            // Finished, failed, cancelled or never executed: never in Transfer here.
            let _ = t.release();
        }
        {
            let mut s = lock(&self.sched);
            if let Some(t) = t {
                s.pool.push(t);
            }
            s.active.retain(|a| a.id != io.id);
            s.backlog.retain(|a| a.id != io.id);
            if s.ahead == Some(io.id) {
                s.ahead = None;
            }
        }
        lock(&CANCEL).remove(&io.id);
        if cancelable {
            // Err(Cancelled): the cancel callback claimed it, found it done (or will), and
            // leaves the completion to us.
            let _ = io.request.unmark_cancelable();
        }
        bump(&self.counters.completed);
        match status {
            Err(Error::Cancelled) => bump(&self.counters.cancelled),
            Err(Error::IoTimeout) => bump(&self.counters.timeouts),
            _ => {}
        }
        let _ = io.request.complete_with_information(status, information);
        self.admit();
    }

    /// A phase's transaction finished with `status`: start the next phase or complete.
    fn phase_done(&self, io: &Arc<Io<P, M>>, status: Result<()>) {
        let next = {
            let mut st = lock(&io.st);
            if st.done {
                return;
            }
            let Some(t) = st.transaction.clone() else {
                return;
            };
            if io.kind == Kind::Loopback && st.phase % 2 == 1 && status.is_ok() {
                st.looped += t.bytes_transferred();
            }
            if status.is_err() || st.phase + 1 >= io.phases() {
                Err(status)
            } else if io.request.is_cancelled() || lock(&self.sched).stopping {
                Err(Err(Error::Cancelled))
            } else {
                let _ = t.release();
                st.phase += 1;
                match io.init_phase(&t, st.phase) {
                    Ok(()) => Ok(t),
                    Err(e) => Err(Err(e)),
                }
            }
        };
        match next {
            Ok(t) => self.execute(io, &t),
            Err(status) => self.finish(io, status),
        }
    }

    /// Program the transfer at the head of the waiting line if the engine is idle.
    fn pump(&self) {
        let mut e = lock(&self.engine);
        if e.running.is_some() {
            return;
        }
        // Program-DMA runs only after start, which requires prepared hardware.
        let Some(regs) = self.regs() else {
            return;
        };
        if e.waiting.is_empty() {
            return;
        }
        if regs.read32(reg::DMA_CMD) & cmd::RUN != 0 {
            // A DMA the watchdog gave up on is still running, and edu ignores the DMA
            // registers until it ends: programming now would lose this transfer. Wait for its
            // end (its interrupt or the poll timer calls back here), bounded by the watchdog.
            if e.wedged_since.is_none() {
                e.wedged_since = Some(Instant::now());
                if let Some(Timers { watchdog, poll }) = self.timers() {
                    let _ = watchdog.start(self.config.timeout);
                    if let (Some(poll), Completion::Polled { interval }) =
                        (poll, self.config.completion)
                    {
                        let _ = poll.start(interval);
                    }
                }
            } else if let (
                Some(Timers {
                    poll: Some(poll), ..
                }),
                Completion::Polled { interval },
            ) = (self.timers(), self.config.completion)
            {
                let _ = poll.start(interval);
            }
            return;
        }
        e.wedged_since = None;
        let Some(transfer) = e.waiting.pop_front() else {
            return;
        };
        let interrupt = self.config.completion == Completion::Interrupt;
        let command = cmd::RUN | if interrupt { cmd::IRQ } else { 0 };
        // 4-byte writes set the 64-bit fields whole; the address fits 28 bits.
        let address = transfer.address as u32;
        let buffer = hw::DMA_BUFFER as u32;
        let (src, dst, command) = match transfer.direction {
            Direction::WriteToDevice => (address, buffer, command),
            Direction::ReadFromDevice => (buffer, address, command | cmd::TO_RAM),
        };
        regs.write32(reg::DMA_SRC, src);
        regs.write32(reg::DMA_DST, dst);
        regs.write32(reg::DMA_COUNT, transfer.length as u32);
        regs.write32(reg::DMA_CMD, command);
        bump(&self.counters.transfers[index(transfer.direction)]);
        e.running = Some(Running {
            transfer,
            started: Instant::now(),
        });
        // Armed with the engine locked: the end of this transfer is handled after.
        if let Some(Timers { watchdog, poll }) = self.timers() {
            let _ = watchdog.start(self.config.timeout);
            if let (Some(poll), Completion::Polled { interval }) = (poll, self.config.completion) {
                let _ = poll.start(interval);
            }
        }
    }

    /// The running transfer may have ended (`cause`): if so, report it to its transaction.
    fn transfer_ended(&self, cause: Cause) {
        let running = {
            let mut e = lock(&self.engine);
            let Some(r) = &e.running else {
                // No transfer of ours runs: the engine may be ending a DMA the watchdog gave
                // up on, with transfers waiting behind it.
                let expired = cause == Cause::Watchdog
                    && e.wedged_since
                        .is_some_and(|since| since.elapsed() >= self.config.timeout);
                let failed = if expired {
                    e.wedged_since = None;
                    e.waiting.pop_front()
                } else {
                    None
                };
                drop(e);
                if let Some(transfer) = failed {
                    // The device never became free for it: fail its request as a timeout.
                    let io = transfer.io;
                    let t = lock(&io.st).transaction.clone();
                    let status = match t.map(|t| t.dma_completed_final(0)) {
                        Some(Err(e)) => Err(e),
                        _ => Err(Error::IoTimeout),
                    };
                    self.phase_done(&io, status);
                }
                self.pump();
                return;
            };
            let ended = match cause {
                Cause::Watchdog => r.started.elapsed() >= self.config.timeout,
                Cause::Interrupt | Cause::Poll => self
                    .regs()
                    .is_some_and(|regs| regs.read32(reg::DMA_CMD) & cmd::RUN == 0),
            };
            if !ended {
                if cause == Cause::Poll
                    && let (
                        Some(Timers {
                            poll: Some(poll), ..
                        }),
                        Completion::Polled { interval },
                    ) = (self.timers(), self.config.completion)
                {
                    let _ = poll.start(interval);
                }
                return;
            }
            e.running.take()
        };
        let Some(Running { transfer, .. }) = running else {
            return;
        };
        if let Some(Timers { watchdog, poll }) = self.timers() {
            let _ = watchdog.stop(false);
            if let Some(poll) = poll {
                let _ = poll.stop(false);
            }
        }
        let io = transfer.io;
        let t = lock(&io.st).transaction.clone();
        if let Some(t) = t {
            let timed_out = cause == Cause::Watchdog;
            let answer = if timed_out {
                t.dma_completed_final(0)
            } else {
                add(
                    &self.counters.bytes[index(transfer.direction)],
                    transfer.length,
                );
                t.dma_completed()
            };
            match answer {
                Ok(DmaCompletion::MoreProcessingRequired) => {}
                Ok(DmaCompletion::Finished(status)) => {
                    let status = if timed_out {
                        Err(Error::IoTimeout)
                    } else {
                        status
                    };
                    self.phase_done(&io, status);
                }
                Err(e) => self.phase_done(&io, Err(e)),
            }
        }
        self.pump();
    }

    /// Power-down: stop admitting, withdraw every request that has not reached the device,
    /// and wait (bounded by the watchdog) for the rest.
    fn stop_and_drain(&self) -> Result<()> {
        let (backlog, active) = {
            let mut s = lock(&self.sched);
            s.stopping = true;
            (
                s.backlog.iter().cloned().collect::<Vec<_>>(),
                s.active.clone(),
            )
        };
        for io in backlog.iter().chain(&active) {
            io.cancel();
        }
        let count = lock(&self.sched).active.len() as u32;
        let deadline =
            Instant::now() + (self.config.timeout + Duration::from_secs(1)) * (count + 1);
        while !lock(&self.sched).active.is_empty() {
            if Instant::now() >= deadline {
                return Err(Error::IoTimeout);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    Interrupt,
    Poll,
    Watchdog,
}

/// The device context: what the runtime's objects reach the driver through.
pub struct EduContext<P: Platform, M: EduBuffer> {
    shared: Arc<Shared<P, M>>,
}

impl<P: Platform, M: EduBuffer> fmt::Debug for EduContext<P, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EduContext")
            .field("config", &self.shared.config)
            .field("prepared", &self.shared.regs.get().is_some())
            .finish_non_exhaustive()
    }
}

// -------------------------------------------------------------------------------------------
// Program DMA

/// `EvtProgramDma`: the packet profile gives one element. The first call of a request
/// unmarks it cancelable; if a cancellation won, the transfer is finished unprogrammed and
/// the request completes cancelled with its buffer untouched.
fn program_dma<P: Platform, M: EduBuffer>(
    t: &Tx<P, M>,
    io: &Arc<Io<P, M>>,
    direction: Direction,
    sg: &[SgElement],
) -> bool {
    let Some(shared) = io.shared.upgrade() else {
        return false;
    };
    let length = t.current_transfer_length();
    let (cancelled, last) = {
        let mut st = lock(&io.st);
        let mut cancelled = false;
        if !st.programmed {
            st.programmed = true;
            if st.cancelable {
                st.cancelable = false;
                cancelled = io.request.unmark_cancelable() == Err(Error::Cancelled);
            }
        }
        let last = st.phase + 1 == io.phases() && t.bytes_transferred() + length == t.length();
        (cancelled, last)
    };
    let element = match sg {
        [e] if u64::from(e.length) == length
            && e.address.get() + length <= 1 << hw::DMA_ADDRESS_BITS =>
        {
            Some(*e)
        }
        // A platform breaking the packet contract (or the 28-bit description): refuse it
        // before the device sees it.
        _ => None,
    };
    let abort = if cancelled {
        Some(Err(Error::Cancelled))
    } else if element.is_none() {
        Some(Err(Error::InvalidDeviceState))
    } else {
        None
    };
    if let Some(status) = abort {
        // Whatever the transaction answers, the request ends here (`finish` runs once).
        let _ = t.dma_completed_final(0);
        shared.finish(io, status);
        return true;
    }
    let Some(element) = element else {
        return false;
    };
    {
        let mut e = lock(&shared.engine);
        if e.running.is_some() || !e.waiting.is_empty() {
            bump(&shared.counters.engine_waits);
        }
        e.waiting.push_back(Transfer {
            io: Arc::clone(io),
            direction,
            address: element.address.get(),
            length,
        });
    }
    shared.pump();
    if last {
        shared.last_programmed(io.id);
    }
    true
}

// -------------------------------------------------------------------------------------------
// Interrupt, timers

/// `EvtInterruptIsr`: read the interrupt status; if any bit is set, acknowledge it (the line
/// drops before the ISR returns, which INTx through VFIO needs before unmasking), save it and
/// queue the DPC.
fn edu_isr<P: Platform, M: EduBuffer>(
    interrupt: &Interrupt<EduContext<P, M>>,
    _message: u32,
) -> bool {
    let shared = &interrupt.device().context().shared;
    let Some(regs) = shared.regs() else {
        return false;
    };
    let bits = regs.read32(reg::IRQ_STATUS);
    if bits == 0 || bits == u32::MAX {
        // Not ours (or the device is gone: reads float high).
        return false;
    }
    regs.write32(reg::IRQ_ACK, bits);
    *lock(&shared.saved_irq) |= bits;
    bump(&shared.counters.interrupts_claimed);
    let _ = interrupt.queue_dpc();
    true
}

/// `EvtInterruptDpc`: a finished DMA is reported to its transaction.
fn edu_dpc<P: Platform, M: EduBuffer>(interrupt: &Interrupt<EduContext<P, M>>) {
    let shared = &interrupt.device().context().shared;
    let bits = interrupt
        .synchronize(|| std::mem::take(&mut *lock(&shared.saved_irq)))
        .unwrap_or(0);
    if bits & irq::DMA != 0 {
        shared.transfer_ended(Cause::Interrupt);
    }
}

/// The polling timer: is the command's busy bit clear yet?
fn edu_poll<P: Platform, M: EduBuffer>(timer: &Timer<EduContext<P, M>>) {
    let shared = &timer.device().context().shared;
    bump(&shared.counters.polls);
    shared.transfer_ended(Cause::Poll);
}

/// The watchdog: a transfer running for the whole timeout fails its request.
fn edu_watchdog<P: Platform, M: EduBuffer>(timer: &Timer<EduContext<P, M>>) {
    timer
        .device()
        .context()
        .shared
        .transfer_ended(Cause::Watchdog);
}

// -------------------------------------------------------------------------------------------
// Queue callbacks

fn edu_io_write<P: Platform, M: EduBuffer>(
    queue: &Queue<EduContext<P, M>, M>,
    request: Request<M>,
    length: u64,
) {
    queue
        .device()
        .context()
        .shared
        .submit(request, Kind::Write, length);
}

fn edu_io_read<P: Platform, M: EduBuffer>(
    queue: &Queue<EduContext<P, M>, M>,
    request: Request<M>,
    length: u64,
) {
    queue
        .device()
        .context()
        .shared
        .submit(request, Kind::Read, length);
}

fn edu_io_device_control<P: Platform, M: EduBuffer>(
    queue: &Queue<EduContext<P, M>, M>,
    request: Request<M>,
    output_length: u64,
    input_length: u64,
    code: IoctlCode,
) {
    if code != IOCTL_EDU_LOOPBACK {
        let _ = request.complete(Err(Error::InvalidDeviceRequest));
        return;
    }
    if input_length == 0 {
        let _ = request.complete(Err(Error::InvalidParameter));
        return;
    }
    if output_length < input_length {
        let _ = request.complete(Err(Error::BufferTooSmall));
        return;
    }
    queue
        .device()
        .context()
        .shared
        .submit(request, Kind::Loopback, input_length);
}

// -------------------------------------------------------------------------------------------
// Power

/// `EvtDeviceD0Entry`: acknowledge whatever the device still signals, turn off the factorial
/// interrupt, admit again.
fn edu_d0_entry<P: Platform, M: EduBuffer>(device: &Device<EduContext<P, M>>) -> Result<()> {
    let shared = &device.context().shared;
    let regs = shared.regs().ok_or(Error::InvalidDeviceState)?;
    regs.write32(reg::STATUS, 0);
    let pending = regs.read32(reg::IRQ_STATUS);
    regs.write32(reg::IRQ_ACK, pending);
    *lock(&shared.saved_irq) = 0;
    lock(&shared.sched).stopping = false;
    Ok(())
}

/// Before interrupts are disabled (queues already hold new requests): withdraw what has not
/// reached the device, wait for the rest.
fn edu_d0_exit_pre_interrupts_disabled<P: Platform, M: EduBuffer>(
    device: &Device<EduContext<P, M>>,
) -> Result<()> {
    device.context().shared.stop_and_drain()
}

/// `EvtCleanupCallback`: drop the handles of objects that hold the device.
fn edu_cleanup<P: Platform, M: EduBuffer>(device: &Device<EduContext<P, M>>) {
    lock(&device.context().shared.timers).take();
}

// -------------------------------------------------------------------------------------------
// The driver object

/// The edu driver: the device object with its queue, interrupt, timers and DMA objects.
pub struct Edu<P: Platform, M: EduBuffer> {
    device: Device<EduContext<P, M>>,
    dma: DmaDevice<P>,
    queue: Queue<EduContext<P, M>, M>,
    interrupt: Interrupt<EduContext<P, M>>,
}

impl<P: Platform, M: EduBuffer> fmt::Debug for Edu<P, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Edu")
            .field("power", &self.device.power_state())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// `EvtDriverDeviceAdd`: the DMA enabler (packet profile, 28-bit addresses, maximum transfer
/// [`EduConfig::max_transfer`], DMA v3), two transactions, the device with its parallel queue,
/// interrupt (ISR and DPC) and timers. Nothing touches the hardware yet.
///
/// # Errors
/// The errors of the framework calls it makes; every object made before the failure is
/// deleted.
pub fn edu_device_add<P: Platform, M: EduBuffer>(
    dma: DmaDevice<P>,
    config: EduConfig,
) -> Result<Edu<P, M>> {
    let mut enabler_config = EnablerConfig::new(Profile::Packet, config.transfer_length())
        .with_address_width(hw::DMA_ADDRESS_BITS)
        .with_version(DmaVersion::V3);
    enabler_config.verifier = config.verifier;
    let enabler = Enabler::create(&dma, enabler_config)?;
    let pool = (0..TRANSACTIONS)
        .map(|_| Tx::<P, M>::create(&enabler))
        .collect::<Result<Vec<_>>>();
    let pool = match pool {
        Ok(p) => p,
        Err(e) => {
            dma.delete();
            return Err(e);
        }
    };
    let shared = Arc::new_cyclic(|this| Shared {
        config,
        enabler,
        regs: OnceLock::new(),
        sched: Mutex::new(Sched {
            backlog: VecDeque::new(),
            active: Vec::new(),
            pool,
            ahead: None,
            admitting: false,
            rerun: false,
            stopping: false,
        }),
        engine: Mutex::new(Engine {
            running: None,
            waiting: VecDeque::new(),
            wedged_since: None,
        }),
        saved_irq: Mutex::new(0),
        timers: Mutex::new(None),
        registers: Mutex::new(()),
        counters: Counters::default(),
        this: this.clone(),
    });
    let device = Device::with_config(
        EduContext {
            shared: Arc::clone(&shared),
        },
        DeviceConfig {
            verifier: config.verifier,
        },
    );
    let built = (|| {
        device.attach_dma(&dma)?;
        device.set_pnp_power_callbacks(PnpPowerCallbacks {
            d0_entry: Some(edu_d0_entry::<P, M>),
            d0_exit_pre_interrupts_disabled: Some(edu_d0_exit_pre_interrupts_disabled::<P, M>),
            ..PnpPowerCallbacks::default()
        })?;
        let interrupt = Interrupt::create(
            &device,
            InterruptConfig {
                isr: edu_isr::<P, M>,
                dpc: Some(edu_dpc::<P, M>),
            },
        )?;
        let watchdog = Timer::create(
            &device,
            TimerConfig {
                callback: edu_watchdog::<P, M>,
            },
        )?;
        let poll = match config.completion {
            Completion::Polled { .. } => Some(Timer::create(
                &device,
                TimerConfig {
                    callback: edu_poll::<P, M>,
                },
            )?),
            Completion::Interrupt => None,
        };
        *lock(&shared.timers) = Some(Timers { watchdog, poll });
        let queue = Queue::create(
            &device,
            QueueConfig {
                read: Some(edu_io_read::<P, M>),
                write: Some(edu_io_write::<P, M>),
                device_control: Some(edu_io_device_control::<P, M>),
                ..QueueConfig::new(Dispatch::Parallel)
            },
        )?;
        device.set_cleanup_callback(edu_cleanup::<P, M>)?;
        Ok((interrupt, queue))
    })();
    match built {
        Ok((interrupt, queue)) => Ok(Edu {
            device,
            dma,
            queue,
            interrupt,
        }),
        Err(e) => {
            lock(&shared.timers).take();
            let _ = device.delete();
            dma.delete();
            Err(e)
        }
    }
}

impl<P: Platform, M: EduBuffer> Edu<P, M> {
    /// `EvtDevicePrepareHardware`: take BAR0 and check the identification register.
    ///
    /// # Errors
    /// [`PrepareError::WrongId`] if it does not read `0x010000ed`;
    /// [`PrepareError::BarTooSmall`]; [`PrepareError::AlreadyPrepared`].
    pub fn prepare_hardware(
        &self,
        bar0: Arc<dyn RegisterWindow>,
    ) -> core::result::Result<(), PrepareError> {
        if bar0.len() < hw::BAR0_MIN {
            return Err(PrepareError::BarTooSmall { length: bar0.len() });
        }
        let found = bar0.read32(reg::ID);
        if found != hw::ID {
            return Err(PrepareError::WrongId { found });
        }
        self.shared()
            .regs
            .set(bar0)
            .map_err(|_| PrepareError::AlreadyPrepared)
    }

    /// Power up (D0 entry, interrupts, the queue).
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] before [`Edu::prepare_hardware`], or as
    /// [`Device::power_up`].
    pub fn start(&self) -> Result<()> {
        if self.shared().regs().is_none() {
            return Err(Error::InvalidDeviceState);
        }
        self.device.power_up()
    }

    /// Remove the device: power down — requests that have not reached the device complete
    /// with [`Error::Cancelled`], the others finish (or time out) first — then delete every
    /// object. Requests submitted meanwhile complete with [`Error::Cancelled`].
    ///
    /// # Errors
    /// The power-down's error ([`Error::IoTimeout`] if requests did not finish in time); the
    /// device is deleted anyway.
    pub fn remove(&self) -> Result<()> {
        let powered = if self.device.power_state() == PowerState::D0 {
            self.device.power_down()
        } else {
            Ok(())
        };
        let deleted = self.device.delete();
        powered.and(deleted)
    }

    /// Write `memory` into the device (RAM → device), in transfers of at most the maximum
    /// transfer, each to the start of the device buffer. Completes with the bytes written.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] after removal.
    pub fn write(&self, memory: M) -> Result<RequestHandle<M>> {
        self.queue.submit(RequestSpec::write(memory))
    }

    /// Read from the device into `memory` (device → RAM): each transfer reads the start of the
    /// device buffer. Completes with the bytes read.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] after removal.
    pub fn read(&self, memory: M) -> Result<RequestHandle<M>> {
        self.queue.submit(RequestSpec::read(memory))
    }

    /// [`IOCTL_EDU_LOOPBACK`]: for each chunk of at most the maximum transfer, DMA `input`'s
    /// chunk into the device buffer, then the buffer into `output`'s chunk. Completes with the
    /// input's length; `output` must be at least as long ([`Error::BufferTooSmall`]).
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] after removal.
    pub fn loopback(&self, input: M, output: M) -> Result<RequestHandle<M>> {
        self.queue.submit(RequestSpec::device_control(
            IOCTL_EDU_LOOPBACK,
            Some(input),
            Some(output),
        ))
    }

    /// Write `value` to the liveness register and read back its complement.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] before hardware preparation; [`Error::DeviceDataError`]
    /// if the device answers anything but `!value`.
    pub fn liveness(&self, value: u32) -> Result<u32> {
        let shared = self.shared();
        let regs = shared.regs().ok_or(Error::InvalidDeviceState)?;
        let _serial = lock(&shared.registers);
        regs.write32(reg::LIVENESS, value);
        let answer = regs.read32(reg::LIVENESS);
        if answer == !value {
            Ok(answer)
        } else {
            Err(Error::DeviceDataError)
        }
    }

    /// Compute `n!` (wrapping at 32 bits) on the device, polling its computing bit for at
    /// most [`EduConfig::timeout`].
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] before hardware preparation; [`Error::IoTimeout`] if the
    /// device stays busy; [`Error::DeviceDataError`] if its answer is wrong.
    pub fn factorial(&self, n: u32) -> Result<u32> {
        let shared = self.shared();
        let regs = shared.regs().ok_or(Error::InvalidDeviceState)?;
        let _serial = lock(&shared.registers);
        let deadline = Instant::now() + shared.config.timeout;
        let idle = || {
            loop {
                if regs.read32(reg::STATUS) & status::COMPUTING == 0 {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(Error::IoTimeout);
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        };
        // A write while computing is ignored: wait for a computation still running.
        idle()?;
        regs.write32(reg::FACTORIAL, n);
        idle()?;
        let answer = regs.read32(reg::FACTORIAL);
        let expected = (1..=n).fold(1u32, u32::wrapping_mul);
        if answer == expected {
            Ok(answer)
        } else {
            Err(Error::DeviceDataError)
        }
    }

    fn shared(&self) -> &Shared<P, M> {
        &self.device.context().shared
    }

    /// The interrupt, for whatever delivers the device's interrupt: call
    /// [`Interrupt::raise`]`(0)` for each MSI message or while INTx is asserted. The ISR runs
    /// inside `raise` on the calling thread and has acknowledged the device when it returns.
    pub fn interrupt(&self) -> &Interrupt<EduContext<P, M>> {
        &self.interrupt
    }

    /// The interrupt's counters.
    pub fn interrupt_stats(&self) -> InterruptStats {
        self.interrupt.stats()
    }

    /// The device object.
    pub fn device(&self) -> &Device<EduContext<P, M>> {
        &self.device
    }

    /// The DMA device the driver was added with.
    pub fn dma_device(&self) -> &DmaDevice<P> {
        &self.dma
    }

    /// The DMA enabler.
    pub fn enabler(&self) -> &Enabler<P> {
        &self.shared().enabler
    }

    /// The configuration.
    pub fn config(&self) -> EduConfig {
        self.shared().config
    }

    /// Requests the driver holds (delivered and not completed). A request's issuer is woken
    /// just before the queue forgets it, so right after a wait this can still count it for a
    /// moment.
    pub fn requests_in_flight(&self) -> usize {
        self.queue.outstanding()
    }

    /// Counters of the driver.
    pub fn stats(&self) -> EduStats {
        let c = &self.shared().counters;
        // ORDERING: statistics.
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EduStats {
            requests: get(&c.requests),
            completed: get(&c.completed),
            cancelled: get(&c.cancelled),
            timeouts: get(&c.timeouts),
            transfers_to_device: get(&c.transfers[0]),
            transfers_to_ram: get(&c.transfers[1]),
            engine_waits: get(&c.engine_waits),
            bytes_to_device: get(&c.bytes[0]),
            bytes_to_ram: get(&c.bytes[1]),
            interrupts_claimed: get(&c.interrupts_claimed),
            polls: get(&c.polls),
        }
    }
}
