//! The link between a transaction and the I/O request it serves (spec §1.2 "Request binding").
//!
//! dmatx's core knows nothing of requests: a driver runtime (such as `dmatx-runtime`) implements
//! [`RequestBinding`] for its request type and binds a request with
//! [`Transaction::initialize_with_request`](crate::Transaction::initialize_with_request). The
//! transaction then tells the request when it holds it — from a successful execute until the
//! transaction finishes, fails to start, or is cancelled — so the runtime can refuse to complete
//! a request whose DMA is still running (statement 55).

use alloc::sync::Arc;
use core::any::Any;

/// A request a transaction can be bound to (KMDF's WDFREQUEST, as far as DMA needs it).
///
/// # Contract
/// [`RequestBinding::set_dma_active`] is called with the transaction's lock held, so it must be
/// short and must not call into the transaction (an atomic store is the intended body).
pub trait RequestBinding: Send + Sync + 'static {
    /// The bound transaction took hold of the request at execute (`true`), or let go of it
    /// (`false`): the transaction finished, failed to start, was cancelled, or was released.
    /// Calls come in pairs: every `true` is followed by exactly one `false`.
    fn set_dma_active(&self, active: bool);

    /// The request as `Any`, so the runtime can recover its own type from
    /// [`Transaction::request`](crate::Transaction::request).
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}
