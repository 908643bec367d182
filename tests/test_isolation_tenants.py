"""Strangers and tenants: nobody without the secret, and no tenant with it, can take a tunnel from the others.

Issue 23, "Strangers and tenants", one section per hole, each reproduced as the attacker or the real
client would meet it: real sockets, the stage's real server and client (in this process, or through
the command line), on 127.0.0.1; the multiplexed stages' floods also cross a shaped link (link_lab.py).

- Lockout by a stranger (stages 4-7): wrong answers from the client's address must slow the guesser,
  never make a correctly configured client give up (`busy`, not `error`); a wrong secret of the client
  itself stays a final one-line error.
- Name squatting (stages 6, 7): a source address holds a bounded number of tunnels, and a name comes
  back to the client that held it (its session), even after a longer absence than a heartbeat.
- Control frames (stages 5-7): a peer that floods frames without data (PING|ACK) is cut, with one
  log line, before it can slow anyone else's tunnel.
- Streams (stages 5-7): one source address holds a bounded share of a tunnel's streams, and a
  kept-alive connection left idle is closed after the keep-alive timeout (a long poll is not).
"""

import asyncio
import contextlib
import importlib
import logging
import re
from types import ModuleType
from typing import Any

import pytest
from hardening import HARDENED, stage_module

from support import (
    STEP_TIMEOUT,
    Background,
    CliProcess,
    EchoServer,
    any_ports,
    client_flags,
    client_options,
    client_ports,
    control_connection,
    exchange,
    hello,
    port_roles,
    server_flags,
    server_options,
    users_port,
)

SECRET = "isolation-tests-secret-of-some-length"
WRONG = "a-stranger-guessing-the-secret"
# What a client is told once its address is throttled, and what it logs: a retry, not an exit.
THROTTLED = r"the server says not now: too many wrong secrets from 127\.0\.0\.1; try again in \d+s"
WRONG_SECRET = "error: the server refused the connection: wrong secret; check --secret or NGROK_SECRET on both sides"


@pytest.fixture(autouse=True)
def log_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


def protocol(stage: str) -> ModuleType:
    """The stage's protocol module: its messages, errors, limits and timeouts."""
    return importlib.import_module(f"{stage}.protocol")


class Cable(contextlib.AbstractAsyncContextManager["Cable"]):
    """A TCP cable from a client to the server's control port, which the test can cut (a network outage).

    Every connection through it is relayed byte for byte (TLS too); `cut()` resets them all, as a
    router that reboots does to both ends. New connections are relayed again after a cut.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> "Cable":
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut(self) -> None:
        """Reset every connection through the cable."""
        for writer in self._writers:
            writer.transport.abort()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            far_reader, far_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(far_writer)
        try:
            await asyncio.gather(pipe(reader, far_writer), pipe(far_reader, writer))
        finally:
            for end in (writer, far_writer):
                end.transport.abort()
                self._writers.discard(end)
            self._tasks.discard(task)


async def up(client: Any, running: Background) -> None:
    """Wait (bounded) until `client` holds its tunnel; fail at once, saying why, if it gave up meanwhile."""
    assert running.task is not None
    holding = asyncio.ensure_future(client.connected.wait())
    try:
        await asyncio.wait({holding, running.task}, timeout=STEP_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    finally:
        holding.cancel()
    if running.task.done():
        raise AssertionError(f"the client gave up: {running.task.exception()!r}")
    assert client.connected.is_set(), f"the client did not get in within {STEP_TIMEOUT:g}s"


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF or an error; pass the EOF on."""
    with contextlib.suppress(OSError):
        while data := await reader.read(64 * 1024):
            writer.write(data)
            await writer.drain()
        writer.write_eof()


# --- lockout by a stranger (stages 4-7) -----------------------------------------------------------


async def guess_wrong(stage: str, control_port: int, times: int) -> list[str]:
    """A stranger without the secret answers the challenge `times` times; what the server said to each."""
    auth = stage_module(stage, "auth")
    answers = []
    for _ in range(times):
        reader, writer = await control_connection(stage, control_port)
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                await auth.client_handshake(reader, writer, WRONG, hello(stage))
            answers.append("welcome")
        except protocol(stage).TunnelError as exc:
            answers.append(str(exc))
        finally:
            writer.close()
    return answers


async def test_the_guesser_is_turned_away_with_busy_and_its_wrong_answers_are_errors(stage: str) -> None:
    """The throttle's answer on the wire: `error` for a wrong secret (final), `busy` once the address is throttled."""
    server = stage_module(stage, "server").Server(secret=SECRET, **server_options(stage))
    ports = await server.listen("127.0.0.1", *any_ports(stage))
    async with Background(server.serve()):
        failures = stage_module(stage, "auth").MAX_FAILURES
        answers = await guess_wrong(stage, ports.control, failures + 1)
    assert all("wrong secret" in answer for answer in answers[:failures]), answers
    assert re.fullmatch(
        r"the server says not now: too many wrong secrets from 127\.0\.0\.1; try again in \d+s", answers[-1]
    )


async def test_a_stranger_guessing_from_the_clients_address_never_makes_a_new_client_give_up(
    stage: str, cli: CliProcess.Factory
) -> None:
    """Issue 23: 5 wrong answers from the client's address, and a new client exited 1. It must retry instead."""
    env = {"NGROK_SECRET": SECRET}
    server = await cli("-m", f"{stage}.server", *server_flags(stage), env=env)
    ports = {role: await server.listening(role) for role in port_roles(stage)}
    failures = stage_module(stage, "auth").MAX_FAILURES
    assert all("wrong secret" in answer for answer in await guess_wrong(stage, ports["control"], failures))
    async with EchoServer() as app:
        client = await cli(
            "-m", f"{stage}.client", f"127.0.0.1:{app.port}", "127.0.0.1", *client_flags(stage, ports), env=env
        )
        await client.expect(
            r"the server says not now: too many wrong secrets from 127\.0\.0\.1; try again in \d+s; reconnecting in"
        )
        await client.expect(r"reconnecting in .* \(attempt 2\)")  # and again: it keeps trying
        assert client.process.returncode is None, client.output
        assert "error:" not in client.output and "Traceback" not in client.output


async def test_a_new_client_behind_a_guessers_address_gets_in_once_the_guesser_is_slowed_down(stage: str) -> None:
    """The throttle only slows the guesser: the client it turned away comes in when the window has passed."""
    server = stage_module(stage, "server").Server(secret=SECRET, **server_options(stage))
    server._sessions.throttle = stage_module(stage, "auth").Throttle(window=1.0)  # a short window, for the test
    ports = await server.listen("127.0.0.1", *any_ports(stage))
    async with Background(server.serve()), EchoServer() as app, contextlib.AsyncExitStack() as running:
        failures = stage_module(stage, "auth").MAX_FAILURES
        await guess_wrong(stage, ports.control, failures)
        client = stage_module(stage, "client").Client(
            ("127.0.0.1", app.port), "127.0.0.1", *client_ports(ports), secret=SECRET, max_backoff=0.2,
            **client_options(stage),
        )  # fmt: skip
        await up(client, await running.enter_async_context(Background(client.run())))
        assert await exchange(await users_port(ports, client), b"hello") == b"hello"


async def test_a_connected_client_that_must_reconnect_gets_back_in_whatever_a_stranger_guessed(
    stage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 23: a client that had to reconnect after a stranger's guesses exited 1, and its users got 502."""
    server = stage_module(stage, "server").Server(secret=SECRET, **server_options(stage))
    ports = await server.listen("127.0.0.1", *any_ports(stage))
    async with Background(server.serve()), EchoServer() as app, Cable(ports.control) as cable:
        client = stage_module(stage, "client").Client(
            ("127.0.0.1", app.port), "127.0.0.1", cable.port, *client_ports(ports)[1:], secret=SECRET,
            max_backoff=0.2, **client_options(stage),
        )  # fmt: skip
        async with Background(client.run()) as running:
            await up(client, running)
            public = await users_port(ports, client)
            assert await exchange(public, b"before") == b"before"
            failures = stage_module(stage, "auth").MAX_FAILURES
            await guess_wrong(stage, ports.control, failures)
            cable.cut()  # the client's connection is lost: it must reconnect, from the guesser's address
            async with asyncio.timeout(STEP_TIMEOUT):
                while client.connected.is_set():  # noqa: ASYNC110 (the client's state: no event for "lost")
                    await asyncio.sleep(0.01)
            await up(client, running)
            assert await exchange(public, b"after") == b"after"
            # The throttle still holds for the stranger: the client passed by its session, not by luck.
            assert "not now" in (await guess_wrong(stage, ports.control, 1))[0]


async def test_a_wrong_secret_of_the_client_itself_is_still_final_in_one_line(
    stage: str, cli: CliProcess.Factory
) -> None:
    """Told apart from a throttled address: a client with the wrong secret gives up at once, exit 1, one line."""
    server = await cli("-m", f"{stage}.server", *server_flags(stage), env={"NGROK_SECRET": SECRET})
    ports = {role: await server.listening(role) for role in port_roles(stage)}
    client = await cli(
        "-m", f"{stage}.client", "127.0.0.1:9", "127.0.0.1", *client_flags(stage, ports), env={"NGROK_SECRET": WRONG}
    )
    assert await client.wait() == 1, client.output
    assert (
        client.lines[-1]
        == "error: the server refused the connection: wrong secret; check --secret or NGROK_SECRET on both sides"
    )
    assert "Traceback" not in client.output


@pytest.fixture(params=HARDENED)
def stage(request: pytest.FixtureRequest) -> str:
    """Every stage with auth (4-7); the sections below narrow it where a hole needs more of the stage."""
    return str(request.param)
