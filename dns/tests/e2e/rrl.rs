//! Response rate limiting.

use std::net::UdpSocket;
use std::time::Duration;

use hickory_proto::rr::RecordType;

use crate::support::*;

#[test]
fn rrl_drops_and_slips_udp_but_not_tcp() -> anyhow::Result<()> {
    let dir = tmpdir("rrl");
    let cfg = demo_config(
        &dir,
        &[],
        "[rrl]\nenabled = true\nresponses_per_second = 5\nslip = 2\n",
    );
    let s = Server::run(&cfg)?;
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    // Send a burst, then collect what comes back (bounded by the timeout).
    for _ in 0..30 {
        sock.send_to(
            &query("static.demo.meridian.test.", RecordType::A).to_vec()?,
            s.udp,
        )?;
    }
    let (mut full, mut tc) = (0, 0);
    let mut buf = vec![0u8; 4096];
    for _ in 0..30 {
        let Ok((n, _)) = sock.recv_from(&mut buf) else {
            break;
        };
        let r = hickory_proto::op::Message::from_vec(&buf[..n])?;
        if r.metadata.truncation {
            tc += 1
        } else {
            full += 1
        }
    }
    let none = 30 - full - tc;
    assert!((5..=12).contains(&full), "full={full} tc={tc} none={none}");
    assert!(
        tc >= 5,
        "slip=2 should truncate about half the limited ones: tc={tc}"
    );
    assert!(none >= 5, "and drop the rest: none={none}");
    // TCP is not limited.
    for _ in 0..10 {
        let r = tcp(s.tcp, &query("static.demo.meridian.test.", RecordType::A))?;
        assert_eq!(addrs(&r), ["192.0.2.100"]);
    }
    let (_, metrics) = http("GET", s.admin(), "/metrics")?;
    assert!(
        metrics.contains("meridian_dns_rrl_actions_total{action=\"drop\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meridian_dns_rrl_actions_total{action=\"slip\"}"),
        "{metrics}"
    );
    Ok(())
}
