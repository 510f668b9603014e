//! `Cache-Status` (RFC 9211) member builder.
//!
//! Produces one list member such as `meridian; hit; ttl=41` or
//! `meridian; fwd=stale; fwd-status=304`. Parameters are emitted in the
//! order `hit`/`fwd`, `fwd-status`, `ttl`, `stored`, `collapsed`, `key`,
//! `detail`, separated by `"; "` as in the RFC's examples (valid RFC 8941:
//! SP is allowed after `;`). The cache name and `detail` are sf-tokens when
//! they are valid tokens and sf-strings otherwise; `key` is always an
//! sf-string. Characters not allowed in sf-strings (outside printable
//! ASCII) are replaced with `?` so serialisation is infallible. Integers are
//! clamped to the RFC 8941 range.

use std::fmt;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::is_tchar;

/// `Cache-Status` field name.
pub const CACHE_STATUS: &str = "cache-status";

const SF_INTEGER_MAX: i64 = 999_999_999_999_999;

/// RFC 9211 §2.2 `fwd` reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FwdReason {
    /// Configured to bypass the cache.
    Bypass,
    /// The request method is not cacheable.
    Method,
    /// No stored response for the URI.
    UriMiss,
    /// Stored responses exist but none matches `Vary`.
    VaryMiss,
    /// Miss without more specific information.
    Miss,
    /// The request's directives required forwarding (e.g. `no-cache`).
    Request,
    /// The stored response was stale.
    Stale,
    /// Only part of the response was stored.
    Partial,
}

impl FwdReason {
    /// The sf-token used on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            FwdReason::Bypass => "bypass",
            FwdReason::Method => "method",
            FwdReason::UriMiss => "uri-miss",
            FwdReason::VaryMiss => "vary-miss",
            FwdReason::Miss => "miss",
            FwdReason::Request => "request",
            FwdReason::Stale => "stale",
            FwdReason::Partial => "partial",
        }
    }
}

/// One `Cache-Status` list member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheStatus {
    cache: String,
    hit: bool,
    fwd: Option<FwdReason>,
    fwd_status: Option<u16>,
    ttl: Option<i64>,
    stored: bool,
    collapsed: bool,
    key: Option<String>,
    detail: Option<String>,
}

impl CacheStatus {
    fn new(cache: impl Into<String>) -> Self {
        Self {
            cache: cache.into(),
            hit: false,
            fwd: None,
            fwd_status: None,
            ttl: None,
            stored: false,
            collapsed: false,
            key: None,
            detail: None,
        }
    }

    /// A hit: the response was served from cache.
    pub fn hit(cache: impl Into<String>) -> Self {
        Self {
            hit: true,
            ..Self::new(cache)
        }
    }

    /// The request was forwarded towards the origin.
    pub fn forward(cache: impl Into<String>, reason: FwdReason) -> Self {
        Self {
            fwd: Some(reason),
            ..Self::new(cache)
        }
    }

    /// `fwd-status`: the status the next hop returned.
    pub fn fwd_status(mut self, status: StatusCode) -> Self {
        self.fwd_status = Some(status.as_u16());
        self
    }

    /// `ttl`: remaining freshness in seconds, negative when stale.
    pub fn ttl(mut self, secs: i64) -> Self {
        self.ttl = Some(secs.clamp(-SF_INTEGER_MAX, SF_INTEGER_MAX));
        self
    }

    /// `stored`: the forwarded response was stored.
    pub fn stored(mut self) -> Self {
        self.stored = true;
        self
    }

    /// `collapsed`: the request was coalesced with another one.
    pub fn collapsed(mut self) -> Self {
        self.collapsed = true;
        self
    }

    /// `key`: implementation-specific cache key (debugging only).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// `detail`: extra implementation-specific information.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The member as a header value.
    pub fn to_header_value(&self) -> HeaderValue {
        // Serialisation only produces printable ASCII, which is always valid.
        HeaderValue::from_str(&self.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("meridian"))
    }

    /// Appends this member after any members added by upstream caches
    /// (RFC 9211 §2: the last member is closest to the client).
    pub fn append_to(&self, headers: &mut HeaderMap) {
        headers.append(
            HeaderName::from_static(CACHE_STATUS),
            self.to_header_value(),
        );
    }
}

fn is_sf_token(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'*')
        && bytes.all(|b| is_tchar(b) || b == b':' || b == b'/')
}

fn write_sf_string(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_str("\"")?;
    for c in s.chars() {
        match c {
            '"' | '\\' => write!(f, "\\{c}")?,
            ' '..='~' => write!(f, "{c}")?,
            _ => f.write_str("?")?,
        }
    }
    f.write_str("\"")
}

fn write_token_or_string(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    if is_sf_token(s) {
        f.write_str(s)
    } else {
        write_sf_string(f, s)
    }
}

impl fmt::Display for CacheStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_token_or_string(f, &self.cache)?;
        if self.hit {
            f.write_str("; hit")?;
        }
        if let Some(fwd) = self.fwd {
            write!(f, "; fwd={}", fwd.as_str())?;
        }
        if let Some(s) = self.fwd_status {
            write!(f, "; fwd-status={s}")?;
        }
        if let Some(t) = self.ttl {
            write!(f, "; ttl={t}")?;
        }
        if self.stored {
            f.write_str("; stored")?;
        }
        if self.collapsed {
            f.write_str("; collapsed")?;
        }
        if let Some(k) = &self.key {
            f.write_str("; key=")?;
            write_sf_string(f, k)?;
        }
        if let Some(d) = &self.detail {
            f.write_str("; detail=")?;
            write_token_or_string(f, d)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc9211_hit_with_ttl() {
        assert_eq!(
            CacheStatus::hit("meridian").ttl(41).to_string(),
            "meridian; hit; ttl=41"
        );
    }

    #[test]
    fn rfc9211_miss_stored() {
        assert_eq!(
            CacheStatus::forward("meridian", FwdReason::Miss)
                .stored()
                .to_string(),
            "meridian; fwd=miss; stored"
        );
    }

    #[test]
    fn rfc9211_stale_revalidated_with_fwd_status() {
        assert_eq!(
            CacheStatus::forward("meridian", FwdReason::Stale)
                .fwd_status(StatusCode::NOT_MODIFIED)
                .to_string(),
            "meridian; fwd=stale; fwd-status=304"
        );
    }

    #[test]
    fn rfc9211_all_fwd_reasons_serialise() {
        let cases = [
            (FwdReason::UriMiss, "meridian; fwd=uri-miss"),
            (FwdReason::VaryMiss, "meridian; fwd=vary-miss"),
            (FwdReason::Request, "meridian; fwd=request"),
            (FwdReason::Method, "meridian; fwd=method"),
            (FwdReason::Bypass, "meridian; fwd=bypass"),
            (FwdReason::Partial, "meridian; fwd=partial"),
        ];
        for (reason, want) in cases {
            assert_eq!(CacheStatus::forward("meridian", reason).to_string(), want);
        }
    }

    #[test]
    fn rfc9211_negative_ttl_and_detail_token() {
        assert_eq!(
            CacheStatus::hit("meridian")
                .ttl(-12)
                .detail("stale-if-error")
                .to_string(),
            "meridian; hit; ttl=-12; detail=stale-if-error"
        );
    }

    #[test]
    fn rfc9211_detail_and_name_fall_back_to_sf_string() {
        assert_eq!(
            CacheStatus::forward("edge cache", FwdReason::Bypass)
                .detail("rule \"no-cache\" matched")
                .to_string(),
            r#""edge cache"; fwd=bypass; detail="rule \"no-cache\" matched""#
        );
    }

    #[test]
    fn rfc9211_collapsed_and_key_params() {
        assert_eq!(
            CacheStatus::forward("meridian", FwdReason::UriMiss)
                .collapsed()
                .key("https://example.com/é")
                .to_string(),
            r#"meridian; fwd=uri-miss; collapsed; key="https://example.com/?""#
        );
    }

    #[test]
    fn rfc8941_integer_range_is_clamped() {
        assert_eq!(
            CacheStatus::hit("m").ttl(i64::MIN).to_string(),
            "m; hit; ttl=-999999999999999"
        );
    }

    #[test]
    fn append_keeps_upstream_members_first() {
        let mut h = HeaderMap::new();
        h.append(
            CACHE_STATUS,
            HeaderValue::from_static("OriginCache; hit; ttl=10"),
        );
        CacheStatus::hit("meridian").ttl(5).append_to(&mut h);
        let all: Vec<_> = h.get_all(CACHE_STATUS).iter().collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1], "meridian; hit; ttl=5");
    }
}
