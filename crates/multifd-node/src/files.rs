//! Snapshot files for JavaScript: a job runs on its own thread (never the libuv pool) and
//! reports completion as a `done` event; progress is polled from atomics.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use multifd_core::block::RamBlock;
use multifd_core::session::Event;
use multifd_core::snapshot::{self, Progress, SnapshotInfo, SnapshotOptions};
use multifd_core::{Error, ErrorCode};
use napi::bindgen_prelude::Function;
use napi_derive::napi;

use crate::block::Block;
use crate::errors::{IntoCoded, Result, coded};
use crate::events::{JsEvents, NativeEvent};

#[napi(object)]
pub struct SnapshotBlockInfo {
    pub name: String,
    pub length: f64,
    pub header_offset: f64,
    pub bitmap_offset: f64,
    pub pages_offset: f64,
    pub pages_present: f64,
}

#[napi(object)]
pub struct SnapshotFileInfo {
    /// False while a snapshot is being written, or after one was interrupted.
    pub complete: bool,
    pub page_size: u32,
    /// Completed snapshots written into this file (incremental ones included).
    pub generation: f64,
    pub file_length: f64,
    pub blocks: Vec<SnapshotBlockInfo>,
}

impl From<SnapshotInfo> for SnapshotFileInfo {
    fn from(i: SnapshotInfo) -> Self {
        SnapshotFileInfo {
            complete: i.complete,
            page_size: i.page_size,
            generation: i.generation as f64,
            file_length: i.file_len as f64,
            blocks: i
                .blocks
                .into_iter()
                .map(|b| SnapshotBlockInfo {
                    name: b.name,
                    length: b.len as f64,
                    header_offset: b.header_offset as f64,
                    bitmap_offset: b.layout.bitmap_offset as f64,
                    pages_offset: b.layout.pages_offset as f64,
                    pages_present: b.pages_present as f64,
                })
                .collect(),
        }
    }
}

/// Reads a snapshot file's description (complete or not).
#[napi]
pub fn inspect_snapshot(path: String) -> Result<SnapshotFileInfo> {
    snapshot::inspect(&PathBuf::from(path)).map(Into::into).into_coded()
}

#[napi(object)]
pub struct FileProgress {
    /// Bytes of block memory covered so far.
    pub bytes: f64,
    /// Bytes this job covers in all.
    pub total: f64,
    pub pages: f64,
    pub zero_pages: f64,
}

#[napi]
pub struct NativeFileJob {
    blocks: Mutex<Vec<Arc<RamBlock>>>,
    progress: Arc<Progress>,
    result: Arc<Mutex<Option<SnapshotInfo>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    events: Mutex<Option<JsEvents>>,
}

#[napi]
impl NativeFileJob {
    #[napi(constructor)]
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        NativeFileJob { blocks: Mutex::new(Vec::new()), progress: Arc::default(), result: Arc::default(), thread: Mutex::new(None), events: Mutex::new(None) }
    }

    #[napi]
    pub fn add_block(&self, block: &Block) {
        self.blocks.lock().unwrap().push(block.inner.clone());
    }

    fn start(&self, on_event: Function<NativeEvent, ()>, work: impl FnOnce(&[Arc<RamBlock>], &Progress) -> multifd_core::Result<SnapshotInfo> + Send + 'static) -> Result<()> {
        let mut slot = self.thread.lock().unwrap();
        if slot.is_some() {
            return Err(Error::new(ErrorCode::State, "this job already ran")).into_coded();
        }
        let events = JsEvents::new(on_event).into_coded()?;
        let sink = events.sink();
        *self.events.lock().unwrap() = Some(events);
        let (blocks, progress, result) = (self.blocks.lock().unwrap().clone(), self.progress.clone(), self.result.clone());
        let handle = std::thread::Builder::new()
            .name("multifd/file".into())
            .spawn(move || {
                let outcome = work(&blocks, &progress);
                let pages = progress.pages_written.load(Ordering::Relaxed);
                let done = outcome.map(|info| {
                    *result.lock().unwrap() = Some(info);
                    pages
                });
                sink(Event::Done { id: 0, result: done });
            })
            .map_err(|e| coded(multifd_core::error::os_error("spawn a thread", e)))?;
        *slot = Some(handle);
        Ok(())
    }

    /// Writes the blocks into a snapshot at `path`; a `done` event follows.
    #[napi]
    pub fn start_snapshot(&self, path: String, channels: u32, direct_io: bool, incremental: bool, on_event: Function<NativeEvent, ()>) -> Result<()> {
        let options = SnapshotOptions { channels: channels as usize, direct_io, incremental };
        self.start(on_event, move |blocks, progress| snapshot::snapshot(blocks, &PathBuf::from(path), options, progress))
    }

    /// Reads the snapshot at `path` into the blocks; a `done` event follows.
    #[napi]
    pub fn start_restore(&self, path: String, channels: u32, on_event: Function<NativeEvent, ()>) -> Result<()> {
        self.start(on_event, move |blocks, progress| snapshot::restore(&PathBuf::from(path), blocks, channels as usize, progress))
    }

    #[napi]
    pub fn progress(&self) -> FileProgress {
        let p = &self.progress;
        FileProgress {
            bytes: p.bytes.load(Ordering::Relaxed) as f64,
            total: p.total.load(Ordering::Relaxed) as f64,
            pages: p.pages_written.load(Ordering::Relaxed) as f64,
            zero_pages: p.zero_pages.load(Ordering::Relaxed) as f64,
        }
    }

    /// The file's description after a successful job.
    #[napi]
    pub fn result(&self) -> Option<SnapshotFileInfo> {
        self.result.lock().unwrap().clone().map(Into::into)
    }

    /// Joins the job's thread and lets go of the event callback (after `done`).
    #[napi]
    pub fn finish(&self) {
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
        if let Some(e) = self.events.lock().unwrap().take() {
            e.release();
        }
        self.blocks.lock().unwrap().clear();
    }
}

#[napi(object)]
pub struct RebuiltFile {
    pub name: String,
    pub file: String,
    pub length: f64,
}

#[napi(object)]
pub struct RebuiltFiles {
    pub blocks: Vec<RebuiltFile>,
    pub channels: Vec<crate::codec::CapturedChannel>,
}

/// Rebuilds the blocks carried by the channel captures at `paths` into sparse files in `dir`
/// (created if needed), named from the block names, never through a link or over an existing
/// file; refused when the blocks add up to more than `max_total_bytes`.
#[napi]
pub fn rebuild_captures_to_dir(paths: Vec<String>, page_size: u32, dir: String, max_total_bytes: f64) -> Result<RebuiltFiles> {
    let geometry = multifd_core::wire::Geometry::new(page_size).into_coded()?;
    let max = crate::numbers::to_u64(max_total_bytes, "maxTotalBytes")?;
    let streams = paths.iter().map(|p| std::fs::read(p).map_err(|e| Error::new(ErrorCode::Io, format!("read {p}: {e}")))).collect::<multifd_core::Result<Vec<_>>>().into_coded()?;
    let refs: Vec<&[u8]> = streams.iter().map(Vec::as_slice).collect();
    let (files, channels) = multifd_core::stream::rebuild_to_dir(&refs, geometry, &PathBuf::from(dir), max).into_coded()?;
    Ok(RebuiltFiles {
        blocks: files.into_iter().map(|f| RebuiltFile { name: f.name, file: f.path.display().to_string(), length: f.len as f64 }).collect(),
        channels: channels.into_iter().map(Into::into).collect(),
    })
}

/// The file name a block is written under (`restore DIR`, `inspect --rebuild DIR`).
#[napi]
pub fn file_name_for(block: String) -> String {
    multifd_core::output_dir::file_name_for(&block)
}
