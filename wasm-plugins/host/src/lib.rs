#![cfg_attr(test, allow(clippy::unwrap_used))]
//! `meridian-wasm-host`: Meridian's plugin host. It embeds wasmtime and
//! implements the host side of the [proxy-wasm ABI 0.2.1] (0.2.0 accepted),
//! behind a neutral API that knows nothing of any HTTP library: the edge
//! adapts its requests to [`HeaderList`]s and `BytesMut` bodies.
//!
//! Entry point: [`PluginHost::new`], then [`PluginHost::load`] per plugin, then
//! per request [`Plugin::request_context`] and the `on_*` phase methods of
//! [`RequestContext`]. Failures come back as [`PluginError`]; map them with the
//! plugin's [`FailurePolicy`].
//!
//! Engine: one `wasmtime::Engine` per host with the pooling instance allocator,
//! epoch interruption and fuel; a background thread advances the epoch every
//! [`HostConfig::epoch_tick`], and each callback runs under its plugin's
//! [`Limits::callback_deadline`], counted in the CPU time of the thread that
//! runs it (`instance::CpuDeadline`); after a missed deadline, the plugin's
//! callbacks are held to a budget of fuel for a while
//! ([`Limits::deadline_clamp`], `clamp`).
//! Modules are compiled once (a load of the same bytes while a plugin
//! compiled from them is loaded reuses its module: [`PluginHost::module_stats`]) and
//! linked once per load into an `InstancePre`; requests reuse pre-configured instances
//! from a per-plugin pool, each request getting a new proxy-wasm context id.
//!
//! Instances host many request contexts at once, as Envoy's VMs do: a
//! request is pinned to one instance but locks it only for the duration of
//! each of its callbacks, so slow clients cannot exhaust the pool. A new
//! request gets an idle instance of its plugin, else a new one while the host
//! has a slot to spare, else a share of the plugin's least busy instance.
//! When no instance can be had the host reports overload
//! ([`PluginError::is_overload`]): answer 503, never skip the plugin. A guest
//! failure discards its instance; the other contexts it hosted fail with
//! [`ErrorKind::InstanceLost`], which the failure policy maps.
//!
//! Guests cannot panic the host: every pointer and length is checked, data
//! returned to a guest is serialized before its allocator runs, and what the
//! allocator returns is checked (a bad region traps the guest). A guest's
//! appetite is bounded: header maps, bodies and properties it builds, its
//! shared data ([`HostConfig::shared_data_max_bytes`]) and its log output
//! ([`HostConfig::log_lines_per_second`]).
//!
//! [proxy-wasm ABI 0.2.1]: https://github.com/proxy-wasm/spec/tree/main/abi-versions/v0.2.1

pub mod abi;
mod clamp;
mod error;
mod hostcalls;
mod instance;
mod metrics;
mod plugin;
mod ratelimit;
mod shared;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, Linker, Module, PoolingAllocationConfig,
};

pub use abi::{HeaderEdit, HeaderList, LogLevel, MetricKind, Status};
pub use error::{ErrorKind, PluginError, Result};
pub use metrics::MetricSnapshot;
pub use plugin::{
    Action, FailurePolicy, HttpCallRequest, HttpCallResponse, Limits, LocalResponse, Plugin,
    PluginStats, RequestContext,
};
pub use shared::SharedData;

use instance::{HostState, PluginShared};

/// Supplies property values (`proxy_get_property`) that the host does not
/// know itself, e.g. `source.address` or `meridian.client.country`.
///
/// Built in: `plugin_name`, `plugin_root_id`, and, while the request headers
/// are available, `request.path`, `request.method`, `request.host`,
/// `request.scheme`, `request.headers` (serialized map) and
/// `request.headers.<name>`.
pub trait PropertyResolver: Send + Sync {
    /// Value of the property at `path` (e.g. `["source", "address"]`).
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
}

/// How much of a freed linear memory is zeroed in place (the pages it
/// wrote, with `PAGEMAP_SCAN`; else its first bytes) rather than given back
/// with `madvise`. A failed callback discards its instance, so a plugin
/// failing on 1% of 16,000 requests a second frees 160 memories a second.
/// With traps on every 10th request (the `plugin` chaos scenario,
/// `--every 10`), wasmtime's default `madvise` took 5.4% of the edge's CPU
/// and the reset in place takes 1.2%, and the edge CPU per failed request
/// fell from 97–176 µs to 70–96 µs (three runs each; docs/soak-chaos.md).
/// Freed slots keep at most this much resident each, for at most
/// wasmtime's `max_unused_warm_slots` (100) slots.
pub const MEMORY_KEEP_RESIDENT: usize = 256 << 10;
/// The same for a freed table.
pub const TABLE_KEEP_RESIDENT: usize = 64 << 10;

/// Host-wide settings.
#[derive(Clone)]
pub struct HostConfig {
    /// Pool size: the most instances (of all plugins together) alive at once.
    pub max_instances: u32,
    /// Ceiling on any plugin's linear memory; each plugin's
    /// [`Limits::memory_bytes`] must be at most this.
    pub max_memory_bytes: usize,
    /// Epoch interval; deadlines are checked at this granularity.
    pub epoch_tick: Duration,
    /// Idle instances kept per plugin.
    pub max_idle_instances_per_plugin: usize,
    /// How long a callback waits for its instance while callbacks of other
    /// requests pinned to it run (each is bounded by its deadline); past
    /// it, the callback fails with [`PluginError::Busy`] (overload).
    pub lock_wait: Duration,
    /// Per plugin, the most log lines (`proxy_log`, and WASI `fd_write` to
    /// stdout or stderr) per second, with a burst of as many; the excess is
    /// dropped and counted ([`PluginStats::logs_suppressed`]). 0 drops all.
    pub log_lines_per_second: u32,
    /// Per plugin, the most bytes of keys and values in its shared data;
    /// writes past it fail with `InternalFailure`.
    pub shared_data_max_bytes: usize,
    /// Count wasmtime fuel in every callback, so that a plugin's deadline
    /// can be clamped to a budget of fuel after a miss
    /// ([`Limits::deadline_clamp`]). Off: guest code runs without the
    /// counter (a tight wasm loop about 40% faster, a request through
    /// `jwt-auth` checking an HS256 token about 12%), and no plugin is ever
    /// clamped: a looping callback costs its whole deadline every time.
    pub fuel: bool,
    /// Host-wide property resolver, consulted last.
    pub properties: Option<Arc<dyn PropertyResolver>>,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            max_instances: 256,
            max_memory_bytes: 64 << 20,
            epoch_tick: Duration::from_millis(5),
            max_idle_instances_per_plugin: 32,
            lock_wait: Duration::from_secs(1),
            log_lines_per_second: 100,
            shared_data_max_bytes: shared::DEFAULT_MAX_BYTES,
            fuel: true,
            properties: None,
        }
    }
}

impl std::fmt::Debug for HostConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostConfig")
            .field("max_instances", &self.max_instances)
            .field("max_memory_bytes", &self.max_memory_bytes)
            .field("epoch_tick", &self.epoch_tick)
            .field("fuel", &self.fuel)
            .field(
                "max_idle_instances_per_plugin",
                &self.max_idle_instances_per_plugin,
            )
            .field("lock_wait", &self.lock_wait)
            .field("log_lines_per_second", &self.log_lines_per_second)
            .field("shared_data_max_bytes", &self.shared_data_max_bytes)
            .finish_non_exhaustive()
    }
}

/// The background thread that advances the engine's epoch. Shared by the host
/// and its plugins; stops when the last of them is dropped.
pub(crate) struct Ticker {
    stop: Arc<AtomicBool>,
    /// The coarse clock it advances (the deadline clamps read it).
    pub(crate) clock: Arc<clamp::Clock>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Ticker {
    fn start(engine: Engine, tick: Duration, clock: Arc<clamp::Clock>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let ticking = clock.clone();
        let handle = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                let clock = ticking;
                let mut next = Instant::now() + tick;
                while !flag.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    if now < next {
                        std::thread::park_timeout(next - now);
                        continue;
                    }
                    engine.increment_epoch();
                    clock.advance(now);
                    next += tick;
                    if next < now {
                        next = now + tick;
                    }
                }
            })?;
        Ok(Self {
            stop,
            clock,
            handle: Mutex::new(Some(handle)),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.lock().take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

/// The plugin host: one engine, one epoch ticker, any number of plugins.
pub struct PluginHost {
    engine: Engine,
    linker: Linker<HostState>,
    defined: hostcalls::Defined,
    ticker: Arc<Ticker>,
    slots: Arc<instance::Slots>,
    config: HostConfig,
    modules: ModuleCache,
}

/// Compiled modules by the SHA-256 of their bytes, kept for as long as a
/// loaded plugin uses them: a config reload that keeps a plugin's file loads
/// it without compiling it again (compiling is most of a load's cost: a
/// 1,200-function test plugin took seconds of CPU in a debug build). Nothing
/// is kept for a module no plugin uses any more.
#[derive(Default)]
struct ModuleCache {
    by_digest: Mutex<HashMap<[u8; 32], Weak<Module>>>,
    compiled: AtomicU64,
    reused: AtomicU64,
}

/// How [`PluginHost::load`] came by its plugins' modules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModuleStats {
    /// Loads that compiled their module.
    pub compiled: u64,
    /// Loads that reused the module of a plugin still loaded, with the same bytes.
    pub reused: u64,
}

impl ModuleCache {
    /// The module for `wasm`: a live one with the same digest, else `compile`'s.
    fn get_or_compile(
        &self,
        wasm: &[u8],
        compile: impl FnOnce() -> Result<Module>,
    ) -> Result<Arc<Module>> {
        let digest: [u8; 32] = {
            let d = ring::digest::digest(&ring::digest::SHA256, wasm);
            let mut out = [0; 32];
            out.copy_from_slice(d.as_ref());
            out
        };
        if let Some(m) = self.by_digest.lock().get(&digest).and_then(Weak::upgrade) {
            self.reused.fetch_add(1, Ordering::Relaxed);
            return Ok(m);
        }
        // Compiled without the lock: two loads of the same new bytes at once
        // both compile (the second's entry wins), which is rare and harmless.
        let module = Arc::new(compile()?);
        self.compiled.fetch_add(1, Ordering::Relaxed);
        let mut map = self.by_digest.lock();
        map.retain(|_, w| w.strong_count() > 0);
        map.insert(digest, Arc::downgrade(&module));
        Ok(module)
    }
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl PluginHost {
    /// Build the engine (pooling allocator, epoch interruption), the linker
    /// with every host function, and start the epoch ticker.
    pub fn new(config: HostConfig) -> Result<Self> {
        let engine_err = |e: &dyn std::fmt::Display| PluginError::Engine(e.to_string());
        if config.epoch_tick.is_zero() {
            return Err(PluginError::Engine("epoch_tick must be non-zero".into()));
        }
        let mut pool = PoolingAllocationConfig::new();
        pool.total_core_instances(config.max_instances)
            .total_memories(config.max_instances)
            .total_tables(config.max_instances)
            .max_memory_size(config.max_memory_bytes)
            // A discarded instance's memory is reset for the next one by
            // zeroing the pages it wrote (found with `PAGEMAP_SCAN`, Linux
            // 6.7+), up to these many bytes, instead of `madvise`: each
            // `madvise` in a process whose other threads run on other CPUs
            // is a TLB shootdown, which interrupts those threads (on a
            // virtual machine, through the hypervisor). See
            // `MEMORY_KEEP_RESIDENT`.
            .linear_memory_keep_resident(MEMORY_KEEP_RESIDENT)
            .table_keep_resident(TABLE_KEEP_RESIDENT)
            .pagemap_scan(wasmtime::Enabled::Auto);
        let mut cfg = Config::new();
        // Fuel is counted in every callback (the clamp's peaks, and the
        // budget of a clamped plugin's callbacks): a counter in a register,
        // checked at loop heads and calls. It cost nothing measurable on
        // the example plugins (bench/RESULTS.md, "Fuel").
        cfg.epoch_interruption(true)
            .consume_fuel(config.fuel)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&cfg).map_err(|e| engine_err(&e))?;
        let mut linker = Linker::new(&engine);
        let defined = hostcalls::add_to_linker(&mut linker).map_err(|e| engine_err(&e))?;
        let ticker = Arc::new(
            Ticker::start(
                engine.clone(),
                config.epoch_tick,
                Arc::new(clamp::Clock::new()),
            )
            .map_err(|e| engine_err(&e))?,
        );
        Ok(Self {
            engine,
            linker,
            defined,
            ticker,
            slots: instance::Slots::new(config.max_instances),
            config,
            modules: ModuleCache::default(),
        })
    }

    /// How many loads compiled their module, and how many reused one.
    pub fn module_stats(&self) -> ModuleStats {
        ModuleStats {
            compiled: self.modules.compiled.load(Ordering::Relaxed),
            reused: self.modules.reused.load(Ordering::Relaxed),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The settings the host was built with.
    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// Compile `wasm` (binary format) once, link it, create the first instance
    /// and run its root context through `proxy_on_vm_start` and
    /// `proxy_on_configure` (with `plugin_config` as `PLUGIN_CONFIGURATION`).
    /// That instance becomes the first of the plugin's pool. It needs a free
    /// instance slot, or an idle instance of another plugin to evict.
    pub fn load(
        &self,
        name: &str,
        wasm: &[u8],
        plugin_config: &[u8],
        limits: Limits,
        policy: FailurePolicy,
    ) -> Result<Plugin> {
        let invalid = |message: String| PluginError::InvalidAbi {
            plugin: name.to_owned(),
            message,
        };
        if limits.memory_bytes > self.config.max_memory_bytes {
            return Err(PluginError::Usage {
                plugin: name.to_owned(),
                message: format!(
                    "memory limit {} exceeds the host maximum {}",
                    limits.memory_bytes, self.config.max_memory_bytes
                ),
            });
        }
        let module = self.modules.get_or_compile(wasm, || {
            Module::new(&self.engine, wasm).map_err(|e| PluginError::Compile {
                plugin: name.to_owned(),
                message: format!("{e:#}"),
            })
        })?;
        check_exports(&module).map_err(invalid)?;

        let mut linker = self.linker.clone();
        let stubbed = hostcalls::stub_unknown_imports(&mut linker, &self.defined, &module)
            .map_err(invalid)?;
        if !stubbed.is_empty() {
            tracing::info!(plugin = name, imports = ?stubbed, "unknown imports stubbed as Unimplemented");
        }
        let pre = linker
            .instantiate_pre(&module)
            .map_err(|e| invalid(format!("{e:#}")))?;

        let shared = Arc::new(PluginShared {
            name: name.to_owned(),
            vm_config: Bytes::new(),
            plugin_config: Bytes::copy_from_slice(plugin_config),
            metrics: Default::default(),
            shared_data: SharedData::new(self.config.shared_data_max_bytes),
            host_properties: self.config.properties.clone(),
            tick_period_ms: AtomicU32::new(0),
            memory_limit: limits.memory_bytes,
            stats: Default::default(),
            clock: self.ticker.clock.clone(),
            // Without fuel there is nothing to clamp to.
            clamp: clamp::Clamp::new(if self.config.fuel {
                limits.deadline_clamp
            } else {
                Duration::ZERO
            }),
            fuel: self.config.fuel,
            log_bucket: Mutex::new(ratelimit::LogBucket::new(self.config.log_lines_per_second)),
        });
        let inner = Arc::new(plugin::PluginInner {
            shared,
            pre,
            limits,
            policy,
            max_idle: self.config.max_idle_instances_per_plugin,
            lock_wait: self.config.lock_wait,
            pool: Mutex::default(),
            slots: self.slots.clone(),
            _ticker: self.ticker.clone(),
            _module: module,
        });
        let first = inner.instantiate(instance::Need::First)?;
        self.slots.register(&inner);
        if !limits.fresh_instance_per_request {
            inner.pool_idle(first);
        }
        Ok(Plugin { inner })
    }
}

/// Require a proxy-wasm 0.2.x ABI marker, a memory export and well-typed callbacks.
fn check_exports(module: &Module) -> std::result::Result<(), String> {
    use wasmtime::ExternType;
    let has = |n: &str| module.get_export(n).is_some();
    if !has("proxy_abi_version_0_2_1") && !has("proxy_abi_version_0_2_0") {
        return Err(
            "missing export proxy_abi_version_0_2_1 (or _0_2_0); only ABI 0.2.x is supported"
                .into(),
        );
    }
    match module.get_export("memory") {
        Some(ExternType::Memory(_)) => {}
        _ => return Err("missing memory export \"memory\"".into()),
    }
    for &(name, params, results) in instance::CALLBACK_SIGNATURES {
        match module.get_export(name) {
            None => {}
            Some(ExternType::Func(f)) => {
                let ok = f.params().len() == params
                    && f.results().len() == results
                    && f.params()
                        .chain(f.results())
                        .all(|t| matches!(t, wasmtime::ValType::I32));
                if !ok {
                    return Err(format!(
                        "export {name} has signature {f}, expected {params} i32 params and {results} i32 results"
                    ));
                }
            }
            Some(_) => return Err(format!("export {name} is not a function")),
        }
    }
    Ok(())
}
