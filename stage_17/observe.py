"""The observer: the HTTP/1.1 exchanges in a copy of the bytes one stream relays.

The tunnel never needed to know that its bytes were HTTP. A log of requests does: to log each one
the client must find where each request and each response begins and ends, in bytes that arrive in pieces of
any size. That is HTTP/1.1's *message framing* (RFC 9112, sections 2 to 7), parsed here by hand:

- A message is a head (a start line, header lines, an empty line), then maybe a body.
- The head says how long the body is: `Transfer-Encoding: chunked` (chunks, each after its size in
  hex, until a chunk of size 0 and maybe trailer fields), else `Content-Length`, else nothing for a
  request. A response with neither lasts until the connection closes: not followed here.
- Some responses have no body whatever their head says: to a HEAD request, 204 and 304. A 1xx
  (100 Continue) comes before the real response to the same request: not followed here either.
- Requests may be *pipelined*: sent before the answers to the previous ones. Responses come back in
  the same order, so a queue pairs them, and tells which response answers a HEAD.

The observer is *sans I/O*: it is fed bytes and tells a Sink what it found; it never touches a
socket, so a test can feed it a recorded exchange split in any way. It gets a copy of what the
relay passes on, after the relay passed it on, and it never raises: bytes that break HTTP mark the
entry "not HTTP" and parsing stops for that connection, while the bytes keep flowing.
"""

import contextlib
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

# A head (start line and header fields) or a trailer section larger than this is not HTTP to us:
# servers refuse far smaller ones (nginx's default is 8 KiB a line, 32 KiB in all).
HEAD_LIMIT = 32 * 1024
LINE_LIMIT = 8 * 1024  # a start line, or a chunk-size line with its extensions
MAX_WAITING = 64  # pipelined requests waiting for their responses on one connection

# The states of an exchange, as the log shows them.
PENDING, COMPLETE, INCOMPLETE, NOT_HTTP = "pending", "complete", "incomplete", "not HTTP"

TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # RFC 9110 5.6.2: what a method or a field name is made of
# A request line and a status line, on bytes: the hot path never decodes a head, only the two or
# three words it needs from its start line.
REQUEST_LINE = rf"({TOKEN}) (\S+) HTTP/(\d\.\d)\r?".encode()
STATUS_LINE = rb"HTTP/(\d\.\d) ([1-9]\d\d)(?: ([^\x00\r\n]*))?\r?"
# The first line of a whole head (matched at its start).
REQUEST_HEAD, STATUS_HEAD = re.compile(REQUEST_LINE + rb"\n"), re.compile(STATUS_LINE + rb"\n")
# The empty line after the last field; a bare LF is tolerated (RFC 9112 2.2). WHY it starts at the
# previous line's \n: a pattern that begins with a fixed byte is searched for with memchr, 10x
# faster than one that begins with an optional \r (measured: 0.2 against 2.3 us for a small head).
HEAD_END = re.compile(rb"\n\r?\n")
# A whole head, checked in one pass of the regex engine (in C): a start line, then field lines
# `name: value` (no space before the colon: request smuggling's favourite trick), each maybe
# folded onto more lines that start with a space (obsolete, but allowed), then the empty line.
_FIELD = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n\x00]*\r?\n(?:[ \t][^\r\n\x00]*\r?\n)*"
WELL_FORMED = re.compile(rb"[^\r\n]+\r?\n(?:%s)*\r?\n" % _FIELD)
# The only fields that decide where a message ends.
FRAMING_FIELDS = re.compile(rb"\n(content-length|transfer-encoding):([^\r\n]*)", re.I)
LINE_END = re.compile(rb"\n")
HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


class NotHttp(Exception):
    """The bytes break HTTP/1.1 framing; the message says where."""


@dataclass(eq=False, slots=True)
class Message:
    """One request or response: its size, and whether it is over."""

    body_size: int = 0  # every byte of the body, de-chunked: what the app or the user reads
    wire: int = 0  # bytes on the wire: the head, the body, the chunks' framing
    done: bool = False


@dataclass(eq=False, slots=True)
class Exchange:
    """A request and its response: one line of the client's log."""

    user: str  # who sent the request: the user's stream, "stream 3"
    method: str = ""
    target: str = ""  # the path (request target), e.g. "/search?q=1"
    status: int | None = None
    state: str = PENDING
    note: str = ""  # why it is not HTTP, or incomplete
    duration: float | None = None  # seconds from the request's head to the response's last byte
    request: Message = field(default_factory=Message)
    response: Message = field(default_factory=Message)
    id: int = 0  # given by the store
    began: float = field(default_factory=time.monotonic)


class Sink(Protocol):
    """Where an Observer reports: the client's store, which logs each exchange (a test's list)."""

    def opened(self, exchange: Exchange) -> None:
        """A new exchange: its request head has arrived (or bytes that are not HTTP)."""

    def changed(self, exchange: Exchange) -> None:
        """The exchange ended, or parsing stopped."""


def read_head(head: bytes) -> dict[bytes, bytes]:
    """The framing fields of a head (lowercased name: values); NotHttp if the head is malformed.

    WHY one regex: this runs for every message through the tunnel. Checking the head with one
    regex and picking out two fields costs a fraction of making a string of every field.
    """
    if WELL_FORMED.fullmatch(head) is None:
        raise NotHttp(f"a malformed head: {head[:80]!r}")
    framing: dict[bytes, bytes] = {}
    for name, value in FRAMING_FIELDS.findall(head):  # most heads have one of them, or none
        name = name.lower()
        framing[name] = framing[name] + b"," + value if name in framing else value  # one field, as RFC 9110 5.3
    return framing


def first_line(head: bytes) -> str:
    """A head's first line, for a message that says why it is not HTTP."""
    return head.split(b"\n", 1)[0].decode("latin-1").removesuffix("\r")[:80]


def values(framing: dict[bytes, bytes], name: bytes) -> list[bytes]:
    """The comma-separated values of a framing field, lowercased: b"gzip, chunked" -> [b"gzip", b"chunked"]."""
    return [v.strip().lower() for v in framing[name].split(b",") if v.strip()] if name in framing else []


def body_length(framing: dict[bytes, bytes]) -> int | None:
    """The Content-Length, None without one; NotHttp if it is invalid or given twice differently."""
    if b"content-length" not in framing:
        return None
    lengths = set(values(framing, b"content-length"))  # "5, 5" is allowed; "5, 6" is an attack
    if len(lengths) != 1 or not all(v.isdigit() and len(v) <= 18 for v in lengths):
        raise NotHttp(f"an invalid Content-Length: {framing[b'content-length'][:80]!r}")
    return int(lengths.pop())


# How a body is delimited, as the head says (Framing._begin).
NO_BODY, LENGTH, CHUNKED, TUNNEL = range(4)


class Framing:
    """One direction of a connection: cuts its bytes into heads and bodies, whatever the pieces.

    It calls `on_head(head)`, which answers how the body is delimited; `on_body(piece)` for each
    piece of body (de-chunked); `on_end(wire, trailers)` when the message is over.
    """

    def __init__(
        self,
        on_head: Callable[[bytes], tuple[int, int]],
        on_body: Callable[[memoryview], None],
        on_end: Callable[[int, bytes], None],
    ) -> None:
        self._on_head, self._on_body, self._on_end = on_head, on_body, on_end
        self.state = NO_BODY  # between messages: the next bytes are a head
        self.left = 0  # bytes left in a Content-Length body or in a chunk
        self.wire = 0  # bytes of the current message so far
        self.buffer = bytearray()  # an incomplete head or line
        self._trailers = bytearray()
        self._ended = False
        self._steps: dict[int, Callable[[memoryview], memoryview]] = {
            NO_BODY: self._head,
            LENGTH: self._length,
            CHUNKED: self._chunk_size,
            CHUNK_DATA: self._chunk_data,
            CHUNK_END: self._chunk_end,
            TRAILERS: self._trailer_line,
            TUNNEL: self._count,
        }

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Parse `data`, the next bytes of this direction; NotHttp if they break the framing."""
        view = memoryview(data)
        while view:
            size = len(view)
            try:
                view = self._steps[self.state](view)
            except Exception:
                self.wire += size  # the bytes that broke the message are part of it (its entry counts them)
                raise
            self.wire += size - len(view)
            if self._ended:  # after counting: the message's last bytes belong to it
                self._ended = False
                wire, self.wire = self.wire, 0
                trailers, self._trailers = bytes(self._trailers), bytearray()
                self._on_end(wire, trailers)

    def tunnel(self) -> None:
        """From now on this direction carries another protocol: count its bytes, parse none."""
        self.buffer.clear()  # its bytes were counted already
        self.state = TUNNEL

    # --- one step each: consume the front of `view`, return the rest --------------------------------

    def _head(self, view: memoryview) -> memoryview:
        if not self.buffer and view[0] in b"\r\n":  # an empty line before a request is ignored (RFC 9112 2.2)
            return view[1:]
        start = max(0, len(self.buffer) - 3)  # the empty line may have begun in the last piece
        self.buffer += view[:HEAD_LIMIT]
        end = HEAD_END.search(self.buffer, start, HEAD_LIMIT)
        if end is None:
            self._check_incomplete(self.buffer)
            return view[len(view) :]
        used = end.end() - (len(self.buffer) - min(len(view), HEAD_LIMIT))  # of this piece
        head, self.buffer = bytes(self.buffer[: end.end()]), bytearray()
        return self._begin(head, view[used:])

    def _check_incomplete(self, data: bytes | bytearray | memoryview) -> None:
        """A head still incomplete: is it within bounds? (A whole head is checked by on_head.)"""
        if len(data) >= HEAD_LIMIT:
            raise NotHttp(f"no end of the head within {HEAD_LIMIT} bytes")
        end = LINE_END.search(data, 0, LINE_LIMIT)
        if end is None and len(data) > LINE_LIMIT:
            raise NotHttp(f"no line end within {LINE_LIMIT} bytes")

    def _begin(self, head: bytes, rest: memoryview) -> memoryview:
        mode, self.left = self._on_head(head)
        if mode == NO_BODY or (mode == LENGTH and not self.left):
            self._ended = True
        else:
            self.state = mode
        return rest

    def _length(self, view: memoryview) -> memoryview:
        piece = view[: self.left]
        self._on_body(piece)
        self.left -= len(piece)
        if not self.left:
            self.state, self._ended = NO_BODY, True
        return view[len(piece) :]

    def _line(self, view: memoryview) -> tuple[bytes | None, memoryview]:
        """A whole line (without its CRLF) and the rest, or None and nothing if the line is incomplete."""
        end = LINE_END.search(view, 0, LINE_LIMIT)
        if end is None:
            self.buffer += view[:LINE_LIMIT]
            if len(self.buffer) > LINE_LIMIT:
                raise NotHttp(f"a chunk line longer than {LINE_LIMIT} bytes")
            return None, view[len(view) :]
        line, self.buffer = bytes(self.buffer + view[: end.start()]), bytearray()
        return line.removesuffix(b"\r"), view[end.end() :]

    def _chunk_size(self, view: memoryview) -> memoryview:
        line, rest = self._line(view)
        if line is None:
            return rest
        # "1a;name=value": the size in hex, then chunk extensions, which nobody uses and we skip.
        size = line.split(b";", 1)[0].strip(b" \t")
        if not HEX.fullmatch(size):
            raise NotHttp(f"a bad chunk size line: {line[:40]!r}")
        self.left = int(size, 16)
        self.state = CHUNK_DATA if self.left else TRAILERS
        return rest

    def _chunk_data(self, view: memoryview) -> memoryview:
        piece = view[: self.left]
        self._on_body(piece)
        self.left -= len(piece)
        if not self.left:
            self.state = CHUNK_END
        return view[len(piece) :]

    def _chunk_end(self, view: memoryview) -> memoryview:
        line, rest = self._line(view)
        if line is not None:
            if line:
                raise NotHttp("a chunk longer than its size says")
            self.state = CHUNKED
        return rest

    def _trailer_line(self, view: memoryview) -> memoryview:
        line, rest = self._line(view)
        if line is None:
            return rest
        if not line:  # the empty line: the message is over
            self.state, self._ended = NO_BODY, True
            return rest
        self._trailers += line + b"\r\n"
        if len(self._trailers) > HEAD_LIMIT:
            raise NotHttp(f"trailer fields over {HEAD_LIMIT} bytes")
        return rest

    def _count(self, view: memoryview) -> memoryview:
        return view[len(view) :]  # feed() counts it in `wire`


# The states of a chunked body after its size line (internal to Framing).
CHUNK_DATA, CHUNK_END, TRAILERS = range(4, 7)


class Observer:
    """The exchanges of one connection (a stream), from copies of its bytes each way.

    `request_bytes` and `response_bytes` never raise, whatever they are given: a failure is the
    entry's ("not HTTP"), never the relay's.
    """

    def __init__(self, sink: Sink, user: str) -> None:
        self._sink = sink
        self.user = user
        self._up = Framing(self._request_head, self._request_body, self._request_end)
        self._down = Framing(self._response_head, self._response_body, self._response_end)
        self._sending: Exchange | None = None  # the request whose bytes are arriving
        self._waiting: deque[Exchange] = deque()  # requests sent, whose response is not over yet, in order
        self.closed = False

    def request_bytes(self, data: bytes | memoryview) -> None:
        """The next bytes from the user to the app."""
        self._feed(self._up, data)

    def response_bytes(self, data: bytes | memoryview) -> None:
        """The next bytes from the app to the user."""
        self._feed(self._down, data)

    def _feed(self, framing: Framing, data: bytes | memoryview) -> None:
        if self.closed:
            return
        try:
            framing.feed(data)
        # WHY catch everything: this runs inside the relay's data_received. Whatever goes wrong here,
        # malformed bytes (NotHttp) or a bug of ours, must cost the entry, never the user's bytes.
        except Exception as exc:
            with contextlib.suppress(Exception):  # telling the sink may fail too (it may be what failed)
                self._stop(framing, exc)

    def close(self, reason: str = "") -> None:
        """The connection is over: end what it ended, and mark what it cut short; never raises."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):  # as in _feed: observing must never break the relay
            if self._up.buffer and self._up.state == NO_BODY and not self._waiting:
                self._stop(self._up, NotHttp("the connection closed in the middle of a request head"))
            cut = reason or "the connection closed before the exchange was over"
            for exchange in {id(e): e for e in [*self._waiting, self._sending] if e is not None}.values():
                if exchange.state == PENDING:
                    exchange.state, exchange.note = INCOMPLETE, cut
                    exchange.duration = time.monotonic() - exchange.began
                    self._sink.changed(exchange)

    # --- requests -----------------------------------------------------------------------------

    def _request_head(self, head: bytes) -> tuple[int, int]:
        framing = read_head(head)
        match = REQUEST_HEAD.match(head)
        if match is None:
            raise NotHttp(f"not a request line: {first_line(head)!r}")
        if len(self._waiting) >= MAX_WAITING:
            raise NotHttp(f"more than {MAX_WAITING} pipelined requests wait for their responses")
        method, target, version = match[1].decode("ascii"), match[2].decode("latin-1"), match[3]
        exchange = Exchange(self.user, method, target)
        self._sending = exchange
        self._waiting.append(exchange)
        self._sink.opened(exchange)
        codings = values(framing, b"transfer-encoding") if b"transfer-encoding" in framing else None
        if codings and version != b"1.0":  # RFC 9112 6.1: chunked wins over Content-Length
            if codings[-1] != b"chunked":
                raise NotHttp(f"a request body in {codings[-1]!r}, not chunked: its length is unknown")
            return CHUNKED, 0
        length = body_length(framing)
        return (LENGTH, length) if length else (NO_BODY, 0)  # no length: no body, for a request

    def _request_body(self, piece: memoryview) -> None:
        assert self._sending is not None
        self._sending.request.body_size += len(piece)

    def _request_end(self, wire: int, trailers: bytes) -> None:
        exchange, self._sending = self._sending, None
        assert exchange is not None
        exchange.request.wire += wire
        exchange.request.done = True
        if exchange.response.done:  # an early response (a 413, say) came before the request's end
            self._complete(exchange)

    # --- responses ----------------------------------------------------------------------------

    def _response_head(self, head: bytes) -> tuple[int, int]:
        framing = read_head(head)
        match = STATUS_HEAD.match(head)
        if match is None:
            raise NotHttp(f"not a status line: {first_line(head)!r}")
        if not self._waiting:
            raise NotHttp("a response to no request")
        exchange = self._waiting[0]
        status = int(match[2])
        if status < 200:
            raise NotHttp(f"an interim response ({status}) before the real one: not followed")
        exchange.status = status
        if exchange.method == "HEAD" or status in (204, 304):
            return NO_BODY, 0  # whatever Content-Length says: it describes the GET's body
        codings = values(framing, b"transfer-encoding") if b"transfer-encoding" in framing else None
        if codings and match[1] != b"1.0":
            if codings[-1] != b"chunked":
                raise NotHttp(f"a response body in {codings[-1]!r}, not chunked: it ends when the connection does")
            return CHUNKED, 0
        if (length := body_length(framing)) is None:
            raise NotHttp("a response with no length: it ends when the connection does, not followed")
        return LENGTH, length

    def _response_body(self, piece: memoryview) -> None:
        self._waiting[0].response.body_size += len(piece)

    def _response_end(self, wire: int, trailers: bytes) -> None:
        exchange = self._waiting.popleft()
        exchange.response.wire += wire
        exchange.response.done = True
        exchange.duration = time.monotonic() - exchange.began
        if exchange.request.done:
            self._complete(exchange)

    # --- both -----------------------------------------------------------------------------------

    def _complete(self, exchange: Exchange) -> None:
        if exchange.state == PENDING:
            exchange.state = COMPLETE
        self._sink.changed(exchange)

    def _stop(self, framing: Framing, exc: Exception) -> None:
        """Parsing failed: mark the entry "not HTTP", stop parsing, and only count bytes from now on."""
        note = str(exc) if isinstance(exc, NotHttp) else f"the observer failed: {exc!r}"
        try:
            # The message that broke: the request being read, or the response being waited for.
            broken = self._sending if framing is self._up else (self._waiting[0] if self._waiting else None)
            if broken is None:  # it broke between two messages: a new entry says so
                broken = Exchange(self.user)
                self._sink.opened(broken)
            broken.state, broken.note = NOT_HTTP, note
            broken.request.wire += self._up.wire  # the bytes that came so far
            broken.response.wire += self._down.wire
            self._up.wire = self._down.wire = 0
            for other in [*self._waiting, self._sending]:
                if other is not None and other is not broken and other.state == PENDING:
                    other.state, other.note = INCOMPLETE, f"not observed to the end: {note}"
                    self._sink.changed(other)
            self._sink.changed(broken)
            self._waiting.clear()  # no answer will be paired with them now: let them go
            self._sending = None
        finally:
            for side in (self._up, self._down):
                side.tunnel()  # count, never parse again: this connection speaks something else
