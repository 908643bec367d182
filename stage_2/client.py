"""Stage 2 client: on every `create_proxy <id>`, dial the proxy port and echo the user's lines back.

python3 -m stage_2.client                # server on localhost; then: nc localhost 60624
python3 -m stage_2.client my.server --control-port 60623 --proxy-port 60625
"""

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import sys

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

log = logging.getLogger(__name__)


class Client:
    """Keeps the control connection to a server and answers each `create_proxy` with a proxy connection."""

    def __init__(
        self, server: str = "localhost", control_port: int = CONTROL_PORT, proxy_port: int = PROXY_PORT
    ) -> None:
        self.server = server
        self.control_port = control_port
        self.proxy_port = proxy_port
        self._sessions: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Serve the server's requests until cancelled; TunnelError if it is unreachable, refuses or goes away."""
        reader, writer = await self._connect(self.control_port, limit=MAX_LINE)
        log.info("connected to the server at %s:%d; waiting for public connections", self.server, self.control_port)
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

    async def _connect(self, port: int, limit: int = 64 * 1024) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            # Every connect gets a deadline: a server behind a firewall that
            # drops packets would otherwise keep us waiting for minutes.
            async with asyncio.timeout(NETWORK_TIMEOUT):
                return await asyncio.open_connection(self.server, port, limit=limit)
        except OSError as exc:
            # A TimeoutError has no text of its own, and an OSError that sums up several
            # failed addresses has no strerror: say something in both cases.
            reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
            raise TunnelError(f"cannot reach the server at {self.server}:{port} ({reason}); is it running?") from None

    async def _session(self, conn_id: str) -> None:
        short = conn_id[:8]
        try:
            reader, writer = await self._connect(self.proxy_port)
        except TunnelError as exc:  # this user is lost, the tunnel is not: log and carry on
            log.warning("conn %s: %s", short, exc)
            return
        try:
            # The first line names the user this connection is for; the server pairs by it.
            await write_message(writer, Proxy(conn_id))
            lines = await echo(reader, writer)
            log.info("conn %s: session ended; lines echoed: %d", short, lines)
        except OSError as exc:
            log.info("conn %s: connection lost (%s)", short, exc)
        finally:
            writer.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """Send every line back until EOF or a `stop` line (as the Go original does); return the lines echoed.

    This is stage 2's stand-in for the local app, so these are the user's bytes, not protocol
    messages: any line is fine, however long, and nothing is decoded.
    """
    lines = 0
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            line = exc.partial  # the last bytes before EOF, without a newline (or nothing)
        except asyncio.LimitOverrunError as exc:
            line = await reader.read(exc.consumed)  # a very long line: echo it piece by piece
        if not line or line in (b"stop\n", b"stop\r\n"):
            return lines
        writer.write(line)
        await writer.drain()  # a user who sends and never reads must not fill our memory
        lines += 1


def main() -> None:
    """Command line: python3 -m stage_2.client [SERVER] [--control-port P] [--proxy-port P]."""
    parser = argparse.ArgumentParser(
        prog=f"python3 -m {__package__}.client",
        description="Connect to a stage 2 server and echo back every line its public users send.",
    )
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
        asyncio.run(Client(server, control_port, args.proxy_port).run())
    except TunnelError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        pass


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


if __name__ == "__main__":
    main()
