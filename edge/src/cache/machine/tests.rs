//! The machine driven by a small in-memory driver with a fake upstream,
//! under paused time: every state of the chart in the module docs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use parking_lot::Mutex;
use tokio::sync::watch;

use super::*;
use crate::cache::http::SitePolicy;
use crate::cache::policy::{self, StoredResponse, UpstreamFailure};
use crate::config::{CacheConfig, SiteCache};

type Answer = Result<(StatusCode, HeaderMap), UpstreamFailure>;
type Origin = Box<dyn Fn(&HeaderMap) -> Answer + Send + Sync>;

/// A driver with the real one's effects, in memory: storage is a map, the
/// upstream is a function, and time is tokio's paused clock.
struct Sim {
    sp: Arc<SitePolicy>,
    base: SystemTime,
    start: tokio::time::Instant,
    store: Mutex<HashMap<String, StoredResponse>>,
    flights: Mutex<HashMap<String, watch::Receiver<FlightState>>>,
    pass: Mutex<HashMap<String, tokio::time::Instant>>,
    origin: Mutex<Origin>,
    /// How long the origin takes to answer.
    delay: Mutex<Duration>,
    /// The request headers of every origin request, in order.
    seen: Mutex<Vec<HeaderMap>>,
}

/// What a client got.
#[derive(Debug)]
struct Got {
    status: StatusCode,
    result: &'static str,
    cache_status: String,
    from_cache: bool,
}

struct Leader {
    sim: Arc<Sim>,
    flight: String,
    tx: watch::Sender<FlightState>,
    failed: Option<UpstreamFailure>,
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.sim.flights.lock().remove(&self.flight);
        let _ = self
            .tx
            .send(self.failed.map_or(FlightState::Done, FlightState::Failed));
    }
}

/// The leader's origin request failed so (the driver's `fail_flight`).
fn fail(leader: &mut Option<Leader>, failure: UpstreamFailure) {
    if let Some(l) = leader {
        l.failed = Some(failure);
    }
}

const KEY: &str = "https://a.test/x";

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in pairs {
        h.append(
            HeaderName::from_bytes(n.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    h
}

fn ok(cc: &str) -> Answer {
    Ok((
        StatusCode::OK,
        headers(&[
            ("cache-control", cc),
            ("etag", "\"v1\""),
            ("content-length", "3"),
        ]),
    ))
}

impl Sim {
    fn new(
        delay: Duration,
        origin: impl Fn(&HeaderMap) -> Answer + Send + Sync + 'static,
    ) -> Arc<Self> {
        Self::with(delay, SiteCache::default(), origin)
    }

    fn with(
        delay: Duration,
        site: SiteCache,
        origin: impl Fn(&HeaderMap) -> Answer + Send + Sync + 'static,
    ) -> Arc<Self> {
        let global = CacheConfig {
            lock_timeout: crate::config::Dur::secs(2),
            ..CacheConfig::default()
        };
        Arc::new(Sim {
            sp: Arc::new(SitePolicy::new(&site, &global)),
            base: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            start: tokio::time::Instant::now(),
            store: Mutex::default(),
            flights: Mutex::default(),
            pass: Mutex::default(),
            origin: Mutex::new(Box::new(origin)),
            delay: Mutex::new(delay),
            seen: Mutex::default(),
        })
    }

    fn now(&self) -> SystemTime {
        self.base + self.start.elapsed()
    }

    fn set_origin(&self, origin: impl Fn(&HeaderMap) -> Answer + Send + Sync + 'static) {
        *self.origin.lock() = Box::new(origin);
    }

    fn set_delay(&self, delay: Duration) {
        *self.delay.lock() = delay;
    }

    fn origin_requests(&self) -> usize {
        self.seen.lock().len()
    }

    async fn upstream(&self, req: &HeaderMap) -> Answer {
        self.seen.lock().push(req.clone());
        let delay = *self.delay.lock();
        tokio::time::sleep(delay).await;
        (self.origin.lock())(req)
    }

    fn lookup(&self) -> Option<StoredResponse> {
        self.store.lock().get(KEY).cloned()
    }

    fn is_pass(&self) -> bool {
        self.pass
            .lock()
            .get(KEY)
            .is_some_and(|until| *until > tokio::time::Instant::now())
    }

    fn join(self: &Arc<Self>, flight: &str) -> Result<Leader, watch::Receiver<FlightState>> {
        let mut f = self.flights.lock();
        if let Some(rx) = f.get(flight) {
            return Err(rx.clone());
        }
        let (tx, rx) = watch::channel(FlightState::Running);
        f.insert(flight.to_string(), rx);
        Ok(Leader {
            sim: self.clone(),
            flight: flight.to_string(),
            tx,
            failed: None,
        })
    }

    fn store(&self, status: StatusCode, h: &HeaderMap, request_time: SystemTime) {
        self.store.lock().insert(
            KEY.to_string(),
            StoredResponse {
                status,
                headers: h.clone(),
                request_time,
                response_time: self.now(),
            },
        );
    }

    async fn get(self: &Arc<Self>, req: &[(&str, &str)]) -> Got {
        self.request(Method::GET, headers(req)).await
    }

    /// The driver loop: the same effects, in the same order, as
    /// `proxy::cache`'s.
    async fn request(self: &Arc<Self>, method: Method, req: HeaderMap) -> Got {
        let mut m = CacheMachine::new(self.sp.clone(), method.clone(), req.clone(), KEY.into());
        let stored = self.lookup();
        let found = match &stored {
            Some(s) => Found::Hit {
                obj_key: KEY,
                stored: s,
            },
            None => Found::Miss { variant: None },
        };
        let mut step = m.on_lookup(found, self.now(), self.is_pass());
        let mut leader = None;
        let mut follower = None;
        loop {
            step = match step {
                Step::Serve {
                    status,
                    result,
                    revalidate,
                } => {
                    if revalidate {
                        self.spawn_revalidation();
                    }
                    return Got {
                        status: StatusCode::OK,
                        result,
                        cache_status: status.to_header_value().to_str().unwrap_or("").into(),
                        from_cache: true,
                    };
                }
                Step::Join { flight } => match self.join(&flight) {
                    Ok(l) => {
                        leader = Some(l);
                        m.on_join(true)
                    }
                    Err(rx) => {
                        follower = Some(rx);
                        m.on_join(false)
                    }
                },
                Step::Wait { timeout } => {
                    let Some(rx) = follower.take() else {
                        panic!("wait without a flight");
                    };
                    let waited = crate::cache::http::wait_for_flight(rx, timeout).await;
                    let found = self.lookup();
                    m.on_wait(found.as_ref().map(|s| (KEY, s)), waited, self.now())
                }
                Step::TryPart => m.on_no_part(),
                Step::NotCached => {
                    return Got {
                        status: StatusCode::GATEWAY_TIMEOUT,
                        result: "only-if-cached",
                        cache_status: String::new(),
                        from_cache: false,
                    };
                }
                Step::Fetch(f) => return self.fetch(&m, f, req, leader, stored).await,
            };
        }
    }

    async fn fetch(
        self: &Arc<Self>,
        m: &CacheMachine,
        f: Fetch,
        req: HeaderMap,
        mut leader: Option<Leader>,
        stored: Option<StoredResponse>,
    ) -> Got {
        let got = |status: StatusCode, cs: CacheStatus, from_cache| Got {
            status,
            result: f.result,
            cache_status: cs.to_header_value().to_str().unwrap_or("").into(),
            from_cache,
        };
        let request_time = self.now();
        match f.kind {
            FetchKind::Pass | FetchKind::Range { .. } => {
                let status = match self.upstream(&req).await {
                    Ok((s, _)) => s,
                    Err(_) => StatusCode::BAD_GATEWAY,
                };
                got(status, f.status.fwd_status(status), false)
            }
            FetchKind::Fill { .. } => {
                let mut whole = req.clone();
                whole.remove(header::RANGE);
                let (status, h) = match self.upstream(&whole).await {
                    Ok(answer) => answer,
                    Err(failure) => {
                        fail(&mut leader, failure);
                        return got(StatusCode::BAD_GATEWAY, f.status, false);
                    }
                };
                let cs = f.status.fwd_status(status);
                match store_decision(
                    &Method::GET,
                    &req,
                    status,
                    &h,
                    self.now(),
                    u64::MAX,
                    &self.sp,
                ) {
                    StoreDecision::Store => {
                        self.store(status, &h, request_time);
                        drop(leader);
                        got(status, cs.stored(), false)
                    }
                    StoreDecision::DontStore {
                        reason,
                        hit_for_pass,
                    } => {
                        if hit_for_pass {
                            self.pass.lock().insert(
                                KEY.into(),
                                tokio::time::Instant::now() + self.sp.hit_for_pass,
                            );
                        }
                        got(status, cs.detail(reason), false)
                    }
                }
            }
            FetchKind::Revalidate { .. } => {
                let Some(stored) = stored else {
                    panic!("revalidation without a stored object");
                };
                let conditional = policy::revalidation_request_headers(&req, &stored.headers);
                match self.upstream(&conditional).await {
                    Err(failure) => {
                        fail(&mut leader, failure);
                        if m.on_revalidation_error(&stored, failure, self.now()) {
                            got(
                                StatusCode::OK,
                                CacheStatus::hit(CACHE_NAME).detail("stale-if-error"),
                                true,
                            )
                        } else {
                            got(StatusCode::BAD_GATEWAY, f.status, false)
                        }
                    }
                    Ok((status, h)) => {
                        match m.on_revalidation_response(&stored, status, self.now()) {
                            Revalidated::Freshen => {
                                let mut fresh = stored.clone();
                                policy::freshen_stored_response(
                                    &mut fresh,
                                    &h,
                                    request_time,
                                    self.now(),
                                );
                                self.store(fresh.status, &fresh.headers, request_time);
                                drop(leader);
                                got(StatusCode::OK, f.status.fwd_status(status), true)
                            }
                            Revalidated::ServeStale => {
                                fail(&mut leader, UpstreamFailure::Status(status));
                                got(
                                    StatusCode::OK,
                                    CacheStatus::hit(CACHE_NAME)
                                        .detail("stale-if-error")
                                        .fwd_status(status),
                                    true,
                                )
                            }
                            Revalidated::Replace => {
                                if UpstreamFailure::Status(status).is_error() {
                                    fail(&mut leader, UpstreamFailure::Status(status));
                                }
                                self.store(status, &h, request_time);
                                drop(leader);
                                got(status, f.status.fwd_status(status).stored(), false)
                            }
                        }
                    }
                }
            }
        }
    }

    /// stale-while-revalidate: one background conditional request, under
    /// the object's revalidation flight.
    fn spawn_revalidation(self: &Arc<Self>) {
        let Ok(leader) = self.join(&revalidation_flight(KEY)) else {
            return;
        };
        let sim = self.clone();
        let mut leader = Some(leader);
        tokio::spawn(async move {
            let Some(stored) = sim.lookup() else { return };
            let request_time = sim.now();
            let conditional =
                policy::revalidation_request_headers(&HeaderMap::new(), &stored.headers);
            match sim.upstream(&conditional).await {
                Ok((status, h)) if status == StatusCode::NOT_MODIFIED => {
                    let mut fresh = stored.clone();
                    policy::freshen_stored_response(&mut fresh, &h, request_time, sim.now());
                    sim.store(fresh.status, &fresh.headers, request_time);
                }
                Ok((status, h)) if status == StatusCode::OK => {
                    sim.store(status, &h, request_time);
                }
                Ok((status, _)) => fail(&mut leader, UpstreamFailure::Status(status)),
                Err(failure) => fail(&mut leader, failure),
            }
            drop(leader);
        });
    }
}

fn not_modified() -> Answer {
    Ok((StatusCode::NOT_MODIFIED, headers(&[("etag", "\"v1\"")])))
}

#[tokio::test(start_paused = true)]
async fn a_miss_is_fetched_whole_stored_and_then_hit() {
    let sim = Sim::new(Duration::from_millis(50), |_| ok("max-age=60"));
    let first = sim.get(&[]).await;
    assert_eq!(first.result, "miss");
    assert!(!first.from_cache);
    assert!(first.cache_status.contains("fwd=uri-miss"), "{first:?}");
    assert!(first.cache_status.contains("stored"), "{first:?}");

    tokio::time::advance(Duration::from_secs(10)).await;
    let second = sim.get(&[]).await;
    assert_eq!(second.result, "hit");
    assert!(second.from_cache);
    assert!(second.cache_status.contains("ttl=50"), "{second:?}");
    assert_eq!(sim.origin_requests(), 1);

    // Past its lifetime, it is revalidated, not served.
    tokio::time::advance(Duration::from_secs(60)).await;
    sim.set_origin(|_| not_modified());
    let third = sim.get(&[]).await;
    assert_eq!(third.result, "revalidate");
    assert_eq!(sim.origin_requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn stale_while_revalidate_serves_at_once_and_refreshes_in_the_background() {
    let sim = Sim::new(Duration::from_millis(200), |_| {
        ok("max-age=1, stale-while-revalidate=30")
    });
    sim.get(&[]).await;
    tokio::time::advance(Duration::from_secs(5)).await;
    sim.set_origin(|_| {
        Ok((
            StatusCode::NOT_MODIFIED,
            headers(&[("cache-control", "max-age=100"), ("etag", "\"v1\"")]),
        ))
    });
    // Three clients in the window: all served stale, at once; one
    // background revalidation.
    for _ in 0..3 {
        let got = sim.get(&[]).await;
        assert!(got.from_cache);
        assert_eq!(got.result, "stale-while-revalidate");
        assert!(
            got.cache_status.contains("detail=stale-while-revalidate"),
            "{got:?}"
        );
    }
    // Let the background task start (it is spawned, not awaited).
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    assert_eq!(sim.origin_requests(), 2, "one background revalidation");
    assert!(
        sim.seen.lock()[1].contains_key(header::IF_NONE_MATCH),
        "the background request is conditional"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = sim.get(&[]).await;
    assert_eq!(
        got.result, "hit",
        "freshened by the background 304: {got:?}"
    );
    assert_eq!(sim.origin_requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn stale_if_error_covers_error_statuses_and_failures_within_its_window() {
    let sim = Sim::new(Duration::ZERO, |_| ok("max-age=1, stale-if-error=60"));
    sim.get(&[]).await;
    tokio::time::advance(Duration::from_secs(10)).await;

    sim.set_origin(|_| Ok((StatusCode::SERVICE_UNAVAILABLE, HeaderMap::new())));
    let got = sim.get(&[]).await;
    assert!(got.from_cache, "{got:?}");
    assert!(
        got.cache_status.contains("detail=stale-if-error"),
        "{got:?}"
    );
    assert!(got.cache_status.contains("fwd-status=503"), "{got:?}");

    sim.set_origin(|_| Err(UpstreamFailure::Connect));
    let got = sim.get(&[]).await;
    assert!(got.from_cache, "a connect failure is covered too: {got:?}");

    // Past the window, the error reaches the client.
    tokio::time::advance(Duration::from_secs(120)).await;
    sim.set_origin(|_| Ok((StatusCode::SERVICE_UNAVAILABLE, HeaderMap::new())));
    let got = sim.get(&[]).await;
    assert!(!got.from_cache, "{got:?}");
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(start_paused = true)]
async fn concurrent_misses_coalesce_into_one_fetch() {
    let sim = Sim::new(Duration::from_millis(500), |_| ok("max-age=60"));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let sim = sim.clone();
            tokio::spawn(async move { sim.get(&[]).await })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("task"));
    }
    assert_eq!(sim.origin_requests(), 1);
    assert_eq!(results.iter().filter(|g| g.result == "miss").count(), 1);
    assert_eq!(
        results
            .iter()
            .filter(|g| g.result == "hit-collapsed")
            .count(),
        19
    );
    assert!(
        results
            .iter()
            .filter(|g| g.from_cache)
            .all(|g| g.cache_status.contains("collapsed"))
    );
}

#[tokio::test(start_paused = true)]
async fn a_follower_stops_waiting_at_the_lock_timeout_and_passes() {
    let sim = Sim::new(Duration::from_secs(30), |_| ok("max-age=60"));
    let leader = {
        let sim = sim.clone();
        tokio::spawn(async move { sim.get(&[]).await })
    };
    tokio::task::yield_now().await;
    let started = tokio::time::Instant::now();
    let follower = sim.get(&[]).await;
    assert_eq!(follower.result, "pass");
    assert!(
        follower.cache_status.contains("detail=lock-timeout"),
        "{follower:?}"
    );
    // It waited the lock timeout (2 s), then the origin's 30 s itself.
    assert_eq!(started.elapsed(), Duration::from_secs(32));
    assert_eq!(leader.await.expect("leader").result, "miss");
}

#[tokio::test(start_paused = true)]
async fn the_followers_of_a_failed_fill_pass_and_say_why() {
    let sim = Sim::new(Duration::from_millis(500), |_| {
        Err(UpstreamFailure::Connect)
    });
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let sim = sim.clone();
            tokio::spawn(async move { sim.get(&[]).await })
        })
        .collect();
    let mut passed = 0;
    for t in tasks {
        let got = t.await.expect("task");
        if got.result == "pass" {
            passed += 1;
            assert!(
                got.cache_status.contains("collapsed; detail=flight-failed"),
                "{got:?}"
            );
        }
    }
    assert_eq!(passed, 4, "each follower tries the origin once itself");
}

#[tokio::test(start_paused = true)]
async fn an_uncacheable_response_marks_hit_for_pass_but_a_requests_no_store_does_not() {
    let sim = Sim::new(Duration::from_millis(10), |_| ok("private"));
    let first = sim.get(&[]).await;
    assert!(first.cache_status.contains("detail=private"), "{first:?}");
    let second = sim.get(&[]).await;
    assert_eq!(second.result, "pass");
    assert!(
        second.cache_status.contains("detail=hit-for-pass"),
        "{second:?}"
    );
    assert!(sim.flights.lock().is_empty(), "a pass leads no flight");

    // hit-for-pass ends: the key is tried again.
    tokio::time::advance(sim.sp.hit_for_pass + Duration::from_secs(1)).await;
    sim.set_origin(|_| ok("max-age=60"));
    assert_eq!(sim.get(&[]).await.result, "miss");
    assert!(sim.lookup().is_some());

    // A request's own no-store fetches for itself and marks nothing.
    let sim = Sim::new(Duration::ZERO, |_| ok("max-age=60"));
    let got = sim.get(&[("cache-control", "no-store")]).await;
    assert!(
        got.cache_status.contains("detail=request-no-store"),
        "{got:?}"
    );
    assert!(!sim.is_pass());
    assert_eq!(sim.get(&[]).await.result, "miss");
}

#[tokio::test(start_paused = true)]
async fn revalidation_is_conditional_and_a_304_freshens() {
    let sim = Sim::new(Duration::from_millis(20), |_| ok("max-age=10"));
    sim.get(&[]).await;
    tokio::time::advance(Duration::from_secs(30)).await;
    sim.set_origin(|req| {
        assert_eq!(
            req.get(header::IF_NONE_MATCH).map(HeaderValue::as_bytes),
            Some(&b"\"v1\""[..]),
            "the stored ETag is sent"
        );
        not_modified()
    });
    let got = sim.get(&[]).await;
    assert!(got.from_cache);
    assert!(got.cache_status.contains("fwd=stale"), "{got:?}");
    assert!(got.cache_status.contains("fwd-status=304"), "{got:?}");
    let got = sim.get(&[]).await;
    assert_eq!(got.result, "hit", "fresh again after the 304");
    assert_eq!(sim.origin_requests(), 2);

    // A new representation replaces the stored one.
    tokio::time::advance(Duration::from_secs(30)).await;
    sim.set_origin(|_| ok("max-age=5"));
    let got = sim.get(&[]).await;
    assert!(got.cache_status.contains("stored"), "{got:?}");
}

#[tokio::test(start_paused = true)]
async fn concurrent_revalidations_coalesce_into_one_conditional_request() {
    let sim = Sim::new(Duration::from_millis(300), |_| ok("max-age=10"));
    sim.get(&[]).await;
    tokio::time::advance(Duration::from_secs(30)).await;
    sim.set_origin(|_| {
        Ok((
            StatusCode::NOT_MODIFIED,
            headers(&[("etag", "\"v1\""), ("cache-control", "max-age=10")]),
        ))
    });
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let sim = sim.clone();
            tokio::spawn(async move { sim.get(&[]).await })
        })
        .collect();
    let mut collapsed = 0;
    for t in tasks {
        let got = t.await.expect("task");
        assert!(got.from_cache, "{got:?}");
        collapsed += usize::from(got.result == "revalidated-collapsed");
    }
    assert_eq!(
        sim.origin_requests(),
        2,
        "one fill, one conditional request"
    );
    assert_eq!(collapsed, 9);
}

/// Ten clients of one stale object at once: one leads the revalidation,
/// nine wait for it.
async fn ten_at_once(sim: &Arc<Sim>) -> Vec<Got> {
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let sim = sim.clone();
            tokio::spawn(async move { sim.get(&[]).await })
        })
        .collect();
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.expect("task"));
    }
    got
}

#[tokio::test(start_paused = true)]
async fn waiters_on_a_failed_revalidation_share_its_stale_if_error_answer() {
    let sim = Sim::new(Duration::from_secs(1), |_| {
        ok("max-age=1, stale-if-error=600")
    });
    sim.get(&[]).await;
    tokio::time::advance(Duration::from_secs(30)).await;
    sim.set_origin(|_| Ok((StatusCode::SERVICE_UNAVAILABLE, HeaderMap::new())));
    let started = tokio::time::Instant::now();
    let got = ten_at_once(&sim).await;
    assert!(got.iter().all(|g| g.from_cache), "{got:?}");
    let shared: Vec<_> = got
        .iter()
        .filter(|g| g.result == "stale-if-error")
        .collect();
    assert_eq!(shared.len(), 9, "{got:?}");
    assert!(
        shared
            .iter()
            .all(|g| g.cache_status.contains("collapsed; detail=stale-if-error")),
        "{shared:?}"
    );
    assert_eq!(
        sim.origin_requests(),
        2,
        "one fill and one conditional request: the waiters do not ask a failing origin again"
    );
    assert_eq!(started.elapsed(), Duration::from_secs(1));

    // So for a failure without an answer, and for a failed background
    // (stale-while-revalidate) revalidation's waiters.
    tokio::time::advance(Duration::from_secs(30)).await;
    sim.set_origin(|_| Err(UpstreamFailure::Timeout));
    let got = ten_at_once(&sim).await;
    assert!(got.iter().all(|g| g.from_cache), "{got:?}");
    assert_eq!(sim.origin_requests(), 3);
}

/// An object stored with `cc`, stale, whose revalidation the origin now
/// takes 30 s to answer (the lock timeout is 2 s): one client leads the
/// revalidation, a second waits for it. The second's answer and the time
/// it took.
async fn behind_a_slow_revalidation(
    cc: &'static str,
) -> (Arc<Sim>, tokio::task::JoinHandle<Got>, Got, Duration) {
    let sim = Sim::new(Duration::ZERO, move |_| ok(cc));
    sim.get(&[]).await;
    tokio::time::advance(Duration::from_secs(30)).await;
    sim.set_delay(Duration::from_secs(30));
    sim.set_origin(|_| not_modified());
    let leader = {
        let sim = sim.clone();
        tokio::spawn(async move { sim.get(&[]).await })
    };
    tokio::task::yield_now().await;
    let started = tokio::time::Instant::now();
    let waiter = sim.get(&[]).await;
    (sim, leader, waiter, started.elapsed())
}

#[tokio::test(start_paused = true)]
async fn a_waiter_serves_stale_if_error_at_the_lock_timeout_of_an_unanswered_revalidation() {
    let (slow, leader, waiter, took) =
        behind_a_slow_revalidation("max-age=1, stale-if-error=600").await;
    assert_eq!(waiter.result, "stale-if-error", "{waiter:?}");
    assert!(waiter.from_cache);
    assert_eq!(
        took,
        Duration::from_secs(2),
        "the lock timeout, not the origin's 30 s on top of it"
    );
    assert_eq!(slow.origin_requests(), 2, "the fill and the leader's");
    assert_eq!(leader.await.expect("leader").result, "revalidate");
}

#[tokio::test(start_paused = true)]
async fn without_stale_if_error_a_waiter_revalidates_itself() {
    // A slow origin is not an unreachable one: `stale_if_unreachable`
    // (a day by default) does not cover a lock timeout.
    let (slow, leader, waiter, took) = behind_a_slow_revalidation("max-age=1").await;
    assert_eq!(waiter.result, "revalidate", "{waiter:?}");
    assert_eq!(took, Duration::from_secs(32));
    assert_eq!(slow.origin_requests(), 3);
    leader.await.expect("leader");

    // An error status the object may not be served stale for: each waiter
    // has its own try, and gets the origin's answer.
    let sim = Sim::new(Duration::from_secs(1), |_| ok("max-age=1"));
    sim.get(&[]).await;
    tokio::time::advance(Duration::from_secs(30)).await;
    sim.set_origin(|_| Ok((StatusCode::SERVICE_UNAVAILABLE, HeaderMap::new())));
    let got = ten_at_once(&sim).await;
    assert!(
        got.iter()
            .all(|g| g.status == StatusCode::SERVICE_UNAVAILABLE),
        "{got:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_range_miss_goes_to_the_origin_as_a_range() {
    let sim = Sim::new(Duration::ZERO, |_| {
        Ok((
            StatusCode::PARTIAL_CONTENT,
            headers(&[("content-range", "bytes 0-0/16777216"), ("etag", "\"v1\"")]),
        ))
    });
    let got = sim.get(&[("range", "bytes=0-0")]).await;
    assert_eq!(got.result, "miss-range");
    assert_eq!(got.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        sim.seen.lock()[0]
            .get(header::RANGE)
            .map(HeaderValue::as_bytes),
        Some(&b"bytes=0-0"[..]),
        "never the whole object for one byte"
    );
    assert!(
        sim.flights.lock().is_empty(),
        "a range miss leads no flight"
    );

    // A stored object answers ranges itself: no origin request.
    let sim = Sim::new(Duration::ZERO, |_| ok("max-age=60"));
    sim.get(&[]).await;
    let got = sim.get(&[("range", "bytes=0-0")]).await;
    assert_eq!(got.result, "hit");
    assert_eq!(sim.origin_requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn head_misses_pass_and_only_if_cached_misses_get_504() {
    let sim = Sim::new(Duration::ZERO, |_| ok("max-age=60"));
    let got = sim.request(Method::HEAD, HeaderMap::new()).await;
    assert_eq!(got.result, "miss-head");
    assert!(sim.lookup().is_none(), "a HEAD stores nothing");
    let got = sim.get(&[("cache-control", "only-if-cached")]).await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(sim.origin_requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stale_object_the_client_accepts_with_max_stale_is_served_unrevalidated() {
    let sim = Sim::new(Duration::ZERO, |_| ok("max-age=1"));
    sim.get(&[]).await;
    tokio::time::advance(Duration::from_secs(20)).await;
    let got = sim.get(&[("cache-control", "max-stale=60")]).await;
    assert!(got.from_cache, "{got:?}");
    assert_eq!(got.result, "stale");
    assert!(got.cache_status.contains("detail=max-stale"), "{got:?}");
    assert_eq!(
        sim.origin_requests(),
        1,
        "no revalidation (RFC 9111 §4.2.4)"
    );
}

#[test]
fn the_entry_follows_the_method_and_slice_mode() {
    let mut site = SiteCache::default();
    let sp = SitePolicy::new(&site, &CacheConfig::default());
    assert_eq!(Entry::of(&Method::GET, &sp), Entry::Lookup);
    assert_eq!(Entry::of(&Method::HEAD, &sp), Entry::Lookup);
    assert_eq!(Entry::of(&Method::POST, &sp), Entry::Unsafe);
    let purge = Method::from_bytes(b"PURGE").expect("method");
    assert_eq!(Entry::of(&purge, &sp), Entry::Purge);
    site.slice_size = crate::config::ByteSize(1 << 20);
    let sp = SitePolicy::new(&site, &CacheConfig::default());
    assert_eq!(Entry::of(&Method::GET, &sp), Entry::Slice);
    assert_eq!(Entry::of(&Method::HEAD, &sp), Entry::Lookup);
}
