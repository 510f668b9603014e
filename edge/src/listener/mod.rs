//! Listening sockets: TCP with SO_REUSEPORT (so a new process can bind
//! while the old one drains), IPv4 and IPv6, and TLS via [`tls`].

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
