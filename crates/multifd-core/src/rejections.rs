//! Connections a destination closed because they never identified themselves as its session's
//! control connection or one of its channels: counted, and reported as warnings that name the
//! peer and the reason, rate-limited so a flood of junk cannot flood the event stream.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::session::{Event, EventSink};

/// Rejections reported one warning each per window; beyond, they are summed up.
pub const WARNINGS_PER_WINDOW: u32 = 10;
/// The rate limit's window: at most one summary warning per window.
pub const WINDOW: Duration = Duration::from_secs(1);

/// The rejection count and the warnings' rate limit.
pub struct Rejections {
    count: AtomicU64,
    window: Mutex<Window>,
    events: EventSink,
}

struct Window {
    started: Instant,
    /// Warnings emitted one by one in this window.
    reported: u32,
    /// Rejections past the limit in this window, and the last of them.
    suppressed: u64,
    last: Option<(String, Error)>,
}

impl Rejections {
    pub fn new(events: EventSink) -> Self {
        Rejections { count: AtomicU64::new(0), window: Mutex::new(Window { started: Instant::now(), reported: 0, suppressed: 0, last: None }), events }
    }

    /// Connections rejected so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Counts a connection from `peer` closed for `reason`, and reports it: a warning of its
    /// own while this window has room, else it goes into the window's summary.
    pub fn reject(&self, peer: &str, reason: Error) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut w = self.window.lock().unwrap();
        self.roll(&mut w);
        if w.reported < WARNINGS_PER_WINDOW {
            w.reported += 1;
            drop(w);
            (self.events)(Event::Warning(Error::new(reason.code, format!("rejected a connection from {peer}: {}", reason.message))));
        } else {
            w.suppressed += 1;
            w.last = Some((peer.to_owned(), reason));
        }
    }

    /// Emits the summary of a window that has ended (the acceptor calls this as it polls).
    pub fn flush(&self) {
        let mut w = self.window.lock().unwrap();
        if w.started.elapsed() >= WINDOW {
            self.roll(&mut w);
        }
    }

    /// Emits what is still summed up, whatever the window (the destination is closing).
    pub fn flush_now(&self) {
        let mut w = self.window.lock().unwrap();
        self.summarise(&mut w);
    }

    /// Starts a new window once the current one has ended, summarising it.
    fn roll(&self, w: &mut Window) {
        if w.started.elapsed() < WINDOW {
            return;
        }
        self.summarise(w);
        w.started = Instant::now();
        w.reported = 0;
    }

    fn summarise(&self, w: &mut Window) {
        let Some((peer, reason)) = w.last.take() else { return };
        let n = std::mem::take(&mut w.suppressed);
        let more = if n == 1 { "1 more connection".to_owned() } else { format!("{n} more connections") };
        (self.events)(Event::Warning(Error::new(
            reason.code,
            format!("rejected {more} within {} ms ({} in all so far); the last from {peer}: {}", WINDOW.as_millis(), self.count(), reason.message),
        )));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use std::sync::Arc;

    fn collect() -> (Arc<Mutex<Vec<Error>>>, EventSink) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (seen, Arc::new(move |e| {
            if let Event::Warning(w) = e {
                s.lock().unwrap().push(w);
            }
        }))
    }

    #[test]
    fn a_flood_is_counted_whole_but_warned_about_a_few_times() {
        let (seen, sink) = collect();
        let r = Rejections::new(sink);
        for i in 0..300 {
            r.reject(&format!("127.0.0.1:{}", 1000 + i), Error::new(ErrorCode::UnknownChannel, "junk"));
        }
        assert_eq!(r.count(), 300);
        {
            let w = seen.lock().unwrap();
            assert_eq!(w.len(), WARNINGS_PER_WINDOW as usize);
            assert_eq!(w[0].code, ErrorCode::UnknownChannel);
            assert_eq!(w[0].message, "rejected a connection from 127.0.0.1:1000: junk");
        }
        r.flush(); // the window has not ended: nothing yet
        assert_eq!(seen.lock().unwrap().len(), WARNINGS_PER_WINDOW as usize);
        r.flush_now();
        let w = seen.lock().unwrap();
        assert_eq!(w.len(), WARNINGS_PER_WINDOW as usize + 1);
        assert!(w.last().unwrap().message.starts_with("rejected 290 more connections within 1000 ms (300 in all so far); the last from 127.0.0.1:1299: junk"), "{}", w.last().unwrap().message);
    }
}
