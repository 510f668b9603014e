//! Metrics kept by the host (`proxy_define_metric` and friends).
//!
//! Define metrics once, in [`crate::Plugin::configure`], and keep the
//! handles in the plugin. Names are shared by all instances of the plugin;
//! defining the same name again returns the same metric. A metric the host
//! refused (the error is logged) is a silent no-op handle.
//!
//! ```
//! use meridian_plugin_sdk::Counter;
//! let denied = Counter::define("jwt_denied");
//! denied.increment();
//! ```

use crate::{MetricKind, sys};

/// A counter: only goes up.
#[derive(Debug, Clone, Copy)]
pub struct Counter(Option<u32>);

impl Counter {
    /// Define (or look up) the counter `name`.
    pub fn define(name: &str) -> Self {
        Self(sys::define_metric(MetricKind::Counter, name))
    }

    /// Add one.
    pub fn increment(&self) {
        self.add(1);
    }

    /// Add `n`.
    pub fn add(&self, n: u64) {
        if let Some(id) = self.0 {
            sys::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// The current value, if the host reports it.
    pub fn value(&self) -> Option<u64> {
        sys::metric_value(self.0?)
    }
}

/// A gauge: goes up and down.
#[derive(Debug, Clone, Copy)]
pub struct Gauge(Option<u32>);

impl Gauge {
    /// Define (or look up) the gauge `name`.
    pub fn define(name: &str) -> Self {
        Self(sys::define_metric(MetricKind::Gauge, name))
    }

    /// Set the value.
    pub fn set(&self, value: u64) {
        if let Some(id) = self.0 {
            sys::record_metric(id, value);
        }
    }

    /// Add `delta` (may be negative).
    pub fn add(&self, delta: i64) {
        if let Some(id) = self.0 {
            sys::increment_metric(id, delta);
        }
    }

    /// The current value, if the host reports it.
    pub fn value(&self) -> Option<u64> {
        sys::metric_value(self.0?)
    }
}

/// A histogram: a distribution of recorded values.
#[derive(Debug, Clone, Copy)]
pub struct Histogram(Option<u32>);

impl Histogram {
    /// Define (or look up) the histogram `name`.
    pub fn define(name: &str) -> Self {
        Self(sys::define_metric(MetricKind::Histogram, name))
    }

    /// Record one value.
    pub fn record(&self, value: u64) {
        if let Some(id) = self.0 {
            sys::record_metric(id, value);
        }
    }
}
