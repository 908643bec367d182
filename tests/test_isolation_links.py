"""Every user on their own (issue 23), across a shaped link: the multiplexed stages' memory and stream bounds.

Two of issue 23's bounds had tests on 127.0.0.1 only (test_isolation_memory.py and
test_isolation_tenants.py). Here the same attacks cross a real, slow link (tests/link_lab.py): the
tunnel server and its users on the server host, the tunnel client and its local app at home, the
client's one connection over a veth pair shaped to 250 Mbit/s each way. On such a link the bytes
the app sends wait for the link in the client, and the bytes that crossed it wait for users in the
server: what loopback hides shows (a kernel there absorbs about a megabyte per socket).

- Downloaders who never read (stage 9 on): DOWNLOADERS users ask the app for EACH bytes each and
  read nothing for STALL seconds; the server runs with `--memory-budget 16`, and a bound on streams
  per address high enough that the budget alone is tested, and the server host's kernel send buffers
  held at 128 KiB (USER_SNDBUF: else the kernel, not the server, holds the stall's bytes). The
  server's and the client's VmRSS stay within their base + 16 MiB + BUDGET_SLACK (stage 18's client
  also keeps its inspector's ring); no more users get bytes than the budget has first windows for
  (the others wait for room); then every user reads everything and gets all its bytes, intact: the
  bound held the bytes back, it lost none.
- One source can't take a tunnel's streams (stage 13 on): one address opens MAX_STREAMS_PER_ADDRESS +
  EXTRA kept-alive connections through the tunnel: those past the bound get the 503 page, while a
  user from a second address of the server host still gets a 200 through the tunnel.

Needs root (network namespaces, tc); skipped with the reason otherwise. This file is also the
program the lab runs inside a namespace (`python tests/test_isolation_links.py app|download|hold ...`):
the local app, the downloaders and the flooding source, each printing one JSON line with what it saw.
"""

import argparse
import asyncio
import contextlib
import fcntl
import hashlib
import json
import re
import secrets
import socket
import struct
import sys
import termios
import time
from pathlib import Path
from typing import Any

import link_lab
import pytest
from hardening import MiB, RssWatch, has_proc, rss_bytes, stage_module
from link_lab import SERVER_IP, LinkLab

from nat_lab import APP_PORT, CONTROL_PORT, PUBLIC_PORT, STEP_TIMEOUT, LabProcess
from support import (
    client_flags,
    connect_all,
    first_and_last,
    has,
    has_inspector,
    has_tunnels,
    stages_from,
    tls_flags,
)

HERE = Path(__file__).resolve()
REASON = link_lab.probe() if has_proc() else "needs Linux /proc to read the processes' memory"
# The memory budget came with flow control (stage 9); the streams per address with the limits (stage 13).
# A second address of the server host (the same reserved /24 as the lab's): another source of users.
OTHER_IP = "198.51.100.3"
TCP_TUNNEL = r"tcp port listening on \S+:(\d+)"  # from stage 14 on, the server logs the TCP tunnel's port
NAME = "app"  # the HTTP tunnel's name from stage 15 on: users say Host: app.localhost

pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=f"link lab: {REASON}")]


async def start_tunnel(
    lab: LinkLab, stage: str, kind: str, *server_args: str
) -> tuple[LabProcess, LabProcess, int, str]:
    """The stage's server on the server host and its client at home, in front of the app on APP_PORT.

    `kind`: "tcp" (from stage 14 on a TCP tunnel, on a port the server picks) or "http" (stage 14: the
    server's public port, which the first client holds; from stage 15 on an HTTP tunnel named NAME).
    Before stage 14 the one client's users come to the public port. Returns the server, the client,
    the port users connect to and the Host header they send.
    """
    env = {"NGROK_SECRET": secrets.token_urlsafe(16)}
    ports = {"control": CONTROL_PORT, "public": PUBLIC_PORT}
    flags = [flag for role, port in ports.items() for flag in (f"--{role}-port", str(port))]
    flags += tls_flags(stage) + list(server_args)
    server = await lab.start("server", "server", "-m", f"{stage}.server", "--host", SERVER_IP, *flags, env=env)
    await server.expect(rf"public port listening on {re.escape(SERVER_IP)}:{PUBLIC_PORT}")
    wanted = client_flags(stage, {"control": CONTROL_PORT})  # --tcp from stage 14 on
    if kind == "http":
        wanted = [flag for flag in wanted if flag != "--tcp"] + (["--name", NAME] if has(stage, "names") else [])
    local = f"127.0.0.1:{APP_PORT}"
    client = await lab.start("home", "client", "-m", f"{stage}.client", local, SERVER_IP, *wanted, env=env)
    await client.expect(r"tunnel up")
    if kind == "http" or not has_tunnels(stage):
        host = f"{NAME}.localhost:{PUBLIC_PORT}" if has(stage, "names") else "localhost"
        return server, client, PUBLIC_PORT, host
    match = re.search(TCP_TUNNEL, await server.expect(TCP_TUNNEL))  # expect() returns the line
    assert match is not None
    return server, client, int(match[1]), ""


def outcome(process: LabProcess) -> dict[str, Any]:
    """The JSON line one of this file's programs printed at its end."""
    return dict(link_lab.result(process))


def teardown_problems(lab: LinkLab) -> list[str]:
    """What the lab left behind once closed: namespaces or processes of this run (empty: nothing)."""
    result = lab.teardown
    assert result is not None
    problems = [f"namespaces left: {result.namespaces_left}"] if result.namespaces_left else []
    return problems + ([f"processes left: {result.processes_left}"] if result.processes_left else [])


# --- downloaders who never read, across the link ---------------------------------------------------

BUDGET_MIB = 16  # the server's --memory-budget: the least allowed, 256 first windows of 64 KiB
DOWNLOADERS = 400  # 144 more than the budget has first windows for: they wait for room
EACH = 384 * 1024  # bytes the app sends each user: 150 MiB in all, ~6 s of the link once they read
STALL = 15.0  # seconds the users read nothing while the app keeps sending
# The lighter form, on the stages between the one that brings the budget and the most complete one: the
# same 400 users, bytes and bounds, reading nothing for 5 s. The link carries the 150 MiB in ~5 s, so
# by the stall's end what the users' kernels did not take is in the server: a stage 13 whose budget
# always grants held 144 MB there at 5.1 s (bound 59 MB), and all 400 users had bytes. What only a
# long stall shows, growth that comes late as buffers fill and windows grow, the full 15 s run catches
# on the first and the last stage.
STALL_LIGHT = 5.0
# Each process's own objects for 400 users (sockets, streams, tasks, log lines), beside the bytes it
# buffers for them: the same slack as the loopback test's.
BUDGET_SLACK = 16 * MiB
# Users past the budget wait for room (a 503 after the proxy timeout): long enough that they are
# served once the first ones have read their bytes, as a browser would still be waiting.
WAIT = 120.0
# The server host's kernel send buffers (net.ipv4.tcp_wmem, per namespace: min, default, max). Left to
# grow, each takes ~3 MB for a user who reads nothing, even with a 4 KiB receive buffer (measured here):
# 1.2 GB for 400 users, more than the link carries in the stall, so the server process would hold
# almost nothing, budget or not (first run: +3.4 MB). A server gets there after minutes of such users
# (the 2,000 took 80 s). Capped at 128 KiB, each user's kernel takes ~110 KB (measured) within
# seconds, and the rest waits in the server, where the budget must bound it. (Capped at 16 KiB, a
# kernel never drains a first window, so no window ever grows: a server without a budget held 64 KiB
# a stream, within the bound, and the test could not tell.)
USER_SNDBUF = "4096 16384 131072"
RUN_TIMEOUT = 75.0  # the users' whole run: connecting, the stall, reading 150 MiB, with room for a loaded machine


@pytest.mark.timeout(RUN_TIMEOUT + 45)
@pytest.mark.parametrize("stage", stages_from("flow"))
async def test_across_a_link_downloaders_who_never_read_cost_no_more_than_the_memory_budget(stage: str) -> None:
    """400 users ask the home app for 384 KiB each and read nothing for 15 s; the app keeps sending.

    On 127.0.0.1, 2,000 such users took the server from 25 to 477 MB and the client to 352 MB (one
    256 KiB read held for each). Across the link the client's reads wait for the link, the server's
    for the users: each process must stay within base + the budget + a slack, and the bytes must all
    arrive once the users read.

    In full (a 15 s stall) on stage 9, which brings the budget, and on the most complete stage; on the
    stages between, the lighter form: the same users, bytes and bounds with a STALL_LIGHT (5 s) stall,
    long enough for the link to bring every byte the users' kernels leave to the server and for the
    users past the budget's first windows to be kept waiting, too short for growth that comes late.
    """
    lines: list[str] = []
    ring = int(stage_module(stage, "capture").BYTE_LIMIT) if has_inspector(stage) else 0
    lab = LinkLab(say=lines.append)
    async with lab:  # (bound to a name first: `as` would type it as the base Lab)
        await lab.run("ip", "netns", "exec", lab.ns["server"], "sysctl", "-qw", f"net.ipv4.tcp_wmem={USER_SNDBUF}")
        app = await lab.start("home", "app", str(HERE), "app", str(APP_PORT), str(EACH))
        await app.expect("listening")
        flags = ["--memory-budget", str(BUDGET_MIB)]
        if has(stage, "limits"):  # the share per address (stage 13 on) must not be what stops them
            flags += ["--max-streams-per-address", str(DOWNLOADERS)]
        server, client, port, _ = await start_tunnel(lab, stage, "tcp", *flags, "--proxy-timeout", str(WAIT))
        pids = {"server": server.process.pid, "client": client.process.pid}
        base = {name: rss_bytes(pid) for name, pid in pids.items()}
        bounds = {name: base[name] + BUDGET_MIB * MiB + BUDGET_SLACK for name in pids}
        bounds["client"] += ring
        # The alarm stops a run far past both bounds (it failed already), not at the first.
        async with RssWatch(pids, alarm=4 * max(bounds.values())) as watch:
            started = time.monotonic()
            stall = STALL if stage in FULL else STALL_LIGHT
            args = [f"{SERVER_IP}:{port}", str(DOWNLOADERS), str(stall), str(EACH)]
            users = await lab.start("server", "users", str(HERE), "download", *args)
            stalled: dict[str, int] = {}  # each process's VmRSS at the end of the stall

            async def end_of_stall() -> None:
                await users.expect("users have bytes waiting", timeout=RUN_TIMEOUT)
                stalled.update({name: rss_bytes(pid) for name, pid in pids.items()})

            ended = asyncio.ensure_future(users.process.wait())
            alarm = asyncio.ensure_future(watch.alarm.wait())
            stalling = asyncio.ensure_future(end_of_stall())
            await asyncio.wait({ended, alarm}, timeout=RUN_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
            finished = ended.done()
            seconds = time.monotonic() - started
            for waiting in (ended, alarm, stalling):
                waiting.cancel()
            await asyncio.gather(ended, alarm, stalling, return_exceptions=True)
        await users.stop()  # exited, or stopped here: this reads the rest of its output
        seen = outcome(users) if finished else {}
        transcript = "\n".join(lines + [process.output[-20_000:] for process in (server, client, users, app)])
    problems = teardown_problems(lab)
    befores = ", ".join(f"{name} {rss / 1e6:.1f} MB" for name, rss in base.items())
    report = (
        f"{stage}: {stall:g} s stall, {'finished' if finished else 'STOPPED'} after {seconds:.1f} s; "
        f"before: {befores}; "
        f"end of the stall: {', '.join(f'{name} {rss / 1e6:.1f} MB' for name, rss in stalled.items()) or '?'}; "
        f"peak: {watch.report()}; bounds: {', '.join(f'{name} {b / 1e6:.1f} MB' for name, b in bounds.items())}; "
        f"users: {json.dumps(seen)}"
    )
    print(f"\n{report}")
    for name in pids:
        assert watch.peak[name] <= bounds[name], (
            f"the {name} passed {bounds[name] / 1e6:.1f} MB: {report}\n{transcript}"
        )
    assert finished, f"{report}\n{transcript}"
    # The bound did not just stall everyone: every user got all its bytes, intact.
    assert seen["intact"] == DOWNLOADERS, f"{report}\n{transcript}"
    # During the stall, only the users whose first window fitted in the budget had bytes; the rest waited.
    first_windows = BUDGET_MIB * MiB // stage_module(stage, "frames").INITIAL_WINDOW
    assert 0 < seen["had_bytes"] <= first_windows, f"{report}\n{transcript}"
    assert not problems, problems


FULL = first_and_last(stages_from("flow"))  # where the users stall the full 15 s


# --- one source can't take a tunnel's streams, across the link ------------------------------------

EXTRA = 8  # connections the flooding source opens past its bound


@pytest.mark.timeout(90)
@pytest.mark.parametrize("stage", stages_from("limits"))
async def test_across_a_link_one_source_holds_at_most_its_share_of_a_tunnels_streams(stage: str) -> None:
    """One address of the server host opens MAX_STREAMS_PER_ADDRESS + 8 kept-alive connections to an HTTP
    tunnel whose client is across the link: 256 get 200 and keep their streams, 8 get the 503 page; a user
    from a second address still gets a 200 meanwhile, and the first address gets in again once it closes some."""
    bound = int(stage_module(stage, "protocol").MAX_STREAMS_PER_ADDRESS)
    lines: list[str] = []
    lab = LinkLab(say=lines.append)
    async with lab:
        await lab.run("ip", "-n", lab.ns["server"], "addr", "add", f"{OTHER_IP}/32", "dev", lab.interfaces["server"])
        app = await lab.start("home", "app", str(HERE), "app", str(APP_PORT), "0")  # keep-alive HTTP
        await app.expect("listening")
        server, client, port, host = await start_tunnel(lab, stage, "http")
        args = [f"{SERVER_IP}:{port}", host, SERVER_IP, OTHER_IP, str(bound), str(EXTRA)]
        flooder = await lab.start("server", "flooder", str(HERE), "hold", *args)
        async with asyncio.timeout(60):
            await flooder.process.wait()
        await flooder.stop()  # exited: this reads the rest of its output
        seen = outcome(flooder)
        transcript = "\n".join(lines + [process.output[-20_000:] for process in (server, client, flooder, app)])
    problems = teardown_problems(lab)
    print(f"\n{stage}: {json.dumps(seen)}")
    statuses = seen["statuses"]
    assert statuses == {"200": bound, "503": EXTRA}, f"{seen}\n{transcript}"
    assert seen["refusals"] == [f"too many connections from {SERVER_IP} at once"], f"{seen}\n{transcript}"
    assert seen["other"] == 200, f"a user from {OTHER_IP} was not served: {seen}\n{transcript}"
    assert seen["again"] == 503, f"{seen}\n{transcript}"  # still full for the flooding source meanwhile
    assert seen["back_after"] is not None, f"{seen}\n{transcript}"  # its share comes back as it closes some
    assert not problems, problems


# --- the programs the lab runs inside its namespaces ----------------------------------------------


async def app_main(port: int, size: int) -> None:
    """The local app at home. `size` > 0: send each connection `size` bytes of link_lab.BLOCK, then close.
    `size` 0: an HTTP/1.1 app that answers every request of a connection and keeps it open."""
    assert size <= len(link_lab.BLOCK)
    data = link_lab.BLOCK[:size]
    tasks: set[asyncio.Task[None]] = set()

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            writer.write(data)  # as fast as the tunnel takes it: the drain waits for the client's windows
            await writer.drain()

    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                await writer.drain()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)  # a strong reference to every connection's task
        try:
            await (stream if size else keep_alive)(reader, writer)
        finally:
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    print(f"listening on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


def unread(sock: socket.socket) -> int:
    """Bytes waiting in the socket's receive queue (FIONREAD)."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0])


async def download_main(host: str, port: int, count: int, stall: float, size: int) -> None:
    """The downloaders: `count` users (4 KiB receive buffers: little hides in their kernel) read nothing for
    `stall` seconds, then everything; one JSON line: how many had bytes waiting after the stall, how many
    got exactly `size` bytes of the app's pattern."""
    loop = asyncio.get_running_loop()
    expected = hashlib.sha256(link_lab.BLOCK[:size]).hexdigest()
    users = await connect_all((host, port), count, rcvbuf=4096)
    print(f"connected {len(users)} users; reading nothing for {stall:g} s", flush=True)
    await asyncio.sleep(stall)
    had_bytes = sum(unread(user) > 0 for user in users)
    print(f"{had_bytes} users have bytes waiting; reading", flush=True)
    started = time.monotonic()
    received = [0] * count
    digests = [hashlib.sha256() for _ in users]
    finished: list[float] = []  # seconds after the stall at which each user had read to its end

    async def read(number: int) -> None:
        user = users[number]
        user.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)  # now read at the link's pace
        with contextlib.suppress(OSError):
            while data := await loop.sock_recv(user, 256 * 1024):
                digests[number].update(data)
                received[number] += len(data)
        finished.append(time.monotonic() - started)
        # Closed at once, as curl does: a user that stays after the app's EOF keeps its stream, and its
        # window in the budget, until the half-closed timeout (30 s), and those waiting for room wait for that.
        user.close()

    try:
        async with asyncio.timeout(RUN_TIMEOUT - stall - 10):  # a short count, not a hang
            await asyncio.gather(*(read(number) for number in range(count)))
    except TimeoutError:
        print("timed out reading", flush=True)
    finally:
        for user in users:
            user.close()
    intact = sum(got == size and digest.hexdigest() == expected for got, digest in zip(received, digests, strict=True))
    short = sorted(got for got in received if got != size)
    summary = {
        "users": count,
        "had_bytes": had_bytes,
        "intact": intact,
        "short": short[:10],
        "bytes": sum(received),
        "read_seconds": round(time.monotonic() - started, 2),
        "done_at": [round(finished[int(q * (len(finished) - 1))], 2) for q in (0.25, 0.5, 0.75, 1.0)]
        if finished
        else [],
    }
    print(json.dumps(summary), flush=True)


async def get_kept_alive(
    address: tuple[str, int], host: str, source: str
) -> tuple[int, bytes, asyncio.StreamWriter | None]:
    """An HTTP/1.1 GET from `source` that keeps its connection: (status, body, the open connection); 0 if none."""
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            reader, writer = await asyncio.open_connection(*address, local_addr=(source, 0))
    except OSError:
        return 0, b"", None
    writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
            body = await reader.readexactly(int(length[1])) if length else await reader.read()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        writer.close()
        return 0, b"", None
    return int(head.split(b" ", 2)[1]), body, writer


async def hold_main(address: tuple[str, int], host: str, source: str, other: str, bound: int, extra: int) -> None:
    """The flooding source: `bound + extra` kept-alive GETs from `source`, 64 at a time, the 200s kept open;
    meanwhile a GET from `other`, and one more from `source`; then it closes `extra` and asks until it is
    served again. One JSON line."""
    gate, held = asyncio.Semaphore(64), []

    async def flood() -> tuple[int, bytes]:
        async with gate:
            status, body, writer = await get_kept_alive(address, host, source)
        if writer is not None and status == 200:
            held.append(writer)  # kept open: a kept-alive connection holds its stream
        elif writer is not None:
            writer.close()
        return status, body

    def cause(body: bytes) -> str:
        found = re.search(rb"too many connections from \S+ at once", body)
        return found[0].decode() if found else body[:200].decode(errors="replace")

    try:
        started = time.monotonic()
        answers = await asyncio.gather(*(flood() for _ in range(bound + extra)))
        flooded = time.monotonic() - started
        statuses: dict[str, int] = {}
        for status, _ in answers:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        refusals = sorted({cause(body) for status, body in answers if status != 200})
        results: dict[str, Any] = {"statuses": statuses, "refusals": refusals, "flood_seconds": round(flooded, 2)}
        for who, ip in (("other", other), ("again", source)):
            status, _, writer = await get_kept_alive(address, host, ip)
            if writer is not None:
                writer.close()
            results[who] = status
        for writer in held[:extra]:
            writer.transport.abort()
        results["back_after"] = None
        started = time.monotonic()
        while time.monotonic() - started < STEP_TIMEOUT:  # the share comes back as the server sees them end
            status, _, writer = await get_kept_alive(address, host, source)
            if writer is not None:
                writer.close()
            if status == 200:
                results["back_after"] = round(time.monotonic() - started, 3)
                break
            await asyncio.sleep(0.05)
        print(json.dumps(results), flush=True)
    finally:
        for writer in held:
            writer.transport.abort()


def main(argv: list[str]) -> int:
    """python tests/test_isolation_links.py app PORT SIZE | download HOST:PORT COUNT STALL SIZE |
    hold HOST:PORT HOSTNAME SOURCE OTHER BOUND EXTRA: the programs the lab runs in its namespaces."""
    parser = argparse.ArgumentParser(prog="test_isolation_links.py")
    programs = parser.add_subparsers(dest="program", required=True)
    app = programs.add_parser("app", help="the local app at home")
    app.add_argument("port", type=int)
    app.add_argument("size", type=int, help="bytes to send each connection; 0: a keep-alive HTTP app")
    download = programs.add_parser("download", help="users who read nothing, then everything")
    download.add_argument("address")
    download.add_argument("count", type=int)
    download.add_argument("stall", type=float)
    download.add_argument("size", type=int)
    hold = programs.add_parser("hold", help="one source that opens more kept-alive connections than its share")
    hold.add_argument("address")
    for name in ("hostname", "source", "other"):
        hold.add_argument(name)
    hold.add_argument("bound", type=int)
    hold.add_argument("extra", type=int)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):  # the lab stops the app with Ctrl-C (SIGINT)
        if args.program == "app":
            asyncio.run(app_main(args.port, args.size))
        else:
            host, port = args.address.rsplit(":", 1)
            if args.program == "download":
                asyncio.run(download_main(host, int(port), args.count, args.stall, args.size))
            else:
                target = (host, int(port))
                asyncio.run(hold_main(target, args.hostname, args.source, args.other, args.bound, args.extra))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
