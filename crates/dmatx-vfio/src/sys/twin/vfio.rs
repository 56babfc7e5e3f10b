//! The test twin of the VFIO system calls: the same types and signatures as
//! `sys/linux/vfio.rs`, over an in-process fake kernel.
//!
//! A test installs a [`Twin`] (the kernel of the calling thread), declares devices with
//! [`DeviceSpec`], and may make any step fail once ([`Twin::fail`]). Handles (`Container`,
//! `Group`, `Device`, `RegionMap`, `EventFd`) keep a reference to the kernel that made them, so
//! they work and are counted from any thread (the interrupt thread unmasks INTx through its
//! device). Eventfds are real ones: the kernel keeps duplicates of those wired to interrupts and
//! [`Twin::fire`] writes them, as a device's interrupt would. BAR memory is real, page-aligned
//! heap memory, so mapped BARs can be read and written.
//!
//! The fake kernel keeps the rules of the real one that the layer above depends on:
//! `VFIO_SET_IOMMU` needs an attached group and no IOMMU yet; a device opens only in a group
//! attached to a container with an IOMMU; a group cannot be opened twice; unsetting the
//! container fails with `EBUSY` while a device of the group is open or mapped; one interrupt
//! type at a time; INTx is masked when it fires until unmasked. Unlike the real kernel, closing
//! a group does not detach it, so a missing `VFIO_GROUP_UNSET_CONTAINER` shows as a leak.

use std::alloc::Layout;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rustix::event::{EventfdFlags, PollFd, PollFlags};
use rustix::io::Errno;
use vfio_bindings::bindings::vfio::{
    VFIO_API_VERSION, VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET,
    VFIO_GROUP_FLAGS_CONTAINER_SET, VFIO_GROUP_FLAGS_VIABLE, VFIO_IOMMU_INFO_CAPS,
    VFIO_IOMMU_INFO_PGSIZES, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE, VFIO_IRQ_INFO_NORESIZE, VFIO_NOIOMMU_IOMMU,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
    VFIO_TYPE1v2_IOMMU, vfio_device_info, vfio_irq_info, vfio_region_info,
};

/// vfio-pci puts region `i` at device-file offset `i << 40` (`VFIO_PCI_OFFSET_SHIFT`).
const REGION_SHIFT: u32 = 40;
/// The page size of the fake kernel.
const PAGE: u64 = 4096;
/// The noiommu module parameter's path.
const NOIOMMU_PARAM: &str = "/sys/module/vfio/parameters/enable_unsafe_noiommu_mode";
/// sysfs directory of PCI devices.
const PCI_DEVICES: &str = "/sys/bus/pci/devices/";

type Shared = Arc<Mutex<Kernel>>;

thread_local! {
    /// The kernel of this thread's test.
    static CURRENT: RefCell<Option<Shared>> = const { RefCell::new(None) };
}

fn current() -> Option<Shared> {
    CURRENT.with(|c| c.borrow().clone())
}

fn lock(kernel: &Shared) -> MutexGuard<'_, Kernel> {
    kernel.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A step of the fake kernel that a test can make fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Step {
    /// Opening `/dev/vfio/vfio`.
    OpenContainer,
    /// Opening `/dev/vfio/N`.
    OpenGroup,
    /// `VFIO_GROUP_SET_CONTAINER`.
    SetContainer,
    /// `VFIO_SET_IOMMU`.
    SetIommu,
    /// `VFIO_GROUP_GET_DEVICE_FD`.
    DeviceFd,
    /// `VFIO_DEVICE_GET_INFO`.
    DeviceInfo,
    /// `VFIO_DEVICE_GET_REGION_INFO`.
    RegionInfo,
    /// `mmap` of a region.
    Mmap,
    /// `pread` of a region.
    Read,
    /// `pwrite` of a region.
    Write,
    /// `VFIO_DEVICE_SET_IRQS` (wiring eventfds or disabling).
    SetIrqs,
    /// Creating an eventfd.
    Eventfd,
}

/// A region as a device declares it.
#[derive(Clone, Copy, Debug)]
struct RegionSpec {
    size: u64,
    flags: u32,
}

/// A device to declare in the fake kernel; [`DeviceSpec::new`] gives an edu-like device
/// bound to vfio-pci in a viable group, with a 4 KiB mmap-able BAR0, 256 bytes of config space
/// and one INTx and one MSI vector.
#[derive(Clone, Debug)]
pub(crate) struct DeviceSpec {
    address: String,
    driver: Option<String>,
    group: Option<u32>,
    viable: bool,
    noiommu: bool,
    regions: [RegionSpec; VFIO_PCI_NUM_REGIONS as usize],
    irqs: [u32; VFIO_PCI_NUM_IRQS as usize],
    config: Vec<u8>,
    reset: bool,
}

impl DeviceSpec {
    /// A device at `address` in IOMMU group `group`.
    pub(crate) fn new(address: &str, group: u32) -> Self {
        let none = RegionSpec { size: 0, flags: 0 };
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let mut regions = [none; VFIO_PCI_NUM_REGIONS as usize];
        regions[0] = RegionSpec {
            size: PAGE,
            flags: rw | VFIO_REGION_INFO_FLAG_MMAP,
        };
        regions[VFIO_PCI_CONFIG_REGION_INDEX as usize] = RegionSpec {
            size: 256,
            flags: rw,
        };
        let mut config = vec![0u8; 256];
        config[0..4].copy_from_slice(&[0x34, 0x12, 0xe8, 0x11]);
        Self {
            address: address.to_owned(),
            driver: Some("vfio-pci".to_owned()),
            group: Some(group),
            viable: true,
            noiommu: false,
            regions,
            irqs: [1, 1, 0, 1, 1],
            config,
            reset: true,
        }
    }

    /// Bound to `driver` (`None`: to no driver).
    pub(crate) fn driver(mut self, driver: Option<&str>) -> Self {
        self.driver = driver.map(str::to_owned);
        self
    }

    /// Without an IOMMU group.
    pub(crate) fn no_group(mut self) -> Self {
        self.group = None;
        self
    }

    /// In a group that another device bound to a host driver makes not viable.
    pub(crate) fn not_viable(mut self) -> Self {
        self.viable = false;
        self
    }

    /// In a no-IOMMU group (`/dev/vfio/noiommu-N`).
    pub(crate) fn noiommu(mut self) -> Self {
        self.noiommu = true;
        self
    }

    /// Region `index` of `size` bytes with `VFIO_REGION_INFO_FLAG_*` `flags`.
    pub(crate) fn region(mut self, index: u32, size: u64, flags: u32) -> Self {
        if let Some(region) = self.regions.get_mut(index as usize) {
            *region = RegionSpec { size, flags };
        }
        self
    }

    /// INTx, MSI and MSI-X vector counts.
    pub(crate) fn irqs(mut self, intx: u32, msi: u32, msix: u32) -> Self {
        self.irqs[..3].copy_from_slice(&[intx, msi, msix]);
        self
    }

    /// The 16-bit config-space register at `offset` starts as `value`.
    pub(crate) fn config16(mut self, offset: usize, value: u16) -> Self {
        if let Some(bytes) = self.config.get_mut(offset..offset + 2) {
            bytes.copy_from_slice(&value.to_le_bytes());
        }
        self
    }

    /// Without `VFIO_DEVICE_FLAGS_RESET`.
    pub(crate) fn no_reset(mut self) -> Self {
        self.reset = false;
        self
    }
}

/// Zeroed, page-aligned heap memory standing for a BAR; only accessed through raw pointers.
struct Memory {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the memory is a plain heap allocation owned by this value; every access to it is a
// raw-pointer access made under the kernel's lock or through a mapping the kernel counts.
unsafe impl Send for Memory {}

impl Memory {
    fn new(size: u64) -> Option<Self> {
        let bytes = usize::try_from(size.div_ceil(PAGE) * PAGE).ok()?;
        let layout = Layout::from_size_align(bytes, PAGE as usize).ok()?;
        // SAFETY: `layout` has a non-zero size (callers pass size > 0).
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(Self { ptr, layout })
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated in `new` with `layout` and is freed only here; mappings
        // into it keep the kernel (and so this value) alive.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

struct FakeDevice {
    spec: DeviceSpec,
    bars: Vec<Option<Memory>>,
    /// Open device handles.
    open: usize,
    /// Live mappings of its regions.
    mmaps: usize,
    /// The active interrupt index and the kernel's references to its eventfds.
    irq: Option<(u32, Vec<OwnedFd>)>,
    intx_masked: bool,
}

#[derive(Default)]
struct FakeGroup {
    open: bool,
    container: Option<u64>,
}

#[derive(Default)]
struct FakeContainer {
    iommu: Option<u32>,
    groups: usize,
}

/// The fake kernel's state.
struct Kernel {
    vfio: bool,
    noiommu_param: Option<&'static str>,
    iova_ranges: Option<Vec<(u64, u64)>>,
    devices: Vec<FakeDevice>,
    groups: HashMap<u32, FakeGroup>,
    containers: HashMap<u64, FakeContainer>,
    next_container: u64,
    failures: HashMap<Step, Errno>,
    open_fds: usize,
    live_mmaps: usize,
    set_iommu_calls: usize,
    irq_setups: usize,
    unmasks: usize,
    dma: BTreeMap<u64, u64>,
    dma_calls: (usize, usize),
}

impl Kernel {
    fn new() -> Self {
        Self {
            vfio: true,
            noiommu_param: None,
            iova_ranges: Some(vec![(0, 0xfee0_0000 - 1), (0xfef0_0000, (1 << 39) - 1)]),
            devices: Vec::new(),
            groups: HashMap::new(),
            containers: HashMap::new(),
            next_container: 1,
            failures: HashMap::new(),
            open_fds: 0,
            live_mmaps: 0,
            set_iommu_calls: 0,
            irq_setups: 0,
            unmasks: 0,
            dma: BTreeMap::new(),
            dma_calls: (0, 0),
        }
    }

    /// Fail if the test asked `step` to fail.
    fn check(&mut self, step: Step) -> Result<(), Errno> {
        self.failures.remove(&step).map_or(Ok(()), Err)
    }

    fn device(&self, address: &str) -> Option<usize> {
        self.devices.iter().position(|d| d.spec.address == address)
    }

    fn container(&mut self, id: u64) -> Result<&mut FakeContainer, Errno> {
        self.containers.get_mut(&id).ok_or(Errno::BADF)
    }
}

/// A test's fake kernel, installed as the kernel of the calling thread.
#[derive(Clone)]
pub(crate) struct Twin(Shared);

impl Twin {
    /// A fresh kernel with VFIO loaded and no devices, installed for the calling thread.
    pub(crate) fn install() -> Self {
        let kernel = Arc::new(Mutex::new(Kernel::new()));
        CURRENT.with(|c| *c.borrow_mut() = Some(kernel.clone()));
        Self(kernel)
    }

    fn kernel(&self) -> MutexGuard<'_, Kernel> {
        lock(&self.0)
    }

    /// Remove `/dev/vfio` (VFIO modules not loaded).
    pub(crate) fn without_vfio(&self) {
        self.kernel().vfio = false;
    }

    /// The contents of `enable_unsafe_noiommu_mode` (`None`: the parameter does not exist).
    pub(crate) fn noiommu_param(&self, value: Option<&'static str>) {
        self.kernel().noiommu_param = value;
    }

    /// The IOVA ranges the IOMMU reports (`None`: no IOVA-range capability).
    pub(crate) fn iova_ranges(&self, ranges: Option<Vec<(u64, u64)>>) {
        self.kernel().iova_ranges = ranges;
    }

    /// Declare a device.
    pub(crate) fn add(&self, spec: DeviceSpec) {
        let bars = spec.regions[..6]
            .iter()
            .map(|r| (r.size > 0).then(|| Memory::new(r.size)).flatten())
            .collect();
        self.kernel().devices.push(FakeDevice {
            spec,
            bars,
            open: 0,
            mmaps: 0,
            irq: None,
            intx_masked: false,
        });
    }

    /// Make the next attempt of `step` fail with `errno`.
    pub(crate) fn fail(&self, step: Step, errno: Errno) {
        self.kernel().failures.insert(step, errno);
    }

    /// Raise vector `vector` of interrupt index `index` of the device at `address`: signal
    /// its eventfd. Returns whether it was delivered (wired, and for INTx not masked); INTx is
    /// masked until unmasked, as VFIO does.
    pub(crate) fn fire(&self, address: &str, index: u32, vector: u32) -> bool {
        let mut kernel = self.kernel();
        let Some(d) = kernel.device(address) else {
            return false;
        };
        let device = &mut kernel.devices[d];
        let Some((active, fds)) = &device.irq else {
            return false;
        };
        if *active != index {
            return false;
        }
        let Some(fd) = fds.get(vector as usize) else {
            return false;
        };
        if index == VFIO_PCI_INTX_IRQ_INDEX && device.intx_masked {
            return false;
        }
        let delivered = rustix::io::write(fd, &1u64.to_ne_bytes()).is_ok();
        if delivered && index == VFIO_PCI_INTX_IRQ_INDEX {
            device.intx_masked = true;
        }
        delivered
    }

    /// Whether the INTx line of the device at `address` is masked.
    pub(crate) fn intx_masked(&self, address: &str) -> bool {
        let kernel = self.kernel();
        kernel
            .device(address)
            .is_some_and(|d| kernel.devices[d].intx_masked)
    }

    /// The 16-bit config-space register at `offset` of the device at `address`.
    pub(crate) fn config16(&self, address: &str, offset: usize) -> Option<u16> {
        let kernel = self.kernel();
        let d = kernel.device(address)?;
        let bytes = kernel.devices[d].spec.config.get(offset..offset + 2)?;
        Some(u16::from_le_bytes([bytes[0], bytes[1]]))
    }

    /// Read the 32-bit word at `offset` (4-byte aligned, inside the BAR) of BAR `bar` of the
    /// device at `address`, as the device sees it.
    pub(crate) fn bar_read32(&self, address: &str, bar: usize, offset: usize) -> Option<u32> {
        let kernel = self.kernel();
        let d = kernel.device(address)?;
        let memory = kernel.devices[d].bars.get(bar)?.as_ref()?;
        if !offset.is_multiple_of(4) || offset + 4 > memory.layout.size() {
            return None;
        }
        // SAFETY: `offset + 4` is inside the allocation and 4-byte aligned (checked above); the
        // memory is only ever accessed through raw pointers.
        Some(unsafe {
            memory
                .ptr
                .as_ptr()
                .add(offset)
                .cast::<u32>()
                .read_volatile()
        })
    }

    /// Write the 32-bit word at `offset` of BAR `bar` of the device at `address`, as the
    /// device would (a status register changing).
    pub(crate) fn bar_write32(&self, address: &str, bar: usize, offset: usize, value: u32) {
        let kernel = self.kernel();
        let Some(d) = kernel.device(address) else {
            return;
        };
        let Some(Some(memory)) = kernel.devices[d].bars.get(bar) else {
            return;
        };
        if offset.is_multiple_of(4) && offset + 4 <= memory.layout.size() {
            // SAFETY: as in `bar_read32`.
            unsafe {
                memory
                    .ptr
                    .as_ptr()
                    .add(offset)
                    .cast::<u32>()
                    .write_volatile(value);
            }
        }
    }

    /// Open file descriptors: containers, groups, devices and eventfds.
    pub(crate) fn open_fds(&self) -> usize {
        self.kernel().open_fds
    }

    /// Live mappings of device regions.
    pub(crate) fn live_mmaps(&self) -> usize {
        self.kernel().live_mmaps
    }

    /// Groups attached to a container.
    pub(crate) fn attached_groups(&self) -> usize {
        self.kernel()
            .groups
            .values()
            .filter(|g| g.container.is_some())
            .count()
    }

    /// Devices with an interrupt index wired to eventfds.
    pub(crate) fn active_irqs(&self) -> usize {
        self.kernel()
            .devices
            .iter()
            .filter(|d| d.irq.is_some())
            .count()
    }

    /// `VFIO_SET_IOMMU` calls that succeeded.
    pub(crate) fn set_iommu_calls(&self) -> usize {
        self.kernel().set_iommu_calls
    }

    /// `SET_IRQS` calls that wired eventfds.
    pub(crate) fn irq_setups(&self) -> usize {
        self.kernel().irq_setups
    }

    /// INTx unmasks.
    pub(crate) fn unmasks(&self) -> usize {
        self.kernel().unmasks
    }

    /// DMA map and unmap calls that succeeded, and the mappings live now.
    pub(crate) fn dma_calls(&self) -> (usize, usize, usize) {
        let kernel = self.kernel();
        (kernel.dma_calls.0, kernel.dma_calls.1, kernel.dma.len())
    }

    /// Assert that nothing is left open, mapped, attached or wired.
    #[track_caller]
    pub(crate) fn assert_clean(&self) {
        assert_eq!(self.open_fds(), 0, "file descriptors left open");
        assert_eq!(self.live_mmaps(), 0, "region mappings left");
        assert_eq!(self.attached_groups(), 0, "groups left attached");
        assert_eq!(self.active_irqs(), 0, "interrupts left wired");
    }
}

// ----- sysfs ---------------------------------------------------------------------------------

/// `(address, attribute)` of a path under `/sys/bus/pci/devices/`.
fn pci_path(path: &Path) -> Option<(&str, Option<&str>)> {
    let rest = path.to_str()?.strip_prefix(PCI_DEVICES)?;
    Some(match rest.split_once('/') {
        Some((address, attribute)) => (address, Some(attribute)),
        None => (rest, None),
    })
}

/// Whether `path` exists (a sysfs directory or file).
pub(crate) fn sysfs_exists(path: &Path) -> bool {
    let Some(kernel) = current() else {
        return false;
    };
    let kernel = lock(&kernel);
    match pci_path(path) {
        Some((address, None)) => kernel.device(address).is_some(),
        _ => false,
    }
}

/// The target of the symbolic link at `path` (a device's `driver` or `iommu_group`).
pub(crate) fn sysfs_read_link(path: &Path) -> Result<PathBuf, Errno> {
    let kernel = current().ok_or(Errno::NOENT)?;
    let kernel = lock(&kernel);
    let (address, attribute) = pci_path(path).ok_or(Errno::NOENT)?;
    let device = &kernel.devices[kernel.device(address).ok_or(Errno::NOENT)?].spec;
    match attribute {
        Some("driver") => {
            let driver = device.driver.as_ref().ok_or(Errno::NOENT)?;
            Ok(PathBuf::from(format!("../../../bus/pci/drivers/{driver}")))
        }
        Some("iommu_group") => {
            let group = device.group.ok_or(Errno::NOENT)?;
            Ok(PathBuf::from(format!(
                "../../../kernel/iommu_groups/{group}"
            )))
        }
        _ => Err(Errno::NOENT),
    }
}

/// The contents of the text file at `path` (a module parameter).
pub(crate) fn sysfs_read(path: &Path) -> Result<String, Errno> {
    let kernel = current().ok_or(Errno::NOENT)?;
    let kernel = lock(&kernel);
    match (path.to_str(), kernel.noiommu_param) {
        (Some(NOIOMMU_PARAM), Some(value)) if kernel.vfio => Ok(format!("{value}\n")),
        _ => Err(Errno::NOENT),
    }
}

// ----- container -----------------------------------------------------------------------------

/// An open fake container.
pub(crate) struct Container {
    kernel: Shared,
    id: u64,
}

impl fmt::Debug for Container {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Container({})", self.id)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        lock(&self.kernel).open_fds -= 1;
    }
}

/// Open the container device at `path`.
pub(crate) fn container_open(path: &Path) -> Result<Container, Errno> {
    let shared = current().ok_or(Errno::NOENT)?;
    let mut kernel = lock(&shared);
    if !kernel.vfio || path != Path::new("/dev/vfio/vfio") {
        return Err(Errno::NOENT);
    }
    kernel.check(Step::OpenContainer)?;
    let id = kernel.next_container;
    kernel.next_container += 1;
    kernel.containers.insert(id, FakeContainer::default());
    kernel.open_fds += 1;
    drop(kernel);
    Ok(Container { kernel: shared, id })
}

/// `VFIO_GET_API_VERSION`.
pub(crate) fn container_api_version(_container: &Container) -> Result<i32, Errno> {
    Ok(VFIO_API_VERSION as i32)
}

/// `VFIO_CHECK_EXTENSION`: whether the container supports `extension` (an IOMMU type).
pub(crate) fn container_check_extension(
    container: &Container,
    extension: u32,
) -> Result<bool, Errno> {
    let kernel = lock(&container.kernel);
    Ok(if extension == VFIO_TYPE1v2_IOMMU {
        true
    } else if extension == VFIO_NOIOMMU_IOMMU {
        kernel.noiommu_param.is_some()
    } else {
        false
    })
}

/// `VFIO_SET_IOMMU`: give the container an IOMMU driver of type `iommu_type`.
pub(crate) fn container_set_iommu(container: &Container, iommu_type: u32) -> Result<(), Errno> {
    let mut kernel = lock(&container.kernel);
    kernel.check(Step::SetIommu)?;
    let fake = kernel.container(container.id)?;
    if fake.groups == 0 || fake.iommu.is_some() {
        return Err(Errno::INVAL);
    }
    fake.iommu = Some(iommu_type);
    kernel.set_iommu_calls += 1;
    Ok(())
}

fn push_u32(bytes: &mut Vec<u8>, value: u32) {
    bytes.extend_from_slice(&value.to_ne_bytes());
}

fn push_u64(bytes: &mut Vec<u8>, value: u64) {
    bytes.extend_from_slice(&value.to_ne_bytes());
}

/// `VFIO_IOMMU_GET_INFO`: the whole `vfio_iommu_type1_info` structure with its capability
/// chain, as bytes.
pub(crate) fn container_iommu_info(container: &Container) -> Result<Vec<u8>, Errno> {
    let mut kernel = lock(&container.kernel);
    if kernel.container(container.id)?.iommu != Some(VFIO_TYPE1v2_IOMMU) {
        return Err(Errno::INVAL);
    }
    let ranges = kernel.iova_ranges.as_deref();
    let caps = ranges.map_or(0, |r| 16 + 16 * r.len());
    let mut bytes = Vec::new();
    push_u32(
        &mut bytes,
        u32::try_from(24 + caps).map_err(|_| Errno::INVAL)?,
    );
    let flags = VFIO_IOMMU_INFO_PGSIZES | if caps > 0 { VFIO_IOMMU_INFO_CAPS } else { 0 };
    push_u32(&mut bytes, flags);
    push_u64(&mut bytes, 0x4020_1000);
    push_u32(&mut bytes, if caps > 0 { 24 } else { 0 });
    push_u32(&mut bytes, 0);
    if let Some(ranges) = ranges {
        // The capability header: id (u16), version (u16), next (u32, 0 ends the chain).
        let id = VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE;
        push_u32(&mut bytes, id | (1 << 16));
        push_u32(&mut bytes, 0);
        push_u32(
            &mut bytes,
            u32::try_from(ranges.len()).map_err(|_| Errno::INVAL)?,
        );
        push_u32(&mut bytes, 0);
        for &(start, end) in ranges {
            push_u64(&mut bytes, start);
            push_u64(&mut bytes, end);
        }
    }
    Ok(bytes)
}

/// `VFIO_IOMMU_MAP_DMA`: record that the device may reach `size` bytes at `vaddr` at `iova`.
///
/// # Safety
/// As the real call's: the memory stays mapped and unreferenced until unmapped. The twin never
/// touches it.
pub(crate) unsafe fn container_dma_map(
    container: &Container,
    iova: u64,
    _vaddr: usize,
    size: u64,
) -> Result<(), Errno> {
    let mut kernel = lock(&container.kernel);
    if kernel.container(container.id)?.iommu != Some(VFIO_TYPE1v2_IOMMU) || size == 0 {
        return Err(Errno::INVAL);
    }
    let end = iova.checked_add(size).ok_or(Errno::INVAL)?;
    let overlaps = kernel
        .dma
        .range(..end)
        .next_back()
        .is_some_and(|(&start, &len)| start + len > iova);
    if overlaps {
        return Err(Errno::EXIST);
    }
    kernel.dma.insert(iova, size);
    kernel.dma_calls.0 += 1;
    Ok(())
}

/// `VFIO_IOMMU_UNMAP_DMA` of `size` bytes at `iova`; returns the bytes unmapped (those of the
/// mappings wholly inside the range).
pub(crate) fn container_dma_unmap(
    container: &Container,
    iova: u64,
    size: u64,
) -> Result<u64, Errno> {
    let mut kernel = lock(&container.kernel);
    if kernel.container(container.id)?.iommu != Some(VFIO_TYPE1v2_IOMMU) {
        return Err(Errno::INVAL);
    }
    let end = iova.checked_add(size).ok_or(Errno::INVAL)?;
    let inside: Vec<(u64, u64)> = kernel
        .dma
        .range(iova..end)
        .filter(|&(&start, &len)| start + len <= end)
        .map(|(&start, &len)| (start, len))
        .collect();
    for (start, _) in &inside {
        kernel.dma.remove(start);
    }
    kernel.dma_calls.1 += 1;
    Ok(inside.iter().map(|&(_, len)| len).sum())
}

// ----- group ---------------------------------------------------------------------------------

/// An open fake group.
pub(crate) struct Group {
    kernel: Shared,
    number: u32,
}

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Group({})", self.number)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let mut kernel = lock(&self.kernel);
        kernel.open_fds -= 1;
        if let Some(group) = kernel.groups.get_mut(&self.number) {
            group.open = false;
        }
    }
}

/// Open the group device at `path`.
pub(crate) fn group_open(path: &Path) -> Result<Group, Errno> {
    let shared = current().ok_or(Errno::NOENT)?;
    let mut kernel = lock(&shared);
    let name = path
        .to_str()
        .and_then(|p| p.strip_prefix("/dev/vfio/"))
        .ok_or(Errno::NOENT)?;
    let (noiommu, number) = match name.strip_prefix("noiommu-") {
        Some(number) => (true, number),
        None => (false, name),
    };
    let number: u32 = number.parse().map_err(|_| Errno::NOENT)?;
    let exists = kernel
        .devices
        .iter()
        .any(|d| d.spec.group == Some(number) && d.spec.noiommu == noiommu);
    if !kernel.vfio || !exists {
        return Err(Errno::NOENT);
    }
    kernel.check(Step::OpenGroup)?;
    let group = kernel.groups.entry(number).or_default();
    if group.open {
        return Err(Errno::BUSY);
    }
    group.open = true;
    kernel.open_fds += 1;
    drop(kernel);
    Ok(Group {
        kernel: shared,
        number,
    })
}

/// `VFIO_GROUP_GET_STATUS`: the group's flags.
pub(crate) fn group_status(group: &Group) -> Result<u32, Errno> {
    let kernel = lock(&group.kernel);
    let viable = kernel
        .devices
        .iter()
        .filter(|d| d.spec.group == Some(group.number))
        .all(|d| d.spec.viable);
    let attached = kernel
        .groups
        .get(&group.number)
        .is_some_and(|g| g.container.is_some());
    Ok(if viable { VFIO_GROUP_FLAGS_VIABLE } else { 0 }
        | if attached {
            VFIO_GROUP_FLAGS_CONTAINER_SET
        } else {
            0
        })
}

/// `VFIO_GROUP_SET_CONTAINER`: attach the group to `container`.
pub(crate) fn group_set_container(group: &Group, container: &Container) -> Result<(), Errno> {
    let mut kernel = lock(&group.kernel);
    kernel.check(Step::SetContainer)?;
    let fake = kernel.groups.entry(group.number).or_default();
    if fake.container.is_some() {
        return Err(Errno::INVAL);
    }
    fake.container = Some(container.id);
    kernel.container(container.id)?.groups += 1;
    Ok(())
}

/// `VFIO_GROUP_UNSET_CONTAINER`: detach the group (`EBUSY` while a device of it is open or
/// mapped).
pub(crate) fn group_unset_container(group: &Group) -> Result<(), Errno> {
    let mut kernel = lock(&group.kernel);
    let busy = kernel
        .devices
        .iter()
        .any(|d| d.spec.group == Some(group.number) && (d.open > 0 || d.mmaps > 0));
    if busy {
        return Err(Errno::BUSY);
    }
    let id = kernel
        .groups
        .get_mut(&group.number)
        .and_then(|g| g.container.take())
        .ok_or(Errno::INVAL)?;
    let container = kernel.container(id)?;
    container.groups -= 1;
    if container.groups == 0 {
        // The last group gone, the kernel releases the IOMMU driver and its mappings.
        container.iommu = None;
        kernel.dma.clear();
    }
    Ok(())
}

/// `VFIO_GROUP_GET_DEVICE_FD`: open the device at PCI address `address` in the group.
pub(crate) fn group_device(group: &Group, address: &str) -> Result<Device, Errno> {
    let mut kernel = lock(&group.kernel);
    kernel.check(Step::DeviceFd)?;
    let id = kernel
        .groups
        .get(&group.number)
        .and_then(|g| g.container)
        .ok_or(Errno::INVAL)?;
    if kernel.container(id)?.iommu.is_none() {
        return Err(Errno::INVAL);
    }
    let d = kernel.device(address).ok_or(Errno::NODEV)?;
    if kernel.devices[d].spec.group != Some(group.number) {
        return Err(Errno::NODEV);
    }
    kernel.devices[d].open += 1;
    kernel.open_fds += 1;
    Ok(Device {
        kernel: group.kernel.clone(),
        index: d,
    })
}

// ----- device --------------------------------------------------------------------------------

/// An open fake device.
pub(crate) struct Device {
    kernel: Shared,
    index: usize,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Device({})", self.index)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let mut kernel = lock(&self.kernel);
        kernel.open_fds -= 1;
        let device = &mut kernel.devices[self.index];
        device.open -= 1;
        if device.open == 0 {
            // Closing the last handle tears the interrupts down, as vfio-pci does.
            device.irq = None;
        }
    }
}

impl Device {
    fn with<T>(&self, f: impl FnOnce(&mut Kernel, usize) -> Result<T, Errno>) -> Result<T, Errno> {
        f(&mut lock(&self.kernel), self.index)
    }
}

/// `VFIO_DEVICE_GET_INFO`.
pub(crate) fn device_info(device: &Device) -> Result<vfio_device_info, Errno> {
    device.with(|kernel, d| {
        kernel.check(Step::DeviceInfo)?;
        let reset = if kernel.devices[d].spec.reset {
            VFIO_DEVICE_FLAGS_RESET
        } else {
            0
        };
        Ok(vfio_device_info {
            argsz: 24,
            flags: VFIO_DEVICE_FLAGS_PCI | reset,
            num_regions: VFIO_PCI_NUM_REGIONS,
            num_irqs: VFIO_PCI_NUM_IRQS,
            ..Default::default()
        })
    })
}

/// `VFIO_DEVICE_GET_REGION_INFO` of region `index`.
pub(crate) fn device_region_info(device: &Device, index: u32) -> Result<vfio_region_info, Errno> {
    device.with(|kernel, d| {
        kernel.check(Step::RegionInfo)?;
        let region = kernel.devices[d]
            .spec
            .regions
            .get(index as usize)
            .ok_or(Errno::INVAL)?;
        Ok(vfio_region_info {
            argsz: 32,
            flags: region.flags,
            index,
            cap_offset: 0,
            size: region.size,
            offset: u64::from(index) << REGION_SHIFT,
        })
    })
}

/// `VFIO_DEVICE_GET_IRQ_INFO` of interrupt index `index`.
pub(crate) fn device_irq_info(device: &Device, index: u32) -> Result<vfio_irq_info, Errno> {
    device.with(|kernel, d| {
        let count = *kernel.devices[d]
            .spec
            .irqs
            .get(index as usize)
            .ok_or(Errno::INVAL)?;
        let flags = if index == VFIO_PCI_INTX_IRQ_INDEX {
            VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED
        } else {
            VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE
        };
        Ok(vfio_irq_info {
            argsz: 16,
            flags,
            index,
            count,
        })
    })
}

/// `VFIO_DEVICE_SET_IRQS` `DATA_EVENTFD | ACTION_TRIGGER`: vector `i` of interrupt index `index`
/// signals `fds[i]`.
pub(crate) fn device_set_irq_eventfds(
    device: &Device,
    index: u32,
    fds: &[&EventFd],
) -> Result<(), Errno> {
    device.with(|kernel, d| {
        kernel.check(Step::SetIrqs)?;
        let fake = &mut kernel.devices[d];
        let count = *fake.spec.irqs.get(index as usize).ok_or(Errno::INVAL)?;
        if fds.is_empty() || fds.len() > count as usize || index > 2 {
            return Err(Errno::INVAL);
        }
        if fake
            .irq
            .as_ref()
            .is_some_and(|(active, _)| *active != index)
        {
            return Err(Errno::INVAL);
        }
        let kept = fds
            .iter()
            .map(|fd| rustix::io::fcntl_dupfd_cloexec(&fd.fd, 0))
            .collect::<Result<Vec<_>, _>>()?;
        fake.irq = Some((index, kept));
        fake.intx_masked = false;
        kernel.irq_setups += 1;
        Ok(())
    })
}

/// `VFIO_DEVICE_SET_IRQS` `DATA_NONE | ACTION_TRIGGER` with count 0: turn interrupt index
/// `index` off and release its eventfds.
pub(crate) fn device_disable_irqs(device: &Device, index: u32) -> Result<(), Errno> {
    device.with(|kernel, d| {
        kernel.check(Step::SetIrqs)?;
        let fake = &mut kernel.devices[d];
        if fake.irq.as_ref().is_none_or(|(active, _)| *active != index) {
            return Err(Errno::INVAL);
        }
        fake.irq = None;
        fake.intx_masked = false;
        Ok(())
    })
}

/// `VFIO_DEVICE_SET_IRQS` `DATA_NONE | ACTION_UNMASK` of vector `vector` of index `index`.
pub(crate) fn device_unmask_irq(device: &Device, index: u32, vector: u32) -> Result<(), Errno> {
    device.with(|kernel, d| {
        let fake = &mut kernel.devices[d];
        let active = fake
            .irq
            .as_ref()
            .is_some_and(|(active, _)| *active == index);
        if !active || index != VFIO_PCI_INTX_IRQ_INDEX || vector != 0 {
            return Err(Errno::INVAL);
        }
        fake.intx_masked = false;
        kernel.unmasks += 1;
        Ok(())
    })
}

/// `VFIO_DEVICE_RESET`.
pub(crate) fn device_reset(device: &Device) -> Result<(), Errno> {
    device.with(|kernel, d| {
        if kernel.devices[d].spec.reset {
            Ok(())
        } else {
            Err(Errno::INVAL)
        }
    })
}

/// The region index and the offset inside it of a device-file offset.
fn split_offset(offset: u64) -> (usize, u64) {
    let index = usize::try_from(offset >> REGION_SHIFT).unwrap_or(usize::MAX);
    (index, offset & ((1 << REGION_SHIFT) - 1))
}

/// Copy between region memory and `buffer` (`read`: from the region); returns bytes copied.
fn region_copy(
    kernel: &mut Kernel,
    d: usize,
    offset: u64,
    buffer: *mut u8,
    len: usize,
    read: bool,
) -> Result<usize, Errno> {
    let (index, within) = split_offset(offset);
    let fake = &mut kernel.devices[d];
    let region = fake.spec.regions.get(index).ok_or(Errno::INVAL)?;
    let needed = if read {
        VFIO_REGION_INFO_FLAG_READ
    } else {
        VFIO_REGION_INFO_FLAG_WRITE
    };
    if region.flags & needed == 0 || within >= region.size {
        return Err(Errno::INVAL);
    }
    let within = usize::try_from(within).map_err(|_| Errno::INVAL)?;
    let mut size = usize::try_from(region.size).map_err(|_| Errno::INVAL)?;
    let config = index == VFIO_PCI_CONFIG_REGION_INDEX as usize;
    if config {
        size = size.min(fake.spec.config.len());
    }
    let n = len.min(size.saturating_sub(within));
    let base = if config {
        fake.spec.config.as_mut_ptr()
    } else {
        let memory = fake.bars.get(index).and_then(Option::as_ref);
        memory.ok_or(Errno::INVAL)?.ptr.as_ptr()
    };
    // SAFETY: `within + n <= size`, and the config bytes or the BAR allocation hold at least
    // `size` bytes; `buffer` holds `len >= n` bytes (the caller's slice); the two do not
    // overlap (the caller's slice is not region memory).
    unsafe {
        let region = base.add(within);
        if read {
            std::ptr::copy_nonoverlapping(region, buffer, n);
        } else {
            std::ptr::copy_nonoverlapping(buffer, region, n);
        }
    }
    Ok(n)
}

/// `pread` at `offset` of the device file.
pub(crate) fn device_pread(device: &Device, offset: u64, out: &mut [u8]) -> Result<usize, Errno> {
    device.with(|kernel, d| {
        kernel.check(Step::Read)?;
        region_copy(kernel, d, offset, out.as_mut_ptr(), out.len(), true)
    })
}

/// `pwrite` at `offset` of the device file.
pub(crate) fn device_pwrite(device: &Device, offset: u64, data: &[u8]) -> Result<usize, Errno> {
    device.with(|kernel, d| {
        kernel.check(Step::Write)?;
        // The pointer is only read from (`read` is false).
        region_copy(
            kernel,
            d,
            offset,
            data.as_ptr().cast_mut(),
            data.len(),
            false,
        )
    })
}

/// A mapping of part of a fake BAR.
pub(crate) struct RegionMap {
    kernel: Shared,
    device: usize,
    ptr: NonNull<u8>,
    len: usize,
}

impl fmt::Debug for RegionMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RegionMap({:p}, {:#x})", self.ptr, self.len)
    }
}

// SAFETY: the mapping points into BAR memory that the kernel keeps alive while this value
// holds it; accesses are volatile raw-pointer accesses, as to a real mapping.
unsafe impl Send for RegionMap {}
// SAFETY: as above.
unsafe impl Sync for RegionMap {}

impl RegionMap {
    /// The first byte of the mapping (page-aligned).
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Bytes mapped.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for RegionMap {
    fn drop(&mut self) {
        let mut kernel = lock(&self.kernel);
        kernel.live_mmaps -= 1;
        kernel.devices[self.device].mmaps -= 1;
    }
}

/// `mmap` `len` bytes of the device file at `offset`.
pub(crate) fn device_mmap(device: &Device, offset: u64, len: usize) -> Result<RegionMap, Errno> {
    device.with(|kernel, d| {
        kernel.check(Step::Mmap)?;
        let (index, within) = split_offset(offset);
        let fake = &mut kernel.devices[d];
        let region = fake.spec.regions.get(index).ok_or(Errno::INVAL)?;
        let limit = region.size.div_ceil(PAGE) * PAGE;
        let end = within.checked_add(len as u64).ok_or(Errno::INVAL)?;
        if region.flags & VFIO_REGION_INFO_FLAG_MMAP == 0
            || len == 0
            || !within.is_multiple_of(PAGE)
            || end > limit
        {
            return Err(Errno::INVAL);
        }
        let memory = fake.bars.get(index).and_then(Option::as_ref);
        let base = memory.ok_or(Errno::INVAL)?.ptr;
        let within = usize::try_from(within).map_err(|_| Errno::INVAL)?;
        // SAFETY: `within + len <= limit`, the allocation's size, so the result stays inside it.
        let ptr = unsafe { base.add(within) };
        fake.mmaps += 1;
        kernel.live_mmaps += 1;
        Ok(RegionMap {
            kernel: device.kernel.clone(),
            device: d,
            ptr,
            len,
        })
    })
}

// ----- eventfds ------------------------------------------------------------------------------

/// A real, non-blocking eventfd, counted by the kernel of the thread that made it.
pub(crate) struct EventFd {
    fd: OwnedFd,
    kernel: Option<Shared>,
}

impl fmt::Debug for EventFd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventFd({:?})", self.fd)
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        if let Some(kernel) = &self.kernel {
            lock(kernel).open_fds -= 1;
        }
    }
}

/// A new eventfd (counter 0, non-blocking, close-on-exec).
pub(crate) fn eventfd_new() -> Result<EventFd, Errno> {
    let kernel = current();
    if let Some(kernel) = &kernel {
        lock(kernel).check(Step::Eventfd)?;
    }
    let fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
    if let Some(kernel) = &kernel {
        lock(kernel).open_fds += 1;
    }
    Ok(EventFd { fd, kernel })
}

/// Add 1 to the eventfd's counter.
pub(crate) fn eventfd_signal(fd: &EventFd) -> Result<(), Errno> {
    rustix::io::write(&fd.fd, &1u64.to_ne_bytes()).map(drop)
}

/// Read and clear the eventfd's counter (0 if nothing was signalled).
pub(crate) fn eventfd_take(fd: &EventFd) -> Result<u64, Errno> {
    let mut counter = [0u8; 8];
    match rustix::io::read(&fd.fd, &mut counter) {
        Ok(8) => Ok(u64::from_ne_bytes(counter)),
        Ok(_) => Err(Errno::IO),
        Err(Errno::AGAIN) => Ok(0),
        Err(e) => Err(e),
    }
}

/// Block until at least one of `fds` is readable; `ready[i]` says whether `fds[i]` is.
pub(crate) fn eventfd_wait(fds: &[&EventFd], ready: &mut [bool]) -> Result<(), Errno> {
    let mut polls: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(&fd.fd, PollFlags::IN))
        .collect();
    loop {
        match rustix::event::poll(&mut polls, None) {
            Ok(_) => break,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
    for (slot, poll) in ready.iter_mut().zip(&polls) {
        *slot = !poll.revents().is_empty();
    }
    Ok(())
}
