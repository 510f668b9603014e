//! JWT (JWS compact serialization) validation: pure functions, no host calls.
//!
//! Supported algorithms: HS256 (HMAC-SHA256 with a shared secret), RS256
//! (RSASSA-PKCS1-v1_5 with SHA-256) and ES256 (ECDSA P-256 with SHA-256, the
//! JWS raw `r || s` signature). Exactly one algorithm is configured and the
//! token's `alg` header must equal it: `none` and algorithm confusion (e.g.
//! an HS256 token verified with an RSA public key as the secret) are refused.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::Value;
use sha2::Sha256;

/// The plugin configuration (see the README for the reference).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `HS256`, `RS256` or `ES256`.
    pub alg: String,
    /// HS256 only: the shared secret (its UTF-8 bytes are the HMAC key).
    #[serde(default)]
    pub secret: Option<String>,
    /// RS256/ES256 only: the public keys, as an inline JWK Set (a JSON
    /// object, or a string holding one).
    #[serde(default)]
    pub jwks: Option<JwksSource>,
    /// Required `iss` claim.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Accepted audience(s): the token's `aud` (a string or an array) must
    /// contain one of them.
    #[serde(default)]
    pub audience: Option<OneOrMany>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    #[serde(default)]
    pub leeway_secs: u64,
}

/// A JWK Set given inline or as JSON text.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum JwksSource {
    /// `{"keys": [...]}`.
    Inline(Jwks),
    /// The same, as a string.
    Text(String),
}

/// A string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One value.
    One(String),
    /// Several values.
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A JWK Set (RFC 7517).
#[derive(Debug, Deserialize)]
pub struct Jwks {
    /// The keys.
    pub keys: Vec<Jwk>,
}

/// The members of a JWK this plugin uses; others are ignored.
#[derive(Debug, Deserialize)]
pub struct Jwk {
    /// `RSA` or `EC`.
    pub kty: String,
    /// Key id, matched against the token's `kid`.
    #[serde(default)]
    pub kid: Option<String>,
    /// `sig` (keys with another `use` are skipped).
    #[serde(default, rename = "use")]
    pub use_: Option<String>,
    /// If present, must equal the configured algorithm (else skipped).
    #[serde(default)]
    pub alg: Option<String>,
    /// RSA modulus.
    #[serde(default)]
    pub n: Option<String>,
    /// RSA exponent.
    #[serde(default)]
    pub e: Option<String>,
    /// EC curve (`P-256`).
    #[serde(default)]
    pub crv: Option<String>,
    /// EC x coordinate.
    #[serde(default)]
    pub x: Option<String>,
    /// EC y coordinate.
    #[serde(default)]
    pub y: Option<String>,
}

/// The configured algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// HMAC-SHA256.
    Hs256,
    /// RSASSA-PKCS1-v1_5 SHA-256.
    Rs256,
    /// ECDSA P-256 SHA-256.
    Es256,
}

impl Alg {
    fn name(self) -> &'static str {
        match self {
            Alg::Hs256 => "HS256",
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
        }
    }
}

type RsaKey = rsa::pkcs1v15::VerifyingKey<Sha256>;
type EcKey = p256::ecdsa::VerifyingKey;

enum Keys {
    Hmac(Vec<u8>),
    Rsa(Vec<(Option<String>, RsaKey)>),
    Ec(Vec<(Option<String>, EcKey)>),
}

/// Why a token was refused. [`JwtError::description`] is safe to put in a
/// `WWW-Authenticate` quoted string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtError {
    /// Not three base64url parts, or bad JSON.
    Malformed,
    /// `alg` is `none`.
    Unsigned,
    /// `alg` is not the configured algorithm.
    WrongAlgorithm,
    /// The header has a `crit` member (no extensions are understood).
    UnsupportedCritical,
    /// `kid` names no configured key.
    UnknownKey,
    /// The signature does not verify.
    BadSignature,
    /// `exp` has passed.
    Expired,
    /// `nbf` is in the future.
    NotYetValid,
    /// `iss` is not the configured issuer.
    WrongIssuer,
    /// `aud` does not contain a configured audience.
    WrongAudience,
    /// A registered claim has the wrong type, or `sub` cannot be a header.
    BadClaims,
}

impl JwtError {
    /// A short description for `error_description`.
    pub fn description(self) -> &'static str {
        match self {
            JwtError::Malformed => "malformed token",
            JwtError::Unsigned => "unsigned tokens are not accepted",
            JwtError::WrongAlgorithm => "unexpected signing algorithm",
            JwtError::UnsupportedCritical => "unsupported critical header",
            JwtError::UnknownKey => "unknown key id",
            JwtError::BadSignature => "invalid signature",
            JwtError::Expired => "token expired",
            JwtError::NotYetValid => "token not yet valid",
            JwtError::WrongIssuer => "invalid issuer",
            JwtError::WrongAudience => "invalid audience",
            JwtError::BadClaims => "invalid claims",
        }
    }
}

/// The claims of a valid token.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    /// `sub`, if present.
    pub sub: Option<String>,
    /// All claims.
    pub all: serde_json::Map<String, Value>,
}

/// A configured validator.
pub struct Validator {
    alg: Alg,
    keys: Keys,
    issuer: Option<String>,
    audiences: Vec<String>,
    leeway: u64,
}

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validator")
            .field("alg", &self.alg)
            .field("issuer", &self.issuer)
            .field("audiences", &self.audiences)
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

fn b64(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s).ok()
}

fn rsa_key(jwk: &Jwk) -> Result<RsaKey, String> {
    let n = jwk
        .n
        .as_deref()
        .and_then(b64)
        .ok_or("missing or invalid n")?;
    let e = jwk
        .e
        .as_deref()
        .and_then(b64)
        .ok_or("missing or invalid e")?;
    let key = rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(&n),
        rsa::BigUint::from_bytes_be(&e),
    )
    .map_err(|e| e.to_string())?;
    let bits = rsa::traits::PublicKeyParts::n(&key).bits();
    if bits < 2048 {
        return Err(format!(
            "RSA key of {bits} bits, at least 2048 are required"
        ));
    }
    Ok(RsaKey::new(key))
}

fn ec_key(jwk: &Jwk) -> Result<EcKey, String> {
    if jwk.crv.as_deref() != Some("P-256") {
        return Err("crv must be P-256".into());
    }
    let coord = |c: &Option<String>, name: &str| {
        c.as_deref()
            .and_then(b64)
            .filter(|v| v.len() == 32)
            .ok_or(format!("missing or invalid {name}"))
    };
    let (x, y) = (coord(&jwk.x, "x")?, coord(&jwk.y, "y")?);
    let field = |v: Vec<u8>| <[u8; 32]>::try_from(v).map(p256::FieldBytes::from);
    let (Ok(x), Ok(y)) = (field(x), field(y)) else {
        return Err("invalid coordinates".into());
    };
    let point = p256::EncodedPoint::from_affine_coordinates(&x, &y, false);
    EcKey::from_encoded_point(&point).map_err(|_| "not a point on P-256".to_owned())
}

impl Validator {
    /// Check the configuration and load the keys.
    pub fn new(config: Config) -> Result<Self, String> {
        let alg = match config.alg.as_str() {
            "HS256" => Alg::Hs256,
            "RS256" => Alg::Rs256,
            "ES256" => Alg::Es256,
            other => {
                return Err(format!(
                    "alg {other:?} is not supported: use HS256, RS256 or ES256"
                ));
            }
        };
        let keys = match alg {
            Alg::Hs256 => {
                if config.jwks.is_some() {
                    return Err("HS256 takes a secret, not jwks".into());
                }
                let secret = config.secret.ok_or("HS256 needs a secret")?;
                if secret.is_empty() {
                    return Err("the secret is empty".into());
                }
                Keys::Hmac(secret.into_bytes())
            }
            Alg::Rs256 | Alg::Es256 => {
                if config.secret.is_some() {
                    return Err(format!("{} takes jwks, not a secret", alg.name()));
                }
                let jwks = match config.jwks.ok_or(format!("{} needs jwks", alg.name()))? {
                    JwksSource::Inline(j) => j,
                    JwksSource::Text(t) => {
                        serde_json::from_str(&t).map_err(|e| format!("jwks: {e}"))?
                    }
                };
                let kty = if alg == Alg::Rs256 { "RSA" } else { "EC" };
                let usable = jwks.keys.iter().filter(|k| {
                    k.kty == kty
                        && k.use_.as_deref().is_none_or(|u| u == "sig")
                        && k.alg.as_deref().is_none_or(|a| a == alg.name())
                });
                let mut rsa = Vec::new();
                let mut ec = Vec::new();
                for (i, jwk) in usable.enumerate() {
                    let name = jwk.kid.clone().unwrap_or_else(|| format!("#{i}"));
                    if alg == Alg::Rs256 {
                        rsa.push((
                            jwk.kid.clone(),
                            rsa_key(jwk).map_err(|e| format!("jwks key {name}: {e}"))?,
                        ));
                    } else {
                        ec.push((
                            jwk.kid.clone(),
                            ec_key(jwk).map_err(|e| format!("jwks key {name}: {e}"))?,
                        ));
                    }
                }
                if rsa.is_empty() && ec.is_empty() {
                    return Err(format!("jwks has no {kty} signing key for {}", alg.name()));
                }
                if alg == Alg::Rs256 {
                    Keys::Rsa(rsa)
                } else {
                    Keys::Ec(ec)
                }
            }
        };
        Ok(Self {
            alg,
            keys,
            issuer: config.issuer,
            audiences: config.audience.map(OneOrMany::into_vec).unwrap_or_default(),
            leeway: config.leeway_secs,
        })
    }

    /// The configured algorithm.
    pub fn alg(&self) -> Alg {
        self.alg
    }

    /// Validate `token` at time `now` (Unix seconds).
    pub fn validate(&self, token: &str, now: u64) -> Result<Claims, JwtError> {
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header: serde_json::Map<String, Value> = b64(h64)
            .and_then(|h| serde_json::from_slice(&h).ok())
            .ok_or(JwtError::Malformed)?;
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or(JwtError::Malformed)?;
        if alg.eq_ignore_ascii_case("none") {
            return Err(JwtError::Unsigned);
        }
        if alg != self.alg.name() {
            return Err(JwtError::WrongAlgorithm);
        }
        if header.contains_key("crit") {
            return Err(JwtError::UnsupportedCritical);
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(_) => return Err(JwtError::Malformed),
        };
        let sig = b64(s64).ok_or(JwtError::Malformed)?;
        let signed = &token.as_bytes()[..h64.len() + 1 + p64.len()];
        self.verify_signature(kid, signed, &sig)?;

        let claims: serde_json::Map<String, Value> = b64(p64)
            .and_then(|p| serde_json::from_slice(&p).ok())
            .ok_or(JwtError::Malformed)?;
        self.check_claims(claims, now)
    }

    fn verify_signature(
        &self,
        kid: Option<&str>,
        signed: &[u8],
        sig: &[u8],
    ) -> Result<(), JwtError> {
        use p256::ecdsa::signature::Verifier as _;
        /// Keys to try: the one named by `kid`, or all of them.
        fn pick<'a, K>(
            keys: &'a [(Option<String>, K)],
            kid: Option<&str>,
        ) -> Result<Vec<&'a K>, JwtError> {
            let picked: Vec<&K> = match kid {
                Some(kid) => keys
                    .iter()
                    .filter(|(k, _)| k.as_deref() == Some(kid))
                    .map(|(_, key)| key)
                    .collect(),
                None => keys.iter().map(|(_, key)| key).collect(),
            };
            if picked.is_empty() {
                return Err(JwtError::UnknownKey);
            }
            Ok(picked)
        }
        let ok = match &self.keys {
            Keys::Hmac(secret) => {
                let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
                    return Err(JwtError::BadSignature);
                };
                mac.update(signed);
                mac.verify_slice(sig).is_ok()
            }
            Keys::Rsa(keys) => {
                let keys = pick(keys, kid)?;
                let Ok(sig) = rsa::pkcs1v15::Signature::try_from(sig) else {
                    return Err(JwtError::BadSignature);
                };
                keys.iter().any(|k| k.verify(signed, &sig).is_ok())
            }
            Keys::Ec(keys) => {
                let keys = pick(keys, kid)?;
                if sig.len() != 64 {
                    return Err(JwtError::BadSignature);
                }
                let Ok(sig) = p256::ecdsa::Signature::from_slice(sig) else {
                    return Err(JwtError::BadSignature);
                };
                keys.iter().any(|k| k.verify(signed, &sig).is_ok())
            }
        };
        if ok {
            Ok(())
        } else {
            Err(JwtError::BadSignature)
        }
    }

    fn check_claims(
        &self,
        all: serde_json::Map<String, Value>,
        now: u64,
    ) -> Result<Claims, JwtError> {
        let time = |name: &str| -> Result<Option<u64>, JwtError> {
            match all.get(name) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .or_else(|| {
                        v.as_f64()
                            .filter(|f| f.is_finite() && *f >= 0.0)
                            .map(|f| f as u64)
                    })
                    .map(Some)
                    .ok_or(JwtError::BadClaims),
            }
        };
        if let Some(exp) = time("exp")?
            && now >= exp.saturating_add(self.leeway)
        {
            return Err(JwtError::Expired);
        }
        if let Some(nbf) = time("nbf")?
            && now.saturating_add(self.leeway) < nbf
        {
            return Err(JwtError::NotYetValid);
        }
        if let Some(iss) = &self.issuer
            && all.get("iss").and_then(Value::as_str) != Some(iss.as_str())
        {
            return Err(JwtError::WrongIssuer);
        }
        if !self.audiences.is_empty() {
            let matches = |a: &str| self.audiences.iter().any(|x| x == a);
            let ok = match all.get("aud") {
                Some(Value::String(a)) => matches(a),
                Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).any(matches),
                _ => false,
            };
            if !ok {
                return Err(JwtError::WrongAudience);
            }
        }
        let sub = match all.get("sub") {
            None => None,
            Some(Value::String(s))
                if s.bytes()
                    .all(|b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80) =>
            {
                Some(s.clone())
            }
            Some(_) => return Err(JwtError::BadClaims),
        };
        Ok(Claims { sub, all })
    }
}

/// The token of an `Authorization: Bearer <token>` header value (`None` for
/// another scheme or an empty token).
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let v = authorization.trim();
    let (scheme, rest) = v.split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub const JWKS: &str = include_str!("../testdata/jwks.json");
    const RSA_PEM: &str = include_str!("../testdata/rsa1.pem");
    const EC_PEM: &str = include_str!("../testdata/ec1.pem");
    pub const NOW: u64 = 1_700_000_000;

    fn enc(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    /// Sign `claims` with the test keys: `alg` HS256 (secret), RS256 (rsa1)
    /// or ES256 (ec1); `header` extra members.
    pub fn mint(alg: &str, header: Value, claims: Value, secret: &[u8]) -> String {
        let mut h = json!({"alg": alg, "typ": "JWT"});
        if let (Value::Object(h), Value::Object(extra)) = (&mut h, header) {
            h.extend(extra);
        }
        let signing_input = format!("{}.{}", enc(&h), enc(&claims));
        let sig = match alg {
            "HS256" => {
                let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
                mac.update(signing_input.as_bytes());
                mac.finalize().into_bytes().to_vec()
            }
            "RS256" => {
                use rsa::pkcs8::DecodePrivateKey;
                use rsa::signature::{SignatureEncoding, Signer};
                let key = rsa::RsaPrivateKey::from_pkcs8_pem(RSA_PEM).unwrap();
                let sk = rsa::pkcs1v15::SigningKey::<Sha256>::new(key);
                sk.sign(signing_input.as_bytes()).to_vec()
            }
            "ES256" => {
                use p256::ecdsa::signature::Signer;
                use p256::pkcs8::DecodePrivateKey;
                let sk = p256::ecdsa::SigningKey::from_pkcs8_pem(EC_PEM).unwrap();
                let sig: p256::ecdsa::Signature = sk.sign(signing_input.as_bytes());
                sig.to_bytes().to_vec()
            }
            _ => Vec::new(),
        };
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    fn validator(config: Value) -> Validator {
        Validator::new(serde_json::from_value(config).unwrap()).unwrap()
    }

    fn config_err(config: Value) -> String {
        Validator::new(serde_json::from_value(config).unwrap()).unwrap_err()
    }

    fn hs() -> Validator {
        validator(json!({"alg": "HS256", "secret": "s3cret"}))
    }

    #[test]
    fn hs256_valid() {
        let t = mint(
            "HS256",
            json!({}),
            json!({"sub": "alice", "exp": NOW + 60}),
            b"s3cret",
        );
        let c = hs().validate(&t, NOW).unwrap();
        assert_eq!(c.sub.as_deref(), Some("alice"));
    }

    #[test]
    fn hs256_wrong_secret_or_tampered() {
        let t = mint("HS256", json!({}), json!({"sub": "alice"}), b"other");
        assert_eq!(hs().validate(&t, NOW), Err(JwtError::BadSignature));
        let t = mint("HS256", json!({}), json!({"sub": "alice"}), b"s3cret");
        let mut parts: Vec<&str> = t.split('.').collect();
        let evil = enc(&json!({"sub": "admin"}));
        parts[1] = &evil;
        assert_eq!(
            hs().validate(&parts.join("."), NOW),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn rs256_and_es256_with_kid() {
        let rs = validator(
            json!({"alg": "RS256", "jwks": serde_json::from_str::<Value>(JWKS).unwrap()}),
        );
        let t = mint("RS256", json!({"kid": "rsa1"}), json!({"sub": "bob"}), b"");
        assert_eq!(rs.validate(&t, NOW).unwrap().sub.as_deref(), Some("bob"));
        // No kid: every key is tried.
        let t = mint("RS256", json!({}), json!({"sub": "bob"}), b"");
        assert!(rs.validate(&t, NOW).is_ok());
        let t = mint("RS256", json!({"kid": "nope"}), json!({"sub": "bob"}), b"");
        assert_eq!(rs.validate(&t, NOW), Err(JwtError::UnknownKey));

        // jwks as a string works too.
        let es = validator(json!({"alg": "ES256", "jwks": JWKS}));
        let t = mint("ES256", json!({"kid": "ec1"}), json!({"sub": "carol"}), b"");
        assert_eq!(es.validate(&t, NOW).unwrap().sub.as_deref(), Some("carol"));
        // The RSA key is not an ES256 key.
        let t = mint(
            "ES256",
            json!({"kid": "rsa1"}),
            json!({"sub": "carol"}),
            b"",
        );
        assert_eq!(es.validate(&t, NOW), Err(JwtError::UnknownKey));
    }

    #[test]
    fn algorithm_confusion_and_none_are_refused() {
        let rs = validator(json!({"alg": "RS256", "jwks": JWKS}));
        // An HS256 token "signed" with the public key material as the secret.
        let t = mint(
            "HS256",
            json!({"kid": "rsa1"}),
            json!({"sub": "x"}),
            JWKS.as_bytes(),
        );
        assert_eq!(rs.validate(&t, NOW), Err(JwtError::WrongAlgorithm));
        let t = mint("ES256", json!({}), json!({"sub": "x"}), b"");
        assert_eq!(rs.validate(&t, NOW), Err(JwtError::WrongAlgorithm));
        let none = format!(
            "{}.{}.",
            enc(&json!({"alg": "none"})),
            enc(&json!({"sub": "x"}))
        );
        assert_eq!(rs.validate(&none, NOW), Err(JwtError::Unsigned));
        assert_eq!(hs().validate(&none, NOW), Err(JwtError::Unsigned));
        let t = mint("HS256", json!({"crit": ["exp"]}), json!({}), b"s3cret");
        assert_eq!(hs().validate(&t, NOW), Err(JwtError::UnsupportedCritical));
    }

    #[test]
    fn malformed_tokens() {
        for t in [
            "",
            "a",
            "a.b",
            "a.b.c.d",
            "!!.e30.",
            "e30.e30.!!",
            "bnVsbA.e30.AA",
        ] {
            assert_eq!(hs().validate(t, NOW), Err(JwtError::Malformed), "{t}");
        }
    }

    #[test]
    fn times_with_leeway() {
        let v = hs();
        let tok = |c: Value| mint("HS256", json!({}), c, b"s3cret");
        assert_eq!(
            v.validate(&tok(json!({"exp": NOW})), NOW),
            Err(JwtError::Expired)
        );
        assert!(v.validate(&tok(json!({"exp": NOW + 1})), NOW).is_ok());
        assert_eq!(
            v.validate(&tok(json!({"nbf": NOW + 1})), NOW),
            Err(JwtError::NotYetValid)
        );
        assert!(v.validate(&tok(json!({"nbf": NOW})), NOW).is_ok());
        assert_eq!(
            v.validate(&tok(json!({"exp": "soon"})), NOW),
            Err(JwtError::BadClaims)
        );
        assert!(
            v.validate(&tok(json!({"exp": (NOW + 5) as f64 + 0.5})), NOW)
                .is_ok()
        );

        let v = validator(json!({"alg": "HS256", "secret": "s3cret", "leeway_secs": 30}));
        assert!(v.validate(&tok(json!({"exp": NOW - 29})), NOW).is_ok());
        assert_eq!(
            v.validate(&tok(json!({"exp": NOW - 30})), NOW),
            Err(JwtError::Expired)
        );
        assert!(v.validate(&tok(json!({"nbf": NOW + 30})), NOW).is_ok());
        assert_eq!(
            v.validate(&tok(json!({"nbf": NOW + 31})), NOW),
            Err(JwtError::NotYetValid)
        );
    }

    #[test]
    fn issuer_and_audience() {
        let v = validator(json!({
            "alg": "HS256", "secret": "s3cret",
            "issuer": "https://issuer.example", "audience": "cdn"
        }));
        let tok = |c: Value| mint("HS256", json!({}), c, b"s3cret");
        let iss = "https://issuer.example";
        assert!(
            v.validate(&tok(json!({"iss": iss, "aud": "cdn"})), NOW)
                .is_ok()
        );
        assert!(
            v.validate(&tok(json!({"iss": iss, "aud": ["x", "cdn"]})), NOW)
                .is_ok()
        );
        assert_eq!(
            v.validate(&tok(json!({"iss": iss, "aud": ["x"]})), NOW),
            Err(JwtError::WrongAudience)
        );
        assert_eq!(
            v.validate(&tok(json!({"iss": iss})), NOW),
            Err(JwtError::WrongAudience)
        );
        assert_eq!(
            v.validate(&tok(json!({"iss": "evil", "aud": "cdn"})), NOW),
            Err(JwtError::WrongIssuer)
        );
        assert_eq!(
            v.validate(&tok(json!({"aud": "cdn"})), NOW),
            Err(JwtError::WrongIssuer)
        );

        let v = validator(json!({"alg": "HS256", "secret": "s3cret", "audience": ["a", "b"]}));
        assert!(v.validate(&tok(json!({"aud": "b"})), NOW).is_ok());
    }

    #[test]
    fn sub_must_be_a_header_value() {
        let t = mint(
            "HS256",
            json!({}),
            json!({"sub": "a\r\nx-admin: 1"}),
            b"s3cret",
        );
        assert_eq!(hs().validate(&t, NOW), Err(JwtError::BadClaims));
        let t = mint("HS256", json!({}), json!({"sub": 42}), b"s3cret");
        assert_eq!(hs().validate(&t, NOW), Err(JwtError::BadClaims));
    }

    /// A 1024-bit modulus.
    const SMALL_N: &str = "w8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDwwE";

    #[test]
    fn config_errors() {
        assert!(config_err(json!({"alg": "none"})).contains("not supported"));
        assert!(config_err(json!({"alg": "HS512", "secret": "x"})).contains("not supported"));
        assert!(config_err(json!({"alg": "HS256"})).contains("needs a secret"));
        assert!(config_err(json!({"alg": "HS256", "secret": ""})).contains("empty"));
        assert!(config_err(json!({"alg": "RS256"})).contains("needs jwks"));
        assert!(
            config_err(json!({"alg": "RS256", "secret": "x", "jwks": JWKS}))
                .contains("not a secret")
        );
        assert!(
            config_err(json!({"alg": "RS256", "jwks": {"keys": []}}))
                .contains("no RSA signing key")
        );
        assert!(config_err(json!({"alg": "ES256", "jwks": {"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}})).contains("invalid x"));
        assert!(config_err(json!({"alg": "RS256", "jwks": {"keys": [{"kty": "RSA", "n": SMALL_N, "e": "AQAB"}]}})).contains("2048"));
        assert!(config_err(json!({"alg": "RS256", "jwks": "{"})).contains("jwks"));
        let e =
            serde_json::from_value::<Config>(json!({"alg": "HS256", "secret": "x", "aud": "y"}))
                .unwrap_err();
        assert!(e.to_string().contains("unknown field"));
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer   abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer"), None);
    }
}
