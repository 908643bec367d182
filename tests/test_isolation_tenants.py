"""Strangers and tenants: nobody without the secret, and no tenant with it, can take a tunnel from the others.

Issue 23, "Strangers and tenants", one section per hole, each reproduced as the attacker or the real
client would meet it: real sockets, the stage's real server and client (in this process, or through
the command line), on 127.0.0.1; the multiplexed stages' floods also cross a shaped link (link_lab.py).

- Lockout by a stranger (stage 13 on): wrong answers from the client's address must slow the guesser,
  never make a correctly configured client give up (`busy`, not `error`); a wrong secret of the client
  itself stays a final one-line error.
- Name squatting (stage 15 on): a source address holds a bounded number of tunnels, and a name comes
  back to the client that held it (its session), even after a longer absence than a heartbeat.
- Control frames (stage 13 on): a peer that floods frames without data (PING|ACK) is cut, with one
  log line, before it can slow anyone else's tunnel (another tenant's, from stage 14 on).
- Streams (stage 13 on): one source address holds a bounded share of a tunnel's streams, and a
  kept-alive connection left idle is closed after the keep-alive timeout (a long poll is not); a
  TCP tunnel's user (stage 14 on) is not.
"""

import asyncio
import contextlib
import functools
import importlib
import json
import logging
import os
import re
import secrets
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import link_lab
import pytest
from hardening import stage_module
from link_lab import SERVER_IP

import tls_certs
from nat_lab import APP_PORT, CONTROL_PORT, PUBLIC_PORT
from support import (
    STEP_TIMEOUT,
    Background,
    CliProcess,
    EchoServer,
    LocalServer,
    accepted,
    any_ports,
    client_flags,
    client_options,
    client_ports,
    control_connection,
    exchange,
    first_and_last,
    has,
    has_tls,
    has_tunnels,
    hello,
    make_client,
    make_server,
    open_connection,
    pattern_bytes,
    port_roles,
    server_flags,
    sha256,
    stages_from,
    tls_flags,
    until_logged,
    usage_error,
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


@pytest.fixture(params=stages_from("limits"))
def stage(request: pytest.FixtureRequest) -> str:
    """Every stage with the throttle on guesses (12 on): a stranger's guesses; the sections below narrow it."""
    return str(request.param)


# Many clients, each a tunnel of its own (a TCP port), came with stage 14; names, and the bound on
# tunnels per address, with stage 15. Before stage 16 the control connection is plain TCP.
TENANTS = stages_from("tenants")
NAMED = stages_from("names")


@pytest.fixture(params=TENANTS)
def tenant(request: pytest.FixtureRequest) -> str:
    """The stages whose server holds many tunnels, each client's its own (a TCP port)."""
    return str(request.param)


@pytest.fixture(params=NAMED)
def named(request: pytest.FixtureRequest) -> str:
    """The stages whose server holds many tunnels by name, at most MAX_TUNNELS_PER_ADDRESS per address."""
    return str(request.param)


MULTIPLEXED = stages_from("limits")  # the frame budget and the streams per address came with the limits


@pytest.fixture(params=MULTIPLEXED)
def muxed(request: pytest.FixtureRequest) -> str:
    """The stages that carry every user over the client's one connection, as frames."""
    return str(request.param)


def protocol(stage: str) -> ModuleType:
    """The stage's protocol module: its messages, errors, limits and timeouts."""
    return importlib.import_module(f"{stage}.protocol")


class Cable(contextlib.AbstractAsyncContextManager["Cable"]):
    """A TCP cable from a client to the server's control port, which the test can cut (a network outage).

    Every connection through it is relayed byte for byte (TLS too); `cut()` resets them all, as a
    router that reboots does to both ends. While `down`, new connections are reset at once (an outage).
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.down = False
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
        for writer in list(self._writers):
            writer.transport.abort()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        ends = [writer]
        self._writers.add(writer)
        try:
            if self.down:
                return  # reset: nothing gets through an outage
            far_reader, far_writer = await asyncio.open_connection("127.0.0.1", self.target)
            ends.append(far_writer)
            self._writers.add(far_writer)
            await asyncio.gather(pipe(reader, far_writer), pipe(far_reader, writer))
        except OSError:
            pass
        finally:
            for end in ends:
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


async def served(port: int, payload: bytes) -> None:
    """Wait (bounded) until a user's bytes make the round trip through the tunnel's echo app again."""
    async with asyncio.timeout(STEP_TIMEOUT):
        while True:
            with contextlib.suppress(OSError):
                if await exchange(port, payload) == payload:
                    return
            await asyncio.sleep(0.05)  # the client is reconnecting: users get a page or a reset meanwhile


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF or an error; pass the EOF on."""
    with contextlib.suppress(OSError):
        while data := await reader.read(64 * 1024):
            writer.write(data)
            await writer.drain()
        writer.write_eof()


# --- lockout by a stranger (stage 13 on) -----------------------------------------------------------


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
    server = make_server(stage, secret=SECRET)
    ports = await server.listen("127.0.0.1", *any_ports(stage))
    async with Background(server.serve()):
        failures = stage_module(stage, "auth").MAX_FAILURES
        answers = await guess_wrong(stage, ports.control, failures + 1)
    assert all("wrong secret" in answer for answer in answers[:failures]), answers
    assert re.fullmatch(THROTTLED, answers[-1]), answers


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
        local = f"127.0.0.1:{app.port}"
        client = await cli("-m", f"{stage}.client", local, "127.0.0.1", *client_flags(stage, ports), env=env)
        await client.expect(THROTTLED + "; reconnecting in")
        await client.expect(r"reconnecting in .* \(attempt 2\)")  # and again: it keeps trying
        assert client.process.returncode is None, client.output
        assert "error:" not in client.output and "Traceback" not in client.output


async def test_a_new_client_behind_a_guessers_address_gets_in_once_the_guesser_is_slowed_down(stage: str) -> None:
    """The throttle only slows the guesser: the client it turned away comes in when the window has passed."""
    server = make_server(stage, secret=SECRET)
    server._sessions.throttle = stage_module(stage, "auth").Throttle(window=1.0)  # a short window, for the test
    ports = await server.listen("127.0.0.1", *any_ports(stage))
    async with Background(server.serve()), EchoServer() as app, contextlib.AsyncExitStack() as running:
        failures = stage_module(stage, "auth").MAX_FAILURES
        await guess_wrong(stage, ports.control, failures)
        client = make_client(
            stage, ("127.0.0.1", app.port), "127.0.0.1", *client_ports(ports), secret=SECRET, max_backoff=0.2,
            **client_options(stage),
        )  # fmt: skip
        await up(client, await running.enter_async_context(Background(client.run())))
        assert await exchange(await users_port(ports, client), b"hello") == b"hello"


async def test_a_connected_client_that_must_reconnect_gets_back_in_whatever_a_stranger_guessed(
    stage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 23: a client that had to reconnect after a stranger's guesses exited 1, and its users got 502."""
    server = make_server(stage, secret=SECRET)
    ports = await server.listen("127.0.0.1", *any_ports(stage))
    async with Background(server.serve()), EchoServer() as app, Cable(ports.control) as cable:
        client = make_client(
            stage, ("127.0.0.1", app.port), "127.0.0.1", cable.port, *client_ports(ports)[1:], secret=SECRET,
            max_backoff=0.2, **client_options(stage),
        )  # fmt: skip
        async with Background(client.run()) as running:
            await up(client, running)
            public = await users_port(ports, client)
            assert await exchange(public, b"before") == b"before"
            failures = stage_module(stage, "auth").MAX_FAILURES
            await guess_wrong(stage, ports.control, failures)
            cable.cut()  # the client's connection is lost: it must reconnect, from the guesser's address
            await until_logged(caplog, r"reconnecting in")
            await served(public, b"after")
            assert running.task is not None and not running.task.done(), "the client gave up"
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
    assert client.lines[-1] == WRONG_SECRET
    assert "Traceback" not in client.output


# --- name squatting (stage 15 on) -----------------------------------------------------------------


async def ask(stage: str, control_port: int, tunnel: str | None, secret: str | None, source: str = "127.0.0.1") -> str:
    """Ask for HTTP tunnel `tunnel` by hand from the address `source`, then hang up: what the server said.

    'welcome NAME', or the error the stage's client would raise ('the server says not now: ...').
    """
    protocol_module, auth = protocol(stage), stage_module(stage, "auth")
    tls = tls_certs.client_context() if has_tls(stage) else None  # TLS from stage 16 on
    async with asyncio.timeout(STEP_TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", control_port, ssl=tls, local_addr=(source, 0))
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            welcome = await auth.client_handshake(reader, writer, secret, protocol_module.Hello("http", tunnel))
        return f"welcome {welcome.tunnel}"
    except protocol_module.TunnelError as exc:
        return str(exc)
    finally:
        writer.close()


@pytest.mark.parametrize("secret", [None, SECRET], ids=["no secret", "a tenant with the secret"])
async def test_one_address_holds_a_bounded_number_of_names_even_holding_no_connection(
    named: str, secret: str | None
) -> None:
    """Issue 23: connecting and leaving, one address took all 1024 names in 1.5 s (2.6 s with the secret)."""
    server = make_server(named, secret=secret)
    ports = await server.listen("127.0.0.1", 0, 0)
    bound = protocol(named).MAX_TUNNELS_PER_ADDRESS
    async with Background(server.serve()):
        answers = [await ask(named, ports.control, f"squat{n}", secret) for n in range(bound + 1)]
        assert answers[:bound] == [f"welcome squat{n}" for n in range(bound)]  # kept for their (gone) client
        full = f"the server says not now: 127.0.0.1 holds {bound} tunnels on this server, the most one address may"
        assert answers[bound] == full
        # Another address is not held back by that one: it still gets a name.
        assert await ask(named, ports.control, "legit", secret, source="127.0.0.2") == "welcome legit"
        assert len(server.tunnels()) == bound + 1


async def test_a_client_behind_a_squatters_address_waits_for_a_kept_tunnel_to_end_instead_of_giving_up(
    named: str,
) -> None:
    """The per-address bound says `busy`: the address may be a NAT shared with the squatter, whose kept
    tunnels end with their window; a correctly configured client behind it retries, and gets in."""
    server = make_server(named, secret=SECRET, resume_window=1.0)
    ports = await server.listen("127.0.0.1", 0, 0)
    bound = protocol(named).MAX_TUNNELS_PER_ADDRESS
    async with Background(server.serve()), EchoServer() as app:
        for n in range(bound):
            assert await ask(named, ports.control, f"squat{n}", SECRET) == f"welcome squat{n}"
        client = make_client(
            named, ("127.0.0.1", app.port), "127.0.0.1", ports.control, secret=SECRET, max_backoff=0.2,
            **client_options(named),
        )  # fmt: skip
        async with Background(client.run()) as running:
            await up(client, running)
            assert await exchange(await users_port(ports, client), b"in") == b"in"


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("named", first_and_last(NAMED))  # 32 s of waiting each: the first stage and the last
async def test_a_client_away_longer_than_a_heartbeat_and_half_a_minute_gets_its_name_back_not_a_squatter(
    named: str,
) -> None:
    """Issue 23: a client away 45 s (heartbeat timeout + a 30 s resume window) lost its name to a squatter,
    and exited 1 when it came back. With the server's defaults, the name now waits for its client.

    The link is cut at once here (both ends see a reset), so the server keeps the tunnel from the first
    second: 32 s away is past the old window. A squatter, a tenant with the secret, asks every second."""
    away = 32.0
    server = make_server(named, secret=SECRET)
    ports = await server.listen("127.0.0.1", 0, 0)
    async with Background(server.serve()), EchoServer() as app, Cable(ports.control) as cable:
        client = make_client(
            named, ("127.0.0.1", app.port), "127.0.0.1", cable.port, secret=SECRET, max_backoff=1.0, name="myapp",
            **{**client_options(named), "tcp": False},
        )  # fmt: skip
        async with Background(client.run()) as running:
            await up(client, running)
            session_id = client.session_id
            cable.down = True
            cable.cut()  # the client is away: its link is down, and stays down
            started, answers = time.monotonic(), []
            while time.monotonic() - started < away:
                answers.append(await ask(named, ports.control, "myapp", SECRET))
                if answers[-1].startswith("welcome"):
                    break
                await asyncio.sleep(1.0)
            assert not any(answer.startswith("welcome") for answer in answers), f"a squatter got the name: {answers}"
            assert re.search(r"the name 'myapp' is taken \(kept \d+s more for the client that held it\)", answers[-1])
            cable.down = False  # back: the client reconnects with its session id
            await served_by_name(ports.public, "myapp")
            assert running.task is not None and not running.task.done(), "the client gave up"
            assert client.session_id == session_id  # the same session: resumed, not a new one


async def served_by_name(public_port: int, name: str) -> None:
    """Wait (bounded) until a user of http://NAME.localhost/ reaches the tunnel's echo app."""
    request = f"GET / HTTP/1.0\r\nHost: {name}.localhost:{public_port}\r\n\r\n".encode()
    async with asyncio.timeout(STEP_TIMEOUT):
        while True:
            with contextlib.suppress(OSError):
                # Echoed: the app, not a 502 page (from stage 20 on, with the server's X-Forwarded-* lines in it).
                if (await exchange(public_port, request)).startswith(request.removesuffix(b"\r\n")):
                    return
            await asyncio.sleep(0.05)


async def test_the_bound_on_tunnels_per_address_is_an_option_checked_for_range(
    named: str, cli: CliProcess.Factory
) -> None:
    """`--max-tunnels-per-address N`, from 1 to MAX_TUNNELS: an office behind one NAT may need more."""
    command = ("-m", f"{named}.server", *server_flags(named))
    most = protocol(named).MAX_TUNNELS
    for wrong in ("0", str(most + 1), "-3", "many"):
        error = await usage_error(cli, *command, "--max-tunnels-per-address", wrong)
        assert f"expected a whole number from 1 to {most}, got {wrong!r}" in error
    await accepted(cli, *command, "--max-tunnels-per-address", "64")


# --- one tenant slows every tunnel: frames without data (stage 13 on) --------------------------------

# What the server says (GO_AWAY) to a peer it cuts for a flood.
FLOODED = "the client sends more frames without data than ours call for (a flood)"
FLOOD = 200_000  # PING|ACK frames (3.6 MB): a flood the server cuts after about a thousand
BATCH = 2_000


@dataclass
class Flood:
    """What a peer that floods frames without data saw: frames sent, whether the server cut it, and why."""

    sent: int
    cut: bool
    reason: str


Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def flood_pings(stage: str, connect: Connect, secret: str = SECRET) -> Flood:
    """Get in as a client (with the secret), then send PING|ACK frames nobody asked for, as fast as the socket
    takes them: up to FLOOD, or until the server closes the connection."""
    frames = stage_module(stage, "frames")
    reader, writer = await connect()
    async with asyncio.timeout(STEP_TIMEOUT):
        await stage_module(stage, "auth").client_handshake(reader, writer, secret, hello(stage))
    received = asyncio.ensure_future(read_until_closed(reader))
    batch = frames.encode(frames.PING, frames.ACK, 0, bytes(frames.PING_SIZE)) * BATCH
    sent, reset = 0, False
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            while sent < FLOOD and not received.done():
                writer.write(batch)
                await writer.drain()
                sent += BATCH
    except OSError:
        reset = True  # reset while we were still writing: cut
    with contextlib.suppress(TimeoutError):  # a server that took it all may still cut it: a moment
        await asyncio.wait_for(asyncio.shield(received), 1.0)
    writer.transport.abort()
    cut = reset or received.done()
    data = received.result() if received.done() else b""
    received.cancel()
    go_away = data.find(bytes([frames.GO_AWAY]) + bytes(5))  # type GO_AWAY, no flags, stream 0
    reason = data[go_away + frames.HEADER_SIZE :].decode("ascii", "replace") if go_away >= 0 else ""
    return Flood(sent, cut, reason)


async def round_trip(port: int, data: bytes) -> bytes:
    """Send `data` through an echo while reading the echo back (writing it all first would deadlock on
    megabytes: the echo stops reading while nobody reads its answer), then half-close; return what came back."""
    reader, writer = await open_connection(port)

    async def send() -> None:
        writer.write(data)
        await writer.drain()
        writer.write_eof()

    try:
        async with asyncio.timeout(STEP_TIMEOUT * 3):
            _, echoed = await asyncio.gather(send(), reader.read())
        return echoed
    finally:
        writer.close()


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (EOF or reset)."""
    data = bytearray()
    with contextlib.suppress(OSError):
        while chunk := await reader.read(64 * 1024):
            data += chunk
    return bytes(data)


async def test_a_peer_flooding_frames_without_data_is_cut_with_one_log_line(
    muxed: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 23: a client flooding PING|ACK (parsed, never limited) took the server to 100 % CPU."""
    server = make_server(muxed, secret=SECRET)
    ports = await server.listen("127.0.0.1", *any_ports(muxed))
    async with Background(server.serve()):
        flood = await flood_pings(muxed, functools.partial(control_connection, muxed, ports.control))
        assert flood.cut, f"the server took {flood.sent} PING|ACK frames and kept the connection"
        assert flood.reason == FLOODED
        await until_logged(caplog, r"a flood\); closing")
        assert len(re.findall(r"a flood", caplog.text)) == 1, caplog.text


async def test_another_tunnel_serves_on_while_a_tenant_floods(tenant: str, caplog: pytest.LogCaptureFixture) -> None:
    """Two tenants: one floods, the other's users are served all along, and its client is never cut."""
    server = make_server(tenant, secret=SECRET)
    ports = await server.listen("127.0.0.1", 0, 0)
    async with Background(server.serve()), EchoServer() as app:
        client = make_client(
            tenant, ("127.0.0.1", app.port), "127.0.0.1", ports.control, secret=SECRET, **client_options(tenant)
        )
        async with Background(client.run()) as running:
            await up(client, running)
            public = await users_port(ports, client)
            connect = functools.partial(control_connection, tenant, ports.control)
            flooding = asyncio.ensure_future(flood_pings(tenant, connect))
            while not flooding.done():
                assert await exchange(public, b"served") == b"served"
            assert (await flooding).cut
            assert await exchange(public, b"after") == b"after"
    assert "reconnecting" not in caplog.text


async def test_what_a_real_client_sends_is_covered_by_what_the_servers_frames_call_for(
    muxed: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget follows the work, not the clock: with almost no slack left (a burst of 10, 1 a second),
    16 MiB each way (a WINDOW per 256 KiB) and 1500 users in bursts of 100 (an ACK and a FIN each) never
    make either side cut the other. A budget that counted only time would cut this client."""
    mux = stage_module(muxed, "mux")
    monkeypatch.setattr(mux, "CONTROL_BURST", 10)
    monkeypatch.setattr(mux, "CONTROL_RATE", 1)
    server = make_server(muxed, secret=SECRET)
    ports = await server.listen("127.0.0.1", *any_ports(muxed))
    async with Background(server.serve()), EchoServer() as app:
        client = make_client(
            muxed, ("127.0.0.1", app.port), "127.0.0.1", ports.control, secret=SECRET, **client_options(muxed)
        )
        async with Background(client.run()) as running:
            await up(client, running)
            public = await users_port(ports, client)
            bulk = pattern_bytes(16 * 1024 * 1024)  # first, on a fresh connection: 64 WINDOWs each way
            assert sha256(await round_trip(public, bulk)) == sha256(bulk)
            for burst in range(15):
                payloads = [f"user {burst}-{n}".encode() for n in range(100)]
                assert await asyncio.gather(*(exchange(public, payload) for payload in payloads)) == payloads
    assert "a flood" not in caplog.text and "reconnecting" not in caplog.text


# --- one source fills a tunnel's streams (stage 13 on) ---------------------------------------------

SLOW = 2.5  # seconds the app takes to answer GET /slow: a long poll, longer than the tests' keep-alive timeout


class KeepAliveApp(LocalServer):
    """A local HTTP/1.1 app that answers every request of a connection and keeps it open; /slow answers late."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                if head.startswith(b"GET /slow "):
                    await asyncio.sleep(SLOW)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


@dataclass(frozen=True)
class HttpTunnel:
    """Where the users of an HTTP tunnel go: the public port, and the Host header that names the tunnel."""

    port: int
    host: str


@contextlib.asynccontextmanager
async def http_tunnel(stage: str, local_port: int, **server: Any) -> AsyncIterator[HttpTunnel]:
    """The stage's server and client in this process, with an HTTP tunnel to `local_port`: the public port
    of stage 13 (its one client's) and of stage 14 (the first client's: this one, not a TCP tunnel), or a
    named tunnel from stage 15 on (users name it in their Host header: the public port routes by it)."""
    tunnel_server = make_server(stage, secret=SECRET, **server)
    ports = await tunnel_server.listen("127.0.0.1", *any_ports(stage))
    http: dict[str, Any] = {"tcp": False} if has_tunnels(stage) else {}
    if has(stage, "names"):
        http["name"] = "app"
    client = make_client(
        stage, ("127.0.0.1", local_port), "127.0.0.1", ports.control, secret=SECRET, **{**client_options(stage), **http}
    )
    async with Background(tunnel_server.serve()), Background(client.run()) as running:
        await up(client, running)
        yield HttpTunnel(ports.public, f"app.localhost:{ports.public}" if "name" in http else "localhost")


async def get_kept_alive(
    tunnel: HttpTunnel, path: str = "/", source: str = "127.0.0.1"
) -> tuple[int, bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """An HTTP/1.1 GET from `source` that keeps its connection: (status, body, and the open connection)."""
    async with asyncio.timeout(STEP_TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", tunnel.port, local_addr=(source, 0))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {tunnel.host}\r\n\r\n".encode())
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
            body = await reader.readexactly(int(length[1])) if length else await reader.read()
    except (OSError, asyncio.IncompleteReadError):
        writer.close()
        return 0, b"", reader, writer
    return int(head.split(b" ", 2)[1]), body, reader, writer


async def test_one_source_holds_at_most_its_share_of_a_tunnels_streams(muxed: str) -> None:
    """Issue 23: one source opened 4200 kept-alive connections in 2.3 s, held all 4096 streams of the tunnel,
    and every later user got a 502 for the 600 s idle timeout. Here it gets its share; the rest a 503."""
    bound = protocol(muxed).MAX_STREAMS_PER_ADDRESS
    async with KeepAliveApp() as app, http_tunnel(muxed, app.port) as tunnel:
        gate, held = asyncio.Semaphore(64), []

        async def flood() -> tuple[int, bytes]:
            async with gate:
                status, body, _, writer = await get_kept_alive(tunnel)
            if status == 200:
                held.append(writer)  # kept open: a kept-alive connection holds its stream
            else:
                writer.close()
            return status, body

        try:
            answers = await asyncio.gather(*(flood() for _ in range(bound + 8)))
            statuses = sorted(status for status, _ in answers)
            assert statuses == [200] * bound + [503] * 8, f"{statuses.count(200)} held, {statuses.count(503)} refused"
            refusals = [body for status, body in answers if status == 503]
            assert all(b"too many connections from 127.0.0.1 at once" in body for body in refusals)
            # Any other address still gets in, and the flooding one again once it closes some.
            status, _, _, writer = await get_kept_alive(tunnel, source="127.0.0.2")
            writer.close()
            assert status == 200
            for writer in held[:8]:
                writer.transport.abort()
            async with asyncio.timeout(STEP_TIMEOUT):
                while True:  # the share comes back as the server sees those connections end
                    status, _, _, writer = await get_kept_alive(tunnel)
                    writer.close()
                    if status == 200:
                        break
        finally:
            for writer in held:
                writer.transport.abort()


async def test_a_user_silent_after_its_answer_is_closed_after_the_keepalive_timeout_but_a_long_poll_is_not(
    muxed: str,
) -> None:
    """nginx's keepalive_timeout: a kept-alive connection whose answer came, silent for it, is closed; one still
    waiting for its answer (a long poll, here SLOW s) keeps the idle timeout (600 s)."""
    keepalive = 1.0
    async with KeepAliveApp() as app, http_tunnel(muxed, app.port, keepalive_timeout=keepalive) as tunnel:

        async def silent_after_answer(path: str) -> tuple[int, float, float]:
            started = time.monotonic()
            status, _, reader, writer = await get_kept_alive(tunnel, path)
            answered = time.monotonic()
            try:
                async with asyncio.timeout(STEP_TIMEOUT):  # then say nothing, and see when the tunnel closes it
                    with contextlib.suppress(OSError):
                        await reader.read()
            finally:
                writer.close()
            return status, answered - started, time.monotonic() - answered

        (status, _, idle), (slow_status, waited, slow_idle) = await asyncio.gather(
            silent_after_answer("/"), silent_after_answer("/slow")
        )
    assert status == 200 and keepalive * 0.8 <= idle < STEP_TIMEOUT, idle
    assert slow_status == 200 and waited >= SLOW, f"the long poll was cut after {waited:.2f} s"
    assert keepalive * 0.8 <= slow_idle < STEP_TIMEOUT, slow_idle


async def test_a_tcp_tunnels_user_is_not_closed_by_the_keepalive_timeout(tenant: str) -> None:
    """The keep-alive timeout is HTTP's: a TCP tunnel's user (an ssh session) may stay quiet for minutes."""
    server = make_server(tenant, secret=SECRET, keepalive_timeout=0.5)
    ports = await server.listen("127.0.0.1", 0, 0)
    async with Background(server.serve()), EchoServer() as app:
        client = make_client(
            tenant, ("127.0.0.1", app.port), "127.0.0.1", ports.control, secret=SECRET, **client_options(tenant)
        )
        async with Background(client.run()) as running:
            await up(client, running)
            reader, writer = await open_connection(await users_port(ports, client))
            try:
                for word in (b"hello", b"still here"):
                    writer.write(word)
                    async with asyncio.timeout(STEP_TIMEOUT):
                        assert await reader.readexactly(len(word)) == word
                    await asyncio.sleep(1.5)  # three keep-alive timeouts of silence, after an answer
            finally:
                writer.close()


async def test_the_stream_bounds_are_options_checked_for_range(muxed: str, cli: CliProcess.Factory) -> None:
    """`--max-streams-per-address N` (1 to MAX_STREAMS) and `--keepalive-timeout SECONDS` (above 0)."""
    command = ("-m", f"{muxed}.server", *server_flags(muxed))
    most = protocol(muxed).MAX_STREAMS
    for wrong in ("0", str(most + 1), "-1", "all"):
        error = await usage_error(cli, *command, "--max-streams-per-address", wrong)
        assert f"expected a whole number from 1 to {most}, got {wrong!r}" in error
    for wrong in ("0", "-75", "inf", "soon"):
        error = await usage_error(cli, *command, "--keepalive-timeout", wrong)
        assert f"expected a number of seconds above 0, got {wrong!r}" in error
    await accepted(cli, *command, "--max-streams-per-address", "1024", "--keepalive-timeout", "30")


# --- the floods on a shaped link (link_lab.py) ----------------------------------------------------

HERE = Path(__file__).resolve()
LAB_REASON = link_lab.probe()
LINK_FLOODS = 10  # times the flooder gets in and floods, each cut
LINK_SIZE = 64 * 1024 * 1024  # what the other tunnel moves meanwhile: ~2 s of the link


async def start_lab_tunnel(lab: link_lab.LinkLab, stage: str, env: dict[str, str]) -> tuple[Any, Any, int]:
    """The stage's server on the server host and its client at home (a TCP tunnel from stage 14 on); the port
    its users connect to."""
    ports = {role: port for role, port in (("control", CONTROL_PORT), ("public", PUBLIC_PORT))}
    flags = [flag for role, port in ports.items() for flag in (f"--{role}-port", str(port))] + tls_flags(stage)
    server = await lab.start("server", "server", "-m", f"{stage}.server", "--host", SERVER_IP, *flags, env=env)
    await server.expect(rf"public port listening on {re.escape(SERVER_IP)}:{PUBLIC_PORT}")
    local = f"127.0.0.1:{APP_PORT}"
    control = {"control": CONTROL_PORT}
    client = await lab.start(
        "home", "client", "-m", f"{stage}.client", local, SERVER_IP, *client_flags(stage, control), env=env
    )
    await client.expect(r"tunnel up")
    if not has_tunnels(stage):
        return server, client, PUBLIC_PORT
    tunnel = re.search(r"tcp port listening on \S+:(\d+)", await server.expect(r"tcp port listening on"))
    assert tunnel is not None
    return server, client, int(tunnel[1])


@pytest.mark.slow
@pytest.mark.skipif(LAB_REASON is not None, reason=f"link lab: {LAB_REASON}")
@pytest.mark.timeout(120)
async def test_on_a_shaped_link_a_flooding_tenant_is_cut_each_time_and_another_tunnel_moves_its_bytes(
    muxed: str,
) -> None:
    """The flood crosses a real link (250 Mbit/s, link_lab.py) from a host that also runs a legitimate client
    (stage 14 on: a TCP tunnel moving LINK_SIZE bytes to a user on the server host meanwhile). The flooder gets
    in LINK_FLOODS times and is cut each time; the other tunnel's bytes all arrive and its client never
    reconnects. (Stage 13 has one tunnel: there the flooder is its client.)"""
    env = {"NGROK_SECRET": secrets.token_urlsafe(16)}
    lines: list[str] = []
    async with link_lab.LinkLab(say=lines.append) as lab:
        others: list[Any] = []
        if has_tunnels(muxed):
            app = await lab.peer("home", "app", "--listen", f"127.0.0.1:{APP_PORT}", "--send", str(LINK_SIZE))
            await app.expect("listening")
            server, client, port = await start_lab_tunnel(lab, muxed, env)
            user = await lab.peer("server", "user", "--connect", f"{SERVER_IP}:{port}", "--receive")
            others = [app, user]
        else:
            ports = [f"--{role}-port" for role in ("control", "public")]
            flags = [ports[0], str(CONTROL_PORT), ports[1], str(PUBLIC_PORT)]
            server = await lab.start("server", "server", "-m", f"{muxed}.server", "--host", SERVER_IP, *flags, env=env)
            await server.expect(rf"control port listening on {re.escape(SERVER_IP)}:{CONTROL_PORT}")
        ca = str(tls_certs.certs().ca) if has_tls(muxed) else "-"
        flooder = await lab.start(
            "home", "flooder", str(HERE), "flood", muxed, SERVER_IP, str(CONTROL_PORT),
            str(LINK_FLOODS), ca, env=env,
        )  # fmt: skip
        async with asyncio.timeout(90):
            await asyncio.gather(*(process.process.wait() for process in (flooder, *others)))
        for process in (flooder, *others):
            await process.stop()  # exited: this reads the rest of its output
        transcript = "\n".join(lines + [process.output for process in lab.processes])
        results = [line for line in flooder.lines if line.startswith("{")]
        assert results, transcript
        floods = json.loads(results[-1])
        assert floods["cuts"] == LINK_FLOODS, transcript
        # The reason (GO_AWAY) may be lost: the flooder's bytes still unread when the server closes make
        # its kernel answer with a reset. The log line is what counts.
        assert set(floods["reasons"]) <= {FLOODED, ""}, transcript
        assert sum("a flood); closing" in line for line in server.lines) == LINK_FLOODS, transcript
        if others:
            sent, received = (link_lab.result(process) for process in others)
            assert received["received"] == LINK_SIZE and received["received_sha256"] == sent["sent_sha256"], transcript
            assert not any("reconnecting" in line for line in client.lines), transcript


def flood_main(argv: list[str]) -> int:
    """python tests/test_isolation_tenants.py flood STAGE HOST PORT TIMES CA: the link test's flooding tenant.

    Gets in TIMES times with $NGROK_SECRET (over TLS, trusting CA, from stage 16 on; CA '-' before) and floods
    PING|ACK each time until the server cuts it. Prints one JSON line: the cuts, and the reasons the server gave.
    """
    stage, host, port, times, ca = argv[0], argv[1], int(argv[2]), int(argv[3]), argv[4]
    context = ssl.create_default_context(cafile=ca) if ca != "-" else None

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with asyncio.timeout(STEP_TIMEOUT):
            return await asyncio.open_connection(host, port, ssl=context)

    async def floods() -> list[Flood]:
        return [await flood_pings(stage, connect, os.environ["NGROK_SECRET"]) for _ in range(times)]

    done = asyncio.run(floods())
    reasons = sorted({flood.reason for flood in done})
    print(json.dumps({"cuts": sum(flood.cut for flood in done), "reasons": reasons}), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["flood"]:
        sys.exit(
            "usage: python tests/test_isolation_tenants.py flood STAGE HOST PORT TIMES CA (the link test's flooder)"
        )
    sys.exit(flood_main(sys.argv[2:]))
