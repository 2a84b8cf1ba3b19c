//! The TLS record layer after the handshake: records sealed and opened in place, in our own
//! buffers, with the traffic keys rustls negotiated (its kernel-connection API, the one meant
//! for kTLS) and ring's AEAD (AES-GCM with AES-NI/VAES, or ChaCha20-Poly1305).
//!
//! rustls's own record layer decrypts each received record into a fresh heap buffer and
//! encrypts each sent record into another; doing it here lets a received record be decrypted
//! where `read` put it and a sent record be sealed where its plaintext was copied, so each
//! direction copies the plaintext once (see `stream.rs`).
//!
//! TLS 1.3 (RFC 8446 5.2): outer type application_data, AAD = the 5-byte header, nonce = IV xor
//! sequence number, the real content type after the plaintext. TLS 1.2 (RFC 5288, RFC 7905):
//! the content type in the header, AAD = sequence number, type, version and plaintext length;
//! AES-GCM carries an 8-byte explicit nonce in front of the ciphertext.

use std::ops::Range;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::{ConnectionTrafficSecrets, Error as TlsError, PeerMisbehaved};

pub(super) const HEADER: usize = 5;
/// Most plaintext one record carries (2^14).
pub(super) const MAX_PLAINTEXT: usize = 1 << 14;
const TAG: usize = 16;
const EXPLICIT_NONCE: usize = 8;
/// Longest ciphertext a peer may send in one record (TLS 1.2 allows 2^14 + 2048).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 2048;
/// Room one record of up to `MAX_PLAINTEXT` bytes takes on the wire, whichever version.
pub(super) const MAX_SEALED: usize = HEADER + EXPLICIT_NONCE + MAX_PLAINTEXT + 1 + TAG;
/// Room one received record can take in a buffer.
pub(super) const MAX_OPENED: usize = HEADER + MAX_CIPHERTEXT;

pub(super) const CHANGE_CIPHER_SPEC: u8 = 20;
pub(super) const ALERT: u8 = 21;
pub(super) const HANDSHAKE: u8 = 22;
pub(super) const APPLICATION_DATA: u8 = 23;
const LEGACY_VERSION: [u8; 2] = [3, 3];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Version {
    Tls12,
    Tls13,
}

/// One direction's key, IV and sequence number.
pub(super) struct Cipher {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    version: Version,
    /// TLS 1.2 AES-GCM: an explicit nonce travels in front of the ciphertext.
    explicit_nonce: bool,
}

/// A record [`Cipher::open`] decrypted: its content type and where its plaintext lies.
pub(super) struct Opened {
    pub typ: u8,
    pub plain: Range<usize>,
    /// Bytes the record took in the buffer.
    pub len: usize,
}

impl Cipher {
    pub(super) fn new(version: Version, (seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<Cipher, TlsError> {
        let (alg, key, iv, gcm) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv, true),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv, true),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&aead::CHACHA20_POLY1305, key, iv, false),
            _ => return Err(TlsError::General("negotiated an AEAD this record layer does not implement".into())),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| TlsError::General("bad traffic key length".into()))?;
        let iv: [u8; 12] = iv.as_ref().try_into().map_err(|_| TlsError::General("bad traffic IV length".into()))?;
        Ok(Cipher { key: LessSafeKey::new(key), iv, seq, version, explicit_nonce: gcm && version == Version::Tls12 })
    }

    /// Records sealed or opened with this key so far.
    pub(super) fn seq(&self) -> u64 {
        self.seq
    }

    /// Where a record's plaintext starts in the record.
    pub(super) fn plaintext_offset(&self) -> usize {
        HEADER + if self.explicit_nonce { EXPLICIT_NONCE } else { 0 }
    }

    fn nonce(&self) -> [u8; 12] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }

    fn tls12_aad(&self, typ: u8, len: usize) -> [u8; 13] {
        let mut aad = [0u8; 13];
        aad[..8].copy_from_slice(&self.seq.to_be_bytes());
        aad[8] = typ;
        aad[9..11].copy_from_slice(&LEGACY_VERSION);
        aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
        aad
    }

    /// Seals one record of type `typ` in `rec`, whose `n` bytes of plaintext the caller put
    /// at `rec[plaintext_offset()..]`; returns the record's length. `rec` must have room for
    /// [`MAX_SEALED`] bytes.
    pub(super) fn seal(&mut self, typ: u8, rec: &mut [u8], n: usize) -> Result<usize, TlsError> {
        debug_assert!(n <= MAX_PLAINTEXT);
        let nonce = self.nonce();
        let at = self.plaintext_offset();
        let (outer, body_end, tag) = match self.version {
            Version::Tls13 => {
                rec[at + n] = typ;
                let len = n + 1 + TAG;
                let header = header(APPLICATION_DATA, len);
                rec[..HEADER].copy_from_slice(&header);
                let tag = self.key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(header), &mut rec[at..at + n + 1]);
                (header, at + n + 1, tag)
            }
            Version::Tls12 => {
                let aad = self.tls12_aad(typ, n);
                if self.explicit_nonce {
                    rec[HEADER..at].copy_from_slice(&nonce[4..]);
                }
                let header = header(typ, at - HEADER + n + TAG);
                rec[..HEADER].copy_from_slice(&header);
                let tag = self.key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut rec[at..at + n]);
                (header, at + n, tag)
            }
        };
        let tag = tag.map_err(|_| TlsError::EncryptError)?;
        rec[body_end..body_end + TAG].copy_from_slice(tag.as_ref());
        debug_assert_eq!(u16::from_be_bytes([outer[3], outer[4]]) as usize, body_end + TAG - HEADER);
        self.seq += 1;
        Ok(body_end + TAG)
    }

    /// Opens the record at the start of `buf` in place. `Ok(None)` when `buf` does not hold all
    /// of it yet.
    pub(super) fn open(&mut self, buf: &mut [u8]) -> Result<Option<Opened>, TlsError> {
        let Some(&[typ, v0, _, l0, l1]) = buf.get(..HEADER) else { return Ok(None) };
        let len = u16::from_be_bytes([l0, l1]) as usize;
        if v0 != 3 || !matches!(typ, CHANGE_CIPHER_SPEC..=APPLICATION_DATA) {
            return Err(TlsError::InvalidMessage(rustls::InvalidMessage::InvalidContentType));
        }
        if len > MAX_CIPHERTEXT {
            return Err(TlsError::PeerSentOversizedRecord);
        }
        if buf.len() < HEADER + len {
            return Ok(None);
        }
        let nonce = self.nonce();
        let record = &mut buf[..HEADER + len];
        let opened = match self.version {
            Version::Tls13 => {
                if typ != APPLICATION_DATA {
                    return Err(TlsError::PeerMisbehaved(PeerMisbehaved::IllegalMiddleboxChangeCipherSpec));
                }
                let (header, body) = record.split_at_mut(HEADER);
                let plain = self.key.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(&*header), body).map_err(|_| TlsError::DecryptError)?;
                // The content type is the last byte that is not zero padding.
                let Some(end) = plain.iter().rposition(|&b| b != 0) else {
                    return Err(TlsError::PeerMisbehaved(PeerMisbehaved::IllegalTlsInnerPlaintext));
                };
                Opened { typ: plain[end], plain: HEADER..HEADER + end, len: HEADER + len }
            }
            Version::Tls12 => {
                let at = self.plaintext_offset();
                let Some(n) = len.checked_sub(at - HEADER + TAG) else { return Err(TlsError::DecryptError) };
                let mut nonce = nonce;
                if self.explicit_nonce {
                    nonce[4..].copy_from_slice(&record[HEADER..at]);
                }
                let aad = self.tls12_aad(typ, n);
                self.key.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut record[at..]).map_err(|_| TlsError::DecryptError)?;
                Opened { typ, plain: at..at + n, len: HEADER + len }
            }
        };
        self.seq += 1;
        Ok(Some(opened))
    }
}

fn header(typ: u8, len: usize) -> [u8; HEADER] {
    let l = (len as u16).to_be_bytes();
    [typ, LEGACY_VERSION[0], LEGACY_VERSION[1], l[0], l[1]]
}
