use super::{BLOCK_NAME_LEN, COMMON_HEADER_LEN, Compression, Flags, Geometry, MAGIC, MAX_BLOCK_NAME, MAX_COMPRESSED_PAYLOAD, VERSION};
use crate::error::{Result, fail};
use crate::hex::Name;

// Byte positions inside a RAM packet header.
const AT_FLAGS: usize = 8;
const AT_PAGES_ALLOC: usize = 12;
const AT_NORMAL: usize = 16;
const AT_NEXT_SIZE: usize = 20;
const AT_PACKET_NUM: usize = 24;
const AT_ZERO: usize = 32;
/// The first reserved u64 (`unused64[0]`): our optional payload digest; QEMU writes 0 here and
/// ignores it on receipt.
const AT_DIGEST: usize = 40;
const AT_NAME: usize = 64;
const AT_OFFSETS: usize = 320;

fn be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(buf[at..at + 4].try_into().unwrap())
}

fn be64(buf: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(buf[at..at + 8].try_into().unwrap())
}

/// The 12 bytes that start every packet (`MultiFDPacketHdr_t`). Reading these first tells the
/// receiver which body follows before it commits to reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommonHeader {
    pub flags: Flags,
}

impl CommonHeader {
    /// Checks magic, version, then that the flags announce a RAM body we understand.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        if buf.len() < COMMON_HEADER_LEN {
            fail!(Truncated, "packet header needs at least {COMMON_HEADER_LEN} bytes, got {}", buf.len());
        }
        let magic = be32(buf, 0);
        if magic != MAGIC {
            fail!(BadMagic, "packet magic 0x{magic:08x}, expected 0x{MAGIC:08x}");
        }
        let version = be32(buf, 4);
        if version != VERSION {
            fail!(BadVersion, "packet version {version}, expected {VERSION}");
        }
        let flags = Flags(be32(buf, AT_FLAGS));
        flags.check_body_kind()?;
        Ok(CommonHeader { flags })
    }
}

/// A RAM packet header (`MultiFDPacket_t`): which pages of which block the payload carries.
///
/// `offsets` holds the `normal_pages` data-page offsets first, then the `zero_pages` zero-page
/// offsets, exactly as on the wire. The payload that follows holds the normal pages in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PacketHeader {
    pub flags: Flags,
    pub pages_alloc: u32,
    pub normal_pages: u32,
    pub zero_pages: u32,
    pub next_packet_size: u32,
    pub packet_num: u64,
    /// xxh3-64 of the normal pages when integrity is negotiated; 0 (as QEMU writes) otherwise.
    pub digest: u64,
    /// The block name without its NUL; empty in packets that carry no pages.
    pub block: Vec<u8>,
    pub offsets: Vec<u64>,
}

impl PacketHeader {
    /// A SYNC-only packet as QEMU >= 9.2 sends it: no pages, `pages_alloc` 0, no name.
    pub fn sync(packet_num: u64) -> Self {
        PacketHeader { flags: Flags(Flags::SYNC), packet_num, ..Default::default() }
    }

    /// A data packet for `block`: normal pages (whose bytes form the payload) then zero pages.
    pub fn data(
        geometry: Geometry,
        compression: Compression,
        packet_num: u64,
        block: &[u8],
        normal: &[u64],
        zero: &[u64],
        next_packet_size: u32,
    ) -> Self {
        let mut offsets = Vec::with_capacity(normal.len() + zero.len());
        offsets.extend_from_slice(normal);
        offsets.extend_from_slice(zero);
        PacketHeader {
            flags: Flags(compression.wire_code()),
            pages_alloc: geometry.page_count(),
            normal_pages: normal.len() as u32,
            zero_pages: zero.len() as u32,
            next_packet_size,
            packet_num,
            digest: 0,
            block: block.to_vec(),
            offsets,
        }
    }

    pub fn normal_offsets(&self) -> &[u64] {
        &self.offsets[..self.normal_pages as usize]
    }

    pub fn zero_offsets(&self) -> &[u64] {
        &self.offsets[self.normal_pages as usize..]
    }

    /// True when the packet lists any page (normal or zero).
    pub fn has_pages(&self) -> bool {
        !self.offsets.is_empty()
    }

    /// Writes the header's `geometry.header_len()` bytes into `out`, fields verbatim (counts are
    /// not checked against `offsets`, so tests can build hostile packets). Unused offset slots
    /// and reserved bytes are zero, as QEMU >= 9.2 writes them.
    pub fn encode_into(&self, geometry: Geometry, out: &mut [u8]) -> Result<()> {
        let len = geometry.header_len();
        if out.len() < len {
            fail!(InvalidArgument, "header buffer holds {} bytes, a header needs {len}", out.len());
        }
        if self.block.len() > MAX_BLOCK_NAME {
            fail!(InvalidArgument, "block name is {} bytes, at most {MAX_BLOCK_NAME} fit", self.block.len());
        }
        if self.offsets.len() > geometry.page_count() as usize {
            fail!(InvalidArgument, "{} offsets do not fit a packet of {} pages", self.offsets.len(), geometry.page_count());
        }
        let out = &mut out[..len];
        out.fill(0);
        out[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&VERSION.to_be_bytes());
        out[AT_FLAGS..AT_FLAGS + 4].copy_from_slice(&self.flags.0.to_be_bytes());
        out[AT_PAGES_ALLOC..AT_PAGES_ALLOC + 4].copy_from_slice(&self.pages_alloc.to_be_bytes());
        out[AT_NORMAL..AT_NORMAL + 4].copy_from_slice(&self.normal_pages.to_be_bytes());
        out[AT_NEXT_SIZE..AT_NEXT_SIZE + 4].copy_from_slice(&self.next_packet_size.to_be_bytes());
        out[AT_PACKET_NUM..AT_PACKET_NUM + 8].copy_from_slice(&self.packet_num.to_be_bytes());
        out[AT_ZERO..AT_ZERO + 4].copy_from_slice(&self.zero_pages.to_be_bytes());
        out[AT_DIGEST..AT_DIGEST + 8].copy_from_slice(&self.digest.to_be_bytes());
        out[AT_NAME..AT_NAME + self.block.len()].copy_from_slice(&self.block);
        for (slot, offset) in out[AT_OFFSETS..].chunks_exact_mut(8).zip(&self.offsets) {
            slot.copy_from_slice(&offset.to_be_bytes());
        }
        Ok(())
    }

    pub fn encode(&self, geometry: Geometry) -> Result<Vec<u8>> {
        let mut out = vec![0; geometry.header_len()];
        self.encode_into(geometry, &mut out)?;
        Ok(out)
    }

    /// Parses a whole header, reusing this value's allocations, with the checks that need no
    /// session context, in QEMU's order: magic, version, body kind, `pages_alloc`,
    /// `normal_pages`, `zero_pages`, then the block name's NUL (only when pages are listed).
    pub fn decode_into(&mut self, buf: &[u8], geometry: Geometry) -> Result<()> {
        let common = CommonHeader::decode(buf)?;
        let len = geometry.header_len();
        if buf.len() < len {
            fail!(Truncated, "packet header needs {len} bytes for {}-byte pages, got {}", geometry.page_size(), buf.len());
        }
        let n = geometry.page_count();
        let pages_alloc = be32(buf, AT_PAGES_ALLOC);
        if pages_alloc > n {
            fail!(PagesAlloc, "pages_alloc {pages_alloc} is above the {n} pages a packet holds");
        }
        let normal = be32(buf, AT_NORMAL);
        if normal > pages_alloc {
            fail!(NormalPages, "normal_pages {normal} is above pages_alloc {pages_alloc}");
        }
        let zero = be32(buf, AT_ZERO);
        if zero > pages_alloc - normal {
            fail!(ZeroPages, "zero_pages {zero} is above pages_alloc {pages_alloc} - normal_pages {normal}");
        }
        self.flags = common.flags;
        self.pages_alloc = pages_alloc;
        self.normal_pages = normal;
        self.zero_pages = zero;
        self.next_packet_size = be32(buf, AT_NEXT_SIZE);
        self.packet_num = be64(buf, AT_PACKET_NUM);
        self.digest = be64(buf, AT_DIGEST);
        self.block.clear();
        self.offsets.clear();
        let listed = (normal + zero) as usize;
        if listed == 0 {
            return Ok(());
        }
        let name = &buf[AT_NAME..AT_NAME + BLOCK_NAME_LEN];
        let Some(nul) = name.iter().position(|&b| b == 0) else {
            fail!(BlockName, "block name has no NUL in its {BLOCK_NAME_LEN} bytes (starts {})", Name(&name[..32]));
        };
        self.block.extend_from_slice(&name[..nul]);
        self.offsets.extend(buf[AT_OFFSETS..AT_OFFSETS + 8 * listed].chunks_exact(8).map(|b| u64::from_be_bytes(b.try_into().unwrap())));
        Ok(())
    }

    pub fn decode(buf: &[u8], geometry: Geometry) -> Result<Self> {
        let mut header = PacketHeader::default();
        header.decode_into(buf, geometry)?;
        Ok(header)
    }
}

/// A block as the receiver knows it: the name on the wire and its used length in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockInfo {
    pub name: Vec<u8>,
    pub length: u64,
}

/// How the validator finds a packet's block: returns its index and used length.
pub trait BlockLookup {
    fn lookup(&self, name: &[u8]) -> Option<(usize, u64)>;
}

impl BlockLookup for [BlockInfo] {
    fn lookup(&self, name: &[u8]) -> Option<(usize, u64)> {
        self.iter().position(|b| b.name == name).map(|i| (i, self[i].length))
    }
}

/// What a header means once it has passed every check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidatedPacket {
    /// Index of the block the pages belong to; `None` when the packet lists no pages.
    pub block: Option<usize>,
    /// Payload bytes that follow the header.
    pub payload_len: u32,
}

/// The checks that need the session: the block table, the page size, the negotiated method.
pub struct PacketValidator<'a, B: BlockLookup + ?Sized> {
    pub geometry: Geometry,
    pub compression: Compression,
    pub blocks: &'a B,
}

impl<B: BlockLookup + ?Sized> PacketValidator<'_, B> {
    /// Decodes and validates one header: `decode_into`'s checks, then the block name is known,
    /// each offset (normal, then zero) is page-aligned with its whole page inside the block,
    /// the method is supported and negotiated, and the payload length fits the pages.
    pub fn decode(&self, buf: &[u8], header: &mut PacketHeader) -> Result<ValidatedPacket> {
        header.decode_into(buf, self.geometry)?;
        self.validate(header)
    }

    pub fn validate(&self, h: &PacketHeader) -> Result<ValidatedPacket> {
        let page = u64::from(self.geometry.page_size());
        let block = if h.has_pages() {
            let Some((index, used)) = self.blocks.lookup(&h.block) else {
                fail!(UnknownBlock, "packet {} names block {}, which is not registered", h.packet_num, Name(&h.block));
            };
            // Page sizes are powers of two (Geometry guarantees it), so alignment is a mask.
            let misaligned = page - 1;
            let last = used.checked_sub(page);
            let fits = |o: u64| o & misaligned == 0 && last.is_some_and(|l| o <= l);
            // Branch-free scan for the common case; the slow loop below only runs to name the fault.
            if !h.offsets.iter().fold(true, |all, &o| all & fits(o)) {
                for (i, &offset) in h.offsets.iter().enumerate() {
                    let kind = if i < h.normal_pages as usize { "normal" } else { "zero" };
                    if offset & misaligned != 0 {
                        fail!(OffsetAlign, "{kind} page offset 0x{offset:x} in block {} is not a multiple of the page size {page}", Name(&h.block));
                    }
                    if !fits(offset) {
                        fail!(
                            OffsetRange,
                            "{kind} page offset 0x{offset:x} is outside block {}: its page must end within the used length 0x{used:x}",
                            Name(&h.block)
                        );
                    }
                }
            }
            Some(index)
        } else {
            None
        };

        let method = h.flags.method()?;
        // A SYNC-only packet carries no method code (QEMU sets its flags to exactly SYNC).
        let codeless_empty = !h.has_pages() && h.flags.method_code() == 0;
        if method != self.compression && !codeless_empty {
            fail!(
                CompressionMismatch,
                "packet {} is compressed with {} (flags 0x{:x}), but the session negotiated {}",
                h.packet_num,
                method.name(),
                h.flags.0,
                self.compression.name()
            );
        }

        let raw = u64::from(h.normal_pages) * page;
        let size = u64::from(h.next_packet_size);
        match self.compression {
            Compression::None if size != raw => fail!(
                PayloadSize,
                "next_packet_size {size} does not match {} normal pages of {page} bytes ({raw})",
                h.normal_pages
            ),
            Compression::None => {}
            _ if h.normal_pages == 0 && size != 0 => {
                fail!(PayloadSize, "next_packet_size {size} with no normal pages, expected 0")
            }
            _ if h.normal_pages > 0 && !(1..=u64::from(MAX_COMPRESSED_PAYLOAD)).contains(&size) => fail!(
                PayloadSize,
                "compressed payload of {size} bytes is outside 1..={MAX_COMPRESSED_PAYLOAD}"
            ),
            _ => {}
        }
        Ok(ValidatedPacket { block, payload_len: h.next_packet_size })
    }
}
