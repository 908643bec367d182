"""The multiplexer: many streams over one TCP connection.

Both sides run one `Mux` on the tunnel connection once the handshake is done. It reads frames
(frames.Parser) and hands each to its stream (Stream); it writes the streams' frames.

- **Stream ids.** Only the server opens streams, one per user, numbered 1, 2, 3... in order, so
  that an id the server never used can be told from one that is merely closed: a frame for the
  first is a broken peer (the connection ends), a frame for the second was on its way when we
  closed the stream (it is dropped).
- **Head-of-line blocking.** One TCP connection delivers bytes in order. With no flow control per
  stream, the only way to stop a sender is to stop reading the whole connection: while one
  user's TCP connection is full (it reads slowly), `run` waits for it, and every other stream
  waits too. Stage 9 gives each stream a window, so that a slow stream stalls only itself.
"""

import asyncio
import contextlib
from collections.abc import Callable

from . import frames
from .frames import DATA, FIN, MAX_FRAME, SYN, Frame, encode
from .protocol import ProtocolError

READ_SIZE = 256 * 1024  # the most the event loop reads from a socket in one go anyway


class Stream:
    """One stream of a Mux: to relay.py's pump, a connection like any other."""

    def __init__(self) -> None:
        self.mux: Mux | None = None  # set by _register, with stream_id
        self.stream_id = 0
        self.reset_reason = ""  # why the stream was reset (its TCP connection or the tunnel was lost), if it was
        self.fin_sent = self.got_fin = False
        self._inbox: asyncio.Queue[bytes] = asyncio.Queue()  # the peer's bytes, then b"" for its FIN

    async def read(self, n: int = -1) -> bytes:
        """The peer's next DATA payload (at most MAX_FRAME bytes, whatever `n`); b"" after its FIN."""
        data = await self._inbox.get()
        self._inbox.task_done()  # on_data returns
        if not data:  # the end stays the end, as on a socket
            self._inbox.put_nowait(data)
        if self.reset_reason:  # a loss, not an end: the pump closes its TCP connection
            raise ConnectionResetError(self.reset_reason)
        return data

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
            self.fin_sent = True
            self.mux.send(self, b"", fin=True)

    def close(self) -> None:
        self.reset("the connection was closed")  # by the pump: its TCP connection was lost, or both ended

    # --- the tunnel side (called by the Mux) ---------------------------------------------------

    async def on_data(self, payload: bytes, fin: bool) -> None:
        """Bytes (and maybe the end) of the peer's direction; ProtocolError after the end."""
        if self.got_fin:
            raise ProtocolError(f"DATA on stream {self.stream_id} after its FIN")
        if payload:
            self._inbox.put_nowait(payload)
        if fin:
            self.got_fin = True
            self._inbox.put_nowait(b"")
        # Backpressure: the Mux's loop waits here until the pump took it all, and with it every stream:
        # behind a slow TCP peer, and behind the client's dial of the local app (the server sends
        # a user's bytes right after the SYN). Stage 6's ACK makes the server wait instead.
        await self._inbox.join()

    def reset(self, reason: str, notify: bool = True) -> None:
        """End the stream at once (both directions); tell the peer with a FIN unless the tunnel is gone (`notify`)."""
        if self.reset_reason:
            return
        self.reset_reason = reason
        if self.mux is not None:
            # WHY a FIN: there is no other way to say "ended" yet. The far end's TCP peer reads a clean
            # end, not a reset: a cut download looks complete. Stage 6 sends an RST with the reason.
            self.mux.forget(self, notify and not self.fin_sent)
        while not self._inbox.empty():  # what the pump will never read: the Mux's loop goes on
            self._inbox.get_nowait()
            self._inbox.task_done()
        self._inbox.put_nowait(b"")  # a pump waiting in read() wakes up to the reset


class Mux:
    """One tunnel connection: the streams on it, and its frames both ways.

    `run` reads the connection in a loop, as stage 3's pump read a connection, and hands each frame
    to its stream; the streams' pumps write their frames (`send`).
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        peer: str,
        on_open: Callable[[int], Stream] | None = None,
    ) -> None:
        self.peer = peer  # "the server" or "the client", for messages
        self._reader, self._writer = reader, writer
        self._on_open = on_open  # makes the stream for a SYN; None: the peer may not open streams
        self.streams: dict[int, Stream] = {}
        self.last_id = 0  # the highest stream id opened so far on this connection
        self._parser = frames.Parser()

    # --- streams ------------------------------------------------------------------------------

    def open(self, stream: Stream) -> int:
        """Open a stream for a user (server side): SYN goes out now, the user's bytes right after it."""
        self.last_id += 1
        self._register(stream, self.last_id)
        self._send(encode(DATA, SYN, stream.stream_id))
        return stream.stream_id

    def forget(self, stream: Stream, fin: bool) -> None:
        """The stream is over; with `fin`, tell the peer our direction ended (its TCP connection was lost)."""
        if self.streams.pop(stream.stream_id, None) is not None and fin:
            self._send(encode(DATA, FIN, stream.stream_id))

    def send(self, stream: Stream, data: bytes, fin: bool = False) -> None:
        """Send `stream`'s bytes (and with `fin`, its end) in frames of at most MAX_FRAME bytes."""
        view = memoryview(data)
        while True:
            payload, view = view[:MAX_FRAME], view[MAX_FRAME:]
            self._send(encode(DATA, FIN if fin and not view else 0, stream.stream_id, payload))
            if not view:
                break

    async def drain(self) -> None:
        """Backpressure: wait while the connection's send buffer is full; every stream that sends waits here too."""
        # If the connection is lost, run() ends, and close() resets every stream.
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    def _register(self, stream: Stream, stream_id: int) -> None:
        stream.mux, stream.stream_id = self, stream_id
        self.streams[stream_id] = stream

    # --- writing ------------------------------------------------------------------------------

    def _send(self, frame: bytes) -> None:
        """Write one frame now."""
        if not self._writer.is_closing():
            self._writer.write(frame)

    # --- reading ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Relay frames until the peer closes (return), or raise ProtocolError."""
        # Not readuntil(): a frame's length is in its header, so there is no end to scan for.
        while data := await self._reader.read(READ_SIZE):
            for frame in self._parser.feed(data):
                await self._dispatch(frame)  # one at a time: a slow stream holds up this loop
        if self._parser.pending:
            raise ProtocolError("connection closed in the middle of a frame")

    async def _dispatch(self, frame: Frame) -> None:
        _, flags, stream_id, payload = frame  # DATA: the only type so far
        stream = self.streams.get(stream_id)
        if flags & SYN:
            if self._on_open is None:
                raise ProtocolError(f"{self.peer} may not open streams (SYN on stream {stream_id})")
            if stream_id <= self.last_id:
                raise ProtocolError(f"stream {stream_id} opened out of order (after {self.last_id})")
            self.last_id = stream_id
            stream = self._on_open(stream_id)  # the client dials its local app for it
            self._register(stream, stream_id)
        elif stream is None:
            if stream_id > self.last_id:
                raise ProtocolError(f"{frame} for a stream that was never opened")
            return  # a stream we closed: the frame was on its way before the peer knew
        if payload or flags & FIN:
            await stream.on_data(payload, bool(flags & FIN))

    def close(self, reason: str) -> None:
        """End every stream (their connections are closed)."""
        for stream in list(self.streams.values()):
            stream.reset(reason, notify=False)  # a relayed user or app sees its connection end
