//! Mutual TLS on the control connection and on every multifd channel (QEMU's tls-creds and
//! tls-authz), with rustls and the ring provider.
//!
//! Both sides present a certificate signed by a CA the other trusts. The source verifies the
//! destination's certificate against the name it dialled (or `name`); the destination checks
//! the source's certificate against its CA and, when `allow` is not empty, against an
//! allow-list of identities. Each connection's handshake completes before its first byte of
//! protocol (control magic or init packet), so a destination never reads a page from a peer it
//! has not authenticated.

mod handshake;
mod identity;
#[cfg(test)]
mod peer_tests;
mod record;
mod stream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};

use crate::error::{Error, ErrorCode, Result, fail};

pub use identity::Identity;
pub use stream::{TlsInfo, TlsStream};
pub(crate) use stream::{Got, looks_like_tls, refuse_plaintext_peer, refuse_tls_peer};

/// Credentials and checks for one side, as PEM bytes.
#[derive(Clone, Default)]
pub struct TlsOptions {
    /// This side's certificate chain, leaf first.
    pub cert: Vec<u8>,
    /// The private key for `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: Vec<u8>,
    /// The CA certificates that may sign the peer's certificate.
    pub ca: Vec<u8>,
    /// Source only: the name the destination's certificate must carry (DNS name or IP
    /// address). Defaults to the host of the address dialled.
    pub name: Option<String>,
    /// Destination only: identities allowed to connect (certificate subject, common name or
    /// alternative name). Empty: any certificate the CA signed.
    pub allow: Vec<String>,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions").field("name", &self.name).field("allow", &self.allow).finish_non_exhaustive()
    }
}

/// What a client dials, as far as TLS is concerned: the host name to verify when
/// [`TlsOptions::name`] is not set, or `None` for an address without a host (a Unix socket).
/// `transport::Address` implements it; TLS itself knows nothing of addresses.
pub trait Dialed {
    fn host(&self) -> Option<&str>;
}

/// The source's side: a client config and the name to verify.
#[derive(Debug, Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

/// The destination's side: a server config whose client verifier also applies the allow-list.
#[derive(Debug, Clone)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
    authz: Arc<AllowList>,
}

fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    // AES-128-GCM first: the fastest suite with AES-NI, and as strong as the peer's offer.
    p.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

fn config_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorCode::TlsConfig, format!("{what}: {e}"))
}

fn load_chain(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_slice_iter(pem).collect::<std::result::Result<Vec<_>, _>>().map_err(|e| config_error("certificate PEM", e))?;
    if chain.is_empty() {
        fail!(TlsConfig, "the certificate PEM holds no CERTIFICATE block");
    }
    Ok(chain)
}

fn load_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| config_error("private key PEM (PKCS#8, PKCS#1 or SEC1 expected)", e))
}

fn load_roots(pem: &[u8]) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_slice_iter(pem).collect::<std::result::Result<Vec<_>, _>>().map_err(|e| config_error("CA PEM", e))?;
    if certs.is_empty() {
        fail!(TlsConfig, "the CA PEM holds no CERTIFICATE block");
    }
    for c in certs {
        roots.add(c).map_err(|e| config_error("CA certificate", e))?;
    }
    Ok(Arc::new(roots))
}

impl TlsClient {
    /// A client for connections to `dialed`, checking the destination's certificate for
    /// `options.name` or else the host dialled.
    pub fn new(options: &TlsOptions, dialed: &impl Dialed) -> Result<TlsClient> {
        let name = match (&options.name, dialed.host()) {
            (Some(n), _) => n.clone(),
            (None, Some(host)) => host.to_string(),
            (None, None) => fail!(InvalidArgument, "TLS over a unix socket needs the destination's certificate name (tls name)"),
        };
        let name = ServerName::try_from(name.clone()).map_err(|_| Error::new(ErrorCode::InvalidArgument, format!("TLS name {name:?} is neither a DNS name nor an IP address")))?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error("TLS versions", e))?
            .with_root_certificates(load_roots(&options.ca)?)
            .with_client_auth_cert(load_chain(&options.cert)?, load_key(&options.key)?)
            .map_err(|e| config_error("certificate and key", e))?;
        let mut config = config;
        config.resumption = Resumption::disabled();
        // Our record layer (`record.rs`) seals and opens application records with the keys.
        config.enable_secret_extraction = true;
        Ok(TlsClient { config: Arc::new(config), name })
    }

    pub(crate) fn connection(&self) -> Result<rustls::client::UnbufferedClientConnection> {
        rustls::client::UnbufferedClientConnection::new(self.config.clone(), self.name.clone()).map_err(|e| config_error("TLS client", e))
    }
}

impl TlsServer {
    pub fn new(options: &TlsOptions) -> Result<TlsServer> {
        let provider = provider();
        let webpki = WebPkiClientVerifier::builder_with_provider(load_roots(&options.ca)?, provider.clone()).build().map_err(|e| config_error("client verifier", e))?;
        let allow: Vec<String> = options.allow.iter().map(|a| a.trim().to_string()).collect();
        if allow.iter().any(String::is_empty) {
            fail!(InvalidArgument, "an empty TLS allow-list entry would match nothing");
        }
        let authz = Arc::new(AllowList { inner: webpki, allow, refused: Mutex::new(HashMap::new()) });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error("TLS versions", e))?
            .with_client_cert_verifier(authz.clone())
            .with_single_cert(load_chain(&options.cert)?, load_key(&options.key)?)
            .map_err(|e| config_error("certificate and key", e))?;
        // One ticket per TLS 1.3 connection, sent only once the client's certificate passed:
        // the source waits for it, so a refusal reaches it at connect time (see
        // `TlsStream::client`). The tickets are never honoured: every connection
        // authenticates in full.
        config.send_tls13_tickets = 1;
        config.session_storage = Arc::new(VerdictTickets);
        config.enable_secret_extraction = true;
        Ok(TlsServer { config: Arc::new(config), authz })
    }

    pub(crate) fn connection(&self) -> Result<rustls::server::UnbufferedServerConnection> {
        rustls::server::UnbufferedServerConnection::new(self.config.clone()).map_err(|e| config_error("TLS server", e))
    }

    /// Who the allow-list refused in the handshake this thread is running, if it refused.
    pub(crate) fn take_refusal(&self) -> Option<String> {
        self.authz.refused.lock().unwrap().remove(&std::thread::current().id())
    }
}

/// Session storage that lets the server issue a TLS 1.3 ticket but never resumes one.
#[derive(Debug)]
struct VerdictTickets;

impl rustls::server::StoresServerSessions for VerdictTickets {
    fn put(&self, _key: Vec<u8>, _value: Vec<u8>) -> bool {
        true
    }

    fn get(&self, _key: &[u8]) -> Option<Vec<u8>> {
        None
    }

    fn take(&self, _key: &[u8]) -> Option<Vec<u8>> {
        None
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// The CA check plus the destination's allow-list. A client the CA signed but the list does
/// not name gets the `access_denied` alert, so the source learns why.
#[derive(Debug)]
struct AllowList {
    inner: Arc<dyn ClientCertVerifier>,
    allow: Vec<String>,
    /// The identity refused, per handshaking thread (rustls verifies on the thread that feeds
    /// the handshake), for the error message.
    refused: Mutex<HashMap<std::thread::ThreadId, String>>,
}

impl ClientCertVerifier for AllowList {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(&self, end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>], now: UnixTime) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        if self.allow.is_empty() {
            return Ok(verified);
        }
        let id = Identity::from_der(end_entity).map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self.allow.iter().any(|a| id.matches(a)) {
            return Ok(verified);
        }
        self.refused.lock().unwrap().insert(std::thread::current().id(), id.describe());
        Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A rustls failure as one of our codes. `peer` names the other side ("source" or
/// "destination"), for the wording.
pub(crate) fn tls_error(e: &rustls::Error, peer: &str) -> Error {
    use rustls::Error as E;
    let (code, text) = match e {
        E::InvalidCertificate(c) => certificate_error(c, peer),
        E::AlertReceived(a) => match a {
            AlertDescription::UnknownCA => (ErrorCode::TlsUntrusted, format!("the {peer} does not trust our certificate (alert unknown_ca)")),
            AlertDescription::CertificateExpired => (ErrorCode::TlsExpired, format!("the {peer} refused our certificate as expired or not yet valid (alert certificate_expired)")),
            AlertDescription::AccessDenied => (ErrorCode::TlsNotAllowed, format!("the {peer} authenticated our certificate but its allow-list does not name us (alert access_denied)")),
            AlertDescription::BadCertificate => (ErrorCode::TlsRejected, format!("the {peer} refused our certificate (alert bad_certificate: for example, it does not carry the name the {peer} verifies)")),
            AlertDescription::CertificateRequired => (ErrorCode::TlsRejected, format!("the {peer} requires a client certificate (alert certificate_required)")),
            other => (ErrorCode::TlsHandshake, format!("the {peer} ended the TLS handshake with alert {other:?}")),
        },
        E::NoCertificatesPresented => (ErrorCode::TlsRejected, format!("the {peer} presented no certificate; mutual TLS requires one")),
        other => (ErrorCode::TlsHandshake, format!("TLS with the {peer} failed: {other}")),
    };
    Error::new(code, text)
}

fn certificate_error(c: &CertificateError, peer: &str) -> (ErrorCode, String) {
    use CertificateError as C;
    match c {
        C::UnknownIssuer => (ErrorCode::TlsUntrusted, format!("the {peer}'s certificate is not signed by a CA we trust (unknown issuer)")),
        C::Expired | C::ExpiredContext { .. } => (ErrorCode::TlsExpired, format!("the {peer}'s certificate has expired ({c})")),
        C::NotValidYet | C::NotValidYetContext { .. } => (ErrorCode::TlsExpired, format!("the {peer}'s certificate is not valid yet ({c})")),
        C::NotValidForName | C::NotValidForNameContext { .. } => (ErrorCode::TlsNameMismatch, format!("the {peer}'s certificate is not valid for the name we expect ({c})")),
        C::ApplicationVerificationFailure => (ErrorCode::TlsNotAllowed, format!("the {peer}'s certificate is valid but not on the allow-list")),
        other => (ErrorCode::TlsUntrusted, format!("the {peer}'s certificate is not acceptable ({other})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_credentials_are_config_errors() {
        let opts = TlsOptions { cert: b"nope".to_vec(), key: b"nope".to_vec(), ca: b"nope".to_vec(), ..Default::default() };
        assert_eq!(TlsServer::new(&opts).unwrap_err().code, ErrorCode::TlsConfig);
        struct Host(Option<&'static str>);
        impl Dialed for Host {
            fn host(&self) -> Option<&str> {
                self.0
            }
        }
        assert_eq!(TlsClient::new(&opts, &Host(Some("127.0.0.1"))).unwrap_err().code, ErrorCode::TlsConfig);
        let unix = TlsClient::new(&opts, &Host(None)).unwrap_err();
        assert_eq!(unix.code, ErrorCode::InvalidArgument);
    }

    #[test]
    fn aes_128_gcm_is_preferred() {
        assert_eq!(provider().cipher_suites[0].suite(), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    }
}
