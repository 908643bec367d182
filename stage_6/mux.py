"""The multiplexer: many streams over one TCP connection.

Both sides run one `Mux` on the tunnel connection once the handshake is done. It reads frames
(frames.Parser) and hands each to its stream (relay.Stream); it writes the streams' frames.

- **Stream ids.** Only the server opens streams, one per user, numbered 1, 2, 3... in order, so
  that an id the server never used can be told from one that is merely closed: a frame for the
  first is a broken peer (the connection ends), a frame for the second was on its way when we
  closed the stream (it is dropped).
- **Head-of-line blocking.** One TCP connection delivers bytes in order. With no flow control per
  stream, the only way to stop a sender is to stop reading the whole connection: while one
  user's TCP connection is full (it reads slowly), `run` waits for it, and every other stream
  waits too. Stage 9 gives each stream a window, so that a slow stream stalls only itself.
- **Writing.** A stream's bytes go out as frames as soon as they are read, each frame in a write
  of its own, and control frames (opens, accepts, resets) with them. While the connection's send
  buffer is full, `drain` waits, and so does every stream that sends: the rest waits in
  the kernel.
"""

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

from . import frames
from .frames import ACK, DATA, FIN, MAX_FRAME, RST, SYN, Frame, encode
from .protocol import MAX_LINE, ProtocolError, printable

READ_SIZE = 256 * 1024  # the most the event loop reads from a socket in one go anyway


class StreamEnd(Protocol):
    """What the Mux needs of a stream's far end, the TCP connection it carries (relay.Stream is one).

    A typing.Protocol: any class with these members is one, without naming it. So mux.py imports
    nothing that touches a socket: relay.py builds on it, never the reverse, and this file reads alone
    (yamux's session, too, keeps the streams' state and leaves the sockets to its caller).
    """

    # Set by _register: the stream sends its bytes through this Mux.
    mux: "Mux | None"
    # Set by _register: every frame for the stream carries it.
    stream_id: int
    # Done once the peer accepted (ACK) or refused the stream: data before the ACK is a broken peer.
    answered: asyncio.Future[str | None]

    # A DATA frame's bytes (and maybe the end) for the TCP peer; returns once it took them (drain).
    async def on_data(self, payload: bytes, fin: bool) -> None: ...
    # The peer's ACK (None), or why the stream was refused.
    def on_answer(self, refusal: str | None) -> None: ...
    # An RST came, or the tunnel connection is gone: the TCP connection ends at once.
    def reset(self, reason: str, notify: bool = True) -> None: ...


class Mux:
    """One tunnel connection: the streams on it, and its frames both ways.

    `run` reads the connection in a loop, as stage 3's pump read a connection, and hands each frame
    to its stream; the streams' own tasks write their frames (`send`).
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        peer: str,
        on_open: Callable[[int], StreamEnd] | None = None,
    ) -> None:
        self.peer = peer  # "the server" or "the client", for messages
        self._reader, self._writer = reader, writer
        self._on_open = on_open  # makes the stream for a SYN; None: the peer may not open streams
        self.streams: dict[int, StreamEnd] = {}
        self.last_id = 0  # the highest stream id opened so far on this connection
        self._parser = frames.Parser()

    # --- streams ------------------------------------------------------------------------------

    def open(self, stream: StreamEnd) -> int:
        """Open a stream for a user (server side): SYN goes out now, the user's bytes once the peer accepts."""
        self.last_id += 1
        self._register(stream, self.last_id)
        self._send(encode(DATA, SYN, stream.stream_id))
        return stream.stream_id

    def accept(self, stream: StreamEnd) -> None:
        """Accept a stream the peer opened (client side: the local app answered)."""
        self._send(encode(DATA, ACK, stream.stream_id))
        stream.on_answer(None)

    def forget(self, stream: StreamEnd, reset: str | None) -> None:
        """The stream is over; with `reset`, tell the peer it was reset and why."""
        if self.streams.pop(stream.stream_id, None) is not None and reset is not None:
            self._send(encode(DATA, RST, stream.stream_id, reset.encode("ascii", "replace")[:MAX_LINE]))

    def send(self, stream: StreamEnd, data: bytes, fin: bool = False) -> None:
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

    def _register(self, stream: StreamEnd, stream_id: int) -> None:
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
        try:
            while data := await self._reader.read(READ_SIZE):
                for frame in self._parser.feed(data):
                    # One frame after the other, and each one's bytes handed on before the next
                    # is read: a stream whose TCP peer is slow holds up this loop (head-of-line).
                    await self._dispatch(frame)
            if self._parser.pending:
                raise ProtocolError("connection closed in the middle of a frame")
        finally:
            self.close(f"the connection to {self.peer} was lost")

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
        if flags & RST:
            stream.reset(printable(payload), notify=False)
        else:
            if flags & ACK:
                stream.on_answer(None)
            elif not stream.answered.done() and (payload or flags & FIN):
                # Neither side sends bytes before the ACK: the server reads its user only once the
                # client accepted, the client its app only once connected. Bytes or an end before it
                # would reach a user who may yet be refused with an error page, or the client before
                # it has a connection to write them to: only a broken peer sends that.
                raise ProtocolError(f"DATA on stream {stream_id} before its ACK")
            if payload or flags & FIN:
                await stream.on_data(payload, bool(flags & FIN))

    def close(self, reason: str) -> None:
        """End every stream (their connections are reset)."""
        for stream in list(self.streams.values()):
            stream.reset(reason, notify=False)  # a relayed user or app sees its connection reset
