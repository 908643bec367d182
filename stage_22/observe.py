"""The observer: the HTTP/1.1 exchanges in a copy of the bytes one stream relays.

The tunnel never needed to know that its bytes were HTTP. A log of requests does: to log each one
the client must find where each request and each response begins and ends, in bytes that arrive in pieces of
any size. That is HTTP/1.1's *message framing* (RFC 9112, sections 2 to 7), parsed here by hand:

- A message is a head (a start line, header lines, an empty line), then maybe a body.
- The head says how long the body is: `Transfer-Encoding: chunked` (chunks, each after its size in
  hex, until a chunk of size 0 and maybe trailer fields), else `Content-Length`, else nothing for a
  request and "until the connection closes" for a response.
- Some responses have no body whatever their head says: to a HEAD request, 1xx, 204 and 304.
  A 1xx (100 Continue) is followed by the real response to the same request.
- Requests may be *pipelined*: sent before the answers to the previous ones. Responses come back in
  the same order, so a queue pairs them, and tells which response answers a HEAD.
- `Upgrade` (a WebSocket) and CONNECT turn the connection into something else once the server agrees
  (101, or 2xx to a CONNECT): one entry for the exchange, then the bytes are only counted.

The observer is *sans I/O*: it is fed bytes and tells a Sink what it found; it never touches a
socket, so a test can feed it a recorded exchange split in any way. It gets a copy of what the
relay passes on, after the relay passed it on, and it never raises: bytes that break HTTP mark the
entry "not HTTP" and parsing stops for that connection, while the bytes keep flowing.

A TLS tunnel's bytes are encrypted end to end: `Sealed` makes one entry per connection, with the
server name its ClientHello asked for (sni.py) and its bytes, and never tries to parse them.
"""

import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from . import sni

# Each body is kept up to this much; the rest is counted, not kept (the page says so).
BODY_LIMIT = 64 * 1024
# A head (start line and header fields) or a trailer section larger than this is not HTTP to us:
# servers refuse far smaller ones (nginx's default is 8 KiB a line, 32 KiB in all).
HEAD_LIMIT = 32 * 1024
LINE_LIMIT = 8 * 1024  # a start line, or a chunk-size line with its extensions
MAX_WAITING = 64  # pipelined requests waiting for their responses on one connection

# The states of an exchange, as the log shows them.
PENDING, COMPLETE, INCOMPLETE, UPGRADED, NOT_HTTP = "pending", "complete", "incomplete", "upgraded", "not HTTP"
ENCRYPTED = "encrypted"  # a TLS tunnel's connection, over: its bytes are counted, never seen

TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # RFC 9110 5.6.2: what a method or a field name is made of
# A request line and a status line, on bytes: the hot path never decodes a head, only the two or
# three words it needs from its start line.
REQUEST_LINE = rf"({TOKEN}) (\S+) HTTP/(\d\.\d)\r?".encode()
STATUS_LINE = rb"HTTP/(\d\.\d) ([1-9]\d\d)(?: ([^\x00\r\n]*))?\r?"
# The first line of a whole head (matched at its start)...
REQUEST_HEAD, STATUS_HEAD = re.compile(REQUEST_LINE + rb"\n"), re.compile(STATUS_LINE + rb"\n")
# ... and of a head still incomplete: to refuse a peer that is not speaking HTTP at its first line, not its last.
REQUEST_START, STATUS_START = re.compile(REQUEST_LINE), re.compile(STATUS_LINE)
FIELD_LINE = re.compile(rf"({TOKEN}):[ \t]*([^\x00\r\n]*?)[ \t]*")
# The empty line after the last field; a bare LF is tolerated (RFC 9112 2.2). WHY it starts at the
# previous line's \n: a pattern that begins with a fixed byte is searched for with memchr, 10x
# faster than one that begins with an optional \r (measured: 0.2 against 2.3 us for a small head).
HEAD_END = re.compile(rb"\n\r?\n")
# A whole head, checked in one pass of the regex engine (in C): a start line, then field lines
# `name: value` (no space before the colon: request smuggling's favourite trick), each maybe
# folded onto more lines that start with a space (obsolete, but allowed), then the empty line.
_FIELD = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n\x00]*\r?\n(?:[ \t][^\r\n\x00]*\r?\n)*"
WELL_FORMED = re.compile(rb"[^\r\n]+\r?\n(?:%s)*\r?\n" % _FIELD)
# The only fields that decide where a message ends (and whether the connection stays HTTP).
FRAMING_FIELDS = re.compile(rb"\n(content-length|transfer-encoding|connection|upgrade):([^\r\n]*)", re.I)
LINE_END = re.compile(rb"\n")
HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
FIRST_BYTES = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\r\n")


class NotHttp(Exception):
    """The bytes break HTTP/1.1 framing; the message says where."""


@dataclass(eq=False, slots=True)
class Message:
    """One request or response: its head as it came, its body (the first BODY_LIMIT bytes) and its size."""

    head: bytes = b""  # start line and fields, exactly as on the wire (parsed again to show them)
    trailers: bytes = b""  # the fields after a chunked body, if any
    body: bytearray = field(default_factory=bytearray)  # the first BODY_LIMIT bytes of it, de-chunked
    body_size: int = 0  # every byte of the body, de-chunked: what the app or the user reads
    wire: int = 0  # bytes on the wire: the head, the body, the chunks' framing
    chunked: bool = False
    done: bool = False


@dataclass(eq=False, slots=True)
class Exchange:
    """A request and its response: one line of the client's log."""

    user: str  # who sent the request: the user's address, as the server saw it
    method: str = ""
    target: str = ""  # the path (request target), e.g. "/search?q=1"
    status: int | None = None
    interim: list[int] = field(default_factory=list)  # 1xx statuses before the final one
    state: str = PENDING
    note: str = ""  # why it is not HTTP, or incomplete
    started: float = field(default_factory=time.time)  # wall clock, for the page
    duration: float | None = None  # seconds from the request's head to the response's last byte
    request: Message = field(default_factory=Message)
    response: Message = field(default_factory=Message)
    replay_of: int | None = None  # the id of the exchange this one replayed
    id: int = 0  # given by the store
    keep_limit: int = BODY_LIMIT  # body bytes each message keeps; the store sets 0 once it dropped the entry
    began: float = field(default_factory=time.monotonic)
    upgrade: bool = False  # the request asked to switch protocols (Upgrade, or CONNECT)
    sealed: bool = False  # a TLS tunnel's whole connection (Sealed): no request to show or replay


class Sink(Protocol):
    """Where an Observer reports: the client's store, which logs each exchange (a test's list)."""

    def opened(self, exchange: Exchange) -> None:
        """A new exchange: its request head has arrived (or bytes that are not HTTP)."""

    def grew(self, exchange: Exchange, size: int) -> None:
        """`exchange` holds `size` more bytes: a head, trailers, body kept (the store counts its memory)."""

    def changed(self, exchange: Exchange) -> None:
        """The response head came, the exchange ended, or parsing stopped."""


def parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    """The start line and the fields of a head (or a trailer section); NotHttp if they are malformed."""
    # Latin-1 maps each byte to one character: nothing is lost, and nothing can fail to decode.
    lines = head.decode("latin-1").split("\n")
    fields: list[tuple[str, str]] = []
    for line in lines[1:]:
        line = line.removesuffix("\r")
        if not line:
            break
        if line[0] in " \t" and fields:  # obsolete line folding (RFC 9112 5.2): replace with a space
            name, value = fields.pop()
            fields.append((name, value + " " + line.strip(" \t")))
            continue
        match = FIELD_LINE.fullmatch(line)
        if match is None:  # e.g. a space before the colon: request smuggling's favourite trick
            raise NotHttp(f"a malformed field line: {line[:80]!r}")
        fields.append((match[1], match[2]))
    return lines[0].removesuffix("\r"), fields


def read_head(head: bytes) -> dict[bytes, bytes]:
    """The framing fields of a head (lowercased name: values); NotHttp if the head is malformed.

    WHY one regex: this runs for every message through the tunnel. Checking the head with one
    regex and picking out four fields costs a fraction of making a string of every field (what
    parse_head does, for the page only, when someone looks at a head).
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


def field_values(fields: list[tuple[str, str]], name: str) -> list[str]:
    """Every comma-separated value of the fields named `name` (case-insensitive), lowercased."""
    return [v.strip().lower() for n, value in fields if n.lower() == name for v in value.split(",") if v.strip()]


def body_length(framing: dict[bytes, bytes]) -> int | None:
    """The Content-Length, None without one; NotHttp if it is invalid or given twice differently."""
    if (given := framing.get(b"content-length")) is None:
        return None
    if (length := given.strip()).isdigit() and len(length) <= 18:  # the usual case, one plain number: no list, no set
        return int(length)
    lengths = set(values(framing, b"content-length"))  # "5, 5" is allowed; "5, 6" is an attack
    if len(lengths) != 1 or not all(v.isdigit() and len(v) <= 18 for v in lengths):
        raise NotHttp(f"an invalid Content-Length: {framing[b'content-length'][:80]!r}")
    return int(lengths.pop())


# How a body is delimited, as the head says (Framing._begin).
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE, TUNNEL, INTERIM, HOLD = range(7)
# The states of a chunked body after its size line (internal to Framing).
CHUNK_DATA, CHUNK_END, TRAILERS = range(7, 10)


class Framing:
    """One direction of a connection: cuts its bytes into heads and bodies, whatever the pieces.

    It calls `on_head(head)`, which answers how the body is delimited; `on_body(piece)` for each
    piece of body (de-chunked); `on_end(wire, trailers)` when the message is over.
    """

    # Slots, and a table of steps the class holds (STEPS, below), not each instance: a client
    # observes every connection both ways, and a dict of nine bound methods per Framing cost a held
    # connection 1.8 KiB, and each new one the time to make them (tracemalloc, 1000 held).
    __slots__ = (
        *("_start_line", "_on_head", "_on_body", "_on_end", "state", "left", "wire", "buffer", "_trailers"),
        "_ended",
    )

    def __init__(
        self,
        start_line: re.Pattern[bytes],
        on_head: Callable[[bytes], tuple[int, int]],
        on_body: Callable[[memoryview], None],
        on_end: Callable[[int, bytes], None],
    ) -> None:
        self._start_line = start_line  # what a request line (or a status line) looks like
        self._on_head, self._on_body, self._on_end = on_head, on_body, on_end
        self.state = NO_BODY  # between messages: the next bytes are a head
        self.left = 0  # bytes left in a Content-Length body or in a chunk
        self.wire = 0  # bytes of the current message so far
        self.buffer = bytearray()  # an incomplete head or line, or bytes held for an upgrade's answer
        self._trailers = bytearray()
        self._ended = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Parse `data`, the next bytes of this direction; NotHttp if they break the framing."""
        view = memoryview(data)
        while view:
            size = len(view)
            try:
                view = self.STEPS[self.state](self, view)
            except Exception:
                self.wire += size  # the bytes that broke the message are part of it (its entry counts them)
                raise
            self.wire += size - len(view)
            if self._ended:  # after counting: the message's last bytes belong to it
                self._ended = False
                wire, self.wire = self.wire, 0
                trailers = b""
                if self._trailers:  # rare: no new buffer for the others
                    trailers, self._trailers = bytes(self._trailers), bytearray()
                self._on_end(wire, trailers)

    def finish(self) -> None:
        """The connection closed: a body that lasts until the close is complete now."""
        if self.state == UNTIL_CLOSE:
            self.state = NO_BODY
            wire, self.wire = self.wire, 0
            self._on_end(wire, b"")

    def hold(self) -> None:
        """Keep the next bytes unparsed until `resume` or `tunnel`: the server has not answered an upgrade yet."""
        self.state = HOLD

    def resume(self) -> None:
        """The upgrade was refused: parse what was held, as HTTP again."""
        held, self.buffer = self.buffer, bytearray()
        self.wire -= len(held)  # counted once already, when it was held
        self.state = NO_BODY
        self.feed(held)

    def tunnel(self) -> None:
        """From now on this direction carries another protocol: count its bytes, parse none."""
        self.buffer.clear()  # held bytes were counted already
        self.state = TUNNEL

    # --- one step each: consume the front of `view`, return the rest --------------------------------

    def _head(self, view: memoryview) -> memoryview:
        if not self.buffer:
            if view[0] not in FIRST_BYTES:  # garbage (TLS, say) is known at its first byte
                raise NotHttp(f"starts with byte 0x{view[0]:02x}, not with an HTTP start line")
            if view[0] in b"\r\n":  # an empty line before a request is ignored (RFC 9112 2.2)
                return view[1:]
            # The usual case: the whole head is in this piece. Look for its end right there, no copy.
            if end := HEAD_END.search(view, 0, HEAD_LIMIT):
                return self._begin(bytes(view[: end.end()]), view[end.end() :])
            self._check_incomplete(view)
            self.buffer += view
            return view[len(view) :]
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
        """A head still incomplete: is it HTTP so far? (A whole head is checked by on_head.)"""
        if len(data) >= HEAD_LIMIT:
            raise NotHttp(f"no end of the head within {HEAD_LIMIT} bytes")
        end = LINE_END.search(data, 0, LINE_LIMIT)
        if end is None and len(data) > LINE_LIMIT:
            raise NotHttp(f"no line end within {LINE_LIMIT} bytes")
        if end is not None and not self._start_line.fullmatch(data[: end.start()]):
            raise NotHttp(f"not an HTTP start line: {bytes(data[: min(end.start(), 80)])!r}")

    def _begin(self, head: bytes, rest: memoryview) -> memoryview:
        mode, self.left = self._on_head(head)
        if mode == INTERIM:  # a 1xx: the same response goes on with another head
            return rest
        if mode == LENGTH and len(rest) >= self.left:  # the usual small message: its whole body is here
            if self.left:
                self._on_body(rest[: self.left])
            self._ended = True
            return rest[self.left :]
        if mode == NO_BODY:
            self._ended = True
        elif mode == TUNNEL:
            self._ended = True  # the message (a 101) is over; what follows is another protocol
            self.state = mode
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

    def _until_close(self, view: memoryview) -> memoryview:
        self._on_body(view)
        return view[len(view) :]

    def _count(self, view: memoryview) -> memoryview:
        return view[len(view) :]  # feed() counts it in `wire`

    def _hold(self, view: memoryview) -> memoryview:
        self.buffer += view
        if len(self.buffer) > HEAD_LIMIT:  # a client that does not wait for the answer to its upgrade
            raise NotHttp(f"over {HEAD_LIMIT} bytes sent before the answer to an upgrade")
        return view[len(view) :]

    STEPS: ClassVar[dict[int, Callable[[Any, memoryview], memoryview]]] = {  # what each state does with the next bytes
        NO_BODY: _head,
        LENGTH: _length,
        CHUNKED: _chunk_size,
        CHUNK_DATA: _chunk_data,
        CHUNK_END: _chunk_end,
        TRAILERS: _trailer_line,
        UNTIL_CLOSE: _until_close,
        TUNNEL: _count,
        HOLD: _hold,
    }


class Observer:
    """The exchanges of one connection (a stream), from copies of its bytes each way.

    `request_bytes` and `response_bytes` never raise, whatever they are given: a failure is the
    entry's ("not HTTP"), never the relay's. `up` makes the Framing of the user's direction (the
    server's rewrites each head on its way: forwarding.py).
    """

    __slots__ = ("_down", "_sending", "_sink", "_through", "_up", "_waiting", "closed", "latest", "replay_of", "user")

    def __init__(
        self, sink: Sink, user: str, replay_of: int | None = None, up: Callable[..., Framing] = Framing
    ) -> None:
        self._sink = sink
        self.user, self.replay_of = user, replay_of
        self._up = up(REQUEST_START, self._request_head, self._request_body, self._request_end)
        self._down = Framing(STATUS_START, self._response_head, self._response_body, self._response_end)
        self._sending: Exchange | None = None  # the request whose bytes are arriving
        # Requests sent, whose response is not over yet, in order. A list: it holds at most MAX_WAITING,
        # and an empty deque costs 760 bytes, for every connection the client holds.
        self._waiting: list[Exchange] = []
        self._through: Exchange | None = None  # upgraded or not HTTP: bytes are counted in it, not parsed
        self.latest: Exchange | None = None  # the last exchange opened (a replay waits for its response)
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
            self._down.finish()  # a response delimited by the close is complete now
            if self._through is not None:
                self._through.request.wire += self._up.wire
                self._through.response.wire += self._down.wire
                self._sink.changed(self._through)
            elif self._up.buffer and self._up.state == NO_BODY and not self._waiting:
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
        exchange = Exchange(self.user, method, target, replay_of=self.replay_of)
        exchange.request.head = head
        self._sending = self.latest = exchange
        self._waiting.append(exchange)
        self._sink.opened(exchange)
        if not exchange.keep_limit:  # the store had no room for it (capture.Store.opened)
            raise NotHttp("not observed: the inspector is full of requests still waiting for their answers")
        # An upgrade (a WebSocket) or a CONNECT: once the server agrees, the bytes are no longer HTTP.
        exchange.upgrade = method == "CONNECT" or (
            b"upgrade" in framing and b"upgrade" in values(framing, b"connection")
        )
        codings = values(framing, b"transfer-encoding") if b"transfer-encoding" in framing else None
        if codings and version != b"1.0":  # RFC 9112 6.1: chunked wins over Content-Length
            if codings[-1] != b"chunked":
                raise NotHttp(f"a request body in {codings[-1]!r}, not chunked: its length is unknown")
            exchange.request.chunked = True
            return CHUNKED, 0
        length = body_length(framing)
        return (LENGTH, length) if length else (NO_BODY, 0)  # no length: no body, for a request

    def _request_body(self, piece: memoryview) -> None:
        assert self._sending is not None
        self._keep(self._sending, self._sending.request, piece)

    def _request_end(self, wire: int, trailers: bytes) -> None:
        exchange, self._sending = self._sending, None
        assert exchange is not None
        exchange.request.wire += wire
        exchange.request.done = True
        if trailers and exchange.keep_limit:  # keep_limit 0: the store dropped it, it keeps nothing
            exchange.request.trailers = trailers
            self._sink.grew(exchange, len(trailers))
        if exchange.upgrade and exchange.status is None:
            self._up.hold()  # until the server says whether the protocol switches
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
        if 100 <= status < 200 and status != 101:  # 100 Continue, 103 Early Hints: the real one follows
            exchange.interim.append(status)
            return INTERIM, 0
        exchange.status = status
        if exchange.keep_limit:  # else dropped by the store: it keeps nothing
            exchange.response.head = head
            self._sink.grew(exchange, len(head))
        self._sink.changed(exchange)
        switched = status == 101 or (exchange.method == "CONNECT" and 200 <= status < 300)
        if switched:
            if not exchange.upgrade:
                raise NotHttp(f"{status} to a request that asked for no upgrade")
            self._switch(exchange)
            return TUNNEL, 0
        if exchange.upgrade and self._up.state == HOLD:
            self._up.resume()  # refused: what the user sent meanwhile is HTTP again
        if exchange.method == "HEAD" or status in (204, 304):
            return NO_BODY, 0  # whatever Content-Length says: it describes the GET's body
        codings = values(framing, b"transfer-encoding") if b"transfer-encoding" in framing else None
        if codings and match[1] != b"1.0":
            exchange.response.chunked = codings[-1] == b"chunked"
            return (CHUNKED, 0) if exchange.response.chunked else (UNTIL_CLOSE, 0)
        length = body_length(framing)
        return (UNTIL_CLOSE, 0) if length is None else (LENGTH, length)

    def _switch(self, exchange: Exchange) -> None:
        exchange.state = UPGRADED
        exchange.duration = time.monotonic() - exchange.began
        exchange.request.done = True
        self._through = exchange
        self._up.tunnel()
        self._waiting.clear()

    def _response_body(self, piece: memoryview) -> None:
        exchange = self._waiting[0]
        self._keep(exchange, exchange.response, piece)

    def _response_end(self, wire: int, trailers: bytes) -> None:
        if self._through is not None:  # the 101 itself: the exchange is over, its bytes are counted on
            self._through.response.wire += wire
            self._through.response.done = True
            self._sink.changed(self._through)
            return
        exchange = self._waiting.pop(0)
        exchange.response.wire += wire
        exchange.response.done = True
        if trailers and exchange.keep_limit:
            exchange.response.trailers = trailers
            self._sink.grew(exchange, len(trailers))
        exchange.duration = time.monotonic() - exchange.began
        if exchange.request.done:
            self._complete(exchange)
        else:
            self._sink.changed(exchange)

    # --- both -----------------------------------------------------------------------------------

    def _keep(self, exchange: Exchange, message: Message, piece: memoryview) -> None:
        """Count `piece` as body; keep it while the body kept is under the exchange's limit."""
        message.body_size += len(piece)  # one function, no helper: this runs for every piece of every body
        room = exchange.keep_limit - len(message.body)
        if room > 0:
            kept = piece[:room]
            message.body += kept
            self._sink.grew(exchange, len(kept))

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
                broken = self.latest = Exchange(self.user, replay_of=self.replay_of)
                self._sink.opened(broken)
            broken.state, broken.note = NOT_HTTP, note
            broken.request.wire += self._up.wire  # the bytes that came so far
            broken.response.wire += self._down.wire
            self._up.wire = self._down.wire = 0
            for other in [*self._waiting, self._sending]:
                if other is not None and other is not broken and other.state == PENDING:
                    other.state, other.note = INCOMPLETE, f"not observed to the end: {note}"
                    self._sink.changed(other)
            self._through = broken
            self._sink.changed(broken)
            self._waiting.clear()  # no answer will be paired with them now: let them go
            self._sending = None
        finally:
            for side in (self._up, self._down):
                side.tunnel()  # count, never parse again: this connection speaks something else


class Sealed(Observer):
    """A TLS tunnel's connection: one entry, its server name (SNI) and its bytes; what it says is encrypted.

    The local app holds the key, the tunnel doesn't: the inspector can't see inside, and says so. It
    reads the user's ClientHello, in the clear, as the server did, only for the name.
    """

    __slots__ = ("_entry", "_hello")
    NOTE = "TLS end to end: the app holds the key, the inspector can't see inside"

    def __init__(self, sink: Sink, user: str) -> None:
        super().__init__(sink, user)
        self._hello: sni.Parser | None = sni.Parser()  # until it has answered: then its bytes are let go
        self._entry: Exchange | None = None

    def request_bytes(self, data: bytes | memoryview) -> None:
        with contextlib.suppress(Exception):  # as Observer's: never the relay's trouble
            entry = self._open()
            entry.request.wire += len(data)
            if self._hello is not None and (found := self._hello.feed(data)) is not None:
                self._hello = None
                entry.target = found if isinstance(found, str) else f"(no server name: {found.reason})"
                self._sink.changed(entry)  # pending still: the page shows the name, the log waits for the end

    def response_bytes(self, data: bytes | memoryview) -> None:
        with contextlib.suppress(Exception):
            self._open().response.wire += len(data)

    def close(self, reason: str = "") -> None:
        if self.closed:
            return
        with contextlib.suppress(Exception):
            entry = self._open()
            self.closed = True
            entry.state, entry.note = ENCRYPTED, f"{self.NOTE}; {reason}" if reason else self.NOTE
            entry.duration = time.monotonic() - entry.began
            self._sink.changed(entry)  # over: the store logs it
        self.closed = True

    def _open(self) -> Exchange:
        if self._entry is None:
            self._entry = self.latest = Exchange(self.user, "TLS", sealed=True)
            self._sink.opened(self._entry)
        return self._entry
