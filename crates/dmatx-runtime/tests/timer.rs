//! Timers: start, restart, stop (queued, fired, never started), stop with wait, stop from the
//! callback, and delete.

mod common;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{GUARD, Gate, device, verified_device};
use dmatx::Error;
use dmatx_runtime::{Device, Timer, TimerConfig};

const LONG: Duration = Duration::from_secs(3600);

#[derive(Default)]
struct Ctx {
    block: AtomicBool,
    entered: Gate,
    release: Gate,
    finished: AtomicBool,
    stop_in_callback: AtomicBool,
    from_callback: Mutex<Vec<dmatx::Result<bool>>>,
}

fn callback(t: &Timer<Ctx>) {
    let ctx = t.device().context();
    if ctx.stop_in_callback.load(Ordering::SeqCst) {
        let mut seen = ctx.from_callback.lock().unwrap();
        seen.push(t.stop(true));
        seen.push(t.stop(false));
    }
    if ctx.block.load(Ordering::SeqCst) {
        ctx.entered.open();
        ctx.release.wait();
    }
    ctx.finished.store(true, Ordering::SeqCst);
}

fn timer(dev: &Device<Ctx>) -> Timer<Ctx> {
    Timer::create(dev, TimerConfig { callback }).unwrap()
}

#[test]
fn a_started_timer_fires_once_on_its_worker() {
    let dev = device(Ctx::default());
    let t = timer(&dev);
    assert_eq!(t.start(Duration::from_millis(1)), Ok(false));
    assert!(t.wait_idle(GUARD));
    assert_eq!(t.fired(), 1);
    assert!(dev.context().finished.load(Ordering::SeqCst));
    assert_eq!(t.stop(false), Ok(false), "already fired");
    assert_eq!(t.callback_panics(), 0);
    dev.delete().unwrap();
}

#[test]
fn clones_name_the_same_timer_and_two_timers_differ() {
    let dev = device(Ctx::default());
    let (a, b) = (timer(&dev), timer(&dev));
    assert!(a.same_timer(&a.clone()));
    assert!(!a.same_timer(&b));
    dev.delete().unwrap();
}

#[test]
fn start_while_queued_restarts_and_says_so() {
    let dev = device(Ctx::default());
    let t = timer(&dev);
    assert_eq!(t.start(LONG), Ok(false));
    assert!(t.is_queued());
    assert_eq!(t.start(LONG), Ok(true), "was queued: restarted");
    // Restart with a short time: it fires at the new time.
    assert_eq!(t.start(Duration::ZERO), Ok(true));
    assert!(t.wait_idle(GUARD));
    assert_eq!(t.fired(), 1);
    dev.delete().unwrap();
}

#[test]
fn stop_of_a_queued_timer_prevents_the_callback() {
    let dev = device(Ctx::default());
    let t = timer(&dev);
    t.start(LONG).unwrap();
    assert_eq!(t.stop(false), Ok(true));
    assert!(!t.is_queued());
    assert_eq!(t.stop(true), Ok(false), "nothing queued now");
    assert_eq!(t.fired(), 0);
    dev.delete().unwrap();
}

#[test]
fn stop_of_a_timer_never_started_is_invalid_device_state() {
    let dev = device(Ctx::default());
    let t = timer(&dev);
    assert_eq!(t.stop(false), Err(Error::InvalidDeviceState));
    assert_eq!(t.stop(true), Err(Error::InvalidDeviceState));
    dev.delete().unwrap();
}

#[test]
fn stop_with_wait_waits_for_a_running_callback() {
    let dev = device(Ctx::default());
    let t = timer(&dev);
    let ctx = dev.context();
    ctx.block.store(true, Ordering::SeqCst);
    t.start(Duration::ZERO).unwrap();
    ctx.entered.wait();
    let stopping = Gate::default();
    std::thread::scope(|s| {
        s.spawn(|| {
            // Release the callback only once the stop below is under way, and late enough
            // that a stop which did not wait would certainly have returned first.
            stopping.wait();
            std::thread::sleep(Duration::from_millis(20));
            ctx.release.open();
        });
        stopping.open();
        assert_eq!(t.stop(true), Ok(false), "it was running, not queued");
        assert!(
            ctx.finished.load(Ordering::SeqCst),
            "stop(wait) returned only after the callback"
        );
    });
    dev.delete().unwrap();
}

#[test]
fn stop_with_wait_from_the_callback_is_misuse() {
    let dev = device(Ctx::default());
    let t = timer(&dev);
    dev.context().stop_in_callback.store(true, Ordering::SeqCst);
    t.start(Duration::ZERO).unwrap();
    assert!(t.wait_idle(GUARD));
    let seen = dev.context().from_callback.lock().unwrap().clone();
    assert!(
        matches!(seen[0], Err(Error::ObjectMisuse(m)) if m.call == "WdfTimerStop"),
        "{seen:?}"
    );
    assert_eq!(seen[1], Ok(false), "without wait it is allowed");
    dev.delete().unwrap();
}

#[test]
fn stop_with_wait_from_the_callback_panics_under_the_verifier_and_the_worker_goes_on() {
    let dev = verified_device(Ctx::default());
    let t = timer(&dev);
    dev.context().stop_in_callback.store(true, Ordering::SeqCst);
    t.start(Duration::ZERO).unwrap();
    assert!(t.wait_idle(GUARD));
    assert_eq!(t.callback_panics(), 1);
    dev.context()
        .stop_in_callback
        .store(false, Ordering::SeqCst);
    t.start(Duration::ZERO).unwrap();
    assert!(t.wait_idle(GUARD));
    assert_eq!(t.fired(), 2);
    dev.delete().unwrap();
}

#[test]
fn delete_cancels_a_queued_timer_and_refuses_later_calls() {
    let dev = device(Ctx::default());
    let t = timer(&dev);
    t.start(LONG).unwrap();
    dev.delete().unwrap();
    assert!(!t.is_queued());
    assert_eq!(t.fired(), 0);
    assert_eq!(t.start(Duration::ZERO), Err(Error::InvalidDeviceState));
    assert_eq!(t.stop(false), Err(Error::InvalidDeviceState));
    assert_eq!(
        Timer::create(&dev, TimerConfig { callback }).unwrap_err(),
        Error::InvalidDeviceState
    );
}
