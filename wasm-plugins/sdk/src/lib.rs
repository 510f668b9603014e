//! `meridian-plugin-sdk`: write plugins for the Meridian edge in Rust.
//!
//! A plugin is a WebAssembly module that speaks the [proxy-wasm ABI 0.2.1],
//! so it also runs in Envoy and other proxy-wasm hosts. This crate is a thin
//! layer over the upstream [`proxy_wasm`] crate that takes care of the
//! boilerplate: configuration parsing, context bookkeeping, body buffering,
//! local responses. You implement one trait, [`Plugin`], and register it
//! with one macro, [`register!`].
//!
//! ```
//! use meridian_plugin_sdk::{Flow, Plugin, Request, Response};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize, Default)]
//! struct Config {
//!     #[serde(default)]
//!     banner: String,
//! }
//!
//! struct Hello {
//!     banner: String,
//! }
//!
//! impl Plugin for Hello {
//!     type Config = Config;
//!     type RequestState = ();
//!
//!     fn configure(config: Config) -> Result<Self, String> {
//!         Ok(Hello { banner: config.banner })
//!     }
//!
//!     fn on_request(&self, req: &mut Request, _: &mut ()) -> Flow {
//!         if req.path().starts_with("/private") {
//!             return Flow::deny(403, "private");
//!         }
//!         Flow::Continue
//!     }
//!
//!     fn on_response(&self, resp: &mut Response, _: &mut ()) -> Flow {
//!         resp.set_header("x-banner", &self.banner);
//!         Flow::Continue
//!     }
//! }
//!
//! meridian_plugin_sdk::register!(Hello);
//! ```
//!
//! # Lifecycle
//!
//! * The host loads the module and calls [`Plugin::parse_config`] and
//!   [`Plugin::configure`] with the plugin's configuration (JSON, see
//!   [`config::from_json`]). An `Err` rejects the configuration and the load
//!   fails. Each wasm instance of the plugin is configured on its own.
//! * Per request, a fresh [`Plugin::RequestState`] is created with `Default`
//!   and passed to every hook of that request.
//! * [`Plugin::on_request`] sees the request headers, [`Plugin::on_response`]
//!   the response headers. Either may answer the client with a [`Flow::Respond`].
//! * Body hooks are opt-in ([`Plugin::WANTS_REQUEST_BODY`],
//!   [`Plugin::WANTS_RESPONSE_BODY`]): the SDK asks the host to buffer the
//!   body, removes `Content-Length` in the headers phase (the body may change
//!   size), and calls the hook once with the complete body.
//! * [`Plugin::on_done`] runs when the request is over.
//!
//! Request headers are only available in the request phase and response
//! headers in the response phase: carry what you need in the request state.
//!
//! # Testing
//!
//! On native targets the host calls go to an in-memory fake host, so
//! plugins can be unit tested with `cargo test`: see [`testing`].
//!
//! [proxy-wasm ABI 0.2.1]: https://github.com/proxy-wasm/spec/tree/main/abi-versions/v0.2.1

pub mod config;
mod glue;
mod http;
pub mod log;
pub mod metrics;
mod sys;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

pub use http::{Body, Request, Response};
pub use metrics::{Counter, Gauge, Histogram};

/// The upstream proxy-wasm crate, for what the SDK does not cover.
pub use proxy_wasm;

/// Property path of the client's country, as Meridian provides it: the ISO
/// 3166-1 alpha-2 code (e.g. `DE`) as bytes; absent when unknown.
pub const CLIENT_COUNTRY_PROPERTY: &[&str] = &["meridian", "client", "country"];

/// Property path of the client's address, `ip:port`.
pub const SOURCE_ADDRESS_PROPERTY: &[&str] = &["source", "address"];

/// What a plugin does with its hooks: implement this, then [`register!`] it.
///
/// Every hook has a default that lets the request through unchanged.
pub trait Plugin: Sized + 'static {
    /// The configuration, deserialised from the JSON the host passes (see
    /// [`Plugin::parse_config`]).
    type Config: serde::de::DeserializeOwned;

    /// Per-request state: created with `Default` when a request starts and
    /// passed to every hook of that request. Use `()` if you need none.
    type RequestState: Default + 'static;

    /// Call [`Plugin::on_request_body`] with the whole request body.
    const WANTS_REQUEST_BODY: bool = false;

    /// Call [`Plugin::on_response_body`] with the whole response body. When
    /// `false` (the default) body chunks stream through untouched.
    const WANTS_RESPONSE_BODY: bool = false;

    /// Turn the raw configuration bytes into [`Plugin::Config`]. The default
    /// is [`config::from_json`]; override it for another format.
    fn parse_config(raw: &[u8]) -> Result<Self::Config, String> {
        config::from_json(raw)
    }

    /// Build the plugin from its configuration. An `Err` rejects the
    /// configuration: the message is logged and the host refuses the plugin.
    fn configure(config: Self::Config) -> Result<Self, String>;

    /// The request headers arrived. Read and edit them through `req`.
    fn on_request(&self, req: &mut Request, state: &mut Self::RequestState) -> Flow {
        let _ = (req, state);
        Flow::Continue
    }

    /// The whole request body (only with [`Plugin::WANTS_REQUEST_BODY`], and
    /// unless [`Request::skip_body`] was called).
    fn on_request_body(&self, body: &mut Body, state: &mut Self::RequestState) -> Flow {
        let _ = (body, state);
        Flow::Continue
    }

    /// The response headers arrived. Read and edit them through `resp`.
    fn on_response(&self, resp: &mut Response, state: &mut Self::RequestState) -> Flow {
        let _ = (resp, state);
        Flow::Continue
    }

    /// The whole response body (only with [`Plugin::WANTS_RESPONSE_BODY`],
    /// and unless [`Response::skip_body`] was called). The response headers
    /// have already gone on by then, so a [`Flow::Respond`] here can only be
    /// honoured by hosts that still hold them; prefer editing the body.
    fn on_response_body(&self, body: &mut Body, state: &mut Self::RequestState) -> Flow {
        let _ = (body, state);
        Flow::Continue
    }

    /// The largest body the SDK buffers for the body hooks. A larger body is
    /// passed through unmodified (and the hook is not called) with a warning.
    /// The default, 1 MiB, is Meridian's default `body_buffer`: keep this at
    /// or below the site's `body_buffer`, or the edge fails the plugin (by its
    /// failure policy) before the SDK gives up buffering.
    fn max_body_bytes(&self) -> usize {
        1 << 20
    }

    /// The request is over (`proxy_on_done`).
    fn on_done(&self, state: &mut Self::RequestState) {
        let _ = state;
    }
}

/// What happens to the request after a hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flow {
    /// Go on to the next phase (or plugin, or the origin).
    Continue,
    /// Answer the client with this response; the request goes no further.
    Respond(LocalResponse),
}

/// A response generated by the plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    /// HTTP status code.
    pub status: u16,
    /// Response headers (no pseudo-headers).
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: Vec<u8>,
}

impl Flow {
    /// Answer with `status`, `headers` and `body`.
    pub fn respond<K, V>(
        status: u16,
        headers: impl IntoIterator<Item = (K, V)>,
        body: impl Into<Vec<u8>>,
    ) -> Flow
    where
        K: Into<String>,
        V: Into<String>,
    {
        Flow::Respond(LocalResponse {
            status,
            headers: headers
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            body: body.into(),
        })
    }

    /// Refuse the request: `status` with `message` (plus a newline) as a
    /// `text/plain` body.
    pub fn deny(status: u16, message: &str) -> Flow {
        let mut body = message.as_bytes().to_vec();
        if !body.ends_with(b"\n") {
            body.push(b'\n');
        }
        Flow::respond(
            status,
            [("content-type", "text/plain; charset=utf-8")],
            body,
        )
    }

    /// Redirect to `location` with `status` (301, 302, 303, 307 or 308).
    pub fn redirect(status: u16, location: &str) -> Flow {
        Flow::respond(
            status,
            [
                ("location", location),
                ("content-type", "text/plain; charset=utf-8"),
            ],
            format!("redirecting to {location}\n"),
        )
    }

    /// Add a header to a [`Flow::Respond`] (no effect on [`Flow::Continue`]).
    #[must_use]
    pub fn with_header(mut self, name: &str, value: &str) -> Flow {
        if let Flow::Respond(r) = &mut self {
            r.headers.push((name.to_owned(), value.to_owned()));
        }
        self
    }

    /// `true` for [`Flow::Continue`].
    pub fn is_continue(&self) -> bool {
        matches!(self, Flow::Continue)
    }
}

/// Log levels, as in proxy-wasm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Very detailed.
    Trace,
    /// Debugging.
    Debug,
    /// Normal operation.
    Info,
    /// Something looks wrong.
    Warn,
    /// Something failed.
    Error,
    /// Something failed badly.
    Critical,
}

/// Kinds of metric the host keeps (see [`metrics`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Distribution of recorded values.
    Histogram,
}

/// Current time, from the host (`proxy_get_current_time_nanoseconds`).
pub fn now() -> std::time::SystemTime {
    sys::now()
}

/// Current time as Unix seconds (see [`now`]).
pub fn now_unix() -> u64 {
    now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Read a property (`proxy_get_property`), e.g. `&["source", "address"]`.
/// `None` when the host does not know it.
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    sys::property(path)
}

/// Register `$plugin` (a type implementing [`Plugin`]) as the module's
/// plugin. Use it once, at the crate root of a `cdylib`.
///
/// On `wasm32` this expands to [`proxy_wasm::main!`] with the SDK's root and
/// HTTP contexts; on other targets it only checks that the type is a
/// [`Plugin`], so the crate still builds for native unit tests.
#[macro_export]
macro_rules! register {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        #[doc(hidden)]
        mod __meridian_plugin_entry {
            #[allow(unused_imports)]
            use super::*;
            $crate::proxy_wasm::main! {{
                $crate::__private::start::<$plugin>();
            }}
        }

        const _: () = {
            fn assert_plugin<P: $crate::Plugin>() {}
            let _ = assert_plugin::<$plugin>;
        };
    };
}

#[doc(hidden)]
pub mod __private {
    pub use crate::glue::start;
}
