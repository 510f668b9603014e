//! `headers`: a Meridian plugin that edits request headers (before the
//! origin) and response headers (before the client).
//!
//! For each direction the operations run in this order:
//!
//! 1. `rename`: `{"old": "new"}` moves every value of `old` to `new`,
//!    replacing any `new` already there (no effect if `old` is absent);
//! 2. `remove`: `["name", ...]` removes every value;
//! 3. `set`: `{"name": "value"}` replaces all values with one;
//! 4. `add`: `{"name": "value"}` appends a value (keeps existing ones).
//!
//! Names are case-insensitive; within `set`/`add`/`rename`, entries apply in
//! alphabetical order of their names. Pseudo-headers (`:path`...) cannot be
//! touched, and values may not contain control characters (checked when the
//! configuration is loaded).

use std::collections::BTreeMap;

use meridian_plugin_sdk::{Flow, Plugin, Request, Response};
use serde::Deserialize;

/// The plugin configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Edits of the request headers.
    pub request: Ops,
    /// Edits of the response headers.
    pub response: Ops,
}

/// Edits of one header map.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ops {
    /// Append these values.
    pub add: BTreeMap<String, String>,
    /// Replace with these values.
    pub set: BTreeMap<String, String>,
    /// Remove these headers.
    pub remove: Vec<String>,
    /// Rename headers: old name → new name.
    pub rename: BTreeMap<String, String>,
}

/// A header map the operations work on: the request or the response.
pub trait HeaderMap {
    /// Every value of `name`.
    fn values(&self, name: &str) -> Vec<String>;
    /// Replace all values of `name`.
    fn set(&mut self, name: &str, value: &str);
    /// Append a value.
    fn add(&mut self, name: &str, value: &str);
    /// Remove all values.
    fn remove(&mut self, name: &str);
}

impl HeaderMap for Request {
    fn values(&self, name: &str) -> Vec<String> {
        self.header_values(name)
    }
    fn set(&mut self, name: &str, value: &str) {
        self.set_header(name, value);
    }
    fn add(&mut self, name: &str, value: &str) {
        self.add_header(name, value);
    }
    fn remove(&mut self, name: &str) {
        self.remove_header(name);
    }
}

impl HeaderMap for Response {
    fn values(&self, name: &str) -> Vec<String> {
        self.header_values(name)
    }
    fn set(&mut self, name: &str, value: &str) {
        self.set_header(name, value);
    }
    fn add(&mut self, name: &str, value: &str) {
        self.add_header(name, value);
    }
    fn remove(&mut self, name: &str) {
        self.remove_header(name);
    }
}

fn check_name(name: &str) -> Result<(), String> {
    const SPECIAL: &[u8] = b"!#$%&'*+-.^_`|~";
    if name.starts_with(':') {
        return Err(format!("{name:?}: pseudo-headers cannot be edited"));
    }
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || SPECIAL.contains(&b))
    {
        return Err(format!("{name:?} is not a valid header name"));
    }
    Ok(())
}

fn check_value(name: &str, value: &str) -> Result<(), String> {
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(format!("the value of {name:?} contains control characters"));
    }
    Ok(())
}

impl Ops {
    /// Validate names and values.
    pub fn validate(&self, which: &str) -> Result<(), String> {
        let ctx = |e: String| format!("{which}: {e}");
        for (k, v) in self.add.iter().chain(&self.set) {
            check_name(k).map_err(ctx)?;
            check_value(k, v).map_err(ctx)?;
        }
        for k in &self.remove {
            check_name(k).map_err(ctx)?;
        }
        for (old, new) in &self.rename {
            check_name(old).map_err(ctx)?;
            check_name(new).map_err(ctx)?;
        }
        Ok(())
    }

    /// `true` if there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty()
            && self.set.is_empty()
            && self.remove.is_empty()
            && self.rename.is_empty()
    }

    /// Apply the operations to `map`.
    pub fn apply(&self, map: &mut impl HeaderMap) {
        for (old, new) in &self.rename {
            if old.eq_ignore_ascii_case(new) {
                continue;
            }
            let values = map.values(old);
            if values.is_empty() {
                continue;
            }
            map.remove(old);
            map.remove(new);
            for v in &values {
                map.add(new, v);
            }
        }
        for name in &self.remove {
            map.remove(name);
        }
        for (name, value) in &self.set {
            map.set(name, value);
        }
        for (name, value) in &self.add {
            map.add(name, value);
        }
    }
}

/// The plugin.
#[derive(Debug)]
pub struct Headers {
    config: Config,
}

impl Plugin for Headers {
    type Config = Config;
    type RequestState = ();

    fn configure(config: Config) -> Result<Self, String> {
        config.request.validate("request")?;
        config.response.validate("response")?;
        if config.request.is_empty() && config.response.is_empty() {
            meridian_plugin_sdk::warn!("headers: the configuration has no operations");
        }
        Ok(Self { config })
    }

    fn on_request(&self, req: &mut Request, _: &mut ()) -> Flow {
        self.config.request.apply(req);
        Flow::Continue
    }

    fn on_response(&self, resp: &mut Response, _: &mut ()) -> Flow {
        self.config.response.apply(resp);
        Flow::Continue
    }
}

meridian_plugin_sdk::register!(Headers);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use meridian_plugin_sdk::testing::{Exchange, Outcome};

    /// A plain map, to test `apply` on its own.
    #[derive(Default)]
    struct Map(Vec<(String, String)>);

    impl HeaderMap for Map {
        fn values(&self, name: &str) -> Vec<String> {
            self.0
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
                .collect()
        }
        fn set(&mut self, name: &str, value: &str) {
            self.remove(name);
            self.add(name, value);
        }
        fn add(&mut self, name: &str, value: &str) {
            self.0.push((name.into(), value.into()));
        }
        fn remove(&mut self, name: &str) {
            self.0.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        }
    }

    fn ops(json: &str) -> Ops {
        meridian_plugin_sdk::config::from_json(json.as_bytes()).unwrap()
    }

    #[test]
    fn order_of_operations() {
        let o = ops(
            r#"{"rename":{"x-old":"x-new"},"remove":["x-new-gone","Server"],
                "set":{"x-set":"one"},"add":{"x-add":"b"}}"#,
        );
        let mut m = Map(vec![
            ("X-Old".into(), "1".into()),
            ("x-old".into(), "2".into()),
            ("x-new".into(), "stale".into()),
            ("server".into(), "origin".into()),
            ("x-set".into(), "a".into()),
            ("x-set".into(), "b".into()),
            ("x-add".into(), "a".into()),
        ]);
        o.apply(&mut m);
        assert_eq!(m.values("x-old"), Vec::<String>::new());
        assert_eq!(m.values("x-new"), ["1", "2"]);
        assert!(m.values("server").is_empty());
        assert_eq!(m.values("x-set"), ["one"]);
        assert_eq!(m.values("x-add"), ["a", "b"]);
    }

    #[test]
    fn rename_of_absent_header_keeps_target() {
        let o = ops(r#"{"rename":{"a":"b"}}"#);
        let mut m = Map(vec![("b".into(), "keep".into())]);
        o.apply(&mut m);
        assert_eq!(m.values("b"), ["keep"]);
    }

    #[test]
    fn issue_example_through_the_plugin() {
        let mut ex = Exchange::<Headers>::configure(
            r#"{"response":{"add":{"Strict-Transport-Security":"max-age=63072000"},"remove":["Server"]}}"#,
        )
        .unwrap();
        assert_eq!(ex.send_request_headers(), Outcome::Continue);
        ex.send_response_headers(200, &[("server", "nginx"), ("content-length", "5")]);
        assert_eq!(ex.response_header("server"), None);
        assert_eq!(
            ex.response_header("strict-transport-security").as_deref(),
            Some("max-age=63072000")
        );
        // No body hook: Content-Length stays.
        assert_eq!(ex.response_header("content-length").as_deref(), Some("5"));
    }

    #[test]
    fn request_side() {
        let mut ex = Exchange::<Headers>::configure(
            r#"{"request":{"set":{"x-edge":"meridian"},"remove":["cookie"],"rename":{"x-api-key":"x-origin-key"}}}"#,
        )
        .unwrap()
        .header("cookie", "a=b")
        .header("x-api-key", "k");
        ex.send_request_headers();
        assert_eq!(ex.request_header("x-edge").as_deref(), Some("meridian"));
        assert_eq!(ex.request_header("cookie"), None);
        assert_eq!(ex.request_header("x-api-key"), None);
        assert_eq!(ex.request_header("x-origin-key").as_deref(), Some("k"));
    }

    #[test]
    fn config_validation() {
        let cfg = |c: &str| Exchange::<Headers>::configure(c).map(|_| ());
        assert!(cfg("").is_ok());
        assert!(
            cfg(r#"{"request":{"set":{":path":"/x"}}}"#)
                .unwrap_err()
                .contains("pseudo")
        );
        assert!(
            cfg(r#"{"response":{"add":{"bad name":"x"}}}"#)
                .unwrap_err()
                .contains("not a valid header name")
        );
        assert!(
            cfg(r#"{"response":{"add":{"x":"a\r\nb: c"}}}"#)
                .unwrap_err()
                .contains("control")
        );
        assert!(
            cfg(r#"{"response":{"append":{"x":"y"}}}"#)
                .unwrap_err()
                .contains("unknown field")
        );
        assert!(
            cfg(r#"{"reponse":{}}"#)
                .unwrap_err()
                .contains("unknown field")
        );
    }
}
