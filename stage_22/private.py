"""The client's side of one user: the private connection to the local app, joined to a stream.

    user --> server --> a stream in the tunnel connection --> client --> private connection --> local app

The client runs `serve_user` once per stream the server opens (a SYN frame), each in a task of
its own, so that a slow local app never holds up the others.
"""

import asyncio
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import Callable

from .protocol import DATA_LIMIT, NETWORK_TIMEOUT, TunnelError
from .relay import Stream

log = logging.getLogger(f"{__package__}.client")

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class LocalAppDown(TunnelError):
    """The local app refused or did not answer; the message says which, for the user's error page."""


async def dial(host: str, port: int, tls: ssl.SSLContext, limit: int = DATA_LIMIT) -> Streams:
    """Connect inside TLS, with a deadline; OSError (TimeoutError, ssl.SSLError included) if that fails."""
    # A host behind a firewall that drops packets would otherwise keep us waiting for minutes.
    async with asyncio.timeout(NETWORK_TIMEOUT):
        # server_hostname: the name the certificate must hold, checked by the TLS handshake.
        return await asyncio.open_connection(host, port, limit=limit, ssl=tls, server_hostname=host)


class LocalApp:
    """The local app as the user named it (`localhost:8000`), and the address that last worked for it.

    A name costs a lookup per connection: `localhost` means a trip to a worker thread for
    getaddrinfo, and maybe a refused try at ::1 before 127.0.0.1. Every user pays that
    again, so we dial the address that worked last time and look the name up only when
    we have none, or when it stops working (the app restarted on another address).
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.address: tuple[str, int] | None = None

    async def connect(self, protocol: Callable[[], Stream]) -> None:
        """Connect to the local app with `protocol` on the connection; LocalAppDown if it can't be reached."""
        loop = asyncio.get_running_loop()
        if self.address is not None:
            try:
                await loop.connect_accepted_socket(protocol, await open_socket(self.address))
                return
            except OSError:
                self.address = None  # it moved, or it is down: the name will tell
        try:
            # A host behind a firewall that drops packets would otherwise keep us waiting for minutes.
            async with asyncio.timeout(NETWORK_TIMEOUT):
                transport, _ = await loop.create_connection(protocol, self.host, self.port)
        except OSError as exc:
            raise LocalAppDown(f"{why(exc)} at {self.host}:{self.port}") from None
        self.address = transport.get_extra_info("peername")[:2]


async def open_socket(address: tuple[str, int]) -> socket.socket:
    """A TCP connection to `address` (an IP address); OSError if it fails or takes over NETWORK_TIMEOUT.

    WHY not create_connection (stage 22): to an app on this machine, a connect is complete before
    connect() returns (the kernel answers the SYN at once), yet asyncio waits for the socket to turn
    writable anyway: one more turn of the loop, two epoll_ctl calls and a timer per user. Here
    getpeername() says whether the connection is there; only if not does the loop wait for it.
    """
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    # IPPROTO_TCP named: asyncio turns Nagle off only on sockets made so (see limits.Listener.serve).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setblocking(False)
        try:
            sock.connect(address)
        except BlockingIOError:
            try:
                sock.getpeername()
            except OSError:  # not yet (an app on another machine): the loop waits for it
                async with asyncio.timeout(NETWORK_TIMEOUT):
                    await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_user(stream: Stream, local: LocalApp) -> None:
    """Join one stream the server opened to a new private connection, until both are done.

    If the local app can't be reached, the stream is reset with the reason: the server shows
    its user a 502 page naming it, at once.
    """
    started = time.monotonic()
    try:
        await local.connect(lambda: stream)  # Stream.connection_made accepts the stream (ACK)
    except LocalAppDown as exc:
        log.warning("stream %d: cannot reach the local app (%s); resetting it", stream.stream_id, exc)
        stream.reset(f"the tunnel client could not reach its local app: {exc}")
        return
    await stream.closed
    elapsed = time.monotonic() - started
    ended = stream.expired or stream.reset_reason
    log.info(
        "stream %d: closed, %d bytes in, %d bytes out, %.3fs%s",
        stream.stream_id,
        stream.received.copied,
        stream.sent.copied,
        elapsed,
        f" (closed: {ended})" if ended else "",
    )


def why(exc: OSError) -> str:
    """A short reason for a failed connect, e.g. 'connection refused'."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    # asyncio wraps the reason ("[Errno 111] Connect call failed ..."), once per address tried.
    codes = {exc.errno} if exc.errno else {int(code) for code in re.findall(r"\[Errno (\d+)\]", str(exc))}
    return os.strerror(codes.pop()).lower() if len(codes) == 1 else str(exc)
