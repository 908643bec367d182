"""Stage 3 and later: the private connection. Users of the public port reach a real local app.

Every test here runs against each stage that has the private connection (PRIVATE_STAGES):
stage 3, where it is the one new idea, and every later stage, which must keep it working.
A real server and client run in this process in front of a real HTTP server as the local app;
the command lines run as subprocesses, exactly as the docs tell a learner to run them.
"""

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from support import (
    PAGE,
    STEP_TIMEOUT,
    Background,
    CliProcess,
    EchoServer,
    HttpOrigin,
    all_stages,
    any_ports,
    cli_users_port,
    client_flags,
    client_options,
    client_ports,
    exchange,
    free_port,
    has,
    has_proxy_port,
    http_get,
    make_client,
    make_server,
    open_connection,
    pattern_bytes,
    port_roles,
    server_flags,
    server_port_flags,
    sha256,
    stage_number,
    users_port,
)

# Each stage with a private connection; a new stage joins by being added here.
PRIVATE_STAGES = tuple(stage for stage in all_stages() if stage_number(stage) >= 3)  # numeric order

# Starts a tunnel of the stage in front of a local app on the given port; returns the public port.
StartTunnel = Callable[[int], Awaitable[int]]


@pytest.fixture(params=PRIVATE_STAGES)
def stage(request: pytest.FixtureRequest) -> str:
    """The name of the stage under test."""
    return str(request.param)


@pytest.fixture
async def start_tunnel(stage: str) -> AsyncIterator[StartTunnel]:
    """Start the stage's server and client in this process (no secret: loopback); all stop at the end."""
    # Imported when started (make_server), so that a learner working on one stage is not stopped by another one.
    async with contextlib.AsyncExitStack() as running:

        async def start(local_port: int) -> int:
            server = make_server(stage, secret=None)
            ports = await server.listen("127.0.0.1", *any_ports(stage))
            await running.enter_async_context(Background(server.serve()))
            local = ("127.0.0.1", local_port)
            client = make_client(stage, local, "127.0.0.1", *client_ports(ports), secret=None, **client_options(stage))
            await running.enter_async_context(Background(client.run()))
            async with asyncio.timeout(STEP_TIMEOUT):
                await client.connected.wait()
            return await users_port(ports, client)

        yield start


@pytest.fixture
async def public_port(start_tunnel: StartTunnel, http_origin: HttpOrigin) -> int:
    """The public port of a tunnel whose local app is a real HTTP server."""
    return await start_tunnel(http_origin.port)


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(STEP_TIMEOUT):
        return await reader.read()


# --- the tunnel, in this process --------------------------------------------------------------


async def test_http_get_through_the_public_port_returns_the_local_apps_page(public_port: int) -> None:
    assert await http_get(public_port) == (200, PAGE)


@pytest.mark.slow
async def test_fifty_megabyte_download_arrives_intact(public_port: int) -> None:
    size = 50 * 1024 * 1024
    status, body = await http_get(public_port, f"/bytes/{size}")
    assert status == 200
    assert sha256(body) == sha256(pattern_bytes(size))


@pytest.mark.slow
async def test_fifty_megabyte_upload_arrives_intact(public_port: int) -> None:
    payload = pattern_bytes(50 * 1024 * 1024, seed=3)
    status, body = await http_get(public_port, "/upload", data=payload)  # the origin answers the body's SHA-256
    assert (status, body.decode()) == (200, sha256(payload))


async def test_half_close_travels_end_to_end(start_tunnel: StartTunnel) -> None:
    """The user shuts its write side; the local app sees EOF and still sends its answer after it."""

    async def answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # returns only at EOF: the half-close came all the way
        writer.write(b"got %d bytes, then EOF; " % len(request) + b"x" * 300_000)
        await writer.drain()
        writer.close()

    local_app = await asyncio.start_server(answer_after_eof, "127.0.0.1", 0)
    async with local_app:
        public = await start_tunnel(local_app.sockets[0].getsockname()[1])
        reply = await exchange(public, b"12345")
    assert reply == b"got 5 bytes, then EOF; " + b"x" * 300_000


class Greeter(EchoServer):
    """A local app that speaks first, as an SSH or SMTP server does, then echoes."""

    BANNER = b"SSH-2.0-greeter\r\n"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(self.BANNER)
        await super().handle(reader, writer)


async def test_a_local_app_that_speaks_first_is_heard_by_the_user(start_tunnel: StartTunnel) -> None:
    """The client dials the local app before the proxy connection: the greeting waits for the join."""
    async with Greeter() as app:
        public = await start_tunnel(app.port)
        reader, writer = await open_connection(public)
        async with asyncio.timeout(STEP_TIMEOUT):
            assert await reader.readexactly(len(Greeter.BANNER)) == Greeter.BANNER
        writer.write(b"hello\n")
        writer.write_eof()
        assert await read_to_eof(reader) == b"hello\n"
        writer.close()


async def test_a_local_app_that_is_down_gives_a_502_page_naming_it(start_tunnel: StartTunnel) -> None:
    dead_port = await free_port()
    public = await start_tunnel(dead_port)
    status, body = await http_get(public)
    assert status == 502
    assert b"connection refused" in body
    assert f"127.0.0.1:{dead_port}".encode() in body


async def test_a_user_who_does_not_speak_http_gets_a_clean_close_when_the_app_is_down(
    start_tunnel: StartTunnel,
) -> None:
    public = await start_tunnel(await free_port())
    reader, writer = await open_connection(public)
    writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
    assert await read_to_eof(reader) == b""  # EOF, not a reset (a reset would raise here) and no page
    writer.close()


# --- the command lines --------------------------------------------------------------------------


async def test_cli_server_and_client_serve_the_local_app_and_stop_on_ctrl_c(
    cli: CliProcess.Factory, http_origin: HttpOrigin, stage: str
) -> None:
    """The stage page's recipe: a server, a client in front of the local app, a browser."""
    server = await cli("-m", f"{stage}.server", *server_flags(stage))
    ports = {role: await server.listening(role) for role in port_roles(stage)}
    client = await cli(
        "-m", f"{stage}.client", f"localhost:{http_origin.port}", "127.0.0.1", *client_flags(stage, ports)
    )
    public = await cli_users_port(stage, server, ports)
    await client.expect("tunnel up")
    assert await http_get(public, "/docs") == (200, PAGE)
    assert await client.interrupt() == 0
    assert await server.interrupt() == 0
    assert "Traceback" not in server.output + client.output


async def test_cli_demo_prints_a_public_url_that_serves_the_demo_page(cli: CliProcess.Factory, stage: str) -> None:
    """`python -m stage_N`: zero setup, one command (ports 0 here, so that tests never collide)."""
    demo = await cli("-m", stage, *server_port_flags(stage))
    # From stage 15 on, the demo's tunnels have names: its first URL is http://hello.localhost:PORT/.
    host = r"hello\.localhost" if has(stage, "names") else r"127\.0\.0\.1"
    url, named, port = (await demo.expect(rf"(http://({host}):(\d+)/)")).groups()
    await demo.expect(rf"curl {re.escape(url)}")
    status, body = await http_get(int(port), "/hello/tunnel", host=f"{named}:{port}")
    assert status == 200
    assert re.search(rb"<h1>Hello .*through the tunnel!</h1>", body), body
    assert b"GET /hello/tunnel" in body
    assert await demo.interrupt() == 0
    assert "Traceback" not in demo.output


@pytest.mark.parametrize("local", ["8000", "localhost", "host:port", "localhost:99999"])
async def test_cli_client_bad_local_address_is_a_usage_error(cli: CliProcess.Factory, stage: str, local: str) -> None:
    client = await cli("-m", f"{stage}.client", local)
    assert await client.wait() == 2
    assert "expected host:port" in client.output
    assert "Traceback" not in client.output


@pytest.mark.parametrize(
    ("program", "args"),
    [
        ("server", ["--public-port", "99999"]),
        ("server", ["--control-port", "-5"]),
        ("server", ["--proxy-timeout", "0"]),
        ("client", ["localhost:8000", "--proxy-port", "70000"]),
        ("client", ["localhost:8000", "--control-port", "0"]),
        ("client", ["localhost:8000", "localhost:99999"]),
        ("", ["--app-port", "-1"]),  # the demo
        ("", ["--public-port", "65536"]),
    ],
)
async def test_cli_out_of_range_numbers_are_one_line_usage_errors(
    cli: CliProcess.Factory, stage: str, program: str, args: list[str]
) -> None:
    """A port of 99999 must not end in an OverflowError traceback, nor wrap around to another port."""
    process = await cli("-m", f"{stage}.{program}".rstrip("."), *args)
    assert await process.wait() == 2
    if "--proxy-port" in args and not has_proxy_port(stage):  # from stage 5 on there is none: an unknown flag
        assert "unrecognized arguments: --proxy-port 70000" in process.output, process.output
    elif "--proxy-timeout" in args and has(stage, "streams") and not has(stage, "answers"):
        # Stage 5's server waits for no proxy connection and no answer: stage 6 brings the flag back.
        assert "unrecognized arguments: --proxy-timeout 0" in process.output, process.output
    else:
        assert re.search(r"error: argument [-\w]+: expected a (port|number of seconds)", process.output), process.output
    assert "Traceback" not in process.output


async def test_cli_client_takes_the_control_port_in_server_as_host_port(
    cli: CliProcess.Factory, http_origin: HttpOrigin, stage: str
) -> None:
    server = await cli("-m", f"{stage}.server", *server_flags(stage))
    ports = {role: await server.listening(role) for role in port_roles(stage)}
    control = ports.pop("control")
    client = await cli(
        "-m", f"{stage}.client", f"localhost:{http_origin.port}", f"127.0.0.1:{control}", *client_flags(stage, ports)
    )
    public = await cli_users_port(stage, server, ports)
    await client.expect("tunnel up")
    assert await http_get(public) == (200, PAGE)
