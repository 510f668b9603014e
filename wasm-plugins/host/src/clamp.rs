//! The deadline clamp: once a plugin misses its deadline, its callbacks get
//! a deadline fitted to what its callbacks that succeeded needed, for a
//! while.
//!
//! A callback that loops burns its whole deadline of CPU on the thread that
//! runs it, an async worker of the embedder. One such request is harmless,
//! but a steady share of them is not: at 1% of 16,000 requests a second,
//! loops with the default 50 ms deadline ask for more CPU than two cores
//! have, and every other request starves (the `plugin` chaos scenario went
//! from 16,245 to 119 well-behaved requests a second). A short deadline for
//! every plugin would fail legitimate heavy callbacks (an RSA signature
//! check in wasm takes milliseconds), so the budget is cut only for a plugin
//! that has just shown it loops:
//!
//! - every callback that an epoch tick landed in measures the CPU it used
//!   since that tick (a clamped one: since its start), and a success
//!   records it as a sample (kept over the last one to two windows);
//! - the plugin's peak is the [`CLAMP_SIGHTINGS`]-th largest sample (the
//!   smallest, with fewer samples): one sample cannot set it. On a virtual
//!   machine a thread's CPU clock jumps by the time its virtual CPU was
//!   stopped, and a callback of 2 µs was measured at 0.14–0.45 ms: with the
//!   largest sample as the peak, such a jump held the clamp open at 1.8 ms,
//!   and loops cost 0.9–1.9 ms each instead of the floor's (the `plugin`
//!   chaos scenario). A sample counts from the callback's first tick, so it
//!   is part of the callback's cost; a heavy callback seen often gives
//!   samples close to its whole cost, but one seen only a few times in two
//!   windows may get less than it needs, and fail while the plugin is
//!   clamped (outside a clamp nothing changes). Reading the time at every
//!   callback's start would make the samples whole, but the wall time
//!   before a tick is inflated under load (a tick lands more often in a
//!   callback whose thread was preempted), which held clamps at 0.9 ms in
//!   the chaos scenario with loops on every 10th request, and costs about
//!   15 ns per callback;
//! - a missed deadline clamps the plugin for one window (extended by each
//!   later miss): its callbacks' deadline becomes [`CLAMP_FACTOR`] times the
//!   peak, at least [`CLAMP_FLOOR`] and at most the configured deadline,
//!   counted from the callback's start;
//! - a clamped callback advances the engine's epoch as it starts, so a loop
//!   running on another thread is checked at every callback the plugin
//!   starts, not only at the ticker's 5 ms ticks: the busier the machine,
//!   the sooner a loop is cut. (A faster ticker was tried: on a saturated
//!   machine it was not woken on time, and its wake-ups alone cost 5% of
//!   the edge's CPU at 2 kHz.)
//!
//! Callbacks that no tick lands in, nearly all of them, record nothing; the
//! per-callback cost is two relaxed atomic loads, plus, while clamped, an
//! atomic increment and a read of the (user-space) monotonic clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A clamped deadline is this many times the plugin's peak.
pub(crate) const CLAMP_FACTOR: u32 = 4;
/// The least a clamped deadline can be: about a thousand times a typical
/// proxy-wasm callback here (0.15 to 0.4 µs), and 6 times a cache hit's
/// whole cost in the edge (about 40 µs of CPU). It was 0.5 ms: a loop cut
/// there (after about 0.55 ms) cost the edge about 14 hits, and at 1
/// request in 300 (the `plugin`
/// chaos scenario's loops) that alone took 4.6% of its throughput.
pub(crate) const CLAMP_FLOOR: Duration = Duration::from_micros(250);
/// The peak is the this-many-th largest sample of the last one to two
/// windows.
pub(crate) const CLAMP_SIGHTINGS: usize = 3;

/// The host's coarse clock, advanced by the epoch ticker thread.
#[derive(Debug)]
pub(crate) struct Clock {
    start: Instant,
    /// Milliseconds since `start`, as of the last tick.
    now_ms: AtomicU64,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Self {
            start: Instant::now(),
            now_ms: AtomicU64::new(0),
        }
    }

    /// The time as of the last tick (at most one tick behind).
    pub(crate) fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::Relaxed)
    }

    /// Called by the ticker: the time now.
    pub(crate) fn advance(&self, now: Instant) {
        let ms = u64::try_from(now.saturating_duration_since(self.start).as_millis())
            .unwrap_or(u64::MAX);
        self.now_ms.fetch_max(ms, Ordering::Relaxed);
    }
}

/// One plugin's clamp state.
#[derive(Debug)]
pub(crate) struct Clamp {
    /// How long a miss clamps the plugin (milliseconds); 0: never.
    window_ms: u64,
    /// Clamped while the clock is below this.
    until_ms: AtomicU64,
    /// The clamped deadline (nanoseconds), from the peaks as of the last
    /// miss or slow success: callbacks read it without a lock.
    budget_ns: AtomicU64,
    peaks: Mutex<Peaks>,
    /// Clamps started (a miss while clamped extends the clamp, not counted).
    pub(crate) started: AtomicU64,
}

/// The largest samples of successful callbacks, in the current window and
/// the one before.
#[derive(Debug, Default)]
struct Peaks {
    window_start_ms: u64,
    current: Top,
    previous: Top,
}

/// The [`CLAMP_SIGHTINGS`] largest samples of a window, largest first.
#[derive(Debug, Default, Clone, Copy)]
struct Top {
    samples: [Duration; CLAMP_SIGHTINGS],
    len: usize,
}

impl Top {
    fn insert(&mut self, sample: Duration) {
        let mut i = if self.len < CLAMP_SIGHTINGS {
            self.len += 1;
            self.len - 1
        } else if sample > self.samples[CLAMP_SIGHTINGS - 1] {
            CLAMP_SIGHTINGS - 1
        } else {
            return;
        };
        self.samples[i] = sample;
        while i > 0 && self.samples[i - 1] < self.samples[i] {
            self.samples.swap(i - 1, i);
            i -= 1;
        }
    }

    fn iter(&self) -> impl Iterator<Item = Duration> + '_ {
        self.samples[..self.len].iter().copied()
    }
}

impl Peaks {
    fn roll(&mut self, now_ms: u64, window_ms: u64) {
        let window = window_ms.max(1);
        let elapsed = now_ms.saturating_sub(self.window_start_ms);
        if elapsed >= 2 * window {
            self.previous = Top::default();
            self.current = Top::default();
            self.window_start_ms = now_ms;
        } else if elapsed >= window {
            self.previous = self.current;
            self.current = Top::default();
            self.window_start_ms += window;
        }
    }

    /// The peak: the [`CLAMP_SIGHTINGS`]-th largest sample of both windows,
    /// or the smallest when there are fewer; zero without samples.
    fn peak(&self) -> Duration {
        let mut all = [Duration::ZERO; 2 * CLAMP_SIGHTINGS];
        let mut n = 0;
        for s in self.current.iter().chain(self.previous.iter()) {
            all[n] = s;
            n += 1;
        }
        if n == 0 {
            return Duration::ZERO;
        }
        let all = &mut all[..n];
        all.sort_unstable_by(|a, b| b.cmp(a));
        all[n.min(CLAMP_SIGHTINGS) - 1]
    }

    /// The clamped deadline these peaks give.
    fn budget(&self) -> Duration {
        self.peak().saturating_mul(CLAMP_FACTOR).max(CLAMP_FLOOR)
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Clamp {
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            until_ms: AtomicU64::new(0),
            budget_ns: AtomicU64::new(nanos(CLAMP_FLOOR)),
            peaks: Mutex::new(Peaks::default()),
            started: AtomicU64::new(0),
        }
    }

    /// True while the plugin is clamped.
    pub(crate) fn active(&self, now_ms: u64) -> bool {
        now_ms < self.until_ms.load(Ordering::Relaxed)
    }

    /// The deadline of a callback starting now: `deadline` (the configured
    /// one) unless the plugin is clamped. The second value says whether it
    /// was clamped. Lock-free: run per callback.
    pub(crate) fn deadline(&self, deadline: Duration, now_ms: u64) -> (Duration, bool) {
        if !self.active(now_ms) {
            return (deadline, false);
        }
        let clamped = Duration::from_nanos(self.budget_ns.load(Ordering::Relaxed));
        if clamped < deadline {
            (clamped, true)
        } else {
            (deadline, false)
        }
    }

    /// A callback that an epoch tick landed in succeeded, having used
    /// `sample` of CPU since that tick (a clamped one: since its start).
    pub(crate) fn succeeded(&self, sample: Duration, now_ms: u64) {
        let mut p = self.peaks.lock();
        p.roll(now_ms, self.window_ms);
        p.current.insert(sample);
        self.budget_ns.store(nanos(p.budget()), Ordering::Relaxed);
    }

    /// A callback missed its deadline: clamp the plugin from now for one
    /// window. Returns the time the clamp ends (`None` when clamps are off).
    pub(crate) fn missed(&self, now_ms: u64) -> Option<u64> {
        if self.window_ms == 0 {
            return None;
        }
        {
            // Peaks older than two windows no longer count.
            let mut p = self.peaks.lock();
            p.roll(now_ms, self.window_ms);
            self.budget_ns.store(nanos(p.budget()), Ordering::Relaxed);
        }
        let until = now_ms.saturating_add(self.window_ms);
        let before = self.until_ms.fetch_max(until, Ordering::Relaxed);
        if before <= now_ms {
            self.started.fetch_add(1, Ordering::Relaxed);
        }
        Some(until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const DEADLINE: Duration = Duration::from_millis(50);

    #[test]
    fn an_unclamped_plugin_keeps_its_deadline() {
        let c = Clamp::new(Duration::from_secs(10));
        c.succeeded(3 * MS, 0);
        assert_eq!(c.deadline(DEADLINE, 5), (DEADLINE, false));
    }

    #[test]
    fn a_miss_clamps_to_the_floor_when_no_callback_needed_a_tick() {
        let c = Clamp::new(Duration::from_secs(10));
        assert_eq!(c.missed(1_000), Some(11_000));
        assert_eq!(c.deadline(DEADLINE, 1_001), (CLAMP_FLOOR, true));
        assert_eq!(c.deadline(DEADLINE, 10_999), (CLAMP_FLOOR, true));
        assert_eq!(c.deadline(DEADLINE, 11_000), (DEADLINE, false));
        assert_eq!(c.started.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_clamp_leaves_room_for_the_slowest_success_seen_three_times() {
        let c = Clamp::new(Duration::from_secs(10));
        for t in [100, 150, 200] {
            c.succeeded(3 * MS, t);
        }
        c.succeeded(2 * MS, 250);
        c.missed(300);
        assert_eq!(c.deadline(DEADLINE, 400), (12 * MS, true));
        // A peak near the deadline, seen three times, leaves it as configured.
        for t in [500, 510, 520] {
            c.succeeded(20 * MS, t);
        }
        assert_eq!(c.deadline(DEADLINE, 600), (DEADLINE, false));
    }

    #[test]
    fn one_or_two_inflated_samples_do_not_open_the_clamp() {
        let c = Clamp::new(Duration::from_secs(10));
        for t in 0..50 {
            c.succeeded(Duration::from_micros(2), 100 + t);
        }
        // A callback of 2 µs measured across a stop of its virtual CPU.
        c.succeeded(Duration::from_micros(450), 200);
        c.succeeded(Duration::from_micros(210), 300);
        c.missed(400);
        assert_eq!(c.deadline(DEADLINE, 500), (CLAMP_FLOOR, true));
        // With a third, the smallest of the three is the peak.
        c.succeeded(Duration::from_micros(300), 600);
        assert_eq!(
            c.deadline(DEADLINE, 700),
            (4 * Duration::from_micros(210), true)
        );
    }

    #[test]
    fn with_fewer_samples_the_smallest_is_the_peak() {
        let c = Clamp::new(Duration::from_secs(10));
        c.succeeded(5 * MS, 100);
        c.missed(200);
        assert_eq!(c.deadline(DEADLINE, 300), (20 * MS, true));
        c.succeeded(4 * MS, 400);
        assert_eq!(c.deadline(DEADLINE, 500), (16 * MS, true));
    }

    #[test]
    fn the_top_keeps_the_largest_samples_in_order() {
        let mut t = Top::default();
        for ms in [1, 7, 3, 9, 2, 8, 5] {
            t.insert(ms * MS);
        }
        assert_eq!(t.iter().collect::<Vec<_>>(), vec![9 * MS, 8 * MS, 7 * MS]);
    }

    #[test]
    fn misses_extend_the_clamp_and_count_once() {
        let c = Clamp::new(Duration::from_secs(10));
        c.missed(0);
        c.missed(5_000);
        assert!(c.active(14_999));
        assert!(!c.active(15_000));
        assert_eq!(c.started.load(Ordering::Relaxed), 1);
        c.missed(20_000);
        assert_eq!(c.started.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn peaks_age_out_after_two_windows() {
        let c = Clamp::new(Duration::from_secs(10));
        c.succeeded(5 * MS, 1_000);
        c.missed(12_000);
        // The previous window's peak still counts...
        assert_eq!(c.deadline(DEADLINE, 12_000), (20 * MS, true));
        c.missed(25_000);
        // ...not the one before it.
        assert_eq!(c.deadline(DEADLINE, 25_000), (CLAMP_FLOOR, true));
        c.missed(40_000);
        assert_eq!(c.deadline(DEADLINE, 40_000), (CLAMP_FLOOR, true));
    }

    #[test]
    fn a_zero_window_never_clamps() {
        let c = Clamp::new(Duration::ZERO);
        assert_eq!(c.missed(0), None);
        assert_eq!(c.deadline(DEADLINE, 1), (DEADLINE, false));
    }

    #[test]
    fn the_clock_follows_the_ticks() {
        let clock = Clock::new();
        assert_eq!(clock.now_ms(), 0);
        clock.advance(clock.start + Duration::from_millis(1_000));
        assert_eq!(clock.now_ms(), 1_000);
        // Never backwards.
        clock.advance(clock.start + Duration::from_millis(900));
        assert_eq!(clock.now_ms(), 1_000);
    }
}
