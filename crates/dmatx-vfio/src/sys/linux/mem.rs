//! Memory system calls: locked anonymous memory (`mmap` + `mlock`), its release, the page size
//! and the physical address of a page (`/proc/self/pagemap`).
//!
//! Addresses cross this module as integers whose provenance has been exposed: the layer above
//! turns them back into pointers only for copies, and hands them to the IOMMU as numbers.

use std::ffi::c_void;

use rustix::fs::{Mode, OFlags};
use rustix::mm::{MapFlags, ProtFlags};

use crate::error::{ErrorKind, VfioError, VfioResult};

/// The page size dmatx-vfio is written for (map registers, IOVA pages, pagemap entries).
const PAGE: usize = 4096;

/// The pagemap file of this process.
const PAGEMAP: &str = "/proc/self/pagemap";
/// Bits 0–54 of a pagemap entry: the page frame number.
const PFN_MASK: u64 = (1 << 55) - 1;
/// Bit 63 of a pagemap entry: the page is present in memory.
const PRESENT: u64 = 1 << 63;

/// Check that the system's page size is the 4096 bytes dmatx-vfio assumes.
///
/// # Errors
/// [`ErrorKind::Unsupported`] naming the page size found.
pub(crate) fn check_page_size() -> VfioResult<()> {
    let size = rustix::param::page_size();
    if size == PAGE {
        Ok(())
    } else {
        Err(VfioError::new(
            ErrorKind::Unsupported,
            "memory",
            format!("the page size is {size} bytes; dmatx-vfio needs 4096"),
        ))
    }
}

/// `bytes` (a non-zero multiple of 4096) of anonymous, private, read-write memory, populated
/// and locked (`mmap(MAP_POPULATE)` + `mlock`), so its pages stay resident at fixed physical
/// addresses. Returns the address of the first byte, its provenance exposed.
///
/// # Errors
/// [`ErrorKind::Memory`] with the error number if the mapping or the lock fails (the lock
/// usually fails on `RLIMIT_MEMLOCK`); nothing stays mapped then.
pub(crate) fn alloc_locked(bytes: usize) -> VfioResult<usize> {
    if bytes == 0 || !bytes.is_multiple_of(PAGE) {
        return Err(VfioError::new(
            ErrorKind::InvalidArgument,
            "memory",
            format!("{bytes} bytes is not a non-zero multiple of the page size"),
        ));
    }
    // SAFETY: a null hint lets the kernel choose a fresh range: no existing memory is touched.
    let ptr = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            bytes,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::POPULATE,
        )
    }
    .map_err(|e| {
        VfioError::new(
            ErrorKind::Memory,
            "memory",
            format!("cannot map {bytes} bytes of anonymous memory"),
        )
        .with_errno(e)
    })?;
    // SAFETY: `ptr .. ptr + bytes` is the mapping just made, owned here and not yet shared.
    if let Err(e) = unsafe { rustix::mm::mlock(ptr, bytes) } {
        // SAFETY: the same fresh mapping; nothing refers to it.
        let _ = unsafe { rustix::mm::munmap(ptr, bytes) };
        return Err(VfioError::new(
            ErrorKind::Memory,
            "memory",
            format!("cannot lock {bytes} bytes (RLIMIT_MEMLOCK too low?)"),
        )
        .with_errno(e));
    }
    Ok(ptr.expose_provenance())
}

/// Unlock and unmap memory from [`alloc_locked`] (`munlock` + `munmap`).
///
/// # Safety
/// `addr` and `bytes` must be exactly those of one [`alloc_locked`] allocation not freed yet;
/// nothing may use the memory afterwards (no reference, no pointer, no device mapping).
///
/// # Errors
/// [`ErrorKind::Memory`] with the error number if `munmap` fails (the memory may stay mapped).
pub(crate) unsafe fn free_locked(addr: usize, bytes: usize) -> VfioResult<()> {
    let ptr: *mut c_void = std::ptr::with_exposed_provenance_mut(addr);
    // SAFETY: the caller passes one live allocation of `alloc_locked`, which it owned and
    // gives up; unlocking has no effect on its contents.
    let _ = unsafe { rustix::mm::munlock(ptr, bytes) };
    // SAFETY: as above; the caller promises nothing uses the memory after this call.
    unsafe { rustix::mm::munmap(ptr, bytes) }.map_err(|e| {
        VfioError::new(
            ErrorKind::Memory,
            "memory",
            format!("cannot unmap {bytes} bytes at {addr:#x}"),
        )
        .with_errno(e)
    })
}

/// The physical addresses of `out.len()` consecutive pages, the first being the page holding
/// `addr`, read from `/proc/self/pagemap`.
///
/// # Errors
/// [`ErrorKind::Memory`]: the file cannot be opened or read; a page is not present; or a
/// present page reads as frame 0, which is how the kernel hides frame numbers from processes
/// without `CAP_SYS_ADMIN`.
pub(crate) fn physical_addresses(addr: usize, out: &mut [u64]) -> VfioResult<()> {
    let fd = rustix::fs::open(PAGEMAP, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| VfioError::new(ErrorKind::Memory, PAGEMAP, "cannot open it").with_errno(e))?;
    let first = (addr / PAGE) as u64;
    for (i, slot) in out.iter_mut().enumerate() {
        let page = first + i as u64;
        let mut entry = [0u8; 8];
        let read = rustix::io::pread(&fd, &mut entry, page * 8).map_err(|e| {
            VfioError::new(
                ErrorKind::Memory,
                PAGEMAP,
                format!("cannot read the entry of page {:#x}", page * PAGE as u64),
            )
            .with_errno(e)
        })?;
        if read != entry.len() {
            return Err(VfioError::new(
                ErrorKind::Memory,
                PAGEMAP,
                format!("short read of the entry of page {:#x}", page * PAGE as u64),
            ));
        }
        *slot = decode_entry(u64::from_ne_bytes(entry), page * PAGE as u64)?;
    }
    Ok(())
}

/// The physical address a pagemap entry gives for the page at virtual address `va`.
fn decode_entry(entry: u64, va: u64) -> VfioResult<u64> {
    if entry & PRESENT == 0 {
        return Err(VfioError::new(
            ErrorKind::Memory,
            PAGEMAP,
            format!("page {va:#x} is not present"),
        ));
    }
    let pfn = entry & PFN_MASK;
    if pfn == 0 {
        return Err(VfioError::new(
            ErrorKind::Memory,
            PAGEMAP,
            "no permission to read physical addresses (need CAP_SYS_ADMIN)",
        ));
    }
    pfn.checked_mul(PAGE as u64).ok_or_else(|| {
        VfioError::new(
            ErrorKind::Memory,
            PAGEMAP,
            format!("frame {pfn:#x} of page {va:#x} is out of range"),
        )
    })
}
