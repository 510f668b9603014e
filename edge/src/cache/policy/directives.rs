//! `Cache-Control` parsing (RFC 9111 §5.2) for requests and responses.
//!
//! Grammar: `Cache-Control = #cache-directive`,
//! `cache-directive = token [ "=" ( token / quoted-string ) ]`. The parser is
//! total (never fails, never panics) and lenient where it is safe:
//!
//! * directive names are matched case-insensitively;
//! * both token and quoted-string arguments are accepted for every directive
//!   (§5.2: "recipients ought to accept both forms");
//! * the grammar has no whitespace around `=`: `max-age =5` or `max-age= 5`
//!   is a malformed element, handled like any other invalid value (for
//!   `max-age` / `s-maxage`: stale, §4.2.1); empty list elements are skipped;
//! * multiple field lines are processed as one list (RFC 9110 §5.3);
//! * unknown extensions are ignored;
//! * `delta-seconds` (§1.2.2) must be `1*DIGIT`; values above 2^31 saturate
//!   at 2^31 ([`DELTA_SECONDS_CAP`]).
//!
//! Duplicate and invalid directives are resolved as documented in the parent
//! module, after RFC 9111 §4.2.1: a freshness directive (`max-age`,
//! `s-maxage`) repeated with different values or with an invalid value makes
//! the response stale ("either the first occurrence should be used or the
//! response should be considered stale"; "Caches are encouraged to consider
//! responses that have invalid freshness information ... to be stale");
//! identical repeats are the first occurrence. Other repeated directives take
//! the most restrictive value; for the stale-serving allowances
//! `stale-while-revalidate` / `stale-if-error` an invalid occurrence drops
//! the allowance, the most restrictive reading of a self-contradicting
//! field.

use http::{HeaderMap, HeaderName, header::CACHE_CONTROL};

use super::{is_tchar, split_list, trim_ows};

/// RFC 9111 §1.2.2: delta-seconds larger than the greatest representable
/// integer are transmitted as 2^31; we saturate parsed values to this.
pub const DELTA_SECONDS_CAP: u32 = 1 << 31;

/// Scope of `no-cache` / `private`, which optionally list field names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FieldScope {
    /// Directive not present.
    #[default]
    Absent,
    /// Unqualified directive: applies to the whole response.
    All,
    /// Qualified directive: applies only to the listed fields (lowercase,
    /// deduplicated, in first-seen order).
    Fields(Vec<HeaderName>),
}

impl FieldScope {
    /// Whether the directive was present in any form.
    pub fn is_present(&self) -> bool {
        !matches!(self, FieldScope::Absent)
    }

    /// Whether the directive applies to the whole response.
    pub fn is_all(&self) -> bool {
        matches!(self, FieldScope::All)
    }

    /// The listed field names (empty unless qualified).
    pub fn fields(&self) -> &[HeaderName] {
        match self {
            FieldScope::Fields(f) => f,
            _ => &[],
        }
    }

    fn merge(&mut self, other: FieldScope) {
        match (std::mem::take(self), other) {
            (FieldScope::All, _) | (_, FieldScope::All) => *self = FieldScope::All,
            (FieldScope::Absent, o) => *self = o,
            (s, FieldScope::Absent) => *self = s,
            (FieldScope::Fields(mut a), FieldScope::Fields(b)) => {
                for f in b {
                    if !a.contains(&f) {
                        a.push(f);
                    }
                }
                *self = FieldScope::Fields(a);
            }
        }
    }
}

/// Parsed response directives (from `Cache-Control` or a targeted field).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResponseDirectives {
    /// `max-age` in seconds (`Some(0)` if invalid or conflicting).
    pub max_age: Option<u32>,
    /// `s-maxage` in seconds (`Some(0)` if invalid or conflicting).
    pub s_maxage: Option<u32>,
    /// A freshness directive was invalid or repeated with different values;
    /// the response is treated as stale (RFC 9111 §4.2.1).
    pub freshness_conflict: bool,
    /// `no-cache`, optionally qualified.
    pub no_cache: FieldScope,
    /// `private`, optionally qualified.
    pub private: FieldScope,
    /// `no-store`.
    pub no_store: bool,
    /// `no-transform`.
    pub no_transform: bool,
    /// `must-revalidate`.
    pub must_revalidate: bool,
    /// `proxy-revalidate`.
    pub proxy_revalidate: bool,
    /// `must-understand`.
    pub must_understand: bool,
    /// `public`.
    pub public: bool,
    /// `immutable` (RFC 8246).
    pub immutable: bool,
    /// `stale-while-revalidate` (RFC 5861 §3), seconds.
    pub stale_while_revalidate: Option<u32>,
    /// `stale-if-error` (RFC 5861 §4), seconds.
    pub stale_if_error: Option<u32>,
}

/// Request `max-stale` (RFC 9111 §5.2.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxStale {
    /// `max-stale` without a value: any staleness is acceptable.
    Any,
    /// `max-stale=N`.
    Limit(u32),
}

/// Parsed request directives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestDirectives {
    /// `max-age` (`Some(0)` if the value was invalid: most restrictive).
    pub max_age: Option<u32>,
    /// `max-stale`.
    pub max_stale: Option<MaxStale>,
    /// `min-fresh` (invalid values ignored).
    pub min_fresh: Option<u32>,
    /// `no-cache`.
    pub no_cache: bool,
    /// `no-store`.
    pub no_store: bool,
    /// `no-transform`.
    pub no_transform: bool,
    /// `only-if-cached`.
    pub only_if_cached: bool,
    /// `stale-if-error` (RFC 5861 §4, request form).
    pub stale_if_error: Option<u32>,
}

/// One raw `name[=value]` element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RawDirective {
    /// Lowercased name.
    pub name: String,
    /// Unquoted argument, if any.
    pub value: Option<String>,
    /// The element did not match the grammar (e.g. trailing junk or an
    /// unterminated quoted string).
    pub malformed: bool,
}

/// Splits field lines into raw directives.
pub(super) fn raw_directives<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> Vec<RawDirective> {
    let mut out = Vec::new();
    for line in lines {
        for elem in split_list(line) {
            if let Some(d) = parse_element(elem) {
                out.push(d);
            }
        }
    }
    out
}

fn parse_element(elem: &[u8]) -> Option<RawDirective> {
    let name_len = elem.iter().take_while(|&&b| is_tchar(b)).count();
    if name_len == 0 {
        return None;
    }
    let name = String::from_utf8_lossy(&elem[..name_len]).to_ascii_lowercase();
    // `token [ "=" ( token / quoted-string ) ]`: no whitespace around `=`.
    let rest = &elem[name_len..];
    if rest.is_empty() {
        return Some(RawDirective {
            name,
            value: None,
            malformed: false,
        });
    }
    let Some(arg) = rest.strip_prefix(b"=") else {
        return Some(RawDirective {
            name,
            value: None,
            malformed: true,
        });
    };
    let (value, malformed) = if let Some(q) = arg.strip_prefix(b"\"") {
        unquote(q)
    } else {
        let ok = !arg.is_empty() && arg.iter().all(|&b| is_tchar(b));
        (String::from_utf8_lossy(arg).into_owned(), !ok)
    };
    Some(RawDirective {
        name,
        value: Some(value),
        malformed,
    })
}

/// Unquotes the remainder of a quoted-string (after the opening quote).
/// Returns the content and whether it was malformed (unterminated or
/// followed by junk).
fn unquote(s: &[u8]) -> (String, bool) {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'\\' if i + 1 < s.len() => {
                out.push(s[i + 1]);
                i += 2;
            }
            b'"' => {
                let junk = !trim_ows(&s[i + 1..]).is_empty();
                return (String::from_utf8_lossy(&out).into_owned(), junk);
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), true)
}

/// Parses RFC 9111 §1.2.2 delta-seconds, saturating at 2^31.
pub fn parse_delta_seconds(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut v: u64 = 0;
    for b in s.bytes() {
        v = v * 10 + u64::from(b - b'0');
        if v >= u64::from(DELTA_SECONDS_CAP) {
            return Some(DELTA_SECONDS_CAP);
        }
    }
    u32::try_from(v).ok()
}

/// Parses a `#field-name` argument. `None` if any element is not a valid
/// field name or the list is empty (callers then treat the directive as
/// unqualified).
pub(super) fn parse_field_names(s: &str) -> Option<Vec<HeaderName>> {
    let mut names: Vec<HeaderName> = Vec::new();
    for elem in split_list(s.as_bytes()) {
        let name = HeaderName::from_bytes(elem).ok()?;
        if !elem.iter().all(|&b| is_tchar(b)) {
            return None;
        }
        if !names.contains(&name) {
            names.push(name);
        }
    }
    (!names.is_empty()).then_some(names)
}

fn scope_from_raw(d: &RawDirective) -> FieldScope {
    match (&d.value, d.malformed) {
        (Some(v), false) => parse_field_names(v).map_or(FieldScope::All, FieldScope::Fields),
        _ => FieldScope::All,
    }
}

/// Accumulates occurrences of a freshness directive (§4.2.1).
#[derive(Default)]
struct FreshnessAcc {
    value: Option<u32>,
    conflict: bool,
}

impl FreshnessAcc {
    fn add(&mut self, d: &RawDirective) {
        let parsed = match (&d.value, d.malformed) {
            (Some(v), false) => parse_delta_seconds(v),
            _ => None,
        };
        match (parsed, self.value) {
            (None, _) => self.conflict = true,
            (Some(v), None) => self.value = Some(v),
            (Some(v), Some(prev)) if v != prev => self.conflict = true,
            _ => {}
        }
    }

    fn finish(self, conflict: &mut bool) -> Option<u32> {
        if self.conflict {
            *conflict = true;
            Some(0)
        } else {
            self.value
        }
    }
}

/// Accumulates occurrences of a stale-serving allowance
/// (`stale-while-revalidate`, `stale-if-error`): repeats take the minimum,
/// and an invalid occurrence drops the allowance (most restrictive, §4.2.1).
#[derive(Default)]
struct AllowanceAcc {
    value: Option<u32>,
    invalid: bool,
}

impl AllowanceAcc {
    fn add(&mut self, d: &RawDirective) {
        match delta_of(d) {
            Some(v) => self.value = min_opt(self.value, Some(v)),
            None => self.invalid = true,
        }
    }

    fn finish(self) -> Option<u32> {
        if self.invalid { None } else { self.value }
    }
}

fn min_opt(a: Option<u32>, b: Option<u32>) -> Option<u32> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

fn delta_of(d: &RawDirective) -> Option<u32> {
    match (&d.value, d.malformed) {
        (Some(v), false) => parse_delta_seconds(v),
        _ => None,
    }
}

impl ResponseDirectives {
    /// Parses every `Cache-Control` line of a response.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        Self::parse_lines(headers.get_all(CACHE_CONTROL).iter().map(|v| v.as_bytes()))
    }

    /// Parses a single field value.
    pub fn parse(value: &str) -> Self {
        Self::parse_lines([value.as_bytes()])
    }

    /// Parses several field lines as one list.
    pub fn parse_lines<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut out = Self::default();
        let mut max_age = FreshnessAcc::default();
        let mut s_maxage = FreshnessAcc::default();
        let mut swr = AllowanceAcc::default();
        let mut sie = AllowanceAcc::default();
        for d in raw_directives(lines) {
            match d.name.as_str() {
                "max-age" => max_age.add(&d),
                "s-maxage" => s_maxage.add(&d),
                "no-cache" => out.no_cache.merge(scope_from_raw(&d)),
                "private" => out.private.merge(scope_from_raw(&d)),
                "no-store" => out.no_store = true,
                "no-transform" => out.no_transform = true,
                "must-revalidate" => out.must_revalidate = true,
                "proxy-revalidate" => out.proxy_revalidate = true,
                "must-understand" => out.must_understand |= !d.malformed,
                "public" => out.public |= !d.malformed,
                "immutable" => out.immutable |= !d.malformed,
                "stale-while-revalidate" => swr.add(&d),
                "stale-if-error" => sie.add(&d),
                _ => {}
            }
        }
        out.stale_while_revalidate = swr.finish();
        out.stale_if_error = sie.finish();
        out.max_age = max_age.finish(&mut out.freshness_conflict);
        out.s_maxage = s_maxage.finish(&mut out.freshness_conflict);
        out
    }

    /// Whether `max-age` or `s-maxage` is present (for a shared cache).
    pub fn has_explicit_max_age(&self) -> bool {
        self.max_age.is_some() || self.s_maxage.is_some()
    }
}

impl RequestDirectives {
    /// Parses every `Cache-Control` line of a request.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        Self::parse_lines(headers.get_all(CACHE_CONTROL).iter().map(|v| v.as_bytes()))
    }

    /// Parses a single field value.
    pub fn parse(value: &str) -> Self {
        Self::parse_lines([value.as_bytes()])
    }

    /// Parses several field lines as one list.
    pub fn parse_lines<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut out = Self::default();
        for d in raw_directives(lines) {
            match d.name.as_str() {
                "max-age" => {
                    // Invalid request max-age: most restrictive (0).
                    out.max_age = min_opt(out.max_age, Some(delta_of(&d).unwrap_or(0)));
                }
                "max-stale" => {
                    let this = match (&d.value, d.malformed) {
                        (None, false) => Some(MaxStale::Any),
                        _ => delta_of(&d).map(MaxStale::Limit),
                    };
                    out.max_stale = match (out.max_stale, this) {
                        (Some(MaxStale::Limit(a)), Some(MaxStale::Limit(b))) => {
                            Some(MaxStale::Limit(a.min(b)))
                        }
                        (Some(MaxStale::Limit(a)), _) | (_, Some(MaxStale::Limit(a))) => {
                            Some(MaxStale::Limit(a))
                        }
                        (a, b) => a.or(b),
                    };
                }
                "min-fresh" => {
                    if let Some(v) = delta_of(&d) {
                        out.min_fresh = Some(out.min_fresh.map_or(v, |p| p.max(v)));
                    }
                }
                "no-cache" => out.no_cache = true,
                "no-store" => out.no_store = true,
                "no-transform" => out.no_transform = true,
                "only-if-cached" => out.only_if_cached = true,
                "stale-if-error" => out.stale_if_error = min_opt(out.stale_if_error, delta_of(&d)),
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::headers;
    use super::*;
    use proptest::prelude::*;

    fn names(list: &[&str]) -> FieldScope {
        FieldScope::Fields(
            list.iter()
                .map(|n| HeaderName::from_bytes(n.as_bytes()).expect("name"))
                .collect(),
        )
    }

    #[test]
    fn rfc9111_5_2_directive_names_are_case_insensitive() {
        let d = ResponseDirectives::parse("MAX-AGE=60, No-Store, PUBLIC");
        assert_eq!(d.max_age, Some(60));
        assert!(d.no_store);
        assert!(d.public);
    }

    #[test]
    fn rfc9111_5_2_quoted_string_arguments_accepted_for_delta_seconds() {
        // "recipients ought to accept both forms, even if a specific form is
        // required for a given directive" (§5.2).
        let d = ResponseDirectives::parse(r#"max-age="120", s-maxage=30"#);
        assert_eq!(d.max_age, Some(120));
        assert_eq!(d.s_maxage, Some(30));
        assert!(!d.freshness_conflict);
        let d = ResponseDirectives::parse(r#"s-maxage="30", stale-if-error="9""#);
        assert_eq!(d.s_maxage, Some(30));
        assert_eq!(d.stale_if_error, Some(9));
    }

    #[test]
    fn rfc9111_5_2_whitespace_around_equals_is_invalid() {
        // `cache-directive = token [ "=" ( token / quoted-string ) ]` has no
        // OWS around "=": the value is invalid, so the response is stale
        // (§4.2.1) rather than fresh for an hour.
        for cc in [
            "max-age =3600",
            "max-age= 3600",
            "max-age = 3600",
            "max-age\t=3600",
            r#"max-age= "3600""#,
        ] {
            let d = ResponseDirectives::parse(cc);
            assert_eq!(d.max_age, Some(0), "{cc:?}");
            assert!(d.freshness_conflict, "{cc:?}");
        }
        assert_eq!(ResponseDirectives::parse("s-maxage =60").s_maxage, Some(0));
        // A broken allowance is not granted; a broken restriction still is.
        let d = ResponseDirectives::parse("stale-while-revalidate =60, no-store =x");
        assert_eq!(d.stale_while_revalidate, None);
        assert!(d.no_store);
        // Request side: an invalid max-age is the most restrictive (0).
        assert_eq!(RequestDirectives::parse("max-age =60").max_age, Some(0));
        assert_eq!(RequestDirectives::parse("max-stale= 60").max_stale, None);
    }

    #[test]
    fn rfc9111_1_2_2_delta_seconds_is_digits_only() {
        // `delta-seconds = 1*DIGIT`: leading zeros are digits; a sign, a
        // fraction, letters or single quotes are not. Invalid means stale.
        assert_eq!(
            ResponseDirectives::parse("max-age=003600").max_age,
            Some(3600)
        );
        for cc in [
            "max-age=3600a",
            "max-age=a3600",
            "max-age=3600.0",
            "max-age=3600.5",
            "max-age='3600'",
            "max-age=-1",
            r#"max-age="""#,
            r#"max-age="3600"#,
            r#"max-age="36 00""#,
        ] {
            let d = ResponseDirectives::parse(cc);
            assert_eq!(d.max_age, Some(0), "{cc:?}");
            assert!(d.freshness_conflict, "{cc:?}");
        }
    }

    #[test]
    fn rfc9110_5_3_multiple_field_lines_form_one_list() {
        let h = headers(&[("cache-control", "public"), ("cache-control", "max-age=10")]);
        let d = ResponseDirectives::from_headers(&h);
        assert!(d.public);
        assert_eq!(d.max_age, Some(10));
    }

    #[test]
    fn rfc9111_1_2_2_delta_seconds_overflow_saturates_at_2_pow_31() {
        let d = ResponseDirectives::parse("max-age=99999999999999999999999");
        assert_eq!(d.max_age, Some(DELTA_SECONDS_CAP));
        assert_eq!(parse_delta_seconds("2147483647"), Some(2_147_483_647));
        assert_eq!(parse_delta_seconds("2147483648"), Some(DELTA_SECONDS_CAP));
    }

    #[test]
    fn rfc9111_1_2_2_invalid_delta_seconds_rejected() {
        for bad in ["", "-1", "+5", "1.5", " 5", "abc", "5s"] {
            assert_eq!(parse_delta_seconds(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn rfc9111_4_2_1_invalid_max_age_means_stale() {
        let d = ResponseDirectives::parse("max-age=abc");
        assert_eq!(d.max_age, Some(0));
        assert!(d.freshness_conflict);
        let d = ResponseDirectives::parse("max-age");
        assert_eq!(d.max_age, Some(0));
        let d = ResponseDirectives::parse("max-age=-5");
        assert_eq!(d.max_age, Some(0));
    }

    #[test]
    fn rfc9111_4_2_1_conflicting_duplicate_max_age_means_stale() {
        let h = headers(&[
            ("cache-control", "max-age=60"),
            ("cache-control", "max-age=3600"),
        ]);
        let d = ResponseDirectives::from_headers(&h);
        assert_eq!(d.max_age, Some(0));
        assert!(d.freshness_conflict);
    }

    #[test]
    fn rfc9111_4_2_1_repeated_max_age_with_different_values_means_stale() {
        // "either the first occurrence should be used or the response should
        // be considered stale": Meridian considers it stale, whichever value
        // comes first and whether on one line or several.
        for lines in [
            &["max-age=3600, max-age=1"][..],
            &["max-age=1, max-age=3600"],
            &["max-age=3600", "max-age=1"],
            &["max-age=1", "max-age=3600"],
            &["max-age=3600", "max-age=abc"],
        ] {
            let d = ResponseDirectives::parse_lines(lines.iter().map(|l| l.as_bytes()));
            assert_eq!(d.max_age, Some(0), "{lines:?}");
            assert!(d.freshness_conflict, "{lines:?}");
        }
    }

    #[test]
    fn rfc9111_4_2_1_identical_duplicate_max_age_is_not_a_conflict() {
        let d = ResponseDirectives::parse("max-age=60, max-age=\"60\"");
        assert_eq!(d.max_age, Some(60));
        assert!(!d.freshness_conflict);
    }

    #[test]
    fn rfc9111_4_2_1_conflicting_s_maxage_means_stale() {
        let d = ResponseDirectives::parse("s-maxage=10, s-maxage=20, max-age=100");
        assert_eq!(d.s_maxage, Some(0));
        assert_eq!(d.max_age, Some(100));
        assert!(d.freshness_conflict);
    }

    #[test]
    fn rfc9111_5_2_2_4_no_cache_unqualified_and_qualified() {
        assert_eq!(
            ResponseDirectives::parse("no-cache").no_cache,
            FieldScope::All
        );
        assert_eq!(
            ResponseDirectives::parse(r#"no-cache="Set-Cookie, X-Foo""#).no_cache,
            names(&["set-cookie", "x-foo"])
        );
        // Token form (senders SHOULD quote, recipients accept both).
        assert_eq!(
            ResponseDirectives::parse("no-cache=set-cookie").no_cache,
            names(&["set-cookie"])
        );
    }

    #[test]
    fn rfc9111_5_2_2_4_qualified_no_cache_lists_are_unioned_and_unqualified_wins() {
        let d = ResponseDirectives::parse(r#"no-cache="a", no-cache="b, a""#);
        assert_eq!(d.no_cache, names(&["a", "b"]));
        let d = ResponseDirectives::parse(r#"no-cache="a", no-cache"#);
        assert_eq!(d.no_cache, FieldScope::All);
    }

    #[test]
    fn rfc9111_5_2_2_7_private_qualified_and_empty_list() {
        assert_eq!(
            ResponseDirectives::parse(r#"private="Authorization-Info""#).private,
            names(&["authorization-info"])
        );
        // Empty list -> treated as unqualified (conservative).
        assert_eq!(
            ResponseDirectives::parse(r#"private="""#).private,
            FieldScope::All
        );
        // Invalid field names -> unqualified.
        assert_eq!(
            ResponseDirectives::parse(r#"private="a b""#).private,
            FieldScope::All
        );
    }

    #[test]
    fn quoted_string_with_comma_and_escapes_stays_one_directive() {
        let d = ResponseDirectives::parse(r#"no-cache="a,\"b", max-age=5"#);
        // `"b` is not a valid field name -> unqualified; max-age survives.
        assert_eq!(d.no_cache, FieldScope::All);
        assert_eq!(d.max_age, Some(5));
    }

    #[test]
    fn malformed_restrictive_directives_are_still_honoured() {
        let d = ResponseDirectives::parse(r#"no-store junk, private="unterminated"#);
        assert!(d.no_store);
        assert_eq!(d.private, FieldScope::All);
    }

    #[test]
    fn malformed_permissive_directives_are_ignored() {
        let d = ResponseDirectives::parse("public junk, immutable=\"x\" y");
        assert!(!d.public);
        assert!(!d.immutable);
    }

    #[test]
    fn rfc9111_5_2_3_unknown_extensions_ignored() {
        let d = ResponseDirectives::parse(r#"community="UCI", foo=bar, max-age=7, ,,"#);
        assert_eq!(d.max_age, Some(7));
        assert_eq!(
            d,
            ResponseDirectives {
                max_age: Some(7),
                ..Default::default()
            }
        );
    }

    #[test]
    fn rfc5861_stale_directives_parsed_and_duplicates_take_minimum() {
        let d = ResponseDirectives::parse(
            "stale-while-revalidate=60, stale-if-error=600, stale-while-revalidate=30",
        );
        assert_eq!(d.stale_while_revalidate, Some(30));
        assert_eq!(d.stale_if_error, Some(600));
        let d = ResponseDirectives::parse("stale-while-revalidate=abc");
        assert_eq!(d.stale_while_revalidate, None);
    }

    #[test]
    fn rfc9111_4_2_1_an_invalid_repeat_drops_a_stale_allowance() {
        // Most restrictive of {invalid (no allowance), 30}: no allowance.
        for cc in [
            "stale-while-revalidate=abc, stale-while-revalidate=30",
            "stale-while-revalidate=30, stale-while-revalidate",
            "stale-while-revalidate=30, stale-while-revalidate= 30",
        ] {
            assert_eq!(
                ResponseDirectives::parse(cc).stale_while_revalidate,
                None,
                "{cc:?}"
            );
        }
        let h = headers(&[
            ("cache-control", "max-age=1, stale-if-error=600"),
            ("cache-control", "stale-if-error=10s"),
        ]);
        assert_eq!(ResponseDirectives::from_headers(&h).stale_if_error, None);
        let d = ResponseDirectives::parse("stale-if-error=600, stale-if-error=\"60\"");
        assert_eq!(d.stale_if_error, Some(60));
    }

    #[test]
    fn rfc9111_5_2_1_request_directives_parsed() {
        let r = RequestDirectives::parse(
            "max-age=10, max-stale, min-fresh=5, no-cache, no-store, only-if-cached, no-transform",
        );
        assert_eq!(r.max_age, Some(10));
        assert_eq!(r.max_stale, Some(MaxStale::Any));
        assert_eq!(r.min_fresh, Some(5));
        assert!(r.no_cache && r.no_store && r.only_if_cached && r.no_transform);
    }

    #[test]
    fn rfc9111_5_2_1_2_max_stale_with_value_and_duplicates() {
        assert_eq!(
            RequestDirectives::parse("max-stale=30").max_stale,
            Some(MaxStale::Limit(30))
        );
        assert_eq!(
            RequestDirectives::parse("max-stale, max-stale=30, max-stale=10").max_stale,
            Some(MaxStale::Limit(10))
        );
        assert_eq!(RequestDirectives::parse("max-stale=x").max_stale, None);
    }

    #[test]
    fn request_invalid_max_age_is_most_restrictive_and_min_fresh_takes_max() {
        assert_eq!(RequestDirectives::parse("max-age=x").max_age, Some(0));
        assert_eq!(
            RequestDirectives::parse("max-age=9, max-age=3").max_age,
            Some(3)
        );
        assert_eq!(
            RequestDirectives::parse("min-fresh=3, min-fresh=9").min_fresh,
            Some(9)
        );
        assert_eq!(RequestDirectives::parse("min-fresh=zz").min_fresh, None);
    }

    #[test]
    fn non_utf8_bytes_do_not_break_parsing() {
        let d = ResponseDirectives::parse_lines([&b"max-age=5, x=\"\xff\xfe\", no-store"[..]]);
        assert_eq!(d.max_age, Some(5));
        assert!(d.no_store);
    }

    proptest! {
        #[test]
        fn prop_response_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ResponseDirectives::parse_lines([&bytes[..]]);
            let _ = RequestDirectives::parse_lines([&bytes[..]]);
        }

        #[test]
        fn prop_structured_garbage_never_panics(s in r#"([a-zA-Z-]{0,12}(=("[^"]{0,10}"?|[0-9a-z]{0,12}))?[ ,]{0,3}){0,8}"#) {
            let d = ResponseDirectives::parse(&s);
            if let Some(v) = d.max_age {
                prop_assert!(v <= DELTA_SECONDS_CAP);
            }
            let _ = RequestDirectives::parse(&s);
        }
    }
}
