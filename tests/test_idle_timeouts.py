"""Silent connections time out: a relay idle both ways, and a half-closed one whose other direction stays silent.

Either side may enforce them: `ServerSettings(idle_timeout=..., half_closed_timeout=...)` and the
same fields of `ClientSettings` (support.make_server and make_client fill them in); on the command
line `--idle-timeout SECONDS` and `--half-closed-timeout SECONDS` on both programs. Here with small
values; a relay that carries bytes stays open.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from support import (
    STEP_TIMEOUT,
    Background,
    CliProcess,
    EchoServer,
    LocalServer,
    any_ports,
    client_options,
    client_ports,
    make_client,
    make_server,
    open_connection,
    server_flags,
    stages_from,
    users_port,
)

SECRET = "idle-timeout-tests"
TIMEOUT = 1.0  # the small value the tests set
LONG = 60.0  # a timeout that must not be the one that fires

Tunnel = Callable[..., Awaitable[int]]


@pytest.fixture(params=stages_from("limits"))  # the idle timeouts came with the limits
def stage(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def tunnel(stage: str) -> AsyncIterator[Tunnel]:
    """tunnel(local_port, server={...}, client={...}): the stage's server and client in this process.

    Returns the public port.
    """
    async with contextlib.AsyncExitStack() as running:

        async def start(local_port: int, server: dict[str, Any], client: dict[str, Any]) -> int:
            tunnel_server = make_server(stage, secret=SECRET, **server)
            ports = await tunnel_server.listen("127.0.0.1", *any_ports(stage))
            await running.enter_async_context(Background(tunnel_server.serve()))
            local, options = ("127.0.0.1", local_port), client_options(stage)
            tunnel_client = make_client(
                stage, local, "127.0.0.1", *client_ports(ports), secret=SECRET, **client, **options
            )
            await running.enter_async_context(Background(tunnel_client.run()))
            async with asyncio.timeout(STEP_TIMEOUT):
                await tunnel_client.connected.wait()
            return await users_port(ports, tunnel_client)

        yield start


class Mute(LocalServer):
    """A local app that reads everything to EOF and then neither answers nor closes."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
            await asyncio.Event().wait()  # until the test ends (cancelled)
        finally:
            writer.close()


async def closed_after(reader: asyncio.StreamReader) -> float:
    """Seconds until the tunnel ends the user's connection (EOF or reset), bounded."""
    started = time.monotonic()
    async with asyncio.timeout(STEP_TIMEOUT):
        with contextlib.suppress(ConnectionError):
            while await reader.read(64 * 1024):
                pass
    return time.monotonic() - started


def on(side: str, **timeouts: float) -> dict[str, dict[str, float]]:
    """The keyword arguments for the server and the client, with `timeouts` on `side` only."""
    return {"server": timeouts if side == "server" else {}, "client": timeouts if side == "client" else {}}


SIDES = pytest.mark.parametrize("side", ["server", "client"])


@SIDES
async def test_a_relay_silent_both_ways_for_the_idle_timeout_is_closed(tunnel: Tunnel, side: str) -> None:
    async with EchoServer() as app:
        public = await tunnel(app.port, **on(side, idle_timeout=TIMEOUT, half_closed_timeout=LONG))
        reader, writer = await open_connection(public)
        try:
            writer.write(b"hello")
            async with asyncio.timeout(STEP_TIMEOUT):
                assert await reader.readexactly(5) == b"hello"
            silent_for = await closed_after(reader)
        finally:
            writer.close()
    assert silent_for >= TIMEOUT * 0.8, f"closed after {silent_for:.2f} s, before the idle timeout"


@SIDES
async def test_a_relay_that_carries_bytes_outlives_the_idle_timeout(tunnel: Tunnel, side: str) -> None:
    async with EchoServer() as app:
        public = await tunnel(app.port, **on(side, idle_timeout=TIMEOUT, half_closed_timeout=LONG))
        reader, writer = await open_connection(public)
        try:
            for _ in range(int(3 * TIMEOUT / 0.25)):  # three idle timeouts' worth, a byte every 0.25 s
                writer.write(b".")
                async with asyncio.timeout(STEP_TIMEOUT):
                    assert await reader.readexactly(1) == b"."
                await asyncio.sleep(0.25)
        finally:
            writer.close()


@SIDES
async def test_a_half_closed_relay_whose_other_direction_stays_silent_is_closed(tunnel: Tunnel, side: str) -> None:
    # The user sent its request and its EOF; the app read them and says nothing, forever.
    async with Mute() as app:
        public = await tunnel(app.port, **on(side, idle_timeout=LONG, half_closed_timeout=TIMEOUT))
        reader, writer = await open_connection(public)
        try:
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            writer.write_eof()
            silent_for = await closed_after(reader)
        finally:
            writer.close()
    assert silent_for >= TIMEOUT * 0.8, f"closed after {silent_for:.2f} s, before the half-closed timeout"


@pytest.mark.parametrize("program", ["server", "client"])
async def test_both_timeouts_are_command_line_options_checked_for_range(
    cli: CliProcess.Factory, stage: str, program: str
) -> None:
    # A whole command line, so that only the flag under test can make it fail (stage 10's server needs a certificate).
    local = server_flags(stage) if program == "server" else ["127.0.0.1:8000"]
    shown = await cli("-m", f"{stage}.{program}", *local, "--help")
    assert await shown.wait() == 0, shown.output
    for flag in ("--idle-timeout", "--half-closed-timeout"):
        assert flag in shown.output, f"{flag} is not in --help:\n{shown.output}"
        refused = await cli("-m", f"{stage}.{program}", *local, flag, "-1")
        assert await refused.wait() == 2, f"{flag} -1 was not refused as a usage error:\n{refused.output}"
