"""Stage 13 client: carry every user from the server to the local app, and keep the tunnel up.

python3 -m stage_13.client localhost:8000                 # the server on localhost
python3 -m stage_13.client localhost:8000 my.server       # with NGROK_SECRET set on both sides

One connection to the server carries everything. The server opens a stream on it for each user
(a SYN frame); the client dials the local app (the private connection) and relays the stream
into it. Heartbeats show that the server is still there; when the connection is lost, the
client reconnects with backoff and resumes its session. The users' streams end with the lost
connection: they ran inside it (in stage 4 each user had a proxy connection of its own).
"""

import argparse
import asyncio
import logging
import os
import sys
from dataclasses import dataclass, field

from . import auth, backoff, private
from .budget import Budget
from .cli import parse_address, parse_server, port, positive_seconds
from .frames import INITIAL_WINDOW
from .mux import Mux
from .protocol import (
    CONTROL_PORT,
    DATA_LIMIT,
    HALF_CLOSED_TIMEOUT,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TIMEOUT,
    IDLE_TIMEOUT,
    Refused,
    TunnelError,
)
from .relay import Stream, Timeouts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientSettings:
    """Every setting of the client, its bounds and its secret, in one object that Client takes.

    As ServerSettings does for the server (the client has its own: it never imports a server module).
    """

    secret: str | None = field(default=None, repr=False)  # kept out of repr(), which a log may show
    """The server's secret (auth.py); None or empty: the server must have none."""
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    """How often to ping the server: an idle NAT or firewall forgets a silent connection."""
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    """Silence after which the server counts as gone, and the client reconnects."""
    max_backoff: float = backoff.BACKOFF_CAP
    """The longest wait between two reconnect attempts: a server back after an outage sees us soon."""
    idle_timeout: float = IDLE_TIMEOUT
    """A relay with no byte either way for this long is closed: a silent user holds no descriptor forever."""
    half_closed_timeout: float = HALF_CLOSED_TIMEOUT
    """A half-closed relay whose other direction is silent this long is closed."""


class Client:
    """Keeps the control connection to a server up and relays each user it announces to the local app."""

    def __init__(
        self,
        local: tuple[str, int],
        server: str = "localhost",
        control_port: int = CONTROL_PORT,
        settings: ClientSettings = ClientSettings(),
    ) -> None:
        self.local = local
        self.server = server
        self.control_port = control_port
        self.settings = settings
        self.secret = settings.secret or None  # an empty secret would be no secret at all
        self.timeouts = Timeouts(settings.idle_timeout, settings.half_closed_timeout)  # for silent relays: relay.py
        self.budget = Budget()  # every stream's window, together (budget.py)
        # Set while the server has us as its client; the demo and the tests wait for it.
        self.connected = asyncio.Event()
        # Given by the server at the first handshake; presenting it again when we
        # reconnect proves that we are the same client, so the server lets us back in.
        self.session_id: str | None = None
        # Dialled for every user, so the address that worked is remembered (see private.py).
        self._local_app = private.LocalApp(*local)
        self._users: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Keep the tunnel up until cancelled; raise Refused if the server says no (a wrong secret)."""
        attempt = 0
        try:
            while True:
                try:
                    reader, writer = await self._connect()
                    try:
                        welcome = await auth.client_handshake(reader, writer, self.secret, self.session_id)
                        self.session_id = welcome.session_id
                        attempt = 0  # we got in: after the next outage, start again with a short wait
                        await self._serve_control(reader, writer)
                    finally:
                        writer.close()
                except Refused:
                    raise  # a wrong secret or another client: retrying would not help
                except (TunnelError, OSError) as exc:  # TimeoutError (a silent server) is an OSError too
                    wait = backoff.delay(attempt, cap=self.settings.max_backoff)
                    attempt += 1
                    log.warning("%s; reconnecting in %.1fs (attempt %d)", str(exc) or "timed out", wait, attempt)
                    await asyncio.sleep(wait)
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
        """Relay the server's streams and send heartbeats; raise TunnelError when the connection is lost."""
        log.info("tunnel up: the server at %s:%d sends its users to %s:%d", self.server, self.control_port, *self.local)
        # The server answers every ping, so a silence longer than heartbeat_timeout means it (or
        # the network on the way) is gone, even if TCP has not noticed (Mux.run raises TimeoutError).
        mux = Mux(
            reader,
            writer,
            peer="the server",
            heartbeat_timeout=self.settings.heartbeat_timeout,
            heartbeat_interval=self.settings.heartbeat_interval,
            on_open=self._open,
        )
        self.connected.set()
        try:
            await mux.run()
            raise TunnelError("the server closed the connection")
        finally:
            self.connected.clear()

    def _open(self, stream_id: int) -> Stream:
        """The server opened a stream for a user: dial the local app for it, in a task of its own."""
        stream = Stream(self.timeouts)
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
    """Command line: python3 -m stage_13.client LOCAL [SERVER] [--control-port P] [--secret S] ..."""
    parser = argparse.ArgumentParser(
        prog=f"python3 -m {__package__}.client",
        description="Open a tunnel from a stage 13 server to LOCAL, the app on this machine that users should reach.",
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
        "--secret",
        default=os.environ.get("NGROK_SECRET"),
        help="the server's secret (default: $NGROK_SECRET, which keeps it out of ps)",
    )
    for flag, seconds, what in (
        ("heartbeat-interval", HEARTBEAT_INTERVAL, "how often to ping the server"),
        ("heartbeat-timeout", HEARTBEAT_TIMEOUT, "silence after which the server counts as gone"),
        ("max-backoff", backoff.BACKOFF_CAP, "the longest wait between two reconnect attempts"),
        ("idle-timeout", IDLE_TIMEOUT, "close a user's stream after this long with no byte either way"),
        ("half-closed-timeout", HALF_CLOSED_TIMEOUT, "close a half-closed stream after this long silent"),
    ):
        parser.add_argument(
            f"--{flag}",
            type=positive_seconds,
            default=seconds,
            metavar="SECONDS",
            help=f"{what} (default: %(default)s)",
        )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    args = parser.parse_args()
    server, server_port = args.server
    if server_port and args.control_port:
        parser.error("give the control port once: in SERVER (host:port) or with --control-port")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    client = Client(
        args.local,
        server,
        server_port or args.control_port or CONTROL_PORT,
        ClientSettings(
            secret=args.secret,
            heartbeat_interval=args.heartbeat_interval,
            heartbeat_timeout=args.heartbeat_timeout,
            max_backoff=args.max_backoff,
            idle_timeout=args.idle_timeout,
            half_closed_timeout=args.half_closed_timeout,
        ),
    )
    try:
        asyncio.run(client.run())
    except TunnelError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
