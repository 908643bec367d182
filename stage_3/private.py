"""The client's side of one user: the private connection to the local app, joined to a proxy connection.

    user --> server --> proxy connection --> client --> private connection --> local app

The client runs `serve_user` once per `create_proxy <id>`, each in a task of its own, so that a
slow user never holds up the others. Neither connection depends on the control connection:
a user stays connected while the client reconnects its control connection.
"""

import asyncio
import logging
import os
import re
import time

from .protocol import NETWORK_TIMEOUT, Proxy, TunnelError, encode
from .relay import Half, join

log = logging.getLogger("stage_3.client")


class LocalAppDown(TunnelError):
    """The local app refused or did not answer; the message says which, for the user's error page."""


async def connect(host: str, port: int) -> Half:
    """Dial a data connection, with a deadline; OSError (TimeoutError included) if that fails."""
    # A host behind a firewall that drops packets would otherwise keep us waiting for minutes.
    async with asyncio.timeout(NETWORK_TIMEOUT):
        # A Half from the start: no stream pair to set up and take apart again (see relay.py).
        _, half = await asyncio.get_running_loop().create_connection(Half, host, port)
    return half


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

    async def connect(self) -> Half:
        """Connect to the local app; LocalAppDown if it can't be reached."""
        if self.address is not None:
            try:
                return await connect(*self.address)
            except OSError:
                self.address = None  # it moved, or it is down: the name will tell
        try:
            half = await connect(self.host, self.port)
        except OSError as exc:
            raise LocalAppDown(f"{why(exc)} at {self.host}:{self.port}") from None
        self.address = half.transport.get_extra_info("peername")[:2]
        return half


async def serve_user(conn_id: str, local: LocalApp, proxy: tuple[str, int]) -> None:
    """Join one user to the local app until both sides are done; LocalAppDown if the app can't be reached."""
    short, started = conn_id[:8], time.monotonic()
    # The private connection first: if the local app is down, the server can show
    # its user an error page at once, instead of after the proxy timeout. (An app
    # that speaks first, like an SSH server, waits inside the Half until the join.)
    private = await local.connect()
    try:
        tunnel = await connect(*proxy)
        # The first line names the user this connection is for; the server pairs by it.
        # A new connection's send buffer is empty, so this write goes out at once.
        tunnel.transport.write(encode(Proxy(conn_id)))
        up, down = await join(tunnel, private)
        elapsed = time.monotonic() - started
        log.info("conn %s: closed, %d bytes in, %d bytes out, %.3fs", short, up.copied, down.copied, elapsed)
    except OSError as exc:  # this user is lost, the tunnel is not: log and carry on
        log.warning("conn %s: proxy connection to %s:%d failed or lost (%s)", short, *proxy, why(exc))
    finally:
        private.transport.close()


def why(exc: OSError) -> str:
    """A short reason for a failed connect, e.g. 'connection refused'."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    # asyncio wraps the reason ("[Errno 111] Connect call failed ..."), once per address tried.
    codes = {exc.errno} if exc.errno else {int(code) for code in re.findall(r"\[Errno (\d+)\]", str(exc))}
    return os.strerror(codes.pop()).lower() if len(codes) == 1 else str(exc)
