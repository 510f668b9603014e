//! Primary cache key normalisation.
//!
//! `normalize_cache_key` produces `scheme://host[:port]path[?query]`:
//!
//! * scheme and host are lowercased (RFC 3986 §6.2.2.1); the default port
//!   (80 for http, 443 for https) and an empty port are dropped (§6.2.3);
//!   IPv6 literals keep their brackets;
//! * an empty path becomes `/`; hex digits in percent-encodings are
//!   uppercased (§6.2.2.1). Nothing is percent-decoded and dot-segments are
//!   **not** removed: the origin receives the raw path, so folding
//!   `/a/../b` into `/b` in the key could serve one resource's response for
//!   another (cache poisoning / deception);
//! * fragments (`#...`) are dropped;
//! * query: empty `&`-separated parameters are dropped; parameters whose
//!   (percent-decoded) name matches [`KeyOptions::drop_params`] are removed
//!   (exact names, or prefixes written `utm_*`; case-sensitive); with
//!   [`KeyOptions::sort_query`] parameters are stably sorted by name, so
//!   repeated names keep their relative order; an empty query drops the `?`.
//!
//! The function is idempotent on its own output.

use http::Uri;

use super::PolicyError;

/// Per-site key options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyOptions {
    /// Sort query parameters by name.
    pub sort_query: bool,
    /// Parameter names to drop: exact, or a prefix when ending in `*`.
    pub drop_params: Vec<String>,
}

/// Normalises key components; see the module docs.
pub fn normalize_cache_key(
    scheme: &str,
    host: &str,
    path: &str,
    query: Option<&str>,
    opts: &KeyOptions,
) -> Result<String, PolicyError> {
    let scheme = normalize_scheme(scheme)?;
    let authority = normalize_authority(&scheme, host)?;
    let path = path.split('#').next().unwrap_or("");
    let mut out = format!("{scheme}://{authority}");
    if !path.starts_with('/') {
        out.push('/');
    }
    out.push_str(&normalize_pct(path));
    if let Some(q) = query {
        let q = q.split('#').next().unwrap_or("");
        let q = normalize_query(q, opts);
        if !q.is_empty() {
            out.push('?');
            out.push_str(&q);
        }
    }
    Ok(out)
}

/// Key for `uri`; origin-form URIs take the host from `host_header` and the
/// scheme from `default_scheme`.
pub fn cache_key_for_uri(
    uri: &Uri,
    host_header: Option<&str>,
    default_scheme: &str,
    opts: &KeyOptions,
) -> Result<String, PolicyError> {
    let scheme = uri.scheme_str().unwrap_or(default_scheme);
    let host = match uri.authority() {
        Some(a) => a.as_str().to_owned(),
        None => host_header
            .ok_or_else(|| PolicyError::RelativeUri(uri.to_string()))?
            .to_owned(),
    };
    normalize_cache_key(scheme, &host, uri.path(), uri.query(), opts)
}

fn normalize_scheme(scheme: &str) -> Result<String, PolicyError> {
    let mut chars = scheme.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if valid {
        Ok(scheme.to_ascii_lowercase())
    } else {
        Err(PolicyError::InvalidScheme(scheme.to_owned()))
    }
}

fn normalize_authority(scheme: &str, authority: &str) -> Result<String, PolicyError> {
    let bad_host = || PolicyError::InvalidHost(authority.to_owned());
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (inner, after) = rest.split_once(']').ok_or_else(bad_host)?;
        if inner.is_empty()
            || !inner
                .chars()
                .all(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '.'))
        {
            return Err(bad_host());
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(bad_host)?),
        };
        (format!("[{}]", inner.to_ascii_lowercase()), port)
    } else {
        let (h, p) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        let ok = !h.is_empty()
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=%".contains(c));
        if !ok {
            return Err(bad_host());
        }
        (h.to_ascii_lowercase(), p)
    };
    let port = match port {
        None | Some("") => None,
        Some(p) => {
            if p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(PolicyError::InvalidPort(p.to_owned()));
            }
            let n: u32 = p
                .parse()
                .map_err(|_| PolicyError::InvalidPort(p.to_owned()))?;
            let n = u16::try_from(n).map_err(|_| PolicyError::InvalidPort(p.to_owned()))?;
            Some(n)
        }
    };
    let default = match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    };
    Ok(match port {
        Some(p) if Some(p) != default => format!("{host}:{p}"),
        _ => host,
    })
}

/// Uppercases the hex digits of valid percent-encodings.
fn normalize_pct(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && b[i + 1].is_ascii_hexdigit()
            && b[i + 2].is_ascii_hexdigit()
        {
            out.push('%');
            out.push(char::from(b[i + 1].to_ascii_uppercase()));
            out.push(char::from(b[i + 2].to_ascii_uppercase()));
            i += 3;
        } else {
            let ch_len = s[i..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&s[i..i + ch_len]);
            i += ch_len;
        }
    }
    out
}

fn pct_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn param_dropped(name: &[u8], opts: &KeyOptions) -> bool {
    opts.drop_params
        .iter()
        .any(|pat| match pat.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix.as_bytes()),
            None => name == pat.as_bytes(),
        })
}

fn normalize_query(q: &str, opts: &KeyOptions) -> String {
    let mut params: Vec<(Vec<u8>, String)> = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let name = p.split('=').next().unwrap_or("");
            (pct_decode(name), normalize_pct(p))
        })
        .filter(|(name, _)| !param_dropped(name, opts))
        .collect();
    if opts.sort_query {
        params.sort_by(|a, b| a.0.cmp(&b.0));
    }
    params
        .into_iter()
        .map(|(_, p)| p)
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn k(scheme: &str, host: &str, path: &str, query: Option<&str>, opts: &KeyOptions) -> String {
        normalize_cache_key(scheme, host, path, query, opts).expect("valid")
    }

    fn plain(scheme: &str, host: &str, path: &str, query: Option<&str>) -> String {
        k(scheme, host, path, query, &KeyOptions::default())
    }

    fn drop(p: &[&str], sort: bool) -> KeyOptions {
        KeyOptions {
            sort_query: sort,
            drop_params: p.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn rfc3986_6_2_2_1_scheme_and_host_lowercased() {
        assert_eq!(
            plain("HTTPS", "ExAmple.COM", "/A", None),
            "https://example.com/A"
        );
    }

    #[test]
    fn rfc3986_6_2_3_default_ports_dropped_others_kept() {
        assert_eq!(plain("http", "a.com:80", "/", None), "http://a.com/");
        assert_eq!(plain("https", "a.com:443", "/", None), "https://a.com/");
        assert_eq!(plain("https", "a.com:80", "/", None), "https://a.com:80/");
        assert_eq!(plain("http", "a.com:", "/", None), "http://a.com/");
        assert_eq!(plain("http", "a.com:0080", "/", None), "http://a.com/");
    }

    #[test]
    fn ipv6_literals_keep_brackets() {
        assert_eq!(plain("http", "[::1]:8080", "/", None), "http://[::1]:8080/");
        assert_eq!(
            plain("https", "[2001:DB8::1]:443", "/", None),
            "https://[2001:db8::1]/"
        );
    }

    #[test]
    fn invalid_hosts_ports_and_schemes_rejected() {
        let o = KeyOptions::default();
        assert!(matches!(
            normalize_cache_key("http", "", "/", None, &o),
            Err(PolicyError::InvalidHost(_))
        ));
        assert!(matches!(
            normalize_cache_key("http", "a b", "/", None, &o),
            Err(PolicyError::InvalidHost(_))
        ));
        assert!(matches!(
            normalize_cache_key("http", "u@h", "/", None, &o),
            Err(PolicyError::InvalidHost(_))
        ));
        assert!(matches!(
            normalize_cache_key("http", "h:99999", "/", None, &o),
            Err(PolicyError::InvalidPort(_))
        ));
        assert!(matches!(
            normalize_cache_key("http", "h:8x", "/", None, &o),
            Err(PolicyError::InvalidPort(_))
        ));
        assert!(matches!(
            normalize_cache_key("1http", "h", "/", None, &o),
            Err(PolicyError::InvalidScheme(_))
        ));
        assert!(matches!(
            normalize_cache_key("http", "[zz]", "/", None, &o),
            Err(PolicyError::InvalidHost(_))
        ));
    }

    #[test]
    fn empty_path_becomes_slash_and_dot_segments_are_kept() {
        assert_eq!(plain("http", "h", "", None), "http://h/");
        assert_eq!(plain("http", "h", "/a/../b", None), "http://h/a/../b");
    }

    #[test]
    fn rfc3986_6_2_2_1_percent_encoding_hex_uppercased_not_decoded() {
        assert_eq!(
            plain("http", "h", "/a%2fb%7e", Some("q=%c3%a9")),
            "http://h/a%2Fb%7E?q=%C3%A9"
        );
        assert_eq!(plain("http", "h", "/100%", None), "http://h/100%");
    }

    #[test]
    fn fragments_and_empty_query_dropped() {
        assert_eq!(plain("http", "h", "/p#frag", Some("")), "http://h/p");
        assert_eq!(plain("http", "h", "/p", Some("a=1#f")), "http://h/p?a=1");
        assert_eq!(plain("http", "h", "/p", Some("&&a=1&")), "http://h/p?a=1");
    }

    #[test]
    fn query_order_preserved_unless_sorting_enabled() {
        assert_eq!(
            plain("http", "h", "/", Some("b=2&a=1")),
            "http://h/?b=2&a=1"
        );
        assert_eq!(
            k("http", "h", "/", Some("b=2&a=1&a=0"), &drop(&[], true)),
            "http://h/?a=1&a=0&b=2"
        );
    }

    #[test]
    fn drop_params_exact_and_prefix_patterns() {
        let o = drop(&["fbclid", "utm_*"], false);
        assert_eq!(
            k(
                "http",
                "h",
                "/",
                Some("utm_source=x&id=1&fbclid=z&utm_medium=y&fbclid2=k"),
                &o
            ),
            "http://h/?id=1&fbclid2=k"
        );
        assert_eq!(k("http", "h", "/", Some("utm_source=x"), &o), "http://h/");
        // Names are matched after percent-decoding, case-sensitively.
        assert_eq!(
            k("http", "h", "/", Some("utm%5Fx=1&UTM_y=2"), &o),
            "http://h/?UTM_y=2"
        );
    }

    #[test]
    fn cache_key_for_origin_form_uses_host_header() {
        let uri: Uri = "/p?b=1".parse().expect("uri");
        assert_eq!(
            cache_key_for_uri(
                &uri,
                Some("Example.com:443"),
                "https",
                &KeyOptions::default()
            )
            .expect("key"),
            "https://example.com/p?b=1"
        );
        assert!(cache_key_for_uri(&uri, None, "https", &KeyOptions::default()).is_err());
        let abs: Uri = "http://H:8080/x".parse().expect("uri");
        assert_eq!(
            cache_key_for_uri(&abs, Some("ignored"), "https", &KeyOptions::default()).expect("key"),
            "http://h:8080/x"
        );
    }

    fn split_key(key: &str) -> (String, String, String, Option<String>) {
        let (scheme, rest) = key.split_once("://").expect("scheme");
        let slash = rest.find('/').expect("path");
        let (host, pq) = rest.split_at(slash);
        let (path, query) = match pq.split_once('?') {
            Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
            None => (pq.to_owned(), None),
        };
        (scheme.to_owned(), host.to_owned(), path, query)
    }

    proptest! {
        #[test]
        fn prop_normaliser_never_panics(
            scheme in "\\PC{0,8}", host in "\\PC{0,24}", path in "\\PC{0,40}", query in proptest::option::of("\\PC{0,40}"),
            sort in any::<bool>(),
        ) {
            let opts = drop(&["utm_*", "x", "*"], sort);
            let _ = normalize_cache_key(&scheme, &host, &path, query.as_deref(), &opts);
        }

        #[test]
        fn prop_normaliser_is_idempotent(
            host in "[a-zA-Z0-9.-]{1,12}(:[0-9]{0,5})?", path in "[/a-zA-Z0-9%._~-]{0,30}",
            query in proptest::option::of("[a-zA-Z0-9%=&_]{0,40}"), sort in any::<bool>(),
        ) {
            let opts = drop(&["utm_*", "drop"], sort);
            if let Ok(once) = normalize_cache_key("HTTP", &host, &path, query.as_deref(), &opts) {
                let (s, h, p, q) = split_key(&once);
                let twice = normalize_cache_key(&s, &h, &p, q.as_deref(), &opts).expect("re-normalise");
                prop_assert_eq!(once, twice);
            }
        }
    }
}
