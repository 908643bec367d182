"""Byte pump: join two TCP connections, both directions at once, without a task in between.

Stage 0's pump is a loop per direction: `await reader.read()`, `writer.write()`, `await
drain()`. Each chunk then wakes a task, resolves a future and is copied twice (socket ->
the reader's buffer -> bytes). Here the event loop hands each chunk to a Protocol, and
`data_received` writes it straight to the other connection: the same copy, with less
Python around it (see the stage 3 page, "A faster relay", and the performance page).

The connections arrive as streams, because reading the `proxy <id>` line is easiest that way,
so `relay` first takes their sockets over from the streams (see `Half.take_over`).
"""

import asyncio
from dataclasses import dataclass

# How much of each direction's first bytes to keep for the server's request log:
# enough for an HTTP request line ("GET /path HTTP/1.1") or status line.
HEAD_SIZE = 1024


@dataclass
class Flow:
    """One direction of a relay: how many bytes it carried and how they began."""

    copied: int = 0
    head: bytes = b""


class Half(asyncio.Protocol):
    """One connection of a relay: what it receives, it writes to the other one (its `peer`)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.peer = self  # set by relay() once both halves exist
        self.flow = Flow()  # what came in here and went out through the peer
        self.got_eof = False
        self.closed = asyncio.get_running_loop().create_future()  # set when the connection is gone

    def data_received(self, data: bytes) -> None:
        if not self.flow.head:
            # We keep a copy of the first bytes for the log and pass them on unchanged.
            self.flow.head = data[:HEAD_SIZE]
        self.flow.copied += len(data)
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.got_eof = True
        if self.peer.got_eof:
            # Both directions are done: close both (close() still sends what is buffered).
            self.transport.close()
            self.peer.transport.close()
        elif not self.peer.transport.is_closing():
            # Half-close: tell the peer "no more data from this side" while the other
            # direction keeps flowing (an HTTP client may shut its write side and
            # still wait for the whole response).
            self.peer.transport.write_eof()
        return True  # keep our side open: the peer may still have data for us

    # Backpressure. The transport calls these when its send buffer is full and when
    # it has drained again: while our peer cannot keep up, we stop reading from the
    # other side, so the difference waits in the kernel instead of in our memory.
    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        # Closed, reset or broken: end the other connection too, so that neither
        # side waits forever (close() still sends what is buffered for it).
        self.peer.transport.close()
        if not self.closed.done():
            self.closed.set_result(None)

    async def take_over(self, reader: asyncio.StreamReader) -> bytes:
        """Make this Half the socket's protocol instead of `reader`; return the bytes `reader` still held."""
        # From here on the transport hands new bytes to us, not to the reader.
        self.transport.set_protocol(self)
        # The reader may hold bytes it read but nobody asked for yet (a user's request
        # often arrives with its connection). feed_eof() marks the end of what it will
        # ever get, so read() returns those bytes at once instead of waiting for more.
        reader.feed_eof()
        try:
            return await reader.read()
        except OSError:
            return b""  # the connection failed before we got here; connection_lost follows

    def start(self, leftover: bytes) -> None:
        """Pass on what the reader held, then read the socket ourselves."""
        lost = self.transport.is_closing()  # it failed while the reader owned it
        if not lost:
            # Re-arm reading: pause and resume put the socket back in the event loop's
            # watch list. That also undoes a pause the reader left behind, and shows us
            # an EOF the reader had already seen (a socket at EOF stays readable).
            self.transport.pause_reading()
            self.transport.resume_reading()
        if leftover:
            self.data_received(leftover)
        if lost:
            self.connection_lost(None)


async def relay(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
) -> tuple[Flow, Flow]:
    """Join a and b until both directions end; return the flows (a->b, b->a). The caller closes the writers."""
    a_transport, b_transport = a_writer.transport, b_writer.transport
    assert isinstance(a_transport, asyncio.Transport) and isinstance(b_transport, asyncio.Transport)
    a, b = Half(a_transport), Half(b_transport)
    a.peer, b.peer = b, a
    # Neither step waits for the network (the readers have their EOF), so no byte can
    # slip past the leftovers: both are passed on before the loop reads either socket again.
    a_leftover = await a.take_over(a_reader)
    b_leftover = await b.take_over(b_reader)
    a.start(a_leftover)
    b.start(b_leftover)
    try:
        await asyncio.gather(a.closed, b.closed)
    finally:
        a_transport.close()  # cancelled (the server is stopping): end both connections
        b_transport.close()
    return a.flow, b.flow
