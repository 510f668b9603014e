//! Typed values of the config that serde reads from their written form: a
//! site's host patterns ([`HostPattern`]), an origin's URL ([`OriginAddr`])
//! and client networks ([`Cidr`]). A bad value is refused while the TOML is
//! read, at its line and key. Each keeps the text it was written as, which is
//! what it serialises back to (the admin API's config dump) and, for a host
//! pattern, the site's name.

use std::fmt;
use std::net::IpAddr;

use http::uri::Authority;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// Reads a value through its `parse` function.
macro_rules! parsed_from_str {
    ($ty:ty) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                <$ty>::parse(&s).map_err(de::Error::custom)
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

/// A site's host pattern: "example.com", "*.example.com" (any subdomain, not
/// the apex) or "*" (any host).
#[derive(Clone, Debug)]
pub struct HostPattern {
    written: String,
    kind: HostMatch,
}

/// What a [`HostPattern`] matches, normalised: lower case, no trailing dot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    /// "*.example.com" is held as ".example.com".
    Suffix(String),
    Any,
}

impl HostPattern {
    pub fn parse(written: &str) -> Result<Self, String> {
        let s = written.trim().trim_end_matches('.').to_ascii_lowercase();
        let kind = if s == "*" {
            HostMatch::Any
        } else {
            let (wild, name) = match s.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, s.as_str()),
            };
            if name.is_empty()
                || name.contains('*')
                || !name.bytes().all(|b| {
                    b.is_ascii_alphanumeric()
                        || b == b'-'
                        || b == b'.'
                        || b == b':'
                        || b == b'['
                        || b == b']'
                })
            {
                return Err(format!("{s:?} is not a host name or \"*.name\" pattern"));
            }
            if wild {
                HostMatch::Suffix(format!(".{name}"))
            } else {
                HostMatch::Exact(name.to_string())
            }
        };
        Ok(HostPattern {
            written: written.to_string(),
            kind,
        })
    }

    /// The pattern as written in the config.
    pub fn as_str(&self) -> &str {
        &self.written
    }

    pub fn kind(&self) -> &HostMatch {
        &self.kind
    }
}

impl PartialEq for HostPattern {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind
    }
}

impl Eq for HostPattern {}

parsed_from_str!(HostPattern);

/// An origin's scheme, host and port, parsed from "http://host:port" or
/// "https://host:port" (no path, no credentials).
#[derive(Clone, Debug)]
pub struct OriginAddr {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub authority: Authority,
    written: String,
}

impl OriginAddr {
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(format!("{url:?}: the scheme must be http or https")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{url:?} has no host"))?
            .clone();
        if authority.as_str().contains('@') {
            return Err(format!(
                "{url:?}: credentials in origin URLs are not supported"
            ));
        }
        if uri
            .path_and_query()
            .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
        {
            return Err(format!("{url:?}: an origin URL has no path"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(OriginAddr {
            tls,
            host,
            port,
            authority,
            written: url.to_string(),
        })
    }

    pub fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// The URL as written in the config.
    pub fn as_str(&self) -> &str {
        &self.written
    }
}

/// Two addresses are the same origin when they reach the same place,
/// however they were written.
impl PartialEq for OriginAddr {
    fn eq(&self, other: &Self) -> bool {
        (self.tls, &self.host, self.port, &self.authority)
            == (other.tls, &other.host, other.port, &other.authority)
    }
}

impl Eq for OriginAddr {}

/// "scheme://authority": the origin's label in metrics and logs.
impl fmt::Display for OriginAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme(), self.authority)
    }
}

parsed_from_str!(OriginAddr);

/// A client network: "10.0.0.0/8", "2001:db8::/32", or a single address.
#[derive(Clone, Debug)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
    written: String,
}

impl Cidr {
    /// "10.0.0.0/8", "2001:db8::/32", or a single address.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{a:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .map_err(|_| format!("bad prefix {p:?}"))?,
            None => max,
        };
        if prefix > max {
            return Err(format!("prefix /{prefix} is longer than {max}"));
        }
        Ok(Cidr {
            addr,
            prefix,
            written: s.to_string(),
        })
    }

    /// The network of one address, written "addr/32" or "addr/128".
    pub fn host(addr: IpAddr) -> Cidr {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Cidr {
            addr,
            prefix,
            written: format!("{addr}/{prefix}"),
        }
    }

    /// The network as written in the config.
    pub fn as_str(&self) -> &str {
        &self.written
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl PartialEq for Cidr {
    fn eq(&self, other: &Self) -> bool {
        (self.addr, self.prefix) == (other.addr, other.prefix)
    }
}

impl Eq for Cidr {}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Cidr::parse(&s)
            .map_err(|e| de::Error::custom(format!("{s:?} is not an address or CIDR network: {e}")))
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, Serialize)]
    struct Doc {
        hosts: Vec<HostPattern>,
        url: OriginAddr,
        nets: Vec<Cidr>,
    }

    #[test]
    fn values_read_and_written_back_as_written() {
        let src = "hosts = [\"Example.COM.\", \"*.a.test\", \"*\"]\n\
                   url = \"http://[::1]:81/\"\n\
                   nets = [\"10.0.0.1\", \"2001:db8::/32\"]\n";
        let d: Doc = toml::from_str(src).expect("valid");
        assert_eq!(d.hosts[0].kind(), &HostMatch::Exact("example.com".into()));
        assert_eq!(d.hosts[0].as_str(), "Example.COM.");
        assert_eq!(d.hosts[1].kind(), &HostMatch::Suffix(".a.test".into()));
        assert_eq!(d.hosts[2].kind(), &HostMatch::Any);
        assert_eq!(
            (d.url.tls, d.url.host.as_str(), d.url.port),
            (false, "::1", 81)
        );
        assert_eq!(d.url.to_string(), "http://[::1]:81");
        assert!(d.nets[0].contains("10.0.0.1".parse().expect("ip")));
        assert!(!d.nets[0].contains("10.0.0.2".parse().expect("ip")));
        assert_eq!(toml::to_string(&d).expect("serialises"), src);
    }

    #[test]
    fn a_bad_value_is_refused_by_the_parser() {
        let e = toml::from_str::<Doc>("hosts = [\"a.*.com\"]\nurl = \"http://x\"\nnets = []\n")
            .expect_err("bad host");
        assert!(e.message().contains("is not a host name"), "{e}");
        let e = toml::from_str::<Doc>("hosts = []\nurl = \"ftp://x\"\nnets = []\n")
            .expect_err("bad url");
        assert!(
            e.message().contains("the scheme must be http or https"),
            "{e}"
        );
        let e = toml::from_str::<Doc>("hosts = []\nurl = \"http://x\"\nnets = [\"10.0.0.0/33\"]\n")
            .expect_err("bad net");
        assert!(
            e.message().contains("is not an address or CIDR network"),
            "{e}"
        );
    }

    #[test]
    fn the_same_origin_written_two_ways_is_equal() {
        let a = OriginAddr::parse("http://o.test:80").expect("valid");
        let b = OriginAddr::parse("http://o.test:80/").expect("valid");
        assert_eq!(a, b);
        assert_ne!(a.as_str(), b.as_str());
        assert_eq!(Cidr::host("::1".parse().expect("ip")).as_str(), "::1/128");
    }
}
