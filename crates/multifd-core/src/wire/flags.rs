use crate::error::{Result, fail};

/// The flags word of a packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags(pub u32);

impl Flags {
    /// `MULTIFD_FLAG_SYNC`: a barrier between dirty-page rounds.
    pub const SYNC: u32 = 0x01;
    /// The compression method code, 5 bits wide in current QEMU.
    pub const METHOD_MASK: u32 = 0x3e;
    /// `MULTIFD_FLAG_DEVICE_STATE`: a VFIO device-state body follows (not supported here).
    pub const DEVICE_STATE: u32 = 0x40;
    /// Every bit QEMU defines.
    pub const KNOWN: u32 = Self::SYNC | Self::METHOD_MASK | Self::DEVICE_STATE;

    pub const fn is_sync(self) -> bool {
        self.0 & Self::SYNC != 0
    }

    pub const fn method_code(self) -> u32 {
        self.0 & Self::METHOD_MASK
    }

    /// Rejects bits outside what QEMU defines and the device-state body, whose layout differs
    /// from a RAM packet. Called right after magic and version, before the body is read.
    pub fn check_body_kind(self) -> Result<()> {
        let unknown = self.0 & !Self::KNOWN;
        if unknown != 0 {
            fail!(UnknownFlags, "flags 0x{:x} have unknown bits 0x{unknown:x} (known: 0x{:x})", self.0, Self::KNOWN);
        }
        if self.0 & Self::DEVICE_STATE != 0 {
            fail!(UnsupportedPacket, "flags 0x{:x}: device-state packets (0x40) are not supported, expected a RAM packet", self.0);
        }
        Ok(())
    }

    /// The method this packet names, or an error for a QEMU method we do not implement.
    pub fn method(self) -> Result<Compression> {
        match KnownMethod::from_code(self.method_code()) {
            Some(KnownMethod::Supported(c)) => Ok(c),
            Some(KnownMethod::Unsupported(name)) => fail!(
                UnsupportedCompression,
                "flags 0x{:x} name compression method {name} (0x{:x}), which is not supported; supported: none, zlib, zstd",
                self.0,
                self.method_code()
            ),
            None => fail!(
                UnsupportedCompression,
                "flags 0x{:x} carry compression code 0x{:x}, which no QEMU method uses",
                self.0,
                self.method_code()
            ),
        }
    }
}

/// Compression methods this implementation speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    #[default]
    None,
    Zlib,
    Zstd,
}

impl Compression {
    /// The method's bits in the flags word.
    pub const fn wire_code(self) -> u32 {
        match self {
            Compression::None => 0x00,
            Compression::Zlib => 0x02,
            Compression::Zstd => 0x04,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }

    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "none" => Ok(Compression::None),
            "zlib" => Ok(Compression::Zlib),
            "zstd" => Ok(Compression::Zstd),
            other => fail!(InvalidArgument, "unknown compression method {other:?}; expected none, zlib or zstd"),
        }
    }
}

/// A compression code QEMU defines, supported here or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnownMethod {
    Supported(Compression),
    Unsupported(&'static str),
}

impl KnownMethod {
    pub const fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            0x00 => KnownMethod::Supported(Compression::None),
            0x02 => KnownMethod::Supported(Compression::Zlib),
            0x04 => KnownMethod::Supported(Compression::Zstd),
            0x08 => KnownMethod::Unsupported("qpl"),
            0x10 => KnownMethod::Unsupported("uadk"),
            0x20 => KnownMethod::Unsupported("qatzip"),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn methods_round_trip() {
        for c in [Compression::None, Compression::Zlib, Compression::Zstd] {
            assert_eq!(Flags(c.wire_code()).method().unwrap(), c);
            assert_eq!(Flags(c.wire_code() | Flags::SYNC).method().unwrap(), c);
            assert_eq!(Compression::from_name(c.name()).unwrap(), c);
        }
        assert_eq!(Compression::from_name("lz4").unwrap_err().code, ErrorCode::InvalidArgument);
    }

    #[test]
    fn other_qemu_methods_are_recognised_and_refused() {
        for (code, name) in [(0x08, "qpl"), (0x10, "uadk"), (0x20, "qatzip")] {
            let e = Flags(code).method().unwrap_err();
            assert_eq!(e.code, ErrorCode::UnsupportedCompression);
            assert!(e.message.contains(name), "{e}");
        }
        // Two method bits at once is no QEMU method.
        assert_eq!(Flags(0x06).method().unwrap_err().code, ErrorCode::UnsupportedCompression);
    }

    #[test]
    fn body_kind() {
        assert!(Flags(0x3f).check_body_kind().is_ok());
        assert_eq!(Flags(0x40).check_body_kind().unwrap_err().code, ErrorCode::UnsupportedPacket);
        assert_eq!(Flags(0x80).check_body_kind().unwrap_err().code, ErrorCode::UnknownFlags);
        assert_eq!(Flags(0x8000_0001).check_body_kind().unwrap_err().code, ErrorCode::UnknownFlags);
    }
}
