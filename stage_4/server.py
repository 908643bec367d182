"""Stage 4 server: relay every public connection through the client to the local app.

python -m stage_4.server                    # then: python -m stage_4.client localhost:8000
python -m stage_4.server --host 0.0.0.0     # on a VPS: set NGROK_SECRET on both sides first

The control port's side lives in session.py (auth, one tunnel, heartbeats); here are the
ports, the users, and what a user sees when the tunnel can't serve them (pages.py).
"""

import argparse
import asyncio
import errno
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass

from . import auth, pages
from .pairing import Pairing, Unavailable
from .protocol import (
    CONTROL_PORT,
    DATA_LIMIT,
    HEARTBEAT_TIMEOUT,
    MAX_LINE,
    MAX_WAITING,
    NETWORK_TIMEOUT,
    PROXY_PORT,
    PROXY_TIMEOUT,
    PUBLIC_PORT,
    CreateProxy,
    TunnelError,
)
from .relay import relay
from .session import Sessions

log = logging.getLogger("stage_4.server")

# Connections the kernel queues for us before we accept them. asyncio's default
# of 100 makes a burst of users (200 browser tabs at once) wait for a SYN retry.
BACKLOG = 1024

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[None, None, None]]


@dataclass(frozen=True)
class Ports:
    """The three ports a server really bound (useful when asked for port 0)."""

    control: int
    public: int
    proxy: int


class Server:
    """The tunnel server: one control connection, many public users, one proxy connection per user."""

    def __init__(
        self,
        proxy_timeout: float = PROXY_TIMEOUT,
        handshake_timeout: float = NETWORK_TIMEOUT,
        *,
        secret: str | None = None,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self.proxy_timeout = proxy_timeout  # a user waits this long for its proxy connection
        self._listeners: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # The public connections waiting for their proxy connection (see pairing.py).
        self._pairing = Pairing(handshake_timeout, max_waiting)
        # The client's control session, if one is connected (see session.py).
        self._sessions = Sessions(self._pairing, secret, handshake_timeout, heartbeat_timeout)

    async def listen(
        self,
        host: str = "127.0.0.1",
        control_port: int = CONTROL_PORT,
        public_port: int = PUBLIC_PORT,
        proxy_port: int = PROXY_PORT,
    ) -> Ports:
        """Bind the three ports (0 = any free port) and return the real ones; TunnelError if one is taken."""
        try:
            # Control lines are short, so limit=MAX_LINE caps what a peer can make us buffer.
            await self._bind("control", host, control_port, self._sessions.handle_control, limit=MAX_LINE)
            # Public and proxy connections carry bulk data: a big buffer limit keeps
            # relay reads large (see DATA_LIMIT). read_message still rejects a proxy
            # line longer than MAX_LINE, so the buffer is bounded all the same.
            await self._bind("public", host, public_port, self._handle_public, limit=DATA_LIMIT)
            await self._bind("proxy", host, proxy_port, self._handle_proxy, limit=DATA_LIMIT)
        except BaseException:
            for listener in self._listeners:  # don't keep half of the ports open
                listener.close()
            self._listeners.clear()  # so that listen() can be tried again (the demo does)
            raise
        # Log only once all three are bound, so that a failed start prints just its error.
        addresses = [listener.sockets[0].getsockname()[:2] for listener in self._listeners]
        for role, (bound_host, bound_port) in zip(("control", "public", "proxy"), addresses, strict=True):
            log.info("%s port listening on %s:%d", role, bound_host, bound_port)
        if warning := auth.exposure_warning(host, self._sessions.secret):
            log.warning("%s", warning)
        return Ports(*(int(port) for _, port in addresses))

    async def _bind(self, role: str, host: str, port: int, handler: Handler, limit: int = 64 * 1024) -> None:
        """Start one listener (64 KiB is asyncio's own default limit), or raise TunnelError saying why not."""
        try:
            listener = await asyncio.start_server(
                lambda r, w: self._spawn(handler(r, w)), host, port, limit=limit, backlog=BACKLOG
            )
        except OSError as exc:
            raise TunnelError(listen_error(exc, role, host, port)) from None
        self._listeners.append(listener)

    async def serve(self) -> None:
        """Serve until cancelled (Ctrl-C, a test); then close every connection and return."""
        assert self._listeners, "call listen() first"
        try:
            await asyncio.Event().wait()  # the listeners accept on their own; we just wait
        finally:
            for listener in self._listeners:  # stop accepting first, then end the connections in flight
                listener.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        # Keep a strong reference to every task: the event loop holds only a weak
        # one, and a task nobody references can be garbage-collected mid-flight.
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle_public(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer, started = peername(writer), time.monotonic()
        try:
            if not self._sessions.connected:
                # A page that names the cause tells the user more than a closed connection.
                await self._refuse(reader, writer, peer, 502, "no tunnel client is connected to this server")
                return
            if not self._pairing.has_room():  # bounded: a flood of users must not pile up sockets here
                await self._refuse(reader, writer, peer, 503, "too many users are waiting; try again soon")
                return
            # Register the id first, then ask: the proxy connection may arrive as soon as we yield.
            with self._pairing.expect(reader) as (conn_id, proxy):
                short = conn_id[:8]  # enough to follow a connection in the logs, useless to an attacker
                who = f"{peer}: conn {short}"
                try:
                    # One deadline for the request and its answer: a stuck control
                    # connection can block the request, too.
                    async with asyncio.timeout(self.proxy_timeout):
                        await self._sessions.send(CreateProxy(conn_id))
                        log.debug("%s: asked the client for a proxy connection", who)
                        proxy_reader, proxy_writer = await proxy
                except TimeoutError:
                    cause = f"the tunnel client did not open a proxy connection within {self.proxy_timeout:g}s"
                    await self._refuse(reader, writer, who, 504, cause)
                    return
                except Unavailable as exc:  # the client went away, or its local app refused
                    await self._refuse(reader, writer, who, 502, str(exc))
                    return
                up, down = await relay(reader, writer, proxy_reader, proxy_writer)
            elapsed = time.monotonic() - started
            # The request log: one line per public connection, like ngrok's list of requests.
            request = pages.summary(up.head, down.head)
            log.info("%s %s, %d bytes up, %d bytes down, %.3fs", who, request, up.copied, down.copied, elapsed)
        except OSError as exc:
            log.info("%s: public connection lost (%s)", peer, exc)
        finally:
            writer.close()

    async def _handle_proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handed_over = False
        try:
            handed_over = await self._pairing.accept_proxy(reader, writer)
        finally:
            if not handed_over:  # refused, or the server is stopping; else the user's task owns it
                writer.close()

    @staticmethod
    async def _refuse(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, who: str, status: int, cause: str
    ) -> None:
        sent = await pages.refuse(reader, writer, status, cause)
        log.warning("%s: %s; %s", who, cause, f"sent a {status} page" if sent else "closed")


def peername(writer: asyncio.StreamWriter) -> str:
    """'host:port' of the peer, for log lines."""
    host, port = writer.get_extra_info("peername")[:2]
    return f"{host}:{port}"


def listen_error(exc: OSError, role: str, host: str, port: int) -> str:
    """A one-line, actionable message for a failed bind."""
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use; stop the other program or pick another --{role}-port"
    if exc.errno == errno.EACCES:
        return f"permission denied to listen on {host}:{port}; use a --{role}-port above 1023"
    return f"cannot listen on {host}:{port} for the {role} port: {exc.strerror or exc}"


async def run(host: str, ports: Ports, proxy_timeout: float, secret: str | None, heartbeat_timeout: float) -> None:
    """Bind, then serve until cancelled."""
    server = Server(proxy_timeout, secret=secret, heartbeat_timeout=heartbeat_timeout)
    await server.listen(host, ports.control, ports.public, ports.proxy)
    await server.serve()


def main() -> None:
    """Command line: python -m stage_4.server [--host H] [--control-port P] [--public-port P] [--proxy-port P] ..."""
    parser = argparse.ArgumentParser(
        prog="python -m stage_4.server",
        description="Relay every user of the public port through the tunnel client to its local app.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    for role, default, who in (
        ("control", CONTROL_PORT, "the client connects"),
        ("public", PUBLIC_PORT, "users connect"),
        ("proxy", PROXY_PORT, "the client dials proxy connections"),
    ):
        parser.add_argument(
            f"--{role}-port",
            type=int,
            default=default,
            metavar="PORT",
            help=f"where {who}; 0 = any (default: %(default)s)",
        )
    for flag, seconds, what in (
        ("proxy-timeout", PROXY_TIMEOUT, "how long a user waits for its proxy connection"),
        ("heartbeat-timeout", HEARTBEAT_TIMEOUT, "silence after which the client counts as gone"),
    ):
        parser.add_argument(
            f"--{flag}", type=float, default=seconds, metavar="SECONDS", help=f"{what} (default: %(default)s)"
        )
    parser.add_argument(
        "--secret",
        default=os.environ.get("NGROK_SECRET"),
        help="a secret the client must prove it knows (default: $NGROK_SECRET, which keeps it out of ps)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    try:
        ports = Ports(args.control_port, args.public_port, args.proxy_port)
        asyncio.run(run(args.host, ports, args.proxy_timeout, args.secret, args.heartbeat_timeout))
    except TunnelError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        log.info("stopped")


if __name__ == "__main__":
    main()
