//! Listening sockets: TCP with SO_REUSEPORT (so a new process can bind
//! while the old one drains), IPv4 and IPv6, and TLS via [`tls`].

pub mod handover;
pub mod steer;
pub mod tls;

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Binds a TCP listener. IPv6 sockets are v6-only, so "[::]" and "0.0.0.0"
/// can be listed side by side.
pub fn bind_tcp(
    addr: SocketAddr,
    reuse_port: bool,
    backlog: u32,
) -> std::io::Result<tokio::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// Listening sockets the process was started with: systemd socket
/// activation (`sd_listen_fds(3)`: `LISTEN_PID`, `LISTEN_FDS`, and
/// `LISTEN_FDNAMES` for the log). The edge takes a socket whose address a
/// listener (TCP; its HTTP/3 UDP sockets) or the admin listener names
/// instead of binding one; a socket nobody takes stays open and unused.
#[derive(Debug, Default)]
pub struct Inherited {
    tcp: Vec<(SocketAddr, std::net::TcpListener, String)>,
    /// With, for a socket handed over by a running edge that steers QUIC
    /// packets, where the running edge's packets go ([`steer`]).
    udp: Vec<(
        SocketAddr,
        std::net::UdpSocket,
        String,
        Option<steer::Forward>,
    )>,
}

/// The first file descriptor systemd passes (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: i32 = 3;

impl Inherited {
    /// Takes the sockets passed by systemd when `LISTEN_PID` is this
    /// process. Only the first call takes them (a process owns descriptors
    /// 3 to 3+`LISTEN_FDS` once); later calls return none. The variables
    /// stay set: a child process has another pid, so it never takes them.
    pub fn from_env() -> std::io::Result<Inherited> {
        static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        let pid = std::env::var("LISTEN_PID").ok();
        let fds = std::env::var("LISTEN_FDS").ok();
        let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
        let (Some(pid), Some(fds)) = (pid, fds) else {
            return Ok(Inherited::default());
        };
        if TAKEN.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return Ok(Inherited::default());
        }
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return Ok(Inherited::default());
        }
        let n: i32 = fds.parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("LISTEN_FDS={fds:?} is not a number"),
            )
        })?;
        let names: Vec<&str> = names.split(':').collect();
        let mut out = Inherited::default();
        for i in 0..n.clamp(0, 1024) {
            let fd = LISTEN_FDS_START + i;
            let name = names.get(i as usize).copied().unwrap_or("").to_string();
            let s = adopt(fd);
            out.add(s, name, fd)?;
        }
        Ok(out)
    }

    /// The sockets a running edge handed over (see [`handover`]). When the
    /// running edge steers QUIC packets (`old_tag`: its connection-ID tag),
    /// each UDP socket gets a unix datagram pair: this process keeps one end
    /// to forward the running edge's packets, and returns the other with the
    /// index of the socket in `fds`, to give back when it serves.
    pub fn from_fds(
        fds: Vec<std::os::fd::OwnedFd>,
        old_tag: Option<u8>,
    ) -> std::io::Result<(Inherited, Vec<(usize, std::os::fd::OwnedFd)>)> {
        let mut out = Inherited::default();
        let mut give_back = Vec::new();
        for (i, fd) in fds.into_iter().enumerate() {
            let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
            let udp_before = out.udp.len();
            out.add(Socket::from(fd), format!("handover#{i}"), raw)?;
            if let Some(tag) = old_tag
                && out.udp.len() > udp_before
                && let Some(last) = out.udp.last_mut()
            {
                let (mine, theirs) = std::os::unix::net::UnixDatagram::pair()?;
                last.3 = Some(steer::Forward::new(mine, tag)?);
                give_back.push((i, std::os::fd::OwnedFd::from(theirs)));
            }
        }
        Ok((out, give_back))
    }

    fn add(&mut self, s: Socket, name: String, fd: i32) -> std::io::Result<()> {
        s.set_cloexec(true)?;
        s.set_nonblocking(true)?;
        let addr = s.local_addr()?.as_socket().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("inherited descriptor {fd} ({name}) is not an IP socket"),
            )
        })?;
        match s.r#type()? {
            Type::STREAM if s.is_listener()? => self.tcp.push((addr, s.into(), name)),
            Type::DGRAM => self.udp.push((addr, s.into(), name, None)),
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "inherited descriptor {fd} ({name}, {addr}) is neither a listening TCP socket nor a UDP socket"
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.tcp.is_empty() && self.udp.is_empty()
    }

    /// The inherited listening TCP socket bound to `addr`, if any.
    pub fn take_tcp(&mut self, addr: SocketAddr) -> Option<tokio::net::TcpListener> {
        let i = self.tcp.iter().position(|(a, _, _)| *a == addr)?;
        let (_, l, name) = self.tcp.swap_remove(i);
        tracing::info!(%addr, name, "TCP listener inherited");
        tokio::net::TcpListener::from_std(l).ok()
    }

    /// Every inherited UDP socket bound to `addr`, each with where the
    /// running edge's QUIC packets go, if it steers them.
    pub fn take_udp(
        &mut self,
        addr: SocketAddr,
    ) -> Vec<(std::net::UdpSocket, Option<steer::Forward>)> {
        let mut out = Vec::new();
        while let Some(i) = self.udp.iter().position(|(a, ..)| *a == addr) {
            let (_, s, name, fwd) = self.udp.swap_remove(i);
            tracing::info!(%addr, name, steered = fwd.is_some(), "UDP (QUIC) socket inherited");
            out.push((s, fwd));
        }
        out
    }

    /// What is left untaken, for the log.
    pub fn leftover(&self) -> Vec<String> {
        self.tcp
            .iter()
            .map(|(a, _, n)| format!("tcp {a} {n}"))
            .chain(self.udp.iter().map(|(a, _, n, _)| format!("udp {a} {n}")))
            .collect()
    }
}

/// Owns an inherited descriptor.
#[allow(unsafe_code)]
fn adopt(fd: i32) -> Socket {
    // SAFETY: LISTEN_PID named this process, so systemd (or the parent)
    // passed descriptors 3..3+LISTEN_FDS for it to own; `from_env` adopts
    // each once (its TAKEN flag), and nothing else in the process uses them.
    unsafe { <Socket as std::os::fd::FromRawFd>::from_raw_fd(fd) }
}
