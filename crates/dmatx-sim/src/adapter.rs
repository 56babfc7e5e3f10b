//! Simulated DMA adapters: map registers, the three mapping modes, queued allocation and common
//! buffers (spec §0, §1.3, §3.2–§3.3).
//!
//! An adapter owns N map registers. Register `r` maps one page of device-visible address space:
//! * [`AdapterMode::Direct`]: the bus address is the physical address; pages above the device's
//!   address limit cannot be mapped.
//! * [`AdapterMode::Iommu`]: register `r` is the IOVA page `iova_base + r·4096`, so a grant of
//!   consecutive registers maps a transfer to one contiguous bus range.
//! * [`AdapterMode::Bounce`]: pages the device can reach are used directly; a page above its
//!   limit goes through the register's bounce page (copied in at `map` for a write-to-device
//!   transfer, copied back at `flush` for a read-from-device one).
//!
//! All bookkeeping that `allocate`, `map`, `flush` and `free` touch is sized from N when the
//! adapter is created (and the waiter queue when waiters are registered), so the steady state
//! allocates nothing.

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::{Arc, Mutex, MutexGuard};

use dmatx_hal::{
    Adapter, Allocation, AllocationRequest, BusAddr, CommonAllocation, DeviceDescription,
    Direction, Error, MapRegisters, Mapping, MemoryDescriptor, PAGE_SIZE, PhysAddr, Result,
    SgElement, SystemStop, VirtAddr, Waiter, WaiterRef, waiter_id, waiter_ref_id,
};

use crate::memory::{FrameRequest, FrameUse, Order, lock};
use crate::platform::Shared;
use crate::sanitizer::{Access, DeviceView, Violation, ViolationKind};
use crate::system::SystemBinding;

/// Default number of map registers per adapter.
pub const DEFAULT_MAP_REGISTERS: u32 = 32;
/// Default IOVA base of the register window for devices that reach 4 GiB.
pub const DEFAULT_IOVA_BASE: u64 = 0x8000_0000;
/// Base of the fake virtual addresses of common buffers.
const COMMON_VA_BASE: u64 = 0x6000_0000_0000;

/// How an adapter turns physical pages into bus addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AdapterMode {
    /// Bus address = physical address; pages above the device's limit cannot be mapped
    /// ([`Error::InsufficientResources`]).
    #[default]
    Direct,
    /// Each register is one IOVA page; a grant maps to one contiguous bus range.
    Iommu,
    /// Direct where the device reaches the page, else through the register's bounce page.
    Bounce,
}

/// How the platform builds the next adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdapterConfig {
    /// Map registers (N). Fewer than 2 makes adapter creation fail.
    pub map_registers: u32,
    /// Mapping mode.
    pub mode: AdapterMode,
    /// IOVA of register 0 in [`AdapterMode::Iommu`]; `None` picks [`DEFAULT_IOVA_BASE`] for
    /// devices that reach 4 GiB, else the middle of the device's address space.
    pub iova_base: Option<u64>,
    /// Common-buffer alignment mask the adapter reports ([`Adapter::alignment_requirement`]).
    pub alignment_requirement: u64,
    /// Make adapter creation fail with [`Error::Unsuccessful`].
    pub fail: bool,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            map_registers: DEFAULT_MAP_REGISTERS,
            mode: AdapterMode::Direct,
            iova_base: None,
            alignment_requirement: 0,
            fail: false,
        }
    }
}

impl AdapterConfig {
    /// This configuration with `n` map registers.
    pub const fn map_registers(mut self, n: u32) -> Self {
        self.map_registers = n;
        self
    }

    /// This configuration with mapping mode `mode`.
    pub const fn mode(mut self, mode: AdapterMode) -> Self {
        self.mode = mode;
        self
    }

    /// This configuration with the IOVA window at `base`.
    pub const fn iova_base(mut self, base: u64) -> Self {
        self.iova_base = Some(base);
        self
    }

    /// This configuration with common-buffer alignment mask `mask`.
    pub const fn alignment_requirement(mut self, mask: u64) -> Self {
        self.alignment_requirement = mask;
        self
    }

    /// A configuration whose adapter creation fails.
    pub const fn failing() -> Self {
        Self {
            map_registers: DEFAULT_MAP_REGISTERS,
            mode: AdapterMode::Direct,
            iova_base: None,
            alignment_requirement: 0,
            fail: true,
        }
    }
}

/// Counters and occupancy of one adapter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdapterStats {
    /// The adapter's id.
    pub id: usize,
    /// Its mapping mode.
    pub mode: AdapterMode,
    /// The device's address limit (inclusive).
    pub address_limit: u64,
    /// Map registers (N).
    pub total_registers: u32,
    /// Registers free now.
    pub free_registers: u32,
    /// Registers held by [`SimAdapter::exhaust`].
    pub hostage_registers: u32,
    /// Most registers granted at once.
    pub peak_in_use: u32,
    /// Requests waiting in the queue now.
    pub queued: usize,
    /// Mappings live now.
    pub live_mappings: usize,
    /// Common buffers allocated now.
    pub common_buffers: usize,
    /// Grants made (at once or from the queue).
    pub grants: u64,
    /// Requests that were queued.
    pub queued_total: u64,
    /// Requests refused (immediate and not free, or more than N).
    pub refusals: u64,
    /// Queued requests withdrawn by `cancel_allocation`.
    pub cancels: u64,
    /// `map` calls that mapped something.
    pub maps: u64,
    /// `map` calls that mapped fewer bytes than asked.
    pub short_maps: u64,
    /// Bytes mapped.
    pub bytes_mapped: u64,
    /// `flush` calls that ended a mapping.
    pub flushes: u64,
    /// `flush` calls that returned an error.
    pub flush_errors: u64,
    /// Registers freed while their mapping was still live (never flushed).
    pub unflushed_frees: u64,
    /// Bytes copied to or from bounce pages.
    pub bytes_bounced: u64,
    /// Device read accesses that were allowed.
    pub device_reads: u64,
    /// Device write accesses that were allowed.
    pub device_writes: u64,
    /// Bytes devices read.
    pub device_bytes_read: u64,
    /// Bytes devices wrote.
    pub device_bytes_written: u64,
    /// Device accesses the sanitizer blocked.
    pub violations: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RegState {
    Free,
    Granted,
    Hostage,
}

/// What one register maps while a mapping is live, decoded from its [`RegSlot`].
#[derive(Clone, Copy, Debug)]
struct RegMap {
    /// Bus address of the page the register maps.
    bus_page: u64,
    /// Physical page the device's bytes land in (the bounce page when bounced).
    data_page: u64,
    /// The buffer's physical page.
    buffer_page: u64,
    /// Mapped bytes within the page: `lo .. hi`.
    lo: u64,
    hi: u64,
    bounced: bool,
}

/// Bit of [`RegSlot::page`] set when the register's page is bounced (page addresses have their
/// low bits clear).
const BOUNCED: u64 = 1;
/// Bits of each of `lo` and `hi` in [`RegSlot::range`].
const SPAN_BITS: u32 = 16;
const SPAN_MASK: u64 = (1 << SPAN_BITS) - 1;
const _: () = assert!(PAGE_SIZE <= SPAN_MASK && PAGE_SIZE > BOUNCED);

/// Aligns its contents to their own cache lines (two, for adjacent-line prefetchers), so that
/// grants held by different threads do not share a line.
#[derive(Default)]
#[repr(align(128))]
struct Padded<T>(T);

/// The mapping fields of one register, packed in two words (the bus and data pages follow from
/// them and the register's index). They are written only by `map`, with the slot of the grant
/// holding the register locked, and read by the sanitizer with that same slot locked and the
/// slot's live mapping covering the register, so a reader sees one whole mapping. Outside a
/// live mapping they are stale and mean nothing (only hints for the sanitizer's search).
#[derive(Default)]
struct RegSlot {
    /// The buffer's physical page, `| BOUNCED`.
    page: AtomicU64,
    /// `lo | hi << SPAN_BITS | owner << 32`, where `owner` is the first register of the grant
    /// that mapped the register last: the slot the sanitizer locks to check the mapping.
    range: AtomicU64,
}

impl RegSlot {
    #[inline]
    fn store(&self, buffer_page: u64, bounced: bool, lo: u64, hi: u64, owner: u32) {
        self.page
            .store(buffer_page | if bounced { BOUNCED } else { 0 }, Relaxed);
        self.range
            .store(lo | (hi << SPAN_BITS) | (u64::from(owner) << 32), Relaxed);
    }

    #[inline]
    fn owner(&self) -> usize {
        (self.range.load(Relaxed) >> 32) as usize
    }
}

/// A live mapping of a grant.
#[derive(Clone, Copy, Debug)]
struct LiveMap {
    used: u32,
    offset: u64,
    bytes: u64,
    direction: Direction,
    /// Some page of it goes through a bounce page.
    bounced: bool,
}

/// Counters kept per grant slot (summed by [`AdapterInner::stats`]), so that transfers on
/// different grants never write a shared line.
#[derive(Clone, Copy, Debug, Default)]
struct SlotCounters {
    maps: u64,
    short_maps: u64,
    bytes_mapped: u64,
    flushes: u64,
    flush_errors: u64,
    unflushed_frees: u64,
    bytes_bounced: u64,
}

/// The grant starting at a register, if one does: what `map`, `flush` and `free` touch, locked
/// per grant. Only the grant's holder (and the sanitizer) take the lock.
#[derive(Debug, Default)]
struct Slot {
    /// Registers of the grant starting here; 0 if none does.
    count: u32,
    live: Option<LiveMap>,
    counters: SlotCounters,
}

/// Device-access counters (atomics: device models run on any thread).
#[derive(Debug, Default)]
struct DeviceCounters {
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    violations: AtomicU64,
}

struct Queued {
    waiter: Waiter,
    count: u32,
}

#[derive(Clone, Copy, Debug)]
struct CommonRecord {
    token: u64,
    bus: u64,
    phys: u64,
    pages: u64,
    length: u64,
}

/// Register allocation and the waiter queue: the adapter-wide lock, held only briefly by
/// `allocate` and `free` (never while mapping).
struct State {
    regs: Vec<RegState>,
    queue: VecDeque<Queued>,
    registered: usize,
    in_use: u32,
    /// Counters of allocation (grants, queueing, refusals, cancels, peak).
    stats: AdapterStats,
}

/// Common buffers, sorted by bus address.
struct Common {
    records: Vec<CommonRecord>,
    next_token: u64,
}

/// The shared state behind a [`SimAdapter`].
///
/// Lock order: `state` before a grant slot (a grant is opened with both held); a grant slot or
/// `common` before the memory's copy lock. No path holds two grant slots, or a slot and
/// `common`, at once.
pub(crate) struct AdapterInner {
    pub(crate) id: usize,
    pub(crate) shared: Arc<Shared>,
    config: AdapterConfig,
    description: DeviceDescription,
    limit: u64,
    n: u32,
    iova_base: u64,
    /// Bounce page of each register (empty unless in bounce mode).
    bounce: Vec<PhysAddr>,
    /// Padded, as are the other fields written at run time, so that writing them does not
    /// evict the read-only fields above from the caches of threads mapping.
    state: Padded<Mutex<State>>,
    /// Mapping fields of each register.
    regs: Vec<RegSlot>,
    /// The grant starting at each register.
    slots: Vec<Padded<Mutex<Slot>>>,
    common: Padded<Mutex<Common>>,
    /// Whether `fail_flush` holds an error (so `flush` need not lock it).
    fail_armed: AtomicBool,
    fail_flush: Mutex<Option<Error>>,
    device: Padded<DeviceCounters>,
    /// The controller channel of a system adapter (`None` for bus-master adapters).
    pub(crate) system: Option<SystemBinding>,
}

/// A simulated DMA adapter (cheap to clone; clones name the same adapter).
///
/// Besides the [`Adapter`] contract it has test knobs ([`SimAdapter::exhaust`],
/// [`SimAdapter::fail_next_flush`]), a [`DeviceView`] for device models and [`AdapterStats`].
#[derive(Clone)]
pub struct SimAdapter {
    pub(crate) inner: Arc<AdapterInner>,
}

impl core::fmt::Debug for SimAdapter {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SimAdapter")
            .field("id", &self.inner.id)
            .field("mode", &self.inner.config.mode)
            .field("map_registers", &self.inner.n)
            .finish()
    }
}

/// Count one more registered waiter and make sure `queue` can hold them all without
/// allocating when they queue (no allocation after creation).
pub(crate) fn reserve_waiter_room<T>(
    registered: &mut usize,
    queue: &mut VecDeque<T>,
) -> Result<()> {
    let want = *registered + 1;
    queue
        .try_reserve(want.saturating_sub(queue.len()))
        .map_err(|_| Error::InsufficientResources)?;
    *registered = want;
    Ok(())
}

fn page(addr: u64) -> u64 {
    addr - addr % PAGE_SIZE
}

impl AdapterInner {
    pub(crate) fn new(
        shared: Arc<Shared>,
        id: usize,
        config: AdapterConfig,
        description: &DeviceDescription,
        system: Option<SystemBinding>,
    ) -> Result<Self> {
        let n = config.map_registers;
        if config.fail || n < 2 {
            return Err(Error::Unsuccessful);
        }
        let limit = description.address_limit();
        let window = u64::from(n) * PAGE_SIZE;
        let iova_base = match config.mode {
            AdapterMode::Iommu => {
                let base = config.iova_base.unwrap_or(if limit >= 0xFFFF_FFFF {
                    DEFAULT_IOVA_BASE
                } else {
                    page(limit / 2 + 1)
                });
                let fits = base.is_multiple_of(PAGE_SIZE)
                    && base.checked_add(window - 1).is_some_and(|end| end <= limit);
                if !fits {
                    return Err(Error::Unsuccessful);
                }
                base
            }
            _ => 0,
        };
        let bounce = if config.mode == AdapterMode::Bounce {
            let pages = n as usize;
            let mut request = FrameRequest {
                pages,
                order: Order::Contiguous,
                min: 0,
                max: limit,
            };
            shared
                .memory
                .allocate(request, FrameUse::Bounce)
                .or_else(|_| {
                    request.order = Order::Ascending;
                    shared.memory.allocate(request, FrameUse::Bounce)
                })
                .map_err(|_| Error::Unsuccessful)?
        } else {
            Vec::new()
        };
        let stats = AdapterStats {
            id,
            mode: config.mode,
            address_limit: limit,
            total_registers: n,
            free_registers: n,
            ..AdapterStats::default()
        };
        Ok(Self {
            id,
            shared,
            config,
            description: *description,
            limit,
            n,
            iova_base,
            bounce,
            state: Padded(Mutex::new(State {
                regs: vec![RegState::Free; n as usize],
                queue: VecDeque::new(),
                registered: 0,
                in_use: 0,
                stats,
            })),
            regs: (0..n).map(|_| RegSlot::default()).collect(),
            slots: (0..n).map(|_| Padded::default()).collect(),
            common: Padded(Mutex::new(Common {
                records: Vec::new(),
                next_token: 1,
            })),
            fail_armed: AtomicBool::new(false),
            fail_flush: Mutex::new(None),
            device: Padded::default(),
            system,
        })
    }

    /// First fit: the lowest register starting `count` consecutive free ones.
    fn find_run(st: &State, count: u32) -> Option<u32> {
        let count = count as usize;
        let mut run = 0;
        for (i, r) in st.regs.iter().enumerate() {
            if *r == RegState::Free {
                run += 1;
                if run == count {
                    return u32::try_from(i + 1 - count).ok();
                }
            } else {
                run = 0;
            }
        }
        None
    }

    /// Grant the free registers `first .. first + count` (with `st` locked). The caller opens
    /// the grant's slot with [`AdapterInner::open`] once it has dropped the lock.
    fn grant(st: &mut State, first: u32, count: u32) -> MapRegisters {
        for r in &mut st.regs[first as usize..(first + count) as usize] {
            *r = RegState::Granted;
        }
        st.in_use += count;
        st.stats.peak_in_use = st.stats.peak_in_use.max(st.in_use);
        st.stats.grants += 1;
        MapRegisters::new(first, count)
    }

    /// Open the slot of a grant just made, before handing it out. Until then its slot says no
    /// grant starts there (the last `free` of the registers closed it before returning them), so
    /// nothing else touches the registers in between.
    pub(crate) fn open(&self, registers: MapRegisters) -> MapRegisters {
        let mut slot = lock(&self.slots[registers.first() as usize].0);
        slot.count = registers.count();
        slot.live = None;
        drop(slot);
        registers
    }

    /// Bus and data pages of register `r` mapping `buffer_page` (bounced or not).
    #[inline]
    fn pages_of(&self, r: usize, buffer_page: u64, bounced: bool) -> (u64, u64) {
        if bounced {
            let b = self.bounce[r].get();
            (b, b)
        } else if self.config.mode == AdapterMode::Iommu {
            (self.iova_base + r as u64 * PAGE_SIZE, buffer_page)
        } else {
            (buffer_page, buffer_page)
        }
    }

    /// The mapping register `r`'s fields describe (meaningful only while live).
    #[inline]
    fn reg_map(&self, r: usize) -> RegMap {
        let reg = &self.regs[r];
        let page = reg.page.load(Relaxed);
        let range = reg.range.load(Relaxed);
        let (buffer_page, bounced) = (page & !BOUNCED, page & BOUNCED != 0);
        let (bus_page, data_page) = self.pages_of(r, buffer_page, bounced);
        RegMap {
            bus_page,
            data_page,
            buffer_page,
            lo: range & SPAN_MASK,
            hi: (range >> SPAN_BITS) & SPAN_MASK,
            bounced,
        }
    }

    /// The slot of `registers`, locked, if it is a grant of this adapter that is outstanding
    /// now.
    #[inline]
    fn grant_slot(&self, registers: &MapRegisters) -> Option<MutexGuard<'_, Slot>> {
        let (first, count) = (registers.first(), registers.count());
        if count == 0 || first.checked_add(count).is_none_or(|end| end > self.n) {
            return None;
        }
        let slot = lock(&self.slots[first as usize].0);
        (slot.count == count).then_some(slot)
    }

    /// Grant `count` free registers now if a run of them is free (system adapters: the
    /// controller holds its lock and has decided the channel is free). The caller opens the
    /// grant with [`AdapterInner::open`] once it has dropped its locks.
    pub(crate) fn try_grant(&self, count: u32) -> Option<MapRegisters> {
        let mut st = lock(&self.state.0);
        let first = Self::find_run(&st, count)?;
        Some(Self::grant(&mut st, first, count))
    }

    /// Count a refused request (system adapters, whose queue is the channel's).
    pub(crate) fn count_refusal(&self) {
        lock(&self.state.0).stats.refusals += 1;
    }

    /// Count a queued request (system adapters).
    pub(crate) fn count_queued(&self) {
        lock(&self.state.0).stats.queued_total += 1;
    }

    /// Count a withdrawn request (system adapters).
    pub(crate) fn count_cancel(&self) {
        lock(&self.state.0).stats.cancels += 1;
    }

    /// Grant queued requests, in order, while the head fits; call each waiter with no lock held.
    /// A system adapter's queue is its channel's.
    fn grant_waiters(&self) {
        if let Some(system) = &self.system {
            system.grant_waiters();
            return;
        }
        loop {
            let (waiter, registers) = {
                let mut st = lock(&self.state.0);
                let Some(head) = st.queue.front() else { return };
                let Some(first) = Self::find_run(&st, head.count) else {
                    return;
                };
                let Some(q) = st.queue.pop_front() else {
                    return;
                };
                let registers = Self::grant(&mut st, first, q.count);
                (q.waiter, registers)
            };
            waiter.granted(self.open(registers));
        }
    }

    fn note(&self, issue: String) {
        lock(&self.shared.issues).push(format!("adapter {}: {issue}", self.id));
    }

    /// Whether register `r` has a live mapping covering `lo .. hi` of `bus_page` for `access`:
    /// its grant's slot, locked (so the mapping stays live while it is held), and the physical
    /// address of byte `lo`.
    fn reg_translation(
        &self,
        r: usize,
        bus_page: u64,
        lo: u64,
        hi: u64,
        access: Access,
        wrong_direction: &mut bool,
    ) -> Option<(MutexGuard<'_, Slot>, u64)> {
        // The owner is a hint: what decides is the slot's live mapping covering `r`, and a
        // live mapping of the grant at `owner` covering `r` means the grant still holds `r`
        // and wrote its fields under this lock. A device access that may use the mapping
        // happens after the `map` that made it, so it sees that map's owner.
        let owner = self.regs[r].owner();
        if owner > r {
            return None;
        }
        let slot = lock(&self.slots[owner].0);
        let live = slot.live?;
        if r >= owner + live.used as usize {
            return None;
        }
        let m = self.reg_map(r);
        if m.bus_page != bus_page || lo < m.lo || hi > m.hi {
            return None;
        }
        let allowed = match access {
            Access::Read => live.direction == Direction::WriteToDevice,
            Access::Write => live.direction == Direction::ReadFromDevice,
        };
        if allowed {
            Some((slot, m.data_page + lo))
        } else {
            *wrong_direction = true;
            None
        }
    }

    /// Translate one device chunk (within a bus page) to the physical address holding it and
    /// call `f` with it, holding the lock of the live mapping or common buffer that covers the
    /// chunk (so no `flush`, `free` or common-buffer free ends it meanwhile).
    fn with_translation<R>(
        &self,
        bus: u64,
        len: u64,
        access: Access,
        f: impl FnOnce(u64) -> R,
    ) -> Result<R, ViolationKind> {
        let bus_page = page(bus);
        let lo = bus - bus_page;
        let hi = lo + len;
        let mut wrong_direction = false;
        if self.config.mode == AdapterMode::Iommu {
            let window = u64::from(self.n) * PAGE_SIZE;
            if let Some(off) = bus_page.checked_sub(self.iova_base).filter(|o| *o < window)
                && let Some((_slot, p)) = self.reg_translation(
                    (off / PAGE_SIZE) as usize,
                    bus_page,
                    lo,
                    hi,
                    access,
                    &mut wrong_direction,
                )
            {
                return Ok(f(p));
            }
        } else {
            for (r, reg) in self.regs.iter().enumerate() {
                // Skip registers whose last mapping was of another page without locking.
                let page = reg.page.load(Relaxed);
                if self.pages_of(r, page & !BOUNCED, page & BOUNCED != 0).0 != bus_page {
                    continue;
                }
                if let Some((_slot, p)) =
                    self.reg_translation(r, bus_page, lo, hi, access, &mut wrong_direction)
                {
                    return Ok(f(p));
                }
            }
        }
        {
            let common = lock(&self.common.0);
            for c in &common.records {
                if bus >= c.bus && bus + len <= c.bus + c.length {
                    return Ok(f(c.phys + (bus - c.bus)));
                }
            }
        }
        Err(if wrong_direction {
            ViolationKind::WrongDirection
        } else {
            ViolationKind::NotMapped
        })
    }

    /// A device access of `len` bytes at `bus`: check every byte, then move them all with
    /// `copy(phys, position, bytes)` per chunk, or move nothing and record a violation.
    ///
    /// Each chunk is checked, and later copied, with the mapping covering it locked, so a
    /// chunk's copy never overlaps the end of its mapping. A `flush` or `free` racing the access
    /// from another thread (a driver bug) can end a mapping between the check and the copy;
    /// the access is then reported as a violation after the chunks before it moved.
    pub(crate) fn device_access(
        &self,
        bus: u64,
        len: usize,
        access: Access,
        mut copy: impl FnMut(u64, usize, usize) -> bool,
    ) -> Result<(), Violation> {
        let memory = &self.shared.memory;
        let outcome = (|| {
            let end = bus
                .checked_add(len as u64)
                .ok_or(ViolationKind::NotMapped)?;
            for pass in 0..2 {
                let mut pos = bus;
                while pos < end {
                    let chunk = (page(pos) + PAGE_SIZE).min(end) - pos;
                    let at = (pos - bus) as usize;
                    let moved = self.with_translation(pos, chunk, access, |phys| {
                        if pass == 0 {
                            memory.contains(phys, chunk as usize)
                        } else {
                            copy(phys, at, chunk as usize)
                        }
                    })?;
                    if !moved {
                        return Err(ViolationKind::OutsideMemory);
                    }
                    pos += chunk;
                }
            }
            Ok(())
        })();
        let d = &self.device.0;
        match outcome {
            Ok(()) => {
                match access {
                    Access::Read => {
                        d.reads.fetch_add(1, Relaxed);
                        d.bytes_read.fetch_add(len as u64, Relaxed);
                    }
                    Access::Write => {
                        d.writes.fetch_add(1, Relaxed);
                        d.bytes_written.fetch_add(len as u64, Relaxed);
                    }
                }
                Ok(())
            }
            Err(kind) => {
                d.violations.fetch_add(1, Relaxed);
                let v = Violation {
                    adapter: self.id,
                    access,
                    bus: BusAddr::new(bus),
                    length: len as u64,
                    kind,
                };
                lock(&self.shared.violations).push(v);
                Err(v)
            }
        }
    }

    /// Counters and occupancy: the allocation state, then each grant slot, then the common
    /// buffers, one lock at a time (a snapshot of each, not of all at once).
    fn stats(&self) -> AdapterStats {
        let mut s = {
            let st = lock(&self.state.0);
            let mut s = st.stats;
            s.free_registers = st.regs.iter().filter(|r| **r == RegState::Free).count() as u32;
            s.hostage_registers =
                st.regs.iter().filter(|r| **r == RegState::Hostage).count() as u32;
            s.queued = st.queue.len();
            s
        };
        if let Some(system) = &self.system {
            s.queued += system.queued_for(self.id);
        }
        for slot in &self.slots {
            let slot = lock(&slot.0);
            let c = &slot.counters;
            s.live_mappings += usize::from(slot.live.is_some());
            s.maps += c.maps;
            s.short_maps += c.short_maps;
            s.bytes_mapped += c.bytes_mapped;
            s.flushes += c.flushes;
            s.flush_errors += c.flush_errors;
            s.unflushed_frees += c.unflushed_frees;
            s.bytes_bounced += c.bytes_bounced;
        }
        s.common_buffers = lock(&self.common.0).records.len();
        let d = &self.device.0;
        s.device_reads = d.reads.load(Relaxed);
        s.device_writes = d.writes.load(Relaxed);
        s.device_bytes_read = d.bytes_read.load(Relaxed);
        s.device_bytes_written = d.bytes_written.load(Relaxed);
        s.violations = d.violations.load(Relaxed);
        s
    }

    /// The error armed by [`SimAdapter::fail_next_flush`], taken.
    fn take_flush_failure(&self) -> Option<Error> {
        if !self.fail_armed.load(Acquire) {
            return None;
        }
        let mut f = lock(&self.fail_flush);
        self.fail_armed.store(false, Relaxed);
        f.take()
    }

    /// What is not back to idle, in words.
    pub(crate) fn leftovers(&self, out: &mut Vec<String>) {
        let s = self.stats();
        let id = self.id;
        if s.free_registers != s.total_registers {
            out.push(format!(
                "adapter {id}: {} of {} map registers free ({} held by exhaust)",
                s.free_registers, s.total_registers, s.hostage_registers
            ));
        }
        if s.queued > 0 {
            out.push(format!(
                "adapter {id}: {} allocation requests still queued",
                s.queued
            ));
        }
        if s.live_mappings > 0 {
            out.push(format!(
                "adapter {id}: {} mappings still live (never flushed)",
                s.live_mappings
            ));
        }
        if s.common_buffers > 0 {
            out.push(format!(
                "adapter {id}: {} common buffers not freed",
                s.common_buffers
            ));
        }
    }
}

#[cfg(test)]
impl AdapterInner {
    /// Room in the waiter queue.
    pub(crate) fn queue_capacity(&self) -> usize {
        lock(&self.state.0).queue.capacity()
    }
}

impl Drop for AdapterInner {
    fn drop(&mut self) {
        let mut issues = Vec::new();
        self.leftovers(&mut issues);
        let stats = self.stats();
        let common = self
            .common
            .0
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for c in common.records.drain(..) {
            let frames: Vec<PhysAddr> = (0..c.pages)
                .map(|i| PhysAddr::new(c.phys + i * PAGE_SIZE))
                .collect();
            self.shared.memory.free(&frames, FrameUse::Common);
        }
        self.shared.memory.free(&self.bounce, FrameUse::Bounce);
        lock(&self.shared.retired).push(stats);
        if !issues.is_empty() {
            lock(&self.shared.issues)
                .extend(issues.into_iter().map(|i| format!("{i} when dropped")));
        }
    }
}

impl SimAdapter {
    /// The adapter's id (unique within its platform, in creation order from 0).
    pub fn id(&self) -> usize {
        self.inner.id
    }

    /// The device description the adapter was created for.
    pub fn description(&self) -> DeviceDescription {
        self.inner.description
    }

    /// The configuration the adapter was created with.
    pub fn config(&self) -> AdapterConfig {
        self.inner.config
    }

    /// The highest bus address the device reaches (inclusive).
    pub fn address_limit(&self) -> u64 {
        self.inner.limit
    }

    /// IOVA of register 0 (meaningful in [`AdapterMode::Iommu`]).
    pub fn iova_base(&self) -> u64 {
        self.inner.iova_base
    }

    /// The view a device model uses to reach memory through this adapter.
    pub fn device_view(&self) -> DeviceView {
        DeviceView {
            adapter: Arc::clone(&self.inner),
        }
    }

    /// Hold up to `k` free registers hostage (the highest-numbered first) so allocations queue
    /// or, when immediate, fail. Returns how many were taken. Cumulative; see
    /// [`SimAdapter::restore`].
    pub fn exhaust(&self, k: u32) -> u32 {
        let mut st = lock(&self.inner.state.0);
        let mut taken = 0;
        for r in st.regs.iter_mut().rev() {
            if taken == k {
                break;
            }
            if *r == RegState::Free {
                *r = RegState::Hostage;
                taken += 1;
            }
        }
        taken
    }

    /// Release all hostage registers and grant queued requests that now fit (their waiters
    /// run on this thread).
    pub fn restore(&self) {
        {
            let mut st = lock(&self.inner.state.0);
            for r in st.regs.iter_mut().filter(|r| **r == RegState::Hostage) {
                *r = RegState::Free;
            }
        }
        self.inner.grant_waiters();
    }

    /// Make the next `flush` return `error` (it still ends the mapping and copies back).
    pub fn fail_next_flush(&self, error: Error) {
        let a = &*self.inner;
        *lock(&a.fail_flush) = Some(error);
        a.fail_armed.store(true, Release);
    }

    /// Registers free now.
    pub fn free_registers(&self) -> u32 {
        self.inner.stats().free_registers
    }

    /// Requests queued now (for a system adapter: its requests waiting for the channel).
    pub fn queued(&self) -> usize {
        let own = lock(&self.inner.state.0).queue.len();
        own + self
            .inner
            .system
            .as_ref()
            .map_or(0, |s| s.queued_for(self.inner.id))
    }

    /// Mappings live now.
    pub fn live_mappings(&self) -> usize {
        self.inner.stats().live_mappings
    }

    /// Counters and occupancy.
    pub fn stats(&self) -> AdapterStats {
        self.inner.stats()
    }

    /// Physical addresses of the bounce pages (empty unless in [`AdapterMode::Bounce`]).
    pub fn bounce_pages(&self) -> &[PhysAddr] {
        &self.inner.bounce
    }
}

impl Adapter for SimAdapter {
    fn map_register_count(&self) -> u32 {
        self.inner.n
    }

    fn alignment_requirement(&self) -> u64 {
        self.inner.config.alignment_requirement
    }

    fn register_waiter(&self) -> Result<()> {
        if lock(&self.inner.shared.creations).refuse() {
            return Err(Error::InsufficientResources);
        }
        if let Some(system) = &self.inner.system {
            return system.register_waiter();
        }
        let st = &mut *lock(&self.inner.state.0);
        reserve_waiter_room(&mut st.registered, &mut st.queue)
    }

    fn unregister_waiter(&self) {
        if let Some(system) = &self.inner.system {
            system.unregister_waiter();
            return;
        }
        let mut st = lock(&self.inner.state.0);
        st.registered = st.registered.saturating_sub(1);
    }

    fn allocate(&self, request: AllocationRequest, waiter: &WaiterRef) -> Result<Allocation> {
        let count = request.count.get();
        if let Some(system) = &self.inner.system {
            if count > self.inner.n {
                self.inner.count_refusal();
                return Err(Error::InsufficientResources);
            }
            return Ok(
                match system.allocate(&self.inner, count, request.immediate, waiter)? {
                    Some(registers) => Allocation::Granted(registers),
                    None => Allocation::Queued,
                },
            );
        }
        let mut st = lock(&self.inner.state.0);
        if count > self.inner.n {
            st.stats.refusals += 1;
            return Err(Error::InsufficientResources);
        }
        if request.immediate || st.queue.is_empty() {
            if let Some(first) = AdapterInner::find_run(&st, count) {
                let registers = AdapterInner::grant(&mut st, first, count);
                drop(st);
                return Ok(Allocation::Granted(self.inner.open(registers)));
            }
            if request.immediate {
                st.stats.refusals += 1;
                return Err(Error::InsufficientResources);
            }
        }
        let Some(strong) = waiter.upgrade() else {
            st.stats.refusals += 1;
            return Err(Error::InvalidParameter);
        };
        let id = waiter_id(&strong);
        let twice = st.queue.iter().any(|q| waiter_id(&q.waiter) == id);
        st.queue.push_back(Queued {
            waiter: strong,
            count,
        });
        st.stats.queued_total += 1;
        drop(st);
        if twice {
            self.inner.note("a waiter was queued twice".into());
        }
        Ok(Allocation::Queued)
    }

    fn cancel_allocation(&self, waiter: &WaiterRef) -> bool {
        if let Some(system) = &self.inner.system {
            return system.cancel(&self.inner, waiter);
        }
        let id = waiter_ref_id(waiter);
        let removed = {
            let mut st = lock(&self.inner.state.0);
            let Some(pos) = st.queue.iter().position(|q| waiter_id(&q.waiter) == id) else {
                return false;
            };
            st.stats.cancels += 1;
            st.queue.remove(pos)
        };
        // Drop the queue's handle outside the lock: it may be the waiter's last one.
        drop(removed);
        true
    }

    fn dispatch_queued(&self) {
        self.inner.grant_waiters();
    }

    fn map<D: MemoryDescriptor + ?Sized>(
        &self,
        registers: &MapRegisters,
        buffer: &D,
        offset: u64,
        length: u64,
        direction: Direction,
        out: &mut [SgElement],
    ) -> Result<Mapping> {
        let a = &*self.inner;
        if length == 0 || out.is_empty() || registers.count() == 0 {
            return Err(Error::InvalidParameter);
        }
        let end = offset.checked_add(length).ok_or(Error::InvalidParameter)?;
        if end > buffer.total_length() {
            return Err(Error::InvalidParameter);
        }
        let (seg_index, seg_offset) =
            dmatx_hal::locate(buffer, offset).ok_or(Error::InvalidParameter)?;
        let first = registers.first();

        // The grant's holder is the only caller for these registers: their slot's lock is
        // contended only by the sanitizer.
        let Some(mut slot) = a.grant_slot(registers) else {
            return Err(Error::InvalidParameter);
        };
        if slot.live.is_some() {
            // The previous transfer on these registers was never flushed.
            return Err(Error::InvalidDeviceState);
        }
        let mut mapped = 0u64;
        let mut elements = 0usize;
        let mut used = 0u32;
        let mut failure = None;
        let mut any_bounced = false;
        let (mode, limit) = (a.config.mode, a.limit);
        // Walk the chain from the start segment; an SG list may span segments (each segment
        // starts a new element unless its first byte continues the previous bus run).
        let mut seg_index = seg_index;
        let mut seg = buffer.segment(seg_index);
        let mut seg_pos = seg_offset;
        while mapped < length {
            if seg_pos == seg.length {
                seg_index += 1;
                if seg_index >= buffer.segment_count() {
                    break;
                }
                seg = buffer.segment(seg_index);
                seg_pos = 0;
                continue;
            }
            if used == registers.count() {
                break;
            }
            let pos = seg.va.page_offset() + seg_pos;
            let in_page = pos % PAGE_SIZE;
            let chunk = (PAGE_SIZE - in_page)
                .min(length - mapped)
                .min(seg.length - seg_pos);
            let Some(&frame) = usize::try_from(pos / PAGE_SIZE)
                .ok()
                .and_then(|i| seg.frames.get(i))
            else {
                failure = Some(Error::InvalidParameter);
                break;
            };
            let buffer_page = frame.page_base().get();
            let reg = first + used;
            let reachable = buffer_page
                .checked_add(in_page + chunk - 1)
                .is_some_and(|last| last <= limit);
            let bounced = match mode {
                AdapterMode::Direct if !reachable => {
                    failure = Some(Error::InsufficientResources);
                    break;
                }
                AdapterMode::Bounce if !reachable => {
                    if !a
                        .shared
                        .memory
                        .contains(buffer_page + in_page, chunk as usize)
                    {
                        failure = Some(Error::InvalidParameter);
                        break;
                    }
                    true
                }
                _ => false,
            };
            let (bus_page, _) = a.pages_of(reg as usize, buffer_page, bounced);
            let bus = bus_page + in_page;
            let merges = elements > 0 && {
                let last = &out[elements - 1];
                last.address.get().checked_add(u64::from(last.length)) == Some(bus)
                    && u64::from(last.length) + chunk <= u64::from(u32::MAX)
            };
            if merges {
                out[elements - 1].length += chunk as u32;
            } else if elements == out.len() {
                break;
            } else {
                out[elements] = SgElement::new(BusAddr::new(bus), chunk as u32);
                elements += 1;
            }
            a.regs[reg as usize].store(buffer_page, bounced, in_page, in_page + chunk, first);
            any_bounced |= bounced;
            used += 1;
            mapped += chunk;
            seg_pos += chunk;
        }
        if let Some(e) = failure {
            // Nothing went live: the fields written are not looked at.
            return Err(e);
        }
        // `mapped > 0`: the loop maps at least the first page (one register, one element).
        let mut bounced_bytes = 0;
        if direction == Direction::WriteToDevice && any_bounced {
            let bounced = (first..first + used)
                .map(|r| a.reg_map(r as usize))
                .filter(|m| m.bounced);
            a.shared.memory.copy_batch(bounced.map(|m| {
                bounced_bytes += m.hi - m.lo;
                (
                    m.buffer_page + m.lo,
                    m.data_page + m.lo,
                    (m.hi - m.lo) as usize,
                )
            }));
        }
        slot.live = Some(LiveMap {
            used,
            offset,
            bytes: mapped,
            direction,
            bounced: any_bounced,
        });
        let c = &mut slot.counters;
        c.maps += 1;
        c.bytes_mapped += mapped;
        c.bytes_bounced += bounced_bytes;
        if mapped < length {
            c.short_maps += 1;
        }
        Ok(Mapping {
            bytes: mapped,
            elements,
        })
    }

    fn flush<D: MemoryDescriptor + ?Sized>(
        &self,
        registers: &MapRegisters,
        _buffer: &D,
        offset: u64,
        length: u64,
        direction: Direction,
    ) -> Result<()> {
        let a = &*self.inner;
        let Some(mut slot) = a.grant_slot(registers) else {
            return Err(Error::InvalidParameter);
        };
        let first = registers.first();
        let Some(live) = slot.live else {
            return Err(Error::InvalidParameter);
        };
        let mut bounced_bytes = 0;
        if live.direction == Direction::ReadFromDevice && live.bounced {
            // With the slot locked no device access is under way on this mapping: every byte
            // the device wrote is in the bounce pages.
            let bounced = (first..first + live.used)
                .map(|r| a.reg_map(r as usize))
                .filter(|m| m.bounced);
            a.shared.memory.copy_batch(bounced.map(|m| {
                bounced_bytes += m.hi - m.lo;
                (
                    m.data_page + m.lo,
                    m.buffer_page + m.lo,
                    (m.hi - m.lo) as usize,
                )
            }));
        }
        slot.live = None;
        let result = if (live.offset, live.bytes, live.direction) != (offset, length, direction) {
            Err(Error::InvalidParameter)
        } else if let Some(e) = a.take_flush_failure() {
            Err(e)
        } else {
            Ok(())
        };
        let c = &mut slot.counters;
        c.flushes += 1;
        c.bytes_bounced += bounced_bytes;
        if result.is_err() {
            c.flush_errors += 1;
        }
        result
    }

    fn free(&self, registers: MapRegisters) {
        let a = &*self.inner;
        let (first, count) = (registers.first() as usize, registers.count());
        if let Some(system) = &a.system
            && a.grant_slot(&registers).is_some()
        {
            // Before the mapping ends: the controller must never reach freed memory.
            system.detach_running(a.id, registers.first());
        }
        // Close the grant first (ending its mapping), then return its registers: once the slot
        // says no grant starts here, nothing but this call touches the registers.
        match a.grant_slot(&registers) {
            Some(mut slot) => {
                if slot.live.take().is_some() {
                    slot.counters.unflushed_frees += 1;
                }
                slot.count = 0;
            }
            None => {
                a.note(format!(
                    "free of registers {first}..+{count} that were not granted"
                ));
                return;
            }
        }
        {
            let mut st = lock(&a.state.0);
            for r in &mut st.regs[first..first + count as usize] {
                *r = RegState::Free;
            }
            st.in_use -= count;
            if let Some(system) = &a.system {
                drop(st);
                system.release(a.id, first as u32);
                system.grant_waiters();
                return;
            }
            if st.queue.is_empty() {
                // Nobody waits: no need to take the lock again to look.
                return;
            }
        }
        a.grant_waiters();
    }

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
        let Some(system) = &self.inner.system else {
            return Err(Error::InvalidDeviceRequest);
        };
        system.check_start(self.inner.id, registers.first(), waiter)?;
        let m = self.map(registers, buffer, offset, length, direction, out)?;
        system.start(
            &self.inner,
            registers.first(),
            waiter,
            direction,
            device_offset,
            &out[..m.elements],
            m.bytes,
        );
        Ok(m)
    }

    fn stop_system(&self, waiter: &WaiterRef) -> SystemStop {
        match &self.inner.system {
            Some(system) => system.stop(waiter),
            None => SystemStop::NotRunning,
        }
    }

    fn allocate_common_buffer(&self, length: u64) -> Result<CommonAllocation> {
        let a = &*self.inner;
        if length == 0 {
            return Err(Error::InvalidParameter);
        }
        if lock(&a.shared.creations).refuse() {
            return Err(Error::InsufficientResources);
        }
        let pages = length.div_ceil(PAGE_SIZE);
        let size = pages * PAGE_SIZE;
        let frames = a.shared.memory.allocate(
            FrameRequest {
                pages: usize::try_from(pages).map_err(|_| Error::InsufficientResources)?,
                order: Order::Contiguous,
                min: 0,
                max: if a.config.mode == AdapterMode::Iommu {
                    u64::MAX
                } else {
                    a.limit
                },
            },
            FrameUse::Common,
        )?;
        let phys = frames[0].get();
        let mut st = lock(&a.common.0);
        let bus = if a.config.mode == AdapterMode::Iommu {
            // First fit in the IOVA space above the register window.
            let mut candidate = a.iova_base + u64::from(a.n) * PAGE_SIZE;
            for c in &st.records {
                if candidate.checked_add(size).is_some_and(|e| e <= c.bus) {
                    break;
                }
                candidate = candidate.max(c.bus + c.pages * PAGE_SIZE);
            }
            if candidate
                .checked_add(size - 1)
                .is_none_or(|last| last > a.limit)
            {
                drop(st);
                a.shared.memory.free(&frames, FrameUse::Common);
                return Err(Error::InsufficientResources);
            }
            candidate
        } else {
            phys
        };
        let token = st.next_token;
        st.next_token += 1;
        let virt = COMMON_VA_BASE + (token % 0x8000) * (1 << 32);
        let record = CommonRecord {
            token,
            bus,
            phys,
            pages,
            length,
        };
        let at = st.records.partition_point(|c| c.bus < bus);
        st.records.insert(at, record);
        Ok(CommonAllocation {
            virt: VirtAddr::new(virt),
            logical: BusAddr::new(bus),
            length,
            token,
        })
    }

    fn free_common_buffer(&self, allocation: CommonAllocation) {
        let a = &*self.inner;
        let record = {
            let mut st = lock(&a.common.0);
            let pos = st
                .records
                .iter()
                .position(|c| c.token == allocation.token && c.bus == allocation.logical.get());
            pos.map(|p| st.records.remove(p))
        };
        match record {
            Some(c) => {
                let frames: Vec<PhysAddr> = (0..c.pages)
                    .map(|i| PhysAddr::new(c.phys + i * PAGE_SIZE))
                    .collect();
                a.shared.memory.free(&frames, FrameUse::Common);
            }
            None => a.note(format!(
                "free of a common buffer it did not allocate (token {})",
                allocation.token
            )),
        }
    }

    fn read_common_buffer(
        &self,
        allocation: &CommonAllocation,
        offset: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let phys = self.common_phys(allocation, offset, out.len())?;
        if self.inner.shared.memory.read(phys, out) {
            Ok(())
        } else {
            Err(Error::InvalidParameter)
        }
    }

    fn write_common_buffer(
        &self,
        allocation: &CommonAllocation,
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
        let phys = self.common_phys(allocation, offset, data.len())?;
        if self.inner.shared.memory.write(phys, data) {
            Ok(())
        } else {
            Err(Error::InvalidParameter)
        }
    }
}

impl SimAdapter {
    /// Physical address of byte `offset` of a live common buffer, checking `len` bytes fit.
    fn common_phys(&self, allocation: &CommonAllocation, offset: u64, len: usize) -> Result<u64> {
        let st = lock(&self.inner.common.0);
        let c = st
            .records
            .iter()
            .find(|c| c.token == allocation.token)
            .ok_or(Error::InvalidParameter)?;
        let end = offset
            .checked_add(len as u64)
            .ok_or(Error::InvalidParameter)?;
        if end > c.length {
            return Err(Error::InvalidParameter);
        }
        Ok(c.phys + offset)
    }
}
