"""Who holds which tunnel: the names of the HTTP tunnels, and the TCP tunnels' public ports.

Stage 13's server had one client, and so one tunnel. Now any number of clients connect, and each
holds one tunnel, which is how a user finds it:

- An **HTTP tunnel** has a name, and its users reach it at `http://NAME.<domain>/` (the server
  reads the Host header: routing.py). Names are first come, first served.
- A **TCP tunnel** has a public port of its own, from a configured range (as bore does), for an
  app that doesn't speak HTTP (ssh, a database): its users' bytes carry no name to route by.
- A **TLS tunnel** has a name too, `NAME.<domain>` on the server's TLS port, where the ClientHello's
  server name (SNI) picks it (passthrough.py). Its names are not the HTTP tunnels': each port has its own.

A tunnel belongs to a session, not to a connection: when a client's connection ends, its name or
port stays reserved for the resume window, so that the same client, reconnecting, gets it back.
Anyone else who asks for it meanwhile is told how long it stays kept.
"""

import asyncio
import logging
import secrets
import socket
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field

from . import limits
from .limits import Listener, Slots
from .mux import Mux
from .protocol import Hello, Policy, Refused

log = logging.getLogger(f"{__package__}.server")

# The ports a client may ask for when the server has no --tcp-ports range (bore's default too).
UNPRIVILEGED = (1024, 65535)
# How many random names to try before giving up (with 8 hex digits, a clash is already rare).
NAME_TRIES = 16


@dataclass
class Session:
    """One client's tunnel: its session id, what it holds, and the connection it uses now."""

    session_id: str
    kind: str  # "http", "tcp" or "tls"
    tunnel: str = ""  # the name, or the port as text
    url: str = ""
    peer: str = ""
    source: str = ""  # the address its client connects from (auth.source): bounds count per address
    writer: asyncio.StreamWriter | None = None  # the tunnel connection it uses now
    task: asyncio.Task[None] | None = None  # the task that reads that connection
    mux: Mux | None = None  # its streams, once the handshake is done; None while it reconnects
    expiry: asyncio.TimerHandle | None = None  # set while it waits for its client to come back
    serving: asyncio.Task[None] | None = field(default=None, repr=False)  # a TCP tunnel's accept loop
    listener: Listener | None = field(default=None, repr=False)
    streams_from: Counter[str] = field(default_factory=Counter, repr=False)  # its users' streams now, per address
    policy: Policy = field(default_factory=Policy)  # what its client asks for its users (forwarding.py)


# Serves one user of a TCP tunnel's port (the session it belongs to, the accepted socket).
TcpHandler = Callable[[Session, socket.socket], Coroutine[None, None, None]]
Spawn = Callable[[Coroutine[None, None, None]], None]


@dataclass(frozen=True)
class Public:
    """Where users reach the tunnels: makes each tunnel's URL."""

    domain: str  # HTTP tunnels are NAME.<domain>
    scheme: str  # "http", or "https" when the public port speaks TLS
    port: int  # the public port; TCP tunnels have their own
    tls_port: int = 0  # the TLS port, where TLS tunnels' users come

    def url(self, kind: str, tunnel: str) -> str:
        """`http://myapp.localhost:60624/`, `tcp://localhost:61000` or `tls://myapp.localhost:60626`."""
        if kind == "tcp":
            return f"tcp://{self.domain}:{tunnel}"
        if kind == "tls":  # the user's TLS client says https:// (or what its protocol is) itself
            return f"tls://{tunnel}.{self.domain}:{self.tls_port}"
        default = {"http": 80, "https": 443}[self.scheme]  # a browser adds that port itself
        port = "" if self.port == default else f":{self.port}"
        return f"{self.scheme}://{tunnel}.{self.domain}{port}/"


class Tunnels:
    """The names and TCP ports in use, each held by one session; claims them and gives them back."""

    def __init__(self, tcp_ports: tuple[int, int] | None, spawn: Spawn, serve_tcp: TcpHandler) -> None:
        self.tcp_ports = tcp_ports  # None: any free port the system picks
        self.spawn = spawn
        self.serve_tcp = serve_tcp
        self.host = ""  # set by open(), once the server's ports are bound
        self.slots = Slots(0)
        self.public: Public | None = None
        self.names: dict[str, Session] = {}
        self.tls_names: dict[str, Session] = {}
        self.ports: dict[int, Session] = {}

    def open(self, host: str, slots: Slots, public: Public) -> None:
        """The server is listening: TCP tunnels listen on `host` too, and share the users' `slots`."""
        self.host, self.slots, self.public = host, slots, public

    def find(self, name: str, kind: str = "http") -> Session | None:
        """The session that holds HTTP (or TLS) tunnel `name`, if any."""
        return (self.tls_names if kind == "tls" else self.names).get(name)

    def claim(self, hello: Hello, session: Session) -> None:
        """Give `session` the tunnel `hello` asks for (or any free one); Refused if it can't be had."""
        assert self.public is not None, "the public port is bound first"
        if hello.kind == "tcp":
            port = self._bind(session, int(hello.tunnel) if hello.tunnel else None)
            session.tunnel = str(port)
            self.ports[port] = session
        else:
            names = self.tls_names if hello.kind == "tls" else self.names
            name = hello.tunnel or self._random_name(names)
            if name in names:
                flag = "--tls" if hello.kind == "tls" else "--name"
                raise taken(names[name], f"the name {name!r}", f"pick another with {flag}")
            session.tunnel = name
            names[name] = session
        session.url = self.public.url(hello.kind, session.tunnel)

    def release(self, session: Session) -> None:
        """Free the session's name or port: the next client may have it."""
        if session.kind == "tcp":
            self.ports.pop(int(session.tunnel), None)
            if session.serving is not None and session.listener is not None:
                # Stop accepting, then close the port once the accept loop is done with it.
                session.serving.cancel()
                sock = session.listener.sock
                session.serving.add_done_callback(lambda _: sock.close())
                log.info("tcp port %s closed", session.tunnel)
        else:
            names = self.tls_names if session.kind == "tls" else self.names
            if names.get(session.tunnel) is session:
                del names[session.tunnel]

    def _random_name(self, names: dict[str, Session]) -> str:
        for _ in range(NAME_TRIES):
            name = secrets.token_hex(4)  # 8 hex digits: a valid DNS label, hard to guess
            if name not in names:
                return name
        raise Refused("no free name found; ask for one with --name")

    def _bind(self, session: Session, wanted: int | None) -> int:
        """Listen on a TCP port for the session: `wanted`, or the first free one of the range."""
        if wanted is not None:
            # Without a range, a client may still not ask for a privileged port (25, 80, 443...):
            # a server run as root would bind it for them, in front of whatever the machine serves.
            low, high = self.tcp_ports or UNPRIVILEGED
            if not low <= wanted <= high:
                raise Refused(f"port {wanted} is outside this server's TCP tunnel ports {low}-{high}")
            if wanted in self.ports:
                raise taken(self.ports[wanted], f"port {wanted}", "leave the port out to get a free one")
            candidates = [wanted]
        elif self.tcp_ports is None:
            candidates = [0]  # the system picks a free port
        else:
            candidates = [port for port in range(self.tcp_ports[0], self.tcp_ports[1] + 1) if port not in self.ports]
        for port in candidates:
            try:
                sock = limits.bind(self.host, port, limits.BACKLOG)
            except OSError:
                continue  # another program holds it: try the next
            return self._serve(session, sock)
        if wanted is not None:
            raise Refused(f"port {wanted} is taken; leave the port out to get a free one")
        where = f" in {self.tcp_ports[0]}-{self.tcp_ports[1]}" if self.tcp_ports else ""
        raise Refused(f"no port is free for a TCP tunnel{where}")

    def _serve(self, session: Session, sock: socket.socket) -> int:
        async def handler(conn: socket.socket) -> None:
            await self.serve_tcp(session, conn)

        port = int(sock.getsockname()[1])
        session.listener = Listener("tcp", sock, self.slots, handler)
        session.serving = asyncio.create_task(session.listener.serve(self.spawn))
        log.info("tcp port listening on %s:%d for session %s", self.host, port, session.session_id[:8])
        return port


def taken(holder: Session, what: str, advice: str) -> Refused:
    """The refusal of a tunnel someone holds; if its client is away, how long the tunnel stays kept for it."""
    if holder.expiry is None:
        return Refused(f"{what} is taken; {advice}")
    wait = holder.expiry.when() - asyncio.get_running_loop().time()
    return Refused(f"{what} is taken (kept {wait:.0f}s more for the client that held it); {advice}")
