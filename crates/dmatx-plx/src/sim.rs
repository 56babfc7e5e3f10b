//! The PLX board on the simulated machine: a [`SimPlx9656`] on a [`SimPlatform`], the driver
//! added, prepared and started, and an interrupt controller that delivers the chip's line to
//! the driver's ISR.
//!
//! The interrupt controller is a thread: the chip's line listener (called on each rising
//! edge, on whatever thread made the change) only wakes it, and it calls
//! [`Interrupt::raise`](dmatx_runtime::Interrupt::raise) — again while the ISR claims and the
//! line stays high, as a level-triggered line does. It never holds the interrupt lock, so when
//! a chip in immediate mode finishes inside the DMACSR write of program-DMA (which holds the
//! lock), the ISR runs once program-DMA releases it (scenario P15).

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use dmatx::{Direction, DmaDevice, Result};
use dmatx_runtime::{LevelLine, RequestHandle};
use dmatx_sim::{Placement, Plx9656Config, SimBuffer, SimConfig, SimPlatform, SimPlx9656};

use crate::driver::{
    Delay, FragmentationChains, HostBuffer, Plx, PlxConfig, Resource, plx_evt_device_add,
    plx_evt_device_add_fragmented,
};

impl HostBuffer for SimBuffer {
    fn store(&self, offset: u64, data: &[u8]) -> Result<()> {
        SimBuffer::store(self, offset, data)
    }

    fn load(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        SimBuffer::read(self, offset, out)
    }
}

/// The driver on the simulated machine.
pub type SimPlx = Plx<SimPlatform, SimBuffer>;

/// How to build a [`SimBoard`].
#[derive(Clone, Debug, Default)]
pub struct BoardConfig {
    /// The machine.
    pub sim: SimConfig,
    /// The chip.
    pub chip: Plx9656Config,
    /// The driver.
    pub driver: PlxConfig,
    /// The fragmentation build: the page offsets of the 1 KiB buffers of each direction's
    /// chain (the sample's `BuildMdlChain` makes eight); `None` for the default build.
    pub fragmentation: Option<Vec<u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A PCI9656 board with the PLX9x5x driver on the simulated machine.
pub struct SimBoard {
    sim: SimPlatform,
    chip: SimPlx9656,
    plx: SimPlx,
    line: LevelLine,
}

impl std::fmt::Debug for SimBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimBoard")
            .field("chip", &self.chip)
            .field("plx", &self.plx)
            .finish_non_exhaustive()
    }
}

impl SimBoard {
    /// Build the machine, add the driver (`EvtDeviceAdd`), plug the chip in on the enabler's
    /// adapters, prepare the hardware with the chip's BARs (by size: BAR0, the unused port
    /// range, BAR2), connect the line, and start the device (D0).
    ///
    /// # Errors
    /// The platform's or the driver's error, as a message.
    pub fn new(config: BoardConfig) -> core::result::Result<Self, String> {
        let sim = SimPlatform::with_config(config.sim).map_err(|e| format!("machine: {e}"))?;
        Self::on(sim, config.chip, config.driver, config.fragmentation)
    }

    /// As [`SimBoard::new`] on an existing machine.
    ///
    /// # Errors
    /// As [`SimBoard::new`].
    pub fn on(
        sim: SimPlatform,
        chip_config: Plx9656Config,
        driver: PlxConfig,
        fragmentation: Option<Vec<u64>>,
    ) -> core::result::Result<Self, String> {
        let dma = DmaDevice::new(sim.clone());
        // The chip exists before the driver does; the delay reaches it through this slot.
        let clock: Arc<Mutex<Option<SimPlx9656>>> = Arc::default();
        let clock_in = Arc::clone(&clock);
        let delay: Delay = Arc::new(move |d: Duration| {
            let chip = lock(&clock_in).clone();
            if let Some(chip) = chip {
                chip.advance(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
            }
        });
        let plx: SimPlx = match fragmentation {
            None => plx_evt_device_add(dma, delay, driver),
            Some(offsets) => {
                let parts: Vec<(u64, u64)> = offsets.iter().map(|&o| (1024, o)).collect();
                let chain = || {
                    sim.allocate_chain(&parts)
                        .map_err(|e| format!("fragmentation chain: {e}"))
                };
                let chains = FragmentationChains {
                    write: chain()?,
                    read: chain()?,
                };
                plx_evt_device_add_fragmented(dma, delay, driver, chains)
            }
        }
        .map_err(|e| format!("device add: {e}"))?;
        let enabler = plx.enabler();
        let (Some(read), Some(write)) = (
            enabler.adapter(Direction::ReadFromDevice),
            enabler.adapter(Direction::WriteToDevice),
        ) else {
            let _ = plx.remove();
            return Err("device add: the duplex enabler has no adapters".into());
        };
        let chip = SimPlx9656::duplex(read, write, chip_config);
        *lock(&clock) = Some(chip.clone());
        let resources = vec![
            Resource::Memory(Arc::new(chip.bar0())),
            Resource::Port { length: 0x100 },
            Resource::Memory(Arc::new(chip.bar2())),
            Resource::Interrupt,
        ];
        if let Err(e) = plx.prepare_hardware(resources) {
            let _ = plx.remove();
            return Err(format!("prepare hardware: {e}"));
        }
        #[cfg(feature = "tracing")]
        chip.set_event_sink(trace_chip_event);
        let line = {
            let chip = chip.clone();
            LevelLine::spawn("plx-intx", plx.interrupt(), move || chip.line_asserted())
                .map_err(|e| format!("interrupt controller: {e}"))?
        };
        chip.set_line_listener(line.edge());
        let board = Self {
            sim,
            chip,
            plx,
            line,
        };
        board.start().map_err(|e| format!("start: {e}"))?;
        Ok(board)
    }

    /// The machine.
    pub fn sim(&self) -> &SimPlatform {
        &self.sim
    }

    /// The chip.
    pub fn chip(&self) -> &SimPlx9656 {
        &self.chip
    }

    /// The driver.
    pub fn plx(&self) -> &SimPlx {
        &self.plx
    }

    /// Power up (D0), then deliver a line that stayed high meanwhile.
    ///
    /// # Errors
    /// As [`Plx::start`].
    pub fn start(&self) -> Result<()> {
        self.plx.start()?;
        self.line.kick();
        Ok(())
    }

    /// Power down to D3 (waits for requests in flight).
    ///
    /// # Errors
    /// As [`Plx::suspend`].
    pub fn suspend(&self) -> Result<()> {
        self.plx.suspend()
    }

    /// A buffer of `data` at `page_offset` in its first page, placed by the machine's default.
    ///
    /// # Errors
    /// The platform's allocation error.
    pub fn buffer_with(&self, data: &[u8], page_offset: u64) -> Result<SimBuffer> {
        let mut b = self.sim.allocate_buffer(data.len() as u64, page_offset)?;
        b.write(0, data)?;
        Ok(b)
    }

    /// A buffer of `data` placed by `placement`.
    ///
    /// # Errors
    /// The platform's allocation error.
    pub fn buffer_placed(
        &self,
        data: &[u8],
        page_offset: u64,
        placement: Placement,
    ) -> Result<SimBuffer> {
        let mut b = self
            .sim
            .allocate_buffer_with(data.len() as u64, page_offset, placement)?;
        b.write(0, data)?;
        Ok(b)
    }

    /// Write `data` (from a buffer at `page_offset`) to the device.
    ///
    /// # Errors
    /// Allocation or submission errors.
    pub fn write(&self, data: &[u8], page_offset: u64) -> Result<RequestHandle<SimBuffer>> {
        self.plx.write(self.buffer_with(data, page_offset)?)
    }

    /// Read `length` bytes from the device into a fresh buffer at `page_offset`.
    ///
    /// # Errors
    /// Allocation or submission errors; a zero length is refused by the platform.
    pub fn read(&self, length: u64, page_offset: u64) -> Result<RequestHandle<SimBuffer>> {
        self.plx
            .read(self.sim.allocate_buffer(length, page_offset)?)
    }

    /// Wait until no interrupt delivery is pending or running and the DPC is idle, at most
    /// `timeout`. `true` if everything settled.
    pub fn settle(&self, timeout: Duration) -> bool {
        self.line.settle(timeout)
    }

    /// Remove the device (D3Final with the soft reset, delete), stop the interrupt controller,
    /// and check the machine: chip idle with its line low, pools full, sanitizer record empty.
    ///
    /// # Errors
    /// Everything found, one item per line.
    pub fn shut_down(self) -> core::result::Result<(), String> {
        let mut problems = Vec::new();
        // Removal waits for requests in flight (as WDF does); one that can never complete
        // would hang it, so report it instead and leave the board to be dropped.
        if !self.settle(Duration::from_secs(10)) || self.plx.requests_in_flight() > 0 {
            return Err(format!(
                "{} requests still in flight: not removing the device",
                self.plx.requests_in_flight()
            ));
        }
        if let Err(e) = self.plx.remove() {
            problems.push(format!("remove: {e}"));
        }
        self.line.stop();
        self.chip.clear_line_listener();
        if let Err(e) = self.chip.check_idle() {
            problems.push(e);
        }
        let stats = self.plx.interrupt_stats();
        if stats.dpc_panics > 0 {
            problems.push(format!("{} DPC panics", stats.dpc_panics));
        }
        if let Err(e) = self.sim.check_clean() {
            problems.push(e);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }
}

impl Drop for SimBoard {
    fn drop(&mut self) {
        self.line.stop();
        self.chip.clear_line_listener();
    }
}

/// A thread that lets virtual time pass for a chip in deferred mode: `step_ns` of virtual time
/// every `period` of real time, until dropped (which stops and joins it).
pub struct VirtualClock {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VirtualClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtualClock").finish_non_exhaustive()
    }
}

impl VirtualClock {
    /// Start the clock of `chip`.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn start(
        chip: SimPlx9656,
        step_ns: u64,
        period: Duration,
    ) -> core::result::Result<Self, String> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("plx-clock".into())
            .spawn(move || {
                // ORDERING: a stop request; nothing else is published through it.
                while !flag.load(Ordering::Relaxed) {
                    chip.advance(step_ns);
                    std::thread::sleep(period);
                }
            })
            .map_err(|e| format!("clock thread: {e}"))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for VirtualClock {
    fn drop(&mut self) {
        // ORDERING: as in `start`.
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The chip's events as `device.*` tracing events (docs/TRACING.md).
#[cfg(feature = "tracing")]
fn trace_chip_event(event: dmatx_sim::Plx9656Event) {
    use dmatx_sim::Plx9656EventKind as K;
    let channel = event.channel.unwrap_or(0) as u64;
    match event.kind {
        K::Start { start } => {
            tracing::event!(name: "device.start", target: "dmatx_plx", tracing::Level::DEBUG, channel, start);
        }
        K::Done { bytes, outcome } => {
            let outcome = format!("{outcome:?}");
            tracing::event!(name: "device.done", target: "dmatx_plx", tracing::Level::DEBUG, channel, bytes, outcome = outcome.as_str());
        }
        K::IrqRaised { .. } => {
            tracing::event!(name: "device.irq", target: "dmatx_plx", tracing::Level::DEBUG, channel);
        }
        K::LineAsserted => {
            tracing::event!(name: "device.line", target: "dmatx_plx", tracing::Level::DEBUG, {});
        }
        _ => {}
    }
}
