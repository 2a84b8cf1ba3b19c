//! QEMU migration files written with mapped-ram: describe them, extract RAM blocks.

use std::fs::OpenOptions;
use std::path::Path;

use multifd_core::qemu_file::QemuFile;
use multifd_core::{Error, ErrorCode};
use napi_derive::napi;

use crate::errors::{IntoCoded, Result};

#[napi(object)]
pub struct QemuBlockInfo {
    pub name: String,
    pub length: f64,
    pub page_size: f64,
    pub pages_present: f64,
    pub bitmap_offset: f64,
    pub pages_offset: f64,
}

#[napi(object)]
pub struct QemuFileInfo {
    /// Machine type from the configuration section, e.g. `pc-i440fx-10.0`.
    pub machine: String,
    pub capabilities: Vec<String>,
    pub file_length: f64,
    /// The stream reaches its end marker (an interrupted save does not).
    pub complete: bool,
    pub blocks: Vec<QemuBlockInfo>,
}

/// Parses a QEMU migration file's header, configuration and RAM block list.
#[napi]
pub fn inspect_qemu_file(path: String) -> Result<QemuFileInfo> {
    let f = QemuFile::open(Path::new(&path)).into_coded()?;
    Ok(QemuFileInfo {
        machine: f.machine().to_string(),
        capabilities: f.capabilities().to_vec(),
        file_length: f.file_len() as f64,
        complete: f.is_complete(),
        blocks: f
            .blocks()
            .iter()
            .map(|b| QemuBlockInfo {
                name: b.name.clone(),
                length: b.used_len as f64,
                page_size: b.header.page_size as f64,
                pages_present: b.pages_present as f64,
                bitmap_offset: b.header.bitmap_offset as f64,
                pages_offset: b.header.pages_offset as f64,
            })
            .collect(),
    })
}

/// Writes RAM block `name` of the QEMU file at `path` to `out` (created or truncated; absent
/// pages read back as zeros). Returns the bytes written.
#[napi]
pub fn extract_qemu_block(path: String, name: String, out: String) -> Result<f64> {
    let f = QemuFile::open(Path::new(&path)).into_coded()?;
    if f.block(&name).is_none() {
        let names: Vec<&str> = f.blocks().iter().map(|b| b.name.as_str()).collect();
        return Err(Error::new(ErrorCode::UnknownBlock, format!("{path} has no RAM block {name:?}; it has {names:?}"))).into_coded();
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&out)
        .map_err(|e| Error::new(ErrorCode::Io, format!("open {out}: {e}")))
        .into_coded()?;
    f.extract(&name, &mut file).map(|n| n as f64).into_coded()
}
