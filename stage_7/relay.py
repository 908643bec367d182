"""One stream: a TCP connection (a user, or the local app) joined to one stream of the tunnel connection.

Stage 6's pumps were a task per direction: `await read()`, `write()`, `await drain()`. Here the
event loop hands each chunk it reads to a Protocol, a `Stream`, and
the Stream passes it on at once: no task, no future, no wake-up per chunk (the performance page
measures the difference).

There is no flow control per stream yet (stage 9 adds it). Bytes are held back only where the
connections themselves are full:

- Sending (TCP -> tunnel): what we read goes out as frames at once. While the tunnel
  connection's buffer is full, every stream stops reading its TCP connection (Mux.blocked).
- Receiving (tunnel -> TCP): while a TCP peer reads slower than its bytes arrive, the Mux
  stops reading the whole tunnel connection (see Mux.pause). That bounds our memory, but it
  stalls every other stream too: head-of-line blocking, which stage 9's windows remove.

Reading is on exactly while `_should_read()` holds, recomputed after every change. An earlier
Protocol relay instead resumed reading at moments of its own choosing, and lost a pause for good
(issue 12): asyncio says "pause" once, and only once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .protocol import ProtocolError

if TYPE_CHECKING:  # annotations alone; and never the reverse: mux.py knows a Stream only as a StreamEnd
    from .mux import Mux

# How much of the first bytes read to keep: enough for an HTTP request line ("GET /path HTTP/1.1"),
# which tells the server whether a user it must refuse gets an error page (pages.refuse).
HEAD_SIZE = 1024


@dataclass
class Flow:
    """One direction of a relay: how many bytes it carried, how they began (TCP -> tunnel), whether it ended."""

    copied: int = 0
    head: bytes = b""
    done: bool = False


class Stream(asyncio.Protocol):
    """A TCP connection relayed through one stream of a Mux, which sees it as a mux.StreamEnd."""

    transport: asyncio.Transport | None = None

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.mux: Mux | None = None  # set by Mux.open / Mux.attach
        self.stream_id = 0
        self.sent, self.received = Flow(), Flow()  # TCP -> tunnel, tunnel -> TCP
        self.refusing = False  # the server is refusing this user (pages.refuse): what it sends is dropped
        self.reset_reason = ""  # why the stream was reset (by either side), if it was
        self.fin_sent = False
        self.got_fin = False
        # answered: None when the peer accepted the stream, a reason if it refused it (server side).
        self.answered: asyncio.Future[str | None] = loop.create_future()
        self.heard = loop.create_future()  # the first byte, EOF or loss of the TCP connection
        self.ended = loop.create_future()  # EOF or loss of the TCP connection
        self.closed = loop.create_future()  # the TCP connection is gone

    # --- the TCP side ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.reset_reason:  # reset while the client was still dialing the app
            self._abort()
            return
        if self.mux is not None:  # the client's side: the local app answered; accept the stream
            self.mux.accept(self)
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        if not self.sent.head:
            # We keep a copy of the first bytes (see HEAD_SIZE) and pass them on unchanged.
            self.sent.head = bytes(data[:HEAD_SIZE])
            self._heard()
        self.sent.copied += len(data)
        if self.reset_reason or self.refusing:
            return  # no stream to carry it (see pages.refuse): read and dropped
        if self.mux is not None:  # always: reading waits for the ACK (see _should_read)
            self.mux.send(self, data)

    def eof_received(self) -> bool:
        self._heard()
        self._ended()
        # Not twice: asyncio may report the EOF again after a pause and resume of reading.
        if not (self.reset_reason or self.refusing or self.fin_sent) and self.mux is not None:
            self.fin_sent = self.sent.done = True
            self.mux.send(self, b"", fin=True)
            self._maybe_finish()
        return True  # keep our side open: the other direction may still flow

    def connection_lost(self, exc: Exception | None) -> None:
        self._heard()
        self._ended()
        if not (self.fin_sent and self.got_fin):  # lost before both directions ended cleanly
            self.reset(f"the connection was {'reset' if exc else 'closed'}")
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        # Our TCP peer reads slower than the tunnel brings its bytes. Without a window to stop
        # just this stream's sender, the Mux stops reading the tunnel connection: all streams wait.
        if self.mux is not None:
            self.mux.pause(self)

    def resume_writing(self) -> None:
        if self.mux is not None:
            self.mux.resume(self)

    # --- the tunnel side (called by the Mux) ---------------------------------------------------

    def on_data(self, payload: bytes, fin: bool) -> None:
        """Bytes (and maybe the end) of the peer's direction; ProtocolError after the end."""
        if self.got_fin:
            raise ProtocolError(f"DATA on stream {self.stream_id} after its FIN")
        if payload:
            self.received.copied += len(payload)
            self._write(payload)
        if fin:
            self.got_fin = self.received.done = True
            self._write_eof()
        self._maybe_finish()

    def on_answer(self, refusal: str | None) -> None:
        """The peer accepted the stream (None) or refused it (a reason)."""
        if not self.answered.done():
            self.answered.set_result(refusal)
            self._update_reading()  # accepted: the stream may read its TCP connection now

    def reset(self, reason: str, notify: bool = True) -> None:
        """End the stream at once (both directions); tell the peer why unless it told us (`notify`)."""
        if self.reset_reason or (self.fin_sent and self.got_fin):
            return
        self.reset_reason = reason
        if self.mux is not None:
            self.mux.forget(self, reason if notify else None)
        self.on_answer(reason)  # a user still waiting for an answer gets this one (a 502 page)
        if self.transport is not None and self.answered.result() is None:
            self._abort()  # a relayed connection: a reset ends it at once, as it would without us
        self._update_reading()

    # --- inside ------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            # Lost (a send failed: the peer reset it) and not yet told to us (connection_lost comes on
            # the next turn): the rest of this read's frames for it go nowhere. asyncio would count
            # each write, and log "socket.send() raised exception." for every one from the fifth on.
            return
        self.transport.write(data)

    def _write_eof(self) -> None:
        assert self.transport is not None
        if not self.transport.is_closing() and self.transport.can_write_eof():
            # Half-close: tell the TCP peer "no more data from this side" while the other
            # direction keeps flowing (an HTTP client may shut its write side and still wait).
            try:
                self.transport.write_eof()
            except OSError:
                # The peer reset the connection after its own EOF (an impatient user who closed
                # before the answer, whose kernel answered the answer with a reset): asyncio stops
                # reading at EOF, so nobody saw the reset, and shutdown() fails with ENOTCONN, here,
                # inside the Mux's handling of a FIN frame. It ends this stream, never the tunnel
                # connection that carries everyone else's.
                self.reset("the connection was reset")

    def _abort(self) -> None:
        """End the TCP connection with a reset (RST), as its far end's ended or as a lost tunnel must show."""
        assert self.transport is not None
        # WHY a linger of 0: abort() alone closes the socket, and the kernel then ends the
        # connection with a FIN. The user (or the app) would read a clean end where the far side
        # reset or the tunnel was lost: a cut download would look complete, a cut upload too.
        sock = self.transport.get_extra_info("socket")  # None once a TLS connection is gone
        if sock is not None:
            with contextlib.suppress(OSError):  # closed already: nothing is left to reset
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _should_read(self) -> bool:
        # Read only once the peer accepted the stream, and while the tunnel connection has room
        # for more. A stream that is reset or refused reads on, and drops what it reads.
        accepted = self.mux is not None and self.answered.done() and not self.mux.blocked
        return bool(self.reset_reason or self.refusing) or accepted

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._should_read() != transport.is_reading():
            (transport.resume_reading if self._should_read() else transport.pause_reading)()

    def _maybe_finish(self) -> None:
        if self.fin_sent and self.got_fin and not self.reset_reason:
            if self.mux is not None:
                self.mux.forget(self, None)
            if self.transport is not None:
                self.transport.close()  # both directions ended: close, after the buffered bytes leave

    def _heard(self) -> None:
        if not self.heard.done():
            self.heard.set_result(None)

    def _ended(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)
