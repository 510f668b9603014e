//! Health-check failover: stop the endpoint, answers move within the fall
//! threshold; restart it, they return after rise.

use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;

use crate::support::*;

#[test]
fn answers_follow_health() -> anyhow::Result<()> {
    let mut ep = HealthEndpoint::start_on("127.0.0.1:0")?;
    let port = ep.addr;
    let dir = tmpdir("failover");
    // eu-west is probed over HTTP at a different address than it answers
    // with; interval 100ms, fall 3, rise 2.
    let health = format!(
        "a = [\"192.0.2.2\"]\naaaa = [\"2001:db8:ff::2\"]\n[regions.health]\nkind = \"http\"\naddress = \"{port}\"\npath = \"/readyz\"\ninterval_ms = 100\ntimeout_ms = 300\nfall = 3\nrise = 2\nexpect_status = 200\n"
    );
    let cfg = demo_config(
        &dir,
        &[(
            "a = [\"192.0.2.2\"]\naaaa = [\"2001:db8:ff::2\"]\n",
            &health,
        )],
        "",
    );
    let s = Server::run(&cfg)?;
    let m = with_edns(
        query("www.demo.meridian.test.", RecordType::A),
        Some(("198.51.100.0", 24)),
    );
    let ask = || udp(s.udp, &m).map(|r| addrs(&r)).unwrap_or_default();
    assert!(eventually(Duration::from_secs(3), || ask() == ["192.0.2.2"]));

    ep.stop();
    let t0 = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || ask() == ["192.0.2.1"]),
        "should fail over to us-east"
    );
    let took = t0.elapsed();
    // fall (3) x interval (100ms) + timeouts: well under 2s.
    assert!(took < Duration::from_secs(2), "failover took {took:?}");
    let (_, regions) = http("GET", s.admin(), "/regions")?;
    assert!(regions.contains("\"healthy\":false"), "{regions}");

    let _ep2 = HealthEndpoint::start_on(&port.to_string())?;
    assert!(
        eventually(Duration::from_secs(5), || ask() == ["192.0.2.2"]),
        "should return after rise"
    );
    let (_, metrics) = http("GET", s.admin(), "/metrics")?;
    assert!(
        metrics.contains("meridian_dns_health_transitions_total{region=\"eu-west\",to=\"down\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meridian_dns_health_transitions_total{region=\"eu-west\",to=\"up\"} 1"),
        "{metrics}"
    );
    Ok(())
}

#[test]
fn tcp_health_check() -> anyhow::Result<()> {
    let dead = closed_port();
    let dir = tmpdir("tcpcheck");
    let health = format!(
        "a = [\"192.0.2.2\"]\naaaa = [\"2001:db8:ff::2\"]\n[regions.health]\nkind = \"tcp\"\naddress = \"{dead}\"\ninterval_ms = 50\ntimeout_ms = 200\nfall = 1\n"
    );
    let cfg = demo_config(
        &dir,
        &[(
            "a = [\"192.0.2.2\"]\naaaa = [\"2001:db8:ff::2\"]\n",
            &health,
        )],
        "",
    );
    let s = Server::run(&cfg)?;
    let m = with_edns(
        query("www.demo.meridian.test.", RecordType::A),
        Some(("198.51.100.0", 24)),
    );
    assert!(eventually(Duration::from_secs(5), || {
        udp(s.udp, &m)
            .map(|r| addrs(&r) == ["192.0.2.1"])
            .unwrap_or(false)
    }));
    Ok(())
}
