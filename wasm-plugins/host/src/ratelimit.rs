//! The rate limit on a plugin's log output (`proxy_log` and WASI `fd_write`
//! to stdout/stderr): a token bucket per plugin, shared by its instances.
//!
//! Pure: the caller passes the time in.

use std::time::Instant;

/// A token bucket of `rate` lines per second holding at most `rate` lines
/// (one second's worth of burst). A rate of 0 suppresses every line.
#[derive(Debug)]
pub(crate) struct LogBucket {
    rate: u32,
    tokens: f64,
    last: Option<Instant>,
    /// Lines suppressed since the last admitted one.
    pending: u64,
}

/// The verdict on one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Emit it; `suppressed` lines were dropped since the previous emitted line.
    Yes { suppressed: u64 },
    /// Drop it.
    No,
}

impl LogBucket {
    pub(crate) fn new(rate: u32) -> Self {
        Self {
            rate,
            tokens: f64::from(rate),
            last: None,
            pending: 0,
        }
    }

    pub(crate) fn admit(&mut self, now: Instant) -> Admit {
        let cap = f64::from(self.rate);
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * cap).min(cap);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Admit::Yes {
                suppressed: std::mem::take(&mut self.pending),
            }
        } else {
            self.pending += 1;
            Admit::No
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate_then_a_count_of_what_was_dropped() {
        let t0 = Instant::now();
        let mut b = LogBucket::new(10);
        for _ in 0..10 {
            assert_eq!(b.admit(t0), Admit::Yes { suppressed: 0 });
        }
        for _ in 0..5 {
            assert_eq!(b.admit(t0), Admit::No);
        }
        // 100 ms later, one token is back; the next line reports the five.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.admit(t1), Admit::Yes { suppressed: 5 });
        assert_eq!(b.admit(t1), Admit::No);
        // A long pause refills to the burst, no more.
        let t2 = t1 + Duration::from_secs(60);
        for i in 0..10 {
            assert_eq!(
                b.admit(t2),
                Admit::Yes {
                    suppressed: u64::from(i == 0)
                }
            );
        }
        assert_eq!(b.admit(t2), Admit::No);
    }

    #[test]
    fn rate_zero_drops_everything_and_time_going_backwards_is_harmless() {
        let t0 = Instant::now();
        let mut b = LogBucket::new(0);
        assert_eq!(b.admit(t0 + Duration::from_secs(5)), Admit::No);
        assert_eq!(b.admit(t0), Admit::No);
        let mut b = LogBucket::new(1);
        assert_eq!(
            b.admit(t0 + Duration::from_secs(5)),
            Admit::Yes { suppressed: 0 }
        );
        assert_eq!(b.admit(t0), Admit::No);
    }
}
