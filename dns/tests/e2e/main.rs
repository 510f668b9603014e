//! End-to-end tests for `meridian-dns`: each starts the real binary on
//! 127.0.0.1/::1 port 0, reads the bound addresses back from stdout, and
//! queries it with hickory (raw messages and hickory's client) and kdig.

mod admin_auth;
mod cli;
mod correctness;
mod dnssec;
mod failover;
mod hickory_client;
mod kdig;
mod reload;
mod rrl;
mod secondary;
mod steering;
mod support;
mod tcp_limits;
