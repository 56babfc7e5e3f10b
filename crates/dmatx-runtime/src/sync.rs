//! Locks that never panic and a lock that knows its owner.
//!
//! Driver callbacks run outside every runtime lock except the interrupt lock (the ISR and
//! `synchronize` closures run under it), so a poisoned mutex only means a driver callback
//! panicked while holding the interrupt lock; the runtime's own state stays consistent (each
//! critical section completes its update before calling out), so poison is ignored.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{JoinHandle, ThreadId};
use std::time::Duration;

use dmatx::{Error, Result};

/// Lock `m`, ignoring poison.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Wait on `cv`, ignoring poison.
pub(crate) fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(g).unwrap_or_else(PoisonError::into_inner)
}

/// Wait on `cv` for at most `d`, ignoring poison.
pub(crate) fn wait_for<'a, T>(
    cv: &Condvar,
    g: MutexGuard<'a, T>,
    d: Duration,
) -> MutexGuard<'a, T> {
    match cv.wait_timeout(g, d) {
        Ok((g, _)) => g,
        Err(e) => e.into_inner().0,
    }
}

/// A small number naming the current thread (never 0).
pub(crate) fn thread_tag() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        // ORDERING: a counter; only uniqueness matters.
        static TAG: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TAG.with(|t| *t)
}

/// A mutex that records which thread holds it, so a second acquisition by the same thread is
/// reported instead of deadlocking.
#[derive(Default)]
pub(crate) struct OwnedLock {
    lock: Mutex<()>,
    owner: AtomicU64,
}

/// Holding an [`OwnedLock`].
pub(crate) struct OwnedGuard<'a> {
    owner: &'a AtomicU64,
    _guard: MutexGuard<'a, ()>,
}

impl OwnedLock {
    /// Whether the current thread holds the lock.
    pub(crate) fn held_by_me(&self) -> bool {
        // ORDERING: only the holding thread stores its own tag, so a thread reads its own tag
        // only if it stored it itself (program order); any other value means "not me".
        self.owner.load(Ordering::Relaxed) == thread_tag()
    }

    /// Acquire the lock; `None` if the current thread already holds it.
    pub(crate) fn acquire(&self) -> Option<OwnedGuard<'_>> {
        if self.held_by_me() {
            return None;
        }
        let guard = lock(&self.lock);
        // ORDERING: see `held_by_me`.
        self.owner.store(thread_tag(), Ordering::Relaxed);
        Some(OwnedGuard {
            owner: &self.owner,
            _guard: guard,
        })
    }
}

impl Drop for OwnedGuard<'_> {
    fn drop(&mut self) {
        // ORDERING: see `OwnedLock::held_by_me`; cleared before the mutex is released.
        self.owner.store(0, Ordering::Relaxed);
    }
}

/// A misuse diagnostic as an error.
pub(crate) fn misuse(
    object: &'static str,
    call: &'static str,
    state: &'static str,
    reason: &'static str,
) -> dmatx::Error {
    dmatx::Error::ObjectMisuse(dmatx::ObjectMisuse {
        object,
        call,
        state,
        reason,
    })
}

/// Verifier mode: panic with the diagnostic of a misuse. Called with no runtime lock held.
pub(crate) fn verify<T>(verifier: bool, result: dmatx::Result<T>) -> dmatx::Result<T> {
    if verifier && let Err(dmatx::Error::ObjectMisuse(m)) = &result {
        panic!("{m}");
    }
    result
}

/// The worker thread an interrupt (DPCs) or a timer (callbacks) owns.
#[derive(Default)]
pub(crate) struct Worker {
    handle: Mutex<Option<JoinHandle<()>>>,
    id: Mutex<Option<ThreadId>>,
}

impl Worker {
    /// Start the thread, named `name`, running `body`.
    ///
    /// # Errors
    /// [`Error::InsufficientResources`] if the thread cannot be started.
    pub(crate) fn start(&self, name: &str, body: impl FnOnce() + Send + 'static) -> Result<()> {
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(body)
            .map_err(|_| Error::InsufficientResources)?;
        *lock(&self.id) = Some(handle.thread().id());
        *lock(&self.handle) = Some(handle);
        Ok(())
    }

    /// Whether the calling thread is this worker.
    pub(crate) fn is_current(&self) -> bool {
        *lock(&self.id) == Some(std::thread::current().id())
    }

    /// Wait for the thread to end (the caller has told it to stop), unless the caller is the
    /// thread itself, which ends when it returns.
    pub(crate) fn join(&self) {
        let handle = lock(&self.handle).take();
        if let Some(handle) = handle
            && !self.is_current()
        {
            let _ = handle.join();
        }
    }
}
