//! Tests of the glue, driven through [`crate::testing`].

use serde::Deserialize;

use crate::testing::{Exchange, Outcome};
use crate::{Body, Counter, Flow, LogLevel, Plugin, Request, Response};

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct UpperConfig {
    skip_json: bool,
    limit: Option<usize>,
}

/// Upper-cases response bodies; records the request path in its state.
struct Upper {
    skip_json: bool,
    limit: usize,
    seen: Counter,
}

#[derive(Default)]
struct State {
    path: String,
}

impl Plugin for Upper {
    type Config = UpperConfig;
    type RequestState = State;
    const WANTS_RESPONSE_BODY: bool = true;
    const WANTS_REQUEST_BODY: bool = true;

    fn configure(c: UpperConfig) -> Result<Self, String> {
        Ok(Upper {
            skip_json: c.skip_json,
            limit: c.limit.unwrap_or(1 << 20),
            seen: Counter::define("upper_requests"),
        })
    }

    fn on_request(&self, req: &mut Request, st: &mut State) -> Flow {
        self.seen.increment();
        st.path = req.path();
        if req.path() == "/deny" {
            return Flow::deny(403, "no").with_header("x-why", "test");
        }
        if req.method() != "POST" {
            req.skip_body();
        }
        Flow::Continue
    }

    fn on_request_body(&self, body: &mut Body, _: &mut State) -> Flow {
        let mut v = body.bytes().to_vec();
        v.extend_from_slice(b"!");
        body.replace(v);
        Flow::Continue
    }

    fn on_response(&self, resp: &mut Response, st: &mut State) -> Flow {
        resp.set_header("x-path", &st.path);
        if self.skip_json && resp.content_type().as_deref() == Some("application/json") {
            resp.skip_body();
        }
        Flow::Continue
    }

    fn on_response_body(&self, body: &mut Body, _: &mut State) -> Flow {
        if body.bytes() == b"fail" {
            return Flow::deny(500, "failed");
        }
        let upper = body.bytes().to_ascii_uppercase();
        body.replace(upper);
        Flow::Continue
    }

    fn max_body_bytes(&self) -> usize {
        self.limit
    }
}

#[test]
fn body_is_buffered_then_rewritten() {
    let mut ex = Exchange::<Upper>::configure("").unwrap().get("/a?b=c");
    assert_eq!(ex.send_request_headers(), Outcome::Continue);
    let out = ex.send_response_headers(
        200,
        &[("content-type", "text/plain"), ("content-length", "11")],
    );
    assert_eq!(out, Outcome::Continue);
    assert_eq!(ex.response_header("content-length"), None);
    assert_eq!(ex.response_header("x-path").as_deref(), Some("/a?b=c"));
    let (out, body) = ex.send_response_body(&["hello ", "world"]);
    assert_eq!(out, Outcome::Continue);
    assert_eq!(body, b"HELLO WORLD");
    assert_eq!(ex.metric("upper_requests"), Some(1));
}

#[test]
fn non_final_chunks_pause() {
    let mut ex = Exchange::<Upper>::configure("").unwrap();
    ex.send_request_headers();
    ex.send_response_headers(200, &[]);
    // Drive the glue by hand: non-final chunks pause, nothing is sent.
    crate::sys::with_fake(|h| h.response_body = b"ab".to_vec());
    assert_eq!(ex.http_response_body(2, false), Outcome::Pause);
    crate::sys::with_fake(|h| h.response_body = b"abcd".to_vec());
    assert_eq!(ex.http_response_body(4, false), Outcome::Pause);
    crate::sys::with_fake(|h| h.response_body = b"abcdef".to_vec());
    assert_eq!(ex.http_response_body(6, true), Outcome::Continue);
    assert_eq!(
        crate::sys::with_fake(|h| h.response_body.clone()),
        b"ABCDEF"
    );
}

#[test]
fn skipped_body_streams_and_keeps_content_length() {
    let mut ex = Exchange::<Upper>::configure(r#"{"skip_json": true}"#).unwrap();
    ex.send_request_headers();
    ex.send_response_headers(
        200,
        &[
            ("content-type", "application/json"),
            ("content-length", "4"),
        ],
    );
    assert_eq!(ex.response_header("content-length").as_deref(), Some("4"));
    let (out, body) = ex.send_response_body(&["ab", "cd"]);
    assert_eq!(out, Outcome::Continue);
    assert_eq!(body, b"abcd");
}

#[test]
fn oversized_body_passes_through() {
    let mut ex = Exchange::<Upper>::configure(r#"{"limit": 3}"#).unwrap();
    ex.send_request_headers();
    ex.send_response_headers(200, &[]);
    let (out, body) = ex.send_response_body(&["ab", "cd", "ef"]);
    assert_eq!(out, Outcome::Continue);
    assert_eq!(body, b"abcdef");
    assert!(
        ex.logs()
            .iter()
            .any(|(l, m)| *l == LogLevel::Warn && m.contains("over 3 bytes"))
    );
}

#[test]
fn headers_only_response_does_not_buffer() {
    let mut ex = Exchange::<Upper>::configure("").unwrap();
    ex.send_request_headers();
    ex.send_response_headers_only(204, &[("content-length", "0")]);
    assert_eq!(ex.response_header("content-length").as_deref(), Some("0"));
}

#[test]
fn local_response_from_request_phase() {
    let mut ex = Exchange::<Upper>::configure("").unwrap().get("/deny");
    let out = ex.send_request_headers();
    assert_eq!(out.status(), Some(403));
    assert_eq!(out.header("x-why"), Some("test"));
    assert_eq!(out.body_text().as_deref(), Some("no\n"));
    // Later hooks are skipped.
    assert_eq!(ex.send_response_headers(403, &[]), Outcome::Continue);
    assert_eq!(ex.response_header("x-path"), None);
}

#[test]
fn local_response_from_body_phase() {
    let mut ex = Exchange::<Upper>::configure("").unwrap();
    ex.send_request_headers();
    ex.send_response_headers(200, &[]);
    let (out, _) = ex.send_response_body(&["fa", "il"]);
    assert_eq!(out.status(), Some(500));
}

#[test]
fn request_body_hook() {
    let mut ex = Exchange::<Upper>::configure("")
        .unwrap()
        .method("POST")
        .header("content-length", "3");
    assert_eq!(ex.send_request_headers_with_body(), Outcome::Continue);
    assert_eq!(ex.request_header("content-length"), None);
    let (out, body) = ex.send_request_body(&["a", "bc"]);
    assert_eq!(out, Outcome::Continue);
    assert_eq!(body, b"abc!");

    // GET: skip_body() keeps it streaming.
    let mut ex = Exchange::<Upper>::configure("")
        .unwrap()
        .header("content-length", "3");
    ex.send_request_headers_with_body();
    assert_eq!(ex.request_header("content-length").as_deref(), Some("3"));
    assert_eq!(ex.send_request_body(&["a", "bc"]).1, b"abc");
}

#[test]
fn bad_config_is_rejected_and_logged() {
    let e = Exchange::<Upper>::configure(r#"{"nope": 1}"#).unwrap_err();
    assert!(e.contains("unknown field `nope`"), "{e}");
    let e = Exchange::<Upper>::configure("{").unwrap_err();
    assert!(e.contains("invalid plugin configuration"), "{e}");
}

#[test]
fn request_view() {
    struct Probe;
    #[derive(Default)]
    struct Seen(Vec<String>);
    impl Plugin for Probe {
        type Config = ();
        type RequestState = Seen;
        fn configure(_: ()) -> Result<Self, String> {
            Ok(Probe)
        }
        fn on_request(&self, req: &mut Request, seen: &mut Seen) -> Flow {
            seen.0 = vec![
                req.method(),
                req.path(),
                req.path_only(),
                req.query().unwrap_or_default(),
                req.query_param("q").unwrap_or_default(),
                req.host(),
                req.authority(),
                req.scheme(),
                req.client_address().unwrap_or_default(),
                req.client_ip().map(|i| i.to_string()).unwrap_or_default(),
                req.client_country().unwrap_or_default(),
                req.header_values("x-multi").join(","),
            ];
            req.remove_header("x-multi");
            req.add_header("x-added", "1");
            req.add_header("x-added", "2");
            req.set_path("/new");
            Flow::Continue
        }
    }
    let mut ex = Exchange::<Probe>::configure("")
        .unwrap()
        .method("HEAD")
        .get("/p/q?q=a%20b&r")
        .authority("www.example.com:8443")
        .header("X-Multi", "1")
        .header("x-multi", "2")
        .client_address("192.0.2.1:5555")
        .country("de");
    ex.send_request_headers();
    assert_eq!(
        ex.state().0,
        [
            "HEAD",
            "/p/q?q=a%20b&r",
            "/p/q",
            "q=a%20b&r",
            "a b",
            "www.example.com",
            "www.example.com:8443",
            "https",
            "192.0.2.1:5555",
            "192.0.2.1",
            "DE",
            "1,2"
        ]
    );
    assert!(ex.request_header_values("x-multi").is_empty());
    assert_eq!(ex.request_header_values("x-added"), ["1", "2"]);
    assert_eq!(ex.request_header(":path").as_deref(), Some("/new"));
}

#[test]
fn flow_helpers() {
    let Flow::Respond(r) = Flow::redirect(302, "https://x.example/") else {
        panic!("not a response");
    };
    assert_eq!(r.status, 302);
    assert!(
        r.headers
            .contains(&("location".into(), "https://x.example/".into()))
    );
    let Flow::Respond(r) = Flow::respond(418, [("a", "b")], "tea") else {
        panic!("not a response");
    };
    assert_eq!((r.status, r.body), (418, b"tea".to_vec()));
    assert_eq!(Flow::Continue.with_header("a", "b"), Flow::Continue);
}
