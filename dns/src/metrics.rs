//! Prometheus metrics (prefix `meridian_dns_`), registered once; labels
//! are `&'static str` (region names are interned once per config load).

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of `queries_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    /// Query type (`A`, `AAAA`, ..., `OTHER`).
    pub qtype: &'static str,
    /// Response code.
    pub rcode: &'static str,
    /// Region that answered a steered query, else `none`.
    pub region: &'static str,
    /// `udp` or `tcp`.
    pub proto: &'static str,
}

/// Labels of `ecs_queries_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EcsLabels {
    /// `v4` or `v6`.
    pub family: &'static str,
    /// `used`, `disabled` or `invalid`.
    pub result: &'static str,
}

/// Labels for per-region series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegionLabels {
    /// Region name.
    pub region: &'static str,
}

/// Labels for health transitions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// Region name.
    pub region: &'static str,
    /// `up` or `down`.
    pub to: &'static str,
}

/// Labels for RRL actions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RrlLabels {
    /// `drop` or `slip`.
    pub action: &'static str,
}

/// Labels for reloads.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `config` or `geoip`.
    pub what: &'static str,
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Every metric, with its registry.
#[derive(Debug)]
pub struct Metrics {
    /// The registry served on `/metrics`.
    pub registry: Registry,
    /// Queries answered.
    pub queries: Family<QueryLabels, Counter>,
    /// ECS options seen.
    pub ecs: Family<EcsLabels, Counter>,
    /// Health state changes.
    pub transitions: Family<TransitionLabels, Counter>,
    /// Region up (1) or down (0).
    pub region_up: Family<RegionLabels, Gauge>,
    /// Region drained (1) or not (0).
    pub region_drained: Family<RegionLabels, Gauge>,
    /// RRL actions.
    pub rrl: Family<RrlLabels, Counter>,
    /// Reload attempts.
    pub reloads: Family<ReloadLabels, Counter>,
    /// Time to build a response, seconds.
    pub latency: Histogram,
    /// TCP limits, admin refusals, transfers and NOTIFY.
    pub ops: OpsMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Create and register.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meridian_dns");
        let queries = Family::<QueryLabels, Counter>::default();
        let ecs = Family::<EcsLabels, Counter>::default();
        let transitions = Family::<TransitionLabels, Counter>::default();
        let region_up = Family::<RegionLabels, Gauge>::default();
        let region_drained = Family::<RegionLabels, Gauge>::default();
        let rrl = Family::<RrlLabels, Counter>::default();
        let reloads = Family::<ReloadLabels, Counter>::default();
        let latency = Histogram::new(exponential_buckets(0.000_005, 2.0, 16));
        registry.register("queries", "DNS queries answered", queries.clone());
        registry.register(
            "ecs_queries",
            "Queries carrying EDNS Client Subnet",
            ecs.clone(),
        );
        registry.register(
            "health_transitions",
            "Region health state changes",
            transitions.clone(),
        );
        registry.register(
            "region_up",
            "Region health (1 up, 0 down)",
            region_up.clone(),
        );
        registry.register(
            "region_drained",
            "Region drained by an operator",
            region_drained.clone(),
        );
        registry.register("rrl_actions", "Responses limited by RRL", rrl.clone());
        registry.register(
            "reloads",
            "Configuration and GeoIP reloads",
            reloads.clone(),
        );
        registry.register(
            "query_duration_seconds",
            "Time to build a response",
            latency.clone(),
        );
        let ops = OpsMetrics::register(&mut registry);
        Self {
            ops,
            registry,
            queries,
            ecs,
            transitions,
            region_up,
            region_drained,
            rrl,
            reloads,
            latency,
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        if prometheus_client::encoding::text::encode(&mut s, &self.registry).is_err() {
            s.clear();
        }
        s
    }
}

/// Labels with one static `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why.
    pub reason: &'static str,
}

/// Labels of `zone_transfers_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransferLabels {
    /// `AXFR` or `IXFR`.
    pub qtype: &'static str,
    /// `ok`, `refused`, `notauth` or `error`.
    pub result: &'static str,
}

/// Labels of `notify_sent_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NotifyLabels {
    /// `acked`, `retry` or `failed`.
    pub result: &'static str,
}

/// The operational metrics: TCP connection limits, admin refusals, zone
/// transfers and NOTIFY.
#[derive(Debug, Default)]
pub struct OpsMetrics {
    /// TCP connections open now.
    pub tcp_open: Gauge,
    /// TCP connections closed at accept (`max_clients`, `per_client`) or
    /// later (`idle`).
    pub tcp_closed: Family<ReasonLabels, Counter>,
    /// Admin requests refused (`unauthenticated`, `read_only`, `cross_site`).
    pub admin_refused: Family<ReasonLabels, Counter>,
    /// Zone transfer requests.
    pub transfers: Family<TransferLabels, Counter>,
    /// NOTIFY messages sent.
    pub notify: Family<NotifyLabels, Counter>,
}

impl OpsMetrics {
    fn register(r: &mut Registry) -> Self {
        let m = Self::default();
        r.register(
            "tcp_connections",
            "DNS TCP connections open",
            m.tcp_open.clone(),
        );
        r.register(
            "tcp_closed",
            "DNS TCP connections closed by a limit (max_clients, per_client at accept; idle)",
            m.tcp_closed.clone(),
        );
        r.register(
            "admin_refused",
            "Admin API requests refused",
            m.admin_refused.clone(),
        );
        r.register(
            "zone_transfers",
            "Zone transfer (AXFR/IXFR) requests by result",
            m.transfers.clone(),
        );
        r.register(
            "notify_sent",
            "NOTIFY messages sent by result",
            m.notify.clone(),
        );
        m
    }
}

/// Intern a string for use as a label value. The set only grows by the
/// distinct names found in configs, so it stays small.
pub fn intern(s: &str) -> &'static str {
    static SET: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let set = SET.get_or_init(|| Mutex::new(HashSet::new()));
    let Ok(mut set) = set.lock() else {
        return "unknown";
    };
    if let Some(v) = set.get(s) {
        return v;
    }
    let leaked: &'static str = Box::leak(s.to_owned().into_boxed_str());
    set.insert(leaked);
    leaked
}

/// A static label for a record type.
pub fn qtype_label(t: hickory_proto::rr::RecordType) -> &'static str {
    use hickory_proto::rr::RecordType as T;
    match t {
        T::A => "A",
        T::AAAA => "AAAA",
        T::ANY => "ANY",
        T::CAA => "CAA",
        T::CNAME => "CNAME",
        T::DS => "DS",
        T::DNSKEY => "DNSKEY",
        T::HTTPS => "HTTPS",
        T::MX => "MX",
        T::NS => "NS",
        T::PTR => "PTR",
        T::SOA => "SOA",
        T::SRV => "SRV",
        T::SVCB => "SVCB",
        T::TXT => "TXT",
        T::AXFR => "AXFR",
        T::IXFR => "IXFR",
        _ => "OTHER",
    }
}

/// A static label for a response code.
pub fn rcode_label(r: hickory_proto::op::ResponseCode) -> &'static str {
    use hickory_proto::op::ResponseCode as R;
    match r {
        R::NoError => "NOERROR",
        R::FormErr => "FORMERR",
        R::ServFail => "SERVFAIL",
        R::NXDomain => "NXDOMAIN",
        R::NotImp => "NOTIMP",
        R::Refused => "REFUSED",
        R::BADVERS => "BADVERS",
        _ => "OTHER",
    }
}
