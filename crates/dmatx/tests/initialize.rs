//! Conformance: initializing a transaction (spec §2.2, §3.2.2, §3.2.4; statements 18–21,
//! 27–37).

mod common;

use common::{Log, Tx, assert_clean, buffer, contiguous, enabler, record, run_to_end, sim};
use dmatx::{Call, Direction, DmaVersion, Error, Profile, State};

const W: Direction = Direction::WriteToDevice;

#[test]
fn stmt_018_zero_length_is_invalid_and_leaves_state() {
    let sim = sim(8);
    let t = Tx::create(&enabler(
        &sim,
        Profile::ScatterGather64,
        8192,
        DmaVersion::V2,
    ))
    .unwrap();
    let e = t
        .initialize_using_offset(record, W, buffer(&sim, 4096, 0), 0, 0)
        .unwrap_err();
    assert_eq!(e.error, Error::InvalidParameter);
    assert_eq!(e.buffer.len(), 4096, "the buffer comes back");
    assert_eq!(t.state(), State::Created);
    // Same from Released.
    t.release().unwrap();
    let e = t
        .initialize_using_offset(record, W, buffer(&sim, 4096, 0), 0, 0)
        .unwrap_err();
    assert_eq!(e.error, Error::InvalidParameter);
    assert_eq!(t.state(), State::Released);
    drop((e, t));
    assert_clean(&sim);
}

#[test]
fn stmt_019_va_outside_first_segment_is_invalid() {
    let sim = sim(8);
    let t = Tx::create(&enabler(
        &sim,
        Profile::ScatterGather64,
        8192,
        DmaVersion::V3,
    ))
    .unwrap();
    let b = sim.allocate_chain(&[(3000, 0x10), (5000, 0)]).unwrap();
    let start = dmatx::hal::MemoryDescriptor::segment(&b, 0).va;
    // One byte before, at the end of the first segment, far beyond.
    for bad in [start.get() - 1, start.get() + 3000, start.get() + 1_000_000] {
        let b = sim.allocate_chain(&[(3000, 0x10), (5000, 0)]).unwrap();
        let e = t
            .initialize(record, W, b, dmatx::VirtAddr::new(bad), 100)
            .unwrap_err();
        assert_eq!(e.error, Error::InvalidParameter, "va {bad:#x}");
        assert_eq!(t.state(), State::Created);
    }
    // Inside: accepted, offset = va − start.
    t.initialize(record, W, b, dmatx::VirtAddr::new(start.get() + 2999), 5001)
        .unwrap();
    assert_eq!(t.state(), State::Initialized);
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_020_offset_at_or_past_first_segment_is_invalid() {
    let sim = sim(8);
    let t = Tx::create(&enabler(
        &sim,
        Profile::ScatterGather64,
        8192,
        DmaVersion::V3,
    ))
    .unwrap();
    for offset in [3000u64, 3001, 7999, u64::MAX] {
        let b = sim.allocate_chain(&[(3000, 0), (5000, 0)]).unwrap();
        let e = t
            .initialize_using_offset(record, W, b, offset, 1)
            .unwrap_err();
        assert_eq!(e.error, Error::InvalidParameter, "offset {offset}");
    }
    assert_eq!(t.state(), State::Created);
    assert_clean(&sim);
}

#[test]
fn stmt_021_v2_packet_rejects_buffers_past_first_segment_v3_accepts() {
    let sim = sim(8);
    let v2 = Tx::create(&enabler(&sim, Profile::Packet64, 8192, DmaVersion::V2)).unwrap();
    let b = sim.allocate_chain(&[(3000, 0), (5000, 0)]).unwrap();
    let e = v2
        .initialize_using_offset(record, W, b, 100, 4000)
        .unwrap_err();
    assert_eq!(e.error, Error::InvalidParameter);
    // Within the first segment is fine on v2.
    v2.initialize_using_offset(record, W, e.buffer, 100, 2900)
        .unwrap();
    v2.release().unwrap();

    let v3 = Tx::create(&enabler(&sim, Profile::Packet64, 8192, DmaVersion::V3)).unwrap();
    let b = sim.allocate_chain(&[(3000, 0), (5000, 0)]).unwrap();
    v3.initialize_using_offset(record, W, b, 100, 4000).unwrap();
    let log = Log::new();
    v3.execute(log.clone()).unwrap();
    let (_, status) = run_to_end(&v3);
    status.unwrap();
    assert_eq!(v3.bytes_transferred(), 4000);
    // The packet transfer stops at the segment boundary: 2900 bytes, then 1100.
    let lengths: Vec<u64> = log.calls().iter().map(|c| c.current_length).collect();
    assert_eq!(lengths, vec![2900, 1100]);
    v3.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn length_past_end_of_buffer_is_buffer_too_small() {
    let sim = sim(8);
    let t = Tx::create(&enabler(
        &sim,
        Profile::ScatterGather64,
        8192,
        DmaVersion::V3,
    ))
    .unwrap();
    for (offset, length) in [(0u64, 4097u64), (100, 3997), (4095, 2), (0, u64::MAX)] {
        let e = t
            .initialize_using_offset(record, W, buffer(&sim, 4096, 0), offset, length)
            .unwrap_err();
        let want = if length > u64::from(u32::MAX) {
            Error::InvalidParameter
        } else {
            Error::BufferTooSmall
        };
        assert_eq!(e.error, want, "offset {offset} length {length}");
        assert_eq!(t.state(), State::Created);
    }
    assert_clean(&sim);
}

#[test]
fn lengths_of_4_gib_or_more_are_rejected() {
    // KMDF narrows the length to 32 bits and wraps silently (docs/quirks.md).
    let sim = sim(8);
    let t = Tx::create(&enabler(
        &sim,
        Profile::ScatterGather64,
        8192,
        DmaVersion::V3,
    ))
    .unwrap();
    for length in [1u64 << 32, (1 << 32) + 4096, u64::MAX] {
        let e = t
            .initialize_using_offset(record, W, buffer(&sim, 4096, 0), 0, length)
            .unwrap_err();
        assert_eq!(e.error, Error::InvalidParameter);
    }
    assert_clean(&sim);
}

#[test]
fn stmt_027_initializing_an_initialized_transaction_is_misuse() {
    let sim = sim(8);
    let t = Tx::create(&enabler(
        &sim,
        Profile::ScatterGather64,
        8192,
        DmaVersion::V2,
    ))
    .unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 4096, 0), 0, 4096)
        .unwrap();
    let e = t
        .initialize_using_offset(record, W, buffer(&sim, 100, 0), 0, 100)
        .unwrap_err();
    let m = e.error.misuse().expect("misuse");
    assert_eq!((m.call, m.state), (Call::Initialize, State::Initialized));
    assert_eq!(e.buffer.len(), 100, "the second buffer comes back");
    // The first initialization is untouched.
    assert_eq!(t.state(), State::Initialized);
    assert_eq!(t.length(), 4096);
    assert_eq!(t.release().unwrap().map(|b| b.len()), Some(4096));
    assert_clean(&sim);
}

#[test]
fn stmt_028_initializing_a_completed_transaction_without_release_is_misuse() {
    let sim = sim(8);
    let t = Tx::create(&enabler(
        &sim,
        Profile::ScatterGather64,
        8192,
        DmaVersion::V2,
    ))
    .unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 4096, 0), 0, 4096)
        .unwrap();
    t.execute(Log::new()).unwrap();
    run_to_end(&t).1.unwrap();
    assert_eq!(t.state(), State::TransferCompleted);
    let e = t
        .initialize_using_offset(record, W, buffer(&sim, 100, 0), 0, 100)
        .unwrap_err();
    let m = e.error.misuse().expect("misuse");
    assert_eq!(
        (m.call, m.state),
        (Call::Initialize, State::TransferCompleted)
    );
    assert_eq!(t.state(), State::TransferCompleted);
    assert_eq!(t.bytes_transferred(), 4096);
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_029_failure_after_state_check_leaves_released_with_immediate_cleared() {
    let sim = sim(8);
    let e = enabler(&sim, Profile::ScatterGather64, 32768, DmaVersion::V3);
    e.set_max_sg_elements(2).unwrap();
    let t = Tx::create(&e).unwrap();
    t.set_immediate_execution(true).unwrap();
    let err = t
        .initialize_using_offset(record, W, buffer(&sim, 8192, 0x100), 0, 8192)
        .unwrap_err();
    assert_eq!(err.error, Error::WdfTooFragmented);
    assert_eq!(t.state(), State::Released);
    assert!(
        !t.immediate_execution(),
        "a failed initialize clears immediate execution"
    );
    // Re-initializable.
    t.initialize_using_offset(record, W, buffer(&sim, 8192, 0), 0, 8192)
        .unwrap();
    assert_eq!(t.state(), State::Initialized);
    t.release().unwrap();
    drop(err);
    assert_clean(&sim);
}

#[test]
fn stmt_030_sg_precheck_page_offset_too_fragmented() {
    let sim = sim(4); // F = min(8192, 3 pages) = 8 KiB
    let e = enabler(&sim, Profile::ScatterGather64, 8192, DmaVersion::V2);
    e.set_max_sg_elements(2).unwrap();
    assert_eq!(e.fragment_length(W), 8192);
    let t = Tx::create(&e).unwrap();
    let err = t
        .initialize_using_offset(record, W, buffer(&sim, 8192, 0x100), 0, 8192)
        .unwrap_err();
    assert_eq!(err.error, Error::WdfTooFragmented);
    t.initialize_using_offset(record, W, buffer(&sim, 8192, 0), 0, 8192)
        .unwrap();
    t.execute(Log::new()).unwrap();
    assert_eq!(run_to_end(&t), (1, Ok(())));
    t.release().unwrap();
    drop(err);
    assert_clean(&sim);
}

#[test]
fn stmt_031_sg_precheck_counts_pages_even_when_contiguous() {
    let sim = sim(4);
    let e = enabler(&sim, Profile::ScatterGather64, 8192, DmaVersion::V2);
    e.set_max_sg_elements(2).unwrap();
    let t = Tx::create(&e).unwrap();
    let err = t
        .initialize_using_offset(record, W, contiguous(&sim, 8192, 0x100), 0, 8192)
        .unwrap_err();
    assert_eq!(err.error, Error::WdfTooFragmented);
    drop(err);
    assert_clean(&sim);
}

#[test]
fn stmt_032_lowering_f_after_initialize_does_not_rerun_precheck() {
    let sim = sim(4);
    let e = enabler(&sim, Profile::ScatterGather64, 8192, DmaVersion::V2);
    e.set_max_sg_elements(2).unwrap();
    let t = Tx::create(&e).unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 16384, 0), 0, 16384)
        .unwrap();
    assert_eq!(t.set_maximum_length(5000), Ok(true));
    assert_eq!(t.state(), State::Initialized);
    let log = Log::new();
    t.execute(log.clone()).unwrap();
    let (n, status) = run_to_end(&t);
    status.unwrap();
    assert_eq!(n, 4); // 5000 + 5000 + 5000 + 1384
    assert!(log.calls().iter().all(|c| c.current_length <= 5000));
    t.release().unwrap();
    assert_clean(&sim);
}

fn single(sim: &dmatx_sim::SimPlatform, profile: Profile, max: u64) -> std::sync::Arc<Tx> {
    let t = Tx::create(&enabler(sim, profile, max, DmaVersion::V3)).unwrap();
    t.set_single_transfer_requirement(true).unwrap();
    t
}

#[test]
fn stmt_033_single_transfer_longer_than_maximum_length() {
    let sim = sim(64);
    let t = single(&sim, Profile::ScatterGather64, 8192);
    let err = t
        .initialize_using_offset(record, W, buffer(&sim, 8193, 0), 0, 8193)
        .unwrap_err();
    assert_eq!(err.error, Error::WdfTooManyTransfers);
    assert_eq!(t.state(), State::Released);
    // Exactly the maximum: one transfer.
    t.set_single_transfer_requirement(true).unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 8192, 0), 0, 8192)
        .unwrap();
    t.execute(Log::new()).unwrap();
    assert_eq!(run_to_end(&t), (1, Ok(())));
    t.release().unwrap();
    drop(err);
    assert_clean(&sim);
}

#[test]
fn stmt_034_single_transfer_needing_more_map_registers_than_available() {
    let sim = sim(4);
    let t = single(&sim, Profile::ScatterGather64, 1 << 20);
    // 4 pages at offset 0x10 span 5 pages > N = 4.
    let err = t
        .initialize_using_offset(record, W, buffer(&sim, 16384, 0x10), 0, 16384)
        .unwrap_err();
    assert_eq!(err.error, Error::WdfNotEnoughMapRegisters);
    t.set_single_transfer_requirement(true).unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 16384, 0), 0, 16384)
        .unwrap();
    t.execute(Log::new()).unwrap();
    assert_eq!(run_to_end(&t), (1, Ok(())));
    t.release().unwrap();
    drop(err);
    assert_clean(&sim);
}

#[test]
fn stmt_035_single_transfer_packet_needing_two_elements_is_too_fragmented() {
    let sim = sim(8);
    let t = single(&sim, Profile::Packet64, 1 << 20);
    // Scattered pages: two physical runs.
    let err = t
        .initialize_using_offset(record, W, buffer(&sim, 8192, 0), 0, 8192)
        .unwrap_err();
    assert_eq!(err.error, Error::WdfTooFragmented);
    // Physically contiguous: one element.
    t.set_single_transfer_requirement(true).unwrap();
    t.initialize_using_offset(record, W, contiguous(&sim, 8192, 0), 0, 8192)
        .unwrap();
    let log = Log::new();
    t.execute(log.clone()).unwrap();
    assert_eq!(run_to_end(&t), (1, Ok(())));
    assert_eq!(log.calls()[0].sg.len(), 1);
    t.release().unwrap();
    drop(err);
    assert_clean(&sim);
}

#[test]
fn stmt_036_single_transfer_requirement_on_initialized_has_no_effect() {
    let sim = sim(8);
    let t = Tx::create(&enabler(
        &sim,
        Profile::ScatterGather64,
        8192,
        DmaVersion::V3,
    ))
    .unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 20000, 0), 0, 20000)
        .unwrap();
    assert_eq!(
        t.set_single_transfer_requirement(true),
        Err(Error::InvalidDeviceRequest)
    );
    assert!(!t.single_transfer_requirement());
    t.execute(Log::new()).unwrap();
    assert_eq!(run_to_end(&t), (3, Ok(())), "still split normally");
    t.release().unwrap();
    // v2: no effect at all.
    let v2 = Tx::create(&enabler(
        &sim,
        Profile::ScatterGather64,
        8192,
        DmaVersion::V2,
    ))
    .unwrap();
    assert_eq!(
        v2.set_single_transfer_requirement(true),
        Err(Error::InvalidDeviceRequest)
    );
    assert!(!v2.single_transfer_requirement());
    assert_clean(&sim);
}

#[test]
fn stmt_037_release_restores_single_transfer_default() {
    let sim = sim(8);
    let t = Tx::create(&enabler(
        &sim,
        Profile::ScatterGather64,
        8192,
        DmaVersion::V3,
    ))
    .unwrap();
    t.set_single_transfer_requirement(true).unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 4096, 0), 0, 4096)
        .unwrap();
    t.release().unwrap();
    assert!(!t.single_transfer_requirement());

    let mut config = dmatx::EnablerConfig::new(Profile::ScatterGather64, 8192)
        .with_version(DmaVersion::V3)
        .with_verifier(false);
    config.require_single_transfer = true;
    let e = dmatx::Enabler::create(&dmatx::DmaDevice::new(sim.clone()), config).unwrap();
    let t = Tx::create(&e).unwrap();
    assert!(t.single_transfer_requirement(), "the enabler default");
    t.set_single_transfer_requirement(false).unwrap();
    t.release().unwrap();
    assert!(t.single_transfer_requirement(), "restored by release");
    assert_clean(&sim);
}

#[test]
fn single_transfer_checked_at_initialize_executes() {
    // Initialize checks a single transfer's elements as physical runs; execute must not apply
    // a different (page) measure and refuse what Initialize accepted.
    let sim = sim(8);
    let e = enabler(&sim, Profile::ScatterGather64, 1 << 16, DmaVersion::V3);
    e.set_max_sg_elements(1).unwrap();
    let t = Tx::create(&e).unwrap();
    t.set_single_transfer_requirement(true).unwrap();
    t.initialize_using_offset(record, W, contiguous(&sim, 8192, 0), 0, 8192)
        .unwrap();
    let log = Log::new();
    t.execute(log.clone()).unwrap();
    assert_eq!(log.calls()[0].sg.len(), 1);
    assert_eq!(run_to_end(&t), (1, Ok(())));
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn packet_length_past_end_of_buffer_is_buffer_too_small() {
    let sim = sim(8);
    let t = Tx::create(&enabler(&sim, Profile::Packet64, 8192, DmaVersion::V3)).unwrap();
    let e = t
        .initialize_using_offset(record, W, buffer(&sim, 4096, 0), 100, 4000)
        .unwrap_err();
    assert_eq!(e.error, Error::BufferTooSmall);
    assert_eq!(t.state(), State::Created);
    drop(e);
    assert_clean(&sim);
}

#[test]
fn transfer_info_counts_pages_and_needs_initialized() {
    let sim = sim(8);
    let t = Tx::create(&enabler(
        &sim,
        Profile::ScatterGather64,
        8192,
        DmaVersion::V3,
    ))
    .unwrap();
    assert!(t.transfer_info().unwrap_err().misuse().is_some());
    t.initialize_using_offset(record, W, buffer(&sim, 8192, 0x100), 0, 8192)
        .unwrap();
    let info = t.transfer_info().unwrap();
    assert_eq!((info.map_registers, info.sg_elements), (3, 3));
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn immediate_execution_refused_while_executing_on_v3() {
    let sim = sim(8);
    let t = Tx::create(&enabler(
        &sim,
        Profile::ScatterGather64,
        4096,
        DmaVersion::V3,
    ))
    .unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 8192, 0), 0, 8192)
        .unwrap();
    t.execute(Log::new()).unwrap();
    assert_eq!(
        t.set_immediate_execution(true),
        Err(Error::InvalidDeviceRequest)
    );
    assert!(!t.immediate_execution());
    run_to_end(&t).1.unwrap();
    t.release().unwrap();
    assert_clean(&sim);
}
