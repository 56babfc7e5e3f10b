//! Requests: completion, information, mark/unmark cancelable, cancellation from the issuer,
//! and the misuses WDF bug-checks on (with and without the verifier).

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::thread::ThreadId;

use common::{GUARD, assert_clean, buffer, device, sim, verified_device};
use dmatx::Error;
use dmatx_runtime::{
    Dispatch, IoctlCode, Queue, QueueConfig, Request, RequestHandle, RequestKind, RequestSpec,
    TransferMethod,
};
use dmatx_sim::{SimBuffer, SimPlatform};

#[derive(Default)]
struct Ctx {
    held: Mutex<Vec<Request<SimBuffer>>>,
}

type Q = Queue<Ctx, SimBuffer>;

fn hold(q: &Q, r: Request<SimBuffer>, _length: u64) {
    q.device().context().held.lock().unwrap().push(r);
}

fn hold_ioctl(q: &Q, r: Request<SimBuffer>, _out: u64, _in: u64, _code: IoctlCode) {
    q.device().context().held.lock().unwrap().push(r);
}

/// Cancel callback: records its thread and completes the request with Cancelled (a cancel
/// callback gets only the request, so it records into a static, keyed by request id).
static CANCEL_THREADS: Mutex<Vec<(u64, ThreadId)>> = Mutex::new(Vec::new());

fn cancel_and_complete(r: &Request<SimBuffer>) {
    CANCEL_THREADS
        .lock()
        .unwrap()
        .push((r.id(), std::thread::current().id()));
    r.complete(Err(Error::Cancelled)).unwrap();
}

/// Cancel callback that leaves the completion to later work (a DPC, say).
static DEFERRED: Mutex<Vec<Request<SimBuffer>>> = Mutex::new(Vec::new());

fn cancel_later(r: &Request<SimBuffer>) {
    DEFERRED.lock().unwrap().push(r.clone());
}

fn never_called(_: &Request<SimBuffer>) {
    panic!("this cancel callback must not run");
}

fn setup(verifier: bool) -> (SimPlatform, Q) {
    let sim = sim();
    let dev = if verifier {
        verified_device(Ctx::default())
    } else {
        device(Ctx::default())
    };
    let config = QueueConfig {
        read: Some(hold),
        device_control: Some(hold_ioctl),
        power_managed: false,
        ..QueueConfig::new(Dispatch::Parallel)
    };
    (sim.clone(), Q::create(&dev, config).unwrap())
}

fn read(sim: &SimPlatform, q: &Q) -> (RequestHandle<SimBuffer>, Request<SimBuffer>) {
    let h = q.submit(RequestSpec::read(buffer(sim, 256))).unwrap();
    let r = q.device().context().held.lock().unwrap().pop().unwrap();
    assert_eq!(r.id(), h.id());
    (h, r)
}

fn misuse_call(e: Error) -> &'static str {
    match e {
        Error::ObjectMisuse(m) => m.call,
        other => panic!("expected ObjectMisuse, got {other:?}"),
    }
}

#[test]
fn complete_with_information_reaches_the_issuer() {
    let (sim, q) = setup(false);
    let (h, r) = read(&sim, &q);
    assert_eq!(r.kind(), RequestKind::Read);
    assert_eq!((r.output_length(), r.input_length()), (256, 0));
    r.set_information(7).unwrap();
    assert_eq!(r.information(), 7);
    r.complete_with_information(Ok(()), 200).unwrap();
    assert_eq!(
        h.wait_timeout(GUARD).unwrap(),
        dmatx_runtime::Completed {
            status: Ok(()),
            information: 200
        }
    );
    assert!(r.is_completed());
    assert_eq!(h.output().unwrap().len(), 256);
    assert_eq!(h.refused_completions(), 0);
    drop((h, r, q));
    assert_clean(&sim);
}

#[test]
fn set_information_is_what_complete_reports() {
    let (sim, q) = setup(false);
    let (h, r) = read(&sim, &q);
    r.set_information(99).unwrap();
    r.complete(Err(Error::DeviceDataError)).unwrap();
    let done = h.wait();
    assert_eq!(done.status, Err(Error::DeviceDataError));
    assert_eq!(done.information, 99);
    assert!(misuse_call(r.set_information(1).unwrap_err()).contains("SetInformation"));
    drop((h, r, q));
    assert_clean(&sim);
}

#[test]
fn completing_twice_is_misuse_and_keeps_the_first_completion() {
    let (sim, q) = setup(false);
    let (h, r) = read(&sim, &q);
    r.complete_with_information(Ok(()), 5).unwrap();
    let e = r.complete(Err(Error::Unsuccessful)).unwrap_err();
    assert_eq!(misuse_call(e), "WdfRequestComplete");
    assert_eq!(h.try_completed().unwrap().status, Ok(()));
    assert_eq!(h.try_completed().unwrap().information, 5);
    assert_eq!(h.refused_completions(), 1);
    drop((h, r, q));
    assert_clean(&sim);
}

#[test]
fn completing_twice_panics_under_the_verifier_and_leaves_the_request_usable() {
    let (sim, q) = setup(true);
    let (h, r) = read(&sim, &q);
    r.complete(Ok(())).unwrap();
    let text = panic_text(|| {
        let _ = r.complete(Ok(()));
    });
    assert!(text.contains("WdfRequestComplete"), "{text}");
    // No lock was poisoned or left held: the request still answers.
    assert!(r.is_completed());
    assert_eq!(h.try_completed().unwrap().status, Ok(()));
    assert_eq!(h.refused_completions(), 1);
    drop((h, r, q));
    assert_clean(&sim);
}

fn panic_text(f: impl FnOnce()) -> String {
    let panic = catch_unwind(AssertUnwindSafe(f)).expect_err("the verifier panics");
    panic.downcast_ref::<String>().cloned().unwrap_or_default()
}

#[test]
fn unmarking_a_request_never_marked_panics_under_the_verifier() {
    let (sim, q) = setup(true);
    let (h, r) = read(&sim, &q);
    let text = panic_text(|| {
        let _ = r.unmark_cancelable();
    });
    assert!(text.contains("WdfRequestUnmarkCancelable"), "{text}");
    r.complete(Ok(())).unwrap();
    assert_eq!(h.wait().status, Ok(()));
    drop((h, r, q));
    assert_clean(&sim);
}

#[test]
fn unmarking_a_request_never_marked_is_misuse() {
    let (sim, q) = setup(false);
    let (h, r) = read(&sim, &q);
    assert_eq!(
        misuse_call(r.unmark_cancelable().unwrap_err()),
        "WdfRequestUnmarkCancelable"
    );
    r.mark_cancelable(never_called).unwrap();
    r.unmark_cancelable().unwrap();
    assert_eq!(
        misuse_call(r.unmark_cancelable().unwrap_err()),
        "WdfRequestUnmarkCancelable",
        "already unmarked"
    );
    r.complete(Ok(())).unwrap();
    assert_eq!(h.wait().status, Ok(()));
    drop((h, r, q));
    assert_clean(&sim);
}

#[test]
fn cancel_after_mark_runs_the_callback_on_the_cancelling_thread() {
    let (sim, q) = setup(false);
    let (h, r) = read(&sim, &q);
    r.mark_cancelable(cancel_and_complete).unwrap();
    let id = h.id();
    let canceller = std::thread::spawn(move || {
        assert_eq!(h.cancel(), Ok(true));
        (h, std::thread::current().id())
    });
    let (h, cancelling_thread) = canceller.join().unwrap();
    let seen: Vec<_> = CANCEL_THREADS
        .lock()
        .unwrap()
        .iter()
        .filter(|(i, _)| *i == id)
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(seen, vec![cancelling_thread]);
    assert_eq!(h.try_completed().unwrap().status, Err(Error::Cancelled));
    assert!(r.is_cancelled());
    assert_eq!(h.refused_completions(), 0);
    drop((h, r, q));
    assert_clean(&sim);
}

#[test]
fn a_cloned_handle_cancels_while_the_original_waits() {
    let (sim, q) = setup(false);
    let (h, r) = read(&sim, &q);
    r.mark_cancelable(cancel_and_complete).unwrap();
    let other = h.clone();
    assert_eq!(other.id(), h.id());
    let waiter = std::thread::spawn(move || h.wait_timeout(GUARD));
    assert_eq!(other.cancel(), Ok(true));
    let c = waiter.join().unwrap().expect("completed");
    assert_eq!(c.status, Err(Error::Cancelled));
    assert_eq!(other.try_completed(), Some(c), "both name the same request");
    drop((other, r, q));
    assert_clean(&sim);
}

#[test]
fn cancel_before_mark_makes_mark_fail_cancelled_without_storing_the_callback() {
    let (sim, q) = setup(false);
    let (h, r) = read(&sim, &q);
    assert!(!r.is_cancelled());
    assert_eq!(h.cancel(), Ok(true), "flagged for the driver");
    assert!(r.is_cancelled());
    assert_eq!(h.cancel(), Ok(false), "already cancelled");
    assert_eq!(r.mark_cancelable(never_called), Err(Error::Cancelled));
    // Not stored: completing is allowed (it is not cancelable).
    r.complete(Err(Error::Cancelled)).unwrap();
    assert_eq!(h.wait().status, Err(Error::Cancelled));
    assert_eq!(h.refused_completions(), 0);
    drop((h, r, q));
    assert_clean(&sim);
}

#[test]
fn cancel_after_unmark_only_flags_and_the_driver_completes() {
    let (sim, q) = setup(false);
    let (h, r) = read(&sim, &q);
    r.mark_cancelable(never_called).unwrap();
    r.unmark_cancelable().unwrap();
    assert_eq!(h.cancel(), Ok(true));
    assert!(r.is_cancelled());
    r.complete(Ok(())).unwrap();
    assert_eq!(h.wait().status, Ok(()), "the driver's path won");
    drop((h, r, q));
    assert_clean(&sim);
}

#[test]
fn unmark_after_cancel_says_cancelled_and_the_callback_completes() {
    let (sim, q) = setup(false);
    let (h, r) = read(&sim, &q);
    r.mark_cancelable(cancel_later).unwrap();
    assert_eq!(h.cancel(), Ok(true));
    assert_eq!(r.unmark_cancelable(), Err(Error::Cancelled));
    assert!(h.try_completed().is_none());
    // The cancel routine's deferred work completes it.
    let pending: Vec<_> = DEFERRED
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.id() == r.id())
        .cloned()
        .collect();
    assert_eq!(pending.len(), 1);
    pending[0].complete(Err(Error::Cancelled)).unwrap();
    assert_eq!(h.wait().status, Err(Error::Cancelled));
    assert_eq!(h.refused_completions(), 0);
    drop((h, r, pending, q));
    assert_clean(&sim);
}

#[test]
fn completing_a_request_still_marked_cancelable_is_misuse() {
    let (sim, q) = setup(false);
    let (h, r) = read(&sim, &q);
    r.mark_cancelable(never_called).unwrap();
    assert_eq!(
        misuse_call(r.complete(Ok(())).unwrap_err()),
        "WdfRequestComplete"
    );
    assert!(h.try_completed().is_none(), "left as it was");
    assert_eq!(
        misuse_call(r.mark_cancelable(never_called).unwrap_err()),
        "WdfRequestMarkCancelableEx",
        "marked twice"
    );
    r.unmark_cancelable().unwrap();
    r.complete(Ok(())).unwrap();
    assert_eq!(h.wait().status, Ok(()));
    assert_eq!(h.refused_completions(), 1);
    drop((h, r, q));
    assert_clean(&sim);
}

#[test]
fn cancelling_a_completed_request_is_an_error_not_a_panic() {
    let (sim, q) = setup(true);
    let (h, r) = read(&sim, &q);
    r.complete(Ok(())).unwrap();
    assert_eq!(h.cancel(), Err(Error::InvalidDeviceState));
    let text = panic_text(|| {
        let _ = r.mark_cancelable(never_called);
    });
    assert!(text.contains("WdfRequestMarkCancelableEx"), "{text}");
    drop((h, r, q));
    assert_clean(&sim);
}

#[test]
fn cancel_racing_unmark_completes_exactly_once() {
    let (sim, q) = setup(false);
    for _ in 0..200 {
        let (h, r) = read(&sim, &q);
        r.mark_cancelable(cancel_and_complete).unwrap();
        let canceller = std::thread::spawn(move || {
            let _ = h.cancel();
            h
        });
        if r.unmark_cancelable().is_ok() {
            r.complete(Ok(())).unwrap();
        }
        let h = canceller.join().unwrap();
        let done = h.wait_timeout(GUARD).expect("completed");
        assert!(matches!(done.status, Ok(()) | Err(Error::Cancelled)));
        assert_eq!(h.refused_completions(), 0);
    }
    drop(q);
    assert_clean(&sim);
}

#[test]
fn device_control_buffers_and_lengths() {
    let (sim, q) = setup(false);
    const CODE: IoctlCode = IoctlCode::new(0x8000, 0x801, TransferMethod::Buffered, 0);
    let h = q
        .submit(RequestSpec::device_control(
            CODE,
            Some(buffer(&sim, 16)),
            Some(buffer(&sim, 32)),
        ))
        .unwrap();
    let r = q.device().context().held.lock().unwrap().pop().unwrap();
    assert_eq!(r.kind(), RequestKind::DeviceControl);
    assert_eq!(r.ioctl_code(), Some(CODE));
    assert_eq!((r.input_length(), r.output_length()), (16, 32));
    assert_eq!(r.input_memory().unwrap().memory().len(), 16);
    assert_eq!(r.output_memory().unwrap().memory().len(), 32);
    r.complete_with_information(Ok(()), 32).unwrap();
    assert_eq!(h.wait().information, 32);
    assert_eq!(h.input().unwrap().len(), 16);
    drop((h, r, q));
    assert_clean(&sim);
}

#[test]
fn ioctl_code_layout_matches_ctl_code() {
    // CTL_CODE(FILE_DEVICE_UNKNOWN = 0x22, 0x800, METHOD_OUT_DIRECT, FILE_ANY_ACCESS)
    let code = IoctlCode::new(
        0x22,
        0x800,
        TransferMethod::OutDirect,
        IoctlCode::ANY_ACCESS,
    );
    assert_eq!(code.0, 0x0022_2002);
    assert_eq!(code.device_type(), 0x22);
    assert_eq!(code.function(), 0x800);
    assert_eq!(code.access(), 0);
    for m in [
        TransferMethod::Buffered,
        TransferMethod::InDirect,
        TransferMethod::OutDirect,
        TransferMethod::Neither,
    ] {
        assert_eq!(IoctlCode::new(1, 2, m, IoctlCode::READ_ACCESS).method(), m);
    }
    assert_eq!(
        IoctlCode::new(
            0x22,
            0x800,
            TransferMethod::Neither,
            IoctlCode::WRITE_ACCESS
        )
        .0,
        0x0022_A003
    );
}
