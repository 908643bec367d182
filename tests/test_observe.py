"""The observer (stage 17 on): the HTTP/1.1 exchanges in a copy of one stream's bytes, however they are cut.

The observer is sans I/O, so these tests feed it bytes by hand: recorded exchanges, split at every
byte boundary and at random ones (Hypothesis), edge cases of HTTP/1.1's framing one by one, and
garbage, which must mark the entry "not HTTP" and never raise into the relay.
"""

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stage_22.observe import BODY_LIMIT, COMPLETE, INCOMPLETE, NOT_HTTP, PENDING, UPGRADED, Exchange, Observer
from support import rebind

STAGE = "stage_22"  # the stage under test, set by `names`
pytestmark = pytest.mark.since("observer")
# Stage 17's observer follows framing only: it keeps no bodies, follows no 1xx, upgrade or response that lasts
# until the close. Tests that look at those (or compare whole entries, bodies included) run from stage 19 on.
LIVE = pytest.mark.since("live")


@pytest.fixture(autouse=True)
def names(stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """This module's stage names (imported from stage_22, the most complete) are the stage under test's."""
    rebind(globals(), stage, monkeypatch)
    monkeypatch.setitem(globals(), "STAGE", stage)


@dataclass
class Recorder:
    """A Sink that keeps every exchange, as the store would, without a bound."""

    exchanges: list[Exchange] = field(default_factory=list)
    grown: int = 0

    def opened(self, exchange: Exchange) -> None:
        exchange.id = len(self.exchanges) + 1
        self.exchanges.append(exchange)

    def grew(self, exchange: Exchange, size: int) -> None:
        self.grown += size

    def changed(self, exchange: Exchange) -> None:
        pass


def observe(up: list[bytes], down: list[bytes], close: bool = True) -> list[Exchange]:
    """Feed the pieces from the user (`up`), then those from the app (`down`); return the exchanges."""
    sink = Recorder()
    observer = Observer(sink, "203.0.113.7:5555")
    for piece in up:
        observer.request_bytes(piece)
    for piece in down:
        observer.response_bytes(piece)
    if close:
        observer.close()
    return sink.exchanges


def seen(exchange: Exchange) -> tuple[object, ...]:
    """What the page shows of an exchange, without its clock."""
    request, response = exchange.request, exchange.response
    return (
        exchange.method,
        exchange.target,
        exchange.status,
        exchange.state,
        tuple(exchange.interim),
        bytes(request.body),
        request.body_size,
        request.wire,
        request.trailers,
        bytes(response.body),
        response.body_size,
        response.wire,
        response.trailers,
    )


# A recorded connection: keep-alive, a chunked upload with extensions and trailers answered after a
# 100 Continue, a HEAD whose response says Content-Length but has no body, a 204, a chunked response
# with trailers, and a 304; the requests pipelined (all sent before the first response came).
REQUESTS = [
    b"GET /search?q=tunnel HTTP/1.1\r\nHost: example.test\r\n\r\n",
    b"POST /upload HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
    b"5;name=value\r\nhello\r\n7\r\n, world\r\n0\r\nX-Checksum: abc\r\n\r\n",
    b"HEAD /big HTTP/1.1\r\nHost: example.test\r\n\r\n",
    b"DELETE /item/1 HTTP/1.1\r\nHost: example.test\r\nContent-Length: 3\r\n\r\nxyz",
    b"GET /stream HTTP/1.1\r\nHost: example.test\r\n\r\n",
    b'GET /cached HTTP/1.1\r\nHost: example.test\r\nIf-None-Match: "v1"\r\n\r\n',
]
RESPONSES = [
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{"hits": [1]}',
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nContent-Length: 99\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4;ext\r\nabcd\r\n0\r\nX-Done: yes\r\n\r\n",
    b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 50\r\n\r\n',
]
UP, DOWN = b"".join(REQUESTS), b"".join(RESPONSES)
EXPECTED = [
    (
        "GET",
        "/search?q=tunnel",
        200,
        COMPLETE,
        (),
        b"",
        0,
        len(REQUESTS[0]),
        b"",
        b'{"hits": [1]}',
        13,
        len(RESPONSES[0]),
        b"",
    ),
    (
        "POST",
        "/upload",
        201,
        COMPLETE,
        (100,),
        b"hello, world",
        12,
        len(REQUESTS[1]),
        b"X-Checksum: abc\r\n",
        b"ok",
        2,
        len(RESPONSES[1]),
        b"",
    ),
    ("HEAD", "/big", 200, COMPLETE, (), b"", 0, len(REQUESTS[2]), b"", b"", 0, len(RESPONSES[2]), b""),
    ("DELETE", "/item/1", 204, COMPLETE, (), b"xyz", 3, len(REQUESTS[3]), b"", b"", 0, len(RESPONSES[3]), b""),
    (
        "GET",
        "/stream",
        200,
        COMPLETE,
        (),
        b"",
        0,
        len(REQUESTS[4]),
        b"",
        b"abcd",
        4,
        len(RESPONSES[4]),
        b"X-Done: yes\r\n",
    ),
    ("GET", "/cached", 304, COMPLETE, (), b"", 0, len(REQUESTS[5]), b"", b"", 0, len(RESPONSES[5]), b""),
]


@LIVE
def test_a_recorded_connection_gives_one_entry_per_exchange() -> None:
    """Keep-alive, pipelining, chunked bodies with extensions and trailers, 100 Continue, HEAD, 204, 304."""
    assert [seen(e) for e in observe([UP], [DOWN])] == EXPECTED


@LIVE
def test_every_byte_boundary_gives_the_same_entries() -> None:
    """One byte at a time: every head, chunk line and body is cut at every possible place."""
    assert [seen(e) for e in observe([bytes([b]) for b in UP], [bytes([b]) for b in DOWN])] == EXPECTED


@LIVE
@pytest.mark.parametrize("direction", ["up", "down"])
def test_a_cut_anywhere_gives_the_same_entries(direction: str) -> None:
    data = UP if direction == "up" else DOWN
    for cut in range(1, len(data)):
        pieces = [data[:cut], data[cut:]]
        got = observe(pieces, [DOWN]) if direction == "up" else observe([UP], pieces)
        assert [seen(e) for e in got] == EXPECTED, f"cut at {cut}"


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@LIVE
@given(st.lists(st.integers(min_value=0), max_size=40), st.lists(st.integers(min_value=0), max_size=40))
def test_random_splits_give_the_same_entries(up_cuts: list[int], down_cuts: list[int]) -> None:
    assert [seen(e) for e in observe(split(UP, up_cuts), split(DOWN, down_cuts))] == EXPECTED


@given(st.lists(st.binary(max_size=200), max_size=10), st.lists(st.binary(max_size=200), max_size=10))
def test_any_bytes_never_raise(up: list[bytes], down: list[bytes]) -> None:
    """Whatever the peers send, observing never raises into the relay, and a failure is an entry's state."""
    for exchange in observe(up, down):
        assert exchange.state in (COMPLETE, INCOMPLETE, NOT_HTTP, UPGRADED, PENDING)


@given(st.lists(st.binary(max_size=64), max_size=10))
def test_http_followed_by_anything_never_raises(tail: list[bytes]) -> None:
    observe([REQUESTS[0], *tail], [RESPONSES[0], *tail])


@LIVE
def test_a_response_without_length_lasts_until_the_close() -> None:
    [exchange] = observe([b"GET / HTTP/1.0\r\n\r\n"], [b"HTTP/1.0 200 OK\r\n\r\nfirst ", b"second"], close=False)
    assert exchange.state == PENDING  # the body may go on: only the close ends it
    [exchange] = observe([b"GET / HTTP/1.0\r\n\r\n"], [b"HTTP/1.0 200 OK\r\n\r\nfirst ", b"second"])
    assert (exchange.state, bytes(exchange.response.body)) == (COMPLETE, b"first second")


@LIVE
def test_a_websocket_upgrade_is_one_entry_then_counted_not_parsed() -> None:
    frames_up, frames_down = b"\x81\x85abcd" + b"GET / HTTP/1.1\r\n\r\n", b"\x81\x02hi" * 3
    upgrade = b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n"
    switched = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    [exchange] = observe([upgrade + frames_up], [switched + frames_down])
    assert (exchange.state, exchange.status, exchange.target) == (UPGRADED, 101, "/chat")
    assert exchange.request.wire == len(upgrade + frames_up)  # every byte counted, none parsed
    assert exchange.response.wire == len(switched + frames_down)


def test_a_refused_upgrade_goes_on_as_http() -> None:
    upgrade = b"GET /chat HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    refused = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\nno"
    got = observe([upgrade + REQUESTS[0]], [refused + RESPONSES[0]])
    assert [(e.target, e.status, e.state) for e in got] == [
        ("/chat", 400, COMPLETE),
        ("/search?q=tunnel", 200, COMPLETE),
    ]


GARBAGE = {
    "TLS on a plain port": [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"],
    "not a request line": [b"HELLO THERE\r\n\r\n"],
    "a line that never ends": [b"GET /" + b"a" * 20000],
    "a space before the colon": [b"GET / HTTP/1.1\r\nContent-Length : 5\r\n\r\nhello"],
    "two different lengths": [b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"],
    "a bad chunk size": [b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
    "a chunk longer than its size": [b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n"],
}


@pytest.mark.parametrize("up", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_is_not_http_and_is_counted(up: list[bytes]) -> None:
    got = observe(up, [])
    assert [e.state for e in got] == [NOT_HTTP], [(e.state, e.note) for e in got]
    assert got[0].note
    assert got[0].request.wire == sum(map(len, up))  # its bytes still counted: they flowed


def test_after_garbage_the_connection_is_only_counted() -> None:
    sink = Recorder()
    observer = Observer(sink, "u")
    observer.request_bytes(REQUESTS[0])
    observer.response_bytes(RESPONSES[0])
    observer.request_bytes(b"\x00\x01 binary")
    observer.request_bytes(REQUESTS[0])  # HTTP again: too late, parsing stopped for this connection
    observer.close()
    assert [e.state for e in sink.exchanges] == [COMPLETE, NOT_HTTP]
    assert sink.exchanges[1].request.wire == len(b"\x00\x01 binary" + REQUESTS[0])


@LIVE
def test_a_garbage_response_marks_its_exchange_not_http() -> None:
    [exchange] = observe([REQUESTS[0]], [b"SSH-2.0-OpenSSH_9.2\r\n"])
    assert (exchange.method, exchange.state) == ("GET", NOT_HTTP)


@LIVE
def test_a_sink_that_fails_does_not_raise_into_the_relay() -> None:
    class Broken(Recorder):
        def changed(self, exchange: Exchange) -> None:
            raise RuntimeError("a bug in the store")

    sink = Broken()
    observer = Observer(sink, "u")
    observer.request_bytes(REQUESTS[0])
    observer.response_bytes(RESPONSES[0])  # raises inside: caught at the boundary
    observer.close()
    assert sink.exchanges[0].state == NOT_HTTP
    assert "a bug in the store" in sink.exchanges[0].note


@LIVE
def test_bodies_are_kept_up_to_the_bound_and_counted_whole() -> None:
    size = 3 * BODY_LIMIT + 5
    request = b"PUT /file HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size
    sink = Recorder()
    observer = Observer(sink, "u")
    observer.request_bytes(request)
    for offset in range(0, size, 1000):
        observer.request_bytes(b"u" * min(1000, size - offset))
    observer.response_bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    [exchange] = sink.exchanges
    assert (exchange.request.body_size, len(exchange.request.body)) == (size, BODY_LIMIT)
    assert exchange.request.wire == len(request) + size
    assert exchange.state == COMPLETE


def test_a_connection_closed_mid_response_leaves_the_entry_incomplete() -> None:
    [exchange] = observe([REQUESTS[0]], [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part"])
    assert (exchange.status, exchange.state) == (200, INCOMPLETE)


def test_an_early_response_completes_when_the_request_ends() -> None:
    """A server may answer (413) before the upload is over; the exchange ends with both."""
    sink = Recorder()
    observer = Observer(sink, "u")
    observer.request_bytes(b"POST /big HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    observer.response_bytes(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
    assert sink.exchanges[0].state == PENDING
    observer.request_bytes(b"defghij")
    assert (sink.exchanges[0].status, sink.exchanges[0].state) == (413, COMPLETE)
