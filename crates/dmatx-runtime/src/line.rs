//! A level-triggered interrupt line delivered from a thread: the interrupt controller of a
//! simulated board.
//!
//! A device model's line listener runs on whatever thread changed the line (often one holding
//! the interrupt lock: program-DMA starting an engine that finishes at once), so it must not
//! call the ISR itself. It calls [`LevelLine::edge`]'s closure, which only wakes this thread;
//! the thread calls [`Interrupt::raise`] again and again while the ISR claims and the line
//! stays asserted, as a level-triggered line keeps interrupting until the device is
//! acknowledged. The thread never holds the interrupt lock between raises. A real platform
//! delivers interrupts the same way from an eventfd (`dmatx-vfio`); `docs/quirks.md` 84.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Interrupt;
use crate::sync::{lock, wait};

#[derive(Default)]
struct State {
    /// An edge arrived since the thread last looked.
    pending: bool,
    /// The thread must end.
    stop: bool,
    /// A delivery is pending or running.
    busy: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn kick(&self) {
        let mut st = lock(&self.state);
        st.pending = true;
        st.busy = true;
        drop(st);
        self.changed.notify_all();
    }
}

/// A level-triggered line from a device model to an [`Interrupt`], served by its own thread.
/// Dropping it stops and joins the thread.
pub struct LevelLine {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    dpc_idle: Box<dyn Fn(Duration) -> bool + Send + Sync>,
}

impl std::fmt::Debug for LevelLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LevelLine")
            .field("busy", &self.is_busy())
            .finish_non_exhaustive()
    }
}

impl LevelLine {
    /// Start the thread `name`, delivering to `interrupt` (message 0) while `asserted()` says
    /// the device holds the line.
    ///
    /// # Errors
    /// The thread could not be started.
    pub fn spawn<X: Send + Sync + 'static>(
        name: &str,
        interrupt: &Interrupt<X>,
        asserted: impl Fn() -> bool + Send + 'static,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = Arc::clone(&shared);
            let interrupt = interrupt.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || deliver(&shared, &interrupt, &asserted))?
        };
        let dpc = interrupt.clone();
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
            dpc_idle: Box::new(move |timeout| dpc.wait_dpc_idle(timeout)),
        })
    }

    /// The listener to give the device model: called on each rising edge, it wakes the thread.
    pub fn edge(&self) -> impl Fn() + Send + Sync + 'static {
        let shared = Arc::clone(&self.shared);
        move || shared.kick()
    }

    /// Look at the line again now (after power-up, a line that stayed high is delivered).
    pub fn kick(&self) {
        self.shared.kick();
    }

    /// Whether a delivery is pending or running.
    pub fn is_busy(&self) -> bool {
        lock(&self.shared.state).busy
    }

    /// Wait until no delivery is pending or running and the interrupt's DPC is idle, at most
    /// `timeout`. `true` if everything settled.
    pub fn settle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_busy()
                && (self.dpc_idle)(deadline.saturating_duration_since(Instant::now()))
                && !self.is_busy()
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Stop the thread and wait for it (idempotent).
    pub fn stop(&self) {
        lock(&self.shared.state).stop = true;
        self.shared.changed.notify_all();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl Drop for LevelLine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The thread: wait for an edge, then raise while the ISR claims and the line stays high.
fn deliver<X: Send + Sync + 'static>(
    shared: &Shared,
    interrupt: &Interrupt<X>,
    asserted: &dyn Fn() -> bool,
) {
    loop {
        {
            let mut st = lock(&shared.state);
            loop {
                if st.stop {
                    return;
                }
                if st.pending {
                    st.pending = false;
                    break;
                }
                st.busy = false;
                st = wait(&shared.changed, st);
            }
        }
        // Not claimed (or the device is gone): the line is someone else's or stale; wait for
        // the next edge.
        while asserted() {
            if interrupt.raise(0) != Ok(true) {
                break;
            }
        }
    }
}
