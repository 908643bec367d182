"""Stage 1, the control connection: `ping` lines are answered by `pong`, and bad input is cut off."""

import asyncio
import re
from collections.abc import AsyncIterator

import pytest

import stage_1.client
from stage_1.client import Client
from stage_1.protocol import TunnelError
from stage_1.server import Server
from support import STEP_TIMEOUT, Background, CliProcess, accepted, free_port, open_connection, usage_error


@pytest.fixture
async def control_port() -> AsyncIterator[int]:
    """The control port of a stage 1 server running in this process."""
    server = Server()
    _, port = await server.listen("127.0.0.1", 0)
    async with Background(server.serve()):
        yield port


async def read_line(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(STEP_TIMEOUT):
        return await reader.readline()


async def assert_still_serving(port: int) -> None:
    """A fresh client still gets its pong: one bad peer did not take the server down."""
    reader, writer = await open_connection(port)
    writer.write(b"ping\n")
    assert await read_line(reader) == b"pong\n"
    writer.close()


async def test_ping_line_gets_pong_line_exactly_as_the_go_original(control_port: int) -> None:
    reader, writer = await open_connection(control_port)
    for _ in range(10):
        writer.write(b"ping\n")
        assert await read_line(reader) == b"pong\n"
    writer.close()


async def test_client_times_ten_round_trips(control_port: int) -> None:
    client = await Client.connect("127.0.0.1", control_port)
    times = [await client.ping() for _ in range(10)]
    await client.close()
    assert len(times) == 10
    assert all(0 < t < STEP_TIMEOUT for t in times)


async def test_concurrent_clients_each_get_their_own_pongs(control_port: int) -> None:
    async def one_client() -> int:
        client = await Client.connect("127.0.0.1", control_port)
        try:
            return len([await client.ping() for _ in range(20)])
        finally:
            await client.close()

    assert await asyncio.gather(*(one_client() for _ in range(30))) == [20] * 30


@pytest.mark.parametrize(
    ("bad_input", "reason"),
    [
        (b"\x00\xff garbage\n", b"error line is not ascii text\n"),
        (b"create_proxy\n", b"error unknown command 'create_proxy'\n"),
        (b"pong\n", b"error unexpected message from a client: Pong()\n"),
        (b"x" * 1024 * 1024, b"error line longer than 1024 bytes\n"),
        # Sent once and the connection kept open: an error now shows the server buffered no more
        # than its line bound (with asyncio's default 64 KiB limit it would still be waiting).
        (b"x" * 2000, b"error line longer than 1024 bytes\n"),
    ],
    ids=["garbage", "unknown-command", "wrong-direction", "1MB-line-without-newline", "2KB-line-without-newline"],
)
async def test_bad_input_gets_an_error_line_and_a_close_while_others_are_served(
    control_port: int, bad_input: bytes, reason: bytes
) -> None:
    # A well-behaved client is connected before and after the bad one.
    good = await Client.connect("127.0.0.1", control_port)
    reader, writer = await open_connection(control_port)
    writer.write(bad_input)
    async with asyncio.timeout(STEP_TIMEOUT):
        reply = await reader.read()  # the server closes: read() returns at EOF
    assert reply == reason
    writer.close()
    assert await good.ping() > 0
    await good.close()
    await assert_still_serving(control_port)


async def test_silent_close_in_the_middle_of_a_line_is_survived(control_port: int) -> None:
    _, writer = await open_connection(control_port)
    writer.write(b"pi")
    writer.close()
    await assert_still_serving(control_port)


async def test_a_client_that_is_done_gets_its_connection_closed(control_port: int) -> None:
    """The client says it is done (EOF); the server answers what it got, then closes its side too."""
    reader, writer = await open_connection(control_port)
    writer.write(b"ping\n")
    writer.write_eof()
    async with asyncio.timeout(STEP_TIMEOUT):
        assert await reader.read() == b"pong\n"  # read() returns at the server's EOF
    writer.close()


async def test_client_gives_up_on_a_server_that_never_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts and then says nothing: the wait for a pong is bounded by NETWORK_TIMEOUT."""
    monkeypatch.setattr(stage_1.client, "NETWORK_TIMEOUT", 0.5)  # a test need not wait the real 5 s
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    async with silent:
        client = await Client.connect("127.0.0.1", silent.sockets[0].getsockname()[1])
        with pytest.raises(TunnelError, match="no pong within"):
            async with asyncio.timeout(STEP_TIMEOUT):
                await client.ping()
        await client.close()


async def test_unreachable_server_is_a_tunnel_error() -> None:
    dead_port = await free_port()
    with pytest.raises(TunnelError, match="cannot reach the server"):
        await Client.connect("127.0.0.1", dead_port)


async def test_cli_server_and_client_show_round_trips_like_ping(cli: CliProcess.Factory) -> None:
    """`python -m stage_1.server` then `python -m stage_1.client`, as the stage 1 page shows (ports 0/found)."""
    server = await cli("-m", "stage_1.server", "--control-port", "0")
    port = await server.listening("control")
    client = await cli("-m", "stage_1.client", "127.0.0.1", "--control-port", str(port), "--interval", "0")
    assert await client.wait() == 0
    rtts = [line for line in client.lines if re.fullmatch(r"pong from 127\.0\.0\.1:\d+: seq=\d+ time=[\d.]+ ms", line)]
    assert len(rtts) == 10
    assert "10 pings sent, 10 pongs received" in client.output
    await server.expect(r"control connection closed")
    assert await server.interrupt() == 0
    assert "Traceback" not in server.output


async def test_cli_count_sets_the_number_of_pings(cli: CliProcess.Factory, control_port: int) -> None:
    client = await cli(
        "-m", "stage_1.client", "127.0.0.1", "--control-port", str(control_port), "--count", "3", "--interval", "0"
    )
    assert await client.wait() == 0
    assert [line.split("seq=")[1].split()[0] for line in client.lines if "seq=" in line] == ["1", "2", "3"]


async def test_cli_client_without_server_is_one_line_and_exit_1(cli: CliProcess.Factory) -> None:
    dead_port = await free_port()
    client = await cli("-m", "stage_1.client", "127.0.0.1", "--control-port", str(dead_port))
    assert await client.wait() == 1
    assert len(client.lines) == 1
    assert client.lines[0].startswith("error: cannot reach the server at 127.0.0.1:")


async def test_cli_server_port_in_use_is_one_line_and_exit_1(cli: CliProcess.Factory, control_port: int) -> None:
    server = await cli("-m", "stage_1.server", "--control-port", str(control_port))
    assert await server.wait() == 1
    # The whole actionable line, not the system's "Address already in use" inside a generic one.
    assert server.lines == [
        f"error: port {control_port} on 127.0.0.1 is already in use; stop the other program or pick another port"
    ]


async def test_cli_client_takes_the_control_port_in_server_as_host_port(
    cli: CliProcess.Factory, control_port: int
) -> None:
    client = await cli("-m", "stage_1.client", f"127.0.0.1:{control_port}", "--count", "2", "--interval", "0")
    assert await client.wait() == 0
    assert f"PING 127.0.0.1:{control_port} over the control connection" in client.output
    assert "2 pings sent, 2 pongs received" in client.output


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["localhost:60623:60623"], "argument SERVER: "),
        (["localhost:99999"], "argument SERVER: "),
        (["localhost:60623", "--control-port", "60623"], "give the control port once"),
        (["--control-port", "0"], "argument --control-port: "),
        (["--control-port", "99999"], "argument --control-port: "),
        (["--count", "0"], "argument --count: "),
        (["--count", "-5"], "argument --count: "),
        (["--interval", "-1"], "argument --interval: "),
        (["--interval", "nan"], "argument --interval: "),
        (["--interval", "inf"], "argument --interval: "),
    ],
)
async def test_cli_client_bad_numbers_are_a_one_line_usage_error(
    cli: CliProcess.Factory, args: list[str], error: str
) -> None:
    """Said before anything is sent: not a lookup of 'localhost:60623:60623', not a port wrapped around."""
    assert error in await usage_error(cli, "-m", "stage_1.client", *args)


@pytest.mark.parametrize("port", ["99999", "65536", "-5"])
async def test_cli_server_out_of_range_port_is_a_one_line_usage_error(cli: CliProcess.Factory, port: str) -> None:
    error = await usage_error(cli, "-m", "stage_1.server", "--control-port", port)
    assert "error: argument --control-port: " in error and repr(port) in error


@pytest.mark.parametrize(
    ("program", "args"),
    [("server", ["--control-port", "65535"]), ("client", ["localhost:65535", "--count", "1", "--interval", "0"])],
)
async def test_cli_the_edges_of_each_range_are_accepted(cli: CliProcess.Factory, program: str, args: list[str]) -> None:
    """Range checks must not be off by one: port 65535 is a real port, an interval of 0 means "no pause"."""
    await accepted(cli, "-m", f"stage_1.{program}", *args)
