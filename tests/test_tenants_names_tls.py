"""Many tunnels on one server (stage 14 on), by name (11 on), over TLS (12 on).

What these stages add, each test on the stage that brings its idea and every later one (`since`,
support.LADDER): several clients each holding a tunnel of their own
(a name routed by the users' Host header, or a TCP port), names that are first come first served
and kept for a client that comes back, TLS on the client's connection (the client checks the
server's certificate and host name; an eavesdropper sees only TLS records), HTTPS for users, and a
public port that reads each request's head with bounds. Certificates are made at run time
(tls_certs.py): no key is committed. The wire is spoken by hand (`control`) where a test plays a
client that the stage's own would never be.
"""

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Self

import pytest

import tls_certs
from stage_16 import auth, frames, session
from stage_16.client import Client
from stage_16.protocol import Refused, TunnelError
from stage_16.server import Ports, Server
from support import (
    PAGE,
    STEP_TIMEOUT,
    Background,
    CliProcess,
    EchoServer,
    HttpOrigin,
    LocalServer,
    accepted,
    control_connection,
    exchange,
    has_inspector,
    has_tls,
    http_request,
    make_client,
    make_server,
    open_connection,
    pattern_bytes,
    rebind,
    server_port_flags,
    sha256,
    tls_flags,
    until_logged,
    usage_error,
)

# Many clients and TCP tunnels (stage 14), names (11) and TLS (12): a test without its own `since` is
# about TLS. The fixtures speak TLS where the stage has it (support.has_tls).
STAGE = "stage_16"  # the stage under test, set by `names`
pytestmark = pytest.mark.since("tls")
TENANTS = pytest.mark.since("tenants")
NAMES = pytest.mark.since("names")


def inspect_port() -> list[str]:
    """From stage 18 on the client's inspector takes any free port: 4040 may be taken on a shared machine."""
    return ["--inspect-port", "0"] if has_inspector(STAGE) else []


@pytest.fixture(autouse=True)
def names(stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """This module's stage names (imported from stage_16) are the stage under test's, for one test."""
    rebind(globals(), stage, monkeypatch)
    monkeypatch.setitem(globals(), "STAGE", stage)


SECRET = "stage-10-tests-secret-of-some-length"
RANDOM_NAME = re.compile(r"[0-9a-f]{8}")
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
StartServer = Callable[..., Awaitable[tuple[Server, Ports]]]
StartClient = Callable[..., Awaitable[Client]]


@pytest.fixture(autouse=True)
def log_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Start a server with a secret, and TLS on its control port (the test CA's certificate) from stage 16 on."""
    async with contextlib.AsyncExitStack() as running:

        async def start(**options: Any) -> tuple[Server, Ports]:
            server = make_server(STAGE, **{"secret": SECRET, **options})
            ports = await server.listen("127.0.0.1", 0, 0)
            await running.enter_async_context(Background(server.serve()))
            return server, ports

        yield start


def new_client(local_port: int, control_port: int, **options: Any) -> Client:
    """A client of the local app on `local_port` (trusting the test CA, from stage 16 on)."""
    tls = {"tls": tls_certs.client_context()} if has_tls(STAGE) else {}
    options = {**tls, "secret": SECRET, "max_backoff": 0.2, **options}
    client: Client = make_client(STAGE, ("127.0.0.1", local_port), "127.0.0.1", control_port, **options)
    return client


async def connected(client: Client) -> Client:
    """Wait (bounded) until the client holds its tunnel."""
    async with asyncio.timeout(STEP_TIMEOUT):
        await client.connected.wait()
    return client


@pytest.fixture
async def start_client() -> AsyncIterator[StartClient]:
    """Start clients that run until the test ends; by default, wait until each holds its tunnel."""
    async with contextlib.AsyncExitStack() as running:

        async def start(local_port: int, control_port: int, wait: bool = True, **options: Any) -> Client:
            client = new_client(local_port, control_port, **options)
            await running.enter_async_context(Background(client.run()))
            return await connected(client) if wait else client

        yield start


class App(LocalServer):
    """A local HTTP app that answers every request with its own body, then closes."""

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.body) + self.body)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


def get(name: str, port: int, domain: str = "localhost") -> bytes:
    """A GET request for the tunnel `name`, as a browser sends it to http://NAME.DOMAIN:PORT/."""
    return f"GET / HTTP/1.0\r\nHost: {name}.{domain}:{port}\r\nUser-Agent: test\r\n\r\n".encode()


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll `check` (bounded) until it is true: for what happens in the background (reconnects, expiry)."""
    async with asyncio.timeout(STEP_TIMEOUT):
        while not await check():  # noqa: ASYNC110 (the state is the server's or client's: no event to wait on)
            await asyncio.sleep(0.05)


async def visit(public_port: int, name: str) -> tuple[int, bytes]:
    """What a user of tunnel `name` gets now: (HTTP status, body)."""
    status, _, body = await http_request(public_port, get(name, public_port))
    return status, body


async def status_of(public_port: int, name: str) -> int:
    """The HTTP status a user of tunnel `name` gets now."""
    return (await visit(public_port, name))[0]


# --- the wire, by hand ---------------------------------------------------------------------------------


async def control(port: int) -> Streams:
    """A connection to the control port as a client makes it: over TLS from stage 16 on (trusting the test CA)."""
    return await control_connection(STAGE, port)


async def read_line(reader: asyncio.StreamReader) -> str:
    async with asyncio.timeout(STEP_TIMEOUT):
        return (await reader.readline()).decode().rstrip("\r\n")


async def handshake(port: int, hello: str, secret: str = SECRET) -> tuple[list[str], Streams]:
    """Say `hello ...` on a new connection, answer the challenge, return the server's last line split in words."""
    reader, writer = await control(port)
    writer.write(f"{hello}\n".encode())
    line = await read_line(reader)
    if line.startswith("challenge "):
        writer.write(f"auth {auth.answer(secret, line.split()[1])}\n".encode())
        line = await read_line(reader)
    return line.split(" "), (reader, writer)


async def closed_by_peer(reader: asyncio.StreamReader) -> bytes:
    """Everything the peer still sends until it closes the connection (a reset counts as closed)."""
    got = b""
    async with asyncio.timeout(STEP_TIMEOUT):
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                got += data
    return got


class Forwarder:
    """A TCP forwarder on 127.0.0.1 to `target`, put between a client and the server's control port.

    It records every byte each way (what an eavesdropper on the link sees), and can cut every
    connection (a lost link) and stop accepting for a while (an outage).
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.records: list[tuple[bytearray, bytearray]] = []  # (client -> server, server -> client)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        await self.resume()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pause()
        self.cut()
        await self.finished()

    async def resume(self) -> None:
        """Accept connections (again, on the same port)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def pause(self) -> None:
        """Stop accepting: new connections are refused."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def cut(self) -> None:
        """Break every connection in flight, both ways, with a reset."""
        for writer in self._writers:
            writer.transport.abort()

    async def finished(self) -> None:
        """Wait (bounded) until every connection has ended."""
        async with asyncio.timeout(STEP_TIMEOUT):
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._forward(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up, down = bytearray(), bytearray()
        self.records.append((up, down))
        try:
            server_reader, server_writer = await open_connection(self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, server_writer}
        try:
            await asyncio.gather(self._pump(reader, server_writer, up), self._pump(server_reader, writer, down))
        finally:
            self._writers -= {writer, server_writer}
            writer.close()
            server_writer.close()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bytearray) -> None:
        try:
            while data := await reader.read(65536):
                record += data
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except OSError:
            writer.transport.abort()


def tls_records(data: bytes) -> list[int]:
    """The content types of the TLS records that `data` is made of; AssertionError if it is not TLS records."""
    types, offset = [], 0
    while offset + 5 <= len(data):
        kind, major, length = data[offset], data[offset + 1], int.from_bytes(data[offset + 3 : offset + 5], "big")
        assert kind in (20, 21, 22, 23) and major == 3, f"not a TLS record at byte {offset}: {data[offset:][:16]!r}"
        types.append(kind)
        offset += 5 + length
    return types  # a last record may be cut short: the recording ends when the link does


# --- many tunnels, by name --------------------------------------------------------------------------------


@NAMES
async def test_three_named_tunnels_each_serve_their_own_app_to_300_users_at_once(
    start_server: StartServer, start_client: StartClient
) -> None:
    names = ("alpha", "bravo", "charlie")
    bodies = {name: pattern_bytes(20_000 + 1000 * n, seed=n) for n, name in enumerate(names)}
    async with App(bodies["alpha"]) as a, App(bodies["bravo"]) as b, App(bodies["charlie"]) as c:
        server, ports = await start_server()
        clients = [
            await start_client(app.port, ports.control, name=name) for app, name in zip((a, b, c), names, strict=True)
        ]
        assert [client.tunnel for client in clients] == list(names)
        assert [client.url for client in clients] == [f"http://{name}.localhost:{ports.public}/" for name in names]
        assert server.tunnels() == {client.tunnel: client.url for client in clients}
        wanted = [names[user % 3] for user in range(300)]
        replies = await asyncio.gather(*(http_request(ports.public, get(name, ports.public)) for name in wanted))
    wrong = [
        (user, name, status)
        for user, (name, (status, _, body)) in enumerate(zip(wanted, replies, strict=True))
        if status != 200 or sha256(body) != sha256(bodies[name])
    ]
    assert wrong == [], f"{len(wrong)} of 300 users got another app's answer or none, e.g. {wrong[:3]}"


@pytest.mark.since("names", until="forwarded")  # from stage 20 the head gets X-Forwarded-*: test_forwarded.py
async def test_the_users_bytes_reach_the_app_unchanged_head_included(
    start_server: StartServer, start_client: StartClient, echo_server: EchoServer
) -> None:
    _, ports = await start_server()
    await start_client(echo_server.port, ports.control, name="echo")
    request = get("echo", ports.public).replace(b"GET / HTTP/1.0", b"POST /upload HTTP/1.1") + pattern_bytes(100_000)
    assert sha256(await exchange(ports.public, request)) == sha256(request)


@NAMES
async def test_a_client_that_asks_for_no_name_gets_a_random_one(
    start_server: StartServer, start_client: StartClient, http_origin: HttpOrigin
) -> None:
    server, ports = await start_server()
    first = await start_client(http_origin.port, ports.control)
    second = await start_client(http_origin.port, ports.control)
    assert first.tunnel is not None and RANDOM_NAME.fullmatch(first.tunnel), first.tunnel
    assert second.tunnel is not None and RANDOM_NAME.fullmatch(second.tunnel), second.tunnel
    assert first.tunnel != second.tunnel
    assert first.url == f"http://{first.tunnel}.localhost:{ports.public}/"
    assert server.tunnels()[first.tunnel] == first.url
    status, _, body = await http_request(ports.public, get(first.tunnel, ports.public))
    assert (status, body) == (200, PAGE)


@NAMES
async def test_a_taken_name_is_refused_and_its_holder_keeps_serving(
    start_server: StartServer, start_client: StartClient
) -> None:
    async with App(b"the first") as first_app, App(b"the second") as second_app:
        _, ports = await start_server()
        await start_client(first_app.port, ports.control, name="myapp")
        rival = new_client(second_app.port, ports.control, name="myapp")
        with pytest.raises(Refused, match=r"the name 'myapp' is taken"):
            async with asyncio.timeout(STEP_TIMEOUT):  # refused, not retried
                await rival.run()
        assert await visit(ports.public, "myapp") == (200, b"the first")


@NAMES
async def test_a_session_id_takes_its_name_back_and_nobody_else_can(start_server: StartServer) -> None:
    _, ports = await start_server()
    welcome, (old_reader, old_writer) = await handshake(ports.control, "hello http myapp")
    assert welcome[:1] == ["welcome"] and welcome[2:] == ["myapp", f"http://myapp.localhost:{ports.public}/"]
    session_id = welcome[1]
    refused, (_, writer) = await handshake(ports.control, "hello http myapp")  # no session id: someone else
    assert refused[:1] == ["error"] and "the name 'myapp' is taken" in " ".join(refused)
    writer.close()
    refused, (_, writer) = await handshake(ports.control, f"hello http myapp {secrets.token_hex(16)}")  # a guess
    assert refused[:1] == ["error"], refused
    writer.close()
    again, (_, new_writer) = await handshake(ports.control, f"hello http myapp {session_id}")
    assert again == welcome  # the same session, name and URL
    await closed_by_peer(old_reader)  # and the old connection is dropped
    old_writer.close()
    new_writer.close()


@NAMES
async def test_a_client_that_loses_its_link_comes_back_with_its_name_which_is_kept_meanwhile(
    start_server: StartServer, start_client: StartClient
) -> None:
    async with App(b"the original") as app, App(b"an impostor") as other:
        _, ports = await start_server()
        async with Forwarder(ports.control) as link:
            client = await start_client(app.port, link.port, name="myapp")
            session_id, url = client.session_id, client.url
            assert await status_of(ports.public, "myapp") == 200
            await link.pause()
            link.cut()  # the link is lost, and stays down for a while

            async def bad_gateway() -> bool:
                return await status_of(ports.public, "myapp") == 502

            await until(bad_gateway)  # users get a page while the client is away
            rival = new_client(other.port, ports.control, name="myapp")
            with pytest.raises(Refused, match=r"the name 'myapp' is taken"):  # the name is kept for its client
                async with asyncio.timeout(STEP_TIMEOUT):
                    await rival.run()
            await link.resume()

            async def served() -> bool:
                return await visit(ports.public, "myapp") == (200, b"the original")

            await until(served)
            assert (client.session_id, client.tunnel, client.url) == (session_id, "myapp", url)


@NAMES
async def test_a_name_is_free_again_once_its_client_is_gone_past_the_resume_window(
    start_server: StartServer, start_client: StartClient, caplog: pytest.LogCaptureFixture
) -> None:
    async with App(b"the first") as first_app, App(b"the second") as second_app:
        server, ports = await start_server(resume_window=0.5)
        async with Forwarder(ports.control) as link:
            first = new_client(first_app.port, link.port, name="myapp")
            async with Background(first.run()):
                assert (await connected(first)).tunnel == "myapp"
                await link.pause()
                link.cut()  # lost, not stopped: the name is kept for the window, then freed
                await until_logged(caplog, r"myapp\.localhost:\d+/ is kept 0\.5s for its client")
                await until_logged(caplog, r"session [0-9a-f]{8} ended")

        async def name_is_free() -> bool:
            return "myapp" not in server.tunnels()

        await until(name_is_free)
        assert await status_of(ports.public, "myapp") == 404  # no tunnel by that name any more
        second = await start_client(second_app.port, ports.control, name="myapp")
        assert second.tunnel == "myapp"
        assert await visit(ports.public, "myapp") == (200, b"the second")


@NAMES
async def test_a_client_that_stops_says_goodbye_and_its_name_is_free_at_once(
    start_server: StartServer, start_client: StartClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Ctrl-C, then the same command again: it must not find its own name taken for the resume window."""
    async with App(b"the first") as first_app, App(b"the second") as second_app:
        server, ports = await start_server(resume_window=60.0)
        first = new_client(first_app.port, ports.control, name="myapp")
        async with Background(first.run()):
            await connected(first)
        await until_logged(caplog, r"the client closed the tunnel: the client stopped")
        assert "myapp" not in server.tunnels()  # freed at once, not kept for 60 s
        second = await start_client(second_app.port, ports.control, name="myapp")
        assert second.tunnel == "myapp"
        assert await visit(ports.public, "myapp") == (200, b"the second")


# --- names: what is one ---------------------------------------------------------------------------------

BAD_NAMES = {
    "starts with a hyphen": "-myapp",
    "ends with a hyphen": "myapp-",
    "64 characters": "a" * 64,
    "an underscore": "my_app",
    "a dot": "my.app",
    "not ascii": "caf\u00e9",
}
GOOD_NAMES = ("a", "a" * 63, "my-app-2", "0day")


@NAMES
@pytest.mark.parametrize("bad", BAD_NAMES.values(), ids=BAD_NAMES.keys())
async def test_the_client_cli_refuses_a_bad_name(cli: CliProcess.Factory, bad: str) -> None:
    line = await usage_error(cli, "-m", f"{STAGE}.client", *inspect_port(), "127.0.0.1:8000", "--name", bad)
    assert "--name" in line


@NAMES
@pytest.mark.parametrize("good", GOOD_NAMES)
async def test_the_client_cli_accepts_a_good_name(cli: CliProcess.Factory, good: str) -> None:
    await accepted(cli, "-m", f"{STAGE}.client", *inspect_port(), "127.0.0.1:8000", "--name", good)


@NAMES
@pytest.mark.parametrize("bad", [*BAD_NAMES.values(), "MyApp", ""], ids=[*BAD_NAMES.keys(), "upper case", "empty"])
async def test_the_server_refuses_a_bad_name_over_the_wire(start_server: StartServer, bad: str) -> None:
    _, ports = await start_server()
    reader, writer = await control(ports.control)
    writer.write(f"hello http {bad}\n".encode())
    answer = await closed_by_peer(reader)
    writer.close()
    assert answer.startswith(b"error "), answer
    assert b"welcome" not in answer
    assert len(answer.splitlines()) == 1


@NAMES
async def test_the_server_accepts_the_longest_name_over_the_wire(start_server: StartServer) -> None:
    _, ports = await start_server()
    welcome, (_, writer) = await handshake(ports.control, f"hello http {'a' * 63}")
    writer.close()
    assert welcome[:1] == ["welcome"] and welcome[2] == "a" * 63


# --- TCP tunnels ---------------------------------------------------------------------------------------------


@TENANTS
async def test_a_tcp_tunnel_carries_raw_bytes_both_ways_and_its_port_is_released_after_the_window(
    start_server: StartServer, echo_server: EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    _, ports = await start_server(resume_window=0.5)
    client = new_client(echo_server.port, ports.control, tcp=True)
    async with Background(client.run()):
        await connected(client)
        assert client.tunnel is not None and client.tunnel.isdigit()
        tcp_port = int(client.tunnel)
        assert client.url == f"tcp://localhost:{tcp_port}"
        raw = bytes(range(256)) * 4096  # 1 MiB of every byte value: nothing like HTTP
        assert sha256(await exchange(tcp_port, raw)) == sha256(raw)
        # Both ways at once, on one connection: a line goes and comes back while the connection stays open.
        reader, writer = await open_connection(tcp_port)
        writer.write(b"\x00\xffraw\r\n")
        async with asyncio.timeout(STEP_TIMEOUT):
            assert await reader.readexactly(7) == b"\x00\xffraw\r\n"
        writer.close()
    await until_logged(caplog, rf"tcp port {tcp_port} closed")

    async def refused() -> bool:
        try:
            _, writer = await open_connection(tcp_port)
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:  # queued just as the port closed: try again
            return False
        writer.close()
        return False

    await until(refused)
    # The port is free again: a client may ask for it by number.
    welcome, (_, writer) = await handshake(ports.control, f"hello tcp {tcp_port}")
    writer.close()
    assert welcome[:1] == ["welcome"] and welcome[2:] == [str(tcp_port), f"tcp://localhost:{tcp_port}"]


@TENANTS
async def test_a_tcp_port_that_is_held_is_refused_to_another_client(
    start_server: StartServer, start_client: StartClient, echo_server: EchoServer
) -> None:
    _, ports = await start_server()
    client = await start_client(echo_server.port, ports.control, tcp=True)
    refused, (_, writer) = await handshake(ports.control, f"hello tcp {client.tunnel}")
    writer.close()
    assert refused[:1] == ["error"], refused
    assert await exchange(int(client.tunnel or 0), b"still mine\n") == b"still mine\n"


@TENANTS
@pytest.mark.parametrize("wanted", ["25", "80", "1023"])
async def test_without_a_range_a_client_may_not_ask_for_a_privileged_port(
    start_server: StartServer, wanted: str
) -> None:
    """A server run as root would bind port 25 or 80 for any client that asked, in front of the machine's own."""
    _, ports = await start_server()  # no tcp_ports: any free port, but only from 1024 up
    refused, (_, writer) = await handshake(ports.control, f"hello tcp {wanted}")
    writer.close()
    assert refused[:1] == ["error"] and "outside this server's TCP tunnel ports 1024-65535" in " ".join(refused)


# --- TLS on the client's link ------------------------------------------------------------------------------


async def test_a_client_that_does_not_trust_the_servers_ca_refuses_to_connect(start_server: StartServer) -> None:
    _, ports = await start_server()
    client = new_client(1, ports.control, tls=tls_certs.wrong_ca().client_context())
    with pytest.raises(
        TunnelError, match=r"^the server's certificate is not trusted \(.+\); for a private CA, pass --ca"
    ):
        async with asyncio.timeout(STEP_TIMEOUT):  # at once: no retry
            await client.run()
    assert client.session_id is None


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])  # a DNS name, and an IP address
async def test_a_client_refuses_a_certificate_for_another_host(start_server: StartServer, host: str) -> None:
    _, ports = await start_server(tls=tls_certs.other_host().server_context())  # signed by the CA it trusts
    client = new_client(1, ports.control)
    client.server = host
    with pytest.raises(TunnelError, match=rf"^the server's certificate is not valid for {re.escape(host)} \(.+\)"):
        async with asyncio.timeout(STEP_TIMEOUT):
            await client.run()
    assert client.session_id is None


async def test_an_eavesdropper_on_the_clients_link_sees_only_tls_records(
    start_server: StartServer, http_origin: HttpOrigin
) -> None:
    _, ports = await start_server()
    name = f"private-{secrets.token_hex(4)}"
    user_body = f"the user's own words {secrets.token_hex(8)}".encode()
    async with Forwarder(ports.control) as link:
        client = new_client(http_origin.port, link.port, name=name)
        async with Background(client.run()):
            await connected(client)
            post = f"POST /form HTTP/1.0\r\nHost: {name}.localhost\r\nContent-Length: {len(user_body)}\r\n\r\n"
            status, _, body = await http_request(ports.public, post.encode() + user_body)
            assert (status, body) == (200, sha256(user_body).encode())  # the app got the body
            status, _, body = await http_request(ports.public, get(name, ports.public))
            assert (status, body) == (200, PAGE)
        await link.finished()  # the client left: the recording is complete
    [(up, down)] = link.records
    assert up[:2] == b"\x16\x03" and down[:2] == b"\x16\x03"  # both sides start with a TLS handshake record
    assert 23 in tls_records(bytes(up)) and 23 in tls_records(bytes(down))  # then application data, all of it
    assert client.session_id is not None
    in_clear = {
        "the secret": SECRET.encode(),
        "the handshake's words": b"hello",
        "the challenge": b"challenge",
        "the secret's proof": b"auth ",
        "the welcome": b"welcome",
        "the session id": client.session_id.encode(),
        "the tunnel's name": name.encode(),
        "the user's request": b"POST /form",
        "the user's body": user_body,
        "the app's answer": sha256(user_body).encode(),
        "the app's page": PAGE,
        **{
            f"a frame header of stream {sid}": frames.HEADER.pack(frames.DATA, flag, sid, 0)[:6]
            for sid in range(1, 9)
            for flag in (frames.SYN, frames.ACK)
        },
    }
    seen = [what for what, data in in_clear.items() if data in up or data in down]
    assert seen == [], f"in clear on the client's link: {seen}"


# --- HTTPS for users -------------------------------------------------------------------------------------------


async def curl(*args: str) -> tuple[int, bytes, bytes]:
    """Run curl on loopback only (no proxy, no CA bundle from the environment); return (exit code, out, err)."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    env = {k: v for k, v in os.environ.items() if not re.search(r"proxy|CA_BUNDLE|SSL_CERT", k, re.IGNORECASE)}
    process = await asyncio.create_subprocess_exec(
        "curl", "--silent", "--show-error", "--max-time", str(STEP_TIMEOUT), "--noproxy", "*", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    async with asyncio.timeout(STEP_TIMEOUT * 2):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out, err


async def https_server(start_server: StartServer, **options: Any) -> tuple[Server, Ports]:
    """A server whose public port speaks HTTPS, for tunnels NAME.tunnel.test (see tls_certs.DOMAIN)."""
    return await start_server(domain=tls_certs.DOMAIN, https=tls_certs.server_context(), **options)


async def https_visit(public_port: int, name: str) -> tuple[int, bytes]:
    """What an HTTPS user of tunnel `name` gets: (status, body), the body read by its Content-Length."""
    host = f"{name}.{tls_certs.DOMAIN}"
    async with asyncio.timeout(STEP_TIMEOUT):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", public_port, ssl=tls_certs.client_context(), server_hostname=host
        )
        try:
            writer.write(get(name, public_port, tls_certs.DOMAIN))
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            assert length is not None, head
            return int(head.split(b" ")[1]), await reader.readexactly(int(length[1]))
        finally:
            writer.close()


async def test_https_users_reach_their_tunnel_through_the_public_port_with_curl(
    start_server: StartServer, start_client: StartClient
) -> None:
    async with App(b"over https") as app:
        _, ports = await https_server(start_server)
        client = await start_client(app.port, ports.control, name="myapp")
        host = f"myapp.{tls_certs.DOMAIN}"
        url = f"https://{host}:{ports.public}/"
        assert client.url == url
        resolve = f"{host}:{ports.public}:127.0.0.1"
        code, out, err = await curl("--resolve", resolve, "--cacert", str(tls_certs.certs().ca), url)
        assert (code, out) == (0, b"over https"), err
        code, out, err = await curl("--resolve", resolve, url)  # without the test CA: not trusted
        assert code == 60, (code, out, err)  # CURLE_PEER_FAILED_VERIFICATION
        assert out == b""


class CloseDelimited(LocalServer):
    """An app whose answer has no Content-Length: it ends where the app closes the connection (HTTP/1.0)."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nthe end is the close")
            await writer.drain()
        writer.close()


async def test_an_https_user_sees_the_end_of_an_answer_that_ends_when_the_app_closes(
    start_server: StartServer, start_client: StartClient
) -> None:
    """TLS has no half-close: the app's end must end the HTTPS user's connection, or its browser waits on."""
    async with CloseDelimited() as app:
        _, ports = await https_server(start_server)
        await start_client(app.port, ports.control, name="myapp")
        host = f"myapp.{tls_certs.DOMAIN}"
        code, out, err = await curl(
            "--resolve", f"{host}:{ports.public}:127.0.0.1", "--cacert", str(tls_certs.certs().ca),
            f"https://{host}:{ports.public}/",
        )  # fmt: skip
        assert (code, out) == (0, b"the end is the close"), err  # curl gives up after STEP_TIMEOUT (28)


async def test_https_users_get_the_routing_pages_over_tls(start_server: StartServer) -> None:
    _, ports = await https_server(start_server)
    host = f"nosuch.{tls_certs.DOMAIN}"
    code, out, err = await curl(
        "--resolve", f"{host}:{ports.public}:127.0.0.1", "--cacert", str(tls_certs.certs().ca),
        "--write-out", "%{http_code}", f"https://{host}:{ports.public}/",
    )  # fmt: skip
    assert code == 0, err
    assert out.endswith(b"404") and b"nosuch" in out


# --- bad input on the public and control ports ---------------------------------------------------------------

HEAD_TIMEOUT = 1.0  # short, so that the 408 comes soon; the test's own bounds are STEP_TIMEOUT
MAX_HEAD = 16 * 1024  # the spec's bound, written out: a test that read routing.MAX_HEAD would follow a broken one
TOO_LONG = b"a" * (MAX_HEAD + 1024)


def head(*lines: bytes) -> bytes:
    return b"\r\n".join([b"GET / HTTP/1.1", *lines]) + b"\r\n\r\n"


# name: (bytes the user sends, whether it then half-closes, status it must get, what the page must say)
BAD_HEADS: dict[str, tuple[bytes, bool, int, bytes]] = {
    "no Host": (head(b"User-Agent: test"), True, 400, b"no Host"),
    "two Host headers": (head(b"Host: good.localhost", b"Host: good.localhost"), True, 400, b"two Host"),
    "a Host label of 64 characters": (head(b"Host: " + b"a" * 64 + b".localhost"), True, 400, b"malformed"),
    "a Host header too long": (head(b"Host: " + TOO_LONG + b".localhost"), False, 431, b"longer than"),
    "a head too long for a good Host": (head(b"Host: good.localhost", b"X-Pad: " + TOO_LONG), False, 431, b"longer"),
    "a head too long that never ends": (b"GET / HTTP/1.1\r\nX-Pad: " + TOO_LONG, False, 431, b"longer than"),
    "a head that never completes": (b"GET / HTTP/1.1\r\nHost: good.localhost\r\n", False, 408, b"never ended"),
    "a head cut short": (b"GET / HTTP/1.1\r\nHost: good.localhost\r\n", True, 400, b"never ended"),
    "ssh's banner": (b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", False, 400, b"not an HTTP request"),
    "a TLS hello": (bytes.fromhex("160301020001") + b"\x00" * 64, False, 400, b"not an HTTP request"),
    "binary bytes": (b"\x00\xff\x13\x37", False, 400, b"not an HTTP request"),
    "an unknown name": (head(b"Host: nosuch.localhost:1234"), True, 404, b"nosuch"),
    "a host under another domain": (head(b"Host: example.com"), True, 404, b"example.com"),
}


async def send_head(public_port: int, data: bytes, half_close: bool) -> Streams:
    """Connect and send `data`, then EOF if `half_close`."""
    reader, writer = await open_connection(public_port)
    writer.write(data)
    await writer.drain()
    if half_close:
        writer.write_eof()
    return reader, writer


@NAMES
@pytest.mark.parametrize(("data", "half_close", "status", "says"), BAD_HEADS.values(), ids=BAD_HEADS.keys())
async def test_a_bad_request_head_gets_a_page_and_the_other_tunnels_keep_serving(
    start_server: StartServer,
    start_client: StartClient,
    data: bytes,
    half_close: bool,
    status: int,
    says: bytes,
) -> None:
    async with App(b"good answer") as app:
        _, ports = await start_server(head_timeout=HEAD_TIMEOUT)
        await start_client(app.port, ports.control, name="good")
        reader, writer = await send_head(ports.public, data, half_close)
        assert await visit(ports.public, "good") == (200, b"good answer")  # served while the bad one waits
        answer = await closed_by_peer(reader)
        writer.close()
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
        assert says in answer, answer
        assert await visit(ports.public, "good") == (200, b"good answer")


@NAMES
async def test_a_long_head_within_the_bound_is_routed(start_server: StartServer, start_client: StartClient) -> None:
    async with App(b"good answer") as app:
        _, ports = await start_server()
        await start_client(app.port, ports.control, name="good")
        request = get("good", ports.public)
        padded = request[:-2] + b"X-Pad: " + b"p" * (MAX_HEAD - len(request) - 16) + b"\r\n\r\n"
        assert MAX_HEAD - 64 < len(padded) <= MAX_HEAD
        status, _, body = await http_request(ports.public, padded)
        assert (status, body) == (200, b"good answer")


@NAMES
async def test_a_head_sent_a_byte_at_a_time_is_bounded_in_total_not_per_byte(start_server: StartServer) -> None:
    _, ports = await start_server(head_timeout=HEAD_TIMEOUT)
    reader, writer = await open_connection(ports.public)
    trickle = b"GET / HTTP/1.1\r\nX-Slow: " + b"s" * 10_000

    async def slowloris() -> None:
        with contextlib.suppress(OSError):
            for byte in trickle:  # one byte every 50 ms: never silent for HEAD_TIMEOUT
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)

    sending = asyncio.create_task(slowloris())
    try:
        answer = await closed_by_peer(reader)
    finally:
        sending.cancel()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]


@NAMES
async def test_many_unfinished_heads_hold_up_no_one(start_server: StartServer, start_client: StartClient) -> None:
    async with App(b"good answer") as app:
        _, ports = await start_server(head_timeout=STEP_TIMEOUT * 3)  # they stay unfinished for the whole test
        await start_client(app.port, ports.control, name="good")
        stalled = [await open_connection(ports.public) for _ in range(50)]
        for _, writer in stalled:
            writer.write(b"GET / HTTP/1.1\r\nHost: good.lo")
        replies = await asyncio.gather(*(visit(ports.public, "good") for _ in range(20)))
        assert set(replies) == {(200, b"good answer")}
        for _, writer in stalled:
            writer.close()


# What a peer sends to a TLS port before it goes silent, or instead of TLS.
NOT_TLS: dict[str, tuple[bytes, bool]] = {  # (bytes, whether the peer stays silent after them)
    "nothing": (b"", True),
    "half a ClientHello": (bytes.fromhex("16030100c8") + b"\x01\x00\x00\xc4\x03\x03", True),
    "plain text": (b"hello http myapp\n", False),
    "plain HTTP": (head(b"Host: good.tunnel.test"), False),
}


@pytest.mark.parametrize(("data", "silent"), NOT_TLS.values(), ids=NOT_TLS.keys())
@pytest.mark.parametrize("port", ["control", "https public"])
async def test_a_tls_handshake_that_never_finishes_is_let_go_and_the_server_serves_on(
    start_server: StartServer, start_client: StartClient, port: str, data: bytes, silent: bool
) -> None:
    async with App(b"good answer") as app:
        _, ports = await https_server(start_server, handshake_timeout=HEAD_TIMEOUT, head_timeout=HEAD_TIMEOUT)
        await start_client(app.port, ports.control, name="good")
        reader, writer = await open_connection(ports.control if port == "control" else ports.public)
        writer.write(data)
        answer = await closed_by_peer(reader)  # bounded: the server lets it go
        writer.close()
        assert b"welcome" not in answer and b"HTTP/1.1 " not in answer  # nothing in clear for a peer without TLS
        # Meanwhile and after, everyone else is served: a new client, and an HTTPS user of the tunnel.
        await start_client(app.port, ports.control, name="another")
        assert await https_visit(ports.public, "good") == (200, b"good answer")


# --- the command lines ----------------------------------------------------------------------------------------


async def start_cli_server(cli: CliProcess.Factory, *flags: str) -> tuple[CliProcess, int, int]:
    """`python3 -m STAGE.server [--cert ... --key ...]` on ephemeral ports; return it and its two ports."""
    server = await cli("-m", f"{STAGE}.server", *tls_flags(STAGE), *server_port_flags(STAGE), *flags)
    return server, await server.listening("control"), await server.listening("public")


async def refused_client(cli: CliProcess.Factory, *args: str) -> str:
    """Run a client that must stop at once: exactly one `error: ...` line, exit 1, no traceback; return the line."""
    client = await cli("-m", f"{STAGE}.client", *inspect_port(), *args)
    assert await client.wait() == 1, client.output
    errors = [line for line in client.lines if line.startswith("error:")]
    assert len(errors) == 1 and client.lines[-1] == errors[0], client.output
    assert "Traceback" not in client.output
    assert "reconnecting" not in client.output  # refused, not retried
    return errors[0]


async def test_cli_a_named_tunnel_over_tls_serves_its_app(cli: CliProcess.Factory, http_origin: HttpOrigin) -> None:
    server, control_port, public_port = await start_cli_server(cli)
    ca = str(tls_certs.certs().ca)
    local = f"127.0.0.1:{http_origin.port}"
    client = await cli("-m", f"{STAGE}.client", *inspect_port(), local, "127.0.0.1",
                       "--control-port", str(control_port),
                       "--ca", ca,
                       "--name", "MyApp")  # fmt: skip
    url = f"http://myapp.localhost:{public_port}/"  # names are lower-cased
    await client.expect(rf"tunnel up: {re.escape(url)} -> {re.escape(local)}$")
    await server.expect(rf"client connected \(session [0-9a-f]{{8}}\): {re.escape(url)}")
    assert await visit(public_port, "myapp") == (200, PAGE)
    rival = await refused_client(
        cli, local, f"127.0.0.1:{control_port}", "--ca", ca, "--name", "myapp"
    )  # SERVER as host:port
    assert rival.startswith("error: the server refused the connection: the name 'myapp' is taken")
    assert await client.interrupt() == 0
    assert "Traceback" not in client.output


@TENANTS
async def test_cli_a_tcp_tunnel_gets_a_port_of_its_own(cli: CliProcess.Factory, echo_server: EchoServer) -> None:
    server, control_port, _ = await start_cli_server(cli)
    local = f"127.0.0.1:{echo_server.port}"
    ca = ["--ca", str(tls_certs.certs().ca)] if has_tls(STAGE) else []
    client = await cli("-m", f"{STAGE}.client", *inspect_port(), local, "127.0.0.1",
                       "--control-port", str(control_port),
                       *ca,
                       "--tcp")  # fmt: skip
    match = await client.expect(rf"tunnel up: tcp://localhost:(\d+) -> {re.escape(local)}$")
    await server.expect(rf"tcp port listening on 127\.0\.0\.1:{match[1]} for session [0-9a-f]{{8}}")
    assert await exchange(int(match[1]), b"\x00raw bytes\xff\n") == b"\x00raw bytes\xff\n"


async def test_cli_a_client_with_the_wrong_ca_says_so_in_one_line(cli: CliProcess.Factory) -> None:
    _, control_port, _ = await start_cli_server(cli)
    line = await refused_client(
        cli, "127.0.0.1:8000", "127.0.0.1", "--control-port", str(control_port), "--ca", str(tls_certs.wrong_ca().ca)
    )
    assert re.fullmatch(
        r"error: the server's certificate is not trusted \(.+\); for a private CA, pass --ca FILE", line
    )


async def test_cli_a_client_without_ca_does_not_trust_a_private_ca(cli: CliProcess.Factory) -> None:
    _, control_port, _ = await start_cli_server(cli)
    line = await refused_client(cli, "127.0.0.1:8000", "127.0.0.1", "--control-port", str(control_port))
    assert re.fullmatch(
        r"error: the server's certificate is not trusted \(.+\); for a private CA, pass --ca FILE", line
    )


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_cli_a_client_refuses_a_certificate_for_another_host_in_one_line(
    cli: CliProcess.Factory, host: str
) -> None:
    other = tls_certs.other_host()
    server = await cli("-m", f"{STAGE}.server", "--cert", str(other.cert), "--key", str(other.key),
                       *server_port_flags(STAGE))  # fmt: skip
    control_port = await server.listening("control")
    line = await refused_client(cli, "127.0.0.1:8000", host, "--control-port", str(control_port), "--ca", str(other.ca))
    assert re.match(rf"error: the server's certificate is not valid for {re.escape(host)} \(.+\)", line), line


async def test_cli_a_server_whose_certificate_is_missing_says_so_in_one_line(cli: CliProcess.Factory) -> None:
    files = tls_certs.certs()
    missing = str(files.cert.parent / "no-such-cert.pem")
    for flags in (("--cert", missing, "--key", str(files.key)), ("--cert", str(files.key), "--key", str(files.key))):
        server = await cli("-m", f"{STAGE}.server", *flags, *server_port_flags(STAGE))
        assert await server.wait() == 1, server.output
        assert len(server.lines) == 1 and server.lines[0].startswith("error: "), server.output
        assert "Traceback" not in server.output


SERVER_USAGE_ERRORS = {
    "no certificate": [],
    "a certificate and no key": ["--cert", "server.pem"],
    "a resume window of 0": ["--cert", "c", "--key", "k", "--resume-window", "0"],
    "a TCP port range upside down": ["--cert", "c", "--key", "k", "--tcp-ports", "9000-8000"],
    "a TCP port range past 65535": ["--cert", "c", "--key", "k", "--tcp-ports", "60000-70000"],
    "a bad domain": ["--cert", "c", "--key", "k", "--domain", "my_domain"],
}


@pytest.mark.parametrize("flags", SERVER_USAGE_ERRORS.values(), ids=SERVER_USAGE_ERRORS.keys())
async def test_cli_the_server_refuses_a_bad_command_line(cli: CliProcess.Factory, flags: list[str]) -> None:
    await usage_error(cli, "-m", f"{STAGE}.server", *flags)


SERVER_ACCEPTED = {
    "any free port for TCP tunnels": ["--tcp-ports", "0"],
    "a TCP port range": ["--tcp-ports", "61000-61099"],
    "a TCP port range of one": ["--tcp-ports", "61000-61000"],
    "a short resume window": ["--resume-window", "0.5"],
    "a domain of several labels": ["--domain", "tunnel.example.com"],
}


@pytest.mark.parametrize("flags", SERVER_ACCEPTED.values(), ids=SERVER_ACCEPTED.keys())
async def test_cli_the_server_accepts_a_good_command_line(cli: CliProcess.Factory, flags: list[str]) -> None:
    await accepted(cli, "-m", f"{STAGE}.server", "--cert", "c", "--key", "k", *flags)


async def test_cli_the_client_takes_a_name_or_tcp_not_both(cli: CliProcess.Factory) -> None:
    await usage_error(cli, "-m", f"{STAGE}.client", *inspect_port(), "127.0.0.1:8000", "--name", "myapp", "--tcp")


async def test_cli_a_plain_tcp_peer_on_the_tls_port_is_closed_with_one_log_line(
    cli: CliProcess.Factory, echo_server: EchoServer
) -> None:
    """A client of an older stage (or `nc`) speaks its hello in clear: it gets a clean close, the log one line."""
    server, control, _ = await start_cli_server(cli)
    reader, writer = await open_connection(control)
    writer.write(b"hello http myapp\n")
    answer = await closed_by_peer(reader)  # bounded: closed, not kept waiting for a TLS hello
    writer.close()
    assert b"welcome" not in answer and b"challenge" not in answer
    await server.expect(r"127\.0\.0\.1:\d+: TLS handshake failed \(.+\); closed")
    # The server serves on: a real client gets its tunnel, and the failed peer left exactly one line.
    files = tls_certs.certs()
    client = await cli(
        "-m", f"{STAGE}.client", *inspect_port(), f"127.0.0.1:{echo_server.port}", "127.0.0.1",
        "--control-port", str(control),
        "--ca", str(files.ca), "--tcp",
    )  # fmt: skip
    await client.expect("tunnel up")
    about_the_peer = [line for line in server.lines if "TLS handshake failed" in line or "Traceback" in line]
    assert len(about_the_peer) == 1, server.output


@NAMES
async def test_a_server_holds_at_most_max_tunnels_and_says_so(
    start_server: StartServer, start_client: StartClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each tunnel costs the server memory, and a TCP tunnel a listening socket: their number is bounded."""
    monkeypatch.setattr(session, "MAX_TUNNELS", 2)
    async with App(b"first") as app:
        _, ports = await start_server(resume_window=60.0)
        await start_client(app.port, ports.control, name="one")
        await start_client(app.port, ports.control, tcp=True)
        third = new_client(app.port, ports.control, name="three")
        with pytest.raises(Refused, match=r"holds 2 tunnels, its most"):
            async with asyncio.timeout(STEP_TIMEOUT):  # refused, not retried
                await third.run()
        assert await visit(ports.public, "one") == (200, b"first")  # the others serve on
