# ruff: noqa: E402 (the module-level skip comes before the imports of the gone stage_4)
"""Stage 4 wire format: every message survives a round trip, and no input breaks the parser.

The parser faces the internet (anyone can connect to the control and proxy ports), so it is
fuzzed: whatever the bytes, it returns a message or raises the documented ProtocolError,
never anything else. Also the small pure helpers: error pages and reconnect backoff.
"""

import pytest

# Old stage 4 (a proxy connection per user) is gone from the ladder; its tests are being retargeted
# to the stages where each behaviour now appears (auth 7+, heartbeats and resume 6+, pages 8+, limits
# 9+) or dropped where they test only the proxy transport. Until then this file does not run.
pytest.skip("old stage 4's tests: not yet retargeted to the new ladder", allow_module_level=True)


import asyncio
import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stage_4 import backoff, pages
from stage_4.protocol import (
    MAX_LINE,
    Auth,
    Challenge,
    CreateProxy,
    Error,
    Hello,
    LocalError,
    Message,
    Ping,
    Pong,
    ProtocolError,
    Proxy,
    Welcome,
    decode,
    encode,
    read_message,
)

tokens = st.text("0123456789abcdefABCDEF-_xyz", min_size=1, max_size=64)
reasons = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=200).filter(
    lambda r: r.strip(" ") == r  # the reader strips nothing but "\r\n"; keep the test honest about spaces
)
messages = st.one_of(
    st.builds(Hello, st.none() | tokens),
    st.builds(Challenge, tokens),
    st.builds(Auth, tokens),
    st.builds(Welcome, tokens),
    st.just(Ping()),
    st.just(Pong()),
    st.builds(CreateProxy, tokens),
    st.builds(Proxy, tokens),
    st.builds(LocalError, tokens, reasons),
    st.builds(Error, reasons),
)


@given(messages)
def test_every_message_survives_encode_then_decode(message: Message) -> None:
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode(line[:-1]) == message


@given(st.binary(max_size=300))
def test_decode_returns_a_message_or_raises_protocol_error(line: bytes) -> None:
    try:
        message = decode(line)
    except ProtocolError:
        return
    # Whatever it accepted, it can say back exactly.
    assert encode(message) == line + b"\n"


@given(st.lists(st.sampled_from([b"ping", b"hello", b"proxy ", b"error x", b" ", b"\r", b"\n", b"\x00", b"\xff"])))
def test_decode_of_near_miss_lines_never_raises_anything_else(parts: list[bytes]) -> None:
    with contextlib.suppress(ProtocolError):
        decode(b"".join(parts))


async def read_all(data: bytes) -> list[Message | None]:
    """Feed `data` to a reader as the server's control port makes it, and read messages until EOF or an error."""
    reader = asyncio.StreamReader(limit=MAX_LINE)
    reader.feed_data(data)
    reader.feed_eof()
    got: list[Message | None] = []
    while (message := await read_message(reader)) is not None:
        got.append(message)
    return got


@given(st.binary(max_size=3 * MAX_LINE))
def test_read_message_on_any_stream_returns_messages_or_raises_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        asyncio.run(read_all(data))


@pytest.mark.parametrize("size", [MAX_LINE + 1, 10 * MAX_LINE, 10 * 1024 * 1024])
async def test_over_long_lines_are_refused(size: int) -> None:
    with pytest.raises(ProtocolError, match="line longer than"):
        await read_all(b"p" * size + b"\n")


def test_request_and_status_lines_are_recognised() -> None:
    assert pages.request_line(b"GET /index.html?q=1 HTTP/1.1\r\nHost: x\r\n\r\n") == "GET /index.html?q=1"
    assert pages.request_line(b"\x16\x03\x01 TLS hello") is None
    assert pages.request_line(b"SSH-2.0-OpenSSH_9.2\r\n") is None
    assert pages.status_code(b"HTTP/1.1 404 Not Found\r\n") == "404"
    assert pages.status_code(b"hello") is None


@pytest.mark.parametrize("status", [502, 503, 504])
def test_error_page_is_a_complete_http_response_naming_the_cause(status: int) -> None:
    page = pages.error_page(status, "no <tunnel> client is connected")
    head, _, body = page.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"Connection: close" in head
    assert b"no &lt;tunnel&gt; client is connected" in body  # escaped: a cause can't inject markup


def test_backoff_doubles_up_to_the_cap_with_full_jitter() -> None:
    assert [backoff.bound(n, base=0.5, cap=30) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff.bound(10_000, base=0.5, cap=30) == 30  # no overflow after a night of retries
    samples = [backoff.delay(attempt, base=0.5, cap=30) for attempt in range(200)]
    assert all(0 <= wait <= backoff.bound(attempt, 0.5, 30) for attempt, wait in enumerate(samples))
    assert len(set(samples)) == 200  # jitter: clients cut off together don't come back together
    assert all(backoff.delay(0, base=0.5, cap=30) <= 0.5 for _ in range(100))  # the first retry is quick
