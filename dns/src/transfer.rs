//! Zone transfers out (AXFR, RFC 5936; IXFR, RFC 1995) over TCP, access by
//! address list and TSIG key (RFC 8945), and TSIG-signed queries (the SOA
//! queries a secondary sends before a transfer).
//!
//! - Default deny: a zone without `[zones.transfer]` refuses every transfer.
//! - IXFR: meridian-dns keeps no journal, so an IXFR whose serial is older
//!   than the zone's gets the whole zone in AXFR form (RFC 1995 §4), and one
//!   whose serial is current gets the SOA alone.
//! - Steered names are transferred as the records of their default region
//!   (or, without one, of their first region): a secondary answers every
//!   client as one of unknown location would be answered.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use hickory_proto::op::{
    Header, HeaderCounts, Message, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_proto::rr::rdata::tsig::{TSIG, TsigAlgorithm, TsigError, make_tsig_record};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use ipnet::IpNet;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::config::{Config, Seg};
use crate::handler::Shared;
use crate::metrics::TransferLabels;
use crate::model::{FileSource, Model, resolve as resolve_path};
use crate::tsig::{self, Key, Keyring, Position};
use crate::zone::Zone;

/// Largest transfer message we build (RFC 5936 allows 65535).
const MESSAGE_BUDGET: usize = 16 * 1024;

/// Who may transfer one zone, and whom to NOTIFY.
#[derive(Debug, Clone, Default)]
pub struct ZoneAcl {
    /// Client networks allowed.
    pub allow: Vec<IpNet>,
    /// Keys of which one must sign the request (none: unsigned is fine).
    pub keys: Vec<Name>,
    /// Secondaries to NOTIFY, with the key to sign with.
    pub notify: Vec<(SocketAddr, Option<Name>)>,
}

impl ZoneAcl {
    /// Is a transfer from `ip`, signed with `key` (verified), allowed?
    pub fn allows(&self, ip: IpAddr, key: Option<&Name>) -> bool {
        if self.allow.is_empty() && self.keys.is_empty() {
            return false;
        }
        let addr_ok = self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip));
        let key_ok = self.keys.is_empty() || key.is_some_and(|k| self.keys.contains(k));
        addr_ok && key_ok
    }
}

/// Transfer and NOTIFY settings of every zone, and the TSIG keys.
#[derive(Debug, Clone, Default)]
pub struct Transfers {
    /// The keys.
    pub keyring: Keyring,
    /// By zone apex.
    pub zones: HashMap<LowerName, ZoneAcl>,
}

fn fqdn(s: &str) -> Option<Name> {
    let mut n = Name::from_ascii(s).ok()?;
    n.set_fqdn(true);
    Some(n.to_lowercase())
}

/// Resolve `[[tsig_keys]]` and each zone's `transfer` and `notify`.
pub fn resolve(
    config: &Config,
    base: &Path,
    files: &dyn FileSource,
) -> (Transfers, Vec<(Vec<Seg<'static>>, String)>) {
    use Seg::{Idx, Key as K};
    let mut out = Transfers::default();
    let mut problems = Vec::new();
    let mut names = Vec::new();
    for (i, k) in config.tsig_keys.iter().enumerate() {
        let at = |key: &'static str| vec![K("tsig_keys"), Idx(i), K(key)];
        let secret = match (&k.secret, &k.secret_file) {
            (Some(s), None) => s.trim().to_owned(),
            (None, Some(f)) => {
                let p: PathBuf = resolve_path(base, f);
                match files.read_to_string(&p) {
                    Ok(t) => t.trim().to_owned(),
                    Err(e) => {
                        problems.push((
                            at("secret_file"),
                            format!("cannot read {}: {e}", p.display()),
                        ));
                        continue;
                    }
                }
            }
            _ => {
                problems.push((at("name"), "set one of `secret` and `secret_file`".into()));
                continue;
            }
        };
        let bytes = match data_encoding::BASE64.decode(secret.as_bytes()) {
            Ok(b) => b,
            Err(e) => {
                let key = if k.secret.is_some() {
                    "secret"
                } else {
                    "secret_file"
                };
                problems.push((at(key), format!("the secret is not base64: {e}")));
                continue;
            }
        };
        match Key::new(&k.name, &k.algorithm, &bytes) {
            Ok(key) => {
                if names.contains(&key.name) {
                    problems.push((
                        at("name"),
                        format!("TSIG key {} is defined twice", key.name),
                    ));
                }
                names.push(key.name.clone());
                out.keyring.insert(key);
            }
            Err(e) => problems.push((at("algorithm"), e)),
        }
    }
    for (i, z) in config.zones.iter().enumerate() {
        let Some(origin) = fqdn(&z.origin) else {
            continue;
        };
        let mut acl = ZoneAcl::default();
        for (j, a) in z.transfer.allow.iter().enumerate() {
            let parsed = a
                .parse::<IpNet>()
                .or_else(|_| a.parse::<IpAddr>().map(IpNet::from));
            match parsed {
                Ok(n) => acl.allow.push(n),
                Err(_) => problems.push((
                    vec![K("zones"), Idx(i), K("transfer"), K("allow"), Idx(j)],
                    format!("{a:?} is not an address or network"),
                )),
            }
        }
        for (j, k) in z.transfer.keys.iter().enumerate() {
            match fqdn(k).filter(|n| names.contains(n)) {
                Some(n) => acl.keys.push(n),
                None => problems.push((
                    vec![K("zones"), Idx(i), K("transfer"), K("keys"), Idx(j)],
                    format!("unknown TSIG key {k:?} (define it in [[tsig_keys]])"),
                )),
            }
        }
        for (j, n) in z.notify.iter().enumerate() {
            let key = match &n.key {
                None => None,
                Some(k) => match fqdn(k).filter(|n| names.contains(n)) {
                    Some(n) => Some(n),
                    None => {
                        problems.push((
                            vec![K("zones"), Idx(i), K("notify"), Idx(j), K("key")],
                            format!("unknown TSIG key {k:?} (define it in [[tsig_keys]])"),
                        ));
                        None
                    }
                },
            };
            acl.notify.push((n.address, key));
        }
        out.zones.insert(LowerName::new(&origin), acl);
    }
    (out, problems)
}

/// An AXFR or IXFR query (one question, opcode QUERY).
pub fn is_transfer(req: &Request) -> bool {
    req.metadata.op_code == OpCode::Query
        && matches!(
            req.queries.queries(),
            [q] if matches!(q.query_type(), RecordType::AXFR | RecordType::IXFR)
        )
}

/// A request carrying a TSIG record.
pub fn is_signed(req: &Request) -> bool {
    req.signature.is_some()
        || req
            .additionals
            .last()
            .is_some_and(|r| r.record_type() == RecordType::TSIG)
}

/// The records of `zone` for a transfer, SOA first and not repeated; the
/// steered names inside it as their default region's addresses.
pub fn zone_records(model: &Model, zone: &Zone) -> Vec<Record> {
    let mut out = vec![zone.soa().clone()];
    out.extend(
        zone.records()
            .filter(|r| r.record_type() != RecordType::SOA)
            .cloned(),
    );
    let mut steered: Vec<_> = model
        .steered
        .iter()
        .filter(|(n, _)| zone.origin().zone_of(n))
        .collect();
    steered.sort_by(|a, b| a.0.cmp(b.0));
    for (_, st) in steered {
        let Some(region) = st
            .policy
            .default_region
            .or_else(|| st.policy.regions.first().copied())
            .and_then(|i| model.regions.get(i))
        else {
            continue;
        };
        out.extend(
            region
                .a
                .iter()
                .filter(|(_, w)| *w > 0)
                .take(st.policy.max_answers)
                .map(|(ip, _)| Record::from_rdata(st.name.clone(), st.ttl, RData::A(A(*ip)))),
        );
        out.extend(
            region
                .aaaa
                .iter()
                .filter(|(_, w)| *w > 0)
                .take(st.policy.max_answers)
                .map(|(ip, _)| Record::from_rdata(st.name.clone(), st.ttl, RData::AAAA(AAAA(*ip)))),
        );
    }
    out
}

fn soa_serial(r: &Record) -> Option<u32> {
    match &r.data {
        RData::SOA(s) => Some(s.serial),
        _ => None,
    }
}

/// `a` is at least as new as `b` in serial arithmetic (RFC 1982).
fn serial_ge(a: u32, b: u32) -> bool {
    a == b || (a.wrapping_sub(b) as i32) > 0
}

fn response(req: &Request, rcode: ResponseCode, with_query: bool) -> Message {
    let mut m = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
    m.metadata.authoritative = rcode == ResponseCode::NoError;
    m.metadata.response_code = rcode;
    m.metadata.recursion_desired = req.metadata.recursion_desired;
    if with_query && let Some(q) = req.queries.queries().first() {
        m.add_query(q.original().clone());
    }
    m
}

/// Serve an AXFR or IXFR request on a TCP connection.
pub async fn serve_tcp(
    shared: &Shared,
    req: &Request,
    stream: &mut TcpStream,
    idle: std::time::Duration,
) -> std::io::Result<()> {
    let rt = shared.runtime.load_full();
    let model = &rt.model;
    let Some(q) = req.queries.queries().first() else {
        return Ok(());
    };
    let qtype = if q.query_type() == RecordType::IXFR {
        "IXFR"
    } else {
        "AXFR"
    };
    let count = |result: &'static str| {
        shared
            .metrics
            .ops
            .transfers
            .get_or_create(&TransferLabels { qtype, result })
            .inc();
    };
    let raw = req.as_slice();
    let now = tsig::now();
    // TSIG first: a bad signature is answered NOTAUTH with the TSIG error,
    // unsigned (RFC 8945 §5.2).
    let mut key: Option<(&Key, Vec<u8>)> = None;
    if let Some(s) = tsig::find(raw) {
        match tsig::verify_request(&model.transfer.keyring, raw, &s, now) {
            Ok(k) => key = Some((k, s.mac.clone())),
            Err(e) => {
                count("notauth");
                info!(src = %req.src(), zone = %q.name(), error = %e, "zone transfer: TSIG refused");
                let mut m = response(req, ResponseCode::NotAuth, true)
                    .to_vec()
                    .map_err(std::io::Error::other)?;
                tsig::append_error(&mut m, &s, now, e.code());
                return crate::tcp::write_frame(stream, &m, idle).await;
            }
        }
    }
    let send =
        |m: &Message, prior: Option<&[u8]>, first: bool| -> std::io::Result<(Vec<u8>, Vec<u8>)> {
            let mut bytes = m.to_vec().map_err(std::io::Error::other)?;
            let mac = match (&key, prior) {
                (Some((k, _)), Some(p)) => {
                    let pos = if first {
                        Position::First(p)
                    } else {
                        Position::Next(p)
                    };
                    tsig::sign(&mut bytes, k, pos, now, 0)
                }
                _ => Vec::new(),
            };
            Ok((bytes, mac))
        };
    let request_mac = key.as_ref().map(|(_, m)| m.clone());
    let zone = model.zones.iter().find(|z| z.origin() == q.name());
    let acl = model.transfer.zones.get(q.name());
    let (Some(zone), Some(acl)) = (zone, acl) else {
        count("notauth");
        let (m, _) = send(
            &response(req, ResponseCode::NotAuth, true),
            request_mac.as_deref(),
            true,
        )?;
        return crate::tcp::write_frame(stream, &m, idle).await;
    };
    if !acl.allows(req.src().ip(), key.as_ref().map(|(k, _)| &k.name)) {
        count("refused");
        info!(src = %req.src(), zone = %q.name(), signed = key.is_some(), "zone transfer refused");
        let (m, _) = send(
            &response(req, ResponseCode::Refused, true),
            request_mac.as_deref(),
            true,
        )?;
        return crate::tcp::write_frame(stream, &m, idle).await;
    }
    let ours = soa_serial(zone.soa()).unwrap_or(0);
    if q.query_type() == RecordType::IXFR {
        let theirs = req.authorities.iter().find_map(soa_serial);
        if theirs.is_some_and(|t| serial_ge(t, ours)) {
            count("ok");
            let mut m = response(req, ResponseCode::NoError, true);
            m.answers.push(zone.soa().clone());
            let (b, _) = send(&m, request_mac.as_deref(), true)?;
            return crate::tcp::write_frame(stream, &b, idle).await;
        }
    }
    let mut records = zone_records(model, zone);
    records.push(zone.soa().clone());
    let mut prior = request_mac.clone();
    let mut first = true;
    let mut chunk: Vec<Record> = Vec::new();
    let mut size = 0usize;
    let n = records.len();
    for (i, r) in records.into_iter().enumerate() {
        // A rough size: enough to keep each message well under 64 KiB.
        let est = 64 + r.data.to_string().len() + r.name.to_string().len();
        chunk.push(r);
        size += est;
        if size >= MESSAGE_BUDGET || i + 1 == n {
            let mut m = response(req, ResponseCode::NoError, first);
            m.answers = std::mem::take(&mut chunk);
            let (b, mac) = send(&m, prior.as_deref(), first)?;
            crate::tcp::write_frame(stream, &b, idle).await?;
            if key.is_some() {
                prior = Some(mac);
            }
            first = false;
            size = 0;
        }
    }
    count("ok");
    info!(src = %req.src(), zone = %q.name(), qtype, serial = ours, records = n, signed = key.is_some(), "zone transferred");
    Ok(())
}

/// Answer a TSIG-signed query (not a transfer): verify, answer as usual,
/// and sign the answer with the same key.
pub async fn respond_signed<R: ResponseHandler>(
    shared: &Shared,
    request: &Request,
    mut rh: R,
) -> ResponseInfo {
    let rt = shared.runtime.load();
    let geo = shared.geo.load();
    let raw = request.as_slice();
    let now = tsig::now();
    let header_only = |rcode: ResponseCode| {
        let mut md = Metadata::response_from_request(&request.metadata);
        md.response_code = rcode;
        ResponseInfo::from(Header {
            metadata: md,
            counts: HeaderCounts::default(),
        })
    };
    let Some(s) = tsig::find(raw) else {
        return header_only(ResponseCode::FormErr);
    };
    let verified = tsig::verify_request(&rt.model.transfer.keyring, raw, &s, now);
    let key = match verified {
        Ok(k) => k,
        Err(e) => {
            debug!(src = %request.src(), error = %e, "TSIG-signed query refused");
            let mut md = Metadata::response_from_request(&request.metadata);
            md.response_code = ResponseCode::NotAuth;
            let mut resp = MessageResponseBuilder::new(&request.queries, None).build_no_records(md);
            resp.set_signature(Box::new(make_tsig_record(
                s.key_name.clone(),
                TSIG::new(
                    TsigAlgorithm::from_name(s.algorithm.clone()),
                    now,
                    tsig::FUDGE,
                    Vec::new(),
                    request.metadata.id,
                    Some(TsigError::from(e.code())),
                    Vec::new(),
                ),
            )));
            return match rh.send_response(resp).await {
                Ok(i) => i,
                Err(_) => header_only(ResponseCode::NotAuth),
            };
        }
    };
    let p = rt.respond(
        &geo,
        request,
        request.src(),
        request.protocol(),
        std::time::Instant::now(),
    );
    if p.drop {
        return header_only(p.metadata.response_code);
    }
    let mut bytes = match p.encode(&request.queries, u16::MAX) {
        Ok((b, _)) => b,
        Err(e) => {
            warn!(error = %e, "encoding a signed response failed");
            return header_only(ResponseCode::ServFail);
        }
    };
    let mac = tsig::sign(&mut bytes, key, Position::First(&s.mac), now, 0);
    let mut resp = MessageResponseBuilder::new(&request.queries, p.edns.as_ref()).build(
        p.metadata,
        p.answers.iter(),
        p.authorities.iter(),
        std::iter::empty(),
        p.additionals.iter(),
    );
    resp.set_signature(Box::new(make_tsig_record(
        key.name.clone(),
        TSIG::new(
            TsigAlgorithm::from_name(key.algorithm.clone()),
            now,
            tsig::FUDGE,
            mac,
            request.metadata.id,
            None,
            Vec::new(),
        ),
    )));
    match rh.send_response(resp).await {
        Ok(i) => i,
        Err(e) => {
            warn!(error = %e, "failed to send a signed response");
            header_only(ResponseCode::ServFail)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_deny_and_both_conditions() {
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let key = Name::from_ascii("k.").expect("n");
        assert!(!ZoneAcl::default().allows(ip, Some(&key)));
        let by_addr = ZoneAcl {
            allow: vec!["192.0.2.0/24".parse().expect("net")],
            ..Default::default()
        };
        assert!(by_addr.allows(ip, None));
        assert!(!by_addr.allows("198.51.100.1".parse().expect("ip"), None));
        let both = ZoneAcl {
            allow: vec!["192.0.2.0/24".parse().expect("net")],
            keys: vec![key.clone()],
            ..Default::default()
        };
        assert!(!both.allows(ip, None));
        assert!(both.allows(ip, Some(&key)));
        assert!(!both.allows(ip, Some(&Name::from_ascii("other.").expect("n"))));
    }

    #[test]
    fn serial_arithmetic() {
        assert!(serial_ge(5, 5));
        assert!(serial_ge(6, 5));
        assert!(!serial_ge(5, 6));
        assert!(serial_ge(1, u32::MAX));
    }
}
