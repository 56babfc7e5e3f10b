//! The simulated system DMA controller: channels with request lines, transfers between host
//! memory and a device FIFO, stop, and fault plans (spec §2.5 `StopSystemTransfer`, §3.5,
//! §3.10; samples X3).
//!
//! A system-mode device has no DMA engine of its own. The platform's controller
//! ([`SimSystemDma`]) has a set of channels, each reachable from some request lines
//! ([`SystemDmaConfig::channel`]). An adapter asked for with
//! [`DeviceDescription::system`](dmatx_hal::DeviceDescription::system) set to a configured
//! channel/request-line pair is a *system adapter*:
//!
//! * its map registers map host memory as a direct-mode adapter's do (the sanitizer checks
//!   the controller's accesses as any device's);
//! * a grant of its registers *is* the channel: one waiter at a time owns it, across every
//!   adapter asked for the same channel (a second `allocate` queues, FIFO, or fails with
//!   `InsufficientResources` when immediate); `free` returns the channel and grants the next
//!   queued waiter on the freeing thread;
//! * `map_system` maps like `map` and starts a controller transfer between the mapped bytes
//!   and the [`SimFifo`] registered at the channel's device address plus the device offset.
//!
//! The data moves when the transfer completes, and the waiter's
//! [`system_transfer_done`](dmatx_hal::AllocationWaiter::system_transfer_done) is then called
//! with no sim lock held — only from the controller's stepping calls ([`SimSystemDma::advance`],
//! [`SimSystemDma::step`], [`SimSystemDma::run_pending`], [`SimSystemDma::release_stalled`]),
//! never from inside `map_system`, `stop_system`, `flush` or `free`.
//!
//! Rules the model keeps (and tests can rely on):
//! * **Width.** A transfer whose length is not a multiple of the channel's
//!   [`DmaWidth`](dmatx_hal::DmaWidth) moves its whole units and ends with
//!   [`SystemDmaStatus::Error`] reporting those bytes.
//! * **Endpoint.** No FIFO at the target address: `Error { moved: 0 }`. A write-to-device
//!   transfer that would overfill the FIFO's received data (its capacity) moves what fits and
//!   ends with `Error { moved }`; a read-from-device transfer whose FIFO source holds fewer bytes
//!   than the transfer moves what there is and ends with `Error { moved }`.
//! * **Stop.** [`Adapter::stop_system`](dmatx_hal::Adapter::stop_system) marks the running
//!   transfer stopped at the progress it had made: in [`SystemCompletion::Deferred`] mode the
//!   share of its latency that had passed in virtual time, rounded down to the channel's width
//!   (none with zero latency); in [`SystemCompletion::Manual`] mode, or while stalled, none.
//!   Those bytes move, the rest does not, and `Cancelled { moved }` is delivered at the next
//!   stepping call — unless the transfer failed before its stop point (a planned
//!   [`SystemFault::ErrorAt`] below it, a full FIFO), which reports that `Error`. A stop after
//!   a (non-zero) latency has passed finds the transfer finished: `NotRunning`, and the
//!   completion is delivered as `Complete`.
//! * **Free while running** (a contract violation: the core keeps the registers of a transfer in
//!   flight): the transfer is detached from the channel and stopped before the mapping ends, so
//!   the controller never touches the freed memory; its `Cancelled { moved: 0 }` is still
//!   delivered at the next stepping call, and the platform records an issue (so
//!   [`SimPlatform::check_clean`](crate::SimPlatform::check_clean) fails).
//! * **Flush while running** ends the mapping; the controller's accesses at completion are then
//!   blocked and recorded by the sanitizer, and the transfer ends with `Error`.
//! * **Looped transfers** (auto-initialize) and system descriptions that also claim bus
//!   mastering are refused when the adapter is created. Demand mode is accepted and recorded;
//!   the controller does not pace by it.
//!
//! Lock order: the controller's lock before an adapter's locks (register state, grant slots)
//! and before a FIFO's lock. No adapter path holds one of its locks while taking the
//! controller's.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use dmatx_hal::{
    Direction, DmaWidth, Error, MapRegisters, Result, SgElement, SystemChannel, SystemDmaStatus,
    SystemStop, Waiter, WaiterRef, waiter_id, waiter_ref_id,
};

use crate::adapter::{AdapterInner, DEFAULT_MAP_REGISTERS, reserve_waiter_room};
use crate::memory::lock;
use crate::platform::Shared;
use crate::sanitizer::DeviceView;

/// When a system transfer completes. There is no immediate mode: the contract forbids
/// completing a transfer from inside `map_system`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SystemCompletion {
    /// `latency_ns` of virtual time after the start ([`SimSystemDma::advance`]), or at
    /// [`SimSystemDma::step`] / [`SimSystemDma::run_pending`].
    Deferred {
        /// Virtual nanoseconds from start to completion.
        latency_ns: u64,
    },
    /// Only by [`SimSystemDma::step`] or [`SimSystemDma::run_pending`].
    Manual,
}

/// A fault planned for one transfer of a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SystemFault {
    /// Move this many bytes (at most the transfer), then end with
    /// [`SystemDmaStatus::Error`] reporting them.
    ErrorAt(u64),
    /// Never complete until stopped or [`SimSystemDma::release_stalled`] (which completes it
    /// normally).
    Stall,
}

/// How to build the platform's system DMA controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemDmaConfig {
    /// The `(channel, request line)` pairs the controller knows. A channel may appear with
    /// several request lines; it is still one channel.
    pub channels: Vec<(u32, u32)>,
    /// Map registers (N) of each system adapter (at least 2).
    pub map_registers: u32,
    /// When transfers complete.
    pub mode: SystemCompletion,
}

impl Default for SystemDmaConfig {
    fn default() -> Self {
        Self {
            channels: Vec::new(),
            map_registers: DEFAULT_MAP_REGISTERS,
            mode: SystemCompletion::Manual,
        }
    }
}

impl SystemDmaConfig {
    /// No channels, [`DEFAULT_MAP_REGISTERS`] registers per adapter, manual completion.
    pub fn new() -> Self {
        Self::default()
    }

    /// This configuration with `channel` reachable from `request_line`.
    pub fn channel(mut self, channel: u32, request_line: u32) -> Self {
        self.channels.push((channel, request_line));
        self
    }

    /// This configuration with `n` map registers per system adapter.
    pub fn map_registers(mut self, n: u32) -> Self {
        self.map_registers = n;
        self
    }

    /// This configuration with completion mode `mode`.
    pub fn mode(mut self, mode: SystemCompletion) -> Self {
        self.mode = mode;
        self
    }
}

/// Counters and occupancy of one controller channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// The channel number.
    pub channel: u32,
    /// Transfers started by `map_system`.
    pub started: u64,
    /// Transfers that ended (any status; their completion was or is being delivered).
    pub completed: u64,
    /// Transfers that ended with [`SystemDmaStatus::Error`].
    pub errors: u64,
    /// Transfers that ended with [`SystemDmaStatus::Cancelled`].
    pub cancelled: u64,
    /// Bytes moved between memory and FIFOs.
    pub bytes_moved: u64,
    /// Grants of the channel.
    pub grants: u64,
    /// Whether a waiter owns the channel now.
    pub owned: bool,
    /// Requests waiting for the channel now.
    pub queued: usize,
    /// Whether a transfer is running now (stopped and stalled ones included).
    pub running: bool,
}

/// The waiter owning a channel: its adapter, the first register of its grant, its identity.
#[derive(Clone, Copy, Debug)]
struct Owner {
    adapter: usize,
    first: u32,
    waiter: usize,
}

struct Queued {
    adapter: Arc<AdapterInner>,
    waiter: Waiter,
    count: u32,
}

struct Running {
    transfer: u64,
    seq: u64,
    waiter: WaiterRef,
    waiter_id: usize,
    view: DeviceView,
    adapter: usize,
    first: u32,
    direction: Direction,
    /// The FIFO's address (`None` if the offset overflowed).
    address: Option<u64>,
    width: DmaWidth,
    sg: Vec<SgElement>,
    length: u64,
    /// Virtual time of the start, and of completion (`u64::MAX` in manual mode).
    started_ns: u64,
    due_ns: u64,
    stalled: bool,
    stopped: bool,
    /// Bytes moved before the stop (meaningful once `stopped`).
    progress: u64,
    fault: Option<SystemFault>,
}

impl Running {
    /// The bytes a transfer started at `started_ns` had moved by `now_ns`: the elapsed share of
    /// its latency, in whole units of the channel's width; none if manual, stalled, or with
    /// zero latency.
    fn progress_at(&self, now_ns: u64) -> u64 {
        let latency = self.due_ns.saturating_sub(self.started_ns);
        if self.stalled || latency == 0 || self.due_ns == u64::MAX {
            return 0;
        }
        let elapsed = now_ns.saturating_sub(self.started_ns).min(latency);
        let share = u128::from(self.length) * u128::from(elapsed) / u128::from(latency);
        let share = u64::try_from(share).unwrap_or(self.length);
        share - share % self.width.bytes()
    }
}

struct Channel {
    number: u32,
    lines: Vec<u32>,
    owner: Option<Owner>,
    queue: VecDeque<Queued>,
    registered: usize,
    running: Option<Running>,
    /// The SG storage of the next transfer (the previous transfer's, returned).
    spare: Vec<SgElement>,
    faults: Vec<(u64, SystemFault)>,
    stats: ChannelStats,
}

/// A completion due but detached from its channel (its registers were freed while it ran).
struct Detached {
    channel: u32,
    waiter: WaiterRef,
}

struct State {
    mode: SystemCompletion,
    now_ns: u64,
    seq: u64,
    channels: Vec<Channel>,
    fifos: Vec<SimFifo>,
    detached: VecDeque<Detached>,
    scratch: Vec<u8>,
}

/// The shared state behind a [`SimSystemDma`].
pub(crate) struct Controller {
    shared: Arc<Shared>,
    pub(crate) map_registers: u32,
    state: Mutex<State>,
}

/// What binds a system adapter to its channel.
pub(crate) struct SystemBinding {
    pub(crate) controller: Arc<Controller>,
    pub(crate) channel: SystemChannel,
    /// Index of the channel in the controller's list.
    index: usize,
}

/// The platform's system DMA controller (cheap to clone; clones name the same controller).
/// Tests and clock threads drive it: [`SimSystemDma::advance`], [`SimSystemDma::step`],
/// [`SimSystemDma::run_pending`].
///
/// Samples X3's data path: two pages of `0xDA` to the FIFO at `0x7000_6200`.
///
/// ```
/// use dmatx_sim::prelude::*;
/// use dmatx_hal::{Allocation, AllocationRequest, AllocationWaiter, Direction, DmaWidth,
///                 MapRegisters, SgElement, SystemChannel, SystemDmaStatus, Waiter};
/// use std::sync::{Arc, Mutex};
///
/// let sim = SimConfig::new()
///     .system_dma(SystemDmaConfig::new().channel(5, 17).mode(SystemCompletion::Manual))
///     .build()
///     .unwrap();
/// let dma = sim.system_dma().unwrap();
/// let fifo = sim.add_fifo(0x7000_6200, 1 << 16).unwrap();
/// let channel = SystemChannel {
///     channel: 5, request_line: 17, demand_mode: true, looped_transfer: false,
///     width: DmaWidth::Bits32, device_address: 0x7000_6200,
/// };
/// let adapter = sim.adapter(&SimPlatform::system_description(channel)).unwrap();
///
/// // The transaction's waiter: told when the controller finishes.
/// #[derive(Default)]
/// struct Done(Mutex<Vec<SystemDmaStatus>>);
/// impl AllocationWaiter for Done {
///     fn granted(&self, _: MapRegisters) {}
///     fn system_transfer_done(&self, s: SystemDmaStatus) { self.0.lock().unwrap().push(s) }
/// }
/// let done = Arc::new(Done::default());
/// let waiter: Waiter = done.clone();
/// let me = Arc::downgrade(&waiter);
///
/// let mut buffer = sim.allocate_buffer(8192, 0).unwrap();
/// buffer.fill(0xDA);
/// let n = adapter.map_register_count().try_into().unwrap();
/// let Ok(Allocation::Granted(channel_grant)) =
///     adapter.allocate(AllocationRequest { count: n, immediate: true }, &me) else { panic!() };
/// let mut sg = [SgElement::default(); 4];
/// let m = adapter
///     .map_system(&channel_grant, &buffer, 0, 8192, Direction::WriteToDevice, 0, &me, &mut sg)
///     .unwrap();
/// assert_eq!(m.bytes, 8192);
/// assert!(done.0.lock().unwrap().is_empty()); // never from inside map_system
/// assert!(dma.step());                        // the controller runs the transfer
/// assert_eq!(*done.0.lock().unwrap(), [SystemDmaStatus::Complete]);
/// adapter.flush(&channel_grant, &buffer, 0, 8192, Direction::WriteToDevice).unwrap();
/// adapter.free(channel_grant);                // the channel goes to the next waiter
/// assert_eq!(fifo.take_received(), vec![0xDA; 8192]);
/// sim.check_clean().unwrap();
/// ```
#[derive(Clone)]
pub struct SimSystemDma {
    pub(crate) inner: Arc<Controller>,
}

impl core::fmt::Debug for SimSystemDma {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let st = lock(&self.inner.state);
        f.debug_struct("SimSystemDma")
            .field("channels", &st.channels.len())
            .field("now_ns", &st.now_ns)
            .finish_non_exhaustive()
    }
}

impl Controller {
    pub(crate) fn new(shared: Arc<Shared>, config: &SystemDmaConfig) -> Result<Self> {
        if config.map_registers < 2 {
            return Err(Error::InvalidParameter);
        }
        let mut channels: Vec<Channel> = Vec::new();
        for &(number, line) in &config.channels {
            match channels.iter_mut().find(|c| c.number == number) {
                Some(c) if !c.lines.contains(&line) => c.lines.push(line),
                Some(_) => {}
                None => channels.push(Channel {
                    number,
                    lines: vec![line],
                    owner: None,
                    queue: VecDeque::new(),
                    registered: 0,
                    running: None,
                    spare: Vec::with_capacity(config.map_registers as usize),
                    faults: Vec::new(),
                    stats: ChannelStats {
                        channel: number,
                        ..ChannelStats::default()
                    },
                }),
            }
        }
        Ok(Self {
            shared,
            map_registers: config.map_registers,
            state: Mutex::new(State {
                mode: config.mode,
                now_ns: 0,
                seq: 0,
                channels,
                fifos: Vec::new(),
                detached: VecDeque::new(),
                scratch: Vec::new(),
            }),
        })
    }

    /// The binding for an adapter asked for `channel`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the channel/request-line pair is not configured;
    /// [`Error::InvalidDeviceRequest`] for a looped transfer (not modelled).
    pub(crate) fn bind(self: &Arc<Self>, channel: &SystemChannel) -> Result<SystemBinding> {
        if channel.looped_transfer {
            return Err(Error::InvalidDeviceRequest);
        }
        let st = lock(&self.state);
        let index = st
            .channels
            .iter()
            .position(|c| c.number == channel.channel && c.lines.contains(&channel.request_line))
            .ok_or(Error::InvalidParameter)?;
        Ok(SystemBinding {
            controller: Arc::clone(self),
            channel: *channel,
            index,
        })
    }

    fn note(&self, issue: String) {
        lock(&self.shared.issues).push(format!("system DMA: {issue}"));
    }

    /// What is not back to idle, in words.
    pub(crate) fn leftovers(&self, out: &mut Vec<String>) {
        let st = lock(&self.state);
        for c in &st.channels {
            let n = c.number;
            if let Some(o) = c.owner {
                out.push(format!(
                    "system DMA channel {n}: owned (adapter {}, registers from {})",
                    o.adapter, o.first
                ));
            }
            if !c.queue.is_empty() {
                out.push(format!(
                    "system DMA channel {n}: {} requests still queued",
                    c.queue.len()
                ));
            }
            if let Some(r) = &c.running {
                let how = if r.stopped {
                    "stopped, completion not delivered"
                } else if r.stalled {
                    "stalled"
                } else {
                    "running"
                };
                out.push(format!(
                    "system DMA channel {n}: transfer {} ({} bytes) {how}",
                    r.transfer, r.length
                ));
            }
        }
        for d in &st.detached {
            out.push(format!(
                "system DMA channel {}: a detached transfer's completion not delivered",
                d.channel
            ));
        }
    }
}

impl SystemBinding {
    fn with_channel<R>(&self, f: impl FnOnce(&mut Channel) -> R) -> R {
        let mut st = lock(&self.controller.state);
        f(&mut st.channels[self.index])
    }

    /// `register_waiter` for a system adapter: reserve room in the channel's queue.
    pub(crate) fn register_waiter(&self) -> Result<()> {
        self.with_channel(|c| reserve_waiter_room(&mut c.registered, &mut c.queue))
    }

    /// `unregister_waiter` for a system adapter.
    pub(crate) fn unregister_waiter(&self) {
        self.with_channel(|c| c.registered = c.registered.saturating_sub(1));
    }

    /// `allocate` for a system adapter: the channel and `count` registers of `adapter`, or a
    /// place in the channel's queue. The caller has checked `count` against N.
    pub(crate) fn allocate(
        &self,
        adapter: &Arc<AdapterInner>,
        count: u32,
        immediate: bool,
        waiter: &WaiterRef,
    ) -> Result<Option<MapRegisters>> {
        let mut st = lock(&self.controller.state);
        let c = &mut st.channels[self.index];
        if c.owner.is_none()
            && (immediate || c.queue.is_empty())
            && let Some(registers) = adapter.try_grant(count)
        {
            c.owner = Some(Owner {
                adapter: adapter.id,
                first: registers.first(),
                waiter: waiter_ref_id(waiter),
            });
            c.stats.grants += 1;
            drop(st);
            return Ok(Some(adapter.open(registers)));
        }
        if immediate {
            drop(st);
            adapter.count_refusal();
            return Err(Error::InsufficientResources);
        }
        let Some(strong) = waiter.upgrade() else {
            drop(st);
            adapter.count_refusal();
            return Err(Error::InvalidParameter);
        };
        let id = waiter_id(&strong);
        let twice = c.queue.iter().any(|q| waiter_id(&q.waiter) == id);
        c.queue.push_back(Queued {
            adapter: Arc::clone(adapter),
            waiter: strong,
            count,
        });
        drop(st);
        adapter.count_queued();
        if twice {
            self.controller.note(format!(
                "channel {}: a waiter was queued twice",
                self.channel.channel
            ));
        }
        Ok(None)
    }

    /// `cancel_allocation` for a system adapter.
    pub(crate) fn cancel(&self, adapter: &AdapterInner, waiter: &WaiterRef) -> bool {
        let id = waiter_ref_id(waiter);
        let removed = self.with_channel(|c| {
            let pos = c
                .queue
                .iter()
                .position(|q| q.adapter.id == adapter.id && waiter_id(&q.waiter) == id)?;
            c.queue.remove(pos)
        });
        match removed {
            Some(q) => {
                q.adapter.count_cancel();
                // Dropped here, outside every lock: it may hold the waiter's last handle.
                drop(q);
                true
            }
            None => false,
        }
    }

    /// Requests of `adapter` waiting for the channel.
    pub(crate) fn queued_for(&self, adapter: usize) -> usize {
        self.with_channel(|c| c.queue.iter().filter(|q| q.adapter.id == adapter).count())
    }

    /// Grant the channel to the head of its queue if the channel is free and the head's
    /// registers fit; call its waiter on this thread with no lock held.
    pub(crate) fn grant_waiters(&self) {
        let granted = {
            let mut st = lock(&self.controller.state);
            let c = &mut st.channels[self.index];
            if c.owner.is_some() {
                return;
            }
            let Some(head) = c.queue.front() else { return };
            let Some(registers) = head.adapter.try_grant(head.count) else {
                return;
            };
            let Some(q) = c.queue.pop_front() else { return };
            c.owner = Some(Owner {
                adapter: q.adapter.id,
                first: registers.first(),
                waiter: waiter_id(&q.waiter),
            });
            c.stats.grants += 1;
            (q, registers)
        };
        let (q, registers) = granted;
        let registers = q.adapter.open(registers);
        q.waiter.granted(registers);
    }

    /// Before `free` closes a grant: a transfer still running on it is detached from the
    /// channel (and recorded as misuse), so the controller never touches the memory after.
    pub(crate) fn detach_running(&self, adapter: usize, first: u32) {
        let detached = {
            let mut st = lock(&self.controller.state);
            let c = &mut st.channels[self.index];
            let on_grant = c
                .running
                .as_ref()
                .is_some_and(|r| r.adapter == adapter && r.first == first);
            if !on_grant {
                return;
            }
            let Some(mut r) = c.running.take() else {
                return;
            };
            c.stats.completed += 1;
            c.stats.cancelled += 1;
            let number = c.number;
            r.sg.clear();
            c.spare = core::mem::take(&mut r.sg);
            st.detached.push_back(Detached {
                channel: number,
                waiter: r.waiter.clone(),
            });
            // Returned, to be dropped after the lock (see `complete_one`).
            (number, r)
        };
        self.controller.note(format!(
            "channel {}: registers freed while transfer {} was running (stopped; Cancelled \
             delivered at the next step)",
            detached.0, detached.1.transfer
        ));
    }

    /// After `free` returned a grant's registers: the channel is free if that grant owned it.
    pub(crate) fn release(&self, adapter: usize, first: u32) {
        self.with_channel(|c| {
            if c.owner
                .is_some_and(|o| o.adapter == adapter && o.first == first)
            {
                c.owner = None;
            }
        });
    }

    /// Whether `map_system` may start a transfer now (none is running on the channel); notes
    /// a mapping by a waiter that does not own the channel.
    pub(crate) fn check_start(&self, adapter: usize, first: u32, waiter: &WaiterRef) -> Result<()> {
        let id = waiter_ref_id(waiter);
        let (busy, owned_by) = self.with_channel(|c| {
            (
                c.running.is_some(),
                c.owner
                    .is_some_and(|o| o.adapter == adapter && o.first == first && o.waiter == id),
            )
        });
        if busy {
            return Err(Error::InvalidDeviceState);
        }
        if !owned_by {
            self.controller.note(format!(
                "channel {}: map_system by a waiter or grant that does not own the channel",
                self.channel.channel
            ));
        }
        Ok(())
    }

    /// Start a controller transfer of the mapped bytes `sg`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        &self,
        adapter: &Arc<AdapterInner>,
        first: u32,
        waiter: &WaiterRef,
        direction: Direction,
        device_offset: u64,
        sg: &[SgElement],
        length: u64,
    ) {
        let mut st = lock(&self.controller.state);
        let (now, mode) = (st.now_ns, st.mode);
        let seq = st.seq;
        st.seq += 1;
        let c = &mut st.channels[self.index];
        if c.running.is_some() {
            drop(st);
            self.controller.note(format!(
                "channel {}: two transfers started at once",
                self.channel.channel
            ));
            return;
        }
        let transfer = c.stats.started;
        c.stats.started += 1;
        let fault = c
            .faults
            .iter()
            .find(|(t, _)| *t == transfer)
            .map(|&(_, f)| f);
        let mut list = core::mem::take(&mut c.spare);
        list.clear();
        list.extend_from_slice(sg);
        let due_ns = match mode {
            SystemCompletion::Deferred { latency_ns } => now.saturating_add(latency_ns),
            SystemCompletion::Manual => u64::MAX,
        };
        c.running = Some(Running {
            transfer,
            seq,
            waiter: waiter.clone(),
            waiter_id: waiter_ref_id(waiter),
            view: DeviceView {
                adapter: Arc::clone(adapter),
            },
            adapter: adapter.id,
            first,
            direction,
            address: self.channel.device_address.checked_add(device_offset),
            width: self.channel.width,
            sg: list,
            length,
            started_ns: now,
            due_ns,
            stalled: fault == Some(SystemFault::Stall),
            stopped: false,
            progress: 0,
            fault,
        });
    }

    /// `stop_system`: mark `waiter`'s running transfer stopped. Never calls a waiter.
    pub(crate) fn stop(&self, waiter: &WaiterRef) -> SystemStop {
        let id = waiter_ref_id(waiter);
        let mut st = lock(&self.controller.state);
        let now = st.now_ns;
        match &mut st.channels[self.index].running {
            Some(r) if r.waiter_id == id => {
                if r.stopped {
                    SystemStop::AlreadyStopped
                } else if !r.stalled && r.due_ns > r.started_ns && r.due_ns <= now {
                    // Finished in virtual time; its completion is only waiting to be delivered.
                    SystemStop::NotRunning
                } else {
                    r.stopped = true;
                    r.progress = r.progress_at(now);
                    SystemStop::Stopped
                }
            }
            _ => SystemStop::NotRunning,
        }
    }
}

/// Which running transfers a stepping call may complete.
#[derive(Clone, Copy)]
enum Pick {
    /// Due by virtual time (or stopped).
    Due,
    /// Any that is not stalled (or stopped).
    Any,
    /// Stalled ones (not stopped).
    Stalled,
}

impl SimSystemDma {
    pub(crate) fn new(inner: Controller) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Complete one transfer `pick` accepts (the one started first), or deliver a detached
    /// completion; call its waiter with no lock held. Returns whether one completed.
    fn complete_one(&self, pick: Pick) -> bool {
        // The finished transfer is dropped after the lock: its view may hold the last handle
        // of its adapter, whose drop takes the controller's lock.
        let mut finished = None;
        let (waiter, status) = {
            let mut st = lock(&self.inner.state);
            if !matches!(pick, Pick::Stalled)
                && let Some(d) = st.detached.pop_front()
            {
                (d.waiter, SystemDmaStatus::Cancelled { moved: 0 })
            } else {
                let now = st.now_ns;
                let eligible = |r: &Running| match pick {
                    Pick::Due => r.stopped || (!r.stalled && r.due_ns <= now),
                    Pick::Any => r.stopped || !r.stalled,
                    Pick::Stalled => r.stalled && !r.stopped,
                };
                let Some(index) = st
                    .channels
                    .iter()
                    .enumerate()
                    .filter_map(|(i, c)| {
                        c.running
                            .as_ref()
                            .filter(|r| eligible(r))
                            .map(|r| (r.seq, i))
                    })
                    .min()
                    .map(|(_, i)| i)
                else {
                    return false;
                };
                let Some(mut r) = st.channels[index].running.take() else {
                    return false;
                };
                let status = if r.stopped && r.progress == 0 {
                    SystemDmaStatus::Cancelled { moved: 0 }
                } else {
                    let fifo = r
                        .address
                        .and_then(|a| st.fifos.iter().find(|f| f.inner.address == a).cloned());
                    let mut scratch = core::mem::take(&mut st.scratch);
                    let status = perform(&r, fifo.as_ref(), &mut scratch);
                    st.scratch = scratch;
                    // A stopped transfer that reached its stop point is Cancelled; one that failed
                    // before it (a planned error, the FIFO, a blocked access) reports the error.
                    match status {
                        SystemDmaStatus::Complete if r.stopped => {
                            SystemDmaStatus::Cancelled { moved: r.progress }
                        }
                        _ => status,
                    }
                };
                let c = &mut st.channels[index];
                c.stats.completed += 1;
                match status {
                    SystemDmaStatus::Complete => c.stats.bytes_moved += r.length,
                    SystemDmaStatus::Error { moved } => {
                        c.stats.errors += 1;
                        c.stats.bytes_moved += moved;
                    }
                    SystemDmaStatus::Cancelled { moved } => {
                        c.stats.cancelled += 1;
                        c.stats.bytes_moved += moved;
                    }
                }
                r.sg.clear();
                c.spare = core::mem::take(&mut r.sg);
                let waiter = r.waiter.clone();
                finished = Some(r);
                (waiter, status)
            }
        };
        drop(finished);
        if let Some(w) = waiter.upgrade() {
            w.system_transfer_done(status);
        }
        true
    }

    /// Let `ns` of virtual time pass and complete, in start order, every transfer now due and
    /// every stopped one (transfers the waiters start meanwhile complete only if due too).
    /// Returns how many completions were delivered.
    pub fn advance(&self, ns: u64) -> usize {
        {
            let mut st = lock(&self.inner.state);
            st.now_ns = st.now_ns.saturating_add(ns);
        }
        let mut n = 0;
        while self.complete_one(Pick::Due) {
            n += 1;
        }
        n
    }

    /// Complete the oldest transfer that is not stalled (or is stopped), whatever the mode.
    /// Returns whether there was one.
    pub fn step(&self) -> bool {
        self.complete_one(Pick::Any)
    }

    /// Complete transfers, in start order, until only stalled ones are left (including
    /// transfers the waiters start meanwhile). Returns how many completed.
    pub fn run_pending(&self) -> usize {
        let mut n = 0;
        while self.complete_one(Pick::Any) {
            n += 1;
        }
        n
    }

    /// Complete every stalled transfer now (normally: the stall ends), in start order. Returns
    /// how many completed.
    pub fn release_stalled(&self) -> usize {
        let mut n = 0;
        while self.complete_one(Pick::Stalled) {
            n += 1;
        }
        n
    }

    /// Change the completion mode for transfers started from now on.
    pub fn set_mode(&self, mode: SystemCompletion) {
        lock(&self.inner.state).mode = mode;
    }

    /// Virtual time in nanoseconds.
    pub fn now_ns(&self) -> u64 {
        lock(&self.inner.state).now_ns
    }

    /// Transfers whose completion has not been delivered (running, stalled, stopped or
    /// detached).
    pub fn pending(&self) -> usize {
        let st = lock(&self.inner.state);
        st.channels.iter().filter(|c| c.running.is_some()).count() + st.detached.len()
    }

    /// Plan `fault` for transfer number `transfer` (0-based count of starts) on `channel`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the channel is not configured.
    pub fn inject(&self, channel: u32, transfer: u64, fault: SystemFault) -> Result<()> {
        let mut st = lock(&self.inner.state);
        let c = st
            .channels
            .iter_mut()
            .find(|c| c.number == channel)
            .ok_or(Error::InvalidParameter)?;
        c.faults.retain(|(t, _)| *t != transfer);
        c.faults.push((transfer, fault));
        Ok(())
    }

    /// Forget all planned faults of every channel.
    pub fn clear_faults(&self) {
        for c in &mut lock(&self.inner.state).channels {
            c.faults.clear();
        }
    }

    /// Counters of `channel`, or `None` if it is not configured.
    pub fn channel_stats(&self, channel: u32) -> Option<ChannelStats> {
        let st = lock(&self.inner.state);
        let c = st.channels.iter().find(|c| c.number == channel)?;
        let mut s = c.stats;
        s.owned = c.owner.is_some();
        s.queued = c.queue.len();
        s.running = c.running.is_some();
        Some(s)
    }

    /// Whether a waiter owns `channel` now.
    pub fn channel_owned(&self, channel: u32) -> bool {
        self.channel_stats(channel).is_some_and(|s| s.owned)
    }

    /// Register a FIFO endpoint at device address `address` whose received data holds up to
    /// `capacity` bytes. That room is allocated here (so transfers never allocate): pass the
    /// capacity the test needs, not a huge number meaning "unbounded".
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if an endpoint is already registered at `address`.
    pub fn add_fifo(&self, address: u64, capacity: usize) -> Result<SimFifo> {
        let mut st = lock(&self.inner.state);
        if st.fifos.iter().any(|f| f.inner.address == address) {
            return Err(Error::InvalidParameter);
        }
        let fifo = SimFifo {
            inner: Arc::new(FifoInner {
                address,
                capacity,
                // The whole capacity up front: a transfer into the FIFO never allocates.
                state: Mutex::new(FifoState {
                    received: Vec::with_capacity(capacity),
                    source: VecDeque::new(),
                }),
            }),
        };
        st.fifos.push(fifo.clone());
        Ok(fifo)
    }

    /// The FIFO endpoint registered at `address`.
    pub fn fifo(&self, address: u64) -> Option<SimFifo> {
        lock(&self.inner.state)
            .fifos
            .iter()
            .find(|f| f.inner.address == address)
            .cloned()
    }
}

/// Move the data of a transfer between host memory (through the adapter's view, so the
/// sanitizer checks every access) and its FIFO; a stopped transfer moves only its progress.
/// Called with the controller's lock held.
fn perform(r: &Running, fifo: Option<&SimFifo>, scratch: &mut Vec<u8>) -> SystemDmaStatus {
    let Some(fifo) = fifo else {
        return SystemDmaStatus::Error { moved: 0 };
    };
    let whole = r.length - r.length % r.width.bytes();
    let mut budget = whole;
    let mut failed = whole != r.length;
    if r.stopped {
        // Only what it had moved before the stop (a multiple of the width).
        budget = r.progress.min(whole);
        failed = false;
    }
    if let Some(SystemFault::ErrorAt(n)) = r.fault
        && (!r.stopped || n < budget)
    {
        budget = budget.min(n);
        failed = true;
    }
    let mut f = lock(&fifo.inner.state);
    let mut moved = 0u64;
    for e in &r.sg {
        if moved == budget {
            break;
        }
        let want = u64::from(e.length).min(budget - moved) as usize;
        let n = match r.direction {
            Direction::WriteToDevice => {
                want.min(fifo.inner.capacity.saturating_sub(f.received.len()))
            }
            Direction::ReadFromDevice => want.min(f.source.len()),
        };
        scratch.clear();
        scratch.resize(n, 0);
        let ok = match r.direction {
            Direction::WriteToDevice => {
                let ok = r.view.dma_read(e.address, scratch).is_ok();
                if ok {
                    f.received.extend_from_slice(scratch);
                }
                ok
            }
            Direction::ReadFromDevice => {
                for (d, s) in scratch.iter_mut().zip(f.source.iter()) {
                    *d = *s;
                }
                let ok = r.view.dma_write(e.address, scratch).is_ok();
                if ok {
                    f.source.drain(..n);
                }
                ok
            }
        };
        if !ok {
            failed = true;
            break;
        }
        moved += n as u64;
        if n < want {
            failed = true;
            break;
        }
    }
    if failed {
        SystemDmaStatus::Error { moved }
    } else {
        SystemDmaStatus::Complete
    }
}

#[derive(Debug, Default)]
struct FifoState {
    received: Vec<u8>,
    source: VecDeque<u8>,
}

struct FifoInner {
    address: u64,
    capacity: usize,
    state: Mutex<FifoState>,
}

/// A device FIFO endpoint at a device address: the controller appends the bytes of
/// write-to-device transfers to its received data, and takes the bytes of read-from-device
/// transfers from its source queue. Cheap to clone.
#[derive(Clone)]
pub struct SimFifo {
    inner: Arc<FifoInner>,
}

impl core::fmt::Debug for SimFifo {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let st = lock(&self.inner.state);
        f.debug_struct("SimFifo")
            .field("address", &format_args!("{:#x}", self.inner.address))
            .field("capacity", &self.inner.capacity)
            .field("received", &st.received.len())
            .field("source", &st.source.len())
            .finish()
    }
}

impl SimFifo {
    /// The device address the FIFO answers at.
    pub fn address(&self) -> u64 {
        self.inner.address
    }

    /// Bytes of received data the FIFO holds at most (until taken).
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Take the bytes write-to-device transfers delivered so far, oldest first.
    pub fn take_received(&self) -> Vec<u8> {
        // Drained, not swapped out, so the FIFO keeps its preallocated room.
        lock(&self.inner.state).received.drain(..).collect()
    }

    /// Bytes received and not yet taken.
    pub fn received_len(&self) -> usize {
        lock(&self.inner.state).received.len()
    }

    /// Queue `data` for read-from-device transfers to take (the source is not bounded by the
    /// capacity).
    pub fn push_source(&self, data: &[u8]) {
        lock(&self.inner.state).source.extend(data.iter().copied());
    }

    /// Bytes in the source queue not yet taken by a transfer.
    pub fn source_len(&self) -> usize {
        lock(&self.inner.state).source.len()
    }
}
