//! 1xx interim responses (102 Processing, 103 Early Hints, …) from the
//! origin, forwarded to an HTTP/1.1 client before the final response
//! (RFC 9110 §15.2: a proxy forwards 1xx responses it did not ask for).
//!
//! hyper's server has no API to send an interim response, so the bytes go
//! through the connection's I/O wrapper ([`super::io::ClientIo`]) instead:
//! - the origin connection's callback encodes the interim head into the
//!   client connection's queue and wakes the task serving the request;
//! - the wrapper writes the queue out when hyper flushes (hyper's own write
//!   buffer is empty then), or, at the latest, right before the first byte
//!   of the final response, and never after it: the request closes the
//!   queue before hyper sees its response.
//!
//! If the final response races ahead of a queued interim while hyper still
//! holds bytes of the previous response (pipelining to a slow reader), the
//! interim is dropped: an interim response is advisory, a torn stream is not.
//!
//! An HTTP/3 request gets its interim responses through a channel to its
//! task, which sends each as a HEADERS frame before the final one.
//!
//! HTTP/2 clients get no interim responses: hyper's HTTP/2 server has no
//! way to send one. Origins reached over HTTP/2 deliver none (hyper's
//! client reports 1xx on HTTP/1.1 only).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::Waker;

use bytes::{BufMut, BytesMut};
use http::{HeaderMap, StatusCode, header};

/// At most this many bytes of interim heads wait for one request.
const MAX_QUEUED: usize = 16 * 1024;
/// At most this many interim responses are forwarded for one request.
const MAX_PER_REQUEST: u32 = 8;

/// A connection's interim heads (in its `ConnShared`): the queue, and
/// whether it holds bytes (checked without the lock on every write).
#[derive(Debug, Default)]
pub struct InterimShared {
    pub(crate) queue: parking_lot::Mutex<InterimQueue>,
    pub(crate) pending: std::sync::atomic::AtomicBool,
}

/// A connection's queue of encoded interim heads.
#[derive(Debug, Default)]
pub struct InterimQueue {
    /// Encoded heads not yet written to the client.
    pub(super) buf: BytesMut,
    /// Whether the current request still accepts interim responses.
    open: bool,
    /// How many were queued for the current request.
    count: u32,
    /// The task serving the current request.
    waker: Option<Waker>,
}

impl InterimQueue {
    /// Whether the current request still accepts interim responses.
    pub(super) fn is_open(&self) -> bool {
        self.open
    }
}

/// Handed to a request (as an extension) by an HTTP/1.1 or HTTP/3
/// connection, so the origin connection can forward interim responses to
/// it. It does not keep the connection alive: a background fill may outlive
/// the client.
#[derive(Clone, Debug)]
pub struct InterimSink(Sink);

#[derive(Clone, Debug)]
enum Sink {
    /// HTTP/1.1: encoded into the connection's queue (see the module docs).
    H1(Weak<InterimShared>),
    /// HTTP/3: to the request's task, which sends each as a HEADERS frame
    /// before the final one (RFC 9114 §4.1). Closed with the final response.
    H3(tokio::sync::mpsc::Sender<(StatusCode, HeaderMap)>),
}

/// What an HTTP/3 request task reads interim responses from.
pub type InterimReceiver = tokio::sync::mpsc::Receiver<(StatusCode, HeaderMap)>;

/// Whether the edge forwards this interim status: 102 and 103-199. 100
/// Continue answers the edge's own request, and 101 is the final response
/// of an upgrade.
pub fn forwarded(status: StatusCode) -> bool {
    (102..200).contains(&status.as_u16())
}

impl InterimSink {
    /// A sink for one HTTP/3 request; at most [`MAX_PER_REQUEST`] interim
    /// responses are queued, the rest dropped.
    pub fn h3() -> (Self, InterimReceiver) {
        let (tx, rx) = tokio::sync::mpsc::channel(MAX_PER_REQUEST as usize);
        (InterimSink(Sink::H3(tx)), rx)
    }

    /// Opens the connection's queue for a new request.
    pub fn open(conn: &Arc<InterimShared>) -> Self {
        let mut q = conn.queue.lock();
        q.buf.clear();
        q.open = true;
        q.count = 0;
        q.waker = None;
        conn.pending.store(false, Ordering::Release);
        InterimSink(Sink::H1(Arc::downgrade(conn)))
    }

    fn h1(&self) -> Option<Arc<InterimShared>> {
        match &self.0 {
            Sink::H1(w) => w.upgrade(),
            Sink::H3(_) => None,
        }
    }

    /// Remembers the task to wake when an interim response arrives.
    pub fn register(&self, waker: &Waker) {
        let Some(conn) = self.h1() else { return };
        let mut q = conn.queue.lock();
        match &q.waker {
            Some(w) if w.will_wake(waker) => {}
            _ => q.waker = Some(waker.clone()),
        }
    }

    /// The request has its final response: nothing more is queued for it.
    pub fn close(&self) {
        let Some(conn) = self.h1() else { return };
        let mut q = conn.queue.lock();
        q.open = false;
        q.waker = None;
    }

    /// Queues an interim response from the origin. Only 102 and 103-199 are
    /// forwarded: 100 Continue answers the edge's own request, and 101 is
    /// the final response of an upgrade.
    pub fn push(&self, status: StatusCode, headers: &HeaderMap) {
        if !forwarded(status) {
            return;
        }
        let code = status.as_u16();
        let conn = match &self.0 {
            Sink::H3(tx) => {
                let mut h = HeaderMap::with_capacity(headers.len());
                for (name, value) in headers {
                    if !is_hop_by_hop(name) {
                        h.append(name.clone(), value.clone());
                    }
                }
                if tx.try_send((status, h)).is_err() {
                    tracing::debug!(status = code, "interim response dropped");
                }
                return;
            }
            Sink::H1(w) => match w.upgrade() {
                Some(c) => c,
                None => return,
            },
        };
        let mut head = BytesMut::with_capacity(64 + headers.len() * 48);
        head.put_slice(b"HTTP/1.1 ");
        head.put_slice(status.as_str().as_bytes());
        head.put_u8(b' ');
        head.put_slice(status.canonical_reason().unwrap_or("Interim").as_bytes());
        head.put_slice(b"\r\n");
        for (name, value) in headers {
            if is_hop_by_hop(name) {
                continue;
            }
            head.put_slice(name.as_str().as_bytes());
            head.put_slice(b": ");
            head.put_slice(value.as_bytes());
            head.put_slice(b"\r\n");
        }
        head.put_slice(b"\r\n");
        let waker = {
            let mut q = conn.queue.lock();
            if !q.open || q.count >= MAX_PER_REQUEST || q.buf.len() + head.len() > MAX_QUEUED {
                tracing::debug!(status = code, "interim response dropped");
                return;
            }
            q.count += 1;
            q.buf.put_slice(&head);
            conn.pending.store(true, Ordering::Release);
            q.waker.clone()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Fields that belong to one connection, not to the message (RFC 9110 §7.6.1).
fn is_hop_by_hop(name: &header::HeaderName) -> bool {
    matches!(
        *name,
        header::CONNECTION
            | header::TRANSFER_ENCODING
            | header::UPGRADE
            | header::TE
            | header::TRAILER
            | header::CONTENT_LENGTH
    ) || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn hints() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::LINK,
            HeaderValue::from_static("</a.css>; rel=preload"),
        );
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        h
    }

    #[test]
    fn encodes_forwardable_interims_while_open() {
        let conn = Arc::new(InterimShared::default());
        let sink = InterimSink::open(&conn);
        sink.push(StatusCode::CONTINUE, &hints());
        sink.push(StatusCode::SWITCHING_PROTOCOLS, &hints());
        assert!(
            conn.queue.lock().buf.is_empty(),
            "100 and 101 are not forwarded"
        );
        sink.push(StatusCode::EARLY_HINTS, &hints());
        assert_eq!(
            &conn.queue.lock().buf[..],
            b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n"
        );
        assert!(conn.pending.load(Ordering::Acquire));
        sink.close();
        sink.push(StatusCode::PROCESSING, &HeaderMap::new());
        assert_eq!(
            conn.queue.lock().buf.len(),
            57,
            "nothing is queued after the final response"
        );
        // The next request starts with an empty queue.
        let _next = InterimSink::open(&conn);
        assert!(conn.queue.lock().buf.is_empty());
    }

    #[test]
    fn bounded_per_request() {
        let conn = Arc::new(InterimShared::default());
        let sink = InterimSink::open(&conn);
        for _ in 0..20 {
            sink.push(StatusCode::PROCESSING, &HeaderMap::new());
        }
        let expected = b"HTTP/1.1 102 Processing\r\n\r\n".len() * MAX_PER_REQUEST as usize;
        assert_eq!(conn.queue.lock().buf.len(), expected);
    }
}
