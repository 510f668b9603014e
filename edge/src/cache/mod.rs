//! The HTTP cache: the RFC 9111 policy ([`policy`], pure, no I/O or clocks),
//! the per-request decisions ([`machine`], pure too), storage on foyer, and
//! the shared cache state ([`http::HttpCache`]: storage, flights,
//! hit-for-pass, purges). The proxy drives it (`proxy::cache`); nothing
//! here imports the proxy.

pub mod acl;
pub mod http;
pub mod keys;
pub mod machine;
pub mod meta;
pub(crate) mod partial;
pub mod policy;
pub mod purge;
pub mod range;
pub mod site;
pub mod slice;
pub(crate) mod spool;
pub mod storage;
