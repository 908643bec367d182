"""Stage 4 client: carry every user from the server to the local app, and keep the tunnel up.

python -m stage_4.client localhost:8000                 # the server on localhost
python -m stage_4.client localhost:8000 my.server       # with NGROK_SECRET set on both sides

On every `create_proxy <id>` it dials the local app (the private connection) and the proxy
port, and relays one into the other. Heartbeats show that the server is still there; when the
control connection is lost, the client reconnects with backoff, and users already connected
keep their connections (a relay does not need the control connection).
"""

import argparse
import asyncio
import contextlib
import logging
import os
import sys

from . import auth, backoff, private
from .cli import parse_address, parse_server, port, positive_seconds
from .protocol import (
    CONTROL_PORT,
    HALF_CLOSED_TIMEOUT,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_LINE,
    NETWORK_TIMEOUT,
    PROXY_PORT,
    CreateProxy,
    Error,
    LocalError,
    Message,
    Ping,
    Pong,
    ProxyError,
    Refused,
    TunnelError,
    read_message,
    write_message,
)
from .relay import Timeouts

log = logging.getLogger("stage_4.client")


class Client:
    """Keeps the control connection to a server up and relays each user it announces to the local app."""

    def __init__(
        self,
        local: tuple[str, int],
        server: str = "localhost",
        control_port: int = CONTROL_PORT,
        proxy_port: int = PROXY_PORT,
        *,
        secret: str | None = None,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
        max_backoff: float = backoff.BACKOFF_CAP,
        idle_timeout: float = IDLE_TIMEOUT,
        half_closed_timeout: float = HALF_CLOSED_TIMEOUT,
    ) -> None:
        self.local = local
        self.server = server
        self.control_port = control_port
        self.proxy_port = proxy_port
        self.secret = secret or None  # an empty secret would be no secret at all
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.max_backoff = max_backoff
        self.timeouts = Timeouts(idle_timeout, half_closed_timeout)  # for silent relays: see relay.py
        # Set while the server has us as its client; the demo and the tests wait for it.
        self.connected = asyncio.Event()
        # Given by the server at the first handshake; presenting it again when we
        # reconnect proves that we are the same client, so the server lets us back in.
        self.session_id: str | None = None
        # Dialled for every user, so the address that worked is remembered (see private.py).
        self._local_app = private.LocalApp(*local)
        self._control: asyncio.StreamWriter | None = None
        self._users: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Keep the tunnel up until cancelled; raise Refused if the server says no (a wrong secret)."""
        # --8<-- [start:reconnect]
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
                except (TunnelError, OSError) as exc:  # TimeoutError is an OSError too
                    wait = backoff.delay(attempt, cap=self.max_backoff)
                    attempt += 1
                    log.warning("%s; reconnecting in %.1fs (attempt %d)", str(exc) or "timed out", wait, attempt)
                    await asyncio.sleep(wait)
                    # --8<-- [end:reconnect]
        finally:
            for task in self._users:
                task.cancel()
            await asyncio.gather(*self._users, return_exceptions=True)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open the control connection, or raise TunnelError saying why not."""
        try:
            return await private.dial(self.server, self.control_port, limit=MAX_LINE)
        except OSError as exc:
            reason = private.why(exc)
            raise TunnelError(f"cannot reach the server at {self.server}:{self.control_port} ({reason})") from None

    async def _serve_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Send heartbeats and handle the server's messages; raise TunnelError when the connection is lost."""
        log.info("tunnel up: the server at %s:%d sends its users to %s:%d", self.server, self.control_port, *self.local)
        self._control = writer
        # Proxy connections go to the address this connection reached: the name
        # (`localhost`, a DNS name) is looked up once per control connection, not once per user.
        proxy = (writer.get_extra_info("peername")[0], self.proxy_port)
        self.connected.set()
        # --8<-- [start:heartbeat_deadline]
        pinger = asyncio.create_task(self._send_heartbeats(writer))
        try:
            while True:
                try:
                    # The server answers every ping, so a silence longer than this means it
                    # (or the network on the way) is gone, even if TCP has not noticed.
                    async with asyncio.timeout(self.heartbeat_timeout):
                        message = await read_message(reader)
                except TimeoutError:
                    raise TunnelError(f"no word from the server for {self.heartbeat_timeout:g}s") from None
                    # --8<-- [end:heartbeat_deadline]
                match message:
                    case CreateProxy(conn_id):
                        log.debug("conn %s: the server asks for a proxy connection", conn_id[:8])
                        # One task per user, so a slow user never holds up the others.
                        task = asyncio.create_task(self._serve_user(conn_id, proxy))
                        self._users.add(task)  # a strong reference, as the server keeps
                        task.add_done_callback(self._users.discard)
                    case Pong():
                        pass  # the server is alive: reading anything resets our deadline
                    case Error(reason):
                        raise TunnelError(f"the server closed the tunnel: {reason}")
                    case None:
                        raise TunnelError("the server closed the control connection")
                    case _:
                        log.warning("ignoring unexpected message from the server: %s", message)
        finally:
            self.connected.clear()
            self._control = None
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)

    # --8<-- [start:send_heartbeats]
    async def _send_heartbeats(self, writer: asyncio.StreamWriter) -> None:
        # A ping every interval shows the server that we are alive, and its pongs show us the same.
        with contextlib.suppress(OSError):  # a dead connection: the reading side will notice
            while True:
                await asyncio.sleep(self.heartbeat_interval)
                await write_message(writer, Ping())
                # --8<-- [end:send_heartbeats]

    async def _serve_user(self, conn_id: str, proxy: tuple[str, int]) -> None:
        try:
            await private.serve_user(conn_id, self._local_app, proxy, self.timeouts)
        except private.LocalAppDown as exc:
            log.warning("conn %s: cannot reach the local app (%s); telling the server", conn_id[:8], exc)
            await self._report(LocalError(conn_id, str(exc)))
        except private.ProxyFailed as exc:
            # Tell the server now: its user gets a 502 naming the cause, not a 504 after the proxy timeout.
            log.warning("conn %s: cannot open the proxy connection (%s); telling the server", conn_id[:8], exc)
            await self._report(ProxyError(conn_id, str(exc)))

    async def _report(self, message: Message) -> None:
        """Tell the server something on the control connection, if there is one right now."""
        if self._control is None:
            return  # reconnecting: the server's proxy timeout will answer the user instead
        with contextlib.suppress(OSError):  # TimeoutError included: a stuck connection is not our problem here
            async with asyncio.timeout(NETWORK_TIMEOUT):
                await write_message(self._control, message)


def main() -> None:
    """Command line: python -m stage_4.client LOCAL [SERVER] [--control-port P] [--proxy-port P] [--secret S] ..."""
    parser = argparse.ArgumentParser(
        prog="python -m stage_4.client",
        description="Open a tunnel from a stage 4 server to LOCAL, the app on this machine that users should reach.",
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
    parser.add_argument(
        "--secret",
        default=os.environ.get("NGROK_SECRET"),
        help="the server's secret (default: $NGROK_SECRET, which keeps it out of ps)",
    )
    for flag, seconds, what in (
        ("heartbeat-interval", HEARTBEAT_INTERVAL, "how often to ping the server"),
        ("heartbeat-timeout", HEARTBEAT_TIMEOUT, "silence after which the server counts as gone"),
        ("max-backoff", backoff.BACKOFF_CAP, "the longest wait between two reconnect attempts"),
        ("idle-timeout", IDLE_TIMEOUT, "close a user's relay after this long with no byte either way"),
        ("half-closed-timeout", HALF_CLOSED_TIMEOUT, "close a half-closed relay after this long silent"),
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
        args.proxy_port,
        secret=args.secret,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout,
        max_backoff=args.max_backoff,
        idle_timeout=args.idle_timeout,
        half_closed_timeout=args.half_closed_timeout,
    )
    try:
        asyncio.run(client.run())
    except TunnelError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
