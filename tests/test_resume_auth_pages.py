"""Heartbeats and backoff (stage 10 on), auth (7 on), the request log and pages (8 on), the waiting room and
the throttle (9 on): what a real server and client do, end to end, each test on the stage that brings
its idea and every later one (`since`, support.LADDER).

These tests were old stage 8's (a proxy connection per user, now gone); each now runs where its
behaviour appears in the new ladder. Tests of the proxy transport alone (proxy ids, the pairing,
the `ok` line) went with it. Streams, bad frames, heartbeat drops, resume by session id and a wrong
secret are in test_streams.py. The names imported from stage_22 are re-bound to the stage under test
(support.rebind).
"""

import asyncio
import contextlib
import importlib
import itertools
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from stage_22 import auth, pages
from stage_22.client import Client
from stage_22.protocol import Refused, TryLater
from stage_22.server import Ports, Server
from support import (
    PAGE,
    SECRET,
    STEP_TIMEOUT,
    Background,
    EchoServer,
    HttpOrigin,
    LocalServer,
    client_handshake,
    client_options,
    control_connection,
    exchange,
    first_and_last,
    free_port,
    has_tunnels,
    hello,
    http_request,
    make_client,
    make_server,
    open_connection,
    rebind,
    stages_from,
    until_logged,
    users_port,
)

STAGE = "stage_22"  # the stage under test, set by `names`
FAST = {"heartbeat_interval": 0.1, "heartbeat_timeout": 1.0}

StartServer = Callable[..., Awaitable[tuple[Server, Ports]]]
StartClient = Callable[..., Awaitable[Client]]


@pytest.fixture(autouse=True)
def log_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


@pytest.fixture(autouse=True)
def names(stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """This module's stage names (Client, Server, auth, ...) are the stage under test's, for one test."""
    rebind(globals(), stage, monkeypatch)
    monkeypatch.setitem(globals(), "STAGE", stage)


def new_client(local_port: int, control_port: int, **options: Any) -> Client:
    """A client of the stage under test (secret, TCP tunnel and CA as the stage needs them), not started."""
    options = {"secret": SECRET, **client_options(STAGE), **options}
    client: Client = make_client(STAGE, ("127.0.0.1", local_port), "127.0.0.1", control_port, **options)
    return client


@pytest.fixture
async def start_client() -> AsyncIterator[StartClient]:
    async with contextlib.AsyncExitStack() as running:

        async def start(local_port: int, control_port: int, **options: Any) -> Client:
            client = new_client(local_port, control_port, **options)
            await running.enter_async_context(Background(client.run()))
            async with asyncio.timeout(STEP_TIMEOUT):
                await client.connected.wait()
            return client

        yield start


async def until(awaitable: Awaitable[Any]) -> Any:
    """Every wait on a peer is bounded: a bug fails the test instead of hanging it."""
    async with asyncio.timeout(STEP_TIMEOUT):
        return await awaitable


async def handshake(port: int, secret: str | None = SECRET, session_id: str | None = None) -> tuple[Any, str]:
    """Play the client by hand: connect, pass the handshake, return the connection and the session id."""
    reader, writer = await control_connection(STAGE, port)
    first = hello(STAGE, session_id) if has_tunnels(STAGE) else session_id
    welcome = await client_handshake(STAGE, reader, writer, secret or "", first)
    return (reader, writer), welcome.session_id


async def get(port: int, path: str = "/") -> tuple[int, bytes]:
    status, _, body = await http_request(port, f"GET {path} HTTP/1.0\r\n\r\n".encode())
    return status, body


# --- the request log and the pages (stage 12 on) ---------------------------------------------


@pytest.mark.since("pages")
async def test_the_server_logs_one_line_per_request_with_method_path_and_bytes(
    start_server: StartServer, start_client: StartClient, http_origin: HttpOrigin, caplog: pytest.LogCaptureFixture
) -> None:
    _, ports = await start_server()
    public = await users_port(ports, await start_client(http_origin.port, ports.control))
    assert (await get(public, "/some/page?x=1"))[0] == 200
    await until_logged(
        caplog, r"127\.0\.0\.1:\d+: stream \d+ GET /some/page\?x=1 -> 200, \d+ bytes up, \d+ bytes down, [\d.]+s"
    )
    # A user who does not speak HTTP is logged too, without a request line.
    await exchange(public, b"not http at all\n")
    await until_logged(caplog, r"stream \d+ \S+.*, 16 bytes up, \d+ bytes down")


@pytest.mark.since("pages")
async def test_the_request_log_escapes_bytes_that_would_drive_a_terminal(
    start_server: StartServer, start_client: StartClient, echo_server: EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    _, ports = await start_server()
    public = await users_port(ports, await start_client(echo_server.port, ports.control))
    await exchange(public, b"GET /\x1b[2J\x07\x00x HTTP/1.0\r\n\r\n")
    line = (await until_logged(caplog, r"GET /\S+ -> no response"))[0]
    assert line == r"GET /\x1b[2J\x07\x00x -> no response"
    assert not any(char in caplog.text for char in "\x1b\x07\x00")
    assert pages.printable(b"ok /path?q=1") == "ok /path?q=1"


@pytest.mark.since("pages", until="tenants")  # from stage 14 on users reach a client's own tunnel port
async def test_no_client_connected_gives_a_502_page(start_server: StartServer) -> None:
    _, ports = await start_server()
    status, body = await get(ports.public)
    assert status == 502
    assert b"no tunnel client is connected to this server" in body


@pytest.mark.since("pages", until="tenants")
async def test_a_user_who_does_not_speak_http_gets_a_clean_close_not_a_page(start_server: StartServer) -> None:
    _, ports = await start_server()
    reader, writer = await open_connection(ports.public)
    writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
    assert await until(reader.read()) == b""  # EOF, not a reset (a reset would raise here) and no page
    writer.close()


# --- the waiting room and the throttle (stage 13 on) -------------------------------------------


class SilentClient:
    """A client played by hand that passes the handshake, then never answers a frame: users pile up."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, public: int) -> None:
        self.reader, self.writer, self.public = reader, writer, public
        self.frames = importlib.import_module(f"{STAGE}.frames")
        self.parser, self.opened = self.frames.Parser(), 0

    @classmethod
    async def connect(cls, ports: Ports) -> "SilentClient":
        reader, writer = await control_connection(STAGE, ports.control)
        first = hello(STAGE) if has_tunnels(STAGE) else None
        welcome = await client_handshake(STAGE, reader, writer, SECRET, first)
        return cls(reader, writer, int(welcome.tunnel) if has_tunnels(STAGE) else ports.public)

    async def until_streams(self, count: int) -> None:
        """Wait until the server has opened `count` streams to it in all (SYN frames; nothing is answered)."""
        async with asyncio.timeout(STEP_TIMEOUT):
            while self.opened < count:
                data = await self.reader.read(65536)
                assert data, "the server closed the connection"
                self.opened += sum(1 for f in self.parser.feed(data) if f.flags & self.frames.SYN)


@pytest.mark.since("limits")
async def test_too_many_waiting_users_get_a_503_page(start_server: StartServer) -> None:
    _, ports = await start_server(max_waiting=2)
    client = await SilentClient.connect(ports)
    waiting = [await open_connection(client.public) for _ in range(2)]
    await client.until_streams(2)
    status, body = await get(client.public)
    assert status == 503
    assert b"too many users are waiting" in body
    for _, writer in waiting:
        writer.close()
    client.writer.close()


@pytest.mark.since("limits")
async def test_users_who_already_hung_up_do_not_keep_others_out_of_a_full_waiting_room(
    start_server: StartServer,
) -> None:
    """A user who hangs up (EOF) without a byte leaves the waiting room at once, not when the client answers."""
    _, ports = await start_server(max_waiting=2, proxy_timeout=0.5)
    client = await SilentClient.connect(ports)
    for count in (1, 2):
        _, writer = await open_connection(client.public)
        await client.until_streams(count)
        writer.close()  # then hang up at once, as a flood does
    await asyncio.sleep(0.1)  # not an assertion: lets the server see both go
    status, _ = await get(client.public)
    assert status == 504  # let in to wait (and then timed out), not turned away with a 503
    client.writer.close()


@pytest.mark.since("limits")
async def test_guessing_the_secret_is_throttled_per_address(start_server: StartServer) -> None:
    """After a few wrong answers, even the right one is turned away for a while: guessing online is hopeless.

    Turned away with `busy` (TryLater), not refused: the client may share the address with the guesser, and
    must try again (tests/test_isolation_tenants.py)."""
    _, ports = await start_server()
    for _ in range(auth.MAX_FAILURES):
        with pytest.raises(Refused, match="wrong secret"):
            await handshake(ports.control, secret="a-wrong-guess-of-the-secret")
    with pytest.raises(TryLater, match=r"too many wrong secrets from 127\.0\.0\.1; try again in"):
        await handshake(ports.control)


@pytest.mark.since("limits")
def test_the_throttle_forgets_the_oldest_addresses_first_and_stays_bounded(stage: str) -> None:
    throttle = auth.Throttle(max_failures=1, window=60.0, size=3)
    for n in range(10):
        throttle.failed(f"198.51.100.{n}")
    throttle.check("198.51.100.0")  # forgotten: the table holds only the last three
    with pytest.raises(TryLater):
        throttle.check("198.51.100.9")


@pytest.mark.slow
@pytest.mark.parametrize("stage", first_and_last(stages_from("limits")))
async def test_a_thousand_users_arriving_at_once_are_all_served(
    start_server: StartServer, start_client: StartClient, echo_server: EchoServer
) -> None:
    """Waiting users cost a socket, not a buffer: the waiting room is bounded by memory and descriptors,
    so a burst of a thousand is let in (a room of 256 turned 44 of 300 away with a 503)."""
    # From stage 13 on one address has a share of the tunnel (256 streams): here all come from 127.0.0.1, as a
    # crowd behind one NAT would, and such a crowd is what --max-streams-per-address is for.
    _, ports = await start_server(max_streams_per_address=1000)
    public = await users_port(ports, await start_client(echo_server.port, ports.control))
    payloads = [f"user {n}\n".encode() for n in range(1000)]
    async with asyncio.timeout(STEP_TIMEOUT * 5):
        replies = await asyncio.gather(*(exchange(public, payload) for payload in payloads))
    assert replies == payloads


# --- auth (stage 11 on) ------------------------------------------------------------------------


@pytest.mark.since("auth")
async def test_a_client_without_the_secret_is_told_it_needs_one(start_server: StartServer) -> None:
    _, ports = await start_server()
    with pytest.raises(Refused, match="the server requires a secret; pass --secret or set NGROK_SECRET"):
        await until(new_client(9, ports.control, secret=None).run())


@pytest.mark.since("auth")
async def test_a_captured_answer_replayed_on_a_new_connection_is_refused(start_server: StartServer) -> None:
    protocol = importlib.import_module(f"{STAGE}.protocol")
    _, ports = await start_server()
    first = hello(STAGE) if has_tunnels(STAGE) else protocol.Hello()
    # An eavesdropper records a real client's handshake...
    reader, writer = await control_connection(STAGE, ports.control)
    await protocol.write_message(writer, first)
    nonce = (await until(protocol.read_message(reader))).nonce
    captured = auth.answer(SECRET, nonce)
    await protocol.write_message(writer, protocol.Auth(captured))
    assert isinstance(await until(protocol.read_message(reader)), protocol.Welcome)
    writer.close()
    # ...and replays the answer on a connection of its own: the server asks a new question.
    reader, writer = await control_connection(STAGE, ports.control)
    await protocol.write_message(writer, first)
    assert (await until(protocol.read_message(reader))).nonce != nonce
    await protocol.write_message(writer, protocol.Auth(captured))
    reply = await until(protocol.read_message(reader))
    assert reply == protocol.Error("wrong secret; check --secret or NGROK_SECRET on both sides")
    writer.close()


@pytest.mark.since("auth")
async def test_no_secret_on_either_side_still_works_on_loopback(
    start_server: StartServer, start_client: StartClient, http_origin: HttpOrigin
) -> None:
    _, ports = await start_server(secret=None)
    client = await start_client(http_origin.port, ports.control, secret=None)
    assert await get(await users_port(ports, client)) == (200, PAGE)


@pytest.mark.since("auth")
def test_a_server_open_to_the_world_without_a_secret_is_warned_about(stage: str) -> None:
    assert auth.exposure_warning("0.0.0.0", None) is not None
    assert "without a secret" in (auth.exposure_warning("203.0.113.7", None) or "")
    assert auth.exposure_warning("0.0.0.0", "s3cret") is None
    for loopback in ("127.0.0.1", "::1", "localhost"):
        assert auth.exposure_warning(loopback, None) is None


@pytest.mark.since("auth")
async def test_a_server_open_to_the_world_without_a_secret_warns_when_it_starts(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    await start_server(host="0.0.0.0", secret=None)  # all interfaces: nothing connects, we only read the log
    assert "WARNING: listening on '0.0.0.0' without a secret" in caplog.text


@pytest.mark.since("auth")
async def test_a_short_secret_gets_a_warning_with_a_way_to_make_a_strong_one(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    await start_server(secret="hunter2")
    assert "the secret is only 7 characters long" in caplog.text
    assert "secrets.token_urlsafe" in caplog.text
    assert auth.strength_warning(SECRET) is None


# --- one client, heartbeats and backoff (stage 10 on) ------------------------------------------


@pytest.mark.since("resume", until="tenants")  # from stage 14 on a second client gets a tunnel of its own
async def test_a_second_client_is_refused_while_the_first_keeps_serving(
    start_server: StartServer, start_client: StartClient, http_origin: HttpOrigin
) -> None:
    _, ports = await start_server()
    await start_client(http_origin.port, ports.control)
    with pytest.raises(Refused, match="another client is already connected"):
        await until(new_client(9, ports.control).run())
    assert await get(ports.public) == (200, PAGE)


@pytest.mark.since("resume")
async def test_the_client_retries_with_backoff_until_the_server_comes(
    start_server: StartServer, caplog: pytest.LogCaptureFixture, http_origin: HttpOrigin
) -> None:
    control_port = await free_port()
    client = new_client(http_origin.port, control_port, max_backoff=0.2)
    async with Background(client.run()):
        await until_logged(
            caplog,
            r"cannot reach the server at 127\.0\.0\.1:\d+ \(connection refused\); "
            r"reconnecting in [\d.]+s \(attempt 3\)",
        )
        _, ports = await start_server(control_port)
        await until(client.connected.wait())
        assert await get(await users_port(ports, client)) == (200, PAGE)


@pytest.mark.since("resume")
async def test_reconnect_attempts_wait_longer_and_longer() -> None:
    """A client whose server is down must not hammer it: a tight reconnect loop makes thousands of tries."""
    attempts = 0

    async def count_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        writer.close()  # a server that hangs up at once: every attempt fails fast

    flaky = await asyncio.start_server(count_and_close, "127.0.0.1", 0)
    async with flaky, Background(new_client(9, flaky.sockets[0].getsockname()[1], max_backoff=30).run()):
        await asyncio.sleep(2.0)
    # Full jitter waits up to 0.5, 1, 2 s...: a handful of tries in 2 s (a tight loop makes thousands).
    assert 1 <= attempts <= 12, attempts


@pytest.mark.since("resume")
async def test_the_backoff_starts_again_from_the_first_step_after_a_good_connection(
    start_server: StartServer, caplog: pytest.LogCaptureFixture, echo_server: EchoServer
) -> None:
    control_port = await free_port()
    client = new_client(echo_server.port, control_port, max_backoff=0.2)
    async with Background(client.run()):
        await until_logged(caplog, r"reconnecting in [\d.]+s \(attempt 3\)")
        async with contextlib.AsyncExitStack() as running:
            server = make_server(STAGE, secret=SECRET)
            await server.listen("127.0.0.1", control_port, 0)
            await running.enter_async_context(Background(server.serve()))
            await until(client.connected.wait())
            caplog.clear()
        # The server is gone again: the next failure is attempt 1, not attempt 4 or later.
        first = await until_logged(caplog, r"reconnecting in [\d.]+s \(attempt (\d+)\)")
        assert first[1] == "1", caplog.text


class Forwarder(LocalServer):
    """A TCP forwarder to a local port whose current connections can be cut silently, like a dead Wi-Fi."""

    def __init__(self, target_port: int) -> None:
        super().__init__()
        self.target_port = target_port
        self._cut: list[asyncio.Event] = []

    def cut_silently(self) -> None:
        """From now on, drop every byte on the connections open so far (new ones work)."""
        for cut in self._cut:
            cut.set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cut = asyncio.Event()
        self._cut.append(cut)
        target_reader, target_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if not cut.is_set():
                    dst.write(data)
            if not cut.is_set():  # a dead path delivers no FIN either: the far end stays half-open
                dst.close()

        try:
            await asyncio.gather(pump(reader, target_writer), pump(target_reader, writer))
        except OSError:
            pass
        finally:
            writer.close()
            target_writer.close()


@pytest.mark.since("resume")
async def test_a_client_cut_off_silently_notices_and_is_let_back_in_at_once_with_its_session(
    start_server: StartServer, caplog: pytest.LogCaptureFixture, echo_server: EchoServer
) -> None:
    """The network under the tunnel connection dies silently; the client notices, comes back with its session
    id and is let in at once (the server's own heartbeat timeout is far away), and users are served again.

    (With a proxy connection per user, old stage 8's users even kept their conversation; a stream lives
    inside the tunnel connection and ends with it: test_streams.py.)"""
    _, ports = await start_server(heartbeat_timeout=STEP_TIMEOUT * 6)
    async with Forwarder(ports.control) as path:  # the client's tunnel connection goes through this
        client = new_client(echo_server.port, path.port, **FAST)
        async with Background(client.run()):
            await until(client.connected.wait())
            public = await users_port(ports, client)
            assert await exchange(public, b"before\n") == b"before\n"
            client.connected.clear()  # so that the wait below sees the new connection
            path.cut_silently()  # no FIN, no RST: bytes just stop arriving, both ways
            await until_logged(caplog, r"no word from .+ for 1s")
            await until_logged(caplog, r"client resumed session [0-9a-f]{8}")
            await until(client.connected.wait())
            public = await users_port(ports, client)
            async with asyncio.timeout(STEP_TIMEOUT):
                while await exchange(public, b"after\n") != b"after\n":  # noqa: ASYNC110 (the resume settles)
                    await asyncio.sleep(0.05)


def assert_look_random(ids: list[str]) -> None:
    """128-bit random hex ids: all distinct, no shared 8-digit prefix, no two consecutive numbers."""
    assert all(re.fullmatch(r"[0-9a-f]{32}", conn_id) for conn_id in ids), ids
    assert len({conn_id[:8] for conn_id in ids}) == len(ids), "ids share a prefix: they look counted, not random"
    numbers = sorted(int(conn_id, 16) for conn_id in ids)
    assert all(b - a > 2**64 for a, b in itertools.pairwise(numbers)), "ids are close together"
    # Every hex digit shows up about equally often (a counter's high digits are all zeros).
    assert max(Counter("".join(ids)).values()) < len(ids) * 32 / 16 * 2


@pytest.mark.since("resume")
async def test_session_ids_are_unpredictable(start_server: StartServer) -> None:
    _, ports = await start_server()
    ids = []
    for _ in range(12):  # from stage 14 on each one's tunnel waits out its resume window: 16 per address at most
        (_, writer), session_id = await until_free(ports.control)
        ids.append(session_id)
        writer.close()
    assert_look_random(ids)


async def until_free(control_port: int) -> tuple[Any, str]:
    """Handshake as soon as the server has let go of the last client (before stage 14 it takes one at a time)."""
    async with asyncio.timeout(STEP_TIMEOUT):
        while True:
            try:
                return await handshake(control_port)
            except Refused:
                await asyncio.sleep(0.01)
