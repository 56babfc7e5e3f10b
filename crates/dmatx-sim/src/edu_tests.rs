//! Unit tests of the edu model: every register, the DMA engine's rules, the interrupt.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Weak, mpsc};
use std::time::{Duration, Instant};

use dmatx_hal::{
    Adapter, Allocation, AllocationRequest, AllocationWaiter, Direction, MapRegisters, Platform,
    RegisterWindow, SgElement, Waiter,
};

use crate::edu::edu_reg::*;
use crate::{
    AdapterMode, EDU_BAR0_SIZE, EDU_DMA_BUFFER, EDU_ID, SimAdapter, SimBuffer, SimConfig, SimEdu,
    SimEduConfig, SimPlatform,
};

struct Never;
impl AllocationWaiter for Never {
    fn granted(&self, _: MapRegisters) {}
}

struct Rig {
    sim: SimPlatform,
    adapter: SimAdapter,
    edu: SimEdu,
    waiter: Waiter,
}

fn rig(config: SimEduConfig) -> Rig {
    let sim = SimConfig::new().mode(AdapterMode::Iommu).build().unwrap();
    let adapter = sim.adapter(&SimPlatform::description(28)).unwrap();
    let edu = SimEdu::new(&adapter, config).unwrap();
    Rig {
        sim,
        adapter,
        edu,
        waiter: Arc::new(Never),
    }
}

impl Rig {
    /// Map `buffer` whole for `direction`: its registers and its single bus address.
    fn map(&self, buffer: &SimBuffer, direction: Direction) -> (MapRegisters, u64) {
        let len = dmatx_hal::MemoryDescriptor::total_length(buffer);
        let pages = (buffer.segment_va_offset() + len).div_ceil(4096) as u32;
        let request = AllocationRequest {
            count: pages.try_into().unwrap(),
            immediate: true,
        };
        let weak: Weak<dyn AllocationWaiter> = Arc::downgrade(&self.waiter);
        let Ok(Allocation::Granted(registers)) = self.adapter.allocate(request, &weak) else {
            panic!("registers are free");
        };
        let mut sg = [SgElement::default(); 1];
        let m = self
            .adapter
            .map(&registers, buffer, 0, len, direction, &mut sg)
            .unwrap();
        assert_eq!((m.bytes, m.elements), (len, 1));
        (registers, sg[0].address.get())
    }

    fn unmap(&self, registers: MapRegisters, buffer: &SimBuffer, direction: Direction) {
        let len = dmatx_hal::MemoryDescriptor::total_length(buffer);
        self.adapter
            .flush(&registers, buffer, 0, len, direction)
            .unwrap();
        self.adapter.free(registers);
    }

    fn finish(self) {
        self.edu.shut_down();
        self.sim.check_clean().unwrap();
    }
}

trait PageOffset {
    fn segment_va_offset(&self) -> u64;
}

impl PageOffset for SimBuffer {
    fn segment_va_offset(&self) -> u64 {
        dmatx_hal::MemoryDescriptor::segment(self, 0)
            .va
            .page_offset()
    }
}

fn wait_until(mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn start_dma(bar: &dyn RegisterWindow, src: u64, dst: u64, count: u32, cmd: u32) {
    bar.write32(DMA_SRC, src as u32);
    bar.write32(DMA_DST, dst as u32);
    bar.write32(DMA_COUNT, count);
    bar.write32(DMA_CMD, cmd | CMD_RUN);
}

#[test]
fn identification_liveness_and_unknown_registers() {
    let r = rig(SimEduConfig::default());
    let bar = r.edu.bar0();
    assert_eq!(bar.len(), EDU_BAR0_SIZE);
    assert_eq!(bar.read32(ID), EDU_ID);
    bar.write32(ID, 0);
    assert_eq!(bar.read32(ID), EDU_ID, "read-only");
    for v in [0u32, 1, 0x1234_5678, u32::MAX] {
        bar.write32(LIVENESS, v);
        assert_eq!(bar.read32(LIVENESS), !v);
    }
    assert_eq!(bar.read32(0x40), u32::MAX);
    assert_eq!(bar.read32(0x84), u32::MAX, "the high half of a DMA field");
    assert_eq!(bar.read8(0), u8::MAX);
    bar.write8(LIVENESS, 0);
    assert_eq!(bar.read32(LIVENESS), !u32::MAX, "byte writes are ignored");
    assert_eq!(bar.read32(2), u32::MAX);
    assert_eq!(bar.read32(EDU_BAR0_SIZE), u32::MAX);
    assert_eq!(r.edu.stats().bad_accesses, 4);
    r.finish();
}

#[test]
fn a_wrong_id_can_be_configured() {
    let r = rig(SimEduConfig {
        id: 0x1234,
        ..SimEduConfig::default()
    });
    assert_eq!(r.edu.bar0().read32(ID), 0x1234);
    r.finish();
}

#[test]
fn factorial_sets_computing_until_done_and_can_interrupt() {
    let r = rig(SimEduConfig::default());
    let bar = r.edu.bar0();
    let edges = Arc::new(AtomicU32::new(0));
    let e = Arc::clone(&edges);
    r.edu.set_interrupt_listener(move || {
        e.fetch_add(1, Ordering::SeqCst);
    });
    r.edu.set_hold(true); // Holds DMA only: the factorial still runs.
    bar.write32(FACTORIAL, 5);
    wait_until(|| bar.read32(STATUS) & STATUS_COMPUTING == 0);
    assert_eq!(bar.read32(FACTORIAL), 120);
    assert_eq!(edges.load(Ordering::SeqCst), 0, "no interrupt unless asked");
    bar.write32(STATUS, STATUS_IRQ_FACTORIAL);
    assert_eq!(
        bar.read32(STATUS) & STATUS_IRQ_FACTORIAL,
        STATUS_IRQ_FACTORIAL
    );
    bar.write32(FACTORIAL, 13);
    wait_until(|| bar.read32(STATUS) & STATUS_COMPUTING == 0);
    assert_eq!(bar.read32(FACTORIAL), 1_932_053_504, "13! wraps at 32 bits");
    assert_eq!(bar.read32(IRQ_STATUS), IRQ_FACTORIAL);
    assert_eq!(edges.load(Ordering::SeqCst), 1);
    bar.write32(IRQ_ACK, IRQ_FACTORIAL);
    bar.write32(STATUS, 0);
    bar.write32(FACTORIAL, 0);
    wait_until(|| bar.read32(STATUS) & STATUS_COMPUTING == 0);
    assert_eq!(bar.read32(FACTORIAL), 1);
    assert_eq!(r.edu.stats().factorials, 3);
    r.edu.clear_interrupt_listener();
    r.edu.check_idle().unwrap();
    r.finish();
}

#[test]
fn raise_and_acknowledge_make_a_level_line() {
    let r = rig(SimEduConfig::default());
    let bar = r.edu.bar0();
    let edges = Arc::new(AtomicU32::new(0));
    let e = Arc::clone(&edges);
    r.edu.set_interrupt_listener(move || {
        e.fetch_add(1, Ordering::SeqCst);
    });
    bar.write32(IRQ_RAISE, 0x10);
    assert!(r.edu.line_asserted());
    bar.write32(IRQ_RAISE, 0x20);
    assert_eq!(bar.read32(IRQ_STATUS), 0x30);
    assert_eq!(edges.load(Ordering::SeqCst), 1, "one rising edge");
    bar.write32(IRQ_ACK, 0x10);
    assert!(r.edu.line_asserted());
    bar.write32(IRQ_ACK, 0x20);
    assert!(!r.edu.line_asserted());
    bar.write32(IRQ_RAISE, 0);
    assert!(!r.edu.line_asserted(), "raising nothing raises nothing");
    bar.write32(IRQ_RAISE, 1);
    assert_eq!(edges.load(Ordering::SeqCst), 2);
    bar.write32(IRQ_ACK, 1);
    r.edu.clear_interrupt_listener();
    r.finish();
}

#[test]
fn msi_notifies_every_raise() {
    let r = rig(SimEduConfig {
        msi: true,
        ..SimEduConfig::default()
    });
    let bar = r.edu.bar0();
    let (tx, rx) = mpsc::channel();
    r.edu.set_interrupt_listener(move || {
        let _ = tx.send(());
    });
    bar.write32(IRQ_RAISE, 1);
    bar.write32(IRQ_RAISE, 2);
    assert_eq!(rx.try_iter().count(), 2);
    bar.write32(IRQ_ACK, 3);
    r.edu.clear_interrupt_listener();
    r.finish();
}

#[test]
fn dma_round_trip_through_the_buffer_with_interrupt() {
    let r = rig(SimEduConfig::default());
    let bar = r.edu.bar0();
    let (tx, rx) = mpsc::channel();
    r.edu.set_interrupt_listener(move || {
        let _ = tx.send(());
    });
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let mut src = r.sim.allocate_buffer(4096, 0).unwrap();
    src.write(0, &data).unwrap();
    let (regs, bus) = r.map(&src, Direction::WriteToDevice);
    start_dma(&bar, bus, EDU_DMA_BUFFER, 4096, CMD_IRQ);
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(bar.read32(DMA_CMD) & CMD_RUN, 0);
    assert_eq!(bar.read32(IRQ_STATUS), IRQ_DMA);
    bar.write32(IRQ_ACK, IRQ_DMA);
    r.unmap(regs, &src, Direction::WriteToDevice);
    assert_eq!(r.edu.device_buffer(), data);

    // Back out, from the middle of the buffer, at a page offset.
    let dst = r.sim.allocate_buffer(100, 0x7F0).unwrap();
    let (regs, bus) = r.map(&dst, Direction::ReadFromDevice);
    start_dma(&bar, EDU_DMA_BUFFER + 1000, bus, 100, CMD_TO_RAM | CMD_IRQ);
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    bar.write32(IRQ_ACK, IRQ_DMA);
    r.unmap(regs, &dst, Direction::ReadFromDevice);
    let mut back = vec![0; 100];
    dst.read(0, &mut back).unwrap();
    assert_eq!(back, &data[1000..1100]);
    let s = r.edu.stats();
    assert_eq!((s.dmas_to_device, s.bytes_to_device), (1, 4096));
    assert_eq!((s.dmas_to_ram, s.bytes_to_ram), (1, 100));
    assert_eq!((s.interrupts_raised, s.notifications), (2, 2));
    r.edu.clear_interrupt_listener();
    r.edu.check_idle().unwrap();
    r.finish();
}

#[test]
fn dma_without_the_interrupt_bit_is_polled() {
    let r = rig(SimEduConfig::default());
    let bar = r.edu.bar0();
    r.edu.fill_device_buffer(0, &[9; 16]).unwrap();
    let dst = r.sim.allocate_buffer(16, 0).unwrap();
    let (regs, bus) = r.map(&dst, Direction::ReadFromDevice);
    start_dma(&bar, EDU_DMA_BUFFER, bus, 16, CMD_TO_RAM);
    wait_until(|| bar.read32(DMA_CMD) & CMD_RUN == 0);
    assert!(!r.edu.line_asserted());
    r.unmap(regs, &dst, Direction::ReadFromDevice);
    let mut back = [0; 16];
    dst.read(0, &mut back).unwrap();
    assert_eq!(back, [9; 16]);
    assert_eq!(r.edu.stats().interrupts_raised, 0);
    r.finish();
}

#[test]
fn a_held_dma_reads_busy_and_ignores_register_writes_until_released() {
    let r = rig(SimEduConfig {
        hold: true,
        ..SimEduConfig::default()
    });
    let bar = r.edu.bar0();
    let dst = r.sim.allocate_buffer(8, 0).unwrap();
    let (regs, bus) = r.map(&dst, Direction::ReadFromDevice);
    start_dma(&bar, EDU_DMA_BUFFER, bus, 8, CMD_TO_RAM);
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(bar.read32(DMA_CMD), CMD_RUN | CMD_TO_RAM);
    assert!(r.edu.dma_busy());
    assert!(r.edu.check_idle().is_err());
    bar.write32(DMA_COUNT, 4);
    bar.write32(DMA_CMD, CMD_RUN);
    assert_eq!(bar.read32(DMA_COUNT), 8);
    assert_eq!(r.edu.stats().ignored_writes, 2);
    r.edu.release();
    wait_until(|| !r.edu.dma_busy());
    assert_eq!(r.edu.stats().bytes_to_ram, 8);
    r.unmap(regs, &dst, Direction::ReadFromDevice);
    r.finish();
}

#[test]
fn the_delay_postpones_completion() {
    let r = rig(SimEduConfig {
        dma_delay: Duration::from_millis(30),
        ..SimEduConfig::default()
    });
    let bar = r.edu.bar0();
    let dst = r.sim.allocate_buffer(8, 0).unwrap();
    let (regs, bus) = r.map(&dst, Direction::ReadFromDevice);
    let start = Instant::now();
    start_dma(&bar, EDU_DMA_BUFFER, bus, 8, CMD_TO_RAM);
    wait_until(|| !r.edu.dma_busy());
    assert!(start.elapsed() >= Duration::from_millis(30));
    r.unmap(regs, &dst, Direction::ReadFromDevice);
    r.finish();
}

#[test]
fn a_command_without_the_start_bit_is_ignored() {
    let r = rig(SimEduConfig::default());
    let bar = r.edu.bar0();
    bar.write32(DMA_CMD, CMD_TO_RAM | CMD_IRQ);
    assert_eq!(bar.read32(DMA_CMD), 0);
    assert_eq!(r.edu.stats().commands, 0);
    r.finish();
}

#[test]
fn out_of_range_dmas_are_refused_and_wedge_the_engine() {
    for (device, count) in [
        (EDU_DMA_BUFFER, 0),
        (EDU_DMA_BUFFER - 1, 8),
        (EDU_DMA_BUFFER + 4090, 8),
        (EDU_DMA_BUFFER, 4097),
        (u64::from(u32::MAX), 8),
    ] {
        let r = rig(SimEduConfig::default());
        let bar = r.edu.bar0();
        let dst = r.sim.allocate_buffer(4096, 0).unwrap();
        let (regs, bus) = r.map(&dst, Direction::ReadFromDevice);
        start_dma(&bar, device, bus, count, CMD_TO_RAM | CMD_IRQ);
        wait_until(|| r.edu.stats().refused == 1);
        assert!(r.edu.dma_busy(), "wedged");
        assert!(!r.edu.line_asserted(), "no interrupt");
        assert_eq!(r.edu.stats().bytes_to_ram, 0);
        assert!(r.edu.check_idle().unwrap_err().contains("wedged"));
        r.edu.reset();
        r.edu.check_idle().unwrap();
        r.unmap(regs, &dst, Direction::ReadFromDevice);
        r.finish();
    }
}

#[test]
fn the_erratum_refuses_a_dma_ending_at_the_buffer_end() {
    for erratum in [false, true] {
        let r = rig(SimEduConfig {
            erratum_end_abort: erratum,
            ..SimEduConfig::default()
        });
        let bar = r.edu.bar0();
        let src = r.sim.allocate_buffer(4096, 0).unwrap();
        let (regs, bus) = r.map(&src, Direction::WriteToDevice);
        // 4095 bytes end one byte short of the end: fine either way.
        start_dma(&bar, bus, EDU_DMA_BUFFER, 4095, 0);
        wait_until(|| !r.edu.dma_busy());
        start_dma(&bar, bus, EDU_DMA_BUFFER, 4096, 0);
        wait_until(|| !r.edu.dma_busy() || r.edu.stats().refused == 1);
        assert_eq!(r.edu.stats().refused, u64::from(erratum));
        assert_eq!(r.edu.stats().dmas_to_device, 2 - u64::from(erratum));
        r.edu.reset();
        r.unmap(regs, &src, Direction::WriteToDevice);
        r.finish();
    }
}

#[test]
fn ram_addresses_are_masked_to_28_bits() {
    let r = rig(SimEduConfig::default());
    let bar = r.edu.bar0();
    let dst = r.sim.allocate_buffer(8, 0).unwrap();
    let (regs, bus) = r.map(&dst, Direction::ReadFromDevice);
    assert!(bus <= crate::EDU_DMA_MASK);
    r.edu.fill_device_buffer(0, &[5; 8]).unwrap();
    start_dma(&bar, EDU_DMA_BUFFER, bus | 0x1000_0000, 8, CMD_TO_RAM);
    wait_until(|| !r.edu.dma_busy());
    assert_eq!(r.edu.stats().clamps, 1);
    r.unmap(regs, &dst, Direction::ReadFromDevice);
    let mut back = [0; 8];
    dst.read(0, &mut back).unwrap();
    assert_eq!(back, [5; 8]);
    r.finish();
}

#[test]
fn the_sanitizer_blocks_a_dma_to_unmapped_memory() {
    let r = rig(SimEduConfig::default());
    let bar = r.edu.bar0();
    start_dma(&bar, EDU_DMA_BUFFER, 0x0800_0000, 8, CMD_TO_RAM | CMD_IRQ);
    wait_until(|| !r.edu.dma_busy());
    assert_eq!(r.edu.stats().faults, 1);
    assert_eq!(r.sim.sanitizer_record().len(), 1);
    assert_eq!(bar.read32(IRQ_STATUS), IRQ_DMA, "the DMA still ends");
    bar.write32(IRQ_ACK, IRQ_DMA);
    r.sim.clear_sanitizer();
    r.finish();
}

#[test]
fn shut_down_joins_the_worker_and_drops_held_work() {
    let r = rig(SimEduConfig {
        hold: true,
        ..SimEduConfig::default()
    });
    let bar = r.edu.bar0();
    start_dma(&bar, EDU_DMA_BUFFER, 0x0800_0000, 8, CMD_TO_RAM);
    r.edu.shut_down();
    r.edu.shut_down();
    r.edu.release();
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(r.edu.stats().faults, 0, "nothing runs after shut-down");
    let clone = r.edu.clone();
    drop(r.edu);
    drop(clone);
    // The BAR outlives the worker.
    assert_eq!(bar.read32(ID), EDU_ID);
    r.sim.check_clean().unwrap();
}
