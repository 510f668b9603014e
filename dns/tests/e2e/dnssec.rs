//! DNSSEC, checked by real validators: `delv` (bind9-dnsutils) validates
//! steered answers (three regions, with and without ECS), the compact
//! denial of NXDOMAIN and NODATA, a ZSK rollover; it refuses an answer whose
//! signature a proxy corrupts. `kdig +dnssec` shows the records and the
//! TC/TCP fallback of the larger signed answers.
//!
//! delv cannot send ECS, so a small UDP proxy in the test adds the option
//! to every query it forwards (as a resolver with ECS would); the same proxy
//! flips a byte of a signature for the corruption test.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use hickory_proto::dnssec::rdata::DNSSECRData;
use hickory_proto::op::{Edns, Message};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
use hickory_proto::rr::{RData, RecordType};

use crate::support::*;

const ZONE: &str = "demo.meridian.test.";

/// The demo zone plus `mid`: an RRset that fits 512 bytes unsigned but not
/// signed.
fn zone_text() -> String {
    let mut z = std::fs::read_to_string(Path::new(EXAMPLES).join("demo.meridian.test.zone"))
        .expect("demo zone");
    for i in 0..5 {
        z.push_str(&format!(
            "mid IN TXT \"{i}-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\"\n"
        ));
    }
    z
}

fn run_tool(tool: &str, package: &str, args: &[&str]) -> (bool, String) {
    let out = match Command::new(tool).args(args).output() {
        Ok(o) => o,
        Err(e) => panic!(
            "{tool} is required for these tests but could not be run ({e}); install the Debian package {package} (listed in .ci/apt-packages.txt)"
        ),
    };
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// `meridian-dns keys generate`; returns the key tag and, for a KSK or
/// CSK, the trust-anchors line.
fn keygen(dir: &Path, file: &str, role: &str, alg: &str) -> Result<(u16, Option<String>)> {
    let out = Command::new(BIN)
        .args(["keys", "generate", "--zone", ZONE, "--role", role])
        .args(["--algorithm", alg, "--out"])
        .arg(dir.join(file))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "keys generate failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tag = text
        .split("key tag ")
        .nth(1)
        .and_then(|t| t.split(')').next())
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| anyhow!("no key tag in {text:?}"))?;
    let anchor = text
        .lines()
        .find(|l| l.starts_with("trust-anchors"))
        .map(str::to_owned);
    Ok((tag, anchor))
}

/// A signed demo: config and zone in `dir`, keys `(file, role, active)`.
fn write_config(dir: &Path, keys: &[(&str, &str, bool)]) -> PathBuf {
    std::fs::write(dir.join("zone"), zone_text()).expect("zone");
    let keys: Vec<String> = keys
        .iter()
        .map(|(f, r, a)| format!("{{ file = \"{f}\", role = \"{r}\", active = {a} }}"))
        .collect();
    demo_config(
        dir,
        &[(
            &format!("file = \"{EXAMPLES}/demo.meridian.test.zone\""),
            &format!(
                "file = \"zone\"\n[zones.dnssec]\nkeys = [{}]\n",
                keys.join(", ")
            ),
        )],
        "",
    )
}

struct Signed {
    server: Server,
    anchors: PathBuf,
    ksk: u16,
    zsk: u16,
}

/// KSK + ZSK (ECDSA P-256), server started.
fn signed(tag: &str) -> Result<Signed> {
    let dir = tmpdir(tag);
    let (ksk, anchor) = keygen(&dir, "ksk.pem", "ksk", "ecdsap256sha256")?;
    let (zsk, _) = keygen(&dir, "zsk.pem", "zsk", "ecdsap256sha256")?;
    let anchors = dir.join("anchors.conf");
    std::fs::write(&anchors, anchor.ok_or_else(|| anyhow!("no anchor"))?)?;
    let cfg = write_config(&dir, &[("ksk.pem", "ksk", true), ("zsk.pem", "zsk", true)]);
    let server = Server::run(&cfg)?;
    Ok(Signed {
        server,
        anchors,
        ksk,
        zsk,
    })
}

/// `delv @127.0.0.1 -p PORT -a ANCHORS +root=ZONE ARGS`.
fn delv(port: u16, anchors: &Path, args: &[&str]) -> (bool, String) {
    let port = port.to_string();
    let anchors = anchors.to_str().expect("path");
    let mut a = vec![
        "@127.0.0.1",
        "-p",
        &port,
        "-a",
        anchors,
        "+root=demo.meridian.test",
    ];
    a.extend_from_slice(args);
    run_tool("delv", "bind9-dnsutils", &a)
}

fn kdig(port: u16, args: &[&str]) -> String {
    let port = port.to_string();
    let mut a = vec!["@127.0.0.1", "-p", &port, "+time=3", "+retry=0"];
    a.extend_from_slice(args);
    let (ok, out) = run_tool("kdig", "knot-dnsutils", &a);
    assert!(ok, "kdig {args:?} failed: {out}");
    out
}

fn assert_validated(out: &str, what: &str) {
    assert!(
        out.contains("; fully validated"),
        "{what}: delv did not validate:\n{out}"
    );
}

/// A UDP proxy on 127.0.0.1 in front of the server: adds an ECS option to
/// each query, and can flip a byte of the signature over A answers.
struct Proxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    corrupted: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    fn start(upstream: SocketAddr, ecs: Option<(&str, u8)>, corrupt: bool) -> Result<Self> {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let addr = sock.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let corrupted = Arc::new(AtomicUsize::new(0));
        let ecs = ecs.map(|(a, l)| ClientSubnet::new(a.parse().expect("ecs addr"), l, 0));
        let (stop2, corrupted2) = (stop.clone(), corrupted.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65535];
            // Bounded: stops when told; each exchange has a 3s timeout.
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, client)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(mut q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                if let Some(cs) = &ecs {
                    let mut e = q.edns.take().unwrap_or_else(Edns::new);
                    e.options_mut().insert(EdnsOption::Subnet(*cs));
                    q.edns = Some(e);
                }
                let qtype = q.queries.first().map(|x| x.query_type());
                let Ok(raw) = q.to_vec() else { continue };
                let Some(mut resp) = exchange(upstream, &raw) else {
                    continue;
                };
                if corrupt && qtype == Some(RecordType::A) && flip_signature(&mut resp) {
                    corrupted2.fetch_add(1, Ordering::Relaxed);
                }
                let _ = sock.send_to(&resp, client);
            }
        });
        Ok(Self {
            addr,
            stop,
            corrupted,
            thread: Some(thread),
        })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn exchange(upstream: SocketAddr, raw: &[u8]) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.send_to(raw, upstream).ok()?;
    let mut buf = vec![0u8; 65535];
    let (n, _) = s.recv_from(&mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// Flip one bit in the middle of the first RRSIG signature of the answer.
fn flip_signature(raw: &mut [u8]) -> bool {
    let Ok(m) = Message::from_vec(raw) else {
        return false;
    };
    let Some(sig) = m.answers.iter().find_map(|r| match &r.data {
        RData::DNSSEC(DNSSECRData::RRSIG(s)) => Some(s.sig().to_vec()),
        _ => None,
    }) else {
        return false;
    };
    match raw.windows(sig.len()).position(|w| w == sig.as_slice()) {
        Some(pos) => {
            raw[pos + sig.len() / 2] ^= 0x01;
            true
        }
        None => false,
    }
}

fn rrsig_tags(out: &str) -> Vec<u16> {
    out.lines()
        .filter(|l| l.contains("\tRRSIG\t"))
        .filter_map(|l| l.split_whitespace().nth(10).and_then(|t| t.parse().ok()))
        .collect()
}

#[test]
fn delv_validates_steered_answers_from_three_regions() -> Result<()> {
    let s = signed("dnssec-steer")?;
    let port = s.server.udp.port();
    // Without ECS: the client (127.0.0.1) is unknown, the default region.
    let (ok, out) = delv(port, &s.anchors, &["www.demo.meridian.test", "A"]);
    assert!(ok, "{out}");
    assert_validated(&out, "no ECS");
    assert!(out.contains("192.0.2.1"), "{out}");
    // With ECS, added by the proxy: three regions, each validated.
    for (subnet, len, want, qtype) in [
        ("198.51.100.0", 24, "192.0.2.2", "A"), // Paris -> eu-west
        ("203.0.113.0", 24, "192.0.2.3", "A"),  // Sydney -> ap-southeast
        ("100.64.0.0", 16, "192.0.2.1", "A"),   // New York -> us-east
        ("2001:db8:2::", 48, "2001:db8:ff::3", "AAAA"), // Sydney, IPv6
    ] {
        let p = Proxy::start(s.server.udp, Some((subnet, len)), false)?;
        let (ok, out) = delv(
            p.addr.port(),
            &s.anchors,
            &["www.demo.meridian.test", qtype],
        );
        assert!(ok, "{subnet}: {out}");
        assert_validated(&out, subnet);
        assert!(out.contains(want), "{subnet}: want {want}: {out}");
    }
    // kdig +dnssec shows the RRSIG by the ZSK, and the ECS scope is kept.
    let out = kdig(
        port,
        &[
            "+dnssec",
            "www.demo.meridian.test",
            "A",
            "+subnet=198.51.100.0/24",
        ],
    );
    assert!(out.contains("192.0.2.2"), "{out}");
    assert!(out.contains("CLIENT-SUBNET: 198.51.100.0/24/24"), "{out}");
    assert!(out.contains("flags: do"), "{out}");
    assert_eq!(rrsig_tags(&out), vec![s.zsk], "{out}");
    // Without DO, the answer is unchanged: no RRSIG.
    let out = kdig(
        port,
        &["www.demo.meridian.test", "A", "+subnet=198.51.100.0/24"],
    );
    assert!(out.contains("192.0.2.2") && !out.contains("RRSIG"), "{out}");
    // Static data, CNAME and wildcard answers validate too.
    for (name, want) in [
        ("static.demo.meridian.test", "192.0.2.100"),
        ("alias.demo.meridian.test", "CNAME"),
        ("x.wild.demo.meridian.test", "192.0.2.77"),
    ] {
        let (ok, out) = delv(port, &s.anchors, &[name, "A"]);
        assert!(ok, "{name}: {out}");
        assert_validated(&out, name);
        assert!(out.contains(want), "{name}: {out}");
    }
    Ok(())
}

#[test]
fn delv_validates_nxdomain_and_nodata_proofs() -> Result<()> {
    let s = signed("dnssec-deny")?;
    let port = s.server.udp.port();
    for (name, qtype, what) in [
        ("nope.demo.meridian.test", "A", "NXDOMAIN"),
        ("deep.nope.demo.meridian.test", "TXT", "NXDOMAIN below"),
        ("static.demo.meridian.test", "MX", "NODATA"),
        ("www.demo.meridian.test", "TXT", "NODATA at a steered name"),
        ("x.wild.demo.meridian.test", "TXT", "NODATA at a wildcard"),
        (
            "_udp.demo.meridian.test",
            "TXT",
            "NODATA at an empty non-terminal",
        ),
        ("demo.meridian.test", "AAAA", "NODATA at the apex"),
    ] {
        let (_, out) = delv(port, &s.anchors, &[name, qtype]);
        assert!(
            out.contains("; negative response, fully validated"),
            "{what}: {out}"
        );
    }
    // The records, as kdig shows them: NOERROR with an NSEC whose bitmap
    // has NXNAME (type 128), next name \000.<name>.
    let out = kdig(port, &["+dnssec", "nope.demo.meridian.test", "A"]);
    assert!(out.contains("status: NOERROR"), "{out}");
    let nsec = out
        .lines()
        .find(|l| l.contains("\tNSEC\t"))
        .ok_or_else(|| anyhow!("no NSEC: {out}"))?;
    assert!(
        nsec.contains("\\000.nope.demo.meridian.test. RRSIG NSEC TYPE128"),
        "{nsec}"
    );
    assert_eq!(rrsig_tags(&out).len(), 2, "SOA and NSEC signed: {out}");
    // NODATA: the bitmap lists what exists, never the type asked.
    let out = kdig(port, &["+dnssec", "static.demo.meridian.test", "MX"]);
    let nsec = out
        .lines()
        .find(|l| l.contains("\tNSEC\t"))
        .ok_or_else(|| anyhow!("no NSEC: {out}"))?;
    assert!(nsec.ends_with("A AAAA RRSIG NSEC"), "{nsec}");
    // Without DO: plain NXDOMAIN, no DNSSEC records.
    let out = kdig(port, &["nope.demo.meridian.test", "A"]);
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    assert!(!out.contains("NSEC") && !out.contains("RRSIG"), "{out}");
    Ok(())
}

#[test]
fn dnskey_cds_cdnskey_are_served() -> Result<()> {
    let s = signed("dnssec-keys")?;
    let port = s.server.udp.port();
    let out = kdig(port, &["+dnssec", ZONE, "DNSKEY"]);
    assert!(out.contains("DNSKEY\t257 3 13 "), "{out}");
    assert!(out.contains("DNSKEY\t256 3 13 "), "{out}");
    assert_eq!(rrsig_tags(&out), vec![s.ksk], "the KSK signs DNSKEY: {out}");
    let out = kdig(port, &[ZONE, "CDS", "+short"]);
    assert!(
        out.trim().starts_with(&format!("{} 13 2 ", s.ksk)),
        "CDS of the KSK: {out}"
    );
    let out = kdig(port, &[ZONE, "CDNSKEY", "+short"]);
    assert!(out.trim().starts_with("257 3 13 "), "{out}");
    let (ok, out) = delv(port, &s.anchors, &[ZONE, "CDS"]);
    assert!(ok, "{out}");
    assert_validated(&out, "CDS");
    Ok(())
}

#[test]
fn delv_refuses_a_corrupted_signature() -> Result<()> {
    let s = signed("dnssec-corrupt")?;
    let p = Proxy::start(s.server.udp, Some(("198.51.100.0", 24)), true)?;
    let (ok, out) = delv(p.addr.port(), &s.anchors, &["www.demo.meridian.test", "A"]);
    assert!(
        p.corrupted.load(Ordering::Relaxed) > 0,
        "the proxy corrupted nothing: {out}"
    );
    // delv exits 0 even when resolution fails: read what it says.
    let _ = ok;
    assert!(!out.contains("fully validated"), "{out}");
    assert!(
        out.contains("resolution failed: RRSIG failed to verify"),
        "{out}"
    );
    Ok(())
}

#[test]
fn signed_answers_fall_back_to_tcp() -> Result<()> {
    let s = signed("dnssec-tc")?;
    let port = s.server.udp.port();
    let base = [
        "+notcp",
        "+ignore",
        "+bufsize=512",
        "mid.demo.meridian.test",
        "TXT",
    ];
    let out = kdig(port, &base);
    assert!(!out.contains(" tc"), "fits unsigned: {out}");
    let mut signed_udp = base.to_vec();
    signed_udp.push("+dnssec");
    let out = kdig(port, &signed_udp);
    assert!(out.contains(" tc"), "signed does not fit 512: {out}");
    let out = kdig(port, &["+tcp", "+dnssec", "mid.demo.meridian.test", "TXT"]);
    assert_eq!(out.matches("\tTXT\t").count(), 5, "{out}");
    assert_eq!(rrsig_tags(&out), vec![s.zsk], "{out}");
    // delv retries over TCP by itself and validates.
    let (ok, out) = delv(port, &s.anchors, &["mid.demo.meridian.test", "TXT"]);
    assert!(ok, "{out}");
    assert_validated(&out, "TC then TCP");
    Ok(())
}

#[test]
fn zsk_rollover_keeps_answers_valid() -> Result<()> {
    let dir = tmpdir("dnssec-roll");
    let (_ksk, anchor) = keygen(&dir, "ksk.pem", "ksk", "ecdsap256sha256")?;
    let (old, _) = keygen(&dir, "zsk-old.pem", "zsk", "ecdsap256sha256")?;
    let (new, _) = keygen(&dir, "zsk-new.pem", "zsk", "ecdsap256sha256")?;
    let anchors = dir.join("anchors.conf");
    std::fs::write(&anchors, anchor.ok_or_else(|| anyhow!("no anchor"))?)?;
    // 1. Pre-publish: the new ZSK is in the DNSKEY RRset, the old one signs.
    let cfg = write_config(
        &dir,
        &[
            ("ksk.pem", "ksk", true),
            ("zsk-old.pem", "zsk", true),
            ("zsk-new.pem", "zsk", false),
        ],
    );
    let s = Server::run(&cfg)?;
    let port = s.udp.port();
    let check = |want: u16, keys: usize| -> Result<()> {
        let out = kdig(port, &["+dnssec", "www.demo.meridian.test", "A"]);
        let tags = rrsig_tags(&out);
        if tags != vec![want] {
            bail!("signed by {tags:?}, want {want}");
        }
        let out = kdig(port, &[ZONE, "DNSKEY", "+short"]);
        if out.lines().count() != keys {
            bail!("{} DNSKEYs, want {keys}: {out}", out.lines().count());
        }
        let (ok, out) = delv(port, &anchors, &["www.demo.meridian.test", "A"]);
        if !ok || !out.contains("; fully validated") {
            bail!("not validated: {out}");
        }
        Ok(())
    };
    check(old, 3)?;
    // 2. Switch: the new ZSK signs, the old one stays published.
    write_config(
        &dir,
        &[
            ("ksk.pem", "ksk", true),
            ("zsk-old.pem", "zsk", false),
            ("zsk-new.pem", "zsk", true),
        ],
    );
    s.signal("HUP");
    assert!(
        eventually(Duration::from_secs(10), || check(new, 3).is_ok()),
        "{:?}",
        check(new, 3)
    );
    // 3. Retire: the old ZSK leaves the DNSKEY RRset.
    write_config(
        &dir,
        &[("ksk.pem", "ksk", true), ("zsk-new.pem", "zsk", true)],
    );
    s.signal("HUP");
    assert!(
        eventually(Duration::from_secs(10), || check(new, 2).is_ok()),
        "{:?}",
        check(new, 2)
    );
    Ok(())
}

#[test]
fn ed25519_csk_validates() -> Result<()> {
    let dir = tmpdir("dnssec-csk");
    let (csk, anchor) = keygen(&dir, "csk.pem", "csk", "ed25519")?;
    let anchors = dir.join("anchors.conf");
    let anchor = anchor.ok_or_else(|| anyhow!("no anchor"))?;
    assert!(anchor.contains(" 257 3 15 "), "{anchor}");
    std::fs::write(&anchors, anchor)?;
    let cfg = write_config(&dir, &[("csk.pem", "csk", true)]);
    let s = Server::run(&cfg)?;
    let p = Proxy::start(s.udp, Some(("203.0.113.0", 24)), false)?;
    let (ok, out) = delv(p.addr.port(), &anchors, &["www.demo.meridian.test", "A"]);
    assert!(ok, "{out}");
    assert_validated(&out, "Ed25519 CSK");
    assert!(out.contains("192.0.2.3"), "{out}");
    let (_, out) = delv(s.udp.port(), &anchors, &["nope.demo.meridian.test", "A"]);
    assert!(out.contains("negative response, fully validated"), "{out}");
    let out = kdig(s.udp.port(), &["+dnssec", ZONE, "DNSKEY"]);
    assert_eq!(rrsig_tags(&out), vec![csk], "{out}");
    Ok(())
}

#[test]
fn bad_keys_are_config_errors() -> Result<()> {
    let dir = tmpdir("dnssec-badkey");
    keygen(&dir, "zsk.pem", "zsk", "ecdsap256sha256")?;
    std::fs::write(dir.join("junk.pem"), "not a key")?;
    let check = |keys: &[(&str, &str, bool)]| -> Result<String> {
        let cfg = write_config(&dir, keys);
        let out = Command::new(BIN)
            .arg("check")
            .arg("--config")
            .arg(&cfg)
            .output()?;
        if out.status.success() {
            bail!("check accepted {keys:?}");
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let e = check(&[("zsk.pem", "zsk", true)])?;
    assert!(e.contains("no active ksk or csk"), "{e}");
    let e = check(&[("junk.pem", "csk", true)])?;
    assert!(
        e.contains("config.toml:") && e.contains("not a PKCS#8 PEM"),
        "{e}"
    );
    let e = check(&[("missing.pem", "csk", true)])?;
    assert!(e.contains("cannot read key file"), "{e}");
    Ok(())
}
