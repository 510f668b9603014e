//! `Vary` handling (RFC 9111 §4.1): secondary cache keys.
//!
//! Normalisation applied to a request field before comparison (all
//! permitted by §4.1 as semantics-preserving):
//!
//! * multiple field lines are combined with `", "` (RFC 9110 §5.3);
//! * outside quoted strings, runs of SP/HTAB collapse to one SP and leading
//!   / trailing whitespace is removed;
//! * for the list-valued negotiation fields `Accept`, `Accept-Encoding`,
//!   `Accept-Language`, `Accept-Charset`: empty list elements are dropped,
//!   elements are re-joined with `", "`, and whitespace around `;` and `=`
//!   in parameters (`gzip ; q=0.5`) is removed;
//! * `Accept-Encoding`, `Accept-Language` and `Accept-Charset` are
//!   lowercased (content-codings, language tags and charsets are
//!   case-insensitive: RFC 9110 §8.4.1, §8.5.1, RFC 4647 §2, and ABNF
//!   strings such as `q=` are case-insensitive). In `Accept` only the media
//!   range and parameter names are lowercased (RFC 9110 §8.3.1, §5.6.6);
//!   parameter values may be case-sensitive and are kept;
//! * a weight (`;q=`, RFC 9110 §12.4.2) is written canonically: `q=0.50`
//!   and `q=0.500` are `q=0.5`, `q=0.` is `q=0`, and a final `q=1` (or
//!   `q=1.000`) is dropped, 1 being the default weight. An invalid qvalue
//!   is kept verbatim.
//!
//! Not done: reordering list members (order can carry preference). A field
//! absent from the request is distinct
//! from a field present with an empty value. `Vary` field names are
//! lowercased, deduplicated and sorted; an invalid name in `Vary` is
//! treated like `*` (never matches) rather than guessing.

use http::{HeaderMap, HeaderName, header::VARY};

use super::{is_tchar, list_elements, split_list};

/// The parsed `Vary` of a stored response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VarySpec {
    /// No `Vary` (or an empty one): every request matches.
    None,
    /// `Vary: *` (or an unparseable member): nothing matches.
    Star,
    /// Sorted, deduplicated, lowercase field names.
    Fields(Vec<HeaderName>),
}

/// Parses the `Vary` field(s) of a response.
pub fn vary_spec(resp_headers: &HeaderMap) -> VarySpec {
    let mut names: Vec<HeaderName> = Vec::new();
    for elem in list_elements(resp_headers, &VARY) {
        if elem == b"*" || !elem.iter().all(|&b| is_tchar(b)) {
            return VarySpec::Star;
        }
        match HeaderName::from_bytes(elem) {
            Ok(n) => names.push(n),
            Err(_) => return VarySpec::Star,
        }
    }
    if names.is_empty() {
        return VarySpec::None;
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    VarySpec::Fields(names)
}

const LIST_FIELDS: [&str; 4] = [
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
];
const CASE_INSENSITIVE_FIELDS: [&str; 3] = ["accept-charset", "accept-encoding", "accept-language"];

/// The normalised value of request field `name`, `None` if absent.
pub fn normalized_field_value(name: &HeaderName, req_headers: &HeaderMap) -> Option<Vec<u8>> {
    let mut lines = req_headers.get_all(name).iter().peekable();
    lines.peek()?;
    let mut combined: Vec<u8> = Vec::new();
    for (i, v) in lines.enumerate() {
        if i > 0 {
            combined.extend_from_slice(b", ");
        }
        combined.extend_from_slice(v.as_bytes());
    }
    let mut out = if LIST_FIELDS.contains(&name.as_str()) {
        let elems: Vec<Vec<u8>> = split_list(&combined)
            .into_iter()
            .map(|e| normalize_element(&collapse_ws(e, true)))
            .filter(|e| !e.is_empty())
            .collect();
        elems.join(&b", "[..])
    } else {
        collapse_ws(&combined, false)
    };
    if CASE_INSENSITIVE_FIELDS.contains(&name.as_str()) {
        out.make_ascii_lowercase();
    }
    Some(out)
}

/// Normalises one element of an `Accept*` list (whitespace already
/// collapsed): lowercases the value before the first `;` and the parameter
/// names, and writes the weight canonically (see the module docs).
fn normalize_element(elem: &[u8]) -> Vec<u8> {
    let segments = split_params(elem);
    let last = segments.len() - 1;
    let mut out = Vec::with_capacity(elem.len());
    for (i, seg) in segments.iter().enumerate() {
        if i == 0 {
            out.extend(seg.iter().map(u8::to_ascii_lowercase));
            continue;
        }
        let (pname, value) = match seg.iter().position(|&b| b == b'=') {
            Some(eq) => (&seg[..eq], Some(&seg[eq + 1..])),
            None => (*seg, None),
        };
        if pname.eq_ignore_ascii_case(b"q")
            && let Some(millis) = value.and_then(qvalue_millis)
        {
            if millis == 1000 && i == last {
                continue;
            }
            out.extend_from_slice(b";q=");
            out.extend_from_slice(fmt_qvalue(millis).as_bytes());
            continue;
        }
        out.push(b';');
        out.extend(pname.iter().map(u8::to_ascii_lowercase));
        if let Some(v) = value {
            out.push(b'=');
            out.extend_from_slice(v);
        }
    }
    out
}

/// Splits at `;` outside quoted strings.
fn split_params(elem: &[u8]) -> Vec<&[u8]> {
    super::split_unquoted(elem, b';')
}

/// A `qvalue` (RFC 9110 §12.4.2) in thousandths:
/// `( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )`.
fn qvalue_millis(v: &[u8]) -> Option<u16> {
    let (int, frac): (&[u8], &[u8]) = match v.iter().position(|&b| b == b'.') {
        Some(dot) => (&v[..dot], &v[dot + 1..]),
        None => (v, b""),
    };
    if frac.len() > 3 || !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let frac_millis = frac
        .iter()
        .zip([100_u16, 10, 1])
        .map(|(&d, w)| u16::from(d - b'0') * w)
        .sum::<u16>();
    match int {
        b"0" => Some(frac_millis),
        b"1" if frac_millis == 0 => Some(1000),
        _ => None,
    }
}

fn fmt_qvalue(millis: u16) -> String {
    match millis {
        0 => "0".to_owned(),
        1000.. => "1".to_owned(),
        m => format!("0.{m:03}").trim_end_matches('0').to_owned(),
    }
}

fn collapse_ws(s: &[u8], params: bool) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::with_capacity(s.len());
    let mut in_quote = false;
    let mut escaped = false;
    let mut pending_space = false;
    for &b in s {
        if in_quote {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_quote = false;
            }
            continue;
        }
        if b == b' ' || b == b'\t' {
            pending_space = true;
            continue;
        }
        let sticky = |c: u8| params && (c == b';' || c == b'=');
        if pending_space && !out.is_empty() && !sticky(b) && !out.last().is_some_and(|&l| sticky(l))
        {
            out.push(b' ');
        }
        pending_space = false;
        if b == b'"' {
            in_quote = true;
        }
        out.push(b);
    }
    out
}

fn escape_into(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        if b == b'%' || !(0x20..0x7f).contains(&b) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(char::from(b));
        }
    }
}

/// The secondary cache key for a request against a response's `Vary`:
/// `Some("")` without `Vary`, `None` for `Vary: *` (never reusable),
/// otherwise one `name=value` (or bare `name` when absent) line per field.
pub fn secondary_key(resp_headers: &HeaderMap, req_headers: &HeaderMap) -> Option<String> {
    match vary_spec(resp_headers) {
        VarySpec::None => Some(String::new()),
        VarySpec::Star => None,
        VarySpec::Fields(fields) => {
            let mut key = String::new();
            for (i, name) in fields.iter().enumerate() {
                if i > 0 {
                    key.push('\n');
                }
                key.push_str(name.as_str());
                if let Some(v) = normalized_field_value(name, req_headers) {
                    key.push('=');
                    escape_into(&mut key, &v);
                }
            }
            Some(key)
        }
    }
}

/// Whether a stored response (selected by `stored_req_headers`) can be used
/// for a request with `req_headers` (RFC 9111 §4.1).
pub fn vary_matches(
    stored_resp_headers: &HeaderMap,
    stored_req_headers: &HeaderMap,
    req_headers: &HeaderMap,
) -> bool {
    match vary_spec(stored_resp_headers) {
        VarySpec::None => true,
        VarySpec::Star => false,
        VarySpec::Fields(fields) => fields.iter().all(|f| {
            normalized_field_value(f, stored_req_headers) == normalized_field_value(f, req_headers)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::headers;
    use super::*;
    use proptest::prelude::*;

    fn key(vary: &str, req: &[(&str, &str)]) -> Option<String> {
        secondary_key(&headers(&[("vary", vary)]), &headers(req))
    }

    #[test]
    fn rfc9111_4_1_no_vary_matches_everything() {
        assert_eq!(
            secondary_key(&HeaderMap::new(), &headers(&[("accept", "x")])),
            Some(String::new())
        );
        assert!(vary_matches(
            &HeaderMap::new(),
            &HeaderMap::new(),
            &headers(&[("accept", "x")])
        ));
    }

    #[test]
    fn rfc9111_4_1_vary_star_never_matches() {
        assert_eq!(key("*", &[]), None);
        assert!(!vary_matches(
            &headers(&[("vary", "accept, *")]),
            &HeaderMap::new(),
            &HeaderMap::new()
        ));
    }

    #[test]
    fn rfc9111_4_1_vary_names_case_insensitive_sorted_deduplicated() {
        let r = headers(&[
            ("vary", "User-Agent, accept-encoding"),
            ("vary", "ACCEPT-ENCODING"),
        ]);
        assert_eq!(
            vary_spec(&r),
            VarySpec::Fields(vec![
                HeaderName::from_static("accept-encoding"),
                HeaderName::from_static("user-agent")
            ])
        );
        assert_eq!(vary_spec(&headers(&[("vary", "a b")])), VarySpec::Star);
        assert_eq!(vary_spec(&headers(&[("vary", " , ")])), VarySpec::None);
    }

    #[test]
    fn rfc9111_4_1_absent_field_differs_from_empty_field() {
        assert_eq!(
            key("accept-encoding", &[]),
            Some("accept-encoding".to_owned())
        );
        assert_eq!(
            key("accept-encoding", &[("accept-encoding", "")]),
            Some("accept-encoding=".to_owned())
        );
    }

    #[test]
    fn rfc9111_4_1_whitespace_and_line_combining_normalised() {
        let a = key("accept-encoding", &[("accept-encoding", "gzip,  br")]);
        let b = key(
            "accept-encoding",
            &[("accept-encoding", "gzip"), ("accept-encoding", "br")],
        );
        let c = key("accept-encoding", &[("accept-encoding", " GZIP ,br ,")]);
        assert_eq!(a, Some("accept-encoding=gzip, br".to_owned()));
        assert_eq!(a, b);
        assert_eq!(a, c);
    }

    #[test]
    fn rfc9111_4_1_parameter_whitespace_normalised_for_accept_fields() {
        let a = key(
            "accept-language",
            &[("accept-language", "en-US ; q=0.5, fr")],
        );
        let b = key("accept-language", &[("accept-language", "en-us;q=0.5,fr")]);
        assert_eq!(a, b);
        assert_eq!(a, Some("accept-language=en-us;q=0.5, fr".to_owned()));
    }

    #[test]
    fn rfc9111_4_1_language_tags_match_case_and_whitespace_insensitively() {
        // Language tags are case-insensitive (RFC 4647 §2, RFC 5646 §2.1.1);
        // OWS around list commas carries nothing (RFC 9110 §5.6.1).
        let resp = headers(&[("vary", "Accept-Language")]);
        let stored_req = headers(&[("accept-language", "en-US, fr")]);
        for same in [
            &[("accept-language", "en-us,fr")][..],
            &[("accept-language", "EN-US ,\tFR")],
            &[("accept-language", "en-US"), ("accept-language", "fr")],
        ] {
            assert!(vary_matches(&resp, &stored_req, &headers(same)), "{same:?}");
            assert_eq!(
                secondary_key(&resp, &headers(same)),
                Some("accept-language=en-us, fr".to_owned())
            );
        }
        assert!(!vary_matches(
            &resp,
            &stored_req,
            &headers(&[("accept-language", "fr, en-US")])
        ));
    }

    #[test]
    fn rfc9110_12_4_2_weights_are_compared_by_value() {
        let k = |v: &str| key("accept-language", &[("accept-language", v)]);
        // One weight, written several ways.
        for same in ["fr;Q=0.50", "fr;q=0.500", "fr ; q=0.5", "FR;q=0.5"] {
            assert_eq!(k(same), k("fr;q=0.5"), "{same:?}");
        }
        assert_eq!(k("fr;q=0.5"), Some("accept-language=fr;q=0.5".to_owned()));
        assert_eq!(k("fr;q=0."), k("fr;q=0"));
        assert_eq!(k("fr;q=0.000"), Some("accept-language=fr;q=0".to_owned()));
        // No weight means 1 (§12.4.2): an explicit q=1 is the same.
        let e = |v: &str| key("accept-encoding", &[("accept-encoding", v)]);
        assert_eq!(e("gzip;q=1, br;q=1.000"), e("gzip, br"));
        assert_eq!(e("gzip;q=1.0"), Some("accept-encoding=gzip".to_owned()));
        // Different weights, and invalid qvalues, stay apart (kept verbatim).
        assert_ne!(k("fr;q=0.5"), k("fr;q=0.05"));
        assert_ne!(e("gzip;q=0.9, br"), e("gzip, br"));
        assert_eq!(
            e("gzip;q=1.5"),
            Some("accept-encoding=gzip;q=1.5".to_owned())
        );
        assert_eq!(
            e("gzip;q=0.1234"),
            Some("accept-encoding=gzip;q=0.1234".to_owned())
        );
        assert_ne!(e("gzip;q=1.01"), e("gzip"));
    }

    #[test]
    fn rfc9110_8_3_1_accept_media_range_and_parameter_names_are_case_insensitive() {
        let a = |v: &str| key("accept", &[("accept", v)]);
        assert_eq!(
            a("Text/HTML;Level=1;Q=0.80, */*;q=0.1"),
            Some("accept=text/html;level=1;q=0.8, */*;q=0.1".to_owned())
        );
        assert_eq!(a("text/html;q=1"), a("TEXT/html"));
        // Parameter values may be case-sensitive: kept.
        assert_ne!(a("text/x;foo=Bar"), a("text/x;foo=bar"));
        // A `;` or `q=` inside a quoted value is not a parameter.
        assert_eq!(
            a(r#"text/x;a="B;q=1""#),
            Some(r#"accept=text/x;a="B;q=1""#.to_owned())
        );
    }

    #[test]
    fn rfc9111_4_1_order_is_significant_and_case_kept_for_other_fields() {
        assert_ne!(
            key("accept-encoding", &[("accept-encoding", "gzip, br")]),
            key("accept-encoding", &[("accept-encoding", "br, gzip")])
        );
        assert_ne!(
            key("x-theme", &[("x-theme", "Dark")]),
            key("x-theme", &[("x-theme", "dark")])
        );
        assert_eq!(
            key("user-agent", &[("user-agent", "  Foo   Bar ")]),
            Some("user-agent=Foo Bar".to_owned())
        );
    }

    #[test]
    fn quoted_strings_are_preserved_verbatim() {
        assert_eq!(
            key("x-q", &[("x-q", r#"a  "b   c"  d"#)]),
            Some(r#"x-q=a "b   c" d"#.to_owned())
        );
    }

    #[test]
    fn secondary_key_escapes_non_ascii_and_percent() {
        let mut req = HeaderMap::new();
        req.insert(
            "x-v",
            http::HeaderValue::from_bytes(b"100%\xff").expect("obs-text"),
        );
        assert_eq!(key("x-v", &[]).as_deref(), Some("x-v"));
        assert_eq!(
            secondary_key(&headers(&[("vary", "x-v")]), &req),
            Some("x-v=100%25%FF".to_owned())
        );
    }

    #[test]
    fn rfc9111_4_1_vary_matches_compares_stored_request() {
        let resp = headers(&[("vary", "accept-encoding, accept-language")]);
        let stored_req = headers(&[("accept-encoding", "gzip"), ("accept-language", "en")]);
        assert!(vary_matches(
            &resp,
            &stored_req,
            &headers(&[("accept-language", "EN"), ("accept-encoding", "gzip ")])
        ));
        assert!(!vary_matches(
            &resp,
            &stored_req,
            &headers(&[("accept-encoding", "gzip")])
        ));
    }

    proptest! {
        #[test]
        fn prop_secondary_key_never_panics_and_is_single_line_per_field(v in "[ -~\t]{0,60}", w in "[ -~\t]{0,60}") {
            let resp = headers(&[("vary", "accept-encoding, x-a, accept")]);
            let req = headers(&[("accept-encoding", v.as_str()), ("x-a", w.as_str()), ("accept", v.as_str())]);
            let k = secondary_key(&resp, &req).expect("no star");
            prop_assert_eq!(k.lines().count(), 3);
        }
    }
}
