//! A PCI device opened through VFIO (`Documentation/driver-api/vfio.rst`; the vfio-pci region
//! and interrupt indexes of `include/uapi/linux/vfio.h`): finding it in sysfs, opening it
//! through its IOMMU group, its regions, config space, BAR mappings, interrupts and reset.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustix::io::Errno;
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE, VFIO_PCI_BAR5_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE, vfio_region_info,
};

use crate::bar::Bar;
use crate::container::{GroupRef, VfioContainer};
use crate::error::{ErrorKind, VfioError, VfioResult};
use crate::irq::{Interrupts, IrqHandler, IrqInfo, IrqKind};
use crate::sys;

/// sysfs directory of PCI devices.
const PCI_DEVICES: &str = "/sys/bus/pci/devices";
/// The PCI command register, and its memory-space and bus-master bits.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

/// One region of a device as `VFIO_DEVICE_GET_REGION_INFO` describes it (vfio-pci: BARs 0–5,
/// ROM 6, config space 7, VGA 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// The region index.
    pub index: u32,
    /// Offset of the region in the device file (for `pread`, `pwrite` and `mmap`).
    pub offset: u64,
    /// Size in bytes (0: the region is not implemented).
    pub size: u64,
    /// The region can be read.
    pub readable: bool,
    /// The region can be written.
    pub writable: bool,
    /// The region can be mapped into the process.
    pub mmap: bool,
}

impl From<vfio_region_info> for RegionInfo {
    fn from(info: vfio_region_info) -> Self {
        Self {
            index: info.index,
            offset: info.offset,
            size: info.size,
            readable: info.flags & VFIO_REGION_INFO_FLAG_READ != 0,
            writable: info.flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            mmap: info.flags & VFIO_REGION_INFO_FLAG_MMAP != 0,
        }
    }
}

/// What an open device's BAR mappings and interrupts keep alive: the device file, and through
/// it the group's attachment to the container. Dropped last, it closes the device and then
/// releases the group.
pub(crate) struct DeviceInner {
    // Field order matters: the device closes before the group reference goes, because the
    // kernel refuses to detach a group while one of its devices is open.
    pub(crate) fd: sys::Device,
    pub(crate) address: String,
    _group: GroupRef,
}

/// A PCI device opened through VFIO. BAR mappings ([`Bar`]) and interrupts ([`Interrupts`])
/// keep the device open on their own, so they may outlive this value.
///
/// # Examples
/// ```no_run
/// use std::sync::Arc;
///
/// use dmatx_hal::RegisterWindow;
/// use dmatx_vfio::{IommuMode, IrqKind, VfioContainer, VfioDevice};
///
/// # fn main() -> Result<(), dmatx_vfio::VfioError> {
/// let container = VfioContainer::open(IommuMode::Iommu)?;
/// let device = VfioDevice::open(&container, "0000:00:03.0")?;
/// let registers = device.map_bar(0, None)?;
/// assert_eq!(registers.read32(0x00), 0x0100_00ed); // QEMU edu's identification register
/// device.enable_bus_master()?;
/// let interrupts = device.enable_interrupts(
///     IrqKind::Msi,
///     1,
///     Arc::new(|vector| println!("vector {vector} fired")),
/// )?;
/// interrupts.disable()?;
/// # Ok(())
/// # }
/// ```
pub struct VfioDevice {
    inner: Arc<DeviceInner>,
    flags: u32,
    config: RegionInfo,
}

impl fmt::Debug for VfioDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioDevice")
            .field("address", &self.inner.address)
            .finish_non_exhaustive()
    }
}

/// Whether `address` has the form `dddd:bb:dd.f` (hexadecimal domain, bus, device, function).
fn is_pci_address(address: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let mut parts = address.split([':', '.']);
    let shape = [4, 2, 2, 1];
    shape
        .iter()
        .all(|&n| parts.next().is_some_and(|part| hex(part, n)))
        && parts.next().is_none()
        && address.as_bytes().get(4) == Some(&b':')
        && address.as_bytes().get(7) == Some(&b':')
}

/// The last component of a sysfs link target (a driver name or a group number).
fn link_name(path: &Path) -> Option<&str> {
    path.file_name()?.to_str()
}

impl VfioDevice {
    /// Open the PCI device at `address` (like `0000:00:03.0`) in `container`.
    ///
    /// The device must exist, be bound to vfio-pci and have an IOMMU group (a no-IOMMU group in
    /// an [`IommuMode::NoIommu`](crate::IommuMode::NoIommu) container) whose devices are all
    /// bound to vfio-pci. The first device of a group attaches the group to the container; the
    /// container's first group sets its IOMMU.
    ///
    /// # Errors
    /// Each names the device and says what to do:
    /// [`ErrorKind::InvalidArgument`] (not a PCI address), [`ErrorKind::NoDevice`],
    /// [`ErrorKind::NotBound`], [`ErrorKind::NoIommuGroup`], [`ErrorKind::GroupNotViable`],
    /// [`ErrorKind::DeviceOpen`] (group or device busy, no permission, attach failed),
    /// [`ErrorKind::Unsupported`] (IOMMU refused, not a PCI device), [`ErrorKind::Region`]
    /// (no usable config space). Nothing stays open or attached after an error.
    pub fn open(container: &Arc<VfioContainer>, address: &str) -> VfioResult<Self> {
        let error = |kind, message: String| VfioError::new(kind, address, message);
        if !is_pci_address(address) {
            return Err(error(
                ErrorKind::InvalidArgument,
                "not a PCI address (expected domain:bus:device.function, like 0000:00:03.0)".into(),
            ));
        }
        let dir = format!("{PCI_DEVICES}/{address}");
        if !sys::sysfs_exists(Path::new(&dir)) {
            return Err(error(
                ErrorKind::NoDevice,
                format!("no such PCI device ({dir} does not exist)"),
            ));
        }
        let bind = format!(
            "echo vfio-pci > {dir}/driver_override; echo {address} > /sys/bus/pci/drivers_probe"
        );
        match sys::sysfs_read_link(Path::new(&format!("{dir}/driver"))) {
            Ok(target) if link_name(&target) == Some("vfio-pci") => {}
            Ok(target) => {
                let driver = link_name(&target).unwrap_or("an unknown driver");
                return Err(error(
                    ErrorKind::NotBound,
                    format!(
                        "bound to {driver}, not vfio-pci; rebind it: echo {address} > \
                         {dir}/driver/unbind; {bind}"
                    ),
                ));
            }
            Err(Errno::NOENT) => {
                return Err(error(
                    ErrorKind::NotBound,
                    format!(
                        "bound to no driver, not vfio-pci; bind it (modprobe vfio-pci): {bind}"
                    ),
                ));
            }
            Err(e) => {
                return Err(
                    error(ErrorKind::NotBound, format!("cannot read {dir}/driver")).with_errno(e),
                );
            }
        }
        let group_link = format!("{dir}/iommu_group");
        let number = match sys::sysfs_read_link(Path::new(&group_link)) {
            Ok(target) => link_name(&target)
                .and_then(|name| name.parse::<u32>().ok())
                .ok_or_else(|| {
                    error(
                        ErrorKind::NoIommuGroup,
                        format!("{group_link} points to {}, not a group", target.display()),
                    )
                })?,
            Err(e) => {
                return Err(error(
                    ErrorKind::NoIommuGroup,
                    "no IOMMU group: enable the IOMMU (intel_iommu=on), or use IommuMode::NoIommu \
                     with vfio.enable_unsafe_noiommu_mode=1"
                        .into(),
                )
                .with_errno(e));
            }
        };
        let group = container.attach(address, number)?;
        let fd = group.open_device(address)?;
        let inner = Arc::new(DeviceInner {
            fd,
            address: address.to_owned(),
            _group: group,
        });
        let info = sys::device_info(&inner.fd).map_err(|e| {
            error(ErrorKind::DeviceOpen, "VFIO_DEVICE_GET_INFO failed".into()).with_errno(e)
        })?;
        if info.flags & VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(error(
                ErrorKind::Unsupported,
                format!("not a PCI device (VFIO device flags {:#x})", info.flags),
            ));
        }
        let mut device = Self {
            inner,
            flags: info.flags,
            config: RegionInfo {
                index: VFIO_PCI_CONFIG_REGION_INDEX,
                offset: 0,
                size: 0,
                readable: false,
                writable: false,
                mmap: false,
            },
        };
        let config = device.region(VFIO_PCI_CONFIG_REGION_INDEX)?;
        if config.size < 64 || !config.readable || !config.writable {
            return Err(error(
                ErrorKind::Region,
                format!(
                    "config space is not usable ({} bytes, readable {}, writable {})",
                    config.size, config.readable, config.writable
                ),
            ));
        }
        device.config = config;
        Ok(device)
    }

    /// The device's PCI address.
    pub fn address(&self) -> &str {
        &self.inner.address
    }

    fn error(&self, kind: ErrorKind, message: impl Into<String>) -> VfioError {
        VfioError::new(kind, self.inner.address.as_str(), message)
    }

    /// Region `index` (`VFIO_DEVICE_GET_REGION_INFO`).
    ///
    /// # Errors
    /// [`ErrorKind::Region`] if the kernel has no such region or the call fails.
    pub fn region(&self, index: u32) -> VfioResult<RegionInfo> {
        sys::device_region_info(&self.inner.fd, index)
            .map(RegionInfo::from)
            .map_err(|e| {
                self.error(
                    ErrorKind::Region,
                    format!("cannot get information on region {index}"),
                )
                .with_errno(e)
            })
    }

    /// Map the first `length` bytes (`None`: all) of BAR `index` (0..=5) into the process.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for an index above 5; [`ErrorKind::Region`] if the
    /// region cannot be described; [`ErrorKind::BarMap`] if the BAR is not implemented
    /// (size 0), cannot be mapped (an I/O-port BAR), `length` is 0 or larger than the BAR, or
    /// `mmap` fails.
    pub fn map_bar(&self, index: u32, length: Option<u64>) -> VfioResult<Bar> {
        if index > VFIO_PCI_BAR5_REGION_INDEX {
            return Err(self.error(
                ErrorKind::InvalidArgument,
                format!("BAR{index} does not exist (BARs are 0 to 5)"),
            ));
        }
        let region = self.region(index)?;
        if region.size == 0 {
            return Err(self.error(
                ErrorKind::BarMap,
                format!("BAR{index} is not implemented (size 0)"),
            ));
        }
        if !region.mmap {
            return Err(self.error(
                ErrorKind::BarMap,
                format!(
                    "BAR{index} cannot be mapped (no VFIO_REGION_INFO_FLAG_MMAP: an I/O-port \
                     BAR, or mapping disabled)"
                ),
            ));
        }
        let length = length.unwrap_or(region.size);
        if length == 0 || length > region.size {
            return Err(self.error(
                ErrorKind::BarMap,
                format!(
                    "cannot map {length:#x} bytes of BAR{index}, which has {:#x}",
                    region.size
                ),
            ));
        }
        let bytes = usize::try_from(length).map_err(|_| {
            self.error(
                ErrorKind::BarMap,
                format!("{length:#x} bytes of BAR{index} do not fit the address space"),
            )
        })?;
        let map = sys::device_mmap(&self.inner.fd, region.offset, bytes).map_err(|e| {
            self.error(
                ErrorKind::BarMap,
                format!(
                    "mmap of {length:#x} bytes of BAR{index} failed (if the BAR holds the MSI-X \
                     table, map only the registers before it)"
                ),
            )
            .with_errno(e)
        })?;
        Ok(Bar::new(map, index, self.inner.clone()))
    }

    /// Check that `len` bytes at `offset` lie inside config space.
    fn config_range(&self, offset: u64, len: usize, verb: &str) -> VfioResult<u64> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > self.config.size) {
            return Err(self.error(
                ErrorKind::Config,
                format!(
                    "config {verb} of {len} bytes at {offset:#x} is outside config space \
                     ({:#x} bytes)",
                    self.config.size
                ),
            ));
        }
        Ok(self.config.offset + offset)
    }

    /// Read `out.len()` bytes of config space at `offset`.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] if the range is outside config space, the read fails or is short.
    pub fn config_read(&self, offset: u64, out: &mut [u8]) -> VfioResult<()> {
        let at = self.config_range(offset, out.len(), "read")?;
        let read = sys::device_pread(&self.inner.fd, at, out).map_err(|e| {
            self.error(
                ErrorKind::Config,
                format!("config read of {} bytes at {offset:#x} failed", out.len()),
            )
            .with_errno(e)
        })?;
        if read != out.len() {
            return Err(self.error(
                ErrorKind::Config,
                format!(
                    "short config read at {offset:#x}: {read} of {} bytes",
                    out.len()
                ),
            ));
        }
        Ok(())
    }

    /// Write `data` to config space at `offset`.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] if the range is outside config space, the write fails or is
    /// short.
    pub fn config_write(&self, offset: u64, data: &[u8]) -> VfioResult<()> {
        let at = self.config_range(offset, data.len(), "write")?;
        let written = sys::device_pwrite(&self.inner.fd, at, data).map_err(|e| {
            self.error(
                ErrorKind::Config,
                format!("config write of {} bytes at {offset:#x} failed", data.len()),
            )
            .with_errno(e)
        })?;
        if written != data.len() {
            return Err(self.error(
                ErrorKind::Config,
                format!(
                    "short config write at {offset:#x}: {written} of {} bytes",
                    data.len()
                ),
            ));
        }
        Ok(())
    }

    /// Read the 16-bit config register at `offset` (little-endian, as PCI defines it).
    ///
    /// # Errors
    /// As [`VfioDevice::config_read`].
    pub fn config_read16(&self, offset: u64) -> VfioResult<u16> {
        let mut bytes = [0u8; 2];
        self.config_read(offset, &mut bytes)?;
        Ok(u16::from_le_bytes(bytes))
    }

    /// Read the 32-bit config register at `offset`.
    ///
    /// # Errors
    /// As [`VfioDevice::config_read`].
    pub fn config_read32(&self, offset: u64) -> VfioResult<u32> {
        let mut bytes = [0u8; 4];
        self.config_read(offset, &mut bytes)?;
        Ok(u32::from_le_bytes(bytes))
    }

    /// Write the 16-bit config register at `offset`.
    ///
    /// # Errors
    /// As [`VfioDevice::config_write`].
    pub fn config_write16(&self, offset: u64, value: u16) -> VfioResult<()> {
        self.config_write(offset, &value.to_le_bytes())
    }

    /// The vendor and device IDs from config space.
    ///
    /// # Errors
    /// As [`VfioDevice::config_read`].
    pub fn ids(&self) -> VfioResult<(u16, u16)> {
        Ok((self.config_read16(0)?, self.config_read16(2)?))
    }

    /// Turn on memory decoding and bus mastering in the PCI command register (bits 1 and 2),
    /// keeping its other bits. vfio-pci leaves bus mastering off, and without it the device's
    /// DMA goes nowhere.
    ///
    /// # Errors
    /// As [`VfioDevice::config_read`] and [`VfioDevice::config_write`].
    pub fn enable_bus_master(&self) -> VfioResult<()> {
        let command = self.config_read16(PCI_COMMAND)?;
        self.config_write16(
            PCI_COMMAND,
            command | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER,
        )
    }

    /// What the device offers for interrupt type `kind` (`VFIO_DEVICE_GET_IRQ_INFO`).
    ///
    /// # Errors
    /// [`ErrorKind::Interrupt`] if the call fails.
    pub fn irq_info(&self, kind: IrqKind) -> VfioResult<IrqInfo> {
        let info = sys::device_irq_info(&self.inner.fd, kind.index()).map_err(|e| {
            self.error(
                ErrorKind::Interrupt,
                format!("cannot get information on {kind} interrupts"),
            )
            .with_errno(e)
        })?;
        Ok(IrqInfo {
            kind,
            count: if info.flags & VFIO_IRQ_INFO_EVENTFD != 0 {
                info.count
            } else {
                // Without eventfd signalling the vectors cannot be used from user space.
                0
            },
            maskable: info.flags & VFIO_IRQ_INFO_MASKABLE != 0,
            automasked: info.flags & VFIO_IRQ_INFO_AUTOMASKED != 0,
        })
    }

    /// Wire `vectors` vectors of `kind` (1 for INTx) to eventfds and start an interrupt thread
    /// that calls `handler(vector)` each time a vector fires (signals that arrive together are
    /// delivered as one call, as an edge-triggered interrupt would be).
    ///
    /// VFIO masks INTx each time it fires; the thread unmasks it after the handler returns, so
    /// the handler must have quieted the device (acknowledged its interrupt) by then.
    ///
    /// # Errors
    /// [`ErrorKind::Interrupt`]: `vectors` is 0 (or not 1 for INTx); the device has fewer
    /// vectors of `kind` than asked; an eventfd, `VFIO_DEVICE_SET_IRQS` or the thread could not
    /// be created. Nothing stays set up after an error.
    pub fn enable_interrupts(
        &self,
        kind: IrqKind,
        vectors: u32,
        handler: IrqHandler,
    ) -> VfioResult<Interrupts> {
        if vectors == 0 || (kind == IrqKind::Intx && vectors != 1) {
            return Err(self.error(
                ErrorKind::Interrupt,
                format!(
                    "cannot enable {vectors} {kind} vectors (INTx has exactly 1; MSI and MSI-X \
                     need at least 1)"
                ),
            ));
        }
        let info = self.irq_info(kind)?;
        if info.count < vectors {
            return Err(self.error(
                ErrorKind::Interrupt,
                format!(
                    "asked for {vectors} {kind} vectors, the device offers {}",
                    info.count
                ),
            ));
        }
        Interrupts::start(self.inner.clone(), kind, vectors, handler)
    }

    /// Reset the device (`VFIO_DEVICE_RESET`: a function-level, power-management or bus
    /// reset, whichever the kernel found for it).
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`] if the device cannot be reset (its VFIO flags lack
    /// `VFIO_DEVICE_FLAGS_RESET`) or the reset fails.
    pub fn reset(&self) -> VfioResult<()> {
        if self.flags & VFIO_DEVICE_FLAGS_RESET == 0 {
            return Err(self.error(
                ErrorKind::Unsupported,
                "the device has no reset method VFIO can use",
            ));
        }
        sys::device_reset(&self.inner.fd).map_err(|e| {
            self.error(ErrorKind::Unsupported, "VFIO_DEVICE_RESET failed")
                .with_errno(e)
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use rustix::io::Errno;
    use vfio_bindings::bindings::vfio::{VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE};

    use dmatx_hal::RegisterWindow;

    use super::*;
    use crate::IommuMode;
    use crate::sys::{DeviceSpec, Step, Twin};

    /// The address of the test devices.
    pub(crate) const EDU: &str = "0000:00:03.0";

    /// A kernel with `spec` declared, an IOMMU container and the device opened in it.
    pub(crate) fn setup(spec: DeviceSpec) -> (Twin, Arc<VfioContainer>, VfioDevice) {
        let twin = Twin::install();
        twin.add(spec);
        let container = VfioContainer::open(IommuMode::Iommu).expect("container opens");
        let device = VfioDevice::open(&container, EDU).expect("device opens");
        (twin, container, device)
    }

    /// Assert that `error` is of `kind`, is about `subject` and its message holds `words`.
    #[track_caller]
    pub(crate) fn assert_error(error: &VfioError, kind: ErrorKind, subject: &str, words: &[&str]) {
        assert_eq!(error.kind(), kind, "{error}");
        assert_eq!(error.subject(), subject, "{error}");
        for word in words {
            assert!(error.message().contains(word), "{error} lacks {word:?}");
        }
    }

    /// Open `address` in an IOMMU container of a kernel holding `spec`, expecting an error;
    /// check that nothing leaked.
    #[track_caller]
    fn open_error(twin: &Twin, spec: DeviceSpec, address: &str) -> VfioError {
        twin.add(spec);
        let container = VfioContainer::open(IommuMode::Iommu).expect("container opens");
        let error = VfioDevice::open(&container, address).expect_err("open fails");
        drop(container);
        twin.assert_clean();
        error
    }

    #[test]
    fn opens_a_device_and_reads_its_ids() {
        let (twin, container, device) = setup(DeviceSpec::new(EDU, 3));
        assert_eq!(device.address(), EDU);
        assert_eq!(device.ids(), Ok((0x1234, 0x11e8)));
        assert_eq!(twin.attached_groups(), 1);
        assert_eq!(twin.set_iommu_calls(), 1);
        // Container, group and device.
        assert_eq!(twin.open_fds(), 3);
        drop(device);
        assert_eq!(twin.attached_groups(), 0);
        drop(container);
        twin.assert_clean();
    }

    #[test]
    fn rejects_what_is_not_a_pci_address() {
        let twin = Twin::install();
        for address in [
            "../../../etc",
            "0000:00:03",
            "00:03.0",
            "0000:00:03.0/x",
            "",
        ] {
            let error = open_error(&twin, DeviceSpec::new(EDU, 3), address);
            assert_error(
                &error,
                ErrorKind::InvalidArgument,
                address,
                &["not a PCI address"],
            );
        }
    }

    #[test]
    fn reports_a_missing_device() {
        let twin = Twin::install();
        let error = open_error(&twin, DeviceSpec::new(EDU, 3), "0000:00:04.0");
        assert_error(
            &error,
            ErrorKind::NoDevice,
            "0000:00:04.0",
            &["no such PCI device", "/sys/bus/pci/devices/0000:00:04.0"],
        );
    }

    #[test]
    fn reports_a_device_bound_to_another_driver() {
        let twin = Twin::install();
        let spec = DeviceSpec::new(EDU, 3).driver(Some("nvme"));
        let error = open_error(&twin, spec, EDU);
        assert_error(
            &error,
            ErrorKind::NotBound,
            EDU,
            &[
                "bound to nvme",
                "unbind",
                "driver_override",
                "drivers_probe",
            ],
        );
    }

    #[test]
    fn reports_an_unbound_device() {
        let twin = Twin::install();
        let error = open_error(&twin, DeviceSpec::new(EDU, 3).driver(None), EDU);
        assert_error(
            &error,
            ErrorKind::NotBound,
            EDU,
            &["no driver", "driver_override", "drivers_probe"],
        );
    }

    #[test]
    fn reports_a_device_without_iommu_group() {
        let twin = Twin::install();
        let error = open_error(&twin, DeviceSpec::new(EDU, 3).no_group(), EDU);
        assert_error(
            &error,
            ErrorKind::NoIommuGroup,
            EDU,
            &["no IOMMU group", "NoIommu"],
        );
    }

    #[test]
    fn reports_a_group_that_is_not_viable() {
        let twin = Twin::install();
        let error = open_error(&twin, DeviceSpec::new(EDU, 7).not_viable(), EDU);
        assert_error(
            &error,
            ErrorKind::GroupNotViable,
            EDU,
            &["another device in group 7 is bound to a host driver"],
        );
    }

    #[test]
    fn reports_a_busy_group() {
        let twin = Twin::install();
        twin.fail(Step::OpenGroup, Errno::BUSY);
        let error = open_error(&twin, DeviceSpec::new(EDU, 3), EDU);
        assert_error(&error, ErrorKind::DeviceOpen, EDU, &["group 3", "in use"]);
        assert_eq!(error.errno(), Some(Errno::BUSY));
    }

    #[test]
    fn reports_a_busy_device_and_detaches_its_group() {
        let twin = Twin::install();
        twin.fail(Step::DeviceFd, Errno::BUSY);
        let error = open_error(&twin, DeviceSpec::new(EDU, 3), EDU);
        assert_error(&error, ErrorKind::DeviceOpen, EDU, &["busy"]);
        assert_eq!(error.errno(), Some(Errno::BUSY));
    }

    #[test]
    fn reports_a_failed_attach_or_iommu_setup() {
        let twin = Twin::install();
        twin.fail(Step::SetContainer, Errno::INVAL);
        let error = open_error(&twin, DeviceSpec::new(EDU, 3), EDU);
        assert_error(
            &error,
            ErrorKind::DeviceOpen,
            EDU,
            &["attach IOMMU group 3"],
        );

        let twin = Twin::install();
        twin.fail(Step::SetIommu, Errno::INVAL);
        let error = open_error(&twin, DeviceSpec::new(EDU, 3), EDU);
        assert_error(
            &error,
            ErrorKind::Unsupported,
            EDU,
            &["type1v2", "VFIO_SET_IOMMU"],
        );
    }

    #[test]
    fn reports_failed_device_and_config_information() {
        let twin = Twin::install();
        twin.fail(Step::DeviceInfo, Errno::IO);
        let error = open_error(&twin, DeviceSpec::new(EDU, 3), EDU);
        assert_error(
            &error,
            ErrorKind::DeviceOpen,
            EDU,
            &["VFIO_DEVICE_GET_INFO"],
        );

        let twin = Twin::install();
        twin.fail(Step::RegionInfo, Errno::IO);
        let error = open_error(&twin, DeviceSpec::new(EDU, 3), EDU);
        assert_error(&error, ErrorKind::Region, EDU, &["region 7"]);
    }

    #[test]
    fn enables_bus_mastering_keeping_the_other_command_bits() {
        let spec = DeviceSpec::new(EDU, 3).config16(4, 0x0401);
        let (twin, container, device) = setup(spec);
        device.enable_bus_master().expect("command written");
        assert_eq!(twin.config16(EDU, 4), Some(0x0407));
        assert_eq!(device.config_read16(4), Ok(0x0407));
        drop((device, container));
        twin.assert_clean();
    }

    #[test]
    fn config_accesses_report_failures_and_stay_inside_config_space() {
        let (twin, container, device) = setup(DeviceSpec::new(EDU, 3));
        twin.fail(Step::Read, Errno::IO);
        let error = device.config_read16(0).expect_err("read fails");
        assert_error(
            &error,
            ErrorKind::Config,
            EDU,
            &["config read of 2 bytes at 0x0"],
        );
        assert_eq!(error.errno(), Some(Errno::IO));

        twin.fail(Step::Write, Errno::IO);
        let error = device.config_write16(4, 6).expect_err("write fails");
        assert_error(&error, ErrorKind::Config, EDU, &["config write"]);

        let error = device.config_read32(254).expect_err("outside");
        assert_error(&error, ErrorKind::Config, EDU, &["outside config space"]);
        let error = device.config_read32(u64::MAX).expect_err("overflows");
        assert_eq!(error.kind(), ErrorKind::Config);
        assert_eq!(device.config_read32(252), Ok(0));
        drop((device, container));
        twin.assert_clean();
    }

    #[test]
    fn bar_mapping_errors() {
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let spec = DeviceSpec::new(EDU, 3).region(1, 0x100, rw);
        let (twin, container, device) = setup(spec);
        let cases = [
            (1, None, ErrorKind::BarMap, "BAR1 cannot be mapped"),
            (
                2,
                None,
                ErrorKind::BarMap,
                "BAR2 is not implemented (size 0)",
            ),
            (
                0,
                Some(0x2000),
                ErrorKind::BarMap,
                "0x2000 bytes of BAR0, which has 0x1000",
            ),
            (0, Some(0), ErrorKind::BarMap, "cannot map 0x0 bytes"),
            (6, None, ErrorKind::InvalidArgument, "BAR6 does not exist"),
        ];
        for (index, length, kind, words) in cases {
            let error = device.map_bar(index, length).expect_err("mapping fails");
            assert_error(&error, kind, EDU, &[words]);
        }
        twin.fail(Step::Mmap, Errno::INVAL);
        let error = device.map_bar(0, None).expect_err("mmap fails");
        assert_error(
            &error,
            ErrorKind::BarMap,
            EDU,
            &["mmap of 0x1000 bytes of BAR0"],
        );
        assert_eq!(error.errno(), Some(Errno::INVAL));
        assert_eq!(twin.live_mmaps(), 0);

        twin.fail(Step::RegionInfo, Errno::IO);
        let error = device.map_bar(0, None).expect_err("region info fails");
        assert_error(&error, ErrorKind::Region, EDU, &["region 0"]);
        drop((device, container));
        twin.assert_clean();
    }

    #[test]
    fn describes_regions() {
        let (twin, container, device) = setup(DeviceSpec::new(EDU, 3));
        let bar = device.region(0).expect("BAR0");
        assert_eq!(
            bar,
            RegionInfo {
                index: 0,
                offset: 0,
                size: 0x1000,
                readable: true,
                writable: true,
                mmap: true
            }
        );
        let error = device.region(9).expect_err("no region 9");
        assert_error(&error, ErrorKind::Region, EDU, &["region 9"]);
        drop((device, container));
        twin.assert_clean();
    }

    #[test]
    fn a_bar_and_interrupts_keep_the_device_open_after_it_is_dropped() {
        let (twin, container, device) = setup(DeviceSpec::new(EDU, 3));
        let bar = device.map_bar(0, None).expect("BAR0 maps");
        let handler: IrqHandler = Arc::new(|_| {});
        let interrupts = device
            .enable_interrupts(IrqKind::Msi, 1, handler)
            .expect("MSI");
        drop(device);
        assert_eq!(twin.attached_groups(), 1);
        bar.write32(0, 5);
        assert_eq!(twin.bar_read32(EDU, 0, 0), Some(5));
        drop(container);
        drop(bar);
        assert_eq!(twin.attached_groups(), 1);
        interrupts.disable().expect("disabled");
        twin.assert_clean();
    }

    #[test]
    fn resets_when_the_device_can_be_reset() {
        let (twin, container, device) = setup(DeviceSpec::new(EDU, 3));
        assert_eq!(device.reset(), Ok(()));
        drop((device, container));
        twin.assert_clean();

        let (twin, container, device) = setup(DeviceSpec::new(EDU, 3).no_reset());
        let error = device.reset().expect_err("no reset");
        assert_error(&error, ErrorKind::Unsupported, EDU, &["no reset method"]);
        drop((device, container));
        twin.assert_clean();
    }

    #[test]
    fn two_devices_share_a_group_and_a_container() {
        let twin = Twin::install();
        twin.add(DeviceSpec::new(EDU, 3));
        twin.add(DeviceSpec::new("0000:00:03.1", 3));
        let container = VfioContainer::open(IommuMode::Iommu).expect("container opens");
        let first = VfioDevice::open(&container, EDU).expect("first opens");
        let second = VfioDevice::open(&container, "0000:00:03.1").expect("second opens");
        // One container, one group, two devices.
        assert_eq!(twin.open_fds(), 4);
        assert_eq!(twin.set_iommu_calls(), 1);
        drop(first);
        assert_eq!(twin.attached_groups(), 1);
        drop(second);
        drop(container);
        twin.assert_clean();
    }
}
