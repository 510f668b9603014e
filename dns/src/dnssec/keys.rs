//! Zone keys: PKCS#8 files (PEM `PRIVATE KEY`, as ring writes them), their
//! DNSKEY, DS, CDS and CDNSKEY records, and key generation.

use std::fmt;
use std::path::{Path, PathBuf};

use hickory_proto::dnssec::crypto::{EcdsaSigningKey, Ed25519SigningKey};
use hickory_proto::dnssec::rdata::{CDNSKEY, CDS, DNSKEY, DS};
use hickory_proto::dnssec::{Algorithm, DigestType, PublicKey as _, SigningKey};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;

/// Errors loading or generating a key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key file cannot be read.
    #[error("cannot read key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a PKCS#8 PEM private key of a supported algorithm.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The crypto library refused.
    #[error("key operation failed: {0}")]
    Crypto(String),
}

/// What a key signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyRole {
    /// Key-signing key: signs the DNSKEY, CDS and CDNSKEY RRsets (flags 257).
    Ksk,
    /// Zone-signing key: signs everything else (flags 256).
    Zsk,
    /// Combined signing key: both (flags 257).
    Csk,
}

impl KeyRole {
    /// DNSKEY flags: zone key, plus SEP for KSK and CSK.
    pub fn flags(self) -> u16 {
        match self {
            Self::Zsk => 256,
            Self::Ksk | Self::Csk => 257,
        }
    }
    /// Does it sign the apex key RRsets?
    pub fn signs_keys(self) -> bool {
        matches!(self, Self::Ksk | Self::Csk)
    }
    /// Does it sign zone data?
    pub fn signs_data(self) -> bool {
        matches!(self, Self::Zsk | Self::Csk)
    }
}

impl fmt::Display for KeyRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ksk => "ksk",
            Self::Zsk => "zsk",
            Self::Csk => "csk",
        })
    }
}

/// The algorithms meridian-dns signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeyAlgorithm {
    /// ECDSA P-256 with SHA-256, algorithm 13 (the default).
    #[default]
    #[serde(alias = "ecdsap256sha256", alias = "13")]
    Ecdsap256,
    /// Ed25519, algorithm 15.
    #[serde(alias = "15")]
    Ed25519,
}

impl KeyAlgorithm {
    /// The DNSSEC algorithm.
    pub fn dnssec(self) -> Algorithm {
        match self {
            Self::Ecdsap256 => Algorithm::ECDSAP256SHA256,
            Self::Ed25519 => Algorithm::ED25519,
        }
    }
}

impl std::str::FromStr for KeyAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "ecdsap256" | "ecdsap256sha256" | "13" => Ok(Self::Ecdsap256),
            "ed25519" | "15" => Ok(Self::Ed25519),
            other => Err(format!(
                "unknown algorithm {other:?} (ecdsap256sha256 or ed25519)"
            )),
        }
    }
}

/// One loaded zone key.
pub struct ZoneKey {
    /// Its role.
    pub role: KeyRole,
    /// Signs (true) or is only published (false, for rollovers).
    pub active: bool,
    /// The DNSKEY RDATA.
    pub dnskey: DNSKEY,
    /// The key tag (RFC 4034 appendix B).
    pub tag: u16,
    /// The private key.
    pub key: Box<dyn SigningKey>,
}

impl fmt::Debug for ZoneKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZoneKey")
            .field("role", &self.role)
            .field("active", &self.active)
            .field("tag", &self.tag)
            .field("algorithm", &self.key.algorithm())
            .finish()
    }
}

fn crypto(e: impl fmt::Display) -> KeyError {
    KeyError::Crypto(e.to_string())
}

impl ZoneKey {
    /// Load a PKCS#8 PEM file; the algorithm (13 or 15) is read from the key.
    pub fn load(path: &Path, role: KeyRole, active: bool) -> Result<Self, KeyError> {
        let pem = std::fs::read(path).map_err(|source| KeyError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_pem(&pem, role, active).map_err(|reason| KeyError::Format {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parse PEM text (`-----BEGIN PRIVATE KEY-----`, PKCS#8).
    pub fn from_pem(pem: &[u8], role: KeyRole, active: bool) -> Result<Self, String> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem)
            .map_err(|e| format!("not a PKCS#8 PEM private key ({e})"))?;
        Self::from_pkcs8(&der, role, active)
    }

    /// From PKCS#8 DER: ECDSA P-256 or Ed25519.
    pub fn from_pkcs8(
        der: &PrivatePkcs8KeyDer<'_>,
        role: KeyRole,
        active: bool,
    ) -> Result<Self, String> {
        let key: Box<dyn SigningKey> =
            match EcdsaSigningKey::from_pkcs8(der, Algorithm::ECDSAP256SHA256) {
                Ok(k) => Box::new(k),
                Err(_) => match Ed25519SigningKey::from_pkcs8(der) {
                    Ok(k) => Box::new(k),
                    Err(_) => {
                        return Err(
                            "the key is neither ECDSA P-256 (algorithm 13) nor Ed25519 (15)".into(),
                        );
                    }
                },
            };
        let public = key.to_public_key().map_err(|e| e.to_string())?;
        let dnskey = DNSKEY::with_flags(role.flags(), public);
        let tag = dnskey.calculate_key_tag().map_err(|e| e.to_string())?;
        Ok(Self {
            role,
            active,
            dnskey,
            tag,
            key,
        })
    }

    /// The DS RDATA (SHA-256) for the parent zone.
    pub fn ds(&self, apex: &hickory_proto::rr::Name) -> Result<DS, KeyError> {
        let digest = self
            .dnskey
            .to_digest(apex, DigestType::SHA256)
            .map_err(crypto)?;
        Ok(DS::new(
            self.tag,
            self.key.algorithm(),
            DigestType::SHA256,
            digest.as_ref().to_vec(),
        ))
    }

    /// The CDS RDATA (RFC 7344): the DS the parent should publish.
    pub fn cds(&self, apex: &hickory_proto::rr::Name) -> Result<CDS, KeyError> {
        let ds = self.ds(apex)?;
        Ok(CDS::new(
            ds.key_tag(),
            Some(ds.algorithm()),
            ds.digest_type(),
            ds.digest().to_vec(),
        ))
    }

    /// The CDNSKEY RDATA (RFC 7344).
    pub fn cdnskey(&self) -> CDNSKEY {
        CDNSKEY::with_flags(
            self.dnskey.flags(),
            Some(self.key.algorithm()),
            self.dnskey.public_key().public_bytes().to_vec(),
        )
    }
}

/// Generate a new private key: PKCS#8 DER.
pub fn generate(alg: KeyAlgorithm) -> Result<PrivatePkcs8KeyDer<'static>, KeyError> {
    match alg {
        KeyAlgorithm::Ecdsap256 => {
            EcdsaSigningKey::generate_pkcs8(Algorithm::ECDSAP256SHA256).map_err(crypto)
        }
        KeyAlgorithm::Ed25519 => Ed25519SigningKey::generate_pkcs8().map_err(crypto),
    }
}

/// PEM text of a PKCS#8 key (`-----BEGIN PRIVATE KEY-----`).
pub fn to_pem(der: &PrivatePkcs8KeyDer<'_>) -> String {
    let b64 = data_encoding::BASE64.encode(der.secret_pkcs8_der());
    let mut s = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(chunk));
        s.push('\n');
    }
    s.push_str("-----END PRIVATE KEY-----\n");
    s
}

/// The public key in DNSKEY presentation (base64).
pub fn public_base64(k: &ZoneKey) -> String {
    data_encoding::BASE64.encode(k.dnskey.public_key().public_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_through_pem() {
        for (alg, n) in [(KeyAlgorithm::Ecdsap256, 13u8), (KeyAlgorithm::Ed25519, 15)] {
            let der = generate(alg).expect("generate");
            let pem = to_pem(&der);
            let k = ZoneKey::from_pem(pem.as_bytes(), KeyRole::Csk, true).expect("parse");
            assert_eq!(u8::from(k.key.algorithm()), n);
            assert_eq!(k.dnskey.flags(), 257);
            assert!(k.dnskey.secure_entry_point());
            let z = ZoneKey::from_pem(pem.as_bytes(), KeyRole::Zsk, true).expect("parse");
            assert_eq!(z.dnskey.flags(), 256);
            assert_ne!(k.tag, z.tag, "the SEP flag changes the key tag");
        }
    }

    #[test]
    fn garbage_is_refused() {
        assert!(ZoneKey::from_pem(b"not a key", KeyRole::Zsk, true).is_err());
        let rsa_like = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(ZoneKey::from_pem(rsa_like.as_bytes(), KeyRole::Zsk, true).is_err());
    }
}
