//! Tests of the simulated PCI9656: register semantics, the channel engine walking descriptor
//! chains through the sanitizer, the interrupt line, fault plans, engine modes and counters.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dmatx_hal::{
    Adapter, Allocation, AllocationRequest, AllocationWaiter, CommonAllocation, Direction,
    MapRegisters, PhysAddr, RegisterWindow, SgElement, Waiter,
};

use crate::plx9656::reg::*;
use crate::prelude::*;
use crate::{
    Access, PLX9656_BAR0_SIZE, PLX9656_SRAM_SIZE, Plx9656ChannelState, Plx9656Config, Plx9656Event,
    Plx9656EventKind, Plx9656Fault, Plx9656Mode, Plx9656Outcome, Plx9656Registers, SimPlx9656,
    ViolationKind,
};

const HIGH: u64 = 0x1_0000_0000;

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ salt ^ (i >> 8) as u8)
        .collect()
}

struct Never;

impl AllocationWaiter for Never {
    fn granted(&self, _: MapRegisters) {}
}

/// Map all of `buffer` for `direction`: its registers and SG list.
fn map(
    adapter: &SimAdapter,
    buffer: &SimBuffer,
    direction: Direction,
) -> (MapRegisters, Vec<SgElement>) {
    let waiter: Waiter = Arc::new(Never);
    let pages = u32::try_from(buffer.len().div_ceil(4096)).unwrap() + 1;
    let request = AllocationRequest {
        count: NonZeroU32::new(pages).unwrap(),
        immediate: true,
    };
    let Ok(Allocation::Granted(regs)) = adapter.allocate(request, &Arc::downgrade(&waiter)) else {
        panic!("registers are free")
    };
    let mut sg = vec![SgElement::default(); pages as usize];
    let m = adapter
        .map(&regs, buffer, 0, buffer.len(), direction, &mut sg)
        .unwrap();
    assert_eq!(m.bytes, buffer.len());
    sg.truncate(m.elements);
    (regs, sg)
}

fn unmap(adapter: &SimAdapter, buffer: &SimBuffer, regs: MapRegisters, direction: Direction) {
    adapter
        .flush(&regs, buffer, 0, buffer.len(), direction)
        .unwrap();
    adapter.free(regs);
}

/// A descriptor as it lies in memory (dword 4 = the upper address bits).
fn dte(pci: u64, local: u32, size: u32, desc_ptr: u32) -> [u8; 32] {
    let mut out = [0; 32];
    let words = [pci as u32, local, size, desc_ptr, (pci >> 32) as u32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    out
}

/// A platform, the two adapters of a duplex enabler, the chip, a descriptor buffer per channel
/// (common buffers of the read adapter, as dmatx allocates them) and a count of line edges.
struct Rig {
    sim: SimPlatform,
    read: SimAdapter,
    write: SimAdapter,
    chip: SimPlx9656,
    bar0: Plx9656Registers,
    chains: Vec<CommonAllocation>,
    edges: Arc<AtomicUsize>,
}

fn rig(config: Plx9656Config) -> Rig {
    rig_on(SimPlatform::new(), config)
}

fn rig_on(sim: SimPlatform, config: Plx9656Config) -> Rig {
    let read = sim.adapter(&SimPlatform::description(64)).unwrap();
    let write = sim.adapter(&SimPlatform::description(64)).unwrap();
    let chip = SimPlx9656::duplex(&read, &write, config);
    let chains = (0..2)
        .map(|_| read.allocate_common_buffer(4096).unwrap())
        .collect();
    let edges = Arc::new(AtomicUsize::new(0));
    let e = Arc::clone(&edges);
    chip.set_line_listener(move || {
        e.fetch_add(1, Ordering::SeqCst);
    });
    let bar0 = chip.bar0();
    Rig {
        sim,
        read,
        write,
        chip,
        bar0,
        chains,
        edges,
    }
}

impl Rig {
    /// The descriptor buffer's address as the driver writes it into a 32-bit register.
    fn chain_base(&self, ch: usize) -> u32 {
        self.chains[ch].logical.get() as u32
    }

    fn put_dte(&self, ch: usize, index: usize, bytes: &[u8; 32]) {
        self.read
            .write_common_buffer(&self.chains[ch], 32 * index as u64, bytes)
            .unwrap();
    }

    fn dte_word(&self, ch: usize, index: usize, word: u64) -> u32 {
        let mut b = [0; 4];
        self.read
            .read_common_buffer(&self.chains[ch], 32 * index as u64 + 4 * word, &mut b)
            .unwrap();
        u32::from_le_bytes(b)
    }

    /// Descriptors for `sg` as the sample's EvtProgramDma writes them: local addresses from
    /// `local` on, host location, direction per channel, last on the final one.
    fn build_chain(&self, ch: usize, sg: &[SgElement], mut local: u32) {
        let base = self.chain_base(ch);
        for (i, e) in sg.iter().enumerate() {
            let last = i + 1 == sg.len();
            let next = if last { 0 } else { base + 32 * (i as u32 + 1) };
            let flags = DESC_PCI | if ch == 1 { TO_HOST } else { 0 } | if last { LAST } else { 0 };
            self.put_dte(ch, i, &dte(e.address.get(), local, e.length, next | flags));
            local += e.length;
        }
    }

    /// Program and start channel `ch` as the sample does: DMAMODE (SG, DoneInt, IntToPci and
    /// `extra`), INTCSR enables, DMADPR, then DMACSR Enable | Start.
    fn program(&self, ch: usize, extra: u32) {
        self.bar0
            .write32(DMAMODE[ch], SG_MODE | DONE_INT_ENABLE | INT_TO_PCI | extra);
        let intcsr = self.bar0.read32(INTCSR);
        self.bar0
            .write32(INTCSR, intcsr | PCI_INT_ENABLE | INT_ENABLE[ch]);
        self.bar0
            .write32(DPR[ch], self.chain_base(ch) | DESC_PCI | TERM_COUNT_INT);
        self.start(ch);
    }

    fn start(&self, ch: usize) {
        self.bar0.write8(DMACSR + ch as u64, CSR_ENABLE | CSR_START);
    }

    fn csr(&self, ch: usize) -> u8 {
        self.bar0.read8(DMACSR + ch as u64)
    }

    fn edges(&self) -> usize {
        self.edges.load(Ordering::SeqCst)
    }

    fn free_chains(&mut self) {
        for c in self.chains.drain(..) {
            self.read.free_common_buffer(c);
        }
    }

    fn finish(mut self) {
        self.chip.clear_line_listener();
        self.chip.clear_event_sink();
        self.free_chains();
        self.chip.check_idle().unwrap();
        self.sim.check_clean().unwrap();
    }
}

/// The sample's ISR: read INTCSR; for each active channel read DMACSR and write it back with
/// Clear. Returns the channels claimed.
fn isr(bar0: &Plx9656Registers) -> [bool; 2] {
    let intcsr = bar0.read32(INTCSR);
    let mut claimed = [false; 2];
    for ch in 0..2 {
        if intcsr & INT_ACTIVE[ch] != 0 {
            let csr = bar0.read8(DMACSR + ch as u64);
            bar0.write8(DMACSR + ch as u64, csr | CSR_CLEAR);
            claimed[ch] = true;
        }
    }
    claimed
}

/// A write of `data` to SRAM[local..] on channel 0 through a 3-descriptor chain (a buffer at
/// page offset 0x100 spanning 3 scattered pages). Leaves the interrupt pending.
fn write_three(r: &Rig, data: &[u8], local: u32, extra: u32) {
    let mut b = r.sim.allocate_buffer(data.len() as u64, 0x100).unwrap();
    b.write(0, data).unwrap();
    let (regs, sg) = map(&r.write, &b, Direction::WriteToDevice);
    assert_eq!(sg.len(), 3);
    r.build_chain(0, &sg, local);
    r.program(0, extra);
    unmap(&r.write, &b, regs, Direction::WriteToDevice);
}

// ---------------------------------------------------------------------------------------------
// Registers

#[test]
fn dmacsr_bits_read_as_the_sample_expects() {
    let r = rig(Plx9656Config::default());
    assert_eq!(r.bar0.len(), PLX9656_BAR0_SIZE);
    assert_eq!(r.csr(0), CSR_DONE, "Done at reset");
    assert_eq!(r.csr(1), CSR_DONE);
    assert_eq!(r.bar0.read32(DMACSR) & 0xFFFF, 0x1010);
    // Enable only.
    r.bar0.write8(DMACSR, CSR_ENABLE);
    assert_eq!(r.csr(0), CSR_ENABLE | CSR_DONE);
    // Start, Abort and Clear are write-only; Done cannot be written. SG mode is off and SIZ is
    // 0, so the Start runs an empty block.
    r.bar0.write8(DMACSR, !CSR_DONE);
    assert_eq!(r.csr(0), CSR_ENABLE | CSR_DONE);
    assert_eq!(r.chip.channel_stats(0).starts, 1);
    assert_eq!(r.chip.last_outcome(0), Some(Plx9656Outcome::Complete));
    r.bar0.write8(DMACSR, 0);
    assert_eq!(r.csr(0), CSR_DONE, "Done survives a write of 0");
    // A 32-bit write at 0xA8 reaches both channels' bytes; bytes 0xAA/0xAB are storage.
    r.bar0.write32(DMACSR, 0xABCD_0101);
    assert_eq!(r.bar0.read32(DMACSR), 0xABCD_1111);
    assert_eq!(r.bar0.read8(DMACSR + 2), 0xCD);
    // Start with Enable clear, and a Start in the same byte as Enable, on channel 1.
    r.bar0.write8(DMACSR + 1, CSR_START);
    assert_eq!(r.chip.channel_stats(1).ignored_starts, 1);
    assert_eq!(r.chip.channel_stats(1).starts, 0);
    // Plain storage elsewhere (a mailbox), in bytes and dwords.
    r.bar0.write32(0x40, 0x1234_5678);
    r.bar0.write8(0x41, 0xAA);
    assert_eq!(r.bar0.read32(0x40), 0x1234_AA78);
    assert_eq!(r.chip.peek_register(0x43), 0x1234_AA78, "peek rounds down");
    for off in [
        DMAMODE[1], PADR[0], LADR[1], SIZ[0], DPR[1], DMADAC[0], DMADAC[1],
    ] {
        r.bar0.write32(off, 0x8765_4321);
        assert_eq!(r.bar0.read32(off), 0x8765_4321, "{off:#x}");
        r.bar0.write32(off, 0);
    }
    r.finish();
}

#[test]
fn intcsr_enables_read_write_active_read_only_aborts_write_one_to_clear() {
    let r = rig(Plx9656Config::default());
    r.bar0.write32(INTCSR, u32::MAX);
    let rw = !(INTCSR_READ_ONLY | INTCSR_W1C);
    assert_eq!(r.bar0.read32(INTCSR), rw, "only the enables stick");
    r.bar0.write32(INTCSR, 0);
    // A block transfer from an unmapped host address: a master abort on the data phase.
    r.bar0.write32(DMAMODE[0], DONE_INT_ENABLE);
    r.bar0.write32(PADR[0], 0x1000);
    r.bar0.write32(SIZ[0], 16);
    r.start(0);
    let record = r.sim.sanitizer_record();
    assert_eq!(record.len(), 1);
    assert_eq!(record[0].access, Access::Read);
    assert_eq!(
        record[0].adapter,
        r.write.id(),
        "channel 0 uses the write adapter"
    );
    r.sim.clear_sanitizer();
    assert_eq!(r.chip.last_outcome(0), Some(Plx9656Outcome::DataAbort));
    let aborts = ABORT_ACTIVE | WAS_BUS_MASTER[0];
    assert_eq!(r.bar0.read32(INTCSR), aborts | INT_ACTIVE[0]);
    assert_eq!(r.chip.channel_stats(0).bus_errors, 1);
    // Writing 1 to an active bit does nothing; writing 0 to abort bits does nothing.
    r.bar0.write32(INTCSR, INT_ACTIVE[0]);
    assert_eq!(r.bar0.read32(INTCSR), aborts | INT_ACTIVE[0]);
    // Write-1-to-clear, one bit at a time, also through a byte write.
    r.bar0.write32(INTCSR, ABORT_ACTIVE);
    assert_eq!(r.bar0.read32(INTCSR), WAS_BUS_MASTER[0] | INT_ACTIVE[0]);
    r.bar0.write8(INTCSR + 3, (WAS_BUS_MASTER[0] >> 24) as u8);
    assert_eq!(r.bar0.read32(INTCSR), INT_ACTIVE[0]);
    // Clear in DMACSR drops the active bit.
    r.bar0.write8(DMACSR, CSR_CLEAR);
    assert_eq!(r.bar0.read32(INTCSR), 0);
    assert!(!r.chip.line_asserted(), "never routed to the line");
    assert_eq!(r.edges(), 0);
    r.finish();
}

#[test]
fn soft_reset_holds_registers_at_reset_values_and_idles_channels() {
    let r = rig(Plx9656Config::default().mode(Plx9656Mode::Manual));
    write_three(&r, &pattern(8192, 1), 0, 0);
    assert_eq!(r.chip.channel_state(0), Plx9656ChannelState::Running);
    r.bar0.write32(0x40, 7);
    // Something active on the line first: a spurious interrupt.
    r.chip.raise_spurious();
    assert!(r.chip.line_asserted());
    let cntrl = r.bar0.read32(CNTRL);
    r.bar0.write32(CNTRL, cntrl | SOFT_RESET);
    assert!(r.chip.is_idle(), "the running chain is dropped");
    assert!(!r.chip.line_asserted());
    for off in (0..PLX9656_BAR0_SIZE)
        .step_by(4)
        .filter(|o| *o != CNTRL && *o != DMACSR)
    {
        assert_eq!(r.bar0.read32(off), 0, "{off:#x}");
    }
    assert_eq!(r.bar0.read32(DMACSR), 0x1010);
    // Writes are ignored while the bit is set; a Start does nothing.
    r.bar0.write32(DMAMODE[0], SG_MODE);
    r.bar0.write32(INTCSR, PCI_INT_ENABLE);
    r.start(0);
    assert_eq!(r.bar0.read32(DMAMODE[0]), 0);
    assert_eq!(r.bar0.read32(INTCSR), 0);
    assert_eq!(r.csr(0), CSR_DONE);
    assert_eq!(r.chip.channel_stats(0).starts, 1);
    assert!(!r.chip.step(), "nothing runs");
    // Cleared: registers take writes again and keep their reset values until then.
    r.bar0.write32(CNTRL, cntrl);
    assert_eq!(r.bar0.read32(0x40), 0);
    r.bar0.write32(DMAMODE[0], SG_MODE);
    assert_eq!(r.bar0.read32(DMAMODE[0]), SG_MODE);
    assert_eq!(r.chip.stats().soft_resets, 1);
    let mut sram = vec![0u8; 8192];
    r.chip.sram_read(0, &mut sram).unwrap();
    assert!(
        sram.iter().all(|b| *b == 0),
        "the dropped chain moved nothing"
    );
    r.finish();
}

#[test]
fn bad_register_and_sram_window_accesses_are_recorded() {
    let mut r = rig(Plx9656Config::default());
    assert_eq!(r.bar0.read32(0x6A), u32::MAX, "misaligned");
    assert_eq!(r.bar0.read32(PLX9656_BAR0_SIZE), u32::MAX);
    assert_eq!(r.bar0.read8(PLX9656_BAR0_SIZE), u8::MAX);
    r.bar0.write32(0x41, 1);
    r.bar0.write8(0x1000, 1);
    assert_eq!(r.bar0.read32(0x40), 0, "nothing written");
    assert_eq!(r.chip.peek_register(PLX9656_BAR0_SIZE), u32::MAX);
    let bar2 = r.chip.bar2();
    assert_eq!(bar2.len(), PLX9656_SRAM_SIZE);
    bar2.write32(0x100, 0xDEAD_BEEF);
    bar2.write8(0x104, 0x5A);
    assert_eq!(bar2.read32(0x100), 0xDEAD_BEEF);
    assert_eq!(bar2.read8(0x104), 0x5A);
    let mut back = [0u8; 5];
    r.chip.sram_read(0x100, &mut back).unwrap();
    assert_eq!(back, [0xEF, 0xBE, 0xAD, 0xDE, 0x5A]);
    assert_eq!(bar2.read32(PLX9656_SRAM_SIZE - 2), u32::MAX);
    assert_eq!(bar2.read32(2), u32::MAX);
    assert!(r.chip.sram_read(PLX9656_SRAM_SIZE - 1, &mut back).is_err());
    assert!(r.chip.sram_write(PLX9656_SRAM_SIZE, &[1]).is_err());
    assert_eq!(r.chip.stats().bad_accesses, 7);
    r.free_chains();
    let report = r.sim.check_clean().unwrap_err();
    assert_eq!(report.lines().count(), 7, "{report}");
    assert!(
        report.lines().all(|l| l.starts_with("plx9656: ")),
        "{report}"
    );
    assert!(
        report.contains("32-bit read at BAR0 offset 0x6a"),
        "{report}"
    );
}

// ---------------------------------------------------------------------------------------------
// The engine

#[test]
fn three_descriptor_chains_write_sram_and_read_it_back() {
    let r = rig(Plx9656Config::default());
    let data = pattern(8192, 7);
    write_three(&r, &data, 0x400, 0);
    let mut sram = vec![0u8; 8192];
    r.chip.sram_read(0x400, &mut sram).unwrap();
    assert_eq!(sram, data);
    let mut around = [0u8; 0x400];
    r.chip.sram_read(0, &mut around).unwrap();
    assert!(
        around.iter().all(|b| *b == 0),
        "nothing before the local start"
    );
    assert_eq!(r.csr(0), CSR_ENABLE | CSR_DONE);
    assert!(r.chip.line_asserted());
    assert_eq!(isr(&r.bar0), [true, false]);
    assert!(!r.chip.line_asserted());
    // No clear-count on the write channel: the sizes stay.
    let sizes: Vec<u32> = (0..3).map(|i| r.dte_word(0, i, 2)).collect();
    assert_eq!(sizes.iter().sum::<u32>(), 8192);
    assert_eq!(sizes[0], 4096 - 0x100);
    // The registers hold the last descriptor, counted down.
    assert_eq!(r.bar0.read32(SIZ[0]), 0);
    assert_eq!(r.bar0.read32(LADR[0]), 0x400 + sizes[0] + sizes[1]);
    assert_eq!(r.bar0.read32(DPR[0]), DESC_PCI | LAST);

    // Read it back on channel 1, clear-count mode, into a buffer spanning 3 pages too.
    let b = r.sim.allocate_buffer(8192, 0x100).unwrap();
    let (regs, sg) = map(&r.read, &b, Direction::ReadFromDevice);
    assert_eq!(sg.len(), 3);
    r.build_chain(1, &sg, 0x400);
    r.program(1, CLEAR_COUNT);
    unmap(&r.read, &b, regs, Direction::ReadFromDevice);
    assert_eq!(b.to_vec(), data);
    for i in 0..3 {
        assert_eq!(r.dte_word(1, i, 2), 0, "descriptor {i} cleared");
    }
    assert_eq!(isr(&r.bar0), [false, true]);
    for ch in 0..2 {
        let s = r.chip.channel_stats(ch);
        assert_eq!(
            (
                s.starts,
                s.descriptors_fetched,
                s.bytes_moved,
                s.done_interrupts
            ),
            (1, 3, 8192, 1),
            "channel {ch}"
        );
        assert_eq!(r.chip.last_outcome(ch), Some(Plx9656Outcome::Complete));
    }
    assert_eq!(r.edges(), 2);
    assert_eq!(r.chip.stats().line_assertions, 2);
    assert_eq!(r.write.stats().device_bytes_read, 8192);
    // The read adapter also carried the descriptor fetches and the clear-count write-backs.
    assert_eq!(r.read.stats().device_bytes_written, 8192 + 3 * 4);
    assert_eq!(r.read.stats().device_bytes_read, 6 * 16);
    r.finish();
}

#[test]
fn block_mode_moves_one_block_in_the_direction_of_dpr_bit_3() {
    let r = rig(Plx9656Config::default());
    let mut b = r.sim.allocate_buffer(1024, 0).unwrap();
    b.write(0, &pattern(1024, 3)).unwrap();
    let (regs, sg) = map(&r.write, &b, Direction::WriteToDevice);
    r.bar0.write32(DMAMODE[0], DONE_INT_ENABLE | INT_TO_PCI);
    r.bar0.write32(PADR[0], sg[0].address.get() as u32);
    r.bar0.write32(LADR[0], 0x1000);
    r.bar0.write32(SIZ[0], 1024);
    r.bar0.write32(DPR[0], 0);
    r.start(0);
    unmap(&r.write, &b, regs, Direction::WriteToDevice);
    let mut sram = vec![0u8; 1024];
    r.chip.sram_read(0x1000, &mut sram).unwrap();
    assert_eq!(sram, pattern(1024, 3));
    assert_eq!(r.bar0.read32(SIZ[0]), 0);
    assert_eq!(r.chip.channel_stats(0).descriptors_fetched, 0);
    // Back to the host on channel 1.
    let out = r.sim.allocate_buffer(1024, 0).unwrap();
    let (regs, sg) = map(&r.read, &out, Direction::ReadFromDevice);
    r.bar0.write32(PADR[1], sg[0].address.get() as u32);
    r.bar0.write32(LADR[1], 0x1000);
    r.bar0.write32(SIZ[1], 1024);
    r.bar0.write32(DPR[1], TO_HOST);
    r.start(1);
    unmap(&r.read, &out, regs, Direction::ReadFromDevice);
    assert_eq!(out.to_vec(), pattern(1024, 3));
    assert!(!r.chip.line_asserted(), "INTCSR enables are off");
    r.bar0.write8(DMACSR, CSR_CLEAR);
    r.finish();
}

#[test]
fn descriptors_may_live_in_sram_and_carry_term_count_interrupts() {
    let r = rig(Plx9656Config::default());
    let mut b = r.sim.allocate_buffer(512, 0).unwrap();
    b.write(0, &pattern(512, 9)).unwrap();
    let (regs, sg) = map(&r.write, &b, Direction::WriteToDevice);
    let a = sg[0].address.get();
    // Two descriptors in SRAM at 0x1F000: 256 bytes each, the first with TermCountInt.
    r.chip
        .sram_write(0x1F000, &dte(a, 0, 256, 0x1F020 | TERM_COUNT_INT))
        .unwrap();
    r.chip
        .sram_write(0x1F020, &dte(a + 256, 256, 256, LAST))
        .unwrap();
    // No DoneIntEnable: only the terminal-count interrupt.
    r.bar0
        .write32(DMAMODE[0], SG_MODE | INT_TO_PCI | CLEAR_COUNT);
    r.bar0.write32(INTCSR, PCI_INT_ENABLE | INT_ENABLE[0]);
    r.bar0.write32(DPR[0], 0x1F000);
    r.start(0);
    unmap(&r.write, &b, regs, Direction::WriteToDevice);
    let mut sram = vec![0u8; 512];
    r.chip.sram_read(0, &mut sram).unwrap();
    assert_eq!(sram, pattern(512, 9));
    let mut size = [0u8; 4];
    r.chip.sram_read(0x1F000 + 8, &mut size).unwrap();
    assert_eq!(size, [0; 4], "cleared in SRAM");
    let s = r.chip.channel_stats(0);
    assert_eq!((s.term_count_interrupts, s.done_interrupts), (1, 0));
    assert_eq!(r.edges(), 1);
    assert_eq!(isr(&r.bar0), [true, false]);
    r.finish();
}

#[test]
fn initial_dpr_flags_choose_which_bits_of_the_driver_value_act() {
    for (mask, tc) in [(DESC_PCI, 0), (DESC_PCI | TERM_COUNT_INT, 1)] {
        let r = rig(Plx9656Config::default().initial_dpr_flags(mask));
        write_three(&r, &pattern(8192, 2), 0, 0);
        let s = r.chip.channel_stats(0);
        assert_eq!(
            (s.term_count_interrupts, s.done_interrupts),
            (tc, 1),
            "{mask:#x}"
        );
        isr(&r.bar0);
        r.finish();
    }
    // With bit 0 masked off, the first descriptor is taken from SRAM although the driver
    // said host memory.
    let r = rig(Plx9656Config::default().initial_dpr_flags(0));
    r.chip
        .sram_write(0x1F000, &dte(0, 0, 0, DESC_PCI | LAST))
        .unwrap();
    r.bar0.write32(DMAMODE[0], SG_MODE | DONE_INT_ENABLE);
    r.bar0.write32(DPR[0], 0x1F000 | DESC_PCI);
    r.start(0);
    let s = r.chip.channel_stats(0);
    assert_eq!((s.descriptors_fetched, s.bytes_moved), (1, 0));
    assert_eq!(r.chip.last_outcome(0), Some(Plx9656Outcome::Complete));
    r.bar0.write8(DMACSR, CSR_CLEAR);
    r.finish();
}

#[test]
fn local_addresses_outside_the_sram_are_local_bus_errors() {
    let r = rig(Plx9656Config::default());
    let b = r.sim.allocate_buffer(0x2000, 0).unwrap();
    let (regs, sg) = map(&r.write, &b, Direction::WriteToDevice);
    r.build_chain(0, &sg, 0x1F000);
    r.program(0, 0);
    unmap(&r.write, &b, regs, Direction::WriteToDevice);
    assert_eq!(r.chip.last_outcome(0), Some(Plx9656Outcome::LocalBusError));
    let s = r.chip.channel_stats(0);
    assert_eq!(
        (s.bytes_moved, s.bus_errors, s.done_interrupts),
        (4096, 1, 1)
    );
    assert_ne!(r.bar0.read32(INTCSR) & ABORT_ACTIVE, 0);
    isr(&r.bar0);
    let report = r.sim.check_clean().unwrap_err();
    assert!(report.contains("local-bus error"), "{report}");
}

#[test]
#[cfg_attr(miri, ignore = "65536 descriptor fetches")]
fn a_looping_chain_ends_as_a_descriptor_fetch_abort() {
    let mut r = rig(Plx9656Config::default());
    let base = r.chain_base(0);
    r.put_dte(0, 0, &dte(0, 0, 0, base | DESC_PCI));
    r.program(0, 0);
    assert_eq!(r.chip.last_outcome(0), Some(Plx9656Outcome::DescFetchAbort));
    assert_eq!(r.chip.channel_stats(0).descriptors_fetched, 1 << 16);
    assert_eq!(isr(&r.bar0), [true, false]);
    r.free_chains();
    let report = r.sim.check_clean().unwrap_err();
    assert!(
        report.contains("chain longer than 65536 descriptors"),
        "{report}"
    );
}

// ---------------------------------------------------------------------------------------------
// The interrupt line

#[test]
fn the_line_needs_every_enable_and_rises_once_per_edge() {
    let r = rig(Plx9656Config::default());
    // Empty blocks with DoneIntEnable but not IntToPci: the active bit sets, the line stays low.
    r.bar0.write32(INTCSR, PCI_INT_ENABLE | INT_ENABLE[0]);
    r.bar0.write32(DMAMODE[0], DONE_INT_ENABLE);
    r.start(0);
    assert_ne!(r.bar0.read32(INTCSR) & INT_ACTIVE[0], 0);
    assert!(!r.chip.line_asserted());
    assert_eq!(r.edges(), 0);
    // Routing it raises the line at the register write.
    r.bar0.write32(DMAMODE[0], DONE_INT_ENABLE | INT_TO_PCI);
    assert!(r.chip.line_asserted());
    assert_eq!(r.edges(), 1);
    // Master enable off and on: a new edge.
    let intcsr = r.bar0.read32(INTCSR);
    r.bar0.write32(INTCSR, intcsr & !PCI_INT_ENABLE);
    assert!(!r.chip.line_asserted());
    r.bar0.write32(INTCSR, intcsr);
    assert_eq!(r.edges(), 2);
    // Channel enable off and on: the same.
    r.bar0.write32(INTCSR, intcsr & !INT_ENABLE[0]);
    assert!(!r.chip.line_asserted());
    r.bar0.write32(INTCSR, intcsr);
    assert_eq!(r.edges(), 3);
    // Another completion while the line is high: no new edge.
    r.start(0);
    assert_eq!(r.edges(), 3);
    assert_eq!(r.chip.channel_stats(0).done_interrupts, 2);
    assert_eq!(isr(&r.bar0), [true, false]);
    assert!(!r.chip.line_asserted());
    assert_eq!(r.chip.stats().line_assertions, 3);
    r.finish();
}

#[test]
fn the_listener_runs_without_the_chip_lock_and_may_run_the_isr() {
    let r = rig(Plx9656Config::default());
    let claims = Arc::new(Mutex::new(Vec::new()));
    let (bar0, chip, c) = (r.bar0.clone(), r.chip.clone(), Arc::clone(&claims));
    r.chip.set_line_listener(move || {
        assert!(chip.line_asserted());
        c.lock().unwrap().push(isr(&bar0));
    });
    // Immediate mode: the chain runs, and the ISR runs, inside the Start write.
    write_three(&r, &pattern(8192, 5), 0, 0);
    assert_eq!(*claims.lock().unwrap(), vec![[true, false]]);
    assert!(!r.chip.line_asserted());
    assert_eq!(r.csr(0), CSR_ENABLE | CSR_DONE);
    r.finish();
}

#[test]
fn spurious_interrupts_raise_the_line_with_no_channel_bit() {
    let r = rig(Plx9656Config::default());
    r.chip.raise_spurious();
    assert!(r.chip.line_asserted());
    assert_eq!(r.edges(), 1);
    assert_eq!(
        r.chip.peek_register(INTCSR),
        0,
        "a peek does not acknowledge it"
    );
    assert!(r.chip.line_asserted());
    assert_eq!(isr(&r.bar0), [false, false]);
    assert!(!r.chip.line_asserted(), "the INTCSR read acknowledged it");
    // As a fault on a start, in immediate mode: the spurious edge is delivered before the
    // chain runs, so an ISR sees it alone, then the real one.
    let claims = Arc::new(Mutex::new(Vec::new()));
    let (bar0, c) = (r.bar0.clone(), Arc::clone(&claims));
    r.chip
        .set_line_listener(move || c.lock().unwrap().push(isr(&bar0)));
    r.chip.inject(0, 0, Plx9656Fault::SpuriousIrq, false);
    write_three(&r, &pattern(8192, 5), 0, 0);
    assert_eq!(*claims.lock().unwrap(), vec![[false, false], [true, false]]);
    assert_eq!(r.chip.stats().spurious_interrupts, 2);
    assert_eq!(r.chip.stats().line_assertions, 3);
    r.finish();
}

// ---------------------------------------------------------------------------------------------
// Modes

#[test]
fn deferred_mode_runs_chains_when_virtual_time_passes() {
    let r = rig(Plx9656Config::default().mode(Plx9656Mode::Deferred { latency_ns: 1000 }));
    let mut b = r.sim.allocate_buffer(8192, 0x100).unwrap();
    b.write(0, &pattern(8192, 6)).unwrap();
    let (regs, sg) = map(&r.write, &b, Direction::WriteToDevice);
    r.build_chain(0, &sg, 0);
    r.chip.advance(500);
    r.program(0, 0);
    assert_eq!(r.csr(0), CSR_ENABLE, "busy: Done reads 0");
    assert_eq!(r.chip.channel_state(0), Plx9656ChannelState::Running);
    assert_eq!(r.chip.advance(999), 0);
    assert!(r.chip.check_idle().is_err());
    assert_eq!(r.chip.advance(1), 1);
    assert_eq!(r.chip.now_ns(), 1500);
    unmap(&r.write, &b, regs, Direction::WriteToDevice);
    let mut sram = vec![0u8; 8192];
    r.chip.sram_read(0, &mut sram).unwrap();
    assert_eq!(sram, pattern(8192, 6));
    assert_eq!(r.csr(0), CSR_ENABLE | CSR_DONE);
    assert_eq!(isr(&r.bar0), [true, false]);
    r.finish();
}

#[test]
fn manual_mode_runs_the_oldest_chain_per_step() {
    let r = rig(Plx9656Config::default().mode(Plx9656Mode::Manual));
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = Arc::clone(&events);
    r.chip
        .set_event_sink(move |ev: Plx9656Event| e.lock().unwrap().push(ev));
    let src = {
        let mut b = r.sim.allocate_buffer(3000, 0).unwrap();
        b.write(0, &pattern(3000, 8)).unwrap();
        b
    };
    let dst = r.sim.allocate_buffer(3000, 0).unwrap();
    r.chip.sram_write(0x8000, &pattern(3000, 9)).unwrap();
    let (wregs, wsg) = map(&r.write, &src, Direction::WriteToDevice);
    let (rregs, rsg) = map(&r.read, &dst, Direction::ReadFromDevice);
    r.build_chain(1, &rsg, 0x8000);
    r.build_chain(0, &wsg, 0);
    r.program(1, 0);
    r.program(0, 0);
    assert_eq!(r.chip.advance(1 << 40), 0, "manual chains ignore time");
    assert!(r.chip.step());
    assert_eq!(
        r.chip.channel_state(1),
        Plx9656ChannelState::Idle,
        "channel 1 started first"
    );
    assert_eq!(r.chip.channel_state(0), Plx9656ChannelState::Running);
    assert_eq!(r.chip.run_pending(), 1);
    assert!(!r.chip.step());
    unmap(&r.write, &src, wregs, Direction::WriteToDevice);
    unmap(&r.read, &dst, rregs, Direction::ReadFromDevice);
    assert_eq!(dst.to_vec(), pattern(3000, 9));
    let mut sram = vec![0u8; 3000];
    r.chip.sram_read(0, &mut sram).unwrap();
    assert_eq!(sram, pattern(3000, 8));
    assert_eq!(isr(&r.bar0), [true, true]);
    let kinds: Vec<(Option<usize>, Plx9656EventKind)> = events
        .lock()
        .unwrap()
        .iter()
        .map(|e| (e.channel, e.kind))
        .collect();
    let starts = kinds
        .iter()
        .filter(|(_, k)| matches!(k, Plx9656EventKind::Start { start: 0 }))
        .count();
    assert_eq!(starts, 2);
    assert_eq!(
        kinds
            .iter()
            .filter(|(_, k)| *k == Plx9656EventKind::LineAsserted)
            .count(),
        1,
        "the second completion found the line high"
    );
    for e in events.lock().unwrap().iter() {
        match e.kind {
            Plx9656EventKind::Start { .. } => assert_eq!(e.time_ns, 0),
            Plx9656EventKind::Descriptor { .. } | Plx9656EventKind::Done { .. } => {
                assert_eq!(e.time_ns, 1 << 40)
            }
            _ => {}
        }
    }
    r.finish();
}

#[test]
fn coalesced_channels_become_visible_together() {
    for coalesce in [false, true] {
        let r = rig(Plx9656Config::default()
            .mode(Plx9656Mode::Deferred { latency_ns: 100 })
            .coalesce_channels(coalesce));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (bar0, s) = (r.bar0.clone(), Arc::clone(&seen));
        r.chip
            .set_line_listener(move || s.lock().unwrap().push(isr(&bar0)));
        let mut src = r.sim.allocate_buffer(4096, 0).unwrap();
        src.fill(0xAB);
        let dst = r.sim.allocate_buffer(4096, 0).unwrap();
        let (wregs, wsg) = map(&r.write, &src, Direction::WriteToDevice);
        let (rregs, rsg) = map(&r.read, &dst, Direction::ReadFromDevice);
        r.build_chain(0, &wsg, 0);
        r.build_chain(1, &rsg, 0x10000);
        r.program(0, 0);
        r.chip.advance(50);
        r.program(1, CLEAR_COUNT);
        assert_eq!(r.chip.advance(50), 1, "channel 0 ran");
        if coalesce {
            assert_eq!(r.chip.channel_state(0), Plx9656ChannelState::Held);
            assert_eq!(r.csr(0), CSR_ENABLE, "Done hidden until channel 1 ends");
            assert!(seen.lock().unwrap().is_empty());
        } else {
            assert_eq!(*seen.lock().unwrap(), vec![[true, false]]);
        }
        assert_eq!(r.chip.advance(50), 1, "channel 1 ran");
        let expected = if coalesce {
            vec![[true, true]]
        } else {
            vec![[true, false], [false, true]]
        };
        assert_eq!(*seen.lock().unwrap(), expected, "coalesce {coalesce}");
        unmap(&r.write, &src, wregs, Direction::WriteToDevice);
        unmap(&r.read, &dst, rregs, Direction::ReadFromDevice);
        r.finish();
    }
}

#[test]
fn turning_coalescing_off_releases_a_held_channel() {
    let r = rig(Plx9656Config::default()
        .mode(Plx9656Mode::Manual)
        .coalesce_channels(true));
    r.bar0
        .write32(INTCSR, PCI_INT_ENABLE | INT_ENABLE[0] | INT_ENABLE[1]);
    for (ch, mode) in DMAMODE.into_iter().enumerate() {
        // Empty blocks.
        r.bar0.write32(mode, DONE_INT_ENABLE | INT_TO_PCI);
        r.start(ch);
    }
    assert!(r.chip.step());
    assert_eq!(r.chip.channel_state(0), Plx9656ChannelState::Held);
    r.chip.set_coalesce_channels(false);
    assert_eq!(r.chip.channel_state(0), Plx9656ChannelState::Idle);
    assert!(r.chip.line_asserted());
    // A driver Abort ends a held partner too.
    r.chip.set_coalesce_channels(true);
    isr(&r.bar0);
    r.start(0);
    assert!(
        r.chip.step(),
        "channel 1, the oldest, runs and waits for channel 0"
    );
    assert_eq!(r.chip.channel_state(1), Plx9656ChannelState::Held);
    r.bar0.write8(DMACSR, CSR_ENABLE | CSR_ABORT);
    assert!(r.chip.is_idle());
    assert_eq!(r.chip.last_outcome(0), Some(Plx9656Outcome::Aborted));
    assert_eq!(r.chip.last_outcome(1), Some(Plx9656Outcome::Complete));
    assert_eq!(isr(&r.bar0), [true, true]);
    r.finish();
}

// ---------------------------------------------------------------------------------------------
// Faults

/// Read `len` bytes of SRAM[0..] into a fresh buffer (page offset 0) on channel 1 in
/// clear-count mode; returns the buffer's contents and the descriptor count.
fn read_back(r: &Rig, len: u64) -> (Vec<u8>, usize) {
    let b = r.sim.allocate_buffer(len, 0).unwrap();
    let (regs, sg) = map(&r.read, &b, Direction::ReadFromDevice);
    r.build_chain(1, &sg, 0);
    r.program(1, CLEAR_COUNT);
    unmap(&r.read, &b, regs, Direction::ReadFromDevice);
    (b.to_vec(), sg.len())
}

#[test]
fn stop_after_clears_completed_descriptors_and_keeps_the_current_size() {
    let r = rig(Plx9656Config::default());
    r.chip.sram_write(0, &pattern(8192, 10)).unwrap();
    r.chip
        .inject(1, 0, Plx9656Fault::StopAfter { bytes: 5000 }, false);
    let (got, n) = read_back(&r, 8192);
    assert_eq!(n, 2);
    assert_eq!(r.chip.last_outcome(1), Some(Plx9656Outcome::Stopped));
    assert_eq!(r.dte_word(1, 0, 2), 0, "completed: cleared");
    assert_eq!(r.dte_word(1, 1, 2), 4096, "in progress: keeps its size");
    assert_eq!(
        r.bar0.read32(SIZ[1]),
        4096 - 904,
        "the count register counted down"
    );
    assert_eq!(&got[..5000], &pattern(8192, 10)[..5000]);
    assert!(got[5000..].iter().all(|b| *b == 0));
    let s = r.chip.channel_stats(1);
    assert_eq!((s.bytes_moved, s.done_interrupts), (5000, 1));
    assert_eq!(isr(&r.bar0), [false, true]);
    // One-shot: the next start runs in full.
    let (got, _) = read_back(&r, 8192);
    assert_eq!(got, pattern(8192, 10));
    isr(&r.bar0);
    r.finish();
}

#[test]
fn persistent_stop_after_zero_repeats_until_the_plan_is_cleared() {
    let r = rig(Plx9656Config::default());
    r.chip.sram_write(0, &pattern(4096, 11)).unwrap();
    r.chip
        .inject(1, 1, Plx9656Fault::StopAfter { bytes: 0 }, true);
    let (got, _) = read_back(&r, 4096);
    assert_eq!(got, pattern(4096, 11), "start 0 is before the plan");
    isr(&r.bar0);
    for _ in 0..3 {
        let (got, _) = read_back(&r, 4096);
        assert!(got.iter().all(|b| *b == 0));
        assert_eq!(r.dte_word(1, 0, 2), 4096);
        assert_eq!(isr(&r.bar0), [false, true]);
    }
    r.chip.clear_faults_on(1);
    let (got, _) = read_back(&r, 4096);
    assert_eq!(got, pattern(4096, 11));
    isr(&r.bar0);
    let s = r.chip.channel_stats(1);
    assert_eq!((s.starts, s.done_interrupts, s.bytes_moved), (5, 5, 8192));
    r.finish();
}

#[test]
fn data_abort_stops_with_abort_bits_done_and_interrupt() {
    let r = rig(Plx9656Config::default());
    r.chip
        .inject(0, 0, Plx9656Fault::DataAbort { at_byte: 0 }, false);
    write_three(&r, &pattern(8192, 12), 0, 0);
    assert_eq!(r.chip.last_outcome(0), Some(Plx9656Outcome::DataAbort));
    let intcsr = r.bar0.read32(INTCSR);
    assert_eq!(intcsr & INTCSR_W1C, ABORT_ACTIVE | WAS_BUS_MASTER[0]);
    assert_eq!(r.csr(0), CSR_ENABLE | CSR_DONE);
    let mut sram = vec![0u8; 8192];
    r.chip.sram_read(0, &mut sram).unwrap();
    assert!(sram.iter().all(|b| *b == 0), "nothing moved");
    assert_eq!(isr(&r.bar0), [true, false]);
    // Abort part-way on channel 1: 5000 bytes of a 2-descriptor read.
    r.chip.sram_write(0, &pattern(8192, 13)).unwrap();
    r.chip
        .inject(1, 0, Plx9656Fault::DataAbort { at_byte: 5000 }, false);
    let (got, _) = read_back(&r, 8192);
    assert_eq!(&got[..4096], &pattern(8192, 13)[..4096]);
    assert_eq!(r.chip.channel_stats(1).bytes_moved, 5000);
    assert_eq!(r.chip.channel_stats(1).bus_errors, 1);
    assert_ne!(r.bar0.read32(INTCSR) & WAS_BUS_MASTER[1], 0);
    assert_eq!(isr(&r.bar0), [false, true]);
    r.bar0.write32(INTCSR, r.bar0.read32(INTCSR));
    assert_eq!(
        r.bar0.read32(INTCSR) & INTCSR_W1C,
        0,
        "the sample's RMW would clear them"
    );
    r.finish();
}

#[test]
fn desc_fetch_abort_stops_before_the_named_descriptor() {
    let r = rig(Plx9656Config::default());
    r.chip
        .inject(0, 0, Plx9656Fault::DescFetchAbort { descriptor: 1 }, false);
    write_three(&r, &pattern(8192, 14), 0, 0);
    assert_eq!(r.chip.last_outcome(0), Some(Plx9656Outcome::DescFetchAbort));
    let s = r.chip.channel_stats(0);
    assert_eq!(
        (s.descriptors_fetched, s.bytes_moved, s.bus_errors),
        (1, 4096 - 0x100, 1)
    );
    assert_eq!(
        r.bar0.read32(INTCSR) & INTCSR_W1C,
        ABORT_ACTIVE | WAS_BUS_MASTER[0]
    );
    assert_eq!(isr(&r.bar0), [true, false]);
    r.finish();
}

#[test]
fn a_stall_ends_by_release_or_by_a_driver_abort() {
    let r = rig(Plx9656Config::default());
    r.chip.inject(0, 0, Plx9656Fault::Stall, false);
    let mut b = r.sim.allocate_buffer(8192, 0x100).unwrap();
    b.write(0, &pattern(8192, 15)).unwrap();
    let (regs, sg) = map(&r.write, &b, Direction::WriteToDevice);
    r.build_chain(0, &sg, 0);
    r.program(0, 0);
    assert_eq!(r.chip.channel_state(0), Plx9656ChannelState::Stalled);
    assert_eq!(r.csr(0), CSR_ENABLE);
    assert_eq!(r.chip.advance(1 << 30), 0);
    assert!(!r.chip.step());
    let report = r.chip.check_idle().unwrap_err();
    assert!(report.contains("Stalled"), "{report}");
    // A Start on the busy channel is ignored.
    r.start(0);
    assert_eq!(r.chip.channel_stats(0).ignored_starts, 1);
    assert_eq!(r.chip.release_stalled(), 1);
    let mut sram = vec![0u8; 8192];
    r.chip.sram_read(0, &mut sram).unwrap();
    assert_eq!(sram, pattern(8192, 15));
    assert_eq!(isr(&r.bar0), [true, false]);
    // Persistent from start 1: the driver aborts it.
    r.chip.inject(0, 1, Plx9656Fault::Stall, true);
    r.chip.sram_write(0, &[0; 8192]).unwrap();
    r.start(0);
    assert_eq!(r.edges(), 1);
    r.bar0.write8(DMACSR, CSR_ABORT);
    assert_eq!(r.chip.last_outcome(0), Some(Plx9656Outcome::Aborted));
    assert_eq!(r.csr(0), CSR_DONE);
    assert_eq!(r.edges(), 2, "Done plus interrupt");
    r.chip.sram_read(0, &mut sram).unwrap();
    assert!(sram.iter().all(|b| *b == 0), "nothing moved");
    assert_eq!(r.chip.channel_stats(0).aborts, 1);
    assert_eq!(r.bar0.read32(INTCSR) & INTCSR_W1C, 0, "not a bus error");
    isr(&r.bar0);
    unmap(&r.write, &b, regs, Direction::WriteToDevice);
    r.chip.clear_faults();
    r.finish();
}

#[test]
fn drop_irq_drops_the_next_done_interrupts_but_not_done() {
    let r = rig(Plx9656Config::default());
    r.chip.inject(0, 0, Plx9656Fault::DropIrq { n: 2 }, false);
    for run in 0..3 {
        write_three(&r, &pattern(8192, run), 0, 0);
        assert_eq!(r.csr(0), CSR_ENABLE | CSR_DONE);
        assert_eq!(r.chip.line_asserted(), run == 2, "run {run}");
    }
    let s = r.chip.channel_stats(0);
    assert_eq!((s.dropped_interrupts, s.done_interrupts), (2, 1));
    assert_eq!(isr(&r.bar0), [true, false]);
    assert_eq!(r.edges(), 1);
    r.finish();
}

#[test]
fn ignore_clear_count_keeps_every_size() {
    let r = rig(Plx9656Config::default());
    r.chip.sram_write(0, &pattern(8192, 16)).unwrap();
    r.chip.inject(1, 0, Plx9656Fault::IgnoreClearCount, false);
    let (got, n) = read_back(&r, 8192);
    assert_eq!(got, pattern(8192, 16));
    for i in 0..n {
        assert_eq!(r.dte_word(1, i, 2), 4096);
    }
    isr(&r.bar0);
    read_back(&r, 8192);
    assert_eq!(r.dte_word(1, 0, 2), 0, "one-shot");
    isr(&r.bar0);
    r.finish();
}

// ---------------------------------------------------------------------------------------------
// Addresses above 4 GiB

fn high_sim() -> SimPlatform {
    SimConfig::new()
        .memory(0x1000_0000, 4 << 20)
        .add_region(HIGH, 4 << 20)
        .build()
        .unwrap()
}

#[test]
fn high_addresses_are_truncated_unless_the_high_dword_is_used() {
    // (config, DMAMODE extra, DMADAC, whether the data arrives)
    let cases = [
        (Plx9656Config::default(), 0, 0, false),
        (Plx9656Config::default().honour_desc_high(true), 0, 0, true),
        (Plx9656Config::default(), DAC_CHAIN_LOAD, 0, true),
        (Plx9656Config::default(), 0, 1, true),
    ];
    for (config, extra, dac, arrives) in cases {
        let r = rig_on(high_sim(), config);
        let mut b = r
            .sim
            .allocate_buffer_with(8192, 0x100, Placement::Above(PhysAddr::new(HIGH)))
            .unwrap();
        b.write(0, &pattern(8192, 17)).unwrap();
        let (regs, sg) = map(&r.write, &b, Direction::WriteToDevice);
        assert!(sg.iter().all(|e| e.address.get() >= HIGH));
        assert!(r.chains[0].logical.get() < HIGH, "descriptors below 4 GiB");
        r.build_chain(0, &sg, 0);
        r.bar0.write32(DMADAC[0], dac);
        r.program(0, extra);
        let mut sram = vec![0u8; 8192];
        r.chip.sram_read(0, &mut sram).unwrap();
        if arrives {
            assert_eq!(sram, pattern(8192, 17), "{config:?} {extra:#x} {dac}");
            assert_eq!(r.chip.last_outcome(0), Some(Plx9656Outcome::Complete));
        } else {
            assert!(sram.iter().all(|b| *b == 0));
            assert_eq!(r.chip.last_outcome(0), Some(Plx9656Outcome::DataAbort));
            let record = r.sim.sanitizer_record();
            assert_eq!(record.len(), 1);
            assert_eq!(record[0].bus.get(), sg[0].address.get() & 0xFFFF_FFFF);
            assert_eq!(record[0].kind, ViolationKind::NotMapped);
            r.sim.clear_sanitizer();
        }
        isr(&r.bar0);
        unmap(&r.write, &b, regs, Direction::WriteToDevice);
        r.finish();
    }
}

#[test]
fn descriptors_above_4g_fail_to_fetch() {
    let sim = SimConfig::new().memory(HIGH, 4 << 20).build().unwrap();
    let r = rig_on(sim, Plx9656Config::default().honour_desc_high(true));
    assert!(r.chains[0].logical.get() >= HIGH);
    let mut b = r.sim.allocate_buffer(4096, 0).unwrap();
    b.fill(1);
    let (regs, sg) = map(&r.write, &b, Direction::WriteToDevice);
    r.build_chain(0, &sg, 0);
    r.program(0, 0);
    unmap(&r.write, &b, regs, Direction::WriteToDevice);
    assert_eq!(r.chip.last_outcome(0), Some(Plx9656Outcome::DescFetchAbort));
    assert_eq!(r.chip.channel_stats(0).descriptors_fetched, 0);
    let record = r.sim.sanitizer_record();
    assert_eq!(record.len(), 1);
    assert_eq!(
        record[0].adapter,
        r.read.id(),
        "descriptors go through the read adapter"
    );
    assert_eq!(record[0].bus.get(), r.chains[0].logical.get() & 0xFFFF_FFFF);
    r.sim.clear_sanitizer();
    assert_ne!(r.bar0.read32(INTCSR) & ABORT_ACTIVE, 0);
    isr(&r.bar0);
    r.finish();
}

#[test]
fn a_read_channel_descriptor_writing_to_the_host_through_the_write_adapter_is_blocked() {
    // Channel 0 given a local → PCI descriptor: its adapter only has write-to-device mappings.
    let r = rig(Plx9656Config::default());
    let b = r.sim.allocate_buffer(512, 0).unwrap();
    let (regs, sg) = map(&r.write, &b, Direction::WriteToDevice);
    r.put_dte(
        0,
        0,
        &dte(sg[0].address.get(), 0, 512, DESC_PCI | LAST | TO_HOST),
    );
    r.program(0, 0);
    unmap(&r.write, &b, regs, Direction::WriteToDevice);
    let record = r.sim.sanitizer_record();
    assert_eq!(record.len(), 1);
    assert_eq!(record[0].kind, ViolationKind::WrongDirection);
    r.sim.clear_sanitizer();
    assert_eq!(r.chip.last_outcome(0), Some(Plx9656Outcome::DataAbort));
    isr(&r.bar0);
    r.finish();
}

// ---------------------------------------------------------------------------------------------
// Counters, events, ownership

#[test]
fn events_trace_a_chain_in_virtual_time() {
    let r = rig(Plx9656Config::default().mode(Plx9656Mode::Deferred { latency_ns: 250 }));
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = Arc::clone(&events);
    r.chip
        .set_event_sink(move |ev: Plx9656Event| e.lock().unwrap().push(ev));
    let mut b = r.sim.allocate_buffer(8192, 0x100).unwrap();
    b.fill(0x5C);
    let (regs, sg) = map(&r.write, &b, Direction::WriteToDevice);
    r.build_chain(0, &sg, 0x200);
    r.chip.advance(100);
    r.program(0, 0);
    r.chip.advance(300);
    unmap(&r.write, &b, regs, Direction::WriteToDevice);
    isr(&r.bar0);
    let all = events.lock().unwrap().clone();
    let writes: Vec<(u64, u32, u32)> = all
        .iter()
        .filter_map(|e| match e.kind {
            Plx9656EventKind::RegisterWrite {
                offset,
                value,
                mask,
            } => Some((offset, value, mask)),
            _ => None,
        })
        .collect();
    let base = r.chain_base(0);
    assert_eq!(
        writes,
        vec![
            (DMAMODE[0], SG_MODE | DONE_INT_ENABLE | INT_TO_PCI, u32::MAX),
            (INTCSR, PCI_INT_ENABLE | INT_ENABLE[0], u32::MAX),
            (DPR[0], base | DESC_PCI | TERM_COUNT_INT, u32::MAX),
            (DMACSR, u32::from(CSR_ENABLE | CSR_START), 0xFF),
            (DMACSR, u32::from(CSR_ENABLE | CSR_DONE | CSR_CLEAR), 0xFF),
        ]
    );
    let got: Vec<Plx9656Event> = all
        .into_iter()
        .filter(|e| !matches!(e.kind, Plx9656EventKind::RegisterWrite { .. }))
        .collect();
    let mut local = 0x200;
    let mut expected = vec![Plx9656Event {
        time_ns: 100,
        channel: Some(0),
        kind: Plx9656EventKind::Start { start: 0 },
    }];
    for (i, e) in sg.iter().enumerate() {
        expected.push(Plx9656Event {
            time_ns: 400,
            channel: Some(0),
            kind: Plx9656EventKind::Descriptor {
                address: base + 32 * i as u32,
                pci: e.address.get(),
                local,
                size: e.length,
            },
        });
        local += e.length;
    }
    for (channel, kind) in [
        (
            Some(0),
            Plx9656EventKind::Done {
                bytes: 8192,
                outcome: Plx9656Outcome::Complete,
            },
        ),
        (Some(0), Plx9656EventKind::IrqRaised { done: true }),
        (None, Plx9656EventKind::LineAsserted),
    ] {
        expected.push(Plx9656Event {
            time_ns: 400,
            channel,
            kind,
        });
    }
    assert_eq!(got, expected);
    let s = r.chip.stats();
    assert_eq!(s.channels[0].chains_ended, 1);
    assert_eq!(s.channels[1], Default::default());
    assert_eq!(s.line_assertions, 1);
    r.finish();
}

#[test]
fn the_chip_is_cheap_to_share_and_reports_being_dropped_busy() {
    fn shareable<T: Clone + Send + Sync + 'static>() {}
    shareable::<SimPlx9656>();
    shareable::<Plx9656Registers>();
    shareable::<crate::Plx9656Sram>();
    let r = rig(Plx9656Config::default().mode(Plx9656Mode::Manual));
    r.bar0.write32(DMAMODE[0], 0);
    r.start(0);
    let Rig {
        sim,
        read,
        chip,
        bar0,
        chains,
        ..
    } = r;
    let debug = format!("{chip:?}");
    assert!(debug.contains("Running"), "{debug}");
    chip.clear_line_listener();
    drop((chip, bar0));
    for c in chains {
        read.free_common_buffer(c);
    }
    let report = sim.check_clean().unwrap_err();
    assert!(
        report.contains("plx9656: channel 0 was Running when the chip was dropped"),
        "{report}"
    );
}

#[test]
fn two_driver_threads_and_a_clock_thread_share_the_chip() {
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    const RUNS: u64 = if cfg!(miri) { 3 } else { 40 };
    for mode in [
        Plx9656Mode::Immediate,
        Plx9656Mode::Deferred { latency_ns: 1000 },
    ] {
        let r = rig(Plx9656Config::default().mode(mode));
        let claims = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        // The interrupt controller: ISRs serialized by the interrupt lock, called again while
        // the level-triggered line stays high.
        let (bar0, chip, c) = (r.bar0.clone(), r.chip.clone(), Arc::clone(&claims));
        let interrupt_lock = Mutex::new(());
        r.chip.set_line_listener(move || {
            let _held = interrupt_lock.lock().unwrap();
            while chip.line_asserted() {
                for (ch, claimed) in isr(&bar0).into_iter().enumerate() {
                    if claimed {
                        c[ch].fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
        let mut src = r.sim.allocate_buffer(6000, 0x80).unwrap();
        src.write(0, &pattern(6000, 21)).unwrap();
        let dst = r.sim.allocate_buffer(6000, 0x80).unwrap();
        r.chip.sram_write(0x10000, &pattern(6000, 22)).unwrap();
        let (wregs, wsg) = map(&r.write, &src, Direction::WriteToDevice);
        let (rregs, rsg) = map(&r.read, &dst, Direction::ReadFromDevice);
        let stop = AtomicBool::new(false);
        // INTCSR is shared: enable both channels once, before the drivers start.
        r.bar0
            .write32(INTCSR, PCI_INT_ENABLE | INT_ENABLE[0] | INT_ENABLE[1]);
        let claims = &*claims;
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    r.chip.advance(100);
                    std::thread::yield_now();
                }
            });
            let drivers: Vec<_> = [(0, &wsg, 0), (1, &rsg, 0x10000)]
                .into_iter()
                .map(|(ch, sg, local)| {
                    let r = &r;
                    s.spawn(move || {
                        for _ in 0..RUNS {
                            // Under the "interrupt lock" of this channel's driver: build and
                            // start; then wait for the ISR to have consumed the Done.
                            let before = claims[ch].load(Ordering::SeqCst);
                            r.build_chain(ch, sg, local);
                            let mode = SG_MODE | DONE_INT_ENABLE | INT_TO_PCI | CLEAR_COUNT;
                            r.bar0.write32(DMAMODE[ch], mode);
                            r.bar0.write32(DPR[ch], r.chain_base(ch) | DESC_PCI);
                            r.start(ch);
                            let deadline = Instant::now() + Duration::from_secs(20);
                            while claims[ch].load(Ordering::SeqCst) == before {
                                assert!(Instant::now() < deadline, "channel {ch} never ended");
                                std::thread::yield_now();
                            }
                        }
                    })
                })
                .collect();
            for d in drivers {
                d.join().unwrap();
            }
            stop.store(true, Ordering::SeqCst);
        });
        unmap(&r.write, &src, wregs, Direction::WriteToDevice);
        unmap(&r.read, &dst, rregs, Direction::ReadFromDevice);
        assert_eq!(dst.to_vec(), pattern(6000, 22));
        let mut sram = vec![0u8; 6000];
        r.chip.sram_read(0, &mut sram).unwrap();
        assert_eq!(sram, pattern(6000, 21));
        for (ch, claimed) in claims.iter().enumerate() {
            let s = r.chip.channel_stats(ch);
            assert_eq!((s.starts, s.done_interrupts), (RUNS, RUNS), "{mode:?} {ch}");
            assert_eq!(s.bytes_moved, RUNS * 6000);
            assert_eq!(claimed.load(Ordering::SeqCst) as u64, RUNS);
        }
        r.finish();
    }
}
