//! The one place dmatx takes its synchronisation primitives from.
//!
//! Normal builds use a spin lock (`no_std`: no OS to block on) and `core` atomics; under
//! `--cfg loom` the same names resolve to loom's model-checked versions, so the race rules of
//! spec §3.5 are explored by `tests/loom.rs`. `Arc` is always `alloc`'s: the platform contract
//! hands waiters to backends as `alloc::sync::Arc<dyn AllocationWaiter>`.

pub(crate) use alloc::sync::{Arc, Weak};

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// A mutual-exclusion lock with an infallible `lock`.
#[derive(Debug)]
pub(crate) struct Mutex<T> {
    #[cfg(not(loom))]
    inner: spin::mutex::SpinMutex<T>,
    #[cfg(loom)]
    inner: loom::sync::Mutex<T>,
}

#[cfg(not(loom))]
pub(crate) type MutexGuard<'a, T> = spin::mutex::SpinMutexGuard<'a, T>;
#[cfg(loom)]
pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        Self {
            #[cfg(not(loom))]
            inner: spin::mutex::SpinMutex::new(value),
            #[cfg(loom)]
            inner: loom::sync::Mutex::new(value),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        #[cfg(not(loom))]
        {
            self.inner.lock()
        }
        #[cfg(loom)]
        {
            // A poisoned lock means a panic already unwound through dmatx; carry on with the data
            // as it was, as the spin lock would.
            self.inner.lock().unwrap_or_else(|e| e.into_inner())
        }
    }
}
