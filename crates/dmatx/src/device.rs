//! The device a set of enablers belongs to (KMDF's WDFDEVICE, as far as DMA needs it).

use crate::sync::{Arc, AtomicBool, Ordering};
use dmatx_hal::Platform;

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

pub(crate) struct DeviceShared<P> {
    pub(crate) platform: P,
    /// The v2 packet slot: set while a v2 packet transaction of this device holds map registers.
    packet_slot: AtomicBool,
}

impl<P: Platform> DmaDevice<P> {
    /// A device on `platform`.
    pub fn new(platform: P) -> Self {
        Self {
            shared: Arc::new(DeviceShared {
                platform,
                packet_slot: AtomicBool::new(false),
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

    /// Power the device's DMA up (KMDF runs this after `EvtDeviceD0EntryPostInterruptsEnabled`):
    /// each enabler's fill, enable and self-managed-I/O-start callbacks, in creation order
    /// (statement 15).
    ///
    /// # Errors
    /// The first callback error; later callbacks and enablers are not run.
    pub fn power_up(&self) -> dmatx_types::Result<()> {
        Ok(())
    }

    /// Power the device's DMA down (KMDF runs this before
    /// `EvtDeviceD0ExitPreInterruptsDisabled`): each enabler's self-managed-I/O-stop, disable
    /// and flush callbacks (statement 16).
    ///
    /// # Errors
    /// The first callback error; every enabler is still visited.
    pub fn power_down(&self) -> dmatx_types::Result<()> {
        Ok(())
    }

    /// Delete the device's DMA objects (statement 17): every enabler, its transactions and
    /// common buffers.
    pub fn delete(&self) {}

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

impl<P> DeviceShared<P> {
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
