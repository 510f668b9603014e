//! One request's state as it moves through the phases: the shape of
//! pingora's `Session`. Functions of the request path take `&mut Session`
//! instead of long argument lists, and a background subrequest (a
//! stale-while-revalidate refresh, a range's background fill) is a
//! [`Session::subrequest`] of it, with the real site.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::accesslog::LogRecord;
use crate::error::{ErrorKind, ErrorSource, ProxyError};
use crate::http::body::RequestBody;

use http::Response;

use super::{Fetched, Proxy, Runtime, Site, UpstreamRequest};
use crate::http::Downstream;
use crate::http::body::{ClientBody, ResponseBody};

/// A request on its way through the pipeline.
pub struct Session {
    pub proxy: Arc<Proxy>,
    /// The config generation the request started with.
    pub rt: Arc<Runtime>,
    pub ds: Downstream,
    /// The site the request was routed to (an index into `rt.sites`).
    site: Option<usize>,
    /// The request as it will go to the origin: parts after the request
    /// filters, host, path, and the plugin exchange.
    pub up: UpstreamRequest,
    /// The client's body as received, until upstream_request_filter
    /// wraps it into [`Session::body`].
    pub client_body: Option<ClientBody>,
    /// The request body, until something sends it.
    pub body: Option<RequestBody>,
    /// The request's number on its connection.
    pub seq: u64,
    /// Set when the body is over `limits.max_body_bytes`.
    pub too_large: Arc<AtomicBool>,
    /// The access log record (and the error and origin it names).
    pub rec: LogRecord,
}

impl Session {
    #[inline]
    pub(super) fn new(
        proxy: Arc<Proxy>,
        rt: Arc<Runtime>,
        ds: Downstream,
        up: UpstreamRequest,
        rec: LogRecord,
        (seq, body): (u64, ClientBody),
    ) -> Self {
        Session {
            proxy,
            rt,
            ds,
            site: None,
            up,
            client_body: Some(body),
            body: None,
            seq,
            too_large: Arc::default(),
            rec,
        }
    }

    /// The one place an error becomes the client's response: the access
    /// log's error field, the error metric of its side, a log line, and
    /// the response of [`ProxyError::to_response`].
    pub fn error_response(&mut self, e: ProxyError) -> Response<ResponseBody> {
        self.rec.error = Some(e.kind.label());
        let pool = self.site().ok().map(|s| s.pool.name.clone());
        e.count(&self.proxy.metrics, pool.as_ref());
        if e.kind != ErrorKind::UnknownHost {
            tracing::info!(error = %e, client = %self.ds.client, "request failed");
        }
        let unknown = http::StatusCode::from_u16(self.rt.config.server.unknown_host_status)
            .unwrap_or(http::StatusCode::MISDIRECTED_REQUEST);
        e.to_response(unknown)
    }

    /// upstream_response_filter: the site's modules on an origin response,
    /// before the cache stores it.
    pub async fn upstream_response_filter(
        &self,
        resp: &mut Response<ResponseBody>,
    ) -> Result<(), ProxyError> {
        let site = self.site()?;
        for m in site.modules.iter() {
            if let Some(f) = m.upstream_response_filter(self, resp) {
                f.await?;
            }
        }
        Ok(())
    }

    /// Routes the session to site `idx` of its generation.
    pub(super) fn set_site(&mut self, idx: usize) {
        self.site = Some(idx);
    }

    /// The routed site.
    pub fn site(&self) -> Result<&Site, ProxyError> {
        self.site.and_then(|i| self.rt.sites.get(i)).ok_or_else(|| {
            ProxyError::new(
                ErrorKind::Internal,
                ErrorSource::Internal,
                "session without a site",
            )
        })
    }

    /// The request body, taken once; empty afterwards.
    pub fn take_body(&mut self) -> RequestBody {
        self.body.take().unwrap_or_else(RequestBody::empty)
    }

    /// Sends `up` (the session's own request, or one derived from it) to
    /// the site's pool with `body`, recording the origin in the log record.
    pub async fn fetch(
        &mut self,
        up: &UpstreamRequest,
        body: RequestBody,
    ) -> Result<Fetched, ProxyError> {
        let pool = self.site()?.pool.clone();
        let proxy = self.proxy.clone();
        proxy
            .fetch(&pool, up, body, &self.too_large, &mut self.rec)
            .await
    }

    /// Sends the session's own request with its body.
    pub async fn fetch_own(&mut self) -> Result<Fetched, ProxyError> {
        let body = self.take_body();
        let pool = self.site()?.pool.clone();
        let proxy = self.proxy.clone();
        proxy
            .fetch(&pool, &self.up, body, &self.too_large, &mut self.rec)
            .await
    }

    /// The origin's response through the upstream response filters, ready
    /// for the cache or the client.
    pub async fn finish(&self, fetched: Fetched) -> Result<Response<ResponseBody>, ProxyError> {
        let site = self.site()?;
        let mut resp = self
            .proxy
            .finish_response(fetched, &site.pool, false, None)
            .await?;
        self.upstream_response_filter(&mut resp).await?;
        Ok(resp)
    }

    /// A request of this session's that outlives it (a background
    /// revalidation or fill): the same generation, site and client, its own
    /// log record, no body, and no end-of-exchange hooks. It keeps the
    /// plugin exchange of `up`, so what it stores went through the same
    /// upstream response filters as the client's response.
    pub fn subrequest(&self, up: UpstreamRequest) -> Session {
        Session {
            proxy: self.proxy.clone(),
            rt: self.rt.clone(),
            ds: self.ds.clone(),
            site: self.site,
            up,
            client_body: None,
            body: None,
            seq: self.seq,
            too_large: Arc::default(),
            rec: LogRecord::background(),
        }
    }
}
