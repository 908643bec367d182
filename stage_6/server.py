"""Stage 6 server: relay every public connection through the client to the local app, as a stream.

python3 -m stage_6.server                    # then: python3 -m stage_6.client localhost:8000
python3 -m stage_6.server --host 0.0.0.0     # on a VPS: anyone can be its client (stage 11 adds a secret)

The client's one connection lives in session.py (one tunnel) and mux.py (its streams); here
are the ports, the users, and the page a user gets when the tunnel can't serve them.
"""

import argparse
import asyncio
import errno
import logging
import math
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass

from . import pages
from .protocol import CONTROL_PORT, DATA_LIMIT, NETWORK_TIMEOUT, PROXY_TIMEOUT, PUBLIC_PORT, TunnelError, printable
from .relay import Stream
from .session import Sessions

log = logging.getLogger(__name__)

# Connections the kernel queues for us before we accept them. asyncio's default
# of 100 makes a burst of users (200 browser tabs at once) wait for a SYN retry.
BACKLOG = 1024

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[None, None, None]]


@dataclass(frozen=True)
class Ports:
    """The two ports a server really bound (useful when asked for port 0)."""

    control: int
    public: int


class Server:
    """The tunnel server: one tunnel connection from the client, many public users, one stream per user."""

    def __init__(self, proxy_timeout: float = PROXY_TIMEOUT, handshake_timeout: float = NETWORK_TIMEOUT) -> None:
        self.proxy_timeout = proxy_timeout  # a user waits this long for the client to accept its stream
        self._listeners: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # The client's session, if one is connected (see session.py).
        self._sessions = Sessions(handshake_timeout)

    async def listen(
        self,
        host: str = "127.0.0.1",
        control_port: int = CONTROL_PORT,
        public_port: int = PUBLIC_PORT,
    ) -> Ports:
        """Bind the two ports (0 = any free port) and return the real ones; TunnelError if one is taken."""
        try:
            # The control connection carries frames after the handshake: a big buffer limit keeps reads
            # large (DATA_LIMIT). read_message still refuses a handshake line over MAX_LINE.
            await self._bind("control", host, control_port, self._sessions.handle_control, limit=DATA_LIMIT)
            # Public connections carry bulk data: keep the default 64 KiB buffer limit.
            await self._bind("public", host, public_port, self._handle_public)
        except BaseException:
            for listener in self._listeners:  # don't keep half of the ports open
                listener.close()
            self._listeners.clear()  # so that listen() can be tried again (the demo does)
            raise
        # Log only once both are bound, so that a failed start prints just its error.
        addresses = [listener.sockets[0].getsockname()[:2] for listener in self._listeners]
        for role, (bound_host, bound_port) in zip(("control", "public"), addresses, strict=True):
            log.info("%s port listening on %s:%d", role, bound_host, bound_port)
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
        stream = Stream()
        stream.attach(reader, writer)
        try:
            await self._serve_user(stream)
        finally:
            writer.close()  # sends what is still buffered first

    async def _serve_user(self, stream: Stream) -> None:
        """One public connection: open a stream for it on the client's connection, and log it when it ends."""
        assert stream.writer is not None
        peer, started = peername(stream.writer), time.monotonic()
        mux = self._sessions.mux
        if mux is None:
            # A page that names the cause tells the user more than a closed connection.
            await self._refuse(stream, peer, "no tunnel client is connected to this server")
            return
        # Open a stream; the user's bytes follow once the client accepted it (it reached the local app).
        stream_id = mux.open(stream)
        who = f"{peer}: stream {stream_id}"
        log.debug("%s: opened", who)
        try:
            async with asyncio.timeout(self.proxy_timeout):
                refusal = await asyncio.shield(stream.answered)
        except TimeoutError:
            cause = f"the tunnel client did not accept the stream within {self.proxy_timeout:g}s"
            stream.reset(cause)
            await self._refuse(stream, who, cause)
            return
        if refusal is not None:  # the client could not reach its local app, or went away
            await self._refuse(stream, who, refusal)
            return
        await stream.relay()  # the user's bytes, until the stream is over
        elapsed = time.monotonic() - started
        ended = f" (closed: {stream.reset_reason})" if stream.reset_reason else ""
        up, down = stream.sent.copied, stream.received.copied
        log.info("%s closed, %d bytes up, %d bytes down, %.3fs%s", who, up, down, elapsed, ended)

    @staticmethod
    async def _refuse(stream: Stream, who: str, cause: str) -> None:
        assert stream.reader is not None and stream.writer is not None
        sent = await pages.refuse(stream.reader, stream.writer, cause)
        log.warning("%s: %s; %s", who, printable(cause.encode()), "sent a 502 page" if sent else "closed")


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


def listen_port(text: str) -> int:
    """argparse type for a port to listen on: 0 (any free port) to 65535."""
    # Checked here, not left to the socket: 99999 would end in an OverflowError traceback.
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return int(text)


def positive_seconds(text: str) -> float:
    """argparse type for a timeout: a finite number of seconds, more than 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # not a number: refused just below
    if not 0 < value < math.inf:  # false for nan too
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


async def run(host: str, ports: Ports, proxy_timeout: float) -> None:
    """Bind, then serve until cancelled."""
    server = Server(proxy_timeout)
    await server.listen(host, ports.control, ports.public)
    await server.serve()


def main() -> None:
    """Command line: python3 -m stage_6.server [--host H] [--control-port P] [--public-port P] ..."""
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
    parser.add_argument(
        "--proxy-timeout",
        type=positive_seconds,
        default=PROXY_TIMEOUT,
        metavar="SECONDS",
        help="how long a user waits for the client to accept its stream (default: %(default)s)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    try:
        asyncio.run(run(args.host, Ports(args.control_port, args.public_port), args.proxy_timeout))
    except TunnelError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        log.info("stopped")


if __name__ == "__main__":
    main()
