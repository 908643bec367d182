"""One stream: a TCP connection (a user, or the local app) joined to one stream of the tunnel connection.

Stage 5's pumps were a task per direction: `await read()`, `write()`, `await drain()`. Here the
event loop reads each chunk into a buffer that a Protocol, a `Stream`, hands it (`get_buffer`), and
the Stream passes it on at once: no task, no future, no wake-up per chunk (the performance page
measures the difference).

Each direction has its own flow control, as SSH channels, yamux and HTTP/2 do:

- Sending (TCP -> tunnel): we may send at most `send_window` bytes that the peer has not yet
  granted back. While our bytes wait for the window, or for the shared connection, we stop reading
  the TCP connection: the rest waits in the kernel. A read takes no more than the window allows,
  so what we hold is what the peer has room for.
- Receiving (tunnel -> TCP): once the bytes we received have left for the kernel (our transport's
  buffer is empty again), we grant the peer that many more with a WINDOW frame. A TCP peer that
  reads slowly gets no grants, and so the sender of its stream stalls: only that stream. The
  window starts small and grows, or shrinks again, within the memory budget (budget.py).

Reading is on exactly while `_should_read()` holds, recomputed after every change. An earlier
Protocol relay instead resumed reading at moments of its own choosing, and lost a pause for good
(issue 12): asyncio says "pause" once, and only once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from .budget import Budget
from .frames import INITIAL_WINDOW, MAX_WINDOW, WINDOW
from .protocol import ProtocolError

if TYPE_CHECKING:  # annotations alone; and never the reverse: mux.py knows a Stream only as a StreamEnd
    from .mux import Mux

# How much of each direction's first bytes to keep for the server's request log:
# enough for an HTTP request line ("GET /path HTTP/1.1") or status line.
HEAD_SIZE = 1024
# The most one read takes from a TCP connection: what the event loop reads at most in one go anyway.
READ_SIZE = 256 * 1024
# Every stream reads into this one buffer, and copies out what it read at once (see get_buffer).
# WHY one: a fresh 256 KiB buffer per read is zeroed first, for a request of 100 bytes too; that cost
# keep-alive requests a third of their speed. One buffer is safe: the event loop fills it and tells
# us in the same breath (buffer_updated), and nothing else runs in between.
SCRATCH = memoryview(bytearray(READ_SIZE))


@dataclass(frozen=True)
class Timeouts:
    """How long a relay may stay silent: both ways open, after one direction has ended, and (for an HTTP
    user, `keepalive`) once its answer has been delivered and the next word is the user's."""

    idle: float
    half_closed: float
    keepalive: float | None = None


@dataclass(slots=True)
class Flow:
    """One direction of a relay: how many bytes it carried, how they began, and whether it ended."""

    copied: int = 0
    head: bytes = b""
    done: bool = False


class Stream(asyncio.BufferedProtocol):
    """A TCP connection relayed through one stream of a Mux (a mux.StreamEnd), with flow control both ways."""

    # WHY slots: each side holds a Stream per user. Without them each keeps its 30 attributes in a
    # dict; the client's (an ObservedStream: one attribute more) took 1.6 KB per held connection,
    # 7.3 KB in all against 5.9 with slots (tracemalloc, 1000 held; the server's dicts were small).
    __slots__ = (
        *("timeouts", "transport", "mux", "stream_id", "sent", "received", "expired", "refusing"),
        *("reset_reason", "_outbox", "queued", "send_window", "fin_pending", "fin_sent", "recv_window"),
        *("window", "budget", "_consumed", "_unwritten", "_writing_paused", "_early", "got_fin"),
        *("_their_turn", "answered", "heard", "ended", "closed", "_last", "_timer"),
    )

    def __init__(self, timeouts: Timeouts) -> None:
        loop = asyncio.get_running_loop()
        self.timeouts = timeouts
        self.transport: asyncio.Transport | None = None  # the TCP connection, once made
        self.mux: Mux | None = None  # set by Mux.open / Mux.attach
        self.stream_id = 0
        self.sent, self.received = Flow(), Flow()  # TCP -> tunnel, tunnel -> TCP
        self.expired = ""  # why the watchdog ended the stream, if it did
        self.refusing = False  # the server is refusing this user (pages.refuse): what it sends is dropped
        self.reset_reason = ""  # why the stream was reset (by either side), if it was
        # Sending: bytes read from TCP, not yet framed; the peer's grant; the EOF still to send.
        # A list: it holds one piece at most, as reading stops while one waits (_should_read), and an
        # empty deque costs 760 bytes, for every stream.
        self._outbox: list[memoryview] = []
        self.queued = 0
        self.send_window = INITIAL_WINDOW
        self.fin_pending = self.fin_sent = False
        # Receiving: what the peer may still send; consumed bytes not yet granted back; bytes
        # that came before the TCP connection (the client dials the app while the first arrive).
        self.recv_window = INITIAL_WINDOW
        self.window = INITIAL_WINDOW  # all the peer may send before we grant more: what we promised
        self.budget: Budget | None = None  # where our window is counted (see charge)
        self._consumed = 0
        self._unwritten = 0  # written to the transport, still in its buffer
        self._writing_paused = False
        self._early: list[bytes] = []
        self.got_fin = False
        self._their_turn = False  # the last bytes went to our TCP peer: the next word is its own (see _watch)
        # answered: None when the peer accepted the stream, a reason if it refused it (server side).
        self.answered: asyncio.Future[str | None] = loop.create_future()
        self.heard = loop.create_future()  # the first byte, EOF or loss of the TCP connection
        self.ended = loop.create_future()  # EOF or loss of the TCP connection
        self.closed = loop.create_future()  # the TCP connection is gone
        self._last = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None

    # --- the TCP side ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are no subclasses (mux.py)
        # Told "pause" whenever a write leaves bytes behind, "resume" when they are all gone:
        # that is when received bytes count as consumed (see _write).
        transport.set_write_buffer_limits(high=0)
        self._watch()
        if self.reset_reason:  # reset while the client was still dialing the app
            self._abort()
            return
        if self.mux is not None:  # the client's side: the local app answered; accept the stream
            self.mux.accept(self)
        early, self._early = self._early, []
        for data in early:
            self._write(data)
        if self.got_fin:
            self._write_eof()
        self._update_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        # WHY we hand out the buffer: a Protocol is handed whatever the kernel has, up to 256 KiB, even
        # when the peer has room for 1 KiB; the rest waited here. 2,000 users who read nothing made a
        # client hold one such read each (352 MB). A read now takes what the window has room for.
        room = self.send_window if not (self.reset_reason or self.refusing) else READ_SIZE
        return SCRATCH if room >= READ_SIZE else SCRATCH[: max(room, 1)]

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(SCRATCH[:nbytes]))  # a copy: the next read of any stream reuses SCRATCH

    def data_received(self, data: bytes | memoryview) -> None:
        self._last = time.monotonic()
        self._their_turn = False
        if not self.sent.head:
            # We keep a copy of the first bytes for the log and pass them on unchanged.
            self.sent.head = bytes(data[:HEAD_SIZE])
            self._heard()
        self.sent.copied += len(data)
        if self.reset_reason or self.refusing:
            return  # no stream to carry it (see pages.refuse): read and dropped
        self._outbox.append(memoryview(data))
        self.queued += len(data)
        if self.mux is not None:  # else it waits for Mux.open, with reading paused
            self.mux.schedule(self)
        self._update_reading()

    def eof_received(self) -> bool:
        if reset_pending(self.transport):  # a reset that uvloop reports as an EOF (see reset_pending)
            self.reset("the connection was reset")
            return False
        self._heard()
        self._ended()
        if not (self.reset_reason or self.refusing):
            self.fin_pending = True  # sent after the bytes still queued (see take)
            if self.mux is not None:
                self.mux.schedule(self)
        # Keep our side open: the other direction may still flow. Not over TLS (an HTTPS user):
        # TLS has no half-close, its end closes both directions.
        return self.transport is not None and self.transport.can_write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self._heard()
        self._ended()
        if self._timer is not None:
            self._timer.cancel()
        if not (self.fin_sent and self.got_fin):  # lost before both directions ended cleanly
            self.reset(f"the connection was {'reset' if exc else 'closed'}")
        self._release()  # what the transport still held is gone with it
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        consumed, self._unwritten = self._unwritten, 0
        self._grant(consumed)

    # --- the tunnel side (called by the Mux) ---------------------------------------------------

    def take(self, limit: int) -> tuple[bytes | memoryview, bool] | None:
        """The next frame's payload (at most `limit` bytes and the window) and whether FIN goes with it."""
        payload: bytes | memoryview = b""
        if self._outbox and self.send_window > 0:
            size = min(limit, self.send_window)
            chunk = self._outbox[0]
            if len(chunk) <= size:
                payload = self._outbox.pop(0)
            else:
                payload, self._outbox[0] = chunk[:size], chunk[size:]  # views: no copy
            self.queued -= len(payload)
            self.send_window -= len(payload)
        fin = self.fin_pending and not self._outbox and not self.fin_sent
        if not payload and not fin:
            return None
        if fin:
            self.fin_sent = self.sent.done = True
            self._last = time.monotonic()  # a half-closed stream's clock starts now
        self._update_reading()
        return payload, fin

    def has_more(self) -> bool:
        """True if take() would return a frame now."""
        return bool(self._outbox and self.send_window > 0) or (self.fin_pending and not self.fin_sent)

    def on_data(self, payload: bytes | memoryview, fin: bool) -> None:
        """Bytes (and maybe the end) of the peer's direction; ProtocolError if it overran its window."""
        if self.got_fin:
            raise ProtocolError(f"DATA on stream {self.stream_id} after its FIN")
        if len(payload) > self.recv_window:
            overflow = f"{len(payload)} bytes overflow its window ({self.recv_window})"
            raise ProtocolError(f"stream {self.stream_id}: {overflow}")
        self.recv_window -= len(payload)
        self._last = time.monotonic()
        if payload:
            self._their_turn = True
            if len(self.received.head) < HEAD_SIZE:
                # A copy (payload is a view: frames.Parser), over as many frames as it takes: a
                # "100 Continue" comes alone, and the log wants the status that follows it.
                self.received.head += payload[: HEAD_SIZE - len(self.received.head)]
            self.received.copied += len(payload)
            if self.transport is None:
                self._early.append(bytes(payload))  # counted in recv_window: bounded by the window
            else:
                self._write(payload)
        if fin:
            self.got_fin = self.received.done = True
            if self.transport is not None:
                self._write_eof()
        self._maybe_finish()

    def on_window(self, increment: int) -> None:
        """The peer granted `increment` more bytes; ProtocolError if the window would pass MAX_WINDOW."""
        if self.send_window + increment > MAX_WINDOW:
            raise ProtocolError(f"stream {self.stream_id}: a window update overflows {MAX_WINDOW}")
        self.send_window += increment
        if self.mux is not None and self.has_more():
            self.mux.schedule(self)
        self._update_reading()

    def on_answer(self, refusal: str | None) -> None:
        """The peer accepted the stream (None) or refused it (a reason)."""
        if not self.answered.done():
            self.answered.set_result(refusal)

    def reset(self, reason: str, notify: bool = True) -> None:
        """End the stream at once (both directions); tell the peer why unless it told us (`notify`)."""
        if self.reset_reason or (self.fin_sent and self.got_fin):
            return
        self.reset_reason = reason
        self._outbox.clear()
        self.queued = 0
        if self.mux is not None:
            self.mux.forget(self, reason if notify else None)
        self.on_answer(reason)  # a user still waiting for an answer gets this one (a 502 page)
        if self.transport is not None and self.answered.result() is None:
            self._abort()  # a relayed connection: a reset ends it at once, as it would without us
        if self.transport is None:
            self._early.clear()
            self._release()  # no connection will come to hold our bytes (the local app was down)
        self._update_reading()

    def charge(self, budget: Budget) -> None:
        """Count this stream's window in `budget` (whose caller took INITIAL_WINDOW for it already)."""
        self.budget = budget

    # --- inside ------------------------------------------------------------------------------

    def _write(self, data: bytes | memoryview) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            # Lost (a send failed: the peer reset it) and not yet told to us (connection_lost comes on
            # the next turn): the rest of this read's frames for it go nowhere. asyncio would count
            # each write, and log "socket.send() raised exception." for every one from the fifth on.
            return
        self.transport.write(data)
        if self._writing_paused:
            self._unwritten += len(data)  # still in our buffer: granted when it leaves (resume_writing)
        else:
            self._grant(len(data))  # all of it went to the kernel at once

    def _write_eof(self) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            return
        if self.transport.can_write_eof():
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
        else:
            # TLS (an HTTPS user) has no half-close: the end of this direction is the end of the
            # connection, after the bytes still buffered (an answer that ends with the app's close).
            self.transport.close()

    def _abort(self) -> None:
        """End the TCP connection with a reset (RST), as its far end's ended or as a lost tunnel must show."""
        assert self.transport is not None
        # WHY a linger of 0: abort() alone closes the socket, and the kernel then ends the
        # connection with a FIN. The user (or the app) would read a clean end where the far side
        # reset or the tunnel was lost: a cut download would look complete, a cut upload too.
        # (Over TLS, the socket is the one under it: the reset ends the TLS connection too.)
        sock = self.transport.get_extra_info("socket")  # None once a TLS connection is gone
        if sock is not None:
            with contextlib.suppress(OSError):  # closed already: nothing is left to reset
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _grant(self, consumed: int) -> None:
        # One WINDOW frame per quarter of the window consumed, not one per chunk: the sender still
        # has 3/4 of its window to keep the pipe full meanwhile.
        self._consumed += consumed
        if self._consumed >= self.window // 4 and self.mux is not None and not self.got_fin and not self.reset_reason:
            increment = self._consumed + self._resize()
            self._consumed = 0
            if increment:
                self.recv_window += increment
                self.mux.grant(self, increment)

    def _resize(self) -> int:
        """Grow the window while the budget has room, shrink it when it is short; the change in bytes."""
        if self.budget is None:
            return 0
        if not self.budget.crowded():
            change = self.budget.grow(WINDOW - self.window)
        else:  # shrink by what was consumed, at most: bytes already promised can't be taken back
            change = -min(self.window - INITIAL_WINDOW, self._consumed)
            self.budget.give(-change)
        self.window += change
        return change

    def _release(self) -> None:
        if self.budget is not None:  # once
            self.budget.give(self.window)
            self.budget = None

    def _should_read(self) -> bool:
        # Read only while nothing we read waits to be framed, and the peer has room for more.
        # A stream that is reset or refused reads on, and drops what it reads.
        return bool(self.reset_reason or self.refusing) or (not self.queued and self.send_window > 0)

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

    def after_fin_sent(self) -> None:
        """Called by the Mux once our FIN is on its way."""
        self._maybe_finish()

    def _heard(self) -> None:
        if not self.heard.done():
            self.heard.set_result(None)

    def _ended(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def _watch(self) -> None:
        # The watchdog: a timer, not a task. Silent both ways for `idle`, or half-closed and
        # silent for `half_closed`, and the stream is reset and its connection closed.
        silence, limit = self._silence_limit()
        remaining = self._last + limit - time.monotonic()
        if remaining <= 0:
            self.expired = f"{silence} for {limit:g}s"
            self.reset(self.expired)
            if self.transport is not None:
                self.transport.abort()
            return
        # Never sleep past the shorter limits: a direction may end, or an answer come, meanwhile.
        delay = min(remaining, self.timeouts.half_closed, self.timeouts.keepalive or remaining)
        self._timer = asyncio.get_running_loop().call_later(delay, self._watch)

    def _silence_limit(self) -> tuple[str, float]:
        """What kind of silence this stream is in now, and how long it may last."""
        if self.fin_sent or self.got_fin:
            return "half-closed", self.timeouts.half_closed
        if self.timeouts.keepalive is not None and self._their_turn:
            # An HTTP user that has its answer and says nothing: a kept-alive connection waiting for
            # a next request that may never come. One source held a tunnel's 4096 streams that way
            # for the 600 s idle timeout (issue 23); nginx gives them 75 s. A user still waiting for
            # its answer (a long poll) keeps the idle timeout.
            return "idle after an answer", min(self.timeouts.keepalive, self.timeouts.idle)
        return "idle", self.timeouts.idle


def reset_pending(transport: asyncio.Transport | None) -> bool:
    """True if the TCP connection under `transport` was reset, and the error waits unread in its socket.

    WHY (stage 22): libuv, uvloop's core, ends a read at the peer's hang-up without one more recv()
    when the last read was short, and reports the end as an EOF, also when the hang-up was a reset.
    We would pass a FIN on, and a download cut by a reset would look complete at the other end. The
    socket still holds the error (ECONNRESET) until someone reads it: one getsockopt per EOF tells.
    On asyncio's loop the recv() raised it already, and this finds none.
    """
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    except OSError:  # closed meanwhile
        return False
