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
  pings, opens, resets) skip the queue: a window update stuck behind data could stall everyone.
- **A budget for frames without data.** Each costs us a parse and a dispatch, and a peer can send a
  million a second: the peer may send as many as our own frames call for, and a few more (see
  CONTROL_RATE). A peer past its budget is cut.
"""

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

from . import frames
from .frames import ACK, DATA, FIN, GO_AWAY, HEADER, MAX_FRAME, PING, RST, SYN, WINDOW_UPDATE, Frame, encode
from .protocol import LINGER, MAX_LINE, MAX_STREAMS, GoneAway, ProtocolError, TunnelError, printable

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024  # the most the event loop reads from a socket in one go anyway
SPARE = 32 * 1024  # room for a TLS record more than asked for (see get_buffer)
# Data frames are written while the connection's send buffer holds less than this.
WRITE_HIGH = 128 * 1024
# Control frames are always written; a peer that lets this much pile up reads nothing at all.
CONTROL_LIMIT = 4 * 1024 * 1024
# Frames that carry no data (PING, WINDOW, GO_AWAY, a bare SYN, ACK, FIN or RST) were parsed and
# never limited: one tenant flooding PING|ACK took the server to 100 % of a core, and another
# tunnel's median GET from 2.3 to 116 ms (issue 23). A peer may now send only what our frames call
# for: STREAM_CREDIT for each stream opened (its ACK, FIN and RST, and one to spare), one for each
# DATA frame we send (the WINDOW that may grant it back), and CONTROL_RATE a second for the rest
# (a ping every few seconds, and its answer), saved up to CONTROL_BURST. A real client stays far
# below: 2 such frames per stream at 2,800 new streams a second, 13 a second when kept alive.
STREAM_CREDIT = 4
CONTROL_RATE = 100
CONTROL_BURST = 1000


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


class Mux(asyncio.BufferedProtocol):
    """One tunnel connection: the streams on it, its frames both ways, and its heartbeats.

    The handshake reads lines with a StreamReader; once `run` starts, the Mux is the connection's
    Protocol: the event loop (or TLS, decrypting) reads into a buffer the Mux hands out
    (`get_buffer`), and the Mux parses the frames in place (`buffer_updated`). Everything else
    (EOF, loss, the write buffer's pause and resume) still goes to the handshake's protocol, so the
    StreamReader sees the end and `drain`/`wait_closed` keep working.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        peer: str,
        heartbeat_timeout: float,
        heartbeat_interval: float | None = None,
        on_open: Callable[[int, str], StreamEnd] | None = None,
        max_streams: int = MAX_STREAMS,
    ) -> None:
        self.peer = peer  # "the server" or "the client", for messages
        self._loop = asyncio.get_running_loop()
        self._reader, self._writer = reader, writer
        # A TCP connection: it reads and writes. WHY a cast, not an isinstance check (stage 22): uvloop's
        # transports have every method of asyncio.Transport, but are not its subclasses.
        transport = cast(asyncio.Transport, writer.transport)
        self._transport = transport
        self._transport.set_write_buffer_limits(high=WRITE_HIGH)
        handshake = transport.get_protocol()  # the StreamReader's protocol (see run)
        assert isinstance(handshake, asyncio.Protocol)
        self._handshake = handshake
        self.heartbeat_timeout, self.heartbeat_interval = heartbeat_timeout, heartbeat_interval
        self._on_open = on_open  # makes the stream for a SYN; None: the peer may not open streams
        self.max_streams = max_streams
        self.streams: dict[int, StreamEnd] = {}
        self.last_id = 0  # the highest stream id opened so far on this connection
        self._ready: deque[StreamEnd] = deque()  # streams with a frame to send, in turn
        self._scheduled: set[int] = set()
        self._blocked = False  # the transport's buffer is full: data frames wait
        self._out: list[bytes | memoryview] = []  # frames for the connection, written at the end of the turn
        self._out_size = 0
        self._parser = frames.Parser()
        self._buffer = memoryview(b"")  # the read in progress (see get_buffer)
        self._last_heard = time.monotonic()
        self._allowance = float(CONTROL_BURST)  # frames without data the peer may still send (see _spend)
        self._allowance_at = self._last_heard
        self._timers: list[asyncio.TimerHandle] = []
        self.failure: Exception | None = None  # why we ended the connection ourselves

    # --- streams ------------------------------------------------------------------------------

    def open(self, stream: StreamEnd, user: str = "") -> int:
        """Open a stream for a user (server side): SYN, with the user's address, goes out now; its bytes follow."""
        self.last_id += 1
        self._allowance += STREAM_CREDIT  # the peer's ACK, FIN or RST for it
        self._register(stream, self.last_id)
        self._send(encode(DATA, SYN, stream.stream_id, user.encode("ascii", "replace")[:MAX_LINE]))
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
            self._allowance += bool(payload)  # the WINDOW frame the peer may grant back for it
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
        if self._transport.get_write_buffer_size() + self._out_size > CONTROL_LIMIT:
            self._fail(TunnelError(f"{self.peer} reads nothing: {CONTROL_LIMIT} bytes of frames wait for it"))

    def _fail(self, exc: Exception) -> None:
        if self.failure is None:
            self.failure = exc
        # Stop reading and end the reader as if the peer had closed: run() then raises `exc`, and
        # the transport stays open for a GO_AWAY saying why (see goodbye).
        self._transport.pause_reading()
        if not self._reader.at_eof():
            self._reader.feed_eof()

    # --- reading ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Relay frames until the peer closes (return), or raise: ProtocolError, TimeoutError, TunnelError."""
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(self.heartbeat_timeout, self._check_heartbeat))
        if self.heartbeat_interval is not None:
            self._timers.append(loop.call_later(self.heartbeat_interval, self._ping))
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

    # WHY a BufferedProtocol (new in stage 16): over TLS, asyncio's SSLProtocol then decrypts straight
    # into a buffer we hand it, instead of making a 256 KiB bytes object for every TLS record (16 KiB
    # at most) and joining the records of one read into yet another. The bench measured bulk
    # transfers 1.13-1.31x faster, and 14-20% less CPU per GB (bench/README.md, the TLS row).
    def get_buffer(self, sizehint: int) -> memoryview:
        # A fresh buffer for every read: the payloads handed to the streams are views of it
        # (frames.Parser), and they may still wait in a transport's buffer after this call.
        # SSLProtocol's hint is what its encrypted buffer holds; decrypted, OpenSSL may hand over
        # a record more: the spare room keeps the rest from coming later in a tiny second read.
        size = sizehint + SPARE if sizehint > 0 else READ_SIZE
        self._buffer = memoryview(bytearray(size))
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.failure is not None:
            return  # ending: what the peer still sends is dropped
        self._last_heard = time.monotonic()  # any frame shows the peer is alive
        try:
            for frame in self._parser.feed(data):
                self._dispatch(frame)
        except TunnelError as exc:  # a bad frame (ProtocolError), or GO_AWAY: run() raises it
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
        if flags & SYN:
            self._allowance += STREAM_CREDIT  # opened, whether we can take it or not: our ACK or RST follows
        if kind != DATA or flags & RST or not payload:
            self._spend()
        if kind == PING:
            if not flags & ACK:
                self._send(encode(PING, ACK, 0, payload))  # the answer: the same 8 bytes
            return
        if kind == GO_AWAY:
            raise GoneAway(f"{self.peer} closed the tunnel: {printable(bytes(payload))}")
        stream = self.streams.get(stream_id)
        if flags & SYN:
            if self._on_open is None:
                raise ProtocolError(f"{self.peer} may not open streams (SYN on stream {stream_id})")
            if stream_id <= self.last_id:
                raise ProtocolError(f"stream {stream_id} opened out of order (after {self.last_id})")
            self.last_id = stream_id
            if len(self.streams) >= self.max_streams:
                self._send(encode(DATA, RST, stream_id, b"too many streams at once"))
                return
            # The client dials its local app for it; the SYN's payload names the user, for the observer.
            stream = self._on_open(stream_id, printable(bytes(payload)))
            self._register(stream, stream_id)
            payload = b""  # an address, not the stream's first bytes
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

    def _spend(self) -> None:
        """Count one frame without data against the peer's allowance; ProtocolError once it is spent."""
        now = time.monotonic()
        if self._allowance < CONTROL_BURST:  # time refills it up to the burst; credit earned above is kept
            self._allowance = min(CONTROL_BURST, self._allowance + (now - self._allowance_at) * CONTROL_RATE)
        self._allowance_at = now
        self._allowance -= 1
        if self._allowance < 0:
            raise ProtocolError(f"{self.peer} sends more frames without data than ours call for (a flood)")

    # --- heartbeats and the end -------------------------------------------------------------------

    def _check_heartbeat(self) -> None:
        silent = time.monotonic() - self._last_heard
        if silent >= self.heartbeat_timeout:
            self._fail(TimeoutError(f"no word from {self.peer} for {self.heartbeat_timeout:g}s"))
            return
        delay = self.heartbeat_timeout - silent
        self._timers.append(asyncio.get_running_loop().call_later(delay, self._check_heartbeat))

    def _ping(self) -> None:
        # The peer echoes it; reading anything at all resets our deadline (_check_heartbeat).
        self._send(encode(PING, 0, 0, time.monotonic_ns().to_bytes(8, "big")))
        assert self.heartbeat_interval is not None
        self._timers.append(asyncio.get_running_loop().call_later(self.heartbeat_interval, self._ping))

    async def goodbye(self, reason: str) -> None:
        """Tell the peer why we end the connection (GO_AWAY), give it a moment to read it; the caller closes."""
        self._send(encode(GO_AWAY, 0, 0, reason.encode("ascii", "replace")[:MAX_LINE]))
        self._write_out()  # now: the EOF below must come after it
        with contextlib.suppress(OSError):  # as protocol.linger: our EOF first, then swallow input
            if self._writer.can_write_eof() and not self._transport.is_closing():
                self._writer.write_eof()
            async with asyncio.timeout(LINGER):
                while await self._reader.read(READ_SIZE):
                    pass

    def close(self, reason: str) -> None:
        """End every stream (their connections are reset) and stop the timers."""
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for stream in list(self.streams.values()):
            stream.reset(reason, notify=False)  # a relayed user or app sees its connection reset
        self._ready.clear()
        self._scheduled.clear()
        self._out.clear()
        self._out_size = 0
