//! TLS termination: certificates chosen by SNI (exact names, then
//! wildcards, then the default), swapped atomically on reload so new
//! handshakes use new certificates while existing connections continue.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::{CertConfig, TlsConfig};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("certificate {0}: names no DNS name and has no `names`")]
    NoNames(String),
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The certificates in force.
#[derive(Debug, Default)]
pub struct CertSet {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the suffix after "*." (e.g. "example.com").
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
    /// Files and their modification times, to notice changes.
    files: Vec<(PathBuf, Option<SystemTime>)>,
}

impl CertSet {
    pub fn load(cfg: &TlsConfig) -> Result<CertSet, TlsError> {
        let mut set = CertSet::default();
        for c in &cfg.certificates {
            let (ck, names) = load_one(c)?;
            let ck = Arc::new(ck);
            for n in names {
                let n = n.trim_end_matches('.').to_ascii_lowercase();
                match n.strip_prefix("*.") {
                    Some(suffix) => set
                        .wildcard
                        .entry(suffix.to_string())
                        .or_insert_with(|| ck.clone()),
                    None => set.exact.entry(n).or_insert_with(|| ck.clone()),
                };
            }
            // The default is the one marked `default`, else the first.
            if c.default || set.default.is_none() {
                set.default = Some(ck.clone());
            }
            for p in [&c.cert, &c.key] {
                set.files.push((p.clone(), mtime(p)));
            }
        }
        Ok(set)
    }

    pub fn resolve(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = sni {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(c) = self.exact.get(&name) {
                return Some(c.clone());
            }
            if let Some((_, parent)) = name.split_once('.')
                && let Some(c) = self.wildcard.get(parent)
            {
                return Some(c.clone());
            }
        }
        self.default.clone()
    }

    /// Whether any certificate or key file changed since this set was loaded.
    pub fn changed_on_disk(&self) -> bool {
        self.files.iter().any(|(p, t)| mtime(p) != *t)
    }
}

fn mtime(p: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn load_one(c: &CertConfig) -> Result<(CertifiedKey, Vec<String>), TlsError> {
    let file_err = |p: &PathBuf, reason: String| TlsError::File {
        path: p.display().to_string(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&c.cert)
        .map_err(|e| file_err(&c.cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(&c.cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err(&c.cert, "no PEM certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&c.key).map_err(|e| file_err(&c.key, e.to_string()))?;
    let signing =
        ring::sign::any_supported_type(&key).map_err(|e| file_err(&c.key, e.to_string()))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match()
        .map_err(|e| file_err(&c.key, format!("does not match {}: {e}", c.cert.display())))?;
    let names = match &c.names {
        Some(n) => n.clone(),
        None => dns_names(&ck.cert[0]),
    };
    if names.is_empty() && !c.default {
        return Err(TlsError::NoNames(c.cert.display().to_string()));
    }
    Ok((ck, names))
}

/// The DNS names in a certificate's subject alternative names.
fn dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    // Minimal DER walk: find the SAN extension (2.5.29.17) and read its
    // dNSName entries ([2] IMPLICIT IA5String).
    const SAN_OID: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x11];
    let der = cert.as_ref();
    let Some(pos) = der.windows(SAN_OID.len()).position(|w| w == SAN_OID) else {
        return Vec::new();
    };
    let mut rest = &der[pos + SAN_OID.len()..];
    // Optional critical BOOLEAN.
    if rest.first() == Some(&0x01) {
        rest = rest.get(3..).unwrap_or(&[]);
    }
    // OCTET STRING wrapping the GeneralNames SEQUENCE.
    let Some((0x04, inner, _)) = der_tlv(rest) else {
        return Vec::new();
    };
    let Some((0x30, mut seq, _)) = der_tlv(inner) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    while let Some((tag, val, next)) = der_tlv(seq) {
        if tag == 0x82
            && let Ok(s) = std::str::from_utf8(val)
        {
            out.push(s.to_string());
        }
        seq = next;
    }
    out
}

/// One DER TLV: (tag, value, rest).
fn der_tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)?;
    let (len, hdr) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = hdr.checked_add(len)?;
    Some((tag, b.get(hdr..end)?, b.get(end..)?))
}

/// The shared, swappable certificate store; a rustls resolver.
#[derive(Debug, Default)]
pub struct CertStore {
    current: ArcSwap<CertSet>,
}

impl CertStore {
    pub fn new(set: CertSet) -> Arc<Self> {
        Arc::new(CertStore {
            current: ArcSwap::from_pointee(set),
        })
    }

    pub fn replace(&self, set: CertSet) {
        self.current.store(Arc::new(set));
    }

    pub fn current(&self) -> Arc<CertSet> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load().resolve(hello.server_name())
    }
}

/// A rustls server config for a listener, with its ALPN list, sharing `store`.
pub fn server_config(
    store: Arc<CertStore>,
    alpn: &[String],
    min13: bool,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if min13 {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(store);
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_cert(dir: &std::path::Path, name: &str, sans: &[&str]) -> CertConfig {
        let ck = rcgen::generate_simple_self_signed(
            sans.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .expect("cert");
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, ck.cert.pem()).expect("write");
        std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write");
        CertConfig {
            cert,
            key,
            names: None,
            default: false,
        }
    }

    #[test]
    fn sni_selection_exact_wildcard_default() {
        let dir = std::env::temp_dir().join(format!("meridian-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let a = write_cert(&dir, "a", &["a.test"]);
        let w = write_cert(&dir, "w", &["*.w.test", "w.test"]);
        let cfg = TlsConfig {
            certificates: vec![a, w],
            ..Default::default()
        };
        let set = CertSet::load(&cfg).expect("load");
        let a_ck = set.resolve(Some("a.test")).expect("a");
        let w_ck = set.resolve(Some("x.w.test")).expect("w");
        assert!(!Arc::ptr_eq(&a_ck, &w_ck));
        assert!(Arc::ptr_eq(
            &w_ck,
            &set.resolve(Some("W.TEST.")).expect("apex")
        ));
        assert!(Arc::ptr_eq(
            &a_ck,
            &set.resolve(Some("unknown.test")).expect("default: first")
        ));
        assert!(
            set.resolve(Some("a.b.w.test"))
                .is_some_and(|c| Arc::ptr_eq(&c, &a_ck)),
            "wildcards match one label"
        );
        assert!(!set.changed_on_disk());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn der_reader_is_total() {
        assert!(der_tlv(&[]).is_none());
        assert!(der_tlv(&[0x30, 0x85, 1, 2, 3, 4, 5]).is_none());
        assert!(der_tlv(&[0x30, 0x05, 1]).is_none());
        assert_eq!(
            der_tlv(&[0x04, 0x01, 9, 7]),
            Some((0x04, &[9u8][..], &[7u8][..]))
        );
    }
}
