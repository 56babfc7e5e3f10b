//! Requests (WDFREQUEST): what an issuer submits, what the driver receives, completion and
//! cancellation (WdfRequestComplete, WdfRequestMarkCancelableEx, WdfRequestUnmarkCancelable,
//! WdfRequestIsCanceled, WdfRequestCancelSentRequest).
//!
//! A request has two sides. The issuer (a test, an application) builds a [`RequestSpec`],
//! submits it to a [`Queue`](crate::Queue) and gets a [`RequestHandle`]: it can wait for the
//! completion, cancel, and read the buffers afterwards. The driver gets a [`Request`] when the
//! queue delivers it and must complete it exactly once.
//!
//! The completion-versus-cancel race is decided under one lock per request: whichever of
//! [`RequestHandle::cancel`] and [`Request::unmark_cancelable`] runs first decides who completes
//! the request (the cancel callback, or the driver's normal path).

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use dmatx::hal::{MemoryDescriptor, Segment};
use dmatx::{Error, RequestBinding, Result};

use crate::ioctl::IoctlCode;
use crate::sync::{lock, misuse, verify, wait, wait_for};

/// The major function of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// `IRP_MJ_READ`: the device fills the request's output buffer.
    Read,
    /// `IRP_MJ_WRITE`: the device consumes the request's input buffer.
    Write,
    /// `IRP_MJ_DEVICE_CONTROL`.
    DeviceControl,
    /// `IRP_MJ_INTERNAL_DEVICE_CONTROL`.
    InternalDeviceControl,
    /// Any other major function; no queue handler takes it.
    Other,
}

/// What an issuer submits: the major function, the IOCTL code and the buffers.
///
/// Buffers follow WDF's retrieval rules: a read's buffer is the request's *output* buffer (the
/// device writes it), a write's buffer its *input* buffer. Lengths are the buffers'
/// [`MemoryDescriptor::total_length`] (0 when absent).
pub struct RequestSpec<M> {
    pub(crate) kind: RequestKind,
    pub(crate) ioctl: Option<IoctlCode>,
    pub(crate) input: Option<M>,
    pub(crate) output: Option<M>,
}

impl<M: MemoryDescriptor + Sync> RequestSpec<M> {
    /// A read into `memory` (`IRP_MJ_READ`).
    pub fn read(memory: M) -> Self {
        Self {
            kind: RequestKind::Read,
            ioctl: None,
            input: None,
            output: Some(memory),
        }
    }

    /// A write from `memory` (`IRP_MJ_WRITE`).
    pub fn write(memory: M) -> Self {
        Self {
            kind: RequestKind::Write,
            ioctl: None,
            input: Some(memory),
            output: None,
        }
    }

    /// A device control request (`IRP_MJ_DEVICE_CONTROL`) with optional input and output
    /// buffers.
    pub fn device_control(code: IoctlCode, input: Option<M>, output: Option<M>) -> Self {
        Self {
            kind: RequestKind::DeviceControl,
            ioctl: Some(code),
            input,
            output,
        }
    }

    /// An internal device control request (`IRP_MJ_INTERNAL_DEVICE_CONTROL`).
    pub fn internal_device_control(code: IoctlCode, input: Option<M>, output: Option<M>) -> Self {
        Self {
            kind: RequestKind::InternalDeviceControl,
            ioctl: Some(code),
            input,
            output,
        }
    }

    /// A request of a major function no queue handles (e.g. `IRP_MJ_FLUSH_BUFFERS`); a queue
    /// completes it with [`Error::InvalidDeviceRequest`].
    pub fn other() -> Self {
        Self {
            kind: RequestKind::Other,
            ioctl: None,
            input: None,
            output: None,
        }
    }

    /// The request's major function.
    pub fn kind(&self) -> RequestKind {
        self.kind
    }
}

/// How a request ended: its status and its information value (bytes transferred, by
/// convention).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completed {
    /// The completion status.
    pub status: Result<()>,
    /// The information value (`IoStatus.Information`).
    pub information: u64,
}

/// A driver's cancel routine (`EvtRequestCancel`). It runs on the thread that cancels, outside
/// every runtime lock, and must complete the request (usually with [`Error::Cancelled`]).
pub type CancelCallback<M> = fn(&Request<M>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// In a queue, not yet delivered.
    Queued,
    /// Delivered to the driver, not yet completed.
    Delivered,
    /// Completed.
    Completed,
}

enum Cancel<M> {
    NotCancelable,
    Cancelable(CancelCallback<M>),
    /// The cancel callback has been claimed by a cancellation: it runs or has run, and the
    /// request is its to complete.
    Claimed,
}

struct ReqState<M> {
    phase: Phase,
    cancel: Cancel<M>,
    cancelled: bool,
    information: u64,
    completed: Option<Completed>,
}

/// What a request needs of its queue.
pub(crate) trait QueueLink<M>: Send + Sync {
    /// A delivered request was completed (the driver's side): forget it, and for a sequential
    /// queue deliver the next one.
    fn request_completed(&self, id: u64);
    /// Take the request out of the queue if it is still waiting there; `true` if it was (the
    /// caller then completes it).
    fn withdraw(&self, id: u64) -> bool;
}

pub(crate) struct RequestShared<M> {
    id: u64,
    kind: RequestKind,
    ioctl: Option<IoctlCode>,
    input: Option<Arc<M>>,
    output: Option<Arc<M>>,
    verifier: bool,
    queue: Weak<dyn QueueLink<M>>,
    state: Mutex<ReqState<M>>,
    done: Condvar,
    /// Transactions executing on this request's memory (a request can back several).
    dma_active: AtomicU32,
    refused: AtomicU64,
}

/// One request as the driver sees it (a WDFREQUEST handle). Cheap to clone; clones name the
/// same request.
///
/// The driver completes every request it is given exactly once, with [`Request::complete`] or
/// [`Request::complete_with_information`] (from its handler, a DPC, a timer, or its cancel
/// callback).
pub struct Request<M> {
    pub(crate) shared: Arc<RequestShared<M>>,
}

impl<M> Clone for Request<M> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<M> fmt::Debug for Request<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("id", &self.shared.id)
            .field("kind", &self.shared.kind)
            .finish()
    }
}

/// The issuer's side of a submitted request: wait for its completion, cancel it, read its
/// buffers afterwards.
///
/// A handle exists only once [`Queue::submit`](crate::Queue::submit) accepted the request, so a
/// request that was never issued cannot be cancelled: the type makes it impossible. Clones name
/// the same request, so one thread can wait while another cancels (as `CancelIoEx` does).
pub struct RequestHandle<M> {
    shared: Arc<RequestShared<M>>,
}

impl<M> Clone for RequestHandle<M> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<M> fmt::Debug for RequestHandle<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestHandle")
            .field("id", &self.shared.id)
            .field("kind", &self.shared.kind)
            .finish()
    }
}

/// One of a request's buffers, as a [`MemoryDescriptor`]: the buffer type of transactions
/// initialized from requests ([`crate::dma::initialize_using_request`]).
///
/// It shares the issuer's memory (an `Arc`), so a transaction holding it keeps the memory alive
/// even if every other handle is gone.
pub struct RequestMemory<M> {
    memory: Arc<M>,
}

impl<M> Clone for RequestMemory<M> {
    fn clone(&self) -> Self {
        Self {
            memory: Arc::clone(&self.memory),
        }
    }
}

impl<M> fmt::Debug for RequestMemory<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestMemory").finish_non_exhaustive()
    }
}

impl<M> RequestMemory<M> {
    /// Driver-owned memory in the request-buffer type, so a transaction that serves requests can
    /// also run on a buffer of the driver's own (a KMDF driver's own MDL chain, initialized with
    /// `WdfDmaTransactionInitialize` on the same transaction object).
    pub fn new(memory: M) -> Self {
        Self {
            memory: Arc::new(memory),
        }
    }

    /// The underlying memory.
    pub fn memory(&self) -> &M {
        &self.memory
    }
}

// Clones share the one `M`: several transactions, and the issuer's `RequestHandle`, may describe
// the same bytes. `Send + 'static` hold because `M: Send + Sync + 'static` makes `Arc<M>` so.
// The `Arc` keeps `M` alive and unmoved while any clone exists, and `M` lends no reference to
// its bytes (the contract's last clause), so sharing it never lets a Rust reference race a device.
#[expect(
    unsafe_code,
    reason = "the one audited exception: delegating an unsafe trait"
)]
// SAFETY: every method delegates to `M`, which keeps the contract (sharing it: above).
unsafe impl<M: MemoryDescriptor + Sync> MemoryDescriptor for RequestMemory<M> {
    fn segment_count(&self) -> usize {
        self.memory.segment_count()
    }

    fn segment(&self, index: usize) -> Segment<'_> {
        self.memory.segment(index)
    }

    fn total_length(&self) -> u64 {
        self.memory.total_length()
    }
}

fn length_of<M: MemoryDescriptor>(m: &Option<Arc<M>>) -> u64 {
    m.as_ref().map_or(0, |m| m.total_length())
}

const REQUEST: &str = "request";

impl<M: MemoryDescriptor + Sync> RequestShared<M> {
    pub(crate) fn new(
        id: u64,
        spec: RequestSpec<M>,
        verifier: bool,
        queue: Weak<dyn QueueLink<M>>,
        phase: Phase,
    ) -> Arc<Self> {
        Arc::new(Self {
            id,
            kind: spec.kind,
            ioctl: spec.ioctl,
            input: spec.input.map(Arc::new),
            output: spec.output.map(Arc::new),
            verifier,
            queue,
            state: Mutex::new(ReqState {
                phase,
                cancel: Cancel::NotCancelable,
                cancelled: false,
                information: 0,
                completed: None,
            }),
            done: Condvar::new(),
            dma_active: AtomicU32::new(0),
            refused: AtomicU64::new(0),
        })
    }
}

impl<M> RequestShared<M> {
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn phase(&self) -> Phase {
        lock(&self.state).phase
    }

    /// The queue hands the request to the driver.
    pub(crate) fn set_delivered(&self) {
        let mut st = lock(&self.state);
        if st.phase == Phase::Queued {
            st.phase = Phase::Delivered;
        }
    }

    /// The framework completes a request the driver never saw (no handler, cancelled while
    /// queued, queue or device deleted). Returns whether this call completed it.
    pub(crate) fn complete_by_framework(&self, status: Result<()>) -> bool {
        let mut st = lock(&self.state);
        if st.phase == Phase::Completed {
            return false;
        }
        st.phase = Phase::Completed;
        st.cancel = Cancel::NotCancelable;
        st.completed = Some(Completed {
            status,
            information: 0,
        });
        drop(st);
        // Before the issuer is woken, as in `Request::complete`.
        trace_event!(
            "request.complete",
            request = self.id,
            status = ?crate::trace::Status(status),
            information = 0u64
        );
        self.done.notify_all();
        true
    }

    fn completed(&self) -> Option<Completed> {
        lock(&self.state).completed
    }
}

impl<M> RequestShared<M>
where
    M: MemoryDescriptor + Sync,
{
    /// Cancel (the issuer's side, or the framework's at delete). See [`RequestHandle::cancel`].
    pub(crate) fn cancel(self: &Arc<Self>) -> Result<bool> {
        loop {
            let phase = self.phase();
            match phase {
                Phase::Completed => return Err(Error::InvalidDeviceState),
                Phase::Queued => {
                    // A request not in its queue is never Queued (the queue changes the phase
                    // under its own lock), so a failed withdraw means the phase moved on.
                    let withdrawn = self.queue.upgrade().is_some_and(|q| q.withdraw(self.id));
                    if withdrawn {
                        self.complete_by_framework(Err(Error::Cancelled));
                        return Ok(true);
                    }
                    if self.queue.strong_count() == 0 && self.phase() == Phase::Queued {
                        // The queue is being dropped; its drop completes the request.
                        std::thread::yield_now();
                    }
                }
                Phase::Delivered => {
                    let mut st = lock(&self.state);
                    if st.phase != Phase::Delivered {
                        continue;
                    }
                    if st.cancelled {
                        return Ok(false);
                    }
                    st.cancelled = true;
                    let callback = match st.cancel {
                        Cancel::Cancelable(cb) => {
                            st.cancel = Cancel::Claimed;
                            Some(cb)
                        }
                        _ => None,
                    };
                    drop(st);
                    if let Some(cb) = callback {
                        cb(&Request {
                            shared: Arc::clone(self),
                        });
                    }
                    return Ok(true);
                }
            }
        }
    }
}

impl<M: MemoryDescriptor + Sync> Request<M> {
    /// The request's number, unique within the process.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The major function.
    pub fn kind(&self) -> RequestKind {
        self.shared.kind
    }

    /// The IOCTL code of a (internal) device control request.
    pub fn ioctl_code(&self) -> Option<IoctlCode> {
        self.shared.ioctl
    }

    /// Bytes in the input buffer (a write's buffer, or an IOCTL's input); 0 without one.
    pub fn input_length(&self) -> u64 {
        length_of(&self.shared.input)
    }

    /// Bytes in the output buffer (a read's buffer, or an IOCTL's output); 0 without one.
    pub fn output_length(&self) -> u64 {
        length_of(&self.shared.output)
    }

    /// The input buffer (`WdfRequestRetrieveInputMemory`).
    ///
    /// For `METHOD_BUFFERED` WDF hands the driver one system buffer holding the input, into
    /// which the driver writes the output; dmatx keeps the issuer's two buffers apart: this is
    /// the input buffer, [`Request::output_memory`] the output buffer.
    pub fn input_memory(&self) -> Option<RequestMemory<M>> {
        self.shared.input.as_ref().map(|m| RequestMemory {
            memory: Arc::clone(m),
        })
    }

    /// The output buffer (`WdfRequestRetrieveOutputMemory`; for `METHOD_IN_DIRECT` and
    /// `METHOD_OUT_DIRECT` the buffer WDF describes with an MDL).
    pub fn output_memory(&self) -> Option<RequestMemory<M>> {
        self.shared.output.as_ref().map(|m| RequestMemory {
            memory: Arc::clone(m),
        })
    }

    /// Complete the request with `status` (`WdfRequestComplete`); the information value is
    /// the one last set with [`Request::set_information`] (0 by default).
    ///
    /// A request that is still marked cancelable cannot be completed: WDF requires the driver
    /// to call `WdfRequestUnmarkCancelable` first, outside the cancel callback, because the
    /// cancel callback could otherwise complete it too; dmatx enforces that rule. Inside the
    /// cancel callback the request is no longer cancelable and may be completed.
    ///
    /// # Errors
    /// [`Error::ObjectMisuse`], leaving the request as it was, when the request was already
    /// completed, when its DMA transaction is executing (statement 55: between execute and the
    /// completion that finishes the transaction), or when it is still marked cancelable.
    ///
    /// # Panics
    /// On those misuses when the device's verifier is on (after every lock is released).
    pub fn complete(&self, status: Result<()>) -> Result<()> {
        self.finish(status, None)
    }

    /// Complete the request with `status` and the information value `information`
    /// (`WdfRequestCompleteWithInformation`).
    ///
    /// # Errors
    /// As [`Request::complete`].
    ///
    /// # Panics
    /// As [`Request::complete`].
    pub fn complete_with_information(&self, status: Result<()>, information: u64) -> Result<()> {
        self.finish(status, Some(information))
    }

    fn finish(&self, status: Result<()>, information: Option<u64>) -> Result<()> {
        let result = self.complete_inner(status, information);
        match &result {
            Ok(()) => {
                if let Some(queue) = self.shared.queue.upgrade() {
                    queue.request_completed(self.shared.id);
                }
            }
            Err(_) => {
                // ORDERING: a statistic; read after the request's completion is observed.
                self.shared.refused.fetch_add(1, Ordering::Relaxed);
            }
        }
        verify(self.shared.verifier, result)
    }

    fn complete_inner(&self, status: Result<()>, information: Option<u64>) -> Result<()> {
        const CALL: &str = "WdfRequestComplete";
        let mut st = lock(&self.shared.state);
        match st.phase {
            Phase::Completed => {
                return Err(misuse(
                    REQUEST,
                    CALL,
                    "completed",
                    "a request is completed exactly once",
                ));
            }
            Phase::Queued => {
                return Err(misuse(
                    REQUEST,
                    CALL,
                    "queued",
                    "the driver completes only requests delivered to it",
                ));
            }
            Phase::Delivered => {}
        }
        // ORDERING: Acquire pairs with the Release in `set_dma_active(false)`, so the end of
        // the transaction's use of the buffers happens-before the completion.
        if self.shared.dma_active.load(Ordering::Acquire) != 0 {
            return Err(misuse(
                REQUEST,
                CALL,
                "DMA executing",
                "its DMA transaction is executing; complete the request after the transaction \
                 finishes (statement 55)",
            ));
        }
        if let Cancel::Cancelable(_) = st.cancel {
            return Err(misuse(
                REQUEST,
                CALL,
                "cancelable",
                "the request is still marked cancelable; unmark_cancelable first (or complete \
                 it from its cancel callback)",
            ));
        }
        let information = information.unwrap_or(st.information);
        st.phase = Phase::Completed;
        st.information = information;
        st.completed = Some(Completed {
            status,
            information,
        });
        drop(st);
        // Before the issuer is woken: a waiting issuer may end the recording once it returns.
        trace_event!(
            "request.complete",
            request = self.shared.id,
            status = ?crate::trace::Status(status),
            information
        );
        self.shared.done.notify_all();
        Ok(())
    }

    /// Set the information value the next [`Request::complete`] reports
    /// (`WdfRequestSetInformation`).
    ///
    /// # Errors
    /// [`Error::ObjectMisuse`] if the request was completed.
    ///
    /// # Panics
    /// On that misuse when the device's verifier is on.
    pub fn set_information(&self, information: u64) -> Result<()> {
        let result = {
            let mut st = lock(&self.shared.state);
            if st.phase == Phase::Completed {
                Err(misuse(
                    REQUEST,
                    "WdfRequestSetInformation",
                    "completed",
                    "the request was completed",
                ))
            } else {
                st.information = information;
                Ok(())
            }
        };
        verify(self.shared.verifier, result)
    }

    /// The information value set so far.
    pub fn information(&self) -> u64 {
        lock(&self.shared.state).information
    }

    /// Let the request be cancelled while the driver holds it (`WdfRequestMarkCancelableEx`):
    /// a later [`RequestHandle::cancel`] runs `callback` on the cancelling thread.
    ///
    /// # Errors
    /// [`Error::Cancelled`] if the request was already cancelled: the callback is neither stored
    /// nor called, and the driver completes the request itself. [`Error::ObjectMisuse`] if the
    /// request was completed or is already marked cancelable.
    ///
    /// # Panics
    /// On those misuses when the device's verifier is on.
    pub fn mark_cancelable(&self, callback: CancelCallback<M>) -> Result<()> {
        const CALL: &str = "WdfRequestMarkCancelableEx";
        let result = {
            let mut st = lock(&self.shared.state);
            if st.phase == Phase::Completed {
                Err(misuse(
                    REQUEST,
                    CALL,
                    "completed",
                    "the request was completed",
                ))
            } else if let Cancel::Cancelable(_) = st.cancel {
                Err(misuse(
                    REQUEST,
                    CALL,
                    "cancelable",
                    "the request is already marked cancelable",
                ))
            } else if st.cancelled {
                Err(Error::Cancelled)
            } else {
                st.cancel = Cancel::Cancelable(callback);
                Ok(())
            }
        };
        verify(self.shared.verifier, result)
    }

    /// Make the request not cancelable again (`WdfRequestUnmarkCancelable`); on success the
    /// cancel callback will not run and the driver completes the request.
    ///
    /// # Errors
    /// [`Error::Cancelled`] if a cancellation claimed the request: its cancel callback runs or
    /// has run, and it completes the request (the driver must not). [`Error::ObjectMisuse`] if
    /// the request is not marked cancelable (never marked, or already unmarked; WDF returns
    /// `STATUS_INVALID_PARAMETER` there) or was completed.
    ///
    /// # Panics
    /// On those misuses when the device's verifier is on.
    pub fn unmark_cancelable(&self) -> Result<()> {
        const CALL: &str = "WdfRequestUnmarkCancelable";
        let result = {
            let mut st = lock(&self.shared.state);
            if st.phase == Phase::Completed {
                Err(misuse(
                    REQUEST,
                    CALL,
                    "completed",
                    "the request was completed",
                ))
            } else {
                match st.cancel {
                    Cancel::Cancelable(_) => {
                        st.cancel = Cancel::NotCancelable;
                        Ok(())
                    }
                    Cancel::Claimed => Err(Error::Cancelled),
                    Cancel::NotCancelable => Err(misuse(
                        REQUEST,
                        CALL,
                        "not cancelable",
                        "the request is not marked cancelable",
                    )),
                }
            }
        };
        verify(self.shared.verifier, result)
    }

    /// Whether the request has been cancelled (`WdfRequestIsCanceled`).
    pub fn is_cancelled(&self) -> bool {
        lock(&self.shared.state).cancelled
    }

    /// Whether the request has been completed.
    pub fn is_completed(&self) -> bool {
        self.shared.phase() == Phase::Completed
    }

    /// The request as the core's binding (what a transaction stores).
    pub(crate) fn binding(&self) -> Arc<dyn RequestBinding> {
        Arc::clone(&self.shared) as Arc<dyn RequestBinding>
    }

    pub(crate) fn verifier(&self) -> bool {
        self.shared.verifier
    }
}

impl<M> RequestBinding for RequestShared<M>
where
    M: MemoryDescriptor + Sync,
{
    fn set_dma_active(&self, active: bool) {
        // ORDERING: Release pairs with the Acquire in `complete`, so the end of every DMA on
        // the request's memory happens-before its completion.
        if active {
            self.dma_active.fetch_add(1, Ordering::AcqRel);
        } else {
            let before = self.dma_active.fetch_sub(1, Ordering::AcqRel);
            debug_assert!(before > 0, "set_dma_active(false) without a matching true");
        }
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

impl<M: MemoryDescriptor + Sync> RequestHandle<M> {
    pub(crate) fn new(shared: Arc<RequestShared<M>>) -> Self {
        Self { shared }
    }

    /// The request's number (the one [`Request::id`] reports).
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The major function.
    pub fn kind(&self) -> RequestKind {
        self.shared.kind
    }

    /// Cancel the request (as `WdfRequestCancelSentRequest` does for a request a driver sent).
    ///
    /// `Ok(true)`: the cancellation was delivered — the request was still queued and the queue
    /// completed it with [`Error::Cancelled`] without the driver seeing it; or the driver had
    /// marked it cancelable and its cancel callback has now run on this thread; or it was
    /// flagged cancelled, for the driver's next [`Request::mark_cancelable`] (which then fails
    /// with `Cancelled`) or [`Request::is_cancelled`] to see. `Ok(false)`: it had already been
    /// cancelled and the driver holds it.
    ///
    /// # Errors
    /// [`Error::InvalidDeviceState`] if the request has completed (issuers race completion
    /// legitimately, so this is no misuse).
    pub fn cancel(&self) -> Result<bool> {
        self.shared.cancel()
    }

    /// Wait until the request completes.
    pub fn wait(&self) -> Completed {
        let mut st = lock(&self.shared.state);
        loop {
            if let Some(c) = st.completed {
                return c;
            }
            st = wait(&self.shared.done, st);
        }
    }

    /// Wait at most `timeout` for the request to complete.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Completed> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.state);
        loop {
            if let Some(c) = st.completed {
                return Some(c);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            st = wait_for(&self.shared.done, st, deadline - now);
        }
    }

    /// The completion, if the request has completed.
    pub fn try_completed(&self) -> Option<Completed> {
        self.shared.completed()
    }

    /// The input buffer the request was submitted with. Before completion the driver (and its
    /// device) may still be using it.
    pub fn input(&self) -> Option<&M> {
        self.shared.input.as_deref()
    }

    /// The output buffer the request was submitted with (a read's buffer). Before completion
    /// the driver (and its device) may still be using it.
    pub fn output(&self) -> Option<&M> {
        self.shared.output.as_deref()
    }

    /// How many completion calls on this request were refused as misuse (tests assert 0).
    pub fn refused_completions(&self) -> u64 {
        // ORDERING: a statistic.
        self.shared.refused.load(Ordering::Relaxed)
    }
}
