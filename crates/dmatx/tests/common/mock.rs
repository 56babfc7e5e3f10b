//! A minimal platform for model checking: map registers are a counter, mapping is arithmetic.
//! Requests that do not fit queue only when `queueing` is on (FIFO; granted by `free`); a test
//! can hold registers hostage. Under `--cfg loom` its lock is loom's, so loom sees the races on
//! the queue (a cancel withdrawing a request against a free granting it).

#![allow(dead_code)]

use dmatx::hal::{
    Adapter, Allocation, AllocationRequest, CommonAllocation, DeviceDescription, MapRegisters,
    Mapping, MemoryDescriptor, Platform, Segment, Waiter, WaiterRef,
};
use dmatx::{BusAddr, Direction, Error, PAGE_SIZE, PhysAddr, Result, SgElement, VirtAddr};
#[cfg(loom)]
use loom::sync::Mutex;
use std::sync::Arc;
#[cfg(not(loom))]
use std::sync::Mutex;

/// Registers in use and mappings live, for the end-of-test checks.
#[derive(Default)]
pub struct Books {
    pub in_use: u32,
    pub live_maps: u32,
    pub maps: u32,
    /// Queue requests that do not fit instead of refusing them.
    pub queueing: bool,
    /// Queued requests: the waiter and the count.
    pub queue: Vec<(Waiter, u32)>,
    /// System mode: the waiter of the transfer the "controller" runs now.
    pub running: Option<WaiterRef>,
    /// System mode: the running transfer was stopped.
    pub stopped: bool,
    /// System mode: (chain offset, length, device offset) of every transfer mapped.
    pub system_maps: Vec<(u64, u64, u64)>,
    /// System mode: adapters asked for, with their channel descriptions.
    pub channels: Vec<dmatx::hal::SystemChannel>,
}

/// The request line the mock platform does not know.
pub const UNKNOWN_REQUEST_LINE: u32 = 0xBAD;

impl std::fmt::Debug for QueueDebug<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} queued", self.0.len())
    }
}

struct QueueDebug<'a>(&'a [(Waiter, u32)]);

#[derive(Clone, Default)]
pub struct MockPlatform {
    pub books: Arc<Mutex<Books>>,
    pub registers: u32,
}

impl MockPlatform {
    pub fn new(registers: u32) -> Self {
        Self {
            books: Arc::default(),
            registers,
        }
    }

    /// A platform whose adapters queue requests that do not fit.
    pub fn queueing(registers: u32) -> Self {
        let p = Self::new(registers);
        p.books.lock().unwrap().queueing = true;
        p
    }

    /// Take `n` registers out of the pool, as another device would.
    pub fn hold(&self, n: u32) -> MapRegisters {
        let mut b = self.books.lock().unwrap();
        assert!(b.in_use + n <= self.registers);
        b.in_use += n;
        MapRegisters::new(0, n)
    }

    /// Return registers taken with `hold`, granting queued requests that fit now.
    pub fn give_back(&self, registers: MapRegisters) {
        free_and_grant(&self.books, registers.count(), self.registers);
    }

    pub fn queued(&self) -> usize {
        self.books.lock().unwrap().queue.len()
    }

    /// The system controller: finish the running transfer, if there is one, calling its
    /// waiter with no lock held. Returns whether one was running.
    pub fn finish_system_transfer(&self) -> bool {
        self.finish_system_transfer_with(dmatx::hal::SystemDmaStatus::Complete)
    }

    /// As `finish_system_transfer`, with `status` (a stopped transfer reports Cancelled
    /// whatever `status` says).
    pub fn finish_system_transfer_with(&self, status: dmatx::hal::SystemDmaStatus) -> bool {
        let (running, stopped) = {
            let mut b = self.books.lock().unwrap();
            (b.running.take(), std::mem::take(&mut b.stopped))
        };
        let status = if stopped {
            dmatx::hal::SystemDmaStatus::Cancelled { moved: 0 }
        } else {
            status
        };
        match running.and_then(|w| w.upgrade()) {
            Some(waiter) => {
                waiter.system_transfer_done(status);
                true
            }
            None => false,
        }
    }

    /// Whether a system transfer is running (mapped and not finished).
    pub fn system_running(&self) -> bool {
        self.books.lock().unwrap().running.is_some()
    }

    /// Every system transfer mapped so far: (chain offset, length, device offset).
    pub fn system_maps(&self) -> Vec<(u64, u64, u64)> {
        self.books.lock().unwrap().system_maps.clone()
    }

    pub fn assert_clean(&self) {
        let b = self.books.lock().unwrap();
        assert_eq!(
            (b.in_use, b.live_maps, b.queue.len()),
            (0, 0, 0),
            "registers, mappings or queued requests left ({:?})",
            QueueDebug(&b.queue)
        );
    }
}

/// Return `n` registers and grant queued requests in order while they fit; waiters are called
/// with no lock held.
fn free_and_grant(books: &Mutex<Books>, n: u32, total: u32) {
    let mut granted = Vec::new();
    {
        let mut b = books.lock().unwrap();
        b.in_use -= n;
        while let Some(&(_, count)) = b.queue.first() {
            if b.in_use + count > total {
                break;
            }
            b.in_use += count;
            let (waiter, count) = b.queue.remove(0);
            granted.push((waiter, count));
        }
    }
    for (waiter, count) in granted {
        waiter.granted(MapRegisters::new(0, count));
    }
}

#[derive(Clone)]
pub struct MockAdapter {
    books: Arc<Mutex<Books>>,
    registers: u32,
}

impl Platform for MockPlatform {
    type Adapter = MockAdapter;
    fn adapter(&self, description: &DeviceDescription) -> Result<MockAdapter> {
        if let Some(channel) = description.system {
            if channel.request_line == UNKNOWN_REQUEST_LINE {
                return Err(Error::InvalidParameter);
            }
            self.books.lock().unwrap().channels.push(channel);
        }
        Ok(MockAdapter {
            books: Arc::clone(&self.books),
            registers: self.registers,
        })
    }
}

impl Adapter for MockAdapter {
    fn map_register_count(&self) -> u32 {
        self.registers
    }
    fn register_waiter(&self) -> Result<()> {
        Ok(())
    }
    fn unregister_waiter(&self) {}
    fn allocate(&self, request: AllocationRequest, waiter: &WaiterRef) -> Result<Allocation> {
        let mut b = self.books.lock().unwrap();
        let n = request.count.get();
        if b.in_use + n > self.registers || !b.queue.is_empty() {
            if !b.queueing || request.immediate || n > self.registers {
                return Err(Error::InsufficientResources);
            }
            let waiter = waiter.upgrade().ok_or(Error::InvalidDeviceState)?;
            b.queue.push((waiter, n));
            return Ok(Allocation::Queued);
        }
        b.in_use += n;
        Ok(Allocation::Granted(dmatx::hal::MapRegisters::new(0, n)))
    }
    fn cancel_allocation(&self, waiter: &WaiterRef) -> bool {
        let mut b = self.books.lock().unwrap();
        let before = b.queue.len();
        b.queue
            .retain(|(w, _)| !std::ptr::addr_eq(Arc::as_ptr(w), waiter.as_ptr()));
        b.queue.len() != before
    }
    fn dispatch_queued(&self) {
        free_and_grant(&self.books, 0, self.registers);
    }
    fn map<D: MemoryDescriptor + ?Sized>(
        &self,
        _: &dmatx::hal::MapRegisters,
        _: &D,
        offset: u64,
        length: u64,
        _: Direction,
        out: &mut [SgElement],
    ) -> Result<Mapping> {
        let mut b = self.books.lock().unwrap();
        b.live_maps += 1;
        b.maps += 1;
        out[0] = SgElement::new(BusAddr::new(offset), length as u32);
        Ok(Mapping {
            bytes: length,
            elements: 1,
        })
    }
    fn map_system<D: MemoryDescriptor + ?Sized>(
        &self,
        registers: &dmatx::hal::MapRegisters,
        buffer: &D,
        offset: u64,
        length: u64,
        direction: Direction,
        device_offset: u64,
        waiter: &WaiterRef,
        out: &mut [SgElement],
    ) -> Result<Mapping> {
        let m = self.map(registers, buffer, offset, length, direction, out)?;
        let mut b = self.books.lock().unwrap();
        assert!(b.running.is_none(), "one transfer at a time on the channel");
        b.running = Some(waiter.clone());
        b.stopped = false;
        b.system_maps.push((offset, m.bytes, device_offset));
        Ok(m)
    }
    fn stop_system(&self, waiter: &WaiterRef) -> dmatx::hal::SystemStop {
        let mut b = self.books.lock().unwrap();
        match &b.running {
            Some(w) if w.ptr_eq(waiter) => {
                if std::mem::replace(&mut b.stopped, true) {
                    dmatx::hal::SystemStop::AlreadyStopped
                } else {
                    dmatx::hal::SystemStop::Stopped
                }
            }
            _ => dmatx::hal::SystemStop::NotRunning,
        }
    }
    fn flush<D: MemoryDescriptor + ?Sized>(
        &self,
        _: &dmatx::hal::MapRegisters,
        _: &D,
        _: u64,
        _: u64,
        _: Direction,
    ) -> Result<()> {
        self.books.lock().unwrap().live_maps -= 1;
        Ok(())
    }
    fn free(&self, registers: dmatx::hal::MapRegisters) {
        free_and_grant(&self.books, registers.count(), self.registers);
    }
    fn allocate_common_buffer(&self, _: u64) -> Result<CommonAllocation> {
        Err(Error::InsufficientResources)
    }
    fn free_common_buffer(&self, _: CommonAllocation) {}
    fn read_common_buffer(&self, _: &CommonAllocation, _: u64, _: &mut [u8]) -> Result<()> {
        Err(Error::InvalidParameter)
    }
    fn write_common_buffer(&self, _: &CommonAllocation, _: u64, _: &[u8]) -> Result<()> {
        Err(Error::InvalidParameter)
    }
}

/// A page-aligned single-segment buffer with made-up frames.
pub struct MockBuffer {
    length: u64,
    frames: Vec<PhysAddr>,
}

impl MockBuffer {
    pub fn new(length: u64) -> Self {
        let pages = length.div_ceil(PAGE_SIZE);
        Self {
            length,
            frames: (0..pages).map(|p| PhysAddr::new(p * PAGE_SIZE)).collect(),
        }
    }
}

// SAFETY: the frames are made-up numbers; the mock platform never touches memory through them.
unsafe impl MemoryDescriptor for MockBuffer {
    fn segment_count(&self) -> usize {
        1
    }
    fn segment(&self, _: usize) -> Segment<'_> {
        Segment {
            va: VirtAddr::new(0),
            length: self.length,
            frames: &self.frames,
        }
    }
}
