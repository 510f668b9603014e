//! Header handling of a proxy (RFC 9110 §7.6): hop-by-hop fields removed,
//! `Via` added, and the client's address forwarded.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderValue};

use crate::config::ForwardedMode;

pub use crate::http::strip_hop_by_hop;

/// The `Via` values of this node for each protocol version, built once per
/// config: "1.0 p", "1.1 p", "2 p", "3 p". Empty when `Via` is disabled.
#[derive(Debug, Default)]
pub struct ViaValues(Vec<HeaderValue>);

impl ViaValues {
    pub fn new(pseudonym: &str) -> Self {
        if pseudonym.is_empty() {
            return ViaValues(Vec::new());
        }
        ViaValues(
            ["1.0", "1.1", "2", "3"]
                .iter()
                .filter_map(|p| HeaderValue::from_str(&format!("{p} {pseudonym}")).ok())
                .collect(),
        )
    }

    /// Appends this node to `Via` for a message received in `version`.
    pub fn add(&self, h: &mut HeaderMap, version: http::Version) {
        let i = match version {
            http::Version::HTTP_10 => 0,
            http::Version::HTTP_2 => 2,
            http::Version::HTTP_3 => 3,
            _ => 1,
        };
        if let Some(v) = self.0.get(i) {
            h.append(header::VIA, v.clone());
        }
    }
}

/// Adds X-Forwarded-* and/or Forwarded for the client at `ip`.
pub fn add_forwarded(
    h: &mut HeaderMap,
    mode: ForwardedMode,
    ip: IpAddr,
    https: bool,
    host: Option<&str>,
) {
    let proto = if https { "https" } else { "http" };
    if matches!(mode, ForwardedMode::XForwarded | ForwardedMode::Both) {
        let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            h.insert("x-forwarded-for", v);
        }
        h.insert("x-forwarded-proto", HeaderValue::from_static(proto));
        if let Some(host) = host.and_then(|x| HeaderValue::from_str(x).ok()) {
            h.insert("x-forwarded-host", host);
        }
    }
    if matches!(mode, ForwardedMode::Forwarded | ForwardedMode::Both) {
        let node = match ip {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("\"[{a}]\""),
        };
        let mut v = format!("for={node};proto={proto}");
        if let Some(host) = host.filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b';' && b != b',')
        }) {
            v.push_str(";host=");
            v.push_str(host);
        }
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.append(header::FORWARDED, v);
        }
    }
}

/// Whether a request asks for a WebSocket-style upgrade.
pub fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_named_fields() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get(header::TRANSFER_ENCODING).is_none());
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h["x-keep"], "1");
    }

    #[test]
    fn forwarded_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        add_forwarded(
            &mut h,
            ForwardedMode::Both,
            "2001:db8::1".parse().expect("ip"),
            true,
            Some("example.com"),
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 2001:db8::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(
            h[header::FORWARDED],
            "for=\"[2001:db8::1]\";proto=https;host=example.com"
        );
        ViaValues::new("meridian").add(&mut h, http::Version::HTTP_2);
        assert_eq!(h[header::VIA], "2 meridian");
    }

    #[test]
    fn upgrade_detection() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }
}
