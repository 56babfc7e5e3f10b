//! Cancel of a queued start (spec §2.5, §3.6; statements 81–84 at the transaction level; the
//! request-bound cancel pattern comes with the runtime).

mod common;

use common::{Log, Tx, assert_clean, buffer, enabler, record, run_to_end, sim};
use dmatx::{Call, Completion, Direction, DmaVersion, Profile, State};

const W: Direction = Direction::WriteToDevice;

#[test]
fn stmt_081_cancel_before_execute_returns_false() {
    let sim = sim(4);
    let t = Tx::create(&enabler(
        &sim,
        Profile::ScatterGather64,
        1 << 20,
        DmaVersion::V3,
    ))
    .unwrap();
    t.initialize_using_offset(record, W, buffer(&sim, 4096, 0), 0, 4096)
        .unwrap();
    assert_eq!(t.cancel(), Ok(false));
    assert_eq!(t.state(), State::Initialized);
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_082_cancel_while_queued_fails_the_transaction_without_program_dma() {
    for profile in [Profile::Packet64, Profile::ScatterGather64] {
        let sim = sim(4);
        let e = enabler(&sim, profile, 1 << 20, DmaVersion::V3);
        let adapter = e.adapter(W).unwrap().clone();
        let t = Tx::create(&e).unwrap();
        t.initialize_using_offset(record, W, buffer(&sim, 8192, 0), 0, 8192)
            .unwrap();
        adapter.exhaust(4);
        let log = Log::new();
        t.execute(log.clone()).unwrap();
        assert_eq!(adapter.queued(), 1);
        assert_eq!(t.cancel(), Ok(true));
        assert_eq!(t.state(), State::TransferFailed);
        assert_eq!(adapter.queued(), 0);
        adapter.restore();
        assert_eq!(log.count(), 0, "program-DMA never runs");
        assert_eq!(t.cancel(), Ok(false), "nothing queued any more");
        t.release().unwrap();
        drop(t);
        assert_eq!(
            std::sync::Arc::strong_count(&log),
            1,
            "the context was dropped"
        );
        assert_clean(&sim);
    }
}

#[test]
fn stmt_083_cancel_after_program_dma_returns_false() {
    let sim = sim(4);
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
    assert_eq!(t.cancel(), Ok(false));
    assert_eq!(t.state(), State::Transfer);
    run_to_end(&t).1.unwrap();
    assert_eq!(t.cancel(), Ok(false), "after finishing too");
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn stmt_084_cancel_on_v2_is_false_and_on_v3_created_or_released_is_misuse() {
    let sim = sim(4);
    let v2 = Tx::create(&enabler(&sim, Profile::Packet64, 4096, DmaVersion::V2)).unwrap();
    assert_eq!(v2.cancel(), Ok(false));
    let v3 = Tx::create(&enabler(&sim, Profile::Packet64, 4096, DmaVersion::V3)).unwrap();
    let m = *v3.cancel().unwrap_err().misuse().unwrap();
    assert_eq!((m.call, m.state), (Call::Cancel, State::Created));
    v3.release().unwrap();
    let m = *v3.cancel().unwrap_err().misuse().unwrap();
    assert_eq!(m.state, State::Released);
    assert_clean(&sim);
}

#[test]
fn cancelling_the_head_of_the_queue_lets_the_next_request_run() {
    let sim = sim(4);
    let e = enabler(&sim, Profile::ScatterGather64, 1 << 20, DmaVersion::V3);
    let adapter = e.adapter(W).unwrap().clone();
    adapter.exhaust(3); // one register free
    let (a, b) = (Tx::create(&e).unwrap(), Tx::create(&e).unwrap());
    a.initialize_using_offset(record, W, buffer(&sim, 12288, 0), 0, 12288)
        .unwrap();
    b.initialize_using_offset(record, W, buffer(&sim, 4096, 0), 0, 4096)
        .unwrap();
    let (la, lb) = (Log::new(), Log::new());
    a.execute(la.clone()).unwrap(); // needs 3: queued
    b.execute(lb.clone()).unwrap(); // needs 1, but queues behind a (FIFO)
    assert_eq!((la.count(), lb.count()), (0, 0));
    assert_eq!(a.cancel(), Ok(true));
    assert_eq!(lb.count(), 1, "b was granted when a left the queue");
    assert_eq!(b.dma_completed(), Ok(Completion::Finished(Ok(()))));
    adapter.restore();
    a.release().unwrap();
    b.release().unwrap();
    assert_clean(&sim);
}
