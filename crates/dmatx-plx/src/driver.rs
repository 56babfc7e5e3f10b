//! The driver: the sample's `Init.c`, `Device.c` (`PLxEvtDeviceAdd`, hardware preparation, power),
//! `Read.c`, `Write.c`, `IsrDpc.c` and `Control.c`, one function per sample function, named
//! after it (`PLxEvtIoWrite` → [`plx_evt_io_write`], …; each has the C name as a doc alias).
//!
//! # What is the sample's, and what is not
//! The faithful port keeps the sample's logic, defects included (`samples.md` §1.4): aborted
//! transfers are never noticed, a short write reports the full length, a stalled channel leaves
//! its request pending forever, and the DPC's read branch clears the *write* channel's saved
//! status copy. [`Variant::Hardened`] fixes the first three and the slip: abort bits finish the
//! transaction with `DmaCompletedFinal` and [`Error::DeviceDataError`]; the write channel runs in
//! clear-count mode too, so a short write reports (and the framework re-issues) what did not
//! move; and a watchdog aborts a channel that has not finished in time and completes its request
//! with [`Error::IoTimeout`].
//!
//! Deliberate differences from the C sample, both variants (also in `docs/quirks.md`):
//! * **Device synchronization scope** is the driver's own lock ([`DeviceExtension`]'s scope),
//!   taken by the I/O callbacks, the DPC and the watchdog. The runtime has no synchronization
//!   scope, so the port builds it.
//! * **Requests complete after the scope is left.** A sequential queue delivers its next request
//!   on the thread that completes the current one; completing inside the scope would run the
//!   next `EvtIoWrite` inside it. KMDF defers such a delivery; the port completes last instead.
//! * **Power-down waits for requests in flight** (in `EvtDeviceSelfManagedIoSuspend`): KMDF does
//!   that for a power-managed queue without `EvtIoStop`, the runtime does not.
//! * **No never-taken error branch in program-DMA**: the sample's `errors` flag is always
//!   false. Program-DMA cannot run before the registers are mapped ([`Plx::start`] refuses), so
//!   there is nothing to report there.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use dmatx::hal::{MemoryDescriptor, Platform, RegisterWindow};
use dmatx::{
    CommonBuffer, CommonBufferConfig, Completion, Direction, DmaDevice, DmaVersion, Enabler,
    EnablerConfig, Error, Profile, Result, SgElement, State, Transaction,
};
use dmatx_runtime::{
    Device, DeviceConfig, Dispatch, Interrupt, InterruptConfig, InterruptStats, IoctlCode,
    PnpPowerCallbacks, Queue, QueueConfig, Request, RequestHandle, RequestMemory, RequestSpec,
    Timer, TimerConfig, TransferMethod,
};

use crate::hw::{
    ALIGNMENT_MASK, BAR0_SIZE, CNTRL, DMA_CSR, DMA_DAC, DMA_DESC_PTR, DMA_MODE, DTE_COUNT, Dte,
    INTCSR, MAXIMUM_TRANSFER_LENGTH, SRAM_SIZE, cntrl, csr, dpr, intcsr, mode,
};

/// `IOCTL_PLX9X5X_TOGGLE_SINGLE_TRANSFER` (`METHOD_BUFFERED`): flip the single-transfer
/// requirement; the output's first byte gets the new value (1 or 0). The sample's
/// `CTL_CODE(FILE_DEVICE_UNKNOWN, 0x0, METHOD_BUFFERED, FILE_ANY_ACCESS)`.
pub const IOCTL_PLX9X5X_TOGGLE_SINGLE_TRANSFER: IoctlCode =
    IoctlCode::new(0x22, 0x0, TransferMethod::Buffered, 0);

/// The time the soft reset holds CNTRL bit 30 (`PLxEvtDeviceD0Exit`'s 100 ms wait).
pub const SOFT_RESET_HOLD: Duration = Duration::from_millis(100);

/// Which driver runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Variant {
    /// The sample's logic, defects included.
    #[default]
    Faithful,
    /// Abort bits, short writes and stalls handled (module documentation).
    Hardened,
}

/// How the driver is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlxConfig {
    /// The faithful port or the hardened one.
    pub variant: Variant,
    /// Hardened only: how long a transfer may run before the watchdog aborts it.
    pub watchdog: Duration,
    /// Verifier mode for the device's objects and the enabler (`None`: on in debug builds).
    pub verifier: Option<bool>,
}

impl Default for PlxConfig {
    fn default() -> Self {
        Self {
            variant: Variant::Faithful,
            watchdog: Duration::from_secs(1),
            verifier: None,
        }
    }
}

impl PlxConfig {
    /// The hardened variant with a watchdog of `watchdog`.
    pub fn hardened(watchdog: Duration) -> Self {
        Self {
            variant: Variant::Hardened,
            watchdog,
            ..Self::default()
        }
    }
}

/// CPU access to a request's buffer: what `WdfRequestRetrieveOutputBuffer` gives a
/// `METHOD_BUFFERED` handler.
pub trait HostBuffer: MemoryDescriptor + Send + Sync + 'static {
    /// Copy `data` into the buffer at `offset`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the range lies outside the buffer.
    fn store(&self, offset: u64, data: &[u8]) -> Result<()>;

    /// Copy the buffer's bytes at `offset` into `out`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the range lies outside the buffer.
    fn load(&self, offset: u64, out: &mut [u8]) -> Result<()>;
}

/// The fragmentation build's driver-owned buffers (`SIMULATE_MEMORY_FRAGMENTATION`): one chain
/// per direction — the sample's `BuildMdlChain` makes eight 1 KiB buffers — that requests are
/// copied through, so a transfer has many SG elements.
pub struct FragmentationChains<M> {
    /// The chain writes are copied into.
    pub write: M,
    /// The chain reads land in.
    pub read: M,
}

/// The fragmentation build's descriptor count and SG element limit.
pub const FRAGMENTATION_DTE_COUNT: u64 = 17;

/// A hardware resource handed to `EvtDevicePrepareHardware`.
pub enum Resource {
    /// A memory BAR, mapped: the driver tells BARs apart by their size, as the sample does.
    Memory(Arc<dyn RegisterWindow>),
    /// An I/O port range of `length` bytes (BAR1; unused).
    Port {
        /// Its length.
        length: u64,
    },
    /// The line interrupt.
    Interrupt,
}

impl fmt::Debug for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Memory(w) => write!(f, "Memory({:#x} bytes)", w.len()),
            Resource::Port { length } => write!(f, "Port({length:#x} bytes)"),
            Resource::Interrupt => f.write_str("Interrupt"),
        }
    }
}

/// `KeDelayExecutionThread` for the driver: on the simulated machine it advances virtual time.
pub type Delay = Arc<dyn Fn(Duration) + Send + Sync>;

/// The DMA transactions of the port: program-DMA gets the device.
pub type PlxTransaction<P, M> = Transaction<P, Device<DeviceExtension<P, M>>, RequestMemory<M>>;

/// A DMA channel: 0 writes (host → SRAM), 1 reads (SRAM → host).
const WRITE: usize = 0;
const READ: usize = 1;

/// One program-DMA call, as the driver saw it (for scenarios and the demo's summary).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramRecord {
    /// The channel's direction.
    pub direction: Direction,
    /// `WdfDmaTransactionGetBytesTransferred` at the call: the SRAM offset of the transfer.
    pub offset: u64,
    /// Bytes of the transfer.
    pub length: u64,
    /// Scatter/gather elements (descriptors written).
    pub elements: usize,
    /// The first descriptor's `LocalAddress`.
    pub first_local: u32,
}

/// How many program-DMA and completion records the driver keeps (the most recent ones).
pub const PROGRAM_LOG_CAPACITY: usize = 256;

/// One `DmaCompleted*` call of the DPC, as the driver made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompletionRecord {
    /// The channel's direction.
    pub direction: Direction,
    /// Which call.
    pub call: CompletionCall,
    /// Whether it finished the transaction (KMDF's `TRUE`).
    pub finished: bool,
}

/// The `DmaCompleted*` call a [`CompletionRecord`] describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionCall {
    /// `WdfDmaTransactionDmaCompleted` (the whole transfer).
    Completed,
    /// `WdfDmaTransactionDmaCompletedWithLength(length)`.
    WithLength(u64),
    /// `WdfDmaTransactionDmaCompletedFinal(length)`.
    Final(u64),
}

thread_local! {
    /// How deep this thread is in program-DMA callbacks (for the P15 observation).
    static PROGRAM_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Counters of the driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlxStats {
    /// `PLxEvtProgramWriteDma` calls.
    pub program_write_calls: u64,
    /// `PLxEvtProgramReadDma` calls.
    pub program_read_calls: u64,
    /// Scatter/gather elements programmed, both channels.
    pub sg_elements: u64,
    /// Largest element count of one transfer.
    pub max_elements: u64,
    /// `DmaCompleted*` calls (write, read).
    pub dma_completed_calls: [u64; 2],
    /// Transactions initialized (write, read).
    pub initialized: [u64; 2],
    /// Transactions released (write, read) — including releases of never-initialized ones on
    /// the error paths, as the sample does.
    pub released: [u64; 2],
    /// Hardened: transfers finished with `DeviceDataError` because of abort bits.
    pub aborts_detected: u64,
    /// Hardened: watchdog expiries that aborted a channel.
    pub watchdog_aborts: u64,
    /// Soft resets (D0 exit to D3Final).
    pub soft_resets: u64,
    /// ISR calls that found both channels' active bits set.
    pub isr_both_channels: u64,
    /// DPC runs that reported a transfer on both channels.
    pub dpc_both_channels: u64,
    /// ISR calls on a thread that was inside program-DMA (must stay 0: the ISR waits for the
    /// interrupt lock program-DMA holds, on another thread).
    pub isr_inside_program_dma: u64,
    /// Deepest nesting of program-DMA callbacks on one thread (1: never nested).
    pub max_program_depth: u64,
}

#[derive(Default)]
struct Counters {
    program_calls: [AtomicU64; 2],
    sg_elements: AtomicU64,
    max_elements: AtomicU64,
    dma_completed: [AtomicU64; 2],
    initialized: [AtomicU64; 2],
    released: [AtomicU64; 2],
    aborts_detected: AtomicU64,
    watchdog_aborts: AtomicU64,
    soft_resets: AtomicU64,
    isr_both: AtomicU64,
    dpc_both: AtomicU64,
    isr_inside_program_dma: AtomicU64,
    max_program_depth: AtomicU64,
}

fn bump(c: &AtomicU64) {
    // ORDERING: statistics; nothing is published through them.
    c.fetch_add(1, Ordering::Relaxed);
}

/// The ISR's saved copies (`DEVICE_EXTENSION::IntCsr`, `Dma0Csr`, `Dma1Csr`); touched only
/// under the interrupt lock.
#[derive(Clone, Copy, Debug, Default)]
struct Saved {
    int_csr: u32,
    csr: [u8; 2],
}

/// The watchdog of one channel (hardened).
#[derive(Default)]
struct Watch {
    armed_at: Option<Instant>,
    fired: bool,
}

/// The device context (`DEVICE_EXTENSION`).
pub struct DeviceExtension<P: Platform, M: HostBuffer> {
    config: PlxConfig,
    enabler: Enabler<P>,
    /// Descriptor chains: write channel, read channel (`WriteCommonBuffer`, `ReadCommonBuffer`).
    common: [CommonBuffer<P>; 2],
    /// Descriptors per chain (`dteCount`): 3, or 17 in the fragmentation build.
    dte_count: u64,
    /// The fragmentation build's chains (write, read).
    chains: Option<[RequestMemory<M>; 2]>,
    /// The fragmentation build's read request (its transaction runs on the driver's chain).
    read_request: Mutex<Option<Request<M>>>,
    /// `WriteDmaTransaction`, `ReadDmaTransaction`.
    transactions: [Arc<PlxTransaction<P, M>>; 2],
    /// The write transaction's context: its request (the read's is bound by the framework).
    write_request: Mutex<Option<Request<M>>>,
    /// BAR0, set by hardware preparation.
    regs: OnceLock<Arc<dyn RegisterWindow>>,
    /// BAR2, mapped and never touched (as in the sample).
    sram: OnceLock<Arc<dyn RegisterWindow>>,
    /// The interrupt, the watchdog timers (hardened) and the queues: handles of objects that
    /// hold the device, so kept where the cleanup callback can drop them (no reference cycle
    /// outlives the device's deletion).
    interrupt: Mutex<Option<Interrupt<Self>>>,
    /// Hardened: one watchdog timer per channel.
    watchdogs: Mutex<Option<[Timer<Self>; 2]>>,
    queues: Mutex<Vec<Queue<Self, M>>>,
    /// Set while program-DMA holds the interrupt lock (any thread), for the P15 observation.
    programming: AtomicBool,
    /// Power-downs that found requests in flight and waited for them.
    power_down_waits: AtomicU64,
    watch: Mutex<[Watch; 2]>,
    delay: Delay,
    saved: Mutex<Saved>,
    /// Device synchronization scope.
    scope: Mutex<()>,
    require_single_transfer: AtomicBool,
    /// The next D0 exit goes to D3Final (removal).
    final_power_down: AtomicBool,
    program_log: Mutex<VecDeque<ProgramRecord>>,
    completion_log: Mutex<VecDeque<CompletionRecord>>,
    counters: Counters,
}

impl<P: Platform, M: HostBuffer> fmt::Debug for DeviceExtension<P, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceExtension")
            .field("variant", &self.config.variant)
            .field("prepared", &self.regs.get().is_some())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere does not make the driver's plain data inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn direction_of(channel: usize) -> Direction {
    if channel == WRITE {
        Direction::WriteToDevice
    } else {
        Direction::ReadFromDevice
    }
}

impl<P: Platform, M: HostBuffer> DeviceExtension<P, M> {
    fn sync_scope(&self) -> MutexGuard<'_, ()> {
        lock(&self.scope)
    }

    fn regs(&self) -> Option<&Arc<dyn RegisterWindow>> {
        self.regs.get()
    }

    fn hardened(&self) -> bool {
        self.config.variant == Variant::Hardened
    }

    /// INTCSR as read, made ready for a read-modify-write. The sample writes back what it read,
    /// abort bits included, which clears them (they are write-one-to-clear); the hardened port
    /// masks them so an abort its ISR has not seen yet survives.
    fn int_csr_to_write(&self, read: u32) -> u32 {
        if self.hardened() {
            read & !intcsr::ABORT_BITS
        } else {
            read
        }
    }

    fn interrupt(&self) -> Option<Interrupt<Self>> {
        lock(&self.interrupt).clone()
    }

    fn watchdog(&self, channel: usize) -> Option<Timer<Self>> {
        lock(&self.watchdogs).as_ref().map(|t| t[channel].clone())
    }

    /// Whether program-DMA holds the interrupt lock now (on any thread): between its first
    /// register write and its last.
    pub fn in_program_dma(&self) -> bool {
        self.programming.load(Ordering::SeqCst)
    }

    /// Requests delivered to the driver's queues and not completed.
    fn requests_held(&self) -> usize {
        lock(&self.queues).iter().map(Queue::outstanding).sum()
    }

    fn release(&self, channel: usize) {
        bump(&self.counters.released[channel]);
        // Release fails only while a transfer runs, which these paths rule out.
        let _ = self.transactions[channel].release();
    }

    /// The descriptors in `channel`'s common buffer, as they are now.
    fn descriptors(&self, channel: usize) -> Vec<Dte> {
        let mut out = vec![Dte::default(); self.dte_count as usize];
        for (i, d) in out.iter_mut().enumerate() {
            let mut raw = [0u8; 32];
            if self.common[channel]
                .read(i as u64 * Dte::SIZE, &mut raw)
                .is_ok()
            {
                *d = Dte::from_bytes(&raw);
            }
        }
        out
    }

    /// Bytes the chip moved in the transfer that just ended, from the clear-count descriptors:
    /// the transfer's length less every size still standing up to the last element.
    fn moved_by_clear_count(&self, channel: usize) -> u64 {
        let mut length = self.transactions[channel].current_transfer_length();
        for dte in self.descriptors(channel) {
            length = length.saturating_sub(u64::from(dte.transfer_size));
            if dte.desc_ptr & dpr::LAST_ELEMENT != 0 {
                break;
            }
        }
        length
    }
}

// -------------------------------------------------------------------------------------------
// Device add (`PLxEvtDeviceAdd`, `PLxInitializeDeviceExtension`, `PLxInitializeDMA`)

/// The PLX9x5x device: the device object with its queues and interrupt.
pub struct Plx<P: Platform, M: HostBuffer> {
    device: Device<DeviceExtension<P, M>>,
    dma: DmaDevice<P>,
    write_queue: Queue<DeviceExtension<P, M>, M>,
    read_queue: Queue<DeviceExtension<P, M>, M>,
    ioctl_queue: Queue<DeviceExtension<P, M>, M>,
    interrupt: Interrupt<DeviceExtension<P, M>>,
}

impl<P: Platform, M: HostBuffer> fmt::Debug for Plx<P, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plx")
            .field("power", &self.device.power_state())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// `PLxEvtDeviceAdd`: the device, its DMA objects (enabler, two common buffers, two
/// transactions), its interrupt and three sequential queues. Nothing touches the hardware yet.
///
/// # Errors
/// The errors of the framework calls it makes (enabler, common buffer, transaction, queue and
/// interrupt creation); every object made before the failure is deleted.
#[doc(alias = "PLxEvtDeviceAdd")]
pub fn plx_evt_device_add<P: Platform, M: HostBuffer>(
    dma: DmaDevice<P>,
    delay: Delay,
    config: PlxConfig,
) -> Result<Plx<P, M>> {
    device_add(dma, delay, config, None)
}

/// `PLxEvtDeviceAdd` of the fragmentation build (`SIMULATE_MEMORY_FRAGMENTATION`): 17
/// descriptors per chain and as the SG element limit, and requests copied through `chains`.
/// A request longer than its chain fails with [`Error::InvalidBufferSize`] (the sample's chain
/// of eight 1 KiB buffers is smaller than its 128 KiB request limit).
///
/// # Errors
/// As [`plx_evt_device_add`].
pub fn plx_evt_device_add_fragmented<P: Platform, M: HostBuffer>(
    dma: DmaDevice<P>,
    delay: Delay,
    config: PlxConfig,
    chains: FragmentationChains<M>,
) -> Result<Plx<P, M>> {
    device_add(dma, delay, config, Some(chains))
}

fn device_add<P: Platform, M: HostBuffer>(
    dma: DmaDevice<P>,
    delay: Delay,
    config: PlxConfig,
    chains: Option<FragmentationChains<M>>,
) -> Result<Plx<P, M>> {
    let dte_count = if chains.is_some() {
        FRAGMENTATION_DTE_COUNT
    } else {
        DTE_COUNT
    };
    // PLxInitializeDMA: SG64 duplex, 8 KiB, v3 (for the single-transfer requirement).
    let mut enabler_config =
        EnablerConfig::new(Profile::ScatterGather64Duplex, MAXIMUM_TRANSFER_LENGTH)
            .with_version(DmaVersion::V3);
    enabler_config.verifier = config.verifier;
    let enabler = Enabler::create(&dma, enabler_config)?;
    let made = (|| {
        enabler.set_max_sg_elements(dte_count)?;
        // WdfDeviceSetAlignmentRequirement(FILE_OCTA_ALIGNMENT): the descriptors' alignment.
        let common_config = CommonBufferConfig {
            alignment_requirement: Some(ALIGNMENT_MASK),
        };
        let chain_bytes = dte_count * Dte::SIZE;
        let write_common = CommonBuffer::create_with_config(&enabler, chain_bytes, common_config)?;
        let read_common = CommonBuffer::create_with_config(&enabler, chain_bytes, common_config)?;
        let zero = vec![0u8; chain_bytes as usize];
        write_common.write(0, &zero)?;
        read_common.write(0, &zero)?;
        let write_tx = Transaction::create(&enabler)?;
        let read_tx = Transaction::create(&enabler)?;
        Ok(([write_common, read_common], [write_tx, read_tx]))
    })();
    let (common, transactions) = match made {
        Ok(m) => m,
        Err(e) => {
            dma.delete();
            return Err(e);
        }
    };
    let ext = DeviceExtension {
        config,
        enabler: enabler.clone(),
        common,
        dte_count,
        chains: chains.map(|c| [RequestMemory::new(c.write), RequestMemory::new(c.read)]),
        read_request: Mutex::new(None),
        transactions,
        write_request: Mutex::new(None),
        regs: OnceLock::new(),
        sram: OnceLock::new(),
        interrupt: Mutex::new(None),
        watchdogs: Mutex::new(None),
        watch: Mutex::new([Watch::default(), Watch::default()]),
        delay,
        saved: Mutex::new(Saved::default()),
        scope: Mutex::new(()),
        require_single_transfer: AtomicBool::new(false),
        final_power_down: AtomicBool::new(false),
        queues: Mutex::new(Vec::new()),
        programming: AtomicBool::new(false),
        power_down_waits: AtomicU64::new(0),
        program_log: Mutex::new(VecDeque::with_capacity(PROGRAM_LOG_CAPACITY)),
        completion_log: Mutex::new(VecDeque::with_capacity(PROGRAM_LOG_CAPACITY)),
        counters: Counters::default(),
    };
    let device_config = DeviceConfig {
        verifier: config.verifier,
    };
    let device = Device::with_config(ext, device_config);
    let built = (|| {
        device.attach_dma(&dma)?;
        device.set_pnp_power_callbacks(PnpPowerCallbacks {
            d0_entry: Some(plx_evt_device_d0_entry::<P, M>),
            d0_entry_post_interrupts_enabled: Some(plx_evt_interrupt_enable::<P, M>),
            d0_exit_pre_interrupts_disabled: Some(plx_d0_exit_pre_interrupts_disabled::<P, M>),
            d0_exit: Some(plx_evt_device_d0_exit::<P, M>),
            ..PnpPowerCallbacks::default()
        })?;
        let interrupt = Interrupt::create(
            &device,
            InterruptConfig {
                isr: plx_evt_interrupt_isr::<P, M>,
                dpc: Some(plx_evt_interrupt_dpc::<P, M>),
            },
        )?;
        *lock(&device.context().interrupt) = Some(interrupt.clone());
        if config.variant == Variant::Hardened {
            let timer = || {
                Timer::create(
                    &device,
                    TimerConfig {
                        callback: plx_watchdog::<P, M>,
                    },
                )
            };
            *lock(&device.context().watchdogs) = Some([timer()?, timer()?]);
        }
        // Three sequential queues: at most one request per channel in flight.
        let sequential = QueueConfig::new(Dispatch::Sequential);
        let queue = |config| Queue::create(&device, config);
        let write_queue = queue(QueueConfig {
            write: Some(plx_evt_io_write::<P, M>),
            ..sequential
        })?;
        let read_queue = queue(QueueConfig {
            read: Some(plx_evt_io_read::<P, M>),
            ..sequential
        })?;
        let ioctl_queue = queue(QueueConfig {
            device_control: Some(plx_evt_io_device_control::<P, M>),
            ..sequential
        })?;
        *lock(&device.context().queues) =
            vec![write_queue.clone(), read_queue.clone(), ioctl_queue.clone()];
        device.set_cleanup_callback(plx_evt_device_cleanup::<P, M>)?;
        Ok((interrupt, write_queue, read_queue, ioctl_queue))
    })();
    match built {
        Ok((interrupt, write_queue, read_queue, ioctl_queue)) => Ok(Plx {
            device,
            dma,
            write_queue,
            read_queue,
            ioctl_queue,
            interrupt,
        }),
        Err(e) => {
            let _ = device.delete();
            dma.delete();
            Err(e)
        }
    }
}

impl<P: Platform, M: HostBuffer> Plx<P, M> {
    /// `PLxEvtDevicePrepareHardware`: find BAR0 (memory, exactly 0x200 bytes) and BAR2
    /// (memory, exactly 128 KiB) by size; ports are noted and ignored, as is a second SRAM block.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] (`STATUS_DEVICE_CONFIGURATION_ERROR` in the sample) if
    /// BAR0 or BAR2 is missing, or if the hardware was already prepared.
    #[doc(alias = "PLxEvtDevicePrepareHardware")]
    pub fn prepare_hardware(&self, resources: Vec<Resource>) -> Result<()> {
        let ext = self.device.context();
        let mut bar0 = None;
        let mut bar2 = None;
        for resource in resources {
            if let Resource::Memory(window) = resource {
                match window.len() {
                    BAR0_SIZE if bar0.is_none() => bar0 = Some(window),
                    SRAM_SIZE if bar2.is_none() => bar2 = Some(window),
                    _ => {}
                }
            }
        }
        let (Some(bar0), Some(bar2)) = (bar0, bar2) else {
            return Err(Error::InvalidDeviceState);
        };
        ext.regs.set(bar0).map_err(|_| Error::InvalidDeviceState)?;
        let _ = ext.sram.set(bar2);
        Ok(())
    }

    /// Power up (D0 entry, interrupts, queues).
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] before [`Plx::prepare_hardware`], or as
    /// [`Device::power_up`].
    pub fn start(&self) -> Result<()> {
        if self.device.context().regs().is_none() {
            return Err(Error::InvalidDeviceState);
        }
        self.device
            .context()
            .final_power_down
            .store(false, Ordering::Relaxed);
        self.device.power_up()
    }

    /// Power down to D3 (not final: no soft reset). Waits for the requests the driver holds.
    ///
    /// # Errors
    /// As [`Device::power_down`].
    pub fn suspend(&self) -> Result<()> {
        self.device.power_down()
    }

    /// Remove the device: D0 exit to D3Final (soft reset), then delete every object.
    ///
    /// # Errors
    /// The power-down's error (the device is deleted anyway).
    pub fn remove(&self) -> Result<()> {
        let ext = self.device.context();
        // ORDERING: read by d0_exit on this thread.
        ext.final_power_down.store(true, Ordering::Relaxed);
        let powered = if self.device.power_state() == dmatx_runtime::PowerState::D0 {
            self.device.power_down()
        } else {
            Ok(())
        };
        // Deleting the device deletes its DMA device, and with it the enabler, the common
        // buffers and the transactions.
        let deleted = self.device.delete();
        powered.and(deleted)
    }

    /// Issue a write of `buffer` (an application's `WriteFile`).
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] after removal.
    pub fn write(&self, buffer: M) -> Result<RequestHandle<M>> {
        self.write_queue.submit(RequestSpec::write(buffer))
    }

    /// Issue a read into `buffer` (an application's `ReadFile`).
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] after removal.
    pub fn read(&self, buffer: M) -> Result<RequestHandle<M>> {
        self.read_queue.submit(RequestSpec::read(buffer))
    }

    /// Issue `IOCTL_PLX9X5X_TOGGLE_SINGLE_TRANSFER` with `output` for the new value.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] after removal.
    pub fn toggle_single_transfer(&self, output: M) -> Result<RequestHandle<M>> {
        self.ioctl_queue.submit(RequestSpec::device_control(
            IOCTL_PLX9X5X_TOGGLE_SINGLE_TRANSFER,
            None,
            Some(output),
        ))
    }

    /// Issue any device control request on the IOCTL queue.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] after removal.
    pub fn device_control(
        &self,
        code: IoctlCode,
        input: Option<M>,
        output: Option<M>,
    ) -> Result<RequestHandle<M>> {
        self.ioctl_queue
            .submit(RequestSpec::device_control(code, input, output))
    }

    /// The interrupt, for whatever delivers the device's line (a platform's interrupt
    /// controller calls [`Interrupt::raise`]).
    pub fn interrupt(&self) -> &Interrupt<DeviceExtension<P, M>> {
        &self.interrupt
    }

    /// The interrupt's counters.
    pub fn interrupt_stats(&self) -> InterruptStats {
        self.interrupt.stats()
    }

    /// The device object.
    pub fn device(&self) -> &Device<DeviceExtension<P, M>> {
        &self.device
    }

    /// The DMA device the driver was added with.
    pub fn dma_device(&self) -> &DmaDevice<P> {
        &self.dma
    }

    /// The DMA enabler.
    pub fn enabler(&self) -> &Enabler<P> {
        &self.device.context().enabler
    }

    /// The state of the write and the read transaction.
    pub fn transaction_states(&self) -> [State; 2] {
        let t = &self.device.context().transactions;
        [t[WRITE].state(), t[READ].state()]
    }

    /// The write (`Direction::WriteToDevice`) or read transaction.
    pub fn transaction(&self, direction: Direction) -> &Arc<PlxTransaction<P, M>> {
        &self.device.context().transactions[channel_of(direction)]
    }

    /// The descriptors in the write or read common buffer, as they are now.
    pub fn descriptors(&self, direction: Direction) -> Vec<Dte> {
        self.device.context().descriptors(channel_of(direction))
    }

    /// The bus (logical) address of the write or read descriptor chain.
    pub fn descriptor_address(&self, direction: Direction) -> u64 {
        self.device.context().common[channel_of(direction)]
            .aligned_logical_address()
            .get()
    }

    /// The most recent program-DMA calls, oldest first (at most [`PROGRAM_LOG_CAPACITY`]).
    pub fn program_log(&self) -> Vec<ProgramRecord> {
        lock(&self.device.context().program_log)
            .iter()
            .copied()
            .collect()
    }

    /// The most recent `DmaCompleted*` calls, oldest first (at most [`PROGRAM_LOG_CAPACITY`]).
    pub fn completion_log(&self) -> Vec<CompletionRecord> {
        lock(&self.device.context().completion_log)
            .iter()
            .copied()
            .collect()
    }

    /// Forget the program-DMA and completion logs.
    pub fn clear_logs(&self) {
        lock(&self.device.context().program_log).clear();
        lock(&self.device.context().completion_log).clear();
    }

    /// Whether the single-transfer requirement is on (the toggle IOCTL's state).
    pub fn single_transfer(&self) -> bool {
        self.device
            .context()
            .require_single_transfer
            .load(Ordering::Relaxed)
    }

    /// Requests the driver holds (delivered by its queues, not completed).
    pub fn requests_in_flight(&self) -> usize {
        self.device.context().requests_held()
    }

    /// Power-downs that found requests in flight and waited for them.
    pub fn power_down_waits(&self) -> u64 {
        // ORDERING: statistics.
        self.device
            .context()
            .power_down_waits
            .load(Ordering::Relaxed)
    }

    /// Counters of the driver.
    pub fn stats(&self) -> PlxStats {
        let c = &self.device.context().counters;
        // ORDERING: statistics.
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PlxStats {
            program_write_calls: get(&c.program_calls[WRITE]),
            program_read_calls: get(&c.program_calls[READ]),
            sg_elements: get(&c.sg_elements),
            max_elements: get(&c.max_elements),
            dma_completed_calls: [get(&c.dma_completed[WRITE]), get(&c.dma_completed[READ])],
            initialized: [get(&c.initialized[WRITE]), get(&c.initialized[READ])],
            released: [get(&c.released[WRITE]), get(&c.released[READ])],
            aborts_detected: get(&c.aborts_detected),
            watchdog_aborts: get(&c.watchdog_aborts),
            soft_resets: get(&c.soft_resets),
            isr_both_channels: get(&c.isr_both),
            dpc_both_channels: get(&c.dpc_both),
            isr_inside_program_dma: get(&c.isr_inside_program_dma),
            max_program_depth: get(&c.max_program_depth),
        }
    }
}

fn channel_of(direction: Direction) -> usize {
    match direction {
        Direction::WriteToDevice => WRITE,
        Direction::ReadFromDevice => READ,
    }
}

// -------------------------------------------------------------------------------------------
// Power (`PLxEvtDeviceD0Entry`, `PLxEvtDeviceD0Exit`, `PLxEvtInterruptEnable/Disable`)

/// `PLxEvtDeviceD0Entry`: zero both DAC registers (upper address bits) and the saved copies.
#[doc(alias = "PLxEvtDeviceD0Entry")]
fn plx_evt_device_d0_entry<P: Platform, M: HostBuffer>(
    device: &Device<DeviceExtension<P, M>>,
) -> Result<()> {
    let ext = device.context();
    let regs = ext.regs().ok_or(Error::InvalidDeviceState)?;
    regs.write32(DMA_DAC[WRITE], 0);
    regs.write32(DMA_DAC[READ], 0);
    *lock(&ext.saved) = Saved::default();
    Ok(())
}

/// `PLxEvtInterruptEnable` (run once interrupts are connected): the master enable.
#[doc(alias = "PLxEvtInterruptEnable")]
fn plx_evt_interrupt_enable<P: Platform, M: HostBuffer>(
    device: &Device<DeviceExtension<P, M>>,
) -> Result<()> {
    let ext = device.context();
    let (Some(regs), Some(interrupt)) = (ext.regs(), ext.interrupt()) else {
        return Err(Error::InvalidDeviceState);
    };
    interrupt.synchronize(|| {
        let v = ext.int_csr_to_write(regs.read32(INTCSR));
        regs.write32(INTCSR, v | intcsr::PCI_INT_ENABLE);
    })
}

/// `PLxEvtInterruptDisable`: clear the master enable.
#[doc(alias = "PLxEvtInterruptDisable")]
fn plx_evt_interrupt_disable<P: Platform, M: HostBuffer>(
    device: &Device<DeviceExtension<P, M>>,
) -> Result<()> {
    let ext = device.context();
    let (Some(regs), Some(interrupt)) = (ext.regs(), ext.interrupt()) else {
        return Err(Error::InvalidDeviceState);
    };
    interrupt.synchronize(|| {
        let v = ext.int_csr_to_write(regs.read32(INTCSR));
        regs.write32(INTCSR, v & !intcsr::PCI_INT_ENABLE);
    })
}

/// Before interrupts are disabled: what KMDF does for a power-managed queue whose driver has
/// no `EvtIoStop` — wait for the requests the driver holds (the queues already hold new ones;
/// the DPC still runs) — then `PLxEvtInterruptDisable`.
fn plx_d0_exit_pre_interrupts_disabled<P: Platform, M: HostBuffer>(
    device: &Device<DeviceExtension<P, M>>,
) -> Result<()> {
    let ext = device.context();
    if ext.requests_held() > 0 {
        bump(&ext.power_down_waits);
        while ext.requests_held() > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    plx_evt_interrupt_disable(device)
}

/// The device's cleanup (`EvtCleanupCallback`): drop the handles of the objects that hold the
/// device, once they have stopped.
fn plx_evt_device_cleanup<P: Platform, M: HostBuffer>(device: &Device<DeviceExtension<P, M>>) {
    let ext = device.context();
    lock(&ext.interrupt).take();
    lock(&ext.watchdogs).take();
    lock(&ext.queues).clear();
}

/// `PLxEvtDeviceD0Exit`: to D3Final only, the CNTRL soft reset (set bit 30, wait 100 ms,
/// clear it).
#[doc(alias = "PLxEvtDeviceD0Exit")]
fn plx_evt_device_d0_exit<P: Platform, M: HostBuffer>(
    device: &Device<DeviceExtension<P, M>>,
) -> Result<()> {
    let ext = device.context();
    // A DPC queued before interrupts were disabled runs now, not after the next D0 entry
    // cleared the saved flags it would consume.
    if let Some(interrupt) = ext.interrupt() {
        interrupt.wait_dpc_idle(Duration::from_secs(10));
    }
    // ORDERING: written by `remove` on this thread.
    if !ext.final_power_down.load(Ordering::Relaxed) {
        return Ok(());
    }
    let regs = ext.regs().ok_or(Error::InvalidDeviceState)?;
    let v = regs.read32(CNTRL);
    regs.write32(CNTRL, v | cntrl::SOFTWARE_RESET);
    (ext.delay)(SOFT_RESET_HOLD);
    regs.write32(CNTRL, v & !cntrl::SOFTWARE_RESET);
    bump(&ext.counters.soft_resets);
    Ok(())
}

// -------------------------------------------------------------------------------------------
// Write and read (`PLxEvtIoWrite`, `PLxEvtIoRead`)

/// `PLxEvtIoWrite`: refuse more than the SRAM; set the single-transfer requirement; initialize
/// the write transaction with the request's buffer (`WdfDmaTransactionInitialize`), keep the
/// request in its context, execute. On failure: release, then complete with the status.
#[doc(alias = "PLxEvtIoWrite")]
pub fn plx_evt_io_write<P: Platform, M: HostBuffer>(
    queue: &Queue<DeviceExtension<P, M>, M>,
    request: Request<M>,
    length: u64,
) {
    let device = queue.device();
    start_request(device, WRITE, &request, |ext, t| {
        if length > SRAM_SIZE {
            return Err(Error::InvalidBufferSize);
        }
        t.set_single_transfer_requirement(ext.require_single_transfer.load(Ordering::Relaxed))?;
        let mut memory = request.input_memory().ok_or(Error::InvalidDeviceRequest)?;
        if let Some(chains) = &ext.chains {
            // The fragmentation build: copy the request into the driver's chain.
            let chain = &chains[WRITE];
            if length > chain.total_length() {
                return Err(Error::InvalidBufferSize);
            }
            let mut bytes = vec![0u8; length as usize];
            memory.memory().load(0, &mut bytes)?;
            chain.memory().store(0, &bytes)?;
            memory = chain.clone();
        }
        if memory.segment_count() == 0 {
            return Err(Error::InvalidDeviceRequest);
        }
        let va = memory.segment(0).va;
        t.initialize(
            plx_evt_program_write_dma::<P, M>,
            Direction::WriteToDevice,
            memory,
            va,
            length,
        )
        .map_err(|e| e.error)?;
        bump(&ext.counters.initialized[WRITE]);
        *lock(&ext.write_request) = Some(request.clone());
        t.execute(device.clone()).inspect_err(|_| {
            lock(&ext.write_request).take();
        })
    });
}

/// `PLxEvtIoRead`: as the write, with `WdfDmaTransactionInitializeUsingRequest`.
#[doc(alias = "PLxEvtIoRead")]
pub fn plx_evt_io_read<P: Platform, M: HostBuffer>(
    queue: &Queue<DeviceExtension<P, M>, M>,
    request: Request<M>,
    length: u64,
) {
    let device = queue.device();
    start_request(device, READ, &request, |ext, t| {
        if length > SRAM_SIZE {
            return Err(Error::InvalidBufferSize);
        }
        t.set_single_transfer_requirement(ext.require_single_transfer.load(Ordering::Relaxed))?;
        if let Some(chains) = &ext.chains {
            // The fragmentation build: read into the driver's chain, the request in the
            // context; the DPC copies the bytes out.
            let chain = chains[READ].clone();
            if length > chain.total_length() {
                return Err(Error::InvalidBufferSize);
            }
            t.initialize_using_offset(
                plx_evt_program_read_dma::<P, M>,
                Direction::ReadFromDevice,
                chain,
                0,
                length,
            )
            .map_err(|e| e.error)?;
            bump(&ext.counters.initialized[READ]);
            *lock(&ext.read_request) = Some(request.clone());
            return t.execute(device.clone()).inspect_err(|_| {
                lock(&ext.read_request).take();
            });
        }
        dmatx_runtime::dma::initialize_using_request(
            t,
            &request,
            plx_evt_program_read_dma::<P, M>,
            Direction::ReadFromDevice,
        )?;
        bump(&ext.counters.initialized[READ]);
        t.execute(device.clone())
    });
}

/// What both I/O callbacks do around their own steps: count the request as held, run `start`
/// in the synchronization scope, and if it fails release the transaction (as the sample does,
/// initialized or not) and complete the request with the status, after leaving the scope.
fn start_request<P: Platform, M: HostBuffer>(
    device: &Device<DeviceExtension<P, M>>,
    channel: usize,
    request: &Request<M>,
    start: impl FnOnce(&DeviceExtension<P, M>, &PlxTransaction<P, M>) -> Result<()>,
) {
    let ext = device.context();
    let started = {
        let _scope = ext.sync_scope();
        let started = start(ext, &ext.transactions[channel]);
        if started.is_err() {
            ext.release(channel);
        }
        started
    };
    if let Err(status) = started {
        let _ = request.complete(Err(status));
    }
}

/// `PLxEvtIoDeviceControl`: the toggle IOCTL; anything else is an invalid request.
#[doc(alias = "PLxEvtIoDeviceControl")]
pub fn plx_evt_io_device_control<P: Platform, M: HostBuffer>(
    queue: &Queue<DeviceExtension<P, M>, M>,
    request: Request<M>,
    output_length: u64,
    _input_length: u64,
    code: IoctlCode,
) {
    let ext = queue.device().context();
    if code != IOCTL_PLX9X5X_TOGGLE_SINGLE_TRANSFER {
        let _ = request.complete(Err(Error::InvalidDeviceRequest));
        return;
    }
    // WdfRequestRetrieveOutputBuffer(request, sizeof(BOOLEAN), ...).
    let output = match request.output_memory() {
        Some(o) if output_length >= 1 => o,
        _ => {
            let _ = request.complete(Err(Error::BufferTooSmall));
            return;
        }
    };
    let result = {
        let _scope = ext.sync_scope();
        // ORDERING: read under the scope by the I/O callbacks.
        let now = !ext.require_single_transfer.load(Ordering::Relaxed);
        let stored = output.memory().store(0, &[u8::from(now)]);
        if stored.is_ok() {
            ext.require_single_transfer.store(now, Ordering::Relaxed);
        }
        stored
    };
    let information = u64::from(result.is_ok());
    let _ = request.complete_with_information(result, information);
}

// -------------------------------------------------------------------------------------------
// Program DMA (`PLxEvtProgramWriteDma`, `PLxEvtProgramReadDma`)

/// `PLxEvtProgramWriteDma`.
#[doc(alias = "PLxEvtProgramWriteDma")]
pub fn plx_evt_program_write_dma<P: Platform, M: HostBuffer>(
    t: &PlxTransaction<P, M>,
    device: &Device<DeviceExtension<P, M>>,
    _direction: Direction,
    sg: &[SgElement],
) -> bool {
    program_dma(t, device.context(), WRITE, sg)
}

/// `PLxEvtProgramReadDma`.
#[doc(alias = "PLxEvtProgramReadDma")]
pub fn plx_evt_program_read_dma<P: Platform, M: HostBuffer>(
    t: &PlxTransaction<P, M>,
    device: &Device<DeviceExtension<P, M>>,
    _direction: Direction,
    sg: &[SgElement],
) -> bool {
    program_dma(t, device.context(), READ, sg)
}

/// Both program-DMA callbacks: build the descriptor chain, then under the interrupt lock set
/// DMAMODE, INTCSR, DMADPR and DMACSR (Enable | Start), in the sample's order.
fn program_dma<P: Platform, M: HostBuffer>(
    t: &PlxTransaction<P, M>,
    ext: &DeviceExtension<P, M>,
    channel: usize,
    sg: &[SgElement],
) -> bool {
    let depth = PROGRAM_DEPTH.with(|d| {
        d.set(d.get() + 1);
        d.get()
    });
    ext.counters
        .max_program_depth
        .fetch_max(u64::from(depth), Ordering::Relaxed);
    let started = program_chain(t, ext, channel, sg);
    PROGRAM_DEPTH.with(|d| d.set(d.get() - 1));
    started
}

fn program_chain<P: Platform, M: HostBuffer>(
    t: &PlxTransaction<P, M>,
    ext: &DeviceExtension<P, M>,
    channel: usize,
    sg: &[SgElement],
) -> bool {
    bump(&ext.counters.program_calls[channel]);
    let mut offset = t.bytes_transferred();
    let start_offset = offset;
    let common = &ext.common[channel];
    let base = common.aligned_logical_address().get();
    let direction_bit = if channel == READ {
        dpr::DIR_LOCAL_TO_PCI
    } else {
        0
    };
    let mut length = 0u64;
    let mut first_local = None;
    for (i, element) in sg.iter().enumerate() {
        let last = i + 1 == sg.len();
        let address = element.address.get();
        let next = if last {
            dpr::LAST_ELEMENT
        } else {
            // 32 bits: the chain must sit below 4 GiB (the sample's limitation).
            (base + (i as u64 + 1) * Dte::SIZE) as u32 & dpr::ADDRESS_MASK
        };
        let dte = Dte {
            pci_address_low: address as u32,
            local_address: offset as u32,
            transfer_size: element.length,
            desc_ptr: dpr::DESC_LOCATION_PCI | direction_bit | next,
            pci_address_high: (address >> 32) as u32,
        };
        first_local.get_or_insert(dte.local_address);
        offset += u64::from(element.length);
        length += u64::from(element.length);
        // The chain has DTE_COUNT slots and the enabler allows no more elements.
        let _ = common.write(i as u64 * Dte::SIZE, &dte.to_bytes());
    }
    let elements = sg.len() as u64;
    ext.counters
        .sg_elements
        .fetch_add(elements, Ordering::Relaxed);
    ext.counters
        .max_elements
        .fetch_max(elements, Ordering::Relaxed);
    {
        let mut log = lock(&ext.program_log);
        if log.len() == PROGRAM_LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(ProgramRecord {
            direction: direction_of(channel),
            offset: start_offset,
            length,
            elements: sg.len(),
            first_local: first_local.unwrap_or(0),
        });
    }
    let (Some(regs), Some(interrupt)) = (ext.regs(), ext.interrupt()) else {
        // Unreachable: `Plx::start` requires prepared hardware (module documentation).
        return false;
    };
    let Ok(guard) = interrupt.acquire_lock() else {
        // Only after the device's deletion, which cancels its requests.
        return false;
    };
    ext.programming.store(true, Ordering::SeqCst);
    let mut dma_mode = regs.read32(DMA_MODE[channel]);
    dma_mode |= mode::SG_MODE | mode::DONE_INT_ENABLE | mode::INT_TO_PCI;
    if channel == READ || ext.hardened() {
        dma_mode |= mode::CLEAR_COUNT;
    }
    regs.write32(DMA_MODE[channel], dma_mode);
    let int_csr = ext.int_csr_to_write(regs.read32(INTCSR))
        | intcsr::PCI_INT_ENABLE
        | intcsr::DMA_INT_ENABLE[channel];
    regs.write32(INTCSR, int_csr);
    let dpr_value =
        (base as u32 & dpr::ADDRESS_MASK) | dpr::DESC_LOCATION_PCI | dpr::TERM_COUNT_INT;
    regs.write32(DMA_DESC_PTR[channel], dpr_value);
    regs.write8(DMA_CSR[channel], csr::ENABLE | csr::START);
    // Armed under the interrupt lock: the ISR, hence the DPC that disarms, comes after.
    if let Some(timer) = ext.watchdog(channel) {
        lock(&ext.watch)[channel] = Watch {
            armed_at: Some(Instant::now()),
            fired: false,
        };
        let _ = timer.start(ext.config.watchdog);
    }
    ext.programming.store(false, Ordering::SeqCst);
    drop(guard);
    true
}

// -------------------------------------------------------------------------------------------
// Interrupt (`PLxEvtInterruptIsr`, `PLxEvtInterruptDpc`)

/// `PLxEvtInterruptIsr`: for each channel whose active bit is set, save INTCSR's bit and the
/// channel's DMACSR, clear the channel's interrupt, claim. Queue the DPC if claimed and a saved
/// Done bit is set.
#[doc(alias = "PLxEvtInterruptIsr")]
pub fn plx_evt_interrupt_isr<P: Platform, M: HostBuffer>(
    interrupt: &Interrupt<DeviceExtension<P, M>>,
    _message_id: u32,
) -> bool {
    let ext = interrupt.device().context();
    let Some(regs) = ext.regs() else {
        return false;
    };
    if PROGRAM_DEPTH.with(std::cell::Cell::get) > 0 || ext.programming.load(Ordering::SeqCst) {
        bump(&ext.counters.isr_inside_program_dma);
    }
    let int_csr = regs.read32(INTCSR);
    let both = intcsr::DMA_INT_ACTIVE[WRITE] | intcsr::DMA_INT_ACTIVE[READ];
    if int_csr & both == both {
        bump(&ext.counters.isr_both);
    }
    let mut saved = lock(&ext.saved);
    let mut claimed = false;
    for channel in [WRITE, READ] {
        if int_csr & intcsr::DMA_INT_ACTIVE[channel] != 0 {
            saved.int_csr |= intcsr::DMA_INT_ACTIVE[channel];
            let status = regs.read8(DMA_CSR[channel]);
            saved.csr[channel] = status;
            regs.write8(DMA_CSR[channel], status | csr::CLEAR);
            claimed = true;
        }
    }
    if ext.hardened() && claimed {
        saved.int_csr |= int_csr & intcsr::ABORT_BITS;
    }
    let done = saved.csr.iter().any(|s| s & csr::DONE != 0);
    drop(saved);
    if claimed && done {
        let _ = interrupt.queue_dpc();
    }
    claimed
}

/// A request to complete after the synchronization scope is left.
type Finish<M> = (Request<M>, Result<()>, u64);

/// `PLxEvtInterruptDpc`: consume the saved flags under the interrupt lock; report the write
/// transfer (`DmaCompleted`), then the read (`DmaCompletedWithLength`, from the clear-count
/// descriptors); complete a request whose transaction finished (`PLxWriteRequestComplete`,
/// `PLxReadRequestComplete`: release, then complete with the bytes transferred).
#[doc(alias = "PLxEvtInterruptDpc")]
pub fn plx_evt_interrupt_dpc<P: Platform, M: HostBuffer>(
    interrupt: &Interrupt<DeviceExtension<P, M>>,
) {
    let device = interrupt.device();
    let ext = device.context();
    let mut finished: [Option<Finish<M>>; 2] = [None, None];
    {
        let _scope = ext.sync_scope();
        let hardened = ext.hardened();
        let flags = interrupt.synchronize(|| {
            let mut s = lock(&ext.saved);
            let write =
                s.int_csr & intcsr::DMA_INT_ACTIVE[WRITE] != 0 && s.csr[WRITE] & csr::DONE != 0;
            if write {
                s.int_csr &= !intcsr::DMA_INT_ACTIVE[WRITE];
                s.csr[WRITE] = 0;
            }
            let read =
                s.int_csr & intcsr::DMA_INT_ACTIVE[READ] != 0 && s.csr[READ] & csr::DONE != 0;
            if read {
                s.int_csr &= !intcsr::DMA_INT_ACTIVE[READ];
                // The sample clears channel 0's copy here; the hardened port its own.
                s.csr[if hardened { READ } else { WRITE }] = 0;
            }
            let aborts = s.int_csr & intcsr::ABORT_BITS;
            s.int_csr &= !intcsr::ABORT_BITS;
            if aborts != 0
                && let Some(regs) = ext.regs()
            {
                // Write-one-to-clear the abort bits this DPC handles.
                let v = regs.read32(INTCSR) & !intcsr::ABORT_BITS;
                regs.write32(INTCSR, v | aborts);
            }
            (write, read, aborts)
        });
        let Ok((write, read, aborts)) = flags else {
            return;
        };
        if write && read {
            bump(&ext.counters.dpc_both);
        }
        if write {
            finished[WRITE] = dma_done(device, WRITE, aborts);
        }
        if read {
            finished[READ] = dma_done(device, READ, aborts);
        }
    }
    for (request, status, bytes) in finished.into_iter().flatten() {
        let _ = request.complete_with_information(status, bytes);
    }
}

/// Report `channel`'s finished transfer; if its transaction is over, release it and return its
/// request for completion.
fn dma_done<P: Platform, M: HostBuffer>(
    device: &Device<DeviceExtension<P, M>>,
    channel: usize,
    aborts: u32,
) -> Option<Finish<M>> {
    let ext = device.context();
    let t = &ext.transactions[channel];
    if t.state() != State::Transfer {
        // Nothing of ours is running (a Done interrupt with no transfer: nothing to report).
        return None;
    }
    bump(&ext.counters.dma_completed[channel]);
    let (call, status_override) = if ext.hardened() {
        let timed_out = {
            let mut w = lock(&ext.watch);
            let fired = w[channel].fired;
            w[channel] = Watch::default();
            fired
        };
        if let Some(timer) = ext.watchdog(channel) {
            let _ = timer.stop(false);
        }
        let moved = ext.moved_by_clear_count(channel);
        let aborted = aborts & intcsr::WAS_BUS_MASTER[channel] != 0;
        if timed_out {
            (CompletionCall::Final(moved), Some(Error::IoTimeout))
        } else if aborted {
            bump(&ext.counters.aborts_detected);
            (CompletionCall::Final(moved), Some(Error::DeviceDataError))
        } else {
            (CompletionCall::WithLength(moved), None)
        }
    } else if channel == WRITE {
        // The sample assumes the whole transfer moved.
        (CompletionCall::Completed, None)
    } else {
        (
            CompletionCall::WithLength(ext.moved_by_clear_count(channel)),
            None,
        )
    };
    let completion = match call {
        CompletionCall::Completed => t.dma_completed(),
        CompletionCall::WithLength(n) => t.dma_completed_with_length(n),
        CompletionCall::Final(n) => t.dma_completed_final(n),
    };
    {
        let mut log = lock(&ext.completion_log);
        if log.len() == PROGRAM_LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(CompletionRecord {
            direction: direction_of(channel),
            call,
            finished: matches!(completion, Ok(Completion::Finished(_))),
        });
    }
    match completion {
        Ok(Completion::Finished(status)) => {
            let request = if channel == WRITE {
                lock(&ext.write_request).take()
            } else if ext.chains.is_some() {
                lock(&ext.read_request).take()
            } else {
                dmatx_runtime::dma::request_of(t)
            };
            let bytes = t.bytes_transferred();
            let mut status = match status_override {
                Some(e) => Err(e),
                None => status,
            };
            if channel == READ
                && let (Some(chains), Some(request)) = (&ext.chains, &request)
            {
                // The fragmentation build: copy what arrived into the request's buffer.
                status = status.and_then(|()| copy_out(&chains[READ], request, bytes));
            }
            ext.release(channel);
            request.map(|r| (r, status, bytes))
        }
        Ok(Completion::MoreProcessingRequired) | Err(_) => None,
    }
}

/// The fragmentation build's read: the first `bytes` of the chain into the request's buffer.
fn copy_out<M: HostBuffer>(
    chain: &RequestMemory<M>,
    request: &Request<M>,
    bytes: u64,
) -> Result<()> {
    let output = request.output_memory().ok_or(Error::InvalidDeviceRequest)?;
    let mut data = vec![0u8; bytes as usize];
    chain.memory().load(0, &mut data)?;
    output.memory().store(0, &data)
}

// -------------------------------------------------------------------------------------------
// Watchdog (hardened)

/// The watchdog timer: if its channel's transfer has run for the whole watchdog period, abort
/// the channel (DMACSR Abort). The chip ends the chain with Done and its interrupt; the DPC
/// sees the expiry and finishes the transaction with [`Error::IoTimeout`].
fn plx_watchdog<P: Platform, M: HostBuffer>(timer: &Timer<DeviceExtension<P, M>>) {
    let device = timer.device();
    let ext = device.context();
    let Some(channel) = lock(&ext.watchdogs)
        .as_ref()
        .and_then(|timers| timers.iter().position(|t| t.same_timer(timer)))
    else {
        return;
    };
    let _scope = ext.sync_scope();
    {
        let w = lock(&ext.watch);
        // A transfer that finished, or one re-armed after this expiry began, is not ours.
        let expired = w[channel]
            .armed_at
            .is_some_and(|at| at.elapsed() >= ext.config.watchdog);
        if !expired || ext.transactions[channel].state() != State::Transfer {
            return;
        }
    }
    let (Some(regs), Some(interrupt)) = (ext.regs(), ext.interrupt()) else {
        return;
    };
    // Abort only a channel still running whose Done the ISR has not saved: a transfer that
    // finished with its DPC still to come is not a timeout.
    let aborted = interrupt.synchronize(|| {
        let status = regs.read8(DMA_CSR[channel]);
        let saved_done = lock(&ext.saved).csr[channel] & csr::DONE != 0;
        if status & csr::DONE != 0 || saved_done {
            return false;
        }
        regs.write8(DMA_CSR[channel], status | csr::ABORT);
        lock(&ext.watch)[channel].fired = true;
        true
    });
    if aborted == Ok(true) {
        bump(&ext.counters.watchdog_aborts);
    }
}
