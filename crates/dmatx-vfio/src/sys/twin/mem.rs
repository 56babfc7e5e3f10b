//! Test twin of the memory system calls: the same signatures over the process allocator.
//!
//! Memory is real (page-aligned blocks of the global allocator), so the layers above copy real
//! bytes. What the kernel would decide is a knob: make the next `mmap`, `mlock` or pagemap
//! read fail, and choose the physical address each page reports (by default its virtual
//! address). The knobs are per thread, so tests running in parallel do not see each other's;
//! the count of locked pages outstanding is kept per allocating thread (a block freed on
//! another thread still lowers its allocator's count).

use std::alloc::Layout;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{Errno, ErrorKind, VfioError, VfioResult};

/// The page size of the twin.
const PAGE: usize = 4096;

/// The physical address a page reports, from its virtual address.
pub(crate) type PhysicalOf = Rc<dyn Fn(usize) -> u64>;

/// The knobs of one thread.
#[derive(Default)]
struct Knobs {
    fail_mmap: u64,
    fail_mlock: u64,
    fail_pagemap: u64,
    physical: Option<PhysicalOf>,
}

thread_local! {
    static KNOBS: RefCell<Knobs> = RefCell::new(Knobs::default());
    /// Pages locked by this thread's allocations and not freed yet.
    static LOCKED: Arc<AtomicI64> = Arc::new(AtomicI64::new(0));
}

/// Live blocks: address → (bytes, the allocating thread's locked-page count).
static BLOCKS: Mutex<BTreeMap<usize, (usize, Arc<AtomicI64>)>> = Mutex::new(BTreeMap::new());

fn take(counter: &mut u64) -> bool {
    if *counter > 0 {
        *counter -= 1;
        true
    } else {
        false
    }
}

/// Make this thread's next `n` allocations fail at `mmap` (`ENOMEM`).
pub(crate) fn fail_next_mmap(n: u64) {
    KNOBS.with(|k| k.borrow_mut().fail_mmap = n);
}

/// Make this thread's next `n` allocations fail at `mlock` (`EAGAIN`, as an exceeded
/// `RLIMIT_MEMLOCK` does).
pub(crate) fn fail_next_mlock(n: u64) {
    KNOBS.with(|k| k.borrow_mut().fail_mlock = n);
}

/// Make this thread's next `n` pagemap reads fail as an unprivileged read does.
pub(crate) fn fail_next_pagemap(n: u64) {
    KNOBS.with(|k| k.borrow_mut().fail_pagemap = n);
}

/// Have pages report `f(page address)` as their physical address on this thread (`None`: their
/// virtual address).
pub(crate) fn set_physical(f: Option<PhysicalOf>) {
    KNOBS.with(|k| k.borrow_mut().physical = f);
}

/// Pages locked by this thread's allocations and not freed yet.
pub(crate) fn locked_pages() -> i64 {
    // ORDERING: Relaxed: a count read by the thread that made the allocations, or after a
    // join with the thread that freed them.
    LOCKED.with(|l| l.load(Relaxed))
}

/// As the real one: the page size is 4096.
pub(crate) fn check_page_size() -> VfioResult<()> {
    Ok(())
}

/// As the real one: `bytes` of zeroed, page-aligned memory, counted as locked.
pub(crate) fn alloc_locked(bytes: usize) -> VfioResult<usize> {
    if bytes == 0 || !bytes.is_multiple_of(PAGE) {
        return Err(VfioError::new(
            ErrorKind::InvalidArgument,
            "memory",
            format!("{bytes} bytes is not a non-zero multiple of the page size"),
        ));
    }
    let (fail_mmap, fail_mlock) = KNOBS.with(|k| {
        let mut k = k.borrow_mut();
        let mmap = take(&mut k.fail_mmap);
        (mmap, !mmap && take(&mut k.fail_mlock))
    });
    if fail_mmap {
        return Err(VfioError::new(
            ErrorKind::Memory,
            "memory",
            format!("cannot map {bytes} bytes of anonymous memory"),
        )
        .with_errno(Errno::NOMEM));
    }
    if fail_mlock {
        return Err(VfioError::new(
            ErrorKind::Memory,
            "memory",
            format!("cannot lock {bytes} bytes (RLIMIT_MEMLOCK too low?)"),
        )
        .with_errno(Errno::AGAIN));
    }
    let layout = Layout::from_size_align(bytes, PAGE).map_err(|_| {
        VfioError::new(
            ErrorKind::Memory,
            "memory",
            format!("{bytes} bytes is too large"),
        )
    })?;
    // SAFETY: the layout has a non-zero size (checked above).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        return Err(
            VfioError::new(ErrorKind::Memory, "memory", "out of memory").with_errno(Errno::NOMEM)
        );
    }
    let addr = ptr.expose_provenance();
    let counter = LOCKED.with(Arc::clone);
    // ORDERING: Relaxed: a statistic (see `locked_pages`).
    counter.fetch_add((bytes / PAGE) as i64, Relaxed);
    BLOCKS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(addr, (bytes, counter));
    Ok(addr)
}

/// As the real one: give a block back.
///
/// # Safety
/// As the real one: `addr` and `bytes` are one live allocation of [`alloc_locked`], unused
/// afterwards.
///
/// # Errors
/// [`ErrorKind::Memory`] (`EINVAL`) if `addr` and `bytes` are not a live allocation; nothing is
/// freed then.
pub(crate) unsafe fn free_locked(addr: usize, bytes: usize) -> VfioResult<()> {
    let mut blocks = BLOCKS.lock().unwrap_or_else(PoisonError::into_inner);
    match blocks.get(&addr) {
        Some((size, _)) if *size == bytes => {}
        _ => {
            return Err(VfioError::new(
                ErrorKind::Memory,
                "memory",
                format!("cannot unmap {bytes} bytes at {addr:#x}: not an allocation"),
            )
            .with_errno(Errno::INVAL));
        }
    }
    let Some((_, counter)) = blocks.remove(&addr) else {
        return Ok(());
    };
    drop(blocks);
    // ORDERING: Relaxed: a statistic (see `locked_pages`).
    counter.fetch_sub((bytes / PAGE) as i64, Relaxed);
    // The layout was valid when the block was allocated with it.
    let layout = Layout::from_size_align(bytes, PAGE).map_err(|_| {
        VfioError::new(
            ErrorKind::Memory,
            "memory",
            format!("{bytes} bytes is too large"),
        )
    })?;
    let ptr: *mut u8 = std::ptr::with_exposed_provenance_mut(addr);
    // SAFETY: `ptr` was returned by `alloc_zeroed` with this layout (the table recorded its
    // size, checked above) and is freed once: its entry was removed under the table's lock.
    unsafe { std::alloc::dealloc(ptr, layout) };
    Ok(())
}

/// As the real one: the physical address of each page from the page of `addr`, as the
/// thread's [`set_physical`] function says.
pub(crate) fn physical_addresses(addr: usize, out: &mut [u64]) -> VfioResult<()> {
    let (fail, physical) = KNOBS.with(|k| {
        let mut k = k.borrow_mut();
        (take(&mut k.fail_pagemap), k.physical.clone())
    });
    if fail {
        return Err(VfioError::new(
            ErrorKind::Memory,
            "/proc/self/pagemap",
            "no permission to read physical addresses (need CAP_SYS_ADMIN)",
        ));
    }
    let first = addr - addr % PAGE;
    for (i, slot) in out.iter_mut().enumerate() {
        let va = first + i * PAGE;
        *slot = match &physical {
            Some(f) => f(va),
            None => va as u64,
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_counted_and_knobs_fire_once() {
        let before = locked_pages();
        let a = alloc_locked(3 * PAGE).unwrap();
        assert_eq!(a % PAGE, 0);
        assert_eq!(locked_pages(), before + 3);
        // SAFETY: a live block of 3 pages, unused afterwards.
        assert!(unsafe { free_locked(a, 2 * PAGE) }.is_err());
        // SAFETY: as above, with its true size.
        unsafe { free_locked(a, 3 * PAGE) }.unwrap();
        assert_eq!(locked_pages(), before);

        fail_next_mlock(1);
        let e = alloc_locked(PAGE).unwrap_err();
        assert_eq!(
            (e.kind(), e.errno()),
            (ErrorKind::Memory, Some(Errno::AGAIN))
        );
        fail_next_mmap(1);
        assert!(alloc_locked(PAGE).is_err());
        assert_eq!(locked_pages(), before);
        assert!(alloc_locked(0).is_err());

        let mut out = [0u64; 2];
        physical_addresses(0x5123, &mut out).unwrap();
        assert_eq!(out, [0x5000, 0x6000]);
        set_physical(Some(Rc::new(|va| 0x1000_0000 + (va as u64 & 0xFFFF))));
        physical_addresses(0x5123, &mut out).unwrap();
        assert_eq!(out, [0x1000_5000, 0x1000_6000]);
        set_physical(None);
        fail_next_pagemap(1);
        assert!(physical_addresses(0x5000, &mut out).is_err());
        assert!(physical_addresses(0x5000, &mut out).is_ok());
    }
}
