//! Model checks of the staging/completion race rules (spec §3.5) with loom.
//!
//! Run with `cargo xtask loom` (or `RUSTFLAGS="--cfg loom" cargo test -p dmatx --release --test
//! loom`). Without `--cfg loom` the same scenarios run once each as ordinary threaded tests.
//!
//! Each model checks, over every interleaving loom explores: program-DMA never nests; it is
//! called once per transfer; exactly one completion reports the transaction finished, with all
//! bytes; map registers and mappings all come back. The cancel models (spec §3.6) check that a
//! cancel racing the grant of a queued start, or racing completions, either withdraws the start
//! (program-DMA never runs for it) or finds nothing to withdraw — never both, never neither.

mod common;

use common::mock::{MockBuffer, MockPlatform};
use dmatx::{
    Completion, Direction, DmaDevice, Enabler, EnablerConfig, Profile, SgElement, State,
    Transaction,
};
use std::sync::Arc;

#[cfg(loom)]
use loom::{
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    thread,
};
#[cfg(not(loom))]
use std::{
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    thread,
};

#[cfg(loom)]
fn model(f: impl Fn() + Sync + Send + 'static) {
    loom::model(f);
}
#[cfg(not(loom))]
fn model(f: impl Fn() + Sync + Send + 'static) {
    f();
}

/// What the program-DMA callback observes.
#[derive(Default)]
struct Probe {
    inside: AtomicBool,
    programmed: AtomicU32,
    /// Complete from inside the callback instead of leaving it to another thread.
    complete_inline: AtomicBool,
    finished: AtomicU32,
}

type Tx = Transaction<MockPlatform, Arc<Probe>, MockBuffer>;

fn program(t: &Tx, probe: &Arc<Probe>, _: Direction, sg: &[SgElement]) -> bool {
    assert!(
        !probe.inside.swap(true, Ordering::SeqCst),
        "program-DMA nested"
    );
    assert_eq!(sg.len(), 1);
    probe.programmed.fetch_add(1, Ordering::SeqCst);
    if probe.complete_inline.load(Ordering::SeqCst) {
        match t.dma_completed().expect("completion inside program-DMA") {
            Completion::Finished(status) => {
                status.expect("transaction succeeds");
                probe.finished.fetch_add(1, Ordering::SeqCst);
            }
            Completion::MoreProcessingRequired => {}
        }
    }
    probe.inside.store(false, Ordering::SeqCst);
    true
}

/// Two transfers of 4 KiB (N = 2 registers → F = 4 KiB).
fn setup(profile: Profile) -> (MockPlatform, Arc<Tx>, Arc<Probe>) {
    let platform = MockPlatform::new(2);
    let t = transaction_on(&platform, EnablerConfig::new(profile, 1 << 20), 8192);
    (platform, t, Arc::new(Probe::default()))
}

/// A transaction of `length` bytes, initialized, on a new enabler of `platform`.
fn transaction_on(platform: &MockPlatform, config: EnablerConfig, length: u64) -> Arc<Tx> {
    let device = DmaDevice::new(platform.clone());
    let enabler = Enabler::create(&device, config).unwrap();
    let t = Tx::create(&enabler).unwrap();
    t.initialize_using_offset(
        program,
        Direction::WriteToDevice,
        MockBuffer::new(length),
        0,
        length,
    )
    .unwrap();
    t
}

/// The device completes each transfer from another thread, possibly while program-DMA for that
/// transfer is still running (statement 71).
fn completion_from_another_thread(profile: Profile) {
    model(move || {
        let (platform, t, probe) = setup(profile);
        let (t2, probe2) = (Arc::clone(&t), Arc::clone(&probe));
        let device = thread::spawn(move || {
            let mut done = 0;
            loop {
                while probe2.programmed.load(Ordering::SeqCst) <= done {
                    thread::yield_now();
                }
                done += 1;
                match t2.dma_completed().expect("completion") {
                    Completion::Finished(status) => {
                        status.expect("success");
                        probe2.finished.fetch_add(1, Ordering::SeqCst);
                        return done;
                    }
                    Completion::MoreProcessingRequired => {}
                }
            }
        });
        t.execute(Arc::clone(&probe)).unwrap();
        let transfers = device.join().unwrap();
        assert_eq!(transfers, 2);
        assert_eq!(probe.programmed.load(Ordering::SeqCst), 2);
        assert_eq!(probe.finished.load(Ordering::SeqCst), 1);
        // The staging thread may still be leaving program-DMA; wait for it to let go.
        while probe.inside.load(Ordering::SeqCst) {
            thread::yield_now();
        }
        assert_eq!(t.bytes_transferred(), 8192);
        assert_eq!(t.state(), State::TransferCompleted);
        t.release().unwrap().expect("buffer back");
        drop(t);
        platform.assert_clean();
    });
}

/// Completion inside program-DMA (statement 70; 73 as dmatx changes it): no nesting, the next
/// transfer runs after the callback returns, on the same thread. A second thread races a
/// cancel, which must find nothing queued.
fn completion_inside_program_dma(profile: Profile) {
    model(move || {
        let (platform, t, probe) = setup(profile);
        probe.complete_inline.store(true, Ordering::SeqCst);
        let t2 = Arc::clone(&t);
        let observer = thread::spawn(move || t2.bytes_transferred());
        t.execute(Arc::clone(&probe)).unwrap();
        let seen = observer.join().unwrap();
        assert!(seen == 0 || seen == 4096 || seen == 8192);
        assert_eq!(probe.programmed.load(Ordering::SeqCst), 2);
        assert_eq!(probe.finished.load(Ordering::SeqCst), 1);
        assert_eq!(t.bytes_transferred(), 8192);
        t.release().unwrap().expect("buffer back");
        drop(t);
        platform.assert_clean();
    });
}

#[test]
fn packet_completion_from_another_thread() {
    completion_from_another_thread(Profile::Packet64);
}

#[test]
fn sg_completion_from_another_thread() {
    completion_from_another_thread(Profile::ScatterGather64);
}

#[test]
fn packet_completion_inside_program_dma() {
    completion_inside_program_dma(Profile::Packet64);
}

#[test]
fn sg_completion_inside_program_dma() {
    completion_inside_program_dma(Profile::ScatterGather64);
}

/// A transaction of `length` bytes on an enabler of `profile` over a queueing platform with
/// `registers` map registers.
fn queueing_setup(profile: Profile, registers: u32, length: u64) -> (MockPlatform, Arc<Tx>) {
    let platform = MockPlatform::queueing(registers);
    let config = EnablerConfig::new(profile, 1 << 20).with_version(dmatx::DmaVersion::V3);
    let t = transaction_on(&platform, config, length);
    (platform, t)
}

/// Cancel vs execute: the start is queued behind registers another device holds; one thread
/// cancels while another returns those registers, which grants the start and runs program-DMA
/// on that thread. Either the cancel wins (TRUE, no program-DMA, TransferFailed) or the grant
/// does (FALSE, program-DMA once, the transaction completes normally).
fn cancel_races_the_grant(profile: Profile) {
    // How often each side won, over all explored interleavings (std atomics: outside the model).
    let outcomes = Arc::new([
        std::sync::atomic::AtomicUsize::new(0),
        std::sync::atomic::AtomicUsize::new(0),
    ]);
    let seen = Arc::clone(&outcomes);
    model(move || {
        let (platform, t) = queueing_setup(profile, 2, 4096);
        let probe = Arc::new(Probe::default());
        let hostage = platform.hold(2);
        t.execute(Arc::clone(&probe)).unwrap();
        assert_eq!(platform.queued(), 1);
        let other = platform.clone();
        let freer = thread::spawn(move || other.give_back(hostage));
        let cancelled = t.cancel().unwrap();
        freer.join().unwrap();
        seen[usize::from(cancelled)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let programmed = probe.programmed.load(Ordering::SeqCst);
        if cancelled {
            assert_eq!(programmed, 0, "a withdrawn start never programs");
            assert_eq!(t.state(), State::TransferFailed);
        } else {
            assert_eq!(programmed, 1, "the granted start programmed once");
            assert_eq!(t.dma_completed().unwrap(), Completion::Finished(Ok(())));
            assert_eq!(t.bytes_transferred(), 4096);
        }
        t.release().unwrap().expect("buffer back");
        drop(t);
        platform.assert_clean();
    });
    if cfg!(loom) {
        let [granted, cancelled] = &*outcomes;
        assert!(
            granted.load(std::sync::atomic::Ordering::Relaxed) > 0
                && cancelled.load(std::sync::atomic::Ordering::Relaxed) > 0,
            "loom explored both outcomes"
        );
    }
}

/// Cancel vs completion (the seed's race with the last completion): the device completes both
/// transfers from one thread while another cancels. Nothing is ever queued, so the cancel
/// finds nothing to withdraw in every interleaving, and the transaction finishes once with all
/// its bytes.
fn cancel_races_completion(profile: Profile) {
    model(move || {
        let (platform, t) = queueing_setup(profile, 2, 8192);
        let probe = Arc::new(Probe::default());
        let (t2, probe2) = (Arc::clone(&t), Arc::clone(&probe));
        let device = thread::spawn(move || {
            let mut done = 0;
            loop {
                while probe2.programmed.load(Ordering::SeqCst) <= done {
                    thread::yield_now();
                }
                done += 1;
                if let Completion::Finished(status) = t2.dma_completed().expect("completion") {
                    status.expect("success");
                    return done;
                }
            }
        });
        t.execute(Arc::clone(&probe)).unwrap();
        assert_eq!(
            t.cancel(),
            Ok(false),
            "a started transaction has nothing queued"
        );
        assert_eq!(device.join().unwrap(), 2);
        while probe.inside.load(Ordering::SeqCst) {
            thread::yield_now();
        }
        assert_eq!(t.state(), State::TransferCompleted);
        assert_eq!(t.bytes_transferred(), 8192);
        t.release().unwrap().expect("buffer back");
        drop(t);
        platform.assert_clean();
    });
}

#[test]
fn packet_cancel_races_the_grant() {
    cancel_races_the_grant(Profile::Packet64);
}

#[test]
fn sg_cancel_races_the_grant() {
    cancel_races_the_grant(Profile::ScatterGather64);
}

#[test]
fn packet_cancel_races_completion() {
    cancel_races_completion(Profile::Packet64);
}

#[test]
fn sg_cancel_races_completion() {
    cancel_races_completion(Profile::ScatterGather64);
}

/// What the system-mode model observes.
#[derive(Default)]
struct SystemProbe {
    inside: AtomicBool,
    /// Program-DMA calls that have returned.
    returned: AtomicU32,
    /// Transfer-complete callbacks run.
    done: AtomicU32,
    finished: AtomicU32,
}

type SysTx = Transaction<MockPlatform, Arc<SystemProbe>, MockBuffer>;

fn system_program(_: &SysTx, probe: &Arc<SystemProbe>, _: Direction, sg: &[SgElement]) -> bool {
    assert!(
        !probe.inside.swap(true, Ordering::SeqCst),
        "program-DMA nested"
    );
    assert!(!sg.is_empty());
    probe.inside.store(false, Ordering::SeqCst);
    probe.returned.fetch_add(1, Ordering::SeqCst);
    true
}

fn system_done(
    t: &SysTx,
    probe: &Arc<SystemProbe>,
    _: Direction,
    status: dmatx::hal::SystemDmaStatus,
) {
    assert_eq!(status, dmatx::hal::SystemDmaStatus::Complete);
    let k = probe.done.fetch_add(1, Ordering::SeqCst) + 1;
    // Statement 90: the completion of transfer k never precedes or overlaps its program-DMA.
    assert!(
        probe.returned.load(Ordering::SeqCst) >= k,
        "transfer {k} reported done before its program-DMA returned"
    );
    assert!(
        !probe.inside.load(Ordering::SeqCst),
        "done overlaps program-DMA"
    );
    if let Completion::Finished(status) = t.dma_completed().expect("completion") {
        status.expect("success");
        probe.finished.fetch_add(1, Ordering::SeqCst);
    }
}

/// System mode: a controller thread finishes each mapped transfer at any moment — possibly
/// while program-DMA for it still runs — and the transfer-complete callback reports it.
#[test]
fn system_completion_never_precedes_program_dma() {
    model(|| {
        let platform = MockPlatform::new(2);
        let device = DmaDevice::new(platform.clone());
        let config = EnablerConfig::new(Profile::System, 1 << 20);
        let enabler = Enabler::create(&device, config).unwrap();
        let descriptor = dmatx::DmaDescriptor {
            channel: 1,
            request_line: 2,
        };
        enabler
            .configure_system_profile(
                dmatx::SystemProfileConfig::new(0x1000, dmatx::hal::DmaWidth::Bits32, descriptor),
                Direction::WriteToDevice,
            )
            .unwrap();
        let t = SysTx::create(&enabler).unwrap();
        t.set_transfer_complete_callback(Some(system_done)).unwrap();
        t.initialize_using_offset(
            system_program,
            Direction::WriteToDevice,
            MockBuffer::new(8192),
            0,
            8192,
        )
        .unwrap();
        let probe = Arc::new(SystemProbe::default());
        let (p2, probe2) = (platform.clone(), Arc::clone(&probe));
        let controller = thread::spawn(move || {
            let mut finished = 0;
            while finished < 2 {
                if p2.finish_system_transfer() {
                    finished += 1;
                } else {
                    thread::yield_now();
                }
            }
            drop(probe2);
        });
        t.execute(Arc::clone(&probe)).unwrap();
        controller.join().unwrap();
        assert_eq!(probe.done.load(Ordering::SeqCst), 2);
        assert_eq!(probe.finished.load(Ordering::SeqCst), 1);
        assert_eq!(t.bytes_transferred(), 8192);
        t.release().unwrap().expect("buffer back");
        drop(t);
        platform.assert_clean();
    });
}
