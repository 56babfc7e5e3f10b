//! A minimal platform for model checking: map registers are a counter, mapping is arithmetic,
//! nothing queues. Its locks are std locks held only for a few instructions with no loom
//! operation inside, so loom never preempts inside them.

#![allow(dead_code)]

use dmatx::hal::{
    Adapter, Allocation, AllocationRequest, CommonAllocation, DeviceDescription, Mapping,
    MemoryDescriptor, Platform, Segment, WaiterRef,
};
use dmatx::{BusAddr, Direction, Error, PAGE_SIZE, PhysAddr, Result, SgElement, VirtAddr};
use std::sync::{Arc, Mutex};

/// Registers in use and mappings live, for the end-of-test checks.
#[derive(Default, Debug)]
pub struct Books {
    pub in_use: u32,
    pub live_maps: u32,
    pub maps: u32,
}

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

    pub fn assert_clean(&self) {
        let b = self.books.lock().unwrap();
        assert_eq!(
            (b.in_use, b.live_maps),
            (0, 0),
            "registers or mappings not returned: {b:?}"
        );
    }
}

#[derive(Clone)]
pub struct MockAdapter {
    books: Arc<Mutex<Books>>,
    registers: u32,
}

impl Platform for MockPlatform {
    type Adapter = MockAdapter;
    fn adapter(&self, _: &DeviceDescription) -> Result<MockAdapter> {
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
    fn allocate(&self, request: AllocationRequest, _: &WaiterRef) -> Result<Allocation> {
        let mut b = self.books.lock().unwrap();
        let n = request.count.get();
        if b.in_use + n > self.registers {
            return Err(Error::InsufficientResources);
        }
        b.in_use += n;
        Ok(Allocation::Granted(dmatx::hal::MapRegisters::new(0, n)))
    }
    fn cancel_allocation(&self, _: &WaiterRef) -> bool {
        false
    }
    fn dispatch_queued(&self) {}
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
        self.books.lock().unwrap().in_use -= registers.count();
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
