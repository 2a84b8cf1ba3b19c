//! Whole-buffer vectored I/O on raw iovecs pointing into block memory.
//!
//! `writev`/`readv` may move fewer bytes than asked; these loops advance through the iovec
//! array until everything has moved, so a packet (header + up to 128 pages) is one call in the
//! common case and never a copy.

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorCode, Result, os_error};

pub use crate::memory::iovec;

/// Drops the first `n` bytes from the front of `iov`, returning the untouched remainder.
pub fn advance(mut iov: &mut [libc::iovec], mut n: usize) -> &mut [libc::iovec] {
    while let Some(first) = iov.first_mut() {
        if n < first.iov_len {
            // SAFETY: n < iov_len, so the advanced base stays inside the same buffer.
            first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n) }.cast();
            first.iov_len -= n;
            break;
        }
        n -= first.iov_len;
        iov = &mut iov[1..];
    }
    iov
}

/// Writes every byte the iovecs describe to `fd`.
///
/// # Safety
/// Every iovec must describe readable memory that stays mapped for the duration of the call.
pub unsafe fn writev_all(fd: RawFd, mut iov: &mut [libc::iovec]) -> Result<()> {
    while !iov.is_empty() {
        let count = iov.len().min(1024) as libc::c_int;
        // SAFETY: the caller guarantees the iovecs are valid; fd is an open descriptor.
        let n = unsafe { libc::writev(fd, iov.as_ptr(), count) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(os_error("write to channel", e));
        }
        iov = advance(iov, n as usize);
    }
    Ok(())
}

/// Reads exactly the bytes the iovecs describe from `fd`. `Ok(false)` when the peer closed the
/// connection before the first byte (a clean end at a packet boundary); a close after that is
/// `ERR_MULTIFD_CONNECTION_CLOSED`.
///
/// # Safety
/// Every iovec must describe writable memory that stays mapped for the duration of the call.
pub unsafe fn readv_exact(fd: RawFd, mut iov: &mut [libc::iovec]) -> Result<bool> {
    let total: usize = iov.iter().map(|v| v.iov_len).sum();
    let mut done = 0usize;
    while !iov.is_empty() {
        let count = iov.len().min(1024) as libc::c_int;
        // SAFETY: the caller guarantees the iovecs are valid and writable.
        let n = unsafe { libc::readv(fd, iov.as_ptr(), count) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    return Err(Error::new(ErrorCode::Timeout, format!("read from channel timed out after {done} of {total} bytes")));
                }
                _ => return Err(os_error("read from channel", e)),
            }
        }
        if n == 0 {
            if done == 0 {
                return Ok(false);
            }
            return Err(Error::new(ErrorCode::ConnectionClosed, format!("peer closed the channel after {done} of {total} bytes")));
        }
        done += n as usize;
        iov = advance(iov, n as usize);
    }
    Ok(true)
}

/// `writev_all` for plain byte slices.
pub fn write_all(fd: RawFd, bufs: &[&[u8]]) -> Result<()> {
    let mut iov: Vec<libc::iovec> = bufs.iter().map(|b| iovec(b.as_ptr(), b.len())).collect();
    // SAFETY: the iovecs point into the borrowed slices, alive for this call.
    unsafe { writev_all(fd, &mut iov) }
}

/// Sends all of `buf` with `send(2)` flags (e.g. MSG_MORE).
pub fn write_all_flags(fd: RawFd, mut buf: &[u8], flags: libc::c_int) -> Result<()> {
    while !buf.is_empty() {
        // SAFETY: buf is a live slice of the given length.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags | libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(os_error("send to channel", e));
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// How a read that starts at a packet boundary ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boundary {
    /// The buffer is full.
    Data,
    /// The peer closed the connection before the first byte.
    Eof,
    /// The receive timeout passed with no byte: the peer is idle, which is fine between packets.
    Idle,
}

/// Reads `buf` starting at a packet boundary. A timeout before the first byte is `Idle`; once a
/// byte has arrived, the rest must follow within the timeout (else `ERR_MULTIFD_TIMEOUT`).
pub fn read_at_boundary(fd: RawFd, buf: &mut [u8]) -> Result<Boundary> {
    let first = loop {
        // SAFETY: buf is an exclusively borrowed slice of the given length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(Boundary::Idle),
            _ => return Err(os_error("read from channel", e)),
        }
    };
    if first == 0 {
        return Ok(Boundary::Eof);
    }
    if first < buf.len() && !read_exact(fd, &mut buf[first..])? {
        return Err(Error::new(ErrorCode::ConnectionClosed, format!("peer closed the channel after {first} of {} bytes", buf.len())));
    }
    Ok(Boundary::Data)
}

/// `readv_exact` into one byte slice.
pub fn read_exact(fd: RawFd, buf: &mut [u8]) -> Result<bool> {
    let mut iov = [iovec(buf.as_mut_ptr(), buf.len())];
    // SAFETY: the iovec points into the exclusively borrowed slice.
    unsafe { readv_exact(fd, &mut iov) }
}

/// Waits until `fd` has something to read (data, end of stream or an error); false when
/// `timeout` passed first.
pub fn wait_readable(fd: RawFd, timeout: Option<Duration>) -> Result<bool> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(false);
                }
                left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int
            }
        };
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for a descriptor the caller owns.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc > 0 {
            return Ok(true);
        }
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(os_error("poll connection", e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn large_vectored_round_trip_through_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let pages: Vec<Vec<u8>> = (0..300).map(|i| vec![i as u8; 4096]).collect();
        let writer = std::thread::spawn(move || {
            let refs: Vec<&[u8]> = pages.iter().map(|p| p.as_slice()).collect();
            write_all(a.as_raw_fd(), &refs).unwrap();
        });
        let mut got = vec![0u8; 300 * 4096];
        assert!(read_exact(b.as_raw_fd(), &mut got).unwrap());
        writer.join().unwrap();
        for (i, page) in got.chunks(4096).enumerate() {
            assert!(page.iter().all(|&x| x == i as u8));
        }
        // The writer closed its end: a clean EOF at the boundary.
        assert!(!read_exact(b.as_raw_fd(), &mut [0u8; 4]).unwrap());
    }

    #[test]
    fn eof_mid_buffer_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        write_all(a.as_raw_fd(), &[b"abc"]).unwrap();
        drop(a);
        let e = read_exact(b.as_raw_fd(), &mut [0u8; 8]).unwrap_err();
        assert_eq!(e.code, ErrorCode::ConnectionClosed);
        assert!(e.message.contains("after 3 of 8"), "{e}");
    }
}
