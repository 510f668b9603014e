//! Prometheus metrics, registered once; the labelled families live in one
//! struct. Label values are `&'static str` from enums, or names that the
//! config created once (site, pool, origin), never strings built per request.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub protocol: &'static str,
    pub status_class: &'static str,
    pub site: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Protocol {
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Transport {
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

/// Set by the `meridian-edge` binary when jemalloc is its global allocator:
/// a test or fuzz binary that links this library with the `jemalloc`
/// feature allocates with something else, and jemalloc's counts would not
/// be its heap.
#[cfg(feature = "jemalloc")]
static JEMALLOC_IS_GLOBAL: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// The binary's global allocator is jemalloc: `meridian_allocator_bytes`
/// reads its statistics from now on.
#[cfg(feature = "jemalloc")]
pub fn jemalloc_is_global() {
    JEMALLOC_IS_GLOBAL.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// One of the allocator's byte counts (`allocated`, `active`, `resident`,
/// `mapped`, `retained`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AllocatorStat {
    pub stat: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    pub plugin: Arc<str>,
    pub kind: &'static str,
}

/// A metric a plugin defined (`proxy_define_metric`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginMetricLabels {
    pub plugin: Arc<str>,
    pub name: Arc<str>,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheResult {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuicEndpoint {
    pub address: String,
    pub endpoint: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginLabels {
    pub pool: Arc<str>,
    pub origin: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginTransition {
    pub pool: Arc<str>,
    pub origin: Arc<str>,
    pub to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamError {
    pub pool: Arc<str>,
    pub kind: &'static str,
}

/// Bytes per site, by direction: read from origins, or sent to clients.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteBytes {
    pub site: Arc<str>,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: Arc<str>,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<Protocol, Histogram>,
    pub connections_active: Family<Transport, Gauge>,
    pub connections_total: Family<Transport, Counter>,
    pub connections_rejected: Counter,
    pub tls_handshakes: Family<Outcome, Counter>,
    pub bad_requests: Family<Reason, Counter>,
    pub client_timeouts: Family<Reason, Counter>,
    pub upstream_requests: Family<PoolLabels, Counter>,
    pub upstream_connects: Family<Outcome, Counter>,
    pub upstream_errors: Family<UpstreamError, Counter>,
    /// Requests failed inside the edge (a plugin's failure, an internal
    /// error), by kind: neither the client's fault nor an origin's.
    pub internal_errors: Family<Reason, Counter>,
    pub upstream_retries: Family<PoolLabels, Counter>,
    pub pool_panic: Family<PoolLabels, Counter>,
    pub site_bytes: Family<SiteBytes, Counter>,
    pub upstream_connect_duration: Histogram,
    pub origin_healthy: Family<OriginLabels, Gauge>,
    pub origin_health_transitions: Family<OriginTransition, Counter>,
    pub config_reloads: Family<Outcome, Counter>,
    pub cert_reloads: Family<Outcome, Counter>,
    pub access_log_dropped: Counter,
    pub quic_handshakes: Family<Outcome, Counter>,
    pub quic_retries: Counter,
    /// QUIC connections accepted, per UDP socket (`http3.endpoints`).
    pub quic_endpoint_connections: Family<QuicEndpoint, Counter>,
    pub quic_rtt: Histogram,
    pub quic_lost_packets: Counter,
    pub cache_requests: Family<CacheResult, Counter>,
    pub plugin_results: Family<Reason, Counter>,
    /// The `continue` and `response-continue` members of `plugin_results`,
    /// resolved once: they are counted on every request through a plugin.
    pub plugin_continue: Counter,
    pub plugin_response_continue: Counter,
    /// The per-connection handles, resolved once.
    pub conn: ConnHandles,
    pub plugin_metric: Family<PluginMetricLabels, Gauge>,
    pub plugin_histogram_count: Family<PluginMetricLabels, Gauge>,
    pub plugin_callbacks: Family<PluginLabels, Gauge>,
    pub plugin_failures: Family<PluginLabels, Gauge>,
    pub plugin_deadline_clamp: Family<PluginLabels, Gauge>,
    pub plugin_instances: Family<PluginLabels, Gauge>,
    /// Plugin loads that compiled their module, and those that reused the
    /// module of a plugin still loaded (a reload that kept the file).
    pub plugin_module_loads: Family<Outcome, Gauge>,
    pub cache_coalesced: Counter,
    pub cache_purges: Family<Reason, Counter>,
    pub cache_bytes: Family<Reason, Counter>,
    pub cache_occupancy: Family<Reason, Gauge>,
    pub cache_capacity: Family<Reason, Gauge>,
    pub cache_entries: Gauge,
    pub cache_disk_io_bytes: Family<Reason, Gauge>,
    pub cache_disk_read_latency: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub cache_corrupt: Gauge,
    /// The storage's disk write errors (a full disk); raised to the storage's count at scrape.
    pub cache_disk_errors: Counter,
    /// Entries kept in memory only while the disk tier's filesystem was short of space.
    pub cache_disk_writes_skipped: Counter,
    /// jemalloc's byte counts, read at scrape (`update_allocator`); not
    /// registered when the edge is built with another allocator.
    pub allocator_bytes: Family<AllocatorStat, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Labelled handles counted on every connection, resolved once when the
/// metrics are built, so no connection looks them up in their families.
#[derive(Clone, Debug)]
pub struct ConnHandles {
    /// `connections_total` for `tcp`, `tls`.
    pub total: [Counter; 2],
    /// `connections_active` for `tcp`, `tls`.
    pub active: [Gauge; 2],
    /// `tls_handshakes` for `ok`, `error`, `timeout`.
    pub tls_ok: Counter,
    pub tls_error: Counter,
    pub tls_timeout: Counter,
    /// `upstream_connects` for `ok`.
    pub upstream_connect_ok: Counter,
}

impl ConnHandles {
    /// The index of a transport in `total` and `active`.
    pub fn transport(tls: bool) -> usize {
        usize::from(tls)
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("meridian");
        let plugin_results: Family<Reason, Counter> = Family::default();
        let resolved = |reason| plugin_results.get_or_create(&Reason { reason }).clone();
        let (plugin_continue, plugin_response_continue) =
            (resolved("continue"), resolved("response-continue"));
        let connections_active: Family<Transport, Gauge> = Family::default();
        let connections_total: Family<Transport, Counter> = Family::default();
        let tls_handshakes: Family<Outcome, Counter> = Family::default();
        let upstream_connects: Family<Outcome, Counter> = Family::default();
        let outcome =
            |f: &Family<Outcome, Counter>, result| f.get_or_create(&Outcome { result }).clone();
        let conn = ConnHandles {
            total: ["tcp", "tls"].map(|transport| {
                connections_total
                    .get_or_create(&Transport { transport })
                    .clone()
            }),
            active: ["tcp", "tls"].map(|transport| {
                connections_active
                    .get_or_create(&Transport { transport })
                    .clone()
            }),
            tls_ok: outcome(&tls_handshakes, "ok"),
            tls_error: outcome(&tls_handshakes, "error"),
            tls_timeout: outcome(&tls_handshakes, "timeout"),
            upstream_connect_ok: outcome(&upstream_connects, "ok"),
        };
        let m = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            connections_active,
            connections_total,
            connections_rejected: Counter::default(),
            tls_handshakes,
            bad_requests: Family::default(),
            client_timeouts: Family::default(),
            upstream_requests: Family::default(),
            upstream_connects,
            upstream_errors: Family::default(),
            internal_errors: Family::default(),
            upstream_retries: Family::default(),
            pool_panic: Family::default(),
            site_bytes: Family::default(),
            upstream_connect_duration: latency_histogram(),
            origin_healthy: Family::default(),
            origin_health_transitions: Family::default(),
            config_reloads: Family::default(),
            cert_reloads: Family::default(),
            access_log_dropped: Counter::default(),
            quic_handshakes: Family::default(),
            quic_retries: Counter::default(),
            quic_endpoint_connections: Family::default(),
            quic_rtt: latency_histogram(),
            quic_lost_packets: Counter::default(),
            cache_requests: Family::default(),
            plugin_results,
            plugin_continue,
            plugin_response_continue,
            conn,
            plugin_metric: Family::default(),
            plugin_histogram_count: Family::default(),
            plugin_callbacks: Family::default(),
            plugin_failures: Family::default(),
            plugin_deadline_clamp: Family::default(),
            plugin_instances: Family::default(),
            plugin_module_loads: Family::default(),
            cache_coalesced: Counter::default(),
            cache_purges: Family::default(),
            cache_bytes: Family::default(),
            cache_occupancy: Family::default(),
            cache_capacity: Family::default(),
            cache_entries: Gauge::default(),
            cache_disk_io_bytes: Family::default(),
            cache_disk_read_latency: Gauge::default(),
            cache_corrupt: Gauge::default(),
            cache_disk_errors: Counter::default(),
            cache_disk_writes_skipped: Counter::default(),
            allocator_bytes: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by protocol, status class and site",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request head to response head",
            m.request_duration.clone(),
        );
        registry.register(
            "connections_active",
            "Client connections open now",
            m.connections_active.clone(),
        );
        registry.register(
            "connections",
            "Client connections accepted",
            m.connections_total.clone(),
        );
        registry.register(
            "connections_rejected",
            "Client connections refused at max_connections",
            m.connections_rejected.clone(),
        );
        registry.register(
            "tls_handshakes",
            "TLS handshakes with clients, by result",
            m.tls_handshakes.clone(),
        );
        registry.register(
            "bad_requests",
            "Requests refused as malformed or over limits, by reason",
            m.bad_requests.clone(),
        );
        registry.register(
            "client_timeouts",
            "Client connections closed by a timeout, by reason",
            m.client_timeouts.clone(),
        );
        registry.register(
            "upstream_requests",
            "Requests sent to origins, retries included",
            m.upstream_requests.clone(),
        );
        registry.register(
            "upstream_connects",
            "Connections opened to origins, by result",
            m.upstream_connects.clone(),
        );
        registry.register(
            "upstream_errors",
            "Failed origin exchanges, by pool and kind",
            m.upstream_errors.clone(),
        );
        registry.register(
            "internal_errors",
            "Requests failed inside the edge (Wasm plugin failures, internal errors), by reason",
            m.internal_errors.clone(),
        );
        registry.register(
            "upstream_retries",
            "Requests retried on another attempt",
            m.upstream_retries.clone(),
        );
        registry.register(
            "site_bytes",
            "Body bytes per site: read from origins (direction=origin) against sent to clients (direction=client)",
            m.site_bytes.clone(),
        );
        registry.register(
            "pool_panic",
            "Origin picks made in panic mode (too few healthy origins: health ignored)",
            m.pool_panic.clone(),
        );
        registry.register(
            "upstream_connect_duration_seconds",
            "Time to connect (and handshake TLS) to an origin",
            m.upstream_connect_duration.clone(),
        );
        registry.register(
            "origin_healthy",
            "1 if an origin is in rotation, else 0",
            m.origin_healthy.clone(),
        );
        registry.register(
            "origin_health_transitions",
            "Origin health changes",
            m.origin_health_transitions.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads, by result",
            m.config_reloads.clone(),
        );
        registry.register(
            "certificate_reloads",
            "Certificate reloads, by result",
            m.cert_reloads.clone(),
        );
        registry.register(
            "access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            m.access_log_dropped.clone(),
        );
        registry.register(
            "quic_handshakes",
            "QUIC handshakes with clients, by result",
            m.quic_handshakes.clone(),
        );
        registry.register(
            "quic_retries",
            "QUIC Retry packets sent to validate client addresses",
            m.quic_retries.clone(),
        );
        registry.register(
            "quic_endpoint_connections",
            "QUIC connections accepted, per listener address and UDP socket (http3.endpoints)",
            m.quic_endpoint_connections.clone(),
        );
        registry.register(
            "quic_rtt_seconds",
            "Smoothed RTT of QUIC connections, observed when they close",
            m.quic_rtt.clone(),
        );
        registry.register(
            "quic_lost_packets",
            "Packets QUIC connections declared lost",
            m.quic_lost_packets.clone(),
        );
        registry.register(
            "plugin_results",
            "Wasm plugin outcomes (continue, local-response, failed, close, stalled, http-call, http-call-failed, response-continue, body-buffer-exceeded, body-skipped-encoded, unsupported, overloaded: answered 503 for want of an instance, waited-for-instance)",
            m.plugin_results.clone(),
        );
        registry.register(
            "plugin_metric",
            "Metrics the plugins define themselves (value; sum for histograms)",
            m.plugin_metric.clone(),
        );
        registry.register(
            "plugin_histogram_count",
            "Sample counts of the plugins' own histograms",
            m.plugin_histogram_count.clone(),
        );
        registry.register(
            "plugin_callbacks",
            "Wasm callbacks run, per plugin",
            m.plugin_callbacks.clone(),
        );
        registry.register(
            "plugin_failures",
            "Wasm plugin failures and guest limits by kind (trap, deadline, memory, exit; instance-lost, overload, log-suppressed, shared-data-full)",
            m.plugin_failures.clone(),
        );
        registry.register(
            "plugin_deadline_clamp",
            "Wasm plugin deadline clamps after a missed deadline: clamps started, whether the plugin is clamped now (clamped, 0 or 1), and the wasm fuel a clamped callback gets (fuel)",
            m.plugin_deadline_clamp.clone(),
        );
        registry.register(
            "plugin_instances",
            "Wasm plugin instances, live (pooled or serving) and idle, and the request contexts they host (contexts)",
            m.plugin_instances.clone(),
        );
        registry.register(
            "plugin_module_loads",
            "Wasm plugin loads since start: compiled (the module was compiled) or reused (a plugin still loaded had the same bytes, as after a reload that kept the file)",
            m.plugin_module_loads.clone(),
        );
        registry.register("cache_requests", "Cache lookups and their results (hit, miss, stale-while-revalidate, stale-if-error, revalidated, pass, uncacheable, stored...)", m.cache_requests.clone());
        registry.register(
            "cache_coalesced_waiters",
            "Requests that waited for another request's origin fetch",
            m.cache_coalesced.clone(),
        );
        registry.register(
            "cache_purged_objects",
            "Objects purged, by kind (hard, soft, method, invalidation)",
            m.cache_purges.clone(),
        );
        registry.register(
            "cache_served_bytes",
            "Body bytes served from the cache, by tier",
            m.cache_bytes.clone(),
        );
        registry.register(
            "cache_occupancy_bytes",
            "Bytes stored in each cache tier",
            m.cache_occupancy.clone(),
        );
        registry.register(
            "cache_capacity_bytes",
            "Capacity of each cache tier",
            m.cache_capacity.clone(),
        );
        registry.register(
            "cache_disk_io_bytes",
            "Bytes read from and written to the disk tier",
            m.cache_disk_io_bytes.clone(),
        );
        registry.register(
            "cache_disk_read_latency_seconds",
            "Average latency of disk tier reads",
            m.cache_disk_read_latency.clone(),
        );
        registry.register(
            "cache_entries",
            "Entries in the cache (heads and chunks)",
            m.cache_entries.clone(),
        );
        registry.register(
            "cache_corrupt_entries",
            "Stored entries found corrupt and dropped",
            m.cache_corrupt.clone(),
        );
        registry.register(
            "cache_disk_errors",
            "Failed disk writes of the cache storage (index log, preallocation), e.g. a full disk",
            m.cache_disk_errors.clone(),
        );
        registry.register(
            "cache_disk_writes_skipped",
            "Entries kept in memory only because the disk tier's filesystem was short of space",
            m.cache_disk_writes_skipped.clone(),
        );
        #[cfg(feature = "jemalloc")]
        registry.register(
            "allocator_bytes",
            "The heap allocator's (jemalloc's) bytes: allocated (live objects), active (their pages), resident (an upper bound of its pages in RAM, metadata included), mapped, and retained (address space unmapped but kept)",
            m.allocator_bytes.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// Reads jemalloc's statistics into `allocator_bytes`, at scrape only
    /// (an epoch advance and five `mallctl` reads, under jemalloc's own
    /// locks; not timed). A failed read leaves the last values.
    #[cfg(feature = "jemalloc")]
    pub fn update_allocator(&self) {
        use tikv_jemalloc_ctl::{epoch, stats};
        if !JEMALLOC_IS_GLOBAL.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Err(e) = epoch::advance() {
            tracing::debug!("reading jemalloc's statistics: {e}");
            return;
        }
        type Read = fn() -> tikv_jemalloc_ctl::Result<usize>;
        let reads: [(&'static str, Read); 5] = [
            ("allocated", stats::allocated::read),
            ("active", stats::active::read),
            ("resident", stats::resident::read),
            ("mapped", stats::mapped::read),
            ("retained", stats::retained::read),
        ];
        for (stat, read) in reads {
            match read() {
                Ok(v) => {
                    self.allocator_bytes
                        .get_or_create(&AllocatorStat { stat })
                        .set(i64::try_from(v).unwrap_or(i64::MAX));
                }
                Err(e) => tracing::debug!("reading jemalloc's {stat} bytes: {e}"),
            }
        }
    }

    /// With another allocator there is nothing to read.
    #[cfg(not(feature = "jemalloc"))]
    pub fn update_allocator(&self) {}

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Counters of one family whose label is a `&'static str` from a known
/// set, resolved once (when the owner is built) so that counting an event
/// takes no lock on the family's map. A label outside the set is still
/// counted, through the family.
#[derive(Clone, Debug)]
pub struct KnownCounters<L> {
    known: Arc<std::collections::HashMap<&'static str, Counter>>,
    family: Family<L, Counter>,
    make: fn(&'static str) -> L,
}

impl<L> KnownCounters<L>
where
    L: Clone
        + std::hash::Hash
        + Eq
        + prometheus_client::encoding::EncodeLabelSet
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    pub fn new(
        family: &Family<L, Counter>,
        make: fn(&'static str) -> L,
        labels: &[&'static str],
    ) -> Self {
        let known = labels
            .iter()
            .map(|l| (*l, family.get_or_create(&make(l)).clone()))
            .collect();
        KnownCounters {
            known: Arc::new(known),
            family: family.clone(),
            make,
        }
    }

    /// The counter of `label`.
    pub fn get(&self, label: &'static str) -> Counter {
        match self.known.get(label) {
            Some(c) => c.clone(),
            None => self.family.get_or_create(&(self.make)(label)).clone(),
        }
    }

    pub fn inc(&self, label: &'static str) {
        self.inc_by(label, 1);
    }

    pub fn inc_by(&self, label: &'static str, n: u64) {
        match self.known.get(label) {
            Some(c) => {
                c.inc_by(n);
            }
            None => {
                self.family.get_or_create(&(self.make)(label)).inc_by(n);
            }
        }
    }
}

pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Raises `counter` to `total`, a count kept elsewhere and read at scrape time (never lowers it).
pub fn raise_counter(counter: &Counter, total: u64) {
    counter
        .inner()
        .fetch_max(total, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_with_prefix() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                protocol: "h1",
                status_class: "2xx",
                site: Arc::from("demo"),
            })
            .inc();
        let text = m.encode();
        assert!(
            text.contains(
                "meridian_requests_total{protocol=\"h1\",status_class=\"2xx\",site=\"demo\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("# EOF"));
    }
}
