//! The HTTP cache: the RFC 9111 policy ([`policy`], pure, no I/O or clocks).
//! Storage and the pipeline stage plug in beside it.

pub mod acl;
pub mod http;
pub(crate) mod partial;
pub mod policy;
pub mod purge;
pub mod range;
pub mod slice;
pub(crate) mod spool;
pub mod storage;
