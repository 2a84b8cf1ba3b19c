use super::{HEADER_FIXED_LEN, PACKET_SIZE};
use crate::error::{Result, fail};

/// Page size and the packet shape it implies. Both sides must use the same page size: the
/// header length depends on it and nothing on the wire says which one the peer used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    page_size: u32,
    page_count: u32,
}

impl Geometry {
    /// The smallest page size accepted (QEMU targets use 4 KiB; smaller is only for tests).
    pub const MIN_PAGE_SIZE: u32 = 512;

    /// Geometry for `page_size`, which must be a power of two from 512 bytes to 512 KiB.
    pub fn new(page_size: u32) -> Result<Self> {
        if !page_size.is_power_of_two() || !(Self::MIN_PAGE_SIZE..=PACKET_SIZE).contains(&page_size) {
            fail!(
                InvalidArgument,
                "page size must be a power of two from {} to {PACKET_SIZE}, got {page_size}",
                Self::MIN_PAGE_SIZE
            );
        }
        Ok(Geometry { page_size, page_count: PACKET_SIZE / page_size })
    }

    /// The geometry of 4 KiB pages: 128 pages per packet.
    pub const fn x86() -> Self {
        Geometry { page_size: 4096, page_count: 128 }
    }

    pub const fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Pages per packet (QEMU's `page_count`, N).
    pub const fn page_count(&self) -> u32 {
        self.page_count
    }

    /// Length of a RAM packet header: 320 + 8 x N bytes (1344 for 4 KiB pages).
    pub const fn header_len(&self) -> usize {
        HEADER_FIXED_LEN + 8 * self.page_count as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn x86_shape() {
        let g = Geometry::new(4096).unwrap();
        assert_eq!(g, Geometry::x86());
        assert_eq!(g.page_count(), 128);
        assert_eq!(g.header_len(), 1344);
        assert_eq!(Geometry::new(65536).unwrap().header_len(), 320 + 64);
    }

    #[test]
    fn rejects_odd_page_sizes() {
        for bad in [0, 1, 256, 4095, 6144, 1 << 20] {
            assert_eq!(Geometry::new(bad).unwrap_err().code, ErrorCode::InvalidArgument, "{bad}");
        }
    }
}
