//! # meridian-geo
//!
//! GeoIP lookups in MaxMind-format databases (City/Country and ASN), shared
//! by the DNS server (steering) and the edge (the plugins'
//! `meridian.client.country`).
//!
//! Entry point: [`GeoDb`], built from database bytes ([`GeoDb::from_bytes`])
//! or a file ([`GeoDb::open`]); [`GeoDb::lookup`] maps an address to a
//! [`GeoInfo`], and [`GeoDb::country`] to its country alone. Writing
//! databases (the DNS server's CSV compiler) is not here.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A two-letter code (ISO country or continent), stored inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Code([u8; 2]);

impl Code {
    /// Parse a two-letter ASCII code, case-insensitively.
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() == 2 && b.iter().all(u8::is_ascii_alphabetic) {
            Some(Self([b[0].to_ascii_uppercase(), b[1].to_ascii_uppercase()]))
        } else {
            None
        }
    }

    /// The code as a string slice.
    pub fn as_str(&self) -> &str {
        // Only ASCII letters are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the GeoIP databases know about one address.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GeoInfo {
    /// ISO 3166 country code.
    pub country: Option<Code>,
    /// Continent code (AF, AN, AS, EU, NA, OC, SA).
    pub continent: Option<Code>,
    /// Latitude and longitude in degrees.
    pub location: Option<(f64, f64)>,
    /// Autonomous system number.
    pub asn: Option<u32>,
    /// Prefix length (in the address's own family) of the most specific
    /// database network consulted, found or not: the answer is valid for
    /// the whole of that network.
    pub prefix_len: u8,
}

impl GeoInfo {
    /// True when nothing is known about the address.
    pub fn is_unknown(&self) -> bool {
        self.country.is_none()
            && self.continent.is_none()
            && self.location.is_none()
            && self.asn.is_none()
    }
}

/// Errors from opening a database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// maxminddb refused the database.
    #[error("{path}: invalid MaxMind DB: {source}")]
    Db {
        /// The file (or `<city>`, `<asn>` for bytes).
        path: PathBuf,
        /// The cause.
        source: maxminddb::MaxMindDbError,
    },
}

#[derive(Deserialize)]
struct Names<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
    #[serde(borrow, default)]
    code: Option<&'a str>,
}

impl Names<'_> {
    fn country(&self) -> Option<Code> {
        self.iso_code.or(self.code).and_then(Code::parse)
    }
}

#[derive(Deserialize)]
struct Location {
    latitude: Option<f64>,
    longitude: Option<f64>,
}

#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow, default)]
    country: Option<Names<'a>>,
    #[serde(borrow, default)]
    continent: Option<Names<'a>>,
    #[serde(default)]
    location: Option<Location>,
    #[serde(default)]
    autonomous_system_number: Option<u32>,
}

/// The country alone: what a per-request lookup needs.
#[derive(Deserialize)]
struct CountryRecord<'a> {
    #[serde(borrow, default)]
    country: Option<Names<'a>>,
}

type Reader = maxminddb::Reader<Vec<u8>>;

/// One or two MaxMind readers: a City/Country database and an optional ASN
/// database. Either may also carry the other's fields.
#[derive(Default)]
pub struct GeoDb {
    city: Option<Reader>,
    asn: Option<Reader>,
}

impl fmt::Debug for GeoDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeoDb")
            .field(
                "city",
                &self.city.as_ref().map(|r| &r.metadata().database_type),
            )
            .field(
                "asn",
                &self.asn.as_ref().map(|r| &r.metadata().database_type),
            )
            .finish()
    }
}

/// Map IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) to IPv4.
pub fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn reader(bytes: Vec<u8>, path: &Path) -> Result<Reader, OpenError> {
    maxminddb::Reader::from_source(bytes).map_err(|source| OpenError::Db {
        path: path.to_path_buf(),
        source,
    })
}

impl GeoDb {
    /// No databases: every lookup is unknown.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Build from raw database bytes.
    pub fn from_bytes(city: Option<Vec<u8>>, asn: Option<Vec<u8>>) -> Result<Self, OpenError> {
        Ok(Self {
            city: city.map(|b| reader(b, Path::new("<city>"))).transpose()?,
            asn: asn.map(|b| reader(b, Path::new("<asn>"))).transpose()?,
        })
    }

    /// One City/Country database read whole from `path`.
    pub fn open(path: &Path) -> Result<Self, OpenError> {
        let bytes = std::fs::read(path).map_err(|source| OpenError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            city: Some(reader(bytes, path)?),
            asn: None,
        })
    }

    /// True if at least one database is loaded.
    pub fn is_loaded(&self) -> bool {
        self.city.is_some() || self.asn.is_some()
    }

    fn readers(&self) -> impl Iterator<Item = &Reader> {
        [&self.city, &self.asn].into_iter().flatten()
    }

    /// Look an address up in every loaded database.
    pub fn lookup(&self, ip: IpAddr) -> GeoInfo {
        let ip = normalize(ip);
        let mut info = GeoInfo::default();
        for reader in self.readers() {
            Self::lookup_one(reader, ip, &mut info);
        }
        info
    }

    /// The ISO 3166 alpha-2 country of `ip`, from the first database that
    /// knows it. Decodes the country alone.
    pub fn country(&self, ip: IpAddr) -> Option<Code> {
        let ip = normalize(ip);
        self.readers().find_map(|r| {
            let rec = r.lookup(ip).ok()?.decode::<CountryRecord<'_>>().ok()??;
            rec.country?.country()
        })
    }

    fn lookup_one(reader: &Reader, ip: IpAddr, info: &mut GeoInfo) {
        let Ok(res) = reader.lookup(ip) else {
            return;
        };
        if let Ok(net) = res.network() {
            info.prefix_len = info.prefix_len.max(net.prefix());
        }
        let Ok(Some(rec)) = res.decode::<Record<'_>>() else {
            return;
        };
        if info.country.is_none() {
            info.country = rec.country.and_then(|c| c.country());
        }
        if info.continent.is_none() {
            info.continent = rec
                .continent
                .and_then(|c| c.code.or(c.iso_code))
                .and_then(Code::parse);
        }
        if info.location.is_none()
            && let Some(Location {
                latitude: Some(lat),
                longitude: Some(lon),
            }) = rec.location
            && lat.is_finite()
            && lon.is_finite()
        {
            info.location = Some((lat, lon));
        }
        if info.asn.is_none() {
            info.asn = rec.autonomous_system_number;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_two_letters_upper_cased() {
        assert_eq!(Code::parse("de").map(|c| c.to_string()), Some("DE".into()));
        assert!(Code::parse("DEU").is_none());
        assert!(Code::parse("1a").is_none());
    }

    #[test]
    fn mapped_addresses_are_ipv4() {
        let ip: IpAddr = "::ffff:192.0.2.1".parse().expect("addr");
        assert_eq!(normalize(ip), "192.0.2.1".parse::<IpAddr>().expect("addr"));
    }

    #[test]
    fn no_database_knows_nothing() {
        let db = GeoDb::empty();
        let ip: IpAddr = "192.0.2.1".parse().expect("addr");
        assert!(db.lookup(ip).is_unknown());
        assert_eq!(db.country(ip), None);
        assert!(!db.is_loaded());
    }

    #[test]
    fn bad_bytes_and_missing_files_are_errors() {
        let e = GeoDb::from_bytes(Some(b"not a db".to_vec()), None).expect_err("junk");
        assert!(
            e.to_string().starts_with("<city>: invalid MaxMind DB"),
            "{e}"
        );
        let e = GeoDb::open(Path::new("/nonexistent/geo.mmdb")).expect_err("missing");
        assert!(matches!(e, OpenError::Io { .. }), "{e}");
    }
}
