//! HTTP-date parsing and formatting (RFC 9110 §5.6.7).
//!
//! All three formats are accepted: IMF-fixdate
//! (`Sun, 06 Nov 1994 08:49:37 GMT`), the obsolete rfc850 form
//! (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime
//! (`Sun Nov  6 08:49:37 1994`). Day names, month names and the zone match
//! case-insensitively: HTTP-date is case-sensitive, but "a cache recipient
//! SHOULD match the field value case-insensitively" (RFC 9111 §4.2, to
//! which RFC 9110 §5.6.7 points), and every recipient of a date here is the
//! cache. A zone other than `GMT` stays invalid ("SHOULD consider a date
//! with a zone abbreviation other than "GMT" to be invalid for calculating
//! expiration", §4.2). Weekday names must be valid but are not cross-checked
//! against the date (senders get this wrong and it carries no information).
//! A leap second (`:60`) is accepted and folded into the next second.

use std::time::SystemTime;

use super::{from_unix_secs, trim_ows, unix_secs};

const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];
const DAY_NAMES: [&[u8; 3]; 7] = [b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun"];
const DAY_NAMES_LONG: [&[u8]; 7] = [
    b"Monday",
    b"Tuesday",
    b"Wednesday",
    b"Thursday",
    b"Friday",
    b"Saturday",
    b"Sunday",
];

/// Parses an HTTP-date. `reference` (normally the time the message was
/// received) resolves two-digit rfc850 years: a year that would be more than
/// 50 years after `reference` means the most recent past year with the same
/// last two digits (RFC 9110 §5.6.7).
pub fn parse_http_date(value: &[u8], reference: SystemTime) -> Option<SystemTime> {
    let s = trim_ows(value);
    let secs = parse_imf_fixdate(s)
        .or_else(|| parse_rfc850(s, reference))
        .or_else(|| parse_asctime(s))?;
    Some(from_unix_secs(secs))
}

/// Formats `t` as an IMF-fixdate. Sub-second precision is truncated; years
/// outside 0..=9999 are clamped so the output is always 29 bytes.
pub fn fmt_http_date(t: SystemTime) -> String {
    // 0000-01-01 .. 9999-12-31T23:59:59
    let secs = unix_secs(t).clamp(-62_167_219_200, 253_402_300_799);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let wd = usize::try_from((days + 3).rem_euclid(7)).unwrap_or(0);
    let mi = usize::try_from(m - 1).unwrap_or(0);
    let wname = std::str::from_utf8(DAY_NAMES[wd]).unwrap_or("Mon");
    let mname = std::str::from_utf8(MONTHS[mi]).unwrap_or("Jan");
    format!(
        "{wname}, {d:02} {mname} {y:04} {:02}:{:02}:{:02} GMT",
        tod / 3600,
        (tod / 60) % 60,
        tod % 60
    )
}

fn parse_imf_fixdate(s: &[u8]) -> Option<i64> {
    // Sun, 06 Nov 1994 08:49:37 GMT
    if s.len() != 29 || s.get(3..5)? != b", " || !s[25..].eq_ignore_ascii_case(b" GMT") {
        return None;
    }
    short_day(&s[0..3])?;
    if s[7] != b' ' || s[11] != b' ' || s[16] != b' ' {
        return None;
    }
    let day = digits(&s[5..7])?;
    let month = month(&s[8..11])?;
    let year = digits(&s[12..16])?;
    let (h, mi, sec) = time_of_day(&s[17..25])?;
    to_unix(year, month, day, h, mi, sec)
}

fn parse_rfc850(s: &[u8], reference: SystemTime) -> Option<i64> {
    // Sunday, 06-Nov-94 08:49:37 GMT
    let comma = s.iter().position(|&b| b == b',')?;
    if !DAY_NAMES_LONG
        .iter()
        .any(|d| d.eq_ignore_ascii_case(&s[..comma]))
    {
        return None;
    }
    let rest = s.get(comma + 1..)?;
    let rest = rest.strip_prefix(b" ")?;
    if rest.len() != 22 || rest[2] != b'-' || rest[6] != b'-' || rest[9] != b' ' {
        return None;
    }
    if !rest[18..].eq_ignore_ascii_case(b" GMT") {
        return None;
    }
    let day = digits(&rest[0..2])?;
    let month = month(&rest[3..6])?;
    let yy = digits(&rest[7..9])?;
    let (h, mi, sec) = time_of_day(&rest[10..18])?;
    let ref_year = civil_from_days(unix_secs(reference).div_euclid(86_400)).0;
    let mut year = ref_year - ref_year.rem_euclid(100) + yy;
    if year > ref_year + 50 {
        year -= 100;
    } else if year + 100 <= ref_year + 50 {
        year += 100;
    }
    to_unix(year, month, day, h, mi, sec)
}

fn parse_asctime(s: &[u8]) -> Option<i64> {
    // Sun Nov  6 08:49:37 1994
    if s.len() != 24 || s[3] != b' ' || s[7] != b' ' || s[10] != b' ' || s[19] != b' ' {
        return None;
    }
    short_day(&s[0..3])?;
    let month = month(&s[4..7])?;
    let day = if s[8] == b' ' {
        digits(&s[9..10])?
    } else {
        digits(&s[8..10])?
    };
    let (h, mi, sec) = time_of_day(&s[11..19])?;
    let year = digits(&s[20..24])?;
    to_unix(year, month, day, h, mi, sec)
}

fn short_day(s: &[u8]) -> Option<()> {
    DAY_NAMES
        .iter()
        .any(|d| d.eq_ignore_ascii_case(s))
        .then_some(())
}

fn month(s: &[u8]) -> Option<i64> {
    let idx = MONTHS.iter().position(|m| m.eq_ignore_ascii_case(s))?;
    i64::try_from(idx + 1).ok()
}

fn digits(s: &[u8]) -> Option<i64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        s.iter()
            .fold(0_i64, |acc, &b| acc * 10 + i64::from(b - b'0')),
    )
}

fn time_of_day(s: &[u8]) -> Option<(i64, i64, i64)> {
    if s.len() != 8 || s[2] != b':' || s[5] != b':' {
        return None;
    }
    let h = digits(&s[0..2])?;
    let m = digits(&s[3..5])?;
    let sec = digits(&s[6..8])?;
    (h < 24 && m < 60 && sec <= 60).then_some((h, m, sec))
}

fn to_unix(year: i64, month: i64, day: i64, h: i64, mi: i64, sec: i64) -> Option<i64> {
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some(days * 86_400 + h * 3600 + mi * 60 + sec)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(y) => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 for a proleptic Gregorian date (H. Hinnant).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::at;
    use super::*;
    use proptest::prelude::*;
    use std::time::{Duration, UNIX_EPOCH};

    const RFC_EXAMPLE: u64 = 784_111_777; // 1994-11-06T08:49:37Z

    fn parse(s: &str) -> Option<u64> {
        parse_http_date(s.as_bytes(), at(0))
            .map(|t| t.duration_since(UNIX_EPOCH).expect("post-epoch").as_secs())
    }

    #[test]
    fn rfc9110_5_6_7_accepts_imf_fixdate() {
        assert_eq!(parse("Sun, 06 Nov 1994 08:49:37 GMT"), Some(RFC_EXAMPLE));
    }

    #[test]
    fn rfc9110_5_6_7_accepts_obsolete_rfc850() {
        assert_eq!(parse("Sunday, 06-Nov-94 08:49:37 GMT"), Some(RFC_EXAMPLE));
    }

    #[test]
    fn rfc9110_5_6_7_accepts_asctime() {
        assert_eq!(parse("Sun Nov  6 08:49:37 1994"), Some(RFC_EXAMPLE));
        assert_eq!(
            parse("Sun Nov 16 08:49:37 1994"),
            Some(RFC_EXAMPLE + 10 * 86_400)
        );
    }

    #[test]
    fn rfc9110_5_6_7_rfc850_two_digit_year_more_than_50_years_ahead_is_past() {
        // Reference 2024: "30" -> 2030 (6 years ahead), "80" -> 1980.
        let y2030 = parse("Monday, 01-Jan-30 00:00:00 GMT").expect("2030");
        let y1980 = parse("Tuesday, 01-Jan-80 00:00:00 GMT").expect("1980");
        assert_eq!(y2030, 1_893_456_000);
        assert_eq!(y1980, 315_532_800);
    }

    #[test]
    fn rfc9110_5_6_7_rejects_invalid_dates() {
        for bad in [
            "0",
            "-1",
            "",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 31 Nov 1994 08:49:37 GMT",
            "Sun, 29 Feb 1995 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 94 08:49:37 GMT",
            "Xyz, 06 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:37 GMT junk",
            "Sun, 06 Nov 1994 08:49:37 gmt+1",
            "Sunday, 06-Nov-94 08:49:37 utc",
            "Sux, 06 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nox 1994 08:49:37 GMT",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn rfc9111_4_2_names_and_zone_match_case_insensitively() {
        // "Although all date formats are specified to be case-sensitive, a
        // cache recipient SHOULD match the field value case-insensitively."
        for s in [
            "sun, 06 nov 1994 08:49:37 gmt",
            "SUN, 06 NOV 1994 08:49:37 GMT",
            "sUn, 06 NoV 1994 08:49:37 Gmt",
            "SUNDAY, 06-NOV-94 08:49:37 GMT",
            "sunday, 06-nov-94 08:49:37 gmt",
            "sun nov  6 08:49:37 1994",
            "SUN NOV  6 08:49:37 1994",
        ] {
            assert_eq!(parse(s), Some(RFC_EXAMPLE), "{s:?}");
        }
        assert_eq!(
            parse("thu, 01 jan 2099 00:00:00 gmt"),
            parse("Thu, 01 Jan 2099 00:00:00 GMT")
        );
    }

    #[test]
    fn rfc9111_4_2_zone_other_than_gmt_is_invalid() {
        for s in [
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "sun, 06 nov 1994 08:49:37 utc",
            "Sun, 06 Nov 1994 08:49:37 EST",
            "Sunday, 06-Nov-94 08:49:37 UT",
        ] {
            assert_eq!(parse(s), None, "{s:?}");
        }
    }

    #[test]
    fn leap_day_and_surrounding_whitespace_accepted() {
        assert!(parse("Thu, 29 Feb 2024 00:00:00 GMT").is_some());
        assert_eq!(parse("  Sun, 06 Nov 1994 08:49:37 GMT "), Some(RFC_EXAMPLE));
    }

    #[test]
    fn format_is_imf_fixdate() {
        let t = UNIX_EPOCH + Duration::from_secs(RFC_EXAMPLE);
        assert_eq!(fmt_http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(fmt_http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
    }

    proptest! {
        #[test]
        fn prop_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = parse_http_date(&bytes, at(0));
        }

        #[test]
        fn prop_parser_never_panics_on_date_like_strings(s in "[A-Za-z]{3,9},? [0-9 ]{1,2}[ -][A-Za-z]{3}[ -][0-9]{2,4} [0-9]{2}:[0-9]{2}:[0-9]{2}( GMT)?") {
            let _ = parse_http_date(s.as_bytes(), at(0));
        }

        #[test]
        fn prop_format_then_parse_roundtrips(secs in 0_u64..253_402_300_799) {
            let t = UNIX_EPOCH + Duration::from_secs(secs);
            let s = fmt_http_date(t);
            prop_assert_eq!(parse_http_date(s.as_bytes(), at(0)), Some(t));
        }
    }
}
