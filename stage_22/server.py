"""Stage 22 server: stage 21's (HTTP tunnels by name, TCP by port, TLS by SNI), on the event loop of your choice.

python3 -m stage_22.certs certs/              # a private CA and a certificate for localhost (once)
python3 -m stage_22.server --cert certs/server.pem --key certs/server.key
python3 -m stage_22.client localhost:8000 --ca certs/ca.pem --name myapp    # then: curl http://myapp.localhost:60624/

Each client's one connection lives in session.py (auth, heartbeats, resume) and mux.py (its
streams); who holds which tunnel is in tunnels.py, and how an HTTP user's Host header picks one
in routing.py; how a TLS user's ClientHello picks one in passthrough.py (sni.py parses it). Here
are the ports, the users, and what a user sees when no tunnel can serve them.
"""

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import ssl
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from typing import cast

from . import auth, forwarding, limits, loops, pages, passthrough, routing, sni, tls
from .budget import MEMORY_BUDGET, Budget, MiB
from .cli import domain, listen_error, listen_port, port_range, positive_seconds, whole_number
from .forwarding import Forwarding
from .frames import INITIAL_WINDOW
from .limits import Listener, Slots
from .protocol import (
    CONTROL_PORT,
    DATA_LIMIT,
    HALF_CLOSED_TIMEOUT,
    HEARTBEAT_TIMEOUT,
    IDLE_TIMEOUT,
    KEEPALIVE_TIMEOUT,
    MAX_STREAMS,
    MAX_STREAMS_PER_ADDRESS,
    MAX_TUNNELS,
    MAX_TUNNELS_PER_ADDRESS,
    MAX_WAITING,
    NETWORK_TIMEOUT,
    PROXY_TIMEOUT,
    PUBLIC_PORT,
    RESUME_WINDOW,
    TLS_PORT,
    TunnelError,
    printable,
)
from .relay import Stream, Timeouts
from .routing import BadRequest
from .session import Sessions
from .tunnels import Public, Session, Tunnels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    """Every setting of the server, its bounds and its secret, in one object that Server takes.

    A test or the demo names only what it changes, and a new bound is one more field here, not one
    more argument of every function that passes the settings on. Frozen: a running server's bounds
    don't change under it; `dataclasses.replace(settings, secret=...)` makes a changed copy.
    """

    proxy_timeout: float = PROXY_TIMEOUT
    """How long a user waits for the client to accept its stream (or for memory): then a 504 (or 503) page."""
    handshake_timeout: float = NETWORK_TIMEOUT
    """How long a new control connection may take to shake hands: one that never finishes is let go."""
    secret: str | None = field(default=None, repr=False)  # kept out of repr(), which a log may show
    """What the client must prove it knows (auth.py); None lets any client in (with a warning off loopback)."""
    domain: str = "localhost"
    """HTTP tunnels are NAME.DOMAIN: the Host header a user sends names its tunnel (routing.py)."""
    tcp_ports: tuple[int, int] | None = None
    """The ports TCP tunnels get, e.g. (61000, 61099) for a firewall that opens those; None: any free port."""
    resume_window: float = RESUME_WINDOW
    """How long a gone client's tunnel is kept for it: a laptop back from a coffee gets its URL back."""
    max_tunnels_per_address: int = MAX_TUNNELS_PER_ADDRESS
    """Tunnels one address (an IPv6 /64) may hold, kept ones included: one host can't take them all."""
    head_timeout: float = routing.HEAD_TIMEOUT
    """An HTTP user sends its request's head within this (routing.py): a slow one can't hold a slot forever."""
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    """Silence after which the client counts as gone, even if TCP has not noticed (a laptop asleep)."""
    max_waiting: int = MAX_WAITING
    """Users waiting at once for the client to accept their stream: a flood of users must not pile up."""
    idle_timeout: float = IDLE_TIMEOUT
    """A user's stream with no byte either way for this long is closed: a silent user holds no slot forever."""
    half_closed_timeout: float = HALF_CLOSED_TIMEOUT
    """A half-closed stream whose other direction is silent this long is closed."""
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    """A user silent this long after its answer is closed: a kept-alive connection, waiting for nothing."""
    max_streams_per_address: int = MAX_STREAMS_PER_ADDRESS
    """Streams one address (an IPv6 /64) may have open at once: one script (or crowd behind a NAT) can't take all."""
    max_startups: int = limits.MAX_STARTUPS
    """TLS connections per port not yet proved, at most at once: each costs ~330 KB, a flood of them can't OOM us."""
    memory_budget: int = MEMORY_BUDGET
    """The bytes every user's stream together may make the server buffer (budget.py): memory stays bounded."""


@dataclass(frozen=True)
class Ports:
    """The three ports a server really bound (useful when asked for port 0)."""

    control: int
    public: int
    tls: int


class Server:
    """The tunnel server: many clients, each holding one tunnel; many users, one stream per user."""

    def __init__(
        self, settings: ServerSettings = ServerSettings(), *, tls: ssl.SSLContext, https: ssl.SSLContext | None = None
    ) -> None:
        self.settings = settings
        self.timeouts = Timeouts(settings.idle_timeout, settings.half_closed_timeout, settings.keepalive_timeout)
        # TCP tunnels' users are not closed when silent after their answer, as the public port's are:
        # an ssh session may stay quiet for minutes (see relay.py).
        self.tcp_timeouts = Timeouts(settings.idle_timeout, settings.half_closed_timeout)
        self.domain = settings.domain.lower()
        self.tls, self.https = tls, https  # the control port's TLS; the public port's (HTTPS), if given
        self.waiting = 0  # users whose stream the client has not accepted yet
        self.budget = Budget(settings.memory_budget)  # every stream's window, together (budget.py)
        self._listeners: list[Listener] = []
        # TLS connections not yet proved, per port (limits.Startups): the HTTPS port's only with --https-cert.
        self._startups = {role: limits.Startups(role, settings.max_startups) for role in ("control", "public")}
        self._tasks: set[asyncio.Task[None]] = set()
        self._tunnels = Tunnels(settings.tcp_ports, self._spawn, self._handle_tcp)
        self._sessions = Sessions(
            self._tunnels,
            settings.secret,
            settings.handshake_timeout,
            settings.heartbeat_timeout,
            settings.resume_window,
            settings.max_tunnels_per_address,
        )

    async def listen(
        self,
        host: str = "127.0.0.1",
        control_port: int = CONTROL_PORT,
        public_port: int = PUBLIC_PORT,
        tls_port: int = 0,
    ) -> Ports:
        """Bind the three ports (0 = any free port) and return the real ones; TunnelError if one is taken.

        The TLS port is any free one unless named (tests must not fight for TLS_PORT, the command line's default).
        """
        before, fd_limit = limits.raise_fd_limit()
        slots = {role: Slots(count) for role, count in limits.slots_for(fd_limit).items()}
        roles = (
            ("control", control_port, self._handle_control),
            ("public", public_port, self._handle_http),
            ("tls", tls_port, self._handle_tls),
        )
        try:
            for role, port, handler in roles:
                try:
                    sock = limits.bind(host, port, limits.BACKLOG)
                except OSError as exc:
                    raise TunnelError(listen_error(exc, role, host, port)) from None
                share = slots["control" if role == "control" else "public"]  # TLS users count as HTTP users do
                self._listeners.append(Listener(role, sock, share, handler))
        except BaseException:
            for listener in self._listeners:  # don't keep half of the ports open
                listener.sock.close()
            self._listeners.clear()  # so that listen() can be tried again (the demo does)
            raise
        # Log only once both are bound, so that a failed start prints just its error.
        for listener in self._listeners:
            bound_host, bound_port = listener.sock.getsockname()[:2]
            log.info("%s port listening on %s:%d", listener.role, bound_host, bound_port)
        raised = f" (raised from {before})" if fd_limit > before else ""
        shares = ", ".join(f"{role} {share.count}" for role, share in slots.items())
        log.info("file descriptor limit: %d%s; connection slots: %s", fd_limit, raised, shares)
        for warning in (
            auth.exposure_warning(host, self._sessions.secret),
            auth.strength_warning(self._sessions.secret),
        ):
            if warning:
                log.warning("%s", warning)
        ports = Ports(*(int(listener.sock.getsockname()[1]) for listener in self._listeners))
        # TCP tunnels listen where the public port does, and draw on its share of descriptors.
        public = Public(self.domain, "https" if self.https else "http", ports.public, ports.tls)
        self._tunnels.open(host, slots["public"], public)
        return ports

    def tunnels(self) -> dict[str, str]:
        """Each tunnel held now ('myapp', or a TCP port) and its URL."""
        return {session.tunnel: session.url for session in self._sessions.by_id.values()}

    async def serve(self) -> None:
        """Serve until cancelled (Ctrl-C, a test); then close every connection and return."""
        assert self._listeners, "call listen() first"
        accepting = [asyncio.create_task(listener.serve(self._spawn)) for listener in self._listeners]
        try:
            await asyncio.gather(*accepting)  # they accept until cancelled
        finally:
            for task in accepting:  # stop accepting first, then end the connections in flight
                task.cancel()
            for listener in self._listeners:
                listener.sock.close()
            self._sessions.close()  # and the TCP tunnels' ports
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*accepting, *self._tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        # Keep a strong reference to every task: the event loop holds only a weak
        # one, and a task nobody references can be garbage-collected mid-flight.
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle_control(self, conn: socket.socket) -> None:
        peer = "{}:{}".format(*conn.getpeername()[:2])
        try:  # a place among the unproven, from its first byte until its welcome (limits.Startups)
            slot = await self._startups["control"].admit(conn, self.settings.handshake_timeout)
        except OSError as exc:
            log.debug("%s: %s; closed", peer, exc)
            return
        # The tunnel connection carries frames after the handshake: a big buffer limit keeps reads
        # large (DATA_LIMIT). read_message still refuses a handshake line over MAX_LINE.
        try:  # TLS first: a peer that doesn't speak it (or never finishes its handshake) fails here
            reader, writer = await limits.streams(conn, DATA_LIMIT, self.tls, self.settings.handshake_timeout)
        except OSError as exc:  # ssl.SSLError: not TLS (e.g. a plain "hello" line), or a failed handshake
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__  # some have no text
            log.warning("%s: TLS handshake failed (%s); closed", peer, reason)
            slot.release()
            return  # the listener closes its socket
        transport = cast(asyncio.Transport, writer.transport)  # TLS over TCP; uvloop's: no subclass (mux.py)
        try:
            await self._sessions.handle_control(reader, writer, slot.release)
        finally:
            await close(transport, writer.wait_closed(), proved=not slot.held)
            slot.release()

    async def _handle_http(self, conn: socket.socket) -> None:
        """A user of the public port: read its request's head, find the tunnel its Host names, relay (forwarding.py)."""
        slot = None
        if self.https is not None:
            peer = "{}:{}".format(*conn.getpeername()[:2])
            try:  # a place among the unproven, from its first byte until its head names a tunnel (limits.Startups)
                slot = await self._startups["public"].admit(conn, self.settings.head_timeout)
            except OSError as exc:
                log.debug("%s: %s; closed", peer, exc)
                return
        proto = "https" if self.https else "http"
        stream = Forwarding(self.timeouts, self._tunnels.find, self.domain, conn.getpeername()[0], proto)
        try:
            data, ended = await routing.read_head(conn, stream, self.https, self.settings.head_timeout)  # OSError: gone
            peer = peername(stream)
            if not data:  # a browser's preconnect left unused, a port scan: no request, nothing to answer
                log.debug("%s: sent nothing; closed", peer)
                return
            if data.startswith(forwarding.H2_PREFACE):  # an HTTP/2 client: an answer it can read says why not
                cause = "an HTTP/2 client (h2c prior knowledge) on the HTTP/1.1 port, told to use HTTP/1.1"
                await self._refuse(stream, peer, 505, cause, http=True, page=forwarding.h2_answer())
                return
            routing.check(data, ended)  # HTTP, and a whole head; then Forwarding says what its head asks for
            session = stream.first()
            if slot is not None:
                slot.release()  # a user of one of our tunnels
            await self._serve_user(stream, peer, session)
        except BadRequest as exc:
            page = pages.error_page(exc.status, exc.cause, exc.headers)
            await self._refuse(stream, peer, exc.status, exc.cause, http=True, page=page)
        finally:
            if stream.transport is not None:
                await close(stream.transport, stream.closed, proved=slot is None or not slot.held)
            if slot is not None:
                slot.release()

    async def _handle_tcp(self, session: Session, conn: socket.socket) -> None:
        """A user of a TCP tunnel's port: no head to read, the port says whose it is."""
        host, port = conn.getpeername()[:2]
        if not forwarding.admits(session.policy, host):  # its client's CIDR rules: closed, before any byte
            log.warning("%s:%d: not admitted to tcp tunnel %s by its CIDR rules; closed", host, port, session.tunnel)
            return
        stream = Stream(self.tcp_timeouts)
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(lambda: stream, conn)
        try:
            await self._serve_user(stream, peername(stream), session)
        finally:
            await close(transport, stream.closed, proved=True)

    async def _handle_tls(self, conn: socket.socket) -> None:
        """A user of the TLS port: read its ClientHello's server name (SNI), find that TLS tunnel, relay it all."""
        host = conn.getpeername()[0]
        stream = Stream(self.tcp_timeouts)  # no keep-alive timeout: we can't see whose turn it is
        try:
            found = await passthrough.read_hello(conn, stream, self.settings.head_timeout)  # OSError: gone
            peer = peername(stream)
            label, dot, rest = found.partition(".") if isinstance(found, str) else ("", "", "")
            session = self._tunnels.find(label, "tls") if dot and rest == self.domain else None
            if isinstance(found, str) and session is None:
                found = sni.Refusal(f"no TLS tunnel is named {found}", sni.UNRECOGNIZED_NAME)
            if isinstance(found, sni.Refusal):
                await passthrough.refuse(stream, found.alert)
                answer = "closed" if found.alert is None else f"sent the alert {sni.alert_name(found.alert)}"
                log.warning("%s: TLS port: %s; %s", peer, printable(found.reason.encode()), answer)
                return
            assert session is not None
            if not forwarding.admits(session.policy, host):  # its client's CIDR rules, as for a TCP tunnel
                log.warning("%s: not admitted to tls tunnel %s by its CIDR rules; closed", peer, session.tunnel)
                return
            await self._serve_user(stream, peer, session)
        finally:
            if stream.transport is not None:
                await close(stream.transport, stream.closed, proved=True)

    async def _serve_user(self, stream: Stream, peer: str, session: Session) -> None:
        """One user: open a stream for it on its tunnel's client connection, and log it when it ends."""
        started = time.monotonic()
        mux = session.mux
        if mux is None:
            # A page that names the cause tells the user more than a closed connection.
            cause = f"the tunnel client of {session.url} is not connected; it may be reconnecting"
            await self._refuse(stream, peer, 502, cause)
            return
        if self.waiting >= self.settings.max_waiting:  # bounded: a flood of users must not pile up here
            await self._refuse(stream, peer, 503, "too many users are waiting; try again soon")
            return
        assert stream.transport is not None
        source = auth.source(stream.transport.get_extra_info("peername")[0])
        if session.streams_from[source] >= self.settings.max_streams_per_address:
            # A share of each tunnel per source: one script (or one crowd behind a NAT) must not take
            # every stream of a tunnel and leave its other users a 502.
            await self._refuse(stream, peer, 503, f"too many connections from {source} at once; close some first")
            return
        hold(session.streams_from, source, stream.closed)
        try:  # the stream's first window must fit in the memory budget: the user waits for it
            # WHY take_now first (stage 22): a timeout costs a timer in the loop's heap, per user; the
            # window is almost always free, and then no timer is needed.
            if not self.budget.take_now(INITIAL_WINDOW):
                async with asyncio.timeout(self.settings.proxy_timeout):
                    await self.budget.reserve(INITIAL_WINDOW)
        except TimeoutError:
            await self._refuse(stream, peer, 503, "the server's memory for users' bytes is spent; try again soon")
            return
        if stream.closed.done():  # the user left while it waited
            self.budget.give(INITIAL_WINDOW)
            return
        stream.charge(self.budget)
        # Open at once, and send the user's first bytes right behind the SYN, within the stream's
        # first window: no round trip to wait for (stage 7 waited for the client's ACK).
        stream_id = mux.open(stream, peer)
        who = f"{peer}: stream {stream_id}"
        log.debug("%s: opened", who)
        self.waiting += 1
        try:
            refusal = await self._answer(stream)
        except TimeoutError:
            cause = f"the tunnel client did not accept the stream within {self.settings.proxy_timeout:g}s"
            stream.reset(cause)
            await self._refuse(stream, who, 504, cause)
            return
        finally:
            self.waiting -= 1
        if refusal is not None:  # the client could not reach its local app, or went away
            if not stream.closed.done():
                await self._refuse(stream, who, 502, refusal)
            return
        await stream.closed
        elapsed = time.monotonic() - started
        # The request log: one line per public connection, like ngrok's list of requests.
        request = pages.summary(stream.sent.head, stream.received.head)
        ended = f" (closed: {stream.expired or stream.reset_reason})" if stream.expired or stream.reset_reason else ""
        up, down = stream.sent.copied, stream.received.copied
        log.info("%s %s, %d bytes up, %d bytes down, %.3fs%s", who, request, up, down, elapsed, ended)

    async def _answer(self, stream: Stream) -> str | None:
        """The client's answer to `stream`: None (accepted) or why not; TimeoutError after proxy_timeout.

        WHY one future and one timer (stage 22): asyncio.wait, asyncio.shield and asyncio.timeout made
        three futures, a timer and six callbacks per user, a tenth of the server's own work per user.
        """
        loop = asyncio.get_running_loop()
        woken, expired = loop.create_future(), False

        def wake(_: object = None) -> None:
            if not woken.done():
                woken.set_result(None)

        def expire() -> None:
            nonlocal expired
            expired = True
            wake()

        timer = loop.call_later(self.settings.proxy_timeout, expire)
        stream.answered.add_done_callback(wake)
        stream.ended.add_done_callback(wake)
        try:
            while not stream.answered.done():
                if expired:
                    raise TimeoutError
                # Not the answer alone: a user who hung up (EOF) without a byte waits for nothing, and a burst
                # of those would fill the room and turn real users away. One who sent bytes may only have half-closed.
                if stream.ended.done() and not stream.sent.copied:
                    stream.reset("the user hung up before the tunnel client answered")  # answers it
                    break
                await woken
                woken = loop.create_future()
        finally:
            timer.cancel()
            stream.answered.remove_done_callback(wake)
            stream.ended.remove_done_callback(wake)
        return stream.answered.result()

    @staticmethod
    async def _refuse(stream: Stream, who: str, status: int, cause: str, http: bool = False, page: bytes = b"") -> None:
        sent = await pages.refuse(stream, status, cause, http, page)
        log.warning("%s: %s; %s", who, printable(cause.encode()), f"sent a {status} page" if sent else "closed")


def hold(counts: Counter[str], source: str, until: asyncio.Future[None]) -> None:
    """Count one more stream for `source`, until `until` (the stream's `closed`) is done."""
    counts[source] += 1

    def release(_: asyncio.Future[None]) -> None:
        counts[source] -= 1
        if not counts[source]:
            del counts[source]  # the sources connected now, not every source ever seen

    until.add_done_callback(release)


async def close(transport: asyncio.Transport, closed: Awaitable[None], proved: bool) -> None:
    """Close a user's or a client's connection, and return once it is gone.

    One that proved nothing is cut (a reset), not closed: TLS would wait up to 30 s for its
    goodbye (close_notify), holding its 256 KiB buffer and its place among the unproven.
    """
    if proved:
        transport.close()  # sends what is still buffered first
    else:
        transport.abort()
    with contextlib.suppress(OSError):  # a peer that vanished
        await closed  # the descriptor's slot is free once it is gone


def peername(stream: Stream) -> str:
    """'host:port' of the user, for log lines."""
    assert stream.transport is not None
    host, port = stream.transport.get_extra_info("peername")[:2]
    return f"{host}:{port}"


async def run(server: Server, host: str, ports: Ports) -> None:
    """Bind, then serve until cancelled."""
    await server.listen(host, ports.control, ports.public, ports.tls)
    log.info("event loop: %s", loops.running())
    await server.serve()


def main() -> None:
    """Command line: python3 -m stage_22.server --cert FILE --key FILE [--host H] [--domain D] ..."""
    parser = argparse.ArgumentParser(
        prog=f"python3 -m {__package__}.server",
        description="Serve many tunnels: HTTP users by the name in their Host header, TCP users by port,"
        " TLS users by the name in their ClientHello (SNI).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    for role, default, who in (
        ("control", CONTROL_PORT, "the client connects, over TLS"),
        ("public", PUBLIC_PORT, "HTTP users connect"),
        ("tls", TLS_PORT, "TLS tunnels' users connect: their ClientHello's server name picks the tunnel"),
    ):
        parser.add_argument(
            f"--{role}-port",
            type=listen_port,
            default=default,
            metavar="PORT",
            help=f"where {who}; 0 = any (default: %(default)s)",
        )
    parser.add_argument("--cert", required=True, metavar="FILE", help="the control port's certificate chain (PEM)")
    parser.add_argument("--key", required=True, metavar="FILE", help="its private key (PEM)")
    parser.add_argument(
        "--domain",
        type=domain,
        default="localhost",
        help="HTTP tunnels are NAME.DOMAIN; point *.DOMAIN's DNS at this server (default: %(default)s)",
    )
    parser.add_argument("--https-cert", metavar="FILE", help="a certificate for *.DOMAIN: the public port speaks HTTPS")
    parser.add_argument("--https-key", metavar="FILE", help="its private key")
    parser.add_argument(
        "--tcp-ports",
        type=port_range,
        metavar="LOW-HIGH",
        help="the ports TCP tunnels get, e.g. 61000-61099; 0 = any free port (the default)",
    )
    for flag, seconds, what in (
        ("proxy-timeout", PROXY_TIMEOUT, "how long a user waits for the client to accept its stream"),
        ("heartbeat-timeout", HEARTBEAT_TIMEOUT, "silence after which the client counts as gone"),
        ("resume-window", RESUME_WINDOW, "how long a gone client's tunnel is kept for it"),
        ("idle-timeout", IDLE_TIMEOUT, "close a user's stream after this long with no byte either way"),
        ("half-closed-timeout", HALF_CLOSED_TIMEOUT, "close a half-closed stream after this long silent"),
        ("keepalive-timeout", KEEPALIVE_TIMEOUT, "close an HTTP user's connection silent this long after its answer"),
    ):
        parser.add_argument(
            f"--{flag}",
            type=positive_seconds,
            default=seconds,
            metavar="SECONDS",
            help=f"{what} (default: %(default)s)",
        )
    parser.add_argument(
        "--max-tunnels-per-address",
        type=whole_number(1, MAX_TUNNELS),
        default=MAX_TUNNELS_PER_ADDRESS,
        metavar="N",
        help="the most tunnels one address (an IPv6 /64) may hold, kept ones included (default: %(default)s)",
    )
    parser.add_argument(
        "--max-streams-per-address",
        type=whole_number(1, MAX_STREAMS),
        default=MAX_STREAMS_PER_ADDRESS,
        metavar="N",
        help="the most connections one address (an IPv6 /64) may have open to a tunnel (default: %(default)s)",
    )
    parser.add_argument(
        "--max-startups",
        type=whole_number(1, 65535),
        default=limits.MAX_STARTUPS,
        metavar="COUNT",
        help="TLS connections per port that have not proved themselves yet, at most at once: each costs"
        " ~330 KB (default: %(default)s)",
    )
    parser.add_argument(
        "--memory-budget",
        type=whole_number(16, 1024 * 1024),
        default=MEMORY_BUDGET // MiB,
        metavar="MIB",
        help="the most the users' streams together may make the server buffer, in MiB (default: %(default)s)",
    )
    parser.add_argument(
        "--secret",
        default=os.environ.get("NGROK_SECRET"),
        help="a secret the client must prove it knows (default: $NGROK_SECRET, which keeps it out of ps)",
    )
    loops.add_option(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    args = parser.parse_args()
    if (args.https_cert is None) != (args.https_key is None):
        parser.error("give --https-cert and --https-key together")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    try:
        loop = loops.factory(args.loop)  # first: a LoopError leaves no coroutine un-awaited
        ports = Ports(args.control_port, args.public_port, args.tls_port)
        settings = ServerSettings(
            domain=args.domain,
            tcp_ports=args.tcp_ports,
            proxy_timeout=args.proxy_timeout,
            secret=args.secret,
            heartbeat_timeout=args.heartbeat_timeout,
            resume_window=args.resume_window,
            max_tunnels_per_address=args.max_tunnels_per_address,
            idle_timeout=args.idle_timeout,
            half_closed_timeout=args.half_closed_timeout,
            keepalive_timeout=args.keepalive_timeout,
            max_streams_per_address=args.max_streams_per_address,
            max_startups=args.max_startups,
            memory_budget=args.memory_budget * MiB,
        )
        control_tls = contexts("certificate", args.cert, args.key)
        https = args.https_cert and contexts("HTTPS certificate", args.https_cert, args.https_key)
        loops.run(run(Server(settings, tls=control_tls, https=https), args.host, ports), loop)
    except TunnelError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        log.info("stopped")


def contexts(what: str, cert: str, key: str) -> ssl.SSLContext:
    """A server's TLS context from its certificate and key files; TunnelError if they can't be used."""
    try:
        return tls.server_context(cert, key)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise TunnelError(tls.load_error(f"{what} {cert} or its key {key}", exc, cert, key)) from None


if __name__ == "__main__":
    main()
