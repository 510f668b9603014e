//! DNS protocol correctness against the demo zone.

use hickory_proto::op::{Edns, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, RecordType};

use crate::support::*;

#[test]
fn authoritative_positive_negative_and_refused() -> anyhow::Result<()> {
    let s = Server::demo()?;
    let r = udp(s.udp, &query("static.demo.meridian.test.", RecordType::A))?;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.metadata.authoritative, "AA bit");
    assert!(!r.metadata.recursion_available, "no recursion offered");
    assert_eq!(addrs(&r), ["192.0.2.100"]);

    // NXDOMAIN with the SOA (negative TTL = SOA minimum 300).
    let r = udp(s.udp, &query("missing.demo.meridian.test.", RecordType::A))?;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert!(r.metadata.authoritative);
    assert!(r.answers.is_empty());
    assert_eq!(r.authorities.len(), 1);
    assert_eq!(r.authorities[0].record_type(), RecordType::SOA);
    assert_eq!(r.authorities[0].ttl, 300);

    // NODATA: name exists, type does not.
    let r = udp(s.udp, &query("static.demo.meridian.test.", RecordType::MX))?;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty());
    assert_eq!(r.authorities[0].record_type(), RecordType::SOA);
    // NODATA at a steered name and at an empty non-terminal (_udp).
    let r = udp(s.udp, &query("www.demo.meridian.test.", RecordType::TXT))?;
    assert_eq!(
        (r.metadata.response_code, r.answers.len()),
        (ResponseCode::NoError, 0)
    );
    let r = udp(s.udp, &query("_udp.demo.meridian.test.", RecordType::A))?;
    assert_eq!(
        (r.metadata.response_code, r.answers.len()),
        (ResponseCode::NoError, 0)
    );

    // Outside our zones: REFUSED, not authoritative, no recursion.
    for name in ["example.com.", "meridian.test.", "."] {
        let r = udp(s.udp, &query(name, RecordType::A))?;
        assert_eq!(r.metadata.response_code, ResponseCode::Refused, "{name}");
        assert!(!r.metadata.authoritative);
        assert!(r.answers.is_empty());
    }
    Ok(())
}

#[test]
fn static_record_types() -> anyhow::Result<()> {
    let s = Server::demo()?;
    for (name, t) in [
        ("demo.meridian.test.", RecordType::SOA),
        ("demo.meridian.test.", RecordType::NS),
        ("demo.meridian.test.", RecordType::MX),
        ("demo.meridian.test.", RecordType::TXT),
        ("demo.meridian.test.", RecordType::CAA),
        ("_sip._udp.demo.meridian.test.", RecordType::SRV),
        ("ns1.demo.meridian.test.", RecordType::AAAA),
    ] {
        let r = udp(s.udp, &query(name, t))?;
        assert_eq!(r.answers.len(), 1, "{name} {t}");
        assert_eq!(r.answers[0].record_type(), t);
    }
    // Wildcard synthesis.
    let r = udp(
        s.udp,
        &query("anything.wild.demo.meridian.test.", RecordType::A),
    )?;
    assert_eq!(addrs(&r), ["192.0.2.77"]);
    assert_eq!(
        r.answers[0].name.to_string(),
        "anything.wild.demo.meridian.test."
    );
    Ok(())
}

#[test]
fn cname_chains_inside_the_zone() -> anyhow::Result<()> {
    let s = Server::demo()?;
    let r = udp(s.udp, &query("chain1.demo.meridian.test.", RecordType::A))?;
    let types: Vec<RecordType> = r.answers.iter().map(|r| r.record_type()).collect();
    assert_eq!(types, [RecordType::CNAME, RecordType::CNAME, RecordType::A]);
    assert_eq!(addrs(&r), ["192.0.2.100"]);
    // CNAME to a steered name: steered on ECS, and scoped.
    let r = udp(
        s.udp,
        &with_edns(
            query("alias.demo.meridian.test.", RecordType::A),
            Some(("203.0.113.0", 24)),
        ),
    )?;
    assert_eq!(r.answers[0].record_type(), RecordType::CNAME);
    assert_eq!(addrs(&r), ["192.0.2.3"]);
    assert_eq!(ecs_of(&r).map(|e| e.2), Some(24));
    // Query for the CNAME itself.
    let r = udp(
        s.udp,
        &query("alias.demo.meridian.test.", RecordType::CNAME),
    )?;
    assert_eq!(r.answers.len(), 1);
    // A loop terminates.
    let r = udp(s.udp, &query("loop1.demo.meridian.test.", RecordType::A))?;
    assert_eq!(r.answers.len(), 2);
    // Leaving our zones: the CNAME only, NOERROR.
    let r = udp(s.udp, &query("outside.demo.meridian.test.", RecordType::A))?;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(r.answers.len(), 1);
    Ok(())
}

#[test]
fn any_gets_a_minimal_answer() -> anyhow::Result<()> {
    let s = Server::demo()?;
    let r = udp(s.udp, &query("demo.meridian.test.", RecordType::ANY))?;
    assert_eq!(r.answers.len(), 1, "RFC 8482 minimal ANY");
    match &r.answers[0].data {
        RData::HINFO(h) => assert_eq!(&*h.cpu, b"RFC8482"),
        other => panic!("expected HINFO, got {other:?}"),
    }
    let r = udp(
        s.udp,
        &query("missing.demo.meridian.test.", RecordType::ANY),
    )?;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    Ok(())
}

#[test]
fn truncation_and_tcp_fallback() -> anyhow::Result<()> {
    let s = Server::demo()?;
    let big = "big.demo.meridian.test.";
    // No EDNS: 512 bytes, TC.
    let r = udp(s.udp, &query(big, RecordType::TXT))?;
    assert!(r.metadata.truncation, "TC over plain UDP");
    assert!(r.answers.is_empty());
    assert!(r.metadata.authoritative);
    // EDNS 4096 but our UDP ceiling is 1232: still TC, OPT present.
    let mut m = query(big, RecordType::TXT);
    let mut e = Edns::new();
    e.set_max_payload(4096);
    m.edns = Some(e);
    let r = udp(s.udp, &m)?;
    assert!(r.metadata.truncation);
    assert_eq!(r.edns.as_ref().map(|e| e.max_payload()), Some(1232));
    // TCP: everything.
    let r = tcp(s.tcp, &query(big, RecordType::TXT))?;
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 20);
    Ok(())
}

#[test]
fn larger_udp_ceiling_fits_with_edns() -> anyhow::Result<()> {
    let dir = tmpdir("payload");
    let cfg = demo_config(
        &dir,
        &[(
            "steered_ttl = 30",
            "steered_ttl = 7\nudp_max_payload = 4096",
        )],
        "",
    );
    let s = Server::run(&cfg)?;
    let mut m = query("big.demo.meridian.test.", RecordType::TXT);
    let mut e = Edns::new();
    e.set_max_payload(4096);
    m.edns = Some(e);
    let r = udp(s.udp, &m)?;
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 20);
    // The steered TTL is configurable.
    let r = udp(s.udp, &query("www.demo.meridian.test.", RecordType::A))?;
    assert_eq!(r.answers[0].ttl, 7);
    Ok(())
}

#[test]
fn edns_version_and_case_and_class() -> anyhow::Result<()> {
    let s = Server::demo()?;
    let mut m = query("www.demo.meridian.test.", RecordType::A);
    let mut e = Edns::new();
    e.set_version(1);
    m.edns = Some(e);
    let r = udp(s.udp, &m)?;
    // 16 is both BADVERS and BADSIG; hickory decodes it as the latter.
    assert_eq!(
        u16::from(r.metadata.response_code),
        u16::from(ResponseCode::BADVERS)
    );
    assert_eq!(r.edns.as_ref().map(|e| e.version()), Some(0));

    // Case of the query name is preserved in question and answer.
    let r = udp(s.udp, &query("WwW.DeMo.Meridian.TEST.", RecordType::A))?;
    assert_eq!(r.queries[0].name().to_string(), "WwW.DeMo.Meridian.TEST.");
    assert_eq!(r.answers[0].name.to_string(), "WwW.DeMo.Meridian.TEST.");

    // CHAOS class: refused.
    let mut m = query("www.demo.meridian.test.", RecordType::A);
    m.queries[0].set_query_class(DNSClass::CH);
    assert_eq!(
        udp(s.udp, &m)?.metadata.response_code,
        ResponseCode::Refused
    );
    // Zone transfers are refused.
    let r = tcp(s.tcp, &query("demo.meridian.test.", RecordType::AXFR))?;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    // Two questions: FORMERR.
    let mut m = query("www.demo.meridian.test.", RecordType::A);
    m.add_query(hickory_proto::op::Query::query(
        hickory_proto::rr::Name::from_ascii("static.demo.meridian.test.")?,
        RecordType::A,
    ));
    assert_eq!(
        udp(s.udp, &m)?.metadata.response_code,
        ResponseCode::FormErr
    );
    Ok(())
}

#[test]
fn admin_endpoints() -> anyhow::Result<()> {
    let s = Server::demo()?;
    assert_eq!(
        http("GET", s.admin(), "/healthz")?,
        (200, "ok\n".to_string())
    );
    udp(
        s.udp,
        &with_edns(
            query("www.demo.meridian.test.", RecordType::A),
            Some(("198.51.100.0", 24)),
        ),
    )?;
    let (st, m) = http("GET", s.admin(), "/metrics")?;
    assert_eq!(st, 200);
    assert!(m.contains("meridian_dns_queries_total{qtype=\"A\",rcode=\"NOERROR\",region=\"eu-west\",proto=\"udp\"} 1"), "{m}");
    assert!(
        m.contains("meridian_dns_ecs_queries_total{family=\"v4\",result=\"used\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("meridian_dns_query_duration_seconds_count"),
        "{m}"
    );
    let (st, body) = http("GET", s.admin(), "/regions")?;
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(v["regions"].as_array().map(Vec::len), Some(3));
    assert_eq!(http("GET", s.admin(), "/nope")?.0, 404);
    Ok(())
}
