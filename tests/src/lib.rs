//! # meridian-e2e
//!
//! End-to-end test support shared by every component's tests: a real origin
//! that counts what it receives ([`origin`]), certificates ([`certs`]), a
//! harness that runs a real binary on ephemeral ports ([`harness`]), and
//! HTTP clients over plain TCP and TLS with a chosen ALPN ([`client`]).
//!
//! Everything binds 127.0.0.1 port 0, and every wait is bounded.

pub mod certs;
pub mod client;
pub mod harness;
pub mod origin;

/// Installs ring as the rustls provider of the test process.
pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
