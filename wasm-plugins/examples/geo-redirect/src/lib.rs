//! `geo-redirect`: a Meridian plugin that redirects or refuses requests by
//! the client's country.
//!
//! The country is the property `meridian.client.country` (an ISO 3166-1
//! alpha-2 code that Meridian derives from its GeoIP database). The first
//! rule listing the country applies; an unknown country, or one no rule
//! lists, gets the `default` action (`"continue"` unless configured).
//!
//! Actions: `redirect` (a URL template, with `status` 301, 302, 303, 307 or
//! 308, default 302) or `deny` (a 4xx/5xx status, with an optional
//! `message`). In templates `{path}` expands to the request's path and query,
//! `{host}` to its host name and `{country}` to the country code (empty if
//! unknown). A redirect whose target host is the request's own host is not
//! followed (the request continues), so a rule cannot loop on the site it
//! redirects to. Generated responses carry `Cache-Control: private`.

use meridian_plugin_sdk::{Counter, Flow, Plugin, Request};
use serde::Deserialize;

/// The plugin configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The rules, first match wins.
    pub rules: Vec<RuleConfig>,
    /// What to do when no rule applies.
    #[serde(default)]
    pub default: Option<DefaultConfig>,
}

/// One rule: countries and an action.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// ISO 3166-1 alpha-2 codes.
    pub countries: Vec<String>,
    /// Redirect target template.
    #[serde(default)]
    pub redirect: Option<String>,
    /// Redirect status.
    #[serde(default)]
    pub status: Option<u16>,
    /// Deny with this status.
    #[serde(default)]
    pub deny: Option<u16>,
    /// Body of a deny.
    #[serde(default)]
    pub message: Option<String>,
}

/// The default action: `"continue"` or an action object.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum DefaultConfig {
    /// `"continue"`.
    Word(String),
    /// `{"redirect": ..., "status": ...}` or `{"deny": ..., "message": ...}`.
    Action(ActionConfig),
}

/// An action without countries.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    /// Redirect target template.
    #[serde(default)]
    pub redirect: Option<String>,
    /// Redirect status.
    #[serde(default)]
    pub status: Option<u16>,
    /// Deny with this status.
    #[serde(default)]
    pub deny: Option<u16>,
    /// Body of a deny.
    #[serde(default)]
    pub message: Option<String>,
}

/// A checked action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Let the request through.
    Continue,
    /// Redirect to the expanded template.
    Redirect {
        /// URL template.
        template: String,
        /// 3xx status.
        status: u16,
    },
    /// Refuse.
    Deny {
        /// 4xx/5xx status.
        status: u16,
        /// Body.
        message: String,
    },
}

const PLACEHOLDERS: [&str; 3] = ["{path}", "{host}", "{country}"];

fn action(
    redirect: Option<String>,
    status: Option<u16>,
    deny: Option<u16>,
    message: Option<String>,
) -> Result<Action, String> {
    match (redirect, deny) {
        (Some(template), None) => {
            if message.is_some() {
                return Err("message goes with deny, not redirect".into());
            }
            let status = status.unwrap_or(302);
            if ![301, 302, 303, 307, 308].contains(&status) {
                return Err(format!(
                    "redirect status {status} is not 301, 302, 303, 307 or 308"
                ));
            }
            let mut rest = template.clone();
            for p in PLACEHOLDERS {
                rest = rest.replace(p, "");
            }
            if rest.contains('{') || rest.contains('}') {
                return Err(format!(
                    "redirect {template:?}: only {{path}}, {{host}} and {{country}} can be expanded"
                ));
            }
            if template.chars().any(char::is_control) {
                return Err(format!("redirect {template:?} contains control characters"));
            }
            Ok(Action::Redirect { template, status })
        }
        (None, Some(deny)) => {
            if status.is_some() {
                return Err("status goes with redirect; deny takes the status itself".into());
            }
            let status = deny;
            if !(400..=599).contains(&status) {
                return Err(format!("deny status {status} is not 4xx or 5xx"));
            }
            Ok(Action::Deny {
                status,
                message: message.unwrap_or_else(|| "not available in your country".into()),
            })
        }
        _ => Err("give exactly one of \"redirect\" or \"deny\"".into()),
    }
}

/// The plugin.
#[derive(Debug)]
pub struct GeoRedirect {
    rules: Vec<(Vec<String>, Action)>,
    default: Action,
    redirected: Counter,
    denied: Counter,
}

/// Expand a redirect template.
pub fn expand(template: &str, path: &str, host: &str, country: &str) -> String {
    template
        .replace("{path}", path)
        .replace("{host}", host)
        .replace("{country}", country)
}

/// The host name of an absolute URL (`None` for a relative one).
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if authority.starts_with('[') {
        return authority.find(']').map(|i| &authority[..=i]);
    }
    Some(match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    })
}

impl GeoRedirect {
    /// The action for a client in `country` (`None` = unknown).
    pub fn decide(&self, country: Option<&str>) -> &Action {
        country
            .and_then(|c| {
                self.rules
                    .iter()
                    .find(|(countries, _)| countries.iter().any(|x| x == c))
            })
            .map_or(&self.default, |(_, a)| a)
    }
}

impl Plugin for GeoRedirect {
    type Config = Config;
    type RequestState = ();

    fn configure(config: Config) -> Result<Self, String> {
        let mut rules = Vec::new();
        for (i, r) in config.rules.into_iter().enumerate() {
            let ctx = |e: String| format!("rules[{i}]: {e}");
            if r.countries.is_empty() {
                return Err(ctx("countries must not be empty".into()));
            }
            let mut countries = Vec::new();
            for c in r.countries {
                if c.len() != 2 || !c.bytes().all(|b| b.is_ascii_alphabetic()) {
                    return Err(ctx(format!("{c:?} is not an ISO 3166-1 alpha-2 code")));
                }
                countries.push(c.to_ascii_uppercase());
            }
            let a = action(r.redirect, r.status, r.deny, r.message).map_err(ctx)?;
            rules.push((countries, a));
        }
        let default = match config.default {
            None => Action::Continue,
            Some(DefaultConfig::Word(w)) if w == "continue" => Action::Continue,
            Some(DefaultConfig::Word(w)) => {
                return Err(format!(
                    "default: {w:?} is not \"continue\" or an action object"
                ));
            }
            Some(DefaultConfig::Action(a)) => action(a.redirect, a.status, a.deny, a.message)
                .map_err(|e| format!("default: {e}"))?,
        };
        Ok(Self {
            rules,
            default,
            redirected: Counter::define("geo_redirect_redirected"),
            denied: Counter::define("geo_redirect_denied"),
        })
    }

    fn on_request(&self, req: &mut Request, _: &mut ()) -> Flow {
        let country = req.client_country();
        match self.decide(country.as_deref()) {
            Action::Continue => Flow::Continue,
            Action::Redirect { template, status } => {
                let host = req.host();
                let location = expand(
                    template,
                    &req.path(),
                    &host,
                    country.as_deref().unwrap_or(""),
                );
                if url_host(&location).is_some_and(|h| h.eq_ignore_ascii_case(&host)) {
                    meridian_plugin_sdk::debug!(
                        "geo-redirect: {location} is this host, not redirecting"
                    );
                    return Flow::Continue;
                }
                self.redirected.increment();
                Flow::redirect(*status, &location).with_header("cache-control", "private")
            }
            Action::Deny { status, message } => {
                self.denied.increment();
                Flow::deny(*status, message).with_header("cache-control", "private")
            }
        }
    }
}

meridian_plugin_sdk::register!(GeoRedirect);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use meridian_plugin_sdk::testing::{Exchange, Outcome};

    const ISSUE: &str = r#"{"rules":[{"countries":["DE","AT"],"redirect":"https://de.example.com{path}","status":302},{"countries":["KP"],"deny":451}],"default":"continue"}"#;

    fn ex(config: &str) -> Exchange<GeoRedirect> {
        Exchange::<GeoRedirect>::configure(config).unwrap()
    }

    #[test]
    fn redirect_keeps_path_and_query() {
        let mut e = ex(ISSUE).get("/a/b?x=1").country("DE");
        let out = e.send_request_headers();
        assert_eq!(out.status(), Some(302));
        assert_eq!(
            out.header("location"),
            Some("https://de.example.com/a/b?x=1")
        );
        assert_eq!(out.header("cache-control"), Some("private"));
        assert_eq!(e.metric("geo_redirect_redirected"), Some(1));
        // Lower-case codes from the host are accepted.
        assert_eq!(
            ex(ISSUE).country("at").send_request_headers().status(),
            Some(302)
        );
    }

    #[test]
    fn deny_and_continue() {
        let out = ex(ISSUE).country("KP").send_request_headers();
        assert_eq!(out.status(), Some(451));
        assert_eq!(
            out.body_text().as_deref(),
            Some("not available in your country\n")
        );
        assert_eq!(
            ex(ISSUE).country("FR").send_request_headers(),
            Outcome::Continue
        );
        // Unknown country: the default.
        assert_eq!(ex(ISSUE).send_request_headers(), Outcome::Continue);
    }

    #[test]
    fn default_action() {
        let cfg = r#"{"rules":[{"countries":["FR"],"deny":403,"message":"non"}],"default":{"redirect":"https://www.example.com/{country}{path}","status":307}}"#;
        let out = ex(cfg).get("/x").send_request_headers();
        assert_eq!(out.status(), Some(307));
        assert_eq!(out.header("location"), Some("https://www.example.com//x"));
        let out = ex(cfg).get("/x").country("US").send_request_headers();
        assert_eq!(out.header("location"), Some("https://www.example.com/US/x"));
        let out = ex(cfg).country("FR").send_request_headers();
        assert_eq!(
            (out.status(), out.body_text().as_deref()),
            (Some(403), Some("non\n"))
        );
    }

    #[test]
    fn no_redirect_to_self() {
        let mut e = ex(ISSUE).authority("de.example.com").country("DE");
        assert_eq!(e.send_request_headers(), Outcome::Continue);
        let mut e = ex(ISSUE).authority("de.example.com:443").country("DE");
        assert_eq!(e.send_request_headers(), Outcome::Continue);
    }

    #[test]
    fn helpers() {
        assert_eq!(
            expand("https://{host}/{country}{path}", "/p?q", "h", "DE"),
            "https://h/DE/p?q"
        );
        assert_eq!(url_host("https://a.example:8443/x"), Some("a.example"));
        assert_eq!(url_host("https://u@a.example/x"), Some("a.example"));
        assert_eq!(url_host("https://a.example?x"), Some("a.example"));
        assert_eq!(url_host("/relative"), None);
        assert_eq!(url_host("http://[::1]:80/"), Some("[::1]"));
    }

    #[test]
    fn config_errors() {
        let cfg = |c: &str| {
            Exchange::<GeoRedirect>::configure(c)
                .map(|_| ())
                .unwrap_err()
        };
        assert!(cfg("").contains("missing field `rules`"));
        assert!(cfg(r#"{"rules":[{"countries":["DEU"],"deny":403}]}"#).contains("alpha-2"));
        assert!(cfg(r#"{"rules":[{"countries":[],"deny":403}]}"#).contains("empty"));
        assert!(cfg(r#"{"rules":[{"countries":["DE"]}]}"#).contains("exactly one"));
        assert!(
            cfg(r#"{"rules":[{"countries":["DE"],"deny":403,"redirect":"/"}]}"#)
                .contains("exactly one")
        );
        assert!(cfg(r#"{"rules":[{"countries":["DE"],"deny":302}]}"#).contains("4xx"));
        assert!(
            cfg(r#"{"rules":[{"countries":["DE"],"deny":403,"status":403}]}"#)
                .contains("status goes with redirect")
        );
        assert!(
            cfg(r#"{"rules":[{"countries":["DE"],"redirect":"/","status":200}]}"#).contains("301")
        );
        assert!(
            cfg(r#"{"rules":[{"countries":["DE"],"redirect":"/{query}"}]}"#).contains("expanded")
        );
        assert!(cfg(r#"{"rules":[],"default":"stop"}"#).contains("continue"));
        assert!(cfg(r#"{"rules":[],"default":{"deny":200}}"#).contains("4xx"));
    }
}
