//! `signed-url`: a Meridian plugin that admits only requests whose URL
//! carries a valid, unexpired HMAC-SHA256 signature (CloudFront/Akamai token
//! style).
//!
//! # Signature
//!
//! For a request `:path` of `<path>?<query>`:
//!
//! 1. Split `<query>` on `&` into raw parameters (not decoded). Exactly one
//!    must be named `param_signature` (default `signature`) and exactly one
//!    `param_expires` (default `expires`, Unix seconds, decimal).
//! 2. The signed message is `<path>?<the other parameters, in their
//!    original order, joined with &>`: the query with the signature
//!    parameter taken out, byte for byte as sent (`expires` stays in).
//! 3. The signature is the lowercase hex HMAC-SHA256 of the message under
//!    `secret` (its UTF-8 bytes). Compared in constant time; upper-case hex
//!    is accepted too.
//! 4. The URL is valid while `now < expires + leeway_secs`.
//!
//! Failures answer `403` with a short reason. On success (with `strip`,
//! the default) the signature and expiry parameters are removed from the
//! `:path` sent to the origin, so every signed variant of a URL shares one
//! cache key.

use hmac::{Hmac, Mac};
use meridian_plugin_sdk::{Counter, Flow, Plugin, Request};
use serde::Deserialize;
use sha2::Sha256;

/// The plugin configuration (see the README for the reference).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// HMAC key (its UTF-8 bytes).
    pub secret: String,
    /// Name of the expiry parameter.
    #[serde(default = "default_expires")]
    pub param_expires: String,
    /// Name of the signature parameter.
    #[serde(default = "default_signature")]
    pub param_signature: String,
    /// Seconds of grace after `expires`.
    #[serde(default)]
    pub leeway_secs: u64,
    /// Remove the signature and expiry parameters before the origin (and
    /// the cache key) sees the URL.
    #[serde(default = "default_strip")]
    pub strip: bool,
}

fn default_expires() -> String {
    "expires".into()
}

fn default_signature() -> String {
    "signature".into()
}

fn default_strip() -> bool {
    true
}

/// Why a URL was refused: the text is the 403 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// No signature parameter.
    MissingSignature,
    /// No expiry parameter.
    MissingExpires,
    /// A parameter appears twice.
    Duplicate,
    /// The expiry is not a number.
    BadExpires,
    /// The signature does not match.
    BadSignature,
    /// The URL has expired.
    Expired,
}

impl Reject {
    /// The reason, as sent in the body.
    pub fn reason(self) -> &'static str {
        match self {
            Reject::MissingSignature => "missing signature",
            Reject::MissingExpires => "missing expiry",
            Reject::Duplicate => "duplicate signature or expiry parameter",
            Reject::BadExpires => "invalid expiry",
            Reject::BadSignature => "invalid signature",
            Reject::Expired => "URL expired",
        }
    }
}

/// The configured verifier.
pub struct SignedUrl {
    config: Config,
    allowed: Counter,
    denied: Counter,
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Lowercase hex HMAC-SHA256 of `message` under `secret`: what a signer
/// computes.
pub fn sign(secret: &[u8], message: &str) -> String {
    let mut mac = mac(secret);
    mac.update(message.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn mac(secret: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length.
    match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts any key length"),
    }
}

impl SignedUrl {
    /// Check `path_and_query` at `now` (Unix seconds). `Ok` holds the
    /// `:path` to send on (stripped or not, per the configuration).
    pub fn verify(&self, path_and_query: &str, now: u64) -> Result<String, Reject> {
        let c = &self.config;
        let (path, query) = path_and_query
            .split_once('?')
            .ok_or(Reject::MissingSignature)?;
        let name = |p: &str| p.split_once('=').map_or(p, |(k, _)| k).to_owned();
        let value = |p: &'_ str| p.split_once('=').map_or("", |(_, v)| v).to_owned();
        let params: Vec<&str> = query.split('&').collect();

        let mut sigs = params.iter().filter(|p| name(p) == c.param_signature);
        let sig = sigs.next().ok_or(Reject::MissingSignature)?;
        let mut exps = params.iter().filter(|p| name(p) == c.param_expires);
        let exp = exps.next().ok_or(Reject::MissingExpires)?;
        if sigs.next().is_some() || exps.next().is_some() {
            return Err(Reject::Duplicate);
        }
        let exp_value = value(exp);
        if exp_value.is_empty() || !exp_value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Reject::BadExpires);
        }
        let expires: u64 = exp_value.parse().map_err(|_| Reject::BadExpires)?;

        let signed: Vec<&str> = params
            .iter()
            .copied()
            .filter(|p| name(p) != c.param_signature)
            .collect();
        let message = format!("{path}?{}", signed.join("&"));
        let given = hex_decode(&value(sig)).ok_or(Reject::BadSignature)?;
        let mut mac = mac(c.secret.as_bytes());
        mac.update(message.as_bytes());
        mac.verify_slice(&given).map_err(|_| Reject::BadSignature)?;

        if now >= expires.saturating_add(c.leeway_secs) {
            return Err(Reject::Expired);
        }
        if !c.strip {
            return Ok(path_and_query.to_owned());
        }
        let rest: Vec<&str> = signed
            .into_iter()
            .filter(|p| name(p) != c.param_expires)
            .collect();
        Ok(if rest.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{}", rest.join("&"))
        })
    }
}

impl Plugin for SignedUrl {
    type Config = Config;
    type RequestState = ();

    fn configure(config: Config) -> Result<Self, String> {
        if config.secret.is_empty() {
            return Err("secret must not be empty".into());
        }
        if config.secret.len() < 16 {
            meridian_plugin_sdk::warn!(
                "signed-url: the secret is short; use 32 random bytes or more"
            );
        }
        for (what, name) in [
            ("param_expires", &config.param_expires),
            ("param_signature", &config.param_signature),
        ] {
            if name.is_empty() || name.contains(['&', '=', '?', '#']) {
                return Err(format!("{what} {name:?} is not a usable parameter name"));
            }
        }
        if config.param_expires == config.param_signature {
            return Err("param_expires and param_signature must differ".into());
        }
        Ok(Self {
            config,
            allowed: Counter::define("signed_url_allowed"),
            denied: Counter::define("signed_url_denied"),
        })
    }

    fn on_request(&self, req: &mut Request, _: &mut ()) -> Flow {
        let path = req.path();
        match self.verify(&path, meridian_plugin_sdk::now_unix()) {
            Ok(forward) => {
                self.allowed.increment();
                if forward != path {
                    req.set_path(&forward);
                }
                Flow::Continue
            }
            Err(why) => {
                self.denied.increment();
                Flow::deny(403, why.reason())
            }
        }
    }
}

meridian_plugin_sdk::register!(SignedUrl);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use meridian_plugin_sdk::testing::{Exchange, Outcome};

    const NOW: u64 = 1_700_000_000;
    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn plugin(extra: &str) -> SignedUrl {
        meridian_plugin_sdk::testing::configure::<SignedUrl>(&format!(
            r#"{{"secret":"{SECRET}"{extra}}}"#
        ))
        .unwrap()
    }

    /// Sign `path?query` by appending `&signature=...`.
    fn signed(path_and_query: &str) -> String {
        format!(
            "{path_and_query}&signature={}",
            sign(SECRET.as_bytes(), path_and_query)
        )
    }

    #[test]
    fn known_vector() {
        // Same as the README's openssl one-liner:
        // printf '%s' '/v/a.mp4?expires=1700000060' | openssl dgst -sha256 -hmac 0123456789abcdef0123456789abcdef
        assert_eq!(
            sign(SECRET.as_bytes(), "/v/a.mp4?expires=1700000060"),
            "9383c02e7b6b7282b4c3e843e8653e030892add7d1f0ed479b08a78a6167b122"
        );
    }

    #[test]
    fn valid_urls_are_stripped() {
        let p = plugin("");
        let url = signed("/v/a.mp4?expires=1700000060");
        assert_eq!(p.verify(&url, NOW), Ok("/v/a.mp4".into()));
        let url = signed("/v/a.mp4?x=1&expires=1700000060&y=%20");
        assert_eq!(p.verify(&url, NOW), Ok("/v/a.mp4?x=1&y=%20".into()));
        // The signature may sit anywhere; the others keep their order.
        let msg = "/a?b=2&expires=1700000060&a=1";
        let url = format!(
            "/a?signature={}&b=2&expires=1700000060&a=1",
            sign(SECRET.as_bytes(), msg)
        );
        assert_eq!(p.verify(&url, NOW), Ok("/a?b=2&a=1".into()));
        // Upper-case hex is accepted.
        let url = format!(
            "/a?expires=1700000060&signature={}",
            sign(SECRET.as_bytes(), "/a?expires=1700000060").to_uppercase()
        );
        assert!(p.verify(&url, NOW).is_ok());
    }

    #[test]
    fn no_strip_keeps_the_url() {
        let p = plugin(r#","strip":false"#);
        let url = signed("/a?expires=1700000060");
        assert_eq!(p.verify(&url, NOW), Ok(url.clone()));
    }

    #[test]
    fn refusals() {
        let p = plugin("");
        assert_eq!(p.verify("/a", NOW), Err(Reject::MissingSignature));
        assert_eq!(
            p.verify("/a?expires=1700000060", NOW),
            Err(Reject::MissingSignature)
        );
        assert_eq!(
            p.verify("/a?signature=00", NOW),
            Err(Reject::MissingExpires)
        );
        assert_eq!(
            p.verify("/a?expires=x&signature=00", NOW),
            Err(Reject::BadExpires)
        );
        assert_eq!(
            p.verify("/a?expires=-1&signature=00", NOW),
            Err(Reject::BadExpires)
        );
        assert_eq!(
            p.verify("/a?expires=1700000060&signature=zz", NOW),
            Err(Reject::BadSignature)
        );
        assert_eq!(
            p.verify("/a?expires=1700000060&signature=", NOW),
            Err(Reject::BadSignature)
        );
        let url = signed("/a?expires=1700000060");
        assert_eq!(
            p.verify(&format!("{url}&signature=00"), NOW),
            Err(Reject::Duplicate)
        );
        assert_eq!(
            p.verify(&format!("{url}&expires=1"), NOW),
            Err(Reject::Duplicate)
        );
        // Tampering: another path, another expiry, an added parameter.
        assert_eq!(
            p.verify(&url.replace("/a", "/b"), NOW),
            Err(Reject::BadSignature)
        );
        assert_eq!(
            p.verify(&url.replace("60", "61"), NOW),
            Err(Reject::BadSignature)
        );
        assert_eq!(
            p.verify(&format!("{url}&x=1"), NOW),
            Err(Reject::BadSignature)
        );
        // Truncated signature.
        let short = &url[..url.len() - 2];
        assert_eq!(p.verify(short, NOW), Err(Reject::BadSignature));
    }

    #[test]
    fn expiry_and_leeway() {
        let p = plugin("");
        let url = signed("/a?expires=1700000000");
        assert_eq!(p.verify(&url, NOW), Err(Reject::Expired));
        assert!(p.verify(&url, NOW - 1).is_ok());
        let p = plugin(r#","leeway_secs":10"#);
        assert!(p.verify(&url, NOW + 9).is_ok());
        assert_eq!(p.verify(&url, NOW + 10), Err(Reject::Expired));
    }

    #[test]
    fn custom_parameter_names() {
        let p = plugin(r#","param_expires":"e","param_signature":"s""#);
        let msg = "/a?e=1700000060";
        let url = format!("{msg}&s={}", sign(SECRET.as_bytes(), msg));
        assert_eq!(p.verify(&url, NOW), Ok("/a".into()));
    }

    #[test]
    fn through_the_plugin() {
        let url = signed("/v/a.mp4?q=1&expires=1700000060");
        let mut ex = Exchange::<SignedUrl>::configure(&format!(r#"{{"secret":"{SECRET}"}}"#))
            .unwrap()
            .now_unix(NOW)
            .get(&url);
        assert_eq!(ex.send_request_headers(), Outcome::Continue);
        assert_eq!(ex.request_header(":path").as_deref(), Some("/v/a.mp4?q=1"));

        let mut ex = Exchange::<SignedUrl>::configure(&format!(r#"{{"secret":"{SECRET}"}}"#))
            .unwrap()
            .now_unix(NOW + 3600)
            .get(&url);
        let out = ex.send_request_headers();
        assert_eq!(out.status(), Some(403));
        assert_eq!(out.body_text().as_deref(), Some("URL expired\n"));
        assert_eq!(ex.metric("signed_url_denied"), Some(1));
    }

    #[test]
    fn config_errors() {
        let cfg = |c: &str| Exchange::<SignedUrl>::configure(c).map(|_| ());
        assert!(cfg("").unwrap_err().contains("missing field `secret`"));
        assert!(cfg(r#"{"secret":""}"#).unwrap_err().contains("empty"));
        assert!(cfg(r#"{"secret":"x","param_expires":"a=b"}"#).is_err());
        assert!(cfg(r#"{"secret":"x","param_expires":"s","param_signature":"s"}"#).is_err());
        assert!(cfg(r#"{"secret":"x","bogus":1}"#).is_err());
    }
}
