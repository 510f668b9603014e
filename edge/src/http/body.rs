//! Body types of the data path, as enums rather than boxes: a request body
//! streamed from the client toward the origin ([`RequestBody`]), and a
//! response body streamed toward the client ([`ResponseBody`]).
//!
//! Both enforce the limits of the stream they carry: the client's body size
//! limit, and an idle timeout between frames.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::util::BoxError;

/// Why a streamed body stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    #[error("body exceeds the limit of {0} bytes")]
    TooLarge(u64),
    #[error("no body data for {0:?}")]
    Idle(Duration),
    #[error("the exchange exceeded its total time")]
    Deadline,
    #[error(transparent)]
    Stream(BoxError),
}

/// A timer that fires when no frame passed for `idle`, or at an absolute deadline.
#[derive(Debug)]
pub struct FrameTimer {
    idle: Duration,
    deadline: Option<Instant>,
    sleep: Pin<Box<Sleep>>,
}

impl FrameTimer {
    pub fn new(idle: Duration, deadline: Option<Instant>) -> Self {
        let at = Self::next(idle, deadline);
        FrameTimer {
            idle,
            deadline,
            sleep: Box::pin(tokio::time::sleep_until(at)),
        }
    }

    fn next(idle: Duration, deadline: Option<Instant>) -> Instant {
        let at = Instant::now() + idle;
        deadline.map_or(at, |d| d.min(at))
    }

    fn reset(&mut self) {
        let at = Self::next(self.idle, self.deadline);
        self.sleep.as_mut().reset(at);
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Option<BodyError> {
        if self.sleep.as_mut().poll(cx).is_ready() {
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                return Some(BodyError::Deadline);
            }
            return Some(BodyError::Idle(self.idle));
        }
        None
    }
}

/// A request body as the client's protocol delivers it.
pub enum ClientBody {
    /// No body: requests the edge makes itself (revalidations, tests).
    Empty,
    /// HTTP/1.1 and HTTP/2, from hyper.
    Hyper(Incoming),
    /// HTTP/3, from an h3 request stream.
    H3(H3Body),
    /// A body the edge made itself (a plugin's `http_call`, or a request
    /// body plugins transformed whole); taken once.
    Full(Option<Bytes>),
    /// A request body streaming out of the plugins (filled by a task),
    /// trailers included.
    Channel(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>),
}

impl std::fmt::Debug for ClientBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClientBody::Empty => "ClientBody::Empty",
            ClientBody::Hyper(_) => "ClientBody::Hyper",
            ClientBody::H3(_) => "ClientBody::H3",
            ClientBody::Full(_) => "ClientBody::Full",
            ClientBody::Channel(_) => "ClientBody::Channel",
        })
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ClientBody::H3(b) => Pin::new(b).poll_frame(cx),
            ClientBody::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            ClientBody::Channel(rx) => rx.poll_recv(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::Hyper(b) => b.is_end_stream(),
            ClientBody::H3(b) => b.is_end_stream(),
            ClientBody::Full(b) => b.is_none(),
            ClientBody::Channel(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Hyper(b) => b.size_hint(),
            ClientBody::H3(b) => b.size_hint(),
            ClientBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ClientBody::Channel(_) => SizeHint::default(),
        }
    }
}

/// The client's request body on its way to the origin.
#[derive(Debug)]
pub struct RequestBody {
    inner: Option<ClientBody>,
    limit: u64,
    seen: u64,
    timer: Option<FrameTimer>,
    /// Set when the body hit the size limit, so the pipeline answers 413.
    too_large: Arc<AtomicBool>,
}

impl RequestBody {
    pub fn empty() -> Self {
        RequestBody {
            inner: None,
            limit: 0,
            seen: 0,
            timer: None,
            too_large: Arc::default(),
        }
    }

    /// `limit` 0 means unlimited.
    pub fn new(inner: ClientBody, limit: u64, too_large: Arc<AtomicBool>) -> Self {
        let inner = (!inner.is_end_stream()).then_some(inner);
        RequestBody {
            inner,
            limit,
            seen: 0,
            timer: None,
            too_large,
        }
    }

    /// Starts the idle timer (called when the body starts moving upstream).
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        if self.inner.is_some() {
            self.timer = Some(FrameTimer::new(idle, None));
        }
        self
    }

    /// Whether the body can be replayed for a retry (only an empty one can).
    pub fn is_empty(&self) -> bool {
        self.inner.is_none()
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.limit > 0 && this.seen > this.limit {
                        this.too_large.store(true, Ordering::Release);
                        this.inner = None;
                        return Poll::Ready(Some(Err(BodyError::TooLarge(this.limit))));
                    }
                }
                if let Some(t) = &mut this.timer {
                    t.reset();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.inner = None;
                Poll::Ready(Some(Err(BodyError::Stream(e))))
            }
            Poll::Ready(None) => {
                this.inner = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                if let Some(t) = &mut this.timer
                    && let Some(e) = t.poll_expired(cx)
                {
                    this.inner = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or(SizeHint::with_exact(0), Body::size_hint)
    }
}

/// Something to run once when a response body is finished or dropped:
/// returning the origin connection to its pool, writing the access log.
pub trait OnBodyEnd: Send + Sync + 'static {
    /// `complete` is true when the body reached its end, false if it broke or
    /// the client went away first. `bytes` is how much of it was sent.
    fn finish(&mut self, complete: bool, bytes: u64);
}

/// A filter over a response body's data on its way to the client (the
/// proxy's response_body_filter phase): one per response, called chunk by
/// chunk, in order.
pub trait BodyFilter: Send + Sync + 'static {
    /// `chunk` is the next piece of data; the filter may change it, empty
    /// it or grow it. It is called once more with `end_of_stream` true when
    /// the data has ended (before any trailers), so it can add what it held
    /// back; that last chunk is empty, or holds what the filters before it
    /// added at their end, which it filters like any other data. If the
    /// filters add data at the end of a body that has trailers, the data
    /// goes out and the trailers are dropped. An `Err` breaks the body (the
    /// client sees a truncated response, as for an origin's broken body).
    fn filter(&mut self, chunk: &mut Bytes, end_of_stream: bool) -> Result<(), BoxError>;
}

/// A response body on its way to the client.
pub struct ResponseBody {
    kind: Kind,
    bytes: u64,
    done: bool,
    on_end: Vec<Box<dyn OnBodyEnd>>,
    /// response_body_filter: `None` for almost every response (one word).
    filters: Option<Box<Filters>>,
}

/// A body's filters, and whether they have seen the end of the data.
#[derive(Default)]
struct Filters {
    list: Vec<Box<dyn BodyFilter>>,
    ended: bool,
}

enum Kind {
    Empty,
    Full(Option<Bytes>),
    Upstream {
        body: Incoming,
        timer: FrameTimer,
    },
    /// Fed by a task (a cache fill, or chunks read from storage) through a
    /// bounded channel; `len` is the exact length when known.
    Channel {
        rx: tokio::sync::mpsc::Receiver<Result<Bytes, BoxError>>,
        len: Option<u64>,
        sent: u64,
    },
    /// Frames (data, then perhaps trailers) from a task: a body out of the
    /// plugins' body stages. Ends when the channel closes.
    Frames {
        rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
        len: Option<u64>,
        sent: u64,
    },
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl ResponseBody {
    pub fn empty() -> Self {
        Self::from_kind(Kind::Empty)
    }

    pub fn full(data: impl Into<Bytes>) -> Self {
        let b: Bytes = data.into();
        Self::from_kind(Kind::Full((!b.is_empty()).then_some(b)))
    }

    /// An origin's body, with an idle timeout between frames and an optional
    /// absolute deadline.
    pub fn upstream(body: Incoming, idle: Duration, deadline: Option<Instant>) -> Self {
        Self::from_kind(Kind::Upstream {
            body,
            timer: FrameTimer::new(idle, deadline),
        })
    }

    /// A body fed through a bounded channel. `len` is its exact length, if known.
    pub fn channel(
        rx: tokio::sync::mpsc::Receiver<Result<Bytes, BoxError>>,
        len: Option<u64>,
    ) -> Self {
        Self::from_kind(Kind::Channel { rx, len, sent: 0 })
    }

    fn from_kind(kind: Kind) -> Self {
        ResponseBody {
            kind,
            bytes: 0,
            done: false,
            on_end: Vec::new(),
            filters: None,
        }
    }

    /// Adds a filter over the data (after those added before). A filter
    /// may change the length: the body then reports no exact size, so a
    /// module that filters must also drop `Content-Length` from the head.
    pub fn add_filter(&mut self, f: Box<dyn BodyFilter>) {
        self.filters.get_or_insert_with(Box::default).list.push(f);
    }

    /// Runs the filters over one chunk; `Err` breaks the body.
    fn run_filters(&mut self, chunk: &mut Bytes, end: bool) -> Result<(), BodyError> {
        if let Some(fs) = &mut self.filters {
            fs.ended |= end;
            for f in &mut fs.list {
                f.filter(chunk, end).map_err(BodyError::Stream)?;
            }
        }
        Ok(())
    }

    /// A body of frames (data, then perhaps trailers) fed through a bounded
    /// channel. `len` is its exact data length, if known.
    pub fn frames(
        rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
        len: Option<u64>,
    ) -> Self {
        Self::from_kind(Kind::Frames { rx, len, sent: 0 })
    }

    /// Runs `f` once, when the body ends or is dropped.
    pub fn on_end(&mut self, f: impl OnBodyEnd) {
        self.on_end.push(Box::new(f));
    }

    fn finish(&mut self, complete: bool) {
        if self.done {
            return;
        }
        self.done = true;
        for mut f in self.on_end.drain(..).rev() {
            f.finish(complete, self.bytes);
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let r = match this.poll_kind(cx) {
            Poll::Ready(r) => r,
            Poll::Pending => return Poll::Pending,
        };
        // response_body_filter: data through the filters; at the end of the
        // data (its last chunk, the first trailers, or the end), once more
        // with an empty chunk, whose output goes out before what ended it.
        let r = if this.filters.as_ref().is_none_or(|f| f.ended) {
            r
        } else {
            match r {
                Some(Ok(f)) if f.is_data() => {
                    let mut d = f.into_data().unwrap_or_default();
                    let last = this.kind_ended();
                    match this.run_filters(&mut d, false) {
                        Ok(()) if last => {
                            let mut tail = Bytes::new();
                            match this.run_filters(&mut tail, true) {
                                Ok(()) if tail.is_empty() => Some(Ok(Frame::data(d))),
                                Ok(()) => {
                                    let mut joined = Vec::with_capacity(d.len() + tail.len());
                                    joined.extend_from_slice(&d);
                                    joined.extend_from_slice(&tail);
                                    Some(Ok(Frame::data(Bytes::from(joined))))
                                }
                                Err(e) => Some(Err(e)),
                            }
                        }
                        Ok(()) => Some(Ok(Frame::data(d))),
                        Err(e) => Some(Err(e)),
                    }
                }
                Some(Ok(f)) => {
                    // Trailers: the data has ended.
                    let mut tail = Bytes::new();
                    match this.run_filters(&mut tail, true) {
                        Ok(()) if tail.is_empty() => Some(Ok(f)),
                        Ok(()) => {
                            // The tail goes first; the trailers are dropped
                            // rather than reordered (a filter that appends
                            // at the end owns the body's framing).
                            Some(Ok(Frame::data(tail)))
                        }
                        Err(e) => Some(Err(e)),
                    }
                }
                None => {
                    let mut tail = Bytes::new();
                    match this.run_filters(&mut tail, true) {
                        Ok(()) if tail.is_empty() => None,
                        Ok(()) => {
                            this.kind = Kind::Empty;
                            Some(Ok(Frame::data(tail)))
                        }
                        Err(e) => Some(Err(e)),
                    }
                }
                Some(Err(e)) => Some(Err(e)),
            }
        };
        match &r {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                }
                if this.is_end_stream() {
                    this.finish(true);
                }
            }
            Some(Err(_)) => {
                this.kind = Kind::Empty;
                this.finish(false);
            }
            None => this.finish(true),
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        if self.filters.as_ref().is_some_and(|f| !f.ended) {
            // The filters may still add data at the end.
            return false;
        }
        self.kind_ended()
    }

    fn size_hint(&self) -> SizeHint {
        if self.filters.is_some() {
            // A filter may change the length.
            return SizeHint::default();
        }
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream { body, .. } => body.size_hint(),
            Kind::Channel { len, sent, .. } | Kind::Frames { len, sent, .. } => match len {
                Some(l) => SizeHint::with_exact(l.saturating_sub(*sent)),
                None => SizeHint::default(),
            },
        }
    }
}

impl ResponseBody {
    /// The underlying body has no more frames to give.
    #[inline]
    fn kind_ended(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(b) => b.is_none(),
            Kind::Upstream { body, .. } => body.is_end_stream(),
            Kind::Channel { len, sent, .. } => len.is_some_and(|l| *sent >= l),
            // Trailers may follow the data: only the channel's end says.
            Kind::Frames { .. } => false,
        }
    }

    /// The next frame of the underlying body.
    #[inline]
    fn poll_kind(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self;
        let r = match &mut this.kind {
            Kind::Empty => None,
            Kind::Full(b) => b.take().map(|b| Ok(Frame::data(b))),
            Kind::Upstream { body, timer } => match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => {
                    timer.reset();
                    Some(Ok(f))
                }
                Poll::Ready(Some(Err(e))) => Some(Err(BodyError::Stream(e.into()))),
                Poll::Ready(None) => None,
                Poll::Pending => {
                    if let Some(e) = timer.poll_expired(cx) {
                        Some(Err(e))
                    } else {
                        return Poll::Pending;
                    }
                }
            },
            Kind::Channel { rx, sent, .. } => match rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(b))) => {
                    *sent += b.len() as u64;
                    Some(Ok(Frame::data(b)))
                }
                Poll::Ready(Some(Err(e))) => Some(Err(BodyError::Stream(e))),
                Poll::Ready(None) => None,
                Poll::Pending => return Poll::Pending,
            },
            Kind::Frames { rx, sent, .. } => match rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(f))) => {
                    if let Some(d) = f.data_ref() {
                        *sent += d.len() as u64;
                    }
                    Some(Ok(f))
                }
                Poll::Ready(Some(Err(e))) => Some(Err(BodyError::Stream(e))),
                Poll::Ready(None) => None,
                Poll::Pending => return Poll::Pending,
            },
        };
        Poll::Ready(r)
    }
}

/// Polls a body to its end, discarding the data; for health probes.
pub async fn drain<B: Body + Unpin>(mut body: B, max: usize) -> Result<usize, B::Error> {
    let mut n = 0;
    while let Some(f) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        if let Some(d) = f?.data_ref() {
            n += bytes::Buf::remaining(d);
        }
        if n > max {
            break;
        }
    }
    Ok(n)
}

/// The receiving half of an HTTP/3 request stream.
pub type RecvStream = h3::server::RequestStream<h3_quinn::RecvStream, Bytes>;

/// An HTTP/3 request body, read from the request stream.
pub struct H3Body {
    stream: RecvStream,
    data_done: bool,
    done: bool,
}

impl H3Body {
    pub fn new(stream: RecvStream) -> Self {
        H3Body {
            stream,
            data_done: false,
            done: false,
        }
    }
}

impl Body for H3Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match this.stream.poll_recv_data(cx) {
                Poll::Ready(Ok(Some(mut buf))) => {
                    let b = buf.copy_to_bytes(buf.remaining());
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                Poll::Ready(Ok(None)) => this.data_done = true,
                Poll::Ready(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        match this.stream.poll_recv_trailers(cx) {
            Poll::Ready(Ok(t)) => {
                this.done = true;
                Poll::Ready(t.map(|t| Ok(Frame::trailers(t))))
            }
            Poll::Ready(Err(e)) => {
                this.done = true;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// Doubles every chunk; appends "!" at the end; fails on "boom".
    struct Twice(usize);

    impl BodyFilter for Twice {
        fn filter(&mut self, chunk: &mut Bytes, end: bool) -> Result<(), BoxError> {
            if end {
                // What earlier filters added at their end, doubled, then ours.
                self.0 += 1;
                let mark = format!("!{}", self.0);
                *chunk = Bytes::from([chunk.as_ref(), chunk.as_ref(), mark.as_bytes()].concat());
                return Ok(());
            }
            if chunk.as_ref() == b"boom" {
                return Err("boom".into());
            }
            *chunk = Bytes::from([chunk.as_ref(), chunk.as_ref()].concat());
            Ok(())
        }
    }

    #[tokio::test]
    async fn filters_see_each_chunk_then_the_end_once() {
        let mut b = ResponseBody::full("ab");
        b.add_filter(Box::new(Twice(0)));
        assert_eq!(
            b.size_hint().exact(),
            None,
            "a filter may change the length"
        );
        assert!(!b.is_end_stream());
        let out = b.collect().await.expect("body").to_bytes();
        assert_eq!(out.as_ref(), b"abab!1");

        // Chunks from a channel, the end known only when it closes.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut b = ResponseBody::channel(rx, None);
        b.add_filter(Box::new(Twice(0)));
        b.add_filter(Box::new(Twice(0)));
        tx.send(Ok(Bytes::from_static(b"x"))).await.expect("send");
        tx.send(Ok(Bytes::from_static(b"y"))).await.expect("send");
        drop(tx);
        let out = b.collect().await.expect("body").to_bytes();
        // Each filter doubles; the first's end mark goes through the second.
        assert_eq!(out.as_ref(), b"xxxxyyyy!1!1!1");

        // An empty body still gives the filters their end.
        let mut b = ResponseBody::empty();
        b.add_filter(Box::new(Twice(0)));
        let out = b.collect().await.expect("body").to_bytes();
        assert_eq!(out.as_ref(), b"!1");
    }

    #[tokio::test]
    async fn a_failing_filter_breaks_the_body_and_finishes_it_incomplete() {
        struct End(std::sync::Arc<parking_lot::Mutex<Option<bool>>>);
        impl OnBodyEnd for End {
            fn finish(&mut self, complete: bool, _bytes: u64) {
                *self.0.lock() = Some(complete);
            }
        }
        let seen = std::sync::Arc::new(parking_lot::Mutex::new(None));
        let mut b = ResponseBody::full("boom");
        b.on_end(End(seen.clone()));
        b.add_filter(Box::new(Twice(0)));
        assert!(b.collect().await.is_err());
        assert_eq!(*seen.lock(), Some(false));
    }

    #[tokio::test]
    async fn without_filters_the_size_stays_exact() {
        let b = ResponseBody::full("abc");
        assert_eq!(b.size_hint().exact(), Some(3));
        assert!(!b.is_end_stream());
    }
}
