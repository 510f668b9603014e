//! The retry budget: retries may add at most `ratio` of the requests seen in
//! the last ten seconds, plus `min_per_sec` per second, so a failing origin
//! is not buried under a retry storm (as Finagle and Linkerd do).

use parking_lot::Mutex;

const SLOTS: usize = 10;

#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    second: u64,
    requests: u32,
    retries: u32,
}

#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_sec: u32,
    slots: Mutex<[Slot; SLOTS]>,
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_sec: u32) -> Self {
        RetryBudget {
            ratio,
            min_per_sec,
            slots: Mutex::new([Slot::default(); SLOTS]),
        }
    }

    fn slot(slots: &mut [Slot; SLOTS], second: u64) -> &mut Slot {
        let s = &mut slots[(second % SLOTS as u64) as usize];
        if s.second != second {
            *s = Slot {
                second,
                requests: 0,
                retries: 0,
            };
        }
        s
    }

    /// Counts a first attempt at second `now_s`.
    pub fn deposit(&self, now_s: u64) {
        let mut slots = self.slots.lock();
        let s = Self::slot(&mut slots, now_s);
        s.requests = s.requests.saturating_add(1);
    }

    /// Takes a retry from the budget if there is room; false means no retry.
    pub fn try_withdraw(&self, now_s: u64) -> bool {
        let mut slots = self.slots.lock();
        let live = |s: &Slot| s.second + SLOTS as u64 > now_s && s.second <= now_s;
        let (req, ret) = slots
            .iter()
            .filter(|s| live(s))
            .fold((0u64, 0u64), |(a, b), s| {
                (a + u64::from(s.requests), b + u64::from(s.retries))
            });
        let allowed = (self.ratio * req as f64) as u64 + u64::from(self.min_per_sec) * SLOTS as u64;
        if ret >= allowed {
            return false;
        }
        let s = Self::slot(&mut slots, now_s);
        s.retries = s.retries.saturating_add(1);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_caps_retries() {
        let b = RetryBudget::new(0.2, 0);
        for _ in 0..100 {
            b.deposit(1);
        }
        let granted = (0..100).filter(|_| b.try_withdraw(1)).count();
        assert_eq!(granted, 20);
    }

    #[test]
    fn minimum_applies_without_traffic_and_window_slides() {
        let b = RetryBudget::new(0.0, 1);
        let granted = (0..100).filter(|_| b.try_withdraw(5)).count();
        assert_eq!(granted, 10, "1/s over a 10 s window");
        assert!(!b.try_withdraw(14));
        assert!(
            b.try_withdraw(15),
            "the retries of second 5 left the window"
        );
    }
}
