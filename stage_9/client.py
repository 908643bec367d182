"""Stage 9 client: carry every user from the server to the local app, over one connection.

python3 -m stage_9.client localhost:8000                 # the server on localhost
python3 -m stage_9.client localhost:8000 my.server       # the server on another machine

One connection to the server carries everything. The server opens a stream on it for each user
(a SYN frame); the client dials the local app (the private connection) and relays the stream
into it. The users' streams end with the connection: they ran inside it (in stage 3 each user
had a proxy connection of its own).
"""

import argparse
import asyncio
import logging
import sys

from . import private
from .budget import Budget
from .cli import parse_address, parse_server, port
from .frames import INITIAL_WINDOW
from .mux import Mux
from .protocol import CONTROL_PORT, DATA_LIMIT, TunnelError, client_handshake
from .relay import Stream

log = logging.getLogger(__name__)


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
        self.budget = Budget()  # every stream's window, together (budget.py)
        # Set while the server has us as its client; the demo and the tests wait for it.
        self.connected = asyncio.Event()
        # Dialled for every user, so the address that worked is remembered (see private.py).
        self._local_app = private.LocalApp(*local)
        self._users: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Serve the tunnel until cancelled; TunnelError if the server is unreachable, says no or goes away."""
        try:
            reader, writer = await self._connect()
            try:
                await client_handshake(reader, writer)
                await self._serve_control(reader, writer)
            finally:
                writer.close()
        except OSError as exc:  # TimeoutError (a silent server) is an OSError too
            raise TunnelError(f"lost the connection to the server ({str(exc) or 'timed out'})") from None
        finally:
            for task in self._users:
                task.cancel()
            await asyncio.gather(*self._users, return_exceptions=True)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open the tunnel connection, or raise TunnelError saying why not."""
        try:
            # Frames follow the handshake: a big buffer limit keeps reads large (see protocol.py).
            return await private.dial(self.server, self.control_port, limit=DATA_LIMIT)
        except OSError as exc:
            reason = private.why(exc)
            raise TunnelError(f"cannot reach the server at {self.server}:{self.control_port} ({reason})") from None

    async def _serve_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Relay the server's streams; raise TunnelError when the connection is lost."""
        log.info("tunnel up: the server at %s:%d sends its users to %s:%d", self.server, self.control_port, *self.local)
        mux = Mux(reader, writer, peer="the server", on_open=self._open)
        self.connected.set()
        try:
            await mux.run()
            raise TunnelError("the server closed the connection")
        finally:
            self.connected.clear()

    def _open(self, stream_id: int) -> Stream:
        """The server opened a stream for a user: dial the local app for it, in a task of its own."""
        stream = Stream()
        # Its first window is the protocol's: the server may have sent its bytes already (budget.py).
        self.budget.take(INITIAL_WINDOW)
        stream.charge(self.budget)
        log.debug("stream %d: the server opened it", stream_id)
        # One task per user, so a slow local app never holds up the others.
        task = asyncio.create_task(private.serve_user(stream, self._local_app))
        self._users.add(task)  # a strong reference, as the server keeps
        task.add_done_callback(self._users.discard)
        return stream


def main() -> None:
    """Command line: python3 -m stage_9.client LOCAL [SERVER] [--control-port P]."""
    parser = argparse.ArgumentParser(
        prog=f"python3 -m {__package__}.client",
        description="Open a tunnel from a stage 9 server to LOCAL, the app on this machine that users should reach.",
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
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    client = Client(args.local, server, server_port or args.control_port or CONTROL_PORT)
    try:
        asyncio.run(client.run())
    except TunnelError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
