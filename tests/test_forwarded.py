"""Forwarded headers and a guarded tunnel (stage 20 on), with a real Flask app behind the tunnel.

The app is Flask behind werkzeug's ProxyFix(x_for=1, x_proto=1, x_host=1), the way an app behind
one trusted proxy is set up, served by hypercorn in this process (werkzeug's own server closes every
connection, and the later requests of a kept-alive connection are what this stage must get right).
Users connect from 127.0.0.2 (a socket bound to that source address): the tunnel client dials the
app from 127.0.0.1, so an app that sees 127.0.0.2 read it from the header. Every wait is bounded.
"""

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from flask import Flask, jsonify, request, url_for
from hypercorn.asyncio import serve
from hypercorn.config import Config
from werkzeug.middleware.proxy_fix import ProxyFix

import tls_certs
from stage_20 import forwarding
from stage_20.capture import Store
from stage_20.protocol import Policy, Refused
from support import (
    SECRET,
    STEP_TIMEOUT,
    Background,
    CliProcess,
    EchoServer,
    LocalServer,
    accepted,
    free_port,
    make_client,
    pattern_bytes,
    rebind,
    sha256,
    until_logged,
    usage_error,
)

pytestmark = pytest.mark.since("forwarded")
STAGE = "stage_20"
USER = "127.0.0.2"  # where the tests' users connect from
Answer = tuple[int, dict[str, str], bytes]
StartServer = Callable[..., Awaitable[tuple[Any, Any]]]


@pytest.fixture(autouse=True)
def names(stage: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    rebind(globals(), stage, monkeypatch)
    monkeypatch.setitem(globals(), "STAGE", stage)
    caplog.set_level(logging.INFO)


def flask_app() -> Flask:
    """An app that says what it knows of its user: address, scheme, its own absolute URL, and two headers."""
    app = Flask("forwarded")
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)  # type: ignore[method-assign]

    @app.route("/")
    def index() -> Any:
        return jsonify(
            addr=request.remote_addr,
            scheme=request.scheme,
            url=url_for("index", _external=True),
            xff=request.headers.get("X-Forwarded-For"),
            auth=request.headers.get("Authorization"),
        )

    @app.route("/upload", methods=["POST"])
    def upload() -> Any:
        # The WSGI input itself: hypercorn doesn't mark a chunked body's end (wsgi.input_terminated), so
        # werkzeug's get_data() would read nothing of it.
        body = request.environ["wsgi.input"].read()
        return jsonify(sha256=hashlib.sha256(body).hexdigest(), addr=request.remote_addr)

    return app


@pytest.fixture
async def app_port() -> AsyncIterator[int]:
    """The Flask app, served with keep-alive by hypercorn on a free port, until the test ends."""
    port = await free_port()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.errorlog = logging.getLogger("hypercorn.test")
    stop = asyncio.Event()
    task = asyncio.create_task(serve(flask_app(), config, shutdown_trigger=stop.wait, mode="wsgi"))
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            while True:
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                await asyncio.sleep(0.05)
        yield port
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(STEP_TIMEOUT):
                await task


@pytest.fixture
async def tunnel(start_server: StartServer, app_port: int) -> AsyncIterator[Callable[..., Awaitable[tuple[Any, Any]]]]:
    """`await tunnel(policy=..., https=...)`: a server (HTTPS users if asked) and a client named `app`."""
    async with contextlib.AsyncExitStack() as running:

        async def start(policy: Any = None, https: bool = False, local: int = 0, **options: Any) -> tuple[Any, Any]:
            extra = {"domain": tls_certs.DOMAIN, "https": tls_certs.server_context()} if https else {}
            _, ports = await start_server(**extra)
            client = make_client(
                STAGE,
                ("127.0.0.1", local or app_port),
                "127.0.0.1",
                ports.control,
                secret=SECRET,
                tls=tls_certs.client_context(),
                policy=policy or Policy(),
                **{"name": "app", **options},
            )
            await running.enter_async_context(Background(client.run()))
            async with asyncio.timeout(STEP_TIMEOUT):
                await client.connected.wait()
            return client, ports

        yield start


async def connect(
    port: int, https: bool = False, source: str = USER
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A user's connection to the public port from `source` (over TLS for an HTTPS server)."""
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    tls: dict[str, Any] = (
        {"ssl": tls_certs.client_context(), "server_hostname": f"app.{tls_certs.DOMAIN}"} if https else {}
    )
    return await asyncio.open_connection(sock=sock, **tls)


def get(port: int, https: bool = False, host: str = "app", extra: str = "") -> bytes:
    domain = tls_certs.DOMAIN if https else "localhost"
    return f"GET / HTTP/1.1\r\nHost: {host}.{domain}:{port}\r\n{extra}\r\n".encode()


async def answer(reader: asyncio.StreamReader) -> Answer:
    """One response, read by its Content-Length: (status, headers in lower case, body)."""
    async with asyncio.timeout(STEP_TIMEOUT):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = dict((k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:] if line))
        body = await reader.readexactly(int(fields.get("content-length", "0")))
    return int(lines[0].split(" ")[1]), fields, body


async def requests(port: int, *heads: bytes, https: bool = False, source: str = USER) -> list[Answer]:
    """Send each request on ONE connection, each after the answer to the one before (as a browser does)."""
    reader, writer = await connect(port, https, source)
    answers = []
    try:
        for head in heads:
            writer.write(head)
            answers.append(await answer(reader))
            if answers[-1][1].get("connection") == "close":
                break
    finally:
        writer.close()
    return answers


# --- forwarded headers ------------------------------------------------------------------------------


@pytest.mark.parametrize("https", [False, True], ids=["http", "https"])
async def test_a_flask_app_reads_the_users_address_and_scheme_on_every_request(tunnel: Any, https: bool) -> None:
    """ProxyFix reads ours; url_for(_external=True) names the public URL, on the first and the next request."""
    _, ports = await tunnel(https=https)
    scheme = "https" if https else "http"
    domain = tls_certs.DOMAIN if https else "localhost"
    answers = await requests(ports.public, get(ports.public, https), get(ports.public, https), https=https)
    assert len(answers) == 2, answers
    for status, _, body in answers:
        assert status == 200, body
        seen = json.loads(body)
        assert seen["addr"] == USER
        assert seen["scheme"] == scheme
        assert seen["url"] == f"{scheme}://app.{domain}:{ports.public}/"


async def test_a_spoofed_x_forwarded_for_is_appended_to_not_trusted(tunnel: Any) -> None:
    """A user's own X-Forwarded-For (or X_Forwarded_For) stays before ours: the last value, ours, is the user's."""
    _, ports = await tunnel()
    spoofed = "X-Forwarded-For: 6.6.6.6\r\nX_Forwarded_For: 7.7.7.7\r\nX-Forwarded-Proto: https\r\n"
    answers = await requests(ports.public, get(ports.public), get(ports.public, extra=spoofed))
    for status, _, body in answers:
        assert status == 200, body
        assert json.loads(body)["addr"] == USER
        assert json.loads(body)["scheme"] == "http"
    assert json.loads(answers[1][2])["xff"] == f"6.6.6.6, 7.7.7.7, {USER}"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_bodies_reach_the_app_as_they_were_sent_between_rewritten_heads(tunnel: Any, chunked: bool) -> None:
    """Only heads are rewritten: a small body (read with its head) and 300 KB arrive whole; the next head too."""
    _, ports = await tunnel()
    bodies = [b"hello", pattern_bytes(300_000)]
    posts = []
    for body in bodies:
        if chunked:
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:1000], body[1000:]) if c)
            framing, wire = "Transfer-Encoding: chunked", chunks + b"0\r\n\r\n"
        else:
            framing, wire = f"Content-Length: {len(body)}", body
        head = f"POST /upload HTTP/1.1\r\nHost: app.localhost:{ports.public}\r\n{framing}\r\n\r\n"
        posts.append(head.encode() + wire)
    answers = await requests(ports.public, *posts, get(ports.public))
    assert [status for status, _, _ in answers] == [200, 200, 200], answers
    for body, (_, _, seen) in zip(bodies, answers, strict=False):
        assert json.loads(seen) == {"sha256": sha256(body), "addr": USER}
    assert json.loads(answers[2][2])["addr"] == USER


async def test_a_client_can_turn_the_forwarded_headers_off(tunnel: Any) -> None:
    _, ports = await tunnel(policy=Policy(forwarded=False))
    [(status, _, body)] = await requests(ports.public, get(ports.public))
    assert status == 200, body
    assert json.loads(body)["addr"] == "127.0.0.1"  # the tunnel client's address: the app is told nothing
    assert json.loads(body)["xff"] is None


async def test_the_inspector_shows_the_forwarded_headers_as_the_app_got_them(tunnel: Any) -> None:
    store = Store()
    _, ports = await tunnel(store=store)
    [(status, _, _)] = await requests(ports.public, get(ports.public))
    assert status == 200
    heads = [exchange.request.head for exchange in store.entries.values()]
    assert any(f"X-Forwarded-For: {USER}\r\n".encode() in head for head in heads), heads


async def test_a_later_request_for_another_tunnel_gets_a_421_after_the_answer_before_it(
    tunnel: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _, ports = await tunnel()
    answers = await requests(ports.public, get(ports.public), get(ports.public, host="other"))
    assert [status for status, _, _ in answers] == [200, 421]
    assert b"open a new one for other.localhost" in answers[1][2]
    await until_logged(caplog, r"a 421 page after the app's answers")


class Upgrading(LocalServer):
    """An app that switches /ws to another protocol (101, then an echo) and refuses it on /no (400, then HTTP)."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET /ws "):
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                while data := await reader.read(65536):
                    writer.write(data)
            else:
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")  # the next request, as the app got it
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(head), head))
            await writer.drain()
        writer.close()


@pytest.mark.parametrize("path", ["/ws", "/no"])
async def test_what_follows_an_upgrade_waits_for_the_apps_answer(tunnel: Any, path: str) -> None:
    """Bytes right behind an upgrade: the new protocol's after a 101, unchanged; HTTP after a refusal, rewritten."""
    async with Upgrading() as app:
        _, ports = await tunnel(local=app.port)
        reader, writer = await connect(ports.public)
        upgrade = f"GET {path} HTTP/1.1\r\nHost: app.localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        after = b"\x81\x05hello" if path == "/ws" else get(ports.public, extra="X-Forwarded-For: 6.6.6.6\r\n")
        writer.write(upgrade.encode() + after)  # without waiting for the answer
        try:
            if path == "/ws":
                async with asyncio.timeout(STEP_TIMEOUT):
                    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
                    assert await reader.readexactly(len(after)) == after
            else:
                assert (await answer(reader))[0] == 400
                status, _, head = await answer(reader)
                assert status == 200 and f"X-Forwarded-For: 6.6.6.6, {USER}\r\n".encode() in head, head
        finally:
            writer.close()


# --- HTTP/2 said plainly -------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_an_http2_client_is_told_to_use_http_1_1(tunnel: Any, caplog: pytest.LogCaptureFixture) -> None:
    """curl --http2-prior-knowledge reads an HTTP/2 answer (505) that says what to use instead."""
    _, ports = await tunnel()
    process = await asyncio.create_subprocess_exec(
        "curl", "--http2-prior-knowledge", "-sS", "--max-time", "5", f"http://app.localhost:{ports.public}/",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(STEP_TIMEOUT):
        out, err = await process.communicate()
    assert process.returncode == 0, err
    assert b"speaks HTTP/1.1, not HTTP/2" in out and b"curl --http1.1" in out, out
    await until_logged(caplog, r"an HTTP/2 client \(h2c prior knowledge\)")


# --- basic auth -----------------------------------------------------------------------------------------

LOGIN = "Authorization: Basic {}\r\n"
RIGHT = "bWU6czNjcjN0IHB3"  # base64 of "me:s3cr3t pw"


@pytest.mark.parametrize(
    "authorization",
    ["", LOGIN.format("bWU6d3Jvbmc="), LOGIN.format("eW91OnMzY3IzdCBwdw=="), "Authorization: Bearer x\r\n"],
    ids=["none", "wrong password", "wrong user", "not basic"],
)
async def test_basic_auth_refuses_a_user_without_the_right_password(tunnel: Any, authorization: str) -> None:
    _, ports = await tunnel(policy=Policy(basic_auth="me:s3cr3t pw"))
    [(status, fields, _)] = await requests(ports.public, get(ports.public, extra=authorization))
    assert status == 401
    assert fields["www-authenticate"] == 'Basic realm="app.localhost", charset="UTF-8"'


async def test_basic_auth_admits_the_right_password_on_every_request_and_keeps_it_from_the_app(tunnel: Any) -> None:
    _, ports = await tunnel(policy=Policy(basic_auth="me:s3cr3t pw"))
    login = LOGIN.format(RIGHT)
    answers = await requests(
        ports.public, get(ports.public, extra=login), get(ports.public, extra=login), get(ports.public)
    )
    assert [status for status, _, _ in answers] == [200, 200, 401]  # the third came without it
    assert json.loads(answers[0][2])["auth"] is None  # the tunnel's password is not the app's


# --- CIDR rules ----------------------------------------------------------------------------------------------


async def test_cidr_rules_admit_and_refuse_http_users(tunnel: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Allow 127.0.0.0/8 but deny 127.0.0.2: 127.0.0.1 gets in, 127.0.0.2 gets a 403 (a deny rule wins)."""
    _, ports = await tunnel(policy=Policy(allow=("127.0.0.0/8",), deny=("127.0.0.2/32",)))
    [(status, _, body)] = await requests(ports.public, get(ports.public), source="127.0.0.1")
    assert status == 200, body
    [(status, _, body)] = await requests(ports.public, get(ports.public), source=USER)
    assert status == 403 and b"does not admit users from 127.0.0.2" in body


async def test_an_allow_rule_refuses_everyone_else(tunnel: Any) -> None:
    _, ports = await tunnel(policy=Policy(allow=("127.0.0.3",)))
    [(status, _, _)] = await requests(ports.public, get(ports.public), source="127.0.0.1")
    assert status == 403
    [(status, _, _)] = await requests(ports.public, get(ports.public), source="127.0.0.3")
    assert status == 200


async def test_cidr_rules_close_a_tcp_tunnels_refused_users(tunnel: Any, caplog: pytest.LogCaptureFixture) -> None:
    async with EchoServer() as echo:
        client, _ = await tunnel(policy=Policy(deny=("127.0.0.2",)), local=echo.port, name=None, tcp=True)
        port = int(client.tunnel)
        reader, writer = await connect(port, source="127.0.0.1")
        writer.write(b"ping")
        async with asyncio.timeout(STEP_TIMEOUT):
            assert await reader.readexactly(4) == b"ping"
        writer.close()
        reader, writer = await connect(port, source=USER)
        writer.write(b"ping")
        async with asyncio.timeout(STEP_TIMEOUT):
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b""
        writer.close()
        await until_logged(caplog, rf"{USER}:\d+: not admitted to tcp tunnel {port} by its CIDR rules")


# --- what the client may ask for ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "refusal"),
    [
        (Policy(allow=("10.0.0.0/33",)), "not a CIDR network: '10.0.0.0/33'"),
        (Policy(deny=("10.0.0.1",) * 13), "more than 12 CIDR rules"),
        (Policy(basic_auth="me:" + "x" * 200), "longer than 128 bytes"),
    ],
)
async def test_the_server_refuses_what_it_cannot_honour(start_server: StartServer, policy: Any, refusal: str) -> None:
    """The client's own arguments are checked (below); a client that sends more gets a one-line refusal."""
    _, ports = await start_server()
    client = make_client(
        STAGE, ("127.0.0.1", 9), "127.0.0.1", ports.control, tls=tls_certs.client_context(), name="app", policy=policy
    )
    with pytest.raises(Refused, match=refusal):
        async with asyncio.timeout(STEP_TIMEOUT):
            await client.run()


async def test_the_client_checks_its_options(cli: CliProcess.Factory) -> None:
    command = ("-m", f"{STAGE}.client", "localhost:8000", "--ca", str(tls_certs.certs().ca))
    assert "not a CIDR network: '10.0.0.0/33'" in await usage_error(cli, *command, "--allow-cidr", "10.0.0.0/33")
    assert "USER:PASS" in await usage_error(cli, *command, "--basic-auth", "nopassword")
    assert "for HTTP tunnels" in await usage_error(cli, *command, "--tcp", "--basic-auth", "me:pw")
    many = [arg for n in range(13) for arg in ("--deny-cidr", f"10.0.0.{n}")]
    assert "at most 12" in await usage_error(cli, *command, *many)
    await accepted(cli, *command, "--basic-auth", "me:pw", "--allow-cidr", "::1", "--deny-cidr", "10.0.0.0/8")


async def test_the_password_may_come_from_the_environment_and_is_checked_there_too(cli: CliProcess.Factory) -> None:
    """$NGROK_BASIC_AUTH keeps the password out of ps; argparse checks it as it checks --basic-auth."""
    command = ("-m", f"{STAGE}.client", "localhost:8000", "--ca", str(tls_certs.certs().ca))
    process = await cli(*command, env={"NGROK_BASIC_AUTH": "me:" + "x" * 200})
    assert await process.wait() == 2, process.output
    assert "longer than 128 bytes" in process.output and "Traceback" not in process.output


def test_ipv4_mapped_addresses_are_read_as_ipv4() -> None:
    """On a dual-stack socket an IPv4 user is ::ffff:127.0.0.2: its rules and its X-Forwarded-For are IPv4's."""
    assert forwarding.plain("::ffff:127.0.0.2") == "127.0.0.2"
    assert not forwarding.admits(Policy(deny=("127.0.0.0/8",)), "::ffff:127.0.0.2")
    assert forwarding.admits(Policy(allow=("127.0.0.2",)), "::ffff:127.0.0.2")
    assert not forwarding.admits(Policy(allow=("::1",)), "::ffff:127.0.0.2")
