//! Freshness lifetime (RFC 9111 §4.2.1) and heuristic freshness (§4.2.2).

use std::time::{Duration, SystemTime};

use http::{
    HeaderMap, StatusCode,
    header::{DATE, EXPIRES, LAST_MODIFIED},
};

use super::storability::is_heuristically_cacheable;
use super::targeted::effective_response_directives;
use super::{PolicyConfig, header_date, parse_http_date, secs_between, unix_secs};

/// Which rule produced a freshness lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreshnessSource {
    /// `s-maxage` (shared caches only).
    SMaxAge,
    /// `max-age`.
    MaxAge,
    /// `Expires - Date`.
    Expires,
    /// 10%-of-Last-Modified heuristic.
    Heuristic,
    /// Per-site [`PolicyConfig::default_ttl`].
    DefaultTtl,
    /// No information and heuristics not allowed: lifetime 0.
    None,
}

impl FreshnessSource {
    /// Stable label for metrics / debugging.
    pub const fn as_str(self) -> &'static str {
        match self {
            FreshnessSource::SMaxAge => "s-maxage",
            FreshnessSource::MaxAge => "max-age",
            FreshnessSource::Expires => "expires",
            FreshnessSource::Heuristic => "heuristic",
            FreshnessSource::DefaultTtl => "default-ttl",
            FreshnessSource::None => "none",
        }
    }

    /// Whether the lifetime came from the origin explicitly.
    pub const fn is_explicit(self) -> bool {
        matches!(
            self,
            FreshnessSource::SMaxAge | FreshnessSource::MaxAge | FreshnessSource::Expires
        )
    }
}

/// A freshness lifetime and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// The freshness lifetime.
    pub lifetime: Duration,
    /// The rule that produced it.
    pub source: FreshnessSource,
}

/// The `Date` of a response as unix seconds, falling back to the time the
/// response was received when absent or invalid (RFC 9110 §6.6.1).
pub(super) fn date_value(headers: &HeaderMap, response_time: SystemTime) -> i64 {
    header_date(headers, &DATE, response_time).unwrap_or_else(|| unix_secs(response_time))
}

/// Computes the freshness lifetime of a response for this shared cache.
///
/// Order (§4.2.1): `s-maxage`, `max-age`, `Expires - Date` (only when the
/// directives come from `Cache-Control`; RFC 9213 ignores `Expires` when a
/// targeted field is used). Invalid/conflicting values yield a zero lifetime.
/// Otherwise, if the status is heuristically cacheable or the response is
/// `public`: Last-Modified heuristic, then [`PolicyConfig::default_ttl`].
pub fn freshness_lifetime(
    status: StatusCode,
    headers: &HeaderMap,
    response_time: SystemTime,
    config: &PolicyConfig,
) -> Freshness {
    let policy = effective_response_directives(headers);
    let d = &policy.directives;
    let secs = |n: u32| Duration::from_secs(u64::from(n));
    if let Some(s) = d.s_maxage {
        return Freshness {
            lifetime: secs(s),
            source: FreshnessSource::SMaxAge,
        };
    }
    if let Some(m) = d.max_age {
        return Freshness {
            lifetime: secs(m),
            source: FreshnessSource::MaxAge,
        };
    }
    if policy.uses_expires() && headers.contains_key(EXPIRES) {
        return Freshness {
            lifetime: expires_lifetime(headers, response_time),
            source: FreshnessSource::Expires,
        };
    }
    if !(is_heuristically_cacheable(status) || d.public) {
        return Freshness {
            lifetime: Duration::ZERO,
            source: FreshnessSource::None,
        };
    }
    if let Some(lifetime) = heuristic_lifetime(headers, response_time, config) {
        return Freshness {
            lifetime,
            source: FreshnessSource::Heuristic,
        };
    }
    if let Some(ttl) = config.default_ttl {
        return Freshness {
            lifetime: ttl,
            source: FreshnessSource::DefaultTtl,
        };
    }
    Freshness {
        lifetime: Duration::ZERO,
        source: FreshnessSource::None,
    }
}

/// `Expires - Date`; zero when `Expires` is invalid, in the past, or
/// repeated with differing values (§4.2.1, §5.3).
fn expires_lifetime(headers: &HeaderMap, response_time: SystemTime) -> Duration {
    let mut values = headers.get_all(EXPIRES).iter();
    let Some(first) = values.next() else {
        return Duration::ZERO;
    };
    if values.any(|v| v != first) {
        return Duration::ZERO;
    }
    let Some(expires) = parse_http_date(first.as_bytes(), response_time) else {
        return Duration::ZERO;
    };
    secs_between(unix_secs(expires), date_value(headers, response_time))
}

/// `percent`% of `Date - Last-Modified`, capped; `None` when there is no
/// usable `Last-Modified` (absent, invalid, or later than `Date`).
fn heuristic_lifetime(
    headers: &HeaderMap,
    response_time: SystemTime,
    config: &PolicyConfig,
) -> Option<Duration> {
    if config.heuristic_percent == 0 {
        return None;
    }
    let lm = header_date(headers, &LAST_MODIFIED, response_time)?;
    let date = date_value(headers, response_time);
    if lm > date {
        return None;
    }
    let age = secs_between(date, lm).as_secs();
    let lifetime = age.saturating_mul(u64::from(config.heuristic_percent)) / 100;
    Some(Duration::from_secs(lifetime).min(config.heuristic_max))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{at, date, headers, secs};
    use super::*;

    fn fl(status: u16, h: &[(&str, &str)], cfg: &PolicyConfig) -> Freshness {
        freshness_lifetime(
            StatusCode::from_u16(status).expect("status"),
            &headers(h),
            at(0),
            cfg,
        )
    }

    fn ok(h: &[(&str, &str)]) -> Freshness {
        fl(200, h, &PolicyConfig::default())
    }

    #[test]
    fn rfc9111_4_2_1_s_maxage_beats_max_age_beats_expires() {
        let exp = date(1000);
        let d = date(0);
        let all = [
            ("cache-control", "max-age=60, s-maxage=30"),
            ("expires", exp.as_str()),
            ("date", d.as_str()),
        ];
        assert_eq!(
            ok(&all),
            Freshness {
                lifetime: secs(30),
                source: FreshnessSource::SMaxAge
            }
        );
        let no_s = [
            ("cache-control", "max-age=60"),
            ("expires", exp.as_str()),
            ("date", d.as_str()),
        ];
        assert_eq!(
            ok(&no_s),
            Freshness {
                lifetime: secs(60),
                source: FreshnessSource::MaxAge
            }
        );
        let only_exp = [("expires", exp.as_str()), ("date", d.as_str())];
        assert_eq!(
            ok(&only_exp),
            Freshness {
                lifetime: secs(1000),
                source: FreshnessSource::Expires
            }
        );
    }

    #[test]
    fn rfc9111_4_2_1_expires_minus_date_uses_date_header_not_receipt_time() {
        // Date is 100s before receipt; lifetime is Expires - Date = 300.
        let (exp, d) = (date(200), date(-100));
        let f = ok(&[("expires", exp.as_str()), ("date", d.as_str())]);
        assert_eq!(f.lifetime, secs(300));
    }

    #[test]
    fn rfc9111_4_2_1_expires_without_date_uses_response_time() {
        let exp = date(120);
        assert_eq!(ok(&[("expires", exp.as_str())]).lifetime, secs(120));
    }

    #[test]
    fn rfc9111_5_3_invalid_expires_means_already_expired() {
        for bad in ["0", "-1", "tomorrow", ""] {
            let f = ok(&[("expires", bad)]);
            assert_eq!(
                f,
                Freshness {
                    lifetime: Duration::ZERO,
                    source: FreshnessSource::Expires
                },
                "{bad:?}"
            );
        }
    }

    #[test]
    fn rfc9111_4_2_expires_names_match_case_insensitively() {
        // "a cache recipient SHOULD match the field value case-insensitively"
        // (§4.2): `Expires - Date` is the same whatever the case of the day,
        // month and zone names.
        let (exp, d) = (date(1000), date(0));
        for e in [exp.to_ascii_lowercase(), exp.to_ascii_uppercase()] {
            let f = ok(&[("expires", e.as_str()), ("date", d.as_str())]);
            assert_eq!(
                f,
                Freshness {
                    lifetime: secs(1000),
                    source: FreshnessSource::Expires
                },
                "{e:?}"
            );
        }
        // So is Date (and Last-Modified for the heuristic).
        let (lm, d) = (
            date(-10_000).to_ascii_lowercase(),
            date(0).to_ascii_uppercase(),
        );
        let f = ok(&[("last-modified", lm.as_str()), ("date", d.as_str())]);
        assert_eq!(f.lifetime, secs(1_000));
        // A zone other than GMT stays invalid: already expired (§4.2, §5.3).
        let utc = exp.replace("GMT", "UTC");
        assert_eq!(ok(&[("expires", utc.as_str())]).lifetime, Duration::ZERO);
    }

    #[test]
    fn rfc9111_4_2_1_conflicting_expires_lines_mean_stale() {
        let (a, b) = (date(100), date(200));
        assert_eq!(
            ok(&[("expires", a.as_str()), ("expires", b.as_str())]).lifetime,
            Duration::ZERO
        );
    }

    #[test]
    fn rfc9111_4_2_1_past_expires_is_zero() {
        let exp = date(-50);
        assert_eq!(ok(&[("expires", exp.as_str())]).lifetime, Duration::ZERO);
    }

    #[test]
    fn rfc9111_4_2_1_invalid_max_age_is_zero_and_blocks_heuristics() {
        let lm = date(-100_000);
        let cfg = PolicyConfig {
            default_ttl: Some(secs(999)),
            ..PolicyConfig::default()
        };
        let f = fl(
            200,
            &[
                ("cache-control", "max-age=soon"),
                ("last-modified", lm.as_str()),
            ],
            &cfg,
        );
        assert_eq!(
            f,
            Freshness {
                lifetime: Duration::ZERO,
                source: FreshnessSource::MaxAge
            }
        );
    }

    #[test]
    fn rfc9111_4_2_2_heuristic_is_ten_percent_of_last_modified_age() {
        let (lm, d) = (date(-10_000), date(0));
        let f = ok(&[("last-modified", lm.as_str()), ("date", d.as_str())]);
        assert_eq!(
            f,
            Freshness {
                lifetime: secs(1_000),
                source: FreshnessSource::Heuristic
            }
        );
    }

    #[test]
    fn rfc9111_4_2_2_heuristic_is_capped_by_config() {
        let lm = date(-100 * 86_400);
        let f = ok(&[("last-modified", lm.as_str())]);
        assert_eq!(f.lifetime, secs(86_400));
        let cfg = PolicyConfig {
            heuristic_max: secs(60),
            ..PolicyConfig::default()
        };
        assert_eq!(
            fl(200, &[("last-modified", lm.as_str())], &cfg).lifetime,
            secs(60)
        );
    }

    #[test]
    fn rfc9111_4_2_2_no_heuristics_for_non_heuristic_status_unless_public() {
        let lm = date(-10_000);
        let f = fl(
            302,
            &[("last-modified", lm.as_str())],
            &PolicyConfig::default(),
        );
        assert_eq!(
            f,
            Freshness {
                lifetime: Duration::ZERO,
                source: FreshnessSource::None
            }
        );
        let f = fl(
            302,
            &[("last-modified", lm.as_str()), ("cache-control", "public")],
            &PolicyConfig::default(),
        );
        assert_eq!(f.source, FreshnessSource::Heuristic);
    }

    #[test]
    fn rfc9111_4_2_2_last_modified_after_date_is_ignored() {
        let lm = date(500);
        let f = ok(&[("last-modified", lm.as_str())]);
        assert_eq!(f.source, FreshnessSource::None);
    }

    #[test]
    fn default_ttl_applies_only_without_any_freshness_information() {
        let cfg = PolicyConfig {
            default_ttl: Some(secs(300)),
            ..PolicyConfig::default()
        };
        assert_eq!(
            fl(200, &[], &cfg),
            Freshness {
                lifetime: secs(300),
                source: FreshnessSource::DefaultTtl
            }
        );
        assert_eq!(
            fl(200, &[("cache-control", "max-age=5")], &cfg).lifetime,
            secs(5)
        );
        // Not for statuses where caching is not allowed heuristically.
        assert_eq!(fl(500, &[], &cfg).source, FreshnessSource::None);
        // Last-Modified heuristics win over the default TTL.
        let lm = date(-1_000);
        assert_eq!(
            fl(200, &[("last-modified", lm.as_str())], &cfg).lifetime,
            secs(100)
        );
    }

    #[test]
    fn rfc9213_expires_ignored_when_targeted_field_used() {
        let exp = date(1_000);
        let f = ok(&[("cdn-cache-control", "public"), ("expires", exp.as_str())]);
        assert_eq!(f.source, FreshnessSource::None);
        let f = ok(&[
            ("cdn-cache-control", "max-age=7"),
            ("cache-control", "max-age=99"),
        ]);
        assert_eq!(f.lifetime, secs(7));
    }

    #[test]
    fn heuristic_percent_zero_disables_last_modified_heuristic() {
        let lm = date(-10_000);
        let cfg = PolicyConfig {
            heuristic_percent: 0,
            default_ttl: Some(secs(42)),
            ..PolicyConfig::default()
        };
        let f = fl(200, &[("last-modified", lm.as_str())], &cfg);
        assert_eq!(
            f,
            Freshness {
                lifetime: secs(42),
                source: FreshnessSource::DefaultTtl
            }
        );
    }

    #[test]
    fn freshness_source_labels() {
        assert_eq!(FreshnessSource::SMaxAge.as_str(), "s-maxage");
        assert!(FreshnessSource::Expires.is_explicit());
        assert!(!FreshnessSource::Heuristic.is_explicit());
    }
}
