"""One connection for everything: users are streams over the client's one connection (stage 5 on).

What the shared tests (test_tunnel.py, test_stage_3.py, test_backpressure.py, ...) show for every stage
is not repeated here; this module is what multiplexing and the ideas built on it add, each test on the
stage that brings its idea and every later one (`since`, support.LADDER): streams (stage 5), answers
and resets (6), flow control and fair turns (9), bad frames, heartbeats and resume (10), auth (11),
pages (12). Raw frames
are spoken by hand (RawClient) where a test plays a broken or silent client.

The names imported from stage_22 (the most complete stage) are re-bound to the stage under test by
the autouse fixture `names` (support.rebind).
"""

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from stage_22 import frames
from stage_22.client import Client
from stage_22.frames import ACK, DATA, GO_AWAY, MAX_FRAME, PING, SYN, WINDOW, Frame, Parser
from stage_22.protocol import Refused
from stage_22.server import Ports, Server
from support import (
    SECRET,
    STEP_TIMEOUT,
    Background,
    EchoServer,
    LocalServer,
    client_handshake,
    client_options,
    control_connection,
    exchange,
    free_port,
    has,
    has_tunnels,
    hello,
    http_request,
    make_client,
    open_connection,
    rebind,
    reset,
    server_handshake,
    server_options,
    until_logged,
    users_port,
)

STAGE = "stage_22"  # the stage under test, set by `names`

pytestmark = pytest.mark.since("streams")
FAST = {"heartbeat_interval": 0.1, "heartbeat_timeout": 1.0}

StartServer = Callable[..., Awaitable[tuple[Server, Ports]]]
StartClient = Callable[..., Awaitable[Client]]


@pytest.fixture(autouse=True)
def log_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


@pytest.fixture(autouse=True)
def names(stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """This module's stage names (Client, Parser, ...) are the stage under test's, for one test."""
    rebind(globals(), stage, monkeypatch)
    monkeypatch.setitem(globals(), "STAGE", stage)


@pytest.fixture
async def start_client(stage: str) -> AsyncIterator[StartClient]:
    async with contextlib.AsyncExitStack() as running:

        async def start(local_port: int, control_port: int, wait: bool = True, **options: Any) -> Client:
            options = {"secret": SECRET, **client_options(stage), **options}
            client = make_client(stage, ("127.0.0.1", local_port), "127.0.0.1", control_port, **options)
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

    public: int | None = None  # from stage 14 on, the port of the TCP tunnel the server gave it

    @classmethod
    async def connect(cls, control_port: int, session_id: str | None = None) -> "RawClient":
        reader, writer = await control_connection(STAGE, control_port)  # over TLS from stage 16 on
        first = hello(STAGE, session_id) if has_tunnels(STAGE) else session_id  # a TCP tunnel from stage 14 on
        welcome = await client_handshake(STAGE, reader, writer, SECRET, first)
        client = cls(reader, writer, getattr(welcome, "session_id", ""))  # no session before stage 10
        client.public = int(welcome.tunnel) if has_tunnels(STAGE) else None
        return client

    def users(self, ports: Ports) -> int:
        """The port this client's users connect to: the public port, or its TCP tunnel's (stage 14 on)."""
        return self.public or ports.public

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
                # Payloads may be views into the parser's buffer, reused on the next feed: copy them out.
                self.got += [Frame(f.kind, f.flags, f.stream_id, bytes(f.payload)) for f in self.parser.feed(data)]

    def close(self) -> None:
        self.writer.close()


def the_mux(server: Server) -> Any:
    """The multiplexer of the server's one client (from stage 14 on, of its one tunnel's session)."""
    sessions = server._sessions
    if hasattr(sessions, "by_id"):
        [session] = sessions.by_id.values()
        return session.mux
    return sessions.mux


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


@pytest.mark.since("resume")  # the connection's GO_AWAY came with resume
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


@pytest.mark.since("resume")  # flow control's overflow, told in a GO_AWAY (stage 10 on)
async def test_a_client_that_sends_more_than_the_window_is_cut_off(start_server: StartServer) -> None:
    _, ports = await start_server()
    client = await RawClient.connect(ports.control)
    user = await open_connection(client.users(ports))  # the server opens stream 1 for this user
    syn = await client.until(lambda frame: (frame.flags & SYN) != 0)  # from stage 19 on it names the user
    assert syn is not None and syn[:3] == (DATA, SYN, 1)
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


@pytest.mark.since("resume")
async def test_a_server_that_sends_a_bad_frame_is_left_and_the_client_reconnects(
    start_client: StartClient, caplog: pytest.LogCaptureFixture
) -> None:
    async def bad_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server_handshake(STAGE, reader, writer, SECRET, "1234")
        writer.write(frames.HEADER.pack(9, 0, 0, 0))
        await reader.read()
        writer.close()

    fake = await asyncio.start_server(bad_server, "127.0.0.1", 0, ssl=server_options(STAGE).get("tls"))
    async with fake:
        await start_client(1, fake.sockets[0].getsockname()[1], wait=False, max_backoff=0.1)
        await until_logged(caplog, r"(unknown frame type 9; reconnecting in(.|\n)*){2}")


# --- flow control, fairness, resets --------------------------------------------------------------------


@pytest.mark.since("flow")
async def test_a_user_who_does_not_read_stalls_only_its_own_stream_and_holds_one_window(
    start_server: StartServer, start_client: StartClient
) -> None:
    async with Downloads() as app:
        server, ports = await start_server()
        client = await start_client(app.port, ports.control)
        public = await users_port(ports, client)
        _, stalled = await open_connection(public)
        stalled.write(b"1000000000\n")  # a gigabyte, and then it reads nothing
        await asyncio.sleep(0.5)  # let the tunnel fill what it may
        sizes = [8 * 1024 * 1024] * 4
        got = await asyncio.gather(*(exchange(public, f"{size}\n".encode()) for size in sizes))
        assert [len(data) for data in got] == sizes  # the others' downloads went through meanwhile
        mux = the_mux(server)
        assert mux is not None
        [stream] = mux.streams.values()  # only the stalled user's stream is still open
        assert stream.transport is not None
        # What the server holds for it: at most one window, in the user's connection's buffer.
        assert stream.transport.get_write_buffer_size() <= WINDOW
        assert stream.queued == 0
        stalled.close()


@pytest.mark.since("flow")  # fair turns
async def test_small_requests_complete_while_another_user_moves_a_bulk_download(
    start_server: StartServer, start_client: StartClient
) -> None:
    async with Downloads() as app:
        _, ports = await start_server()
        client = await start_client(app.port, ports.control)
        public = await users_port(ports, client)
        bulk = asyncio.create_task(exchange(public, b"268435456\n"))  # 256 MiB, read as fast as it comes
        small = []
        while not bulk.done() or len(small) < 20:
            small.append(len(await exchange(public, b"100\n")))
        assert len(await bulk) == 256 * 1024 * 1024
        assert set(small) == {100}


async def test_a_user_who_resets_ends_only_its_own_stream(start_server: StartServer, start_client: StartClient) -> None:
    async with EchoServer() as app:
        _, ports = await start_server()
        client = await start_client(app.port, ports.control)
        public = await users_port(ports, client)
        reader, writer = await open_connection(public)
        writer.write(b"ping\n")
        async with asyncio.timeout(STEP_TIMEOUT):
            assert await reader.readline() == b"ping\n"
        other_reader, other = await open_connection(public)
        reset(writer)
        async with asyncio.timeout(STEP_TIMEOUT):  # the app's side of the reset user ends
            while app.connections != 2 or len(app._tasks) > 1:  # noqa: ASYNC110 (polling the test's app)
                await asyncio.sleep(0.01)
        other.write(b"still here\n")
        async with asyncio.timeout(STEP_TIMEOUT):
            assert await other_reader.readline() == b"still here\n"
        other.close()


async def test_an_app_that_resets_resets_its_users_connection(
    start_server: StartServer, start_client: StartClient, stage: str
) -> None:
    class Resets(LocalServer):
        async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(b"partial")
            await writer.drain()
            reset(writer)

    async with Resets() as app:
        _, ports = await start_server()
        client = await start_client(app.port, ports.control)
        public = await users_port(ports, client)
        reader, writer = await open_connection(public)
        writer.write(b"go\n")
        got, was_reset = b"", False
        async with asyncio.timeout(STEP_TIMEOUT):
            try:
                while data := await reader.read(1024):
                    got += data
            except ConnectionResetError:
                was_reset = True
        assert got == b"partial"
        # Stage 5 ends the stream with a FIN, so the user reads a clean end where the app reset (what
        # stage 5 costs: a cut download looks complete); from stage 6 on an RST carries the reset.
        assert was_reset == has(stage, "answers")
        writer.close()


# --- pages, heartbeats, resume ------------------------------------------------------------------------


@pytest.mark.since("pages")
async def test_a_local_app_that_refuses_gives_a_502_page_naming_it(
    start_server: StartServer, start_client: StartClient, caplog: pytest.LogCaptureFixture
) -> None:
    _, ports = await start_server()
    dead_port = await free_port()
    client = await start_client(dead_port, ports.control)
    public = await users_port(ports, client)
    status, _, body = await http_request(public, b"GET / HTTP/1.0\r\n\r\n")
    assert status == 502
    assert f"could not reach its local app: connection refused at 127.0.0.1:{dead_port}".encode() in body
    assert "cannot reach the local app (connection refused" in caplog.text  # the client says so too


@pytest.mark.since("pages")
async def test_a_stream_the_client_never_accepts_gives_a_504_page(start_server: StartServer) -> None:
    _, ports = await start_server(proxy_timeout=0.5)
    client = await RawClient.connect(ports.control)  # it reads SYNs and answers none
    status, _, body = await http_request(client.users(ports), b"GET / HTTP/1.0\r\n\r\n")
    assert status == 504
    assert b"did not accept the stream within 0.5s" in body
    assert await client.until(lambda frame: frame.flags & frames.RST != 0) is not None  # and told the client
    client.close()


# One client per server: from stage 14 on each client has its tunnel (test_tenants.py, its resume window).
@pytest.mark.since("resume", until="tenants")
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


@pytest.mark.since("resume")
async def test_the_client_pings_and_notices_a_server_that_goes_silent(
    start_client: StartClient, caplog: pytest.LogCaptureFixture
) -> None:
    pings = []

    async def silent_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server_handshake(STAGE, reader, writer, SECRET, "1234")
        parser = Parser()
        while data := await reader.read(65536):  # reads the client's pings, answers none
            pings.extend(frame for frame in parser.feed(data) if frame.kind == PING)
        writer.close()

    fake = await asyncio.start_server(silent_server, "127.0.0.1", 0, ssl=server_options(STAGE).get("tls"))
    async with fake:
        await start_client(1, fake.sockets[0].getsockname()[1], max_backoff=0.1, **FAST)
        await until_logged(caplog, r"no word from the server for 1s; reconnecting")
    assert len(pings) >= 3  # one every 0.1 s


# One client per server: from stage 14 on each client has its tunnel (test_tenants.py, its resume window).
@pytest.mark.since("resume", until="tenants")
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


# One client per server: from stage 14 on each client has its tunnel (test_tenants.py, its resume window).
@pytest.mark.since("resume", until="tenants")
async def test_users_streams_end_with_the_connection_and_the_client_comes_back(
    start_server: StartServer, start_client: StartClient, caplog: pytest.LogCaptureFixture
) -> None:
    async with EchoServer() as app:
        server, ports = await start_server()
        client = await start_client(app.port, ports.control, max_backoff=0.2)
        public = await users_port(ports, client)
        reader, writer = await open_connection(public)
        writer.write(b"hello\n")
        async with asyncio.timeout(STEP_TIMEOUT):
            assert await reader.readline() == b"hello\n"
        mux = the_mux(server)
        assert mux is not None
        mux._transport.abort()  # the tunnel connection breaks
        async with asyncio.timeout(STEP_TIMEOUT):  # the user's stream ran inside it: it ends too
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b""
        writer.close()
        await until_logged(caplog, r"(client connected(.|\n)*){2}")  # a new session: the old one was freed
        async with asyncio.timeout(STEP_TIMEOUT):
            while await exchange(public, b"back\n") != b"back\n":  # noqa: ASYNC110 (reconnecting)
                await asyncio.sleep(0.05)


@pytest.mark.since("auth")
async def test_a_wrong_secret_is_refused_and_the_client_stops(
    start_server: StartServer, stage: str, caplog: pytest.LogCaptureFixture
) -> None:
    _, ports = await start_server()
    options = client_options(stage)
    client = make_client(stage, ("127.0.0.1", 1), "127.0.0.1", ports.control, secret="not-the-secret-at-all", **options)
    with pytest.raises(Refused, match="wrong secret"):
        async with asyncio.timeout(STEP_TIMEOUT):
            await client.run()
    assert "reconnecting" not in caplog.text  # and it stops: retrying would not help
