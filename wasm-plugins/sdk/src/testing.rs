//! Native unit tests for plugins (not available on `wasm32`).
//!
//! On native targets the SDK's host calls go to a per-thread fake host. An
//! [`Exchange`] sets up that fake host with a request, drives the plugin
//! through the same glue code that runs in the wasm module, and lets the test
//! look at the result: the outcome of each phase, the edited headers, the
//! body sent on, the logs and the metrics.
//!
//! ```
//! use meridian_plugin_sdk::testing::{Exchange, Outcome};
//! use meridian_plugin_sdk::{Flow, Plugin, Request};
//!
//! struct Deny;
//! impl Plugin for Deny {
//!     type Config = ();
//!     type RequestState = ();
//!     fn configure(_: ()) -> Result<Self, String> { Ok(Deny) }
//!     fn on_request(&self, req: &mut Request, _: &mut ()) -> Flow {
//!         if req.client_country().as_deref() == Some("KP") {
//!             return Flow::deny(451, "unavailable");
//!         }
//!         req.set_header("x-checked", "1");
//!         Flow::Continue
//!     }
//! }
//!
//! let mut ex = Exchange::<Deny>::configure("").unwrap().get("/").country("KP");
//! assert_eq!(ex.send_request_headers().status(), Some(451));
//!
//! let mut ex = Exchange::<Deny>::configure("").unwrap().get("/");
//! assert_eq!(ex.send_request_headers(), Outcome::Continue);
//! assert_eq!(ex.request_header("x-checked").as_deref(), Some("1"));
//! ```
//!
//! Tests run in parallel threads; each thread has its own fake host, and
//! creating an `Exchange` resets it.

use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proxy_wasm::types::Action;

use crate::glue::{self, Http};
use crate::sys::{self, with_fake};
use crate::{LocalResponse, LogLevel, MetricKind, Plugin};

/// The result of one phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The request goes on.
    Continue,
    /// The plugin asked the host to hold (and, for bodies, buffer) the data.
    Pause,
    /// The plugin answered with a local response.
    Respond(LocalResponse),
}

impl Outcome {
    /// The status of a [`Outcome::Respond`].
    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Respond(r) => Some(r.status),
            _ => None,
        }
    }

    /// A header of a [`Outcome::Respond`].
    pub fn header(&self, name: &str) -> Option<&str> {
        match self {
            Outcome::Respond(r) => r
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }

    /// The body of a [`Outcome::Respond`], as text.
    pub fn body_text(&self) -> Option<String> {
        match self {
            Outcome::Respond(r) => Some(String::from_utf8_lossy(&r.body).into_owned()),
            _ => None,
        }
    }
}

/// One request/response through a plugin, on the fake host.
pub struct Exchange<P: Plugin> {
    http: Http<P>,
}

impl<P: Plugin> std::fmt::Debug for Exchange<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange").finish_non_exhaustive()
    }
}

fn reset() {
    with_fake(|h| *h = Default::default());
}

fn set_map(map: &mut Vec<(String, Vec<u8>)>, name: &str, value: &str) {
    map.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    map.push((name.to_owned(), value.as_bytes().to_vec()));
}

impl<P: Plugin> Exchange<P> {
    /// Reset the fake host, then configure `P` from `config` as the host
    /// would (through [`Plugin::parse_config`]), and start an exchange with a
    /// default request: `GET https://example.com/`.
    pub fn configure(config: &str) -> Result<Self, String> {
        reset();
        with_fake(|h| h.plugin_config = config.as_bytes().to_vec());
        let plugin = glue::configure::<P>(config.as_bytes())?;
        Ok(Self::start(plugin))
    }

    /// Reset the fake host and start an exchange with an already configured
    /// plugin and a default request: `GET https://example.com/`.
    pub fn new(plugin: P) -> Self {
        reset();
        Self::start(plugin)
    }

    fn start(plugin: P) -> Self {
        with_fake(|h| {
            h.request_headers = vec![
                (":method".into(), b"GET".to_vec()),
                (":scheme".into(), b"https".to_vec()),
                (":authority".into(), b"example.com".to_vec()),
                (":path".into(), b"/".to_vec()),
            ];
        });
        Self {
            http: Http::new(Rc::new(plugin)),
        }
    }

    /// Set the request method.
    #[must_use]
    pub fn method(self, method: &str) -> Self {
        with_fake(|h| set_map(&mut h.request_headers, ":method", method));
        self
    }

    /// Set the request `:path` (path and query).
    #[must_use]
    pub fn get(self, path: &str) -> Self {
        with_fake(|h| set_map(&mut h.request_headers, ":path", path));
        self
    }

    /// Set the request `:authority`.
    #[must_use]
    pub fn authority(self, authority: &str) -> Self {
        with_fake(|h| set_map(&mut h.request_headers, ":authority", authority));
        self
    }

    /// Append a request header.
    #[must_use]
    pub fn header(self, name: &str, value: &str) -> Self {
        with_fake(|h| {
            h.request_headers
                .push((name.to_owned(), value.as_bytes().to_vec()))
        });
        self
    }

    /// Set a property.
    #[must_use]
    pub fn property(self, path: &[&str], value: &[u8]) -> Self {
        with_fake(|h| {
            let path: Vec<String> = path.iter().map(|s| (*s).to_owned()).collect();
            h.properties.retain(|(p, _)| *p != path);
            h.properties.push((path, value.to_vec()));
        });
        self
    }

    /// Set the client's country (`meridian.client.country`).
    #[must_use]
    pub fn country(self, code: &str) -> Self {
        self.property(crate::CLIENT_COUNTRY_PROPERTY, code.as_bytes())
    }

    /// Set the client's address (`source.address`).
    #[must_use]
    pub fn client_address(self, addr: &str) -> Self {
        self.property(crate::SOURCE_ADDRESS_PROPERTY, addr.as_bytes())
    }

    /// Set the host's clock.
    #[must_use]
    pub fn now(self, now: SystemTime) -> Self {
        with_fake(|h| h.now = now);
        self
    }

    /// Set the host's clock to `secs` after the Unix epoch.
    #[must_use]
    pub fn now_unix(self, secs: u64) -> Self {
        self.now(UNIX_EPOCH + Duration::from_secs(secs))
    }

    fn outcome(action: Action) -> Outcome {
        if let Some(r) = with_fake(|h| h.local_response.take()) {
            return Outcome::Respond(r);
        }
        match action {
            Action::Pause => Outcome::Pause,
            _ => Outcome::Continue,
        }
    }

    /// Run the request-headers phase (`end_of_stream` = true: no body).
    pub fn send_request_headers(&mut self) -> Outcome {
        Self::outcome(self.http.request_headers(true))
    }

    /// Run the request-headers phase for a request with a body.
    pub fn send_request_headers_with_body(&mut self) -> Outcome {
        Self::outcome(self.http.request_headers(false))
    }

    /// Run the request body through the plugin in `chunks`, buffering as a
    /// proxy-wasm host does (a paused chunk stays in the buffer and the next
    /// call sees everything buffered so far). Returns the outcome of the
    /// last chunk and the bytes that went on to the origin.
    pub fn send_request_body<C: AsRef<[u8]>>(&mut self, chunks: &[C]) -> (Outcome, Vec<u8>) {
        self.send_body(false, chunks)
    }

    /// Run the response-headers phase with `status` and `headers` (the
    /// response has a body: `end_of_stream` = false).
    pub fn send_response_headers(&mut self, status: u16, headers: &[(&str, &str)]) -> Outcome {
        self.set_response(status, headers);
        Self::outcome(self.http.response_headers(false))
    }

    /// Run the response-headers phase for a response without a body.
    pub fn send_response_headers_only(&mut self, status: u16, headers: &[(&str, &str)]) -> Outcome {
        self.set_response(status, headers);
        Self::outcome(self.http.response_headers(true))
    }

    fn set_response(&mut self, status: u16, headers: &[(&str, &str)]) {
        with_fake(|h| {
            h.response_headers = std::iter::once((":status".to_owned(), status.to_string()))
                .chain(
                    headers
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
                )
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
        });
    }

    /// As [`Exchange::send_request_body`], for the response body: returns
    /// the outcome of the last chunk and the bytes sent to the client.
    pub fn send_response_body<C: AsRef<[u8]>>(&mut self, chunks: &[C]) -> (Outcome, Vec<u8>) {
        self.send_body(true, chunks)
    }

    fn send_body<C: AsRef<[u8]>>(&mut self, response: bool, chunks: &[C]) -> (Outcome, Vec<u8>) {
        let mut sent = Vec::new();
        let mut buffered: Vec<u8> = Vec::new();
        let mut last = Outcome::Continue;
        for (i, chunk) in chunks.iter().enumerate() {
            let eos = i + 1 == chunks.len();
            buffered.extend_from_slice(chunk.as_ref());
            let size = buffered.len();
            with_fake(|h| {
                let b = if response {
                    &mut h.response_body
                } else {
                    &mut h.request_body
                };
                *b = std::mem::take(&mut buffered);
            });
            let action = if response {
                self.http.response_body(size, eos)
            } else {
                self.http.request_body(size, eos)
            };
            last = Self::outcome(action);
            let data = with_fake(|h| {
                std::mem::take(if response {
                    &mut h.response_body
                } else {
                    &mut h.request_body
                })
            });
            match last {
                Outcome::Pause => buffered = data,
                Outcome::Continue => sent.extend_from_slice(&data),
                Outcome::Respond(_) => break,
            }
        }
        (last, sent)
    }

    /// Call the response-body phase once, as the host would, with the
    /// fake host's response body already set by the test: `size` bytes are
    /// buffered, `end_of_stream` says whether more follow.
    #[doc(hidden)]
    pub fn http_response_body(&mut self, size: usize, end_of_stream: bool) -> Outcome {
        Self::outcome(self.http.response_body(size, end_of_stream))
    }

    /// End the request (`proxy_on_done`).
    pub fn done(&mut self) {
        self.http.done();
    }

    /// The request headers as the origin would get them.
    pub fn request_headers(&self) -> Vec<(String, String)> {
        sys::headers(sys::Map::RequestHeaders)
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect()
    }

    /// A request header as the origin would get it.
    pub fn request_header(&self, name: &str) -> Option<String> {
        sys::header(sys::Map::RequestHeaders, name)
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// Every value of a request header.
    pub fn request_header_values(&self, name: &str) -> Vec<String> {
        self.request_headers()
            .into_iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect()
    }

    /// The response headers as the client would get them.
    pub fn response_headers(&self) -> Vec<(String, String)> {
        sys::headers(sys::Map::ResponseHeaders)
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect()
    }

    /// A response header as the client would get it.
    pub fn response_header(&self, name: &str) -> Option<String> {
        sys::header(sys::Map::ResponseHeaders, name)
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// Every value of a response header.
    pub fn response_header_values(&self, name: &str) -> Vec<String> {
        self.response_headers()
            .into_iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect()
    }

    /// The messages the plugin logged so far.
    pub fn logs(&self) -> Vec<(LogLevel, String)> {
        with_fake(|h| h.logs.clone())
    }

    /// The metrics the plugin defined, with their values.
    pub fn metrics(&self) -> Vec<(String, MetricKind, i64)> {
        with_fake(|h| h.metrics.clone())
    }

    /// The value of metric `name`.
    pub fn metric(&self, name: &str) -> Option<i64> {
        with_fake(|h| h.metrics.iter().find(|m| m.0 == name).map(|m| m.2))
    }

    /// The plugin.
    pub fn plugin(&self) -> &P {
        &self.http.plugin
    }

    /// The request state.
    pub fn state(&self) -> &P::RequestState {
        &self.http.state
    }
}

/// Configure `P` from `config` through [`Plugin::parse_config`] and
/// [`Plugin::configure`], as the host would.
pub fn configure<P: Plugin>(config: &str) -> Result<P, String> {
    glue::configure::<P>(config.as_bytes())
}
