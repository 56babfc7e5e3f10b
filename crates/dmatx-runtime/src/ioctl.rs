//! I/O control codes (the `CTL_CODE` layout) and their transfer methods.

/// How the I/O manager passes an IOCTL's buffers (the low two bits of the code).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransferMethod {
    /// `METHOD_BUFFERED`: the framework passes system buffers.
    Buffered,
    /// `METHOD_IN_DIRECT`: the output buffer is locked and described for the device to read.
    InDirect,
    /// `METHOD_OUT_DIRECT`: the output buffer is locked and described for the device to write.
    OutDirect,
    /// `METHOD_NEITHER`: raw user addresses; not usable for DMA.
    Neither,
}

impl TransferMethod {
    const fn bits(self) -> u32 {
        match self {
            TransferMethod::Buffered => 0,
            TransferMethod::InDirect => 1,
            TransferMethod::OutDirect => 2,
            TransferMethod::Neither => 3,
        }
    }

    const fn from_bits(bits: u32) -> Self {
        match bits & 3 {
            0 => TransferMethod::Buffered,
            1 => TransferMethod::InDirect,
            2 => TransferMethod::OutDirect,
            _ => TransferMethod::Neither,
        }
    }
}

/// An I/O control code, laid out as Windows' `CTL_CODE` macro lays it out:
/// `device_type << 16 | access << 14 | function << 2 | method`.
///
/// ```
/// use dmatx_runtime::{IoctlCode, TransferMethod};
///
/// const GET_STATUS: IoctlCode =
///     IoctlCode::new(0x8000, 0x800, TransferMethod::OutDirect, IoctlCode::ANY_ACCESS);
/// assert_eq!(GET_STATUS.0, 0x8000_2002);
/// assert_eq!(GET_STATUS.method(), TransferMethod::OutDirect);
/// assert_eq!(GET_STATUS.function(), 0x800);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IoctlCode(pub u32);

impl IoctlCode {
    /// `FILE_ANY_ACCESS`.
    pub const ANY_ACCESS: u32 = 0;
    /// `FILE_READ_ACCESS`.
    pub const READ_ACCESS: u32 = 1;
    /// `FILE_WRITE_ACCESS`.
    pub const WRITE_ACCESS: u32 = 2;

    /// `CTL_CODE(device_type, function, method, access)`. Fields are masked to their widths
    /// (16 bits of device type, 12 of function, 2 of access).
    pub const fn new(device_type: u32, function: u32, method: TransferMethod, access: u32) -> Self {
        IoctlCode(
            ((device_type & 0xFFFF) << 16)
                | ((access & 3) << 14)
                | ((function & 0xFFF) << 2)
                | method.bits(),
        )
    }

    /// The transfer method (`METHOD_FROM_CTL_CODE`).
    pub const fn method(self) -> TransferMethod {
        TransferMethod::from_bits(self.0)
    }

    /// The device type (`DEVICE_TYPE_FROM_CTL_CODE`).
    pub const fn device_type(self) -> u32 {
        self.0 >> 16
    }

    /// The function number.
    pub const fn function(self) -> u32 {
        (self.0 >> 2) & 0xFFF
    }

    /// The required access.
    pub const fn access(self) -> u32 {
        (self.0 >> 14) & 3
    }
}
