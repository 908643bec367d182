"""Stage 5 server: relay every public connection through the client to the local app, as a stream.

python3 -m stage_5.server                    # then: python3 -m stage_5.client localhost:8000
python3 -m stage_5.server --host 0.0.0.0     # on a VPS: anyone can be its client (stage 11 adds a secret)

The client's one connection lives in session.py (one tunnel) and mux.py (its streams); here
are the ports and the users, each relayed through a stream of its own.
"""

import argparse
import asyncio
import errno
import logging
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass

from .mux import Stream
from .protocol import (
    CONTROL_PORT,
    DATA_LIMIT,
    NETWORK_TIMEOUT,
    PUBLIC_PORT,
    TunnelError,
    linger,
)
from .relay import relay
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

    def __init__(self, handshake_timeout: float = NETWORK_TIMEOUT) -> None:
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
        peer, started = peername(writer), time.monotonic()
        try:
            mux = self._sessions.mux
            if mux is None:
                # Closing at once tells the user "nobody home"; leaving them hanging tells nothing.
                log.warning("%s: no client connected; closing the public connection", peer)
                await linger(reader, writer)
                return
            stream = Stream()
            # Open a stream; the user's bytes follow at once, and the client relays them to the local app.
            who = f"{peer}: stream {mux.open(stream)}"
            log.debug("%s: opened", who)
            try:
                sent, received = await relay(reader, writer, stream, stream)
            finally:
                stream.close()  # the peer's frames still on their way for it are dropped
            elapsed = time.monotonic() - started
            log.info("%s closed, %d bytes up, %d bytes down, %.3fs", who, sent, received, elapsed)
        except OSError as exc:
            log.info("%s: public connection lost (%s)", peer, exc)
        finally:
            writer.close()


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


async def run(host: str, ports: Ports) -> None:
    """Bind, then serve until cancelled."""
    server = Server()
    await server.listen(host, ports.control, ports.public)
    await server.serve()


def main() -> None:
    """Command line: python3 -m stage_5.server [--host H] [--control-port P] [--public-port P] ..."""
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
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    try:
        asyncio.run(run(args.host, Ports(args.control_port, args.public_port)))
    except TunnelError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        log.info("stopped")


if __name__ == "__main__":
    main()
