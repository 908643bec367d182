"""Stage 0 client: a local port that relays every connection to a target.

python3 -m stage_0.client localhost:8000        # then: curl localhost:54286
"""

import argparse
import asyncio
import errno
import logging
import sys
import time

from .relay import CHUNK_SIZE, relay

# Named after the package, not written out: a copy of this folder under another name needs no edit.
log = logging.getLogger(__package__)

DEFAULT_PORT = 54286
# How long to wait for the target to accept before giving up on one user.
CONNECT_TIMEOUT = 5.0


class Proxy:
    """Accepts connections on a local port and relays each one to `target`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def listen(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> tuple[str, int]:
        """Bind the listening socket (port 0 = any free port) and return its real address."""
        # limit: how much a connection's reader may buffer before asyncio pauses the
        # socket. The default (64 KiB) is smaller than one relay read, so the socket
        # would be paused and resumed around every read: match the read size instead.
        self._server = await asyncio.start_server(self._accept, host, port, limit=CHUNK_SIZE)
        bound_host, bound_port = self._server.sockets[0].getsockname()[:2]
        log.info("proxy port listening on %s:%d", bound_host, bound_port)
        return bound_host, bound_port

    async def serve(self) -> None:
        """Serve until cancelled (Ctrl-C, a test); then close every connection and return."""
        assert self._server is not None, "call listen() first"
        try:
            await asyncio.Event().wait()  # the listener accepts on its own; we just wait
        finally:
            self._server.close()  # stop accepting first, then end the connections in flight
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Keep a strong reference to every task: the event loop holds only a weak
        # one, and a task nobody references can be garbage-collected mid-flight.
        task = asyncio.create_task(self._handle(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, user_reader: asyncio.StreamReader, user_writer: asyncio.StreamWriter) -> None:
        host, port = user_writer.get_extra_info("peername")[:2]
        peer = f"{host}:{port}"
        started = time.monotonic()
        try:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    target_reader, target_writer = await asyncio.open_connection(*self.target, limit=CHUNK_SIZE)
            except OSError as exc:  # refused, unreachable, or TimeoutError (an OSError too)
                log.warning("%s: cannot reach target %s:%d (%s); closing", peer, *self.target, why(exc))
                return
            try:
                sent, received = await relay(user_reader, user_writer, target_reader, target_writer)
            finally:
                target_writer.close()
            elapsed = time.monotonic() - started
            log.info("%s: closed, %d bytes up, %d bytes down, %.3fs", peer, sent, received, elapsed)
        finally:
            user_writer.close()


def why(exc: OSError) -> str:
    """The reason a connect failed, in a few words."""
    # A TimeoutError has no text of its own (str() of it is empty), and an OSError that sums up
    # several failed addresses has no strerror: say something in both cases.
    if isinstance(exc, TimeoutError):
        return "timed out"
    return exc.strerror or str(exc)


def parse_address(text: str) -> tuple[str, int]:
    """Turn 'host:port' (or '[::1]:port') into a (host, port) pair for argparse."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected host:port with a port from 1 to 65535, got {text!r}")
    return host.strip("[]"), int(port)


def listen_port(text: str) -> int:
    """argparse type for a port to listen on: 0 (any free port) to 65535."""
    # Checked here, not left to the socket: 99999 would end in an OverflowError traceback.
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return int(text)


def listen_error(exc: OSError, host: str, port: int) -> str:
    """A one-line, actionable message for a failed bind."""
    if exc.errno == errno.EADDRINUSE:
        return f"error: port {port} on {host} is already in use; stop the other program or pick another --port"
    if exc.errno == errno.EACCES:
        return f"error: permission denied to listen on {host}:{port}; use a port above 1023"
    return f"error: cannot listen on {host}:{port}: {exc.strerror or exc}"


async def run(target: tuple[str, int], host: str, port: int) -> None:
    """Bind, then relay until cancelled."""
    proxy = Proxy(*target)
    try:
        await proxy.listen(host, port)
    except OSError as exc:
        sys.exit(listen_error(exc, host, port))
    log.info("relaying to %s:%d; press Ctrl-C to stop", *target)
    await proxy.serve()


def main() -> None:
    """Command line: python3 -m stage_0.client TARGET [--host H] [--port P]."""
    parser = argparse.ArgumentParser(
        prog=f"python3 -m {__package__}.client",  # the package's own name, whatever the folder is called
        description="Listen on a local port and relay every connection to TARGET.",
    )
    parser.add_argument("target", type=parse_address, metavar="TARGET", help="where to relay, as host:port")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument(
        "--port", type=listen_port, default=DEFAULT_PORT, help="port to listen on, 0 = any (default: %(default)s)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        asyncio.run(run(args.target, args.host, args.port))
    except KeyboardInterrupt:
        log.info("stopped")


if __name__ == "__main__":
    main()
