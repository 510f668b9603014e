//! `jwt-auth`: a Meridian plugin that admits only requests with a valid JWT
//! in `Authorization: Bearer <token>`.
//!
//! * No bearer token: `401` with `WWW-Authenticate: Bearer realm="meridian"`.
//! * Invalid token: `401` with `WWW-Authenticate: Bearer realm="meridian",
//!   error="invalid_token", error_description="<why>"`.
//! * Valid token: any client-supplied `X-Auth-Subject` is removed and the
//!   token's `sub` is sent to the origin as `X-Auth-Subject`.
//!
//! The validation itself is in [`jwt`]; configuration reference in
//! `wasm-plugins/README.md`.

pub mod jwt;

use meridian_plugin_sdk::{Counter, Flow, Plugin, Request};

/// The plugin: a configured validator and its counters.
pub struct JwtAuth {
    validator: jwt::Validator,
    allowed: Counter,
    denied: Counter,
}

/// Header carrying the token's `sub` to the origin.
pub const SUBJECT_HEADER: &str = "x-auth-subject";

fn unauthorized(challenge: String, body: &str) -> Flow {
    Flow::deny(401, body)
        .with_header("www-authenticate", &challenge)
        .with_header("cache-control", "no-store")
}

impl JwtAuth {
    /// The decision for a request with this `Authorization` value at `now`.
    /// `Ok(sub)` admits it.
    pub fn check(&self, authorization: Option<&str>, now: u64) -> Result<Option<String>, Flow> {
        let Some(token) = authorization.and_then(jwt::bearer_token) else {
            return Err(unauthorized(
                r#"Bearer realm="meridian""#.to_owned(),
                "missing bearer token",
            ));
        };
        match self.validator.validate(token, now) {
            Ok(claims) => Ok(claims.sub),
            Err(e) => Err(unauthorized(
                format!(
                    r#"Bearer realm="meridian", error="invalid_token", error_description="{}""#,
                    e.description()
                ),
                &format!("invalid token: {}", e.description()),
            )),
        }
    }
}

impl Plugin for JwtAuth {
    type Config = jwt::Config;
    type RequestState = ();

    fn configure(config: jwt::Config) -> Result<Self, String> {
        let validator = jwt::Validator::new(config)?;
        meridian_plugin_sdk::info!("jwt-auth: configured for {:?}", validator.alg());
        Ok(Self {
            validator,
            allowed: Counter::define("jwt_auth_allowed"),
            denied: Counter::define("jwt_auth_denied"),
        })
    }

    fn on_request(&self, req: &mut Request, _: &mut ()) -> Flow {
        let auth = req.header("authorization");
        match self.check(auth.as_deref(), meridian_plugin_sdk::now_unix()) {
            Ok(sub) => {
                self.allowed.increment();
                req.remove_header(SUBJECT_HEADER);
                if let Some(sub) = sub {
                    req.set_header(SUBJECT_HEADER, &sub);
                }
                Flow::Continue
            }
            Err(flow) => {
                self.denied.increment();
                meridian_plugin_sdk::debug!("jwt-auth: refused {}", req.path());
                flow
            }
        }
    }
}

meridian_plugin_sdk::register!(JwtAuth);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use jwt::tests::{JWKS, NOW, mint};
    use meridian_plugin_sdk::testing::{Exchange, Outcome};
    use serde_json::json;

    fn exchange(config: &str) -> Exchange<JwtAuth> {
        Exchange::<JwtAuth>::configure(config)
            .unwrap()
            .now_unix(NOW)
    }

    const HS: &str = r#"{"alg":"HS256","secret":"s3cret"}"#;

    #[test]
    fn missing_token() {
        let mut ex = exchange(HS);
        let out = ex.send_request_headers();
        assert_eq!(out.status(), Some(401));
        assert_eq!(
            out.header("www-authenticate"),
            Some(r#"Bearer realm="meridian""#)
        );
        assert_eq!(out.body_text().as_deref(), Some("missing bearer token\n"));

        let mut ex = exchange(HS).header("authorization", "Basic dXNlcjpwYXNz");
        assert_eq!(ex.send_request_headers().status(), Some(401));
        assert_eq!(ex.metric("jwt_auth_denied"), Some(1));
    }

    #[test]
    fn invalid_token() {
        let t = mint(
            "HS256",
            json!({}),
            json!({"sub": "a", "exp": NOW}),
            b"s3cret",
        );
        let mut ex = exchange(HS).header("authorization", &format!("Bearer {t}"));
        let out = ex.send_request_headers();
        assert_eq!(out.status(), Some(401));
        assert_eq!(
            out.header("www-authenticate"),
            Some(
                r#"Bearer realm="meridian", error="invalid_token", error_description="token expired""#
            )
        );
        assert_eq!(
            out.body_text().as_deref(),
            Some("invalid token: token expired\n")
        );
    }

    #[test]
    fn valid_token_sets_subject() {
        let t = mint(
            "HS256",
            json!({}),
            json!({"sub": "alice", "exp": NOW + 10}),
            b"s3cret",
        );
        let mut ex = exchange(HS)
            .header("authorization", &format!("Bearer {t}"))
            .header("X-Auth-Subject", "mallory")
            .header("x-auth-subject", "eve");
        assert_eq!(ex.send_request_headers(), Outcome::Continue);
        assert_eq!(ex.request_header_values(SUBJECT_HEADER), ["alice"]);
        assert_eq!(ex.metric("jwt_auth_allowed"), Some(1));

        // No sub: the spoofed header is still removed.
        let t = mint("HS256", json!({}), json!({}), b"s3cret");
        let mut ex = exchange(HS)
            .header("authorization", &format!("Bearer {t}"))
            .header("x-auth-subject", "eve");
        assert_eq!(ex.send_request_headers(), Outcome::Continue);
        assert!(ex.request_header_values(SUBJECT_HEADER).is_empty());
    }

    #[test]
    fn es256_through_the_plugin() {
        let config = json!({"alg": "ES256", "jwks": serde_json::from_str::<serde_json::Value>(JWKS).unwrap(), "issuer": "me"}).to_string();
        let t = mint(
            "ES256",
            json!({"kid": "ec1"}),
            json!({"sub": "bob", "iss": "me"}),
            b"",
        );
        let mut ex = exchange(&config).header("authorization", &format!("Bearer {t}"));
        assert_eq!(ex.send_request_headers(), Outcome::Continue);
        assert_eq!(ex.request_header(SUBJECT_HEADER).as_deref(), Some("bob"));
    }

    #[test]
    fn bad_config_is_refused() {
        assert!(Exchange::<JwtAuth>::configure("").is_err());
        assert!(Exchange::<JwtAuth>::configure(r#"{"alg":"HS256"}"#).is_err());
    }
}
