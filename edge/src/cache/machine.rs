//! The cache's decisions for one request, as a state machine.
//!
//! This is the shape of pingora-cache's `HttpCache` phases, with
//! quinn-proto's rule: **no I/O and no clock**. The driver
//! (`proxy::cache`) owns every effect: it looks keys up, joins and waits
//! for flights, fetches from the origin and stores. After each effect it
//! tells the machine what happened, with `now`, and the machine answers
//! with the next [`Step`]. The cache never calls the proxy.
//!
//! ```text
//!            lookup ──hit, fresh────────────────────────► Serve
//!              │  └──hit, stale-while-revalidate────────► Serve + background revalidation
//!              │  └──hit, stale accepted (max-stale)────► Serve
//!              │  └──hit, must revalidate──► Join(revalidate) ─leader──► Fetch(Revalidate)
//!              │                                          └follower─► Wait ─fresh─► Serve
//!              │                          leader failed or lock timeout, stale-if-error─► Serve
//!              │                                                          └else──► Fetch(Revalidate)
//!              └─miss─┬─only-if-cached──────────────────► NotCached
//!                     ├─Range──► TryPart ─none─► Fetch(Range)
//!                     ├─HEAD / no-store / hit-for-pass──► Fetch(Pass)
//!                     └─► Join(key) ─leader──► Fetch(Fill)
//!                                   └follower─► Wait ─fresh─► Serve (collapsed)
//!                                                  └else──► Fetch(Pass)
//! ```
//!
//! What the origin answers is judged by [`store_decision`],
//! [`CacheMachine::on_revalidation_response`] and
//! [`CacheMachine::on_revalidation_error`], all pure too.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap};
use http::{Method, StatusCode};

use super::policy::{self, CacheStatus, FwdReason, Lookup, StoredResponse};
use super::site::{CACHE_NAME, SitePolicy};
use crate::config::SetCookie;

/// How a request enters the cache, decided from its method and the site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// The PURGE method.
    Purge,
    /// An unsafe method: forwarded, then it invalidates (RFC 9111 §4.4).
    Unsafe,
    /// A GET on a site in slice mode: the slices may answer.
    Slice,
    /// GET or HEAD: look the key up.
    Lookup,
}

impl Entry {
    pub fn of(method: &Method, sp: &SitePolicy) -> Entry {
        if method.as_str() == "PURGE" {
            Entry::Purge
        } else if method != Method::GET && method != Method::HEAD {
            Entry::Unsafe
        } else if sp.slice_size > 0 && method == Method::GET {
            Entry::Slice
        } else {
            Entry::Lookup
        }
    }
}

/// What the driver found in storage for the request.
#[derive(Debug)]
pub enum Found<'a> {
    /// A stored response (`obj_key` is the URL's key or its Vary variant's).
    Hit {
        obj_key: &'a str,
        stored: &'a StoredResponse,
    },
    /// Nothing usable; `variant` is the Vary variant's key when the URL has
    /// a Vary index but no matching variant.
    Miss { variant: Option<String> },
}

/// The next thing the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Answer from the stored object, with this `Cache-Status`, counting
    /// `result`. With `revalidate`, also start one background revalidation
    /// (a subrequest of the session).
    Serve {
        status: CacheStatus,
        result: &'static str,
        revalidate: bool,
    },
    /// Join the flight named `flight`, then report the role with
    /// [`CacheMachine::on_join`].
    Join { flight: String },
    /// Wait for the flight for at most `timeout`, look the request up
    /// again, then report with [`CacheMachine::on_wait`].
    Wait { timeout: Duration },
    /// A stored part (RFC 9111 §3.4) may hold the range; if it does not,
    /// report with [`CacheMachine::on_no_part`].
    TryPart,
    /// Ask the origin.
    Fetch(Fetch),
    /// `only-if-cached`, and nothing usable is stored: 504.
    NotCached,
}

/// An origin request the machine asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    pub kind: FetchKind,
    /// The `Cache-Status` of the answer (before the origin's status).
    pub status: CacheStatus,
    /// The `meridian_cache_requests_total` result to count.
    pub result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchKind {
    /// The whole representation (no conditionals, no `Range`), stored if
    /// [`store_decision`] allows; the fetch leads the key's flight.
    Fill { variant: Option<String> },
    /// The client's request with its `Range`.
    Range { variant: Option<String> },
    /// The client's own request, never stored.
    Pass,
    /// A conditional request for the stored object `obj_key`; `leader`
    /// when it leads the object's revalidation flight.
    Revalidate { obj_key: String, leader: bool },
}

/// A flight's state, which its leader publishes to the requests that wait
/// for it (the value of the flight's watch channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlightState {
    /// The leader is still fetching.
    Running,
    /// The leader is done: storage holds whatever it stored.
    Done,
    /// The leader's origin request failed, without an answer or with an
    /// error status. Its waiters share the failure rather than repeat it.
    Failed(policy::UpstreamFailure),
}

/// How a request's wait for a flight ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// The flight is done; storage was looked up again.
    Done,
    /// The flight's origin request failed so.
    Failed(policy::UpstreamFailure),
    /// The flight was still running after `lock_timeout`.
    TimedOut,
}

impl Waited {
    /// The outcome of a wait on a flight's channel: `None` when it timed
    /// out, else the state the leader left (a leader that went away
    /// without a word is done).
    pub fn of(state: Option<FlightState>) -> Waited {
        match state {
            None => Waited::TimedOut,
            Some(FlightState::Failed(f)) => Waited::Failed(f),
            Some(FlightState::Running | FlightState::Done) => Waited::Done,
        }
    }
}

/// What to do with the origin's answer to a revalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revalidated {
    /// 304: freshen the stored object and serve it.
    Freshen,
    /// An error the stored object may cover (stale-if-error): serve it.
    ServeStale,
    /// A new representation: store it in place of the old one.
    Replace,
}

/// Whether and why not a response is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDecision {
    Store,
    /// Not stored, for `reason` (the `Cache-Status` detail). With
    /// `hit_for_pass` the response's own reasons apply to every client, so
    /// the key is remembered as uncacheable for `cache.hit_for_pass`.
    DontStore {
        reason: &'static str,
        hit_for_pass: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Start,
    JoiningMiss {
        fwd: FwdReason,
        variant: Option<String>,
    },
    WaitingMiss {
        fwd: FwdReason,
    },
    JoiningRevalidation {
        obj_key: String,
    },
    WaitingRevalidation {
        obj_key: String,
    },
    RangeMiss {
        fwd: FwdReason,
        variant: Option<String>,
    },
    Done,
}

/// One request's cache decisions. See the module docs for the chart.
#[derive(Debug)]
pub struct CacheMachine {
    sp: Arc<SitePolicy>,
    method: Method,
    req: HeaderMap,
    key: String,
    state: State,
}

impl CacheMachine {
    /// A machine for a GET or HEAD whose URL key is `key`.
    pub fn new(sp: Arc<SitePolicy>, method: Method, req: HeaderMap, key: String) -> Self {
        CacheMachine {
            sp,
            method,
            req,
            key,
            state: State::Start,
        }
    }

    pub fn method(&self) -> &Method {
        &self.method
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// The client's request headers, as the machine judges them.
    pub fn request_headers(&self) -> &HeaderMap {
        &self.req
    }

    pub fn policy(&self) -> &Arc<SitePolicy> {
        &self.sp
    }

    /// The first decision, from what storage holds. `pass_marked` is
    /// whether the key is remembered as uncacheable (hit-for-pass).
    pub fn on_lookup(&mut self, found: Found<'_>, now: SystemTime, pass_marked: bool) -> Step {
        match found {
            Found::Hit { obj_key, stored } => self.on_hit(obj_key, stored, now),
            Found::Miss { variant } => self.on_miss(variant, pass_marked),
        }
    }

    fn on_hit(&mut self, obj_key: &str, stored: &StoredResponse, now: SystemTime) -> Step {
        match policy::lookup(stored, &self.req, now, &self.sp.policy) {
            Lookup::Fresh { ttl_left, .. } => {
                self.state = State::Done;
                Step::Serve {
                    status: CacheStatus::hit(CACHE_NAME).ttl(secs(ttl_left)),
                    result: "hit",
                    revalidate: false,
                }
            }
            Lookup::StaleWhileRevalidate { staleness, .. } => {
                self.state = State::Done;
                Step::Serve {
                    status: CacheStatus::hit(CACHE_NAME)
                        .ttl(-secs(staleness))
                        .detail("stale-while-revalidate"),
                    result: "stale-while-revalidate",
                    revalidate: true,
                }
            }
            // The client's max-stale accepts it: served as it is, without
            // revalidation (RFC 9111 §4.2.4).
            Lookup::Stale { staleness, .. } => {
                self.state = State::Done;
                Step::Serve {
                    status: CacheStatus::hit(CACHE_NAME)
                        .ttl(-secs(staleness))
                        .detail("max-stale"),
                    result: "stale",
                    revalidate: false,
                }
            }
            Lookup::MustRevalidate { .. } => {
                // Revalidations coalesce like misses: one conditional
                // request per stale object, whatever the number of clients.
                self.state = State::JoiningRevalidation {
                    obj_key: obj_key.to_string(),
                };
                Step::Join {
                    flight: revalidation_flight(obj_key),
                }
            }
            Lookup::GatewayTimeout => {
                self.state = State::Done;
                Step::NotCached
            }
        }
    }

    fn on_miss(&mut self, variant: Option<String>, pass_marked: bool) -> Step {
        if policy::on_miss(&self.req) == policy::MissAction::GatewayTimeout {
            self.state = State::Done;
            return Step::NotCached;
        }
        let fwd = if variant.is_some() {
            FwdReason::VaryMiss
        } else {
            FwdReason::UriMiss
        };
        // A range on a miss goes to the origin as a range, so the origin
        // never sends more than was asked.
        if self.method == Method::GET && self.req.contains_key(header::RANGE) && !pass_marked {
            let try_part = variant.is_none();
            self.state = State::RangeMiss { fwd, variant };
            return if try_part {
                Step::TryPart
            } else {
                self.on_no_part()
            };
        }
        // A request that may not store (its own `no-store`) fetches for
        // itself alone: it neither leads a fill others would wait on nor
        // marks the URL.
        let request_no_store = policy::RequestDirectives::from_headers(&self.req).no_store;
        if self.method == Method::HEAD || request_no_store || pass_marked {
            let (result, detail) = if self.method == Method::HEAD {
                ("miss-head", "head")
            } else if request_no_store {
                ("pass", "request-no-store")
            } else {
                ("pass", "hit-for-pass")
            };
            self.state = State::Done;
            return Step::Fetch(Fetch {
                kind: FetchKind::Pass,
                status: CacheStatus::forward(CACHE_NAME, fwd).detail(detail),
                result,
            });
        }
        self.state = State::JoiningMiss { fwd, variant };
        Step::Join {
            flight: self.key.clone(),
        }
    }

    /// No stored part holds the range: it goes to the origin.
    pub fn on_no_part(&mut self) -> Step {
        let State::RangeMiss { fwd, variant } = std::mem::replace(&mut self.state, State::Done)
        else {
            return self.misused();
        };
        Step::Fetch(Fetch {
            kind: FetchKind::Range { variant },
            status: CacheStatus::forward(CACHE_NAME, fwd),
            result: "miss-range",
        })
    }

    /// The role the driver got in the flight it joined.
    pub fn on_join(&mut self, leader: bool) -> Step {
        match std::mem::replace(&mut self.state, State::Done) {
            State::JoiningMiss { fwd, variant } if leader => Step::Fetch(Fetch {
                kind: FetchKind::Fill { variant },
                status: CacheStatus::forward(CACHE_NAME, fwd),
                result: "miss",
            }),
            State::JoiningMiss { fwd, .. } => {
                self.state = State::WaitingMiss { fwd };
                Step::Wait {
                    timeout: self.sp.lock_timeout,
                }
            }
            State::JoiningRevalidation { obj_key } if leader => Step::Fetch(Fetch {
                kind: FetchKind::Revalidate {
                    obj_key,
                    leader: true,
                },
                status: CacheStatus::forward(CACHE_NAME, FwdReason::Stale),
                result: "revalidate",
            }),
            State::JoiningRevalidation { obj_key } => {
                self.state = State::WaitingRevalidation { obj_key };
                Step::Wait {
                    timeout: self.sp.lock_timeout,
                }
            }
            other => {
                self.state = other;
                self.misused()
            }
        }
    }

    /// The wait ended as `waited`, and storage now holds `found`. A fresh
    /// object serves every waiter. A stale one, when the leader's
    /// revalidation failed or did not end within `lock_timeout`, is served
    /// if stale-if-error allows it, as the leader's own failure would have
    /// been: a waiter never asks a failing origin again, and never takes
    /// longer than the lock timeout when the object may be served stale.
    pub fn on_wait(
        &mut self,
        found: Option<(&str, &StoredResponse)>,
        waited: Waited,
        now: SystemTime,
    ) -> Step {
        let fresh = match (waited, found) {
            (Waited::TimedOut, _) | (_, None) => None,
            (_, Some((_, stored))) => {
                match policy::lookup(stored, &self.req, now, &self.sp.policy) {
                    Lookup::Fresh { ttl_left, .. } => Some(ttl_left),
                    _ => None,
                }
            }
        };
        match std::mem::replace(&mut self.state, State::Done) {
            State::WaitingMiss { fwd } => match fresh {
                Some(ttl) => Step::Serve {
                    status: CacheStatus::hit(CACHE_NAME).ttl(secs(ttl)).collapsed(),
                    result: "hit-collapsed",
                    revalidate: false,
                },
                // Uncacheable, failed, or the lock timed out: to the origin,
                // unstored.
                None => Step::Fetch(Fetch {
                    kind: FetchKind::Pass,
                    status: CacheStatus::forward(CACHE_NAME, fwd).collapsed().detail(
                        match waited {
                            Waited::TimedOut => "lock-timeout",
                            Waited::Failed(_) => "flight-failed",
                            Waited::Done => "uncacheable",
                        },
                    ),
                    result: "pass",
                }),
            },
            State::WaitingRevalidation { obj_key } => {
                if let Some(ttl) = fresh {
                    return Step::Serve {
                        status: CacheStatus::hit(CACHE_NAME).ttl(secs(ttl)).collapsed(),
                        result: "revalidated-collapsed",
                        revalidate: false,
                    };
                }
                let failure = match waited {
                    Waited::Failed(f) => Some(f),
                    Waited::TimedOut => Some(policy::UpstreamFailure::Unanswered),
                    Waited::Done => None,
                };
                if let (Some(failure), Some((_, stored))) = (failure, found)
                    && self.on_revalidation_error(stored, failure, now)
                {
                    return Step::Serve {
                        status: CacheStatus::hit(CACHE_NAME)
                            .detail("stale-if-error")
                            .collapsed(),
                        result: "stale-if-error",
                        revalidate: false,
                    };
                }
                // Still stale, and it may not be served so: ask the origin
                // ourselves.
                Step::Fetch(Fetch {
                    kind: FetchKind::Revalidate {
                        obj_key,
                        leader: false,
                    },
                    status: CacheStatus::forward(CACHE_NAME, FwdReason::Stale),
                    result: "revalidate",
                })
            }
            other => {
                self.state = other;
                self.misused()
            }
        }
    }

    /// The origin answered a revalidation of `stored` with `status`.
    pub fn on_revalidation_response(
        &self,
        stored: &StoredResponse,
        status: StatusCode,
        now: SystemTime,
    ) -> Revalidated {
        if status == StatusCode::NOT_MODIFIED {
            return Revalidated::Freshen;
        }
        let failure = policy::UpstreamFailure::Status(status);
        if failure.is_error()
            && policy::may_serve_stale_on_error(stored, &self.req, failure, now, &self.sp.policy)
        {
            return Revalidated::ServeStale;
        }
        Revalidated::Replace
    }

    /// A revalidation of `stored` failed without an answer: whether the
    /// stored object may be served instead (stale-if-error, or the origin
    /// is unreachable within `stale_if_unreachable`).
    pub fn on_revalidation_error(
        &self,
        stored: &StoredResponse,
        failure: policy::UpstreamFailure,
        now: SystemTime,
    ) -> bool {
        policy::may_serve_stale_on_error(stored, &self.req, failure, now, &self.sp.policy)
    }

    /// A step asked in the wrong state: a driver bug. The request is
    /// passed to the origin, which is always correct, if not cached.
    fn misused(&mut self) -> Step {
        debug_assert!(false, "cache machine misused in {:?}", self.state);
        self.state = State::Done;
        Step::Fetch(Fetch {
            kind: FetchKind::Pass,
            status: CacheStatus::forward(CACHE_NAME, FwdReason::Miss),
            result: "pass",
        })
    }
}

/// Whether a storable response is worth storing: it can be fresh, served
/// stale, or revalidated.
pub fn worth_storing(status: StatusCode, h: &HeaderMap, now: SystemTime, sp: &SitePolicy) -> bool {
    let f = policy::freshness_lifetime(status, h, now, &sp.policy);
    let d = policy::effective_response_directives(h).directives;
    !f.lifetime.is_zero()
        || h.contains_key(header::ETAG)
        || h.contains_key(header::LAST_MODIFIED)
        || d.stale_while_revalidate.is_some()
        || d.stale_if_error.is_some()
        || sp.policy.default_stale_if_error.is_some()
}

/// Whether the origin's answer to `method` with `req` headers is stored,
/// and if not, why. `max_object` is storage's largest object.
pub fn store_decision(
    method: &Method,
    req: &HeaderMap,
    status: StatusCode,
    resp: &HeaderMap,
    response_time: SystemTime,
    max_object: u64,
    sp: &SitePolicy,
) -> StoreDecision {
    let declared = resp
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let dont = |reason, hit_for_pass| StoreDecision::DontStore {
        reason,
        hit_for_pass,
    };
    // The response's reasons come last: only they apply to other clients.
    match policy::storability(method, req, status, resp) {
        policy::Storability::NotStorable(r) => dont(r.as_str(), !r.from_request()),
        _ if resp.contains_key(header::SET_COOKIE) && sp.set_cookie == SetCookie::Pass => {
            dont("set-cookie", true)
        }
        _ if !worth_storing(status, resp, response_time, sp) => dont("not-worth-storing", true),
        _ if declared.is_some_and(|l| l > max_object) => dont("too-large", true),
        _ if matches!(policy::vary_spec(resp), policy::VarySpec::Star) => dont("vary-star", true),
        _ => StoreDecision::Store,
    }
}

/// The flight key under which one stale object's revalidations coalesce,
/// shared by the clients' and the background (stale-while-revalidate) ones.
pub fn revalidation_flight(obj_key: &str) -> String {
    format!("revalidate\u{0}{obj_key}")
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
