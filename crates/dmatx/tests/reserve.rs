//! Reserved DMA: allocate resources, the reserve callback, free resources (spec §2.5, §3.9;
//! statements 92–100) and the fix of the queued-reservation cancel quirk (§3.6).

mod common;

use common::{Log, Tx, assert_clean, buffer, contiguous, enabler, record, run_to_end, sim};
use dmatx::{Call, Direction, DmaVersion, Error, Profile, State};
use std::sync::Arc;

const W: Direction = Direction::WriteToDevice;

/// Reserve callback: checks the transaction is still Reserved, marks the log (see
/// `took_reserve`) and counts its calls in the log (see `reserve_calls`).
fn reserved(t: &Tx, log: &Arc<Log>) {
    assert_eq!(
        t.state(),
        State::Reserved,
        "the reserve callback sees Reserved"
    );
    log.inline_results
        .lock()
        .unwrap()
        .push(dmatx::Completion::MoreProcessingRequired);
    *log.inside.lock().unwrap() = true;
}

/// Reserve callbacks run with this log as their context so far.
fn reserve_calls(log: &Log) -> usize {
    log.inline_results.lock().unwrap().len()
}

fn packet_v3(sim: &dmatx_sim::SimPlatform, n_max: u64) -> dmatx::Enabler<dmatx_sim::SimPlatform> {
    enabler(sim, Profile::Packet64, n_max, DmaVersion::V3)
}

/// Whether the log was marked by a reserve callback (and clear the mark).
fn took_reserve(log: &Log) -> bool {
    std::mem::take(&mut *log.inside.lock().unwrap())
}

#[test]
fn stmt_092_allocate_resources_on_sg_or_v2_is_invalid_device_request() {
    let sim = sim(8);
    for (profile, version) in [
        (Profile::ScatterGather64, DmaVersion::V3),
        (Profile::Packet64, DmaVersion::V2),
    ] {
        let t = Tx::create(&enabler(&sim, profile, 1 << 20, version)).unwrap();
        let log = Log::new();
        assert_eq!(
            t.allocate_resources(W, 2, reserved, log.clone()).err(),
            Some(Error::InvalidDeviceRequest)
        );
        assert_eq!(t.state(), State::Created);
        assert!(!took_reserve(&log));
        assert_eq!(t.free_resources().err(), Some(Error::InvalidDeviceRequest));
    }
    assert_clean(&sim);
}

#[test]
fn stmt_093_derived_count_needs_an_initialized_transaction() {
    let sim = sim(8);
    let t = Tx::create(&packet_v3(&sim, 1 << 20)).unwrap();
    let e = t
        .allocate_resources(W, 0, reserved, Log::new())
        .unwrap_err();
    let m = e.misuse().expect("misuse");
    assert_eq!((m.call, m.state), (Call::AllocateResources, State::Created));
    assert_eq!(t.state(), State::Created);
    assert_eq!(t.reserved_map_registers(), 0);
    assert_clean(&sim);
}

#[test]
fn stmt_094_allocating_twice_is_misuse() {
    let sim = sim(8);
    let t = Tx::create(&packet_v3(&sim, 1 << 20)).unwrap();
    let log = Log::new();
    t.allocate_resources(W, 3, reserved, log.clone()).unwrap();
    assert!(took_reserve(&log));
    let e = t
        .allocate_resources(W, 2, reserved, log.clone())
        .unwrap_err();
    assert_eq!(e.misuse().map(|m| m.call), Some(Call::AllocateResources));
    assert!(!took_reserve(&log), "no second callback");
    assert_eq!(t.reserved_map_registers(), 3);
    assert_eq!(t.free_resources().unwrap().map(|b| b.len()), None);
    assert_clean(&sim);
}

#[test]
fn stmt_095_reserve_callback_runs_once_with_its_context_now_or_when_registers_free() {
    let sim = sim(8);
    let e = packet_v3(&sim, 1 << 20);
    let adapter = e.adapter(W).unwrap().clone();
    // Free now: the callback runs before allocate_resources returns.
    let t = Tx::create(&e).unwrap();
    let log = Log::tagged(7);
    t.allocate_resources(W, 4, reserved, log.clone()).unwrap();
    assert!(took_reserve(&log));
    assert_eq!(adapter.free_registers(), 4);
    // Not free: queued, then called on the thread that frees them.
    let u = Tx::create(&e).unwrap();
    let other = Log::tagged(8);
    u.allocate_resources(W, 6, reserved, other.clone()).unwrap();
    assert!(!took_reserve(&other));
    assert_eq!(u.state(), State::Reserved);
    assert_eq!(adapter.queued(), 1);
    t.free_resources().unwrap();
    assert!(took_reserve(&other), "granted when t's registers came back");
    assert_eq!(
        (reserve_calls(&log), reserve_calls(&other)),
        (1, 1),
        "once each"
    );
    assert_eq!(adapter.free_registers(), 2);
    u.free_resources().unwrap();
    drop((t, u));
    assert_eq!(
        Arc::strong_count(&other),
        1,
        "the context is dropped after the call"
    );
    assert_clean(&sim);
}

#[test]
fn stmt_096_allocate_resources_discards_the_buffer_description() {
    let sim = sim(8);
    let t = Tx::create(&packet_v3(&sim, 1 << 20)).unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 10_000, 0x10), 0x10, 9_000)
        .unwrap();
    let log = Log::new();
    // Count 0: every page the initialized range spans (3 here).
    let back = t.allocate_resources(W, 0, reserved, log.clone()).unwrap();
    assert_eq!(back.map(|b| b.len()), Some(10_000), "the buffer comes back");
    assert_eq!(t.reserved_map_registers(), 3);
    assert_eq!((t.state(), t.length()), (State::Reserved, 0));
    let e = t.execute(log.clone()).unwrap_err();
    assert_eq!(
        e.misuse().map(|m| (m.call, m.state)),
        Some((Call::Execute, State::Reserved)),
        "must initialize again"
    );
    t.free_resources().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_097_reserved_execute_takes_no_registers_and_fits_transfers_in_r() {
    let sim = sim(16);
    let e = packet_v3(&sim, 1 << 20);
    let adapter = e.adapter(W).unwrap().clone();
    let t = Tx::create(&e).unwrap();
    let log = Log::new();
    t.allocate_resources(W, 3, reserved, log.clone()).unwrap();
    // Every other register is gone: an unreserved execute would queue.
    adapter.exhaust(u32::MAX);
    assert_eq!(adapter.free_registers(), 0);
    let len = 64 * 1024 + 300;
    t.initialize_using_offset(record, W, contiguous(&sim, len, 0x123), 0, len)
        .unwrap();
    t.execute(log.clone()).unwrap();
    assert_eq!(log.count(), 1, "programmed at once, nothing queued");
    assert_eq!(adapter.queued(), 0);
    let (completions, status) = run_to_end(&t);
    assert_eq!(status, Ok(()));
    let calls = log.calls();
    assert_eq!(calls.len(), completions);
    let mut position = 0x123_u64;
    for call in &calls {
        let pages = dmatx::hal::PhysAddr::new(position)
            .page_offset()
            .checked_add(call.current_length)
            .map(|end| end.div_ceil(4096))
            .unwrap();
        assert!(pages <= 3, "a transfer needs {pages} registers, 3 reserved");
        position += call.current_length;
    }
    assert_eq!(calls.iter().map(|c| c.current_length).sum::<u64>(), len);
    // First transfer: the rest of the first page plus two more pages.
    assert_eq!(calls[0].current_length, 2 * 4096 + (4096 - 0x123));
    adapter.restore();
    t.release().unwrap();
    t.free_resources().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_098_completion_and_release_keep_the_reservation() {
    let sim = sim(8);
    let e = packet_v3(&sim, 1 << 20);
    let adapter = e.adapter(W).unwrap().clone();
    let t = Tx::create(&e).unwrap();
    let log = Log::new();
    t.allocate_resources(W, 5, reserved, log.clone()).unwrap();
    assert!(took_reserve(&log));
    for round in 0..3 {
        t.initialize_using_offset(record, W, buffer(&sim, 12_000, 0), 0, 12_000)
            .unwrap();
        t.execute(log.clone()).unwrap();
        assert_eq!(run_to_end(&t).1, Ok(()), "round {round}");
        assert_eq!(adapter.free_registers(), 3, "reserved registers stay held");
        t.release().unwrap();
        assert_eq!(t.reserved_map_registers(), 5);
        assert_eq!(adapter.free_registers(), 3);
    }
    assert!(!took_reserve(&log), "no second reserve callback");
    t.free_resources().unwrap();
    assert_eq!(adapter.free_registers(), 8);
    assert_clean(&sim);
}

#[test]
fn stmt_099_free_resources_on_created_is_misuse_and_after_completion_releases() {
    let sim = sim(8);
    let e = packet_v3(&sim, 1 << 20);
    let adapter = e.adapter(W).unwrap().clone();
    let t = Tx::create(&e).unwrap();
    let m = t.free_resources().unwrap_err();
    assert_eq!(
        m.misuse().map(|m| (m.call, m.state)),
        Some((Call::FreeResources, State::Created))
    );
    let log = Log::new();
    t.allocate_resources(W, 2, reserved, log.clone()).unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 4096, 0), 0, 4096)
        .unwrap();
    t.execute(log.clone()).unwrap();
    let busy = t.free_resources().unwrap_err();
    assert_eq!(busy.misuse().map(|m| m.state), Some(State::Transfer));
    assert_eq!(run_to_end(&t).1, Ok(()));
    let back = t.free_resources().unwrap();
    assert_eq!(
        back.map(|b| b.len()),
        Some(4096),
        "free resources hands the buffer back"
    );
    assert_eq!(
        (t.state(), t.reserved_map_registers()),
        (State::Released, 0)
    );
    assert_eq!(adapter.free_registers(), 8);
    // Reserving again works after a free.
    t.allocate_resources(W, 2, reserved, log.clone()).unwrap();
    drop(t);
    assert_clean(&sim);
}

#[test]
fn stmt_100_deleting_a_transaction_returns_its_reservation() {
    let sim = sim(8);
    let e = packet_v3(&sim, 1 << 20);
    let adapter = e.adapter(W).unwrap().clone();
    let t = Tx::create(&e).unwrap();
    t.allocate_resources(W, 6, reserved, Log::new()).unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 4096, 0), 0, 4096)
        .unwrap();
    assert_eq!(adapter.free_registers(), 2);
    drop(t);
    assert_eq!(adapter.free_registers(), 8);
    assert_clean(&sim);
}

#[test]
fn cancelling_a_queued_reservation_clears_it() {
    // KMDF keeps the reserved count with no registers behind it (spec §3.6 QUIRK); dmatx
    // clears it so the transaction can reserve again (docs/quirks.md).
    let sim = sim(8);
    let e = packet_v3(&sim, 1 << 20);
    let adapter = e.adapter(W).unwrap().clone();
    let t = Tx::create(&e).unwrap();
    adapter.exhaust(8);
    let log = Log::new();
    t.allocate_resources(W, 4, reserved, log.clone()).unwrap();
    assert_eq!((t.state(), adapter.queued()), (State::Reserved, 1));
    let e = t.release().unwrap_err();
    assert_eq!(
        e.misuse().map(|m| m.call),
        Some(Call::Release),
        "cancel first"
    );
    assert_eq!(t.cancel(), Ok(true));
    assert_eq!(
        (t.state(), t.reserved_map_registers()),
        (State::TransferFailed, 0)
    );
    adapter.restore();
    assert!(
        !took_reserve(&log),
        "a cancelled reservation never calls back"
    );
    t.release().unwrap();
    t.allocate_resources(W, 4, reserved, log.clone()).unwrap();
    assert!(took_reserve(&log));
    t.free_resources().unwrap();
    drop(t);
    assert_eq!(Arc::strong_count(&log), 1);
    assert_clean(&sim);
}

#[test]
fn reservation_larger_than_the_adapter_or_unavailable_immediately_fails() {
    let sim = sim(8);
    let e = packet_v3(&sim, 1 << 20);
    let adapter = e.adapter(W).unwrap().clone();
    let t = Tx::create(&e).unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 4096, 0), 0, 4096)
        .unwrap();
    let log = Log::new();
    assert_eq!(
        t.allocate_resources(W, 9, reserved, log.clone()).err(),
        Some(Error::InsufficientResources)
    );
    assert_eq!(
        (t.state(), t.reserved_map_registers()),
        (State::TransferFailed, 0)
    );
    let back = t.release().unwrap();
    assert_eq!(
        back.map(|b| b.len()),
        Some(4096),
        "the buffer comes back with release"
    );
    // Immediate execution with the registers taken: refused, never queued.
    t.set_immediate_execution(true).unwrap();
    adapter.exhaust(8);
    assert_eq!(
        t.allocate_resources(W, 2, reserved, log.clone()).err(),
        Some(Error::InsufficientResources)
    );
    assert_eq!(adapter.queued(), 0);
    assert!(!took_reserve(&log));
    adapter.restore();
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn single_transfer_checks_against_the_reservation() {
    let sim = sim(8);
    let t = Tx::create(&packet_v3(&sim, 1 << 20)).unwrap();
    t.allocate_resources(W, 2, reserved, Log::new()).unwrap();
    t.set_single_transfer_requirement(true).unwrap();
    let e = t
        .initialize_using_offset(record, W, buffer(&sim, 3 * 4096, 0), 0, 3 * 4096)
        .unwrap_err();
    assert_eq!(e.error, Error::WdfNotEnoughMapRegisters);
    assert_eq!(
        t.reserved_map_registers(),
        2,
        "a failed initialize keeps the reservation"
    );
    t.free_resources().unwrap();
    assert_clean(&sim);
}

#[test]
fn freeing_a_queued_reservation_lets_the_requests_behind_it_run() {
    let sim = sim(8);
    let e = packet_v3(&sim, 1 << 20);
    let adapter = e.adapter(W).unwrap().clone();
    let (a, t, u) = (
        Tx::create(&e).unwrap(),
        Tx::create(&e).unwrap(),
        Tx::create(&e).unwrap(),
    );
    let (la, lt, lu) = (Log::new(), Log::new(), Log::new());
    a.allocate_resources(W, 4, reserved, la.clone()).unwrap();
    t.allocate_resources(W, 6, reserved, lt.clone()).unwrap();
    u.allocate_resources(W, 2, reserved, lu.clone()).unwrap();
    assert_eq!(adapter.queued(), 2, "t waits for 6, u behind it");
    t.free_resources().unwrap();
    assert_eq!(adapter.queued(), 0);
    assert!(
        took_reserve(&lu),
        "u's 2 registers fit once t's request is gone"
    );
    assert!(!took_reserve(&lt));
    for x in [&a, &u] {
        x.free_resources().unwrap();
    }
    drop((a, t, u));
    assert_clean(&sim);
}

/// A request binding that records the calls it gets.
#[derive(Default)]
struct Binding(std::sync::Mutex<Vec<bool>>);

impl dmatx::RequestBinding for Binding {
    fn set_dma_active(&self, active: bool) {
        self.0.lock().unwrap().push(active);
    }
    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}

#[test]
fn a_refused_reservation_keeps_the_request_binding() {
    let sim = sim(8);
    let t = Tx::create(&packet_v3(&sim, 1 << 20)).unwrap();
    let binding = Arc::new(Binding::default());
    t.initialize_with_request(record, W, buffer(&sim, 4096, 0), 0, 4096, binding.clone())
        .unwrap();
    assert_eq!(
        t.allocate_resources(W, 9, reserved, Log::new()).err(),
        Some(Error::InsufficientResources)
    );
    assert!(
        t.request().is_some(),
        "the binding stays for the driver to find"
    );
    assert!(
        binding.0.lock().unwrap().is_empty(),
        "never executed, never active"
    );
    t.release().unwrap();
    assert!(t.request().is_none());
    assert_clean(&sim);
}
