"""Stage 1 server: accept control connections and answer every `ping` with `pong`.

python3 -m stage_1.server            # then: python3 -m stage_1.client
"""

import argparse
import asyncio
import errno
import logging
import sys

from .protocol import (
    CONTROL_PORT,
    MAX_LINE,
    Ping,
    Pong,
    ProtocolError,
    read_message,
    say_goodbye,
    write_message,
)

log = logging.getLogger(__name__)


class Server:
    """The tunnel server, so far with only its control port."""

    def __init__(self) -> None:
        self._listener: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def listen(self, host: str = "127.0.0.1", control_port: int = CONTROL_PORT) -> tuple[str, int]:
        """Bind the control port (0 = any free port) and return its real address."""
        # limit=MAX_LINE caps how much a reader buffers while looking for a newline.
        self._listener = await asyncio.start_server(self._accept, host, control_port, limit=MAX_LINE)
        bound_host, bound_port = self._listener.sockets[0].getsockname()[:2]
        log.info("control port listening on %s:%d", bound_host, bound_port)
        return bound_host, bound_port

    async def serve(self) -> None:
        """Serve until cancelled (Ctrl-C, a test); then close every connection and return."""
        assert self._listener is not None, "call listen() first"
        try:
            await asyncio.Event().wait()  # the listener accepts on its own; we just wait
        finally:
            self._listener.close()  # stop accepting first, then end the connections in flight
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Keep a strong reference to every task: the event loop holds only a weak
        # one, and a task nobody references can be garbage-collected mid-flight.
        task = asyncio.create_task(self._handle_control(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        peer = f"{host}:{port}"
        log.info("%s: control connection opened", peer)
        try:
            await self._answer_pings(reader, writer)
        except ProtocolError as exc:
            # Tell the peer what went wrong, then hang up: a confused peer must
            # not be able to keep a connection (and its buffer) alive.
            log.warning("%s: %s; closing", peer, exc)
            await say_goodbye(reader, writer, str(exc))
        except OSError as exc:
            log.info("%s: connection lost (%s)", peer, exc)
        finally:
            writer.close()
            log.info("%s: control connection closed", peer)

    async def _answer_pings(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (message := await read_message(reader)) is not None:
            match message:
                case Ping():
                    await write_message(writer, Pong())
                case _:
                    raise ProtocolError(f"unexpected message from a client: {message}")


def listen_error(exc: OSError, host: str, port: int) -> str:
    """A one-line, actionable message for a failed bind."""
    if exc.errno == errno.EADDRINUSE:
        return f"error: port {port} on {host} is already in use; stop the other program or pick another port"
    if exc.errno == errno.EACCES:
        return f"error: permission denied to listen on {host}:{port}; use a port above 1023"
    return f"error: cannot listen on {host}:{port}: {exc.strerror or exc}"


def listen_port(text: str) -> int:
    """argparse type for a port to listen on: 0 (any free port) to 65535."""
    # Checked here, not left to the socket: 99999 would end in an OverflowError traceback.
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return int(text)


async def run(host: str, control_port: int) -> None:
    """Bind, then serve until cancelled."""
    server = Server()
    try:
        await server.listen(host, control_port)
    except OSError as exc:
        sys.exit(listen_error(exc, host, control_port))
    await server.serve()


def main() -> None:
    """Command line: python3 -m stage_1.server [--host H] [--control-port P]."""
    parser = argparse.ArgumentParser(
        prog=f"python3 -m {__package__}.server", description="Answer every ping on the control port with pong."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument(
        "--control-port", type=listen_port, default=CONTROL_PORT, help="control port, 0 = any (default: %(default)s)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    try:
        asyncio.run(run(args.host, args.control_port))
    except KeyboardInterrupt:
        log.info("stopped")


if __name__ == "__main__":
    main()
