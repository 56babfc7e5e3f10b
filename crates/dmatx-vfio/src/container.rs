//! The VFIO container: one IOMMU context shared by the devices opened in it
//! (`Documentation/driver-api/vfio.rst`, "Groups, Devices, and IOMMUs" and "VFIO Usage
//! Example"; the type1 IOMMU's `VFIO_IOMMU_GET_INFO` IOVA-range capability).
//!
//! A container is opened for one [`IommuMode`]. Devices join it through their IOMMU group: the
//! first device of a group opens the group and attaches it (`VFIO_GROUP_SET_CONTAINER`), the
//! first group gives the container its IOMMU (`VFIO_SET_IOMMU`), and the last device of a
//! group to go detaches it (`VFIO_GROUP_UNSET_CONTAINER`). The container is also the DMA
//! layer's [`DmaMapper`].

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rustix::io::Errno;
use vfio_bindings::bindings::vfio::{
    VFIO_API_VERSION, VFIO_GROUP_FLAGS_VIABLE, VFIO_IOMMU_INFO_CAPS,
    VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, VFIO_NOIOMMU_IOMMU, VFIO_TYPE1v2_IOMMU,
};

use crate::error::{ErrorKind, VfioError, VfioResult};
use crate::iommu::{DmaMapper, IommuMode};
use crate::sys;

/// The VFIO container device.
const CONTAINER_PATH: &str = "/dev/vfio/vfio";
/// The module parameter that allows no-IOMMU containers.
const NOIOMMU_PARAM: &str = "/sys/module/vfio/parameters/enable_unsafe_noiommu_mode";

/// A VFIO container (`/dev/vfio/vfio`): the IOMMU context of the devices opened in it. Shared
/// as `Arc<VfioContainer>` by the devices and the DMA layer.
pub struct VfioContainer {
    mode: IommuMode,
    fd: sys::Container,
    /// The groups attached, by group number.
    groups: Mutex<HashMap<u32, GroupEntry>>,
}

/// An attached group and the number of open devices that use it.
struct GroupEntry {
    fd: sys::Group,
    devices: usize,
}

impl fmt::Debug for VfioContainer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioContainer")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl VfioContainer {
    /// Open `/dev/vfio/vfio` for `mode`: check the VFIO API version and that the kernel
    /// offers the IOMMU type (`VFIO_TYPE1v2_IOMMU`, or `VFIO_NOIOMMU_IOMMU` for
    /// [`IommuMode::NoIommu`], which also needs `vfio.enable_unsafe_noiommu_mode=1`).
    ///
    /// # Errors
    /// * [`ErrorKind::NoVfio`]: `/dev/vfio/vfio` is missing or cannot be opened.
    /// * [`ErrorKind::Unsupported`]: another API version, or no type1v2 IOMMU.
    /// * [`ErrorKind::NoIommuUnsupported`]: the kernel lacks `CONFIG_VFIO_NOIOMMU`, or the mode
    ///   is not enabled.
    pub fn open(mode: IommuMode) -> VfioResult<Arc<Self>> {
        let error = |kind, message: String| VfioError::new(kind, CONTAINER_PATH, message);
        let fd = sys::container_open(Path::new(CONTAINER_PATH)).map_err(|e| {
            let message = match e {
                Errno::NOENT | Errno::NODEV => {
                    "does not exist: VFIO is not loaded (modprobe vfio-pci)"
                }
                Errno::ACCESS | Errno::PERM => {
                    "permission denied: run as root or give this user the VFIO devices"
                }
                _ => "cannot be opened",
            };
            error(ErrorKind::NoVfio, message.to_owned()).with_errno(e)
        })?;
        let version = sys::container_api_version(&fd).map_err(|e| {
            error(ErrorKind::Unsupported, "VFIO_GET_API_VERSION failed".into()).with_errno(e)
        })?;
        if i64::from(version) != i64::from(VFIO_API_VERSION) {
            return Err(error(
                ErrorKind::Unsupported,
                format!("VFIO API version {version}, dmatx needs {VFIO_API_VERSION}"),
            ));
        }
        let iommu_type = match mode {
            IommuMode::Iommu => VFIO_TYPE1v2_IOMMU,
            IommuMode::NoIommu => {
                check_noiommu_enabled()?;
                VFIO_NOIOMMU_IOMMU
            }
        };
        let supported = sys::container_check_extension(&fd, iommu_type).map_err(|e| {
            error(ErrorKind::Unsupported, "VFIO_CHECK_EXTENSION failed".into()).with_errno(e)
        })?;
        if !supported {
            return Err(match mode {
                IommuMode::Iommu => error(
                    ErrorKind::Unsupported,
                    "no type1v2 IOMMU: enable the IOMMU (intel_iommu=on or amd_iommu=on) and \
                     load vfio_iommu_type1"
                        .into(),
                ),
                IommuMode::NoIommu => error(
                    ErrorKind::NoIommuUnsupported,
                    "the container offers no no-IOMMU mode".into(),
                ),
            });
        }
        Ok(Arc::new(Self {
            mode,
            fd,
            groups: Mutex::new(HashMap::new()),
        }))
    }

    /// How devices of this container reach memory.
    pub fn mode(&self) -> IommuMode {
        self.mode
    }

    /// The IOVA ranges the IOMMU accepts, each `(first, last)` inclusive, from
    /// `VFIO_IOMMU_GET_INFO`'s IOVA-range capability; empty if the kernel does not report it.
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`] in no-IOMMU mode (there is no IOVA space);
    /// [`ErrorKind::InvalidArgument`] before a device is opened in the container (the IOMMU
    /// is set up by the first one); [`ErrorKind::DmaMap`] if the information cannot be read.
    pub fn iova_ranges(&self) -> VfioResult<Vec<(u64, u64)>> {
        let error = |kind, message: &str| VfioError::new(kind, CONTAINER_PATH, message);
        if self.mode == IommuMode::NoIommu {
            return Err(error(
                ErrorKind::Unsupported,
                "a no-IOMMU container has no IOVA ranges (devices use physical addresses)",
            ));
        }
        if self.lock_groups().is_empty() {
            return Err(error(
                ErrorKind::InvalidArgument,
                "no IOVA ranges before a device is opened in the container",
            ));
        }
        let info = sys::container_iommu_info(&self.fd)
            .map_err(|e| error(ErrorKind::DmaMap, "VFIO_IOMMU_GET_INFO failed").with_errno(e))?;
        parse_iova_ranges(&info).ok_or_else(|| {
            error(
                ErrorKind::DmaMap,
                "VFIO_IOMMU_GET_INFO returned a malformed capability chain",
            )
        })
    }

    /// The container as the DMA layer's mapper.
    pub(crate) fn mapper(self: &Arc<Self>) -> Arc<dyn DmaMapper> {
        self.clone()
    }

    fn lock_groups(&self) -> MutexGuard<'_, HashMap<u32, GroupEntry>> {
        // A panic while the map was locked leaves it consistent: every update is one insert,
        // remove or count change.
        self.groups.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The path of group `number`'s device in this container's mode.
    fn group_path(&self, number: u32) -> String {
        match self.mode {
            IommuMode::Iommu => format!("/dev/vfio/{number}"),
            IommuMode::NoIommu => format!("/dev/vfio/noiommu-{number}"),
        }
    }

    /// Take a reference to IOMMU group `number` for the device at `address`: the first one
    /// opens the group, checks that it is viable, attaches it and, for the container's first
    /// group, sets the IOMMU. On failure nothing stays open or attached.
    pub(crate) fn attach(self: &Arc<Self>, address: &str, number: u32) -> VfioResult<GroupRef> {
        let mut groups = self.lock_groups();
        if let Some(entry) = groups.get_mut(&number) {
            entry.devices += 1;
            return Ok(GroupRef {
                container: self.clone(),
                number,
            });
        }
        let error = |kind, message: String| VfioError::new(kind, address, message);
        let path = self.group_path(number);
        let fd = sys::group_open(Path::new(&path)).map_err(|e| {
            let (kind, message) = match e {
                Errno::NOENT => (
                    ErrorKind::NoIommuGroup,
                    match self.mode {
                        IommuMode::Iommu => format!(
                            "{path} does not exist (a no-IOMMU group? then open the container \
                             with IommuMode::NoIommu)"
                        ),
                        IommuMode::NoIommu => format!(
                            "{path} does not exist (the device has an IOMMU: open the \
                             container with IommuMode::Iommu)"
                        ),
                    },
                ),
                Errno::BUSY => (
                    ErrorKind::DeviceOpen,
                    format!("IOMMU group {number} ({path}) is in use: another container, in this process or another, holds it"),
                ),
                Errno::ACCESS | Errno::PERM => (
                    ErrorKind::DeviceOpen,
                    format!("no permission to open {path} (run as root or chown it)"),
                ),
                _ => (ErrorKind::DeviceOpen, format!("cannot open {path}")),
            };
            error(kind, message).with_errno(e)
        })?;
        let flags = sys::group_status(&fd).map_err(|e| {
            error(
                ErrorKind::DeviceOpen,
                format!("VFIO_GROUP_GET_STATUS of group {number} failed"),
            )
            .with_errno(e)
        })?;
        if flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(error(
                ErrorKind::GroupNotViable,
                format!(
                    "IOMMU group {number} is not viable: another device in group {number} is \
                     bound to a host driver (bind every device in \
                     /sys/kernel/iommu_groups/{number}/devices to vfio-pci)"
                ),
            ));
        }
        sys::group_set_container(&fd, &self.fd).map_err(|e| {
            error(
                ErrorKind::DeviceOpen,
                format!("cannot attach IOMMU group {number} to the container"),
            )
            .with_errno(e)
        })?;
        if groups.is_empty() {
            let iommu_type = match self.mode {
                IommuMode::Iommu => VFIO_TYPE1v2_IOMMU,
                IommuMode::NoIommu => VFIO_NOIOMMU_IOMMU,
            };
            if let Err(e) = sys::container_set_iommu(&self.fd, iommu_type) {
                // Undo the attachment; the group fd closes as `fd` drops.
                let _ = sys::group_unset_container(&fd);
                let name = match self.mode {
                    IommuMode::Iommu => "type1v2",
                    IommuMode::NoIommu => "no-IOMMU",
                };
                return Err(error(
                    ErrorKind::Unsupported,
                    format!("the container refused the {name} IOMMU (VFIO_SET_IOMMU)"),
                )
                .with_errno(e));
            }
        }
        groups.insert(number, GroupEntry { fd, devices: 1 });
        Ok(GroupRef {
            container: self.clone(),
            number,
        })
    }

    /// Drop one device's reference to group `number`; the last one detaches and closes it.
    fn release(&self, number: u32) {
        let mut groups = self.lock_groups();
        let Some(entry) = groups.get_mut(&number) else {
            return;
        };
        entry.devices -= 1;
        if entry.devices == 0
            && let Some(entry) = groups.remove(&number)
        {
            // Nothing to report to from a drop; a failure leaves the kernel to detach the
            // group when its fd closes.
            let _ = sys::group_unset_container(&entry.fd);
        }
    }
}

/// Check that the kernel has and enables the no-IOMMU mode.
fn check_noiommu_enabled() -> VfioResult<()> {
    let error =
        |message: &str| VfioError::new(ErrorKind::NoIommuUnsupported, NOIOMMU_PARAM, message);
    match sys::sysfs_read(Path::new(NOIOMMU_PARAM)) {
        Err(Errno::NOENT) => Err(error(
            "does not exist: the kernel was built without CONFIG_VFIO_NOIOMMU",
        )),
        Err(e) => Err(error("cannot be read").with_errno(e)),
        Ok(value) if value.trim_start().starts_with(['Y', 'y', '1']) => Ok(()),
        Ok(_) => Err(error(
            "is off: load vfio with enable_unsafe_noiommu_mode=1 (or write Y to this file)",
        )),
    }
}

/// One device's reference to an attached IOMMU group of a container; dropping the last one
/// detaches the group.
pub(crate) struct GroupRef {
    container: Arc<VfioContainer>,
    number: u32,
}

impl GroupRef {
    /// Open the device at `address` in the group (`VFIO_GROUP_GET_DEVICE_FD`).
    pub(crate) fn open_device(&self, address: &str) -> VfioResult<sys::Device> {
        let groups = self.container.lock_groups();
        let result = match groups.get(&self.number) {
            Some(entry) => sys::group_device(&entry.fd, address),
            None => Err(Errno::BADF),
        };
        result.map_err(|e| {
            let message = match e {
                Errno::BUSY => "the device is busy: it is already open (in this process or \
                                another)"
                    .to_owned(),
                _ => format!(
                    "cannot open the device through IOMMU group {} (VFIO_GROUP_GET_DEVICE_FD)",
                    self.number
                ),
            };
            VfioError::new(ErrorKind::DeviceOpen, address, message).with_errno(e)
        })
    }
}

impl Drop for GroupRef {
    fn drop(&mut self) {
        self.container.release(self.number);
    }
}

/// Read a native-endian integer of `N` bytes at `at`.
fn field<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// The IOVA ranges of a `vfio_iommu_type1_info` with its capability chain; `None` if the chain
/// is malformed.
fn parse_iova_ranges(info: &[u8]) -> Option<Vec<(u64, u64)>> {
    let flags = u32::from_ne_bytes(field(info, 4)?);
    if flags & VFIO_IOMMU_INFO_CAPS == 0 {
        return Some(Vec::new());
    }
    let mut at = u32::from_ne_bytes(field(info, 16)?) as usize;
    // Each capability takes at least its 8-byte header: more hops than that is a loop.
    for _ in 0..=info.len() / 8 {
        if at == 0 {
            return Some(Vec::new());
        }
        let id = u16::from_ne_bytes(field(info, at)?);
        if u32::from(id) == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
            let count = u32::from_ne_bytes(field(info, at + 8)?) as usize;
            return (0..count)
                .map(|i| {
                    let range = at.checked_add(16)?.checked_add(i.checked_mul(16)?)?;
                    let start = u64::from_ne_bytes(field(info, range)?);
                    let end = u64::from_ne_bytes(field(info, range + 8)?);
                    (start <= end).then_some((start, end))
                })
                .collect();
        }
        at = u32::from_ne_bytes(field(info, at + 4)?) as usize;
    }
    None
}

impl DmaMapper for VfioContainer {
    unsafe fn map(&self, iova: u64, vaddr: usize, size: u64) -> VfioResult<()> {
        let error = |message: String| VfioError::new(ErrorKind::DmaMap, CONTAINER_PATH, message);
        if self.mode == IommuMode::NoIommu {
            return Err(error(
                "a no-IOMMU container maps nothing (devices use physical addresses)".into(),
            ));
        }
        // SAFETY: the caller keeps the `size` bytes at `vaddr` mapped and unreferenced until
        // the matching unmap returns (DmaMapper::map's contract, the same as the call's).
        unsafe { sys::container_dma_map(&self.fd, iova, vaddr, size) }.map_err(|e| {
            error(format!(
                "VFIO_IOMMU_MAP_DMA of {size:#x} bytes at IOVA {iova:#x} failed"
            ))
            .with_errno(e)
        })
    }

    fn unmap(&self, iova: u64, size: u64) -> VfioResult<()> {
        let error = |message: String| VfioError::new(ErrorKind::DmaMap, CONTAINER_PATH, message);
        if self.mode == IommuMode::NoIommu {
            return Err(error(
                "a no-IOMMU container maps nothing (devices use physical addresses)".into(),
            ));
        }
        let unmapped = sys::container_dma_unmap(&self.fd, iova, size).map_err(|e| {
            error(format!(
                "VFIO_IOMMU_UNMAP_DMA of {size:#x} bytes at IOVA {iova:#x} failed"
            ))
            .with_errno(e)
        })?;
        if unmapped == size {
            Ok(())
        } else {
            Err(error(format!(
                "VFIO_IOMMU_UNMAP_DMA at IOVA {iova:#x} unmapped {unmapped:#x} of {size:#x} bytes"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VfioDevice;
    use crate::device::tests::{EDU, assert_error};
    use crate::sys::{DeviceSpec, Step, Twin};

    #[test]
    fn reports_missing_vfio() {
        let twin = Twin::install();
        twin.without_vfio();
        let error = VfioContainer::open(IommuMode::Iommu).expect_err("no VFIO");
        assert_error(
            &error,
            ErrorKind::NoVfio,
            "/dev/vfio/vfio",
            &["does not exist", "modprobe vfio-pci"],
        );
        twin.assert_clean();
    }

    #[test]
    fn reports_a_container_that_cannot_be_opened() {
        let twin = Twin::install();
        twin.fail(Step::OpenContainer, Errno::ACCESS);
        let error = VfioContainer::open(IommuMode::Iommu).expect_err("no permission");
        assert_error(
            &error,
            ErrorKind::NoVfio,
            "/dev/vfio/vfio",
            &["permission denied"],
        );
        assert_eq!(error.errno(), Some(Errno::ACCESS));
        twin.assert_clean();
    }

    #[test]
    fn reports_a_kernel_without_noiommu_mode() {
        let twin = Twin::install();
        twin.noiommu_param(None);
        let error = VfioContainer::open(IommuMode::NoIommu).expect_err("unsupported");
        assert_error(
            &error,
            ErrorKind::NoIommuUnsupported,
            NOIOMMU_PARAM,
            &["CONFIG_VFIO_NOIOMMU"],
        );
        twin.assert_clean();
    }

    #[test]
    fn reports_noiommu_mode_not_enabled() {
        let twin = Twin::install();
        twin.noiommu_param(Some("N"));
        let error = VfioContainer::open(IommuMode::NoIommu).expect_err("not enabled");
        assert_error(
            &error,
            ErrorKind::NoIommuUnsupported,
            NOIOMMU_PARAM,
            &["enable_unsafe_noiommu_mode=1"],
        );
        twin.assert_clean();
    }

    #[test]
    fn opens_noiommu_groups_in_noiommu_mode() {
        let twin = Twin::install();
        twin.noiommu_param(Some("Y"));
        twin.add(DeviceSpec::new(EDU, 5).noiommu());
        let container = VfioContainer::open(IommuMode::NoIommu).expect("container opens");
        assert_eq!(container.mode(), IommuMode::NoIommu);
        let device = VfioDevice::open(&container, EDU).expect("device opens");
        assert_eq!(device.ids(), Ok((0x1234, 0x11e8)));
        let error = container.iova_ranges().expect_err("no IOVA space");
        assert_eq!(error.kind(), ErrorKind::Unsupported);
        let mapper = container.mapper();
        // SAFETY: the mapping is refused, so nothing is mapped.
        let error = unsafe { mapper.map(0x1000, 0x1000, 0x1000) }.expect_err("no IOMMU");
        assert_error(&error, ErrorKind::DmaMap, CONTAINER_PATH, &["no-IOMMU"]);
        drop((mapper, device, container));
        twin.assert_clean();

        // The same group asked for in IOMMU mode: /dev/vfio/5 does not exist.
        let container = VfioContainer::open(IommuMode::Iommu).expect("container opens");
        let error = VfioDevice::open(&container, EDU).expect_err("no such group");
        assert_error(
            &error,
            ErrorKind::NoIommuGroup,
            EDU,
            &["/dev/vfio/5 does not exist", "NoIommu"],
        );
        drop(container);
        twin.assert_clean();
    }

    #[test]
    fn reports_iova_ranges_once_a_device_is_open() {
        let twin = Twin::install();
        twin.add(DeviceSpec::new(EDU, 3));
        twin.iova_ranges(Some(vec![(0, 0xfedf_ffff), (0xfef0_0000, 0xff_ffff_ffff)]));
        let container = VfioContainer::open(IommuMode::Iommu).expect("container opens");
        let error = container.iova_ranges().expect_err("no group yet");
        assert_error(
            &error,
            ErrorKind::InvalidArgument,
            CONTAINER_PATH,
            &["before a device"],
        );
        let device = VfioDevice::open(&container, EDU).expect("device opens");
        assert_eq!(
            container.iova_ranges(),
            Ok(vec![(0, 0xfedf_ffff), (0xfef0_0000, 0xff_ffff_ffff)])
        );
        twin.iova_ranges(None);
        assert_eq!(container.iova_ranges(), Ok(Vec::new()));
        drop((device, container));
        twin.assert_clean();
    }

    #[test]
    fn rejects_malformed_capability_chains() {
        let mut info = vec![0u8; 24];
        info[4..8].copy_from_slice(&VFIO_IOMMU_INFO_CAPS.to_ne_bytes());
        info[16..20].copy_from_slice(&24u32.to_ne_bytes());
        // A capability of another kind whose `next` points at itself.
        info.extend_from_slice(&2u32.to_ne_bytes());
        info.extend_from_slice(&24u32.to_ne_bytes());
        assert_eq!(parse_iova_ranges(&info), None);
        // A chain pointing past the end.
        info[28..32].copy_from_slice(&4096u32.to_ne_bytes());
        assert_eq!(parse_iova_ranges(&info), None);
        // An IOVA-range capability claiming more ranges than it holds.
        info[24..28].copy_from_slice(&1u32.to_ne_bytes());
        info[28..32].copy_from_slice(&0u32.to_ne_bytes());
        info.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(parse_iova_ranges(&info), None);
        assert_eq!(parse_iova_ranges(&info[..3]), None);
    }

    #[test]
    fn maps_and_unmaps_dma_through_the_container() {
        let twin = Twin::install();
        twin.add(DeviceSpec::new(EDU, 3));
        let container = VfioContainer::open(IommuMode::Iommu).expect("container opens");
        let device = VfioDevice::open(&container, EDU).expect("device opens");
        let mapper = container.mapper();
        // SAFETY: the twin records the mapping and never touches the memory.
        unsafe { mapper.map(0x10_0000, 0x7000_0000, 0x2000) }.expect("mapped");
        // SAFETY: as above (the overlapping mapping is refused).
        let error = unsafe { mapper.map(0x10_1000, 0x7000_0000, 0x1000) }.expect_err("overlap");
        assert_error(
            &error,
            ErrorKind::DmaMap,
            CONTAINER_PATH,
            &["IOVA 0x101000"],
        );
        let error = mapper.unmap(0x10_0000, 0x1000).expect_err("partial");
        assert_error(
            &error,
            ErrorKind::DmaMap,
            CONTAINER_PATH,
            &["unmapped 0x0 of 0x1000"],
        );
        mapper.unmap(0x10_0000, 0x2000).expect("unmapped");
        assert_eq!(twin.dma_calls(), (1, 2, 0));
        drop((mapper, device, container));
        twin.assert_clean();
    }

    #[test]
    fn sets_the_iommu_once_per_container() {
        let twin = Twin::install();
        twin.add(DeviceSpec::new(EDU, 3));
        twin.add(DeviceSpec::new("0000:00:04.0", 4));
        let container = VfioContainer::open(IommuMode::Iommu).expect("container opens");
        let first = VfioDevice::open(&container, EDU).expect("first opens");
        let second = VfioDevice::open(&container, "0000:00:04.0").expect("second opens");
        assert_eq!(twin.set_iommu_calls(), 1);
        assert_eq!(twin.attached_groups(), 2);
        drop(first);
        assert_eq!(twin.attached_groups(), 1);
        drop(second);
        // With every group gone the kernel drops the IOMMU: the next device sets it again.
        let again = VfioDevice::open(&container, EDU).expect("reopens");
        assert_eq!(twin.set_iommu_calls(), 2);
        drop((again, container));
        twin.assert_clean();
    }
}
