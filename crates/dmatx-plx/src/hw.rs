//! The PCI9656 as the sample's `Reg9656.h` and `Private.h` describe it (`samples.md` §1.1):
//! register offsets in BAR0, their bits, the scatter/gather descriptor, and the limits.

/// BAR0's size: the register file.
pub const BAR0_SIZE: u64 = 0x200;
/// BAR2's size: the local SRAM (`PCI9656_SRAM_SIZE`).
pub const SRAM_SIZE: u64 = 0x2_0000;
/// The enabler's maximum transfer length (`PCI9656_MAXIMUM_TRANSFER_LENGTH`).
pub const MAXIMUM_TRANSFER_LENGTH: u64 = 8 * 1024;
/// Descriptors per common buffer and the enabler's SG element limit: pages spanned by a
/// maximum transfer, plus one.
pub const DTE_COUNT: u64 = MAXIMUM_TRANSFER_LENGTH.div_ceil(4096) + 1;
/// The alignment mask the driver asks for (`FILE_OCTA_ALIGNMENT`): descriptors are 16-byte
/// aligned because the next pointer keeps 4 flag bits.
pub const ALIGNMENT_MASK: u64 = 15;

/// `Int_Csr` (INTCSR).
pub const INTCSR: u64 = 0x068;
/// `EEPROM_Ctrl_Stat` (CNTRL).
pub const CNTRL: u64 = 0x06C;
/// `Dma0_Mode` / `Dma1_Mode` (DMAMODEx).
pub const DMA_MODE: [u64; 2] = [0x080, 0x094];
/// `Dma0_Desc_Ptr` / `Dma1_Desc_Ptr` (DMADPRx).
pub const DMA_DESC_PTR: [u64; 2] = [0x090, 0x0A4];
/// `Dma0_Csr` / `Dma1_Csr` (DMACSRx): byte registers.
pub const DMA_CSR: [u64; 2] = [0x0A8, 0x0A9];
/// `Dma0_PCI_DAC` / `Dma1_PCI_DAC`: the upper 32 address bits.
pub const DMA_DAC: [u64; 2] = [0x0B4, 0x0B8];

/// INTCSR bits.
pub mod intcsr {
    /// `PciIntEnable`: the master enable.
    pub const PCI_INT_ENABLE: u32 = 1 << 8;
    /// `DmaChan0IntEnable`, `DmaChan1IntEnable`.
    pub const DMA_INT_ENABLE: [u32; 2] = [1 << 18, 1 << 19];
    /// `DmaChan0IntActive`, `DmaChan1IntActive` (read-only).
    pub const DMA_INT_ACTIVE: [u32; 2] = [1 << 21, 1 << 22];
    /// Abort status bits (the sample never reads them): 10, 14, 24–27.
    pub const ABORT_BITS: u32 = (1 << 10) | (1 << 14) | (0xF << 24);
    /// DMA channel 0 / 1 was bus master when an abort happened (write-one-to-clear).
    pub const WAS_BUS_MASTER: [u32; 2] = [1 << 25, 1 << 26];
}

/// CNTRL bits.
pub mod cntrl {
    /// `SoftwareReset`: set, wait 100 ms, clear.
    pub const SOFTWARE_RESET: u32 = 1 << 30;
}

/// DMAMODEx bits.
pub mod mode {
    /// `SgModeEnable`.
    pub const SG_MODE: u32 = 1 << 9;
    /// `DoneIntEnable`.
    pub const DONE_INT_ENABLE: u32 = 1 << 10;
    /// `ClearCountMode`: the chip zeroes each completed descriptor's size.
    pub const CLEAR_COUNT: u32 = 1 << 16;
    /// `IntToPci`: route the channel's interrupt to INTA#.
    pub const INT_TO_PCI: u32 = 1 << 17;
}

/// DMADPRx bits (also a descriptor's next pointer).
pub mod dpr {
    /// `DescLocation`: the descriptor is in host (PCI) memory.
    pub const DESC_LOCATION_PCI: u32 = 1 << 0;
    /// `LastElement`: end of chain.
    pub const LAST_ELEMENT: u32 = 1 << 1;
    /// `TermCountInt`: interrupt after this block.
    pub const TERM_COUNT_INT: u32 = 1 << 2;
    /// `DirOfTransfer`: 1 = local → PCI (a read), 0 = PCI → local (a write).
    pub const DIR_LOCAL_TO_PCI: u32 = 1 << 3;
    /// The address bits (31:4).
    pub const ADDRESS_MASK: u32 = !0xF;
}

/// DMACSRx bits (a byte).
pub mod csr {
    /// `Enable`.
    pub const ENABLE: u8 = 1 << 0;
    /// `Start` (write-only).
    pub const START: u8 = 1 << 1;
    /// `Abort` (write-only).
    pub const ABORT: u8 = 1 << 2;
    /// `Clear`: clears the channel's interrupt (write-only).
    pub const CLEAR: u8 = 1 << 3;
    /// `Done` (read-only).
    pub const DONE: u8 = 1 << 4;
}

/// A scatter/gather descriptor (`DMA_TRANSFER_ELEMENT`): 32 bytes, 16-byte aligned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dte {
    /// `PciAddressLow`.
    pub pci_address_low: u32,
    /// `LocalAddress`: the SRAM offset.
    pub local_address: u32,
    /// `TransferSize` (zeroed by the chip in clear-count mode when the block completes).
    pub transfer_size: u32,
    /// `DescPtr`: flags and the next descriptor's address.
    pub desc_ptr: u32,
    /// `PciAddressHigh` (read by the chip only with DACChainLoad).
    pub pci_address_high: u32,
}

impl Dte {
    /// A descriptor's size in bytes.
    pub const SIZE: u64 = 32;
    /// Offset of `TransferSize` within a descriptor.
    pub const TRANSFER_SIZE_OFFSET: u64 = 8;

    /// The descriptor as it lies in memory.
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut out = [0; 32];
        let words = [
            self.pci_address_low,
            self.local_address,
            self.transfer_size,
            self.desc_ptr,
            self.pci_address_high,
        ];
        for (chunk, word) in out.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        out
    }

    /// A descriptor read from memory.
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        let word = |i: usize| {
            u32::from_le_bytes([
                bytes[4 * i],
                bytes[4 * i + 1],
                bytes[4 * i + 2],
                bytes[4 * i + 3],
            ])
        };
        Self {
            pci_address_low: word(0),
            local_address: word(1),
            transfer_size: word(2),
            desc_ptr: word(3),
            pci_address_high: word(4),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_round_trip_little_endian() {
        let d = Dte {
            pci_address_low: 0x1234_5678,
            local_address: 0x2000,
            transfer_size: 4096,
            desc_ptr: 0xABCD_EF00 | dpr::DESC_LOCATION_PCI | dpr::LAST_ELEMENT,
            pci_address_high: 1,
        };
        let bytes = d.to_bytes();
        assert_eq!(&bytes[8..12], &4096u32.to_le_bytes());
        assert_eq!(&bytes[20..32], &[0; 12]);
        assert_eq!(Dte::from_bytes(&bytes), d);
    }

    #[test]
    fn the_driver_and_the_simulated_chip_agree_on_the_windows() {
        // Two independent descriptions of one chip (the driver's header, the model's
        // datasheet reading): their sizes must match.
        assert_eq!(BAR0_SIZE, dmatx_sim::PLX9656_BAR0_SIZE);
        assert_eq!(SRAM_SIZE, dmatx_sim::PLX9656_SRAM_SIZE);
    }

    #[test]
    fn the_limits_are_the_samples() {
        assert_eq!(DTE_COUNT, 3);
        assert_eq!(DTE_COUNT * Dte::SIZE, 96);
    }
}
