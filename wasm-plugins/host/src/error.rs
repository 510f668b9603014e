//! The host's error type.

use std::time::Duration;

/// What went wrong, without the details: cheap to match and to use as a
/// metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Engine or pool set-up failed.
    Engine,
    /// The module failed to compile or validate.
    Compile,
    /// The module does not speak proxy-wasm 0.2.x (missing ABI marker, wrong
    /// callback signature, missing memory export, non-function import).
    InvalidAbi,
    /// A new instance could not be created (initial memory above the
    /// limit, start function trapped...).
    Instantiate,
    /// No instance of the plugin could be had: the plugin has none, and every
    /// instance slot of the host is taken by instances serving requests (none
    /// idle to evict). Overload, not a plugin failure: a caller may wait and
    /// try again, and must not skip the plugin (see [`FailurePolicy`]).
    ///
    /// [`FailurePolicy`]: crate::FailurePolicy
    Exhausted,
    /// The request's instance stayed locked by callbacks of other requests
    /// for longer than [`crate::HostConfig::lock_wait`]. Overload, like
    /// [`ErrorKind::Exhausted`].
    Busy,
    /// The instance that held the request's context was discarded after a
    /// guest failure in another request's callback (trap, deadline, memory
    /// limit, exit): the context's state is gone. Treated as a failure of the
    /// plugin by the policy, but not counted again.
    InstanceLost,
    /// `proxy_on_vm_start` or `proxy_on_configure` returned false.
    ConfigureRejected,
    /// The guest trapped (unreachable, out-of-bounds access, stack overflow...).
    Trap,
    /// A callback ran past its deadline (epoch interruption), or past the
    /// fuel of its clamped deadline.
    DeadlineExceeded,
    /// The guest tried to grow its memory beyond the plugin's limit.
    MemoryLimit,
    /// The guest called WASI `proc_exit`.
    Exited,
    /// The embedder used the API out of order (e.g. a callback on a context
    /// whose instance already failed).
    Usage,
}

/// Errors returned by the host. The `plugin` field names the plugin, the
/// `callback` field the guest export that was running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    #[error("wasm engine setup failed: {0}")]
    Engine(String),
    #[error("plugin {plugin}: compile failed: {message}")]
    Compile { plugin: String, message: String },
    #[error("plugin {plugin}: not a proxy-wasm 0.2.x module: {message}")]
    InvalidAbi { plugin: String, message: String },
    #[error("plugin {plugin}: instantiation failed: {message}")]
    Instantiate { plugin: String, message: String },
    #[error("plugin {plugin}: all {limit} plugin instances of the host are in use")]
    Exhausted { plugin: String, limit: u32 },
    #[error(
        "plugin {plugin}: {callback} waited {waited:?} for its instance, busy with other requests"
    )]
    Busy {
        plugin: String,
        callback: &'static str,
        waited: Duration,
    },
    #[error(
        "plugin {plugin}: the instance of this request was discarded after another request's failure"
    )]
    InstanceLost { plugin: String },
    #[error("plugin {plugin}: {callback} returned false")]
    ConfigureRejected {
        plugin: String,
        callback: &'static str,
    },
    #[error("plugin {plugin}: trap in {callback}: {message}")]
    Trap {
        plugin: String,
        callback: &'static str,
        message: String,
    },
    #[error(
        "plugin {plugin}: {callback} exceeded its {deadline:?} deadline{}",
        used_note(*.used)
    )]
    DeadlineExceeded {
        plugin: String,
        callback: &'static str,
        deadline: Duration,
        /// The CPU time the callback used from its first check to its cut
        /// (`None` if no check had measured it).
        used: Option<Duration>,
    },
    /// A callback of a plugin whose deadline is clamped (after a missed
    /// one, [`crate::Limits::deadline_clamp`]) used all the fuel the clamp
    /// gives. Its kind is [`ErrorKind::DeadlineExceeded`].
    #[error(
        "plugin {plugin}: {callback} used all {fuel} units of fuel its deadline is clamped to after a missed deadline"
    )]
    FuelExhausted {
        plugin: String,
        callback: &'static str,
        fuel: u64,
    },
    #[error("plugin {plugin}: {callback} exceeded the memory limit of {limit_bytes} bytes")]
    MemoryLimit {
        plugin: String,
        callback: &'static str,
        limit_bytes: usize,
    },
    #[error("plugin {plugin}: proc_exit({code}) in {callback}")]
    Exited {
        plugin: String,
        callback: &'static str,
        code: i32,
    },
    #[error("plugin {plugin}: {message}")]
    Usage { plugin: String, message: String },
}

impl PluginError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Engine(_) => ErrorKind::Engine,
            Self::Compile { .. } => ErrorKind::Compile,
            Self::InvalidAbi { .. } => ErrorKind::InvalidAbi,
            Self::Instantiate { .. } => ErrorKind::Instantiate,
            Self::Exhausted { .. } => ErrorKind::Exhausted,
            Self::Busy { .. } => ErrorKind::Busy,
            Self::InstanceLost { .. } => ErrorKind::InstanceLost,
            Self::ConfigureRejected { .. } => ErrorKind::ConfigureRejected,
            Self::Trap { .. } => ErrorKind::Trap,
            Self::DeadlineExceeded { .. } | Self::FuelExhausted { .. } => {
                ErrorKind::DeadlineExceeded
            }
            Self::MemoryLimit { .. } => ErrorKind::MemoryLimit,
            Self::Exited { .. } => ErrorKind::Exited,
            Self::Usage { .. } => ErrorKind::Usage,
        }
    }

    /// True when no instance could be had for the request ([`ErrorKind::Exhausted`],
    /// [`ErrorKind::Busy`]): the host is overloaded. Answer 503 whatever the
    /// plugin's failure policy: an overloaded host must never let a request
    /// skip a plugin (an auth plugin, say).
    pub fn is_overload(&self) -> bool {
        matches!(self.kind(), ErrorKind::Exhausted | ErrorKind::Busy)
    }

    /// True for failures of guest code at run time (trap, deadline, memory,
    /// exit); these are counted and poison the instance.
    pub fn is_guest_failure(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::Trap
                | ErrorKind::DeadlineExceeded
                | ErrorKind::MemoryLimit
                | ErrorKind::Exited
        )
    }
}

fn used_note(used: Option<Duration>) -> String {
    used.map(|u| format!(", after {u:?} of CPU"))
        .unwrap_or_default()
}

pub type Result<T, E = PluginError> = std::result::Result<T, E>;
