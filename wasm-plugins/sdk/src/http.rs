//! Typed views of the request, the response and a body.
//!
//! [`Request`] and [`Response`] hold no data: each method asks the host, so
//! only what the plugin reads crosses the boundary. Header names are
//! case-insensitive. Values that are not UTF-8 come back through the
//! `*_bytes` methods; the `String` methods replace invalid bytes with U+FFFD.

use std::net::{IpAddr, SocketAddr};

use crate::sys::{self, Map};
use crate::{CLIENT_COUNTRY_PROPERTY, SOURCE_ADDRESS_PROPERTY};

fn lossy(v: Vec<u8>) -> String {
    match String::from_utf8(v) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

fn values(map: Map, name: &str) -> Vec<String> {
    sys::headers(map)
        .into_iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| lossy(v))
        .collect()
}

/// The request as the plugin sees it in [`crate::Plugin::on_request`].
#[derive(Debug)]
pub struct Request {
    pub(crate) skip_body: bool,
}

impl Request {
    pub(crate) fn new() -> Self {
        Self { skip_body: false }
    }

    /// The `:method` (e.g. `GET`).
    pub fn method(&self) -> String {
        self.header(":method").unwrap_or_default()
    }

    /// The `:path`: path and query as sent by the client, undecoded
    /// (e.g. `/a/b?x=1`).
    pub fn path(&self) -> String {
        self.header(":path").unwrap_or_default()
    }

    /// The path without the query (`/a/b` for `/a/b?x=1`).
    pub fn path_only(&self) -> String {
        let p = self.path();
        match p.split_once('?') {
            Some((path, _)) => path.to_owned(),
            None => p,
        }
    }

    /// The raw query, without the `?` (`x=1` for `/a/b?x=1`), if any.
    pub fn query(&self) -> Option<String> {
        self.path().split_once('?').map(|(_, q)| q.to_owned())
    }

    /// Replace the `:path` (path and query) sent to the origin.
    pub fn set_path(&mut self, path: &str) {
        sys::set_header(Map::RequestHeaders, ":path", path.as_bytes());
    }

    /// The first query parameter called `name`, percent-decoded (`+` is a
    /// space). `Some("")` for `?name` and `?name=`.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query_params()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// All query parameters in order, percent-decoded.
    pub fn query_params(&self) -> Vec<(String, String)> {
        self.query().map(|q| parse_query(&q)).unwrap_or_default()
    }

    /// The `:scheme` (`http` or `https`).
    pub fn scheme(&self) -> String {
        self.header(":scheme").unwrap_or_default()
    }

    /// The `:authority` (the `Host`), e.g. `www.example.com` or
    /// `www.example.com:8443`.
    pub fn authority(&self) -> String {
        self.header(":authority")
            .or_else(|| self.header("host"))
            .unwrap_or_default()
    }

    /// The host name of [`Request::authority`], without a port.
    pub fn host(&self) -> String {
        let a = self.authority();
        strip_port(&a).to_owned()
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<String> {
        sys::header(Map::RequestHeaders, name).map(lossy)
    }

    /// The first value of header `name`, as bytes.
    pub fn header_bytes(&self, name: &str) -> Option<Vec<u8>> {
        sys::header(Map::RequestHeaders, name)
    }

    /// Every value of header `name`, in order.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        values(Map::RequestHeaders, name)
    }

    /// All headers (pseudo-headers first, as the host keeps them).
    pub fn headers(&self) -> Vec<(String, String)> {
        sys::headers(Map::RequestHeaders)
            .into_iter()
            .map(|(k, v)| (k, lossy(v)))
            .collect()
    }

    /// Replace header `name` (all its values) with `value`.
    pub fn set_header(&mut self, name: &str, value: &str) {
        sys::set_header(Map::RequestHeaders, name, value.as_bytes());
    }

    /// Append a value to header `name`.
    pub fn add_header(&mut self, name: &str, value: &str) {
        sys::add_header(Map::RequestHeaders, name, value.as_bytes());
    }

    /// Remove header `name` (all its values).
    pub fn remove_header(&mut self, name: &str) {
        sys::remove_header(Map::RequestHeaders, name);
    }

    /// The client's address (`source.address`), `ip:port`.
    pub fn client_address(&self) -> Option<String> {
        sys::property(SOURCE_ADDRESS_PROPERTY).map(lossy)
    }

    /// The client's IP address, parsed from [`Request::client_address`].
    pub fn client_ip(&self) -> Option<IpAddr> {
        let a = self.client_address()?;
        a.parse::<SocketAddr>()
            .map(|s| s.ip())
            .or_else(|_| a.parse::<IpAddr>())
            .ok()
    }

    /// The client's country as Meridian determined it: an upper-case ISO
    /// 3166-1 alpha-2 code such as `DE`; `None` when unknown.
    pub fn client_country(&self) -> Option<String> {
        let v = sys::property(CLIENT_COUNTRY_PROPERTY)?;
        let s = String::from_utf8(v).ok()?;
        let s = s.trim();
        (!s.is_empty()).then(|| s.to_ascii_uppercase())
    }

    /// Any property (`proxy_get_property`).
    pub fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        sys::property(path)
    }

    /// Do not call [`crate::Plugin::on_request_body`] for this request: the
    /// body streams through untouched and `Content-Length` is kept.
    pub fn skip_body(&mut self) {
        self.skip_body = true;
    }
}

/// The response as the plugin sees it in [`crate::Plugin::on_response`].
#[derive(Debug)]
pub struct Response {
    pub(crate) skip_body: bool,
}

impl Response {
    pub(crate) fn new() -> Self {
        Self { skip_body: false }
    }

    /// The `:status` (0 if the host gave none).
    pub fn status(&self) -> u16 {
        self.header(":status")
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Change the status sent to the client.
    pub fn set_status(&mut self, status: u16) {
        self.set_header(":status", &status.to_string());
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<String> {
        sys::header(Map::ResponseHeaders, name).map(lossy)
    }

    /// The first value of header `name`, as bytes.
    pub fn header_bytes(&self, name: &str) -> Option<Vec<u8>> {
        sys::header(Map::ResponseHeaders, name)
    }

    /// Every value of header `name`, in order.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        values(Map::ResponseHeaders, name)
    }

    /// All headers.
    pub fn headers(&self) -> Vec<(String, String)> {
        sys::headers(Map::ResponseHeaders)
            .into_iter()
            .map(|(k, v)| (k, lossy(v)))
            .collect()
    }

    /// Replace header `name` (all its values) with `value`.
    pub fn set_header(&mut self, name: &str, value: &str) {
        sys::set_header(Map::ResponseHeaders, name, value.as_bytes());
    }

    /// Append a value to header `name`.
    pub fn add_header(&mut self, name: &str, value: &str) {
        sys::add_header(Map::ResponseHeaders, name, value.as_bytes());
    }

    /// Remove header `name` (all its values).
    pub fn remove_header(&mut self, name: &str) {
        sys::remove_header(Map::ResponseHeaders, name);
    }

    /// The media type of `Content-Type`, lower-case, without parameters
    /// (`text/html` for `text/html; charset=utf-8`).
    pub fn content_type(&self) -> Option<String> {
        let ct = self.header("content-type")?;
        let media = ct.split(';').next().unwrap_or("").trim();
        (!media.is_empty()).then(|| media.to_ascii_lowercase())
    }

    /// `Content-Length`, if present and valid.
    pub fn content_length(&self) -> Option<u64> {
        self.header("content-length")?.trim().parse().ok()
    }

    /// Any property (`proxy_get_property`).
    pub fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        sys::property(path)
    }

    /// Do not call [`crate::Plugin::on_response_body`] for this response:
    /// the body streams through untouched and `Content-Length` is kept.
    pub fn skip_body(&mut self) {
        self.skip_body = true;
    }
}

/// A complete, buffered body handed to a body hook. Changes are written back
/// to the host when the hook returns (only if the body was changed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Body {
    data: Vec<u8>,
    modified: bool,
}

impl Body {
    /// A body holding `data` (for tests; the SDK builds the real ones).
    pub fn from_bytes(data: impl Into<Vec<u8>>) -> Self {
        Self {
            data: data.into(),
            modified: false,
        }
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// The bytes as text, if they are UTF-8.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.data).ok()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// `true` if empty.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Replace the whole body.
    pub fn replace(&mut self, data: impl Into<Vec<u8>>) {
        self.data = data.into();
        self.modified = true;
    }

    /// Edit the bytes in place (marks the body as modified).
    pub fn bytes_mut(&mut self) -> &mut Vec<u8> {
        self.modified = true;
        &mut self.data
    }

    /// `true` once [`Body::replace`] or [`Body::bytes_mut`] was called.
    pub fn is_modified(&self) -> bool {
        self.modified
    }

    /// The bytes, consuming the body.
    pub fn into_bytes(self) -> Vec<u8> {
        self.data
    }
}

/// `host` without `:port` (IPv6 literals keep their brackets).
fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(i) => &authority[..=i],
            None => authority,
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// Split a raw query string into percent-decoded pairs (`+` is a space).
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Decode `%XX` escapes and `+` (as a space); invalid escapes are kept as
/// they are, invalid UTF-8 becomes U+FFFD.
pub fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let h = b.get(i + 1).copied().and_then(hex);
                let l = b.get(i + 2).copied().and_then(hex);
                if let (Some(h), Some(l)) = (h, l) {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    lossy(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("%41%4a%4A"), "AJJ");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%C3%A9"), "é");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
    }

    #[test]
    fn query_parsing() {
        assert_eq!(
            parse_query("a=1&b&c=x%3Dy&&d="),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "".into()),
                ("c".into(), "x=y".into()),
                ("d".into(), "".into()),
            ]
        );
    }

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("example.com:8443"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:443"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }

    #[test]
    fn body_tracks_changes() {
        let mut b = Body::from_bytes("abc");
        assert!(!b.is_modified());
        assert_eq!(b.text(), Some("abc"));
        b.bytes_mut().push(b'd');
        assert!(b.is_modified());
        assert_eq!(b.into_bytes(), b"abcd");
    }
}
