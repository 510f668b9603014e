//! # meridian-dns
//!
//! Meridian's GeoIP-aware authoritative DNS server, built on
//! `hickory-server`. It serves static zones from RFC 1035 zone files and
//! *steered* names whose A/AAAA answers come from the region nearest to the
//! client (by GeoIP location of the client or of its EDNS Client Subnet),
//! subject to overrides, health checks and operator drains.
//!
//! Entry points:
//! - [`server::start`] binds the listeners and returns a [`server::Running`];
//! - [`handler::Runtime::respond`] answers one query (what the hickory
//!   [`handler::DnsHandler`] calls), without I/O;
//! - [`steering::decide`] is the pure steering policy;
//! - [`model::load`] parses and validates a configuration;
//! - [`geo::build_from_csv`] compiles a MaxMind DB from CSV.
//!
//! The `meridian-dns` binary wraps these; see `docs/dns.md`.

pub mod admin;
pub mod config;
pub mod dnssec;
pub mod geo;
pub mod handler;
pub mod health;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod rrl;
pub mod server;
pub mod steering;
pub mod tcp;
pub mod transfer;
pub mod tsig;
pub mod zone;
