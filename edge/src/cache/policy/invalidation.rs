//! Invalidation after unsafe requests (RFC 9111 §4.4).
//!
//! A non-error response (2xx or 3xx) to an unsafe method (anything except
//! GET, HEAD, OPTIONS, TRACE — unknown methods are unsafe) invalidates the
//! target URI and, when same-origin, the URIs in `Location` and
//! `Content-Location`. Relative references are resolved against the target
//! URI (RFC 3986 §5.2); fragments are dropped.

use http::{
    HeaderMap, Method, StatusCode, Uri,
    header::{CONTENT_LOCATION, LOCATION},
    uri::{Authority, PathAndQuery, Scheme},
};

use super::PolicyError;

/// RFC 9110 §9.2.1 safe methods.
pub fn is_safe_method(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// Whether a response to a POST may be stored and reused for later GETs of
/// `target` (RFC 9110 §9.3.3): it has explicit freshness (`max-age`,
/// `s-maxage` or `Expires`) and a `Content-Location` that names the target
/// itself. The usual storability rules apply on top.
pub fn post_response_reusable(
    status: StatusCode,
    target: &Uri,
    resp_headers: &HeaderMap,
    response_time: std::time::SystemTime,
    config: &super::PolicyConfig,
) -> bool {
    use super::FreshnessSource as S;
    if !matches!(status.as_u16(), 200 | 203) {
        return false;
    }
    let Some(cl) = resp_headers
        .get(CONTENT_LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| resolve_reference(target, r))
    else {
        return false;
    };
    let same = same_origin(target, &cl)
        && cl.path_and_query().map(PathAndQuery::as_str)
            == target.path_and_query().map(PathAndQuery::as_str);
    let f = super::freshness_lifetime(status, resp_headers, response_time, config);
    same && matches!(f.source, S::SMaxAge | S::MaxAge | S::Expires) && !f.lifetime.is_zero()
}

/// URIs to invalidate after `method` on absolute `target` got `status`.
/// The target comes first; results are deduplicated. Errors if `target`
/// is not absolute.
pub fn invalidation_targets(
    method: &Method,
    status: StatusCode,
    target: &Uri,
    resp_headers: &HeaderMap,
) -> Result<Vec<Uri>, PolicyError> {
    if target.scheme().is_none() || target.authority().is_none() {
        return Err(PolicyError::RelativeUri(target.to_string()));
    }
    if is_safe_method(method) || !(status.is_success() || status.is_redirection()) {
        return Ok(Vec::new());
    }
    let mut out = vec![target.clone()];
    for name in [LOCATION, CONTENT_LOCATION] {
        let Some(value) = resp_headers.get(&name) else {
            continue;
        };
        let Ok(reference) = value.to_str() else {
            continue;
        };
        let Some(uri) = resolve_reference(target, reference) else {
            continue;
        };
        if same_origin(target, &uri) && !out.contains(&uri) {
            out.push(uri);
        }
    }
    Ok(out)
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// RFC 9110 §4.3.1 origin equality: scheme, host (case-insensitive) and
/// port (defaults applied).
pub fn same_origin(a: &Uri, b: &Uri) -> bool {
    let origin = |u: &Uri| {
        let scheme = u.scheme_str()?.to_ascii_lowercase();
        let host = u.host()?.to_ascii_lowercase();
        let port = u.port_u16().or_else(|| default_port(&scheme));
        Some((scheme, host, port))
    };
    matches!((origin(a), origin(b)), (Some(x), Some(y)) if x == y)
}

/// Resolves `reference` against absolute `base` (RFC 3986 §5.2.2), dropping
/// any fragment. `None` if the result is not a valid absolute URI.
pub fn resolve_reference(base: &Uri, reference: &str) -> Option<Uri> {
    let reference = reference.trim();
    let reference = reference.split('#').next().unwrap_or("");
    let base_scheme = base.scheme()?.clone();
    let base_authority = base.authority()?.clone();
    if has_scheme(reference) {
        let uri: Uri = reference.parse().ok()?;
        uri.authority()?;
        return rebuild(
            uri.scheme()?.clone(),
            uri.authority()?.clone(),
            uri.path(),
            uri.query(),
        );
    }
    if let Some(rest) = reference.strip_prefix("//") {
        let uri: Uri = format!("{}://{rest}", base_scheme.as_str()).parse().ok()?;
        return rebuild(
            base_scheme,
            uri.authority()?.clone(),
            uri.path(),
            uri.query(),
        );
    }
    let (ref_path, ref_query) = match reference.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (reference, None),
    };
    let base_path = base.path();
    let (path, query) = if ref_path.is_empty() {
        (base_path.to_owned(), ref_query.or(base.query()))
    } else if ref_path.starts_with('/') {
        (remove_dot_segments(ref_path), ref_query)
    } else {
        let dir = match base_path.rfind('/') {
            Some(i) => &base_path[..=i],
            None => "/",
        };
        (remove_dot_segments(&format!("{dir}{ref_path}")), ref_query)
    };
    rebuild(base_scheme, base_authority, &path, query)
}

fn has_scheme(s: &str) -> bool {
    let Some((scheme, _)) = s.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

fn rebuild(scheme: Scheme, authority: Authority, path: &str, query: Option<&str>) -> Option<Uri> {
    let path = if path.is_empty() { "/" } else { path };
    let pq = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let pq: PathAndQuery = pq.parse().ok()?;
    Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(pq)
        .build()
        .ok()
}

/// RFC 3986 §5.2.4.
fn remove_dot_segments(path: &str) -> String {
    let mut output: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => trailing_slash = i == last,
            ".." => {
                if output.len() > 1 {
                    output.pop();
                }
                trailing_slash = i == last;
            }
            s => {
                output.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = output.join("/");
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    if !out.starts_with('/') {
        out.insert(0, '/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::test_support::headers;
    use super::*;

    #[test]
    fn rfc9110_9_3_3_post_reusable_only_with_freshness_and_own_content_location() {
        let target: Uri = "https://a.test/form?x=1".parse().expect("uri");
        let now = std::time::SystemTime::now();
        let cfg = super::super::PolicyConfig::default();
        let ok = StatusCode::OK;
        let fresh_self = headers(&[
            ("cache-control", "max-age=60"),
            ("content-location", "/form?x=1"),
        ]);
        assert!(post_response_reusable(ok, &target, &fresh_self, now, &cfg));
        assert!(post_response_reusable(
            ok,
            &target,
            &headers(&[
                ("cache-control", "max-age=60"),
                ("content-location", "https://a.test/form?x=1")
            ]),
            now,
            &cfg
        ));
        for bad in [
            headers(&[("cache-control", "max-age=60")]),
            headers(&[
                ("cache-control", "max-age=60"),
                ("content-location", "/other"),
            ]),
            headers(&[
                ("cache-control", "max-age=60"),
                ("content-location", "https://b.test/form?x=1"),
            ]),
            headers(&[
                ("content-location", "/form?x=1"),
                ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
            ]),
            headers(&[
                ("cache-control", "max-age=0"),
                ("content-location", "/form?x=1"),
            ]),
        ] {
            assert!(
                !post_response_reusable(ok, &target, &bad, now, &cfg),
                "{bad:?}"
            );
        }
        assert!(!post_response_reusable(
            StatusCode::CREATED,
            &target,
            &fresh_self,
            now,
            &cfg
        ));
    }

    fn uri(s: &str) -> Uri {
        s.parse().expect("uri")
    }

    fn targets(method: Method, status: u16, h: &[(&str, &str)]) -> Vec<String> {
        invalidation_targets(
            &method,
            StatusCode::from_u16(status).expect("status"),
            &uri("https://example.com/a/b?x=1"),
            &headers(h),
        )
        .expect("absolute")
        .iter()
        .map(ToString::to_string)
        .collect()
    }

    #[test]
    fn rfc9111_4_4_unsafe_method_success_invalidates_target() {
        for m in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
            assert_eq!(targets(m, 200, &[]), ["https://example.com/a/b?x=1"]);
        }
        assert_eq!(targets(Method::POST, 303, &[]).len(), 1);
    }

    #[test]
    fn rfc9111_4_4_unknown_methods_are_unsafe() {
        let m = Method::from_bytes(b"PURGEISH").expect("method");
        assert_eq!(targets(m, 204, &[]).len(), 1);
    }

    #[test]
    fn rfc9111_4_4_safe_methods_and_error_responses_do_not_invalidate() {
        for m in [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE] {
            assert!(targets(m, 200, &[]).is_empty());
        }
        for s in [400, 404, 500, 503] {
            assert!(targets(Method::POST, s, &[]).is_empty());
        }
    }

    #[test]
    fn rfc9111_4_4_location_and_content_location_same_origin_only() {
        let t = targets(
            Method::POST,
            201,
            &[
                ("location", "/new/1"),
                ("content-location", "https://EXAMPLE.com:443/c"),
            ],
        );
        assert_eq!(
            t,
            [
                "https://example.com/a/b?x=1",
                "https://example.com/new/1",
                "https://EXAMPLE.com:443/c"
            ]
        );
        let t = targets(
            Method::POST,
            201,
            &[
                ("location", "https://evil.example/x"),
                ("content-location", "http://example.com/c"),
            ],
        );
        assert_eq!(t, ["https://example.com/a/b?x=1"]);
        let t = targets(
            Method::POST,
            201,
            &[("location", "https://example.com:8443/x")],
        );
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn rfc3986_5_2_relative_references_resolved() {
        let base = uri("http://h/a/b/c?q");
        let r = |s: &str| resolve_reference(&base, s).map(|u| u.to_string());
        assert_eq!(r("g").as_deref(), Some("http://h/a/b/g"));
        assert_eq!(r("./g/").as_deref(), Some("http://h/a/b/g/"));
        assert_eq!(r("../g").as_deref(), Some("http://h/a/g"));
        assert_eq!(r("../../../g").as_deref(), Some("http://h/g"));
        assert_eq!(r("?y").as_deref(), Some("http://h/a/b/c?y"));
        assert_eq!(r("").as_deref(), Some("http://h/a/b/c?q"));
        assert_eq!(r("#frag").as_deref(), Some("http://h/a/b/c?q"));
        assert_eq!(r("//other/x").as_deref(), Some("http://other/x"));
        assert_eq!(r("/x/./y/../z").as_deref(), Some("http://h/x/z"));
        assert_eq!(r("https://h2/p#f").as_deref(), Some("https://h2/p"));
    }

    #[test]
    fn relative_target_uri_is_an_error() {
        let e = invalidation_targets(
            &Method::POST,
            StatusCode::OK,
            &uri("/only/path"),
            &HeaderMap::new(),
        );
        assert!(matches!(e, Err(PolicyError::RelativeUri(_))));
    }

    #[test]
    fn rfc9110_4_3_1_same_origin_applies_default_ports() {
        assert!(same_origin(
            &uri("http://a.com/"),
            &uri("http://A.COM:80/x")
        ));
        assert!(!same_origin(&uri("http://a.com/"), &uri("https://a.com/")));
        assert!(!same_origin(
            &uri("http://a.com/"),
            &uri("http://a.com:8080/")
        ));
    }
}
