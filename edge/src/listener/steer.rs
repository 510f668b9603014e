//! QUIC packets steered between the old and the new process of a socket
//! handover.
//!
//! A handover gives the new process the *same* UDP sockets, so from then on
//! both processes read one kernel queue, and a datagram goes to whichever
//! reads first. For TCP that is harmless (each accepted connection is its
//! own socket), but a QUIC connection lives on the shared socket: without
//! steering, the packets of a connection the old process still drains
//! (handshakes in flight, responses being sent) land in the new process,
//! which knows no such connection and drops them, and the connection stalls
//! until it times out. Envoy's hot restart has the same problem and solves it
//! the same way: the new process forwards what is not its own.
//!
//! - **Connection IDs carry a process tag.** Every server connection ID this
//!   edge issues is [`CID_LEN`] bytes whose first byte is the process's tag
//!   ([`TaggedCids`]); the new process picks a tag the old one does not use
//!   (the old one says its tag in the handover greeting).
//! - **The new process reads the socket alone.** Once it serves, it gives the
//!   old process one end of a unix datagram pair per UDP socket; the old
//!   process stops reading its UDP sockets and reads that pair instead
//!   ([`SteeredSocket::follow_successor`]). It still sends on the UDP socket.
//! - **The new process forwards the old one's packets.** A Handshake or
//!   1-RTT packet whose destination connection ID carries the old tag goes,
//!   with its source address, to the pair ([`SteeredSocket`]). Initial and
//!   0-RTT packets carry a connection ID the client chose, so they stay: a
//!   handshake the old process had started completes on its Handshake
//!   packets. When the old process exits, sends fail and forwarding stops.
//!
//! Only the previous process's packets are forwarded: after two handovers
//! in quick succession, connections of the first process that are still
//! draining when the third takes over lose their packets to it.
//!
//! The tag is the same for every connection of a process, so it tells an
//! observer which process of one machine issued an ID, not which connection
//! (the other 7 bytes are random), as QUIC-LB's server IDs do.

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, ConnectionId, ConnectionIdGenerator, UdpPoller};

/// The length of every server connection ID (the tag and 7 random bytes).
pub const CID_LEN: usize = 8;

static TAG: OnceLock<u8> = OnceLock::new();

fn random_bytes(buf: &mut [u8]) {
    // rustls's provider is ring's SystemRandom (getrandom); it fails only
    // when the kernel has no entropy source at all.
    if rustls::crypto::ring::default_provider()
        .secure_random
        .fill(buf)
        .is_err()
    {
        // Never reached on Linux; keep IDs distinct all the same.
        static N: AtomicU64 = AtomicU64::new(1);
        let n = N.fetch_add(1, Ordering::Relaxed).to_le_bytes();
        for (b, x) in buf.iter_mut().zip(n.iter().cycle()) {
            *b = *x;
        }
    }
}

/// Picks this process's tag once: random, and not `avoid` (the tag of the
/// process this one takes over from). Later calls return the same tag.
pub fn choose_tag(avoid: Option<u8>) -> u8 {
    *TAG.get_or_init(|| {
        let mut b = [0u8; 1];
        for _ in 0..64 {
            random_bytes(&mut b);
            if Some(b[0]) != avoid {
                break;
            }
        }
        if Some(b[0]) == avoid {
            b[0] = b[0].wrapping_add(1);
        }
        b[0]
    })
}

/// This process's tag (chosen at random on first use).
pub fn process_tag() -> u8 {
    choose_tag(None)
}

/// Server connection IDs: the process tag, then 7 random bytes.
pub struct TaggedCids {
    tag: u8,
}

impl TaggedCids {
    pub fn new(tag: u8) -> Self {
        TaggedCids { tag }
    }
}

impl ConnectionIdGenerator for TaggedCids {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut b = [0u8; CID_LEN];
        b[0] = self.tag;
        random_bytes(&mut b[1..]);
        ConnectionId::new(&b)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The endpoint config of every QUIC endpoint: tagged connection IDs.
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut c = quinn::EndpointConfig::default();
    let tag = process_tag();
    c.cid_generator(move || Box::new(TaggedCids::new(tag)));
    c
}

/// The tag of the server connection ID a packet is addressed to, when the
/// packet is one a running connection of that server needs and whose
/// connection ID the server chose: a short-header (1-RTT) packet, or a
/// QUIC v1 Handshake packet. `None` for Initial and 0-RTT packets (their
/// connection ID is the client's choice), other versions, and garbage.
pub fn server_tag(pkt: &[u8]) -> Option<u8> {
    let first = *pkt.first()?;
    if first & 0x80 == 0 {
        // Short header, then the connection ID. The fixed bit (0x40) is not
        // checked: peers may grease it (RFC 9287), and quinn does.
        if pkt.len() < 1 + CID_LEN {
            return None;
        }
        return Some(pkt[1]);
    }
    let version = u32::from_be_bytes(pkt.get(1..5)?.try_into().ok()?);
    // Long header, v1, type Handshake (0b10).
    if version != 1 || (first >> 4) & 0b11 != 0b10 {
        return None;
    }
    if *pkt.get(5)? as usize != CID_LEN {
        return None;
    }
    pkt.get(6).copied()
}

/// A forwarded datagram's header: source address, ECN, destination IP.
const HDR: usize = 37;

fn encode_header(meta: &RecvMeta, out: &mut [u8; HDR]) {
    *out = [0; HDR];
    match meta.addr.ip() {
        IpAddr::V4(a) => {
            out[0] = 4;
            out[1..5].copy_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out[0] = 6;
            out[1..17].copy_from_slice(&a.octets());
        }
    }
    out[17..19].copy_from_slice(&meta.addr.port().to_be_bytes());
    out[19] = meta.ecn.map_or(0, |e| e as u8);
    match meta.dst_ip {
        Some(IpAddr::V4(a)) => {
            out[20] = 4;
            out[21..25].copy_from_slice(&a.octets());
        }
        Some(IpAddr::V6(a)) => {
            out[20] = 6;
            out[21..37].copy_from_slice(&a.octets());
        }
        None => {}
    }
}

fn decode_header(h: &[u8]) -> Option<(SocketAddr, Option<EcnCodepoint>, Option<IpAddr>)> {
    let h: &[u8; HDR] = h.get(..HDR)?.try_into().ok()?;
    let ip = |fam: u8, b: &[u8]| -> Option<IpAddr> {
        match fam {
            4 => Some(IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(&b[..4]).ok()?,
            ))),
            6 => Some(IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(&b[..16]).ok()?,
            ))),
            _ => None,
        }
    };
    let src = ip(h[0], &h[1..17])?;
    let port = u16::from_be_bytes([h[17], h[18]]);
    let ecn = EcnCodepoint::from_bits(h[19]);
    let dst = if h[20] == 0 {
        None
    } else {
        Some(ip(h[20], &h[21..37])?)
    };
    Some((SocketAddr::new(src, port), ecn, dst))
}

/// The new process's side: where the old process's packets go.
pub struct Forward {
    sock: UnixDatagram,
    /// The old process's tag.
    tag: u8,
}

impl Forward {
    /// `sock` is this process's end of the pair; `tag` the old process's.
    pub fn new(sock: UnixDatagram, tag: u8) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        Ok(Forward { sock, tag })
    }
}

impl fmt::Debug for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forward").field("tag", &self.tag).finish()
    }
}

/// A QUIC endpoint's UDP socket, steered across a handover (see the
/// module's documentation). With no handover it adds one branch per
/// received batch to the plain socket.
pub struct SteeredSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    local: SocketAddr,
    /// The new process: the old one's packets go here while it lives.
    forward: Option<Forward>,
    forwarding: AtomicBool,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    /// The old process, after the handover: packets come from here only.
    successor: OnceLock<tokio::net::UnixDatagram>,
    /// The endpoint driver's waker, to switch it over to `successor`.
    recv_waker: Mutex<Option<Waker>>,
}

impl fmt::Debug for SteeredSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SteeredSocket")
            .field("local", &self.local)
            .field("forward", &self.forward)
            .field("follows_successor", &self.successor.get().is_some())
            .finish()
    }
}

impl SteeredSocket {
    /// Wraps `sock` (a tokio-registered quinn socket) with the handover's
    /// forwarding, if this process took it over.
    pub fn new(sock: std::net::UdpSocket, forward: Option<Forward>) -> io::Result<Arc<Self>> {
        use quinn::Runtime;
        let local = sock.local_addr()?;
        let inner = quinn::TokioRuntime.wrap_udp_socket(sock)?;
        let forwarding = AtomicBool::new(forward.is_some());
        Ok(Arc::new(SteeredSocket {
            inner,
            local,
            forward,
            forwarding,
            forwarded: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            successor: OnceLock::new(),
            recv_waker: Mutex::new(None),
        }))
    }

    /// The old process's side: from now on, read only what the new process
    /// forwards on `fd` (its end of the pair). Sends still use the socket.
    pub fn follow_successor(&self, fd: OwnedFd) -> io::Result<()> {
        let s = UnixDatagram::from(fd);
        s.set_nonblocking(true)?;
        let s = tokio::net::UnixDatagram::from_std(s)?;
        if self.successor.set(s).is_err() {
            return Err(io::Error::other("already following a successor"));
        }
        if let Some(w) = self.recv_waker.lock().ok().and_then(|mut w| w.take()) {
            w.wake();
        }
        Ok(())
    }

    /// Packets forwarded to the old process, and those dropped because its
    /// queue was full.
    pub fn forwarded(&self) -> (u64, u64) {
        (
            self.forwarded.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }

    fn send_to_old(&self, f: &Forward, meta: &RecvMeta, pkt: &[u8]) {
        let mut hdr = [0u8; HDR];
        encode_header(meta, &mut hdr);
        let iov = [IoSlice::new(&hdr), IoSlice::new(pkt)];
        let r = nix::sys::socket::sendmsg::<()>(
            f.sock.as_raw_fd(),
            &iov,
            &[],
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            None,
        );
        match r {
            Ok(_) => {
                self.forwarded.fetch_add(1, Ordering::Relaxed);
            }
            Err(nix::errno::Errno::EAGAIN) => {
                // The old process's queue is full: a lost packet, as on
                // the wire; QUIC recovers.
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                // ECONNREFUSED: the old process has exited.
                self.forwarding.store(false, Ordering::Relaxed);
                tracing::info!(
                    local = %self.local,
                    forwarded = self.forwarded.load(Ordering::Relaxed),
                    dropped = self.dropped.load(Ordering::Relaxed),
                    reason = %e,
                    "QUIC: the old process is gone; no more packets forwarded to it"
                );
            }
        }
    }

    /// Removes the old process's packets from a received batch (forwarding
    /// them), keeping the rest in place; a fully forwarded entry gets
    /// length 0, which quinn skips.
    fn steer(&self, f: &Forward, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta], n: usize) {
        for (buf, m) in bufs.iter_mut().zip(meta.iter_mut()).take(n) {
            let stride = m.stride.max(1);
            let len = m.len.min(buf.len());
            let (mut off, mut kept) = (0, 0);
            while off < len {
                let end = (off + stride).min(len);
                if self.forwarding.load(Ordering::Relaxed)
                    && server_tag(&buf[off..end]) == Some(f.tag)
                {
                    self.send_to_old(f, m, &buf[off..end]);
                } else {
                    if kept != off {
                        buf.copy_within(off..end, kept);
                    }
                    kept += end - off;
                }
                off = end;
            }
            m.len = kept;
        }
    }

    fn poll_successor(
        &self,
        s: &tokio::net::UnixDatagram,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let buf = &mut bufs[n];
            let got = if n == 0 {
                let mut rb = tokio::io::ReadBuf::new(buf);
                match s.poll_recv(cx, &mut rb) {
                    Poll::Ready(Ok(())) => rb.filled().len(),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            } else {
                match s.try_recv(buf) {
                    Ok(k) => k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            };
            let Some((addr, ecn, dst_ip)) = decode_header(&buf[..got]) else {
                continue;
            };
            buf.copy_within(HDR..got, 0);
            let len = got - HDR;
            meta[n] = RecvMeta {
                addr,
                len,
                stride: len,
                ecn,
                dst_ip,
            };
            n += 1;
        }
        if n == 0 {
            // Only malformed datagrams: look again later.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncUdpSocket for SteeredSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        if let Some(s) = self.successor.get() {
            return self.poll_successor(s, cx, bufs, meta);
        }
        match self.inner.poll_recv(cx, bufs, meta) {
            Poll::Ready(Ok(n)) => {
                if let Some(f) = &self.forward {
                    self.steer(f, bufs, meta, n);
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => {
                if let Ok(mut w) = self.recv_waker.lock() {
                    match &*w {
                        Some(old) if old.will_wake(cx.waker()) => {}
                        _ => *w = Some(cx.waker().clone()),
                    }
                }
                // A successor may have come between the check and now.
                if self.successor.get().is_some() {
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            }
            other => other,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tag_is_read_from_1rtt_and_handshake_packets_only() {
        // 1-RTT: 0b01xxxxxx, then the connection ID.
        let mut short = vec![0x41, 0xab];
        short.extend([0u8; 7]);
        short.extend([9u8; 20]);
        assert_eq!(server_tag(&short), Some(0xab));
        // Too short to hold a connection ID; the fixed bit unset.
        assert_eq!(server_tag(&[0x41, 0xab, 1]), None);
        // The fixed bit greased (RFC 9287), as quinn's clients do.
        assert_eq!(
            server_tag(&[0x05, 0xab, 0, 0, 0, 0, 0, 0, 0, 0]),
            Some(0xab)
        );
        let long = |ty: u8, version: u32, dcid: &[u8]| {
            let mut p = vec![0xc0 | (ty << 4)];
            p.extend(version.to_be_bytes());
            p.push(dcid.len() as u8);
            p.extend(dcid);
            p.extend([0u8; 30]);
            p
        };
        let cid = [0xab, 1, 2, 3, 4, 5, 6, 7];
        assert_eq!(server_tag(&long(2, 1, &cid)), Some(0xab), "Handshake");
        assert_eq!(server_tag(&long(0, 1, &cid)), None, "Initial");
        assert_eq!(server_tag(&long(1, 1, &cid)), None, "0-RTT");
        assert_eq!(server_tag(&long(2, 0x6b33_43cf, &cid)), None, "QUIC v2");
        assert_eq!(server_tag(&long(2, 1, &cid[..5])), None, "another length");
        assert_eq!(server_tag(&[]), None);
        assert_eq!(server_tag(&[0xe0, 0, 0]), None);
    }

    #[test]
    fn tagged_ids_carry_the_tag_and_differ() {
        let mut g = TaggedCids::new(0x5a);
        let a = g.generate_cid();
        let b = g.generate_cid();
        assert_eq!(a.len(), CID_LEN);
        assert_eq!(a[0], 0x5a);
        assert_ne!(a, b);
    }

    #[test]
    fn the_header_round_trips() {
        for (src, dst) in [
            ("127.0.0.1:4433", None),
            ("[::1]:443", Some("::1")),
            ("10.1.2.3:65535", Some("10.0.0.1")),
        ] {
            let meta = RecvMeta {
                addr: src.parse().expect("test setup"),
                len: 100,
                stride: 100,
                ecn: Some(EcnCodepoint::Ce),
                dst_ip: dst.map(|d| d.parse().expect("test setup")),
            };
            let mut h = [0u8; HDR];
            encode_header(&meta, &mut h);
            let (addr, ecn, dst_ip) = decode_header(&h).expect("test setup");
            assert_eq!(addr, meta.addr);
            assert_eq!(ecn, meta.ecn);
            assert_eq!(dst_ip, meta.dst_ip);
        }
        assert!(decode_header(&[0u8; 10]).is_none());
        assert!(decode_header(&[9u8; HDR]).is_none());
    }

    /// The new process's socket forwards the old tag's packets to the pair,
    /// with their source, and keeps the rest; the old process's socket,
    /// following the successor, reads them from the pair.
    #[tokio::test]
    async fn packets_of_the_old_tag_cross_the_pair_and_the_rest_stay() {
        let new_udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("test setup");
        let old_udp = new_udp.try_clone().expect("test setup");
        let addr = new_udp.local_addr().expect("test setup");
        let (mine, theirs) = UnixDatagram::pair().expect("test setup");
        let new = SteeredSocket::new(new_udp, Some(Forward::new(mine, 0x11).expect("test setup")))
            .expect("test setup");
        let old = SteeredSocket::new(old_udp, None).expect("test setup");
        old.follow_successor(OwnedFd::from(theirs))
            .expect("test setup");

        let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("test setup");
        let mut old_pkt = vec![0x41, 0x11];
        old_pkt.extend([7u8; 40]);
        let mut new_pkt = vec![0x41, 0x22];
        new_pkt.extend([8u8; 40]);
        client.send_to(&old_pkt, addr).expect("test setup");
        client.send_to(&new_pkt, addr).expect("test setup");

        let recv = |s: Arc<SteeredSocket>| async move {
            let mut got = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while got.is_empty() && tokio::time::Instant::now() < deadline {
                let mut storage = vec![0u8; 65536];
                let mut meta = [RecvMeta::default(); 1];
                let n = {
                    let mut bufs = [IoSliceMut::new(&mut storage)];
                    tokio::time::timeout(
                        Duration::from_millis(200),
                        std::future::poll_fn(|cx| s.poll_recv(cx, &mut bufs, &mut meta)),
                    )
                    .await
                };
                if let Ok(Ok(n)) = n {
                    for m in &meta[..n] {
                        if m.len > 0 {
                            got.push((m.addr, storage[..m.len].to_vec()));
                        }
                    }
                }
            }
            got
        };
        // The new process reads the socket: its own packet stays.
        let mut kept = Vec::new();
        for _ in 0..2 {
            kept.extend(recv(new.clone()).await);
            if kept.len() == 1 {
                break;
            }
        }
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].1, new_pkt);
        assert_eq!(kept[0].0, client.local_addr().expect("test setup"));
        assert_eq!(new.forwarded(), (1, 0));
        // The old process gets its packet from the pair, source intact.
        let got = recv(old.clone()).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, old_pkt);
        assert_eq!(got[0].0, client.local_addr().expect("test setup"));
    }
}
