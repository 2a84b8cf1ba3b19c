//! MSG_ZEROCOPY sends and the bookkeeping of their completions.
//!
//! With zero-copy the kernel sends straight from block memory and tells us later, through the
//! socket's error queue, which sends it has finished with. Until then the pages must stay
//! mapped: each send keeps an `Arc` of its block until its completion arrives. Completions
//! are reaped after every send (so the error queue never grows past a few entries) and all of
//! them are awaited at every sync, as QEMU flushes at each sync.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use crate::block::RamBlock;
use crate::error::{Error, ErrorCode, Result, fail};
use crate::error::os_error;
use crate::io::{iovec, write_all_flags};
use crate::session::ChannelStats;

/// `SO_EE_ORIGIN_ZEROCOPY` (not in the libc crate).
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
/// `SO_EE_CODE_ZEROCOPY_COPIED`: the kernel copied after all (always so on loopback).
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;
/// ENOBUFS retries (each after reaping what is outstanding) before falling back to copying.
const ENOBUFS_RETRIES: u32 = 3;

/// Turns SO_ZEROCOPY on for a TCP socket.
pub fn enable(fd: RawFd) -> Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads an int of the size given from a live local.
    let rc = unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_ZEROCOPY, (&on as *const libc::c_int).cast(), size_of::<libc::c_int>() as libc::socklen_t) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        fail!(ZeroCopyUnavailable, "SO_ZEROCOPY is not available on this socket: {e}");
    }
    Ok(())
}

/// What a zero-copy channel did that the orchestrator should hear about.
pub enum Notice {
    /// ENOBUFS persisted (locked-memory limit): this channel now sends by copying.
    FellBack(Error),
}

/// Zero-copy state of one channel.
pub struct ZeroCopySender {
    fd: RawFd,
    /// Sends that moved bytes with MSG_ZEROCOPY (each takes one completion id).
    issued: u32,
    /// Completion ids reported by the kernel so far.
    completed: u32,
    /// Blocks to keep alive: (id of the last send that used it, block).
    held: VecDeque<(u32, Arc<RamBlock>)>,
    fallback: bool,
}

impl ZeroCopySender {
    pub fn new(fd: RawFd) -> Self {
        ZeroCopySender { fd, issued: 0, completed: 0, held: VecDeque::new(), fallback: false }
    }

    pub fn fell_back(&self) -> bool {
        self.fallback
    }

    fn outstanding(&self) -> u32 {
        self.issued.wrapping_sub(self.completed)
    }

    /// Sends a packet: the header by a normal copying send (its buffer is reused at once),
    /// then the pages with MSG_ZEROCOPY straight from `block`.
    ///
    /// # Safety
    /// Every iovec in `pages` must point into `block`'s mapping.
    pub unsafe fn send(&mut self, header: &[u8], pages: &mut [libc::iovec], block: &Arc<RamBlock>, stats: &ChannelStats) -> Result<Option<Notice>> {
        if self.fallback {
            let mut all = Vec::with_capacity(pages.len() + 1);
            all.push(iovec(header.as_ptr(), header.len()));
            all.extend_from_slice(pages);
            // SAFETY: header is a live slice; the caller vouches for the page iovecs.
            unsafe { crate::io::writev_all(self.fd, &mut all)? };
            return Ok(None);
        }
        write_all_flags(self.fd, header, libc::MSG_MORE)?;
        let mut iov = pages;
        let mut enobufs = 0;
        let mut notice = None;
        while !iov.is_empty() {
            // SAFETY: an all-zero msghdr is valid; we set the iovec fields next.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = iov.len().min(1024);
            // SAFETY: msg points at iovecs the caller guarantees are valid.
            let n = unsafe { libc::sendmsg(self.fd, &msg, libc::MSG_ZEROCOPY) };
            if n >= 0 {
                self.issued = self.issued.wrapping_add(1);
                ChannelStats::add(&stats.zc_sends, 1);
                iov = crate::io::advance(iov, n as usize);
                enobufs = 0;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::ENOBUFS) => {
                    ChannelStats::add(&stats.zc_enobufs, 1);
                    enobufs += 1;
                    if self.outstanding() > 0 && enobufs <= ENOBUFS_RETRIES {
                        self.reap(Some(Duration::from_millis(100)), stats)?;
                    } else {
                        self.fallback = true;
                        ChannelStats::add(&stats.zc_fallbacks, 1);
                        notice = Some(Notice::FellBack(Error::new(
                            ErrorCode::ZeroCopyUnavailable,
                            format!("MSG_ZEROCOPY failed with ENOBUFS {enobufs} time(s) (locked-memory limit?); this channel now sends by copying"),
                        )));
                        // SAFETY: as above, the iovecs still point into the block.
                        unsafe { crate::io::writev_all(self.fd, iov)? };
                        break;
                    }
                }
                _ => return Err(os_error("zero-copy send", e)),
            }
        }
        if self.outstanding() > 0 {
            match self.held.back_mut() {
                Some((last, b)) if Arc::ptr_eq(b, block) => *last = self.issued,
                _ => self.held.push_back((self.issued, block.clone())),
            }
        }
        self.reap(None, stats)?;
        Ok(notice)
    }

    /// Reads every completion queued now; with `wait`, first waits up to that long for one.
    pub fn reap(&mut self, wait: Option<Duration>, stats: &ChannelStats) -> Result<()> {
        if let Some(w) = wait {
            let mut pfd = libc::pollfd { fd: self.fd, events: 0, revents: 0 };
            // SAFETY: one valid pollfd; POLLERR is reported whatever `events` asks.
            unsafe { libc::poll(&mut pfd, 1, w.as_millis() as libc::c_int) };
        }
        loop {
            let mut control = [0u64; 16];
            // SAFETY: an all-zero msghdr is valid; the control buffer is a live local.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = size_of_val(&control);
            // SAFETY: msg describes a valid control buffer and no data buffers.
            let n = unsafe { libc::recvmsg(self.fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(()),
                    Some(libc::EINTR) => continue,
                    _ => Err(os_error("read zero-copy completions", e)),
                };
            }
            // SAFETY: msg was filled by recvmsg; CMSG_* walk its control buffer within
            // msg_controllen.
            let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
            while !cmsg.is_null() {
                // SAFETY: cmsg is non-null and inside the control buffer.
                let (level, kind) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
                if (level == libc::SOL_IP && kind == libc::IP_RECVERR) || (level == libc::SOL_IPV6 && kind == libc::IPV6_RECVERR) {
                    // SAFETY: for IP(V6)_RECVERR the data is a sock_extended_err; read it
                    // unaligned from the control buffer.
                    let ee: libc::sock_extended_err = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
                    if ee.ee_origin != SO_EE_ORIGIN_ZEROCOPY || ee.ee_errno != 0 {
                        fail!(Io, "unexpected socket error-queue entry: origin {}, errno {}", ee.ee_origin, ee.ee_errno);
                    }
                    let count = ee.ee_data.wrapping_sub(ee.ee_info).wrapping_add(1);
                    self.completed = self.completed.wrapping_add(count);
                    ChannelStats::add(&stats.zc_completions, u64::from(count));
                    if ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0 {
                        ChannelStats::add(&stats.zc_copied, u64::from(count));
                    }
                }
                // SAFETY: advancing within the same control buffer.
                cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
            }
            let done = self.completed;
            let issued = self.issued;
            // Completions arrive in order on TCP: release blocks whose last send is done.
            while self.held.front().is_some_and(|(last, _)| issued.wrapping_sub(*last) >= issued.wrapping_sub(done)) {
                self.held.pop_front();
            }
        }
    }

    /// Waits until every send issued so far has completed (at each sync), or `stopping` says
    /// the session is going away.
    pub fn flush(&mut self, stats: &ChannelStats, stopping: impl Fn() -> bool) -> Result<()> {
        while self.outstanding() > 0 {
            if stopping() {
                fail!(Cancelled, "stopped while waiting for {} zero-copy completion(s)", self.outstanding());
            }
            self.reap(Some(Duration::from_millis(100)), stats)?;
        }
        self.held.clear();
        Ok(())
    }
}
