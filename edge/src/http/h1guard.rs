//! A passive observer of the HTTP/1.1 byte stream a client sends.
//!
//! hyper parses requests; this module only watches the same bytes to find
//! where each request head starts and ends, so the edge can
//! - refuse request-smuggling ambiguity (Content-Length together with
//!   Transfer-Encoding) with 400, where hyper would silently prefer chunked;
//! - answer 408 to a client that starts a request head and does not finish it.
//!
//! It follows message framing (Content-Length and chunked bodies) to stay in
//! step across keep-alive requests, and steps aside (`Passthrough`) on
//! anything it cannot follow: an upgrade, CONNECT, an HTTP/2 preface, or a
//! malformed head (which hyper itself rejects). It never changes a byte.

/// Why a request head was flagged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    /// Both Content-Length and Transfer-Encoding.
    ContentLengthWithTransferEncoding,
    /// Several Content-Length fields that disagree.
    ConflictingContentLength,
}

impl Flag {
    pub fn reason(self) -> &'static str {
        match self {
            Flag::ContentLengthWithTransferEncoding => "content-length-with-transfer-encoding",
            Flag::ConflictingContentLength => "conflicting-content-length",
        }
    }
}

#[derive(Debug)]
enum State {
    Head,
    Length(u64),
    Chunk(ChunkState),
    Passthrough,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the chunk-size line; `bool` is whether a digit was seen.
    Size {
        digits: bool,
        size: u64,
        in_ext: bool,
        len: usize,
    },
    SizeLf {
        size: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// Reading trailer lines; `len` is the length of the current line.
    Trailer {
        len: usize,
    },
    TrailerLf {
        len: usize,
    },
}

const MAX_CHUNK_LINE: usize = 4096;

/// The observer. Feed it every byte the client sends, in order.
#[derive(Debug)]
pub struct H1Guard {
    state: State,
    head: Vec<u8>,
    max_head: usize,
    max_headers: usize,
    heads: u64,
}

/// What one call to [`H1Guard::feed`] saw.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// Heads completed, as (sequence number, flag if any).
    pub flagged: Vec<(u64, Flag)>,
}

impl H1Guard {
    pub fn new(max_head: usize, max_headers: usize) -> Self {
        Self {
            state: State::Head,
            head: Vec::new(),
            max_head,
            max_headers,
            heads: 0,
        }
    }

    /// Whether a request head has started but not finished.
    pub fn in_partial_head(&self) -> bool {
        matches!(self.state, State::Head) && !self.head.is_empty()
    }

    /// Whether the observer has stepped aside for good.
    pub fn is_passthrough(&self) -> bool {
        matches!(self.state, State::Passthrough)
    }

    /// Number of request heads completed so far.
    pub fn heads(&self) -> u64 {
        self.heads
    }

    pub fn feed(&mut self, mut data: &[u8], seen: &mut Seen) {
        while !data.is_empty() {
            match &mut self.state {
                State::Passthrough => return,
                State::Head => {
                    if self.head.is_empty() {
                        // RFC 9112 §2.2: empty lines before a request line are ignored.
                        let skip = data
                            .iter()
                            .take_while(|&&b| b == b'\r' || b == b'\n')
                            .count();
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                    }
                    // Fast path: a whole head in this read, nothing buffered: parse in place.
                    if self.head.is_empty()
                        && let Some(end) = find_end(data)
                        && end <= self.max_head
                    {
                        let (head, rest) = data.split_at(end);
                        self.finish_head_from(head, seen);
                        data = rest;
                        continue;
                    }
                    let from = self.head.len().saturating_sub(3);
                    let room = (self.max_head + 4).saturating_sub(self.head.len());
                    let take = data.len().min(room.max(1));
                    self.head.extend_from_slice(&data[..take]);
                    if let Some(end) = find_end(&self.head[from..]).map(|e| e + from) {
                        let rest_in_head = self.head.len() - end;
                        // Bytes past the head's end belong to the body: hand them back.
                        let consumed = take - rest_in_head;
                        data = &data[consumed..];
                        self.head.truncate(end);
                        self.finish_head(seen);
                    } else if self.head.len() > self.max_head {
                        // hyper answers 431; nothing more to follow.
                        self.state = State::Passthrough;
                        self.head = Vec::new();
                        return;
                    } else {
                        data = &data[take..];
                    }
                }
                State::Length(n) => {
                    let take = (*n).min(data.len() as u64);
                    *n -= take;
                    data = &data[take as usize..];
                    if *n == 0 {
                        self.state = State::Head;
                    }
                }
                State::Chunk(cs) => {
                    let (next, used) = step_chunk(*cs, data);
                    data = &data[used..];
                    match next {
                        Some(Some(cs)) => self.state = State::Chunk(cs),
                        Some(None) => self.state = State::Head,
                        None => {
                            self.state = State::Passthrough;
                            return;
                        }
                    }
                }
            }
        }
    }

    fn finish_head(&mut self, seen: &mut Seen) {
        let head = std::mem::take(&mut self.head);
        self.finish_head_from(&head, seen);
        // Keep the buffer's capacity for the next head.
        self.head = head;
        self.head.clear();
    }

    fn finish_head_from(&mut self, head: &[u8], seen: &mut Seen) {
        let seq = self.heads;
        self.heads += 1;
        let mut stack = [httparse::EMPTY_HEADER; 128];
        let mut heap = Vec::new();
        let headers: &mut [httparse::Header<'_>] = if self.max_headers <= stack.len() {
            &mut stack[..self.max_headers]
        } else {
            heap.resize(self.max_headers, httparse::EMPTY_HEADER);
            &mut heap
        };
        let mut req = httparse::Request::new(headers);
        let parsed = req.parse(head);
        let next = match parsed {
            Ok(httparse::Status::Complete(_)) => {
                if req.method == Some("PRI") || req.method == Some("CONNECT") {
                    State::Passthrough
                } else {
                    let (state, flag) = framing(req.headers);
                    if let Some(f) = flag {
                        seen.flagged.push((seq, f));
                    }
                    state
                }
            }
            // Malformed, too many headers, or partial: hyper decides.
            _ => State::Passthrough,
        };
        self.state = next;
    }
}

fn find_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Decides how the body after a head is framed, and whether the head is ambiguous.
fn framing(headers: &[httparse::Header<'_>]) -> (State, Option<Flag>) {
    let mut cl: Option<u64> = None;
    let mut cl_conflict = false;
    let mut cl_invalid = false;
    let mut te: Option<&[u8]> = None;
    let mut upgrade = false;
    let mut conn_upgrade = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            for part in h.value.split(|&b| b == b',') {
                match std::str::from_utf8(part)
                    .ok()
                    .map(str::trim)
                    .and_then(|s| s.parse::<u64>().ok())
                {
                    Some(v) => match cl {
                        Some(prev) if prev != v => cl_conflict = true,
                        _ => cl = Some(v),
                    },
                    None => cl_invalid = true,
                }
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            conn_upgrade |= h
                .value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
        }
    }
    if let Some(te) = te {
        if cl.is_some() || cl_invalid {
            return (
                State::Passthrough,
                Some(Flag::ContentLengthWithTransferEncoding),
            );
        }
        let last = te.rsplit(|&b| b == b',').next().map(<[u8]>::trim_ascii);
        return if last.is_some_and(|l| l.eq_ignore_ascii_case(b"chunked")) {
            (
                State::Chunk(ChunkState::Size {
                    digits: false,
                    size: 0,
                    in_ext: false,
                    len: 0,
                }),
                None,
            )
        } else {
            (State::Passthrough, None)
        };
    }
    if cl_conflict {
        return (State::Passthrough, Some(Flag::ConflictingContentLength));
    }
    if cl_invalid || (upgrade && conn_upgrade) {
        return (State::Passthrough, None);
    }
    match cl {
        Some(n) if n > 0 => (State::Length(n), None),
        _ => (State::Head, None),
    }
}

/// Advances the chunked-body state machine over `data`.
/// Returns (Some(Some(state)) to continue | Some(None) when the body ended |
/// None when the framing is broken, bytes used).
fn step_chunk(mut cs: ChunkState, data: &[u8]) -> (Option<Option<ChunkState>>, usize) {
    let mut i = 0;
    while i < data.len() {
        let b = data[i];
        cs = match cs {
            ChunkState::Size {
                digits,
                size,
                in_ext,
                len,
            } => {
                if len > MAX_CHUNK_LINE {
                    return (None, i);
                }
                match b {
                    b'\r' => ChunkState::SizeLf { size },
                    b'\n' if digits => return_after_size(size),
                    _ if in_ext => ChunkState::Size {
                        digits,
                        size,
                        in_ext,
                        len: len + 1,
                    },
                    b';' | b' ' | b'\t' if digits => ChunkState::Size {
                        digits,
                        size,
                        in_ext: true,
                        len: len + 1,
                    },
                    _ => match (b as char).to_digit(16) {
                        Some(d) => match size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(u64::from(d)))
                        {
                            Some(size) => ChunkState::Size {
                                digits: true,
                                size,
                                in_ext,
                                len: len + 1,
                            },
                            None => return (None, i),
                        },
                        None => return (None, i),
                    },
                }
            }
            ChunkState::SizeLf { size } => {
                if b != b'\n' {
                    return (None, i);
                }
                return_after_size(size)
            }
            ChunkState::Data(n) => {
                let take = n.min((data.len() - i) as u64);
                i += take as usize;
                let left = n - take;
                cs = if left == 0 {
                    ChunkState::DataCr
                } else {
                    ChunkState::Data(left)
                };
                continue;
            }
            ChunkState::DataCr => match b {
                b'\r' => ChunkState::DataLf,
                b'\n' => ChunkState::Size {
                    digits: false,
                    size: 0,
                    in_ext: false,
                    len: 0,
                },
                _ => return (None, i),
            },
            ChunkState::DataLf => {
                if b != b'\n' {
                    return (None, i);
                }
                ChunkState::Size {
                    digits: false,
                    size: 0,
                    in_ext: false,
                    len: 0,
                }
            }
            ChunkState::Trailer { len } => match b {
                b'\r' => ChunkState::TrailerLf { len },
                b'\n' if len == 0 => return (Some(None), i + 1),
                b'\n' => ChunkState::Trailer { len: 0 },
                _ if len > MAX_CHUNK_LINE => return (None, i),
                _ => ChunkState::Trailer { len: len + 1 },
            },
            ChunkState::TrailerLf { len } => {
                if b != b'\n' {
                    return (None, i);
                }
                if len == 0 {
                    return (Some(None), i + 1);
                }
                ChunkState::Trailer { len: 0 }
            }
        };
        i += 1;
    }
    (Some(Some(cs)), i)
}

fn return_after_size(size: u64) -> ChunkState {
    if size == 0 {
        ChunkState::Trailer { len: 0 }
    } else {
        ChunkState::Data(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> (H1Guard, Seen) {
        let mut g = H1Guard::new(8192, 64);
        let mut seen = Seen::default();
        for c in chunks {
            g.feed(c, &mut seen);
        }
        (g, seen)
    }

    #[test]
    fn counts_keepalive_requests_with_bodies() {
        let reqs = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloPOST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET /z HTTP/1.1\r\nHost: a\r\n\r\n";
        let (g, seen) = run(&[reqs]);
        assert_eq!(g.heads(), 4);
        assert!(seen.flagged.is_empty());
        assert!(!g.in_partial_head());
        // Byte at a time gives the same result.
        let mut g2 = H1Guard::new(8192, 64);
        let mut seen2 = Seen::default();
        for b in reqs.iter() {
            g2.feed(std::slice::from_ref(b), &mut seen2);
        }
        assert_eq!(g2.heads(), 4);
        assert!(seen2.flagged.is_empty());
    }

    #[test]
    fn body_bytes_that_look_like_heads_are_not_heads() {
        let reqs = b"POST / HTTP/1.1\r\nContent-Length: 46\r\n\r\nGET /smuggled HTTP/1.1\r\nContent-Length: 1\r\n\r\nGET /next HTTP/1.1\r\n\r\n";
        let (g, seen) = run(&[reqs]);
        assert_eq!(g.heads(), 2);
        assert!(seen.flagged.is_empty());
    }

    #[test]
    fn flags_cl_with_te() {
        let (g, seen) = run(&[b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"]);
        assert_eq!(
            seen.flagged,
            vec![(1, Flag::ContentLengthWithTransferEncoding)]
        );
        assert!(g.is_passthrough());
    }

    #[test]
    fn flags_conflicting_lengths() {
        let (_, seen) =
            run(&[b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n"]);
        assert_eq!(seen.flagged, vec![(0, Flag::ConflictingContentLength)]);
        let (_, seen) = run(&[b"POST / HTTP/1.1\r\nContent-Length: 4, 5\r\n\r\n"]);
        assert_eq!(seen.flagged, vec![(0, Flag::ConflictingContentLength)]);
        let (g, seen) =
            run(&[b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd"]);
        assert!(seen.flagged.is_empty());
        assert_eq!(g.heads(), 1);
        assert!(!g.in_partial_head());
    }

    #[test]
    fn partial_head_is_visible() {
        let (g, _) = run(&[b"GET / HTTP/1.1\r\nHost: a\r\n"]);
        assert!(g.in_partial_head());
        let (g, _) = run(&[b"\r\n\r\n"]);
        assert!(!g.in_partial_head());
    }

    #[test]
    fn steps_aside_for_upgrades_and_h2() {
        let (g, _) = run(&[
            b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
        ]);
        assert!(g.is_passthrough());
        let (g, _) = run(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]);
        assert!(g.is_passthrough());
    }

    #[test]
    fn oversized_head_steps_aside() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 10_000));
        let (g, _) = run(&[&big]);
        assert!(g.is_passthrough());
    }

    #[test]
    fn broken_chunk_framing_steps_aside() {
        let (g, _) = run(&[b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"]);
        assert!(g.is_passthrough());
        let (g, _) = run(&[
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\n",
        ]);
        assert!(g.is_passthrough());
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(data in proptest::collection::vec(proptest::num::u8::ANY, 0..2048), cut in 0usize..2048) {
            let mut g = H1Guard::new(1024, 16);
            let mut seen = Seen::default();
            let cut = cut.min(data.len());
            g.feed(&data[..cut], &mut seen);
            g.feed(&data[cut..], &mut seen);
        }

        #[test]
        fn split_points_do_not_change_the_outcome(cut in 0usize..200, body in "[a-z]{1,40}") {
            let msg = format!("POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n{}POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\nGET /c HTTP/1.1\r\n\r\n", body.len(), body, body.len(), body);
            let bytes = msg.as_bytes();
            let cut = cut.min(bytes.len());
            let mut g = H1Guard::new(8192, 16);
            let mut seen = Seen::default();
            g.feed(&bytes[..cut], &mut seen);
            g.feed(&bytes[cut..], &mut seen);
            proptest::prop_assert_eq!(g.heads(), 3);
            proptest::prop_assert!(!g.in_partial_head());
        }
    }
}
