//! Targeted cache-control fields (RFC 9213).
//!
//! Meridian's target list, in precedence order, is `Meridian-Cache-Control`
//! then `CDN-Cache-Control`. The first one that is present, non-empty and a
//! valid RFC 8941 Dictionary supplies the response directives, and the
//! response's `Cache-Control` and `Expires` are then ignored by this cache
//! (RFC 9213 §2.2). If none qualifies, `Cache-Control` (+ `Expires`) is used.
//!
//! Dictionary values map onto directives as follows: boolean `true` (bare
//! key) sets a flag and `?0` clears it; `max-age`, `s-maxage`,
//! `stale-while-revalidate`, `stale-if-error` take a non-negative Integer
//! (saturated at 2^31; any other type makes `max-age`/`s-maxage` "invalid →
//! stale" and the stale-* ones ignored); `no-cache`/`private` take `true`, a
//! String holding a comma-separated field-name list, or an Inner List of
//! Strings/Tokens. Parameters are ignored. Unknown keys are ignored.

use http::{HeaderMap, HeaderName, header::CACHE_CONTROL};

use super::directives::{DELTA_SECONDS_CAP, FieldScope, ResponseDirectives, parse_field_names};
use super::surrogate::{CACHE_TAG, SURROGATE_KEY};
use super::{PolicyConfig, is_tchar};

/// Name of Meridian's own targeted field.
pub const MERIDIAN_CACHE_CONTROL: &str = "meridian-cache-control";
const CDN_CACHE_CONTROL: &str = "cdn-cache-control";

/// Where the effective response directives came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectiveSource {
    /// `Meridian-Cache-Control`.
    MeridianCacheControl,
    /// `CDN-Cache-Control`.
    CdnCacheControl,
    /// `Cache-Control` (and `Expires`).
    CacheControl,
}

impl DirectiveSource {
    /// Label for metrics / debugging.
    pub const fn as_str(self) -> &'static str {
        match self {
            DirectiveSource::MeridianCacheControl => "meridian-cache-control",
            DirectiveSource::CdnCacheControl => "cdn-cache-control",
            DirectiveSource::CacheControl => "cache-control",
        }
    }
}

/// The response directives this cache obeys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectivePolicy {
    /// Which field supplied them.
    pub source: DirectiveSource,
    /// The directives.
    pub directives: ResponseDirectives,
}

impl EffectivePolicy {
    /// `Expires` only counts when `Cache-Control` is the source.
    pub fn uses_expires(&self) -> bool {
        self.source == DirectiveSource::CacheControl
    }
}

/// Selects and parses the directives that apply to this cache.
pub fn effective_response_directives(headers: &HeaderMap) -> EffectivePolicy {
    for (name, source) in [
        (
            MERIDIAN_CACHE_CONTROL,
            DirectiveSource::MeridianCacheControl,
        ),
        (CDN_CACHE_CONTROL, DirectiveSource::CdnCacheControl),
    ] {
        if let Some(directives) = parse_targeted_field(headers, &HeaderName::from_static(name)) {
            return EffectivePolicy { source, directives };
        }
    }
    EffectivePolicy {
        source: DirectiveSource::CacheControl,
        directives: ResponseDirectives::from_headers(headers),
    }
}

/// Parses a targeted field. `None` when it is absent, empty or not a valid
/// RFC 8941 Dictionary (RFC 9213 §2.1: such a field "MUST be ignored").
pub fn parse_targeted_field(headers: &HeaderMap, name: &HeaderName) -> Option<ResponseDirectives> {
    let mut combined: Vec<u8> = Vec::new();
    for (i, v) in headers.get_all(name).iter().enumerate() {
        if i > 0 {
            combined.extend_from_slice(b", ");
        }
        combined.extend_from_slice(v.as_bytes());
    }
    let dict = sf::parse_dictionary(&combined)?;
    if dict.is_empty() {
        return None;
    }
    Some(directives_from_dictionary(&dict))
}

fn directives_from_dictionary(dict: &[(String, sf::Member)]) -> ResponseDirectives {
    use sf::{Bare, Member};
    let mut d = ResponseDirectives::default();
    let flag = |m: &Member, restrictive: bool| match m {
        Member::Item(Bare::Boolean(b)) => *b,
        _ => restrictive,
    };
    let delta = |m: &Member| match m {
        Member::Item(Bare::Integer(i)) if *i >= 0 => {
            Some(u32::try_from((*i).min(i64::from(DELTA_SECONDS_CAP))).unwrap_or(DELTA_SECONDS_CAP))
        }
        _ => None,
    };
    for (key, member) in dict {
        match key.as_str() {
            "max-age" | "s-maxage" => {
                let v = delta(member);
                if v.is_none() {
                    d.freshness_conflict = true;
                }
                let v = Some(v.unwrap_or(0));
                if key == "max-age" {
                    d.max_age = v;
                } else {
                    d.s_maxage = v;
                }
            }
            "stale-while-revalidate" => d.stale_while_revalidate = delta(member),
            "stale-if-error" => d.stale_if_error = delta(member),
            "no-store" => d.no_store = flag(member, true),
            "must-revalidate" => d.must_revalidate = flag(member, true),
            "proxy-revalidate" => d.proxy_revalidate = flag(member, true),
            "no-transform" => d.no_transform = flag(member, true),
            "public" => d.public = flag(member, false),
            "immutable" => d.immutable = flag(member, false),
            "must-understand" => d.must_understand = flag(member, false),
            "no-cache" => d.no_cache = scope_from_member(member),
            "private" => d.private = scope_from_member(member),
            _ => {}
        }
    }
    d
}

fn scope_from_member(m: &sf::Member) -> FieldScope {
    use sf::{Bare, Member};
    match m {
        Member::Item(Bare::Boolean(false)) => FieldScope::Absent,
        Member::Item(Bare::String(s)) => {
            parse_field_names(s).map_or(FieldScope::All, FieldScope::Fields)
        }
        Member::InnerList(items) => {
            let mut names: Vec<HeaderName> = Vec::new();
            for item in items {
                let (Bare::String(s) | Bare::Token(s)) = item else {
                    return FieldScope::All;
                };
                let Ok(name) = HeaderName::from_bytes(s.as_bytes()) else {
                    return FieldScope::All;
                };
                if !s.bytes().all(is_tchar) {
                    return FieldScope::All;
                }
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            if names.is_empty() {
                FieldScope::All
            } else {
                FieldScope::Fields(names)
            }
        }
        _ => FieldScope::All,
    }
}

/// Header fields to remove from the response sent downstream.
///
/// * `Meridian-Cache-Control` whenever present (it targets only us);
/// * `CDN-Cache-Control` when this cache consumed it and
///   [`PolicyConfig::strip_cdn_cache_control`] is set (otherwise it is left
///   for CDNs further downstream);
/// * `Surrogate-Key` / `Cache-Tag` when [`PolicyConfig::strip_surrogate_keys`].
pub fn headers_to_strip_downstream(headers: &HeaderMap, config: &PolicyConfig) -> Vec<HeaderName> {
    let mut out = Vec::new();
    let meridian = HeaderName::from_static(MERIDIAN_CACHE_CONTROL);
    if headers.contains_key(&meridian) {
        out.push(meridian);
    }
    if config.strip_cdn_cache_control
        && effective_response_directives(headers).source == DirectiveSource::CdnCacheControl
    {
        out.push(HeaderName::from_static(CDN_CACHE_CONTROL));
    }
    if config.strip_surrogate_keys {
        for n in [SURROGATE_KEY, CACHE_TAG] {
            let name = HeaderName::from_static(n);
            if headers.contains_key(&name) {
                out.push(name);
            }
        }
    }
    out
}

/// Whether `Cache-Control` is being ignored in favour of a targeted field.
pub fn cache_control_overridden(headers: &HeaderMap) -> bool {
    headers.contains_key(CACHE_CONTROL)
        && effective_response_directives(headers).source != DirectiveSource::CacheControl
}

/// Minimal RFC 8941 Dictionary parser (strict: any error rejects the field).
pub(super) mod sf {
    /// A bare item.
    #[derive(Debug, Clone, PartialEq)]
    pub enum Bare {
        Integer(i64),
        Decimal(f64),
        String(String),
        Token(String),
        Bytes(Vec<u8>),
        Boolean(bool),
    }

    /// A dictionary member value.
    #[derive(Debug, Clone, PartialEq)]
    pub enum Member {
        Item(Bare),
        InnerList(Vec<Bare>),
    }

    struct P<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl P<'_> {
        fn peek(&self) -> Option<u8> {
            self.s.get(self.i).copied()
        }
        fn skip_sp(&mut self) {
            while self.peek() == Some(b' ') {
                self.i += 1;
            }
        }
        fn skip_ows(&mut self) {
            while matches!(self.peek(), Some(b' ' | b'\t')) {
                self.i += 1;
            }
        }
    }

    /// Parses a Dictionary; duplicate keys keep the last value (RFC 8941
    /// §4.2.2) but stay at the position of their first occurrence.
    pub fn parse_dictionary(input: &[u8]) -> Option<Vec<(String, Member)>> {
        let mut p = P { s: input, i: 0 };
        p.skip_sp();
        let mut out: Vec<(String, Member)> = Vec::new();
        while p.peek().is_some() {
            let key = parse_key(&mut p)?;
            let member = if p.peek() == Some(b'=') {
                p.i += 1;
                parse_item_or_inner_list(&mut p)?
            } else {
                parse_params(&mut p)?;
                Member::Item(Bare::Boolean(true))
            };
            if let Some(slot) = out.iter_mut().find(|(k, _)| *k == key) {
                slot.1 = member;
            } else {
                out.push((key, member));
            }
            p.skip_ows();
            if p.peek().is_none() {
                return Some(out);
            }
            if p.peek() != Some(b',') {
                return None;
            }
            p.i += 1;
            p.skip_ows();
            // A trailing comma is an error.
            p.peek()?;
        }
        Some(out)
    }

    fn parse_key(p: &mut P<'_>) -> Option<String> {
        let start = p.i;
        match p.peek() {
            Some(b) if b.is_ascii_lowercase() || b == b'*' => p.i += 1,
            _ => return None,
        }
        while let Some(b) = p.peek() {
            if b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.*".contains(&b) {
                p.i += 1;
            } else {
                break;
            }
        }
        Some(String::from_utf8_lossy(&p.s[start..p.i]).into_owned())
    }

    fn parse_params(p: &mut P<'_>) -> Option<()> {
        while p.peek() == Some(b';') {
            p.i += 1;
            p.skip_sp();
            parse_key(p)?;
            if p.peek() == Some(b'=') {
                p.i += 1;
                parse_bare(p)?;
            }
        }
        Some(())
    }

    fn parse_item_or_inner_list(p: &mut P<'_>) -> Option<Member> {
        if p.peek() == Some(b'(') {
            p.i += 1;
            let mut items = Vec::new();
            loop {
                p.skip_sp();
                if p.peek() == Some(b')') {
                    p.i += 1;
                    parse_params(p)?;
                    return Some(Member::InnerList(items));
                }
                items.push(parse_bare(p)?);
                parse_params(p)?;
                match p.peek() {
                    Some(b' ' | b')') => {}
                    _ => return None,
                }
            }
        }
        let b = parse_bare(p)?;
        parse_params(p)?;
        Some(Member::Item(b))
    }

    fn parse_bare(p: &mut P<'_>) -> Option<Bare> {
        match p.peek()? {
            b'-' | b'0'..=b'9' => parse_number(p),
            b'"' => parse_string(p),
            b':' => parse_bytes(p),
            b'?' => {
                p.i += 1;
                let v = match p.peek()? {
                    b'0' => false,
                    b'1' => true,
                    _ => return None,
                };
                p.i += 1;
                Some(Bare::Boolean(v))
            }
            b if b.is_ascii_alphabetic() || b == b'*' => {
                let start = p.i;
                p.i += 1;
                while let Some(c) = p.peek() {
                    if super::is_tchar(c) || c == b':' || c == b'/' {
                        p.i += 1;
                    } else {
                        break;
                    }
                }
                Some(Bare::Token(
                    String::from_utf8_lossy(&p.s[start..p.i]).into_owned(),
                ))
            }
            _ => None,
        }
    }

    fn parse_number(p: &mut P<'_>) -> Option<Bare> {
        let neg = p.peek() == Some(b'-');
        if neg {
            p.i += 1;
        }
        let start = p.i;
        let mut dot: Option<usize> = None;
        while let Some(c) = p.peek() {
            if c.is_ascii_digit() {
                p.i += 1;
            } else if c == b'.' && dot.is_none() {
                dot = Some(p.i);
                p.i += 1;
            } else {
                break;
            }
        }
        let text = &p.s[start..p.i];
        if text.is_empty() || !text[0].is_ascii_digit() {
            return None;
        }
        match dot {
            None => {
                if text.len() > 15 {
                    return None;
                }
                let v = text
                    .iter()
                    .fold(0_i64, |a, &c| a * 10 + i64::from(c - b'0'));
                Some(Bare::Integer(if neg { -v } else { v }))
            }
            Some(d) => {
                let int_len = d - start;
                let frac_len = p.i - d - 1;
                if int_len > 12 || frac_len == 0 || frac_len > 3 {
                    return None;
                }
                let v: f64 = std::str::from_utf8(text).ok()?.parse().ok()?;
                Some(Bare::Decimal(if neg { -v } else { v }))
            }
        }
    }

    fn parse_string(p: &mut P<'_>) -> Option<Bare> {
        p.i += 1;
        let mut out = String::new();
        loop {
            let c = p.peek()?;
            p.i += 1;
            match c {
                b'\\' => {
                    let n = p.peek()?;
                    if n != b'"' && n != b'\\' {
                        return None;
                    }
                    out.push(char::from(n));
                    p.i += 1;
                }
                b'"' => return Some(Bare::String(out)),
                0x20..=0x7e => out.push(char::from(c)),
                _ => return None,
            }
        }
    }

    fn parse_bytes(p: &mut P<'_>) -> Option<Bare> {
        p.i += 1;
        let start = p.i;
        while let Some(c) = p.peek() {
            if c == b':' {
                let raw = p.s[start..p.i].to_vec();
                p.i += 1;
                return Some(Bare::Bytes(raw));
            }
            if !(c.is_ascii_alphanumeric() || c == b'+' || c == b'/' || c == b'=') {
                return None;
            }
            p.i += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::headers;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc9213_2_2_cdn_cache_control_overrides_cache_control() {
        let h = headers(&[
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age=600"),
        ]);
        let e = effective_response_directives(&h);
        assert_eq!(e.source, DirectiveSource::CdnCacheControl);
        assert_eq!(e.directives.max_age, Some(600));
        assert!(!e.directives.no_store);
        assert!(!e.uses_expires());
        assert!(cache_control_overridden(&h));
    }

    #[test]
    fn rfc9213_2_2_meridian_field_has_highest_precedence() {
        let h = headers(&[
            ("cache-control", "max-age=1"),
            ("cdn-cache-control", "max-age=2"),
            ("meridian-cache-control", "max-age=3, stale-if-error=60"),
        ]);
        let e = effective_response_directives(&h);
        assert_eq!(e.source, DirectiveSource::MeridianCacheControl);
        assert_eq!(e.directives.max_age, Some(3));
        assert_eq!(e.directives.stale_if_error, Some(60));
    }

    #[test]
    fn rfc9213_2_1_invalid_targeted_field_is_ignored_and_falls_back() {
        // Uppercase keys are not valid sf-keys; a trailing comma is invalid.
        for bad in [
            "Max-Age=60",
            "max-age=60,",
            "max-age=\"60",
            "",
            "max-age=60 junk",
        ] {
            let mut h = headers(&[("cache-control", "max-age=5")]);
            h.insert(
                HeaderName::from_static(MERIDIAN_CACHE_CONTROL),
                http::HeaderValue::from_str(bad).expect("value"),
            );
            let e = effective_response_directives(&h);
            assert_eq!(e.source, DirectiveSource::CacheControl, "{bad:?}");
            assert_eq!(e.directives.max_age, Some(5));
        }
    }

    #[test]
    fn rfc9213_targeted_field_lines_combine_and_values_are_typed() {
        let h = headers(&[
            ("cdn-cache-control", "max-age=60"),
            (
                "cdn-cache-control",
                r#"no-cache="set-cookie", private=?0, must-revalidate"#,
            ),
        ]);
        let d = effective_response_directives(&h).directives;
        assert_eq!(d.max_age, Some(60));
        assert_eq!(
            d.no_cache.fields(),
            &[HeaderName::from_static("set-cookie")]
        );
        assert_eq!(d.private, FieldScope::Absent);
        assert!(d.must_revalidate);
    }

    #[test]
    fn rfc9213_string_max_age_is_invalid_freshness_and_big_integers_saturate() {
        let h = headers(&[("cdn-cache-control", r#"max-age="60""#)]);
        let d = effective_response_directives(&h).directives;
        assert_eq!(d.max_age, Some(0));
        assert!(d.freshness_conflict);
        let h = headers(&[("cdn-cache-control", "s-maxage=999999999999999")]);
        assert_eq!(
            effective_response_directives(&h).directives.s_maxage,
            Some(DELTA_SECONDS_CAP)
        );
    }

    #[test]
    fn rfc9213_inner_list_field_names_and_params_ignored() {
        let h = headers(&[(
            "cdn-cache-control",
            r#"private=("x-a" x-b);p=1, max-age=5;foo"#,
        )]);
        let d = effective_response_directives(&h).directives;
        assert_eq!(
            d.private.fields(),
            &[
                HeaderName::from_static("x-a"),
                HeaderName::from_static("x-b")
            ]
        );
        assert_eq!(d.max_age, Some(5));
    }

    #[test]
    fn strip_downstream_lists_consumed_targeted_fields() {
        let h = headers(&[
            ("meridian-cache-control", "max-age=3"),
            ("cdn-cache-control", "max-age=2"),
            ("surrogate-key", "a b"),
        ]);
        let cfg = PolicyConfig::default();
        let strip = headers_to_strip_downstream(&h, &cfg);
        assert_eq!(
            strip,
            vec![
                HeaderName::from_static("meridian-cache-control"),
                HeaderName::from_static("surrogate-key")
            ]
        );
        // CDN-Cache-Control stripped only when consumed and configured.
        let h2 = headers(&[("cdn-cache-control", "max-age=2")]);
        let cfg2 = PolicyConfig {
            strip_cdn_cache_control: true,
            ..PolicyConfig::default()
        };
        assert_eq!(
            headers_to_strip_downstream(&h2, &cfg2),
            vec![HeaderName::from_static("cdn-cache-control")]
        );
        assert!(headers_to_strip_downstream(&h2, &cfg).is_empty());
        // Not consumed (Meridian field wins) -> left for downstream CDNs.
        assert!(
            !headers_to_strip_downstream(&h, &cfg2)
                .contains(&HeaderName::from_static("cdn-cache-control"))
        );
    }

    #[test]
    fn sf_dictionary_parses_rfc8941_examples() {
        let d = sf::parse_dictionary(
            br#"en="Applepie", da=:w4ZibGV0w6ZydGUK:, a=?0, b, c;foo=bar, d=1.5, e=-3"#,
        )
        .expect("valid");
        assert_eq!(d.len(), 7);
        assert_eq!(d[2].1, sf::Member::Item(sf::Bare::Boolean(false)));
        assert_eq!(d[3].1, sf::Member::Item(sf::Bare::Boolean(true)));
        assert_eq!(d[6].1, sf::Member::Item(sf::Bare::Integer(-3)));
        assert!(sf::parse_dictionary(b"a=1.2345").is_none());
        assert!(sf::parse_dictionary(b"a=(1 2").is_none());
    }

    proptest! {
        #[test]
        fn prop_targeted_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = sf::parse_dictionary(&bytes);
        }

        #[test]
        fn prop_targeted_structured_garbage_never_panics(s in r#"([a-z*][a-z0-9-]{0,8}(=(\?[01]|-?[0-9]{1,17}(\.[0-9]{0,4})?|"[ -~]{0,6}"|\([a-z" 0-9]{0,10}\)|[a-z]{1,4}))?(;[a-z]{1,3}(=[0-9]{1,3})?)?, ?){0,6}"#) {
            if let Some(d) = sf::parse_dictionary(s.as_bytes()) {
                let _ = directives_from_dictionary(&d);
            }
        }
    }
}
