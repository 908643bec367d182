"""Which tunnel an HTTP user wants: the Host header of its request.

Stage 14's public port belonged to one client. Now one public port serves every HTTP tunnel, as
ngrok's does: a browser that opens `http://myapp.localhost:60624/` sends `Host:
myapp.localhost:60624` in its request, and the server opens the user's stream on the client that
holds the name `myapp`. So before relaying a single byte, the server reads the request's head:
its first line and headers, up to the blank line.

That read is where a server is easiest to attack, so it is bounded both ways: at most MAX_HEAD
bytes (a head that never ends must not fill our memory) and HEAD_TIMEOUT seconds (a user who
sends one byte a minute must not hold a connection forever). Once the head is in, the bytes read
so far are handed to the relay unchanged, as the first bytes of the user's stream: the local app
sees what the user sent, each head with the server's X-Forwarded-* lines (forwarding.py, which
also reads every later request of a kept-alive connection).
"""

import asyncio
import re
import socket
import ssl
from typing import cast

from . import limits
from .relay import Stream

# nginx allows 4 headers of 8 KiB by default; real requests are well below 16 KiB.
MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 10.0
# "GET /path HTTP/1.1": what a request's first line must look like.
REQUEST_LINE = re.compile(rb"[A-Z]{1,20} \S+ HTTP/\d\.\d")
# The start of one, before its first line is complete ("GE", "GET /pa").
REQUEST_START = re.compile(rb"[A-Z]{1,20}(?: |$)")
# A host name: labels of letters, digits and hyphens, separated by dots.
HOST_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")


class BadRequest(Exception):
    """The user's request can't be routed: `status` is the page to answer with, `cause` says why, `headers` more."""

    def __init__(self, status: int, cause: str, headers: str = "") -> None:
        super().__init__(cause)
        self.status, self.cause, self.headers = status, cause, headers


class Head(asyncio.Protocol):
    """The public connection's first protocol: collects bytes until the head is complete, then pauses."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.done = asyncio.get_running_loop().create_future()  # the head ended, or can't be one
        self.eof = False
        self.lost = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are no subclasses (see mux.py)

    def data_received(self, data: bytes) -> None:
        self.data += data
        if b"\r\n\r\n" in self.data or len(self.data) > MAX_HEAD or not could_be_request(self.data):
            self._finish()

    def eof_received(self) -> bool:
        self.eof = True  # the user may half-close after its request and still wait for the answer
        self._finish()
        return self.transport is not None and self.transport.can_write_eof()  # TLS: no half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._finish()

    def _finish(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()  # what follows the head waits in the kernel, for the relay
        if not self.done.done():
            self.done.set_result(None)


async def read_head(
    conn: socket.socket, stream: Stream, tls: ssl.SSLContext | None, timeout: float
) -> tuple[bytes, bool]:
    """Read the head of the request on `conn`, then hand the connection to `stream`.

    Everything read goes to `stream` as the user's first bytes. Returns those bytes, and whether
    the reading ended (False: time ran out); `check` then says if they hold a head. OSError if the
    user left before. With `tls` (HTTPS), a TLS handshake comes first: OSError too if it fails or
    does not finish within `timeout`.
    """
    head = Head()
    transport = await limits.wrap(conn, lambda: head, tls, timeout)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.shield(head.done)  # shielded: a timeout must not mark it done (cancelled)
    except TimeoutError:
        pass  # judged below, with what did arrive
    if head.lost:
        raise ConnectionResetError("the user left before the end of the request's head")
    # The relay takes over: it gets what was read, then the connection itself.
    stream.data_received(bytes(head.data))
    transport.set_protocol(stream)
    stream.connection_made(transport)
    if head.eof:
        stream.eof_received()
    return bytes(head.data), head.done.done()


def check(data: bytes, ended: bool) -> bytes:
    """The head in `data`; BadRequest if there is none (`ended`: no more bytes were coming)."""
    end = data.find(b"\r\n\r\n")
    if not could_be_request(data):
        raise BadRequest(400, "this is an HTTP port, and that was not an HTTP request")
    if (end < 0 and len(data) > MAX_HEAD) or end + 4 > MAX_HEAD:  # unfinished, or finished too late
        raise BadRequest(431, f"the request's head is longer than {MAX_HEAD} bytes")
    if end < 0:
        raise BadRequest(400 if ended else 408, "the request's head never ended")
    return data[: end + 4]


def could_be_request(data: bytes | bytearray) -> bool:
    """False as soon as `data` can't be the start of an HTTP request (a TLS hello, ssh, garbage)."""
    line, newline, _ = data.partition(b"\n")
    if newline:
        return REQUEST_LINE.fullmatch(line.removesuffix(b"\r")) is not None
    return REQUEST_START.match(data) is not None


def tunnel_name(head: bytes, domain: str) -> str:
    """The name of the tunnel the request is for: `myapp` in `Host: myapp.<domain>:60624`; else BadRequest."""
    hosts = [value for name, value in headers(head) if name.lower() == b"host"]
    if len(hosts) != 1:
        raise BadRequest(400, "the request has no Host header" if not hosts else "the request has two Host headers")
    try:
        host = hosts[0].decode("ascii").strip().lower()
    except UnicodeDecodeError:
        raise BadRequest(400, "the Host header is not ASCII") from None
    name, colon, port = host.partition(":")  # an IPv6 literal ("[::1]:80") names no tunnel: a 400 below
    name = name.removesuffix(".")  # "myapp.localhost." is the same host
    if (colon and not port.isdigit()) or not HOST_NAME.fullmatch(name):
        raise BadRequest(400, f"the Host header is malformed: {host[:100]!r}")
    label, dot, rest = name.partition(".")
    if not dot or rest != domain:
        raise BadRequest(404, f"this server has no tunnels for {name}; its tunnels are NAME.{domain}")
    return label


def headers(head: bytes) -> list[tuple[bytes, bytes]]:
    """The (name, value) pairs of a request head's header lines."""
    lines = head.split(b"\r\n")[1:]  # after the request line
    return [(name.strip(), value) for name, colon, value in (line.partition(b":") for line in lines) if colon]
