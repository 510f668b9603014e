//! The client connection's I/O wrapper: replays bytes peeked before the
//! protocol was known, feeds HTTP/1 bytes to the [`H1Guard`], closes idle
//! connections, and answers 408 to a request head that does not finish in time.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::h1guard::{Flag, H1Guard, Seen};
use crate::metrics::Metrics;

/// State one connection shares between its I/O and the requests on it.
#[derive(Debug, Default)]
pub struct ConnShared {
    /// Requests whose response has not finished.
    pub inflight: AtomicUsize,
    /// Requests handed to the service so far (HTTP/1 sequence numbers).
    pub requests: AtomicU64,
    any_flagged: AtomicBool,
    flagged: Mutex<Vec<(u64, Flag)>>,
    /// What keeps the connection counted (its `max_connections` slot, its
    /// drain token, its `connections_active` gauge). An upgraded connection
    /// (a WebSocket tunnel) outlives the HTTP session that accepted it, so
    /// the tunnel takes a clone and the connection stays counted.
    pub hold: std::sync::OnceLock<ConnHold>,
    /// Interim (1xx) heads waiting to be written before the final response
    /// (HTTP/1.1 only; see [`super::interim`]).
    pub(crate) interim: Arc<super::interim::InterimShared>,
}

/// See [`ConnShared::hold`].
pub type ConnHold = Arc<dyn std::any::Any + Send + Sync>;

/// Counts a connection in a gauge while it lives.
#[derive(Debug)]
pub struct Active(pub prometheus_client::metrics::gauge::Gauge);

impl Active {
    pub fn new(g: prometheus_client::metrics::gauge::Gauge) -> Self {
        g.inc();
        Active(g)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl ConnShared {
    /// Takes the flag, if any, that the guard raised for HTTP/1 request `seq`.
    pub fn take_flag(&self, seq: u64) -> Option<Flag> {
        if !self.any_flagged.load(Ordering::Acquire) {
            return None;
        }
        let mut f = self.flagged.lock();
        let i = f.iter().position(|(s, _)| *s == seq)?;
        Some(f.swap_remove(i).1)
    }
}

/// A guard that counts one in-flight request on a connection.
#[derive(Debug)]
pub struct InflightGuard(Arc<ConnShared>);

impl InflightGuard {
    pub fn new(shared: &Arc<ConnShared>) -> Self {
        shared.inflight.fetch_add(1, Ordering::AcqRel);
        InflightGuard(shared.clone())
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

const RESPONSE_408: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Timer {
    Idle,
    Head,
}

/// How a client connection's I/O is watched.
#[derive(Clone, Copy, Debug)]
pub struct IoSettings {
    /// Follow HTTP/1 framing (smuggling flags, 408 on slow heads).
    pub http1: bool,
    pub max_head: usize,
    pub max_headers: usize,
    /// Close after this long with no traffic and no request in flight.
    pub idle: Duration,
    /// Answer 408 when a started request head takes longer than this.
    pub head_timeout: Duration,
    /// Close when the client accepts no bytes for this long while a write waits.
    pub send_timeout: Duration,
}

pub struct ClientIo<S> {
    inner: S,
    prefix: Bytes,
    guard: Option<H1Guard>,
    shared: Arc<ConnShared>,
    idle: Duration,
    head_timeout: Duration,
    last_activity: Instant,
    head_started: Option<Instant>,
    sleep: Pin<Box<Sleep>>,
    armed: Option<(Instant, Timer)>,
    metrics: Arc<Metrics>,
    timed_out: bool,
    send_timeout: Duration,
    /// Armed while a write waits for the client to make room.
    write_sleep: Option<Pin<Box<Sleep>>>,
    /// No write since hyper's last flush: hyper's own buffer was empty then,
    /// so the next write starts a new response (interim heads may go first).
    clean: bool,
}

impl<S> ClientIo<S> {
    pub fn new(
        inner: S,
        prefix: Bytes,
        settings: IoSettings,
        shared: Arc<ConnShared>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let now = Instant::now();
        ClientIo {
            inner,
            prefix,
            guard: settings
                .http1
                .then(|| H1Guard::new(settings.max_head, settings.max_headers)),
            shared,
            idle: settings.idle,
            head_timeout: settings.head_timeout,
            last_activity: now,
            head_started: None,
            sleep: Box::pin(tokio::time::sleep_until(now + settings.idle)),
            armed: None,
            metrics,
            timed_out: false,
            send_timeout: settings.send_timeout,
            write_sleep: None,
            clean: true,
        }
    }

    fn observe(&mut self, data: &[u8]) {
        self.last_activity = Instant::now();
        let Some(g) = &mut self.guard else { return };
        if g.is_passthrough() {
            return;
        }
        let mut seen = Seen::default();
        g.feed(data, &mut seen);
        if !seen.flagged.is_empty() {
            self.shared.flagged.lock().extend(seen.flagged);
            self.shared.any_flagged.store(true, Ordering::Release);
        }
        if g.in_partial_head() {
            self.head_started.get_or_insert(self.last_activity);
        } else {
            self.head_started = None;
        }
    }

    /// The deadline that applies now, if any.
    fn deadline(&self) -> Option<(Instant, Timer)> {
        if self.shared.inflight.load(Ordering::Acquire) > 0 {
            return None;
        }
        if let Some(start) = self.head_started {
            return Some((start + self.head_timeout, Timer::Head));
        }
        Some((self.last_activity + self.idle, Timer::Idle))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> ClientIo<S> {
    /// Polls the connection's timer; Ready(err) when it fired.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            let Some((at, kind)) = self.deadline() else {
                self.armed = None;
                return Poll::Pending;
            };
            if self.armed != Some((at, kind)) {
                self.sleep.as_mut().reset(at);
                self.armed = Some((at, kind));
            }
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // Fired: check the deadline did not move meanwhile.
            if self.deadline() != Some((at, kind)) {
                continue;
            }
            self.timed_out = true;
            return Poll::Ready(match kind {
                Timer::Idle => {
                    self.metrics
                        .client_timeouts
                        .get_or_create(&crate::metrics::Reason { reason: "idle" })
                        .inc();
                    io::Error::new(io::ErrorKind::TimedOut, "client idle timeout")
                }
                Timer::Head => {
                    self.metrics
                        .bad_requests
                        .get_or_create(&crate::metrics::Reason {
                            reason: "header-timeout",
                        })
                        .inc();
                    tracing::info!("client too slow sending its request head: 408");
                    // Best effort: the send buffer of an idle connection has room.
                    if let Poll::Ready(Ok(_)) =
                        Pin::new(&mut self.inner).poll_write(cx, RESPONSE_408)
                    {
                        let _ = Pin::new(&mut self.inner).poll_flush(cx);
                    }
                    io::Error::new(io::ErrorKind::TimedOut, "request head timeout (408 sent)")
                }
            });
        }
    }
}

impl<S: AsyncWrite + Unpin> ClientIo<S> {
    /// Writes queued interim heads; Ready once none are left.
    fn poll_interim(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut q = self.shared.interim.queue.lock();
        while !q.buf.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, &q.buf) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    bytes::Buf::advance(&mut q.buf, n);
                    self.last_activity = Instant::now();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.shared.interim.pending.store(false, Ordering::Release);
        Poll::Ready(Ok(()))
    }

    /// Before hyper writes: interim heads go first when this write starts
    /// a new response; they wait while their request has no final response
    /// yet; otherwise (the final head may be in this write, behind bytes of
    /// an earlier response) they are dropped.
    fn poll_interim_before_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shared.interim.pending.load(Ordering::Acquire) {
            self.clean = false;
            return Poll::Ready(Ok(()));
        }
        if self.clean {
            let r = self.poll_interim(cx);
            if !matches!(r, Poll::Ready(Ok(()))) {
                return self.watch_write(r, cx);
            }
        } else {
            let mut q = self.shared.interim.queue.lock();
            if !q.is_open() {
                q.buf.clear();
                self.shared.interim.pending.store(false, Ordering::Release);
                tracing::debug!("interim response dropped: the final response was already queued");
            }
        }
        self.clean = false;
        Poll::Ready(Ok(()))
    }
}

impl<S> ClientIo<S> {
    /// Watches a write: Ready resets the send timer; Pending arms it, and
    /// when the client has taken nothing for `send_timeout` the write fails.
    fn watch_write<T>(
        &mut self,
        r: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.write_sleep = None;
            return r;
        }
        let timeout = self.send_timeout;
        let sleep = self
            .write_sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.write_sleep = None;
        self.timed_out = true;
        self.metrics
            .client_timeouts
            .get_or_create(&crate::metrics::Reason { reason: "send" })
            .inc();
        tracing::info!("client accepted no response bytes within send_timeout: closing");
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client send timeout",
        )))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.timed_out {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")));
        }
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            let chunk = this.prefix.split_to(n);
            buf.put_slice(&chunk);
            this.observe(&chunk);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let filled = &buf.filled()[before..];
                if !filled.is_empty() {
                    this.observe(filled);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.poll_timer(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ClientIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.timed_out {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")));
        }
        std::task::ready!(this.poll_interim_before_write(cx))?;
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            this.last_activity = Instant::now();
        }
        this.watch_write(r, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.timed_out {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")));
        }
        std::task::ready!(this.poll_interim_before_write(cx))?;
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            this.last_activity = Instant::now();
        }
        this.watch_write(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // hyper flushes the socket only once its own buffer is written out,
        // and before the final head is written the queue is either drained
        // or dropped (see `poll_interim_before_write`): interim heads queued
        // now precede the final response.
        if this.shared.interim.pending.load(Ordering::Acquire) {
            let r = this.poll_interim(cx);
            if !matches!(r, Poll::Ready(Ok(()))) {
                return this.watch_write(r, cx);
            }
        }
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = r {
            this.clean = true;
        }
        this.watch_write(r, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
