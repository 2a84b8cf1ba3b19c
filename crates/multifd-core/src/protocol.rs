//! The control protocol's sequencing rules (docs/PROTOCOL.md, "Sequence"): which
//! acknowledgement a side may accept, given what it sent and what its channels delivered.
//! Pure state, no I/O: the source session (`lifecycle`) and the destination (`dest`) consult
//! it, and `cargo test` covers every rule.

use crate::control_messages::ControlMessage;
use crate::error::{Result, fail};

/// The `synced` message the destination's channel threads send themselves once every channel
/// passed barrier `epoch`.
pub fn synced_frame(epoch: u64, packet_num: u64) -> Vec<u8> {
    ControlMessage::Synced { epoch, packet_num }.encode()
}

/// What a source has asked for and what the destination has acknowledged.
#[derive(Debug, Default)]
pub struct SourceLedger {
    /// Syncs queued so far: the highest epoch this source can be told about.
    requested: u64,
    /// The highest epoch the destination acknowledged.
    acked: u64,
    /// The epoch `complete` named, once sent.
    complete: Option<u64>,
    /// Syncs the source queued itself (after giving a channel up), counted in `requested`.
    internal: u64,
}

impl SourceLedger {
    /// A sync was queued; returns the epoch it reaches.
    pub fn sync_requested(&mut self) -> u64 {
        self.requested += 1;
        self.requested
    }

    /// The source has queued `total` syncs of its own so far: they are epochs too.
    pub fn count_internal(&mut self, total: u64) {
        if total > self.internal {
            self.requested += total - self.internal;
            self.internal = total;
        }
    }

    /// The destination says every channel passed barrier `epoch`: accepted only for an epoch
    /// this source sent and not acknowledged before.
    pub fn synced(&mut self, epoch: u64) -> Result<()> {
        if epoch == 0 || epoch > self.requested {
            fail!(OutOfSequence, "the destination acknowledged sync {epoch}, but this source sent {} sync(s)", self.requested);
        }
        if epoch <= self.acked {
            fail!(OutOfSequence, "the destination acknowledged sync {epoch} again (it already acknowledged {})", self.acked);
        }
        self.acked = epoch;
        Ok(())
    }

    /// The highest epoch acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// `complete` is about to go out, naming `epoch`: it must be the last sync, acknowledged.
    pub fn complete_sent(&mut self, epoch: u64) -> Result<()> {
        if epoch != self.requested || epoch != self.acked {
            fail!(State, "complete names sync {epoch}, but the last sync sent is {} and the last acknowledged {}", self.requested, self.acked);
        }
        self.complete = Some(epoch);
        Ok(())
    }

    /// The destination says it completed: accepted only after this source sent `complete`.
    pub fn completed(&self) -> Result<()> {
        if self.complete.is_none() {
            fail!(OutOfSequence, "the destination reported completion before this source sent complete");
        }
        Ok(())
    }
}

/// What a destination's channels delivered, checked when the source says `complete`.
#[derive(Debug, Clone, Copy)]
pub struct Delivered {
    /// Channels the hello announced.
    pub announced: u32,
    /// Channels admitted so far.
    pub admitted: u32,
    /// The last barrier every channel passed (0: none yet).
    pub epoch: u64,
}

impl Delivered {
    /// `complete {epoch}` is accepted only when every announced channel was admitted and
    /// delivered that epoch's SYNC, and it is the last barrier passed.
    pub fn check_complete(&self, epoch: u64) -> Result<()> {
        if self.admitted < self.announced {
            fail!(OutOfSequence, "the source completed, but only {} of the {} announced channel(s) connected", self.admitted, self.announced);
        }
        if epoch == 0 || epoch != self.epoch {
            fail!(OutOfSequence, "the source completed after sync {epoch}, but every channel passed sync {} here", self.epoch);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    #[test]
    fn synced_frame_is_the_documented_json() {
        assert_eq!(synced_frame(3, 1234), br#"{"type":"synced","epoch":3,"packetNum":1234}"#);
    }

    #[test]
    fn a_source_accepts_acknowledgements_of_what_it_sent_in_order() {
        let mut l = SourceLedger::default();
        assert_eq!(l.synced(1).unwrap_err().code, ErrorCode::OutOfSequence, "never sent");
        assert_eq!(l.sync_requested(), 1);
        assert_eq!(l.sync_requested(), 2);
        l.synced(1).unwrap();
        assert_eq!(l.synced(1).unwrap_err().code, ErrorCode::OutOfSequence, "twice");
        assert_eq!(l.synced(3).unwrap_err().code, ErrorCode::OutOfSequence, "ahead");
        l.synced(2).unwrap();
        assert_eq!(l.acked(), 2);
        assert_eq!(l.synced(0).unwrap_err().code, ErrorCode::OutOfSequence);
    }

    #[test]
    fn completed_only_after_complete() {
        let mut l = SourceLedger::default();
        assert_eq!(l.completed().unwrap_err().code, ErrorCode::OutOfSequence);
        l.sync_requested();
        assert_eq!(l.complete_sent(1).unwrap_err().code, ErrorCode::State, "not acknowledged yet");
        l.synced(1).unwrap();
        assert_eq!(l.completed().unwrap_err().code, ErrorCode::OutOfSequence);
        l.complete_sent(1).unwrap();
        l.completed().unwrap();
    }

    #[test]
    fn a_destination_completes_only_with_every_channel_and_the_last_sync() {
        let d = |admitted, epoch| Delivered { announced: 4, admitted, epoch };
        assert_eq!(d(0, 0).check_complete(0).unwrap_err().code, ErrorCode::OutOfSequence, "no channel ever connected");
        assert_eq!(d(3, 1).check_complete(1).unwrap_err().code, ErrorCode::OutOfSequence, "a channel missing");
        assert_eq!(d(4, 0).check_complete(0).unwrap_err().code, ErrorCode::OutOfSequence, "no sync delivered");
        assert_eq!(d(4, 2).check_complete(1).unwrap_err().code, ErrorCode::OutOfSequence, "not the last sync");
        assert_eq!(d(4, 1).check_complete(2).unwrap_err().code, ErrorCode::OutOfSequence, "a sync not delivered");
        d(4, 2).check_complete(2).unwrap();
    }
}
