//! Interrupts (WDFINTERRUPT): the ISR under the interrupt lock, a DPC worker, and the lock
//! itself (`WdfInterruptQueueDpcForIsr`, `WdfInterruptAcquireLock`, `WdfInterruptSynchronize`).
//!
//! There is no interrupt controller: whatever plays the device (a device model, a test) calls
//! [`Interrupt::raise`] when the line is raised. The ISR runs on that thread, under the
//! interrupt lock; DPCs run on a worker thread the interrupt owns.

use std::collections::VecDeque;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use dmatx::{Error, Result};

use crate::device::{Device, Switch, WorkerControl};
use crate::sync::{OwnedGuard, OwnedLock, Worker, lock, misuse, verify, wait, wait_for};

/// The ISR (`EvtInterruptIsr`): the interrupt and the message ID; returns whether the device
/// was interrupting (the interrupt is claimed).
pub type Isr<X> = fn(&Interrupt<X>, u32) -> bool;

/// The DPC (`EvtInterruptDpc`).
pub type Dpc<X> = fn(&Interrupt<X>);

/// How to create an interrupt (`WDF_INTERRUPT_CONFIG`).
pub struct InterruptConfig<X> {
    /// `EvtInterruptIsr`.
    pub isr: Isr<X>,
    /// `EvtInterruptDpc`, if the driver queues DPCs.
    pub dpc: Option<Dpc<X>>,
}

impl<X> Clone for InterruptConfig<X> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<X> Copy for InterruptConfig<X> {}

impl<X> fmt::Debug for InterruptConfig<X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InterruptConfig")
            .field("dpc", &self.dpc.is_some())
            .finish_non_exhaustive()
    }
}

/// Counters of an interrupt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InterruptStats {
    /// ISR calls.
    pub isrs: u64,
    /// ISR calls that claimed the interrupt.
    pub claimed: u64,
    /// DPCs queued ([`Interrupt::queue_dpc`] returned `true`).
    pub dpcs_queued: u64,
    /// DPCs run.
    pub dpcs_run: u64,
    /// [`Interrupt::queue_dpc`] calls coalesced with a DPC already queued.
    pub dpcs_coalesced: u64,
    /// Raises while the interrupt was disabled (not delivered).
    pub raises_while_disabled: u64,
    /// Raises made while the raising thread held the interrupt lock, delivered when it
    /// released the lock.
    pub raises_deferred: u64,
    /// DPC calls that panicked (the worker goes on).
    pub dpc_panics: u64,
}

#[derive(Default)]
struct Counters {
    isrs: AtomicU64,
    claimed: AtomicU64,
    dpcs_queued: AtomicU64,
    dpcs_run: AtomicU64,
    dpcs_coalesced: AtomicU64,
    raises_while_disabled: AtomicU64,
    raises_deferred: AtomicU64,
    dpc_panics: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    // ORDERING: statistics; nothing is published through them.
    counter.fetch_add(1, Ordering::Relaxed);
}

#[derive(Default)]
struct DpcState {
    queued: bool,
    running: bool,
    stop: bool,
}

/// What the DPC worker shares with the interrupt (held strongly by the worker; the interrupt
/// itself only weakly, so dropping the last handle ends the worker).
#[derive(Default)]
struct Core {
    /// The interrupt lock.
    lock: OwnedLock,
    enabled: AtomicBool,
    /// The device's interrupt switch this interrupt last applied (under the interrupt lock).
    switch: Mutex<Switch>,
    deleted: AtomicBool,
    /// Message IDs raised while the raising thread held the interrupt lock.
    deferred: Mutex<VecDeque<u32>>,
    dpc: Mutex<DpcState>,
    dpc_changed: Condvar,
    counters: Counters,
}

struct InterruptShared<X> {
    core: Arc<Core>,
    device: Device<X>,
    config: InterruptConfig<X>,
    worker: Worker,
}

/// An interrupt. Cheap to clone; clones name the same interrupt.
pub struct Interrupt<X> {
    shared: Arc<InterruptShared<X>>,
}

impl<X> Clone for Interrupt<X> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<X> fmt::Debug for Interrupt<X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interrupt")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// Holding the interrupt lock ([`Interrupt::acquire_lock`]); dropping it releases the lock
/// (`WdfInterruptReleaseLock`) and then delivers the raises made meanwhile by this thread.
pub struct InterruptLockGuard<'a, X: Send + Sync + 'static> {
    interrupt: &'a Interrupt<X>,
    guard: Option<OwnedGuard<'a>>,
}

impl<X: Send + Sync + 'static> fmt::Debug for InterruptLockGuard<'_, X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InterruptLockGuard").finish_non_exhaustive()
    }
}

impl<X: Send + Sync + 'static> Drop for InterruptLockGuard<'_, X> {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.interrupt.deliver_deferred();
    }
}

const INTERRUPT: &str = "interrupt";

impl<X: Send + Sync + 'static> Interrupt<X> {
    /// Create an interrupt on `device` (`WdfInterruptCreate`) and start its DPC worker. It is
    /// enabled while the device is in D0 (create interrupts before the first power-up, as WDF
    /// drivers do in `EvtDriverDeviceAdd`).
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] after the device was deleted;
    /// [`Error::InsufficientResources`] if the worker thread cannot be started or the device's
    /// low-memory knob refuses the creation ([`Device::fail_next_allocations`]).
    pub fn create(device: &Device<X>, config: InterruptConfig<X>) -> Result<Self> {
        device.check_allocation()?;
        let shared = Arc::new(InterruptShared {
            core: Arc::new(Core::default()),
            device: device.clone(),
            config,
            worker: Worker::default(),
        });
        let weak = Arc::downgrade(&shared);
        let core = Arc::clone(&shared.core);
        shared
            .worker
            .start("dmatx-dpc", move || dpc_worker(&core, &weak))?;
        let control: Weak<dyn WorkerControl> = Arc::downgrade(&shared) as Weak<dyn WorkerControl>;
        let switch = match device.register_interrupt(control) {
            Ok(switch) => switch,
            Err(e) => {
                shared.shutdown();
                return Err(e);
            }
        };
        // A power change racing this registration carries a newer generation and wins.
        shared.apply(switch);
        Ok(Self { shared })
    }

    /// The interrupt's device (`WdfInterruptGetDevice`).
    pub fn device(&self) -> &Device<X> {
        &self.shared.device
    }

    fn check_alive(&self) -> Result<()> {
        // ORDERING: Acquire pairs with the Release in `shutdown`.
        if self.shared.core.deleted.load(Ordering::Acquire) {
            Err(Error::InvalidDeviceState)
        } else {
            Ok(())
        }
    }

    /// Whether the interrupt is enabled (the device is in D0).
    pub fn is_enabled(&self) -> bool {
        // ORDERING: a query; `raise` decides under the interrupt lock.
        self.shared.core.enabled.load(Ordering::Relaxed)
    }

    /// The device raised the interrupt line with message `message_id`: run the ISR under the
    /// interrupt lock and return its answer.
    ///
    /// While the interrupt is disabled the raise is counted
    /// ([`InterruptStats::raises_while_disabled`]), not delivered, and `Ok(false)` is
    /// returned. dmatx does not latch it: a level-triggered line that stays asserted is
    /// modelled by raising again after power-up, as the device would keep interrupting. If
    /// this thread holds the interrupt lock (a `synchronize` closure, or program-DMA called
    /// under the lock, starting a device that completes at once), the raise is deferred like
    /// an interrupt masked at DIRQL: `Ok(false)` now, and the ISR runs when this thread
    /// releases the lock.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] after the device was deleted.
    pub fn raise(&self, message_id: u32) -> Result<bool> {
        self.check_alive()?;
        let core = &self.shared.core;
        let Some(guard) = core.lock.acquire() else {
            lock(&core.deferred).push_back(message_id);
            bump(&core.counters.raises_deferred);
            return Ok(false);
        };
        // ORDERING: written under the interrupt lock (`set_enabled`), read under it here.
        if !core.enabled.load(Ordering::Relaxed) {
            bump(&core.counters.raises_while_disabled);
            return Ok(false);
        }
        bump(&core.counters.isrs);
        // Under the interrupt lock, as the ISR; no other runtime lock is held here.
        let span = trace_span!(
            "interrupt.isr",
            message = message_id,
            claimed = ::tracing::field::Empty
        );
        let claimed = {
            let _entered = span.enter();
            let claimed = (self.shared.config.isr)(self, message_id);
            span.record("claimed", claimed);
            claimed
        };
        if claimed {
            bump(&core.counters.claimed);
        }
        drop(guard);
        self.deliver_deferred();
        Ok(claimed)
    }

    fn deliver_deferred(&self) {
        loop {
            let next = lock(&self.shared.core.deferred).pop_front();
            match next {
                Some(m) => {
                    let _ = self.raise(m);
                }
                None => return,
            }
        }
    }

    /// Queue the DPC (`WdfInterruptQueueDpcForIsr`). `Ok(false)` if it is already queued and
    /// not yet started: the two requests coalesce into one DPC run, as in WDF.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] after the device was deleted;
    /// [`Error::InvalidDeviceRequest`] if the interrupt has no DPC.
    pub fn queue_dpc(&self) -> Result<bool> {
        self.check_alive()?;
        if self.shared.config.dpc.is_none() {
            return Err(Error::InvalidDeviceRequest);
        }
        let core = &self.shared.core;
        let mut st = lock(&core.dpc);
        if st.queued {
            bump(&core.counters.dpcs_coalesced);
            return Ok(false);
        }
        st.queued = true;
        drop(st);
        bump(&core.counters.dpcs_queued);
        core.dpc_changed.notify_all();
        Ok(true)
    }

    /// Acquire the interrupt lock (`WdfInterruptAcquireLock`): while it is held, the ISR does
    /// not run (a raise from another thread waits for it).
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] after the device was deleted; [`Error::ObjectMisuse`] if
    /// this thread already holds it (from the ISR, or nested): the lock is not recursive.
    ///
    /// # Panics
    /// On that misuse when the device's verifier is on.
    pub fn acquire_lock(&self) -> Result<InterruptLockGuard<'_, X>> {
        self.check_alive()?;
        let result = match self.shared.core.lock.acquire() {
            Some(guard) => Ok(InterruptLockGuard {
                interrupt: self,
                guard: Some(guard),
            }),
            None => Err(misuse(
                INTERRUPT,
                "WdfInterruptAcquireLock",
                "lock held by this thread",
                "the interrupt lock is not recursive (called from the ISR or while holding it)",
            )),
        };
        verify(self.shared.device.verifier(), result)
    }

    /// Run `f` under the interrupt lock (`WdfInterruptSynchronize`) and return its result.
    ///
    /// # Errors
    /// As [`Interrupt::acquire_lock`].
    ///
    /// # Panics
    /// As [`Interrupt::acquire_lock`].
    pub fn synchronize<R>(&self, f: impl FnOnce() -> R) -> Result<R> {
        let guard = self.acquire_lock()?;
        let r = f();
        drop(guard);
        Ok(r)
    }

    /// The interrupt's counters.
    pub fn stats(&self) -> InterruptStats {
        let c = &self.shared.core.counters;
        // ORDERING: statistics.
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        InterruptStats {
            isrs: get(&c.isrs),
            claimed: get(&c.claimed),
            dpcs_queued: get(&c.dpcs_queued),
            dpcs_run: get(&c.dpcs_run),
            dpcs_coalesced: get(&c.dpcs_coalesced),
            raises_while_disabled: get(&c.raises_while_disabled),
            raises_deferred: get(&c.raises_deferred),
            dpc_panics: get(&c.dpc_panics),
        }
    }

    /// Wait until no DPC is queued or running, at most `timeout`; `true` if it became idle.
    /// (From inside the DPC this waits for itself and returns `false` after the timeout.)
    pub fn wait_dpc_idle(&self, timeout: Duration) -> bool {
        let core = &self.shared.core;
        let deadline = Instant::now() + timeout;
        let mut st = lock(&core.dpc);
        loop {
            if !st.queued && !st.running {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = wait_for(&core.dpc_changed, st, deadline - now);
        }
    }
}

fn dpc_worker<X: Send + Sync + 'static>(core: &Core, interrupt: &Weak<InterruptShared<X>>) {
    loop {
        let mut st = lock(&core.dpc);
        while !st.queued && !st.stop {
            st = wait(&core.dpc_changed, st);
        }
        if !st.queued {
            return;
        }
        st.queued = false;
        st.running = true;
        drop(st);
        if let Some(shared) = interrupt.upgrade()
            && let Some(dpc) = shared.config.dpc
        {
            let handle = Interrupt { shared };
            let span = trace_span!("interrupt.dpc");
            let outcome = {
                let _entered = span.enter();
                catch_unwind(AssertUnwindSafe(|| dpc(&handle)))
            };
            if outcome.is_err() {
                bump(&core.counters.dpc_panics);
            }
            bump(&core.counters.dpcs_run);
            // The handle (maybe the last one) is dropped here, before `running` clears.
        }
        lock(&core.dpc).running = false;
        core.dpc_changed.notify_all();
    }
}

impl<X> InterruptShared<X> {
    fn stop_worker(&self) {
        lock(&self.core.dpc).stop = true;
        self.core.dpc_changed.notify_all();
        self.worker.join();
    }
}

impl<X: Send + Sync + 'static> WorkerControl for InterruptShared<X> {
    fn set_enabled(&self, switch: Switch) {
        self.apply(switch);
    }

    fn shutdown(&self) {
        // ORDERING: Release pairs with the Acquire in `check_alive`.
        self.core.deleted.store(true, Ordering::Release);
        self.apply(Switch {
            generation: u64::MAX,
            on: false,
        });
        self.stop_worker();
    }
}

impl<X> InterruptShared<X> {
    /// Enable or disable unless a newer switch was applied. Under the interrupt lock, so no ISR
    /// runs after a disable returns; a thread that holds the lock itself (a power callback
    /// called from `synchronize`) sets it directly.
    fn apply(&self, switch: Switch) {
        let guard = self.core.lock.acquire();
        if switch.apply_to(&mut lock(&self.core.switch)) {
            // ORDERING: read under the interrupt lock in `raise`.
            self.core.enabled.store(switch.on, Ordering::Relaxed);
        }
        drop(guard);
    }
}

impl<X> Drop for InterruptShared<X> {
    fn drop(&mut self) {
        self.stop_worker();
    }
}
