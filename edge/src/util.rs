//! Small utilities shared by several layers, with no dependencies of their own.

/// 64-bit FNV-1a with a final avalanche; stable across processes and
/// versions, so every POP hashes a URL to the same origin.
pub fn hash64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finaliser.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A boxed error of any kind, as bodies and causes carry them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// At most one log line per `interval` for one source of repeated warnings
/// (a failing disk, a failing plugin): a fault on every request must not
/// become a line per request, written synchronously by the async workers.
/// Each line admitted says how many were suppressed since the previous one;
/// the faults themselves are counted in metrics.
#[derive(Debug)]
pub struct LogThrottle {
    interval: std::time::Duration,
    suppressed: std::sync::atomic::AtomicU64,
    last: parking_lot::Mutex<Option<std::time::Instant>>,
}

impl LogThrottle {
    pub fn new(interval: std::time::Duration) -> Self {
        LogThrottle {
            interval,
            suppressed: std::sync::atomic::AtomicU64::new(0),
            last: parking_lot::Mutex::new(None),
        }
    }

    /// The interval between two lines.
    pub fn interval(&self) -> std::time::Duration {
        self.interval
    }

    /// `Some(lines suppressed since the last one)` if a line may be logged
    /// now; `None` (and one more suppressed) if not.
    pub fn may_log(&self) -> Option<u64> {
        self.may_log_at(std::time::Instant::now())
    }

    pub(crate) fn may_log_at(&self, now: std::time::Instant) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let mut last = self.last.lock();
        if last.is_some_and(|t| now.saturating_duration_since(t) < self.interval) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_throttle_admits_one_line_per_interval_and_counts_the_rest() {
        let t = LogThrottle::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(t.may_log_at(t0), Some(0));
        for ms in [1, 10, 500, 999] {
            assert_eq!(t.may_log_at(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(
            t.may_log_at(t0 + Duration::from_millis(1000)),
            Some(4),
            "the next line says how many were suppressed"
        );
        assert_eq!(t.may_log_at(t0 + Duration::from_millis(1500)), None);
        assert_eq!(t.may_log_at(t0 + Duration::from_secs(5)), Some(1));
    }
}
