//! The device a set of enablers belongs to (KMDF's WDFDEVICE, as far as DMA needs it).

use crate::enabler::{Enabler, EnablerShared};
use crate::sync::{Arc, AtomicBool, Mutex, Ordering, Weak};
use alloc::vec::Vec;
use dmatx_hal::Platform;
use dmatx_types::{Error, Result};

/// A device that owns DMA enablers: it holds the platform (the backend) and the v2 device-wide
/// packet slot (spec §3.3: one active v2 packet transaction per device).
///
/// Cheap to clone; clones name the same device.
///
/// ```
/// use dmatx::DmaDevice;
/// use dmatx_sim::SimPlatform;
///
/// let device = DmaDevice::new(SimPlatform::new());
/// let same = device.clone();
/// assert!(device.same_device(&same));
/// ```
pub struct DmaDevice<P: Platform> {
    shared: Arc<DeviceShared<P>>,
}

pub(crate) struct DeviceShared<P: Platform> {
    pub(crate) platform: P,
    /// The v2 packet slot: set while a v2 packet transaction of this device holds map registers.
    packet_slot: AtomicBool,
    /// The device's enablers in creation order (KMDF's enabler list, walked for power).
    enablers: Mutex<Vec<Weak<EnablerShared<P>>>>,
    /// Set by [`DmaDevice::delete`].
    deleted: AtomicBool,
}

impl<P: Platform> DmaDevice<P> {
    /// A device on `platform`.
    pub fn new(platform: P) -> Self {
        Self {
            shared: Arc::new(DeviceShared {
                platform,
                packet_slot: AtomicBool::new(false),
                enablers: Mutex::new(Vec::new()),
                deleted: AtomicBool::new(false),
            }),
        }
    }

    /// The platform this device's DMA runs on.
    pub fn platform(&self) -> &P {
        &self.shared.platform
    }

    /// Whether `other` is a handle to the same device.
    pub fn same_device(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Power the device's DMA up (KMDF runs this after `EvtDeviceD0EntryPostInterruptsEnabled`
    /// and before the device's self-managed I/O starts): for each enabler in creation order,
    /// its fill, enable and self-managed-I/O-start callbacks (statement 15). The first failure
    /// stops the walk; which step failed is remembered for the next power-down. Each power-up
    /// starts with a clean record (KMDF never clears it: `docs/quirks.md`).
    ///
    /// # Errors
    /// The first callback error; later callbacks and enablers are not run.
    /// [`Error::InvalidDeviceState`] after [`DmaDevice::delete`].
    pub fn power_up(&self) -> Result<()> {
        if self.is_deleted() {
            return Err(Error::InvalidDeviceState);
        }
        let enablers = self.shared.live_enablers();
        for shared in &enablers {
            shared.power.lock().reset();
        }
        for shared in enablers {
            Enabler { shared }.power_up()?;
        }
        Ok(())
    }

    /// Power the device's DMA down (KMDF runs this before
    /// `EvtDeviceD0ExitPreInterruptsDisabled`): for each enabler the last power-up reached, its
    /// self-managed-I/O-stop, then disable unless fill failed, then flush unless fill or enable
    /// failed (statement 16). Every such enabler is visited.
    ///
    /// # Errors
    /// The first callback error.
    pub fn power_down(&self) -> Result<()> {
        let mut first = Ok(());
        for shared in self.shared.live_enablers() {
            let result = Enabler { shared }.power_down();
            if first.is_ok() {
                first = result;
            }
        }
        first
    }

    /// Delete the device's DMA objects (`WdfObjectDelete` on the device, statement 17): every
    /// enabler, its transactions and its common buffers. Handles the driver still holds stay
    /// valid as Rust values but their objects are deleted: transactions report
    /// [`State::Deleted`](dmatx_types::State::Deleted) and refuse every call, common buffers
    /// refuse reads and writes, and nothing new can be created on the device or its enablers.
    /// Buffers of transactions that are not executing are dropped, their map registers and
    /// reservations returned, common-buffer memory freed. A transaction still executing keeps
    /// its buffer and registers forever (the device may be using them), as deleting it would.
    /// Deleting twice does nothing.
    pub fn delete(&self) {
        // ORDERING: Acquire/Release so a deleter sees earlier creations and creators after it
        // see the flag.
        if self.shared.deleted.swap(true, Ordering::AcqRel) {
            return;
        }
        let enablers = core::mem::take(&mut *self.shared.enablers.lock());
        // Two phases across all enablers: every queued request is withdrawn before any
        // resource is returned, so nothing being deleted is granted registers meanwhile.
        let enablers: Vec<_> = enablers.iter().filter_map(Weak::upgrade).collect();
        let children: Vec<_> = enablers.iter().map(|e| e.begin_delete()).collect();
        for (enabler, group) in enablers.iter().zip(children) {
            enabler.delete_children(group);
        }
    }

    /// Whether [`DmaDevice::delete`] was called.
    pub fn is_deleted(&self) -> bool {
        self.shared.is_deleted()
    }

    pub(crate) fn shared(&self) -> &Arc<DeviceShared<P>> {
        &self.shared
    }
}

impl<P: Platform> Clone for DmaDevice<P> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<P: Platform> DeviceShared<P> {
    /// Add an enabler to the device's list (at its creation).
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] if the device was deleted.
    pub(crate) fn adopt(&self, enabler: Weak<EnablerShared<P>>) -> Result<()> {
        let mut list = self.enablers.lock();
        if self.is_deleted() {
            return Err(Error::InvalidDeviceState);
        }
        if list.len() == list.capacity() {
            list.retain(|e| e.strong_count() > 0);
        }
        list.push(enabler);
        Ok(())
    }

    fn live_enablers(&self) -> Vec<Arc<EnablerShared<P>>> {
        self.enablers
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    pub(crate) fn is_deleted(&self) -> bool {
        // ORDERING: pairs with the AcqRel swap in `delete`.
        self.deleted.load(Ordering::Acquire)
    }

    /// Take the v2 packet slot; `false` if another transaction holds it.
    pub(crate) fn try_take_packet_slot(&self) -> bool {
        // ORDERING: Acquire pairs with the Release in `give_back_packet_slot`, so the previous
        // holder's teardown happens-before our use of the device.
        self.packet_slot
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    pub(crate) fn give_back_packet_slot(&self) {
        // ORDERING: Release publishes this holder's teardown to the next taker.
        let was = self.packet_slot.swap(false, Ordering::Release);
        debug_assert!(was, "the v2 packet slot was not held");
    }

    /// Whether a v2 packet transaction holds the slot.
    pub(crate) fn packet_slot_taken(&self) -> bool {
        // ORDERING: a diagnostic read; no data depends on it.
        self.packet_slot.load(Ordering::Relaxed)
    }
}
