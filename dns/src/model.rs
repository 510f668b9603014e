//! The validated, ready-to-serve form of a [`Config`]: zones loaded, region
//! and policy references resolved to indices, GeoIP sources read.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hickory_proto::rr::{LowerName, Name, RecordType};

use crate::config::{Config, ConfigError, ConfigErrors, HealthKind, Seg, locate};
use crate::geo::{self, Code, GeoDb};
use crate::steering::{Match, Policy, Region};
use crate::zone::{Zone, Zones};

/// A steered name with its resolved policy.
#[derive(Debug, Clone)]
pub struct Steered {
    /// The name as configured.
    pub name: Name,
    /// Resolved policy.
    pub policy: Policy,
    /// TTL of its answers.
    pub ttl: u32,
}

/// Everything derived from one configuration file.
#[derive(Debug, Clone)]
pub struct Model {
    /// The parsed configuration.
    pub config: Config,
    /// Where it came from (None for the embedded demo).
    pub path: Option<PathBuf>,
    /// Zones.
    pub zones: Zones,
    /// Regions, in configuration order.
    pub regions: Vec<Region>,
    /// Steered names.
    pub steered: HashMap<LowerName, Steered>,
    /// Admin API tokens.
    pub admin: crate::admin::AdminAuth,
    /// Zone transfer and NOTIFY settings, TSIG keys.
    pub transfer: crate::transfer::Transfers,
    /// Signed zones (DNSSEC), by apex.
    pub dnssec: crate::dnssec::Signers,
}

/// Reads files referenced by a config (zones, GeoIP); swapped out for the
/// embedded demo.
pub trait FileSource: Send + Sync {
    /// Read a text file.
    fn read_to_string(&self, path: &Path) -> std::io::Result<String>;
    /// Read a binary file.
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>>;
}

/// The real file system.
#[derive(Debug, Clone, Copy)]
pub struct Fs;

impl FileSource for Fs {
    fn read_to_string(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        std::fs::read(path)
    }
}

/// The embedded demo's files.
#[derive(Debug, Clone, Copy)]
pub struct DemoFiles;

/// The embedded demo configuration.
pub const DEMO_CONFIG: &str = include_str!("../examples/demo.toml");
/// The embedded demo zone.
pub const DEMO_ZONE: &str = include_str!("../examples/demo.meridian.test.zone");

impl FileSource for DemoFiles {
    fn read_to_string(&self, path: &Path) -> std::io::Result<String> {
        match path.file_name().and_then(|f| f.to_str()) {
            Some("demo.meridian.test.zone") => Ok(DEMO_ZONE.to_owned()),
            Some("demo-geo.csv") => Ok(geo::DEMO_CSV.to_owned()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not part of the embedded demo",
            )),
        }
    }
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        self.read_to_string(path).map(String::into_bytes)
    }
}

/// Resolve a path from the config relative to the config's directory.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

struct Errs<'a> {
    src: &'a str,
    file: &'a Path,
    list: Vec<ConfigError>,
}

impl Errs<'_> {
    fn at(&mut self, path: &[Seg<'_>], reason: impl Into<String>) {
        let (line, col) = locate(self.src, path);
        self.list.push(ConfigError {
            file: self.file.to_owned(),
            line,
            col,
            reason: reason.into(),
        });
    }
    fn raw(&mut self, reason: String) {
        // Errors already formatted as `file:line:col: reason`.
        let mut parts = reason.splitn(4, ':');
        let (f, l, c, r) = (parts.next(), parts.next(), parts.next(), parts.next());
        match (
            f,
            l.and_then(|l| l.parse().ok()),
            c.and_then(|c| c.parse().ok()),
            r,
        ) {
            (Some(f), Some(line), Some(col), Some(r)) => self.list.push(ConfigError {
                file: PathBuf::from(f),
                line,
                col,
                reason: r.trim().to_owned(),
            }),
            _ => self.list.push(ConfigError {
                file: self.file.to_owned(),
                line: 1,
                col: 1,
                reason,
            }),
        }
    }
}

fn fqdn(s: &str) -> Option<Name> {
    let mut n = Name::from_ascii(s).ok()?;
    n.set_fqdn(true);
    Some(n)
}

/// Parse, validate and load a configuration. `file` names the config in
/// errors and anchors relative paths; `files` reads zone and GeoIP files.
pub fn load(
    src: &str,
    file: &Path,
    files: &dyn FileSource,
) -> Result<(Model, GeoDb), ConfigErrors> {
    let config = Config::parse(src, file)?;
    let base = file.parent().unwrap_or(Path::new(".")).to_owned();
    let mut e = Errs {
        src,
        file,
        list: Vec::new(),
    };
    use Seg::{Idx, Key};

    // [server], [ecs], [rrl]
    if config.server.listen.is_empty() {
        e.at(
            &[Key("server"), Key("listen")],
            "at least one listen address is required",
        );
    }
    if config.server.udp_max_payload < 512 {
        e.at(
            &[Key("server"), Key("udp_max_payload")],
            "must be at least 512",
        );
    }
    if config.ecs.max_scope_v4 > 32 {
        e.at(&[Key("ecs"), Key("max_scope_v4")], "must be at most 32");
    }
    if config.ecs.max_scope_v6 > 128 {
        e.at(&[Key("ecs"), Key("max_scope_v6")], "must be at most 128");
    }
    if config.rrl.responses_per_second == 0 {
        e.at(
            &[Key("rrl"), Key("responses_per_second")],
            "must be at least 1",
        );
    }
    if config.rrl.ipv4_prefix > 32 {
        e.at(&[Key("rrl"), Key("ipv4_prefix")], "must be at most 32");
    }
    if config.rrl.ipv6_prefix > 128 {
        e.at(&[Key("rrl"), Key("ipv6_prefix")], "must be at most 128");
    }

    // Zones.
    let mut zones = Zones::default();
    let mut dnssec = crate::dnssec::Signers::default();
    for (i, z) in config.zones.iter().enumerate() {
        let Some(origin) = fqdn(&z.origin) else {
            e.at(
                &[Key("zones"), Idx(i), Key("origin")],
                format!("invalid zone origin {:?}", z.origin),
            );
            continue;
        };
        if zones.iter().any(|x| *x.origin() == LowerName::new(&origin)) {
            e.at(
                &[Key("zones"), Idx(i), Key("origin")],
                format!("zone {origin} is configured twice"),
            );
            continue;
        }
        let path = resolve(&base, &z.file);
        let text = match files.read_to_string(&path) {
            Ok(t) => t,
            Err(err) => {
                e.at(
                    &[Key("zones"), Idx(i), Key("file")],
                    format!("cannot read {}: {err}", path.display()),
                );
                continue;
            }
        };
        match Zone::parse(&text, &path, &origin) {
            Ok(zone) => zones.push(zone),
            Err(err) => e.raw(err.to_string()),
        }
        if let Some(d) = &z.dnssec {
            load_signer(&mut e, &mut dnssec, i, &origin, d, &base);
        }
    }

    // Regions.
    let mut regions = Vec::new();
    let mut region_idx: HashMap<&str, usize> = HashMap::new();
    for (i, r) in config.regions.iter().enumerate() {
        let at = |k: &'static str| [Key("regions"), Idx(i), Key(k)];
        if r.name.is_empty() {
            e.at(&at("name"), "region name must not be empty");
        }
        if region_idx.insert(&r.name, i).is_some() {
            e.at(&at("name"), format!("duplicate region name {:?}", r.name));
        }
        if !(r.lat.is_finite() && (-90.0..=90.0).contains(&r.lat)) {
            e.at(&at("lat"), "latitude must be within -90..90");
        }
        if !(r.lon.is_finite() && (-180.0..=180.0).contains(&r.lon)) {
            e.at(&at("lon"), "longitude must be within -180..180");
        }
        let mut a = Vec::new();
        let mut aaaa = Vec::new();
        for (j, ans) in r.a.iter().enumerate() {
            match ans.parts() {
                (IpAddr::V4(v4), w) => a.push((v4, w)),
                (IpAddr::V6(_), _) => e.at(
                    &[Key("regions"), Idx(i), Key("a"), Idx(j)],
                    "IPv6 address in `a`; put it in `aaaa`",
                ),
            }
        }
        for (j, ans) in r.aaaa.iter().enumerate() {
            match ans.parts() {
                (IpAddr::V6(v6), w) => aaaa.push((v6, w)),
                (IpAddr::V4(_), _) => e.at(
                    &[Key("regions"), Idx(i), Key("aaaa"), Idx(j)],
                    "IPv4 address in `aaaa`; put it in `a`",
                ),
            }
        }
        if a.is_empty() && aaaa.is_empty() {
            e.at(
                &at("name"),
                format!("region {:?} has no answers (a or aaaa)", r.name),
            );
        }
        let h = &r.health;
        let hat = |k: &'static str| [Key("regions"), Idx(i), Key("health"), Key(k)];
        if h.kind != HealthKind::None {
            if h.rise == 0 {
                e.at(&hat("rise"), "must be at least 1");
            }
            if h.fall == 0 {
                e.at(&hat("fall"), "must be at least 1");
            }
            if h.interval_ms < 10 {
                e.at(&hat("interval_ms"), "must be at least 10");
            }
            if h.timeout_ms == 0 {
                e.at(&hat("timeout_ms"), "must be at least 1");
            }
            if !h.path.starts_with('/') {
                e.at(&hat("path"), "must start with '/'");
            }
            if h.address.is_none() && h.kind == HealthKind::Tcp && h.port.is_none() {
                e.at(&hat("kind"), "tcp checks need `address` or `port`");
            }
            if h.address.is_none() && r.a.is_empty() && r.aaaa.is_empty() {
                e.at(&hat("kind"), "no `address` and no answer to probe");
            }
        }
        regions.push(Region {
            name: Arc::from(r.name.as_str()),
            lat: r.lat,
            lon: r.lon,
            weight: r.weight,
            a,
            aaaa,
        });
    }

    // Steered names.
    let mut steered = HashMap::new();
    for (i, s) in config.steered.iter().enumerate() {
        let at = |k: &'static str| [Key("steered"), Idx(i), Key(k)];
        let Some(name) = fqdn(&s.name) else {
            e.at(&at("name"), format!("invalid name {:?}", s.name));
            continue;
        };
        let lname = LowerName::new(&name);
        match zones.find_mut(&lname) {
            None => e.at(
                &at("name"),
                format!("{name} is not inside any configured zone"),
            ),
            Some(zone) => {
                let clash: Vec<RecordType> = zone
                    .types_at(&lname)
                    .into_iter()
                    .filter(|t| matches!(t, RecordType::A | RecordType::AAAA | RecordType::CNAME))
                    .collect();
                if !clash.is_empty() {
                    e.at(
                        &at("name"),
                        format!(
                            "{name} is steered but the zone file also has {clash:?} records for it"
                        ),
                    );
                }
                zone.add_name(&lname);
            }
        }
        if steered.contains_key(&lname) {
            e.at(&at("name"), format!("{name} is steered twice"));
        }
        let lookup = |e: &mut Errs<'_>, r: &str, path: &[Seg<'_>]| -> Option<usize> {
            let idx = region_idx.get(r).copied();
            if idx.is_none() {
                e.at(path, format!("unknown region {r:?}"));
            }
            idx
        };
        let mut members = Vec::new();
        if s.regions.is_empty() {
            members = (0..regions.len()).collect();
        } else {
            for (j, r) in s.regions.iter().enumerate() {
                if let Some(x) =
                    lookup(&mut e, r, &[Key("steered"), Idx(i), Key("regions"), Idx(j)])
                {
                    members.push(x);
                }
            }
        }
        if members.is_empty() {
            e.at(&at("regions"), "a steered name needs at least one region");
        }
        let default_region = s.default_region.as_deref().and_then(|r| {
            let x = lookup(&mut e, r, &at("default_region"))?;
            if !members.contains(&x) {
                e.at(
                    &at("default_region"),
                    format!("default region {r:?} is not one of this name's regions"),
                );
            }
            Some(x)
        });
        let mut overrides = Vec::new();
        for (j, o) in s.overrides.iter().enumerate() {
            let oat = |k: &'static str| [Key("steered"), Idx(i), Key("overrides"), Idx(j), Key(k)];
            let set = [o.asn.is_some(), o.country.is_some(), o.continent.is_some()]
                .iter()
                .filter(|b| **b)
                .count();
            if set != 1 {
                e.at(
                    &oat("region"),
                    "an override needs exactly one of `asn`, `country`, `continent`",
                );
                continue;
            }
            let m = if let Some(a) = &o.asn {
                match a.number() {
                    Some(n) => Match::Asn(n),
                    None => {
                        e.at(&oat("asn"), format!("invalid ASN {a:?}"));
                        continue;
                    }
                }
            } else if let Some(c) = &o.country {
                match Code::parse(c) {
                    Some(c) => Match::Country(c),
                    None => {
                        e.at(&oat("country"), format!("invalid country code {c:?}"));
                        continue;
                    }
                }
            } else if let Some(c) = &o.continent {
                match Code::parse(c) {
                    Some(c) if ["AF", "AN", "AS", "EU", "NA", "OC", "SA"].contains(&c.as_str()) => {
                        Match::Continent(c)
                    }
                    _ => {
                        e.at(
                            &oat("continent"),
                            format!("invalid continent code {c:?} (AF AN AS EU NA OC SA)"),
                        );
                        continue;
                    }
                }
            } else {
                continue;
            };
            if let Some(x) = lookup(&mut e, &o.region, &oat("region")) {
                if !members.contains(&x) {
                    e.at(
                        &oat("region"),
                        format!(
                            "override region {:?} is not one of this name's regions",
                            o.region
                        ),
                    );
                }
                overrides.push((m, x));
            }
        }
        if s.max_answers == 0 {
            e.at(&at("max_answers"), "must be at least 1");
        }
        steered.insert(
            lname,
            Steered {
                name,
                policy: Policy {
                    regions: members,
                    default_region,
                    overrides,
                    max_answers: s.max_answers,
                    fail_mode: s.fail_mode,
                },
                ttl: s.ttl.unwrap_or(config.server.steered_ttl),
            },
        );
    }

    // GeoIP.
    let geo = match load_geo(&config, &base, files) {
        Ok(g) => g,
        Err(err) => {
            e.raw(err.to_string());
            GeoDb::empty()
        }
    };
    if config.geoip.csv.is_some() && config.geoip.city_db.is_some() {
        e.at(
            &[Key("geoip"), Key("csv")],
            "set either `csv` or `city_db`, not both",
        );
    }

    // [admin]
    let (admin, problems) = crate::admin::resolve_auth(&config, &base, files);
    for (path, reason) in problems {
        e.at(&path, reason);
    }
    // [[tsig_keys]], [zones.transfer], [[zones.notify]]
    let (transfer, problems) = crate::transfer::resolve(&config, &base, files);
    for (path, reason) in problems {
        e.at(&path, reason);
    }

    if !e.list.is_empty() {
        return Err(ConfigErrors(e.list));
    }
    Ok((
        Model {
            config,
            path: Some(file.to_owned()),
            zones,
            regions,
            steered,
            admin,
            transfer,
            dnssec,
        },
        geo,
    ))
}

/// Load a zone's DNSSEC keys and build its signer; errors point at the
/// key's `file` (or at `dnssec`).
fn load_signer(
    e: &mut Errs<'_>,
    signers: &mut crate::dnssec::Signers,
    i: usize,
    origin: &Name,
    d: &crate::dnssec::DnssecConfig,
    base: &Path,
) {
    use Seg::{Idx, Key};
    let mut keys = Vec::new();
    for (j, k) in d.keys.iter().enumerate() {
        let path = resolve(base, &k.file);
        match crate::dnssec::keys::ZoneKey::load(&path, k.role, k.active) {
            Ok(key) => keys.push(key),
            Err(err) => e.at(
                &[
                    Key("zones"),
                    Idx(i),
                    Key("dnssec"),
                    Key("keys"),
                    Idx(j),
                    Key("file"),
                ],
                err.to_string(),
            ),
        }
    }
    if keys.len() != d.keys.len() {
        return;
    }
    match crate::dnssec::ZoneSigner::new(origin, d, keys) {
        Ok(s) => signers.insert(s),
        Err(reason) => e.at(&[Key("zones"), Idx(i), Key("dnssec")], reason),
    }
}

/// Load the GeoIP databases a config names.
pub fn load_geo(
    config: &Config,
    base: &Path,
    files: &dyn FileSource,
) -> Result<GeoDb, geo::GeoError> {
    let read = |p: &Path| {
        let path = resolve(base, p);
        files
            .read(&path)
            .map_err(|source| geo::GeoError::Io {
                path: path.clone(),
                source,
            })
            .map(|b| (path, b))
    };
    let city = match (&config.geoip.csv, &config.geoip.city_db) {
        (Some(csv), _) => {
            let (path, bytes) = read(csv)?;
            let text = String::from_utf8_lossy(&bytes);
            Some(geo::build_from_csv(&text, &path)?)
        }
        (None, Some(db)) => Some(read(db)?.1),
        (None, None) => None,
    };
    let asn = config
        .geoip
        .asn_db
        .as_deref()
        .map(|p| read(p).map(|x| x.1))
        .transpose()?;
    Ok(GeoDb::from_bytes(city, asn)?)
}

/// The files whose change triggers a GeoIP reload.
pub fn geo_files(config: &Config, base: &Path) -> Vec<PathBuf> {
    [
        &config.geoip.csv,
        &config.geoip.city_db,
        &config.geoip.asn_db,
    ]
    .into_iter()
    .flatten()
    .map(|p| resolve(base, p))
    .collect()
}

/// Load the embedded demo.
pub fn load_demo() -> Result<(Model, GeoDb), ConfigErrors> {
    let (mut model, geo) = load(
        DEMO_CONFIG,
        Path::new("<embedded demo>/demo.toml"),
        &DemoFiles,
    )?;
    model.path = None;
    Ok((model, geo))
}

/// Load a config file from disk.
pub fn load_file(path: &Path) -> Result<(Model, GeoDb), ConfigErrors> {
    let src = std::fs::read_to_string(path).map_err(|err| {
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            line: 1,
            col: 1,
            reason: format!("cannot read: {err}"),
        }])
    })?;
    load(&src, path, &Fs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_loads() {
        let (m, geo) = load_demo().expect("demo");
        assert_eq!(m.regions.len(), 3);
        assert_eq!(m.steered.len(), 1);
        assert!(geo.is_loaded());
    }

    /// Every example config under `dns/examples/` must load.
    #[test]
    fn every_example_config_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("examples dir") {
            let path = entry.expect("entry").path();
            if path.extension().and_then(|e| e.to_str()) == Some("toml") {
                if let Err(e) = load_file(&path) {
                    panic!("{}: {e}", path.display());
                }
                n += 1;
            }
        }
        assert!(n >= 2, "expected example configs, found {n}");
    }

    #[test]
    fn semantic_errors_are_located() {
        let src = r#"
[[zones]]
origin = "demo.meridian.test."
file = "demo.meridian.test.zone"

[[regions]]
name = "a"
lat = 95.0
lon = 0.0
a = ["192.0.2.1"]

[[steered]]
name = "www.demo.meridian.test."
regions = ["a", "nope"]
"#;
        let e = load(src, Path::new("/x/c.toml"), &DemoFiles).expect_err("errors");
        let s = e.to_string();
        assert!(s.contains("/x/c.toml:8:7: latitude"), "{s}");
        assert!(
            s.contains("/x/c.toml:14:17: unknown region \"nope\""),
            "{s}"
        );
    }

    #[test]
    fn zone_errors_point_into_the_zone_file() {
        struct Bad;
        impl FileSource for Bad {
            fn read_to_string(&self, _: &Path) -> std::io::Result<String> {
                Ok("$TTL 60\n@ IN SOA ns h 1 2 3 4 5\nwww IN A 999.1.1.1\n".into())
            }
            fn read(&self, p: &Path) -> std::io::Result<Vec<u8>> {
                self.read_to_string(p).map(String::into_bytes)
            }
        }
        let src = "[[zones]]\norigin = \"t.\"\nfile = \"t.zone\"\n";
        let e = load(src, Path::new("/c/c.toml"), &Bad).expect_err("bad zone");
        assert_eq!(e.0[0].file, PathBuf::from("/c/t.zone"));
        assert_eq!(e.0[0].line, 3);
    }
}
