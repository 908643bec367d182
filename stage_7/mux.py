"""The multiplexer: many streams over one TCP connection.

Both sides run one `Mux` on the tunnel connection once the handshake is done. It reads frames
(frames.Parser) and hands each to its stream (relay.Stream); it writes the streams' frames.

- **Stream ids.** Only the server opens streams, one per user, numbered 1, 2, 3... in order, so
  that an id the server never used can be told from one that is merely closed: a frame for the
  first is a broken peer (the connection ends), a frame for the second was on its way when we
  closed the stream (it is dropped).
- **Head-of-line blocking.** One TCP connection delivers bytes in order. With no flow control per
  stream, the only way to stop a sender is to stop reading the whole connection: while one
  user's TCP connection is full (it reads slowly), every other stream waits too (see pause).
  Stage 9 gives each stream a window, so that a slow stream stalls only itself.
- **Writing.** A stream's bytes go out as frames as soon as they are read, each frame in a write
  of its own, and control frames (opens, accepts, resets) with them. While the connection's send
  buffer holds more than WRITE_HIGH, every stream stops reading its TCP connection: the rest waits
  in the kernel.
"""

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from . import frames
from .frames import ACK, DATA, FIN, MAX_FRAME, RST, SYN, Frame, encode
from .protocol import MAX_LINE, ProtocolError, TunnelError, printable

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024  # the most the event loop reads from a socket in one go anyway
# Streams are read while the connection's send buffer holds less than this.
WRITE_HIGH = 128 * 1024


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

    # A DATA frame's bytes (and maybe the end) for the TCP peer.
    def on_data(self, payload: bytes, fin: bool) -> None: ...
    # The peer's ACK (None), or why the stream was refused.
    def on_answer(self, refusal: str | None) -> None: ...
    # An RST came, or the tunnel connection is gone: the TCP connection ends at once.
    def reset(self, reason: str, notify: bool = True) -> None: ...
    # The room in the tunnel connection changed (blocked, open): read the TCP connection or not.
    def _update_reading(self) -> None: ...


class Mux(asyncio.Protocol):
    """One tunnel connection: the streams on it, and its frames both ways.

    The handshake reads lines with a StreamReader; once `run` starts, the Mux is the connection's
    Protocol: the event loop hands it each chunk read (`data_received`), and it parses the frames
    in place. Everything else (EOF, loss, the write buffer's pause and resume) still goes to the
    handshake's protocol, so the StreamReader sees the end and `drain`/`wait_closed` keep working.
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
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)  # a TCP connection: it reads and writes
        self._transport = transport
        self._transport.set_write_buffer_limits(high=WRITE_HIGH)
        handshake = transport.get_protocol()  # the StreamReader's protocol (see run)
        assert isinstance(handshake, asyncio.Protocol)
        self._handshake = handshake
        self._on_open = on_open  # makes the stream for a SYN; None: the peer may not open streams
        self.streams: dict[int, StreamEnd] = {}
        self.last_id = 0  # the highest stream id opened so far on this connection
        self._slow: set[int] = set()  # streams whose TCP peer is full: the connection is not read
        self.blocked = False  # the transport's buffer is full: no stream reads
        self._parser = frames.Parser()
        self.failure: Exception | None = None  # why we ended the connection ourselves

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
        self.resume(stream)
        if self.streams.pop(stream.stream_id, None) is not None and reset is not None:
            self._send(encode(DATA, RST, stream.stream_id, reset.encode("ascii", "replace")[:MAX_LINE]))

    def send(self, stream: StreamEnd, data: bytes | memoryview, fin: bool = False) -> None:
        """Send `stream`'s bytes (and with `fin`, its end) now, in frames of at most MAX_FRAME bytes."""
        view = memoryview(data)
        while True:
            payload, view = view[:MAX_FRAME], view[MAX_FRAME:]
            self._send(encode(DATA, FIN if fin and not view else 0, stream.stream_id, payload))
            if not view:
                return

    def pause(self, stream: StreamEnd) -> None:
        """`stream`'s TCP peer is full: stop reading the tunnel connection (every stream waits)."""
        self._slow.add(stream.stream_id)
        self._transport.pause_reading()

    def resume(self, stream: StreamEnd) -> None:
        """`stream` caught up (or ended): read the tunnel connection again once no stream is full."""
        self._slow.discard(stream.stream_id)
        if not self._slow and self.failure is None and not self._transport.is_closing():
            self._transport.resume_reading()

    def _register(self, stream: StreamEnd, stream_id: int) -> None:
        stream.mux, stream.stream_id = self, stream_id
        self.streams[stream_id] = stream

    # --- writing ------------------------------------------------------------------------------

    def _send(self, frame: bytes) -> None:
        """Write one frame now."""
        if not self._transport.is_closing():
            self._transport.write(frame)

    def _fail(self, exc: Exception) -> None:
        if self.failure is None:
            self.failure = exc
        # Stop reading and end the reader as if the peer had closed: run() then raises `exc`, and
        # the transport stays open until the caller closes it.
        self._transport.pause_reading()
        if not self._reader.at_eof():
            self._reader.feed_eof()

    # --- reading ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Relay frames until the peer closes (return), or raise ProtocolError."""
        try:
            # WHY a Protocol: a StreamReader copies every chunk into its buffer, copies it out again
            # for read(), and wakes this task once per read; with frames at hundreds of MB/s that
            # was a quarter of the server's CPU. From here on the chunks come to data_received.
            self._transport.set_protocol(self)
            # What the handshake's reader already holds (frames that came with the welcome line)
            # goes first; after it, the reader gets no more bytes: read() returns at EOF, or raises
            # if the connection breaks (its protocol still hears of both).
            while data := await self._reader.read(READ_SIZE):
                self.data_received(data)
            if self.failure is not None:
                raise self.failure
            if self._parser.pending:
                raise ProtocolError("connection closed in the middle of a frame")
        finally:
            self.close(f"the connection to {self.peer} was lost")

    # The event loop calls these once `run` made the Mux the connection's protocol.

    def data_received(self, data: bytes) -> None:
        if self.failure is not None:
            return  # ending: what the peer still sends is dropped
        try:
            for frame in self._parser.feed(data):
                self._dispatch(frame)
        except TunnelError as exc:  # a bad frame (ProtocolError): run() raises it
            self._fail(exc)

    def eof_received(self) -> bool | None:
        return self._handshake.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._handshake.connection_lost(exc)

    def pause_writing(self) -> None:
        self._handshake.pause_writing()
        self.blocked = True  # more than WRITE_HIGH waits to be sent: every stream stops reading
        for stream in list(self.streams.values()):
            stream._update_reading()

    def resume_writing(self) -> None:
        self._handshake.resume_writing()
        self.blocked = False
        for stream in list(self.streams.values()):
            stream._update_reading()

    def _dispatch(self, frame: Frame) -> None:
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
                stream.on_data(payload, bool(flags & FIN))

    def close(self, reason: str) -> None:
        """End every stream (their connections are reset)."""
        for stream in list(self.streams.values()):
            stream.reset(reason, notify=False)  # a relayed user or app sees its connection reset
