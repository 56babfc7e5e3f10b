//! Conformance: release, delete and reuse (spec §2.2, §3.11; statements 74–78).

mod common;

use common::{Log, Tx, assert_clean, buffer, enabler, record, run_to_end, sim};
use dmatx::{Call, Direction, DmaVersion, Profile, State};

const W: Direction = Direction::WriteToDevice;
const R: Direction = Direction::ReadFromDevice;

#[test]
fn stmt_074_release_of_released_is_a_no_op() {
    let sim = sim(8);
    let t = Tx::create(&enabler(
        &sim,
        Profile::ScatterGather64,
        4096,
        DmaVersion::V2,
    ))
    .unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 100, 0), 0, 100)
        .unwrap();
    assert_eq!(t.release().unwrap().map(|b| b.len()), Some(100));
    assert_eq!(t.state(), State::Released);
    assert!(t.release().unwrap().is_none());
    assert!(t.release().unwrap().is_none());
    assert_eq!(t.state(), State::Released);
    // Release of a Created transaction moves it to Released.
    let fresh = Tx::create(&t.enabler()).unwrap();
    assert!(fresh.release().unwrap().is_none());
    assert_eq!(fresh.state(), State::Released);
    assert_clean(&sim);
}

#[test]
fn stmt_075_release_while_executing_is_misuse() {
    let sim = sim(8);
    let t = Tx::create(&enabler(&sim, Profile::Packet64, 4096, DmaVersion::V2)).unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 8192, 0), 0, 8192)
        .unwrap();
    t.execute(Log::new()).unwrap();
    let m = *t.release().unwrap_err().misuse().unwrap();
    assert_eq!((m.call, m.state), (Call::Release, State::Transfer));
    assert_eq!(t.state(), State::Transfer);
    assert_eq!(
        t.current_transfer_length(),
        4096,
        "the transfer is untouched"
    );
    run_to_end(&t).1.unwrap();
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_076_delete_while_executing_quarantines_buffer_and_registers() {
    // KMDF bug-checks under the verifier and then force-frees resources the device may still be
    // using. dmatx keeps them forever instead (docs/quirks.md): the registers never return, so
    // this is the one test whose platform does not come back clean, and it checks exactly that.
    let sim = sim(8);
    let e = enabler(&sim, Profile::Packet64, 4096, DmaVersion::V3);
    let t = Tx::create(&e).unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 8192, 0), 0, 8192)
        .unwrap();
    t.execute(Log::new()).unwrap();
    drop(t);
    let adapter = e.adapter(W).unwrap();
    assert_eq!(
        adapter.free_registers(),
        8 - 2,
        "the run's 2 registers stay out of the pool"
    );
    let complaint = sim.check_clean().unwrap_err();
    assert!(complaint.contains("register"), "{complaint}");
}

#[test]
fn stmt_077_release_resets_bytes_and_immediate_execution() {
    let sim = sim(8);
    let t = Tx::create(&enabler(
        &sim,
        Profile::ScatterGather64,
        4096,
        DmaVersion::V3,
    ))
    .unwrap();
    t.set_immediate_execution(true).unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 6000, 0), 0, 6000)
        .unwrap();
    t.execute(Log::new()).unwrap();
    run_to_end(&t).1.unwrap();
    assert_eq!(t.bytes_transferred(), 6000);
    t.release().unwrap();
    assert_eq!(t.bytes_transferred(), 0);
    assert_eq!(t.length(), 0);
    assert!(!t.immediate_execution());
    assert_clean(&sim);
}

#[test]
fn stmt_078_reuse_with_another_direction_and_buffer() {
    let sim = sim(8);
    let t = Tx::create(&enabler(
        &sim,
        Profile::ScatterGather64Duplex,
        4096,
        DmaVersion::V2,
    ))
    .unwrap();
    for (round, (dir, len)) in [(W, 10_000u64), (R, 3000), (W, 4096), (R, 123_457)]
        .into_iter()
        .enumerate()
    {
        t.initialize_using_offset(record, dir, buffer(&sim, len, round as u64 * 100), 0, len)
            .unwrap();
        let log = Log::new();
        t.execute(log.clone()).unwrap();
        run_to_end(&t).1.unwrap();
        assert_eq!(t.bytes_transferred(), len);
        assert!(log.calls().iter().all(|c| c.direction == dir));
        assert_eq!(t.direction(), dir);
        assert_eq!(t.release().unwrap().unwrap().len(), len);
    }
    assert_clean(&sim);
}

#[test]
fn forgetting_an_executing_transaction_never_lets_the_device_write_into_reused_memory() {
    // `mem::forget` of the only handle while the device owns a transfer: the buffer's pages must
    // stay allocated forever, so a device write that lands later hits memory nobody else has.
    use dmatx::hal::MemoryDescriptor;
    use dmatx_sim::{CompletionMode, DeviceConfig, SimDmaDevice};
    let sim = sim(8);
    let e = enabler(&sim, Profile::ScatterGather64, 4096, DmaVersion::V3);
    let adapter = e.adapter(R).unwrap().clone();
    let device = std::sync::Arc::new(SimDmaDevice::new(
        &adapter,
        DeviceConfig::default()
            .storage_bytes(8192)
            .mode(CompletionMode::Manual),
    ));
    device.write_storage(0, &[0xEE; 8192]).unwrap();
    let t = Tx::create(&e).unwrap();
    let b = buffer(&sim, 4096, 0);
    let frame = b.segment(0).frames[0];
    t.initialize_using_offset(record, R, b, 0, 4096).unwrap();
    let log = Log::new();
    t.execute(log.clone()).unwrap();
    let sg = log.calls()[0].sg.clone();
    device.start(R, &sg, 0);
    std::mem::forget(t);
    // Memory is allocated again; none of it may be the forgotten buffer's page.
    let others: Vec<_> = (0..64).map(|_| buffer(&sim, 4096, 0)).collect();
    assert!(others.iter().all(|o| o.segment(0).frames[0] != frame));
    // The device finishes its write: it lands in the leaked page, through a live mapping.
    assert!(device.step());
    assert!(sim.sanitizer_record().is_empty());
    for o in &others {
        assert_eq!(o.to_vec(), vec![0; 4096], "no other buffer was written");
    }
    // The leak is visible: registers out of the pool and memory not returned.
    assert!(sim.check_clean().is_err());
    drop(others);
    assert!(sim.check_memory_returned().is_err());
}

#[test]
fn deleting_a_v2_packet_transaction_mid_transfer_keeps_the_device_busy() {
    // The device may still be running the deleted transaction's transfer, so no other v2
    // packet transaction may program it: the slot stays taken (docs/quirks.md).
    let sim = sim(8);
    let e = enabler(&sim, Profile::Packet64, 4096, DmaVersion::V2);
    let t = Tx::create(&e).unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 8192, 0), 0, 8192)
        .unwrap();
    t.execute(Log::new()).unwrap();
    drop(t);
    assert!(e.packet_slot_taken());
    let other = Tx::create(&e).unwrap();
    other
        .initialize_using_offset(record, W, buffer(&sim, 100, 0), 0, 100)
        .unwrap();
    assert_eq!(other.execute(Log::new()), Err(dmatx::Error::WdfBusy));
    other.release().unwrap();
}
