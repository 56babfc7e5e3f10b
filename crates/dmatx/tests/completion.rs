//! Conformance: completion (spec §2.3, §3.4, §3.5; statements 56–73).

mod common;

use common::{Inline, Log, Tx, assert_clean, buffer, contiguous, enabler, record, run_to_end, sim};
use dmatx::{Call, Completion, Direction, DmaVersion, Error, Profile, State};
use std::sync::Arc;

const W: Direction = Direction::WriteToDevice;
const R: Direction = Direction::ReadFromDevice;
const MORE: Completion = Completion::MoreProcessingRequired;

fn started(
    sim: &dmatx_sim::SimPlatform,
    profile: Profile,
    n_len: u64,
    v: DmaVersion,
) -> (Arc<Tx>, Arc<Log>) {
    let t = Tx::create(&enabler(sim, profile, 4096, v)).unwrap();
    t.initialize_using_offset(record, W, buffer(sim, n_len, 0), 0, n_len)
        .unwrap();
    let log = Log::new();
    t.execute(log.clone()).unwrap();
    (t, log)
}

#[test]
fn stmt_056_completion_before_execute_is_misuse() {
    let sim = sim(8);
    let t = Tx::create(&enabler(
        &sim,
        Profile::ScatterGather64,
        4096,
        DmaVersion::V2,
    ))
    .unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 4096, 0), 0, 4096)
        .unwrap();
    for (r, call) in [
        (t.dma_completed(), Call::DmaCompleted),
        (t.dma_completed_with_length(1), Call::DmaCompletedWithLength),
        (t.dma_completed_final(1), Call::DmaCompletedFinal),
    ] {
        let m = *r.unwrap_err().misuse().expect("misuse");
        assert_eq!((m.call, m.state), (call, State::Initialized));
    }
    assert_eq!(t.state(), State::Initialized);
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_057_completion_after_finish_is_misuse() {
    let sim = sim(8);
    let (t, _) = started(&sim, Profile::Packet64, 4096, DmaVersion::V2);
    assert_eq!(t.dma_completed(), Ok(Completion::Finished(Ok(()))));
    let m = *t.dma_completed().unwrap_err().misuse().unwrap();
    assert_eq!(
        (m.call, m.state),
        (Call::DmaCompleted, State::TransferCompleted)
    );
    assert_eq!(t.bytes_transferred(), 4096);
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn completing_one_transfer_twice_is_misuse() {
    // The transfer after a deferred restage is not programmed yet when a second completion
    // comes in; dmatx refuses it (KMDF does not check).
    let sim = sim(8);
    let (t, log) = started(&sim, Profile::ScatterGather64, 4096, DmaVersion::V3);
    assert_eq!(log.count(), 1);
    assert!(t.dma_completed().unwrap().is_finished());
    assert!(t.dma_completed().is_err());
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_058_with_length_beyond_transfer_fails_the_transaction() {
    let sim = sim(8);
    let (t, _) = started(&sim, Profile::ScatterGather64, 8192, DmaVersion::V2);
    assert_eq!(
        t.dma_completed_with_length(4097),
        Ok(Completion::Finished(Err(Error::InvalidParameter)))
    );
    assert_eq!(t.state(), State::TransferFailed);
    assert_eq!(t.bytes_transferred(), 0);
    t.release().unwrap();
    assert_clean(&sim); // dmatx still returned the transfer's registers and mapping
}

#[test]
fn stmt_059_final_beyond_transfer_returns_finished_with_invalid_parameter() {
    let sim = sim(8);
    let (t, _) = started(&sim, Profile::Packet64, 8192, DmaVersion::V2);
    let c = t.dma_completed_final(u64::MAX).unwrap();
    assert_eq!(c, Completion::Finished(Err(Error::InvalidParameter)));
    assert_eq!(c.nt_status(), 0xC000_000D);
    assert_eq!(t.state(), State::TransferFailed);
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_060_partial_completion_moves_next_start_by_k() {
    for profile in [Profile::Packet64, Profile::ScatterGather64] {
        let sim = sim(8);
        let t = Tx::create(&enabler(&sim, profile, 4096, DmaVersion::V3)).unwrap();
        t.initialize_using_offset(record, W, contiguous(&sim, 16384, 0), 0, 16384)
            .unwrap();
        let log = Log::new();
        t.execute(log.clone()).unwrap();
        assert_eq!(t.dma_completed_with_length(1000), Ok(MORE));
        let calls = log.calls();
        assert_eq!(calls[1].bytes_transferred, 1000);
        assert_eq!(
            calls[1].sg[0].address.get(),
            calls[0].sg[0].address.get() + 1000
        );
        assert_eq!(calls[1].current_length, 4096);
        let (n, status) = run_to_end(&t);
        status.unwrap();
        assert_eq!(t.bytes_transferred(), 16384);
        assert_eq!(n + 1, log.count());
        t.release().unwrap();
        assert_clean(&sim);
    }
}

#[test]
fn stmt_061_zero_length_reissues_same_bytes() {
    let sim = sim(8);
    let (t, log) = started(&sim, Profile::ScatterGather64, 8192, DmaVersion::V2);
    assert_eq!(t.dma_completed_with_length(0), Ok(MORE));
    assert_eq!(t.bytes_transferred(), 0);
    let calls = log.calls();
    assert_eq!(calls[0].sg, calls[1].sg);
    assert_eq!(run_to_end(&t), (2, Ok(())));
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_062_with_full_length_is_dma_completed() {
    let sim = sim(8);
    let (a, la) = started(&sim, Profile::ScatterGather64, 10_000, DmaVersion::V2);
    let (b, lb) = started(&sim, Profile::ScatterGather64, 10_000, DmaVersion::V2);
    run_to_end(&a).1.unwrap();
    loop {
        match b
            .dma_completed_with_length(b.current_transfer_length())
            .unwrap()
        {
            Completion::Finished(s) => break s.unwrap(),
            Completion::MoreProcessingRequired => {}
        }
    }
    let lens = |l: &Log| {
        l.calls()
            .iter()
            .map(|c| c.current_length)
            .collect::<Vec<_>>()
    };
    assert_eq!(lens(&la), lens(&lb));
    a.release().unwrap();
    b.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_063_final_finishes_with_partial_total() {
    let sim = sim(8);
    let (t, log) = started(&sim, Profile::Packet64, 12288, DmaVersion::V2);
    assert_eq!(t.dma_completed(), Ok(MORE));
    assert_eq!(t.dma_completed_final(100), Ok(Completion::Finished(Ok(()))));
    assert_eq!(t.bytes_transferred(), 4196);
    assert_eq!(log.count(), 2, "no further program-DMA");
    assert_eq!(t.state(), State::TransferCompleted);
    t.release().unwrap();
    assert_clean(&sim);
}

fn single(sim: &dmatx_sim::SimPlatform) -> Arc<Tx> {
    let t = Tx::create(&enabler(
        sim,
        Profile::ScatterGather64,
        1 << 16,
        DmaVersion::V3,
    ))
    .unwrap();
    t.set_single_transfer_requirement(true).unwrap();
    t.initialize_using_offset(record, W, buffer(sim, 16384, 0), 0, 16384)
        .unwrap();
    t.execute(Log::new()).unwrap();
    t
}

#[test]
fn stmt_064_single_transfer_partial_is_too_many_transfers() {
    let sim = sim(8);
    let t = single(&sim);
    assert_eq!(
        t.dma_completed_with_length(100),
        Ok(Completion::Finished(Err(Error::WdfTooManyTransfers)))
    );
    assert_eq!(t.state(), State::TransferFailed);
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_065_single_transfer_short_final_is_too_many_transfers() {
    let sim = sim(8);
    let t = single(&sim);
    assert_eq!(
        t.dma_completed_final(100),
        Ok(Completion::Finished(Err(Error::WdfTooManyTransfers)))
    );
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_066_flush_error_finishes_with_that_error() {
    let sim = sim(8);
    let (t, _) = started(&sim, Profile::Packet64, 12288, DmaVersion::V2);
    let adapter = t.enabler().adapter(W).unwrap().clone();
    adapter.fail_next_flush(Error::DeviceDataError);
    assert_eq!(
        t.dma_completed(),
        Ok(Completion::Finished(Err(Error::DeviceDataError)))
    );
    assert_eq!(t.state(), State::TransferFailed);
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_067_staging_error_after_partials_finishes_with_it() {
    let sim = sim(4);
    let e = enabler(&sim, Profile::ScatterGather64, 8192, DmaVersion::V2);
    e.set_max_sg_elements(2).unwrap();
    let t = Tx::create(&e).unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 16384, 0), 0, 16384)
        .unwrap();
    t.execute(Log::new()).unwrap();
    // The next chunk starts 0x100 into a page: 8 KiB there spans 3 pages > 2.
    assert_eq!(
        t.dma_completed_with_length(0x100),
        Ok(Completion::Finished(Err(Error::WdfTooFragmented)))
    );
    assert_eq!(t.bytes_transferred(), 0x100);
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_068_more_processing_required_status() {
    assert_eq!(MORE.nt_status(), 0xC000_0016);
    assert!(!MORE.is_finished());
}

#[test]
fn stmt_069_after_finish_current_length_is_zero_and_bytes_kept() {
    let sim = sim(8);
    let (t, _) = started(&sim, Profile::ScatterGather64, 5000, DmaVersion::V2);
    assert_eq!(t.current_transfer_length(), 4096);
    run_to_end(&t).1.unwrap();
    assert_eq!(t.current_transfer_length(), 0);
    assert_eq!(t.bytes_transferred(), 5000);
    t.release().unwrap();
    assert_eq!(t.bytes_transferred(), 0);
    assert_clean(&sim);
}

fn inline_run(profile: Profile) {
    let sim = sim(8);
    let t = Tx::create(&enabler(&sim, profile, 4096, DmaVersion::V3)).unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 5 * 4096, 0), 0, 5 * 4096)
        .unwrap();
    let log = Log::new();
    *log.inline.lock().unwrap() = Some(Inline::Full);
    t.execute(log.clone()).unwrap();
    assert!(!*log.nested.lock().unwrap(), "program-DMA nested");
    let results = log.inline_results.lock().unwrap().clone();
    assert_eq!(results.len(), 5);
    assert!(results[..4].iter().all(|r| *r == MORE));
    assert_eq!(results[4], Completion::Finished(Ok(())));
    let here = std::thread::current().id();
    assert!(log.calls().iter().all(|c| c.thread == here));
    assert_eq!(t.bytes_transferred(), 5 * 4096);
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_070_packet_completion_inside_program_dma_does_not_nest() {
    inline_run(Profile::Packet64);
}

#[test]
fn stmt_073_sg_completion_inside_program_dma_does_not_nest_in_dmatx() {
    // KMDF nests the next EvtProgramDma here; dmatx stages it after the callback returns
    // (docs/quirks.md).
    inline_run(Profile::ScatterGather64);
}

/// Program-DMA that completes its first transfer from another thread before returning.
fn complete_elsewhere(t: &Tx, log: &Arc<Log>, d: Direction, sg: &[dmatx::SgElement]) -> bool {
    let first = log.count() == 0;
    record(t, log, d, sg);
    if first {
        // A scoped thread can borrow `t` for the call.
        let r = std::thread::scope(|s| s.spawn(|| t.dma_completed()).join().unwrap());
        log.inline_results.lock().unwrap().push(r.unwrap());
    }
    true
}

#[test]
fn stmt_071_completion_from_another_thread_runs_next_transfer_on_staging_thread() {
    for profile in [Profile::Packet64, Profile::ScatterGather64] {
        let sim = sim(8);
        let t = Tx::create(&enabler(&sim, profile, 4096, DmaVersion::V3)).unwrap();
        t.initialize_using_offset(complete_elsewhere, R, buffer(&sim, 8192, 0), 0, 8192)
            .unwrap();
        let log = Log::new();
        t.execute(log.clone()).unwrap();
        assert_eq!(log.inline_results.lock().unwrap()[0], MORE);
        let calls = log.calls();
        assert_eq!(calls.len(), 2, "{profile:?}");
        let here = std::thread::current().id();
        assert!(
            calls.iter().all(|c| c.thread == here),
            "next transfer ran on the staging thread"
        );
        assert!(!*log.nested.lock().unwrap());
        assert_eq!(t.dma_completed(), Ok(Completion::Finished(Ok(()))));
        t.release().unwrap();
        assert_clean(&sim);
    }
}

#[test]
fn stmt_072_delete_from_inside_program_dma_after_finish() {
    for profile in [
        Profile::Packet64,
        Profile::ScatterGather64,
        Profile::ScatterGather64Duplex,
    ] {
        let sim = sim(8);
        let t = Tx::create(&enabler(&sim, profile, 4096, DmaVersion::V3)).unwrap();
        t.initialize_using_offset(record, W, buffer(&sim, 8192, 0), 0, 8192)
            .unwrap();
        let log = Log::new();
        *log.inline.lock().unwrap() = Some(Inline::Full);
        let weak = Arc::downgrade(&t);
        *log.keep.lock().unwrap() = Some(t);
        // Execute through a temporary handle; the log holds the only lasting one, which the
        // callback releases and drops after finishing the transaction inline.
        weak.upgrade().unwrap().execute(log.clone()).unwrap();
        assert!(
            log.keep.lock().unwrap().is_none(),
            "the callback dropped its handle"
        );
        assert!(
            weak.upgrade().is_none(),
            "{profile:?}: deleted once the last call returned"
        );
        assert_eq!(log.count(), 2);
        assert_clean(&sim);
    }
}

#[test]
fn completion_while_the_start_is_queued_is_misuse() {
    // In Transfer but nothing mapped yet: the registers are still queued.
    let sim = sim(4);
    let e = enabler(&sim, Profile::ScatterGather64, 1 << 20, DmaVersion::V3);
    let adapter = e.adapter(W).unwrap().clone();
    let t = Tx::create(&e).unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 8192, 0), 0, 8192)
        .unwrap();
    adapter.exhaust(4);
    let log = Log::new();
    t.execute(log.clone()).unwrap();
    let m = *t.dma_completed().unwrap_err().misuse().unwrap();
    assert_eq!((m.call, m.state), (Call::DmaCompleted, State::Transfer));
    adapter.restore();
    assert_eq!(log.count(), 1, "the queued start still runs");
    assert_eq!(t.dma_completed(), Ok(Completion::Finished(Ok(()))));
    t.release().unwrap();
    assert_clean(&sim);
}
