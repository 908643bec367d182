"""Stage 5: one connection for everything. Users are streams with flow control over the client's one connection.

What the shared tests (test_tunnel.py, test_stage_3.py, the HARDENED ones) show for every stage is not
repeated here; this module is what multiplexing adds: per-stream flow control and resets, bad frames,
and stage 4's auth, heartbeats, resume and pages on the one connection. Raw frames are spoken by hand
(RawClient) where a test plays a broken or silent client.
"""

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from stage_5 import auth, frames
from stage_5.client import Client
from stage_5.frames import ACK, DATA, GO_AWAY, MAX_FRAME, PING, SYN, WINDOW, Frame, Parser
from stage_5.protocol import Refused
from stage_5.server import Ports, Server
from support import (
    STEP_TIMEOUT,
    Background,
    EchoServer,
    LocalServer,
    exchange,
    free_port,
    http_request,
    open_connection,
    reset,
    until_logged,
)

SECRET = "stage-5-tests-secret"
FAST = {"heartbeat_interval": 0.1, "heartbeat_timeout": 1.0}

StartServer = Callable[..., Awaitable[tuple[Server, Ports]]]
StartClient = Callable[..., Awaitable[Client]]


@pytest.fixture(autouse=True)
def log_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    async with contextlib.AsyncExitStack() as running:

        async def start(control_port: int = 0, **options: Any) -> tuple[Server, Ports]:
            server = Server(**{"secret": SECRET, **options})
            ports = await server.listen("127.0.0.1", control_port, 0)
            await running.enter_async_context(Background(server.serve()))
            return server, ports

        yield start


@pytest.fixture
async def start_client() -> AsyncIterator[StartClient]:
    async with contextlib.AsyncExitStack() as running:

        async def start(local_port: int, control_port: int, wait: bool = True, **options: Any) -> Client:
            client = Client(("127.0.0.1", local_port), "127.0.0.1", control_port, **{"secret": SECRET, **options})
            await running.enter_async_context(Background(client.run()))
            if wait:
                async with asyncio.timeout(STEP_TIMEOUT):
                    await client.connected.wait()
            return client

        yield start


class RawClient:
    """The client's side of the tunnel connection, spoken by hand: the handshake, then raw frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session_id: str) -> None:
        self.reader, self.writer, self.session_id = reader, writer, session_id
        self.parser, self.got = Parser(), list[Frame]()

    @classmethod
    async def connect(cls, control_port: int, session_id: str | None = None) -> "RawClient":
        reader, writer = await open_connection(control_port)
        welcome = await auth.client_handshake(reader, writer, SECRET, session_id)
        return cls(reader, writer, welcome.session_id)

    def send(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        self.writer.write(frames.encode(kind, flags, stream_id, payload))

    async def until(self, wanted: Callable[[Frame], bool]) -> Frame | None:
        """Read frames until one is `wanted` (returned), or the connection ends (None)."""
        async with asyncio.timeout(STEP_TIMEOUT):
            while True:
                for frame in self.got:
                    if wanted(frame):
                        self.got.remove(frame)
                        return frame
                data = await self.reader.read(65536)
                if not data:
                    return None
                self.got += self.parser.feed(data)

    def close(self) -> None:
        self.writer.close()


class Downloads(LocalServer):
    """A local app: read a line with a byte count N, send N bytes, close."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            size = int(await reader.readline())
            block = b"d" * 256 * 1024
            while size > 0:
                writer.write(block[:size])
                await writer.drain()
                size -= len(block)
        except OSError:
            pass
        finally:
            writer.close()


# --- bad frames ---------------------------------------------------------------------------------------


BAD_FRAMES = {
    "unknown frame type": (frames.HEADER.pack(7, 0, 1, 0), r"unknown frame type 7"),
    "too large": (frames.HEADER.pack(DATA, 0, 1, MAX_FRAME + 1), r"larger than 65536"),
    "never opened": (frames.encode(DATA, 0, 5, b"hi"), r"stream that was never opened"),
    "a client opening a stream": (frames.encode(DATA, SYN, 1), r"may not open streams"),
    "wrong length": (frames.HEADER.pack(frames.WINDOW_UPDATE, 0, 1, 2) + b"\0\1", r"WINDOW frame of 2 bytes"),
}


@pytest.mark.parametrize(("data", "reason"), BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
async def test_a_bad_frame_from_the_client_ends_its_connection_with_one_log_line(
    start_server: StartServer, caplog: pytest.LogCaptureFixture, data: bytes, reason: str
) -> None:
    _, ports = await start_server()
    client = await RawClient.connect(ports.control)
    client.writer.write(data)
    goodbye = await client.until(lambda frame: frame.kind == GO_AWAY)
    assert goodbye is not None and re.search(reason, goodbye.payload.decode()), goodbye
    assert await client.until(lambda frame: False) is None  # then the server hangs up
    client.close()
    lines = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and re.search(reason, r.getMessage())
    ]
    assert len(lines) == 1, caplog.text
    assert lines[0].startswith("127.0.0.1:") and lines[0].endswith("; closing")


async def test_a_client_that_sends_more_than_the_window_is_cut_off(start_server: StartServer) -> None:
    _, ports = await start_server()
    client = await RawClient.connect(ports.control)
    user = await open_connection(ports.public)  # the server opens stream 1 for this user
    assert await client.until(lambda frame: (frame.flags & SYN) != 0) == Frame(DATA, SYN, 1, b"")
    client.send(DATA, ACK, 1)
    # The user reads nothing: once its socket's kernel buffers are full the server grants no more
    # window, and whatever this client sends beyond the last grant overflows it. It sends on, blindly.
    for _ in range(1024):
        client.send(DATA, 0, 1, b"x" * MAX_FRAME)
    goodbye = await client.until(lambda frame: frame.kind == GO_AWAY)
    assert goodbye is not None and b"overflow" in goodbye.payload
    async with asyncio.timeout(STEP_TIMEOUT):  # and the user's stream ended with the connection
        with contextlib.suppress(ConnectionError):
            while await user[0].read(1 << 20):
                pass
    user[1].close()
    client.close()


async def test_a_server_that_sends_a_bad_frame_is_left_and_the_client_reconnects(
    start_client: StartClient, caplog: pytest.LogCaptureFixture
) -> None:
    async def bad_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await auth.server_handshake(reader, writer, SECRET)
        writer.write(b"welcome 1234\n" + frames.HEADER.pack(9, 0, 0, 0))
        await reader.read()
        writer.close()

    fake = await asyncio.start_server(bad_server, "127.0.0.1", 0)
    async with fake:
        await start_client(1, fake.sockets[0].getsockname()[1], wait=False, max_backoff=0.1)
        await until_logged(caplog, r"(unknown frame type 9; reconnecting in(.|\n)*){2}")


# --- flow control, fairness, resets --------------------------------------------------------------------


async def test_a_user_who_does_not_read_stalls_only_its_own_stream_and_holds_one_window(
    start_server: StartServer, start_client: StartClient
) -> None:
    async with Downloads() as app:
        server, ports = await start_server()
        await start_client(app.port, ports.control)
        _, stalled = await open_connection(ports.public)
        stalled.write(b"1000000000\n")  # a gigabyte, and then it reads nothing
        await asyncio.sleep(0.5)  # let the tunnel fill what it may
        sizes = [8 * 1024 * 1024] * 4
        got = await asyncio.gather(*(exchange(ports.public, f"{size}\n".encode()) for size in sizes))
        assert [len(data) for data in got] == sizes  # the others' downloads went through meanwhile
        mux = server._sessions.mux
        assert mux is not None
        [stream] = mux.streams.values()  # only the stalled user's stream is still open
        assert stream.transport is not None
        # What the server holds for it: at most one window, in the user's connection's buffer.
        assert stream.transport.get_write_buffer_size() <= WINDOW
        assert stream.queued == 0
        stalled.close()


async def test_small_requests_complete_while_another_user_moves_a_bulk_download(
    start_server: StartServer, start_client: StartClient
) -> None:
    async with Downloads() as app:
        _, ports = await start_server()
        await start_client(app.port, ports.control)
        bulk = asyncio.create_task(exchange(ports.public, b"268435456\n"))  # 256 MiB, read as fast as it comes
        small = []
        while not bulk.done() or len(small) < 20:
            small.append(len(await exchange(ports.public, b"100\n")))
        assert len(await bulk) == 256 * 1024 * 1024
        assert set(small) == {100}


async def test_a_user_who_resets_ends_only_its_own_stream(start_server: StartServer, start_client: StartClient) -> None:
    async with EchoServer() as app:
        _, ports = await start_server()
        await start_client(app.port, ports.control)
        reader, writer = await open_connection(ports.public)
        writer.write(b"ping\n")
        async with asyncio.timeout(STEP_TIMEOUT):
            assert await reader.readline() == b"ping\n"
        other_reader, other = await open_connection(ports.public)
        reset(writer)
        async with asyncio.timeout(STEP_TIMEOUT):  # the app's side of the reset user ends
            while app.connections != 2 or len(app._tasks) > 1:  # noqa: ASYNC110 (polling the test's app)
                await asyncio.sleep(0.01)
        other.write(b"still here\n")
        async with asyncio.timeout(STEP_TIMEOUT):
            assert await other_reader.readline() == b"still here\n"
        other.close()


async def test_an_app_that_resets_resets_its_users_connection(
    start_server: StartServer, start_client: StartClient
) -> None:
    class Resets(LocalServer):
        async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(b"partial")
            await writer.drain()
            reset(writer)

    async with Resets() as app:
        _, ports = await start_server()
        await start_client(app.port, ports.control)
        reader, writer = await open_connection(ports.public)
        writer.write(b"go\n")
        got = b""
        async with asyncio.timeout(STEP_TIMEOUT):
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(1024):
                    got += data
        assert got == b"partial"
        writer.close()


# --- pages, heartbeats, resume ------------------------------------------------------------------------


async def test_a_local_app_that_refuses_gives_a_502_page_naming_it(
    start_server: StartServer, start_client: StartClient
) -> None:
    _, ports = await start_server()
    await start_client(await free_port(), ports.control)
    status, _, body = await http_request(ports.public, b"GET / HTTP/1.0\r\n\r\n")
    assert status == 502
    assert b"could not reach its local app: connection refused" in body


async def test_a_stream_the_client_never_accepts_gives_a_504_page(start_server: StartServer) -> None:
    _, ports = await start_server(proxy_timeout=0.5)
    client = await RawClient.connect(ports.control)  # it reads SYNs and answers none
    status, _, body = await http_request(ports.public, b"GET / HTTP/1.0\r\n\r\n")
    assert status == 504
    assert b"did not accept the stream within 0.5s" in body
    assert await client.until(lambda frame: frame.flags & frames.RST != 0) is not None  # and told the client
    client.close()


async def test_a_client_that_stops_sending_heartbeats_is_dropped_and_the_tunnel_freed(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    _, ports = await start_server(heartbeat_timeout=0.5)
    silent = await RawClient.connect(ports.control)
    goodbye = await silent.until(lambda frame: frame.kind == GO_AWAY)
    assert goodbye is not None and b"no heartbeat for 0.5s" in goodbye.payload
    await until_logged(caplog, r"tunnel is free")
    (await RawClient.connect(ports.control)).close()  # a new client is let in
    silent.close()


async def test_the_client_pings_and_notices_a_server_that_goes_silent(
    start_client: StartClient, caplog: pytest.LogCaptureFixture
) -> None:
    pings = []

    async def silent_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await auth.server_handshake(reader, writer, SECRET)
        writer.write(b"welcome 1234\n")
        parser = Parser()
        while data := await reader.read(65536):  # reads the client's pings, answers none
            pings.extend(frame for frame in parser.feed(data) if frame.kind == PING)
        writer.close()

    fake = await asyncio.start_server(silent_server, "127.0.0.1", 0)
    async with fake:
        await start_client(1, fake.sockets[0].getsockname()[1], max_backoff=0.1, **FAST)
        await until_logged(caplog, r"no word from the server for 1s; reconnecting")
    assert len(pings) >= 3  # one every 0.1 s


async def test_a_client_that_comes_back_with_its_session_id_takes_over_and_others_are_refused(
    start_server: StartServer,
) -> None:
    _, ports = await start_server()
    first = await RawClient.connect(ports.control)
    with pytest.raises(Refused, match="another client is already connected"):
        await RawClient.connect(ports.control)
    again = await RawClient.connect(ports.control, first.session_id)  # the old one may look alive: no matter
    assert again.session_id == first.session_id
    assert await first.until(lambda frame: False) is None  # the old connection is dropped
    first.close()
    again.close()


async def test_users_streams_end_with_the_connection_and_the_client_comes_back(
    start_server: StartServer, start_client: StartClient, caplog: pytest.LogCaptureFixture
) -> None:
    async with EchoServer() as app:
        server, ports = await start_server()
        await start_client(app.port, ports.control, max_backoff=0.2)
        reader, writer = await open_connection(ports.public)
        writer.write(b"hello\n")
        async with asyncio.timeout(STEP_TIMEOUT):
            assert await reader.readline() == b"hello\n"
        mux = server._sessions.mux
        assert mux is not None
        mux._transport.abort()  # the tunnel connection breaks
        async with asyncio.timeout(STEP_TIMEOUT):  # the user's stream ran inside it: it ends too
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b""
        writer.close()
        await until_logged(caplog, r"(client connected(.|\n)*){2}")  # a new session: the old one was freed
        async with asyncio.timeout(STEP_TIMEOUT):
            while await exchange(ports.public, b"back\n") != b"back\n":  # noqa: ASYNC110 (reconnecting)
                await asyncio.sleep(0.05)


async def test_a_wrong_secret_is_refused_and_the_client_stops(start_server: StartServer) -> None:
    _, ports = await start_server()
    client = Client(("127.0.0.1", 1), "127.0.0.1", ports.control, secret="not-the-secret-at-all")
    with pytest.raises(Refused, match="wrong secret"):
        async with asyncio.timeout(STEP_TIMEOUT):
            await client.run()
