//! Response rate limiting (RRL) against reflection: a token bucket per
//! client prefix. [`Limiter::check`] takes `now` so it is deterministic.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use crate::config::RrlConfig;

/// What to do with a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it.
    Allow,
    /// Drop it.
    Drop,
    /// Send an empty truncated response (TC) so real clients retry on TCP.
    Slip,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    limited: u32,
}

/// The limiter.
#[derive(Debug)]
pub struct Limiter {
    cfg: RrlConfig,
    buckets: Mutex<HashMap<(IpAddr, u8), Bucket>>,
}

/// The client prefix a source address is accounted to.
pub fn prefix_of(ip: IpAddr, v4: u8, v6: u8) -> (IpAddr, u8) {
    match crate::geo::normalize(ip) {
        IpAddr::V4(a) => {
            let len = v4.min(32);
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            (IpAddr::V4((u32::from(a) & mask).into()), len)
        }
        IpAddr::V6(a) => {
            let len = v6.min(128);
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            (IpAddr::V6((u128::from(a) & mask).into()), len)
        }
    }
}

impl Limiter {
    /// A limiter for `cfg` (which should be enabled).
    pub fn new(cfg: RrlConfig) -> Self {
        Self {
            cfg,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &RrlConfig {
        &self.cfg
    }

    /// Account one response to `src` at `now`.
    pub fn check(&self, src: IpAddr, now: Instant) -> Verdict {
        let key = prefix_of(src, self.cfg.ipv4_prefix, self.cfg.ipv6_prefix);
        let rate = f64::from(self.cfg.responses_per_second.max(1));
        let burst = f64::from(
            self.cfg
                .burst
                .unwrap_or(self.cfg.responses_per_second)
                .max(1),
        );
        let Ok(mut map) = self.buckets.lock() else {
            return Verdict::Allow;
        };
        if map.len() >= self.cfg.max_tracked && !map.contains_key(&key) {
            // Forget buckets that have refilled; if still full, start over.
            map.retain(|_, b| {
                let refilled =
                    b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate;
                refilled < burst
            });
            if map.len() >= self.cfg.max_tracked {
                map.clear();
            }
        }
        let b = map.entry(key).or_insert(Bucket {
            tokens: burst,
            last: now,
            limited: 0,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Verdict::Allow;
        }
        b.limited = b.limited.wrapping_add(1);
        match self.cfg.slip {
            0 => Verdict::Drop,
            s if b.limited % s == 0 => Verdict::Slip,
            _ => Verdict::Drop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg(rps: u32, slip: u32) -> RrlConfig {
        RrlConfig {
            enabled: true,
            responses_per_second: rps,
            slip,
            ..RrlConfig::default()
        }
    }

    #[test]
    fn limits_then_refills() {
        let l = Limiter::new(cfg(5, 2));
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        for _ in 0..5 {
            assert_eq!(l.check(ip, t0), Verdict::Allow);
        }
        assert_eq!(l.check(ip, t0), Verdict::Drop);
        assert_eq!(l.check(ip, t0), Verdict::Slip);
        // Same /24 shares the bucket; another /24 does not.
        assert_ne!(
            l.check("192.0.2.200".parse().expect("ip"), t0),
            Verdict::Allow
        );
        assert_eq!(
            l.check("192.0.3.1".parse().expect("ip"), t0),
            Verdict::Allow
        );
        // One second later the bucket is full again.
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..5 {
            assert_eq!(l.check(ip, t1), Verdict::Allow);
        }
    }

    #[test]
    fn slip_zero_always_drops_and_one_always_slips() {
        let t = Instant::now();
        let ip: IpAddr = "2001:db8::1".parse().expect("ip");
        let l = Limiter::new(cfg(1, 0));
        l.check(ip, t);
        assert!((0..5).all(|_| l.check(ip, t) == Verdict::Drop));
        let l = Limiter::new(cfg(1, 1));
        l.check(ip, t);
        assert!((0..5).all(|_| l.check(ip, t) == Verdict::Slip));
    }

    #[test]
    fn tracked_prefixes_are_bounded() {
        let l = Limiter::new(RrlConfig {
            max_tracked: 10,
            ..cfg(1, 2)
        });
        let t = Instant::now();
        for i in 0..100u32 {
            l.check(IpAddr::V4((i << 8).into()), t);
        }
        assert!(l.buckets.lock().expect("lock").len() <= 10);
    }

    #[test]
    fn prefixes() {
        let (a, l) = prefix_of("2001:db8:1:2:3::1".parse().expect("ip"), 24, 48);
        assert_eq!((a.to_string(), l), ("2001:db8:1::".to_string(), 48));
    }
}
