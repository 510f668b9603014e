//! The same steering, seen by a third-party client: kdig (knot-dnsutils).

use std::process::Command;

use crate::support::*;

fn kdig(args: &[&str]) -> String {
    let out = match Command::new("kdig").args(args).output() {
        Ok(o) => o,
        Err(e) => panic!(
            "kdig is required for these tests but could not be run ({e}); install the Debian package knot-dnsutils (listed in .ci/apt-packages.txt)"
        ),
    };
    assert!(
        out.status.success(),
        "kdig {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn kdig_with_subnet() -> anyhow::Result<()> {
    let s = Server::demo()?;
    let at = format!("@{}", s.udp.ip());
    let port = s.udp.port().to_string();
    let base = [at.as_str(), "-p", port.as_str(), "+time=3", "+retry=0"];
    let run = |extra: &[&str]| {
        let mut a: Vec<&str> = base.to_vec();
        a.extend_from_slice(extra);
        kdig(&a)
    };
    let out = run(&["www.demo.meridian.test", "A", "+subnet=198.51.100.0/24"]);
    assert!(out.contains("192.0.2.2"), "{out}");
    assert!(out.contains("CLIENT-SUBNET: 198.51.100.0/24/24"), "{out}");
    assert!(out.contains(" aa"), "AA flag: {out}");
    let out = run(&[
        "www.demo.meridian.test",
        "AAAA",
        "+subnet=2001:db8:2::/48",
        "+short",
    ]);
    assert_eq!(out.trim(), "2001:db8:ff::3");
    // TCP through kdig.
    let out = run(&[
        "+tcp",
        "www.demo.meridian.test",
        "A",
        "+subnet=203.0.113.0/24",
        "+short",
    ]);
    assert_eq!(out.trim(), "192.0.2.3");
    // Truncated over UDP, kdig reports TC; over TCP it gets all 20.
    let out = run(&["+notcp", "+ignore", "big.demo.meridian.test", "TXT"]);
    assert!(out.contains(" tc"), "{out}");
    let out = run(&["+tcp", "big.demo.meridian.test", "TXT", "+short"]);
    assert_eq!(out.lines().count(), 20, "{out}");
    // NXDOMAIN and REFUSED.
    let out = run(&["nope.demo.meridian.test", "A"]);
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    let out = run(&["example.com", "A"]);
    assert!(out.contains("status: REFUSED"), "{out}");
    // Drain moves the kdig answer too.
    assert_eq!(http("POST", s.admin(), "/regions/eu-west/drain")?.0, 200);
    let out = run(&[
        "www.demo.meridian.test",
        "A",
        "+subnet=198.51.100.0/24",
        "+short",
    ]);
    assert_eq!(out.trim(), "192.0.2.1");
    Ok(())
}
