"""Pairing: join each public connection to the one proxy connection that names its id.

For every user the server makes a fresh, unguessable id and sends `create_proxy <id>` on the
control connection; the client's proxy connection starts with `proxy <id>`. Matching by that id,
never by "whichever proxy connection arrives next" (the Go original's race), is what keeps
many users at once from receiving each other's bytes.

Stage 3 adds the ways a pairing can fail early, each turned into an error page for the user:
the client reports that its local app refused (`fail`), or the client goes away (`fail_all`).
Ids are made only for the authenticated client and sent only over its control connection,
so a proxy connection that names one is bound to that client: nobody else can attach.
"""

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from .protocol import (
    LINGER,
    MAX_LINE,
    MAX_WAITING,
    NETWORK_TIMEOUT,
    Error,
    ProtocolError,
    Proxy,
    TunnelError,
    encode,
    new_conn_id,
    parse_line,
)
from .relay import Half

log = logging.getLogger("stage_3.pairing")


class Unavailable(TunnelError):
    """A waiting user will get no proxy connection; the message says why (shown on the error page)."""


class Pairing:
    """The public connections waiting for their proxy connection, each under its own id."""

    def __init__(self, handshake_timeout: float = NETWORK_TIMEOUT, max_waiting: int = MAX_WAITING) -> None:
        self.handshake_timeout = handshake_timeout  # a proxy connection has this long to name its id
        self.max_waiting = max_waiting  # beyond this many waiting users, new ones are turned away
        # conn_id -> the future through which a waiting public connection gets its proxy connection.
        self._waiting: dict[str, asyncio.Future[Half]] = {}
        # conn_id -> the waiting user's connection, to see whether the user is still there.
        self._users: dict[str, Half] = {}
        # Proxy connections that have not named their id yet (see ProxyHandshake).
        self.handshakes: set[ProxyHandshake] = set()

    def has_room(self) -> bool:
        """True if one more user may wait (see MAX_WAITING); when full, first let go of users who left."""
        if len(self._waiting) >= self.max_waiting:
            # A user who hung up without a word (an EOF and no bytes), or whose
            # connection is gone, waits for nothing: a flood of those must not lock
            # real users out. (A user who sent a request and then an EOF is still waiting
            # for the answer: an HTTP/1.0 client may do just that.)
            for conn_id, user in list(self._users.items()):
                if user.closed.done() or (user.got_eof and not user.flow.copied):
                    self.fail(conn_id, "the user left")
        return len(self._waiting) < self.max_waiting

    def fail(self, conn_id: str, cause: str) -> None:
        """Tell the user waiting under `conn_id` that no proxy connection will come, and why."""
        future = self._waiting.pop(conn_id, None)
        if future is not None and not future.done():
            future.set_exception(Unavailable(cause))

    def fail_all(self, cause: str) -> None:
        """Tell every waiting user that no proxy connection will come (the client went away)."""
        for conn_id in list(self._waiting):
            self.fail(conn_id, cause)

    def close(self) -> None:
        """The server is stopping: close the proxy connections that are still on their first line."""
        for handshake in list(self.handshakes):
            handshake.transport.close()

    @contextlib.contextmanager
    def expect(self, user: Half) -> Iterator[tuple[str, asyncio.Future[Half]]]:
        """Register a fresh id for `user` and the future its proxy connection will arrive in; on exit, retire both."""
        conn_id = new_conn_id()
        future: asyncio.Future[Half] = asyncio.get_running_loop().create_future()
        self._waiting[conn_id] = future
        self._users[conn_id] = user
        try:
            yield conn_id, future
        finally:
            # Ids are single-use: whatever happened, this one can never pair again.
            self._waiting.pop(conn_id, None)
            self._users.pop(conn_id, None)
            # Close the proxy connection if one was handed over: after the relay, but
            # also when it came in just as the timeout fired or the server stopped.
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().transport.close()

    def claim(self, conn_id: str) -> asyncio.Future[Half]:
        """The future of the user waiting under `conn_id`, taken out: no second proxy connection can claim it."""
        # pop(): the first proxy connection naming an id claims it; a second
        # one (a replay, a guess) finds nothing.
        future = self._waiting.pop(conn_id, None)
        if future is None or future.done():  # done: the user gave up waiting
            raise ProtocolError("unknown or expired proxy id")
        return future


class ProxyHandshake(asyncio.Protocol):
    """A new proxy connection until its first line, `proxy <id>`, names the user it is for.

    What follows that line belongs to the user, and the connection goes on as a relay `Half`
    (see relay.py). So there is no StreamReader here to take apart again: the line is read
    from the chunks the event loop hands us, and the protocol is swapped right after it.
    """

    transport: asyncio.Transport

    def __init__(self, pairing: Pairing) -> None:
        self.pairing = pairing
        self.received = b""
        self.answered = False  # paired or refused: whatever still comes is not ours to read
        self.peer = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        host, port = transport.get_extra_info("peername")[:2]
        self.peer = f"{host}:{port}"
        self.pairing.handshakes.add(self)  # no task holds this connection: the pairing tracks it
        # A proxy connection that says nothing must not hold a socket forever.
        timeout = self.pairing.handshake_timeout
        self.timer = asyncio.get_running_loop().call_later(timeout, self.refuse, f"no proxy line within {timeout:g}s")

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return
        self.received += data
        line, newline, rest = self.received.partition(b"\n")
        if not newline:
            if len(self.received) > MAX_LINE:  # no newline in sight: don't buffer forever
                self.refuse(f"line longer than {MAX_LINE} bytes")
            return
        try:
            message = parse_line(line + newline)
            if not isinstance(message, Proxy):
                raise ProtocolError(f"expected 'proxy <id>', got {message}")
            future = self.pairing.claim(message.conn_id)
        except ProtocolError as exc:
            self.refuse(str(exc))
            return
        self.answered = True
        self.timer.cancel()
        self.pairing.handshakes.discard(self)
        # From here on the connection is the user's: a Half, holding the bytes that
        # came right after the line (the client may send them at once: none is lost).
        half = Half()
        self.transport.set_protocol(half)
        half.connection_made(self.transport)
        if rest:
            half.data_received(rest)
        future.set_result(half)
        log.debug("%s: proxy connection paired with conn %s", self.peer, message.conn_id[:8])

    def eof_received(self) -> bool:
        if not self.answered:
            log.info("%s: proxy connection closed before naming an id", self.peer)
        return False  # nothing more to do with it: let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        self.pairing.handshakes.discard(self)

    def refuse(self, reason: str) -> None:
        """Send `error <reason>` and close politely: EOF first, the close when the peer closes or LINGER passed."""
        if self.transport.is_closing():
            return
        log.warning("%s: proxy connection: %s; closing", self.peer, reason)
        self.answered = True
        self.timer.cancel()
        # The same goodbye as protocol.say_goodbye, in callbacks: closing with unread
        # input would make the kernel send a reset, which can destroy our last words.
        self.transport.write(encode(Error(reason)))
        self.transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(LINGER, self.transport.close)
