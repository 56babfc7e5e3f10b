//! Errors of the VFIO platform: each names the device (or the object) and the cause.

use std::fmt;

pub use rustix::io::Errno;

/// What went wrong, for callers that branch on it. The [`VfioError`] carries the details.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// `/dev/vfio/vfio` is missing or cannot be opened (no VFIO in the kernel, modules not
    /// loaded, no permission).
    NoVfio,
    /// The PCI device does not exist.
    NoDevice,
    /// The device is not bound to `vfio-pci` (bound to another driver, or to none).
    NotBound,
    /// The device has no IOMMU group (no IOMMU, and no-IOMMU mode not enabled).
    NoIommuGroup,
    /// The group is not viable: another device in it is bound to a host driver.
    GroupNotViable,
    /// The kernel's VFIO lacks something dmatx needs (API version, the type1v2 IOMMU).
    Unsupported,
    /// No-IOMMU mode was asked for, but the kernel does not support or enable it.
    NoIommuUnsupported,
    /// Opening the device through its group failed (busy, already open, no permission).
    DeviceOpen,
    /// A region's information could not be read, or the region is not what was asked for.
    Region,
    /// A BAR could not be mapped into the process.
    BarMap,
    /// A config-space access failed.
    Config,
    /// An interrupt could not be set up, unmasked or torn down.
    Interrupt,
    /// The IOMMU refused a DMA mapping or unmapping.
    DmaMap,
    /// No IOVA range inside the device's address window is free.
    IovaExhausted,
    /// Locked memory could not be allocated, locked or resolved to physical addresses.
    Memory,
    /// The device did not finish in time.
    Timeout,
    /// The caller passed something that cannot work (a zero length, an offset outside a
    /// region, an address width outside 24..=64).
    InvalidArgument,
}

/// An error of the VFIO platform: the kind, the subject (a PCI address such as `0000:00:03.0`,
/// or an object such as `/dev/vfio/vfio`), what failed, and the system's error number when
/// there is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfioError {
    kind: ErrorKind,
    subject: String,
    message: String,
    errno: Option<Errno>,
}

impl VfioError {
    /// An error of `kind` about `subject`, saying `message`.
    pub fn new(kind: ErrorKind, subject: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind,
            subject: subject.into(),
            message: message.into(),
            errno: None,
        }
    }

    /// The same error, with the system's error number that caused it.
    #[must_use]
    pub fn with_errno(mut self, errno: Errno) -> Self {
        self.errno = Some(errno);
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The device or object the error is about.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// What failed, in words.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The system's error number, if a system call failed.
    pub fn errno(&self) -> Option<Errno> {
        self.errno
    }
}

impl fmt::Display for VfioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.subject, self.message)?;
        if let Some(errno) = self.errno {
            write!(f, " ({errno})")?;
        }
        Ok(())
    }
}

impl std::error::Error for VfioError {}

impl From<VfioError> for dmatx_types::Error {
    /// The framework's status for a platform failure (the details are lost: log the
    /// [`VfioError`] first where they matter).
    fn from(e: VfioError) -> Self {
        match e.kind {
            ErrorKind::IovaExhausted | ErrorKind::Memory => Self::InsufficientResources,
            ErrorKind::Timeout => Self::IoTimeout,
            ErrorKind::InvalidArgument => Self::InvalidParameter,
            ErrorKind::DmaMap => Self::DeviceDataError,
            _ => Self::Unsuccessful,
        }
    }
}

/// Result of the VFIO platform's operations.
pub type VfioResult<T> = Result<T, VfioError>;
