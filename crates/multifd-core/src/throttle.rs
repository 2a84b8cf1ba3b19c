//! QEMU's `max-bandwidth` as one token bucket shared by every channel of a session.
//!
//! The arithmetic ([`Bucket`]) takes the time as an argument, so it is tested against a clock
//! the test drives; the blocking part ([`Throttle`]) counts the channels parked on it, so a
//! test knows a waiter is parked before it changes the rate or stops the throttle.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Result, fail};

/// How much a bucket holds: QEMU measures `max-bandwidth` in windows of 100 ms
/// (`BUFFER_DELAY`), so a burst of up to a tenth of a second's worth goes out at line rate.
pub const BURST: Duration = Duration::from_millis(100);

/// The token bucket's state and arithmetic, at times the caller supplies.
///
/// A channel takes tokens for the whole packet (header and payload) just before writing it;
/// when the bucket is in debt it waits until the debt is paid back at the current rate.
/// Packets are never split, so a channel may run the bucket up to one packet into debt: the
/// long-run rate is the limit, bursts are bounded by a tenth of a second's worth plus one
/// packet per channel.
#[derive(Debug)]
pub struct Bucket {
    rate: Option<u64>,
    /// Bytes that may go now; negative while in debt.
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A bucket for `rate` bytes per second (`None`: unlimited), full at `now`.
    pub fn new(rate: Option<u64>, now: Instant) -> Result<Bucket> {
        check_rate(rate)?;
        Ok(Bucket { rate, tokens: rate.map_or(0.0, capacity), last: now })
    }

    pub fn rate(&self) -> Option<u64> {
        self.rate
    }

    /// Adds the tokens earned since the last refill at the current rate.
    fn refill(&mut self, now: Instant) {
        if let Some(rate) = self.rate {
            let earned = now.saturating_duration_since(self.last).as_secs_f64() * rate as f64;
            self.tokens = (self.tokens + earned).min(capacity(rate));
        }
        self.last = now;
    }

    /// Takes `bytes` at `now` unless the bucket is in debt; otherwise takes nothing and says
    /// how long until the debt is paid at the current rate.
    pub fn take(&mut self, bytes: u64, now: Instant) -> Option<Duration> {
        let rate = self.rate?;
        self.refill(now);
        if self.tokens >= 0.0 {
            self.tokens -= bytes as f64;
            return None;
        }
        Some(Duration::from_secs_f64(-self.tokens / rate as f64))
    }

    /// Changes the rate at `now`. A debt built up at the old rate is kept, but never more than
    /// one window's worth of the new rate, as QEMU starts the new limit with its next window;
    /// lifting the limit forgives any debt.
    pub fn set_rate(&mut self, rate: Option<u64>, now: Instant) -> Result<()> {
        check_rate(rate)?;
        self.refill(now);
        self.tokens = match (self.rate, rate) {
            (_, None) => 0.0,
            (None, Some(new)) => capacity(new),
            (Some(_), Some(new)) => self.tokens.clamp(-capacity(new), capacity(new)),
        };
        self.rate = rate;
        Ok(())
    }
}

fn capacity(rate: u64) -> f64 {
    rate as f64 * BURST.as_secs_f64()
}

fn check_rate(rate: Option<u64>) -> Result<()> {
    if let Some(r) = rate
        && !crate::limits::MAX_BANDWIDTH.contains(&r)
    {
        fail!(
            InvalidArgument,
            "max bandwidth must be {}..{} bytes per second (no value for no limit), got {r}",
            crate::limits::MAX_BANDWIDTH.start(),
            crate::limits::MAX_BANDWIDTH.end()
        );
    }
    Ok(())
}

/// The bucket shared by a session's channels: they block in [`Throttle::acquire`].
#[derive(Debug)]
pub struct Throttle {
    state: Mutex<State>,
    /// Rate changes and stop wake every waiting channel.
    changed: Condvar,
    /// Signalled whenever a channel parks (for tests that must know a waiter is parked).
    parked: Condvar,
    /// Total time channels spent waiting for tokens, in nanoseconds.
    waited_ns: AtomicU64,
    /// Mirrors of `state`'s "no rate" and `stopped`, so an unlimited session's channels take
    /// no lock per packet (a packet racing a rate change may go out at the old rate).
    unlimited: AtomicBool,
    stopped: AtomicBool,
}

#[derive(Debug)]
struct State {
    bucket: Bucket,
    stopped: bool,
    /// Channels waiting for tokens right now.
    parked: usize,
}

impl Throttle {
    /// A throttle for `rate` bytes per second (`None`: unlimited), starting full.
    pub fn new(rate: Option<u64>) -> Result<Throttle> {
        Ok(Throttle {
            state: Mutex::new(State { bucket: Bucket::new(rate, Instant::now())?, stopped: false, parked: 0 }),
            changed: Condvar::new(),
            parked: Condvar::new(),
            waited_ns: AtomicU64::new(0),
            unlimited: AtomicBool::new(rate.is_none()),
            stopped: AtomicBool::new(false),
        })
    }

    pub fn rate(&self) -> Option<u64> {
        self.state.lock().unwrap().bucket.rate()
    }

    /// Changes the rate at once, also for channels already waiting (see [`Bucket::set_rate`]).
    pub fn set_rate(&self, rate: Option<u64>) -> Result<()> {
        self.state.lock().unwrap().bucket.set_rate(rate, Instant::now())?;
        self.unlimited.store(rate.is_none(), Ordering::Release);
        self.changed.notify_all();
        Ok(())
    }

    /// Takes `bytes` tokens, first waiting while the bucket is in debt. Returns false, without
    /// taking anything, once the throttle is stopped (the session is closing).
    pub fn acquire(&self, bytes: u64) -> bool {
        if self.unlimited.load(Ordering::Acquire) {
            return !self.stopped.load(Ordering::Acquire);
        }
        let mut s = self.state.lock().unwrap();
        let mut waited_since: Option<Instant> = None;
        let granted = loop {
            if s.stopped {
                break false;
            }
            let now = Instant::now();
            let Some(wait) = s.bucket.take(bytes, now) else { break true };
            waited_since.get_or_insert(now);
            s.parked += 1;
            self.parked.notify_all();
            s = self.changed.wait_timeout(s, wait).unwrap().0;
            s.parked -= 1;
        };
        if let Some(since) = waited_since {
            self.waited_ns.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        granted
    }

    /// Time channels have spent waiting for tokens so far, all channels added up.
    pub fn waited(&self) -> Duration {
        Duration::from_nanos(self.waited_ns.load(Ordering::Relaxed))
    }

    /// Releases every waiting channel for good: `acquire` returns false from now on.
    pub fn stop(&self) {
        self.state.lock().unwrap().stopped = true;
        self.stopped.store(true, Ordering::Release);
        self.changed.notify_all();
    }

    /// Blocks until `n` channels are parked in `acquire`, or `timeout` passes (false).
    pub fn wait_parked(&self, n: usize, timeout: Duration) -> bool {
        let s = self.state.lock().unwrap();
        !self.parked.wait_timeout_while(s, timeout, |s| s.parked < n).unwrap().1.timed_out()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use std::sync::{Arc, mpsc};

    /// Sends `total` bytes in `packet`-byte packets through `b` on a clock that only moves
    /// when the bucket asks for a wait; returns the simulated time it took.
    fn drain(b: &mut Bucket, start: Instant, total: u64, packet: u64) -> Duration {
        let mut now = start;
        let mut sent = 0;
        while sent < total {
            match b.take(packet, now) {
                None => sent += packet,
                Some(wait) => now += wait,
            }
        }
        now - start
    }

    #[test]
    fn unlimited_never_waits() {
        let t0 = Instant::now();
        let mut b = Bucket::new(None, t0).unwrap();
        assert_eq!(drain(&mut b, t0, 1 << 40, 1 << 19), Duration::ZERO);
    }

    #[test]
    fn the_rate_holds_after_one_burst() {
        // 8 MB/s: a full bucket (0.8 MB) goes at once, plus one packet of debt; the other
        // 3.1 MB take 3.1 / 8 s, to the microsecond.
        let t0 = Instant::now();
        let mut b = Bucket::new(Some(8_000_000), t0).unwrap();
        let took = drain(&mut b, t0, 4_000_000, 100_000);
        let expected = Duration::from_micros(387_500);
        assert!(took.abs_diff(expected) < Duration::from_micros(2), "{took:?} != {expected:?}");
        // Idle time refills the bucket, but never beyond one window.
        let later = t0 + took + Duration::from_secs(60);
        assert_eq!(drain(&mut b, later, 900_000, 100_000), Duration::ZERO);
        assert!(b.take(100_000, later).is_some());
    }

    #[test]
    fn a_new_rate_caps_the_debt_at_one_window() {
        let t0 = Instant::now();
        let mut b = Bucket::new(Some(1000), t0).unwrap();
        assert_eq!(b.take(2_000_000, t0), None); // 2000 s of debt at 1 KB/s
        assert!(b.take(1, t0).unwrap() > Duration::from_secs(1999));
        b.set_rate(Some(10_000_000), t0).unwrap(); // at most 100 ms (1 MB) of the new rate
        let wait = b.take(1, t0).unwrap();
        assert!(wait.abs_diff(BURST) < Duration::from_micros(1), "{wait:?}");
        b.set_rate(None, t0).unwrap(); // lifting forgives the debt
        assert_eq!(b.take(1 << 30, t0), None);
        b.set_rate(Some(1000), t0).unwrap(); // a new limit starts full
        assert_eq!(b.take(100, t0), None);
        assert_eq!(b.rate(), Some(1000));
    }

    /// A thread that acquires `bytes` and reports whether it was granted.
    fn waiter(t: &Arc<Throttle>, bytes: u64) -> mpsc::Receiver<bool> {
        let (tx, rx) = mpsc::channel();
        let t = t.clone();
        std::thread::spawn(move || tx.send(t.acquire(bytes)).unwrap());
        rx
    }

    #[test]
    fn a_new_rate_wakes_a_parked_channel() {
        // 1 KB/s: a 1 MB packet puts the bucket 1000 s into debt; the next waiter parks.
        let t = Arc::new(Throttle::new(Some(1000)).unwrap());
        assert!(t.acquire(1_000_000));
        let granted = waiter(&t, 1000);
        assert!(t.wait_parked(1, Duration::from_secs(10)), "the waiter never parked");
        t.set_rate(None).unwrap();
        assert_eq!(granted.recv_timeout(Duration::from_secs(10)), Ok(true), "lifting the limit did not release the waiter");
        assert!(t.waited() > Duration::ZERO);
    }

    #[test]
    fn stop_releases_parked_channels_without_granting() {
        let t = Arc::new(Throttle::new(Some(1)).unwrap());
        assert!(t.acquire(1 << 20));
        let granted = [waiter(&t, 1), waiter(&t, 1)];
        assert!(t.wait_parked(2, Duration::from_secs(10)), "the waiters never parked");
        t.stop();
        for g in granted {
            assert_eq!(g.recv_timeout(Duration::from_secs(10)), Ok(false));
        }
        assert!(!t.acquire(1));
    }

    #[test]
    fn threads_sharing_a_bucket_never_beat_the_rate() {
        // A lower bound only, which load cannot break: 4 threads together at 8 MB/s need at
        // least the simulated time above for 4 MB.
        let t = Arc::new(Throttle::new(Some(8_000_000)).unwrap());
        let started = Instant::now();
        let left = Arc::new(AtomicU64::new(4_000_000));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (t, left) = (t.clone(), left.clone());
                std::thread::spawn(move || {
                    while left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(100_000)).is_ok() {
                        assert!(t.acquire(100_000));
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|h| h.join().unwrap());
        // Up to one packet of debt per thread: (4 - 0.8 - 4 x 0.1) MB at 8 MB/s.
        assert!(started.elapsed() >= Duration::from_millis(350), "{:?}", started.elapsed());
    }

    #[test]
    fn zero_is_not_a_rate() {
        assert_eq!(Throttle::new(Some(0)).unwrap_err().code, ErrorCode::InvalidArgument);
        assert_eq!(Throttle::new(None).unwrap().set_rate(Some(0)).unwrap_err().code, ErrorCode::InvalidArgument);
    }
}
