//! Loading: the Wasm host, each site's plugin chain, and the tick tasks.

use std::sync::Arc;
use std::time::Duration;

use meridian_wasm_host::{FailurePolicy, HostConfig, Plugin, PluginHost};

use crate::config::{PluginConfig, PluginsConfig};
use crate::util::LogThrottle;

/// One loaded plugin of a site's chain.
pub struct LoadedPlugin {
    pub name: Arc<str>,
    pub plugin: Plugin,
    /// Response phase on every client response (hits too), not before storing.
    pub every_response: bool,
    /// The most body bytes the plugin may hold back by pausing.
    pub body_buffer: usize,
    /// The plugin's failure warnings: at most one a second (each failure
    /// is counted in `meridian_plugin_results_total`).
    pub failure_log: LogThrottle,
}

/// The tracing target of the debug line every plugin failure also logs
/// (`level = "warn,meridian_edge::plugins::failures=debug"` shows them all).
pub const FAILURE_TARGET: &str = "meridian_edge::plugins::failures";

/// At most one failure warning per plugin per this interval.
pub const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(1);

impl LoadedPlugin {
    /// Logs one of the plugin's failures as a warning, unless one was logged
    /// less than [`FAILURE_LOG_INTERVAL`] ago (the line says how many were
    /// not). Every failure is also a debug line of the target
    /// [`FAILURE_TARGET`], for a filter that asks for them all.
    pub fn warn_failure(&self, e: &dyn std::fmt::Display, what: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.failure_log.may_log() {
            tracing::warn!(
                plugin = %self.name,
                suppressed,
                error = %e,
                "{what} (at most one failure warning per plugin per second; `suppressed` = failures since the last one)"
            );
        } else {
            tracing::debug!(target: FAILURE_TARGET, plugin = %self.name, error = %e, "{what}");
        }
    }
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.name)
            .finish()
    }
}

/// A site's plugin chain, shared by its requests' exchanges.
pub type Chain = Arc<[Arc<LoadedPlugin>]>;

/// The process's plugin host (one wasmtime engine), created on first need.
pub fn new_host(cfg: &PluginsConfig) -> Result<Arc<PluginHost>, String> {
    PluginHost::new(HostConfig {
        max_instances: cfg.max_instances,
        // Every instance a burst needed stays pooled: re-instantiating copies
        // the module's data segments, which costs far more than the memory.
        max_idle_instances_per_plugin: cfg.max_instances as usize,
        // A callback waits this long for an instance busy with others'.
        lock_wait: cfg.instance_wait.get(),
        fuel: cfg.fuel,
        ..HostConfig::default()
    })
    .map(Arc::new)
    .map_err(|e| format!("starting the Wasm host: {e}"))
}

/// Loads (compiles and configures) a site's plugins; any failure refuses the config.
pub fn load_chain(
    host: &PluginHost,
    site: &str,
    cfgs: &[PluginConfig],
) -> Result<Vec<Arc<LoadedPlugin>>, String> {
    let mut out = Vec::with_capacity(cfgs.len());
    for (i, c) in cfgs.iter().enumerate() {
        let wasm = std::fs::read(&c.path).map_err(|e| format!("{}: {e}", c.path.display()))?;
        // Inline, or read from `config_file` (again on every reload).
        let config: Vec<u8> = c.config_bytes()?;
        let limits = meridian_wasm_host::Limits {
            memory_bytes: c.memory.get() as usize,
            callback_deadline: c.deadline.get(),
            deadline_clamp: c.deadline_clamp.get(),
            fresh_instance_per_request: c.fresh_instance,
        };
        let policy = if c.failure == "open" {
            FailurePolicy::Open
        } else {
            FailurePolicy::Closed
        };
        let stem = c.path.file_stem().map_or_else(
            || format!("plugin{i}"),
            |s| s.to_string_lossy().into_owned(),
        );
        let name = format!("{site}/{stem}");
        let plugin = host
            .load(&name, &wasm, &config, limits, policy)
            .map_err(|e| format!("{}: {e}", c.path.display()))?;
        out.push(Arc::new(LoadedPlugin {
            name: Arc::from(name),
            plugin,
            every_response: c.every_response,
            body_buffer: usize::try_from(c.body_buffer.get()).unwrap_or(usize::MAX),
            failure_log: LogThrottle::new(FAILURE_LOG_INTERVAL),
        }));
    }
    Ok(out)
}

/// Tasks that call `proxy_on_tick` for plugins that asked for a tick period.
/// They end when the plugin is unloaded (the generation is dropped).
pub fn spawn_tickers(chain: &[Arc<LoadedPlugin>]) -> Vec<tokio::task::JoinHandle<()>> {
    chain
        .iter()
        .filter_map(|lp| {
            let period = lp.plugin.tick_period()?.max(Duration::from_millis(10));
            let weak = Arc::downgrade(lp);
            Some(tokio::spawn(async move {
                let mut iv = tokio::time::interval(period);
                iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                iv.tick().await;
                loop {
                    iv.tick().await;
                    let Some(lp) = weak.upgrade() else { break };
                    if let Err(e) = lp.plugin.on_tick() {
                        lp.warn_failure(&e, format_args!("plugin tick failed"));
                    }
                }
            }))
        })
        .collect()
}
