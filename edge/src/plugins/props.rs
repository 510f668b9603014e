//! Per-request properties the plugins read (`get_property`), the client's
//! country among them.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use http::Uri;
use meridian_wasm_host::PropertyResolver;

/// A MaxMind database for the `meridian.client.country` property (the
/// lookup is `meridian-geo`'s, shared with the DNS server).
pub struct GeoIp(meridian_geo::GeoDb);

impl std::fmt::Debug for GeoIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GeoIp")
    }
}

impl GeoIp {
    /// Opens and checks the database (reads it whole into memory).
    pub fn open(path: &std::path::Path) -> Result<Self, String> {
        meridian_geo::GeoDb::open(path)
            .map(Self)
            .map_err(|e| e.to_string())
    }

    /// The ISO 3166 alpha-2 country of `ip`, if the database knows it.
    pub fn country(&self, ip: IpAddr) -> Option<String> {
        self.0.country(ip).map(|c| c.as_str().to_owned())
    }
}

/// Per-request properties: `source.*`, `destination.*`, `request.protocol`,
/// `connection.tls`, and Meridian's `meridian.client.country` / `.ip`; and
/// the request's own `request.path`, `.url_path`, `.query`, `.method`,
/// `.host` and `.scheme` as the client sent them, for the phases where the
/// host's built-in request properties (the live header map) are gone.
pub struct RequestProps {
    pub client: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
    pub protocol: &'static str,
    pub geo: Option<Arc<GeoIp>>,
    /// Method, URI (its path and query as the client sent them), host.
    pub request: (http::Method, Uri, String),
    country: OnceLock<Option<String>>,
}

impl RequestProps {
    pub fn new(
        client: SocketAddr,
        local: SocketAddr,
        tls: bool,
        protocol: &'static str,
        geo: Option<Arc<GeoIp>>,
        request: (http::Method, Uri, String),
    ) -> Self {
        Self {
            client,
            local,
            tls,
            protocol,
            geo,
            request,
            country: OnceLock::new(),
        }
    }
}

impl PropertyResolver for RequestProps {
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        // Integers are 8-byte little-endian, booleans one byte, as in Envoy.
        match path {
            ["source", "address"] => Some(self.client.to_string().into_bytes()),
            ["source", "port"] => Some(u64::from(self.client.port()).to_le_bytes().to_vec()),
            ["destination", "address"] => Some(self.local.to_string().into_bytes()),
            ["destination", "port"] => Some(u64::from(self.local.port()).to_le_bytes().to_vec()),
            ["connection", "tls"] => Some(vec![u8::from(self.tls)]),
            ["request", "protocol"] => Some(self.protocol.as_bytes().to_vec()),
            ["request", "method"] => Some(self.request.0.as_str().as_bytes().to_vec()),
            ["request", "path"] => Some(
                self.request
                    .1
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .as_bytes()
                    .to_vec(),
            ),
            ["request", "url_path"] => Some(self.request.1.path().as_bytes().to_vec()),
            ["request", "query"] => Some(self.request.1.query().unwrap_or("").as_bytes().to_vec()),
            ["request", "host"] => Some(self.request.2.as_bytes().to_vec()),
            ["request", "scheme"] => Some(if self.tls { &b"https"[..] } else { b"http" }.to_vec()),
            ["meridian", "client", "ip"] => Some(self.client.ip().to_string().into_bytes()),
            ["meridian", "client", "country"] => self
                .country
                .get_or_init(|| self.geo.as_ref().and_then(|g| g.country(self.client.ip())))
                .as_ref()
                .map(|c| c.as_bytes().to_vec()),
            _ => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn request_properties_follow_envoys_encoding() {
        let p = RequestProps::new(
            "192.0.2.7:5555".parse().unwrap(),
            "127.0.0.1:443".parse().unwrap(),
            true,
            "h2",
            None,
            (
                http::Method::GET,
                Uri::from_static("/a/b?x=1"),
                "example.com".into(),
            ),
        );
        assert_eq!(p.property(&["request", "url_path"]), Some(b"/a/b".to_vec()));
        assert_eq!(p.property(&["request", "query"]), Some(b"x=1".to_vec()));
        assert_eq!(p.property(&["request", "scheme"]), Some(b"https".to_vec()));
        assert_eq!(
            p.property(&["source", "address"]),
            Some(b"192.0.2.7:5555".to_vec())
        );
        assert_eq!(
            p.property(&["source", "port"]),
            Some(5555u64.to_le_bytes().to_vec())
        );
        assert_eq!(p.property(&["connection", "tls"]), Some(vec![1]));
        assert_eq!(p.property(&["request", "protocol"]), Some(b"h2".to_vec()));
        assert_eq!(
            p.property(&["meridian", "client", "ip"]),
            Some(b"192.0.2.7".to_vec())
        );
        // No GeoIP database: the country is unknown (NotFound to the plugin).
        assert_eq!(p.property(&["meridian", "client", "country"]), None);
        assert_eq!(p.property(&["nope"]), None);
    }
}
