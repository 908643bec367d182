# ruff: noqa: E402 (the module-level skip comes before the imports of the gone stage_4)
"""Stage 4, the real tunnel: users of the public port reach the local app, and the tunnel holds up.

In-process tests: a real server and client (or a hand-played one, speaking raw protocol lines)
in front of a real HTTP server as the local app. The command lines are tested in
test_stage_4_cli.py, and kills, floods and resource counts in test_stage_4_faults.py.
"""

import pytest

# Old stage 4 (a proxy connection per user) is gone from the ladder; its tests are being retargeted
# to the stages where each behaviour now appears (auth 7+, heartbeats and resume 6+, pages 8+, limits
# 9+) or dropped where they test only the proxy transport. Until then this file does not run.
pytest.skip("old stage 4's tests: not yet retargeted to the new ladder", allow_module_level=True)


import asyncio
import contextlib
import itertools
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest

from stage_4 import auth, pages, private
from stage_4.client import Client
from stage_4.protocol import Refused, TryLater
from stage_4.relay import Timeouts
from stage_4.server import Ports, Server
from support import (
    PAGE,
    STEP_TIMEOUT,
    Background,
    EchoServer,
    HttpOrigin,
    LocalServer,
    exchange,
    free_port,
    http_get,
    open_connection,
    pattern_bytes,
    sha256,
)

SECRET = "stage-4-tests-secret"
# Short heartbeats keep the tests fast; long enough for a loaded machine to be on time.
FAST = {"heartbeat_interval": 0.1, "heartbeat_timeout": 1.0}

StartServer = Callable[..., Awaitable[Ports]]
StartClient = Callable[..., Awaitable[Client]]
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture(autouse=True)
def log_info(caplog: pytest.LogCaptureFixture) -> None:
    """Several tests check what the server or the client logged at INFO level."""
    caplog.set_level(logging.INFO)


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Start stage 4 servers in this process (Server keyword arguments allowed); all stop at the end."""
    async with contextlib.AsyncExitStack() as running:

        async def start(**kwargs: Any) -> Ports:
            server = Server(**kwargs)
            ports = await server.listen("127.0.0.1", 0, 0, 0)
            await running.enter_async_context(Background(server.serve()))
            return ports

        yield start


@pytest.fixture
async def start_client() -> AsyncIterator[StartClient]:
    """Start stage 4 clients in this process and wait until each is connected; all stop at the end."""
    async with contextlib.AsyncExitStack() as running:

        async def start(local_port: int, control_port: int, proxy_port: int, **kwargs: Any) -> Client:
            client = Client(("127.0.0.1", local_port), "127.0.0.1", control_port, proxy_port, **kwargs)
            await running.enter_async_context(Background(client.run()))
            await until(client.connected.wait())
            return client

        yield start


@pytest.fixture
async def tunnel(start_server: StartServer, start_client: StartClient, http_origin: HttpOrigin) -> Ports:
    """A server and a client sharing a secret, in front of a real HTTP server as the local app."""
    ports = await start_server(secret=SECRET)
    await start_client(http_origin.port, ports.control, ports.proxy, secret=SECRET)
    return ports


T = TypeVar("T")


async def until(awaitable: Awaitable[T]) -> T:
    """Every wait on a peer is bounded: a bug fails the test instead of hanging it."""
    async with asyncio.timeout(STEP_TIMEOUT):
        return await awaitable


async def until_logged(caplog: pytest.LogCaptureFixture, pattern: str) -> re.Match[str]:
    """Wait (bounded) for a log line matching `pattern`."""
    async with asyncio.timeout(STEP_TIMEOUT):
        while True:
            if match := re.search(pattern, caplog.text):
                return match
            await asyncio.sleep(0.01)


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    return await until(reader.read())


async def read_line(reader: asyncio.StreamReader) -> bytes:
    return await until(reader.readline())


async def handshake(port: int, secret: str | None = SECRET, session_id: str | None = None) -> tuple[Streams, str]:
    """Play the client by hand: open a control connection, pass the handshake, return it and the session id."""
    reader, writer = await open_connection(port)
    welcome = await until(auth.client_handshake(reader, writer, secret, session_id))
    return (reader, writer), welcome.session_id


# --- the tunnel -----------------------------------------------------------------------------


async def test_the_server_logs_one_line_per_request_with_method_path_and_bytes(
    tunnel: Ports, caplog: pytest.LogCaptureFixture
) -> None:
    assert (await http_get(tunnel.public, "/some/page?x=1"))[0] == 200
    await until_logged(
        caplog,
        r"127\.0\.0\.1:\d+: conn [0-9a-f]{8} GET /some/page\?x=1 -> 200, \d+ bytes up, \d+ bytes down, [\d.]+s",
    )
    # A user who does not speak HTTP is logged too, without a request line.
    await exchange(tunnel.public, b"not http at all\n")
    await until_logged(caplog, r"conn [0-9a-f]{8} closed, 16 bytes up, \d+ bytes down")


async def test_the_client_looks_names_up_once_not_once_per_user(
    start_server: StartServer, http_origin: HttpOrigin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given `localhost` for the server and the local app, the client resolves each name once.

    A lookup per user is a trip to a worker thread (and maybe a refused try at ::1) on every
    new connection; the client dials the addresses it reached instead.
    """
    loop = asyncio.get_running_loop()
    lookups: list[str] = []
    real_getaddrinfo = loop.getaddrinfo

    async def counting_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        lookups.append(host)
        return await real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", counting_getaddrinfo)
    ports = await start_server()
    client = Client(("localhost", http_origin.port), "localhost", ports.control, ports.proxy, **FAST)
    async with Background(client.run()):
        await until(client.connected.wait())
        for _ in range(5):
            assert await http_get(ports.public) == (200, PAGE)
    # One lookup for the control connection, one for the first user's local app; none per user.
    assert lookups == ["localhost", "localhost"]


# --- error pages ----------------------------------------------------------------------------


async def test_no_client_connected_gives_a_502_page(start_server: StartServer) -> None:
    ports = await start_server()
    status, body = await http_get(ports.public)
    assert status == 502
    assert b"no tunnel client is connected to this server" in body


async def test_a_proxy_connection_that_never_comes_gives_a_504_page(start_server: StartServer) -> None:
    ports = await start_server(proxy_timeout=0.3)
    control, _ = await handshake(ports.control, secret=None)  # a client that ignores create_proxy
    status, body = await http_get(ports.public)
    assert status == 504
    assert b"the tunnel client did not open a proxy connection within 0.3s" in body
    control[1].close()


async def test_a_local_app_that_refuses_gives_a_502_page_naming_it(
    start_server: StartServer, start_client: StartClient, caplog: pytest.LogCaptureFixture
) -> None:
    dead_port = await free_port()
    ports = await start_server()
    await start_client(dead_port, ports.control, ports.proxy)
    status, body = await http_get(ports.public)
    assert status == 502
    assert f"could not reach its local app: connection refused at 127.0.0.1:{dead_port}".encode() in body
    assert "cannot reach the local app (connection refused" in caplog.text  # the client says so too


async def test_too_many_waiting_users_get_a_503_page(start_server: StartServer) -> None:
    ports = await start_server(max_waiting=2)
    control, _ = await handshake(ports.control, secret=None)  # it never dials: users pile up
    waiting = [await open_connection(ports.public) for _ in range(2)]
    for _ in range(2):
        assert (await read_line(control[0])).startswith(b"create_proxy ")
    status, body = await http_get(ports.public)
    assert status == 503
    assert b"too many users are waiting" in body
    for _, writer in [*waiting, control]:
        writer.close()


async def test_users_who_already_hung_up_do_not_keep_others_out_of_a_full_waiting_room(
    start_server: StartServer,
) -> None:
    ports = await start_server(max_waiting=2, proxy_timeout=0.5)
    control, _ = await handshake(ports.control, secret=None)  # it never dials: users pile up
    for _ in range(2):
        _, writer = await open_connection(ports.public)
        writer.close()  # connect and hang up at once, as a flood does
        assert (await read_line(control[0])).startswith(b"create_proxy ")
    status, _ = await http_get(ports.public)
    assert status == 504  # let in to wait (and then timed out), not turned away with a 503
    control[1].close()


async def test_a_user_who_does_not_speak_http_gets_a_clean_close_not_a_page(start_server: StartServer) -> None:
    ports = await start_server()
    reader, writer = await open_connection(ports.public)
    writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
    assert await read_to_eof(reader) == b""  # EOF, not a reset (a reset would raise here) and no page
    writer.close()


# --- auth -----------------------------------------------------------------------------------


async def test_a_wrong_secret_is_refused_and_the_client_stops_without_retrying(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    ports = await start_server(secret=SECRET)
    client = Client(("127.0.0.1", 9), "127.0.0.1", ports.control, ports.proxy, secret="wrong")
    with pytest.raises(Refused, match="wrong secret"):
        await until(client.run())
    assert "reconnecting" not in caplog.text


async def test_a_client_without_the_secret_is_told_it_needs_one(start_server: StartServer) -> None:
    ports = await start_server(secret=SECRET)
    with pytest.raises(Refused, match="the server requires a secret; pass --secret or set NGROK_SECRET"):
        await until(Client(("127.0.0.1", 9), "127.0.0.1", ports.control, ports.proxy).run())


async def test_a_captured_answer_replayed_on_a_new_connection_is_refused(start_server: StartServer) -> None:
    ports = await start_server(secret=SECRET)
    # An eavesdropper records a real client's handshake...
    reader, writer = await open_connection(ports.control)
    writer.write(b"hello\n")
    nonce = (await read_line(reader)).split()[1].decode()
    captured = auth.answer(SECRET, nonce)
    writer.write(f"auth {captured}\n".encode())
    assert (await read_line(reader)).startswith(b"welcome ")
    writer.close()
    # ...and replays the answer on a connection of its own: the server asks a new question.
    reader, writer = await open_connection(ports.control)
    writer.write(b"hello\n")
    assert (await read_line(reader)).split()[1].decode() != nonce
    writer.write(f"auth {captured}\n".encode())
    assert await read_to_eof(reader) == b"error wrong secret; check --secret or NGROK_SECRET on both sides\n"
    writer.close()


async def test_no_secret_on_either_side_still_works_on_loopback(
    start_server: StartServer, start_client: StartClient, http_origin: HttpOrigin
) -> None:
    ports = await start_server()
    await start_client(http_origin.port, ports.control, ports.proxy)
    assert await http_get(ports.public) == (200, PAGE)


async def test_a_proxy_connection_must_name_an_id_the_server_gave_out(tunnel: Ports) -> None:
    reader, writer = await open_connection(tunnel.proxy)
    writer.write(b"proxy 0123456789abcdef0123456789abcdef\n")  # a guess: ids go only to the client
    assert await read_to_eof(reader) == b"error unknown or expired proxy id\n"
    writer.close()


async def test_bytes_and_eofs_that_arrive_before_the_pairing_are_relayed(start_server: StartServer) -> None:
    """A connection keeps what arrives before it is joined to its peer, and passes it on: nothing is lost.

    The user's request and EOF reach the server while it still waits for the proxy connection,
    and the proxy connection's first bytes and EOF come in the same packet as its `proxy` line.
    """
    ports = await start_server()
    (control, control_writer), _ = await handshake(ports.control, secret=None)  # a client played by hand
    user_reader, user_writer = await open_connection(ports.public)
    user_writer.write(b"the request")
    user_writer.write_eof()
    line = await read_line(control)
    assert line.startswith(b"create_proxy ")
    await asyncio.sleep(0.1)  # not an assertion: lets the request and EOF arrive before the pairing
    proxy_reader, proxy_writer = await open_connection(ports.proxy)
    proxy_writer.write(b"proxy " + line.split()[1] + b"\nthe answer")
    proxy_writer.write_eof()
    assert await read_to_eof(proxy_reader) == b"ok\nthe request"  # the server confirms the pairing first
    assert await read_to_eof(user_reader) == b"the answer"
    for writer in (user_writer, proxy_writer, control_writer):
        writer.close()


async def test_a_user_who_sends_a_lot_before_the_pairing_waits_in_the_kernel_and_loses_nothing(
    start_server: StartServer,
) -> None:
    """Until its proxy connection comes, the server keeps a bounded part of a user's bytes (DATA_LIMIT).

    The rest must wait at the sender, not in the server's memory, and all of it must arrive after the pairing.
    """
    ports = await start_server()
    (control, control_writer), _ = await handshake(ports.control, secret=None)  # a client played by hand
    user_reader, user_writer = await open_connection(ports.public)
    payload = pattern_bytes(32 * 1024 * 1024, seed=5)
    user_writer.write(payload)
    user_writer.write_eof()
    line = await read_line(control)
    await asyncio.sleep(0.3)  # not an assertion: time for the server to read whatever it would read
    # The kernel's socket buffers hold a few MB; a server that kept reading would have taken nearly all.
    assert user_writer.transport.get_write_buffer_size() > len(payload) // 2
    proxy_reader, proxy_writer = await open_connection(ports.proxy)
    proxy_writer.write(b"proxy " + line.split()[1] + b"\n")
    proxy_writer.write_eof()
    assert await read_line(proxy_reader) == b"ok\n"  # the server confirms the pairing first
    assert sha256(await read_to_eof(proxy_reader)) == sha256(payload)
    assert await read_to_eof(user_reader) == b""
    for writer in (user_writer, proxy_writer, control_writer):
        writer.close()


async def test_stopping_the_server_closes_proxy_connections_that_have_not_named_their_id() -> None:
    """No task reads a proxy connection's first line, so the server must close those itself."""
    server = Server(handshake_timeout=60.0)  # far beyond this test: only the stop can close it
    ports = await server.listen("127.0.0.1", 0, 0, 0)
    async with Background(server.serve()):
        reader, writer = await open_connection(ports.proxy)
        await asyncio.sleep(0.1)  # not an assertion: lets the server accept it
    assert await read_to_eof(reader) == b""
    writer.close()


def test_a_server_open_to_the_world_without_a_secret_is_warned_about() -> None:
    assert auth.exposure_warning("0.0.0.0", None) is not None
    assert "without a secret" in (auth.exposure_warning("203.0.113.7", None) or "")
    assert auth.exposure_warning("0.0.0.0", "s3cret") is None
    for loopback in ("127.0.0.1", "::1", "localhost"):
        assert auth.exposure_warning(loopback, None) is None


# --- one tunnel, sessions and heartbeats ----------------------------------------------------


async def test_a_second_client_is_refused_while_the_first_keeps_serving(tunnel: Ports) -> None:
    second = Client(("127.0.0.1", 9), "127.0.0.1", tunnel.control, tunnel.proxy, secret=SECRET)
    with pytest.raises(Refused, match="another client is already connected"):
        await until(second.run())
    assert await http_get(tunnel.public) == (200, PAGE)


async def test_a_client_that_comes_back_with_its_session_id_is_let_in_at_once(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Its old control connection is half-open (no FIN came): the server must not wait for the heartbeat timeout."""
    ports = await start_server(secret=SECRET, heartbeat_timeout=STEP_TIMEOUT * 6)  # longer than this test may take
    (old_reader, old_writer), session_id = await handshake(ports.control)
    (_, new_writer), resumed = await handshake(ports.control, session_id=session_id)
    assert resumed == session_id
    assert await read_to_eof(old_reader) == b""  # the server dropped the stale connection
    assert f"client resumed session {session_id[:8]}" in caplog.text
    # A stranger cannot do the same without the id.
    with pytest.raises(Refused, match="another client is already connected"):
        await handshake(ports.control)
    for writer in (old_writer, new_writer):
        writer.close()


async def test_a_client_that_stops_sending_heartbeats_is_dropped_and_the_tunnel_freed(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    ports = await start_server(heartbeat_timeout=0.5)
    (reader, writer), _ = await handshake(ports.control, secret=None)  # then silence
    assert await read_to_eof(reader) == b"error no heartbeat for 0.5s\n"
    writer.close()
    assert "no heartbeat for 0.5s; closing" in caplog.text
    await handshake(ports.control, secret=None)  # anyone may take the free tunnel now


async def test_the_client_notices_a_server_that_goes_silent_and_reconnects(caplog: pytest.LogCaptureFixture) -> None:
    """A fake server welcomes the client, then never says another word (a half-open connection)."""
    connections: list[Streams] = []
    second_connection = asyncio.Event()

    async def silent_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append((reader, writer))
        if len(connections) == 2:
            second_connection.set()
        await reader.readline()
        writer.write(b"welcome s1\n")

    fake = await asyncio.start_server(silent_server, "127.0.0.1", 0)
    async with fake:
        port = fake.sockets[0].getsockname()[1]
        client = Client(("127.0.0.1", 9), "127.0.0.1", port, port, heartbeat_interval=0.1, heartbeat_timeout=0.5)
        async with Background(client.run()):
            await until_logged(caplog, r"no word from the server for 0\.5s; reconnecting in [\d.]+s \(attempt 1\)")
            await until(second_connection.wait())
        for _, writer in connections:
            writer.close()


async def test_the_client_retries_with_backoff_until_the_server_comes(
    caplog: pytest.LogCaptureFixture, http_origin: HttpOrigin
) -> None:
    control_port = await free_port()
    client = Client(("127.0.0.1", http_origin.port), "127.0.0.1", control_port, 9, max_backoff=0.2)
    async with Background(client.run()):
        await until_logged(
            caplog,
            r"cannot reach the server at 127\.0\.0\.1:\d+ \(connection refused\); "
            r"reconnecting in [\d.]+s \(attempt 3\)",
        )
        server = Server()
        ports = await server.listen("127.0.0.1", control_port, 0, 0)
        client.proxy_port = ports.proxy
        async with Background(server.serve()):
            await until(client.connected.wait())
            assert await http_get(ports.public) == (200, PAGE)


async def test_user_connections_survive_a_control_reconnect(
    start_server: StartServer, caplog: pytest.LogCaptureFixture, echo_server: EchoServer
) -> None:
    """The network under the control connection dies silently; the client notices, comes back with its session
    id and is let in at once (the server's own heartbeat timeout is far away), and a user mid-conversation
    never notices."""
    ports = await start_server(heartbeat_timeout=STEP_TIMEOUT * 6)
    async with Forwarder(ports.control) as path:  # the client's control connection goes through this
        client = Client(("127.0.0.1", echo_server.port), "127.0.0.1", path.port, ports.proxy, **FAST)
        async with Background(client.run()):
            await until(client.connected.wait())
            user_reader, user_writer = await open_connection(ports.public)
            user_writer.write(b"before\n")
            assert await read_line(user_reader) == b"before\n"

            path.cut_silently()  # no FIN, no RST: bytes just stop arriving, both ways
            await until_logged(caplog, r"no word from the server for 1s; reconnecting")
            await until_logged(caplog, r"client resumed session [0-9a-f]{8}; dropping its old connection")
            await until(client.connected.wait())

            user_writer.write(b"after\n")
            assert await read_line(user_reader) == b"after\n"
            assert await exchange(ports.public, b"new user\n") == b"new user\n"
            user_writer.close()


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


# --- liveness: heartbeats and backoff -------------------------------------------------------------


async def test_the_client_sends_a_ping_every_heartbeat_interval() -> None:
    """Without pings, a server would drop a healthy but quiet client after its heartbeat timeout."""
    pings = 0
    three_pings = asyncio.Event()

    async def fake_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal pings
        await reader.readline()  # hello
        writer.write(b"welcome s1\n")
        while line := await reader.readline():
            if line == b"ping\n":
                pings += 1
                writer.write(b"pong\n")
                if pings == 3:
                    three_pings.set()

    fake = await asyncio.start_server(fake_server, "127.0.0.1", 0)
    async with fake:
        port = fake.sockets[0].getsockname()[1]
        client = Client(("127.0.0.1", 9), "127.0.0.1", port, port, heartbeat_interval=0.1, heartbeat_timeout=5.0)
        async with Background(client.run()):
            await until(three_pings.wait())


async def test_reconnect_attempts_wait_longer_and_longer() -> None:
    """A client whose server is down must not hammer it: a tight reconnect loop makes thousands of tries."""
    attempts = 0

    async def count_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        writer.close()  # a server that hangs up at once: every attempt fails fast

    flaky = await asyncio.start_server(count_and_close, "127.0.0.1", 0)
    async with flaky:
        port = flaky.sockets[0].getsockname()[1]
        async with Background(Client(("127.0.0.1", 9), "127.0.0.1", port, port, max_backoff=30).run()):
            await asyncio.sleep(2.0)
    # Full jitter waits up to 0.5, 1, 2 s...: a handful of tries in 2 s (a tight loop makes thousands).
    assert 1 <= attempts <= 12, attempts


async def test_the_backoff_starts_again_from_the_first_step_after_a_good_connection(
    caplog: pytest.LogCaptureFixture, echo_server: EchoServer
) -> None:
    control_port = await free_port()
    client = Client(("127.0.0.1", echo_server.port), "127.0.0.1", control_port, 9, max_backoff=0.2)
    async with Background(client.run()):
        await until_logged(caplog, r"reconnecting in [\d.]+s \(attempt 3\)")
        server = Server()
        await server.listen("127.0.0.1", control_port, 0, 0)
        async with Background(server.serve()):
            await until(client.connected.wait())
        caplog.clear()  # the server is gone again: the next failure is attempt 1, not attempt 4 or later
        await until_logged(caplog, r"reconnecting in [\d.]+s \(attempt \d+\)")
        assert re.search(r"\(attempt 1\)", caplog.text), caplog.text


# --- ids nobody can guess --------------------------------------------------------------------------


def assert_look_random(ids: list[str]) -> None:
    """128-bit random hex ids: all distinct, no shared 8-digit prefix, no two consecutive numbers."""
    assert all(re.fullmatch(r"[0-9a-f]{32}", conn_id) for conn_id in ids), ids
    assert len({conn_id[:8] for conn_id in ids}) == len(ids), "ids share a prefix: they look counted, not random"
    numbers = sorted(int(conn_id, 16) for conn_id in ids)
    assert all(b - a > 2**64 for a, b in itertools.pairwise(numbers)), "ids are close together"
    # Every hex digit shows up about equally often (a counter's high digits are all zeros).
    assert max(Counter("".join(ids)).values()) < len(ids) * 32 / 16 * 2


async def test_proxy_ids_are_unpredictable(start_server: StartServer) -> None:
    ports = await start_server()
    (control, control_writer), _ = await handshake(ports.control, secret=None)  # a client played by hand
    users = [await open_connection(ports.public) for _ in range(40)]
    ids = [(await read_line(control)).split()[1].decode() for _ in users]
    assert_look_random(ids)
    for _, writer in [*users, (control, control_writer)]:
        writer.close()


async def test_session_ids_are_unpredictable(start_server: StartServer) -> None:
    ports = await start_server()
    ids = []
    for _ in range(20):
        (_, writer), session_id = await handshake(ports.control, secret=None)
        ids.append(session_id)
        writer.close()
        await until_free(ports.control)
    assert_look_random(ids)


async def until_free(control_port: int) -> None:
    """Wait until the server has let go of the last client (a new hello is welcomed)."""
    async with asyncio.timeout(STEP_TIMEOUT):
        while True:
            try:
                (_, writer), _ = await handshake(control_port, secret=None)
            except Refused:
                await asyncio.sleep(0.01)
                continue
            writer.close()
            await asyncio.sleep(0.05)  # not an assertion: lets the server see this one go too
            return


# --- what a stranger on a port can do ---------------------------------------------------------------


async def test_a_proxy_connection_that_never_names_its_id_is_closed(start_server: StartServer) -> None:
    ports = await start_server(handshake_timeout=0.3)
    reader, writer = await open_connection(ports.proxy)
    assert await read_to_eof(reader) == b"error no proxy line within 0.3s\n"
    writer.close()


async def test_a_server_open_to_the_world_without_a_secret_warns_when_it_starts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = Server()
    await server.listen("0.0.0.0", 0, 0, 0)  # all interfaces: nothing connects, we only read the log
    async with Background(server.serve()):
        assert "WARNING: listening on '0.0.0.0' without a secret" in caplog.text


async def test_a_short_secret_gets_a_warning_with_a_way_to_make_a_strong_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = Server(secret="hunter2")
    await server.listen("127.0.0.1", 0, 0, 0)
    async with Background(server.serve()):
        assert "the secret is only 7 characters long" in caplog.text
        assert "secrets.token_urlsafe" in caplog.text
    assert auth.strength_warning(SECRET) is None


async def test_guessing_the_secret_is_throttled_per_address(start_server: StartServer) -> None:
    """After a few wrong answers, even the right one is turned away for a while: guessing online is hopeless.

    Turned away with `busy` (TryLater), not refused: the client may share the address with the guesser, and
    must try again (tests/test_isolation_tenants.py)."""
    ports = await start_server(secret=SECRET)
    for _ in range(auth.MAX_FAILURES):
        with pytest.raises(Refused, match="wrong secret"):
            await handshake(ports.control, secret="a-wrong-guess-of-the-secret")
    with pytest.raises(TryLater, match=r"too many wrong secrets from 127\.0\.0\.1; try again in"):
        await handshake(ports.control, secret=SECRET)


def test_the_throttle_forgets_the_oldest_addresses_first_and_stays_bounded() -> None:
    throttle = auth.Throttle(max_failures=1, window=60.0, size=3)
    for n in range(10):
        throttle.failed(f"198.51.100.{n}")
    throttle.check("198.51.100.0")  # forgotten: the table holds only the last three
    with pytest.raises(TryLater):
        throttle.check("198.51.100.9")


async def test_the_request_log_escapes_bytes_that_would_drive_a_terminal(
    start_server: StartServer, start_client: StartClient, echo_server: EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    ports = await start_server()
    await start_client(echo_server.port, ports.control, ports.proxy)
    await exchange(ports.public, b"GET /\x1b[2J\x07\x00x HTTP/1.0\r\n\r\n")
    line = (await until_logged(caplog, r"GET /\S+ -> no response"))[0]
    assert line == r"GET /\x1b[2J\x07\x00x -> no response"
    assert not any(char in caplog.text for char in "\x1b\x07\x00")
    assert pages.printable(b"ok /path?q=1") == "ok /path?q=1"


# --- the proxy connection, from the client's side ---------------------------------------------------


async def test_a_refusal_on_the_proxy_connection_never_reaches_the_local_app(start_server: StartServer) -> None:
    """A client too slow for the proxy timeout gets `error unknown or expired proxy id`: not the app's business."""
    ports = await start_server()
    received = bytearray()
    ended = asyncio.Event()

    async def local_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.extend(data)
        ended.set()
        writer.close()

    app = await asyncio.start_server(local_app, "127.0.0.1", 0)
    async with app:
        local = private.LocalApp("127.0.0.1", app.sockets[0].getsockname()[1])
        stale_id = "0123456789abcdef0123456789abcdef"  # an id the server never gave out (or forgot)
        await until(private.serve_user(stale_id, local, ("127.0.0.1", ports.proxy), Timeouts(60, 60)))
        await until(ended.wait())
    assert bytes(received) == b""


async def test_a_proxy_connection_the_client_cannot_open_gives_a_502_at_once(
    start_server: StartServer, echo_server: EchoServer
) -> None:
    """The client knows at once that its proxy connection failed: the user must not wait for a 504."""
    ports = await start_server(proxy_timeout=STEP_TIMEOUT * 2)  # a 504 would come too late for this test
    client = Client(("127.0.0.1", echo_server.port), "127.0.0.1", ports.control, await free_port(), **FAST)
    async with Background(client.run()):
        await until(client.connected.wait())
        status, body = await http_get(ports.public)
    assert status == 502
    assert b"the tunnel client could not open a proxy connection: connection refused" in body


# --- many users at once ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_thousand_users_arriving_at_once_are_all_served(
    start_server: StartServer, start_client: StartClient, echo_server: EchoServer
) -> None:
    """Waiting users cost a socket, not a buffer: the waiting room is bounded by memory and descriptors,
    so a burst of a thousand is let in (a room of 256 turned 44 of 300 away with a 503)."""
    ports = await start_server()
    await start_client(echo_server.port, ports.control, ports.proxy)
    payloads = [f"user {n}\n".encode() for n in range(1000)]
    async with asyncio.timeout(STEP_TIMEOUT * 5):
        replies = await asyncio.gather(*(exchange(ports.public, payload) for payload in payloads))
    assert replies == payloads
