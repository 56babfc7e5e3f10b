//! Benchmarks of the framework against hand-written baselines, in the same run.
//!
//! * `cycle/*`: one whole transaction (initialize → execute → program-DMA per transfer →
//!   completion → release) on an instant device, next to a baseline that does the same
//!   splitting, map-register allocation, SG building, callback and flush by calling the
//!   platform directly, without the framework.
//! * `sg_build`: mapping a 1 MiB buffer of scattered pages into an SG list (per page).
//! * `bounce`: copying 1 MiB through bounce pages vs `memcpy` of the same bytes.
//! * `threads`: independent SG transactions on one enabler from one thread and from two.
//!
//! Results and the commands that produced them: `docs/PERFORMANCE.md`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dmatx::hal::{
    Adapter, Allocation, AllocationRequest, AllocationWaiter, MapRegisters, Waiter, WaiterRef,
};
use dmatx::{
    Completion, Direction, DmaDevice, DmaVersion, Enabler, EnablerConfig, PAGE_SIZE, PhysAddr,
    Profile, SgElement, Transaction,
};
use dmatx_sim::{AdapterMode, Placement, SimAdapter, SimBuffer, SimConfig, SimPlatform};
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Tx = Transaction<SimPlatform, (), SimBuffer>;

/// The instant device's program-DMA: read the SG list as a driver writing descriptors would.
fn program(_: &Tx, _: &(), _: Direction, sg: &[SgElement]) -> bool {
    consume(sg)
}

#[inline(never)]
fn consume(sg: &[SgElement]) -> bool {
    let mut sum = 0u64;
    for e in sg {
        sum = sum
            .wrapping_add(e.address.get())
            .wrapping_add(u64::from(e.length));
    }
    black_box(sum);
    true
}

fn run_dmatx(t: &Tx, buffer: SimBuffer) -> SimBuffer {
    let len = buffer.len();
    t.initialize_using_offset(program, Direction::WriteToDevice, buffer, 0, len)
        .map_err(|e| e.error)
        .unwrap();
    t.execute(()).unwrap();
    while t.dma_completed().unwrap() == Completion::MoreProcessingRequired {}
    t.release().unwrap().unwrap()
}

struct NeverQueued;
impl AllocationWaiter for NeverQueued {
    fn granted(&self, _: MapRegisters) {
        unreachable!("the baseline never queues")
    }
}

fn grant(adapter: &SimAdapter, count: u64, waiter: &WaiterRef) -> MapRegisters {
    let request = AllocationRequest {
        count: NonZeroU32::new(count as u32).unwrap(),
        immediate: true,
    };
    match adapter.allocate(request, waiter).unwrap() {
        Allocation::Granted(r) => r,
        Allocation::Queued => unreachable!(),
    }
}

fn pages(page_offset: u64, len: u64) -> u64 {
    (page_offset % PAGE_SIZE + len).div_ceil(PAGE_SIZE)
}

/// Baseline packet run: registers for the run, one element per transfer, flush, free.
fn run_baseline_packet(adapter: &SimAdapter, buffer: &SimBuffer, f: u64, waiter: &WaiterRef) {
    let len = buffer.len();
    let first = len.min(f);
    let count = if first == len {
        pages(0, len)
    } else {
        pages(PAGE_SIZE - 1, first)
    };
    let registers = grant(adapter, count, waiter);
    let mut done = 0;
    let mut sg = [SgElement::default(); 1];
    while done < len {
        let want = (len - done).min(f);
        let m = adapter
            .map(
                &registers,
                buffer,
                done,
                want,
                Direction::WriteToDevice,
                &mut sg,
            )
            .unwrap();
        consume(&sg[..m.elements]);
        adapter
            .flush(&registers, buffer, done, m.bytes, Direction::WriteToDevice)
            .unwrap();
        done += m.bytes;
    }
    adapter.free(registers);
}

/// Baseline SG run: per transfer, registers for its pages, an SG list, flush, free.
fn run_baseline_sg(
    adapter: &SimAdapter,
    buffer: &SimBuffer,
    f: u64,
    sg: &mut [SgElement],
    waiter: &WaiterRef,
) {
    let len = buffer.len();
    let page_offset = dmatx::hal::MemoryDescriptor::segment(buffer, 0)
        .va
        .page_offset();
    let mut done = 0;
    while done < len {
        let want = (len - done).min(f);
        let registers = grant(adapter, pages(page_offset + done, want), waiter);
        let m = adapter
            .map(&registers, buffer, done, want, Direction::WriteToDevice, sg)
            .unwrap();
        consume(&sg[..m.elements]);
        adapter
            .flush(&registers, buffer, done, m.bytes, Direction::WriteToDevice)
            .unwrap();
        adapter.free(registers);
        done += m.bytes;
    }
}

fn setup(profile: Profile, max: u64, registers: u32) -> (SimPlatform, Enabler<SimPlatform>) {
    let sim = SimConfig::new()
        .memory(0x1000_0000, 256 << 20)
        .map_registers(registers)
        .build()
        .unwrap();
    let config = EnablerConfig::new(profile, max)
        .with_version(DmaVersion::V3)
        .with_verifier(false);
    let enabler = Enabler::create(&DmaDevice::new(sim.clone()), config).unwrap();
    (sim, enabler)
}

fn cycles(c: &mut Criterion) {
    let strong: Waiter = Arc::new(NeverQueued);
    let waiter: WaiterRef = Arc::downgrade(&strong);

    let mut group = c.benchmark_group("cycle/packet_4k");
    group.throughput(Throughput::Elements(1));
    let (sim, enabler) = setup(Profile::Packet64, 4096, 32);
    let t = Tx::create(&enabler).unwrap();
    let mut buffer = Some(sim.allocate_buffer(4096, 0).unwrap());
    group.bench_function("dmatx", |b| {
        b.iter(|| buffer = Some(run_dmatx(&t, buffer.take().unwrap())))
    });
    let adapter = enabler.adapter(Direction::WriteToDevice).unwrap().clone();
    let f = enabler.fragment_length(Direction::WriteToDevice);
    let plain = buffer.take().unwrap();
    group.bench_function("baseline", |b| {
        b.iter(|| run_baseline_packet(&adapter, &plain, f, &waiter))
    });
    group.finish();
    drop((t, plain));
    sim.check_clean().unwrap();

    let mut group = c.benchmark_group("cycle/sg_1m_64k");
    group.throughput(Throughput::Bytes(1 << 20));
    // 17 registers: F = 64 KiB, 16 transfers of 16 scattered pages each.
    let (sim, enabler) = setup(Profile::ScatterGather64, 64 * 1024, 17);
    let t = Tx::create(&enabler).unwrap();
    let mut buffer = Some(sim.allocate_buffer(1 << 20, 0).unwrap());
    group.bench_function("dmatx", |b| {
        b.iter(|| buffer = Some(run_dmatx(&t, buffer.take().unwrap())))
    });
    let adapter = enabler.adapter(Direction::WriteToDevice).unwrap().clone();
    let f = enabler.fragment_length(Direction::WriteToDevice);
    let plain = buffer.take().unwrap();
    let mut sg = vec![SgElement::default(); 17];
    group.bench_function("baseline", |b| {
        b.iter(|| run_baseline_sg(&adapter, &plain, f, &mut sg, &waiter))
    });
    group.finish();
    drop((t, plain));
    sim.check_clean().unwrap();
}

fn sg_build(c: &mut Criterion) {
    let strong: Waiter = Arc::new(NeverQueued);
    let waiter: WaiterRef = Arc::downgrade(&strong);
    let sim = SimConfig::new().map_registers(300).build().unwrap();
    let adapter = {
        use dmatx::hal::Platform;
        sim.adapter(&SimPlatform::description(64)).unwrap()
    };
    let buffer = sim.allocate_buffer(1 << 20, 0).unwrap();
    let mut sg = vec![SgElement::default(); 256];
    let mut group = c.benchmark_group("sg_build");
    group.throughput(Throughput::Elements(256));
    group.bench_function("1m_scattered_per_page", |b| {
        b.iter(|| {
            let registers = grant(&adapter, 256, &waiter);
            let m = adapter
                .map(
                    &registers,
                    &buffer,
                    0,
                    1 << 20,
                    Direction::WriteToDevice,
                    &mut sg,
                )
                .unwrap();
            assert_eq!(m.elements, 256);
            adapter
                .flush(&registers, &buffer, 0, 1 << 20, Direction::WriteToDevice)
                .unwrap();
            adapter.free(registers);
        })
    });
    group.finish();
    drop(buffer);
    sim.check_clean().unwrap();
}

fn bounce(c: &mut Criterion) {
    const HIGH: u64 = 0x1_0000_0000;
    let strong: Waiter = Arc::new(NeverQueued);
    let waiter: WaiterRef = Arc::downgrade(&strong);
    let sim = SimConfig::new()
        .add_region(HIGH, 8 << 20)
        .map_registers(300)
        .mode(AdapterMode::Bounce)
        .build()
        .unwrap();
    let adapter = {
        use dmatx::hal::Platform;
        sim.adapter(&SimPlatform::description(32)).unwrap()
    };
    let buffer = sim
        .allocate_buffer_with(1 << 20, 0, Placement::Above(PhysAddr::new(HIGH)))
        .unwrap();
    let mut sg = vec![SgElement::default(); 256];
    let mut group = c.benchmark_group("bounce_1m");
    group.throughput(Throughput::Bytes(1 << 20));
    group.bench_function("copy_in", |b| {
        b.iter(|| {
            // A write-to-device map copies the buffer into bounce pages below 4 GiB.
            let registers = grant(&adapter, 256, &waiter);
            adapter
                .map(
                    &registers,
                    &buffer,
                    0,
                    1 << 20,
                    Direction::WriteToDevice,
                    &mut sg,
                )
                .unwrap();
            adapter
                .flush(&registers, &buffer, 0, 1 << 20, Direction::WriteToDevice)
                .unwrap();
            adapter.free(registers);
        })
    });
    let src = vec![0x5Au8; 1 << 20];
    let mut dst = vec![0u8; 1 << 20];
    group.bench_function("memcpy", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        })
    });
    group.finish();
    drop(buffer);
    sim.check_clean().unwrap();
}

fn threads(c: &mut Criterion) {
    // 256 KiB transactions in 64 KiB transfers; each thread has its own transaction and buffer.
    // "one_enabler": both threads share the enabler and so the platform's adapter (whose lock
    // is the simulated HAL's); "own_adapters": each thread's transaction is on its own
    // enabler, so the only thing shared is the framework itself and the simulated memory.
    let (sim, shared) = setup(Profile::ScatterGather64, 64 * 1024, 64);
    let own: Vec<Enabler<SimPlatform>> = (0..2)
        .map(|_| {
            let config = EnablerConfig::new(Profile::ScatterGather64, 64 * 1024)
                .with_version(DmaVersion::V3)
                .with_verifier(false);
            Enabler::create(&DmaDevice::new(sim.clone()), config).unwrap()
        })
        .collect();
    let mut group = c.benchmark_group("threads");
    group.throughput(Throughput::Elements(1));
    for (label, n, separate) in [
        ("1_thread", 1usize, false),
        ("2_threads_one_enabler", 2, false),
        ("2_threads_own_adapters", 2, true),
    ] {
        let txs: Vec<Arc<Tx>> = (0..n)
            .map(|i| Tx::create(if separate { &own[i] } else { &shared }).unwrap())
            .collect();
        let mut buffers: Vec<Option<SimBuffer>> = (0..n)
            .map(|_| Some(sim.allocate_buffer(256 * 1024, 0).unwrap()))
            .collect();
        group.bench_function(label, |b| {
            b.iter_custom(|iters| {
                // Each thread runs `iters` transactions; the time per transaction of the whole
                // machine is the elapsed time over all transactions run.
                let start = Instant::now();
                std::thread::scope(|s| {
                    let handles: Vec<_> = txs
                        .iter()
                        .zip(buffers.iter_mut())
                        .map(|(t, slot)| {
                            let mut buffer = slot.take().unwrap();
                            s.spawn(move || {
                                for _ in 0..iters {
                                    buffer = run_dmatx(t, buffer);
                                }
                                *slot = Some(buffer);
                            })
                        })
                        .collect();
                    for h in handles {
                        h.join().unwrap();
                    }
                });
                start.elapsed() / n as u32
            })
        });
    }
    // The same work without the framework, one adapter per thread: what the machine and the
    // simulated platform allow, to read the framework's scaling against.
    let strong: Waiter = Arc::new(NeverQueued);
    let waiter: WaiterRef = Arc::downgrade(&strong);
    for n in [1usize, 2] {
        let label = format!("baseline_{n}_thread_own_adapters");
        let plain: Vec<SimBuffer> = (0..n)
            .map(|_| sim.allocate_buffer(256 * 1024, 0).unwrap())
            .collect();
        group.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                std::thread::scope(|s| {
                    for (i, buffer) in plain.iter().enumerate() {
                        let (adapter, waiter) =
                            (own[i].adapter(Direction::WriteToDevice).unwrap(), &waiter);
                        s.spawn(move || {
                            let mut sg = vec![SgElement::default(); 64];
                            for _ in 0..iters {
                                run_baseline_sg(adapter, buffer, 64 * 1024, &mut sg, waiter);
                            }
                        });
                    }
                });
                start.elapsed() / n as u32
            })
        });
    }
    group.finish();
    drop((shared, own));
    sim.check_clean().unwrap();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = cycles, sg_build, bounce, threads
}
criterion_main!(benches);
