//! The proxy as the [`Service`] the client connections (`http`, `http3`)
//! hand their requests to.

use std::future::Future;
use std::sync::Arc;

use http::{Request, Response};

use super::Proxy;
use crate::http::body::{ClientBody, ResponseBody};
use crate::http::{ConnLimits, Downstream, Service};
use crate::metrics::Metrics;

impl Service for Proxy {
    fn handle(
        self: &Arc<Self>,
        req: Request<ClientBody>,
        ds: &Downstream,
    ) -> impl Future<Output = Response<ResponseBody>> + Send {
        Proxy::handle(self, req, ds)
    }

    fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn limits(&self) -> ConnLimits {
        ConnLimits::from_config(&self.runtime().config)
    }
}
