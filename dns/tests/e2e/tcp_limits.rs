//! DNS over TCP limits (#13 item 5): `tcp_max_clients`,
//! `tcp_max_clients_per_ip` and the idle timeout (`tcp_timeout_secs`).
//! Two client addresses come from loopback alone: 127.0.0.1 and ::1.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Result;
use hickory_proto::rr::RecordType;

use crate::support::*;

fn limited_server(max: usize, per_ip: usize) -> Result<Server> {
    let dir = tmpdir("tcp-limits");
    let cfg = demo_config(
        &dir,
        &[(
            "listen = [\"127.0.0.1:5353\"]",
            &format!(
                "listen = [\"127.0.0.1:5353\"]\ntcp_max_clients = {max}\ntcp_max_clients_per_ip = {per_ip}\ntcp_timeout_secs = 1"
            ),
        )],
        "",
    );
    let c = cfg.to_str().expect("path");
    Server::start(&[
        "run",
        "--config",
        c,
        "--listen",
        "127.0.0.1:0",
        "--listen",
        "[::1]:0",
        "--admin",
        "127.0.0.1:0",
    ])
}

fn idle(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

/// True when the server has closed `s` (EOF or reset) within its read
/// timeout.
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

fn ask_tcp(addr: SocketAddr) -> Result<Vec<String>> {
    let r = tcp(addr, &query("static.demo.meridian.test.", RecordType::A))?;
    Ok(addrs(&r))
}

fn metric(s: &Server, line: &str) -> bool {
    http("GET", s.admin(), "/metrics")
        .map(|(_, m)| m.contains(line))
        .unwrap_or(false)
}

#[test]
fn max_clients_then_idle_close_frees_slots() -> Result<()> {
    let s = limited_server(3, 2)?;
    let (v4, v6) = (s.all[0].1, s.all[1].1);
    assert!(v4.is_ipv4() && v6.is_ipv6());
    // Fill the cap with idle connections from both addresses.
    let mut held = vec![idle(v4)?, idle(v4)?, idle(v6)?];
    assert!(eventually(Duration::from_secs(2), || metric(
        &s,
        "meridian_dns_tcp_connections 3"
    )));
    // A fourth client is closed at once, without an answer.
    let t0 = Instant::now();
    assert!(ask_tcp(v6).is_err(), "a query got through the full cap");
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "refusal was not immediate"
    );
    assert!(metric(
        &s,
        "meridian_dns_tcp_closed_total{reason=\"max_clients\"} 1"
    ));
    // The idle timeout (1 s) closes the idle ones; then queries are answered.
    let t0 = Instant::now();
    for h in &mut held {
        assert!(closed_by_server(h), "idle connection not closed");
    }
    let took = t0.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "idle close took {took:?}"
    );
    assert!(eventually(Duration::from_secs(2), || ask_tcp(v6)
        .map(|a| a == ["192.0.2.100"])
        .unwrap_or(false)));
    assert_eq!(ask_tcp(v4)?, ["192.0.2.100"]);
    assert!(metric(
        &s,
        "meridian_dns_tcp_closed_total{reason=\"idle\"} 3"
    ));
    Ok(())
}

#[test]
fn per_client_cap_leaves_others_served() -> Result<()> {
    let s = limited_server(10, 2)?;
    let (v4, v6) = (s.all[0].1, s.all[1].1);
    let _held = [idle(v4)?, idle(v4)?];
    assert!(eventually(Duration::from_secs(2), || metric(
        &s,
        "meridian_dns_tcp_connections 2"
    )));
    // 127.0.0.1 is at its cap: refused; ::1 is another client: served.
    assert!(
        ask_tcp(v4).is_err(),
        "third connection from one address served"
    );
    assert_eq!(ask_tcp(v6)?, ["192.0.2.100"]);
    assert!(metric(
        &s,
        "meridian_dns_tcp_closed_total{reason=\"per_client\"} 1"
    ));
    // A connection that keeps asking is not idle: several queries on one
    // connection across more than the idle timeout.
    let mut c = TcpStream::connect_timeout(&v6, Duration::from_secs(3))?;
    c.set_read_timeout(Some(Duration::from_secs(3)))?;
    for _ in 0..3 {
        let r = tcp_on(&mut c, &query("static.demo.meridian.test.", RecordType::A))?;
        assert_eq!(addrs(&r), ["192.0.2.100"]);
        std::thread::sleep(Duration::from_millis(600));
    }
    Ok(())
}

/// One exchange on an open connection.
fn tcp_on(s: &mut TcpStream, m: &hickory_proto::op::Message) -> Result<hickory_proto::op::Message> {
    use std::io::Write;
    let bytes = m.to_vec()?;
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    s.write_all(&framed)?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf)?;
    Ok(hickory_proto::op::Message::from_vec(&buf)?)
}
