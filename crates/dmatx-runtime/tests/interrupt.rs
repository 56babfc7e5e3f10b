//! Interrupts: the ISR under the interrupt lock, enable/disable with power, DPC coalescing,
//! deferred raises, and the DPC worker at delete.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use common::{GUARD, Gate, device, until, verified_device};
use dmatx::Error;
use dmatx_runtime::{Device, Interrupt, InterruptConfig};

#[derive(Default)]
struct Ctx {
    isr_messages: AtomicU64,
    inside_sync: AtomicBool,
    overlaps: AtomicU64,
    dpc_entered: Gate,
    dpc_release: Gate,
    dpc_finished: AtomicU64,
    blocking_dpc: AtomicBool,
    interrupt: OnceLock<Interrupt<Ctx>>,
    worker_exited: Arc<AtomicBool>,
}

fn isr(i: &Interrupt<Ctx>, message: u32) -> bool {
    let ctx = i.device().context();
    ctx.isr_messages
        .fetch_add(u64::from(message), Ordering::SeqCst);
    if ctx.inside_sync.load(Ordering::SeqCst) {
        ctx.overlaps.fetch_add(1, Ordering::SeqCst);
    }
    // The ISR holds the interrupt lock: taking it again is refused.
    assert!(matches!(i.acquire_lock(), Err(Error::ObjectMisuse(_))));
    message != 0
}

fn dpc(i: &Interrupt<Ctx>) {
    let ctx = i.device().context();
    if ctx.blocking_dpc.load(Ordering::SeqCst) {
        ctx.dpc_entered.open();
        ctx.dpc_release.wait();
    }
    ctx.dpc_finished.fetch_add(1, Ordering::SeqCst);
}

fn interrupt(dev: &Device<Ctx>) -> Interrupt<Ctx> {
    Interrupt::create(
        dev,
        InterruptConfig {
            isr,
            dpc: Some(dpc),
        },
    )
    .unwrap()
}

#[test]
fn raises_are_delivered_only_while_enabled() {
    let dev = device(Ctx::default());
    let i = interrupt(&dev);
    assert!(!i.is_enabled(), "a new device is in D3");
    assert_eq!(i.raise(1), Ok(false));
    assert_eq!(i.stats().raises_while_disabled, 1);
    assert_eq!(i.stats().isrs, 0);
    dev.power_up().unwrap();
    assert!(i.is_enabled());
    assert_eq!(i.raise(3), Ok(true));
    assert_eq!(i.raise(0), Ok(false), "the ISR did not claim it");
    let s = i.stats();
    assert_eq!((s.isrs, s.claimed), (2, 1));
    assert_eq!(dev.context().isr_messages.load(Ordering::SeqCst), 3);
    dev.power_down().unwrap();
    assert_eq!(i.raise(5), Ok(false));
    assert_eq!(i.stats().raises_while_disabled, 2);
    dev.delete().unwrap();
    assert_eq!(i.raise(1), Err(Error::InvalidDeviceState));
}

#[test]
fn dpc_requests_coalesce_while_queued_and_requeue_while_running() {
    let dev = device(Ctx::default());
    let i = interrupt(&dev);
    let ctx = dev.context();
    ctx.blocking_dpc.store(true, Ordering::SeqCst);
    assert_eq!(i.queue_dpc(), Ok(true));
    ctx.dpc_entered.wait();
    // Running: a new request queues it again; a second one coalesces with that.
    assert_eq!(i.queue_dpc(), Ok(true));
    assert_eq!(i.queue_dpc(), Ok(false));
    ctx.blocking_dpc.store(false, Ordering::SeqCst);
    ctx.dpc_release.open();
    assert!(i.wait_dpc_idle(GUARD));
    let s = i.stats();
    assert_eq!((s.dpcs_queued, s.dpcs_run, s.dpcs_coalesced), (2, 2, 1));
    assert_eq!(ctx.dpc_finished.load(Ordering::SeqCst), 2);
    assert_eq!(s.dpc_panics, 0);
    dev.delete().unwrap();
    assert_eq!(i.queue_dpc(), Err(Error::InvalidDeviceState));
}

#[test]
fn the_interrupt_lock_excludes_the_isr() {
    const ROUNDS: u64 = 2000;
    let dev = device(Ctx::default());
    let i = interrupt(&dev);
    dev.power_up().unwrap();
    let raiser = {
        let i = i.clone();
        std::thread::spawn(move || {
            for _ in 0..ROUNDS {
                i.raise(1).unwrap();
            }
        })
    };
    let ctx = dev.context();
    for _ in 0..ROUNDS {
        i.synchronize(|| {
            ctx.inside_sync.store(true, Ordering::SeqCst);
            std::hint::spin_loop();
            ctx.inside_sync.store(false, Ordering::SeqCst);
        })
        .unwrap();
        let guard = i.acquire_lock().unwrap();
        ctx.inside_sync.store(true, Ordering::SeqCst);
        ctx.inside_sync.store(false, Ordering::SeqCst);
        drop(guard);
    }
    raiser.join().unwrap();
    assert_eq!(ctx.overlaps.load(Ordering::SeqCst), 0);
    assert_eq!(i.stats().isrs, ROUNDS);
    dev.delete().unwrap();
    assert!(matches!(i.acquire_lock(), Err(Error::InvalidDeviceState)));
}

#[test]
fn a_raise_under_the_lock_on_the_same_thread_runs_when_the_lock_is_released() {
    let dev = device(Ctx::default());
    let i = interrupt(&dev);
    dev.power_up().unwrap();
    let inside = i
        .synchronize(|| {
            let r = i.raise(7);
            (r, i.stats().isrs)
        })
        .unwrap();
    assert_eq!(inside, (Ok(false), 0), "masked while the lock is held");
    let s = i.stats();
    assert_eq!((s.isrs, s.raises_deferred), (1, 1));
    assert_eq!(dev.context().isr_messages.load(Ordering::SeqCst), 7);
    dev.delete().unwrap();
}

#[test]
fn nested_acquire_is_misuse_and_panics_under_the_verifier() {
    let dev = device(Ctx::default());
    let i = interrupt(&dev);
    let guard = i.acquire_lock().unwrap();
    assert!(matches!(
        i.acquire_lock(),
        Err(Error::ObjectMisuse(m)) if m.call == "WdfInterruptAcquireLock"
    ));
    drop(guard);
    dev.delete().unwrap();

    let dev = verified_device(Ctx::default());
    let i = interrupt(&dev);
    let guard = i.acquire_lock().unwrap();
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = i.acquire_lock();
    }))
    .expect_err("verifier panic");
    let text = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(text.contains("WdfInterruptAcquireLock"), "{text}");
    drop(guard);
    // The lock was released by the guard, not poisoned by the panic.
    assert!(i.synchronize(|| 1).is_ok());
    dev.delete().unwrap();
}

#[test]
fn delete_runs_a_queued_dpc_and_joins_the_worker() {
    let dev = device(Ctx::default());
    let i = interrupt(&dev);
    let ctx = dev.context();
    ctx.blocking_dpc.store(true, Ordering::SeqCst);
    assert_eq!(i.queue_dpc(), Ok(true));
    ctx.dpc_entered.wait();
    let opener = {
        let dev = dev.clone();
        std::thread::spawn(move || {
            until("delete to start", || dev.is_deleted());
            dev.context().dpc_release.open();
        })
    };
    dev.delete().unwrap();
    // delete returned only after the running DPC finished (its worker was joined).
    assert_eq!(ctx.dpc_finished.load(Ordering::SeqCst), 1);
    opener.join().unwrap();
    assert!(i.wait_dpc_idle(GUARD));
}

/// Sets its flag when the thread that owns it exits (thread-local destructors run before a
/// join returns).
struct ExitFlag(Arc<AtomicBool>);

impl Drop for ExitFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

thread_local! {
    static EXIT: std::cell::RefCell<Option<ExitFlag>> = const { std::cell::RefCell::new(None) };
}

fn dpc_marking_its_thread(i: &Interrupt<Ctx>) {
    let flag = Arc::clone(&i.device().context().worker_exited);
    EXIT.with(|e| *e.borrow_mut() = Some(ExitFlag(flag)));
}

fn marking_interrupt(dev: &Device<Ctx>) -> Interrupt<Ctx> {
    Interrupt::create(
        dev,
        InterruptConfig {
            isr,
            dpc: Some(dpc_marking_its_thread),
        },
    )
    .unwrap()
}

#[test]
fn dropping_the_last_handles_joins_the_dpc_worker() {
    let dev = device(Ctx::default());
    let exited = Arc::clone(&dev.context().worker_exited);
    let i = marking_interrupt(&dev);
    assert_eq!(i.queue_dpc(), Ok(true));
    assert!(i.wait_dpc_idle(GUARD));
    assert!(!exited.load(Ordering::SeqCst));
    drop(i);
    assert!(
        exited.load(Ordering::SeqCst),
        "the worker was joined by the drop"
    );
    drop(dev);
}

#[test]
fn an_interrupt_held_in_the_device_context_is_stopped_by_delete() {
    let dev = device(Ctx::default());
    let exited = Arc::clone(&dev.context().worker_exited);
    let i = marking_interrupt(&dev);
    dev.context().interrupt.set(i.clone()).unwrap();
    drop(i); // the context keeps it: a cycle only delete breaks
    dev.power_up().unwrap();
    let i = dev.context().interrupt.get().unwrap();
    assert_eq!(i.raise(2), Ok(true));
    assert_eq!(i.queue_dpc(), Ok(true));
    dev.delete().unwrap();
    assert!(exited.load(Ordering::SeqCst), "delete joined the worker");
    assert!(!i.is_enabled());
    assert_eq!(i.stats().dpcs_run, 1);
}

#[test]
fn a_raise_from_another_thread_waits_while_the_lock_is_held() {
    let dev = device(Ctx::default());
    let i = interrupt(&dev);
    dev.power_up().unwrap();
    let guard = i.acquire_lock().unwrap();
    let raiser = {
        let i = i.clone();
        std::thread::spawn(move || i.raise(1).unwrap())
    };
    // For 20 ms the ISR must not run: the lock is held on this thread.
    let end = std::time::Instant::now() + std::time::Duration::from_millis(20);
    while std::time::Instant::now() < end {
        assert_eq!(
            i.stats().isrs,
            0,
            "the ISR ran while the interrupt lock was held"
        );
        std::thread::yield_now();
    }
    drop(guard);
    raiser.join().unwrap();
    assert_eq!(i.stats().isrs, 1, "and runs once the lock is released");
    dev.delete().unwrap();
}
