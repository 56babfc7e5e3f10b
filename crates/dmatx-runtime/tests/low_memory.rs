//! Reuse under low memory (the seed "Reusing DMA Transaction Objects"): the sample driver keeps
//! a few transactions from device add, tries to create a fresh one per request, falls back to a
//! kept one when creation fails with `InsufficientResources`, and releases (not deletes) kept
//! ones for reuse. 10 000 requests with half of all creations failing all complete, with their
//! data intact — once with the simulator's knob (the platform refuses to register the
//! transaction) and once with the runtime's (the device refuses the creation).

mod sample;

use dmatx::Profile;
use dmatx_sim::CompletionMode;
use sample::{Sample, Setup};
use std::time::Duration;

/// Which knob makes creations fail.
#[derive(Clone, Copy)]
enum Knob {
    Simulator,
    Runtime,
}

#[test]
fn ten_thousand_requests_with_half_the_creations_failing_in_the_platform() {
    reuse(Profile::ScatterGather64, Knob::Simulator);
}

#[test]
fn ten_thousand_requests_with_half_the_creations_failing_in_the_runtime() {
    reuse(Profile::Packet64, Knob::Runtime);
}

fn reuse(profile: Profile, knob: Knob) {
    let s = Sample::new(Setup {
        profile,
        kept: 4,
        mode: CompletionMode::Immediate,
        storage_bytes: 4 << 20,
        // 4 KiB transfers: requests of up to 12 KiB take up to four.
        maximum_length: 4096,
        ..Setup::default()
    });
    match knob {
        Knob::Simulator => s.driver().sim.fail_creations_randomly(0.5, 0x5eed),
        Knob::Runtime => s.device.fail_allocations_randomly(0.5, 0x5eed),
    }
    let threads = 4_u64;
    let per_thread = 10_000 / threads / 2; // a write and a read-back each
    std::thread::scope(|scope| {
        for thread in 0..threads {
            let s = &s;
            scope.spawn(move || {
                let region = thread * (1 << 20);
                let mut x = thread + 1;
                for i in 0..per_thread {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let len = 1 + (x % 12_288) as usize;
                    let offset = region + (x >> 20) % (1 << 19);
                    let data: Vec<u8> = (0..len).map(|k| (k as u64 ^ x ^ i) as u8).collect();
                    let w = s.write_at(offset, &data);
                    let c = w
                        .wait_timeout(Duration::from_secs(10))
                        .expect("write completes");
                    assert_eq!((c.status, c.information), (Ok(()), len as u64));
                    let r = s.read_at(offset, len as u64);
                    let c = r
                        .wait_timeout(Duration::from_secs(10))
                        .expect("read completes");
                    assert_eq!((c.status, c.information), (Ok(()), len as u64));
                    assert!(r.output().unwrap().to_vec() == data, "data intact");
                    assert_eq!(w.refused_completions() + r.refused_completions(), 0);
                }
            });
        }
    });
    let failures = s.count(|c| &c.creation_failures);
    let created = s.count(|c| &c.created);
    assert_eq!(failures + created, 10_000, "one creation tried per request");
    assert!(
        (4_000..6_000).contains(&failures),
        "{failures} creations failed"
    );
    assert_eq!(
        s.count(|c| &c.from_pool),
        failures,
        "every failure fell back"
    );
    assert_eq!(s.kept_available(), 4, "every kept transaction came back");
    let (refused, _) = match knob {
        Knob::Simulator => s.driver().sim.creation_counts(),
        Knob::Runtime => s.device.allocation_counts(),
    };
    assert_eq!(refused, failures, "every refusal came from the knob");
    s.driver().sim.fail_creations_randomly(0.0, 0);
    s.device.fail_allocations_randomly(0.0, 0);
    s.shut_down();
}
