//! The simulated machine: memory, adapters and the end-of-test checks (spec §0, §1.1).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use dmatx_hal::{
    DeviceDescription, Direction, DmaVersion, Error, FailurePlan, PAGE_SIZE, PhysAddr, Platform,
    Result, SystemChannel,
};

use crate::adapter::{AdapterConfig, AdapterInner, AdapterMode, AdapterStats, SimAdapter};
use crate::buffer::SimBuffer;
use crate::memory::{Memory, MemoryRegion, MemoryStats, Placement, lock};
use crate::sanitizer::Violation;
use crate::system::{Controller, SimFifo, SimSystemDma, SystemDmaConfig};

/// Default physical base of simulated memory (not zero, so address arithmetic that forgets the
/// base shows up).
pub const DEFAULT_MEMORY_BASE: u64 = 0x1000_0000;

/// Default size of simulated memory: 64 MiB (8 MiB under Miri).
pub const DEFAULT_MEMORY_BYTES: u64 = if cfg!(miri) { 8 << 20 } else { 64 << 20 };

/// Default placement of buffers.
pub const DEFAULT_PLACEMENT: Placement = Placement::Scatter { seed: 0x5EED };

/// How to build a [`SimPlatform`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// Physical memory layout (one or more regions).
    pub regions: Vec<MemoryRegion>,
    /// Placement of buffers from [`SimPlatform::allocate_buffer`].
    pub placement: Placement,
    /// How adapters are built unless a queued override says otherwise.
    pub adapter: AdapterConfig,
    /// The system DMA controller, if the machine has one.
    pub system: Option<SystemDmaConfig>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            regions: vec![MemoryRegion::new(
                PhysAddr::new(DEFAULT_MEMORY_BASE),
                DEFAULT_MEMORY_BYTES,
            )],
            placement: DEFAULT_PLACEMENT,
            adapter: AdapterConfig::default(),
            system: None,
        }
    }
}

impl SimConfig {
    /// The default configuration.
    pub fn new() -> Self {
        Self::default()
    }

    /// Memory as one region of `bytes` bytes at `base` (replacing the layout).
    pub fn memory(mut self, base: u64, bytes: u64) -> Self {
        self.regions = vec![MemoryRegion::new(PhysAddr::new(base), bytes)];
        self
    }

    /// Add a region of `bytes` bytes at `base` (for example high memory above 4 GiB).
    pub fn add_region(mut self, base: u64, bytes: u64) -> Self {
        self.regions
            .push(MemoryRegion::new(PhysAddr::new(base), bytes));
        self
    }

    /// Default placement of buffers.
    pub fn placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// Map registers of each adapter.
    pub fn map_registers(mut self, n: u32) -> Self {
        self.adapter.map_registers = n;
        self
    }

    /// Mapping mode of each adapter.
    pub fn mode(mut self, mode: AdapterMode) -> Self {
        self.adapter.mode = mode;
        self
    }

    /// Default adapter configuration.
    pub fn adapter(mut self, adapter: AdapterConfig) -> Self {
        self.adapter = adapter;
        self
    }

    /// Give the machine a system DMA controller (see [`SimSystemDma`]).
    pub fn system_dma(mut self, system: SystemDmaConfig) -> Self {
        self.system = Some(system);
        self
    }

    /// Build the platform.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`](dmatx_hal::Error::InvalidParameter) if the memory layout is invalid (empty, unaligned or
    /// overlapping regions) or the system DMA configuration has fewer than 2 map registers.
    pub fn build(self) -> Result<SimPlatform> {
        SimPlatform::with_config(self)
    }
}

/// What adapters and the platform share: memory and the records the checks read.
pub(crate) struct Shared {
    pub(crate) memory: Arc<Memory>,
    pub(crate) violations: Mutex<Vec<Violation>>,
    /// Misuse of the platform seen by the sim (bad frees, adapters dropped dirty).
    pub(crate) issues: Mutex<Vec<String>>,
    /// Final counters of dropped adapters.
    pub(crate) retired: Mutex<Vec<AdapterStats>>,
    /// Failure plan for DMA object creations (transactions, common buffers).
    pub(crate) creations: Mutex<FailurePlan>,
}

struct Adapters {
    default: AdapterConfig,
    overrides: VecDeque<AdapterConfig>,
    live: Vec<Weak<AdapterInner>>,
}

struct PlatformInner {
    shared: Arc<Shared>,
    placement: Placement,
    adapters: Mutex<Adapters>,
    next_id: AtomicUsize,
    system: OnceLock<SimSystemDma>,
}

/// The simulated machine: physical memory, adapters with map registers, a DMA sanitizer.
///
/// Cheap to clone; clones name the same machine. See the [crate docs](crate) for a tour.
#[derive(Clone)]
pub struct SimPlatform {
    inner: Arc<PlatformInner>,
}

impl core::fmt::Debug for SimPlatform {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SimPlatform")
            .field("memory", &self.inner.shared.memory.stats())
            .finish_non_exhaustive()
    }
}

impl Default for SimPlatform {
    fn default() -> Self {
        Self::new()
    }
}

/// A snapshot of the machine's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Live adapters, in creation order.
    pub adapters: Vec<AdapterStats>,
    /// Final counters of adapters that were dropped.
    pub retired: Vec<AdapterStats>,
    /// Frame allocator counters.
    pub memory: MemoryStats,
    /// Violations in the sanitizer record.
    pub violations: usize,
}

impl SimStats {
    /// Bytes bounced by all adapters, live and retired.
    pub fn bytes_bounced(&self) -> u64 {
        self.adapters
            .iter()
            .chain(&self.retired)
            .map(|a| a.bytes_bounced)
            .sum()
    }
}

impl SimPlatform {
    /// A machine with the default configuration: 64 MiB at `0x1000_0000`, scattered buffers,
    /// direct-mapping adapters with 32 map registers.
    pub fn new() -> Self {
        // The default configuration is valid; `with_config` can only fail on a bad layout.
        match Self::with_config(SimConfig::default()) {
            Ok(p) => p,
            Err(e) => unreachable!("default sim configuration rejected: {e}"),
        }
    }

    /// A machine built from `config`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`](dmatx_hal::Error::InvalidParameter) if the memory layout is invalid.
    pub fn with_config(config: SimConfig) -> Result<Self> {
        let memory = Arc::new(Memory::new(&config.regions)?);
        let platform = Self {
            inner: Arc::new(PlatformInner {
                shared: Arc::new(Shared {
                    memory,
                    violations: Mutex::new(Vec::new()),
                    issues: Mutex::new(Vec::new()),
                    retired: Mutex::new(Vec::new()),
                    creations: Mutex::new(FailurePlan::default()),
                }),
                placement: config.placement,
                adapters: Mutex::new(Adapters {
                    default: config.adapter,
                    overrides: VecDeque::new(),
                    live: Vec::new(),
                }),
                next_id: AtomicUsize::new(0),
                system: OnceLock::new(),
            }),
        };
        if let Some(system) = &config.system {
            platform.add_system_dma(system)?;
        }
        Ok(platform)
    }

    /// Give the machine a system DMA controller configured by `config`, and return it.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] if the machine already has one;
    /// [`Error::InvalidParameter`] if `config` has fewer than 2 map registers.
    pub fn add_system_dma(&self, config: &SystemDmaConfig) -> Result<SimSystemDma> {
        if self.inner.system.get().is_some() {
            return Err(Error::InvalidDeviceState);
        }
        let controller = Controller::new(Arc::clone(&self.inner.shared), config)?;
        let mut fresh = Some(SimSystemDma::new(controller));
        let installed = self.inner.system.get_or_init(|| {
            fresh
                .take()
                .unwrap_or_else(|| unreachable!("initialised once"))
        });
        if fresh.is_some() {
            // Another thread installed one first.
            return Err(Error::InvalidDeviceState);
        }
        Ok(installed.clone())
    }

    /// The machine's system DMA controller, if it has one.
    pub fn system_dma(&self) -> Option<SimSystemDma> {
        self.inner.system.get().cloned()
    }

    /// Register a FIFO endpoint at device address `address` on the system DMA controller
    /// ([`SimSystemDma::add_fifo`]).
    ///
    /// # Errors
    /// [`Error::InvalidDeviceRequest`] if the machine has no system DMA controller;
    /// [`Error::InvalidParameter`] if an endpoint is already registered at `address`.
    pub fn add_fifo(&self, address: u64, capacity: usize) -> Result<SimFifo> {
        self.inner
            .system
            .get()
            .ok_or(Error::InvalidDeviceRequest)?
            .add_fifo(address, capacity)
    }

    /// A device description for tests of system-mode DMA: no bus mastering, no
    /// scatter/gather, 32 address bits, transfers up to 1 MiB, DMA v3, simplex, on `channel`.
    pub fn system_description(channel: SystemChannel) -> DeviceDescription {
        DeviceDescription {
            bus_master: false,
            scatter_gather: false,
            address_bits: 32,
            maximum_length: 1 << 20,
            version: DmaVersion::V3,
            direction: Direction::ReadFromDevice,
            duplex: false,
            system: Some(channel),
        }
    }

    /// A device description for tests: a bus-master scatter/gather device with
    /// `address_bits` address bits, taking transfers up to 1 MiB, DMA v3, simplex.
    pub fn description(address_bits: u8) -> DeviceDescription {
        DeviceDescription {
            bus_master: true,
            scatter_gather: true,
            address_bits,
            maximum_length: 1 << 20,
            version: DmaVersion::V3,
            direction: Direction::ReadFromDevice,
            duplex: false,
            system: None,
        }
    }

    /// Allocate a buffer of `len` bytes starting at byte `page_offset` (0..4095) of its first
    /// page, placed by the configured default placement.
    ///
    /// # Errors
    /// [`Error::InsufficientResources`](dmatx_hal::Error::InsufficientResources) if memory is exhausted (or the failure knob is armed);
    /// [`Error::InvalidParameter`](dmatx_hal::Error::InvalidParameter) if `page_offset` is not below 4096 or `len` exceeds
    /// 4 GiB − 4 KiB.
    pub fn allocate_buffer(&self, len: u64, page_offset: u64) -> Result<SimBuffer> {
        self.allocate_buffer_with(len, page_offset, self.inner.placement)
    }

    /// Allocate a buffer placed by `placement`.
    ///
    /// # Errors
    /// As [`SimPlatform::allocate_buffer`].
    pub fn allocate_buffer_with(
        &self,
        len: u64,
        page_offset: u64,
        placement: Placement,
    ) -> Result<SimBuffer> {
        SimBuffer::allocate(&self.inner.shared.memory, len, page_offset, placement)
    }

    /// Allocate a chain of buffers, one segment per `(len, page_offset)`.
    ///
    /// # Errors
    /// As [`SimPlatform::allocate_buffer`]; [`Error::InvalidParameter`](dmatx_hal::Error::InvalidParameter) for an empty list.
    pub fn allocate_chain(&self, parts: &[(u64, u64)]) -> Result<SimBuffer> {
        let buffers = parts
            .iter()
            .map(|&(len, off)| self.allocate_buffer(len, off))
            .collect::<Result<Vec<_>>>()?;
        SimBuffer::chain(buffers)
    }

    /// Make the next `n` memory allocations (buffers, common buffers, bounce pages of new
    /// adapters) fail with [`Error::InsufficientResources`](dmatx_hal::Error::InsufficientResources).
    pub fn fail_next_allocations(&self, n: u64) {
        self.inner.shared.memory.fail_next(n);
    }

    /// Make the next `n` DMA object creations fail with `InsufficientResources`: creating a
    /// transaction (its adapters refuse to register it) or a common buffer. The low-memory knob.
    pub fn fail_next_creations(&self, n: u64) {
        lock(&self.inner.shared.creations).fail_next(n);
    }

    /// Make each DMA object creation fail with probability `probability` (0 turns it off),
    /// drawn from a generator seeded with `seed` so runs repeat.
    pub fn fail_creations_randomly(&self, probability: f64, seed: u64) {
        lock(&self.inner.shared.creations).fail_randomly(probability, seed);
    }

    /// DMA object creations refused and allowed so far by the low-memory knob.
    pub fn creation_counts(&self) -> (u64, u64) {
        lock(&self.inner.shared.creations).counts()
    }

    /// Set the configuration of adapters created from now on (unless overridden).
    pub fn set_adapter_config(&self, config: AdapterConfig) {
        lock(&self.inner.adapters).default = config;
    }

    /// Queue a configuration for the next adapter created (overrides are used in order).
    pub fn push_adapter_config(&self, config: AdapterConfig) {
        lock(&self.inner.adapters).overrides.push_back(config);
    }

    /// Live adapters, in creation order.
    pub fn adapters(&self) -> Vec<SimAdapter> {
        lock(&self.inner.adapters)
            .live
            .iter()
            .filter_map(Weak::upgrade)
            .map(|inner| SimAdapter { inner })
            .collect()
    }

    /// The most recently created adapter still alive.
    pub fn last_adapter(&self) -> Option<SimAdapter> {
        self.adapters().pop()
    }

    /// The violations the sanitizer recorded, oldest first.
    pub fn sanitizer_record(&self) -> Vec<Violation> {
        lock(&self.inner.shared.violations).clone()
    }

    /// Forget recorded violations.
    pub fn clear_sanitizer(&self) {
        lock(&self.inner.shared.violations).clear();
    }

    /// Counters of the machine.
    pub fn stats(&self) -> SimStats {
        SimStats {
            adapters: self.adapters().iter().map(SimAdapter::stats).collect(),
            retired: lock(&self.inner.shared.retired).clone(),
            memory: self.inner.shared.memory.stats(),
            violations: lock(&self.inner.shared.violations).len(),
        }
    }

    /// Check the machine is back to idle: every live adapter's registers all free, no request
    /// queued, no mapping live, no common buffer allocated; no adapter was dropped in another
    /// state; no misuse seen; the sanitizer record is empty. Buffers may still be alive (see
    /// [`SimPlatform::check_memory_returned`]).
    ///
    /// # Errors
    /// A description of everything that is not back, one item per line.
    pub fn check_clean(&self) -> core::result::Result<(), String> {
        let mut problems = Vec::new();
        for a in self.adapters() {
            a.inner.leftovers(&mut problems);
        }
        if let Some(system) = self.inner.system.get() {
            system.inner.leftovers(&mut problems);
        }
        problems.extend(lock(&self.inner.shared.issues).iter().cloned());
        let stats = self.inner.shared.memory.stats();
        if stats.bad_frees > 0 {
            problems.push(format!(
                "{} frees of frames that were not allocated",
                stats.bad_frees
            ));
        }
        for v in lock(&self.inner.shared.violations).iter() {
            problems.push(format!("sanitizer: {v}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }

    /// Check every buffer's pages went back to the allocator (no [`SimBuffer`] alive or
    /// leaked).
    ///
    /// # Errors
    /// How many pages are still held by buffers.
    pub fn check_memory_returned(&self) -> core::result::Result<(), String> {
        let s = self.inner.shared.memory.stats();
        if s.buffer_pages == 0 {
            Ok(())
        } else {
            Err(format!(
                "{} pages ({} bytes) still held by buffers",
                s.buffer_pages,
                s.buffer_pages as u64 * PAGE_SIZE
            ))
        }
    }

    /// Frame allocator counters.
    pub fn memory_stats(&self) -> MemoryStats {
        self.inner.shared.memory.stats()
    }
}

impl Platform for SimPlatform {
    type Adapter = SimAdapter;

    /// An adapter for `description`. A system-mode description (`system: Some(channel)`) gets
    /// a system adapter of the machine's system DMA controller: direct mapping, the
    /// controller's map-register count, the rest of the next adapter configuration.
    ///
    /// # Errors
    /// [`Error::Unsuccessful`] as the adapter configuration says; for system mode,
    /// [`Error::InvalidParameter`] if the description also claims bus mastering or the
    /// channel/request-line pair is not configured, [`Error::InvalidDeviceRequest`] if the
    /// machine has no system DMA controller or a looped transfer is asked for.
    fn adapter(&self, description: &DeviceDescription) -> Result<SimAdapter> {
        let mut config = {
            let mut a = lock(&self.inner.adapters);
            a.overrides.pop_front().unwrap_or(a.default)
        };
        let system = match &description.system {
            None => None,
            Some(_) if description.bus_master => return Err(Error::InvalidParameter),
            Some(channel) => {
                let controller = self.inner.system.get().ok_or(Error::InvalidDeviceRequest)?;
                let binding = controller.inner.bind(channel)?;
                config.mode = AdapterMode::Direct;
                config.map_registers = controller.inner.map_registers;
                Some(binding)
            }
        };
        // ORDERING: the id only needs to be unique; no other memory is published through it.
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let inner = Arc::new(AdapterInner::new(
            Arc::clone(&self.inner.shared),
            id,
            config,
            description,
            system,
        )?);
        let mut a = lock(&self.inner.adapters);
        a.live.retain(|w| w.strong_count() > 0);
        a.live.push(Arc::downgrade(&inner));
        Ok(SimAdapter { inner })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmatx_hal::Error;

    #[test]
    fn adapter_configs_queue_and_fail() {
        let sim = SimPlatform::new();
        sim.push_adapter_config(AdapterConfig::default().map_registers(3));
        sim.push_adapter_config(AdapterConfig::failing());
        sim.push_adapter_config(AdapterConfig::default().map_registers(1));
        let d = SimPlatform::description(64);
        let a = sim.adapter(&d).unwrap();
        assert_eq!(dmatx_hal::Adapter::map_register_count(&a), 3);
        assert_eq!(sim.adapter(&d).unwrap_err(), Error::Unsuccessful);
        assert_eq!(sim.adapter(&d).unwrap_err(), Error::Unsuccessful);
        let b = sim.adapter(&d).unwrap();
        assert_eq!(dmatx_hal::Adapter::map_register_count(&b), 32);
        assert_eq!(sim.adapters().len(), 2);
        assert_eq!(sim.last_adapter().unwrap().id(), b.id());
        sim.set_adapter_config(AdapterConfig::default().map_registers(5));
        assert_eq!(
            dmatx_hal::Adapter::map_register_count(&sim.adapter(&d).unwrap()),
            5
        );
        sim.check_clean().unwrap();
    }

    #[test]
    fn bad_layout_is_refused() {
        assert_eq!(
            SimConfig::new().memory(0x1001, 4096).build().unwrap_err(),
            Error::InvalidParameter
        );
        let sim = SimConfig::new()
            .memory(0x1_0000_0000, 1 << 20)
            .placement(Placement::Contiguous)
            .build()
            .unwrap();
        let b = sim.allocate_buffer(8192, 0).unwrap();
        assert!(dmatx_hal::MemoryDescriptor::segment(&b, 0).frames[0].get() >= 0x1_0000_0000);
    }

    #[test]
    fn allocation_failure_knob_and_memory_check() {
        let sim = SimPlatform::new();
        sim.fail_next_allocations(2);
        assert_eq!(
            sim.allocate_buffer(10, 0).unwrap_err(),
            Error::InsufficientResources
        );
        assert_eq!(
            sim.allocate_buffer(10, 0).unwrap_err(),
            Error::InsufficientResources
        );
        let b = sim.allocate_buffer(10, 0).unwrap();
        assert!(sim.check_memory_returned().is_err());
        sim.check_clean().unwrap();
        drop(b);
        sim.check_memory_returned().unwrap();
        let too_big = sim
            .allocate_buffer(DEFAULT_MEMORY_BYTES + 1, 0)
            .unwrap_err();
        assert_eq!(too_big, Error::InsufficientResources);
    }
}
