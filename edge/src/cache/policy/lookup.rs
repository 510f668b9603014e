//! Deciding how to answer a request from a stored response (RFC 9111 §4,
//! §4.2.4, §5.2.1, §5.2.2; RFC 5861; RFC 8246).
//!
//! [`lookup`] assumes the caller already selected a stored response whose
//! primary key and `Vary` secondary key match the request (see
//! [`super::vary`]) and that the request method is GET or HEAD.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, StatusCode};

use super::age::current_age;
use super::directives::{MaxStale, RequestDirectives, ResponseDirectives};
use super::freshness::freshness_lifetime;
use super::targeted::effective_response_directives;
use super::{PolicyConfig, StoredResponse};

/// How to answer a request given a matching stored response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Serve from cache.
    Fresh {
        /// Remaining freshness (`lifetime - age`).
        ttl_left: Duration,
        /// Current age.
        age: Duration,
    },
    /// Stale, but the client's `max-stale` accepts it: serve from cache
    /// without revalidation.
    Stale {
        /// How far past its freshness lifetime the response is.
        staleness: Duration,
        /// Current age.
        age: Duration,
    },
    /// Serve the stale response now and trigger one background
    /// revalidation (RFC 5861 §3). The caller deduplicates revalidations.
    StaleWhileRevalidate {
        /// How far past its freshness lifetime the response is.
        staleness: Duration,
        /// Current age.
        age: Duration,
        /// Remaining time in the stale-while-revalidate window.
        window_left: Duration,
    },
    /// Send a conditional request upstream before answering.
    MustRevalidate {
        /// Why the stored response cannot be used as-is.
        reason: RevalidateReason,
        /// Current age.
        age: Duration,
    },
    /// `only-if-cached` and nothing usable: answer 504 (RFC 9111 §5.2.1.7).
    GatewayTimeout,
}

/// Why a stored response needs validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RevalidateReason {
    /// Response `no-cache` (unqualified).
    ResponseNoCache,
    /// Request `no-cache`.
    RequestNoCache,
    /// Request `max-age` exceeded by the current age.
    RequestMaxAge,
    /// Request `min-fresh` not satisfied.
    RequestMinFresh,
    /// Stale and no stale-serving allowance applies.
    Stale,
}

impl RevalidateReason {
    /// Stable label for metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            RevalidateReason::ResponseNoCache => "response-no-cache",
            RevalidateReason::RequestNoCache => "request-no-cache",
            RevalidateReason::RequestMaxAge => "request-max-age",
            RevalidateReason::RequestMinFresh => "request-min-fresh",
            RevalidateReason::Stale => "stale",
        }
    }
}

/// What to do when there is no stored response for the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissAction {
    /// Forward the request upstream.
    Forward,
    /// `only-if-cached`: answer 504 without contacting the origin.
    GatewayTimeout,
}

/// Decision for a cache miss.
pub fn on_miss(req_headers: &HeaderMap) -> MissAction {
    if RequestDirectives::from_headers(req_headers).only_if_cached {
        MissAction::GatewayTimeout
    } else {
        MissAction::Forward
    }
}

/// Whether serving the response stale is prohibited (RFC 9111 §4.2.4).
/// `origin_directive` says the allowance being considered was sent by the
/// origin (only then can [`PolicyConfig::s_maxage_allows_origin_stale`]
/// lift the `s-maxage` prohibition).
fn stale_prohibited(d: &ResponseDirectives, origin_directive: bool, config: &PolicyConfig) -> bool {
    d.must_revalidate
        || d.proxy_revalidate
        || d.no_cache.is_all()
        || (d.s_maxage.is_some() && !(origin_directive && config.s_maxage_allows_origin_stale))
}

/// An allowance window and whether the origin sent it.
fn window(origin: Option<u32>, default: Option<Duration>) -> Option<(Duration, bool)> {
    match origin {
        Some(v) => Some((Duration::from_secs(u64::from(v)), true)),
        None => default.map(|d| (d, false)),
    }
}

fn max_stale_allows(ms: Option<MaxStale>, staleness: Duration) -> bool {
    match ms {
        Some(MaxStale::Any) => true,
        Some(MaxStale::Limit(n)) => staleness <= Duration::from_secs(u64::from(n)),
        None => false,
    }
}

/// Decides how to answer a request from `stored` at `now`.
pub fn lookup(
    stored: &StoredResponse,
    req_headers: &HeaderMap,
    now: SystemTime,
    config: &PolicyConfig,
) -> Lookup {
    let rd = RequestDirectives::from_headers(req_headers);
    let decision = decide(stored, &rd, now, config);
    if rd.only_if_cached && matches!(decision, Lookup::MustRevalidate { .. }) {
        Lookup::GatewayTimeout
    } else {
        decision
    }
}

fn decide(
    stored: &StoredResponse,
    rd: &RequestDirectives,
    now: SystemTime,
    config: &PolicyConfig,
) -> Lookup {
    let d = effective_response_directives(&stored.headers).directives;
    let age = current_age(stored, now);
    let lifetime =
        freshness_lifetime(stored.status, &stored.headers, stored.response_time, config).lifetime;
    let revalidate = |reason| Lookup::MustRevalidate { reason, age };

    if d.no_cache.is_all() {
        return revalidate(RevalidateReason::ResponseNoCache);
    }
    let is_fresh = lifetime > age;
    // RFC 8246: an immutable response is not revalidated while fresh.
    let immutable_fresh = d.immutable && is_fresh;
    if rd.no_cache && config.honor_request_no_cache && !immutable_fresh {
        return revalidate(RevalidateReason::RequestNoCache);
    }
    if let Some(ma) = rd.max_age
        && age > Duration::from_secs(u64::from(ma))
        && !immutable_fresh
    {
        return revalidate(RevalidateReason::RequestMaxAge);
    }
    if is_fresh {
        let ttl_left = lifetime - age;
        if let Some(mf) = rd.min_fresh
            && ttl_left < Duration::from_secs(u64::from(mf))
        {
            return revalidate(RevalidateReason::RequestMinFresh);
        }
        return Lookup::Fresh { ttl_left, age };
    }
    if rd.min_fresh.is_some() {
        return revalidate(RevalidateReason::RequestMinFresh);
    }
    let staleness = age - lifetime;
    if !stale_prohibited(&d, false, config) && max_stale_allows(rd.max_stale, staleness) {
        return Lookup::Stale { staleness, age };
    }
    if let Some((w, origin)) = window(
        d.stale_while_revalidate,
        config.default_stale_while_revalidate,
    ) && !stale_prohibited(&d, origin, config)
        && staleness < w
    {
        return Lookup::StaleWhileRevalidate {
            staleness,
            age,
            window_left: w - staleness,
        };
    }
    revalidate(RevalidateReason::Stale)
}

/// Why the upstream fetch (or revalidation) failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// The origin answered with this status.
    Status(StatusCode),
    /// Could not connect.
    Connect,
    /// Timed out.
    Timeout,
    /// Another request's fetch of the object, which this one waited for,
    /// had no answer within `cache.lock_timeout`. An error for
    /// stale-if-error, but no sign that the origin is unreachable (it may
    /// only be slow), so `stale_if_unreachable` does not cover it.
    Unanswered,
}

impl UpstreamFailure {
    /// RFC 5861 §4: errors are 500, 502, 503, 504 and failures to reach the
    /// origin.
    pub fn is_error(self) -> bool {
        match self {
            UpstreamFailure::Status(s) => matches!(s.as_u16(), 500 | 502 | 503 | 504),
            UpstreamFailure::Connect | UpstreamFailure::Timeout | UpstreamFailure::Unanswered => {
                true
            }
        }
    }
}

/// Whether `stored` may be served because the origin failed (RFC 5861 §4,
/// RFC 9111 §4.2.4, §4.3.3).
///
/// A fresh response may always be served (unless unqualified `no-cache`). A
/// stale one is allowed within the origin's `stale-if-error` window (or
/// [`PolicyConfig::default_stale_if_error`] when the origin sent none), the
/// request's `stale-if-error` window, or the request's `max-stale` — but
/// never when `must-revalidate`, `proxy-revalidate`, unqualified `no-cache`
/// or `s-maxage` forbid stale responses (see the module docs).
pub fn may_serve_stale_on_error(
    stored: &StoredResponse,
    req_headers: &HeaderMap,
    failure: UpstreamFailure,
    now: SystemTime,
    config: &PolicyConfig,
) -> bool {
    if !failure.is_error() {
        return false;
    }
    let d = effective_response_directives(&stored.headers).directives;
    if d.no_cache.is_all() {
        return false;
    }
    let age = current_age(stored, now);
    let lifetime =
        freshness_lifetime(stored.status, &stored.headers, stored.response_time, config).lifetime;
    if lifetime > age {
        return true;
    }
    let staleness = age - lifetime;
    if let Some((w, origin)) = window(d.stale_if_error, config.default_stale_if_error)
        && !stale_prohibited(&d, origin, config)
        && staleness < w
    {
        return true;
    }
    if stale_prohibited(&d, false, config) {
        return false;
    }
    if matches!(failure, UpstreamFailure::Connect | UpstreamFailure::Timeout)
        && config.stale_if_unreachable.is_some_and(|w| staleness < w)
    {
        return true;
    }
    let rd = RequestDirectives::from_headers(req_headers);
    if let Some(w) = rd.stale_if_error
        && staleness < Duration::from_secs(u64::from(w))
    {
        return true;
    }
    max_stale_allows(rd.max_stale, staleness)
}

/// Remaining freshness in seconds, negative when stale (for the
/// `Cache-Status` `ttl` parameter).
pub fn remaining_ttl_secs(stored: &StoredResponse, now: SystemTime, config: &PolicyConfig) -> i64 {
    let age = current_age(stored, now).as_secs();
    let lifetime = freshness_lifetime(stored.status, &stored.headers, stored.response_time, config)
        .lifetime
        .as_secs();
    let age = i64::try_from(age).unwrap_or(i64::MAX);
    let lifetime = i64::try_from(lifetime).unwrap_or(i64::MAX);
    lifetime.saturating_sub(age)
}

/// Fields named by a qualified `no-cache="..."` (RFC 9111 §5.2.2.4): they
/// must be omitted when the response is reused without revalidation.
pub fn headers_to_omit_on_reuse(stored_headers: &HeaderMap) -> Vec<HeaderName> {
    effective_response_directives(stored_headers)
        .directives
        .no_cache
        .fields()
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{at, date, headers, secs};
    use super::*;

    /// Stored at t=0 with `Date` = t=0 and the given extra headers.
    fn stored(h: &[(&str, &str)]) -> StoredResponse {
        let d = date(0);
        let mut all = vec![("date", d.as_str())];
        all.extend_from_slice(h);
        StoredResponse {
            status: StatusCode::OK,
            headers: headers(&all),
            request_time: at(0),
            response_time: at(0),
        }
    }

    fn look(cc: &str, req: &[(&str, &str)], now: i64) -> Lookup {
        lookup(
            &stored(&[("cache-control", cc)]),
            &headers(req),
            at(now),
            &PolicyConfig::default(),
        )
    }

    fn look_cfg(cc: &str, req: &[(&str, &str)], now: i64, cfg: &PolicyConfig) -> Lookup {
        lookup(
            &stored(&[("cache-control", cc)]),
            &headers(req),
            at(now),
            cfg,
        )
    }

    fn reval(reason: RevalidateReason, age: u64) -> Lookup {
        Lookup::MustRevalidate {
            reason,
            age: secs(age),
        }
    }

    #[test]
    fn rfc9111_4_2_fresh_while_age_below_lifetime() {
        assert_eq!(
            look("max-age=100", &[], 40),
            Lookup::Fresh {
                ttl_left: secs(60),
                age: secs(40)
            }
        );
    }

    #[test]
    fn rfc9111_4_2_stale_exactly_at_lifetime() {
        assert_eq!(
            look("max-age=100", &[], 100),
            reval(RevalidateReason::Stale, 100)
        );
    }

    #[test]
    fn rfc9111_4_2_age_header_counts_towards_staleness() {
        let s = stored(&[("cache-control", "max-age=100"), ("age", "90")]);
        assert_eq!(
            lookup(&s, &HeaderMap::new(), at(5), &PolicyConfig::default()),
            Lookup::Fresh {
                ttl_left: secs(5),
                age: secs(95)
            }
        );
    }

    #[test]
    fn rfc9111_5_2_2_4_response_no_cache_always_revalidates() {
        assert_eq!(
            look("no-cache, max-age=100", &[], 1),
            reval(RevalidateReason::ResponseNoCache, 1)
        );
    }

    #[test]
    fn rfc9111_5_2_2_4_qualified_no_cache_allows_reuse_without_listed_fields() {
        let s = stored(&[("cache-control", r#"no-cache="set-cookie", max-age=100"#)]);
        assert!(matches!(
            lookup(&s, &HeaderMap::new(), at(1), &PolicyConfig::default()),
            Lookup::Fresh { .. }
        ));
        assert_eq!(
            headers_to_omit_on_reuse(&s.headers),
            vec![HeaderName::from_static("set-cookie")]
        );
    }

    #[test]
    fn rfc9111_5_2_1_4_request_no_cache_forces_revalidation() {
        assert_eq!(
            look("max-age=100", &[("cache-control", "no-cache")], 1),
            reval(RevalidateReason::RequestNoCache, 1)
        );
    }

    #[test]
    fn request_no_cache_can_be_ignored_by_config() {
        let cfg = PolicyConfig {
            honor_request_no_cache: false,
            ..PolicyConfig::default()
        };
        assert!(matches!(
            look_cfg("max-age=100", &[("cache-control", "no-cache")], 1, &cfg),
            Lookup::Fresh { .. }
        ));
    }

    #[test]
    fn rfc9111_5_2_1_5_request_no_store_does_not_prevent_serving_from_cache() {
        assert!(matches!(
            look("max-age=100", &[("cache-control", "no-store")], 1),
            Lookup::Fresh { .. }
        ));
    }

    #[test]
    fn rfc9111_5_2_1_1_request_max_age_exceeded_revalidates() {
        assert_eq!(
            look("max-age=100", &[("cache-control", "max-age=10")], 11),
            reval(RevalidateReason::RequestMaxAge, 11)
        );
        assert!(matches!(
            look("max-age=100", &[("cache-control", "max-age=10")], 10),
            Lookup::Fresh { .. }
        ));
    }

    #[test]
    fn rfc9111_5_2_1_3_min_fresh_requires_remaining_freshness() {
        assert_eq!(
            look("max-age=100", &[("cache-control", "min-fresh=30")], 80),
            reval(RevalidateReason::RequestMinFresh, 80)
        );
        assert!(matches!(
            look("max-age=100", &[("cache-control", "min-fresh=30")], 70),
            Lookup::Fresh { .. }
        ));
    }

    #[test]
    fn rfc9111_5_2_1_2_max_stale_without_value_accepts_any_staleness() {
        assert_eq!(
            look("max-age=10", &[("cache-control", "max-stale")], 1_000),
            Lookup::Stale {
                staleness: secs(990),
                age: secs(1_000)
            }
        );
    }

    #[test]
    fn rfc9111_5_2_1_2_max_stale_with_value_bounds_staleness() {
        assert!(matches!(
            look("max-age=10", &[("cache-control", "max-stale=20")], 30),
            Lookup::Stale { .. }
        ));
        assert_eq!(
            look("max-age=10", &[("cache-control", "max-stale=20")], 31),
            reval(RevalidateReason::Stale, 31)
        );
    }

    #[test]
    fn rfc9111_4_2_4_must_revalidate_blocks_max_stale() {
        assert_eq!(
            look(
                "max-age=10, must-revalidate",
                &[("cache-control", "max-stale")],
                30
            ),
            reval(RevalidateReason::Stale, 30)
        );
    }

    #[test]
    fn rfc9111_5_2_2_8_proxy_revalidate_blocks_stale_in_shared_cache() {
        assert_eq!(
            look(
                "max-age=10, proxy-revalidate, stale-while-revalidate=60",
                &[("cache-control", "max-stale")],
                30
            ),
            reval(RevalidateReason::Stale, 30)
        );
    }

    #[test]
    fn rfc9111_5_2_2_10_s_maxage_implies_proxy_revalidate() {
        assert_eq!(
            look(
                "s-maxage=10, stale-while-revalidate=60",
                &[("cache-control", "max-stale")],
                30
            ),
            reval(RevalidateReason::Stale, 30)
        );
    }

    #[test]
    fn s_maxage_with_origin_swr_allowed_by_config_knob() {
        let cfg = PolicyConfig {
            s_maxage_allows_origin_stale: true,
            ..PolicyConfig::default()
        };
        assert_eq!(
            look_cfg("s-maxage=10, stale-while-revalidate=60", &[], 30, &cfg),
            Lookup::StaleWhileRevalidate {
                staleness: secs(20),
                age: secs(30),
                window_left: secs(40)
            }
        );
        // The knob does not let client max-stale or config defaults through.
        let cfg2 = PolicyConfig {
            default_stale_while_revalidate: Some(secs(60)),
            ..cfg
        };
        assert_eq!(
            look_cfg("s-maxage=10", &[("cache-control", "max-stale")], 30, &cfg2),
            reval(RevalidateReason::Stale, 30)
        );
    }

    #[test]
    fn rfc5861_3_stale_while_revalidate_window() {
        assert_eq!(
            look("max-age=10, stale-while-revalidate=30", &[], 25),
            Lookup::StaleWhileRevalidate {
                staleness: secs(15),
                age: secs(25),
                window_left: secs(15)
            }
        );
        assert_eq!(
            look("max-age=10, stale-while-revalidate=30", &[], 40),
            reval(RevalidateReason::Stale, 40)
        );
    }

    #[test]
    fn rfc5861_3_swr_not_used_when_client_demands_validation() {
        assert_eq!(
            look(
                "max-age=10, stale-while-revalidate=30",
                &[("cache-control", "no-cache")],
                15
            ),
            reval(RevalidateReason::RequestNoCache, 15)
        );
        assert_eq!(
            look(
                "max-age=10, stale-while-revalidate=30",
                &[("cache-control", "min-fresh=1")],
                15
            ),
            reval(RevalidateReason::RequestMinFresh, 15)
        );
    }

    #[test]
    fn default_swr_applies_only_when_origin_sends_none() {
        let cfg = PolicyConfig {
            default_stale_while_revalidate: Some(secs(100)),
            ..PolicyConfig::default()
        };
        assert!(matches!(
            look_cfg("max-age=10", &[], 50, &cfg),
            Lookup::StaleWhileRevalidate { .. }
        ));
        // Origin's explicit (shorter) window wins over the default.
        assert_eq!(
            look_cfg("max-age=10, stale-while-revalidate=5", &[], 50, &cfg),
            reval(RevalidateReason::Stale, 50)
        );
        // Defaults never override must-revalidate.
        assert_eq!(
            look_cfg("max-age=10, must-revalidate", &[], 50, &cfg),
            reval(RevalidateReason::Stale, 50)
        );
    }

    #[test]
    fn rfc9111_5_2_1_7_only_if_cached_returns_504_when_revalidation_needed() {
        assert_eq!(
            look("max-age=10", &[("cache-control", "only-if-cached")], 50),
            Lookup::GatewayTimeout
        );
        assert!(matches!(
            look("max-age=100", &[("cache-control", "only-if-cached")], 50),
            Lookup::Fresh { .. }
        ));
        assert_eq!(
            on_miss(&headers(&[("cache-control", "only-if-cached")])),
            MissAction::GatewayTimeout
        );
        assert_eq!(on_miss(&HeaderMap::new()), MissAction::Forward);
    }

    #[test]
    fn rfc9111_5_2_1_7_only_if_cached_with_no_cache_response_is_504() {
        assert_eq!(
            look(
                "no-cache, max-age=100",
                &[("cache-control", "only-if-cached")],
                1
            ),
            Lookup::GatewayTimeout
        );
        // A stale response the client accepts via max-stale is still served.
        assert!(matches!(
            look(
                "max-age=1",
                &[("cache-control", "only-if-cached, max-stale")],
                50
            ),
            Lookup::Stale { .. }
        ));
    }

    #[test]
    fn rfc8246_immutable_ignores_client_reload_while_fresh() {
        assert!(matches!(
            look(
                "max-age=100, immutable",
                &[("cache-control", "no-cache")],
                50
            ),
            Lookup::Fresh { .. }
        ));
        assert!(matches!(
            look(
                "max-age=100, immutable",
                &[("cache-control", "max-age=0")],
                50
            ),
            Lookup::Fresh { .. }
        ));
        // Once stale, immutable has no effect.
        assert_eq!(
            look(
                "max-age=100, immutable",
                &[("cache-control", "no-cache")],
                150
            ),
            reval(RevalidateReason::RequestNoCache, 150)
        );
    }

    #[test]
    fn rfc9111_4_2_1_conflicting_max_age_is_stale_immediately() {
        assert_eq!(
            look("max-age=100, max-age=200", &[], 0),
            reval(RevalidateReason::Stale, 0)
        );
    }

    #[test]
    fn rfc9213_targeted_field_controls_lookup() {
        let s = stored(&[
            ("cache-control", "no-cache"),
            ("meridian-cache-control", "max-age=60"),
        ]);
        assert!(matches!(
            lookup(&s, &HeaderMap::new(), at(10), &PolicyConfig::default()),
            Lookup::Fresh { .. }
        ));
    }

    fn sie(
        cc: &str,
        req: &[(&str, &str)],
        failure: UpstreamFailure,
        now: i64,
        cfg: &PolicyConfig,
    ) -> bool {
        may_serve_stale_on_error(
            &stored(&[("cache-control", cc)]),
            &headers(req),
            failure,
            at(now),
            cfg,
        )
    }

    const E503: UpstreamFailure = UpstreamFailure::Status(StatusCode::SERVICE_UNAVAILABLE);

    #[test]
    fn rfc5861_4_stale_if_error_within_window_on_5xx_connect_and_timeout() {
        let cfg = PolicyConfig::default();
        for f in [
            E503,
            UpstreamFailure::Connect,
            UpstreamFailure::Timeout,
            UpstreamFailure::Status(StatusCode::INTERNAL_SERVER_ERROR),
            UpstreamFailure::Status(StatusCode::BAD_GATEWAY),
            UpstreamFailure::Status(StatusCode::GATEWAY_TIMEOUT),
            UpstreamFailure::Unanswered,
        ] {
            assert!(
                sie("max-age=10, stale-if-error=60", &[], f, 30, &cfg),
                "{f:?}"
            );
        }
        assert!(!sie("max-age=10, stale-if-error=60", &[], E503, 70, &cfg));
    }

    #[test]
    fn rfc9111_4_2_4_stale_when_unreachable_without_a_directive() {
        let cfg = PolicyConfig {
            stale_if_unreachable: Some(secs(3600)),
            ..PolicyConfig::default()
        };
        for f in [UpstreamFailure::Connect, UpstreamFailure::Timeout] {
            assert!(sie("max-age=10", &[], f, 30, &cfg), "{f:?}");
            assert!(
                !sie("max-age=10", &[], f, 30 + 3600, &cfg),
                "{f:?} past the window"
            );
            for forbids in [
                "max-age=10, must-revalidate",
                "max-age=10, proxy-revalidate",
                "max-age=10, no-cache",
                "s-maxage=10",
            ] {
                assert!(!sie(forbids, &[], f, 30, &cfg), "{forbids}");
            }
        }
        assert!(
            !sie("max-age=10", &[], E503, 30, &cfg),
            "an origin that answers is reachable"
        );
        assert!(
            !sie("max-age=10", &[], UpstreamFailure::Unanswered, 30, &cfg),
            "an origin that is only slow may be reachable"
        );
        assert!(
            !sie(
                "max-age=10",
                &[],
                UpstreamFailure::Connect,
                30,
                &PolicyConfig::default()
            ),
            "off unless configured"
        );
    }

    #[test]
    fn rfc5861_4_only_listed_errors_qualify() {
        let cfg = PolicyConfig::default();
        for code in [404, 501, 505, 429] {
            let f = UpstreamFailure::Status(StatusCode::from_u16(code).expect("status"));
            assert!(
                !sie("max-age=10, stale-if-error=60", &[], f, 30, &cfg),
                "{code}"
            );
        }
    }

    #[test]
    fn rfc5861_4_stale_if_error_does_not_override_must_revalidate() {
        let cfg = PolicyConfig {
            default_stale_if_error: Some(secs(600)),
            ..PolicyConfig::default()
        };
        assert!(!sie(
            "max-age=10, must-revalidate, stale-if-error=60",
            &[],
            E503,
            30,
            &cfg
        ));
        assert!(!sie("max-age=10, proxy-revalidate", &[], E503, 30, &cfg));
        assert!(!sie("s-maxage=10, stale-if-error=60", &[], E503, 30, &cfg));
        assert!(!sie("no-cache, max-age=100", &[], E503, 30, &cfg));
        assert!(!sie(
            "max-age=10, must-revalidate",
            &[("cache-control", "stale-if-error=100")],
            E503,
            30,
            &cfg
        ));
    }

    #[test]
    fn default_stale_if_error_used_when_origin_sends_none() {
        let cfg = PolicyConfig {
            default_stale_if_error: Some(secs(600)),
            ..PolicyConfig::default()
        };
        assert!(sie("max-age=10", &[], UpstreamFailure::Connect, 300, &cfg));
        assert!(!sie(
            "max-age=10",
            &[],
            UpstreamFailure::Connect,
            300,
            &PolicyConfig::default()
        ));
    }

    #[test]
    fn rfc5861_4_request_stale_if_error_and_fresh_response_on_error() {
        let cfg = PolicyConfig::default();
        assert!(sie(
            "max-age=10",
            &[("cache-control", "stale-if-error=100")],
            E503,
            50,
            &cfg
        ));
        assert!(!sie(
            "max-age=10",
            &[("cache-control", "stale-if-error=10")],
            E503,
            50,
            &cfg
        ));
        // Fresh responses may be served when a forced revalidation fails.
        assert!(sie("max-age=100, must-revalidate", &[], E503, 50, &cfg));
    }

    #[test]
    fn remaining_ttl_is_negative_when_stale() {
        let s = stored(&[("cache-control", "max-age=10")]);
        assert_eq!(remaining_ttl_secs(&s, at(4), &PolicyConfig::default()), 6);
        assert_eq!(
            remaining_ttl_secs(&s, at(25), &PolicyConfig::default()),
            -15
        );
    }

    #[test]
    fn revalidate_reason_labels() {
        assert_eq!(
            RevalidateReason::RequestMinFresh.as_str(),
            "request-min-fresh"
        );
        assert_eq!(RevalidateReason::Stale.as_str(), "stale");
    }
}
