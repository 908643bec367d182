"""Stage 2, public and proxy connections: each user is paired, by id, with its own proxy connection.

Some tests run the real client; others play the client by hand (FakeClient) to decide when,
whether and with which id a proxy connection is dialled, speaking the raw protocol lines.
"""

import asyncio
import contextlib
import logging
import random
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from stage_2.client import Client
from stage_2.protocol import TunnelError
from stage_2.server import Ports, Server
from support import (
    STEP_TIMEOUT,
    Background,
    CliProcess,
    accepted,
    exchange,
    free_port,
    open_connection,
    send_until_stuck,
    until_logged,
    usage_error,
)

# Short enough to keep the tests fast, long enough for a loaded machine to be on time.
HANDSHAKE_TIMEOUT = 0.5

StartServer = Callable[..., Awaitable[Ports]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Start stage 2 servers in this process (Server keyword arguments allowed); all stop at the end."""
    async with contextlib.AsyncExitStack() as running:

        async def start(**kwargs: float) -> Ports:
            server = Server(**{"handshake_timeout": HANDSHAKE_TIMEOUT, **kwargs})
            ports = await server.listen("127.0.0.1", 0, 0, 0)
            await running.enter_async_context(Background(server.serve()))
            return ports

        yield start


@pytest.fixture
async def ports(start_server: StartServer) -> Ports:
    """A stage 2 server with default timeouts (the proxy timeout is far beyond STEP_TIMEOUT)."""
    return await start_server()


@pytest.fixture
async def client(ports: Ports) -> AsyncIterator[Ports]:
    """The real stage 2 client connected to `ports`' server, running in the background."""
    async with Background(Client("127.0.0.1", ports.control, ports.proxy).run()):
        await until_echoed(ports.public)
        yield ports


async def until_echoed(public_port: int) -> None:
    """Wait (bounded) until the client is connected: a line sent to the public port comes back."""
    async with asyncio.timeout(STEP_TIMEOUT):
        while True:
            if await exchange(public_port, b"ready?\n") == b"ready?\n":
                return
            await asyncio.sleep(0.02)


async def read_line(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(STEP_TIMEOUT):
        return await reader.readline()


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(STEP_TIMEOUT):
        return await reader.read()


class FakeClient:
    """Plays the client by hand over a raw control connection; closes every connection it made."""

    def __init__(self, ports: Ports) -> None:
        self.ports = ports
        self._writers: list[asyncio.StreamWriter] = []

    async def connect(self) -> None:
        self.reader, self.writer = await self.open(self.ports.control)
        self.writer.write(b"ping\n")  # the answer proves the server has registered us as its client
        assert await read_line(self.reader) == b"pong\n"

    async def open(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await open_connection(port)
        self._writers.append(writer)
        return reader, writer

    async def next_conn_id(self) -> str:
        """Wait for the next `create_proxy <id>` line and return the id."""
        line = await read_line(self.reader)
        match = re.fullmatch(rb"create_proxy ([0-9a-f]{32})\n", line)
        assert match, f"expected create_proxy with a 32-hex-digit id, got {line!r}"
        return match[1].decode()

    async def new_user(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        """Connect a public user; return its streams and the id the server sent us for it."""
        reader, writer = await self.open(self.ports.public)
        return reader, writer, await self.next_conn_id()

    async def dial(self, first_bytes: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a proxy connection and send `first_bytes` (normally `proxy <id>\\n`) in one write."""
        reader, writer = await self.open(self.ports.proxy)
        writer.write(first_bytes)
        await writer.drain()
        return reader, writer

    def close(self) -> None:
        for writer in self._writers:
            writer.close()


ConnectFake = Callable[[Ports], Awaitable[FakeClient]]


@pytest.fixture
async def fake_client() -> AsyncIterator[ConnectFake]:
    """Connect FakeClients to servers; everything they opened is closed at the end."""
    fakes: list[FakeClient] = []

    async def connect(ports: Ports) -> FakeClient:
        fakes.append(FakeClient(ports))
        await fakes[-1].connect()
        return fakes[-1]

    yield connect
    for fake in fakes:
        fake.close()


# --- the happy path -------------------------------------------------------------------------


async def test_typed_lines_are_echoed_and_stop_ends_the_session(
    client: Ports, caplog: pytest.LogCaptureFixture
) -> None:
    """`nc localhost 60624`, as the Go original's stage 2 README verifies it."""
    caplog.set_level(logging.INFO)
    reader, writer = await open_connection(client.public)
    for line in (b"hello\n", b"tunnel\n"):
        writer.write(line)
        assert await read_line(reader) == line
    writer.write(b"stop\n")
    assert await read_to_eof(reader) == b""  # the session ends although the user never closed
    writer.close()
    # One summary line per public connection: peer, id prefix, bytes each way, duration.
    await until_logged(caplog, r"127\.0\.0\.1:\d+: conn [0-9a-f]{8} closed, 18 bytes up, 13 bytes down, [\d.]+s")


async def test_the_control_connection_still_answers_ping_with_pong(ports: Ports) -> None:
    reader, writer = await open_connection(ports.control)
    for _ in range(3):
        writer.write(b"ping\n")
        assert await read_line(reader) == b"pong\n"
    writer.close()


async def test_every_user_gets_a_fresh_unguessable_id(ports: Ports, fake_client: ConnectFake) -> None:
    """Random, not a counter or a clock: whoever saw some ids must not be able to guess the next."""
    fake = await fake_client(ports)
    ids = [(await fake.new_user())[2] for _ in range(20)]  # each 32 hex digits: see next_conn_id
    # A counter or a timestamp keeps its high digits; random ids differ in (nearly) every digit
    # position (a UUID4 has two fixed ones). A position would stay the same by chance once in 16**19.
    assert sum(len({conn_id[i] for conn_id in ids}) > 1 for i in range(32)) >= 30, ids
    assert len({conn_id[:8] for conn_id in ids}) == 20, ids  # so no two share the prefix the logs show


async def test_proxy_connections_are_paired_by_id_not_by_arrival_order(ports: Ports, fake_client: ConnectFake) -> None:
    """The Go original pairs a user with whichever proxy connection comes next; we must not."""
    fake = await fake_client(ports)
    a_reader, a_writer, a_id = await fake.new_user()
    b_reader, b_writer, b_id = await fake.new_user()
    # B's proxy connection arrives first, then A's: arrival order is the opposite of the users'.
    b_proxy_reader, b_proxy_writer = await fake.dial(f"proxy {b_id}\n".encode() + b"for B\n")
    a_proxy_reader, a_proxy_writer = await fake.dial(f"proxy {a_id}\n".encode() + b"for A\n")
    assert await read_line(a_reader) == b"for A\n"
    assert await read_line(b_reader) == b"for B\n"
    # And the other way: each user's bytes reach its own proxy connection only.
    a_writer.write(b"from A\n")
    b_writer.write(b"from B\n")
    assert await read_line(a_proxy_reader) == b"from A\n"
    assert await read_line(b_proxy_reader) == b"from B\n"
    for writer in (a_writer, b_writer, a_proxy_writer, b_proxy_writer):
        writer.close()


async def test_fifty_users_whose_proxy_connections_arrive_shuffled_each_get_their_own(
    ports: Ports, fake_client: ConnectFake
) -> None:
    fake = await fake_client(ports)
    users = [await fake.new_user() for _ in range(50)]  # one at a time: user i got id i
    order = list(range(50))
    random.Random(2).shuffle(order)
    await asyncio.gather(*(fake.dial(f"proxy {users[i][2]}\nyou are {i}\n".encode()) for i in order))
    assert [await read_line(reader) for reader, _, _ in users] == [f"you are {i}\n".encode() for i in range(50)]


async def test_bytes_sent_right_after_the_proxy_line_reach_the_user(ports: Ports, fake_client: ConnectFake) -> None:
    """The server reads `proxy <id>` through a buffer; what came with it must not be lost."""
    fake = await fake_client(ports)
    reader, writer, conn_id = await fake.new_user()
    writer.write(b"early bird\n")  # sent before any proxy connection exists
    proxy_reader, proxy_writer = await fake.dial(f"proxy {conn_id}\nsame packet\n".encode())
    assert await read_line(reader) == b"same packet\n"
    assert await read_line(proxy_reader) == b"early bird\n"
    writer.close()
    proxy_writer.close()


# --- bad input and timeouts -----------------------------------------------------------------


# A proxy connection that names no waiting user, and the error line it gets before the server closes it.
BAD_PROXY_CONNECTIONS = pytest.mark.parametrize(
    ("first_bytes", "reply"),
    [
        (f"proxy {secrets.token_hex(16)}\n".encode(), b"error unknown or expired proxy id\n"),
        (b"\x00\xff garbage\n", b"error line is not ascii text\n"),
        (b"ping\n", b"error expected 'proxy <id>', got Ping()\n"),
        (b"proxy " + b"a" * 2000 + b"\n", b"error line longer than 1024 bytes\n"),
        (b"x" * 1024 * 1024, b"error line longer than 1024 bytes\n"),
        (b"", f"error no proxy line within {HANDSHAKE_TIMEOUT:g}s\n".encode()),
    ],
    ids=["unknown-id", "garbage", "wrong-message", "2KB-line", "1MB-without-newline", "nothing"],
)


@BAD_PROXY_CONNECTIONS
async def test_bad_proxy_connection_is_closed_with_an_error_while_a_user_is_served(
    client: Ports, first_bytes: bytes, reply: bytes
) -> None:
    user_reader, user_writer = await open_connection(client.public)
    user_writer.write(b"before\n")
    assert await read_line(user_reader) == b"before\n"

    reader, writer = await open_connection(client.proxy)
    writer.write(first_bytes)
    assert await read_to_eof(reader) == reply  # then the server closed it
    writer.close()

    user_writer.write(b"after\n")
    assert await read_line(user_reader) == b"after\n"
    user_writer.close()


@BAD_PROXY_CONNECTIONS
async def test_a_bad_proxy_connection_never_gets_a_waiting_users_bytes(
    ports: Ports, fake_client: ConnectFake, first_bytes: bytes, reply: bytes
) -> None:
    """Dialling the proxy port is not enough to get the next waiting user, as it is in the Go original."""
    fake = await fake_client(ports)
    _, user_writer, conn_id = await fake.new_user()  # waiting: the fake client has not dialled
    user_writer.write(b"my password\n")
    reader, _ = await fake.dial(first_bytes)
    assert await read_to_eof(reader) == reply  # the error line, and not one byte of the user's
    # The user was left waiting for its own proxy connection, which still gets it.
    proxy_reader, _ = await fake.dial(f"proxy {conn_id}\n".encode())
    assert await read_line(proxy_reader) == b"my password\n"


async def test_the_echo_client_stops_reading_a_user_that_never_reads(client: Ports) -> None:
    """Backpressure: the client echoes no faster than the user reads, instead of buffering the difference."""
    _, writer = await open_connection(client.public)
    limit = 128 * 1024 * 1024
    sent = await send_until_stuck(writer, (b"y" * 1023 + b"\n") * 1024, limit)
    # Socket buffers along the way hold some MB; a client without backpressure takes it all.
    assert sent < limit
    writer.close()


async def test_a_reused_id_is_refused_and_the_first_pairing_keeps_working(
    ports: Ports, fake_client: ConnectFake
) -> None:
    fake = await fake_client(ports)
    reader, writer, conn_id = await fake.new_user()
    proxy_reader, proxy_writer = await fake.dial(f"proxy {conn_id}\n".encode())
    replay_reader, replay_writer = await fake.dial(f"proxy {conn_id}\n".encode())
    assert await read_to_eof(replay_reader) == b"error unknown or expired proxy id\n"
    replay_writer.close()
    writer.write(b"up\n")
    assert await read_line(proxy_reader) == b"up\n"
    proxy_writer.write(b"down\n")
    assert await read_line(reader) == b"down\n"
    writer.close()
    proxy_writer.close()


async def test_a_user_is_closed_at_once_when_no_client_is_connected(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The proxy timeout is longer than our wait: only "no client" can explain the close.
    ports = await start_server(proxy_timeout=STEP_TIMEOUT * 3)
    reader, writer = await open_connection(ports.public)
    assert await read_to_eof(reader) == b""
    writer.close()
    assert "no client connected; closing the public connection" in caplog.text


async def test_a_user_whose_proxy_connection_never_comes_is_closed_after_the_proxy_timeout(
    start_server: StartServer, caplog: pytest.LogCaptureFixture, fake_client: ConnectFake
) -> None:
    ports = await start_server(proxy_timeout=0.3)
    fake = await fake_client(ports)
    reader, writer, conn_id = await fake.new_user()  # the fake client never dials
    assert await read_to_eof(reader) == b""
    writer.close()
    assert f"conn {conn_id[:8]}: no proxy connection within 0.3s; closing" in caplog.text
    # The id died with its user: a late proxy connection naming it is refused.
    late_reader, late_writer = await fake.dial(f"proxy {conn_id}\n".encode())
    assert await read_to_eof(late_reader) == b"error unknown or expired proxy id\n"
    late_writer.close()


async def test_a_second_client_is_refused_while_the_first_keeps_working(client: Ports) -> None:
    with pytest.raises(TunnelError, match="the server refused: another client is already connected"):
        async with asyncio.timeout(STEP_TIMEOUT):
            await Client("127.0.0.1", client.control, client.proxy).run()
    assert await exchange(client.public, b"still mine\n") == b"still mine\n"


async def test_a_new_client_can_connect_once_the_first_one_left(ports: Ports, fake_client: ConnectFake) -> None:
    fake = await fake_client(ports)
    fake.writer.write_eof()  # the first client leaves...
    assert await read_to_eof(fake.reader) == b""  # ...and the server has let go of it
    fake.writer.close()
    async with Background(Client("127.0.0.1", ports.control, ports.proxy).run()):
        await until_echoed(ports.public)


async def test_an_oversized_control_line_gets_an_error_and_a_close(ports: Ports) -> None:
    reader, writer = await open_connection(ports.control)
    writer.write(b"x" * 2000)
    assert await read_to_eof(reader) == b"error line longer than 1024 bytes\n"
    writer.close()


async def test_client_stops_with_a_tunnel_error_when_the_server_goes_away() -> None:
    server = Server()
    ports = await server.listen("127.0.0.1", 0, 0, 0)
    async with Background(server.serve()):
        client = asyncio.create_task(Client("127.0.0.1", ports.control, ports.proxy).run())
        await until_echoed(ports.public)
    # Leaving the block stopped the server: its listeners and connections are closed.
    with pytest.raises(TunnelError, match="the server closed the control connection"):
        async with asyncio.timeout(STEP_TIMEOUT):
            await client


async def test_client_with_no_server_raises_a_tunnel_error() -> None:
    with pytest.raises(TunnelError, match=r"cannot reach the server at 127\.0\.0\.1:\d+"):
        await Client("127.0.0.1", await free_port(), await free_port()).run()


# --- the command lines, as the docs show them -----------------------------------------------


async def start_cli_server(cli: CliProcess.Factory, *extra: str) -> tuple[CliProcess, Ports]:
    server = await cli("-m", "stage_2.server", "--control-port", "0", "--public-port", "0", "--proxy-port", "0", *extra)
    ports = Ports(*[await server.listening(role) for role in ("control", "public", "proxy")])
    return server, ports


async def test_cli_server_and_client_echo_like_nc_and_stop_on_ctrl_c(cli: CliProcess.Factory) -> None:
    server, ports = await start_cli_server(cli)
    client = await cli(
        "-m", "stage_2.client", "127.0.0.1", "--control-port", str(ports.control), "--proxy-port", str(ports.proxy)
    )
    await client.expect("connected to the server at 127.0.0.1")
    await until_echoed(ports.public)
    assert await exchange(ports.public, b"hello\nworld\nstop\nnot echoed\n") == b"hello\nworld\n"
    await server.expect(r"conn [0-9a-f]{8} closed, \d+ bytes up, 12 bytes down")
    await client.expect(r"conn [0-9a-f]{8}: session ended; lines echoed: 2")
    assert await client.interrupt() == 0
    assert await server.interrupt() == 0
    assert "Traceback" not in server.output + client.output


async def test_cli_server_port_in_use_is_one_line_and_exit_1(cli: CliProcess.Factory, ports: Ports) -> None:
    server = await cli("-m", "stage_2.server", "--control-port", "0", "--public-port", str(ports.public))
    assert await server.wait() == 1
    assert server.lines == [
        f"error: port {ports.public} on 127.0.0.1 is already in use; stop the other program or pick another "
        "--public-port"
    ]


async def test_cli_client_with_no_server_is_one_line_and_exit_1(cli: CliProcess.Factory) -> None:
    client = await cli("-m", "stage_2.client", "127.0.0.1", "--control-port", str(await free_port()))
    assert await client.wait() == 1
    assert len(client.lines) == 1
    assert client.lines[0].startswith("error: cannot reach the server at 127.0.0.1:")


async def test_cli_second_client_is_one_line_and_exit_1(cli: CliProcess.Factory, client: Ports) -> None:
    second = await cli(
        "-m", "stage_2.client", "127.0.0.1", "--control-port", str(client.control), "--proxy-port", str(client.proxy)
    )
    assert await second.wait() == 1
    assert second.lines[-1] == "error: the server refused: another client is already connected to this server"
    assert "Traceback" not in second.output


async def test_cli_proxy_timeout_sets_how_long_a_user_waits(cli: CliProcess.Factory, fake_client: ConnectFake) -> None:
    server, ports = await start_cli_server(cli, "--proxy-timeout", "0.2")
    fake = await fake_client(ports)
    reader, writer, conn_id = await fake.new_user()  # the fake client never dials
    assert await read_to_eof(reader) == b""
    writer.close()
    await server.expect(rf"conn {conn_id[:8]}: no proxy connection within 0.2s; closing")


async def test_cli_client_takes_the_control_port_in_server_as_host_port(cli: CliProcess.Factory, ports: Ports) -> None:
    client = await cli("-m", "stage_2.client", f"127.0.0.1:{ports.control}", "--proxy-port", str(ports.proxy))
    await client.expect(f"connected to the server at 127.0.0.1:{ports.control}")
    await until_echoed(ports.public)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["localhost:60623:60623"], "argument SERVER: "),
        (["localhost:99999"], "argument SERVER: "),
        (["localhost:60623", "--control-port", "60623"], "give the control port once"),
        (["--control-port", "0"], "argument --control-port: "),
        (["--proxy-port", "99999"], "argument --proxy-port: "),
        (["--proxy-port", "-5"], "argument --proxy-port: "),
    ],
)
async def test_cli_client_bad_numbers_are_a_one_line_usage_error(
    cli: CliProcess.Factory, args: list[str], error: str
) -> None:
    assert error in await usage_error(cli, "-m", "stage_2.client", *args)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--control-port", "99999"),
        ("--public-port", "-5"),
        ("--proxy-port", "65536"),
        ("--proxy-timeout", "0"),
        ("--proxy-timeout", "-1"),
        ("--proxy-timeout", "nan"),
    ],
)
async def test_cli_server_out_of_range_numbers_are_a_one_line_usage_error(
    cli: CliProcess.Factory, option: str, value: str
) -> None:
    """Not an OverflowError traceback, and not a user who times out before waiting at all."""
    error = await usage_error(cli, "-m", "stage_2.server", option, value)
    assert f"error: argument {option}: " in error and repr(value) in error


@pytest.mark.parametrize(
    ("program", "args"),
    [("server", ["--public-port", "65535", "--proxy-port", "0"]), ("client", ["localhost:1", "--proxy-port", "65535"])],
)
async def test_cli_the_edges_of_each_range_are_accepted(cli: CliProcess.Factory, program: str, args: list[str]) -> None:
    """Range checks must not be off by one: port 1 and port 65535 are real ports (0: any free one)."""
    await accepted(cli, "-m", f"stage_2.{program}", *args)
