//! Tracing: the core's events of `docs/TRACING.md` (its first table), through the `tracing`
//! crate, with the `tracing` feature.
//!
//! Without the feature every macro here expands to nothing, [`Guard`] is the plain lock guard
//! and no field, counter or check is compiled in.
//!
//! With it, the rule of `docs/DESIGN.md` ("How a transaction runs": no driver code under the
//! transaction's lock) covers subscribers too, since a subscriber is user code. So what happens
//! under the lock — state transitions, the platform's `allocate`, `map` and `flush`, and the
//! calls accepted there — is *recorded* in the transaction's [`Log`], and the lock's [`Guard`]
//! emits the records, in order, once the lock is released. Events at points where no lock is
//! held (`hal.free`, `tx.cancel`) and the program-DMA span are emitted directly. Nothing
//! allocates: the log is a fixed array inside the transaction, and with no subscriber listening
//! at DEBUG level nothing is even recorded (one relaxed load of `tracing`'s global level).

#[cfg(feature = "tracing")]
pub(crate) use on::*;

/// Emit a core event now: `trace_event!("tx.cancel", tx = id, cancelled)`. Call it with no
/// transaction lock held.
#[cfg(feature = "tracing")]
macro_rules! trace_event {
    ($name:literal, $($fields:tt)+) => {
        ::tracing::event!(
            name: $name,
            target: "dmatx",
            ::tracing::Level::DEBUG,
            $($fields)+
        )
    };
}

/// Without the `tracing` feature: nothing.
#[cfg(not(feature = "tracing"))]
macro_rules! trace_event {
    ($($any:tt)*) => {};
}

/// Record an event under the transaction's lock, for the guard to emit once the lock is
/// released: `trace_record!(g.trace, Flush { bytes })` (a variant of [`Deferred`]).
#[cfg(feature = "tracing")]
macro_rules! trace_record {
    ($log:expr, $($event:tt)+) => {
        if $crate::trace::listening() {
            // Built first: `$log` may borrow the guard mutably.
            let event = $crate::trace::Deferred::$($event)+;
            $log.push(event);
        }
    };
}

/// Without the `tracing` feature: nothing.
#[cfg(not(feature = "tracing"))]
macro_rules! trace_record {
    ($($any:tt)*) => {};
}

/// Enter a core span for the rest of the enclosing block:
/// `trace_enter!(_span, "tx.program_dma", tx = id, …)` binds the entered span to `_span`.
#[cfg(feature = "tracing")]
macro_rules! trace_enter {
    ($guard:ident, $name:literal, $($fields:tt)+) => {
        let $guard =
            ::tracing::span!(target: "dmatx", ::tracing::Level::DEBUG, $name, $($fields)+)
                .entered();
    };
}

/// Without the `tracing` feature: nothing.
#[cfg(not(feature = "tracing"))]
macro_rules! trace_enter {
    ($($any:tt)*) => {};
}

/// Statements that exist only with the `tracing` feature (values a span needs, taken under
/// the lock).
#[cfg(feature = "tracing")]
macro_rules! traced {
    ($($statements:tt)*) => {
        $($statements)*
    };
}

/// Without the `tracing` feature: nothing.
#[cfg(not(feature = "tracing"))]
macro_rules! traced {
    ($($any:tt)*) => {};
}

/// The transaction's lock held. Without the `tracing` feature it is the lock's own guard.
#[cfg(not(feature = "tracing"))]
pub(crate) type Guard<'a, T> = crate::sync::MutexGuard<'a, T>;

/// Lock the transaction's state (`tx`, its id, names it in the events recorded meanwhile).
#[cfg(not(feature = "tracing"))]
#[inline(always)]
pub(crate) fn lock<T>(mutex: &crate::sync::Mutex<T>, _tx: u64) -> Guard<'_, T> {
    mutex.lock()
}

#[cfg(feature = "tracing")]
mod on {
    use crate::sync::{Mutex, MutexGuard};
    use core::fmt;
    use core::ops::{Deref, DerefMut};
    use dmatx_hal::Allocation;
    use dmatx_types::{Direction, Result, State};
    use tracing::Level;
    use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};

    /// Records one lock hold can make. The most one makes is five (an execute that allocates,
    /// maps and stages: `tx.execute`, `tx.state`, `hal.allocate`, `hal.map`, or a failure's
    /// second `tx.state`); the rest is margin.
    const CAPACITY: usize = 8;

    /// Whether anyone listens at DEBUG level: one relaxed atomic load, false until a
    /// subscriber that wants DEBUG events is installed.
    #[inline]
    pub(crate) fn listening() -> bool {
        Level::DEBUG <= STATIC_MAX_LEVEL && Level::DEBUG <= LevelFilter::current()
    }

    /// An event recorded under the transaction's lock (the fields besides `tx`).
    #[derive(Clone, Copy)]
    pub(crate) enum Deferred {
        /// `tx.initialize`.
        Initialize { direction: Direction, length: u64 },
        /// `tx.execute`.
        Execute,
        /// `tx.state`; not emitted when `from == to`.
        State { from: State, to: State },
        /// `tx.completed`.
        Completed {
            length: u64,
            finished: bool,
            status: Result<()>,
        },
        /// `tx.release`.
        Release,
        /// `hal.allocate`.
        Allocate {
            registers: u32,
            outcome: &'static str,
        },
        /// `hal.map`.
        Map { bytes: u64, elements: usize },
        /// `hal.flush`.
        Flush { bytes: u64 },
    }

    impl Deferred {
        fn emit(self, tx: u64) {
            match self {
                Deferred::Initialize { direction, length } => trace_event!(
                    "tx.initialize",
                    tx,
                    direction = direction_name(direction),
                    length
                ),
                Deferred::Execute => trace_event!("tx.execute", tx),
                Deferred::State { from, to } => {
                    trace_event!("tx.state", tx, from = ?from, to = ?to)
                }
                Deferred::Completed {
                    length,
                    finished,
                    status,
                } => trace_event!(
                    "tx.completed",
                    tx,
                    length,
                    finished,
                    status = ?Status(status)
                ),
                Deferred::Release => trace_event!("tx.release", tx),
                Deferred::Allocate { registers, outcome } => {
                    trace_event!("hal.allocate", tx, registers, outcome)
                }
                Deferred::Map { bytes, elements } => {
                    trace_event!("hal.map", tx, bytes, elements = elements as u64)
                }
                Deferred::Flush { bytes } => trace_event!("hal.flush", tx, bytes),
            }
        }
    }

    /// `"to_device"` / `"from_device"`.
    pub(crate) fn direction_name(direction: Direction) -> &'static str {
        match direction {
            Direction::WriteToDevice => "to_device",
            Direction::ReadFromDevice => "from_device",
        }
    }

    /// `hal.allocate`'s outcome for what the adapter answered.
    pub(crate) fn outcome(answer: &Result<Allocation>) -> &'static str {
        match answer {
            Ok(Allocation::Granted(_)) => "granted",
            Ok(Allocation::Queued) => "queued",
            Err(_) => "refused",
        }
    }

    /// A status field: `success`, or the error's name (its `Debug`: `Cancelled`, `WdfBusy`).
    struct Status(Result<()>);

    impl fmt::Debug for Status {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match &self.0 {
                Ok(()) => f.write_str("success"),
                Err(e) => fmt::Debug::fmt(e, f),
            }
        }
    }

    /// The events recorded under a transaction's lock, and the per-use transfer count. Lives
    /// in the locked state.
    pub(crate) struct Log {
        events: [Option<Deferred>; CAPACITY],
        len: usize,
        /// Transfers handed to program-DMA since the last initialize.
        transfers: u64,
    }

    impl Default for Log {
        fn default() -> Self {
            Self {
                events: [None; CAPACITY],
                len: 0,
                transfers: 0,
            }
        }
    }

    impl Log {
        /// Record `event` (see `trace_record!`).
        pub(crate) fn push(&mut self, event: Deferred) {
            if let Deferred::State { from, to } = event
                && from == to
            {
                return;
            }
            debug_assert!(self.len < CAPACITY, "trace log full: raise CAPACITY");
            if let Some(slot) = self.events.get_mut(self.len) {
                *slot = Some(event);
                self.len += 1;
            }
        }

        /// A new use of the transaction begins (initialize): transfers count from 0 again.
        pub(crate) fn new_use(&mut self) {
            self.transfers = 0;
        }

        /// The number of the transfer about to be programmed (0-based in this use).
        pub(crate) fn next_transfer(&mut self) -> u64 {
            let n = self.transfers;
            self.transfers += 1;
            n
        }

        fn take(&mut self) -> Events {
            let events = Events {
                events: core::mem::replace(&mut self.events, [None; CAPACITY]),
                len: self.len,
            };
            self.len = 0;
            events
        }
    }

    /// Recorded events taken out of the locked state.
    struct Events {
        events: [Option<Deferred>; CAPACITY],
        len: usize,
    }

    /// Locked state that carries a [`Log`].
    pub(crate) trait Traced {
        /// The log.
        fn log(&mut self) -> &mut Log;
    }

    /// The transaction's lock held. Dropping it releases the lock and then emits what was
    /// recorded meanwhile.
    pub(crate) struct Guard<'a, T: Traced> {
        // Fields drop in declaration order: the lock is released before `pending` emits.
        guard: MutexGuard<'a, T>,
        pending: Pending,
    }

    /// Lock the transaction's state; `tx`, its id, names it in the events recorded meanwhile.
    #[inline]
    pub(crate) fn lock<T: Traced>(mutex: &Mutex<T>, tx: u64) -> Guard<'_, T> {
        Guard {
            guard: mutex.lock(),
            pending: Pending { tx, events: None },
        }
    }

    impl<T: Traced> Drop for Guard<'_, T> {
        fn drop(&mut self) {
            let log = self.guard.log();
            if log.len > 0 {
                self.pending.events = Some(log.take());
            }
        }
    }

    impl<T: Traced> Deref for Guard<'_, T> {
        type Target = T;

        fn deref(&self) -> &T {
            &self.guard
        }
    }

    impl<T: Traced> DerefMut for Guard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            &mut self.guard
        }
    }

    /// Events to emit once the lock is released.
    struct Pending {
        tx: u64,
        events: Option<Events>,
    }

    impl Drop for Pending {
        fn drop(&mut self) {
            if let Some(events) = self.events.take() {
                for event in events.events.into_iter().take(events.len).flatten() {
                    event.emit(self.tx);
                }
            }
        }
    }
}
