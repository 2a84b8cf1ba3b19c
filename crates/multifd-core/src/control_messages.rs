//! The control protocol's messages (docs/PROTOCOL.md, "Messages"): the one definition of what
//! each says, its JSON wire form (version 1) and what a receiver accepts.
//!
//! [`ControlMessage::decode`] parses a frame and checks every field against [`crate::limits`]
//! before anything acts on it: a frame that is not one of these messages, or says something no
//! correct peer says, is `ERR_MULTIFD_PROTOCOL`; a hello naming a block twice is
//! `ERR_MULTIFD_DUPLICATE_BLOCK`. [`ControlMessage::encode`] writes the same JSON the
//! TypeScript facade wrote before (field order included). Sequencing rules (which message may
//! come when) live in `protocol.rs`, above this module.

use serde::{Deserialize, Serialize};

use crate::compress;
use crate::error::{Error, ErrorCode, Result, fail};
use crate::integrity::PIECE;
use crate::limits::{BLOCK_NAME_BYTES, CHANNELS, HELD_RANGES_PER_FRAME, INTEGRITY, MAX_BLOCKS, PAGE_SIZE};

/// The control protocol version this build speaks (`protocol` in hello and welcome).
pub const PROTOCOL_VERSION: u32 = 1;

/// JavaScript's largest safe integer: counters above it cannot reach TypeScript intact.
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// One control message; the JSON object's `type` field names the variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum ControlMessage {
    /// Source → destination, first: the session it announces.
    Hello(Hello),
    /// Destination → source: the handshake is accepted.
    Welcome { protocol: i64 },
    /// Source → destination: a new dirty-page round begins.
    Round { round: u64 },
    /// Destination → source: every channel passed SYNC number `epoch`.
    Synced { epoch: u64, packet_num: u64 },
    /// Source → destination: done after sync `epoch`; with integrity, each block's digest.
    Complete {
        epoch: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digests: Option<Vec<BlockDigest>>,
    },
    /// Destination → source: every page arrived and the channels are closed.
    Completed,
    /// Source → destination: the source cancelled.
    Cancel,
    /// Either way: liveness.
    Ping,
    /// Either way: the sender failed with `code`.
    Error { code: String, message: String },

    // Channel recovery (docs/PROTOCOL.md, "Channel recovery").
    /// Source → destination: channel `channel` could not be redialled and is given up; the
    /// barrier stops waiting for it and its pages come again on the other channels.
    ChannelDropped { channel: u32 },
    // Resumable transfers (docs/PROTOCOL.md, "Resume").
    /// Source → destination, after `welcome` and before any page: which ranges do you hold?
    Resume,
    /// Destination → source: ranges it holds, each with its digest, in one or more messages;
    /// the last says `done` (a destination holding nothing sends one empty `done` message).
    Held { ranges: Vec<HeldRange>, done: bool },
    /// Source → destination: bytes it skips because the destination's digests matched.
    Resumed { bytes: u64 },
    // Control reconnect (docs/PROTOCOL.md, "Control reconnect"): handled by the core on both
    // sides, never handed to the orchestrator.
    /// Source → destination, the first frame of a control connection that replaces a broken
    /// one: the session it belongs to and the last sync epoch the source heard acknowledged.
    Reconnect { session: String, acked: u64 },
    /// Destination → source, the answer: the last barrier every channel passed, and whether
    /// `completed` was already sent (it may have been lost with the old connection).
    Reconnected { epoch: u64, completed: bool },
}

/// A range a resuming destination holds: piece `index` (the [`PIECE`]-byte range at
/// `index * PIECE`, the last one of a block shorter) of the hello's block number `block`, and
/// its xxh3-64 as 16 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldRange {
    pub block: u32,
    pub index: u64,
    pub xxh3: String,
}

/// What a source announces in its hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    /// The sender's protocol version; a receiver refuses any other than its own.
    pub protocol: i64,
    /// The session UUID every init packet carries, as 32 lowercase hex digits.
    pub session: String,
    pub channels: u32,
    pub page_size: u32,
    /// A compression method name (`none` or one of the registry's).
    pub compression: String,
    pub blocks: Vec<BlockEntry>,
    /// End-to-end integrity (`xxh3`, or `none`); absent means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity: Option<String>,
}

/// A block of the hello's table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockEntry {
    pub name: String,
    pub length: u64,
}

/// A block's xxh3-64 in `complete`, as 16 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockDigest {
    pub name: String,
    pub xxh3: String,
}

impl ControlMessage {
    /// Parses and checks one frame's payload.
    pub fn decode(frame: &[u8]) -> Result<Self> {
        let m: ControlMessage = serde_json::from_slice(frame).map_err(|e| {
            Error::new(ErrorCode::Protocol, format!("invalid control message ({} bytes): {e}", frame.len()))
        })?;
        m.check()?;
        Ok(m)
    }

    /// The frame's payload: compact JSON, `type` first, then the fields in documented order.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a control message always serialises")
    }

    /// The `type` field's value.
    pub fn kind(&self) -> &'static str {
        match self {
            ControlMessage::Hello(_) => "hello",
            ControlMessage::Welcome { .. } => "welcome",
            ControlMessage::Round { .. } => "round",
            ControlMessage::Synced { .. } => "synced",
            ControlMessage::Complete { .. } => "complete",
            ControlMessage::Completed => "completed",
            ControlMessage::Cancel => "cancel",
            ControlMessage::Ping => "ping",
            ControlMessage::Error { .. } => "error",
            ControlMessage::ChannelDropped { .. } => "channelDropped",
            ControlMessage::Resume => "resume",
            ControlMessage::Held { .. } => "held",
            ControlMessage::Resumed { .. } => "resumed",
            ControlMessage::Reconnect { .. } => "reconnect",
            ControlMessage::Reconnected { .. } => "reconnected",
        }
    }

    /// Every field against the limits (what a shape cannot say).
    pub fn check(&self) -> Result<()> {
        match self {
            ControlMessage::Hello(h) => h.check(),
            ControlMessage::Round { round } => safe("round", *round),
            ControlMessage::Synced { epoch, .. } => {
                if *epoch == 0 {
                    fail!(Protocol, "invalid control message: synced names epoch 0 (epochs start at 1)");
                }
                safe("synced epoch", *epoch)
            }
            ControlMessage::Complete { epoch, digests } => {
                safe("complete epoch", *epoch)?;
                let Some(digests) = digests else { return Ok(()) };
                if digests.len() > MAX_BLOCKS {
                    fail!(Protocol, "invalid control message: complete carries {} digests, at most {MAX_BLOCKS}", digests.len());
                }
                for d in digests {
                    if !is_hex(&d.xxh3, 16) {
                        fail!(Protocol, "invalid control message: block {:?}'s digest {:?} is not 16 lowercase hex digits", d.name, d.xxh3);
                    }
                }
                Ok(())
            }
            ControlMessage::ChannelDropped { channel } => {
                if *channel >= *CHANNELS.end() {
                    fail!(Protocol, "invalid control message: channelDropped names channel {channel}, ids are 0..{}", CHANNELS.end() - 1);
                }
                Ok(())
            }
            ControlMessage::Held { ranges, .. } => {
                if ranges.len() > HELD_RANGES_PER_FRAME {
                    fail!(Protocol, "invalid control message: held carries {} ranges, at most {HELD_RANGES_PER_FRAME}", ranges.len());
                }
                for r in ranges {
                    if r.block as usize >= MAX_BLOCKS || r.index > MAX_SAFE_INTEGER / PIECE || !is_hex(&r.xxh3, 16) {
                        fail!(Protocol, "invalid control message: held range {r:?} (block below {MAX_BLOCKS}, a safe piece index, 16 lowercase hex digits)");
                    }
                }
                Ok(())
            }
            ControlMessage::Resumed { bytes } => safe("resumed bytes", *bytes),
            ControlMessage::Reconnect { session, acked } => {
                if !is_hex(session, 32) {
                    fail!(Protocol, "invalid control message: reconnect's session {session:?} is not 32 lowercase hex digits");
                }
                safe("reconnect acked", *acked)
            }
            ControlMessage::Reconnected { epoch, .. } => safe("reconnected epoch", *epoch),
            ControlMessage::Welcome { .. } | ControlMessage::Completed | ControlMessage::Cancel | ControlMessage::Ping | ControlMessage::Error { .. } | ControlMessage::Resume => Ok(()),
        }
    }
}

impl Hello {
    /// The announcement, checked before a destination creates or touches a single block:
    /// session, channels, compression and integrity known, page size one the core supports,
    /// every block name valid and once, every block a positive multiple of the page.
    pub fn check(&self) -> Result<()> {
        if !is_hex(&self.session, 32) {
            fail!(Protocol, "invalid control message: hello's session {:?} is not 32 lowercase hex digits", self.session);
        }
        if !CHANNELS.contains(&self.channels) {
            fail!(Protocol, "invalid control message: hello announces {} channels, not {}..{}", self.channels, CHANNELS.start(), CHANNELS.end());
        }
        if let Err(e) = compress::by_name(&self.compression) {
            fail!(Protocol, "invalid control message: hello's compression: {}", e.message);
        }
        if let Some(i) = &self.integrity
            && !INTEGRITY.contains(&i.as_str())
        {
            fail!(Protocol, "invalid control message: hello's integrity {i:?} is not one of {}", INTEGRITY.join(", "));
        }
        if self.blocks.len() > MAX_BLOCKS {
            fail!(Protocol, "invalid control message: hello announces {} blocks, at most {MAX_BLOCKS}", self.blocks.len());
        }
        for b in &self.blocks {
            if !BLOCK_NAME_BYTES.contains(&b.name.len()) || b.name.contains('\0') {
                fail!(Protocol, "invalid control message: block name {:?} is not {}..{} bytes of UTF-8 without NUL", b.name, BLOCK_NAME_BYTES.start(), BLOCK_NAME_BYTES.end());
            }
        }
        let p = self.page_size;
        if !p.is_power_of_two() || !PAGE_SIZE.contains(&p) {
            fail!(Protocol, "hello announces page size {p}, not a power of two in {}..{}", PAGE_SIZE.start(), PAGE_SIZE.end());
        }
        let mut seen = std::collections::HashSet::with_capacity(self.blocks.len());
        for b in &self.blocks {
            if !seen.insert(b.name.as_str()) {
                fail!(DuplicateBlock, "hello announces block {:?} twice", b.name);
            }
            if b.length == 0 || b.length % u64::from(p) != 0 {
                fail!(Protocol, "hello announces block {:?} of {} bytes, not a positive multiple of the {p}-byte page", b.name, b.length);
            }
        }
        Ok(())
    }
}

fn safe(what: &str, n: u64) -> Result<()> {
    if n > MAX_SAFE_INTEGER {
        fail!(Protocol, "invalid control message: {what} {n} is beyond 2^53 - 1");
    }
    Ok(())
}

fn is_hex(s: &str, digits: usize) -> bool {
    s.len() == digits && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: &str = "0123456789abcdef0123456789abcdef";

    fn hello_json(blocks: &str) -> String {
        format!(r#"{{"type":"hello","protocol":1,"session":"{SESSION}","channels":4,"pageSize":4096,"compression":"zstd","blocks":{blocks},"integrity":"xxh3"}}"#)
    }

    fn refused(json: &str) -> ErrorCode {
        ControlMessage::decode(json.as_bytes()).expect_err(json).code
    }

    /// Every message, as docs/PROTOCOL.md and the TypeScript facade write it, decodes to what it
    /// says and encodes back to the same bytes.
    #[test]
    fn every_message_round_trips_through_its_documented_json() {
        let hello = hello_json(r#"[{"name":"pc.ram","length":8192},{"name":"vga.vram","length":4096}]"#);
        let cases: Vec<(&str, ControlMessage)> = vec![
            (
                &hello,
                ControlMessage::Hello(Hello {
                    protocol: 1,
                    session: SESSION.into(),
                    channels: 4,
                    page_size: 4096,
                    compression: "zstd".into(),
                    blocks: vec![BlockEntry { name: "pc.ram".into(), length: 8192 }, BlockEntry { name: "vga.vram".into(), length: 4096 }],
                    integrity: Some("xxh3".into()),
                }),
            ),
            (r#"{"type":"welcome","protocol":1}"#, ControlMessage::Welcome { protocol: 1 }),
            (r#"{"type":"round","round":0}"#, ControlMessage::Round { round: 0 }),
            (r#"{"type":"synced","epoch":3,"packetNum":1234}"#, ControlMessage::Synced { epoch: 3, packet_num: 1234 }),
            (r#"{"type":"complete","epoch":2}"#, ControlMessage::Complete { epoch: 2, digests: None }),
            (
                r#"{"type":"complete","epoch":2,"digests":[{"name":"pc.ram","xxh3":"00ff00ff00ff00ff"}]}"#,
                ControlMessage::Complete { epoch: 2, digests: Some(vec![BlockDigest { name: "pc.ram".into(), xxh3: "00ff00ff00ff00ff".into() }]) },
            ),
            (r#"{"type":"completed"}"#, ControlMessage::Completed),
            (r#"{"type":"cancel"}"#, ControlMessage::Cancel),
            (r#"{"type":"ping"}"#, ControlMessage::Ping),
            (r#"{"type":"channelDropped","channel":3}"#, ControlMessage::ChannelDropped { channel: 3 }),
            (r#"{"type":"resume"}"#, ControlMessage::Resume),
            (
                r#"{"type":"held","ranges":[{"block":0,"index":7,"xxh3":"00ff00ff00ff00ff"}],"done":false}"#,
                ControlMessage::Held { ranges: vec![HeldRange { block: 0, index: 7, xxh3: "00ff00ff00ff00ff".into() }], done: false },
            ),
            (r#"{"type":"held","ranges":[],"done":true}"#, ControlMessage::Held { ranges: vec![], done: true }),
            (r#"{"type":"resumed","bytes":1048576}"#, ControlMessage::Resumed { bytes: 1 << 20 }),
            (r#"{"type":"reconnect","session":"0123456789abcdef0123456789abcdef","acked":2}"#, ControlMessage::Reconnect { session: SESSION.into(), acked: 2 }),
            (r#"{"type":"reconnected","epoch":3,"completed":false}"#, ControlMessage::Reconnected { epoch: 3, completed: false }),
            (
                r#"{"type":"error","code":"ERR_MULTIFD_TIMEOUT","message":"no \"synced\" in 30 s"}"#,
                ControlMessage::Error { code: "ERR_MULTIFD_TIMEOUT".into(), message: "no \"synced\" in 30 s".into() },
            ),
        ];
        for (json, message) in cases {
            assert_eq!(ControlMessage::decode(json.as_bytes()).unwrap(), message, "{json}");
            assert_eq!(String::from_utf8(message.encode()).unwrap(), json);
            assert_eq!(message.kind(), json.split('"').nth(3).unwrap());
        }
    }

    #[test]
    fn a_hello_without_integrity_and_with_extra_fields_is_accepted() {
        let json = format!(r#"{{"type":"hello","protocol":1,"session":"{SESSION}","channels":1,"pageSize":512,"compression":"none","blocks":[],"future":true}}"#);
        let ControlMessage::Hello(h) = ControlMessage::decode(json.as_bytes()).unwrap() else { panic!("not a hello") };
        assert_eq!((h.integrity, h.page_size, h.blocks.len()), (None, 512, 0));
        // A later version's hello still parses, so the receiver can refuse it by its version.
        let v2 = json.replace(r#""protocol":1"#, r#""protocol":2"#);
        assert!(matches!(ControlMessage::decode(v2.as_bytes()).unwrap(), ControlMessage::Hello(Hello { protocol: 2, .. })));
    }

    #[test]
    fn hostile_frames_are_protocol_errors() {
        let blocks = r#"[{"name":"pc.ram","length":8192}]"#;
        let hello = hello_json(blocks);
        let cases = [
            "".to_string(),
            "not json".into(),
            "[1,2]".into(),
            r#"{"kind":"ping"}"#.into(),
            r#"{"type":"shutdown"}"#.into(),
            r#"{"type":"round","round":-1}"#.into(),
            r#"{"type":"round","round":"1"}"#.into(),
            r#"{"type":"round","round":9007199254740992}"#.into(),
            r#"{"type":"synced","epoch":0,"packetNum":1}"#.into(),
            r#"{"type":"synced","epoch":1}"#.into(),
            r#"{"type":"welcome"}"#.into(),
            r#"{"type":"reconnect","session":"0123","acked":0}"#.into(),
            r#"{"type":"reconnect","session":"0123456789abcdef0123456789abcdef"}"#.into(),
            r#"{"type":"reconnected","epoch":9007199254740992,"completed":false}"#.into(),
            r#"{"type":"error","code":"ERR_MULTIFD_IO"}"#.into(),
            r#"{"type":"complete","epoch":1,"digests":[{"name":"pc.ram","xxh3":"00FF00FF00FF00FF"}]}"#.into(),
            r#"{"type":"complete","epoch":1,"digests":[{"name":"pc.ram","xxh3":"00ff"}]}"#.into(),
            r#"{"type":"complete","epoch":1,"digests":[{"name":"pc.ram","xxh3":"00ff00ff00ff00ff","extra":1}]}"#.into(),
            r#"{"type":"held","ranges":[]}"#.into(),
            r#"{"type":"held","ranges":[{"block":0,"index":1,"xxh3":"00FF00FF00FF00FF"}],"done":true}"#.into(),
            r#"{"type":"held","ranges":[{"block":4096,"index":1,"xxh3":"00ff00ff00ff00ff"}],"done":true}"#.into(),
            r#"{"type":"held","ranges":[{"block":0,"index":8589934592,"xxh3":"00ff00ff00ff00ff"}],"done":true}"#.into(),
            r#"{"type":"held","ranges":[{"block":0,"index":1,"xxh3":"00ff00ff00ff00ff","size":1}],"done":true}"#.into(),
            format!(r#"{{"type":"held","ranges":[{}],"done":true}}"#, vec![r#"{"block":0,"index":1,"xxh3":"00ff00ff00ff00ff"}"#; HELD_RANGES_PER_FRAME + 1].join(",")),
            r#"{"type":"resumed","bytes":-1}"#.into(),
            hello.replace(SESSION, "0123"),
            hello.replace(SESSION, &SESSION.to_uppercase()),
            hello.replace(r#""channels":4"#, r#""channels":0"#),
            hello.replace(r#""channels":4"#, r#""channels":1000"#),
            hello.replace(r#""compression":"zstd""#, r#""compression":"lz4""#),
            hello.replace(r#""integrity":"xxh3""#, r#""integrity":"md5""#),
            hello.replace(r#""pageSize":4096"#, r#""pageSize":4000"#),
            hello.replace(r#""pageSize":4096"#, r#""pageSize":256"#),
            hello.replace(r#""pageSize":4096"#, r#""pageSize":1048576"#),
            hello.replace(blocks, r#"[{"name":"pc.ram","length":0}]"#),
            hello.replace(blocks, r#"[{"name":"pc.ram","length":6144}]"#),
            hello.replace(blocks, r#"[{"name":"","length":4096}]"#),
            hello.replace(blocks, r#"[{"name":"a\u0000b","length":4096}]"#),
            hello.replace(blocks, &format!(r#"[{{"name":"{}","length":4096}}]"#, "x".repeat(256))),
            hello.replace(blocks, r#"[{"name":"pc.ram","length":4096,"offset":0}]"#),
            hello.replace(blocks, &format!("[{}]", vec![r#"{"name":"b","length":4096}"#; MAX_BLOCKS + 1].join(","))),
        ];
        for json in &cases {
            assert_eq!(refused(json), ErrorCode::Protocol, "{json}");
        }
        let longest = hello.replace(blocks, &format!(r#"[{{"name":"{}","length":4096}}]"#, "x".repeat(255)));
        ControlMessage::decode(longest.as_bytes()).expect("a 255-byte name fits");
    }

    #[test]
    fn a_block_named_twice_is_a_duplicate_block() {
        let json = hello_json(r#"[{"name":"pc.ram","length":4096},{"name":"vga","length":4096},{"name":"pc.ram","length":8192}]"#);
        assert_eq!(refused(&json), ErrorCode::DuplicateBlock);
    }

    #[test]
    fn every_encoded_message_decodes_to_itself() {
        let h = Hello {
            protocol: PROTOCOL_VERSION.into(),
            session: SESSION.into(),
            channels: 2,
            page_size: 65536,
            compression: "zlib".into(),
            blocks: vec![BlockEntry { name: "ünïcode \"quoted\"\n".into(), length: 1 << 20 }],
            integrity: None,
        };
        for m in [ControlMessage::Hello(h), ControlMessage::Error { code: "ERR_MULTIFD_IO".into(), message: "\u{1}\\/".into() }] {
            assert_eq!(ControlMessage::decode(&m.encode()).unwrap(), m);
        }
    }
}
