//! A simulated QEMU `edu` PCI device (QEMU's `hw/misc/edu.c`, the teaching device the
//! project's guest tier drives through VFIO): a 1 MiB register BAR, a factorial unit, an
//! interrupt status register and a one-channel DMA engine with a 4 KiB device buffer.
//!
//! The model and its rules are described on [`SimEdu`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dmatx_hal::{BusAddr, Error, RegisterWindow, Result};

use crate::adapter::SimAdapter;
use crate::memory::lock;
use crate::sanitizer::DeviceView;

/// BAR0's size: 1 MiB, as QEMU declares it.
pub const EDU_BAR0_SIZE: u64 = 1 << 20;
/// What the identification register (0x00) reads: major 1, minor 0, `0xed`.
pub const EDU_ID: u32 = 0x0100_00ed;
/// Device address of the DMA buffer.
pub const EDU_DMA_BUFFER: u64 = 0x4_0000;
/// Size of the DMA buffer.
pub const EDU_DMA_BUFFER_SIZE: u64 = 4096;
/// The mask QEMU applies to the RAM-side DMA address (28 bits).
pub const EDU_DMA_MASK: u64 = (1 << 28) - 1;

/// Register offsets and bits (QEMU's `edu.c` and `docs/specs/edu.rst`).
pub mod edu_reg {
    /// Identification (read-only).
    pub const ID: u64 = 0x00;
    /// Liveness check: reads the complement of the value written.
    pub const LIVENESS: u64 = 0x04;
    /// Factorial: write n, read n! once the computing bit clears.
    pub const FACTORIAL: u64 = 0x08;
    /// Status: bit 0 computing (read-only), bit 7 raise interrupt 0x1 when a factorial is done.
    pub const STATUS: u64 = 0x20;
    /// Interrupt status (read-only).
    pub const IRQ_STATUS: u64 = 0x24;
    /// Interrupt raise: the value written is ORed into the interrupt status.
    pub const IRQ_RAISE: u64 = 0x60;
    /// Interrupt acknowledge: the bits written are cleared from the interrupt status.
    pub const IRQ_ACK: u64 = 0x64;
    /// DMA source address.
    pub const DMA_SRC: u64 = 0x80;
    /// DMA destination address.
    pub const DMA_DST: u64 = 0x88;
    /// DMA byte count.
    pub const DMA_COUNT: u64 = 0x90;
    /// DMA command.
    pub const DMA_CMD: u64 = 0x98;

    /// Status bit 0: a factorial is being computed.
    pub const STATUS_COMPUTING: u32 = 0x01;
    /// Status bit 7: raise interrupt [`IRQ_FACTORIAL`] when a factorial is done.
    pub const STATUS_IRQ_FACTORIAL: u32 = 0x80;
    /// The interrupt status bit a finished factorial raises.
    pub const IRQ_FACTORIAL: u32 = 0x0000_0001;
    /// The interrupt status bit a finished DMA raises.
    pub const IRQ_DMA: u32 = 0x0000_0100;

    /// Command bit 0: start; reads 1 while the DMA runs.
    pub const CMD_RUN: u32 = 0x1;
    /// Command bit 1: direction, 0 = RAM → device, 1 = device → RAM.
    pub const CMD_TO_RAM: u32 = 0x2;
    /// Command bit 2: raise [`IRQ_DMA`] when done.
    pub const CMD_IRQ: u32 = 0x4;
}

use edu_reg::*;

/// How to build a [`SimEdu`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SimEduConfig {
    /// Time from the command write to the DMA (QEMU: 100 ms of virtual time); zero runs it as
    /// soon as the model's worker gets to it. Always asynchronous, as QEMU's timer is.
    pub dma_delay: Duration,
    /// Keep started DMAs from running until [`SimEdu::release`] (or `set_hold(false)`).
    pub hold: bool,
    /// QEMU 7.2's off-by-one in the range check: a DMA ending exactly at the end of the
    /// device buffer is refused too (QEMU 7.2 aborts there; fixed in QEMU 10).
    pub erratum_end_abort: bool,
    /// MSI instead of INTx: every raise notifies, rather than only the line's rising edge.
    pub msi: bool,
    /// What the identification register reads (a wrong one tests the driver's check).
    pub id: u32,
}

impl Default for SimEduConfig {
    fn default() -> Self {
        Self {
            dma_delay: Duration::ZERO,
            hold: false,
            erratum_end_abort: false,
            msi: false,
            id: EDU_ID,
        }
    }
}

/// Counters of a [`SimEdu`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SimEduStats {
    /// DMAs that ran from RAM to the device buffer.
    pub dmas_to_device: u64,
    /// DMAs that ran from the device buffer to RAM.
    pub dmas_to_ram: u64,
    /// Bytes moved from RAM to the device.
    pub bytes_to_device: u64,
    /// Bytes moved from the device to RAM.
    pub bytes_to_ram: u64,
    /// DMA commands accepted (the start bit written while idle).
    pub commands: u64,
    /// DMAs refused by the range check (count 0, or the device range outside the buffer, or
    /// the erratum): nothing moved, no interrupt, and the engine stays busy until a reset,
    /// as a QEMU that aborted never answers again.
    pub refused: u64,
    /// DMAs whose RAM access the sanitizer blocked (no byte moved; the DMA still ends).
    pub faults: u64,
    /// RAM-side addresses that had bits above 28 (silently masked, as QEMU does).
    pub clamps: u64,
    /// Writes to the DMA registers while a DMA ran (ignored, as QEMU does).
    pub ignored_writes: u64,
    /// Interrupt status bits raised (calls of the raise path with a non-zero value).
    pub interrupts_raised: u64,
    /// Interrupt notifications sent to the listener (rising edges, or MSI messages).
    pub notifications: u64,
    /// Factorials computed.
    pub factorials: u64,
    /// Accesses QEMU rejects: not 4 bytes wide, misaligned or outside the BAR.
    pub bad_accesses: u64,
    /// Resets ([`SimEdu::reset`]).
    pub resets: u64,
}

type Listener = Arc<dyn Fn() + Send + Sync>;

struct Dma {
    src: u64,
    dst: u64,
    count: u64,
    cmd: u64,
    /// When the running DMA is due; `None` when none runs (or it was refused).
    due: Option<Instant>,
}

struct State {
    liveness: u32,
    factorial: u32,
    status: u32,
    irq_status: u32,
    line: bool,
    fact_pending: bool,
    dma: Dma,
    buffer: Vec<u8>,
    hold: bool,
    stop: bool,
    stats: SimEduStats,
}

/// What the model's handles and its worker share.
struct Core {
    config: SimEduConfig,
    state: Mutex<State>,
    changed: Condvar,
    view: DeviceView,
    listener: Mutex<Option<Listener>>,
}

impl State {
    /// Raise `bits`; returns the notifications to send.
    fn raise(&mut self, bits: u32, msi: bool) -> u32 {
        if bits == 0 {
            return 0;
        }
        self.stats.interrupts_raised += 1;
        self.irq_status |= bits;
        let notify = if msi { true } else { !self.line };
        self.line = true;
        if notify {
            self.stats.notifications += 1;
            1
        } else {
            0
        }
    }

    fn lower(&mut self, bits: u32) {
        self.irq_status &= !bits;
        if self.irq_status == 0 {
            self.line = false;
        }
    }
}

impl Core {
    fn notify(&self, n: u32) {
        if n == 0 {
            return;
        }
        let listener = lock(&self.listener).clone();
        if let Some(l) = listener {
            for _ in 0..n {
                l();
            }
        }
    }

    fn read32(&self, offset: u64) -> u32 {
        let mut st = lock(&self.state);
        if !offset.is_multiple_of(4) || offset >= EDU_BAR0_SIZE {
            st.stats.bad_accesses += 1;
            return u32::MAX;
        }
        match offset {
            ID => self.config.id,
            LIVENESS => st.liveness,
            FACTORIAL => st.factorial,
            STATUS => st.status,
            IRQ_STATUS => st.irq_status,
            // A 4-byte read of a 64-bit DMA register gives its low half, as in QEMU.
            DMA_SRC => st.dma.src as u32,
            DMA_DST => st.dma.dst as u32,
            DMA_COUNT => st.dma.count as u32,
            DMA_CMD => st.dma.cmd as u32,
            _ => u32::MAX,
        }
    }

    fn write32(&self, offset: u64, value: u32) {
        let mut st = lock(&self.state);
        if !offset.is_multiple_of(4) || offset >= EDU_BAR0_SIZE {
            st.stats.bad_accesses += 1;
            return;
        }
        let mut notifications = 0;
        match offset {
            LIVENESS => st.liveness = !value,
            // QEMU ignores the write while a factorial is being computed.
            FACTORIAL if st.status & STATUS_COMPUTING == 0 => {
                st.factorial = value;
                st.status |= STATUS_COMPUTING;
                st.fact_pending = true;
                self.changed.notify_all();
            }
            STATUS => {
                if value & STATUS_IRQ_FACTORIAL != 0 {
                    st.status |= STATUS_IRQ_FACTORIAL;
                } else {
                    st.status &= !STATUS_IRQ_FACTORIAL;
                }
            }
            IRQ_RAISE => notifications = st.raise(value, self.config.msi),
            IRQ_ACK => st.lower(value),
            DMA_SRC | DMA_DST | DMA_COUNT | DMA_CMD => {
                let running = st.dma.cmd & u64::from(CMD_RUN) != 0;
                if offset == DMA_CMD && value & CMD_RUN == 0 {
                    // QEMU ignores a command without the start bit.
                } else if running {
                    st.stats.ignored_writes += 1;
                } else {
                    // A 4-byte write sets the whole 64-bit field, as in QEMU.
                    let v = u64::from(value);
                    match offset {
                        DMA_SRC => st.dma.src = v,
                        DMA_DST => st.dma.dst = v,
                        DMA_COUNT => st.dma.count = v,
                        _ => {
                            st.dma.cmd = v;
                            st.dma.due = Some(Instant::now() + self.config.dma_delay);
                            st.stats.commands += 1;
                            self.changed.notify_all();
                        }
                    }
                }
            }
            _ => {}
        }
        drop(st);
        self.notify(notifications);
    }

    /// Run the DMA that is due (state locked). Returns the notifications to send.
    fn run_dma(&self, st: &mut State) -> u32 {
        st.dma.due = None;
        let cmd = st.dma.cmd;
        let to_ram = cmd & u64::from(CMD_TO_RAM) != 0;
        let (device, ram) = if to_ram {
            (st.dma.src, st.dma.dst)
        } else {
            (st.dma.dst, st.dma.src)
        };
        let count = st.dma.count;
        let end = device.checked_add(count);
        let buffer_end = EDU_DMA_BUFFER + EDU_DMA_BUFFER_SIZE;
        let in_range = count > 0
            && device >= EDU_DMA_BUFFER
            && end.is_some_and(|e| e <= buffer_end)
            && !(self.config.erratum_end_abort && end == Some(buffer_end));
        if !in_range {
            // QEMU stops (hw_error) here: the engine never answers again until a reset.
            st.stats.refused += 1;
            return 0;
        }
        let masked = ram & EDU_DMA_MASK;
        if masked != ram {
            st.stats.clamps += 1;
        }
        let at = (device - EDU_DMA_BUFFER) as usize;
        let n = count as usize;
        let bus = BusAddr::new(masked);
        let moved = if to_ram {
            self.view.dma_write(bus, &st.buffer[at..at + n])
        } else {
            self.view.dma_read(bus, &mut st.buffer[at..at + n])
        };
        match (moved, to_ram) {
            (Err(_), _) => st.stats.faults += 1,
            (Ok(()), true) => {
                st.stats.dmas_to_ram += 1;
                st.stats.bytes_to_ram += count;
            }
            (Ok(()), false) => {
                st.stats.dmas_to_device += 1;
                st.stats.bytes_to_device += count;
            }
        }
        st.dma.cmd &= !u64::from(CMD_RUN);
        if cmd & u64::from(CMD_IRQ) != 0 {
            st.raise(IRQ_DMA, self.config.msi)
        } else {
            0
        }
    }
}

/// The model's worker: QEMU's factorial thread and DMA timer.
fn worker(core: &Core) {
    let mut st = lock(&core.state);
    loop {
        if st.stop {
            return;
        }
        let mut notifications = 0;
        if st.fact_pending {
            st.fact_pending = false;
            let n = st.factorial;
            st.factorial = (1..=n).fold(1u32, u32::wrapping_mul);
            st.status &= !STATUS_COMPUTING;
            st.stats.factorials += 1;
            if st.status & STATUS_IRQ_FACTORIAL != 0 {
                notifications += st.raise(IRQ_FACTORIAL, core.config.msi);
            }
        }
        let mut wait = None;
        if let Some(due) = st.dma.due
            && !st.hold
        {
            let now = Instant::now();
            if now >= due {
                notifications += core.run_dma(&mut st);
            } else {
                wait = Some(due - now);
            }
        }
        if notifications > 0 {
            drop(st);
            core.notify(notifications);
            st = lock(&core.state);
            continue;
        }
        if st.stop || st.fact_pending {
            continue;
        }
        let runnable = st.dma.due.is_some_and(|d| d <= Instant::now()) && !st.hold;
        if runnable {
            continue;
        }
        st = match wait {
            Some(d) => {
                core.changed
                    .wait_timeout(st, d)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => core.changed.wait(st).unwrap_or_else(|e| e.into_inner()),
        };
    }
}

/// The worker's handle: dropping the last [`SimEdu`] stops and joins it.
struct Handle {
    core: Arc<Core>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stopped: AtomicBool,
}

impl Handle {
    fn stop(&self) {
        // ORDERING: only makes repeated stops cheap; the join below synchronizes.
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        lock(&self.core.state).stop = true;
        self.core.changed.notify_all();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// QEMU's `edu` device, on one adapter of the simulated machine.
///
/// * **Registers** ([`SimEdu::bar0`], a [`RegisterWindow`] of [`EDU_BAR0_SIZE`] bytes): only
///   aligned 4-byte accesses act (QEMU takes 4 and 8; byte accesses are counted in
///   [`SimEduStats::bad_accesses`], read as all ones and ignored). The identification reads
///   [`EDU_ID`], the liveness register the complement of what was written, the factorial
///   register n! (wrapping at 32 bits) once the status register's computing bit clears; the
///   interrupt status collects raised bits, [`edu_reg::IRQ_RAISE`] ORs bits in and
///   [`edu_reg::IRQ_ACK`] clears them. Unknown offsets read all ones.
/// * **DMA**: source, destination and count are 64-bit fields set whole by a 4-byte write;
///   the command with its start bit starts a DMA that runs [`SimEduConfig::dma_delay`] later
///   on the model's worker thread (never inside the register write). While it runs, writes
///   to the four DMA registers are ignored and the command reads its start bit. The device
///   side must lie in the 4 KiB buffer at [`EDU_DMA_BUFFER`] with a non-zero count, else the
///   DMA is refused (see [`SimEduStats::refused`]); the RAM side is masked to 28 bits and
///   reached through the adapter's [`DeviceView`], so the sanitizer checks every byte.
/// * **Interrupt**: INTx is a level: the listener ([`SimEdu::set_interrupt_listener`]) is
///   called when the interrupt status goes from 0 to non-zero, and the line stays asserted
///   until it is 0 again. With [`SimEduConfig::msi`] every raise notifies. The listener runs
///   on the thread that made the change (a register write, or the worker) with no model
///   lock held, and may call back into the model.
///
/// Clones name the same device; dropping the last one stops and joins the worker (so does
/// [`SimEdu::shut_down`]). A listener that holds a clone keeps the device alive: clear it
/// before dropping.
#[derive(Clone)]
pub struct SimEdu {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for SimEdu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimEdu")
            .field("config", &self.handle.core.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// BAR0 of a [`SimEdu`]: its registers.
#[derive(Clone)]
pub struct SimEduBar {
    core: Arc<Core>,
}

impl std::fmt::Debug for SimEduBar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimEduBar").finish_non_exhaustive()
    }
}

impl RegisterWindow for SimEduBar {
    fn len(&self) -> u64 {
        EDU_BAR0_SIZE
    }

    fn read8(&self, _offset: u64) -> u8 {
        lock(&self.core.state).stats.bad_accesses += 1;
        u8::MAX
    }

    fn read32(&self, offset: u64) -> u32 {
        self.core.read32(offset)
    }

    fn write8(&self, _offset: u64, _value: u8) {
        lock(&self.core.state).stats.bad_accesses += 1;
    }

    fn write32(&self, offset: u64, value: u32) {
        self.core.write32(offset, value);
    }
}

impl SimEdu {
    /// An edu device doing its DMA through `adapter`, with its worker started.
    ///
    /// # Errors
    /// [`Error::InsufficientResources`] if the worker thread cannot be started.
    pub fn new(adapter: &SimAdapter, config: SimEduConfig) -> Result<Self> {
        let core = Arc::new(Core {
            config,
            state: Mutex::new(State {
                liveness: 0,
                factorial: 0,
                status: 0,
                irq_status: 0,
                line: false,
                fact_pending: false,
                dma: Dma {
                    src: 0,
                    dst: 0,
                    count: 0,
                    cmd: 0,
                    due: None,
                },
                buffer: vec![0; EDU_DMA_BUFFER_SIZE as usize],
                hold: config.hold,
                stop: false,
                stats: SimEduStats::default(),
            }),
            changed: Condvar::new(),
            view: adapter.device_view(),
            listener: Mutex::new(None),
        });
        let worker_core = Arc::clone(&core);
        let thread = std::thread::Builder::new()
            .name("sim-edu".into())
            .spawn(move || worker(&worker_core))
            .map_err(|_| Error::InsufficientResources)?;
        Ok(Self {
            handle: Arc::new(Handle {
                core,
                thread: Mutex::new(Some(thread)),
                stopped: AtomicBool::new(false),
            }),
        })
    }

    fn core(&self) -> &Core {
        &self.handle.core
    }

    /// The configuration the device was built with.
    pub fn config(&self) -> SimEduConfig {
        self.core().config
    }

    /// BAR0, the register window a driver maps.
    pub fn bar0(&self) -> SimEduBar {
        SimEduBar {
            core: Arc::clone(&self.handle.core),
        }
    }

    /// Call `listener` on each interrupt notification (INTx rising edge, or MSI message).
    pub fn set_interrupt_listener(&self, listener: impl Fn() + Send + Sync + 'static) {
        *lock(&self.core().listener) = Some(Arc::new(listener));
    }

    /// Stop calling the interrupt listener (and drop it).
    pub fn clear_interrupt_listener(&self) {
        lock(&self.core().listener).take();
    }

    /// Whether the interrupt is asserted: the interrupt status is non-zero.
    pub fn line_asserted(&self) -> bool {
        lock(&self.core().state).line
    }

    /// The interrupt status register, without side effects.
    pub fn interrupt_status(&self) -> u32 {
        lock(&self.core().state).irq_status
    }

    /// Whether a DMA was started and has not ended (running, held, or refused and wedged).
    pub fn dma_busy(&self) -> bool {
        lock(&self.core().state).dma.cmd & u64::from(CMD_RUN) != 0
    }

    /// Hold started DMAs (`true`) or let them run when due (`false`).
    pub fn set_hold(&self, hold: bool) {
        lock(&self.core().state).hold = hold;
        self.core().changed.notify_all();
    }

    /// Stop holding: a held DMA runs now (if due).
    pub fn release(&self) {
        self.set_hold(false);
    }

    /// A copy of the 4 KiB device buffer.
    pub fn device_buffer(&self) -> Vec<u8> {
        lock(&self.core().state).buffer.clone()
    }

    /// Set bytes of the device buffer from the CPU side (for tests).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the range lies outside the buffer.
    pub fn fill_device_buffer(&self, offset: u64, data: &[u8]) -> Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= EDU_DMA_BUFFER_SIZE)
            .ok_or(Error::InvalidParameter)?;
        lock(&self.core().state).buffer[offset as usize..end as usize].copy_from_slice(data);
        Ok(())
    }

    /// A function-level reset: a running (or wedged) DMA is dropped without touching memory,
    /// the interrupt status and factorial unit are cleared, the line drops. The buffer keeps
    /// its bytes.
    pub fn reset(&self) {
        let mut st = lock(&self.core().state);
        st.dma = Dma {
            src: 0,
            dst: 0,
            count: 0,
            cmd: 0,
            due: None,
        };
        st.irq_status = 0;
        st.line = false;
        st.status = 0;
        st.fact_pending = false;
        st.stats.resets += 1;
    }

    /// Counters.
    pub fn stats(&self) -> SimEduStats {
        lock(&self.core().state).stats
    }

    /// Check the device is idle: no DMA started and not ended, no factorial computing, the
    /// interrupt status clear.
    ///
    /// # Errors
    /// What is not idle, one item per line.
    pub fn check_idle(&self) -> core::result::Result<(), String> {
        let st = lock(&self.core().state);
        let mut problems = Vec::new();
        if st.dma.cmd & u64::from(CMD_RUN) != 0 {
            let why = if st.dma.due.is_some() {
                "still running"
            } else {
                "refused and wedged until a reset"
            };
            problems.push(format!(
                "edu: DMA {why} (src {:#x}, dst {:#x}, count {})",
                st.dma.src, st.dma.dst, st.dma.count
            ));
        }
        if st.status & STATUS_COMPUTING != 0 {
            problems.push("edu: factorial still computing".into());
        }
        if st.irq_status != 0 {
            problems.push(format!(
                "edu: interrupt status {:#x} not acknowledged",
                st.irq_status
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }

    /// Stop and join the worker (idempotent; dropping the last handle does it too). Started
    /// DMAs never run afterwards.
    pub fn shut_down(&self) {
        self.handle.stop();
    }
}
