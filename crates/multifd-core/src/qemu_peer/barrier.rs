//! QEMU's multifd sync on the receiving side: a channel that reads a SYNC packet waits there
//! until the main stream reaches the matching `RAM_SAVE_FLAG_MULTIFD_FLUSH`, and the main
//! stream goes on past the flush only once every channel has reached its SYNC. Pages sent
//! after a sync (a later dirty round) are so never applied before the ones sent ahead of it.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorCode, Result, fail};

#[derive(Debug)]
struct State {
    /// SYNC packets read per channel.
    arrived: Vec<u64>,
    /// Channels whose connection ended.
    closed: Vec<bool>,
    /// Flushes the main stream has passed.
    released: u64,
    failed: bool,
}

#[derive(Debug)]
pub struct SyncBarrier {
    state: Mutex<State>,
    cv: Condvar,
}

impl SyncBarrier {
    pub fn new(channels: usize) -> SyncBarrier {
        SyncBarrier { state: Mutex::new(State { arrived: vec![0; channels], closed: vec![false; channels], released: 0, failed: false }), cv: Condvar::new() }
    }

    /// Wakes every waiter for good (the session failed).
    pub fn fail(&self) {
        self.state.lock().unwrap().failed = true;
        self.cv.notify_all();
    }

    pub fn close(&self, channel: usize) {
        self.state.lock().unwrap().closed[channel] = true;
        self.cv.notify_all();
    }

    /// Waits on the condition variable until `done` holds, the barrier fails or `timeout`
    /// passes.
    fn wait_until(&self, timeout: Duration, what: impl Fn() -> String, mut done: impl FnMut(&State) -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().unwrap();
        loop {
            if st.failed {
                fail!(Cancelled, "{}: the migration failed elsewhere", what());
            }
            if done(&st)? {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::new(ErrorCode::Timeout, format!("{} took longer than {} ms", what(), timeout.as_millis())));
            }
            st = self.cv.wait_timeout(st, left).unwrap().0;
        }
    }

    /// Channel `channel` read a SYNC packet: waits for the main stream's matching flush.
    pub fn arrive(&self, channel: usize, timeout: Duration) -> Result<()> {
        let mine = {
            let mut st = self.state.lock().unwrap();
            st.arrived[channel] += 1;
            st.arrived[channel]
        };
        self.cv.notify_all();
        self.wait_until(timeout, || format!("channel {channel} waiting at sync {mine} for the main stream's flush"), |st| Ok(st.released >= mine))
    }

    /// The main stream read a flush: waits for every channel's SYNC, then lets them all go on.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        let target = self.state.lock().unwrap().released + 1;
        self.wait_until(
            timeout,
            || format!("flush {target} waiting for a SYNC packet on every channel"),
            |st| {
                if let Some(c) = (0..st.arrived.len()).find(|&c| st.closed[c] && st.arrived[c] < target) {
                    fail!(ConnectionClosed, "multifd channel {c} closed before its SYNC packet for flush {target}");
                }
                Ok(st.arrived.iter().all(|&a| a >= target))
            },
        )?;
        self.state.lock().unwrap().released = target;
        self.cv.notify_all();
        Ok(())
    }

    /// Flushes passed so far.
    pub fn flushes(&self) -> u64 {
        self.state.lock().unwrap().released
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn channels_wait_for_the_flush_and_the_flush_for_every_channel() {
        let b = Arc::new(SyncBarrier::new(3));
        let t = Duration::from_secs(5);
        let threads: Vec<_> = (0..3).map(|c| {
            let b = b.clone();
            std::thread::spawn(move || {
                b.arrive(c, t).unwrap();
                b.arrive(c, t).unwrap();
            })
        }).collect();
        b.flush(t).unwrap();
        b.flush(t).unwrap();
        for th in threads {
            th.join().unwrap();
        }
        assert_eq!(b.flushes(), 2);
    }

    #[test]
    fn a_closed_channel_or_a_silent_one_fails_the_flush() {
        let b = SyncBarrier::new(2);
        b.close(1);
        assert_eq!(b.flush(Duration::from_secs(5)).unwrap_err().code, ErrorCode::ConnectionClosed);
        let b = SyncBarrier::new(1);
        assert_eq!(b.flush(Duration::from_millis(20)).unwrap_err().code, ErrorCode::Timeout);
        b.fail();
        assert_eq!(b.arrive(0, Duration::from_secs(5)).unwrap_err().code, ErrorCode::Cancelled);
    }
}
