"""Stage 4 and later: the hello/welcome handshake, then binary frames on the control connection.

Each test runs on the stage that brings its behaviour and on every later one that keeps it
(`since`, support.LADDER): the handshake's lines (until stage 11's challenge replaces the bare
`hello`), a bad frame ending the connection with one log line (until stage 10 says why in a GO_AWAY
frame first), and stage 4's own announcement of a user, a SYN frame whose payload is the user's
pairing id (until stage 5's streams carry the users' bytes and the proxy port goes). The
control connection is spoken by hand, as raw lines and raw frames.
"""

import asyncio
import contextlib
import importlib
import logging
import re
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

import pytest

from support import (
    STEP_TIMEOUT,
    Background,
    EchoServer,
    exchange,
    make_client,
    open_connection,
    until_logged,
)

StartServer = Callable[..., Awaitable[tuple[Any, Any]]]


@pytest.fixture(autouse=True)
def log_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


def frames_of(stage: str) -> ModuleType:
    return importlib.import_module(f"{stage}.frames")


async def say_hello(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A control connection that said `hello` and got `welcome`: from here on it speaks frames."""
    reader, writer = await open_connection(port)
    writer.write(b"hello\n")
    async with asyncio.timeout(STEP_TIMEOUT):
        welcome = await reader.readline()
    assert re.fullmatch(rb"welcome( \S+)?\n", welcome), welcome  # from stage 10 on it names a session
    return reader, writer


async def next_frames(reader: asyncio.StreamReader, parser: Any, count: int) -> list[Any]:
    """Read raw bytes until `count` whole frames have come."""
    got: list[Any] = []
    async with asyncio.timeout(STEP_TIMEOUT):
        while len(got) < count:
            data = await reader.read(65536)
            assert data, f"the connection ended after {got}"
            got += parser.feed(data)
    return got


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(STEP_TIMEOUT):
        with contextlib.suppress(ConnectionError):
            return await reader.read()
    return b""


# --- the handshake ---------------------------------------------------------------------------------


@pytest.mark.since("frames", until="auth")  # from stage 11 on the server challenges the hello
async def test_a_control_connection_that_does_not_start_with_hello_gets_an_error_line_and_a_close(
    start_server: StartServer, stage: str
) -> None:
    _, ports = await start_server()
    reader, writer = await open_connection(ports.control)
    writer.write(b"ping\n")  # stage 3's client could say this first; from stage 4 on it is not a handshake
    assert await read_to_eof(reader) == b"error unknown command 'ping'\n"
    writer.close()


@pytest.mark.since("frames", until="auth")
async def test_a_second_client_is_refused_with_an_error_line_and_the_first_keeps_the_tunnel(
    start_server: StartServer, stage: str
) -> None:
    _, ports = await start_server()
    first_reader, first = await say_hello(ports.control)
    reader, second = await open_connection(ports.control)
    second.write(b"hello\n")
    assert await read_to_eof(reader) == b"error another client is already connected to this server\n"
    second.close()
    # The first one still holds the tunnel: a user is announced on its connection.
    _, user = await open_connection(ports.public)
    [syn] = await next_frames(first_reader, frames_of(stage).Parser(), 1)
    assert syn.flags & frames_of(stage).SYN and syn.stream_id == 1
    user.close()
    first.close()


# --- frames after the welcome ----------------------------------------------------------------------

BAD_FRAMES = {  # name: (the bytes, given the stage's frames module; what the log line says)
    "unknown frame type": (lambda f: f.HEADER.pack(7, 0, 1, 0), r"unknown frame type 7"),
    "too large": (lambda f: f.HEADER.pack(f.DATA, 0, 1, f.MAX_FRAME + 1), r"larger than 65536"),
    "flag not allowed": (lambda f: f.HEADER.pack(f.DATA, 0x80, 1, 0), r"flags 0x80 are not allowed"),
    "a client opening a stream": (lambda f: f.encode(f.DATA, f.SYN, 1), r"may not open streams"),
}


@pytest.mark.since("frames", until="resume")  # from stage 10 on a GO_AWAY frame says why first (test_streams.py)
@pytest.mark.parametrize(("make", "reason"), BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
async def test_a_bad_frame_from_the_client_ends_its_connection_with_one_log_line_and_frees_the_tunnel(
    start_server: StartServer,
    caplog: pytest.LogCaptureFixture,
    stage: str,
    make: Callable[[ModuleType], bytes],
    reason: str,
) -> None:
    _, ports = await start_server()
    reader, writer = await say_hello(ports.control)
    writer.write(make(frames_of(stage)))
    assert await read_to_eof(reader) == b""  # no line after the welcome: the server just hangs up
    writer.close()
    await until_logged(caplog, r"the tunnel is free")
    lines = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and re.search(reason, r.getMessage())
    ]
    assert len(lines) == 1, caplog.text
    assert lines[0].startswith("127.0.0.1:") and lines[0].endswith("; closing")
    (await say_hello(ports.control))[1].close()  # the next client is let in


@pytest.mark.since("frames", until="resume")  # from stage 10 on the client reconnects instead (test_streams.py)
async def test_a_client_whose_server_sends_a_bad_frame_stops_with_one_clear_error(stage: str) -> None:
    frames = frames_of(stage)

    async def bad_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readline() == b"hello\n"
        # The welcome and a bad frame in one write: the client must find where the lines end.
        writer.write(b"welcome\n" + frames.HEADER.pack(9, 0, 0, 0))
        await reader.read()
        writer.close()

    fake = await asyncio.start_server(bad_server, "127.0.0.1", 0)
    async with fake:
        client = make_client(stage, ("127.0.0.1", 9), "127.0.0.1", fake.sockets[0].getsockname()[1])
        with pytest.raises(importlib.import_module(f"{stage}.protocol").ProtocolError, match="unknown frame type 9"):
            async with asyncio.timeout(STEP_TIMEOUT):
                await client.run()


# --- stage 4: a user announced by a SYN frame that names its pairing id ------------------------------


@pytest.mark.since("frames", until="streams")  # from stage 5 on the user's bytes ride the stream itself
async def test_each_user_is_announced_by_a_syn_frame_on_the_next_stream_carrying_a_fresh_pairing_id(
    start_server: StartServer, stage: str
) -> None:
    frames = frames_of(stage)
    _, ports = await start_server()
    reader, writer = await say_hello(ports.control)
    parser = frames.Parser()
    users = [await open_connection(ports.public) for _ in range(3)]
    syns = await next_frames(reader, parser, 3)
    assert [(f.kind, f.flags, f.stream_id) for f in syns] == [(frames.DATA, frames.SYN, n) for n in (1, 2, 3)]
    ids = [f.payload for f in syns]
    assert all(re.fullmatch(rb"[0-9a-f]{32}", conn_id) for conn_id in ids), ids  # 128 random bits, in hex
    assert len(set(ids)) == 3
    # The id in the SYN is the one the proxy connection must name: the second user gets its own bytes.
    proxy_reader, proxy = await open_connection(ports.proxy)
    proxy.write(b"proxy " + ids[1] + b"\nfor the second user")
    user_reader, user_writer = users[1]
    async with asyncio.timeout(STEP_TIMEOUT):
        assert await user_reader.readexactly(19) == b"for the second user"
    user_writer.write(b"from the second user")
    async with asyncio.timeout(STEP_TIMEOUT):
        assert await proxy_reader.readexactly(20) == b"from the second user"
    for _, user in users:
        user.close()
    proxy.close()
    writer.close()


@pytest.mark.since("frames", until="streams")
async def test_the_client_dials_a_proxy_connection_naming_the_id_of_a_syn_that_came_with_the_welcome(
    stage: str,
) -> None:
    """The welcome line and the first frame arrive in one read: the frame is not lost in the line reader."""
    frames = frames_of(stage)
    conn_id = "0123456789abcdef0123456789abcdef"
    named: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def fake_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readline() == b"hello\n"
        writer.write(b"welcome\n" + frames.encode(frames.DATA, frames.SYN, 1, conn_id.encode()))
        await reader.read()
        writer.close()

    async def fake_proxy_port(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        named.set_result(await reader.readline())
        writer.close()

    async with EchoServer() as app:
        control = await asyncio.start_server(fake_server, "127.0.0.1", 0)
        proxy = await asyncio.start_server(fake_proxy_port, "127.0.0.1", 0)
        async with control, proxy:
            ports = [server.sockets[0].getsockname()[1] for server in (control, proxy)]
            client = make_client(stage, ("127.0.0.1", app.port), "127.0.0.1", *ports)
            async with Background(client.run()):
                async with asyncio.timeout(STEP_TIMEOUT):
                    assert await named == f"proxy {conn_id}\n".encode()


@pytest.mark.since("frames", until="streams")
@pytest.mark.parametrize("payload", [b"", b"abc\nproxy 1234", b"\x1b[31m"], ids=["empty", "newline", "escape"])
async def test_a_syn_without_a_pairing_id_stops_the_client_before_it_writes_a_proxy_line(
    stage: str, payload: bytes
) -> None:
    """The id goes into the `proxy <id>` line: a newline in it would let the server forge a line."""
    frames = frames_of(stage)

    async def fake_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readline() == b"hello\n"
        writer.write(b"welcome\n" + frames.encode(frames.DATA, frames.SYN, 1, payload))
        await reader.read()
        writer.close()

    dialled = asyncio.Event()

    async def fake_proxy_port(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dialled.set()
        writer.close()

    protocol = importlib.import_module(f"{stage}.protocol")
    control = await asyncio.start_server(fake_server, "127.0.0.1", 0)
    proxy = await asyncio.start_server(fake_proxy_port, "127.0.0.1", 0)
    async with control, proxy:
        ports = [server.sockets[0].getsockname()[1] for server in (control, proxy)]
        client = make_client(stage, ("127.0.0.1", 9), "127.0.0.1", *ports)
        with pytest.raises(protocol.ProtocolError, match="without a pairing id"):
            async with asyncio.timeout(STEP_TIMEOUT):
                await client.run()
    assert not dialled.is_set()


@pytest.mark.since("frames", until="streams")
async def test_users_are_served_through_the_tunnel_after_the_handshake(start_server: StartServer, stage: str) -> None:
    """The whole path with the stage's own client: the handshake, a SYN per user, proxy connections."""
    _, ports = await start_server()
    async with EchoServer() as app:
        client = make_client(stage, ("127.0.0.1", app.port), "127.0.0.1", ports.control, ports.proxy)
        async with Background(client.run()):
            async with asyncio.timeout(STEP_TIMEOUT):
                await client.connected.wait()
            got = await asyncio.gather(*(exchange(ports.public, b"user %d" % n) for n in range(20)))
            assert got == [b"user %d" % n for n in range(20)]
