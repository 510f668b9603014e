//! The query path: a hickory [`RequestHandler`] over a pure-ish
//! [`Runtime::respond`] that turns one request into a prepared response
//! (authoritative lookup, steering, ECS, EDNS, truncation, RRL).

use std::hash::{Hash, Hasher};
use std::iter;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_proto::rr::rdata::{A, AAAA, HINFO};
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageRequest, MessageResponseBuilder, Queries};
use tracing::{debug, warn};

use crate::geo::{GeoDb, GeoInfo};
use crate::health::{HealthTable, RegionHealth};
use crate::metrics::{
    EcsLabels, Metrics, QueryLabels, RrlLabels, intern, qtype_label, rcode_label,
};
use crate::model::Model;
use crate::rrl::{Limiter, Verdict};
use crate::steering::{self, Decision, Reason, RegionState};
use crate::zone::Lookup;

/// Longest CNAME chain followed inside our zones.
const MAX_CHAIN: usize = 8;

/// A model bound to live health entries and a rate limiter.
#[derive(Debug)]
pub struct Runtime {
    /// The configuration-derived data.
    pub model: Model,
    /// Health entries, index-aligned with `model.regions`.
    pub health: Vec<Arc<RegionHealth>>,
    /// Region names as metric labels, index-aligned with `model.regions`.
    pub labels: Vec<&'static str>,
    /// RRL, if enabled.
    pub rrl: Option<Limiter>,
}

impl Runtime {
    /// Bind a model to the health table.
    pub fn new(model: Model, table: &HealthTable) -> Self {
        let health = model
            .regions
            .iter()
            .map(|r| table.get_or_create(&r.name))
            .collect();
        let labels = model.regions.iter().map(|r| intern(&r.name)).collect();
        let rrl = model
            .config
            .rrl
            .enabled
            .then(|| Limiter::new(model.config.rrl.clone()));
        Self {
            model,
            health,
            labels,
            rrl,
        }
    }

    /// Health snapshot, index-aligned with the regions.
    pub fn states(&self) -> Vec<RegionState> {
        self.health.iter().map(|h| h.state()).collect()
    }
}

/// A response ready to encode.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Header flags and rcode (low bits; high bits travel in `edns`).
    pub metadata: Metadata,
    /// Answer section.
    pub answers: Vec<Record>,
    /// Authority section.
    pub authorities: Vec<Record>,
    /// Additional section (without OPT).
    pub additionals: Vec<Record>,
    /// OPT for the response.
    pub edns: Option<Edns>,
    /// Send nothing (RRL drop, or a response received as a query).
    pub drop: bool,
    /// Region label for metrics (`none` when not steered).
    pub region: &'static str,
    /// Whether ECS was used.
    pub ecs: Option<EcsLabels>,
    /// RRL action taken.
    pub rrl: Option<&'static str>,
}

impl Prepared {
    fn new(req: &Metadata) -> Self {
        let mut metadata = Metadata::response_from_request(req);
        metadata.recursion_available = false;
        Self {
            metadata,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            edns: None,
            drop: false,
            region: "none",
            ecs: None,
            rrl: None,
        }
    }

    fn rcode(mut self, rcode: ResponseCode) -> Self {
        self.metadata.response_code = rcode;
        if let Some(e) = &mut self.edns {
            e.set_rcode_high(rcode.high());
        }
        self
    }

    /// Keep only the header, question and OPT, with TC set.
    fn truncate(&mut self) {
        self.answers.clear();
        self.authorities.clear();
        self.additionals.clear();
        self.metadata.truncation = true;
    }

    /// Encode with `max` bytes at most; returns the bytes and whether
    /// records were left out.
    pub fn encode(&self, queries: &Queries, max: u16) -> Result<(Vec<u8>, bool), String> {
        let mut buf = Vec::with_capacity(512);
        let mut enc = BinEncoder::new(&mut buf);
        enc.set_max_size(max);
        let resp = MessageResponseBuilder::new(queries, self.edns.as_ref()).build(
            self.metadata,
            self.answers.iter(),
            self.authorities.iter(),
            iter::empty(),
            self.additionals.iter(),
        );
        let info = resp.destructive_emit(&mut enc).map_err(|e| e.to_string())?;
        Ok((buf, info.truncation))
    }
}

/// Inputs for one steered answer.
struct Steer<'a> {
    client: &'a GeoInfo,
    seed: u64,
}

/// The result of the authoritative resolution.
struct Resolution {
    rcode: ResponseCode,
    authoritative: bool,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
    steered_region: Option<&'static str>,
    steered: bool,
}

fn seed_of(id: u16, ip: IpAddr) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    ip.hash(&mut h);
    h.finish()
}

/// Owner-name case: records at the queried name take the query's spelling.
fn renamed(rs: &[Record], owner: &Name) -> impl Iterator<Item = Record> {
    rs.iter().map(move |r| {
        let mut r = r.clone();
        r.name = owner.clone();
        r
    })
}

impl Runtime {
    /// Decide for a steered name (pure given the snapshot).
    pub fn decide(&self, steered: &crate::model::Steered, client: &GeoInfo, seed: u64) -> Decision {
        steering::decide(
            &steered.policy,
            &self.model.regions,
            &self.states(),
            client,
            seed,
        )
    }

    fn resolve(&self, qname: &Name, qtype: RecordType, steer: &Steer<'_>) -> Resolution {
        let mut res = Resolution {
            rcode: ResponseCode::NoError,
            authoritative: true,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            steered_region: None,
            steered: false,
        };
        let mut name = qname.clone();
        let mut seen: Vec<LowerName> = Vec::new();
        for _hop in 0..=MAX_CHAIN {
            let lname = LowerName::new(&name);
            let Some(zone) = self.model.zones.find(&lname) else {
                // A CNAME led out of our zones: stop; the resolver follows it.
                if res.answers.is_empty() {
                    res.rcode = ResponseCode::Refused;
                    res.authoritative = false;
                }
                return res;
            };
            if seen.contains(&lname) {
                // CNAME loop: answer what we have.
                return res;
            }
            seen.push(lname.clone());

            if qtype == RecordType::ANY {
                // RFC 8482: one synthesized HINFO for any existing name.
                match zone.lookup(&lname, RecordType::CNAME) {
                    Lookup::Records(rs) => res.answers.extend(renamed(rs, &name)),
                    Lookup::Synthesized(rs) => res.answers.extend(rs),
                    Lookup::NxDomain => {
                        res.rcode = ResponseCode::NXDomain;
                        res.authorities.push(zone.negative_soa());
                    }
                    Lookup::Referral(ns) => {
                        res.authoritative = false;
                        res.authorities.extend(ns.iter().cloned());
                    }
                    Lookup::NoData | Lookup::Cname(_) => {
                        let ttl = zone.negative_soa().ttl;
                        res.answers.push(Record::from_rdata(
                            name.clone(),
                            ttl,
                            RData::HINFO(HINFO::new("RFC8482".into(), String::new())),
                        ));
                    }
                }
                return res;
            }

            if matches!(qtype, RecordType::A | RecordType::AAAA)
                && let Some(st) = self.model.steered.get(&lname)
            {
                let d = self.decide(st, steer.client, steer.seed);
                res.steered = true;
                res.steered_region = d.region.and_then(|r| self.labels.get(r).copied());
                if d.reason == Reason::FailClosed {
                    res.steered_region = Some("fail-closed");
                    res.rcode = ResponseCode::ServFail;
                    res.answers.clear();
                    return res;
                }
                if d.reason == Reason::FailOpen {
                    res.steered_region = Some("fail-open");
                }
                let before = res.answers.len();
                if qtype == RecordType::A {
                    res.answers.extend(
                        d.a.iter()
                            .map(|ip| Record::from_rdata(name.clone(), st.ttl, RData::A(A(*ip)))),
                    );
                } else {
                    res.answers.extend(d.aaaa.iter().map(|ip| {
                        Record::from_rdata(name.clone(), st.ttl, RData::AAAA(AAAA(*ip)))
                    }));
                }
                if res.answers.len() == before {
                    // The region has no address of this family: NODATA.
                    res.authorities.push(zone.negative_soa());
                }
                return res;
            }

            if let Some(rs) = self.model.dnssec.apex_records(&lname, qtype) {
                res.answers.extend(renamed(rs, &name));
                return res;
            }
            match zone.lookup(&lname, qtype) {
                Lookup::Records(rs) => {
                    res.answers.extend(renamed(rs, &name));
                    return res;
                }
                Lookup::Synthesized(rs) => {
                    res.answers.extend(rs.into_iter().map(|mut r| {
                        r.name = name.clone();
                        r
                    }));
                    return res;
                }
                Lookup::Cname(c) => {
                    let mut c = c.clone();
                    c.name = name.clone();
                    let target = match &c.data {
                        RData::CNAME(t) => t.0.clone(),
                        _ => return res,
                    };
                    res.answers.push(c);
                    name = target;
                }
                Lookup::NoData => {
                    res.authorities.push(zone.negative_soa());
                    return res;
                }
                Lookup::NxDomain => {
                    res.rcode = ResponseCode::NXDomain;
                    res.authorities.push(zone.negative_soa());
                    return res;
                }
                Lookup::Referral(ns) => {
                    // Not authoritative below a cut; glue from our data.
                    if res.answers.is_empty() {
                        res.authoritative = false;
                    }
                    res.authorities.extend(ns.iter().cloned());
                    for n in ns {
                        if let RData::NS(target) = &n.data {
                            let t = LowerName::new(&target.0);
                            if let Some(z) = self.model.zones.find(&t) {
                                for gt in [RecordType::A, RecordType::AAAA] {
                                    if let Lookup::Records(g) = z.lookup_glue(&t, gt) {
                                        res.additionals.extend(g.iter().cloned());
                                    }
                                }
                            }
                        }
                    }
                    return res;
                }
            }
        }
        res
    }

    /// Build the response to one request. `now` drives RRL.
    pub fn respond(
        &self,
        geo: &GeoDb,
        req: &MessageRequest,
        src: SocketAddr,
        protocol: Protocol,
        now: Instant,
    ) -> Prepared {
        let mut p = Prepared::new(&req.metadata);
        if req.metadata.message_type != MessageType::Query {
            p.drop = true;
            return p;
        }
        let cfg = &self.model.config;

        // EDNS (RFC 6891).
        let mut udp_limit: u16 = 512;
        if let Some(e) = &req.edns {
            let mut resp = Edns::new();
            resp.set_max_payload(cfg.server.udp_max_payload.max(512));
            resp.set_version(0);
            // RFC 3225: the DO bit is copied into the response.
            resp.set_dnssec_ok(e.flags().dnssec_ok);
            udp_limit = e
                .max_payload()
                .max(512)
                .min(cfg.server.udp_max_payload.max(512));
            p.edns = Some(resp);
            if e.version() > 0 {
                return self.finish(
                    p.rcode(ResponseCode::BADVERS),
                    req,
                    src,
                    protocol,
                    now,
                    udp_limit,
                );
            }
        }
        if req.metadata.op_code != OpCode::Query {
            return self.finish(
                p.rcode(ResponseCode::NotImp),
                req,
                src,
                protocol,
                now,
                udp_limit,
            );
        }
        let [query] = req.queries.queries() else {
            return self.finish(
                p.rcode(ResponseCode::FormErr),
                req,
                src,
                protocol,
                now,
                udp_limit,
            );
        };
        let qtype = query.query_type();
        let qname = query.original().name().clone();
        if query.query_class() != DNSClass::IN
            || matches!(qtype, RecordType::AXFR | RecordType::IXFR)
            || self.model.zones.find(query.name()).is_none()
        {
            return self.finish(
                p.rcode(ResponseCode::Refused),
                req,
                src,
                protocol,
                now,
                udp_limit,
            );
        }

        // ECS (RFC 7871).
        let mut client_ip = src.ip();
        let mut ecs_in: Option<ClientSubnet> = None;
        if let Some(EdnsOption::Subnet(cs)) =
            req.edns.as_ref().and_then(|e| e.option(EdnsCode::Subnet))
        {
            let family = if cs.addr().is_ipv4() { "v4" } else { "v6" };
            let max = if cs.addr().is_ipv4() { 32 } else { 128 };
            if !cfg.ecs.enabled {
                p.ecs = Some(EcsLabels {
                    family,
                    result: "disabled",
                });
            } else if cs.source_prefix() > max || cs.scope_prefix() != 0 {
                p.ecs = Some(EcsLabels {
                    family,
                    result: "invalid",
                });
                return self.finish(
                    p.rcode(ResponseCode::FormErr),
                    req,
                    src,
                    protocol,
                    now,
                    udp_limit,
                );
            } else {
                p.ecs = Some(EcsLabels {
                    family,
                    result: "used",
                });
                let masked =
                    crate::rrl::prefix_of(cs.addr(), cs.source_prefix(), cs.source_prefix()).0;
                if cs.source_prefix() > 0 {
                    client_ip = masked;
                }
                ecs_in = Some(ClientSubnet::new(masked, cs.source_prefix(), 0));
            }
        }

        let client = geo.lookup(client_ip);
        let steer = Steer {
            client: &client,
            seed: seed_of(req.metadata.id, client_ip),
        };
        let res = self.resolve(&qname, qtype, &steer);
        p.metadata.authoritative = res.authoritative;
        p.answers = res.answers;
        p.authorities = res.authorities;
        p.additionals = res.additionals;
        p.region = res.steered_region.unwrap_or("none");
        let mut rcode = res.rcode;
        if req.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok)
            && matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain)
        {
            rcode = self.sign(&qname, qtype, rcode, &mut p);
        }
        if let (Some(mut cs), Some(edns)) = (ecs_in, p.edns.as_mut()) {
            // Scope: the GeoIP network's prefix for steered answers (capped),
            // 0 for answers that do not depend on the client.
            if res.steered && cs.source_prefix() > 0 {
                let cap = if cs.addr().is_ipv4() {
                    cfg.ecs.max_scope_v4
                } else {
                    cfg.ecs.max_scope_v6
                };
                cs.set_scope_prefix(client.prefix_len.min(cap));
            }
            edns.options_mut().insert(EdnsOption::Subnet(cs));
        }
        let p = p.rcode(rcode);
        self.finish(p, req, src, protocol, now, udp_limit)
    }

    /// DNSSEC for a DO query: RRSIGs and compact denial (`dnssec.rs`).
    /// Returns the response code (NXDOMAIN becomes NOERROR, RFC 9824).
    fn sign(
        &self,
        qname: &Name,
        qtype: RecordType,
        rcode: ResponseCode,
        p: &mut Prepared,
    ) -> ResponseCode {
        let signers = &self.model.dnssec;
        if signers.is_empty() {
            return rcode;
        }
        // What exists at a name: zone data, the steered families, the keys.
        let types_at = |zone: &crate::zone::Zone, name: &LowerName| {
            let mut t = crate::dnssec::zone_types(zone, name);
            if let Some(st) = self.model.steered.get(name) {
                let regions = || {
                    st.policy
                        .regions
                        .iter()
                        .filter_map(|r| self.model.regions.get(*r))
                };
                if regions().any(|r| !r.a.is_empty()) {
                    t.push(RecordType::A);
                }
                if regions().any(|r| !r.aaaa.is_empty()) {
                    t.push(RecordType::AAAA);
                }
            }
            if let Some(s) = signers.get(name) {
                t.extend(s.apex_types());
            }
            t
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
        let mut s = crate::dnssec::Sections {
            qname,
            qtype,
            rcode,
            answers: &mut p.answers,
            authorities: &mut p.authorities,
        };
        signers.sign_response(&self.model.zones, &mut s, &types_at, now);
        s.rcode
    }

    /// Apply RRL and UDP truncation.
    fn finish(
        &self,
        mut p: Prepared,
        req: &MessageRequest,
        src: SocketAddr,
        protocol: Protocol,
        now: Instant,
        udp_limit: u16,
    ) -> Prepared {
        if protocol != Protocol::Udp {
            return p;
        }
        if let Some(rrl) = &self.rrl {
            match rrl.check(src.ip(), now) {
                Verdict::Allow => {}
                Verdict::Drop => {
                    p.drop = true;
                    p.rrl = Some("drop");
                    return p;
                }
                Verdict::Slip => {
                    p.truncate();
                    p.rrl = Some("slip");
                    return p;
                }
            }
        }
        match p.encode(&req.queries, udp_limit) {
            Ok((_, false)) => {}
            Ok((_, true)) => p.truncate(),
            Err(e) => {
                warn!(error = %e, "encoding response failed");
                p.truncate();
            }
        }
        p
    }
}

/// State shared by the DNS handler, the admin API and the reloader.
#[derive(Debug)]
pub struct Shared {
    /// The serving configuration.
    pub runtime: ArcSwap<Runtime>,
    /// GeoIP databases (reloaded on their own).
    pub geo: ArcSwap<GeoDb>,
    /// Health of every region.
    pub health: HealthTable,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// The hickory request handler.
#[derive(Debug, Clone)]
pub struct DnsHandler {
    /// Shared state.
    pub shared: Arc<Shared>,
}

fn proto_label(p: Protocol) -> &'static str {
    match p {
        Protocol::Udp => "udp",
        Protocol::Tcp => "tcp",
        _ => "other",
    }
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        if crate::transfer::is_signed(request) {
            return crate::transfer::respond_signed(&self.shared, request, response_handle).await;
        }
        let start = Instant::now();
        let rt = self.shared.runtime.load();
        let geo = self.shared.geo.load();
        let span = tracing::debug_span!(
            "dns_query",
            id = request.metadata.id,
            src = %request.src(),
            proto = proto_label(request.protocol()),
        );
        let p =
            span.in_scope(|| rt.respond(&geo, request, request.src(), request.protocol(), start));
        let m = &self.shared.metrics;
        m.latency.observe(start.elapsed().as_secs_f64());
        if let Some(l) = &p.ecs {
            m.ecs.get_or_create(l).inc();
        }
        if let Some(action) = p.rrl {
            m.rrl.get_or_create(&RrlLabels { action }).inc();
        }
        let qtype = request
            .queries
            .queries()
            .first()
            .map_or("OTHER", |q| qtype_label(q.query_type()));
        if !p.drop {
            m.queries
                .get_or_create(&QueryLabels {
                    qtype,
                    rcode: rcode_label(p.metadata.response_code),
                    region: p.region,
                    proto: proto_label(request.protocol()),
                })
                .inc();
        }
        let header = |metadata: Metadata| {
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        };
        if p.drop {
            debug!(src = %request.src(), "response dropped");
            return header(p.metadata);
        }
        let resp = MessageResponseBuilder::new(&request.queries, p.edns.as_ref()).build(
            p.metadata,
            p.answers.iter(),
            p.authorities.iter(),
            iter::empty(),
            p.additionals.iter(),
        );
        match response_handle.send_response(resp).await {
            Ok(info) => info,
            Err(e) => {
                warn!(error = %e, "failed to send response");
                let mut md = p.metadata;
                md.response_code = ResponseCode::ServFail;
                header(md)
            }
        }
    }
}

impl Runtime {
    /// Decode raw query bytes, answer, and encode: the whole query path
    /// without sockets (used by the fuzz target and tests). `None` when
    /// nothing would be sent (undecodable input, RRL drop, a response).
    pub fn answer_bytes(
        &self,
        geo: &GeoDb,
        raw: &[u8],
        src: SocketAddr,
        protocol: Protocol,
        now: Instant,
    ) -> Option<Vec<u8>> {
        let req = Request::from_bytes(raw.to_vec(), src, protocol).ok()?;
        let p = self.respond(geo, &req, src, protocol, now);
        if p.drop {
            return None;
        }
        let max = match (protocol, &p.edns) {
            (Protocol::Udp, Some(e)) => e.max_payload(),
            (Protocol::Udp, None) => 512,
            _ => u16::MAX,
        };
        p.encode(&req.queries, max).ok().map(|(b, _)| b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, Query};
    use proptest::prelude::*;

    fn demo() -> (Runtime, GeoDb) {
        let (m, g) = crate::model::load_demo().expect("demo");
        (Runtime::new(m, &HealthTable::default()), g)
    }

    fn ask(rt: &Runtime, geo: &GeoDb, m: &Message, proto: Protocol) -> Message {
        let src: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let bytes = rt
            .answer_bytes(
                geo,
                &m.to_vec().expect("encode"),
                src,
                proto,
                Instant::now(),
            )
            .expect("a response");
        Message::from_vec(&bytes).expect("decode")
    }

    fn q(name: &str, t: RecordType) -> Message {
        let mut m = Message::query();
        m.add_query(Query::query(Name::from_ascii(name).expect("name"), t));
        m
    }

    #[test]
    fn steered_answer_with_ecs_scope() {
        let (rt, geo) = demo();
        let mut m = q("www.demo.meridian.test.", RecordType::A);
        let mut e = Edns::new();
        e.options_mut().insert(EdnsOption::Subnet(ClientSubnet::new(
            "203.0.113.0".parse().expect("ip"),
            24,
            0,
        )));
        m.edns = Some(e);
        let r = ask(&rt, &geo, &m, Protocol::Udp);
        assert!(r.metadata.authoritative);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(
            r.answers[0].data,
            RData::A(A("192.0.2.3".parse().expect("ip")))
        );
        match r.edns.as_ref().and_then(|e| e.option(EdnsCode::Subnet)) {
            Some(EdnsOption::Subnet(cs)) => assert_eq!(cs.scope_prefix(), 24),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn invalid_ecs_is_formerr() {
        let (rt, geo) = demo();
        let mut m = q("www.demo.meridian.test.", RecordType::A);
        let mut e = Edns::new();
        // Scope must be 0 in queries (RFC 7871 6).
        e.options_mut().insert(EdnsOption::Subnet(ClientSubnet::new(
            "203.0.113.0".parse().expect("ip"),
            24,
            8,
        )));
        m.edns = Some(e);
        assert_eq!(
            ask(&rt, &geo, &m, Protocol::Udp).metadata.response_code,
            ResponseCode::FormErr
        );
    }

    #[test]
    fn responses_and_garbage_get_nothing() {
        let (rt, geo) = demo();
        let src: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let mut m = q("www.demo.meridian.test.", RecordType::A);
        m.metadata.message_type = MessageType::Response;
        let raw = m.to_vec().expect("encode");
        assert!(
            rt.answer_bytes(&geo, &raw, src, Protocol::Udp, Instant::now())
                .is_none()
        );
        assert!(
            rt.answer_bytes(&geo, &[1, 2, 3], src, Protocol::Udp, Instant::now())
                .is_none()
        );
    }

    #[test]
    fn notify_is_notimp() {
        let (rt, geo) = demo();
        let mut m = q("demo.meridian.test.", RecordType::SOA);
        m.metadata.op_code = OpCode::Notify;
        assert_eq!(
            ask(&rt, &geo, &m, Protocol::Tcp).metadata.response_code,
            ResponseCode::NotImp
        );
    }

    proptest! {
        /// The query path never panics and always answers a decodable query
        /// with a decodable response carrying the same id.
        #[test]
        fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..600)) {
            let (rt, geo) = demo();
            let src: SocketAddr = "[2001:db8:1::1]:53".parse().expect("addr");
            for proto in [Protocol::Udp, Protocol::Tcp] {
                if let Some(out) = rt.answer_bytes(&geo, &raw, src, proto, Instant::now()) {
                    let r = Message::from_vec(&out);
                    prop_assert!(r.is_ok(), "undecodable response");
                    if proto == Protocol::Udp {
                        prop_assert!(out.len() <= 1232);
                    }
                }
            }
        }

        #[test]
        fn random_names_get_sane_rcodes(label in "[a-zA-Z0-9][a-zA-Z0-9-]{0,19}", t in prop_oneof![Just(RecordType::A), Just(RecordType::AAAA), Just(RecordType::TXT), Just(RecordType::ANY)]) {
            let (rt, geo) = demo();
            let r = ask(&rt, &geo, &q(&format!("{label}.demo.meridian.test."), t), Protocol::Udp);
            prop_assert!(matches!(r.metadata.response_code, ResponseCode::NoError | ResponseCode::NXDomain));
            prop_assert!(r.metadata.authoritative);
        }
    }
}
