"""Stage 22 client: stage 21's client (inspector, guards, TLS tunnels), on the event loop of your choice.

python3 -m stage_22.client localhost:8000 --ca certs/ca.pem --name myapp   # http://myapp.localhost:60624/
python3 -m stage_22.client localhost:22 tunnel.example.com --tcp          # a public TCP port for ssh
NGROK_BASIC_AUTH=me:pw python3 -m stage_22.client localhost:8000 --allow-cidr 203.0.113.0/24   # a guarded one
python3 -m stage_22.client localhost:8443 tunnel.example.com --tls myapp  # the app's own TLS, by SNI

One TLS connection to the server carries everything. The server opens a stream on it for each user
(a SYN frame, which names the user's address); the client dials the local app and relays the stream
into it. Heartbeats show that the server is still there; when the connection is lost, the
client reconnects with backoff and resumes its session. The users' streams end with the lost
connection: they ran inside it (in stage 3 each user had a proxy connection of its own).

The client asks for a tunnel in its hello (a name, or a TCP port), and the server answers
with its URL. Resuming, it asks for the same tunnel again, with its session id, and so keeps its name.

New in stage 20: the server tells the app who asked (X-Forwarded-For, -Proto, -Host) unless
--no-forwarded-headers, and guards the tunnel as the client asks in its hello: --basic-auth,
--allow-cidr, --deny-cidr (protocol.Policy). The server enforces them: refused users never get here.

The client also observes every HTTP exchange it relays (observe.py), and logs a line for each one.
It keeps the last ones for the inspector's page at http://127.0.0.1:4040, live, where a click
sends a request to the local app again (`--no-inspect`: none of this). A TLS tunnel's connections
are encrypted end to end: the inspector lists each one, its server name and its bytes, and no more.
"""

import argparse
import asyncio
import logging
import os
import ssl
import sys
from dataclasses import dataclass, field

from . import auth, backoff, loops, private
from .budget import Budget
from .capture import ObservedStream, Store
from .cli import checked, listen_port, name, parse_address, parse_server, port, positive_seconds
from .frames import INITIAL_WINDOW
from .inspector import INSPECT_PORT, Inspector
from .mux import Mux
from .observe import Observer, Sealed
from .protocol import (
    CONTROL_PORT,
    DATA_LIMIT,
    HALF_CLOSED_TIMEOUT,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_RULES,
    Hello,
    Policy,
    Refused,
    TunnelError,
    credentials,
    network,
)
from .relay import Stream, Timeouts
from .tls import client_context, load_error, verify_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientSettings:
    """Every setting of the client, its bounds and its secret, in one object that Client takes.

    As ServerSettings does for the server (the client has its own: it never imports a server module).
    """

    name: str | None = None
    """The HTTP tunnel's name, NAME.<the server's domain>; None: the server picks a random one."""
    tcp: bool = False
    """Ask for a TCP tunnel (a public port of its own, for any protocol) instead of an HTTP one."""
    tls_tunnel: bool = False
    """Ask for a TLS tunnel named `name`: its users' TLS, routed by SNI, reaches the local app untouched."""
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
    policy: Policy = field(default_factory=Policy)
    """What the server does for our users: X-Forwarded-* headers, basic auth, CIDR rules (forwarding.py)."""


class Client:
    """Keeps the control connection to a server up and relays each user it announces to the local app."""

    def __init__(
        self,
        local: tuple[str, int],
        server: str = "localhost",
        control_port: int = CONTROL_PORT,
        settings: ClientSettings = ClientSettings(),
        *,
        tls: ssl.SSLContext | None = None,
        store: Store | None = None,
    ) -> None:
        self.local = local
        self.store = store  # observes every HTTP exchange, and logs it (None: nothing is observed)
        self.server = server
        self.control_port = control_port
        self.settings = settings
        self.tls = tls or client_context()  # the system's CAs
        self.kind = "tcp" if settings.tcp else "tls" if settings.tls_tunnel else "http"
        # The tunnel we asked for, then the one we got (a name, or a TCP port): asked for again
        # when we reconnect, with the session id, so that we get it back. Its URL, for users.
        self.tunnel: str | None = settings.name
        self.url: str | None = None
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
                        hello = Hello(self.kind, self.tunnel, self.session_id, self.settings.policy)
                        welcome = await auth.client_handshake(reader, writer, self.secret, hello)
                        self.session_id, self.tunnel, self.url = welcome.session_id, welcome.tunnel, welcome.url
                        attempt = 0  # we got in: after the next outage, start again with a short wait
                        await self._serve_control(reader, writer)
                    finally:
                        writer.close()
                except Refused:
                    raise  # a wrong secret, a taken name, a certificate we can't trust: retrying won't help
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
        """Open the tunnel connection and check the server's certificate, or raise saying why not."""
        where = f"the server at {self.server}:{self.control_port}"
        try:
            # Frames follow the handshake: a big buffer limit keeps reads large (see protocol.py).
            return await private.dial(self.server, self.control_port, self.tls, limit=DATA_LIMIT)
        except ssl.SSLCertVerificationError as exc:
            raise Refused(verify_error(exc, self.server)) from None  # an impostor, or a missing --ca
        except ssl.SSLError as exc:
            if exc.reason == "WRONG_VERSION_NUMBER":  # the reply was not TLS at all
                raise Refused(f"{where} does not speak TLS; is it a stage 22 server?") from None
            raise TunnelError(f"TLS with {where} failed ({exc.reason or exc})") from None
        except OSError as exc:
            reason = private.why(exc)
            raise TunnelError(f"cannot reach {where} ({reason})") from None

    async def _serve_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Relay the server's streams and send heartbeats; raise TunnelError when the connection is lost."""
        log.info("tunnel up: %s -> %s:%d", self.url, *self.local)
        log.info("event loop: %s", loops.running())
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
        except asyncio.CancelledError:
            # Stopped (Ctrl-C): say goodbye, so that the server frees our name at once instead of
            # keeping it for the resume window (a client started again would find it taken).
            await mux.goodbye("the client stopped")
            raise
        finally:
            self.connected.clear()

    def _open(self, stream_id: int, user: str) -> Stream:
        """The server opened a stream for `user` (its address): dial the local app for it, in a task of its own."""
        observer = Sealed if self.kind == "tls" else Observer  # TLS: encrypted, only its connections are seen
        stream = ObservedStream(self.timeouts, observer(self.store, user)) if self.store else Stream(self.timeouts)
        # Its first window is the protocol's: the server may have sent its bytes already (budget.py).
        self.budget.take(INITIAL_WINDOW)
        stream.charge(self.budget)
        log.debug("stream %d: the server opened it", stream_id)
        # One task per user, so a slow local app never holds up the others.
        task = asyncio.create_task(private.serve_user(stream, self._local_app))
        self._users.add(task)  # a strong reference, as the server keeps
        task.add_done_callback(self._users.discard)
        return stream


async def run(client: Client, inspector: Inspector | None) -> None:
    """Run the client, and the inspector's page while it runs (TunnelError if the page's port is taken)."""
    if inspector is None:
        await client.run()
        return
    await inspector.listen()
    try:
        await client.run()
    finally:
        await inspector.close()


def main() -> None:
    """Command line: python3 -m stage_22.client LOCAL [SERVER] [--ca FILE] [--name NAME | --tcp | --tls NAME] ..."""
    parser = argparse.ArgumentParser(
        prog=f"python3 -m {__package__}.client",
        description="Open a tunnel from a stage 22 server to LOCAL, the app on this machine that users should reach.",
    )
    parser.add_argument("local", type=parse_address, metavar="LOCAL", help="the local app, as host:port")
    parser.add_argument(
        "server",
        nargs="?",
        type=parse_server,
        default="localhost",
        metavar="SERVER",
        help="host or host:port (default: localhost); its certificate must name this host",
    )
    parser.add_argument(
        "--control-port", type=port, metavar="PORT", help=f"the server's control port (default: {CONTROL_PORT})"
    )
    parser.add_argument(
        "--ca", metavar="FILE", help="trust the server's certificate if this CA signed it (default: the system's CAs)"
    )
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--name", type=name, help="the HTTP tunnel's name: NAME.<the server's domain> (default: random)")
    kind.add_argument("--tcp", action="store_true", help="a TCP tunnel: a public port of its own, for any protocol")
    kind.add_argument(
        "--tls",
        type=name,
        metavar="NAME",
        help="a TLS tunnel NAME.<the server's domain> on its TLS port: LOCAL speaks TLS with its own certificate",
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
    parser.add_argument(
        "--inspect-port",
        type=listen_port,
        default=INSPECT_PORT,
        metavar="PORT",
        help="the inspector's web page, a list of every request; 0 = any (default: %(default)s)",
    )
    parser.add_argument(
        "--inspect-host", default="127.0.0.1", help="address of the inspector's page (default: %(default)s)"
    )
    parser.add_argument("--no-inspect", action="store_true", help="observe nothing: no page, no log lines")
    parser.add_argument(
        "--no-forwarded-headers",
        action="store_true",
        help="the server adds no X-Forwarded-For, -Proto or -Host to the requests: the app sees only the tunnel",
    )
    parser.add_argument(
        "--basic-auth",
        type=checked(credentials),
        default=os.environ.get("NGROK_BASIC_AUTH"),
        metavar="USER:PASS",
        help="users must log in with this, checked by the server (default: $NGROK_BASIC_AUTH, kept out of ps)",
    )
    for verb, who in (("allow", "only users from this network"), ("deny", "no user from this network")):
        parser.add_argument(
            f"--{verb}-cidr",
            type=checked(network),
            action="append",
            default=[],
            metavar="CIDR",
            help=f"{who} (e.g. 203.0.113.0/24; repeatable; a deny rule wins)",
        )
    loops.add_option(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    args = parser.parse_args()
    server, server_port = args.server
    if server_port and args.control_port:
        parser.error("give the control port once: in SERVER (host:port) or with --control-port")
    if (args.tcp or args.tls) and (args.basic_auth or args.no_forwarded_headers):
        parser.error("--basic-auth (or $NGROK_BASIC_AUTH) and --no-forwarded-headers are for HTTP tunnels only")
    if len(args.allow_cidr) + len(args.deny_cidr) > MAX_RULES:
        parser.error(f"at most {MAX_RULES} --allow-cidr and --deny-cidr rules together")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    try:
        context = client_context(args.ca)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        sys.exit(f"error: {load_error(f'CA file {args.ca}', exc, args.ca)}")
    client = Client(
        args.local,
        server,
        server_port or args.control_port or CONTROL_PORT,
        ClientSettings(
            name=args.name or args.tls,
            tcp=args.tcp,
            tls_tunnel=args.tls is not None,
            secret=args.secret,
            heartbeat_interval=args.heartbeat_interval,
            heartbeat_timeout=args.heartbeat_timeout,
            max_backoff=args.max_backoff,
            idle_timeout=args.idle_timeout,
            half_closed_timeout=args.half_closed_timeout,
            policy=Policy(
                not args.no_forwarded_headers, args.basic_auth, tuple(args.allow_cidr), tuple(args.deny_cidr)
            ),
        ),
        tls=context,
        store=None if args.no_inspect else Store(),
    )
    inspector = Inspector(client.store, args.local, args.inspect_host, args.inspect_port) if client.store else None
    try:
        loop = loops.factory(args.loop)  # first: a LoopError leaves no coroutine un-awaited
        loops.run(run(client, inspector), loop)
    except TunnelError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
