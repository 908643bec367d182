"""The peers of tests/test_isolation_streams.py: a local app and users that end their connections as real ones do.

Real peers leave in every way TCP allows: an impatient browser closes before the answer (its
kernel then answers the answer with a reset), an app answers, half-closes and then resets, a
crashed program's connection is reset. `App` is the local app, in the tests' own process; the
first line a user sends picks what it does (see `App.handle`).

In the link lab this file is also the program run inside a namespace, printing one JSON line:

    python tests/isolation_peers.py app --listen 127.0.0.1:8000        # the local app, until stopped
    python tests/isolation_peers.py download --connect HOST:PORT --size N   # a user downloading N bytes
    python tests/isolation_peers.py impatient --connect HOST:PORT --count K --every S
    python tests/isolation_peers.py resets --connect HOST:PORT
"""

import argparse
import asyncio
import contextlib
import errno
import hashlib
import json
import socket
import struct
import sys
import time

from support import STEP_TIMEOUT, LocalServer, pattern_bytes

# The impatient user's answer comes this long after its request, and the app closes this long after
# the answer: by then the user has gone, and its kernel has answered the answer with a reset.
LATE = 0.3
# In the lab, where no test tells the app when to `go`, it waits this long instead; a user that
# must act after it waits AFTER_PAUSE.
PAUSE, AFTER_PAUSE = 0.3, 0.6
BLOCK = pattern_bytes(256 * 1024 - 7, seed=23)  # an odd length: a lost or doubled chunk changes the hash
LINGER_0 = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 seconds: close() sends a reset (RST)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (RST)."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
    writer.transport.abort()


async def read_to_end(reader: asyncio.StreamReader, timeout: float = STEP_TIMEOUT) -> tuple[int, str]:
    """Read until the connection ends; return the bytes read and how it ended: 'eof' or 'reset'."""
    received = 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(256 * 1024):
                received += len(chunk)
    except ConnectionResetError:
        return received, "reset"
    # libuv (uvloop, `--loop uvloop`) reports a reset that follows a partial read as an EOF: it ends the
    # read at the hang-up without another recv(). The socket still holds the error: ask it.
    transport = getattr(reader, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    with contextlib.suppress(OSError):
        if sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET:
            return received, "reset"
    return received, "eof"


class App(LocalServer):
    """The local app. `ended` says how each `upload` ended: 'eof' or 'reset'.

    `pause`: how long a connection that waits for `go` waits instead (None: for `go` itself).
    """

    def __init__(self, pause: float | None = None) -> None:
        super().__init__()
        self.pause = pause
        self.ended: asyncio.Queue[str] = asyncio.Queue()
        self.waiting = asyncio.Event()  # a connection waits for `go` (see handle)
        self.go = asyncio.Event()
        self.acted = asyncio.Event()  # ... and has done what it was waiting to do

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection as its first line says (or the path of its `GET /PATH HTTP/1.1`).

        - `echo`: echo every line, and the EOF.
        - `late`: answer LATE seconds after the request, then close LATE seconds later.
        - `download N`: send N bytes (the pattern of BLOCK), then close.
        - `upload`: say `ready`, then read until EOF or a reset.
        - `reset`: send a few bytes, then reset the connection.
        - `half-close-then-reset`: answer and half-close; then, once told to `go`, reset.
        - `close-at-eof`: read to EOF; then, once told to `go`, close.
        """
        try:
            line = (await reader.readline()).strip()
            if line.startswith(b"GET /"):  # a user of the HTTP port, routed by its Host header: the path says
                line = line.split(b" ")[1][1:]
            command, _, argument = line.partition(b" ")
            if command == b"echo":
                while line := await reader.readline():
                    writer.write(line)
                writer.write_eof()
            elif command == b"late":
                await asyncio.sleep(LATE)
                writer.write(b"the answer, too late\n")
                await asyncio.sleep(LATE)
            elif command == b"download":
                await self._download(writer, int(argument))
            elif command == b"upload":
                writer.write(b"ready\n")
                self.ended.put_nowait((await read_to_end(reader, timeout=60.0))[1])
            elif command == b"reset":
                writer.write(b"the start of an answer\n")
                await writer.drain()
                await asyncio.sleep(0.1)
                reset(writer)
            elif command == b"half-close-then-reset":
                writer.write(b"the whole answer\n")
                writer.write_eof()
                await self._wait_for_go()
                reset(writer)
                self.acted.set()
            elif command == b"close-at-eof":
                await reader.read()
                await self._wait_for_go()
                writer.close()
                self.acted.set()
        except (OSError, ValueError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _download(writer: asyncio.StreamWriter, size: int) -> None:
        while size > 0:
            writer.write(BLOCK[:size])
            await writer.drain()
            size -= len(BLOCK)

    async def _wait_for_go(self) -> None:
        if self.pause is not None:
            await asyncio.sleep(self.pause)
            return
        self.waiting.set()
        async with asyncio.timeout(STEP_TIMEOUT):
            await self.go.wait()


# --- the programs the link lab runs inside its namespaces ---------------------------------------


def connect(address: str) -> socket.socket:
    """A TCP connection to HOST:PORT, with a bounded connect."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=STEP_TIMEOUT)
    sock.settimeout(60.0)  # a download stalls at most this long
    return sock


def read_all(sock: socket.socket) -> tuple[int, str]:
    """Read until the connection ends: the bytes read, and 'eof' or 'reset'."""
    received = 0
    try:
        while data := sock.recv(256 * 1024):
            received += len(data)
    except ConnectionResetError:
        return received, "reset"
    return received, "eof"


def download(address: str, size: int) -> dict[str, object]:
    """Ask the app for `size` bytes and read until the end; how many came, whole or not, and how it ended."""
    digest, received, ended, started = hashlib.sha256(), 0, "eof", time.monotonic()
    with connect(address) as sock:
        sock.sendall(f"download {size}\n".encode())
        print("asked", flush=True)
        try:
            while data := sock.recv(256 * 1024):
                digest.update(data)
                received += len(data)
        except ConnectionResetError:
            ended = "reset"
    expected = hashlib.sha256((BLOCK * (size // len(BLOCK) + 1))[:size]).hexdigest()
    whole = received == size and digest.hexdigest() == expected
    return {"received": received, "ended": ended, "whole": whole, "seconds": round(time.monotonic() - started, 3)}


def impatient(address: str, count: int, every: float) -> dict[str, object]:
    """`count` rounds, every `every` seconds: a user leaves before its answer; an app half-closes, then resets."""
    for _ in range(count):
        with connect(address) as sock:
            sock.sendall(b"late\n")
        with connect(address) as sock:
            sock.sendall(b"half-close-then-reset\n")
            read_all(sock)  # the answer, and the app's EOF
            time.sleep(AFTER_PAUSE)  # the app has reset its connection by now
            sock.shutdown(socket.SHUT_WR)  # our EOF goes to an app connection that was reset
            read_all(sock)
        time.sleep(every)
    return {"rounds": count}


def resets(address: str) -> dict[str, object]:
    """An app that resets, and a user that resets during its upload: how the user's connection ended."""
    with connect(address) as sock:
        sock.sendall(b"reset\n")
        _, ended = read_all(sock)
    with connect(address) as sock:
        sock.sendall(b"upload\n")
        sock.recv(16)  # ready
        sock.sendall(b"the first part of an upload")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
    return {"app_reset_reached_the_user_as": ended}


async def serve_app(address: str) -> None:
    """Run the App on HOST:PORT until stopped; print how each upload ended."""
    host, port = address.rsplit(":", 1)
    app = App(pause=PAUSE)
    server = await asyncio.start_server(app._accept, host, int(port))
    print(f"listening on {address}", flush=True)
    async with server:
        while True:
            print(f"upload ended: {await app.ended.get()}", flush=True)


def main(argv: list[str]) -> int:
    """The link lab's app and users (see the module's docstring)."""
    parser = argparse.ArgumentParser(prog="isolation_peers.py")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("app").add_argument("--listen", required=True, metavar="HOST:PORT")
    for name in ("download", "impatient", "resets"):
        user = commands.add_parser(name)
        user.add_argument("--connect", required=True, metavar="HOST:PORT")
        if name == "download":
            user.add_argument("--size", type=int, required=True)
        if name == "impatient":
            user.add_argument("--count", type=int, required=True)
            user.add_argument("--every", type=float, required=True)
    args = parser.parse_args(argv)
    if args.command == "app":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_app(args.listen))
    elif args.command == "download":
        print(json.dumps(download(args.connect, args.size)), flush=True)
    elif args.command == "impatient":
        print(json.dumps(impatient(args.connect, args.count, args.every)), flush=True)
    else:
        print(json.dumps(resets(args.connect)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
