//! The seed's cancel technique end to end (spec §3.6; statements 81–84 through a request): the
//! handler marks the request cancelable and executes; the cancel callback calls the
//! transaction's cancel; program-DMA unmarks and, if the request was cancelled, completes
//! final. The cancel lands at every point: before delivery, while the start is queued for map
//! registers, inside program-DMA, between transfers, and racing the last completion. Every
//! request completes exactly once with the right status and byte count, and the platform ends
//! clean.

mod sample;

use dmatx::{Direction, Error, Profile};
use dmatx_runtime::Completed;
use dmatx_sim::{CompletionMode, SimBuffer};
use sample::{Sample, Setup};
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn done(handle: &dmatx_runtime::RequestHandle<SimBuffer>) -> Completed {
    let c = handle.wait_timeout(WAIT).expect("the request completes");
    assert_eq!(handle.refused_completions(), 0, "completed exactly once");
    c
}

fn storage(s: &Sample, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    s.driver().hw.read_storage(offset, &mut out).unwrap();
    out
}

#[test]
fn cancel_before_delivery_completes_without_the_driver() {
    let s = Sample::new(Setup::default());
    s.device.power_down().unwrap();
    let h = s.write_at(0, &pattern(8192, 1));
    assert!(h.try_completed().is_none(), "held while powered down");
    assert_eq!(h.cancel(), Ok(true));
    let c = done(&h);
    assert_eq!((c.status, c.information), (Err(Error::Cancelled), 0));
    assert_eq!(s.count(|c| &c.transfers), 0);
    s.device.power_up().unwrap();
    s.shut_down();
}

#[test]
fn cancel_while_the_start_is_queued_withdraws_it() {
    for profile in [Profile::Packet64, Profile::ScatterGather64] {
        let s = Sample::new(Setup {
            profile,
            ..Setup::default()
        });
        let adapter = s
            .driver()
            .enabler
            .adapter(Direction::WriteToDevice)
            .unwrap()
            .clone();
        adapter.exhaust(u32::MAX);
        let h = s.write_at(4096, &pattern(20_000, 2));
        assert_eq!(adapter.queued(), 1, "the start waits for map registers");
        assert_eq!(h.cancel(), Ok(true));
        let c = done(&h);
        assert_eq!((c.status, c.information), (Err(Error::Cancelled), 0));
        assert_eq!(s.count(|c| &c.cancelled_while_queued), 1);
        assert_eq!(s.count(|c| &c.transfers), 0);
        assert_eq!(adapter.queued(), 0);
        adapter.restore();
        s.shut_down();
    }
}

/// Handles by request id, for the program-DMA hook to cancel.
static HANDLES: LazyLock<Mutex<HashMap<u64, dmatx_runtime::RequestHandle<SimBuffer>>>> =
    LazyLock::new(Mutex::default);

fn cancel_from_inside(id: u64) {
    let handle = HANDLES.lock().unwrap().remove(&id);
    if let Some(h) = handle {
        // The cancel callback runs here, inside program-DMA, and finds nothing to withdraw.
        assert_eq!(h.cancel(), Ok(true));
        HANDLES.lock().unwrap().insert(id, h);
    }
}

#[test]
fn cancel_during_program_dma_is_finished_by_program_dma() {
    let s = Sample::new(Setup::default());
    let adapter = s
        .driver()
        .enabler
        .adapter(Direction::WriteToDevice)
        .unwrap()
        .clone();
    adapter.exhaust(u32::MAX);
    let h = s.write_at(0, &pattern(40_000, 3));
    let id = h.id();
    HANDLES.lock().unwrap().insert(id, h);
    *sample::PROGRAM_HOOK.lock().unwrap() = Some(cancel_from_inside);
    // The grant runs program-DMA on this thread; the hook cancels the request inside it.
    adapter.restore();
    *sample::PROGRAM_HOOK.lock().unwrap() = None;
    let h = HANDLES.lock().unwrap().remove(&id).unwrap();
    let c = done(&h);
    assert_eq!((c.status, c.information), (Err(Error::Cancelled), 0));
    assert_eq!(s.count(|c| &c.cancelled_in_program_dma), 1);
    assert_eq!(s.count(|c| &c.transfers), 0, "the device never started");
    s.shut_down();
}

#[test]
fn cancel_after_some_transfers_keeps_the_bytes_moved() {
    // F = 16 KiB: a 64 KiB write is four transfers; the device completes one at a time.
    let s = Sample::new(Setup::default());
    let data = pattern(65_536, 4);
    let h = s.write_at(8192, &data);
    for _ in 0..2 {
        assert!(s.driver().hw.step());
        s.wait_dpcs();
    }
    assert!(h.try_completed().is_none());
    // Past the first program-DMA the request is no longer cancelable: the cancel is recorded
    // and the DPC finishes the transaction after the transfer in flight.
    assert_eq!(h.cancel(), Ok(true));
    s.run_device();
    let c = done(&h);
    assert_eq!(c.status, Err(Error::Cancelled));
    assert_eq!(
        c.information,
        3 * 16_384,
        "the transfer in flight still counts"
    );
    assert_eq!(storage(&s, 8192, 3 * 16_384), data[..3 * 16_384]);
    assert_eq!(s.count(|c| &c.cancelled_between_transfers), 1);
    assert_eq!(s.count(|c| &c.transfers), 3);
    s.shut_down();
}

#[test]
fn cancel_racing_the_last_completion_completes_once() {
    let s = Sample::new(Setup {
        mode: CompletionMode::Manual,
        ..Setup::default()
    });
    let mut outcomes = [0_u32; 2];
    for round in 0..200_u64 {
        let data = pattern(20_000, round as u8);
        let offset = (round % 16) * 32_768;
        let h = s.write_at(offset, &data);
        // First transfer done; the second (last) one is in the device.
        assert!(s.driver().hw.step());
        s.wait_dpcs();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                s.run_device();
            });
            scope.spawn(|| {
                let cancelled = h.cancel();
                assert!(
                    cancelled == Ok(true) || cancelled == Err(Error::InvalidDeviceState),
                    "{cancelled:?}"
                );
            });
        });
        s.wait_dpcs();
        let c = done(&h);
        assert_eq!(
            c.information, 20_000,
            "the last transfer had moved its bytes"
        );
        assert_eq!(storage(&s, offset, 20_000), data);
        match c.status {
            Ok(()) => outcomes[0] += 1,
            Err(Error::Cancelled) => outcomes[1] += 1,
            other => panic!("{other:?}"),
        }
    }
    eprintln!(
        "last-completion race: {} ok, {} cancelled",
        outcomes[0], outcomes[1]
    );
    assert_eq!(s.in_flight(), 0);
    s.shut_down();
}

#[test]
fn cancel_of_a_read_before_it_reaches_the_device_leaves_the_buffer_untouched() {
    let s = Sample::new(Setup::default());
    let adapter = s
        .driver()
        .enabler
        .adapter(Direction::ReadFromDevice)
        .unwrap()
        .clone();
    adapter.exhaust(u32::MAX);
    let h = s.read_at(0, 10_000);
    assert_eq!(h.cancel(), Ok(true));
    let c = done(&h);
    assert_eq!((c.status, c.information), (Err(Error::Cancelled), 0));
    assert!(h.output().unwrap().to_vec().iter().all(|&b| b == 0xEE));
    adapter.restore();
    s.shut_down();
}

/// Two gates for the before-execute hook: the handler reached it; the test let it go on.
static AT_EXECUTE: LazyLock<(Mutex<(bool, bool)>, std::sync::Condvar)> =
    LazyLock::new(Default::default);

/// The request the hook pauses (other tests' requests pass through).
static PAUSE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(u64::MAX);

fn pause_before_execute(id: u64) {
    if id != PAUSE_ID.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let (lock, cv) = &*AT_EXECUTE;
    let mut st = lock.lock().unwrap();
    st.0 = true;
    cv.notify_all();
    let _st = cv.wait_while(st, |st| !st.1).unwrap();
}

#[test]
fn cancel_after_marking_but_before_execute_is_finished_by_program_dma() {
    // The request is delivered on the thread that powers the device up (the queue held it),
    // so the issuer already has its handle and can cancel while the handler sits between
    // mark-cancelable and execute. The cancel callback finds nothing queued; program-DMA then
    // finds the request unmarkable and finishes with nothing transferred.
    let s = Sample::new(Setup::default());
    s.device.power_down().unwrap();
    let h = s.write_at(0, &pattern(30_000, 5));
    PAUSE_ID.store(h.id(), std::sync::atomic::Ordering::SeqCst);
    *sample::EXECUTE_HOOK.lock().unwrap() = Some(pause_before_execute);
    std::thread::scope(|scope| {
        scope.spawn(|| s.device.power_up().unwrap());
        let (lock, cv) = &*AT_EXECUTE;
        let st = cv.wait_while(lock.lock().unwrap(), |st| !st.0).unwrap();
        drop(st);
        assert_eq!(h.cancel(), Ok(true), "the cancel callback ran");
        assert!(
            h.try_completed().is_none(),
            "nothing to withdraw: not completed yet"
        );
        lock.lock().unwrap().1 = true;
        cv.notify_all();
    });
    let c = done(&h);
    assert_eq!((c.status, c.information), (Err(Error::Cancelled), 0));
    assert_eq!(s.count(|c| &c.cancelled_in_program_dma), 1);
    assert_eq!(s.count(|c| &c.transfers), 0, "the device never started");
    s.shut_down();
}
