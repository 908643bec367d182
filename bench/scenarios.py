"""The load: each scenario drives one path for a bounded time and returns its figures.

Bulk transfers, time to first byte and the idle connections are driven from this
process with plain sockets (the copy loops run in C inside `sendall`/`recv_into`);
HTTP load comes from `ab` (a new connection per request) and `wrk` (keep-alive).
"""

import asyncio
import contextlib
import math
import re
import socket
import ssl
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

from .paths import Process

Address = tuple[str, int]
Metrics = dict[str, Any]
SOCKET_TIMEOUT = 30.0
BUFFER = 1024 * 1024
# Opens a connection to a path: plain TCP (`tcp`), or TLS to the origin through it (bench.tlstunnel).
Connect = Callable[[Address], socket.socket]


def tcp(address: Address) -> socket.socket:
    return socket.create_connection(address, timeout=SOCKET_TIMEOUT)


def bulk_upload(address: Address, size: int, connect: Connect = tcp) -> Metrics:
    """Send `size` bytes into the origin's counting sink; time until it confirms the count."""
    block = memoryview(b"\xa5" * BUFFER)
    started = time.perf_counter()
    with connect(address) as sock:
        # TCP ends the upload with a half-close. TLS has none: there the sink is told the size first.
        sealed = isinstance(sock, ssl.SSLSocket)
        sock.sendall(b"SINK %d\n" % size if sealed else b"SINK\n")
        left = size
        while left > 0:
            chunk = block[: min(left, BUFFER)]
            sock.sendall(chunk)
            left -= len(chunk)
        if not sealed:
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        while not reply.endswith(b"\n") and (data := sock.recv(64)):
            reply += data
    elapsed = time.perf_counter() - started
    if reply.strip() != str(size).encode():
        raise RuntimeError(f"the sink counted {reply.strip()!r} bytes, {size} were sent")
    return {"mb_per_s": size / elapsed / 1e6, "seconds": elapsed}


def bulk_download(address: Address, size: int, connect: Connect = tcp) -> Metrics:
    """Ask the origin for `size` bytes and count them until EOF."""
    buffer = bytearray(BUFFER)
    started = time.perf_counter()
    received = 0
    with connect(address) as sock:
        sock.sendall(b"SOURCE %d\n" % size)
        while count := sock.recv_into(buffer):
            received += count
    elapsed = time.perf_counter() - started
    if received != size:
        raise RuntimeError(f"received {received} bytes, the origin sent {size}")
    return {"mb_per_s": size / elapsed / 1e6, "seconds": elapsed}


def time_to_first_byte(address: Address, samples: int, warmup: int = 5) -> Metrics:
    """Sequential new connections: connect, send a GET, wait for the first byte of the answer."""
    times = []
    for i in range(warmup + samples):
        started = time.perf_counter()
        with socket.create_connection(address, timeout=SOCKET_TIMEOUT) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
            first = sock.recv(1)
            elapsed = time.perf_counter() - started
            while sock.recv(65536):
                pass
        if first != b"H":
            raise RuntimeError(f"unexpected first byte {first!r}")
        if i >= warmup:
            times.append(elapsed * 1000)
    times.sort()
    return {
        "p50_ms": statistics.median(times),
        "p90_ms": times[int(len(times) * 0.9) - 1] if len(times) >= 10 else times[-1],
        "min_ms": times[0],
    }


def _run_tool(argv: list[str], timeout: float) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-300:]}")
    return done.stdout


def _number(pattern: str, text: str, default: float | None = None) -> float:
    match = re.search(pattern, text, re.MULTILINE)
    if match is None:
        if default is not None:
            return default
        raise RuntimeError(f"no {pattern!r} in the tool's output:\n{text[-500:]}")
    return float(match[1])


def ab_new_connections(address: Address, seconds: float, requests: int, concurrency: int = 50) -> Metrics:
    """`ab -c 50`: HTTP/1.0, a new TCP connection for every request, for `seconds` or `requests`."""
    url = f"http://{address[0]}:{address[1]}/"
    argv = ["ab", "-q", "-r", "-s", "10", "-c", str(concurrency)]
    if seconds:
        argv += ["-t", str(max(1, round(seconds)))]
    argv += ["-n", str(requests), url]
    out = _run_tool(argv, timeout=seconds + 60)
    return {
        "rps": _number(r"^Requests per second:\s+([\d.]+)", out),
        "complete": int(_number(r"^Complete requests:\s+(\d+)", out)),
        "failed": int(_number(r"^Failed requests:\s+(\d+)", out))
        + int(_number(r"^Non-2xx responses:\s+(\d+)", out, 0)),
        "p50_ms": _number(r"^\s+50%\s+(\d+)", out),
        "p99_ms": _number(r"^\s+99%\s+(\d+)", out),
    }


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _latency_ms(label: str, text: str) -> float:
    match = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s|m)\s*$", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {label} latency in wrk's output:\n{text[-500:]}")
    return float(match[1]) * _UNITS[match[2]]


def wrk_keep_alive(address: Address, seconds: float, connections: int = 50) -> Metrics:
    """`wrk -c 50`: HTTP/1.1 keep-alive, requests/s and the latency percentiles."""
    url = f"http://{address[0]}:{address[1]}/"
    duration = f"{max(1, round(seconds))}s"
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}", "--latency", "--timeout", "5s", url]
    out = _run_tool(argv, timeout=seconds + 60)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": _number(r"^Requests/sec:\s+([\d.]+)", out),
        "requests": int(_number(r"^\s+(\d+) requests in", out)),
        "p50_ms": _latency_ms("50%", out),
        "p99_ms": _latency_ms("99%", out),
        "errors": (sum(int(n) for n in errors.groups()) if errors else 0)
        + int(_number(r"Non-2xx or 3xx responses:\s+(\d+)", out, 0)),
    }


def idle_connections(
    address: Address, count: int, processes: list[Process], concurrency: int = 50, timeout: float = 60.0
) -> Metrics:
    """Hold `count` connections open through the path at once; check each is served; memory per connection."""
    return asyncio.run(_idle_connections(address, count, processes, concurrency, timeout))


async def _idle_connections(
    address: Address, count: int, processes: list[Process], concurrency: int, timeout: float
) -> Metrics:
    before = {p.role: p.memory_kib() for p in processes}
    streams: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
    gate = asyncio.Semaphore(concurrency)  # a burst of 1000 SYNs would overflow a listen backlog of 100

    async def round_trip(i: int) -> bool:
        reader, writer = streams[i]
        writer.write(b"ping %d\n" % i)
        return await reader.readline() == b"ping %d\n" % i

    async def open_one(i: int) -> bool:
        async with gate:
            streams[i] = await asyncio.open_connection(*address)
            streams[i][1].write(b"ECHO\n")
            return await round_trip(i)

    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            opened = await asyncio.gather(*(open_one(i) for i in range(count)), return_exceptions=True)
            open_seconds = time.perf_counter() - started
            await asyncio.sleep(0.2)  # let every relay settle before reading its memory
            after = {p.role: p.memory_kib() for p in processes}
            # Every connection is still open: prove that each one still carries bytes.
            alive = [i for i, ok in enumerate(opened) if ok is True]
            again = await asyncio.gather(*(round_trip(i) for i in alive), return_exceptions=True)
    finally:
        for _, writer in streams.values():
            writer.close()
        async with asyncio.timeout(10):
            await asyncio.gather(*(w.wait_closed() for _, w in streams.values()), return_exceptions=True)
    served = sum(1 for ok in again if ok is True)
    errors = [repr(e) for e in [*opened, *again] if isinstance(e, BaseException)][:3]
    metrics: Metrics = {"count": count, "served": served, "open_seconds": open_seconds, "errors": errors}
    for role in before:
        metrics[f"rss_kib_per_conn {role}"] = (after[role]["rss"] - before[role]["rss"]) / count
        metrics[f"pss_kib_per_conn {role}"] = (after[role]["pss"] - before[role]["pss"]) / count
    return metrics


def with_cpu(processes: list[Process], measure: Callable[[], Metrics]) -> Metrics:
    """Run `measure` and add the CPU seconds (all, and in the kernel) each of the path's processes used meanwhile."""
    before = {p.role: p.cpu_times() for p in processes}
    metrics = measure()
    for p in processes:
        (user0, system0), (user1, system1) = before[p.role], p.cpu_times()
        metrics[f"cpu_s {p.role}"] = (user1 - user0) + (system1 - system0)
        metrics[f"cpu_sys_s {p.role}"] = system1 - system0
    return metrics


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of `values` (not empty)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def fairness(
    address: Address,
    seconds: float,
    bulk_size: int = 2**30,
    reader_rate: float = 10e6,
    probe_rate: float = 200.0,
    window: float = 0.5,
) -> Metrics:
    """p99 of small requests while one user streams `bulk_size` bytes to a slow reader, vs the idle p99.

    Small requests (HTTP/1.0, a new connection each, as `ab` sends them) are started on a fixed
    schedule, `probe_rate` a second, whatever the answers' pace (a stalled path cannot slow the
    probe down and so hide its stall); each latency counts from the request's scheduled start.
    The probe runs `seconds` with nothing else on the path and `seconds` beside a download, in
    alternating windows of about `window` seconds, so that a burst of load from the rest of the
    machine hits both alike. For each busy window one user asks for `bulk_size` bytes and reads
    them at `reader_rate` bytes/s, slower than any path sends: the path's buffers for that user
    fill up and stay full. The download ends with its window (it is bounded by time; the rate it
    moved at is reported).
    """
    return asyncio.run(_fairness(address, seconds, bulk_size, reader_rate, probe_rate, window))


async def _probe(address: Address, seconds: float, rate: float) -> tuple[list[float], int]:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    failed = 0
    gate = asyncio.Semaphore(64)  # bounded in-flight; waiting for a slot counts in the latency

    async def one(due: float) -> None:
        nonlocal failed
        await asyncio.sleep(max(0.0, due - loop.time()))
        try:
            async with gate, asyncio.timeout(10):
                reader, writer = await asyncio.open_connection(*address)
                try:
                    writer.write(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
                    answer = await reader.read()
                finally:
                    writer.close()
            if not answer.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(answer[:40])
            latencies.append((loop.time() - due) * 1000)
        except (OSError, RuntimeError, TimeoutError):
            failed += 1

    start = loop.time() + 0.01
    count = max(1, round(seconds * rate))
    async with asyncio.TaskGroup() as group:
        for i in range(count):
            group.create_task(one(start + i / rate))
    return latencies, failed


async def _fairness(
    address: Address, seconds: float, bulk_size: int, reader_rate: float, probe_rate: float, window: float
) -> Metrics:
    windows = max(1, round(seconds / window))
    idle: list[float] = []
    busy: list[float] = []
    failed = moved = 0
    busy_seconds = 0.0
    for _ in range(windows):
        latencies, lost = await _probe(address, seconds / windows, probe_rate)
        idle += latencies
        failed += lost
        latencies, lost, bulk_bytes, elapsed = await _beside_download(
            address, seconds / windows, bulk_size, reader_rate, probe_rate
        )
        busy += latencies
        failed += lost
        moved += bulk_bytes
        busy_seconds += elapsed
        await asyncio.sleep(0.1)  # the download's connection is closed: let the path finish with it
    if not idle or not busy:
        raise RuntimeError(f"no small request was answered ({failed} failed)")
    if moved == 0:
        raise RuntimeError("the bulk transfer did not move during the probe")
    idle_p99, busy_p99 = percentile(idle, 0.99), percentile(busy, 0.99)
    return {
        "idle_p50_ms": percentile(idle, 0.5),
        "idle_p99_ms": idle_p99,
        "busy_p50_ms": percentile(busy, 0.5),
        "busy_p99_ms": busy_p99,
        "p99_ratio": busy_p99 / idle_p99,
        "requests": len(idle) + len(busy),
        "failed": failed,
        "bulk_mb_per_s": moved / busy_seconds / 1e6,
    }


async def _beside_download(
    address: Address, seconds: float, bulk_size: int, reader_rate: float, probe_rate: float
) -> tuple[list[float], int, int, float]:
    """Probe for `seconds` while one slow reader downloads; (latencies, failed, bytes it moved, time)."""
    received = 0
    reader, writer = await asyncio.open_connection(*address, limit=65536)
    stop, flowing = asyncio.Event(), asyncio.Event()

    async def slow_reader() -> None:
        nonlocal received
        loop = asyncio.get_running_loop()
        writer.write(b"SOURCE %d\n" % bulk_size)
        started = loop.time()
        while not stop.is_set() and received < bulk_size:
            data = await reader.read(65536)
            if not data:
                break
            received += len(data)
            if received >= 1 << 20:
                flowing.set()
            await asyncio.sleep(max(0.0, started + received / reader_rate - loop.time()))

    try:
        async with asyncio.timeout(seconds * 4 + 30), asyncio.TaskGroup() as group:
            streaming = group.create_task(slow_reader())
            with contextlib.suppress(TimeoutError):  # the download is under way, the path's buffers full
                async with asyncio.timeout(5):
                    await flowing.wait()
            before, started = received, time.perf_counter()
            latencies, failed = await _probe(address, seconds, probe_rate)
            elapsed, moved = time.perf_counter() - started, received - before
            stop.set()
            streaming.cancel()  # it may be waiting for bytes
    finally:
        writer.close()
    return latencies, failed, moved, elapsed
