//! The core's limits and option rules (`multifd_core::limits`), for the TypeScript schemas,
//! the CLI and its help. Conversion only: every number and rule is defined in the core.

use multifd_core::limits::{self, Range, SourceChoices};
use multifd_core::transport::Address;
use napi_derive::napi;

/// An integer range, with the default where there is one.
#[napi(object)]
pub struct IntRange {
    pub min: f64,
    pub max: f64,
    pub default: Option<f64>,
}

impl From<Range> for IntRange {
    fn from(r: Range) -> Self {
        IntRange { min: r.min, max: r.max, default: r.default }
    }
}

/// A compression method and its levels (absent for `none`).
#[napi(object)]
pub struct CompressionMethodInfo {
    pub name: String,
    pub levels: Option<IntRange>,
}

/// Two choices that do not combine, and why.
#[napi(object)]
pub struct OptionRule {
    pub option: String,
    pub conflicts_with: String,
    pub reason: String,
}

/// Every limit and rule on what a user configures (docs/LIMITS.md shows the same).
#[napi(object)]
pub struct Limits {
    pub channels: IntRange,
    /// Powers of two in this range.
    pub page_size: IntRange,
    /// In UTF-8 bytes, without NUL.
    pub block_name_bytes: IntRange,
    pub max_blocks: f64,
    /// Connect, handshake and channel-arrival timeouts (ms).
    pub timeout_ms: IntRange,
    pub peer_timeout_ms: IntRange,
    /// Redials of a broken connection (`channelRetries`).
    pub channel_retries: IntRange,
    /// How long a destination waits for a replacement connection or (`recv --resume`) a new session (ms, `resumeWindowMs`).
    pub resume_window_ms: IntRange,
    /// Bytes per second.
    pub max_bandwidth: IntRange,
    /// A `unix:` address's path, in bytes.
    pub unix_path_bytes: IntRange,
    /// `none` first, then the registry's methods.
    pub compression: Vec<CompressionMethodInfo>,
    pub integrity: Vec<String>,
    pub zero_page_detection: Vec<String>,
    pub rules: Vec<OptionRule>,
}

#[napi]
pub fn limits() -> Limits {
    let d = limits::describe();
    Limits {
        channels: d.channels.into(),
        page_size: d.page_size.into(),
        block_name_bytes: d.block_name_bytes.into(),
        max_blocks: d.max_blocks,
        timeout_ms: d.timeout_ms.into(),
        peer_timeout_ms: d.peer_timeout_ms.into(),
        channel_retries: d.channel_retries.into(),
        resume_window_ms: d.resume_window_ms.into(),
        max_bandwidth: d.max_bandwidth.into(),
        unix_path_bytes: d.unix_path_bytes.into(),
        compression: d.compression.into_iter().map(|m| CompressionMethodInfo { name: m.name.into(), levels: m.levels.map(Into::into) }).collect(),
        integrity: d.integrity.into_iter().map(Into::into).collect(),
        zero_page_detection: d.zero_page_detection.into_iter().map(Into::into).collect(),
        rules: d.rules.iter().map(|r| OptionRule { option: r.option.into(), conflicts_with: r.conflicts_with.into(), reason: r.reason.into() }).collect(),
    }
}

/// The choices of a sending session the rules look at (already range-checked by the caller).
#[napi(object)]
pub struct SourceRuleInput {
    pub address: String,
    pub channels: u32,
    pub compression: String,
    pub compression_level: Option<u32>,
    pub zero_copy: bool,
    pub tls: bool,
    pub connect_timeout_ms: u32,
    pub peer_timeout_ms: Option<u32>,
    pub max_bandwidth: Option<f64>,
    pub channel_retries: Option<u32>,
    pub min_channels: Option<u32>,
}

/// One refused choice: the option it concerns, its code and why.
#[napi(object)]
pub struct LimitViolation {
    pub option: String,
    pub code: String,
    pub message: String,
}

/// Every limit and rule these choices break, as `Source` start applies them.
#[napi]
pub fn check_source_options(o: SourceRuleInput) -> Vec<LimitViolation> {
    let choices = SourceChoices {
        channels: o.channels,
        compression: &o.compression,
        compression_level: o.compression_level,
        zero_copy: o.zero_copy,
        tls: o.tls,
        unix: o.address.starts_with("unix:"),
        connect_timeout_ms: o.connect_timeout_ms,
        peer_timeout_ms: o.peer_timeout_ms,
        // Not a whole number of bytes, or beyond 2^64: a value no range holds.
        max_bandwidth: o.max_bandwidth.map(|b| if b.fract() == 0.0 && b >= 0.0 { b as u64 } else { 0 }),
        channel_retries: o.channel_retries.unwrap_or(limits::DEFAULT_CHANNEL_RETRIES),
        min_channels: o.min_channels.unwrap_or(1),
    };
    limits::source_violations(&choices).into_iter().map(|v| LimitViolation { option: v.option.into(), code: v.error.code.as_str().into(), message: v.error.message }).collect()
}

/// Why `address` is not a valid `tcp:HOST:PORT` or `unix:PATH`, or nothing when it is.
#[napi]
pub fn check_address(address: String) -> Option<String> {
    Address::parse(&address).err().map(|e| e.message)
}
