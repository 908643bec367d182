"""Stage 3 client: on every `create_proxy <id>`, relay the user to the local app through a proxy connection.

python3 -m stage_3.client localhost:8000              # the server on localhost; browse localhost:60624
python3 -m stage_3.client localhost:8000 my.server    # the server on another machine

Stage 2's client echoed each user itself. This one dials the app you want to show the world
(the *private connection*) and pipes it to the proxy connection with the pump from stage 0.
"""

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import sys

from . import pages
from .protocol import (
    CONTROL_PORT,
    MAX_LINE,
    NETWORK_TIMEOUT,
    PROXY_PORT,
    CreateProxy,
    Error,
    Pong,
    Proxy,
    TunnelError,
    read_message,
    write_message,
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
        proxy_port: int = PROXY_PORT,
    ) -> None:
        self.local = local
        self.server = server
        self.control_port = control_port
        self.proxy_port = proxy_port
        self.connected = asyncio.Event()  # set once the control connection is up (the demo waits for it)
        self._sessions: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Serve the server's requests until cancelled; TunnelError if it is unreachable, refuses or goes away."""
        reader, writer = await self._connect(self.server, self.control_port, limit=MAX_LINE)
        log.info("tunnel up: the server at %s:%d sends its users to %s:%d", self.server, self.control_port, *self.local)
        self.connected.set()
        try:
            # Tutorial shortcut: this read has no deadline, so a server that vanishes
            # without closing the connection goes unnoticed. Stage 10 adds heartbeats.
            while (message := await read_message(reader)) is not None:
                match message:
                    case CreateProxy(conn_id):
                        log.debug("conn %s: the server asks for a proxy connection", conn_id[:8])
                        # One task per user, so a slow user never holds up the others.
                        task = asyncio.create_task(self._session(conn_id))
                        self._sessions.add(task)  # a strong reference, as the server keeps
                        task.add_done_callback(self._sessions.discard)
                    case Error(reason):
                        raise TunnelError(f"the server refused: {reason}")
                    case Pong():
                        pass  # an answer to a ping we never sent: harmless, ignore it
                    case _:
                        log.warning("ignoring unexpected message from the server: %s", message)
            raise TunnelError("the server closed the control connection")
        except OSError as exc:
            raise TunnelError(f"lost the connection to the server ({exc})") from None
        finally:
            writer.close()
            for task in self._sessions:
                task.cancel()
            await asyncio.gather(*self._sessions, return_exceptions=True)

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

    async def _session(self, conn_id: str) -> None:
        """One user: the private connection to the local app, the proxy connection, and the relay between them."""
        short = conn_id[:8]
        # The private connection first: if the local app is down, the user gets a 502 page
        # (below) instead of a connection that opens and then closes without a word.
        try:
            private: Streams | None = await self._connect(*self.local)
            cause = ""
        except TunnelError as exc:
            private, cause = None, f"the tunnel client {exc}"
        try:
            proxy_reader, proxy_writer = await self._connect(self.server, self.proxy_port)
        except TunnelError as exc:  # this user is lost, the tunnel is not: log and carry on
            log.warning("conn %s: proxy connection: %s", short, exc)
            if private is not None:
                private[1].close()
            return
        try:
            # The first line names the user this connection is for; the server pairs by it.
            await write_message(proxy_writer, Proxy(conn_id))
            if private is None:
                sent = await pages.refuse(proxy_reader, proxy_writer, cause)
                log.warning("conn %s: %s; %s", short, cause, "sent a 502 page" if sent else "closed")
                return
            sent_bytes, received = await relay(proxy_reader, proxy_writer, *private)
            log.info("conn %s: closed, %d bytes in, %d bytes out", short, sent_bytes, received)
        except OSError as exc:
            log.info("conn %s: connection lost (%s)", short, exc)
        finally:
            proxy_writer.close()
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
    """Command line: python3 -m stage_3.client LOCAL [SERVER] [--control-port P] [--proxy-port P]."""
    parser = argparse.ArgumentParser(
        prog=f"python3 -m {__package__}.client",
        description="Open a tunnel from a stage 3 server to LOCAL, the app on this machine that users should reach.",
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
    parser.add_argument(
        "--proxy-port",
        type=port,
        default=PROXY_PORT,
        metavar="PORT",
        help="the server's proxy port (default: %(default)s)",
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
        asyncio.run(Client(args.local, server, control_port, args.proxy_port).run())
    except TunnelError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
