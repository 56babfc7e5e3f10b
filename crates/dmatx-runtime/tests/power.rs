//! Power: WDF's callback order up and down (with the DMA enablers' part between), failure
//! rules, refused transitions, and delete.
//!
//! The enabler callbacks get no context, so the log is a static and the tests of this file run
//! one at a time.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use common::{assert_clean, buffer, device, sim};
use dmatx::{DmaDevice, Enabler, EnablerCallbacks, EnablerConfig, Error, Profile};
use dmatx_runtime::{
    Device, Dispatch, Interrupt, InterruptConfig, PnpPowerCallbacks, PowerState, Queue,
    QueueConfig, Request, RequestSpec,
};
use dmatx_sim::{SimBuffer, SimPlatform};

static LOG: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
static SERIAL: Mutex<()> = Mutex::new(());
static FAIL_FILL: AtomicBool = AtomicBool::new(false);

fn serial() -> MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    LOG.lock().unwrap().clear();
    FAIL_FILL.store(false, Ordering::SeqCst);
    guard
}

fn log(entry: &'static str) {
    LOG.lock().unwrap().push(entry);
}

fn take_log() -> Vec<&'static str> {
    std::mem::take(&mut *LOG.lock().unwrap())
}

#[derive(Default)]
struct Ctx {
    interrupt: std::sync::OnceLock<Interrupt<Ctx>>,
    fail_post: AtomicBool,
    fail_init: AtomicBool,
    fail_suspend: AtomicBool,
    nested: Mutex<Option<dmatx::Result<()>>>,
}

fn interrupts_on(d: &Device<Ctx>) -> bool {
    d.context().interrupt.get().unwrap().is_enabled()
}

fn d0_entry(d: &Device<Ctx>) -> dmatx::Result<()> {
    log(if interrupts_on(d) {
        "d0_entry(irq on)"
    } else {
        "d0_entry"
    });
    Ok(())
}

fn post_interrupts_enabled(d: &Device<Ctx>) -> dmatx::Result<()> {
    log(if interrupts_on(d) {
        "post_irq_enabled"
    } else {
        "post_irq_enabled(irq off)"
    });
    *d.context().nested.lock().unwrap() = Some(d.power_up());
    if d.context().fail_post.load(Ordering::SeqCst) {
        return Err(Error::Unsuccessful);
    }
    Ok(())
}

fn smio_init(d: &Device<Ctx>) -> dmatx::Result<()> {
    log("smio_init");
    assert_eq!(d.power_state(), PowerState::D0);
    if d.context().fail_init.load(Ordering::SeqCst) {
        return Err(Error::InsufficientResources);
    }
    Ok(())
}

fn smio_restart(_: &Device<Ctx>) -> dmatx::Result<()> {
    log("smio_restart");
    Ok(())
}

fn smio_suspend(d: &Device<Ctx>) -> dmatx::Result<()> {
    log("smio_suspend");
    if d.context().fail_suspend.load(Ordering::SeqCst) {
        return Err(Error::IoTimeout);
    }
    Ok(())
}

fn pre_interrupts_disabled(d: &Device<Ctx>) -> dmatx::Result<()> {
    log(if interrupts_on(d) {
        "pre_irq_disabled"
    } else {
        "pre_irq_disabled(irq off)"
    });
    Ok(())
}

fn d0_exit(d: &Device<Ctx>) -> dmatx::Result<()> {
    log(if interrupts_on(d) {
        "d0_exit(irq on)"
    } else {
        "d0_exit"
    });
    Ok(())
}

fn isr(_: &Interrupt<Ctx>, _: u32) -> bool {
    true
}

fn deliver(_: &Queue<Ctx, SimBuffer>, r: Request<SimBuffer>, _: u64) {
    log("queue delivers");
    r.complete(Ok(())).unwrap();
}

fn dma_fill(_: &Enabler<SimPlatform>) -> dmatx::Result<()> {
    log("dma fill");
    if FAIL_FILL.load(Ordering::SeqCst) {
        return Err(Error::InsufficientResources);
    }
    Ok(())
}

fn dma_enable(_: &Enabler<SimPlatform>) -> dmatx::Result<()> {
    log("dma enable");
    Ok(())
}

fn dma_start(_: &Enabler<SimPlatform>) -> dmatx::Result<()> {
    log("dma start");
    Ok(())
}

fn dma_stop(_: &Enabler<SimPlatform>) -> dmatx::Result<()> {
    log("dma stop");
    Ok(())
}

fn dma_disable(_: &Enabler<SimPlatform>) -> dmatx::Result<()> {
    log("dma disable");
    Ok(())
}

fn dma_flush(_: &Enabler<SimPlatform>) -> dmatx::Result<()> {
    log("dma flush");
    Ok(())
}

struct Rig {
    sim: SimPlatform,
    dev: Device<Ctx>,
    queue: Queue<Ctx, SimBuffer>,
    enabler: Enabler<SimPlatform>,
}

fn rig() -> Rig {
    let sim = sim();
    let dev = device(Ctx::default());
    let interrupt = Interrupt::create(&dev, InterruptConfig { isr, dpc: None }).unwrap();
    dev.context().interrupt.set(interrupt).unwrap();
    dev.set_pnp_power_callbacks(PnpPowerCallbacks {
        d0_entry: Some(d0_entry),
        d0_entry_post_interrupts_enabled: Some(post_interrupts_enabled),
        self_managed_io_init: Some(smio_init),
        self_managed_io_restart: Some(smio_restart),
        self_managed_io_suspend: Some(smio_suspend),
        d0_exit_pre_interrupts_disabled: Some(pre_interrupts_disabled),
        d0_exit: Some(d0_exit),
    })
    .unwrap();
    let dma = DmaDevice::new(sim.clone());
    let enabler = Enabler::create(
        &dma,
        EnablerConfig::new(Profile::ScatterGather64, 65536).with_verifier(false),
    )
    .unwrap();
    enabler.set_power_callbacks(EnablerCallbacks {
        fill: Some(dma_fill),
        enable: Some(dma_enable),
        self_managed_io_start: Some(dma_start),
        self_managed_io_stop: Some(dma_stop),
        disable: Some(dma_disable),
        flush: Some(dma_flush),
    });
    dev.attach_dma(&dma).unwrap();
    let queue = Queue::create(
        &dev,
        QueueConfig {
            read: Some(deliver),
            ..QueueConfig::new(Dispatch::Parallel)
        },
    )
    .unwrap();
    Rig {
        sim,
        dev,
        queue,
        enabler,
    }
}

impl Rig {
    fn finish(self) {
        if !self.dev.is_deleted() {
            self.dev.delete().unwrap();
        }
        assert!(self.enabler.is_deleted(), "delete reached the DMA device");
        let sim = self.sim.clone();
        drop(self);
        assert_clean(&sim);
    }
}

/// The DMA entries of `log` form one block between `before` and `after`.
fn dma_block_between(log: &[&str], before: &str, after: &str) {
    let at = |name: &str| log.iter().position(|e| *e == name).unwrap();
    let dma: Vec<usize> = (0..log.len())
        .filter(|&i| log[i].starts_with("dma"))
        .collect();
    assert!(!dma.is_empty(), "{log:?}");
    assert!(
        dma.iter().all(|&i| i > at(before) && i < at(after)),
        "{log:?}"
    );
    assert_eq!(dma.last().unwrap() - dma[0] + 1, dma.len(), "{log:?}");
}

fn without_dma(log: &[&'static str]) -> Vec<&'static str> {
    log.iter()
        .copied()
        .filter(|e| !e.starts_with("dma"))
        .collect()
}

#[test]
fn power_up_and_down_follow_wdf_order() {
    let _serial = serial();
    let r = rig();
    let waiting = r
        .queue
        .submit(RequestSpec::read(buffer(&r.sim, 64)))
        .unwrap();
    assert_eq!(r.dev.power_state(), PowerState::D3);
    r.dev.power_up().unwrap();
    assert_eq!(r.dev.power_state(), PowerState::D0);
    let up = take_log();
    assert_eq!(
        without_dma(&up),
        [
            "d0_entry",
            "post_irq_enabled",
            "queue delivers",
            "smio_init"
        ]
    );
    dma_block_between(&up, "post_irq_enabled", "queue delivers");
    assert_eq!(
        up.iter().filter(|e| e.starts_with("dma")).count(),
        3,
        "fill, enable, start: {up:?}"
    );
    assert_eq!(waiting.try_completed().unwrap().status, Ok(()));
    assert_eq!(
        *r.dev.context().nested.lock().unwrap(),
        Some(Err(Error::InvalidDeviceState)),
        "a transition from inside a callback is refused"
    );

    r.dev.power_down().unwrap();
    assert_eq!(r.dev.power_state(), PowerState::D3);
    let down = take_log();
    assert_eq!(
        without_dma(&down),
        ["smio_suspend", "pre_irq_disabled", "d0_exit"]
    );
    dma_block_between(&down, "smio_suspend", "pre_irq_disabled");
    assert!(down.contains(&"dma stop") && down.contains(&"dma flush"));

    // Later power-ups restart self-managed I/O instead of initializing it.
    r.dev.power_up().unwrap();
    assert_eq!(without_dma(&take_log()).last(), Some(&"smio_restart"));
    drop(waiting);
    r.finish();
}

#[test]
fn transitions_from_the_wrong_state_are_refused() {
    let _serial = serial();
    let r = rig();
    assert_eq!(r.dev.power_down(), Err(Error::InvalidDeviceState));
    r.dev.power_up().unwrap();
    assert_eq!(r.dev.power_up(), Err(Error::InvalidDeviceState));
    let dma = DmaDevice::new(r.sim.clone());
    assert_eq!(
        r.dev.attach_dma(&dma),
        Err(Error::InvalidDeviceState),
        "in D0"
    );
    take_log();
    r.dev.delete().unwrap();
    let down = take_log();
    assert_eq!(
        without_dma(&down),
        ["smio_suspend", "pre_irq_disabled", "d0_exit"],
        "delete powers the device down first"
    );
    dma_block_between(&down, "smio_suspend", "pre_irq_disabled");
    assert_eq!(r.dev.power_up(), Err(Error::InvalidDeviceState));
    assert_eq!(r.dev.attach_dma(&dma), Err(Error::InvalidDeviceState));
    assert_eq!(
        r.dev.set_pnp_power_callbacks(PnpPowerCallbacks::default()),
        Err(Error::InvalidDeviceState)
    );
    r.finish();
}

#[test]
fn a_failed_post_interrupts_enabled_undoes_d0_entry() {
    let _serial = serial();
    let r = rig();
    r.dev.context().fail_post.store(true, Ordering::SeqCst);
    assert_eq!(r.dev.power_up(), Err(Error::Unsuccessful));
    assert_eq!(take_log(), ["d0_entry", "post_irq_enabled", "d0_exit"]);
    assert_eq!(r.dev.power_state(), PowerState::D3);
    assert!(!interrupts_on(&r.dev));
    // Another attempt works, and it is the first power-up: self-managed I/O initializes.
    r.dev.context().fail_post.store(false, Ordering::SeqCst);
    r.dev.power_up().unwrap();
    assert_eq!(without_dma(&take_log()).last(), Some(&"smio_init"));
    r.finish();
}

#[test]
fn a_failed_dma_power_up_undoes_the_steps_before_it() {
    let _serial = serial();
    let r = rig();
    let waiting = r
        .queue
        .submit(RequestSpec::read(buffer(&r.sim, 64)))
        .unwrap();
    FAIL_FILL.store(true, Ordering::SeqCst);
    assert_eq!(r.dev.power_up(), Err(Error::InsufficientResources));
    let log = take_log();
    assert_eq!(
        without_dma(&log),
        [
            "d0_entry",
            "post_irq_enabled",
            "pre_irq_disabled",
            "d0_exit"
        ]
    );
    assert!(
        log.contains(&"dma fill") && !log.contains(&"dma enable"),
        "{log:?}"
    );
    assert_eq!(r.dev.power_state(), PowerState::D3);
    assert!(waiting.try_completed().is_none(), "the queue still holds");
    FAIL_FILL.store(false, Ordering::SeqCst);
    r.dev.power_up().unwrap();
    assert!(waiting.try_completed().is_some());
    drop(waiting);
    r.finish();
}

#[test]
fn a_failed_self_managed_io_init_powers_everything_down_again() {
    let _serial = serial();
    let r = rig();
    r.dev.context().fail_init.store(true, Ordering::SeqCst);
    assert_eq!(r.dev.power_up(), Err(Error::InsufficientResources));
    let log = take_log();
    assert_eq!(
        without_dma(&log),
        [
            "d0_entry",
            "post_irq_enabled",
            "smio_init",
            "pre_irq_disabled",
            "d0_exit"
        ]
    );
    let init = log.iter().position(|e| *e == "smio_init").unwrap();
    dma_block_between(&log[init..], "smio_init", "pre_irq_disabled");
    assert_eq!(r.dev.power_state(), PowerState::D3);
    let held = r
        .queue
        .submit(RequestSpec::read(buffer(&r.sim, 64)))
        .unwrap();
    assert!(held.try_completed().is_none(), "queues hold again");
    drop(held);
    r.finish();
}

#[test]
fn a_failed_power_down_step_still_runs_the_rest() {
    let _serial = serial();
    let r = rig();
    r.dev.power_up().unwrap();
    take_log();
    r.dev.context().fail_suspend.store(true, Ordering::SeqCst);
    assert_eq!(r.dev.power_down(), Err(Error::IoTimeout));
    assert_eq!(
        without_dma(&take_log()),
        ["smio_suspend", "pre_irq_disabled", "d0_exit"]
    );
    assert_eq!(r.dev.power_state(), PowerState::D3);
    r.finish();
}

/// A context that keeps an interrupt created during power-up.
#[derive(Default)]
struct Late {
    interrupt: std::sync::Mutex<Option<dmatx_runtime::Interrupt<Late>>>,
}

fn late_isr(_: &dmatx_runtime::Interrupt<Late>, _: u32) -> bool {
    true
}

fn create_interrupt_late(device: &Device<Late>) -> dmatx::Result<()> {
    let interrupt = dmatx_runtime::Interrupt::create(
        device,
        dmatx_runtime::InterruptConfig {
            isr: late_isr,
            dpc: None,
        },
    )?;
    *device.context().interrupt.lock().unwrap() = Some(interrupt);
    Ok(())
}

#[test]
fn an_interrupt_created_after_interrupts_are_enabled_is_enabled_in_d0() {
    // Created in EvtDeviceD0EntryPostInterruptsEnabled: the device's interrupts are already
    // on, so the new one must be too (and off again after power-down).
    let device = Device::new(Late::default());
    device
        .set_pnp_power_callbacks(PnpPowerCallbacks {
            d0_entry_post_interrupts_enabled: Some(create_interrupt_late),
            ..PnpPowerCallbacks::default()
        })
        .unwrap();
    device.power_up().unwrap();
    let interrupt = device.context().interrupt.lock().unwrap().take().unwrap();
    assert!(interrupt.is_enabled());
    assert_eq!(interrupt.raise(0), Ok(true), "the ISR runs");
    device.power_down().unwrap();
    assert!(!interrupt.is_enabled());
    device.delete().unwrap();
}

/// Set when the `Cyclic` context is freed (only one test makes one).
static LATE_FREED: AtomicBool = AtomicBool::new(false);

struct Freed;

impl Drop for Freed {
    fn drop(&mut self) {
        LATE_FREED.store(true, Ordering::SeqCst);
    }
}

/// A context holding its own device's interrupt: a reference cycle.
struct Cyclic {
    interrupt: std::sync::Mutex<Option<dmatx_runtime::Interrupt<Cyclic>>>,
    _freed: Freed,
}

fn cyclic_isr(_: &dmatx_runtime::Interrupt<Cyclic>, _: u32) -> bool {
    false
}

fn cyclic_cleanup(device: &Device<Cyclic>) {
    drop(device.context().interrupt.lock().unwrap().take());
}

#[test]
fn the_cleanup_callback_runs_last_at_delete_and_breaks_a_context_cycle() {
    let device = Device::new(Cyclic {
        interrupt: std::sync::Mutex::new(None),
        _freed: Freed,
    });
    let interrupt = dmatx_runtime::Interrupt::create(
        &device,
        dmatx_runtime::InterruptConfig {
            isr: cyclic_isr,
            dpc: None,
        },
    )
    .unwrap();
    *device.context().interrupt.lock().unwrap() = Some(interrupt);
    device.set_cleanup_callback(cyclic_cleanup).unwrap();
    device.power_up().unwrap();
    assert!(
        device.context().interrupt.lock().unwrap().is_some(),
        "not before delete"
    );
    device.delete().unwrap();
    assert!(
        device.context().interrupt.lock().unwrap().is_none(),
        "cleanup ran"
    );
    assert_eq!(
        device.set_cleanup_callback(cyclic_cleanup),
        Err(Error::InvalidDeviceState)
    );
    drop(device);
    assert!(LATE_FREED.load(Ordering::SeqCst), "the context was freed");
}
