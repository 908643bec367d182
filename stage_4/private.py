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

from .protocol import (
    DATA_LIMIT,
    NETWORK_TIMEOUT,
    Ok,
    ProtocolError,
    Proxy,
    TunnelError,
    read_message,
    write_message,
)
from .relay import Timeouts, relay

log = logging.getLogger("stage_4.client")

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class LocalAppDown(TunnelError):
    """The local app refused or did not answer; the message says which, for the user's error page."""


class ProxyFailed(TunnelError):
    """The proxy connection could not be opened (the server refused it, we are out of files...)."""


async def dial(host: str, port: int, limit: int = DATA_LIMIT) -> Streams:
    """Connect with a deadline; OSError (TimeoutError included) if that fails."""
    # A host behind a firewall that drops packets would otherwise keep us waiting for minutes.
    async with asyncio.timeout(NETWORK_TIMEOUT):
        return await asyncio.open_connection(host, port, limit=limit)


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

    async def dial(self) -> Streams:
        """Connect to the local app; LocalAppDown if it can't be reached."""
        if self.address is not None:
            try:
                return await dial(*self.address)
            except OSError:
                self.address = None  # it moved, or it is down: the name will tell
        try:
            reader, writer = await dial(self.host, self.port)
        except OSError as exc:
            raise LocalAppDown(f"{why(exc)} at {self.host}:{self.port}") from None
        self.address = writer.get_extra_info("peername")[:2]
        return reader, writer


async def serve_user(conn_id: str, local: LocalApp, proxy: tuple[str, int], timeouts: Timeouts) -> None:
    """Join one user to the local app until both sides are done.

    Raises LocalAppDown if the app can't be reached and ProxyFailed if the proxy connection
    can't be opened: the client tells the server either at once, and the user gets a 502 page.
    """
    short, started = conn_id[:8], time.monotonic()
    # The private connection first: if the local app is down, the server can show
    # its user an error page at once, instead of after the proxy timeout.
    local_reader, local_writer = await local.dial()
    try:
        try:
            proxy_reader, proxy_writer = await dial(*proxy)
        except OSError as exc:
            raise ProxyFailed(f"{why(exc)} at {proxy[0]}:{proxy[1]}") from None
        try:
            # --8<-- [start:ok]
            # The first line names the user this connection is for; the server pairs by it.
            await write_message(proxy_writer, Proxy(conn_id))
            # Relay nothing before the server confirms: its refusal (`error unknown or
            # expired proxy id`, when we were too slow) must never reach the app as data.
            async with asyncio.timeout(NETWORK_TIMEOUT):
                answer = await read_message(proxy_reader)
            if not isinstance(answer, Ok):
                log.warning("conn %s: the server did not pair the proxy connection (%s)", short, answer)
                return
                # --8<-- [end:ok]
            up, down, activity = await relay(proxy_reader, proxy_writer, local_reader, local_writer, timeouts)
            elapsed = time.monotonic() - started
            ended = f" (closed: {activity.expired})" if activity.expired else ""
            log.info(
                "conn %s: closed, %d bytes in, %d bytes out, %.3fs%s", short, up.copied, down.copied, elapsed, ended
            )
        finally:
            proxy_writer.close()
    except (OSError, ProtocolError) as exc:  # TimeoutError included: this user is lost, the tunnel is not
        log.warning("conn %s: proxy connection to %s:%d failed or lost (%s)", short, *proxy, str(exc) or "timed out")
    finally:
        local_writer.close()


def why(exc: OSError) -> str:
    """A short reason for a failed connect, e.g. 'connection refused'."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    # asyncio wraps the reason ("[Errno 111] Connect call failed ..."), once per address tried.
    codes = {exc.errno} if exc.errno else {int(code) for code in re.findall(r"\[Errno (\d+)\]", str(exc))}
    return os.strerror(codes.pop()).lower() if len(codes) == 1 else str(exc)
