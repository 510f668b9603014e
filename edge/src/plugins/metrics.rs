//! The plugins' metrics, exported when `/metrics` is scraped.

use std::sync::Arc;

use meridian_wasm_host::MetricKind;

use super::LoadedPlugin;
use crate::metrics::Metrics;

/// Exports each plugin's own metrics and the host's counters for it, for
/// the plugins of `chains` (every site's chain), and the host's module loads.
pub fn update_metrics<'a, C>(
    metrics: &Metrics,
    chains: C,
    host: Option<&meridian_wasm_host::PluginHost>,
) where
    C: IntoIterator<Item = &'a [Arc<LoadedPlugin>]>,
{
    use crate::metrics::{Outcome, PluginLabels, PluginMetricLabels};
    if let Some(h) = host {
        let s = h.module_stats();
        for (result, v) in [("compiled", s.compiled), ("reused", s.reused)] {
            metrics
                .plugin_module_loads
                .get_or_create(&Outcome { result })
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        }
    }
    metrics.plugin_metric.clear();
    metrics.plugin_histogram_count.clear();
    metrics.plugin_callbacks.clear();
    metrics.plugin_failures.clear();
    metrics.plugin_instances.clear();
    for chain in chains {
        for lp in chain {
            for m in lp.plugin.metrics() {
                let labels = PluginMetricLabels {
                    plugin: lp.name.clone(),
                    name: Arc::from(m.name.as_str()),
                    kind: match m.kind {
                        MetricKind::Counter => "counter",
                        MetricKind::Gauge => "gauge",
                        _ => "histogram",
                    },
                };
                metrics.plugin_metric.get_or_create(&labels).set(m.value);
                if m.kind == MetricKind::Histogram {
                    metrics
                        .plugin_histogram_count
                        .get_or_create(&labels)
                        .set(i64::try_from(m.count).unwrap_or(i64::MAX));
                }
            }
            let s = lp.plugin.stats();
            let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            metrics
                .plugin_callbacks
                .get_or_create(&PluginLabels {
                    plugin: lp.name.clone(),
                    kind: "callbacks",
                })
                .set(g(s.callbacks));
            // Besides the guest failures: contexts lost with an instance
            // another request's failure discarded, requests that found no
            // instance (overload: 503), log lines over the rate limit, and
            // shared-data writes over its limit.
            for (kind, v) in [
                ("trap", s.traps),
                ("deadline", s.deadline_exceeded),
                ("memory", s.memory_limit),
                ("exit", s.exits),
                ("instance-lost", s.lost_contexts),
                ("overload", s.overloads),
                ("log-suppressed", s.logs_suppressed),
                ("shared-data-full", s.shared_data_rejected),
            ] {
                metrics
                    .plugin_failures
                    .get_or_create(&PluginLabels {
                        plugin: lp.name.clone(),
                        kind,
                    })
                    .set(g(v));
            }
            for (kind, v) in [
                ("clamps", s.deadline_clamps),
                ("clamped", u64::from(s.deadline_clamped)),
                ("fuel", s.clamp_fuel),
            ] {
                metrics
                    .plugin_deadline_clamp
                    .get_or_create(&PluginLabels {
                        plugin: lp.name.clone(),
                        kind,
                    })
                    .set(g(v));
            }
            for (kind, v) in [
                ("live", s.live_instances),
                ("idle", s.idle_instances as u64),
                ("contexts", s.live_contexts),
            ] {
                metrics
                    .plugin_instances
                    .get_or_create(&PluginLabels {
                        plugin: lp.name.clone(),
                        kind,
                    })
                    .set(g(v));
            }
        }
    }
}
