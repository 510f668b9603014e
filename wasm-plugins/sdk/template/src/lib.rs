//! A Meridian plugin: TODO say what it does.
//!
//! Configuration (JSON; a TOML table in the edge config):
//! `{"header": "x-hello", "value": "world", "deny_path_prefix": "/admin"}`.

use meridian_plugin_sdk::{Counter, Flow, Plugin, Request, Response};
use serde::Deserialize;

/// The configuration. `deny_unknown_fields` turns typos into load errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Response header to add.
    #[serde(default = "default_header")]
    pub header: String,
    /// Its value.
    pub value: String,
    /// Requests whose path starts with this are refused with 403.
    #[serde(default)]
    pub deny_path_prefix: Option<String>,
}

fn default_header() -> String {
    "x-hello".into()
}

/// The plugin, built once per instance from the configuration.
pub struct MyPlugin {
    config: Config,
    denied: Counter,
}

/// Per-request state: carried from `on_request` to `on_response`.
#[derive(Default)]
pub struct State {
    path: String,
}

impl Plugin for MyPlugin {
    type Config = Config;
    type RequestState = State;

    fn configure(config: Config) -> Result<Self, String> {
        if config.header.is_empty() {
            return Err("header must not be empty".into());
        }
        Ok(Self {
            config,
            denied: Counter::define("my_plugin_denied"),
        })
    }

    fn on_request(&self, req: &mut Request, state: &mut State) -> Flow {
        state.path = req.path();
        if let Some(prefix) = &self.config.deny_path_prefix
            && state.path.starts_with(prefix.as_str())
        {
            self.denied.increment();
            return Flow::deny(403, "forbidden");
        }
        Flow::Continue
    }

    fn on_response(&self, resp: &mut Response, state: &mut State) -> Flow {
        resp.set_header(&self.config.header, &self.config.value);
        meridian_plugin_sdk::debug!("{} -> {}", state.path, resp.status());
        Flow::Continue
    }
}

meridian_plugin_sdk::register!(MyPlugin);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use meridian_plugin_sdk::testing::{Exchange, Outcome};

    const CONFIG: &str = r#"{"value": "world", "deny_path_prefix": "/admin"}"#;

    #[test]
    fn adds_the_header() {
        let mut ex = Exchange::<MyPlugin>::configure(CONFIG)
            .unwrap()
            .get("/index.html");
        assert_eq!(ex.send_request_headers(), Outcome::Continue);
        ex.send_response_headers(200, &[]);
        assert_eq!(ex.response_header("x-hello").as_deref(), Some("world"));
    }

    #[test]
    fn denies_the_prefix() {
        let mut ex = Exchange::<MyPlugin>::configure(CONFIG)
            .unwrap()
            .get("/admin/x");
        assert_eq!(ex.send_request_headers().status(), Some(403));
        assert_eq!(ex.metric("my_plugin_denied"), Some(1));
    }

    #[test]
    fn config_needs_a_value() {
        assert!(Exchange::<MyPlugin>::configure("").is_err());
    }
}
