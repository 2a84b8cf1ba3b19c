//! Addresses, listeners and connections for TCP and Unix stream sockets.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use std::sync::Mutex;

use crate::error::{Error, ErrorCode, Result, fail};
use crate::error::os_error;
use crate::io::Boundary;
use crate::tls::{TlsClient, TlsServer, TlsStream};
use crate::tls::Got;

/// Where a destination listens and a source connects: `tcp:HOST:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl Address {
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() || path.len() > 107 {
                fail!(InvalidArgument, "unix socket path must be 1 to 107 bytes, got {:?}", path);
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        let Some(rest) = s.strip_prefix("tcp:") else {
            fail!(InvalidArgument, "address {s:?} must look like tcp:HOST:PORT or unix:PATH");
        };
        let Some((host, port)) = rest.rsplit_once(':') else {
            fail!(InvalidArgument, "address {s:?} has no port (tcp:HOST:PORT)");
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port.parse().map_err(|_| Error::new(ErrorCode::InvalidArgument, format!("address {s:?}: port {port:?} is not 0..65535")))?;
        if host.is_empty() {
            fail!(InvalidArgument, "address {s:?} has no host");
        }
        Ok(Address::Tcp { host: host.to_string(), port })
    }

    fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>> {
        let addrs: Vec<_> = (host, port).to_socket_addrs().map_err(|e| os_error(format_args!("resolve {host}"), e))?.collect();
        if addrs.is_empty() {
            fail!(Io, "host {host} resolves to no address");
        }
        Ok(addrs)
    }
}

impl crate::tls::Dialed for Address {
    fn host(&self) -> Option<&str> {
        match self {
            Address::Tcp { host, .. } => Some(host),
            Address::Unix(_) => None,
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The socket under a connection.
#[derive(Debug)]
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    fn fd(&self) -> RawFd {
        match self {
            Socket::Tcp(s) => s.as_raw_fd(),
            Socket::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// One TLS read of an exact read of `total` bytes, `done` so far: the bytes it brought, `None`
/// for a clean end before the first byte, an error for an end or a timeout after it.
fn tls_step(got: Got, done: usize, total: usize) -> Result<Option<usize>> {
    match got {
        Got::Data(n) => Ok(Some(n)),
        Got::Eof if done == 0 => Ok(None),
        Got::Eof => fail!(ConnectionClosed, "peer closed the channel after {done} of {total} bytes"),
        Got::Idle => fail!(Timeout, "read from channel timed out after {done} of {total} bytes"),
    }
}

/// One stream connection: a control or a multifd channel, in plaintext or TLS.
///
/// Every read and write of the protocol goes through here. Plaintext moves bytes with
/// `readv`/`writev` straight between the socket and block memory; TLS decrypts and encrypts
/// through the session's buffers. Any thread may `shutdown` the socket to wake the one using it.
pub struct Conn {
    socket: Socket,
    tls: Option<TlsStream>,
    /// The read timeout, which TLS reads apply with `poll` (plaintext reads use SO_RCVTIMEO).
    read_timeout: Mutex<Option<Duration>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("socket", &self.socket).field("tls", &self.tls.is_some()).finish()
    }
}

impl Conn {
    fn new(socket: Socket) -> Conn {
        Conn { socket, tls: None, read_timeout: Mutex::new(None) }
    }

    pub fn connect(addr: &Address, timeout: Duration) -> Result<Conn> {
        match addr {
            Address::Tcp { host, port } => {
                let mut last = None;
                for sa in Address::resolve(host, *port)? {
                    match TcpStream::connect_timeout(&sa, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true).map_err(|e| os_error("set TCP_NODELAY", e))?;
                            return Ok(Conn::new(Socket::Tcp(s)));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                let e = last.expect("resolve returned at least one address");
                Err(connect_error(addr, e))
            }
            Address::Unix(path) => UnixStream::connect(path).map(|s| Conn::new(Socket::Unix(s))).map_err(|e| connect_error(addr, e)),
        }
    }

    /// Connects and, with `tls`, completes the client handshake, all within `timeout`.
    pub fn connect_secure(addr: &Address, timeout: Duration, tls: Option<&TlsClient>) -> Result<Conn> {
        let deadline = Instant::now() + timeout;
        let mut conn = Conn::connect(addr, timeout)?;
        if let Some(client) = tls {
            conn.set_write_timeout(Some(timeout))?;
            conn.tls = Some(TlsStream::client(conn.fd(), client, deadline)?);
            conn.set_write_timeout(None)?;
        }
        Ok(conn)
    }

    /// Destination side: completes the server handshake before `deadline`. `prefix` holds the
    /// first bytes the acceptor already read from the socket.
    pub(crate) fn accept_tls(&mut self, server: &TlsServer, prefix: &[u8], deadline: Instant) -> Result<()> {
        self.set_write_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))))?;
        self.tls = Some(TlsStream::server(self.fd(), server, prefix, deadline)?);
        self.set_write_timeout(None)
    }

    pub fn socket(&self) -> &Socket {
        &self.socket
    }

    pub fn tls(&self) -> Option<&TlsStream> {
        self.tls.as_ref()
    }

    pub fn fd(&self) -> RawFd {
        self.socket.fd()
    }

    /// Shuts the connection down in both directions, waking any thread blocked on it. Errors
    /// are ignored: the peer may already be gone.
    pub fn shutdown(&self) {
        let _ = match &self.socket {
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Shuts down only the reading side: a blocked reader sees end of stream.
    pub fn shutdown_read(&self) {
        let _ = match &self.socket {
            Socket::Tcp(s) => s.shutdown(Shutdown::Read),
            Socket::Unix(s) => s.shutdown(Shutdown::Read),
        };
    }

    /// Who is at the other end, for messages: `HOST:PORT` over TCP, `a local peer` on a Unix
    /// socket (whose peers have no address), `an unknown peer` when the socket cannot say.
    pub fn peer(&self) -> String {
        match &self.socket {
            Socket::Tcp(s) => s.peer_addr().map_or_else(|_| "an unknown peer".into(), |a| a.to_string()),
            Socket::Unix(_) => "a local peer".into(),
        }
    }

    /// Waits until the peer has sent something (or closed); false when `timeout` passed first.
    pub fn wait_readable(&self, timeout: Duration) -> Result<bool> {
        crate::io::wait_readable(self.fd(), Some(timeout))
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> Result<()> {
        *self.read_timeout.lock().unwrap() = t;
        match &self.socket {
            Socket::Tcp(s) => s.set_read_timeout(t),
            Socket::Unix(s) => s.set_read_timeout(t),
        }
        .map_err(|e| os_error("set read timeout", e))
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> Result<()> {
        match &self.socket {
            Socket::Tcp(s) => s.set_write_timeout(t),
            Socket::Unix(s) => s.set_write_timeout(t),
        }
        .map_err(|e| os_error("set write timeout", e))
    }

    /// Bounds how long the peer may stall this connection: reads and writes block at most
    /// `timeout` (then `ERR_MULTIFD_TIMEOUT`), and on TCP unacknowledged data or a silent
    /// network is detected by TCP_USER_TIMEOUT and keepalive probes within about the same time.
    pub fn set_peer_timeout(&self, timeout: Duration) -> Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))?;
        if let Socket::Tcp(_) = self.socket {
            let ms = timeout.as_millis().clamp(1, u32::MAX as u128) as libc::c_int;
            let idle = (timeout.as_secs() / 2).clamp(1, 3600) as libc::c_int;
            for (level, name, value) in [
                (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms),
                (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
                (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle),
                (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1),
                (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
            ] {
                // SAFETY: setsockopt reads one c_int from a live local, on our own descriptor.
                let rc = unsafe { libc::setsockopt(self.fd(), level, name, (&value as *const libc::c_int).cast(), size_of::<libc::c_int>() as libc::socklen_t) };
                if rc != 0 {
                    return Err(os_error("set TCP peer timeout options", io::Error::last_os_error()));
                }
            }
        }
        Ok(())
    }

    pub fn is_tcp(&self) -> bool {
        matches!(self.socket, Socket::Tcp(_))
    }

    /// Writes every byte of `bufs` (private buffers; with TLS, encrypted straight from them).
    pub fn write_all(&self, bufs: &[&[u8]]) -> Result<()> {
        if let Some(tls) = &self.tls {
            return tls.write_all(self.fd(), bufs);
        }
        crate::io::write_all(self.fd(), bufs)
    }

    /// Writes every byte the iovecs describe (block memory: with TLS, copied straight into the
    /// plaintext of the records being sealed, see `crate::memory`, all under one hold of the
    /// session's sending lock, so another thread's records never land in between).
    ///
    /// # Safety
    /// Every iovec must describe readable memory that stays mapped for the duration of the call.
    pub unsafe fn writev_all(&self, iov: &mut [libc::iovec]) -> Result<()> {
        let Some(tls) = &self.tls else {
            // SAFETY: forwarded from the caller.
            return unsafe { crate::io::writev_all(self.fd(), iov) };
        };
        let mut pending = iov.iter().map(|v| (v.iov_base.cast::<u8>().cast_const(), v.iov_len));
        let mut part: Option<(*const u8, usize)> = None;
        tls.write_from(self.fd(), |buf| {
            let mut filled = 0;
            while filled < buf.len() {
                let Some((ptr, len)) = part.take().or_else(|| pending.next()) else { break };
                let n = len.min(buf.len() - filled);
                // SAFETY: the caller guarantees the iovec is readable for this call; n <= len.
                unsafe { crate::memory::copy_out_raw(ptr, &mut buf[filled..filled + n]) };
                filled += n;
                if n < len {
                    part = Some((ptr.wrapping_add(n), len - n));
                }
            }
            filled
        })
    }

    /// Reads exactly `buf.len()` bytes; `Ok(false)` when the peer closed before the first.
    pub fn read_exact(&self, buf: &mut [u8]) -> Result<bool> {
        let Some(tls) = &self.tls else {
            return crate::io::read_exact(self.fd(), buf);
        };
        let timeout = *self.read_timeout.lock().unwrap();
        let (total, mut done) = (buf.len(), 0);
        while done < total {
            match tls_step(tls.read_some(self.fd(), &mut buf[done..], timeout)?, done, total)? {
                Some(n) => done += n,
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Reads exactly the bytes the iovecs describe (block memory: with TLS, copied in straight
    /// from rustls's decrypted record, see `crate::memory`); `Ok(false)` when the peer closed
    /// before the first byte, `ERR_MULTIFD_CONNECTION_CLOSED` when it closed after.
    ///
    /// # Safety
    /// Every iovec must describe writable memory that stays mapped for the duration of the call.
    pub unsafe fn readv_exact(&self, iov: &mut [libc::iovec]) -> Result<bool> {
        let Some(tls) = &self.tls else {
            // SAFETY: forwarded from the caller.
            return unsafe { crate::io::readv_exact(self.fd(), iov) };
        };
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        let timeout = *self.read_timeout.lock().unwrap();
        let mut done = 0usize;
        for v in iov.iter() {
            let mut filled = 0;
            while filled < v.iov_len {
                let got = tls.read_with(self.fd(), timeout, |plain| {
                    let n = plain.len().min(v.iov_len - filled);
                    // SAFETY: the caller guarantees the iovec is writable for this call;
                    // filled + n <= iov_len.
                    unsafe { crate::memory::copy_in_raw(v.iov_base.cast::<u8>().add(filled), &plain[..n]) };
                    n
                })?;
                let Some(n) = tls_step(got, done, total)? else {
                    return Ok(false);
                };
                filled += n;
                done += n;
            }
        }
        Ok(true)
    }

    /// Reads `buf` starting at a packet boundary: a timeout before the first byte is `Idle`;
    /// once a byte has arrived, the rest must follow within the timeout.
    pub fn read_at_boundary(&self, buf: &mut [u8]) -> Result<Boundary> {
        let Some(tls) = &self.tls else {
            return crate::io::read_at_boundary(self.fd(), buf);
        };
        let timeout = *self.read_timeout.lock().unwrap();
        let first = match tls.read_some(self.fd(), buf, timeout)? {
            Got::Data(n) => n,
            Got::Eof => return Ok(Boundary::Eof),
            Got::Idle => return Ok(Boundary::Idle),
        };
        if first < buf.len() && !self.read_exact(&mut buf[first..])? {
            fail!(ConnectionClosed, "peer closed the channel after {first} of {} bytes", buf.len());
        }
        Ok(Boundary::Data)
    }
}

fn connect_error(addr: &Address, e: io::Error) -> Error {
    let code = if e.kind() == io::ErrorKind::TimedOut { ErrorCode::Timeout } else { ErrorCode::Io };
    Error::new(code, format!("connect to {addr}: {e}"))
}

/// A listening socket. A Unix listener removes its socket file when dropped.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub fn bind(addr: &Address) -> Result<Listener> {
        let l = match addr {
            Address::Tcp { host, port } => {
                let sa = Address::resolve(host, *port)?[0];
                Listener::Tcp(TcpListener::bind(sa).map_err(|e| os_error(format_args!("listen on {addr}"), e))?)
            }
            Address::Unix(path) => {
                // A socket file left by a process that died is stale; anything else is not ours.
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() {
                        fail!(Io, "listen on {addr}: the path exists and is not a socket");
                    }
                    if UnixStream::connect(path).is_ok() {
                        fail!(Io, "listen on {addr}: another process is listening there");
                    }
                    let _ = std::fs::remove_file(path);
                }
                Listener::Unix(UnixListener::bind(path).map_err(|e| os_error(format_args!("listen on {addr}"), e))?, path.clone())
            }
        };
        match &l {
            Listener::Tcp(s) => s.set_nonblocking(true),
            Listener::Unix(s, _) => s.set_nonblocking(true),
        }
        .map_err(|e| os_error("set listener non-blocking", e))?;
        // std listens with a backlog of 128. A flood of strangers arriving at once (a scanner,
        // hundreds of health checks) would overflow that queue, and the kernel then silently
        // drops connections that still look established to their peer, real channels among
        // them. Ask for the system's maximum (net.core.somaxconn) instead.
        let fd = match &l {
            Listener::Tcp(s) => s.as_raw_fd(),
            Listener::Unix(s, _) => s.as_raw_fd(),
        };
        // SAFETY: `fd` is the listening socket `l` owns, open for this call; calling listen()
        // again on a listening socket only changes its backlog.
        if unsafe { libc::listen(fd, libc::SOMAXCONN) } != 0 {
            return Err(os_error("set the listen backlog", std::io::Error::last_os_error()));
        }
        Ok(l)
    }

    /// The address peers should connect to (with the real port when bound to port 0).
    pub fn local_address(&self) -> Result<Address> {
        match self {
            Listener::Tcp(s) => {
                let sa = s.local_addr().map_err(|e| os_error("local address", e))?;
                Ok(Address::Tcp { host: sa.ip().to_string(), port: sa.port() })
            }
            Listener::Unix(_, path) => Ok(Address::Unix(path.clone())),
        }
    }

    pub(crate) fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(s) => s.as_raw_fd(),
            Listener::Unix(s, _) => s.as_raw_fd(),
        }
    }

    /// Waits up to `timeout` for a connection. `Ok(None)` when none arrived in time, or when
    /// the process is out of descriptors (see [`Listener::accept_for`]).
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Option<Conn>> {
        match self.accept_for(timeout)? {
            Accepted::Conn(c) => Ok(Some(c)),
            Accepted::Idle | Accepted::NoDescriptors => Ok(None),
        }
    }

    /// Waits up to `timeout` for a connection. A connection waiting while the process (or the
    /// system) has no descriptor left is `NoDescriptors`, at once: the listener stays readable
    /// until a descriptor is freed, so waiting on it again would spin.
    pub fn accept_for(&self, timeout: Duration) -> Result<Accepted> {
        let deadline = Instant::now() + timeout;
        loop {
            let accepted = match self {
                Listener::Tcp(s) => s.accept().map(|(c, _)| {
                    let _ = c.set_nodelay(true);
                    Conn::new(Socket::Tcp(c))
                }),
                Listener::Unix(s, _) => s.accept().map(|(c, _)| Conn::new(Socket::Unix(c))),
            };
            match accepted {
                Ok(conn) => {
                    match &conn.socket {
                        Socket::Tcp(s) => s.set_nonblocking(false),
                        Socket::Unix(s) => s.set_nonblocking(false),
                    }
                    .map_err(|e| os_error("set connection blocking", e))?;
                    return Ok(Accepted::Conn(conn));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // A client that gave up before we accepted it: not the listener's problem.
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => return Ok(Accepted::NoDescriptors),
                Err(e) => return Err(os_error("accept", e)),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !crate::io::wait_readable(self.fd(), Some(left))? {
                return Ok(Accepted::Idle);
            }
        }
    }
}

/// What [`Listener::accept_for`] found.
#[derive(Debug)]
// Made once per accepted connection and moved straight on; a box would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Accepted {
    Conn(Conn),
    /// Nothing arrived in time.
    Idle,
    /// A connection is waiting but no descriptor is free to accept it (EMFILE / ENFILE).
    NoDescriptors,
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_addresses() {
        assert_eq!(Address::parse("tcp:127.0.0.1:0").unwrap(), Address::Tcp { host: "127.0.0.1".into(), port: 0 });
        assert_eq!(Address::parse("tcp:[::1]:4444").unwrap(), Address::Tcp { host: "::1".into(), port: 4444 });
        assert_eq!(Address::parse("tcp:[::1]:4444").unwrap().to_string(), "tcp:[::1]:4444");
        assert_eq!(Address::parse("unix:/tmp/x.sock").unwrap(), Address::Unix("/tmp/x.sock".into()));
        for bad in ["", "tcp:", "tcp:host", "tcp:h:99999", "tcp::80", "udp:h:1", "unix:"] {
            assert_eq!(Address::parse(bad).unwrap_err().code, ErrorCode::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn listen_on_port_zero_reports_the_port_and_accepts() {
        let l = Listener::bind(&Address::parse("tcp:127.0.0.1:0").unwrap()).unwrap();
        let addr = l.local_address().unwrap();
        let Address::Tcp { port, .. } = &addr else { panic!() };
        assert_ne!(*port, 0);
        assert!(l.accept_timeout(Duration::from_millis(10)).unwrap().is_none());
        let _c = Conn::connect(&addr, Duration::from_secs(2)).unwrap();
        assert!(l.accept_timeout(Duration::from_secs(2)).unwrap().is_some());
    }

    #[test]
    fn unix_listener_cleans_up_its_socket() {
        let path = std::env::temp_dir().join(format!("multifd-t-{}.sock", std::process::id()));
        let addr = Address::Unix(path.clone());
        {
            let l = Listener::bind(&addr).unwrap();
            assert_eq!(Listener::bind(&addr).unwrap_err().code, ErrorCode::Io);
            let _c = Conn::connect(&addr, Duration::from_secs(1)).unwrap();
            assert!(l.accept_timeout(Duration::from_secs(2)).unwrap().is_some());
        }
        assert!(!path.exists());
    }
}
