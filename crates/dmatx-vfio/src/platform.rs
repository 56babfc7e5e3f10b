//! The VFIO platform: [`VfioPlatform`] and its adapters, dmatx's HAL over a real IOMMU
//! (spec §0, §1.1 adapter acquisition, §1.3 common buffers, §3.2–§3.3 map registers).
//!
//! # Map registers are IOVA pages
//! Each adapter (one per [`Platform::adapter`] call) takes, when it is made, one contiguous
//! range of N pages from the platform's [`IovaAllocator`], wholly inside the device's window:
//! below its address limit, inside the platform's configured window
//! ([`PlatformConfig::iova_base`], [`PlatformConfig::iova_size`]) and inside the container's
//! valid IOVA ranges. N is [`PlatformConfig::map_registers`] if set, else the pages one
//! maximum transfer can span (`maximum_length.div_ceil(4096) + 1`). Register `r` is the IOVA
//! page `iova_base + r·4096`.
//!
//! [`Adapter::map`] gives register `i` of a grant the `i`-th page the mapped bytes span. Each
//! run of pages that is virtually contiguous inside one segment is mapped with one
//! `VFIO_IOMMU_MAP_DMA` at its registers' IOVAs, so the bus addresses of a transfer are
//! contiguous and it becomes one scatter/gather element: the IOMMU does the gathering.
//! [`Adapter::flush`] ends the transfer with one `VFIO_IOMMU_UNMAP_DMA` of its IOVA range
//! (type1v2 unmaps every whole mapping inside a range), then copies bounced bytes back.
//!
//! # What can be mapped
//! Only memory the platform allocated: [`DmaBuffer`]s and common buffers, found in the
//! registry of live allocations (see [`crate::DmaBuffer`]'s module). A descriptor naming other
//! memory — another backend's buffer with made-up addresses, say — is refused with
//! [`Error::InvalidParameter`] before anything reaches the IOMMU.
//!
//! # Bouncing
//! Each adapter preallocates one locked bounce page per register. A page is bounced when the
//! IOMMU refuses to map its run (the whole run is then bounced) or, in no-IOMMU mode, when its
//! physical address is above the device's limit. A bounced page's bytes sit in the register's
//! bounce page at the same page offset: in IOMMU mode the bounce pages are mapped at the
//! registers' IOVAs instead (so the element is unchanged), in no-IOMMU mode the device is given
//! the bounce page's physical address. Write-to-device transfers copy in at `map`,
//! read-from-device ones copy back at `flush`.
//!
//! # No-IOMMU mode
//! No mapper: a device address is a physical address, read from pagemap when the memory was
//! allocated; elements split where physical contiguity breaks. Adapters take no IOVA. Common
//! buffers must be physically contiguous (one page always is; larger ones usually are not, and
//! their allocation then fails with [`ErrorKind::Memory`]).
//!
//! # No allocation on the steady-state paths
//! The IOVA bitmap, the registry, each adapter's register state, grant slots and waiter queue
//! (room reserved by [`Adapter::register_waiter`]) are sized when they are made: `allocate`,
//! `map`, `flush` and `free` allocate nothing.
//!
//! # Locks
//! An adapter's `state` (registers and queue) is held only briefly and never while calling the
//! mapper or a waiter; a grant's slot is held by `map`, `flush` and `free` of that grant,
//! around its mapper calls and copies. Neither is held while the registry or the IOVA
//! allocator is locked for longer than a lookup.
//!
//! System-mode descriptions are refused: VFIO has no system DMA controller.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use dmatx_hal::{
    Adapter, Allocation, AllocationRequest, BusAddr, CommonAllocation, DeviceDescription,
    Direction, Error, MapRegisters, Mapping, MemoryDescriptor, PAGE_SIZE, Platform, SgElement,
    VirtAddr, Waiter, WaiterRef, waiter_id, waiter_ref_id,
};

use crate::error::{ErrorKind, VfioError, VfioResult};
use crate::iommu::{DmaMapper, IommuMode};
use crate::iova::IovaAllocator;
use crate::memory::{DmaBuffer, Entry, LockedRegion, Memory, copy_bytes, lock};
use crate::sys;

/// How a [`VfioPlatform`] lays out device-visible memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformConfig {
    /// First IOVA the platform hands out (page-aligned).
    pub iova_base: u64,
    /// Bytes of IOVA space from `iova_base` (page-aligned, non-zero).
    pub iova_size: u64,
    /// Map registers of every adapter; `None`: the pages one maximum transfer spans, plus one.
    pub map_registers: Option<u32>,
    /// Most live allocations (buffers and common buffers) at once.
    pub max_buffers: usize,
}

impl Default for PlatformConfig {
    /// IOVAs `[0x10_0000, 0x1000_0000)` (1 MiB to 256 MiB), all below 2^28 so devices
    /// that drive only 28 address bits (QEMU's edu) fit;
    /// registers sized from the maximum transfer; up to 4096 live allocations.
    fn default() -> Self {
        Self {
            iova_base: 0x10_0000,
            iova_size: 0x0FF0_0000,
            map_registers: None,
            max_buffers: 4096,
        }
    }
}

/// Counters and occupancy of a [`VfioPlatform`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlatformStats {
    /// IOVA pages free now.
    pub iova_free_pages: u64,
    /// IOVA pages the platform can hand out.
    pub iova_total_pages: u64,
    /// Pages of locked memory held now (buffers, common buffers, bounce pages).
    pub locked_pages: u64,
    /// [`DmaBuffer`]s alive now.
    pub live_buffers: usize,
    /// Adapters alive now.
    pub live_adapters: usize,
    /// Transfers mapped and not yet flushed or freed.
    pub live_mappings: usize,
    /// Common buffers allocated and not freed.
    pub common_buffers: usize,
    /// `VFIO_IOMMU_MAP_DMA` calls made.
    pub map_calls: u64,
    /// `VFIO_IOMMU_UNMAP_DMA` calls made.
    pub unmap_calls: u64,
    /// Bytes copied to or from bounce pages.
    pub bounced_bytes: u64,
}

/// What a platform and its adapters share.
struct Shared {
    memory: Arc<Memory>,
    mapper: Option<Arc<dyn DmaMapper>>,
    iova: Mutex<IovaAllocator>,
    config: PlatformConfig,
    live_adapters: AtomicUsize,
    live_mappings: AtomicUsize,
    common_buffers: AtomicUsize,
    map_calls: AtomicU64,
    unmap_calls: AtomicU64,
    bounced_bytes: AtomicU64,
    next_token: AtomicU64,
}

impl Shared {
    /// Map `bytes` at process address `va` at `iova`, counting the call.
    ///
    /// # Safety
    /// As [`DmaMapper::map`]: the memory stays mapped in the process, with no reference to it,
    /// until the matching [`Shared::dma_unmap`] returns.
    unsafe fn dma_map(&self, iova: u64, va: usize, bytes: u64) -> VfioResult<()> {
        let Some(mapper) = &self.mapper else {
            return Err(VfioError::new(
                ErrorKind::DmaMap,
                "platform",
                "no IOMMU mapper in no-IOMMU mode",
            ));
        };
        // ORDERING: Relaxed: a statistic.
        self.map_calls.fetch_add(1, Relaxed);
        // SAFETY: the caller's promise, passed on.
        unsafe { mapper.map(iova, va, bytes) }
    }

    /// Unmap `bytes` of IOVA from `iova`, counting the call.
    fn dma_unmap(&self, iova: u64, bytes: u64) -> VfioResult<()> {
        let Some(mapper) = &self.mapper else {
            return Ok(());
        };
        // ORDERING: Relaxed: a statistic.
        self.unmap_calls.fetch_add(1, Relaxed);
        mapper.unmap(iova, bytes)
    }

    fn count_bounced(&self, bytes: u64) {
        if bytes > 0 {
            // ORDERING: Relaxed: a statistic.
            self.bounced_bytes.fetch_add(bytes, Relaxed);
        }
    }

    fn window(&self) -> String {
        format!(
            "[{:#x}, {:#x})",
            self.config.iova_base,
            self.config.iova_base.saturating_add(self.config.iova_size)
        )
    }

    /// Take `pages` IOVA pages whose last byte is at most `limit`.
    fn take_iova(&self, pages: u64, limit: u64, what: &str) -> VfioResult<u64> {
        let mut iova = lock(&self.iova);
        iova.allocate(pages, limit).ok_or_else(|| {
            VfioError::new(
                ErrorKind::IovaExhausted,
                what,
                format!(
                    "no {pages} consecutive free IOVA pages at or below {limit:#x} (the device's \
                     window) in the platform's window {} ({} of {} pages free)",
                    self.window(),
                    iova.free_pages(),
                    iova.total_pages()
                ),
            )
        })
    }

    /// Return an IOVA range taken by [`Shared::take_iova`].
    fn give_iova(&self, base: u64, pages: u64) {
        if !lock(&self.iova).free(base, pages) {
            self.memory.note(format!(
                "IOVA range {base:#x} +{pages} pages freed but not allocated"
            ));
        }
    }
}

/// The VFIO platform: hands out [`VfioAdapter`]s for devices of one VFIO container and
/// allocates the memory they may reach ([`VfioPlatform::allocate_buffer`]).
///
/// Cheap to clone; clones name the same platform. Buffers and adapters keep the platform's
/// bookkeeping alive, so they may outlive every `VfioPlatform` value.
#[derive(Clone)]
pub struct VfioPlatform {
    shared: Arc<Shared>,
}

impl fmt::Debug for VfioPlatform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioPlatform")
            .field("mode", &self.mode())
            .field("config", &self.shared.config)
            .finish()
    }
}

impl VfioPlatform {
    /// The platform of `container`'s devices: IOVAs from `config`'s window that the
    /// container's IOMMU accepts (in IOMMU mode), memory locked in this process.
    ///
    /// Make it once a device is open in the container (the first device opened sets the IOMMU
    /// up, and only then are its valid IOVA ranges known). The platform and its adapters keep
    /// the container open while they live: their mappings are the container's.
    ///
    /// # Errors
    /// As [`VfioContainer::iova_ranges`](crate::VfioContainer) when the valid ranges cannot be
    /// read; [`ErrorKind::InvalidArgument`] for an invalid window; [`ErrorKind::Unsupported`]
    /// if pages are not 4096 bytes; [`ErrorKind::Memory`] if the bookkeeping cannot be
    /// allocated.
    pub fn new(container: &Arc<crate::VfioContainer>, config: PlatformConfig) -> VfioResult<Self> {
        let mode = container.mode();
        let (mapper, ranges) = match mode {
            IommuMode::Iommu => (Some(container.mapper()), container.iova_ranges()?),
            IommuMode::NoIommu => (None, Vec::new()),
        };
        Self::with_mapper(mode, mapper, ranges, config)
    }

    /// The platform over an explicit mapper: `mode`, the `mapper` that makes IOVAs (required
    /// in IOMMU mode, ignored in no-IOMMU mode), the IOMMU's valid IOVA ranges (inclusive
    /// pairs; empty: unknown, the whole window is used) and `config`.
    pub(crate) fn with_mapper(
        mode: IommuMode,
        mapper: Option<Arc<dyn DmaMapper>>,
        valid_ranges: Vec<(u64, u64)>,
        config: PlatformConfig,
    ) -> VfioResult<Self> {
        sys::check_page_size()?;
        let mapper = match (mode, mapper) {
            (IommuMode::Iommu, Some(m)) => Some(m),
            (IommuMode::Iommu, None) => {
                return Err(VfioError::new(
                    ErrorKind::InvalidArgument,
                    "platform",
                    "IOMMU mode needs a mapper",
                ));
            }
            (IommuMode::NoIommu, _) => None,
        };
        if config.map_registers.is_some_and(|n| n < 2) {
            return Err(VfioError::new(
                ErrorKind::InvalidArgument,
                "platform",
                "adapters need at least 2 map registers",
            ));
        }
        let mut iova = IovaAllocator::new(config.iova_base, config.iova_size)?;
        if !valid_ranges.is_empty() {
            iova.retain_ranges(&valid_ranges);
            if mode == IommuMode::Iommu && iova.total_pages() == 0 {
                return Err(VfioError::new(
                    ErrorKind::IovaExhausted,
                    "platform",
                    format!(
                        "no page of the IOVA window [{:#x}, +{:#x}) is a valid IOVA of the \
                         container ({valid_ranges:x?})",
                        config.iova_base, config.iova_size
                    ),
                ));
            }
        }
        let memory = Arc::new(Memory::new(mode, config.max_buffers)?);
        Ok(Self {
            shared: Arc::new(Shared {
                memory,
                mapper,
                iova: Mutex::new(iova),
                config,
                live_adapters: AtomicUsize::new(0),
                live_mappings: AtomicUsize::new(0),
                common_buffers: AtomicUsize::new(0),
                map_calls: AtomicU64::new(0),
                unmap_calls: AtomicU64::new(0),
                bounced_bytes: AtomicU64::new(0),
                next_token: AtomicU64::new(1),
            }),
        })
    }

    /// How devices reach memory on this platform.
    pub fn mode(&self) -> IommuMode {
        self.shared.memory.mode()
    }

    /// The configuration the platform was made with.
    pub fn config(&self) -> &PlatformConfig {
        &self.shared.config
    }

    /// A buffer of `length` bytes starting `page_offset` bytes into its first page, of locked
    /// memory that devices of this platform may reach; zeroed.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for a zero length or a page offset of 4096 or more;
    /// [`ErrorKind::Memory`] if the memory cannot be mapped, locked or (no-IOMMU mode)
    /// resolved to physical addresses, or the registry is full
    /// ([`PlatformConfig::max_buffers`]).
    pub fn allocate_buffer(&self, length: u64, page_offset: u64) -> VfioResult<DmaBuffer> {
        DmaBuffer::allocate(&self.shared.memory, length, page_offset)
    }

    /// An adapter for `description`, with the error's details (the [`Platform::adapter`]
    /// implementation converts them to the framework's status).
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`] for a system-mode description; [`ErrorKind::InvalidArgument`]
    /// for an address width outside 24..=64 or a register count that does not fit;
    /// [`ErrorKind::IovaExhausted`] if no IOVA range of N pages is free inside the device's
    /// window; [`ErrorKind::Memory`] if the bounce pages cannot be allocated or (no-IOMMU mode)
    /// one lies above the device's limit.
    pub fn create_adapter(&self, description: &DeviceDescription) -> VfioResult<VfioAdapter> {
        AdapterInner::new(&self.shared, description).map(|inner| VfioAdapter {
            inner: Arc::new(inner),
        })
    }

    /// Counters and occupancy.
    pub fn stats(&self) -> PlatformStats {
        let s = &self.shared;
        let (free, total) = {
            let iova = lock(&s.iova);
            (iova.free_pages(), iova.total_pages())
        };
        // ORDERING: Relaxed throughout: statistics, each read on its own.
        PlatformStats {
            iova_free_pages: free,
            iova_total_pages: total,
            locked_pages: s.memory.locked_pages(),
            live_buffers: s.memory.live_buffers(),
            live_adapters: s.live_adapters.load(Relaxed),
            live_mappings: s.live_mappings.load(Relaxed),
            common_buffers: s.common_buffers.load(Relaxed),
            map_calls: s.map_calls.load(Relaxed),
            unmap_calls: s.unmap_calls.load(Relaxed),
            bounced_bytes: s.bounced_bytes.load(Relaxed),
        }
    }

    /// The end-of-run check: the IOVA pool full (every adapter gone), no live mappings, no
    /// common buffers, no locked pages (every buffer dropped), no failure to give memory or
    /// IOVAs back.
    ///
    /// # Errors
    /// What is left, one item per line.
    pub fn check_clean(&self) -> Result<(), String> {
        let s = self.stats();
        let mut problems = Vec::new();
        if s.live_adapters > 0 {
            problems.push(format!("{} adapters still alive", s.live_adapters));
        }
        if s.iova_free_pages != s.iova_total_pages {
            problems.push(format!(
                "{} of {} IOVA pages free",
                s.iova_free_pages, s.iova_total_pages
            ));
        }
        if s.live_mappings > 0 {
            problems.push(format!(
                "{} mappings still live (never flushed)",
                s.live_mappings
            ));
        }
        if s.common_buffers > 0 {
            problems.push(format!("{} common buffers not freed", s.common_buffers));
        }
        if s.locked_pages > 0 {
            problems.push(format!(
                "{} pages still locked ({} buffers alive)",
                s.locked_pages, s.live_buffers
            ));
        }
        problems.extend(self.shared.memory.issues());
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }
}

impl Platform for VfioPlatform {
    type Adapter = VfioAdapter;

    /// An adapter for `description` (see [`VfioPlatform::create_adapter`] for the errors'
    /// details).
    fn adapter(&self, description: &DeviceDescription) -> dmatx_hal::Result<VfioAdapter> {
        Ok(self.create_adapter(description)?)
    }
}

/// Bit of [`Reg::page`]: the register's page is bounced.
const BOUNCED: u64 = 1;
/// Bit of [`Reg::page`]: the register starts a run (first of the transfer, first of a segment,
/// or not virtually contiguous with the previous register's page).
const RUN_START: u64 = 2;
const SPAN_BITS: u32 = 16;
const SPAN_MASK: u64 = (1 << SPAN_BITS) - 1;
const _: () = assert!(PAGE_SIZE <= SPAN_MASK && PAGE_SIZE > (BOUNCED | RUN_START));

/// What one register maps while its grant's mapping is live. Written by `map` and read by
/// `flush` and `free`, all with the grant's slot locked, which orders the accesses; outside a
/// live mapping the fields mean nothing.
#[derive(Default)]
struct Reg {
    /// Process address of the buffer's page, `| BOUNCED | RUN_START`.
    page: AtomicU64,
    /// Mapped bytes within the page: `lo | hi << SPAN_BITS`.
    span: AtomicU64,
}

impl Reg {
    fn store(&self, page: u64, flags: u64, lo: u64, hi: u64) {
        // ORDERING: Relaxed: the grant's slot mutex orders these with their readers.
        self.page.store(page | flags, Relaxed);
        self.span.store(lo | (hi << SPAN_BITS), Relaxed);
    }

    /// `(page, bounced, run start, lo, hi)`.
    fn load(&self) -> (u64, bool, bool, u64, u64) {
        // ORDERING: Relaxed: as in `store`.
        let page = self.page.load(Relaxed);
        let span = self.span.load(Relaxed);
        (
            page & !(PAGE_SIZE - 1),
            page & BOUNCED != 0,
            page & RUN_START != 0,
            span & SPAN_MASK,
            (span >> SPAN_BITS) & SPAN_MASK,
        )
    }

    fn set_bounced(&self) {
        // ORDERING: Relaxed: as in `store`.
        self.page.fetch_or(BOUNCED, Relaxed);
    }
}

/// A live mapping of a grant.
#[derive(Clone, Copy, Debug)]
struct LiveMap {
    used: u32,
    offset: u64,
    bytes: u64,
    direction: Direction,
    bounced: bool,
}

/// The grant starting at a register, if one does.
#[derive(Debug, Default)]
struct Slot {
    /// Registers of the grant starting here; 0 if none does.
    count: u32,
    live: Option<LiveMap>,
}

struct Queued {
    waiter: Waiter,
    count: u32,
}

/// Register allocation and the waiter queue.
struct State {
    free: Vec<bool>,
    queue: VecDeque<Queued>,
    registered: usize,
    in_use: u32,
}

/// A common buffer of an adapter.
struct CommonRecord {
    token: u64,
    region: LockedRegion,
    /// Its IOVA range (IOMMU mode).
    iova: Option<u64>,
    bus: u64,
    length: u64,
}

/// The state behind a [`VfioAdapter`].
struct AdapterInner {
    shared: Arc<Shared>,
    limit: u64,
    n: u32,
    /// IOVA of register 0 (IOMMU mode; 0 in no-IOMMU mode).
    iova_base: u64,
    /// One bounce page per register (`None` once kept back by a drop whose unmap failed).
    bounce: Option<LockedRegion>,
    /// Process address of the first bounce page.
    bounce_addr: usize,
    /// Physical address of each bounce page (no-IOMMU mode; empty otherwise).
    bounce_phys: Box<[u64]>,
    state: Mutex<State>,
    regs: Box<[Reg]>,
    slots: Box<[Mutex<Slot>]>,
    common: Mutex<Vec<CommonRecord>>,
}

impl AdapterInner {
    fn new(shared: &Arc<Shared>, d: &DeviceDescription) -> VfioResult<Self> {
        let invalid = |why: String| VfioError::new(ErrorKind::InvalidArgument, "adapter", why);
        if d.system.is_some() {
            return Err(VfioError::new(
                ErrorKind::Unsupported,
                "adapter",
                "system-mode DMA: VFIO devices have no system DMA controller",
            ));
        }
        if !(24..=64).contains(&d.address_bits) {
            return Err(invalid(format!(
                "an address width of {} bits (need 24..=64)",
                d.address_bits
            )));
        }
        let n = match shared.config.map_registers {
            Some(n) => n,
            None => u32::try_from(d.maximum_length.div_ceil(PAGE_SIZE) + 1)
                .map_err(|_| {
                    invalid(format!(
                        "a maximum transfer of {} bytes needs too many map registers",
                        d.maximum_length
                    ))
                })?
                .max(2),
        };
        let limit = d.address_limit();
        let mode = shared.memory.mode();
        let iova_base = match mode {
            IommuMode::Iommu => shared.take_iova(u64::from(n), limit, "adapter")?,
            IommuMode::NoIommu => 0,
        };
        let give_back = |e: VfioError| {
            if mode == IommuMode::Iommu {
                shared.give_iova(iova_base, u64::from(n));
            }
            e
        };
        let bounce = LockedRegion::new(&shared.memory, n as usize).map_err(give_back)?;
        let bounce_phys: Box<[u64]> = match mode {
            IommuMode::Iommu => Box::new([]),
            IommuMode::NoIommu => {
                let mut phys = vec![0u64; n as usize];
                sys::physical_addresses(bounce.addr(), &mut phys)?;
                if let Some((r, p)) = phys
                    .iter()
                    .enumerate()
                    .find(|(_, p)| p.checked_add(PAGE_SIZE - 1).is_none_or(|l| l > limit))
                {
                    return Err(VfioError::new(
                        ErrorKind::Memory,
                        "adapter",
                        format!(
                            "bounce page {r} is at physical address {p:#x}, above the device's \
                             limit {limit:#x}: it cannot bounce for the device"
                        ),
                    ));
                }
                phys.into_boxed_slice()
            }
        };
        let mut free = Vec::new();
        free.resize(n as usize, true);
        // ORDERING: Relaxed: a statistic.
        shared.live_adapters.fetch_add(1, Relaxed);
        Ok(Self {
            shared: Arc::clone(shared),
            limit,
            n,
            iova_base,
            bounce_addr: bounce.addr(),
            bounce: Some(bounce),
            bounce_phys,
            state: Mutex::new(State {
                free,
                queue: VecDeque::new(),
                registered: 0,
                in_use: 0,
            }),
            regs: (0..n).map(|_| Reg::default()).collect(),
            slots: (0..n).map(|_| Mutex::new(Slot::default())).collect(),
            common: Mutex::new(Vec::new()),
        })
    }

    fn iommu(&self) -> bool {
        self.shared.memory.mode() == IommuMode::Iommu
    }

    /// IOVA of register `r`.
    fn reg_iova(&self, r: u32) -> u64 {
        self.iova_base + u64::from(r) * PAGE_SIZE
    }

    /// Process address of register `r`'s bounce page.
    fn bounce_va(&self, r: u32) -> usize {
        self.bounce_addr + r as usize * PAGE_SIZE as usize
    }

    /// First fit: the lowest register starting `count` consecutive free ones.
    fn find_run(st: &State, count: u32) -> Option<u32> {
        let count = count as usize;
        let mut run = 0;
        for (i, free) in st.free.iter().enumerate() {
            if *free {
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

    /// Grant the free registers `first .. first + count` (with `st` locked); the caller opens
    /// the grant with [`AdapterInner::open`] once it has dropped the lock.
    fn grant(st: &mut State, first: u32, count: u32) -> MapRegisters {
        for f in &mut st.free[first as usize..(first + count) as usize] {
            *f = false;
        }
        st.in_use += count;
        MapRegisters::new(first, count)
    }

    /// Open the slot of a grant just made, before handing it out.
    fn open(&self, registers: MapRegisters) -> MapRegisters {
        let mut slot = lock(&self.slots[registers.first() as usize]);
        slot.count = registers.count();
        slot.live = None;
        drop(slot);
        registers
    }

    /// The slot of `registers`, locked, if it is an outstanding grant of this adapter.
    fn grant_slot(&self, registers: &MapRegisters) -> Option<MutexGuard<'_, Slot>> {
        let (first, count) = (registers.first(), registers.count());
        if count == 0 || first.checked_add(count).is_none_or(|end| end > self.n) {
            return None;
        }
        let slot = lock(&self.slots[first as usize]);
        (slot.count == count).then_some(slot)
    }

    /// Grant queued requests in order while the head fits, calling each waiter with no lock
    /// held.
    fn grant_waiters(&self) {
        loop {
            let (waiter, registers) = {
                let mut st = lock(&self.state);
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

    /// End a live mapping of the grant at `first`: unmap its IOVA range (IOMMU mode).
    fn end_mapping(&self, first: u32, live: &LiveMap) -> VfioResult<()> {
        // ORDERING: Relaxed: a statistic.
        self.shared.live_mappings.fetch_sub(1, Relaxed);
        if !self.iommu() {
            return Ok(());
        }
        let result = self
            .shared
            .dma_unmap(self.reg_iova(first), u64::from(live.used) * PAGE_SIZE);
        if let Err(e) = &result {
            self.shared.memory.note(format!(
                "unmap of registers {first}..+{} at IOVA {:#x} failed: {e}",
                live.used,
                self.reg_iova(first)
            ));
        }
        result
    }

    /// Copy the bounced bytes of registers `first .. first + used` back into the buffer.
    /// Returns the bytes copied, or an error if a page is no longer a live allocation.
    fn copy_back(&self, first: u32, used: u32) -> Result<u64, Error> {
        let mut bytes = 0;
        let mut result = Ok(());
        for r in first..first + used {
            let (page, bounced, _, lo, hi) = self.regs[r as usize].load();
            if !bounced {
                continue;
            }
            if self.shared.memory.lookup(page + lo, hi - lo).is_none() {
                result = Err(Error::InvalidParameter);
                continue;
            }
            // SAFETY: the destination is inside a live platform allocation (looked up just
            // now; its owner lent it to the core, which is flushing it and so not freeing it)
            // and the source is this adapter's bounce page; copies never make references.
            unsafe {
                copy_bytes(
                    self.bounce_va(r) + lo as usize,
                    (page + lo) as usize,
                    (hi - lo) as usize,
                );
            }
            bytes += hi - lo;
        }
        result.map(|()| bytes)
    }

    /// Map the registers `first .. first + used` planned by `map` into the IOMMU, one call
    /// per run, bouncing the runs the IOMMU refuses.
    fn map_runs(&self, first: u32, used: u32, direction: Direction) -> Result<(u64, bool), Error> {
        let mut bounced_bytes = 0;
        let mut any_bounced = false;
        let mut r = first;
        while r < first + used {
            let (page, _, _, _, _) = self.regs[r as usize].load();
            let mut end = r + 1;
            while end < first + used && !self.regs[end as usize].load().2 {
                end += 1;
            }
            let bytes = u64::from(end - r) * PAGE_SIZE;
            // SAFETY: `page .. + bytes` lies in one live platform allocation (`map` looked the
            // segment up in the registry): locked memory of the descriptor the core lent for
            // this transfer, which the hal contract keeps alive until the flush that unmaps
            // it (and the IOMMU's pins keep its frames from reuse even if a caller broke that).
            // Nothing makes references to it.
            let direct = unsafe { self.shared.dma_map(self.reg_iova(r), page as usize, bytes) };
            if direct.is_err() {
                for b in r..end {
                    let reg = &self.regs[b as usize];
                    let (page, _, _, lo, hi) = reg.load();
                    reg.set_bounced();
                    if direction == Direction::WriteToDevice {
                        // SAFETY: the source lies in the live allocation looked up by `map`,
                        // the destination in this adapter's bounce page `b`, which no device
                        // mapping reaches now (the grant holds `b`, unmapped).
                        unsafe {
                            copy_bytes(
                                (page + lo) as usize,
                                self.bounce_va(b) + lo as usize,
                                (hi - lo) as usize,
                            );
                        }
                        bounced_bytes += hi - lo;
                    }
                }
                any_bounced = true;
                // SAFETY: the bounce pages of registers `r .. end` are this adapter's locked
                // memory, freed only when the adapter is dropped, after it ends every mapping.
                let via_bounce = unsafe {
                    self.shared
                        .dma_map(self.reg_iova(r), self.bounce_va(r), bytes)
                };
                if let Err(e) = via_bounce {
                    if r > first {
                        let _ = self
                            .shared
                            .dma_unmap(self.reg_iova(first), u64::from(r - first) * PAGE_SIZE);
                    }
                    self.shared.count_bounced(bounced_bytes);
                    return Err(e.into());
                }
            }
            r = end;
        }
        Ok((bounced_bytes, any_bounced))
    }

    fn allocate_common(&self, length: u64) -> VfioResult<CommonAllocation> {
        let pages = usize::try_from(length.div_ceil(PAGE_SIZE))
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                VfioError::new(
                    ErrorKind::InvalidArgument,
                    "common buffer",
                    format!("{length} bytes cannot be allocated"),
                )
            })?;
        let shared = &self.shared;
        let region = LockedRegion::new(&shared.memory, pages)?;
        let frames = shared.memory.frames_of(region.addr(), pages)?;
        let bytes = region.bytes() as u64;
        let (bus, iova) = match shared.memory.mode() {
            IommuMode::Iommu => {
                let iova = shared.take_iova(pages as u64, self.limit, "common buffer")?;
                // SAFETY: the region is fresh locked memory owned by the record made below;
                // `free_common_buffer` and the adapter's drop unmap it before freeing it.
                if let Err(e) = unsafe { shared.dma_map(iova, region.addr(), bytes) } {
                    shared.give_iova(iova, pages as u64);
                    return Err(e);
                }
                (iova, Some(iova))
            }
            IommuMode::NoIommu => {
                let base = frames[0].get();
                let contiguous = frames
                    .iter()
                    .enumerate()
                    .all(|(i, f)| Some(f.get()) == base.checked_add(i as u64 * PAGE_SIZE));
                if !contiguous {
                    return Err(VfioError::new(
                        ErrorKind::Memory,
                        "common buffer",
                        format!(
                            "the {pages} pages of {length} bytes are not physically contiguous \
                             (no-IOMMU mode needs them to be; one page always is)"
                        ),
                    ));
                }
                if base
                    .checked_add(bytes - 1)
                    .is_none_or(|last| last > self.limit)
                {
                    return Err(VfioError::new(
                        ErrorKind::Memory,
                        "common buffer",
                        format!(
                            "physical pages at {base:#x} lie above the device's limit {:#x}",
                            self.limit
                        ),
                    ));
                }
                (base, None)
            }
        };
        let entry = Entry {
            start: region.addr(),
            end: region.addr() + region.bytes(),
            frames,
        };
        if let Err(e) = shared.memory.register(entry) {
            if let Some(iova) = iova {
                if shared.dma_unmap(iova, bytes).is_err() {
                    // The device may still reach the pages: keep them (and the IOVAs).
                    std::mem::forget(region);
                    return Err(e);
                }
                shared.give_iova(iova, pages as u64);
            }
            return Err(e);
        }
        // ORDERING: Relaxed: a unique number, nothing else is ordered by it.
        let token = shared.next_token.fetch_add(1, Relaxed);
        let virt = region.addr() as u64;
        lock(&self.common).push(CommonRecord {
            token,
            region,
            iova,
            bus,
            length,
        });
        // ORDERING: Relaxed: a statistic.
        shared.common_buffers.fetch_add(1, Relaxed);
        Ok(CommonAllocation {
            virt: VirtAddr::new(virt),
            logical: BusAddr::new(bus),
            length,
            token,
        })
    }

    /// Give a common buffer's IOVAs and memory back (its record is out of the list).
    fn release_common(&self, record: CommonRecord) {
        let shared = &self.shared;
        shared.memory.unregister(record.region.addr());
        // ORDERING: Relaxed: a statistic.
        shared.common_buffers.fetch_sub(1, Relaxed);
        if let Some(iova) = record.iova {
            let pages = record.region.pages() as u64;
            if let Err(e) = shared.dma_unmap(iova, pages * PAGE_SIZE) {
                shared.memory.note(format!(
                    "unmap of common buffer at IOVA {iova:#x} failed ({e}): its pages and IOVAs \
                     are kept"
                ));
                std::mem::forget(record.region);
                return;
            }
            shared.give_iova(iova, pages);
        }
        drop(record.region);
    }

    /// Process address of byte `offset` of a live common buffer, checking `len` bytes fit,
    /// with the list locked (so the buffer stays live while the guard is held).
    fn common_at<'a>(
        &'a self,
        allocation: &CommonAllocation,
        offset: u64,
        len: usize,
    ) -> Result<(MutexGuard<'a, Vec<CommonRecord>>, usize), Error> {
        let list = lock(&self.common);
        let c = list
            .iter()
            .find(|c| c.token == allocation.token)
            .ok_or(Error::InvalidParameter)?;
        let end = offset
            .checked_add(len as u64)
            .ok_or(Error::InvalidParameter)?;
        if end > c.length {
            return Err(Error::InvalidParameter);
        }
        let at = c.region.addr() + offset as usize;
        Ok((list, at))
    }
}

impl Drop for AdapterInner {
    fn drop(&mut self) {
        let mut unmapped = true;
        for (first, slot) in self.slots.iter_mut().enumerate() {
            let slot = slot
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(live) = slot.live.take() {
                self.shared.memory.note(format!(
                    "adapter dropped with a live mapping on registers {first}..+{}",
                    live.used
                ));
                // ORDERING: Relaxed: a statistic.
                self.shared.live_mappings.fetch_sub(1, Relaxed);
                if self.shared.memory.mode() == IommuMode::Iommu {
                    let iova = self.iova_base + first as u64 * PAGE_SIZE;
                    let bytes = u64::from(live.used) * PAGE_SIZE;
                    unmapped &= self.shared.dma_unmap(iova, bytes).is_ok();
                }
            }
        }
        let common = std::mem::take(
            self.common
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if !common.is_empty() {
            self.shared.memory.note(format!(
                "adapter dropped with {} common buffers not freed",
                common.len()
            ));
        }
        for record in common {
            self.release_common(record);
        }
        if self.shared.memory.mode() == IommuMode::Iommu {
            if unmapped {
                self.shared.give_iova(self.iova_base, u64::from(self.n));
            } else {
                // The device may still reach the bounce pages: keep them and the IOVAs.
                std::mem::forget(self.bounce.take());
            }
        }
        // ORDERING: Relaxed: a statistic.
        self.shared.live_adapters.fetch_sub(1, Relaxed);
    }
}

/// A DMA adapter of the VFIO platform: N map registers that are N consecutive IOVA pages (or,
/// in no-IOMMU mode, N bounce pages for memory the device cannot reach), a FIFO queue of
/// waiting requests, and the common buffers allocated through it.
///
/// Cheap to clone; clones name the same adapter. When the last one is dropped its IOVA range
/// and bounce pages go back to the platform (ending any mapping still live).
#[derive(Clone)]
pub struct VfioAdapter {
    inner: Arc<AdapterInner>,
}

impl fmt::Debug for VfioAdapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioAdapter")
            .field("map_registers", &self.inner.n)
            .field("iova_base", &format_args!("{:#x}", self.inner.iova_base))
            .field("address_limit", &format_args!("{:#x}", self.inner.limit))
            .finish()
    }
}

impl VfioAdapter {
    /// IOVA of register 0 (0 in no-IOMMU mode, where registers are not IOVAs).
    pub fn iova_base(&self) -> u64 {
        self.inner.iova_base
    }

    /// The highest bus address the device reaches (inclusive).
    pub fn address_limit(&self) -> u64 {
        self.inner.limit
    }

    /// Registers free now.
    pub fn free_registers(&self) -> u32 {
        lock(&self.inner.state).free.iter().filter(|f| **f).count() as u32
    }

    /// Requests waiting for registers now.
    pub fn queued(&self) -> usize {
        lock(&self.inner.state).queue.len()
    }

    /// A common buffer, with the error's details (the [`Adapter::allocate_common_buffer`]
    /// implementation converts them to the framework's status).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for a zero length; [`ErrorKind::Memory`] if locked
    /// memory is not available, the registry is full, or (no-IOMMU mode) the pages are not
    /// physically contiguous below the device's limit; [`ErrorKind::IovaExhausted`] if no IOVA
    /// range below the device's limit is free; [`ErrorKind::DmaMap`] if the IOMMU refuses it.
    pub fn allocate_common(&self, length: u64) -> VfioResult<CommonAllocation> {
        self.inner.allocate_common(length)
    }
}

impl Adapter for VfioAdapter {
    fn map_register_count(&self) -> u32 {
        self.inner.n
    }

    fn register_waiter(&self) -> dmatx_hal::Result<()> {
        let st = &mut *lock(&self.inner.state);
        let want = st.registered + 1;
        let room = want.saturating_sub(st.queue.len());
        st.queue
            .try_reserve(room)
            .map_err(|_| Error::InsufficientResources)?;
        st.registered = want;
        Ok(())
    }

    fn unregister_waiter(&self) {
        let mut st = lock(&self.inner.state);
        st.registered = st.registered.saturating_sub(1);
    }

    fn allocate(
        &self,
        request: AllocationRequest,
        waiter: &WaiterRef,
    ) -> dmatx_hal::Result<Allocation> {
        let count = request.count.get();
        if count > self.inner.n {
            return Err(Error::InsufficientResources);
        }
        let mut st = lock(&self.inner.state);
        if request.immediate || st.queue.is_empty() {
            if let Some(first) = AdapterInner::find_run(&st, count) {
                let registers = AdapterInner::grant(&mut st, first, count);
                drop(st);
                return Ok(Allocation::Granted(self.inner.open(registers)));
            }
            if request.immediate {
                return Err(Error::InsufficientResources);
            }
        }
        let Some(strong) = waiter.upgrade() else {
            return Err(Error::InvalidParameter);
        };
        if st.queue.len() >= st.registered || st.queue.len() == st.queue.capacity() {
            // More requests than announced waiters: queuing could allocate.
            return Err(Error::InsufficientResources);
        }
        st.queue.push_back(Queued {
            waiter: strong,
            count,
        });
        Ok(Allocation::Queued)
    }

    fn cancel_allocation(&self, waiter: &WaiterRef) -> bool {
        let id = waiter_ref_id(waiter);
        let removed = {
            let mut st = lock(&self.inner.state);
            let Some(pos) = st.queue.iter().position(|q| waiter_id(&q.waiter) == id) else {
                return false;
            };
            st.queue.remove(pos)
        };
        // Dropped outside the lock: it may be the waiter's last handle.
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
    ) -> dmatx_hal::Result<Mapping> {
        let a = &*self.inner;
        if length == 0 || out.is_empty() || registers.count() == 0 {
            return Err(Error::InvalidParameter);
        }
        let end = offset.checked_add(length).ok_or(Error::InvalidParameter)?;
        if end > buffer.total_length() {
            return Err(Error::InvalidParameter);
        }
        let (mut seg_index, mut seg_pos) =
            dmatx_hal::locate(buffer, offset).ok_or(Error::InvalidParameter)?;
        let Some(mut slot) = a.grant_slot(registers) else {
            return Err(Error::InvalidParameter);
        };
        if slot.live.is_some() {
            // The previous transfer on these registers was never flushed.
            return Err(Error::InvalidDeviceState);
        }
        let iommu = a.iommu();
        let first = registers.first();
        let mut seg = buffer.segment(seg_index);
        // The live allocation holding the current segment, looked up when first needed.
        let mut entry: Option<Entry> = None;
        let mut mapped = 0u64;
        let mut elements = 0usize;
        let mut used = 0u32;
        let mut prev_page: Option<u64> = None;
        let mut any_bounced = false;
        // Plan: give each page a register and build the elements.
        while mapped < length {
            if seg_pos == seg.length {
                seg_index += 1;
                if seg_index >= buffer.segment_count() {
                    break;
                }
                seg = buffer.segment(seg_index);
                seg_pos = 0;
                entry = None;
                prev_page = None;
                continue;
            }
            if used == registers.count() {
                break;
            }
            if entry.is_none() {
                // Only memory the platform allocated may reach the IOMMU or a device.
                let found = a.shared.memory.lookup(seg.va.get(), seg.length);
                entry = Some(found.ok_or(Error::InvalidParameter)?);
            }
            let Some(e) = &entry else {
                return Err(Error::InvalidParameter);
            };
            let va = seg.va.get() + seg_pos;
            let page = va - va % PAGE_SIZE;
            let lo = va % PAGE_SIZE;
            let chunk = (PAGE_SIZE - lo)
                .min(length - mapped)
                .min(seg.length - seg_pos);
            let hi = lo + chunk;
            let reg = first + used;
            let run_start = prev_page.is_none_or(|p| p + PAGE_SIZE != page);
            let (bus_page, bounced) = if iommu {
                (a.reg_iova(reg), false)
            } else {
                let phys = e.frame_of(page).ok_or(Error::InvalidParameter)?;
                if phys.checked_add(hi - 1).is_some_and(|last| last <= a.limit) {
                    (phys, false)
                } else {
                    (a.bounce_phys[reg as usize], true)
                }
            };
            let bus = bus_page + lo;
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
            let flags = if bounced { BOUNCED } else { 0 } | if run_start { RUN_START } else { 0 };
            a.regs[reg as usize].store(page, flags, lo, hi);
            any_bounced |= bounced;
            prev_page = Some(page);
            used += 1;
            mapped += chunk;
            seg_pos += chunk;
        }
        // `mapped > 0`: the first page always gets a register and an element.
        let mut bounced_bytes = 0;
        if iommu {
            let (bytes, bounced) = a.map_runs(first, used, direction)?;
            bounced_bytes = bytes;
            any_bounced = bounced;
        } else if any_bounced && direction == Direction::WriteToDevice {
            for r in first..first + used {
                let (page, bounced, _, lo, hi) = a.regs[r as usize].load();
                if bounced {
                    // SAFETY: the source lies in the live allocation looked up above, the
                    // destination in this adapter's bounce page `r`, which only this grant
                    // uses; copies never make references.
                    unsafe {
                        copy_bytes(
                            (page + lo) as usize,
                            a.bounce_va(r) + lo as usize,
                            (hi - lo) as usize,
                        );
                    }
                    bounced_bytes += hi - lo;
                }
            }
        }
        a.shared.count_bounced(bounced_bytes);
        slot.live = Some(LiveMap {
            used,
            offset,
            bytes: mapped,
            direction,
            bounced: any_bounced,
        });
        // ORDERING: Relaxed: a statistic.
        a.shared.live_mappings.fetch_add(1, Relaxed);
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
    ) -> dmatx_hal::Result<()> {
        let a = &*self.inner;
        let Some(mut slot) = a.grant_slot(registers) else {
            return Err(Error::InvalidParameter);
        };
        let Some(live) = slot.live.take() else {
            return Err(Error::InvalidParameter);
        };
        let first = registers.first();
        // Unmapped before the copy back, so no device write races it.
        let unmapped = a.end_mapping(first, &live);
        let copied = if live.direction == Direction::ReadFromDevice && live.bounced {
            a.copy_back(first, live.used)
        } else {
            Ok(0)
        };
        drop(slot);
        if let Ok(bytes) = copied {
            a.shared.count_bounced(bytes);
        }
        if (live.offset, live.bytes, live.direction) != (offset, length, direction) {
            return Err(Error::InvalidParameter);
        }
        unmapped?;
        copied.map(|_| ())
    }

    fn free(&self, registers: MapRegisters) {
        let a = &*self.inner;
        let (first, count) = (registers.first(), registers.count());
        match a.grant_slot(&registers) {
            Some(mut slot) => {
                if let Some(live) = slot.live.take() {
                    let _ = a.end_mapping(first, &live);
                }
                slot.count = 0;
            }
            None => {
                a.shared.memory.note(format!(
                    "free of registers {first}..+{count} that were not granted"
                ));
                return;
            }
        }
        {
            let mut st = lock(&a.state);
            for f in &mut st.free[first as usize..(first + count) as usize] {
                *f = true;
            }
            st.in_use -= count;
            if st.queue.is_empty() {
                return;
            }
        }
        a.grant_waiters();
    }

    fn allocate_common_buffer(&self, length: u64) -> dmatx_hal::Result<CommonAllocation> {
        Ok(self.inner.allocate_common(length)?)
    }

    fn free_common_buffer(&self, allocation: CommonAllocation) {
        let a = &*self.inner;
        let record = {
            let mut list = lock(&a.common);
            let pos = list
                .iter()
                .position(|c| c.token == allocation.token && c.bus == allocation.logical.get());
            pos.map(|p| list.swap_remove(p))
        };
        match record {
            Some(record) => a.release_common(record),
            None => a.shared.memory.note(format!(
                "free of a common buffer this adapter did not allocate (token {})",
                allocation.token
            )),
        }
    }

    fn read_common_buffer(
        &self,
        allocation: &CommonAllocation,
        offset: u64,
        out: &mut [u8],
    ) -> dmatx_hal::Result<()> {
        let (_list, src) = self.inner.common_at(allocation, offset, out.len())?;
        // SAFETY: `common_at` checked the range lies in a live common buffer, kept live while
        // `_list` is held; `out` is the caller's own slice.
        unsafe { copy_bytes(src, out.as_mut_ptr().expose_provenance(), out.len()) };
        Ok(())
    }

    fn write_common_buffer(
        &self,
        allocation: &CommonAllocation,
        offset: u64,
        data: &[u8],
    ) -> dmatx_hal::Result<()> {
        let (_list, dst) = self.inner.common_at(allocation, offset, data.len())?;
        // SAFETY: as in `read_common_buffer`; no reference to the common buffer's bytes exists.
        unsafe { copy_bytes(data.as_ptr().expose_provenance(), dst, data.len()) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::collections::BTreeMap;
    use std::rc::Rc;
    use std::sync::Weak;

    use dmatx::{Completion, DmaDevice, Enabler, EnablerConfig, Profile, Transaction};
    use dmatx_hal::{AllocationWaiter, DmaVersion, PhysAddr, Segment};

    const LIMIT_28: u64 = (1 << 28) - 1;

    /// The IOMMU and the device in one: records every mapping (IOVA → process address and
    /// length) and moves the device's bytes through them; accesses outside a mapping fail.
    #[derive(Default)]
    struct FakeIommu {
        table: Mutex<BTreeMap<u64, (usize, u64)>>,
        refuse: Mutex<u32>,
        maps: AtomicU64,
        unmaps: AtomicU64,
    }

    impl FakeIommu {
        fn new() -> Arc<Self> {
            Arc::new(Self::default())
        }

        /// Refuse the next `n` map calls.
        fn refuse_next(&self, n: u32) {
            *lock(&self.refuse) = n;
        }

        fn mappings(&self) -> usize {
            lock(&self.table).len()
        }

        /// The device's access of `len` bytes at `iova`, piece by piece through the table:
        /// `f(process address, position, bytes)`.
        fn access(&self, iova: u64, len: usize, mut f: impl FnMut(usize, usize, usize)) {
            let t = lock(&self.table);
            let mut done = 0;
            while done < len {
                let pos = iova + done as u64;
                let (k, (va, l)) = t
                    .range(..=pos)
                    .next_back()
                    .filter(|(k, (_, l))| pos < *k + *l)
                    .unwrap_or_else(|| panic!("device access at unmapped IOVA {pos:#x}"));
                let n = ((k + l - pos) as usize).min(len - done);
                f(va + (pos - k) as usize, done, n);
                done += n;
            }
        }

        fn device_read(&self, iova: u64, out: &mut [u8]) {
            let base = out.as_mut_ptr().expose_provenance();
            // SAFETY: the source is mapped memory (live until its unmap, which cannot run while
            // the table is locked), the destination the test's own slice.
            self.access(iova, out.len(), |va, at, n| unsafe {
                copy_bytes(va, base + at, n)
            });
        }

        fn device_write(&self, iova: u64, data: &[u8]) {
            let base = data.as_ptr().expose_provenance();
            // SAFETY: as in `device_read`, the other way.
            self.access(iova, data.len(), |va, at, n| unsafe {
                copy_bytes(base + at, va, n)
            });
        }
    }

    impl DmaMapper for FakeIommu {
        unsafe fn map(&self, iova: u64, vaddr: usize, size: u64) -> VfioResult<()> {
            assert!(iova.is_multiple_of(PAGE_SIZE) && vaddr.is_multiple_of(4096));
            assert!(size.is_multiple_of(PAGE_SIZE));
            assert!(size > 0);
            {
                let mut refuse = lock(&self.refuse);
                if *refuse > 0 {
                    *refuse -= 1;
                    return Err(VfioError::new(ErrorKind::DmaMap, "fake", "refused"));
                }
            }
            let mut t = lock(&self.table);
            if let Some((k, (_, l))) = t.range(..iova + size).next_back() {
                assert!(k + l <= iova, "map at {iova:#x} overlaps the map at {k:#x}");
            }
            t.insert(iova, (vaddr, size));
            self.maps.fetch_add(1, Relaxed);
            Ok(())
        }

        fn unmap(&self, iova: u64, size: u64) -> VfioResult<()> {
            let mut t = lock(&self.table);
            let keys: Vec<(u64, u64)> = t
                .range(iova..iova + size)
                .map(|(k, (_, l))| (*k, *l))
                .collect();
            assert!(!keys.is_empty(), "unmap of {iova:#x} matches no map");
            let mut at = iova;
            for (k, l) in keys {
                assert_eq!(k, at, "unmap of {iova:#x} +{size:#x} leaves a hole");
                at += l;
                t.remove(&k);
            }
            assert_eq!(at, iova + size, "unmap of {iova:#x} cuts a map");
            self.unmaps.fetch_add(1, Relaxed);
            Ok(())
        }
    }

    /// Made-up physical addresses for no-IOMMU tests: each page asked about gets the next
    /// address from `next`, `stride` pages apart; the device translates them back.
    struct FakePhys {
        next: Cell<u64>,
        stride: Cell<u64>,
        by_phys: RefCell<BTreeMap<u64, usize>>,
    }

    impl FakePhys {
        fn install(next: u64) -> Rc<Self> {
            let me = Rc::new(Self {
                next: Cell::new(next),
                stride: Cell::new(1),
                by_phys: RefCell::default(),
            });
            let f = Rc::downgrade(&me);
            sys::set_physical(Some(Rc::new(move |va| {
                f.upgrade().map_or(va as u64, |f| f.assign(va))
            })));
            me
        }

        fn place(&self, next: u64, stride: u64) {
            self.next.set(next);
            self.stride.set(stride);
        }

        /// Called once per page of each new allocation (pagemap is read when memory is
        /// allocated), so a freed page's address reused by the allocator gets a fresh
        /// placement rather than the one its previous owner had.
        fn assign(&self, va: usize) -> u64 {
            let p = self.next.get();
            self.next.set(p + self.stride.get() * PAGE_SIZE);
            self.by_phys.borrow_mut().insert(p, va);
            p
        }

        fn access(&self, phys: u64, len: usize, mut f: impl FnMut(usize, usize, usize)) {
            let mut done = 0;
            while done < len {
                let pos = phys + done as u64;
                let page = pos - pos % PAGE_SIZE;
                let va = *self
                    .by_phys
                    .borrow()
                    .get(&page)
                    .unwrap_or_else(|| panic!("no page at {page:#x}"));
                let n = ((page + PAGE_SIZE - pos) as usize).min(len - done);
                f(va + (pos - page) as usize, done, n);
                done += n;
            }
        }

        fn device_read(&self, phys: u64, out: &mut [u8]) {
            let base = out.as_mut_ptr().expose_provenance();
            // SAFETY: the pages are live platform memory named by the SG list being run.
            self.access(phys, out.len(), |va, at, n| unsafe {
                copy_bytes(va, base + at, n)
            });
        }

        fn device_write(&self, phys: u64, data: &[u8]) {
            let base = data.as_ptr().expose_provenance();
            // SAFETY: as in `device_read`, the other way.
            self.access(phys, data.len(), |va, at, n| unsafe {
                copy_bytes(base + at, va, n)
            });
        }
    }

    impl Drop for FakePhys {
        fn drop(&mut self) {
            sys::set_physical(None);
        }
    }

    fn iommu_platform(fake: &Arc<FakeIommu>, config: PlatformConfig) -> VfioPlatform {
        let mapper: Arc<dyn DmaMapper> = Arc::clone(fake) as Arc<dyn DmaMapper>;
        VfioPlatform::with_mapper(IommuMode::Iommu, Some(mapper), Vec::new(), config).unwrap()
    }

    fn description(bits: u8, maximum_length: u64) -> DeviceDescription {
        DeviceDescription {
            bus_master: true,
            scatter_gather: true,
            address_bits: bits,
            maximum_length,
            version: DmaVersion::V3,
            direction: Direction::ReadFromDevice,
            duplex: false,
            system: None,
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
            .collect()
    }

    fn assert_clean(platform: &VfioPlatform, twin_before: i64) {
        if let Err(e) = platform.check_clean() {
            panic!("platform not clean: {e}");
        }
        assert_eq!(
            sys::locked_pages(),
            twin_before,
            "the twin has pages still locked"
        );
    }

    /// The SG lists program-DMA was given.
    #[derive(Default)]
    struct Programmed {
        lists: Mutex<Vec<(Direction, Vec<SgElement>)>>,
    }

    type Tx = Transaction<VfioPlatform, Arc<Programmed>, DmaBuffer>;

    fn program(_t: &Tx, ctx: &Arc<Programmed>, direction: Direction, sg: &[SgElement]) -> bool {
        lock(&ctx.lists).push((direction, sg.to_vec()));
        true
    }

    /// Run `buffer` through a transaction of `enabler` in `direction`; the device moves each
    /// SG list with `device(direction, list, position of its first byte)`. Returns the buffer
    /// and every list.
    fn run(
        enabler: &Enabler<VfioPlatform>,
        direction: Direction,
        buffer: DmaBuffer,
        mut device: impl FnMut(Direction, &[SgElement], usize),
    ) -> (DmaBuffer, Vec<Vec<SgElement>>) {
        let len = buffer.len();
        let t = Tx::create(enabler).unwrap();
        t.initialize_using_offset(program, direction, buffer, 0, len)
            .map_err(|e| e.error)
            .unwrap();
        let ctx = Arc::new(Programmed::default());
        t.execute(Arc::clone(&ctx)).unwrap();
        let mut pos = 0usize;
        let mut lists = Vec::new();
        loop {
            let (dir, sg) = lock(&ctx.lists).pop().expect("a transfer was programmed");
            assert_eq!(dir, direction);
            device(dir, &sg, pos);
            pos += sg.iter().map(|e| e.length as usize).sum::<usize>();
            lists.push(sg);
            match t.dma_completed().unwrap() {
                Completion::Finished(status) => {
                    status.unwrap();
                    break;
                }
                Completion::MoreProcessingRequired => {}
            }
        }
        assert_eq!(pos as u64, len);
        let buffer = t.release().unwrap().expect("the buffer comes back");
        (buffer, lists)
    }

    fn edu_like(platform: &VfioPlatform) -> (DmaDevice<VfioPlatform>, Enabler<VfioPlatform>) {
        let device = DmaDevice::new(platform.clone());
        let enabler = Enabler::create(
            &device,
            EnablerConfig::new(Profile::Packet, 4096).with_address_width(28),
        )
        .unwrap();
        (device, enabler)
    }

    #[test]
    fn one_mebibyte_each_way_through_a_28_bit_packet_device() {
        let before = sys::locked_pages();
        let fake = FakeIommu::new();
        let platform = iommu_platform(&fake, PlatformConfig::default());
        let (device, enabler) = edu_like(&platform);
        assert_eq!(enabler.map_register_count(Direction::ReadFromDevice), 2);
        const LEN: usize = 1 << 20;
        for page_offset in [0u64, 1, 0x800, 4095] {
            let out = pattern(LEN, page_offset as u8);
            let mut buffer = platform.allocate_buffer(LEN as u64, page_offset).unwrap();
            buffer.store(0, &out).unwrap();
            let mut seen = vec![0u8; LEN];
            let (buffer, lists) = run(&enabler, Direction::WriteToDevice, buffer, |_, sg, pos| {
                assert_eq!(sg.len(), 1, "the IOMMU makes one element");
                let e = sg[0];
                assert!(e.address.get() + u64::from(e.length) - 1 <= LIMIT_28);
                assert!(e.length <= 4096);
                fake.device_read(e.address.get(), &mut seen[pos..pos + e.length as usize]);
            });
            assert_eq!(lists.len(), LEN / 4096, "offset {page_offset}");
            assert!(seen == out, "written data differs at offset {page_offset}");
            assert_eq!(fake.mappings(), 0, "every transfer unmapped");

            let back = pattern(LEN, 0x5A ^ page_offset as u8);
            let (buffer, lists) = run(&enabler, Direction::ReadFromDevice, buffer, |_, sg, pos| {
                assert_eq!(sg.len(), 1);
                let e = sg[0];
                assert!(e.address.get() + u64::from(e.length) - 1 <= LIMIT_28);
                fake.device_write(e.address.get(), &back[pos..pos + e.length as usize]);
            });
            assert_eq!(lists.len(), LEN / 4096);
            assert!(
                buffer.to_vec() == back,
                "read data differs at offset {page_offset}"
            );
        }
        let s = platform.stats();
        assert_eq!(s.map_calls, s.unmap_calls);
        assert_eq!(s.bounced_bytes, 0);
        assert_eq!(fake.maps.load(Relaxed), s.map_calls);
        assert_eq!(s.live_adapters, 1);
        drop((enabler, device));
        assert_clean(&platform, before);
    }

    #[test]
    fn a_run_of_pages_is_one_map_call() {
        let before = sys::locked_pages();
        let fake = FakeIommu::new();
        let platform = iommu_platform(&fake, PlatformConfig::default());
        let device = DmaDevice::new(platform.clone());
        let enabler =
            Enabler::create(&device, EnablerConfig::new(Profile::ScatterGather64, 65536)).unwrap();
        assert_eq!(enabler.map_register_count(Direction::ReadFromDevice), 17);
        let mut buffer = platform.allocate_buffer(200_000, 0x123).unwrap();
        let out = pattern(200_000, 7);
        buffer.store(0, &out).unwrap();
        let mut seen = vec![0u8; 200_000];
        let (buffer, lists) = run(&enabler, Direction::WriteToDevice, buffer, |_, sg, pos| {
            assert_eq!(sg.len(), 1);
            fake.device_read(
                sg[0].address.get(),
                &mut seen[pos..pos + sg[0].length as usize],
            );
        });
        assert_eq!(lists.len(), 200_000usize.div_ceil(65536));
        assert!(seen == out);
        let s = platform.stats();
        assert_eq!((s.map_calls, s.unmap_calls), (4, 4));
        drop((buffer, enabler, device));
        assert_clean(&platform, before);
    }

    #[test]
    fn the_28_bit_limit_decides_where_registers_go() {
        let before = sys::locked_pages();
        let fake = FakeIommu::new();
        // 512 pages of window, of which only the first 16 lie below 256 MiB.
        let config = PlatformConfig {
            iova_base: 0x0FFF_0000,
            iova_size: 0x20_0000,
            ..PlatformConfig::default()
        };
        let platform = iommu_platform(&fake, config);
        let narrow = description(28, 4096);
        let mut adapters = Vec::new();
        for _ in 0..8 {
            let a = platform.create_adapter(&narrow).unwrap();
            assert!(a.iova_base() + 2 * PAGE_SIZE - 1 <= LIMIT_28);
            adapters.push(a);
        }
        let e = platform.create_adapter(&narrow).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::IovaExhausted);
        assert!(e.message().contains("0xfffffff"), "{e}");
        assert!(e.message().contains("[0xfff0000, 0x101f0000)"), "{e}");
        assert_eq!(
            platform.adapter(&narrow).unwrap_err(),
            Error::InsufficientResources
        );
        // A 64-bit device still fits, above 256 MiB.
        let wide = platform.create_adapter(&description(64, 4096)).unwrap();
        assert!(wide.iova_base() > LIMIT_28);
        drop((adapters, wide));

        // Seventeen registers never fit below the limit.
        let config = PlatformConfig {
            iova_base: 0x0FFF_0000,
            iova_size: 0x20_0000,
            map_registers: Some(17),
            ..PlatformConfig::default()
        };
        let big = iommu_platform(&fake, config);
        let locked = big.stats().locked_pages;
        let e = big.create_adapter(&narrow).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::IovaExhausted);
        assert_eq!(big.stats().locked_pages, locked);
        assert_clean(&big, before);

        // A transaction through the narrow window: every bus address below 256 MiB.
        let (device, enabler) = edu_like(&platform);
        let mut buffer = platform.allocate_buffer(64 << 10, 0x800).unwrap();
        let out = pattern(64 << 10, 3);
        buffer.store(0, &out).unwrap();
        let mut seen = vec![0u8; 64 << 10];
        let (buffer, _) = run(&enabler, Direction::WriteToDevice, buffer, |_, sg, pos| {
            let e = sg[0];
            assert!(e.address.get() >= 0x0FFF_0000);
            assert!(e.address.get() + u64::from(e.length) - 1 <= LIMIT_28);
            fake.device_read(e.address.get(), &mut seen[pos..pos + e.length as usize]);
        });
        assert!(seen == out);
        drop((buffer, enabler, device));
        assert_clean(&platform, before);
    }

    #[test]
    fn exhausted_window_and_failed_creations_leak_nothing() {
        let before = sys::locked_pages();
        let fake = FakeIommu::new();
        let config = PlatformConfig {
            iova_size: 4 * PAGE_SIZE,
            ..PlatformConfig::default()
        };
        let platform = iommu_platform(&fake, config);
        let d = description(32, 4096);
        let a = platform.create_adapter(&d).unwrap();
        let b = platform.create_adapter(&d).unwrap();
        let s = platform.stats();
        assert_eq!(
            (s.iova_free_pages, s.locked_pages, s.live_adapters),
            (0, 4, 2)
        );
        let e = platform.create_adapter(&d).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::IovaExhausted);
        assert_eq!(platform.stats(), s, "a refused adapter changes nothing");
        // Through dmatx: the enabler cannot be made.
        let device = DmaDevice::new(platform.clone());
        assert!(Enabler::create(&device, EnablerConfig::new(Profile::Packet64, 4096)).is_err());
        assert_eq!(platform.stats(), s);
        drop(b);
        // Bounce pages that cannot be locked give the IOVA range back.
        sys::fail_next_mlock(1);
        assert_eq!(
            platform.create_adapter(&d).unwrap_err().kind(),
            ErrorKind::Memory
        );
        assert_eq!(platform.stats().iova_free_pages, 2);
        assert_eq!(platform.stats().live_adapters, 1);
        // Descriptions the platform refuses.
        let mut system = d;
        system.system = Some(dmatx_hal::SystemChannel {
            channel: 0,
            request_line: 0,
            demand_mode: false,
            looped_transfer: false,
            width: dmatx_hal::DmaWidth::Bits32,
            device_address: 0,
        });
        assert_eq!(
            platform.create_adapter(&system).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        assert_eq!(
            platform
                .create_adapter(&description(16, 4096))
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidArgument
        );
        drop((a, device));
        assert_clean(&platform, before);
    }

    #[test]
    fn bad_configurations_are_refused() {
        let fake = FakeIommu::new();
        let mapper: Arc<dyn DmaMapper> = fake.clone();
        let cfg = PlatformConfig::default();
        let e = VfioPlatform::with_mapper(IommuMode::Iommu, None, Vec::new(), cfg.clone());
        assert_eq!(e.unwrap_err().kind(), ErrorKind::InvalidArgument);
        for bad in [
            PlatformConfig {
                map_registers: Some(1),
                ..cfg.clone()
            },
            PlatformConfig {
                iova_base: 0x1234,
                ..cfg.clone()
            },
            PlatformConfig {
                iova_size: 0,
                ..cfg.clone()
            },
        ] {
            let e = VfioPlatform::with_mapper(
                IommuMode::Iommu,
                Some(Arc::clone(&mapper)),
                Vec::new(),
                bad,
            );
            assert_eq!(e.unwrap_err().kind(), ErrorKind::InvalidArgument);
        }
        // Valid ranges that miss the window.
        let e = VfioPlatform::with_mapper(
            IommuMode::Iommu,
            Some(Arc::clone(&mapper)),
            vec![(0x1_0000_0000, 0x1_FFFF_FFFF)],
            cfg.clone(),
        );
        assert_eq!(e.unwrap_err().kind(), ErrorKind::IovaExhausted);
        // Valid ranges that cut it: adapters go where the IOMMU accepts them.
        let p = VfioPlatform::with_mapper(
            IommuMode::Iommu,
            Some(mapper),
            vec![(0, 0x1F_FFFF), (0x800_0000, u64::MAX)],
            cfg,
        )
        .unwrap();
        let s = p.stats();
        assert_eq!(
            s.iova_total_pages,
            0x100 + (0x1000_0000 - 0x800_0000) / PAGE_SIZE
        );
        let a = p
            .create_adapter(&description(64, 0x10_0000 + 4096))
            .unwrap();
        assert_eq!(a.iova_base(), 0x800_0000, "the first 256 pages are too few");
        drop(a);
        assert!(p.check_clean().is_ok());
    }

    #[test]
    fn refused_maps_are_bounced_and_the_data_survives() {
        let before = sys::locked_pages();
        let fake = FakeIommu::new();
        let platform = iommu_platform(&fake, PlatformConfig::default());
        let device = DmaDevice::new(platform.clone());
        let enabler =
            Enabler::create(&device, EnablerConfig::new(Profile::ScatterGather64, 16384)).unwrap();
        let len = 40_000usize;
        let out = pattern(len, 9);
        let mut buffer = platform.allocate_buffer(len as u64, 0x800).unwrap();
        buffer.store(0, &out).unwrap();
        let mut seen = vec![0u8; len];
        // The first transfer's run is refused: it goes through the bounce pages.
        fake.refuse_next(1);
        let (buffer, lists) = run(&enabler, Direction::WriteToDevice, buffer, |_, sg, pos| {
            assert_eq!(sg.len(), 1);
            fake.device_read(
                sg[0].address.get(),
                &mut seen[pos..pos + sg[0].length as usize],
            );
        });
        assert!(seen == out);
        let first = lists[0][0];
        assert_eq!(platform.stats().bounced_bytes, u64::from(first.length));

        // A read whose second transfer is refused: the bytes come back through the bounce
        // pages at flush.
        let back = pattern(len, 0x33);
        let mut transfers = 0;
        let (buffer, _) = run(&enabler, Direction::ReadFromDevice, buffer, |_, sg, pos| {
            transfers += 1;
            if transfers == 1 {
                fake.refuse_next(1);
            }
            fake.device_write(sg[0].address.get(), &back[pos..pos + sg[0].length as usize]);
        });
        assert!(buffer.to_vec() == back);
        let s = platform.stats();
        assert_eq!(s.bounced_bytes, u64::from(first.length) + 16384);
        assert_eq!(fake.mappings(), 0);
        drop((buffer, enabler, device));
        assert_clean(&platform, before);
    }

    #[test]
    fn no_iommu_pages_above_the_limit_are_bounced() {
        let before = sys::locked_pages();
        let phys = FakePhys::install(0x10_0000);
        let platform =
            VfioPlatform::with_mapper(IommuMode::NoIommu, None, Vec::new(), Default::default())
                .unwrap();
        // The adapter's bounce pages land low, the buffer above 256 MiB.
        let (device, enabler) = edu_like(&platform);
        phys.place(0x1_0000_0000, 1);
        let len = 64 << 10;
        let out = pattern(len, 1);
        let mut buffer = platform.allocate_buffer(len as u64, 0x10).unwrap();
        buffer.store(0, &out).unwrap();
        let mut seen = vec![0u8; len];
        let (buffer, lists) = run(&enabler, Direction::WriteToDevice, buffer, |_, sg, pos| {
            for e in sg {
                assert!(e.address.get() + u64::from(e.length) - 1 <= LIMIT_28);
            }
            let mut at = pos;
            for e in sg {
                phys.device_read(e.address.get(), &mut seen[at..at + e.length as usize]);
                at += e.length as usize;
            }
        });
        assert!(seen == out);
        // The two bounce pages are physically contiguous: each transfer is one element.
        assert!(lists.iter().all(|l| l.len() == 1), "{lists:x?}");
        let back = pattern(len, 2);
        let (buffer, _) = run(&enabler, Direction::ReadFromDevice, buffer, |_, sg, pos| {
            let mut at = pos;
            for e in sg {
                phys.device_write(e.address.get(), &back[at..at + e.length as usize]);
                at += e.length as usize;
            }
        });
        assert!(buffer.to_vec() == back);
        assert_eq!(platform.stats().bounced_bytes, 2 * len as u64);
        assert_eq!(platform.stats().map_calls, 0);
        drop((buffer, enabler, device));

        // A bounce page above the limit makes adapter creation fail.
        let e = platform.create_adapter(&description(28, 4096)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Memory);
        assert!(e.message().contains("above the device's limit"), "{e}");
        assert_clean(&platform, before);
    }

    #[test]
    fn no_iommu_elements_split_where_physical_contiguity_breaks() {
        let before = sys::locked_pages();
        let phys = FakePhys::install(0x10_0000);
        let platform =
            VfioPlatform::with_mapper(IommuMode::NoIommu, None, Vec::new(), Default::default())
                .unwrap();
        let device = DmaDevice::new(platform.clone());
        let enabler =
            Enabler::create(&device, EnablerConfig::new(Profile::ScatterGather, 16384)).unwrap();
        for (stride, per_transfer) in [(1, 1), (2, 4)] {
            phys.place(0x100_0000 * stride, stride);
            let len = 32 << 10;
            let out = pattern(len, stride as u8);
            let mut buffer = platform.allocate_buffer(len as u64, 0).unwrap();
            buffer.store(0, &out).unwrap();
            let mut seen = vec![0u8; len];
            let (buffer, lists) = run(&enabler, Direction::WriteToDevice, buffer, |_, sg, pos| {
                let mut at = pos;
                for e in sg {
                    phys.device_read(e.address.get(), &mut seen[at..at + e.length as usize]);
                    at += e.length as usize;
                }
            });
            assert!(seen == out);
            assert!(lists.iter().all(|l| l.len() == per_transfer), "{lists:x?}");
            drop(buffer);
        }
        assert_eq!(platform.stats().bounced_bytes, 0);
        drop((enabler, device));
        assert_clean(&platform, before);
    }

    /// Real memory the platform did not allocate: a heap block, owned by raw pointer.
    struct Foreign {
        va: usize,
        len: usize,
        frames: Vec<PhysAddr>,
    }

    impl Foreign {
        fn new(len: usize) -> Self {
            let block = Box::into_raw(vec![0u8; len].into_boxed_slice()) as *mut u8;
            let va = block.expose_provenance();
            let first = va - va % 4096;
            let frames = (0..dmatx_types::pages_spanned((va % 4096) as u64, len as u64))
                .map(|i| PhysAddr::new(first as u64 + i * PAGE_SIZE))
                .collect();
            Self { va, len, frames }
        }
    }

    impl Drop for Foreign {
        fn drop(&mut self) {
            let ptr: *mut u8 = std::ptr::with_exposed_provenance_mut(self.va);
            let slice = std::ptr::slice_from_raw_parts_mut(ptr, self.len);
            // SAFETY: made by `Box::into_raw` of a boxed slice of this length in `new`, freed
            // once, here.
            drop(unsafe { Box::from_raw(slice) });
        }
    }

    // SAFETY: the block is this value's own (freed only by `Drop`, kept by a leak), its one
    // segment and frames (process addresses, as frames are in IOMMU mode) never change and
    // are one per page, and no reference to the bytes is made after `new`.
    unsafe impl MemoryDescriptor for Foreign {
        fn segment_count(&self) -> usize {
            1
        }

        fn segment(&self, _index: usize) -> Segment<'_> {
            Segment {
                va: VirtAddr::new(self.va as u64),
                length: self.len as u64,
                frames: &self.frames,
            }
        }
    }

    struct NoWaiter;

    impl AllocationWaiter for NoWaiter {
        fn granted(&self, _registers: MapRegisters) {}
    }

    fn grant(adapter: &VfioAdapter, count: u32) -> MapRegisters {
        let waiter: WaiterRef = Weak::<NoWaiter>::new();
        let request = AllocationRequest {
            count: count.try_into().unwrap(),
            immediate: true,
        };
        match adapter.allocate(request, &waiter).unwrap() {
            Allocation::Granted(r) => r,
            Allocation::Queued => panic!("immediate requests never queue"),
        }
    }

    #[test]
    fn memory_the_platform_did_not_allocate_is_refused() {
        let before = sys::locked_pages();
        let fake = FakeIommu::new();
        let platform = iommu_platform(&fake, PlatformConfig::default());
        let adapter = platform.create_adapter(&description(64, 16384)).unwrap();
        let regs = grant(&adapter, 5);
        let mut out = [SgElement::new(BusAddr::new(0), 0); 4];
        let foreign = Foreign::new(10_000);
        let w = Direction::WriteToDevice;
        let e = adapter.map(&regs, &foreign, 0, 10_000, w, &mut out);
        assert_eq!(e, Err(Error::InvalidParameter));
        assert_eq!(platform.stats().map_calls, 0, "nothing reached the IOMMU");
        // A platform buffer maps on the same grant; a bad flush still ends the mapping.
        let buffer = platform.allocate_buffer(10_000, 0).unwrap();
        let m = adapter.map(&regs, &buffer, 0, 10_000, w, &mut out).unwrap();
        assert_eq!((m.bytes, m.elements), (10_000, 1));
        assert_eq!(
            adapter.map(&regs, &buffer, 0, 10_000, w, &mut out),
            Err(Error::InvalidDeviceState),
            "the previous mapping was not flushed"
        );
        assert_eq!(
            adapter.flush(&regs, &buffer, 0, 9_999, w),
            Err(Error::InvalidParameter)
        );
        assert_eq!(platform.stats().live_mappings, 0);
        // A buffer of another platform is foreign too.
        let other = iommu_platform(&fake, PlatformConfig::default());
        let theirs = other.allocate_buffer(100, 0).unwrap();
        assert_eq!(
            adapter.map(&regs, &theirs, 0, 100, w, &mut out),
            Err(Error::InvalidParameter)
        );
        // Free ends a live mapping.
        adapter.map(&regs, &buffer, 0, 10_000, w, &mut out).unwrap();
        adapter.free(regs);
        assert_eq!(fake.mappings(), 0);
        drop((adapter, buffer, theirs, foreign));
        assert_clean(&other, before);
        assert_clean(&platform, before);
    }

    #[test]
    fn map_honours_the_grant_the_list_and_chains() {
        let before = sys::locked_pages();
        let fake = FakeIommu::new();
        let platform = iommu_platform(&fake, PlatformConfig::default());
        let adapter = platform.create_adapter(&description(64, 16384)).unwrap();
        let buffer = platform.allocate_buffer(20_000, 0x100).unwrap();
        let w = Direction::WriteToDevice;
        let mut out = [SgElement::new(BusAddr::new(0), 0); 4];
        // Two registers: two pages, fewer bytes than asked.
        let regs = grant(&adapter, 2);
        let m = adapter.map(&regs, &buffer, 0, 20_000, w, &mut out).unwrap();
        assert_eq!((m.bytes, m.elements), (2 * 4096 - 0x100, 1));
        assert_eq!(out[0].address.get(), adapter.iova_base() + 0x100);
        adapter.flush(&regs, &buffer, 0, m.bytes, w).unwrap();
        assert_eq!(
            adapter.map(&regs, &buffer, 0, 0, w, &mut out),
            Err(Error::InvalidParameter)
        );
        assert_eq!(
            adapter.map(&regs, &buffer, 19_000, 1001, w, &mut out),
            Err(Error::InvalidParameter)
        );
        assert_eq!(
            adapter.map(&regs, &buffer, 0, 10, w, &mut []),
            Err(Error::InvalidParameter)
        );
        adapter.free(regs);
        // A grant that is not outstanding.
        let ghost = MapRegisters::new(0, 2);
        assert_eq!(
            adapter.map(&ghost, &buffer, 0, 10, w, &mut out),
            Err(Error::InvalidParameter)
        );
        drop((adapter, buffer));
        assert_clean(&platform, before);
    }

    #[test]
    fn common_buffers_in_iommu_mode() {
        let before = sys::locked_pages();
        let fake = FakeIommu::new();
        let platform = iommu_platform(&fake, PlatformConfig::default());
        let adapter = platform.create_adapter(&description(28, 4096)).unwrap();
        let c = adapter.allocate_common_buffer(10_000).unwrap();
        assert_eq!(c.length, 10_000);
        assert!(c.logical.get() + 3 * PAGE_SIZE - 1 <= LIMIT_28);
        assert_eq!(c.logical.get() % PAGE_SIZE, 0);
        let data = pattern(10_000, 4);
        adapter.write_common_buffer(&c, 0, &data).unwrap();
        let mut seen = vec![0u8; 10_000];
        fake.device_read(c.logical.get(), &mut seen);
        assert!(seen == data);
        fake.device_write(c.logical.get() + 9_990, b"0123456789");
        let mut tail = [0u8; 10];
        adapter.read_common_buffer(&c, 9_990, &mut tail).unwrap();
        assert_eq!(&tail, b"0123456789");
        assert_eq!(
            adapter.read_common_buffer(&c, 9_991, &mut tail),
            Err(Error::InvalidParameter)
        );
        assert_eq!(
            adapter.write_common_buffer(&c, u64::MAX, b"x"),
            Err(Error::InvalidParameter)
        );
        assert_eq!(platform.stats().common_buffers, 1);
        assert!(platform.check_clean().is_err());
        assert_eq!(
            adapter.allocate_common(0).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        adapter.free_common_buffer(c);
        assert_eq!(fake.mappings(), 0);
        drop(adapter);
        assert_clean(&platform, before);

        // One left allocated is freed with the adapter, and reported.
        let leaky = iommu_platform(&fake, PlatformConfig::default());
        let adapter = leaky.create_adapter(&description(28, 4096)).unwrap();
        let _kept = adapter.allocate_common_buffer(100).unwrap();
        drop(adapter);
        assert_eq!(fake.mappings(), 0);
        let report = leaky.check_clean().unwrap_err();
        assert!(report.contains("1 common buffers not freed"), "{report}");
        let s = leaky.stats();
        assert_eq!(
            (s.locked_pages, s.common_buffers, s.live_adapters),
            (0, 0, 0)
        );
        assert_eq!(s.iova_free_pages, s.iova_total_pages);
        assert_eq!(sys::locked_pages(), before);
    }

    #[test]
    fn common_buffers_through_dmatx() {
        let before = sys::locked_pages();
        let fake = FakeIommu::new();
        let platform = iommu_platform(&fake, PlatformConfig::default());
        let device = DmaDevice::new(platform.clone());
        let enabler =
            Enabler::create(&device, EnablerConfig::new(Profile::ScatterGather64, 65536)).unwrap();
        let common = dmatx::CommonBuffer::create(&enabler, 8192).unwrap();
        common.write(100, b"ring").unwrap();
        let mut seen = [0u8; 4];
        fake.device_read(common.aligned_logical_address().get() + 100, &mut seen);
        assert_eq!(&seen, b"ring");
        drop((common, enabler, device));
        assert_clean(&platform, before);
    }

    #[test]
    fn common_buffers_in_no_iommu_mode() {
        let before = sys::locked_pages();
        let phys = FakePhys::install(0x10_0000);
        let platform =
            VfioPlatform::with_mapper(IommuMode::NoIommu, None, Vec::new(), Default::default())
                .unwrap();
        let adapter = platform.create_adapter(&description(28, 4096)).unwrap();
        // One page always works.
        phys.place(0x20_0000, 2);
        let one = adapter.allocate_common_buffer(4096).unwrap();
        assert_eq!(one.logical.get(), 0x20_0000);
        adapter.write_common_buffer(&one, 0, b"abc").unwrap();
        let mut seen = [0u8; 3];
        phys.device_read(0x20_0000, &mut seen);
        assert_eq!(&seen, b"abc");
        // Scattered pages do not.
        let e = adapter.allocate_common(3 * 4096).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Memory);
        assert!(e.message().contains("not physically contiguous"), "{e}");
        // Contiguous ones above the limit do not either.
        phys.place(0x1_0000_0000, 1);
        let e = adapter.allocate_common(3 * 4096).unwrap_err();
        assert!(e.message().contains("above the device's limit"), "{e}");
        // Contiguous ones below it do.
        phys.place(0x40_0000, 1);
        let three = adapter.allocate_common_buffer(3 * 4096).unwrap();
        assert_eq!(three.logical.get(), 0x40_0000);
        adapter.free_common_buffer(one);
        adapter.free_common_buffer(three);
        drop(adapter);
        assert_clean(&platform, before);
    }

    /// A waiter that records the order of its grant and what it saw.
    struct Recorder {
        name: char,
        adapter: VfioAdapter,
        order: Arc<Mutex<Vec<char>>>,
        grant: Mutex<Option<MapRegisters>>,
    }

    impl AllocationWaiter for Recorder {
        fn granted(&self, registers: MapRegisters) {
            // Would deadlock if the adapter held its lock while calling.
            let _ = self.adapter.free_registers();
            lock(&self.order).push(self.name);
            *lock(&self.grant) = Some(registers);
        }
    }

    #[test]
    fn queued_requests_are_granted_in_order_as_registers_return() {
        let before = sys::locked_pages();
        let fake = FakeIommu::new();
        let config = PlatformConfig {
            map_registers: Some(4),
            ..PlatformConfig::default()
        };
        let platform = iommu_platform(&fake, config);
        let adapter = platform.create_adapter(&description(32, 4096)).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let waiter = |name| {
            Arc::new(Recorder {
                name,
                adapter: adapter.clone(),
                order: Arc::clone(&order),
                grant: Mutex::new(None),
            })
        };
        let (b, c, d) = (waiter('b'), waiter('c'), waiter('d'));
        let queue = |w: &Arc<Recorder>, count: u32| {
            let w: Arc<dyn AllocationWaiter> = w.clone();
            let weak = Arc::downgrade(&w);
            let request = AllocationRequest {
                count: count.try_into().unwrap(),
                immediate: false,
            };
            adapter.allocate(request, &weak).unwrap()
        };
        for _ in 0..3 {
            adapter.register_waiter().unwrap();
        }
        let all = grant(&adapter, 4);
        assert!(matches!(queue(&b, 2), Allocation::Queued));
        assert!(matches!(queue(&c, 1), Allocation::Queued));
        assert!(matches!(queue(&d, 3), Allocation::Queued));
        assert_eq!(adapter.queued(), 3);
        // Immediate requests never queue.
        let waiter_ref: WaiterRef = Weak::<NoWaiter>::new();
        let immediate = AllocationRequest {
            count: 1.try_into().unwrap(),
            immediate: true,
        };
        assert_eq!(
            adapter.allocate(immediate, &waiter_ref).unwrap_err(),
            Error::InsufficientResources
        );
        // Returning all four grants b and c; d needs three consecutive registers.
        adapter.free(all);
        assert_eq!(*lock(&order), ['b', 'c']);
        assert_eq!(adapter.queued(), 1);
        assert_eq!(adapter.free_registers(), 1);
        let gb = lock(&b.grant).take().unwrap();
        adapter.free(gb);
        assert_eq!(
            *lock(&order),
            ['b', 'c'],
            "registers 0, 1 and 3 are not consecutive"
        );
        let gc = lock(&c.grant).take().unwrap();
        adapter.free(gc);
        assert_eq!(*lock(&order), ['b', 'c', 'd']);
        let gd = lock(&d.grant).take().unwrap();
        assert_eq!((gd.first(), gd.count()), (0, 3));
        adapter.free(gd);
        // Cancelling a queued request: it is never granted.
        let all = grant(&adapter, 4);
        assert!(matches!(queue(&b, 1), Allocation::Queued));
        let bw: Arc<dyn AllocationWaiter> = b.clone();
        assert!(adapter.cancel_allocation(&Arc::downgrade(&bw)));
        assert!(!adapter.cancel_allocation(&Arc::downgrade(&bw)));
        adapter.free(all);
        assert_eq!(lock(&order).len(), 3);
        // Room for three waiters only: a fourth queued request is refused, not allocated.
        let all = grant(&adapter, 4);
        assert!(matches!(queue(&b, 1), Allocation::Queued));
        assert!(matches!(queue(&c, 1), Allocation::Queued));
        assert!(matches!(queue(&d, 1), Allocation::Queued));
        let e = waiter('e');
        assert_eq!(
            {
                let w: Arc<dyn AllocationWaiter> = e.clone();
                adapter.allocate(
                    AllocationRequest {
                        count: 1.try_into().unwrap(),
                        immediate: false,
                    },
                    &Arc::downgrade(&w),
                )
            }
            .unwrap_err(),
            Error::InsufficientResources
        );
        adapter.free(all);
        for w in [&b, &c, &d] {
            let g = lock(&w.grant).take().unwrap();
            adapter.free(g);
        }
        for _ in 0..3 {
            adapter.unregister_waiter();
        }
        drop((b, c, d, e, bw, adapter));
        assert_clean(&platform, before);
    }

    #[test]
    fn buffers_outlive_the_platform_value() {
        let before = sys::locked_pages();
        let fake = FakeIommu::new();
        let platform = iommu_platform(&fake, PlatformConfig::default());
        let mut buffer = platform.allocate_buffer(5000, 0).unwrap();
        let copy = platform.clone();
        drop(platform);
        buffer.store(4990, b"0123456789").unwrap();
        assert_eq!(&buffer.to_vec()[4990..], b"0123456789");
        assert!(copy.check_clean().is_err(), "the buffer's pages are locked");
        drop(copy);
        drop(buffer);
        assert_eq!(sys::locked_pages(), before);
    }

    #[test]
    fn the_registry_is_finite() {
        let before = sys::locked_pages();
        let fake = FakeIommu::new();
        let config = PlatformConfig {
            max_buffers: 2,
            ..PlatformConfig::default()
        };
        let platform = iommu_platform(&fake, config);
        let adapter = platform.create_adapter(&description(64, 4096)).unwrap();
        let a = platform.allocate_buffer(1, 0).unwrap();
        let c = adapter.allocate_common_buffer(1).unwrap();
        let e = platform.allocate_buffer(1, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Memory);
        assert!(e.message().contains("max_buffers"), "{e}");
        let e = adapter.allocate_common(1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Memory);
        assert_eq!(fake.mappings(), 1, "the refused common buffer was unmapped");
        adapter.free_common_buffer(c);
        drop((a, adapter));
        assert_clean(&platform, before);
    }

    #[test]
    fn a_platform_over_a_vfio_container() {
        use crate::device::tests::{EDU, setup};
        let before = sys::locked_pages();
        let (twin, container, device) = setup(crate::sys::DeviceSpec::new(EDU, 3));
        // The IOMMU accepts IOVAs below 0xFF_0000 and from 4 GiB on.
        twin.iova_ranges(Some(vec![(0, 0xFE_FFFF), (0x1_0000_0000, u64::MAX)]));
        let platform = VfioPlatform::new(&container, PlatformConfig::default()).unwrap();
        assert_eq!(platform.mode(), IommuMode::Iommu);
        let s = platform.stats();
        assert_eq!(s.iova_total_pages, (0xFF_0000 - 0x10_0000) / PAGE_SIZE);
        let adapter = platform.create_adapter(&description(28, 16384)).unwrap();
        assert_eq!(adapter.map_register_count(), 5);
        let buffer = platform.allocate_buffer(20_000, 0x10).unwrap();
        let regs = grant(&adapter, 5);
        let mut out = [SgElement::new(BusAddr::new(0), 0); 2];
        let w = Direction::WriteToDevice;
        let m = adapter.map(&regs, &buffer, 0, 16384, w, &mut out).unwrap();
        assert_eq!((m.bytes, m.elements), (16384, 1));
        assert_eq!(out[0].address.get(), adapter.iova_base() + 0x10);
        assert_eq!(twin.dma_calls(), (1, 0, 1));
        adapter.flush(&regs, &buffer, 0, 16384, w).unwrap();
        assert_eq!(twin.dma_calls(), (1, 1, 0));
        let c = adapter.allocate_common_buffer(100).unwrap();
        assert_eq!(twin.dma_calls(), (2, 1, 1));
        adapter.free_common_buffer(c);
        adapter.free(regs);
        drop((adapter, buffer));
        assert_eq!(twin.dma_calls().2, 0);
        assert_clean(&platform, before);
        // The platform keeps the container open (its mappings need it) until it goes.
        drop((device, container));
        assert_eq!(twin.open_fds(), 1);
        drop(platform);
        twin.assert_clean();
    }
}
