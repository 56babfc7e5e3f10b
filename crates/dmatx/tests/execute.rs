//! Conformance: executing and splitting (spec §2.2, §3.2, §3.3, §3.7, §3.8; statements 38–54).

mod common;

use common::{Log, Tx, assert_clean, buffer, enabler, record, run_to_end, sim};
use dmatx::{
    Call, Completion, Direction, DmaDevice, DmaVersion, Enabler, EnablerConfig, Error, Profile,
    State,
};
use std::sync::Arc;

const W: Direction = Direction::WriteToDevice;
const R: Direction = Direction::ReadFromDevice;

#[test]
fn stmt_038_execute_on_created_is_misuse() {
    let sim = sim(8);
    let t = Tx::create(&enabler(
        &sim,
        Profile::ScatterGather64,
        8192,
        DmaVersion::V2,
    ))
    .unwrap();
    let log = Log::new();
    let e = t.execute(log.clone()).unwrap_err();
    let m = e.misuse().expect("misuse");
    assert_eq!((m.call, m.state), (Call::Execute, State::Created));
    assert_eq!(t.state(), State::Created);
    assert_eq!(log.count(), 0);
    assert_eq!(Arc::strong_count(&log), 1, "the context was not kept");
    assert_clean(&sim);
}

#[test]
fn stmt_039_second_execute_is_misuse() {
    let sim = sim(8);
    let t = Tx::create(&enabler(
        &sim,
        Profile::ScatterGather64,
        8192,
        DmaVersion::V2,
    ))
    .unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 20000, 0), 0, 20000)
        .unwrap();
    let log = Log::new();
    t.execute(log.clone()).unwrap();
    let e = t.execute(Log::new()).unwrap_err();
    assert_eq!(
        e.misuse().map(|m| (m.call, m.state)),
        Some((Call::Execute, State::Transfer))
    );
    assert_eq!(log.count(), 1, "the running transaction is untouched");
    run_to_end(&t).1.unwrap();
    assert_eq!(log.count(), 3);
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_040_041_042_split_into_fragment_length_transfers() {
    for profile in [
        Profile::Packet64,
        Profile::ScatterGather64,
        Profile::ScatterGather64Duplex,
    ] {
        for length in [1u64, 4095, 4096, 4097, 65536, 100_000] {
            let sim = sim(2); // F = 4 KiB
            let e = enabler(&sim, profile, 1 << 20, DmaVersion::V3);
            assert_eq!(e.fragment_length(W), 4096);
            let t = Tx::create(&e).unwrap();
            t.initialize_using_offset(record, W, buffer(&sim, length, 0), 0, length)
                .unwrap();
            let log = Log::new();
            t.execute(log.clone()).unwrap();
            let (completions, status) = run_to_end(&t);
            status.unwrap();
            let calls = log.calls();
            assert_eq!(
                calls.len() as u64,
                length.div_ceil(4096),
                "{profile:?} {length}"
            );
            assert_eq!(completions, calls.len());
            assert!(
                calls
                    .iter()
                    .all(|c| c.current_length <= 4096 && c.current_length > 0)
            );
            assert!(calls.iter().all(|c| c.sg_bytes() == c.current_length));
            let sum: u64 = calls.iter().map(|c| c.current_length).sum();
            assert_eq!(sum, length);
            assert_eq!(t.bytes_transferred(), length);
            t.release().unwrap();
            drop(t);
            assert_clean(&sim);
        }
    }
}

#[test]
fn stmt_043_longer_than_maximum_length_is_split() {
    let sim = sim(64);
    let t = Tx::create(&enabler(
        &sim,
        Profile::ScatterGather64,
        10_000,
        DmaVersion::V2,
    ))
    .unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 1 << 20, 0), 0, 1 << 20)
        .unwrap();
    let log = Log::new();
    t.execute(log.clone()).unwrap();
    run_to_end(&t).1.unwrap();
    assert_eq!(log.count() as u64, (1u64 << 20).div_ceil(10_000));
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_044_context_passed_unchanged_to_every_program_dma() {
    let sim = sim(2);
    let e = enabler(&sim, Profile::ScatterGather64, 1 << 20, DmaVersion::V3);
    let (a, b) = (Tx::create(&e).unwrap(), Tx::create(&e).unwrap());
    a.initialize_using_offset(record, W, buffer(&sim, 20000, 0), 0, 20000)
        .unwrap();
    b.initialize_using_offset(record, R, buffer(&sim, 9000, 0), 0, 9000)
        .unwrap();
    let (la, lb) = (Log::tagged(1), Log::tagged(2));
    a.execute(la.clone()).unwrap();
    b.execute(lb.clone()).unwrap();
    run_to_end(&a).1.unwrap();
    run_to_end(&b).1.unwrap();
    assert_eq!(la.count(), 5);
    assert_eq!(lb.count(), 3);
    assert!(la.calls().iter().all(|c| c.direction == W));
    assert!(lb.calls().iter().all(|c| c.direction == R));
    a.release().unwrap();
    b.release().unwrap();
    assert_eq!(
        Arc::strong_count(&la),
        1,
        "the context is dropped when the run ends"
    );
    assert_clean(&sim);
}

#[test]
fn stmt_045_packet_lists_have_exactly_one_element() {
    let sim = sim(8);
    for v in [DmaVersion::V2, DmaVersion::V3] {
        let t = Tx::create(&enabler(&sim, Profile::Packet, 1 << 16, v)).unwrap();
        t.initialize_using_offset(record, W, buffer(&sim, 50_000, 0x123), 0, 50_000)
            .unwrap();
        let log = Log::new();
        t.execute(log.clone()).unwrap();
        run_to_end(&t).1.unwrap();
        assert!(log.calls().iter().all(|c| c.sg.len() == 1));
        assert_eq!(t.bytes_transferred(), 50_000);
        t.release().unwrap();
    }
    assert_clean(&sim);
}

#[test]
fn stmt_046_set_maximum_length() {
    let sim = sim(4); // F = 12 KiB
    let t = Tx::create(&enabler(
        &sim,
        Profile::ScatterGather64,
        1 << 20,
        DmaVersion::V2,
    ))
    .unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 40_000, 0), 0, 40_000)
        .unwrap();
    assert_eq!(
        t.set_maximum_length(12288),
        Ok(false),
        "equal to F: ignored"
    );
    assert_eq!(t.set_maximum_length(1 << 30), Ok(false), "above F: ignored");
    assert_eq!(t.maximum_transfer_length(), 12288);
    assert_eq!(t.set_maximum_length(0), Err(Error::InvalidParameter));
    assert_eq!(t.set_maximum_length(3000), Ok(true));
    let log = Log::new();
    t.execute(log.clone()).unwrap();
    assert_eq!(
        t.set_maximum_length(100),
        Err(Error::InvalidDeviceRequest),
        "not while executing"
    );
    run_to_end(&t).1.unwrap();
    assert_eq!(log.count(), 14);
    assert!(log.calls().iter().all(|c| c.current_length <= 3000));
    t.release().unwrap();
    assert_eq!(
        t.set_maximum_length(100),
        Err(Error::InvalidDeviceRequest),
        "not before initialize"
    );
    assert_clean(&sim);
}

#[test]
fn stmt_047_048_v2_packet_slot_is_device_wide() {
    let sim = sim(8);
    let device = DmaDevice::new(sim.clone());
    let config = EnablerConfig::new(Profile::Packet, 8192)
        .with_version(DmaVersion::V2)
        .with_verifier(false);
    let (e1, e2) = (
        Enabler::create(&device, config).unwrap(),
        Enabler::create(&device, config).unwrap(),
    );
    let (a, b) = (Tx::create(&e1).unwrap(), Tx::create(&e2).unwrap());
    a.initialize_using_offset(record, W, buffer(&sim, 20000, 0), 0, 20000)
        .unwrap();
    b.initialize_using_offset(record, W, buffer(&sim, 100, 0), 0, 100)
        .unwrap();
    assert!(e1.is_on(&device) && e2.is_on(&device));
    assert!(!e1.is_on(&DmaDevice::new(sim.clone())));
    a.execute(Log::new()).unwrap();
    assert!(e2.packet_slot_taken());
    assert_eq!(b.execute(Log::new()), Err(Error::WdfBusy));
    assert_eq!(b.state(), State::TransferFailed);
    // Statement 54: release and re-initialize after a failed execute.
    let buf = b.release().unwrap().unwrap();
    b.initialize_using_offset(record, W, buf, 0, 100).unwrap();
    // 48: after the first finishes, the device is free again.
    run_to_end(&a).1.unwrap();
    assert!(!e1.packet_slot_taken());
    b.execute(Log::new()).unwrap();
    assert_eq!(run_to_end(&b), (1, Ok(())));
    a.release().unwrap();
    b.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_049_v3_packet_transactions_run_concurrently() {
    let sim = sim(8);
    let e = enabler(&sim, Profile::Packet64, 8192, DmaVersion::V3);
    let (a, b) = (Tx::create(&e).unwrap(), Tx::create(&e).unwrap());
    a.initialize_using_offset(record, W, buffer(&sim, 20000, 0), 0, 20000)
        .unwrap();
    b.initialize_using_offset(record, R, buffer(&sim, 20000, 0), 0, 20000)
        .unwrap();
    let (la, lb) = (Log::new(), Log::new());
    a.execute(la.clone()).unwrap();
    b.execute(lb.clone()).unwrap();
    assert_eq!((la.count(), lb.count()), (1, 1), "both programmed at once");
    assert_eq!(a.state(), State::Transfer);
    run_to_end(&b).1.unwrap();
    run_to_end(&a).1.unwrap();
    a.release().unwrap();
    b.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_051_052_immediate_execution() {
    let sim = sim(4);
    let e = enabler(&sim, Profile::Packet64, 8192, DmaVersion::V3);
    let adapter = e.adapter(W).unwrap().clone();
    let t = Tx::create(&e).unwrap();
    t.set_immediate_execution(true).unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 8192, 0), 0, 8192)
        .unwrap();
    assert!(t.immediate_execution());
    // 51: no registers free → InsufficientResources, program-DMA never called.
    adapter.exhaust(4);
    let log = Log::new();
    assert_eq!(t.execute(log.clone()), Err(Error::InsufficientResources));
    assert_eq!(t.state(), State::TransferFailed);
    assert_eq!(log.count(), 0);
    adapter.restore();
    // 54: release and re-initialize; release clears immediate execution (77).
    let buf = t.release().unwrap().unwrap();
    assert!(!t.immediate_execution());
    t.set_immediate_execution(true).unwrap();
    t.initialize_using_offset(record, W, buf, 0, 8192).unwrap();
    // 52: registers free → program-DMA runs before execute returns.
    t.execute(log.clone()).unwrap();
    assert_eq!(log.count(), 1);
    run_to_end(&t).1.unwrap();
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_053_immediate_execution_on_v2_has_no_effect() {
    let sim = sim(4);
    let t = Tx::create(&enabler(&sim, Profile::Packet64, 8192, DmaVersion::V2)).unwrap();
    assert_eq!(
        t.set_immediate_execution(true),
        Err(Error::InvalidDeviceRequest)
    );
    assert!(!t.immediate_execution());
    assert_clean(&sim);
}

#[test]
fn queued_execution_runs_when_registers_return() {
    let sim = sim(4);
    let e = enabler(&sim, Profile::ScatterGather64, 1 << 20, DmaVersion::V3);
    let adapter = e.adapter(W).unwrap().clone();
    let t = Tx::create(&e).unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 12288, 0), 0, 12288)
        .unwrap();
    adapter.exhaust(4);
    let log = Log::new();
    t.execute(log.clone()).unwrap();
    assert_eq!(log.count(), 0, "queued, not programmed");
    assert_eq!(t.state(), State::Transfer);
    adapter.restore(); // the grant runs program-DMA on this thread
    assert_eq!(log.count(), 1);
    assert_eq!(t.dma_completed(), Ok(Completion::Finished(Ok(()))));
    t.release().unwrap();
    assert_clean(&sim);
}

/// Program-DMA that hands the transfer to the simulated device behind the context.
type DevTx =
    dmatx::Transaction<dmatx_sim::SimPlatform, Arc<dmatx_sim::SimDmaDevice>, dmatx_sim::SimBuffer>;

fn to_device(
    t: &DevTx,
    device: &Arc<dmatx_sim::SimDmaDevice>,
    direction: Direction,
    sg: &[dmatx::SgElement],
) -> bool {
    device.start(direction, sg, t.bytes_transferred());
    true
}

#[test]
fn stmt_050_short_mappings_carry_the_rest_without_loss() {
    use dmatx_sim::{CompletionMode, DeviceConfig, SimDmaDevice};
    // Packet mode, direct mapping, scattered pages: the platform can map only up to the next
    // break in physical contiguity, so every transfer is shorter than F.
    let sim = sim(8);
    let e = enabler(&sim, Profile::Packet64, 16384, DmaVersion::V3);
    let device = Arc::new(SimDmaDevice::new(
        e.adapter(W).unwrap(),
        DeviceConfig::default()
            .storage_bytes(40_000)
            .mode(CompletionMode::Immediate),
    ));
    let t = DevTx::create(&e).unwrap();
    let mut b = buffer(&sim, 30_000, 0x321);
    let data: Vec<u8> = (0..30_000u32).map(|i| (i * 7 + 3) as u8).collect();
    b.write(0, &data).unwrap();
    t.initialize_using_offset(to_device, W, b, 0, 30_000)
        .unwrap();
    let lengths = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&lengths);
    let handle = Arc::clone(&t);
    // The device completes inside program-DMA; its interrupt reports the bytes moved.
    device.set_completion_handler(move |c| {
        seen.lock().unwrap().push(c.bytes);
        let _ = handle.dma_completed_with_length(c.bytes).unwrap();
    });
    t.execute(Arc::clone(&device)).unwrap();
    let lengths = lengths.lock().unwrap().clone();
    assert_eq!(t.state(), State::TransferCompleted);
    assert_eq!(t.bytes_transferred(), 30_000);
    assert!(
        lengths.len() > 30_000 / 16384 + 1,
        "short mappings made more transfers: {lengths:?}"
    );
    assert!(
        lengths.iter().all(|&n| n <= 4096),
        "each stops at a page break: {lengths:?}"
    );
    assert_eq!(lengths.iter().sum::<u64>(), 30_000);
    let mut stored = vec![0u8; 30_000];
    device.read_storage(0, &mut stored).unwrap();
    assert!(stored == data, "every byte arrived in order");
    device.clear_completion_handler(); // drops the handler's handle on the transaction
    t.release().unwrap();
    assert_clean(&sim);
}

/// Program-DMA context of the ordering test: this transaction's number and the shared order
/// in which program-DMA ran.
type Order = Arc<(
    u32,
    std::sync::Mutex<Vec<u32>>,
    Arc<std::sync::Mutex<Vec<u32>>>,
)>;
type OrderTx = dmatx::Transaction<dmatx_sim::SimPlatform, Order, dmatx_sim::SimBuffer>;

fn note_order(_: &OrderTx, ctx: &Order, _: Direction, sg: &[dmatx::SgElement]) -> bool {
    assert_eq!(sg.len(), 1);
    ctx.2.lock().unwrap().push(ctx.0);
    true
}

#[test]
fn stmt_049_v3_packet_transactions_queue_and_run_in_order_across_threads() {
    // Each transaction needs 3 of the adapter's 4 registers, so one runs at a time; the others
    // queue (v2 would answer WdfBusy) and run in the order they executed, each thread
    // executing its own.
    let sim = sim(4);
    let e = enabler(&sim, Profile::Packet64, 1 << 20, DmaVersion::V3);
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let n = 6_u32;
    let transactions: Vec<Arc<OrderTx>> = (0..n).map(|_| OrderTx::create(&e).unwrap()).collect();
    for t in &transactions {
        let buffer = common::contiguous(&sim, 3 * 4096, 0);
        t.initialize_using_offset(note_order, W, buffer, 0, 3 * 4096)
            .unwrap();
    }
    // Thread i executes after thread i − 1 has, so the queue order is 0, 1, 2, …
    let turn = Arc::new((std::sync::Mutex::new(0_u32), std::sync::Condvar::new()));
    std::thread::scope(|scope| {
        for (i, t) in transactions.iter().enumerate() {
            let (turn, order) = (Arc::clone(&turn), Arc::clone(&order));
            scope.spawn(move || {
                let i = u32::try_from(i).unwrap();
                let (lock, cv) = &*turn;
                let mut now = cv
                    .wait_while(lock.lock().unwrap(), |now| *now != i)
                    .unwrap();
                t.execute(Arc::new((i, std::sync::Mutex::new(Vec::new()), order)))
                    .unwrap();
                *now += 1;
                cv.notify_all();
            });
        }
        // The device: complete whatever is programmed until every transaction has finished.
        scope.spawn(|| {
            let mut finished = 0;
            while finished < n {
                for t in &transactions {
                    if t.state() == State::Transfer && t.current_transfer_length() > 0 {
                        match t.dma_completed() {
                            Ok(Completion::Finished(status)) => {
                                status.unwrap();
                                finished += 1;
                            }
                            Ok(Completion::MoreProcessingRequired) => {}
                            // Lost a race with program-DMA being staged: try again.
                            Err(e) => assert!(e.misuse().is_some(), "{e}"),
                        }
                    }
                }
                std::thread::yield_now();
            }
        });
    });
    assert_eq!(*order.lock().unwrap(), (0..n).collect::<Vec<_>>());
    for t in &transactions {
        assert_eq!(t.bytes_transferred(), 3 * 4096);
        t.release().unwrap();
    }
    assert_clean(&sim);
}
