//! Age calculation (RFC 9111 §4.2.3) and the `Age` field (§5.1).

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue, header::AGE};

use super::directives::{DELTA_SECONDS_CAP, parse_delta_seconds};
use super::freshness::date_value;
use super::{StoredResponse, list_elements, secs_between, unix_secs};

/// The intermediate values of RFC 9111 §4.2.3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgeCalculation {
    /// `max(0, response_time - date_value)`.
    pub apparent_age: Duration,
    /// `age_value + (response_time - request_time)`.
    pub corrected_age_value: Duration,
    /// `max(apparent_age, corrected_age_value)`.
    pub corrected_initial_age: Duration,
    /// `now - response_time` (0 if the clock went backwards).
    pub resident_time: Duration,
    /// `corrected_initial_age + resident_time`.
    pub current_age: Duration,
}

/// The `Age` field value (RFC 9111 §5.1). `Age` is a singleton, but "a
/// cache encountering a message with a list-based Age field value SHOULD use
/// the first member of the field value, discarding subsequent ones"; several
/// field lines form one list (RFC 9110 §5.3), so the first member of the
/// first line is used. If that member is invalid (not `1*DIGIT`) "a cache
/// SHOULD ignore the field": it counts as absent (0). Values beyond 2^31
/// saturate (§1.2.2).
pub fn age_value(headers: &HeaderMap) -> Duration {
    let first = list_elements(headers, &AGE)
        .first()
        .and_then(|e| std::str::from_utf8(e).ok())
        .and_then(parse_delta_seconds)
        .unwrap_or(0);
    Duration::from_secs(u64::from(first))
}

/// Runs the §4.2.3 calculation for `stored` at `now`.
pub fn calculate_age(stored: &StoredResponse, now: SystemTime) -> AgeCalculation {
    let response_time = unix_secs(stored.response_time);
    let request_time = unix_secs(stored.request_time);
    let date = date_value(&stored.headers, stored.response_time);
    let apparent_age = secs_between(response_time, date);
    let response_delay = secs_between(response_time, request_time);
    let corrected_age_value = age_value(&stored.headers).saturating_add(response_delay);
    let corrected_initial_age = apparent_age.max(corrected_age_value);
    let resident_time = secs_between(unix_secs(now), response_time);
    AgeCalculation {
        apparent_age,
        corrected_age_value,
        corrected_initial_age,
        resident_time,
        current_age: corrected_initial_age.saturating_add(resident_time),
    }
}

/// `current_age` of `stored` at `now`.
pub fn current_age(stored: &StoredResponse, now: SystemTime) -> Duration {
    calculate_age(stored, now).current_age
}

/// The `Age` header value to send with a response served from cache
/// (whole seconds, saturated at 2^31).
pub fn age_header_value(stored: &StoredResponse, now: SystemTime) -> HeaderValue {
    let secs = current_age(stored, now)
        .as_secs()
        .min(u64::from(DELTA_SECONDS_CAP));
    HeaderValue::from(secs)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{at, date, headers, secs};
    use super::*;
    use http::StatusCode;

    fn stored(h: &[(&str, &str)], req: i64, resp: i64) -> StoredResponse {
        StoredResponse {
            status: StatusCode::OK,
            headers: headers(h),
            request_time: at(req),
            response_time: at(resp),
        }
    }

    #[test]
    fn rfc9111_4_2_3_apparent_age_from_date() {
        let d = date(-30);
        let s = stored(&[("date", d.as_str())], 0, 0);
        let a = calculate_age(&s, at(0));
        assert_eq!(a.apparent_age, secs(30));
        assert_eq!(a.current_age, secs(30));
    }

    #[test]
    fn rfc9111_4_2_3_apparent_age_never_negative_for_future_date() {
        let d = date(60);
        let s = stored(&[("date", d.as_str())], 0, 0);
        assert_eq!(calculate_age(&s, at(0)).apparent_age, Duration::ZERO);
    }

    #[test]
    fn rfc9111_4_2_3_corrected_age_value_adds_response_delay() {
        let d = date(0);
        let s = stored(&[("date", d.as_str()), ("age", "10")], -3, 0);
        let a = calculate_age(&s, at(0));
        assert_eq!(a.corrected_age_value, secs(13));
        assert_eq!(a.corrected_initial_age, secs(13));
    }

    #[test]
    fn rfc9111_4_2_3_corrected_initial_age_is_max_of_apparent_and_corrected() {
        let d = date(-100);
        let s = stored(&[("date", d.as_str()), ("age", "10")], -1, 0);
        assert_eq!(calculate_age(&s, at(0)).corrected_initial_age, secs(100));
    }

    #[test]
    fn rfc9111_4_2_3_current_age_adds_resident_time() {
        let d = date(0);
        let s = stored(&[("date", d.as_str()), ("age", "5")], 0, 0);
        let a = calculate_age(&s, at(40));
        assert_eq!(a.resident_time, secs(40));
        assert_eq!(a.current_age, secs(45));
        assert_eq!(age_header_value(&s, at(40)), HeaderValue::from_static("45"));
    }

    #[test]
    fn rfc9111_4_2_3_clock_going_backwards_does_not_underflow() {
        let s = stored(&[], 10, 5);
        let a = calculate_age(&s, at(0));
        assert_eq!(a.resident_time, Duration::ZERO);
        assert_eq!(a.current_age, Duration::ZERO);
    }

    #[test]
    fn rfc9111_5_1_list_age_uses_the_first_member() {
        // "SHOULD use the first member of the field value, discarding
        // subsequent ones" (§5.1).
        assert_eq!(age_value(&headers(&[("age", "5, 7")])), secs(5));
        assert_eq!(age_value(&headers(&[("age", "7200, 0")])), secs(7200));
        assert_eq!(age_value(&headers(&[("age", "0,7200")])), Duration::ZERO);
        // Empty list elements are not members (RFC 9110 §5.6.1).
        assert_eq!(age_value(&headers(&[("age", " , 9")])), secs(9));
    }

    #[test]
    fn rfc9111_5_1_several_age_lines_use_the_first() {
        // Several lines are one list (RFC 9110 §5.3): the first line's value.
        assert_eq!(age_value(&headers(&[("age", "5"), ("age", "50")])), secs(5));
        assert_eq!(
            age_value(&headers(&[("age", "0"), ("age", "7200")])),
            Duration::ZERO
        );
    }

    #[test]
    fn rfc9111_5_1_invalid_age_is_ignored() {
        // "If the field value (after discarding additional members ...) is
        // invalid ..., a cache SHOULD ignore the field" (§5.1).
        for bad in ["abc", "-7200", "7200.0", "+5", "5s", "abc, 7200", "\"5\""] {
            assert_eq!(
                age_value(&headers(&[("age", bad)])),
                Duration::ZERO,
                "{bad:?}"
            );
        }
        assert_eq!(
            age_value(&headers(&[("age", "x"), ("age", "7200")])),
            Duration::ZERO
        );
        // An ignored Age leaves the age to Date and the response delay.
        let d = date(-30);
        let s = stored(&[("date", d.as_str()), ("age", "abc, 7200")], -2, 0);
        assert_eq!(calculate_age(&s, at(0)).current_age, secs(30));
    }

    #[test]
    fn rfc9111_1_2_2_age_overflow_saturates_at_2_pow_31() {
        assert_eq!(
            age_value(&headers(&[("age", "99999999999999999999")])),
            secs(u64::from(DELTA_SECONDS_CAP))
        );
    }

    #[test]
    fn rfc9111_5_1_age_header_saturates_at_2_pow_31() {
        let s = stored(&[("age", "2147483648")], 0, 0);
        assert_eq!(
            age_header_value(&s, at(1000)),
            HeaderValue::from_static("2147483648")
        );
    }
}
