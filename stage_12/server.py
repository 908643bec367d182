"""Stage 12 server: relay every public connection through the client to the local app, as a stream.

python3 -m stage_12.server                    # then: python3 -m stage_12.client localhost:8000
python3 -m stage_12.server --host 0.0.0.0     # on a VPS: set NGROK_SECRET on both sides first

The client's one connection lives in session.py (auth, one tunnel, heartbeats) and mux.py (its
streams); here are the ports, the users, and what a user sees when the tunnel can't serve them.
"""

import argparse
import asyncio
import errno
import functools
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field

from . import auth, pages
from .budget import MEMORY_BUDGET, Budget, MiB
from .cli import listen_port, positive_seconds, whole_number
from .frames import INITIAL_WINDOW
from .protocol import (
    CONTROL_PORT,
    DATA_LIMIT,
    HEARTBEAT_TIMEOUT,
    NETWORK_TIMEOUT,
    PROXY_TIMEOUT,
    PUBLIC_PORT,
    TunnelError,
    printable,
)
from .relay import Stream
from .session import Sessions

log = logging.getLogger(__name__)

# Connections the kernel queues for us before we accept them. asyncio's default
# of 100 makes a burst of users (200 browser tabs at once) wait for a SYN retry.
BACKLOG = 1024


@dataclass(frozen=True)
class ServerSettings:
    """Every setting of the server, its bounds and its secret, in one object that Server takes.

    A test or the demo names only what it changes, and a new bound is one more field here, not one
    more argument of every function that passes the settings on. Frozen: a running server's bounds
    don't change under it; `dataclasses.replace(settings, secret=...)` makes a changed copy.
    """

    proxy_timeout: float = PROXY_TIMEOUT
    """How long a user waits for the client to accept its stream (or for memory): then a 504 (or 503) page."""
    handshake_timeout: float = NETWORK_TIMEOUT
    """How long a new control connection may take to shake hands: one that never finishes is let go."""
    secret: str | None = field(default=None, repr=False)  # kept out of repr(), which a log may show
    """What the client must prove it knows (auth.py); None lets any client in (with a warning off loopback)."""
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    """Silence after which the client counts as gone, even if TCP has not noticed (a laptop asleep)."""
    memory_budget: int = MEMORY_BUDGET
    """The bytes every user's stream together may make the server buffer (budget.py): memory stays bounded."""


@dataclass(frozen=True)
class Ports:
    """The two ports a server really bound (useful when asked for port 0)."""

    control: int
    public: int


class User(Stream):
    """A connection to the public port: a Stream that, once connected, is served in a task of its own."""

    def __init__(self, serve: Callable[[Stream], None]) -> None:
        super().__init__()
        self._serve = serve

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._serve(self)  # now: the task may use the transport from its first line on


class Server:
    """The tunnel server: one tunnel connection from the client, many public users, one stream per user."""

    def __init__(self, settings: ServerSettings = ServerSettings()) -> None:
        self.settings = settings
        self.budget = Budget(settings.memory_budget)  # every stream's window, together (budget.py)
        self._listeners: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # The client's session, if one is connected (see session.py).
        self._sessions = Sessions(settings.secret, settings.handshake_timeout, settings.heartbeat_timeout)

    async def listen(
        self,
        host: str = "127.0.0.1",
        control_port: int = CONTROL_PORT,
        public_port: int = PUBLIC_PORT,
    ) -> Ports:
        """Bind the two ports (0 = any free port) and return the real ones; TunnelError if one is taken."""
        roles = (("control", control_port, self._listen_control), ("public", public_port, self._listen_public))
        try:
            for role, port, start in roles:
                try:
                    listener = await start(host, port)
                except OSError as exc:
                    raise TunnelError(listen_error(exc, role, host, port)) from None
                self._listeners.append(listener)
        except BaseException:
            for listener in self._listeners:  # don't keep half of the ports open
                listener.close()
            self._listeners.clear()  # so that listen() can be tried again (the demo does)
            raise
        # Log only once both are bound, so that a failed start prints just its error.
        addresses = [listener.sockets[0].getsockname()[:2] for listener in self._listeners]
        for role, (bound_host, bound_port) in zip(("control", "public"), addresses, strict=True):
            log.info("%s port listening on %s:%d", role, bound_host, bound_port)
        for warning in (
            auth.exposure_warning(host, self._sessions.secret),
            auth.strength_warning(self._sessions.secret),
        ):
            if warning:
                log.warning("%s", warning)
        return Ports(*(int(port) for _, port in addresses))

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

    async def _listen_control(self, host: str, port: int) -> asyncio.Server:
        # The tunnel connection carries frames after the handshake: a big buffer limit keeps reads
        # large (DATA_LIMIT). read_message still refuses a handshake line over MAX_LINE.
        return await asyncio.start_server(
            lambda r, w: self._spawn(self._sessions.handle_control(r, w)), host, port, limit=DATA_LIMIT, backlog=BACKLOG
        )

    async def _listen_public(self, host: str, port: int) -> asyncio.Server:
        # Each user's connection is a Stream (relay.py), an asyncio Protocol: asyncio makes one per connection.
        user = functools.partial(User, lambda stream: self._spawn(self._handle_public(stream)))
        return await asyncio.get_running_loop().create_server(user, host, port, backlog=BACKLOG)

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        # Keep a strong reference to every task: the event loop holds only a weak
        # one, and a task nobody references can be garbage-collected mid-flight.
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle_public(self, stream: Stream) -> None:
        try:
            await self._serve_user(stream)
        finally:
            if stream.transport is not None:
                stream.transport.close()  # sends what is still buffered first
            await stream.closed

    async def _serve_user(self, stream: Stream) -> None:
        """One public connection: open a stream for it on the client's connection, and log it when it ends."""
        assert stream.transport is not None
        peer, started = peername(stream.transport), time.monotonic()
        mux = self._sessions.mux
        if mux is None:
            # A page that names the cause tells the user more than a closed connection.
            await self._refuse(stream, peer, 502, "no tunnel client is connected to this server")
            return
        try:  # the stream's first window must fit in the memory budget: the user waits for it
            async with asyncio.timeout(self.settings.proxy_timeout):
                await self.budget.reserve(INITIAL_WINDOW)
        except TimeoutError:
            await self._refuse(stream, peer, 503, "the server's memory for users' bytes is spent; try again soon")
            return
        if stream.closed.done():  # the user left while it waited
            self.budget.give(INITIAL_WINDOW)
            return
        stream.charge(self.budget)
        # Open at once, and send the user's first bytes right behind the SYN, within the stream's
        # first window: no round trip to wait for (stage 7 waited for the client's ACK).
        stream_id = mux.open(stream)
        who = f"{peer}: stream {stream_id}"
        log.debug("%s: opened", who)
        try:
            async with asyncio.timeout(self.settings.proxy_timeout):
                refusal = await asyncio.shield(stream.answered)
        except TimeoutError:
            cause = f"the tunnel client did not accept the stream within {self.settings.proxy_timeout:g}s"
            stream.reset(cause)
            await self._refuse(stream, who, 504, cause)
            return
        if refusal is not None:  # the client could not reach its local app, or went away
            if not stream.closed.done():
                await self._refuse(stream, who, 502, refusal)
            return
        await stream.closed
        elapsed = time.monotonic() - started
        # The request log: one line per public connection, like ngrok's list of requests.
        request = pages.summary(stream.sent.head, stream.received.head)
        ended = f" (closed: {stream.reset_reason})" if stream.reset_reason else ""
        up, down = stream.sent.copied, stream.received.copied
        log.info("%s %s, %d bytes up, %d bytes down, %.3fs%s", who, request, up, down, elapsed, ended)

    @staticmethod
    async def _refuse(stream: Stream, who: str, status: int, cause: str) -> None:
        sent = await pages.refuse(stream, status, cause)
        log.warning("%s: %s; %s", who, printable(cause.encode()), f"sent a {status} page" if sent else "closed")


def peername(transport: asyncio.BaseTransport) -> str:
    """'host:port' of the peer, for log lines."""
    host, port = transport.get_extra_info("peername")[:2]
    return f"{host}:{port}"


def listen_error(exc: OSError, role: str, host: str, port: int) -> str:
    """A one-line, actionable message for a failed bind."""
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use; stop the other program or pick another --{role}-port"
    if exc.errno == errno.EACCES:
        return f"permission denied to listen on {host}:{port}; use a --{role}-port above 1023"
    return f"cannot listen on {host}:{port} for the {role} port: {exc.strerror or exc}"


async def run(server: Server, host: str, ports: Ports) -> None:
    """Bind, then serve until cancelled."""
    await server.listen(host, ports.control, ports.public)
    await server.serve()


def main() -> None:
    """Command line: python3 -m stage_12.server [--host H] [--control-port P] [--public-port P] ..."""
    parser = argparse.ArgumentParser(
        prog=f"python3 -m {__package__}.server",
        description="Relay every user of the public port through the tunnel client to its local app, as a stream.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    for role, default, who in (
        ("control", CONTROL_PORT, "the client connects"),
        ("public", PUBLIC_PORT, "users connect"),
    ):
        parser.add_argument(
            f"--{role}-port",
            type=listen_port,
            default=default,
            metavar="PORT",
            help=f"where {who}; 0 = any (default: %(default)s)",
        )
    for flag, seconds, what in (
        ("proxy-timeout", PROXY_TIMEOUT, "how long a user waits for the client to accept its stream"),
        ("heartbeat-timeout", HEARTBEAT_TIMEOUT, "silence after which the client counts as gone"),
    ):
        parser.add_argument(
            f"--{flag}",
            type=positive_seconds,
            default=seconds,
            metavar="SECONDS",
            help=f"{what} (default: %(default)s)",
        )
    parser.add_argument(
        "--memory-budget",
        type=whole_number(16, 1024 * 1024),
        default=MEMORY_BUDGET // MiB,
        metavar="MIB",
        help="the most the users' streams together may make the server buffer, in MiB (default: %(default)s)",
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
        ports = Ports(args.control_port, args.public_port)
        settings = ServerSettings(
            proxy_timeout=args.proxy_timeout,
            secret=args.secret,
            heartbeat_timeout=args.heartbeat_timeout,
            memory_budget=args.memory_budget * MiB,
        )
        asyncio.run(run(Server(settings), args.host, ports))
    except TunnelError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        log.info("stopped")


if __name__ == "__main__":
    main()
