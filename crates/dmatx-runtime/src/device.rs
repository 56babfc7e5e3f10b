//! The device (WDFDEVICE): typed context, PnP/power callbacks in WDF's order, and delete.
//!
//! Power-up runs, in this order: `d0_entry` → the device's interrupts are enabled →
//! `d0_entry_post_interrupts_enabled` → each attached DMA device's `power_up` (its enablers'
//! fill, enable and self-managed-I/O-start callbacks) → power-managed queues restart →
//! `self_managed_io_init` (first power-up) or `self_managed_io_restart` (later ones).
//! Power-down runs the reverse: `self_managed_io_suspend` → power-managed queues stop → each
//! DMA device's `power_down` → `d0_exit_pre_interrupts_disabled` → interrupts disabled →
//! `d0_exit`.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use dmatx::hal::{FailurePlan, Platform};
use dmatx::{DmaDevice, Error, Result};

use crate::sync::lock;

/// How to build a [`Device`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Verifier mode for the device's objects: a misuse ([`Error::ObjectMisuse`]) also panics
    /// with its diagnostic, after every runtime lock is released. `None`: on in debug builds.
    pub verifier: Option<bool>,
}

impl DeviceConfig {
    /// This configuration with verifier mode set to `on`.
    pub const fn with_verifier(mut self, on: bool) -> Self {
        self.verifier = Some(on);
        self
    }
}

/// The device's power state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PowerState {
    /// Working: interrupts enabled, power-managed queues delivering.
    D0,
    /// Off (also the state of a new device, before its first power-up, and after delete).
    D3,
}

/// A PnP/power callback: `Err` fails the transition.
pub type PnpPowerCallback<X> = fn(&Device<X>) -> Result<()>;

/// The driver's PnP/power callbacks (`WDF_PNPPOWER_EVENT_CALLBACKS`); each is optional.
pub struct PnpPowerCallbacks<X> {
    /// `EvtDeviceD0Entry`: the device entered D0; interrupts are still disabled.
    pub d0_entry: Option<PnpPowerCallback<X>>,
    /// `EvtDeviceD0EntryPostInterruptsEnabled`: interrupts were just enabled.
    pub d0_entry_post_interrupts_enabled: Option<PnpPowerCallback<X>>,
    /// `EvtDeviceSelfManagedIoInit`: the first power-up, after queues started.
    pub self_managed_io_init: Option<PnpPowerCallback<X>>,
    /// `EvtDeviceSelfManagedIoRestart`: every later power-up, after queues restarted.
    pub self_managed_io_restart: Option<PnpPowerCallback<X>>,
    /// `EvtDeviceSelfManagedIoSuspend`: the first step of power-down.
    pub self_managed_io_suspend: Option<PnpPowerCallback<X>>,
    /// `EvtDeviceD0ExitPreInterruptsDisabled`: interrupts are about to be disabled.
    pub d0_exit_pre_interrupts_disabled: Option<PnpPowerCallback<X>>,
    /// `EvtDeviceD0Exit`: the last step of power-down; interrupts are disabled.
    pub d0_exit: Option<PnpPowerCallback<X>>,
}

impl<X> Default for PnpPowerCallbacks<X> {
    fn default() -> Self {
        Self {
            d0_entry: None,
            d0_entry_post_interrupts_enabled: None,
            self_managed_io_init: None,
            self_managed_io_restart: None,
            self_managed_io_suspend: None,
            d0_exit_pre_interrupts_disabled: None,
            d0_exit: None,
        }
    }
}

impl<X> Clone for PnpPowerCallbacks<X> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<X> Copy for PnpPowerCallbacks<X> {}

impl<X> fmt::Debug for PnpPowerCallbacks<X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PnpPowerCallbacks").finish_non_exhaustive()
    }
}

/// What power and delete need of an attached DMA device, whatever its platform.
trait DmaPower: Send + Sync {
    fn power_up(&self) -> Result<()>;
    fn power_down(&self) -> Result<()>;
    fn delete(&self);
}

impl<P: Platform> DmaPower for DmaDevice<P> {
    fn power_up(&self) -> Result<()> {
        DmaDevice::power_up(self)
    }

    fn power_down(&self) -> Result<()> {
        DmaDevice::power_down(self)
    }

    fn delete(&self) {
        DmaDevice::delete(self);
    }
}

/// What power and delete need of a queue.
pub(crate) trait QueueControl: Send + Sync {
    /// Start (`true`) or stop (`false`) a power-managed queue; others ignore it.
    fn set_powered(&self, switch: Switch);
    /// Delete: complete waiting requests with `Cancelled` and cancel delivered ones.
    fn purge(&self);
}

/// What power and delete need of an interrupt or a timer.
pub(crate) trait WorkerControl: Send + Sync {
    /// Enable or disable (interrupts only).
    fn set_enabled(&self, _switch: Switch) {}
    /// Delete: refuse further calls, stop the worker thread and join it (unless called on it).
    fn shutdown(&self);
}

/// A power-driven on/off setting with the generation that produced it. The device bumps the
/// generation under its lock at each change; an object applies a switch only if it is not
/// older than the last one it applied, so an object created during a transition (which reads
/// the current switch when it registers) can never be left with a stale value by a change
/// that raced its registration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Switch {
    pub(crate) generation: u64,
    pub(crate) on: bool,
}

impl Switch {
    /// Apply `self` to `current` if it is not older; whether it was applied.
    pub(crate) fn apply_to(self, current: &mut Switch) -> bool {
        if self.generation >= current.generation {
            *current = self;
            true
        } else {
            false
        }
    }
}

struct DevState<X> {
    power: PowerState,
    /// The interrupts' and the power-managed queues' current switches.
    interrupts_on: Switch,
    queues_on: Switch,
    deleted: bool,
    started_once: bool,
    callbacks: PnpPowerCallbacks<X>,
    cleanup: Option<fn(&Device<X>)>,
    dma: Vec<Arc<dyn DmaPower>>,
    queues: Vec<Weak<dyn QueueControl>>,
    interrupts: Vec<Weak<dyn WorkerControl>>,
    timers: Vec<Weak<dyn WorkerControl>>,
}

pub(crate) struct DeviceShared<X> {
    context: X,
    verifier: bool,
    /// The low-memory knob: which object creations fail.
    faults: Mutex<FailurePlan>,
    /// Set while a power transition or delete runs; transitions do not nest or overlap.
    transition: AtomicBool,
    state: Mutex<DevState<X>>,
}

/// A device with a typed context (WDFDEVICE). Cheap to clone; clones name the same device.
///
/// Queues, interrupts and timers hold their device; the device reaches them only weakly, so
/// dropping every handle frees everything and joins every worker thread. A context that holds
/// the device's own objects (a common pattern: the interrupt in the device context) forms a
/// reference cycle. [`Device::delete`] stops those objects and returns every platform resource,
/// but their memory and the context's stay until the cycle is broken: keep such handles in a
/// slot the driver empties in its cleanup callback ([`Device::set_cleanup_callback`], WDF's
/// `EvtCleanupCallback`), which delete runs last.
pub struct Device<X> {
    pub(crate) shared: Arc<DeviceShared<X>>,
}

impl<X> Clone for Device<X> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<X> fmt::Debug for Device<X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = lock(&self.shared.state);
        f.debug_struct("Device")
            .field("power", &st.power)
            .field("deleted", &st.deleted)
            .finish_non_exhaustive()
    }
}

/// Clears the transition flag on every path out of a transition.
struct Transition<'a>(&'a AtomicBool);

impl Drop for Transition<'_> {
    fn drop(&mut self) {
        // ORDERING: Release publishes the transition's effects to the next one's Acquire.
        self.0.store(false, Ordering::Release);
    }
}

fn run<X>(device: &Device<X>, callback: Option<PnpPowerCallback<X>>) -> Result<()> {
    callback.map_or(Ok(()), |f| f(device))
}

impl<X: Send + Sync + 'static> Device<X> {
    /// A device with context `context` and the default configuration. It starts in
    /// [`PowerState::D3`]; [`Device::power_up`] brings it to D0.
    pub fn new(context: X) -> Self {
        Self::with_config(context, DeviceConfig::default())
    }

    /// A device with context `context` and configuration `config`.
    pub fn with_config(context: X, config: DeviceConfig) -> Self {
        Self {
            shared: Arc::new(DeviceShared {
                context,
                verifier: config.verifier.unwrap_or(cfg!(debug_assertions)),
                faults: Mutex::new(FailurePlan::default()),
                transition: AtomicBool::new(false),
                state: Mutex::new(DevState {
                    power: PowerState::D3,
                    interrupts_on: Switch::default(),
                    queues_on: Switch::default(),
                    deleted: false,
                    started_once: false,
                    callbacks: PnpPowerCallbacks::default(),
                    cleanup: None,
                    dma: Vec::new(),
                    queues: Vec::new(),
                    interrupts: Vec::new(),
                    timers: Vec::new(),
                }),
            }),
        }
    }

    /// The device context (`WdfObjectGetTypedContext`).
    pub fn context(&self) -> &X {
        &self.shared.context
    }

    /// Whether verifier mode is on for this device's objects.
    pub fn verifier(&self) -> bool {
        self.shared.verifier
    }

    /// Whether `other` is a handle to the same device.
    pub fn same_device(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// The device's power state.
    pub fn power_state(&self) -> PowerState {
        lock(&self.shared.state).power
    }

    /// Whether [`Device::delete`] has run.
    pub fn is_deleted(&self) -> bool {
        lock(&self.shared.state).deleted
    }

    /// Set the PnP/power callbacks (`WdfDeviceInitSetPnpPowerEventCallbacks`); they apply from
    /// the next transition.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] after delete.
    pub fn set_pnp_power_callbacks(&self, callbacks: PnpPowerCallbacks<X>) -> Result<()> {
        let mut st = lock(&self.shared.state);
        if st.deleted {
            return Err(Error::InvalidDeviceState);
        }
        st.callbacks = callbacks;
        Ok(())
    }

    /// Attach a DMA device, so power transitions reach its enablers and delete deletes it.
    /// Attach before the first power-up, as a WDF driver creates its enablers in
    /// `EvtDriverDeviceAdd` or `EvtDevicePrepareHardware`. DMA devices power up in attach order
    /// and down in reverse order.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] after delete, or while the device is in D0 (the DMA device
    /// would miss its power-up).
    pub fn attach_dma<P: Platform>(&self, dma: &DmaDevice<P>) -> Result<()> {
        let mut st = lock(&self.shared.state);
        // ORDERING: a transition sets the flag before it reads `dma` under this lock.
        let transitioning = self.shared.transition.load(Ordering::Acquire);
        if st.deleted || st.power == PowerState::D0 || transitioning {
            return Err(Error::InvalidDeviceState);
        }
        st.dma.push(Arc::new(dma.clone()));
        Ok(())
    }

    fn begin_transition(&self) -> Result<Transition<'_>> {
        // ORDERING: Acquire pairs with the Release in `Transition::drop`.
        self.shared
            .transition
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .map_err(|_| Error::InvalidDeviceState)?;
        Ok(Transition(&self.shared.transition))
    }

    fn set_interrupts(&self, on: bool) {
        let (switch, interrupts) = {
            let mut st = lock(&self.shared.state);
            st.interrupts_on = Switch {
                generation: st.interrupts_on.generation + 1,
                on,
            };
            let live: Vec<_> = st.interrupts.iter().filter_map(Weak::upgrade).collect();
            (st.interrupts_on, live)
        };
        for i in interrupts {
            i.set_enabled(switch);
        }
    }

    fn set_queues(&self, on: bool) {
        let (switch, queues) = {
            let mut st = lock(&self.shared.state);
            st.queues_on = Switch {
                generation: st.queues_on.generation + 1,
                on,
            };
            let live: Vec<_> = st.queues.iter().filter_map(Weak::upgrade).collect();
            (st.queues_on, live)
        };
        for q in queues {
            q.set_powered(switch);
        }
    }

    /// Bring the device to D0, running the power-up order of the module documentation.
    /// Power-managed queues deliver the requests they held once the DMA devices are up.
    ///
    /// If a step fails, the steps that succeeded are undone in reverse order (their power-down
    /// counterparts run; their errors are ignored) and the device stays in D3, ready for
    /// another attempt. WDF also undoes them but then treats the device as failed and removes
    /// it; dmatx leaves that decision to the caller.
    ///
    /// # Errors
    /// The failing callback's or DMA device's error; [`Error::InvalidDeviceState`] if the device
    /// is already in D0, was deleted, or another transition is running (including a call from
    /// inside a power callback).
    pub fn power_up(&self) -> Result<()> {
        let _transition = self.begin_transition()?;
        let (callbacks, dma, first) = {
            let st = lock(&self.shared.state);
            if st.deleted || st.power == PowerState::D0 {
                return Err(Error::InvalidDeviceState);
            }
            (st.callbacks, st.dma.clone(), !st.started_once)
        };
        run(self, callbacks.d0_entry)?;
        self.set_interrupts(true);
        if let Err(e) = run(self, callbacks.d0_entry_post_interrupts_enabled) {
            self.set_interrupts(false);
            let _ = run(self, callbacks.d0_exit);
            return Err(e);
        }
        for (i, d) in dma.iter().enumerate() {
            if let Err(e) = d.power_up() {
                // The failing DMA device powers down too: its enablers' records say which
                // of their steps ran (the core skips what never came up).
                for up in dma[..=i].iter().rev() {
                    let _ = up.power_down();
                }
                let _ = run(self, callbacks.d0_exit_pre_interrupts_disabled);
                self.set_interrupts(false);
                let _ = run(self, callbacks.d0_exit);
                return Err(e);
            }
        }
        lock(&self.shared.state).power = PowerState::D0;
        self.set_queues(true);
        let self_managed = if first {
            callbacks.self_managed_io_init
        } else {
            callbacks.self_managed_io_restart
        };
        if let Err(e) = run(self, self_managed) {
            self.set_queues(false);
            lock(&self.shared.state).power = PowerState::D3;
            for d in dma.iter().rev() {
                let _ = d.power_down();
            }
            let _ = run(self, callbacks.d0_exit_pre_interrupts_disabled);
            self.set_interrupts(false);
            let _ = run(self, callbacks.d0_exit);
            return Err(e);
        }
        lock(&self.shared.state).started_once = true;
        Ok(())
    }

    /// Take the device to D3, running the power-down order of the module documentation.
    /// Requests already delivered stay with the driver; power-managed queues hold new ones.
    ///
    /// Every step runs even if an earlier one fails, and the device ends in D3 (WDF, too, goes
    /// on powering down, then reports the device failed).
    ///
    /// # Errors
    /// The first step's error; [`Error::InvalidDeviceState`] if the device is not in D0, was
    /// deleted, or another transition is running.
    pub fn power_down(&self) -> Result<()> {
        let _transition = self.begin_transition()?;
        {
            let st = lock(&self.shared.state);
            if st.deleted || st.power != PowerState::D0 {
                return Err(Error::InvalidDeviceState);
            }
        }
        self.power_down_steps()
    }

    fn power_down_steps(&self) -> Result<()> {
        let (callbacks, dma) = {
            let st = lock(&self.shared.state);
            (st.callbacks, st.dma.clone())
        };
        let mut first = Ok(());
        let mut note = |r: Result<()>| {
            if first.is_ok() {
                first = r;
            }
        };
        note(run(self, callbacks.self_managed_io_suspend));
        self.set_queues(false);
        lock(&self.shared.state).power = PowerState::D3;
        for d in dma.iter().rev() {
            note(d.power_down());
        }
        note(run(self, callbacks.d0_exit_pre_interrupts_disabled));
        self.set_interrupts(false);
        note(run(self, callbacks.d0_exit));
        first
    }

    /// Delete the device (`WdfObjectDelete`, as on surprise removal): power it down if it is in
    /// D0; complete every request still waiting in a queue with [`Error::Cancelled`] and cancel
    /// the requests the driver holds (their cancel callbacks run on this thread; the driver
    /// still completes the ones it holds that are not cancelable); stop and join every timer
    /// and DPC worker (a queued DPC runs first; a queued timer is cancelled; from inside a
    /// callback its own worker is not joined, it ends when the callback returns); delete the
    /// attached DMA devices. Afterwards calls on the device's objects return
    /// [`Error::InvalidDeviceState`], except completing requests the driver still holds.
    ///
    /// # Errors
    /// The power-down's first error (everything else is still done);
    /// [`Error::InvalidDeviceState`] if the device was already deleted or a power transition is
    /// running.
    pub fn delete(&self) -> Result<()> {
        let _transition = self.begin_transition()?;
        let was_on = {
            let mut st = lock(&self.shared.state);
            if st.deleted {
                return Err(Error::InvalidDeviceState);
            }
            st.deleted = true;
            st.power == PowerState::D0
        };
        let powered_down = if was_on {
            self.power_down_steps()
        } else {
            Ok(())
        };
        let (queues, timers, interrupts, dma) = {
            let mut st = lock(&self.shared.state);
            st.power = PowerState::D3;
            (
                std::mem::take(&mut st.queues),
                std::mem::take(&mut st.timers),
                std::mem::take(&mut st.interrupts),
                std::mem::take(&mut st.dma),
            )
        };
        for q in queues.iter().filter_map(Weak::upgrade) {
            q.purge();
        }
        for w in timers.iter().chain(&interrupts).filter_map(Weak::upgrade) {
            w.shutdown();
        }
        for d in dma.iter().rev() {
            d.delete();
        }
        let cleanup = lock(&self.shared.state).cleanup.take();
        if let Some(cleanup) = cleanup {
            cleanup(self);
        }
        powered_down
    }

    /// Set the cleanup callback (`EvtCleanupCallback` of the device's object attributes): run
    /// once, last, by [`Device::delete`], after every queue, interrupt and timer has stopped
    /// and the DMA devices are deleted. Drop the handles of the device's objects that the
    /// context keeps here, so the context and they are freed when the last device handle goes.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] after delete.
    pub fn set_cleanup_callback(&self, cleanup: fn(&Device<X>)) -> Result<()> {
        let mut st = lock(&self.shared.state);
        if st.deleted {
            return Err(Error::InvalidDeviceState);
        }
        st.cleanup = Some(cleanup);
        Ok(())
    }

    /// Register a queue; `Ok(powered)` says whether it may deliver now.
    pub(crate) fn register_queue(
        &self,
        queue: Weak<dyn QueueControl>,
        power_managed: bool,
    ) -> Result<Switch> {
        let mut st = lock(&self.shared.state);
        if st.deleted {
            return Err(Error::InvalidDeviceState);
        }
        st.queues.retain(|q| q.strong_count() > 0);
        st.queues.push(queue);
        Ok(if power_managed {
            st.queues_on
        } else {
            Switch {
                generation: 0,
                on: true,
            }
        })
    }

    /// Register an interrupt; `Ok(enabled)` says whether it starts enabled (device in D0).
    pub(crate) fn register_interrupt(&self, interrupt: Weak<dyn WorkerControl>) -> Result<Switch> {
        let mut st = lock(&self.shared.state);
        if st.deleted {
            return Err(Error::InvalidDeviceState);
        }
        st.interrupts.retain(|i| i.strong_count() > 0);
        st.interrupts.push(interrupt);
        Ok(st.interrupts_on)
    }

    /// Register a timer.
    pub(crate) fn register_timer(&self, timer: Weak<dyn WorkerControl>) -> Result<()> {
        let mut st = lock(&self.shared.state);
        if st.deleted {
            return Err(Error::InvalidDeviceState);
        }
        st.timers.retain(|t| t.strong_count() > 0);
        st.timers.push(timer);
        Ok(())
    }

    /// Make the next `n` object creations on this device fail with
    /// [`Error::InsufficientResources`] (the low-memory knob): queues, interrupts, timers and
    /// transactions created through [`crate::dma::create_transaction`]. It works on every
    /// platform, so a driver's low-memory paths can be tested on real hardware too; the
    /// simulator has its own knob for the DMA objects it backs.
    pub fn fail_next_allocations(&self, n: u64) {
        lock(&self.shared.faults).fail_next(n);
    }

    /// Make each object creation on this device fail with probability `probability` (0 turns
    /// it off), drawn from a generator seeded with `seed` so runs repeat.
    pub fn fail_allocations_randomly(&self, probability: f64, seed: u64) {
        lock(&self.shared.faults).fail_randomly(probability, seed);
    }

    /// Object creations the low-memory knob refused and allowed so far.
    pub fn allocation_counts(&self) -> (u64, u64) {
        lock(&self.shared.faults).counts()
    }

    /// An object is being created on this device: fails if the device was deleted or the
    /// low-memory knob says so.
    pub(crate) fn check_allocation(&self) -> Result<()> {
        self.check_alive()?;
        if lock(&self.shared.faults).refuse() {
            Err(Error::InsufficientResources)
        } else {
            Ok(())
        }
    }

    /// Fails with [`Error::InvalidDeviceState`] after delete.
    pub(crate) fn check_alive(&self) -> Result<()> {
        if self.is_deleted() {
            Err(Error::InvalidDeviceState)
        } else {
            Ok(())
        }
    }
}
