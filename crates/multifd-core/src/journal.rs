//! What one source channel wrote since the last acknowledged SYNC, so a replacement connection
//! can send it again (docs/PROTOCOL.md, "Channel recovery").
//!
//! Compact: pages are kept as runs of page indexes per block and epoch, never as per-page
//! offsets, so a one-shot send of a 64 GiB block costs one run (16 bytes) per packet the
//! channel wrote, merged where they touch. Contents are not kept: a replacement sends the
//! pages' current contents, which is what keeps a live migration correct.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::block::RamBlock;

/// One journal entry, tagged with the epoch it belongs to: pages written after SYNC `e - 1`
/// belong to epoch `e`; SYNC `e` closes epoch `e`.
#[derive(Clone)]
pub enum Entry {
    /// Runs `(first page index, page count)` of `block`, in the order they were written.
    Pages { block: Arc<RamBlock>, epoch: u64, runs: Vec<(u64, u64)> },
    Sync { epoch: u64 },
}

impl Entry {
    fn epoch(&self) -> u64 {
        match self {
            Entry::Pages { epoch, .. } | Entry::Sync { epoch } => *epoch,
        }
    }
}

/// A channel's journal.
#[derive(Default)]
pub struct Journal {
    /// The last epoch acknowledged: every entry up to it is gone.
    acked: u64,
    /// The epoch pages written now belong to, minus one: the last SYNC journaled.
    synced: u64,
    entries: VecDeque<Entry>,
    pages: u64,
}

impl Journal {
    /// Records pages about to be written (`offsets` in bytes, `page` bytes each).
    pub fn pages(&mut self, block: &Arc<RamBlock>, offsets: &[u64], page: u64) {
        let epoch = self.synced + 1;
        let same = matches!(self.entries.back(), Some(Entry::Pages { block: b, epoch: e, .. }) if Arc::ptr_eq(b, block) && *e == epoch);
        if !same {
            self.entries.push_back(Entry::Pages { block: block.clone(), epoch, runs: Vec::new() });
        }
        let Some(Entry::Pages { runs, .. }) = self.entries.back_mut() else { unreachable!("just pushed") };
        for &o in offsets {
            let p = o / page;
            match runs.last_mut() {
                Some((first, count)) if *first + *count == p => *count += 1,
                _ => runs.push((p, 1)),
            }
        }
        self.pages += offsets.len() as u64;
    }

    /// Records SYNC `epoch`, about to be written.
    pub fn sync(&mut self, epoch: u64) {
        self.synced = self.synced.max(epoch);
        self.entries.push_back(Entry::Sync { epoch });
    }

    /// The destination acknowledged `epoch`: everything up to it is delivered and goes.
    pub fn acked(&mut self, epoch: u64) {
        self.acked = self.acked.max(epoch);
        while self.entries.front().is_some_and(|e| e.epoch() <= self.acked) {
            if let Some(Entry::Pages { runs, .. }) = self.entries.pop_front() {
                self.pages -= runs.iter().map(|r| r.1).sum::<u64>();
            }
        }
    }

    /// The last epoch acknowledged (a replacement numbers its SYNCs from it).
    pub fn acked_epoch(&self) -> u64 {
        self.acked
    }

    /// Pages a replacement would send again.
    pub fn page_count(&self) -> u64 {
        self.pages
    }

    /// The entries to send again, oldest first.
    pub fn entries(&self) -> Vec<Entry> {
        self.entries.iter().cloned().collect()
    }

    /// Runs kept (the journal's size is about 16 bytes each).
    pub fn run_count(&self) -> usize {
        self.entries.iter().map(|e| if let Entry::Pages { runs, .. } = e { runs.len() } else { 0 }).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(name: &str) -> Arc<RamBlock> {
        Arc::new(RamBlock::allocate(name, 1 << 20, 4096, false).unwrap())
    }

    /// (block name or "SYNC", epoch, runs) per entry.
    type Summary = Vec<(String, u64, Vec<(u64, u64)>)>;

    fn summary(j: &Journal) -> Summary {
        j.entries()
            .into_iter()
            .map(|e| match e {
                Entry::Pages { block, epoch, runs } => (block.name().to_string(), epoch, runs),
                Entry::Sync { epoch } => ("SYNC".into(), epoch, vec![]),
            })
            .collect()
    }

    #[test]
    fn pages_are_kept_as_runs_per_block_and_epoch() {
        let (a, b) = (block("a"), block("b"));
        let mut j = Journal::default();
        j.pages(&a, &[0, 4096, 8192], 4096);
        j.pages(&a, &[12288, 40960], 4096);
        j.pages(&b, &[0], 4096);
        j.sync(1);
        j.pages(&a, &[0], 4096);
        assert_eq!(
            summary(&j),
            vec![("a".into(), 1, vec![(0, 4), (10, 1)]), ("b".into(), 1, vec![(0, 1)]), ("SYNC".into(), 1, vec![]), ("a".into(), 2, vec![(0, 1)])]
        );
        assert_eq!(j.page_count(), 7);
        assert_eq!(j.run_count(), 4);
    }

    #[test]
    fn an_acknowledgement_prunes_every_entry_up_to_its_epoch_and_no_further() {
        let a = block("a");
        let mut j = Journal::default();
        j.pages(&a, &[0], 4096);
        j.sync(1);
        j.pages(&a, &[4096, 8192], 4096);
        j.sync(2);
        j.pages(&a, &[12288], 4096);
        j.acked(1);
        assert_eq!(j.acked_epoch(), 1);
        assert_eq!(summary(&j), vec![("a".into(), 2, vec![(1, 2)]), ("SYNC".into(), 2, vec![]), ("a".into(), 3, vec![(3, 1)])]);
        assert_eq!(j.page_count(), 3);
        // Pages written after the acknowledged SYNC stay.
        j.acked(2);
        assert_eq!(summary(&j), vec![("a".into(), 3, vec![(3, 1)])]);
        assert_eq!(j.page_count(), 1);
        j.acked(1);
        assert_eq!(j.acked_epoch(), 2, "never backwards");
    }

    #[test]
    fn a_whole_block_costs_one_run() {
        let a = Arc::new(RamBlock::allocate("a", 64 << 20, 4096, false).unwrap());
        let mut j = Journal::default();
        let offsets: Vec<u64> = (0..a.pages() as u64).map(|p| p * 4096).collect();
        for packet in offsets.chunks(128) {
            j.pages(&a, packet, 4096);
        }
        assert_eq!(j.run_count(), 1);
        assert_eq!(j.page_count(), a.pages() as u64);
    }
}
