//! `compat`: a plugin written directly against the upstream `proxy-wasm`
//! crate, in the style of Envoy's examples, without Meridian's SDK. The
//! edge's end-to-end tests load it to check that Meridian's host behaves as
//! Envoy does for the same module.
//!
//! * Request headers: increments the counter `compat_requests`, logs the
//!   `request.path` property at info level, adds `x-compat-seen: 1` to the
//!   request; a path starting with `/compat-deny` is answered with `403`,
//!   `x-compat: denied` and the body `denied by compat\n`.
//! * A path starting with `/compat-authz` pauses the request for an
//!   `http_call` to the cluster (pool) `authz`: `GET /status/<x-authz-status
//!   or 200>` (or the path in `x-authz-path`), with a timeout of 5 s (or
//!   `x-authz-timeout-ms`). A 200 answer resumes the request with
//!   `x-authz-checked: 200`; anything else (or a failed or timed-out call) is
//!   answered with 403 — the ext-authz pattern.
//! * Ticks: the root context asks for a tick every 100 ms and counts them in
//!   the counter `compat_ticks`.
//! * A path starting with `/compat-body` has its request body buffered
//!   (the filter pauses until the end of the stream, as Envoy filters do):
//!   a body containing `forbidden` is answered with `403` and `body
//!   refused\n`; any other is sent on upper-cased.
//! * Response headers: adds `x-compat-plugin: upstream-proxy-wasm`, removes
//!   `x-powered-by`, puts the plugin configuration (a plain string) in
//!   `x-compat-config`, and the request's `:path` (read in the response
//!   phase, as Envoy allows) in `x-compat-request-path`.

use std::rc::Rc;
use std::time::Duration;

use log::{info, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(CompatRoot {
            config: Rc::new(String::new()),
            requests: None,
            ticks: None,
        })
    });
}}

struct CompatRoot {
    config: Rc<String>,
    requests: Option<u32>,
    ticks: Option<u32>,
}

impl Context for CompatRoot {}

impl RootContext for CompatRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        let config = String::from_utf8_lossy(&raw).trim().to_owned();
        if config.chars().any(char::is_control) {
            warn!("compat: configuration has control characters; not echoed");
            self.config = Rc::new(String::new());
        } else {
            self.config = Rc::new(config);
        }
        match proxy_wasm::hostcalls::define_metric(MetricType::Counter, "compat_requests") {
            Ok(id) => self.requests = Some(id),
            Err(status) => warn!("compat: define_metric failed: {status:?}"),
        }
        match proxy_wasm::hostcalls::define_metric(MetricType::Counter, "compat_ticks") {
            Ok(id) => self.ticks = Some(id),
            Err(status) => warn!("compat: define_metric failed: {status:?}"),
        }
        self.set_tick_period(Duration::from_millis(100));
        true
    }

    fn on_tick(&mut self) {
        if let Some(id) = self.ticks {
            let _ = proxy_wasm::hostcalls::increment_metric(id, 1);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(CompatHttp {
            context_id,
            config: self.config.clone(),
            requests: self.requests,
            check_body: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct CompatHttp {
    context_id: u32,
    config: Rc<String>,
    requests: Option<u32>,
    check_body: bool,
}

impl HttpContext for CompatHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(id) = self.requests {
            let _ = proxy_wasm::hostcalls::increment_metric(id, 1);
        }
        let path = match proxy_wasm::hostcalls::get_property(vec!["request", "path"]) {
            Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            _ => String::new(),
        };
        info!("compat #{}: request.path = {path}", self.context_id);

        self.add_http_request_header("x-compat-seen", "1");
        self.check_body = path.starts_with("/compat-body");
        if path.starts_with("/compat-authz") {
            let status = self
                .get_http_request_header("x-authz-status")
                .unwrap_or_else(|| "200".to_owned());
            let call_path = self
                .get_http_request_header("x-authz-path")
                .unwrap_or_else(|| format!("/status/{status}"));
            let timeout = self
                .get_http_request_header("x-authz-timeout-ms")
                .and_then(|v| v.parse().ok())
                .map_or(Duration::from_secs(5), Duration::from_millis);
            match self.dispatch_http_call(
                "authz",
                vec![
                    (":method", "GET"),
                    (":path", &call_path),
                    (":authority", "authz"),
                ],
                None,
                vec![],
                timeout,
            ) {
                Ok(_) => return Action::Pause,
                Err(status) => {
                    warn!("compat: dispatch_http_call failed: {status:?}");
                    self.send_http_response(503, vec![], Some(b"authz unavailable\n"));
                    return Action::Pause;
                }
            }
        }
        if path.starts_with("/compat-deny") {
            self.send_http_response(
                403,
                vec![("x-compat", "denied")],
                Some(b"denied by compat\n"),
            );
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.check_body {
            return Action::Continue;
        }
        if !end_of_stream {
            // Buffer: the host calls again with everything so far.
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        if body.windows(9).any(|w| w == b"forbidden") {
            self.send_http_response(403, vec![("x-compat", "body")], Some(b"body refused\n"));
            return Action::Pause;
        }
        self.set_http_request_body(0, body_size, &body.to_ascii_uppercase());
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.add_http_response_header("x-compat-plugin", "upstream-proxy-wasm");
        self.set_http_response_header("x-powered-by", None);
        if !self.config.is_empty() {
            self.set_http_response_header("x-compat-config", Some(&self.config));
        }
        if let Some(path) = self.get_http_request_header(":path") {
            self.set_http_response_header("x-compat-request-path", Some(&path));
        }
        Action::Continue
    }
}

impl Context for CompatHttp {
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        _num_headers: usize,
        _body_size: usize,
        _num_trailers: usize,
    ) {
        let status = self.get_http_call_response_header(":status");
        info!("compat #{}: authz answered {status:?}", self.context_id);
        if status.as_deref() == Some("200") {
            self.add_http_request_header("x-authz-checked", "200");
            self.resume_http_request();
        } else {
            self.send_http_response(403, vec![("x-compat", "authz")], Some(b"authz refused\n"));
        }
    }
}
