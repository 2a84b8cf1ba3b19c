//! Writes a QEMU 10 migration file in the mapped-ram layout (what `migrate file:` writes with
//! the mapped-ram capability, and what [`crate::qemu_file`] reads): the stream header, a
//! configuration section that lists `mapped-ram`, the RAM section with each block's
//! mapped-ram header, bitmap and pages region at fixed offsets, then the rest of the stream
//! (RAM section end, device state, VM description) as given.
//!
//! The file is written under a temporary name beside the target, with its magic zeroed, and
//! becomes a QEMU file only in [`QemuFileWriter::finish`]: magic written, data synced, renamed
//! into place. Dropped unfinished, it is removed; a process killed mid-way leaves only a
//! temporary file that is not a QEMU file at all.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Words per lazily allocated piece of a page map (covers 2 GiB of 4 KiB pages): the unit in
/// which the receiver allocates its bitmap and in which the writer writes absent pieces.
pub const BITMAP_CHUNK_WORDS: usize = 8192;

use crate::error::{Error, ErrorCode, Result, fail};
use crate::mapped_ram::{BlockHeader, bitmap_len};
use crate::qemu_stream::{self, Configuration, RamBlockEntry};

/// One block's place in the file.
#[derive(Debug, Clone)]
pub struct PlacedBlock {
    pub name: String,
    pub used_len: u64,
    pub header: BlockHeader,
}

pub struct QemuFileWriter {
    file: File,
    tmp: PathBuf,
    target: PathBuf,
    blocks: Vec<PlacedBlock>,
    /// Where the stream resumes after the last block's pages region.
    trailer_at: u64,
    finished: bool,
}

fn io(e: std::io::Error, what: impl std::fmt::Display) -> Error {
    let code = if e.kind() == std::io::ErrorKind::StorageFull { ErrorCode::NoSpace } else { ErrorCode::Io };
    Error::new(code, format!("{what}: {e}"))
}

/// The temporary name beside `target` that a file is written under.
pub fn temp_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".multifd-partial-{}", std::process::id()));
    target.with_file_name(name)
}

impl QemuFileWriter {
    /// Creates the temporary file and writes everything up to the pages: header (magic
    /// zeroed), `config` with `mapped-ram` as its only capability, the RAM section header of
    /// section `ram_id` and each block's name, length and mapped-ram header.
    pub fn create(target: &Path, config: &Configuration, ram_id: u32, blocks: &[RamBlockEntry]) -> Result<QemuFileWriter> {
        if target.as_os_str().is_empty() {
            fail!(InvalidArgument, "the output file name is empty");
        }
        let page_size = config.page_size();
        let tmp = temp_path(target);
        let file = File::options().read(true).write(true).create(true).truncate(true).open(&tmp).map_err(|e| io(e, format_args!("create {}", tmp.display())))?;
        let mut w = QemuFileWriter { file, tmp, target: target.to_path_buf(), blocks: Vec::new(), trailer_at: 0, finished: false };

        let mut prefix = Vec::new();
        qemu_stream::encode_header(&mut prefix);
        prefix[..4].fill(0);
        let config = Configuration { capabilities: vec!["mapped-ram".into()], ..config.clone() };
        config.encode(&mut prefix);
        qemu_stream::encode_section_start(&mut prefix, qemu_stream::kind::SECTION_START, ram_id, "ram", 0, qemu_stream::RAM_SECTION_VERSION);
        let total: u64 = blocks.iter().map(|b| b.used_len).sum();
        qemu_stream::encode_ram_word(&mut prefix, total | qemu_stream::ram_flag::MEM_SIZE);
        w.write_at(&prefix, 0, "the stream header")?;
        let mut at = prefix.len() as u64;
        for b in blocks {
            let mut entry = Vec::with_capacity(b.name.len() + 9);
            qemu_stream::put_idstr(&mut entry, &b.name);
            entry.extend_from_slice(&b.used_len.to_be_bytes());
            let header = BlockHeader::layout(at + entry.len() as u64, b.used_len, page_size)?;
            entry.extend_from_slice(&header.encode());
            w.write_at(&entry, at, format_args!("block '{}'", b.name))?;
            at = header.end(b.used_len);
            w.blocks.push(PlacedBlock { name: b.name.clone(), used_len: b.used_len, header });
        }
        w.trailer_at = at;
        Ok(w)
    }

    pub fn blocks(&self) -> &[PlacedBlock] {
        &self.blocks
    }

    fn write_at(&self, buf: &[u8], off: u64, what: impl std::fmt::Display) -> Result<()> {
        self.file.write_all_at(buf, off).map_err(|e| io(e, format_args!("write {what} to {}", self.tmp.display())))
    }

    /// Writes `data` (whole pages) at byte `offset` of block `block`. The caller has checked
    /// that the range lies inside the block.
    pub fn write_pages(&self, block: usize, offset: u64, data: &[u8]) -> Result<()> {
        let b = &self.blocks[block];
        debug_assert!(offset + data.len() as u64 <= b.used_len);
        self.write_at(data, b.header.pages_offset + offset, format_args!("pages of block '{}'", b.name))
    }

    /// Writes block `block`'s bitmap: `words` are its little-endian u64 words in order,
    /// `None` for a run of 8192 zero words left as a hole.
    pub fn write_bitmap(&self, block: usize, chunks: impl Iterator<Item = Option<Vec<u64>>>) -> Result<()> {
        let b = &self.blocks[block];
        let len = bitmap_len(b.used_len / b.header.page_size);
        let mut off = 0u64;
        for chunk in chunks {
            let n = chunk.as_ref().map_or(BITMAP_CHUNK_WORDS as u64 * 8, |c| c.len() as u64 * 8);
            if let Some(words) = chunk {
                let bytes = crate::mapped_ram::bitmap_bytes(&words);
                let keep = (len - off).min(bytes.len() as u64) as usize;
                self.write_at(&bytes[..keep], b.header.bitmap_offset + off, format_args!("bitmap of block '{}'", b.name))?;
            }
            off += n;
            if off >= len {
                break;
            }
        }
        Ok(())
    }

    /// Writes the rest of the stream after the block list, the magic, syncs and renames the
    /// file into place.
    pub fn finish(mut self, trailer: &[u8]) -> Result<PathBuf> {
        self.write_at(trailer, self.trailer_at, "the device state")?;
        self.write_at(&qemu_stream::FILE_MAGIC.to_be_bytes(), 0, "the magic")?;
        self.file.sync_all().map_err(|e| io(e, format_args!("sync {}", self.tmp.display())))?;
        std::fs::rename(&self.tmp, &self.target).map_err(|e| io(e, format_args!("rename {} to {}", self.tmp.display(), self.target.display())))?;
        self.finished = true;
        Ok(self.target.clone())
    }
}

impl Drop for QemuFileWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
