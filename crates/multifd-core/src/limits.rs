//! Every limit, enum and compatibility rule on what a user configures, in one place.
//!
//! The numbers come from where they are facts (the wire format, the compression registry);
//! this module gathers them, checks a session's choices against them ([`source_violations`],
//! [`check_source`], [`check_destination`]) and describes them ([`describe`]). The binding
//! exports the description and the checks to TypeScript, whose zod schemas, CLI checks and
//! help text are built from them, so every layer refuses the same input with the same code,
//! `ERR_MULTIFD_INVALID_ARGUMENT`. docs/LIMITS.md is generated from [`describe`] (a test keeps
//! it in step).

use std::ops::RangeInclusive;
use std::time::Duration;

use crate::compress;
use crate::error::{Error, ErrorCode, Result};
use crate::wire::{Compression, Geometry, MAX_BLOCK_NAME, MAX_CHANNELS, PACKET_SIZE};

/// Channels of a session (QEMU's `multifd-channels`).
pub const CHANNELS: RangeInclusive<u32> = 1..=MAX_CHANNELS;
/// Channels when the user names none (QEMU's default).
pub const DEFAULT_CHANNELS: u32 = 2;
/// Page sizes: powers of two in this range (pages per packet = 512 KiB / page size).
pub const PAGE_SIZE: RangeInclusive<u32> = Geometry::MIN_PAGE_SIZE..=PACKET_SIZE;
pub const DEFAULT_PAGE_SIZE: u32 = 4096;
/// A block name's length in UTF-8 bytes (no NUL): it travels NUL-terminated in 256 bytes.
pub const BLOCK_NAME_BYTES: RangeInclusive<usize> = 1..=MAX_BLOCK_NAME;
/// Blocks one session may announce.
pub const MAX_BLOCKS: usize = 4096;
/// Connect, handshake and channel-arrival timeouts, in milliseconds.
pub const TIMEOUT_MS: RangeInclusive<u32> = 1..=3_600_000;
pub const DEFAULT_TIMEOUT_MS: u32 = 10_000;
/// The no-progress timeout (`peerTimeoutMs`), in milliseconds; 0 disables it (the facade
/// then passes none to the core).
pub const PEER_TIMEOUT_MS: RangeInclusive<u32> = 100..=3_600_000;
/// No side waits on its peer forever by default.
pub const DEFAULT_PEER_TIMEOUT_MS: u32 = 30_000;
/// Redials per connection (`channelRetries`, control connection included) after it breaks
/// mid-session, waiting 50 ms before the first and doubling up to 2 s; 0 fails at once.
pub const CHANNEL_RETRIES: RangeInclusive<u32> = 0..=100;
pub const DEFAULT_CHANNEL_RETRIES: u32 = 5;
/// How long a destination waits for a lost channel's or control connection's replacement
/// (`resumeWindowMs`), or (`recv --resume`) for a restarted source's new session, in
/// milliseconds; 0 fails at once.
pub const RESUME_WINDOW_MS: RangeInclusive<u32> = 0..=3_600_000;
pub const DEFAULT_RESUME_WINDOW_MS: u32 = 10_000;
/// `maxBandwidth` in bytes per second (up to JavaScript's largest safe integer); absent for
/// no limit.
pub const MAX_BANDWIDTH: RangeInclusive<u64> = 1..=(1 << 53) - 1;
/// A `unix:` address's path, in bytes (the kernel's `sun_path` holds 108 with the NUL).
pub const UNIX_PATH_BYTES: RangeInclusive<usize> = 1..=107;
/// Connections a destination holds that have not identified themselves yet (no first bytes
/// read, or a TLS handshake under way): a new one beyond this closes the oldest. Room for every
/// channel of a session plus its control connection arriving at once.
pub const MAX_UNIDENTIFIED: usize = MAX_CHANNELS as usize + 1;
/// Multifd channels a destination holds that arrived before its session was configured (before
/// the hello): a new one beyond this closes the oldest. Our sources connect channels only after
/// the handshake, so these are rejected; each is also closed after the handshake timeout.
pub const MAX_EARLY_CHANNELS: usize = MAX_CHANNELS as usize;
/// End-to-end integrity methods (`none`, or an xxh3-64 digest per packet and per block).
pub const INTEGRITY: [&str; 2] = ["none", "xxh3"];
/// What the source does with zero pages: `multifd` sends them as offsets only, `none` as data.
pub const ZERO_PAGE_DETECTION: [&str; 2] = ["multifd", "none"];
/// Held ranges one `held` control message carries at most (about 50 bytes each as JSON, so a
/// frame stays far below the 1 MiB frame limit); more go in several messages.
pub const HELD_RANGES_PER_FRAME: usize = 4096;

/// A pair of choices that do not combine, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The option the rule is reported on.
    pub option: &'static str,
    /// What it does not combine with.
    pub conflicts_with: &'static str,
    pub reason: &'static str,
}

/// The combination rules of a sending session, as [`source_violations`] applies them.
pub const RULES: [Rule; 4] = [
    Rule { option: "zeroCopySend", conflicts_with: "compression", reason: "zero-copy send cannot be combined with compression: compressed pages are new buffers (QEMU refuses it too)" },
    Rule { option: "zeroCopySend", conflicts_with: "tls", reason: "zero-copy send cannot be combined with TLS: pages are encrypted into new buffers (QEMU refuses it too)" },
    Rule { option: "zeroCopySend", conflicts_with: "unix: address", reason: "zero-copy send needs a tcp: address (the kernel refuses SO_ZEROCOPY on Unix sockets)" },
    Rule { option: "compressionLevel", conflicts_with: "compression none", reason: "a compression level needs a compression method" },
];

/// One refused choice: the option it is about and the error every layer reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub option: &'static str,
    pub error: Error,
}

fn violation(option: &'static str, message: String) -> Violation {
    Violation { option, error: Error::new(ErrorCode::InvalidArgument, message) }
}

fn range_check<T: PartialOrd + std::fmt::Display>(out: &mut Vec<Violation>, option: &'static str, v: T, r: &RangeInclusive<T>, unit: &str) {
    if !r.contains(&v) {
        out.push(violation(option, format!("{option} must be {}..{}{unit}, got {v}", r.start(), r.end())));
    }
}

/// The choices of a sending session that limits and rules apply to.
#[derive(Debug, Clone, Default)]
pub struct SourceChoices<'a> {
    pub channels: u32,
    /// A method name (`none`, or one of the registry's).
    pub compression: &'a str,
    pub compression_level: Option<u32>,
    pub zero_copy: bool,
    pub tls: bool,
    /// The address is `unix:`.
    pub unix: bool,
    pub connect_timeout_ms: u32,
    pub peer_timeout_ms: Option<u32>,
    pub max_bandwidth: Option<u64>,
    pub channel_retries: u32,
    /// `minChannels`: 1..=channels.
    pub min_channels: u32,
}

/// Every limit and rule `c` breaks, in the order of [`RULES`] after the ranges.
pub fn source_violations(c: &SourceChoices) -> Vec<Violation> {
    let mut out = Vec::new();
    range_check(&mut out, "channels", c.channels, &CHANNELS, "");
    range_check(&mut out, "connectTimeoutMs", c.connect_timeout_ms, &TIMEOUT_MS, " ms");
    if let Some(t) = c.peer_timeout_ms {
        range_check(&mut out, "peerTimeoutMs", t, &PEER_TIMEOUT_MS, " ms");
    }
    if let Some(b) = c.max_bandwidth {
        range_check(&mut out, "maxBandwidth", b, &MAX_BANDWIDTH, " bytes per second");
    }
    range_check(&mut out, "channelRetries", c.channel_retries, &CHANNEL_RETRIES, "");
    if CHANNELS.contains(&c.channels) {
        range_check(&mut out, "minChannels", c.min_channels, &(1..=c.channels), " (at most the channel count)");
    }
    match compress::by_name(c.compression) {
        Err(e) => out.push(Violation { option: "compression", error: e }),
        Ok(method) => {
            if let Err(e) = compress::level(method, c.compression_level) {
                out.push(Violation { option: "compressionLevel", error: e });
            }
            if c.zero_copy && method != Compression::None {
                out.push(violation("zeroCopySend", RULES[0].reason.into()));
            }
        }
    }
    if c.zero_copy && c.tls {
        out.push(violation("zeroCopySend", RULES[1].reason.into()));
    }
    if c.zero_copy && c.unix {
        out.push(violation("zeroCopySend", RULES[2].reason.into()));
    }
    out
}

/// The first limit or rule `c` breaks, as an error.
pub fn check_source(c: &SourceChoices) -> Result<()> {
    match source_violations(c).into_iter().next() {
        Some(v) => Err(v.error),
        None => Ok(()),
    }
}

/// A timeout as whole milliseconds for the checks (saturating: an hour and more is too long
/// either way).
pub fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// The destination's timeouts: how long a connection may take to identify itself (`handshake`),
/// every channel to arrive (`channel`), and the no-progress timeout (`peer`).
pub fn check_destination(handshake: Option<Duration>, channel: Option<Duration>, peer: Option<Duration>) -> Result<()> {
    check_destination_with(handshake, channel, peer, None)
}

/// [`check_destination`], and the time a lost connection's replacement may take (`resume`).
pub fn check_destination_with(handshake: Option<Duration>, channel: Option<Duration>, peer: Option<Duration>, resume: Option<Duration>) -> Result<()> {
    let mut out = Vec::new();
    if let Some(t) = resume {
        range_check(&mut out, "resumeWindowMs", millis(t), &RESUME_WINDOW_MS, " ms");
    }
    if let Some(t) = handshake {
        range_check(&mut out, "handshakeTimeoutMs", millis(t), &TIMEOUT_MS, " ms");
    }
    if let Some(t) = channel {
        range_check(&mut out, "channelTimeoutMs", millis(t), &TIMEOUT_MS, " ms");
    }
    if let Some(t) = peer {
        range_check(&mut out, "peerTimeoutMs", millis(t), &PEER_TIMEOUT_MS, " ms");
    }
    match out.into_iter().next() {
        Some(v) => Err(v.error),
        None => Ok(()),
    }
}

/// An integer range with an optional default, for the description.
#[derive(Debug, Clone, PartialEq)]
pub struct Range {
    pub min: f64,
    pub max: f64,
    pub default: Option<f64>,
}

fn range<T: Copy + Into<f64>>(r: &RangeInclusive<T>, default: Option<T>) -> Range {
    Range { min: (*r.start()).into(), max: (*r.end()).into(), default: default.map(Into::into) }
}

/// A compression method a user may choose, with its levels (`None` for `none`).
#[derive(Debug, Clone, PartialEq)]
pub struct MethodInfo {
    pub name: &'static str,
    pub levels: Option<Range>,
}

/// Everything above as data: what the binding exports and docs/LIMITS.md shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Description {
    pub channels: Range,
    pub page_size: Range,
    pub block_name_bytes: Range,
    pub max_blocks: f64,
    pub timeout_ms: Range,
    pub peer_timeout_ms: Range,
    pub channel_retries: Range,
    pub resume_window_ms: Range,
    pub max_bandwidth: Range,
    pub unix_path_bytes: Range,
    pub compression: Vec<MethodInfo>,
    pub integrity: Vec<&'static str>,
    pub zero_page_detection: Vec<&'static str>,
    pub rules: &'static [Rule],
}

pub fn describe() -> Description {
    let usize_range = |r: &RangeInclusive<usize>| Range { min: *r.start() as f64, max: *r.end() as f64, default: None };
    Description {
        channels: range(&CHANNELS, Some(DEFAULT_CHANNELS)),
        page_size: range(&PAGE_SIZE, Some(DEFAULT_PAGE_SIZE)),
        block_name_bytes: usize_range(&BLOCK_NAME_BYTES),
        max_blocks: MAX_BLOCKS as f64,
        timeout_ms: range(&TIMEOUT_MS, Some(DEFAULT_TIMEOUT_MS)),
        peer_timeout_ms: range(&PEER_TIMEOUT_MS, Some(DEFAULT_PEER_TIMEOUT_MS)),
        channel_retries: range(&CHANNEL_RETRIES, Some(DEFAULT_CHANNEL_RETRIES)),
        resume_window_ms: range(&RESUME_WINDOW_MS, Some(DEFAULT_RESUME_WINDOW_MS)),
        max_bandwidth: Range { min: *MAX_BANDWIDTH.start() as f64, max: *MAX_BANDWIDTH.end() as f64, default: None },
        unix_path_bytes: usize_range(&UNIX_PATH_BYTES),
        compression: compress::names()
            .map(|name| {
                let method = compress::by_name(name).ok().and_then(compress::method);
                MethodInfo { name, levels: method.map(|m| range(&m.levels, Some(m.default_level))) }
            })
            .collect(),
        integrity: INTEGRITY.to_vec(),
        zero_page_detection: ZERO_PAGE_DETECTION.to_vec(),
        rules: &RULES,
    }
}

/// docs/LIMITS.md's table, generated from [`describe`].
pub fn markdown() -> String {
    let d = describe();
    let r = |r: &Range| format!("{}..{}", r.min, r.max);
    let default = |r: &Range| r.default.map_or("none".to_string(), |d| d.to_string());
    let mut rows = vec![
        ("channels", r(&d.channels), default(&d.channels), "parallel multifd channels of a session"),
        ("pageSize", format!("powers of two {}", r(&d.page_size)), default(&d.page_size), "bytes; both sides must agree"),
        ("block name", format!("{} bytes", r(&d.block_name_bytes)), "-".into(), "UTF-8 bytes, no NUL"),
        ("blocks", format!("1..{}", d.max_blocks), "-".into(), "blocks one session announces"),
        ("connectTimeoutMs, handshakeTimeoutMs, channelTimeoutMs", r(&d.timeout_ms), default(&d.timeout_ms), "milliseconds"),
        ("peerTimeoutMs", format!("0 or {}", r(&d.peer_timeout_ms)), default(&d.peer_timeout_ms), "milliseconds without progress before both sides fail; 0 disables"),
        ("channelRetries", r(&d.channel_retries), default(&d.channel_retries), "redials of a broken connection (control included), 50 ms doubling to 2 s between; 0 fails at once"),
        ("resumeWindowMs", r(&d.resume_window_ms), default(&d.resume_window_ms), "milliseconds a destination waits for a broken connection's replacement or (recv --resume) a new session; 0 fails at once"),
        ("maxBandwidth", r(&d.max_bandwidth), default(&d.max_bandwidth), "bytes per second over all channels; absent for no limit"),
        ("minChannels", "1..channels".into(), "1".into(), "channels that must remain: one that cannot be redialled is given up (the migration goes on) only above this"),
        ("unix: address path", format!("{} bytes", r(&d.unix_path_bytes)), "-".into(), "the kernel's sun_path"),
    ];
    let methods: Vec<String> = d.compression.iter().map(|m| m.name.to_string()).collect();
    rows.push(("compression", methods.join(", "), "none".into(), "only the source compresses"));
    let levels: Vec<(String, String, String)> = d.compression.iter().filter_map(|m| m.levels.as_ref().map(|l| (m.name.to_string(), r(l), default(l)))).collect();
    let mut out = String::from("| option | allowed | default | notes |\n|---|---|---|---|\n");
    for (name, allowed, def, note) in rows {
        out += &format!("| {name} | {allowed} | {def} | {note} |\n");
    }
    for (name, allowed, def) in levels {
        out += &format!("| compressionLevel with {name} | {allowed} | {def} | |\n");
    }
    out += &format!("| integrity | {} | none | |\n", d.integrity.join(", "));
    out += &format!("| zeroPageDetection | {} | multifd | |\n", d.zero_page_detection.join(", "));
    out += &format!("| connections not yet identified, at a destination | {MAX_UNIDENTIFIED} at once | - | the oldest is closed beyond; silent ones after handshakeTimeoutMs |\n");
    out += &format!("| channels arriving before the hello, at a destination | {MAX_EARLY_CHANNELS} at once | - | the oldest is closed beyond; each after handshakeTimeoutMs |\n");
    out += &format!("| held ranges per `held` message | {HELD_RANGES_PER_FRAME} | - | 1 MiB ranges a resuming destination offers; more go in several messages |\n");
    out += "\n| option | does not combine with | why |\n|---|---|---|\n";
    for rule in d.rules {
        out += &format!("| {} | {} | {} |\n", rule.option, rule.conflicts_with, rule.reason);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> SourceChoices<'static> {
        SourceChoices { channels: 2, compression: "none", connect_timeout_ms: 10_000, min_channels: 1, ..Default::default() }
    }

    #[test]
    fn boundaries() {
        for (channels, good) in [(0, false), (1, true), (255, true), (256, false)] {
            assert_eq!(check_source(&SourceChoices { channels, ..ok() }).is_ok(), good, "{channels}");
        }
        for (level, good) in [(0, false), (1, true), (20, true), (21, false)] {
            assert_eq!(check_source(&SourceChoices { compression: "zstd", compression_level: Some(level), ..ok() }).is_ok(), good, "{level}");
        }
        for (t, good) in [(99, false), (100, true), (3_600_000, true), (3_600_001, false)] {
            assert_eq!(check_source(&SourceChoices { peer_timeout_ms: Some(t), ..ok() }).is_ok(), good, "{t}");
        }
        for (n, good) in [(0, true), (100, true), (101, false)] {
            assert_eq!(check_source(&SourceChoices { channel_retries: n, ..ok() }).is_ok(), good, "{n}");
        }
        for (min, good) in [(0, false), (1, true), (2, true), (3, false)] {
            assert_eq!(check_source(&SourceChoices { min_channels: min, ..ok() }).is_ok(), good, "{min}");
        }
        for (ms, good) in [(0, true), (3_600_000, true), (3_600_001, false)] {
            assert_eq!(check_destination_with(None, None, None, Some(Duration::from_millis(ms))).is_ok(), good, "{ms}");
        }
        assert_eq!(check_source(&SourceChoices { max_bandwidth: Some(0), ..ok() }).unwrap_err().code, ErrorCode::InvalidArgument);
        assert!(check_destination(Some(Duration::ZERO), None, None).is_err());
        assert!(check_destination(Some(Duration::from_millis(1)), Some(Duration::from_secs(3600)), Some(Duration::from_millis(100))).is_ok());
    }

    #[test]
    fn every_rule_is_applied_and_reported_on_its_option() {
        let zc = SourceChoices { zero_copy: true, ..ok() };
        assert!(source_violations(&zc).is_empty());
        let cases = [SourceChoices { compression: "zlib", ..zc.clone() }, SourceChoices { tls: true, ..zc.clone() }, SourceChoices { unix: true, ..zc.clone() }, SourceChoices { compression_level: Some(1), ..ok() }];
        for (rule, case) in RULES.iter().zip(cases) {
            let v = source_violations(&case);
            assert_eq!(v.len(), 1, "{v:?}");
            assert_eq!((v[0].option, v[0].error.code), (rule.option, ErrorCode::InvalidArgument));
        }
    }

    #[test]
    fn the_description_follows_the_registry() {
        let d = describe();
        assert_eq!(d.compression.len(), 1 + compress::METHODS.len());
        assert!(d.compression[0].levels.is_none());
        for (m, info) in compress::METHODS.iter().zip(&d.compression[1..]) {
            assert_eq!(info.name, m.compression.name());
            assert_eq!(info.levels.as_ref().unwrap().max, f64::from(*m.levels.end()));
        }
    }

    /// docs/LIMITS.md holds the generated table; regenerate it with
    /// `UPDATE_LIMITS_DOC=1 cargo test -p multifd-core limits`.
    #[test]
    fn the_limits_doc_is_generated_from_the_description() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/LIMITS.md");
        let doc = std::fs::read_to_string(path).unwrap_or_default();
        let (begin, end) = ("<!-- generated from limits::markdown() -->\n", "<!-- end generated -->");
        let table = markdown();
        if std::env::var_os("UPDATE_LIMITS_DOC").is_some() {
            let (head, tail) = match (doc.find(begin), doc.find(end)) {
                (Some(b), Some(e)) => (doc[..b].to_string(), doc[e..].to_string()),
                _ => (doc.clone(), end.to_string()),
            };
            std::fs::write(path, format!("{head}{begin}{table}{tail}")).unwrap();
            return;
        }
        assert!(doc.contains(&format!("{begin}{table}{end}")), "docs/LIMITS.md is out of date: run UPDATE_LIMITS_DOC=1 cargo test -p multifd-core limits");
    }
}
