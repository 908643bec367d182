"""Test helpers: an echo server, a real HTTP origin, CLI subprocesses, and raw-socket clients."""

import asyncio
import contextlib
import dataclasses
import hashlib
import http.server
import importlib
import importlib.util
import os
import re
import signal
import socket
import struct
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Self

import pytest

import tls_certs

# --- the ladder: which stage brings which idea -------------------------------------------------
# Stages 0-3 are the Go original's (a tunnel, a control connection, a proxy connection per user);
# from stage 4 on each stage adds one idea, and every later stage keeps it. A test of an idea runs
# on the stage that brings it and on every later one: `stages_from("flow")`, or `@pytest.mark.since
# ("flow")` on a test that takes a `stage` argument (conftest.py parametrizes it).
LADDER = {
    "frames": 4,  # the hello/welcome handshake, then binary frames on the control connection (frames.Parser)
    "streams": 5,  # every user a stream over the client's one connection: frames, a multiplexer
    "answers": 6,  # a stream's answer (ACK, or RST with the reason; the server's 502 page) and resets both ways
    "callbacks": 7,  # the data path on asyncio Protocols (no task per direction)
    "fastpath": 8,  # the measured fast paths: first bytes behind the SYN, zero-copy payloads, one send per turn
    "flow": 9,  # per-stream windows, fair turns, the memory budget
    "resume": 10,  # heartbeats, reconnect with backoff, session id and resume window, GO_AWAY
    "auth": 11,  # the shared secret (HMAC challenge)
    "pages": 12,  # the error pages a user sees, one log line per request
    "limits": 13,  # descriptors, timeouts, bounds, isolation between users
    "tenants": 14,  # many clients, a TCP tunnel each, MAX_TUNNELS
    "names": 15,  # NAME.domain on the shared public port, Host routing
    "tls": 16,  # the client's connection over TLS, HTTPS for users
    "observer": 17,  # HTTP/1.1 framing of each stream, sans I/O (observe.py)
    "inspector": 18,  # the inspector page
    "live": 19,  # the live feed and replay
    "forwarded": 20,  # X-Forwarded-* on every request, h2c said plainly, basic auth and CIDR rules at the server
    "sni": 21,  # TLS tunnels: the server's TLS port routes a ClientHello by its server name (sni.py)
    "speed": 22,  # --loop uvloop|asyncio|auto, nothing that relies on a loop's own classes, a cheaper new connection
}

ROOT = Path(__file__).resolve().parent.parent


def stage_number(stage: str) -> int:
    """16 for "stage_16"."""
    return int(stage.removeprefix("stage_"))


def all_stages() -> tuple[str, ...]:
    """Every stage folder of the repository, numerically sorted (stage_10 after stage_9)."""
    found = (p.name for p in ROOT.glob("stage_[0-9]*") if (p / "__init__.py").is_file())
    return tuple(sorted(found, key=stage_number))


def stages_from(idea: str) -> tuple[str, ...]:
    """Every existing stage from the one that brings `idea` (a key of LADDER) to the last, in order."""
    first = LADDER[idea]
    return tuple(stage for stage in all_stages() if stage_number(stage) >= first)


def has(stage: str, idea: str) -> bool:
    """True if `stage` has `idea` (brought by it or by an earlier stage)."""
    return stage_number(stage) >= LADDER[idea]


def rebind(namespace: dict[str, Any], stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point a test module's names imported from a stage at the same names of `stage`, for one test.

    A test file of an idea imports what it tests from the most complete stage (`from stage_22.frames
    import Parser`: every name exists there, so the file always loads), and its autouse fixture calls
    this with the stage under test: modules, classes and functions then come from that stage, and one
    the stage lacks is removed (only tests of a later idea use it, and they do not run on this stage).
    Constants (numbers, strings) know no module: one found under its name in a stage module is taken
    from the same module of `stage` if it has it, else kept. monkeypatch puts every name back after.
    """
    targets: dict[str, tuple[str, str | None, bool]] = {}  # name -> (submodule, attribute, required)
    for name, value in namespace.items():
        if isinstance(value, ModuleType):
            if match := STAGE_MODULE.fullmatch(value.__name__):
                targets[name] = (match[1] or "", None, True)
        elif (
            (home := getattr(value, "__module__", None))
            and (match := STAGE_MODULE.fullmatch(home))
            and getattr(value, "__name__", None) == name
        ):
            targets[name] = (match[1] or "", name, True)
    modules = [m for m in list(sys.modules.values()) if m is not None and STAGE_MODULE.fullmatch(m.__name__)]
    for name, value in namespace.items():
        if name in targets or name.startswith("_") or isinstance(value, ModuleType) or callable(value):
            continue
        for module in modules:
            if "." in module.__name__ and getattr(module, name, rebind) is value:  # rebind: no constant
                targets[name] = ("." + module.__name__.split(".", 1)[1], name, False)
                break
    for name, (submodule, attribute, required) in targets.items():
        try:
            target = importlib.import_module(stage + submodule)
            if attribute is not None:
                target = getattr(target, attribute)
        except (ImportError, AttributeError):
            if required:
                monkeypatch.delitem(namespace, name)
        else:
            monkeypatch.setitem(namespace, name, target)


STAGE_MODULE = re.compile(r"stage_\d+(\.\w+)?")


def first_and_last(stages: tuple[str, ...]) -> tuple[str, ...]:
    """The stage that introduces a behaviour and the most complete one: where heavy tests run in full."""
    return tuple(dict.fromkeys(stages[:1] + stages[-1:]))


# Every await in a test that depends on a peer gets this bound, so a bug
# fails the test quickly instead of hanging it until the global timeout.
STEP_TIMEOUT = 10.0

LISTENING = re.compile(r"(\w+) port listening on (\S+):(\d+)")


async def open_connection(
    port: int, host: str = "127.0.0.1", source: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a local port with a deadline, from the address `source` if given (loopback is all of 127/8)."""
    async with asyncio.timeout(STEP_TIMEOUT):
        return await asyncio.open_connection(host, port, local_addr=(source, 0) if source else None)


async def exchange(port: int, payload: bytes, host: str = "127.0.0.1", source: str | None = None) -> bytes:
    """Send `payload`, half-close, and return everything received until EOF (from `source`, if given)."""
    reader, writer = await open_connection(port, host, source)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        async with asyncio.timeout(STEP_TIMEOUT * 3):
            return await reader.read()
    finally:
        writer.close()


async def free_port() -> int:
    """A port that nothing listens on (bound, then closed again): a server that is down."""
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port: int = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    return port


@contextlib.contextmanager
def unanswering_port() -> Iterator[int]:
    """A port on 127.0.0.1 where a connect hangs, as it does to a host whose firewall drops packets.

    A listener that never accepts, its queue filled: the kernel then drops every further SYN.
    (Loopback only: the tests send nothing beyond 127.0.0.0/8.)
    """
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    queued: list[socket.socket] = []
    try:
        for _ in range(16):  # Linux queues backlog + 1 connections; the first that hangs shows it is full
            probe = socket.socket()
            probe.settimeout(0.5)
            try:
                probe.connect(listener.getsockname())
            except TimeoutError:
                probe.close()
                break
            queued.append(probe)
        else:
            raise RuntimeError("could not fill a listener's queue: connects to it never hang here")
        yield listener.getsockname()[1]
    finally:
        for sock in [*queued, listener]:
            sock.close()


async def connect_all(
    address: tuple[str, int], count: int, rcvbuf: int = 0, source: str = "", batch: int = 100
) -> list[socket.socket]:
    """`count` raw connections, `batch` at a time (the server's accept queue is finite); all closed on a failure."""
    loop = asyncio.get_running_loop()

    async def one() -> socket.socket:
        sock = socket.socket()
        try:
            if rcvbuf:  # before connecting: it also sets the window TCP offers
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if source:
                sock.bind((source, 0))
            sock.setblocking(False)
            async with asyncio.timeout(STEP_TIMEOUT):
                await loop.sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return sock

    socks: list[socket.socket] = []
    try:
        for start in range(0, count, batch):
            socks += await asyncio.gather(*(one() for _ in range(min(batch, count - start))))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


async def send_until_stuck(writer: asyncio.StreamWriter, chunk: bytes, limit: int, stuck_after: float = 2.0) -> int:
    """Write `chunk` again and again until the peer takes no more, or `limit` bytes went out; return the bytes sent."""
    sent = 0
    while sent < limit:
        writer.write(chunk)
        try:  # stuck: the drain does not finish in `stuck_after` seconds, as with a peer that reads nothing
            async with asyncio.timeout(stuck_after):
                await writer.drain()
        except TimeoutError:
            break
        sent += len(chunk)
    return sent


def reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with a TCP reset (RST) instead of a clean FIN, as a crashed peer does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # linger on, 0 s: reset
    writer.transport.abort()


async def until_logged(caplog: pytest.LogCaptureFixture, pattern: str) -> re.Match[str]:
    """Wait (bounded) until a captured log line matches `pattern`; return the match."""
    async with asyncio.timeout(STEP_TIMEOUT):
        while True:
            if match := re.search(pattern, caplog.text):
                return match
            await asyncio.sleep(0.01)  # caplog has no event to wait on


def sha256(data: bytes) -> str:
    """Hex digest, so that a failing assertion on megabytes prints two short strings."""
    return hashlib.sha256(data).hexdigest()


def pattern_bytes(size: int, seed: int = 0) -> bytes:
    """`size` bytes that differ for every seed and position, cheap to make."""
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


class LocalServer:
    """A TCP server on 127.0.0.1, any free port; `handle` runs once per connection.

    Leaving the `async with` block cancels and awaits every connection's task.
    """

    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        # A deep accept queue, like a real server's: tests send a thousand users at once.
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, backlog=2048)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.get_running_loop().create_task(self.handle(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection (subclasses say how)."""
        raise NotImplementedError


class EchoServer(LocalServer):
    """A TCP server on 127.0.0.1 that echoes every byte and passes EOF back (half-close aware)."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(256 * 1024):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except OSError:
            pass
        finally:
            writer.close()


PAGE = b"<!doctype html><title>local app</title><h1>Hello from the local app</h1>\n"


class _OriginHandler(http.server.BaseHTTPRequestHandler):
    """GET / -> PAGE; GET /bytes/N -> N pattern bytes; POST -> SHA-256 of the body."""

    def do_GET(self) -> None:
        if match := re.fullmatch(r"/bytes/(\d+)", self.path):
            body = pattern_bytes(int(match[1]))
            content_type = "application/octet-stream"
        else:
            body, content_type = PAGE, "text/html"
        self._reply(body, content_type)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        digest = hashlib.sha256()
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            length -= len(chunk)
        self._reply(digest.hexdigest().encode(), "text/plain")

    def _reply(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep the test output quiet


class HttpServer(http.server.ThreadingHTTPServer):
    """`http.server`'s threaded server with a real listen backlog."""

    # socketserver's default backlog is 5: a browser (or a burst of users) opens more connections at
    # once, and on a busy machine the server thread accepts them late. The kernel then drops the
    # surplus SYNs and the client retries after 1 s, 3 s, 7 s...: a page load took over 30 s.
    request_queue_size = 128


class HttpOrigin:
    """A real threaded `http.server` on 127.0.0.1, the 'local app' of the tests."""

    def __init__(self) -> None:
        self._httpd = HttpServer(("127.0.0.1", 0), _OriginHandler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def stop(self) -> None:
        """Stop accepting, as if the local app went down."""
        self.__exit__(None, None, None)


async def http_request(port: int, request: bytes, host: str = "127.0.0.1") -> tuple[int, bytes, bytes]:
    """Send a raw HTTP/1.0 request, read to EOF, return (status, head, body)."""
    response = await exchange(port, request, host)
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, head, body


def _urlopen(url: str, data: bytes | None, host: str | None) -> tuple[int, bytes]:
    # A real HTTP client, with proxies from the environment switched off: this is loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, data=data, headers={"Host": host} if host else {})
    try:
        with opener.open(request, timeout=STEP_TIMEOUT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


async def http_get(port: int, path: str = "/", data: bytes | None = None, host: str | None = None) -> tuple[int, bytes]:
    """GET (or POST `data`) http://127.0.0.1:PORT/PATH with urllib in a thread; return (status, body).

    `host`: the Host header to send instead (`myapp.localhost:PORT`: a tunnel's name, from stage 15 on).
    """
    return await asyncio.to_thread(_urlopen, f"http://127.0.0.1:{port}{path}", data, host)


def hear_ctrl_c() -> None:
    """In a child before it starts: let SIGINT stop it again (see CliProcess.start)."""
    # A test run started as a background job from a script (`make test &`) inherits SIGINT as
    # "ignored", and so would every program it starts: Python then never raises
    # KeyboardInterrupt, and a test's Ctrl-C would not stop the stage. Undo that in the child.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class CliProcess:
    """A `python -m ...` subprocess whose combined stdout/stderr is collected line by line.

    A background task reads the output all the time: a process that logs a lot
    (a flood test) would otherwise block on a full pipe, which is the test's
    fault, not the program's.
    """

    Factory = Callable[..., Awaitable["CliProcess"]]

    def __init__(self, process: asyncio.subprocess.Process, args: tuple[str, ...]) -> None:
        self.process = process
        self.args = args
        self.lines: list[str] = []
        self._cursor = 0
        self._more = asyncio.Event()  # set whenever a line arrives or the output ends
        self._collector = asyncio.create_task(self._collect())

    @classmethod
    async def start(cls, *args: str, cwd: Path, env: dict[str, str] | None = None) -> "CliProcess":
        """Run `python -u -P ARGS` in `cwd`, with the parent's environment plus `env`.

        `-m` would put `cwd` first on the child's sys.path, ahead of PYTHONPATH: the child would
        import the repository's stage, not a workshop copy (see conftest.py). `-P` leaves it out.
        """
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-u",
            "-P",
            *args,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=hear_ctrl_c if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else None,
        )
        return cls(process, args)

    async def _collect(self) -> None:
        assert self.process.stdout is not None
        try:
            while raw := await self.process.stdout.readline():
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._more.set()
        finally:
            self._more.set()

    async def expect(self, pattern: str | re.Pattern[str], timeout: float = STEP_TIMEOUT) -> re.Match[str]:
        """Wait for the next output line matching `pattern` (lines not yet searched are searched first)."""
        regex = re.compile(pattern)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    while self._cursor < len(self.lines):
                        self._cursor += 1
                        if match := regex.search(self.lines[self._cursor - 1]):
                            return match
                    if self._collector.done():
                        raise AssertionError(f"{self.args} exited before printing {regex.pattern!r}:\n{self.output}")
                    self._more.clear()
                    await self._more.wait()
        except TimeoutError:
            raise AssertionError(f"{self.args} did not print {regex.pattern!r} in {timeout}s:\n{self.output}") from None

    async def listening(self, role: str) -> int:
        """Wait for '<role> port listening on HOST:PORT' and return PORT."""
        match = await self.expect(rf"\b{role} port listening on (\S+):(\d+)")
        return int(match[2])

    async def wait(self, timeout: float = STEP_TIMEOUT) -> int:
        """Wait for the process to exit and its output to end; return its exit code."""
        async with asyncio.timeout(timeout):
            await asyncio.shield(self._collector)
            return await self.process.wait()

    async def interrupt(self) -> int:
        """Press Ctrl-C (SIGINT) and return the exit code."""
        self.process.send_signal(signal.SIGINT)
        return await self.wait()

    async def stop(self) -> None:
        """Stop the process if it still runs: SIGINT, then SIGKILL after a grace period."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGINT)
            try:
                await self.wait(5)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        await self._collector

    @property
    def output(self) -> str:
        """Everything the process printed so far."""
        return "\n".join(self.lines)


async def usage_error(cli: CliProcess.Factory, *args: str) -> str:
    """Run a program that must refuse its command line: exit 2, no traceback; return argparse's error line."""
    process = await cli(*args)
    assert await process.wait() == 2, process.output
    assert "Traceback" not in process.output
    return process.lines[-1]


async def accepted(cli: CliProcess.Factory, *args: str) -> None:
    """A command line the program must accept: with --help after it, argparse checks it all, then exits 0."""
    process = await cli(*args, "--help")
    assert await process.wait() == 0, process.output


class Background:
    """Run a server's `serve()` coroutine as a task; cancel and await it on exit."""

    def __init__(self, coro: Awaitable[None]) -> None:
        self._coro = coro
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self.task = asyncio.ensure_future(self._coro)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self.task is not None
        if self.task.done():
            self.task.result()  # surface a crash of the server as the test's failure
            return
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


# --- what differs between the stages' ports -----------------------------------------------------
# Up to stage 4 the server has a proxy port (one proxy connection per user); from stage 5 on the
# client's one connection carries every user, so there is none. Tests that run against several
# stages ask these helpers instead of spelling out the ports.


def has_proxy_port(stage: str) -> bool:
    """True if the stage's server listens on a proxy port (stages 2 to 4)."""
    return not has(stage, "streams") and hasattr(importlib.import_module(f"{stage}.protocol"), "PROXY_PORT")


def port_roles(stage: str) -> tuple[str, ...]:
    """The roles of the ports the stage's server binds, in the order its `listen()` takes them."""
    if has(stage, "sni"):
        return ("control", "public", "tls")  # the TLS port of TLS tunnels (stage 21 on)
    return ("control", "public", "proxy") if has_proxy_port(stage) else ("control", "public")


def any_ports(stage: str) -> list[int]:
    """Port 0 (any free port) for each port the stage's server binds: `server.listen(host, *any_ports(stage))`."""
    return [0] * len(port_roles(stage))


def client_ports(ports: Any) -> tuple[int, ...]:
    """The ports a stage's Client takes after the server's host: the control port, and the proxy port if any."""
    return (ports.control, ports.proxy) if hasattr(ports, "proxy") else (ports.control,)


def server_port_flags(stage: str) -> list[str]:
    """`--control-port 0 --public-port 0 [--proxy-port 0]` for the stage's server command line."""
    return [flag for role in port_roles(stage) for flag in (f"--{role}-port", "0")]


def client_port_flags(ports: dict[str, int]) -> list[str]:
    """`--control-port N [--proxy-port M]` for a client of a server whose ports are `ports` (role -> port)."""
    return [flag for role in ("control", "proxy") if role in ports for flag in (f"--{role}-port", str(ports[role]))]


# --- what differs from stage 11 on: the shared secret ------------------------------------------
# The shared tests run with auth on where the stage has it: the path a real server takes.
SECRET = "common-tests-secret"  # 19 characters: long enough that no stage warns about it


def secret_options(stage: str, secret: str = SECRET) -> dict[str, Any]:
    """`secret=...` for a Server or Client of a stage with auth (stage 11 on); nothing before."""
    return {"secret": secret} if has(stage, "auth") else {}


def secret_flags(stage: str, secret: str = SECRET) -> list[str]:
    """`--secret ...` for a server or client command line of a stage with auth (stage 11 on)."""
    return ["--secret", secret] if has(stage, "auth") else []


# --- what differs from stage 14 on: a tunnel per client; from stage 16 on: TLS ----------------
# The shared tests relay raw bytes, so from stage 14 on they ask for a TCP tunnel: the port the
# server opens for it carries users' bytes as the public port of stages 2 to 13 did (the HTTP
# port would want a Host header first; tests/test_names.py tests it). From stage 16 on the
# server's certificate and the CA the client trusts are the test session's (tls_certs.py).


def has_tunnels(stage: str) -> bool:
    """True if the stage's client asks for a tunnel of its own, e.g. a TCP one (stage 14 on)."""
    return has(stage, "tenants")


def has_tls(stage: str) -> bool:
    """True if the stage's client connects over TLS (stage 16 on)."""
    return has(stage, "tls")


def server_options(stage: str) -> dict[str, Any]:
    """Keyword arguments the stage's Server needs besides its timeouts: the certificate, from stage 16 on."""
    return {"tls": tls_certs.server_context()} if has_tls(stage) else {}


def client_options(stage: str) -> dict[str, Any]:
    """Keyword arguments the stage's Client needs: a TCP tunnel from stage 14 on, the CA it trusts from 16 on.

    From stage 18 on, the store of an inspector too, as the command line has one by default: every
    stream goes through its observer (here the users' bytes are not HTTP, which it must only count).
    No inspector serves its page here (no port taken), and nothing is replayed.
    """
    options: dict[str, Any] = {"tcp": True} if has_tunnels(stage) else {}
    if has_tls(stage):
        options["tls"] = tls_certs.client_context()
    if has_inspector(stage):
        options["store"] = importlib.import_module(f"{stage}.capture").Store()
    return options


# --- building a stage's Server and Client ---------------------------------------------------------
# From stage 12 on their settings travel as one object (ServerSettings, ClientSettings); before, each
# was a keyword argument. A test names only the settings it changes, the same way on every stage.


def make_server(stage: str, secret: str | None = SECRET, **options: Any) -> Any:
    """The stage's Server with `options` (named as its settings are), its secret and from stage 16 its certificate.

    Options that are fields of the stage's ServerSettings go into it; the others (tls, https) stay
    keyword arguments of Server, as every option is before stage 12. `secret` is the tests' unless
    given; None: no secret (before stage 11 there is none).
    """
    module = importlib.import_module(f"{stage}.server")
    options = {**(secret_options(stage, secret) if secret else {}), **server_options(stage), **options}
    return build(module.Server, getattr(module, "ServerSettings", None), (), options)


def make_client(stage: str, *where: Any, secret: str | None = SECRET, **options: Any) -> Any:
    """The stage's Client for `where` (the local app, the server's host and ports), with `options` and `secret`.

    Split as make_server splits them: ClientSettings' fields, and Client's own keyword arguments (tls, store).
    """
    module = importlib.import_module(f"{stage}.client")
    options = {**(secret_options(stage, secret) if secret else {}), **options}
    return build(module.Client, getattr(module, "ClientSettings", None), where, options)


def build(cls: Any, settings: Any, args: tuple[Any, ...], options: dict[str, Any]) -> Any:
    """cls(*args, **options), or from stage 12 on cls(*args, settings=settings(**those options it has), **the rest)."""
    if settings is None:
        return cls(*args, **options)
    names = {field.name for field in dataclasses.fields(settings)}
    given = {name: value for name, value in options.items() if name in names}
    rest = {name: value for name, value in options.items() if name not in names}
    return cls(*args, settings=settings(**given), **rest)


async def users_port(ports: Any, client: Any) -> int:
    """The port users connect to: the server's public port, or the TCP tunnel's port `client` got (stage 14 on)."""
    if getattr(client, "kind", None) != "tcp":
        return int(ports.public)
    async with asyncio.timeout(STEP_TIMEOUT):
        await client.connected.wait()
    return int(client.tunnel)


def server_flags(stage: str) -> list[str]:
    """The server's command line: every port 0, and from stage 16 on the certificate and key."""
    return server_port_flags(stage) + tls_flags(stage)


def tls_flags(stage: str) -> list[str]:
    """`--cert FILE --key FILE` for the server of stage 16 on; nothing before."""
    if not has_tls(stage):
        return []
    files = tls_certs.certs()
    return ["--cert", str(files.cert), "--key", str(files.key)]


def client_flags(stage: str, ports: dict[str, int]) -> list[str]:
    """The client's command line for a server whose ports are `ports`; a TCP tunnel from stage 14 on, the CA from 12.

    From stage 18 on, the client's inspector takes any free port: its default, 4040, is one port for
    the whole machine, and CLI tests running at once (or a learner's own client) would fight for it.
    """
    tcp = ["--tcp"] if has_tunnels(stage) else []
    tls = ["--ca", str(tls_certs.certs().ca)] if has_tls(stage) else []
    return client_port_flags(ports) + tls + tcp + (["--inspect-port", "0"] if has_inspector(stage) else [])


def has_inspector(stage: str) -> bool:
    """True if the stage's client serves an inspector page (stage 18 on)."""
    return has(stage, "inspector")


async def cli_users_port(stage: str, server: CliProcess, ports: dict[str, int]) -> int:
    """The port users connect to, from the server's log: the public port, or the TCP tunnel's (stage 14 on)."""
    return await server.listening("tcp") if has_tunnels(stage) else ports["public"]


async def control_connection(stage: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection to the control port, as the stage's client opens it: over TLS from stage 16 on."""
    async with asyncio.timeout(STEP_TIMEOUT):
        if has_tls(stage):
            return await asyncio.open_connection("127.0.0.1", port, ssl=tls_certs.client_context())
        return await asyncio.open_connection("127.0.0.1", port)


def hello(stage: str, session_id: str | None = None) -> Any:
    """What `auth.client_handshake` takes after the secret: a session id, or a Hello asking for a TCP tunnel (10 on)."""
    protocol = importlib.import_module(f"{stage}.protocol")
    return protocol.Hello("tcp", None, session_id) if has_tunnels(stage) else session_id


async def client_handshake(
    stage: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: str = SECRET, first: Any = None
) -> Any:
    """The client's side of the stage's handshake, spoken by hand; returns the server's Welcome.

    From stage 11 on it is `auth.client_handshake` (the secret's challenge); before, the stage's own
    `protocol.client_handshake` without a secret. `first` is what follows the secret: a session id
    to resume (stage 10 on), or a Hello asking for a tunnel (stage 14 on). Stages 8 and 9 say a bare
    `hello` and get a bare `welcome`: there is no session to name yet.
    """
    if has(stage, "auth"):
        return await importlib.import_module(f"{stage}.auth").client_handshake(reader, writer, secret, first)
    protocol = importlib.import_module(f"{stage}.protocol")
    if has(stage, "resume"):
        return await protocol.client_handshake(reader, writer, first)
    assert first is None, f"{stage} has no session to resume"
    return await protocol.client_handshake(reader, writer)


async def server_handshake(
    stage: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: str, session_id: str
) -> None:
    """A fake server's side of the stage's handshake: read the hello (challenge it from stage 11 on), welcome
    (with `session_id` from stage 10 on).

    From stage 14 on the welcome names a TCP tunnel on port 9 (nothing listens there: the fake
    server's tests never have users).
    """
    protocol = importlib.import_module(f"{stage}.protocol")
    if has(stage, "auth"):
        await importlib.import_module(f"{stage}.auth").server_handshake(reader, writer, secret)
    else:
        async with asyncio.timeout(STEP_TIMEOUT):
            assert isinstance(await protocol.read_message(reader), protocol.Hello)
    if has_tunnels(stage):
        welcome = protocol.Welcome(session_id, "9", "tcp://127.0.0.1:9")
    else:  # a bare `welcome` before stage 10: no session yet
        welcome = protocol.Welcome(session_id) if has(stage, "resume") else protocol.Welcome()
    await protocol.write_message(writer, welcome)
