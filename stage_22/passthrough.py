"""The TLS port: which TLS tunnel a user wants, from its ClientHello, and the answer when none.

The HTTP port reads a request's head to find the Host header (routing.py); the TLS port reads the
user's ClientHello to find the server name (sni.py). Nothing is decrypted: the server has no key
for NAME.DOMAIN, the local app has. Bounded as the head is: at most sni.MAX_HELLO bytes, within
the head timeout. The bytes read are handed to the relay unchanged, as the first bytes of the
user's stream, so the local app reads the very ClientHello the user sent.

A user we can't route gets a fatal TLS alert, the one way a TLS client can be told why: its
browser or curl shows "unrecognized name" rather than a bare reset. A peer that is not speaking
TLS at all gets no alert (to it, an alert would be 7 bytes of garbage): the connection is closed.
"""

import asyncio
import contextlib
import socket
from typing import cast

from . import limits, sni
from .protocol import LINGER
from .relay import Stream


class Hello(asyncio.Protocol):
    """The TLS port's first protocol: feeds the parser until it answers, then pauses (as routing.Head does)."""

    def __init__(self) -> None:
        self.parser = sni.Parser()
        self.data = bytearray()
        self.done = asyncio.get_running_loop().create_future()  # answered, or the user left
        self.eof = self.lost = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are no subclasses (see mux.py)

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.parser.feed(data) is not None:
            self._finish()

    def eof_received(self) -> bool:
        self.eof = True
        self._finish()
        return True  # keep our side open: the alert, if any, goes out before the close

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._finish()

    def _finish(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()  # what follows waits in the kernel, for the relay
        if not self.done.done():
            self.done.set_result(None)


async def read_hello(conn: socket.socket, stream: Stream, timeout: float) -> str | sni.Refusal:
    """Read the ClientHello on `conn`, hand the connection to `stream`; the host name it names, or a Refusal.

    Everything read goes to `stream` as the user's first bytes. OSError if the user left first.
    """
    hello = Hello()
    transport = await limits.wrap(conn, lambda: hello, None, timeout)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.shield(hello.done)
    except TimeoutError:
        pass  # judged below
    if hello.lost:
        raise ConnectionResetError("the user left before the end of its ClientHello")
    stream.data_received(bytes(hello.data))
    transport.set_protocol(stream)
    stream.connection_made(transport)
    if hello.eof:
        stream.eof_received()
    if hello.parser.result is not None:
        return hello.parser.result
    why = "the connection ended" if hello.eof else f"{timeout:g}s passed"
    return sni.Refusal(f"{why} before the ClientHello did ({len(hello.data)} bytes came)", None)


async def refuse(stream: Stream, alert: int | None) -> None:
    """Send the user a fatal alert (if any), then close; it returns once the connection is closed."""
    transport = stream.transport
    assert transport is not None
    stream.refusing = True  # what the user sends from now on is read and dropped
    transport.resume_reading()
    if not transport.is_closing():
        if alert is not None:
            transport.write(sni.alert(alert))
        transport.write_eof()  # then wait a moment for its end: a close with unread input would reset the alert
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER):
            await asyncio.shield(stream.ended)
    transport.close()
