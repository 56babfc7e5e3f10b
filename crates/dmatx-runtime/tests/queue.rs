//! Queues: sequential and parallel dispatch, the default for missing handlers, power-managed
//! holding, cancellation while queued, delete and drop.

mod common;

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread::ThreadId;

use common::{GUARD, assert_clean, buffer, device, sim};
use dmatx::Error;
use dmatx_runtime::{Dispatch, Queue, QueueConfig, Request, RequestSpec};
use dmatx_sim::SimBuffer;

#[derive(Default)]
struct Ctx {
    delivered: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    max_depth: AtomicUsize,
    threads: Mutex<Vec<ThreadId>>,
    held: Mutex<Vec<Request<SimBuffer>>>,
    held_cv: Condvar,
}

type Q = Queue<Ctx, SimBuffer>;

thread_local! {
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Completes every read at once, with the length as information.
fn complete_at_once(q: &Q, r: Request<SimBuffer>, length: u64) {
    let ctx = q.device().context();
    ctx.delivered.fetch_add(1, Ordering::SeqCst);
    ctx.threads
        .lock()
        .unwrap()
        .push(std::thread::current().id());
    let depth = DEPTH.with(|d| {
        d.set(d.get() + 1);
        d.get()
    });
    ctx.max_depth.fetch_max(depth, Ordering::SeqCst);
    r.complete_with_information(Ok(()), length).unwrap();
    DEPTH.with(|d| d.set(d.get() - 1));
}

/// Keeps every read for the test to complete.
fn hold(q: &Q, r: Request<SimBuffer>, _length: u64) {
    let ctx = q.device().context();
    ctx.delivered.fetch_add(1, Ordering::SeqCst);
    let now = ctx.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    ctx.max_in_flight.fetch_max(now, Ordering::SeqCst);
    ctx.threads
        .lock()
        .unwrap()
        .push(std::thread::current().id());
    ctx.held.lock().unwrap().push(r);
    ctx.held_cv.notify_all();
}

fn take_held(ctx: &Ctx) -> Request<SimBuffer> {
    let mut held = ctx.held.lock().unwrap();
    loop {
        if let Some(r) = held.pop() {
            return r;
        }
        let (g, timeout) = ctx.held_cv.wait_timeout(held, GUARD).unwrap();
        assert!(!timeout.timed_out(), "no request delivered");
        held = g;
    }
}

fn reads(
    dispatch: Dispatch,
    read: dmatx_runtime::IoHandler<Ctx, SimBuffer>,
) -> QueueConfig<Ctx, SimBuffer> {
    QueueConfig {
        read: Some(read),
        power_managed: false,
        ..QueueConfig::new(dispatch)
    }
}

#[test]
fn parallel_delivers_on_the_submitting_thread_before_submit_returns() {
    let sim = sim();
    let dev = device(Ctx::default());
    let q = Q::create(&dev, reads(Dispatch::Parallel, complete_at_once)).unwrap();
    let h = q.submit(RequestSpec::read(buffer(&sim, 512))).unwrap();
    let done = h.try_completed().expect("completed inside submit");
    assert_eq!(done.status, Ok(()));
    assert_eq!(done.information, 512);
    assert_eq!(
        dev.context().threads.lock().unwrap().as_slice(),
        &[std::thread::current().id()]
    );
    assert_eq!(h.refused_completions(), 0);
    drop((h, q));
    assert_clean(&sim);
}

#[test]
fn parallel_delivers_several_at_once() {
    let sim = sim();
    let dev = device(Ctx::default());
    let q = Q::create(&dev, reads(Dispatch::Parallel, hold)).unwrap();
    let handles: Vec<_> = (0..3)
        .map(|_| q.submit(RequestSpec::read(buffer(&sim, 64))).unwrap())
        .collect();
    assert_eq!(dev.context().max_in_flight.load(Ordering::SeqCst), 3);
    assert_eq!(q.outstanding(), 3);
    for r in std::mem::take(&mut *dev.context().held.lock().unwrap()) {
        r.complete(Ok(())).unwrap();
    }
    for h in &handles {
        assert_eq!(h.wait_timeout(GUARD).unwrap().status, Ok(()));
    }
    assert_eq!(q.outstanding(), 0);
    drop((handles, q));
    assert_clean(&sim);
}

#[test]
fn sequential_never_has_two_delivered_across_threads() {
    const THREADS: usize = 4;
    const EACH: usize = 25;
    let sim = sim();
    let dev = device(Ctx::default());
    let q = Q::create(&dev, reads(Dispatch::Sequential, hold)).unwrap();
    let submitters: Vec<_> = (0..THREADS)
        .map(|_| {
            let q = q.clone();
            let sim = sim.clone();
            std::thread::spawn(move || {
                (0..EACH)
                    .map(|_| q.submit(RequestSpec::read(buffer(&sim, 64))).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let ctx = dev.context();
    for _ in 0..THREADS * EACH {
        let r = take_held(ctx);
        ctx.in_flight.fetch_sub(1, Ordering::SeqCst);
        r.complete(Ok(())).unwrap();
    }
    let handles: Vec<_> = submitters
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    for h in &handles {
        assert_eq!(h.wait_timeout(GUARD).unwrap().status, Ok(()));
        assert_eq!(h.refused_completions(), 0);
    }
    assert_eq!(ctx.max_in_flight.load(Ordering::SeqCst), 1);
    assert_eq!(ctx.delivered.load(Ordering::SeqCst), THREADS * EACH);
    assert_eq!((q.pending(), q.outstanding()), (0, 0));
    drop((handles, q));
    assert_clean(&sim);
}

#[test]
fn sequential_delivers_the_next_on_the_completing_thread() {
    let sim = sim();
    let dev = device(Ctx::default());
    let q = Q::create(&dev, reads(Dispatch::Sequential, hold)).unwrap();
    let first = q.submit(RequestSpec::read(buffer(&sim, 64))).unwrap();
    let second = q.submit(RequestSpec::read(buffer(&sim, 64))).unwrap();
    assert_eq!(q.pending(), 1, "the second waits for the first");
    let ctx = dev.context();
    let r = take_held(ctx);
    assert_eq!(r.id(), first.id());
    // Complete from another thread: the second is delivered there, inside `complete`.
    let completer = std::thread::spawn(move || {
        r.complete(Ok(())).unwrap();
        std::thread::current().id()
    });
    let completing_thread = completer.join().unwrap();
    assert_eq!(q.pending(), 0);
    assert_eq!(
        ctx.threads.lock().unwrap().as_slice(),
        &[std::thread::current().id(), completing_thread]
    );
    let r2 = take_held(ctx);
    assert_eq!(r2.id(), second.id());
    r2.complete(Ok(())).unwrap();
    assert_eq!(second.wait_timeout(GUARD).unwrap().status, Ok(()));
    drop((first, second, q));
    assert_clean(&sim);
}

#[test]
fn sequential_synchronous_completions_do_not_grow_the_stack() {
    const N: usize = 2000;
    let sim = sim();
    let dev = device(Ctx::default());
    let config = QueueConfig {
        power_managed: true,
        ..reads(Dispatch::Sequential, complete_at_once)
    };
    let q = Q::create(&dev, config).unwrap();
    let handles: Vec<_> = (0..N)
        .map(|_| q.submit(RequestSpec::read(buffer(&sim, 8))).unwrap())
        .collect();
    assert_eq!(q.pending(), N, "held while the device is in D3");
    dev.power_up().unwrap();
    assert!(handles.iter().all(|h| h.try_completed().is_some()));
    let ctx = dev.context();
    assert_eq!(ctx.delivered.load(Ordering::SeqCst), N);
    assert_eq!(
        ctx.max_depth.load(Ordering::SeqCst),
        1,
        "no nested delivery"
    );
    dev.delete().unwrap();
    drop((handles, q));
    assert_clean(&sim);
}

#[test]
fn a_request_type_without_a_handler_completes_invalid_device_request() {
    let sim = sim();
    let dev = device(Ctx::default());
    let q = Q::create(&dev, reads(Dispatch::Parallel, complete_at_once)).unwrap();
    let write = q.submit(RequestSpec::write(buffer(&sim, 64))).unwrap();
    let other = q.submit(RequestSpec::other()).unwrap();
    let ioctl = q
        .submit(RequestSpec::device_control(
            dmatx_runtime::IoctlCode(0x22_0000),
            None,
            None,
        ))
        .unwrap();
    for h in [&write, &other, &ioctl] {
        let done = h.try_completed().expect("completed at once");
        assert_eq!(done.status, Err(Error::InvalidDeviceRequest));
        assert_eq!(done.information, 0);
    }
    assert_eq!(dev.context().delivered.load(Ordering::SeqCst), 0);
    drop((write, other, ioctl, q));
    assert_clean(&sim);
}

#[test]
fn power_managed_queue_holds_until_power_up_and_others_do_not() {
    let sim = sim();
    let dev = device(Ctx::default());
    let managed = Q::create(
        &dev,
        QueueConfig {
            power_managed: true,
            ..reads(Dispatch::Parallel, complete_at_once)
        },
    )
    .unwrap();
    let unmanaged = Q::create(&dev, reads(Dispatch::Parallel, complete_at_once)).unwrap();
    let held = managed.submit(RequestSpec::read(buffer(&sim, 64))).unwrap();
    let direct = unmanaged
        .submit(RequestSpec::read(buffer(&sim, 64)))
        .unwrap();
    assert!(held.try_completed().is_none());
    assert_eq!(managed.pending(), 1);
    assert!(
        direct.try_completed().is_some(),
        "not power-managed: delivered in D3"
    );
    dev.power_up().unwrap();
    assert_eq!(held.try_completed().unwrap().status, Ok(()));
    // Held again after power-down.
    dev.power_down().unwrap();
    let later = managed.submit(RequestSpec::read(buffer(&sim, 64))).unwrap();
    assert!(later.try_completed().is_none());
    dev.power_up().unwrap();
    assert!(later.try_completed().is_some());
    dev.delete().unwrap();
    drop((held, direct, later, managed, unmanaged));
    assert_clean(&sim);
}

#[test]
fn a_request_cancelled_while_queued_never_reaches_the_driver() {
    let sim = sim();
    let dev = device(Ctx::default());
    let q = Q::create(
        &dev,
        QueueConfig {
            power_managed: true,
            ..reads(Dispatch::Sequential, complete_at_once)
        },
    )
    .unwrap();
    let h = q.submit(RequestSpec::read(buffer(&sim, 64))).unwrap();
    assert_eq!(h.cancel(), Ok(true));
    assert_eq!(h.try_completed().unwrap().status, Err(Error::Cancelled));
    assert_eq!(h.cancel(), Err(Error::InvalidDeviceState), "completed");
    dev.power_up().unwrap();
    assert_eq!(dev.context().delivered.load(Ordering::SeqCst), 0);
    assert_eq!(q.pending(), 0);
    dev.delete().unwrap();
    drop((h, q));
    assert_clean(&sim);
}

#[test]
fn delete_completes_undelivered_requests_cancelled_and_refuses_new_ones() {
    let sim = sim();
    let dev = device(Ctx::default());
    let q = Q::create(&dev, reads(Dispatch::Sequential, hold)).unwrap();
    let delivered = q.submit(RequestSpec::read(buffer(&sim, 64))).unwrap();
    let waiting: Vec<_> = (0..3)
        .map(|_| q.submit(RequestSpec::read(buffer(&sim, 64))).unwrap())
        .collect();
    assert_eq!(q.pending(), 3);
    dev.delete().unwrap();
    for h in &waiting {
        assert_eq!(h.try_completed().unwrap().status, Err(Error::Cancelled));
    }
    // The driver still holds the delivered one (not cancelable): it completes it normally.
    let r = take_held(dev.context());
    assert!(r.is_cancelled(), "delete cancels what the driver holds");
    assert!(delivered.try_completed().is_none());
    r.complete(Err(Error::Cancelled)).unwrap();
    assert_eq!(
        delivered.try_completed().unwrap().status,
        Err(Error::Cancelled)
    );
    assert_eq!(
        q.submit(RequestSpec::read(buffer(&sim, 64))).unwrap_err(),
        Error::InvalidDeviceState
    );
    assert_eq!(
        dev.context().delivered.load(Ordering::SeqCst),
        1,
        "none delivered after delete"
    );
    assert_eq!(dev.delete(), Err(Error::InvalidDeviceState));
    drop((delivered, waiting, q));
    assert_clean(&sim);
}

#[test]
fn dropping_the_last_queue_handle_completes_waiting_requests() {
    let sim = sim();
    let dev = device(Ctx::default());
    let q = Q::create(
        &dev,
        QueueConfig {
            power_managed: true,
            ..reads(Dispatch::Parallel, hold)
        },
    )
    .unwrap();
    let h = q.submit(RequestSpec::read(buffer(&sim, 64))).unwrap();
    drop(q);
    assert_eq!(h.wait_timeout(GUARD).unwrap().status, Err(Error::Cancelled));
    drop(h);
    assert_clean(&sim);
}

#[test]
fn queue_reports_its_device_and_dispatch() {
    let dev = device(Ctx::default());
    let q = Q::create(&dev, reads(Dispatch::Sequential, hold)).unwrap();
    assert!(q.device().same_device(&dev));
    assert_eq!(q.dispatch(), Dispatch::Sequential);
    dev.delete().unwrap();
    assert_eq!(
        Q::create(&dev, reads(Dispatch::Parallel, hold)).unwrap_err(),
        Error::InvalidDeviceState
    );
}
