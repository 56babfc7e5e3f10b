//! Verifier mode: misuse panics with a diagnostic naming the call and the state, after the
//! object's locks are dropped, so the object stays usable and unchanged.

mod common;

use common::{Log, Tx, assert_clean, buffer, record, run_to_end, sim};
use dmatx::{Direction, DmaDevice, DmaVersion, Enabler, EnablerConfig, Profile, State};
use std::panic::{AssertUnwindSafe, catch_unwind};

fn panic_text(f: impl FnOnce()) -> String {
    let payload = catch_unwind(AssertUnwindSafe(f)).expect_err("verifier mode must panic");
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[test]
fn verifier_panics_on_misuse_and_leaves_the_object_usable() {
    let sim = sim(8);
    let config = EnablerConfig::new(Profile::ScatterGather64, 4096)
        .with_version(DmaVersion::V3)
        .with_verifier(true);
    let e = Enabler::create(&DmaDevice::new(sim.clone()), config).unwrap();
    assert!(e.verifier());
    let t = Tx::create(&e).unwrap();

    let text = panic_text(|| {
        let _ = t.execute(Log::new());
    });
    assert!(
        text.contains("Execute") && text.contains("Created"),
        "{text}"
    );
    assert_eq!(t.state(), State::Created);

    let text = panic_text(|| {
        let _ = t.dma_completed();
    });
    assert!(
        text.contains("DmaCompleted") && text.contains("Created"),
        "{text}"
    );

    let text = panic_text(|| {
        let _ = t.cancel();
    });
    assert!(text.contains("Cancel"), "{text}");

    // The object still works.
    t.initialize_using_offset(
        record,
        Direction::WriteToDevice,
        buffer(&sim, 9000, 0),
        0,
        9000,
    )
    .unwrap();
    let text = panic_text(|| {
        let again =
            t.initialize_using_offset(record, Direction::WriteToDevice, buffer(&sim, 10, 0), 0, 10);
        drop(again);
    });
    assert!(
        text.contains("Initialize") && text.contains("Initialized"),
        "{text}"
    );
    t.execute(Log::new()).unwrap();
    let text = panic_text(|| {
        let _ = t.release();
    });
    assert!(
        text.contains("Release") && text.contains("Transfer"),
        "{text}"
    );
    run_to_end(&t).1.unwrap();
    t.release().unwrap();
    assert_clean(&sim);
}

#[test]
fn ordinary_errors_do_not_panic_in_verifier_mode() {
    let sim = sim(8);
    let config = EnablerConfig::new(Profile::ScatterGather64, 4096).with_verifier(true);
    let e = Enabler::create(&DmaDevice::new(sim.clone()), config).unwrap();
    let t = Tx::create(&e).unwrap();
    let r = t.initialize_using_offset(record, Direction::WriteToDevice, buffer(&sim, 10, 0), 0, 0);
    assert_eq!(r.unwrap_err().error, dmatx::Error::InvalidParameter);
    assert_clean(&sim);
}

/// Program-DMA that misuses the transaction (release during a transfer) on the transfer whose
/// number the log's tag names, after optionally completing it inline.
fn misbehave(t: &Tx, log: &std::sync::Arc<Log>, d: Direction, sg: &[dmatx::SgElement]) -> bool {
    let n = log.count() as u32;
    record(t, log, d, sg);
    if n == log.tag {
        let _ = t.release(); // misuse: panics in verifier mode
    }
    true
}

#[test]
fn a_panic_inside_program_dma_leaves_the_transaction_usable() {
    let sim = sim(8);
    let config = EnablerConfig::new(Profile::ScatterGather64, 4096)
        .with_version(DmaVersion::V3)
        .with_verifier(true);
    let e = Enabler::create(&DmaDevice::new(sim.clone()), config).unwrap();
    let t = Tx::create(&e).unwrap();

    // The panic comes before the transfer is completed: it stays programmed, and the driver
    // can complete it and go on.
    t.initialize_using_offset(
        misbehave,
        Direction::WriteToDevice,
        buffer(&sim, 12288, 0),
        0,
        12288,
    )
    .unwrap();
    let log = Log::tagged(0);
    let text = panic_text(|| {
        let _ = t.execute(log.clone());
    });
    assert!(text.contains("Release"), "{text}");
    assert_eq!(t.state(), State::Transfer);
    run_to_end(&t).1.unwrap();
    assert_eq!(log.count(), 3, "the later transfers were programmed");
    assert_eq!(t.bytes_transferred(), 12288);
    t.release().unwrap();

    // The panic comes after an inline completion prepared the next transfer: that transfer can
    // no longer be staged, so the transaction fails and can be released.
    t.initialize_using_offset(
        misbehave,
        Direction::WriteToDevice,
        buffer(&sim, 12288, 0),
        0,
        12288,
    )
    .unwrap();
    let log = Log::tagged(0);
    *log.inline.lock().unwrap() = Some(common::Inline::Full);
    let _ = panic_text(|| {
        let _ = t.execute(log.clone());
    });
    assert_eq!(t.state(), State::TransferFailed);
    assert_eq!(t.bytes_transferred(), 4096);
    t.release().unwrap().expect("the buffer comes back");
    assert_clean(&sim);
}
