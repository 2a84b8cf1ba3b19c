//! Stable error codes shared by every layer.
//!
//! Each failure the library can report has one code. The codes are part of the public API:
//! JavaScript sees them as `MultifdError.code`, scripts see them in `--json` output, and tests
//! assert on them. Never rename one; add new ones at the end.

use std::fmt;

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident => $code:literal, )*) => {
        /// A stable, machine-readable reason for a failure.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )*
        }

        impl ErrorCode {
            /// Every code, in declaration order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The code's string form, e.g. `ERR_MULTIFD_BAD_MAGIC`.
            pub const fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code,)* }
            }

            /// The code with this string form, if any.
            pub fn from_str_code(s: &str) -> Option<ErrorCode> {
                match s { $($code => Some(ErrorCode::$variant),)* _ => None }
            }
        }
    };
}

error_codes! {
    /// A magic number is wrong: the multifd magic 0x11223344, a snapshot's `MFDSNAP`, a QEMU
    /// file's `QEVM`.
    BadMagic => "ERR_MULTIFD_BAD_MAGIC",
    /// A version field this implementation does not speak (packet, snapshot, QEMU file or
    /// section).
    BadVersion => "ERR_MULTIFD_BAD_VERSION",
    /// The init packet's session UUID is not the destination's.
    UuidMismatch => "ERR_MULTIFD_UUID_MISMATCH",
    /// A channel id at or above the channel count.
    ChannelIdRange => "ERR_MULTIFD_CHANNEL_ID_RANGE",
    /// A second channel announced an id already taken.
    ChannelDuplicate => "ERR_MULTIFD_CHANNEL_DUPLICATE",
    /// `pages_alloc` above this side's pages per packet.
    PagesAlloc => "ERR_MULTIFD_PAGES_ALLOC",
    /// `normal_pages` above `pages_alloc`.
    NormalPages => "ERR_MULTIFD_NORMAL_PAGES",
    /// `zero_pages` above `pages_alloc - normal_pages`.
    ZeroPages => "ERR_MULTIFD_ZERO_PAGES",
    /// The block name has no NUL within its 256 bytes.
    BlockName => "ERR_MULTIFD_BLOCK_NAME",
    /// The block name is not a registered block.
    UnknownBlock => "ERR_MULTIFD_UNKNOWN_BLOCK",
    /// A page offset that is not a multiple of the page size.
    OffsetAlign => "ERR_MULTIFD_OFFSET_ALIGN",
    /// A page offset whose page does not lie inside the block.
    OffsetRange => "ERR_MULTIFD_OFFSET_RANGE",
    /// Flag bits this implementation does not know.
    UnknownFlags => "ERR_MULTIFD_UNKNOWN_FLAGS",
    /// A compression method QEMU defines but this implementation does not support.
    UnsupportedCompression => "ERR_MULTIFD_UNSUPPORTED_COMPRESSION",
    /// A packet kind this implementation does not accept (device state).
    UnsupportedPacket => "ERR_MULTIFD_UNSUPPORTED_PACKET",
    /// The packet's compression method is not the negotiated one.
    CompressionMismatch => "ERR_MULTIFD_COMPRESSION_MISMATCH",
    /// `next_packet_size` does not fit the packet's pages or the payload bound.
    PayloadSize => "ERR_MULTIFD_PAYLOAD_SIZE",
    /// Fewer bytes than a complete packet or header.
    Truncated => "ERR_MULTIFD_TRUNCATED",
    /// An argument outside its allowed range (page size, lengths, names, ranges).
    InvalidArgument => "ERR_MULTIFD_INVALID_ARGUMENT",
    /// A system call failed (socket, file, mapping); the message carries the OS error.
    Io => "ERR_MULTIFD_IO",
    /// The peer closed a connection where more bytes were due.
    ConnectionClosed => "ERR_MULTIFD_CONNECTION_CLOSED",
    /// Something did not happen in time: channels that never arrived, a silent peer.
    Timeout => "ERR_MULTIFD_TIMEOUT",
    /// The migration was cancelled (locally or by the peer).
    Cancelled => "ERR_MULTIFD_CANCELLED",
    /// The two sides' block tables differ (names, lengths or page size).
    BlockMismatch => "ERR_MULTIFD_BLOCK_MISMATCH",
    /// The two sides disagree on the number of channels.
    ChannelCountMismatch => "ERR_MULTIFD_CHANNEL_COUNT_MISMATCH",
    /// The control protocol versions or messages do not match.
    Protocol => "ERR_MULTIFD_PROTOCOL",
    /// A connection whose first bytes are neither a control nor a multifd channel.
    UnknownChannel => "ERR_MULTIFD_UNKNOWN_CHANNEL",
    /// An operation that the session's current state does not allow.
    State => "ERR_MULTIFD_STATE",
    /// MSG_ZEROCOPY cannot be used here (kernel, socket type, locked-memory limit).
    ZeroCopyUnavailable => "ERR_MULTIFD_ZERO_COPY_UNAVAILABLE",
    /// A compressed payload that does not decode (corrupt, or a stream the method rejects).
    Decompress => "ERR_MULTIFD_DECOMPRESS",
    /// A snapshot or QEMU migration file whose structure does not fit (headers, offsets,
    /// bitmaps, block table).
    FileFormat => "ERR_MULTIFD_FILE_FORMAT",
    /// A snapshot file that was not completed (interrupted, failed, or being written).
    Incomplete => "ERR_MULTIFD_INCOMPLETE",
    /// The filesystem is full.
    NoSpace => "ERR_MULTIFD_NO_SPACE",
    /// A live migration whose dirty pages never fit the downtime limit within its rounds,
    /// with the policy `onNoConvergence: 'fail'`.
    NoConvergence => "ERR_MULTIFD_NO_CONVERGENCE",
    /// A payload or block digest differs (integrity negotiated): data changed on the way.
    Integrity => "ERR_MULTIFD_INTEGRITY",
    /// TLS credentials that do not load: unreadable PEM, no certificate, a key that does not
    /// match its certificate.
    TlsConfig => "ERR_MULTIFD_TLS_CONFIG",
    /// A TLS handshake that failed for a reason without its own code (protocol error, the
    /// peer closed the connection, an unexpected alert).
    TlsHandshake => "ERR_MULTIFD_TLS_HANDSHAKE",
    /// The peer's certificate is not signed by a trusted CA, or the peer does not trust ours.
    TlsUntrusted => "ERR_MULTIFD_TLS_UNTRUSTED",
    /// A certificate in the exchange has expired or is not valid yet.
    TlsExpired => "ERR_MULTIFD_TLS_EXPIRED",
    /// The destination's certificate does not carry the name the source verifies.
    TlsNameMismatch => "ERR_MULTIFD_TLS_NAME_MISMATCH",
    /// The source's certificate is valid but not on the destination's allow-list.
    TlsNotAllowed => "ERR_MULTIFD_TLS_NOT_ALLOWED",
    /// The peer refused our certificate for a reason it did not name more precisely.
    TlsRejected => "ERR_MULTIFD_TLS_REJECTED",
    /// One side requires TLS and the other spoke plaintext.
    TlsRequired => "ERR_MULTIFD_TLS_REQUIRED",
    /// One side started TLS and the other has no TLS configured.
    TlsUnavailable => "ERR_MULTIFD_TLS_UNAVAILABLE",
    /// A file names the same block twice (a snapshot's or QEMU file's block table).
    DuplicateBlock => "ERR_MULTIFD_DUPLICATE_BLOCK",
    /// An output whose name comes from the input already exists (a file or a symbolic link).
    OutputExists => "ERR_MULTIFD_OUTPUT_EXISTS",
    /// A source file backing a block became shorter than the block while it was read (sent,
    /// or written into a snapshot): the pages past its new end no longer exist.
    SourceTruncated => "ERR_MULTIFD_SOURCE_TRUNCATED",
    /// A QEMU main migration stream this implementation cannot follow: an iterable section
    /// other than RAM, an unknown command or RAM flag, a capability it does not carry
    /// (x-ignore-shared, postcopy), a malformed section.
    QemuStream => "ERR_MULTIFD_QEMU_STREAM",
    /// A control message the session's progress does not allow: `complete` before every
    /// announced channel was admitted and delivered that epoch's SYNC, `synced` for an epoch the
    /// source never sent, `completed` before the source sent `complete`.
    OutOfSequence => "ERR_MULTIFD_OUT_OF_SEQUENCE",
    /// A resume journal that belongs to another transfer: its block name, length or page size
    /// differs from what the source announces (`recv --resume` refuses it rather than
    /// discarding the partial output it describes).
    ResumeMismatch => "ERR_MULTIFD_RESUME_MISMATCH",
    /// A resume journal that cannot be read as one (corrupt, truncated, foreign, or its
    /// partial output is missing or has the wrong size): ignored with a warning, the output
    /// starts over.
    ResumeJournal => "ERR_MULTIFD_RESUME_JOURNAL",
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure with its stable code and a message that says what was expected and what arrived.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error { code, message: message.into() }
    }

    /// Prefixes the message with where it happened, e.g. `channel 3`.
    pub fn context(mut self, place: impl fmt::Display) -> Self {
        self.message = format!("{place}: {}", self.message);
        self
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An OS error as ours; `what` says what failed, naming the file or connection. The one
/// converter every module uses: a peer that went away is `ERR_MULTIFD_CONNECTION_CLOSED`, a
/// timeout `ERR_MULTIFD_TIMEOUT`, a full filesystem or quota `ERR_MULTIFD_NO_SPACE`, an early
/// end of file `ERR_MULTIFD_TRUNCATED`, anything else `ERR_MULTIFD_IO`.
pub fn os_error(what: impl fmt::Display, e: std::io::Error) -> Error {
    let code = match e.raw_os_error() {
        Some(libc::EPIPE | libc::ECONNRESET | libc::ESHUTDOWN) => ErrorCode::ConnectionClosed,
        // A send/receive timeout (EAGAIN on a blocking socket) or TCP_USER_TIMEOUT expiring.
        Some(libc::EAGAIN | libc::ETIMEDOUT) => ErrorCode::Timeout,
        Some(libc::ENOSPC | libc::EDQUOT) => ErrorCode::NoSpace,
        _ if e.kind() == std::io::ErrorKind::UnexpectedEof => ErrorCode::Truncated,
        _ => ErrorCode::Io,
    };
    Error::new(code, format!("{what}: {e}"))
}

/// [`os_error`] for the calling thread's last OS error (`errno`).
pub fn last_os_error(what: impl fmt::Display) -> Error {
    os_error(what, std::io::Error::last_os_error())
}

/// Shorthand for `Err(Error::new(code, format!(...)))`.
macro_rules! fail {
    ($code:ident, $($arg:tt)*) => {
        return Err($crate::error::Error::new($crate::error::ErrorCode::$code, format!($($arg)*)))
    };
}
pub(crate) use fail;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for &code in ErrorCode::ALL {
            assert!(code.as_str().starts_with("ERR_MULTIFD_"));
            assert!(seen.insert(code.as_str()), "duplicate {code}");
            assert_eq!(ErrorCode::from_str_code(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::from_str_code("ERR_NOPE"), None);
    }

    #[test]
    fn display_has_code_then_message() {
        let e = Error::new(ErrorCode::BadMagic, "got 0x1").context("channel 2");
        assert_eq!(e.to_string(), "ERR_MULTIFD_BAD_MAGIC: channel 2: got 0x1");
    }
}
