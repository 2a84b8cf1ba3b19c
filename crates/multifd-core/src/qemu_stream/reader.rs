//! Decoding QEMU's main migration stream from any byte source. Every length is bounded
//! before anything is allocated; an early end is `ERR_MULTIFD_TRUNCATED`, a construct this
//! implementation cannot follow `ERR_MULTIFD_QEMU_STREAM`.

use std::io::{self, Read};

use super::{Configuration, FILE_MAGIC, FILE_VERSION, RamBlockEntry, kind, limits, ram_flag};
use crate::error::{Error, ErrorCode, Result, fail};

/// A top-level item of the stream, header read, body not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Top {
    /// `QEMU_VM_SECTION_START` (`full == false`) or `QEMU_VM_SECTION_FULL`.
    Start { full: bool, id: u32, name: String, instance: u32, version: u32 },
    /// `QEMU_VM_SECTION_PART` (`end == false`) or `QEMU_VM_SECTION_END`.
    Part { end: bool, id: u32 },
    /// `QEMU_VM_COMMAND` with its payload.
    Command { cmd: u16, data: Vec<u8> },
    /// `QEMU_VM_EOF`.
    Eof,
}

/// One be64 of the RAM section: flags in the low bits, an offset (or total size) above them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamWord {
    pub flags: u64,
    pub addr: u64,
}

/// Sequential reads with a position for messages.
pub struct StreamReader<R> {
    inner: R,
    pos: u64,
}

fn read_error(e: io::Error, what: &str, pos: u64) -> Error {
    let code = match e.kind() {
        io::ErrorKind::UnexpectedEof => ErrorCode::Truncated,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ErrorCode::Timeout,
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe => ErrorCode::ConnectionClosed,
        _ => ErrorCode::Io,
    };
    let e = if code == ErrorCode::Truncated { "the stream ends here".to_string() } else { e.to_string() };
    Error::new(code, format!("main stream at byte {pos}, reading {what}: {e}"))
}

impl<R: Read> StreamReader<R> {
    pub fn new(inner: R) -> Self {
        StreamReader { inner, pos: 0 }
    }

    /// Bytes consumed so far.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    pub fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.inner.read_exact(buf).map_err(|e| read_error(e, what, self.pos))?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.fill(&mut b, what)?;
        Ok(b)
    }

    pub fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    pub fn be16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    pub fn be32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    pub fn be64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// `n` bytes; callers bound `n`.
    pub fn bytes(&mut self, n: usize, what: &str) -> Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.fill(&mut b, what)?;
        Ok(b)
    }

    fn string(&mut self, n: usize, what: &str) -> Result<String> {
        let at = self.pos;
        String::from_utf8(self.bytes(n, what)?).map_err(|_| Error::new(ErrorCode::QemuStream, format!("{what} at byte {at} is not UTF-8")))
    }

    /// QEMU's idstr: a u8 length (not 0) and that many bytes.
    pub fn idstr(&mut self, what: &str) -> Result<String> {
        let at = self.pos;
        let n = self.u8(what)?;
        if n == 0 {
            fail!(QemuStream, "{what} at byte {at} has length 0");
        }
        self.string(n.into(), what)
    }

    /// Magic and version.
    pub fn header(&mut self) -> Result<()> {
        let magic = self.be32("file magic")?;
        if magic != FILE_MAGIC {
            fail!(BadMagic, "not a QEMU migration stream: magic {magic:#010x}, expected {FILE_MAGIC:#010x} ('QEVM')");
        }
        let version = self.be32("file version")?;
        if version != FILE_VERSION {
            fail!(BadVersion, "QEMU migration stream version {version}, this implementation knows {FILE_VERSION}");
        }
        Ok(())
    }

    /// The configuration section (type byte included). It has no terminator: it ends where
    /// the next byte is not a subsection, so that byte is returned too (the next item's type).
    pub fn configuration(&mut self) -> Result<(Configuration, u8)> {
        let at = self.pos;
        let k = self.u8("section type")?;
        if k != kind::CONFIGURATION {
            fail!(QemuStream, "expected the configuration section (type 0x07) at byte {at}, found type {k:#04x}");
        }
        let len = self.be32("machine type length")?;
        if len == 0 || len > limits::MAX_MACHINE_LEN {
            fail!(QemuStream, "machine type length {len} at byte {} is outside 1..={}", at + 1, limits::MAX_MACHINE_LEN);
        }
        let machine = self.string(len as usize, "machine type")?;
        let mut c = Configuration { machine, capabilities: Vec::new(), page_bits: None, uuid: None };
        let mut seen: Vec<String> = Vec::new();
        loop {
            let next = self.u8("section type")?;
            if next != kind::SUBSECTION {
                return Ok((c, next));
            }
            let at = self.pos - 1;
            let name = self.idstr("configuration subsection name")?;
            if seen.contains(&name) || seen.len() >= 8 {
                fail!(QemuStream, "configuration subsection '{name}' at byte {at} repeats");
            }
            let version = self.be32("configuration subsection version")?;
            if version != 1 {
                fail!(BadVersion, "configuration subsection '{name}' at byte {at} has version {version}, this implementation knows 1");
            }
            match name.as_str() {
                "configuration/target-page-bits" => {
                    let bits = self.be32("target page bits")?;
                    if !(9..=16).contains(&bits) {
                        fail!(QemuStream, "target page bits {bits} at byte {at} are outside 9..=16");
                    }
                    c.page_bits = Some(bits);
                }
                "configuration/capabilities" => {
                    let count = self.be32("capability count")?;
                    if count > limits::MAX_CAPABILITIES {
                        fail!(QemuStream, "{count} capabilities at byte {at}, at most {} accepted", limits::MAX_CAPABILITIES);
                    }
                    for _ in 0..count {
                        c.capabilities.push(self.idstr("capability name")?);
                    }
                }
                "configuration/uuid" => c.uuid = Some(self.array("VM UUID")?),
                _ => fail!(QemuStream, "unknown configuration subsection '{name}' at byte {at}"),
            }
            seen.push(name);
        }
    }

    /// The next top-level item, given its type byte (already read).
    pub fn top_after(&mut self, k: u8) -> Result<Top> {
        let at = self.pos - 1;
        Ok(match k {
            kind::SECTION_START | kind::SECTION_FULL => {
                let id = self.be32("section id")?;
                let name = self.idstr("section name")?;
                let instance = self.be32("section instance id")?;
                let version = self.be32("section version")?;
                Top::Start { full: k == kind::SECTION_FULL, id, name, instance, version }
            }
            kind::SECTION_PART | kind::SECTION_END => Top::Part { end: k == kind::SECTION_END, id: self.be32("section id")? },
            kind::COMMAND => {
                let cmd = self.be16("command")?;
                let len = self.be16("command length")?;
                if len > limits::MAX_COMMAND_LEN {
                    fail!(QemuStream, "command {cmd:#x} at byte {at} carries {len} bytes, at most {} accepted", limits::MAX_COMMAND_LEN);
                }
                Top::Command { cmd, data: self.bytes(len.into(), "command payload")? }
            }
            kind::EOF => Top::Eof,
            other => fail!(QemuStream, "unknown item type {other:#04x} at byte {at} of the main stream"),
        })
    }

    pub fn top(&mut self) -> Result<Top> {
        let k = self.u8("section type")?;
        self.top_after(k)
    }

    /// The section footer QEMU writes after every section: 0x7e and the section id.
    pub fn footer(&mut self, id: u32) -> Result<()> {
        let at = self.pos;
        let k = self.u8("section footer")?;
        let got = self.be32("section footer id")?;
        if k != kind::SECTION_FOOTER || got != id {
            fail!(QemuStream, "expected the footer of section {id} at byte {at}, found type {k:#04x} id {got}");
        }
        Ok(())
    }

    /// One be64 of the RAM section, split at the page size.
    pub fn ram_word(&mut self, page_size: u64) -> Result<RamWord> {
        let w = self.be64("RAM flags")?;
        let mask = page_size - 1;
        Ok(RamWord { flags: w & mask, addr: w & !mask })
    }

    /// The block list after `RAM_SAVE_FLAG_MEM_SIZE` (whose word gave `total`): names and
    /// lengths, which must add up to `total`. Page-aligned lengths, no duplicates.
    pub fn block_list(&mut self, total: u64, page_size: u64) -> Result<Vec<RamBlockEntry>> {
        if total == 0 || total > limits::MAX_TOTAL_RAM {
            fail!(QemuStream, "total RAM {total} is outside 1..={}", limits::MAX_TOTAL_RAM);
        }
        let mut blocks: Vec<RamBlockEntry> = Vec::new();
        let mut remaining = total;
        while remaining > 0 {
            if blocks.len() == limits::MAX_BLOCKS {
                fail!(QemuStream, "more than {} RAM blocks", limits::MAX_BLOCKS);
            }
            let at = self.pos;
            let name = self.idstr("RAM block name")?;
            if blocks.iter().any(|b| b.name == name) {
                fail!(QemuStream, "RAM block '{name}' at byte {at} appears twice");
            }
            let used_len = self.be64("RAM block length")?;
            if used_len == 0 || used_len > limits::MAX_BLOCK_LEN || !used_len.is_multiple_of(page_size) || used_len > remaining {
                fail!(QemuStream, "RAM block '{name}' at byte {at} has length {used_len}: not a multiple of {page_size} in 1..={} bytes left of the {total}", remaining.min(limits::MAX_BLOCK_LEN));
            }
            remaining -= used_len;
            blocks.push(RamBlockEntry { name, used_len });
        }
        Ok(blocks)
    }

    /// Everything up to the end of the stream, at most `max` bytes.
    pub fn rest(&mut self, max: usize, what: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let n = (&mut self.inner).take(max as u64 + 1).read_to_end(&mut out).map_err(|e| read_error(e, what, self.pos))?;
        self.pos += n as u64;
        if out.len() > max {
            fail!(QemuStream, "{what} is larger than {max} bytes");
        }
        Ok(out)
    }
}

/// Where the VM description starts in the bytes after the RAM section: they must end with
/// `QEMU_VM_EOF`, then `QEMU_VM_VMDESCRIPTION`, a be32 length and that many bytes of a JSON
/// object. That frame is the only end marker the stream has, so a source that stopped
/// inside its device state is told apart from one that finished. Returns the offset of the
/// 0x06 byte.
pub fn split_device_tail(tail: &[u8]) -> Result<usize> {
    let found = (1..tail.len().saturating_sub(5)).find(|&p| {
        tail[p] == kind::VMDESCRIPTION
            && tail[p - 1] == kind::EOF
            && u32::from_be_bytes(tail[p + 1..p + 5].try_into().unwrap()) as usize == tail.len() - p - 5
            && is_json_object(&tail[p + 5..])
    });
    match found {
        Some(p) => Ok(p),
        None => fail!(
            Truncated,
            "the device state ({} bytes after the RAM section) does not end with QEMU's end marker and VM description: the source stopped before it finished",
            tail.len()
        ),
    }
}

/// A light check that `b` is one balanced JSON object (strings and escapes respected).
fn is_json_object(b: &[u8]) -> bool {
    if b.first() != Some(&b'{') || b.last() != Some(&b'}') {
        return false;
    }
    let (mut depth, mut in_str, mut esc) = (0i64, false, false);
    for (i, &c) in b.iter().enumerate() {
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_str = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 && i + 1 != b.len() {
                    return false;
                }
            }
            _ => {}
        }
    }
    depth == 0 && !in_str
}

/// True for the flags a RAM word may carry in a stream this implementation follows.
pub fn known_ram_flags(flags: u64) -> bool {
    flags & !(ram_flag::ZERO | ram_flag::MEM_SIZE | ram_flag::PAGE | ram_flag::EOS | ram_flag::CONTINUE | ram_flag::MULTIFD_FLUSH) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_objects() {
        assert!(is_json_object(br#"{"a": [1, {"b": "}"}]}"#));
        assert!(is_json_object(br#"{"a": "\"{"}"#));
        assert!(!is_json_object(br#"{"a": 1"#));
        assert!(!is_json_object(br#"{"a": 1}}"#));
        assert!(!is_json_object(br#"{}{}"#));
        assert!(!is_json_object(b""));
    }

    #[test]
    fn device_tail_needs_its_end_marker() {
        let json = br#"{"page_size": 4096}"#;
        let mut t = vec![0x04, 0, 0, 0, 9, 0x7e, 0, 0, 0, 9, kind::EOF, kind::VMDESCRIPTION];
        t.extend_from_slice(&(json.len() as u32).to_be_bytes());
        t.extend_from_slice(json);
        assert_eq!(split_device_tail(&t).unwrap(), 11);
        for cut in 0..t.len() {
            assert_eq!(split_device_tail(&t[..cut]).unwrap_err().code, ErrorCode::Truncated, "cut {cut}");
        }
        let mut no_eof = t.clone();
        no_eof[10] = 0x7e;
        assert_eq!(split_device_tail(&no_eof).unwrap_err().code, ErrorCode::Truncated);
    }
}
