//! Tracing: the core's events of `docs/TRACING.md` (its first table), through the `tracing`
//! crate, with the `tracing` feature.
//!
//! Without the feature every macro here expands to nothing, [`Guard`] is the plain lock guard
//! and no field, counter or check is compiled in.
//!
//! With it, the rule of `docs/DESIGN.md` ("How a transaction runs": no driver code under the
//! transaction's lock) covers subscribers too, since a subscriber is user code. So what happens
//! under the lock — state transitions, the platform's `allocate`, `map` and `flush`, and the
//! calls accepted there — is *recorded* in the transaction's `Outbox`, and the lock's
//! [`Guard`] emits the records, in order, once the lock is released. Events at points where no
//! lock is held (`hal.free`, `tx.cancel`) and the program-DMA span are emitted directly.
//!
//! Nothing allocates: the outbox is a fixed array inside the transaction. With no subscriber
//! listening at DEBUG level nothing is recorded and no span is made; what remains is a relaxed
//! load of `tracing`'s global level per event point and one of the outbox's "pending" flag
//! per release of the lock (the guard is the lock's guard plus two words, with no `Option` to
//! check on every use). `docs/PERFORMANCE.md` ("Tracing cost") has the measured price.
//!
//! The outbox is shared by the threads that take the lock in turn: a thread that releases the
//! lock emits whatever is pending, so in a race one thread may emit, in order, records another
//! thread made just before (the record is right; the thread it is reported on is not).

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
/// released: `trace_record!(self.trace, Flush { bytes })` (an `Outbox` and a variant of
/// `Deferred`).
#[cfg(feature = "tracing")]
macro_rules! trace_record {
    ($outbox:expr, $($event:tt)+) => {
        if $crate::trace::listening() {
            $outbox.push($crate::trace::Deferred::$($event)+);
        }
    };
}

/// Without the `tracing` feature: nothing.
#[cfg(not(feature = "tracing"))]
macro_rules! trace_record {
    ($($any:tt)*) => {};
}

/// Enter a core span for the rest of the enclosing block:
/// `trace_enter!(_span, "tx.program_dma", tx = id, …)` binds the entered span (`None` when
/// nobody listens) to `_span`.
#[cfg(feature = "tracing")]
macro_rules! trace_enter {
    ($guard:ident, $name:literal, $($fields:tt)+) => {
        // The level check first, so that nobody listening costs no span at all.
        let $guard = $crate::trace::listening().then(|| {
            ::tracing::span!(target: "dmatx", ::tracing::Level::DEBUG, $name, $($fields)+)
                .entered()
        });
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

#[cfg(feature = "tracing")]
mod on {
    use crate::sync::{Mutex, MutexGuard};
    use core::fmt;
    use core::ops::{Deref, DerefMut};
    use core::sync::atomic::{AtomicBool, Ordering};
    use dmatx_hal::Allocation;
    use dmatx_types::{Direction, Result, State};
    use spin::mutex::SpinMutex;
    use tracing::Level;
    use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};

    /// Records the outbox holds. One hold of the lock makes at most five (an execute that
    /// allocates, maps and stages: `tx.execute`, `tx.state`, `hal.allocate`, `hal.map`, or a
    /// failure's second `tx.state`); the rest is for holds by other threads before the first
    /// one's release emits. A record that finds the outbox full is dropped.
    const CAPACITY: usize = 16;

    /// Whether anyone listens at DEBUG level: one relaxed atomic load, false until a
    /// subscriber that wants DEBUG events is installed.
    #[inline(always)]
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

    /// Events recorded under a transaction's lock and not emitted yet. Lives beside the lock,
    /// in the transaction, with its own small lock (taken only while someone listens, and only
    /// after the transaction's, never the other way round).
    pub(crate) struct Outbox {
        /// Whether `log` may hold events: set and cleared under `log`'s lock, read without it.
        pending: AtomicBool,
        log: SpinMutex<Log>,
    }

    impl Default for Outbox {
        fn default() -> Self {
            Self {
                pending: AtomicBool::new(false),
                log: SpinMutex::new(Log {
                    events: [None; CAPACITY],
                    len: 0,
                }),
            }
        }
    }

    impl Outbox {
        /// Record `event` (see `trace_record!`). Only called while someone listens, so kept
        /// out of the hot paths' code.
        #[cold]
        #[inline(never)]
        pub(crate) fn push(&self, event: Deferred) {
            if let Deferred::State { from, to } = event
                && from == to
            {
                return;
            }
            let mut guard = self.log.lock();
            let log = &mut *guard;
            if let Some(slot) = log.events.get_mut(log.len) {
                *slot = Some(event);
                log.len += 1;
            }
            // ORDERING: the thread that recorded releases the transaction's lock next and
            // reads the flag in program order after this store; a thread that reads a stale
            // value either finds the log empty or leaves it to the recording thread.
            self.pending.store(true, Ordering::Relaxed);
        }

        /// Emit what is pending. Call with the transaction's lock released.
        #[inline]
        fn flush(&self, tx: u64) {
            // ORDERING: see `push`.
            if self.pending.load(Ordering::Relaxed) {
                self.drain(tx);
            }
        }

        #[cold]
        #[inline(never)]
        fn drain(&self, tx: u64) {
            let (events, len) = {
                let mut log = self.log.lock();
                // ORDERING: see `push`.
                self.pending.store(false, Ordering::Relaxed);
                let len = core::mem::take(&mut log.len);
                (core::mem::replace(&mut log.events, [None; CAPACITY]), len)
            };
            for event in events.into_iter().take(len).flatten() {
                event.emit(tx);
            }
        }
    }

    /// The records themselves.
    struct Log {
        events: [Option<Deferred>; CAPACITY],
        len: usize,
    }

    /// The transaction's lock held. Dropping it releases the lock and then emits what was
    /// recorded meanwhile (its fields drop in declaration order).
    pub(crate) struct Guard<'a, T> {
        guard: MutexGuard<'a, T>,
        _flush: Flush<'a>,
    }

    /// Lock `mutex`, the state of the transaction with id `tx` and outbox `outbox`.
    #[inline]
    pub(crate) fn lock<'a, T>(mutex: &'a Mutex<T>, outbox: &'a Outbox, tx: u64) -> Guard<'a, T> {
        Guard {
            guard: mutex.lock(),
            _flush: Flush { outbox, tx },
        }
    }

    impl<T> Deref for Guard<'_, T> {
        type Target = T;

        #[inline]
        fn deref(&self) -> &T {
            &self.guard
        }
    }

    impl<T> DerefMut for Guard<'_, T> {
        #[inline]
        fn deref_mut(&mut self) -> &mut T {
            &mut self.guard
        }
    }

    /// Emits the outbox when dropped (after the guard beside it).
    struct Flush<'a> {
        outbox: &'a Outbox,
        tx: u64,
    }

    impl Drop for Flush<'_> {
        #[inline]
        fn drop(&mut self) {
            self.outbox.flush(self.tx);
        }
    }
}
