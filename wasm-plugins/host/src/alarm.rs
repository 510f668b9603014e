//! A per-thread alarm for the callbacks of a clamped plugin.
//!
//! The epoch ticker checks a running callback every 5 ms of wall time, and a
//! loop on a busy machine is checked later still: its thread is off the CPU
//! at some ticks, and the ticker's own wake-ups are late. A clamped deadline
//! (a fraction of a millisecond) needs a check as soon as the *looping
//! thread itself* can have used its budget, whatever else runs.
//!
//! So a clamped callback arms a POSIX timer of its own thread
//! (`SIGEV_THREAD_ID`) on the monotonic clock: a thread cannot use more CPU
//! time than the wall time that passed, so no check is needed before its
//! budget. When it fires, the check reads the thread's CPU time; a
//! callback that was descheduled meanwhile has budget left, and the alarm is
//! armed again for what is left. The monotonic clock is used because the
//! kernel runs timers on a thread's CPU-time clock only at its scheduler
//! ticks (every 4 ms at `CONFIG_HZ=250`), far coarser than a clamped budget;
//! its high-resolution timers fire within microseconds.
//!
//! The signal handler only stores to two atomics: it marks the alarm fired,
//! and advances the engine's epoch (`Engine::increment_epoch` is one relaxed
//! `fetch_add`), so the guest reaches its next epoch check at once, whose
//! callback reads the thread's CPU time. Nothing in the handler allocates,
//! locks or touches `errno`. One race is left: wasmtime sets the next epoch
//! deadline from the epoch it reads after the epoch callback returns, so a
//! firing between the callback's last look at its alarm and that read (the
//! thread preempted there) counts as seen, and the callback is next checked
//! at the ticker's next tick (5 ms), or another callback's start. About one
//! loop in 30,000 on a loaded machine (`every_clamped_loop_is_cut_by_its_alarm`).
//!
//! The signal is `SIGURG`, as Go's runtime uses it for preemption: its
//! default action is to ignore it, and nothing else in the process uses it.
//! If something else already handles `SIGURG`, the alarm is not installed
//! and clamped callbacks fall back to the epoch ticks.
//!
//! A thread creates its timer at its first clamped callback and deletes it
//! when it exits. Setting a timer is a system call, and on a virtual
//! machine it reprograms the virtual CPU's timer (a VM exit, several
//! microseconds on Firecracker): arming and disarming it per callback made
//! each request through a clamped plugin cost about 7 µs instead of 0.5.
//! So a timer that is already due within the time a callback asks for is
//! left as it is (the check then comes early, and is followed by another
//! for what is left), and a callback that ends does not disarm its timer:
//! it only withdraws its engine. A timer that fires outside a callback only
//! marks itself fired. A busy thread therefore sets its timer, and takes its
//! signal, about once per the time its callbacks ask for; each such round
//! costs it about 24 µs on a virtual machine here. Callbacks ask for 1 ms
//! (`ALARM_BACKSTOP` in `instance.rs`), not their 0.25 ms budget: at the
//! budget, the rounds alone (4,500 a second) cost the well-behaved requests
//! of the `plugin` chaos scenario about 20% of their throughput. A loop is
//! usually checked much sooner, by the epoch advance of any callback of
//! the plugin that starts on another thread; the alarm is the backstop for
//! a loop that nothing else checks. The first such check that finds a
//! callback older than `ALARM_AFTER` (50 µs; nearly every callback ends
//! sooner) brings its thread's timer forward to when the callback can have
//! used its budget ([`tighten`]): a loop checked once or twice and then by
//! nothing else is cut at its budget, not at the backstop (with a 0.25 ms
//! budget, p99 0.41–0.62 ms of CPU instead of 1.01–1.05 ms in
//! `bench/plugins/misbehave.sh`). Its signal interrupts
//! whatever the thread was doing then; `SA_RESTART` restarts most system
//! calls, and the few that return `EINTR` regardless (`epoll_wait`, sleeps)
//! are retried by tokio and the standard library. Callbacks of plugins that
//! are not clamped never touch the alarm.

use std::time::Duration;

/// Whether [`arm`] can work in this process (the handler is installed).
#[cfg(test)]
pub(crate) fn available() -> bool {
    imp::available()
}

/// How [`arm`] left the calling thread's alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Armed {
    /// The timer was set now, to fire in the time asked.
    Set,
    /// A timer already due within the time asked was kept.
    Kept,
    /// No alarm (the caller falls back to epoch ticks).
    Unavailable,
}

/// Arms the calling thread's alarm to fire within `within` (wall time) from
/// now, advancing `engine`'s epoch when it fires: a timer already due in
/// that time is kept. [`release`] must be called before `engine` can be
/// dropped.
pub(crate) fn arm(engine: &wasmtime::Engine, within: Duration) -> Armed {
    imp::arm(engine, within)
}

/// Arms the calling thread's alarm again, for the same engine, to fire in
/// `after` (a callback with budget left when it fired). `false` if it could
/// not be.
pub(crate) fn rearm(after: Duration) -> bool {
    imp::rearm(after)
}

/// Brings the calling thread's alarm (armed for a running callback) forward
/// to fire within `within` from now, unless it is due within that time
/// already; `false` if it could not be.
pub(crate) fn tighten(within: Duration) -> bool {
    imp::tighten(within)
}

/// Withdraws the engine the calling thread's alarm advances, at the end of
/// a callback; the timer itself runs on (see the module's documentation).
pub(crate) fn release() {
    imp::release()
}

/// How many times the calling thread set its timer (each time, a system
/// call, and later a signal).
pub(crate) fn sets() -> u64 {
    imp::sets()
}

/// Whether the calling thread's timer fired since it was last set (which
/// may be before the running callback started: see [`arm`]).
pub(crate) fn fired() -> bool {
    imp::fired()
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod imp {
    use std::cell::RefCell;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
    use std::time::{Duration, Instant};

    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    use nix::sys::signal::{SigEvent, SigevNotify};
    use nix::sys::time::TimeSpec;
    use nix::sys::timer::{Expiration, Timer, TimerSetTimeFlags};
    use nix::time::ClockId;

    use super::Armed;

    const SIGNAL: Signal = Signal::SIGURG;

    /// What the handler reads: the signal's `si_value` points at it.
    struct Slot {
        fired: AtomicBool,
        engine: AtomicPtr<wasmtime::Engine>,
    }

    /// A thread's timer and the slot its signals point at. The timer is
    /// declared first so that it is deleted before the slot is freed.
    struct ThreadAlarm {
        timer: Timer,
        slot: Box<Slot>,
        /// When the timer was last set to fire (it may have fired since).
        due: Option<Instant>,
    }

    thread_local! {
        /// `None` until the thread's first clamped callback; stays `None` if
        /// the timer could not be created.
        static ALARM: RefCell<Option<ThreadAlarm>> = const { RefCell::new(None) };
        /// How many times this thread set its timer.
        static SETS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    pub(super) fn sets() -> u64 {
        SETS.with(|n| n.get())
    }

    /// Installs the handler once per process; `false` if `SIGURG` already
    /// had a handler (it is left in place) or `sigaction` failed.
    pub(super) fn available() -> bool {
        static INSTALLED: OnceLock<bool> = OnceLock::new();
        *INSTALLED.get_or_init(|| {
            let ours = SigAction::new(
                SigHandler::SigAction(on_alarm),
                SaFlags::SA_SIGINFO | SaFlags::SA_RESTART | SaFlags::SA_ONSTACK,
                SigSet::empty(),
            );
            // SAFETY: `on_alarm` is async-signal-safe: it reads the siginfo
            // the kernel passes and does relaxed atomic stores and one
            // relaxed `fetch_add` through pointers that stay valid while
            // they are published (see `arm` and `disarm`).
            match unsafe { sigaction(SIGNAL, &ours) } {
                Ok(old) => match old.handler() {
                    SigHandler::SigDfl | SigHandler::SigIgn => true,
                    _ => {
                        // Someone else's handler: put it back, fall back.
                        // SAFETY: reinstalls exactly what was there.
                        let _ = unsafe { sigaction(SIGNAL, &old) };
                        tracing::warn!(
                            "SIGURG already has a handler: clamped plugin callbacks are checked at epoch ticks only"
                        );
                        false
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot install the CPU-time alarm's handler: clamped plugin callbacks are checked at epoch ticks only");
                    false
                }
            }
        })
    }

    extern "C" fn on_alarm(
        _signal: libc::c_int,
        info: *mut libc::siginfo_t,
        _context: *mut libc::c_void,
    ) {
        if info.is_null() {
            return;
        }
        // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
        let info = unsafe { &*info };
        // Only our timers: a SIGURG from kill(2) or a socket's out-of-band
        // data carries no slot.
        if info.si_code != libc::SI_TIMER {
            return;
        }
        // SAFETY: for SI_TIMER, si_value is the sigev_value of the timer,
        // which `thread_alarm` set to the address of the thread's `Slot`; the
        // timer is deleted before that slot is freed, and a timer created
        // with SIGEV_THREAD_ID signals only its own thread, so the slot is
        // alive while this handler runs on it.
        let slot = unsafe { info.si_value().sival_ptr } as *const Slot;
        if slot.is_null() {
            return;
        }
        // SAFETY: see above.
        let slot = unsafe { &*slot };
        slot.fired.store(true, Ordering::Relaxed);
        let engine = slot.engine.load(Ordering::Relaxed);
        if !engine.is_null() {
            // SAFETY: `arm` publishes the engine of the store whose callback
            // runs on this thread, and `release` clears it before that call
            // returns to code that could drop the store; this handler
            // interrupts that same thread, so the engine is alive here.
            unsafe { (*engine).increment_epoch() };
        }
    }

    fn thread_alarm() -> Option<ThreadAlarm> {
        let slot = Box::new(Slot {
            fired: AtomicBool::new(false),
            engine: AtomicPtr::new(std::ptr::null_mut()),
        });
        let event = SigEvent::new(SigevNotify::SigevThreadId {
            signal: SIGNAL,
            thread_id: nix::unistd::gettid().as_raw(),
            si_value: &*slot as *const Slot as libc::intptr_t,
        });
        match Timer::new(ClockId::CLOCK_MONOTONIC, event) {
            Ok(timer) => Some(ThreadAlarm {
                timer,
                slot,
                due: None,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot create an alarm timer for this thread: its clamped plugin callbacks are checked at epoch ticks only");
                None
            }
        }
    }

    /// Sets `alarm` to fire once, in `after` (at least 1 µs: a zero
    /// expiration would disarm it).
    fn set(alarm: &mut ThreadAlarm, after: Duration, now: Instant) -> bool {
        SETS.with(|n| n.set(n.get() + 1));
        alarm.slot.fired.store(false, Ordering::Relaxed);
        let after = after.max(Duration::from_micros(1));
        let ok = alarm
            .timer
            .set(
                Expiration::OneShot(TimeSpec::from_duration(after)),
                TimerSetTimeFlags::empty(),
            )
            .is_ok();
        alarm.due = ok.then(|| now + after);
        ok
    }

    pub(super) fn arm(engine: &wasmtime::Engine, within: Duration) -> Armed {
        if !available() {
            return Armed::Unavailable;
        }
        ALARM.with(|a| {
            // The cell is borrowed only inside these functions, never
            // across a callback (callbacks do not nest on a thread); should
            // it ever be, the callback falls back to the epoch ticks.
            let Ok(mut a) = a.try_borrow_mut() else {
                return Armed::Unavailable;
            };
            if a.is_none() {
                *a = thread_alarm();
            }
            let Some(alarm) = a.as_mut() else {
                return Armed::Unavailable;
            };
            alarm.slot.engine.store(
                engine as *const wasmtime::Engine as *mut wasmtime::Engine,
                Ordering::Relaxed,
            );
            // The time is read after the engine is published (the handler
            // runs on this thread: a compiler fence orders them): a timer
            // due after it has not fired yet, so its firing will advance
            // this engine. One that fired before found no engine and did
            // nothing, and must be set again. (Reading the time before
            // publishing lost that firing about once in 200 loops, which
            // then ran to the next 5 ms tick.)
            std::sync::atomic::compiler_fence(Ordering::SeqCst);
            let now = Instant::now();
            // A timer due within that time will check this callback in
            // time. Its mark is left as it is: a stale mark only costs one
            // early check, which sets the timer again.
            if let Some(due) = alarm.due
                && now < due
                && due <= now + within
            {
                return Armed::Kept;
            }
            if set(alarm, within, now) {
                Armed::Set
            } else {
                alarm
                    .slot
                    .engine
                    .store(std::ptr::null_mut(), Ordering::Relaxed);
                Armed::Unavailable
            }
        })
    }

    /// Runs `f` on the calling thread's alarm while a callback has it armed
    /// (its engine published); `false` otherwise.
    fn with_armed(f: impl FnOnce(&mut ThreadAlarm) -> bool) -> bool {
        ALARM.with(|a| {
            let Ok(mut a) = a.try_borrow_mut() else {
                return false;
            };
            match a.as_mut() {
                Some(alarm) if !alarm.slot.engine.load(Ordering::Relaxed).is_null() => f(alarm),
                _ => false,
            }
        })
    }

    pub(super) fn rearm(after: Duration) -> bool {
        with_armed(|alarm| set(alarm, after, Instant::now()))
    }

    pub(super) fn tighten(within: Duration) -> bool {
        with_armed(|alarm| {
            let now = Instant::now();
            if let Some(due) = alarm.due
                && now < due
                && due <= now + within
                && !alarm.slot.fired.load(Ordering::Relaxed)
            {
                return true;
            }
            set(alarm, within, now)
        })
    }

    pub(super) fn release() {
        ALARM.with(|a| {
            if let Ok(a) = a.try_borrow()
                && let Some(alarm) = a.as_ref()
            {
                alarm
                    .slot
                    .engine
                    .store(std::ptr::null_mut(), Ordering::Relaxed);
            }
        })
    }

    pub(super) fn fired() -> bool {
        ALARM.with(|a| {
            a.try_borrow()
                .ok()
                .and_then(|a| a.as_ref().map(|a| a.slot.fired.load(Ordering::Relaxed)))
                .unwrap_or(false)
        })
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::time::Duration;

    pub(super) fn available() -> bool {
        false
    }
    pub(super) fn arm(_: &wasmtime::Engine, _: Duration) -> super::Armed {
        super::Armed::Unavailable
    }
    pub(super) fn sets() -> u64 {
        0
    }
    pub(super) fn rearm(_: Duration) -> bool {
        false
    }
    pub(super) fn tighten(_: Duration) -> bool {
        false
    }
    pub(super) fn release() {}
    pub(super) fn fired() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn sleep_ms(ms: u64) {
        // Sleeping is restarted after the handler (std retries EINTR).
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_millis(ms));
        assert!(t0.elapsed() >= Duration::from_millis(ms));
    }

    #[test]
    fn the_alarm_fires_after_its_time() {
        assert!(available(), "the alarm's handler could not be installed");
        let engine = wasmtime::Engine::default();
        assert_eq!(arm(&engine, Duration::from_millis(2)), Armed::Set);
        assert!(!fired());
        sleep_ms(20);
        assert!(fired(), "the alarm did not fire in 20 ms");
        // Again, for the same engine.
        assert!(rearm(Duration::from_millis(2)));
        assert!(!fired());
        sleep_ms(20);
        assert!(fired());
        // Released: it cannot be re-armed without an engine.
        release();
        assert!(!rearm(Duration::from_millis(2)));
    }

    #[test]
    fn a_timer_due_within_the_budget_is_kept_and_a_later_one_is_not() {
        assert!(available());
        let engine = wasmtime::Engine::default();
        // Due in 40 ms; a callback with a 200 ms budget keeps it...
        assert_eq!(arm(&engine, Duration::from_millis(40)), Armed::Set);
        release();
        assert_eq!(arm(&engine, Duration::from_millis(200)), Armed::Kept);
        sleep_ms(60);
        assert!(fired(), "the kept 40 ms timer did not fire in 60 ms");
        release();
        // ...but one with a 2 ms budget sets it earlier.
        assert_eq!(arm(&engine, Duration::from_secs(10)), Armed::Set);
        release();
        assert_eq!(arm(&engine, Duration::from_millis(2)), Armed::Set);
        sleep_ms(20);
        assert!(fired(), "a timer due in 10 s was kept for a 2 ms budget");
        release();
        // A timer that fired is set again.
        assert_eq!(arm(&engine, Duration::from_millis(2)), Armed::Set);
        assert!(!fired());
        sleep_ms(20);
        assert!(fired());
        release();
    }

    #[test]
    fn tighten_brings_a_later_timer_forward_and_keeps_an_earlier_one() {
        assert!(available());
        let engine = wasmtime::Engine::default();
        // Due in 10 s: brought forward to 2 ms.
        assert_eq!(arm(&engine, Duration::from_secs(10)), Armed::Set);
        assert!(tighten(Duration::from_millis(2)));
        sleep_ms(20);
        assert!(
            fired(),
            "a timer brought forward to 2 ms did not fire in 20 ms"
        );
        // Due in 40 ms: kept for 10 s (not pushed back).
        assert!(rearm(Duration::from_millis(40)));
        let sets = sets();
        assert!(tighten(Duration::from_secs(10)));
        assert_eq!(sets, super::sets(), "a timer due sooner was set again");
        sleep_ms(60);
        assert!(fired(), "the kept 40 ms timer did not fire in 60 ms");
        // Without a callback (released), nothing to bring forward.
        release();
        assert!(!tighten(Duration::from_millis(2)));
    }

    #[test]
    fn each_thread_has_its_own_alarm() {
        assert!(available());
        let engine = wasmtime::Engine::default();
        assert_eq!(arm(&engine, Duration::from_millis(1)), Armed::Set);
        std::thread::scope(|s| {
            s.spawn(|| {
                assert!(!fired(), "a new thread's alarm was never armed");
                sleep_ms(20);
                assert!(!fired(), "another thread's alarm fired this one's");
            });
        });
        assert!(fired());
        release();
    }
}
