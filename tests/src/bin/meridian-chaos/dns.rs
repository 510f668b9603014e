//! A minimal DNS client over UDP for the load: A queries with or without an
//! EDNS Client Subnet option, and the answer's rcode and A records.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;

pub const NOERROR: u8 = 0;
pub const SERVFAIL: u8 = 2;

/// A query for `name` A, id `id`; with `ecs`, an OPT record carrying that
/// IPv4 client subnet (RFC 7871).
pub fn query(id: u16, name: &str, ecs: Option<(Ipv4Addr, u8)>) -> Vec<u8> {
    let mut m = Vec::with_capacity(64);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00]); // RD
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0]); // QD=1 AN=0 NS=0
    m.extend_from_slice(&[0, u8::from(ecs.is_some())]); // AR
    for label in name.trim_end_matches('.').split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&[0, 1, 0, 1]); // A IN
    if let Some((addr, prefix)) = ecs {
        let nbytes = usize::from(prefix).div_ceil(8);
        let addr = &addr.octets()[..nbytes];
        m.push(0); // root
        m.extend_from_slice(&[0, 41]); // OPT
        m.extend_from_slice(&1232u16.to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 0]); // ext rcode, version, flags
        let opt_len = 4 + nbytes;
        m.extend_from_slice(&((4 + opt_len) as u16).to_be_bytes());
        m.extend_from_slice(&[0, 8]); // ECS
        m.extend_from_slice(&(opt_len as u16).to_be_bytes());
        m.extend_from_slice(&[0, 1, prefix, 0]); // family 1, source, scope
        m.extend_from_slice(addr);
    }
    m
}

/// The parts of an answer the scenarios look at.
#[derive(Debug)]
pub struct Answer {
    pub id: u16,
    pub rcode: u8,
    pub a: Vec<Ipv4Addr>,
}

fn skip_name(m: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let l = *m.get(i)?;
        if l & 0xc0 == 0xc0 {
            return Some(i + 2);
        }
        if l == 0 {
            return Some(i + 1);
        }
        i += 1 + usize::from(l);
    }
}

pub fn parse(m: &[u8]) -> Option<Answer> {
    if m.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([m[0], m[1]]);
    let rcode = m[3] & 0x0f;
    let qd = u16::from_be_bytes([m[4], m[5]]);
    let an = u16::from_be_bytes([m[6], m[7]]);
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(m, i)? + 4;
    }
    let mut a = Vec::new();
    for _ in 0..an {
        i = skip_name(m, i)?;
        let hdr = m.get(i..i + 10)?;
        let ty = u16::from_be_bytes([hdr[0], hdr[1]]);
        let len = usize::from(u16::from_be_bytes([hdr[8], hdr[9]]));
        let data = m.get(i + 10..i + 10 + len)?;
        if ty == 1 && len == 4 {
            a.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        i += 10 + len;
    }
    Some(Answer { id, rcode, a })
}

/// A UDP client with one query outstanding at a time.
pub struct DnsClient {
    sock: UdpSocket,
    next_id: u16,
    pub timeout: Duration,
}

impl DnsClient {
    pub async fn new(server: SocketAddr, timeout: Duration) -> anyhow::Result<DnsClient> {
        let sock = UdpSocket::bind("127.0.0.1:0").await?;
        sock.connect(server).await?;
        Ok(DnsClient {
            sock,
            next_id: (std::process::id() & 0xffff) as u16,
            timeout,
        })
    }

    /// Asks `name` A (with `ecs` if given) and waits up to the timeout for
    /// the answer with the same id.
    pub async fn ask(&mut self, name: &str, ecs: Option<(Ipv4Addr, u8)>) -> anyhow::Result<Answer> {
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        self.sock.send(&query(id, name, ecs)).await?;
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let n = tokio::time::timeout_at(deadline, self.sock.recv(&mut buf))
                .await
                .map_err(|_| anyhow::anyhow!("no answer within {:?}", self.timeout))??;
            if let Some(a) = parse(&buf[..n])
                && a.id == id
            {
                return Ok(a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_with_ecs_is_well_formed() {
        let q = query(
            7,
            "www.demo.meridian.test.",
            Some((Ipv4Addr::new(198, 51, 100, 0), 24)),
        );
        // header + qname (24) + qtype/class + OPT (11) + ECS option (4 + 4 + 3)
        assert_eq!(q.len(), 12 + 24 + 4 + 11 + 4 + 7);
        assert_eq!(&q[q.len() - 7..], &[0, 1, 24, 0, 198, 51, 100]);
        let a = parse(&q).expect("parses");
        assert_eq!((a.id, a.rcode, a.a.len()), (7, 0, 0));
    }
}
