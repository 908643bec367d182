"""Stage 3 server: pair every public connection with a proxy connection from the client.

python3 -m stage_3.server            # then: python3 -m stage_3.client localhost:8000
                                    # and browse http://localhost:60624

The server is stage 2's, unchanged: it never knew what sits behind the client. Stage 3's
news is on the client's side (client.py), which now relays each user to a real local app.
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

from .pairing import Pairing
from .protocol import (
    CONTROL_PORT,
    MAX_LINE,
    NETWORK_TIMEOUT,
    PROXY_PORT,
    PROXY_TIMEOUT,
    PUBLIC_PORT,
    CreateProxy,
    Ping,
    Pong,
    ProtocolError,
    TunnelError,
    linger,
    read_message,
    say_goodbye,
    write_message,
)
from .relay import relay

log = logging.getLogger(__name__)

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

    def __init__(self, proxy_timeout: float = PROXY_TIMEOUT, handshake_timeout: float = NETWORK_TIMEOUT) -> None:
        self.proxy_timeout = proxy_timeout  # a user waits this long for its proxy connection
        self._listeners: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # The client's control connection, or None: this tutorial serves one tunnel at a time.
        self._control: asyncio.StreamWriter | None = None
        # The public connections waiting for their proxy connection (see pairing.py).
        self._pairing = Pairing(handshake_timeout)

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
            await self._bind("control", host, control_port, self._handle_control, limit=MAX_LINE)
            # Public and proxy connections carry bulk data: keep the default 64 KiB
            # buffer limit, as a 1 KiB one would make every relay read tiny and slow.
            # read_message still rejects a proxy line longer than MAX_LINE.
            await self._bind("public", host, public_port, self._handle_public)
            await self._bind("proxy", host, proxy_port, self._handle_proxy)
        except BaseException:
            for listener in self._listeners:  # don't keep half of the ports open
                listener.close()
            self._listeners.clear()  # so that listen() can be tried again (the demo does)
            raise
        # Log only once all three are bound, so that a failed start prints just its error.
        addresses = [listener.sockets[0].getsockname()[:2] for listener in self._listeners]
        for role, (bound_host, bound_port) in zip(("control", "public", "proxy"), addresses, strict=True):
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

    async def _handle_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peername(writer)
        try:
            if self._control is not None:
                # Tutorial scope: one client, one tunnel. Stage 14 serves many clients.
                log.warning("%s: refused a second client; one is already connected", peer)
                await say_goodbye(reader, writer, "another client is already connected to this server")
                return
            self._control = writer
            log.info("%s: control connection opened", peer)
            await self._answer_pings(reader, writer)
        except ProtocolError as exc:
            # Tell the peer what went wrong, then hang up: a confused peer must
            # not be able to keep a connection (and its buffer) alive.
            log.warning("%s: %s; closing", peer, exc)
            await say_goodbye(reader, writer, str(exc))
        except OSError as exc:
            log.info("%s: connection lost (%s)", peer, exc)
        finally:
            if self._control is writer:
                self._control = None
                log.info("%s: control connection closed", peer)
            writer.close()

    async def _answer_pings(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The control connection reads only pings in stage 2 (stage 1's vocabulary); the
        # server's own messages on it, `create_proxy <id>`, are sent by _handle_public.
        while (message := await read_message(reader)) is not None:
            match message:
                case Ping():
                    await write_message(writer, Pong())
                case _:
                    raise ProtocolError(f"unexpected message from a client: {message}")

    async def _handle_public(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer, started = peername(writer), time.monotonic()
        try:
            if self._control is None:
                # Closing at once tells the user "nobody home"; leaving them hanging tells nothing.
                log.warning("%s: no client connected; closing the public connection", peer)
                await linger(reader, writer)
                return
            # Register the id first, then ask: the proxy connection may arrive as soon as we yield.
            with self._pairing.expect() as (conn_id, proxy):
                short = conn_id[:8]  # enough to follow a connection in the logs, useless to an attacker
                await write_message(self._control, CreateProxy(conn_id))
                log.debug("%s: conn %s: asked the client for a proxy connection", peer, short)
                try:
                    async with asyncio.timeout(self.proxy_timeout):
                        proxy_reader, proxy_writer = await proxy
                except TimeoutError:
                    log.warning("%s: conn %s: no proxy connection within %gs; closing", peer, short, self.proxy_timeout)
                    await linger(reader, writer)
                    return
                sent, received = await relay(reader, writer, proxy_reader, proxy_writer)
            elapsed = time.monotonic() - started
            log.info("%s: conn %s closed, %d bytes up, %d bytes down, %.3fs", peer, short, sent, received, elapsed)
        except OSError as exc:
            log.info("%s: public connection lost (%s)", peer, exc)
        finally:
            writer.close()

    async def _handle_proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not await self._pairing.accept_proxy(reader, writer):
            writer.close()  # on success the public connection's task owns it instead


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
    await server.listen(host, ports.control, ports.public, ports.proxy)
    await server.serve()


def main() -> None:
    """Command line: python3 -m stage_3.server [--host H] [--control-port P] [--public-port P] [--proxy-port P]."""
    parser = argparse.ArgumentParser(
        prog=f"python3 -m {__package__}.server",
        description="Accept users on the public port and pair each one with a proxy connection from the client.",
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
    parser.add_argument(
        "--proxy-timeout",
        type=positive_seconds,
        default=PROXY_TIMEOUT,
        metavar="SECONDS",
        help="how long a user waits for its proxy connection (default: %(default)s)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    try:
        asyncio.run(run(args.host, Ports(args.control_port, args.public_port, args.proxy_port), args.proxy_timeout))
    except TunnelError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        log.info("stopped")


if __name__ == "__main__":
    main()
