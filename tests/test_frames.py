"""The frame format (stage 4 on) and multiplexer, without a tunnel: encode, parse, fuzz, and fair turns.

The parser is the only code that turns a peer's bytes into frames, so Hypothesis throws bytes at it:
it returns frames or raises ProtocolError, never anything else, and never holds more than one frame.
Each frame runs from the stage that brings it on: DATA with SYN with stage 4's frames, its other
flags with stage 5's streams (FIN) and stage 6's answers (ACK, RST), WINDOW_UPDATE with stage 9's flow control, PING and
GO_AWAY with stage 10's heartbeats. The names imported from
stage_22 are re-bound to the stage under test (support.rebind).
"""

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stage_22 import frames
from stage_22.frames import (
    ACK,
    DATA,
    FIN,
    GO_AWAY,
    INITIAL_WINDOW,
    MAX_FRAME,
    PING,
    RST,
    SYN,
    WINDOW,
    WINDOW_UPDATE,
    Frame,
    Parser,
)
from stage_22.mux import Mux
from stage_22.protocol import ProtocolError
from stage_22.relay import Stream, Timeouts
from support import STEP_TIMEOUT, has, rebind, stages_from

pytestmark = pytest.mark.since("frames")

# Each valid frame, with the idea that brings its type.
VALID_FROM = [
    (Frame(DATA, SYN, 1, b""), "frames"),
    (Frame(DATA, SYN, 2, b"0123456789abcdef0123456789abcdef"), "frames"),  # stage 4's SYN names the user
    (Frame(DATA, ACK, 1, b""), "answers"),
    (Frame(DATA, 0, 7, b"GET / HTTP/1.1\r\n\r\n"), "frames"),
    (Frame(DATA, FIN, 7, b""), "streams"),
    (Frame(DATA, RST, 3, b"connection refused"), "answers"),
    (Frame(DATA, 0, 2**31 - 1, b"x" * MAX_FRAME), "frames"),
    (Frame(WINDOW_UPDATE, 0, 1, (65536).to_bytes(4, "big")), "flow"),
    (Frame(PING, 0, 0, b"12345678"), "resume"),
    (Frame(PING, ACK, 0, b"12345678"), "resume"),
    (Frame(GO_AWAY, 0, 0, b"bye"), "resume"),
]
VALID = [frame for frame, _ in VALID_FROM]


def valid(stage: str) -> list[Frame]:
    """The valid frames of `stage`: those whose type it has."""
    return [frame for frame, idea in VALID_FROM if has(stage, idea)]


def each(cases: list[tuple[object, str]]) -> list[object]:
    """(stage, case) for every stage from the one that brings each case's idea: pytest.param with readable ids."""
    return [
        pytest.param(stage, case, id=f"{stage}-{case if isinstance(case, Frame) else idea}")
        for case, idea in cases
        for stage in stages_from(idea)
    ]


@pytest.fixture(autouse=True)
def names(stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """This module's stage names (Parser, Mux, ...) are the stage under test's, for one test."""
    rebind(globals(), stage, monkeypatch)


def wire(frame: Frame) -> bytes:
    return frames.encode(frame.kind, frame.flags, frame.stream_id, frame.payload)


def test_the_header_is_ten_bytes_type_flags_stream_id_length_big_endian(stage: str) -> None:
    assert frames.encode(DATA, SYN | FIN, 258, b"hi") == bytes([0, 5, 0, 0, 1, 2, 0, 0, 0, 2]) + b"hi"
    if has(stage, "flow"):  # WINDOW frames came with flow control
        assert frames.window_update(1, 65536) == bytes([1, 0, 0, 0, 0, 1, 0, 0, 0, 4, 0, 1, 0, 0])


@pytest.mark.parametrize(("stage", "frame"), each(VALID_FROM))
def test_every_valid_frame_survives_encode_then_parse(stage: str, frame: Frame) -> None:
    assert Parser().feed(wire(frame)) == [frame]


@given(st.data())
def test_frames_arrive_whole_however_the_bytes_are_split(stage: str, data: st.DataObject) -> None:
    sent = data.draw(st.lists(st.sampled_from(valid(stage)), max_size=8))
    stream = b"".join(wire(frame) for frame in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    parser, got = Parser(), []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += parser.feed(stream[start:end])
    assert got == sent
    assert parser.pending == 0


BAD = {  # name: (bytes, the idea from which they are a bad frame)
    "unknown type": (frames.HEADER.pack(9, 0, 1, 0), "frames"),
    "flag not allowed": (frames.HEADER.pack(WINDOW_UPDATE, SYN, 1, 4) + b"\0\0\0\1", "flow"),
    "too large": (frames.HEADER.pack(DATA, 0, 1, MAX_FRAME + 1), "frames"),
    "data on stream 0": (frames.HEADER.pack(DATA, 0, 0, 1) + b"x", "frames"),
    "flag not allowed on DATA": (frames.HEADER.pack(DATA, 0x80, 1, 0), "frames"),
    "ping on a stream": (frames.HEADER.pack(PING, 0, 1, 8) + b"12345678", "resume"),
    "window of 3 bytes": (frames.HEADER.pack(WINDOW_UPDATE, 0, 1, 3) + b"\0\0\1", "flow"),
    "window of 0": (frames.HEADER.pack(WINDOW_UPDATE, 0, 1, 4) + b"\0\0\0\0", "flow"),
    "ping of 4 bytes": (frames.HEADER.pack(PING, 0, 0, 4) + b"1234", "resume"),
    "stream id over 31 bits": (frames.HEADER.pack(DATA, 0, 2**31, 0), "frames"),
    "long reason": (frames.HEADER.pack(DATA, RST, 1, 5000), "answers"),
}


@pytest.mark.parametrize(
    ("stage", "data"),
    [
        pytest.param(stage, data, id=f"{stage}-{name}")
        for name, (data, idea) in BAD.items()
        for stage in stages_from(idea)
    ],
)
def test_a_bad_frame_is_a_protocol_error_as_soon_as_its_header_shows_it(stage: str, data: bytes) -> None:
    # The header alone is enough for all but the zero window: a huge length is refused before its payload.
    with pytest.raises(ProtocolError):
        Parser().feed(data)


@given(st.binary(max_size=2000))
def test_the_parser_returns_frames_or_raises_protocol_error_on_any_bytes(stage: str, data: bytes) -> None:
    parser = Parser()
    try:
        parser.feed(data)
    except ProtocolError:
        return
    assert parser.pending < frames.HEADER_SIZE + MAX_FRAME


@given(st.data(), st.integers(0, 255), st.integers(0, 255), st.binary(max_size=64))
def test_near_miss_frames_never_raise_anything_else(
    stage: str, data_: st.DataObject, kind: int, flags: int, tail: bytes
) -> None:
    """Valid frames, then a header with any type and flags, then any bytes."""
    sent = data_.draw(st.lists(st.sampled_from(valid(stage)), max_size=4))
    data = b"".join(wire(frame) for frame in sent) + frames.HEADER.pack(kind, flags, 1, len(tail)) + tail
    try:
        got = Parser().feed(data)
    except ProtocolError:
        return
    assert got[: len(sent)] == sent


# --- fair turns on the shared connection ------------------------------------------------------------


@pytest.fixture
async def mux_and_peer(stage: str) -> AsyncIterator[tuple[Mux, socket.socket]]:
    """A Mux on one end of a socket pair (with small buffers); the test reads the other end raw."""
    ours, theirs = socket.socketpair()
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    reader, writer = await asyncio.open_connection(sock=ours)
    heartbeats = {"heartbeat_timeout": 60.0} if has(stage, "resume") else {}
    mux = Mux(reader, writer, peer="the test", **heartbeats)
    yield mux, theirs
    writer.close()
    theirs.close()


async def read_frames(
    sock: socket.socket, done: Callable[[list[Frame]], bool], timeout: float = STEP_TIMEOUT
) -> list[Frame]:
    """Read frames from `sock` until `done(frames so far)`, or until `timeout` has passed."""
    loop, parser, got = asyncio.get_running_loop(), Parser(), []
    sock.setblocking(False)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while not done(got):
                got += parser.feed(await loop.sock_recv(sock, 65536))
    return got


def new_stream(stage: str) -> Stream:
    """A stream of the stage's multiplexer; from stage 13 on it takes its idle timeouts (long here)."""
    return Stream(Timeouts(60.0, 60.0)) if has(stage, "limits") else Stream()


def data_on(stream_id: int) -> Callable[[list[Frame]], bool]:
    return lambda got: any(frame.stream_id == stream_id and frame.payload for frame in got)


@pytest.mark.since("flow")  # fair turns
async def test_a_small_stream_gets_its_turn_while_a_bulk_stream_has_megabytes_queued(
    mux_and_peer: tuple[Mux, socket.socket], stage: str
) -> None:
    mux, peer = mux_and_peer
    bulk, small = new_stream(stage), new_stream(stage)
    mux.open(bulk)
    bulk.on_window(64 * WINDOW)  # the peer granted plenty: only the shared connection holds it back
    for _ in range(32):
        bulk.data_received(b"b" * 256 * 1024)  # 8 MiB: far more than the connection's buffers take
    mux.open(small)
    small.data_received(b"GET / HTTP/1.1\r\n\r\n")
    got = await read_frames(peer, data_on(small.stream_id))
    bulk_bytes = sum(len(frame.payload) for frame in got if frame.stream_id == bulk.stream_id)
    # The small stream waited for what was already in the buffers, and at most one more bulk frame.
    assert bulk_bytes < 2 * 1024 * 1024, f"{bulk_bytes} bytes of the bulk stream went first"
    assert got[-1] == Frame(DATA, 0, small.stream_id, b"GET / HTTP/1.1\r\n\r\n")


@pytest.mark.since("flow")
async def test_a_stream_sends_no_more_than_its_window_until_the_peer_grants_more(
    mux_and_peer: tuple[Mux, socket.socket], stage: str
) -> None:
    mux, peer = mux_and_peer
    stream = new_stream(stage)
    mux.open(stream)
    for _ in range(4):
        stream.data_received(b"x" * INITIAL_WINDOW)
    # Read for half a second: a stream that ignored its window would send all four windows by then.
    got = await read_frames(peer, lambda got: False, timeout=0.5)
    assert sum(len(frame.payload) for frame in got) == INITIAL_WINDOW  # a stream's first window
    assert stream.queued == 3 * INITIAL_WINDOW  # waiting in the stream for a grant
    stream.on_window(INITIAL_WINDOW)
    got = await read_frames(peer, lambda got: sum(len(frame.payload) for frame in got) >= INITIAL_WINDOW)
    assert stream.queued == 2 * INITIAL_WINDOW
