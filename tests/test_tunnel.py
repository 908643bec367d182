"""Every tunnel stage (2 and later): what a public user sends reaches the far end and comes back.

Stage 2's client echoes lines itself; from stage 3 on the far end is a real local app (an echo
server here). The payloads are lines ending in a newline, so both far ends return them unchanged.
Every stage from 3 on runs here by existing (TUNNELS); with auth on from stage 11, the path a real
server takes; from stage 14 on through a TCP tunnel, over TLS from stage 16.
"""

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import pytest

from support import (
    STEP_TIMEOUT,
    Background,
    EchoServer,
    all_stages,
    any_ports,
    client_options,
    client_ports,
    exchange,
    make_client,
    make_server,
    open_connection,
    users_port,
)

Starter = Callable[[EchoServer], AbstractAsyncContextManager[int]]


@contextlib.asynccontextmanager
async def stage_2_tunnel(echo_server: EchoServer) -> AsyncIterator[int]:
    """A stage 2 server and client in this process; yields the public port (the client echoes)."""
    # Imported here, so that a learner working on one stage is not stopped by another one.
    from stage_2.client import Client
    from stage_2.server import Server

    server = Server()
    ports = await server.listen("127.0.0.1", 0, 0, 0)
    async with Background(server.serve()), Background(Client("127.0.0.1", ports.control, ports.proxy).run()):
        await wait_until_tunnel_works(ports.public)
        yield ports.public


def private_tunnel(stage: str) -> Starter:
    """A starter for a stage with a private connection (3 and later): its local app is the echo server."""

    @contextlib.asynccontextmanager
    async def start(echo_server: EchoServer) -> AsyncIterator[int]:
        server = make_server(stage)
        ports = await server.listen("127.0.0.1", *any_ports(stage))
        local_app = ("127.0.0.1", echo_server.port)
        client = make_client(stage, local_app, "127.0.0.1", *client_ports(ports), **client_options(stage))
        async with Background(server.serve()), Background(client.run()):
            async with asyncio.timeout(STEP_TIMEOUT):
                await client.connected.wait()  # from stage 3 on: the server has taken the client
            public_port = await users_port(ports, client)
            await wait_until_tunnel_works(public_port)
            yield public_port

    return start


async def wait_until_tunnel_works(public_port: int) -> None:
    """Poll (bounded) until the server has the client: until a user's first line gets an answer.

    Until the server has taken the client's control connection, stages 2 and 3 close a user at once
    without a word (stage 12 on answers an HTTP user with a 502 page, but the client says it is
    connected only once the server took it, and private_tunnel waits for that first). Any answer
    means the tunnel is up: what the answer should be is for the tests to say, by name. So the probe
    neither half-closes (a copy whose half-close is broken still comes up, and the half-close test
    names the fault) nor waits for its line to come back (a copy that cannot reach its local app
    answers this request line with its 502 page). Tries back off from 20 ms to 0.5 s: a tunnel that
    never answers costs about twenty tries in the log, not five hundred.
    """
    delay, tries = 0.02, 0
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            while True:
                tries += 1
                reader, writer = await open_connection(public_port)
                try:
                    writer.write(b"GET /ready HTTP/1.0\r\n")  # a line, and the start of an HTTP request
                    await writer.drain()
                    if await reader.read(1):
                        return
                except OSError:
                    pass  # a reset: no answer either
                finally:
                    writer.close()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
    except TimeoutError:
        raise AssertionError(f"the tunnel never came up: {tries} users in {STEP_TIMEOUT:g} s got no answer") from None


TUNNELS: dict[str, Starter] = {
    "stage_2": stage_2_tunnel,
    # From stage 18 on the client observes every stream into its inspector's store (in-process: no page served).
    **{stage: private_tunnel(stage) for stage in all_stages() if stage not in ("stage_0", "stage_1", "stage_2")},
}


@pytest.fixture(params=list(TUNNELS))
async def tunnel(request: pytest.FixtureRequest, echo_server: EchoServer) -> AsyncIterator[int]:
    """The public port of a running tunnel of one stage, whose far end echoes."""
    async with TUNNELS[request.param](echo_server) as public_port:
        yield public_port


def lines_for(user: int, count: int) -> bytes:
    """`count` lines that only this user sends (a random tag makes a mix-up impossible to miss)."""
    tag = secrets.token_hex(4)
    return b"".join(f"user {user} line {n} {tag}\n".encode() for n in range(count))


async def test_lines_reach_the_far_end_and_come_back(tunnel: int) -> None:
    payload = lines_for(0, 5)
    assert await exchange(tunnel, payload) == payload


async def test_bytes_sent_before_the_tunnel_is_ready_are_not_lost(tunnel: int) -> None:
    """The user speaks first, while the server is still asking the client for a proxy connection."""
    reader, writer = await open_connection(tunnel)
    writer.write(b"said at once\n")  # no await between connect and send
    async with asyncio.timeout(STEP_TIMEOUT):
        assert await reader.readline() == b"said at once\n"
    writer.close()


async def test_two_hundred_users_at_once_each_get_only_their_own_lines(tunnel: int) -> None:
    payloads = [lines_for(user, 5) for user in range(200)]
    replies = await asyncio.gather(*(exchange(tunnel, p) for p in payloads))
    crossed = [user for user, (sent, got) in enumerate(zip(payloads, replies, strict=True)) if sent != got]
    assert crossed == [], f"{len(crossed)} users got someone else's bytes or none, e.g. user {crossed[:3]}"


@pytest.mark.slow
async def test_long_lived_stream_keeps_flowing_while_other_users_come_and_go(tunnel: int) -> None:
    """One user talks both ways for ~2 s (writing and reading at once) while short visits churn."""
    reader, writer = await open_connection(tunnel)
    sent_count, duration = 0, 2.0
    visits: list[bool] = []

    async def talk() -> None:
        nonlocal sent_count
        loop = asyncio.get_running_loop()
        end = loop.time() + duration
        while loop.time() < end:
            writer.write(f"long-lived {sent_count}\n".encode())
            await writer.drain()
            sent_count += 1
            await asyncio.sleep(0.01)
        writer.write_eof()

    async def listen() -> list[bytes]:
        got = []
        while line := await reader.readline():
            got.append(line)
        return got

    async def visit(user: int) -> bool:
        payload = lines_for(user, 3)
        return await exchange(tunnel, payload) == payload

    async def churn(talking: asyncio.Task[None]) -> None:
        # Five short visits at a time, for as long as the long-lived user talks.
        while not talking.done() or len(visits) < 20:
            visits.extend(await asyncio.gather(*(visit(1000 + len(visits) + i) for i in range(5))))

    async with asyncio.timeout(duration + STEP_TIMEOUT):
        talking = asyncio.create_task(talk())
        got, _, _ = await asyncio.gather(listen(), talking, churn(talking))
    writer.close()
    assert got == [f"long-lived {n}\n".encode() for n in range(sent_count)]
    assert sent_count > 10
    assert len(visits) >= 20 and all(visits), f"{visits.count(False)} of {len(visits)} visits went wrong"
