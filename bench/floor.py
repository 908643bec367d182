"""The floor under issue 26's new-connection goals: a bare relay on each event loop, beside ssh -R and stage 22.

    python3 -m bench.floor                    # 3 interleaved rounds of `ab -c 16` for 3 s each (~1 min)
    python3 -m bench.floor --rounds 5 --seconds 5

The relay is the least a program in front of the origin can do per new connection, in one process:
accept, connect to the origin, pass the bytes both ways, close (`Relay` below, asyncio Protocols, no
tunnel, no TLS, no log). What it serves per second on a loop is about the most any tunnel on that
loop can serve; stage 22 does all of that twice (the server, the client) and more. Every path meets
the same origin and the same load, in an order that alternates from round to round; the CPU is the
path's own processes' (from /proc), per request. Medians are printed as a Markdown table.

The relay closes both sides at the first end of either (HTTP/1.0 answers end with the origin's
close), where a tunnel half-closes (`write_eof`): uvloop 0.21.0, 0.22.1 and 0.23.0 each aborted
(double free, or a segmentation fault) within a few thousand requests when this relay half-closed.
"""

import argparse
import asyncio
import functools
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import cast

from .paths import (
    HOST,
    ROOT,
    UVLOOP_INSTALL,
    PathUnavailable,
    PathUnderTest,
    Process,
    Stopped,
    stop_on_termination,
    uvloop_site,
)
from .scenarios import ab_new_connections, with_cpu

LOOP_NAMES = ("asyncio", "uvloop")
CONCURRENCY = 16  # as issue 26 measures


class Relay(asyncio.Protocol):
    """One side of a relayed connection: what it receives goes to its peer; its end is its peer's."""

    def __init__(self) -> None:
        self.peer: Relay | None = None
        self.transport: asyncio.Transport | None = None
        self.waiting: list[bytes] = []  # for a peer not connected yet: the user's bytes before the origin answers

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are no subclasses
        if self.waiting:
            self.transport.write(b"".join(self.waiting))
        if self.peer is not None and self.peer.transport is not None and self.peer.transport.is_closing():
            self.transport.close()  # the user left while the origin was being dialled

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None
        if self.peer.transport is None:
            self.peer.waiting.append(data)
        else:
            self.peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()  # after what is buffered for it


async def relay(port: int, origin: tuple[str, int]) -> None:
    """Listen on `port`; for each user, connect to `origin` and relay until either side ends."""
    loop = asyncio.get_running_loop()

    def user() -> Relay:
        near, far = Relay(), Relay()
        near.peer, far.peer = far, near

        def dialled(done: asyncio.Task[object]) -> None:
            if done.exception() is not None and near.transport is not None:
                near.transport.close()  # the origin refused: so is the user

        loop.create_task(loop.create_connection(lambda: far, *origin)).add_done_callback(dialled)
        return near

    server = await loop.create_server(user, HOST, port, backlog=1024)
    print(f"relay port listening on {HOST}:{server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


def start_relay(loop: str, origin: tuple[str, int], work: Path) -> tuple[Process, tuple[str, int]]:
    """The relay on `loop`, in a process of its own; the process and its address."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), uvloop_site()]))}
    argv = [sys.executable, "-S", "-m", "bench.floor", "--serve", loop, f"{origin[0]}:{origin[1]}"]
    process = Process.start(f"relay {loop}", argv, work, ROOT, env)
    found = process.wait_for(r"relay port listening on (\S+):(\d+)")
    return process, (found[1], int(found[2]))


def measure(origin: tuple[str, int], rounds: int, seconds: float, work: Path) -> dict[str, list[tuple[float, float]]]:
    """{path: [(requests/s, CPU µs per request) per round]} for the relays, ssh -R and stage 22 on both loops."""
    loops = LOOP_NAMES if uvloop_site() is not None else ("asyncio",)
    if len(loops) < len(LOOP_NAMES):
        print(f"uvloop: not measured, not installed ({UVLOOP_INSTALL})")
    names = [*(f"relay {loop}" for loop in loops), "ssh -R", *(f"stage 22 {loop}" for loop in loops)]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for number in range(rounds):
        for name in names if number % 2 == 0 else names[::-1]:
            if name.startswith("relay"):
                process, address = start_relay(name.split()[1], origin, work)
                processes, stop = [process], process.stop
            else:
                path = (
                    PathUnderTest(name, "ssh")
                    if name == "ssh -R"
                    else PathUnderTest(name, "stage_22", loop=name.split()[2])
                )
                path.start(origin)
                processes, address, stop = path.processes, path.address, path.stop
            try:
                got = with_cpu(processes, functools.partial(ab_new_connections, address, seconds, 10**7, CONCURRENCY))
            finally:
                stop()
            if got["failed"] or not got["complete"]:  # a floor that drops requests says nothing
                raise PathUnavailable(f"{name}: {got['failed']} of {got['complete']} requests failed")
            cpu = sum(value for key, value in got.items() if key.startswith("cpu_s "))
            results[name].append((got["rps"], cpu / got["complete"] * 1e6))
            print(f"round {number + 1} {name}: {got['rps']:,.0f} req/s, {results[name][-1][1]:.0f} µs", flush=True)
    return results


def table(results: dict[str, list[tuple[float, float]]]) -> str:
    """Markdown: a row per path, medians of the rounds, and the requests/s over ssh -R's, round by round."""
    ssh = [rps for rps, _ in results["ssh -R"]]
    lines = ["| path | new connections/s | ÷ ssh -R | CPU per request (µs) |", "|---|---:|---:|---:|"]
    for name, rounds in results.items():
        ratio = statistics.median(rps / base for (rps, _), base in zip(rounds, ssh, strict=True))
        rps, cpu = statistics.median(r for r, _ in rounds), statistics.median(c for _, c in rounds)
        lines.append(f"| {name} | {rps:,.0f} | {ratio:.2f}x | {cpu:.0f} |")
    return "\n".join(lines)


def main() -> None:
    """Command line: python -m bench.floor [--rounds N] [--seconds S]; --serve LOOP ORIGIN runs one relay."""
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--serve", nargs=2, metavar=("LOOP", "ORIGIN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:  # one relay: the process start_relay starts
        loop, origin = args.serve
        host, _, port = origin.rpartition(":")
        factory = None
        if loop == "uvloop":
            import uvloop

            factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(relay(0, (host, int(port))))
        return
    stop_on_termination()
    work = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    origin = Process.start(
        "origin", [sys.executable, "-m", "bench.origin", "--host", HOST, "--port", "0"], work, ROOT, dict(os.environ)
    )
    try:
        found = origin.wait_for(r"origin port listening on (\S+):(\d+)")
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        results = measure((found[1], int(found[2])), args.rounds, args.seconds, work)
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    except PathUnavailable as exc:
        sys.exit(f"error: {exc}")
    except Stopped as stopped:  # SIGTERM or SIGHUP: every path was stopped on the way out, as on Ctrl-C
        sys.exit(128 + stopped.signal)
    finally:
        origin.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))


if __name__ == "__main__":
    main()
