//! QEMU's main migration stream (the channel that starts with "QEVM"), as QEMU 10 sends it
//! next to its multifd channels, and the pieces of it a mapped-ram file repeats. Format notes:
//! docs/PROTOCOL.md, "QEMU's main migration stream".
//!
//! [`reader`] decodes the stream from any `Read`; the encoders here build the parts a peer
//! writes itself: the header, the configuration section, section headers and footers and the
//! RAM section's block list. Everything else (device state, the VM description) is carried
//! through byte for byte and never interpreted.

pub mod reader;

pub use reader::{RamWord, StreamReader, Top, split_device_tail};

/// `QEMU_VM_FILE_MAGIC`, "QEVM".
pub const FILE_MAGIC: u32 = 0x5145_564d;
/// `QEMU_VM_FILE_VERSION`.
pub const FILE_VERSION: u32 = 3;
/// Version of the "ram" section.
pub const RAM_SECTION_VERSION: u32 = 4;

/// Section and record types (`QEMU_VM_*`), the first byte of every top-level item.
pub mod kind {
    pub const EOF: u8 = 0x00;
    pub const SECTION_START: u8 = 0x01;
    pub const SECTION_PART: u8 = 0x02;
    pub const SECTION_END: u8 = 0x03;
    pub const SECTION_FULL: u8 = 0x04;
    pub const SUBSECTION: u8 = 0x05;
    pub const VMDESCRIPTION: u8 = 0x06;
    pub const CONFIGURATION: u8 = 0x07;
    pub const COMMAND: u8 = 0x08;
    pub const SECTION_FOOTER: u8 = 0x7e;
}

/// `MIG_CMD_SWITCHOVER_START`: QEMU 10 sends it (no payload) before the RAM section's END part.
pub const CMD_SWITCHOVER_START: u16 = 0x0b;

/// Flags in the low bits of every be64 of the RAM section (`RAM_SAVE_FLAG_*`).
pub mod ram_flag {
    pub const ZERO: u64 = 0x02;
    pub const MEM_SIZE: u64 = 0x04;
    pub const PAGE: u64 = 0x08;
    pub const EOS: u64 = 0x10;
    pub const CONTINUE: u64 = 0x20;
    pub const MULTIFD_FLUSH: u64 = 0x200;
    /// The flags live below the smallest target page (1 KiB).
    pub const MASK: u64 = 0x3ff;
}

/// Bounds on what the stream may claim; checked before anything is allocated.
pub mod limits {
    /// Most RAM blocks in the block list.
    pub const MAX_BLOCKS: usize = 4096;
    /// Largest RAM block (64 TiB).
    pub const MAX_BLOCK_LEN: u64 = 1 << 46;
    /// Largest total RAM (64 TiB).
    pub const MAX_TOTAL_RAM: u64 = 1 << 46;
    /// Longest machine type name.
    pub const MAX_MACHINE_LEN: u32 = 256;
    pub const MAX_CAPABILITIES: u32 = 256;
    /// Device state and VM description after the RAM section (QEMU's pc machine: ~120 KiB).
    pub const MAX_DEVICE_STATE: usize = 256 << 20;
    /// Payload of a `QEMU_VM_COMMAND` kept (the switchover command has none).
    pub const MAX_COMMAND_LEN: u16 = 4096;
}

/// What the configuration section says. QEMU validates the machine type and the listed
/// capabilities (`mapped-ram`, `x-ignore-shared`) against the restoring process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configuration {
    pub machine: String,
    pub capabilities: Vec<String>,
    /// `configuration/target-page-bits`, sent by targets whose page size varies.
    pub page_bits: Option<u32>,
    /// `configuration/uuid`, sent with the validate-uuid capability.
    pub uuid: Option<[u8; 16]>,
}

impl Configuration {
    /// The target page size: from the page bits when given, else x86's 4 KiB.
    pub fn page_size(&self) -> u64 {
        self.page_bits.map_or(4096, |b| 1 << b)
    }

    /// The section (type byte included) as QEMU writes it: machine type, then the
    /// subsections that apply in QEMU's order.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(kind::CONFIGURATION);
        out.extend_from_slice(&(self.machine.len() as u32).to_be_bytes());
        out.extend_from_slice(self.machine.as_bytes());
        let subsection = |out: &mut Vec<u8>, name: &str| {
            out.push(kind::SUBSECTION);
            put_idstr(out, name);
            out.extend_from_slice(&1u32.to_be_bytes());
        };
        if let Some(bits) = self.page_bits {
            subsection(out, "configuration/target-page-bits");
            out.extend_from_slice(&bits.to_be_bytes());
        }
        if !self.capabilities.is_empty() {
            subsection(out, "configuration/capabilities");
            out.extend_from_slice(&(self.capabilities.len() as u32).to_be_bytes());
            for c in &self.capabilities {
                put_idstr(out, c);
            }
        }
        if let Some(uuid) = &self.uuid {
            subsection(out, "configuration/uuid");
            out.extend_from_slice(uuid);
        }
    }
}

/// QEMU's short string: a u8 length and the bytes. Callers keep names under 256 bytes.
pub fn put_idstr(out: &mut Vec<u8>, s: &str) {
    debug_assert!(!s.is_empty() && s.len() < 256);
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// The file header: magic and version.
pub fn encode_header(out: &mut Vec<u8>) {
    out.extend_from_slice(&FILE_MAGIC.to_be_bytes());
    out.extend_from_slice(&FILE_VERSION.to_be_bytes());
}

/// A START or FULL section header: type, id, name, instance id, version.
pub fn encode_section_start(out: &mut Vec<u8>, kind: u8, id: u32, name: &str, instance: u32, version: u32) {
    out.push(kind);
    out.extend_from_slice(&id.to_be_bytes());
    put_idstr(out, name);
    out.extend_from_slice(&instance.to_be_bytes());
    out.extend_from_slice(&version.to_be_bytes());
}

/// A PART or END section header: type and id.
pub fn encode_section_part(out: &mut Vec<u8>, kind: u8, id: u32) {
    out.push(kind);
    out.extend_from_slice(&id.to_be_bytes());
}

pub fn encode_footer(out: &mut Vec<u8>, id: u32) {
    out.push(kind::SECTION_FOOTER);
    out.extend_from_slice(&id.to_be_bytes());
}

pub fn encode_ram_word(out: &mut Vec<u8>, word: u64) {
    out.extend_from_slice(&word.to_be_bytes());
}

pub fn encode_command(out: &mut Vec<u8>, cmd: u16, data: &[u8]) {
    out.push(kind::COMMAND);
    out.extend_from_slice(&cmd.to_be_bytes());
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
}

/// One entry of the RAM section's block list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlockEntry {
    pub name: String,
    pub used_len: u64,
}

/// The RAM section header as QEMU's section id `id` with its block list (no mapped-ram
/// headers): START header, total | MEM_SIZE, then name and length of each block.
pub fn encode_ram_start(out: &mut Vec<u8>, id: u32, blocks: &[RamBlockEntry]) {
    encode_section_start(out, kind::SECTION_START, id, "ram", 0, RAM_SECTION_VERSION);
    let total: u64 = blocks.iter().map(|b| b.used_len).sum();
    encode_ram_word(out, total | ram_flag::MEM_SIZE);
    for b in blocks {
        put_idstr(out, &b.name);
        out.extend_from_slice(&b.used_len.to_be_bytes());
    }
}
