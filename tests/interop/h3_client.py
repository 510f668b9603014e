#!/usr/bin/env python3
"""An independent HTTP/3 client (aioquic) for Meridian's interop tests.

    h3_client.py --ca CA.pem --connect 127.0.0.1:8443 https://a.test/path

Prints one line: "<negotiated ALPN> <status> <body bytes>" and exits 0,
or prints the error and exits 1.
"""
import argparse
import asyncio
import sys
from urllib.parse import urlparse

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._http = H3Connection(self._quic)
        self._events = {}
        self._waiters = {}

    def quic_event_received(self, event):
        for ev in self._http.handle_event(event):
            if isinstance(ev, (HeadersReceived, DataReceived)):
                self._events.setdefault(ev.stream_id, []).append(ev)
                if ev.stream_ended:
                    waiter = self._waiters.pop(ev.stream_id, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(self._events.pop(ev.stream_id))

    async def request(self, method, authority, path):
        stream_id = self._quic.get_next_available_stream_id()
        headers = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
            (b"user-agent", b"aioquic-interop"),
        ]
        self._http.send_headers(stream_id, headers, end_stream=True)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[stream_id] = waiter
        self.transmit()
        return await asyncio.wait_for(waiter, 15)


async def run(args):
    url = urlparse(args.url)
    host, port = args.connect.rsplit(":", 1)
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    config.load_verify_locations(args.ca)
    config.server_name = url.hostname
    async with connect(host, int(port), configuration=config, create_protocol=H3Client) as client:
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        events = await client.request(args.method, url.netloc, path)
        status = None
        size = 0
        for ev in events:
            if isinstance(ev, HeadersReceived):
                for k, v in ev.headers:
                    if k == b":status":
                        status = int(v)
            elif isinstance(ev, DataReceived):
                size += len(ev.data)
        alpn = client._quic.tls.alpn_negotiated
        print(f"{alpn} {status} {size}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ca", required=True)
    p.add_argument("--connect", required=True, help="host:port to connect to")
    p.add_argument("--method", default="GET")
    p.add_argument("url")
    args = p.parse_args()
    try:
        asyncio.run(asyncio.wait_for(run(args), 30))
    except Exception as e:  # noqa: BLE001 - report any failure to the test
        print(f"error: {type(e).__name__}: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
