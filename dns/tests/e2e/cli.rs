//! The command line: check, explain, geo build, --help/--version.

use std::process::Command;

use crate::support::*;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run meridian-dns");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_and_help() {
    let (code, out, _) = run(&["--version"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        format!("meridian-dns {}", env!("CARGO_PKG_VERSION"))
    );
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    for sub in ["run", "demo", "check", "explain", "geo"] {
        assert!(out.contains(sub), "{sub} missing from --help: {out}");
    }
    let (code, out, _) = run(&["run", "--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("--listen") && out.contains("--admin") && out.contains("--config"),
        "{out}"
    );
}

#[test]
fn check_accepts_the_examples() {
    for f in ["demo.toml", "production.toml"] {
        let p = format!("{EXAMPLES}/{f}");
        let (code, out, err) = run(&["check", "--config", &p]);
        assert_eq!(code, 0, "{f}: {out}{err}");
        assert!(out.contains(": ok"), "{out}");
    }
}

#[test]
fn check_reports_file_line_col() -> anyhow::Result<()> {
    let dir = tmpdir("check");
    // Syntax / unknown field.
    let p = dir.join("bad1.toml");
    std::fs::write(
        &p,
        "[server]\nlisten = [\"127.0.0.1:53\"]\nlisten_typo = 1\n",
    )?;
    let (code, _, err) = run(&["check", "--config", p.to_str().expect("p")]);
    assert_eq!(code, 1);
    assert!(err.starts_with(&format!("{}:3:1: ", p.display())), "{err}");
    assert!(err.contains("listen_typo"), "{err}");
    // Semantic errors, located by key.
    let p = demo_config(
        &dir,
        &[
            ("lat = 53.35", "lat = 153.35"),
            ("default_region = \"us-east\"", "default_region = \"mars\""),
        ],
        "",
    );
    let (code, _, err) = run(&["check", "--config", p.to_str().expect("p")]);
    assert_eq!(code, 1);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    let src = std::fs::read_to_string(&p)?;
    let lat_line = src
        .lines()
        .position(|l| l.starts_with("lat = 153.35"))
        .expect("lat")
        + 1;
    assert!(
        lines[0].starts_with(&format!("{}:{lat_line}:7: latitude", p.display())),
        "{err}"
    );
    assert!(lines[1].contains("unknown region \"mars\""), "{err}");
    // Zone file errors point into the zone file.
    let zone = dir.join("bad.zone");
    std::fs::write(
        &zone,
        "$TTL 60\n@ IN SOA ns h 1 2 3 4 5\n@ IN NS ns\nns IN A 192.0.2.1\nbad IN A not-an-ip\n",
    )?;
    let p = demo_config(
        &dir,
        &[(
            &format!("file = \"{EXAMPLES}/demo.meridian.test.zone\""),
            &format!("file = \"{}\"", zone.display()),
        )],
        "",
    );
    let (code, _, err) = run(&["check", "--config", p.to_str().expect("p")]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!("{}:5:1: ", zone.display())),
        "{err}"
    );
    Ok(())
}

#[test]
fn explain_prints_the_decision() {
    let (code, out, err) = run(&[
        "explain",
        "--client",
        "198.51.100.7",
        "www.demo.meridian.test",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("country=FR"), "{out}");
    assert!(
        out.contains("eu-west") && out.contains("<= chosen"),
        "{out}"
    );
    assert!(out.contains("answer A: 192.0.2.2"), "{out}");
    assert!(out.contains("km"), "distances: {out}");
    let p = format!("{EXAMPLES}/production.toml");
    let (code, out, _) = run(&[
        "explain",
        "--config",
        &p,
        "--client",
        "198.51.100.7",
        "www.demo.meridian.test.",
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("override AS64500"), "{out}");
    let (code, _, err) = run(&[
        "explain",
        "--client",
        "192.0.2.1",
        "static.demo.meridian.test",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("not a steered name"), "{err}");
}

#[test]
fn geo_build_then_lookup_and_serve() -> anyhow::Result<()> {
    let dir = tmpdir("geo");
    let csv = dir.join("ranges.csv");
    std::fs::write(
        &csv,
        "network,country,continent,lat,lon,asn\n10.0.0.0/8,JP,AS,35.68,139.69,AS64510\n2001:db8:9::/48,IE,EU,53.35,-6.26,64511\n",
    )?;
    let out = dir.join("db.mmdb");
    let (code, o, e) = run(&[
        "geo",
        "build",
        "--csv",
        csv.to_str().expect("p"),
        "--out",
        out.to_str().expect("p"),
    ]);
    assert_eq!(code, 0, "{o}{e}");
    let (code, o, _) = run(&[
        "geo",
        "lookup",
        "--db",
        out.to_str().expect("p"),
        "10.1.2.3",
    ]);
    assert_eq!(code, 0);
    assert!(
        o.contains("country=JP") && o.contains("asn=AS64510") && o.contains("/8"),
        "{o}"
    );
    // maxminddb reads it directly too (the same crate the server uses).
    let r = maxminddb::Reader::open_readfile(&out)?;
    r.verify()?;
    assert_eq!(r.metadata().ip_version, 6);
    // A bad CSV: file:line:col.
    std::fs::write(
        &csv,
        "10.0.0.0/8,JP,AS,35.68,139.69,\n10.0.0.0/33,JP,AS,1,1,\n",
    )?;
    let (code, _, e) = run(&[
        "geo",
        "build",
        "--csv",
        csv.to_str().expect("p"),
        "--out",
        out.to_str().expect("p"),
    ]);
    assert_eq!(code, 1);
    assert!(e.contains(&format!("{}:2:1:", csv.display())), "{e}");
    Ok(())
}

#[test]
fn explain_uses_live_health_from_the_admin_api() -> anyhow::Result<()> {
    let s = Server::demo()?;
    assert_eq!(http("POST", s.admin(), "/regions/eu-west/drain")?.0, 200);
    let admin = s.admin().to_string();
    let (code, out, err) = run(&[
        "explain",
        "--admin",
        &admin,
        "--client",
        "198.51.100.7",
        "www.demo.meridian.test",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("drained=true"), "{out}");
    assert!(out.contains("answer A: 192.0.2.1"), "{out}");
    Ok(())
}
