//! `rewrite`: a Meridian plugin that replaces strings (or regex matches) in
//! response bodies, e.g. to turn origin host names into public ones.
//!
//! A response is rewritten only if
//!
//! * its media type starts with one of `content_types` (default `["text/"]`,
//!   case-insensitive: add `"application/javascript"`, `"application/json"`
//!   ... as needed);
//! * it is not encoded (`Content-Encoding` absent or `identity`: compressed
//!   bytes cannot be rewritten; such responses are logged and passed on);
//! * it has a body (not a `HEAD` request, nor status 1xx, 204, 206 or 304);
//! * its body is at most `max_body_bytes` (default 1 MiB): a declared
//!   `Content-Length` over the limit is passed on untouched from the start,
//!   an undeclared one when the buffer outgrows the limit.
//!
//! For those responses (and only those) `Content-Length` is removed, the
//! body is buffered, every rule is applied in order, and a strong `ETag`
//! becomes weak (`W/"..."`): the bytes differ from the origin's.
//!
//! Rules: `{"find": "...", "replace": "..."}` replaces every occurrence of a
//! literal string (works on any bytes); `{"regex": "...", "replace": "..."}`
//! replaces every match of a [regex-lite] pattern, with `$1`/`${name}`
//! expanded in `replace` (`$$` for a literal `$`), on UTF-8 bodies only.
//!
//! [regex-lite]: https://docs.rs/regex-lite

use meridian_plugin_sdk::{Body, Counter, Flow, Plugin, Request, Response};
use serde::Deserialize;

/// The plugin configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The rules, applied in order.
    pub rules: Vec<RuleConfig>,
    /// Media-type prefixes to rewrite.
    #[serde(default = "default_content_types")]
    pub content_types: Vec<String>,
    /// The largest body rewritten.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
}

fn default_content_types() -> Vec<String> {
    vec!["text/".into()]
}

fn default_max_body() -> usize {
    1 << 20
}

/// One rule as configured: `find` or `regex`, and `replace`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// A literal string to find.
    #[serde(default)]
    pub find: Option<String>,
    /// A regex to match.
    #[serde(default)]
    pub regex: Option<String>,
    /// The replacement.
    pub replace: String,
}

/// A compiled rule.
#[derive(Debug)]
pub enum Rule {
    /// Literal replacement.
    Literal {
        /// Searched bytes.
        find: Vec<u8>,
        /// Replacement bytes.
        replace: Vec<u8>,
    },
    /// Regex replacement.
    Regex {
        /// The pattern.
        regex: regex_lite::Regex,
        /// The replacement, with `$` expansion.
        replace: String,
    },
}

/// Replace every non-overlapping occurrence of `find` (non-empty) in `hay`.
/// `None` if there is none.
pub fn replace_bytes(hay: &[u8], find: &[u8], replace: &[u8]) -> Option<Vec<u8>> {
    let first = hay.windows(find.len()).position(|w| w == find)?;
    let mut out = Vec::with_capacity(hay.len());
    out.extend_from_slice(&hay[..first]);
    out.extend_from_slice(replace);
    let mut i = first + find.len();
    while i < hay.len() {
        if hay[i..].starts_with(find) {
            out.extend_from_slice(replace);
            i += find.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Apply `rules` in order to `body`. `None` if nothing changed.
/// `skipped_regex` is set when regex rules were skipped (body not UTF-8).
pub fn apply_rules(rules: &[Rule], body: &[u8], skipped_regex: &mut bool) -> Option<Vec<u8>> {
    let mut current: Option<Vec<u8>> = None;
    for rule in rules {
        let input = current.as_deref().unwrap_or(body);
        let next = match rule {
            Rule::Literal { find, replace } => replace_bytes(input, find, replace),
            Rule::Regex { regex, replace } => match std::str::from_utf8(input) {
                Ok(text) => match regex.replace_all(text, replace.as_str()) {
                    std::borrow::Cow::Borrowed(_) => None,
                    std::borrow::Cow::Owned(s) => Some(s.into_bytes()),
                },
                Err(_) => {
                    *skipped_regex = true;
                    None
                }
            },
        };
        if next.is_some() {
            current = next;
        }
    }
    current
}

/// Per request: whether the response body is rewritten.
#[derive(Debug, Default)]
pub struct State {
    head: bool,
}

/// The plugin.
#[derive(Debug)]
pub struct Rewrite {
    rules: Vec<Rule>,
    content_types: Vec<String>,
    max_body: usize,
    rewritten: Counter,
}

impl Rewrite {
    /// Why the response with these properties is not rewritten, or `None`
    /// if it is.
    pub fn skip_reason(
        &self,
        head: bool,
        status: u16,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        content_length: Option<u64>,
    ) -> Option<String> {
        if head || status < 200 || matches!(status, 204 | 206 | 304) {
            return Some(format!("no body to rewrite (status {status})"));
        }
        let ct = content_type.unwrap_or("");
        if !self
            .content_types
            .iter()
            .any(|p| ct.starts_with(p.as_str()))
        {
            return Some(format!("content type {ct:?} not selected"));
        }
        if let Some(enc) = content_encoding.map(str::trim)
            && !enc.is_empty()
            && !enc.eq_ignore_ascii_case("identity")
        {
            return Some(format!(
                "content-encoding {enc:?}: cannot rewrite encoded bodies"
            ));
        }
        if let Some(len) = content_length
            && len > self.max_body as u64
        {
            return Some(format!("body of {len} bytes over max_body_bytes"));
        }
        None
    }
}

impl Plugin for Rewrite {
    type Config = Config;
    type RequestState = State;
    const WANTS_RESPONSE_BODY: bool = true;

    fn configure(config: Config) -> Result<Self, String> {
        if config.rules.is_empty() {
            return Err("rules must not be empty".into());
        }
        let mut rules = Vec::new();
        for (i, r) in config.rules.into_iter().enumerate() {
            rules.push(match (r.find, r.regex) {
                (Some(find), None) if !find.is_empty() => Rule::Literal {
                    find: find.into_bytes(),
                    replace: r.replace.into_bytes(),
                },
                (None, Some(re)) if !re.is_empty() => Rule::Regex {
                    regex: regex_lite::Regex::new(&re)
                        .map_err(|e| format!("rules[{i}]: invalid regex: {e}"))?,
                    replace: r.replace,
                },
                _ => {
                    return Err(format!(
                        "rules[{i}]: give exactly one of a non-empty \"find\" or \"regex\""
                    ));
                }
            });
        }
        if config.content_types.is_empty() {
            return Err("content_types must not be empty".into());
        }
        Ok(Self {
            rules,
            content_types: config
                .content_types
                .into_iter()
                .map(|c| c.trim().to_ascii_lowercase())
                .collect(),
            max_body: config.max_body_bytes,
            rewritten: Counter::define("rewrite_bodies_rewritten"),
        })
    }

    fn on_request(&self, req: &mut Request, state: &mut State) -> Flow {
        state.head = req.method().eq_ignore_ascii_case("HEAD");
        Flow::Continue
    }

    fn on_response(&self, resp: &mut Response, state: &mut State) -> Flow {
        let reason = self.skip_reason(
            state.head,
            resp.status(),
            resp.content_type().as_deref(),
            resp.header("content-encoding").as_deref(),
            resp.content_length(),
        );
        if let Some(reason) = reason {
            if reason.starts_with("content-encoding") {
                meridian_plugin_sdk::info!("rewrite: skipped: {reason}");
            } else {
                meridian_plugin_sdk::debug!("rewrite: skipped: {reason}");
            }
            resp.skip_body();
            return Flow::Continue;
        }
        if let Some(etag) = resp.header("etag")
            && !etag.starts_with("W/")
        {
            resp.set_header("etag", &format!("W/{etag}"));
        }
        Flow::Continue
    }

    fn on_response_body(&self, body: &mut Body, _: &mut State) -> Flow {
        let mut skipped_regex = false;
        if let Some(new) = apply_rules(&self.rules, body.bytes(), &mut skipped_regex) {
            body.replace(new);
            self.rewritten.increment();
        }
        if skipped_regex {
            meridian_plugin_sdk::info!("rewrite: body is not UTF-8, regex rules skipped");
        }
        Flow::Continue
    }

    fn max_body_bytes(&self) -> usize {
        self.max_body
    }
}

meridian_plugin_sdk::register!(Rewrite);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use meridian_plugin_sdk::testing::{Exchange, Outcome};

    const ISSUE: &str = r#"{"rules":[{"find":"origin.internal","replace":"www.example.com"},{"regex":"https?://origin\\.[a-z]+","replace":"https://cdn.example.com"}],"max_body_bytes":1048576}"#;

    fn plugin(config: &str) -> Rewrite {
        meridian_plugin_sdk::testing::configure::<Rewrite>(config).unwrap()
    }

    #[test]
    fn literal_replacement() {
        assert_eq!(replace_bytes(b"aXbXX", b"X", b"yy").unwrap(), b"ayybyyyy");
        assert_eq!(replace_bytes(b"aaaa", b"aa", b"b").unwrap(), b"bb");
        assert_eq!(replace_bytes(b"abc", b"x", b"y"), None);
        assert_eq!(replace_bytes(b"ab", b"abc", b"y"), None);
        assert_eq!(
            replace_bytes(b"\xff\xfeab", b"ab", b"c").unwrap(),
            b"\xff\xfec"
        );
    }

    #[test]
    fn rules_apply_in_order() {
        let p = plugin(ISSUE);
        let mut skipped = false;
        let out = apply_rules(
            &p.rules,
            b"<a href=\"http://origin.internal/x\">http://origin.test</a>",
            &mut skipped,
        )
        .unwrap();
        // Rule 1 turns origin.internal into www.example.com first, so rule 2
        // only sees origin.test.
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "<a href=\"http://www.example.com/x\">https://cdn.example.com</a>"
        );
        assert!(!skipped);
        assert_eq!(apply_rules(&p.rules, b"nothing here", &mut skipped), None);
    }

    #[test]
    fn regex_captures_and_non_utf8() {
        let p = plugin(
            r#"{"rules":[{"regex":"(\\w+)@example\\.com","replace":"$1 at example dot com"}]}"#,
        );
        let mut skipped = false;
        let out = apply_rules(&p.rules, b"mail bob@example.com", &mut skipped).unwrap();
        assert_eq!(out, b"mail bob at example dot com");
        assert_eq!(
            apply_rules(&p.rules, b"\xff bob@example.com", &mut skipped),
            None
        );
        assert!(skipped);
    }

    #[test]
    fn selection() {
        let p = plugin(ISSUE);
        assert_eq!(
            p.skip_reason(false, 200, Some("text/html"), None, Some(10)),
            None
        );
        assert_eq!(
            p.skip_reason(false, 404, Some("text/plain"), Some("identity"), None),
            None
        );
        assert!(
            p.skip_reason(true, 200, Some("text/html"), None, None)
                .is_some()
        );
        assert!(
            p.skip_reason(false, 304, Some("text/html"), None, None)
                .is_some()
        );
        assert!(
            p.skip_reason(false, 206, Some("text/html"), None, None)
                .is_some()
        );
        assert!(
            p.skip_reason(false, 200, Some("application/json"), None, None)
                .is_some()
        );
        assert!(p.skip_reason(false, 200, None, None, None).is_some());
        assert!(
            p.skip_reason(false, 200, Some("text/html"), Some("gzip"), None)
                .unwrap()
                .contains("encoded")
        );
        assert!(
            p.skip_reason(false, 200, Some("text/html"), None, Some(2 << 20))
                .is_some()
        );
        let p = plugin(
            r#"{"rules":[{"find":"a","replace":"b"}],"content_types":["text/","Application/JSON"]}"#,
        );
        assert_eq!(
            p.skip_reason(false, 200, Some("application/json"), None, None),
            None
        );
    }

    #[test]
    fn rewrites_through_the_plugin() {
        let mut ex = Exchange::<Rewrite>::configure(ISSUE).unwrap();
        ex.send_request_headers();
        let out = ex.send_response_headers(
            200,
            &[
                ("content-type", "text/html; charset=utf-8"),
                ("content-length", "42"),
                ("etag", "\"abc\""),
            ],
        );
        assert_eq!(out, Outcome::Continue);
        assert_eq!(ex.response_header("content-length"), None);
        assert_eq!(ex.response_header("etag").as_deref(), Some("W/\"abc\""));
        let (out, body) =
            ex.send_response_body(&["see http://orig", "in.internal/ and https://origin.net/"]);
        assert_eq!(out, Outcome::Continue);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            "see http://www.example.com/ and https://cdn.example.com/"
        );
        assert_eq!(ex.metric("rewrite_bodies_rewritten"), Some(1));
    }

    #[test]
    fn compressed_and_other_types_pass_untouched() {
        for headers in [
            [("content-type", "text/html"), ("content-encoding", "gzip")],
            [("content-type", "image/png"), ("x", "y")],
        ] {
            let mut ex = Exchange::<Rewrite>::configure(ISSUE).unwrap();
            ex.send_request_headers();
            let mut h = headers.to_vec();
            h.push(("content-length", "15"));
            ex.send_response_headers(200, &h);
            assert_eq!(ex.response_header("content-length").as_deref(), Some("15"));
            let (out, body) = ex.send_response_body(&["origin.", "internal"]);
            assert_eq!(out, Outcome::Continue);
            assert_eq!(body, b"origin.internal");
        }
    }

    #[test]
    fn oversized_body_passes_untouched() {
        let mut ex = Exchange::<Rewrite>::configure(
            r#"{"rules":[{"find":"a","replace":"b"}],"max_body_bytes":4}"#,
        )
        .unwrap();
        ex.send_request_headers();
        ex.send_response_headers(200, &[("content-type", "text/plain")]);
        let (_, body) = ex.send_response_body(&["aaa", "aaa"]);
        assert_eq!(body, b"aaaaaa");
    }

    #[test]
    fn config_errors() {
        let cfg = |c: &str| Exchange::<Rewrite>::configure(c).map(|_| ());
        assert!(cfg("").unwrap_err().contains("missing field `rules`"));
        assert!(cfg(r#"{"rules":[]}"#).unwrap_err().contains("empty"));
        assert!(
            cfg(r#"{"rules":[{"replace":"x"}]}"#)
                .unwrap_err()
                .contains("exactly one")
        );
        assert!(
            cfg(r#"{"rules":[{"find":"a","regex":"b","replace":"x"}]}"#)
                .unwrap_err()
                .contains("exactly one")
        );
        assert!(
            cfg(r#"{"rules":[{"find":"","replace":"x"}]}"#)
                .unwrap_err()
                .contains("exactly one")
        );
        assert!(
            cfg(r#"{"rules":[{"regex":"(","replace":"x"}]}"#)
                .unwrap_err()
                .contains("invalid regex")
        );
        assert!(cfg(r#"{"rules":[{"find":"a","replace":"b"}],"content_types":[]}"#).is_err());
    }
}
