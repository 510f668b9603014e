//! GeoIP: MaxMind-format City/Country and ASN databases, and a CSV compiler.
//!
//! The readers and the lookup are the shared `meridian-geo` crate, re-exported
//! here. [`GeoDb::lookup`] maps an address to a [`GeoInfo`]: country, continent,
//! coordinates, ASN, and the prefix length of the database network that
//! matched (used as the ECS scope). [`build_from_csv`] compiles
//! `network,country,continent,lat,lon,asn` rows into a MaxMind DB with the
//! [`mmdb`] writer.

pub mod mmdb;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;

pub use meridian_geo::{Code, GeoDb, GeoInfo, normalize};

/// Errors from loading or building GeoIP databases.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GeoError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A database could not be opened (maxminddb refused it).
    #[error(transparent)]
    Open(#[from] meridian_geo::OpenError),
    /// A CSV line is malformed.
    #[error("{path}:{line}:{col}: {reason}")]
    Csv {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// What is wrong.
        reason: String,
    },
    /// The writer failed.
    #[error("building database: {0}")]
    Build(#[from] mmdb::MmdbError),
}

/// One row of the GeoIP CSV.
#[derive(Debug, Clone, PartialEq)]
pub struct CsvRow {
    /// The network.
    pub network: IpNet,
    /// Country code, if any.
    pub country: Option<Code>,
    /// Continent code, if any.
    pub continent: Option<Code>,
    /// Coordinates, if any.
    pub location: Option<(f64, f64)>,
    /// ASN, if any.
    pub asn: Option<u32>,
}

impl CsvRow {
    /// The MaxMind data record for this row (GeoIP2-City layout plus
    /// `autonomous_system_number`, as in the GeoLite2-ASN layout).
    pub fn to_value(&self) -> mmdb::Value {
        use mmdb::Value;
        let mut m = BTreeMap::new();
        if let Some(c) = self.country {
            let mut n = BTreeMap::new();
            n.insert("iso_code".to_owned(), Value::String(c.as_str().to_owned()));
            m.insert("country".to_owned(), Value::Map(n));
        }
        if let Some(c) = self.continent {
            let mut n = BTreeMap::new();
            n.insert("code".to_owned(), Value::String(c.as_str().to_owned()));
            m.insert("continent".to_owned(), Value::Map(n));
        }
        if let Some((lat, lon)) = self.location {
            let mut n = BTreeMap::new();
            n.insert("latitude".to_owned(), Value::Double(lat));
            n.insert("longitude".to_owned(), Value::Double(lon));
            m.insert("location".to_owned(), Value::Map(n));
        }
        if let Some(a) = self.asn {
            m.insert("autonomous_system_number".to_owned(), Value::U32(a));
        }
        Value::Map(m)
    }
}

/// Parse GeoIP CSV text: `network,country,continent,lat,lon,asn`. A header
/// line starting with `network`, blank lines and `#` comments are skipped.
/// Empty fields mean unknown. `asn` may be written `64500` or `AS64500`.
pub fn parse_csv(text: &str, path: &Path) -> Result<Vec<CsvRow>, GeoError> {
    let mut rows = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if i == 0 && trimmed.starts_with("network") {
            continue;
        }
        let err = |col: usize, reason: String| GeoError::Csv {
            path: path.to_owned(),
            line,
            col,
            reason,
        };
        let mut fields = Vec::with_capacity(6);
        let mut col = 1;
        for f in raw.split(',') {
            fields.push((col, f.trim()));
            col += f.len() + 1;
        }
        if fields.len() != 6 {
            return Err(err(
                1,
                format!(
                    "expected 6 fields (network,country,continent,lat,lon,asn), found {}",
                    fields.len()
                ),
            ));
        }
        let (c, f) = fields[0];
        let network: IpNet = f.parse().map_err(|_| {
            err(
                c,
                format!("invalid network {f:?} (want CIDR like 192.0.2.0/24)"),
            )
        })?;
        let code = |(c, f): (usize, &str), what: &str| -> Result<Option<Code>, GeoError> {
            if f.is_empty() {
                return Ok(None);
            }
            Code::parse(f)
                .map(Some)
                .ok_or_else(|| err(c, format!("invalid {what} code {f:?} (want two letters)")))
        };
        let country = code(fields[1], "country")?;
        let continent = code(fields[2], "continent")?;
        let coord = |(c, f): (usize, &str), lim: f64| -> Result<Option<f64>, GeoError> {
            if f.is_empty() {
                return Ok(None);
            }
            match f.parse::<f64>() {
                Ok(v) if v.is_finite() && v.abs() <= lim => Ok(Some(v)),
                _ => Err(err(c, format!("invalid coordinate {f:?} (range ±{lim})"))),
            }
        };
        let lat = coord(fields[3], 90.0)?;
        let lon = coord(fields[4], 180.0)?;
        let location = match (lat, lon) {
            (Some(a), Some(b)) => Some((a, b)),
            (None, None) => None,
            _ => {
                return Err(err(
                    fields[3].0,
                    "lat and lon must both be set or both empty".into(),
                ));
            }
        };
        let (c, f) = fields[5];
        let asn = if f.is_empty() {
            None
        } else {
            let digits = f
                .strip_prefix("AS")
                .or_else(|| f.strip_prefix("as"))
                .unwrap_or(f);
            Some(
                digits
                    .parse::<u32>()
                    .map_err(|_| err(c, format!("invalid ASN {f:?}")))?,
            )
        };
        rows.push(CsvRow {
            network: network.trunc(),
            country,
            continent,
            location,
            asn,
        });
    }
    Ok(rows)
}

/// Compile CSV rows into MaxMind DB bytes.
pub fn build_mmdb(rows: &[CsvRow]) -> Result<Vec<u8>, GeoError> {
    let mut w = mmdb::Writer::new("GeoIP2-City", "meridian-dns geo build");
    w.set_build_epoch(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    for r in rows {
        w.insert(r.network, &r.to_value())?;
    }
    Ok(w.build()?)
}

/// Parse CSV text and compile it.
pub fn build_from_csv(text: &str, path: &Path) -> Result<Vec<u8>, GeoError> {
    build_mmdb(&parse_csv(text, path)?)
}

/// The embedded demo GeoIP table (see `docs/dns.md`).
pub const DEMO_CSV: &str = include_str!("../../examples/demo-geo.csv");

/// An IPv6 address is "unspecified-ish" if it carries no routing meaning.
pub fn is_unspecified(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_unspecified(),
        IpAddr::V6(v6) => v6 == Ipv6Addr::UNSPECIFIED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn demo() -> GeoDb {
        let bytes = build_from_csv(DEMO_CSV, Path::new("demo-geo.csv")).expect("demo csv");
        GeoDb::from_bytes(Some(bytes), None).expect("reader")
    }

    #[test]
    fn demo_table_lookups() {
        let db = demo();
        let paris = db.lookup("198.51.100.7".parse().expect("ip"));
        assert_eq!(paris.country.map(|c| c.to_string()).as_deref(), Some("FR"));
        assert_eq!(paris.prefix_len, 24);
        assert_eq!(paris.location, Some((48.86, 2.35)));
        let syd = db.lookup("2001:db8:2::99".parse().expect("ip"));
        assert_eq!(syd.country.map(|c| c.to_string()).as_deref(), Some("AU"));
        assert_eq!(syd.prefix_len, 48);
        let mapped = db.lookup("::ffff:203.0.113.9".parse().expect("ip"));
        assert_eq!(mapped.country, Code::parse("AU"));
        let unknown = db.lookup("192.0.2.55".parse().expect("ip"));
        assert!(unknown.is_unknown());
        assert!(unknown.prefix_len > 0);
    }

    /// The country-only lookup (the edge's) agrees with the full one.
    #[test]
    fn country_lookup_matches_the_full_lookup() {
        let db = demo();
        for ip in [
            "198.51.100.7",
            "2001:db8:2::99",
            "::ffff:203.0.113.9",
            "192.0.2.55",
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(db.country(ip), db.lookup(ip).country, "{ip}");
        }
        assert_eq!(
            db.country("198.51.100.7".parse().expect("ip")),
            Code::parse("FR")
        );
    }

    /// A file that is not a database is refused with its path.
    #[test]
    fn bad_databases_are_refused_with_their_path() {
        let e = GeoDb::from_bytes(Some(b"junk".to_vec()), None).expect_err("junk");
        let e = GeoError::from(e);
        assert!(
            e.to_string().starts_with("<city>: invalid MaxMind DB"),
            "{e}"
        );
    }

    #[test]
    fn csv_errors_have_positions() {
        let e = parse_csv(
            "network,country,continent,lat,lon,asn\n10.0.0.0/8,FR,EU,100,2,\n",
            Path::new("x.csv"),
        )
        .expect_err("bad lat");
        let s = e.to_string();
        assert!(s.starts_with("x.csv:2:18:"), "{s}");
        let e = parse_csv("nope,,,,,\n", Path::new("x.csv")).expect_err("bad net");
        assert!(e.to_string().starts_with("x.csv:1:1:"), "{e}");
        assert!(parse_csv("10.0.0.0/8,FR\n", Path::new("x.csv")).is_err());
    }

    fn arb_row() -> impl Strategy<Value = CsvRow> {
        let net = prop_oneof![
            (any::<u32>(), 8u8..=32).prop_map(|(a, l)| {
                IpNet::V4(ipnet::Ipv4Net::new(a.into(), l).expect("len").trunc())
            }),
            (any::<u128>(), 16u8..=128).prop_map(|(a, l)| {
                IpNet::V6(ipnet::Ipv6Net::new(a.into(), l).expect("len").trunc())
            }),
        ];
        let code = proptest::option::of("[A-Z]{2}".prop_map(|s| Code::parse(&s).expect("code")));
        let loc = proptest::option::of((-90.0f64..=90.0, -180.0f64..=180.0));
        (
            net,
            code.clone(),
            code,
            loc,
            proptest::option::of(any::<u32>()),
        )
            .prop_map(|(network, country, continent, location, asn)| CsvRow {
                network,
                country,
                continent,
                location,
                asn,
            })
    }

    /// Reference lookup: the most specific row containing `ip`, last one
    /// winning among equal networks.
    fn reference(rows: &[CsvRow], ip: IpAddr) -> Option<&CsvRow> {
        let mut best: Option<&CsvRow> = None;
        for r in rows {
            if mmdb::contains(&r.network, ip)
                && best.is_none_or(|b| r.network.prefix_len() >= b.network.prefix_len())
            {
                best = Some(r);
            }
        }
        best
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]
        #[test]
        fn written_db_agrees_with_reference(rows in proptest::collection::vec(arb_row(), 1..40),
                                            probes in proptest::collection::vec(any::<u128>(), 1..40)) {
            let bytes = build_mmdb(&rows).expect("build");
            let db = GeoDb::from_bytes(Some(bytes), None).expect("reader");
            // Probe inside every network and at random addresses.
            let mut ips: Vec<IpAddr> = rows.iter().map(|r| r.network.addr()).collect();
            for p in probes {
                ips.push(IpAddr::V6(p.into()));
                ips.push(IpAddr::V4((p as u32).into()));
            }
            for ip in ips {
                let got = db.lookup(ip);
                let want = reference(&rows, ip);
                match want {
                    None => prop_assert!(got.is_unknown(), "{ip}: {got:?}"),
                    Some(r) => {
                        prop_assert_eq!(got.country, r.country);
                        prop_assert_eq!(got.continent, r.continent);
                        prop_assert_eq!(got.location, r.location);
                        prop_assert_eq!(got.asn, r.asn);
                        prop_assert!(got.prefix_len >= r.network.prefix_len(), "{ip}");
                    }
                }
            }
        }

        #[test]
        fn csv_round_trips(rows in proptest::collection::vec(arb_row(), 0..20)) {
            let mut text = String::from("network,country,continent,lat,lon,asn\n");
            for r in &rows {
                let (lat, lon) = r.location.map(|(a, b)| (a.to_string(), b.to_string())).unwrap_or_default();
                text.push_str(&format!("{},{},{},{},{},{}\n", r.network,
                    r.country.map(|c| c.to_string()).unwrap_or_default(),
                    r.continent.map(|c| c.to_string()).unwrap_or_default(),
                    lat, lon, r.asn.map(|a| format!("AS{a}")).unwrap_or_default()));
            }
            let parsed = parse_csv(&text, Path::new("t.csv")).expect("parse");
            prop_assert_eq!(parsed, rows);
        }

        #[test]
        fn csv_parser_never_panics(s in "\\PC{0,200}") {
            let _ = parse_csv(&s, Path::new("t.csv"));
        }
    }
}
