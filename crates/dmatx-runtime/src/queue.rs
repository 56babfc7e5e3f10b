//! I/O queues (WDFQUEUE, `WdfIoQueueCreate`): sequential and parallel dispatch, power-managed
//! holding, the default completion of request types without a handler, and cancellation of
//! waiting requests.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use dmatx::hal::MemoryDescriptor;
use dmatx::{Error, Result};

use crate::device::{Device, QueueControl, Switch};
use crate::ioctl::IoctlCode;
use crate::request::{
    Phase, QueueLink, Request, RequestHandle, RequestKind, RequestShared, RequestSpec,
};
use crate::sync::lock;

/// How a queue delivers requests (`WDF_IO_QUEUE_DISPATCH_TYPE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dispatch {
    /// `WdfIoQueueDispatchSequential`: at most one request delivered and not yet completed;
    /// the next one is delivered when it completes.
    Sequential,
    /// `WdfIoQueueDispatchParallel`: every request is delivered as soon as it arrives.
    Parallel,
}

/// A read or write handler (`EvtIoRead`, `EvtIoWrite`): the queue, the request and its length.
pub type IoHandler<X, M> = fn(&Queue<X, M>, Request<M>, u64);

/// A device control handler (`EvtIoDeviceControl`, `EvtIoInternalDeviceControl`): the queue,
/// the request, the output and input buffer lengths, and the IOCTL code.
pub type IoctlHandler<X, M> = fn(&Queue<X, M>, Request<M>, u64, u64, IoctlCode);

/// How to create a queue (`WDF_IO_QUEUE_CONFIG`). A request type whose handler is `None` is
/// completed at once with [`Error::InvalidDeviceRequest`], as WDF does.
pub struct QueueConfig<X, M> {
    /// Sequential or parallel dispatch.
    pub dispatch: Dispatch,
    /// Whether the queue holds requests while the device is not in D0.
    pub power_managed: bool,
    /// `EvtIoRead`.
    pub read: Option<IoHandler<X, M>>,
    /// `EvtIoWrite`.
    pub write: Option<IoHandler<X, M>>,
    /// `EvtIoDeviceControl`.
    pub device_control: Option<IoctlHandler<X, M>>,
    /// `EvtIoInternalDeviceControl`.
    pub internal_device_control: Option<IoctlHandler<X, M>>,
}

impl<X, M> QueueConfig<X, M> {
    /// A power-managed queue with `dispatch` and no handlers (`WDF_IO_QUEUE_CONFIG_INIT`; WDF's
    /// default makes a function driver's queues power-managed).
    pub fn new(dispatch: Dispatch) -> Self {
        Self {
            dispatch,
            power_managed: true,
            read: None,
            write: None,
            device_control: None,
            internal_device_control: None,
        }
    }
}

impl<X, M> Clone for QueueConfig<X, M> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<X, M> Copy for QueueConfig<X, M> {}

impl<X, M> fmt::Debug for QueueConfig<X, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueConfig")
            .field("dispatch", &self.dispatch)
            .field("power_managed", &self.power_managed)
            .finish_non_exhaustive()
    }
}

struct QueueState<M> {
    /// Requests waiting, in arrival order. Every request in it is `Queued`, and a `Queued`
    /// request is in it: the phase changes only under this lock.
    pending: VecDeque<Request<M>>,
    /// Requests delivered and not completed.
    outstanding: Vec<Request<M>>,
    /// Sequential: the delivered request.
    current: Option<u64>,
    /// Sequential: a thread is running the delivery loop.
    dispatching: bool,
    /// Delivering: not power-managed, or the device is in D0; and not deleted.
    powered: bool,
    /// The device's power switch this queue last applied.
    switch: Switch,
    deleted: bool,
}

struct QueueShared<X, M> {
    device: Device<X>,
    config: QueueConfig<X, M>,
    state: Mutex<QueueState<M>>,
    this: Weak<QueueShared<X, M>>,
}

/// An I/O queue. Cheap to clone; clones name the same queue.
pub struct Queue<X, M> {
    shared: Arc<QueueShared<X, M>>,
}

impl<X, M> Clone for Queue<X, M> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<X, M> fmt::Debug for Queue<X, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

static NEXT_REQUEST: AtomicU64 = AtomicU64::new(1);

/// Clears the sequential delivery flag if a handler unwinds, so the queue is not stuck.
struct DispatchGuard<'a, M> {
    state: &'a Mutex<QueueState<M>>,
    armed: bool,
}

impl<M> Drop for DispatchGuard<'_, M> {
    fn drop(&mut self) {
        if self.armed {
            lock(self.state).dispatching = false;
        }
    }
}

impl<X, M> Queue<X, M>
where
    X: Send + Sync + 'static,
    M: MemoryDescriptor + Sync,
{
    /// Create a queue on `device` (`WdfIoQueueCreate`). A power-managed queue created while
    /// the device is not in D0 holds its requests until power-up.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] after the device was deleted;
    /// [`Error::InsufficientResources`] when the device's low-memory knob refuses it
    /// ([`Device::fail_next_allocations`]).
    pub fn create(device: &Device<X>, config: QueueConfig<X, M>) -> Result<Self> {
        device.check_allocation()?;
        let shared = Arc::new_cyclic(|this| QueueShared {
            device: device.clone(),
            config,
            state: Mutex::new(QueueState {
                pending: VecDeque::new(),
                outstanding: Vec::new(),
                current: None,
                dispatching: false,
                powered: false,
                switch: Switch::default(),
                deleted: false,
            }),
            this: this.clone(),
        });
        let control: Weak<dyn QueueControl> = shared.this.clone();
        let switch = device.register_queue(control, config.power_managed)?;
        {
            // A power change racing this registration carries a newer generation and wins.
            let mut st = lock(&shared.state);
            if switch.apply_to(&mut st.switch) {
                st.powered = switch.on;
            }
        }
        Ok(Self { shared })
    }

    /// The queue's device (`WdfIoQueueGetDevice`).
    pub fn device(&self) -> &Device<X> {
        &self.shared.device
    }

    /// The queue's dispatch type.
    pub fn dispatch(&self) -> Dispatch {
        self.shared.config.dispatch
    }

    /// Requests waiting in the queue (not yet delivered).
    pub fn pending(&self) -> usize {
        lock(&self.shared.state).pending.len()
    }

    /// Requests delivered to the driver and not yet completed.
    pub fn outstanding(&self) -> usize {
        lock(&self.shared.state).outstanding.len()
    }

    /// Issue a request to the queue (what the I/O manager does for an application's I/O).
    ///
    /// A request type without a handler completes at once with
    /// [`Error::InvalidDeviceRequest`]. Otherwise a parallel queue delivers the request on this
    /// thread before `submit` returns, unless the queue is holding requests (power-managed, the
    /// device not in D0); a sequential queue delivers it on this thread if no other request is
    /// delivered and not completed, or else when that one completes, on the completing thread.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] after the device was deleted.
    pub fn submit(&self, spec: RequestSpec<M>) -> Result<RequestHandle<M>> {
        self.shared.device.check_alive()?;
        let spec_kind = spec.kind;
        let has_handler = match spec_kind {
            RequestKind::Read => self.shared.config.read.is_some(),
            RequestKind::Write => self.shared.config.write.is_some(),
            RequestKind::DeviceControl => self.shared.config.device_control.is_some(),
            RequestKind::InternalDeviceControl => {
                self.shared.config.internal_device_control.is_some()
            }
            RequestKind::Other => false,
        };
        // ORDERING: a counter; only uniqueness matters.
        let id = NEXT_REQUEST.fetch_add(1, Ordering::Relaxed);
        let link: Weak<dyn QueueLink<M>> = self.shared.this.clone();
        let shared =
            RequestShared::new(id, spec, self.shared.device.verifier(), link, Phase::Queued);
        let handle = RequestHandle::new(Arc::clone(&shared));
        // Before it is queued, so that its delivery (maybe on another thread) comes after. If
        // the queue is found deleted below (the device was deleted meanwhile), the request ends
        // here without a completion, as the error says.
        trace_event!(
            "request.submit",
            request = id,
            kind = crate::trace::kind_name(spec_kind),
            length = handle.input().map_or(0, |m| m.total_length())
                + handle.output().map_or(0, |m| m.total_length())
        );
        if !has_handler {
            shared.complete_by_framework(Err(Error::InvalidDeviceRequest));
            return Ok(handle);
        }
        {
            let mut st = lock(&self.shared.state);
            if st.deleted {
                return Err(Error::InvalidDeviceState);
            }
            st.pending.push_back(Request { shared });
        }
        self.shared.dispatch();
        Ok(handle)
    }
}

impl<X, M> QueueShared<X, M>
where
    X: Send + Sync + 'static,
    M: MemoryDescriptor + Sync,
{
    /// Take the next deliverable request, marking it delivered (under the queue lock).
    fn next(st: &mut QueueState<M>, sequential: bool) -> Option<Request<M>> {
        if !st.powered || (sequential && st.current.is_some()) {
            return None;
        }
        let request = st.pending.pop_front()?;
        request.shared.set_delivered();
        if sequential {
            st.current = Some(request.shared.id());
        }
        st.outstanding.push(request.clone());
        Some(request)
    }

    /// Deliver what can be delivered. Sequential queues deliver from one loop at a time: a
    /// completion made inside a handler only clears `current`, and the loop already running
    /// (on this thread or another) delivers the next request, so the stack does not grow.
    fn dispatch(&self) {
        let Some(this) = self.this.upgrade() else {
            return;
        };
        let queue = Queue { shared: this };
        match self.config.dispatch {
            Dispatch::Parallel => loop {
                let next = Self::next(&mut lock(&self.state), false);
                match next {
                    Some(request) => self.deliver(&queue, request),
                    None => return,
                }
            },
            Dispatch::Sequential => {
                {
                    let mut st = lock(&self.state);
                    if st.dispatching {
                        return;
                    }
                    st.dispatching = true;
                }
                let mut guard = DispatchGuard {
                    state: &self.state,
                    armed: true,
                };
                loop {
                    let next = {
                        let mut st = lock(&self.state);
                        let next = Self::next(&mut st, true);
                        if next.is_none() {
                            st.dispatching = false;
                            guard.armed = false;
                        }
                        next
                    };
                    match next {
                        Some(request) => self.deliver(&queue, request),
                        None => return,
                    }
                }
            }
        }
    }

    fn deliver(&self, queue: &Queue<X, M>, request: Request<M>) {
        trace_event!("request.deliver", request = request.id());
        let c = &self.config;
        match request.kind() {
            RequestKind::Read => {
                if let Some(h) = c.read {
                    let length = request.output_length();
                    h(queue, request, length);
                }
            }
            RequestKind::Write => {
                if let Some(h) = c.write {
                    let length = request.input_length();
                    h(queue, request, length);
                }
            }
            RequestKind::DeviceControl | RequestKind::InternalDeviceControl => {
                let handler = if request.kind() == RequestKind::DeviceControl {
                    c.device_control
                } else {
                    c.internal_device_control
                };
                if let (Some(h), Some(code)) = (handler, request.ioctl_code()) {
                    let (output, input) = (request.output_length(), request.input_length());
                    h(queue, request, output, input, code);
                }
            }
            // `submit` completes these at once; they never reach a queue.
            RequestKind::Other => {}
        }
    }
}

impl<X, M> QueueLink<M> for QueueShared<X, M>
where
    X: Send + Sync + 'static,
    M: MemoryDescriptor + Sync,
{
    fn request_completed(&self, id: u64) {
        let advance = {
            let mut st = lock(&self.state);
            st.outstanding.retain(|r| r.shared.id() != id);
            if st.current == Some(id) {
                st.current = None;
                true
            } else {
                false
            }
        };
        if advance {
            self.dispatch();
        }
    }

    fn withdraw(&self, id: u64) -> bool {
        let mut st = lock(&self.state);
        match st.pending.iter().position(|r| r.shared.id() == id) {
            Some(at) => {
                st.pending.remove(at);
                true
            }
            None => false,
        }
    }
}

impl<X, M> QueueControl for QueueShared<X, M>
where
    X: Send + Sync + 'static,
    M: MemoryDescriptor + Sync,
{
    fn set_powered(&self, switch: Switch) {
        if !self.config.power_managed {
            return;
        }
        {
            let mut st = lock(&self.state);
            if st.deleted || !switch.apply_to(&mut st.switch) {
                return;
            }
            st.powered = switch.on;
        }
        if switch.on {
            self.dispatch();
        }
    }

    fn purge(&self) {
        let (pending, outstanding) = {
            let mut st = lock(&self.state);
            st.deleted = true;
            st.powered = false;
            (std::mem::take(&mut st.pending), st.outstanding.clone())
        };
        // Completed with the queue's lock released (completion emits an event). Out of the
        // queue they are still `Queued`, so a cancel racing this waits for the completion.
        for r in pending {
            r.shared.complete_by_framework(Err(Error::Cancelled));
        }
        for r in outstanding {
            let _ = r.shared.cancel();
        }
    }
}

impl<X, M> Drop for QueueShared<X, M> {
    fn drop(&mut self) {
        // A request must not be lost with its queue: complete what still waits.
        let st = self
            .state
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for r in std::mem::take(&mut st.pending) {
            r.shared.complete_by_framework(Err(Error::Cancelled));
        }
    }
}
