"""Stage 5 client: carry every user from the server to the local app, over one connection.

python3 -m stage_5.client localhost:8000                 # the server on localhost
python3 -m stage_5.client localhost:8000 my.server       # the server on another machine

One connection to the server carries everything. The server opens a stream on it for each user
(a SYN frame); the client dials the local app (the private connection) and relays the stream
into it. The users' streams end with the connection: they ran inside it (in stage 4 each user
had a proxy connection of its own).
"""

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import sys

from . import pages
from .mux import Mux, Stream
from .protocol import (
    CONTROL_PORT,
    DATA_LIMIT,
    NETWORK_TIMEOUT,
    TunnelError,
    client_handshake,
)
from .relay import relay

log = logging.getLogger(__name__)

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Client:
    """Keeps the control connection to a server and relays each user it announces to the local app."""

    def __init__(
        self,
        local: tuple[str, int],
        server: str = "localhost",
        control_port: int = CONTROL_PORT,
    ) -> None:
        self.local = local
        self.server = server
        self.control_port = control_port
        # Set while the server has us as its client; the demo and the tests wait for it.
        self.connected = asyncio.Event()
        self._sessions: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Serve the tunnel until cancelled; TunnelError if the server is unreachable, says no or goes away."""
        # Frames follow the handshake: a big buffer limit keeps reads large (see protocol.py).
        reader, writer = await self._connect(self.server, self.control_port, limit=DATA_LIMIT)
        try:
            await client_handshake(reader, writer)
            await self._serve_control(reader, writer)
        except OSError as exc:  # TimeoutError (a silent server) is an OSError too
            raise TunnelError(f"lost the connection to the server ({str(exc) or 'timed out'})") from None
        finally:
            writer.close()
            for task in self._sessions:
                task.cancel()
            await asyncio.gather(*self._sessions, return_exceptions=True)

    async def _serve_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve the server's streams; raise TunnelError when the connection is lost."""
        log.info("tunnel up: the server at %s:%d sends its users to %s:%d", self.server, self.control_port, *self.local)
        mux = Mux(reader, writer, peer="the server", on_open=self._open)
        self.connected.set()
        try:
            # Tutorial shortcut: this read has no deadline, so a server that vanishes
            # without closing the connection goes unnoticed. Stage 10 adds heartbeats.
            await mux.run()
            raise TunnelError("the server closed the connection")
        finally:
            self.connected.clear()

    def _open(self, stream_id: int) -> Stream:
        """The server opened a stream for a user: dial the local app for it, in a task of its own."""
        stream = Stream()
        log.debug("stream %d: the server opened it", stream_id)
        # One task per user, so a slow local app never holds up the others.
        task = asyncio.create_task(self._session(stream))
        self._sessions.add(task)  # a strong reference, as the server keeps
        task.add_done_callback(self._sessions.discard)
        return stream

    @staticmethod
    async def _connect(host: str, port: int, limit: int = 64 * 1024) -> Streams:
        """Open a connection with a deadline; TunnelError saying why if that fails."""
        try:
            # Every connect gets a deadline: a host behind a firewall that
            # drops packets would otherwise keep us waiting for minutes.
            async with asyncio.timeout(NETWORK_TIMEOUT):
                return await asyncio.open_connection(host, port, limit=limit)
        except OSError as exc:  # TimeoutError included
            raise TunnelError(f"cannot reach {host}:{port} ({why(exc)})") from None

    async def _session(self, stream: Stream) -> None:
        """One user: the private connection to the local app, joined to the stream, until both are done."""
        # The private connection first: if the local app is down, the user gets a 502 page
        # (below) instead of a connection that opens and then closes without a word.
        try:
            private: Streams | None = await self._connect(*self.local)
            cause = ""
        except TunnelError as exc:
            private, cause = None, f"the tunnel client {exc}"
        try:
            if private is None:
                # Into the stream, as stage 4 wrote it into the proxy connection: a stream reads and
                # writes like one. Stage 6 has the server write the page.
                sent = await pages.refuse(stream, stream, cause)
                log.warning("stream %d: %s; %s", stream.stream_id, cause, "sent a 502 page" if sent else "closed")
                return
            sent_bytes, received = await relay(stream, stream, *private)
            log.info("stream %d: closed, %d bytes in, %d bytes out", stream.stream_id, sent_bytes, received)
        finally:
            stream.close()  # the server's frames still on their way for it are dropped
            if private is not None:
                private[1].close()


def why(exc: OSError) -> str:
    """A short reason for a failed connect, e.g. 'connection refused'."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    # asyncio's message ("Connect call failed ...") says less than the error code does.
    return os.strerror(exc.errno).lower() if exc.errno else str(exc)


def parse_address(text: str) -> tuple[str, int]:
    """Turn 'host:port' (or '[::1]:port') into a (host, port) pair for argparse."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return host.strip("[]"), int(port_text)


def parse_server(text: str) -> tuple[str, int | None]:
    """argparse type for SERVER: 'host' or 'host:port'; an IPv6 address alone or as '[::1]:port'."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.IPv6Address(text.strip("[]"))), None  # its colons are not a port
    host, sep, port_text = text.rpartition(":")
    if not sep:
        return text, None
    if not host or (":" in host and not host.startswith("[")) or not port_text.isdigit():
        raise argparse.ArgumentTypeError(f"expected host or host:port, got {text!r}")
    # The port given here is the control port, as if given with --control-port.
    return host.strip("[]"), port(port_text)


def port(text: str) -> int:
    """argparse type for a port to connect to: 1 to 65535."""
    # Checked here: the socket would wrap 99999 around to another port without a word.
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {text!r}")
    return int(text)


def main() -> None:
    """Command line: python3 -m stage_5.client LOCAL [SERVER] [--control-port P]."""
    parser = argparse.ArgumentParser(
        prog=f"python3 -m {__package__}.client",
        description="Open a tunnel from a stage 5 server to LOCAL, the app on this machine that users should reach.",
    )
    parser.add_argument("local", type=parse_address, metavar="LOCAL", help="the local app, as host:port")
    parser.add_argument(
        "server",
        nargs="?",
        type=parse_server,
        default="localhost",
        metavar="SERVER",
        help="host or host:port (default: localhost)",
    )
    parser.add_argument(
        "--control-port", type=port, metavar="PORT", help=f"the server's control port (default: {CONTROL_PORT})"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    args = parser.parse_args()
    server, server_port = args.server
    if server_port and args.control_port:
        parser.error("give the control port once: in SERVER (host:port) or with --control-port")
    control_port = server_port or args.control_port or CONTROL_PORT
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    try:
        asyncio.run(Client(args.local, server, control_port).run())
    except TunnelError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
