//! Tests on QEMU's NVMe controller (`1b36:0010`): groundwork for an NVMe driver on dmatx.
//!
//! The admin queue is brought up in dmatx common buffers — the VFIO platform's locked,
//! IOMMU-mapped memory — and IDENTIFY CONTROLLER is sent and its completion taken by polling
//! the phase tag or by MSI-X vector 0. NVMe 1.4 §3.1 (registers), §4.2/§4.6 (queue entries),
//! §5.15 (Identify), §7.6.1 (initialisation) and §7.6.2 (shutdown).

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use dmatx::hal::RegisterWindow;
use dmatx::{CommonBuffer, DmaDevice, Enabler, EnablerConfig, Profile};
use dmatx_vfio::{IommuMode, IrqKind, PlatformConfig, VfioContainer, VfioDevice, VfioPlatform};

use crate::env::{Env, NVME_ID};
use crate::runner::{Test, TestResult};

/// PCI class code of an NVMe controller: mass storage (0x01), non-volatile memory (0x08),
/// NVM Express (0x02), as bytes 9..12 of the configuration space (low byte first).
const NVME_CLASS: [u8; 3] = [0x02, 0x08, 0x01];

/// Bytes of BAR 0 a driver maps: the registers and the first doorbells.
const NVME_REGISTERS: u64 = 0x2000;

/// The NVMe tests.
pub const TESTS: &[Test] = &[
    Test {
        name: "nvme.present",
        run: present,
    },
    Test {
        name: "nvme.identify_polled",
        run: identify_polled,
    },
    Test {
        name: "nvme.identify_msix",
        run: identify_msix,
    },
];

fn identify_polled(env: &Env) -> TestResult {
    identify_each(env, Wait::Poll)
}

fn identify_msix(env: &Env) -> TestResult {
    identify_each(env, Wait::MsiX)
}

/// IDENTIFY every controller: QEMU's vendor ID, the serial number the guest tier gave it, and
/// a model and version that QEMU reports.
fn identify_each(env: &Env, wait: Wait) -> TestResult {
    if env.nvme.is_empty() {
        return Err(env.none_found("nvme", NVME_ID));
    }
    for nvme in &env.nvme {
        let id = identify(&nvme.address, wait)?;
        println!(
            "  {}: vid {:#06x} serial {:?} model {:?} version {}.{}.{}",
            nvme.address,
            id.vid,
            id.serial,
            id.model,
            id.ver >> 16,
            (id.ver >> 8) & 0xff,
            id.ver & 0xff
        );
        if id.vid != NVME_ID.0
            || id.serial != GUEST_SERIAL
            || !id.model.contains("QEMU")
            || id.ver < 0x1_0000
            || id.ver != id.vs
        {
            return Err(format!(
                "{}: IDENTIFY says vid {:#06x} serial {:?} model {:?} version {:#x} (VS {:#x}); expected vid {:#06x}, serial {GUEST_SERIAL:?}, a QEMU model, the version VS reports",
                nvme.address, id.vid, id.serial, id.model, id.ver, id.vs, NVME_ID.0
            ));
        }
    }
    Ok(())
}

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

/// The admin queue's depth (entries of the submission and of the completion queue).
const ADMIN_DEPTH: u16 = 16;
/// Bytes of a submission queue entry (NVMe 1.4 §4.2).
const SQE_BYTES: u64 = 64;
/// Bytes of a completion queue entry (§4.6).
const CQE_BYTES: u64 = 16;

/// Controller registers (§3.1).
mod reg {
    pub const CAP: u64 = 0x00;
    pub const VS: u64 = 0x08;
    pub const CC: u64 = 0x14;
    pub const CSTS: u64 = 0x1c;
    pub const AQA: u64 = 0x24;
    pub const ASQ: u64 = 0x28;
    pub const ACQ: u64 = 0x30;
    /// Submission queue 0's tail doorbell; the others follow at `4 << CAP.DSTRD` strides.
    pub const DOORBELLS: u64 = 0x1000;
}

/// CC: enable, 4 KiB pages, NVM command set, round robin, 64-byte SQ and 16-byte CQ entries.
const CC_ENABLE: u32 = 1 | (6 << 16) | (4 << 20);
/// CC.SHN = normal shutdown.
const CC_SHUTDOWN_NORMAL: u32 = 1 << 14;
const CSTS_RDY: u32 = 1;
const CSTS_CFS: u32 = 1 << 1;
const CSTS_SHST_MASK: u32 = 3 << 2;
const CSTS_SHST_COMPLETE: u32 = 2 << 2;

/// Admin opcode IDENTIFY (§5.15) and its CNS for the controller data structure.
const OPC_IDENTIFY: u32 = 0x06;
const CNS_CONTROLLER: u32 = 0x01;
/// Bytes of the IDENTIFY data.
const IDENTIFY_BYTES: u64 = 4096;
/// The serial number the guest tier gives QEMU's controller (`-device nvme,serial=...`).
const GUEST_SERIAL: &str = "dmatx0";

/// How a test waits for the admin completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// Poll the completion entry's phase tag.
    Poll,
    /// Sleep until MSI-X vector 0 fires.
    MsiX,
}

/// A signal from the interrupt thread: a count and a condition variable.
#[derive(Default)]
struct Doorbell {
    count: Mutex<u64>,
    rang: Condvar,
}

impl Doorbell {
    fn ring(&self) {
        *lock(&self.count) += 1;
        self.rang.notify_all();
    }

    /// Wait until the count passes `seen`; the new count, or `None` after `timeout`.
    fn wait_past(&self, seen: u64, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        let mut count = lock(&self.count);
        while *count <= seen {
            let left = deadline.checked_duration_since(Instant::now())?;
            count = self
                .rang
                .wait_timeout(count, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Some(*count)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> TestResult {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > timeout {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    Ok(())
}

/// The fields of IDENTIFY CONTROLLER the tests check (§5.15.2.2).
struct Identity {
    vid: u16,
    serial: String,
    model: String,
    ver: u32,
    /// The VS register, read before the controller was enabled.
    vs: u32,
}

impl Identity {
    fn parse(data: &[u8], vs: u32) -> Self {
        let text =
            |r: std::ops::Range<usize>| String::from_utf8_lossy(&data[r]).trim_end().to_owned();
        Self {
            vid: u16::from_le_bytes([data[0], data[1]]),
            serial: text(4..24),
            model: text(24..64),
            ver: u32::from_le_bytes([data[80], data[81], data[82], data[83]]),
            vs,
        }
    }
}

/// Bring the admin queue of `address` up, IDENTIFY the controller waiting by `wait`, shut the
/// controller down and return everything; the identity, or why not.
fn identify(address: &str, wait: Wait) -> Result<Identity, String> {
    let container = VfioContainer::open(IommuMode::Iommu).map_err(|e| e.to_string())?;
    let device = VfioDevice::open(&container, address).map_err(|e| e.to_string())?;
    device.enable_bus_master().map_err(|e| e.to_string())?;
    // Registers and doorbells only: the MSI-X table lies above them in BAR 0, and VFIO does
    // not let it be mapped.
    let bar = device
        .map_bar(0, Some(NVME_REGISTERS))
        .map_err(|e| e.to_string())?;
    let cap = bar.read64(reg::CAP);
    let vs = bar.read32(reg::VS);
    let mqes = (cap & 0xffff) as u16 + 1;
    let dstrd = (cap >> 32) & 0xf;
    let timeout = Duration::from_millis(500 * ((cap >> 24) & 0xff).max(1));
    if mqes < ADMIN_DEPTH {
        return Err(format!(
            "{address}: CAP.MQES allows {mqes} entries, fewer than {ADMIN_DEPTH}"
        ));
    }
    // Disable first: a controller left enabled by an earlier run must be reset (§7.6.1).
    bar.write32(reg::CC, 0);
    wait_until("CSTS.RDY = 0", timeout, || {
        bar.read32(reg::CSTS) & CSTS_RDY == 0
    })?;

    let platform =
        VfioPlatform::new(&container, PlatformConfig::default()).map_err(|e| e.to_string())?;
    let dma = DmaDevice::new(platform.clone());
    let result = (|| {
        let enabler = Enabler::create(&dma, EnablerConfig::new(Profile::ScatterGather64, 1 << 20))
            .map_err(|e| format!("enabler: {e}"))?;
        let sq = CommonBuffer::create(&enabler, u64::from(ADMIN_DEPTH) * SQE_BYTES)
            .map_err(|e| format!("admin submission queue: {e}"))?;
        let cq = CommonBuffer::create(&enabler, u64::from(ADMIN_DEPTH) * CQE_BYTES)
            .map_err(|e| format!("admin completion queue: {e}"))?;
        let data = CommonBuffer::create(&enabler, IDENTIFY_BYTES)
            .map_err(|e| format!("identify buffer: {e}"))?;
        cq.write(0, &[0u8; (ADMIN_DEPTH as usize) * CQE_BYTES as usize])
            .map_err(|e| e.to_string())?;

        let doorbell = Arc::new(Doorbell::default());
        let interrupts = match wait {
            Wait::Poll => None,
            Wait::MsiX => {
                let ring = Arc::clone(&doorbell);
                Some(
                    device
                        .enable_interrupts(
                            IrqKind::MsiX,
                            1,
                            Arc::new(move |vector| {
                                if vector == 0 {
                                    ring.ring();
                                }
                            }),
                        )
                        .map_err(|e| e.to_string())?,
                )
            }
        };

        let depth = u32::from(ADMIN_DEPTH) - 1;
        bar.write32(reg::AQA, (depth << 16) | depth);
        bar.write64(reg::ASQ, sq.aligned_logical_address().get());
        bar.write64(reg::ACQ, cq.aligned_logical_address().get());
        bar.write32(reg::CC, CC_ENABLE);
        wait_until("CSTS.RDY = 1", timeout, || {
            bar.read32(reg::CSTS) & (CSTS_RDY | CSTS_CFS) != 0
        })?;
        if bar.read32(reg::CSTS) & CSTS_CFS != 0 {
            return Err(format!("{address}: controller fatal status after enable"));
        }

        // IDENTIFY CONTROLLER, command identifier 0x2a, into the data buffer (one PRP).
        let cid: u32 = 0x2a;
        let mut sqe = [0u8; SQE_BYTES as usize];
        sqe[0..4].copy_from_slice(&(OPC_IDENTIFY | (cid << 16)).to_le_bytes());
        sqe[24..32].copy_from_slice(&data.aligned_logical_address().get().to_le_bytes());
        sqe[40..44].copy_from_slice(&CNS_CONTROLLER.to_le_bytes());
        sq.write(0, &sqe).map_err(|e| e.to_string())?;
        let seen = match wait {
            Wait::MsiX => *lock(&doorbell.count),
            Wait::Poll => 0,
        };
        bar.write32(reg::DOORBELLS, 1);

        let mut cqe = [0u8; CQE_BYTES as usize];
        let phase_set = |cqe: &mut [u8; 16]| {
            cq.read(0, cqe).is_ok()
                && u32::from_le_bytes([cqe[12], cqe[13], cqe[14], cqe[15]]) & (1 << 16) != 0
        };
        match wait {
            Wait::Poll => wait_until("the completion's phase tag", timeout, || {
                phase_set(&mut cqe)
            })?,
            Wait::MsiX => {
                doorbell
                    .wait_past(seen, timeout)
                    .ok_or_else(|| format!("{address}: no MSI-X interrupt within {timeout:?}"))?;
                if !phase_set(&mut cqe) {
                    return Err(format!(
                        "{address}: MSI-X fired but the completion's phase tag is clear"
                    ));
                }
            }
        }
        let dw3 = u32::from_le_bytes([cqe[12], cqe[13], cqe[14], cqe[15]]);
        let status = dw3 >> 17;
        let got_cid = dw3 & 0xffff;
        let sq_head = u16::from_le_bytes([cqe[8], cqe[9]]);
        if status != 0 || got_cid != cid || sq_head != 1 {
            return Err(format!(
                "{address}: IDENTIFY completed with status {status:#x}, command {got_cid:#x}, SQ head {sq_head} (expected 0, {cid:#x}, 1)"
            ));
        }
        // Consume the entry: completion queue 0's head doorbell.
        bar.write32(reg::DOORBELLS + (4 << dstrd), 1);

        let mut raw = vec![0u8; IDENTIFY_BYTES as usize];
        data.read(0, &mut raw).map_err(|e| e.to_string())?;
        let identity = Identity::parse(&raw, vs);

        // Normal shutdown, then disable, before the queues' memory goes away.
        bar.write32(reg::CC, CC_ENABLE | CC_SHUTDOWN_NORMAL);
        wait_until("CSTS.SHST = complete", timeout, || {
            bar.read32(reg::CSTS) & CSTS_SHST_MASK == CSTS_SHST_COMPLETE
        })?;
        bar.write32(reg::CC, 0);
        wait_until("CSTS.RDY = 0", timeout, || {
            bar.read32(reg::CSTS) & CSTS_RDY == 0
        })?;
        // Delivery of vector 0 was checked by the wait above (the doorbell); `count` is not
        // read here: the interrupt thread adds a signal to it only after the handler returns.
        if let Some(interrupts) = interrupts {
            interrupts.disable().map_err(|e| e.to_string())?;
        }
        drop((sq, cq, data, enabler));
        Ok(identity)
    })();
    if result.is_err() {
        // The controller may still own the queues: stop it before their memory is unmapped.
        bar.write32(reg::CC, 0);
        let _ = wait_until("CSTS.RDY = 0", timeout, || {
            bar.read32(reg::CSTS) & CSTS_RDY == 0
        });
    }
    dma.delete();
    drop(dma);
    let identity = result?;
    platform
        .check_clean()
        .map_err(|e| format!("{address}: after IDENTIFY: {e}"))?;
    Ok(identity)
}
