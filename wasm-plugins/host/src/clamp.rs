//! The deadline clamp: once a plugin misses its deadline, its callbacks get
//! a budget of fuel fitted to what its callbacks that succeeded needed, for
//! a while.
//!
//! A callback that loops burns its whole deadline of CPU on the thread that
//! runs it, an async worker of the embedder. One such request is harmless,
//! but a steady share of them is not: at 1% of 16,000 requests a second,
//! loops with the default 50 ms deadline ask for more CPU than two cores
//! have, and every other request starves (the `plugin` chaos scenario went
//! from 16,245 to 119 well-behaved requests a second). A short deadline for
//! every plugin would fail legitimate heavy callbacks (an RSA signature
//! check in wasm takes milliseconds), so the budget is cut only for a plugin
//! that has just shown it loops.
//!
//! The budget is counted in wasmtime's fuel (about one unit per wasm
//! instruction), not in time:
//!
//! - every successful callback tells the clamp the fuel it used (exact, and
//!   the same whatever the machine is doing), and the plugin's peak is the
//!   largest over the last one to two windows;
//! - a missed deadline clamps the plugin for one window (extended by each
//!   later miss): its callbacks get [`CLAMP_FACTOR`] times the peak, at least
//!   [`FUEL_FLOOR`], and a callback that uses it all traps at once, on its
//!   own thread, with nothing else to wake or to read.
//!
//! This replaced a clamp counted in CPU time (until 2026-12), which needed a
//! per-thread POSIX timer and the thread's CPU clock to cut a loop: on a
//! virtual machine the clock jumps by the time a virtual CPU was stopped,
//! each timer's firing cost its thread about 24 µs, and loops still used
//! about 0.7 ms each, twice what they were charged; the `plugin` chaos
//! scenario lost 16 to 23% of its well-behaved throughput to them. Counted
//! in fuel, a clamped loop of the scenario costs the edge about 80 µs in all
//! and the scenario loses about 1% (bench/RESULTS.md).
//!
//! Fuel counts wasm instructions only: a loop of host calls or of bulk
//! memory operations (`memory.fill` of megabytes) does more per unit, so
//! the callback's time deadline stays in force under a clamp as the
//! backstop.
//!
//! The hot path, per callback: two relaxed atomic loads to learn whether
//! the plugin is clamped, and after the callback, two more to learn whether
//! its fuel is a new peak (the lock is taken only then, or when a window
//! ends).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A clamped budget is this many times the plugin's peak.
pub(crate) const CLAMP_FACTOR: u64 = 4;
/// The least fuel a clamped callback gets: about 3,000 times what a quick
/// proxy-wasm callback uses (the `plugin` chaos scenario's: 21 to 36
/// units). A loop of that scenario cut there costs the edge about 80 µs of
/// CPU in all, the failed request included (a loop of 1,000 cut so, with
/// the host's failure path, took 138 µs at the median in a debug build).
pub(crate) const FUEL_FLOOR: u64 = 100_000;

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
    /// The clamped budget (fuel), from the peaks as of the last miss or new
    /// peak: callbacks read it without a lock.
    budget: AtomicU64,
    /// The current window's peak, and when that window ends: a success
    /// that neither beats the one nor is past the other takes no lock.
    current: AtomicU64,
    window_end_ms: AtomicU64,
    peaks: Mutex<Peaks>,
    /// Clamps started (a miss while clamped extends the clamp, not counted).
    pub(crate) started: AtomicU64,
}

/// The most fuel a successful callback used, in the current window and the
/// one before.
#[derive(Debug, Default)]
struct Peaks {
    window_start_ms: u64,
    current: u64,
    previous: u64,
}

impl Peaks {
    fn roll(&mut self, now_ms: u64, window_ms: u64) {
        let window = window_ms.max(1);
        let elapsed = now_ms.saturating_sub(self.window_start_ms);
        if elapsed >= 2 * window {
            self.previous = 0;
            self.current = 0;
            self.window_start_ms = now_ms;
        } else if elapsed >= window {
            self.previous = self.current;
            self.current = 0;
            self.window_start_ms += window;
        }
    }

    /// The clamped budget these peaks give.
    fn budget(&self) -> u64 {
        self.current
            .max(self.previous)
            .saturating_mul(CLAMP_FACTOR)
            .max(FUEL_FLOOR)
    }
}

impl Clamp {
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            until_ms: AtomicU64::new(0),
            budget: AtomicU64::new(FUEL_FLOOR),
            current: AtomicU64::new(0),
            window_end_ms: AtomicU64::new(0),
            peaks: Mutex::new(Peaks::default()),
            started: AtomicU64::new(0),
        }
    }

    /// True while the plugin is clamped.
    pub(crate) fn active(&self, now_ms: u64) -> bool {
        now_ms < self.until_ms.load(Ordering::Relaxed)
    }

    /// The fuel of a callback starting now: `None` (no limit) unless the
    /// plugin is clamped. Lock-free: run per callback.
    pub(crate) fn fuel(&self, now_ms: u64) -> Option<u64> {
        self.active(now_ms)
            .then(|| self.budget.load(Ordering::Relaxed))
    }

    /// The fuel a clamp starting now would give.
    pub(crate) fn budget(&self) -> u64 {
        self.budget.load(Ordering::Relaxed)
    }

    /// A callback succeeded, having used `fuel`.
    pub(crate) fn succeeded(&self, fuel: u64, now_ms: u64) {
        if self.window_ms == 0
            || (fuel <= self.current.load(Ordering::Relaxed)
                && now_ms < self.window_end_ms.load(Ordering::Relaxed))
        {
            return;
        }
        let mut p = self.peaks.lock();
        p.roll(now_ms, self.window_ms);
        p.current = p.current.max(fuel);
        self.publish(&p);
    }

    fn publish(&self, p: &Peaks) {
        self.current.store(p.current, Ordering::Relaxed);
        self.window_end_ms.store(
            p.window_start_ms.saturating_add(self.window_ms.max(1)),
            Ordering::Relaxed,
        );
        self.budget.store(p.budget(), Ordering::Relaxed);
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
            self.publish(&p);
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

    const WINDOW: Duration = Duration::from_secs(10);

    #[test]
    fn an_unclamped_plugin_has_no_fuel_limit() {
        let c = Clamp::new(WINDOW);
        c.succeeded(3_000, 0);
        assert_eq!(c.fuel(5), None);
    }

    #[test]
    fn a_miss_clamps_to_the_floor_when_callbacks_used_little() {
        let c = Clamp::new(WINDOW);
        c.succeeded(30, 500);
        assert_eq!(c.missed(1_000), Some(11_000));
        assert_eq!(c.fuel(1_001), Some(FUEL_FLOOR));
        assert_eq!(c.fuel(10_999), Some(FUEL_FLOOR));
        assert_eq!(c.fuel(11_000), None);
        assert_eq!(c.started.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_clamp_leaves_four_times_the_heaviest_success_seen_once() {
        let c = Clamp::new(WINDOW);
        c.succeeded(2_000_000, 100);
        for t in 0..50 {
            c.succeeded(40, 200 + t);
        }
        c.missed(300);
        assert_eq!(c.fuel(400), Some(8_000_000));
        // A heavier one while clamped raises the budget at once.
        c.succeeded(3_000_000, 500);
        assert_eq!(c.fuel(600), Some(12_000_000));
        assert_eq!(c.budget(), 12_000_000);
    }

    #[test]
    fn misses_extend_the_clamp_and_count_once() {
        let c = Clamp::new(WINDOW);
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
        let c = Clamp::new(WINDOW);
        c.succeeded(1_000_000, 1_000);
        c.missed(12_000);
        // The previous window's peak still counts...
        assert_eq!(c.fuel(12_000), Some(4_000_000));
        c.missed(25_000);
        // ...not the one before it.
        assert_eq!(c.fuel(25_000), Some(FUEL_FLOOR));
    }

    #[test]
    fn a_success_after_its_window_ended_is_counted_in_the_next() {
        let c = Clamp::new(WINDOW);
        c.succeeded(1_000_000, 0);
        // Not above the first window's peak, but in a later window: it
        // must not be lost when the first window ages out.
        c.succeeded(600_000, 15_000);
        c.missed(25_000);
        assert_eq!(c.fuel(25_000), Some(2_400_000));
    }

    #[test]
    fn a_zero_window_never_clamps() {
        let c = Clamp::new(Duration::ZERO);
        c.succeeded(5, 0);
        assert_eq!(c.missed(0), None);
        assert_eq!(c.fuel(1), None);
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
