//! Tests on QEMU's `edu` device (`1234:11e8`) through the VFIO platform and the edu driver
//! sample (`dmatx-edu`): the same driver library the simulator tests run, here on a real
//! device model behind the emulated IOMMU.
//!
//! Each test builds a [`Rig`] — container, device, BAR 0, [`VfioPlatform`], the driver, and
//! the interrupt wiring (MSI, INTx or none for polling) — and tears it down with
//! [`Rig::finish`], which fails the test unless every IOVA page is back in the pool, no
//! mapping is live and no page is left locked (`VmLck` of the process is 0 again).

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmatx::{Direction, DmaDevice, Error};
use dmatx_edu::{Completion, Edu, EduConfig, edu_device_add};
use dmatx_runtime::RequestHandle;
use dmatx_vfio::{
    DmaBuffer, ErrorKind, Interrupts, IommuMode, IrqKind, PlatformConfig, VfioContainer,
    VfioDevice, VfioPlatform,
};

use crate::env::{EDU_ID, Env};
use crate::runner::{Test, TestResult};

/// Size of the edu device's BAR 0 (its registers).
const EDU_BAR0_SIZE: u64 = 1 << 20;

/// The edu tests.
pub const TESTS: &[Test] = &[
    Test {
        name: "edu.present",
        run: present,
    },
    Test {
        name: "edu.registers",
        run: registers,
    },
    Test {
        name: "edu.round_trips_msi",
        run: round_trips_msi,
    },
    Test {
        name: "edu.round_trip_1mib_msi",
        run: round_trip_1mib_msi,
    },
    Test {
        name: "edu.round_trips_intx",
        run: round_trips_intx,
    },
    Test {
        name: "edu.round_trips_polled",
        run: round_trips_polled,
    },
    Test {
        name: "edu.long_write_and_read",
        run: long_write_and_read,
    },
    Test {
        name: "edu.queued_requests",
        run: queued_requests,
    },
    Test {
        name: "edu.cancel_queued",
        run: cancel_queued,
    },
    Test {
        name: "edu.iova_window_28_bit",
        run: iova_window_28_bit,
    },
    Test {
        name: "edu.iova_window_exhausted",
        run: iova_window_exhausted,
    },
    Test {
        name: "edu.cost_per_transfer",
        run: cost_per_transfer,
    },
    Test {
        name: "vfio.bad_input",
        run: bad_input,
    },
];

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

/// How the rig's driver learns that a DMA finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wiring {
    /// MSI vector 0 → `Interrupt::raise`.
    Msi,
    /// The INTx line → `Interrupt::raise`, unmasked by VFIO's interrupt thread afterwards.
    Intx,
    /// No interrupt: the driver polls the command register.
    Polled,
}

type EduDriver = Edu<VfioPlatform, DmaBuffer>;

/// One edu device driven by the edu driver over the VFIO platform.
struct Rig {
    address: String,
    platform: VfioPlatform,
    edu: EduDriver,
    interrupts: Option<Interrupts>,
    // Kept open for the rig's life; dropped last.
    _device: VfioDevice,
    _container: Arc<VfioContainer>,
}

fn first_edu(env: &Env) -> Result<String, String> {
    env.edu
        .first()
        .map(|d| d.address.clone())
        .ok_or_else(|| env.none_found("edu", EDU_ID))
}

impl Rig {
    fn new(env: &Env, wiring: Wiring, config: PlatformConfig) -> Result<Self, String> {
        let address = first_edu(env)?;
        let container = VfioContainer::open(IommuMode::Iommu).map_err(|e| e.to_string())?;
        let device = VfioDevice::open(&container, &address).map_err(|e| e.to_string())?;
        device.enable_bus_master().map_err(|e| e.to_string())?;
        let bar = device.map_bar(0, None).map_err(|e| e.to_string())?;
        let platform = VfioPlatform::new(&container, config).map_err(|e| e.to_string())?;
        let completion = match wiring {
            Wiring::Polled => Completion::Polled {
                interval: Duration::from_millis(2),
            },
            Wiring::Msi | Wiring::Intx => Completion::Interrupt,
        };
        let driver_config = EduConfig {
            max_transfer: env.edu_max_transfer as u64,
            completion,
            // edu finishes a DMA 100 ms of virtual time after its command; under TCG and a
            // loaded host that stretches.
            timeout: Duration::from_secs(5),
            verifier: Some(true),
        };
        let edu: EduDriver = edu_device_add(DmaDevice::new(platform.clone()), driver_config)
            .map_err(|e| format!("{address}: device add: {e}"))?;
        if let Err(e) = edu.prepare_hardware(Arc::new(bar)) {
            let _ = edu.remove();
            return Err(format!("{address}: prepare hardware: {e}"));
        }
        let kind = match wiring {
            Wiring::Msi => Some(IrqKind::Msi),
            Wiring::Intx => Some(IrqKind::Intx),
            Wiring::Polled => None,
        };
        let interrupts = match kind {
            None => None,
            Some(kind) => {
                let interrupt = edu.interrupt().clone();
                let handler = Arc::new(move |_vector: u32| {
                    // The ISR acknowledges the device before `raise` returns, so the INTx
                    // line is quiet when the interrupt thread unmasks it.
                    let _ = interrupt.raise(0);
                });
                match device.enable_interrupts(kind, 1, handler) {
                    Ok(i) => Some(i),
                    Err(e) => {
                        let _ = edu.remove();
                        return Err(e.to_string());
                    }
                }
            }
        };
        if let Err(e) = edu.start() {
            let _ = edu.remove();
            return Err(format!("{address}: start: {e}"));
        }
        Ok(Self {
            address,
            platform,
            edu,
            interrupts,
            _device: device,
            _container: container,
        })
    }

    fn buffer(&self, length: u64, page_offset: u64) -> Result<DmaBuffer, String> {
        self.platform
            .allocate_buffer(length, page_offset)
            .map_err(|e| e.to_string())
    }

    /// A buffer of `length` bytes at `page_offset` holding a pattern seeded by `seed`.
    fn pattern(&self, length: u64, page_offset: u64, seed: u64) -> Result<DmaBuffer, String> {
        let mut b = self.buffer(length, page_offset)?;
        b.store(0, &pattern(length, seed))
            .map_err(|e| format!("store: {e}"))?;
        Ok(b)
    }

    /// Remove the driver, stop the interrupts and check that everything came back.
    fn finish(self) -> TestResult {
        let Rig {
            address,
            platform,
            edu,
            interrupts,
            _device,
            _container,
        } = self;
        let removed = edu.remove();
        drop(edu);
        let disabled = interrupts.map(Interrupts::disable).transpose();
        removed.map_err(|e| format!("{address}: remove: {e}"))?;
        disabled.map_err(|e| e.to_string())?;
        platform
            .check_clean()
            .map_err(|e| format!("{address}: platform after removal: {e}"))?;
        drop(platform);
        let locked = locked_kib()?;
        if locked != 0 {
            return Err(format!("{address}: {locked} KiB still locked (VmLck)"));
        }
        Ok(())
    }
}

/// The process's locked memory in KiB (`VmLck` of `/proc/self/status`).
fn locked_kib() -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("/proc/self/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "/proc/self/status has no VmLck line".to_owned())
}

/// `length` bytes of a pattern that differs at every position and with every seed.
fn pattern(length: u64, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..length)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The first byte where `got` and `want` differ, as an error.
fn compare(what: &str, got: &[u8], want: &[u8]) -> TestResult {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} bytes, expected {}",
            got.len(),
            want.len()
        ));
    }
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: byte {i} is {:#04x}, expected {:#04x}",
            got[i], want[i]
        )),
    }
}

fn wait(what: &str, handle: &RequestHandle<DmaBuffer>, length: u64) -> TestResult {
    let done = handle
        .wait_timeout(Duration::from_secs(120))
        .ok_or_else(|| format!("{what}: no completion within 120 s"))?;
    done.status.map_err(|e| format!("{what}: {e}"))?;
    if done.information != length {
        return Err(format!(
            "{what}: completed with {} bytes, expected {length}",
            done.information
        ));
    }
    Ok(())
}

/// Transfers the driver programs for `length` bytes in one direction.
fn transfers_for(rig: &Rig, length: u64) -> u64 {
    length.div_ceil(rig.edu.config().transfer_length())
}

/// Loopback of `length` bytes at `offset` (input and output at the same page offset):
/// every byte comes back, with one transfer per chunk in each direction.
fn loopback(rig: &Rig, length: u64, offset: u64, seed: u64) -> TestResult {
    let what = format!("loopback of {length} bytes at page offset {offset:#x}");
    let input = rig.pattern(length, offset, seed)?;
    let output = rig.buffer(length, (offset + 0x100) % 4096)?;
    let before = rig.edu.stats();
    let handle = rig
        .edu
        .loopback(input, output)
        .map_err(|e| format!("{what}: submit: {e}"))?;
    wait(&what, &handle, length)?;
    let after = rig.edu.stats();
    let chunks = transfers_for(rig, length);
    let (to_dev, to_ram) = (
        after.transfers_to_device - before.transfers_to_device,
        after.transfers_to_ram - before.transfers_to_ram,
    );
    if (to_dev, to_ram) != (chunks, chunks) {
        return Err(format!(
            "{what}: {to_dev} transfers to the device and {to_ram} back, expected {chunks} each"
        ));
    }
    let out = handle
        .output()
        .ok_or_else(|| format!("{what}: the request lost its output buffer"))?;
    compare(&what, &out.to_vec(), &pattern(length, seed))
}

/// Write then read back `length` ≤ 4096 bytes: one transfer each way, every byte back.
fn write_then_read(rig: &Rig, length: u64, offset: u64, seed: u64) -> TestResult {
    let what = format!("write+read of {length} bytes at page offset {offset:#x}");
    let before = rig.edu.stats();
    let w = rig
        .edu
        .write(rig.pattern(length, offset, seed)?)
        .map_err(|e| format!("{what}: write: {e}"))?;
    wait(&what, &w, length)?;
    let r = rig
        .edu
        .read(rig.buffer(length, offset)?)
        .map_err(|e| format!("{what}: read: {e}"))?;
    wait(&what, &r, length)?;
    let after = rig.edu.stats();
    let n = transfers_for(rig, length);
    if after.transfers() - before.transfers() != 2 * n {
        return Err(format!(
            "{what}: {} transfers, expected {}",
            after.transfers() - before.transfers(),
            2 * n
        ));
    }
    let out = r
        .output()
        .ok_or_else(|| format!("{what}: the read lost its buffer"))?;
    compare(&what, &out.to_vec(), &pattern(length, seed))
}

/// Round trips of the given sizes at the given page offsets: loopback for every size,
/// write-then-read for sizes that fit the device buffer.
fn round_trips(env: &Env, wiring: Wiring, sizes: &[u64], offsets: &[u64]) -> TestResult {
    let rig = Rig::new(env, wiring, PlatformConfig::default())?;
    let result = (|| {
        let max = rig.edu.config().transfer_length();
        let mut seed = 1;
        for &offset in offsets {
            for &size in sizes {
                seed += 1;
                loopback(&rig, size, offset, seed)?;
                if size <= max {
                    write_then_read(&rig, size, offset, seed + 1000)?;
                }
            }
        }
        let stats = rig.edu.stats();
        match wiring {
            Wiring::Polled if stats.polls == 0 => Err("polled mode never polled".to_owned()),
            Wiring::Polled if stats.interrupts_claimed != 0 => {
                Err("polled mode claimed an interrupt".to_owned())
            }
            Wiring::Msi | Wiring::Intx if stats.interrupts_claimed < stats.transfers() => {
                Err(format!(
                    "{} interrupts claimed for {} transfers",
                    stats.interrupts_claimed,
                    stats.transfers()
                ))
            }
            _ => Ok(()),
        }
    })();
    let finished = rig.finish();
    result.and(finished)
}

/// The sizes of the round trips below 1 MiB.
const SIZES: [u64; 6] = [1, 100, 4095, 4096, 4097, 65_536];
/// Page offsets: page-aligned, odd, mid-page and the last byte of a page.
const OFFSETS: [u64; 4] = [0, 1, 0x800, 4095];

fn round_trips_msi(env: &Env) -> TestResult {
    round_trips(env, Wiring::Msi, &SIZES, &OFFSETS)
}

fn round_trip_1mib_msi(env: &Env) -> TestResult {
    round_trips(env, Wiring::Msi, &[1 << 20], &[0x800])
}

fn round_trips_intx(env: &Env) -> TestResult {
    round_trips(env, Wiring::Intx, &[1, 4096, 4097], &[0, 4095])
}

fn round_trips_polled(env: &Env) -> TestResult {
    round_trips(env, Wiring::Polled, &[1, 4096, 4097], &[0, 4095])
}

/// Plain requests longer than the device buffer: every transfer of a write targets the buffer,
/// so the last chunk is what stays; a long read returns the buffer's first bytes once per
/// transfer. Transfer counts are one per chunk.
fn long_write_and_read(env: &Env) -> TestResult {
    let rig = Rig::new(env, Wiring::Msi, PlatformConfig::default())?;
    let result = (|| {
        let max = rig.edu.config().transfer_length();
        let length = 3 * max + 100;
        let data = pattern(length, 77);
        let before = rig.edu.stats();
        let w = rig
            .edu
            .write(rig.pattern(length, 0x10, 77)?)
            .map_err(|e| e.to_string())?;
        wait("long write", &w, length)?;
        let r = rig
            .edu
            .read(rig.buffer(length, 0x20)?)
            .map_err(|e| e.to_string())?;
        wait("long read", &r, length)?;
        let after = rig.edu.stats();
        let n = transfers_for(&rig, length);
        if (
            after.transfers_to_device - before.transfers_to_device,
            after.transfers_to_ram - before.transfers_to_ram,
        ) != (n, n)
        {
            return Err(format!("expected {n} transfers each way, stats {after:?}"));
        }
        // The last chunk (100 bytes) sits at the start of the device buffer, after the third
        // chunk's remaining bytes.
        let mut device = data[(2 * max) as usize..(3 * max) as usize].to_vec();
        device[..100].copy_from_slice(&data[(3 * max) as usize..]);
        let mut expected = Vec::new();
        for i in 0..n {
            let len = (length - i * max).min(max) as usize;
            expected.extend_from_slice(&device[..len]);
        }
        let out = r.output().ok_or("the read lost its buffer")?;
        compare("long read", &out.to_vec(), &expected)
    })();
    let finished = rig.finish();
    result.and(finished)
}

/// Two requests back to back on the single-engine device: the platform grants one transfer's
/// map registers, so the second request's transaction waits in the adapter's queue (DMA v3
/// queuing) until the first completes, then runs.
fn queued_requests(env: &Env) -> TestResult {
    let rig = Rig::new(env, Wiring::Msi, PlatformConfig::default())?;
    let result = (|| {
        // 4096 bytes at page offset 1 span two pages: both map registers, one transfer.
        let a = rig
            .edu
            .write(rig.pattern(4096, 1, 5)?)
            .map_err(|e| e.to_string())?;
        let b = rig
            .edu
            .read(rig.buffer(4096, 1)?)
            .map_err(|e| e.to_string())?;
        let adapter = rig
            .edu
            .enabler()
            .adapter(Direction::ReadFromDevice)
            .ok_or("the enabler has no adapter")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut saw_queued = false;
        while Instant::now() < deadline && a.try_completed().is_none() {
            if adapter.queued() == 1 {
                saw_queued = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        wait("first request", &a, 4096)?;
        wait("second request", &b, 4096)?;
        if !saw_queued {
            return Err(
                "the second request never waited in the adapter's queue while the first ran"
                    .to_owned(),
            );
        }
        let out = b.output().ok_or("the read lost its buffer")?;
        compare("queued read", &out.to_vec(), &pattern(4096, 5))
    })();
    let finished = rig.finish();
    result.and(finished)
}

/// A request queued behind another is cancelled: it completes Cancelled with its buffer
/// untouched, and the first completes normally.
fn cancel_queued(env: &Env) -> TestResult {
    let rig = Rig::new(env, Wiring::Msi, PlatformConfig::default())?;
    let result = (|| {
        let a = rig
            .edu
            .write(rig.pattern(4096, 1, 9)?)
            .map_err(|e| e.to_string())?;
        let mut untouched = rig.buffer(4096, 1)?;
        untouched.fill(0xa5);
        let b = rig.edu.read(untouched).map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_millis(10));
        if a.try_completed().is_some() {
            return Err(
                "the first request finished before the second could be cancelled \
                        (edu takes 100 ms per DMA)"
                    .to_owned(),
            );
        }
        let cancelled = b.cancel().map_err(|e| format!("cancel: {e}"))?;
        let done = b
            .wait_timeout(Duration::from_secs(10))
            .ok_or("the cancelled request never completed")?;
        if !cancelled || done.status != Err(Error::Cancelled) || done.information != 0 {
            return Err(format!(
                "cancel returned {cancelled}, the request ended {done:?}, expected Cancelled with 0 bytes"
            ));
        }
        wait("first request", &a, 4096)?;
        let out = b.output().ok_or("the cancelled read lost its buffer")?;
        compare("cancelled read's buffer", &out.to_vec(), &[0xa5; 4096])
    })();
    let finished = rig.finish();
    result.and(finished)
}

/// edu drops address bits above 27. The platform's IOVA window is placed across the 256 MiB
/// line, so a careless allocator would hand out IOVAs the device cannot reach (the IOMMU
/// would then see the DMA at the masked address, unmapped, and the data would not arrive).
/// The adapter's map registers must lie wholly below 2^28, and a 64 KiB loopback through them
/// must come back intact.
fn iova_window_28_bit(env: &Env) -> TestResult {
    let config = PlatformConfig {
        iova_base: 0x0FFF_8000,
        iova_size: 0x10_0000,
        ..PlatformConfig::default()
    };
    let rig = Rig::new(env, Wiring::Msi, config)?;
    let result = (|| {
        for direction in [Direction::ReadFromDevice, Direction::WriteToDevice] {
            let Some(adapter) = rig.edu.enabler().adapter(direction) else {
                continue;
            };
            let end = adapter.iova_base()
                + u64::from(dmatx::hal::Adapter::map_register_count(adapter)) * 4096;
            if adapter.iova_base() < 0x0FFF_8000 || end > 1 << 28 {
                return Err(format!(
                    "{direction:?} adapter's registers span {:#x}..{end:#x}, outside 0x0fff8000..0x10000000",
                    adapter.iova_base()
                ));
            }
        }
        loopback(&rig, 65_536, 0x800, 42)
    })();
    let finished = rig.finish();
    result.and(finished)
}

/// A window with one page below 2^28 cannot hold the two map registers edu needs: the
/// adapter is refused with IovaExhausted naming the window, and nothing is left behind.
fn iova_window_exhausted(env: &Env) -> TestResult {
    let address = first_edu(env)?;
    let container = VfioContainer::open(IommuMode::Iommu).map_err(|e| e.to_string())?;
    let device = VfioDevice::open(&container, &address).map_err(|e| e.to_string())?;
    let config = PlatformConfig {
        iova_base: 0x0FFF_F000,
        iova_size: 0x10_0000,
        ..PlatformConfig::default()
    };
    let platform = VfioPlatform::new(&container, config).map_err(|e| e.to_string())?;
    let description = dmatx::hal::DeviceDescription {
        bus_master: true,
        scatter_gather: false,
        address_bits: 28,
        maximum_length: 4096,
        version: dmatx::DmaVersion::V3,
        direction: Direction::ReadFromDevice,
        duplex: false,
        system: None,
    };
    let refused = match platform.create_adapter(&description) {
        Ok(_) => Err("an adapter was created in a window with one usable page".to_owned()),
        Err(e) if e.kind() == ErrorKind::IovaExhausted => Ok(e.to_string()),
        Err(e) => Err(format!("expected IovaExhausted, got {e}")),
    }?;
    // Through the framework: the enabler cannot be created either.
    let edu: Result<EduDriver, _> = edu_device_add(
        DmaDevice::new(platform.clone()),
        EduConfig {
            verifier: Some(false),
            ..EduConfig::default()
        },
    );
    if edu.is_ok() {
        return Err("the driver was added without map registers".to_owned());
    }
    platform
        .check_clean()
        .map_err(|e| format!("after the refusal ({refused}): {e}"))?;
    drop(platform);
    drop(device);
    Ok(())
}

/// The framework's CPU time per transfer beside the device's time: a 64 KiB loopback (32
/// transfers) measured with the process's CPU clock and the wall clock; printed for
/// docs/PERFORMANCE.md.
fn cost_per_transfer(env: &Env) -> TestResult {
    let rig = Rig::new(env, Wiring::Msi, PlatformConfig::default())?;
    let result = (|| {
        let length = 65_536;
        let input = rig.pattern(length, 0, 3)?;
        let output = rig.buffer(length, 0)?;
        let before = rig.edu.stats();
        let cpu0 = process_cpu();
        let wall0 = Instant::now();
        let h = rig.edu.loopback(input, output).map_err(|e| e.to_string())?;
        wait("measured loopback", &h, length)?;
        let wall = wall0.elapsed();
        let cpu = process_cpu().saturating_sub(cpu0);
        let n = rig.edu.stats().transfers() - before.transfers();
        if n == 0 {
            return Err("no transfers measured".to_owned());
        }
        let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        println!(
            "measure edu.cost_per_transfer: {n} transfers, wall {:.1} us/transfer (device), process CPU {:.1} us/transfer (framework, driver, VFIO)",
            per(wall),
            per(cpu)
        );
        Ok(())
    })();
    let finished = rig.finish();
    result.and(finished)
}

/// CPU time of the whole process so far.
fn process_cpu() -> Duration {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The bad inputs on the real kernel: a PCI address that does not exist, a device not
/// bound to vfio-pci, a BAR that cannot be mapped, a group already in use; each a clear error
/// naming the device, and nothing left open.
fn bad_input(env: &Env) -> TestResult {
    let address = first_edu(env)?;
    let container = VfioContainer::open(IommuMode::Iommu).map_err(|e| e.to_string())?;
    let expect = |what: &str, r: Result<VfioDevice, dmatx_vfio::VfioError>, kind: ErrorKind| match r
    {
        Ok(_) => Err(format!("{what}: opened")),
        Err(e) if e.kind() == kind => {
            println!("  {what}: {e}");
            Ok(())
        }
        Err(e) => Err(format!("{what}: expected {kind:?}, got {e}")),
    };
    expect(
        "missing device",
        VfioDevice::open(&container, "0000:00:1e.7"),
        ErrorKind::NoDevice,
    )?;
    // The host bridge (00:00.0) is never bound to vfio-pci by the guest's init.
    expect(
        "host bridge",
        VfioDevice::open(&container, "0000:00:00.0"),
        ErrorKind::NotBound,
    )?;
    let device = VfioDevice::open(&container, &address).map_err(|e| e.to_string())?;
    match device.map_bar(1, None) {
        Ok(_) => return Err("edu's BAR 1 (absent) was mapped".to_owned()),
        Err(e) if e.kind() == ErrorKind::BarMap => println!("  absent BAR: {e}"),
        Err(e) => return Err(format!("absent BAR: expected BarMap, got {e}")),
    }
    // A second container cannot take the group the first one holds.
    let other = VfioContainer::open(IommuMode::Iommu).map_err(|e| e.to_string())?;
    match VfioDevice::open(&other, &address) {
        Ok(_) => return Err("the same group was opened by two containers".to_owned()),
        Err(e) => println!("  group in use: {e}"),
    }
    drop(device);
    // Released: the second container can now have it.
    VfioDevice::open(&other, &address)
        .map(drop)
        .map_err(|e| format!("after release: {e}"))
}

/// The ID, liveness and factorial registers, through the driver.
fn registers(env: &Env) -> TestResult {
    let rig = Rig::new(env, Wiring::Polled, PlatformConfig::default())?;
    let result = (|| {
        for v in [0u32, 0x1234_5678, u32::MAX] {
            let got = rig.edu.liveness(v).map_err(|e| e.to_string())?;
            if got != !v {
                return Err(format!("liveness({v:#x}) = {got:#x}, expected {:#x}", !v));
            }
        }
        let f = rig.edu.factorial(10).map_err(|e| e.to_string())?;
        if f != 3_628_800 {
            return Err(format!("factorial(10) = {f}, expected 3628800"));
        }
        Ok(())
    })();
    let finished = rig.finish();
    result.and(finished)
}

#[cfg(test)]
mod unit {
    use super::{compare, pattern};

    #[test]
    fn patterns_differ_by_seed_and_compare_finds_the_first_difference() {
        let a = pattern(64, 1);
        let b = pattern(64, 2);
        assert_ne!(a, b);
        assert!(compare("same", &a, &a).is_ok());
        let mut c = a.clone();
        c[17] ^= 1;
        let e = compare("x", &c, &a).unwrap_err();
        assert!(e.contains("byte 17"), "{e}");
    }
}
