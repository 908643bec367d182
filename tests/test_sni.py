"""TLS tunnels by SNI (stage 21 on): the ClientHello parser, the server's TLS port, the inspector's entry.

The parser (sni.py) is fed real ClientHellos, made by Python's own TLS (ssl.MemoryBIO: the
handshake stops at the hello, waiting for an answer), in every split, and anything Hypothesis
makes. The TLS port is tried with real clients: curl and Python's ssl, through a server and a
client started as a learner would, to hypercorn serving HTTP/2 with its own certificate from a
CA of its own, which the server never sees.
"""

import asyncio
import contextlib
import importlib
import logging
import random
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

import tls_certs
from support import SECRET, STEP_TIMEOUT, CliProcess, free_port, make_client

pytestmark = pytest.mark.since("sni")

NAME = "myapp"
HOST = f"{NAME}.localhost"


def client_hello(server_name: str | None, alpn: tuple[str, ...] = ("h2", "http/1.1"), tls12: bool = False) -> bytes:
    """The ClientHello Python's TLS sends for `server_name` (None: no SNI), taken from its outgoing buffer."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(list(alpn))
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):  # it waits for the server's answer: the hello is out
        tls.do_handshake()
    return outgoing.read()


def sni_module(stage: str) -> Any:
    return importlib.import_module(f"{stage}.sni")


# --- the parser ---------------------------------------------------------------------------------


@pytest.mark.parametrize("server_name", ["myapp.localhost", "A-b.Tunnel.example.com", "x" * 63 + ".test"])
@pytest.mark.parametrize("tls12", [False, True])
def test_a_real_hello_fed_byte_by_byte_or_in_random_pieces_gives_its_name(
    stage: str, server_name: str, tls12: bool
) -> None:
    sni = sni_module(stage)
    hello = client_hello(server_name, tls12=tls12)
    parser = sni.Parser()
    answers = [parser.feed(hello[i : i + 1]) for i in range(len(hello))]
    assert answers[-1] == server_name.lower() and set(answers[:-1]) == {None}  # not one byte too early or late
    rng = random.Random(server_name)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(hello)), rng.randint(1, 12)))
        parser = sni.Parser()
        results = [parser.feed(hello[a:b]) for a, b in zip([0, *cuts], [*cuts, len(hello)], strict=True)]
        assert results[-1] == server_name.lower()


def test_a_hello_split_over_several_records_gives_its_name(stage: str) -> None:
    """A ClientHello may span records (RFC 8446 5.1): the parser joins their fragments."""
    sni = sni_module(stage)
    record = client_hello(HOST)
    message = record[5:]
    pieces = [message[i : i + 100] for i in range(0, len(message), 100)]
    records = b"".join(b"\x16\x03\x01" + len(p).to_bytes(2) + p for p in pieces)
    assert sni.Parser().feed(records) == HOST
    assert sni.Parser().feed(records + b"\x17\x03\x03\x00\x01x") == HOST  # what follows is not its business


@pytest.mark.parametrize(
    ("data", "alert"),
    [
        (b"GET / HTTP/1.1\r\nHost: myapp.localhost\r\n\r\n", None),  # not TLS: no alert, a close
        (b"SSH-2.0-OpenSSH_9.2\r\n", None),
        (b"\x16\x02\x00", None),  # version 2.x: not TLS either
        (b"\x16\x03\x01\x00\x00", 50),  # an empty handshake record: decode_error
        (b"\x16\x03\x01\x40\x01", 22),  # a record over 2^14 bytes: record_overflow
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", 10),  # a ServerHello from a client: unexpected_message
        (b"\x16\x03\x01\x00\x04\x01\x00\x00\x00", 50),  # an empty ClientHello: decode_error
        (b"\x16\x03\x01\x00\x04\x01\x01\x00\x00", 40),  # a ClientHello longer than the cap: handshake_failure
    ],
)
def test_what_is_not_a_hello_with_a_name_is_refused_with_the_right_alert(
    stage: str, data: bytes, alert: int | None
) -> None:
    refusal = sni_module(stage).Parser().feed(data)
    assert not isinstance(refusal, str) and refusal is not None, refusal
    assert refusal.alert == alert, refusal


def test_a_hello_without_a_name_asks_for_the_missing_extension(stage: str) -> None:
    sni = sni_module(stage)
    assert sni.Parser().feed(client_hello(None)).alert == sni.MISSING_EXTENSION  # RFC 8446 9.2


def tiny_records(limit: int) -> bytes:
    """A ClientHello that fits under `limit` with its headers, whose body comes 1 byte per record (6 bytes each)."""
    header = b"\x16\x03\x01\x00\x04\x01" + (limit - 20).to_bytes(3)
    return header + b"\x16\x03\x01\x00\x01\x00" * (limit // 6 + 2)


@pytest.mark.timeout(60)  # the bound on time: linear work takes well under a second
def test_the_parser_is_bounded_in_size_and_time(stage: str) -> None:
    """Tiny records that never end the hello: refused at the cap; each byte is read a bounded number of times."""
    sni = sni_module(stage)
    flood, parser = tiny_records(sni.MAX_HELLO), sni.Parser()
    for i in range(len(flood)):  # one byte at a time
        if (result := parser.feed(flood[i : i + 1])) is not None:
            break
    assert result is not None and result.alert == sni.HANDSHAKE_FAILURE, result
    assert i >= sni.MAX_HELLO - 6 and len(parser.raw) <= sni.MAX_HELLO

    def cpu_to_feed(size: int) -> float:  # the best of 3, in this process's CPU time: others' load counts less
        best, flood = float("inf"), tiny_records(size)
        for _ in range(3):
            parser, started = sni.Parser(limit=size), time.process_time()
            for i in range(size):
                parser.feed(flood[i : i + 1])
            best = min(best, time.process_time() - started)
        return best

    # Linear: 8 times the bytes cost about 8 times the time; a parser that reads every record again
    # at each piece costs about 64 times.
    assert cpu_to_feed(sni.MAX_HELLO) < 25 * cpu_to_feed(sni.MAX_HELLO // 8)


@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=20), st.booleans())
def test_any_bytes_in_any_pieces_give_a_name_or_a_clean_refusal(data: bytes, cuts: list[int], real: bool) -> None:
    sni = sni_module("stage_21")
    if real:  # a real hello with bytes of the fuzzer's over it: deep into the extensions too
        hello = bytearray(client_hello(HOST))
        for i, byte in enumerate(data[:8]):
            hello[(cuts[i] if i < len(cuts) else i * 97) % len(hello)] = byte
        data = bytes(hello)
    whole = sni.Parser().feed(data)
    assert whole is None or isinstance(whole, str | sni.Refusal)
    parser = sni.Parser()
    points = sorted({c % (len(data) + 1) for c in cuts})
    answers = [parser.feed(data[a:b]) for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert answers[-1] == whole  # the same answer, however the bytes came


# --- the TLS port, with real clients ------------------------------------------------------------


class App:
    """hypercorn serving a small ASGI app over TLS with its own certificate for HOST, from a CA of its own."""

    def __init__(self, folder: Path) -> None:
        self.ca = trustme.CA(organization_name="the app's own CA")
        issued = self.ca.issue_cert(HOST)
        self.ca_file, self.cert, self.key = folder / "app-ca.pem", folder / "app.pem", folder / "app.key"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        issued.cert_chain_pems[0].write_to_path(str(self.cert))
        issued.private_key_pem.write_to_path(str(self.key))
        self.der = ssl.PEM_cert_to_DER_cert(issued.cert_chain_pems[0].bytes().decode())
        self.port = 0

    @staticmethod
    async def asgi(scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = f"hello from the app over HTTP/{scope['http_version']}\n".encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator["App"]:
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        config = Config()
        self.port = await free_port()
        config.bind = [f"127.0.0.1:{self.port}"]
        config.certfile, config.keyfile = str(self.cert), str(self.key)
        config.accesslog = config.errorlog = None
        stop = asyncio.Event()
        task = asyncio.create_task(serve(self.asgi, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                while True:  # until it listens
                    with contextlib.suppress(OSError):
                        _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                        writer.close()
                        break
                    await asyncio.sleep(0.05)
            yield self
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    async with App(tmp_path).serving() as running:
        yield running


async def tls_tunnel(cli: CliProcess.Factory, stage: str, app: App) -> tuple[CliProcess, int]:
    """A server (its own certificate, not the app's) and a client with a TLS tunnel NAME to `app`; the TLS port."""
    files = tls_certs.certs()
    server_args = ["--cert", str(files.cert), "--key", str(files.key), "--secret", SECRET]
    ports = ["--control-port", "0", "--public-port", "0", "--tls-port", "0"]
    server = await cli("-m", f"{stage}.server", *server_args, *ports)
    control, tls_port = await server.listening("control"), await server.listening("tls")
    assert not {str(app.key), str(app.cert)} & set(server.args)  # the server is never given the app's key
    client = await cli(
        "-m", f"{stage}.client", f"127.0.0.1:{app.port}", "localhost", "--control-port", str(control),
        "--ca", str(files.ca), "--secret", SECRET, "--tls", NAME, "--inspect-port", "0",
    )  # fmt: skip
    await client.expect(rf"tunnel up: tls://{HOST}:{tls_port}")
    return server, tls_port


async def curl(app: App, port: int, *more: str, host: str = HOST) -> subprocess.CompletedProcess[str]:
    args = ["curl", "-sS", "--http2", "--max-time", "10", "--cacert", str(app.ca_file)]
    args += ["--resolve", f"{host}:{port}:127.0.0.1", *more, f"https://{host}:{port}/"]
    return await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, timeout=20)


def handshake(port: int, app: App, host: str | None = HOST) -> ssl.SSLSocket:
    """A TLS connection through the TLS port, with Python's ssl, trusting only the app's CA; h2 offered."""
    context = ssl.create_default_context(cafile=str(app.ca_file))
    context.set_alpn_protocols(["h2", "http/1.1"])
    if host is None:
        context.check_hostname = False
    sock = socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT)
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise


async def test_curl_speaks_http2_end_to_end_with_the_apps_own_certificate(
    stage: str, cli: CliProcess.Factory, app: App
) -> None:
    server, port = await tls_tunnel(cli, stage, app)
    done = await curl(app, port, "-w", "%{http_version}\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello from the app over HTTP/2\n2\n"  # the app's answer, negotiated h2 by ALPN
    with await asyncio.to_thread(handshake, port, app) as tls:  # the certificate is the app's, byte for byte
        assert tls.getpeercert(binary_form=True) == app.der and tls.selected_alpn_protocol() == "h2"
    await server.expect(r"stream \d+ closed, \d+ bytes up, \d+ bytes down")


async def test_an_unknown_name_gets_the_unrecognized_name_alert_and_others_are_still_served(
    stage: str, cli: CliProcess.Factory, app: App
) -> None:
    server, port = await tls_tunnel(cli, stage, app)
    other = "nobody.localhost"
    done = await curl(app, port, host=other)
    assert done.returncode == 35 and "unrecognized name" in done.stderr, (
        done.stderr
    )  # curl: (35) ... tlsv1 unrecognized name
    await server.expect(rf"TLS port: no TLS tunnel is named {other}; sent the alert unrecognized_name \(112\)")
    with pytest.raises(ssl.SSLError, match="MISSING_EXTENSION"):  # no name at all (RFC 8446 9.2)
        await asyncio.to_thread(handshake, port, app, None)
    await server.expect(r"TLS port: the ClientHello names no server \(no SNI\); sent the alert missing_extension")
    assert (await curl(app, port)).stdout == "hello from the app over HTTP/2\n"


async def test_bytes_that_are_not_tls_are_closed_without_an_answer(
    stage: str, cli: CliProcess.Factory, app: App
) -> None:
    server, port = await tls_tunnel(cli, stage, app)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: myapp.localhost\r\n\r\n")
    async with asyncio.timeout(STEP_TIMEOUT):
        assert await reader.read() == b""  # a clean close: to an HTTP client, an alert would be garbage
    writer.close()
    await server.expect(r"TLS port: not TLS: .* not 71; closed")
    assert (await curl(app, port)).stdout == "hello from the app over HTTP/2\n"


async def test_a_hello_that_never_ends_is_closed_after_the_head_timeout(stage: str, start_server: Any) -> None:
    _, ports = await start_server(head_timeout=0.5)
    hello = client_hello(HOST)
    reader, writer = await asyncio.open_connection("127.0.0.1", ports.tls)
    writer.write(hello[:100])
    async with asyncio.timeout(STEP_TIMEOUT):
        assert await reader.read() == b""  # closed, with nothing sent: we never had a whole hello
    writer.close()


async def test_the_inspector_lists_each_tls_connection_with_its_name_and_bytes(
    stage: str, start_server: Any, app: App, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    _, ports = await start_server()
    capture = importlib.import_module(f"{stage}.capture")
    store = capture.Store()
    client = make_client(
        stage, ("127.0.0.1", app.port), "localhost", ports.control,
        name=NAME, tls_tunnel=True, tls=tls_certs.client_context(), store=store,
    )  # fmt: skip
    task = asyncio.create_task(client.run())
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            await client.connected.wait()
        assert client.url == f"tls://{HOST}:{ports.tls}"
        done = await curl(app, ports.tls)
        assert done.returncode == 0, done.stderr
        async with asyncio.timeout(STEP_TIMEOUT):
            while not store.entries or list(store.entries.values())[-1].state == "pending":  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        [entry] = store.entries.values()
        assert (entry.method, entry.target, entry.state) == ("TLS", HOST, "encrypted")
        assert entry.request.wire > 500 and entry.response.wire > 1000  # the hello, the certificate: all counted
        assert "can't see inside" in entry.note and entry.status is None and not entry.request.head
        assert "encrypted end to end" in (capture.replayable(entry) or "")
        assert f"TLS {HOST}, {entry.request.wire} bytes up" in caplog.text
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_tls_tunnels_users_share_the_per_address_limit(stage: str, start_server: Any, app: App) -> None:
    _, ports = await start_server(max_streams_per_address=1)
    client = make_client(
        stage, ("127.0.0.1", app.port), "localhost", ports.control,
        name=NAME, tls_tunnel=True, tls=tls_certs.client_context(),
    )  # fmt: skip
    task = asyncio.create_task(client.run())
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            await client.connected.wait()
        first = await asyncio.to_thread(handshake, ports.tls, app)  # holds the address's one stream
        with first, pytest.raises((ssl.SSLError, OSError)):  # the second is closed: no handshake
            await asyncio.to_thread(handshake, ports.tls, app)
        with await asyncio.to_thread(handshake, ports.tls, app):  # the first gone, the next gets in
            pass
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
