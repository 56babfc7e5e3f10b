//! The edu board on the simulated machine: a [`SimEdu`] on the enabler's adapter, the driver
//! added, prepared and started, and an interrupt controller thread that delivers the device's
//! interrupt to the driver's ISR.
//!
//! The device's listener (called on each INTx rising edge or MSI message, on whatever thread
//! made the change) only wakes the controller, which calls
//! [`Interrupt::raise`](dmatx_runtime::Interrupt::raise)`(0)` while the device's interrupt
//! status is non-zero — as a level-triggered line keeps interrupting until acknowledged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmatx::{Direction, DmaDevice, Result};
use dmatx_runtime::{LevelLine, RequestHandle};
use dmatx_sim::{AdapterMode, SimBuffer, SimConfig, SimEdu, SimEduConfig, SimPlatform};

use crate::driver::{Edu, EduConfig, edu_device_add};

/// The driver on the simulated machine.
pub type SimEduDriver = Edu<SimPlatform, SimBuffer>;

/// How to build a [`SimEduBoard`].
#[derive(Clone, Debug)]
pub struct BoardConfig {
    /// The machine. The default maps through an IOMMU, as VFIO does: each transfer is one
    /// contiguous bus range below 2²⁸ whatever the buffer's pages.
    pub sim: SimConfig,
    /// Map registers of the enabler's adapter; `None` keeps the machine's default (32).
    pub map_registers: Option<u32>,
    /// The device.
    pub edu: SimEduConfig,
    /// The driver.
    pub driver: EduConfig,
}

impl Default for BoardConfig {
    fn default() -> Self {
        Self {
            sim: SimConfig::new().mode(AdapterMode::Iommu),
            map_registers: None,
            edu: SimEduConfig::default(),
            driver: EduConfig::default(),
        }
    }
}

impl BoardConfig {
    /// This configuration with the adapter granting exactly one maximum transfer's map
    /// registers (the VFIO platform's default: max_transfer / 4096 + 1), so a second
    /// transaction waits for the first (DMA v3 queuing).
    pub fn one_transfer_of_registers(mut self) -> Self {
        self.map_registers = Some((self.driver.transfer_length() / 4096 + 1) as u32);
        self
    }
}

/// An edu device with its driver on the simulated machine.
pub struct SimEduBoard {
    sim: SimPlatform,
    chip: SimEdu,
    edu: SimEduDriver,
    line: LevelLine,
}

impl std::fmt::Debug for SimEduBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimEduBoard")
            .field("chip", &self.chip)
            .field("edu", &self.edu)
            .finish_non_exhaustive()
    }
}

impl SimEduBoard {
    /// Build the machine, add the driver, plug the device in on the enabler's adapter,
    /// prepare the hardware with its BAR0, connect the interrupt and start the device (D0).
    ///
    /// # Errors
    /// The platform's or the driver's error, as a message (a wrong ID register names what it
    /// read); nothing is left running.
    pub fn new(config: BoardConfig) -> core::result::Result<Self, String> {
        let sim =
            SimPlatform::with_config(config.sim.clone()).map_err(|e| format!("machine: {e}"))?;
        if let Some(n) = config.map_registers {
            sim.push_adapter_config(config.sim.adapter.map_registers(n));
        }
        let edu: SimEduDriver = edu_device_add(DmaDevice::new(sim.clone()), config.driver)
            .map_err(|e| format!("device add: {e}"))?;
        let Some(adapter) = edu.enabler().adapter(Direction::ReadFromDevice).cloned() else {
            let _ = edu.remove();
            return Err("device add: the enabler has no adapter".into());
        };
        let chip = SimEdu::new(&adapter, config.edu).map_err(|e| {
            let _ = edu.remove();
            format!("device: {e}")
        })?;
        if let Err(e) = edu.prepare_hardware(Arc::new(chip.bar0())) {
            let _ = edu.remove();
            chip.shut_down();
            return Err(format!("prepare hardware: {e}"));
        }
        let line = {
            let chip = chip.clone();
            LevelLine::spawn("edu-intx", edu.interrupt(), move || chip.line_asserted())
        };
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                let _ = edu.remove();
                chip.shut_down();
                return Err(format!("interrupt controller: {e}"));
            }
        };
        chip.set_interrupt_listener(line.edge());
        let board = Self {
            sim,
            chip,
            edu,
            line,
        };
        board.edu.start().map_err(|e| format!("start: {e}"))?;
        Ok(board)
    }

    /// The machine.
    pub fn sim(&self) -> &SimPlatform {
        &self.sim
    }

    /// The device.
    pub fn chip(&self) -> &SimEdu {
        &self.chip
    }

    /// The driver.
    pub fn edu(&self) -> &SimEduDriver {
        &self.edu
    }

    /// A buffer holding `data`, starting at `page_offset` in its first page.
    ///
    /// # Errors
    /// The platform's allocation error.
    pub fn buffer_with(&self, data: &[u8], page_offset: u64) -> Result<SimBuffer> {
        let mut b = self.sim.allocate_buffer(data.len() as u64, page_offset)?;
        b.write(0, data)?;
        Ok(b)
    }

    /// Write `data` (from a buffer at `page_offset`) to the device.
    ///
    /// # Errors
    /// Allocation or submission errors.
    pub fn write(&self, data: &[u8], page_offset: u64) -> Result<RequestHandle<SimBuffer>> {
        self.edu.write(self.buffer_with(data, page_offset)?)
    }

    /// Read `length` bytes from the device into a fresh buffer at `page_offset`.
    ///
    /// # Errors
    /// Allocation or submission errors.
    pub fn read(&self, length: u64, page_offset: u64) -> Result<RequestHandle<SimBuffer>> {
        self.edu
            .read(self.sim.allocate_buffer(length, page_offset)?)
    }

    /// Loop `data` through the device: input at `page_offset`, output (zeroed) at
    /// `output_offset`.
    ///
    /// # Errors
    /// Allocation or submission errors.
    pub fn loopback(
        &self,
        data: &[u8],
        page_offset: u64,
        output_offset: u64,
    ) -> Result<RequestHandle<SimBuffer>> {
        let input = self.buffer_with(data, page_offset)?;
        let output = self.sim.allocate_buffer(data.len() as u64, output_offset)?;
        self.edu.loopback(input, output)
    }

    /// Wait until no interrupt delivery is pending or running and the DPC is idle, at most
    /// `timeout`. `true` if everything settled.
    pub fn settle(&self, timeout: Duration) -> bool {
        self.line.settle(timeout)
    }

    /// Remove the device, stop the interrupt controller and the device model, and check the
    /// machine: device idle, no DPC panic, every adapter's map registers free, no mapping
    /// live, the sanitizer record empty.
    ///
    /// # Errors
    /// Everything found, one item per line.
    pub fn shut_down(self) -> core::result::Result<(), String> {
        let mut problems = Vec::new();
        if !self.settle(Duration::from_secs(10)) {
            problems.push("interrupt delivery did not settle".to_string());
        }
        // A request's completion wakes its issuer before the queue forgets it: give the
        // completing thread (a DPC or a timer) a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.edu.requests_in_flight() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
        if self.edu.requests_in_flight() > 0 {
            problems.push(format!(
                "{} requests in flight at shut-down",
                self.edu.requests_in_flight()
            ));
        }
        if let Err(e) = self.edu.remove() {
            problems.push(format!("remove: {e}"));
        }
        self.line.stop();
        self.chip.clear_interrupt_listener();
        if let Err(e) = self.chip.check_idle() {
            problems.push(e);
        }
        self.chip.shut_down();
        let stats = self.edu.interrupt_stats();
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

impl Drop for SimEduBoard {
    fn drop(&mut self) {
        self.line.stop();
        self.chip.clear_interrupt_listener();
        self.chip.shut_down();
    }
}
