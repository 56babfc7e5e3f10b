//! Model checks of the staging/completion race rules (spec §3.5) with loom.
//!
//! Run with `cargo xtask loom` (or `RUSTFLAGS="--cfg loom" cargo test -p dmatx --release --test
//! loom`). Without `--cfg loom` the same scenarios run once each as ordinary threaded tests.
//!
//! Each model checks, over every interleaving loom explores: program-DMA never nests; it is
//! called once per transfer; exactly one completion reports the transaction finished, with all
//! bytes; map registers and mappings all come back.

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
    let device = DmaDevice::new(platform.clone());
    let enabler = Enabler::create(&device, EnablerConfig::new(profile, 1 << 20)).unwrap();
    let t = Tx::create(&enabler).unwrap();
    t.initialize_using_offset(
        program,
        Direction::WriteToDevice,
        MockBuffer::new(8192),
        0,
        8192,
    )
    .unwrap();
    (platform, t, Arc::new(Probe::default()))
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
