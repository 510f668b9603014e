//! Authoritative zone data loaded from RFC 1035 zone files (parsed by
//! hickory's zone file parser) and the lookup rules over it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_proto::serialize::txt::Parser;

/// Errors from loading a zone file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ZoneError {
    /// The file does not parse; `line` is the first line at which parsing
    /// fails (found by re-parsing prefixes, since hickory's parser does not
    /// report positions).
    #[error("{path}:{line}:1: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The data is not a usable zone.
    #[error("{path}:1:1: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// One node (owner name) of a zone.
#[derive(Debug, Default, Clone)]
pub struct Node {
    rrsets: Vec<(RecordType, Vec<Record>)>,
}

impl Node {
    fn get(&self, t: RecordType) -> Option<&[Record]> {
        self.rrsets
            .iter()
            .find(|(rt, _)| *rt == t)
            .map(|(_, r)| r.as_slice())
    }

    /// True if the node owns no records (an empty non-terminal or a steered
    /// name without static data).
    pub fn is_empty(&self) -> bool {
        self.rrsets.is_empty()
    }
}

/// A loaded zone.
#[derive(Debug, Clone)]
pub struct Zone {
    origin: LowerName,
    soa: Record,
    nodes: HashMap<LowerName, Node>,
    /// Names below the apex that own NS records (zone cuts).
    cuts: HashSet<LowerName>,
}

/// The result of looking a name up in one zone.
#[derive(Debug, PartialEq)]
pub enum Lookup<'a> {
    /// The RRset (owner names as stored).
    Records(&'a [Record]),
    /// Wildcard-synthesised records, owner already rewritten.
    Synthesized(Vec<Record>),
    /// The name owns a CNAME (and the query was not for CNAME).
    Cname(&'a Record),
    /// The name exists but has no data of this type.
    NoData,
    /// The name does not exist.
    NxDomain,
    /// The name is at or below a zone cut: a referral.
    Referral(&'a [Record]),
}

impl Zone {
    /// Parse zone file text for `origin`.
    pub fn parse(text: &str, path: &Path, origin: &Name) -> Result<Self, ZoneError> {
        let parsed = Parser::new(text, Some(path.to_owned()), Some(origin.clone())).parse();
        let (zone_origin, sets) = match parsed {
            Ok(v) => v,
            Err(e) => {
                let reason = e.to_string();
                return Err(ZoneError::Parse {
                    path: path.to_owned(),
                    line: find_error_line(text, path, origin, &reason),
                    reason,
                });
            }
        };
        let invalid = |reason: String| ZoneError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let origin_l = LowerName::new(&zone_origin);
        let mut nodes: HashMap<LowerName, Node> = HashMap::new();
        let mut soa = None;
        for (key, set) in sets {
            if !origin_l.zone_of(&key.name) {
                return Err(invalid(format!(
                    "record {} is outside the zone {}",
                    set.name(),
                    zone_origin
                )));
            }
            let recs: Vec<Record> = set.records_without_rrsigs().cloned().collect();
            if key.record_type == RecordType::SOA {
                if key.name != origin_l {
                    return Err(invalid(format!("SOA at {} is not at the apex", set.name())));
                }
                soa = recs.first().cloned();
            }
            nodes
                .entry(key.name.clone())
                .or_default()
                .rrsets
                .push((key.record_type, recs));
        }
        let soa = soa.ok_or_else(|| invalid(format!("zone {zone_origin} has no SOA record")))?;
        // CNAME must stand alone (RFC 1034 3.6.2).
        for (name, node) in &nodes {
            if node.get(RecordType::CNAME).is_some() && node.rrsets.len() > 1 {
                return Err(invalid(format!("{name} has a CNAME and other data")));
            }
        }
        let cuts = nodes
            .iter()
            .filter(|(n, node)| **n != origin_l && node.get(RecordType::NS).is_some())
            .map(|(n, _)| n.clone())
            .collect();
        let mut zone = Self {
            origin: origin_l,
            soa,
            nodes,
            cuts,
        };
        let names: Vec<LowerName> = zone.nodes.keys().cloned().collect();
        for n in names {
            zone.add_ancestors(&n);
        }
        Ok(zone)
    }

    fn add_ancestors(&mut self, name: &LowerName) {
        let mut n = name.base_name();
        while self.origin.zone_of(&n) && n != self.origin {
            self.nodes.entry(n.clone()).or_default();
            n = n.base_name();
        }
    }

    /// Declare that `name` exists (a steered name without static data).
    pub fn add_name(&mut self, name: &LowerName) {
        self.nodes.entry(name.clone()).or_default();
        self.add_ancestors(name);
    }

    /// The apex.
    pub fn origin(&self) -> &LowerName {
        &self.origin
    }

    /// The SOA record.
    pub fn soa(&self) -> &Record {
        &self.soa
    }

    /// The SOA for negative answers: TTL is min(SOA TTL, MINIMUM) (RFC 2308).
    pub fn negative_soa(&self) -> Record {
        let mut soa = self.soa.clone();
        if let RData::SOA(s) = &soa.data {
            soa.ttl = soa.ttl.min(s.minimum);
        }
        soa
    }

    /// The record types stored at `name`.
    pub fn types_at(&self, name: &LowerName) -> Vec<RecordType> {
        self.nodes
            .get(name)
            .map(|n| n.rrsets.iter().map(|(t, _)| *t).collect())
            .unwrap_or_default()
    }

    /// Number of owner names (including empty non-terminals).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True if the zone has no names (never: the apex has an SOA).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Look `name` (which must be in this zone) up for `qtype`.
    pub fn lookup(&self, name: &LowerName, qtype: RecordType) -> Lookup<'_> {
        // Zone cuts between the apex and the name (inclusive) give a
        // referral, except for DS at the cut itself (parent side data).
        if !self.cuts.is_empty() {
            let mut n = name.clone();
            while n != self.origin && self.origin.zone_of(&n) {
                if self.cuts.contains(&n)
                    && !(n == *name && qtype == RecordType::DS)
                    && let Some(ns) = self.nodes.get(&n).and_then(|node| node.get(RecordType::NS))
                {
                    return Lookup::Referral(ns);
                }
                n = n.base_name();
            }
        }
        if let Some(node) = self.nodes.get(name) {
            return Self::at_node(node, qtype);
        }
        // Wildcard: the closest encloser's `*` child (RFC 4592).
        let mut encloser = name.base_name();
        while self.origin.zone_of(&encloser) {
            if self.nodes.contains_key(&encloser) {
                let Ok(wild) = Name::from(&encloser).prepend_label("*") else {
                    break;
                };
                let Some(node) = self.nodes.get(&LowerName::new(&wild)) else {
                    break;
                };
                let owner = Name::from(name);
                let rewrite = |rs: &[Record]| {
                    rs.iter()
                        .map(|r| {
                            let mut r = r.clone();
                            r.name = owner.clone();
                            r
                        })
                        .collect::<Vec<_>>()
                };
                return match Self::at_node(node, qtype) {
                    Lookup::Records(rs) => Lookup::Synthesized(rewrite(rs)),
                    Lookup::Cname(c) => Lookup::Synthesized(rewrite(std::slice::from_ref(c))),
                    other => other,
                };
            }
            if encloser == self.origin {
                break;
            }
            encloser = encloser.base_name();
        }
        Lookup::NxDomain
    }

    fn at_node(node: &Node, qtype: RecordType) -> Lookup<'_> {
        if let Some(rs) = node.get(qtype) {
            return Lookup::Records(rs);
        }
        if let Some(c) = node.get(RecordType::CNAME).and_then(|c| c.first()) {
            return Lookup::Cname(c);
        }
        Lookup::NoData
    }

    /// Records at `name` ignoring zone cuts (glue for referrals).
    pub fn lookup_glue(&self, name: &LowerName, qtype: RecordType) -> Lookup<'_> {
        match self.nodes.get(name).and_then(|n| n.get(qtype)) {
            Some(rs) => Lookup::Records(rs),
            None => Lookup::NoData,
        }
    }

    /// Every stored record (the SOA included), in no particular order
    /// (zone transfers).
    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.nodes
            .values()
            .flat_map(|n| n.rrsets.iter().flat_map(|(_, rs)| rs.iter()))
    }

    /// Does `name` exist (own records, or be an empty non-terminal)?
    pub fn exists(&self, name: &LowerName) -> bool {
        self.nodes.contains_key(name)
    }
}

/// Binary search for the shortest prefix of the file (in lines) whose parse
/// fails with the same message.
fn find_error_line(text: &str, path: &Path, origin: &Name, reason: &str) -> usize {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let fails = |n: usize| {
        let prefix: String = lines[..n].concat();
        match Parser::new(prefix, Some(path.to_owned()), Some(origin.clone())).parse() {
            Ok(_) => false,
            Err(e) => e.to_string() == reason,
        }
    };
    let (mut lo, mut hi) = (1usize, lines.len().max(1));
    if lines.is_empty() || !fails(hi) {
        return hi;
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if fails(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

/// The set of zones, searched by longest matching origin.
#[derive(Debug, Default, Clone)]
pub struct Zones {
    zones: Vec<Zone>,
}

impl Zones {
    /// Add a zone.
    pub fn push(&mut self, zone: Zone) {
        self.zones.push(zone);
        // Longest origin first, so the first match is the closest.
        self.zones
            .sort_by_key(|z| std::cmp::Reverse(z.origin.num_labels()));
    }

    /// The zone that is authoritative for `name`.
    pub fn find(&self, name: &LowerName) -> Option<&Zone> {
        self.zones.iter().find(|z| z.origin.zone_of(name))
    }

    /// Mutable access for setup.
    pub fn find_mut(&mut self, name: &LowerName) -> Option<&mut Zone> {
        self.zones.iter_mut().find(|z| z.origin.zone_of(name))
    }

    /// All zones.
    pub fn iter(&self) -> impl Iterator<Item = &Zone> {
        self.zones.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Z: &str = "$TTL 300
@   IN SOA ns1 hostmaster 1 7200 3600 1209600 60
    IN NS ns1
ns1 IN A 192.0.2.53
www IN A 192.0.2.10
alias IN CNAME www
a.b.c IN TXT \"deep\"
*.wild IN A 192.0.2.99
sub IN NS ns.sub
ns.sub IN A 192.0.2.54
";

    fn zone() -> Zone {
        let origin = Name::from_ascii("example.test.").expect("name");
        Zone::parse(Z, Path::new("example.test.zone"), &origin).expect("zone")
    }

    fn n(s: &str) -> LowerName {
        LowerName::new(&Name::from_ascii(s).expect("name"))
    }

    #[test]
    fn lookups() {
        let z = zone();
        assert!(
            matches!(z.lookup(&n("www.example.test."), RecordType::A), Lookup::Records(r) if r.len() == 1)
        );
        assert_eq!(
            z.lookup(&n("www.example.test."), RecordType::MX),
            Lookup::NoData
        );
        assert_eq!(
            z.lookup(&n("nope.example.test."), RecordType::A),
            Lookup::NxDomain
        );
        assert!(matches!(
            z.lookup(&n("alias.example.test."), RecordType::A),
            Lookup::Cname(_)
        ));
        assert!(matches!(
            z.lookup(&n("alias.example.test."), RecordType::CNAME),
            Lookup::Records(_)
        ));
        // Empty non-terminal.
        assert_eq!(
            z.lookup(&n("b.c.example.test."), RecordType::A),
            Lookup::NoData
        );
        match z.lookup(&n("x.wild.example.test."), RecordType::A) {
            Lookup::Synthesized(r) => assert_eq!(
                r[0].name,
                Name::from_ascii("x.wild.example.test.").expect("n")
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            z.lookup(&n("host.sub.example.test."), RecordType::A),
            Lookup::Referral(_)
        ));
        assert_eq!(z.negative_soa().ttl, 60);
    }

    #[test]
    fn parse_error_has_line() {
        let origin = Name::from_ascii("example.test.").expect("name");
        let bad =
            "$TTL 300\n@ IN SOA ns1 hostmaster 1 2 3 4 5\nwww IN A 192.0.2.300\nx IN A 192.0.2.1\n";
        let e = Zone::parse(bad, Path::new("z"), &origin).expect_err("bad A");
        assert!(e.to_string().starts_with("z:3:1:"), "{e}");
    }

    #[test]
    fn missing_soa_is_refused() {
        let origin = Name::from_ascii("example.test.").expect("name");
        let e = Zone::parse("$TTL 1\nwww IN A 192.0.2.1\n", Path::new("z"), &origin)
            .expect_err("no soa");
        assert!(e.to_string().contains("no SOA"), "{e}");
    }
}
