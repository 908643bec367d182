"""Backpressure holds from a user's first byte: the tunnel's memory stays bounded, whatever the peers' speeds.

In one process, deterministic: the stage's Server and Client, a user and a local app on raw
sockets (so the test's own side buffers nothing), and Python's allocations traced (tracemalloc).
Between the client and the server's proxy port (from stage 8 on: its control port, which carries
every user's bytes) runs a narrow pipe: sockets with 16 KiB buffers,
as a slow link would have, where loopback would absorb a megabyte per connection and hide a
sender that outruns its peer. The same bug on a real shaped link: test_real_links.py.
"""

import asyncio
import contextlib
import hashlib
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
from hardening import MiB, stage_module

from support import (
    STEP_TIMEOUT,
    Background,
    LocalServer,
    any_ports,
    client_handshake,
    client_options,
    client_ports,
    control_connection,
    first_and_last,
    has_tunnels,
    hello,
    make_client,
    make_server,
    pattern_bytes,
    stages_from,
    users_port,
)

SECRET = "backpressure-tests"
SMALL = 16 * 1024  # the socket buffers of the narrow pipe and of the local app
MSS = 1448  # TCP's segment size on an Ethernet link
UPLOAD = 256 * MiB  # on the stage that brings flow control and on the most complete one
# The lighter form, on the stages between: the same stall and bounds with 96 MiB, three times LIMIT, so a
# tunnel that does not hold the user back still holds more than LIMIT or lets the upload finish.
LIGHT_UPLOAD = 96 * MiB
LIMIT = 32 * MiB  # what the tunnel (server and client together) may hold for one stalled user
STALLED = 1.0  # a sender that got nothing out for this long is held back
CHUNK = 64 * 1024
BLOCK = memoryview(pattern_bytes(1024 * 1024 - 3, seed=7))


@pytest.fixture(params=stages_from("flow"))  # flow control brings backpressure
def stage(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def traced() -> Iterator[None]:
    """Trace Python's allocations during the test (tracemalloc): the tunnel's buffers are Python objects."""
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def small_buffers(sock: socket.socket) -> None:
    # Set before listen/connect: the receive buffer also sets the window TCP offers the peer, and
    # the segment size (an Ethernet's, not loopback's 64 KiB) sets how fast the peer's kernel
    # lets its send buffer grow: like a real network, it takes ~100 KB at first, not a megabyte.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, MSS)


class NarrowPipe(LocalServer):
    """Forwards every connection to `target` through sockets with 16 KiB buffers: a slow link, in one process."""

    def __init__(self, target: int) -> None:
        super().__init__()
        self.target = target

    async def __aenter__(self) -> "NarrowPipe":
        listener = socket.create_server(("127.0.0.1", 0))
        small_buffers(listener)  # accepted sockets inherit them
        self._server = await asyncio.start_server(self._accept, sock=listener, limit=SMALL)
        self.port = listener.getsockname()[1]
        return self

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        small_buffers(sock)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", self.target))
            out_reader, out_writer = await asyncio.open_connection(sock=sock, limit=SMALL)
        except OSError:
            sock.close()
            writer.close()
            return
        async with asyncio.TaskGroup() as group:
            group.create_task(self._pump(reader, out_writer))
            group.create_task(self._pump(out_reader, writer))

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(SMALL):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except OSError:
            writer.close()


async def start_tunnel(stage: str, local_port: int, running: contextlib.AsyncExitStack, **server: float) -> int:
    """The stage's server and client in this process, the connections that carry users' bytes through a NarrowPipe.

    Those are the proxy connections up to stage 8, the client's one connection from stage 9 on.
    Returns the public port.
    """
    tunnel_server = make_server(stage, secret=SECRET, **server)
    ports = await tunnel_server.listen("127.0.0.1", *any_ports(stage))
    await running.enter_async_context(Background(tunnel_server.serve()))
    *control, data_port = client_ports(ports)  # the last port the client takes carries the users' bytes
    pipe = await running.enter_async_context(NarrowPipe(data_port))
    local = ("127.0.0.1", local_port)
    client = make_client(stage, local, "127.0.0.1", *control, pipe.port, secret=SECRET, **client_options(stage))
    await running.enter_async_context(Background(client.run()))
    async with asyncio.timeout(STEP_TIMEOUT):
        await client.connected.wait()
    return await users_port(ports, client)


@dataclass
class Sender:
    """Sends `size` pattern bytes on a raw socket from its first moment; counts and hashes what went out."""

    sock: socket.socket
    size: int
    sent: int = 0
    last_progress: float = field(default_factory=time.monotonic)

    async def run(self) -> str:
        loop = asyncio.get_running_loop()
        digest = hashlib.sha256()
        self.last_progress = time.monotonic()
        while self.sent < self.size:
            offset = self.sent % len(BLOCK)
            chunk = BLOCK[offset : offset + min(CHUNK, self.size - self.sent)]
            await loop.sock_sendall(self.sock, chunk)  # no copy: the test holds no buffer of its own
            digest.update(chunk)
            self.sent += len(chunk)
            self.last_progress = time.monotonic()
        self.sock.shutdown(socket.SHUT_WR)
        return digest.hexdigest()

    def stalled(self) -> bool:
        return time.monotonic() - self.last_progress > STALLED


async def connect_raw(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    async with asyncio.timeout(STEP_TIMEOUT):
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def until_stalled(senders: list[Sender], tasks: list["asyncio.Task[str]"], within: float) -> None:
    """Wait until every sender is held back (or done), up to `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(sender.stalled() or task.done() for sender, task in zip(senders, tasks, strict=True)):
            return
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def stalled_app() -> AsyncIterator[tuple[int, asyncio.Event, "asyncio.Future[tuple[int, str]]"]]:
    """A local app with 16 KiB socket buffers that reads nothing until `go` is set, then reads to EOF.

    Yields (port, go, result): result is (bytes, SHA-256) of what it read.
    """
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    small_buffers(listener)
    listener.setblocking(False)
    go = asyncio.Event()

    async def serve() -> tuple[int, str]:
        sock, _ = await loop.sock_accept(listener)
        with sock:
            await go.wait()
            digest, received = hashlib.sha256(), 0
            while data := await loop.sock_recv(sock, 256 * 1024):
                digest.update(data)
                received += len(data)
            return received, digest.hexdigest()

    task = asyncio.create_task(serve())
    try:
        yield listener.getsockname()[1], go, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        listener.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_user_who_uploads_from_the_first_byte_to_an_app_that_does_not_read_is_held_back(
    stage: str, traced: None
) -> None:
    """Issue 12, item 1: the bytes a user sent before its proxy connection arrived are written out
    at the join; they overflow the narrow proxy connection, and the pause that follows must hold.

    256 MiB on stage 9 and on the most complete stage; the lighter form between: LIGHT_UPLOAD (96 MiB).
    """
    size = UPLOAD if stage in first_and_last(stages_from("flow")) else LIGHT_UPLOAD
    async with contextlib.AsyncExitStack() as running, stalled_app() as (app_port, go, app):
        public = await start_tunnel(stage, app_port, running)
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        user = Sender(await connect_raw(public), size)
        running.callback(user.sock.close)
        upload = asyncio.create_task(user.run())
        await until_stalled([user], [upload], within=30.0)
        held = tracemalloc.get_traced_memory()[1] - before
        stalled_at = time.monotonic()
        figures = (
            f"the user sent {user.sent / MiB:.1f} MiB; the tunnel's allocations peaked {held / MiB:.1f} MiB higher"
        )
        print(f"\nstalled app: {figures}")
        assert not upload.done(), f"nothing held the user back: {figures}"
        assert held < LIMIT, figures

        go.set()  # the app reads now: everything arrives, intact
        async with asyncio.timeout(60):
            sent_digest = await upload
            received, received_digest = await app
        print(f"the app read {received / MiB:.0f} MiB in {time.monotonic() - stalled_at:.1f} s")
        assert (received, received_digest) == (size, sent_digest)
        assert tracemalloc.get_traced_memory()[1] - before < LIMIT


async def test_users_waiting_for_a_stalled_client_each_hold_a_bounded_amount(stage: str, traced: None) -> None:
    # Issue 12, item 1 (the pre-join bound): a client that never opens proxy connections; each user
    # sends from its first byte. What a waiting user may make the server hold is DATA_LIMIT, checked
    # before the bytes are kept, not after (today: DATA_LIMIT plus one full read).
    users = 16
    data_limit = int(getattr(stage_module(stage, "protocol"), "DATA_LIMIT", 256 * 1024))
    bound = data_limit + 64 * 1024  # plus what a connection costs: a transport, a task, the protocol objects
    async with contextlib.AsyncExitStack() as running:
        tunnel_server = make_server(stage, secret=SECRET, proxy_timeout=60.0)
        ports = await tunnel_server.listen("127.0.0.1", *any_ports(stage))
        await running.enter_async_context(Background(tunnel_server.serve()))
        reader, writer = await control_connection(stage, ports.control)
        running.callback(writer.close)
        async with asyncio.timeout(STEP_TIMEOUT):
            welcome = await client_handshake(stage, reader, writer, SECRET, hello(stage))  # then silence: stalled
        await asyncio.sleep(0.2)
        before = tracemalloc.get_traced_memory()[0]
        public = int(welcome.tunnel) if has_tunnels(stage) else ports.public  # from stage 14 on: its TCP tunnel
        senders = [Sender(await connect_raw(public), 8 * MiB) for _ in range(users)]
        for sender in senders:
            running.callback(sender.sock.close)
        tasks = [asyncio.create_task(sender.run()) for sender in senders]
        try:
            await until_stalled(senders, tasks, within=20.0)
            held = (tracemalloc.get_traced_memory()[0] - before) / users
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    print(f"\n{users} waiting users: {held / 1024:.0f} KiB held per user (bound {bound / 1024:.0f} KiB)")
    assert held <= bound, f"each waiting user made the server hold {held / 1024:.0f} KiB; bound {bound / 1024:.0f}"
