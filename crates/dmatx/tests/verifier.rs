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
