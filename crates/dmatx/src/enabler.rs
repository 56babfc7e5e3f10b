//! The DMA enabler (KMDF's WDFDMAENABLER): a device's DMA profile, its adapters and limits.
//!
//! Spec §1.1 (configuration, version selection, adapter acquisition) and §2.1 (methods).

use crate::device::{DeviceShared, DmaDevice};
use crate::sync::{Arc, AtomicBool, AtomicU32, Mutex, Ordering, Weak};
use alloc::vec::Vec;
use dmatx_hal::{Adapter, DeviceDescription, DmaWidth, Platform, SystemChannel};
use dmatx_types::{Direction, DmaVersion, Error, PAGE_SIZE, Profile, Result};

/// KMDF's `WDF_DMA_ENABLER_UNLIMITED_FRAGMENTS`: the initial maximum SG element count.
pub const UNLIMITED_FRAGMENTS: u32 = u32::MAX;

/// How an enabler is set up (`WDF_DMA_ENABLER_CONFIG`).
///
/// ```
/// use dmatx::{EnablerConfig, Profile, DmaVersion};
/// let config = EnablerConfig::new(Profile::ScatterGather64, 64 * 1024)
///     .with_version(DmaVersion::V3);
/// assert_eq!(config.maximum_length, 64 * 1024);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnablerConfig {
    /// The device's DMA profile.
    pub profile: Profile,
    /// Largest transfer the device takes, in bytes (`MaximumLength`).
    pub maximum_length: u64,
    /// Address width override in bits, 0 for the profile's width (`AddressWidthOverride`).
    pub address_width_override: u8,
    /// DMA version override (`WdmDmaVersionOverride`); `None` keeps the default.
    pub version_override: Option<DmaVersion>,
    /// `WDF_DMA_ENABLER_CONFIG_REQUIRE_SINGLE_TRANSFER`: new transactions default to needing a
    /// single transfer (v3 only).
    pub require_single_transfer: bool,
    /// `WDF_DMA_ENABLER_CONFIG_NO_SGLIST_PREALLOCATION`. Accepted for fidelity and ignored:
    /// dmatx always preallocates SG storage at transaction creation (see `docs/quirks.md`).
    pub no_sg_list_preallocation: bool,
    /// Verifier mode: misuse panics with its diagnostic as well as returning
    /// [`Error::Misuse`]. `None` = on in debug builds (and with the `verifier` feature).
    pub verifier: Option<bool>,
}

impl EnablerConfig {
    /// A configuration for `profile` and `maximum_length` with every other field at its default
    /// (`WDF_DMA_ENABLER_CONFIG_INIT`).
    pub const fn new(profile: Profile, maximum_length: u64) -> Self {
        Self {
            profile,
            maximum_length,
            address_width_override: 0,
            version_override: None,
            require_single_transfer: false,
            no_sg_list_preallocation: false,
            verifier: None,
        }
    }

    /// This configuration with a DMA version override.
    pub const fn with_version(mut self, version: DmaVersion) -> Self {
        self.version_override = Some(version);
        self
    }

    /// This configuration with an address width override.
    pub const fn with_address_width(mut self, bits: u8) -> Self {
        self.address_width_override = bits;
        self
    }

    /// This configuration with verifier mode set explicitly.
    pub const fn with_verifier(mut self, on: bool) -> Self {
        self.verifier = Some(on);
        self
    }

    /// Build a configuration from KMDF's raw fields, with KMDF's checks on them.
    ///
    /// # Errors
    /// [`Error::InfoLengthMismatch`] if `raw.size` is not [`RawEnablerConfig::SIZE`] (statement
    /// 3); [`Error::InvalidParameter`] for an unknown profile (statement 2), version, or flag bit.
    pub fn from_raw(raw: &RawEnablerConfig) -> Result<Self> {
        if raw.size != RawEnablerConfig::SIZE {
            return Err(Error::InfoLengthMismatch);
        }
        let profile = Profile::from_raw(raw.profile)?;
        let version_override = match raw.wdm_dma_version_override {
            0 => None,
            2 => Some(DmaVersion::V2),
            3 => Some(DmaVersion::V3),
            _ => return Err(Error::InvalidParameter),
        };
        if raw.flags
            & !(RawEnablerConfig::NO_SGLIST_PREALLOCATION
                | RawEnablerConfig::REQUIRE_SINGLE_TRANSFER)
            != 0
        {
            return Err(Error::InvalidParameter);
        }
        let address_width_override =
            u8::try_from(raw.address_width_override).map_err(|_| Error::InvalidParameter)?;
        Ok(Self {
            profile,
            maximum_length: raw.maximum_length,
            address_width_override,
            version_override,
            require_single_transfer: raw.flags & RawEnablerConfig::REQUIRE_SINGLE_TRANSFER != 0,
            no_sg_list_preallocation: raw.flags & RawEnablerConfig::NO_SGLIST_PREALLOCATION != 0,
            verifier: None,
        })
    }
}

/// KMDF's `WDF_DMA_ENABLER_CONFIG` as untyped fields, for ports that carry configurations as
/// raw numbers. [`EnablerConfig::from_raw`] validates it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawEnablerConfig {
    /// Must be [`RawEnablerConfig::SIZE`].
    pub size: u32,
    /// `WDF_DMA_PROFILE` value (1..=8).
    pub profile: u32,
    /// `MaximumLength`.
    pub maximum_length: u64,
    /// `AddressWidthOverride`.
    pub address_width_override: u32,
    /// `WdmDmaVersionOverride` (0, 2 or 3).
    pub wdm_dma_version_override: u32,
    /// `Flags`.
    pub flags: u32,
}

impl RawEnablerConfig {
    /// The size KMDF 1.33 expects in `Size` (the x64 `sizeof(WDF_DMA_ENABLER_CONFIG)`).
    pub const SIZE: u32 = 0x50;
    /// `WDF_DMA_ENABLER_CONFIG_NO_SGLIST_PREALLOCATION`.
    pub const NO_SGLIST_PREALLOCATION: u32 = 1;
    /// `WDF_DMA_ENABLER_CONFIG_REQUIRE_SINGLE_TRANSFER`.
    pub const REQUIRE_SINGLE_TRANSFER: u32 = 2;

    /// `WDF_DMA_ENABLER_CONFIG_INIT`: the right size, the profile and length, zeros elsewhere.
    pub const fn new(profile: u32, maximum_length: u64) -> Self {
        Self {
            size: Self::SIZE,
            profile,
            maximum_length,
            address_width_override: 0,
            wdm_dma_version_override: 0,
            flags: 0,
        }
    }
}

/// An enabler's power callbacks (KMDF's `EvtDmaEnablerFill`, `…Flush`, `…Enable`,
/// `…Disable`, `…SelfManagedIoStart`, `…SelfManagedIoStop`), run by
/// [`DmaDevice::power_up`] and [`DmaDevice::power_down`] with no dmatx lock held.
///
/// ```
/// use dmatx::{DmaDevice, Enabler, EnablerCallbacks, EnablerConfig, Profile};
/// use dmatx_sim::SimPlatform;
///
/// fn fill(_: &Enabler<SimPlatform>) -> dmatx::Result<()> { Ok(()) }
/// let device = DmaDevice::new(SimPlatform::new());
/// let enabler = Enabler::create(&device, EnablerConfig::new(Profile::Packet64, 4096))?;
/// enabler.set_power_callbacks(EnablerCallbacks { fill: Some(fill), ..Default::default() });
/// device.power_up()?;
/// device.power_down()?;
/// # Ok::<(), dmatx::Error>(())
/// ```
pub struct EnablerCallbacks<P: Platform> {
    /// Power-up, first: fill the device's DMA state (e.g. descriptor rings).
    pub fill: Option<EnablerCallback<P>>,
    /// Power-up, second: enable the device's DMA.
    pub enable: Option<EnablerCallback<P>>,
    /// Power-up, third: start self-managed DMA I/O.
    pub self_managed_io_start: Option<EnablerCallback<P>>,
    /// Power-down, first (always run): stop self-managed DMA I/O.
    pub self_managed_io_stop: Option<EnablerCallback<P>>,
    /// Power-down, second: disable the device's DMA (skipped if fill failed).
    pub disable: Option<EnablerCallback<P>>,
    /// Power-down, third: flush what fill set up (skipped if fill or enable failed).
    pub flush: Option<EnablerCallback<P>>,
}

/// One enabler power callback.
pub type EnablerCallback<P> = fn(&Enabler<P>) -> Result<()>;

impl<P: Platform> Default for EnablerCallbacks<P> {
    fn default() -> Self {
        Self {
            fill: None,
            enable: None,
            self_managed_io_start: None,
            self_managed_io_stop: None,
            disable: None,
            flush: None,
        }
    }
}

impl<P: Platform> Clone for EnablerCallbacks<P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P: Platform> Copy for EnablerCallbacks<P> {}

/// The power callbacks and what the last power-up did with them.
pub(crate) struct PowerRecord<P: Platform> {
    callbacks: EnablerCallbacks<P>,
    /// The last power-up reached this enabler (ran or tried its fill).
    reached: bool,
    fill_failed: bool,
    enable_failed: bool,
}

impl<P: Platform> PowerRecord<P> {
    /// Forget the previous power cycle (KMDF never does: `docs/quirks.md`).
    pub(crate) fn reset(&mut self) {
        self.reached = false;
        self.fill_failed = false;
        self.enable_failed = false;
    }
}

/// An object an enabler deletes with itself (transactions, common buffers; statement 17).
pub(crate) trait Child: Send + Sync {
    /// First phase of deletion: withdraw any request queued with the platform, so that
    /// resources the other children return in the second phase are not granted to it.
    fn withdraw(&self) {}

    /// Second phase: delete the object because its parent is being deleted.
    fn delete_by_parent(&self);
}

/// The DMA resource a system-mode device was given (the channel and request line of its
/// `CmResourceTypeDma` descriptor, `WDF_DMA_SYSTEM_PROFILE_CONFIG.DmaDescriptor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DmaDescriptor {
    /// The system DMA controller channel.
    pub channel: u32,
    /// The device's request line.
    pub request_line: u32,
}

/// How a system-mode enabler's direction is set up (`WDF_DMA_SYSTEM_PROFILE_CONFIG`).
///
/// ```
/// use dmatx::{DmaDescriptor, SystemProfileConfig};
/// use dmatx::hal::DmaWidth;
/// let config = SystemProfileConfig::new(
///     0x7000_6200,
///     DmaWidth::Bits8,
///     DmaDescriptor { channel: 3, request_line: 0x1000 },
/// );
/// assert!(config.demand_mode);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SystemProfileConfig {
    /// The controller moves data as the device requests it (`DemandMode`).
    pub demand_mode: bool,
    /// Auto-initialize (`LoopedTransfer`).
    pub looped_transfer: bool,
    /// Width of each access to the device (`DmaWidth`).
    pub width: DmaWidth,
    /// Bus address of the device's data register (`DeviceAddress`).
    pub device_address: u64,
    /// The DMA resource (`DmaDescriptor`); `None` is KMDF's NULL descriptor, refused.
    pub descriptor: Option<DmaDescriptor>,
}

impl SystemProfileConfig {
    /// A demand-mode, non-looped configuration (`WDF_DMA_SYSTEM_PROFILE_CONFIG_INIT` and the
    /// fields a driver then sets).
    pub const fn new(device_address: u64, width: DmaWidth, descriptor: DmaDescriptor) -> Self {
        Self {
            demand_mode: true,
            looped_transfer: false,
            width,
            device_address,
            descriptor: Some(descriptor),
        }
    }

    /// Check a raw configuration's size (`WDF_DMA_SYSTEM_PROFILE_CONFIG.Size`) and take the
    /// typed one.
    ///
    /// # Errors
    /// [`Error::InfoLengthMismatch`] if `size` is not [`SystemProfileConfig::RAW_SIZE`].
    pub const fn from_raw(size: u32, config: Self) -> Result<Self> {
        if size == Self::RAW_SIZE {
            Ok(config)
        } else {
            Err(Error::InfoLengthMismatch)
        }
    }

    /// The size KMDF expects in `WDF_DMA_SYSTEM_PROFILE_CONFIG.Size` (x64).
    pub const RAW_SIZE: u32 = 0x20;
}

/// One per-direction adapter record (spec §1.1).
pub(crate) struct AdapterRecord<A> {
    pub(crate) adapter: A,
    /// N: map registers the platform granted.
    pub(crate) map_registers: u32,
    /// min(MaximumLength, (N − 1) × PAGE_SIZE).
    pub(crate) fragment_length: u64,
}

impl<A: Adapter> AdapterRecord<A> {
    /// Ask `platform` for the adapter `description` describes (spec §1.1 "Adapter
    /// acquisition"): N is what it grants, F = min(MaximumLength, (N − 1) × PAGE_SIZE).
    ///
    /// # Errors
    /// [`Error::Unsuccessful`] if the platform refuses or grants fewer than two registers.
    fn acquire<P: Platform<Adapter = A>>(
        platform: &P,
        description: &DeviceDescription,
    ) -> Result<Self> {
        let adapter = platform
            .adapter(description)
            .map_err(|_| Error::Unsuccessful)?;
        let n = adapter.map_register_count();
        if n < 2 {
            return Err(Error::Unsuccessful);
        }
        Ok(Self {
            adapter,
            map_registers: n,
            fragment_length: description.maximum_length.min(u64::from(n - 1) * PAGE_SIZE),
        })
    }
}

pub(crate) struct EnablerShared<P: Platform> {
    pub(crate) device: Arc<DeviceShared<P>>,
    pub(crate) profile: Profile,
    pub(crate) version: DmaVersion,
    pub(crate) address_bits: u8,
    pub(crate) maximum_length: u64,
    pub(crate) require_single_transfer: bool,
    pub(crate) verifier: bool,
    /// Read record (index 0) and, for duplex enablers, the write record (index 1). Set at
    /// creation for bus-master profiles, by `configure_system_profile` for system ones; never
    /// changed once set, so they are read without a lock.
    pub(crate) records: [spin::Once<AdapterRecord<P::Adapter>>; 2],
    max_sg_elements: AtomicU32,
    /// Common-buffer alignment mask (max of device and platform requirements).
    pub(crate) common_buffer_alignment: u64,
    pub(crate) power: Mutex<PowerRecord<P>>,
    /// Serialises `configure_system_profile` (each record is set once).
    configuring: Mutex<()>,
    /// Transactions and common buffers, deleted with the enabler.
    children: Mutex<Vec<Weak<dyn Child>>>,
    deleted: AtomicBool,
}

impl<P: Platform> EnablerShared<P> {
    /// The record serving `direction` (simplex enablers use record 0 for both).
    pub(crate) fn record(&self, direction: Direction) -> Option<&AdapterRecord<P::Adapter>> {
        let index = if self.profile.is_duplex() {
            direction.index()
        } else {
            0
        };
        self.records[index].get()
    }

    /// Add a child to delete with the enabler.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] if the enabler was deleted.
    pub(crate) fn adopt(&self, child: Weak<dyn Child>) -> Result<()> {
        let mut children = self.children.lock();
        if self.is_deleted() {
            return Err(Error::InvalidDeviceState);
        }
        if children.len() == children.capacity() {
            children.retain(|c| c.strong_count() > 0);
        }
        children.push(child);
        Ok(())
    }

    pub(crate) fn is_deleted(&self) -> bool {
        // ORDERING: pairs with the AcqRel swap in `delete`.
        self.deleted.load(Ordering::Acquire)
    }

    /// First phase of deleting the enabler: mark it deleted (nothing new can be created on it)
    /// and have every child withdraw its queued platform requests. Returns the children for
    /// [`EnablerShared::delete_children`]; empty if it was already deleted.
    pub(crate) fn begin_delete(&self) -> Vec<Arc<dyn Child>> {
        // ORDERING: see `is_deleted`.
        if self.deleted.swap(true, Ordering::AcqRel) {
            return Vec::new();
        }
        let children: Vec<_> = core::mem::take(&mut *self.children.lock())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for child in &children {
            child.withdraw();
        }
        children
    }

    /// Second phase: delete the children (returning their resources). No lock is held.
    pub(crate) fn delete_children(&self, children: Vec<Arc<dyn Child>>) {
        for child in &children {
            child.delete_by_parent();
        }
        // Withdrawn requests may have been blocking others (another device's) that fit now.
        for record in self.configured_records() {
            record.adapter.dispatch_queued();
        }
    }

    /// The records that are set.
    pub(crate) fn configured_records(&self) -> impl Iterator<Item = &AdapterRecord<P::Adapter>> {
        self.records.iter().filter_map(spin::Once::get)
    }

    /// Whether every direction the profile needs has its adapter (always, for bus-master
    /// profiles; after `configure_system_profile` for each direction, for system ones).
    pub(crate) fn is_configured(&self) -> bool {
        if self.profile.is_duplex() {
            self.records.iter().all(|r| r.is_completed())
        } else {
            self.records[0].is_completed()
        }
    }

    pub(crate) fn max_sg_elements(&self) -> u32 {
        // ORDERING: an independent setting; KMDF reads it at each Initialize and staging.
        self.max_sg_elements.load(Ordering::Relaxed)
    }
}

/// A DMA enabler: a device's DMA profile, its adapter(s) and limits (KMDF's WDFDMAENABLER).
///
/// Cheap to clone; clones name the same enabler. Transactions and common buffers keep it alive.
///
/// ```
/// use dmatx::{DmaDevice, Enabler, EnablerConfig, Profile, Direction};
/// use dmatx_sim::SimPlatform;
///
/// let sim = SimPlatform::new();
/// let device = DmaDevice::new(sim.clone());
/// let enabler = Enabler::create(&device, EnablerConfig::new(Profile::ScatterGather64, 1 << 20))?;
/// // The fragment length is bounded by the platform's map registers: (N − 1) pages.
/// let n = u64::from(enabler.map_register_count(Direction::ReadFromDevice));
/// assert_eq!(enabler.fragment_length(Direction::ReadFromDevice), (1 << 20).min((n - 1) * 4096));
/// # Ok::<(), dmatx::Error>(())
/// ```
pub struct Enabler<P: Platform> {
    pub(crate) shared: Arc<EnablerShared<P>>,
}

impl<P: Platform> Clone for Enabler<P> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The DMA version KMDF picks by default on this architecture (spec §1.1 rule 1).
const fn default_version() -> DmaVersion {
    if cfg!(any(target_arch = "arm", target_arch = "aarch64")) {
        DmaVersion::V3
    } else {
        DmaVersion::V2
    }
}

impl<P: Platform> Enabler<P> {
    /// Create an enabler for `device` (`WdfDmaEnablerCreate`), selecting the DMA version and
    /// acquiring the bus-master adapter(s) from the platform.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a zero or over-32-bit `maximum_length` (statement 1), an
    /// address width override on a system profile (4), above 32 on a 32-bit profile (5), or
    /// outside 24..=64; a version override below the version the profile needs (6); a
    /// single-transfer requirement without v3 (7). [`Error::Unsuccessful`] if the platform
    /// refuses an adapter or grants fewer than two map registers.
    pub fn create(device: &DmaDevice<P>, config: EnablerConfig) -> Result<Self> {
        if device.is_deleted() {
            return Err(Error::InvalidDeviceState);
        }
        let profile = config.profile;
        if config.maximum_length == 0 || config.maximum_length > u64::from(u32::MAX) {
            return Err(Error::InvalidParameter);
        }
        let mut version = if profile.is_system() {
            DmaVersion::V3
        } else {
            default_version()
        };
        let mut address_bits = profile.address_bits().unwrap_or(32);
        let width = config.address_width_override;
        if width != 0 {
            let narrow_profile = profile.address_bits() == Some(32) && width > 32;
            if profile.is_system() || narrow_profile || !(24..=64).contains(&width) {
                return Err(Error::InvalidParameter);
            }
            version = DmaVersion::V3;
            address_bits = width;
        }
        if let Some(over) = config.version_override {
            if over < version {
                return Err(Error::InvalidParameter);
            }
            version = over;
        }
        if config.require_single_transfer && version != DmaVersion::V3 {
            return Err(Error::InvalidParameter);
        }
        let verifier = config
            .verifier
            .unwrap_or(cfg!(any(debug_assertions, feature = "verifier")));

        let mut records: [Option<AdapterRecord<P::Adapter>>; 2] = [None, None];
        if profile.is_bus_master() {
            let directions: &[Direction] = if profile.is_duplex() {
                &Direction::ALL
            } else {
                &[Direction::ReadFromDevice]
            };
            for &direction in directions {
                let description = DeviceDescription {
                    bus_master: true,
                    scatter_gather: profile.is_scatter_gather(),
                    address_bits,
                    maximum_length: config.maximum_length,
                    version,
                    direction,
                    duplex: profile.is_duplex(),
                    system: None,
                };
                records[direction.index()] = Some(AdapterRecord::acquire(
                    &device.shared().platform,
                    &description,
                )?);
            }
        }
        // KMDF computes the common-buffer alignment only for SG profiles (a quirk); dmatx does
        // it for every profile that has an adapter.
        let common_buffer_alignment = records[0]
            .as_ref()
            .map_or(0, |r| r.adapter.alignment_requirement());
        let records = records.map(|r| r.map_or_else(spin::Once::new, spin::Once::initialized));
        let enabler = Self {
            shared: Arc::new(EnablerShared {
                device: Arc::clone(device.shared()),
                profile,
                version,
                address_bits,
                maximum_length: config.maximum_length,
                require_single_transfer: config.require_single_transfer,
                verifier,
                records,
                max_sg_elements: AtomicU32::new(UNLIMITED_FRAGMENTS),
                common_buffer_alignment,
                power: Mutex::new(PowerRecord {
                    callbacks: EnablerCallbacks::default(),
                    reached: false,
                    fill_failed: false,
                    enable_failed: false,
                }),
                children: Mutex::new(Vec::new()),
                deleted: AtomicBool::new(false),
                configuring: Mutex::new(()),
            }),
        };
        device.shared().adopt(Arc::downgrade(&enabler.shared))?;
        Ok(enabler)
    }

    /// Give a system-mode enabler its controller channel for `direction`
    /// (`WdfDmaEnablerConfigureSystemProfile`, normally from `EvtDevicePrepareHardware`). A
    /// simplex enabler has one channel and ignores `direction`; a duplex one is configured
    /// once per direction. Transactions can be created once every direction is configured.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] on a bus-master enabler, for a `None` descriptor (statement
    /// 14), or when the direction already has its channel (13); [`Error::Unsuccessful`] if the
    /// platform has no such channel or request line, or grants fewer than two map registers;
    /// [`Error::InvalidDeviceState`] after the device was deleted.
    pub fn configure_system_profile(
        &self,
        config: SystemProfileConfig,
        direction: Direction,
    ) -> Result<()> {
        let shared = &self.shared;
        if !shared.profile.is_system() {
            return Err(Error::InvalidParameter);
        }
        let Some(descriptor) = config.descriptor else {
            return Err(Error::InvalidParameter);
        };
        if shared.is_deleted() {
            return Err(Error::InvalidDeviceState);
        }
        let index = if shared.profile.is_duplex() {
            direction.index()
        } else {
            0
        };
        let _configuring = shared.configuring.lock();
        if shared.records[index].is_completed() {
            return Err(Error::InvalidParameter);
        }
        let description = DeviceDescription {
            bus_master: false,
            scatter_gather: true,
            address_bits: shared.address_bits,
            maximum_length: shared.maximum_length,
            version: shared.version,
            direction,
            duplex: shared.profile.is_duplex(),
            system: Some(SystemChannel {
                channel: descriptor.channel,
                request_line: descriptor.request_line,
                demand_mode: config.demand_mode,
                looped_transfer: config.looped_transfer,
                width: config.width,
                device_address: config.device_address,
            }),
        };
        let record = AdapterRecord::acquire(&shared.device.platform, &description)?;
        shared.records[index].call_once(|| record);
        Ok(())
    }

    /// Whether every direction has its adapter: always for bus-master profiles, after
    /// [`Enabler::configure_system_profile`] for system ones.
    pub fn is_configured(&self) -> bool {
        self.shared.is_configured()
    }

    /// Set the enabler's power callbacks (KMDF takes them in `WDF_DMA_ENABLER_CONFIG`; set them
    /// before the device powers up). Replaces any set before.
    pub fn set_power_callbacks(&self, callbacks: EnablerCallbacks<P>) {
        self.shared.power.lock().callbacks = callbacks;
    }

    /// Power-up for this enabler: fill → enable → self-managed-I/O start, stopping at the
    /// first failure (recorded for power-down).
    pub(crate) fn power_up(&self) -> Result<()> {
        let callbacks = {
            let mut record = self.shared.power.lock();
            record.reached = true;
            record.callbacks
        };
        if let Some(fill) = callbacks.fill
            && let Err(e) = fill(self)
        {
            self.shared.power.lock().fill_failed = true;
            return Err(e);
        }
        if let Some(enable) = callbacks.enable
            && let Err(e) = enable(self)
        {
            self.shared.power.lock().enable_failed = true;
            return Err(e);
        }
        match callbacks.self_managed_io_start {
            Some(start) => start(self),
            None => Ok(()),
        }
    }

    /// Power-down for this enabler: self-managed-I/O stop, disable unless fill failed, flush
    /// unless fill or enable failed. Enablers the last power-up did not reach are skipped.
    pub(crate) fn power_down(&self) -> Result<()> {
        let (callbacks, reached, fill_failed, enable_failed) = {
            let record = self.shared.power.lock();
            (
                record.callbacks,
                record.reached,
                record.fill_failed,
                record.enable_failed,
            )
        };
        if !reached {
            return Ok(());
        }
        let mut first = Ok(());
        let mut run = |callback: Option<EnablerCallback<P>>| {
            if let Some(callback) = callback {
                let result = callback(self);
                if first.is_ok() {
                    first = result;
                }
            }
        };
        run(callbacks.self_managed_io_stop);
        if !fill_failed {
            run(callbacks.disable);
        }
        if !fill_failed && !enable_failed {
            run(callbacks.flush);
        }
        first
    }

    /// Whether the enabler was deleted (with its device).
    pub fn is_deleted(&self) -> bool {
        self.shared.is_deleted()
    }

    /// The profile the enabler was created with.
    pub fn profile(&self) -> Profile {
        self.shared.profile
    }

    /// The DMA version selected at creation.
    pub fn version(&self) -> DmaVersion {
        self.shared.version
    }

    /// Device address width in bits the adapters were asked for.
    pub fn address_bits(&self) -> u8 {
        self.shared.address_bits
    }

    /// Whether verifier mode is on for this enabler and its transactions.
    pub fn verifier(&self) -> bool {
        self.shared.verifier
    }

    /// `WdfDmaEnablerGetMaximumLength`: the configured maximum transfer length.
    pub fn maximum_length(&self) -> u64 {
        self.shared.maximum_length
    }

    /// `WdfDmaEnablerGetFragmentLength`: the longest transfer for `direction`,
    /// min(MaximumLength, (N − 1) × PAGE_SIZE); 0 if the direction has no adapter (a system
    /// enabler not yet configured).
    pub fn fragment_length(&self, direction: Direction) -> u64 {
        self.shared
            .record(direction)
            .map_or(0, |r| r.fragment_length)
    }

    /// Map registers (N) the platform granted for `direction`, 0 if it has no adapter.
    pub fn map_register_count(&self, direction: Direction) -> u32 {
        self.shared.record(direction).map_or(0, |r| r.map_registers)
    }

    /// `WdfDmaEnablerWdmGetDmaAdapter`: the adapter serving `direction` (the same one for both
    /// directions of a simplex enabler), or `None` if the direction has no adapter.
    pub fn adapter(&self, direction: Direction) -> Option<&P::Adapter> {
        self.shared.record(direction).map(|r| &r.adapter)
    }

    /// `WdfDmaEnablerGetMaximumScatterGatherElements` ([`UNLIMITED_FRAGMENTS`] until set).
    pub fn max_sg_elements(&self) -> u32 {
        self.shared.max_sg_elements()
    }

    /// `WdfDmaEnablerSetMaximumScatterGatherElements`. Values above 32 bits clamp to
    /// [`UNLIMITED_FRAGMENTS`]. The value is read at each Initialize and each SG staging, so it
    /// affects later work only.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for 0; the previous value is kept (statement 10).
    pub fn set_max_sg_elements(&self, elements: u64) -> Result<()> {
        if elements == 0 {
            return Err(Error::InvalidParameter);
        }
        let value = u32::try_from(elements).unwrap_or(UNLIMITED_FRAGMENTS);
        // ORDERING: an independent setting, read with Relaxed at each use.
        self.shared.max_sg_elements.store(value, Ordering::Relaxed);
        Ok(())
    }

    /// Whether this enabler belongs to `device` (KMDF's `WdfDmaEnablerGetDevice`, as a check).
    pub fn is_on(&self, device: &DmaDevice<P>) -> bool {
        Arc::ptr_eq(&self.shared.device, device.shared())
    }

    /// Whether a v2 packet transaction of this enabler's device holds the device-wide packet
    /// slot right now.
    pub fn packet_slot_taken(&self) -> bool {
        self.shared.device.packet_slot_taken()
    }
}
