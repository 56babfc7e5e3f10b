//! dmatx-plx: Microsoft's PLX9x5x KMDF sample driver (a PLX PCI9656 bridge with two
//! scatter/gather DMA channels and 128 KiB of local SRAM) ported onto dmatx and its runtime.
//!
//! * [`hw`]: the chip as the sample's headers describe it — registers, bits, the descriptor.
//! * [`driver`]: the port, generic over the platform and the request buffers; one function per
//!   sample function, named after it. The faithful port keeps the sample's defects; the
//!   hardened variant ([`driver::Variant::Hardened`]) fixes them.
//! * [`sim`]: the board on the simulated machine — the chip model, the driver added, prepared
//!   and started, and an interrupt controller delivering the chip's line.
//! * [`scenarios`]: the sample scenarios P1–P19 of `samples.md` §4.3, each a run on a fresh
//!   board with its expected observations checked.
//!
//! ```
//! use dmatx_plx::sim::{BoardConfig, SimBoard};
//! use std::time::Duration;
//!
//! let board = SimBoard::new(BoardConfig::default()).unwrap();
//! let write = board.write(&[0xAB; 1024], 0).unwrap();
//! let done = write.wait_timeout(Duration::from_secs(10)).unwrap();
//! assert_eq!((done.status, done.information), (Ok(()), 1024));
//! let read = board.read(1024, 0).unwrap();
//! let done = read.wait_timeout(Duration::from_secs(10)).unwrap();
//! assert_eq!(done.information, 1024);
//! assert_eq!(read.output().unwrap().to_vec(), vec![0xAB; 1024]);
//! drop((write, read));
//! board.shut_down().unwrap();
//! ```
#![deny(unsafe_code)]

pub mod driver;
pub mod hw;
pub mod scenarios;
pub mod sim;
