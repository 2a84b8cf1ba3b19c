//! RAM blocks for JavaScript: owned by Rust, seen through zero-copy `Uint8Array` views.
//!
//! Sharing with worker threads: the addon is loaded once per process, so a process-wide
//! registry maps a numeric token to a block. `share()` registers the block (once; sharing again
//! returns the same token) and `fromShared(token)` in any thread of the process returns a
//! block over the same memory and the same dirty bitmap. The registry holds a strong
//! reference: a shared block's memory stays mapped until `unshare()` (or process exit), even
//! when no JavaScript object refers to it any more. Weak references were rejected: the
//! thread that shares usually hands the token to a worker and may drop its own object before
//! the worker attaches, and a token that works or not depending on when the garbage collector
//! runs is worse than an explicit release. Blocks made by `fromShared` hold their own
//! reference, so `unshare` only stops new attachments; memory goes away with the last holder.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use multifd_core::block::{Backing, RamBlock};
use multifd_core::{Error, ErrorCode};
use napi::bindgen_prelude::{AsyncTask, Uint8Array};
use napi::{Env, Task};
use napi_derive::napi;

use crate::errors::{IntoCoded, Result};
use crate::numbers::to_u64;

fn hex_digest(d: u64) -> String {
    format!("{d:016x}")
}

/// A block digest on libuv's thread pool (which fans the pieces out to more threads).
pub struct DigestTask {
    block: Arc<RamBlock>,
}

impl Task for DigestTask {
    type Output = u64;
    type JsValue = String;

    fn compute(&mut self) -> napi::Result<u64> {
        Ok(multifd_core::integrity::block_digest(&self.block))
    }

    fn resolve(&mut self, _env: Env, digest: u64) -> napi::Result<String> {
        Ok(hex_digest(digest))
    }
}

/// A block digest at completion on libuv's thread pool: from the page digests a session took as
/// pages moved, hashing from memory only the pages without one
/// ([`multifd_core::integrity::SessionDigests::block_digest`]).
pub struct CompletionDigestTask {
    pub(crate) block: Arc<RamBlock>,
    pub(crate) digests: Option<Arc<multifd_core::integrity::SessionDigests>>,
    /// On a source: pages marked dirty since they were sent are hashed from memory.
    pub(crate) source: bool,
}

impl Task for CompletionDigestTask {
    type Output = u64;
    type JsValue = String;

    fn compute(&mut self) -> napi::Result<u64> {
        Ok(match &self.digests {
            Some(d) => d.block_digest(&self.block, self.source.then_some(&self.block.dirty)),
            None => multifd_core::integrity::block_digest(&self.block),
        })
    }

    fn resolve(&mut self, _env: Env, digest: u64) -> napi::Result<String> {
        Ok(hex_digest(digest))
    }
}

/// Piece digests on libuv's thread pool (which fans them out to more threads).
pub struct PieceDigestTask {
    block: Arc<RamBlock>,
    indexes: Vec<u64>,
}

impl Task for PieceDigestTask {
    type Output = Vec<u64>;
    type JsValue = Vec<String>;

    fn compute(&mut self) -> napi::Result<Vec<u64>> {
        Ok(multifd_core::integrity::piece_digests(&self.block, &self.indexes))
    }

    fn resolve(&mut self, _env: Env, digests: Vec<u64>) -> napi::Result<Vec<String>> {
        Ok(digests.into_iter().map(hex_digest).collect())
    }
}

/// A core error as a value (a task on libuv's thread pool cannot reject with a coded error).
#[napi(object)]
pub struct CodedFailure {
    pub code: String,
    pub message: String,
}

/// `msync` + `fdatasync` of a file-backed block on libuv's thread pool: resolves with null, or
/// with the failure.
pub struct FlushTask {
    block: Arc<RamBlock>,
}

impl Task for FlushTask {
    type Output = Option<CodedFailure>;
    type JsValue = Option<CodedFailure>;

    fn compute(&mut self) -> napi::Result<Option<CodedFailure>> {
        Ok(self.block.flush().err().map(|e| CodedFailure { code: e.code.as_str().into(), message: e.message }))
    }

    fn resolve(&mut self, _env: Env, failure: Option<CodedFailure>) -> napi::Result<Option<CodedFailure>> {
        Ok(failure)
    }
}

#[napi]
pub struct Block {
    pub(crate) inner: Arc<RamBlock>,
}

/// Shared blocks by token. Tokens start at 1 and are never reused, so a stale token fails
/// instead of reaching another block.
fn registry() -> &'static Mutex<HashMap<u32, Arc<RamBlock>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<u32, Arc<RamBlock>>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

static NEXT_TOKEN: AtomicU32 = AtomicU32::new(1);

#[napi]
impl Block {
    /// Anonymous memory, zero-filled; `prefault` faults every page in now.
    #[napi(factory)]
    pub fn allocate(name: String, length: f64, page_size: u32, prefault: bool) -> Result<Block> {
        let inner = RamBlock::allocate(&name, to_u64(length, "length")?, page_size, prefault).into_coded()?;
        Ok(Block { inner: Arc::new(inner) })
    }

    /// A file mapped MAP_SHARED; with `length` the file is created or resized first.
    #[napi(factory)]
    pub fn map_file(name: String, path: String, page_size: u32, length: Option<f64>, prefault: bool) -> Result<Block> {
        let length = length.map(|l| to_u64(l, "length")).transpose()?;
        let inner = RamBlock::map_file(&name, Path::new(&path), page_size, length, prefault).into_coded()?;
        Ok(Block { inner: Arc::new(inner) })
    }

    /// Whether the block's memory is the file at `path` (same device and inode, links followed).
    #[napi]
    pub fn is_backed_by(&self, path: String) -> bool {
        self.inner.is_backed_by(Path::new(&path))
    }

    /// Registers this block for other threads of the process and returns its token (the same
    /// token every time until `unshare`). The registry keeps the memory alive until then.
    #[napi]
    pub fn share(&self) -> Result<u32> {
        let mut shared = registry().lock().unwrap();
        if let Some((&token, _)) = shared.iter().find(|(_, b)| Arc::ptr_eq(b, &self.inner)) {
            return Ok(token);
        }
        let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        if token == 0 {
            return Err(Error::new(ErrorCode::InvalidArgument, "no block tokens left in this process")).into_coded();
        }
        shared.insert(token, self.inner.clone());
        Ok(token)
    }

    /// Removes this block from the registry; returns whether it was shared. Blocks already
    /// made from its token keep working.
    #[napi]
    pub fn unshare(&self) -> bool {
        let mut shared = registry().lock().unwrap();
        let before = shared.len();
        shared.retain(|_, b| !Arc::ptr_eq(b, &self.inner));
        shared.len() != before
    }

    /// The block registered under `token` by `share()` in any thread of this process.
    #[napi(factory)]
    pub fn from_shared(token: u32) -> Result<Block> {
        match registry().lock().unwrap().get(&token) {
            Some(b) => Ok(Block { inner: b.clone() }),
            None => Err(Error::new(ErrorCode::InvalidArgument, format!("no shared block has token {token} (never shared, or unshared)"))).into_coded(),
        }
    }

    /// Whether `other` is a handle on the same memory (e.g. one made by `fromShared`).
    #[napi]
    pub fn same_memory(&self, other: &Block) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    #[napi(getter)]
    pub fn name(&self) -> String {
        self.inner.name().to_string()
    }

    #[napi(getter)]
    pub fn length(&self) -> f64 {
        self.inner.len() as f64
    }

    #[napi(getter)]
    pub fn page_size(&self) -> u32 {
        self.inner.page_size()
    }

    /// `anonymous` or `file`.
    #[napi(getter)]
    pub fn backing(&self) -> &'static str {
        match self.inner.backing() {
            Backing::Anonymous => "anonymous",
            Backing::File => "file",
        }
    }

    /// A zero-copy view of `length` bytes at `offset`. The view keeps the memory alive; the
    /// block counts as written from now on (zero pages received later are written explicitly).
    #[napi]
    pub fn view(&self, offset: Option<f64>, length: Option<f64>) -> Result<Uint8Array> {
        let offset = to_u64(offset.unwrap_or(0.0), "offset")?;
        let length = match length {
            Some(l) => to_u64(l, "length")?,
            None => self.inner.len().saturating_sub(offset),
        };
        if offset.checked_add(length).is_none_or(|end| end > self.inner.len()) || length == 0 {
            return Err(Error::new(ErrorCode::InvalidArgument, format!("view {offset}+{length} is outside block {:?} of {} bytes (or empty)", self.inner.name(), self.inner.len())))
                .into_coded();
        }
        self.inner.mark_written();
        let keep = self.inner.clone();
        // SAFETY: offset + length <= the block's length, checked above, so the pointer and
        // length describe memory inside the mapping. The finalizer owns an Arc to the block,
        // so the mapping outlives every JavaScript reference to the view.
        let view = unsafe {
            Uint8Array::with_external_data(self.inner.as_ptr().add(offset as usize), length as usize, move |_, _| drop(keep))
        };
        Ok(view)
    }

    /// Marks the pages of `length` bytes at `offset` dirty (rounded out to whole pages).
    #[napi]
    pub fn mark_dirty(&self, offset: f64, length: f64) -> Result<()> {
        self.inner.mark_dirty(to_u64(offset, "offset")?, to_u64(length, "length")?).into_coded()
    }

    /// Marks every page dirty.
    #[napi]
    pub fn mark_all_dirty(&self) {
        self.inner.mark_written();
        self.inner.dirty.set_all();
    }

    /// The block digest the integrity check compares at completion, as 16 hex digits, of memory
    /// as it is now: xxh3-64 over the digests of the block's 1 MiB pieces, each over the xxh3-64
    /// of its pages (docs/PROTOCOL.md, "Integrity"), computed on up to one thread per core.
    /// Blocks the calling thread; see `digestAsync`.
    #[napi]
    pub fn digest(&self) -> String {
        hex_digest(multifd_core::integrity::block_digest(&self.inner))
    }

    /// `digest()` computed off the JavaScript thread (the event loop keeps running).
    #[napi(ts_return_type = "Promise<string>")]
    pub fn digest_async(&self) -> AsyncTask<DigestTask> {
        AsyncTask::new(DigestTask { block: self.inner.clone() })
    }

    /// The xxh3-64 of each 1 MiB piece `indexes[i]` (the last piece of the block shorter), as
    /// 16 hex digits, computed off the JavaScript thread: what resuming peers compare
    /// (docs/PROTOCOL.md, "Resume").
    #[napi(ts_return_type = "Promise<string[]>")]
    pub fn piece_digests(&self, indexes: Vec<f64>) -> Result<AsyncTask<PieceDigestTask>> {
        let pieces = multifd_core::resume::piece_count(&self.inner);
        let indexes = indexes.into_iter().map(|i| to_u64(i, "a piece index")).collect::<Result<Vec<u64>>>()?;
        if let Some(bad) = indexes.iter().find(|&&i| i >= pieces) {
            return Err(Error::new(ErrorCode::InvalidArgument, format!("piece {bad} is past the end of block {:?} ({pieces} pieces)", self.inner.name()))).into_coded();
        }
        Ok(AsyncTask::new(PieceDigestTask { block: self.inner.clone(), indexes }))
    }

    /// Makes what was written to a file-backed block durable (`msync`, then `fdatasync`), off
    /// the JavaScript thread; nothing to do for anonymous memory. Resolves with null, or with
    /// the failure's code and message.
    #[napi(ts_return_type = "Promise<CodedFailure | null>")]
    pub fn flush(&self) -> AsyncTask<FlushTask> {
        AsyncTask::new(FlushTask { block: self.inner.clone() })
    }

    /// Marks the 1 MiB pieces `indexes` as held from an earlier session (a destination that
    /// resumes): they count as complete until a page of them is received again.
    #[napi]
    pub fn mark_held(&self, indexes: Vec<f64>) -> Result<()> {
        let indexes = indexes.into_iter().map(|i| to_u64(i, "a piece index")).collect::<Result<Vec<u64>>>()?;
        multifd_core::resume::mark_held(&self.inner, &indexes).into_coded()
    }

    /// Number of dirty pages.
    #[napi]
    pub fn dirty_pages(&self) -> f64 {
        self.inner.dirty.count() as f64
    }

    #[napi]
    pub fn clear_dirty(&self) {
        self.inner.dirty.clear_all();
    }
}
