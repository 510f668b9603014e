//! Loaded plugins, their instance pool, and per-request contexts.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use wasmtime::{InstancePre, TypedFunc, WasmParams, WasmResults};

use crate::abi::{ACTION_PAUSE, HeaderEdit, HeaderList, MapType};
use crate::error::{PluginError, Result};
use crate::instance::{Exports, HostState, PluginInstance, PluginShared, Signal, Slots};
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
    /// Wall-clock budget of one callback, enforced by epoch interruption with
    /// the host's tick granularity (a callback may run up to one tick longer).
    pub callback_deadline: Duration,
    /// Instantiate (and configure) a new instance for every request instead of
    /// reusing pooled ones. Stronger isolation, much higher cost.
    pub fresh_instance_per_request: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 16 << 20,
            callback_deadline: Duration::from_millis(50),
            fresh_instance_per_request: false,
        }
    }
}

/// What the embedder does with a request when the plugin fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Skip the plugin: the request proceeds as if it were not configured.
    #[default]
    Open,
    /// Fail the request with a 500 local response.
    Closed,
}

impl FailurePolicy {
    /// The action to take after `error`.
    pub fn action_for(self, error: &PluginError) -> Action {
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
    pub memory_limit: u64,
    pub exits: u64,
    pub instances_created: u64,
    pub instances_discarded: u64,
    /// Instances currently alive (pooled or serving a request).
    pub live_instances: u64,
    pub idle_instances: usize,
}

pub(crate) struct PluginInner {
    pub shared: Arc<PluginShared>,
    pub pre: InstancePre<HostState>,
    pub limits: Limits,
    pub policy: FailurePolicy,
    pub deadline_ticks: u64,
    pub max_idle: usize,
    /// Boxed: an instance moves between the pool and a request's context as
    /// one pointer, not as its few hundred bytes of exports.
    #[allow(clippy::vec_box)]
    pub idle: Mutex<Vec<Box<PluginInstance>>>,
    pub slots: Arc<Slots>,
    pub _ticker: Arc<Ticker>,
}

impl PluginInner {
    /// A new instance, boxed: it moves between the pool and the requests'
    /// contexts as one pointer.
    pub(crate) fn instantiate(&self) -> Result<Box<PluginInstance>> {
        let slot = self.slots.take(&self.shared.name)?;
        PluginInstance::new(
            &self.shared,
            &self.pre,
            self.limits.callback_deadline,
            self.deadline_ticks,
            slot,
        )
        .map(Box::new)
    }

    fn discard(&self, instance: Box<PluginInstance>) {
        self.shared
            .stats
            .instances_discarded
            .fetch_add(1, Ordering::Relaxed);
        drop(instance);
    }

    fn release(&self, mut instance: Box<PluginInstance>) {
        if self.limits.fresh_instance_per_request {
            drop(instance);
            return;
        }
        instance.store.data_mut().reset_request();
        let mut idle = self.idle.lock();
        if idle.len() < self.max_idle {
            idle.push(instance);
        }
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

    /// Start a request: take a pooled instance (or create one) and create a
    /// stream context in it with `proxy_on_context_create(id, root)`.
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
        let pooled = if self.inner.limits.fresh_instance_per_request {
            None
        } else {
            self.inner.idle.lock().pop()
        };
        let mut instance = match pooled {
            Some(i) => i,
            None => self.inner.instantiate()?,
        };
        let id = instance.next_context_id();
        {
            let st = instance.store.data_mut();
            st.request_id = Some(id);
            st.active_id = id;
            st.effective_id = id;
            st.request_properties = properties;
        }
        let root = instance.store.data().root_id as i32;
        if let Err(e) = instance.call_export(
            "proxy_on_context_create",
            |e| e.on_context_create.as_ref(),
            (id as i32, root),
        ) {
            self.inner.discard(instance);
            return Err(e);
        }
        Ok(RequestContext {
            plugin: self.inner.clone(),
            instance: Some(instance),
            id,
            paused_map: None,
            request_headers: None,
            done: false,
            deleted: false,
        })
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
        PluginStats {
            callbacks: s.callbacks.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            traps: s.traps.load(Ordering::Relaxed),
            deadline_exceeded: s.deadlines.load(Ordering::Relaxed),
            memory_limit: s.memory_limits.load(Ordering::Relaxed),
            exits: s.exits.load(Ordering::Relaxed),
            instances_created: s.instances_created.load(Ordering::Relaxed),
            instances_discarded: s.instances_discarded.load(Ordering::Relaxed),
            live_instances: s.live_instances.load(Ordering::Relaxed),
            idle_instances: self.inner.idle.lock().len(),
        }
    }

    /// The period the plugin asked for with `proxy_set_tick_period_milliseconds`.
    pub fn tick_period(&self) -> Option<Duration> {
        match self.inner.shared.tick_period_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms.into())),
        }
    }

    /// Run `proxy_on_tick` on the root context of every idle instance. The
    /// embedder calls this every [`Plugin::tick_period`]. Failed instances are
    /// discarded; the first error is returned.
    pub fn on_tick(&self) -> Result<()> {
        let instances: Vec<_> = std::mem::take(&mut *self.inner.idle.lock());
        let mut first_err = None;
        for mut inst in instances {
            let root = inst.store.data().root_id as i32;
            let r = inst
                .call_export("proxy_on_tick", |e| e.on_tick.as_ref(), root)
                .map(|_| ());
            // Calls queued from the root context are not supported yet.
            inst.store.data_mut().http_calls.clear();
            match r {
                Ok(()) => self.inner.release(inst),
                Err(e) => {
                    self.inner.discard(inst);
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// One HTTP request/response pair going through a plugin. Call the phases in
/// order; then [`RequestContext::on_done`], [`RequestContext::on_log`] and
/// [`RequestContext::finish`] (dropping the context also finishes it). After a
/// guest failure the instance is thrown away and every later call returns
/// [`PluginError::Usage`].
pub struct RequestContext {
    plugin: Arc<PluginInner>,
    instance: Option<Box<PluginInstance>>,
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

/// Move the embedder's map into the store for a callback (`on`), or back out.
fn swap_map(slot: &mut Option<HeaderList>, map: &mut HeaderList, on: bool) {
    if on {
        *slot = Some(std::mem::take(map));
    } else {
        *map = slot.take().unwrap_or_default();
    }
}

impl RequestContext {
    /// The proxy-wasm context id (unique within the instance).
    pub fn id(&self) -> u32 {
        self.id
    }

    fn instance(&mut self) -> Result<&mut PluginInstance> {
        self.instance
            .as_deref_mut()
            .ok_or_else(|| PluginError::Usage {
                plugin: self.plugin.shared.name.clone(),
                message: "the plugin instance failed earlier in this request".into(),
            })
    }

    /// Run a callback; on failure throw the instance away.
    fn run<P: WasmParams, R: WasmResults>(
        &mut self,
        name: &'static str,
        pick: fn(&Exports) -> Option<&TypedFunc<P, R>>,
        args: P,
        mut swap: impl FnMut(&mut HostState, bool),
    ) -> Result<Option<R>> {
        let id = self.id;
        let lent = self.request_headers.take();
        let inst = self.instance()?;
        if pick(&inst.exports).is_none() {
            self.request_headers = lent;
            return Ok(None);
        }
        let st = inst.store.data_mut();
        st.active_id = id;
        st.effective_id = id;
        let lending = lent.is_some();
        if let Some(h) = lent {
            st.maps[MapType::RequestHeaders as usize] = Some(h);
        }
        swap(st, true);
        let r = inst.call_export(name, pick, args);
        let st = inst.store.data_mut();
        swap(st, false);
        if lending {
            self.request_headers = st.maps[MapType::RequestHeaders as usize].take();
        }
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                if let Some(inst) = self.instance.take() {
                    self.plugin.discard(inst);
                }
                Err(e)
            }
        }
    }

    /// Turn the callback's return value and the guest's side requests into an Action.
    fn action(&mut self, raw: Option<i32>, map: Option<MapType>) -> Action {
        let Some(inst) = self.instance.as_mut() else {
            return Action::Continue;
        };
        let st = inst.store.data_mut();
        let signal = st.signal.take();
        if let Some(resp) = st.local_response.take() {
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
        let args = (self.id as i32, headers.len() as i32, end_of_stream as i32);
        let idx = map_type as usize;
        let raw = self.run(
            name,
            if request {
                |e| e.on_request_headers.as_ref()
            } else {
                |e| e.on_response_headers.as_ref()
            },
            args,
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
        let args = (self.id as i32, body.len() as i32, end_of_stream as i32);
        let raw = self.run(
            name,
            if request {
                |e| e.on_request_body.as_ref()
            } else {
                |e| e.on_response_body.as_ref()
            },
            args,
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
        let args = (self.id as i32, trailers.len() as i32);
        let idx = map_type as usize;
        let raw = self.run(
            name,
            if request {
                |e| e.on_request_trailers.as_ref()
            } else {
                |e| e.on_response_trailers.as_ref()
            },
            args,
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
        self.instance.as_mut().map_or_else(Vec::new, |i| {
            std::mem::take(&mut i.store.data_mut().request_header_edits)
        })
    }

    /// The changes the plugin made to the response headers since the last take.
    pub fn take_response_header_edits(&mut self) -> Vec<HeaderEdit> {
        self.instance.as_mut().map_or_else(Vec::new, |i| {
            std::mem::take(&mut i.store.data_mut().response_header_edits)
        })
    }

    /// HTTP calls the plugin queued (with `proxy_http_call`) since the last take.
    pub fn take_http_calls(&mut self) -> Vec<HttpCallRequest> {
        match self.instance.as_mut() {
            Some(i) => std::mem::take(&mut i.store.data_mut().http_calls),
            None => Vec::new(),
        }
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
        let args = (
            self.id as i32,
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
            args,
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
        let Some(inst) = self.instance.as_mut() else {
            return Ok(Action::Continue);
        };
        let st = inst.store.data_mut();
        let signal = st.signal.take();
        if let Some(r) = st.local_response.take() {
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
        let id = self.id as i32;
        let kept = request_headers.is_empty() && self.request_headers.is_some();
        self.run(
            "proxy_on_log",
            |e| e.on_log.as_ref(),
            id,
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
        let id = self.id as i32;
        let r = self.run(
            "proxy_on_done",
            |e| e.on_done.as_ref(),
            id,
            |st, _| st.done_called = true,
        )?;
        let completed = r.is_none_or(|v| v != 0);
        if !completed && let Some(i) = self.instance.as_mut() {
            i.store.data_mut().done_pending = true;
        }
        Ok(completed)
    }

    /// End the context: `proxy_on_done` (if not called yet) and
    /// `proxy_on_delete`, then return the instance to the pool.
    pub fn finish(mut self) -> Result<()> {
        self.finish_inner()
    }

    fn finish_inner(&mut self) -> Result<()> {
        if self.instance.is_none() || self.deleted {
            return Ok(());
        }
        self.on_done()?;
        self.deleted = true;
        let id = self.id as i32;
        self.run("proxy_on_delete", |e| e.on_delete.as_ref(), id, |_, _| {})?;
        if let Some(inst) = self.instance.take() {
            self.plugin.release(inst);
        }
        Ok(())
    }
}

impl Drop for RequestContext {
    fn drop(&mut self) {
        if let Err(e) = self.finish_inner() {
            tracing::warn!(error = %e, "wasm plugin failed while finishing a request context");
        }
    }
}
