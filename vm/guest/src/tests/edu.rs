//! Tests on QEMU's `edu` device (`1234:11e8`).
//!
//! For now only what sysfs shows; the driver tests over `dmatx-vfio` and `dmatx-edu` (ID
//! register, DMA round trips up to [`Env::edu_max_transfer`] bytes, interrupts) belong here.

use crate::env::{EDU_ID, Env};
use crate::runner::{Test, TestResult};

/// Size of the edu device's BAR 0 (its registers).
const EDU_BAR0_SIZE: u64 = 1 << 20;

/// The edu tests.
pub const TESTS: &[Test] = &[Test {
    name: "edu.present",
    run: present,
}];

/// At least one edu device is there, and each has edu's IDs in its configuration space and a
/// 1 MiB BAR 0.
fn present(env: &Env) -> TestResult {
    if env.edu.is_empty() {
        return Err(env.none_found("edu", EDU_ID));
    }
    for edu in &env.edu {
        let config = edu.config(4)?;
        let expected = [EDU_ID.0.to_le_bytes(), EDU_ID.1.to_le_bytes()].concat();
        if config != expected {
            return Err(format!(
                "{}: config space starts {config:02x?}, expected {expected:02x?}",
                edu.address
            ));
        }
        let size = edu.bar_size(0)?;
        if size != EDU_BAR0_SIZE {
            return Err(format!(
                "{}: BAR 0 is {size:#x} bytes, expected {EDU_BAR0_SIZE:#x}",
                edu.address
            ));
        }
    }
    Ok(())
}
