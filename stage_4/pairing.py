"""Pairing: join each public connection to the one proxy connection that names its id.

For every user the server makes a fresh, unguessable id and sends it on the control connection
(stage 4: in the SYN frame that opens the user's stream); the client's proxy connection starts
with `proxy <id>`. Matching by that id,
never by "whichever proxy connection arrives next" (the Go original's way), is what keeps a
stranger who dials the proxy port from being handed the next waiting user's traffic, and one
lost line from jamming every pairing after it.
"""

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from .protocol import NETWORK_TIMEOUT, ProtocolError, Proxy, new_conn_id, read_message, say_goodbye

log = logging.getLogger(__name__)

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Pairing:
    """The public connections waiting for their proxy connection, each under its own id."""

    def __init__(self, handshake_timeout: float = NETWORK_TIMEOUT) -> None:
        self.handshake_timeout = handshake_timeout  # a proxy connection has this long to name its id
        # conn_id -> the future through which a waiting public connection gets its proxy streams.
        self._waiting: dict[str, asyncio.Future[Streams]] = {}

    @contextlib.contextmanager
    def expect(self) -> Iterator[tuple[str, asyncio.Future[Streams]]]:
        """Register a fresh id and the future its proxy streams will arrive in; on exit, retire both."""
        conn_id = new_conn_id()
        future: asyncio.Future[Streams] = asyncio.get_running_loop().create_future()
        self._waiting[conn_id] = future
        try:
            yield conn_id, future
        finally:
            # Ids are single-use: whatever happened, this one can never pair again.
            self._waiting.pop(conn_id, None)
            # Close the proxy connection if one was handed over: after the relay, but
            # also when it came in just as the timeout fired or the server stopped.
            if future.done() and not future.cancelled():
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
