//! The response phase: `on_response_headers` in reverse chain order, then
//! the body engine for the body.

use bytes::BytesMut;
use http::{Response, StatusCode, header};
use meridian_wasm_host::{Action, HeaderEdit, HeaderList};

use super::body::{Stage, transform_body};
use super::headers::{apply_edits, header_map, push_headers};
use super::{SharedExchange, Verdict, count, local_response};
use crate::error::{PluginFailure, ProxyError};
use crate::http::body::ResponseBody;

/// Which plugins a response phase runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Origin responses, before the cache stores them.
    Store,
    /// Every response the client gets (plugins with `every_response`).
    Deliver,
}

/// Whether the exchange has plugins for `phase`.
pub fn has_phase(ex: &SharedExchange, phase: Phase) -> bool {
    let ex = ex.lock();
    ex.chain
        .iter()
        .zip(&ex.ctxs)
        .any(|(lp, c)| c.is_some() && lp.every_response == (phase == Phase::Deliver))
}

fn response_header_list(resp: &Response<ResponseBody>) -> HeaderList {
    let mut list: HeaderList = Vec::with_capacity(resp.headers().len() + 1);
    list.push((":status".into(), resp.status().as_str().as_bytes().to_vec()));
    push_headers(&mut list, resp.headers());
    list
}

/// Writes one plugin's response-phase edits back into the response. A
/// whole-map replacement rebuilds the headers from `list` (which holds every
/// plugin's edits so far).
fn apply_response_edits(
    resp: &mut Response<ResponseBody>,
    list: &HeaderList,
    edits: Vec<HeaderEdit>,
) {
    if edits.is_empty() {
        return;
    }
    let mut status = None;
    let mut on_pseudo = |n: &str, v: &[u8]| {
        if n == ":status" {
            status = StatusCode::from_bytes(v).ok();
        }
    };
    if !apply_edits(resp.headers_mut(), edits, &mut on_pseudo) {
        *resp.headers_mut() = header_map(list, &mut on_pseudo);
    }
    if let Some(s) = status {
        *resp.status_mut() = s;
    }
}

/// Runs the response phase of the exchange's plugins for `phase`, in reverse
/// chain order: headers, then (unless skipped) the body, which may be
/// buffered or streamed (see the module docs).
///
/// `Ok` is the response to go on with: `resp` as the plugins left it, or a
/// plugin's own answer. `Err` is a plugin's failure (by its failure policy),
/// or a body that failed before the head could be sent: the caller answers
/// with the error's response instead.
pub async fn response_phase(
    ex: &SharedExchange,
    phase: Phase,
    mut resp: Response<ResponseBody>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let eos = http_body::Body::is_end_stream(resp.body());
    let mut stages: Vec<Stage> = Vec::new();
    {
        let mut guard = ex.lock();
        let ex_ref = &mut *guard;
        let mut list = response_header_list(&resp);
        for idx in (0..ex_ref.chain.len()).rev() {
            let lp = ex_ref.chain[idx].clone();
            if lp.every_response != (phase == Phase::Deliver) {
                continue;
            }
            let Some(ctx) = ex_ref.ctxs[idx].as_mut() else {
                continue;
            };
            let r = ctx.on_response_headers(&mut list, eos);
            apply_response_edits(&mut resp, &list, ctx.take_response_header_edits());
            match r {
                // A pause on the head waits for the body: the head is held anyway.
                Ok(Action::Continue | Action::Pause) => {
                    ex_ref.metrics.plugin_response_continue.inc();
                    stages.push(Stage {
                        idx,
                        buf: BytesMut::new(),
                        active: true,
                    });
                }
                Ok(Action::LocalResponse(lr)) => {
                    count(&ex_ref.metrics, "local-response");
                    let r = local_response(lr);
                    ex_ref.response_headers = response_header_list(&r);
                    return Ok(r);
                }
                Ok(_) => {
                    count(&ex_ref.metrics, "close");
                    return Err(ProxyError::plugin(
                        PluginFailure::ClosedResponse,
                        "response headers",
                    ));
                }
                Err(e) => {
                    ex_ref.ctxs[idx] = None;
                    if let Some(e) = Verdict::of(&ex_ref.metrics, &lp, &e, "on response headers")
                        .error("response headers")
                    {
                        return Err(e);
                    }
                }
            }
        }
        ex_ref.response_headers = list;
        let status = resp.status();
        let encoded = resp
            .headers()
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        if encoded && !stages.is_empty() && !eos {
            count(&ex_ref.metrics, "body-skipped-encoded");
        }
        if stages.is_empty()
            || eos
            || ex_ref.head
            || encoded
            || status.is_informational()
            || matches!(
                status,
                StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED | StatusCode::PARTIAL_CONTENT
            )
        {
            return Ok(resp);
        }
    }
    transform_body(ex.clone(), stages, resp).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use meridian_wasm_host::HeaderEdit;

    #[test]
    fn response_edits_apply_in_place_or_rebuild() {
        let mut resp = Response::new(ResponseBody::empty());
        resp.headers_mut()
            .insert("x-a", HeaderValue::from_static("1"));
        resp.headers_mut()
            .insert("server", HeaderValue::from_static("o"));
        let list = response_header_list(&resp);
        assert_eq!(list[0], (":status".to_string(), b"200".to_vec()));
        apply_response_edits(
            &mut resp,
            &list,
            vec![
                HeaderEdit::Replace(":status".into(), b"203".to_vec()),
                HeaderEdit::Add("x-a".into(), b"2".to_vec()),
                HeaderEdit::Add("bad name".into(), b"x".to_vec()),
                HeaderEdit::Remove("server".into()),
                HeaderEdit::Replace("x-b".into(), b"3".to_vec()),
            ],
        );
        assert_eq!(resp.status(), StatusCode::NON_AUTHORITATIVE_INFORMATION);
        let all: Vec<_> = resp.headers().get_all("x-a").iter().collect();
        assert_eq!(all, ["1", "2"]);
        assert_eq!(resp.headers()["x-b"], "3");
        assert!(!resp.headers().contains_key("server"));
        assert_eq!(resp.headers().len(), 3);
        // A whole-map replacement: the list is the truth.
        let list = vec![
            (":status".to_string(), b"404".to_vec()),
            ("x-only".to_string(), b"1".to_vec()),
            ("bad name".to_string(), b"x".to_vec()),
        ];
        apply_response_edits(
            &mut resp,
            &list,
            vec![HeaderEdit::Remove("x-a".into()), HeaderEdit::ReplaceAll],
        );
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(resp.headers().len(), 1);
        assert_eq!(resp.headers()["x-only"], "1");
    }
}
