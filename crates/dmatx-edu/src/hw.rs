//! The edu device as QEMU's `docs/specs/edu.rst` describes it: register offsets in BAR0, their
//! bits, and the DMA buffer. The driver's own reading of the device, kept apart from the
//! simulator's (a test checks that the two agree).

/// What the identification register reads: `0x010000ed` (major 1, minor 0).
pub const ID: u32 = 0x0100_00ed;
/// The smallest BAR0 the driver accepts: every register it uses lies below.
pub const BAR0_MIN: u64 = 0x100;
/// Device address of the DMA buffer.
pub const DMA_BUFFER: u64 = 0x4_0000;
/// Size of the DMA buffer: the longest transfer the device takes.
pub const DMA_BUFFER_SIZE: u64 = 4096;
/// Bits of a RAM-side DMA address the device keeps (it masks the rest away silently).
pub const DMA_ADDRESS_BITS: u8 = 28;
/// The longest transfer QEMU before 10.0.2 takes without aborting: its range check refuses a
/// DMA ending exactly at the end of the buffer (QEMU 7.2's off-by-one).
pub const ERRATUM_MAX_TRANSFER: u64 = DMA_BUFFER_SIZE - 1;

/// Register offsets in BAR0.
pub mod reg {
    /// Identification (read-only).
    pub const ID: u64 = 0x00;
    /// Liveness check: reads the complement of the value written.
    pub const LIVENESS: u64 = 0x04;
    /// Factorial: write n, read n! once [`super::status::COMPUTING`] clears.
    pub const FACTORIAL: u64 = 0x08;
    /// Status.
    pub const STATUS: u64 = 0x20;
    /// Interrupt status (read-only).
    pub const IRQ_STATUS: u64 = 0x24;
    /// Interrupt raise.
    pub const IRQ_RAISE: u64 = 0x60;
    /// Interrupt acknowledge: clears the bits written.
    pub const IRQ_ACK: u64 = 0x64;
    /// DMA source address (64-bit; a 4-byte write sets it whole).
    pub const DMA_SRC: u64 = 0x80;
    /// DMA destination address.
    pub const DMA_DST: u64 = 0x88;
    /// DMA byte count.
    pub const DMA_COUNT: u64 = 0x90;
    /// DMA command.
    pub const DMA_CMD: u64 = 0x98;
}

/// Status register bits.
pub mod status {
    /// A factorial is being computed.
    pub const COMPUTING: u32 = 0x01;
    /// Raise [`super::irq::FACTORIAL`] when a factorial is done.
    pub const IRQ_FACTORIAL: u32 = 0x80;
}

/// Interrupt status bits.
pub mod irq {
    /// A factorial finished.
    pub const FACTORIAL: u32 = 0x0000_0001;
    /// A DMA finished.
    pub const DMA: u32 = 0x0000_0100;
}

/// DMA command bits.
pub mod cmd {
    /// Start; reads 1 while the DMA runs.
    pub const RUN: u32 = 0x1;
    /// Direction: device → RAM (clear: RAM → device).
    pub const TO_RAM: u32 = 0x2;
    /// Raise [`super::irq::DMA`] when done.
    pub const IRQ: u32 = 0x4;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_driver_and_the_simulated_device_agree() {
        use dmatx_sim::edu_reg as sim;
        assert_eq!(ID, dmatx_sim::EDU_ID);
        assert_eq!(DMA_BUFFER, dmatx_sim::EDU_DMA_BUFFER);
        assert_eq!(DMA_BUFFER_SIZE, dmatx_sim::EDU_DMA_BUFFER_SIZE);
        assert_eq!((1u64 << DMA_ADDRESS_BITS) - 1, dmatx_sim::EDU_DMA_MASK);
        let pairs = [
            (reg::ID, sim::ID),
            (reg::LIVENESS, sim::LIVENESS),
            (reg::FACTORIAL, sim::FACTORIAL),
            (reg::STATUS, sim::STATUS),
            (reg::IRQ_STATUS, sim::IRQ_STATUS),
            (reg::IRQ_RAISE, sim::IRQ_RAISE),
            (reg::IRQ_ACK, sim::IRQ_ACK),
            (reg::DMA_SRC, sim::DMA_SRC),
            (reg::DMA_DST, sim::DMA_DST),
            (reg::DMA_COUNT, sim::DMA_COUNT),
            (reg::DMA_CMD, sim::DMA_CMD),
        ];
        for (driver, model) in pairs {
            assert_eq!(driver, model);
        }
        assert_eq!(
            [cmd::RUN, cmd::TO_RAM, cmd::IRQ, irq::DMA, irq::FACTORIAL],
            [
                sim::CMD_RUN,
                sim::CMD_TO_RAM,
                sim::CMD_IRQ,
                sim::IRQ_DMA,
                sim::IRQ_FACTORIAL
            ]
        );
        assert_eq!(
            [status::COMPUTING, status::IRQ_FACTORIAL],
            [sim::STATUS_COMPUTING, sim::STATUS_IRQ_FACTORIAL]
        );
    }
}
