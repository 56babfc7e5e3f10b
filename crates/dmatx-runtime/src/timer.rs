//! One-shot timers (WDFTIMER: `WdfTimerCreate`, `WdfTimerStart`, `WdfTimerStop`). The callback
//! runs on a worker thread the timer owns.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use dmatx::{Error, Result};

use crate::device::{Device, WorkerControl};
use crate::sync::{Worker, lock, misuse, verify, wait, wait_for};

/// The timer callback (`EvtTimerFunc`).
pub type TimerCallback<X> = fn(&Timer<X>);

/// How to create a timer (`WDF_TIMER_CONFIG`, one-shot).
pub struct TimerConfig<X> {
    /// `EvtTimerFunc`.
    pub callback: TimerCallback<X>,
}

impl<X> Clone for TimerConfig<X> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<X> Copy for TimerConfig<X> {}

impl<X> fmt::Debug for TimerConfig<X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerConfig").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct TimerState {
    due: Option<Instant>,
    started_ever: bool,
    running: bool,
    stop: bool,
    deleted: bool,
}

#[derive(Default)]
struct Core {
    state: Mutex<TimerState>,
    changed: Condvar,
    fired: AtomicU64,
    panics: AtomicU64,
}

struct TimerShared<X> {
    core: Arc<Core>,
    device: Device<X>,
    config: TimerConfig<X>,
    worker: Worker,
}

/// A one-shot timer. Cheap to clone; clones name the same timer.
pub struct Timer<X> {
    shared: Arc<TimerShared<X>>,
}

impl<X> Clone for Timer<X> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<X> fmt::Debug for Timer<X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timer").finish_non_exhaustive()
    }
}

const TIMER: &str = "timer";

impl<X: Send + Sync + 'static> Timer<X> {
    /// Create a timer on `device` (`WdfTimerCreate`) and start its worker thread. Periodic
    /// timers are not provided: a callback restarts its timer to repeat.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] after the device was deleted;
    /// [`Error::InsufficientResources`] if the worker thread cannot be started or the device's
    /// low-memory knob refuses the creation ([`Device::fail_next_allocations`]).
    pub fn create(device: &Device<X>, config: TimerConfig<X>) -> Result<Self> {
        device.check_allocation()?;
        let shared = Arc::new(TimerShared {
            core: Arc::new(Core::default()),
            device: device.clone(),
            config,
            worker: Worker::default(),
        });
        let weak = Arc::downgrade(&shared);
        let core = Arc::clone(&shared.core);
        shared
            .worker
            .start("dmatx-timer", move || timer_worker(&core, &weak))?;
        let control: Weak<dyn WorkerControl> = Arc::downgrade(&shared) as Weak<dyn WorkerControl>;
        if let Err(e) = device.register_timer(control) {
            shared.shutdown();
            return Err(e);
        }
        Ok(Self { shared })
    }

    /// The timer's device.
    pub fn device(&self) -> &Device<X> {
        &self.shared.device
    }

    /// Whether `other` names the same timer (a callback shared by several timers tells them
    /// apart with it).
    pub fn same_timer(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Queue the timer to fire once after `due` (`WdfTimerStart`). `Ok(true)` if it was already
    /// queued: it is restarted with the new due time (WDF returns TRUE there too).
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] after the device was deleted.
    pub fn start(&self, due: Duration) -> Result<bool> {
        let core = &self.shared.core;
        let mut st = lock(&core.state);
        if st.deleted {
            return Err(Error::InvalidDeviceState);
        }
        let was_queued = st.due.is_some();
        st.due = Some(Instant::now() + due);
        st.started_ever = true;
        drop(st);
        core.changed.notify_all();
        Ok(was_queued)
    }

    /// Dequeue the timer (`WdfTimerStop`). `Ok(true)`: it was queued, and its callback will
    /// not run for that start. `Ok(false)`: it was not queued (it already fired, maybe its
    /// callback is running). With `wait`, also wait until a running callback returns
    /// (`Wait = TRUE`).
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] if the timer was never started (WDF returns FALSE: dmatx
    /// reports it, since stopping a timer that was never started usually means the driver
    /// lost track of its state) or after the device was deleted. [`Error::ObjectMisuse`] for
    /// `wait` from inside the timer's own callback, which would wait for itself (the timer is
    /// left as it was).
    ///
    /// # Panics
    /// On that misuse when the device's verifier is on.
    pub fn stop(&self, wait_for_callback: bool) -> Result<bool> {
        let result = self.stop_inner(wait_for_callback);
        verify(self.shared.device.verifier(), result)
    }

    fn stop_inner(&self, wait_for_callback: bool) -> Result<bool> {
        let core = &self.shared.core;
        if wait_for_callback && self.on_worker() {
            return Err(misuse(
                TIMER,
                "WdfTimerStop",
                "in its callback",
                "stop with wait from the timer's own callback would wait for itself",
            ));
        }
        let mut st = lock(&core.state);
        if st.deleted || !st.started_ever {
            return Err(Error::InvalidDeviceState);
        }
        let was_queued = st.due.take().is_some();
        if was_queued {
            core.changed.notify_all();
        }
        if wait_for_callback {
            while st.running {
                st = wait(&core.changed, st);
            }
        }
        Ok(was_queued)
    }

    fn on_worker(&self) -> bool {
        self.shared.worker.is_current()
    }

    /// Whether the timer is queued.
    pub fn is_queued(&self) -> bool {
        lock(&self.shared.core.state).due.is_some()
    }

    /// How many times the callback has run to its end.
    pub fn fired(&self) -> u64 {
        // ORDERING: a statistic, incremented before `running` clears under the lock.
        self.shared.core.fired.load(Ordering::Relaxed)
    }

    /// How many callback calls panicked (the worker goes on).
    pub fn callback_panics(&self) -> u64 {
        // ORDERING: a statistic.
        self.shared.core.panics.load(Ordering::Relaxed)
    }

    /// Wait until the timer is neither queued nor running, at most `timeout`; `true` if it
    /// became idle.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let core = &self.shared.core;
        let deadline = Instant::now() + timeout;
        let mut st = lock(&core.state);
        loop {
            if st.due.is_none() && !st.running {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = wait_for(&core.changed, st, deadline - now);
        }
    }
}

fn timer_worker<X: Send + Sync + 'static>(core: &Core, timer: &Weak<TimerShared<X>>) {
    loop {
        let mut st = lock(&core.state);
        loop {
            if st.stop {
                return;
            }
            match st.due {
                None => st = wait(&core.changed, st),
                Some(due) => {
                    let now = Instant::now();
                    if now >= due {
                        break;
                    }
                    st = wait_for(&core.changed, st, due - now);
                }
            }
        }
        st.due = None;
        st.running = true;
        drop(st);
        if let Some(shared) = timer.upgrade() {
            let callback = shared.config.callback;
            let handle = Timer { shared };
            if catch_unwind(AssertUnwindSafe(|| callback(&handle))).is_err() {
                // ORDERING: a statistic.
                core.panics.fetch_add(1, Ordering::Relaxed);
            }
        }
        // ORDERING: a statistic; published with `running` by the lock below.
        core.fired.fetch_add(1, Ordering::Relaxed);
        lock(&core.state).running = false;
        core.changed.notify_all();
    }
}

impl<X> TimerShared<X> {
    fn stop_worker(&self) {
        {
            let mut st = lock(&self.core.state);
            st.stop = true;
            st.due = None;
        }
        self.core.changed.notify_all();
        self.worker.join();
    }
}

impl<X: Send + Sync + 'static> WorkerControl for TimerShared<X> {
    fn shutdown(&self) {
        lock(&self.core.state).deleted = true;
        self.stop_worker();
    }
}

impl<X> Drop for TimerShared<X> {
    fn drop(&mut self) {
        self.stop_worker();
    }
}
