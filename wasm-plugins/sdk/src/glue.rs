//! The proxy-wasm contexts behind [`crate::register!`]: one root context per
//! instance (configuration) and one HTTP context per request (hooks, body
//! buffering, local responses).
//!
//! The phase logic lives in inherent methods of [`Http`] that only use
//! [`crate::sys`], so [`crate::testing`] drives exactly this code natively.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::sys::{self, Buf, Map};
use crate::{Body, Flow, LogLevel, Plugin, Request, Response};

/// Called from `_initialize` by [`crate::register!`].
pub fn start<P: Plugin>() {
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::<P>::new()) });
}

/// Parse and apply a configuration, logging why it was refused.
pub(crate) fn configure<P: Plugin>(raw: &[u8]) -> Result<P, String> {
    crate::log::refresh_level();
    let result = P::parse_config(raw).and_then(P::configure);
    if let Err(e) = &result {
        sys::log(LogLevel::Error, &format!("configuration rejected: {e}"));
    }
    result
}

pub(crate) struct Root<P: Plugin> {
    plugin: Option<Rc<P>>,
}

impl<P: Plugin> Root<P> {
    fn new() -> Self {
        Self { plugin: None }
    }
}

impl<P: Plugin> Context for Root<P> {}

impl<P: Plugin> RootContext for Root<P> {
    fn on_configure(&mut self, size: usize) -> bool {
        let raw = sys::buffer(Buf::PluginConfiguration, 0, size).unwrap_or_default();
        match configure::<P>(&raw) {
            Ok(p) => {
                self.plugin = Some(Rc::new(p));
                true
            }
            Err(_) => false,
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let plugin = self.plugin.clone()?;
        Some(Box::new(Http::new(plugin)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// What the SDK does with a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyMode {
    /// Stream it through.
    Pass,
    /// Have the host buffer it, hand it to the hook at the end.
    Buffer,
}

pub(crate) struct Http<P: Plugin> {
    pub(crate) plugin: Rc<P>,
    pub(crate) state: P::RequestState,
    pub(crate) request_body: BodyMode,
    pub(crate) response_body: BodyMode,
    /// The plugin answered: its later hooks are skipped.
    pub(crate) responded: bool,
}

impl<P: Plugin> Http<P> {
    pub(crate) fn new(plugin: Rc<P>) -> Self {
        Self {
            plugin,
            state: P::RequestState::default(),
            request_body: BodyMode::Pass,
            response_body: BodyMode::Pass,
            responded: false,
        }
    }

    fn flow(&mut self, flow: Flow) -> Action {
        match flow {
            Flow::Continue => Action::Continue,
            Flow::Respond(r) => {
                self.responded = true;
                self.request_body = BodyMode::Pass;
                self.response_body = BodyMode::Pass;
                sys::send_response(&r);
                Action::Pause
            }
        }
    }

    pub(crate) fn request_headers(&mut self, end_of_stream: bool) -> Action {
        let mut req = Request::new();
        let flow = self.plugin.on_request(&mut req, &mut self.state);
        if flow.is_continue() && P::WANTS_REQUEST_BODY && !req.skip_body && !end_of_stream {
            self.request_body = BodyMode::Buffer;
            sys::remove_header(Map::RequestHeaders, "content-length");
        }
        self.flow(flow)
    }

    pub(crate) fn response_headers(&mut self, end_of_stream: bool) -> Action {
        if self.responded {
            return Action::Continue;
        }
        let mut resp = Response::new();
        let flow = self.plugin.on_response(&mut resp, &mut self.state);
        if flow.is_continue() && P::WANTS_RESPONSE_BODY && !resp.skip_body && !end_of_stream {
            self.response_body = BodyMode::Buffer;
            sys::remove_header(Map::ResponseHeaders, "content-length");
        }
        self.flow(flow)
    }

    /// Shared body logic: pause (so the host buffers) until the end of the
    /// stream, then run the hook on the whole body and write it back.
    fn body(&mut self, response: bool, size: usize, end_of_stream: bool) -> Action {
        let (mode, buf, what) = if response {
            (self.response_body, Buf::ResponseBody, "response")
        } else {
            (self.request_body, Buf::RequestBody, "request")
        };
        if mode != BodyMode::Buffer {
            return Action::Continue;
        }
        let limit = self.plugin.max_body_bytes();
        if size > limit {
            sys::log(
                LogLevel::Warn,
                &format!("{what} body over {limit} bytes: passed through unmodified"),
            );
            if response {
                self.response_body = BodyMode::Pass;
            } else {
                self.request_body = BodyMode::Pass;
            }
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        if response {
            self.response_body = BodyMode::Pass;
        } else {
            self.request_body = BodyMode::Pass;
        }
        let mut body = Body::from_bytes(sys::buffer(buf, 0, size).unwrap_or_default());
        let flow = if response {
            self.plugin.on_response_body(&mut body, &mut self.state)
        } else {
            self.plugin.on_request_body(&mut body, &mut self.state)
        };
        if body.is_modified() {
            sys::set_buffer(buf, 0, size, body.bytes());
        }
        self.flow(flow)
    }

    pub(crate) fn request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.body(false, size, end_of_stream)
    }

    pub(crate) fn response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.body(true, size, end_of_stream)
    }

    pub(crate) fn done(&mut self) {
        self.plugin.on_done(&mut self.state);
    }
}

impl<P: Plugin> Context for Http<P> {
    fn on_done(&mut self) -> bool {
        self.done();
        true
    }
}

impl<P: Plugin> HttpContext for Http<P> {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.request_headers(end_of_stream)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.request_body(body_size, end_of_stream)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.response_headers(end_of_stream)
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.response_body(body_size, end_of_stream)
    }
}
