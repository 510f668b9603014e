//! One wasm instance of a plugin: its `Store`, the guest exports it offers,
//! the per-store host state the hostcalls read and write, and the host's
//! instance slots.
//!
//! An instance hosts any number of request contexts (as an Envoy VM does).
//! What the host keeps per request lives in a [`ContextState`] that the
//! request owns; it is moved into the store for the duration of each of the
//! request's callbacks and moved out again after, so the store only ever
//! holds the state of the callback that is running.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use wasmtime::{
    Instance, InstancePre, Memory, ResourceLimiter, Store, Trap, TypedFunc, UpdateDeadline,
    WasmParams, WasmResults,
};

use crate::PropertyResolver;
use crate::abi::{HeaderEdit, HeaderList, MapType};
use crate::error::{PluginError, Result};
use crate::metrics::MetricRegistry;
use crate::plugin::{HttpCallRequest, LocalResponse};
use crate::shared::SharedData;

/// State shared by every instance of one plugin.
pub(crate) struct PluginShared {
    pub name: String,
    pub vm_config: Bytes,
    pub plugin_config: Bytes,
    pub metrics: MetricRegistry,
    pub shared_data: SharedData,
    pub host_properties: Option<Arc<dyn PropertyResolver>>,
    pub tick_period_ms: AtomicU32,
    pub memory_limit: usize,
    pub stats: Stats,
    /// The host's coarse clock (the epoch ticker's).
    pub clock: Arc<crate::clamp::Clock>,
    /// The deadline clamp after a missed deadline.
    pub clamp: crate::clamp::Clamp,
    /// The rate limit on `proxy_log` and WASI `fd_write` lines.
    pub log_bucket: parking_lot::Mutex<crate::ratelimit::LogBucket>,
}

/// Failure and lifecycle counters (see [`crate::PluginStats`]).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub callbacks: AtomicU64,
    pub failures: AtomicU64,
    pub traps: AtomicU64,
    pub deadlines: AtomicU64,
    pub memory_limits: AtomicU64,
    pub exits: AtomicU64,
    pub instances_created: AtomicU64,
    pub instances_discarded: AtomicU64,
    pub live_instances: AtomicU64,
    pub live_contexts: AtomicU64,
    pub lost_contexts: AtomicU64,
    pub overloads: AtomicU64,
    pub logs_suppressed: AtomicU64,
}

/// Why `memory.grow` trapped: the plugin's own limit, not an engine error.
#[derive(Debug, thiserror::Error)]
#[error("memory limit of {0} bytes exceeded")]
pub(crate) struct MemoryLimitExceeded(usize);

/// WASI `proc_exit` unwinds the guest with this error.
#[derive(Debug, thiserror::Error)]
#[error("guest called proc_exit({0})")]
pub(crate) struct ProcExit(pub i32);

pub(crate) struct Limiter {
    limit: usize,
    hit: bool,
}

const MAX_TABLE_ELEMENTS: usize = 100_000;

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.hit = true;
            return Err(MemoryLimitExceeded(self.limit).into());
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// A stream-level request the guest made during a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    ContinueRequest,
    ContinueResponse,
    Close,
}

/// What the host keeps for one context between its callbacks: the maps and
/// buffers lent to the guest, what the guest changed or asked for. Owned by
/// the request ([`crate::RequestContext`]); the root context has its own.
#[derive(Default)]
pub(crate) struct ContextState {
    /// Header maps, indexed by `MapType as usize`; `None` = not available now.
    pub maps: [Option<HeaderList>; 8],
    /// What the plugin changed in the request and the response header maps.
    pub request_header_edits: Vec<HeaderEdit>,
    pub response_header_edits: Vec<HeaderEdit>,
    pub request_body: Option<BytesMut>,
    pub response_body: Option<BytesMut>,
    pub http_call_body: Option<Bytes>,
    pub local_response: Option<LocalResponse>,
    pub signal: Option<Signal>,
    pub http_calls: Vec<HttpCallRequest>,
    pub properties: Vec<(Vec<u8>, Vec<u8>)>,
    pub request_properties: Option<Arc<dyn PropertyResolver>>,
    pub done_pending: bool,
}

/// The store data: what hostcalls see.
pub(crate) struct HostState {
    pub plugin: Arc<PluginShared>,
    pub limiter: Limiter,
    pub memory: Option<Memory>,
    pub alloc: Option<TypedFunc<i32, i32>>,
    pub root_id: u32,
    /// The context of the running callback (root or request).
    pub active_id: u32,
    /// The request context whose callback is running, if any.
    pub request_id: Option<u32>,
    pub effective_id: u32,
    /// `proxy_http_call` tokens: unique within the instance, as SDKs keep
    /// one token table per VM.
    pub next_http_token: u32,
    /// The running callback's context state (the root's between callbacks).
    pub ctx: Box<ContextState>,
    /// A buffer for data on its way to the guest, reused between calls.
    pub scratch: Vec<u8>,
    /// Bumped whenever the guest changes a header map or a body: data being
    /// returned to the guest must not change while its allocator runs.
    pub version: u64,
    /// The running callback's CPU-time budget.
    pub deadline: CpuDeadline,
}

impl HostState {
    fn new(plugin: Arc<PluginShared>, deadline: Duration) -> Self {
        let limit = plugin.memory_limit;
        Self {
            plugin,
            limiter: Limiter { limit, hit: false },
            memory: None,
            alloc: None,
            root_id: ROOT_CONTEXT_ID,
            active_id: ROOT_CONTEXT_ID,
            request_id: None,
            effective_id: ROOT_CONTEXT_ID,
            next_http_token: 1,
            ctx: Box::default(),
            scratch: Vec::new(),
            version: 0,
            deadline: CpuDeadline::new(deadline),
        }
    }

    pub(crate) fn map(&self, t: MapType) -> Option<&HeaderList> {
        self.ctx.maps[t as usize].as_ref()
    }

    /// A map the guest is about to change (counted as a change).
    pub(crate) fn map_mut(&mut self, t: MapType) -> Option<&mut HeaderList> {
        self.version = self.version.wrapping_add(1);
        self.ctx.maps[t as usize].as_mut()
    }

    /// Whether changes to map `t` are recorded: only the request and the
    /// response headers, the ones the embedder writes back.
    pub(crate) fn tracks(t: MapType) -> bool {
        matches!(t, MapType::RequestHeaders | MapType::ResponseHeaders)
    }

    /// Records a change to a tracked header map.
    pub(crate) fn log_edit(&mut self, t: MapType, edit: HeaderEdit) {
        let log = match t {
            MapType::RequestHeaders => &mut self.ctx.request_header_edits,
            MapType::ResponseHeaders => &mut self.ctx.response_header_edits,
            _ => return,
        };
        // A whole-map replacement makes the earlier edits moot, and the later
        // ones are in the list it leaves. A guest making edits without end
        // gets one too: the list is the truth, and the log stays bounded.
        if edit == HeaderEdit::ReplaceAll || log.len() >= MAX_HEADER_EDITS {
            log.clear();
            log.push(HeaderEdit::ReplaceAll);
        } else if log.last() != Some(&HeaderEdit::ReplaceAll) {
            log.push(edit);
        }
    }

    /// Moves a request's context state in (for its callback) or back out.
    pub(crate) fn enter(&mut self, state: &mut Box<ContextState>, id: u32) {
        std::mem::swap(&mut self.ctx, state);
        self.request_id = Some(id);
        self.active_id = id;
        self.effective_id = id;
    }

    /// The reverse of [`HostState::enter`]: the root's state is back.
    pub(crate) fn leave(&mut self, state: &mut Box<ContextState>) {
        std::mem::swap(&mut self.ctx, state);
        self.request_id = None;
        self.active_id = self.root_id;
        self.effective_id = self.root_id;
    }
}

/// Edits logged per map before they collapse into a `ReplaceAll`.
const MAX_HEADER_EDITS: usize = 1024;

/// Root context id of every instance; request contexts count up from 2.
pub(crate) const ROOT_CONTEXT_ID: u32 = 1;

type F1 = TypedFunc<i32, ()>;
type F2 = TypedFunc<(i32, i32), ()>;
type F1R = TypedFunc<i32, i32>;
type F2R = TypedFunc<(i32, i32), i32>;
type F3R = TypedFunc<(i32, i32, i32), i32>;
type F5 = TypedFunc<(i32, i32, i32, i32, i32), ()>;

/// The guest's proxy-wasm callbacks. All are optional.
#[derive(Default)]
pub(crate) struct Exports {
    pub initialize: Option<TypedFunc<(), ()>>,
    pub start: Option<TypedFunc<(), ()>>,
    pub on_context_create: Option<F2>,
    pub on_vm_start: Option<F2R>,
    pub on_configure: Option<F2R>,
    pub on_request_headers: Option<F3R>,
    pub on_request_body: Option<F3R>,
    pub on_request_trailers: Option<F2R>,
    pub on_response_headers: Option<F3R>,
    pub on_response_body: Option<F3R>,
    pub on_response_trailers: Option<F2R>,
    pub on_log: Option<F1>,
    pub on_done: Option<F1R>,
    pub on_delete: Option<F1>,
    pub on_tick: Option<F1>,
    pub on_http_call_response: Option<F5>,
}

/// Export names and the signature each must have: (name, params, results).
pub(crate) const CALLBACK_SIGNATURES: &[(&str, usize, usize)] = &[
    ("_initialize", 0, 0),
    ("_start", 0, 0),
    ("proxy_on_memory_allocate", 1, 1),
    ("malloc", 1, 1),
    ("proxy_on_context_create", 2, 0),
    ("proxy_on_vm_start", 2, 1),
    ("proxy_on_configure", 2, 1),
    ("proxy_on_request_headers", 3, 1),
    ("proxy_on_request_body", 3, 1),
    ("proxy_on_request_trailers", 2, 1),
    ("proxy_on_response_headers", 3, 1),
    ("proxy_on_response_body", 3, 1),
    ("proxy_on_response_trailers", 2, 1),
    ("proxy_on_log", 1, 0),
    ("proxy_on_done", 1, 1),
    ("proxy_on_delete", 1, 0),
    ("proxy_on_tick", 1, 0),
    ("proxy_on_http_call_response", 5, 0),
];

/// Why an instance is wanted: it decides which slots it may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// The first instance of a plugin that has none (a load, or a plugin
    /// whose instances were all discarded or evicted): any free slot, then
    /// any idle instance of another plugin, its last one included.
    First,
    /// One more instance for a plugin that has some (it could share them
    /// instead): a free slot that no instance-less plugin needs, or one
    /// freed by evicting a surplus idle instance of another plugin.
    Growth,
    /// A fresh instance for one request (`fresh_instance_per_request`):
    /// as `Growth`.
    Fresh,
}

/// The host's instance slots (`HostConfig::max_instances`, the pooling
/// allocator's size), shared by all its plugins. Idle instances hold slots
/// too: when none is free, an idle instance of another plugin is evicted.
/// A plugin's last instance is evicted only for a plugin that has none, and
/// a plugin growing never takes the free slots such plugins need, so that
/// one plugin's requests (stalled clients, say) cannot starve another.
pub(crate) struct Slots {
    live: AtomicU32,
    max: u32,
    /// Every loaded plugin, for eviction (dropped plugins are pruned).
    plugins: parking_lot::Mutex<Vec<std::sync::Weak<crate::plugin::PluginInner>>>,
}

impl Slots {
    pub(crate) fn new(max: u32) -> Arc<Self> {
        Arc::new(Self {
            live: AtomicU32::new(0),
            max,
            plugins: parking_lot::Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn register(&self, plugin: &Arc<crate::plugin::PluginInner>) {
        let mut all = self.plugins.lock();
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(plugin));
    }

    fn others(
        &self,
        me: *const crate::plugin::PluginInner,
    ) -> Vec<Arc<crate::plugin::PluginInner>> {
        self.plugins
            .lock()
            .iter()
            .filter(|w| !std::ptr::eq(w.as_ptr(), me))
            .filter_map(std::sync::Weak::upgrade)
            .collect()
    }

    /// A free slot, if more than `reserve` are free.
    fn try_take(self: &Arc<Self>, reserve: u32) -> Option<SlotGuard> {
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (u64::from(n) + u64::from(reserve) < u64::from(self.max)).then_some(n + 1)
            })
            .ok()
            .map(|_| SlotGuard(self.clone()))
    }

    /// A slot for a new instance of the plugin at `me` (see [`Need`]).
    pub(crate) fn take(
        self: &Arc<Self>,
        me: *const crate::plugin::PluginInner,
        plugin: &str,
        need: Need,
    ) -> Result<SlotGuard> {
        loop {
            let others = self.others(me);
            let reserve = match need {
                Need::First => 0,
                Need::Growth | Need::Fresh => {
                    others.iter().filter(|p| p.instanceless()).count() as u32
                }
            };
            if let Some(g) = self.try_take(reserve) {
                return Ok(g);
            }
            // Evict one idle instance (dropped outside the pools' locks: the
            // store goes, then its slot), then try again.
            let evicted = others.iter().find_map(|p| p.evict_idle(false)).or_else(|| {
                (need == Need::First)
                    .then(|| others.iter().find_map(|p| p.evict_idle(true)))
                    .flatten()
            });
            if evicted.is_none() {
                return Err(PluginError::Exhausted {
                    plugin: plugin.to_owned(),
                    limit: self.max,
                });
            }
            drop(evicted);
        }
    }
}

/// One taken slot; released when the instance holding it is dropped.
pub(crate) struct SlotGuard(Arc<Slots>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A clamped callback's thread's alarm is due within this (or its budget, if
/// longer): the longest a loop that no other callback checks runs past its
/// budget. Each firing costs its thread about 24 µs on a virtual machine
/// here (setting the timer, its interrupt and the signal: a C loop lost 9%
/// of its work to 3,700 of them a second), and a busy thread's timer fires
/// about once per this time while its plugin is clamped. With the budget
/// (0.25 ms) instead, the clamp alone cost the `plugin` chaos scenario's
/// well-behaved requests about 20% of their throughput.
pub(crate) const ALARM_BACKSTOP: Duration = Duration::from_millis(1);

/// A check that finds an alarmed callback without a CPU-time base younger
/// than this (wall time) reads nothing: nearly every callback ends sooner,
/// and the checks that other callbacks' starts cause land in them. At most
/// half the clamp's floor, so that the credit charged at the first real
/// check (up to half the budget) covers it.
pub(crate) const ALARM_AFTER: Duration = Duration::from_micros(50);

/// Below this much budget left when a clamped callback's alarm fires, the
/// callback is checked at each of its epoch checks instead of by a timer.
const ALARM_POLL: Duration = Duration::from_micros(50);

/// How much more CPU time a clamped callback found over its budget may use
/// before it is cut (see [`CpuDeadline::start_alarmed`]).
const ALARM_CONFIRM: Duration = Duration::from_micros(50);

/// A callback's deadline, in CPU time of the thread that runs it.
///
/// The epoch ticker advances on wall-clock time, so a deadline counted in
/// ticks fails a trivial callback whose thread was descheduled for longer
/// (the soak saw it on a saturated machine). Instead every tick that lands
/// in a callback calls [`CpuDeadline::on_tick`]: the first takes the
/// thread's CPU time as the base, the later ones compare the CPU time used
/// since with the budget. A callback that finishes within its first tick
/// (nearly all) costs nothing more. The CPU used before the first tick is
/// not counted (at most one tick) and the budget is checked once a tick, so
/// a loop is cut after its budget plus at most two ticks of CPU.
#[derive(Debug)]
pub(crate) struct CpuDeadline {
    budget: Duration,
    /// The thread's CPU time (or the wall clock, where that cannot be read)
    /// at the running callback's first tick.
    base: Option<Sample>,
    /// What a clamped callback is charged for its time before that tick.
    credit: Duration,
    /// For a clamped callback: when it started.
    started: Option<Instant>,
    /// The thread's alarm is armed for the running callback (see
    /// [`crate::alarm`]).
    alarmed: bool,
    /// A tick (or the alarm) landed in the running callback.
    ticked: bool,
    /// The CPU time an alarmed callback had used when a check first found
    /// it over its budget.
    over: Option<Duration>,
    /// The thread's alarm was brought forward for this callback (see
    /// [`Self::tighten_once`]).
    tightened: bool,
}

/// A reading of the clock a [`CpuDeadline`] counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Sample {
    Cpu(Duration),
    Wall(Instant),
}

impl Sample {
    /// The time from `base` to `self`; `None` if the clock changed kind.
    fn since(self, base: Sample) -> Option<Duration> {
        match (base, self) {
            (Sample::Cpu(b), Sample::Cpu(n)) => Some(n.saturating_sub(b)),
            (Sample::Wall(b), Sample::Wall(n)) => Some(n.saturating_duration_since(b)),
            _ => None,
        }
    }
}

impl CpuDeadline {
    pub(crate) fn new(budget: Duration) -> Self {
        Self {
            budget,
            base: None,
            credit: Duration::ZERO,
            started: None,
            alarmed: false,
            ticked: false,
            over: None,
            tightened: false,
        }
    }

    /// A callback starts with `budget`: its CPU time counts from its first
    /// tick.
    pub(crate) fn start(&mut self, budget: Duration) {
        self.budget = budget;
        self.base = None;
        self.credit = Duration::ZERO;
        self.started = None;
        self.alarmed = false;
        self.ticked = false;
        self.over = None;
        self.tightened = false;
    }

    /// A clamped callback starts with `budget`, at `started`, with its
    /// thread's alarm armed (see [`crate::alarm`]); `cpu` is its thread's CPU
    /// time if it set the timer itself, `None` if it kept one set earlier.
    ///
    /// With `cpu`, every check counts the CPU time from its start, so a
    /// callback descheduled meanwhile is never charged for it. Without,
    /// checks that find it younger than [`ALARM_AFTER`] do nothing (see
    /// [`Self::young`]); the first that does not takes the CPU time as its
    /// base and charges the wall time before, up to half the budget (as
    /// [`Self::start_clamped`]). Once a check finds it over its budget, it
    /// is checked at each of its epoch checks, and cut when it has used
    /// [`ALARM_CONFIRM`] more: a loop goes on using CPU, while a callback of
    /// microseconds that a check found over its budget was charged for a
    /// hiccup (on a virtual machine, the thread's CPU clock can jump by a
    /// millisecond, the time its virtual CPU was stopped) and ends first.
    pub(crate) fn start_alarmed(
        &mut self,
        budget: Duration,
        cpu: Option<Sample>,
        started: Instant,
    ) {
        self.start(budget);
        self.base = cpu;
        self.started = Some(started);
        self.alarmed = true;
    }

    /// Whether the running callback is alarmed, has no CPU-time base yet,
    /// and started less than [`ALARM_AFTER`] before `now`: a check that
    /// lands in it has nothing to do.
    pub(crate) fn young(&self, now: Instant) -> bool {
        self.alarmed
            && self.base.is_none()
            && self
                .started
                .is_some_and(|t0| now.saturating_duration_since(t0) < ALARM_AFTER)
    }

    /// Whether the thread's alarm should be brought forward for the running
    /// (alarmed) callback now: the first time a check finds it older than
    /// [`ALARM_AFTER`]. Its timer was kept from an earlier callback, or set
    /// for the backstop; nearly every callback ends sooner, so only a
    /// long one (a loop) sets the timer again.
    pub(crate) fn tighten_once(&mut self, now: Instant) -> bool {
        if !self.alarmed || self.tightened {
            return false;
        }
        let old = self
            .started
            .is_some_and(|t0| now.saturating_duration_since(t0) >= ALARM_AFTER);
        self.tightened = old;
        old
    }

    /// The CPU time the callback was charged at `now` (what it used since
    /// its first tick, or since its start when alarmed, and the credit for
    /// the time before); `None` if no tick landed in it.
    pub(crate) fn charged(&self, now: Sample) -> Option<Duration> {
        self.used(now).map(|u| u + self.credit)
    }

    /// For a clamped callback, the wall time since it started.
    pub(crate) fn since_start(&self) -> Option<Duration> {
        self.started.map(|t0| t0.elapsed())
    }

    /// What is left of the budget at `now`: the wall time until the budget
    /// can have been used.
    pub(crate) fn left(&self, now: Sample) -> Duration {
        let used = self.base.and_then(|b| now.since(b)).unwrap_or_default() + self.credit;
        self.budget.saturating_sub(used)
    }

    /// Whether a tick (or the alarm) landed in the running callback.
    pub(crate) fn ticked(&self) -> bool {
        self.ticked
    }

    /// Whether a check found the running (alarmed) callback over its budget.
    pub(crate) fn over(&self) -> bool {
        self.over.is_some()
    }

    /// Whether the running callback has the thread's alarm armed.
    pub(crate) fn alarmed(&self) -> bool {
        self.alarmed
    }

    /// A clamped callback starts with `budget`, at `now`: the wall time to
    /// its first tick counts too, up to half the budget, so that a loop is
    /// not granted the CPU it burns before that tick. Reading the thread's
    /// CPU time here would cost a system call per callback; the wall clock
    /// is read in user space, and a thread descheduled before its first
    /// tick is charged at most half its budget for it.
    pub(crate) fn start_clamped(&mut self, budget: Duration, now: Instant) {
        self.budget = budget;
        self.base = None;
        self.credit = Duration::ZERO;
        self.started = Some(now);
        self.alarmed = false;
        self.ticked = false;
        self.over = None;
        self.tightened = false;
    }

    /// The running (or last) callback's budget.
    pub(crate) fn budget(&self) -> Duration {
        self.budget
    }

    /// The CPU time the callback used from its first tick to `now` (not
    /// counting what a clamped callback was charged for the time before
    /// it); `None` if no tick landed in it (it took less than a tick).
    pub(crate) fn used(&self, now: Sample) -> Option<Duration> {
        self.base.filter(|_| self.ticked).and_then(|b| now.since(b))
    }

    /// An epoch tick landed in the running callback; `now` is its thread's
    /// clock. Interrupts once the callback used its budget since its first
    /// tick, else asks to be called at the next tick.
    pub(crate) fn on_tick(&mut self, now: Sample) -> UpdateDeadline {
        self.ticked = true;
        if self.alarmed && self.base.is_none() {
            // The first check of a callback that kept its thread's timer:
            // the base, and the wall time before it charged (at most half
            // the budget, so that this check alone never cuts it).
            self.credit = self
                .started
                .map(|t0| t0.elapsed().min(self.budget / 2))
                .unwrap_or_default();
            self.base = Some(now);
            return UpdateDeadline::Continue(1);
        }
        if self.alarmed
            && let Some(Some(used)) = self.base.map(|b| now.since(b).map(|u| u + self.credit))
        {
            if used < self.budget {
                return UpdateDeadline::Continue(1);
            }
            let over = *self.over.get_or_insert(used);
            if used >= over + ALARM_CONFIRM {
                return UpdateDeadline::Interrupt;
            }
            return UpdateDeadline::Continue(0);
        }
        let used = match self.base.map(|b| now.since(b)) {
            Some(Some(used)) => used + self.credit,
            // The first tick, or the clock changed kind mid-callback: count
            // from here.
            None | Some(None) => {
                // Never more than half the budget: the first tick alone
                // never cuts a callback.
                if let (None, Some(t0)) = (self.base, self.started) {
                    self.credit = t0.elapsed().min(self.budget / 2);
                }
                self.base = Some(now);
                return UpdateDeadline::Continue(1);
            }
        };
        if used >= self.budget {
            UpdateDeadline::Interrupt
        } else {
            UpdateDeadline::Continue(1)
        }
    }
}

/// The calling thread's CPU time, or the wall clock where it cannot be read.
pub(crate) fn thread_cpu_time() -> Sample {
    use nix::time::{ClockId, clock_gettime};
    match clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID) {
        Ok(ts) => Sample::Cpu(Duration::from(ts)),
        Err(_) => Sample::Wall(Instant::now()),
    }
}

/// A live instance with its own store, root context and memory.
pub(crate) struct PluginInstance {
    pub store: Store<HostState>,
    pub exports: Exports,
    next_context_id: u32,
    /// The configured deadline of a callback.
    deadline: Duration,
    /// Running the set-up callbacks (`_initialize`, `proxy_on_vm_start`,
    /// `proxy_on_configure`...): the deadline clamp does not apply.
    setup: bool,
    /// Whether the running (or last) callback's deadline was clamped.
    clamped: bool,
    /// Last: fields drop in order, so the slot is released after the store
    /// has given its memory back to the pool.
    _slot: SlotGuard,
}

impl Drop for PluginInstance {
    fn drop(&mut self) {
        self.store
            .data()
            .plugin
            .stats
            .live_instances
            .fetch_sub(1, Ordering::Relaxed);
    }
}

fn typed<P: WasmParams, R: WasmResults>(
    store: &mut Store<HostState>,
    instance: &Instance,
    name: &str,
) -> Result<Option<TypedFunc<P, R>>> {
    match instance.get_export(&mut *store, name) {
        None => Ok(None),
        Some(ext) => {
            let func = ext.into_func().ok_or_else(|| PluginError::InvalidAbi {
                plugin: store.data().plugin.name.clone(),
                message: format!("export {name} is not a function"),
            })?;
            func.typed::<P, R>(&*store)
                .map(Some)
                .map_err(|e| PluginError::InvalidAbi {
                    plugin: store.data().plugin.name.clone(),
                    message: format!("export {name} has the wrong signature: {e}"),
                })
        }
    }
}

impl PluginInstance {
    /// Instantiate from the pre-linked module, then run the integration and
    /// root-context callbacks: `_initialize` (or `_start`),
    /// `proxy_on_context_create(root, 0)`, `proxy_on_vm_start`, `proxy_on_configure`.
    pub(crate) fn new(
        plugin: &Arc<PluginShared>,
        pre: &InstancePre<HostState>,
        deadline: Duration,
        slot: SlotGuard,
    ) -> Result<Self> {
        let engine = pre.module().engine();
        let mut store = Store::new(engine, HostState::new(plugin.clone(), deadline));
        store.limiter(|s| &mut s.limiter);
        // Every epoch tick that lands in a callback asks its CPU-time budget.
        // A clamped callback's alarm is a tick too; when it finds budget
        // left (the thread was off its CPU), it is armed again for that.
        store.epoch_deadline_callback(|mut cx| {
            let deadline = &mut cx.data_mut().deadline;
            if deadline.young(Instant::now()) {
                // An alarmed callback younger than `ALARM_AFTER`, checked
                // because another callback started (or a tick): it has not
                // used its budget, and nothing is read. If its own thread's
                // timer fired (one kept from an earlier callback), it is
                // set again, so that this callback keeps its backstop.
                if crate::alarm::fired() {
                    crate::alarm::rearm(deadline.budget().max(ALARM_BACKSTOP));
                }
                return Ok(UpdateDeadline::Continue(1));
            }
            let now = thread_cpu_time();
            let update = deadline.on_tick(now);
            if deadline.alarmed() && matches!(update, UpdateDeadline::Continue(_)) {
                if deadline.over() {
                    // Over its budget: checked at every epoch check until it
                    // has used `ALARM_CONFIRM` more, or ends.
                    return Ok(update);
                }
                if crate::alarm::fired() {
                    let left = deadline.left(now);
                    if left < ALARM_POLL {
                        // Too little left for a timer (setting it takes
                        // microseconds on a virtual machine): check at
                        // every epoch check until it is used (the mark
                        // stays set, so every check comes back here).
                        return Ok(UpdateDeadline::Continue(0));
                    }
                    crate::alarm::rearm(left);
                } else if deadline.tighten_once(Instant::now()) {
                    // A callback that outlived `ALARM_AFTER` (a loop, nearly
                    // always) has its thread's timer brought forward, once,
                    // to when it can have used its budget. Without, a loop
                    // that other callbacks' starts checked once or twice
                    // then ran to the backstop (loops at p90 0.45-0.93 ms
                    // and p99 about 1 ms of CPU, with a 0.25 ms budget).
                    // However little is left: the checks that follow need
                    // not come back here.
                    crate::alarm::tighten(deadline.left(now));
                }
                // An alarm that fired while this ran advanced the epoch
                // before the deadline below is set from it: that advance
                // is spent, so check again at once.
                if crate::alarm::fired() {
                    return Ok(UpdateDeadline::Continue(0));
                }
            }
            Ok(update)
        });
        store.data_mut().deadline.start(deadline);
        store.set_epoch_deadline(1);
        let instance = pre.instantiate(&mut store).map_err(|e| {
            if store.data().limiter.hit {
                PluginError::MemoryLimit {
                    plugin: plugin.name.clone(),
                    callback: "instantiate",
                    limit_bytes: plugin.memory_limit,
                }
            } else {
                PluginError::Instantiate {
                    plugin: plugin.name.clone(),
                    message: format!("{e:#}"),
                }
            }
        })?;
        plugin
            .stats
            .instances_created
            .fetch_add(1, Ordering::Relaxed);
        plugin.stats.live_instances.fetch_add(1, Ordering::Relaxed);
        let memory = instance.get_memory(&mut store, "memory");
        let alloc = match typed::<i32, i32>(&mut store, &instance, "proxy_on_memory_allocate")? {
            Some(f) => Some(f),
            None => typed::<i32, i32>(&mut store, &instance, "malloc")?,
        };
        let exports = Exports {
            initialize: typed(&mut store, &instance, "_initialize")?,
            start: typed(&mut store, &instance, "_start")?,
            on_context_create: typed(&mut store, &instance, "proxy_on_context_create")?,
            on_vm_start: typed(&mut store, &instance, "proxy_on_vm_start")?,
            on_configure: typed(&mut store, &instance, "proxy_on_configure")?,
            on_request_headers: typed(&mut store, &instance, "proxy_on_request_headers")?,
            on_request_body: typed(&mut store, &instance, "proxy_on_request_body")?,
            on_request_trailers: typed(&mut store, &instance, "proxy_on_request_trailers")?,
            on_response_headers: typed(&mut store, &instance, "proxy_on_response_headers")?,
            on_response_body: typed(&mut store, &instance, "proxy_on_response_body")?,
            on_response_trailers: typed(&mut store, &instance, "proxy_on_response_trailers")?,
            on_log: typed(&mut store, &instance, "proxy_on_log")?,
            on_done: typed(&mut store, &instance, "proxy_on_done")?,
            on_delete: typed(&mut store, &instance, "proxy_on_delete")?,
            on_tick: typed(&mut store, &instance, "proxy_on_tick")?,
            on_http_call_response: typed(&mut store, &instance, "proxy_on_http_call_response")?,
        };
        {
            let st = store.data_mut();
            st.memory = memory;
            st.alloc = alloc;
        }
        let mut this = Self {
            store,
            exports,
            next_context_id: ROOT_CONTEXT_ID + 1,
            deadline,
            setup: true,
            clamped: false,
            _slot: slot,
        };
        let root = ROOT_CONTEXT_ID as i32;
        if this.exports.initialize.is_some() {
            this.call_export("_initialize", |e| e.initialize.as_ref(), ())?;
        } else {
            this.call_export("_start", |e| e.start.as_ref(), ())?;
        }
        this.call_export(
            "proxy_on_context_create",
            |e| e.on_context_create.as_ref(),
            (root, 0),
        )?;
        let vm_size = plugin.vm_config.len() as i32;
        if this.call_export(
            "proxy_on_vm_start",
            |e| e.on_vm_start.as_ref(),
            (root, vm_size),
        )? == Some(0)
        {
            return Err(PluginError::ConfigureRejected {
                plugin: plugin.name.clone(),
                callback: "proxy_on_vm_start",
            });
        }
        let size = plugin.plugin_config.len() as i32;
        if this.call_export(
            "proxy_on_configure",
            |e| e.on_configure.as_ref(),
            (root, size),
        )? == Some(0)
        {
            return Err(PluginError::ConfigureRejected {
                plugin: plugin.name.clone(),
                callback: "proxy_on_configure",
            });
        }
        // Whatever the set-up callbacks left (a local response, queued
        // calls...) means nothing for the root context.
        *this.store.data_mut().ctx = ContextState::default();
        this.setup = false;
        Ok(this)
    }

    /// A fresh request context id, unique within this instance.
    pub(crate) fn next_context_id(&mut self) -> u32 {
        let id = self.next_context_id;
        self.next_context_id = match id.wrapping_add(1) {
            n if n <= ROOT_CONTEXT_ID => ROOT_CONTEXT_ID + 1,
            n => n,
        };
        id
    }

    /// Calls the guest export `pick` selects (`Ok(None)` if the guest does
    /// not have it) under the callback deadline, and turns any failure into
    /// a typed, counted error. The function is borrowed, not cloned: cloning
    /// a `TypedFunc` takes a reference on its registered type, and this runs
    /// per callback.
    pub(crate) fn call_export<P: WasmParams, R: WasmResults>(
        &mut self,
        callback: &'static str,
        pick: fn(&Exports) -> Option<&TypedFunc<P, R>>,
        args: P,
    ) -> Result<Option<R>> {
        let Some(func) = pick(&self.exports) else {
            return Ok(None);
        };
        self.store
            .data()
            .plugin
            .stats
            .callbacks
            .fetch_add(1, Ordering::Relaxed);
        let (budget, clamped) = if self.setup {
            (self.deadline, false)
        } else {
            let plugin = &self.store.data().plugin;
            plugin.clamp.deadline(self.deadline, plugin.clock.now_ms())
        };
        self.clamped = clamped;
        let now = Instant::now();
        if clamped {
            // Every callback of a clamped plugin is an epoch tick for the
            // callbacks running on other threads (a loop among them): on a
            // busy machine, a loop is checked within microseconds of each
            // of these, and cut about as soon as it has used its budget.
            // (A relaxed `fetch_add`; the checks it causes in the quick
            // callbacks running elsewhere read no clock but the wall one.)
            self.store.engine().increment_epoch();
        }
        // The deadline is set before the alarm is armed: an alarm that
        // fires at once (a timer kept from an earlier callback) must find
        // its epoch advance counted against it, not spent by setting it.
        self.store.set_epoch_deadline(1);
        // A clamped callback also has its thread's alarm due within
        // `ALARM_BACKSTOP` (or its budget, if longer), for a loop that no
        // other callback checks (a quiet machine, or all its threads in
        // loops). A timer already due in that time is kept. Only a callback
        // that sets the timer reads its thread's CPU time at its start (a
        // system call: read by every callback, it was one per callback);
        // the others read it at their first check that finds them older
        // than `ALARM_AFTER` (see `CpuDeadline::start_alarmed`).
        let armed = if clamped {
            crate::alarm::arm(self.store.engine(), budget.max(ALARM_BACKSTOP))
        } else {
            crate::alarm::Armed::Unavailable
        };
        let alarmed = armed != crate::alarm::Armed::Unavailable;
        if alarmed {
            let cpu = (armed == crate::alarm::Armed::Set).then(thread_cpu_time);
            self.store
                .data_mut()
                .deadline
                .start_alarmed(budget, cpu, now);
        } else if clamped {
            // Without the alarm: the epoch ticks, and the other threads'
            // callbacks (above), check it.
            self.store.data_mut().deadline.start_clamped(budget, now);
        } else {
            self.store.data_mut().deadline.start(budget);
        }
        self.store.data_mut().limiter.hit = false;
        let r = func.call(&mut self.store, args);
        if alarmed {
            crate::alarm::release();
        }
        match r {
            Ok(r) => {
                // A callback an epoch tick (or its alarm) landed in tells
                // the clamp what the plugin needs; the CPU time is read
                // only then. Set-up callbacks (never clamped) do not count,
                // nor one a check found over its budget that ended before
                // it was cut (a hiccup of its thread's CPU clock, which
                // would hold the clamp wide open).
                let st = self.store.data();
                if !self.setup
                    && st.deadline.ticked()
                    && !st.deadline.over()
                    && let Some(used) = st.deadline.used(thread_cpu_time())
                {
                    st.plugin.clamp.succeeded(used, st.plugin.clock.now_ms());
                }
                Ok(Some(r))
            }
            Err(e) => Err(self.classify(callback, e)),
        }
    }

    fn classify(&self, callback: &'static str, e: wasmtime::Error) -> PluginError {
        let st = self.store.data();
        let plugin = st.plugin.name.clone();
        let stats = &st.plugin.stats;
        stats.failures.fetch_add(1, Ordering::Relaxed);
        if st.limiter.hit || e.is::<MemoryLimitExceeded>() {
            stats.memory_limits.fetch_add(1, Ordering::Relaxed);
            return PluginError::MemoryLimit {
                plugin,
                callback,
                limit_bytes: st.limiter.limit,
            };
        }
        if let Some(exit) = e.downcast_ref::<ProcExit>() {
            stats.exits.fetch_add(1, Ordering::Relaxed);
            return PluginError::Exited {
                plugin,
                callback,
                code: exit.0,
            };
        }
        if let Some(Trap::Interrupt) = e.downcast_ref::<Trap>() {
            stats.deadlines.fetch_add(1, Ordering::Relaxed);
            let shared = &st.plugin;
            shared.clamp.missed(shared.clock.now_ms());
            return PluginError::DeadlineExceeded {
                plugin,
                callback,
                deadline: st.deadline.budget(),
                clamped: self.clamped,
                used: st.deadline.charged(thread_cpu_time()),
                since_start: st.deadline.since_start(),
            };
        }
        stats.traps.fetch_add(1, Ordering::Relaxed);
        PluginError::Trap {
            plugin,
            callback,
            message: format!("{e:#}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(ms: u64) -> Sample {
        Sample::Cpu(Duration::from_millis(ms))
    }

    fn interrupts(u: UpdateDeadline) -> bool {
        matches!(u, UpdateDeadline::Interrupt)
    }

    #[test]
    fn a_descheduled_callback_is_not_failed() {
        // The wall clock runs on (a tick every call) but the thread uses no CPU.
        let mut d = CpuDeadline::new(Duration::from_millis(5));
        d.start(Duration::from_millis(5));
        for _ in 0..1000 {
            assert!(!interrupts(d.on_tick(cpu(100))));
        }
    }

    #[test]
    fn a_callback_is_cut_once_it_used_its_budget_since_its_first_tick() {
        let mut d = CpuDeadline::new(Duration::from_millis(5));
        d.start(Duration::from_millis(5));
        assert!(!interrupts(d.on_tick(cpu(100)))); // the base
        assert!(!interrupts(d.on_tick(cpu(101))));
        assert!(!interrupts(d.on_tick(cpu(104))));
        assert!(interrupts(d.on_tick(cpu(105))));
    }

    #[test]
    fn each_callback_counts_from_its_own_first_tick() {
        let mut d = CpuDeadline::new(Duration::from_millis(5));
        d.start(Duration::from_millis(5));
        assert!(!interrupts(d.on_tick(cpu(100))));
        assert!(!interrupts(d.on_tick(cpu(104))));
        d.start(Duration::from_millis(5));
        assert!(!interrupts(d.on_tick(cpu(200))));
        assert!(!interrupts(d.on_tick(cpu(204))));
        assert!(interrupts(d.on_tick(cpu(206))));
    }

    #[test]
    fn a_clamped_callback_is_charged_the_time_before_its_first_tick() {
        let mut d = CpuDeadline::new(Duration::from_millis(50));
        // Started 300 µs ago: charged min(300 µs, half the 1 ms budget) =
        // 300 µs at its first tick.
        let started = Instant::now() - Duration::from_micros(300);
        d.start_clamped(Duration::from_millis(1), started);
        assert!(!interrupts(d.on_tick(cpu(100))));
        // The charge counts against the budget, not in what it used.
        assert_eq!(d.used(cpu(100)), Some(Duration::ZERO));
        assert!(!interrupts(d.on_tick(Sample::Cpu(
            Duration::from_millis(100) + Duration::from_micros(600)
        ))));
        assert!(interrupts(d.on_tick(Sample::Cpu(
            Duration::from_millis(100) + Duration::from_micros(750)
        ))));
    }

    #[test]
    fn a_clamped_callback_descheduled_before_its_first_tick_is_charged_little() {
        let mut d = CpuDeadline::new(Duration::from_millis(50));
        // Off its CPU for a second before its first tick: charged half the
        // budget at most, and never cut by the first tick.
        let started = Instant::now() - Duration::from_secs(1);
        d.start_clamped(Duration::from_millis(1), started);
        assert!(!interrupts(d.on_tick(cpu(100))));
        assert!(!interrupts(d.on_tick(Sample::Cpu(
            Duration::from_millis(100) + Duration::from_micros(400)
        ))));
        assert!(interrupts(d.on_tick(Sample::Cpu(
            Duration::from_millis(100) + Duration::from_micros(500)
        ))));
        // An unclamped start forgets the credit.
        d.start(Duration::from_millis(1));
        assert!(!interrupts(d.on_tick(cpu(200))));
        assert_eq!(d.used(cpu(200)), Some(Duration::ZERO));
    }

    #[test]
    fn an_alarmed_callback_counts_from_its_start_and_is_cut_once_it_used_more_past_its_budget() {
        let mut d = CpuDeadline::new(Duration::from_millis(50));
        let us = |n: u64| Sample::Cpu(Duration::from_micros(n));
        d.start_alarmed(Duration::from_micros(500), Some(us(1_000)), Instant::now());
        // Under its budget: continues, with what is left.
        assert!(!interrupts(d.on_tick(us(1_300))));
        assert!(!d.over());
        assert_eq!(d.left(us(1_300)), Duration::from_micros(200));
        // Over it: not yet cut, but checked at every epoch check...
        assert!(matches!(d.on_tick(us(1_500)), UpdateDeadline::Continue(0)));
        assert!(d.over());
        assert_eq!(d.left(us(1_500)), Duration::ZERO);
        assert!(!interrupts(d.on_tick(us(1_540))));
        // ...and cut once it has used 50 µs more.
        assert!(interrupts(d.on_tick(us(1_550))));
        assert_eq!(d.charged(us(1_550)), Some(Duration::from_micros(550)));
        // A hiccup: found far over once, then the callback ends before it
        // has used 50 µs more.
        d.start_alarmed(Duration::from_micros(500), Some(us(10_000)), Instant::now());
        assert!(!interrupts(d.on_tick(us(11_200))));
        assert!(!interrupts(d.on_tick(us(11_210))));
        assert!(d.over());
        // The next callback starts afresh.
        d.start_alarmed(Duration::from_micros(500), Some(us(20_000)), Instant::now());
        assert!(!d.over());
        assert!(!interrupts(d.on_tick(us(20_600))));
        // Unclamped callbacks are not alarmed.
        d.start(Duration::from_micros(500));
        assert!(!d.alarmed() && !d.over());
    }

    #[test]
    fn an_alarmed_callback_that_kept_its_threads_timer_takes_its_base_at_its_first_check() {
        let mut d = CpuDeadline::new(Duration::from_millis(50));
        let us = |n: u64| Sample::Cpu(Duration::from_micros(n));
        // Just started: a check finds it young, and reads nothing.
        let now = Instant::now();
        d.start_alarmed(Duration::from_micros(250), None, now);
        assert!(d.young(now + ALARM_AFTER / 2));
        assert!(!d.young(now + ALARM_AFTER));
        // Started 80 µs ago: its first check takes the base and charges
        // those 80 µs, so it is over after 170 µs more, and cut once it
        // has used 50 µs past that.
        d.start_alarmed(
            Duration::from_micros(250),
            None,
            Instant::now() - Duration::from_micros(80),
        );
        assert!(!d.young(Instant::now()));
        assert!(!interrupts(d.on_tick(us(1_000))));
        assert!(d.ticked() && !d.over());
        assert_eq!(d.used(us(1_000)), Some(Duration::ZERO));
        assert!(d.charged(us(1_000)) >= Some(Duration::from_micros(80)));
        assert!(d.left(us(1_000)) <= Duration::from_micros(170));
        assert!(!interrupts(d.on_tick(us(1_100))));
        assert!(matches!(d.on_tick(us(1_200)), UpdateDeadline::Continue(0)));
        assert!(d.over());
        assert!(interrupts(d.on_tick(us(1_250))));
        // Off its CPU for a second before its first check: charged half
        // its budget, no more.
        d.start_alarmed(
            Duration::from_micros(250),
            None,
            Instant::now() - Duration::from_secs(1),
        );
        assert!(!interrupts(d.on_tick(us(5_000))));
        assert_eq!(d.charged(us(5_000)), Some(Duration::from_micros(125)));
        assert!(!interrupts(d.on_tick(us(5_100))));
        assert!(!d.over());
        // A callback that set the timer counts from its start, never young.
        d.start_alarmed(Duration::from_micros(250), Some(us(9_000)), Instant::now());
        assert!(!d.young(Instant::now()));
        assert!(matches!(d.on_tick(us(9_260)), UpdateDeadline::Continue(0)));
        assert!(d.over());
    }

    #[test]
    fn an_alarmed_callback_brings_its_timer_forward_once_when_it_is_old() {
        let t0 = Instant::now();
        let mut d = CpuDeadline::new(Duration::from_micros(250));
        // Not alarmed: never.
        d.start(Duration::from_micros(250));
        assert!(!d.tighten_once(t0 + ALARM_AFTER * 4));
        d.start_clamped(Duration::from_micros(250), t0);
        assert!(!d.tighten_once(t0 + ALARM_AFTER * 4));
        // Alarmed: not while young, then once.
        d.start_alarmed(Duration::from_micros(250), None, t0);
        assert!(!d.tighten_once(t0 + ALARM_AFTER / 2));
        assert!(d.tighten_once(t0 + ALARM_AFTER));
        assert!(!d.tighten_once(t0 + ALARM_AFTER * 2));
        // The next callback may again.
        d.start_alarmed(Duration::from_micros(250), Some(cpu(1)), t0);
        assert!(d.tighten_once(t0 + ALARM_AFTER * 2));
    }

    #[test]
    fn the_wall_clock_stands_in_when_cpu_time_cannot_be_read() {
        let t = Instant::now();
        let mut d = CpuDeadline::new(Duration::from_millis(5));
        d.start(Duration::from_millis(5));
        assert!(!interrupts(d.on_tick(Sample::Wall(t))));
        assert!(!interrupts(
            d.on_tick(Sample::Wall(t + Duration::from_millis(4)))
        ));
        assert!(interrupts(
            d.on_tick(Sample::Wall(t + Duration::from_millis(5)))
        ));
        // A change of clock mid-callback restarts the count.
        d.start(Duration::from_millis(5));
        assert!(!interrupts(d.on_tick(cpu(1))));
        assert!(!interrupts(d.on_tick(Sample::Wall(t))));
        assert!(interrupts(
            d.on_tick(Sample::Wall(t + Duration::from_millis(6)))
        ));
    }

    #[test]
    fn thread_cpu_time_reads_the_threads_cpu_clock() {
        let Sample::Cpu(a) = thread_cpu_time() else {
            panic!("CLOCK_THREAD_CPUTIME_ID is readable on Linux");
        };
        let mut x = 0u64;
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let Sample::Cpu(b) = thread_cpu_time() else {
            panic!("CLOCK_THREAD_CPUTIME_ID is readable on Linux");
        };
        assert!(b > a, "{a:?} -> {b:?}");
        // A sleeping thread uses (almost) no CPU: the clock is not the wall
        // clock (the bound is loose: this only tells the two clocks apart).
        std::thread::sleep(Duration::from_millis(60));
        let Sample::Cpu(c) = thread_cpu_time() else {
            panic!("CLOCK_THREAD_CPUTIME_ID is readable on Linux");
        };
        assert!(
            c.saturating_sub(b) < Duration::from_millis(40),
            "{b:?} -> {c:?}"
        );
    }
}
