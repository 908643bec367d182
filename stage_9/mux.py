"""The multiplexer: many streams over one TCP connection, taking turns fairly, each with its own window.

Both sides run one `Mux` on the tunnel connection once the handshake is done. It reads frames
(frames.Parser) and hands each to its stream (relay.Stream); it writes the streams' frames in turns.

- **Stream ids.** Only the server opens streams, one per user, numbered 1, 2, 3... in order, so
  that an id the server never used can be told from one that is merely closed: a frame for the
  first is a broken peer (the connection ends), a frame for the second was on its way when we
  closed the stream (it is dropped).
- **Head-of-line blocking.** One TCP connection delivers bytes in order: if the server stopped
  reading it because one user's app is slow, every other user would wait too. So we never stop
  reading it. Per-stream windows make that safe: a peer may send a stream only what its receiver
  granted, so a slow stream holds at most one window, and stalls only itself.
- **Fairness.** Streams with bytes to send wait in a round-robin queue, and each turn sends one
  frame of at most MAX_FRAME bytes: a bulk download and a small page alternate frame by frame.
  Frames go to the transport only while its buffer is below WRITE_HIGH; the rest wait in their
  streams (whose TCP connections are then no longer read). Control frames (window updates,
  opens, resets) skip the queue: a window update stuck behind data could stall everyone.
"""

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol

from . import frames
from .frames import ACK, DATA, FIN, HEADER, MAX_FRAME, RST, SYN, WINDOW_UPDATE, Frame, encode
from .protocol import MAX_LINE, ProtocolError, TunnelError, printable

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024  # the most the event loop reads from a socket in one go anyway
# Data frames are written while the connection's send buffer holds less than this.
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
    def on_data(self, payload: bytes | memoryview, fin: bool) -> None: ...
    # The peer's ACK (None), or why the stream was refused.
    def on_answer(self, refusal: str | None) -> None: ...
    # An RST came, or the tunnel connection is gone: the TCP connection ends at once.
    def reset(self, reason: str, notify: bool = True) -> None: ...
    # A WINDOW_UPDATE came: the peer has room for more of the stream's bytes.
    def on_window(self, increment: int) -> None: ...
    # Its turn to send: the next frame's payload (at most `limit` bytes) and whether FIN goes with it.
    def take(self, limit: int) -> tuple[bytes | memoryview, bool] | None: ...
    # After its turn: whether it queues again for another.
    def has_more(self) -> bool: ...
    # Its FIN is on its way: the stream may be over (both directions ended).
    def after_fin_sent(self) -> None: ...


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
        self._loop = asyncio.get_running_loop()
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
        self._ready: deque[StreamEnd] = deque()  # streams with a frame to send, in turn
        self._scheduled: set[int] = set()
        self._blocked = False  # the transport's buffer is full: data frames wait
        self._out: list[bytes | memoryview] = []  # frames for the connection, written at the end of the turn
        self._out_size = 0
        self._parser = frames.Parser()
        self.failure: Exception | None = None  # why we ended the connection ourselves

    # --- streams ------------------------------------------------------------------------------

    def open(self, stream: StreamEnd) -> int:
        """Open a stream for a user (server side): SYN goes out now, the user's bytes follow."""
        self.last_id += 1
        self._register(stream, self.last_id)
        self._send(encode(DATA, SYN, stream.stream_id))
        self.schedule(stream)  # bytes that came before: optimistically, within the first window
        return stream.stream_id

    def accept(self, stream: StreamEnd) -> None:
        """Accept a stream the peer opened (client side: the local app answered)."""
        self._send(encode(DATA, ACK, stream.stream_id))
        stream.on_answer(None)

    def grant(self, stream: StreamEnd, increment: int) -> None:
        """Let the peer send `increment` more bytes on `stream`."""
        self._send(frames.window_update(stream.stream_id, increment))

    def forget(self, stream: StreamEnd, reset: str | None) -> None:
        """The stream is over; with `reset`, tell the peer it was reset and why."""
        if self.streams.pop(stream.stream_id, None) is not None and reset is not None:
            self._send(encode(DATA, RST, stream.stream_id, reset.encode("ascii", "replace")[:MAX_LINE]))

    def schedule(self, stream: StreamEnd) -> None:
        """`stream` may have a frame to send: queue it for its turn, and send what can go now."""
        if stream.stream_id and stream.stream_id not in self._scheduled:
            self._scheduled.add(stream.stream_id)
            self._ready.append(stream)
        self._flush()

    def _register(self, stream: StreamEnd, stream_id: int) -> None:
        stream.mux, stream.stream_id = self, stream_id
        self.streams[stream_id] = stream

    # --- writing ------------------------------------------------------------------------------

    def _flush(self) -> None:
        """Queue one frame per ready stream in turn, until none is ready or a write's worth waits."""
        while self._ready and not self._blocked and not self._transport.is_closing():
            if self._out_size >= WRITE_HIGH:
                return  # enough for one write: _write_out comes back for more
            stream = self._ready.popleft()
            self._scheduled.discard(stream.stream_id)
            if self.streams.get(stream.stream_id) is not stream:
                continue  # reset meanwhile
            frame = stream.take(MAX_FRAME)
            if frame is None:
                continue
            payload, fin = frame
            # Header and payload as two pieces: _write_out joins them (one copy, as encode() makes).
            self._write(HEADER.pack(DATA, FIN if fin else 0, stream.stream_id, len(payload)), payload)
            if fin:
                stream.after_fin_sent()
            if stream.has_more():  # back of the queue: the others take their turn first
                self._scheduled.add(stream.stream_id)
                self._ready.append(stream)

    def _write(self, *pieces: bytes | memoryview) -> None:
        """Queue the bytes of frames for the connection: they leave together at the end of this turn."""
        # WHY: one send per frame cost a system call (and a wake-up of the peer) for every 14-byte
        # window update, SYN or ACK, and every 64 KiB of data. Frames written during one turn of
        # the event loop (the grants for every frame of one read, a SYN and the user's first
        # bytes, four data frames from one read of 256 KiB) now go to the kernel in one send.
        # No timer: _write_out runs as soon as the callbacks of this turn are done.
        if not self._out:
            self._loop.call_soon(self._write_out)
        self._out.extend(pieces)
        self._out_size += sum(len(piece) for piece in pieces)

    def _write_out(self) -> None:
        """Hand the queued frames to the transport in one write; then queue more data, if it has room."""
        if not self._out or self._transport.is_closing():
            return
        data = b"".join(self._out)
        self._out.clear()
        self._out_size = 0
        self._transport.write(data)  # past WRITE_HIGH, it calls pause_writing before it returns
        self._flush()

    def _send(self, frame: bytes) -> None:
        """Write a control frame now, ahead of the queued data."""
        if self._transport.is_closing():
            return
        self._write(frame)

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
        self._blocked = True  # more than WRITE_HIGH waits to be sent: the data frames wait in their streams

    def resume_writing(self) -> None:
        self._handshake.resume_writing()
        self._blocked = False  # the kernel took most of it: the streams take their turns again
        self._flush()

    def _dispatch(self, frame: Frame) -> None:
        kind, flags, stream_id, payload = frame
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
        if kind == WINDOW_UPDATE:
            stream.on_window(int.from_bytes(payload, "big"))
        elif flags & RST:
            stream.reset(printable(bytes(payload)), notify=False)
        else:
            if flags & ACK:
                stream.on_answer(None)
            elif self._on_open is None and not stream.answered.done() and (payload or flags & FIN):
                # We opened it (the server): the client's first word on a stream is ACK or RST. Bytes
                # or an end before ACK would reach a user who may yet be refused with an error page,
                # written after them (a RST before ACK is a refusal): only a broken client sends that.
                raise ProtocolError(f"DATA on stream {stream_id} before its ACK")
            if payload or flags & FIN:
                stream.on_data(payload, bool(flags & FIN))

    def close(self, reason: str) -> None:
        """End every stream (their connections are reset)."""
        for stream in list(self.streams.values()):
            stream.reset(reason, notify=False)  # a relayed user or app sees its connection reset
        self._ready.clear()
        self._scheduled.clear()
        self._out.clear()
        self._out_size = 0
