#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/.

Seeds are small real inputs: the examples the unit tests and the demos use,
in each target's input format (documented at the top of each target). The
text targets also take the repository's example files as they are. Run it
again after changing a format; the output is deterministic.
"""

import os
import shutil
import struct
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def copy(target, path):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    shutil.copy(os.path.join(ROOT, path), os.path.join(d, os.path.basename(path)))


# --- storage_codec: head and chunk frames (edge/src/cache/storage/codec.rs)
KEY = b"https://fuzz.test/object"


def meta(status, headers, tags, body_len, generation, chunk_size=0, chunks=0):
    m = struct.pack("<H", status)
    m += (1_700_000_000 * 10**9).to_bytes(16, "little", signed=True)
    m += (1_700_000_001 * 10**9).to_bytes(16, "little", signed=True)
    m += struct.pack("<QQIII", body_len, generation, chunk_size, chunks, len(headers))
    for n, v in headers:
        m += struct.pack("<H", len(n)) + n + struct.pack("<I", len(v)) + v
    m += struct.pack("<H", len(tags))
    for t in tags:
        m += struct.pack("<H", len(t)) + t
    return m


def with_crc(fixed28, payload):
    crc = zlib.crc32(fixed28 + payload) & 0xFFFFFFFF
    return fixed28 + struct.pack("<I", crc) + payload


def head(kind, m, inline):
    fixed = b"MRDH" + bytes([1, kind, 0, 0])
    fixed += struct.pack("<IIQI", len(KEY), len(m), len(inline), 0)
    return with_crc(fixed, KEY + m + inline)


def chunk(generation, index, data):
    fixed = b"MRDC" + bytes([1, 0, 0, 0]) + struct.pack("<QIII", generation, index, len(KEY), len(data))
    return with_crc(fixed, KEY + data)


hdrs = [(b"content-type", b"text/plain"), (b"cache-control", b"max-age=60"), (b"etag", b'"v1"')]
put("storage_codec", "head-whole", head(0, meta(200, hdrs, [b"product-1", b"all"], 5, 7), b"hello"))
put("storage_codec", "head-chunked", head(1, meta(200, hdrs, [], 3000, 8, 1024, 3), b""))
put("storage_codec", "head-empty", head(0, meta(204, [], [], 0, 1), b""))
put("storage_codec", "chunk", chunk(8, 2, b"the last chunk"))

# --- index_replay: index log records after the magic (index.rs)


def record(payload):
    return struct.pack("<II", len(payload), zlib.crc32(payload) & 0xFFFFFFFF) + payload


def insert(key, host, tags, generation=1, chunks=0):
    p = b"\x01" + struct.pack("<QIH", generation, chunks, len(key)) + key
    p += bytes([len(host)]) + host + struct.pack("<H", len(tags))
    for t in tags:
        p += struct.pack("<H", len(t)) + t
    return record(p)


def remove(key):
    return record(b"\x02" + struct.pack("<H", len(key)) + key)


a = insert(b"https://a.test/x", b"a.test", [b"t1", b"t2"], 3, 2)
b = insert(b"https://b.test/y?q=1", b"b.test", [b"t1"])
put("index_replay", "inserts", a + b)
put("index_replay", "insert-remove", a + b + remove(b"https://a.test/x"))
put("index_replay", "torn-tail", a + b[:-3])
put("index_replay", "replace", a + insert(b"https://a.test/x", b"a.test", [b"t3"], 4, 0))

# --- h1_guard: the first byte is the read size; then the client's bytes
for i, reqs in enumerate([
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    b"POST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"
    b"GET /z HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 46\r\n\r\nGET /smuggled HTTP/1.1\r\nContent-Length: 1\r\n\r\nGET /next HTTP/1.1\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 4, 5\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\n",
    b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n",
]):
    put("h1_guard", f"stream-{i}", bytes([i * 5 + 1]) + reqs)

# --- range: u64 representation length, then a Range value
for i, (n, v) in enumerate([
    (10_000, b"bytes=0-99"), (10_000, b"bytes=-500"), (10_000, b"bytes=9500-"),
    (10_000, b"bytes=0-0,-1"), (10_000, b"bytes=500-600,601-999"), (10, b"bytes=20-30"),
    (100, b"bytes= 0-9 , 20-29 ,40-"), (0, b"bytes=0-"), (2**64 - 1, b"bytes=18446744073709551614-"),
    (1000, b"bytes 0-99/1000"),
]):
    put("range", f"range-{i}", struct.pack("<Q", n) + v)

# --- slice: u16 object length, fault count and faults, then a Range value
for i, (n, faults, v) in enumerate([
    (1000, [], b"bytes=0-99"), (1000, [], b"bytes=150-420"), (1000, [], b""),
    (1000, [], b"bytes=-50"), (250, [], b"bytes=990-"), (1000, [(2, b"bytes 0-99/5000")], b"bytes=0-"),
    (1000, [(4, b"")], b"bytes=0-350"), (1000, [(0, b"")], b""), (1000, [(3, b"")], b"bytes=100-"),
    (1000, [(2, b"bytes 0-18446744073709551615/1000")], b"bytes=0-"),
]):
    fb = bytes([len(faults)]) + b"".join(bytes([c, len(a)]) + a for c, a in faults)
    put("slice", f"slice-{i}", struct.pack("<H", n) + fb + v)

# --- h3_request: mode byte, then `name\0value` lines (mode 0) or raw frames (mode 1)


def h3(fields, body=None):
    out = b"\x00" + b"\n".join(n + b"\0" + v for n, v in fields)
    if body is not None:
        out += b"\n\n" + body
    return out


base = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"fuzz.test"), (b":path", b"/")]
put("h3_request", "get", h3(base))
put("h3_request", "get-headers", h3(base + [(b"accept", b"*/*"), (b"range", b"bytes=0-1")]))
put("h3_request", "post", h3([(b":method", b"POST")] + base[1:] + [(b"content-length", b"5")], b"hello"))
put("h3_request", "slice-host", h3(base[:2] + [(b":authority", b"slice.test"), (b":path", b"/o")]))
put("h3_request", "connect", h3([(b":method", b"CONNECT"), (b":authority", b"fuzz.test:443")]))
put("h3_request", "no-path", h3(base[:3]))
put("h3_request", "host-and-authority", h3(base + [(b"host", b"other.test")]))
# Raw: a HEADERS frame with the static-table GET https / (QPACK indexed fields).
put("h3_request", "raw-static", b"\x01" + b"\x01\x08\x00\x00\xd1\xd7\xc1\x50\x01a")
# Raw: found by CI's fuzzing (5 December): a HEADERS frame, then a DATA frame
# header announcing 4 bytes, then the end of the stream. h3 0.0.8 panicked
# (vendor/h3/MERIDIAN-PATCH.md); now it is H3_FRAME_ERROR.
put("h3_request", "truncated-data-frame", b"\x01" + b"\x01\x08\x0b\x00\xd3\xd7\xc1\x50\x01\x65" + b"\x00\x04")

# --- wasm_hostcalls: 44-byte records (u32 opcode, ten i32 arguments)
NUM_IMPORTS = 44


def rec(op, *args):
    args = list(args) + [0] * (10 - len(args))
    return struct.pack("<I10i", op, *args)


prog = b"".join(rec(op, 1024, 16, 2048, 16, 3072, 4096) for op in range(NUM_IMPORTS + 3))
put("wasm_hostcalls", "every-op", prog)
put("wasm_hostcalls", "headers", b"".join(rec(op, 0, 1024, 2048, 0, 0) for op in (7, 8, 10, 12, 13, 9)))
put("wasm_hostcalls", "hostile-alloc", rec(NUM_IMPORTS, 2, 0) + rec(7, 0, 1024, 2048) + rec(4, 0, 0, 8, 1024, 2048))

# --- dns_query: DNS messages (RFC 1035) for the demo's names


def name(n):
    out = b""
    for label in n.rstrip(".").split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def query(qname, qtype, ecs=None, qid=0x1234):
    msg = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 1 if ecs is not None else 0)
    msg += name(qname) + struct.pack(">HH", qtype, 1)
    if ecs is not None:
        fam, prefix, addr = ecs
        nbytes = (prefix + 7) // 8
        opt = struct.pack(">HBB", fam, prefix, 0) + addr[:nbytes]
        rdata = struct.pack(">HH", 8, len(opt)) + opt
        msg += b"\x00" + struct.pack(">HHIH", 41, 1232, 0, len(rdata)) + rdata
    return msg


for i, (q, t, e) in enumerate([
    ("www.demo.meridian.test", 1, None), ("www.demo.meridian.test", 28, (1, 24, bytes([203, 0, 113, 0]))),
    ("www.demo.meridian.test", 1, (2, 56, bytes(16))), ("static.demo.meridian.test", 255, None),
    ("big.demo.meridian.test", 16, None), ("x.wild.demo.meridian.test", 1, None),
    ("alias.demo.meridian.test", 1, None), ("loop1.demo.meridian.test", 1, None),
    ("demo.meridian.test", 6, None), ("nope.example", 1, None),
]):
    put("dns_query", f"query-{i}", query(q, t, e))

# --- text targets: the repository's example files
copy("dns_zone", "dns/examples/demo.meridian.test.zone")
put("dns_zone", "wildcard-and-cut",
    "$ORIGIN demo.meridian.test.\n$TTL 60\n@ IN SOA ns1 h 1 2 3 4 5\n@ IN NS ns1\nns1 IN A 192.0.2.1\n"
    "*.w IN A 192.0.2.2\nsub IN NS ns.sub\nns.sub IN A 192.0.2.3\nc IN CNAME w\n")
copy("dns_geo_csv", "dns/examples/demo-geo.csv")
for f in ("dns/examples/demo.toml", "dns/examples/production.toml"):
    copy("dns_model", f)
    copy("dns_config", f)
for f in ("edge/examples/edge.toml", "edge/examples/minimal.toml"):
    copy("edge_config", f)
