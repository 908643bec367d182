"""One stream: a TCP connection (a user, or the local app) joined to one stream of the tunnel connection.

A stage 5 stream only passed bytes on; a stage 6 stream must also hold its user until the client
answers, and reset its TCP connection, so it owns that connection now. `relay` reads it with stage
5's pump (`pipe`, the stream as the connection it writes to: frames); the other way, the Mux's loop
hands each DATA payload to `on_data`, which writes it (`write()`, `await drain()`). Stage 7 turns
both into asyncio Protocol callbacks: no task, no future, no wake-up per chunk.

There is no flow control per stream yet (stage 9 adds it). Bytes are held back only where the
connections themselves are full:

- Sending (TCP -> tunnel): after each chunk, `relay` waits for the tunnel connection's drain(),
  and reads nothing more meanwhile.
- Receiving (tunnel -> TCP): `on_data` waits for the TCP connection's drain(), inside the Mux's
  loop: while one TCP peer reads slower than its bytes arrive, the Mux reads no frame at all, for
  any stream. That bounds our memory, but it stalls every other stream too: head-of-line blocking,
  which stage 9's windows remove.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .protocol import ProtocolError, Reader, Writer

if TYPE_CHECKING:  # annotations alone; and never the reverse: mux.py knows a Stream only as a StreamEnd
    from .mux import Mux

# Big reads mean fewer trips through the event loop per megabyte: 256 KiB is
# what the event loop itself reads from a socket at most in one go.
CHUNK_SIZE = 256 * 1024


async def pipe(src: Reader, dst: Writer) -> int:
    """Copy `src` into `dst` until EOF, pass the EOF on, and return the bytes copied."""
    copied = 0
    try:
        while data := await src.read(CHUNK_SIZE):
            dst.write(data)
            # Backpressure: if `dst` reads slower than `src` writes, wait here
            # instead of buffering the difference in memory.
            await dst.drain()
            copied += len(data)
        if dst.can_write_eof():
            # Half-close: tell `dst` "no more data from this side" while the
            # other direction keeps flowing (an HTTP client may shut its write
            # side and still wait for the whole response).
            dst.write_eof()
    except OSError:
        # One peer vanished (reset, broken pipe). Closing `dst` ends the other
        # direction too: its reader sees EOF, so neither copy waits forever.
        dst.close()
    return copied


@dataclass
class Flow:
    """One direction of a relay: how many bytes it carried, whether it ended."""

    copied: int = 0
    done: bool = False


class Stream:
    """A TCP connection relayed through one stream of a Mux, which sees it as a mux.StreamEnd."""

    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.mux: Mux | None = None  # set by Mux.open / Mux.attach
        self.stream_id = 0
        self.sent, self.received = Flow(), Flow()  # TCP -> tunnel, tunnel -> TCP
        self.reset_reason = ""  # why the stream was reset (by either side), if it was
        self.fin_sent = False
        self.got_fin = False
        # answered: None when the peer accepted the stream, a reason if it refused it (server side).
        self.answered: asyncio.Future[str | None] = loop.create_future()
        self.closed = loop.create_future()  # the stream is over: both directions ended, or it was reset

    # --- the TCP side ------------------------------------------------------------------------

    def attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The TCP connection is up (a user connected, or the client reached the local app)."""
        self.reader, self.writer = reader, writer
        if self.reset_reason:  # reset while the client was still dialing the app
            self._abort()
            return
        if self.mux is not None:  # the client's side: the local app answered; accept the stream
            self.mux.accept(self)

    async def relay(self) -> None:
        """Send what the TCP connection says as frames until its EOF (TCP -> tunnel); return once the stream is over.

        Stage 5's pump does it, with this stream as the connection it writes to. The other direction
        runs in the Mux's loop (on_data). Call it once the peer accepted the stream.
        """
        assert self.reader is not None
        self.sent.copied = await pipe(self.reader, self)
        await self.closed

    def write(self, data: bytes) -> None:
        if self.mux is not None and not (self.reset_reason or self.fin_sent):  # after a reset: dropped
            self.mux.send(self, data)

    async def drain(self) -> None:
        if self.mux is not None:
            await self.mux.drain()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self.mux is not None and not (self.reset_reason or self.fin_sent):
            self.fin_sent = self.sent.done = True
            self.mux.send(self, b"", fin=True)
            self._maybe_finish()

    def close(self) -> None:
        self.reset("the connection was reset")  # by the pump: its TCP connection was lost

    # --- the tunnel side (called by the Mux) ---------------------------------------------------

    async def on_data(self, payload: bytes, fin: bool) -> None:
        """Bytes (and maybe the end) of the peer's direction; ProtocolError after the end."""
        if self.got_fin:
            raise ProtocolError(f"DATA on stream {self.stream_id} after its FIN")
        if payload:
            self.received.copied += len(payload)
            await self._write(payload)
        if fin:
            self.got_fin = self.received.done = True
            self._write_eof()
        self._maybe_finish()

    def on_answer(self, refusal: str | None) -> None:
        """The peer accepted the stream (None) or refused it (a reason)."""
        if not self.answered.done():
            self.answered.set_result(refusal)

    def reset(self, reason: str, notify: bool = True) -> None:
        """End the stream at once (both directions); tell the peer why unless it told us (`notify`)."""
        if self.reset_reason or (self.fin_sent and self.got_fin):
            return
        self.reset_reason = reason
        if self.mux is not None:
            self.mux.forget(self, reason if notify else None)
        self.on_answer(reason)  # a user still waiting for an answer gets this one (a 502 page)
        if self.writer is not None and self.answered.result() is None:
            self._abort()  # a relayed connection: a reset ends it at once, as it would without us
        self._close()

    # --- inside ------------------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        assert self.writer is not None
        if self.writer.is_closing():
            return  # reset: the rest of the frames for it go nowhere
        self.writer.write(data)
        try:
            # Backpressure: our TCP peer reads slower than the tunnel brings its bytes. Without a
            # window to stop just this stream's sender, the Mux's loop waits here: all streams wait.
            await self.writer.drain()
        except OSError:  # the peer reset the connection: this stream ends, the tunnel goes on
            self.reset("the connection was reset")

    def _write_eof(self) -> None:
        assert self.writer is not None
        if not self.writer.is_closing() and self.writer.can_write_eof():
            # Half-close: tell the TCP peer "no more data from this side" while the other
            # direction keeps flowing (an HTTP client may shut its write side and still wait).
            try:
                self.writer.write_eof()
            except OSError:
                # The peer reset the connection after its own EOF (an impatient user who closed
                # before the answer, whose kernel answered the answer with a reset): shutdown()
                # fails with ENOTCONN, here, inside the Mux's handling of a FIN frame. It ends this
                # stream, never the tunnel connection that carries everyone else's.
                self.reset("the connection was reset")

    def _abort(self) -> None:
        """End the TCP connection with a reset (RST), as its far end's ended or as a lost tunnel must show."""
        assert self.writer is not None
        # WHY a linger of 0: abort() alone closes the socket, and the kernel then ends the
        # connection with a FIN. The user (or the app) would read a clean end where the far side
        # reset or the tunnel was lost: a cut download would look complete, a cut upload too.
        sock = self.writer.get_extra_info("socket")  # None once a TLS connection is gone
        if sock is not None:
            with contextlib.suppress(OSError):  # closed already: nothing is left to reset
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def _maybe_finish(self) -> None:
        if self.fin_sent and self.got_fin and not self.reset_reason:
            if self.mux is not None:
                self.mux.forget(self, None)
            if self.writer is not None:
                self.writer.close()  # both directions ended: close, after the buffered bytes leave
            self._close()

    def _close(self) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
