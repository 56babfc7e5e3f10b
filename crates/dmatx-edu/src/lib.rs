//! dmatx-edu: a driver for QEMU's `edu` PCI device on dmatx and its runtime — one library,
//! generic over the platform, that runs on the simulated machine and, through VFIO, on a real
//! QEMU guest.
//!
//! * [`hw`]: the device's registers and limits (QEMU's `docs/specs/edu.rst`).
//! * [`driver`]: the driver: [`edu_device_add`] makes the device object, its DMA enabler
//!   (packet profile, 28-bit addresses, maximum transfer [`EduConfig::max_transfer`], DMA v3),
//!   two transactions, a parallel queue, the interrupt (ISR and DPC) and the timers;
//!   [`Edu::prepare_hardware`] takes BAR0 and checks the ID; [`Edu::start`] powers up;
//!   [`Edu::write`], [`Edu::read`] and [`Edu::loopback`] issue requests; [`Edu::remove`].
//! * [`sim`]: the board on the simulated machine ([`dmatx_sim::SimEdu`] plus the driver and an
//!   interrupt controller thread).
//!
//! On another platform the wiring is the board's, with the platform's pieces:
//! `edu_device_add::<P, M>(DmaDevice::new(platform), config)`, then
//! `prepare_hardware(bar0)` with the mapped BAR (`Arc<dyn RegisterWindow>`), `start()`, and
//! the interrupt delivered by calling `edu.interrupt().raise(0)` — once per MSI message, or
//! while INTx is asserted. `raise` runs the ISR on the calling thread, and the ISR has
//! acknowledged the device (register 0x64) when it returns, so INTx can be unmasked then.
//!
//! # The QEMU 7.2 erratum
//! QEMU before 10.0.2 aborts on an edu DMA that ends exactly at the end of the device buffer
//! (an off-by-one in its range check). The project's guest tier runs QEMU 10.0.2, where it is
//! fixed, so the driver's default transfer is the whole 4096-byte buffer.
//! `EduConfig { max_transfer: hw::ERRATUM_MAX_TRANSFER, .. }` (4095) is the erratum setting for
//! an older QEMU; [`dmatx_sim::SimEduConfig::erratum_end_abort`] models the bug, and the tests
//! show both sides: 4096-byte transfers are refused there and time out, 4095 work.
//!
//! ```
//! use dmatx_edu::sim::{BoardConfig, SimEduBoard};
//! use std::time::Duration;
//!
//! let board = SimEduBoard::new(BoardConfig::default()).unwrap();
//! let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
//! // Through the device's 4 KiB buffer, 4096 bytes at a time, both ways.
//! let h = board.loopback(&data, 0x80, 0).unwrap();
//! let done = h.wait_timeout(Duration::from_secs(10)).unwrap();
//! assert_eq!((done.status, done.information), (Ok(()), 10_000));
//! let mut back = vec![0; 10_000];
//! h.output().unwrap().read(0, &mut back).unwrap();
//! assert_eq!(back, data);
//! assert_eq!(board.edu().stats().transfers(), 6);
//! assert_eq!(board.edu().factorial(10), Ok(3_628_800));
//! drop(h);
//! board.shut_down().unwrap();
//! ```
#![deny(unsafe_code)]

pub mod driver;
pub mod hw;
pub mod sim;

pub use driver::{
    Completion, Edu, EduBuffer, EduConfig, EduContext, EduStats, IOCTL_EDU_LOOPBACK, PrepareError,
    edu_device_add,
};
