//! The edge's configuration: one TOML file, parsed with `deny_unknown_fields`
//! and explicit defaults, then validated. Every error names the file, the line
//! and column, and the reason, so `meridian-edge check` and a refused reload
//! point at the exact spot.

mod units;
mod values;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use units::{ByteSize, Dur, parse_duration, parse_size};
pub use values::{Cidr, HostMatch, HostPattern, OriginAddr};

/// A config that failed to load: where, and why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}:{col}: {message}")]
    Invalid {
        file: String,
        line: usize,
        col: usize,
        message: String,
    },
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub http2: Http2Config,
    #[serde(default)]
    pub http3: Http3Config,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub plugins: PluginsConfig,
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub sites: Vec<SiteConfig>,
    #[serde(default)]
    pub pools: BTreeMap<String, PoolConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Tokio worker threads; 0 means one per core.
    pub worker_threads: usize,
    /// How long in-flight requests may run after SIGTERM before exit.
    pub graceful_timeout: Dur,
    /// After SIGTERM, how long /readyz answers 503 while still accepting, so
    /// load balancers and the anycast controller notice before listeners close.
    pub drain_delay: Dur,
    /// The pseudonym this node adds to `Via`; empty disables `Via`.
    pub via: String,
    /// Which forwarding headers to add toward origins.
    pub forwarded: ForwardedMode,
    /// The largest number of client connections open at once, all listeners together.
    pub max_connections: usize,
    /// /readyz answers 503 "overloaded" while this many client connections are
    /// open (so load balancers and the anycast controller shed load); 0
    /// means 90% of max_connections.
    pub overload_connections: usize,
    /// How many unknown-host requests get: 421 (misdirected) or 404.
    pub unknown_host_status: u16,
    /// A unix socket on which the running edge hands its listening sockets
    /// (TCP, QUIC UDP, admin) to a new binary started with `run --takeover`
    /// (the zero-downtime upgrade). Put it in a directory only the edge's
    /// user can enter: whoever connects gets the sockets. Absent: no handover.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handover_socket: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            worker_threads: 0,
            graceful_timeout: Dur::secs(30),
            drain_delay: Dur::secs(0),
            via: "meridian".into(),
            forwarded: ForwardedMode::XForwarded,
            max_connections: 65536,
            overload_connections: 0,
            unknown_host_status: 421,
            handover_socket: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedMode {
    /// `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Forwarded-Host`.
    XForwarded,
    /// RFC 7239 `Forwarded`.
    Forwarded,
    Both,
    None,
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Where the admin listener binds; loopback by default. Absent disables
    /// it. An address other than loopback needs `token` or `token_file`.
    pub listen: Option<SocketAddr>,
    /// The full-access bearer token, required on every admin request except
    /// /healthz and /readyz.
    pub token: Option<String>,
    /// Read the token from this file instead (trailing whitespace trimmed).
    pub token_file: Option<PathBuf>,
    /// A read-only bearer token: GET and HEAD requests (/metrics, /config,
    /// /cache…) only; a mutating request with it gets 403. Absent: reads
    /// need the full token. Needs `token` or `token_file`.
    pub read_token: Option<String>,
    /// Read the read-only token from this file instead.
    pub read_token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9901))),
            token: None,
            token_file: None,
            read_token: None,
            read_token_file: None,
        }
    }
}

/// Shows where tokens come from, never a token.
impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| REDACTED))
            .field("token_file", &self.token_file)
            .field("read_token", &self.read_token.as_ref().map(|_| REDACTED))
            .field("read_token_file", &self.read_token_file)
            .finish()
    }
}

impl AdminConfig {
    /// Whether a token (inline or from a file) guards the admin API.
    pub fn has_token(&self) -> bool {
        self.token.is_some() || self.token_file.is_some()
    }
}

/// What secrets are replaced with in `GET /config` and in Debug output.
pub const REDACTED: &str = "<redacted>";

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// The access log: "stdout", "stderr", "off" or a file path (JSON lines).
    pub access_log: String,
    /// The tracing filter for the daemon's own log, e.g. "info" or "meridian_edge=debug".
    pub level: String,
    /// "text" or "json" for the daemon's own log (on stderr).
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            access_log: "stdout".into(),
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request head (request line plus headers); larger gets 431.
    pub max_header_bytes: ByteSize,
    /// Most request header fields; more gets 431.
    pub max_headers: usize,
    /// Largest request body; larger gets 413. 0 means unlimited.
    pub max_body_bytes: ByteSize,
    /// Time a client has to send a whole request head once it started; then 408.
    pub header_read_timeout: Dur,
    /// A client connection with no traffic in either direction for this long is closed.
    pub idle_timeout: Dur,
    /// nginx's `send_timeout`: a client that accepts no response bytes for
    /// this long is closed, so a stalled reader holds nothing for longer.
    pub send_timeout: Dur,
    /// Time a TLS handshake may take.
    pub tls_handshake_timeout: Dur,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: ByteSize(32 * 1024),
            max_headers: 100,
            max_body_bytes: ByteSize(100 * 1024 * 1024),
            header_read_timeout: Dur::secs(10),
            idle_timeout: Dur::secs(75),
            send_timeout: Dur::secs(60),
            tls_handshake_timeout: Dur::secs(10),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http2Config {
    pub max_concurrent_streams: u32,
    /// Streams a client may open and reset before the server has seen them
    /// (the rapid-reset bound, CVE-2023-44487), before GOAWAY.
    pub max_pending_accept_reset_streams: usize,
    /// Stream errors the server may send per connection before GOAWAY.
    pub max_local_error_reset_streams: usize,
    pub initial_stream_window: ByteSize,
    pub initial_connection_window: ByteSize,
    /// Interval of PING keep-alives; absent disables them.
    pub keepalive_interval: Option<Dur>,
}

impl Default for Http2Config {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 128,
            max_pending_accept_reset_streams: 32,
            max_local_error_reset_streams: 64,
            initial_stream_window: ByteSize(256 * 1024),
            initial_connection_window: ByteSize(1024 * 1024),
            keepalive_interval: Some(Dur::secs(30)),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http3Config {
    /// Add `Alt-Svc: h3=":PORT"; ma=…` to HTTP/1.1 and HTTP/2 responses on
    /// listeners that serve HTTP/3, so browsers upgrade.
    pub alt_svc: bool,
    /// The Alt-Svc `ma` (how long clients may remember it).
    pub alt_svc_max_age: Dur,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Dur,
    /// Concurrent request streams a client may open.
    pub max_concurrent_streams: u32,
    /// Flow-control window per stream.
    pub stream_receive_window: ByteSize,
    /// Flow-control window per connection.
    pub receive_window: ByteSize,
    /// How much may be in flight toward a client per connection.
    pub send_window: ByteSize,
    /// "cubic" (default), "bbr" or "newreno".
    pub congestion: Congestion,
    /// UDP sockets (quinn endpoints) per listener, bound with SO_REUSEPORT
    /// so the kernel spreads clients across them.
    pub endpoints: usize,
    /// Address validation with a Retry packet: "auto" (only while more than
    /// `retry_threshold` handshakes are in progress), "always" or "never".
    pub retry: RetryMode,
    pub retry_threshold: usize,
    /// Accept 0-RTT (early data): only safe, idempotent requests are served
    /// from it, marked `Early-Data: 1` toward the origin (RFC 8470); others get 425.
    pub early_data: bool,
}

impl Default for Http3Config {
    fn default() -> Self {
        Http3Config {
            alt_svc: true,
            alt_svc_max_age: Dur::secs(86400),
            idle_timeout: Dur::secs(30),
            max_concurrent_streams: 100,
            stream_receive_window: ByteSize(1024 * 1024),
            receive_window: ByteSize(8 * 1024 * 1024),
            send_window: ByteSize(8 * 1024 * 1024),
            congestion: Congestion::Cubic,
            endpoints: 1,
            retry: RetryMode::Auto,
            retry_threshold: 64,
            early_data: false,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    Cubic,
    Bbr,
    NewReno,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RetryMode {
    Auto,
    Always,
    Never,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Certificates; the listener picks one by SNI.
    pub certificates: Vec<CertConfig>,
    /// Check the certificate files this often and reload them when they change.
    /// SIGHUP always reloads them. Absent disables polling.
    pub watch_interval: Option<Dur>,
    /// "1.2" (the default) or "1.3".
    pub min_version: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The names this certificate serves ("example.com", "*.example.com").
    /// Absent: taken from the certificate's subject alternative names.
    #[serde(default)]
    pub names: Option<Vec<String>>,
    /// Served when the client sends no SNI or a name no certificate matches.
    #[serde(default)]
    pub default: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    /// Terminate TLS on this listener with the `[tls]` certificates.
    #[serde(default)]
    pub tls: bool,
    /// Set SO_REUSEPORT, so a new process can bind while the old one drains.
    #[serde(default = "yes")]
    pub reuse_port: bool,
    /// ALPN protocols offered on TLS listeners, in preference order.
    #[serde(default = "default_alpn")]
    pub alpn: Vec<String>,
    /// The kernel's accept backlog.
    #[serde(default = "default_backlog")]
    pub backlog: u32,
    /// On a TLS listener: also serve HTTP/3 (QUIC) on the same address and
    /// UDP port, and advertise it with Alt-Svc.
    #[serde(default = "yes")]
    pub http3: bool,
}

fn yes() -> bool {
    true
}
fn default_alpn() -> Vec<String> {
    vec!["h2".into(), "http/1.1".into()]
}
fn default_backlog() -> u32 {
    4096
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// Host patterns: "example.com", "*.example.com" (any subdomain), or "*" (any host).
    pub hosts: Vec<HostPattern>,
    /// The origin pool this site proxies to.
    pub pool: String,
    /// Send the client's Host to the origin (the default); false sends the origin's own host.
    #[serde(default = "yes")]
    pub preserve_host: bool,
    /// How this site uses the cache.
    #[serde(default)]
    pub cache: SiteCache,
    /// Wasm plugins (proxy-wasm) run on each request, in order, after routing
    /// and before the cache: a request a plugin refuses never reaches the
    /// cache or the origin.
    #[serde(default)]
    pub plugins: Vec<PluginConfig>,
}

/// One Wasm plugin in a site's chain.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The compiled module (.wasm), built for wasm32 against the proxy-wasm ABI 0.2.x.
    pub path: PathBuf,
    /// The plugin's configuration, handed to it as bytes: a string as is, a
    /// table as JSON. The host cannot know which values are secret, so
    /// `GET /config` and the logs show none of them.
    #[serde(default)]
    pub config: Option<toml::Value>,
    /// Read the plugin's configuration from this file instead (its bytes as
    /// they are), so a secret need not sit in the main config. Read again on
    /// every reload. Not together with `config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_file: Option<PathBuf>,
    /// What a failure (trap, deadline, memory limit) does to the request:
    /// "closed" answers 500 (the default: safe for auth plugins), "open" skips the plugin.
    /// Overload (no instance to be had) is always 503, whatever this says.
    #[serde(default = "default_plugin_policy")]
    pub failure: String,
    /// The plugin's memory limit.
    #[serde(default = "default_plugin_memory")]
    pub memory: ByteSize,
    /// CPU time one callback may take.
    #[serde(default = "default_plugin_deadline")]
    pub deadline: Dur,
    /// After a missed deadline, for this long the plugin's callbacks get a
    /// deadline fitted to what its successful callbacks needed (4x their
    /// peak, at least 0.5ms); "0s" never clamps.
    #[serde(default = "default_plugin_deadline_clamp")]
    pub deadline_clamp: Dur,
    /// A fresh instance per request instead of pooled ones (stricter isolation, slower).
    #[serde(default)]
    pub fresh_instance: bool,
    /// Run the response phase on every response the client gets, cache hits
    /// included. By default (false) it runs on origin responses only, before
    /// they are stored, so a cached object is transformed once.
    #[serde(default)]
    pub every_response: bool,
    /// The most response body this plugin may hold back (by pausing) before
    /// the failure policy applies.
    #[serde(default = "default_plugin_body_buffer")]
    pub body_buffer: ByteSize,
}

impl PluginConfig {
    /// The bytes handed to the plugin: `config` (a string as is, a table as
    /// JSON), or the contents of `config_file`, or nothing.
    pub fn config_bytes(&self) -> Result<Vec<u8>, String> {
        match (&self.config, &self.config_file) {
            (Some(_), Some(_)) => Err("set config or config_file, not both".into()),
            (Some(toml::Value::String(s)), None) => Ok(s.clone().into_bytes()),
            (Some(v), None) => serde_json::to_vec(v).map_err(|e| format!("plugin config: {e}")),
            (None, Some(f)) => std::fs::read(f)
                .map_err(|e| format!("plugin config_file {}: {}", f.display(), e.kind())),
            (None, None) => Ok(Vec::new()),
        }
    }

    /// A copy whose `config` values are all replaced by [`REDACTED`] (the
    /// keys of a table stay, so one can see which are set).
    pub fn redacted(&self) -> PluginConfig {
        let mut p = self.clone();
        p.config = p.config.map(|v| match v {
            toml::Value::Table(t) => toml::Value::Table(
                t.into_iter()
                    .map(|(k, _)| (k, toml::Value::String(REDACTED.into())))
                    .collect(),
            ),
            _ => toml::Value::String(REDACTED.into()),
        });
        p
    }
}

/// Debug output shows the plugin's config redacted: `?config` in a log line
/// must not print a secret.
impl fmt::Debug for PluginConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.redacted();
        f.debug_struct("PluginConfig")
            .field("path", &r.path)
            .field("config", &r.config)
            .field("config_file", &r.config_file)
            .field("failure", &r.failure)
            .field("memory", &r.memory)
            .field("deadline", &r.deadline)
            .field("deadline_clamp", &r.deadline_clamp)
            .field("fresh_instance", &r.fresh_instance)
            .field("every_response", &r.every_response)
            .field("body_buffer", &r.body_buffer)
            .finish()
    }
}

fn default_plugin_body_buffer() -> ByteSize {
    ByteSize(1024 * 1024)
}

/// Process-wide settings of the Wasm plugin host.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// A MaxMind DB (GeoLite2/GeoIP2 Country or City, or one built with
    /// `meridian-dns geo build`): plugins read the client's country as the
    /// property `meridian.client.country`.
    pub geoip: Option<PathBuf>,
    /// The most plugin instances alive at once, all plugins together. An
    /// instance hosts many requests' contexts; a request holds its instance
    /// only while one of its callbacks runs, so slow clients cannot exhaust
    /// them (a `fresh_instance` plugin's request holds its own instance for
    /// its whole life, though).
    pub max_instances: u32,
    /// The largest response body an `http_call` may return to a plugin.
    pub http_call_max_body: ByteSize,
    /// How long a request waits for a plugin instance: when its plugin has
    /// none and all `max_instances` host requests (idle ones of other
    /// plugins are evicted first), or while its instance runs other
    /// requests' callbacks. After that the answer is 503, whatever the
    /// plugin's failure policy.
    pub instance_wait: Dur,
    /// Count wasmtime fuel in every plugin callback, so that a plugin that
    /// missed its deadline is held to a budget of fuel for its
    /// `deadline_clamp` (a loop then costs tens of microseconds, not its
    /// whole deadline). Off: compute-heavy plugins run faster (by about
    /// 12% for an HS256 check, up to 40% for a tight loop) and no plugin is
    /// clamped. Changes on restart only.
    pub fuel: bool,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            geoip: None,
            max_instances: 1024,
            http_call_max_body: ByteSize(1024 * 1024),
            instance_wait: Dur::secs(1),
            fuel: true,
        }
    }
}

fn default_plugin_policy() -> String {
    "closed".into()
}
fn default_plugin_memory() -> ByteSize {
    ByteSize(16 * 1024 * 1024)
}
fn default_plugin_deadline() -> Dur {
    Dur::millis(50)
}
fn default_plugin_deadline_clamp() -> Dur {
    Dur::secs(10)
}

/// The shared cache: a memory tier and an optional disk tier.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// The memory tier's capacity.
    pub memory: ByteSize,
    /// The disk tier's directory; absent means memory only. Entries on disk
    /// survive restarts (and kill -9).
    pub disk_dir: Option<PathBuf>,
    /// The disk tier's capacity.
    pub disk: ByteSize,
    /// Objects larger than this are stored in chunks of this size.
    pub chunk_size: ByteSize,
    /// Objects larger than this stream through uncached.
    pub max_object_size: ByteSize,
    /// How long concurrent misses for one object wait for the first one's
    /// origin fetch before going to the origin themselves.
    pub lock_timeout: Dur,
    /// How long a response found uncacheable is remembered, so requests for
    /// it skip request coalescing (hit-for-pass).
    pub hit_for_pass: Dur,
    /// Client networks allowed to send the HTTP PURGE method.
    pub purge_allow: Vec<Cidr>,
    /// The largest object the cache fetches whole for no client: the
    /// background fill behind a range request on a miss, and a fill that
    /// goes on after its clients left. Larger objects are never pulled whole
    /// for a range: the range goes to the origin as a range.
    pub background_fill_max: ByteSize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            memory: ByteSize(256 * 1024 * 1024),
            disk_dir: None,
            disk: ByteSize(10 * 1024 * 1024 * 1024),
            chunk_size: ByteSize(1024 * 1024),
            max_object_size: ByteSize(1024 * 1024 * 1024),
            lock_timeout: Dur::secs(10),
            hit_for_pass: Dur::secs(120),
            purge_allow: vec![
                Cidr::host(std::net::Ipv4Addr::LOCALHOST.into()),
                Cidr::host(std::net::Ipv6Addr::LOCALHOST.into()),
            ],
            background_fill_max: ByteSize(8 * 1024 * 1024),
        }
    }
}

/// A site's use of the cache.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SiteCache {
    /// Cache this site's responses (as RFC 9111 allows).
    pub enabled: bool,
    /// Freshness for responses that carry no freshness information, where
    /// caching them is allowed (like Varnish's default_ttl). 0 disables.
    pub default_ttl: Dur,
    /// Serve stale while revalidating in the background, when the origin sends
    /// no stale-while-revalidate (like Varnish grace). 0 disables.
    pub stale_while_revalidate: Dur,
    /// Serve stale when the origin fails, when the origin sends no
    /// stale-if-error (like nginx proxy_cache_use_stale). 0 disables.
    pub stale_if_error: Dur,
    /// Serve a stale object, up to this stale, when the origin cannot be
    /// reached at all (refused, reset, timed out), as RFC 9111 §4.2.4 allows
    /// without a directive and nginx's `proxy_cache_use_stale error timeout`
    /// does; never when `must-revalidate`, `proxy-revalidate`, `no-cache` or
    /// `s-maxage` forbid stale. Default 1 day. 0 disables.
    pub stale_if_unreachable: Dur,
    /// Sort query parameters in the cache key.
    pub sort_query: bool,
    /// Query parameters left out of the cache key: names, or prefixes ending
    /// in `*` such as "utm_*".
    pub ignore_params: Vec<String>,
    /// Remove Surrogate-Key and Cache-Tag from responses to clients.
    pub strip_tags: bool,
    /// Add Cache-Status (RFC 9211) to responses.
    pub cache_status: bool,
    /// Slice mode (like nginx's slice module): fetch and cache GETs in slices of
    /// this size, each with its own Range request to the origin. 0 disables.
    pub slice_size: ByteSize,
    /// Let origin stale-while-revalidate/stale-if-error apply with s-maxage
    /// (RFC 9111 reads s-maxage as proxy-revalidate, which forbids them).
    pub s_maxage_allows_stale: bool,
    /// Responses that carry `Set-Cookie`: "pass" (not stored, as nginx and
    /// Varnish do by default), "strip" (stored without `Set-Cookie`; the
    /// client whose request filled the entry still gets its cookie), or
    /// "store" (stored whole and replayed to every client: opt in only for
    /// cookies that are not per user).
    pub set_cookie: SetCookie,
}

/// What the cache does with a response that sets a cookie.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SetCookie {
    #[default]
    Pass,
    Strip,
    Store,
}

impl Default for SiteCache {
    fn default() -> Self {
        SiteCache {
            enabled: true,
            default_ttl: Dur::secs(0),
            stale_while_revalidate: Dur::secs(0),
            stale_if_error: Dur::secs(0),
            stale_if_unreachable: Dur::secs(86_400),
            sort_query: false,
            ignore_params: Vec::new(),
            strip_tags: true,
            cache_status: true,
            s_maxage_allows_stale: false,
            slice_size: ByteSize(0),
            set_cookie: SetCookie::Pass,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub origins: Vec<OriginConfig>,
    #[serde(default)]
    pub selection: Selection,
    /// Protocol toward origins: "http1", "http2" (prior knowledge on plain
    /// HTTP, ALPN on TLS), or "auto" (ALPN on TLS, HTTP/1.1 on plain HTTP).
    #[serde(default)]
    pub protocol: OriginProtocol,
    #[serde(default)]
    pub tls: OriginTls,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub connection_pool: ConnPoolConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    #[serde(default)]
    pub passive: PassiveHealth,
    /// After an origin comes back, its weight ramps from 10% to 100% over this time.
    #[serde(default)]
    pub slow_start: Option<Dur>,
    /// Envoy's `healthy_panic_threshold`, in percent: when fewer of the
    /// pool's origins than this are healthy, health is ignored and requests go
    /// to every origin (counted in `meridian_pool_panic_total`). So a pool
    /// never ejects its last origins. 0 disables.
    #[serde(default = "default_panic_threshold")]
    pub healthy_panic_threshold: u32,
}

fn default_panic_threshold() -> u32 {
    50
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OriginConfig {
    /// "http://host:port" or "https://host:port"; no path.
    pub url: OriginAddr,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// Smooth weighted round-robin (as nginx).
    #[default]
    RoundRobin,
    /// Fewest requests in flight relative to weight.
    LeastConnections,
    /// A ketama ring over the request's host and URL, so one URL keeps going to one origin.
    ConsistentHash,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OriginProtocol {
    #[default]
    Auto,
    Http1,
    Http2,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OriginTls {
    /// Verify the origin's certificate (default true).
    pub verify: bool,
    /// Extra CA certificates (PEM) trusted for origins, besides the bundled web roots.
    pub ca_file: Option<PathBuf>,
    /// The SNI name and verified name; default: the origin URL's host.
    pub sni: Option<String>,
}

impl Default for OriginTls {
    fn default() -> Self {
        Self {
            verify: true,
            ca_file: None,
            sni: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP connect plus TLS handshake.
    pub connect: Dur,
    /// From the request sent to the response head received (then 504).
    pub header: Dur,
    /// Longest gap between body chunks in either direction.
    pub idle: Dur,
    /// The whole exchange, body included; absent means no limit.
    pub total: Option<Dur>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Dur::secs(5),
            header: Dur::secs(60),
            idle: Dur::secs(60),
            total: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnPoolConfig {
    /// Idle keep-alive connections kept per origin.
    pub max_idle: usize,
    /// An idle connection older than this is closed.
    pub idle_timeout: Dur,
    /// Most connections open at once per origin; 0 means unlimited. A request
    /// that finds none free waits up to the connect timeout, then gets 503.
    pub max_connections: usize,
}

impl Default for ConnPoolConfig {
    fn default() -> Self {
        Self {
            max_idle: 64,
            idle_timeout: Dur::secs(60),
            max_connections: 0,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Most attempts per request, the first included (1 disables retries).
    pub attempts: u32,
    /// Retries may add at most this fraction of requests (the retry budget).
    pub budget_ratio: f64,
    /// Retries always allowed per second, whatever the ratio.
    pub budget_min_per_sec: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: 2,
            budget_ratio: 0.2,
            budget_min_per_sec: 10,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// The probe path, e.g. "/healthz".
    pub path: String,
    /// The Host header of the probe; default: the origin's host.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default = "default_hc_interval")]
    pub interval: Dur,
    #[serde(default = "default_hc_timeout")]
    pub timeout: Dur,
    /// Consecutive successes that bring an origin back.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that take an origin out.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Statuses that count as healthy: "200", "2xx", "200-399".
    #[serde(default = "default_expect")]
    pub expected_status: String,
}

fn default_hc_interval() -> Dur {
    Dur::secs(5)
}
fn default_hc_timeout() -> Dur {
    Dur::secs(2)
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}
fn default_expect() -> String {
    "200-399".into()
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveHealth {
    /// Consecutive failed requests (connect errors, timeouts, 502/503/504)
    /// that eject an origin; 0 disables passive ejection.
    pub max_failures: u32,
    /// How long an ejected origin stays out before it is tried again.
    pub ejection_time: Dur,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        Self {
            max_failures: 5,
            ejection_time: Dur::secs(30),
        }
    }
}

/// An inclusive set of HTTP status ranges, parsed from "200", "2xx", "200-399", "200,204".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusSet(Vec<(u16, u16)>);

impl StatusSet {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut ranges = Vec::new();
        for part in s.split(',').map(str::trim) {
            let range = if let Some(class) = part.strip_suffix("xx") {
                let c: u16 = class
                    .parse()
                    .map_err(|_| format!("bad status class {part:?}"))?;
                (c * 100, c * 100 + 99)
            } else if let Some((a, b)) = part.split_once('-') {
                let a: u16 = a.trim().parse().map_err(|_| format!("bad status {a:?}"))?;
                let b: u16 = b.trim().parse().map_err(|_| format!("bad status {b:?}"))?;
                (a, b)
            } else {
                let a: u16 = part.parse().map_err(|_| format!("bad status {part:?}"))?;
                (a, a)
            };
            if range.0 < 100 || range.1 > 599 || range.0 > range.1 {
                return Err(format!("status range {part:?} is not within 100-599"));
            }
            ranges.push(range);
        }
        Ok(StatusSet(ranges))
    }

    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|&(a, b)| (a..=b).contains(&status))
    }
}

/// One step of a path into the TOML document, for locating errors.
#[derive(Clone, Debug)]
pub enum Seg {
    Key(String),
    Index(usize),
}

impl From<&str> for Seg {
    fn from(s: &str) -> Self {
        Seg::Key(s.to_string())
    }
}
impl From<String> for Seg {
    fn from(s: String) -> Self {
        Seg::Key(s)
    }
}
impl From<usize> for Seg {
    fn from(i: usize) -> Self {
        Seg::Index(i)
    }
}

/// A validation problem at a path in the document.
#[derive(Debug)]
pub struct Problem {
    pub path: Vec<Seg>,
    pub message: String,
}

macro_rules! path {
    ($($seg:expr),* $(,)?) => { vec![$(Seg::from($seg)),*] };
}

impl fmt::Display for Seg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Seg::Key(k) => write!(f, ".{k}"),
            Seg::Index(i) => write!(f, "[{i}]"),
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            file: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&src, &path.display().to_string())
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn from_toml(src: &str, file: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(src).map_err(|e| {
            let (line, col) = e.span().map(|s| line_col(src, s.start)).unwrap_or((1, 1));
            let message = e.message().trim();
            let message = match e.span().and_then(|s| key_at(src, s)) {
                Some(key) => format!("{key}: {message}"),
                None => message.to_string(),
            };
            ConfigError::Invalid {
                file: file.to_string(),
                line,
                col,
                message,
            }
        })?;
        if let Some(p) = cfg.validate().into_iter().next() {
            let (line, col) = locate(src, &p.path);
            let key: String = p.path.iter().map(|s| s.to_string()).collect();
            return Err(ConfigError::Invalid {
                file: file.to_string(),
                line,
                col,
                message: format!("{}: {}", key.trim_start_matches('.'), p.message),
            });
        }
        Ok(cfg)
    }

    /// Checks what the types alone cannot: references, ranges, files, URLs.
    pub fn validate(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut bad = |path: Vec<Seg>, message: String| out.push(Problem { path, message });
        if self.listeners.is_empty() {
            bad(path!["listeners"], "at least one listener is needed".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            if l.address.port() != 0 && !seen.insert(l.address) {
                bad(
                    path!["listeners", i, "address"],
                    format!("{} is listed twice", l.address),
                );
            }
            if l.tls && self.tls.certificates.is_empty() {
                bad(
                    path!["listeners", i, "tls"],
                    "a TLS listener needs [[tls.certificates]]".into(),
                );
            }
            for (j, p) in l.alpn.iter().enumerate() {
                if p != "h2" && p != "http/1.1" {
                    bad(
                        path!["listeners", i, "alpn", j],
                        format!("unknown ALPN protocol {p:?} (use \"h2\" or \"http/1.1\")"),
                    );
                }
            }
        }
        if let Some(v) = &self.tls.min_version
            && v != "1.2"
            && v != "1.3"
        {
            bad(
                path!["tls", "min_version"],
                format!("{v:?} is not \"1.2\" or \"1.3\""),
            );
        }
        for (i, c) in self.tls.certificates.iter().enumerate() {
            for (key, p) in [("cert", &c.cert), ("key", &c.key)] {
                if !p.is_file() {
                    bad(
                        path!["tls", "certificates", i, key],
                        format!("{} is not a readable file", p.display()),
                    );
                }
            }
        }
        if self.sites.is_empty() {
            bad(
                path!["sites"],
                "at least one [[sites]] entry is needed".into(),
            );
        }
        if let Some(g) = &self.plugins.geoip
            && !g.is_file()
        {
            bad(
                path!["plugins", "geoip"],
                format!("{} is not a readable file", g.display()),
            );
        }
        if !(1..=16_384).contains(&self.plugins.max_instances) {
            bad(
                path!["plugins", "max_instances"],
                "must be 1 to 16384".into(),
            );
        }
        if self.plugins.instance_wait.get() > std::time::Duration::from_secs(60) {
            bad(
                path!["plugins", "instance_wait"],
                "must be at most 60s".into(),
            );
        }
        for (i, s) in self.sites.iter().enumerate() {
            for (j, p) in s.plugins.iter().enumerate() {
                if !p.path.is_file() {
                    bad(
                        path!["sites", i, "plugins", j, "path"],
                        format!("{} is not a readable file", p.path.display()),
                    );
                }
                if p.config.is_some() && p.config_file.is_some() {
                    bad(
                        path!["sites", i, "plugins", j, "config_file"],
                        "set config or config_file, not both".into(),
                    );
                }
                if let Some(f) = &p.config_file
                    && !f.is_file()
                {
                    bad(
                        path!["sites", i, "plugins", j, "config_file"],
                        format!("{} is not a readable file", f.display()),
                    );
                }
                if p.failure != "open" && p.failure != "closed" {
                    bad(
                        path!["sites", i, "plugins", j, "failure"],
                        format!("{:?} is not \"open\" or \"closed\"", p.failure),
                    );
                }
                if p.memory.get() > 64 * 1024 * 1024 || p.memory.get() < 64 * 1024 {
                    bad(
                        path!["sites", i, "plugins", j, "memory"],
                        "must be 64KiB to 64MiB".into(),
                    );
                }
                if p.deadline.get().is_zero() {
                    bad(
                        path!["sites", i, "plugins", j, "deadline"],
                        "must be above zero".into(),
                    );
                }
                if p.deadline_clamp.get() > std::time::Duration::from_secs(3600) {
                    bad(
                        path!["sites", i, "plugins", j, "deadline_clamp"],
                        "must be at most 1h".into(),
                    );
                }
                if p.body_buffer.get() > 256 * 1024 * 1024 {
                    bad(
                        path!["sites", i, "plugins", j, "body_buffer"],
                        "must be at most 256MiB".into(),
                    );
                }
            }
            if !self.pools.contains_key(&s.pool) {
                bad(
                    path!["sites", i, "pool"],
                    format!("no pool named {:?} in [pools]", s.pool),
                );
            }
            if s.hosts.is_empty() {
                bad(
                    path!["sites", i, "hosts"],
                    "a site needs at least one host pattern".into(),
                );
            }
        }
        for (name, p) in &self.pools {
            if p.origins.is_empty() {
                bad(
                    path!["pools", name.as_str(), "origins"],
                    "a pool needs at least one origin".into(),
                );
            }
            for (i, o) in p.origins.iter().enumerate() {
                if o.weight == 0 || o.weight > 10_000 {
                    bad(
                        path!["pools", name.as_str(), "origins", i, "weight"],
                        "weight must be 1 to 10000".into(),
                    );
                }
            }
            if let Some(ca) = &p.tls.ca_file
                && !ca.is_file()
            {
                bad(
                    path!["pools", name.as_str(), "tls", "ca_file"],
                    format!("{} is not a readable file", ca.display()),
                );
            }
            if p.retry.attempts == 0 || p.retry.attempts > 10 {
                bad(
                    path!["pools", name.as_str(), "retry", "attempts"],
                    "attempts must be 1 to 10".into(),
                );
            }
            if p.healthy_panic_threshold > 100 {
                bad(
                    path!["pools", name.as_str(), "healthy_panic_threshold"],
                    "healthy_panic_threshold is a percentage: 0 to 100".into(),
                );
            }
            if !(0.0..=10.0).contains(&p.retry.budget_ratio) {
                bad(
                    path!["pools", name.as_str(), "retry", "budget_ratio"],
                    "budget_ratio must be 0 to 10".into(),
                );
            }
            if p.timeouts.connect.get().is_zero() || p.timeouts.header.get().is_zero() {
                bad(
                    path!["pools", name.as_str(), "timeouts"],
                    "connect and header timeouts must be above zero".into(),
                );
            }
            if let Some(hc) = &p.health_check {
                if !hc.path.starts_with('/') {
                    bad(
                        path!["pools", name.as_str(), "health_check", "path"],
                        "the probe path must start with /".into(),
                    );
                }
                if let Err(e) = StatusSet::parse(&hc.expected_status) {
                    bad(
                        path!["pools", name.as_str(), "health_check", "expected_status"],
                        e,
                    );
                }
                if hc.rise == 0 || hc.fall == 0 {
                    bad(
                        path!["pools", name.as_str(), "health_check"],
                        "rise and fall must be at least 1".into(),
                    );
                }
                if hc.interval.get().is_zero() {
                    bad(
                        path!["pools", name.as_str(), "health_check", "interval"],
                        "the interval must be above zero".into(),
                    );
                }
            }
        }
        if self.http3.endpoints == 0 || self.http3.endpoints > 64 {
            bad(path!["http3", "endpoints"], "must be 1 to 64".into());
        }
        if self.http3.max_concurrent_streams == 0 {
            bad(
                path!["http3", "max_concurrent_streams"],
                "must be at least 1".into(),
            );
        }
        if self.http3.idle_timeout.get().is_zero() {
            bad(path!["http3", "idle_timeout"], "must be above zero".into());
        }
        if self.cache.chunk_size.get() < 4096 || self.cache.chunk_size.get() > 64 * 1024 * 1024 {
            bad(path!["cache", "chunk_size"], "must be 4KiB to 64MiB".into());
        }
        if self.cache.memory.get() < 1024 * 1024 {
            bad(path!["cache", "memory"], "must be at least 1MiB".into());
        }
        if let Some(d) = &self.cache.disk_dir
            && d.exists()
            && !d.is_dir()
        {
            bad(
                path!["cache", "disk_dir"],
                format!("{} is not a directory", d.display()),
            );
        }
        if !matches!(self.server.unknown_host_status, 404 | 421) {
            bad(
                path!["server", "unknown_host_status"],
                "must be 404 or 421".into(),
            );
        }
        if self.server.max_connections == 0 {
            bad(
                path!["server", "max_connections"],
                "must be at least 1".into(),
            );
        }
        if self.limits.max_header_bytes.get() < 1024 {
            bad(
                path!["limits", "max_header_bytes"],
                "must be at least 1KiB".into(),
            );
        }
        if self.limits.max_headers == 0 {
            bad(path!["limits", "max_headers"], "must be at least 1".into());
        }
        if let Some(addr) = self.admin.listen
            && !addr.ip().to_canonical().is_loopback()
            && !self.admin.has_token()
        {
            bad(
                path!["admin", "listen"],
                format!(
                    "{addr} is not a loopback address: set admin.token or admin.token_file \
                     (anyone who reaches it could drain, reload or purge)"
                ),
            );
        }
        for (key, t) in [
            ("token", &self.admin.token),
            ("read_token", &self.admin.read_token),
        ] {
            if t.as_deref().is_some_and(|t| t.trim().is_empty()) {
                bad(path!["admin", key], "must not be empty".into());
            }
        }
        if self.admin.read_token.is_some() && self.admin.read_token_file.is_some() {
            bad(
                path!["admin", "read_token_file"],
                "set read_token or read_token_file, not both".into(),
            );
        }
        if (self.admin.read_token.is_some() || self.admin.read_token_file.is_some())
            && !self.admin.has_token()
        {
            bad(
                path![
                    "admin",
                    if self.admin.read_token.is_some() {
                        "read_token"
                    } else {
                        "read_token_file"
                    }
                ],
                "a read-only token needs the full token (token or token_file) too".into(),
            );
        }
        if let Some(f) = &self.admin.read_token_file
            && !f.is_file()
        {
            bad(
                path!["admin", "read_token_file"],
                format!("{} is not a readable file", f.display()),
            );
        }
        if self.admin.token.is_some() && self.admin.token_file.is_some() {
            bad(
                path!["admin", "token_file"],
                "set token or token_file, not both".into(),
            );
        }
        if let Some(f) = &self.admin.token_file
            && !f.is_file()
        {
            bad(
                path!["admin", "token_file"],
                format!("{} is not a readable file", f.display()),
            );
        }
        if self.log.access_log != "stdout"
            && self.log.access_log != "stderr"
            && self.log.access_log != "off"
        {
            let p = Path::new(&self.log.access_log);
            if let Some(dir) = p.parent()
                && !dir.as_os_str().is_empty()
                && !dir.is_dir()
            {
                bad(
                    path!["log", "access_log"],
                    format!("directory {} does not exist", dir.display()),
                );
            }
        }
        if let Err(e) = self.log.level.parse::<tracing_subscriber::EnvFilter>() {
            bad(path!["log", "level"], format!("bad filter: {e}"));
        }
        out
    }

    /// The effective config, with secrets replaced by [`REDACTED`]: the
    /// admin tokens and every value of every plugin's `config`. (TLS keys
    /// appear only as file paths.)
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        if c.admin.token.is_some() {
            c.admin.token = Some(REDACTED.into());
        }
        if c.admin.read_token.is_some() {
            c.admin.read_token = Some(REDACTED.into());
        }
        for s in &mut c.sites {
            for p in &mut s.plugins {
                *p = p.redacted();
            }
        }
        c
    }
}

/// 1-based line and column of a byte offset.
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, col)
}

/// The key ("pools.a.origins[0].url") of the smallest value in the document
/// that holds `span`: where a value that serde refused sits. None when the
/// document does not parse or no value holds the span.
fn key_at(src: &str, span: std::ops::Range<usize>) -> Option<String> {
    use toml::de::DeValue;
    /// More values than any config has; the walk stops there.
    const MAX_NODES: usize = 100_000;
    let table = toml::de::DeTable::parse(src).ok()?;
    let root = toml::Spanned::new(table.span(), DeValue::Table(table.into_inner()));
    // (span length, path) of the best value or key so far.
    let mut best: Option<(usize, Vec<Seg>)> = None;
    let mut consider = |s: std::ops::Range<usize>, path: &Vec<Seg>| {
        if !path.is_empty()
            && s.start <= span.start
            && span.end <= s.end
            && best
                .as_ref()
                .is_none_or(|(len, p)| s.len() < *len || (s.len() == *len && path.len() > p.len()))
        {
            best = Some((s.len(), path.clone()));
        }
    };
    let mut stack: Vec<(&toml::Spanned<DeValue<'_>>, Vec<Seg>)> = vec![(&root, Vec::new())];
    let mut visited = 0;
    while let Some((node, path)) = stack.pop() {
        visited += 1;
        if visited > MAX_NODES {
            break;
        }
        consider(node.span(), &path);
        // Tables from `[headers]` do not span their keys, so every child is
        // visited, not only those of a value that holds the span.
        match node.get_ref() {
            DeValue::Table(t) => {
                for (k, v) in t.iter() {
                    let mut p = path.clone();
                    p.push(Seg::Key(k.get_ref().to_string()));
                    // An unknown field is reported at its key.
                    consider(k.span(), &p);
                    stack.push((v, p));
                }
            }
            DeValue::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    let mut p = path.clone();
                    p.push(Seg::Index(i));
                    stack.push((v, p));
                }
            }
            _ => {}
        }
    }
    let (_, path) = best?;
    let key: String = path.iter().map(|s| s.to_string()).collect();
    Some(key.trim_start_matches('.').to_string())
}

/// Finds the deepest span in the document that the path reaches.
fn locate(src: &str, path: &[Seg]) -> (usize, usize) {
    let Ok(table) = toml::de::DeTable::parse(src) else {
        return (1, 1);
    };
    let span = table.span();
    let root = toml::Spanned::new(span, toml::de::DeValue::Table(table.into_inner()));
    let mut cur = &root;
    for seg in path {
        let next = match seg {
            Seg::Key(k) => cur.get_ref().get(k.as_str()),
            Seg::Index(i) => cur.get_ref().get(*i),
        };
        match next {
            Some(n) => cur = n,
            None => break,
        }
    }
    line_col(src, cur.span().start)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[[listeners]]
address = "127.0.0.1:0"

[[sites]]
hosts = ["*"]
pool = "origin"

[pools.origin]
origins = [{ url = "http://127.0.0.1:9000" }]
"#;

    #[test]
    fn minimal_config_parses_with_defaults() {
        let c = Config::from_toml(MIN, "t.toml").expect("valid");
        assert_eq!(c.limits.max_headers, 100);
        assert_eq!(c.pools["origin"].retry.attempts, 2);
        assert_eq!(c.server.unknown_host_status, 421);
    }

    #[test]
    fn unknown_field_is_refused_with_line() {
        let src = MIN.replace("pool = \"origin\"", "pool = \"origin\"\npoool = 1");
        let e = Config::from_toml(&src, "t.toml")
            .expect_err("unknown field")
            .to_string();
        assert!(e.starts_with("t.toml:8:1: "), "{e}");
        assert!(e.contains("poool"), "{e}");
    }

    #[test]
    fn dangling_pool_reference_points_at_key() {
        let src = MIN.replace("pool = \"origin\"", "pool = \"nope\"");
        let e = Config::from_toml(&src, "t.toml")
            .expect_err("bad ref")
            .to_string();
        assert!(
            e.starts_with("t.toml:7:8: sites[0].pool: no pool named \"nope\""),
            "{e}"
        );
    }

    #[test]
    fn bad_duration_is_located() {
        let src = MIN.replace("pool = \"origin\"", "pool = \"origin\"\npoool = 1");
        let e = Config::from_toml(&src, "t.toml")
            .expect_err("unknown field")
            .to_string();
        assert!(
            e.starts_with("t.toml:8:1: sites[0].poool: unknown field `poool`"),
            "{e}"
        );
        let src = format!("{MIN}\n[pools.origin.timeouts]\nconnect = \"5 parsecs\"\n");
        let e = Config::from_toml(&src, "t.toml")
            .expect_err("bad duration")
            .to_string();
        assert!(e.starts_with("t.toml:13:11: "), "{e}");
        assert!(e.contains("unknown unit"), "{e}");
    }

    #[test]
    fn bad_origin_url_is_refused() {
        let src = MIN.replace("http://127.0.0.1:9000", "ftp://x");
        let e = Config::from_toml(&src, "t.toml")
            .expect_err("bad url")
            .to_string();
        assert!(e.contains("pools.origin.origins[0].url"), "{e}");
    }

    #[test]
    fn bad_typed_values_are_refused_at_their_line_and_key() {
        let src = MIN.replace("hosts = [\"*\"]", "hosts = [\"*\", \"a.*.test\"]");
        let e = Config::from_toml(&src, "t.toml")
            .expect_err("bad host")
            .to_string();
        assert!(
            e.starts_with("t.toml:6:9: sites[0].hosts: \"a.*.test\" is not a host name"),
            "{e}"
        );
        let src = MIN.replace("http://127.0.0.1:9000", "http://u:p@x");
        let e = Config::from_toml(&src, "t.toml")
            .expect_err("bad url")
            .to_string();
        assert!(
            e.starts_with(
                "t.toml:10:20: pools.origin.origins[0].url: \"http://u:p@x\": credentials"
            ),
            "{e}"
        );
        let src = format!("[cache]\npurge_allow = [\"10.0.0.0/33\"]\n{MIN}");
        let e = Config::from_toml(&src, "t.toml")
            .expect_err("bad network")
            .to_string();
        assert!(
            e.starts_with(
                "t.toml:2:15: cache.purge_allow: \"10.0.0.0/33\" is not an address or CIDR network"
            ),
            "{e}"
        );
        let src = format!("{MIN}\n[pools.origin.timeouts]\nconnect = \"5 parsecs\"\n");
        let e = Config::from_toml(&src, "t.toml")
            .expect_err("bad duration")
            .to_string();
        assert!(
            e.starts_with("t.toml:13:11: pools.origin.timeouts.connect: "),
            "{e}"
        );
    }

    /// Every example config in the repository parses; file checks aside
    /// (the examples name production paths), they validate.
    #[test]
    fn example_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("examples dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let src = std::fs::read_to_string(&path).expect("read");
                let cfg: Config =
                    toml::from_str(&src).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let problems: Vec<String> = cfg
                    .validate()
                    .into_iter()
                    .filter(|p| !p.message.contains("is not a readable file"))
                    .map(|p| p.message)
                    .collect();
                assert!(problems.is_empty(), "{}: {problems:?}", path.display());
                n += 1;
            }
        }
        assert!(n >= 2, "found {n} example configs");
    }

    #[test]
    fn status_sets() {
        let s = StatusSet::parse("2xx,304").expect("valid");
        assert!(s.contains(200) && s.contains(299) && s.contains(304));
        assert!(!s.contains(301));
        assert!(StatusSet::parse("200-399").expect("valid").contains(302));
        assert!(StatusSet::parse("700").is_err());
        assert!(StatusSet::parse("abc").is_err());
    }

    #[test]
    fn a_non_loopback_admin_needs_a_token() {
        for addr in ["0.0.0.0:9901", "[::]:9901", "192.0.2.1:9901"] {
            let src = format!("[admin]\nlisten = \"{addr}\"\n{MIN}");
            let e = Config::from_toml(&src, "t.toml")
                .expect_err("open admin")
                .to_string();
            assert!(e.starts_with("t.toml:2:10: admin.listen: "), "{e}");
            assert!(e.contains("not a loopback address"), "{e}");
            let ok = format!("[admin]\nlisten = \"{addr}\"\ntoken = \"t\"\n{MIN}");
            Config::from_toml(&ok, "t.toml").expect("with a token");
        }
        for addr in ["127.0.0.1:9901", "[::1]:9901", "127.0.0.2:0"] {
            let src = format!("[admin]\nlisten = \"{addr}\"\n{MIN}");
            Config::from_toml(&src, "t.toml").expect("loopback needs no token");
        }
    }

    #[test]
    fn a_read_token_needs_the_full_token_and_none_may_be_empty() {
        let src = format!("[admin]\nread_token = \"r\"\n{MIN}");
        let e = Config::from_toml(&src, "t.toml")
            .expect_err("read only")
            .to_string();
        assert!(
            e.contains("admin.read_token: a read-only token needs"),
            "{e}"
        );
        let src = format!("[admin]\ntoken = \"\"\n{MIN}");
        let e = Config::from_toml(&src, "t.toml")
            .expect_err("empty")
            .to_string();
        assert!(e.contains("admin.token: must not be empty"), "{e}");
        let src = format!("[admin]\ntoken = \"t\"\nread_token = \"r\"\n{MIN}");
        Config::from_toml(&src, "t.toml").expect("both");
    }

    #[test]
    fn plugin_config_and_config_file_are_exclusive() {
        let f = std::env::temp_dir().join(format!("meridian-cfgtest-{}.json", std::process::id()));
        std::fs::write(&f, "{}").expect("write");
        let src = MIN.replace(
            "pool = \"origin\"\n",
            &format!(
                "pool = \"origin\"\n[[sites.plugins]]\npath = \"{}\"\nconfig = \"x\"\nconfig_file = \"{}\"\n",
                f.display(),
                f.display()
            ),
        );
        let e = Config::from_toml(&src, "t.toml")
            .expect_err("both")
            .to_string();
        assert!(
            e.starts_with(
                "t.toml:11:15: sites[0].plugins[0].config_file: set config or config_file"
            ),
            "{e}"
        );
        let _ = std::fs::remove_file(&f);
    }

    #[test]
    fn redaction_hides_plugin_config_values_and_read_tokens() {
        let src = MIN.replace(
            "pool = \"origin\"\n",
            "pool = \"origin\"\n[[sites.plugins]]\npath = \"/p.wasm\"\nconfig = { alg = \"HS256\", secret = \"hunter2\" }\n\
             [[sites.plugins]]\npath = \"/q.wasm\"\nconfig = \"key=hunter3\"\n",
        );
        let mut c: Config = toml::from_str(&src).expect("parses");
        c.admin.token = Some("s3cret".into());
        c.admin.read_token = Some("r3ad".into());
        let shown = toml::to_string(&c.redacted()).expect("serialises");
        for secret in ["hunter2", "hunter3", "s3cret", "r3ad", "HS256"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("secret = \"<redacted>\""), "{shown}");
        // Debug output (what `?config` in a log line prints) hides them too.
        let dbg = format!("{c:?}");
        for secret in ["hunter2", "hunter3", "s3cret", "r3ad", "HS256"] {
            assert!(!dbg.contains(secret), "{secret} in {dbg}");
        }
    }

    #[test]
    fn redaction_hides_the_token() {
        let mut c = Config::from_toml(MIN, "t").expect("valid");
        c.admin.token = Some("s3cret".into());
        let shown = toml::to_string(&c.redacted()).expect("serialises");
        assert!(!shown.contains("s3cret"));
    }
}
