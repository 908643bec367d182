"""Stage 1 client: open the control connection and time ping/pong round trips, like ping(8).

python -m stage_1.client                # server on localhost
python -m stage_1.client my.server --count 3
"""

import argparse
import asyncio
import contextlib
import logging
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

log = logging.getLogger("stage_1.client")


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
            reason = exc.strerror or "timed out"
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
    """Command line: python -m stage_1.client [SERVER] [--control-port P] [--count N]."""
    parser = argparse.ArgumentParser(
        prog="python -m stage_1.client", description="Ping a stage 1 server over the control connection."
    )
    parser.add_argument("server", nargs="?", default="localhost", help="server host (default: %(default)s)")
    parser.add_argument("--control-port", type=int, default=CONTROL_PORT, help="default: %(default)s")
    parser.add_argument("--count", type=positive_int, default=10, help="pings to send (default: %(default)s)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between pings (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    try:
        asyncio.run(run(args.server, args.control_port, args.count, args.interval))
    except TunnelError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        pass


def positive_int(text: str) -> int:
    """argparse type for a count of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


if __name__ == "__main__":
    main()
