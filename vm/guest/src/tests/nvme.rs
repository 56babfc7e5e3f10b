//! Tests on QEMU's NVMe controller (`1b36:0010`).
//!
//! For now only what sysfs shows; the driver tests over `dmatx-vfio` (controller registers,
//! admin queue, IDENTIFY by polling and by MSI-X) belong here.

use crate::env::{Env, NVME_ID};
use crate::runner::{Test, TestResult};

/// PCI class code of an NVMe controller: mass storage (0x01), non-volatile memory (0x08),
/// NVM Express (0x02), as bytes 9..12 of the configuration space (low byte first).
const NVME_CLASS: [u8; 3] = [0x02, 0x08, 0x01];

/// Bytes of BAR 0 a driver maps: the registers and the first doorbells.
const NVME_REGISTERS: u64 = 0x2000;

/// The NVMe tests.
pub const TESTS: &[Test] = &[Test {
    name: "nvme.present",
    run: present,
}];

/// At least one QEMU NVMe controller is there, and each has its IDs and the NVMe class code in
/// its configuration space and a BAR 0 that holds the registers.
fn present(env: &Env) -> TestResult {
    if env.nvme.is_empty() {
        return Err(env.none_found("nvme", NVME_ID));
    }
    for nvme in &env.nvme {
        let config = nvme.config(12)?;
        let ids = [NVME_ID.0.to_le_bytes(), NVME_ID.1.to_le_bytes()].concat();
        if config[..4] != ids[..] || config[9..12] != NVME_CLASS {
            return Err(format!(
                "{}: config space IDs {:02x?} class {:02x?}, expected {ids:02x?} class {NVME_CLASS:02x?}",
                nvme.address,
                &config[..4],
                &config[9..12]
            ));
        }
        let size = nvme.bar_size(0)?;
        if size < NVME_REGISTERS {
            return Err(format!(
                "{}: BAR 0 is {size:#x} bytes, less than the {NVME_REGISTERS:#x} of registers",
                nvme.address
            ));
        }
    }
    Ok(())
}
