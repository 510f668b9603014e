//! NOTIFY (RFC 1996): when a zone's SOA serial changes (at start, and on
//! every reload that changes it), each secondary listed in the zone's
//! `[[zones.notify]]` gets a NOTIFY over UDP, TSIG-signed if a key is named,
//! retried up to 5 times (waiting 1, 2, 4, 8 and 16 s for the answer).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::metrics::{Metrics, NotifyLabels};
use crate::model::Model;
use crate::tsig::{self, Key, Position};

/// Attempts per secondary and change.
pub const ATTEMPTS: u32 = 5;

/// Tracks the serial each zone was last announced with.
#[derive(Debug, Default)]
pub struct Notifier {
    serials: HashMap<LowerName, u32>,
    tasks: JoinSet<()>,
}

impl Notifier {
    /// Announce the zones of `model` whose serial differs from the last
    /// announced one (every zone, the first time).
    pub fn zones_loaded(&mut self, model: &Model, metrics: &Arc<Metrics>) {
        while self.tasks.try_join_next().is_some() {}
        for zone in model.zones.iter() {
            let RData::SOA(soa) = &zone.soa().data else {
                continue;
            };
            let origin = zone.origin().clone();
            if self.serials.insert(origin.clone(), soa.serial) == Some(soa.serial) {
                continue;
            }
            let Some(acl) = model.transfer.zones.get(&origin) else {
                continue;
            };
            for (target, key) in &acl.notify {
                let key = key
                    .as_ref()
                    .and_then(|k| model.transfer.keyring.get(k).cloned());
                let zone_name = Name::from(&origin);
                let soa = zone.soa().clone();
                let target = *target;
                let metrics = metrics.clone();
                self.tasks
                    .spawn(async move { notify(zone_name, soa, target, key, &metrics).await });
            }
        }
    }
}

fn random_id() -> u16 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 2];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return 0x4d44;
    }
    u16::from_be_bytes(b)
}

/// The NOTIFY message for a zone (the SOA in the answer section, as RFC
/// 1996 §3.7 allows); with a key, signed. Returns the bytes and the MAC.
pub fn message(
    zone: &Name,
    soa: &Record,
    key: Option<&Key>,
    id: u16,
) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Notify);
    m.metadata.authoritative = true;
    m.add_query(Query::query(zone.clone(), RecordType::SOA));
    m.answers.push(soa.clone());
    let mut bytes = m.to_vec().ok()?;
    let mac = match key {
        Some(k) => tsig::sign(&mut bytes, k, Position::Request, tsig::now(), 0),
        None => Vec::new(),
    };
    Some((bytes, mac))
}

async fn notify(zone: Name, soa: Record, target: SocketAddr, key: Option<Key>, metrics: &Metrics) {
    let count = |result: &'static str| {
        metrics
            .ops
            .notify
            .get_or_create(&NotifyLabels { result })
            .inc();
    };
    // The source: loopback for a loopback secondary, else any address.
    let bind: IpAddr = match (target.ip().is_loopback(), target.is_ipv4()) {
        (true, _) => target.ip(),
        (false, true) => Ipv4Addr::UNSPECIFIED.into(),
        (false, false) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let sock = match UdpSocket::bind(SocketAddr::new(bind, 0)).await {
        Ok(s) => s,
        Err(e) => {
            warn!(%target, error = %e, "NOTIFY: cannot bind a socket");
            count("failed");
            return;
        }
    };
    for attempt in 0..ATTEMPTS {
        let id = random_id();
        let Some((bytes, mac)) = message(&zone, &soa, key.as_ref(), id) else {
            count("failed");
            return;
        };
        if let Err(e) = sock.send_to(&bytes, target).await {
            warn!(%target, error = %e, "NOTIFY: send failed");
        }
        let wait = Duration::from_secs(1 << attempt);
        let mut buf = vec![0u8; 4096];
        let got = tokio::time::timeout(wait, async {
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return None;
                };
                if from != target {
                    continue;
                }
                let Ok(r) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                if r.metadata.id != id
                    || r.metadata.message_type != MessageType::Response
                    || r.metadata.op_code != OpCode::Notify
                {
                    continue;
                }
                if let Some(k) = &key
                    && !tsig::verify_response(k, &buf[..n], &mac)
                {
                    warn!(%target, "NOTIFY: answer with a bad or missing TSIG ignored");
                    continue;
                }
                return Some(r.metadata.response_code);
            }
        })
        .await;
        match got {
            Ok(Some(ResponseCode::NoError)) => {
                count("acked");
                info!(%zone, %target, "NOTIFY acknowledged");
                return;
            }
            Ok(Some(rcode)) => {
                warn!(%zone, %target, %rcode, "NOTIFY refused by the secondary");
                count("failed");
                return;
            }
            Ok(None) | Err(_) => {
                if attempt + 1 < ATTEMPTS {
                    count("retry");
                }
            }
        }
    }
    count("failed");
    warn!(%zone, %target, "NOTIFY: no answer after {ATTEMPTS} attempts");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_message_shape() {
        let zone = Name::from_ascii("example.test.").expect("n");
        let soa = Record::from_rdata(
            zone.clone(),
            60,
            RData::SOA(hickory_proto::rr::rdata::SOA::new(
                Name::from_ascii("ns.example.test.").expect("n"),
                Name::from_ascii("h.example.test.").expect("n"),
                7,
                1,
                1,
                1,
                1,
            )),
        );
        let key = Key::new("k", "hmac-sha256", b"secretsecretsecret").expect("key");
        let (bytes, mac) = message(&zone, &soa, Some(&key), 99).expect("message");
        assert!(!mac.is_empty());
        let m = Message::from_vec(&bytes).expect("decodes");
        assert_eq!(m.metadata.op_code, OpCode::Notify);
        assert!(m.metadata.authoritative);
        assert_eq!(m.queries[0].query_type(), RecordType::SOA);
        let s = tsig::find(&bytes).expect("signed");
        let mut ring = tsig::Keyring::default();
        ring.insert(key);
        assert!(tsig::verify_request(&ring, &bytes, &s, tsig::now()).is_ok());
    }
}
