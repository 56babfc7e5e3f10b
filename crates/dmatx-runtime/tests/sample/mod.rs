//! A sample driver on the runtime, for the cancel, low-memory and stress tests: a packet or
//! scatter/gather bus-master device (the simulator's `SimDmaDevice`) with storage, driven by
//! two IOCTLs that carry the device offset in their input buffer and the data in their output
//! buffer (`METHOD_IN_DIRECT` writes the output buffer to the device, `METHOD_OUT_DIRECT` reads
//! the device into it) — the usual WDF shape for "read/write at an offset".
//!
//! It follows the seed techniques:
//! * **Cancel** ("Canceling DMA transactions"): the handler initializes from the request,
//!   marks it cancelable and executes. The cancel callback calls the transaction's cancel; if
//!   that withdraws a queued start, the callback completes the request. Program-DMA unmarks the
//!   request the first time it runs; if the cancel callback has run or will run, it finishes
//!   the transaction with a final completion of 0 bytes and the request completes cancelled.
//!   Between transfers the DPC looks at `is_cancelled` and finishes early.
//! * **Exactly one completion**: a per-request `done` flag, taken under the request's own lock
//!   by whoever completes it. The cancel callback touches the transaction only under that lock
//!   and only while the request is not done, and the transaction is released (and perhaps
//!   reused) only after `done` is set — so a late cancel callback can never cancel another
//!   request's transaction.
//! * **Reuse under low memory** ("Reusing DMA Transaction Objects"): a few transactions are
//!   created at device add and kept. Each request tries to create a fresh transaction; when
//!   creation fails with `InsufficientResources` it takes a kept one, and a kept one is
//!   released (not deleted) and put back when its request is done.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex};
use std::time::Duration;

use dmatx::{
    Completion, Direction, DmaDevice, DmaVersion, Enabler, EnablerConfig, Error, Profile,
    SgElement, Transaction,
};
use dmatx_runtime::dma::initialize_using_request;
use dmatx_runtime::{
    Device, DeviceConfig, Dispatch, Interrupt, InterruptConfig, IoctlCode, Queue, QueueConfig,
    Request, RequestHandle, RequestMemory, RequestSpec, TransferMethod,
};
use dmatx_sim::{
    CompletionMode, DeviceCompletion, DeviceFault, SimBuffer, SimDmaDevice, SimPlatform,
};

/// `IOCTL_SAMPLE_WRITE_AT`: input = the device offset (8 bytes, little endian), output = data.
pub const WRITE_AT: IoctlCode = IoctlCode::new(0x8000, 0x801, TransferMethod::InDirect, 0);
/// `IOCTL_SAMPLE_READ_AT`: input = the device offset, output = the buffer to fill.
pub const READ_AT: IoctlCode = IoctlCode::new(0x8000, 0x802, TransferMethod::OutDirect, 0);

pub type Tx = Transaction<SimPlatform, Arc<Io>, RequestMemory<SimBuffer>>;

/// How the sample device is set up.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    pub profile: Profile,
    /// The device's maximum transfer length.
    pub maximum_length: u64,
    /// Map registers per adapter.
    pub map_registers: u32,
    pub storage_bytes: usize,
    pub mode: CompletionMode,
    /// Transactions created at device add and kept for reuse.
    pub kept: usize,
    /// Share of transfers the device completes short (0..=1), and the seed of that choice.
    pub partial_rate: f64,
    pub seed: u64,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            profile: Profile::ScatterGather64,
            maximum_length: 16 * 1024,
            map_registers: 8,
            storage_bytes: 1 << 20,
            mode: CompletionMode::Manual,
            kept: 0,
            partial_rate: 0.0,
            seed: 1,
        }
    }
}

/// One request in flight (the execute context handed to every program-DMA call).
pub struct Io {
    pub device: Device<Driver>,
    pub request: Request<SimBuffer>,
    pub transaction: Arc<Tx>,
    /// Taken from the kept pool (put back when done) rather than created for this request.
    pub kept: bool,
    pub device_offset: u64,
    /// Set, under this lock, by whoever completes the request.
    done: Mutex<bool>,
    /// Program-DMA has unmarked the request (first transfer programmed).
    unmarked: Mutex<bool>,
}

/// Counters the tests check.
#[derive(Default, Debug)]
pub struct Counters {
    pub created: AtomicU64,
    pub creation_failures: AtomicU64,
    pub from_pool: AtomicU64,
    pub cancelled_while_queued: AtomicU64,
    pub cancelled_in_program_dma: AtomicU64,
    pub cancelled_between_transfers: AtomicU64,
    pub transfers: AtomicU64,
    pub partials: AtomicU64,
}

/// The device context.
pub struct Driver {
    pub sim: SimPlatform,
    pub dma: DmaDevice<SimPlatform>,
    pub enabler: Enabler<SimPlatform>,
    pub hw: SimDmaDevice,
    /// Emptied by the cleanup callback, which breaks the device → context → interrupt →
    /// device cycle.
    pub interrupt: Mutex<Option<Interrupt<Driver>>>,
    /// Set when the context is freed.
    dropped: Arc<AtomicBool>,
    pub counters: Counters,
    kept: Mutex<Vec<Arc<Tx>>>,
    kept_returned: Condvar,
    /// Started transfers by the device's transfer number. Held while starting one, so the DPC
    /// never sees a completion before its transfer is recorded.
    by_transfer: Mutex<HashMap<u64, Arc<Io>>>,
    completions: Mutex<VecDeque<DeviceCompletion>>,
    partial_rate: f64,
    rng: Mutex<u64>,
}

/// The sample device: the runtime device, its queue, and the platform.
pub struct Sample {
    pub device: Device<Driver>,
    pub queue: Queue<Driver, SimBuffer>,
    dropped: Arc<AtomicBool>,
}

impl Sample {
    /// Device add and power-up: enabler, kept transactions, interrupt, queue.
    pub fn new(setup: Setup) -> Self {
        let sim = dmatx_sim::SimConfig::new()
            .memory(1 << 20, 16 << 20)
            .map_registers(setup.map_registers)
            .build()
            .expect("sim");
        let dma = DmaDevice::new(sim.clone());
        let config =
            EnablerConfig::new(setup.profile, setup.maximum_length).with_version(DmaVersion::V3);
        let enabler = Enabler::create(&dma, config).expect("enabler");
        let adapter = enabler.adapter(Direction::ReadFromDevice).unwrap().clone();
        let hw = SimDmaDevice::new(
            &adapter,
            dmatx_sim::DeviceConfig::default()
                .storage_bytes(setup.storage_bytes)
                .mode(setup.mode),
        );
        let kept: Vec<_> = (0..setup.kept)
            .map(|_| Tx::create(&enabler).expect("kept transaction at device add"))
            .collect();
        let dropped = Arc::new(AtomicBool::new(false));
        let driver = Driver {
            sim,
            dma: dma.clone(),
            enabler,
            hw: hw.clone(),
            interrupt: Mutex::new(None),
            dropped: Arc::clone(&dropped),
            counters: Counters::default(),
            kept: Mutex::new(kept),
            kept_returned: Condvar::new(),
            by_transfer: Mutex::new(HashMap::new()),
            completions: Mutex::new(VecDeque::new()),
            partial_rate: setup.partial_rate,
            rng: Mutex::new(setup.seed | 1),
        };
        let device = Device::with_config(
            driver,
            DeviceConfig {
                verifier: Some(true),
            },
        );
        device.attach_dma(&dma).expect("attach");
        let interrupt = Interrupt::create(
            &device,
            InterruptConfig {
                isr,
                dpc: Some(dpc),
            },
        )
        .expect("interrupt");
        let raiser = interrupt.clone();
        *device.context().interrupt.lock().unwrap() = Some(interrupt);
        device.set_cleanup_callback(cleanup).expect("cleanup");
        // The device "raises its line" for each completed transfer.
        let ctx_device = device.clone();
        hw.set_completion_handler(move |c| {
            ctx_device
                .context()
                .completions
                .lock()
                .unwrap()
                .push_back(c);
            raiser.raise(0).expect("raise");
        });
        let mut qc = QueueConfig::new(Dispatch::Parallel);
        qc.device_control = Some(on_ioctl);
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

    /// Submit a write of `data` at `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> RequestHandle<SimBuffer> {
        let d = self.driver();
        let mut buffer = d
            .sim
            .allocate_buffer(data.len() as u64, offset % 4096)
            .unwrap();
        buffer.write(0, data).unwrap();
        self.queue
            .submit(RequestSpec::device_control(
                WRITE_AT,
                Some(offset_buffer(&d.sim, offset)),
                Some(buffer),
            ))
            .expect("submit")
    }

    /// Submit a read of `length` bytes at `offset`.
    pub fn read_at(&self, offset: u64, length: u64) -> RequestHandle<SimBuffer> {
        let d = self.driver();
        let mut buffer = d.sim.allocate_buffer(length, (offset * 7) % 4096).unwrap();
        buffer.fill(0xEE);
        self.queue
            .submit(RequestSpec::device_control(
                READ_AT,
                Some(offset_buffer(&d.sim, offset)),
                Some(buffer),
            ))
            .expect("submit")
    }

    /// Complete every transfer the device holds (Manual / Deferred modes), letting DPCs run.
    pub fn run_device(&self) -> usize {
        let n = self.driver().hw.run_pending();
        self.wait_dpcs();
        n
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

    /// Kept transactions currently in the pool.
    pub fn kept_available(&self) -> usize {
        self.driver().kept.lock().unwrap().len()
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

    /// Power down, delete the device, and check the platform is back to rest.
    pub fn shut_down(self) {
        let sim = self.driver().sim.clone();
        assert_eq!(self.in_flight(), 0, "every request completed");
        self.driver().hw.clear_completion_handler();
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

/// The cleanup callback: drop the interrupt the context keeps.
fn cleanup(device: &Device<Driver>) {
    drop(device.context().interrupt.lock().unwrap().take());
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::Release);
    }
}

fn offset_buffer(sim: &SimPlatform, offset: u64) -> SimBuffer {
    let mut b = sim.allocate_buffer(8, 0).unwrap();
    b.write(0, &offset.to_le_bytes()).unwrap();
    b
}

impl Driver {
    /// A transaction for one request: a fresh one if creation succeeds, else a kept one
    /// (waiting for one to come back if all are in use).
    fn transaction(&self, device: &Device<Driver>) -> (Arc<Tx>, bool) {
        match dmatx_runtime::dma::create_transaction(device, &self.enabler) {
            Ok(t) => {
                self.counters.created.fetch_add(1, Ordering::Relaxed);
                return (t, false);
            }
            Err(Error::InsufficientResources) => {
                self.counters
                    .creation_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => panic!("transaction create: {e}"),
        }
        let mut kept = self.kept.lock().unwrap();
        loop {
            if let Some(t) = kept.pop() {
                self.counters.from_pool.fetch_add(1, Ordering::Relaxed);
                return (t, true);
            }
            kept = self
                .kept_returned
                .wait_timeout(kept, Duration::from_secs(10))
                .unwrap()
                .0;
        }
    }

    fn give_back(&self, t: Arc<Tx>, kept: bool) {
        if kept {
            self.kept.lock().unwrap().push(t);
            self.kept_returned.notify_one();
        }
    }

    fn next_random(&self) -> u64 {
        let mut x = self.rng.lock().unwrap();
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// Complete `io`'s request once: release the transaction (putting a kept one back) and
    /// complete with `status` and the bytes transferred. Later calls do nothing.
    fn finish(&self, io: &Arc<Io>, status: dmatx::Result<()>) {
        let mut done = io.done.lock().unwrap();
        if *done {
            return;
        }
        *done = true;
        self.finish_locked(io, status);
        drop(done);
    }

    fn finish_locked(&self, io: &Arc<Io>, status: dmatx::Result<()>) {
        let t = &io.transaction;
        let information = t.bytes_transferred();
        let memory = t.release().expect("release a finished transaction");
        drop(memory);
        IN_FLIGHT.lock().unwrap().remove(&io.request.id());
        self.give_back(Arc::clone(t), io.kept);
        io.request
            .complete_with_information(status, information)
            .expect("complete once");
    }
}

fn on_ioctl(
    queue: &Queue<Driver, SimBuffer>,
    request: Request<SimBuffer>,
    _output_length: u64,
    _input_length: u64,
    code: IoctlCode,
) {
    let d = queue.device().context();
    let direction = match code {
        WRITE_AT => Direction::WriteToDevice,
        READ_AT => Direction::ReadFromDevice,
        _ => {
            request.complete(Err(Error::InvalidDeviceRequest)).unwrap();
            return;
        }
    };
    let mut raw = [0; 8];
    let read = request.input_memory().map(|m| m.memory().read(0, &mut raw));
    if !matches!(read, Some(Ok(()))) {
        request.complete(Err(Error::InvalidParameter)).unwrap();
        return;
    }
    let device_offset = u64::from_le_bytes(raw);
    let (transaction, kept) = d.transaction(queue.device());
    if let Err(e) = initialize_using_request(&transaction, &request, program_dma, direction) {
        d.give_back(transaction, kept);
        request.complete(Err(e)).unwrap();
        return;
    }
    let io = Arc::new(Io {
        device: queue.device().clone(),
        request: request.clone(),
        transaction: Arc::clone(&transaction),
        kept,
        device_offset,
        done: Mutex::new(false),
        unmarked: Mutex::new(false),
    });
    IN_FLIGHT
        .lock()
        .unwrap()
        .insert(request.id(), Arc::clone(&io));
    if request.mark_cancelable(on_cancel).is_err() {
        // Cancelled before we could mark it: nothing started, complete it here.
        d.finish(&io, Err(Error::Cancelled));
        return;
    }
    let hook = *EXECUTE_HOOK.lock().unwrap();
    if let Some(hook) = hook {
        hook(request.id());
    }
    if let Err(e) = transaction.execute(Arc::clone(&io)) {
        // Could not start. If the cancel callback claimed the request meanwhile it finds it
        // done and leaves it alone.
        let _ = request.unmark_cancelable();
        d.finish(&io, Err(e));
    }
}

/// Requests the sample drivers hold, by request id (ids are unique in the process). The cancel
/// callback is given only the request and finds its I/O here (a WDF driver would reach its
/// device through `WdfRequestGetIoQueue` and keep the I/O in the request's context).
static IN_FLIGHT: LazyLock<Mutex<HashMap<u64, Arc<Io>>>> = LazyLock::new(Mutex::default);

/// The cancel callback (`EvtRequestCancel`): withdraw a queued start if there is one.
fn on_cancel(request: &Request<SimBuffer>) {
    let io = IN_FLIGHT.lock().unwrap().get(&request.id()).cloned();
    let Some(io) = io else { return };
    let d = io.device.context();
    let mut done = io.done.lock().unwrap();
    if *done {
        return;
    }
    if io.transaction.cancel() == Ok(true) {
        d.counters
            .cancelled_while_queued
            .fetch_add(1, Ordering::Relaxed);
        *done = true;
        d.finish_locked(&io, Err(Error::Cancelled));
    }
    // Otherwise program-DMA has run or will run, finds the request cancelled, and finishes.
    drop(done);
}

/// A test hook run in the handler between marking the request cancelable and executing.
pub static EXECUTE_HOOK: Mutex<Option<fn(u64)>> = Mutex::new(None);

/// A test hook run at the start of every program-DMA call, with the request's id.
pub static PROGRAM_HOOK: Mutex<Option<fn(u64)>> = Mutex::new(None);

fn program_dma(t: &Tx, io: &Arc<Io>, direction: Direction, sg: &[SgElement]) -> bool {
    let d = io.device.context();
    let hook = *PROGRAM_HOOK.lock().unwrap();
    if let Some(hook) = hook {
        hook(io.request.id());
    }
    let first = !std::mem::replace(&mut *io.unmarked.lock().unwrap(), true);
    if first && io.request.unmark_cancelable() == Err(Error::Cancelled) {
        // The cancel callback has run or will run: abort before the device sees anything.
        d.counters
            .cancelled_in_program_dma
            .fetch_add(1, Ordering::Relaxed);
        match t.dma_completed_final(0) {
            Ok(Completion::Finished(_)) => d.finish(io, Err(Error::Cancelled)),
            other => panic!("final completion inside program-DMA: {other:?}"),
        }
        return true;
    }
    let mut by_transfer = d.by_transfer.lock().unwrap();
    let number = d.hw.stats().transfers_started;
    if d.partial_rate > 0.0 {
        let draw = d.next_random();
        #[allow(clippy::cast_precision_loss)]
        if (draw % 1_000_000) as f64 / 1_000_000.0 < d.partial_rate {
            let length = t.current_transfer_length();
            d.hw.inject(number, DeviceFault::Partial(draw % length.max(1)));
            d.counters.partials.fetch_add(1, Ordering::Relaxed);
        }
    }
    by_transfer.insert(number, Arc::clone(io));
    d.counters.transfers.fetch_add(1, Ordering::Relaxed);
    let started =
        d.hw.start(direction, sg, io.device_offset + t.bytes_transferred());
    assert_eq!(started, number);
    drop(by_transfer);
    true
}

fn isr(interrupt: &Interrupt<Driver>, _message: u32) -> bool {
    let pending = !interrupt
        .device()
        .context()
        .completions
        .lock()
        .unwrap()
        .is_empty();
    if pending {
        interrupt.queue_dpc().expect("queue DPC");
    }
    pending
}

fn dpc(interrupt: &Interrupt<Driver>) {
    let d = interrupt.device().context();
    loop {
        let Some(c) = d.completions.lock().unwrap().pop_front() else {
            return;
        };
        let io = d
            .by_transfer
            .lock()
            .unwrap()
            .remove(&c.transfer)
            .expect("a started transfer");
        let t = &io.transaction;
        let (answer, status) = match c.result {
            Err(e) => (t.dma_completed_final(c.bytes), Err(e)),
            Ok(()) if io.request.is_cancelled() => {
                d.counters
                    .cancelled_between_transfers
                    .fetch_add(1, Ordering::Relaxed);
                (t.dma_completed_final(c.bytes), Err(Error::Cancelled))
            }
            Ok(()) if c.bytes < t.current_transfer_length() => {
                (t.dma_completed_with_length(c.bytes), Ok(()))
            }
            Ok(()) => (t.dma_completed(), Ok(())),
        };
        match answer.expect("completion is not misuse") {
            Completion::Finished(result) => d.finish(&io, status.and(result)),
            Completion::MoreProcessingRequired => {}
        }
    }
}
