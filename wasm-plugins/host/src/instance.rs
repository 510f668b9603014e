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
    /// The engine counts fuel ([`crate::HostConfig::fuel`]).
    pub fuel: bool,
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

/// The fuel of a callback that is not clamped: no limit (the VM counts fuel
/// in an `i64`). Its use is still counted, for the clamp's peaks.
pub(crate) const UNLIMITED_FUEL: u64 = i64::MAX as u64;

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
/// a loop is cut after its budget plus at most two ticks of CPU. (A clamped
/// plugin's callbacks are cut by their fuel long before: see `clamp`.)
#[derive(Debug)]
pub(crate) struct CpuDeadline {
    budget: Duration,
    /// The thread's CPU time (or the wall clock, where that cannot be read)
    /// at the running callback's first tick.
    base: Option<Sample>,
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
        Self { budget, base: None }
    }

    /// A callback starts with `budget`: its CPU time counts from its first
    /// tick.
    pub(crate) fn start(&mut self, budget: Duration) {
        self.budget = budget;
        self.base = None;
    }

    /// The running (or last) callback's budget.
    pub(crate) fn budget(&self) -> Duration {
        self.budget
    }

    /// The CPU time the callback used from its first tick to `now`; `None`
    /// if no tick landed in it (it took less than a tick).
    pub(crate) fn used(&self, now: Sample) -> Option<Duration> {
        self.base.and_then(|b| now.since(b))
    }

    /// An epoch tick landed in the running callback; `now` is its thread's
    /// clock. Interrupts once the callback used its budget since its first
    /// tick, else asks to be called at the next tick.
    pub(crate) fn on_tick(&mut self, now: Sample) -> UpdateDeadline {
        match self.base.map(|b| now.since(b)) {
            Some(Some(used)) if used >= self.budget => UpdateDeadline::Interrupt,
            Some(Some(_)) => UpdateDeadline::Continue(1),
            // The first tick, or the clock changed kind mid-callback: count
            // from here.
            None | Some(None) => {
                self.base = Some(now);
                UpdateDeadline::Continue(1)
            }
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

/// The store's fuel could not be set or read: only when the engine does not
/// count fuel, and then the host does not ask (`HostConfig::fuel`).
fn engine_err(e: wasmtime::Error) -> PluginError {
    PluginError::Engine(format!("{e:#}"))
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
        store.epoch_deadline_callback(|mut cx| {
            let now = thread_cpu_time();
            Ok(cx.data_mut().deadline.on_tick(now))
        });
        store.data_mut().deadline.start(deadline);
        store.set_epoch_deadline(1);
        if plugin.fuel {
            store.set_fuel(UNLIMITED_FUEL).map_err(engine_err)?;
        }
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
        // A clamped plugin's callback gets its clamp's fuel; any other, no
        // limit. Either way the fuel it used is read after, for the clamp's
        // peaks: two loads of the store's counter, no clock.
        let plugin = &self.store.data().plugin;
        let clamped = if self.setup {
            None
        } else {
            plugin.clamp.fuel(plugin.clock.now_ms())
        };
        let fuel = plugin.fuel;
        let given = clamped.unwrap_or(UNLIMITED_FUEL);
        if fuel {
            self.store.set_fuel(given).map_err(engine_err)?;
        }
        self.store.set_epoch_deadline(1);
        self.store.data_mut().deadline.start(self.deadline);
        self.store.data_mut().limiter.hit = false;
        let r = func.call(&mut self.store, args);
        match r {
            Ok(r) => {
                // Set-up callbacks (never clamped) do not count: they run
                // once per instance, not per request.
                if fuel && !self.setup {
                    let left = self.store.get_fuel().map_err(engine_err)?;
                    let st = self.store.data();
                    st.plugin
                        .clamp
                        .succeeded(given.saturating_sub(left), st.plugin.clock.now_ms());
                }
                Ok(Some(r))
            }
            Err(e) => Err(self.classify(callback, e, clamped)),
        }
    }

    /// `fuel`: the clamped callback's fuel (`None`: not clamped).
    fn classify(
        &self,
        callback: &'static str,
        e: wasmtime::Error,
        fuel: Option<u64>,
    ) -> PluginError {
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
        if let Some(trap @ (Trap::OutOfFuel | Trap::Interrupt)) = e.downcast_ref::<Trap>() {
            // Out of a clamped budget's fuel, or past the CPU-time deadline:
            // both are missed deadlines, and (re)start the clamp.
            stats.deadlines.fetch_add(1, Ordering::Relaxed);
            st.plugin.clamp.missed(st.plugin.clock.now_ms());
            return if *trap == Trap::OutOfFuel {
                PluginError::FuelExhausted {
                    plugin,
                    callback,
                    fuel: fuel.unwrap_or(UNLIMITED_FUEL),
                }
            } else {
                PluginError::DeadlineExceeded {
                    plugin,
                    callback,
                    deadline: st.deadline.budget(),
                    used: st.deadline.used(thread_cpu_time()),
                }
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
