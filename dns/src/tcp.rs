//! DNS over TCP (RFC 7766) with connection limits, as Knot's
//! `tcp-max-clients` and `tcp-idle-timeout`:
//! - at most `server.tcp_max_clients` connections at once, and at most
//!   `server.tcp_max_clients_per_ip` from one address: a connection over
//!   either cap is closed as soon as it is accepted;
//! - a connection that completes no message within `server.tcp_timeout_secs`
//!   (idle, or trickling a message in) is closed, and so is one whose
//!   response cannot be written within that time.
//!
//! Every refusal and idle close is counted in
//! `meridian_dns_tcp_closed_total{reason}`. hickory's `Server` has no
//! connection cap (it takes the `TcpListener` and accepts everything), so
//! this module owns the TCP side: it frames messages and hands queries to
//! the same [`DnsHandler`] the UDP side uses, and zone transfers to
//! [`crate::transfer`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hickory_server::net::NetError;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::debug;

use crate::handler::{DnsHandler, Shared};
use crate::metrics::ReasonLabels;

/// Limits read from the serving configuration at every accept, so a
/// reload changes them for new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most connections at once.
    pub max_clients: usize,
    /// Most connections at once from one address.
    pub per_ip: usize,
    /// Idle (and write) timeout.
    pub idle: Duration,
}

impl Limits {
    fn of(shared: &Shared) -> Self {
        let s = &shared.runtime.load().model.config.server;
        Self {
            max_clients: s.tcp_max_clients,
            per_ip: s.tcp_max_clients_per_ip,
            idle: Duration::from_secs(s.tcp_timeout_secs.max(1)),
        }
    }
}

/// Open connections, in total and per client address.
#[derive(Debug, Default)]
pub struct Table {
    inner: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `tcp_max_clients` reached.
    MaxClients,
    /// `tcp_max_clients_per_ip` reached for this address.
    PerClient,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Self::MaxClients => "max_clients",
            Self::PerClient => "per_client",
        }
    }
}

/// A slot in the [`Table`], released on drop.
#[derive(Debug)]
pub struct Slot {
    table: Arc<Table>,
    ip: IpAddr,
}

impl Table {
    /// Admit a connection from `ip` under `limits`.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, limits: Limits) -> Result<Slot, Refusal> {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (total, per) = &mut *g;
        if *total >= limits.max_clients {
            return Err(Refusal::MaxClients);
        }
        let n = per.entry(ip).or_insert(0);
        if *n >= limits.per_ip {
            return Err(Refusal::PerClient);
        }
        *n += 1;
        *total += 1;
        Ok(Slot {
            table: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = self
            .table
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (total, per) = &mut *g;
        *total = total.saturating_sub(1);
        if let Some(n) = per.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.ip);
            }
        }
    }
}

/// Accept on `listener` (sharing `table`, and so the limits, with the
/// other listeners) until `shutdown` flips to true; then stop
/// accepting, give open connections 2 s to finish the message at hand, and
/// close the rest.
pub async fn serve(
    listener: TcpListener,
    handler: DnsHandler,
    table: Arc<Table>,
    mut shutdown: watch::Receiver<bool>,
) {
    let shared = handler.shared.clone();
    let mut conns = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    debug!(error = %e, "tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        while conns.try_join_next().is_some() {}
        let limits = Limits::of(&shared);
        let ops = &shared.metrics.ops;
        let slot = match table.admit(peer.ip(), limits) {
            Ok(s) => s,
            Err(r) => {
                ops.tcp_closed
                    .get_or_create(&ReasonLabels { reason: r.label() })
                    .inc();
                debug!(%peer, reason = r.label(), "tcp connection refused");
                drop(stream);
                continue;
            }
        };
        ops.tcp_open
            .set(i64::try_from(table.open()).unwrap_or(i64::MAX));
        let handler = handler.clone();
        let stop = shutdown.clone();
        let table = table.clone();
        conns.spawn(async move {
            let shared = handler.shared.clone();
            connection(stream, peer, handler, limits, stop).await;
            drop(slot);
            shared
                .metrics
                .ops
                .tcp_open
                .set(i64::try_from(table.open()).unwrap_or(i64::MAX));
        });
    }
    drop(listener);
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(2), drain)
        .await
        .is_err()
    {
        conns.abort_all();
    }
}

/// Read one length-prefixed message.
async fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Write one message with its length prefix, within `idle`.
pub async fn write_frame(s: &mut TcpStream, msg: &[u8], idle: Duration) -> std::io::Result<()> {
    let len = u16::try_from(msg.len())
        .map_err(|_| std::io::Error::other("DNS message over 65535 bytes"))?;
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    tokio::time::timeout(idle, s.write_all(&framed))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out"))?
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    handler: DnsHandler,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let ops = &handler.shared.metrics.ops;
    loop {
        let raw = tokio::select! {
            r = tokio::time::timeout(limits.idle, read_frame(&mut stream)) => match r {
                Ok(Ok(raw)) => raw,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "tcp connection closed");
                    return;
                }
                Err(_) => {
                    ops.tcp_closed.get_or_create(&ReasonLabels { reason: "idle" }).inc();
                    debug!(%peer, "tcp connection idle: closed");
                    return;
                }
            },
            _ = stop.changed() => return,
        };
        if let Err(e) = message(&mut stream, peer, &handler, raw, limits.idle).await {
            debug!(%peer, error = %e, "tcp write failed");
            return;
        }
    }
}

/// Answer one message read from a TCP connection.
async fn message(
    stream: &mut TcpStream,
    peer: SocketAddr,
    handler: &DnsHandler,
    raw: Vec<u8>,
    idle: Duration,
) -> std::io::Result<()> {
    let request = match Request::from_bytes(raw.clone(), peer, Protocol::Tcp) {
        Ok(r) => r,
        Err(e) => {
            // The header is readable: FORMERR (as hickory's server does);
            // otherwise nothing can be answered.
            let mut d = BinDecoder::new(&raw);
            return match Header::read(&mut d) {
                Ok(h) => {
                    debug!(%peer, error = %e, "undecodable query: FORMERR");
                    write_frame(stream, &formerr(&h.metadata), idle).await
                }
                Err(_) => Ok(()),
            };
        }
    };
    if request.metadata.message_type == hickory_proto::op::MessageType::Response {
        return Ok(());
    }
    if crate::transfer::is_transfer(&request) {
        return crate::transfer::serve_tcp(&handler.shared, &request, stream, idle).await;
    }
    let collect = Collect::default();
    handler
        .handle_request::<_, TokioTime>(&request, collect.clone())
        .await;
    let out = std::mem::take(
        &mut *collect
            .out
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    for m in out {
        write_frame(stream, &m, idle).await?;
    }
    Ok(())
}

/// A header-only FORMERR answer to `req`.
pub fn formerr(req: &Metadata) -> Vec<u8> {
    let mut md = Metadata::response_from_request(req);
    md.response_code = ResponseCode::FormErr;
    let h = Header {
        metadata: md,
        counts: HeaderCounts::default(),
    };
    let mut buf = Vec::with_capacity(12);
    let mut enc = BinEncoder::new(&mut buf);
    if h.emit(&mut enc).is_err() {
        return Vec::new();
    }
    buf
}

/// A [`ResponseHandler`] that encodes responses into a list.
#[derive(Clone, Default)]
struct Collect {
    out: Arc<Mutex<Vec<Vec<u8>>>>,
}

#[async_trait::async_trait]
impl ResponseHandler for Collect {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let mut buf = Vec::with_capacity(512);
        let mut enc = BinEncoder::new(&mut buf);
        enc.set_max_size(u16::MAX);
        let info = response
            .destructive_emit(&mut enc)
            .map_err(|e| NetError::from(e.to_string()))?;
        self.out
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(buf);
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_total_and_per_client() {
        let t = Arc::new(Table::default());
        let l = Limits {
            max_clients: 3,
            per_ip: 2,
            idle: Duration::from_secs(1),
        };
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        let s1 = t.admit(a, l).expect("first");
        let _s2 = t.admit(a, l).expect("second");
        assert_eq!(t.admit(a, l).err(), Some(Refusal::PerClient));
        let _s3 = t.admit(b, l).expect("other client");
        assert_eq!(t.admit(b, l).err(), Some(Refusal::MaxClients));
        drop(s1);
        assert_eq!(t.open(), 2);
        let _s4 = t.admit(a, l).expect("a slot was freed");
    }
}
