//! Who a certificate names: its subject and subject alternative names, read from the DER just
//! far enough for the destination's allow-list (QEMU's tls-authz). The certificate has already
//! passed chain verification when this runs; the reader still checks every length, so a
//! malformed certificate is an error, never a panic.

use std::net::IpAddr;

/// The identities an end-entity certificate claims.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    /// The subject as RFC 4514 writes it, most specific first: `CN=source,O=Example,C=GB`.
    pub subject: String,
    /// The subject's common name, if it has one.
    pub common_name: Option<String>,
    /// DNS names, IP addresses, e-mail addresses and URIs from the subjectAltName extension.
    pub alt_names: Vec<String>,
}

impl Identity {
    /// Reads the identities of a DER certificate.
    pub fn from_der(cert: &[u8]) -> Result<Identity, &'static str> {
        let mut outer = Der::new(cert);
        let mut cert = outer.expect(SEQUENCE)?;
        let mut tbs = cert.expect(SEQUENCE)?;
        if tbs.peek() == Some(0xa0) {
            tbs.next()?; // version
        }
        tbs.expect(INTEGER)?; // serial
        tbs.expect(SEQUENCE)?; // signature algorithm
        tbs.expect(SEQUENCE)?; // issuer
        tbs.expect(SEQUENCE)?; // validity
        let subject = tbs.expect(SEQUENCE)?;
        tbs.expect(SEQUENCE)?; // subject public key info
        let mut id = Identity::default();
        let mut rdns = Vec::new();
        let mut names = subject;
        while !names.is_empty() {
            let mut set = names.expect(SET)?;
            let mut parts = Vec::new();
            while !set.is_empty() {
                let mut atv = set.expect(SEQUENCE)?;
                let oid = atv.expect(OID)?.rest();
                let (_, value) = atv.next()?;
                let value = String::from_utf8_lossy(value.rest()).into_owned();
                if oid == OID_CN && id.common_name.is_none() {
                    id.common_name = Some(value.clone());
                }
                parts.push(format!("{}={}", attribute_name(oid), escape(&value)));
            }
            rdns.push(parts.join("+"));
        }
        rdns.reverse();
        id.subject = rdns.join(",");
        while !tbs.is_empty() {
            let (tag, mut body) = tbs.next()?;
            if tag != 0xa3 {
                continue; // issuer/subject unique ids
            }
            let mut exts = body.expect(SEQUENCE)?;
            while !exts.is_empty() {
                let mut ext = exts.expect(SEQUENCE)?;
                let oid = ext.expect(OID)?.rest();
                if ext.peek() == Some(BOOLEAN) {
                    ext.next()?;
                }
                let mut value = ext.expect(OCTET_STRING)?;
                if oid == OID_SAN {
                    id.alt_names = alt_names(value.expect(SEQUENCE)?)?;
                }
            }
        }
        Ok(id)
    }

    /// Whether an allow-list entry names this certificate: the whole subject (in RFC 4514
    /// order or in the certificate's own order, spaces after commas ignored), its common name,
    /// or one of its alternative names. DNS names and e-mail addresses compare without case.
    pub fn matches(&self, entry: &str) -> bool {
        let entry = entry.trim();
        if entry.is_empty() {
            return false;
        }
        let wanted = split_rdns(entry);
        let mut subject = split_rdns(&self.subject);
        let forward = wanted == subject;
        subject.reverse();
        forward
            || wanted == subject
            || self.common_name.as_deref() == Some(entry)
            || self.alt_names.iter().any(|n| n.eq_ignore_ascii_case(entry))
    }

    /// A short description for error messages.
    pub fn describe(&self) -> String {
        if self.alt_names.is_empty() {
            format!("subject {:?}", self.subject)
        } else {
            format!("subject {:?}, alternative names {:?}", self.subject, self.alt_names)
        }
    }
}

const BOOLEAN: u8 = 0x01;
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
/// 2.5.4.3
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
/// 2.5.29.17
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];

fn attribute_name(oid: &[u8]) -> String {
    match oid {
        [0x55, 0x04, 0x03] => "CN".into(),
        [0x55, 0x04, 0x06] => "C".into(),
        [0x55, 0x04, 0x07] => "L".into(),
        [0x55, 0x04, 0x08] => "ST".into(),
        [0x55, 0x04, 0x09] => "STREET".into(),
        [0x55, 0x04, 0x0a] => "O".into(),
        [0x55, 0x04, 0x0b] => "OU".into(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19] => "DC".into(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01] => "UID".into(),
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01] => "emailAddress".into(),
        other => dotted(other),
    }
}

/// An OID in dotted form, for attributes without a short name.
fn dotted(oid: &[u8]) -> String {
    let mut arcs: Vec<u64> = Vec::new();
    let mut acc = 0u64;
    for &b in oid {
        acc = (acc << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (acc / 40).min(2);
                arcs.push(first);
                arcs.push(acc - first * 40);
            } else {
                arcs.push(acc);
            }
            acc = 0;
        }
    }
    arcs.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
}

/// A DN's RDNs, split at unescaped commas, each trimmed.
fn split_rdns(dn: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut escaped = false;
    for c in dn.chars() {
        match c {
            ',' if !escaped => parts.push(String::new()),
            _ => parts.last_mut().expect("never empty").push(c),
        }
        escaped = c == '\\' && !escaped;
    }
    parts.iter().map(|p| p.trim().to_string()).collect()
}

/// RFC 4514 escaping of the characters that would change how a DN reads.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for (i, c) in v.chars().enumerate() {
        if matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=') || (i == 0 && matches!(c, '#' | ' ')) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn alt_names(mut seq: Der<'_>) -> Result<Vec<String>, &'static str> {
    let mut names = Vec::new();
    while !seq.is_empty() {
        let (tag, value) = seq.next()?;
        let bytes = value.rest();
        match tag {
            // rfc822Name, dNSName, uniformResourceIdentifier (IA5 strings, implicit tags)
            0x81 | 0x82 | 0x86 => names.push(String::from_utf8_lossy(bytes).into_owned()),
            0x87 => match bytes.len() {
                4 => names.push(IpAddr::from(<[u8; 4]>::try_from(bytes).expect("length checked")).to_string()),
                16 => names.push(IpAddr::from(<[u8; 16]>::try_from(bytes).expect("length checked")).to_string()),
                _ => return Err("an IP address alternative name is neither 4 nor 16 bytes"),
            },
            _ => {} // other name forms are not identities the allow-list speaks
        }
    }
    Ok(names)
}

/// A bounds-checked DER reader over one level of TLVs.
struct Der<'a> {
    data: &'a [u8],
}

impl<'a> Der<'a> {
    fn new(data: &'a [u8]) -> Self {
        Der { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn rest(&self) -> &'a [u8] {
        self.data
    }

    fn peek(&self) -> Option<u8> {
        self.data.first().copied()
    }

    /// The next TLV: its tag and a reader over its contents.
    fn next(&mut self) -> Result<(u8, Der<'a>), &'static str> {
        let [tag, first, rest @ ..] = self.data else { return Err("certificate DER ends inside a tag") };
        if tag & 0x1f == 0x1f {
            return Err("certificate DER uses a multi-byte tag");
        }
        let (len, rest) = match *first {
            n if n < 0x80 => (usize::from(n), rest),
            0x81..=0x84 => {
                let count = usize::from(first & 0x7f);
                if rest.len() < count {
                    return Err("certificate DER ends inside a length");
                }
                let len = rest[..count].iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
                (len, &rest[count..])
            }
            _ => return Err("certificate DER has an unsupported length form"),
        };
        if rest.len() < len {
            return Err("certificate DER length runs past its end");
        }
        let (body, after) = rest.split_at(len);
        self.data = after;
        Ok((*tag, Der::new(body)))
    }

    fn expect(&mut self, tag: u8) -> Result<Der<'a>, &'static str> {
        match self.next()? {
            (t, body) if t == tag => Ok(body),
            _ => Err("certificate DER has an unexpected structure"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity {
            subject: "CN=source.example,O=Example\\, Inc,C=GB".into(),
            common_name: Some("source.example".into()),
            alt_names: vec!["source.example".into(), "10.0.0.7".into(), "ops@example.org".into()],
        }
    }

    #[test]
    fn allow_list_entries_match_subject_cn_or_alt_names() {
        let id = id();
        for yes in ["CN=source.example,O=Example\\, Inc,C=GB", "CN=source.example, O=Example\\, Inc, C=GB", "C=GB,O=Example\\, Inc,CN=source.example", "source.example", "SOURCE.example", "10.0.0.7", "ops@example.org"] {
            assert!(id.matches(yes), "{yes}");
        }
        for no in ["", "CN=source.example", "CN=other,O=Example\\, Inc,C=GB", "other.example", "10.0.0.8", "source"] {
            assert!(!id.matches(no), "{no}");
        }
    }

    #[test]
    fn dotted_oids() {
        assert_eq!(dotted(&[0x55, 0x04, 0x03]), "2.5.4.3");
        assert_eq!(dotted(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d]), "1.2.840.113549");
    }

    #[test]
    fn malformed_der_is_an_error_not_a_panic() {
        let mut x = 1u64;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|i| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    if i < 2 { 0x30 } else { (x >> 33) as u8 }
                })
                .collect();
            let _ = Identity::from_der(&bytes);
        }
        assert!(Identity::from_der(&[]).is_err());
        assert!(Identity::from_der(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
