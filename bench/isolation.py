"""Every user on their own (issue 23): what one user, one app or one hostile client does to everyone else.

    python3 -m bench.isolation                         # stages 13, 16 and 19 of this repository (~2 min)
    python3 -m bench.isolation --root /tmp/old --tries 10   # the stages of another checkout (before/after)

Each stage runs from its command line (server and client, a secret, from stage 16 on TLS and an
HTTP tunnel by name, stage 19 with its inspector), in front of a small origin in this process whose
paths behave as real peers do. Then, in order, bounded in count and time:

- users who leave early: `--tries` users each ask for /slow and close before its answer (the
  app answers after 0.3 s and closes 0.3 s later); the tunnel survived a try if the client did
  not connect again ("tunnel up" once more in its log);
- apps that half-close, then reset: `--tries` users each read /half-close-then-reset to its end,
  then end their side 0.6 s later, when the app has reset its connection;
- a download of `--size` bytes while one user leaves early, 0.5 s into it: whole or cut, and how it ended;
- `--seconds` of 4 users fetching / in a loop while a user leaves early every 0.5 s: the share of
  their requests that did not get a 200 (a 502 page while the client reconnects, a cut connection);
- an app that resets its connection mid-answer, and a client killed (SIGKILL) mid-download: does
  the user see a reset, or a clean end (EOF) that makes a cut answer look whole?
- a hostile client (the handshake, then frames by hand) that answers each user's stream with FIN
  and then RST, before ACK, for `--tries` users: what the server's log holds afterwards.
"""

import argparse
import asyncio
import contextlib
import functools
import importlib
import os
import shutil
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .inspector import certificates
from .paths import HOST, LISTENING, ROOT, SECRET, Process

STAGES = ("stage_13", "stage_16", "stage_19")  # the limits, TLS, the inspector
LATE = 0.3
LINGER_0 = struct.pack("ii", 1, 0)
BLOCK = b"x" * (256 * 1024)
PAGE = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"


class Origin(threading.Thread):
    """The local app: a thread per connection, a behaviour per path."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    @staticmethod
    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(30)
            head = b""
            while b"\r\n\r\n" not in head and (data := conn.recv(4096)):
                head += data
            path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"/"
            if path == b"/slow":
                time.sleep(LATE)
                conn.sendall(PAGE)
                time.sleep(LATE)
            elif path.startswith(b"/big/"):
                size = int(path[5:])
                conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode())
                while size > 0:
                    conn.sendall(BLOCK[:size])
                    size -= len(BLOCK)
            elif path in (b"/reset", b"/half-close-then-reset"):
                conn.sendall(PAGE[:40])
                if path == b"/half-close-then-reset":
                    conn.sendall(PAGE[40:])
                    conn.shutdown(socket.SHUT_WR)
                time.sleep(LATE)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
            else:
                conn.sendall(PAGE)


class Tunnel:
    """A stage's server and client, from their command lines, in front of the origin."""

    def __init__(self, stage: str, root: Path, origin: int, work: Path) -> None:
        self.stage, self.root, self.work, self.origin = stage, root, work, origin
        self.env = {**os.environ, "NGROK_SECRET": SECRET, "PYTHONUNBUFFERED": "1"}
        self.tls = int(stage[6:]) >= 12  # TLS from stage 16 on
        server_flags, self.client_flags = certificates(work) if self.tls else ([], [])
        ports = ["--control-port", "0", "--public-port", "0", *server_flags]
        argv = [sys.executable, "-m", f"{stage}.server", *ports]
        self.server = Process.start(f"{stage} server", argv, work, root, self.env)
        self.control_port = int(self.server.wait_for(LISTENING.format(role="control"))[2])
        self.port = int(self.server.wait_for(LISTENING.format(role="public"))[2])
        self.ca = work / "certs" / "ca.pem"
        self.start_client("app")

    def start_client(self, name: str) -> None:
        """A client (from stage 16 on, of the HTTP tunnel `name`); wait until it serves."""
        self.name = name
        argv = [sys.executable, "-m", f"{self.stage}.client", f"{HOST}:{self.origin}", HOST]
        argv += ["--control-port", str(self.control_port), "--max-backoff", "0.5", *self.client_flags]
        argv += ["--name", name] if self.tls else []
        argv += ["--inspect-port", "0"] if int(self.stage[6:]) >= 14 else []  # the inspector from stage 18 on
        self.client = Process.start(f"{self.stage} client {name}", argv, self.work, self.root, self.env)
        self.wait_until_up()

    def request(self, path: str, timeout: float = 10.0) -> socket.socket:
        sock = socket.create_connection((HOST, self.port), timeout=timeout)
        host = f"{self.name}.localhost" if self.tls else "bench"
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        return sock

    def get(self, path: str) -> tuple[bytes, str]:
        """The whole answer to GET `path`, and how the connection ended: 'eof' or 'reset'."""
        with self.request(path) as sock:
            return read_all(sock)

    def losses(self) -> int:
        """How often the client lost its tunnel connection (it says so at once, then reconnects)."""
        return self.client.log().count("reconnecting in")

    def wait_until_up(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if self.get("/")[0] == PAGE:
                    return
            time.sleep(0.05)
        raise SystemExit(f"error: {self.stage}: the tunnel did not come up:\n{self.client.log()[-500:]}")

    def stop(self) -> None:
        self.client.stop()
        self.server.stop()


def read_all(sock: socket.socket) -> tuple[bytes, str]:
    data = bytearray()
    try:
        while chunk := sock.recv(256 * 1024):
            data += chunk
    except ConnectionResetError:
        return bytes(data), "reset"
    return bytes(data), "eof"


def leave_early(tunnel: Tunnel) -> None:
    """A user asks for /slow and closes before its answer."""
    tunnel.request("/slow").close()


def half_close_then_reset(tunnel: Tunnel) -> None:
    """A user reads the whole answer of an app that half-closes, then resets; then it ends its own side."""
    with tunnel.request("/half-close-then-reset") as sock:
        read_all(sock)
        time.sleep(2 * LATE)  # the app has reset its connection by now
        sock.shutdown(socket.SHUT_WR)
        read_all(sock)


def survived(tunnel: Tunnel, tries: int, attempt: Callable[[Tunnel], None]) -> int:
    """How many of `tries` attempts left the tunnel connection up."""
    kept = 0
    for _ in range(tries):
        before = tunnel.losses()
        with contextlib.suppress(OSError):
            attempt(tunnel)
        time.sleep(3 * LATE)  # the answer, the app's close, and the tunnel's fate
        if tunnel.losses() == before:
            kept += 1
        else:
            tunnel.wait_until_up()
    return kept


def download(tunnel: Tunnel, size: int, trouble: Callable[[], object]) -> str:
    """A download of `size` bytes, with `trouble` 0.5 s into it: how much arrived, and how it ended."""
    tunnel.wait_until_up()
    with tunnel.request(f"/big/{size}", timeout=60) as sock:
        timer = threading.Timer(0.5, trouble)
        timer.start()
        started = time.monotonic()
        data, ended = read_all(sock)
        timer.join()
    body = len(data) - data.find(b"\r\n\r\n") - 4
    return f"{body / 2**20:,.0f} of {size / 2**20:,.0f} MiB in {time.monotonic() - started:.1f} s, then {ended}"


def share_failed(tunnel: Tunnel, seconds: float) -> str:
    """4 users fetching / in a loop for `seconds` while a user leaves early every 0.5 s."""
    counts = {"ok": 0, "failed": 0}
    deadline = time.monotonic() + seconds

    def user() -> None:
        while time.monotonic() < deadline:
            try:
                ok = tunnel.get("/") == (PAGE, "eof")
            except OSError:
                ok = False
            counts["ok" if ok else "failed"] += 1

    users = [threading.Thread(target=user) for _ in range(4)]
    for thread in users:
        thread.start()
    while time.monotonic() < deadline:
        leave_early(tunnel)
        time.sleep(0.5)
    for thread in users:
        thread.join()
    total = counts["ok"] + counts["failed"]
    return f"{counts['failed']} of {total} requests failed ({100 * counts['failed'] / max(total, 1):.1f} %)"


def say(line: str) -> None:
    print(line, flush=True)


@contextlib.contextmanager
def stage_path(root: Path) -> Iterator[None]:
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))


def hostile(tunnel: Tunnel, users: int, root: Path) -> str:
    """A client that answers each user's stream with FIN, then RST, before ACK: the server's log afterwards."""
    stage = tunnel.stage
    tunnel.client.stop()
    time.sleep(0.5)
    logged = len(tunnel.server.log())
    with stage_path(root):
        auth, frames, protocol = (importlib.import_module(f"{stage}.{name}") for name in ("auth", "frames", "protocol"))

    async def run() -> tuple[int, bool]:
        context = ssl.create_default_context(cafile=str(tunnel.ca)) if tunnel.tls else None
        reader, writer = await asyncio.open_connection(HOST, tunnel.control_port, ssl=context)
        hello = protocol.Hello("http", tunnel.name) if tunnel.tls else None
        await auth.client_handshake(reader, writer, SECRET, hello)
        parser, served, cut = frames.Parser(), 0, False

        async def answer() -> None:
            nonlocal cut
            while data := await reader.read(65536):
                for frame in parser.feed(data):
                    if frame.flags & frames.SYN:
                        writer.write(frames.encode(frames.DATA, frames.FIN, frame.stream_id))
                        writer.write(frames.encode(frames.DATA, frames.RST, frame.stream_id, b"no"))
            cut = True

        answering = asyncio.create_task(answer())
        for _ in range(users):
            await asyncio.to_thread(lambda: tunnel.get("/"))
            served += 1
        await asyncio.sleep(0.5)
        answering.cancel()
        writer.close()
        return served, cut

    started = time.monotonic()
    served, cut = asyncio.run(run())
    log = tunnel.server.log()[logged:]
    return (
        f"{served} users in {time.monotonic() - started:.1f} s: {log.count('Traceback')} tracebacks, "
        f"{len(log) / 1024:,.1f} KiB of server log; the hostile client {'was cut off' if cut else 'stayed connected'}"
    )


def measure(tunnel: Tunnel, args: argparse.Namespace) -> None:
    """Every measure of the module's docstring, on one stage, printed as it goes."""
    stage = tunnel.stage
    for name, attempt in (("users leave early", leave_early), ("apps half-close, then reset", half_close_then_reset)):
        say(f"{stage}: {name}: the tunnel survived {survived(tunnel, args.tries, attempt)} of {args.tries} tries")
    cut = download(tunnel, args.size, functools.partial(leave_early, tunnel))
    say(f"{stage}: a download, one user leaving early: {cut}")
    say(f"{stage}: 4 users, one more leaving early every 0.5 s: {share_failed(tunnel, args.seconds)}")
    say(f"{stage}: an app resets mid-answer: the user sees {tunnel.get('/reset')[1]}")
    say(f"{stage}: the client is killed mid-download: {download(tunnel, args.size, tunnel.client.popen.kill)}")
    tunnel.start_client("again")  # from stage 16 on, the killed client's name is kept for it a while
    say(f"{stage}: a hostile client: {hostile(tunnel, args.tries, args.root)}")


def main() -> None:
    """Command line: python -m bench.isolation [--stages ...] [--tries N] [--seconds S] [--size BYTES] [--root DIR]."""
    parser = argparse.ArgumentParser(prog="python -m bench.isolation", description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    parser.add_argument("--tries", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=2**30)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose stages run (default: this one)")
    args = parser.parse_args()
    if shutil.which("openssl") is None:
        sys.exit("error: needs openssl, which makes stage 16's certificates (apt-get install openssl)")
    origin = Origin()
    origin.start()
    say(f"stages from {args.root.resolve()}; load average {os.getloadavg()[0]:.2f}")
    for stage in args.stages:
        work = Path(tempfile.mkdtemp(prefix="bench-isolation-"))
        tunnel = Tunnel(stage, args.root, origin.port, work)
        try:
            measure(tunnel, args)
        finally:
            tunnel.stop()
            shutil.rmtree(work, ignore_errors=True)
    origin.listener.close()


if __name__ == "__main__":
    main()
