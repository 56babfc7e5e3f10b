//! A generic bus-master DMA device for conformance tests (spec §2.3: the device finishes a
//! transfer and the driver reports it with `DmaCompleted`).
//!
//! The device has internal storage (its "disk"). The driver's program-DMA callback hands it a
//! scatter/gather list with [`SimDmaDevice::start`]; a write-to-device transfer copies host
//! memory into storage, a read-from-device transfer copies storage into host memory, both
//! through the adapter's [`DeviceView`] so the sanitizer checks every byte. The data moves when
//! the transfer completes, and the completion handler is then called with no device lock held:
//! at once inside `start` ([`CompletionMode::Immediate`]), when virtual time passes
//! ([`CompletionMode::Deferred`]) or one step at a time ([`CompletionMode::Manual`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use dmatx_hal::{Direction, Error, SgElement};

use crate::adapter::SimAdapter;
use crate::memory::lock;
use crate::sanitizer::DeviceView;

/// When a started transfer completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionMode {
    /// Before [`SimDmaDevice::start`] returns (from inside program-DMA).
    Immediate,
    /// `latency_ns` of virtual time after the start ([`SimDmaDevice::advance`]), or at
    /// [`SimDmaDevice::run_pending`].
    Deferred {
        /// Virtual nanoseconds from start to completion.
        latency_ns: u64,
    },
    /// Only by [`SimDmaDevice::step`] (or [`SimDmaDevice::run_pending`]).
    Manual,
}

/// A fault planned for one transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceFault {
    /// Move only this many bytes (at most the transfer) and report them, successfully.
    Partial(u64),
    /// Move this many bytes (at most the transfer), then report [`Error::DeviceDataError`].
    DmaError {
        /// Bytes moved before the error.
        moved: u64,
    },
    /// Never complete until [`SimDmaDevice::release_stalled`].
    Stall,
}

/// What the device reports when a transfer completes (its "interrupt").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceCompletion {
    /// The transfer's number (0-based count of starts on this device).
    pub transfer: u64,
    /// The transfer's direction.
    pub direction: Direction,
    /// Bytes moved.
    pub bytes: u64,
    /// `Err(DeviceDataError)` for a DMA error: a planned one, a blocked access or a transfer
    /// beyond the end of the storage.
    pub result: Result<(), Error>,
}

/// The completion handler: the driver's interrupt/DPC routine.
pub type CompletionHandler = Arc<dyn Fn(DeviceCompletion) + Send + Sync>;

/// How to build a [`SimDmaDevice`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Bytes of device storage.
    pub storage_bytes: usize,
    /// When transfers complete.
    pub mode: CompletionMode,
    /// Pending transfers the device holds without allocating.
    pub queue_depth: usize,
    /// SG elements per pending transfer the device holds without allocating.
    pub max_sg_elements: usize,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            storage_bytes: 1 << 20,
            mode: CompletionMode::Immediate,
            queue_depth: 16,
            max_sg_elements: 256,
        }
    }
}

impl DeviceConfig {
    /// This configuration with `bytes` of storage.
    pub const fn storage_bytes(mut self, bytes: usize) -> Self {
        self.storage_bytes = bytes;
        self
    }

    /// This configuration with completion mode `mode`.
    pub const fn mode(mut self, mode: CompletionMode) -> Self {
        self.mode = mode;
        self
    }
}

/// Counters of a device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Transfers started.
    pub transfers_started: u64,
    /// Transfers completed (handler called, or dropped if none is set).
    pub transfers_completed: u64,
    /// Transfers completed with an error.
    pub errors: u64,
    /// SG elements seen in started transfers.
    pub sg_elements_seen: u64,
    /// Bytes moved between storage and host memory.
    pub bytes_moved: u64,
    /// Transfers waiting to complete (stalled ones included).
    pub pending: usize,
    /// Transfers held by a stall fault.
    pub stalled: usize,
}

struct Pending {
    transfer: u64,
    direction: Direction,
    device_offset: u64,
    sg: Vec<SgElement>,
    due_ns: u64,
    stalled: bool,
    fault: Option<DeviceFault>,
}

struct State {
    storage: Vec<u8>,
    mode: CompletionMode,
    now_ns: u64,
    pending: VecDeque<Pending>,
    spare: Vec<Vec<SgElement>>,
    max_sg: usize,
    faults: Vec<(u64, DeviceFault)>,
    stats: DeviceStats,
}

struct Inner {
    read_view: DeviceView,
    write_view: DeviceView,
    state: Mutex<State>,
    handler: Mutex<Option<CompletionHandler>>,
}

/// A generic bus-master DMA device with internal storage. Cheap to clone.
///
/// ```
/// use dmatx_sim::prelude::*;
/// use dmatx_hal::{Adapter, AllocationRequest, Allocation, Direction, SgElement, Waiter};
/// use std::sync::{Arc, Mutex};
///
/// let sim = SimPlatform::new();
/// let adapter = sim.adapter(&SimPlatform::description(64)).unwrap();
/// let device = SimDmaDevice::new(&adapter, DeviceConfig::default());
/// let done = Arc::new(Mutex::new(Vec::new()));
/// let d = done.clone();
/// device.set_completion_handler(move |c| d.lock().unwrap().push(c));
///
/// // Map a buffer by hand and let the device read it into storage.
/// let mut buffer = sim.allocate_buffer(100, 0).unwrap();
/// buffer.write(0, &[7u8; 100]).unwrap();
/// struct Never;
/// impl dmatx_hal::AllocationWaiter for Never { fn granted(&self, _: dmatx_hal::MapRegisters) {} }
/// let waiter: Waiter = Arc::new(Never);
/// let request = AllocationRequest { count: 1.try_into().unwrap(), immediate: true };
/// let Ok(Allocation::Granted(regs)) = adapter.allocate(request, &Arc::downgrade(&waiter)) else { panic!() };
/// let mut sg = [SgElement::default(); 4];
/// let m = adapter.map(&regs, &buffer, 0, 100, Direction::WriteToDevice, &mut sg).unwrap();
/// device.start(Direction::WriteToDevice, &sg[..m.elements], 0);
/// assert_eq!(done.lock().unwrap()[0].bytes, 100);
/// adapter.flush(&regs, &buffer, 0, 100, Direction::WriteToDevice).unwrap();
/// adapter.free(regs);
/// let mut stored = [0u8; 100];
/// device.read_storage(0, &mut stored).unwrap();
/// assert_eq!(stored, [7u8; 100]);
/// sim.check_clean().unwrap();
/// ```
#[derive(Clone)]
pub struct SimDmaDevice {
    inner: Arc<Inner>,
}

impl core::fmt::Debug for SimDmaDevice {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SimDmaDevice")
            .field("stats", &self.stats())
            .finish()
    }
}

impl SimDmaDevice {
    /// A device doing DMA in both directions through `adapter`.
    pub fn new(adapter: &SimAdapter, config: DeviceConfig) -> Self {
        Self::duplex(adapter, adapter, config)
    }

    /// A device using `read_adapter` for read-from-device transfers and `write_adapter` for
    /// write-to-device ones (a duplex enabler).
    pub fn duplex(
        read_adapter: &SimAdapter,
        write_adapter: &SimAdapter,
        config: DeviceConfig,
    ) -> Self {
        let spare = (0..config.queue_depth)
            .map(|_| Vec::with_capacity(config.max_sg_elements))
            .collect();
        Self {
            inner: Arc::new(Inner {
                read_view: read_adapter.device_view(),
                write_view: write_adapter.device_view(),
                state: Mutex::new(State {
                    storage: vec![0; config.storage_bytes],
                    mode: config.mode,
                    now_ns: 0,
                    pending: VecDeque::with_capacity(config.queue_depth),
                    spare,
                    max_sg: config.max_sg_elements,
                    faults: Vec::new(),
                    stats: DeviceStats::default(),
                }),
                handler: Mutex::new(None),
            }),
        }
    }

    /// Set the routine called for each completed transfer.
    pub fn set_completion_handler(
        &self,
        handler: impl Fn(DeviceCompletion) + Send + Sync + 'static,
    ) {
        *lock(&self.inner.handler) = Some(Arc::new(handler));
    }

    /// Remove the completion handler (completions are then only counted).
    pub fn clear_completion_handler(&self) {
        *lock(&self.inner.handler) = None;
    }

    /// Change the completion mode for transfers started from now on.
    pub fn set_mode(&self, mode: CompletionMode) {
        lock(&self.inner.state).mode = mode;
    }

    /// Plan `fault` for transfer number `transfer` (0-based count of starts).
    pub fn inject(&self, transfer: u64, fault: DeviceFault) {
        let mut st = lock(&self.inner.state);
        st.faults.retain(|(t, _)| *t != transfer);
        st.faults.push((transfer, fault));
    }

    /// Forget all planned faults.
    pub fn clear_faults(&self) {
        lock(&self.inner.state).faults.clear();
    }

    /// Start a transfer of the bytes `sg` describes between host memory and storage at
    /// `device_offset` (what program-DMA does). Returns the transfer's number. In
    /// [`CompletionMode::Immediate`] the completion handler has run when this returns (unless
    /// the transfer stalls).
    pub fn start(&self, direction: Direction, sg: &[SgElement], device_offset: u64) -> u64 {
        let mut st = lock(&self.inner.state);
        let transfer = st.stats.transfers_started;
        st.stats.transfers_started += 1;
        st.stats.sg_elements_seen += sg.len() as u64;
        let fault = st
            .faults
            .iter()
            .find(|(t, _)| *t == transfer)
            .map(|&(_, f)| f);
        let stall = fault == Some(DeviceFault::Stall);
        if st.mode == CompletionMode::Immediate && !stall {
            let c = self.perform(&mut st, transfer, direction, sg, device_offset, fault);
            drop(st);
            self.deliver(c);
            return transfer;
        }
        let due_ns = match st.mode {
            CompletionMode::Deferred { latency_ns } => st.now_ns.saturating_add(latency_ns),
            CompletionMode::Immediate => st.now_ns,
            CompletionMode::Manual => u64::MAX,
        };
        let max_sg = st.max_sg;
        let mut list = st.spare.pop().unwrap_or_else(|| Vec::with_capacity(max_sg));
        list.clear();
        list.extend_from_slice(sg);
        st.pending.push_back(Pending {
            transfer,
            direction,
            device_offset,
            sg: list,
            due_ns,
            stalled: stall,
            fault,
        });
        transfer
    }

    /// Move the data of a transfer; called with the device lock held.
    fn perform(
        &self,
        st: &mut State,
        transfer: u64,
        direction: Direction,
        sg: &[SgElement],
        device_offset: u64,
        fault: Option<DeviceFault>,
    ) -> DeviceCompletion {
        let total: u64 = sg.iter().map(|e| u64::from(e.length)).sum();
        let (budget, fails) = match fault {
            Some(DeviceFault::Partial(n)) => (n.min(total), false),
            Some(DeviceFault::DmaError { moved }) => (moved.min(total), true),
            _ => (total, false),
        };
        let mut moved = 0u64;
        let mut result = if fails {
            Err(Error::DeviceDataError)
        } else {
            Ok(())
        };
        let fits = device_offset
            .checked_add(total)
            .is_some_and(|end| end <= st.storage.len() as u64);
        if !fits {
            result = Err(Error::DeviceDataError);
        } else {
            let view = match direction {
                Direction::ReadFromDevice => &self.inner.read_view,
                Direction::WriteToDevice => &self.inner.write_view,
            };
            for e in sg {
                if moved == budget {
                    break;
                }
                let n = u64::from(e.length).min(budget - moved);
                let at = (device_offset + moved) as usize;
                let span = &mut st.storage[at..at + n as usize];
                let ok = match direction {
                    Direction::WriteToDevice => view.dma_read(e.address, span).is_ok(),
                    Direction::ReadFromDevice => view.dma_write(e.address, span).is_ok(),
                };
                if !ok {
                    result = Err(Error::DeviceDataError);
                    break;
                }
                moved += n;
            }
        }
        st.stats.bytes_moved += moved;
        st.stats.transfers_completed += 1;
        if result.is_err() {
            st.stats.errors += 1;
        }
        DeviceCompletion {
            transfer,
            direction,
            bytes: moved,
            result,
        }
    }

    /// Call the handler, with no device lock held.
    fn deliver(&self, completion: DeviceCompletion) {
        let handler = lock(&self.inner.handler).clone();
        if let Some(h) = handler {
            h(completion);
        }
    }

    /// Complete the first pending transfer `pick` accepts. Returns whether one completed.
    fn complete_one(&self, pick: impl Fn(&Pending, u64) -> bool) -> bool {
        let mut st = lock(&self.inner.state);
        let now = st.now_ns;
        let Some(index) = st.pending.iter().position(|p| pick(p, now)) else {
            return false;
        };
        let Some(p) = st.pending.remove(index) else {
            return false;
        };
        let fault = p.fault.filter(|f| *f != DeviceFault::Stall);
        let c = self.perform(
            &mut st,
            p.transfer,
            p.direction,
            &p.sg,
            p.device_offset,
            fault,
        );
        st.spare.push(p.sg);
        drop(st);
        self.deliver(c);
        true
    }

    /// Let `ns` of virtual time pass and complete, in start order, every transfer now due
    /// (transfers started by the handlers meanwhile complete only if due too). Returns how
    /// many completed.
    pub fn advance(&self, ns: u64) -> usize {
        {
            let mut st = lock(&self.inner.state);
            st.now_ns = st.now_ns.saturating_add(ns);
        }
        let mut n = 0;
        while self.complete_one(|p, now| !p.stalled && p.due_ns <= now) {
            n += 1;
        }
        n
    }

    /// Complete pending transfers, in start order, until none is left but stalled ones
    /// (including transfers the handlers start meanwhile). Returns how many completed.
    pub fn run_pending(&self) -> usize {
        let mut n = 0;
        while self.complete_one(|p, _| !p.stalled) {
            n += 1;
        }
        n
    }

    /// Complete the oldest pending transfer that is not stalled. Returns whether there was one.
    pub fn step(&self) -> bool {
        self.complete_one(|p, _| !p.stalled)
    }

    /// Complete every stalled transfer now, in start order. Returns how many completed.
    pub fn release_stalled(&self) -> usize {
        let mut n = 0;
        while self.complete_one(|p, _| p.stalled) {
            n += 1;
        }
        n
    }

    /// Virtual time in nanoseconds.
    pub fn now_ns(&self) -> u64 {
        lock(&self.inner.state).now_ns
    }

    /// Transfers waiting to complete (stalled ones included).
    pub fn pending(&self) -> usize {
        lock(&self.inner.state).pending.len()
    }

    /// Counters.
    pub fn stats(&self) -> DeviceStats {
        let st = lock(&self.inner.state);
        let mut s = st.stats;
        s.pending = st.pending.len();
        s.stalled = st.pending.iter().filter(|p| p.stalled).count();
        s
    }

    /// Bytes of storage.
    pub fn storage_len(&self) -> usize {
        lock(&self.inner.state).storage.len()
    }

    /// Copy storage bytes at `offset` into `out`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the range lies outside the storage.
    pub fn read_storage(&self, offset: u64, out: &mut [u8]) -> Result<(), Error> {
        let st = lock(&self.inner.state);
        let range = storage_range(st.storage.len(), offset, out.len())?;
        out.copy_from_slice(&st.storage[range]);
        Ok(())
    }

    /// Copy `data` into storage at `offset`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the range lies outside the storage.
    pub fn write_storage(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        let mut st = lock(&self.inner.state);
        let range = storage_range(st.storage.len(), offset, data.len())?;
        st.storage[range].copy_from_slice(data);
        Ok(())
    }
}

fn storage_range(len: usize, offset: u64, n: usize) -> Result<core::ops::Range<usize>, Error> {
    let start = usize::try_from(offset).map_err(|_| Error::InvalidParameter)?;
    let end = start.checked_add(n).ok_or(Error::InvalidParameter)?;
    if end > len {
        return Err(Error::InvalidParameter);
    }
    Ok(start..end)
}
