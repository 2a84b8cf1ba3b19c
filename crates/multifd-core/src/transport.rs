//! Addresses, listeners and connections for TCP and Unix stream sockets.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorCode, Result, fail};
use crate::io::io_error;

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
        let addrs: Vec<_> = (host, port).to_socket_addrs().map_err(|e| io_error(&format!("resolve {host}"), e))?.collect();
        if addrs.is_empty() {
            fail!(Io, "host {host} resolves to no address");
        }
        Ok(addrs)
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

/// One stream connection: a control or a multifd channel.
#[derive(Debug)]
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    pub fn connect(addr: &Address, timeout: Duration) -> Result<Conn> {
        match addr {
            Address::Tcp { host, port } => {
                let mut last = None;
                for sa in Address::resolve(host, *port)? {
                    match TcpStream::connect_timeout(&sa, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true).map_err(|e| io_error("set TCP_NODELAY", e))?;
                            return Ok(Conn::Tcp(s));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                let e = last.expect("resolve returned at least one address");
                Err(connect_error(addr, e))
            }
            Address::Unix(path) => UnixStream::connect(path).map(Conn::Unix).map_err(|e| connect_error(addr, e)),
        }
    }

    pub fn fd(&self) -> RawFd {
        match self {
            Conn::Tcp(s) => s.as_raw_fd(),
            Conn::Unix(s) => s.as_raw_fd(),
        }
    }

    /// Shuts the connection down in both directions, waking any thread blocked on it. Errors
    /// are ignored: the peer may already be gone.
    pub fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Shuts down only the reading side: a blocked reader sees end of stream.
    pub fn shutdown_read(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Read),
            Conn::Unix(s) => s.shutdown(Shutdown::Read),
        };
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(t),
            Conn::Unix(s) => s.set_read_timeout(t),
        }
        .map_err(|e| io_error("set read timeout", e))
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> Result<()> {
        match self {
            Conn::Tcp(s) => s.set_write_timeout(t),
            Conn::Unix(s) => s.set_write_timeout(t),
        }
        .map_err(|e| io_error("set write timeout", e))
    }

    /// Bounds how long the peer may stall this connection: reads and writes block at most
    /// `timeout` (then `ERR_MULTIFD_TIMEOUT`), and on TCP unacknowledged data or a silent
    /// network is detected by TCP_USER_TIMEOUT and keepalive probes within about the same time.
    pub fn set_peer_timeout(&self, timeout: Duration) -> Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))?;
        if let Conn::Tcp(_) = self {
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
                    return Err(io_error("set TCP peer timeout options", io::Error::last_os_error()));
                }
            }
        }
        Ok(())
    }

    pub fn is_tcp(&self) -> bool {
        matches!(self, Conn::Tcp(_))
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
                Listener::Tcp(TcpListener::bind(sa).map_err(|e| io_error(&format!("listen on {addr}"), e))?)
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
                Listener::Unix(UnixListener::bind(path).map_err(|e| io_error(&format!("listen on {addr}"), e))?, path.clone())
            }
        };
        match &l {
            Listener::Tcp(s) => s.set_nonblocking(true),
            Listener::Unix(s, _) => s.set_nonblocking(true),
        }
        .map_err(|e| io_error("set listener non-blocking", e))?;
        Ok(l)
    }

    /// The address peers should connect to (with the real port when bound to port 0).
    pub fn local_address(&self) -> Result<Address> {
        match self {
            Listener::Tcp(s) => {
                let sa = s.local_addr().map_err(|e| io_error("local address", e))?;
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

    /// Waits up to `timeout` for a connection. `Ok(None)` when none arrived in time.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Option<Conn>> {
        let deadline = Instant::now() + timeout;
        loop {
            let accepted = match self {
                Listener::Tcp(s) => s.accept().map(|(c, _)| {
                    let _ = c.set_nodelay(true);
                    Conn::Tcp(c)
                }),
                Listener::Unix(s, _) => s.accept().map(|(c, _)| Conn::Unix(c)),
            };
            match accepted {
                Ok(conn) => {
                    match &conn {
                        Conn::Tcp(s) => s.set_nonblocking(false),
                        Conn::Unix(s) => s.set_nonblocking(false),
                    }
                    .map_err(|e| io_error("set connection blocking", e))?;
                    return Ok(Some(conn));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EMFILE | libc::ENFILE)) => {
                    // A client that gave up, or descriptors exhausted: not fatal for the listener.
                }
                Err(e) => return Err(io_error("accept", e)),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut pfd = libc::pollfd { fd: self.fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd for a descriptor we own.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().clamp(1, 1000) as libc::c_int) };
        }
    }
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
