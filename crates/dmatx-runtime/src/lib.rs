//! dmatx-runtime: a thin WDF-like driver runtime for dmatx (`std`).
//!
//! KMDF drivers are written against a handful of framework objects: the device with its
//! PnP/power callbacks, I/O queues that deliver requests, interrupts with their ISR and DPC,
//! and timers. This crate gives dmatx drivers the same flows, with WDF's semantics, so that a
//! KMDF driver's structure carries over: [`Device`] (typed context, power order, delete),
//! [`Queue`] (sequential and parallel dispatch, power-managed holding), [`Request`] (completion,
//! cancellation) and its issuer's side [`RequestHandle`], [`Interrupt`], [`Timer`], and the
//! [`dma`] glue that binds a request to a transaction (`WdfDmaTransactionInitializeUsingRequest`).
//!
//! # A driver in one example
//! A device that reads from its storage into the caller's buffer by scatter/gather DMA. The
//! read handler binds the request to the transaction and executes it; each time the device
//! finishes a transfer it raises its interrupt; the ISR queues the DPC; the DPC reports the
//! transfer and, when the transaction is finished, completes the request.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use dmatx::{Completion, Direction, DmaDevice, Enabler, EnablerConfig, Profile, SgElement,
//!             Transaction};
//! use dmatx_runtime::{dma, Completed, Device, Dispatch, Interrupt, InterruptConfig, Queue,
//!                     QueueConfig, Request, RequestMemory, RequestSpec};
//! use dmatx_sim::{DeviceCompletion, SimBuffer, SimDmaDevice, SimPlatform};
//!
//! /// Transactions on request buffers; program-DMA's context is the device's registers.
//! type Tx = Transaction<SimPlatform, SimDmaDevice, RequestMemory<SimBuffer>>;
//!
//! /// The device context.
//! struct Driver {
//!     tx: Arc<Tx>,
//!     hw: SimDmaDevice,
//!     /// The device's status register: the transfer it finished last.
//!     status: Mutex<Option<DeviceCompletion>>,
//! }
//!
//! // EvtProgramDma: start the device on this transfer (device offset = bytes done so far).
//! fn program_dma(t: &Tx, hw: &SimDmaDevice, direction: Direction, sg: &[SgElement]) -> bool {
//!     hw.start(direction, sg, t.bytes_transferred());
//!     true
//! }
//!
//! // EvtIoRead. This driver has one transaction, so it serves one read at a time (its issuer
//! // sends one); a driver with more transactions serves more.
//! fn on_read(queue: &Queue<Driver, SimBuffer>, request: Request<SimBuffer>, _length: u64) {
//!     let driver = queue.device().context();
//!     let started = dma::initialize_using_request(
//!         &driver.tx, &request, program_dma, Direction::ReadFromDevice,
//!     )
//!     .and_then(|()| driver.tx.execute(driver.hw.clone()));
//!     if let Err(e) = started {
//!         let _ = driver.tx.release();
//!         let _ = request.complete(Err(e));
//!     }
//! }
//!
//! // EvtInterruptIsr: claim the interrupt if the device reports a finished transfer.
//! fn isr(interrupt: &Interrupt<Driver>, _message: u32) -> bool {
//!     let ours = interrupt.device().context().status.lock().unwrap().is_some();
//!     ours && interrupt.queue_dpc().is_ok()
//! }
//!
//! // EvtInterruptDpc: report the transfer; complete the request when the transaction is done.
//! fn dpc(interrupt: &Interrupt<Driver>) {
//!     let driver = interrupt.device().context();
//!     if driver.status.lock().unwrap().take().is_none() {
//!         return;
//!     }
//!     if let Ok(Completion::Finished(status)) = driver.tx.dma_completed() {
//!         let request = dma::request_of(&driver.tx).expect("the transaction serves a request");
//!         let bytes = driver.tx.bytes_transferred();
//!         driver.tx.release().expect("a finished transaction releases");
//!         request.complete_with_information(status, bytes).expect("its DMA is over");
//!     }
//! }
//!
//! // The machine: memory, an adapter, and a device whose storage holds a pattern.
//! let sim = SimPlatform::new();
//! let dma_device = DmaDevice::new(sim.clone());
//! let enabler = Enabler::create(&dma_device, EnablerConfig::new(Profile::ScatterGather64, 16384))?;
//! let hw = SimDmaDevice::new(&sim.last_adapter().unwrap(), Default::default());
//! let pattern: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
//! hw.write_storage(0, &pattern)?;
//!
//! // EvtDriverDeviceAdd: the device, its DMA, its interrupt and its queue.
//! let device = Device::new(Driver {
//!     tx: Tx::create(&enabler)?,
//!     hw: hw.clone(),
//!     status: Mutex::new(None),
//! });
//! device.attach_dma(&dma_device)?;
//! let interrupt = Interrupt::create(&device, InterruptConfig { isr, dpc: Some(dpc) })?;
//! let queue = Queue::create(
//!     &device,
//!     QueueConfig { read: Some(on_read), ..QueueConfig::new(Dispatch::Parallel) },
//! )?;
//! // The device's interrupt line: latch the status, raise the interrupt.
//! let (dev, line) = (device.clone(), interrupt.clone());
//! hw.set_completion_handler(move |c| {
//!     *dev.context().status.lock().unwrap() = Some(c);
//!     let _ = line.raise(0);
//! });
//! device.power_up()?;
//!
//! // An application reads 40 000 bytes.
//! let read = queue.submit(RequestSpec::read(sim.allocate_buffer(40_000, 0)?))?;
//! let done = read.wait_timeout(Duration::from_secs(10)).expect("the read completes");
//! assert_eq!(done, Completed { status: Ok(()), information: 40_000 });
//! let mut data = vec![0u8; 40_000];
//! read.output().unwrap().read(0, &mut data)?;
//! assert_eq!(data, pattern);
//! assert_eq!(interrupt.stats().dpcs_run, 3); // ceil(40 000 / 16 384) transfers
//! assert_eq!(read.refused_completions(), 0);
//!
//! // Removal: break the device model's link to the driver, then delete.
//! hw.clear_completion_handler();
//! device.delete()?;
//! drop((read, queue, interrupt, device, enabler));
//! sim.check_clean().unwrap();
//! # Ok::<(), dmatx::Error>(())
//! ```
//!
//! # Contracts
//! * **Every request completes exactly once.** On every path: the driver's completion, the
//!   default completion of a request type without a handler, cancellation while queued,
//!   deletion of the queue or the device ([`dmatx::Error::Cancelled`]). One exception, on
//!   purpose: a request whose DMA transfer is still running when its transaction (or the
//!   device) is deleted is never completed, because the device may still write its memory.
//!   Stop the device's DMA (in the power-down callbacks, or by completing every transfer)
//!   before deleting.
//! * **Misuse.** Where WDF bug-checks (completing twice, completing while the bound DMA
//!   transaction executes, unmarking a request never marked cancelable, …) the call returns
//!   [`dmatx::Error::ObjectMisuse`] and leaves the object unchanged; with the device's verifier on
//!   ([`DeviceConfig::verifier`], on in debug builds) it also panics with that diagnostic, after
//!   every runtime lock is released.
//! * **Callbacks run outside runtime locks**, except the ISR and `synchronize` closures, which
//!   run under the interrupt lock as in WDF. Cancel callbacks run on the cancelling thread;
//!   DPCs and timer callbacks on worker threads owned by their objects.
//! * **No leaked threads.** Workers hold weak references: dropping the last handle of an
//!   interrupt or timer joins its worker; [`Device::delete`] joins them all.
//! * **Differences from WDF** are listed in the repository's `docs/quirks.md` (section "The
//!   runtime") and on the items concerned.
#![deny(unsafe_code)]

// First: its macros are used by the modules below.
#[macro_use]
mod trace;

mod device;
pub mod dma;
mod interrupt;
mod ioctl;
mod line;
mod queue;
mod request;
mod sync;
mod timer;

pub use device::{Device, DeviceConfig, PnpPowerCallback, PnpPowerCallbacks, PowerState};
pub use interrupt::{Dpc, Interrupt, InterruptConfig, InterruptLockGuard, InterruptStats, Isr};
pub use ioctl::{IoctlCode, TransferMethod};
pub use line::LevelLine;
pub use queue::{Dispatch, IoHandler, IoctlHandler, Queue, QueueConfig};
pub use request::{
    CancelCallback, Completed, Request, RequestHandle, RequestKind, RequestMemory, RequestSpec,
};
pub use timer::{Timer, TimerCallback, TimerConfig};
