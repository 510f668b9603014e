//! Zone transfers and NOTIFY with a real secondary (#15): Knot (`knotd`,
//! Debian `knot`) is a secondary of meridian-dns on 127.0.0.1, for one zone
//! by address and one by address and TSIG key. kdig checks AXFR/IXFR and
//! that the TSIG zone refuses unsigned and wrongly signed transfers.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use crate::support::*;

/// base64 of 32 bytes: the shared secret of `xfr-key`.
const SECRET: &str = "bWVyaWRpYW4tdGVzdC14ZnIta2V5LTMyLWJ5dGVzISE=";
const WRONG: &str = "d3Jvbmctc2VjcmV0LXdyb25nLXNlY3JldC13cm9uZyE=";

struct Knot(Child);

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    // UDP and TCP both free on one port (bound then released).
    for _ in 0..20 {
        let u = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = u.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port pair")
}

fn demo_zone(serial: u32, extra: &str) -> Result<String> {
    let z = std::fs::read_to_string(Path::new(EXAMPLES).join("demo.meridian.test.zone"))?;
    Ok(z.replace("2026112601 ; serial", &format!("{serial} ; serial")) + extra)
}

fn tsig_zone(serial: u32, extra: &str) -> String {
    let mut z = format!(
        "$ORIGIN tsig.meridian.test.\n$TTL 300\n@ IN SOA ns1 hostmaster {serial} 7200 3600 1209600 300\n  IN NS ns1\nns1 IN A 192.0.2.53\n"
    );
    // Enough data for several transfer messages (each signed, chained).
    for i in 0..600 {
        let _ = writeln!(
            z,
            "r{i} IN TXT \"record {i} of a zone large enough to span several AXFR messages\""
        );
    }
    z + extra
}

fn kdig(args: &[&str]) -> Result<String> {
    let out = Command::new("kdig")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("kdig is not installed (Debian package `knot-dnsutils`)")?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

fn ask(server: SocketAddr, name: &str, t: RecordType) -> Option<(ResponseCode, Vec<String>)> {
    udp(server, &query(name, t))
        .ok()
        .map(|r| (r.metadata.response_code, addrs(&r)))
}

#[test]
fn knot_secondary_transfers_and_follows_notify() -> Result<()> {
    which("knotd").context("knotd is not installed (Debian package `knot`)")?;
    let dir = tmpdir("secondary");
    let knot_port = free_port()?;
    let knot: SocketAddr = format!("127.0.0.1:{knot_port}").parse()?;
    let demo = dir.join("demo.zone");
    let tsig = dir.join("tsig.zone");
    std::fs::write(&demo, demo_zone(2026112601, "")?)?;
    std::fs::write(&tsig, tsig_zone(1, ""))?;
    let zones = format!(
        "file = \"{demo}\"\n\
         [zones.transfer]\nallow = [\"127.0.0.1\"]\n\
         [[zones.notify]]\naddress = \"{knot}\"\n\n\
         [[zones]]\norigin = \"tsig.meridian.test.\"\nfile = \"{tsig}\"\n\
         [zones.transfer]\nallow = [\"127.0.0.0/8\", \"::1\"]\nkeys = [\"xfr-key\"]\n\
         [[zones.notify]]\naddress = \"{knot}\"\nkey = \"xfr-key\"\n",
        demo = demo.display(),
        tsig = tsig.display()
    );
    let cfg = demo_config(
        &dir,
        &[(
            &format!("file = \"{EXAMPLES}/demo.meridian.test.zone\"\n"),
            &zones,
        )],
        &format!(
            "[[tsig_keys]]\nname = \"xfr-key\"\nalgorithm = \"hmac-sha256\"\nsecret = \"{SECRET}\"\n"
        ),
    );
    let s = Server::run(&cfg)?;
    let primary = s.tcp;
    let port = primary.port().to_string();

    // TSIG zone: unsigned and wrongly signed transfers are refused; the
    // right key gets every record, each message's TSIG checked by kdig.
    let out = kdig(&["@127.0.0.1", "-p", &port, "AXFR", "tsig.meridian.test."])?;
    assert!(out.contains("REFUSED") || out.contains("refused"), "{out}");
    assert!(!out.contains("r17.tsig.meridian.test"), "{out}");
    let wrong = format!("hmac-sha256:xfr-key:{WRONG}");
    let out = kdig(&[
        "@127.0.0.1",
        "-p",
        &port,
        "-y",
        &wrong,
        "AXFR",
        "tsig.meridian.test.",
    ])?;
    assert!(!out.contains("r17.tsig.meridian.test"), "{out}");
    assert!(
        out.to_uppercase().contains("NOTAUTH") || out.contains("BADSIG"),
        "{out}"
    );
    let right = format!("hmac-sha256:xfr-key:{SECRET}");
    let out = kdig(&[
        "@127.0.0.1",
        "-p",
        &port,
        "-y",
        &right,
        "AXFR",
        "tsig.meridian.test.",
    ])?;
    assert!(out.contains("r599.tsig.meridian.test."), "{out}");
    assert!(
        !out.contains(";; ERROR") && !out.contains(";; WARNING"),
        "{out}"
    );
    let messages = out
        .lines()
        .find(|l| l.contains("Received") && l.contains("messages"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        !messages.contains(" 1 messages"),
        "one message only: {messages}"
    );
    // IXFR with the current serial: just the SOA; an older one: the zone.
    let out = kdig(&[
        "@127.0.0.1",
        "-p",
        &port,
        "-y",
        &right,
        "IXFR=1",
        "tsig.meridian.test.",
    ])?;
    assert!(!out.contains("r1.tsig.meridian.test."), "{out}");
    let out = kdig(&[
        "@127.0.0.1",
        "-p",
        &port,
        "-y",
        &right,
        "IXFR=0",
        "tsig.meridian.test.",
    ])?;
    assert!(out.contains("r599.tsig.meridian.test."), "{out}");
    // The demo zone is open to 127.0.0.1 without a key; its steered name
    // is there as the default region's records.
    let out = kdig(&["@127.0.0.1", "-p", &port, "AXFR", "demo.meridian.test."])?;
    assert!(out.contains("static.demo.meridian.test."), "{out}");
    assert!(
        out.contains("www.demo.meridian.test.") && out.contains("192.0.2.1"),
        "{out}"
    );

    // Knot as the secondary.
    let kdir = dir.join("knot");
    for d in ["run", "db", "zones"] {
        std::fs::create_dir_all(kdir.join(d))?;
    }
    let conf = kdir.join("knot.conf");
    std::fs::write(
        &conf,
        format!(
            "server:\n    rundir: \"{run}\"\n    listen: 127.0.0.1@{knot_port}\n\
             log:\n  - target: stderr\n    any: info\n\
             database:\n    storage: \"{db}\"\n\
             key:\n  - id: xfr-key\n    algorithm: hmac-sha256\n    secret: {SECRET}\n\
             remote:\n  - id: primary\n    address: 127.0.0.1@{mport}\n\
             \x20 - id: primary-tsig\n    address: 127.0.0.1@{mport}\n    key: xfr-key\n\
             acl:\n  - id: notify-plain\n    address: 127.0.0.1\n    action: notify\n\
             \x20 - id: notify-tsig\n    address: 127.0.0.1\n    key: xfr-key\n    action: notify\n\
             template:\n  - id: default\n    storage: \"{zones}\"\n    zonefile-sync: -1\n    zonefile-load: none\n    journal-content: none\n\
             zone:\n  - domain: demo.meridian.test.\n    master: primary\n    acl: notify-plain\n\
             \x20 - domain: tsig.meridian.test.\n    master: primary-tsig\n    acl: notify-tsig\n",
            run = kdir.join("run").display(),
            db = kdir.join("db").display(),
            zones = kdir.join("zones").display(),
            mport = primary.port(),
        ),
    )?;
    let log = std::fs::File::create(kdir.join("knotd.log"))?;
    let _knot = Knot(
        Command::new("knotd")
            .args(["-c", conf.to_str().expect("path")])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting knotd")?,
    );
    let knot_log = || std::fs::read_to_string(kdir.join("knotd.log")).unwrap_or_default();

    // The secondary transfers both zones.
    let ok = eventually(Duration::from_secs(15), || {
        ask(knot, "static.demo.meridian.test.", RecordType::A)
            == Some((ResponseCode::NoError, vec!["192.0.2.100".into()]))
    });
    assert!(ok, "knot did not load the demo zone:\n{}", knot_log());
    // A steered name: the default region's (us-east) records.
    assert_eq!(
        ask(knot, "www.demo.meridian.test.", RecordType::A),
        Some((ResponseCode::NoError, vec!["192.0.2.1".into()]))
    );
    assert_eq!(
        ask(knot, "www.demo.meridian.test.", RecordType::AAAA),
        Some((ResponseCode::NoError, vec!["2001:db8:ff::1".into()]))
    );
    let txt = |name: &str| {
        udp(knot, &query(name, RecordType::TXT))
            .map(|r| (r.metadata.response_code, r.answers.len()))
            .ok()
    };
    let ok = eventually(Duration::from_secs(15), || {
        txt("r599.tsig.meridian.test.") == Some((ResponseCode::NoError, 1))
    });
    assert!(ok, "knot did not load the TSIG zone:\n{}", knot_log());

    // A change to the zone files reaches the secondary through NOTIFY (the
    // SOA refresh is 7200 s, so nothing else would bring it within seconds).
    std::fs::write(&demo, demo_zone(2026112602, "fresh IN A 192.0.2.201\n")?)?;
    std::fs::write(&tsig, tsig_zone(2, "fresh IN TXT \"new\"\n"))?;
    let t0 = Instant::now();
    s.signal("HUP");
    let ok = eventually(Duration::from_secs(10), || {
        ask(knot, "fresh.demo.meridian.test.", RecordType::A)
            == Some((ResponseCode::NoError, vec!["192.0.2.201".into()]))
    });
    assert!(ok, "the change did not reach knot:\n{}", knot_log());
    let ok = eventually(Duration::from_secs(10), || {
        txt("fresh.tsig.meridian.test.") == Some((ResponseCode::NoError, 1))
    });
    assert!(
        ok,
        "the TSIG zone's change did not reach knot:\n{}",
        knot_log()
    );
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");

    let (_, m) = http("GET", s.admin(), "/metrics")?;
    assert!(
        m.contains("meridian_dns_notify_sent_total{result=\"acked\"}"),
        "{m}"
    );
    assert!(
        m.contains("meridian_dns_zone_transfers_total{qtype=\"AXFR\",result=\"refused\"}")
            || m.contains("meridian_dns_zone_transfers_total{qtype=\"AXFR\",result=\"ok\"}"),
        "{m}"
    );
    Ok(())
}

fn which(bin: &str) -> Result<()> {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()?
        .success();
    if !ok {
        bail!("{bin} not found");
    }
    Ok(())
}
