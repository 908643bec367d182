"""Byte pump: join two TCP connections, both directions at once, without a task in between.

Stage 0's pump is a loop per direction: `await reader.read()`, `writer.write()`, `await
drain()`. Each chunk then wakes a task, resolves a future and is copied twice (socket ->
the reader's buffer -> bytes). Here the event loop hands each chunk to a Protocol, a `Half`,
and `data_received` writes it straight to the other connection: the same copy, with less
Python around it (see the stage 3 page, "A faster relay", and the performance page).

Every data connection of stage 3 is a Half from its first byte: the server's public and proxy
ports make one for each connection they accept, and the client dials with one. A Half can live
before its peer exists (the user's proxy connection is still on its way): what arrives until
`join()` waits inside it, a bounded amount.
"""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from .protocol import DATA_LIMIT, LINGER

# How much of each direction's first bytes to keep for the server's request log:
# enough for an HTTP request line ("GET /path HTTP/1.1") or status line.
HEAD_SIZE = 1024


@dataclass
class Flow:
    """One direction of a relay: how many bytes it carried and how they began."""

    copied: int = 0
    head: bytes = b""
    early: list[bytes] = field(default_factory=list)  # received before join(), passed on by it


class Half(asyncio.Protocol):
    """One connection of a relay: what it receives, it writes to the other one (its `peer`)."""

    transport: asyncio.Transport  # set by connection_made, before any other call

    def __init__(self, on_connect: Callable[["Half"], None] | None = None) -> None:
        self.on_connect = on_connect  # the server starts serving a user from here
        self.peer: Half | None = None  # set by join()
        self.flow = Flow()  # what came in here and went out through the peer
        self.got_eof = False
        self.lingering = False  # refused, never to be joined: see linger()
        loop = asyncio.get_running_loop()
        self.heard = loop.create_future()  # set at the first byte, the EOF or the loss, whichever comes first
        self.closed = loop.create_future()  # set when the connection is gone

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.on_connect is not None:
            self.on_connect(self)

    def data_received(self, data: bytes) -> None:
        if not self.flow.head:
            # We keep a copy of the first bytes for the log and pass them on unchanged.
            self.flow.head = data[:HEAD_SIZE]
            self._heard()
        self.flow.copied += len(data)
        if self.peer is not None:
            self.peer.transport.write(data)
            return
        if self.lingering:
            return  # read and dropped: see linger()
        # No peer yet: keep the bytes for join(). Past DATA_LIMIT stop reading, so
        # that the rest waits in the kernel, not in our memory (flow control, as below).
        self.flow.early.append(data)
        if self.flow.copied > DATA_LIMIT:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.got_eof = True
        self._heard()
        if self.peer is None:
            # Not joined: join() will pass the EOF on. A lingering Half is done:
            # returning False lets the transport close.
            return not self.lingering
        if self.peer.got_eof:
            # Both directions are done: close both (close() still sends what is buffered).
            self.transport.close()
            self.peer.transport.close()
        elif not self.peer.transport.is_closing() and self.peer.transport.can_write_eof():
            # Half-close: tell the peer "no more data from this side" while the other
            # direction keeps flowing (an HTTP client may shut its write side and
            # still wait for the whole response). A TLS transport can't half-close.
            self.peer.transport.write_eof()
        return True  # keep our side open: the peer may still have data for us

    # Backpressure. The transport calls these when its send buffer is full and when
    # it has drained again: while our peer cannot keep up, we stop reading from the
    # other side, so the difference waits in the kernel instead of in our memory.
    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        # Closed, reset or broken: end the other connection too, so that neither
        # side waits forever (close() still sends what is buffered for it).
        if self.peer is not None:
            self.peer.transport.close()
        self._heard()
        if not self.closed.done():
            self.closed.set_result(None)

    def _heard(self) -> None:
        if not self.heard.done():
            self.heard.set_result(None)

    def start(self) -> None:
        """Joined: pass on what arrived before, then let the bytes flow."""
        assert self.peer is not None
        for data in self.flow.early:
            self.peer.transport.write(data)
        self.flow.early.clear()
        if self.closed.done():  # lost while waiting for its peer
            self.peer.transport.close()
        elif self.got_eof:  # ended its side while waiting: pass the EOF on now
            self.eof_received()
        else:
            self.transport.resume_reading()  # in case the bytes before the join filled DATA_LIMIT

    async def linger(self) -> None:
        """For a Half that will never be joined: end our side, wait (bounded) for the peer's EOF, then close.

        As protocol.linger does for streams: closing with unread input makes the kernel send
        a reset, which can destroy what we sent. So we send EOF first, and read and drop
        whatever still comes until the peer ends its side too, or LINGER has passed.
        """
        self.lingering = True
        self.flow.early.clear()
        if not self.transport.is_closing() and self.transport.can_write_eof():
            self.transport.write_eof()
        if not self.got_eof:
            self.transport.resume_reading()  # it may have stopped at DATA_LIMIT
            await asyncio.wait({self.closed}, timeout=LINGER)
        self.transport.close()


async def join(a: Half, b: Half) -> tuple[Flow, Flow]:
    """Relay a and b into each other until both directions end; return the flows (a->b, b->a)."""
    a.peer, b.peer = b, a
    a.start()
    b.start()
    try:
        # Both must end; the order they end in does not matter.
        await a.closed
        await b.closed
    finally:
        a.transport.close()  # cancelled (the server is stopping): end both connections
        b.transport.close()
    return a.flow, b.flow
