//! # meridian-edge
//!
//! Meridian's POP daemon: a TLS-terminating HTTP/1.1 and HTTP/2 reverse proxy
//! (HTTP/3 and the cache plug into the same pipeline).
//!
//! Entry points:
//! - [`server::run`] runs the daemon from a [`config::Config`];
//! - [`proxy::Proxy::handle`] is the request pipeline every protocol uses;
//! - [`demo`] is the embedded demo (origin, certificate and config).
//!
//! The layout follows `ARCHITECTURE.md`: `listener` (sockets, TLS), `http`
//! (client connections), `proxy` (pipeline, routing, upstream pools),
//! `admin`, `config`, `metrics`.

pub mod accesslog;
pub mod admin;
pub mod anycast;
pub mod cache;
pub mod config;
pub mod demo;
pub mod error;
pub mod http;
pub mod http3;
pub mod listener;
pub mod metrics;
pub mod plugins;
pub mod proxy;
pub mod server;
pub mod util;

/// Installs ring as the process's one rustls crypto provider. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
