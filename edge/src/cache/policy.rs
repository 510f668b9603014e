//! HTTP caching policy for Meridian's **shared** cache.
//!
//! This module is pure: it performs no I/O and never reads a clock. Every
//! instant is passed in as a [`SystemTime`] (`now`, `request_time`,
//! `response_time`) and every span is a [`Duration`]. HTTP dates have
//! one-second resolution, so all internal arithmetic is done in whole unix
//! seconds (`i64`), saturating instead of overflowing.
//!
//! # Coverage
//!
//! | Area | Spec | Submodule |
//! |------|------|-----------|
//! | `Cache-Control` parsing (request and response) | RFC 9111 §1.2.2, §4.2.1, §5.2 | [`directives`] |
//! | `CDN-Cache-Control`, `Meridian-Cache-Control` | RFC 9213, RFC 8941 dictionaries | [`targeted`] |
//! | Storability for a shared cache | RFC 9111 §3, §3.1, §3.5, §5.2.2.3 | [`storability`](mod@storability) |
//! | Freshness lifetime and heuristics | RFC 9111 §4.2.1, §4.2.2 | [`freshness`] |
//! | Age calculation, `Age` field | RFC 9111 §4.2.3, §5.1 | [`age`] |
//! | Reuse decision, stale serving | RFC 9111 §4.2.4, §5.2.1, §5.2.2; RFC 5861; RFC 8246 | [`lookup`](mod@lookup) |
//! | Conditional requests, 304 handling, freshening | RFC 9110 §13, §15.4.5; RFC 9111 §3.2, §4.3 | [`conditional`] |
//! | `Vary` secondary keys | RFC 9111 §4.1 | [`vary`] |
//! | Invalidation after unsafe methods | RFC 9111 §4.4 | [`invalidation`] |
//! | `Cache-Status` | RFC 9211 (RFC 8941 serialisation) | [`cache_status`] |
//! | Cache key normalisation | RFC 3986 §6.2.2, §6.2.3 | [`key`] |
//! | `Surrogate-Key` / `Cache-Tag` | de-facto (Fastly, Cloudflare) | [`surrogate`] |
//! | HTTP-date parsing/formatting | RFC 9110 §5.6.7 | [`date`] |
//!
//! # Choices where the RFCs leave latitude
//!
//! * **Duplicate / invalid freshness directives** (RFC 9111 §4.2.1 "either
//!   the first occurrence should be used or the response should be considered
//!   stale"): Meridian considers the response **stale**. A `max-age` or
//!   `s-maxage` that is repeated with different values, has no value, a
//!   non-integer value, or whitespace around `=` (not in the §5.2 grammar) is
//!   recorded as `0` with
//!   [`ResponseDirectives::freshness_conflict`] set. This also suppresses
//!   heuristic freshness and the per-site default TTL (the origin *did* try to
//!   say something). Repeated `Expires` lines with different values, or an
//!   unparseable `Expires` (e.g. `0`), likewise mean "already expired".
//! * Other duplicated directives take the most restrictive value: the minimum
//!   of `stale-while-revalidate` / `stale-if-error` (an invalid occurrence
//!   drops the allowance) / request `max-age` /
//!   `max-stale`, the maximum of `min-fresh`, and the union of the field names
//!   of qualified `no-cache` / `private` (an unqualified occurrence wins).
//! * A restrictive directive that is syntactically broken (`no-store junk`,
//!   `private="unterminated`) is still honoured (unqualified); a permissive one
//!   (`public`, `immutable`) that is broken is ignored.
//! * Qualified `no-cache="f"` is implemented (the response may be reused
//!   without revalidation if the named fields are omitted, see
//!   [`lookup::headers_to_omit_on_reuse`]); qualified `private="f"` makes the
//!   response storable once the named fields are removed (see
//!   [`storability::prepare_headers_for_storage`]). An empty list (`no-cache=""`)
//!   is treated as the unqualified form.
//! * **Targeted fields** (RFC 9213): precedence is `Meridian-Cache-Control` >
//!   `CDN-Cache-Control` > `Cache-Control`. Targeted fields are parsed strictly
//!   as RFC 8941 dictionaries; an empty or unparseable targeted field is ignored
//!   as if absent. When one is used, `Cache-Control` **and `Expires`** are
//!   ignored for this cache. `Meridian-Cache-Control` is always stripped before
//!   forwarding downstream; `CDN-Cache-Control` is targeted at every CDN in a
//!   chain, so it is only stripped when [`PolicyConfig::strip_cdn_cache_control`]
//!   is set.
//! * **POST is never cached** (RFC 9110 §9.3.3 allows it only with explicit
//!   freshness and a `Content-Location` equal to the target URI, and such a
//!   response can only serve later GETs of that URI; not worth the risk).
//!   HEAD responses are storable; the cache layer must not serve a GET from a
//!   stored HEAD response (key by method or upgrade HEAD misses to GET).
//! * **206 is never stored**: Meridian stores complete representations only
//!   and serves ranges from them; 304 is never stored (it updates, §4.3.4).
//! * **Stale serving** is prohibited by `must-revalidate`, `proxy-revalidate`,
//!   unqualified `no-cache` and (for a shared cache) `s-maxage`, which
//!   "incorporates the semantics of proxy-revalidate" (RFC 9111 §5.2.2.10).
//!   This applies to client `max-stale`, `stale-while-revalidate` and
//!   `stale-if-error` alike, including origin-sent `stale-if-error`: RFC 5861
//!   §4 says stale-if-error applies "regardless of other freshness
//!   information", but must-revalidate is not freshness information and RFC
//!   9111 §5.2.2.2 says a cache "MUST NOT ignore the must-revalidate directive"
//!   even when disconnected; §4.2.1 says conflicting directives resolve to the
//!   most restrictive. The one knob is
//!   [`PolicyConfig::s_maxage_allows_origin_stale`] (default `false`), which
//!   lets *origin-sent* `stale-while-revalidate`/`stale-if-error` coexist with
//!   `s-maxage` (the common `s-maxage=60, stale-while-revalidate=30` pattern).
//! * Per-site stale defaults ([`PolicyConfig::default_stale_while_revalidate`],
//!   [`PolicyConfig::default_stale_if_error`], like Varnish grace) apply per
//!   directive: each default is used only when the origin did not send that
//!   directive. They never override the prohibitions above.
//! * Windows are half-open: a response is fresh while `age < lifetime`
//!   (RFC 9111 §4.2 `freshness_lifetime > current_age`) and stale-serving
//!   windows likewise require `staleness < window`.
//! * `immutable` (RFC 8246): while fresh, a client `no-cache` or `max-age`
//!   does not force revalidation.
//! * Heuristic freshness (§4.2.2) requires a heuristically cacheable status or
//!   `public`, no explicit expiration, and a `Last-Modified` not later than
//!   `Date`: `percent`% (default 10) of `Date - Last-Modified`, capped
//!   (default 1 day). The per-site default TTL is applied only when none of
//!   explicit or Last-Modified heuristics apply but heuristics are allowed.
//! * `Pragma` is ignored (deprecated by RFC 9111 §5.4).
//! * `Age` (§5.1): of a list value or several field lines the first member is
//!   used; if that member is invalid the field is ignored (as if absent, 0);
//!   overflow saturates at 2^31.
//! * HTTP dates: the three RFC 9110 formats are accepted; day, month and zone
//!   names match case-insensitively (RFC 9111 §4.2), and a zone other than
//!   GMT is invalid; weekday names must
//!   be valid but are not checked against the date; two-digit rfc850 years
//!   follow the RFC's "more than 50 years in the future" rule relative to the
//!   supplied reference instant.
//! * Left to the caller: body completeness (§3.3/§3.4 incomplete responses),
//!   request coalescing (the "one background revalidation" for SWR is
//!   signalled here, deduplicated by the caller), and `Set-Cookie` handling,
//!   which no RFC mandates for shared caches.

pub mod age;
pub mod cache_status;
pub mod conditional;
pub mod date;
pub mod directives;
pub mod freshness;
pub mod invalidation;
pub mod key;
pub mod lookup;
pub mod storability;
pub mod surrogate;
pub mod targeted;
pub mod vary;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, StatusCode};

pub use age::{AgeCalculation, age_header_value, age_value, calculate_age, current_age};
pub use cache_status::{CacheStatus, FwdReason};
pub use conditional::{
    ConditionalResult, evaluate_client_conditionals, freshen_stored_response,
    if_none_match_for_variants, if_range_matches, merge_not_modified_headers,
    not_modified_response_headers, revalidation_request_headers, select_stored_for_update,
};
pub use date::{fmt_http_date, parse_http_date};
pub use directives::{
    DELTA_SECONDS_CAP, FieldScope, MaxStale, RequestDirectives, ResponseDirectives,
};
pub use freshness::{Freshness, FreshnessSource, freshness_lifetime};
pub use invalidation::{
    invalidation_targets, is_safe_method, post_response_reusable, resolve_reference,
};
pub use key::{KeyOptions, cache_key_for_uri, normalize_cache_key};
pub use lookup::{
    Lookup, MissAction, RevalidateReason, UpstreamFailure, headers_to_omit_on_reuse, lookup,
    may_serve_stale_on_error, on_miss,
};
pub use storability::{
    Storability, UncacheableReason, is_heuristically_cacheable, prepare_headers_for_storage,
    storability,
};
pub use surrogate::{SurrogateKeyLimits, surrogate_keys};
pub use targeted::{
    DirectiveSource, EffectivePolicy, MERIDIAN_CACHE_CONTROL, effective_response_directives,
    headers_to_strip_downstream,
};
pub use vary::{VarySpec, secondary_key, vary_matches, vary_spec};

/// Per-site caching policy knobs. `Default` is the RFC-strict configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    /// TTL used when the origin sends no freshness information at all and
    /// heuristic caching is allowed (like Varnish `default_ttl`). `None`
    /// means such responses are stored already stale.
    pub default_ttl: Option<Duration>,
    /// Percentage of `Date - Last-Modified` used as heuristic freshness
    /// (RFC 9111 §4.2.2 suggests 10). `0` disables Last-Modified heuristics.
    pub heuristic_percent: u8,
    /// Upper bound for heuristic freshness.
    pub heuristic_max: Duration,
    /// `stale-while-revalidate` window used when the origin sends none.
    pub default_stale_while_revalidate: Option<Duration>,
    /// `stale-if-error` window used when the origin sends none.
    pub default_stale_if_error: Option<Duration>,
    /// How stale a response may be served when the origin cannot be reached
    /// at all (refused, reset, timed out), with no directive needed: RFC 9111
    /// §4.2.4 allows it while disconnected, unless `must-revalidate`,
    /// `proxy-revalidate`, `no-cache` or `s-maxage` forbid stale responses.
    /// An origin that answers (even 5xx) is not unreachable.
    pub stale_if_unreachable: Option<Duration>,
    /// Honour request `Cache-Control: no-cache` (force revalidation).
    /// Many CDNs ignore it to protect origins; the RFC default is `true`.
    pub honor_request_no_cache: bool,
    /// Let origin-sent `stale-while-revalidate` / `stale-if-error` apply even
    /// though `s-maxage` implies `proxy-revalidate` (RFC 9111 §5.2.2.10).
    pub s_maxage_allows_origin_stale: bool,
    /// Strip `CDN-Cache-Control` from responses sent downstream when this
    /// cache consumed it.
    pub strip_cdn_cache_control: bool,
    /// Strip `Surrogate-Key` and `Cache-Tag` from responses sent downstream.
    pub strip_surrogate_keys: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            default_ttl: None,
            heuristic_percent: 10,
            heuristic_max: Duration::from_secs(86_400),
            default_stale_while_revalidate: None,
            default_stale_if_error: None,
            stale_if_unreachable: None,
            honor_request_no_cache: true,
            s_maxage_allows_origin_stale: false,
            strip_cdn_cache_control: false,
            strip_surrogate_keys: true,
        }
    }
}

/// Errors reported by the policy helpers that take URIs or host names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The URI lacks a scheme or authority where an absolute URI is needed.
    #[error("URI is not absolute (scheme and authority required): {0:?}")]
    RelativeUri(String),
    /// The scheme is empty or contains characters not allowed by RFC 3986.
    #[error("invalid URI scheme: {0:?}")]
    InvalidScheme(String),
    /// The host is empty or contains characters not allowed in a host.
    #[error("invalid host: {0:?}")]
    InvalidHost(String),
    /// The port is not a decimal number in 0..=65535.
    #[error("invalid port: {0:?}")]
    InvalidPort(String),
}

/// A response held by the cache plus the timing data RFC 9111 §4.2.3 needs.
#[derive(Debug, Clone)]
pub struct StoredResponse {
    /// Status code of the stored response.
    pub status: StatusCode,
    /// Stored header fields (after [`prepare_headers_for_storage`]).
    pub headers: HeaderMap,
    /// When the request that produced this response was sent upstream.
    pub request_time: SystemTime,
    /// When the response (header section) was received.
    pub response_time: SystemTime,
}

/// Whole seconds since the unix epoch (negative before 1970).
fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => {
            let d = e.duration();
            // Round towards negative infinity for sub-second pre-epoch values.
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            if d.subsec_nanos() > 0 {
                secs.saturating_add(1).saturating_neg()
            } else {
                secs.saturating_neg()
            }
        }
    }
}

/// The instant `secs` seconds after (or before) the unix epoch.
fn from_unix_secs(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Non-negative difference `a - b` in seconds as a `Duration`.
fn secs_between(later: i64, earlier: i64) -> Duration {
    let diff = later.saturating_sub(earlier);
    Duration::from_secs(u64::try_from(diff).unwrap_or(0))
}

/// Splits a field value at `sep` where it stands outside quoted strings
/// (RFC 9110 §5.6.4); the pieces are neither trimmed nor filtered.
fn split_unquoted(value: &[u8], sep: u8) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let (mut start, mut in_quote, mut escaped) = (0, false, false);
    for (i, &b) in value.iter().enumerate() {
        if in_quote {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_quote = false;
            }
        } else if b == b'"' {
            in_quote = true;
        } else if b == sep {
            out.push(&value[start..i]);
            start = i + 1;
        }
    }
    out.push(&value[start..]);
    out
}

/// Splits a comma-separated list field value into trimmed, non-empty
/// elements, ignoring commas inside quoted strings (RFC 9110 §5.6.1).
fn split_list(value: &[u8]) -> Vec<&[u8]> {
    split_unquoted(value, b',')
        .into_iter()
        .map(trim_ows)
        .filter(|e| !e.is_empty())
        .collect()
}

/// All list elements of every field line named `name`.
fn list_elements<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Vec<&'a [u8]> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| split_list(v.as_bytes()))
        .collect()
}

/// Trims optional whitespace (SP / HTAB) from both ends.
fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parses the first field line of `name` as an HTTP-date.
fn header_date(headers: &HeaderMap, name: &HeaderName, reference: SystemTime) -> Option<i64> {
    let value = headers.get(name)?;
    parse_http_date(value.as_bytes(), reference).map(unix_secs)
}

#[cfg(test)]
mod test_support {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use http::{HeaderMap, HeaderName, HeaderValue};

    /// Fixed base clock for tests: 2024-01-01T00:00:00Z.
    pub const BASE: u64 = 1_704_067_200;

    /// `BASE + offset` seconds.
    pub fn at(offset: i64) -> SystemTime {
        if offset >= 0 {
            UNIX_EPOCH + Duration::from_secs(BASE + offset.unsigned_abs())
        } else {
            UNIX_EPOCH + Duration::from_secs(BASE - offset.unsigned_abs())
        }
    }

    /// IMF-fixdate for `BASE + offset`.
    pub fn date(offset: i64) -> String {
        super::fmt_http_date(at(offset))
    }

    /// Builds a header map; repeated names become multiple field lines.
    pub fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).expect("test header name"),
                HeaderValue::from_str(v).expect("test header value"),
            );
        }
        map
    }

    pub fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_list_respects_quotes_and_skips_empty_elements() {
        let parts = split_list(br#" a, ,"b,c" , d=",", "#);
        assert_eq!(parts, vec![&b"a"[..], br#""b,c""#, br#"d=",""#]);
    }

    #[test]
    fn unix_secs_roundtrip_before_and_after_epoch() {
        for s in [-86_400_i64, -1, 0, 1, 1_704_067_200] {
            assert_eq!(unix_secs(from_unix_secs(s)), s);
        }
        let pre = UNIX_EPOCH - Duration::from_millis(500);
        assert_eq!(unix_secs(pre), -1);
    }

    #[test]
    fn default_config_is_rfc_strict() {
        let c = PolicyConfig::default();
        assert_eq!(c.heuristic_percent, 10);
        assert_eq!(c.heuristic_max, Duration::from_secs(86_400));
        assert!(c.honor_request_no_cache);
        assert!(!c.s_maxage_allows_origin_stale);
        assert!(c.default_ttl.is_none());
    }
}
