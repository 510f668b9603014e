//! SIGHUP reloads (a bad config is refused), GeoIP file reload, SIGTERM.

use std::time::Duration;

use hickory_proto::rr::RecordType;

use crate::support::*;

#[test]
fn sighup_reloads_and_refuses_bad_config_and_sigterm_exits() -> anyhow::Result<()> {
    let dir = tmpdir("hup");
    let cfg = demo_config(&dir, &[], "");
    let mut s = Server::run(&cfg)?;
    let m = with_edns(
        query("www.demo.meridian.test.", RecordType::A),
        Some(("198.51.100.0", 24)),
    );
    assert_eq!(addrs(&udp(s.udp, &m)?), ["192.0.2.2"]);

    // A drain survives a reload.
    assert_eq!(http("POST", s.admin(), "/regions/us-east/drain")?.0, 200);
    // New answer for eu-west.
    let good =
        std::fs::read_to_string(&cfg)?.replace("a = [\"192.0.2.2\"]", "a = [\"192.0.2.22\"]");
    std::fs::write(&cfg, &good)?;
    s.signal("HUP");
    assert!(eventually(Duration::from_secs(5), || {
        udp(s.udp, &m)
            .map(|r| addrs(&r) == ["192.0.2.22"])
            .unwrap_or(false)
    }));
    let (_, regions) = http("GET", s.admin(), "/regions")?;
    assert!(regions.contains("\"drained\":true"), "{regions}");

    // A broken config is refused; the old one keeps serving.
    std::fs::write(&cfg, good.replace("lat = 53.35", "lat = \"north\""))?;
    s.signal("HUP");
    let (_, metrics) = (0..100)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            http("GET", s.admin(), "/metrics").unwrap_or_default()
        })
        .find(|(_, m)| m.contains("meridian_dns_reloads_total{what=\"config\",result=\"error\"} 1"))
        .ok_or_else(|| anyhow::anyhow!("reload error not counted"))?;
    assert!(metrics.contains("result=\"ok\"} 1"), "{metrics}");
    assert_eq!(addrs(&udp(s.udp, &m)?), ["192.0.2.22"]);

    s.signal("TERM");
    let status = s
        .wait_exit(Duration::from_secs(10))
        .ok_or_else(|| anyhow::anyhow!("no exit after SIGTERM"))?;
    assert!(status.success(), "{status:?}");
    Ok(())
}

#[test]
fn geoip_file_change_is_picked_up() -> anyhow::Result<()> {
    let dir = tmpdir("georeload");
    let csv = dir.join("g.csv");
    let db = dir.join("g.mmdb");
    let build = |row: &str| -> anyhow::Result<()> {
        std::fs::write(
            &csv,
            format!("network,country,continent,lat,lon,asn\n{row}\n"),
        )?;
        let st = std::process::Command::new(BIN)
            .args([
                "geo",
                "build",
                "--csv",
                csv.to_str().expect("p"),
                "--out",
                db.to_str().expect("p"),
            ])
            .output()?;
        anyhow::ensure!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        Ok(())
    };
    build("198.51.100.0/24,FR,EU,48.86,2.35,")?;
    let cfg = demo_config(
        &dir,
        &[(
            &format!("csv = \"{EXAMPLES}/demo-geo.csv\""),
            &format!("city_db = \"{}\"\nreload_check_secs = 1", db.display()),
        )],
        "",
    );
    let s = Server::run(&cfg)?;
    let m = with_edns(
        query("www.demo.meridian.test.", RecordType::A),
        Some(("198.51.100.0", 24)),
    );
    assert_eq!(addrs(&udp(s.udp, &m)?), ["192.0.2.2"]);
    // Same network now in Sydney. Make sure the mtime moves.
    std::thread::sleep(Duration::from_millis(1100));
    build("198.51.100.0/24,AU,OC,-33.87,151.21,")?;
    assert!(
        eventually(Duration::from_secs(6), || {
            udp(s.udp, &m)
                .map(|r| addrs(&r) == ["192.0.2.3"])
                .unwrap_or(false)
        }),
        "GeoIP change not picked up"
    );
    Ok(())
}
