"""The inspector (stage 18 on; its live feed and replay from stage 19), end to end.

A real server and client in this process, a real local app, real sockets.

Requests go through the server's public port to a named HTTP tunnel (`Host: t.localhost`: the
server reads the head to route it, then relays it unchanged), over the client's TLS connection; what
the inspector shows is read from its own HTTP API (JSON and server-sent events), as the page reads
it. The command-line tests run the server and the client as a learner would.
"""

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from stage_22.capture import BYTE_LIMIT, ENTRY_OVERHEAD, LIMIT, LOG_RATE, Store
from stage_22.client import Client
from stage_22.inspector import Inspector
from stage_22.observe import BODY_LIMIT, Exchange, parse_head
from stage_22.server import Ports, Server
from support import (
    STEP_TIMEOUT,
    Background,
    CliProcess,
    HttpOrigin,
    LocalServer,
    client_options,
    has,
    http_get,
    make_client,
    make_server,
    open_connection,
    rebind,
    server_port_flags,
    tls_flags,
    until_logged,
)
from tls_certs import certs

STAGE = "stage_22"  # the stage under test, set by `names`
pytestmark = pytest.mark.since("inspector")


@pytest.fixture(autouse=True)
def names(stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """This module's stage names (imported from stage_22, the most complete) are the stage under test's."""
    rebind(globals(), stage, monkeypatch)
    monkeypatch.setitem(globals(), "STAGE", stage)


SECRET = "stage-11-tests-secret"
NAME = "t"  # the tests' tunnel: users reach it with `Host: t.localhost`


class Tunnel:
    """The stage's server and a client holding the HTTP tunnel NAME, the client with an inspector on any free port."""

    def __init__(self, server: Server, ports: Ports, client: Client, inspector: Inspector) -> None:
        self.server, self.ports, self.client, self.inspector = server, ports, client, inspector

    async def api(self, path: str, data: bytes | None = None) -> tuple[int, Any]:
        status, body = await http_get(self.inspector.port, path, data)
        return status, json.loads(body) if body.startswith((b"{", b"[")) else body


Start = Callable[..., Awaitable[Tunnel]]


@pytest.fixture
async def start_tunnel() -> AsyncIterator[Start]:
    async with contextlib.AsyncExitStack() as running:

        async def start(local_port: int, **ring: int) -> Tunnel:
            server = make_server(STAGE, secret=SECRET)
            ports = await server.listen("127.0.0.1", 0, 0)
            await running.enter_async_context(Background(server.serve()))
            local_app = [("127.0.0.1", local_port)] if has(STAGE, "live") else []  # where replays go (18 on)
            inspector = Inspector(Store(**ring), *local_app, "127.0.0.1", 0)
            await inspector.listen()
            running.push_async_callback(inspector.close)
            tls = client_options(STAGE)["tls"]  # the test CA; an HTTP tunnel by name, not the shared tests' TCP one
            local = ("127.0.0.1", local_port)
            options = {"tls": tls, "name": NAME, "secret": SECRET, "store": inspector.store}
            client = make_client(STAGE, local, "127.0.0.1", ports.control, **options)
            await running.enter_async_context(Background(client.run()))
            async with asyncio.timeout(STEP_TIMEOUT):
                await client.connected.wait()
            return Tunnel(server, ports, client, inspector)

        yield start


async def raw_request(port: int, request: bytes) -> tuple[str, bytes]:
    """Send `request` on a new connection, read to EOF; return our address (host:port) and the response."""
    reader, writer = await open_connection(port)
    host, source = writer.get_extra_info("sockname")[:2]
    writer.write(request)
    await writer.drain()
    async with asyncio.timeout(STEP_TIMEOUT):
        response = await reader.read()
    writer.close()
    return f"{host}:{source}", response


async def until(check: Callable[[], Awaitable[Any]]) -> Any:
    """Poll `check` (bounded) until it returns something true: the observer sees a request as it ends."""
    async with asyncio.timeout(STEP_TIMEOUT):
        while not (result := await check()):  # noqa: ASYNC110 (the store has no event to wait on)
            await asyncio.sleep(0.02)
        return result


async def test_requests_show_up_with_method_path_status_bytes_and_the_users_address(
    start_tunnel: Start, http_origin: HttpOrigin
) -> None:
    tunnel = await start_tunnel(http_origin.port)
    get = b"GET /first?x=1 HTTP/1.0\r\nHost: t.localhost\r\n\r\n"
    post = b"POST /second HTTP/1.0\r\nHost: t.localhost\r\nContent-Length: 5\r\n\r\nhello"
    user, got = await raw_request(tunnel.ports.public, get)
    _, posted = await raw_request(tunnel.ports.public, post)

    async def both() -> list[dict[str, Any]]:
        listed = (await tunnel.api("/api/requests"))[1]
        return listed if len(listed) == 2 and all(e["state"] == "complete" for e in listed) else []

    second, first = await until(both)  # newest first
    assert (first["method"], first["path"], first["status"]) == ("GET", "/first?x=1", 200)
    assert (first["up"], first["down"]) == (len(get) + len(forwarded(STAGE)), len(got))
    if has(STAGE, "live"):
        assert first["user"] == user  # the address the server saw, carried in the SYN frame (stage 19 on)
    else:
        assert re.fullmatch(r"stream \d+", first["user"]), first  # stage 18 names the stream only
    up = len(post) + len(forwarded(STAGE))
    assert (second["method"], second["path"], second["status"], second["up"]) == ("POST", "/second", 200, up)
    assert second["down"] == len(posted)
    status, detail = await tunnel.api(f"/api/requests/{second['id']}")
    assert status == 200
    assert detail["request"]["body"] == {"size": 5, "kept": 5, "truncated": False, "kind": "text", "text": "hello"}
    assert detail["response"]["body"]["text"] == hashlib.sha256(b"hello").hexdigest()


@pytest.mark.since("live")
async def test_the_event_feed_shows_each_request_live(start_tunnel: Start, http_origin: HttpOrigin) -> None:
    tunnel = await start_tunnel(http_origin.port)
    reader, writer = await open_connection(tunnel.inspector.port)
    writer.write(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % tunnel.inspector.port)
    async with asyncio.timeout(STEP_TIMEOUT):
        assert b"text/event-stream" in await reader.readuntil(b"\r\n\r\n")
        await raw_request(tunnel.ports.public, b"GET /live HTTP/1.0\r\nHost: t.localhost\r\n\r\n")
        while True:  # the request's events come without asking: opened, then complete
            line = await reader.readline()
            if line.startswith(b"data: ") and (event := json.loads(line[6:]))["state"] == "complete":
                break
    assert (event["path"], event["status"]) == ("/live", 200)
    writer.close()


@pytest.mark.since("live")
async def test_replay_goes_to_the_local_app_and_returns_the_new_response(
    start_tunnel: Start, http_origin: HttpOrigin
) -> None:
    tunnel = await start_tunnel(http_origin.port)
    await raw_request(
        tunnel.ports.public, b"POST /again HTTP/1.0\r\nHost: t.localhost\r\nContent-Length: 4\r\n\r\nbody"
    )
    [original] = await until(lambda: _listed(tunnel))
    session = tunnel.server._tunnels.find(NAME)
    assert session is not None
    mux = session.mux
    assert mux is not None
    streams_before = mux.last_id
    # Without the header a cross-site form can't send, nothing is replayed.
    status, _ = await tunnel.api(f"/api/requests/{original['id']}/replay", data=b"")
    assert status == 403
    status, replayed = await post_replay(tunnel, original["id"])
    assert status == 200, replayed
    assert (replayed["replay_of"], replayed["status"], replayed["state"]) == (original["id"], 200, "complete")
    assert replayed["response"]["body"]["text"] == hashlib.sha256(b"body").hexdigest()
    assert mux.last_id == streams_before  # no stream opened: the replay never went through the tunnel
    listed = (await tunnel.api("/api/requests"))[1]
    assert [e["id"] for e in listed] == [replayed["id"], original["id"]]  # and it is listed, newest first


async def _listed(tunnel: Tunnel) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = (await tunnel.api("/api/requests"))[1]
    return listed if listed and all(e["state"] == "complete" for e in listed) else []


async def post_replay(tunnel: Tunnel, exchange_id: int) -> tuple[int, Any]:
    reader, writer = await open_connection(tunnel.inspector.port)
    port = tunnel.inspector.port
    writer.write(f"POST /api/requests/{exchange_id}/replay HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
    writer.write(b"X-Inspector: replay\r\nContent-Length: 0\r\n\r\n")
    async with asyncio.timeout(STEP_TIMEOUT):
        response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.since("live")
async def test_a_replay_of_an_unknown_request_is_refused(start_tunnel: Start, http_origin: HttpOrigin) -> None:
    tunnel = await start_tunnel(http_origin.port)
    status, answer = await post_replay(tunnel, 999)
    assert status == 409 and "no request 999" in answer["error"]


async def test_a_foreign_host_name_is_refused(start_tunnel: Start, http_origin: HttpOrigin) -> None:
    """DNS rebinding: a web site's name pointed at 127.0.0.1 still sends its name in Host."""
    tunnel = await start_tunnel(http_origin.port)
    _, response = await raw_request(tunnel.inspector.port, b"GET /api/requests HTTP/1.1\r\nHost: evil.test\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 421 ")


@pytest.mark.parametrize(
    "host",
    [
        "127.attacker.example:{port}",
        "127.0.0.1.nip.io:{port}",
        "localhost.attacker.example:{port}",
        "127.0.0.1:1{port}",
    ],
)
async def test_a_name_that_only_begins_like_loopback_is_refused(
    start_tunnel: Start, http_origin: HttpOrigin, host: str
) -> None:
    """DNS rebinding with a name chosen to look local: `127.attacker.example` resolves wherever its owner says."""
    tunnel = await start_tunnel(http_origin.port)
    await raw_request(tunnel.ports.public, b"GET /secret HTTP/1.0\r\nHost: t.localhost\r\nAuthorization: x\r\n\r\n")
    port = tunnel.inspector.port
    for path in ("/api/requests", "/api/requests/1", "/api/events"):
        request = f"GET {path} HTTP/1.1\r\nHost: {host.format(port=port)}\r\n\r\n".encode()
        _, response = await raw_request(port, request)
        assert response.startswith(b"HTTP/1.1 421 "), (path, response[:200])


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "LOCALHOST:{port}"])
async def test_the_loopback_names_with_the_port_are_served(
    start_tunnel: Start, http_origin: HttpOrigin, host: str
) -> None:
    tunnel = await start_tunnel(http_origin.port)
    port = tunnel.inspector.port
    _, response = await raw_request(
        port, f"GET /api/requests HTTP/1.1\r\nHost: {host.format(port=port)}\r\n\r\n".encode()
    )
    assert response.startswith(b"HTTP/1.1 200 ")


async def test_the_page_may_not_be_framed_by_another_site(start_tunnel: Start, http_origin: HttpOrigin) -> None:
    """Clickjacking: a site that frames the inspector under its own buttons could make two clicks replay a webhook.

    Both headers: X-Frame-Options for every browser, CSP's frame-ancestors for those that prefer it.
    (test_inspector_browser.py shows Chromium refusing to frame the page.)
    """
    tunnel = await start_tunnel(http_origin.port)
    port = tunnel.inspector.port
    for path in ("/", "/api/requests"):
        _, response = await raw_request(port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        fields = dict(parse_head(response.partition(b"\r\n\r\n")[0] + b"\r\n\r\n")[1])
        assert fields.get("X-Frame-Options") == "DENY", (path, fields)
        if path == "/":
            assert "frame-ancestors 'none'" in fields["Content-Security-Policy"].split("; "), fields


@pytest.mark.parametrize("depth", [990, 30_000])
async def test_a_deeply_nested_json_body_is_shown_as_text(
    start_tunnel: Start, http_origin: HttpOrigin, depth: int
) -> None:
    """json.loads (and json.dumps) recurse: a body of 30,000 `[` raised RecursionError in the page's request."""
    tunnel = await start_tunnel(http_origin.port)
    body = b"[" * depth + b"]" * depth
    head = b"POST /nested HTTP/1.0\r\nHost: t.localhost\r\nContent-Type: application/json\r\n"
    await raw_request(tunnel.ports.public, head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    [exchange] = await until(lambda: _listed(tunnel))
    status, detail = await tunnel.api(f"/api/requests/{exchange['id']}")
    assert status == 200, detail
    shown = detail["request"]["body"]
    assert shown["kind"] in ("json", "text") and shown["text"].replace("\n", "").replace(" ", "") == body.decode()


class KeepAliveApp(LocalServer):
    """A local app that answers every request on a connection (pipelined or not) with a small page."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                size = int(m[1]) if (m := re.search(rb"(?i)\r\ncontent-length: (\d+)", head)) else 0
                await reader.readexactly(size)
                body = b"page for " + head.split(b" ")[1]
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        writer.close()


async def pipeline(port: int, requests: list[bytes], depth: int = 50) -> None:
    """Send `requests` on one connection, `depth` at a time (pipelined), reading their responses in between."""
    reader, writer = await open_connection(port)
    async with asyncio.timeout(STEP_TIMEOUT * 3):
        for start in range(0, len(requests), depth):
            batch = requests[start : start + depth]
            writer.write(b"".join(batch))
            got = b""
            while got.count(b"HTTP/1.1 200") < len(batch):
                got += await reader.read(1 << 20)
    writer.close()


def accounted(store: Store) -> int:
    return sum(Store.size(e) for e in store.entries.values())


@pytest.mark.slow
async def test_ten_thousand_requests_leave_the_store_bounded(start_tunnel: Start) -> None:
    async with KeepAliveApp() as app:
        tunnel = await start_tunnel(app.port)
        batches = [
            [b"GET /n/%d-%d HTTP/1.1\r\nHost: t.localhost\r\n\r\n" % (c, i) for i in range(500)] for c in range(20)
        ]
        await asyncio.gather(*(pipeline(tunnel.ports.public, batch) for batch in batches))
        store = tunnel.inspector.store
        await until(lambda: asyncio.sleep(0, store._next_id > 10_000))
        assert len(store.entries) == LIMIT  # the last 500 of 10,000
        assert store.bytes == accounted(store) <= BYTE_LIMIT
        assert all(e.state == "complete" for e in store.entries.values())


@pytest.mark.since("speed")
async def test_past_the_log_rate_the_client_counts_exchanges_and_says_how_many(
    start_tunnel: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """Each exchange is logged on its line up to LOG_RATE a second; the rest are counted, and the count logged."""
    caplog.set_level(logging.INFO)
    sent = 3 * LOG_RATE
    async with KeepAliveApp() as app:
        tunnel = await start_tunnel(app.port)
        await pipeline(
            tunnel.ports.public, [b"GET /r/%d HTTP/1.1\r\nHost: t.localhost\r\n\r\n" % i for i in range(sent)]
        )
        await until_logged(caplog, r"\d+ more exchanges in the last second")  # logged once that second is over
    lines = re.findall(r": GET /r/\d+ -> 200", caplog.text)
    counted = [int(n) for n in re.findall(r"(\d+) more exchanges in the last second", caplog.text)]
    # Every exchange is in the log, on its line or in a count; a second that counted some showed LOG_RATE lines.
    assert len(lines) + sum(counted) == sent, (len(lines), counted)
    assert LOG_RATE <= len(lines) < sent, (len(lines), counted)


@pytest.mark.slow
async def test_big_bodies_are_bounded_by_the_bytes_of_the_ring(start_tunnel: Start) -> None:
    async with KeepAliveApp() as app:
        tunnel = await start_tunnel(app.port, byte_limit=1024 * 1024)
        body = b"b" * (BODY_LIMIT + 1000)
        post = b"POST /up HTTP/1.1\r\nHost: t.localhost\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        await pipeline(tunnel.ports.public, [post] * 100)
        store = tunnel.inspector.store
        await until(lambda: asyncio.sleep(0, store._next_id > 100))
        assert store.bytes == accounted(store) <= 1024 * 1024  # 100 x 64 KiB kept would be 6.4 MiB
        assert 10 <= len(store.entries) < 20


def forwarded(stage: str) -> bytes:
    """What the server adds to each head of a user of t.localhost from 127.0.0.1 (stage 20 on: forwarding.py)."""
    lines = b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: t.localhost\r\n"
    return lines if has(stage, "forwarded") else b""


class Silent(LocalServer):
    """A local app that reads every request and never answers; counts the bytes it read."""

    received = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(1 << 20):
                self.received += len(data)
        writer.close()


async def test_requests_still_waiting_for_answers_count_in_the_ring_until_they_end(start_tunnel: Start) -> None:
    """The ring drops its oldest entries, but a connection's observer holds those still waiting for an answer.

    With a ring of 256 KiB, 20 users pipelining 64 requests each to an app that never answers leave
    1,280 such exchanges: the ring counts them (at ENTRY_OVERHEAD, their heads dropped), lists
    fewer, and once it is full of them observes no more; when the users leave, it lets them all go.
    """
    byte_limit = 256 * 1024
    async with Silent() as app:
        tunnel = await start_tunnel(app.port, byte_limit=byte_limit)
        store = tunnel.inspector.store
        filler = b"X-Filler: %s\r\n" % (b"f" * 2000)
        requests = b"".join(b"GET /%d HTTP/1.1\r\nHost: t.localhost\r\n%s\r\n" % (n, filler) for n in range(64))
        users = [await open_connection(tunnel.ports.public) for _ in range(20)]
        for _, writer in users:
            writer.write(requests)
        sent = len(requests) + 64 * len(forwarded(STAGE))
        await until(lambda: asyncio.sleep(0, app.received == 20 * sent))
        # Everything the client holds of them, listed or not (the observers hold the others), within the
        # ring's bound; each connection's observer may hold one more, the one it stopped at.
        gc.collect()  # what is left of earlier tests: only what something still holds counts
        # (From stage 20 on the server frames the requests too; its exchanges keep nothing, keep_limit -1.)
        held = [o for o in gc.get_objects() if isinstance(o, Exchange) and o.keep_limit >= 0]
        assert sum(map(Store.size, held)) <= byte_limit + len(users) * ENTRY_OVERHEAD
        assert len(held) > len(store.entries)  # some are held by their observers only
        assert store.bytes == accounted(store) + ENTRY_OVERHEAD * len(store._pending_dropped) <= byte_limit
        assert store._next_id - 1 < 20 * 64  # the ring filled with them, and later requests were not recorded
        for _, writer in users:
            writer.close()
        await until(lambda: asyncio.sleep(0, not store._pending_dropped))  # each stream's end ends its exchanges
        assert store.bytes == accounted(store)
        assert all(e.state != "pending" for e in store.entries.values())


class Download(LocalServer):
    """A local app that sends a body of the size asked for (GET /N), with Content-Length, in big writes."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            size = int(head.split(b" ")[1][1:])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % size)
            block = bytes(range(256)) * 4096  # 1 MiB
            while size > 0:
                writer.write(block[:size])
                await writer.drain()
                size -= len(block)
        writer.close()


BIG = 1024 * 1024 * 1024  # 1 GiB: about 3 s through the tunnel on loopback here


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_big_download_is_kept_only_up_to_the_bound_and_arrives_intact(start_tunnel: Start) -> None:
    async with Download() as app:
        tunnel = await start_tunnel(app.port)
        reader, writer = await open_connection(tunnel.ports.public)
        writer.write(b"GET /%d HTTP/1.1\r\nHost: t.localhost\r\n\r\n" % BIG)
        head = await reader.readuntil(b"\r\n\r\n")
        digest, received = hashlib.sha256(), 0
        async with asyncio.timeout(100):
            while chunk := await reader.read(1 << 20):
                digest.update(chunk)
                received += len(chunk)
        writer.close()
        expected = hashlib.sha256()
        block = bytes(range(256)) * 4096
        for _ in range(BIG // len(block)):
            expected.update(block)
        assert (received, digest.hexdigest()) == (BIG, expected.hexdigest())
        [exchange] = await until(lambda: asyncio.sleep(0, [e for e in tunnel.inspector.store.entries.values()]))
        await until(lambda: asyncio.sleep(0, exchange.state == "complete"))
        assert (exchange.response.body_size, len(exchange.response.body)) == (BIG, BODY_LIMIT)
        assert exchange.response.wire == len(head) + BIG
        assert tunnel.inspector.store.bytes < 2 * BODY_LIMIT


# --- the command line -------------------------------------------------------------------------


async def start_server_cli(cli: CliProcess.Factory) -> int:
    args = ("-m", f"{STAGE}.server", *server_port_flags(STAGE), *tls_flags(STAGE))
    server = await cli(*args, env={"NGROK_SECRET": SECRET})
    return await server.listening("control")


def client_args(control: int, *flags: str) -> tuple[str, ...]:
    """A CLI client of the server on `control` (trusting the test CA), its local app nowhere: 127.0.0.1:1."""
    return (
        "-m",
        f"{STAGE}.client",
        "127.0.0.1:1",
        "127.0.0.1",
        "--control-port",
        str(control),
        "--ca",
        str(certs().ca),
        *flags,
    )


async def test_the_client_serves_the_inspector_on_loopback(cli: CliProcess.Factory) -> None:
    control = await start_server_cli(cli)
    client = await cli(*client_args(control, "--inspect-port", "0"), env={"NGROK_SECRET": SECRET})
    match = await client.expect(r"inspector port listening on (\S+):(\d+)")
    assert match[1] == "127.0.0.1"
    status, page = await http_get(int(match[2]), "/")
    assert status == 200 and b"<title>ngrok-- inspector</title>" in page


async def test_no_inspect_serves_no_port(cli: CliProcess.Factory) -> None:
    control = await start_server_cli(cli)
    client = await cli(*client_args(control, "--no-inspect"), env={"NGROK_SECRET": SECRET})
    await client.expect(r"tunnel up")
    assert "inspector" not in client.output


async def test_an_inspect_port_in_use_is_a_one_line_error(cli: CliProcess.Factory) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        client = await cli("-m", f"{STAGE}.client", "127.0.0.1:1", "127.0.0.1:1", "--inspect-port", str(port))
        assert await client.wait() == 1
    assert "Traceback" not in client.output
    assert client.lines[-1] == (
        f"error: port {port} on 127.0.0.1 is already in use; stop the other program or pick another --inspect-port"
    )
