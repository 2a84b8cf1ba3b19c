use super::{INIT_PACKET_LEN, MAGIC, MAX_CHANNELS, VERSION};
use crate::error::{Result, fail};
use crate::hex::Hex;

/// `MultiFDInit_t`: the first 64 bytes on every multifd channel.
///
/// Layout: magic u32, version u32, uuid [16], id u8, then 39 reserved bytes sent as zero and
/// ignored on receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitPacket {
    pub uuid: [u8; 16],
    pub channel_id: u8,
}

impl InitPacket {
    pub fn encode(&self) -> [u8; INIT_PACKET_LEN] {
        let mut out = [0u8; INIT_PACKET_LEN];
        out[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&VERSION.to_be_bytes());
        out[8..24].copy_from_slice(&self.uuid);
        out[24] = self.channel_id;
        out
    }

    /// Parses and checks magic and version (QEMU's first two checks).
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let Some(buf) = buf.first_chunk::<INIT_PACKET_LEN>() else {
            fail!(Truncated, "init packet needs {INIT_PACKET_LEN} bytes, got {}", buf.len());
        };
        let magic = u32::from_be_bytes(buf[0..4].try_into().unwrap());
        if magic != MAGIC {
            fail!(BadMagic, "init packet magic 0x{magic:08x}, expected 0x{MAGIC:08x}");
        }
        let version = u32::from_be_bytes(buf[4..8].try_into().unwrap());
        if version != VERSION {
            fail!(BadVersion, "init packet version {version}, expected {VERSION}");
        }
        Ok(InitPacket { uuid: buf[8..24].try_into().unwrap(), channel_id: buf[24] })
    }

    /// The rest of QEMU's order: session UUID, then `id < channels` (strictly less: QEMU's
    /// seed compared with `>` and let `id == channels` index past its array).
    pub fn check(&self, session_uuid: &[u8; 16], channels: u32) -> Result<()> {
        if &self.uuid != session_uuid {
            fail!(
                UuidMismatch,
                "channel {} sent session UUID {}, expected {}",
                self.channel_id,
                Hex(&self.uuid),
                Hex(session_uuid)
            );
        }
        if u32::from(self.channel_id) >= channels {
            fail!(
                ChannelIdRange,
                "channel id {} is out of range: the session has {channels} channel(s), ids 0..{}",
                self.channel_id,
                channels.saturating_sub(1)
            );
        }
        Ok(())
    }

    /// Whether an init packet names session `uuid`, whatever else it says: only then is it one
    /// of that session's channels (the rest of the packet is judged by [`InitPacket::admit`]).
    pub fn names_session(buf: &[u8; INIT_PACKET_LEN], uuid: &[u8; 16]) -> Result<()> {
        let named = &buf[8..24];
        if named != uuid {
            fail!(UuidMismatch, "a multifd channel names session {}, not this destination's {}", Hex(named), Hex(uuid));
        }
        Ok(())
    }

    /// Decode, check, and claim the id in `claims`: the whole destination-side admission.
    pub fn admit(buf: &[u8], session_uuid: &[u8; 16], claims: &mut ChannelClaims) -> Result<Self> {
        let init = Self::decode(buf)?;
        init.check(session_uuid, claims.channels())?;
        claims.claim(init.channel_id)?;
        Ok(init)
    }
}

/// Our extension in the init packet's reserved bytes: this connection replaces a broken one of
/// the same channel id (QEMU's first connections leave the bytes zero, and so do ours).
///
/// Layout from byte 25: the marker "RPLC" (u32), the last SYNC epoch the source saw
/// acknowledged (u64, the replacement's SYNCs are numbered from it), and the pages the
/// replacement sends again (u64), all big-endian; the rest stays zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replacement {
    pub acked_epoch: u64,
    pub pages_resent: u64,
}

/// "RPLC" at byte 25 marks a replacement.
pub const REPLACEMENT_MARKER: u32 = 0x5250_4c43;
/// What a destination writes on a replacement connection once it has taken the old one's
/// place (the only bytes a destination ever writes on a channel): "MFDRPLOK".
pub const REPLACEMENT_ACK: [u8; 8] = *b"MFDRPLOK";

impl Replacement {
    /// `init` with this marker in its reserved bytes.
    pub fn encode(&self, init: &InitPacket) -> [u8; INIT_PACKET_LEN] {
        let mut out = init.encode();
        out[25..29].copy_from_slice(&REPLACEMENT_MARKER.to_be_bytes());
        out[29..37].copy_from_slice(&self.acked_epoch.to_be_bytes());
        out[37..45].copy_from_slice(&self.pages_resent.to_be_bytes());
        out
    }

    /// The marker of an init packet, if it carries one (`buf` already decoded).
    pub fn decode(buf: &[u8; INIT_PACKET_LEN]) -> Option<Replacement> {
        (u32::from_be_bytes(buf[25..29].try_into().unwrap()) == REPLACEMENT_MARKER).then(|| Replacement {
            acked_epoch: u64::from_be_bytes(buf[29..37].try_into().unwrap()),
            pages_resent: u64::from_be_bytes(buf[37..45].try_into().unwrap()),
        })
    }
}

/// Which channel ids have arrived, so a second channel with the same id is refused.
#[derive(Debug, Clone)]
pub struct ChannelClaims {
    channels: u32,
    taken: [u64; 4],
}

impl ChannelClaims {
    /// Claims for a session of `channels` channels (1..=[`MAX_CHANNELS`]).
    pub fn new(channels: u32) -> Result<Self> {
        if !(1..=MAX_CHANNELS).contains(&channels) {
            fail!(InvalidArgument, "channels must be 1..{MAX_CHANNELS}, got {channels}");
        }
        Ok(ChannelClaims { channels, taken: [0; 4] })
    }

    pub const fn channels(&self) -> u32 {
        self.channels
    }

    pub fn claim(&mut self, id: u8) -> Result<()> {
        if u32::from(id) >= self.channels {
            fail!(ChannelIdRange, "channel id {id} is out of range for {} channel(s)", self.channels);
        }
        let (word, bit) = (usize::from(id / 64), 1u64 << (id % 64));
        if self.taken[word] & bit != 0 {
            fail!(ChannelDuplicate, "channel id {id} arrived twice; it is already set up");
        }
        self.taken[word] |= bit;
        Ok(())
    }

    /// Whether `id` has arrived.
    pub fn is_claimed(&self, id: u8) -> bool {
        u32::from(id) < self.channels && self.taken[usize::from(id / 64)] & (1 << (id % 64)) != 0
    }

    pub fn is_complete(&self) -> bool {
        self.taken.iter().map(|w| w.count_ones()).sum::<u32>() == self.channels
    }

    /// Ids not yet claimed, for error messages about channels that never arrived.
    pub fn missing(&self) -> Vec<u8> {
        (0..self.channels as u8).filter(|&id| self.taken[usize::from(id / 64)] & (1 << (id % 64)) == 0).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    /// Spec appendix A.1: channel 2, all-zero UUID.
    #[test]
    fn appendix_a1_vector() {
        let mut expected = [0u8; 64];
        expected[..8].copy_from_slice(&[0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1]);
        expected[0x18] = 2;
        let init = InitPacket { uuid: [0; 16], channel_id: 2 };
        assert_eq!(init.encode(), expected);
        assert_eq!(InitPacket::decode(&expected).unwrap(), init);
    }

    #[test]
    fn round_trip_with_uuid_and_reserved_bytes_ignored() {
        let init = InitPacket { uuid: *b"0123456789abcdef", channel_id: 254 };
        let mut bytes = init.encode();
        bytes[25..].fill(0xaa);
        assert_eq!(InitPacket::decode(&bytes).unwrap(), init);
    }

    #[test]
    fn a_replacement_marker_round_trips_and_first_connections_carry_none() {
        let init = InitPacket { uuid: [3; 16], channel_id: 1 };
        assert_eq!(Replacement::decode(&init.encode()), None, "a first connection is QEMU's bytes");
        let r = Replacement { acked_epoch: 7, pages_resent: 1 << 40 };
        let bytes = r.encode(&init);
        assert_eq!(InitPacket::decode(&bytes).unwrap(), init);
        assert_eq!(Replacement::decode(&bytes), Some(r));
        assert_eq!(&bytes[25..29], b"RPLC");
        assert!(bytes[45..].iter().all(|&b| b == 0));
    }

    #[test]
    fn validation_order_and_codes() {
        let uuid = [7u8; 16];
        let good = InitPacket { uuid, channel_id: 1 }.encode();

        let mut b = good;
        b[0] = 0;
        b[4..8].copy_from_slice(&9u32.to_be_bytes()); // bad version too: magic wins
        assert_eq!(InitPacket::decode(&b).unwrap_err().code, ErrorCode::BadMagic);

        let mut b = good;
        b[7] = 2;
        b[8] = 0; // uuid too: version wins
        let e = InitPacket::decode(&b).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadVersion);
        assert!(e.message.contains("version 2, expected 1"), "{e}");

        let mut claims = ChannelClaims::new(2).unwrap();
        let mut b = good;
        b[8] = 0;
        b[24] = 9; // bad id too: uuid wins
        let e = InitPacket::admit(&b, &uuid, &mut claims).unwrap_err();
        assert_eq!(e.code, ErrorCode::UuidMismatch);
        assert!(e.message.contains("07070707"), "{e}");

        assert_eq!(InitPacket::decode(&good[..63]).unwrap_err().code, ErrorCode::Truncated);
    }

    #[test]
    fn id_equal_to_count_is_refused() {
        let uuid = [0u8; 16];
        let mut claims = ChannelClaims::new(2).unwrap();
        let e = InitPacket::admit(&InitPacket { uuid, channel_id: 2 }.encode(), &uuid, &mut claims).unwrap_err();
        assert_eq!(e.code, ErrorCode::ChannelIdRange);
        assert!(e.message.contains("2 channel(s)"), "{e}");
        let e = InitPacket::admit(&InitPacket { uuid, channel_id: 255 }.encode(), &uuid, &mut claims).unwrap_err();
        assert_eq!(e.code, ErrorCode::ChannelIdRange);
    }

    #[test]
    fn duplicates_and_completion() {
        let uuid = [0u8; 16];
        let mut claims = ChannelClaims::new(3).unwrap();
        for id in [2, 0] {
            InitPacket::admit(&InitPacket { uuid, channel_id: id }.encode(), &uuid, &mut claims).unwrap();
        }
        assert_eq!(claims.missing(), vec![1]);
        assert!(!claims.is_complete());
        let e = InitPacket::admit(&InitPacket { uuid, channel_id: 2 }.encode(), &uuid, &mut claims).unwrap_err();
        assert_eq!(e.code, ErrorCode::ChannelDuplicate);
        claims.claim(1).unwrap();
        assert!(claims.is_complete());

        let mut all = ChannelClaims::new(255).unwrap();
        for id in 0..255 {
            all.claim(id).unwrap();
        }
        assert!(all.is_complete());
        assert_eq!(ChannelClaims::new(0).unwrap_err().code, ErrorCode::InvalidArgument);
        assert_eq!(ChannelClaims::new(256).unwrap_err().code, ErrorCode::InvalidArgument);
    }
}
