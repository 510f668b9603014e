//! DNSSEC, signed online: every answer, steered or static, is signed when
//! the query has the DO bit, with the zone's keys and hickory-proto's
//! signing (ring). Denial of existence is compact (RFC 9824, "black lies"):
//! one NSEC at the queried name, whose next name is `\000.<name>`, so no
//! zone walking is possible and no NSEC chain has to be kept.
//!
//! Entry points: [`ZoneSigner::new`] builds a zone's signer from its
//! [`DnssecConfig`] and loaded [`keys::ZoneKey`]s; [`Signers::sign_response`]
//! adds the RRSIGs and denial records to a prepared response; it is a pure
//! function of the response, the zone data and `now` (Unix seconds), with
//! the [`cache::SigCache`] as its only state.
//!
//! Each RRset is signed on its own and its signatures are cached per (owner,
//! type, content), so each region of a steered name has its own signature,
//! made once and reused until it is due for refresh (half its validity).

pub mod cache;
pub mod keys;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use hickory_proto::dnssec::rdata::{DNSSECRData, NSEC, RRSIG, SigInput};
use hickory_proto::dnssec::{Algorithm, TBS};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType, SerialNumber};
use serde::Deserialize;
use tracing::warn;

use crate::zone::{Lookup, Zone, Zones};
use cache::{Entry, SigCache};
use keys::{KeyRole, ZoneKey};

/// The NXNAME meta-type (RFC 9824): in the NSEC of a name that does not
/// exist.
pub const NXNAME: RecordType = RecordType::Unknown(128);

/// Signatures start this long before "now", for clocks behind ours.
const INCEPTION_SKEW: u32 = 3600;

/// `[zones.dnssec]`: sign this zone online.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DnssecConfig {
    /// The zone's keys: a KSK and a ZSK, or one CSK (more during a
    /// rollover).
    pub keys: Vec<KeyConfig>,
    /// Lifetime of each signature, seconds; re-signed after half of it.
    /// Default 604800 (7 days), at least 7200.
    #[serde(default = "default_validity")]
    pub signature_validity_secs: u32,
    /// TTL of DNSKEY, CDS and CDNSKEY. Default 3600.
    #[serde(default = "default_dnskey_ttl")]
    pub dnskey_ttl: u32,
    /// Publish CDS and CDNSKEY (RFC 7344) for the active KSKs/CSKs.
    /// Default true.
    #[serde(default = "yes")]
    pub cds: bool,
    /// Most RRsets whose signatures are cached. Default 100000.
    #[serde(default = "default_cache_size")]
    pub cache_size: usize,
}

/// `[[zones.dnssec.keys]]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// PKCS#8 PEM private key (`meridian-dns keys generate`), relative to
    /// the config file's directory.
    pub file: PathBuf,
    /// `ksk`, `zsk` or `csk`.
    pub role: KeyRole,
    /// Sign with it (true, default) or only publish its DNSKEY (false):
    /// the pre-publish and retire steps of a rollover.
    #[serde(default = "yes")]
    pub active: bool,
}

fn yes() -> bool {
    true
}
fn default_validity() -> u32 {
    7 * 86400
}
fn default_dnskey_ttl() -> u32 {
    3600
}
fn default_cache_size() -> usize {
    100_000
}

/// One signed zone.
pub struct ZoneSigner {
    apex: Name,
    keys: Vec<ZoneKey>,
    dnskey: Vec<Record>,
    cds: Vec<Record>,
    cdnskey: Vec<Record>,
    validity: u32,
    /// The signature cache.
    pub cache: SigCache,
}

impl fmt::Debug for ZoneSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZoneSigner")
            .field("apex", &self.apex)
            .field("keys", &self.keys)
            .field("cached", &self.cache.len())
            .finish()
    }
}

fn rec(name: &Name, ttl: u32, d: DNSSECRData) -> Record {
    Record::from_rdata(name.clone(), ttl, RData::DNSSEC(d))
}

impl ZoneSigner {
    /// A signer for the zone at `apex` with loaded keys. Refused unless some
    /// active key signs the data (ZSK or CSK) and some active key signs the
    /// DNSKEY RRset (KSK or CSK).
    pub fn new(apex: &Name, cfg: &DnssecConfig, keys: Vec<ZoneKey>) -> Result<Self, String> {
        if cfg.signature_validity_secs < 2 * INCEPTION_SKEW {
            return Err(format!(
                "signature_validity_secs must be at least {}",
                2 * INCEPTION_SKEW
            ));
        }
        if !keys.iter().any(|k| k.active && k.role.signs_data()) {
            return Err("no active zsk or csk: nothing would sign the zone's data".into());
        }
        if !keys.iter().any(|k| k.active && k.role.signs_keys()) {
            return Err("no active ksk or csk: nothing would sign the DNSKEY RRset".into());
        }
        let mut tags: Vec<u16> = keys.iter().map(|k| k.tag).collect();
        tags.sort_unstable();
        tags.dedup();
        if tags.len() != keys.len() {
            return Err("two keys have the same key tag (the same key listed twice?)".into());
        }
        let ttl = cfg.dnskey_ttl;
        let dnskey = keys
            .iter()
            .map(|k| rec(apex, ttl, DNSSECRData::DNSKEY(k.dnskey.clone())))
            .collect();
        let mut cds = Vec::new();
        let mut cdnskey = Vec::new();
        if cfg.cds {
            for k in keys.iter().filter(|k| k.active && k.role.signs_keys()) {
                cds.push(rec(
                    apex,
                    ttl,
                    DNSSECRData::CDS(k.cds(apex).map_err(|e| e.to_string())?),
                ));
                cdnskey.push(rec(apex, ttl, DNSSECRData::CDNSKEY(k.cdnskey())));
            }
        }
        Ok(Self {
            apex: apex.clone(),
            keys,
            dnskey,
            cds,
            cdnskey,
            validity: cfg.signature_validity_secs,
            cache: SigCache::new(cfg.cache_size),
        })
    }

    /// The zone's keys.
    pub fn keys(&self) -> &[ZoneKey] {
        &self.keys
    }

    /// The DNSKEY, CDS or CDNSKEY RRset (empty for other types).
    pub fn apex_rrset(&self, qtype: RecordType) -> &[Record] {
        match qtype {
            RecordType::DNSKEY => &self.dnskey,
            RecordType::CDS => &self.cds,
            RecordType::CDNSKEY => &self.cdnskey,
            _ => &[],
        }
    }

    /// The types this signer adds at the apex.
    pub fn apex_types(&self) -> impl Iterator<Item = RecordType> + '_ {
        [RecordType::DNSKEY, RecordType::CDS, RecordType::CDNSKEY]
            .into_iter()
            .filter(|t| !self.apex_rrset(*t).is_empty())
    }

    /// RRSIGs over the RRset (`owner`, `rtype`) found in `section`, from the
    /// cache or freshly made. None if signing fails (logged).
    pub fn sign_rrset(
        &self,
        owner: &Name,
        rtype: RecordType,
        ttl: u32,
        section: &[Record],
        now: u32,
    ) -> Option<Arc<[Record]>> {
        // The cache key: the canonical RRset (RFC 4034 6.3) behind a
        // constant prefix, as hickory lays it out for signing.
        let keyed = SigInput {
            type_covered: rtype,
            algorithm: Algorithm::Unknown(0),
            num_labels: owner.num_labels(),
            original_ttl: ttl,
            sig_expiration: SerialNumber::new(0),
            sig_inception: SerialNumber::new(0),
            key_tag: 0,
            signer_name: Name::root(),
        };
        let key = match TBS::from_input(owner, DNSClass::IN, &keyed, section.iter()) {
            Ok(t) => t.as_ref().to_vec(),
            Err(e) => {
                warn!(error = %e, %owner, ?rtype, "cannot serialize RRset for signing");
                return None;
            }
        };
        if let Some(sigs) = self.cache.get(&key, now) {
            return Some(sigs);
        }
        let start = Instant::now();
        let key_rrset = matches!(
            rtype,
            RecordType::DNSKEY | RecordType::CDS | RecordType::CDNSKEY
        );
        let mut out = Vec::with_capacity(2);
        for k in self.keys.iter().filter(|k| {
            k.active
                && if key_rrset {
                    k.role.signs_keys()
                } else {
                    k.role.signs_data()
                }
        }) {
            let input = SigInput {
                type_covered: rtype,
                algorithm: k.key.algorithm(),
                num_labels: owner.num_labels(),
                original_ttl: ttl,
                sig_expiration: SerialNumber::new(now.wrapping_add(self.validity)),
                sig_inception: SerialNumber::new(now.saturating_sub(INCEPTION_SKEW)),
                key_tag: k.tag,
                signer_name: self.apex.clone(),
            };
            let signed = TBS::from_input(owner, DNSClass::IN, &input, section.iter())
                .map_err(|e| e.to_string())
                .and_then(|tbs| k.key.sign(&tbs).map_err(|e| e.to_string()));
            match signed {
                Ok(sig) => out.push(rec(
                    owner,
                    ttl,
                    DNSSECRData::RRSIG(RRSIG::from_sig(input, sig)),
                )),
                Err(e) => {
                    warn!(error = %e, %owner, ?rtype, tag = k.tag, "signing failed");
                    return None;
                }
            }
        }
        let sigs: Arc<[Record]> = out.into();
        self.cache.insert(
            key,
            Entry {
                sigs: sigs.clone(),
                refresh_at: now.saturating_add(self.validity / 2),
            },
        );
        self.cache.stats.sign_nanos.fetch_add(
            u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        Some(sigs)
    }
}

/// The signed zones, by apex.
#[derive(Debug, Default, Clone)]
pub struct Signers {
    zones: HashMap<LowerName, Arc<ZoneSigner>>,
}

/// The parts of a response that signing reads and changes.
#[derive(Debug)]
pub struct Sections<'a> {
    /// The query name, as asked.
    pub qname: &'a Name,
    /// The query type.
    pub qtype: RecordType,
    /// The response code; NXDOMAIN becomes NOERROR (RFC 9824).
    pub rcode: ResponseCode,
    /// Answer section.
    pub answers: &'a mut Vec<Record>,
    /// Authority section.
    pub authorities: &'a mut Vec<Record>,
}

/// The record types that exist at `name` in `zone`: its own, or those of
/// the wildcard that synthesises it (RFC 4592), like [`Zone::lookup`].
pub fn zone_types(zone: &Zone, name: &LowerName) -> Vec<RecordType> {
    if zone.exists(name) {
        return zone.types_at(name);
    }
    let mut encloser = name.base_name();
    while zone.origin().zone_of(&encloser) {
        if zone.exists(&encloser) {
            return Name::from(&encloser)
                .prepend_label("*")
                .map(|w| zone.types_at(&LowerName::new(&w)))
                .unwrap_or_default();
        }
        if encloser == *zone.origin() {
            break;
        }
        encloser = encloser.base_name();
    }
    Vec::new()
}

/// The NSEC of compact denial: at `owner`, next name `\000.owner`, with
/// `types` plus NSEC and RRSIG.
pub fn black_lie(
    owner: &Name,
    ttl: u32,
    types: impl IntoIterator<Item = RecordType>,
) -> Option<Record> {
    let next = owner.prepend_label(&[0u8][..]).ok()?;
    Some(rec(
        owner,
        ttl,
        DNSSECRData::NSEC(NSEC::new_cover_self(next, types)),
    ))
}

/// Where a CNAME chain in `answers` starting at `qname` ends.
fn final_name(qname: &Name, qtype: RecordType, answers: &[Record]) -> Name {
    let mut name = qname.clone();
    if qtype == RecordType::CNAME {
        return name;
    }
    for _ in 0..answers.len() {
        let next = answers.iter().find_map(|r| match &r.data {
            RData::CNAME(t) if r.name == name => Some(t.0.clone()),
            _ => None,
        });
        match next {
            Some(t) => name = t,
            None => break,
        }
    }
    name
}

impl Signers {
    /// Add a zone's signer.
    pub fn insert(&mut self, signer: ZoneSigner) {
        self.zones
            .insert(LowerName::new(&signer.apex), Arc::new(signer));
    }

    /// The signer of the zone whose apex is `origin`.
    pub fn get(&self, origin: &LowerName) -> Option<&Arc<ZoneSigner>> {
        self.zones.get(origin)
    }

    /// True if no zone is signed.
    pub fn is_empty(&self) -> bool {
        self.zones.is_empty()
    }

    /// All signers.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<ZoneSigner>> {
        self.zones.values()
    }

    /// DNSKEY, CDS or CDNSKEY records if `name` is a signed apex and the
    /// RRset is not empty.
    pub fn apex_records(&self, name: &LowerName, qtype: RecordType) -> Option<&[Record]> {
        if !matches!(
            qtype,
            RecordType::DNSKEY | RecordType::CDS | RecordType::CDNSKEY
        ) {
            return None;
        }
        let rs = self.zones.get(name)?.apex_rrset(qtype);
        (!rs.is_empty()).then_some(rs)
    }

    /// Sign a response for a DO query: add the denial NSEC (NXDOMAIN and
    /// NODATA, or a referral without DS), then an RRSIG set for every
    /// authoritative RRset of the answer and authority sections.
    /// `types_at` lists the types that exist at a name of a zone (for the
    /// NSEC bitmaps).
    pub fn sign_response(
        &self,
        zones: &Zones,
        s: &mut Sections<'_>,
        types_at: &dyn Fn(&Zone, &LowerName) -> Vec<RecordType>,
        now: u32,
    ) {
        if self.zones.is_empty() {
            return;
        }
        let has_soa = s
            .authorities
            .iter()
            .any(|r| r.record_type() == RecordType::SOA);
        // Denial of existence.
        let fname = final_name(s.qname, s.qtype, s.answers);
        let lfinal = LowerName::new(&fname);
        if let Some(zone) = zones.find(&lfinal)
            && self.get(zone.origin()).is_some()
        {
            let ttl = zone.negative_soa().ttl;
            if s.rcode == ResponseCode::NXDomain {
                if let Some(n) = black_lie(&fname, ttl, [NXNAME]) {
                    s.authorities.push(n);
                    s.rcode = ResponseCode::NoError;
                }
            } else if s.rcode == ResponseCode::NoError
                && has_soa
                && s.qtype != RecordType::ANY
                && !s
                    .answers
                    .iter()
                    .any(|r| r.record_type() == s.qtype && r.name == fname)
            {
                let mut types = types_at(zone, &lfinal);
                types.retain(|t| *t != s.qtype);
                if let Some(n) = black_lie(&fname, ttl, types) {
                    s.authorities.push(n);
                }
            }
        }
        // A referral: the DS, or proof that there is none.
        if !has_soa
            && let Some(cut) = s
                .authorities
                .iter()
                .find(|r| r.record_type() == RecordType::NS)
                .map(|r| r.name.clone())
        {
            let lcut = LowerName::new(&cut);
            if let Some(zone) = zones.find(&lcut)
                && *zone.origin() != lcut
                && self.get(zone.origin()).is_some()
            {
                match zone.lookup(&lcut, RecordType::DS) {
                    Lookup::Records(ds) => s.authorities.extend(ds.iter().cloned()),
                    _ => {
                        let ttl = zone.negative_soa().ttl;
                        if let Some(n) = black_lie(&cut, ttl, [RecordType::NS]) {
                            s.authorities.push(n);
                        }
                    }
                }
            }
        }
        let sigs = self.sign_section(zones, s.answers, now);
        s.answers.extend(sigs);
        let sigs = self.sign_section(zones, s.authorities, now);
        s.authorities.extend(sigs);
    }

    /// RRSIGs for every RRset of `section` in a signed zone (delegation NS
    /// RRsets excepted: the child signs those).
    fn sign_section(&self, zones: &Zones, section: &[Record], now: u32) -> Vec<Record> {
        let mut out = Vec::new();
        let mut done: Vec<(&Name, RecordType)> = Vec::new();
        for r in section {
            let t = r.record_type();
            if t == RecordType::RRSIG || done.iter().any(|(n, dt)| *dt == t && **n == r.name) {
                continue;
            }
            done.push((&r.name, t));
            let owner = LowerName::new(&r.name);
            let Some(zone) = zones.find(&owner) else {
                continue;
            };
            if t == RecordType::NS && owner != *zone.origin() {
                continue;
            }
            let Some(signer) = self.get(zone.origin()) else {
                continue;
            };
            if let Some(sigs) = signer.sign_rrset(&r.name, t, r.ttl, section, now) {
                out.extend(sigs.iter().map(|s| {
                    let mut s = s.clone();
                    s.name = r.name.clone();
                    s
                }));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::dnssec::PublicKey as _;
    use hickory_proto::dnssec::rdata::DNSKEY;
    use hickory_proto::rr::rdata::A;
    use std::path::Path;

    fn key(role: KeyRole, alg: keys::KeyAlgorithm) -> ZoneKey {
        let der = keys::generate(alg).expect("generate");
        ZoneKey::from_pkcs8(&der, role, true).expect("key")
    }

    fn cfg() -> DnssecConfig {
        DnssecConfig {
            keys: Vec::new(),
            signature_validity_secs: 86400,
            dnskey_ttl: 3600,
            cds: true,
            cache_size: 1000,
        }
    }

    fn n(s: &str) -> Name {
        Name::from_ascii(s).expect("name")
    }

    const Z: &str = "$TTL 300
@   IN SOA ns1 hostmaster 1 7200 3600 1209600 60
    IN NS ns1
ns1 IN A 192.0.2.53
www IN A 192.0.2.10
*.wild IN TXT \"w\"
sub IN NS ns.sub
";

    fn setup(alg: keys::KeyAlgorithm) -> (Zones, Signers, DNSKEY, DNSKEY) {
        let origin = n("example.test.");
        let zone = Zone::parse(Z, Path::new("z"), &origin).expect("zone");
        let mut zones = Zones::default();
        zones.push(zone);
        let ksk = key(KeyRole::Ksk, alg);
        let zsk = key(KeyRole::Zsk, alg);
        let (kd, zd) = (ksk.dnskey.clone(), zsk.dnskey.clone());
        let signer = ZoneSigner::new(&origin, &cfg(), vec![ksk, zsk]).expect("signer");
        let mut signers = Signers::default();
        signers.insert(signer);
        (zones, signers, kd, zd)
    }

    fn verify(dnskey: &DNSKEY, rrsig: &Record, rrset: &[Record]) {
        let RData::DNSSEC(DNSSECRData::RRSIG(sig)) = &rrsig.data else {
            panic!("not an RRSIG: {rrsig:?}");
        };
        let tbs =
            TBS::from_input(&rrsig.name, DNSClass::IN, sig.input(), rrset.iter()).expect("tbs");
        dnskey
            .public_key()
            .verify(tbs.as_ref(), sig.sig())
            .expect("signature verifies");
    }

    fn types(zones: &Zones) -> impl Fn(&Zone, &LowerName) -> Vec<RecordType> + '_ {
        let _ = zones;
        |z: &Zone, n: &LowerName| zone_types(z, n)
    }

    #[test]
    fn answers_are_signed_by_the_zsk_and_cached() {
        for alg in [keys::KeyAlgorithm::Ecdsap256, keys::KeyAlgorithm::Ed25519] {
            let (zones, signers, _ksk, zsk) = setup(alg);
            let qname = n("WWW.example.test.");
            let a = Record::from_rdata(
                qname.clone(),
                300,
                RData::A(A("192.0.2.10".parse().expect("ip"))),
            );
            let mut answers = vec![a.clone()];
            let mut auth = Vec::new();
            let mut s = Sections {
                qname: &qname,
                qtype: RecordType::A,
                rcode: ResponseCode::NoError,
                answers: &mut answers,
                authorities: &mut auth,
            };
            signers.sign_response(&zones, &mut s, &types(&zones), 1_000_000);
            assert_eq!(answers.len(), 2);
            verify(&zsk, &answers[1], &answers[..1]);
            let signer = signers
                .get(&LowerName::new(&n("example.test.")))
                .expect("s");
            assert_eq!(signer.cache.stats.misses.load(Ordering::Relaxed), 1);
            // The same content (other case) is a hit; new content a miss.
            let again = signer
                .sign_rrset(&n("www.EXAMPLE.test."), RecordType::A, 300, &[a], 1_000_100)
                .expect("sig");
            assert_eq!(signer.cache.stats.hits.load(Ordering::Relaxed), 1);
            let RData::DNSSEC(DNSSECRData::RRSIG(s1)) = &again[0].data else {
                panic!()
            };
            assert_eq!(s1.input().sig_inception.get(), 1_000_000 - INCEPTION_SKEW);
            // After half the validity, re-signed.
            let other = Record::from_rdata(
                n("www.example.test."),
                300,
                RData::A(A("192.0.2.11".parse().expect("ip"))),
            );
            signer.sign_rrset(
                &other.name,
                RecordType::A,
                300,
                std::slice::from_ref(&other),
                1_000_100,
            );
            assert_eq!(signer.cache.stats.misses.load(Ordering::Relaxed), 2);
            let later = signer
                .sign_rrset(
                    &other.name.clone(),
                    RecordType::A,
                    300,
                    &[other],
                    1_000_100 + 43_200,
                )
                .expect("sig");
            let RData::DNSSEC(DNSSECRData::RRSIG(s2)) = &later[0].data else {
                panic!()
            };
            assert_eq!(s2.input().sig_inception.get(), 1_043_300 - INCEPTION_SKEW);
        }
    }

    #[test]
    fn dnskey_rrset_is_signed_by_the_ksk() {
        let (zones, signers, ksk, _zsk) = setup(keys::KeyAlgorithm::Ecdsap256);
        let apex = n("example.test.");
        let mut answers = signers
            .apex_records(&LowerName::new(&apex), RecordType::DNSKEY)
            .expect("dnskey")
            .to_vec();
        assert_eq!(answers.len(), 2);
        let mut auth = Vec::new();
        let mut s = Sections {
            qname: &apex,
            qtype: RecordType::DNSKEY,
            rcode: ResponseCode::NoError,
            answers: &mut answers,
            authorities: &mut auth,
        };
        signers.sign_response(&zones, &mut s, &types(&zones), 1_000_000);
        assert_eq!(answers.len(), 3, "one RRSIG, by the KSK only");
        verify(&ksk, &answers[2], &answers[..2]);
        // CDS and CDNSKEY: the KSK only.
        let cds = signers
            .apex_records(&LowerName::new(&apex), RecordType::CDS)
            .expect("cds");
        assert_eq!(cds.len(), 1);
    }

    fn deny(qname: &str, qtype: RecordType, rcode: ResponseCode) -> (ResponseCode, Vec<Record>) {
        let (zones, signers, _k, zsk) = setup(keys::KeyAlgorithm::Ecdsap256);
        let zone = zones.find(&LowerName::new(&n("example.test."))).expect("z");
        let qname = n(qname);
        let mut answers = Vec::new();
        let mut auth = vec![zone.negative_soa()];
        let mut s = Sections {
            qname: &qname,
            qtype,
            rcode,
            answers: &mut answers,
            authorities: &mut auth,
        };
        signers.sign_response(&zones, &mut s, &types(&zones), 1_000_000);
        let rcode = s.rcode;
        // SOA, NSEC, RRSIG(SOA), RRSIG(NSEC).
        assert_eq!(auth.len(), 4, "{auth:?}");
        verify(&zsk, &auth[2], &auth[..1]);
        verify(&zsk, &auth[3], &auth[1..2]);
        (rcode, auth)
    }

    fn bitmap(r: &Record) -> (Name, Vec<RecordType>) {
        let RData::DNSSEC(DNSSECRData::NSEC(nsec)) = &r.data else {
            panic!("not an NSEC: {r:?}");
        };
        (
            nsec.next_domain_name().clone(),
            nsec.type_bit_maps().collect(),
        )
    }

    #[test]
    fn nxdomain_becomes_a_black_lie() {
        let (rcode, auth) = deny("nope.example.test.", RecordType::A, ResponseCode::NXDomain);
        assert_eq!(rcode, ResponseCode::NoError);
        let (next, types) = bitmap(&auth[1]);
        assert_eq!(auth[1].name, n("nope.example.test."));
        assert_eq!(next.to_string(), "\\000.nope.example.test.");
        assert_eq!(
            types,
            vec![RecordType::RRSIG, RecordType::NSEC, NXNAME],
            "NXNAME, and nothing else that exists"
        );
        assert_eq!(auth[1].ttl, 60, "negative TTL");
    }

    #[test]
    fn nodata_lists_what_exists_and_not_the_qtype() {
        let (rcode, auth) = deny("www.example.test.", RecordType::MX, ResponseCode::NoError);
        assert_eq!(rcode, ResponseCode::NoError);
        let (_, types) = bitmap(&auth[1]);
        assert_eq!(
            types,
            vec![RecordType::A, RecordType::RRSIG, RecordType::NSEC]
        );
        // A wildcard-synthesised name: the wildcard's types.
        let (_, auth) = deny("x.wild.example.test.", RecordType::A, ResponseCode::NoError);
        let (_, types) = bitmap(&auth[1]);
        assert_eq!(
            types,
            vec![RecordType::TXT, RecordType::RRSIG, RecordType::NSEC]
        );
    }

    #[test]
    fn zone_checks() {
        let apex = n("example.test.");
        let zsk = key(KeyRole::Zsk, keys::KeyAlgorithm::Ecdsap256);
        let e = ZoneSigner::new(&apex, &cfg(), vec![zsk]).expect_err("no ksk");
        assert!(e.contains("no active ksk"), "{e}");
        let mut ksk = key(KeyRole::Ksk, keys::KeyAlgorithm::Ecdsap256);
        ksk.active = false;
        let zsk = key(KeyRole::Zsk, keys::KeyAlgorithm::Ecdsap256);
        assert!(ZoneSigner::new(&apex, &cfg(), vec![ksk, zsk]).is_err());
        let csk = key(KeyRole::Csk, keys::KeyAlgorithm::Ed25519);
        assert!(ZoneSigner::new(&apex, &cfg(), vec![csk]).is_ok());
    }
}
