//! What the request path knows of the client side of a request: the
//! protocol it arrived on and the connection it came over.

use std::net::SocketAddr;
use std::sync::Arc;

use super::io::ConnShared;

/// The protocol a request arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    H1,
    H2,
    H3,
}

impl Proto {
    pub fn label(self) -> &'static str {
        match self {
            Proto::H1 => "h1",
            Proto::H2 => "h2",
            Proto::H3 => "h3",
        }
    }
}

/// What the pipeline knows of the client side of a request.
#[derive(Clone, Debug)]
pub struct Downstream {
    pub client: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
    pub proto: Proto,
    pub conn: Arc<ConnShared>,
    /// The request arrived in TLS early data (0-RTT), so it may be a replay.
    pub early: bool,
}
