//! TSIG (RFC 8945): HMAC-SHA256/384/512 over raw DNS messages, with ring.
//!
//! Pure functions over bytes: find the TSIG record of a request, verify it,
//! and sign responses (the first with the request's MAC, each later message
//! of a zone transfer with the previous MAC and only the timers, §5.3.1).
//! Truncated MACs are not accepted.

use std::collections::HashMap;

use hickory_proto::op::Header;
use hickory_proto::rr::rdata::tsig::TsigAlgorithm;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use ring::hmac;

/// TSIG error codes (RFC 8945 §3).
pub const BADSIG: u16 = 16;
/// Unknown key.
pub const BADKEY: u16 = 17;
/// Time outside the fudge.
pub const BADTIME: u16 = 18;

/// The default fudge, seconds.
pub const FUDGE: u16 = 300;

/// A shared secret.
#[derive(Clone)]
pub struct Key {
    /// Key name, lowercase, fully qualified.
    pub name: Name,
    /// Algorithm name as sent on the wire (`hmac-sha256.`).
    pub algorithm: Name,
    key: hmac::Key,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("name", &self.name)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// A key from its name, algorithm (`hmac-sha256`, `hmac-sha384`,
    /// `hmac-sha512`) and secret.
    pub fn new(name: &str, algorithm: &str, secret: &[u8]) -> Result<Self, String> {
        let mut n =
            Name::from_ascii(name).map_err(|e| format!("invalid key name {name:?}: {e}"))?;
        n.set_fqdn(true);
        let (alg, ring_alg) = match algorithm.to_ascii_lowercase().trim_end_matches('.') {
            "hmac-sha256" => (TsigAlgorithm::HmacSha256, hmac::HMAC_SHA256),
            "hmac-sha384" => (TsigAlgorithm::HmacSha384, hmac::HMAC_SHA384),
            "hmac-sha512" => (TsigAlgorithm::HmacSha512, hmac::HMAC_SHA512),
            other => {
                return Err(format!(
                    "unsupported TSIG algorithm {other:?} (hmac-sha256, hmac-sha384, hmac-sha512)"
                ));
            }
        };
        if secret.is_empty() {
            return Err("empty TSIG secret".into());
        }
        Ok(Self {
            name: n.to_lowercase(),
            algorithm: alg.to_name(),
            key: hmac::Key::new(ring_alg, secret),
        })
    }
}

/// Keys by (lowercase) name.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: HashMap<Name, Key>,
}

impl Keyring {
    /// Add a key.
    pub fn insert(&mut self, key: Key) {
        self.keys.insert(key.name.clone(), key);
    }

    /// A key by name.
    pub fn get(&self, name: &Name) -> Option<&Key> {
        self.keys.get(&name.to_lowercase())
    }

    /// True when there is no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The TSIG record of a message.
#[derive(Debug, Clone)]
pub struct Signed {
    /// Key name.
    pub key_name: Name,
    /// Algorithm name.
    pub algorithm: Name,
    /// Time signed.
    pub time: u64,
    /// Fudge.
    pub fudge: u16,
    /// MAC.
    pub mac: Vec<u8>,
    /// Original message id.
    pub original_id: u16,
    /// TSIG error.
    pub error: u16,
    /// Other data.
    pub other: Vec<u8>,
    /// Offset of the TSIG record in the message.
    pub start: usize,
}

/// Find the TSIG record (the last additional record) of `msg`.
pub fn find(msg: &[u8]) -> Option<Signed> {
    let mut d = BinDecoder::new(msg);
    let h = Header::read(&mut d).ok()?;
    if h.counts.additionals == 0 {
        return None;
    }
    for _ in 0..h.counts.queries {
        hickory_proto::op::Query::read(&mut d).ok()?;
    }
    let total = usize::from(h.counts.answers)
        + usize::from(h.counts.authorities)
        + usize::from(h.counts.additionals);
    let mut last = None;
    for i in 0..total {
        let start = msg.len() - d.len();
        let r = Record::read(&mut d).ok()?;
        if i + 1 == total {
            last = Some((start, r));
        }
    }
    let (start, r) = last?;
    if r.record_type() != RecordType::TSIG {
        return None;
    }
    let RData::TSIG(t) = r.data else {
        return None;
    };
    Some(Signed {
        key_name: r.name.to_lowercase(),
        algorithm: t.algorithm.to_name(),
        time: t.time,
        fudge: t.fudge,
        mac: t.mac,
        original_id: t.oid,
        error: t.error.map_or(0, u16::from),
        other: t.other,
        start,
    })
}

fn name_wire(n: &Name, out: &mut Vec<u8>) {
    for label in n.to_lowercase().iter() {
        out.push(label.len() as u8);
        out.extend_from_slice(label);
    }
    out.push(0);
}

fn push_time(out: &mut Vec<u8>, time: u64) {
    out.extend_from_slice(&((time >> 32) as u16).to_be_bytes());
    out.extend_from_slice(&(time as u32).to_be_bytes());
}

/// The TSIG variables (§4.3.3) in the MAC input.
fn variables(
    out: &mut Vec<u8>,
    key: &Name,
    alg: &Name,
    time: u64,
    fudge: u16,
    error: u16,
    other: &[u8],
) {
    name_wire(key, out);
    out.extend_from_slice(&255u16.to_be_bytes()); // class ANY
    out.extend_from_slice(&0u32.to_be_bytes()); // TTL
    name_wire(alg, out);
    push_time(out, time);
    out.extend_from_slice(&fudge.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(other.len() as u16).to_be_bytes());
    out.extend_from_slice(other);
}

/// The message without its TSIG record: ARCOUNT less one, the original id.
fn unsigned_part(msg: &[u8], s: &Signed) -> Vec<u8> {
    let mut m = msg[..s.start].to_vec();
    m[0..2].copy_from_slice(&s.original_id.to_be_bytes());
    let ar = u16::from_be_bytes([m[10], m[11]]).saturating_sub(1);
    m[10..12].copy_from_slice(&ar.to_be_bytes());
    m
}

/// Why a request's TSIG was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// No such key (or another algorithm).
    #[error("unknown TSIG key")]
    BadKey,
    /// The MAC does not match.
    #[error("bad TSIG signature")]
    BadSig,
    /// The time is outside the fudge.
    #[error("TSIG time outside the fudge")]
    BadTime,
}

impl VerifyError {
    /// The TSIG error code.
    pub fn code(self) -> u16 {
        match self {
            Self::BadKey => BADKEY,
            Self::BadSig => BADSIG,
            Self::BadTime => BADTIME,
        }
    }
}

/// Verify a request's TSIG at `now` (seconds since the epoch). Returns the
/// key and the request MAC (which the response's MAC covers).
pub fn verify_request<'k>(
    ring: &'k Keyring,
    msg: &[u8],
    s: &Signed,
    now: u64,
) -> Result<&'k Key, VerifyError> {
    let key = ring.get(&s.key_name).ok_or(VerifyError::BadKey)?;
    if key.algorithm.to_lowercase() != s.algorithm.to_lowercase() {
        return Err(VerifyError::BadKey);
    }
    let mut data = unsigned_part(msg, s);
    variables(
        &mut data,
        &s.key_name,
        &s.algorithm,
        s.time,
        s.fudge,
        s.error,
        &s.other,
    );
    hmac::verify(&key.key, &data, &s.mac).map_err(|_| VerifyError::BadSig)?;
    if now.abs_diff(s.time) > u64::from(s.fudge) {
        return Err(VerifyError::BadTime);
    }
    Ok(key)
}

/// Where a signed message sits in an exchange.
#[derive(Debug, Clone, Copy)]
pub enum Position<'a> {
    /// A request (no prior MAC).
    Request,
    /// The first (or only) response: covers the request MAC.
    First(&'a [u8]),
    /// A later message of a transfer: covers the previous MAC, and only
    /// the timers.
    Next(&'a [u8]),
}

/// Append a TSIG record to `msg` (an encoded message without one), signed
/// with `key` at `time`; returns the MAC (for the next message).
pub fn sign(msg: &mut Vec<u8>, key: &Key, pos: Position<'_>, time: u64, error: u16) -> Vec<u8> {
    let original_id = u16::from_be_bytes([msg[0], msg[1]]);
    let mut data = Vec::with_capacity(msg.len() + 128);
    match pos {
        Position::Request => {}
        Position::First(prior) | Position::Next(prior) => {
            data.extend_from_slice(&(prior.len() as u16).to_be_bytes());
            data.extend_from_slice(prior);
        }
    }
    data.extend_from_slice(msg);
    match pos {
        Position::Next(_) => {
            push_time(&mut data, time);
            data.extend_from_slice(&FUDGE.to_be_bytes());
        }
        _ => variables(
            &mut data,
            &key.name,
            &key.algorithm,
            time,
            FUDGE,
            error,
            &[],
        ),
    }
    let mac = hmac::sign(&key.key, &data).as_ref().to_vec();
    append(
        msg,
        &key.name,
        &key.algorithm,
        time,
        &mac,
        original_id,
        error,
    );
    mac
}

/// Append an unsigned TSIG record carrying `error` (BADKEY, BADSIG answers).
pub fn append_error(msg: &mut Vec<u8>, s: &Signed, time: u64, error: u16) {
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    append(msg, &s.key_name, &s.algorithm, time, &[], id, error);
}

fn append(msg: &mut Vec<u8>, key: &Name, alg: &Name, time: u64, mac: &[u8], id: u16, error: u16) {
    let mut rdata = Vec::with_capacity(64 + mac.len());
    name_wire(alg, &mut rdata);
    push_time(&mut rdata, time);
    rdata.extend_from_slice(&FUDGE.to_be_bytes());
    rdata.extend_from_slice(&(mac.len() as u16).to_be_bytes());
    rdata.extend_from_slice(mac);
    rdata.extend_from_slice(&id.to_be_bytes());
    rdata.extend_from_slice(&error.to_be_bytes());
    rdata.extend_from_slice(&0u16.to_be_bytes());
    name_wire(key, msg);
    msg.extend_from_slice(&250u16.to_be_bytes()); // TSIG
    msg.extend_from_slice(&255u16.to_be_bytes()); // ANY
    msg.extend_from_slice(&0u32.to_be_bytes());
    msg.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    msg.extend_from_slice(&rdata);
    let ar = u16::from_be_bytes([msg[10], msg[11]]).saturating_add(1);
    msg[10..12].copy_from_slice(&ar.to_be_bytes());
}

/// Verify a signed response to our request (NOTIFY answers).
pub fn verify_response(key: &Key, msg: &[u8], request_mac: &[u8]) -> bool {
    let Some(s) = find(msg) else {
        return false;
    };
    if s.key_name != key.name {
        return false;
    }
    let mut data = Vec::with_capacity(msg.len() + 64);
    data.extend_from_slice(&(request_mac.len() as u16).to_be_bytes());
    data.extend_from_slice(request_mac);
    data.extend_from_slice(&unsigned_part(msg, &s));
    variables(
        &mut data,
        &s.key_name,
        &s.algorithm,
        s.time,
        s.fudge,
        s.error,
        &s.other,
    );
    hmac::verify(&key.key, &data, &s.mac).is_ok()
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, MessageType, OpCode, Query};

    fn key() -> Key {
        Key::new(
            "xfr-key",
            "hmac-sha256",
            b"0123456789abcdef0123456789abcdef",
        )
        .expect("key")
    }

    fn ring() -> Keyring {
        let mut r = Keyring::default();
        r.insert(key());
        r
    }

    fn request() -> Vec<u8> {
        let mut m = Message::new(4242, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii("example.test.").expect("n"),
            RecordType::AXFR,
        ));
        m.to_vec().expect("encode")
    }

    #[test]
    fn sign_then_verify_request() {
        let mut m = request();
        let t = 1_700_000_000;
        let mac = sign(&mut m, &key(), Position::Request, t, 0);
        let s = find(&m).expect("tsig found");
        assert_eq!(s.mac, mac);
        assert_eq!(s.original_id, 4242);
        assert!(verify_request(&ring(), &m, &s, t + 10).is_ok());
        assert_eq!(
            verify_request(&ring(), &m, &s, t + 301).err(),
            Some(VerifyError::BadTime)
        );
        // One flipped bit of the message breaks the MAC.
        let mut bad = m.clone();
        bad[13] ^= 1;
        let s2 = find(&bad).expect("tsig");
        assert_eq!(
            verify_request(&ring(), &bad, &s2, t).err(),
            Some(VerifyError::BadSig)
        );
        let other = Keyring::default();
        assert_eq!(
            verify_request(&other, &m, &s, t).err(),
            Some(VerifyError::BadKey)
        );
        // The message still decodes, with the TSIG as its last record.
        assert!(Message::from_vec(&m).is_ok());
    }

    #[test]
    fn response_chain_verifies() {
        let mut req = request();
        let t = 1_700_000_000;
        let req_mac = sign(&mut req, &key(), Position::Request, t, 0);
        let mut resp = request();
        resp[2] |= 0x80;
        let _ = sign(&mut resp, &key(), Position::First(&req_mac), t, 0);
        assert!(verify_response(&key(), &resp, &req_mac));
        assert!(!verify_response(&key(), &resp, b"other mac"));
    }
}
