//! A simulated PLX PCI9656 bridge as the PLX9x5x KMDF sample drives it (`samples.md` §1.1,
//! §4.1): a 0x200-byte register file (BAR0), 128 KiB of local SRAM (BAR2), two scatter/gather
//! DMA channels and one level-triggered interrupt line.
//!
//! The model and its rules are described on [`SimPlx9656`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use dmatx_hal::{BusAddr, Error, RegisterWindow};

use crate::adapter::SimAdapter;
use crate::memory::lock;
use crate::platform::Shared;
use crate::sanitizer::DeviceView;

/// BAR0's size: the register file.
pub const PLX9656_BAR0_SIZE: u64 = 0x200;
/// BAR2's size: the local SRAM.
pub const PLX9656_SRAM_SIZE: u64 = 0x2_0000;

/// Register offsets and bits the model gives meaning to.
pub(crate) mod reg {
    pub(crate) const INTCSR: u64 = 0x68;
    pub(crate) const CNTRL: u64 = 0x6C;
    pub(crate) const DMAMODE: [u64; 2] = [0x80, 0x94];
    pub(crate) const PADR: [u64; 2] = [0x84, 0x98];
    pub(crate) const LADR: [u64; 2] = [0x88, 0x9C];
    pub(crate) const SIZ: [u64; 2] = [0x8C, 0xA0];
    pub(crate) const DPR: [u64; 2] = [0x90, 0xA4];
    /// The dword holding DMACSR0 (byte 0) and DMACSR1 (byte 1).
    pub(crate) const DMACSR: u64 = 0xA8;
    pub(crate) const DMADAC: [u64; 2] = [0xB4, 0xB8];

    pub(crate) const PCI_INT_ENABLE: u32 = 1 << 8;
    pub(crate) const INT_ENABLE: [u32; 2] = [1 << 18, 1 << 19];
    pub(crate) const INT_ACTIVE: [u32; 2] = [1 << 21, 1 << 22];
    /// PCI abort interrupt active.
    pub(crate) const ABORT_ACTIVE: u32 = 1 << 14;
    /// DMA channel 0 / 1 was bus master during an abort.
    pub(crate) const WAS_BUS_MASTER: [u32; 2] = [1 << 25, 1 << 26];
    pub(crate) const INTCSR_READ_ONLY: u32 =
        (1 << 13) | (1 << 15) | (1 << 20) | (1 << 21) | (1 << 22) | (1 << 23);
    pub(crate) const INTCSR_W1C: u32 = (1 << 14) | (0xF << 24);

    pub(crate) const SOFT_RESET: u32 = 1 << 30;

    pub(crate) const SG_MODE: u32 = 1 << 9;
    pub(crate) const DONE_INT_ENABLE: u32 = 1 << 10;
    pub(crate) const CLEAR_COUNT: u32 = 1 << 16;
    pub(crate) const INT_TO_PCI: u32 = 1 << 17;
    pub(crate) const DAC_CHAIN_LOAD: u32 = 1 << 18;

    pub(crate) const DESC_PCI: u32 = 1 << 0;
    pub(crate) const LAST: u32 = 1 << 1;
    pub(crate) const TERM_COUNT_INT: u32 = 1 << 2;
    pub(crate) const TO_HOST: u32 = 1 << 3;
    pub(crate) const ADDRESS_MASK: u32 = !0xF;
    pub(crate) const SIZE_MASK: u32 = 0x7F_FFFF;

    pub(crate) const CSR_ENABLE: u8 = 1 << 0;
    pub(crate) const CSR_START: u8 = 1 << 1;
    pub(crate) const CSR_ABORT: u8 = 1 << 2;
    pub(crate) const CSR_CLEAR: u8 = 1 << 3;
    pub(crate) const CSR_DONE: u8 = 1 << 4;
}

use reg::*;

/// Descriptors one chain may have before the engine gives up (a looping chain).
const MAX_CHAIN: u32 = 1 << 16;

/// When a started chain runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Plx9656Mode {
    /// Inside the DMACSR write that starts it.
    Immediate,
    /// `latency_ns` of virtual time after the start ([`SimPlx9656::advance`]), or earlier by
    /// [`SimPlx9656::step`] / [`SimPlx9656::run_pending`].
    Deferred {
        /// Virtual nanoseconds from the start to the end of the chain.
        latency_ns: u64,
    },
    /// Only by [`SimPlx9656::step`] or [`SimPlx9656::run_pending`].
    Manual,
}

/// How to build a [`SimPlx9656`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Plx9656Config {
    /// When chains run.
    pub mode: Plx9656Mode,
    /// Take a descriptor's upper 32 address bits from its 5th dword even without DACChainLoad
    /// (default false: from DMADACx, as on the chip). Isolates framework behaviour from the
    /// sample's 32-bit limitation.
    pub honour_desc_high: bool,
    /// Which flag bits (0–3) of the value written to DMADPRx act when a chain starts (default
    /// `0x1`: only DescLocation). Bit 0 picks where the first descriptor is fetched (cleared by
    /// the mask: SRAM); bits 1–3 are merged into the first descriptor's flags.
    pub initial_dpr_flags: u32,
    /// `CoalesceChannels`: a channel that finishes while the other is running keeps its Done
    /// and interrupt bits hidden until the other finishes too, so both become visible before
    /// the line is evaluated.
    pub coalesce_channels: bool,
}

impl Default for Plx9656Config {
    fn default() -> Self {
        Self {
            mode: Plx9656Mode::Immediate,
            honour_desc_high: false,
            initial_dpr_flags: DESC_PCI,
            coalesce_channels: false,
        }
    }
}

impl Plx9656Config {
    /// The default configuration: immediate mode, upper address bits from DMADACx, only
    /// DescLocation of the initial DMADPR honoured, no coalescing.
    pub fn new() -> Self {
        Self::default()
    }

    /// This configuration with engine mode `mode`.
    pub const fn mode(mut self, mode: Plx9656Mode) -> Self {
        self.mode = mode;
        self
    }

    /// This configuration with [`Plx9656Config::honour_desc_high`] set to `on`.
    pub const fn honour_desc_high(mut self, on: bool) -> Self {
        self.honour_desc_high = on;
        self
    }

    /// This configuration with [`Plx9656Config::initial_dpr_flags`] = `mask & 0xF`.
    pub const fn initial_dpr_flags(mut self, mask: u32) -> Self {
        self.initial_dpr_flags = mask & 0xF;
        self
    }

    /// This configuration with [`Plx9656Config::coalesce_channels`] set to `on`.
    pub const fn coalesce_channels(mut self, on: bool) -> Self {
        self.coalesce_channels = on;
        self
    }
}

/// A fault planned for a channel's start ([`SimPlx9656::inject`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Plx9656Fault {
    /// Move only this many bytes of the chain, then end it normally (Done plus interrupt).
    /// Descriptors completed before are cleared in clear-count mode; the one in progress keeps
    /// its size. A chain of at most `bytes` bytes is unaffected.
    StopAfter {
        /// Bytes moved before the stop.
        bytes: u64,
    },
    /// A master abort on the data phase once `at_byte` bytes of the chain have moved: abort
    /// bits, stop, Done plus interrupt. A chain of at most `at_byte` bytes is unaffected.
    DataAbort {
        /// Bytes moved before the abort (0: on the first beat).
        at_byte: u64,
    },
    /// A master abort fetching descriptor number `descriptor` (0-based) of the chain: abort
    /// bits, stop, Done plus interrupt. No effect in block (non-SG) mode or on a shorter chain.
    DescFetchAbort {
        /// The descriptor whose fetch fails.
        descriptor: u32,
    },
    /// The chain never runs until [`SimPlx9656::release_stalled`] (which runs it) or a driver
    /// Abort (which stops it with Done plus interrupt).
    Stall,
    /// The next `n` Done interrupts of the channel (from this start on) are not raised; Done
    /// is still set.
    DropIrq {
        /// Done interrupts to drop.
        n: u32,
    },
    /// Raise the line once, with no channel bit set, when the channel starts (as
    /// [`SimPlx9656::raise_spurious`]).
    SpuriousIrq,
    /// This chain does not write back cleared counts in clear-count mode.
    IgnoreClearCount,
}

/// How a chain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Plx9656Outcome {
    /// It reached its last descriptor (or its block ended).
    Complete,
    /// A [`Plx9656Fault::StopAfter`] ended it early.
    Stopped,
    /// The driver wrote Abort to DMACSR.
    Aborted,
    /// A master abort on a data access (planned, or blocked by the sanitizer).
    DataAbort,
    /// A master abort fetching or writing back a descriptor (planned, or blocked by the
    /// sanitizer).
    DescFetchAbort,
    /// A local address (data or descriptor) outside the SRAM.
    LocalBusError,
}

/// What a channel is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Plx9656ChannelState {
    /// Done is set; nothing runs.
    Idle,
    /// Started; waits to run (deferred or manual mode).
    Running,
    /// Held by a [`Plx9656Fault::Stall`].
    Stalled,
    /// Finished, but held invisible by `CoalesceChannels` until the other channel finishes.
    Held,
}

/// Counters of one channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Plx9656ChannelStats {
    /// Chains started (accepted Start writes).
    pub starts: u64,
    /// Start writes ignored (channel busy, not enabled).
    pub ignored_starts: u64,
    /// Chains ended, in any way (soft resets aside).
    pub chains_ended: u64,
    /// Descriptors fetched.
    pub descriptors_fetched: u64,
    /// Bytes moved between host memory and SRAM.
    pub bytes_moved: u64,
    /// Done interrupts raised (IntActive set at the end of a chain).
    pub done_interrupts: u64,
    /// Terminal-count interrupts raised (descriptor bit 2).
    pub term_count_interrupts: u64,
    /// Done interrupts dropped by [`Plx9656Fault::DropIrq`].
    pub dropped_interrupts: u64,
    /// Chains stopped by a driver Abort.
    pub aborts: u64,
    /// Chains ended by a bus error (data or descriptor master abort, local-bus error).
    pub bus_errors: u64,
}

/// Counters of the chip.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Plx9656Stats {
    /// Per channel.
    pub channels: [Plx9656ChannelStats; 2],
    /// Rising edges of the interrupt line.
    pub line_assertions: u64,
    /// Spurious interrupts raised.
    pub spurious_interrupts: u64,
    /// Soft resets (CNTRL bit 30 set).
    pub soft_resets: u64,
    /// Register or SRAM window accesses out of range or misaligned.
    pub bad_accesses: u64,
}

/// What happened, for a timeline trace ([`SimPlx9656::set_event_sink`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Plx9656Event {
    /// Virtual time in nanoseconds.
    pub time_ns: u64,
    /// The channel, or `None` for a chip-wide event.
    pub channel: Option<usize>,
    /// What happened.
    pub kind: Plx9656EventKind,
}

/// The kinds of [`Plx9656Event`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Plx9656EventKind {
    /// A chain started (its 0-based start number on the channel).
    Start {
        /// The channel's start number.
        start: u64,
    },
    /// A descriptor was fetched and loaded.
    Descriptor {
        /// Where it was fetched from (host bus address or SRAM offset).
        address: u32,
        /// Host address of its data, as the engine uses it.
        pci: u64,
        /// SRAM offset of its data.
        local: u32,
        /// Bytes it describes.
        size: u32,
    },
    /// The channel set Done.
    Done {
        /// Bytes the chain moved.
        bytes: u64,
        /// How it ended.
        outcome: Plx9656Outcome,
    },
    /// The channel's IntActive bit was set.
    IrqRaised {
        /// By the end of the chain (else by a descriptor's terminal-count bit).
        done: bool,
    },
    /// A Done interrupt was dropped by [`Plx9656Fault::DropIrq`].
    IrqDropped,
    /// The interrupt line rose.
    LineAsserted,
    /// A spurious interrupt was raised.
    Spurious,
    /// CNTRL bit 30 was set.
    SoftReset,
    /// The driver wrote a register (before the write's effects; also while in reset, where
    /// the write is then ignored). A byte write shows as its dword with a one-byte mask.
    RegisterWrite {
        /// The dword's offset in BAR0.
        offset: u64,
        /// The bytes written (those outside `mask` are 0).
        value: u32,
        /// Which bytes were written.
        mask: u32,
    },
}

type Listener = Arc<dyn Fn() + Send + Sync>;
type EventSink = Arc<dyn Fn(Plx9656Event) + Send + Sync>;

/// What a chain plans from its faults.
#[derive(Clone, Copy, Debug, Default)]
struct RunPlan {
    /// Bytes left before the budget ends the chain, and whether it ends by a data abort.
    budget: Option<(u64, bool)>,
    fetch_abort: Option<u32>,
    ignore_clear_count: bool,
}

#[derive(Clone, Copy, Debug)]
struct Busy {
    /// Chip-wide start order.
    seq: u64,
    due_ns: u64,
    stalled: bool,
    plan: RunPlan,
}

#[derive(Clone, Copy, Debug)]
struct Finished {
    outcome: Plx9656Outcome,
    bytes: u64,
    term_count_irq: bool,
}

#[derive(Clone, Copy, Debug)]
enum Run {
    Idle,
    Busy(Busy),
    Held(Finished),
}

#[derive(Clone, Copy, Debug)]
struct Channel {
    run: Run,
    drop_irqs: u32,
    last: Option<Plx9656Outcome>,
}

#[derive(Clone, Copy, Debug)]
struct Planned {
    channel: usize,
    start: u64,
    fault: Plx9656Fault,
    persistent: bool,
}

/// Outputs of one locked section, delivered after the lock is released.
struct Outbox {
    trace: bool,
    edges: u32,
    events: Vec<Plx9656Event>,
}

impl Outbox {
    fn event(&mut self, time_ns: u64, channel: Option<usize>, kind: Plx9656EventKind) {
        if self.trace {
            self.events.push(Plx9656Event {
                time_ns,
                channel,
                kind,
            });
        }
    }
}

/// What the engine reaches memory and the platform through.
struct Ports {
    /// Channel 0: the write-to-device adapter; channel 1: the read-from-device adapter.
    channel: [DeviceView; 2],
    descriptors: DeviceView,
    shared: Arc<Shared>,
}

impl Ports {
    fn note(&self, issue: String) {
        lock(&self.shared.issues).push(format!("plx9656: {issue}"));
    }
}

struct Chip {
    regs: [u32; (PLX9656_BAR0_SIZE / 4) as usize],
    enable: [bool; 2],
    done: [bool; 2],
    channels: [Channel; 2],
    sram: Vec<u8>,
    now_ns: u64,
    mode: Plx9656Mode,
    honour_desc_high: bool,
    initial_dpr_flags: u32,
    coalesce: bool,
    faults: Vec<Planned>,
    spurious: bool,
    line: bool,
    next_seq: u64,
    stats: Plx9656Stats,
}

const fn idx(offset: u64) -> usize {
    (offset / 4) as usize
}

/// How one block of a chain ended.
enum BlockEnd {
    Done,
    Budget,
    Fault(Plx9656Outcome),
}

impl Chip {
    fn reg(&self, offset: u64) -> u32 {
        self.regs[idx(offset)]
    }

    fn set_reg(&mut self, offset: u64, value: u32) {
        self.regs[idx(offset)] = value;
    }

    fn in_reset(&self) -> bool {
        self.reg(CNTRL) & SOFT_RESET != 0
    }

    fn csr_byte(&self, ch: usize) -> u32 {
        u32::from(if self.enable[ch] { CSR_ENABLE } else { 0 })
            | u32::from(if self.done[ch] { CSR_DONE } else { 0 })
    }

    /// The dword at `offset` (aligned) as a read sees it, without side effects.
    fn compose(&self, offset: u64) -> u32 {
        if offset == DMACSR {
            (self.reg(DMACSR) & 0xFFFF_0000) | self.csr_byte(0) | (self.csr_byte(1) << 8)
        } else {
            self.reg(offset)
        }
    }

    /// A read of the dword at `offset` (aligned), with its side effects.
    fn read_dword(&mut self, offset: u64, out: &mut Outbox) -> u32 {
        let value = self.compose(offset);
        if offset == INTCSR && self.spurious {
            // The ISR's INTCSR read acknowledges the glitch.
            self.spurious = false;
            self.update_line(out);
        }
        value
    }

    /// A write of the bytes of `value` selected by `mask` into the dword at `offset`
    /// (aligned). Returns, per channel, the start order of a chain to run at once (immediate
    /// mode).
    fn write_dword(
        &mut self,
        offset: u64,
        value: u32,
        mask: u32,
        out: &mut Outbox,
    ) -> [Option<u64>; 2] {
        let mut run_now = [None; 2];
        out.event(
            self.now_ns,
            None,
            Plx9656EventKind::RegisterWrite {
                offset,
                value: value & mask,
                mask,
            },
        );
        if self.in_reset() && offset != CNTRL {
            return run_now;
        }
        let old = self.reg(offset);
        let merged = (old & !mask) | (value & mask);
        match offset {
            INTCSR => {
                let rw = !(INTCSR_READ_ONLY | INTCSR_W1C);
                let mut new = (old & !(mask & rw)) | (value & mask & rw);
                new &= !(value & mask & INTCSR_W1C);
                self.set_reg(INTCSR, new);
            }
            CNTRL => {
                self.set_reg(CNTRL, merged);
                if merged & SOFT_RESET != 0 && old & SOFT_RESET == 0 {
                    self.soft_reset(out);
                }
            }
            DMACSR => {
                self.set_reg(
                    DMACSR,
                    (old & !(mask & 0xFFFF_0000)) | (value & mask & 0xFFFF_0000),
                );
                for (ch, slot) in run_now.iter_mut().enumerate() {
                    let shift = 8 * ch;
                    if (mask >> shift) & 0xFF != 0 {
                        *slot = self.csr_write(ch, (value >> shift) as u8, out);
                    }
                }
            }
            _ => self.set_reg(offset, merged),
        }
        self.update_line(out);
        run_now
    }

    fn csr_write(&mut self, ch: usize, value: u8, out: &mut Outbox) -> Option<u64> {
        self.enable[ch] = value & CSR_ENABLE != 0;
        if value & CSR_CLEAR != 0 {
            let v = self.reg(INTCSR) & !INT_ACTIVE[ch];
            self.set_reg(INTCSR, v);
        }
        if value & CSR_ABORT != 0 {
            self.abort(ch, out);
        }
        if value & CSR_START != 0 {
            if self.enable[ch] {
                return self.start(ch, out);
            }
            self.stats.channels[ch].ignored_starts += 1;
        }
        None
    }

    /// Start channel `ch` if idle. Returns its start order if it is to run at once.
    fn start(&mut self, ch: usize, out: &mut Outbox) -> Option<u64> {
        if !matches!(self.channels[ch].run, Run::Idle) {
            self.stats.channels[ch].ignored_starts += 1;
            return None;
        }
        let start = self.stats.channels[ch].starts;
        self.stats.channels[ch].starts += 1;
        let mut plan = RunPlan::default();
        let mut stalled = false;
        let mut spurious = false;
        let matching = |p: &Planned| {
            p.channel == ch && (p.start == start || (p.persistent && start >= p.start))
        };
        for p in self.faults.iter().filter(|p| matching(p)) {
            match p.fault {
                Plx9656Fault::StopAfter { bytes } => {
                    plan.budget = plan.budget.or(Some((bytes, false)));
                }
                Plx9656Fault::DataAbort { at_byte } => {
                    plan.budget = plan.budget.or(Some((at_byte, true)));
                }
                Plx9656Fault::DescFetchAbort { descriptor } => {
                    plan.fetch_abort = plan.fetch_abort.or(Some(descriptor));
                }
                Plx9656Fault::Stall => stalled = true,
                Plx9656Fault::DropIrq { n } => self.channels[ch].drop_irqs = n,
                Plx9656Fault::SpuriousIrq => spurious = true,
                Plx9656Fault::IgnoreClearCount => plan.ignore_clear_count = true,
            }
        }
        self.faults.retain(|p| p.persistent || !matching(p));
        let seq = self.next_seq;
        self.next_seq += 1;
        let due_ns = match self.mode {
            Plx9656Mode::Immediate => self.now_ns,
            Plx9656Mode::Deferred { latency_ns } => self.now_ns.saturating_add(latency_ns),
            Plx9656Mode::Manual => u64::MAX,
        };
        self.done[ch] = false;
        self.channels[ch].run = Run::Busy(Busy {
            seq,
            due_ns,
            stalled,
            plan,
        });
        out.event(self.now_ns, Some(ch), Plx9656EventKind::Start { start });
        if spurious {
            self.spurious(out);
        }
        (self.mode == Plx9656Mode::Immediate && !stalled).then_some(seq)
    }

    fn spurious(&mut self, out: &mut Outbox) {
        self.spurious = true;
        self.stats.spurious_interrupts += 1;
        out.event(self.now_ns, None, Plx9656EventKind::Spurious);
    }

    /// A driver Abort: stop a busy channel, or release a held one.
    fn abort(&mut self, ch: usize, out: &mut Outbox) {
        let finished = match self.channels[ch].run {
            Run::Idle => return,
            Run::Busy(_) => {
                self.stats.channels[ch].aborts += 1;
                Finished {
                    outcome: Plx9656Outcome::Aborted,
                    bytes: 0,
                    term_count_irq: false,
                }
            }
            Run::Held(f) => f,
        };
        self.channels[ch].run = Run::Idle;
        self.make_visible(ch, finished, out);
        self.release_held(1 - ch, out);
    }

    fn soft_reset(&mut self, out: &mut Outbox) {
        let cntrl = self.reg(CNTRL);
        self.regs = [0; (PLX9656_BAR0_SIZE / 4) as usize];
        self.set_reg(CNTRL, cntrl);
        self.enable = [false; 2];
        self.done = [true; 2];
        for c in &mut self.channels {
            c.run = Run::Idle;
        }
        self.spurious = false;
        self.stats.soft_resets += 1;
        out.event(self.now_ns, None, Plx9656EventKind::SoftReset);
    }

    fn update_line(&mut self, out: &mut Outbox) {
        let intcsr = self.reg(INTCSR);
        let channel = |ch: usize| {
            intcsr & INT_ACTIVE[ch] != 0
                && intcsr & INT_ENABLE[ch] != 0
                && self.reg(DMAMODE[ch]) & INT_TO_PCI != 0
        };
        let level = self.spurious || (intcsr & PCI_INT_ENABLE != 0 && (channel(0) || channel(1)));
        if level && !self.line {
            out.edges += 1;
            self.stats.line_assertions += 1;
            out.event(self.now_ns, None, Plx9656EventKind::LineAsserted);
        }
        self.line = level;
    }

    fn set_abort_bits(&mut self, ch: usize) {
        let v = self.reg(INTCSR) | ABORT_ACTIVE | WAS_BUS_MASTER[ch];
        self.set_reg(INTCSR, v);
    }

    /// The oldest busy channel `pick` accepts.
    fn oldest(&self, pick: impl Fn(&Busy, u64) -> bool) -> Option<usize> {
        (0..2)
            .filter_map(|ch| match self.channels[ch].run {
                Run::Busy(b) if pick(&b, self.now_ns) => Some((b.seq, ch)),
                _ => None,
            })
            .min()
            .map(|(_, ch)| ch)
    }

    /// Run channel `ch`'s chain now (it must be busy) and settle its end. Returns whether it
    /// ran.
    fn finish(&mut self, ch: usize, ports: &Ports, out: &mut Outbox) -> bool {
        let Run::Busy(busy) = self.channels[ch].run else {
            return false;
        };
        let finished = self.run_chain(ch, busy.plan, ports, out);
        self.settle(ch, finished, out);
        self.update_line(out);
        true
    }

    /// Make an ended chain visible, unless coalescing holds it for the other channel.
    fn settle(&mut self, ch: usize, finished: Finished, out: &mut Outbox) {
        let other = 1 - ch;
        let other_running = matches!(self.channels[other].run, Run::Busy(b) if !b.stalled);
        if self.coalesce && other_running {
            self.channels[ch].run = Run::Held(finished);
            return;
        }
        self.channels[ch].run = Run::Idle;
        self.make_visible(ch, finished, out);
        self.release_held(other, out);
    }

    fn release_held(&mut self, ch: usize, out: &mut Outbox) {
        if let Run::Held(f) = self.channels[ch].run {
            self.channels[ch].run = Run::Idle;
            self.make_visible(ch, f, out);
        }
    }

    /// Done, and the channel's interrupts.
    fn make_visible(&mut self, ch: usize, f: Finished, out: &mut Outbox) {
        let now = self.now_ns;
        self.done[ch] = true;
        self.channels[ch].last = Some(f.outcome);
        self.stats.channels[ch].chains_ended += 1;
        out.event(
            now,
            Some(ch),
            Plx9656EventKind::Done {
                bytes: f.bytes,
                outcome: f.outcome,
            },
        );
        if f.term_count_irq {
            self.raise(ch, false, out);
        }
        if self.reg(DMAMODE[ch]) & DONE_INT_ENABLE != 0 {
            if self.channels[ch].drop_irqs > 0 {
                self.channels[ch].drop_irqs -= 1;
                self.stats.channels[ch].dropped_interrupts += 1;
                out.event(now, Some(ch), Plx9656EventKind::IrqDropped);
            } else {
                self.raise(ch, true, out);
            }
        }
    }

    fn raise(&mut self, ch: usize, done: bool, out: &mut Outbox) {
        let v = self.reg(INTCSR) | INT_ACTIVE[ch];
        self.set_reg(INTCSR, v);
        let s = &mut self.stats.channels[ch];
        if done {
            s.done_interrupts += 1;
        } else {
            s.term_count_interrupts += 1;
        }
        out.event(self.now_ns, Some(ch), Plx9656EventKind::IrqRaised { done });
    }

    /// A bus error ends the chain: abort bits (and an issue for a local-bus error).
    fn bus_error(&mut self, ch: usize, outcome: Plx9656Outcome) -> Plx9656Outcome {
        self.set_abort_bits(ch);
        self.stats.channels[ch].bus_errors += 1;
        outcome
    }

    /// Move one block between host address `addr` and `SRAM[local..local + size]`, within the
    /// budget. Returns the bytes moved and how the block ended.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &mut self,
        ch: usize,
        to_host: bool,
        addr: u64,
        local: u32,
        size: u32,
        budget: &mut Option<(u64, bool)>,
        ports: &Ports,
    ) -> (u64, BlockEnd) {
        let size = u64::from(size);
        let start = u64::from(local);
        if start + size > PLX9656_SRAM_SIZE {
            ports.note(format!(
                "channel {ch}: local address {start:#x} + {size:#x} bytes is outside the SRAM \
                 (local-bus error)"
            ));
            return (
                0,
                BlockEnd::Fault(self.bus_error(ch, Plx9656Outcome::LocalBusError)),
            );
        }
        let n = budget.map_or(size, |(left, _)| left.min(size));
        if n > 0 {
            let span = &mut self.sram[start as usize..(start + n) as usize];
            let view = &ports.channel[ch];
            let ok = if to_host {
                view.dma_write(BusAddr::new(addr), span).is_ok()
            } else {
                view.dma_read(BusAddr::new(addr), span).is_ok()
            };
            if !ok {
                return (
                    0,
                    BlockEnd::Fault(self.bus_error(ch, Plx9656Outcome::DataAbort)),
                );
            }
        }
        self.stats.channels[ch].bytes_moved += n;
        if let Some((left, _)) = budget {
            *left -= n;
        }
        (
            n,
            if n < size {
                BlockEnd::Budget
            } else {
                BlockEnd::Done
            },
        )
    }

    /// How a block's end ends the chain (`None`: go on).
    fn block_outcome(&mut self, ch: usize, end: BlockEnd, abort: bool) -> Option<Plx9656Outcome> {
        match end {
            BlockEnd::Done => None,
            BlockEnd::Fault(o) => Some(o),
            BlockEnd::Budget if abort => Some(self.bus_error(ch, Plx9656Outcome::DataAbort)),
            BlockEnd::Budget => Some(Plx9656Outcome::Stopped),
        }
    }

    /// Run channel `ch`'s chain (or block) to its end.
    fn run_chain(&mut self, ch: usize, plan: RunPlan, ports: &Ports, out: &mut Outbox) -> Finished {
        let mode = self.reg(DMAMODE[ch]);
        let mut budget = plan.budget;
        let abort_budget = budget.is_some_and(|(_, abort)| abort);
        let mut bytes = 0u64;
        let mut term_count_irq = false;
        let done = |outcome, bytes, term_count_irq| Finished {
            outcome,
            bytes,
            term_count_irq,
        };
        if mode & SG_MODE == 0 {
            let to_host = self.reg(DPR[ch]) & TO_HOST != 0;
            let addr = (u64::from(self.reg(DMADAC[ch])) << 32) | u64::from(self.reg(PADR[ch]));
            let size = self.reg(SIZ[ch]) & SIZE_MASK;
            let local = self.reg(LADR[ch]);
            let (n, end) = self.block(ch, to_host, addr, local, size, &mut budget, ports);
            self.set_reg(SIZ[ch], size - n as u32);
            let outcome = self
                .block_outcome(ch, end, abort_budget)
                .unwrap_or(Plx9656Outcome::Complete);
            return done(outcome, n, false);
        }
        let dpr = self.reg(DPR[ch]);
        let initial = dpr & self.initial_dpr_flags & 0xF;
        let mut in_host = initial & DESC_PCI != 0;
        let mut at = dpr & ADDRESS_MASK;
        let mut extra = initial & (LAST | TERM_COUNT_INT | TO_HOST);
        let wide = mode & DAC_CHAIN_LOAD != 0 || self.honour_desc_high;
        let clear_count = mode & CLEAR_COUNT != 0 && !plan.ignore_clear_count;
        for index in 0..=MAX_CHAIN {
            if index == MAX_CHAIN {
                ports.note(format!(
                    "channel {ch}: chain longer than {MAX_CHAIN} descriptors (a loop?)"
                ));
                let o = self.bus_error(ch, Plx9656Outcome::DescFetchAbort);
                return done(o, bytes, term_count_irq);
            }
            if plan.fetch_abort == Some(index) {
                let o = self.bus_error(ch, Plx9656Outcome::DescFetchAbort);
                return done(o, bytes, term_count_irq);
            }
            let mut raw = [0u8; 20];
            let len = if wide { 20 } else { 16 };
            if in_host {
                let fetched = ports
                    .descriptors
                    .dma_read(BusAddr::new(u64::from(at)), &mut raw[..len])
                    .is_ok();
                if !fetched {
                    let o = self.bus_error(ch, Plx9656Outcome::DescFetchAbort);
                    return done(o, bytes, term_count_irq);
                }
            } else if !self.sram_copy_out(at, &mut raw[..len]) {
                ports.note(format!(
                    "channel {ch}: descriptor at local address {at:#x} is outside the SRAM \
                     (local-bus error)"
                ));
                let o = self.bus_error(ch, Plx9656Outcome::LocalBusError);
                return done(o, bytes, term_count_irq);
            }
            self.stats.channels[ch].descriptors_fetched += 1;
            let word = |i: usize| {
                u32::from_le_bytes([raw[4 * i], raw[4 * i + 1], raw[4 * i + 2], raw[4 * i + 3]])
            };
            let (pci_low, local, size_word, next) = (word(0), word(1), word(2), word(3));
            let high = if wide { word(4) } else { self.reg(DMADAC[ch]) };
            self.set_reg(PADR[ch], pci_low);
            self.set_reg(LADR[ch], local);
            self.set_reg(SIZ[ch], size_word);
            self.set_reg(DPR[ch], next);
            let flags = next | extra;
            extra = 0;
            let size = size_word & SIZE_MASK;
            let pci = (u64::from(high) << 32) | u64::from(pci_low);
            out.event(
                self.now_ns,
                Some(ch),
                Plx9656EventKind::Descriptor {
                    address: at,
                    pci,
                    local,
                    size,
                },
            );
            let to_host = flags & TO_HOST != 0;
            let (n, end) = self.block(ch, to_host, pci, local, size, &mut budget, ports);
            bytes += n;
            self.set_reg(SIZ[ch], size - n as u32);
            if let Some(o) = self.block_outcome(ch, end, abort_budget) {
                return done(o, bytes, term_count_irq);
            }
            if clear_count {
                let size_at = at.wrapping_add(8);
                let written = if in_host {
                    ports
                        .descriptors
                        .dma_write(BusAddr::new(u64::from(size_at)), &[0; 4])
                        .is_ok()
                } else {
                    self.sram_copy_in(size_at, &[0; 4])
                };
                if !written {
                    let o = self.bus_error(ch, Plx9656Outcome::DescFetchAbort);
                    return done(o, bytes, term_count_irq);
                }
            }
            if flags & TERM_COUNT_INT != 0 {
                term_count_irq = true;
            }
            if flags & LAST != 0 {
                break;
            }
            in_host = flags & DESC_PCI != 0;
            at = flags & ADDRESS_MASK;
        }
        done(Plx9656Outcome::Complete, bytes, term_count_irq)
    }

    fn sram_range(offset: u64, len: usize) -> Option<core::ops::Range<usize>> {
        let end = offset.checked_add(len as u64)?;
        (end <= PLX9656_SRAM_SIZE).then_some(offset as usize..end as usize)
    }

    fn sram_copy_out(&self, offset: u32, out: &mut [u8]) -> bool {
        match Self::sram_range(u64::from(offset), out.len()) {
            Some(r) => {
                out.copy_from_slice(&self.sram[r]);
                true
            }
            None => false,
        }
    }

    fn sram_copy_in(&mut self, offset: u32, data: &[u8]) -> bool {
        match Self::sram_range(u64::from(offset), data.len()) {
            Some(r) => {
                self.sram[r].copy_from_slice(data);
                true
            }
            None => false,
        }
    }

    fn state(&self, ch: usize) -> Plx9656ChannelState {
        match self.channels[ch].run {
            Run::Idle => Plx9656ChannelState::Idle,
            Run::Busy(b) if b.stalled => Plx9656ChannelState::Stalled,
            Run::Busy(_) => Plx9656ChannelState::Running,
            Run::Held(_) => Plx9656ChannelState::Held,
        }
    }
}

struct Inner {
    ports: Ports,
    chip: Mutex<Chip>,
    listener: Mutex<Option<Listener>>,
    sink: Mutex<Option<EventSink>>,
    /// Whether an event sink is set (so events are collected at all).
    tracing: AtomicBool,
}

impl Inner {
    /// Run `f` on the chip under its lock, then deliver its outputs with no lock held.
    fn with_chip<R>(&self, f: impl FnOnce(&mut Chip, &Ports, &mut Outbox) -> R) -> R {
        let mut out = Outbox {
            // ORDERING: a hint only; a sink set concurrently may miss this section's events.
            trace: self.tracing.load(Ordering::Relaxed),
            edges: 0,
            events: Vec::new(),
        };
        let r = {
            let mut chip = lock(&self.chip);
            f(&mut chip, &self.ports, &mut out)
        };
        self.deliver(out);
        r
    }

    fn deliver(&self, out: Outbox) {
        if !out.events.is_empty() {
            let sink = lock(&self.sink).clone();
            if let Some(sink) = sink {
                for e in out.events {
                    sink(e);
                }
            }
        }
        if out.edges > 0 {
            let listener = lock(&self.listener).clone();
            if let Some(l) = listener {
                for _ in 0..out.edges {
                    l();
                }
            }
        }
    }

    fn bad_access(&self, window: &str, what: &str, offset: u64) {
        self.with_chip(|chip, ports, _| {
            chip.stats.bad_accesses += 1;
            ports.note(format!(
                "{what} at {window} offset {offset:#x} is out of range or misaligned"
            ));
        });
    }

    /// A register write of the bytes of `value` that `mask` selects, then any chain it
    /// started in immediate mode.
    fn write_register(&self, offset: u64, value: u32, mask: u32) {
        let run_now = self.with_chip(|chip, _, out| chip.write_dword(offset, value, mask, out));
        for (ch, seq) in run_now.iter().enumerate() {
            if let Some(seq) = *seq {
                self.with_chip(|chip, ports, out| {
                    if matches!(chip.channels[ch].run, Run::Busy(b) if b.seq == seq && !b.stalled) {
                        chip.finish(ch, ports, out);
                    }
                });
            }
        }
    }

    /// Run the oldest busy chain `pick` accepts. Returns whether one ran.
    fn run_one(&self, pick: impl Fn(&Busy, u64) -> bool) -> bool {
        self.with_chip(|chip, ports, out| match chip.oldest(pick) {
            Some(ch) => chip.finish(ch, ports, out),
            None => false,
        })
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let chip = self
            .chip
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ch in 0..2 {
            let state = chip.state(ch);
            if state != Plx9656ChannelState::Idle {
                self.ports.note(format!(
                    "channel {ch} was {state:?} when the chip was dropped"
                ));
            }
        }
    }
}

/// A simulated PLX PCI9656: BAR0 registers, BAR2 SRAM, two scatter/gather DMA channels and
/// one interrupt line. Cheap to clone; clones name the same chip.
///
/// # Channels and memory
/// Channel 0 moves data through the write-to-device adapter, channel 1 through the
/// read-from-device adapter ([`SimPlx9656::duplex`]); every host access goes through that
/// adapter's [`DeviceView`], so the platform's sanitizer checks each byte. Descriptors in host
/// memory are fetched (and, in clear-count mode, written back) through the read adapter's view:
/// a duplex enabler allocates its common buffers there.
///
/// # Registers
/// * **INTCSR** (0x68): enables read/write; `DmaChan0/1IntActive` (bits 21/22) and the other
///   "active" bits (13, 15, 20, 23) read-only; the abort status bits (14, 24–27)
///   write-1-to-clear. Reading it also acknowledges a spurious interrupt.
/// * **CNTRL** (0x6C): bit 30 soft reset. Setting it returns every other register to its reset
///   value (0; DMACSRx = Done) and idles both channels (a running chain is dropped with no
///   interrupt); while it stays set, writes to other registers are ignored. Clearing it has no
///   side effect. The bit has no timing of its own.
/// * **DMAMODEx**, **PADRx**, **LADRx**, **SIZx**, **DPRx**, **DMADACx**: read/write; the
///   engine reloads PADR/LADR/SIZ/DPR from each descriptor and counts SIZ down as bytes move.
/// * **DMACSR0/1** (bytes 0xA8/0xA9; a 32-bit access at 0xA8 reaches both): Enable read/write;
///   Start, Abort and Clear write-only (read 0); Done read-only, 1 at reset and 0 while the
///   channel is busy. Start with Enable set starts an idle channel (a Start on a busy or
///   disabled channel is ignored and counted). Clear drops the channel's IntActive bit. Abort
///   stops a busy channel (nothing more moves) with Done and the Done interrupt. Within one
///   write the order is Clear, Abort, Start.
/// * Any other offset is plain read/write storage. An access past the window or misaligned
///   reads all ones, writes nothing and is recorded as a platform issue
///   ([`SimPlatform::check_clean`](crate::SimPlatform::check_clean) then fails).
///
/// # The engine
/// On Start, in scatter/gather mode (DMAMODE bit 9) the chain starts at `DPR & !0xF`, in host
/// memory if DPR bit 0 is set, else in SRAM. The other flag bits of the value written to DPR
/// are ignored unless [`Plx9656Config::initial_dpr_flags`] lets them through (bits 1–3 are then
/// merged into the first descriptor's flags). Each 32-byte descriptor is fetched (4 dwords; 5
/// with DACChainLoad, DMAMODE bit 18, or [`Plx9656Config::honour_desc_high`]) and loaded into
/// the registers; `SIZ & 0x7F_FFFF` bytes move between the host address and `SRAM[LADR..]` (DPR
/// bit 3 clear: host → SRAM). The host address's upper 32 bits come from DMADACx, or from the
/// descriptor's 5th dword as just said: without either, addresses above 4 GiB are truncated as
/// on the chip and the sanitizer records the stray access. In clear-count mode (DMAMODE bit 16)
/// the engine writes 0 to the size dword of each completed descriptor. A descriptor with bit 2
/// set raises the channel interrupt (not Done); bit 1 ends the chain. With SG mode off the
/// engine moves one block from PADR/LADR/SIZ in the direction of DPR bit 3.
///
/// At the end the channel sets Done and, with DoneIntEnable (DMAMODE bit 10), its IntActive
/// bit. The line is high while `PciIntEnable (INTCSR bit 8) && any(ActiveX && DmaChanXIntEnable
/// (bits 18/19) && IntToPci (DMAMODE bit 17))`, or while a spurious interrupt is pending.
///
/// Bus errors stop the chain with Done and the Done interrupt, and set INTCSR bit 14 and the
/// channel's "was bus master" bit (25 for channel 0, 26 for channel 1; active high in this
/// model): a host access the sanitizer blocks (data: [`Plx9656Outcome::DataAbort`]; descriptor
/// fetch or write-back: [`Plx9656Outcome::DescFetchAbort`]), and a local address or descriptor
/// outside the SRAM ([`Plx9656Outcome::LocalBusError`], also recorded as a platform issue).
///
/// # When chains run
/// [`Plx9656Mode::Immediate`]: inside the DMACSR write that starts them. The start itself is
/// handled first, its outputs delivered, then the chain runs, all before the write returns.
/// [`Plx9656Mode::Deferred`]: `latency_ns` of virtual time after the start
/// ([`SimPlx9656::advance`]). [`Plx9656Mode::Manual`]: by [`SimPlx9656::step`] or
/// [`SimPlx9656::run_pending`]. A chain moves its data all at once when it runs; a driver Abort
/// before that moves nothing.
///
/// # Interrupt delivery and traces
/// The line listener ([`SimPlx9656::set_line_listener`]) is called once per rising edge, and the
/// event sink ([`SimPlx9656::set_event_sink`]) once per [`Plx9656Event`], always with no chip
/// lock held, on the thread whose call made the change: a register access, `advance`, `step`,
/// `run_pending`, `release_stalled` or `raise_spurious`. Both may call back into the chip.
/// The line is level-triggered: an edge comes only when it was low, so an interrupt controller
/// built on the listener calls its ISR again while [`SimPlx9656::line_asserted`] stays true
/// (and serializes its ISRs, as listeners may run on several threads at once).
///
/// # End of a test
/// [`SimPlx9656::check_idle`] reports a channel still running, stalled or held, and a line
/// still high. Out-of-range window accesses, local-bus errors and a chain longer than 65536
/// descriptors (a loop; it ends as [`Plx9656Outcome::DescFetchAbort`]) are recorded as platform
/// issues, and so is a channel not idle when the last handle to the chip is dropped.
///
/// Lock order: the chip's lock before an adapter's locks (through its [`DeviceView`]) and
/// before the platform's issue list. No adapter path calls into the chip.
///
/// ```
/// use dmatx_sim::prelude::*;
/// use dmatx_sim::{Plx9656Config, SimPlx9656};
/// use dmatx_hal::RegisterWindow;
///
/// let sim = SimPlatform::new();
/// let adapter = sim.adapter(&SimPlatform::description(64)).unwrap();
/// let chip = SimPlx9656::new(&adapter, Plx9656Config::default());
/// let bar0 = chip.bar0();
/// assert_eq!(bar0.len(), 0x200);
/// assert_eq!(bar0.read8(0xA8), 0x10, "Done at reset");
/// bar0.write8(0xA8, 0x0B); // Enable | Start | Clear: Start and Clear read back 0
/// assert_eq!(bar0.read8(0xA8) & 0x0F, 0x01);
/// chip.sram_write(0x100, b"local").unwrap();
/// let mut back = [0u8; 5];
/// chip.sram_read(0x100, &mut back).unwrap();
/// assert_eq!(&back, b"local");
/// sim.check_clean().unwrap();
/// ```
#[derive(Clone)]
pub struct SimPlx9656 {
    inner: Arc<Inner>,
}

impl core::fmt::Debug for SimPlx9656 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SimPlx9656")
            .field("states", &[self.channel_state(0), self.channel_state(1)])
            .field("stats", &self.stats())
            .finish()
    }
}

fn check_channel(channel: usize) {
    assert!(
        channel < 2,
        "the PCI9656 has DMA channels 0 and 1, not {channel}"
    );
}

impl SimPlx9656 {
    /// A chip doing all its DMA (both channels, descriptors) through `adapter`.
    pub fn new(adapter: &SimAdapter, config: Plx9656Config) -> Self {
        Self::duplex(adapter, adapter, config)
    }

    /// A chip on a duplex enabler: channel 1 (SRAM → host) and descriptors through
    /// `read_adapter`, channel 0 (host → SRAM) through `write_adapter`. The argument order is
    /// [`SimDmaDevice::duplex`](crate::SimDmaDevice::duplex)'s.
    pub fn duplex(
        read_adapter: &SimAdapter,
        write_adapter: &SimAdapter,
        config: Plx9656Config,
    ) -> Self {
        let read = read_adapter.device_view();
        let write = write_adapter.device_view();
        let shared = Arc::clone(&read_adapter.inner.shared);
        let chip = Chip {
            regs: [0; (PLX9656_BAR0_SIZE / 4) as usize],
            enable: [false; 2],
            done: [true; 2],
            channels: [Channel {
                run: Run::Idle,
                drop_irqs: 0,
                last: None,
            }; 2],
            sram: vec![0; PLX9656_SRAM_SIZE as usize],
            now_ns: 0,
            mode: config.mode,
            honour_desc_high: config.honour_desc_high,
            initial_dpr_flags: config.initial_dpr_flags & 0xF,
            coalesce: config.coalesce_channels,
            faults: Vec::new(),
            spurious: false,
            line: false,
            next_seq: 0,
            stats: Plx9656Stats::default(),
        };
        Self {
            inner: Arc::new(Inner {
                ports: Ports {
                    channel: [write, read.clone()],
                    descriptors: read,
                    shared,
                },
                chip: Mutex::new(chip),
                listener: Mutex::new(None),
                sink: Mutex::new(None),
                tracing: AtomicBool::new(false),
            }),
        }
    }

    /// BAR0, the register file, as the driver maps it.
    pub fn bar0(&self) -> Plx9656Registers {
        Plx9656Registers {
            inner: Arc::clone(&self.inner),
        }
    }

    /// BAR2, the SRAM, as a CPU window (the sample maps it but never touches it).
    pub fn bar2(&self) -> Plx9656Sram {
        Plx9656Sram {
            inner: Arc::clone(&self.inner),
        }
    }

    /// The register dword containing `offset` (rounded down to 4), with no side effects (a
    /// spurious interrupt stays pending). All ones past the register file.
    pub fn peek_register(&self, offset: u64) -> u32 {
        if offset >= PLX9656_BAR0_SIZE {
            return u32::MAX;
        }
        lock(&self.inner.chip).compose(offset & !3)
    }

    /// Copy SRAM bytes at `offset` into `out` (a test backdoor: no side effects).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the range lies outside the SRAM.
    pub fn sram_read(&self, offset: u64, out: &mut [u8]) -> Result<(), Error> {
        let range = Chip::sram_range(offset, out.len()).ok_or(Error::InvalidParameter)?;
        out.copy_from_slice(&lock(&self.inner.chip).sram[range]);
        Ok(())
    }

    /// Copy `data` into the SRAM at `offset` (a test backdoor: no side effects).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the range lies outside the SRAM.
    pub fn sram_write(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        let range = Chip::sram_range(offset, data.len()).ok_or(Error::InvalidParameter)?;
        lock(&self.inner.chip).sram[range].copy_from_slice(data);
        Ok(())
    }

    /// Whether the interrupt line (INTA#) is asserted now.
    pub fn line_asserted(&self) -> bool {
        lock(&self.inner.chip).line
    }

    /// Set the routine called on each rising edge of the interrupt line, with no chip lock
    /// held, on the thread whose call raised it.
    pub fn set_line_listener(&self, listener: impl Fn() + Send + Sync + 'static) {
        *lock(&self.inner.listener) = Some(Arc::new(listener));
    }

    /// Remove the line listener (edges are then only counted).
    pub fn clear_line_listener(&self) {
        *lock(&self.inner.listener) = None;
    }

    /// Set the routine called with each [`Plx9656Event`], with no chip lock held.
    pub fn set_event_sink(&self, sink: impl Fn(Plx9656Event) + Send + Sync + 'static) {
        *lock(&self.inner.sink) = Some(Arc::new(sink));
        // ORDERING: a hint read at the start of each locked section; see `with_chip`.
        self.inner.tracing.store(true, Ordering::Relaxed);
    }

    /// Remove the event sink (events are then not collected).
    pub fn clear_event_sink(&self) {
        // ORDERING: as in `set_event_sink`.
        self.inner.tracing.store(false, Ordering::Relaxed);
        *lock(&self.inner.sink) = None;
    }

    /// Plan `fault` for start number `start` (0-based) of `channel`; with `persistent`, for
    /// every start from that one on. Several faults may apply to one start: the first planned
    /// of `StopAfter`/`DataAbort` applies, and the first `DescFetchAbort`.
    ///
    /// # Panics
    /// If `channel` is not 0 or 1.
    pub fn inject(&self, channel: usize, start: u64, fault: Plx9656Fault, persistent: bool) {
        check_channel(channel);
        lock(&self.inner.chip).faults.push(Planned {
            channel,
            start,
            fault,
            persistent,
        });
    }

    /// Forget every planned fault (drop counters armed by a started `DropIrq` stay).
    pub fn clear_faults(&self) {
        lock(&self.inner.chip).faults.clear();
    }

    /// Forget the planned faults of `channel`.
    ///
    /// # Panics
    /// If `channel` is not 0 or 1.
    pub fn clear_faults_on(&self, channel: usize) {
        check_channel(channel);
        lock(&self.inner.chip)
            .faults
            .retain(|p| p.channel != channel);
    }

    /// Raise the line with no channel bit set (a spurious or shared-line interrupt). It stays
    /// asserted until the next read of INTCSR.
    pub fn raise_spurious(&self) {
        self.inner.with_chip(|chip, _, out| {
            chip.spurious(out);
            chip.update_line(out);
        });
    }

    /// Change the engine mode for chains started from now on.
    pub fn set_mode(&self, mode: Plx9656Mode) {
        lock(&self.inner.chip).mode = mode;
    }

    /// Turn `CoalesceChannels` on or off. Turning it off makes a held channel visible now.
    pub fn set_coalesce_channels(&self, on: bool) {
        self.inner.with_chip(|chip, _, out| {
            chip.coalesce = on;
            if !on {
                chip.release_held(0, out);
                chip.release_held(1, out);
                chip.update_line(out);
            }
        });
    }

    /// Virtual time in nanoseconds.
    pub fn now_ns(&self) -> u64 {
        lock(&self.inner.chip).now_ns
    }

    /// Let `ns` of virtual time pass and run, oldest start first, every chain now due (chains
    /// the listener starts meanwhile run only if due too). Returns how many ran.
    pub fn advance(&self, ns: u64) -> usize {
        {
            let mut chip = lock(&self.inner.chip);
            chip.now_ns = chip.now_ns.saturating_add(ns);
        }
        let mut n = 0;
        while self.inner.run_one(|b, now| !b.stalled && b.due_ns <= now) {
            n += 1;
        }
        n
    }

    /// Run the oldest chain that is not stalled, due or not. Returns whether there was one.
    pub fn step(&self) -> bool {
        self.inner.run_one(|b, _| !b.stalled)
    }

    /// Run chains until none is left but stalled ones (including chains the listener starts
    /// meanwhile: a driver that restarts forever makes this loop forever). Returns how many
    /// ran.
    pub fn run_pending(&self) -> usize {
        let mut n = 0;
        while self.step() {
            n += 1;
        }
        n
    }

    /// Run every stalled chain now, oldest first (they run as if never stalled). Returns how
    /// many ran.
    pub fn release_stalled(&self) -> usize {
        let mut n = 0;
        while self.inner.with_chip(|chip, ports, out| {
            let Some(ch) = chip.oldest(|b, _| b.stalled) else {
                return false;
            };
            if let Run::Busy(b) = &mut chip.channels[ch].run {
                b.stalled = false;
            }
            chip.finish(ch, ports, out)
        }) {
            n += 1;
        }
        n
    }

    /// What `channel` is doing.
    ///
    /// # Panics
    /// If `channel` is not 0 or 1.
    pub fn channel_state(&self, channel: usize) -> Plx9656ChannelState {
        check_channel(channel);
        lock(&self.inner.chip).state(channel)
    }

    /// How `channel`'s last chain ended (`None` before any ended).
    ///
    /// # Panics
    /// If `channel` is not 0 or 1.
    pub fn last_outcome(&self, channel: usize) -> Option<Plx9656Outcome> {
        check_channel(channel);
        lock(&self.inner.chip).channels[channel].last
    }

    /// Whether both channels are idle (nothing running, stalled or held).
    pub fn is_idle(&self) -> bool {
        let chip = lock(&self.inner.chip);
        (0..2).all(|ch| chip.state(ch) == Plx9656ChannelState::Idle)
    }

    /// Check both channels are idle and the line is low, for the end of a test.
    ///
    /// # Errors
    /// What is not, one item per line.
    pub fn check_idle(&self) -> Result<(), String> {
        let chip = lock(&self.inner.chip);
        let mut problems = Vec::new();
        for ch in 0..2 {
            let state = chip.state(ch);
            if state != Plx9656ChannelState::Idle {
                problems.push(format!("plx9656: channel {ch} is {state:?}"));
            }
        }
        if chip.line {
            problems.push("plx9656: the interrupt line is still asserted".to_string());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }

    /// Counters.
    pub fn stats(&self) -> Plx9656Stats {
        lock(&self.inner.chip).stats
    }

    /// Counters of `channel`.
    ///
    /// # Panics
    /// If `channel` is not 0 or 1.
    pub fn channel_stats(&self, channel: usize) -> Plx9656ChannelStats {
        check_channel(channel);
        lock(&self.inner.chip).stats.channels[channel]
    }
}

/// BAR0 of a [`SimPlx9656`]: its register file, with the chip's side effects. Cheap to clone.
#[derive(Clone)]
pub struct Plx9656Registers {
    inner: Arc<Inner>,
}

impl core::fmt::Debug for Plx9656Registers {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Plx9656Registers").finish_non_exhaustive()
    }
}

impl RegisterWindow for Plx9656Registers {
    fn len(&self) -> u64 {
        PLX9656_BAR0_SIZE
    }

    fn read8(&self, offset: u64) -> u8 {
        if offset >= PLX9656_BAR0_SIZE {
            self.inner.bad_access("BAR0", "8-bit read", offset);
            return u8::MAX;
        }
        let dword = self
            .inner
            .with_chip(|chip, _, out| chip.read_dword(offset & !3, out));
        (dword >> (8 * (offset & 3))) as u8
    }

    fn read32(&self, offset: u64) -> u32 {
        if !offset.is_multiple_of(4) || offset >= PLX9656_BAR0_SIZE {
            self.inner.bad_access("BAR0", "32-bit read", offset);
            return u32::MAX;
        }
        self.inner
            .with_chip(|chip, _, out| chip.read_dword(offset, out))
    }

    fn write8(&self, offset: u64, value: u8) {
        if offset >= PLX9656_BAR0_SIZE {
            self.inner.bad_access("BAR0", "8-bit write", offset);
            return;
        }
        let shift = 8 * (offset & 3);
        self.inner
            .write_register(offset & !3, u32::from(value) << shift, 0xFF << shift);
    }

    fn write32(&self, offset: u64, value: u32) {
        if !offset.is_multiple_of(4) || offset >= PLX9656_BAR0_SIZE {
            self.inner.bad_access("BAR0", "32-bit write", offset);
            return;
        }
        self.inner.write_register(offset, value, u32::MAX);
    }
}

/// BAR2 of a [`SimPlx9656`]: its SRAM as plain memory. Cheap to clone.
#[derive(Clone)]
pub struct Plx9656Sram {
    inner: Arc<Inner>,
}

impl core::fmt::Debug for Plx9656Sram {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Plx9656Sram").finish_non_exhaustive()
    }
}

impl Plx9656Sram {
    fn access<const N: usize>(&self, what: &str, offset: u64) -> Option<core::ops::Range<usize>> {
        let range = Chip::sram_range(offset, N).filter(|_| offset.is_multiple_of(N as u64));
        if range.is_none() {
            self.inner.bad_access("BAR2", what, offset);
        }
        range
    }
}

impl RegisterWindow for Plx9656Sram {
    fn len(&self) -> u64 {
        PLX9656_SRAM_SIZE
    }

    fn read8(&self, offset: u64) -> u8 {
        self.access::<1>("8-bit read", offset)
            .map_or(u8::MAX, |r| lock(&self.inner.chip).sram[r.start])
    }

    fn read32(&self, offset: u64) -> u32 {
        self.access::<4>("32-bit read", offset)
            .map_or(u32::MAX, |r| {
                let chip = lock(&self.inner.chip);
                let mut b = [0; 4];
                b.copy_from_slice(&chip.sram[r]);
                u32::from_le_bytes(b)
            })
    }

    fn write8(&self, offset: u64, value: u8) {
        if let Some(r) = self.access::<1>("8-bit write", offset) {
            lock(&self.inner.chip).sram[r.start] = value;
        }
    }

    fn write32(&self, offset: u64, value: u32) {
        if let Some(r) = self.access::<4>("32-bit write", offset) {
            lock(&self.inner.chip).sram[r].copy_from_slice(&value.to_le_bytes());
        }
    }
}
