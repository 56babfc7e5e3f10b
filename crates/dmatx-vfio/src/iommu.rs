//! How device addresses are made: the seam between the container (which owns the IOMMU
//! domain) and the DMA layer (which owns the IOVA space and the memory).

use crate::error::VfioResult;

/// How the device reaches memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IommuMode {
    /// Through the IOMMU: the container's type1v2 domain translates IOVAs that dmatx chooses
    /// and maps with `VFIO_IOMMU_MAP_DMA`.
    Iommu,
    /// Without an IOMMU (`vfio.enable_unsafe_noiommu_mode=1`): the device uses physical
    /// addresses, read from `/proc/self/pagemap`; nothing confines it.
    NoIommu,
}

/// Maps process memory at IOVAs of the device's IOMMU domain. The container implements it;
/// the DMA layer's unit tests implement it with a recorder.
pub(crate) trait DmaMapper: Send + Sync {
    /// Make `size` bytes at process address `vaddr` visible to the device at `iova`
    /// (`VFIO_IOMMU_MAP_DMA`, read and write). `iova`, `vaddr` and `size` are page-aligned.
    ///
    /// # Safety
    /// The `size` bytes at `vaddr` must stay mapped in the process, and no Rust reference to
    /// them may exist, until [`DmaMapper::unmap`] of the same range returns: the device may read
    /// and write them at any time until then.
    unsafe fn map(&self, iova: u64, vaddr: usize, size: u64) -> VfioResult<()>;

    /// End the mapping made at `iova` for `size` bytes (`VFIO_IOMMU_UNMAP_DMA`). After it
    /// returns `Ok`, the device can no longer reach the memory.
    fn unmap(&self, iova: u64, size: u64) -> VfioResult<()>;
}
