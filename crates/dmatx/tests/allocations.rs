//! No allocation after creation: once a transaction, its platform and its device exist,
//! initialize → execute → program-DMA → device → completion → release allocates nothing, for
//! packet and scatter/gather transactions, including the simulated platform's map, flush,
//! allocate and free, and a queued grant.

use dmatx::{
    Completion, Direction, DmaDevice, DmaVersion, Enabler, EnablerConfig, Profile, SgElement,
    Transaction,
};
use dmatx_sim::{CompletionMode, DeviceConfig, SimBuffer, SimConfig, SimDmaDevice, SimPlatform};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

/// Counts allocations made by the current thread.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; it only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|a| a.set(a.get() + 1));
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we pass on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` through `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|a| a.set(a.get() + 1));
        // SAFETY: as for `dealloc`; `new_size` comes from the caller's valid request.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

type Tx = Transaction<SimPlatform, Arc<SimDmaDevice>, SimBuffer>;

fn program(t: &Tx, device: &Arc<SimDmaDevice>, direction: Direction, sg: &[SgElement]) -> bool {
    device.start(direction, sg, t.bytes_transferred());
    true
}

/// One full cycle; returns the buffer for the next one.
fn cycle(t: &Tx, device: &Arc<SimDmaDevice>, buffer: SimBuffer, direction: Direction) -> SimBuffer {
    let len = buffer.len();
    t.initialize_using_offset(program, direction, buffer, 0, len)
        .map_err(|e| e.error)
        .unwrap();
    t.execute(Arc::clone(device)).unwrap();
    loop {
        assert!(device.step());
        match t.dma_completed().unwrap() {
            Completion::Finished(status) => break status.unwrap(),
            Completion::MoreProcessingRequired => {}
        }
    }
    t.release().unwrap().unwrap()
}

fn steady_state(profile: Profile, length: u64, queued: bool) {
    let sim = SimConfig::new().map_registers(9).build().unwrap();
    let enabler = Enabler::create(
        &DmaDevice::new(sim.clone()),
        EnablerConfig::new(profile, 16384).with_version(DmaVersion::V3),
    )
    .unwrap();
    let adapter = enabler.adapter(Direction::WriteToDevice).unwrap().clone();
    let device = Arc::new(SimDmaDevice::new(
        &adapter,
        DeviceConfig::default()
            .storage_bytes(length as usize)
            .mode(CompletionMode::Manual),
    ));
    let t = Tx::create(&enabler).unwrap();
    let mut buffer = sim.allocate_buffer(length, 0x10).unwrap();
    // Warm up: first use of everything.
    for direction in Direction::ALL {
        buffer = cycle(&t, &device, buffer, direction);
    }

    let before = allocations();
    for round in 0..50 {
        let direction = Direction::ALL[round % 2];
        if queued && round % 5 == 0 {
            // A start that has to wait for registers, granted from `restore`.
            adapter.exhaust(9);
            let len = buffer.len();
            t.initialize_using_offset(program, direction, buffer, 0, len)
                .map_err(|e| e.error)
                .unwrap();
            t.execute(Arc::clone(&device)).unwrap();
            adapter.restore();
            loop {
                assert!(device.step());
                if t.dma_completed().unwrap().is_finished() {
                    break;
                }
            }
            buffer = t.release().unwrap().unwrap();
        } else {
            buffer = cycle(&t, &device, buffer, direction);
        }
    }
    let made = allocations() - before;
    assert_eq!(
        made, 0,
        "{profile:?}: {made} allocations in 50 steady-state transactions"
    );
    drop((t, buffer));
    sim.check_clean().unwrap();
}

#[test]
fn steady_state_allocates_nothing() {
    steady_state(Profile::Packet64, 40_000, false);
    steady_state(Profile::ScatterGather64, 200_000, false);
    steady_state(Profile::Packet64, 40_000, true);
    steady_state(Profile::ScatterGather64, 200_000, true);
}

#[test]
fn the_counter_counts() {
    let before = allocations();
    let v: Vec<u64> = Vec::with_capacity(8);
    assert!(allocations() > before);
    drop(v);
}

// ---------------------------------------------------------------------------------------------
// System mode

mod system {
    use super::allocations;
    use dmatx::hal::{DmaWidth, SystemDmaStatus};
    use dmatx::{
        Completion, Direction, DmaDescriptor, DmaDevice, Enabler, EnablerConfig, Profile,
        SgElement, SystemProfileConfig, Transaction,
    };
    use dmatx_sim::{SimBuffer, SimConfig, SimPlatform, SystemCompletion, SystemDmaConfig};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    type Tx = Transaction<SimPlatform, Arc<AtomicU64>, SimBuffer>;

    fn program(_: &Tx, _: &Arc<AtomicU64>, _: Direction, _: &[SgElement]) -> bool {
        true
    }

    fn done(t: &Tx, finished: &Arc<AtomicU64>, _: Direction, status: SystemDmaStatus) {
        assert_eq!(status, SystemDmaStatus::Complete);
        if let Completion::Finished(result) = t.dma_completed().unwrap() {
            result.unwrap();
            finished.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn config(address: u64, channel: u32) -> SystemProfileConfig {
        SystemProfileConfig::new(
            address,
            DmaWidth::Bits32,
            DmaDescriptor {
                channel,
                request_line: channel + 0x10,
            },
        )
    }

    /// Initialize, execute, let the controller run every transfer (the callback reports each),
    /// release. The controller calls back on this thread.
    fn cycle(
        t: &Tx,
        sim: &SimPlatform,
        finished: &Arc<AtomicU64>,
        buffer: SimBuffer,
        direction: Direction,
    ) -> SimBuffer {
        let before = finished.load(Ordering::Relaxed);
        let len = buffer.len();
        t.initialize_using_offset(program, direction, buffer, 0, len)
            .map_err(|e| e.error)
            .unwrap();
        t.execute(Arc::clone(finished)).unwrap();
        sim.system_dma().unwrap().run_pending();
        assert_eq!(finished.load(Ordering::Relaxed), before + 1);
        t.release().unwrap().unwrap()
    }

    #[test]
    fn system_steady_state_allocates_nothing() {
        const LEN: u64 = 12 * 1024;
        let sim = SimConfig::new()
            .system_dma(
                SystemDmaConfig::new()
                    .channel(1, 0x11)
                    .channel(2, 0x12)
                    .map_registers(4)
                    .mode(SystemCompletion::Manual),
            )
            .build()
            .unwrap();
        let tx = sim.add_fifo(0x7000_0000, 64 * LEN as usize).unwrap();
        let rx = sim.add_fifo(0x7000_1000, 0).unwrap();
        rx.push_source(&vec![0x5A; 64 * LEN as usize]);
        let enabler = Enabler::create(
            &DmaDevice::new(sim.clone()),
            EnablerConfig::new(Profile::SystemDuplex, 4096),
        )
        .unwrap();
        enabler
            .configure_system_profile(config(0x7000_0000, 1), Direction::WriteToDevice)
            .unwrap();
        enabler
            .configure_system_profile(config(0x7000_1000, 2), Direction::ReadFromDevice)
            .unwrap();
        let t = Tx::create(&enabler).unwrap();
        t.set_transfer_complete_callback(Some(done)).unwrap();
        let finished = Arc::new(AtomicU64::new(0));
        let mut buffer = sim.allocate_buffer(LEN, 0x40).unwrap();
        for direction in Direction::ALL {
            buffer = cycle(&t, &sim, &finished, buffer, direction);
        }
        let before = allocations();
        for round in 0..50 {
            buffer = cycle(&t, &sim, &finished, buffer, Direction::ALL[round % 2]);
        }
        let made = allocations() - before;
        assert_eq!(made, 0, "{made} allocations in 50 system transactions");
        assert_eq!(
            tx.take_received().len() as u64,
            26 * LEN,
            "the writes arrived"
        );
        let mut first = [0; 16];
        buffer.read(0, &mut first).unwrap();
        assert_eq!(first, [0x5A; 16], "the reads arrived");
        drop((t, buffer));
        sim.check_clean().unwrap();
    }
}
