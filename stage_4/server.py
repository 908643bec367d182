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
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from . import auth, limits, pages
from .cli import listen_port, positive_seconds
from .limits import Listener
from .pairing import Pairing, Unavailable, hung_up
from .protocol import (
    CONTROL_PORT,
    DATA_LIMIT,
    HALF_CLOSED_TIMEOUT,
    HEARTBEAT_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_LINE,
    MAX_WAITING,
    NETWORK_TIMEOUT,
    PROXY_PORT,
    PROXY_TIMEOUT,
    PUBLIC_PORT,
    CreateProxy,
    TunnelError,
)
from .relay import Timeouts, relay
from .session import Sessions

log = logging.getLogger("stage_4.server")

# Connections the kernel queues for us before we accept them. asyncio's default
# of 100 makes a burst of users (200 browser tabs at once) wait for a SYN retry.
BACKLOG = 1024


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
        idle_timeout: float = IDLE_TIMEOUT,
        half_closed_timeout: float = HALF_CLOSED_TIMEOUT,
    ) -> None:
        self.proxy_timeout = proxy_timeout  # a user waits this long for its proxy connection
        self.timeouts = Timeouts(idle_timeout, half_closed_timeout)  # for silent relays: see relay.py
        self._listeners: list[Listener] = []
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
        before, fd_limit = limits.raise_fd_limit()
        slots = limits.slots_for(fd_limit)
        roles = (
            # Control lines are short, so limit=MAX_LINE caps what a peer can make us buffer.
            ("control", control_port, self._sessions.handle_control, MAX_LINE, False),
            # Public and proxy connections carry bulk data: a big buffer limit keeps
            # relay reads large (see DATA_LIMIT). read_message still rejects a proxy
            # line longer than MAX_LINE, so the buffer is bounded all the same.
            # A user is not read until paired (paused=True): see _serve_user.
            ("public", public_port, self._handle_public, DATA_LIMIT, True),
            ("proxy", proxy_port, self._handle_proxy, DATA_LIMIT, False),
        )
        try:
            for role, port, handler, limit, paused in roles:
                try:
                    sock = limits.bind(host, port, BACKLOG)
                except OSError as exc:
                    raise TunnelError(listen_error(exc, role, host, port)) from None
                self._listeners.append(Listener(role, sock, slots[role], handler, limit, paused))
        except BaseException:
            for listener in self._listeners:  # don't keep half of the ports open
                listener.sock.close()
            self._listeners.clear()  # so that listen() can be tried again (the demo does)
            raise
        # Log only once all three are bound, so that a failed start prints just its error.
        for listener in self._listeners:
            bound_host, bound_port = listener.sock.getsockname()[:2]
            log.info("%s port listening on %s:%d", listener.role, bound_host, bound_port)
        raised = f" (raised from {before})" if fd_limit > before else ""
        shares = ", ".join(f"{role} {count}" for role, count in slots.items())
        log.info("file descriptor limit: %d%s; connection slots: %s", fd_limit, raised, shares)
        for warning in (
            auth.exposure_warning(host, self._sessions.secret),
            auth.strength_warning(self._sessions.secret),
        ):
            if warning:
                log.warning("%s", warning)
        return Ports(*(int(listener.sock.getsockname()[1]) for listener in self._listeners))

    async def serve(self) -> None:
        """Serve until cancelled (Ctrl-C, a test); then close every connection and return."""
        assert self._listeners, "call listen() first"
        accepting = [asyncio.create_task(listener.serve(self._spawn)) for listener in self._listeners]
        try:
            await asyncio.gather(*accepting)  # they accept until cancelled
        finally:
            for task in accepting:  # stop accepting first, then end the connections in flight
                task.cancel()
            for listener in self._listeners:
                listener.sock.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*accepting, *self._tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        # Keep a strong reference to every task: the event loop holds only a weak
        # one, and a task nobody references can be garbage-collected mid-flight.
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle_public(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve_user(reader, writer)
        finally:
            writer.close()

    async def _serve_user(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One public connection: ask the client for its proxy connection, then relay the two."""
        peer, started = peername(writer), time.monotonic()
        # Until its proxy connection comes, a user's bytes wait in the kernel, not here (the
        # public port starts its connections paused): a waiting user costs us a socket,
        # never a buffer, however much it sends meanwhile.
        if hung_up(writer):
            return  # gone before we got to it (a flood, or a queue at the fd limit): nothing to serve
        # --8<-- [start:refusals]
        if not self._sessions.connected:
            # A page that names the cause tells the user more than a closed connection.
            await self._refuse(reader, writer, peer, 502, "no tunnel client is connected to this server")
            return
        if not self._pairing.has_room():  # bounded: a flood of users must not pile up sockets here
            await self._refuse(reader, writer, peer, 503, "too many users are waiting; try again soon")
            return
        # Register the id first, then ask: the proxy connection may arrive as soon as we yield.
        with self._pairing.expect(writer) as (conn_id, proxy):
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
            except Unavailable as exc:  # the client went away, or could not serve this user
                await self._refuse(reader, writer, who, 502, str(exc))
                return
                # --8<-- [end:refusals]
            start_reading(writer)  # paired: now the user's bytes may flow
            up, down, activity = await relay(reader, writer, proxy_reader, proxy_writer, self.timeouts)
        # --8<-- [start:request_log]
        elapsed = time.monotonic() - started
        # The request log: one line per public connection, like ngrok's list of requests.
        request = pages.summary(up.head, down.head)
        ended = f" (closed: {activity.expired})" if activity.expired else ""
        log.info("%s %s, %d bytes up, %d bytes down, %.3fs%s", who, request, up.copied, down.copied, elapsed, ended)
        # --8<-- [end:request_log]

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
        start_reading(writer)  # the page depends on what the user sends: read it
        sent = await pages.refuse(reader, writer, status, cause)
        log.warning("%s: %s; %s", who, cause, f"sent a {status} page" if sent else "closed")


def start_reading(writer: asyncio.StreamWriter) -> None:
    """Start reading a public connection (it was accepted paused: see limits.streams)."""
    transport = writer.transport
    assert isinstance(transport, asyncio.Transport)  # a TCP connection's transport reads too
    transport.resume_reading()


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


async def run(host: str, ports: Ports, **options: Any) -> None:
    """Bind, then serve until cancelled; `options` are Server's keyword arguments."""
    server = Server(**options)
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
            type=listen_port,
            default=default,
            metavar="PORT",
            help=f"where {who}; 0 = any (default: %(default)s)",
        )
    for flag, seconds, what in (
        ("proxy-timeout", PROXY_TIMEOUT, "how long a user waits for its proxy connection"),
        ("heartbeat-timeout", HEARTBEAT_TIMEOUT, "silence after which the client counts as gone"),
        ("idle-timeout", IDLE_TIMEOUT, "close a user's relay after this long with no byte either way"),
        ("half-closed-timeout", HALF_CLOSED_TIMEOUT, "close a half-closed relay after this long silent"),
    ):
        parser.add_argument(
            f"--{flag}",
            type=positive_seconds,
            default=seconds,
            metavar="SECONDS",
            help=f"{what} (default: %(default)s)",
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
        options = {
            "proxy_timeout": args.proxy_timeout,
            "secret": args.secret,
            "heartbeat_timeout": args.heartbeat_timeout,
            "idle_timeout": args.idle_timeout,
            "half_closed_timeout": args.half_closed_timeout,
        }
        asyncio.run(run(args.host, ports, **options))
    except TunnelError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        log.info("stopped")


if __name__ == "__main__":
    main()
