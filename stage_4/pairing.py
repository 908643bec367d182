"""Pairing: join each public connection to the one proxy connection that names its id.

For every user the server makes a fresh, unguessable id and sends `create_proxy <id>` on the
control connection; the client's proxy connection starts with `proxy <id>`. Matching by that id,
never by "whichever proxy connection arrives next" (the Go original's way), is what keeps a
stranger who dials the proxy port from being handed the next waiting user's traffic, and one
lost line from jamming every pairing after it.

Stage 4 adds the ways a pairing can fail early, each turned into an error page for the user:
the client reports that its local app refused (`fail`), or the client goes away (`fail_all`).
Ids are made only for the authenticated client and sent only over its control connection,
so a proxy connection that names one is bound to that client: nobody else can attach.
"""

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

from .protocol import (
    MAX_WAITING,
    NETWORK_TIMEOUT,
    Ok,
    ProtocolError,
    Proxy,
    TunnelError,
    new_conn_id,
    read_message,
    say_goodbye,
    write_message,
)

log = logging.getLogger("stage_4.pairing")

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Unavailable(TunnelError):
    """A waiting user will get no proxy connection; the message says why (shown on the error page)."""


class Pairing:
    """The public connections waiting for their proxy connection, each under its own id."""

    def __init__(self, handshake_timeout: float = NETWORK_TIMEOUT, max_waiting: int = MAX_WAITING) -> None:
        self.handshake_timeout = handshake_timeout  # a proxy connection has this long to name its id
        self.max_waiting = max_waiting  # beyond this many waiting users, new ones are turned away
        # conn_id -> the future through which a waiting public connection gets its proxy streams.
        self._waiting: dict[str, asyncio.Future[Streams]] = {}
        # conn_id -> the waiting user's connection, to see whether the user is still there.
        self._users: dict[str, asyncio.StreamWriter] = {}

    def has_room(self) -> bool:
        """True if one more user may wait (see MAX_WAITING); when full, first let go of users who left."""
        if len(self._waiting) >= self.max_waiting:
            # A user who connected and hung up without a word waits for nothing:
            # a flood of those must not lock real users out.
            for conn_id, user in list(self._users.items()):
                if hung_up(user):
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

    @contextlib.contextmanager
    def expect(self, user: asyncio.StreamWriter) -> Iterator[tuple[str, asyncio.Future[Streams]]]:
        """Register a fresh id for `user` and the future its proxy streams will arrive in; on exit, retire both."""
        conn_id = new_conn_id()
        future: asyncio.Future[Streams] = asyncio.get_running_loop().create_future()
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
                future.result()[1].close()

    async def accept_proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read a new proxy connection's `proxy <id>` line and hand the connection to that id's user.

        True: handed over (the user's task owns it now). False: it was told why not; close it.
        """
        host, port = writer.get_extra_info("peername")[:2]
        try:
            # A proxy connection that says nothing must not hold a socket forever.
            async with asyncio.timeout(self.handshake_timeout):
                message = await read_message(reader)
            match message:
                case Proxy(conn_id):
                    # pop(): the first proxy connection naming an id claims it; a second
                    # one (a replay, a guess) finds nothing.
                    future = self._waiting.pop(conn_id, None)
                    if future is None or future.done():  # done: the user gave up waiting
                        raise ProtocolError("unknown or expired proxy id")
                    # Confirm first: the client relays nothing to its local app before this
                    # line, so that an error line from us can never reach the app as data.
                    await write_message(writer, Ok())
                    # Hand over the *same* reader: bytes the client sent right after its
                    # `proxy` line may already sit in its buffer, and must not be lost.
                    future.set_result((reader, writer))
                    log.debug("%s:%d: proxy connection paired with conn %s", host, port, conn_id[:8])
                    return True
                case None:
                    log.info("%s:%d: proxy connection closed before naming an id", host, port)
                case _:
                    raise ProtocolError(f"expected 'proxy <id>', got {message}")
        except TimeoutError:
            log.warning("%s:%d: proxy connection sent no id within %gs; closing", host, port, self.handshake_timeout)
            await say_goodbye(reader, writer, f"no proxy line within {self.handshake_timeout:g}s")
        except ProtocolError as exc:
            log.warning("%s:%d: proxy connection: %s; closing", host, port, exc)
            await say_goodbye(reader, writer, str(exc))
        except OSError as exc:
            log.info("%s:%d: proxy connection lost (%s)", host, port, exc)
        return False


# --8<-- [start:hung_up]
def hung_up(user: asyncio.StreamWriter) -> bool:
    """True if a waiting user has closed its connection without sending a byte.

    The server does not read a waiting user (its bytes wait in the kernel: see server.py), so
    asyncio can't tell us that it left. The kernel can: a *peek* (MSG_PEEK) looks at the
    socket's queue without taking anything from it, and an empty answer means EOF.
    """
    if user.is_closing():
        return True
    probe = socket.socket(fileno=user.get_extra_info("socket").fileno())
    try:
        return probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # nothing to read yet: the user is still there
    except OSError:
        return True  # reset: gone
    finally:
        probe.detach()  # the socket still belongs to its transport: don't close it
        # --8<-- [end:hung_up]
