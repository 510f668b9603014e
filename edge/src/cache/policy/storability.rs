//! Whether a response may be stored by a shared cache (RFC 9111 §3).

use http::{
    HeaderMap, HeaderName, Method, StatusCode,
    header::{AUTHORIZATION, CONNECTION, EXPIRES},
};

use super::directives::{FieldScope, RequestDirectives};
use super::targeted::effective_response_directives;
use super::vary::{VarySpec, vary_spec};
use super::{list_elements, trim_ows};

/// Outcome of [`storability`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storability {
    /// The response may be stored.
    Storable {
        /// Unqualified `no-cache`: every reuse needs successful validation.
        revalidate_each_use: bool,
    },
    /// The response must not be stored.
    NotStorable(UncacheableReason),
}

impl Storability {
    /// Whether the response may be stored.
    pub fn is_storable(self) -> bool {
        matches!(self, Storability::Storable { .. })
    }
}

/// Why a response is not storable; [`UncacheableReason::as_str`] gives a
/// stable metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum UncacheableReason {
    /// Request method is not GET or HEAD.
    Method,
    /// 1xx status (not a final response).
    StatusNotFinal,
    /// 206 Partial Content: Meridian stores complete responses only.
    PartialContent,
    /// 304 Not Modified updates a stored response; it is not stored itself.
    NotModified,
    /// `must-understand` with a status code we do not implement.
    StatusNotUnderstood,
    /// Request `Cache-Control: no-store`.
    NoStoreRequest,
    /// Response `no-store`.
    NoStoreResponse,
    /// Unqualified response `private`.
    Private,
    /// Request had `Authorization` and the response did not allow sharing.
    Authorization,
    /// `Vary: *`.
    VaryStar,
    /// Status not heuristically cacheable and no explicit freshness/`public`.
    NoExplicitFreshness,
}

impl UncacheableReason {
    /// Whether the reason lies in the request (its method, `no-store`,
    /// `Authorization`) rather than the response. Only the response's reasons
    /// say anything about what other clients' requests would get, so only
    /// they may set hit-for-pass.
    pub const fn from_request(self) -> bool {
        matches!(
            self,
            UncacheableReason::Method
                | UncacheableReason::NoStoreRequest
                | UncacheableReason::Authorization
        )
    }

    /// Stable label for metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            UncacheableReason::Method => "method",
            UncacheableReason::StatusNotFinal => "status-not-final",
            UncacheableReason::PartialContent => "partial-content",
            UncacheableReason::NotModified => "not-modified",
            UncacheableReason::StatusNotUnderstood => "status-not-understood",
            UncacheableReason::NoStoreRequest => "no-store-request",
            UncacheableReason::NoStoreResponse => "no-store-response",
            UncacheableReason::Private => "private",
            UncacheableReason::Authorization => "authorization",
            UncacheableReason::VaryStar => "vary-star",
            UncacheableReason::NoExplicitFreshness => "no-explicit-freshness",
        }
    }
}

/// Status codes defined as heuristically cacheable (RFC 9110 §15.1).
pub fn is_heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Status codes whose caching requirements Meridian implements (used for
/// `must-understand`, RFC 9111 §5.2.2.3). 206 is excluded because partial
/// responses are never stored.
fn understands_status(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200..=205 | 300..=303 | 307 | 308 | 400..=417 | 421 | 422 | 426 | 500..=505
    )
}

/// Decides storability of a response for a shared cache (RFC 9111 §3).
///
/// Checks, in this order (the first failure is reported): method; final
/// status; 206/304; `must-understand`; request `no-store`; response
/// `no-store` (ignored under `must-understand` with an understood status);
/// unqualified `private`; `Authorization` (§3.5: allowed only with `public`,
/// `s-maxage` or `must-revalidate`); `Vary: *`; and finally that the response
/// has explicit freshness (`max-age`, `s-maxage`, `Expires`), `public`, or a
/// heuristically cacheable status.
pub fn storability(
    method: &Method,
    req_headers: &HeaderMap,
    status: StatusCode,
    resp_headers: &HeaderMap,
) -> Storability {
    use UncacheableReason as R;
    let not = Storability::NotStorable;
    if method != Method::GET && method != Method::HEAD {
        return not(R::Method);
    }
    if status.is_informational() {
        return not(R::StatusNotFinal);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        return not(R::PartialContent);
    }
    if status == StatusCode::NOT_MODIFIED {
        return not(R::NotModified);
    }
    let policy = effective_response_directives(resp_headers);
    let d = &policy.directives;
    if d.must_understand && !understands_status(status) {
        return not(R::StatusNotUnderstood);
    }
    if RequestDirectives::from_headers(req_headers).no_store {
        return not(R::NoStoreRequest);
    }
    if d.no_store && !d.must_understand {
        return not(R::NoStoreResponse);
    }
    if d.private.is_all() {
        return not(R::Private);
    }
    if req_headers.contains_key(AUTHORIZATION)
        && !(d.public || d.s_maxage.is_some() || d.must_revalidate)
    {
        return not(R::Authorization);
    }
    if vary_spec(resp_headers) == VarySpec::Star {
        return not(R::VaryStar);
    }
    let explicit = d.has_explicit_max_age()
        || (policy.uses_expires() && resp_headers.contains_key(EXPIRES))
        || d.public;
    if !explicit && !is_heuristically_cacheable(status) {
        return not(R::NoExplicitFreshness);
    }
    Storability::Storable {
        revalidate_each_use: d.no_cache.is_all(),
    }
}

/// Hop-by-hop fields never stored (RFC 9110 §7.6.1; RFC 9111 §3.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Field names that must be removed before storing a response: hop-by-hop
/// fields, the proxy-specific fields RFC 9111 §3.1 names
/// (`Proxy-Authenticate`, `Proxy-Authentication-Info`,
/// `Proxy-Authorization`), fields named in `Connection`, and fields listed in
/// a qualified `private` (RFC 9111 §5.2.2.7). `Trailer` is kept (it
/// describes the body).
pub fn fields_excluded_from_storage(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut out: Vec<HeaderName> = HOP_BY_HOP
        .iter()
        .map(|n| HeaderName::from_static(n))
        .collect();
    out.push(HeaderName::from_static("proxy-authentication-info"));
    for elem in list_elements(headers, &CONNECTION) {
        if let Ok(name) = HeaderName::from_bytes(trim_ows(elem))
            && !out.contains(&name)
        {
            out.push(name);
        }
    }
    if let FieldScope::Fields(fields) = effective_response_directives(headers).directives.private {
        for f in fields {
            if !out.contains(&f) {
                out.push(f);
            }
        }
    }
    out
}

/// Removes every field from [`fields_excluded_from_storage`] in place.
pub fn prepare_headers_for_storage(headers: &mut HeaderMap) {
    for name in fields_excluded_from_storage(headers) {
        headers.remove(&name);
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::headers;
    use super::*;

    fn get(resp: &[(&str, &str)]) -> Storability {
        storability(
            &Method::GET,
            &HeaderMap::new(),
            StatusCode::OK,
            &headers(resp),
        )
    }

    fn reason(s: Storability) -> &'static str {
        match s {
            Storability::NotStorable(r) => r.as_str(),
            Storability::Storable { .. } => "storable",
        }
    }

    const STORABLE: Storability = Storability::Storable {
        revalidate_each_use: false,
    };

    #[test]
    fn rfc9111_3_get_200_without_directives_is_storable_heuristically() {
        assert_eq!(get(&[]), STORABLE);
    }

    #[test]
    fn rfc9111_3_only_get_and_head_are_stored_post_is_not() {
        let h = headers(&[("cache-control", "max-age=60"), ("content-location", "/x")]);
        for m in [Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS] {
            let s = storability(&m, &HeaderMap::new(), StatusCode::OK, &h);
            assert_eq!(reason(s), "method", "{m}");
        }
        let s = storability(&Method::HEAD, &HeaderMap::new(), StatusCode::OK, &h);
        assert_eq!(s, STORABLE);
    }

    #[test]
    fn rfc9111_3_heuristically_cacheable_statuses_need_no_explicit_freshness() {
        for code in [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501] {
            let status = StatusCode::from_u16(code).expect("status");
            let s = storability(&Method::GET, &HeaderMap::new(), status, &HeaderMap::new());
            assert!(s.is_storable(), "{code}");
        }
    }

    #[test]
    fn rfc9111_3_other_statuses_need_explicit_freshness_or_public() {
        for code in [302, 307, 400, 403, 500, 502, 503] {
            let status = StatusCode::from_u16(code).expect("status");
            let none = storability(&Method::GET, &HeaderMap::new(), status, &HeaderMap::new());
            assert_eq!(reason(none), "no-explicit-freshness", "{code}");
            for cc in [
                &[("cache-control", "max-age=5")][..],
                &[("cache-control", "s-maxage=5")][..],
                &[("cache-control", "public")][..],
                &[("expires", "Thu, 01 Jan 2099 00:00:00 GMT")][..],
            ] {
                let s = storability(&Method::GET, &HeaderMap::new(), status, &headers(cc));
                assert!(s.is_storable(), "{code} {cc:?}");
            }
        }
    }

    #[test]
    fn rfc9111_3_interim_206_and_304_not_stored() {
        let h = headers(&[("cache-control", "max-age=60")]);
        let r = |code| {
            reason(storability(
                &Method::GET,
                &HeaderMap::new(),
                StatusCode::from_u16(code).expect("status"),
                &h,
            ))
        };
        assert_eq!(r(103), "status-not-final");
        assert_eq!(r(206), "partial-content");
        assert_eq!(r(304), "not-modified");
    }

    #[test]
    fn rfc9111_5_2_2_5_response_no_store_prevents_storage() {
        assert_eq!(
            reason(get(&[("cache-control", "max-age=60, no-store")])),
            "no-store-response"
        );
    }

    #[test]
    fn rfc9111_5_2_1_5_request_no_store_prevents_storage() {
        let req = headers(&[("cache-control", "no-store")]);
        let s = storability(
            &Method::GET,
            &req,
            StatusCode::OK,
            &headers(&[("cache-control", "max-age=60")]),
        );
        assert_eq!(reason(s), "no-store-request");
    }

    #[test]
    fn rfc9111_5_2_2_3_must_understand_overrides_no_store_for_understood_status() {
        assert_eq!(
            get(&[("cache-control", "must-understand, no-store, max-age=60")]),
            STORABLE
        );
        let s = storability(
            &Method::GET,
            &HeaderMap::new(),
            StatusCode::from_u16(299).expect("status"),
            &headers(&[("cache-control", "must-understand, no-store, max-age=60")]),
        );
        assert_eq!(reason(s), "status-not-understood");
    }

    #[test]
    fn rfc9111_5_2_2_7_private_unqualified_not_storable_in_shared_cache() {
        assert_eq!(
            reason(get(&[("cache-control", "private, max-age=60")])),
            "private"
        );
    }

    #[test]
    fn rfc9111_5_2_2_7_private_qualified_is_storable_without_listed_fields() {
        let mut h = headers(&[
            ("cache-control", r#"private="x-user", max-age=60"#),
            ("x-user", "alice"),
            ("content-type", "text/plain"),
        ]);
        let s = storability(&Method::GET, &HeaderMap::new(), StatusCode::OK, &h);
        assert_eq!(s, STORABLE);
        prepare_headers_for_storage(&mut h);
        assert!(!h.contains_key("x-user"));
        assert!(h.contains_key("content-type"));
    }

    #[test]
    fn rfc9111_3_1_proxy_specific_fields_are_not_stored() {
        // "Effectively, this is limited to Proxy-Authenticate ...,
        // Proxy-Authentication-Info ..., and Proxy-Authorization".
        let mut h = headers(&[
            ("proxy-authenticate", "Basic"),
            ("proxy-authentication-info", "nextnonce=\"x\""),
            ("proxy-authorization", "Basic eA=="),
            ("authentication-info", "nextnonce=\"y\""),
        ]);
        prepare_headers_for_storage(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("authentication-info"));
    }

    #[test]
    fn rfc9111_3_5_authorization_requires_public_s_maxage_or_must_revalidate() {
        let req = headers(&[("authorization", "Bearer x")]);
        let s = |cc: &str| {
            storability(
                &Method::GET,
                &req,
                StatusCode::OK,
                &headers(&[("cache-control", cc)]),
            )
        };
        assert_eq!(reason(s("max-age=60")), "authorization");
        assert!(s("public, max-age=60").is_storable());
        assert!(s("s-maxage=60").is_storable());
        assert!(s("must-revalidate, max-age=60").is_storable());
    }

    #[test]
    fn rfc9111_5_2_2_4_no_cache_is_storable_but_revalidated_each_use() {
        assert_eq!(
            get(&[("cache-control", "no-cache, max-age=60")]),
            Storability::Storable {
                revalidate_each_use: true
            }
        );
        // Qualified no-cache does not force revalidation of the whole response.
        assert_eq!(
            get(&[("cache-control", r#"no-cache="set-cookie""#)]),
            STORABLE
        );
    }

    #[test]
    fn rfc9111_4_1_vary_star_not_storable() {
        assert_eq!(reason(get(&[("vary", "accept-encoding, *")])), "vary-star");
        assert_eq!(get(&[("vary", "accept-encoding")]), STORABLE);
    }

    #[test]
    fn rfc9213_targeted_field_governs_storability() {
        // CDN-Cache-Control says storable even though Cache-Control says no-store.
        assert_eq!(
            get(&[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=60")
            ]),
            STORABLE
        );
        // ... and vice versa.
        assert_eq!(
            reason(get(&[
                ("cache-control", "max-age=60"),
                ("cdn-cache-control", "private")
            ])),
            "private"
        );
        // Expires is ignored when a targeted field is used.
        let s = storability(
            &Method::GET,
            &HeaderMap::new(),
            StatusCode::FOUND,
            &headers(&[
                ("cdn-cache-control", "no-transform"),
                ("expires", "Thu, 01 Jan 2099 00:00:00 GMT"),
            ]),
        );
        assert_eq!(reason(s), "no-explicit-freshness");
    }

    #[test]
    fn rfc9111_3_1_hop_by_hop_and_connection_listed_fields_not_stored() {
        let mut h = headers(&[
            ("connection", "x-hop, close"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("etag", "\"a\""),
        ]);
        prepare_headers_for_storage(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("etag"));
    }

    #[test]
    fn uncacheable_reason_labels_are_distinct() {
        use UncacheableReason as R;
        let all = [
            R::Method,
            R::StatusNotFinal,
            R::PartialContent,
            R::NotModified,
            R::StatusNotUnderstood,
            R::NoStoreRequest,
            R::NoStoreResponse,
            R::Private,
            R::Authorization,
            R::VaryStar,
            R::NoExplicitFreshness,
        ];
        let labels: std::collections::HashSet<_> = all.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), all.len());
    }
}
