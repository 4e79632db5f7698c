"""A fault-injecting HTTP proxy in front of an S3 endpoint (the moto server), for tests.

Every request is forwarded to the upstream endpoint, except that on a seeded fraction of them
the proxy

- ``slowdown``: answers ``503 SlowDown`` with S3's XML error body (the request never reaches
  the store, as when S3 throttles);
- ``reset``: resets the connection (RST, no response) before forwarding, or, for a GET with a
  body, after sending the headers and half the body (the store has answered; the client sees
  a truncated transfer);
- ``latency``: waits ``latency_s`` before forwarding.

Which requests get a fault is drawn from a hash of (seed, kind, method, target, attempt), so
a run is reproducible whatever the thread interleaving, and a request is faulted at most
``max_consecutive`` times in a row (its next attempt goes through): a client with a retry
budget above that always succeeds. ``counts`` tallies what was injected per kind.

``down()`` stops listening (new connections are refused) and drops requests on open
keep-alive connections; ``up()`` listens on the same port again. ``trip(method, pattern)``
takes the proxy down when a matching request arrives (that request is dropped too), to make
an outage start at a chosen point of a run.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from socketserver import TCPServer, ThreadingMixIn
from urllib.parse import urlsplit

SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message>"
                 b"<RequestId>FAULTPROXY</RequestId><HostId>faultproxy</HostId></Error>")
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "expect", "upgrade"}


@dataclass
class FaultRates:
    """Fraction of requests that get each fault (each drawn independently)."""

    slowdown: float = 0.0
    reset: float = 0.0
    latency: float = 0.0
    latency_s: float = 0.2
    reset_mid: float = 0.5  # share of GET resets that come after half the body, not before
    max_consecutive: int = 2  # a request's attempt number max_consecutive + 1 never faults


@dataclass
class _Trip:
    methods: re.Pattern[str]
    pattern: re.Pattern[str]
    after: int  # go down at the after-th matching request
    seen: int = 0


@dataclass
class _State:
    """Shared between the proxy and its handler threads."""

    upstream: tuple[str, int]
    rates: FaultRates
    seed: int
    counts: Counter[str] = field(default_factory=Counter)
    attempts: Counter[tuple[str, str]] = field(default_factory=Counter)
    streak: Counter[tuple[str, str]] = field(default_factory=Counter)
    trips: list[_Trip] = field(default_factory=list)
    is_down: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    on_trip: Callable[[], None] | None = None  # run (outside the lock) when a trip fires


def _uniform(seed: int, *parts: object) -> float:
    """A reproducible draw in [0, 1) from the seed and the parts."""
    digest = hashlib.sha256("|".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients use it
    state: _State  # set on the subclass made per proxy

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        """Silent: a test run makes thousands of requests."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._proxy()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET  # noqa: N815

    def _proxy(self) -> None:
        body = self._read_body()
        fault = self._decide()
        if fault == "down":
            self._reset()
            return
        if fault == "slowdown":
            self._send(503, [("Content-Type", "application/xml")], SLOWDOWN_BODY)
            return
        if fault == "reset-before":
            self._reset()
            return
        if fault == "latency":
            time.sleep(self.state.rates.latency_s)
        status, headers, payload = self._forward(body)
        if fault == "reset-mid" and len(payload) > 1:
            self._send(status, headers, payload[: len(payload) // 2], declared=len(payload))
            self._reset()
            return
        self._send(status, headers, payload)

    def _decide(self) -> str | None:
        """The fault for this request (None = forward as is), counted under the lock."""
        st, key = self.state, (self.command, self.path)
        fire = None
        with st.lock:
            st.counts["requests"] += 1
            if st.is_down:
                st.counts["dropped_while_down"] += 1
                return "down"
            attempt = st.attempts[key]
            st.attempts[key] += 1
            fault = self._draw(attempt) if st.streak[key] < st.rates.max_consecutive else None
            failed = fault is not None and fault != "latency"
            st.streak[key] = st.streak[key] + 1 if failed else 0
            if not failed:  # trips count requests that would have reached the store
                for trip in st.trips:
                    if trip.methods.fullmatch(self.command) and trip.pattern.search(self.path):
                        trip.seen += 1
                        if trip.seen == trip.after:
                            st.is_down, fire = True, trip
            if fire is None:
                if fault is not None:
                    st.counts[fault.split("-")[0]] += 1
                return fault
            st.trips.remove(fire)
            st.counts["tripped"] += 1
        if st.on_trip is not None:
            st.on_trip()
        return "down"

    def _draw(self, attempt: int) -> str | None:
        rates, seed = self.state.rates, self.state.seed
        where = (self.command, self.path, attempt)
        if _uniform(seed, "slowdown", *where) < rates.slowdown:
            return "slowdown"
        if _uniform(seed, "reset", *where) < rates.reset:
            mid = self.command == "GET" and _uniform(seed, "mid", *where) < rates.reset_mid
            return "reset-mid" if mid else "reset-before"
        if _uniform(seed, "latency", *where) < rates.latency:
            return "latency"
        return None

    def _read_body(self) -> bytes:
        """The request body as received (chunked framing kept, forwarded verbatim)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = bytearray()
            while True:
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, up to the blank line
                        trailer = self.rfile.readline()
                        raw += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return bytes(raw)
                raw += self.rfile.read(size + 2)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        host, port = self.state.upstream
        conn = http.client.HTTPConnection(host, port, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True,
                            skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_HEADERS:
                    conn.putheader(name, value)
            conn.endheaders()
            if body:
                conn.send(body)
            resp = conn.getresponse()
            payload = resp.read()
            headers = [(k, v) for k, v in resp.getheaders()
                       if k.lower() not in HOP_HEADERS | {"transfer-encoding"}]
            return resp.status, headers, payload
        finally:
            conn.close()

    def _send(self, status: int, headers: list[tuple[str, str]], payload: bytes,
              declared: int | None = None) -> None:
        """Status, headers and ``payload``; ``declared`` is the Content-Length to announce
        (more than is sent: a truncated transfer)."""
        self.send_response_only(status)
        has_length = False
        for name, value in headers:
            if name.lower() == "content-length":
                has_length = True
                if self.command != "HEAD":
                    continue
            if name.lower() in ("date", "server"):
                continue
            self.send_header(name, value)
        if self.command != "HEAD" or not has_length:
            self.send_header("Content-Length", str(declared or len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        self.wfile.flush()

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0), no response."""
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close_connection = True
        self.connection.close()


class _Server(ThreadingMixIn, TCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: object, client_address: object) -> None:
        """Broken client connections are the point of this proxy: no tracebacks."""


class FaultProxy:
    """The proxy; ``url`` is its endpoint (``http://127.0.0.1:PORT``).

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, upstream_url: str, rates: FaultRates | None = None, seed: int = 0,
                 port: int = 0):
        parts = urlsplit(upstream_url)
        upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.state = _State(upstream=upstream, rates=rates or FaultRates(), seed=seed)
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def counts(self) -> dict[str, int]:
        """Requests seen and faults injected per kind (slowdown, reset, latency, ...)."""
        with self.state.lock:
            return dict(self.state.counts)

    @property
    def is_down(self) -> bool:
        return self.state.is_down

    def set_rates(self, rates: FaultRates) -> None:
        with self.state.lock:
            self.state.rates = rates

    def start(self) -> FaultProxy:
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._server = _Server(("127.0.0.1", self.port), handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening; open connections see resets from now on."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def down(self) -> None:
        """An outage: connections are refused, and requests on open ones are dropped."""
        with self.state.lock:
            self.state.is_down = True
        self.stop()

    def up(self) -> None:
        """The endpoint is back, on the same port."""
        with self.state.lock:
            self.state.is_down = False
        if self._server is None:
            self.start()

    def trip(self, methods: str, pattern: str, after: int = 1) -> None:
        """Go down when the ``after``-th request whose method matches ``methods`` (a regex,
        e.g. ``PUT|POST``) and whose target matches ``pattern`` arrives, counting only
        requests the faults let through (that request is dropped)."""
        with self.state.lock:
            self.state.trips.append(_Trip(re.compile(methods), re.compile(pattern), after))
        self.state.on_trip = self._stop_soon

    def trip_on_upload(self, prefix: str, after: int = 1) -> None:
        """Go down at the ``after``-th request that completes an upload of an object whose
        path (``/bucket/key``) matches the regex ``prefix``: a plain PUT, or a multipart
        upload's final POST (``?uploadId=``); not its parts (``?partNumber=``), its start
        (``?uploads``), nor reads of the object."""
        self.trip("PUT|POST", rf"^{prefix}[^?]*(\?uploadId=[^&]*)?$", after)

    def _stop_soon(self) -> None:
        threading.Thread(target=self.stop, daemon=True).start()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
