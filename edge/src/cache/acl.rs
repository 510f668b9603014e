//! Client network lists (CIDR), for the PURGE method's allow list.

use std::net::IpAddr;

pub use crate::config::Cidr;

/// Whether `ip` is in any of `nets`.
pub fn allowed(nets: &[Cidr], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_matching() {
        let n = Cidr::parse("10.1.0.0/16").expect("valid");
        assert!(n.contains("10.1.2.3".parse().expect("ip")));
        assert!(!n.contains("10.2.0.1".parse().expect("ip")));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .expect("valid")
                .contains("8.8.8.8".parse().expect("ip"))
        );
        let six = Cidr::parse("2001:db8::/32").expect("valid");
        assert!(six.contains("2001:db8:1::1".parse().expect("ip")));
        assert!(!six.contains("10.0.0.1".parse().expect("ip")));
        assert!(
            Cidr::parse("127.0.0.1")
                .expect("valid")
                .contains("::ffff:127.0.0.1".parse().expect("ip"))
        );
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope").is_err());
    }
}
