"""The handshake's text lines (hello, challenge, welcome...), fuzzed; and the small pure helpers:
reconnect backoff (stage 10 on) and the error pages (stage 12 on).

The control port faces the internet (anyone can connect), so the line parser is fuzzed on every
stage from 4 on: whatever the bytes, it returns a message or raises the documented ProtocolError,
never anything else. These were old stage 8's tests (test_stage_8_protocol.py); its proxy-connection
messages (create_proxy, local_error) went with the proxy port, which stage 4 still has (`proxy <id>`).
"""

import asyncio
import contextlib
import dataclasses
import importlib
import typing
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.since("frames")

tokens = st.text("0123456789abcdefABCDEF-_xyz", min_size=1, max_size=64)
reasons = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=200).filter(
    lambda r: r.strip(" ") == r  # the reader strips nothing but "\r\n"; keep the test honest about spaces
)


def protocol_of(stage: str) -> ModuleType:
    return importlib.import_module(f"{stage}.protocol")


def messages(protocol: ModuleType) -> st.SearchStrategy[Any]:
    """Every message the stage's protocol has, with fields it can put on a line."""
    choices = []
    for kind in typing.get_args(protocol.Message):
        names = [field.name for field in dataclasses.fields(kind)]
        if kind.__name__ == "Hello" and "kind" in names:
            # From stage 14 on: a kind, then the tunnel asked for (a port here, valid for both kinds up to
            # stage 14, for tcp after), then a session id that only follows a tunnel.
            ports = st.integers(1, 65535).map(str)
            choices.append(st.builds(kind, st.sampled_from(protocol.KINDS), st.none(), st.none()))
            choices.append(st.builds(kind, st.just("tcp"), ports, st.none() | tokens))
            continue
        fields = {}
        for field in dataclasses.fields(kind):
            optional = type(None) in typing.get_args(field.type) or "None" in str(field.type)
            plain = reasons if field.name == "reason" else tokens
            fields[field.name] = st.none() | plain if optional else plain
        choices.append(st.builds(kind, **fields))
    return st.one_of(choices)


@given(data=st.data())
def test_every_message_survives_encode_then_decode(stage: str, data: st.DataObject) -> None:
    protocol = protocol_of(stage)
    message = data.draw(messages(protocol))
    line = protocol.encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert protocol.decode(line[:-1]) == message


@given(line=st.binary(max_size=300))
def test_decode_returns_a_message_or_raises_protocol_error(stage: str, line: bytes) -> None:
    protocol = protocol_of(stage)
    try:
        message = protocol.decode(line)
    except protocol.ProtocolError:
        return
    # Whatever it accepted, it can say back exactly.
    assert protocol.encode(message) == line + b"\n"


NEAR_MISSES = [
    b"hello",
    b"welcome ",
    b"challenge ",
    b"auth ",
    b"tcp",
    b"busy x",
    b"error x",
    b" ",
    b"\r",
    b"\x00",
    b"\xff",
]


@given(parts=st.lists(st.sampled_from(NEAR_MISSES)))
def test_decode_of_near_miss_lines_never_raises_anything_else(stage: str, parts: list[bytes]) -> None:
    protocol = protocol_of(stage)
    with contextlib.suppress(protocol.ProtocolError):
        protocol.decode(b"".join(parts))


async def read_all(protocol: ModuleType, data: bytes) -> list[Any]:
    """Feed `data` to a reader as the server's control port makes it, and read messages until EOF or an error."""
    reader = asyncio.StreamReader(limit=protocol.MAX_LINE)
    reader.feed_data(data)
    reader.feed_eof()
    got: list[Any] = []
    while (message := await protocol.read_message(reader)) is not None:
        got.append(message)
    return got


@given(data=st.binary(max_size=3 * 1024))
def test_read_message_on_any_stream_returns_messages_or_raises_protocol_error(stage: str, data: bytes) -> None:
    protocol = protocol_of(stage)
    with contextlib.suppress(protocol.ProtocolError):
        asyncio.run(read_all(protocol, data))


@pytest.mark.parametrize("times", [1, 10, 10 * 1024])
async def test_over_long_lines_are_refused(stage: str, times: int) -> None:
    protocol = protocol_of(stage)
    with pytest.raises(protocol.ProtocolError, match="line longer than"):
        await read_all(protocol, b"p" * (protocol.MAX_LINE * times + 1) + b"\n")


@pytest.mark.since("pages")
def test_request_and_status_lines_are_recognised(stage: str) -> None:
    pages = importlib.import_module(f"{stage}.pages")
    assert pages.request_line(b"GET /index.html?q=1 HTTP/1.1\r\nHost: x\r\n\r\n") == "GET /index.html?q=1"
    assert pages.request_line(b"\x16\x03\x01 TLS hello") is None
    assert pages.request_line(b"SSH-2.0-OpenSSH_9.2\r\n") is None
    assert pages.status_code(b"HTTP/1.1 404 Not Found\r\n") == "404"
    assert pages.status_code(b"hello") is None


@pytest.mark.since("pages")
@pytest.mark.parametrize("status", [502, 503, 504])
def test_error_page_is_a_complete_http_response_naming_the_cause(stage: str, status: int) -> None:
    pages = importlib.import_module(f"{stage}.pages")
    page = pages.error_page(status, "no <tunnel> client is connected")
    head, _, body = page.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"Connection: close" in head
    assert b"no &lt;tunnel&gt; client is connected" in body  # escaped: a cause can't inject markup


@pytest.mark.since("resume")
def test_backoff_doubles_up_to_the_cap_with_full_jitter(stage: str) -> None:
    backoff = importlib.import_module(f"{stage}.backoff")
    assert [backoff.bound(n, base=0.5, cap=30) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff.bound(10_000, base=0.5, cap=30) == 30  # no overflow after a night of retries
    samples = [backoff.delay(attempt, base=0.5, cap=30) for attempt in range(200)]
    assert all(0 <= wait <= backoff.bound(attempt, 0.5, 30) for attempt, wait in enumerate(samples))
    assert len(set(samples)) == 200  # jitter: clients cut off together don't come back together
    assert all(backoff.delay(0, base=0.5, cap=30) <= 0.5 for _ in range(100))  # the first retry is quick
