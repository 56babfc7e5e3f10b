//! dmatx-plx: Microsoft's PLX9x5x KMDF sample driver (a PLX PCI9656 bridge with two
//! scatter/gather DMA channels and 128 KiB of local SRAM) ported onto dmatx and its runtime.
//!
//! Work in progress: the hardware description ([`hw`]) is in; the driver port follows.

pub mod hw;
