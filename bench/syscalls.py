"""How many system calls a new connection costs stage 22's server and client, on each event loop.

    python3 -m bench.syscalls                       # 3,000 requests (ab -c 16), both loops
    python3 -m bench.syscalls --requests 10000 --loops uvloop

Each loop's tunnel is started as bench.inspector starts it (TLS on the client's link, a TCP tunnel,
a secret, the inspector on, as a user runs it) in front of the bench's origin, and warmed up with
1,000 requests. Then `strace -c -f` is attached to the server and to the client while `ab -c 16`
makes a new connection for each request, and is detached after the last one. Each count is
divided by the number of requests: one Markdown table, a row per system call made at least once
every 20 requests, a column per loop and program. strace slows the programs down a lot: the
counts are the measure here, not the time. It needs strace, ab and openssl; where uvloop is not
installed its columns are left out, and the output says so.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .inspector import VARIANTS, certificates, start_tunnel
from .paths import HOST, LOOPS, ROOT, UVLOOP_INSTALL, PathUnavailable, Process, uvloop_site

STAGE = "stage_22"
WARM_UP = 1000  # requests before counting: the first connections also fill caches and pools
SHOWN = 0.05  # a system call is listed if every request made at least this many of it, on average
ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")  # strace -c: % time, s, usecs, calls


def ab(port: int, requests: int) -> None:
    """`requests` HTTP/1.0 requests to the tunnel's port, 16 at a time, each on a new connection."""
    argv = ["ab", "-q", "-c", "16", "-n", str(requests), f"http://{HOST}:{port}/"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0 or "Failed requests:        0" not in done.stdout:
        raise PathUnavailable(f"ab failed: {(done.stderr or done.stdout).strip()[-300:]}")


def counted(report: Path) -> dict[str, int]:
    """strace -c's table as {system call: calls}."""
    rows = (ROW.match(line) for line in report.read_text().splitlines())
    return {row[2]: int(row[1]) for row in rows if row and row[2] != "total"}


def measure(origin: tuple[str, int], loop: str, requests: int, work: Path) -> dict[str, dict[str, float]]:
    """{program: {system call: calls per request}} for the tunnel on `loop`."""
    tls = certificates(work, STAGE)
    processes, port = start_tunnel(origin, VARIANTS["inspector on"], work, tls, STAGE, loop)
    try:
        ab(port, WARM_UP)
        tracers = {}
        for process in processes:
            argv = ["strace", "-c", "-f", "-p", str(process.popen.pid), "-o", str(work / f"{loop}-{process.role}")]
            tracers[process.role] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # strace attaches to every thread before the first request
        ab(port, requests)
        time.sleep(0.3)  # the last connections' close
        for tracer in tracers.values():
            tracer.send_signal(signal.SIGINT)  # strace detaches and writes its table
            tracer.wait(timeout=30)
    finally:
        for process in reversed(processes):
            process.stop()
    return {role: {call: n / requests for call, n in counted(work / f"{loop}-{role}").items()} for role in tracers}


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: a row per system call (most calls first), a column per loop and program, a total row."""
    columns = [(loop, role) for loop in results for role in results[loop]]
    calls = {call for loop, role in columns for call, n in results[loop][role].items() if n >= SHOWN}
    total = {column: sum(results[column[0]][column[1]].values()) for column in columns}
    lines = ["| system call | " + " | ".join(f"{loop} {role}" for loop, role in columns) + " |"]
    lines.append("|---|" + "---:|" * len(columns))
    for call in sorted(calls, key=lambda c: -sum(results[loop][role].get(c, 0) for loop, role in columns)):
        lines.append(f"| `{call}` | " + " | ".join(f"{results[lp][rp].get(call, 0):.2f}" for lp, rp in columns) + " |")
    lines.append("| **all** | " + " | ".join(f"**{total[column]:.1f}**" for column in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    """Command line: python -m bench.syscalls [--requests N] [--loops asyncio,uvloop]."""
    parser = argparse.ArgumentParser(prog="python -m bench.syscalls", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="counted requests (default: %(default)s)")
    parser.add_argument("--loops", default=",".join(LOOPS[STAGE]), help="comma-separated (default: %(default)s)")
    args = parser.parse_args()
    for tool, package in (("strace", "strace"), ("ab", "apache2-utils"), ("openssl", "openssl")):
        if shutil.which(tool) is None:
            sys.exit(f"error: needs {tool} (apt-get install {package})")
    loops = [loop for loop in args.loops.split(",") if loop]
    if unknown := set(loops) - set(LOOPS[STAGE]):
        sys.exit(f"error: {STAGE} has no loop {', '.join(sorted(unknown))}")
    if "uvloop" in loops and uvloop_site() is None:
        print(f"uvloop: not measured, not installed ({UVLOOP_INSTALL})")
        loops.remove("uvloop")
    work = Path(tempfile.mkdtemp(prefix="bench-syscalls-"))
    origin = Process.start(
        "origin", [sys.executable, "-m", "bench.origin", "--host", HOST, "--port", "0"], work, ROOT, dict(os.environ)
    )
    try:
        found = origin.wait_for(r"origin port listening on (\S+):(\d+)")
        results = {loop: measure((found[1], int(found[2])), loop, args.requests, work) for loop in loops}
    except PathUnavailable as exc:
        sys.exit(f"error: {exc}")
    finally:
        origin.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"System calls per new-connection request (strace -c, {args.requests:,} requests, ab -c 16)\n")
    print(table(results))


if __name__ == "__main__":
    main()
