//! Host routing: which site answers a request's host.

use std::collections::HashMap;

pub use crate::config::{HostMatch, HostPattern};

/// Normalises a Host value: lower case, no port, no trailing dot.
pub fn normalize_host(host: &str) -> std::borrow::Cow<'_, str> {
    let h = if host.starts_with('[') {
        // IPv6 literal: keep the brackets, drop the port.
        host.split_once(']')
            .map_or(host, |(a, _)| &host[..a.len() + 1])
    } else {
        host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    let h = h.trim_end_matches('.');
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(h.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(h)
    }
}

/// Maps hosts to site indexes: exact names first, then the longest matching
/// wildcard suffix, then "*".
#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<String, usize>,
    suffixes: Vec<(String, usize)>,
    any: Option<usize>,
}

impl Router {
    pub fn new(sites: &[Vec<HostPattern>]) -> Self {
        let mut r = Router::default();
        for (i, patterns) in sites.iter().enumerate() {
            for p in patterns {
                match p.kind() {
                    HostMatch::Exact(h) => {
                        r.exact.entry(h.clone()).or_insert(i);
                    }
                    HostMatch::Suffix(s) => r.suffixes.push((s.clone(), i)),
                    HostMatch::Any => {
                        r.any.get_or_insert(i);
                    }
                }
            }
        }
        r.suffixes.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        r
    }

    pub fn route(&self, host: Option<&str>) -> Option<usize> {
        let Some(host) = host else { return self.any };
        let h = normalize_host(host);
        if let Some(&i) = self.exact.get(h.as_ref()) {
            return Some(i);
        }
        self.suffixes
            .iter()
            .find(|(s, _)| h.ends_with(s.as_str()) && h.len() > s.len())
            .map(|&(_, i)| i)
            .or(self.any)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> HostPattern {
        HostPattern::parse(s).expect("valid pattern")
    }

    #[test]
    fn routes_exact_then_longest_wildcard_then_any() {
        let r = Router::new(&[
            vec![p("example.com")],
            vec![p("*.example.com")],
            vec![p("*.api.example.com")],
            vec![p("*")],
        ]);
        assert_eq!(r.route(Some("example.com")), Some(0));
        assert_eq!(r.route(Some("EXAMPLE.com.:443")), Some(0));
        assert_eq!(r.route(Some("www.example.com")), Some(1));
        assert_eq!(r.route(Some("v1.api.example.com")), Some(2));
        assert_eq!(r.route(Some("other.org")), Some(3));
        assert_eq!(r.route(None), Some(3));
        let r = Router::new(&[vec![p("a.test")]]);
        assert_eq!(r.route(Some("b.test")), None);
    }

    #[test]
    fn host_normalisation() {
        assert_eq!(normalize_host("Example.COM:8080"), "example.com");
        assert_eq!(normalize_host("[::1]:8443"), "[::1]");
        assert_eq!(normalize_host("example.com."), "example.com");
    }

    #[test]
    fn bad_patterns() {
        assert!(HostPattern::parse("a.*.com").is_err());
        assert!(HostPattern::parse("").is_err());
        assert!(HostPattern::parse("exa mple.com").is_err());
    }
}
