//! A site's use of the cache, built once per config generation, and what
//! every client response from the cache gets.

use std::time::Duration;

use http::header::HeaderMap;

use super::meta::SOFT_PURGE;
use super::policy::{self, KeyOptions, PolicyConfig};
use crate::config::{CacheConfig, Cidr, SetCookie, SiteCache};

/// The name in `Cache-Status`.
pub const CACHE_NAME: &str = "meridian";
/// A site's cache settings, built once per config generation.
#[derive(Debug)]
pub struct SitePolicy {
    pub policy: PolicyConfig,
    pub key: KeyOptions,
    pub strip_tags: bool,
    pub cache_status: bool,
    pub lock_timeout: Duration,
    pub hit_for_pass: Duration,
    pub purge_allow: Vec<Cidr>,
    /// Slice mode's slice size; 0 when off.
    pub slice_size: u64,
    pub set_cookie: SetCookie,
    /// The largest object fetched whole for no client (see the config).
    pub background_fill_max: u64,
}

impl SitePolicy {
    pub fn new(site: &SiteCache, global: &CacheConfig) -> Self {
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        SitePolicy {
            policy: PolicyConfig {
                default_ttl: nonzero(site.default_ttl.get()),
                default_stale_while_revalidate: nonzero(site.stale_while_revalidate.get()),
                default_stale_if_error: nonzero(site.stale_if_error.get()),
                stale_if_unreachable: nonzero(site.stale_if_unreachable.get()),
                s_maxage_allows_origin_stale: site.s_maxage_allows_stale,
                strip_surrogate_keys: site.strip_tags,
                ..PolicyConfig::default()
            },
            key: KeyOptions {
                sort_query: site.sort_query,
                drop_params: site.ignore_params.clone(),
            },
            strip_tags: site.strip_tags,
            cache_status: site.cache_status,
            lock_timeout: global.lock_timeout.get(),
            hit_for_pass: global.hit_for_pass.get(),
            purge_allow: global.purge_allow.clone(),
            slice_size: site.slice_size.get(),
            set_cookie: site.set_cookie,
            background_fill_max: global.background_fill_max.get(),
        }
    }
}

/// Headers no client response carries: the targeted cache field consumed here,
/// and (if configured) the surrogate keys.
pub fn downstream_headers(h: &mut HeaderMap, sp: &SitePolicy) {
    for n in policy::headers_to_strip_downstream(h, &sp.policy) {
        h.remove(n);
    }
    h.remove(SOFT_PURGE);
    if sp.strip_tags {
        h.remove(policy::surrogate::SURROGATE_KEY);
        h.remove(policy::surrogate::CACHE_TAG);
    }
}
