//! Transactions bound to requests (spec §2.2 "InitializeUsingRequest", §1.2 "Request
//! binding"; statements 22–26 and 55).
//!
//! [`initialize_using_request`] derives the buffer, offset and length from a request and binds
//! the request to the transaction; while the transaction executes, the request refuses to be
//! completed. [`request_of`] gives the bound request back (`WdfDmaTransactionGetRequest`).

use std::sync::Arc;

use dmatx::hal::{MemoryDescriptor, Platform};
use dmatx::{Direction, Enabler, Error, ProgramDma, Result, Transaction};

use crate::device::Device;

use crate::ioctl::TransferMethod;
use crate::request::{Request, RequestKind, RequestMemory, RequestShared};
use crate::sync::{misuse, verify};

/// Create a transaction on `enabler` for a driver on `device` (`WdfDmaTransactionCreate`),
/// honouring the device's low-memory knob ([`Device::fail_next_allocations`]) so a driver's
/// fallback for a failed creation can be tested on any platform.
///
/// # Errors
/// [`Error::InsufficientResources`] when the knob refuses it or the platform cannot take
/// another transaction; [`Error::InvalidDeviceState`] after the device or the enabler was
/// deleted; the errors of [`Transaction::create`].
pub fn create_transaction<X, P, C, B>(
    device: &Device<X>,
    enabler: &Enabler<P>,
) -> Result<Arc<Transaction<P, C, B>>>
where
    X: Send + Sync + 'static,
    P: Platform,
    C: Clone + Send + Sync + 'static,
    B: MemoryDescriptor,
{
    device.check_allocation()?;
    Transaction::create(enabler)
}

/// Initialize `t` from `request` (`WdfDmaTransactionInitializeUsingRequest`) and bind the
/// request to it.
///
/// The buffer and length come from the request: a read needs [`Direction::ReadFromDevice`] and
/// uses its output buffer, a write needs [`Direction::WriteToDevice`] and uses its input
/// buffer. A (internal) device control request with `METHOD_BUFFERED` works in either
/// direction, with the input buffer and length when writing to the device and the output
/// buffer and length when reading from it; `METHOD_IN_DIRECT` only writes to the device and
/// `METHOD_OUT_DIRECT` only reads from it, both with the output buffer and length. The offset
/// is always 0.
///
/// # Errors
/// [`Error::InvalidDeviceRequest`] for a direction the request type does not allow (statement
/// 22), `METHOD_NEITHER` (24), any other major function, a missing buffer, or a zero length
/// (23: not `InvalidParameter`). [`Error::ObjectMisuse`] if the request was already completed.
/// Then the core's checks of
/// [`Transaction::initialize_with_request`] (for example [`Error::InvalidParameter`] when a v2
/// packet transaction's range runs past the buffer's first segment); on every error nothing is
/// bound.
///
/// # Panics
/// On the request misuse when the device's verifier is on (the core's own misuses follow the
/// enabler's verifier setting).
pub fn initialize_using_request<P, C, M>(
    t: &Transaction<P, C, RequestMemory<M>>,
    request: &Request<M>,
    program_dma: ProgramDma<P, C, RequestMemory<M>>,
    direction: Direction,
) -> Result<()>
where
    P: Platform,
    C: Clone + Send + Sync + 'static,
    M: MemoryDescriptor + Sync,
{
    if request.is_completed() {
        return verify(
            request.verifier(),
            Err(misuse(
                "request",
                "WdfDmaTransactionInitializeUsingRequest",
                "completed",
                "the request was completed",
            )),
        );
    }
    let memory = request_memory(request, direction)?;
    let length = memory.total_length();
    if length == 0 {
        return Err(Error::InvalidDeviceRequest);
    }
    t.initialize_with_request(program_dma, direction, memory, 0, length, request.binding())
        .map_err(|e| e.error)
}

/// Which of the request's buffers a transfer in `direction` uses.
fn request_memory<M: MemoryDescriptor + Sync>(
    request: &Request<M>,
    direction: Direction,
) -> Result<RequestMemory<M>> {
    let memory = match (request.kind(), direction) {
        (RequestKind::Read, Direction::ReadFromDevice) => request.output_memory(),
        (RequestKind::Write, Direction::WriteToDevice) => request.input_memory(),
        (RequestKind::DeviceControl | RequestKind::InternalDeviceControl, _) => {
            let Some(code) = request.ioctl_code() else {
                return Err(Error::InvalidDeviceRequest);
            };
            match (code.method(), direction) {
                (TransferMethod::Buffered, Direction::WriteToDevice) => request.input_memory(),
                (TransferMethod::Buffered, Direction::ReadFromDevice)
                | (TransferMethod::InDirect, Direction::WriteToDevice)
                | (TransferMethod::OutDirect, Direction::ReadFromDevice) => request.output_memory(),
                _ => None,
            }
        }
        _ => None,
    };
    memory.ok_or(Error::InvalidDeviceRequest)
}

/// The request bound to `t` by [`initialize_using_request`] (`WdfDmaTransactionGetRequest`),
/// until the transaction is released; `None` after a plain initialize (statement 26) or if the
/// binding is not a request of this runtime with memory type `M`.
pub fn request_of<P, C, M>(t: &Transaction<P, C, RequestMemory<M>>) -> Option<Request<M>>
where
    P: Platform,
    C: Clone + Send + Sync + 'static,
    M: MemoryDescriptor + Sync,
{
    let shared = t
        .request()?
        .into_any()
        .downcast::<RequestShared<M>>()
        .ok()?;
    Some(Request { shared })
}
