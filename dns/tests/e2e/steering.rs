//! Steering by ECS and by source address, scopes, drains, overrides,
//! fail-open and fail-closed.

use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use crate::support::*;

const WWW: &str = "www.demo.meridian.test.";

#[test]
fn ecs_v4_steers_and_scopes_and_drain_moves_it() -> anyhow::Result<()> {
    let s = Server::demo()?;
    let r = udp(
        s.udp,
        &with_edns(query(WWW, RecordType::A), Some(("198.51.100.0", 24))),
    )?;
    assert_eq!(addrs(&r), ["192.0.2.2"], "Paris -> eu-west");
    assert!(r.metadata.authoritative);
    assert_eq!(r.answers[0].ttl, 30, "steered TTL");
    assert_eq!(ecs_of(&r), Some(("198.51.100.0".parse()?, 24, 24)));

    let (st, body) = http("POST", s.admin(), "/regions/eu-west/drain")?;
    assert_eq!(st, 200, "{body}");
    let r = udp(
        s.udp,
        &with_edns(query(WWW, RecordType::A), Some(("198.51.100.0", 24))),
    )?;
    assert_eq!(
        addrs(&r),
        ["192.0.2.1"],
        "drained eu-west -> next nearest us-east"
    );
    let (_, regions) = http("GET", s.admin(), "/regions")?;
    let v: serde_json::Value = serde_json::from_str(&regions)?;
    let eu = v["regions"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == "eu-west"))
        .cloned();
    assert_eq!(
        eu.map(|e| e["drained"].clone()),
        Some(serde_json::Value::Bool(true))
    );

    let (st, _) = http("POST", s.admin(), "/regions/eu-west/undrain")?;
    assert_eq!(st, 200);
    let r = udp(
        s.udp,
        &with_edns(query(WWW, RecordType::A), Some(("198.51.100.0", 24))),
    )?;
    assert_eq!(addrs(&r), ["192.0.2.2"]);
    assert_eq!(http("POST", s.admin(), "/regions/nope/drain")?.0, 404);
    assert_eq!(http("GET", s.admin(), "/regions/eu-west/drain")?.0, 405);
    Ok(())
}

#[test]
fn ecs_v6_steers_with_scope_48() -> anyhow::Result<()> {
    let s = Server::demo()?;
    let r = udp(
        s.udp,
        &with_edns(query(WWW, RecordType::AAAA), Some(("2001:db8:2::", 48))),
    )?;
    assert_eq!(addrs(&r), ["2001:db8:ff::3"], "Sydney -> ap-southeast");
    assert_eq!(ecs_of(&r), Some(("2001:db8:2::".parse()?, 48, 48)));
    // AAAA for a Paris v6 subnet.
    let r = udp(
        s.udp,
        &with_edns(query(WWW, RecordType::AAAA), Some(("2001:db8:1::", 56))),
    )?;
    assert_eq!(addrs(&r), ["2001:db8:ff::2"]);
    // Scope is the GeoIP network (/48), not the source (/56).
    assert_eq!(ecs_of(&r).map(|e| e.2), Some(48));
    Ok(())
}

#[test]
fn ecs_source_prefix_is_honoured() -> anyhow::Result<()> {
    let s = Server::demo()?;
    // 198.51.100.0/16 means 198.51.0.0/16: not the Paris /24, so unknown.
    let r = udp(
        s.udp,
        &with_edns(query(WWW, RecordType::A), Some(("198.51.100.0", 16))),
    )?;
    assert_eq!(
        addrs(&r),
        ["192.0.2.1"],
        "masked to /16 -> unknown -> default us-east"
    );
    let (_, src, scope) = ecs_of(&r).expect("ecs echoed");
    assert_eq!(src, 16);
    assert!(scope > 0 && scope <= 24, "scope {scope}");
    // New York via ECS.
    let r = udp(
        s.udp,
        &with_edns(query(WWW, RecordType::A), Some(("100.64.1.0", 24))),
    )?;
    assert_eq!(addrs(&r), ["192.0.2.1"]);
    assert_eq!(ecs_of(&r).map(|e| e.2), Some(16), "GeoIP network is a /16");
    // Source prefix 0: no client information; scope 0.
    let r = udp(
        s.udp,
        &with_edns(query(WWW, RecordType::A), Some(("0.0.0.0", 0))),
    )?;
    assert_eq!(ecs_of(&r).map(|e| e.2), Some(0));
    Ok(())
}

#[test]
fn non_steered_answers_get_scope_zero() -> anyhow::Result<()> {
    let s = Server::demo()?;
    for (name, t) in [
        ("static.demo.meridian.test.", RecordType::A),
        ("nope.demo.meridian.test.", RecordType::A),
        (WWW, RecordType::MX),
    ] {
        let r = udp(
            s.udp,
            &with_edns(query(name, t), Some(("198.51.100.0", 24))),
        )?;
        assert_eq!(ecs_of(&r).map(|e| e.2), Some(0), "{name} {t}");
    }
    Ok(())
}

#[test]
fn scope_is_capped_and_ecs_can_be_disabled() -> anyhow::Result<()> {
    let dir = tmpdir("ecs");
    let cfg = demo_config(&dir, &[("max_scope_v4 = 24", "max_scope_v4 = 20")], "");
    let s = Server::run(&cfg)?;
    let r = udp(
        s.udp,
        &with_edns(query(WWW, RecordType::A), Some(("198.51.100.0", 24))),
    )?;
    assert_eq!(ecs_of(&r).map(|e| e.2), Some(20));
    drop(s);

    let cfg = demo_config(&dir, &[("enabled = true", "enabled = false")], "");
    let s = Server::run(&cfg)?;
    let r = udp(
        s.udp,
        &with_edns(query(WWW, RecordType::A), Some(("198.51.100.0", 24))),
    )?;
    assert_eq!(ecs_of(&r), None, "no ECS echoed when disabled");
    assert_eq!(
        addrs(&r),
        ["192.0.2.1"],
        "steered on the source (unknown), not the subnet"
    );
    Ok(())
}

#[test]
fn steering_by_source_address_v4_and_v6() -> anyhow::Result<()> {
    let dir = tmpdir("src");
    let csv = dir.join("geo.csv");
    std::fs::write(
        &csv,
        "network,country,continent,lat,lon,asn\n127.0.0.0/8,FR,EU,48.86,2.35,\n::1/128,AU,OC,-33.87,151.21,\n",
    )?;
    let cfg = demo_config(
        &dir,
        &[(
            &format!("csv = \"{EXAMPLES}/demo-geo.csv\""),
            &format!("csv = \"{}\"", csv.display()),
        )],
        "",
    );
    let c = cfg.to_str().expect("path");
    let s = Server::start(&[
        "run",
        "--config",
        c,
        "--listen",
        "127.0.0.1:0",
        "--listen",
        "[::1]:0",
        "--no-admin",
    ])?;
    assert_eq!(s.all.len(), 2);
    let v4 = s.all[0].0;
    let v6 = s.all[1].0;
    assert!(v6.is_ipv6());
    // From 127.0.0.1 (Paris) without ECS.
    let r = udp(v4, &query(WWW, RecordType::A))?;
    assert_eq!(addrs(&r), ["192.0.2.2"]);
    // From ::1 (Sydney), over UDP and TCP.
    let r = udp(v6, &query(WWW, RecordType::AAAA))?;
    assert_eq!(addrs(&r), ["2001:db8:ff::3"]);
    let r = tcp(s.all[1].1, &query(WWW, RecordType::A))?;
    assert_eq!(addrs(&r), ["192.0.2.3"]);
    Ok(())
}

const OVERRIDES: &str = r#"
[[steered]]
name = "ovr.demo.meridian.test."
default_region = "us-east"
overrides = [
  { asn = "AS64500", region = "ap-southeast" },
  { continent = "OC", region = "us-east" },
  { country = "US", region = "eu-west" },
]
"#;

#[test]
fn overrides_by_asn_continent_country() -> anyhow::Result<()> {
    let dir = tmpdir("ovr");
    let cfg = demo_config(&dir, &[], OVERRIDES);
    let s = Server::run(&cfg)?;
    let ask = |subnet: &str| -> anyhow::Result<Vec<String>> {
        Ok(addrs(&udp(
            s.udp,
            &with_edns(
                query("ovr.demo.meridian.test.", RecordType::A),
                Some((subnet, 24)),
            ),
        )?))
    };
    assert_eq!(
        ask("198.51.100.0")?,
        ["192.0.2.3"],
        "AS64500 -> ap-southeast"
    );
    assert_eq!(
        ask("203.0.113.0")?,
        ["192.0.2.1"],
        "continent OC -> us-east"
    );
    assert_eq!(ask("100.64.0.0")?, ["192.0.2.2"], "country US -> eu-west");
    assert_eq!(ask("192.0.2.0")?, ["192.0.2.1"], "unknown -> default");
    // The override target drained: fall back to nearest.
    assert_eq!(
        http("POST", s.admin(), "/regions/ap-southeast/drain")?.0,
        200
    );
    assert_eq!(
        ask("198.51.100.0")?,
        ["192.0.2.2"],
        "Paris nearest is eu-west"
    );
    Ok(())
}

fn all_down_config(dir: &std::path::Path, mode: &str) -> std::path::PathBuf {
    let dead = closed_port();
    let health = format!(
        "[regions.health]\nkind = \"http\"\naddress = \"{dead}\"\ninterval_ms = 50\ntimeout_ms = 200\nfall = 1\nrise = 1\n"
    );
    let mut replace = Vec::new();
    let a1 = "a = [\"192.0.2.1\"]\naaaa = [\"2001:db8:ff::1\"]\n".to_string();
    let a2 = "a = [\"192.0.2.2\"]\naaaa = [\"2001:db8:ff::2\"]\n".to_string();
    let a3 = "a = [\"192.0.2.3\"]\naaaa = [\"2001:db8:ff::3\"]\n".to_string();
    let r1 = format!("{a1}{health}");
    let r2 = format!("{a2}{health}");
    let r3 = format!("{a3}{health}");
    replace.push((a1.clone(), r1));
    replace.push((a2.clone(), r2));
    replace.push((a3.clone(), r3));
    replace.push((
        "fail_mode = \"open\"".to_string(),
        format!("fail_mode = \"{mode}\""),
    ));
    let pairs: Vec<(&str, &str)> = replace
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    demo_config(dir, &pairs, "")
}

#[test]
fn every_region_down_fail_open_answers_all() -> anyhow::Result<()> {
    let dir = tmpdir("open");
    let s = Server::run(&all_down_config(&dir, "open"))?;
    let m = with_edns(query(WWW, RecordType::A), Some(("198.51.100.0", 24)));
    let ok = eventually(Duration::from_secs(5), || {
        udp(s.udp, &m)
            .map(|r| addrs(&r).len() == 3)
            .unwrap_or(false)
    });
    assert!(ok, "fail-open should answer with all three regions");
    let mut got = addrs(&udp(s.udp, &m)?);
    got.sort();
    assert_eq!(got, ["192.0.2.1", "192.0.2.2", "192.0.2.3"]);
    Ok(())
}

#[test]
fn every_region_down_fail_closed_servfails() -> anyhow::Result<()> {
    let dir = tmpdir("closed");
    let s = Server::run(&all_down_config(&dir, "closed"))?;
    let m = with_edns(query(WWW, RecordType::A), Some(("198.51.100.0", 24)));
    let ok = eventually(Duration::from_secs(5), || {
        udp(s.udp, &m)
            .map(|r| r.metadata.response_code == ResponseCode::ServFail)
            .unwrap_or(false)
    });
    assert!(ok, "fail-closed should SERVFAIL");
    let (_, metrics) = http("GET", s.admin(), "/metrics")?;
    assert!(
        metrics.contains("meridian_dns_health_transitions_total{region=\"eu-west\",to=\"down\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("region=\"fail-closed\""), "{metrics}");
    Ok(())
}
