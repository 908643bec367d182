"""Every user on their own (issue 23): an error on one stream ends that stream only, and a reset travels as a reset.

Stages 9 to 11 carry every user of a tunnel as a stream over the client's one connection. Whatever
one user or one app does to its own TCP connection must end that user's stream and nothing else:
the tunnel connection, and every other user on it, go on. And a stream must end the way its
connection did: a reset (RST) on one side is a reset on the other side, and so is a lost tunnel,
or a cut download looks complete to its user and a cut upload to its app.

The peers are real sockets behaving as real ones do (tests/isolation_peers.py): a user who closes
before the answer, a user who half-closes and then resets, an app that answers, half-closes and
then resets. Each hole is shown the way it hurt: a bystander's connection on the same tunnel, and
the client's one "tunnel up" (a second one is a reconnect). The client is spoken by hand (`Raw`)
where a test plays a hostile one. The same holes on a real, slow link (network namespaces):
the tests at the end of this file.
"""

import asyncio
import contextlib
import importlib
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import isolation_peers
import link_lab
import pytest
from hardening import MiB
from isolation_peers import App, read_to_end, reset
from link_lab import SERVER_IP, LinkLab
from test_real_links import start_tunnel

import tls_certs
from nat_lab import APP_PORT, LabProcess
from support import (
    STEP_TIMEOUT,
    Background,
    any_ports,
    client_options,
    control_connection,
    has_tunnels,
    hello,
    make_client,
    make_server,
    open_connection,
    until_logged,
    users_port,
)

# The multiplexed stages: every user of a tunnel is a stream on the client's one connection.
# Issue 23's stream isolation, with the limits that hold it (stage 13) and on every later stage.
SECRET = "isolation-tests-secret"

# Every test runs on each of those stages; the ones about HTTPS users only from stage 16 ("tls") on.
pytestmark = pytest.mark.since("limits")


@pytest.fixture(autouse=True)
def log_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


@dataclass
class Tunnel:
    """A running tunnel of one stage: its server and client in this process, and the local app."""

    server: Any
    client: Any
    port: int  # where users connect
    app: App


class Cable:
    """A TCP relay between the client and the server's control port that a test can cut, as a dying link does.

    Cutting it resets both of its connections: each side loses the tunnel connection at once.
    """

    def __init__(self, target: int) -> None:
        self.target, self.port = target, 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._pipes: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._join, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _join(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        far_reader, far_writer = await open_connection(self.target)
        self._writers += [writer, far_writer]
        for source, sink in ((reader, far_writer), (far_reader, writer)):
            pipe = asyncio.create_task(self._pipe(source, sink))
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(256 * 1024):
                sink.write(data)
                await sink.drain()

    def cut(self) -> None:
        """Reset every connection through the cable."""
        for writer in self._writers:
            if not writer.transport.is_closing():
                reset(writer)
        self._writers.clear()


@contextlib.asynccontextmanager
async def tunnel_of(stage: str, cable: bool = False) -> AsyncIterator[tuple[Tunnel, Cable | None]]:
    """The stage's server and client with a secret (a TCP tunnel from stage 14 on, TLS from 12), and an App.

    With `cable`, the client reaches the server through a Cable the test can cut.
    """
    server = make_server(stage, secret=SECRET)
    ports = await server.listen("127.0.0.1", *any_ports(stage))
    async with App() as app, Cable(ports.control) as relay, Background(server.serve()):
        control = relay.port if cable else ports.control
        options = {"secret": SECRET, "max_backoff": 0.2, **client_options(stage)}
        client = make_client(stage, ("127.0.0.1", app.port), "127.0.0.1", control, **options)
        async with Background(client.run()):
            async with asyncio.timeout(STEP_TIMEOUT):
                await client.connected.wait()
            yield Tunnel(server, client, await users_port(ports, client), app), relay if cable else None


@contextlib.asynccontextmanager
async def tunnel(stage: str) -> AsyncIterator[Tunnel]:
    """`tunnel_of` without a cable."""
    async with tunnel_of(stage) as (running, _):
        yield running


class Bystander:
    """A user on the same tunnel, connected before the trouble: its connection must go on after it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def join(cls, port: int) -> "Bystander":
        reader, writer = await open_connection(port)
        writer.write(b"echo\n")
        bystander = cls(reader, writer)
        await bystander.still_served()
        return bystander

    async def still_served(self) -> None:
        line = f"still here {secrets.token_hex(4)}\n".encode()
        self.writer.write(line)
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                answer = await self.reader.readline()
        except ConnectionResetError:
            answer = b"(reset)"
        assert answer == line, f"the bystander's connection was cut: it read {answer!r}"

    def leave(self) -> None:
        self.writer.close()


def local_port(writer: asyncio.StreamWriter) -> int:
    port: int = writer.get_extra_info("sockname")[1]
    return port


async def logged_before_any_reconnect(caplog: pytest.LogCaptureFixture, pattern: str) -> re.Match[str]:
    """Wait for a line matching `pattern` (one group); fail at once if the client connects again meanwhile.

    A reconnect means that the trouble ended the tunnel connection, not one stream.
    """
    match = await until_logged(caplog, rf"{pattern}|tunnel up(?:.|\n)*tunnel up")
    assert match[1] is not None, "the client reconnected: its tunnel connection was lost"
    return match


async def stream_ended(caplog: pytest.LogCaptureFixture, user: int) -> int:
    """Wait for the server's line about the stream of the user on local port `user`; return its stream id."""
    return int((await logged_before_any_reconnect(caplog, rf"127\.0\.0\.1:{user}: stream (\d+) .*bytes down"))[1])


def reconnects(caplog: pytest.LogCaptureFixture) -> int:
    """How often the client connected again after its first "tunnel up"."""
    return caplog.text.count("tunnel up") - 1


# --- an error on one stream ends that stream only ---------------------------------------------


async def test_a_user_who_leaves_before_the_answer_ends_only_its_own_stream(
    stage: str, caplog: pytest.LogCaptureFixture
) -> None:
    # An impatient browser: its request, then close. The answer comes later, and the user's kernel
    # answers it with a reset, which nobody reads (we stopped reading the user at its EOF); then the
    # app's end (FIN) arrives, and half-closing that connection fails. That ended the tunnel.
    async with tunnel(stage) as running:
        bystander = await Bystander.join(running.port)
        _, writer = await open_connection(running.port)
        writer.write(b"late\n")
        user = local_port(writer)
        writer.close()
        await stream_ended(caplog, user)
        await bystander.still_served()
        bystander.leave()
        assert reconnects(caplog) == 0


async def test_a_user_who_half_closes_then_resets_ends_only_its_own_stream(
    stage: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The same, as an attacker plays it, with no timing to hope for: FIN, then RST, then the app's FIN.
    async with tunnel(stage) as running:
        bystander = await Bystander.join(running.port)
        _, writer = await open_connection(running.port)
        writer.write(b"close-at-eof\n")
        writer.write_eof()
        user = local_port(writer)
        async with asyncio.timeout(STEP_TIMEOUT):
            await running.app.waiting.wait()  # the app read our EOF: the server stopped reading us
        reset(writer)
        running.app.go.set()  # the app closes: its FIN goes to a user that reset
        await stream_ended(caplog, user)
        await bystander.still_served()
        bystander.leave()
        assert reconnects(caplog) == 0


async def test_an_app_that_half_closes_then_resets_ends_only_its_own_stream(
    stage: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The client's side: the app answers and half-closes (the client stops reading it), then resets;
    # the user's FIN comes next, and the client's half-close toward the app failed. That ended the tunnel.
    async with tunnel(stage) as running:
        bystander = await Bystander.join(running.port)
        reader, writer = await open_connection(running.port)
        writer.write(b"half-close-then-reset\n")
        user = local_port(writer)
        assert await read_to_end(reader) == (len(b"the whole answer\n"), "eof")
        running.app.go.set()
        async with asyncio.timeout(STEP_TIMEOUT):
            await running.app.acted.wait()  # the app's reset is on its way to the client
        writer.write_eof()
        stream_id = await stream_ended(caplog, user)
        await logged_before_any_reconnect(caplog, rf"stream ({stream_id}): closed")  # the client had the user's FIN
        await bystander.still_served()
        bystander.leave()
        writer.close()
        assert reconnects(caplog) == 0


# --- a reset travels as a reset -------------------------------------------------------------


async def test_an_apps_reset_reaches_its_user_as_a_reset(stage: str) -> None:
    # Without the tunnel the user reads ECONNRESET; through it, it read a clean end (EOF).
    async with tunnel(stage) as running:
        reader, writer = await open_connection(running.port)
        writer.write(b"reset\n")
        _, ended = await read_to_end(reader)
        writer.close()
        assert ended == "reset"


@contextlib.asynccontextmanager
async def https_user(stage: str, path: str) -> AsyncIterator[tuple[App, asyncio.StreamReader, asyncio.StreamWriter]]:
    """A server whose public port speaks HTTPS, an HTTP tunnel to an App, and a user who asked it for `path`."""
    server = make_server(stage, secret=SECRET, domain=tls_certs.DOMAIN, https=tls_certs.server_context())
    ports = await server.listen("127.0.0.1", *any_ports(stage))
    async with App() as app, Background(server.serve()):
        options = {**client_options(stage), "tcp": False, "name": "app", "secret": SECRET}
        client = make_client(stage, ("127.0.0.1", app.port), "127.0.0.1", ports.control, **options)
        async with Background(client.run()):
            host = f"app.{tls_certs.DOMAIN}"
            async with asyncio.timeout(STEP_TIMEOUT):
                await client.connected.wait()
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", ports.public, ssl=tls_certs.client_context(), server_hostname=host
                )
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            try:
                yield app, reader, writer
            finally:
                writer.close()


@pytest.mark.since("tls")
async def test_an_apps_reset_reaches_an_https_user_as_a_reset(stage: str) -> None:
    # From stage 16 on, users may come over HTTPS: the reset must end the TCP connection under the TLS.
    async with https_user(stage, "/reset") as (_, reader, _):
        assert (await read_to_end(reader))[1] == "reset"


@pytest.mark.since("tls")
async def test_an_https_user_who_closes_ends_its_stream_and_the_app_reads_an_end(
    stage: str, caplog: pytest.LogCaptureFixture
) -> None:
    # TLS has no half-close: the user's close ends its connection both ways, cleanly. Its stream
    # ends, its connection slot is freed, and the app reads an end (EOF), not a reset. (Resetting
    # the TLS connection that was already gone raised in connection_lost: the stream never ended.)
    async with https_user(stage, "/upload") as (app, reader, writer):
        async with asyncio.timeout(STEP_TIMEOUT):
            assert await reader.readline() == b"ready\n"
        writer.close()
        await stream_ended(caplog, local_port(writer))
        async with asyncio.timeout(STEP_TIMEOUT):
            assert await app.ended.get() == "eof"
    assert "Traceback" not in caplog.text, caplog.text[-3000:]


async def test_a_users_reset_reaches_the_app_as_a_reset(stage: str) -> None:
    # An aborted upload (curl -T, then Ctrl-C): the app must not take a cut upload for a whole one.
    async with tunnel(stage) as running:
        reader, writer = await open_connection(running.port)
        writer.write(b"upload\n")
        async with asyncio.timeout(STEP_TIMEOUT):
            assert await reader.readline() == b"ready\n"  # the app is reading
        writer.write(b"the first part of an upload")
        await writer.drain()
        reset(writer)
        async with asyncio.timeout(STEP_TIMEOUT):
            assert await running.app.ended.get() == "reset"


async def test_a_lost_tunnel_resets_its_users_and_their_apps_connections(stage: str) -> None:
    # A lost tunnel connection cuts every stream on it: a download cut short must not look complete
    # to its user (EOF), nor an upload cut short to its app.
    async with tunnel_of(stage, cable=True) as (running, cable):
        assert cable is not None
        downloader, download = await open_connection(running.port)
        download.write(b"download 1000000000\n")
        async with asyncio.timeout(STEP_TIMEOUT):
            await downloader.readexactly(1024 * 1024)  # well under way
        uploader, upload = await open_connection(running.port)
        upload.write(b"upload\n")
        async with asyncio.timeout(STEP_TIMEOUT):
            assert await uploader.readline() == b"ready\n"
        upload.write(b"the first part of an upload")
        await upload.drain()
        cable.cut()
        received, ended = await read_to_end(downloader)
        assert ended == "reset", f"the download was cut after {received + 1024 * 1024} bytes, and ended with EOF"
        async with asyncio.timeout(STEP_TIMEOUT):
            assert await running.app.ended.get() == "reset"
        for writer in (download, upload):
            writer.close()


# --- a hostile client: bytes before its ACK ---------------------------------------------------


class Raw:
    """The client's side of the tunnel connection, spoken by hand: the handshake, then raw frames."""

    def __init__(self, stage: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        self.frames = importlib.import_module(f"{stage}.frames")
        self.reader, self.writer, self.port = reader, writer, port  # port: where its users connect
        self.parser = self.frames.Parser()
        self.got: list[Any] = []

    @classmethod
    async def connect(cls, stage: str, ports: Any) -> "Raw":
        reader, writer = await control_connection(stage, ports.control)
        auth = importlib.import_module(f"{stage}.auth")
        welcome = await auth.client_handshake(reader, writer, SECRET, hello(stage))
        port = int(welcome.tunnel) if has_tunnels(stage) else ports.public  # stage 14 on: a TCP tunnel of its own
        return cls(stage, reader, writer, port)

    def send(self, flags: int, stream_id: int, payload: bytes = b"") -> None:
        self.writer.write(self.frames.encode(self.frames.DATA, flags, stream_id, payload))

    async def until(self, kind: int, flag: int = 0) -> Any:
        """Read frames until one of `kind` carrying `flag` (returned), or the end of the connection (None)."""
        async with asyncio.timeout(STEP_TIMEOUT):
            while True:
                for frame in self.got:
                    if frame.kind == kind and frame.flags & flag == flag:
                        self.got.remove(frame)
                        return frame
                data = await self.reader.read(65536)
                if not data:
                    return None
                self.got += self.parser.feed(data)


@contextlib.asynccontextmanager
async def hostile_client(stage: str) -> AsyncIterator[Raw]:
    """A server, and a client of it that speaks frames by hand."""
    server = make_server(stage, secret=SECRET)
    ports = await server.listen("127.0.0.1", *any_ports(stage))
    async with Background(server.serve()):
        raw = await Raw.connect(stage, ports)
        try:
            yield raw
        finally:
            raw.writer.close()


async def test_a_client_that_ends_a_stream_before_accepting_it_is_cut_off_with_one_line(
    stage: str, caplog: pytest.LogCaptureFixture
) -> None:
    # FIN, then RST, before ACK: the user was half-closed (its answer over), then refused with an
    # error page written after its end: RuntimeError, one traceback per user. Bytes or an end
    # before ACK break the protocol (a refusal can't follow them): the connection ends, one line.
    async with hostile_client(stage) as raw:
        users = []
        for _ in range(20):
            reader, writer = await open_connection(raw.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
            users.append((reader, writer))
            syn = await raw.until(raw.frames.DATA, raw.frames.SYN)
            if syn is None:
                break  # cut off
            raw.send(raw.frames.FIN, syn.stream_id)
            raw.send(raw.frames.RST, syn.stream_id, b"no, after all")
        for reader, writer in users:
            with contextlib.suppress(OSError):
                await read_to_end(reader)
            writer.close()
        goodbye = await raw.until(raw.frames.GO_AWAY)
        assert goodbye is not None and b"before its ACK" in goodbye.payload
    assert "Traceback" not in caplog.text and "RuntimeError" not in caplog.text, caplog.text[-3000:]
    assert len(re.findall("before its ACK", caplog.text)) == 1, caplog.text[-3000:]


async def test_bytes_for_a_user_whose_connection_is_gone_are_dropped_without_a_line_each(
    stage: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The user half-closed, then reset; many small frames for it arrive in one read (a chatty app
    # over a slow link, or a hostile client). asyncio logs "socket.send() raised exception." for
    # every write to a lost connection from the fifth on: a thousand frames, 995 lines.
    async with hostile_client(stage) as raw:
        _, writer = await open_connection(raw.port)
        writer.write(b"hello\n")
        writer.write_eof()
        syn = await raw.until(raw.frames.DATA, raw.frames.SYN)
        raw.send(raw.frames.ACK, syn.stream_id)
        assert await raw.until(raw.frames.DATA, raw.frames.FIN) is not None  # the server stopped reading it
        reset(writer)
        await asyncio.sleep(0.1)  # the reset reaches the server's socket (loopback: at once)
        raw.writer.write(b"".join(raw.frames.encode(raw.frames.DATA, 0, syn.stream_id, b"x") for _ in range(1000)))
        assert await raw.until(raw.frames.DATA, raw.frames.RST) is not None  # the stream is reset, and only it
    assert caplog.text.count("socket.send() raised exception") == 0


# --- the same on a real, slow link ---------------------------------------------------------------
# The server and the user on one host, the client and the app on the other, joined by a shaped veth
# (tests/link_lab.py): the tunnel connection crosses a link it can't outrun, as between a VPS and
# a laptop, and a download in progress is the bystander.

LINK_REASON = link_lab.probe()
PEERS = str(Path(isolation_peers.__file__).resolve())
DOWNLOAD = 256 * MiB  # about 9 s at the link's 250 Mbit/s
# During the download: 5 users who leave before their answer, and 5 apps that half-close, then reset.
IMPATIENT = ("--count", "5", "--every", "0.3")
on_the_link = pytest.mark.skipif(LINK_REASON is not None, reason=f"link lab: {LINK_REASON}")


async def link_tunnel(lab: LinkLab, stage: str) -> tuple[LabProcess, LabProcess, str]:
    """The App at home, the stage's server and client, tunnel up: the app, the client, and where users connect."""
    app = await lab.start("home", "app", PEERS, "app", "--listen", f"127.0.0.1:{APP_PORT}")
    await app.expect("listening")
    _, client, port = await start_tunnel(lab, stage)
    return app, client, f"{SERVER_IP}:{port}"


async def download_on_the_link(lab: LinkLab, address: str) -> LabProcess:
    """A user downloading DOWNLOAD bytes through the tunnel, once it has asked for them."""
    user = await lab.start("server", "user", PEERS, "download", "--connect", address, "--size", str(DOWNLOAD))
    await user.expect("asked")
    return user


async def outcome(process: LabProcess) -> dict[str, Any]:
    """The JSON line a peer printed at its end (a bounded wait for it)."""
    async with asyncio.timeout(120):
        await process.process.wait()
    await process.stop()  # collects the rest of its output
    lines = [line for line in process.lines if line.startswith("{")]
    assert lines, process.output
    answer: dict[str, Any] = json.loads(lines[-1])
    return answer


@pytest.mark.slow
@pytest.mark.timeout(180)
@on_the_link
async def test_on_a_slow_link_users_and_apps_who_leave_early_never_cut_a_download(stage: str) -> None:
    async with LinkLab(say=lambda line: None) as lab:
        _, client, address = await link_tunnel(lab, stage)
        user = await download_on_the_link(lab, address)
        hasty = await lab.start("server", "impatient", PEERS, "impatient", "--connect", address, *IMPATIENT)
        download, left_early = await outcome(user), await outcome(hasty)
        print(f"\n{stage}: {left_early['rounds']} rounds of leaving early during the download: {download}")
        assert download["whole"] and download["ended"] == "eof", client.output
        assert sum("tunnel up" in line for line in client.lines) == 1, client.output


@pytest.mark.slow
@pytest.mark.timeout(180)
@on_the_link
async def test_on_a_slow_link_a_reset_travels_as_a_reset_both_ways(stage: str) -> None:
    async with LinkLab(say=lambda line: None) as lab:
        app, _, address = await link_tunnel(lab, stage)
        user = await lab.start("server", "user", PEERS, "resets", "--connect", address)
        assert (await outcome(user))["app_reset_reached_the_user_as"] == "reset"
        await app.expect("upload ended: reset")  # an "eof" would be a cut upload that looks whole


@pytest.mark.slow
@pytest.mark.timeout(180)
@on_the_link
async def test_on_a_slow_link_a_lost_client_resets_its_users_downloads(stage: str) -> None:
    # The client's machine crashes (SIGKILL: its kernel ends its connections) in the middle of a
    # download: the user must not read a clean end after part of it.
    async with LinkLab(say=lambda line: None) as lab:
        _, client, address = await link_tunnel(lab, stage)
        user = await download_on_the_link(lab, address)
        await asyncio.sleep(1.0)  # well under way, far from done
        client.process.kill()
        download = await outcome(user)
        print(f"\n{stage}: the client was killed during the download: {download}")
        assert download["ended"] == "reset" and download["received"] < DOWNLOAD, download
