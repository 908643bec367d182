"""Stage 1 client: open the control connection and time ping/pong round trips, like ping(8).

python3 -m stage_1.client                # server on localhost
python3 -m stage_1.client my.server --count 3
"""

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import math
import statistics
import sys
import time

from .protocol import (
    CONTROL_PORT,
    MAX_LINE,
    NETWORK_TIMEOUT,
    Error,
    Ping,
    Pong,
    ProtocolError,
    TunnelError,
    read_message,
    write_message,
)

log = logging.getLogger(__name__)


class Client:
    """One control connection to a server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, server: str, control_port: int = CONTROL_PORT) -> "Client":
        """Open the control connection, or raise TunnelError saying why not."""
        try:
            # Every network wait gets a deadline: a server behind a firewall that
            # drops packets would otherwise keep us waiting for minutes.
            async with asyncio.timeout(NETWORK_TIMEOUT):
                reader, writer = await asyncio.open_connection(server, control_port, limit=MAX_LINE)
        except OSError as exc:
            # A TimeoutError has no text of its own, and an OSError that sums up several
            # failed addresses has no strerror: say something in both cases.
            reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
            raise TunnelError(
                f"cannot reach the server at {server}:{control_port} ({reason}); is it running?"
            ) from None
        return cls(reader, writer)

    async def ping(self) -> float:
        """Send one ping, wait for its pong, and return the round-trip time in seconds."""
        started = time.perf_counter()
        try:
            await write_message(self._writer, Ping())
            async with asyncio.timeout(NETWORK_TIMEOUT):
                reply = await read_message(self._reader)
        except TimeoutError:
            raise TunnelError(f"no pong within {NETWORK_TIMEOUT:g}s; is the server still up?") from None
        except OSError as exc:
            raise TunnelError(f"lost the connection to the server ({exc})") from None
        match reply:
            case Pong():
                return time.perf_counter() - started
            case Error(reason):
                raise TunnelError(f"the server refused: {reason}")
            case None:
                raise TunnelError("the server closed the connection")
        raise ProtocolError(f"expected pong, got {reply}")

    async def close(self) -> None:
        """Close the control connection."""
        self._writer.close()
        with contextlib.suppress(OSError):  # already reset by the server: nothing left to do
            await self._writer.wait_closed()


async def run(server: str, control_port: int, count: int, interval: float) -> list[float]:
    """Ping `count` times, printing each round trip and a summary; return the times."""
    client = await Client.connect(server, control_port)
    print(f"PING {server}:{control_port} over the control connection")
    times: list[float] = []
    try:
        for seq in range(1, count + 1):
            if seq > 1:
                await asyncio.sleep(interval)
            times.append(await client.ping())
            print(f"pong from {server}:{control_port}: seq={seq} time={times[-1] * 1000:.3f} ms")
    finally:
        await client.close()
    print(f"--- {server}:{control_port} ping statistics ---")
    ms = [t * 1000 for t in times]
    print(
        f"{count} pings sent, {len(ms)} pongs received, "
        f"rtt min/avg/max = {min(ms):.3f}/{statistics.mean(ms):.3f}/{max(ms):.3f} ms"
    )
    return times


def main() -> None:
    """Command line: python3 -m stage_1.client [SERVER] [--control-port P] [--count N]."""
    parser = argparse.ArgumentParser(
        prog=f"python3 -m {__package__}.client", description="Ping a stage 1 server over the control connection."
    )
    parser.add_argument(
        "server",
        nargs="?",
        type=parse_server,
        default="localhost",
        metavar="SERVER",
        help="host or host:port (default: localhost)",
    )
    parser.add_argument("--control-port", type=port, help=f"the server's control port (default: {CONTROL_PORT})")
    parser.add_argument("--count", type=positive_int, default=10, help="pings to send (default: %(default)s)")
    parser.add_argument("--interval", type=seconds, default=1.0, help="seconds between pings (default: %(default)s)")
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
        asyncio.run(run(server, control_port, args.count, args.interval))
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


def seconds(text: str) -> float:
    """argparse type for a pause: a finite number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # not a number: refused just below
    if not 0 <= value < math.inf:  # false for nan too
        raise argparse.ArgumentTypeError(f"expected a number of seconds, 0 or more, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type for a count of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


if __name__ == "__main__":
    main()
