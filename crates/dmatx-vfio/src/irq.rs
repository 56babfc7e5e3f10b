//! Device interrupts through VFIO eventfds (`VFIO_DEVICE_SET_IRQS` in
//! `include/uapi/linux/vfio.h`): each vector signals an eventfd, and one thread per
//! [`Interrupts`] waits on them and calls the driver's handler, as an interrupt service routine
//! runs for each interrupt. INTx, which VFIO masks each time it fires, is unmasked after the
//! handler returns.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use vfio_bindings::bindings::vfio::{
    VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
};

use crate::device::DeviceInner;
use crate::error::{ErrorKind, VfioError, VfioResult};
use crate::sys;

/// A PCI interrupt type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqKind {
    /// The legacy, level-triggered interrupt line (one vector).
    Intx,
    /// Message-signalled interrupts.
    Msi,
    /// Extended message-signalled interrupts (a vector table in a BAR).
    MsiX,
}

impl IrqKind {
    /// The vfio-pci interrupt index of the type.
    pub(crate) fn index(self) -> u32 {
        match self {
            IrqKind::Intx => VFIO_PCI_INTX_IRQ_INDEX,
            IrqKind::Msi => VFIO_PCI_MSI_IRQ_INDEX,
            IrqKind::MsiX => VFIO_PCI_MSIX_IRQ_INDEX,
        }
    }
}

impl fmt::Display for IrqKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IrqKind::Intx => "INTx",
            IrqKind::Msi => "MSI",
            IrqKind::MsiX => "MSI-X",
        })
    }
}

/// What a device offers for one interrupt type (`VFIO_DEVICE_GET_IRQ_INFO`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqInfo {
    /// The interrupt type.
    pub kind: IrqKind,
    /// Vectors available through eventfds (0: the type is not available).
    pub count: u32,
    /// The vectors can be masked.
    pub maskable: bool,
    /// VFIO masks the vector each time it fires (INTx).
    pub automasked: bool,
}

/// The driver's interrupt handler: called on the interrupt thread with the vector that fired.
pub type IrqHandler = Arc<dyn Fn(u32) + Send + Sync>;

/// What the interrupt thread shares with its owner.
struct Shared {
    /// Signals handled, per vector.
    counts: Box<[AtomicU64]>,
    /// The last error the thread met (it keeps running after an unmask failure).
    error: Mutex<Option<VfioError>>,
}

impl Shared {
    fn record(&self, error: VfioError) {
        *self.error.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
    }
}

/// Interrupts of a device wired to eventfds, and the thread that handles them. Stopped by
/// [`Interrupts::disable`] or on drop. Keeps the device open on its own, so it may be stored
/// beside the [`VfioDevice`](crate::VfioDevice) and outlive it.
pub struct Interrupts {
    device: Arc<DeviceInner>,
    kind: IrqKind,
    shared: Arc<Shared>,
    stop: Arc<sys::EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for Interrupts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interrupts")
            .field("device", &self.device.address)
            .field("kind", &self.kind)
            .field("vectors", &self.vectors())
            .finish_non_exhaustive()
    }
}

impl Interrupts {
    /// Wire `vectors` vectors of `kind` of `device` to new eventfds and start the thread.
    /// The caller has checked `vectors` against the device's count.
    pub(crate) fn start(
        device: Arc<DeviceInner>,
        kind: IrqKind,
        vectors: u32,
        handler: IrqHandler,
    ) -> VfioResult<Self> {
        let error = |message: String| {
            VfioError::new(ErrorKind::Interrupt, device.address.as_str(), message)
        };
        let eventfd = || {
            sys::eventfd_new().map_err(|e| {
                error(format!("cannot create an eventfd for {kind} interrupts")).with_errno(e)
            })
        };
        let fds = (0..vectors)
            .map(|_| eventfd())
            .collect::<VfioResult<Vec<_>>>()?;
        let stop = Arc::new(eventfd()?);
        let wired: Vec<&sys::EventFd> = fds.iter().collect();
        sys::device_set_irq_eventfds(&device.fd, kind.index(), &wired).map_err(|e| {
            error(format!(
                "cannot wire {vectors} {kind} vectors to eventfds (VFIO_DEVICE_SET_IRQS)"
            ))
            .with_errno(e)
        })?;
        let shared = Arc::new(Shared {
            counts: (0..vectors).map(|_| AtomicU64::new(0)).collect(),
            error: Mutex::new(None),
        });
        let thread = {
            let device = device.clone();
            let shared = shared.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("vfio-irq".into())
                .spawn(move || run(&device, kind, &fds, &stop, &shared, &*handler))
        };
        match thread {
            Ok(thread) => Ok(Self {
                device,
                kind,
                shared,
                stop,
                thread: Some(thread),
            }),
            Err(e) => {
                // The eventfds went with the closure; the kernel's references go now.
                let _ = sys::device_disable_irqs(&device.fd, kind.index());
                Err(error(format!(
                    "cannot start the {kind} interrupt thread: {e}"
                )))
            }
        }
    }

    /// The interrupt type.
    pub fn kind(&self) -> IrqKind {
        self.kind
    }

    /// The number of vectors wired.
    pub fn vectors(&self) -> u32 {
        // Built from a u32 count in `start`.
        u32::try_from(self.shared.counts.len()).unwrap_or(u32::MAX)
    }

    /// Signals of `vector` handled so far (0 for a vector that is not wired). A count that
    /// includes a signal is published after its handler call returned.
    pub fn count(&self, vector: u32) -> u64 {
        self.shared
            .counts
            .get(vector as usize)
            // ORDERING: Acquire pairs with the thread's Release increment, so a caller that
            // sees the count also sees what the handler did.
            .map_or(0, |count| count.load(Ordering::Acquire))
    }

    /// The last error the interrupt thread met (an INTx unmask or a wait that failed), if any.
    pub fn last_error(&self) -> Option<VfioError> {
        self.shared
            .error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stop: end the thread (waking it and waiting for it; its eventfds close), then turn the
    /// interrupts off (`VFIO_DEVICE_SET_IRQS` `DATA_NONE | ACTION_TRIGGER`, count 0). The thread
    /// is stopped first so that it never unmasks INTx after the interrupts are off.
    ///
    /// # Errors
    /// [`ErrorKind::Interrupt`] if the thread cannot be woken (it is then left waiting), the
    /// handler panicked, or the interrupts cannot be turned off.
    pub fn disable(mut self) -> VfioResult<()> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> VfioResult<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let error = |message: String| {
            VfioError::new(ErrorKind::Interrupt, self.device.address.as_str(), message)
        };
        let kind = self.kind;
        let mut result = Ok(());
        match sys::eventfd_signal(&self.stop) {
            Ok(()) => {
                if thread.join().is_err() {
                    result = Err(error(format!("the {kind} interrupt handler panicked")));
                }
            }
            Err(e) => {
                result =
                    Err(error(format!("cannot wake the {kind} interrupt thread")).with_errno(e));
            }
        }
        let disabled = sys::device_disable_irqs(&self.device.fd, kind.index()).map_err(|e| {
            error(format!(
                "cannot turn {kind} interrupts off (VFIO_DEVICE_SET_IRQS)"
            ))
            .with_errno(e)
        });
        result.and(disabled)
    }
}

impl Drop for Interrupts {
    fn drop(&mut self) {
        // Errors have no one to go to here; `disable` reports them.
        let _ = self.shut_down();
    }
}

/// The interrupt thread: wait for any vector or the stop signal; for each vector signalled,
/// call the handler, unmask INTx, then count the signals.
fn run(
    device: &DeviceInner,
    kind: IrqKind,
    fds: &[sys::EventFd],
    stop: &sys::EventFd,
    shared: &Shared,
    handler: &(dyn Fn(u32) + Send + Sync),
) {
    let error =
        |message: String| VfioError::new(ErrorKind::Interrupt, device.address.as_str(), message);
    let mut waited: Vec<&sys::EventFd> = fds.iter().collect();
    waited.push(stop);
    let mut ready = vec![false; waited.len()];
    loop {
        if let Err(e) = sys::eventfd_wait(&waited, &mut ready) {
            shared.record(error(format!("waiting for {kind} interrupts failed")).with_errno(e));
            return;
        }
        if ready[fds.len()] {
            return;
        }
        for ((vector, fd), count) in (0u32..).zip(fds).zip(&shared.counts) {
            if !ready[vector as usize] {
                continue;
            }
            let signals = match sys::eventfd_take(fd) {
                Ok(0) => continue,
                Ok(signals) => signals,
                Err(e) => {
                    shared.record(
                        error(format!(
                            "reading the eventfd of {kind} vector {vector} failed"
                        ))
                        .with_errno(e),
                    );
                    return;
                }
            };
            handler(vector);
            if kind == IrqKind::Intx
                && let Err(e) = sys::device_unmask_irq(&device.fd, kind.index(), vector)
            {
                shared.record(error("cannot unmask INTx".into()).with_errno(e));
            }
            // ORDERING: Release publishes the handler's effects with the count (see `count`).
            count.fetch_add(signals, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use rustix::io::Errno;

    use super::*;
    use crate::device::tests::{EDU, assert_error, setup};
    use crate::sys::{DeviceSpec, Step};

    /// Wait up to five seconds for `done`.
    #[track_caller]
    fn wait_for(mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < Duration::from_secs(5), "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn intx_is_delivered_then_unmasked() {
        let (twin, container, device) = setup(DeviceSpec::new(EDU, 3));
        let info = device.irq_info(IrqKind::Intx).expect("INTx info");
        assert_eq!(
            info,
            IrqInfo {
                kind: IrqKind::Intx,
                count: 1,
                maskable: true,
                automasked: true
            }
        );
        // What the handler saw: the vector, whether the line was masked, the unmasks so far.
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: IrqHandler = {
            let (seen, twin) = (seen.clone(), twin.clone());
            Arc::new(move |vector| {
                let state = (vector, twin.intx_masked(EDU), twin.unmasks());
                seen.lock().expect("not poisoned").push(state);
            })
        };
        let interrupts = device
            .enable_interrupts(IrqKind::Intx, 1, handler)
            .expect("INTx enabled");
        assert_eq!(
            (interrupts.kind(), interrupts.vectors()),
            (IrqKind::Intx, 1)
        );
        assert_eq!(twin.irq_setups(), 1);
        for round in 1..=2 {
            assert!(twin.fire(EDU, 0, 0), "round {round} delivered");
            wait_for(|| interrupts.count(0) == round);
            assert_eq!(twin.unmasks(), round as usize);
            assert!(!twin.intx_masked(EDU));
        }
        assert_eq!(
            *seen.lock().expect("not poisoned"),
            [(0, true, 0), (0, true, 1)]
        );
        assert_eq!(interrupts.count(1), 0);
        assert_eq!(interrupts.last_error(), None);
        interrupts.disable().expect("disabled");
        drop((device, container));
        twin.assert_clean();
    }

    #[test]
    fn msix_vectors_are_delivered_with_their_numbers() {
        let (twin, container, device) = setup(DeviceSpec::new(EDU, 3).irqs(1, 1, 3));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: IrqHandler = {
            let seen = seen.clone();
            Arc::new(move |vector| seen.lock().expect("not poisoned").push(vector))
        };
        let interrupts = device
            .enable_interrupts(IrqKind::MsiX, 3, handler)
            .expect("MSI-X enabled");
        for vector in [2, 0, 1] {
            assert!(twin.fire(EDU, 2, vector));
            wait_for(|| interrupts.count(vector) == 1);
        }
        assert_eq!(*seen.lock().expect("not poisoned"), [2, 0, 1]);
        assert_eq!(twin.unmasks(), 0);
        drop(interrupts);
        assert_eq!(twin.active_irqs(), 0);
        drop((device, container));
        twin.assert_clean();
    }

    #[test]
    fn disable_stops_the_thread() {
        let (twin, container, device) = setup(DeviceSpec::new(EDU, 3));
        let handler: IrqHandler = Arc::new(|_| {});
        let interrupts = device
            .enable_interrupts(IrqKind::Msi, 1, handler.clone())
            .expect("MSI enabled");
        assert_eq!(Arc::strong_count(&handler), 2);
        interrupts.disable().expect("disabled");
        // The thread ended and dropped its handler; nothing is wired any more.
        assert_eq!(Arc::strong_count(&handler), 1);
        assert!(!twin.fire(EDU, 1, 0));
        drop((device, container));
        twin.assert_clean();
    }

    #[test]
    fn rejects_vector_counts_the_device_does_not_have() {
        let (twin, container, device) = setup(DeviceSpec::new(EDU, 3).irqs(1, 0, 0));
        let handler: IrqHandler = Arc::new(|_| {});
        let error = device
            .enable_interrupts(IrqKind::Msi, 1, handler.clone())
            .expect_err("no MSI");
        assert_error(
            &error,
            ErrorKind::Interrupt,
            EDU,
            &["asked for 1 MSI vectors, the device offers 0"],
        );
        let error = device
            .enable_interrupts(IrqKind::Msi, 0, handler.clone())
            .expect_err("zero vectors");
        assert_error(
            &error,
            ErrorKind::Interrupt,
            EDU,
            &["cannot enable 0 MSI vectors"],
        );
        let error = device
            .enable_interrupts(IrqKind::Intx, 2, handler.clone())
            .expect_err("INTx has one");
        assert_error(&error, ErrorKind::Interrupt, EDU, &["INTx has exactly 1"]);
        assert_eq!(Arc::strong_count(&handler), 1);
        assert_eq!(twin.irq_setups(), 0);
        drop((device, container));
        twin.assert_clean();
    }

    #[test]
    fn a_failed_setup_leaves_nothing_behind() {
        let (twin, container, device) = setup(DeviceSpec::new(EDU, 3).irqs(1, 1, 4));
        let handler: IrqHandler = Arc::new(|_| {});
        twin.fail(Step::SetIrqs, Errno::INVAL);
        let error = device
            .enable_interrupts(IrqKind::MsiX, 4, handler.clone())
            .expect_err("SET_IRQS fails");
        assert_error(
            &error,
            ErrorKind::Interrupt,
            EDU,
            &["cannot wire 4 MSI-X vectors", "VFIO_DEVICE_SET_IRQS"],
        );
        assert_eq!(error.errno(), Some(Errno::INVAL));
        // No thread holds the handler; the eventfds are closed (container, group, device).
        assert_eq!(Arc::strong_count(&handler), 1);
        assert_eq!(twin.open_fds(), 3);
        assert_eq!(twin.active_irqs(), 0);

        twin.fail(Step::Eventfd, Errno::MFILE);
        let error = device
            .enable_interrupts(IrqKind::MsiX, 4, handler.clone())
            .expect_err("eventfd fails");
        assert_error(&error, ErrorKind::Interrupt, EDU, &["eventfd"]);
        assert_eq!(twin.open_fds(), 3);
        drop((device, container));
        twin.assert_clean();
    }

    #[test]
    fn a_failed_disable_is_reported_and_the_thread_still_stops() {
        let (twin, container, device) = setup(DeviceSpec::new(EDU, 3));
        let handler: IrqHandler = Arc::new(|_| {});
        let interrupts = device
            .enable_interrupts(IrqKind::Msi, 1, handler.clone())
            .expect("MSI enabled");
        twin.fail(Step::SetIrqs, Errno::IO);
        let error = interrupts.disable().expect_err("disable fails");
        assert_error(
            &error,
            ErrorKind::Interrupt,
            EDU,
            &["cannot turn MSI interrupts off"],
        );
        assert_eq!(Arc::strong_count(&handler), 1);
        // Closing the device releases what the kernel still had wired.
        drop((device, container));
        twin.assert_clean();
    }
}
