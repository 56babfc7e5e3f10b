//! The VFIO system calls (Linux `include/uapi/linux/vfio.h`, `Documentation/driver-api/vfio.rst`):
//! the container, group and device ioctls, region access (`pread`/`pwrite`/`mmap` on the device
//! file), the sysfs lookups that find a device's driver and IOMMU group, and the eventfds that
//! carry interrupts.
//!
//! The structures and constants come from `vfio-bindings`; the calls are made with
//! `rustix::ioctl`. We do not use the `vfio-ioctls` crate: its 0.10 release hard-codes the type1v2
//! IOMMU, so it cannot open a no-IOMMU container (whose groups are `/dev/vfio/noiommu-N`), and
//! its `region_read`/`region_write` log and drop errors, where dmatx reports every failure to
//! its caller with the device and the cause.
//!
//! Every function returns the kernel's error number; the layer above turns it into a
//! [`VfioError`](crate::VfioError) that names the device. The test twin (`sys/twin/vfio.rs`) has
//! the same types and signatures.

use std::ffi::{CString, c_void};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use rustix::event::{EventfdFlags, PollFd, PollFlags};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::ioctl::{Ioctl, IoctlOutput, Opcode, opcode};
use rustix::mm::{MapFlags, ProtFlags};
use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_TYPE,
    vfio_device_info, vfio_group_status, vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap,
    vfio_iommu_type1_info, vfio_irq_info, vfio_irq_set, vfio_region_info,
};

/// `_IO(VFIO_TYPE, VFIO_BASE + nr)`: every VFIO ioctl is encoded without size or direction;
/// the structures carry their own `argsz`.
const fn vfio_opcode(nr: u32) -> Opcode {
    // Truncation is impossible: VFIO_BASE is 100 and the numbers used here are below 20.
    #[allow(clippy::cast_possible_truncation)]
    opcode::none(VFIO_TYPE, (VFIO_BASE + nr) as u8)
}

const GET_API_VERSION: Opcode = vfio_opcode(0);
const CHECK_EXTENSION: Opcode = vfio_opcode(1);
const SET_IOMMU: Opcode = vfio_opcode(2);
const GROUP_GET_STATUS: Opcode = vfio_opcode(3);
const GROUP_SET_CONTAINER: Opcode = vfio_opcode(4);
const GROUP_UNSET_CONTAINER: Opcode = vfio_opcode(5);
const GROUP_GET_DEVICE_FD: Opcode = vfio_opcode(6);
const DEVICE_GET_INFO: Opcode = vfio_opcode(7);
const DEVICE_GET_REGION_INFO: Opcode = vfio_opcode(8);
const DEVICE_GET_IRQ_INFO: Opcode = vfio_opcode(9);
const DEVICE_SET_IRQS: Opcode = vfio_opcode(10);
const DEVICE_RESET: Opcode = vfio_opcode(11);
const IOMMU_GET_INFO: Opcode = vfio_opcode(12);
const IOMMU_MAP_DMA: Opcode = vfio_opcode(13);
const IOMMU_UNMAP_DMA: Opcode = vfio_opcode(14);

/// One VFIO ioctl: an opcode and the argument the kernel expects for it (an integer or a
/// pointer), returning the ioctl's non-negative result.
struct Call {
    opcode: Opcode,
    arg: *mut c_void,
}

// SAFETY: `Call` is only built by `call_raw` and `call_int`, whose callers promise that `arg` is
// what the kernel expects for `opcode` (a live, correctly sized structure it may write, or an
// integer); the result is the ioctl's return value, read from nowhere else. Marked mutating
// because several VFIO ioctls write their structure back.
unsafe impl Ioctl for Call {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = true;

    fn opcode(&self) -> Opcode {
        self.opcode
    }

    fn as_ptr(&mut self) -> *mut c_void {
        self.arg
    }

    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

/// Make the VFIO ioctl `opcode` on `fd` with the pointer `arg`.
///
/// # Safety
/// `arg` must point at the structure (or buffer) the kernel reads and writes for `opcode`,
/// valid for reads and writes of its whole `argsz` for the duration of the call.
unsafe fn call_raw(fd: BorrowedFd<'_>, opcode: Opcode, arg: *mut c_void) -> Result<i32, Errno> {
    // SAFETY: the caller promises `arg` is the argument `opcode` expects.
    unsafe { rustix::ioctl::ioctl(fd, Call { opcode, arg }) }
}

/// Make the VFIO ioctl `opcode` on `fd` with a pointer to `arg`.
///
/// # Safety
/// `T` must be the structure the kernel reads and writes for `opcode`, with its `argsz` no
/// larger than `T`.
unsafe fn call<T>(fd: BorrowedFd<'_>, opcode: Opcode, arg: &mut T) -> Result<i32, Errno> {
    // SAFETY: the caller promises `arg` is the argument `opcode` expects, no larger than its
    // argsz; it is borrowed mutably for the duration of the call.
    unsafe { call_raw(fd, opcode, std::ptr::from_mut(arg).cast()) }
}

/// Make the VFIO ioctl `opcode` on `fd` with an integer argument (or none: 0).
///
/// # Safety
/// `opcode` must take an integer argument (or none) and have no effect on process memory.
unsafe fn call_int(fd: BorrowedFd<'_>, opcode: Opcode, value: usize) -> Result<i32, Errno> {
    let call = Call {
        opcode,
        arg: std::ptr::without_provenance_mut(value),
    };
    // SAFETY: the caller promises `opcode` takes an integer and touches no process memory.
    unsafe { rustix::ioctl::ioctl(fd, call) }
}

/// `argsz` of a VFIO structure (all are a few dozen bytes).
fn argsz<T>() -> u32 {
    // Truncation is impossible: VFIO structures are far smaller than 4 GiB.
    #[allow(clippy::cast_possible_truncation)]
    let size = std::mem::size_of::<T>() as u32;
    size
}

/// The error number of a `std` I/O error (`EIO` when it has none).
fn errno_of(error: &std::io::Error) -> Errno {
    error
        .raw_os_error()
        .map_or(Errno::IO, Errno::from_raw_os_error)
}

/// Open `path` read-write, close-on-exec.
fn open_rw(path: &Path) -> Result<OwnedFd, Errno> {
    rustix::fs::open(path, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
}

// ----- sysfs ---------------------------------------------------------------------------------

/// Whether `path` exists (a sysfs directory or file).
pub(crate) fn sysfs_exists(path: &Path) -> bool {
    path.exists()
}

/// The target of the symbolic link at `path` (a device's `driver` or `iommu_group`).
pub(crate) fn sysfs_read_link(path: &Path) -> Result<PathBuf, Errno> {
    std::fs::read_link(path).map_err(|e| errno_of(&e))
}

/// The contents of the text file at `path` (a module parameter).
pub(crate) fn sysfs_read(path: &Path) -> Result<String, Errno> {
    std::fs::read_to_string(path).map_err(|e| errno_of(&e))
}

// ----- container -----------------------------------------------------------------------------

/// An open VFIO container (`/dev/vfio/vfio`); closed on drop.
#[derive(Debug)]
pub(crate) struct Container(OwnedFd);

/// Open the container device at `path`.
pub(crate) fn container_open(path: &Path) -> Result<Container, Errno> {
    open_rw(path).map(Container)
}

/// `VFIO_GET_API_VERSION`.
pub(crate) fn container_api_version(container: &Container) -> Result<i32, Errno> {
    // SAFETY: VFIO_GET_API_VERSION takes no argument and writes no memory.
    unsafe { call_int(container.0.as_fd(), GET_API_VERSION, 0) }
}

/// `VFIO_CHECK_EXTENSION`: whether the container supports `extension` (an IOMMU type).
pub(crate) fn container_check_extension(
    container: &Container,
    extension: u32,
) -> Result<bool, Errno> {
    // SAFETY: VFIO_CHECK_EXTENSION takes the extension number as an integer and writes no
    // memory.
    let supported = unsafe { call_int(container.0.as_fd(), CHECK_EXTENSION, extension as usize) }?;
    Ok(supported > 0)
}

/// `VFIO_SET_IOMMU`: give the container an IOMMU driver of type `iommu_type` (after its first
/// group is attached).
pub(crate) fn container_set_iommu(container: &Container, iommu_type: u32) -> Result<(), Errno> {
    // SAFETY: VFIO_SET_IOMMU takes the IOMMU type as an integer and writes no memory.
    unsafe { call_int(container.0.as_fd(), SET_IOMMU, iommu_type as usize) }.map(drop)
}

/// `VFIO_IOMMU_GET_INFO`: the whole `vfio_iommu_type1_info` structure with its capability
/// chain, as bytes (the kernel says how large it is in `argsz`; it is asked twice when the
/// capabilities do not fit the bare structure).
pub(crate) fn container_iommu_info(container: &Container) -> Result<Vec<u8>, Errno> {
    let mut info = vfio_iommu_type1_info {
        argsz: argsz::<vfio_iommu_type1_info>(),
        ..Default::default()
    };
    // SAFETY: `info` is a vfio_iommu_type1_info whose argsz is its own size.
    unsafe { call(container.0.as_fd(), IOMMU_GET_INFO, &mut info) }?;
    let needed = info.argsz as usize;
    let base = std::mem::size_of::<vfio_iommu_type1_info>();
    if needed <= base {
        // SAFETY: vfio_iommu_type1_info is plain old data without padding (4+4+8+4+4 bytes),
        // so all its bytes are initialized; the slice lives while `info` does.
        let bytes =
            unsafe { std::slice::from_raw_parts(std::ptr::from_ref(&info).cast::<u8>(), base) };
        return Ok(bytes.to_vec());
    }
    // u64 words keep the buffer aligned for the structure and its 64-bit capability fields.
    let mut words = vec![0u64; needed.div_ceil(8)];
    let header = vfio_iommu_type1_info {
        argsz: info.argsz,
        ..Default::default()
    };
    let buffer = words.as_mut_ptr().cast::<vfio_iommu_type1_info>();
    // SAFETY: `words` holds at least `needed` > size_of::<vfio_iommu_type1_info>() bytes, is
    // 8-byte aligned, and nothing else refers to it.
    unsafe { buffer.write(header) };
    // SAFETY: `buffer` points at a vfio_iommu_type1_info whose argsz (`needed`) is no larger
    // than the `words` allocation behind it, which outlives the call.
    unsafe { call_raw(container.0.as_fd(), IOMMU_GET_INFO, buffer.cast()) }?;
    Ok(words
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .take(needed)
        .collect())
}

/// `VFIO_IOMMU_MAP_DMA` (read and write): the device may reach `size` bytes at process address
/// `vaddr` at IOVA `iova`.
///
/// # Safety
/// The `size` bytes at `vaddr` must stay mapped in the process, with no Rust reference to them,
/// until [`container_dma_unmap`] of the range returns: the device may access them until then.
pub(crate) unsafe fn container_dma_map(
    container: &Container,
    iova: u64,
    vaddr: usize,
    size: u64,
) -> Result<(), Errno> {
    let mut map = vfio_iommu_type1_dma_map {
        argsz: argsz::<vfio_iommu_type1_dma_map>(),
        flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        vaddr: vaddr as u64,
        iova,
        size,
    };
    // SAFETY: `map` is a vfio_iommu_type1_dma_map with argsz its own size; the caller keeps
    // the memory it names alive and unreferenced while mapped.
    unsafe { call(container.0.as_fd(), IOMMU_MAP_DMA, &mut map) }.map(drop)
}

/// `VFIO_IOMMU_UNMAP_DMA` of `size` bytes at `iova`; returns the bytes the kernel unmapped.
pub(crate) fn container_dma_unmap(
    container: &Container,
    iova: u64,
    size: u64,
) -> Result<u64, Errno> {
    let mut unmap = vfio_iommu_type1_dma_unmap {
        argsz: argsz::<vfio_iommu_type1_dma_unmap>(),
        iova,
        size,
        ..Default::default()
    };
    // SAFETY: `unmap` is a vfio_iommu_type1_dma_unmap (no flags, so no bitmap follows) with
    // argsz its own size; the kernel writes the unmapped size back into it.
    unsafe { call(container.0.as_fd(), IOMMU_UNMAP_DMA, &mut unmap) }?;
    Ok(unmap.size)
}

// ----- group ---------------------------------------------------------------------------------

/// An open VFIO group (`/dev/vfio/N` or `/dev/vfio/noiommu-N`); closed on drop.
#[derive(Debug)]
pub(crate) struct Group(OwnedFd);

/// Open the group device at `path`.
pub(crate) fn group_open(path: &Path) -> Result<Group, Errno> {
    open_rw(path).map(Group)
}

/// `VFIO_GROUP_GET_STATUS`: the group's flags (`VFIO_GROUP_FLAGS_*`).
pub(crate) fn group_status(group: &Group) -> Result<u32, Errno> {
    let mut status = vfio_group_status {
        argsz: argsz::<vfio_group_status>(),
        flags: 0,
    };
    // SAFETY: `status` is a vfio_group_status with argsz its own size.
    unsafe { call(group.0.as_fd(), GROUP_GET_STATUS, &mut status) }?;
    Ok(status.flags)
}

/// `VFIO_GROUP_SET_CONTAINER`: attach the group to `container`.
pub(crate) fn group_set_container(group: &Group, container: &Container) -> Result<(), Errno> {
    let mut fd: RawFd = container.0.as_raw_fd();
    // SAFETY: VFIO_GROUP_SET_CONTAINER reads one int, the container's file descriptor, which
    // stays open for the call (borrowed from `container`).
    unsafe { call(group.0.as_fd(), GROUP_SET_CONTAINER, &mut fd) }.map(drop)
}

/// `VFIO_GROUP_UNSET_CONTAINER`: detach the group from its container (fails with `EBUSY`
/// while a device of the group is open).
pub(crate) fn group_unset_container(group: &Group) -> Result<(), Errno> {
    // SAFETY: VFIO_GROUP_UNSET_CONTAINER takes no argument and writes no memory.
    unsafe { call_int(group.0.as_fd(), GROUP_UNSET_CONTAINER, 0) }.map(drop)
}

/// `VFIO_GROUP_GET_DEVICE_FD`: open the device at PCI address `address` in the group.
pub(crate) fn group_device(group: &Group, address: &str) -> Result<Device, Errno> {
    let name = CString::new(address).map_err(|_| Errno::INVAL)?;
    // SAFETY: VFIO_GROUP_GET_DEVICE_FD reads a NUL-terminated device name, which `name` holds
    // for the duration of the call; it writes no process memory.
    let fd = unsafe {
        call_raw(
            group.0.as_fd(),
            GROUP_GET_DEVICE_FD,
            name.as_ptr().cast_mut().cast(),
        )
    }?;
    // SAFETY: on success VFIO_GROUP_GET_DEVICE_FD returns a new file descriptor that nothing
    // else owns.
    Ok(Device(unsafe { OwnedFd::from_raw_fd(fd) }))
}

// ----- device --------------------------------------------------------------------------------

/// An open VFIO device; closed on drop.
#[derive(Debug)]
pub(crate) struct Device(OwnedFd);

/// `VFIO_DEVICE_GET_INFO`.
pub(crate) fn device_info(device: &Device) -> Result<vfio_device_info, Errno> {
    let mut info = vfio_device_info {
        argsz: argsz::<vfio_device_info>(),
        ..Default::default()
    };
    // SAFETY: `info` is a vfio_device_info with argsz its own size.
    unsafe { call(device.0.as_fd(), DEVICE_GET_INFO, &mut info) }?;
    Ok(info)
}

/// `VFIO_DEVICE_GET_REGION_INFO` of region `index`.
pub(crate) fn device_region_info(device: &Device, index: u32) -> Result<vfio_region_info, Errno> {
    let mut info = vfio_region_info {
        argsz: argsz::<vfio_region_info>(),
        index,
        ..Default::default()
    };
    // SAFETY: `info` is a vfio_region_info with argsz its own size (the kernel writes no
    // capabilities past argsz).
    unsafe { call(device.0.as_fd(), DEVICE_GET_REGION_INFO, &mut info) }?;
    Ok(info)
}

/// `VFIO_DEVICE_GET_IRQ_INFO` of interrupt index `index`.
pub(crate) fn device_irq_info(device: &Device, index: u32) -> Result<vfio_irq_info, Errno> {
    let mut info = vfio_irq_info {
        argsz: argsz::<vfio_irq_info>(),
        index,
        ..Default::default()
    };
    // SAFETY: `info` is a vfio_irq_info with argsz its own size.
    unsafe { call(device.0.as_fd(), DEVICE_GET_IRQ_INFO, &mut info) }?;
    Ok(info)
}

/// `VFIO_DEVICE_SET_IRQS` with a header and `data` (32-bit words: eventfds, or nothing).
fn set_irqs(
    device: &Device,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    data: &[i32],
) -> Result<(), Errno> {
    let header = std::mem::size_of::<vfio_irq_set>() / 4;
    let mut words = vec![0u32; header + data.len()];
    let size = u32::try_from(words.len() * 4).map_err(|_| Errno::INVAL)?;
    words[..header].copy_from_slice(&[size, flags, index, start, count]);
    for (word, fd) in words[header..].iter_mut().zip(data) {
        *word = u32::from_ne_bytes(fd.to_ne_bytes());
    }
    // SAFETY: `words` is 4-byte aligned and starts with the five u32 fields of a vfio_irq_set
    // (argsz, flags, index, start, count) followed by `data.len()` eventfds, argsz being the
    // whole buffer; it outlives the call.
    unsafe { call_raw(device.0.as_fd(), DEVICE_SET_IRQS, words.as_mut_ptr().cast()) }.map(drop)
}

/// `VFIO_DEVICE_SET_IRQS` `DATA_EVENTFD | ACTION_TRIGGER`: vector `i` of interrupt index `index`
/// signals `fds[i]`.
pub(crate) fn device_set_irq_eventfds(
    device: &Device,
    index: u32,
    fds: &[&EventFd],
) -> Result<(), Errno> {
    let raw: Vec<i32> = fds.iter().map(|fd| fd.0.as_raw_fd()).collect();
    let count = u32::try_from(raw.len()).map_err(|_| Errno::INVAL)?;
    set_irqs(
        device,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        index,
        0,
        count,
        &raw,
    )
}

/// `VFIO_DEVICE_SET_IRQS` `DATA_NONE | ACTION_TRIGGER` with count 0: turn interrupt index
/// `index` off and release its eventfds.
pub(crate) fn device_disable_irqs(device: &Device, index: u32) -> Result<(), Errno> {
    set_irqs(
        device,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        index,
        0,
        0,
        &[],
    )
}

/// `VFIO_DEVICE_SET_IRQS` `DATA_NONE | ACTION_UNMASK` of vector `vector` of index `index`
/// (INTx is masked by VFIO each time it fires).
pub(crate) fn device_unmask_irq(device: &Device, index: u32, vector: u32) -> Result<(), Errno> {
    set_irqs(
        device,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
        index,
        vector,
        1,
        &[],
    )
}

/// `VFIO_DEVICE_RESET`.
pub(crate) fn device_reset(device: &Device) -> Result<(), Errno> {
    // SAFETY: VFIO_DEVICE_RESET takes no argument and writes no memory.
    unsafe { call_int(device.0.as_fd(), DEVICE_RESET, 0) }.map(drop)
}

/// `pread` at `offset` of the device file (a region's offset plus the offset in the region).
pub(crate) fn device_pread(device: &Device, offset: u64, out: &mut [u8]) -> Result<usize, Errno> {
    rustix::io::pread(&device.0, out, offset)
}

/// `pwrite` at `offset` of the device file.
pub(crate) fn device_pwrite(device: &Device, offset: u64, data: &[u8]) -> Result<usize, Errno> {
    rustix::io::pwrite(&device.0, data, offset)
}

/// A shared read-write mapping of part of a device region; unmapped on drop.
#[derive(Debug)]
pub(crate) struct RegionMap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is process memory (device registers) that is not tied to a thread; the
// layer above accesses it only through volatile reads and writes of raw pointers.
unsafe impl Send for RegionMap {}
// SAFETY: as above: shared use only makes volatile accesses, never Rust references.
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
        // SAFETY: `ptr` and `len` are exactly those of the mmap made by `device_mmap`, owned by
        // this value; the layer above keeps no pointer into it past the value's life.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// `mmap` (shared, read-write) `len` bytes of the device file at `offset` (a region's offset).
pub(crate) fn device_mmap(device: &Device, offset: u64, len: usize) -> Result<RegionMap, Errno> {
    // SAFETY: a null hint lets the kernel choose a fresh range, so no existing memory is
    // replaced; the mapping is owned by the returned RegionMap, which unmaps it.
    let ptr = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::SHARED,
            &device.0,
            offset,
        )
    }?;
    let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(Errno::NOMEM)?;
    Ok(RegionMap { ptr, len })
}

// ----- eventfds ------------------------------------------------------------------------------

/// A non-blocking eventfd; closed on drop.
#[derive(Debug)]
pub(crate) struct EventFd(OwnedFd);

/// A new eventfd (counter 0, non-blocking, close-on-exec).
pub(crate) fn eventfd_new() -> Result<EventFd, Errno> {
    rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map(EventFd)
}

/// Add 1 to the eventfd's counter (wake its reader).
pub(crate) fn eventfd_signal(fd: &EventFd) -> Result<(), Errno> {
    rustix::io::write(&fd.0, &1u64.to_ne_bytes()).map(drop)
}

/// Read and clear the eventfd's counter: the signals since the last read (0 if none).
pub(crate) fn eventfd_take(fd: &EventFd) -> Result<u64, Errno> {
    let mut counter = [0u8; 8];
    match rustix::io::read(&fd.0, &mut counter) {
        Ok(8) => Ok(u64::from_ne_bytes(counter)),
        Ok(_) => Err(Errno::IO),
        Err(Errno::AGAIN) => Ok(0),
        Err(e) => Err(e),
    }
}

/// Block until at least one of `fds` is readable; `ready[i]` says whether `fds[i]` is.
/// Interrupted waits are resumed.
pub(crate) fn eventfd_wait(fds: &[&EventFd], ready: &mut [bool]) -> Result<(), Errno> {
    let mut polls: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(&fd.0, PollFlags::IN))
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
