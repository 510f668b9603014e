//! The one place the SDK talks to the host.
//!
//! On `wasm32` every function here is a thin wrapper over
//! [`proxy_wasm::hostcalls`]. On any other target (native `cargo test`) the
//! same functions work on a thread-local [`FakeHost`], so plugin logic and
//! the SDK's own glue run unchanged in unit tests (see [`crate::testing`]).
//! Nothing else in the SDK calls the host directly.

use std::time::SystemTime;

use crate::{LocalResponse, LogLevel, MetricKind};

/// A header map the plugin can see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Map {
    RequestHeaders,
    ResponseHeaders,
}

/// A buffer the plugin can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Buf {
    RequestBody,
    ResponseBody,
    PluginConfiguration,
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::*;
    use proxy_wasm::hostcalls as hc;
    use proxy_wasm::types::{BufferType, MapType, MetricType, Status};

    fn map(m: Map) -> MapType {
        match m {
            Map::RequestHeaders => MapType::HttpRequestHeaders,
            Map::ResponseHeaders => MapType::HttpResponseHeaders,
        }
    }

    fn buf(b: Buf) -> BufferType {
        match b {
            Buf::RequestBody => BufferType::HttpRequestBody,
            Buf::ResponseBody => BufferType::HttpResponseBody,
            Buf::PluginConfiguration => BufferType::PluginConfiguration,
        }
    }

    fn level(l: LogLevel) -> proxy_wasm::types::LogLevel {
        use proxy_wasm::types::LogLevel as L;
        match l {
            LogLevel::Trace => L::Trace,
            LogLevel::Debug => L::Debug,
            LogLevel::Info => L::Info,
            LogLevel::Warn => L::Warn,
            LogLevel::Error => L::Error,
            LogLevel::Critical => L::Critical,
        }
    }

    fn failed(what: &str, s: Status) {
        let _ = hc::log(
            proxy_wasm::types::LogLevel::Error,
            &format!("meridian-plugin-sdk: {what} failed: {s:?}"),
        );
    }

    pub(crate) fn header(m: Map, name: &str) -> Option<Vec<u8>> {
        hc::get_map_value_bytes(map(m), name).ok().flatten()
    }

    pub(crate) fn headers(m: Map) -> Vec<(String, Vec<u8>)> {
        hc::get_map_bytes(map(m)).unwrap_or_default()
    }

    pub(crate) fn set_header(m: Map, name: &str, value: &[u8]) {
        if let Err(s) = hc::set_map_value_bytes(map(m), name, Some(value)) {
            failed("set header", s);
        }
    }

    pub(crate) fn add_header(m: Map, name: &str, value: &[u8]) {
        if let Err(s) = hc::add_map_value_bytes(map(m), name, value) {
            failed("add header", s);
        }
    }

    pub(crate) fn remove_header(m: Map, name: &str) {
        if let Err(s) = hc::remove_map_value(map(m), name) {
            failed("remove header", s);
        }
    }

    pub(crate) fn property(path: &[&str]) -> Option<Vec<u8>> {
        hc::get_property(path.to_vec()).ok().flatten()
    }

    pub(crate) fn buffer(b: Buf, start: usize, max: usize) -> Option<Vec<u8>> {
        hc::get_buffer(buf(b), start, max).ok().flatten()
    }

    pub(crate) fn set_buffer(b: Buf, start: usize, size: usize, value: &[u8]) {
        if let Err(s) = hc::set_buffer(buf(b), start, size, value) {
            failed("set buffer", s);
        }
    }

    pub(crate) fn send_response(r: &LocalResponse) {
        let headers: Vec<(&str, &str)> = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if let Err(s) = hc::send_http_response(u32::from(r.status), headers, Some(&r.body)) {
            failed("send local response", s);
        }
    }

    pub(crate) fn log(l: LogLevel, msg: &str) {
        let _ = hc::log(level(l), msg);
    }

    pub(crate) fn log_level() -> LogLevel {
        use proxy_wasm::types::LogLevel as L;
        match hc::get_log_level() {
            Ok(L::Trace) => LogLevel::Trace,
            Ok(L::Debug) => LogLevel::Debug,
            Ok(L::Info) => LogLevel::Info,
            Ok(L::Warn) => LogLevel::Warn,
            Ok(L::Error) => LogLevel::Error,
            Ok(L::Critical) => LogLevel::Critical,
            Err(_) => LogLevel::Info,
        }
    }

    pub(crate) fn now() -> SystemTime {
        hc::get_current_time().unwrap_or(SystemTime::UNIX_EPOCH)
    }

    pub(crate) fn define_metric(kind: MetricKind, name: &str) -> Option<u32> {
        let t = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Gauge => MetricType::Gauge,
            MetricKind::Histogram => MetricType::Histogram,
        };
        match hc::define_metric(t, name) {
            Ok(id) => Some(id),
            Err(s) => {
                failed("define metric", s);
                None
            }
        }
    }

    pub(crate) fn increment_metric(id: u32, by: i64) {
        let _ = hc::increment_metric(id, by);
    }

    pub(crate) fn record_metric(id: u32, value: u64) {
        let _ = hc::record_metric(id, value);
    }

    pub(crate) fn metric_value(id: u32) -> Option<u64> {
        hc::get_metric(id).ok()
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use super::*;
    use std::cell::RefCell;
    use std::time::{Duration, UNIX_EPOCH};

    /// The state behind the native implementation: one per thread.
    #[derive(Debug, Clone)]
    pub(crate) struct FakeHost {
        pub request_headers: Vec<(String, Vec<u8>)>,
        pub response_headers: Vec<(String, Vec<u8>)>,
        pub request_body: Vec<u8>,
        pub response_body: Vec<u8>,
        pub plugin_config: Vec<u8>,
        pub properties: Vec<(Vec<String>, Vec<u8>)>,
        pub local_response: Option<LocalResponse>,
        pub logs: Vec<(LogLevel, String)>,
        pub log_level: LogLevel,
        pub now: SystemTime,
        pub metrics: Vec<(String, MetricKind, i64)>,
    }

    impl Default for FakeHost {
        fn default() -> Self {
            Self {
                request_headers: Vec::new(),
                response_headers: Vec::new(),
                request_body: Vec::new(),
                response_body: Vec::new(),
                plugin_config: Vec::new(),
                properties: Vec::new(),
                local_response: None,
                logs: Vec::new(),
                log_level: LogLevel::Trace,
                now: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
                metrics: Vec::new(),
            }
        }
    }

    thread_local! {
        static FAKE: RefCell<FakeHost> = RefCell::new(FakeHost::default());
    }

    /// Run `f` on this thread's fake host.
    pub(crate) fn with_fake<R>(f: impl FnOnce(&mut FakeHost) -> R) -> R {
        FAKE.with(|h| f(&mut h.borrow_mut()))
    }

    fn map_of(h: &mut FakeHost, m: Map) -> &mut Vec<(String, Vec<u8>)> {
        match m {
            Map::RequestHeaders => &mut h.request_headers,
            Map::ResponseHeaders => &mut h.response_headers,
        }
    }

    pub(crate) fn header(m: Map, name: &str) -> Option<Vec<u8>> {
        with_fake(|h| {
            map_of(h, m)
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        })
    }

    pub(crate) fn headers(m: Map) -> Vec<(String, Vec<u8>)> {
        with_fake(|h| map_of(h, m).clone())
    }

    pub(crate) fn set_header(m: Map, name: &str, value: &[u8]) {
        with_fake(|h| {
            let map = map_of(h, m);
            match map.iter().position(|(k, _)| k.eq_ignore_ascii_case(name)) {
                Some(i) => {
                    map[i].1 = value.to_vec();
                    let mut j = i + 1;
                    while j < map.len() {
                        if map[j].0.eq_ignore_ascii_case(name) {
                            map.remove(j);
                        } else {
                            j += 1;
                        }
                    }
                }
                None => map.push((name.to_owned(), value.to_vec())),
            }
        })
    }

    pub(crate) fn add_header(m: Map, name: &str, value: &[u8]) {
        with_fake(|h| map_of(h, m).push((name.to_owned(), value.to_vec())))
    }

    pub(crate) fn remove_header(m: Map, name: &str) {
        with_fake(|h| map_of(h, m).retain(|(k, _)| !k.eq_ignore_ascii_case(name)))
    }

    pub(crate) fn property(path: &[&str]) -> Option<Vec<u8>> {
        with_fake(|h| {
            if let Some((_, v)) = h.properties.iter().find(|(p, _)| p == path) {
                return Some(v.clone());
            }
            // The real host derives these from the request headers.
            let pseudo = match path {
                ["request", "path"] => ":path",
                ["request", "method"] => ":method",
                ["request", "host"] => ":authority",
                ["request", "scheme"] => ":scheme",
                _ => return None,
            };
            h.request_headers
                .iter()
                .find(|(k, _)| k == pseudo)
                .map(|(_, v)| v.clone())
        })
    }

    pub(crate) fn buffer(b: Buf, start: usize, max: usize) -> Option<Vec<u8>> {
        with_fake(|h| {
            let data = match b {
                Buf::RequestBody => &h.request_body,
                Buf::ResponseBody => &h.response_body,
                Buf::PluginConfiguration => &h.plugin_config,
            };
            let start = start.min(data.len());
            let end = start.saturating_add(max).min(data.len());
            (end > start).then(|| data[start..end].to_vec())
        })
    }

    pub(crate) fn set_buffer(b: Buf, start: usize, size: usize, value: &[u8]) {
        with_fake(|h| {
            let data = match b {
                Buf::RequestBody => &mut h.request_body,
                Buf::ResponseBody => &mut h.response_body,
                Buf::PluginConfiguration => return,
            };
            let start = start.min(data.len());
            let end = start.saturating_add(size).min(data.len());
            data.splice(start..end, value.iter().copied());
        })
    }

    pub(crate) fn send_response(r: &LocalResponse) {
        with_fake(|h| h.local_response = Some(r.clone()))
    }

    pub(crate) fn log(l: LogLevel, msg: &str) {
        with_fake(|h| h.logs.push((l, msg.to_owned())))
    }

    pub(crate) fn log_level() -> LogLevel {
        with_fake(|h| h.log_level)
    }

    pub(crate) fn now() -> SystemTime {
        with_fake(|h| h.now)
    }

    pub(crate) fn define_metric(kind: MetricKind, name: &str) -> Option<u32> {
        with_fake(|h| {
            let id = match h.metrics.iter().position(|(n, _, _)| n == name) {
                Some(i) => i,
                None => {
                    h.metrics.push((name.to_owned(), kind, 0));
                    h.metrics.len() - 1
                }
            };
            u32::try_from(id).ok()
        })
    }

    pub(crate) fn increment_metric(id: u32, by: i64) {
        with_fake(|h| {
            if let Some(m) = h.metrics.get_mut(id as usize) {
                m.2 = m.2.saturating_add(by);
            }
        })
    }

    pub(crate) fn record_metric(id: u32, value: u64) {
        with_fake(|h| {
            if let Some(m) = h.metrics.get_mut(id as usize) {
                m.2 = i64::try_from(value).unwrap_or(i64::MAX);
            }
        })
    }

    pub(crate) fn metric_value(id: u32) -> Option<u64> {
        with_fake(|h| {
            h.metrics
                .get(id as usize)
                .map(|m| u64::try_from(m.2).unwrap_or(0))
        })
    }
}

pub(crate) use imp::*;
