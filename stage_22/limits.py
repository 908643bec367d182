"""Descriptors: the limit every server meets first, and how to live at it without spinning.

Every connection costs a file descriptor, and a process may hold only so many: the soft
RLIMIT_NOFILE, often 1024, far below what the system allows (the hard limit). At the limit,
accept() fails with EMFILE. CPython 3.11's own accept loop (under asyncio.start_server) then
logs a traceback and retries at once, up to `backlog` times per wake-up: a server holding
600 idle connections of an attacker burns most of a core and writes megabytes of log while
its real users time out.

So the server does two things. It raises the soft limit to the hard one at start. And it
accepts connections itself, one at a time, each taking a *slot*: a semaphore sized below the
limit. When a port's slots run out, it stops calling accept(); new connections wait in the
kernel's queue (the backlog) until a connection closes and gives its slot back.

TLS makes a connection cost memory, too, before it has proved anything: asyncio's TLS layer holds a
256 KiB buffer from the moment it wraps a socket. So a TLS port wraps a connection only once its
first byte arrives, and only so many at once (Startups, like OpenSSH's MaxStartups).
"""

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import ssl
import time
from collections.abc import Callable, Coroutine

log = logging.getLogger(f"{__package__}.server")

# Connections the kernel queues for us before we accept them. asyncio's default
# of 100 makes a burst of users (200 browser tabs at once) wait for a SYN retry.
BACKLOG = 1024
# Descriptors kept back for what is not an accepted connection: stdio, the listening
# sockets, the log file, a DNS lookup's socket.
RESERVE = 32
# The control port's share of the descriptors: one in CONTROL_SHARE (see slots_for).
CONTROL_SHARE = 8
# accept() errors that mean "out of resources", not "this one connection failed".
EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# How long to wait before accepting again after such an error (not a spin: a pause).
RETRY_DELAY = 0.5
# At the limit, say so at most this often (seconds).
REPORT_EVERY = 60.0
# TLS connections that have not proved anything yet, on one port at once (see Startups). WHY: asyncio's
# TLS layer costs ~330 KB per connection (a 256 KiB read buffer, made before the first byte), and
# 2,400 idle TCP connections on the control port took the server from 25 to 790 MB. 128 per port
# cost at most ~42 MB, and let through ~600 new HTTPS users a second on links of 200 ms round trips.
MAX_STARTUPS = 128

# Serves one accepted connection, and returns once it is closed (its descriptor is free then).
Handler = Callable[[socket.socket], Coroutine[None, None, None]]


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit, if we may; return the limit (before, now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return soft, soft
    with contextlib.suppress(ValueError, OSError):  # a sandbox may refuse: live with the soft limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def slots_for(fd_limit: int) -> dict[str, int]:
    """Share the descriptors between the control port and the users.

    Stage 13 had one client, so the control port needed a handful of slots. Now every client holds
    one control connection: an eighth of the descriptors goes to them, the rest to the users of
    the public port and of the TCP tunnels' ports (see Slots).
    """
    usable = max(fd_limit - RESERVE, 2 * CONTROL_SHARE)
    control = usable // CONTROL_SHARE
    return {"control": control, "public": usable - control}


class Slots:
    """A share of the descriptors: one slot per connection. The public port and every TCP tunnel's
    port draw on the same share: a thousand users of one TCP tunnel count as much as of the HTTP port."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.free = asyncio.Semaphore(count)


class Listener:
    """One listening port: accepts connections while its share has free slots, and runs `handler` on each."""

    def __init__(self, role: str, sock: socket.socket, slots: Slots, handler: Handler) -> None:
        self.role = role
        self.sock = sock
        self.slots = slots
        self._free = slots.free
        self._handler = handler
        self._last_report, self._full_count = -REPORT_EVERY, 0  # see _report_full
        self._queued: asyncio.Future[None] | None = None  # done when the port has a connection for us

    async def serve(self, spawn: Callable[[Coroutine[None, None, None]], None]) -> None:
        """Accept until cancelled; each connection runs in a task made by `spawn`."""
        loop = asyncio.get_running_loop()
        # WHY the port is watched from here on (stage 22), not by loop.sock_accept: that watches it
        # for one accept() and stops again, two epoll_ctl calls per user whenever none was queued
        # (bench.syscalls: 5 per user on uvloop). The watch stops only while no connection can be
        # taken (no slot, or no descriptor): queued ones would wake the loop on every turn.
        loop.add_reader(self.sock, self._wake)
        try:
            while True:
                if self._free.locked():
                    self._report_full()
                    loop.remove_reader(self.sock)
                    await self._free.acquire()  # waits, without a single syscall, while every slot is taken
                    loop.add_reader(self.sock, self._wake)
                else:
                    await self._free.acquire()
                try:
                    conn = await self._next()
                except OSError as exc:
                    self._free.release()
                    if exc.errno not in EXHAUSTED:
                        continue  # that one connection failed (it was reset in the queue): take the next
                    self._report_full()
                    log.debug("%s port: cannot accept (%s); pausing %gs", self.role, exc.strerror, RETRY_DELAY)
                    loop.remove_reader(self.sock)
                    await asyncio.sleep(RETRY_DELAY)
                    loop.add_reader(self.sock, self._wake)
                    continue
                # WHY: Nagle's algorithm off, as asyncio does for the connections it opens. It would hold a
                # small write back until the previous one is acknowledged, and the peer delays its ACK by
                # up to 40 ms: we measured ~44 ms to the first byte of every user but the first (the SYN
                # frame, then the user's bytes in a second write). asyncio sets TCP_NODELAY only on sockets
                # made with proto=IPPROTO_TCP, and socket.create_server's (and so accept()'s) have proto 0.
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                spawn(self._serve_one(conn))
        finally:
            loop.remove_reader(self.sock)

    async def _next(self) -> socket.socket:
        """The next connection in the port's queue; if there is none, the first to come."""
        while True:
            try:
                return self.sock.accept()[0]
            except BlockingIOError:
                self._queued = asyncio.get_running_loop().create_future()
                await self._queued

    def _wake(self) -> None:
        if self._queued is not None and not self._queued.done():
            self._queued.set_result(None)

    def _report_full(self) -> None:
        # Once per REPORT_EVERY seconds at most: at the limit, slots free and fill again
        # many times a second, and one line each time would flood the log.
        self._full_count += 1
        now = time.monotonic()
        if now - self._last_report >= REPORT_EVERY:
            log.warning(
                "%s port: all %d connection slots are in use (the file descriptor limit is near); "
                "new connections wait in the kernel's queue (%d times since the last report)",
                self.role,
                self.slots.count,
                self._full_count,
            )
            self._last_report, self._full_count = now, 0

    async def _serve_one(self, conn: socket.socket) -> None:
        try:
            await self._handler(conn)  # returns once the connection is closed: the slot is free then
        except OSError as exc:  # one connection's trouble is logged here and never reaches the others
            log.info("%s connection lost (%s)", self.role, exc)
        finally:
            conn.close()  # a no-op if its transport closed it already
            self._free.release()


class Startups:
    """The TLS connections of one port that have not proved anything yet: at most `count` at once.

    OpenSSH's MaxStartups, for TLS. A connection takes a slot at its first byte, not before: until
    then it is a socket and a waiting task, with no TLS layer (asyncio makes that layer's 256 KiB
    buffer as soon as it wraps a socket). It keeps the slot through its TLS handshake, and until it
    has proved something (on the control port its secret: the welcome; on the HTTPS port a request
    head for a tunnel of ours) or is gone. More wait in the kernel's socket buffers, costing us
    nothing, until a slot frees or their time is up.
    """

    def __init__(self, role: str, count: int) -> None:
        self.role, self.count = role, count
        self._free = asyncio.Semaphore(count)
        self._last_report, self._full_count = -REPORT_EVERY, 0

    async def admit(self, conn: socket.socket, timeout: float) -> "Slot":
        """Wait for `conn`'s first byte and a free slot; OSError if it closes first, TimeoutError after `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                await first_byte(conn)
                if self._free.locked():
                    self._report_full()
                await self._free.acquire()
        except TimeoutError:
            raise TimeoutError(f"no TLS handshake could begin within {timeout:g}s") from None
        return Slot(self._free)

    def _report_full(self) -> None:
        # As Listener._report_full: at most one line per REPORT_EVERY seconds.
        self._full_count += 1
        now = time.monotonic()
        if now - self._last_report >= REPORT_EVERY:
            log.warning(
                "%s port: %d TLS connections have not proved themselves yet, the most at once; new ones wait "
                "(%d times since the last report)",
                self.role,
                self.count,
                self._full_count,
            )
            self._last_report, self._full_count = now, 0


class Slot:
    """One connection's place among the unproven (Startups): given back once it proved itself, or ended."""

    def __init__(self, free: asyncio.Semaphore) -> None:
        self._free = free
        self.held = True

    def release(self) -> None:
        if self.held:  # once: the connection proves itself, and later ends
            self.held = False
            self._free.release()


async def first_byte(conn: socket.socket) -> None:
    """Return once `conn` has a byte to read (nothing is read: TLS reads it); OSError if it closed first."""
    loop = asyncio.get_running_loop()
    readable = loop.create_future()

    def ready() -> None:
        if not readable.done():  # the loop may call us once more before we stop watching
            readable.set_result(None)

    loop.add_reader(conn, ready)
    try:
        await readable
    finally:  # before a transport takes the descriptor: two libuv handles on one fd (uvloop) corrupt its loop
        loop.remove_reader(conn)
    if not conn.recv(1, socket.MSG_PEEK):  # a peek: the byte stays for TLS (OSError: a reset)
        raise ConnectionResetError("closed before its first byte")  # a port scan: it gets no TLS layer at all


async def streams(
    conn: socket.socket, limit: int, tls: ssl.SSLContext, handshake_timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Wrap an accepted socket in TLS, and in a reader and a writer, as asyncio.open_connection(sock=...) does.

    OSError (ssl.SSLError, ConnectionAbortedError after `handshake_timeout`) if the TLS handshake fails.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit)
    protocol = asyncio.StreamReaderProtocol(reader)
    transport = await wrap(conn, lambda: protocol, tls, handshake_timeout)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def wrap(
    conn: socket.socket, factory: Callable[[], asyncio.BaseProtocol], tls: ssl.SSLContext | None, timeout: float
) -> asyncio.Transport:
    """Run `factory`'s protocol on an accepted socket, inside TLS if `tls` is given (OSError if its handshake fails)."""
    loop = asyncio.get_running_loop()
    try:
        transport, _ = await loop.connect_accepted_socket(
            factory, conn, ssl=tls, ssl_handshake_timeout=timeout if tls else None
        )
    except OSError as exc:
        # WHY drop the traceback: its frames hold the failed TLS layer, 256 KiB buffer and all, in a
        # reference cycle (the exception, its traceback, a frame, the future that holds the exception)
        # that only the garbage collector breaks, in its own time: 1,500 connections that closed
        # before their handshake left ~170 MB waiting for it. Without the traceback, each goes at once.
        raise exc.with_traceback(None) from None
    return transport


def bind(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket on host:port (0 = any free port); OSError if it can't be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=backlog)
    sock.setblocking(False)  # the event loop waits for connections; accept() must never block it
    return sock
