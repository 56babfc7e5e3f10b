//! Directions, profiles and DMA versions (spec §1.1).

use crate::Error;

/// Direction of a transfer, seen from the device (KMDF's `WDF_DMA_DIRECTION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The device writes into memory (a read request). KMDF value 0 (`FALSE`).
    ReadFromDevice,
    /// The device reads from memory (a write request). KMDF value 1 (`TRUE`).
    WriteToDevice,
}

impl Direction {
    /// Both directions, in KMDF's index order.
    pub const ALL: [Direction; 2] = [Direction::ReadFromDevice, Direction::WriteToDevice];

    /// The direction with KMDF's raw value (0 = read from device, 1 = write to device).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for any other value. A typed [`Direction`] cannot be
    /// invalid, so this is the one place where KMDF's "invalid direction" checks apply.
    pub const fn from_raw(raw: u32) -> Result<Self, Error> {
        match raw {
            0 => Ok(Direction::ReadFromDevice),
            1 => Ok(Direction::WriteToDevice),
            _ => Err(Error::InvalidParameter),
        }
    }

    /// KMDF's index for per-direction records: read = 0, write = 1.
    #[inline]
    pub const fn index(self) -> usize {
        match self {
            Direction::ReadFromDevice => 0,
            Direction::WriteToDevice => 1,
        }
    }
}

/// DMA version of an enabler (WDM DMA operations version 2 or 3, spec §3.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DmaVersion {
    /// Version 2: one packet transaction per device at a time, no cancel, no immediate
    /// execution, no reservation, no single-transfer requirement.
    V2,
    /// Version 3: queued channel allocation, cancel, immediate execution, reservation,
    /// single-transfer requirement, chained buffers in packet mode.
    V3,
}

/// The kind of transaction an enabler's profile creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransactionKind {
    /// One contiguous bus-address run per transfer.
    Packet,
    /// A scatter/gather list per transfer.
    ScatterGather,
    /// System-mode DMA through a shared system DMA controller.
    System,
}

/// Enabler profile (`WDF_DMA_PROFILE`). The raw value 0 (`WdfDmaProfileInvalid`) has no
/// variant; [`Profile::from_raw`] rejects it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Profile {
    /// Bus-master, one element per transfer, 32-bit addresses.
    Packet = 1,
    /// Bus-master scatter/gather, 32-bit addresses.
    ScatterGather = 2,
    /// Bus-master, one element per transfer, 64-bit addresses.
    Packet64 = 3,
    /// Bus-master scatter/gather, 64-bit addresses.
    ScatterGather64 = 4,
    /// Bus-master scatter/gather, 32-bit, separate read and write adapters.
    ScatterGatherDuplex = 5,
    /// Bus-master scatter/gather, 64-bit, separate read and write adapters.
    ScatterGather64Duplex = 6,
    /// System-mode DMA (no bus-master engine), one channel.
    System = 7,
    /// System-mode DMA with separate read and write channels.
    SystemDuplex = 8,
}

impl Profile {
    /// All eight profiles in KMDF order.
    pub const ALL: [Profile; 8] = [
        Profile::Packet,
        Profile::ScatterGather,
        Profile::Packet64,
        Profile::ScatterGather64,
        Profile::ScatterGatherDuplex,
        Profile::ScatterGather64Duplex,
        Profile::System,
        Profile::SystemDuplex,
    ];

    /// The profile with KMDF's raw value (1..=8).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for 0 (`WdfDmaProfileInvalid`) or anything above 8
    /// (statement 2).
    pub const fn from_raw(raw: u32) -> Result<Self, Error> {
        match raw {
            1..=8 => Ok(Self::ALL[raw as usize - 1]),
            _ => Err(Error::InvalidParameter),
        }
    }

    /// KMDF's raw value.
    pub const fn raw(self) -> u32 {
        self as u32
    }

    /// Whether the device is a bus master (has its own DMA engine).
    pub const fn is_bus_master(self) -> bool {
        !matches!(self, Profile::System | Profile::SystemDuplex)
    }

    /// Whether the device takes scatter/gather lists.
    pub const fn is_scatter_gather(self) -> bool {
        matches!(
            self,
            Profile::ScatterGather
                | Profile::ScatterGather64
                | Profile::ScatterGatherDuplex
                | Profile::ScatterGather64Duplex
        )
    }

    /// Whether reads and writes use separate adapters.
    pub const fn is_duplex(self) -> bool {
        matches!(
            self,
            Profile::ScatterGatherDuplex | Profile::ScatterGather64Duplex | Profile::SystemDuplex
        )
    }

    /// Whether this is a system-mode profile.
    pub const fn is_system(self) -> bool {
        !self.is_bus_master()
    }

    /// Device address width implied by the profile: 32 or 64, or `None` for system profiles
    /// (the platform decides).
    pub const fn address_bits(self) -> Option<u8> {
        match self {
            Profile::Packet | Profile::ScatterGather | Profile::ScatterGatherDuplex => Some(32),
            Profile::Packet64 | Profile::ScatterGather64 | Profile::ScatterGather64Duplex => {
                Some(64)
            }
            Profile::System | Profile::SystemDuplex => None,
        }
    }

    /// The transaction kind this profile creates.
    pub const fn transaction_kind(self) -> TransactionKind {
        if self.is_system() {
            TransactionKind::System
        } else if self.is_scatter_gather() {
            TransactionKind::ScatterGather
        } else {
            TransactionKind::Packet
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_round_trip_and_rejects() {
        for p in Profile::ALL {
            assert_eq!(Profile::from_raw(p.raw()), Ok(p));
        }
        assert_eq!(Profile::from_raw(0), Err(Error::InvalidParameter));
        assert_eq!(Profile::from_raw(9), Err(Error::InvalidParameter));
        assert_eq!(Direction::from_raw(2), Err(Error::InvalidParameter));
        assert_eq!(Direction::from_raw(1), Ok(Direction::WriteToDevice));
    }

    #[test]
    fn profile_table_matches_spec() {
        use Profile::*;
        let rows = [
            (Packet, true, false, Some(32), false),
            (ScatterGather, true, true, Some(32), false),
            (Packet64, true, false, Some(64), false),
            (ScatterGather64, true, true, Some(64), false),
            (ScatterGatherDuplex, true, true, Some(32), true),
            (ScatterGather64Duplex, true, true, Some(64), true),
            (System, false, false, None, false),
            (SystemDuplex, false, false, None, true),
        ];
        for (p, master, sg, bits, duplex) in rows {
            assert_eq!(p.is_bus_master(), master, "{p:?}");
            assert_eq!(p.is_scatter_gather(), sg, "{p:?}");
            assert_eq!(p.address_bits(), bits, "{p:?}");
            assert_eq!(p.is_duplex(), duplex, "{p:?}");
        }
    }
}
