//! Configuration: one TOML file, parsed with `deny_unknown_fields` and
//! explicit defaults, then validated. Errors carry `file:line:col`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners and protocol limits.
    #[serde(default)]
    pub server: ServerConfig,
    /// GeoIP databases.
    #[serde(default)]
    pub geoip: GeoIpConfig,
    /// EDNS Client Subnet behaviour.
    #[serde(default)]
    pub ecs: EcsConfig,
    /// Response rate limiting.
    #[serde(default)]
    pub rrl: RrlConfig,
    /// Zones served from RFC 1035 zone files.
    #[serde(default)]
    pub zones: Vec<ZoneConfig>,
    /// Regions that steered names answer with.
    #[serde(default)]
    pub regions: Vec<RegionConfig>,
    /// Names answered by the steering policy.
    #[serde(default)]
    pub steered: Vec<SteeredConfig>,
    /// The admin API: where it listens and who may use it.
    #[serde(default)]
    pub admin: AdminConfig,
    /// TSIG keys, referred to by name from `[zones.transfer]` and
    /// `[[zones.notify]]`.
    #[serde(default)]
    pub tsig_keys: Vec<TsigKeyConfig>,
}

/// `[admin]`: the same contract as the edge's admin.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin HTTP listener. Default `127.0.0.1:9953` (or `server.admin`,
    /// the older spelling; set one of the two).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Bearer token with full access.
    #[serde(default)]
    pub token: Option<String>,
    /// Read the full-access token from this file (trailing whitespace
    /// trimmed), relative to the config file's directory.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Bearer token for the read-only GET endpoints (`/metrics`,
    /// `/regions`). Absent: reads need the full token.
    #[serde(default)]
    pub read_token: Option<String>,
    /// Read the read-only token from this file.
    #[serde(default)]
    pub read_token_file: Option<PathBuf>,
}

/// `[[tsig_keys]]`: a shared secret (RFC 8945).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TsigKeyConfig {
    /// Key name, e.g. `xfr-key.` (as the secondary names it).
    pub name: String,
    /// `hmac-sha256` (default), `hmac-sha384` or `hmac-sha512`.
    #[serde(default = "default_tsig_algorithm")]
    pub algorithm: String,
    /// The secret, base64.
    #[serde(default)]
    pub secret: Option<String>,
    /// Read the base64 secret from this file instead.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
}

fn default_tsig_algorithm() -> String {
    "hmac-sha256".into()
}

/// `[zones.transfer]`: who may AXFR/IXFR the zone. Default: nobody.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct TransferConfig {
    /// Client networks allowed (`"192.0.2.53"`, `"2001:db8::/32"`). A
    /// request must come from one of them.
    #[serde(default)]
    pub allow: Vec<String>,
    /// TSIG key names; when not empty the request must also be signed with
    /// one of them.
    #[serde(default)]
    pub keys: Vec<String>,
}

/// `[[zones.notify]]`: a secondary told of every change (RFC 1996).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// The secondary's address (UDP).
    pub address: SocketAddr,
    /// Sign the NOTIFY with this TSIG key.
    #[serde(default)]
    pub key: Option<String>,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// DNS listen addresses; each gets UDP and TCP. Default `127.0.0.1:5353`.
    #[serde(default = "default_listen")]
    pub listen: Vec<SocketAddr>,
    /// Admin HTTP listener (older spelling of `admin.listen`).
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    /// Idle timeout of TCP connections in seconds (Knot's
    /// `tcp-idle-timeout`): a connection that completes no query within it
    /// is closed. Default 10.
    #[serde(default = "default_tcp_timeout")]
    pub tcp_timeout_secs: u64,
    /// Most TCP connections open at once (Knot's `tcp-max-clients`); more
    /// are closed as soon as accepted. Default 1000.
    #[serde(default = "default_tcp_max_clients")]
    pub tcp_max_clients: usize,
    /// Most TCP connections open at once from one client address. Default
    /// 64.
    #[serde(default = "default_tcp_max_clients_per_ip")]
    pub tcp_max_clients_per_ip: usize,
    /// Largest UDP response we send, whatever the client advertises
    /// (clamped to at least 512). Default 1232.
    #[serde(default = "default_udp_payload")]
    pub udp_max_payload: u16,
    /// TTL of steered answers, seconds. Default 30.
    #[serde(default = "default_steered_ttl")]
    pub steered_ttl: u32,
}

fn default_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([127, 0, 0, 1], 5353))]
}
/// The admin address when neither `admin.listen` nor `server.admin` is set.
pub fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9953))
}
fn default_tcp_timeout() -> u64 {
    10
}
fn default_tcp_max_clients() -> usize {
    1000
}
fn default_tcp_max_clients_per_ip() -> usize {
    64
}
fn default_udp_payload() -> u16 {
    1232
}
fn default_steered_ttl() -> u32 {
    30
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            admin: None,
            tcp_timeout_secs: default_tcp_timeout(),
            tcp_max_clients: default_tcp_max_clients(),
            tcp_max_clients_per_ip: default_tcp_max_clients_per_ip(),
            udp_max_payload: default_udp_payload(),
            steered_ttl: default_steered_ttl(),
        }
    }
}

/// `[geoip]`
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct GeoIpConfig {
    /// MaxMind City or Country database (`.mmdb`).
    #[serde(default)]
    pub city_db: Option<PathBuf>,
    /// MaxMind ASN database (`.mmdb`).
    #[serde(default)]
    pub asn_db: Option<PathBuf>,
    /// A CSV (`network,country,continent,lat,lon,asn`) compiled at load time
    /// instead of `city_db`.
    #[serde(default)]
    pub csv: Option<PathBuf>,
    /// How often to check the files for changes, seconds; 0 disables
    /// (SIGHUP still reloads). Default 30.
    #[serde(default = "default_reload_check")]
    pub reload_check_secs: u64,
}

fn default_reload_check() -> u64 {
    30
}

/// `[ecs]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EcsConfig {
    /// Use and answer EDNS Client Subnet. Default true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Largest scope prefix returned for IPv4. Default 24.
    #[serde(default = "default_scope_v4")]
    pub max_scope_v4: u8,
    /// Largest scope prefix returned for IPv6. Default 56.
    #[serde(default = "default_scope_v6")]
    pub max_scope_v6: u8,
}

fn yes() -> bool {
    true
}
fn default_scope_v4() -> u8 {
    24
}
fn default_scope_v6() -> u8 {
    56
}

impl Default for EcsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_scope_v4: default_scope_v4(),
            max_scope_v6: default_scope_v6(),
        }
    }
}

/// `[rrl]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RrlConfig {
    /// Default false.
    #[serde(default)]
    pub enabled: bool,
    /// Responses per second allowed per client prefix. Default 20.
    #[serde(default = "default_rps")]
    pub responses_per_second: u32,
    /// Bucket size; default equal to `responses_per_second`.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Every `slip`-th limited response is sent truncated (TC) instead of
    /// dropped; 0 drops all, 1 truncates all. Default 2.
    #[serde(default = "default_slip")]
    pub slip: u32,
    /// IPv4 client prefix length. Default 24.
    #[serde(default = "default_scope_v4")]
    pub ipv4_prefix: u8,
    /// IPv6 client prefix length. Default 56.
    #[serde(default = "default_scope_v6")]
    pub ipv6_prefix: u8,
    /// Most client prefixes tracked at once. Default 100000.
    #[serde(default = "default_max_tracked")]
    pub max_tracked: usize,
}

fn default_rps() -> u32 {
    20
}
fn default_slip() -> u32 {
    2
}
fn default_max_tracked() -> usize {
    100_000
}

impl Default for RrlConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            responses_per_second: default_rps(),
            burst: None,
            slip: default_slip(),
            ipv4_prefix: default_scope_v4(),
            ipv6_prefix: default_scope_v6(),
            max_tracked: default_max_tracked(),
        }
    }
}

/// `[[zones]]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    /// Zone apex, e.g. `example.com.`
    pub origin: String,
    /// RFC 1035 zone file, relative to the config file's directory.
    pub file: PathBuf,
    /// Zone transfers out (AXFR/IXFR). Default: refused to everyone.
    #[serde(default)]
    pub transfer: TransferConfig,
    /// Secondaries sent a NOTIFY when the zone changes.
    #[serde(default)]
    pub notify: Vec<NotifyConfig>,
    /// Sign the zone online (DNSSEC). Default: unsigned.
    #[serde(default)]
    pub dnssec: Option<crate::dnssec::DnssecConfig>,
}

/// One answer address, optionally weighted.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum AnswerConfig {
    /// `"192.0.2.1"` (weight 1).
    Plain(IpAddr),
    /// `{ addr = "192.0.2.1", weight = 3 }`
    Weighted(WeightedAnswer),
}

/// A weighted answer.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WeightedAnswer {
    /// The address.
    pub addr: IpAddr,
    /// Relative weight (0 disables the answer). Default 1.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

impl AnswerConfig {
    /// Address and weight.
    pub fn parts(&self) -> (IpAddr, u32) {
        match self {
            Self::Plain(a) => (*a, 1),
            Self::Weighted(w) => (w.addr, w.weight),
        }
    }
}

/// `[[regions]]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// Unique name, e.g. `eu-west`.
    pub name: String,
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
    /// Capacity weight, used to choose among regions when the client's
    /// location is unknown and no default applies. Default 100.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// IPv4 answers.
    #[serde(default)]
    pub a: Vec<AnswerConfig>,
    /// IPv6 answers.
    #[serde(default)]
    pub aaaa: Vec<AnswerConfig>,
    /// Health check; default none (always healthy unless drained).
    #[serde(default)]
    pub health: HealthConfig,
}

fn default_weight() -> u32 {
    100
}

/// Kind of health probe.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// No probe: always healthy.
    #[default]
    None,
    /// HTTP GET, expecting `expect_status`.
    Http,
    /// HTTPS GET (webpki roots), expecting `expect_status`.
    Https,
    /// TCP connect.
    Tcp,
}

/// `[regions.health]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Probe kind. Default `none`.
    #[serde(default)]
    pub kind: HealthKind,
    /// Address to probe; default the region's first answer on `port`.
    #[serde(default)]
    pub address: Option<SocketAddr>,
    /// Port used with the first answer when `address` is unset. Default 80
    /// (http), 443 (https); required for tcp.
    #[serde(default)]
    pub port: Option<u16>,
    /// HTTP path. Default `/readyz`.
    #[serde(default = "default_path")]
    pub path: String,
    /// HTTP Host header and TLS server name; default the address.
    #[serde(default)]
    pub host: Option<String>,
    /// Milliseconds between probes. Default 2000.
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    /// Probe timeout, milliseconds. Default 1000.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Consecutive successes to mark a down region up. Default 2.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures to mark an up region down. Default 3.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Expected HTTP status. Default 200.
    #[serde(default = "default_status")]
    pub expect_status: u16,
}

fn default_path() -> String {
    "/readyz".into()
}
fn default_interval() -> u64 {
    2000
}
fn default_timeout() -> u64 {
    1000
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}
fn default_status() -> u16 {
    200
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            kind: HealthKind::None,
            address: None,
            port: None,
            path: default_path(),
            host: None,
            interval_ms: default_interval(),
            timeout_ms: default_timeout(),
            rise: default_rise(),
            fall: default_fall(),
            expect_status: default_status(),
        }
    }
}

/// What to answer when every region of a steered name is unavailable.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Answer with every region's addresses.
    #[default]
    Open,
    /// Answer SERVFAIL.
    Closed,
}

/// An ASN written as `64500` or `"AS64500"`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum AsnConfig {
    /// `64500`
    Number(u32),
    /// `"AS64500"`
    Text(String),
}

impl AsnConfig {
    /// The number, if well-formed.
    pub fn number(&self) -> Option<u32> {
        match self {
            Self::Number(n) => Some(*n),
            Self::Text(s) => s
                .strip_prefix("AS")
                .or_else(|| s.strip_prefix("as"))
                .unwrap_or(s)
                .parse()
                .ok(),
        }
    }
}

/// `[[steered.overrides]]`: exactly one of `asn`, `country`, `continent`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OverrideConfig {
    /// Match the client's ASN.
    #[serde(default)]
    pub asn: Option<AsnConfig>,
    /// Match the client's ISO country code.
    #[serde(default)]
    pub country: Option<String>,
    /// Match the client's continent code.
    #[serde(default)]
    pub continent: Option<String>,
    /// Region to answer with (if available).
    pub region: String,
}

/// `[[steered]]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SteeredConfig {
    /// Fully qualified name inside a configured zone.
    pub name: String,
    /// Candidate regions; default all regions.
    #[serde(default)]
    pub regions: Vec<String>,
    /// Region used when the client's location is unknown.
    #[serde(default)]
    pub default_region: Option<String>,
    /// Most addresses per answer. Default 2.
    #[serde(default = "default_max_answers")]
    pub max_answers: usize,
    /// TTL; default `server.steered_ttl`.
    #[serde(default)]
    pub ttl: Option<u32>,
    /// Behaviour when every region is down. Default `open`.
    #[serde(default)]
    pub fail_mode: FailMode,
    /// Overrides, checked ASN first, then country, then continent.
    #[serde(default)]
    pub overrides: Vec<OverrideConfig>,
}

fn default_max_answers() -> usize {
    2
}

/// One located configuration error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// File the error is in.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.reason
        )
    }
}

/// All errors found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = src.get(..offset).unwrap_or(src);
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.chars().count(), |p| before[p + 1..].chars().count())
        + 1;
    (line, col)
}

/// One step of a key path into the TOML document.
#[derive(Debug, Clone, Copy)]
pub enum Seg<'a> {
    /// A table key.
    Key(&'a str),
    /// An array index.
    Idx(usize),
}

/// Locate a key path in TOML source: the line and column of the deepest
/// element of `path` that exists.
pub fn locate(src: &str, path: &[Seg<'_>]) -> (usize, usize) {
    let Ok(doc) = toml::de::DeTable::parse(src) else {
        return (1, 1);
    };
    let span = doc.span();
    let root = toml::Spanned::new(span, toml::de::DeValue::Table(doc.into_inner()));
    let mut cur = &root;
    let mut span = 0..0;
    for seg in path {
        let next = match seg {
            Seg::Key(k) => cur.get_ref().get(*k),
            Seg::Idx(i) => cur.get_ref().get(*i),
        };
        match next {
            Some(n) => {
                cur = n;
                span = n.span();
            }
            None => break,
        }
    }
    line_col(src, span.start)
}

impl Config {
    /// The admin address in effect: `admin.listen`, else `server.admin`,
    /// else `127.0.0.1:9953`.
    pub fn admin_listen(&self) -> SocketAddr {
        self.admin
            .listen
            .or(self.server.admin)
            .unwrap_or_else(default_admin)
    }

    /// Parse TOML text; `file` is used in error messages.
    pub fn parse(src: &str, file: &Path) -> Result<Self, ConfigErrors> {
        toml::from_str(src).map_err(|e| {
            let (line, col) = e.span().map_or((1, 1), |s| line_col(src, s.start));
            ConfigErrors(vec![ConfigError {
                file: file.to_owned(),
                line,
                col,
                reason: e.message().trim().to_owned(),
            }])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_explicit() {
        let c = Config::parse("", Path::new("x.toml")).expect("empty config");
        assert_eq!(c.server.listen, default_listen());
        assert_eq!(c.server.steered_ttl, 30);
        assert!(c.ecs.enabled);
        assert!(!c.rrl.enabled);
    }

    #[test]
    fn unknown_field_is_located() {
        let src = "[server]\nlisten = [\"127.0.0.1:53\"]\nbogus = 1\n";
        let e = Config::parse(src, Path::new("x.toml")).expect_err("unknown field");
        assert_eq!(e.0[0].line, 3, "{e}");
        assert!(e.to_string().starts_with("x.toml:3:1:"), "{e}");
    }

    #[test]
    fn locate_finds_nested_keys() {
        let src = "[[regions]]\nname = \"a\"\nlat = 1.0\nlon = 2.0\n\n[[regions]]\nname = \"b\"\nlat = 100.0\nlon = 2.0\n";
        assert_eq!(
            locate(src, &[Seg::Key("regions"), Seg::Idx(1), Seg::Key("lat")]),
            (8, 7)
        );
    }

    #[test]
    fn answers_plain_and_weighted() {
        let src = "[[regions]]\nname='a'\nlat=0.0\nlon=0.0\na=['192.0.2.1', {addr='192.0.2.2', weight=3}]\n";
        let c = Config::parse(src, Path::new("x")).expect("parse");
        let parts: Vec<_> = c.regions[0].a.iter().map(AnswerConfig::parts).collect();
        assert_eq!(parts[1].1, 3);
        assert_eq!(parts[0].1, 1);
    }
}
