"""Stage 0, the client-side proxy: every accepted connection is relayed to the target, both ways."""

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator

import pytest

import stage_0.client
from stage_0.client import Proxy
from support import (
    PAGE,
    STEP_TIMEOUT,
    Background,
    CliProcess,
    EchoServer,
    HttpOrigin,
    accepted,
    exchange,
    free_port,
    http_request,
    open_connection,
    pattern_bytes,
    reset,
    sha256,
    unanswering_port,
    until_logged,
    usage_error,
)


async def start_proxy(target_port: int) -> AsyncIterator[int]:
    proxy = Proxy("127.0.0.1", target_port)
    _, port = await proxy.listen("127.0.0.1", 0)
    async with Background(proxy.serve()):
        yield port


@pytest.fixture
async def echo_proxy(echo_server: EchoServer) -> AsyncIterator[int]:
    """The port of a stage 0 proxy in front of an echo server."""
    async for port in start_proxy(echo_server.port):
        yield port


async def test_bytes_reach_the_target_and_come_back(echo_proxy: int) -> None:
    assert await exchange(echo_proxy, b"hello through the proxy\n") == b"hello through the proxy\n"


@pytest.mark.slow
async def test_ten_megabytes_each_way_arrive_intact(echo_proxy: int) -> None:
    payload = pattern_bytes(10 * 1024 * 1024, seed=7)
    reader, writer = await open_connection(echo_proxy)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    # Send and receive at the same time: with backpressure, sending 10 MB
    # before reading would stall once every buffer on the way is full.
    async with asyncio.timeout(STEP_TIMEOUT * 3):
        _, echoed = await asyncio.gather(send(), reader.read())
    writer.close()
    assert sha256(echoed) == sha256(payload)


async def test_half_close_keeps_the_other_direction_flowing() -> None:
    """The user shuts its write side; the target sees EOF and still sends its answer after it."""
    got_eof = asyncio.Event()

    async def answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # returns only at EOF: the half-close arrived
        got_eof.set()
        writer.write(b"you sent " + str(len(request)).encode() + b" bytes; " + b"x" * 100_000)
        await writer.drain()
        writer.close()

    target = await asyncio.start_server(answer_after_eof, "127.0.0.1", 0)
    async with target:
        async for port in start_proxy(target.sockets[0].getsockname()[1]):
            reply = await exchange(port, b"12345")
            assert got_eof.is_set()
            assert reply == b"you sent 5 bytes; " + b"x" * 100_000


async def test_backpressure_a_slow_target_holds_the_sender_back_instead_of_filling_memory() -> None:
    """While the target reads nothing, the proxy stops reading too, so the bytes wait at the sender."""
    reading, finished = asyncio.Event(), asyncio.Event()
    received = 0

    async def slow_target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        await reading.wait()
        while chunk := await reader.read(1 << 20):
            received += len(chunk)
        finished.set()
        writer.close()

    size = 64 * 1024 * 1024
    target = await asyncio.start_server(slow_target, "127.0.0.1", 0)
    async with target:
        async for port in start_proxy(target.sockets[0].getsockname()[1]):
            _, writer = await open_connection(port)
            writer.write(pattern_bytes(size))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.drain()
            # Kernel buffers and the proxy's own buffers hold a few MB at most; without
            # backpressure the proxy would swallow all 64 MB into its memory.
            assert writer.transport.get_write_buffer_size() > size // 2
            reading.set()
            async with asyncio.timeout(STEP_TIMEOUT * 3):
                await writer.drain()
                writer.write_eof()
                await finished.wait()
            writer.close()
    assert received == size


async def test_the_close_log_counts_the_bytes_each_way(caplog: pytest.LogCaptureFixture) -> None:
    """One line per connection: bytes up (user to target) and down, each more than one read's worth."""
    caplog.set_level(logging.INFO)
    up, down = 700_001, 1_300_003

    async def answer_with_down_bytes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # everything up to the user's EOF
        writer.write(pattern_bytes(down))
        await writer.drain()
        writer.close()

    target = await asyncio.start_server(answer_with_down_bytes, "127.0.0.1", 0)
    async with target:
        async for port in start_proxy(target.sockets[0].getsockname()[1]):
            assert len(await exchange(port, pattern_bytes(up))) == down
            await until_logged(caplog, rf": closed, {up} bytes up, {down} bytes down, [\d.]+s")


@pytest.mark.parametrize("who_resets", ["target", "user"])
async def test_a_reset_on_one_side_closes_the_other_side(who_resets: str) -> None:
    """A peer that vanishes with a reset must not leave the other one connected to nothing, forever."""
    target_writers: list[asyncio.StreamWriter] = []
    target_got_hello, target_ended = asyncio.Event(), asyncio.Event()

    async def target_side(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target_writers.append(writer)
        with contextlib.suppress(OSError):
            await reader.readline()
            target_got_hello.set()
            await reader.read()  # returns at EOF; raises on a reset
        target_ended.set()
        writer.close()

    target = await asyncio.start_server(target_side, "127.0.0.1", 0)
    async with target:
        async for port in start_proxy(target.sockets[0].getsockname()[1]):
            reader, writer = await open_connection(port)
            writer.write(b"hello\n")
            async with asyncio.timeout(STEP_TIMEOUT):
                await target_got_hello.wait()
                if who_resets == "target":
                    reset(target_writers[0])
                    with contextlib.suppress(ConnectionResetError):
                        assert await reader.read() == b""  # the proxy closed the user's side too
                else:
                    reset(writer)
                    await target_ended.wait()  # the proxy closed the target's side too
            writer.close()


async def test_a_target_that_never_answers_is_given_up_after_the_connect_timeout(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A target behind a firewall that drops packets: the user is closed after CONNECT_TIMEOUT, with the reason."""
    monkeypatch.setattr(stage_0.client, "CONNECT_TIMEOUT", 0.5)  # a test need not wait the real 5 s
    with unanswering_port() as silent_port:
        async for port in start_proxy(silent_port):
            async with asyncio.timeout(STEP_TIMEOUT):  # without a connect timeout: about two minutes
                assert await exchange(port, b"anyone there?") == b""
    assert f"cannot reach target 127.0.0.1:{silent_port} (timed out); closing" in caplog.text


async def test_fifty_concurrent_connections_are_not_mixed_up(echo_proxy: int) -> None:
    payloads = [pattern_bytes(64 * 1024 + i, seed=i) for i in range(50)]
    replies = await asyncio.gather(*(exchange(echo_proxy, p) for p in payloads))
    assert [sha256(r) for r in replies] == [sha256(p) for p in payloads]


async def test_unreachable_target_closes_the_user_and_keeps_serving(
    echo_server: EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    dead_port = await free_port()

    proxy = Proxy("127.0.0.1", dead_port)
    _, port = await proxy.listen("127.0.0.1", 0)
    async with Background(proxy.serve()):
        assert await exchange(port, b"anyone there?") == b""
        assert re.search(rf"cannot reach target 127\.0\.0\.1:{dead_port} \(\S.*\); closing", caplog.text)  # and why
        # Still serving: point the same proxy at a live target and it works.
        proxy.target = ("127.0.0.1", echo_server.port)
        assert await exchange(port, b"still here") == b"still here"


async def test_http_get_reaches_a_real_web_server(http_origin: HttpOrigin) -> None:
    async for port in start_proxy(http_origin.port):
        status, _, body = await http_request(port, b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        assert status == 200
        assert body == PAGE


async def test_cli_relays_to_the_target_given_on_the_command_line(
    cli: CliProcess.Factory, http_origin: HttpOrigin
) -> None:
    """`python -m stage_0.client localhost:PORT --port 0`, as the stage 0 page tells a learner."""
    proxy = await cli("-m", "stage_0.client", f"localhost:{http_origin.port}", "--port", "0")
    port = await proxy.listening("proxy")
    status, _, body = await http_request(port, b"GET / HTTP/1.0\r\n\r\n")
    assert (status, body) == (200, PAGE)
    await proxy.expect(r"closed, \d+ bytes up, \d+ bytes down")
    assert await proxy.interrupt() == 0
    assert "Traceback" not in proxy.output


async def test_cli_port_in_use_is_one_line_and_exit_1(cli: CliProcess.Factory, echo_server: EchoServer) -> None:
    proxy = await cli("-m", "stage_0.client", f"127.0.0.1:{echo_server.port}", "--port", str(echo_server.port))
    assert await proxy.wait() == 1
    assert proxy.lines == [
        f"error: port {echo_server.port} on 127.0.0.1 is already in use; stop the other program or pick another --port"
    ]


@pytest.mark.parametrize("target", ["no-port-here", "host:notaport", ":80"])
async def test_cli_bad_target_is_a_usage_error(cli: CliProcess.Factory, target: str) -> None:
    proxy = await cli("-m", "stage_0.client", target)
    assert await proxy.wait() == 2
    assert "expected host:port" in proxy.output
    assert "Traceback" not in proxy.output


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["localhost:8000", "--port", "99999"], "--port"),
        (["localhost:8000", "--port", "-5"], "--port"),
        (["localhost:0"], "TARGET"),
        (["localhost:65536"], "TARGET"),
    ],
)
async def test_cli_out_of_range_numbers_are_a_one_line_usage_error(
    cli: CliProcess.Factory, args: list[str], option: str
) -> None:
    """Not an OverflowError traceback, and not a port silently wrapped around to another one."""
    error = await usage_error(cli, "-m", "stage_0.client", *args)
    assert f"error: argument {option}: " in error and repr(args[-1]) in error


@pytest.mark.parametrize("args", [["localhost:1", "--port", "65535"], ["localhost:65535", "--port", "0"]])
async def test_cli_the_edges_of_each_range_are_accepted(cli: CliProcess.Factory, args: list[str]) -> None:
    """Range checks must not be off by one: port 1 and port 65535 are real ports (0: any free one)."""
    await accepted(cli, "-m", "stage_0.client", *args)
