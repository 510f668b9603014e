//! The body engine: request and response bodies (and their trailers)
//! through the plugins' body callbacks, buffered while a plugin pauses (up
//! to its `body_buffer`), streamed once the chain releases bytes.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Response, header, request};
use http_body_util::BodyExt;
use meridian_wasm_host::{Action, FailurePolicy, HeaderList, LocalResponse, PluginError};

use super::headers::{header_map, push_headers};
use super::{Exchange, LoadedPlugin, Outcome, SharedExchange, Verdict, count, local_response};
use crate::error::{BoxError, ErrorKind, PluginFailure, ProxyError};
use crate::http::body::ResponseBody;
use crate::metrics::Metrics;

/// A response body stage: one plugin's buffer while it holds data back.
pub(super) struct Stage {
    pub(super) idx: usize,
    pub(super) buf: BytesMut,
    pub(super) active: bool,
}

/// What stopped a body from going through the chain.
enum BodyFailure {
    /// A plugin failed under a closed policy, or closed the stream.
    Failed,
    /// No instance to be had for a plugin (503, whatever its policy).
    Overloaded,
    /// A plugin with a closed policy held back more than its `body_buffer`.
    TooLarge,
    /// A plugin answered with a local response mid-body.
    Local(LocalResponse),
}

impl BodyFailure {
    /// How it ends the request: with a plugin's own answer (`Ok`), or with
    /// a plugin failure. A plugin over its `body_buffer` is a 413 on a
    /// request body, a plain failure (500) on a response body.
    fn end(self, dir: Dir, context: &'static str) -> Result<Response<ResponseBody>, ProxyError> {
        let f = match self {
            BodyFailure::Local(lr) => return Ok(local_response(lr)),
            BodyFailure::Failed => PluginFailure::Failed,
            BodyFailure::Overloaded => PluginFailure::Overloaded,
            BodyFailure::TooLarge if dir == Dir::Request => PluginFailure::RequestBodyOverBuffer,
            BodyFailure::TooLarge => PluginFailure::Failed,
        };
        Err(ProxyError::plugin(f, context))
    }
}

impl Verdict {
    /// What stops a body, if anything.
    fn body_failure(self) -> Option<BodyFailure> {
        self.failure().map(|f| match f {
            PluginFailure::Overloaded => BodyFailure::Overloaded,
            _ => BodyFailure::Failed,
        })
    }
}

/// Which body goes through the stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Request,
    Response,
}

/// Pushes one chunk through the stages; returns what comes out the far end.
fn push_chunk(
    ex: &mut Exchange,
    stages: &mut [Stage],
    chunk: Bytes,
    eos: bool,
    dir: Dir,
) -> Result<Bytes, BodyFailure> {
    let mut data = chunk;
    for st in stages.iter_mut() {
        if !st.active || (data.is_empty() && !eos && st.buf.is_empty()) {
            continue;
        }
        let lp = ex.chain[st.idx].clone();
        if st.buf.is_empty() {
            // Nothing held back: take the chunk as is (no copy when unshared).
            st.buf = data
                .try_into_mut()
                .unwrap_or_else(|b| BytesMut::from(&b[..]));
        } else {
            st.buf.extend_from_slice(&data);
        }
        let Some(ctx) = ex.ctxs[st.idx].as_mut() else {
            st.active = false;
            data = st.buf.split().freeze();
            continue;
        };
        let r = match dir {
            Dir::Request => ctx.on_request_body(&mut st.buf, eos),
            Dir::Response => ctx.on_response_body(&mut st.buf, eos),
        };
        match r {
            // Held back: the limit is on what the plugin makes the edge keep.
            Ok(Action::Pause) if !eos && st.buf.len() > lp.body_buffer => {
                lp.warn_failure(
                    &format_args!("{} bytes held back in the {dir:?} body", st.buf.len()),
                    format_args!(
                        "plugin held back more body than its body_buffer ({})",
                        lp.body_buffer
                    ),
                );
                count(&ex.metrics, "body-buffer-exceeded");
                if lp.plugin.policy() == FailurePolicy::Closed {
                    return Err(BodyFailure::TooLarge);
                }
                st.active = false;
                data = st.buf.split().freeze();
            }
            Ok(Action::Pause) if !eos => return Ok(Bytes::new()),
            Ok(Action::Continue | Action::Pause) => data = st.buf.split().freeze(),
            Ok(Action::LocalResponse(lr)) => return Err(BodyFailure::Local(lr)),
            Ok(_) => return Err(BodyFailure::Failed),
            Err(e) => {
                let stop = body_error(&ex.metrics, &lp, &e, dir);
                ex.ctxs[st.idx] = None;
                if let Some(f) = stop {
                    return Err(f);
                }
                st.active = false;
                data = st.buf.split().freeze();
            }
        }
    }
    Ok(data)
}

/// What a plugin's error on a body (or its trailers) does: `Some` stops the
/// body (overload, or a failure under a closed policy); `None` skips the
/// plugin for the rest of it.
fn body_error(
    metrics: &Metrics,
    lp: &LoadedPlugin,
    e: &PluginError,
    dir: Dir,
) -> Option<BodyFailure> {
    let what = match dir {
        Dir::Request => "on a request body",
        Dir::Response => "on a response body",
    };
    Verdict::of(metrics, lp, e, what).body_failure()
}

/// One step of a body: its next data, or its end, with the trailers that
/// end it, if any.
struct Piece {
    data: Bytes,
    eos: bool,
    trailers: Option<http::HeaderMap>,
}

async fn next_chunk<B>(body: &mut B) -> Result<Piece, BoxError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let piece = |data, eos, trailers| Piece {
        data,
        eos,
        trailers,
    };
    loop {
        match body.frame().await {
            None => return Ok(piece(Bytes::new(), true, None)),
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => return Ok(piece(d, false, None)),
                Err(f) => {
                    if let Ok(t) = f.into_trailers() {
                        // Trailers are the last frame.
                        return Ok(piece(Bytes::new(), true, Some(t)));
                    }
                }
            },
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// Runs trailers through the stages' plugins (`on_request_trailers` /
/// `on_response_trailers`), in stage order; a plugin may edit them. A plugin
/// that fails under a closed policy fails the body.
fn push_trailers(
    ex: &mut Exchange,
    stages: &[Stage],
    trailers: http::HeaderMap,
    dir: Dir,
) -> Result<http::HeaderMap, BodyFailure> {
    let mut list: HeaderList = Vec::with_capacity(trailers.len());
    push_headers(&mut list, &trailers);
    let mut edited = false;
    for st in stages {
        let lp = ex.chain[st.idx].clone();
        let Some(ctx) = ex.ctxs[st.idx].as_mut() else {
            continue;
        };
        let before = list.clone();
        let r = match dir {
            Dir::Request => ctx.on_request_trailers(&mut list),
            Dir::Response => ctx.on_response_trailers(&mut list),
        };
        edited |= list != before;
        if let Err(e) = r {
            let stop = body_error(&ex.metrics, &lp, &e, dir);
            ex.ctxs[st.idx] = None;
            if let Some(f) = stop {
                return Err(f);
            }
        }
    }
    Ok(if edited {
        header_map(&list, |_, _| {})
    } else {
        trailers
    })
}

/// Whether the exchange has a live plugin to run the request body through.
pub fn has_request_body_phase(ex: &SharedExchange) -> bool {
    ex.lock().ctxs.iter().any(Option::is_some)
}

/// Runs the client's request body through the plugins (`on_request_body`),
/// in chain order, before it goes to the origin, as the response phase does
/// for response bodies: chunks stream through; a plugin that pauses makes
/// the edge buffer (up to its `body_buffer`) and call it again with
/// everything so far. A body the chain releases whole goes on with an exact
/// Content-Length; one released while still arriving streams on, keeping the
/// client's length only while no plugin changes it.
///
/// [`Outcome::Respond`] is a plugin's own answer. `Err` ends the request: a
/// plugin's failure under a closed policy (500; 413 for a body over its
/// `body_buffer`), no instance for it (503), or a client body that failed
/// (400) or stalled for `idle` (408).
pub async fn request_body_phase(
    ex: &SharedExchange,
    parts: &mut request::Parts,
    mut body: crate::http::body::ClientBody,
    idle: Duration,
) -> Result<Outcome<crate::http::body::ClientBody>, ProxyError> {
    use crate::http::body::ClientBody;
    let mut stages: Vec<Stage> = {
        let g = ex.lock();
        (0..g.chain.len())
            .filter(|&i| g.ctxs[i].is_some())
            .map(|idx| Stage {
                idx,
                buf: BytesMut::new(),
                active: true,
            })
            .collect()
    };
    if stages.is_empty() || http_body::Body::is_end_stream(&body) {
        return Ok(Outcome::Continue(body));
    }
    // 1. Until the chain releases bytes: nothing has gone to the origin yet.
    let p = match until_release(ex, &mut stages, &mut body, Dir::Request, Some(idle)).await {
        Ok(p) => p,
        Err(BodyStop::Plugin(f)) => {
            return f
                .end(Dir::Request, "request body")
                .map(|r| Outcome::Respond(Box::new(r)));
        }
        Err(BodyStop::Source(e)) => {
            return Err(ProxyError::downstream(
                ErrorKind::ClientBodyError,
                "request body in the plugins",
            )
            .with_cause(e));
        }
        Err(BodyStop::Idle) => {
            return Err(ProxyError::downstream(
                ErrorKind::ClientBodyTimeout,
                "request body in the plugins",
            ));
        }
    };
    parts.headers.remove(header::TRANSFER_ENCODING);
    if p.finished {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(p.out.len()));
        let out = p.out.freeze();
        return Ok(Outcome::Continue(match p.trailers {
            None => ClientBody::Full(Some(out)),
            Some(t) => ClientBody::Channel(frames_of(out, t)),
        }));
    }
    // 2. Streaming to the origin.
    if p.out.len() as u64 != p.in_total {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    let declared = parts.headers.contains_key(header::CONTENT_LENGTH);
    Ok(Outcome::Continue(ClientBody::Channel(stream_rest(
        ex.clone(),
        stages,
        body,
        Dir::Request,
        Some(idle),
        p,
        declared,
    ))))
}

/// Runs the body through the stages. The head is held until the chain
/// releases its first bytes (or the body ends). `Err`: the body failed
/// before that, and the held head is answered with the error instead.
pub(super) async fn transform_body(
    ex: SharedExchange,
    mut stages: Vec<Stage>,
    resp: Response<ResponseBody>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let (mut parts, mut body) = resp.into_parts();
    // 1. Until the first release: nothing has been sent yet. (The origin
    // body has its own idle timer.)
    let p = match until_release(&ex, &mut stages, &mut body, Dir::Response, None).await {
        Ok(p) => p,
        Err(BodyStop::Plugin(f)) => return f.end(Dir::Response, "response body"),
        Err(BodyStop::Source(e)) => {
            return Err(ProxyError::upstream(
                ErrorKind::UpstreamProtocol,
                "origin body, before the plugins released it",
            )
            .with_cause(e));
        }
        Err(BodyStop::Idle) => {
            return Err(ProxyError::upstream(
                ErrorKind::UpstreamBodyTimeout,
                "origin body, before the plugins released it",
            ));
        }
    };
    parts.headers.remove(header::TRANSFER_ENCODING);
    if p.finished {
        // The whole body went through: its length is known exactly.
        let len = p.out.len() as u64;
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        let out = p.out.freeze();
        let body = match p.trailers {
            None => ResponseBody::full(out),
            Some(t) => ResponseBody::frames(frames_of(out, t), Some(len)),
        };
        return Ok(Response::from_parts(parts, body));
    }
    // 2. Streaming. The origin's Content-Length holds only while no plugin
    // changes the length; it is dropped now if one already has.
    if p.out.len() as u64 != p.in_total {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let rx = stream_rest(ex, stages, body, Dir::Response, None, p, declared.is_some());
    Ok(Response::from_parts(
        parts,
        ResponseBody::frames(rx, declared),
    ))
}

/// The frames of a body going out of the plugins.
type FrameRx = tokio::sync::mpsc::Receiver<Result<http_body::Frame<Bytes>, BoxError>>;

/// Why a body stopped before the plugins released any of it.
enum BodyStop {
    /// The body itself failed.
    Source(BoxError),
    /// No frame for the idle timeout.
    Idle,
    Plugin(BodyFailure),
}

/// A body's way through the stages up to the first release.
struct Progress {
    /// What the chain released.
    out: BytesMut,
    /// What came in.
    in_total: u64,
    /// The trailers, as the plugins left them, if the body ended with some.
    trailers: Option<http::HeaderMap>,
    /// The body ended (everything went through).
    finished: bool,
}

/// The next piece of `body`, within `idle` if given.
async fn next_piece<B>(body: &mut B, idle: Option<Duration>) -> Result<Piece, BodyStop>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let r = match idle {
        Some(d) => tokio::time::timeout(d, next_chunk(body))
            .await
            .map_err(|_| BodyStop::Idle)?,
        None => next_chunk(body).await,
    };
    r.map_err(BodyStop::Source)
}

/// One piece through the stages: the bytes released, and the trailers.
fn push_piece(
    ex: &SharedExchange,
    stages: &mut [Stage],
    piece: Piece,
    dir: Dir,
) -> Result<(Bytes, Option<http::HeaderMap>), BodyFailure> {
    let mut g = ex.lock();
    let b = push_chunk(&mut g, stages, piece.data, piece.eos, dir)?;
    let t = piece
        .trailers
        .map(|t| push_trailers(&mut g, stages, t, dir))
        .transpose()?;
    Ok((b, t))
}

/// Feeds `body` through the stages until the chain releases its first bytes
/// while more is to come, or the body ends (a body whose last bytes just
/// came goes round once more to see its end, and counts as finished).
async fn until_release<B>(
    ex: &SharedExchange,
    stages: &mut [Stage],
    body: &mut B,
    dir: Dir,
    idle: Option<Duration>,
) -> Result<Progress, BodyStop>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut p = Progress {
        out: BytesMut::new(),
        in_total: 0,
        trailers: None,
        finished: false,
    };
    loop {
        let piece = next_piece(body, idle).await?;
        p.in_total += piece.data.len() as u64;
        let eos = piece.eos;
        let (b, t) = push_piece(ex, stages, piece, dir).map_err(BodyStop::Plugin)?;
        p.out.extend_from_slice(&b);
        p.trailers = t;
        if eos {
            p.finished = true;
            return Ok(p);
        }
        if !p.out.is_empty() && !body.is_end_stream() {
            return Ok(p);
        }
    }
}

/// A whole body and its trailers as frames (the channel holds both).
fn frames_of(data: Bytes, trailers: http::HeaderMap) -> FrameRx {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let _ = tx.try_send(Ok(http_body::Frame::data(data)));
    let _ = tx.try_send(Ok(http_body::Frame::trailers(trailers)));
    rx
}

/// Streams the rest of a body through the stages from a task, after what
/// `p` released first. With `declared` (a Content-Length already sent on)
/// the stream is cut rather than sent with another length.
fn stream_rest<B>(
    ex: SharedExchange,
    mut stages: Vec<Stage>,
    mut body: B,
    dir: Dir,
    idle: Option<Duration>,
    p: Progress,
    declared: bool,
) -> FrameRx
where
    B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let first = p.out.freeze();
    let mut in_total = p.in_total;
    let metrics = ex.lock().metrics.clone();
    // A plugin failure once bytes are on their way cannot become a response:
    // the body is cut, and the failure counted as every error is.
    let failed = move |context| {
        ProxyError::plugin(PluginFailure::Failed, context).count(&metrics, None);
    };
    tokio::spawn(async move {
        let mut out_total = first.len() as u64;
        if tx.send(Ok(http_body::Frame::data(first))).await.is_err() {
            return;
        }
        loop {
            let piece = match next_piece(&mut body, idle).await {
                Ok(p) => p,
                Err(BodyStop::Idle) => {
                    let _ = tx.send(Err("body timed out".into())).await;
                    return;
                }
                Err(BodyStop::Source(e)) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Err(BodyStop::Plugin(_)) => return,
            };
            in_total += piece.data.len() as u64;
            let eos = piece.eos;
            let Ok((b, trailers)) = push_piece(&ex, &mut stages, piece, dir) else {
                failed("streaming a body");
                let _ = tx
                    .send(Err("a plugin failed while streaming the body".into()))
                    .await;
                return;
            };
            out_total += b.len() as u64;
            if declared && (out_total > in_total || (eos && out_total != in_total)) {
                tracing::warn!(
                    ?dir,
                    "a plugin changed the body's length after Content-Length was sent"
                );
                failed("streaming a body: length changed");
                let _ = tx
                    .send(Err("a plugin changed the length of a streamed body".into()))
                    .await;
                return;
            }
            if !b.is_empty() && tx.send(Ok(http_body::Frame::data(b))).await.is_err() {
                return;
            }
            if let Some(t) = trailers {
                let _ = tx.send(Ok(http_body::Frame::trailers(t))).await;
            }
            if eos {
                return;
            }
        }
    });
    rx
}
