//! Conditional requests: answering client conditionals from cache
//! (RFC 9111 §4.3.2, RFC 9110 §13), building revalidation requests
//! (RFC 9111 §4.3.1), and freshening stored responses with a 304
//! (RFC 9111 §3.2, §4.3.4).

use std::time::SystemTime;

use http::{
    HeaderMap, HeaderName, HeaderValue, Method,
    header::{
        AGE, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_LOCATION, CONTENT_RANGE,
        DATE, ETAG, EXPIRES, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE,
        IF_UNMODIFIED_SINCE, LAST_MODIFIED, RANGE, VARY,
    },
};

use super::storability::fields_excluded_from_storage;
use super::{StoredResponse, fmt_http_date, header_date, list_elements, trim_ows, unix_secs};

/// An entity tag (RFC 9110 §8.8.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityTag {
    /// `W/` prefix present.
    pub weak: bool,
    /// The opaque-tag without the surrounding quotes.
    pub tag: Vec<u8>,
}

impl EntityTag {
    /// Parses `W/"x"` or `"x"`; `None` if malformed.
    pub fn parse(s: &[u8]) -> Option<Self> {
        let s = trim_ows(s);
        let (weak, rest) = match s.strip_prefix(b"W/") {
            Some(r) => (true, r),
            None => (false, s),
        };
        let inner = rest.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
        if !inner
            .iter()
            .all(|&b| b == 0x21 || (0x23..=0x7e).contains(&b) || b >= 0x80)
        {
            return None;
        }
        Some(Self {
            weak,
            tag: inner.to_vec(),
        })
    }

    /// Weak comparison: opaque tags equal, weakness ignored.
    pub fn weak_eq(&self, other: &Self) -> bool {
        self.tag == other.tag
    }

    /// Strong comparison: both strong and opaque tags equal.
    pub fn strong_eq(&self, other: &Self) -> bool {
        !self.weak && !other.weak && self.tag == other.tag
    }
}

fn stored_etag(headers: &HeaderMap) -> Option<EntityTag> {
    EntityTag::parse(headers.get(ETAG)?.as_bytes())
}

/// Result of evaluating a client's conditional request against the stored
/// response selected to answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionalResult {
    /// No precondition the cache evaluates: serve the stored response.
    Unconditional,
    /// Answer `304 Not Modified` (use [`not_modified_response_headers`]).
    NotModified,
    /// Precondition evaluated and passed: serve the full stored response.
    Modified,
    /// Preconditions only the origin can evaluate (`If-Match`,
    /// `If-Unmodified-Since`) or an unparseable `If-None-Match`: forward the
    /// request instead of answering from cache (RFC 9111 §4.3.2).
    Forward,
}

/// Evaluates `If-None-Match` / `If-Modified-Since` against `stored`
/// (RFC 9111 §4.3.2, RFC 9110 §13.1.2, §13.1.3, §13.2.2).
///
/// * Only GET and HEAD are answered from cache; other methods → `Forward`.
/// * Preconditions are ignored when the stored status is not 2xx
///   (RFC 9110 §13.2.1).
/// * `If-None-Match` uses weak comparison; `*` matches any stored response.
///   When present, `If-Modified-Since` is ignored.
/// * `If-Modified-Since` is compared with the stored `Last-Modified`, else
///   `Date`, else the time the response was received. It is ignored when
///   invalid or repeated.
pub fn evaluate_client_conditionals(
    method: &Method,
    req_headers: &HeaderMap,
    stored: &StoredResponse,
    now: SystemTime,
) -> ConditionalResult {
    if method != Method::GET && method != Method::HEAD {
        return ConditionalResult::Forward;
    }
    if req_headers.contains_key(IF_MATCH) || req_headers.contains_key(IF_UNMODIFIED_SINCE) {
        return ConditionalResult::Forward;
    }
    if !stored.status.is_success() {
        return ConditionalResult::Unconditional;
    }
    if req_headers.contains_key(IF_NONE_MATCH) {
        let elems = list_elements(req_headers, &IF_NONE_MATCH);
        if elems.iter().any(|e| *e == b"*") {
            return ConditionalResult::NotModified;
        }
        let tags: Vec<EntityTag> = elems.iter().filter_map(|e| EntityTag::parse(e)).collect();
        if tags.is_empty() {
            return ConditionalResult::Forward;
        }
        let current = stored_etag(&stored.headers);
        let matched = current.is_some_and(|c| tags.iter().any(|t| t.weak_eq(&c)));
        return if matched {
            ConditionalResult::NotModified
        } else {
            ConditionalResult::Modified
        };
    }
    let ims_lines: Vec<_> = req_headers.get_all(IF_MODIFIED_SINCE).iter().collect();
    let [ims] = ims_lines.as_slice() else {
        return ConditionalResult::Unconditional;
    };
    let Some(ims) = super::parse_http_date(ims.as_bytes(), now) else {
        return ConditionalResult::Unconditional;
    };
    let last_modified = header_date(&stored.headers, &LAST_MODIFIED, stored.response_time)
        .or_else(|| header_date(&stored.headers, &DATE, stored.response_time))
        .unwrap_or_else(|| unix_secs(stored.response_time));
    if last_modified <= unix_secs(ims) {
        ConditionalResult::NotModified
    } else {
        ConditionalResult::Modified
    }
}

/// Header fields of a 304 generated from a stored response (RFC 9110
/// §15.4.5): `Cache-Control`, `Content-Location`, `Date`, `ETag`, `Expires`,
/// `Vary`, and `Last-Modified` only when there is no `ETag`. The caller adds
/// `Age` and `Cache-Status`.
pub fn not_modified_response_headers(stored_headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    let mut copy = |name: &HeaderName| {
        for v in stored_headers.get_all(name) {
            out.append(name.clone(), v.clone());
        }
    };
    for name in [
        &CACHE_CONTROL,
        &CONTENT_LOCATION,
        &DATE,
        &ETAG,
        &EXPIRES,
        &VARY,
    ] {
        copy(name);
    }
    if !stored_headers.contains_key(ETAG) {
        copy(&LAST_MODIFIED);
    }
    out
}

/// Evaluates `If-Range` (RFC 9110 §13.1.5) for serving a `Range` request
/// from a stored response: `true` when there is no `If-Range`, or its entity
/// tag strongly matches the stored `ETag`, or its date exactly equals a
/// strong stored `Last-Modified` (at least one second before `Date`,
/// §8.8.2.2). When `false` the full representation must be sent.
pub fn if_range_matches(req_headers: &HeaderMap, stored: &StoredResponse) -> bool {
    let Some(v) = req_headers.get(IF_RANGE) else {
        return true;
    };
    let v = trim_ows(v.as_bytes());
    if v.starts_with(b"\"") || v.starts_with(b"W/") {
        let (Some(tag), Some(current)) = (EntityTag::parse(v), stored_etag(&stored.headers)) else {
            return false;
        };
        return tag.strong_eq(&current);
    }
    let reference = stored.response_time;
    let (Some(date), Some(lm), Some(stored_date)) = (
        super::parse_http_date(v, reference).map(unix_secs),
        header_date(&stored.headers, &LAST_MODIFIED, reference),
        header_date(&stored.headers, &DATE, reference),
    ) else {
        return false;
    };
    date == lm && lm < stored_date
}

/// Builds the header section for revalidating `stored_headers` on behalf of
/// a client request (RFC 9111 §4.3.1): the client's fields minus its own
/// conditionals and `Range` (the cache wants a full 200 if changed), plus
/// `If-None-Match` from the stored `ETag` and `If-Modified-Since` from a
/// valid stored `Last-Modified`.
pub fn revalidation_request_headers(
    client_headers: &HeaderMap,
    stored_headers: &HeaderMap,
) -> HeaderMap {
    let mut out = client_headers.clone();
    for name in [
        IF_MATCH,
        IF_NONE_MATCH,
        IF_MODIFIED_SINCE,
        IF_UNMODIFIED_SINCE,
        IF_RANGE,
        RANGE,
    ] {
        out.remove(name);
    }
    if let Some(v) = if_none_match_for_variants([stored_headers]) {
        out.insert(IF_NONE_MATCH, v);
    }
    if let Some(lm) = stored_headers.get(LAST_MODIFIED)
        && super::parse_http_date(lm.as_bytes(), SystemTime::UNIX_EPOCH).is_some()
    {
        out.insert(IF_MODIFIED_SINCE, lm.clone());
    }
    out
}

/// `If-None-Match` listing the entity tags of several stored variants, so
/// one revalidation can select among them (RFC 9111 §4.3.1). Duplicates and
/// malformed tags are dropped; `None` if there are no tags.
pub fn if_none_match_for_variants<'a>(
    stored: impl IntoIterator<Item = &'a HeaderMap>,
) -> Option<HeaderValue> {
    let mut tags: Vec<Vec<u8>> = Vec::new();
    for headers in stored {
        for v in headers.get_all(ETAG) {
            let raw = trim_ows(v.as_bytes());
            if EntityTag::parse(raw).is_some() && !tags.iter().any(|t| t == raw) {
                tags.push(raw.to_vec());
            }
        }
    }
    if tags.is_empty() {
        return None;
    }
    HeaderValue::from_bytes(&tags.join(&b", "[..])).ok()
}

/// Which stored responses a 304 applies to (RFC 9111 §4.3.4). Returns
/// indices into `candidates`:
///
/// * a strong `ETag` in the 304 selects every candidate with a strongly
///   matching `ETag`;
/// * otherwise a weak `ETag` or a `Last-Modified` (treated as weak) selects
///   the most recently received matching candidate;
/// * with no validator, a single candidate without validators is selected;
/// * otherwise nothing is selected (the caller should refetch).
pub fn select_stored_for_update(
    not_modified: &HeaderMap,
    candidates: &[&StoredResponse],
) -> Vec<usize> {
    let etag = stored_etag(not_modified);
    if let Some(tag) = etag.as_ref().filter(|t| !t.weak) {
        return candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| stored_etag(&c.headers).is_some_and(|s| s.strong_eq(tag)))
            .map(|(i, _)| i)
            .collect();
    }
    let lm = not_modified.get(LAST_MODIFIED);
    if etag.is_some() || lm.is_some() {
        let matches = |c: &StoredResponse| match &etag {
            Some(t) => stored_etag(&c.headers).is_some_and(|s| s.weak_eq(t)),
            None => c.headers.get(LAST_MODIFIED) == lm,
        };
        return candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| matches(c))
            .max_by_key(|(_, c)| unix_secs(c.response_time))
            .map(|(i, _)| vec![i])
            .unwrap_or_default();
    }
    match candidates {
        [only] if !only.headers.contains_key(ETAG) && !only.headers.contains_key(LAST_MODIFIED) => {
            vec![0]
        }
        _ => Vec::new(),
    }
}

/// Fields a 304 does not update (RFC 9111 §3.2). The cache "MUST add each
/// header field in the provided response to the stored response, replacing
/// field values that are already present", except:
///
/// * fields excepted from storage (§3.1): hop-by-hop, `Connection`-listed,
///   proxy-specific (`Proxy-Authenticate`, `Proxy-Authentication-Info`,
///   `Proxy-Authorization`) and qualified-`private` fields;
/// * `Content-Length` (the stored body keeps its length);
/// * `Content-Range`, a field "automatically processed and removed" that
///   implementations "MAY automatically omit ... from updates" (a stored
///   response is always a complete 200);
/// * `Content-Encoding` only when it would name another coding than the
///   stored one: the stored bytes are in the stored coding (and store-phase
///   plugins may have processed them because of it), so relabelling them
///   would break "integrity of the stored response", the one ground §3.2
///   gives for omitting a field. The same coding (`identity` being none) is
///   updated like any other field.
///
/// Everything else is updated, `Content-*` fields included ("the Content-*
/// prefix is not a signal that a header field is omitted from update").
fn excluded_from_update(stored: &HeaderMap, not_modified: &HeaderMap) -> Vec<HeaderName> {
    let mut out = fields_excluded_from_storage(not_modified);
    out.extend([CONTENT_LENGTH, CONTENT_RANGE]);
    if not_modified.contains_key(CONTENT_ENCODING)
        && content_codings(stored) != content_codings(not_modified)
    {
        out.push(CONTENT_ENCODING);
    }
    out
}

/// The content codings a header section applies, in order, lowercased and
/// without `identity` (RFC 9110 §8.4: codings are case-insensitive and
/// `identity` is no coding).
fn content_codings(headers: &HeaderMap) -> Vec<Vec<u8>> {
    list_elements(headers, &CONTENT_ENCODING)
        .into_iter()
        .map(<[u8]>::to_ascii_lowercase)
        .filter(|c| c != b"identity")
        .collect()
}

/// Replaces stored fields with those present in the 304, field by field
/// (all lines of a field are replaced together), except the fields
/// [`excluded_from_update`] lists: those excepted from storage,
/// `Content-Length`, `Content-Range`, and a `Content-Encoding` naming
/// another coding than the stored one (RFC 9111 §3.2).
pub fn merge_not_modified_headers(stored: &mut HeaderMap, not_modified: &HeaderMap) {
    let excluded = excluded_from_update(stored, not_modified);
    for name in not_modified.keys() {
        if excluded.contains(name) {
            continue;
        }
        stored.remove(name);
        for v in not_modified.get_all(name) {
            stored.append(name.clone(), v.clone());
        }
    }
}

/// Freshens `stored` with a 304 received for a revalidation sent at
/// `request_time` and answered at `response_time`: merges headers and
/// re-bases the age calculation. A stale stored `Age` is dropped when the
/// 304 has none, and `Date` is set to `response_time` when the 304 lacks it
/// (RFC 9110 §6.6.1), so the old `Date` cannot make the entry look old.
pub fn freshen_stored_response(
    stored: &mut StoredResponse,
    not_modified: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) {
    merge_not_modified_headers(&mut stored.headers, not_modified);
    if !not_modified.contains_key(AGE) {
        stored.headers.remove(AGE);
    }
    if !not_modified.contains_key(DATE)
        && let Ok(v) = HeaderValue::from_str(&fmt_http_date(response_time))
    {
        stored.headers.insert(DATE, v);
    }
    stored.request_time = request_time;
    stored.response_time = response_time;
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{at, date, headers};
    use super::*;
    use http::StatusCode;

    fn stored(h: &[(&str, &str)]) -> StoredResponse {
        StoredResponse {
            status: StatusCode::OK,
            headers: headers(h),
            request_time: at(0),
            response_time: at(0),
        }
    }

    fn eval(req: &[(&str, &str)], s: &StoredResponse) -> ConditionalResult {
        evaluate_client_conditionals(&Method::GET, &headers(req), s, at(10))
    }

    #[test]
    fn rfc9110_8_8_3_etag_parsing_and_comparison() {
        let strong = EntityTag::parse(br#""abc""#).expect("strong");
        let weak = EntityTag::parse(br#"W/"abc""#).expect("weak");
        assert!(!strong.weak && weak.weak);
        assert!(strong.weak_eq(&weak));
        assert!(!strong.strong_eq(&weak));
        assert!(strong.strong_eq(&strong.clone()));
        for bad in [&b"abc"[..], b"\"a\"b\"", b"w/\"a\"", b"\"abc"] {
            assert_eq!(EntityTag::parse(bad), None);
        }
    }

    #[test]
    fn rfc9110_13_1_2_if_none_match_weak_comparison_yields_304() {
        let s = stored(&[("etag", r#""v1""#)]);
        assert_eq!(
            eval(&[("if-none-match", r#"W/"v1""#)], &s),
            ConditionalResult::NotModified
        );
        let s = stored(&[("etag", r#"W/"v1""#)]);
        assert_eq!(
            eval(&[("if-none-match", r#""v1""#)], &s),
            ConditionalResult::NotModified
        );
    }

    #[test]
    fn rfc9110_13_1_2_if_none_match_list_and_multiple_lines() {
        let s = stored(&[("etag", r#""v3""#)]);
        assert_eq!(
            eval(
                &[
                    ("if-none-match", r#""v1", "v2""#),
                    ("if-none-match", r#""v3""#)
                ],
                &s
            ),
            ConditionalResult::NotModified
        );
        assert_eq!(
            eval(&[("if-none-match", r#""v1", "v2""#)], &s),
            ConditionalResult::Modified
        );
    }

    #[test]
    fn rfc9110_13_1_2_if_none_match_star_matches_any_stored_response() {
        let s = stored(&[]);
        assert_eq!(
            eval(&[("if-none-match", "*")], &s),
            ConditionalResult::NotModified
        );
    }

    #[test]
    fn rfc9110_13_1_2_if_none_match_without_stored_etag_is_modified() {
        let s = stored(&[("last-modified", &date(-100))]);
        assert_eq!(
            eval(&[("if-none-match", r#""x""#)], &s),
            ConditionalResult::Modified
        );
    }

    #[test]
    fn rfc9110_13_1_3_if_modified_since_ignored_when_if_none_match_present() {
        let s = stored(&[("etag", r#""v1""#), ("last-modified", &date(-100))]);
        let ims = date(0);
        let req: [(&str, &str); 2] = [("if-none-match", r#""other""#), ("if-modified-since", &ims)];
        assert_eq!(eval(&req, &s), ConditionalResult::Modified);
    }

    #[test]
    fn rfc9110_13_1_3_if_modified_since_against_last_modified() {
        let s = stored(&[("last-modified", &date(-100))]);
        assert_eq!(
            eval(&[("if-modified-since", &date(-100))], &s),
            ConditionalResult::NotModified
        );
        assert_eq!(
            eval(&[("if-modified-since", &date(-101))], &s),
            ConditionalResult::Modified
        );
    }

    #[test]
    fn rfc9111_4_3_2_if_modified_since_falls_back_to_date_then_receipt_time() {
        let s = stored(&[("date", &date(-50))]);
        assert_eq!(
            eval(&[("if-modified-since", &date(-50))], &s),
            ConditionalResult::NotModified
        );
        let s = stored(&[]);
        assert_eq!(
            eval(&[("if-modified-since", &date(-1))], &s),
            ConditionalResult::Modified
        );
        assert_eq!(
            eval(&[("if-modified-since", &date(0))], &s),
            ConditionalResult::NotModified
        );
    }

    #[test]
    fn rfc9110_13_1_3_invalid_or_repeated_if_modified_since_ignored() {
        let s = stored(&[("last-modified", &date(-100))]);
        assert_eq!(
            eval(&[("if-modified-since", "yesterday")], &s),
            ConditionalResult::Unconditional
        );
        assert_eq!(
            eval(
                &[
                    ("if-modified-since", &date(0)),
                    ("if-modified-since", &date(0))
                ],
                &s
            ),
            ConditionalResult::Unconditional
        );
    }

    #[test]
    fn rfc9110_13_1_3_if_modified_since_only_for_get_and_head() {
        let s = stored(&[("last-modified", &date(-100))]);
        let req = headers(&[("if-modified-since", &date(0))]);
        assert_eq!(
            evaluate_client_conditionals(&Method::HEAD, &req, &s, at(0)),
            ConditionalResult::NotModified
        );
        assert_eq!(
            evaluate_client_conditionals(&Method::POST, &req, &s, at(0)),
            ConditionalResult::Forward
        );
    }

    #[test]
    fn rfc9111_4_3_2_origin_only_preconditions_are_forwarded() {
        let s = stored(&[("etag", r#""v1""#)]);
        assert_eq!(
            eval(&[("if-match", r#""v1""#)], &s),
            ConditionalResult::Forward
        );
        assert_eq!(
            eval(&[("if-unmodified-since", &date(0))], &s),
            ConditionalResult::Forward
        );
        assert_eq!(
            eval(&[("if-none-match", "garbage")], &s),
            ConditionalResult::Forward
        );
    }

    #[test]
    fn rfc9110_13_2_1_preconditions_ignored_for_non_2xx_stored_response() {
        let mut s = stored(&[("etag", r#""v1""#)]);
        s.status = StatusCode::NOT_FOUND;
        assert_eq!(
            eval(&[("if-none-match", r#""v1""#)], &s),
            ConditionalResult::Unconditional
        );
    }

    #[test]
    fn no_conditionals_is_unconditional() {
        assert_eq!(
            eval(&[], &stored(&[("etag", r#""v1""#)])),
            ConditionalResult::Unconditional
        );
    }

    #[test]
    fn rfc9110_15_4_5_304_carries_cache_related_fields_only() {
        let h = headers(&[
            ("cache-control", "max-age=60"),
            ("content-location", "/a"),
            ("date", &date(0)),
            ("etag", r#""v1""#),
            ("expires", &date(60)),
            ("vary", "accept-encoding"),
            ("last-modified", &date(-10)),
            ("content-type", "text/html"),
            ("content-length", "42"),
        ]);
        let nm = not_modified_response_headers(&h);
        assert_eq!(nm.len(), 6);
        assert!(!nm.contains_key(LAST_MODIFIED));
        assert!(!nm.contains_key("content-type"));
        let mut no_etag = h.clone();
        no_etag.remove(ETAG);
        assert!(not_modified_response_headers(&no_etag).contains_key(LAST_MODIFIED));
    }

    #[test]
    fn rfc9111_4_3_1_revalidation_request_uses_stored_validators() {
        let client = headers(&[
            ("accept", "*/*"),
            ("if-none-match", r#""client""#),
            ("if-modified-since", &date(-5)),
            ("range", "bytes=0-10"),
        ]);
        let stored_h = headers(&[("etag", r#""v1""#), ("last-modified", &date(-100))]);
        let out = revalidation_request_headers(&client, &stored_h);
        assert_eq!(out.get(IF_NONE_MATCH).expect("inm"), r#""v1""#);
        assert_eq!(
            out.get(IF_MODIFIED_SINCE)
                .expect("ims")
                .to_str()
                .expect("ascii"),
            date(-100)
        );
        assert!(!out.contains_key(RANGE));
        assert_eq!(out.get("accept").expect("accept"), "*/*");
        // No validators -> no conditionals (an unconditional refetch).
        let out = revalidation_request_headers(&client, &headers(&[("last-modified", "garbage")]));
        assert!(!out.contains_key(IF_NONE_MATCH) && !out.contains_key(IF_MODIFIED_SINCE));
    }

    #[test]
    fn rfc9111_4_3_1_if_none_match_lists_all_variant_etags() {
        let a = headers(&[("etag", r#""a""#)]);
        let b = headers(&[("etag", r#"W/"b""#)]);
        let c = headers(&[("etag", r#""a""#)]);
        let d = headers(&[("etag", "bogus")]);
        let v = if_none_match_for_variants([&a, &b, &c, &d]).expect("value");
        assert_eq!(v, r#""a", W/"b""#);
        assert_eq!(if_none_match_for_variants([&HeaderMap::new()]), None);
    }

    #[test]
    fn rfc9111_4_3_4_strong_validator_selects_all_strong_matches() {
        let a = stored(&[("etag", r#""x""#)]);
        let b = stored(&[("etag", r#""y""#)]);
        let c = stored(&[("etag", r#""x""#)]);
        let w = stored(&[("etag", r#"W/"x""#)]);
        let nm = headers(&[("etag", r#""x""#)]);
        assert_eq!(select_stored_for_update(&nm, &[&a, &b, &c, &w]), vec![0, 2]);
    }

    #[test]
    fn rfc9111_4_3_4_weak_validator_selects_most_recent_match() {
        let mut old = stored(&[("etag", r#"W/"x""#)]);
        old.response_time = at(-100);
        let new = stored(&[("etag", r#""x""#)]);
        let other = stored(&[("etag", r#""z""#)]);
        let nm = headers(&[("etag", r#"W/"x""#)]);
        assert_eq!(
            select_stored_for_update(&nm, &[&old, &new, &other]),
            vec![1]
        );
        let lm = date(-500);
        let by_lm = stored(&[("last-modified", &lm)]);
        let nm = headers(&[("last-modified", &lm)]);
        assert_eq!(select_stored_for_update(&nm, &[&other, &by_lm]), vec![1]);
    }

    #[test]
    fn rfc9111_4_3_4_no_validator_selects_single_validatorless_response() {
        let plain = stored(&[("content-type", "text/plain")]);
        assert_eq!(
            select_stored_for_update(&HeaderMap::new(), &[&plain]),
            vec![0]
        );
        assert!(select_stored_for_update(&HeaderMap::new(), &[&plain, &plain]).is_empty());
        let tagged = stored(&[("etag", r#""x""#)]);
        assert!(select_stored_for_update(&HeaderMap::new(), &[&tagged]).is_empty());
    }

    #[test]
    fn rfc9111_3_2_merge_updates_every_field_but_the_excepted_ones() {
        // As the update tests of a conformance suite do: each field the 304
        // carries replaces the stored one, Content-* fields included.
        let mut s = headers(&[
            ("cache-control", "max-age=1"),
            ("content-type", "text/plain"),
            ("content-location", "/foo"),
            ("content-md5", "rL0Y20zC+Fzt72VPzMSk2A=="),
            ("content-language", "en"),
            ("content-disposition", "inline"),
            ("content-security-policy", "default-src 'self'"),
            ("x-frame-options", "deny"),
            ("expires", &date(1)),
            ("content-length", "100"),
            ("x-kept", "k"),
        ]);
        let nm = headers(&[
            ("cache-control", "max-age=3600"),
            ("content-type", "text/plain;charset=utf-8"),
            ("content-location", "/bar"),
            ("content-md5", "N7UdGUp1E+RbVvZSTy1R8g=="),
            ("content-language", "fr"),
            ("content-disposition", "attachment"),
            (
                "content-security-policy",
                "default-src 'self' cdn.example.com",
            ),
            ("x-frame-options", "sameorigin"),
            ("expires", &date(3600)),
            ("content-length", "0"),
            ("content-range", "bytes 0-1/100"),
            ("proxy-authenticate", "Basic"),
            ("proxy-authentication-info", "nextnonce=\"x\""),
            ("keep-alive", "timeout=5"),
        ]);
        merge_not_modified_headers(&mut s, &nm);
        for name in [
            "cache-control",
            "content-type",
            "content-location",
            "content-md5",
            "content-language",
            "content-disposition",
            "content-security-policy",
            "x-frame-options",
            "expires",
        ] {
            assert_eq!(s.get(name), nm.get(name), "{name} updated");
        }
        assert_eq!(s.get(CONTENT_LENGTH).expect("cl"), "100");
        assert_eq!(s.get("x-kept").expect("kept"), "k");
        // Excepted from storage (§3.1), and Content-Range (MAY omit).
        for name in [
            "content-range",
            "proxy-authenticate",
            "proxy-authentication-info",
            "keep-alive",
        ] {
            assert!(!s.contains_key(name), "{name} not stored");
        }
    }

    #[test]
    fn rfc9111_3_2_content_encoding_updates_unless_it_relabels_the_stored_bytes() {
        // Same coding, written differently: updated.
        let mut s = headers(&[("content-encoding", "gzip")]);
        merge_not_modified_headers(&mut s, &headers(&[("content-encoding", "GZIP")]));
        assert_eq!(s.get(CONTENT_ENCODING).expect("ce"), "GZIP");
        // `identity` is no coding: the same as none.
        let mut s = headers(&[("content-type", "text/plain")]);
        merge_not_modified_headers(&mut s, &headers(&[("content-encoding", "identity")]));
        assert_eq!(s.get(CONTENT_ENCODING).expect("ce"), "identity");
        // Another coding would mislabel the stored bytes: kept as stored.
        let mut s = headers(&[("content-encoding", "gzip")]);
        merge_not_modified_headers(&mut s, &headers(&[("content-encoding", "br")]));
        assert_eq!(s.get(CONTENT_ENCODING).expect("ce"), "gzip");
        let mut s = headers(&[("content-type", "text/plain")]);
        merge_not_modified_headers(&mut s, &headers(&[("content-encoding", "gzip")]));
        assert!(!s.contains_key(CONTENT_ENCODING));
    }

    #[test]
    fn rfc9111_3_2_merge_replaces_whole_fields_and_drops_connection_listed_ones() {
        let mut s = headers(&[
            ("cache-control", "max-age=10"),
            ("content-length", "100"),
            ("content-encoding", "gzip"),
            ("x-old", "keep"),
            ("link", "</a>"),
            ("link", "</b>"),
        ]);
        let nm = headers(&[
            ("cache-control", "max-age=600"),
            ("content-length", "0"),
            ("content-encoding", "br"),
            ("link", "</c>"),
            ("connection", "x-hop"),
            ("x-hop", "1"),
        ]);
        merge_not_modified_headers(&mut s, &nm);
        assert_eq!(s.get(CACHE_CONTROL).expect("cc"), "max-age=600");
        assert_eq!(s.get(CONTENT_LENGTH).expect("cl"), "100");
        assert_eq!(s.get(CONTENT_ENCODING).expect("ce"), "gzip");
        assert_eq!(s.get_all("link").iter().count(), 1);
        assert_eq!(s.get("x-old").expect("kept"), "keep");
        assert!(!s.contains_key("x-hop") && !s.contains_key("connection"));
    }

    #[test]
    fn rfc9111_4_3_4_freshen_rebases_age_calculation() {
        let mut s = stored(&[
            ("cache-control", "max-age=10"),
            ("date", &date(0)),
            ("age", "5"),
        ]);
        let nm = headers(&[("cache-control", "max-age=60")]);
        freshen_stored_response(&mut s, &nm, at(100), at(101));
        assert!(!s.headers.contains_key(AGE));
        assert_eq!(
            s.headers.get(DATE).expect("date").to_str().expect("ascii"),
            date(101)
        );
        assert_eq!(s.response_time, at(101));
        // Only the new response delay (1s) counts; the old Date/Age are gone.
        assert_eq!(
            super::super::age::current_age(&s, at(101)),
            std::time::Duration::from_secs(1)
        );
    }

    #[test]
    fn rfc9110_13_1_5_if_range_requires_strong_match() {
        let s = stored(&[
            ("etag", r#""v1""#),
            ("last-modified", &date(-100)),
            ("date", &date(0)),
        ]);
        let ok = |v: &str| if_range_matches(&headers(&[("if-range", v)]), &s);
        assert!(if_range_matches(&HeaderMap::new(), &s));
        assert!(ok(r#""v1""#));
        assert!(!ok(r#"W/"v1""#));
        assert!(!ok(r#""v2""#));
        assert!(ok(&date(-100)));
        assert!(!ok(&date(-99)));
        // Last-Modified equal to Date is weak -> no match.
        let weak_lm = stored(&[("last-modified", &date(0)), ("date", &date(0))]);
        assert!(!if_range_matches(
            &headers(&[("if-range", &date(0))]),
            &weak_lm
        ));
    }
}
