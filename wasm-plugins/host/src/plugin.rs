//! Loaded plugins, their instance pools, and per-request contexts.
//!
//! **Instance model.** As in Envoy, one instance hosts many request
//! contexts. A request is pinned to one instance (its context lives in the
//! guest's memory there) but holds the instance only while one of its
//! callbacks runs: each callback takes the instance's lock, moves the
//! request's [`ContextState`] in, runs, and moves it out again. A slow or
//! stalled client therefore holds no instance between callbacks, and cannot
//! exhaust the pool.
//!
//! A new request gets, in this order: an idle instance of the plugin; a new
//! instance, while the host has a slot for it (see [`Need`]); or a share of
//! the plugin's least busy instance. Only a plugin that has no instance at
//! all and cannot get a slot fails with [`PluginError::Exhausted`]; a
//! callback that cannot lock its instance within [`crate::HostConfig::lock_wait`]
//! fails with [`PluginError::Busy`]. Both are overload: the embedder answers
//! 503 and never skips the plugin ([`FailurePolicy::action_for`]).
//!
//! When a callback fails (trap, deadline, memory limit, exit), its instance
//! is discarded at once; the other contexts it hosted get
//! [`PluginError::InstanceLost`] at their next callback, which their
//! plugin's failure policy maps like any failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use wasmtime::{InstancePre, TypedFunc, WasmParams, WasmResults};

use crate::abi::{ACTION_PAUSE, HeaderEdit, HeaderList, MapType};
use crate::error::{ErrorKind, PluginError, Result};
use crate::instance::{
    ContextState, Exports, HostState, Need, PluginInstance, PluginShared, ROOT_CONTEXT_ID, Signal,
    Slots,
};
use crate::metrics::MetricSnapshot;
use crate::shared::SharedData;
use crate::{PropertyResolver, Ticker};

/// Per-plugin resource limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Ceiling on the guest's linear memory; `memory.grow` past it fails the
    /// callback with [`PluginError::MemoryLimit`]. Must not exceed
    /// [`crate::HostConfig::max_memory_bytes`].
    pub memory_bytes: usize,
    /// CPU-time budget of one callback (the CPU time of the thread that runs
    /// it, so a descheduled callback is not failed), checked at each epoch
    /// tick from the callback's first: a callback may use up to two ticks
    /// more than its budget, never less.
    pub callback_deadline: Duration,
    /// After a callback misses its deadline, for this long (extended by each
    /// later miss) the plugin's callbacks get a budget of wasmtime fuel
    /// (about one unit per wasm instruction): 4 times the most a successful
    /// callback of the last one to two such periods used, at least 100,000.
    /// A callback that uses it all fails at once with
    /// [`PluginError::FuelExhausted`]. A plugin whose requests loop then
    /// costs tens of microseconds per loop, not its whole deadline, while
    /// its legitimately heavy callbacks keep what they were seen to need
    /// (fuel is exact: one sighting is enough). `callback_deadline` still
    /// applies (a loop of host calls or bulk memory operations does more
    /// per unit of fuel). Zero: never clamp. Set-up callbacks
    /// (`proxy_on_vm_start`, `proxy_on_configure`) are never clamped, and
    /// do not count toward the peak.
    pub deadline_clamp: Duration,
    /// Instantiate (and configure) a new instance for every request instead of
    /// sharing pooled ones. Stronger isolation, much higher cost, and the one
    /// case where a request holds an instance for its whole life: such
    /// requests are bounded by [`crate::HostConfig::max_instances`] (past it:
    /// [`PluginError::Exhausted`]).
    pub fresh_instance_per_request: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 16 << 20,
            callback_deadline: Duration::from_millis(50),
            deadline_clamp: Duration::from_secs(10),
            fresh_instance_per_request: false,
        }
    }
}

/// What the embedder does with a request when the plugin fails: traps, runs
/// past its deadline or its memory limit, exits, or its instance was lost
/// to another request's failure. Overload (no instance to be had:
/// [`PluginError::is_overload`]) is not a plugin failure, and is answered 503
/// under either policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Skip the plugin: the request proceeds as if it were not configured.
    #[default]
    Open,
    /// Fail the request with a 500 local response.
    Closed,
}

impl FailurePolicy {
    /// The action to take after `error`: 503 for overload whatever the
    /// policy, else continue (open) or 500 (closed).
    pub fn action_for(self, error: &PluginError) -> Action {
        if error.is_overload() {
            return Action::LocalResponse(LocalResponse {
                status: 503,
                details: format!("plugin_overloaded: {:?}", error.kind()),
                headers: vec![("retry-after".into(), b"1".to_vec())],
                body: Bytes::from_static(b"plugin host overloaded\n"),
                grpc_status: None,
            });
        }
        match self {
            Self::Open => Action::Continue,
            Self::Closed => Action::LocalResponse(LocalResponse {
                status: 500,
                details: format!("plugin_failure: {:?}", error.kind()),
                headers: Vec::new(),
                body: Bytes::from_static(b"plugin failure\n"),
                grpc_status: None,
            }),
        }
    }

    /// Map a callback result through the policy.
    pub fn apply(self, result: Result<Action>) -> Action {
        match result {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, policy = ?self, "wasm plugin failed");
                self.action_for(&e)
            }
        }
    }
}

/// Outcome of an HTTP callback.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Proceed to the next phase, with whatever the plugin modified.
    Continue,
    /// Hold the stream until the plugin resumes it (typically after an HTTP
    /// call completes: see [`RequestContext::on_http_call_response`]).
    Pause,
    /// Answer the client with this response instead.
    LocalResponse(LocalResponse),
    /// The plugin asked to close/reset the stream (`proxy_close_stream`).
    Close,
}

/// A response the plugin produced with `proxy_send_local_response`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u16,
    pub details: String,
    pub headers: HeaderList,
    pub body: Bytes,
    pub grpc_status: Option<i32>,
}

/// An outgoing HTTP call the plugin queued with `proxy_http_call`. The
/// embedder performs it and answers with
/// [`RequestContext::on_http_call_response`] using the same `token`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCallRequest {
    pub token: u32,
    pub upstream: String,
    /// Includes `:method`, `:path` and `:authority` (checked by the host).
    pub headers: HeaderList,
    pub body: Bytes,
    pub trailers: HeaderList,
    pub timeout: Duration,
}

/// The result of an HTTP call, given back to the plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpCallResponse {
    /// Include `:status`.
    pub headers: HeaderList,
    pub body: Bytes,
    pub trailers: HeaderList,
}

/// Counters for one plugin. Failures count every guest failure (traps,
/// deadlines, memory limit, exits).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginStats {
    pub callbacks: u64,
    pub failures: u64,
    pub traps: u64,
    pub deadline_exceeded: u64,
    /// Deadline clamps started (see [`Limits::deadline_clamp`]).
    pub deadline_clamps: u64,
    /// True while the plugin's deadline is clamped.
    pub deadline_clamped: bool,
    /// The fuel a clamped callback gets (the clamp in force, or one that
    /// would start now): 4 times the most a successful callback used in
    /// the last one to two clamp windows, at least 100,000.
    pub clamp_fuel: u64,
    pub memory_limit: u64,
    pub exits: u64,
    pub instances_created: u64,
    pub instances_discarded: u64,
    /// Instances currently alive (idle, hosting contexts, or fresh).
    pub live_instances: u64,
    /// Instances hosting no context.
    pub idle_instances: usize,
    /// Request contexts alive now (between `request_context` and their end).
    pub live_contexts: u64,
    /// Contexts that failed because another context's failure discarded
    /// their instance ([`PluginError::InstanceLost`]).
    pub lost_contexts: u64,
    /// Requests that could not get an instance, or their instance's lock
    /// ([`PluginError::is_overload`]).
    pub overloads: u64,
    /// Log lines (`proxy_log`, WASI `fd_write`) dropped by the rate limit.
    pub logs_suppressed: u64,
    /// Shared-data writes refused by its limits.
    pub shared_data_rejected: u64,
    /// Bytes of keys and values in the plugin's shared data.
    pub shared_data_bytes: usize,
}

/// One pooled instance and the contexts it hosts.
pub(crate) struct Cell {
    /// `None` once discarded (after a failure) or evicted.
    instance: Mutex<Option<PluginInstance>>,
    /// Contexts pinned here. Changed under the plugin's pool lock only
    /// (fresh instances, in no pool, have their one context).
    contexts: AtomicU32,
    /// Set (under `instance`'s lock) when the instance is taken away.
    dead: AtomicBool,
    /// Its place in the pool's `cells`, kept under the pool lock.
    index: AtomicUsize,
}

impl Cell {
    fn new(instance: PluginInstance, contexts: u32) -> Arc<Self> {
        Arc::new(Self {
            instance: Mutex::new(Some(instance)),
            contexts: AtomicU32::new(contexts),
            dead: AtomicBool::new(false),
            index: AtomicUsize::new(usize::MAX),
        })
    }

    fn contexts(&self) -> u32 {
        self.contexts.load(Ordering::Relaxed)
    }

    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Takes the instance away (the caller holds its lock).
    fn kill(&self, slot: &mut Option<PluginInstance>) -> Option<PluginInstance> {
        self.dead.store(true, Ordering::Release);
        slot.take()
    }
}

/// A plugin's pooled instances, those hosting contexts first:
/// `cells[..busy]` host contexts, `cells[busy..]` are idle. Everything is
/// O(1) but [`Pool::attach_least_busy`], which runs only when the plugin
/// cannot have one more instance.
#[derive(Default)]
pub(crate) struct Pool {
    cells: Vec<Arc<Cell>>,
    busy: usize,
}

impl Pool {
    fn swap(&mut self, i: usize, j: usize) {
        self.cells.swap(i, j);
        self.cells[i].index.store(i, Ordering::Relaxed);
        self.cells[j].index.store(j, Ordering::Relaxed);
    }

    fn index_of(&self, cell: &Arc<Cell>) -> Option<usize> {
        let i = cell.index.load(Ordering::Relaxed);
        self.cells
            .get(i)
            .filter(|c| Arc::ptr_eq(c, cell))
            .map(|_| i)
    }

    /// Adds an instance, idle or hosting its first context.
    fn push(&mut self, cell: Arc<Cell>) {
        let i = self.cells.len();
        cell.index.store(i, Ordering::Relaxed);
        let busy = cell.contexts() > 0;
        self.cells.push(cell);
        if busy {
            self.swap(i, self.busy);
            self.busy += 1;
        }
    }

    /// Removes an instance (no-op if it is not here).
    fn remove(&mut self, cell: &Arc<Cell>) {
        let Some(mut i) = self.index_of(cell) else {
            return;
        };
        if i < self.busy {
            self.busy -= 1;
            self.swap(i, self.busy);
            i = self.busy;
        }
        let last = self.cells.len() - 1;
        self.swap(i, last);
        self.cells.pop();
    }

    /// A new context on an idle instance.
    fn attach_idle(&mut self) -> Option<Arc<Cell>> {
        loop {
            let cell = self.cells.get(self.busy)?.clone();
            if cell.is_dead() {
                self.remove(&cell);
                continue;
            }
            cell.contexts.fetch_add(1, Ordering::Relaxed);
            self.busy += 1;
            return Some(cell);
        }
    }

    /// A new context on the instance hosting the fewest.
    fn attach_least_busy(&mut self) -> Option<Arc<Cell>> {
        if let Some(cell) = self.attach_idle() {
            return Some(cell);
        }
        let cell = self.cells[..self.busy]
            .iter()
            .filter(|c| !c.is_dead())
            .min_by_key(|c| c.contexts())?
            .clone();
        cell.contexts.fetch_add(1, Ordering::Relaxed);
        Some(cell)
    }

    /// One context of `cell` ended; true if that left it idle (in the pool).
    fn detach(&mut self, cell: &Arc<Cell>) -> bool {
        if cell.contexts.fetch_sub(1, Ordering::Relaxed) != 1 {
            return false;
        }
        match self.index_of(cell) {
            Some(i) => {
                if i < self.busy {
                    self.busy -= 1;
                    self.swap(i, self.busy);
                }
                true
            }
            None => false,
        }
    }

    fn len(&self) -> usize {
        self.cells.len()
    }

    fn idle(&self) -> usize {
        self.cells.len() - self.busy
    }

    /// Takes an idle instance away, if its lock is free (only a tick takes it).
    fn take_idle(&mut self, cell: &Arc<Cell>) -> Option<PluginInstance> {
        let taken = {
            let mut slot = cell.instance.try_lock()?;
            cell.kill(&mut slot)
        };
        self.remove(cell);
        taken
    }
}

pub(crate) struct PluginInner {
    pub shared: Arc<PluginShared>,
    pub pre: InstancePre<HostState>,
    pub limits: Limits,
    pub policy: FailurePolicy,
    pub max_idle: usize,
    /// How long a callback waits for its instance's lock.
    pub lock_wait: Duration,
    /// The plugin's instances, idle or hosting contexts (fresh instances,
    /// private to their request, are not here).
    pub pool: Mutex<Pool>,
    pub slots: Arc<Slots>,
    pub _ticker: Arc<Ticker>,
    /// Keeps the module in the host's cache while this plugin is loaded.
    pub _module: Arc<wasmtime::Module>,
}

impl PluginInner {
    /// A new instance in a slot the host can spare for `need`.
    pub(crate) fn instantiate(&self, need: Need) -> Result<PluginInstance> {
        let slot = self
            .slots
            .take(std::ptr::from_ref(self), &self.shared.name, need)?;
        PluginInstance::new(&self.shared, &self.pre, self.limits.callback_deadline, slot)
    }

    /// Pools `instance` as idle (the first instance, made at load time).
    pub(crate) fn pool_idle(&self, instance: PluginInstance) {
        self.pool.lock().push(Cell::new(instance, 0));
    }

    /// Whether this pooled plugin has no instance at all (and would need a
    /// slot for its next request).
    pub(crate) fn instanceless(&self) -> bool {
        !self.limits.fresh_instance_per_request
            && self.shared.stats.live_instances.load(Ordering::Relaxed) == 0
    }

    /// Takes one idle instance away from the pool, for another plugin's new
    /// instance; the plugin's last instance only if `allow_last`.
    pub(crate) fn evict_idle(&self, allow_last: bool) -> Option<PluginInstance> {
        let mut pool = self.pool.lock();
        if pool.idle() == 0 || (!allow_last && pool.len() <= 1) {
            return None;
        }
        let cell = pool.cells.last()?.clone();
        pool.take_idle(&cell)
    }

    /// The instance for a new context (see the module docs).
    fn pick(&self) -> Result<Arc<Cell>> {
        if self.limits.fresh_instance_per_request {
            return self.instantiate(Need::Fresh).map(|i| Cell::new(i, 1));
        }
        if let Some(cell) = self.pool.lock().attach_idle() {
            return Ok(cell);
        }
        let need = if self.instanceless() {
            Need::First
        } else {
            Need::Growth
        };
        match self.instantiate(need) {
            Ok(instance) => {
                let cell = Cell::new(instance, 1);
                self.pool.lock().push(cell.clone());
                Ok(cell)
            }
            // No slot to spare, or the new instance failed to set up: share.
            Err(e) => self.pool.lock().attach_least_busy().ok_or(e),
        }
    }

    /// Forgets a discarded instance (`dead`, already taken from its cell).
    fn discard(&self, cell: &Arc<Cell>, dead: Option<PluginInstance>) {
        self.pool.lock().remove(cell);
        if dead.is_some() {
            self.shared
                .stats
                .instances_discarded
                .fetch_add(1, Ordering::Relaxed);
        }
        drop(dead);
    }

    /// A context of `cell` ended: unpin it; trim the idle instances to
    /// `max_idle`; a fresh instance goes with its only context.
    fn context_ended(&self, cell: Arc<Cell>) {
        self.shared
            .stats
            .live_contexts
            .fetch_sub(1, Ordering::Relaxed);
        if self.limits.fresh_instance_per_request {
            drop(cell);
            return;
        }
        let trimmed = {
            let mut pool = self.pool.lock();
            if pool.detach(&cell) && pool.idle() > self.max_idle {
                pool.take_idle(&cell)
            } else {
                None
            }
        };
        drop(trimmed);
    }
}

/// A loaded plugin: the compiled module plus its pool of ready instances.
/// Cheap to clone and shareable across threads.
#[derive(Clone)]
pub struct Plugin {
    pub(crate) inner: Arc<PluginInner>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name())
            .field("limits", &self.inner.limits)
            .finish()
    }
}

impl Plugin {
    pub fn name(&self) -> &str {
        &self.inner.shared.name
    }

    pub fn policy(&self) -> FailurePolicy {
        self.inner.policy
    }

    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// Start a request: pin it to an instance (see the module docs) and
    /// create its stream context there with `proxy_on_context_create(id, root)`.
    pub fn request_context(&self) -> Result<RequestContext> {
        self.start_context(None)
    }

    /// As [`Plugin::request_context`], with request-scoped properties
    /// (`source.address`, `meridian.client.country`...) consulted after the
    /// built-in ones and before the host-wide resolver.
    pub fn request_context_with(
        &self,
        properties: Arc<dyn PropertyResolver>,
    ) -> Result<RequestContext> {
        self.start_context(Some(properties))
    }

    fn start_context(
        &self,
        properties: Option<Arc<dyn PropertyResolver>>,
    ) -> Result<RequestContext> {
        let stats = &self.inner.shared.stats;
        // An instance discarded between the pick and the context's creation
        // is no reason to fail the request: pick again.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let cell = match self.inner.pick() {
                Ok(c) => c,
                Err(e) => {
                    if e.is_overload() {
                        stats.overloads.fetch_add(1, Ordering::Relaxed);
                    }
                    return Err(e);
                }
            };
            stats.live_contexts.fetch_add(1, Ordering::Relaxed);
            let mut ctx = RequestContext {
                plugin: self.inner.clone(),
                cell: Some(cell),
                state: Box::default(),
                id: 0,
                paused_map: None,
                request_headers: None,
                done: false,
                deleted: false,
            };
            ctx.state.request_properties = properties.clone();
            let created = ctx.run(
                "proxy_on_context_create",
                |e| e.on_context_create.as_ref(),
                |id| (id, ROOT_CONTEXT_ID as i32),
                |_, _| {},
            );
            match created {
                Ok(_) => return Ok(ctx),
                Err(e) => {
                    // The guest never saw this context: nothing to end there.
                    ctx.deleted = true;
                    ctx.detach();
                    if e.kind() != ErrorKind::InstanceLost || attempts >= 3 {
                        return Err(e);
                    }
                    stats.lost_contexts.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Metrics the plugin defined, with their current values.
    pub fn metrics(&self) -> Vec<MetricSnapshot> {
        self.inner.shared.metrics.snapshot()
    }

    /// The plugin's shared key-value store.
    pub fn shared_data(&self) -> &SharedData {
        &self.inner.shared.shared_data
    }

    pub fn stats(&self) -> PluginStats {
        let s = &self.inner.shared.stats;
        let data = &self.inner.shared.shared_data;
        PluginStats {
            callbacks: s.callbacks.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            traps: s.traps.load(Ordering::Relaxed),
            deadline_exceeded: s.deadlines.load(Ordering::Relaxed),
            deadline_clamps: self.inner.shared.clamp.started.load(Ordering::Relaxed),
            deadline_clamped: self
                .inner
                .shared
                .clamp
                .active(self.inner.shared.clock.now_ms()),
            clamp_fuel: self.inner.shared.clamp.budget(),
            memory_limit: s.memory_limits.load(Ordering::Relaxed),
            exits: s.exits.load(Ordering::Relaxed),
            instances_created: s.instances_created.load(Ordering::Relaxed),
            instances_discarded: s.instances_discarded.load(Ordering::Relaxed),
            live_instances: s.live_instances.load(Ordering::Relaxed),
            idle_instances: self.inner.pool.lock().idle(),
            live_contexts: s.live_contexts.load(Ordering::Relaxed),
            lost_contexts: s.lost_contexts.load(Ordering::Relaxed),
            overloads: s.overloads.load(Ordering::Relaxed),
            logs_suppressed: s.logs_suppressed.load(Ordering::Relaxed),
            shared_data_rejected: data.rejected(),
            shared_data_bytes: data.bytes(),
        }
    }

    /// The period the plugin asked for with `proxy_set_tick_period_milliseconds`.
    pub fn tick_period(&self) -> Option<Duration> {
        match self.inner.shared.tick_period_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms.into())),
        }
    }

    /// Run `proxy_on_tick` on the root context of every pooled instance,
    /// between the callbacks of the requests it hosts; an instance in a
    /// callback at that moment misses this tick (this never waits). The
    /// embedder calls this every [`Plugin::tick_period`]. Failed instances
    /// are discarded (their contexts are lost); the first error is returned.
    pub fn on_tick(&self) -> Result<()> {
        let cells: Vec<_> = self.inner.pool.lock().cells.clone();
        let mut first_err = None;
        for cell in cells {
            let Some(mut slot) = cell.instance.try_lock() else {
                continue;
            };
            let Some(inst) = slot.as_mut() else {
                continue;
            };
            let root = inst.store.data().root_id as i32;
            let r = inst
                .call_export("proxy_on_tick", |e| e.on_tick.as_ref(), root)
                .map(|_| ());
            // Calls queued from the root context are not supported yet.
            *inst.store.data_mut().ctx = ContextState::default();
            if let Err(e) = r {
                let dead = cell.kill(&mut slot);
                drop(slot);
                self.inner.discard(&cell, dead);
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// One HTTP request/response pair going through a plugin. Call the phases in
/// order; then [`RequestContext::on_done`], [`RequestContext::on_log`] and
/// [`RequestContext::finish`] (dropping the context also finishes it). The
/// context holds its instance only during each of these calls. After a guest
/// failure the instance is thrown away and every later call returns
/// [`PluginError::Usage`].
pub struct RequestContext {
    plugin: Arc<PluginInner>,
    /// The instance the context lives in; `None` once it ended or failed.
    cell: Option<Arc<Cell>>,
    /// What the host keeps for the context between callbacks.
    state: Box<ContextState>,
    /// Assigned by the instance at the first callback.
    id: u32,
    paused_map: Option<MapType>,
    /// The request headers as the request phase left them: lent to later
    /// callbacks read-only-in-spirit, as Envoy keeps them readable in the
    /// response phase.
    request_headers: Option<HeaderList>,
    done: bool,
    deleted: bool,
}

impl std::fmt::Debug for RequestContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestContext")
            .field("plugin", &self.plugin.shared.name)
            .field("id", &self.id)
            .finish()
    }
}

/// Move the embedder's map into the context's state for a callback (`on`),
/// or back out.
fn swap_map(slot: &mut Option<HeaderList>, map: &mut HeaderList, on: bool) {
    if on {
        *slot = Some(std::mem::take(map));
    } else {
        *map = slot.take().unwrap_or_default();
    }
}

impl RequestContext {
    /// The proxy-wasm context id (unique within its instance).
    pub fn id(&self) -> u32 {
        self.id
    }

    fn usage(&self) -> PluginError {
        PluginError::Usage {
            plugin: self.plugin.shared.name.clone(),
            message: "the plugin context ended or failed earlier in this request".into(),
        }
    }

    /// The context is over: unpin it from its instance.
    fn detach(&mut self) {
        if let Some(cell) = self.cell.take() {
            self.plugin.context_ended(cell);
        }
    }

    /// Run a callback: lock the context's instance (waiting at most
    /// `lock_wait`), move the context's state in, call, move it out. On a
    /// guest failure the instance is discarded. `args` gets the context id.
    fn run<P: WasmParams, R: WasmResults>(
        &mut self,
        name: &'static str,
        pick: fn(&Exports) -> Option<&TypedFunc<P, R>>,
        args: impl FnOnce(i32) -> P,
        mut swap: impl FnMut(&mut ContextState, bool),
    ) -> Result<Option<R>> {
        let Some(cell) = self.cell.as_deref() else {
            return Err(self.usage());
        };
        let Some(mut slot) = cell.instance.try_lock_for(self.plugin.lock_wait) else {
            let stats = &self.plugin.shared.stats;
            stats.overloads.fetch_add(1, Ordering::Relaxed);
            return Err(PluginError::Busy {
                plugin: self.plugin.shared.name.clone(),
                callback: name,
                waited: self.plugin.lock_wait,
            });
        };
        let Some(inst) = slot.as_mut() else {
            drop(slot);
            self.detach();
            let stats = &self.plugin.shared.stats;
            stats.lost_contexts.fetch_add(1, Ordering::Relaxed);
            return Err(PluginError::InstanceLost {
                plugin: self.plugin.shared.name.clone(),
            });
        };
        if self.id == 0 {
            self.id = inst.next_context_id();
        }
        if pick(&inst.exports).is_none() {
            return Ok(None);
        }
        let id = self.id;
        let lent = self.request_headers.take();
        let lending = lent.is_some();
        if let Some(h) = lent {
            self.state.maps[MapType::RequestHeaders as usize] = Some(h);
        }
        swap(&mut self.state, true);
        inst.store.data_mut().enter(&mut self.state, id);
        let r = inst.call_export(name, pick, args(id as i32));
        inst.store.data_mut().leave(&mut self.state);
        swap(&mut self.state, false);
        if lending {
            self.request_headers = self.state.maps[MapType::RequestHeaders as usize].take();
        }
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                let dead = cell.kill(&mut slot);
                drop(slot);
                if let Some(cell) = self.cell.take() {
                    self.plugin.discard(&cell, dead);
                    self.plugin.context_ended(cell);
                }
                // Nothing the failed callback asked for stands.
                *self.state = ContextState::default();
                Err(e)
            }
        }
    }

    /// Turn the callback's return value and the guest's side requests into an Action.
    fn action(&mut self, raw: Option<i32>, map: Option<MapType>) -> Action {
        let signal = self.state.signal.take();
        if let Some(resp) = self.state.local_response.take() {
            return Action::LocalResponse(resp);
        }
        if signal == Some(Signal::Close) {
            return Action::Close;
        }
        if raw == Some(ACTION_PAUSE) {
            self.paused_map = map;
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn headers_phase(
        &mut self,
        name: &'static str,
        map_type: MapType,
        headers: &mut HeaderList,
        end_of_stream: bool,
        request: bool,
    ) -> Result<Action> {
        let (n, eos) = (headers.len() as i32, end_of_stream as i32);
        let idx = map_type as usize;
        let raw = self.run(
            name,
            if request {
                |e| e.on_request_headers.as_ref()
            } else {
                |e| e.on_response_headers.as_ref()
            },
            |id| (id, n, eos),
            |st, on| swap_map(&mut st.maps[idx], headers, on),
        )?;
        Ok(self.action(raw, Some(map_type)))
    }

    /// `proxy_on_request_headers`. The plugin may read and edit `headers`.
    /// Hand the final headers back with [`RequestContext::keep_request_headers`]
    /// so they stay readable in the later phases, as in Envoy.
    pub fn on_request_headers(
        &mut self,
        headers: &mut HeaderList,
        end_of_stream: bool,
    ) -> Result<Action> {
        self.request_headers = None;
        self.headers_phase(
            "proxy_on_request_headers",
            MapType::RequestHeaders,
            headers,
            end_of_stream,
            true,
        )
    }

    /// Keep the request headers (as the request phase left them) for the
    /// later phases: the response callbacks and `on_log` can read them.
    pub fn keep_request_headers(&mut self, headers: HeaderList) {
        self.request_headers = Some(headers);
    }

    /// `proxy_on_response_headers`. The plugin may read and edit `headers`.
    pub fn on_response_headers(
        &mut self,
        headers: &mut HeaderList,
        end_of_stream: bool,
    ) -> Result<Action> {
        self.headers_phase(
            "proxy_on_response_headers",
            MapType::ResponseHeaders,
            headers,
            end_of_stream,
            false,
        )
    }

    fn body_phase(
        &mut self,
        name: &'static str,
        body: &mut BytesMut,
        end_of_stream: bool,
        request: bool,
    ) -> Result<Action> {
        let (n, eos) = (body.len() as i32, end_of_stream as i32);
        let raw = self.run(
            name,
            if request {
                |e| e.on_request_body.as_ref()
            } else {
                |e| e.on_response_body.as_ref()
            },
            |id| (id, n, eos),
            |st, on| {
                let slot = if request {
                    &mut st.request_body
                } else {
                    &mut st.response_body
                };
                if on {
                    *slot = Some(std::mem::take(body));
                } else {
                    *body = slot.take().unwrap_or_default();
                }
            },
        )?;
        Ok(self.action(raw, None))
    }

    /// `proxy_on_request_body` for one chunk (or the buffered body so far).
    pub fn on_request_body(&mut self, body: &mut BytesMut, end_of_stream: bool) -> Result<Action> {
        self.body_phase("proxy_on_request_body", body, end_of_stream, true)
    }

    /// `proxy_on_response_body` for one chunk (or the buffered body so far).
    pub fn on_response_body(&mut self, body: &mut BytesMut, end_of_stream: bool) -> Result<Action> {
        self.body_phase("proxy_on_response_body", body, end_of_stream, false)
    }

    fn trailers_phase(
        &mut self,
        name: &'static str,
        map_type: MapType,
        trailers: &mut HeaderList,
        request: bool,
    ) -> Result<Action> {
        let n = trailers.len() as i32;
        let idx = map_type as usize;
        let raw = self.run(
            name,
            if request {
                |e| e.on_request_trailers.as_ref()
            } else {
                |e| e.on_response_trailers.as_ref()
            },
            |id| (id, n),
            |st, on| swap_map(&mut st.maps[idx], trailers, on),
        )?;
        Ok(self.action(raw, Some(map_type)))
    }

    /// `proxy_on_request_trailers`.
    pub fn on_request_trailers(&mut self, trailers: &mut HeaderList) -> Result<Action> {
        self.trailers_phase(
            "proxy_on_request_trailers",
            MapType::RequestTrailers,
            trailers,
            true,
        )
    }

    /// `proxy_on_response_trailers`.
    pub fn on_response_trailers(&mut self, trailers: &mut HeaderList) -> Result<Action> {
        self.trailers_phase(
            "proxy_on_response_trailers",
            MapType::ResponseTrailers,
            trailers,
            false,
        )
    }

    /// The changes the plugin made to the request headers since the last
    /// take (in the request phase and any `http_call` resumption), to apply
    /// to the embedder's own map. A [`HeaderEdit::ReplaceAll`] means: rebuild
    /// it from the list.
    pub fn take_request_header_edits(&mut self) -> Vec<HeaderEdit> {
        std::mem::take(&mut self.state.request_header_edits)
    }

    /// The changes the plugin made to the response headers since the last take.
    pub fn take_response_header_edits(&mut self) -> Vec<HeaderEdit> {
        std::mem::take(&mut self.state.response_header_edits)
    }

    /// HTTP calls the plugin queued (with `proxy_http_call`) since the last take.
    pub fn take_http_calls(&mut self) -> Vec<HttpCallRequest> {
        std::mem::take(&mut self.state.http_calls)
    }

    /// Deliver the result of an HTTP call (`None` = the call failed or timed
    /// out). `paused_headers` is the header map of the phase that returned
    /// [`Action::Pause`], which the plugin may still edit. Returns
    /// `Continue` if the plugin resumed the stream, `LocalResponse`/`Close` if
    /// it answered or closed it, and `Pause` if it is still waiting.
    pub fn on_http_call_response(
        &mut self,
        token: u32,
        response: Option<HttpCallResponse>,
        paused_headers: &mut HeaderList,
    ) -> Result<Action> {
        let resp = response.unwrap_or_default();
        let counts = (
            token as i32,
            resp.headers.len() as i32,
            resp.body.len() as i32,
            resp.trailers.len() as i32,
        );
        let paused_idx = self.paused_map.map(|m| m as usize);
        let mut resp = Some(resp);
        let ran = self.run(
            "proxy_on_http_call_response",
            |e| e.on_http_call_response.as_ref(),
            |id| (id, counts.0, counts.1, counts.2, counts.3),
            |st, on| {
                if let Some(i) = paused_idx {
                    swap_map(&mut st.maps[i], paused_headers, on);
                }
                if let Some(r) = resp.take().filter(|_| on) {
                    st.maps[MapType::HttpCallResponseHeaders as usize] = Some(r.headers);
                    st.maps[MapType::HttpCallResponseTrailers as usize] = Some(r.trailers);
                    st.http_call_body = Some(r.body);
                } else {
                    st.maps[MapType::HttpCallResponseHeaders as usize] = None;
                    st.maps[MapType::HttpCallResponseTrailers as usize] = None;
                    st.http_call_body = None;
                }
            },
        )?;
        let signal = self.state.signal.take();
        if let Some(r) = self.state.local_response.take() {
            return Ok(Action::LocalResponse(r));
        }
        Ok(match signal {
            Some(Signal::Close) => Action::Close,
            Some(Signal::ContinueRequest | Signal::ContinueResponse) => {
                self.paused_map = None;
                Action::Continue
            }
            None if ran.is_none() => Action::Continue,
            None => Action::Pause,
        })
    }

    /// `proxy_on_log`: the plugin may read (and, harmlessly, edit) both header
    /// maps. An empty `request_headers` means the ones kept with
    /// [`RequestContext::keep_request_headers`].
    pub fn on_log(
        &mut self,
        request_headers: &mut HeaderList,
        response_headers: &mut HeaderList,
    ) -> Result<()> {
        let kept = request_headers.is_empty() && self.request_headers.is_some();
        self.run(
            "proxy_on_log",
            |e| e.on_log.as_ref(),
            |id| id,
            |st, on| {
                if !kept {
                    swap_map(
                        &mut st.maps[MapType::RequestHeaders as usize],
                        request_headers,
                        on,
                    );
                }
                swap_map(
                    &mut st.maps[MapType::ResponseHeaders as usize],
                    response_headers,
                    on,
                );
            },
        )?;
        Ok(())
    }

    /// `proxy_on_done`. Returns the guest's answer (`false` = it wants to call
    /// `proxy_done` later; the host does not wait for that yet).
    pub fn on_done(&mut self) -> Result<bool> {
        if self.done {
            return Ok(true);
        }
        self.done = true;
        let r = self.run("proxy_on_done", |e| e.on_done.as_ref(), |id| id, |_, _| {})?;
        let completed = r.is_none_or(|v| v != 0);
        if !completed {
            self.state.done_pending = true;
        }
        Ok(completed)
    }

    /// End the context: `proxy_on_done` (if not called yet) and
    /// `proxy_on_delete`, then unpin it from its instance.
    pub fn finish(mut self) -> Result<()> {
        self.finish_inner()
    }

    fn finish_inner(&mut self) -> Result<()> {
        if self.cell.is_none() || self.deleted {
            return Ok(());
        }
        let r = self.on_done().and_then(|_| {
            self.deleted = true;
            self.run(
                "proxy_on_delete",
                |e| e.on_delete.as_ref(),
                |id| id,
                |_, _| {},
            )
        });
        self.detach();
        r.map(|_| ())
    }
}

impl Drop for RequestContext {
    fn drop(&mut self) {
        if let Err(e) = self.finish_inner() {
            tracing::warn!(error = %e, "wasm plugin failed while finishing a request context");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty_cell() -> Arc<Cell> {
        Arc::new(Cell {
            instance: Mutex::new(None),
            contexts: AtomicU32::new(0),
            dead: AtomicBool::new(false),
            index: AtomicUsize::new(usize::MAX),
        })
    }

    /// Busy cells first, every index right, and the counts agree.
    fn check(pool: &Pool) {
        for (i, c) in pool.cells.iter().enumerate() {
            assert_eq!(c.index.load(Ordering::Relaxed), i);
            assert_eq!(c.contexts() > 0, i < pool.busy, "cell {i} of {}", pool.busy);
        }
    }

    #[test]
    fn the_pool_keeps_busy_instances_first_through_any_sequence() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut rng = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut pool = Pool::default();
        let mut attached: Vec<Arc<Cell>> = Vec::new();
        for _ in 0..20_000 {
            match rng() % 6 {
                0 => pool.push(empty_cell()),
                1 => attached.extend(pool.attach_idle()),
                2 => attached.extend(pool.attach_least_busy()),
                3 | 4 if !attached.is_empty() => {
                    let c = attached.swap_remove(rng() as usize % attached.len());
                    pool.detach(&c);
                }
                5 if pool.len() > 0 => {
                    let c = pool.cells[rng() as usize % pool.len()].clone();
                    pool.remove(&c);
                    pool.remove(&c); // twice: a no-op
                }
                _ => {}
            }
            check(&pool);
        }
        // Idle cells are taken before busy ones are shared.
        let mut pool = Pool::default();
        pool.push(empty_cell());
        pool.push(empty_cell());
        let a = pool.attach_least_busy().unwrap();
        let b = pool.attach_least_busy().unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!(pool.idle(), 0);
        let c = pool.attach_least_busy().unwrap();
        assert_eq!(c.contexts(), 2);
        assert!(!pool.detach(&c));
        assert!(pool.detach(&c));
        assert_eq!(pool.idle(), 1);
        check(&pool);
    }
}
