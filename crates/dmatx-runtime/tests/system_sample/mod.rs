//! A system-mode sample driver on the runtime: a UART-like device with no DMA engine of its own,
//! whose transmit and receive FIFOs are served by the platform's system DMA controller (a
//! `SystemDuplex` enabler: writes on one channel, reads on another). Reads and writes come
//! through a parallel queue; a few transactions ("slots"), each with its timeout timer, are
//! created at device add and reused, and requests that find no free slot wait in the driver.
//!
//! It follows the seed's request-context pattern (the examples on the
//! `EvtDmaTransactionDmaTransferComplete` and `WdfDmaTransactionStopSystemTransfer` pages):
//! * **A completion reference count** per request: one reference for the transfer, one for
//!   the cancel callback while the request is marked cancelable, one for the timeout timer
//!   while it is queued. Whoever drops the last one completes the request.
//! * **Begin completion** ([`begin_completion`]): the first of the transfer-complete callback,
//!   the timer and the cancel callback to get there sets the request's status; a DMA outcome
//!   (success or a device error) overrides one set earlier.
//! * **Attempt completion** ([`attempt_completion`]): the transfer's path also unmarks the
//!   request and stops the timer, dropping their references when they will never run.
//! * **Timeout and cancel** begin completion with `IoTimeout` / `Cancelled` and, if first, stop
//!   the system transfer; the controller then reports the transfer `Cancelled` and the
//!   transfer-complete callback ends the transaction with a final completion.
//!
//! Where dmatx differs from KMDF, the port follows dmatx and says so:
//! * The final completion after an error or a stop reports the bytes the controller says it
//!   moved (dmatx's [`SystemDmaStatus`] carries them), not 0, so the request's information is
//!   the number of bytes that reached the device.
//! * A completion that finishes with `Cancelled` because a stop landed between transfers keeps
//!   the timeout/cancel status (the seed overwrites it with success).
//! * A stop while the transaction still waits for its channel withdraws it at once
//!   ([`SystemStopOutcome::Withdrawn`]): no transfer-complete callback will come, so the
//!   stopper drops the transfer's reference itself.
//!
//! The transfer-complete callback either reports the transfer at once or (with
//! [`Setup::complete_in_dpc`]) hands it to a DPC that does, as the seed allows.

#![allow(dead_code)]

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use dmatx::hal::{DmaWidth, SystemDmaStatus};
use dmatx::{
    Completion, Direction, DmaDescriptor, DmaDevice, Enabler, EnablerConfig, Error, Profile,
    SgElement, SystemProfileConfig, SystemStopOutcome, Transaction,
};
use dmatx_runtime::dma::initialize_using_request;
use dmatx_runtime::{
    Device, DeviceConfig, Dispatch, Interrupt, InterruptConfig, Queue, QueueConfig, Request,
    RequestHandle, RequestKind, RequestMemory, RequestSpec, Timer, TimerConfig,
};
use dmatx_sim::{
    SimBuffer, SimConfig, SimFifo, SimPlatform, SimSystemDma, SystemCompletion, SystemDmaConfig,
};

/// The transmit FIFO's device address, its channel and request line.
pub const TX_FIFO: u64 = 0x7000_6200;
pub const TX_CHANNEL: u32 = 5;
const TX_LINE: u32 = 0x10;
/// The receive FIFO's device address, its channel and request line.
pub const RX_FIFO: u64 = 0x7000_6300;
pub const RX_CHANNEL: u32 = 6;
const RX_LINE: u32 = 0x11;

pub type Tx = Transaction<SimPlatform, Arc<Io>, RequestMemory<SimBuffer>>;

/// How the sample device is set up.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    /// Transactions (with their timers) created at device add.
    pub slots: usize,
    /// The enabler's maximum transfer length.
    pub maximum_length: u64,
    /// How long a request may take before the timer stops its transfer.
    pub timeout: Duration,
    /// When the controller completes transfers.
    pub mode: SystemCompletion,
    /// Report transfers from a DPC instead of from inside the transfer-complete callback.
    pub complete_in_dpc: bool,
    /// Each FIFO's capacity.
    pub fifo_bytes: usize,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            slots: 2,
            maximum_length: 4096,
            timeout: Duration::from_secs(30),
            mode: SystemCompletion::Manual,
            complete_in_dpc: false,
            fifo_bytes: 1 << 20,
        }
    }
}

/// How the request's completion has begun (guarded by [`Io::begun`]).
#[derive(Debug, Default)]
struct Begun {
    started: bool,
    /// The status to complete with; `None` until someone set one (KMDF's `STATUS_PENDING`).
    status: Option<dmatx::Result<()>>,
}

/// The request context: one request in flight (the execute context of its transaction).
pub struct Io {
    pub device: Device<Driver>,
    pub request: Request<SimBuffer>,
    pub slot: usize,
    /// The completion reference count.
    refs: AtomicU32,
    begun: Mutex<Begun>,
    /// The request was marked cancelable (the cancel callback holds a reference).
    marked: AtomicBool,
    /// The timer was started (it holds a reference until stopped or run).
    timer_started: AtomicBool,
    /// The transfer's reference was dropped (guards against dropping it twice).
    transfer_released: AtomicBool,
}

impl Io {
    fn transaction(&self) -> &Arc<Tx> {
        &self.device.context().slots[self.slot]
    }
}

/// Counters the tests check.
#[derive(Default, Debug)]
pub struct Counters {
    pub transfers: AtomicU64,
    pub bytes_programmed: AtomicU64,
    pub completed_in_callback: AtomicU64,
    pub completed_in_dpc: AtomicU64,
    pub released_in_callback: AtomicU64,
    pub started_from_callback: AtomicU64,
    pub stops_running: AtomicU64,
    pub stops_not_running: AtomicU64,
    pub stops_withdrawn: AtomicU64,
    pub timeouts: AtomicU64,
    pub cancels: AtomicU64,
}

/// Which slots are free, and the requests waiting for one. One lock, so a request never waits
/// while a slot is free.
#[derive(Default)]
struct Schedule {
    free: Vec<usize>,
    waiting: VecDeque<Request<SimBuffer>>,
}

/// The device context.
pub struct Driver {
    pub sim: SimPlatform,
    pub controller: SimSystemDma,
    pub tx: SimFifo,
    pub rx: SimFifo,
    pub dma: DmaDevice<SimPlatform>,
    pub enabler: Enabler<SimPlatform>,
    /// The kept transactions, by slot.
    slots: Vec<Arc<Tx>>,
    /// The request each slot serves (for its timer).
    occupants: Vec<Mutex<Option<Arc<Io>>>>,
    /// Each slot's timeout timer (emptied by the cleanup callback, which breaks the
    /// device → context → timer → device cycle).
    timers: Mutex<Vec<Timer<Driver>>>,
    interrupt: Mutex<Option<Interrupt<Driver>>>,
    schedule: Mutex<Schedule>,
    /// Transfers the transfer-complete callback handed to the DPC.
    deferred: Mutex<VecDeque<(Arc<Io>, SystemDmaStatus)>>,
    timeout: Duration,
    complete_in_dpc: bool,
    pub counters: Counters,
    dropped: Arc<AtomicBool>,
}

/// The sample device.
pub struct Sample {
    pub device: Device<Driver>,
    pub queue: Queue<Driver, SimBuffer>,
    dropped: Arc<AtomicBool>,
}

fn fifo_config(address: u64, channel: u32, request_line: u32) -> SystemProfileConfig {
    SystemProfileConfig::new(
        address,
        DmaWidth::Bits8,
        DmaDescriptor {
            channel,
            request_line,
        },
    )
}

impl Sample {
    /// Device add, prepare hardware (configure both directions) and power-up.
    pub fn new(setup: Setup) -> Self {
        let sim = SimConfig::new()
            .system_dma(
                SystemDmaConfig::new()
                    .channel(TX_CHANNEL, TX_LINE)
                    .channel(RX_CHANNEL, RX_LINE)
                    .map_registers(4)
                    .mode(setup.mode),
            )
            .build()
            .expect("sim");
        let controller = sim.system_dma().expect("a system DMA controller");
        let tx = sim.add_fifo(TX_FIFO, setup.fifo_bytes).expect("tx fifo");
        let rx = sim.add_fifo(RX_FIFO, setup.fifo_bytes).expect("rx fifo");
        let dma = DmaDevice::new(sim.clone());
        let enabler = Enabler::create(
            &dma,
            EnablerConfig::new(Profile::SystemDuplex, setup.maximum_length),
        )
        .expect("enabler");
        enabler
            .configure_system_profile(
                fifo_config(TX_FIFO, TX_CHANNEL, TX_LINE),
                Direction::WriteToDevice,
            )
            .expect("configure the transmit channel");
        enabler
            .configure_system_profile(
                fifo_config(RX_FIFO, RX_CHANNEL, RX_LINE),
                Direction::ReadFromDevice,
            )
            .expect("configure the receive channel");
        let slots: Vec<Arc<Tx>> = (0..setup.slots)
            .map(|_| {
                let t = Tx::create(&enabler).expect("transaction at device add");
                // Set once: the callback survives release (statement 79).
                t.set_transfer_complete_callback(Some(on_transfer_complete))
                    .expect("system transaction");
                t
            })
            .collect();
        let dropped = Arc::new(AtomicBool::new(false));
        let driver = Driver {
            sim,
            controller,
            tx,
            rx,
            dma: dma.clone(),
            enabler,
            slots,
            occupants: (0..setup.slots).map(|_| Mutex::new(None)).collect(),
            timers: Mutex::new(Vec::new()),
            interrupt: Mutex::new(None),
            schedule: Mutex::new(Schedule {
                free: (0..setup.slots).rev().collect(),
                waiting: VecDeque::new(),
            }),
            deferred: Mutex::new(VecDeque::new()),
            timeout: setup.timeout,
            complete_in_dpc: setup.complete_in_dpc,
            counters: Counters::default(),
            dropped: Arc::clone(&dropped),
        };
        let device = Device::with_config(driver, DeviceConfig::default().with_verifier(true));
        device.attach_dma(&dma).expect("attach");
        let timers = (0..setup.slots)
            .map(|_| {
                Timer::create(
                    &device,
                    TimerConfig {
                        callback: on_timeout,
                    },
                )
                .expect("timer")
            })
            .collect();
        *device.context().timers.lock().unwrap() = timers;
        let interrupt = Interrupt::create(
            &device,
            InterruptConfig {
                isr: |_, _| false,
                dpc: Some(dpc),
            },
        )
        .expect("interrupt");
        *device.context().interrupt.lock().unwrap() = Some(interrupt);
        device.set_cleanup_callback(cleanup).expect("cleanup");
        let mut qc = QueueConfig::new(Dispatch::Parallel);
        qc.read = Some(on_io);
        qc.write = Some(on_io);
        let queue = Queue::create(&device, qc).expect("queue");
        device.power_up().expect("power up");
        Self {
            device,
            queue,
            dropped,
        }
    }

    pub fn driver(&self) -> &Driver {
        self.device.context()
    }

    /// Submit a write of `data`, from a buffer starting `page_offset` bytes into its page.
    pub fn write(&self, data: &[u8], page_offset: u64) -> RequestHandle<SimBuffer> {
        let mut buffer = self
            .driver()
            .sim
            .allocate_buffer(data.len() as u64, page_offset)
            .expect("sim memory");
        buffer.write(0, data).unwrap();
        self.queue
            .submit(RequestSpec::write(buffer))
            .expect("submit")
    }

    /// Submit a read of `length` bytes into a buffer filled with 0xEE.
    pub fn read(&self, length: u64, page_offset: u64) -> RequestHandle<SimBuffer> {
        let mut buffer = self
            .driver()
            .sim
            .allocate_buffer(length, page_offset)
            .expect("sim memory");
        buffer.fill(0xEE);
        self.queue
            .submit(RequestSpec::read(buffer))
            .expect("submit")
    }

    /// Let the controller run freely on a thread (as hardware would) until the pump is
    /// stopped.
    pub fn pump(&self) -> Pump {
        let controller = self.driver().controller.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Acquire) {
                if controller.run_pending() == 0 {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        });
        Pump {
            stop,
            thread: Some(thread),
        }
    }

    pub fn wait_dpcs(&self) {
        let interrupt = self.driver().interrupt.lock().unwrap().clone().unwrap();
        assert!(
            interrupt.wait_dpc_idle(Duration::from_secs(10)),
            "DPCs idle"
        );
    }

    /// One of the driver's counters, now.
    pub fn count(&self, pick: impl Fn(&Counters) -> &AtomicU64) -> u64 {
        pick(&self.driver().counters).load(Ordering::Relaxed)
    }

    /// Requests the driver holds.
    pub fn in_flight(&self) -> usize {
        IN_FLIGHT
            .lock()
            .unwrap()
            .values()
            .filter(|io| io.device.same_device(&self.device))
            .count()
    }

    /// Check every request is done and every slot free, power down, delete the device, and
    /// check the platform is back to rest.
    pub fn shut_down(self) {
        let sim = self.driver().sim.clone();
        assert_eq!(self.in_flight(), 0, "every request completed");
        {
            let schedule = self.driver().schedule.lock().unwrap();
            assert!(schedule.waiting.is_empty(), "no request left waiting");
            assert_eq!(schedule.free.len(), self.driver().slots.len(), "slots free");
        }
        for timer in self.driver().timers.lock().unwrap().iter() {
            assert_eq!(timer.callback_panics(), 0, "a timer callback panicked");
        }
        let interrupt = self.driver().interrupt.lock().unwrap().clone().unwrap();
        assert_eq!(interrupt.stats().dpc_panics, 0, "the DPC panicked");
        drop(interrupt);
        for channel in [TX_CHANNEL, RX_CHANNEL] {
            assert!(
                !self.driver().controller.channel_owned(channel),
                "channel {channel} released"
            );
        }
        self.device.power_down().expect("power down");
        self.device.delete().expect("delete");
        let dropped = Arc::clone(&self.dropped);
        drop(self.queue);
        drop(self.device);
        assert!(
            dropped.load(Ordering::Acquire),
            "the device context was freed"
        );
        if let Err(e) = sim.check_clean() {
            panic!("platform not clean: {e}");
        }
    }
}

/// A running controller thread; stopped (and joined) on drop.
pub struct Pump {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().expect("the controller thread");
        }
    }
}

fn cleanup(device: &Device<Driver>) {
    device.context().timers.lock().unwrap().clear();
    drop(device.context().interrupt.lock().unwrap().take());
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::Release);
    }
}

/// Requests the sample holds, by request id: the cancel callback is given only the request.
static IN_FLIGHT: LazyLock<Mutex<HashMap<u64, Arc<Io>>>> = LazyLock::new(Mutex::default);

thread_local! {
    /// Set while this thread runs the transfer-complete callback.
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

// -------------------------------------------------------------------------------------------
// I/O dispatch

/// `EvtIoRead` / `EvtIoWrite`: start the request on a free slot, or keep it until one frees.
fn on_io(queue: &Queue<Driver, SimBuffer>, request: Request<SimBuffer>, _length: u64) {
    let d = queue.device().context();
    let slot = {
        let mut schedule = d.schedule.lock().unwrap();
        let slot = schedule.free.pop();
        if slot.is_none() {
            schedule.waiting.push_back(request.clone());
        }
        slot
    };
    if let Some(slot) = slot {
        d.run_slot(queue.device(), slot, request);
    }
}

impl Driver {
    /// Start `request` on `slot`; while requests fail to start (and so complete at once),
    /// start the next waiting one; free the slot when none is left.
    fn run_slot(&self, device: &Device<Driver>, slot: usize, first: Request<SimBuffer>) {
        let mut request = first;
        loop {
            if self.start(device, slot, request) {
                return;
            }
            match self.next_waiting(slot) {
                Some(next) => request = next,
                None => return,
            }
        }
    }

    /// The next waiting request for `slot`, or `None` after returning the slot to the free list.
    fn next_waiting(&self, slot: usize) -> Option<Request<SimBuffer>> {
        let mut schedule = self.schedule.lock().unwrap();
        let next = schedule.waiting.pop_front();
        if next.is_none() {
            schedule.free.push(slot);
        }
        next
    }

    /// Initialize the slot's transaction from `request`, mark it cancelable, start the timer
    /// and execute. Returns false if the request was completed here (the slot is unused).
    fn start(&self, device: &Device<Driver>, slot: usize, request: Request<SimBuffer>) -> bool {
        let t = &self.slots[slot];
        let direction = match request.kind() {
            RequestKind::Write => Direction::WriteToDevice,
            _ => Direction::ReadFromDevice,
        };
        if let Err(e) = initialize_using_request(t, &request, program_dma, direction) {
            request
                .complete(Err(e))
                .expect("complete a refused request");
            return false;
        }
        let io = Arc::new(Io {
            device: device.clone(),
            request: request.clone(),
            slot,
            refs: AtomicU32::new(1),
            begun: Mutex::new(Begun::default()),
            marked: AtomicBool::new(false),
            timer_started: AtomicBool::new(false),
            transfer_released: AtomicBool::new(false),
        });
        IN_FLIGHT
            .lock()
            .unwrap()
            .insert(request.id(), Arc::clone(&io));
        *self.occupants[slot].lock().unwrap() = Some(Arc::clone(&io));
        // The cancel callback's reference exists before it can run.
        io.refs.fetch_add(1, Ordering::AcqRel);
        if request.mark_cancelable(on_cancel).is_ok() {
            io.marked.store(true, Ordering::Release);
        } else {
            // Cancelled while it waited: do not start; complete it here, and the caller's loop
            // takes the next waiting request (no recursion through `complete_request`).
            IN_FLIGHT.lock().unwrap().remove(&request.id());
            *self.occupants[slot].lock().unwrap() = None;
            drop(t.release().expect("release an initialized transaction"));
            request
                .complete(Err(Error::Cancelled))
                .expect("complete a cancelled request");
            return false;
        }
        io.refs.fetch_add(1, Ordering::AcqRel);
        io.timer_started.store(true, Ordering::Release);
        let timer = self.timer(slot);
        if timer.start(self.timeout).is_err() {
            io.timer_started.store(false, Ordering::Release);
            io.refs.fetch_sub(1, Ordering::AcqRel);
        }
        if let Err(e) = t.execute(Arc::clone(&io)) {
            begin_completion(&io, Some(Err(e)), true);
            attempt_completion(&io, true);
        }
        true
    }

    fn timer(&self, slot: usize) -> Timer<Driver> {
        self.timers.lock().unwrap()[slot].clone()
    }
}

/// Program-DMA: the controller was programmed by the platform; the device only needs its
/// request line enabled, which the simulated FIFO always has.
fn program_dma(_: &Tx, io: &Arc<Io>, _: Direction, sg: &[SgElement]) -> bool {
    let c = &io.device.context().counters;
    c.transfers.fetch_add(1, Ordering::Relaxed);
    let bytes: u64 = sg.iter().map(|e| u64::from(e.length)).sum();
    c.bytes_programmed.fetch_add(bytes, Ordering::Relaxed);
    true
}

// -------------------------------------------------------------------------------------------
// Completion

/// `EvtDmaTransactionDmaTransferComplete`.
fn on_transfer_complete(t: &Tx, io: &Arc<Io>, _: Direction, status: SystemDmaStatus) {
    let d = io.device.context();
    if d.complete_in_dpc {
        d.deferred
            .lock()
            .unwrap()
            .push_back((Arc::clone(io), status));
        let interrupt = d.interrupt.lock().unwrap().clone().expect("interrupt");
        interrupt.queue_dpc().expect("queue the DPC");
        return;
    }
    IN_CALLBACK.with(|c| c.set(true));
    d.counters
        .completed_in_callback
        .fetch_add(1, Ordering::Relaxed);
    transfer_done(t, io, status);
    IN_CALLBACK.with(|c| c.set(false));
}

/// The DPC: report the transfers the callback handed over.
fn dpc(interrupt: &Interrupt<Driver>) {
    let d = interrupt.device().context();
    loop {
        let Some((io, status)) = d.deferred.lock().unwrap().pop_front() else {
            return;
        };
        d.counters.completed_in_dpc.fetch_add(1, Ordering::Relaxed);
        let t = Arc::clone(io.transaction());
        transfer_done(&t, &io, status);
    }
}

/// Report one finished transfer to the framework; if the transaction is over, begin the
/// request's completion with the DMA outcome.
fn transfer_done(t: &Tx, io: &Arc<Io>, status: SystemDmaStatus) {
    let (outcome, force) = match status {
        SystemDmaStatus::Complete => match t.dma_completed().expect("report a transfer") {
            // More transfers to come: the transaction may already be finishing elsewhere;
            // touch nothing.
            Completion::MoreProcessingRequired => return,
            // Finished; `Cancelled` if a stop landed between transfers, which keeps the
            // timeout/cancel status set by whoever stopped it.
            Completion::Finished(result) => {
                let force = result.is_ok();
                (Some(result), force)
            }
        },
        SystemDmaStatus::Error { moved } => {
            let answer = t.dma_completed_final(moved).expect("final completion");
            assert!(answer.is_finished());
            (Some(Err(Error::DeviceDataError)), true)
        }
        SystemDmaStatus::Cancelled { moved } => {
            // Only a stop cancels a transfer, and the stopper has set the status.
            let answer = t.dma_completed_final(moved).expect("final completion");
            assert!(answer.is_finished());
            (None, false)
        }
    };
    begin_completion(io, outcome, force);
    io.request
        .set_information(t.bytes_transferred())
        .expect("information");
    attempt_completion(io, true);
}

/// `BeginCompletion`: mark the start of completion; the first caller's status (or a forced
/// one) is the request's. Returns whether this caller was first.
fn begin_completion(io: &Io, status: Option<dmatx::Result<()>>, force: bool) -> bool {
    let mut begun = io.begun.lock().unwrap();
    let first = !begun.started;
    begun.started = true;
    if (first || force) && status.is_some() {
        begun.status = status;
    }
    first
}

/// `AttemptRequestCompletion`: drop a reference (the transfer's, if `transfer_done`, which
/// also drops the cancel callback's and the timer's when they will never run); the last one
/// completes the request.
fn attempt_completion(io: &Arc<Io>, transfer_done: bool) {
    let d = io.device.context();
    if transfer_done {
        if io.transfer_released.swap(true, Ordering::AcqRel) {
            // Already dropped: an error from `execute` that belonged to the staging of the
            // next request on this slot (see DESIGN.md, open questions) must not drop it again.
            return;
        }
        if io.marked.load(Ordering::Acquire) && io.request.unmark_cancelable().is_ok() {
            let before = io.refs.fetch_sub(1, Ordering::AcqRel);
            assert!(before > 1, "the transfer's reference is still held");
        }
        if io.timer_started.load(Ordering::Acquire) && d.timer(io.slot).stop(false) == Ok(true) {
            let before = io.refs.fetch_sub(1, Ordering::AcqRel);
            assert!(before > 1, "the transfer's reference is still held");
        }
    }
    if io.refs.fetch_sub(1, Ordering::AcqRel) == 1 {
        complete_request(io);
    }
}

/// The last reference is gone: release the transaction, complete the request, and give the
/// slot to the next waiting request.
fn complete_request(io: &Arc<Io>) {
    let d = io.device.context();
    let status = io
        .begun
        .lock()
        .unwrap()
        .status
        .take()
        .expect("completion began with a status");
    let memory = io.transaction().release().expect("release");
    drop(memory);
    let in_callback = IN_CALLBACK.with(Cell::get);
    if in_callback {
        d.counters
            .released_in_callback
            .fetch_add(1, Ordering::Relaxed);
    }
    IN_FLIGHT.lock().unwrap().remove(&io.request.id());
    *d.occupants[io.slot].lock().unwrap() = None;
    io.request.complete(status).expect("complete once");
    if let Some(next) = d.next_waiting(io.slot) {
        if in_callback {
            d.counters
                .started_from_callback
                .fetch_add(1, Ordering::Relaxed);
        }
        d.run_slot(&io.device, io.slot, next);
    }
}

// -------------------------------------------------------------------------------------------
// Timeout and cancel

/// The timeout timer (`EvtTimerFunc`): stop the transfer if first to begin completion.
fn on_timeout(timer: &Timer<Driver>) {
    let d = timer.device().context();
    let slot = d
        .timers
        .lock()
        .unwrap()
        .iter()
        .position(|t| t.same_timer(timer))
        .expect("a slot's timer");
    // The timer's reference keeps the request in its slot.
    let io = d.occupants[slot]
        .lock()
        .unwrap()
        .clone()
        .expect("the slot's request");
    d.counters.timeouts.fetch_add(1, Ordering::Relaxed);
    if begin_completion(&io, Some(Err(Error::IoTimeout)), false) {
        stop(&io);
    }
    attempt_completion(&io, false);
}

/// `EvtRequestCancel`: stop the transfer if first to begin completion.
fn on_cancel(request: &Request<SimBuffer>) {
    let io = IN_FLIGHT
        .lock()
        .unwrap()
        .get(&request.id())
        .cloned()
        .expect("the cancel callback's reference keeps the request");
    io.device
        .context()
        .counters
        .cancels
        .fetch_add(1, Ordering::Relaxed);
    if begin_completion(&io, Some(Err(Error::Cancelled)), false) {
        stop(&io);
    }
    attempt_completion(&io, false);
}

/// `WdfDmaTransactionStopSystemTransfer`, and the one outcome KMDF does not have.
fn stop(io: &Arc<Io>) {
    let c = &io.device.context().counters;
    match io.transaction().stop_system_transfer() {
        Ok(SystemStopOutcome::Stopping) => {
            c.stops_running.fetch_add(1, Ordering::Relaxed);
        }
        Ok(SystemStopOutcome::NotRunning) => {
            c.stops_not_running.fetch_add(1, Ordering::Relaxed);
        }
        Ok(SystemStopOutcome::Withdrawn) => {
            // The transaction is over without a transfer: no callback will drop the
            // transfer's reference.
            c.stops_withdrawn.fetch_add(1, Ordering::Relaxed);
            io.request.set_information(0).expect("information");
            attempt_completion(io, true);
        }
        Err(e) => panic!("stop system transfer: {e}"),
    }
}
