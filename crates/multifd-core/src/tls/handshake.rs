//! The TLS handshake, driven through rustls's unbuffered API over a blocking socket, ending in
//! rustls's kernel connection: the traffic keys for our record layer (`record.rs`) plus the
//! object that renews them on a key update.

use std::os::fd::RawFd;
use std::time::Instant;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{CommonState, ConnectionTrafficSecrets, ExtractedSecrets, SupportedCipherSuite};

use super::record::Version;
use super::stream::{Inbox, PLAINTEXT_REFUSAL, TlsInfo};
use super::{TlsServer, tls_error};
use crate::error::{Error, ErrorCode, Result, fail};

/// A client or server connection in the handshake.
pub(super) trait Handshaking {
    type Data;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn state(&self) -> &CommonState;
    fn into_kernel(self) -> std::result::Result<(ExtractedSecrets, Kernel), rustls::Error>;
}

impl Handshaking for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        self.process_tls_records(incoming)
    }
    fn state(&self) -> &CommonState {
        self
    }
    fn into_kernel(self) -> std::result::Result<(ExtractedSecrets, Kernel), rustls::Error> {
        self.dangerous_into_kernel_connection().map(|(s, k)| (s, Kernel::Client(k)))
    }
}

impl Handshaking for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        self.process_tls_records(incoming)
    }
    fn state(&self) -> &CommonState {
        self
    }
    fn into_kernel(self) -> std::result::Result<(ExtractedSecrets, Kernel), rustls::Error> {
        self.dangerous_into_kernel_connection().map(|(s, k)| (s, Kernel::Server(k)))
    }
}

/// What renews the traffic keys after the handshake (TLS 1.3 key updates).
pub(super) enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    pub(super) fn update_tx_secret(&mut self) -> std::result::Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }

    pub(super) fn update_rx_secret(&mut self) -> std::result::Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }

    /// A TLS 1.3 NewSessionTicket's body (a server never receives one).
    pub(super) fn new_session_ticket(&mut self, body: &[u8]) -> std::result::Result<(), rustls::Error> {
        match self {
            Kernel::Client(k) => k.handle_new_session_ticket(body),
            Kernel::Server(_) => Err(rustls::Error::InappropriateHandshakeMessage { expect_types: vec![], got_type: rustls::HandshakeType::NewSessionTicket }),
        }
    }

    /// How many records one key may seal before it must be renewed.
    pub(super) fn confidentiality_limit(&self) -> u64 {
        let suite = match self {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
        };
        match suite {
            SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
        }
    }
}

/// A finished handshake.
pub(super) struct Established {
    pub kernel: Kernel,
    pub secrets: ExtractedSecrets,
    pub version: Version,
    pub info: TlsInfo,
    /// Application data rustls decrypted along with the end of the handshake.
    pub early: Vec<u8>,
}

/// Runs the handshake on `fd` until it is complete or `deadline` passes. `inbox` holds any
/// bytes already read (the acceptor's prefix) and keeps what arrived after the handshake.
pub(super) fn run<C: Handshaking>(fd: RawFd, mut conn: C, inbox: &mut Inbox, deadline: Instant, peer: &'static str, server: Option<&TlsServer>) -> Result<Established> {
    let mut out = vec![0u8; 4096];
    let mut used = 0;
    let mut early = Vec::new();
    let mut first_read = server.is_none();
    loop {
        // Done, and our last flight encoded: stop before rustls opens records after the
        // handshake. A key update it processed would renew a key and queue its answer where
        // the conversion below drops it; every record after the handshake is ours to open.
        if !conn.state().is_handshaking() && !conn.state().wants_write() {
            if used > 0 {
                crate::io::write_all(fd, &[&out[..used]]).map_err(|e| e.context(format!("TLS handshake with the {peer}")))?;
            }
            break;
        }
        let UnbufferedStatus { discard, state } = conn.process(inbox.pending_mut());
        let mut blocked = false;
        match state {
            Err(e) => {
                inbox.consume(discard);
                // Tell the peer why (rustls queued an alert), then report it here.
                let _ = send_alert(fd, &mut conn, inbox);
                let mut err = tls_error(&e, peer);
                if let Some(who) = server.and_then(TlsServer::take_refusal) {
                    err.message = format!("{}: {who}", err.message);
                }
                return Err(err);
            }
            Ok(ConnectionState::EncodeTlsData(mut data)) => loop {
                match data.encode(&mut out[used..]) {
                    Ok(n) => break used += n,
                    Err(EncodeError::InsufficientSize(s)) => out.resize(used + s.required_size, 0),
                    Err(e) => fail!(TlsHandshake, "TLS handshake with the {peer}: {e}"),
                }
            },
            Ok(ConnectionState::TransmitTlsData(data)) => {
                crate::io::write_all(fd, &[&out[..used]]).map_err(|e| e.context(format!("TLS handshake with the {peer}")))?;
                used = 0;
                data.done();
            }
            Ok(ConnectionState::BlockedHandshake) => blocked = true,
            Ok(ConnectionState::ReadTraffic(mut data)) => {
                while let Some(record) = data.next_record() {
                    early.extend_from_slice(record.map_err(|e| tls_error(&e, peer))?.payload);
                }
            }
            Ok(ConnectionState::WriteTraffic(_)) => {}
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => fail!(TlsHandshake, "the {peer} closed the TLS session during the handshake"),
            Ok(other) => fail!(TlsHandshake, "TLS handshake with the {peer}: unexpected state {other:?}"),
        }
        inbox.consume(discard);
        if blocked {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !inbox.fill(fd, Some(left))? {
                return Err(Error::new(ErrorCode::Timeout, format!("the TLS handshake with the {peer} did not finish in time (the {peer} stopped answering)")));
            }
            if inbox.eof {
                fail!(TlsHandshake, "the {peer} closed the connection during the TLS handshake");
            }
            if std::mem::take(&mut first_read) && inbox.pending().starts_with(&PLAINTEXT_REFUSAL) {
                fail!(TlsUnavailable, "the {peer} does not use TLS (it answered in plaintext); configure TLS on both sides or on neither");
            }
        }
    }
    let state = conn.state();
    let version = match state.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => Version::Tls13,
        _ => Version::Tls12,
    };
    let info = TlsInfo {
        protocol: state.protocol_version().map_or_else(|| "unknown".into(), |v| v.as_str().unwrap_or("unknown").replace("TLSv1_", "TLS 1.")),
        cipher_suite: state.negotiated_cipher_suite().map_or_else(|| "unknown".into(), |s| s.suite().as_str().unwrap_or("unknown").to_string()),
        peer: state.peer_certificates().and_then(|c| c.first()).and_then(|c| super::Identity::from_der(c).ok()),
    };
    let (secrets, kernel) = conn.into_kernel().map_err(|e| Error::new(ErrorCode::TlsHandshake, format!("TLS with the {peer}: {e}")))?;
    Ok(Established { kernel, secrets, version, info, early })
}

/// Sends the alert rustls queued when the handshake failed: one record, taken from rustls's
/// first answer. rustls is not asked again: it would read the pending bytes that failed once
/// more, fail again and queue a second fatal alert (which it asserts never happens).
fn send_alert<C: Handshaking>(fd: RawFd, conn: &mut C, inbox: &mut Inbox) -> Result<()> {
    let mut out = vec![0u8; 512];
    if let Ok(ConnectionState::EncodeTlsData(mut data)) = conn.process(inbox.pending_mut()).state
        && let Ok(n) = data.encode(&mut out)
    {
        crate::io::write_all(fd, &[&out[..n]])?;
    }
    Ok(())
}
