//! The steering policy: a pure function from (client location, region
//! health snapshot, policy) to a decision and its explanation.
//!
//! No sockets, no clocks, no randomness beyond the caller's `seed`: the same
//! inputs always give the same decision.

use std::fmt::{self, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::config::FailMode;
use crate::geo::{Code, GeoInfo};

/// A region as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    /// Name, e.g. `eu-west`.
    pub name: Arc<str>,
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
    /// Capacity weight.
    pub weight: u32,
    /// IPv4 answers with weights.
    pub a: Vec<(Ipv4Addr, u32)>,
    /// IPv6 answers with weights.
    pub aaaa: Vec<(Ipv6Addr, u32)>,
}

/// What an override matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// Autonomous system number.
    Asn(u32),
    /// ISO country.
    Country(Code),
    /// Continent code.
    Continent(Code),
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Asn(a) => write!(f, "AS{a}"),
            Self::Country(c) => write!(f, "country {c}"),
            Self::Continent(c) => write!(f, "continent {c}"),
        }
    }
}

/// The policy of one steered name. Region references are indices into the
/// region slice passed to [`decide`].
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Candidate regions.
    pub regions: Vec<usize>,
    /// Region for clients of unknown location.
    pub default_region: Option<usize>,
    /// Overrides (any order; checked ASN, then country, then continent).
    pub overrides: Vec<(Match, usize)>,
    /// Most addresses per answer family.
    pub max_answers: usize,
    /// Behaviour when nothing is available.
    pub fail_mode: FailMode,
}

/// Health of one region at decision time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionState {
    /// The health check passes (or there is none).
    pub healthy: bool,
    /// An operator drained the region.
    pub drained: bool,
}

impl RegionState {
    /// Healthy and not drained.
    pub fn available(self) -> bool {
        self.healthy && !self.drained
    }
}

/// Why a region was chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reason {
    /// An override matched.
    Override(Match),
    /// The nearest available region, at this distance (km).
    Nearest(f64),
    /// Client location unknown: the default region.
    Default,
    /// Client location unknown and no usable default: the available region
    /// with the highest weight.
    Weight,
    /// Nothing available, fail-open: every region's answers.
    FailOpen,
    /// Nothing available, fail-closed: no answer.
    FailClosed,
}

/// One line of the explanation per candidate region.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Region index.
    pub region: usize,
    /// Great-circle distance from the client, if its location is known.
    pub distance_km: Option<f64>,
    /// Health snapshot.
    pub state: RegionState,
}

/// The outcome of [`decide`].
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Why.
    pub reason: Reason,
    /// Chosen region (None for fail-open and fail-closed).
    pub region: Option<usize>,
    /// IPv4 answers, at most `max_answers` (fail-open: all).
    pub a: Vec<Ipv4Addr>,
    /// IPv6 answers, at most `max_answers` (fail-open: all).
    pub aaaa: Vec<Ipv6Addr>,
    /// Every candidate with its distance and state, in policy order.
    pub candidates: Vec<Candidate>,
    /// Overrides that matched but pointed at an unavailable region.
    pub skipped_overrides: Vec<Match>,
}

impl Decision {
    /// Human-readable explanation.
    pub fn explain(&self, regions: &[Region], client: &GeoInfo) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "client: country={} continent={} asn={} location={} (network /{})",
            client.country.map_or("-".into(), |c| c.to_string()),
            client.continent.map_or("-".into(), |c| c.to_string()),
            client.asn.map_or("-".into(), |a| format!("AS{a}")),
            client
                .location
                .map_or("unknown".into(), |(a, b)| format!("{a:.2},{b:.2}")),
            client.prefix_len,
        );
        for c in &self.candidates {
            let r = &regions[c.region];
            let _ = writeln!(
                s,
                "  region {:<16} distance={:>9} healthy={} drained={}{}",
                r.name,
                c.distance_km.map_or("-".into(), |d| format!("{d:.0}km")),
                c.state.healthy,
                c.state.drained,
                if Some(c.region) == self.region {
                    "  <= chosen"
                } else {
                    ""
                },
            );
        }
        for m in &self.skipped_overrides {
            let _ = writeln!(s, "override {m} matched but its region is unavailable");
        }
        let why = match self.reason {
            Reason::Override(m) => format!("override {m}"),
            Reason::Nearest(d) => format!("nearest available region ({d:.0} km)"),
            Reason::Default => "client location unknown: default region".into(),
            Reason::Weight => "client location unknown: highest-weight available region".into(),
            Reason::FailOpen => "no region available: fail-open, answering all".into(),
            Reason::FailClosed => "no region available: fail-closed (SERVFAIL)".into(),
        };
        let _ = writeln!(
            s,
            "decision: {} -> {}",
            why,
            self.region.map_or("-", |r| &*regions[r].name)
        );
        let a: Vec<String> = self.a.iter().map(ToString::to_string).collect();
        let aaaa: Vec<String> = self.aaaa.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            s,
            "answer A: {}",
            if a.is_empty() {
                "-".into()
            } else {
                a.join(" ")
            }
        );
        let _ = write!(
            s,
            "answer AAAA: {}",
            if aaaa.is_empty() {
                "-".into()
            } else {
                aaaa.join(" ")
            }
        );
        s
    }
}

/// Great-circle distance in km (haversine, mean Earth radius).
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    const R: f64 = 6371.0088;
    let (la1, lo1) = (a.0.to_radians(), a.1.to_radians());
    let (la2, lo2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * R * h.sqrt().min(1.0).asin()
}

/// splitmix64: a tiny deterministic generator seeded by the caller.
fn next(seed: &mut u64) -> u64 {
    *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Weighted sampling without replacement of up to `n` items; zero-weight
/// items are never chosen. Deterministic in `seed`.
pub fn weighted_pick<T: Copy>(items: &[(T, u32)], n: usize, seed: u64) -> Vec<T> {
    let mut seed = seed;
    let mut pool: Vec<(T, u32)> = items.iter().copied().filter(|(_, w)| *w > 0).collect();
    let mut out = Vec::with_capacity(n.min(pool.len()));
    while out.len() < n && !pool.is_empty() {
        let total: u64 = pool.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut r = next(&mut seed) % total;
        let mut idx = 0;
        for (i, (_, w)) in pool.iter().enumerate() {
            if r < u64::from(*w) {
                idx = i;
                break;
            }
            r -= u64::from(*w);
        }
        out.push(pool.remove(idx).0);
    }
    out
}

/// Decide which region answers for a client.
///
/// Order: overrides (ASN, then country, then continent) whose region is
/// available; the nearest available region when the client's location is
/// known; the default region if available; the highest-weight available
/// region; and when nothing is available, fail-open or fail-closed.
pub fn decide(
    policy: &Policy,
    regions: &[Region],
    states: &[RegionState],
    client: &GeoInfo,
    seed: u64,
) -> Decision {
    let state = |r: usize| {
        states.get(r).copied().unwrap_or(RegionState {
            healthy: false,
            drained: false,
        })
    };
    let candidates: Vec<Candidate> = policy
        .regions
        .iter()
        .filter(|&&r| r < regions.len())
        .map(|&r| Candidate {
            region: r,
            distance_km: client
                .location
                .map(|loc| distance_km(loc, (regions[r].lat, regions[r].lon))),
            state: state(r),
        })
        .collect();
    let available = |r: usize| r < regions.len() && state(r).available();

    let mut skipped = Vec::new();
    let mut chosen: Option<(usize, Reason)> = None;

    // 1. Overrides, most specific first.
    let checks: [Option<Match>; 3] = [
        client.asn.map(Match::Asn),
        client.country.map(Match::Country),
        client.continent.map(Match::Continent),
    ];
    'outer: for m in checks.into_iter().flatten() {
        for (om, r) in &policy.overrides {
            if *om == m {
                if available(*r) {
                    chosen = Some((*r, Reason::Override(m)));
                    break 'outer;
                }
                skipped.push(m);
            }
        }
    }

    // 2. Nearest available.
    if chosen.is_none() && client.location.is_some() {
        chosen = candidates
            .iter()
            .filter(|c| c.state.available())
            .filter_map(|c| c.distance_km.map(|d| (c.region, d)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(r, d)| (r, Reason::Nearest(d)));
    }

    // 3. Default region.
    if chosen.is_none()
        && let Some(d) = policy.default_region
        && available(d)
    {
        chosen = Some((d, Reason::Default));
    }

    // 4. Highest weight (first in policy order on ties).
    if chosen.is_none() {
        let mut best: Option<usize> = None;
        for c in candidates.iter().filter(|c| c.state.available()) {
            if best.is_none_or(|b| regions[c.region].weight > regions[b].weight) {
                best = Some(c.region);
            }
        }
        chosen = best.map(|r| (r, Reason::Weight));
    }

    match chosen {
        Some((r, reason)) => Decision {
            reason,
            region: Some(r),
            a: weighted_pick(&regions[r].a, policy.max_answers, seed),
            aaaa: weighted_pick(&regions[r].aaaa, policy.max_answers, seed),
            candidates,
            skipped_overrides: skipped,
        },
        None => match policy.fail_mode {
            FailMode::Open => {
                let mut a = Vec::new();
                let mut aaaa = Vec::new();
                for c in &candidates {
                    let r = &regions[c.region];
                    a.extend(r.a.iter().filter(|x| x.1 > 0).map(|x| x.0));
                    aaaa.extend(r.aaaa.iter().filter(|x| x.1 > 0).map(|x| x.0));
                }
                a.dedup();
                aaaa.dedup();
                Decision {
                    reason: Reason::FailOpen,
                    region: None,
                    a,
                    aaaa,
                    candidates,
                    skipped_overrides: skipped,
                }
            }
            FailMode::Closed => Decision {
                reason: Reason::FailClosed,
                region: None,
                a: Vec::new(),
                aaaa: Vec::new(),
                candidates,
                skipped_overrides: skipped,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn region(name: &str, lat: f64, lon: f64, last: u8) -> Region {
        Region {
            name: name.into(),
            lat,
            lon,
            weight: 100,
            a: vec![(Ipv4Addr::new(192, 0, 2, last), 1)],
            aaaa: vec![(
                Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, u16::from(last)),
                1,
            )],
        }
    }

    fn demo() -> (Vec<Region>, Policy) {
        let regions = vec![
            region("us-east", 39.04, -77.49, 1),
            region("eu-west", 53.35, -6.26, 2),
            region("ap-southeast", 1.29, 103.85, 3),
        ];
        let policy = Policy {
            regions: vec![0, 1, 2],
            default_region: Some(0),
            overrides: vec![],
            max_answers: 2,
            fail_mode: FailMode::Open,
        };
        (regions, policy)
    }

    const UP: RegionState = RegionState {
        healthy: true,
        drained: false,
    };
    const DOWN: RegionState = RegionState {
        healthy: false,
        drained: false,
    };
    const DRAINED: RegionState = RegionState {
        healthy: true,
        drained: true,
    };

    fn at(lat: f64, lon: f64) -> GeoInfo {
        GeoInfo {
            location: Some((lat, lon)),
            prefix_len: 24,
            ..GeoInfo::default()
        }
    }

    #[test]
    fn nearest_region_wins() {
        let (r, p) = demo();
        let d = decide(&p, &r, &[UP, UP, UP], &at(48.86, 2.35), 0);
        assert_eq!(d.region, Some(1));
        assert_eq!(d.a, vec![Ipv4Addr::new(192, 0, 2, 2)]);
        assert!(matches!(d.reason, Reason::Nearest(km) if (700.0..900.0).contains(&km)));
        let d = decide(&p, &r, &[UP, UP, UP], &at(-33.87, 151.21), 0);
        assert_eq!(d.region, Some(2));
        let d = decide(&p, &r, &[UP, UP, UP], &at(40.71, -74.01), 0);
        assert_eq!(d.region, Some(0));
    }

    #[test]
    fn unhealthy_or_drained_is_skipped() {
        let (r, p) = demo();
        let d = decide(&p, &r, &[UP, DRAINED, UP], &at(48.86, 2.35), 0);
        assert_eq!(d.region, Some(0));
        let d = decide(&p, &r, &[DOWN, DOWN, UP], &at(48.86, 2.35), 0);
        assert_eq!(d.region, Some(2));
    }

    #[test]
    fn unknown_location_uses_default_then_weight() {
        let (mut r, mut p) = demo();
        let d = decide(&p, &r, &[UP, UP, UP], &GeoInfo::default(), 0);
        assert_eq!((d.region, d.reason), (Some(0), Reason::Default));
        let d = decide(&p, &r, &[DOWN, UP, UP], &GeoInfo::default(), 0);
        assert_eq!(d.reason, Reason::Weight);
        assert_eq!(d.region, Some(1));
        r[2].weight = 500;
        p.default_region = None;
        let d = decide(&p, &r, &[UP, UP, UP], &GeoInfo::default(), 0);
        assert_eq!(d.region, Some(2));
    }

    #[test]
    fn overrides_by_asn_country_continent() {
        let (r, mut p) = demo();
        let oc = Code::parse("OC").expect("code");
        let fr = Code::parse("FR").expect("code");
        p.overrides = vec![
            (Match::Continent(oc), 2),
            (Match::Asn(64500), 1),
            (Match::Country(fr), 0),
        ];
        let mut client = at(40.0, -74.0);
        client.continent = Some(oc);
        assert_eq!(decide(&p, &r, &[UP, UP, UP], &client, 0).region, Some(2));
        client.country = Some(fr);
        assert_eq!(decide(&p, &r, &[UP, UP, UP], &client, 0).region, Some(0));
        client.asn = Some(64500);
        let d = decide(&p, &r, &[UP, UP, UP], &client, 0);
        assert_eq!(
            (d.region, d.reason),
            (Some(1), Reason::Override(Match::Asn(64500)))
        );
        // ASN override target drained: fall through to country.
        let d = decide(&p, &r, &[UP, DRAINED, UP], &client, 0);
        assert_eq!(d.region, Some(0));
        assert_eq!(d.skipped_overrides, vec![Match::Asn(64500)]);
    }

    #[test]
    fn all_down_fail_open_and_closed() {
        let (r, mut p) = demo();
        let d = decide(&p, &r, &[DOWN, DRAINED, DOWN], &at(48.86, 2.35), 0);
        assert_eq!(d.reason, Reason::FailOpen);
        assert_eq!(d.a.len(), 3);
        assert_eq!(d.aaaa.len(), 3);
        p.fail_mode = FailMode::Closed;
        let d = decide(&p, &r, &[DOWN, DOWN, DOWN], &at(48.86, 2.35), 0);
        assert_eq!(d.reason, Reason::FailClosed);
        assert!(d.a.is_empty() && d.region.is_none());
    }

    #[test]
    fn explanation_mentions_everything() {
        let (r, p) = demo();
        let c = at(48.86, 2.35);
        let d = decide(&p, &r, &[UP, UP, UP], &c, 0);
        let e = d.explain(&r, &c);
        assert!(e.contains("eu-west"), "{e}");
        assert!(e.contains("<= chosen"), "{e}");
        assert!(e.contains("192.0.2.2"), "{e}");
    }

    #[test]
    fn weighted_pick_respects_weights_and_n() {
        let items = [(1u8, 1u32), (2, 0), (3, 9)];
        let mut threes = 0;
        for seed in 0..1000 {
            let got = weighted_pick(&items, 1, seed);
            assert_eq!(got.len(), 1);
            assert_ne!(got[0], 2);
            if got[0] == 3 {
                threes += 1;
            }
        }
        assert!((800..980).contains(&threes), "{threes}");
        let all = weighted_pick(&items, 5, 7);
        assert_eq!(all.len(), 2);
    }

    #[test]
    fn distance_is_sane() {
        // Paris to Dublin is about 780 km.
        let d = distance_km((48.86, 2.35), (53.35, -6.26));
        assert!((750.0..820.0).contains(&d), "{d}");
        assert!(distance_km((0.0, 0.0), (0.0, 0.0)).abs() < 1e-9);
    }

    proptest! {
        #[test]
        fn decision_invariants(lat in -90.0f64..=90.0, lon in -180.0f64..=180.0,
                               h in proptest::collection::vec(any::<(bool, bool)>(), 3),
                               seed in any::<u64>()) {
            let (r, p) = demo();
            let states: Vec<RegionState> = h.iter().map(|&(healthy, drained)| RegionState { healthy, drained }).collect();
            let d = decide(&p, &r, &states, &at(lat, lon), seed);
            match d.region {
                Some(x) => {
                    prop_assert!(states[x].available());
                    // No available region is nearer.
                    let dx = distance_km((lat, lon), (r[x].lat, r[x].lon));
                    for (i, s) in states.iter().enumerate() {
                        if s.available() {
                            prop_assert!(distance_km((lat, lon), (r[i].lat, r[i].lon)) >= dx - 1e-9);
                        }
                    }
                    prop_assert!(d.a.len() <= p.max_answers);
                }
                None => prop_assert!(states.iter().all(|s| !s.available())),
            }
            // Pure: same inputs, same output.
            prop_assert_eq!(d, decide(&p, &r, &states, &at(lat, lon), seed));
        }
    }
}
