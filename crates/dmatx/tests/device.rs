//! The device's DMA objects as a whole: power callbacks of the enablers (statements 15, 16 and
//! the fix of the never-cleared failure flags, spec §1.1) and deletion of the device with its
//! enablers, transactions and common buffers (statement 17).

mod common;

use common::{Log, Tx, assert_clean, buffer, record, sim};
use dmatx::{
    CommonBuffer, Completion, Direction, DmaDevice, DmaVersion, Enabler, EnablerCallbacks,
    EnablerConfig, Error, Profile, State,
};
use dmatx_sim::SimPlatform;
use std::cell::RefCell;

const W: Direction = Direction::WriteToDevice;

thread_local! {
    /// Callbacks run on the thread calling power_up/power_down: (enabler tag, step).
    static CALLS: RefCell<Vec<(u64, &'static str)>> = const { RefCell::new(Vec::new()) };
    /// The (enabler tag, step) that fails, if any.
    static FAIL: RefCell<Option<(u64, &'static str)>> = const { RefCell::new(None) };
}

fn step(e: &Enabler<SimPlatform>, name: &'static str) -> dmatx::Result<()> {
    // The enabler's maximum length tags it in these tests.
    let tag = e.maximum_length();
    CALLS.with(|c| c.borrow_mut().push((tag, name)));
    if FAIL.with(|f| *f.borrow()) == Some((tag, name)) {
        Err(Error::DeviceDataError)
    } else {
        Ok(())
    }
}

fn fill(e: &Enabler<SimPlatform>) -> dmatx::Result<()> {
    step(e, "fill")
}
fn enable(e: &Enabler<SimPlatform>) -> dmatx::Result<()> {
    step(e, "enable")
}
fn start(e: &Enabler<SimPlatform>) -> dmatx::Result<()> {
    step(e, "start")
}
fn stop(e: &Enabler<SimPlatform>) -> dmatx::Result<()> {
    step(e, "stop")
}
fn disable(e: &Enabler<SimPlatform>) -> dmatx::Result<()> {
    step(e, "disable")
}
fn flush(e: &Enabler<SimPlatform>) -> dmatx::Result<()> {
    step(e, "flush")
}

const ALL: EnablerCallbacks<SimPlatform> = EnablerCallbacks {
    fill: Some(fill),
    enable: Some(enable),
    self_managed_io_start: Some(start),
    self_managed_io_stop: Some(stop),
    disable: Some(disable),
    flush: Some(flush),
};

fn take_calls() -> Vec<(u64, &'static str)> {
    CALLS.with(|c| std::mem::take(&mut *c.borrow_mut()))
}

fn fail_at(tag: u64, name: &'static str) {
    FAIL.with(|f| *f.borrow_mut() = Some((tag, name)));
}

fn fail_nowhere() {
    FAIL.with(|f| *f.borrow_mut() = None);
}

/// A device with two packet enablers tagged 4096 and 8192, all callbacks set.
fn two_enablers(sim: &SimPlatform) -> (DmaDevice<SimPlatform>, [Enabler<SimPlatform>; 2]) {
    let device = DmaDevice::new(sim.clone());
    let make = |max| {
        let config = EnablerConfig::new(Profile::Packet64, max).with_verifier(false);
        let e = Enabler::create(&device, config).unwrap();
        e.set_power_callbacks(ALL);
        e
    };
    let enablers = [make(4096), make(8192)];
    (device, enablers)
}

#[test]
fn stmt_015_power_up_runs_fill_enable_start_in_order_and_stops_at_the_first_failure() {
    let sim = sim(8);
    let (device, _enablers) = two_enablers(&sim);
    fail_nowhere();
    device.power_up().unwrap();
    assert_eq!(
        take_calls(),
        [
            (4096, "fill"),
            (4096, "enable"),
            (4096, "start"),
            (8192, "fill"),
            (8192, "enable"),
            (8192, "start"),
        ]
    );
    device.power_down().unwrap();
    take_calls();
    fail_at(4096, "enable");
    assert_eq!(device.power_up(), Err(Error::DeviceDataError));
    assert_eq!(
        take_calls(),
        [(4096, "fill"), (4096, "enable")],
        "the failing enabler stops, and the walk with it"
    );
    fail_nowhere();
    assert_clean(&sim);
}

#[test]
fn stmt_016_power_down_runs_stop_disable_flush_skipping_after_failures() {
    let sim = sim(8);
    let (device, _enablers) = two_enablers(&sim);
    fail_nowhere();
    device.power_up().unwrap();
    take_calls();
    device.power_down().unwrap();
    assert_eq!(
        take_calls(),
        [
            (4096, "stop"),
            (4096, "disable"),
            (4096, "flush"),
            (8192, "stop"),
            (8192, "disable"),
            (8192, "flush"),
        ]
    );

    // Fill failed on the second enabler: it gets stop only; the first its whole sequence.
    fail_at(8192, "fill");
    assert_eq!(device.power_up(), Err(Error::DeviceDataError));
    take_calls();
    fail_nowhere();
    device.power_down().unwrap();
    assert_eq!(
        take_calls(),
        [
            (4096, "stop"),
            (4096, "disable"),
            (4096, "flush"),
            (8192, "stop"),
        ]
    );

    // Enable failed on the first: stop and disable, no flush; the second was never reached.
    fail_at(4096, "enable");
    assert_eq!(device.power_up(), Err(Error::DeviceDataError));
    take_calls();
    fail_nowhere();
    device.power_down().unwrap();
    assert_eq!(take_calls(), [(4096, "stop"), (4096, "disable")]);

    // A power-down callback's error is reported, and every reached enabler is still visited.
    device.power_up().unwrap();
    take_calls();
    fail_at(4096, "disable");
    assert_eq!(device.power_down(), Err(Error::DeviceDataError));
    assert_eq!(take_calls().len(), 6);
    fail_nowhere();
    assert_clean(&sim);
}

#[test]
fn failure_flags_are_cleared_at_each_power_up() {
    // KMDF never clears them, so one failed fill suppresses disable and flush on every later
    // power-down (spec §1.1 QUIRK); dmatx starts each power-up clean (docs/quirks.md).
    let sim = sim(8);
    let (device, _enablers) = two_enablers(&sim);
    fail_at(4096, "fill");
    assert!(device.power_up().is_err());
    fail_nowhere();
    device.power_down().unwrap();
    take_calls();
    device.power_up().unwrap();
    device.power_down().unwrap();
    let calls = take_calls();
    assert!(calls.contains(&(4096, "disable")) && calls.contains(&(4096, "flush")));
    assert_clean(&sim);
}

#[test]
fn stmt_017_deleting_the_device_deletes_enablers_transactions_and_common_buffers() {
    let sim = sim(8);
    let device = DmaDevice::new(sim.clone());
    let config = EnablerConfig::new(Profile::Packet64, 1 << 20)
        .with_version(DmaVersion::V3)
        .with_verifier(false);
    let e = Enabler::create(&device, config).unwrap();
    let adapter = e.adapter(W).unwrap().clone();
    let common = CommonBuffer::create(&e, 8192).unwrap();
    common.write(0, &[1, 2, 3]).unwrap();
    // An initialized transaction, a reserved one, a finished one and a queued one.
    let initialized = Tx::create(&e).unwrap();
    initialized
        .initialize_using_offset(record, W, buffer(&sim, 5000, 0), 0, 5000)
        .unwrap();
    let reserved = Tx::create(&e).unwrap();
    reserved
        .allocate_resources(W, 2, |_, _| {}, Log::new())
        .unwrap();
    let finished = Tx::create(&e).unwrap();
    finished
        .initialize_using_offset(record, W, buffer(&sim, 4096, 0), 0, 4096)
        .unwrap();
    let log = Log::new();
    finished.execute(log.clone()).unwrap();
    assert_eq!(finished.dma_completed(), Ok(Completion::Finished(Ok(()))));
    let queued = Tx::create(&e).unwrap();
    queued
        .initialize_using_offset(record, W, buffer(&sim, 4096, 0), 0, 4096)
        .unwrap();
    adapter.exhaust(u32::MAX);
    queued.execute(log.clone()).unwrap();
    assert_eq!(adapter.queued(), 1);

    device.delete();
    assert!(device.is_deleted() && e.is_deleted() && common.is_deleted());
    for t in [&initialized, &reserved, &finished, &queued] {
        assert_eq!(t.state(), State::Deleted);
        let refused = t.release().unwrap_err();
        assert_eq!(refused.misuse().map(|m| m.state), Some(State::Deleted));
    }
    assert_eq!(adapter.queued(), 0, "the queued request was withdrawn");
    assert_eq!(log.count(), 1, "the queued transaction never programs");
    assert_eq!(common.read(0, &mut [0; 3]), Err(Error::InvalidDeviceState));
    assert_eq!(Tx::create(&e).err(), Some(Error::InvalidDeviceState));
    assert_eq!(
        CommonBuffer::create(&e, 4096).err(),
        Some(Error::InvalidDeviceState)
    );
    assert_eq!(
        Enabler::create(&device, config).err(),
        Some(Error::InvalidDeviceState)
    );
    assert_eq!(device.power_up(), Err(Error::InvalidDeviceState));
    adapter.restore();
    // Registers, reservation, buffers and common-buffer memory are all back already, while
    // the driver still holds every handle.
    assert_clean(&sim);
    device.delete();
    drop((initialized, reserved, finished, queued, common, e));
    assert_clean(&sim);
}

#[test]
fn deleting_the_device_keeps_an_in_flight_transfer_s_memory() {
    // The device may still be writing into the buffer: it is never freed or reused.
    let sim = sim(8);
    let device = DmaDevice::new(sim.clone());
    let config = EnablerConfig::new(Profile::Packet64, 1 << 20).with_verifier(false);
    let e = Enabler::create(&device, config).unwrap();
    let t = Tx::create(&e).unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 4096, 0), 0, 4096)
        .unwrap();
    t.execute(Log::new()).unwrap();
    device.delete();
    assert_eq!(t.state(), State::Deleted);
    assert!(sim.check_clean().is_err(), "the in-flight mapping is kept");
    assert!(t.dma_completed().is_err());
}

#[test]
fn a_v2_transaction_deleted_in_flight_keeps_the_packet_slot_after_its_drop() {
    // Deleted with the device mid-transfer, then dropped: the device may still run the
    // transfer, so no other v2 packet transaction may start on it.
    let sim = sim(8);
    let device = DmaDevice::new(sim.clone());
    let config = EnablerConfig::new(Profile::Packet, 8192)
        .with_version(DmaVersion::V2)
        .with_verifier(false);
    let e = Enabler::create(&device, config).unwrap();
    let t = Tx::create(&e).unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 4096, 0), 0, 4096)
        .unwrap();
    t.execute(Log::new()).unwrap();
    device.delete();
    drop(t);
    assert!(
        e.packet_slot_taken(),
        "the slot stays with the deleted transfer"
    );
    assert!(sim.check_clean().is_err(), "its mapping is kept too");
}
