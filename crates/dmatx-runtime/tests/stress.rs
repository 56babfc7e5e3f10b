//! Stress: threads issue write and read requests at random sizes and offsets against a device
//! with deferred completion and random partial transfers, cancelling some of them at random
//! moments (at once, after a while, or never) while too few map registers make starts queue.
//! Every request completes exactly once; every byte the device reported moving is the right
//! byte; the pools are full and the sanitizer's record empty at the end.
//!
//! Bounded for `cargo xtask test` (`DMATX_STRESS_REQUESTS`, default 2 000); `cargo xtask stress`
//! runs it long.

mod sample;

use dmatx::{Error, Profile};
use dmatx_sim::CompletionMode;
use sample::{Sample, Setup};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

fn requests() -> u64 {
    std::env::var("DMATX_STRESS_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

fn stress(profile: Profile, seed: u64) {
    let s = Sample::new(Setup {
        profile,
        maximum_length: 8192,
        // Few registers: starts queue behind each other, so cancels find queued ones.
        map_registers: 6,
        mode: CompletionMode::Deferred { latency_ns: 1_000 },
        partial_rate: 0.25,
        seed,
        storage_bytes: 1 << 20,
        ..Setup::default()
    });
    let threads = 4_u64;
    let per_thread = requests() / threads;
    let region = (s.driver().hw.storage_len() as u64) / threads;
    let running = AtomicBool::new(true);
    let cancelled = AtomicU64::new(0);
    let completed_ok = AtomicU64::new(0);
    std::thread::scope(|scope| {
        // The device's clock: completes transfers as virtual time passes.
        scope.spawn(|| {
            while running.load(Ordering::Acquire) {
                s.driver().hw.advance(500);
                std::thread::yield_now();
            }
        });
        let issuers: Vec<_> = (0..threads)
            .map(|thread| {
                let (s, cancelled, completed_ok) = (&s, &cancelled, &completed_ok);
                scope.spawn(move || {
                    let base = thread * region;
                    // What this thread's storage region holds, as far as it knows.
                    let mut shadow = vec![0_u8; region as usize];
                    let mut x = seed ^ (thread + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    let mut next = move || {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x
                    };
                    for i in 0..per_thread {
                        let len = 1 + next() % 20_000;
                        let at = next() % (region - len);
                        let write = next() % 2 == 0;
                        let data: Vec<u8> = (0..len).map(|k| (k ^ i ^ thread << 5) as u8).collect();
                        let h = if write {
                            s.write_at(base + at, &data)
                        } else {
                            s.read_at(base + at, len)
                        };
                        match next() % 4 {
                            0 => {
                                let _ = h.cancel();
                            }
                            1 => {
                                for _ in 0..next() % 50 {
                                    std::thread::yield_now();
                                }
                                let _ = h.cancel();
                            }
                            _ => {}
                        }
                        let c = h
                            .wait_timeout(Duration::from_secs(20))
                            .expect("every request completes");
                        assert_eq!(h.refused_completions(), 0, "completed exactly once");
                        assert!(c.information <= len);
                        match c.status {
                            Ok(()) => {
                                assert_eq!(c.information, len, "a successful request moved all");
                                completed_ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(Error::Cancelled) => {
                                cancelled.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => panic!("request {i}: {e}"),
                        }
                        let moved = c.information as usize;
                        let at = at as usize;
                        if write {
                            shadow[at..at + moved].copy_from_slice(&data[..moved]);
                            let mut stored = vec![0; moved];
                            s.driver()
                                .hw
                                .read_storage(base + at as u64, &mut stored)
                                .unwrap();
                            assert!(stored == data[..moved], "written bytes intact");
                        } else {
                            let got = h.output().unwrap().to_vec();
                            assert!(got[..moved] == shadow[at..at + moved], "read bytes intact");
                            assert!(got[moved..].iter().all(|&b| b == 0xEE), "nothing past them");
                        }
                    }
                })
            })
            .collect();
        for issuer in issuers {
            issuer.join().unwrap();
        }
        running.store(false, Ordering::Release);
    });
    eprintln!(
        "{profile:?}: {} ok, {} cancelled ({} while queued, {} in program-DMA, {} between \
         transfers); {} transfers, {} partial",
        completed_ok.load(Ordering::Relaxed),
        cancelled.load(Ordering::Relaxed),
        s.count(|c| &c.cancelled_while_queued),
        s.count(|c| &c.cancelled_in_program_dma),
        s.count(|c| &c.cancelled_between_transfers),
        s.count(|c| &c.transfers),
        s.count(|c| &c.partials),
    );
    let total = cancelled.load(Ordering::Relaxed) + completed_ok.load(Ordering::Relaxed);
    assert_eq!(total, per_thread * threads);
    assert!(s.count(|c| &c.partials) > 0, "partial transfers happened");
    assert_eq!(s.in_flight(), 0);
    s.shut_down();
}

#[test]
fn stress_scatter_gather() {
    stress(Profile::ScatterGather64, 11);
}

#[test]
fn stress_packet() {
    stress(Profile::Packet64, 12);
}
