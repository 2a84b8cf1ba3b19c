//! Stock QEMU 10 as the peer: [`recv`] is a migration destination for a QEMU source
//! (`migrate tcp:...` with multifd) that writes a mapped-ram file QEMU restores; [`send`]
//! plays such a file into a QEMU destination started with `-incoming`.
//!
//! Both speak QEMU's two kinds of connection on one address: the main channel (the stream in
//! [`crate::qemu_stream`]) and the multifd channels (the packets in [`crate::wire`]), kept in
//! step by QEMU's flush protocol: every `RAM_SAVE_FLAG_MULTIFD_FLUSH` in the main stream
//! stands for one SYNC packet on every channel, and nothing sent after a SYNC is applied
//! before every channel has reached it ([`barrier`]).

pub mod barrier;
pub mod recv;
pub mod send;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, ErrorCode, Result};
use crate::qemu_file_writer::QemuFileWriter;
use crate::qemu_stream::{Configuration, RamBlockEntry};
use crate::session::{ChannelStats, Counters};

pub use recv::{Canceller, QemuReceiver, RecvOptions, RecvSummary};
pub use send::{QemuSender, SendOptions, SendSummary, send_file};

pub use crate::qemu_file_writer::BITMAP_CHUNK_WORDS;

/// Which pages of a block hold data: a bitmap allocated in pieces as pages arrive, so memory
/// follows the bytes received and not the sizes the stream claims.
pub struct PageMap {
    chunks: Box<[OnceLock<Box<[AtomicU64]>>]>,
}

impl PageMap {
    pub fn new(pages: u64) -> PageMap {
        let n = pages.div_ceil(64).div_ceil(BITMAP_CHUNK_WORDS as u64) as usize;
        PageMap { chunks: (0..n).map(|_| OnceLock::new()).collect() }
    }

    fn word(&self, page: u64, create: bool) -> Option<&AtomicU64> {
        let w = (page / 64) as usize;
        let slot = &self.chunks[w / BITMAP_CHUNK_WORDS];
        let chunk = if create { slot.get_or_init(|| (0..BITMAP_CHUNK_WORDS).map(|_| AtomicU64::new(0)).collect()) } else { slot.get()? };
        Some(&chunk[w % BITMAP_CHUNK_WORDS])
    }

    pub fn set(&self, page: u64) {
        self.word(page, true).unwrap().fetch_or(1 << (page % 64), Ordering::Relaxed);
    }

    /// Clears the page's bit; true when it was set.
    pub fn clear(&self, page: u64) -> bool {
        let bit = 1u64 << (page % 64);
        self.word(page, false).is_some_and(|w| w.fetch_and(!bit, Ordering::Relaxed) & bit != 0)
    }

    /// The words piece by piece, `None` for a piece never touched (all zero).
    pub fn pieces(&self) -> impl Iterator<Item = Option<Vec<u64>>> + '_ {
        self.chunks.iter().map(|c| c.get().map(|words| words.iter().map(|w| w.load(Ordering::Relaxed)).collect()))
    }

    pub fn count(&self) -> u64 {
        self.chunks.iter().filter_map(|c| c.get()).flat_map(|c| c.iter()).map(|w| u64::from(w.load(Ordering::Relaxed).count_ones())).sum()
    }
}

/// The file name a block gets in an output directory: bytes outside `A-Za-z0-9._@-` as
/// `%XX`, and `.`/`..` escaped (the same rule as the CLI's `restore --out`).
pub fn file_name_for(block: &str) -> String {
    if block == "." || block == ".." {
        return block.replace('.', "%2E");
    }
    let mut s = String::with_capacity(block.len());
    for b in block.bytes() {
        if b.is_ascii_alphanumeric() || b"._@-".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// Where received pages go: the mapped-ram file, raw images of the blocks, or both; with the
/// bitmap of pages that hold data.
pub struct PageSink {
    file: Option<QemuFileWriter>,
    raw: Vec<(PathBuf, File)>,
    maps: Vec<PageMap>,
    blocks: Vec<RamBlockEntry>,
    page_size: u64,
    zeros: Vec<u8>,
}

fn io(e: std::io::Error, what: impl std::fmt::Display) -> Error {
    let code = if e.kind() == std::io::ErrorKind::StorageFull { ErrorCode::NoSpace } else { ErrorCode::Io };
    Error::new(code, format!("{what}: {e}"))
}

impl PageSink {
    pub fn create(to: Option<&Path>, out_dir: Option<&Path>, config: &Configuration, ram_id: u32, blocks: &[RamBlockEntry]) -> Result<PageSink> {
        let page_size = config.page_size();
        let file = to.map(|p| QemuFileWriter::create(p, config, ram_id, blocks)).transpose()?;
        let mut raw = Vec::new();
        if let Some(dir) = out_dir {
            std::fs::create_dir_all(dir).map_err(|e| io(e, format_args!("create {}", dir.display())))?;
            for b in blocks {
                let path = dir.join(file_name_for(&b.name));
                let f = File::options().read(true).write(true).create(true).truncate(true).open(&path).map_err(|e| io(e, format_args!("create {}", path.display())))?;
                f.set_len(b.used_len).map_err(|e| io(e, format_args!("size {}", path.display())))?;
                raw.push((path, f));
            }
        }
        Ok(PageSink { file, raw, maps: blocks.iter().map(|b| PageMap::new(b.used_len / page_size)).collect(), blocks: blocks.to_vec(), page_size, zeros: vec![0; page_size as usize] })
    }

    pub fn blocks(&self) -> &[RamBlockEntry] {
        &self.blocks
    }

    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Writes whole pages at `offset` of `block` (checked by the caller to lie inside it).
    pub fn data(&self, block: usize, offset: u64, pages: &[u8]) -> Result<()> {
        if let Some(f) = &self.file {
            f.write_pages(block, offset, pages)?;
        }
        if let Some((path, f)) = self.raw.get(block) {
            f.write_all_at(pages, offset).map_err(|e| io(e, format_args!("write {}", path.display())))?;
        }
        let first = offset / self.page_size;
        for p in first..first + pages.len() as u64 / self.page_size {
            self.maps[block].set(p);
        }
        Ok(())
    }

    /// A page that is zero now: no data in the file (its bit cleared); a raw image that
    /// held data there gets zeros.
    pub fn zero(&self, block: usize, offset: u64) -> Result<()> {
        if self.maps[block].clear(offset / self.page_size)
            && let Some((path, f)) = self.raw.get(block)
        {
            f.write_all_at(&self.zeros, offset).map_err(|e| io(e, format_args!("write {}", path.display())))?;
        }
        Ok(())
    }

    /// Pages holding data, per block.
    pub fn pages_present(&self) -> Vec<u64> {
        self.maps.iter().map(PageMap::count).collect()
    }

    /// Completes the outputs: bitmaps and `trailer` (the stream after the block list) into
    /// the file, which is renamed into place; raw images synced.
    pub fn finish(self, trailer: &[u8]) -> Result<()> {
        for (path, f) in &self.raw {
            f.sync_all().map_err(|e| io(e, format_args!("sync {}", path.display())))?;
        }
        if let Some(file) = self.file {
            for (i, map) in self.maps.iter().enumerate() {
                file.write_bitmap(i, map.pieces())?;
            }
            file.finish(trailer)?;
        }
        Ok(())
    }
}

/// Per-channel counters as a summary lists them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelTotals {
    pub bytes: u64,
    pub packets: u64,
    pub normal_pages: u64,
    pub zero_pages: u64,
    pub syncs: u64,
}

impl From<Counters> for ChannelTotals {
    fn from(c: Counters) -> Self {
        ChannelTotals { bytes: c.bytes, packets: c.packets, normal_pages: c.normal_pages, zero_pages: c.zero_pages, syncs: c.syncs }
    }
}

/// Live counters of a QEMU peer run, polled for progress.
#[derive(Debug, Default)]
pub struct PeerProgress {
    /// Bytes on the main channel.
    pub main_bytes: AtomicU64,
    /// Pages that came on the main channel (QEMU without multifd): with data, and zero.
    pub main_pages: AtomicU64,
    pub main_zero_pages: AtomicU64,
    /// Bytes of guest RAM the run covers in all (known once the block list is read).
    pub total: AtomicU64,
    pub channels: std::sync::Mutex<Vec<std::sync::Arc<ChannelStats>>>,
}

impl PeerProgress {
    /// Bytes moved on every connection so far.
    pub fn bytes(&self) -> u64 {
        self.main_bytes.load(Ordering::Relaxed) + self.channels.lock().unwrap().iter().map(|c| c.bytes.load(Ordering::Relaxed)).sum::<u64>()
    }

    pub fn per_channel(&self) -> Vec<ChannelTotals> {
        self.channels.lock().unwrap().iter().map(|c| c.snapshot().into()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_map_allocates_on_demand() {
        let m = PageMap::new(1 << 34);
        assert!(m.pieces().all(|p| p.is_none()));
        assert!(!m.clear(5));
        m.set(5);
        m.set(64 * BITMAP_CHUNK_WORDS as u64 + 1);
        assert_eq!(m.count(), 2);
        assert_eq!(m.pieces().filter(|p| p.is_some()).count(), 2);
        assert!(m.clear(5));
        assert!(!m.clear(5));
        assert_eq!(m.count(), 1);
    }

    #[test]
    fn file_names() {
        assert_eq!(file_name_for("/rom@etc/acpi/tables"), "%2From@etc%2Facpi%2Ftables");
        assert_eq!(file_name_for("pc.ram"), "pc.ram");
        assert_eq!(file_name_for(".."), "%2E%2E");
    }
}
