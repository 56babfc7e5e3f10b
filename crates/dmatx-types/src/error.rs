//! Status codes with KMDF's names, and misuse diagnostics.

use crate::State;

/// Result with a dmatx [`Error`].
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// A failed DMA operation, named as KMDF names its status (`STATUS_…`).
///
/// Two tiers: every variant but [`Error::Misuse`] is a recoverable condition a driver handles;
/// [`Error::Misuse`] reports a contract violation that KMDF would bug-check on. It names the call
/// and the state, and the object it concerns is left as it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Error {
    /// `STATUS_INVALID_PARAMETER`.
    InvalidParameter,
    /// `STATUS_INVALID_DEVICE_REQUEST`.
    InvalidDeviceRequest,
    /// `STATUS_INVALID_DEVICE_STATE`.
    InvalidDeviceState,
    /// `STATUS_INSUFFICIENT_RESOURCES`.
    InsufficientResources,
    /// `STATUS_INFO_LENGTH_MISMATCH`: a raw configuration's `size` is not the expected one.
    InfoLengthMismatch,
    /// `STATUS_UNSUCCESSFUL`.
    Unsuccessful,
    /// `STATUS_INTEGER_OVERFLOW`: a length plus alignment does not fit.
    IntegerOverflow,
    /// `STATUS_BUFFER_TOO_SMALL`: the buffer chain is shorter than the length asked for.
    BufferTooSmall,
    /// `STATUS_INVALID_BUFFER_SIZE`: a request's buffer is larger than the device takes (a
    /// driver's status; dmatx itself does not return it).
    InvalidBufferSize,
    /// `STATUS_CANCELLED`.
    Cancelled,
    /// `STATUS_DEVICE_DATA_ERROR`: the device reported a DMA error.
    DeviceDataError,
    /// `STATUS_IO_TIMEOUT`.
    IoTimeout,
    /// `STATUS_WDF_BUSY`: a v2 packet transaction is already active on the device.
    WdfBusy,
    /// `STATUS_WDF_TOO_FRAGMENTED`: a transfer would need more SG elements than allowed.
    WdfTooFragmented,
    /// `STATUS_WDF_TOO_MANY_TRANSFERS`: a single-transfer transaction needs more than one.
    WdfTooManyTransfers,
    /// `STATUS_WDF_NOT_ENOUGH_MAP_REGISTERS`: a single transfer needs more map registers than
    /// the adapter (or the reservation) has.
    WdfNotEnoughMapRegisters,
    /// `STATUS_WDF_PARENT_ASSIGNMENT_NOT_ALLOWED`.
    WdfParentAssignmentNotAllowed,
    /// A call KMDF treats as fatal (a bug check). See [`Misuse`].
    Misuse(Misuse),
    /// A call the driver framework (WDF) treats as fatal on one of the runtime's objects — a
    /// request, queue, timer or interrupt. See [`ObjectMisuse`].
    ObjectMisuse(ObjectMisuse),
}

impl Error {
    /// The NTSTATUS value KMDF would return for this error (`Misuse` maps to
    /// `STATUS_INVALID_DEVICE_STATE`, since KMDF returns nothing there: it bug-checks).
    pub const fn nt_status(&self) -> u32 {
        match self {
            Error::InvalidParameter => 0xC000_000D,
            Error::InvalidDeviceRequest => 0xC000_0010,
            Error::InvalidDeviceState | Error::Misuse(_) | Error::ObjectMisuse(_) => 0xC000_0184,
            Error::InsufficientResources => 0xC000_009A,
            Error::InfoLengthMismatch => 0xC000_0004,
            Error::Unsuccessful => 0xC000_0001,
            Error::IntegerOverflow => 0xC000_0095,
            Error::BufferTooSmall => 0xC000_0023,
            Error::InvalidBufferSize => 0xC000_0206,
            Error::Cancelled => 0xC000_0120,
            Error::DeviceDataError => 0xC000_009C,
            Error::IoTimeout => 0xC000_00B5,
            Error::WdfBusy => 0xC020_0204,
            Error::WdfTooFragmented => 0xC020_020A,
            Error::WdfTooManyTransfers => 0xC020_0213,
            Error::WdfNotEnoughMapRegisters => 0xC020_0214,
            Error::WdfParentAssignmentNotAllowed => 0xC020_0208,
        }
    }

    /// The misuse diagnostic, if this is a contract violation on a DMA transaction.
    pub const fn misuse(&self) -> Option<&Misuse> {
        match self {
            Error::Misuse(m) => Some(m),
            _ => None,
        }
    }

    /// Whether this is a contract violation of any kind ([`Error::Misuse`] or
    /// [`Error::ObjectMisuse`]).
    pub const fn is_misuse(&self) -> bool {
        matches!(self, Error::Misuse(_) | Error::ObjectMisuse(_))
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let name = match self {
            Error::InvalidParameter => "STATUS_INVALID_PARAMETER",
            Error::InvalidDeviceRequest => "STATUS_INVALID_DEVICE_REQUEST",
            Error::InvalidDeviceState => "STATUS_INVALID_DEVICE_STATE",
            Error::InsufficientResources => "STATUS_INSUFFICIENT_RESOURCES",
            Error::InfoLengthMismatch => "STATUS_INFO_LENGTH_MISMATCH",
            Error::Unsuccessful => "STATUS_UNSUCCESSFUL",
            Error::IntegerOverflow => "STATUS_INTEGER_OVERFLOW",
            Error::BufferTooSmall => "STATUS_BUFFER_TOO_SMALL",
            Error::InvalidBufferSize => "STATUS_INVALID_BUFFER_SIZE",
            Error::Cancelled => "STATUS_CANCELLED",
            Error::DeviceDataError => "STATUS_DEVICE_DATA_ERROR",
            Error::IoTimeout => "STATUS_IO_TIMEOUT",
            Error::WdfBusy => "STATUS_WDF_BUSY",
            Error::WdfTooFragmented => "STATUS_WDF_TOO_FRAGMENTED",
            Error::WdfTooManyTransfers => "STATUS_WDF_TOO_MANY_TRANSFERS",
            Error::WdfNotEnoughMapRegisters => "STATUS_WDF_NOT_ENOUGH_MAP_REGISTERS",
            Error::WdfParentAssignmentNotAllowed => "STATUS_WDF_PARENT_ASSIGNMENT_NOT_ALLOWED",
            Error::Misuse(m) => return write!(f, "{m}"),
            Error::ObjectMisuse(m) => return write!(f, "{m}"),
        };
        f.write_str(name)
    }
}

impl core::error::Error for Error {}

/// The API call a [`Misuse`] concerns, in KMDF's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Call {
    /// `WdfDmaTransactionInitialize*`.
    Initialize,
    /// `WdfDmaTransactionExecute`.
    Execute,
    /// `WdfDmaTransactionDmaCompleted`.
    DmaCompleted,
    /// `WdfDmaTransactionDmaCompletedWithLength`.
    DmaCompletedWithLength,
    /// `WdfDmaTransactionDmaCompletedFinal`.
    DmaCompletedFinal,
    /// `WdfDmaTransactionRelease`.
    Release,
    /// `WdfDmaTransactionCancel`.
    Cancel,
    /// `WdfObjectDelete` on a transaction.
    Delete,
    /// `WdfDmaTransactionGetTransferInfo`.
    GetTransferInfo,
    /// `WdfDmaTransactionAllocateResources`.
    AllocateResources,
    /// `WdfDmaTransactionFreeResources`.
    FreeResources,
    /// `WdfDmaTransactionStopSystemTransfer`.
    StopSystemTransfer,
    /// `WdfDmaTransactionSetImmediateExecution`.
    SetImmediateExecution,
    /// `WdfDmaTransactionSetSingleTransferRequirement`.
    SetSingleTransferRequirement,
    /// `WdfDmaTransactionSetMaximumLength`.
    SetMaximumLength,
}

/// A contract violation: the call, the state the object was in, and what was wrong.
///
/// KMDF bug-checks (`WDF_VIOLATION`, `WDF_DMA_FATAL_ERROR`) on these; dmatx returns
/// [`Error::Misuse`] and leaves the object unchanged, and in verifier mode also panics with this
/// text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Misuse {
    /// The call that was misused.
    pub call: Call,
    /// The transaction's state when the call was made.
    pub state: State,
    /// What was wrong, in a sentence.
    pub reason: &'static str,
}

impl core::fmt::Display for Misuse {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "dmatx misuse: {:?} in state {}: {}",
            self.call, self.state, self.reason
        )
    }
}

/// A contract violation on a driver-runtime object: the object, the call, the object's state,
/// and what was wrong. WDF bug-checks on these (completing a request twice, completing a request
/// whose DMA transaction is still executing); dmatx returns [`Error::ObjectMisuse`] and leaves the
/// object as it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ObjectMisuse {
    /// The kind of object, e.g. `"request"`, `"timer"`.
    pub object: &'static str,
    /// The call, in WDF's words, e.g. `"WdfRequestComplete"`.
    pub call: &'static str,
    /// The object's state when the call was made, in a word or two.
    pub state: &'static str,
    /// What was wrong, in a sentence.
    pub reason: &'static str,
}

impl core::fmt::Display for ObjectMisuse {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "dmatx misuse: {} on a {} ({}): {}",
            self.call, self.object, self.state, self.reason
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wdf_codes_match_spec() {
        assert_eq!(Error::WdfBusy.nt_status(), 0xC020_0204);
        assert_eq!(Error::WdfTooFragmented.nt_status(), 0xC020_020A);
        assert_eq!(Error::WdfTooManyTransfers.nt_status(), 0xC020_0213);
        assert_eq!(Error::WdfNotEnoughMapRegisters.nt_status(), 0xC020_0214);
    }

    #[test]
    fn misuse_names_call_and_state() {
        extern crate std;
        use std::string::ToString;
        let e = Error::Misuse(Misuse {
            call: Call::Execute,
            state: State::Created,
            reason: "the transaction was never initialized",
        });
        let text = e.to_string();
        assert!(
            text.contains("Execute") && text.contains("Created"),
            "{text}"
        );
        assert_eq!(Error::WdfBusy.to_string(), "STATUS_WDF_BUSY");
    }

    #[test]
    fn object_misuse_names_object_call_and_state() {
        extern crate std;
        use std::string::ToString;
        let e = Error::ObjectMisuse(ObjectMisuse {
            object: "request",
            call: "WdfRequestComplete",
            state: "completed",
            reason: "a request completes once",
        });
        let text = e.to_string();
        assert!(
            text.contains("WdfRequestComplete")
                && text.contains("request")
                && text.contains("completed"),
            "{text}"
        );
        assert!(e.is_misuse());
        assert!(e.misuse().is_none());
        assert_eq!(e.nt_status(), 0xC000_0184);
    }
}
