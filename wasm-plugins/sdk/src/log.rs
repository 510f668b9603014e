//! Logging through the host (`proxy_log`).
//!
//! The macros format only when the host's log level lets the message
//! through; the level is read from the host when the plugin is configured.
//! (The `log` crate works too: the SDK installs proxy-wasm's logger for it.)
//!
//! ```
//! meridian_plugin_sdk::info!("rewrote {} bytes", 42);
//! meridian_plugin_sdk::log::warn("plain message");
//! ```

use std::sync::atomic::{AtomicU8, Ordering};

use crate::LogLevel;
use crate::sys;

static LEVEL: AtomicU8 = AtomicU8::new(0);

fn level_to_u8(l: LogLevel) -> u8 {
    l as u8
}

/// Re-read the host's log level (the SDK does this at configure time).
pub fn refresh_level() {
    LEVEL.store(level_to_u8(sys::log_level()), Ordering::Relaxed);
}

/// `true` if a message at `level` would be logged.
pub fn enabled(level: LogLevel) -> bool {
    level_to_u8(level) >= LEVEL.load(Ordering::Relaxed)
}

/// Log `msg` at `level`.
pub fn log(level: LogLevel, msg: &str) {
    if enabled(level) {
        sys::log(level, msg);
    }
}

/// Log at trace level.
pub fn trace(msg: &str) {
    log(LogLevel::Trace, msg);
}

/// Log at debug level.
pub fn debug(msg: &str) {
    log(LogLevel::Debug, msg);
}

/// Log at info level.
pub fn info(msg: &str) {
    log(LogLevel::Info, msg);
}

/// Log at warn level.
pub fn warn(msg: &str) {
    log(LogLevel::Warn, msg);
}

/// Log at error level.
pub fn error(msg: &str) {
    log(LogLevel::Error, msg);
}

/// Log a formatted message at a level: `log!(LogLevel::Info, "x = {}", x)`.
#[macro_export]
macro_rules! log {
    ($level:expr, $($arg:tt)+) => {{
        let level = $level;
        if $crate::log::enabled(level) {
            $crate::log::log(level, &::std::format!($($arg)+));
        }
    }};
}

/// Log a formatted message at trace level.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => { $crate::log!($crate::LogLevel::Trace, $($arg)+) };
}

/// Log a formatted message at debug level.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::log!($crate::LogLevel::Debug, $($arg)+) };
}

/// Log a formatted message at info level.
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::log!($crate::LogLevel::Info, $($arg)+) };
}

/// Log a formatted message at warn level.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::log!($crate::LogLevel::Warn, $($arg)+) };
}

/// Log a formatted message at error level.
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::log!($crate::LogLevel::Error, $($arg)+) };
}
