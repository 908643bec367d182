"""Out of file descriptors, the server stops accepting instead of spinning, and recovers when they free.

The server CLI runs under `prlimit --nofile=256:256`, so that it cannot raise its own limit; 600
idle public connections are held open against it (loopback). Its CPU time comes from /proc.
"""

import asyncio
import os
import re
import resource
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hardening import cpu_seconds, has_proc

from support import (
    STEP_TIMEOUT,
    CliProcess,
    EchoServer,
    cli_users_port,
    client_flags,
    exchange,
    first_and_last,
    port_roles,
    server_flags,
    stages_from,
)

ROOT = Path(__file__).resolve().parent.parent
SECRET = "fd-limit-tests-secret"
LIMIT = 256
ATTACKERS = 600
CPU_SHARE = 0.10  # of one core, while the attackers hold their connections
MEASURE = 3.0  # seconds of CPU time measured, on the stage that brings the limit and on the last one
LIGHT_MEASURE = 1.5  # the lighter form between: the same bounds over half the time (a spinning server takes ~100 %)
LOG_LIMIT = 20_000  # bytes of log for the whole attack
# Seconds for a normal user once the attackers are gone, as issue 12 asks; measured 0.06-0.10 s
# on a loaded 2-core machine (the closed attackers still queued are let go by a peek, unserved).
RECOVERY = 1.0
# How a log line may name the condition: "file descriptors", "too many open files", EMFILE.
CONDITION = re.compile(r"(?i)descriptor|too many open files|emfile")

pytestmark = pytest.mark.skipif(
    shutil.which("prlimit") is None or not has_proc(), reason="needs prlimit (util-linux) and Linux /proc"
)


@pytest.fixture(params=stages_from("limits"))  # the descriptor limit came with the limits
def stage(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def under_limit() -> AsyncIterator[CliProcess.Factory]:
    """Start `prlimit --nofile=SOFT:HARD python -m ARGS` (start("SOFT:HARD", *ARGS)); all are stopped at the end."""
    started: list[CliProcess] = []

    async def start(nofile: str, *args: str) -> CliProcess:
        process = await asyncio.create_subprocess_exec(
            "prlimit", f"--nofile={nofile}", sys.executable, "-u", "-P", *args,
            cwd=ROOT,
            env={**os.environ, "NGROK_SECRET": SECRET},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        started.append(CliProcess(process, args))  # prlimit execs the program: the pid is the server's
        return started[-1]

    yield start
    await asyncio.gather(*(process.stop() for process in started))


@pytest.fixture
def enough_fds() -> Iterator[None]:
    """This process holds the attackers' 600 sockets and the local app's side: make room if the soft limit is low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * ATTACKERS if hard == resource.RLIM_INFINITY else min(hard, 4 * ATTACKERS)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def soft_nofile(pid: int) -> int:
    """The soft RLIMIT_NOFILE of process `pid`, from /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no 'Max open files' in /proc/{pid}/limits")


async def start_server(start: CliProcess.Factory, stage: str, nofile: str) -> tuple[CliProcess, dict[str, int]]:
    server = await start(nofile, "-m", f"{stage}.server", *server_flags(stage))
    return server, {role: await server.listening(role) for role in port_roles(stage)}


def log_size(process: CliProcess) -> int:
    return sum(len(line) + 1 for line in process.lines)


async def test_the_server_raises_its_soft_descriptor_limit_to_the_hard_one_and_logs_it(
    under_limit: CliProcess.Factory, stage: str
) -> None:
    server, _ = await start_server(under_limit, stage, "256:4096")
    assert soft_nofile(server.process.pid) == 4096, server.output
    # Wait (bounded) for the line naming the raised limit: it may come just after the listening lines.
    await server.expect(r"(?i)descriptor.*\b4096\b")


async def hold(port: int, count: int) -> list[socket.socket]:
    """Open `count` connections to `port` and keep them, silent (bounded in time)."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(64)

    async def one() -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        async with gate:
            try:
                await loop.sock_connect(sock, ("127.0.0.1", port))
            except BaseException:
                sock.close()
                raise
        return sock

    async with asyncio.timeout(STEP_TIMEOUT * 3):
        return list(await asyncio.gather(*(one() for _ in range(count))))


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_at_its_descriptor_limit_the_server_does_not_spin_and_recovers(
    under_limit: CliProcess.Factory, cli: CliProcess.Factory, echo_server: EchoServer, stage: str, enough_fds: None
) -> None:
    """Issue 12, item 2. The server can't raise its limit (256:256); a tunnel client is connected,
    so every accepted attacker is a relay that holds descriptors on the server.

    The CPU is measured for MEASURE (3 s) on stage 13 and on the most complete stage; on the stages
    between, the lighter form: LIGHT_MEASURE (1.5 s), with the same bounds on CPU and log.
    """
    measure = MEASURE if stage in first_and_last(stages_from("limits")) else LIGHT_MEASURE
    server, ports = await start_server(under_limit, stage, f"{LIMIT}:{LIMIT}")
    client = await cli(
        "-m", f"{stage}.client", f"127.0.0.1:{echo_server.port}", "127.0.0.1",
        *client_flags(stage, ports), env={"NGROK_SECRET": SECRET},
    )  # fmt: skip
    await client.expect("tunnel up")
    public = await cli_users_port(stage, server, ports)  # from stage 10 on, the client's TCP tunnel
    assert await exchange(public, b"before") == b"before"
    logged_before = log_size(server)

    attackers = await hold(public, ATTACKERS)
    try:
        await asyncio.sleep(1.0)  # let the server accept what it can and reach its limit
        pid = server.process.pid
        cpu, started = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(measure)
        share = (cpu_seconds(pid) - cpu) / (time.monotonic() - started)
        logged = log_size(server) - logged_before
        figures = f"CPU {share:.0%} of a core, {logged} bytes of log in {measure + 1:g} s"
        print(f"\n{ATTACKERS} idle connections at a limit of {LIMIT}: {figures}")
    finally:
        for sock in attackers:
            sock.close()

    recovered_at = time.monotonic()
    async with asyncio.timeout(RECOVERY):
        answer = await exchange(public, b"after")
    recovery = time.monotonic() - recovered_at
    print(f"a normal user was served {recovery:.2f} s after the attackers left")
    tail = "\n".join(server.lines[-20:])
    assert share < CPU_SHARE, f"{figures}; the log ends:\n{tail}"
    assert logged < LOG_LIMIT, f"{figures}; the log ends:\n{tail}"
    assert not [line for line in server.lines if "Traceback" in line], f"a traceback in the log:\n{tail}"
    assert [line for line in server.lines if CONDITION.search(line)], f"the log never says it ran out:\n{tail}"
    assert answer == b"after"
